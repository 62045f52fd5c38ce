/*-------------------------------------------------------------------------
 *
 * orders.c
 *	  The CRM's own order tables (crmpay.link_orders): the trigger that
 *	  queues a link request for each new order, and the trigger on
 *	  crmpay.payments that writes a payment's URL and status back into its
 *	  order's row.
 *
 *	  Both are on hot paths (every CRM insert, every payment change), so
 *	  they are C with saved plans: the insert trigger is one INSERT into
 *	  crmpay.jobs; the write-back keeps one plan per linked table and set
 *	  of columns, with every identifier quoted.  Columns are known by
 *	  number in crmpay.order_links and named when used, so renaming a
 *	  column of a linked table is fine.
 *
 *-------------------------------------------------------------------------
 */
#include "crmpay.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_attribute.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/syscache.h"

#include "worker.h"

enum
{
	PLAN_ENQUEUE_ORDER,
	PLAN_FIND_LINK,
	PLAN_SYNC_ALERT,
	NUM_PLANS
};

static SPIPlanPtr plans[NUM_PLANS];

static SPIPlanPtr
orders_plan(int which)
{
	static const struct
	{
		const char *sql;
		int			nargs;
		Oid			types[4];
	}			defs[NUM_PLANS] = {
		[PLAN_ENQUEUE_ORDER] = {
			"INSERT INTO crmpay.jobs (kind, account, order_table, payload)"
			" VALUES ('create_link', $1, $2, $3::jsonb)",
			3, {TEXTOID, REGCLASSOID, TEXTOID}
		},
		[PLAN_FIND_LINK] = {
			"SELECT order_ref_attnum, url_attnum, status_attnum, linked_by::text"
			"  FROM crmpay.order_links WHERE orders = $1",
			1, {REGCLASSOID}
		},
		[PLAN_SYNC_ALERT] = {
			"INSERT INTO crmpay.alerts (kind, account, payment_id, message, details)"
			" VALUES ('order_sync_failed', $1, $2, $3, jsonb_build_object('sqlstate', $4))",
			4, {TEXTOID, INT8OID, TEXTOID, TEXTOID}
		},
	};

	return crmpay_saved_plan(&plans[which], defs[which].sql, defs[which].nargs,
							 defs[which].types);
}

PG_FUNCTION_INFO_V1(crmpay_order_inserted);

/*
 * crmpay._order_inserted() AFTER INSERT row trigger (see crmpay.link_orders)
 *		Arguments: account, and the column numbers of order_ref, amount,
 *		currency, email and description (0 = none).  Queues one create_link
 *		job holding the row's values as text, and wakes the worker at
 *		commit; the worker validates the order (an invalid one gives a dead
 *		job, never a failed CRM insert; so does a column dropped since).
 */
Datum
crmpay_order_inserted(PG_FUNCTION_ARGS)
{
	static const char *const fields[] = {"order_ref", "amount", "currency", "email", "description"};
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Trigger    *trigger;
	TupleDesc	desc;
	StringInfoData payload;
	Datum		values[3];
	int			rc;
	int			i;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) || !TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
		elog(ERROR, "crmpay: _order_inserted must be an AFTER INSERT row trigger");
	trigger = trigdata->tg_trigger;
	if (trigger->tgnargs != 6)
		elog(ERROR, "crmpay: _order_inserted needs 6 arguments; use crmpay.link_orders()");
	desc = RelationGetDescr(trigdata->tg_relation);

	initStringInfo(&payload);
	appendStringInfoString(&payload, "{\"order\": {");
	for (i = 0; i < lengthof(fields); i++)
	{
		int			attnum = atoi(trigger->tgargs[i + 1]);
		char	   *value = NULL;

		/* a column dropped since link_orders reads as NULL: the job goes dead, the insert works */
		if (attnum > 0 && attnum <= desc->natts && !TupleDescAttr(desc, attnum - 1)->attisdropped)
			value = SPI_getvalue(trigdata->tg_trigtuple, desc, attnum);
		if (i > 0)
			appendStringInfoString(&payload, ", ");
		escape_json(&payload, fields[i]);
		appendStringInfoString(&payload, ": ");
		if (value != NULL)
			escape_json(&payload, value);
		else
			appendStringInfoString(&payload, "null");
	}
	appendStringInfoString(&payload, "}}");

	values[0] = CStringGetTextDatum(trigger->tgargs[0]);
	values[1] = ObjectIdGetDatum(RelationGetRelid(trigdata->tg_relation));
	values[2] = CStringGetTextDatum(payload.data);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "crmpay: SPI_connect failed");
	rc = SPI_execute_plan(orders_plan(PLAN_ENQUEUE_ORDER), values, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "crmpay: could not queue the order's link request: %s", SPI_result_code_string(rc));
	SPI_finish();
	crmpay_wake_worker_at_commit();
	return PointerGetDatum(NULL);
}

