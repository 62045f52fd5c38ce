/*-------------------------------------------------------------------------
 *
 * intake_direct.c
 *	  The webhook intake's common case without the SQL executor.
 *
 *	  Most deliveries name their payment by its link and move it (a paid
 *	  checkout session, an approved order).  For those, the intake finds
 *	  and locks the payment by an index probe, and writes the move, its
 *	  payment_refs row and the event's row through the table access methods,
 *	  the way logical replication applies rows (ExecSimpleRelationUpdate and
 *	  ExecSimpleRelationInsert): NOT NULL, domains, unique indexes and row
 *	  triggers -- crmpay's own and the CRM's -- behave as with the SQL
 *	  statements, which cost twice as much per event, mostly in executor
 *	  start-up.
 *
 *	  The rows are written in the order the SQL statement writes them
 *	  (the event, then the payment, then its payment_refs row), so triggers
 *	  fire in the same order too.
 *
 *	  The direct path is taken only where it is exactly equivalent: READ
 *	  COMMITTED and read-write, heap tables with crmpay's columns, defaults
 *	  and indexes, no rules, no row-level security, no statement-level
 *	  triggers or transition tables, no triggers on payment_refs (written
 *	  with ON CONFLICT by the SQL), and crmpay.webhook_direct_path on (off:
 *	  for auditing through executor hooks, which see no direct write).
 *	  Anything else -- and every event that does not move its payment --
 *	  goes through the SQL statements of webhook.c.  Written against
 *	  PostgreSQL 15's executor (rte->updatedCols).
 *
 *-------------------------------------------------------------------------
 */
#include "intake.h"

#include "access/genam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "nodes/makefuncs.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/fmgrprotos.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

/* The tables the direct path writes, in range-table order. */
enum
{
	T_PAYMENTS,
	T_REFS,
	T_EVENTS,
	T_COUNT
};

static const char *const table_names[T_COUNT] = {"payments", "payment_refs", "events"};

/* Columns of crmpay.payments the direct path reads or sets */
enum
{
	P_ID, P_ACCOUNT, P_STATUS, P_AMOUNT, P_CURRENCY, P_GATEWAY_REF, P_PAYMENT_REF,
	P_REFUNDED, P_PAID_AT, P_UPDATED_AT, P_COUNT
};

/* The columns of crmpay.payment_refs (all of them) */
enum
{
	R_ACCOUNT, R_PAYMENT_REF, R_PAYMENT_ID, R_COUNT
};

/* The columns of crmpay.events (all of them) */
enum
{
	E_ID, E_ACCOUNT, E_PROVIDER, E_EVENT_KEY, E_EVENT_TYPE, E_PAYMENT_ID, E_OUTCOME,
	E_REASON, E_OLD_STATUS, E_NEW_STATUS, E_HTTP_STATUS, E_HEADERS, E_BODY,
	E_RECEIVED_AT, E_FOLLOW_UP, E_COUNT
};

typedef struct ColumnSpec
{
	const char *name;
	Oid			base_type;		/* the column's type, or its domain's base */
} ColumnSpec;

static const ColumnSpec payment_columns[P_COUNT] = {
	{"id", INT8OID}, {"account", TEXTOID}, {"status", TEXTOID}, {"amount_minor", INT8OID},
	{"currency", TEXTOID}, {"gateway_ref", TEXTOID}, {"gateway_payment_ref", TEXTOID},
	{"refunded_minor", INT8OID}, {"paid_at", TIMESTAMPTZOID}, {"updated_at", TIMESTAMPTZOID},
};
static const ColumnSpec ref_columns[R_COUNT] = {
	{"account", TEXTOID}, {"gateway_payment_ref", TEXTOID}, {"payment_id", INT8OID},
};
static const ColumnSpec event_columns[E_COUNT] = {
	{"id", INT8OID}, {"account", TEXTOID}, {"provider", TEXTOID}, {"event_key", TEXTOID},
	{"event_type", TEXTOID}, {"payment_id", INT8OID}, {"outcome", TEXTOID}, {"reason", TEXTOID},
	{"old_status", TEXTOID}, {"new_status", TEXTOID}, {"http_status", INT4OID},
	{"headers", JSONBOID}, {"body", TEXTOID}, {"received_at", TIMESTAMPTZOID},
	{"follow_up", TEXTOID},
};

