/*-------------------------------------------------------------------------
 *
 * reconcile.c
 *	  Reconciliation, the C half: fetching what the gateway recorded for a
 *	  window, page by page through the provider's list or order-query
 *	  operations (provider.h), and importing report files (reports.c), into
 *	  crmpay.gateway_records; live progress in shared memory; the
 *	  step-by-step runner that commits between gateway calls (CALL
 *	  crmpay.reconcile_in_steps, and the background worker).  Matching is
 *	  set-based (one hash table over both sides, reconcile_match.c, and SQL
 *	  for the few orders it flags) and healing SQL
 *	  (extension/sql/80_reconcile.sql).
 *
 *	  Three ways to run the same driver:
 *	  - crmpay.reconcile(): everything in the caller's transaction
 *		(crmpay._reconcile_fetch below); a failure rolls the run's work back
 *		and the PL/pgSQL wrapper records the failed run.
 *	  - CALL crmpay.reconcile_in_steps(): commits after each page, so no
 *		transaction and no snapshot is held while a gateway answers, and the
 *		run row shows its progress as it goes.
 *	  - crmpay_reconcile_run_due_in_worker(): the same steps with the
 *		transactions a background worker starts and commits itself.
 *
 *	  Gateway failures are values (CrmpayGatewayFailure), never an ERROR in
 *	  the middle of a step; any ERROR inside a step of a step-by-step run is
 *	  caught by a subtransaction, so the run is always left succeeded or
 *	  failed with its reason, with nothing half-healed (matching, healing
 *	  and finishing are one final step).
 *
 *-------------------------------------------------------------------------
 */
#include "reconcile.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "tcop/tcopprot.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "codec.h"

/* ----------------------------------------------------------------
 * Settings
 * ----------------------------------------------------------------
 */
static int	reconcile_check_interval_ms = 60000;
static int	reconcile_page_size = 100;
static int	reconcile_margin_s = 900;
static int	reconcile_work_mem_kb = 256 * 1024;
static int	reconcile_max_pages = 100000;
static int	reconcile_keep_records_s = 14 * 24 * 3600;
static int	report_max_bytes = 256 * 1024 * 1024;