/* ----------------------------------------------------------------
 * Writing payments back into order rows
 * ----------------------------------------------------------------
 */

/* A prepared write-back statement of one linked table and set of columns. */
typedef struct SyncPlan
{
	char	   *key;			/* relid, column names and ref type */
	SPIPlanPtr	plan;
	struct SyncPlan *next;
} SyncPlan;

static SyncPlan *sync_plans = NULL;

/* A live column's name, or NULL (no such column, or dropped). */
static char *
live_attname(Oid relid, int attnum)
{
	HeapTuple	tuple;
	char	   *name = NULL;

	if (attnum <= 0)
		return NULL;
	tuple = SearchSysCache2(ATTNUM, ObjectIdGetDatum(relid), Int16GetDatum(attnum));
	if (HeapTupleIsValid(tuple))
	{
		Form_pg_attribute att = (Form_pg_attribute) GETSTRUCT(tuple);

		if (!att->attisdropped)
			name = pstrdup(NameStr(att->attname));
		ReleaseSysCache(tuple);
	}
	return name;
}

/*
 * The saved plan of "UPDATE table SET url = $1, status = $2 WHERE ref =
 * $3::type" (with only the columns given), built once per key.
 */
static SPIPlanPtr
sync_plan(Oid relid, const char *ref_column, const char *ref_type,
		  const char *url_column, const char *status_column)
{
	char	   *table = quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
													 get_rel_name(relid));
	char	   *key = psprintf("%u|%s|%s|%s|%s|%s", relid, table, ref_column, ref_type,
							   url_column ? url_column : "", status_column ? status_column : "");
	SyncPlan   *entry;
	StringInfoData sql;
	Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
	SPIPlanPtr	plan;

	for (entry = sync_plans; entry != NULL; entry = entry->next)
		if (strcmp(entry->key, key) == 0)
			return entry->plan;

	initStringInfo(&sql);
	appendStringInfo(&sql, "UPDATE %s SET ", table);
	if (url_column)
		appendStringInfo(&sql, "%s = $1", quote_identifier(url_column));
	if (status_column)
		appendStringInfo(&sql, "%s%s = $2", url_column ? ", " : "", quote_identifier(status_column));
	appendStringInfo(&sql, " WHERE %s = CAST($3 AS %s)", quote_identifier(ref_column), ref_type);

	plan = SPI_prepare(sql.data, 3, types);
	if (plan == NULL)
		elog(ERROR, "crmpay: SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	SPI_keepplan(plan);
	entry = MemoryContextAlloc(TopMemoryContext, sizeof(SyncPlan));
	entry->key = MemoryContextStrdup(TopMemoryContext, key);
	entry->plan = plan;
	entry->next = sync_plans;
	sync_plans = entry;
	return plan;
}

/* Whether a role may UPDATE a column (through the table or the column). */
static bool
may_write(Oid relid, int attnum, Oid role)
{
	return OidIsValid(role) &&
		(pg_class_aclcheck(relid, role, ACL_UPDATE) == ACLCHECK_OK ||
		 pg_attribute_aclcheck(relid, attnum, role, ACL_UPDATE) == ACLCHECK_OK);
}

/* A column of a trigger tuple as text, or NULL. */
static char *
column_text(HeapTuple tuple, TupleDesc desc, const char *column)
{
	return SPI_getvalue(tuple, desc, SPI_fnumber(desc, column));
}

/* Whether a column differs between the old and new row (NULL-aware). */
static bool
column_changed(TriggerData *trigdata, const char *column)
{
	TupleDesc	desc = trigdata->tg_relation->rd_att;
	char	   *old_value = column_text(trigdata->tg_trigtuple, desc, column);
	char	   *new_value = column_text(trigdata->tg_newtuple, desc, column);

	if (old_value == NULL || new_value == NULL)
		return (old_value == NULL) != (new_value == NULL);
	return strcmp(old_value, new_value) != 0;
}

/*
 * Runs the write-back in a subtransaction, as the role that linked the
 * table: the CRM table's own triggers, constraints and policies then run
 * with that role's rights, never with crmpay's (a superuser's).  A failure
 * there becomes a WARNING and an order_sync_failed alert rather than
 * failing the payment change (a webhook, the worker).
 */
