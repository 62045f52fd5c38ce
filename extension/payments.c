/*-------------------------------------------------------------------------
 *
 * payments.c
 *	  The payment state machine and its follow-up notification.
 *
 *	  A payment's status changes after its link exists only by
 *	  crmpay_transition_allowed() and the one UPDATE CRMPAY_PAYMENT_MOVE_SQL
 *	  (crmpay.h): crmpay_apply_status() runs them for reconciliation and
 *	  the synchronous API, and the webhook intake runs the same UPDATE
 *	  inside the statement that records the event.  Which moves are
 *	  allowed is data, the table
 *	  crmpay.status_transitions (cached per backend, dropped when it
 *	  changes); the row is locked first, so concurrent
 *	  deliveries decide on the latest status and a late or out-of-order
 *	  event can never move a payment backwards.  Facts that only grow (the
 *	  gateway's payment id, the cumulative refunded amount) are kept even
 *	  when the status does not move.
 *
 *	  crmpay._payment_changed() is the trigger that follows every change:
 *	  NOTIFY crmpay_payments with a small JSON payload on every status
 *	  change, the payment_refs lookup, and the CRM's order row.
 *
 *-------------------------------------------------------------------------
 */
#include "crmpay.h"

#include "catalog/pg_type.h"
#include "commands/async.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/rel.h"

enum
{
	PLAN_LOCK,
	PLAN_MOVE,
	PLAN_FACTS,
	PLAN_KEEP_REF,
	PLAN_TRANSITIONS,
	NUM_PLANS
};

static SPIPlanPtr plans[NUM_PLANS];

static SPIPlanPtr
state_plan(int which)
{
	static const struct
	{
		const char *sql;
		int			nargs;
		Oid			types[5];
	}			defs[NUM_PLANS] = {
		[PLAN_LOCK] = {
			"SELECT status FROM crmpay.payments WHERE id = $1 FOR UPDATE",
			1, {INT8OID}
		},
		[PLAN_MOVE] = {
			CRMPAY_PAYMENT_MOVE_SQL,
			5, {INT8OID, TEXTOID, TEXTOID, INT8OID, TIMESTAMPTZOID}
		},
		[PLAN_FACTS] = {
			"UPDATE crmpay.payments p"
			"   SET gateway_payment_ref = coalesce(p.gateway_payment_ref, $2),"
			"       refunded_minor = greatest(p.refunded_minor, coalesce($3, 0)),"
			"       updated_at = now()"
			" WHERE p.id = $1 AND ((p.gateway_payment_ref IS NULL AND $2 IS NOT NULL)"
			"                      OR coalesce($3, 0) > p.refunded_minor)",
			3, {INT8OID, TEXTOID, INT8OID}
		},
		[PLAN_KEEP_REF] = {
			CRMPAY_KEEP_PAYMENT_REF_SQL " VALUES ($1, $2, $3)" CRMPAY_KEEP_PAYMENT_REF_CONFLICT,
			3, {TEXTOID, TEXTOID, INT8OID}
		},
		[PLAN_TRANSITIONS] = {
			"SELECT from_status, to_status, 'crmpay.status_transitions'::regclass"
			"  FROM crmpay.status_transitions",
			0, {InvalidOid}
		},
	};

	return crmpay_saved_plan(&plans[which], defs[which].sql, defs[which].nargs,
							 defs[which].types);
}

/*
 * The edges of crmpay.status_transitions, cached per backend: every status
 * change asks whether its edge exists.  A statement trigger on the table
 * (crmpay._cached_table_changed) sends a relcache invalidation on every
 * change, and the callback below drops the copy.
 */
typedef struct Transition
{
	char	   *from_status;
	char	   *to_status;
} Transition;

static MemoryContext transitions_cxt = NULL;
static Transition *transitions = NULL;
static int	num_transitions = -1;	/* -1: not loaded */
static Oid	transitions_relid = InvalidOid;

/* Relcache callback: a change to crmpay.status_transitions (or a full reset). */
static void
transitions_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == transitions_relid)
	{
		num_transitions = -1;
		transitions = NULL;
		transitions_relid = InvalidOid;
		if (transitions_cxt != NULL)
			MemoryContextReset(transitions_cxt);
	}
}