void
crmpay_reconcile_define_gucs(void)
{
	DefineCustomIntVariable("crmpay.reconcile_check_interval",
							gettext_noop("How often the background worker looks for due reconciliation schedules."),
							NULL, &reconcile_check_interval_ms, 60000, 100, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("crmpay.reconcile_page_size",
							gettext_noop("Records per page asked of a gateway's list API during reconciliation."),
							NULL, &reconcile_page_size, 100, 1, 1000,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("crmpay.reconcile_margin",
							gettext_noop("How much earlier and later than the window reconciliation lists gateway records."),
							gettext_noop("Covers clock differences and links created just before the window; "
										 "only records inside the window proper are reported."),
							&reconcile_margin_s, 900, 0, 7 * 24 * 3600,
							PGC_USERSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("crmpay.reconcile_work_mem",
							gettext_noop("work_mem for the set-based matching of a reconciliation run."),
							gettext_noop("Its hash table of the window's orders may use hash_mem_multiplier times this, "
										 "as a hash join would; a window whose orders do not fit is matched in "
										 "several passes over the data."),
							&reconcile_work_mem_kb, 256 * 1024, 64, MAX_KILOBYTES,
							PGC_USERSET, GUC_UNIT_KB, NULL, NULL, NULL);
	DefineCustomIntVariable("crmpay.reconcile_max_pages",
							gettext_noop("Most gateway requests one reconciliation run makes."),
							NULL, &reconcile_max_pages, 100000, 1, INT_MAX,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("crmpay.reconcile_keep_records",
							gettext_noop("How long run_due_reconciliations keeps the gateway records a run fetched."),
							gettext_noop("Runs and their discrepancies are kept; imported reports too."),
							&reconcile_keep_records_s, 14 * 24 * 3600, 0, INT_MAX,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("crmpay.report_max_bytes",
							gettext_noop("Largest report crmpay.fetch_report downloads."),
							NULL, &report_max_bytes, 256 * 1024 * 1024, 1024, 1024 * 1024 * 1024 - 1024,
							PGC_SUSET, GUC_UNIT_BYTE, NULL, NULL, NULL);
}

/* ----------------------------------------------------------------
 * Live progress: one slot per backend in shared memory (when preloaded),
 * like pg_stat_progress_*.  Only its backend writes a slot; readers take
 * its spinlock to copy it.
 * ----------------------------------------------------------------
 */
typedef struct ProgressSlot
{
	slock_t		mutex;
	int			pid;			/* 0 = free */
	int64		run_id;
	char		account[64];
	char		phase[16];
	int32		pages;
	int64		loaded;
	int64		matched;
	int64		discrepancies;
	int64		healed;
	TimestampTz started;
	TimestampTz updated;
} ProgressSlot;

static ProgressSlot *progress_slots = NULL;
static int	progress_nslots = 0;
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static bool progress_exit_registered = false;

/* This backend's current run, also without shared memory. */
static struct
{
	int64		run_id;
	char		account[64];
	char		phase[16];
	int32		pages;
	int64		loaded;
	int64		matched;
	int64		discrepancies;
	int64		healed;
	TimestampTz started;
} local_progress;

static Size
progress_size(void)
{
	return mul_size(sizeof(ProgressSlot), MaxBackends);
}

static void
progress_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(progress_size());
}

static void
progress_shmem_startup(void)
{
	bool		found;
	int			i;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	progress_slots = ShmemInitStruct("crmpay reconciliation progress", progress_size(), &found);
	progress_nslots = MaxBackends;
	if (!found)
	{
		memset(progress_slots, 0, progress_size());
		for (i = 0; i < progress_nslots; i++)
			SpinLockInit(&progress_slots[i].mutex);
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Called from _PG_init while preloading: reserve the progress slots. */
void
crmpay_reconcile_shmem_request(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = progress_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = progress_shmem_startup;
}

static ProgressSlot *
my_slot(void)
{
	if (progress_slots == NULL || MyBackendId < 1 || MyBackendId > progress_nslots)
		return NULL;
	return &progress_slots[MyBackendId - 1];
}

/* Copies local_progress into this backend's slot (or frees it). */
static void
progress_publish(bool clear)
{
	ProgressSlot *slot = my_slot();

	if (slot == NULL)
		return;
	SpinLockAcquire(&slot->mutex);
	if (clear)
		slot->pid = 0;
	else
	{
		slot->pid = MyProcPid;
		slot->run_id = local_progress.run_id;
		strlcpy(slot->account, local_progress.account, sizeof(slot->account));
		strlcpy(slot->phase, local_progress.phase, sizeof(slot->phase));
		slot->pages = local_progress.pages;
		slot->loaded = local_progress.loaded;
		slot->matched = local_progress.matched;
		slot->discrepancies = local_progress.discrepancies;
		slot->healed = local_progress.healed;
		slot->started = local_progress.started;
		slot->updated = GetCurrentTimestamp();
	}
	SpinLockRelease(&slot->mutex);
}

static void
progress_on_exit(int code, Datum arg)
{
	progress_publish(true);
}

/* Starts reporting a run (account is known to the caller). */
static void
progress_start(int64 run_id, const char *account)
{
	memset(&local_progress, 0, sizeof(local_progress));
	local_progress.run_id = run_id;
	strlcpy(local_progress.account, account, sizeof(local_progress.account));
	strlcpy(local_progress.phase, "starting", sizeof(local_progress.phase));
	local_progress.started = GetCurrentTimestamp();
	if (!progress_exit_registered && my_slot() != NULL)
	{
		before_shmem_exit(progress_on_exit, (Datum) 0);
		progress_exit_registered = true;
	}
	progress_publish(false);
}

static void
progress_phase(const char *phase)
{
	strlcpy(local_progress.phase, phase, sizeof(local_progress.phase));
	progress_publish(false);
}

/* ----------------------------------------------------------------
 * Small SPI helpers
 * ----------------------------------------------------------------
 */
/* ----------------------------------------------------------------
 * Staging gateway records: one INSERT per batch, columns as arrays
 * ----------------------------------------------------------------
 */
#define STAGE_COLUMNS 17

static Datum
build_array(Datum *elems, bool *nulls, int n, Oid type)
{
	int			dims[1] = {n};
	int			lbs[1] = {1};
	int16		typlen;
	bool		typbyval;
	char		typalign;

	get_typlenbyvalalign(type, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs, type,
											  typlen, typbyval, typalign));
}

/*
 * stage_records
 *		Inserts records (an array of n pointers) as gateway records of a run
 *		(run_id > 0) or an import (import_id > 0; a record_ref imported
 *		before is skipped).  Returns how many rows were inserted.  The
 *		caller is connected to SPI.
 */
static uint64
stage_records(int64 run_id, int64 import_id, const char *account,
			  CrmpayGatewayRecord **records, int n)
{
	static SPIPlanPtr plans[2];
	static const char *const sql[2] = {
		"INSERT INTO crmpay.gateway_records (run_id, import_id, account, line_no, record_type, record_ref,"
		" match_key, order_ref, gateway_ref, gateway_payment_ref, status, gateway_status, amount_minor,"
		" currency, refunded_minor, fin_currency, fin_amount_minor, fee_minor, net_minor, occurred_at)"
		" SELECT $1, $2, $3, u.* FROM unnest($4::int4[], $5::text[], $6::text[], $7::text[], $8::text[],"
		" $9::text[], $10::text[], $11::text[], $12::text[], $13::int8[], $14::text[], $15::int8[],"
		" $16::text[], $17::int8[], $18::int8[], $19::int8[], $20::timestamptz[]) u",
		"INSERT INTO crmpay.gateway_records (run_id, import_id, account, line_no, record_type, record_ref,"
		" match_key, order_ref, gateway_ref, gateway_payment_ref, status, gateway_status, amount_minor,"
		" currency, refunded_minor, fin_currency, fin_amount_minor, fee_minor, net_minor, occurred_at)"
		" SELECT $1, $2, $3, u.* FROM unnest($4::int4[], $5::text[], $6::text[], $7::text[], $8::text[],"
		" $9::text[], $10::text[], $11::text[], $12::text[], $13::int8[], $14::text[], $15::int8[],"
		" $16::text[], $17::int8[], $18::int8[], $19::int8[], $20::timestamptz[]) u"
		" ON CONFLICT (account, record_ref) WHERE import_id IS NOT NULL DO NOTHING"
	};
	static const Oid coltypes[STAGE_COLUMNS] = {
		INT4OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
		INT8OID, TEXTOID, INT8OID, TEXTOID, INT8OID, INT8OID, INT8OID, TIMESTAMPTZOID
	};
	Oid			argtypes[3 + STAGE_COLUMNS];
	Datum		values[3 + STAGE_COLUMNS];
	char		nulls[3 + STAGE_COLUMNS];
	Datum	   *elems[STAGE_COLUMNS];
	bool	   *elem_nulls[STAGE_COLUMNS];
	int			which = import_id > 0 ? 1 : 0;
	int			c;
	int			i;

	if (n == 0)
		return 0;
	argtypes[0] = INT8OID;
	argtypes[1] = INT8OID;
	argtypes[2] = TEXTOID;
	for (c = 0; c < STAGE_COLUMNS; c++)
	{
		argtypes[3 + c] = coltypes[c] == INT4OID ? INT4ARRAYOID
			: coltypes[c] == INT8OID ? INT8ARRAYOID
			: coltypes[c] == TIMESTAMPTZOID ? TIMESTAMPTZARRAYOID : TEXTARRAYOID;
		elems[c] = palloc(sizeof(Datum) * n);
		elem_nulls[c] = palloc(sizeof(bool) * n);
	}
	for (i = 0; i < n; i++)
	{
		CrmpayGatewayRecord *r = records[i];
		const char *texts[STAGE_COLUMNS] = {
			NULL, r->record_type, r->record_ref, r->match_key, r->order_ref, r->gateway_ref,
			r->gateway_payment_ref, r->status, r->gateway_status, NULL, r->currency, NULL,
			r->fin_currency, NULL, NULL, NULL, NULL
		};
		int64		ints[STAGE_COLUMNS] = {
			0, 0, 0, 0, 0, 0, 0, 0, 0, r->amount_minor, 0, r->refunded_minor, 0,
			r->fin_amount_minor, r->fee_minor, r->net_minor, 0
		};

		for (c = 0; c < STAGE_COLUMNS; c++)
		{
			bool		null;
			Datum		d = (Datum) 0;

			switch (coltypes[c])
			{
				case INT4OID:
					null = r->line_no <= 0;
					d = Int32GetDatum(r->line_no);
					break;
				case INT8OID:
					null = ints[c] == CRMPAY_NO_AMOUNT;
					d = Int64GetDatum(ints[c]);
					break;
				case TIMESTAMPTZOID:
					null = r->occurred_at == 0;
					d = TimestampTzGetDatum(r->occurred_at);
					break;
				default:
					null = texts[c] == NULL;
					if (!null)
						d = CStringGetTextDatum(texts[c]);
					break;
			}
			elems[c][i] = d;
			elem_nulls[c][i] = null;
		}
	}
	values[0] = Int64GetDatum(run_id);
	nulls[0] = run_id > 0 ? ' ' : 'n';
	values[1] = Int64GetDatum(import_id);
	nulls[1] = import_id > 0 ? ' ' : 'n';
	values[2] = CStringGetTextDatum(account);
	nulls[2] = ' ';
	for (c = 0; c < STAGE_COLUMNS; c++)
	{
		values[3 + c] = build_array(elems[c], elem_nulls[c], n, coltypes[c]);
		nulls[3 + c] = ' ';
	}
	crmpay_spi_run(crmpay_saved_plan(&plans[which], sql[which], 3 + STAGE_COLUMNS, argtypes),
				   values, nulls, false, 0,
				   SPI_OK_INSERT, "staging gateway records");
	return SPI_processed;
}

/* ----------------------------------------------------------------
 * Runs
 * ----------------------------------------------------------------
 */
typedef struct RunInfo
{
	int64		id;
	char	   *account;
	TimestampTz window_start;
	TimestampTz window_end;
	int64		margin_us;
	char	   *match_on;
	bool		src_list;
	bool		src_orders;
	char	   *fetch_state;	/* JSON, NULL = not started */
	char	   *status;
} RunInfo;

/* Reads the run row into *run (strings in the current memory context). */
static void
load_run(int64 run_id, RunInfo *run)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {INT8OID};
	Datum		values[1];
	HeapTuple	tuple;
	TupleDesc	desc;
	bool		isnull;
	int			rc;
	MemoryContext callercxt = CurrentMemoryContext;

	values[0] = Int64GetDatum(run_id);
	rc = SPI_execute_plan(crmpay_saved_plan(&plan,
										"SELECT account, window_start, window_end,"
										"       (extract(epoch FROM margin) * 1000000)::int8,"
										"       match_on, 'list' = ANY (sources), 'orders' = ANY (sources),"
										"       fetch_state::text, status"
										"  FROM crmpay.reconciliation_runs WHERE id = $1",
										1, types),
						  values, NULL, false, 1);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("reconciliation run " INT64_FORMAT " does not exist", run_id)));
	tuple = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	run->id = run_id;
	run->account = MemoryContextStrdup(callercxt, SPI_getvalue(tuple, desc, 1));
	run->window_start = DatumGetTimestampTz(SPI_getbinval(tuple, desc, 2, &isnull));
	run->window_end = DatumGetTimestampTz(SPI_getbinval(tuple, desc, 3, &isnull));
	run->margin_us = DatumGetInt64(SPI_getbinval(tuple, desc, 4, &isnull));
	run->match_on = MemoryContextStrdup(callercxt, SPI_getvalue(tuple, desc, 5));
	run->src_list = DatumGetBool(SPI_getbinval(tuple, desc, 6, &isnull));
	run->src_orders = DatumGetBool(SPI_getbinval(tuple, desc, 7, &isnull));
	run->fetch_state = SPI_getvalue(tuple, desc, 8);
	if (run->fetch_state)
		run->fetch_state = MemoryContextStrdup(callercxt, run->fetch_state);
	run->status = MemoryContextStrdup(callercxt, SPI_getvalue(tuple, desc, 9));
}

/* ----------------------------------------------------------------
 * The fetch driver: a small state machine the three runners share
 * ----------------------------------------------------------------
 */
enum
{
	PHASE_LIST,
	PHASE_ORDERS,
	PHASE_DONE
};

typedef struct DriverState
{
	int			phase;
	CrmpayFetchState list;
	int64		after_payment;	/* orders: last payment asked about */
	int32		pages;
	int64		loaded;
} DriverState;

static void
driver_init(const RunInfo *run, DriverState *st)
{
	memset(st, 0, sizeof(*st));
	st->phase = run->src_list ? PHASE_LIST : run->src_orders ? PHASE_ORDERS : PHASE_DONE;
	st->list.since = run->window_start - run->margin_us;
	st->list.until = run->window_end + run->margin_us;
	st->list.page_size = reconcile_page_size;
}

/* The state as JSON: the run row shows where a step-by-step run is. */
static char *
driver_state_json(const DriverState *st)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfo(&buf, "{\"phase\": %d, \"stream\": %d, \"done\": %s, \"page_size\": %d, \"cursor\": ",
					 st->phase, st->list.stream, st->list.done ? "true" : "false", st->list.page_size);
	if (st->list.cursor)
		escape_json(&buf, st->list.cursor);
	else
		appendStringInfoString(&buf, "null");
	appendStringInfo(&buf, ", \"after_payment\": " INT64_FORMAT ", \"pages\": %d, \"loaded\": " INT64_FORMAT "}",
					 st->after_payment, st->pages, st->loaded);
	return buf.data;
}

/*
 * next_order
 *		The next CRM payment of the window to ask the gateway about: still
 *		pending in the CRM, or one no other source reported.  NULL when
 *		there is none left.
 */
static CrmpayOrderQuery *
next_order(const RunInfo *run, int64 after_payment)
{
	static SPIPlanPtr plans[3];
	static const char *const sql[3] = {
#define NEXT_ORDER_SQL(col) \
		"SELECT p.id, p.order_ref, p.gateway_ref, p.gateway_payment_ref, p.amount_minor, p.currency, p.status" \
		"  FROM crmpay.payments p" \
		" WHERE p.account = $1 AND p.created_at >= $2 AND p.created_at < $3 AND p.id > $4" \
		"   AND (p.status IN ('link_pending', 'open', 'processing')" \
		"        OR (NOT EXISTS (SELECT FROM crmpay.gateway_records g" \
		"                         WHERE g.run_id = $5 AND g.match_key = p." col ")" \
		"            AND NOT EXISTS (SELECT FROM crmpay.gateway_records g" \
		"                             WHERE g.import_id IS NOT NULL AND g.account = $1" \
		"                               AND g.match_key = p." col ")))" \
		" ORDER BY p.id LIMIT 1"
		NEXT_ORDER_SQL("order_ref"),
		NEXT_ORDER_SQL("gateway_ref"),
		NEXT_ORDER_SQL("gateway_payment_ref")
#undef NEXT_ORDER_SQL
	};
	Oid			types[5] = {TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, INT8OID, INT8OID};
	Datum		values[5];
	int			which = strcmp(run->match_on, "order_ref") == 0 ? 0
		: strcmp(run->match_on, "gateway_ref") == 0 ? 1 : 2;
	HeapTuple	tuple;
	TupleDesc	desc;
	bool		isnull;
	CrmpayOrderQuery *q;
	MemoryContext callercxt = CurrentMemoryContext;

	values[0] = CStringGetTextDatum(run->account);
	values[1] = TimestampTzGetDatum(run->window_start);
	values[2] = TimestampTzGetDatum(run->window_end);
	values[3] = Int64GetDatum(after_payment);
	values[4] = Int64GetDatum(run->id);
	crmpay_spi_run(crmpay_saved_plan(&plans[which], sql[which], 5, types), values, NULL, true, 1,
				   SPI_OK_SELECT, "listing payments to query");
	if (SPI_processed == 0)
		return NULL;
	tuple = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	q = MemoryContextAllocZero(callercxt, sizeof(CrmpayOrderQuery));
	q->payment_id = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
	q->order_ref = MemoryContextStrdup(callercxt, SPI_getvalue(tuple, desc, 2));
	q->gateway_ref = SPI_getvalue(tuple, desc, 3) ? MemoryContextStrdup(callercxt, SPI_getvalue(tuple, desc, 3)) : NULL;
	q->gateway_payment_ref = SPI_getvalue(tuple, desc, 4)
		? MemoryContextStrdup(callercxt, SPI_getvalue(tuple, desc, 4)) : NULL;
	q->amount_minor = DatumGetInt64(SPI_getbinval(tuple, desc, 5, &isnull));
	q->currency = MemoryContextStrdup(callercxt, SPI_getvalue(tuple, desc, 6));
	q->status = MemoryContextStrdup(callercxt, SPI_getvalue(tuple, desc, 7));
	return q;
}

/* One gateway request of the driver, with what it is about. */
typedef struct DriverRequest
{
	CrmpayHttpRequest http;
	CrmpayOrderQuery *order;	/* orders phase */
	char	   *what;			/* for messages: "page 3 (list 1)" */
} DriverRequest;

/*
 * driver_prepare
 *		Builds the next request into *req; false when nothing is left.
 *		Needs a transaction (the account; the payments to query).
 */
static bool
driver_prepare(const RunInfo *run, const CrmpayAccount *account, DriverState *st,
			   DriverRequest *req)
{
	const CrmpayProvider *provider = account->provider;

	memset(req, 0, sizeof(*req));
	for (;;)
	{
		if (st->pages >= reconcile_max_pages)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("reconciliation run " INT64_FORMAT " reached crmpay.reconcile_max_pages (%d)",
							run->id, reconcile_max_pages),
					 errhint("Reconcile a shorter window, or raise crmpay.reconcile_max_pages.")));
		if (st->phase == PHASE_LIST)
		{
			if (st->list.done || provider->build_list_records == NULL)
			{
				st->phase = run->src_orders ? PHASE_ORDERS : PHASE_DONE;
				continue;
			}
			provider->build_list_records(account, &st->list, &req->http);
			req->what = psprintf("page %d (list %d%s%s)", st->pages + 1, st->list.stream,
								 st->list.cursor ? ", after " : "", st->list.cursor ? st->list.cursor : "");
			return true;
		}
		if (st->phase == PHASE_ORDERS)
		{
			if (provider->build_query_order == NULL ||
				(req->order = next_order(run, st->after_payment)) == NULL)
			{
				st->phase = PHASE_DONE;
				continue;
			}
			if (!provider->build_query_order(account, req->order, &req->http))
			{
				/* nothing to ask about this one (no gateway reference yet) */
				st->after_payment = req->order->payment_id;
				memset(&req->http, 0, sizeof(req->http));
				continue;
			}
			req->what = psprintf("page %d (order %s)", st->pages + 1, req->order->order_ref);
			return true;
		}
		return false;
	}
}