static void
run_sync(SPIPlanPtr plan, Datum *values, const char *nulls, const char *account,
		 int64 payment_id, const char *order_ref, Oid relid, Oid linker)
{
	MemoryContext callercxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	Oid			save_userid;
	int			save_sec_context;

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(callercxt);
	PG_TRY();
	{
		int			rc;

		/* (an error restores the user when the subtransaction aborts) */
		SetUserIdAndSecContext(linker, save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
		rc = SPI_execute_plan(plan, values, nulls, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "crmpay: order write-back failed: %s", SPI_result_code_string(rc));
		SetUserIdAndSecContext(save_userid, save_sec_context);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(callercxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;
		Datum		alert[4];
		char	   *message;

		MemoryContextSwitchTo(callercxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(callercxt);
		CurrentResourceOwner = owner;

		message = psprintf("could not write the payment of order \"%s\" into %s: %s",
						   order_ref, get_rel_name(relid), edata->message);
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("crmpay %s", message),
				 errhint("The payment itself is recorded; fix the order table and the next payment change is written again.")));
		alert[0] = CStringGetTextDatum(account);
		alert[1] = Int64GetDatum(payment_id);
		alert[2] = CStringGetTextDatum(message);
		alert[3] = CStringGetTextDatum(unpack_sql_state(edata->sqlerrcode));
		if (SPI_execute_plan(orders_plan(PLAN_SYNC_ALERT), alert, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "crmpay: could not record the order_sync_failed alert");
	}
	PG_END_TRY();
}

/*
 * crmpay_sync_order_row
 *		Part of the payments trigger (crmpay._payment_changed, payments.c):
 *		for a payment whose order came from a linked table, writes its URL
 *		into the link's url_column and its status into status_column, in
 *		the rows whose order_ref column equals the payment's order_ref.
 *		Only what changed is written, and only where the role that linked
 *		the table may still write.
 */
void
crmpay_sync_order_row(TriggerData *trigdata)
{
	TupleDesc	desc;
	HeapTuple	row;
	bool		is_insert;
	bool		isnull;
	Oid			relid;
	Datum		values[3];
	char		nulls[3] = {' ', ' ', ' '};
	char	   *url;
	char	   *status;
	char	   *ref_column;
	char	   *url_column = NULL;
	char	   *status_column = NULL;
	Oid			ref_type;
	int32		ref_typmod;
	Oid			ref_collation;
	Oid			linker;
	int			ref_attnum;
	int			url_attnum;
	int			status_attnum;

	desc = trigdata->tg_relation->rd_att;
	is_insert = TRIGGER_FIRED_BY_INSERT(trigdata->tg_event);
	row = is_insert ? trigdata->tg_trigtuple : trigdata->tg_newtuple;
	relid = DatumGetObjectId(SPI_getbinval(row, desc, SPI_fnumber(desc, "order_table"), &isnull));
	if (isnull)
		return;
	/* an update that wrote the same status, URL and table changes nothing there */
	if (!is_insert && !column_changed(trigdata, "status") && !column_changed(trigdata, "url") &&
		!column_changed(trigdata, "order_table"))
		return;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "crmpay: SPI_connect failed");
	values[0] = ObjectIdGetDatum(relid);
	if (SPI_execute_plan(orders_plan(PLAN_FIND_LINK), values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "crmpay: order link lookup failed");
	if (SPI_processed == 0)
	{
		SPI_finish();			/* the table was unlinked */
		return;
	}
	ref_attnum = DatumGetInt16(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	url_attnum = DatumGetInt16(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	if (isnull)
		url_attnum = 0;
	status_attnum = DatumGetInt16(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull));
	if (isnull)
		status_attnum = 0;
	linker = get_role_oid(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4), true);

	url = column_text(row, desc, "url");
	status = column_text(row, desc, "status");
	ref_column = live_attname(relid, ref_attnum);
	if (url_attnum > 0 && url != NULL &&
		(is_insert || column_changed(trigdata, "url") || column_changed(trigdata, "order_table")) &&
		may_write(relid, url_attnum, linker))
		url_column = live_attname(relid, url_attnum);
	if (status_attnum > 0 &&
		(is_insert || column_changed(trigdata, "status") || column_changed(trigdata, "order_table")) &&
		may_write(relid, status_attnum, linker))
		status_column = live_attname(relid, status_attnum);

	if (ref_column != NULL && (url_column != NULL || status_column != NULL))
	{
		char	   *order_ref = column_text(row, desc, "order_ref");
		SPIPlanPtr	plan;

		get_atttypetypmodcoll(relid, ref_attnum, &ref_type, &ref_typmod, &ref_collation);
		plan = sync_plan(relid, ref_column, format_type_with_typemod(ref_type, ref_typmod),
						 url_column, status_column);
		values[0] = url ? CStringGetTextDatum(url) : (Datum) 0;
		nulls[0] = url ? ' ' : 'n';
		values[1] = CStringGetTextDatum(status);
		values[2] = CStringGetTextDatum(order_ref);
		run_sync(plan, values, nulls, column_text(row, desc, "account"),
				 DatumGetInt64(SPI_getbinval(row, desc, SPI_fnumber(desc, "id"), &isnull)),
				 order_ref, relid, linker);
	}
	SPI_finish();
}