/* Reads crmpay.status_transitions into the cache.  Caller is connected to SPI. */
static void
load_transitions(void)
{
	int			n = 0;

	if (transitions_cxt == NULL)
	{
		transitions_cxt = AllocSetContextCreate(CacheMemoryContext, "crmpay status transitions",
												ALLOCSET_SMALL_SIZES);
		CacheRegisterRelcacheCallback(transitions_invalidate, (Datum) 0);
	}
	crmpay_spi_run(state_plan(PLAN_TRANSITIONS), NULL, NULL, true, 0,
				   SPI_OK_SELECT, "reading the status transitions");
	MemoryContextReset(transitions_cxt);
	transitions = MemoryContextAlloc(transitions_cxt, Max(SPI_processed, 1) * sizeof(Transition));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	row = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;

		transitions[n].from_status = MemoryContextStrdup(transitions_cxt, SPI_getvalue(row, desc, 1));
		transitions[n].to_status = MemoryContextStrdup(transitions_cxt, SPI_getvalue(row, desc, 2));
		transitions_relid = DatumGetObjectId(SPI_getbinval(row, desc, 3, &isnull));
		n++;
	}
	num_transitions = n;
}

/*
 * crmpay_transition_allowed
 *		Whether crmpay.status_transitions has the edge from -> to.  The
 *		caller must be connected to SPI (the first call reads the table).
 */
bool
crmpay_transition_allowed(const char *from_status, const char *to_status)
{
	if (num_transitions < 0)
		load_transitions();
	for (int i = 0; i < num_transitions; i++)
		if (strcmp(transitions[i].from_status, from_status) == 0 &&
			strcmp(transitions[i].to_status, to_status) == 0)
			return true;
	return false;
}

/*
 * crmpay_record_payment_facts
 *		Records facts that only grow about a locked payment whose status does
 *		not move: its gateway payment ref (NULL: none) if it had none, and
 *		the refunded total (-1: none) if larger.  True if anything changed.
 *		The caller must be connected to SPI.
 */
bool
crmpay_record_payment_facts(int64 payment_id, const char *gateway_payment_ref,
							int64 refunded_minor)
{
	Datum		values[3];
	char		nulls[3] = {' ', ' ', ' '};

	if (gateway_payment_ref == NULL && refunded_minor <= 0)
		return false;
	values[0] = Int64GetDatum(payment_id);
	values[1] = crmpay_text_param(gateway_payment_ref, &nulls[1]);
	values[2] = Int64GetDatum(refunded_minor);
	nulls[2] = refunded_minor >= 0 ? ' ' : 'n';
	crmpay_spi_run(state_plan(PLAN_FACTS), values, nulls, false, 0,
				   SPI_OK_UPDATE, "payment facts update");
	return SPI_processed > 0;
}

/*
 * crmpay_apply_status_locked
 *		The state machine step for a payment whose row the caller has locked
 *		(SELECT ... FOR UPDATE) and whose current status it read under that
 *		lock.  Moves it to new_status if crmpay.status_transitions allows;
 *		records gateway_payment_ref (may be NULL) and refunded_minor (-1 for
 *		none) when they add information.  Returns true if the status moved.
 *		The caller must be connected to SPI.
 */
bool
crmpay_apply_status_locked(int64 payment_id, const char *current_status,
						   const char *new_status, const char *gateway_payment_ref,
						   int64 refunded_minor, TimestampTz at)
{
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};

	if (!crmpay_transition_allowed(current_status, new_status))
	{
		crmpay_record_payment_facts(payment_id, gateway_payment_ref, refunded_minor);
		return false;
	}
	values[0] = Int64GetDatum(payment_id);
	values[1] = CStringGetTextDatum(new_status);
	values[2] = crmpay_text_param(gateway_payment_ref, &nulls[2]);
	values[3] = Int64GetDatum(refunded_minor);
	nulls[3] = refunded_minor >= 0 ? ' ' : 'n';
	values[4] = TimestampTzGetDatum(at);
	crmpay_spi_run(state_plan(PLAN_MOVE), values, nulls, false, 0, SPI_OK_UPDATE, "status update");
	return SPI_processed == 1;
}