/*
 * Wipes the credentials out of the request's headers once it is sent
 * (providers build them with crmpay_header_line or psprintf: writable).
 */
static void
wipe_request(DriverRequest *req)
{
	ListCell   *lc;

	foreach(lc, req->http.headers)
	{
		char	   *h = lfirst(lc);

		if (pg_strncasecmp(h, "Authorization:", 14) == 0 || pg_strncasecmp(h, "X-API-Key:", 10) == 0)
			explicit_bzero(h, strlen(h));
	}
}

/*
 * driver_absorb
 *		Reads a gateway answer, stages its records and advances the state.
 *		false + *failure if the gateway failed or answered nonsense.
 */
static bool
driver_absorb(const RunInfo *run, const CrmpayAccount *account, DriverState *st,
			  const DriverRequest *req, const CrmpayHttpResponse *response,
			  CrmpayGatewayFailure *failure)
{
	const CrmpayProvider *provider = account->provider;
	List	   *records = NIL;
	bool		ok;
	CrmpayGatewayRecord **array;
	ListCell   *lc;
	int			i = 0;

	crmpay_classify_http_failure(account, response, failure);
	if (st->phase == PHASE_ORDERS && response->transport == CRMPAY_TRANSPORT_OK &&
		response->status == 404)
	{
		/* the gateway does not know this order: no records */
		memset(failure, 0, sizeof(*failure));
		st->after_payment = req->order->payment_id;
		st->pages++;
		local_progress.pages = st->pages;
		progress_publish(false);
		return true;
	}
	if (failure->kind != CRMPAY_FAIL_NONE)
		return false;
	if (st->phase == PHASE_LIST)
		ok = provider->parse_list_records(account, response, &st->list, &records, failure);
	else
		ok = provider->parse_query_order(account, req->order, response, &records, failure);
	if (!ok)
		return crmpay_unreadable_answer(response, failure);
	if (st->phase == PHASE_ORDERS)
		st->after_payment = req->order->payment_id;

	array = palloc(sizeof(CrmpayGatewayRecord *) * Max(1, list_length(records)));
	foreach(lc, records)
		array[i++] = lfirst(lc);
	stage_records(run->id, 0, run->account, array, i);
	st->pages++;
	st->loaded += i;
	local_progress.pages = st->pages;
	local_progress.loaded = st->loaded;
	progress_publish(false);
	return true;
}