/* A column as found in the table: its number and, for a domain, its checks. */
typedef struct Column
{
	AttrNumber	attnum;
	Oid			domain;			/* InvalidOid: not a domain */
	void	   *domain_check_cache; /* domain_check()'s, kept per backend */
} Column;

/*
 * What the direct path knows of the tables, per backend; read again after
 * a relcache invalidation of any of them (ALTER TABLE, CREATE INDEX, a new
 * trigger, DROP EXTENSION, also a VACUUM's statistics).  The invalidation
 * only marks it stale, and it is checked once the intake holds its
 * RowExclusiveLock on the tables (open_tables): an invalidation can arrive
 * in any relation open, even while an event is being written, but the
 * tables cannot change shape while that lock is held.  What can change
 * beside it -- an index being dropped CONCURRENTLY -- is checked at use.
 */
typedef struct IntakeTables
{
	bool		loaded;
	bool		stale;
	bool		usable;			/* the tables are as crmpay made them */
	Oid			relid[T_COUNT];
	Oid			by_link_index;	/* payments (account, gateway_ref) */
	Oid			applied_index;	/* events (account, event_key) WHERE applied */
	Oid			refs_index;		/* payment_refs primary key */
	Oid			event_id_sequence;
	Column		payment[P_COUNT];
	Column		ref[R_COUNT];
	Column		event[E_COUNT];
} IntakeTables;

static IntakeTables tables;
static MemoryContext tables_cxt = NULL;

static void
tables_invalidate(Datum arg, Oid relid)
{
	for (int i = 0; i < T_COUNT; i++)
		if (relid == InvalidOid || relid == tables.relid[i])
			tables.stale = true;
}

/* Looks the columns up; false when one is missing or of another type. */
static bool
load_columns(Relation rel, const ColumnSpec *specs, int count, Column *columns,
			 bool all_columns)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			live = 0;

	for (int i = 0; i < desc->natts; i++)
		if (!TupleDescAttr(desc, i)->attisdropped)
			live++;
	/* a table we write whole must not have columns we would leave NULL */
	if (all_columns && live != count)
		return false;
	for (int c = 0; c < count; c++)
	{
		columns[c].attnum = InvalidAttrNumber;
		for (int i = 0; i < desc->natts; i++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, i);

			if (!att->attisdropped && strcmp(NameStr(att->attname), specs[c].name) == 0)
			{
				if (getBaseType(att->atttypid) != specs[c].base_type)
					return false;
				columns[c].attnum = att->attnum;
				columns[c].domain = (get_typtype(att->atttypid) == TYPTYPE_DOMAIN)
					? att->atttypid : InvalidOid;
				columns[c].domain_check_cache = NULL;
			}
		}
		if (columns[c].attnum == InvalidAttrNumber)
			return false;
	}
	return true;
}

/*
 * Whether the index is the one crmpay created, as pg_get_indexdef prints it
 * under the intake's search_path (columns, uniqueness, predicate, operator
 * classes and collations all show there when they differ).
 */
static bool
index_is(Oid indexid, const char *definition)
{
	char	   *actual;

	if (!OidIsValid(indexid))
		return false;
	actual = TextDatumGetCString(DirectFunctionCall1(pg_get_indexdef, ObjectIdGetDatum(indexid)));
	return strcmp(actual, definition) == 0;
}

/* Whether a probe may use the index now (DROP INDEX CONCURRENTLY runs beside us). */
static bool
index_usable(Relation index)
{
	return index->rd_index->indisvalid && index->rd_index->indisready && index->rd_index->indislive;
}

/*
 * Whether the table's column defaults are the ones the direct path writes
 * itself: events.received_at = now() (transaction start) and no other.
 */