/*
 * crmpay_apply_status
 *		Locks the payment, then crmpay_apply_status_locked().  Returns the
 *		old status (palloc'd in the caller's context) when the status moved,
 *		NULL when it did not or the payment does not exist.
 */
char *
crmpay_apply_status(int64 payment_id, const char *new_status,
					const char *gateway_payment_ref, int64 refunded_minor,
					TimestampTz at)
{
	MemoryContext callercxt = CurrentMemoryContext;
	char	   *old_status = NULL;
	char	   *current;
	Datum		values[1];

	SPI_connect();
	values[0] = Int64GetDatum(payment_id);
	crmpay_spi_run(state_plan(PLAN_LOCK), values, NULL, false, 1, SPI_OK_SELECT, "payment lock");
	if (SPI_processed == 1)
	{
		current = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		if (crmpay_apply_status_locked(payment_id, current, new_status,
									   gateway_payment_ref, refunded_minor, at))
			old_status = MemoryContextStrdup(callercxt, current);
	}
	SPI_finish();
	return old_status;
}

PG_FUNCTION_INFO_V1(crmpay_apply_status_sql);

/*
 * crmpay._apply_status(payment_id bigint, new_status text,
 *		gateway_payment_ref text, refunded_minor bigint, at timestamptz)
 *		RETURNS text: the old status if the payment moved, else NULL.
 */
Datum
crmpay_apply_status_sql(PG_FUNCTION_ARGS)
{
	char	   *old_status;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	old_status = crmpay_apply_status(PG_GETARG_INT64(0),
									 text_to_cstring(PG_GETARG_TEXT_PP(1)),
									 PG_ARGISNULL(2) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(2)),
									 PG_ARGISNULL(3) ? -1 : PG_GETARG_INT64(3),
									 PG_ARGISNULL(4) ? GetCurrentTransactionStartTimestamp() : PG_GETARG_TIMESTAMPTZ(4));
	if (old_status == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(old_status));
}

/*
 * The payment whose payment_refs row the running statement writes itself
 * (the webhook intake's move), so the trigger leaves it alone; 0 for none.
 * Only C code of crmpay sets it, around one statement.
 */
static int64 ref_kept_by_statement = 0;

void
crmpay_statement_keeps_payment_ref(int64 payment_id)
{
	ref_kept_by_statement = payment_id;
}

/* PLAN_KEEP_REF with (account, gateway payment ref, payment id). */
static void
upsert_payment_ref(Datum *values)
{
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "crmpay: SPI_connect failed");
	crmpay_spi_run(state_plan(PLAN_KEEP_REF), values, NULL, false, 0, SPI_OK_INSERT,
				   "recording the payment's gateway reference");
	SPI_finish();
}

/*
 * crmpay_upsert_payment_ref
 *		Maps the account's gateway payment ref to the payment, replacing a
 *		mapping to another payment (the direct intake path's rare case).
 */
void
crmpay_upsert_payment_ref(const char *account, const char *gateway_payment_ref, int64 payment_id)
{
	Datum		values[3];

	values[0] = CStringGetTextDatum(account);
	values[1] = CStringGetTextDatum(gateway_payment_ref);
	values[2] = Int64GetDatum(payment_id);
	upsert_payment_ref(values);
}

/*
 * keep_payment_ref
 *		Keeps crmpay.payment_refs, the lookup of payments by the gateway's
 *		payment id, in step with the column, whoever writes it (the state
 *		machine, or a shop inserting its Braintree payments).  A mapping
 *		left behind by a changed or deleted payment is harmless: lookups
 *		check it against the payment.
 */