/* The run row: where the fetch is (step-by-step runs) and its counters. */
static void
save_driver_state(const RunInfo *run, const DriverState *st, bool keep_state)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[4] = {INT8OID, TEXTOID, INT4OID, INT8OID};
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};

	values[0] = Int64GetDatum(run->id);
	values[1] = crmpay_text_param(keep_state ? driver_state_json(st) : NULL, &nulls[1]);
	values[2] = Int32GetDatum(st->pages);
	values[3] = Int64GetDatum(st->loaded);
	crmpay_spi_run(crmpay_saved_plan(&plan,
									 "UPDATE crmpay.reconciliation_runs"
									 "   SET fetch_state = $2::jsonb, pages_fetched = $3, records_loaded = $4,"
									 "       phase = 'fetching', heartbeat_at = clock_timestamp()"
									 " WHERE id = $1",
									 4, types),
				   values, nulls, false, 0,
				   SPI_OK_UPDATE, "updating the run");
}

/* Adds "reconciliation run N, page P (...)" to errors raised while fetching. */
typedef struct FetchErrorContext
{
	int64		run_id;
	const char *what;
} FetchErrorContext;

static void
fetch_error_callback(void *arg)
{
	FetchErrorContext *c = arg;

	if (c->what)
		errcontext("reconciliation run " INT64_FORMAT ", gateway request for %s", c->run_id, c->what);
}

/* A gateway failure as an ERROR that says which page. */
static void
raise_fetch_failure(const CrmpayAccount *account, const CrmpayGatewayFailure *failure)
{
	crmpay_raise_gateway_failure(account, failure);
}

PG_FUNCTION_INFO_V1(crmpay_reconcile_fetch);

/*
 * crmpay._reconcile_fetch(run_id bigint) RETURNS void
 *		Fetches everything the run's sources list, in the caller's
 *		transaction.  A gateway failure raises an ERROR (the PL/pgSQL
 *		caller records the failed run).
 */
Datum
crmpay_reconcile_fetch(PG_FUNCTION_ARGS)
{
	int64		run_id = PG_GETARG_INT64(0);
	RunInfo		run;
	CrmpayAccount *account;
	DriverState st;
	DriverRequest req;
	ErrorContextCallback errcb;
	FetchErrorContext ctx = {run_id, NULL};
	MemoryContext pagecxt;
	MemoryContext oldcxt;

	SPI_connect();
	load_run(run_id, &run);
	account = crmpay_load_account(run.account, false);
	if (local_progress.run_id != run_id)
		progress_start(run_id, run.account);
	progress_phase("fetching");
	driver_init(&run, &st);

	errcb.callback = fetch_error_callback;
	errcb.arg = &ctx;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;

	pagecxt = AllocSetContextCreate(CurrentMemoryContext, "crmpay reconcile page",
									ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		CrmpayHttpResponse response;
		CrmpayGatewayFailure failure;
		bool		more;

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(pagecxt);
		oldcxt = MemoryContextSwitchTo(pagecxt);
		more = driver_prepare(&run, account, &st, &req);
		if (!more)
		{
			MemoryContextSwitchTo(oldcxt);
			break;
		}
		ctx.what = req.what;
		memset(&response, 0, sizeof(response));
		if (!crmpay_gateway_call(account, &req.http, &response, &failure) && response.status == 0 &&
			response.transport == CRMPAY_TRANSPORT_OK)
			raise_fetch_failure(account, &failure); /* no credentials (authorize) */
		wipe_request(&req);
		if (!driver_absorb(&run, account, &st, &req, &response, &failure))
			raise_fetch_failure(account, &failure);
		/* the state's cursor must outlive the page */
		if (st.list.cursor)
		{
			MemoryContextSwitchTo(oldcxt);
			st.list.cursor = pstrdup(st.list.cursor);
		}
		MemoryContextSwitchTo(oldcxt);
		SPI_freetuptable(SPI_tuptable);
	}
	error_context_stack = errcb.previous;
	save_driver_state(&run, &st, false);
	MemoryContextDelete(pagecxt);
	SPI_finish();
	PG_RETURN_VOID();
}

PG_FUNCTION_INFO_V1(crmpay_reconcile_sources);

/*
 * crmpay._reconcile_sources(account text) RETURNS text[]
 *		What the account's provider can fetch: 'list' (list API), 'orders'
 *		(per-order status queries).  settings.reconcile_sources (a JSON
 *		array) may choose among them.
 */
Datum
crmpay_reconcile_sources(PG_FUNCTION_ARGS)
{
	CrmpayAccount *account = crmpay_load_account(text_to_cstring(PG_GETARG_TEXT_PP(0)), false);
	const CrmpayProvider *provider = account->provider;
	const CrmpayJson *chosen = crmpay_json_member(account->settings, "reconcile_sources");
	bool		can_list = provider->build_list_records != NULL && provider->parse_list_records != NULL;
	bool		can_query = provider->build_query_order != NULL && provider->parse_query_order != NULL;
	bool		want_list = can_list;
	bool		want_query = can_query && !can_list;
	Datum		elems[2];
	int			n = 0;

	if (chosen != NULL)
	{
		int			i;

		if (chosen->kind != CRMPAY_JSON_ARRAY)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("settings.reconcile_sources of account \"%s\" must be a JSON array", account->name),
					 errhint("For example [\"list\"], [\"orders\"] or [\"list\", \"orders\"].")));
		want_list = want_query = false;
		for (i = 0; i < chosen->count; i++)
		{
			const CrmpayJson *item = chosen->items[i];

			if (item->kind == CRMPAY_JSON_STRING && strcmp(item->text, "list") == 0 && can_list)
				want_list = true;
			else if (item->kind == CRMPAY_JSON_STRING && strcmp(item->text, "orders") == 0 && can_query)
				want_query = true;
			else
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("provider \"%s\" cannot reconcile from source %s",
								provider->name, item->text ? item->text : "(not a string)"),
						 errhint("Sources: %s%s%s.", can_list ? "list" : "",
								 can_list && can_query ? ", " : "", can_query ? "orders" : "")));
		}
	}
	if (want_list)
		elems[n++] = CStringGetTextDatum("list");
	if (want_query)
		elems[n++] = CStringGetTextDatum("orders");
	PG_RETURN_ARRAYTYPE_P(construct_array(elems, n, TEXTOID, -1, false, TYPALIGN_INT));
}

/* ----------------------------------------------------------------
 * Progress functions
 * ----------------------------------------------------------------
 */
PG_FUNCTION_INFO_V1(crmpay_reconcile_report);

/*
 * crmpay._reconcile_report(run_id, phase, records_matched, discrepancies,
 *		healed): sets this backend's progress; phase 'done' or 'failed'
 *		frees the slot.
 */
Datum
crmpay_reconcile_report(PG_FUNCTION_ARGS)
{
	int64		run_id;
	char	   *phase;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_VOID();
	run_id = PG_GETARG_INT64(0);
	phase = text_to_cstring(PG_GETARG_TEXT_PP(1));
	if (local_progress.run_id != run_id)
	{
		RunInfo		run;

		SPI_connect();
		load_run(run_id, &run);
		progress_start(run_id, run.account);
		SPI_finish();
	}
	if (!PG_ARGISNULL(2))
		local_progress.matched = PG_GETARG_INT64(2);
	if (!PG_ARGISNULL(3))
		local_progress.discrepancies = PG_GETARG_INT64(3);
	if (!PG_ARGISNULL(4))
		local_progress.healed = PG_GETARG_INT64(4);
	strlcpy(local_progress.phase, phase, sizeof(local_progress.phase));
	if (strcmp(phase, "done") == 0 || strcmp(phase, "failed") == 0)
	{
		progress_publish(true);
		local_progress.run_id = 0;
	}
	else
		progress_publish(false);
	PG_RETURN_VOID();
}

PG_FUNCTION_INFO_V1(crmpay_reconcile_counters);

/*
 * crmpay._reconcile_counters(run_id, OUT pages_fetched, OUT records_loaded)
 *		What this backend fetched for the run so far (NULLs if it is not
 *		this backend's run): _reconcile_fail records it after a rollback.
 */