static bool
defaults_as_created(Relation rel, AttrNumber now_column)
{
	TupleConstr *constr = RelationGetDescr(rel)->constr;

	if (constr == NULL)
		return true;
	for (int i = 0; i < constr->num_defval; i++)
	{
		char	   *expression;

		if (constr->defval[i].adnum != now_column)
			return false;
		expression = TextDatumGetCString(DirectFunctionCall2(pg_get_expr,
															 CStringGetTextDatum(constr->defval[i].adbin),
															 ObjectIdGetDatum(RelationGetRelid(rel))));
		if (strcmp(expression, "now()") != 0)
			return false;
	}
	return true;
}

/* Fills tables (once per backend, again after an invalidation). */
static void
load_tables(void)
{
	Oid			schema = get_namespace_oid("crmpay", false);
	Relation	rels[T_COUNT];
	bool		usable = true;

	if (tables_cxt == NULL)
	{
		tables_cxt = AllocSetContextCreate(CacheMemoryContext, "crmpay intake direct path",
										   ALLOCSET_SMALL_SIZES);
		CacheRegisterRelcacheCallback(tables_invalidate, (Datum) 0);
	}
	/* the domains' prepared checks live there */
	MemoryContextReset(tables_cxt);
	memset(&tables, 0, sizeof(tables));
	for (int i = 0; i < T_COUNT; i++)
	{
		tables.relid[i] = get_relname_relid(table_names[i], schema);
		if (!OidIsValid(tables.relid[i]))
			elog(ERROR, "crmpay: table crmpay.%s is missing", table_names[i]);
		rels[i] = table_open(tables.relid[i], AccessShareLock);
	}
	usable = load_columns(rels[T_PAYMENTS], payment_columns, P_COUNT, tables.payment, false) &&
		load_columns(rels[T_REFS], ref_columns, R_COUNT, tables.ref, true) &&
		load_columns(rels[T_EVENTS], event_columns, E_COUNT, tables.event, true);
	if (usable)
	{
		tables.by_link_index = get_relname_relid("payments_gateway_ref", schema);
		tables.applied_index = get_relname_relid("events_applied_once", schema);
		tables.refs_index = get_relname_relid("payment_refs_pkey", schema);
		tables.event_id_sequence = getIdentitySequence(tables.relid[T_EVENTS],
													   tables.event[E_ID].attnum, true);
		usable = OidIsValid(tables.event_id_sequence) &&
			defaults_as_created(rels[T_EVENTS], tables.event[E_RECEIVED_AT].attnum) &&
			defaults_as_created(rels[T_REFS], InvalidAttrNumber) &&
			index_is(tables.by_link_index,
					 "CREATE INDEX payments_gateway_ref ON crmpay.payments USING btree "
					 "(account, gateway_ref) WHERE (gateway_ref IS NOT NULL)") &&
			index_is(tables.applied_index,
					 "CREATE UNIQUE INDEX events_applied_once ON crmpay.events USING btree "
					 "(account, event_key) WHERE ((outcome)::text = 'applied'::text)") &&
			index_is(tables.refs_index,
					 "CREATE UNIQUE INDEX payment_refs_pkey ON crmpay.payment_refs USING btree "
					 "(account, gateway_payment_ref)");
	}
	for (int i = 0; i < T_COUNT; i++)
		table_close(rels[i], AccessShareLock);
	tables.usable = usable;
	tables.loaded = true;
}

/*
 * Whether a statement on the table would do exactly what the direct path
 * does for a row: a plain heap table without rules, row-level security,
 * statement-level triggers or transition tables (or without any trigger).
 */