static void
keep_payment_ref(TriggerData *trigdata)
{
	TupleDesc	desc;
	HeapTuple	new_tuple;
	int			ref_attnum;
	bool		isnull;
	Datum		ref;
	Datum		payment_id;
	Datum		values[3];

	desc = trigdata->tg_relation->rd_att;
	new_tuple = TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ? trigdata->tg_newtuple
		: trigdata->tg_trigtuple;
	ref_attnum = SPI_fnumber(desc, "gateway_payment_ref");
	if (ref_attnum <= 0)
		elog(ERROR, "crmpay: payments has no column gateway_payment_ref");
	ref = heap_getattr(new_tuple, ref_attnum, desc, &isnull);
	if (isnull)
		return;
	payment_id = heap_getattr(new_tuple, SPI_fnumber(desc, "id"), desc, &isnull);
	if (ref_kept_by_statement != 0 && DatumGetInt64(payment_id) == ref_kept_by_statement)
		return;
	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		bool		old_isnull;
		Datum		old_ref = heap_getattr(trigdata->tg_trigtuple, ref_attnum, desc, &old_isnull);

		/* the state machine's UPDATE names the column; most often it stays */
		if (!old_isnull && datumIsEqual(old_ref, ref, false, -1))
			return;
	}

	values[0] = heap_getattr(new_tuple, SPI_fnumber(desc, "account"), desc, &isnull);
	values[1] = ref;
	values[2] = payment_id;
	upsert_payment_ref(values);
}

/* The text of a column of a trigger tuple, or NULL. */
static char *
tuple_text(HeapTuple tuple, TupleDesc desc, const char *column)
{
	int			attnum = SPI_fnumber(desc, column);

	if (attnum <= 0)
		elog(ERROR, "crmpay: payments has no column %s", column);
	return SPI_getvalue(tuple, desc, attnum);
}

/*
 * notify_payment_change
 *		NOTIFY crmpay_payments, '{"payment_id", "account", "order_ref",
 *		"old_status", "new_status"}' after a payment is created or changes
 *		status.  The notification is sent when the transaction commits.
 */
static void
notify_payment_change(TriggerData *trigdata)
{
	TupleDesc	desc;
	HeapTuple	new_tuple;
	char	   *old_status = NULL;
	StringInfoData payload;

	desc = trigdata->tg_relation->rd_att;
	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		new_tuple = trigdata->tg_newtuple;
		old_status = tuple_text(trigdata->tg_trigtuple, desc, "status");
		/* only status changes are announced */
		if (strcmp(old_status, tuple_text(new_tuple, desc, "status")) == 0)
			return;
	}
	else
		new_tuple = trigdata->tg_trigtuple;

	initStringInfo(&payload);
	appendStringInfo(&payload, "{\"payment_id\": %s, \"account\": ", tuple_text(new_tuple, desc, "id"));
	escape_json(&payload, tuple_text(new_tuple, desc, "account"));
	appendStringInfoString(&payload, ", \"order_ref\": ");
	escape_json(&payload, tuple_text(new_tuple, desc, "order_ref"));
	appendStringInfoString(&payload, ", \"old_status\": ");
	if (old_status)
		escape_json(&payload, old_status);
	else
		appendStringInfoString(&payload, "null");
	appendStringInfoString(&payload, ", \"new_status\": ");
	escape_json(&payload, tuple_text(new_tuple, desc, "status"));
	appendStringInfoChar(&payload, '}');

	Async_Notify("crmpay_payments", payload.data);
}

PG_FUNCTION_INFO_V1(crmpay_payment_changed);

/*
 * crmpay._payment_changed() AFTER INSERT OR UPDATE OF status, url,
 * order_table, gateway_payment_ref row trigger on crmpay.payments
 *		The follow-ups of a new or changed payment, whoever wrote it: the
 *		payment_refs lookup, the NOTIFY, and the CRM's order row
 *		(orders.c).  One trigger rather than three: each AFTER trigger
 *		costs a queued event and a fetch of both row versions per row.
 *		Each part returns at once when its columns did not change.
 */
Datum
crmpay_payment_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
		elog(ERROR, "crmpay: _payment_changed must be an AFTER row trigger");
	keep_payment_ref(trigdata);
	notify_payment_change(trigdata);
	crmpay_sync_order_row(trigdata);
	return PointerGetDatum(NULL);
}