Datum
crmpay_reconcile_counters(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[2];
	bool		nulls[2] = {false, false};

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "crmpay: _reconcile_counters must return a record");
	if (local_progress.run_id == PG_GETARG_INT64(0))
	{
		values[0] = Int32GetDatum(local_progress.pages);
		values[1] = Int64GetDatum(local_progress.loaded);
	}
	else
		nulls[0] = nulls[1] = true;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

PG_FUNCTION_INFO_V1(crmpay_reconcile_progress);

/* crmpay.reconciliation_live_progress(): one row per backend running a reconciliation. */
Datum
crmpay_reconcile_progress(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			i;

	InitMaterializedSRF(fcinfo, 0);
	for (i = 0; progress_slots != NULL && i < progress_nslots; i++)
	{
		ProgressSlot copy;
		Datum		values[11];
		bool		nulls[11] = {0};

		SpinLockAcquire(&progress_slots[i].mutex);
		memcpy(&copy, &progress_slots[i], sizeof(copy));
		SpinLockRelease(&progress_slots[i].mutex);
		if (copy.pid == 0)
			continue;
		values[0] = Int32GetDatum(copy.pid);
		values[1] = Int64GetDatum(copy.run_id);
		values[2] = CStringGetTextDatum(copy.account);
		values[3] = CStringGetTextDatum(copy.phase);
		values[4] = Int32GetDatum(copy.pages);
		values[5] = Int64GetDatum(copy.loaded);
		values[6] = Int64GetDatum(copy.matched);
		values[7] = Int64GetDatum(copy.discrepancies);
		values[8] = Int64GetDatum(copy.healed);
		values[9] = TimestampTzGetDatum(copy.started);
		values[10] = TimestampTzGetDatum(copy.updated);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* ----------------------------------------------------------------
 * Reports: import and download
 * ----------------------------------------------------------------
 */
#define IMPORT_BATCH 5000

typedef struct ImportState
{
	int64		import_id;
	const char *account;
	CrmpayGatewayRecord **batch;
	int			n;
	uint64		inserted;
	TimestampTz first_at;
	TimestampTz last_at;
} ImportState;

static void
import_emit(CrmpayGatewayRecord *rec, void *arg)
{
	ImportState *s = arg;

	s->batch[s->n++] = rec;
	if (rec->occurred_at != 0)
	{
		if (s->first_at == 0 || rec->occurred_at < s->first_at)
			s->first_at = rec->occurred_at;
		if (rec->occurred_at > s->last_at)
			s->last_at = rec->occurred_at;
	}
}

static void
import_flush(void *arg)
{
	ImportState *s = arg;

	s->inserted += stage_records(0, s->import_id, s->account, s->batch, s->n);
	SPI_freetuptable(SPI_tuptable);
	s->n = 0;
}

PG_FUNCTION_INFO_V1(crmpay_import_report);

/*
 * crmpay._import_report(account, format, content, source) RETURNS bigint
 *		Reads a whole report and stores its records; an ERROR on any bad
 *		line leaves nothing of it (one statement).  Lines imported before
 *		(same record reference) are counted as duplicates and skipped.
 */
Datum
crmpay_import_report(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr insert_plan = NULL;
	static SPIPlanPtr update_plan = NULL;
	char	   *name;
	CrmpayAccount *account;
	const char *format;
	text	   *content;
	const char *source;
	ImportState state = {0};
	CrmpayCurrencyTable *currencies;
	unsigned char digest[CRMPAY_MAX_MAC];
	unsigned int digest_len;
	char		hex[2 * CRMPAY_MAX_MAC + 1];
	Datum		values[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};
	bool		isnull;
	int			lines;
	int			rc;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("account must not be null")));
	if (PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the report content must not be null")));
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	account = crmpay_load_account(name, false);
	format = crmpay_report_format(PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1)),
								  account->provider->name);
	content = PG_GETARG_TEXT_PP(2);
	source = PG_ARGISNULL(3) ? "import_report" : text_to_cstring(PG_GETARG_TEXT_PP(3));

	crmpay_digest("SHA256", VARDATA_ANY(content), VARSIZE_ANY_EXHDR(content), digest, &digest_len);
	crmpay_hex_encode(digest, digest_len, hex);
	hex[2 * digest_len] = '\0';

	SPI_connect();
	currencies = crmpay_load_currencies(CurrentMemoryContext);
	{
		Oid			types[4] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID};

		values[0] = CStringGetTextDatum(name);
		values[1] = CStringGetTextDatum(format);
		values[2] = CStringGetTextDatum(source);
		values[3] = CStringGetTextDatum(hex);
		rc = SPI_execute_plan(crmpay_saved_plan(&insert_plan,
											"INSERT INTO crmpay.report_imports"
											" (account, format, source, lines, records, duplicates, sha256)"
											" VALUES ($1, $2, $3, 0, 0, 0, $4) RETURNING id",
											4, types),
							  values, NULL, false, 0);
		if (rc != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
			elog(ERROR, "crmpay: recording the import failed: %s", SPI_result_code_string(rc));
		state.import_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	state.account = name;
	state.batch = palloc(sizeof(CrmpayGatewayRecord *) * IMPORT_BATCH);
	lines = crmpay_read_report(format, account, VARDATA_ANY(content), VARSIZE_ANY_EXHDR(content),
							   currencies, import_emit, import_flush, &state, IMPORT_BATCH);
	{
		Oid			types[6] = {INT8OID, INT4OID, INT4OID, INT4OID, TIMESTAMPTZOID, TIMESTAMPTZOID};

		values[0] = Int64GetDatum(state.import_id);
		values[1] = Int32GetDatum(lines);
		values[2] = Int32GetDatum((int32) state.inserted);
		values[3] = Int32GetDatum(lines - (int32) state.inserted);
		values[4] = TimestampTzGetDatum(state.first_at);
		nulls[4] = state.first_at ? ' ' : 'n';
		values[5] = TimestampTzGetDatum(state.last_at);
		nulls[5] = state.last_at ? ' ' : 'n';
		crmpay_spi_run(crmpay_saved_plan(&update_plan,
										 "UPDATE crmpay.report_imports SET lines = $2, records = $3, duplicates = $4,"
										 " first_at = $5, last_at = $6 WHERE id = $1",
										 6, types),
					   values, nulls, false, 0,
					   SPI_OK_UPDATE, "recording the import");
	}
	SPI_finish();
	PG_RETURN_INT64(state.import_id);
}

PG_FUNCTION_INFO_V1(crmpay_download_report);

/*
 * crmpay._download_report(account text, url text) RETURNS text
 *		GETs a report with the account's report credentials: HTTP Basic with
 *		credentials.report_username / report_password, or the header
 *		X-API-Key with credentials.report_api_key.  The URL must start with
 *		settings.report_base_url, so no other host ever sees them.
 */