static bool
writes_like_sql(Relation rel, bool update, bool any_trigger)
{
	TriggerDesc *trig = rel->trigdesc;

	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->rd_rel->relispartition ||
		rel->rd_rel->relam != HEAP_TABLE_AM_OID ||
		rel->rd_rel->relrowsecurity || rel->rd_rules != NULL)
		return false;
	if (trig == NULL)
		return true;
	if (any_trigger)
		return false;
	if (update)
		return !(trig->trig_update_before_statement || trig->trig_update_after_statement ||
				 trig->trig_update_old_table || trig->trig_update_new_table);
	return !(trig->trig_insert_before_statement || trig->trig_insert_after_statement ||
			 trig->trig_insert_new_table);
}

/* A btree probe on (first, second) = (a, b) under the snapshot. */
static IndexScanDesc
probe(Relation heap, Relation index, Snapshot snapshot, const char *a, const char *b)
{
	ScanKeyData keys[2];
	IndexScanDesc scan;

	ScanKeyInit(&keys[0], 1, BTEqualStrategyNumber, F_TEXTEQ, CStringGetTextDatum(a));
	keys[0].sk_collation = index->rd_indcollation[0];
	ScanKeyInit(&keys[1], 2, BTEqualStrategyNumber, F_TEXTEQ, CStringGetTextDatum(b));
	keys[1].sk_collation = index->rd_indcollation[1];
	scan = index_beginscan(heap, index, snapshot, 2, 0);
	index_rescan(scan, keys, 2, NULL, 0);
	return scan;
}

/* The text of a column of a slot, or NULL. */
static char *
slot_text(TupleTableSlot *slot, AttrNumber attnum)
{
	bool		isnull;
	Datum		value = slot_getattr(slot, attnum, &isnull);

	return isnull ? NULL : TextDatumGetCString(value);
}

static int64
slot_int8(TupleTableSlot *slot, AttrNumber attnum)
{
	bool		isnull;
	Datum		value = slot_getattr(slot, attnum, &isnull);

	return isnull ? 0 : DatumGetInt64(value);
}

static void
close_tables(Relation *rels)
{
	for (int i = 0; i < T_COUNT; i++)
		table_close(rels[i], NoLock);
}

/*
 * Opens the three tables with the lock the statements would take (kept to
 * the end of the transaction) and checks what we know of them under it:
 * DDL committed while we waited is seen once the locks are held.  False
 * (nothing open) when the direct path does not apply.
 */
static bool
open_tables(Relation *rels)
{
	for (int attempt = 0;; attempt++)
	{
		if (!tables.loaded || tables.stale)
			load_tables();
		if (!tables.usable)
			return false;
		for (int i = 0; i < T_COUNT; i++)
			rels[i] = table_open(tables.relid[i], RowExclusiveLock);
		if (!tables.stale)
			break;
		close_tables(rels);
		if (attempt == 3)
			return false;
	}
	if (writes_like_sql(rels[T_PAYMENTS], true, false) &&
		writes_like_sql(rels[T_REFS], false, true) &&
		writes_like_sql(rels[T_EVENTS], false, false))
		return true;
	close_tables(rels);
	return false;
}

/*
 * The payment of the account with this link, locked FOR UPDATE in READ
 * COMMITTED: wait for a transaction changing it, then take its latest
 * version, as long as that still has the link.  LOOKUP_USE_SQL when the
 * row was deleted or changed by this transaction since (the statement
 * decides those).
 */
static IntakeLookup
find_and_lock(Relation payments, Relation by_link, Snapshot snapshot, const char *account,
			  const char *gateway_ref, TupleTableSlot *row)
{
	IndexScanDesc scan;
	TM_Result	result;
	TM_FailureData failure;
	bool		found;

	scan = probe(payments, by_link, snapshot, account, gateway_ref);
	found = index_getnext_slot(scan, ForwardScanDirection, row);
	index_endscan(scan);
	if (!found)
		return LOOKUP_NOT_FOUND;
	result = table_tuple_lock(payments, &row->tts_tid, snapshot, row,
							  GetCurrentCommandId(true), LockTupleExclusive, LockWaitBlock,
							  TUPLE_LOCK_FLAG_FIND_LAST_VERSION, &failure);
	if (result != TM_Ok)
		return LOOKUP_USE_SQL;
	if (failure.traversed)
	{
		char	   *now_account = slot_text(row, tables.payment[P_ACCOUNT].attnum);
		char	   *now_link = slot_text(row, tables.payment[P_GATEWAY_REF].attnum);

		if (now_account == NULL || now_link == NULL || strcmp(now_account, account) != 0 ||
			strcmp(now_link, gateway_ref) != 0)
			return LOOKUP_NOT_FOUND;
	}
	return LOOKUP_FOUND;
}

