/*-------------------------------------------------------------------------
 *
 * payments.c
 *	  The payment state machine and its follow-up notification.
 *
 *	  crmpay_apply_status() is the one place a payment's status changes
 *	  after its link exists: webhooks and reconciliation both go through
 *	  it.  Which moves are allowed is data, the table
 *	  crmpay.status_transitions; the row is locked first, so concurrent
 *	  deliveries decide on the latest status and a late or out-of-order
 *	  event can never move a payment backwards.  Facts that only grow (the
 *	  gateway's payment id, the cumulative refunded amount) are kept even
 *	  when the status does not move.
 *
 *	  crmpay._notify_payment_change() is the trigger that sends
 *	  NOTIFY crmpay_payments with a small JSON payload on every status change.
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
#include "utils/json.h"
#include "utils/rel.h"

enum
{
	PLAN_LOCK,
	PLAN_MOVE,
	PLAN_FACTS,
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
			"UPDATE crmpay.payments p"
			"   SET status = $2,"
			"       gateway_payment_ref = coalesce(p.gateway_payment_ref, $3),"
			"       refunded_minor = greatest(p.refunded_minor, coalesce($4, 0)),"
			"       paid_at = CASE WHEN $2 = 'paid' THEN coalesce(p.paid_at, $5) ELSE p.paid_at END,"
			"       updated_at = now()"
			" WHERE p.id = $1 AND EXISTS (SELECT 1 FROM crmpay.status_transitions t"
			"                              WHERE t.from_status = p.status AND t.to_status = $2)",
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
	};

	return crmpay_saved_plan(&plans[which], defs[which].sql, defs[which].nargs,
							 defs[which].types);
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
	bool		moved = false;
	int			rc;

	values[0] = Int64GetDatum(payment_id);
	if (strcmp(current_status, new_status) != 0)
	{
		values[1] = CStringGetTextDatum(new_status);
		values[2] = gateway_payment_ref ? CStringGetTextDatum(gateway_payment_ref) : (Datum) 0;
		nulls[2] = gateway_payment_ref ? ' ' : 'n';
		values[3] = Int64GetDatum(refunded_minor);
		nulls[3] = refunded_minor >= 0 ? ' ' : 'n';
		values[4] = TimestampTzGetDatum(at);
		rc = SPI_execute_plan(state_plan(PLAN_MOVE), values, nulls, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "crmpay: status update failed: %s", SPI_result_code_string(rc));
		moved = (SPI_processed == 1);
	}
	if (!moved && (gateway_payment_ref != NULL || refunded_minor > 0))
	{
		values[1] = gateway_payment_ref ? CStringGetTextDatum(gateway_payment_ref) : (Datum) 0;
		nulls[1] = gateway_payment_ref ? ' ' : 'n';
		values[2] = Int64GetDatum(refunded_minor);
		nulls[2] = refunded_minor >= 0 ? ' ' : 'n';
		rc = SPI_execute_plan(state_plan(PLAN_FACTS), values, nulls, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "crmpay: payment facts update failed: %s", SPI_result_code_string(rc));
	}
	return moved;
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
	int			rc;

	SPI_connect();
	values[0] = Int64GetDatum(payment_id);
	rc = SPI_execute_plan(state_plan(PLAN_LOCK), values, NULL, false, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "crmpay: payment lock failed: %s", SPI_result_code_string(rc));
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

/* The text of a column of a trigger tuple, or NULL. */
static char *
tuple_text(HeapTuple tuple, TupleDesc desc, const char *column)
{
	int			attnum = SPI_fnumber(desc, column);

	if (attnum <= 0)
		elog(ERROR, "crmpay: payments has no column %s", column);
	return SPI_getvalue(tuple, desc, attnum);
}

PG_FUNCTION_INFO_V1(crmpay_notify_payment_change);

/*
 * crmpay._notify_payment_change() trigger
 *		NOTIFY crmpay_payments, '{"payment_id", "account", "order_ref",
 *		"old_status", "new_status"}' after a payment is created or changes
 *		status.  The notification is sent when the transaction commits.
 */
Datum
crmpay_notify_payment_change(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	HeapTuple	new_tuple;
	char	   *old_status = NULL;
	StringInfoData payload;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "crmpay: _notify_payment_change must be called as a trigger");

	desc = trigdata->tg_relation->rd_att;
	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		new_tuple = trigdata->tg_newtuple;
		old_status = tuple_text(trigdata->tg_trigtuple, desc, "status");
		/* only status changes are announced */
		if (strcmp(old_status, tuple_text(new_tuple, desc, "status")) == 0)
			return PointerGetDatum(NULL);
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
	return PointerGetDatum(NULL);
}