Datum
crmpay_download_report(PG_FUNCTION_ARGS)
{
	CrmpayAccount *account = crmpay_load_account(text_to_cstring(PG_GETARG_TEXT_PP(0)), false);
	char	   *url = text_to_cstring(PG_GETARG_TEXT_PP(1));
	const char *base = crmpay_setting(account, "report_base_url");
	const char *user = crmpay_json_str(account->credentials, "report_username");
	const char *password = crmpay_json_str(account->credentials, "report_password");
	const char *api_key = crmpay_json_str(account->credentials, "report_api_key");
	CrmpayHttpRequest req = {0};
	CrmpayHttpResponse response;
	CrmpayGatewayFailure failure;
	text	   *result;

	if (base == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no settings.report_base_url", account->name),
				 errdetail("crmpay only sends the report credentials to URLs under that base."),
				 errhint("Adyen: {\"report_base_url\": \"https://ca-live.adyen.com/reports/download/MerchantAccount/YourMerchantAccount/\"}.")));
	crmpay_http_check_url(base, "settings.report_base_url");
	/* under the base: same prefix, and a path boundary right after it */
	if (strncmp(url, base, strlen(base)) != 0 ||
		(base[strlen(base) - 1] != '/' && url[strlen(base)] != '/' && url[strlen(base)] != '\0') ||
		strstr(url + strlen(base), "..") != NULL || strpbrk(url, " \r\n\\") != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("report URL is not under the account's settings.report_base_url"),
				 errdetail("The URL must start with %s.", base)));
	req.method = "GET";
	req.url = url;
	req.max_response_bytes = (size_t) report_max_bytes;
	if (user != NULL && password != NULL)
	{
		StringInfoData plain;
		char	   *encoded;
		size_t		n;

		initStringInfo(&plain);
		appendStringInfo(&plain, "%s:%s", user, password);
		encoded = palloc(CRMPAY_BASE64_ENCODED_LEN(plain.len) + 1);
		n = crmpay_base64_encode((unsigned char *) plain.data, plain.len, encoded, false);
		encoded[n] = '\0';
		explicit_bzero(plain.data, plain.len);
		req.headers = list_make1(crmpay_header_line("Authorization", psprintf("Basic %s", encoded)));
		explicit_bzero(encoded, n);
	}
	else if (api_key != NULL)
		req.headers = list_make1(crmpay_header_line("X-API-Key", api_key));
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no report credentials", account->name),
				 errhint("Add credentials.report_username and report_password (a report user), or credentials.report_api_key, with crmpay.update_account().")));

	crmpay_http_perform(&req, &response);
	{
		ListCell   *lc;

		foreach(lc, req.headers)
			explicit_bzero(lfirst(lc), strlen(lfirst(lc)));
	}
	crmpay_classify_http_failure(account, &response, &failure);
	if (failure.kind == CRMPAY_FAIL_NONE && response.transport == CRMPAY_TRANSPORT_OK)
	{
		if (!pg_verifymbstr(response.body, (int) response.body_len, true))
			ereport(ERROR,
					(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
					 errmsg("the report at %s is not valid text in the database encoding", url),
					 errhint("Download it, convert it (convert_from(bytes, 'WIN1252')) and pass it to crmpay.import_report().")));
		result = cstring_to_text_with_len(response.body, (int) response.body_len);
		PG_RETURN_TEXT_P(result);
	}
	if (response.transport == CRMPAY_TRANSPORT_TOO_LARGE)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("the report at %s is larger than crmpay.report_max_bytes", url)));
	crmpay_raise_gateway_failure(account, &failure);
}

/* ----------------------------------------------------------------
 * Step-by-step runs: CALL crmpay.reconcile_in_steps and the worker
 * ----------------------------------------------------------------
 */

/* How a runner ends a transaction before a gateway call and starts the next. */
typedef struct StepHost
{
	void		(*commit) (void);	/* commit; afterwards no snapshot is held */
	void		(*begin) (void);	/* a new transaction to run SQL in */
	Oid			owner;			/* run the steps as this role (InvalidOid: as is) */
} StepHost;

/* Result of a step run in a subtransaction. */
typedef struct StepResult
{
	bool		ok;
	ErrorData  *error;			/* when !ok, in the runner's context */
} StepResult;

typedef void (*StepFn) (void *arg);

/*
 * run_step
 *		Runs fn in a subtransaction as the extension's owner with a safe
 *		search_path (what SECURITY DEFINER would do); an ERROR is caught and
 *		returned, the subtransaction rolled back.
 */
static StepResult
run_step(const StepHost *host, MemoryContext runcxt, StepFn fn, void *arg)
{
	StepResult	result = {true, NULL};
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		Oid			save_userid;
		int			save_sec;
		int			nest = NewGUCNestLevel();

		(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		GetUserIdAndSecContext(&save_userid, &save_sec);
		if (OidIsValid(host->owner))
			SetUserIdAndSecContext(host->owner, save_sec | SECURITY_LOCAL_USERID_CHANGE);
		fn(arg);
		SetUserIdAndSecContext(save_userid, save_sec);
		AtEOXact_GUC(true, nest);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(runcxt);
		result.ok = false;
		result.error = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_END_TRY();
	return result;
}

/* Everything a step-by-step run keeps between its transactions. */
typedef struct StepRun
{
	const StepHost *host;
	MemoryContext cxt;			/* lives as long as the run */
	MemoryContext pagecxt;		/* reset every page */
	/* the request */
	const char *account_name;
	TimestampTz since;
	TimestampTz until;
	bool		heal;
	int64		schedule_id;
	/* the run */
	RunInfo		run;
	DriverState st;
	DriverRequest req;
	bool		have_request;
	bool		resend;			/* send the same request again (new token) */
	bool		reauthorized;
	CrmpayHttpResponse response;
	CrmpayGatewayFailure failure;
	bool		gateway_failed;
	char	   *failure_what;
} StepRun;

static void
step_begin(void *arg)
{
	StepRun    *s = arg;
	static SPIPlanPtr plan = NULL;
	Oid			types[5] = {TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, BOOLOID, INT8OID};
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};
	bool		isnull;
	int			rc;
	MemoryContext old;

	values[0] = CStringGetTextDatum(s->account_name);
	values[1] = TimestampTzGetDatum(s->since);
	values[2] = TimestampTzGetDatum(s->until);
	values[3] = BoolGetDatum(s->heal);
	values[4] = Int64GetDatum(s->schedule_id);
	nulls[4] = s->schedule_id > 0 ? ' ' : 'n';
	rc = SPI_execute_plan(crmpay_saved_plan(&plan,
										"SELECT crmpay._reconcile_begin($1, $2, $3, $4, 'stepwise', $5)",
										5, types),
						  values, nulls, false, 1);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "crmpay: starting the run failed: %s", SPI_result_code_string(rc));
	s->run.id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	old = MemoryContextSwitchTo(s->cxt);
	load_run(s->run.id, &s->run);
	MemoryContextSwitchTo(old);
	driver_init(&s->run, &s->st);
	progress_start(s->run.id, s->run.account);
	progress_phase("fetching");
}

/* Builds the next request (in pagecxt, which outlives the transaction). */
/*
 * Lets the provider add its credentials (an OAuth token: that may need the
 * database, so it happens here, inside the step's transaction).
 */
static void
step_authorize(StepRun *s, const CrmpayAccount *account, bool refresh)
{
	if (account->provider->authorize != NULL &&
		!account->provider->authorize(account, &s->req.http, refresh, &s->failure))
		s->gateway_failed = true;
}

static void
step_prepare(void *arg)
{
	StepRun    *s = arg;
	CrmpayAccount *account = crmpay_load_account(s->run.account, false);
	MemoryContext old = MemoryContextSwitchTo(s->pagecxt);

	s->reauthorized = false;
	s->have_request = driver_prepare(&s->run, account, &s->st, &s->req);
	if (s->have_request)
		step_authorize(s, account, false);
	MemoryContextSwitchTo(old);
}

static void
step_absorb(void *arg)
{
	StepRun    *s = arg;
	CrmpayAccount *account = crmpay_load_account(s->run.account, false);
	MemoryContext old = MemoryContextSwitchTo(s->pagecxt);

	/* a token the gateway no longer takes: a fresh one, and the same request again */
	s->resend = false;
	if (account->provider->authorize != NULL && !s->reauthorized &&
		s->response.transport == CRMPAY_TRANSPORT_OK && s->response.status == 401)
	{
		s->reauthorized = true;
		s->req.http.headers = NIL;
		if (s->st.phase == PHASE_LIST)
			account->provider->build_list_records(account, &s->st.list, &s->req.http);
		else
			(void) account->provider->build_query_order(account, s->req.order, &s->req.http);
		step_authorize(s, account, true);
		s->resend = !s->gateway_failed;
		MemoryContextSwitchTo(old);
		return;
	}
	if (!driver_absorb(&s->run, account, &s->st, &s->req, &s->response, &s->failure))
	{
		s->gateway_failed = true;
		MemoryContextSwitchTo(old);
		return;
	}
	MemoryContextSwitchTo(s->cxt);
	if (s->st.list.cursor)
		s->st.list.cursor = pstrdup(s->st.list.cursor);
	MemoryContextSwitchTo(old);
	save_driver_state(&s->run, &s->st, true);
}

/* Raises the gateway failure, so that step_fail records it like any error. */
static void
step_raise_failure(void *arg)
{
	StepRun    *s = arg;
	CrmpayAccount *account = crmpay_load_account(s->run.account, false);
	ErrorContextCallback errcb;
	FetchErrorContext ctx = {s->run.id, s->failure_what};

	errcb.callback = fetch_error_callback;
	errcb.arg = &ctx;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;
	raise_fetch_failure(account, &s->failure);
}