/* Whether the account has an applied event with this key. */
static bool
applied_already(Relation events, Relation applied_index, Snapshot snapshot, const char *account,
				const char *event_key)
{
	TupleTableSlot *event = table_slot_create(events, NULL);
	IndexScanDesc scan = probe(events, applied_index, snapshot, account, event_key);
	bool		applied = false;

	while (!applied && index_getnext_slot(scan, ForwardScanDirection, event))
	{
		char	   *outcome = slot_text(event, tables.event[E_OUTCOME].attnum);

		applied = outcome != NULL && strcmp(outcome, "applied") == 0;
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(event);
	return applied;
}

/*
 * crmpay_intake_find_by_link
 *		What PLAN_FIND_BY_LINK of webhook.c does -- the payment of the
 *		account with this link, locked FOR UPDATE in its latest version, and
 *		whether the event was applied already -- by two index probes.
 *		LOOKUP_USE_SQL when the direct path does not apply (then the
 *		caller runs the statement).
 */
IntakeLookup
crmpay_intake_find_by_link(const char *account, const char *gateway_ref,
						   const char *event_key, LockedPayment *locked)
{
	Relation	rels[T_COUNT];
	Relation	by_link;
	Relation	applied;
	Snapshot	snapshot;
	TupleTableSlot *row = NULL;
	IntakeLookup lookup = LOOKUP_USE_SQL;

	/*
	 * In REPEATABLE READ a changed row is a serialization failure, and a
	 * read-only transaction refuses the lock: SQL's rules and messages.
	 */
	if (!crmpay_webhook_direct_path || IsolationUsesXactSnapshot() || XactReadOnly ||
		!open_tables(rels))
		return LOOKUP_USE_SQL;

	/* see what this transaction wrote so far, as the next statement would */
	CommandCounterIncrement();
	snapshot = RegisterSnapshot(GetTransactionSnapshot());
	by_link = index_open(tables.by_link_index, AccessShareLock);
	applied = index_open(tables.applied_index, AccessShareLock);
	if (index_usable(by_link) && index_usable(applied))
	{
		row = table_slot_create(rels[T_PAYMENTS], NULL);
		lookup = find_and_lock(rels[T_PAYMENTS], by_link, snapshot, account, gateway_ref, row);
		if (lookup == LOOKUP_FOUND)
			locked->applied = applied_already(rels[T_EVENTS], applied, snapshot, account, event_key);
	}
	index_close(applied, NoLock);
	index_close(by_link, NoLock);
	UnregisterSnapshot(snapshot);
	close_tables(rels);
	if (lookup != LOOKUP_FOUND)
	{
		if (row != NULL)
			ExecDropSingleTupleTableSlot(row);
		return lookup;
	}

	locked->row = row;
	locked->id = slot_int8(row, tables.payment[P_ID].attnum);
	locked->status = slot_text(row, tables.payment[P_STATUS].attnum);
	locked->amount_minor = slot_int8(row, tables.payment[P_AMOUNT].attnum);
	locked->currency = slot_text(row, tables.payment[P_CURRENCY].attnum);
	locked->refunded_minor = slot_int8(row, tables.payment[P_REFUNDED].attnum);
	return LOOKUP_FOUND;
}

/* Frees what crmpay_intake_find_by_link kept (the row may still be locked). */
void
crmpay_intake_release(LockedPayment *locked)
{
	if (locked->row != NULL)
		ExecDropSingleTupleTableSlot(locked->row);
	locked->row = NULL;
}

/* Sets a column of a virtual slot, checking its domain like a cast would. */
static void
set_column(TupleTableSlot *slot, Column *column, Datum value, bool isnull)
{
	if (OidIsValid(column->domain))
		domain_check(value, isnull, column->domain, &column->domain_check_cache, tables_cxt);
	slot->tts_values[column->attnum - 1] = value;
	slot->tts_isnull[column->attnum - 1] = isnull;
}

static void
set_text(TupleTableSlot *slot, Column *column, const char *value)
{
	set_column(slot, column, value ? CStringGetTextDatum(value) : (Datum) 0, value == NULL);
}

/* A virtual slot of the table with every column NULL. */
static TupleTableSlot *
empty_row(EState *estate, Relation rel)
{
	TupleTableSlot *slot = table_slot_create(rel, &estate->es_tupleTable);

	ExecClearTuple(slot);
	for (int i = 0; i < slot->tts_tupleDescriptor->natts; i++)
	{
		slot->tts_values[i] = (Datum) 0;
		slot->tts_isnull[i] = true;
	}
	return slot;
}

/*
 * The payment_refs row of the payment's gateway payment id, as the SQL
 * statement's INSERT ... ON CONFLICT writes it: nothing when the mapping
 * is there, a new row when it is not, and the statement itself (through
 * payments.c) in the rare case of a mapping to another payment.  The probe
 * sees uncommitted rows and waits for their transactions, as ON CONFLICT
 * does, so a mapping being written elsewhere is never inserted twice.
 */
static void
keep_payment_ref(EState *estate, ResultRelInfo *refs, const char *account,
				 const char *payment_ref, int64 payment_id)
{
	Relation	index = index_open(tables.refs_index, AccessShareLock);
	TupleTableSlot *existing = table_slot_create(refs->ri_RelationDesc, &estate->es_tupleTable);
	SnapshotData dirty;
	IndexScanDesc scan;
	bool		found;
	int64		mapped_to = 0;

	if (!index_usable(index))
	{
		index_close(index, NoLock);
		crmpay_upsert_payment_ref(account, payment_ref, payment_id);
		return;
	}
	for (;;)
	{
		TransactionId in_progress = InvalidTransactionId;

		InitDirtySnapshot(dirty);
		scan = probe(refs->ri_RelationDesc, index, &dirty, account, payment_ref);
		found = index_getnext_slot(scan, ForwardScanDirection, existing);
		if (found)
		{
			in_progress = TransactionIdIsValid(dirty.xmin) ? dirty.xmin : dirty.xmax;
			mapped_to = slot_int8(existing, tables.ref[R_PAYMENT_ID].attnum);
		}
		index_endscan(scan);
		if (!TransactionIdIsValid(in_progress))
			break;
		XactLockTableWait(in_progress, NULL, NULL, XLTW_None);
	}
	index_close(index, NoLock);

	if (!found)
	{
		TupleTableSlot *row = empty_row(estate, refs->ri_RelationDesc);

		set_text(row, &tables.ref[R_ACCOUNT], account);
		set_text(row, &tables.ref[R_PAYMENT_REF], payment_ref);
		set_column(row, &tables.ref[R_PAYMENT_ID], Int64GetDatum(payment_id), false);
		ExecStoreVirtualTuple(row);
		ExecSimpleRelationInsert(refs, estate, row);
	}
	else if (mapped_to != payment_id)
		crmpay_upsert_payment_ref(account, payment_ref, payment_id);
}

/* The event's row, as the SQL INSERT writes it (id and received_at by their defaults). */
static void
insert_event(EState *estate, ResultRelInfo *events, const EventRow *event, TimestampTz now)
{
	TupleTableSlot *row = empty_row(estate, events->ri_RelationDesc);

	set_column(row, &tables.event[E_ID],
			   Int64GetDatum(nextval_internal(tables.event_id_sequence, false)), false);
	set_text(row, &tables.event[E_ACCOUNT], event->account);
	set_text(row, &tables.event[E_PROVIDER], event->provider);
	set_text(row, &tables.event[E_EVENT_KEY], event->event_key);
	set_text(row, &tables.event[E_EVENT_TYPE], event->event_type);
	set_column(row, &tables.event[E_PAYMENT_ID], Int64GetDatum(event->payment_id),
			   event->payment_id <= 0);
	set_text(row, &tables.event[E_OUTCOME], event->outcome);
	set_text(row, &tables.event[E_REASON], event->reason);
	set_text(row, &tables.event[E_OLD_STATUS], event->old_status);
	set_text(row, &tables.event[E_NEW_STATUS], event->new_status);
	set_column(row, &tables.event[E_HTTP_STATUS], Int32GetDatum(event->http_status), false);
	set_column(row, &tables.event[E_HEADERS], event->headers, event->headers_null);
	set_column(row, &tables.event[E_BODY], PointerGetDatum(event->body), event->body == NULL);
	set_column(row, &tables.event[E_RECEIVED_AT], TimestampTzGetDatum(now), false);
	set_text(row, &tables.event[E_FOLLOW_UP], event->follow_up);
	ExecStoreVirtualTuple(row);
	ExecSimpleRelationInsert(events, estate, row);
}

/*
 * crmpay_intake_write_move
 *		What PLAN_MOVE_AND_INSERT_EVENT of webhook.c does for a payment found
 *		by crmpay_intake_find_by_link: the event's row, the state machine's
 *		UPDATE (CRMPAY_PAYMENT_MOVE_SQL) and the payment_refs row of a
 *		gateway payment id the event brings, with their row triggers.  False
 *		(nothing written, the row released) when this transaction changed
 *		the payment since it was found: the statement then writes.
 */
bool
crmpay_intake_write_move(LockedPayment *locked, const PaymentMove *move, const EventRow *event)
{
	EState	   *estate;
	ResultRelInfo *result_rels[T_COUNT];
	EPQState	epqstate;
	List	   *range_table = NIL;
	TupleTableSlot *old_row = locked->row;
	TupleTableSlot *new_row;
	Bitmapset  *updated = NULL;
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	char	   *payment_ref;
	bool		isnull;
	bool		moved;
	bool		current;
	Relation	payments;
	MemoryContext callercxt;

	/* as the statement would: see this transaction's writes so far */
	CommandCounterIncrement();
	PushActiveSnapshot(GetTransactionSnapshot());
	payments = table_open(tables.relid[T_PAYMENTS], NoLock);	/* locked by the find */
	current = table_tuple_satisfies_snapshot(payments, old_row, GetActiveSnapshot());
	table_close(payments, NoLock);
	if (!current)
	{
		PopActiveSnapshot();
		crmpay_intake_release(locked);
		return false;
	}

	estate = CreateExecutorState();
	callercxt = MemoryContextSwitchTo(estate->es_query_cxt);

	/* the columns the UPDATE sets, for UPDATE OF triggers */
	for (int c = 0; c < P_COUNT; c++)
		if (c == P_STATUS || c == P_PAYMENT_REF || c == P_REFUNDED || c == P_PAID_AT || c == P_UPDATED_AT)
			updated = bms_add_member(updated, tables.payment[c].attnum - FirstLowInvalidHeapAttributeNumber);
	for (int i = 0; i < T_COUNT; i++)
	{
		RangeTblEntry *rte = makeNode(RangeTblEntry);

		rte->rtekind = RTE_RELATION;
		rte->relid = tables.relid[i];
		rte->relkind = RELKIND_RELATION;
		rte->rellockmode = RowExclusiveLock;
		rte->requiredPerms = (i == T_PAYMENTS) ? ACL_UPDATE : ACL_INSERT;
		if (i == T_PAYMENTS)
			rte->updatedCols = updated;
		range_table = lappend(range_table, rte);
	}
	ExecInitRangeTable(estate, range_table);
	estate->es_output_cid = GetCurrentCommandId(true);
	estate->es_snapshot = GetActiveSnapshot();
	for (int i = 0; i < T_COUNT; i++)
	{
		result_rels[i] = makeNode(ResultRelInfo);
		ExecInitResultRelation(estate, result_rels[i], i + 1);
		ExecOpenIndices(result_rels[i], false);
	}
	EvalPlanQualInit(&epqstate, estate, NULL, NIL, -1);
	AfterTriggerBeginQuery();

	/* the move: every column as it is, but those CRMPAY_PAYMENT_MOVE_SQL sets */
	new_row = table_slot_create(result_rels[T_PAYMENTS]->ri_RelationDesc, &estate->es_tupleTable);
	slot_getallattrs(old_row);
	ExecClearTuple(new_row);
	memcpy(new_row->tts_values, old_row->tts_values, sizeof(Datum) * old_row->tts_tupleDescriptor->natts);
	memcpy(new_row->tts_isnull, old_row->tts_isnull, sizeof(bool) * old_row->tts_tupleDescriptor->natts);
	set_text(new_row, &tables.payment[P_STATUS], move->new_status);
	payment_ref = slot_text(old_row, tables.payment[P_PAYMENT_REF].attnum);
	if (payment_ref == NULL && move->gateway_payment_ref != NULL)
		set_text(new_row, &tables.payment[P_PAYMENT_REF], move->gateway_payment_ref);
	set_column(new_row, &tables.payment[P_REFUNDED],
			   Int64GetDatum(Max(locked->refunded_minor, Max(move->refunded_minor, 0))), false);
	if (strcmp(move->new_status, "paid") == 0)
	{
		slot_getattr(old_row, tables.payment[P_PAID_AT].attnum, &isnull);
		if (isnull)
			set_column(new_row, &tables.payment[P_PAID_AT], TimestampTzGetDatum(now), false);
	}
	set_column(new_row, &tables.payment[P_UPDATED_AT], TimestampTzGetDatum(now), false);
	ExecStoreVirtualTuple(new_row);
	ItemPointerSetInvalid(&new_row->tts_tid);

	/* the trigger leaves payment_refs to us for this payment */
	crmpay_statement_keeps_payment_ref(locked->id);
	PG_TRY();
	{
		/* in the SQL statement's order: the event, then its CTEs */
		insert_event(estate, result_rels[T_EVENTS], event, now);
		ExecSimpleRelationUpdate(result_rels[T_PAYMENTS], estate, &epqstate, old_row, new_row);

		/*
		 * As the SQL: the mapping of the payment's ref once the event brings
		 * one, and only if the UPDATE happened (a BEFORE trigger may skip
		 * it; the row then keeps its tid, or none was stored).
		 */
		moved = ItemPointerIsValid(&new_row->tts_tid) &&
			!ItemPointerEquals(&new_row->tts_tid, &old_row->tts_tid);
		payment_ref = moved ? slot_text(new_row, tables.payment[P_PAYMENT_REF].attnum) : NULL;
		if (payment_ref != NULL && move->gateway_payment_ref != NULL)
			keep_payment_ref(estate, result_rels[T_REFS], event->account, payment_ref, locked->id);

		/* the AFTER row triggers: NOTIFY, the CRM's order row, the CRM's own */
		AfterTriggerEndQuery(estate);
	}
	PG_FINALLY();
	{
		crmpay_statement_keeps_payment_ref(0);
	}
	PG_END_TRY();

	EvalPlanQualEnd(&epqstate);
	ExecCloseResultRelations(estate);
	ExecCloseRangeTableRelations(estate);
	ExecResetTupleTable(estate->es_tupleTable, false);
	PopActiveSnapshot();
	MemoryContextSwitchTo(callercxt);
	FreeExecutorState(estate);
	crmpay_intake_release(locked);
	/* the next statement of this transaction sees these rows */
	CommandCounterIncrement();
	ereport(DEBUG1,
			(errmsg_internal("crmpay: event \"%s\" applied by the direct path", event->event_key)));
	return true;
}