static void
step_finish(void *arg)
{
	StepRun    *s = arg;
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {INT8OID};
	Datum		values[1];

	save_driver_state(&s->run, &s->st, false);
	values[0] = Int64GetDatum(s->run.id);
	crmpay_spi_run(crmpay_saved_plan(&plan,
									 "SELECT crmpay._reconcile_match($1), crmpay._reconcile_heal($1),"
									 "       crmpay._reconcile_finish($1)",
									 1, types),
				   values, NULL, false, 1,
				   SPI_OK_SELECT, "finishing the run");
}

typedef struct FailArgs
{
	StepRun    *run;
	ErrorData  *error;
} FailArgs;

static void
step_fail(void *arg)
{
	FailArgs   *f = arg;
	static SPIPlanPtr plan = NULL;
	Oid			types[6] = {INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[6];
	char		nulls[6];

	local_progress.pages = f->run->st.pages;
	local_progress.loaded = f->run->st.loaded;
	values[0] = Int64GetDatum(f->run->run.id);
	nulls[0] = ' ';
	values[1] = crmpay_text_param(unpack_sql_state(f->error->sqlerrcode), &nulls[1]);
	values[2] = crmpay_text_param(f->error->message, &nulls[2]);
	values[3] = crmpay_text_param(f->error->detail, &nulls[3]);
	values[4] = crmpay_text_param(f->error->hint, &nulls[4]);
	values[5] = crmpay_text_param(f->error->context, &nulls[5]);
	crmpay_spi_run(crmpay_saved_plan(&plan, "SELECT crmpay._reconcile_fail($1, $2, $3, $4, $5, $6)",
									 6, types),
				   values, nulls, false, 1,
				   SPI_OK_SELECT, "recording the failed run");
}

/*
 * run_in_steps
 *		One whole run with a commit before every gateway call.  Returns the
 *		run id (0 if it could not even start: *error then says why).  A
 *		failed run is recorded as failed and reported with a WARNING.
 */
static int64
run_in_steps(const StepHost *host, const char *account, TimestampTz since,
			 TimestampTz until, bool heal, int64 schedule_id, ErrorData **start_error)
{
	StepRun    *s;
	StepResult	r;
	MemoryContext callercxt = CurrentMemoryContext;
	MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "crmpay reconcile run",
											  ALLOCSET_DEFAULT_SIZES);
	int64		run_id = 0;

	PG_TRY();
	{
		s = MemoryContextAllocZero(cxt, sizeof(StepRun));
		s->host = host;
		s->cxt = cxt;
		s->pagecxt = AllocSetContextCreate(cxt, "crmpay reconcile page", ALLOCSET_DEFAULT_SIZES);
		s->account_name = MemoryContextStrdup(cxt, account);
		s->since = since;
		s->until = until;
		s->heal = heal;
		s->schedule_id = schedule_id;
		*start_error = NULL;

		/* a start error outlives the run's memory: the caller reports it */
		r = run_step(host, callercxt, step_begin, s);
		if (!r.ok)
			*start_error = r.error;
		else
		{
			run_id = s->run.id;
			host->commit();
			host->begin();
			for (;;)
			{
				CHECK_FOR_INTERRUPTS();
				if (!s->resend)
					MemoryContextReset(s->pagecxt);
				if (!s->resend)
				{
					r = run_step(host, cxt, step_prepare, s);
					if (!r.ok || !s->have_request)
						break;
				}
				if (!s->gateway_failed)
				{
					/* no transaction, no snapshot while the gateway answers */
					host->commit();
					{
						MemoryContext old = MemoryContextSwitchTo(s->pagecxt);

						crmpay_http_perform(&s->req.http, &s->response);
						wipe_request(&s->req);
						MemoryContextSwitchTo(old);
					}
					host->begin();
					r = run_step(host, cxt, step_absorb, s);
					if (!r.ok)
						break;
					if (s->resend)
						continue;
				}
				if (s->gateway_failed)
				{
					s->failure_what = s->req.what;
					r = run_step(host, cxt, step_raise_failure, s);
					break;
				}
				host->commit();
				host->begin();
			}
			if (r.ok)
				r = run_step(host, cxt, step_finish, s);
			if (!r.ok)
			{
				FailArgs	f = {s, r.error};
				StepResult	rf = run_step(host, cxt, step_fail, &f);

				if (!rf.ok)
					ReThrowError(rf.error);
				ereport(WARNING,
						(errcode(r.error->sqlerrcode),
						 errmsg("reconciliation run " INT64_FORMAT " of account \"%s\" failed: %s",
								run_id, account, r.error->message),
						 errdetail("%s%sNothing of this run was healed or kept.",
								   r.error->detail ? r.error->detail : "", r.error->detail ? " " : ""),
						 errhint("crmpay.reconciliation_runs has the reason; run it again once the cause is fixed.")));
			}
			host->commit();
			host->begin();
		}
	}
	PG_FINALLY();
	{
		if (local_progress.run_id != 0 && local_progress.run_id == run_id)
		{
			progress_publish(true);
			local_progress.run_id = 0;
		}
		MemoryContextDelete(cxt);
	}
	PG_END_TRY();
	return run_id;
}

/* The extension's owner: step-by-step runs act as it, like SECURITY DEFINER. */
static Oid
extension_owner(void)
{
	static SPIPlanPtr plan = NULL;
	bool		isnull;
	Datum		d;
	int			rc;

	rc = SPI_execute_plan(crmpay_saved_plan(&plan,
										"SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'crmpay'",
										0, NULL),
						  NULL, NULL, true, 1);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "crmpay: the crmpay extension is not installed in this database");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return DatumGetObjectId(d);
}

/* The procedure's host: SPI_commit ends the transaction and starts a bare one. */
static void
procedure_commit(void)
{
	SPI_commit();
}

static void
procedure_begin(void)
{
}

PG_FUNCTION_INFO_V1(crmpay_reconcile_in_steps);

/*
 * CALL crmpay.reconcile_in_steps(account, since, until, heal, INOUT run_id)
 *		A run that commits after every page (see run_in_steps).  Only at the
 *		top level: a transaction block would hold everything together.
 */
Datum
crmpay_reconcile_in_steps(PG_FUNCTION_ARGS)
{
	StepHost	host = {procedure_commit, procedure_begin, InvalidOid};
	ErrorData  *start_error = NULL;
	int64		run_id;
	TupleDesc	desc;
	TypeFuncClass cls;

	if (fcinfo->context == NULL || !IsA(fcinfo->context, CallContext) ||
		castNode(CallContext, fcinfo->context)->atomic)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_TERMINATION),
				 errmsg("crmpay.reconcile_in_steps must be called with CALL outside a transaction block"),
				 errhint("Use crmpay.reconcile() inside a transaction.")));
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("account, since, until and heal must not be null")));

	SPI_connect_ext(SPI_OPT_NONATOMIC);
	host.owner = extension_owner();
	run_id = run_in_steps(&host, text_to_cstring(PG_GETARG_TEXT_PP(0)), PG_GETARG_TIMESTAMPTZ(1),
						  PG_GETARG_TIMESTAMPTZ(2), PG_GETARG_BOOL(3), 0, &start_error);
	SPI_finish();
	if (start_error)
		ReThrowError(start_error);

	cls = get_call_result_type(fcinfo, NULL, &desc);
	if (cls == TYPEFUNC_COMPOSITE)
	{
		Datum		values[1] = {Int64GetDatum(run_id)};
		bool		nulls[1] = {false};

		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
	}
	PG_RETURN_INT64(run_id);
}

/* ----------------------------------------------------------------
 * The worker's runner
 * ----------------------------------------------------------------
 */
static void
worker_commit(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
}

static void
worker_begin(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "crmpay reconciliation");
}

typedef struct DueSchedule
{
	int64		id;
	char	   *account;
	TimestampTz since;
	TimestampTz until;
	bool		heal;
} DueSchedule;

/*
 * claim_due
 *		Takes the next due schedule (SKIP LOCKED, so crmpay's and pg_cron's
 *		runners never take the same) and moves it to its next time.  false
 *		when none is due.
 */
static bool
claim_due(DueSchedule *due, MemoryContext cxt)
{
	int			rc;
	HeapTuple	tuple;
	TupleDesc	desc;
	bool		isnull;

	rc = SPI_execute("WITH s AS (SELECT * FROM crmpay.reconciliation_schedules"
					 "            WHERE enabled AND next_run_at <= clock_timestamp()"
					 "            ORDER BY next_run_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
					 " UPDATE crmpay.reconciliation_schedules q"
					 "    SET next_run_at = s.next_run_at + s.every * (1 + floor(extract(epoch FROM"
					 "            clock_timestamp() - s.next_run_at) / extract(epoch FROM s.every))),"
					 "        last_run_at = clock_timestamp()"
					 "   FROM s WHERE q.id = s.id"
					 " RETURNING q.id, q.account,"
					 "           date_trunc('second', clock_timestamp()) - q.lag - q.window_length,"
					 "           date_trunc('second', clock_timestamp()) - q.lag, q.heal",
					 false, 1);
	if (rc != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "crmpay: claiming a due reconciliation failed: %s", SPI_result_code_string(rc));
	if (SPI_processed == 0)
		return false;
	tuple = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	due->id = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
	due->account = MemoryContextStrdup(cxt, SPI_getvalue(tuple, desc, 2));
	due->since = DatumGetTimestampTz(SPI_getbinval(tuple, desc, 3, &isnull));
	due->until = DatumGetTimestampTz(SPI_getbinval(tuple, desc, 4, &isnull));
	due->heal = DatumGetBool(SPI_getbinval(tuple, desc, 5, &isnull));
	return true;
}

/*
 * crmpay_reconcile_run_due_in_worker
 *		See reports.h.  Each due schedule is claimed in its own transaction,
 *		then run step by step; a failed run is recorded and the next one
 *		still runs.
 */
int
crmpay_reconcile_run_due_in_worker(void)
{
	StepHost	host = {worker_commit, worker_begin, InvalidOid};
	MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "crmpay due reconciliations",
											  ALLOCSET_SMALL_SIZES);
	int			done = 0;

	for (;;)
	{
		DueSchedule due;
		bool		claimed;
		ErrorData  *start_error = NULL;
		int64		run_id;

		worker_begin();
		claimed = claim_due(&due, cxt);
		worker_commit();
		if (!claimed)
			break;
		worker_begin();
		run_id = run_in_steps(&host, due.account, due.since, due.until, due.heal, due.id, &start_error);
		{
			static SPIPlanPtr plan = NULL;
			Oid			types[3] = {INT8OID, INT8OID, TEXTOID};
			Datum		values[3];
			char		nulls[3] = {' ', ' ', ' '};

			values[0] = Int64GetDatum(due.id);
			values[1] = Int64GetDatum(run_id);
			nulls[1] = start_error ? 'n' : ' ';
			values[2] = crmpay_text_param(start_error ? start_error->message : NULL, &nulls[2]);
			if (start_error)
				ereport(WARNING,
						(errmsg("scheduled reconciliation of account \"%s\" did not start: %s",
								due.account, start_error->message)));
			else
				done++;
			if (SPI_execute_plan(crmpay_saved_plan(&plan,
											   "UPDATE crmpay.reconciliation_schedules"
											   "   SET last_run_id = coalesce($2, last_run_id), last_error = $3"
											   " WHERE id = $1",
											   3, types),
								 values, nulls, false, 0) != SPI_OK_UPDATE)
				elog(ERROR, "crmpay: recording the schedule's run failed");
		}
		worker_commit();
		MemoryContextReset(cxt);
	}
	MemoryContextDelete(cxt);
	return done;
}

/* ----------------------------------------------------------------
 * Running the due schedules in a background worker now
 *
 *	Until crmpay's own worker loop calls crmpay_reconcile_run_due_in_worker
 *	(see reports.h), crmpay._run_due_reconciliations_in_background()
 *	starts a one-off dynamic background worker that does.
 * ----------------------------------------------------------------
 */
PGDLLEXPORT void crmpay_reconcile_bgw_main(Datum arg);

void
crmpay_reconcile_bgw_main(Datum arg)
{
	Oid			ids[2];

	memcpy(ids, MyBgworkerEntry->bgw_extra, sizeof(ids));
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(ids[0], ids[1], 0);
	(void) crmpay_reconcile_run_due_in_worker();
	proc_exit(0);
}

PG_FUNCTION_INFO_V1(crmpay_run_due_in_background);

/*
 * crmpay._run_due_reconciliations_in_background(wait boolean) RETURNS integer
 *		Starts a background worker, connected as the extension's owner,
 *		that runs every due schedule step by step; returns its pid, after it
 *		has finished when wait is true.
 */
/*
 * Registers the one-off background worker that runs every due schedule
 * (crmpay_reconcile_bgw_main) as the extension's owner in this database.
 * Must run inside a transaction (it reads the owner).  Returns false when
 * no background worker slot is free.
 */
static bool
register_due_worker(pid_t notify_pid, BackgroundWorkerHandle **handle)
{
	BackgroundWorker worker;
	Oid			ids[2];

	SPI_connect();
	ids[0] = MyDatabaseId;
	ids[1] = extension_owner();
	SPI_finish();

	memset(&worker, 0, sizeof(worker));
	snprintf(worker.bgw_name, BGW_MAXLEN, "crmpay reconciliation");
	snprintf(worker.bgw_type, BGW_MAXLEN, "crmpay reconciliation");
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "crmpay");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "crmpay_reconcile_bgw_main");
	memcpy(worker.bgw_extra, ids, sizeof(ids));
	worker.bgw_notify_pid = notify_pid;
	return RegisterDynamicBackgroundWorker(&worker, handle);
}

Datum
crmpay_run_due_in_background(PG_FUNCTION_ARGS)
{
	BackgroundWorkerHandle *handle;
	pid_t		pid = 0;

	if (!register_due_worker(MyProcPid, &handle))
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not start a background worker for reconciliation"),
				 errhint("Raise max_worker_processes.")));
	if (WaitForBackgroundWorkerStartup(handle, &pid) != BGWH_STARTED)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
				 errmsg("the reconciliation background worker did not start")));
	if (!PG_ARGISNULL(0) && PG_GETARG_BOOL(0))
		(void) WaitForBackgroundWorkerShutdown(handle);
	PG_RETURN_INT32((int32) pid);
}


/*
 * crmpay_reconcile_start_due
 *		For the outbox worker's loop, outside any transaction: at most once
 *		per crmpay.reconcile_check_interval, when crmpay is installed in this database,
 *		a reconciliation schedule is due and the reconciliation worker
 *		started from here last time has finished, starts one.  Runs happen
 *		in that separate process, so a long reconciliation never holds up
 *		payment links.  Returns the milliseconds until the next check.
 */
long
crmpay_reconcile_start_due(void)
{
	static TimestampTz next_check = 0;
	static BackgroundWorkerHandle *running = NULL;
	TimestampTz now = GetCurrentTimestamp();
	bool		due = false;
	pid_t		pid;

	/* a lowered crmpay.reconcile_check_interval (SIGHUP) applies at once */
	if (next_check > TimestampTzPlusMilliseconds(now, reconcile_check_interval_ms))
		next_check = TimestampTzPlusMilliseconds(now, reconcile_check_interval_ms);
	if (now < next_check)
		return Max(1, (next_check - now) / 1000);
	next_check = TimestampTzPlusMilliseconds(now, (long) reconcile_check_interval_ms);

	/* the one started last time is still at work: its runs claim the due ones */
	if (running != NULL)
	{
		BgwHandleStatus status = GetBackgroundWorkerPid(running, &pid);

		if (status == BGWH_STARTED || status == BGWH_NOT_YET_STARTED)
			return (long) reconcile_check_interval_ms;
		pfree(running);
		running = NULL;
	}

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	/* no activity is reported for a check that finds nothing to do */
	if (OidIsValid(get_extension_oid("crmpay", true)))
	{
		int			rc;

		SPI_connect();
		rc = SPI_execute("SELECT 1 FROM crmpay.reconciliation_schedules"
						 " WHERE enabled AND next_run_at <= clock_timestamp() LIMIT 1",
						 true, 1);
		if (rc != SPI_OK_SELECT)
			elog(ERROR, "crmpay: looking for due reconciliations failed: %s", SPI_result_code_string(rc));
		due = SPI_processed > 0;
		SPI_finish();
		if (due)
		{
			MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

			pgstat_report_activity(STATE_RUNNING, "crmpay worker: starting due reconciliations");
			if (!register_due_worker(0, &running))
			{
				running = NULL;
				ereport(WARNING,
						(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
						 errmsg("crmpay: a reconciliation is due but no background worker slot is free"),
						 errhint("Raise max_worker_processes; the worker tries again in a minute.")));
			}
			MemoryContextSwitchTo(old);
		}
	}
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	return (long) reconcile_check_interval_ms;
}
