/*-------------------------------------------------------------------------
 *
 * outbox.c
 *	  What the worker of a database does with crmpay.jobs.
 *
 *	  The worker keeps up to crmpay.max_concurrent_requests requests in
 *	  flight (libcurl multi, http.c) as a pipeline of three steps:
 *
 *	  claim		one short transaction: due jobs (FOR UPDATE SKIP LOCKED)
 *				become 'running' with one more attempt and a lease (run_at =
 *				now + crmpay.job_lease); each is prepared in a subtransaction
 *				(an order's job first gets its payment, see
 *				crmpay._materialize_order; a capture job reads its payment,
 *				crmpay._capture_job_request; the provider builds the
 *				request and adds its credentials) and handed to curl;
 *				commit.  Nothing is sent before the claim has committed.
 *	  send		curl runs the requests concurrently; no transaction is open.
 *	  record	one short transaction per batch of finished requests, each
 *				recorded in its own subtransaction: the link (payment open,
 *				e-mail queued), the capture (payment paid, processing or
 *				failed through the state machine), or the failure (retry
 *				after a backoff with full jitter, Retry-After honoured; or
 *				dead).
 *
 *	  Exactly once: a job claimed but never recorded (worker killed, server
 *	  crashed) is claimed again, at once when the worker starts (a database
 *	  has a single worker) or when its lease ends, and its request carries
 *	  the same idempotency key as before (a capture: the same
 *	  PayPal-Request-Id), so the gateway answers with the link it already
 *	  created, or the capture it already made, rather than making another.
 *
 *	  Errors: a job whose preparation or recording fails is rolled back to
 *	  its subtransaction and recorded as failed; the others carry on.
 *
 *	  Memory: each job in flight has its own small memory context, deleted
 *	  once it is recorded; per-iteration allocations go to a context reset
 *	  every iteration; curl's state is malloc'd and process-local (http.c).
 *
 *-------------------------------------------------------------------------
 */
#include "crmpay.h"

#include <math.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "email.h"
#include "provider.h"
#include "worker.h"

/*
 * Most jobs recorded, and claimed, per transaction.  Each job gets a
 * subtransaction, and one that writes may use two XIDs (its own and the
 * order write-back's); the batches keep them within the 64 a backend can
 * track before every snapshot in the cluster gets slower ("suboverflowed").
 */
#define OUTBOX_BATCH 16
#define OUTBOX_CLAIM_BATCH 32

/* What a job does (crmpay.job_kind). */
typedef enum JobKind
{
	JOB_CREATE_LINK,
	JOB_SEND_EMAIL,
	JOB_CAPTURE
} JobKind;

/* A job handed to curl and not yet recorded. */
typedef struct OutboxJob
{
	MemoryContext cxt;			/* holds this struct and its response */
	int64		id;
	JobKind		kind;
	char	   *account;
	int			attempts;
	bool		fresh_credentials;	/* asked the provider for new ones */
	CrmpayHttpResponse response;	/* once finished */
	struct OutboxJob *next;		/* in the finished list */
} OutboxJob;

/* A claimed row, before it is prepared. */
typedef struct Claimed
{
	int64		id;
	JobKind		kind;
	char	   *account;
	bool		has_payment;
	Datum		payload;		/* jsonb */
	int			attempts;
	int			last_status;	/* HTTP status of the previous attempt, 0 if none */
} Claimed;

static MemoryContext jobs_cxt = NULL;	/* parent of the jobs' contexts */
static MemoryContext pass_cxt = NULL;	/* reset every iteration */
static CrmpayMulti *multi = NULL;
static int	in_flight = 0;		/* jobs handed to curl and not finished */
static OutboxJob *finished_head = NULL;
static OutboxJob *finished_tail = NULL;
static int	nfinished = 0;
static bool release_pending = true; /* free the leases of an earlier worker */
static TimestampTz next_retry = 0;	/* earliest retry recorded while busy */
static TimestampTz last_cleanup = 0;
static MemoryContext tx_callercxt = NULL;

/* ----------------------------------------------------------------
 * Statements (saved plans, parameters only)
 * ----------------------------------------------------------------
 */
enum
{
	PLAN_RELEASE,
	PLAN_PROBE,
	PLAN_CLAIM,
	PLAN_CLAIM_ACCOUNT,
	PLAN_MATERIALIZE,
	PLAN_LINK_CREATED,
	PLAN_CAPTURE_REQUEST,
	PLAN_CAPTURED,
	PLAN_DONE,
	PLAN_FAILED,
	PLAN_NEXT_DUE,
	PLAN_CLEANUP,
	NUM_PLANS
};

#define CLAIM_RETURNING \
	" RETURNING j.id, j.kind::text, j.account, j.payment_id IS NOT NULL, j.payload," \
	"           j.attempts, j.last_http_status"

static SPIPlanPtr plans[NUM_PLANS];

static SPIPlanPtr
outbox_plan(int which)
{
	static const struct
	{
		const char *sql;
		int			nargs;
		Oid			types[6];
	}			defs[NUM_PLANS] = {
		/* the database has one worker: at its start no job is really running */
		[PLAN_RELEASE] = {
			"UPDATE crmpay.jobs SET state = 'queued', run_at = now(), updated_at = now()"
			" WHERE state = 'running'",
			0, {0}
		},
		/*
		 * Open circuits whose cool-down is over get one trial job (a gateway
		 * call: any kind but send_email).  (OFFSET 0
		 * keeps EXISTS a per-circuit subquery: as a join it would read every
		 * queued job on each claim, though there is rarely an open circuit.)
		 */
		[PLAN_PROBE] = {
			"UPDATE crmpay.circuits c SET state = 'half_open', open_until = now() + make_interval(secs => $1)"
			" WHERE c.state IN ('open', 'half_open') AND c.open_until <= now()"
			"   AND EXISTS (SELECT 1 FROM crmpay.jobs j WHERE j.account = c.account"
			"                 AND j.kind <> 'send_email' AND j.state IN ('queued', 'running')"
			"                 AND j.run_at <= now() OFFSET 0)"
			" RETURNING c.account",
			1, {FLOAT8OID}
		},
		/* due jobs (and expired leases), oldest first, no gateway call of an open circuit */
		[PLAN_CLAIM] = {
			"WITH due AS ("
			"  SELECT j.id FROM crmpay.jobs j"
			"   WHERE j.state IN ('queued', 'running') AND j.run_at <= now()"
			"     AND (j.kind = 'send_email' OR NOT EXISTS ("
			"            SELECT 1 FROM crmpay.circuits c"
			"             WHERE c.account = j.account AND c.state <> 'closed'))"
			"   ORDER BY j.run_at, j.id LIMIT $1"
			"   FOR UPDATE OF j SKIP LOCKED)"
			" UPDATE crmpay.jobs j SET state = 'running', attempts = j.attempts + 1,"
			"        run_at = now() + make_interval(secs => $2), updated_at = now()"
			"   FROM due WHERE j.id = due.id"
			CLAIM_RETURNING,
			2, {INT4OID, FLOAT8OID}
		},
		[PLAN_CLAIM_ACCOUNT] = {
			"WITH due AS ("
			"  SELECT j.id FROM crmpay.jobs j"
			"   WHERE j.state IN ('queued', 'running') AND j.run_at <= now()"
			"     AND j.kind <> 'send_email' AND j.account = $3"
			"   ORDER BY j.run_at, j.id LIMIT $1"
			"   FOR UPDATE OF j SKIP LOCKED)"
			" UPDATE crmpay.jobs j SET state = 'running', attempts = j.attempts + 1,"
			"        run_at = now() + make_interval(secs => $2), updated_at = now()"
			"   FROM due WHERE j.id = due.id"
			CLAIM_RETURNING,
			3, {INT4OID, FLOAT8OID, TEXTOID}
		},
		[PLAN_MATERIALIZE] = {
			"SELECT crmpay._materialize_order($1)",
			1, {INT8OID}
		},
		[PLAN_LINK_CREATED] = {
			"SELECT crmpay._job_link_created($1, $2::jsonb)",
			2, {INT8OID, TEXTOID}
		},
		[PLAN_CAPTURE_REQUEST] = {
			"SELECT crmpay._capture_job_request($1)",
			1, {INT8OID}
		},
		[PLAN_CAPTURED] = {
			"SELECT crmpay._job_captured($1, $2::jsonb)",
			2, {INT8OID, TEXTOID}
		},
		[PLAN_DONE] = {
			"UPDATE crmpay.jobs SET state = 'done', finished_at = now(), updated_at = now(),"
			"       last_error = NULL, last_error_code = NULL, last_http_status = NULL"
			" WHERE id = $1 AND state = 'running'",
			1, {INT8OID}
		},
		[PLAN_FAILED] = {
			"SELECT crmpay._job_failed($1, $2, $3, $4, $5, $6)",
			6, {INT8OID, TIMESTAMPTZOID, TEXTOID, TEXTOID, INT4OID, BOOLOID}
		},
		/* when the next job is due (or a circuit's cool-down ends) */
		[PLAN_NEXT_DUE] = {
			"SELECT least((SELECT j.run_at FROM crmpay.jobs j"
			"               WHERE j.state IN ('queued', 'running')"
			"                 AND (j.kind = 'send_email' OR NOT EXISTS ("
			"                        SELECT 1 FROM crmpay.circuits c"
			"                         WHERE c.account = j.account AND c.state <> 'closed'))"
			"               ORDER BY j.run_at LIMIT 1),"
			"             (SELECT min(c.open_until) FROM crmpay.circuits c WHERE c.state <> 'closed'))",
			0, {0}
		},
		[PLAN_CLEANUP] = {
			"DELETE FROM crmpay.jobs WHERE id IN ("
			"  SELECT id FROM crmpay.jobs"
			"   WHERE state = 'done' AND finished_at < now() - make_interval(secs => $1)"
			"   ORDER BY finished_at LIMIT 10000)",
			1, {FLOAT8OID}
		},
	};

	return crmpay_saved_plan(&plans[which], defs[which].sql, defs[which].nargs,
							 defs[which].types);
}

static void
run_plan(int which, Datum *values, const char *nulls, int expected)
{
	int			rc = SPI_execute_plan(outbox_plan(which), values, nulls, false, 0);

	if (rc != expected)
		elog(ERROR, "crmpay: outbox statement %d failed: %s", which, SPI_result_code_string(rc));
}

/* ----------------------------------------------------------------
 * Transactions and subtransactions of the worker
 * ----------------------------------------------------------------
 */

/*
 * Starts a transaction and connects SPI, reporting the activity; false
 * (with no transaction left open) when crmpay is not installed in this
 * database, or no longer (DROP EXTENSION): the worker then stays idle.
 */
static bool
begin_tx(const char *activity)
{
	tx_callercxt = CurrentMemoryContext;
	crmpay_worker_report(activity);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (!OidIsValid(get_extension_oid("crmpay", true)))
	{
		PopActiveSnapshot();
		CommitTransactionCommand();
		MemoryContextSwitchTo(tx_callercxt);
		return false;
	}
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "crmpay: SPI_connect failed");
	return true;
}

static void
end_tx(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(tx_callercxt);
	pgstat_report_stat(false);
}

/* "message (DETAIL: ...)" of an error, for a job's last_error. */
static char *
error_text(ErrorData *edata)
{
	if (edata->detail)
		return psprintf("%s (%s)", edata->message, edata->detail);
	return pstrdup(edata->message ? edata->message : "unknown error");
}

/*
 * Runs fn(arg) in a subtransaction.  On error the subtransaction is
 * rolled back and false returned with the error in *edata (allocated in
 * the caller's memory context); the enclosing transaction goes on.
 */
static bool
in_subxact(void (*fn) (void *), void *arg, ErrorData **edata)
{
	MemoryContext callercxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool ok = true;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(callercxt);
	PG_TRY();
	{
		fn(arg);
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(callercxt);
		*edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(callercxt);
	CurrentResourceOwner = owner;
	return ok;
}

/* ----------------------------------------------------------------
 * Recording failures: backoff, dead letters
 * ----------------------------------------------------------------
 */

/*
 * When to try a failed job again: attempt n waits a random time in
 * [0, min(retry_max_delay, retry_base_delay * 2^(n-1))] (full jitter), or
 * at least retry_after_s when the gateway said so.  0 means dead: out of
 * attempts.
 */
static TimestampTz
retry_time(int attempts, int retry_after_s)
{
	double		ceiling;
	double		delay_ms;

	if (attempts >= crmpay_max_attempts)
		return 0;
	ceiling = crmpay_retry_base_delay_ms * pow(2.0, Min(Max(attempts - 1, 0), 40));
	ceiling = Min(ceiling, (double) crmpay_retry_max_delay_ms);
	delay_ms = pg_prng_double(&pg_global_prng_state) * ceiling;
	if (retry_after_s >= 0)
		delay_ms = Max(delay_ms, retry_after_s * 1000.0);
	return TimestampTzPlusMilliseconds(GetCurrentTimestamp(), (int64) delay_ms);
}

typedef struct Failure
{
	int64		id;
	int			attempts;
	bool		retryable;
	int			retry_after_s;	/* -1: none */
	const char *error;
	const char *code;
	int			http_status;	/* 0: none */
	bool		counts;			/* against the account's circuit */
} Failure;

static void
record_failure(void *arg)
{
	Failure    *f = arg;
	TimestampTz retry_at = f->retryable ? retry_time(f->attempts, f->retry_after_s) : 0;
	Datum		values[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};

	values[0] = Int64GetDatum(f->id);
	values[1] = TimestampTzGetDatum(retry_at);
	nulls[1] = retry_at ? ' ' : 'n';
	values[2] = CStringGetTextDatum(f->error);
	values[3] = f->code ? CStringGetTextDatum(f->code) : (Datum) 0;
	nulls[3] = f->code ? ' ' : 'n';
	values[4] = Int32GetDatum(f->http_status);
	nulls[4] = f->http_status ? ' ' : 'n';
	values[5] = BoolGetDatum(f->counts);
	run_plan(PLAN_FAILED, values, nulls, SPI_OK_SELECT);
	if (retry_at != 0 && (next_retry == 0 || retry_at < next_retry))
		next_retry = retry_at;
}

/* Records a failure of a job whose own step failed with an ERROR. */
static void
record_error(int64 id, int attempts, bool retryable, const char *prefix, ErrorData *edata)
{
	Failure		f = {0};
	ErrorData  *again;

	f.id = id;
	f.attempts = attempts;
	f.retryable = retryable;
	f.retry_after_s = -1;
	f.error = psprintf("%s%s", prefix, error_text(edata));
	f.code = unpack_sql_state(edata->sqlerrcode);
	if (!in_subxact(record_failure, &f, &again))
		ereport(WARNING,
				(errmsg("crmpay: could not record the failure of job " INT64_FORMAT ": %s",
						id, again->message),
				 errdetail("The job stays claimed until its lease ends; then it is tried again.")));
}

/* ----------------------------------------------------------------
 * Claim
 * ----------------------------------------------------------------
 */
typedef struct Prepare
{
	Claimed    *claimed;
	OutboxJob  *job;
	bool		sent;			/* handed to curl; else nothing to send */
	bool		retryable;		/* whether an error here may go away */
} Prepare;

/*
 * Reads the jsonb of a one-column SELECT's result; false when it is NULL
 * (the job needs no request: done).
 */
static bool
plan_jsonb(int which, int64 id, Datum *out)
{
	Datum		values[1] = {Int64GetDatum(id)};
	bool		isnull;

	run_plan(which, values, NULL, SPI_OK_SELECT);
	*out = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		run_plan(PLAN_DONE, values, NULL, SPI_OK_UPDATE);
	return !isnull;
}

/* Prepares one claimed e-mail job and hands its message to curl. */
static void
prepare_email(Claimed *c, OutboxJob *job, Prepare *p)
{
	CrmpaySmtpRequest smtp;
	CrmpayJson *payload;
	MemoryContext oldcxt;

	if (crmpay_smtp_url == NULL || crmpay_smtp_url[0] == '\0')
	{
		p->retryable = true;	/* configuration may come */
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("crmpay.smtp_url is not set"),
				 errhint("Set crmpay.smtp_url (e.g. smtps://mail.example.com:465) and reload.")));
	}
	oldcxt = MemoryContextSwitchTo(job->cxt);
	payload = crmpay_json_from_jsonb_datum(c->payload);
	smtp.url = crmpay_smtp_url;
	smtp.mail_from = crmpay_json_str(payload, "from");
	smtp.rcpt_to = crmpay_json_str(payload, "to");
	smtp.message = crmpay_email_build(payload, c->id, &smtp.message_len);
	crmpay_multi_add_smtp(multi, &smtp, (int64) (intptr_t) job);
	MemoryContextSwitchTo(oldcxt);
	p->sent = true;
}

/* Prepares one claimed job and hands its request to curl (in a subtransaction). */
static void
prepare_job(void *arg)
{
	Prepare    *p = arg;
	Claimed    *c = p->claimed;
	OutboxJob  *job = p->job;
	MemoryContext oldcxt;
	CrmpayAccount *account;
	CrmpayHttpRequest http;
	CrmpayGatewayFailure failure;
	Datum		request = c->payload;

	p->retryable = false;
	p->sent = false;
	if (c->kind == JOB_SEND_EMAIL)
	{
		prepare_email(c, job, p);
		return;
	}
	/* an order's job first gets its payment; a capture reads its payment */
	if (c->kind == JOB_CREATE_LINK && !c->has_payment &&
		!plan_jsonb(PLAN_MATERIALIZE, c->id, &request))
		return;					/* the order has its link already */
	if (c->kind == JOB_CAPTURE && !plan_jsonb(PLAN_CAPTURE_REQUEST, c->id, &request))
		return;					/* captured already */

	oldcxt = MemoryContextSwitchTo(job->cxt);
	account = crmpay_load_account(c->account, true);
	if (account == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("payment account \"%s\" does not exist", c->account)));
	if (c->kind == JOB_CAPTURE)
		crmpay_capture_prepare(account,
							   crmpay_capture_request_from_json(crmpay_json_from_jsonb_datum(request)),
							   &http);
	else
	{
		CrmpayLinkResult result;

		if (crmpay_link_prepare(account,
								crmpay_link_request_from_json(crmpay_json_from_jsonb_datum(request)),
								&http, &result))
		{
			/* made without a gateway call (a signed form): nothing to send */
			Datum		values[2];

			values[0] = Int64GetDatum(c->id);
			values[1] = CStringGetTextDatum(crmpay_link_result_json(&result));
			run_plan(PLAN_LINK_CREATED, values, NULL, SPI_OK_SELECT);
			MemoryContextSwitchTo(oldcxt);
			return;
		}
	}
	if (account->provider->authorize != NULL)
	{
		/*
		 * The provider's credentials (an OAuth token, shared through the
		 * database); new ones when the last attempt got a 401.
		 */
		job->fresh_credentials = (c->last_status == 401);
		if (!account->provider->authorize(account, &http, job->fresh_credentials, &failure))
		{
			p->retryable = failure.retryable;
			crmpay_raise_gateway_failure(account, &failure);
		}
	}
	crmpay_multi_add_http(multi, &http, (int64) (intptr_t) job);
	MemoryContextSwitchTo(oldcxt);
	p->sent = true;
}

/* The kind of a job from its crmpay.job_kind. */
static JobKind
job_kind(const char *kind)
{
	if (strcmp(kind, "send_email") == 0)
		return JOB_SEND_EMAIL;
	if (strcmp(kind, "capture") == 0)
		return JOB_CAPTURE;
	return JOB_CREATE_LINK;
}

/* Copies the rows of the last claim statement. */
static List *
claimed_rows(List *rows)
{
	uint64		i;

	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		Claimed    *c = palloc0(sizeof(Claimed));
		bool		isnull;

		c->id = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
		c->kind = job_kind(SPI_getvalue(tuple, desc, 2));
		c->account = SPI_getvalue(tuple, desc, 3);
		c->has_payment = DatumGetBool(SPI_getbinval(tuple, desc, 4, &isnull));
		c->payload = datumCopy(SPI_getbinval(tuple, desc, 5, &isnull), false, -1);
		c->attempts = DatumGetInt32(SPI_getbinval(tuple, desc, 6, &isnull));
		c->last_status = DatumGetInt32(SPI_getbinval(tuple, desc, 7, &isnull));
		if (isnull)
			c->last_status = 0;
		rows = lappend(rows, c);
	}
	return rows;
}

/*
 * The lease of a claimed job: crmpay.job_lease, but never shorter than its
 * request may take, counting the wait for a connection to its host (at
 * worst max_concurrent_requests / max_host_connections requests ahead of
 * it), so that a live worker's job is never claimed a second time.
 */
static double
lease_seconds(void)
{
	double		rounds = ceil((double) crmpay_max_concurrent_requests /
							  Max(1, Min(crmpay_max_host_connections, crmpay_max_concurrent_requests)));

	return Max((double) crmpay_job_lease_s,
			   rounds * (crmpay_request_timeout_ms + crmpay_connect_timeout_ms) / 1000.0 + 60.0);
}

/*
 * claim_jobs
 *		Claims up to want due jobs and hands them to curl.  Returns how many
 *		rows were claimed (fewer than want: nothing more is due now), or -1
 *		when crmpay is not installed in this database.
 */
static int
claim_jobs(int want)
{
	MemoryContext callercxt = CurrentMemoryContext;
	List	   *rows = NIL;
	List	   *probes = NIL;
	ListCell   *lc;
	Datum		values[3];
	uint64		i;
	int			claimed;

	if (!begin_tx("crmpay worker: claiming jobs"))
		return -1;
	if (release_pending)
	{
		run_plan(PLAN_RELEASE, NULL, NULL, SPI_OK_UPDATE);
		if (SPI_processed > 0)
			ereport(LOG,
					(errmsg("crmpay worker: claiming again " UINT64_FORMAT " job(s) left running by an earlier worker",
							SPI_processed),
					 errdetail("Their requests repeat the same idempotency keys, so no gateway object is created twice.")));
		release_pending = false;
	}

	values[0] = Float8GetDatum(lease_seconds());
	run_plan(PLAN_PROBE, values, NULL, SPI_OK_UPDATE_RETURNING);
	for (i = 0; i < SPI_processed; i++)
		probes = lappend(probes, MemoryContextStrdup(callercxt,
													 SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1)));
	foreach(lc, probes)
	{
		values[0] = Int32GetDatum(1);
		values[1] = Float8GetDatum(lease_seconds());
		values[2] = CStringGetTextDatum(lfirst(lc));
		run_plan(PLAN_CLAIM_ACCOUNT, values, NULL, SPI_OK_UPDATE_RETURNING);
		MemoryContextSwitchTo(callercxt);
		rows = claimed_rows(rows);
	}
	if (list_length(rows) < want)
	{
		values[0] = Int32GetDatum(want - list_length(rows));
		values[1] = Float8GetDatum(lease_seconds());
		run_plan(PLAN_CLAIM, values, NULL, SPI_OK_UPDATE_RETURNING);
		MemoryContextSwitchTo(callercxt);
		rows = claimed_rows(rows);
	}
	MemoryContextSwitchTo(callercxt);
	claimed = list_length(rows);
	/*
	 * Commit the claim (and its attempt) before preparing anything: should
	 * a job make the worker die while it is prepared, it has used up one
	 * attempt, and it cannot make the server restart in a loop.
	 */
	end_tx();
	if (claimed == 0)
		return 0;

	if (!begin_tx("crmpay worker: preparing requests"))
		return -1;
	foreach(lc, rows)
	{
		Claimed    *c = lfirst(lc);
		MemoryContext cxt;
		OutboxJob  *job;
		Prepare		p = {c, NULL, false, false};
		ErrorData  *edata;

		if (c->attempts > crmpay_max_attempts)
		{
			/* claimed that often without an outcome: it stops its worker */
			Failure		f = {0};

			f.id = c->id;
			f.attempts = c->attempts;
			f.retry_after_s = -1;
			f.error = psprintf("claimed %d times without an outcome: the worker stopped while it was in flight",
							   c->attempts - 1);
			f.code = unpack_sql_state(ERRCODE_INTERNAL_ERROR);
			if (!in_subxact(record_failure, &f, &edata))
				elog(ERROR, "crmpay: could not record job " INT64_FORMAT " as dead: %s",
					 c->id, edata->message);
			continue;
		}
		cxt = AllocSetContextCreate(jobs_cxt, "crmpay job", ALLOCSET_SMALL_SIZES);
		job = MemoryContextAllocZero(cxt, sizeof(OutboxJob));
		p.job = job;
		job->cxt = cxt;
		job->id = c->id;
		job->kind = c->kind;
		job->account = MemoryContextStrdup(cxt, c->account);
		job->attempts = c->attempts;
		if (!in_subxact(prepare_job, &p, &edata))
		{
			record_error(c->id, c->attempts, p.retryable,
						 c->kind == JOB_SEND_EMAIL ? "could not prepare the e-mail: " : "", edata);
			MemoryContextDelete(cxt);
		}
		else if (p.sent)
			in_flight++;
		else
			MemoryContextDelete(cxt);
	}
	end_tx();
	return claimed;
}

/* ----------------------------------------------------------------
 * Record
 * ----------------------------------------------------------------
 */

/* Moves finished transfers to the finished list, responses in their jobs' memory. */
static void
collect_finished(void)
{
	int64		tag;

	while (crmpay_multi_peek_done(multi, &tag))
	{
		OutboxJob  *job = (OutboxJob *) (intptr_t) tag;
		MemoryContext oldcxt = MemoryContextSwitchTo(job->cxt);

		crmpay_multi_next_done(multi, &tag, &job->response);
		MemoryContextSwitchTo(oldcxt);
		in_flight--;
		job->next = NULL;
		if (finished_tail)
			finished_tail->next = job;
		else
			finished_head = job;
		finished_tail = job;
		nfinished++;
	}
}

/* Whether a gateway failure of this kind says something about the account. */
static bool
failure_counts(CrmpayFailureKind kind)
{
	return kind == CRMPAY_FAIL_AUTH || kind == CRMPAY_FAIL_RATE_LIMITED ||
		kind == CRMPAY_FAIL_UNAVAILABLE || kind == CRMPAY_FAIL_TRANSPORT ||
		kind == CRMPAY_FAIL_BAD_RESPONSE;
}

/* Records one finished job (in a subtransaction). */
static void
record_outcome(void *arg)
{
	OutboxJob  *job = arg;
	CrmpayHttpResponse *response = &job->response;
	Failure		f = {0};
	Datum		values[2];

	f.id = job->id;
	f.attempts = job->attempts;
	f.retry_after_s = -1;
	values[0] = Int64GetDatum(job->id);

	if (job->kind == JOB_SEND_EMAIL)
	{
		if (response->transport == CRMPAY_TRANSPORT_OK)
		{
			run_plan(PLAN_DONE, values, NULL, SPI_OK_UPDATE);
			return;
		}
		/* 5xx replies are permanent refusals; 4xx and transport failures pass */
		f.retryable = !(response->status >= 500 && response->status < 600);
		f.http_status = (int) response->status;
		f.code = response->status ? psprintf("smtp_%ld", response->status)
			: crmpay_transport_name(response->transport);
		f.error = psprintf("SMTP delivery failed%s%s: %s",
						   response->status ? psprintf(" (reply %ld)", response->status) : "",
						   f.retryable ? "" : ", refused for good",
						   response->error ? response->error : crmpay_transport_name(response->transport));
		record_failure(&f);
		return;
	}
	else
	{
		CrmpayAccount *account = crmpay_load_account(job->account, true);
		CrmpayGatewayFailure failure;

		if (account == NULL)
		{
			f.retryable = false;
			f.error = psprintf("payment account \"%s\" no longer exists", job->account);
			f.code = unpack_sql_state(ERRCODE_UNDEFINED_OBJECT);
			record_failure(&f);
			return;
		}
		if (job->kind == JOB_CAPTURE)
		{
			CrmpayCaptureResult result;

			if (crmpay_capture_finish(account, response, &result, &failure))
			{
				values[1] = CStringGetTextDatum(crmpay_capture_result_json(&result));
				run_plan(PLAN_CAPTURED, values, NULL, SPI_OK_SELECT);
				return;
			}
		}
		else
		{
			CrmpayLinkResult result;

			if (crmpay_link_finish(account, response, &result, &failure))
			{
				values[1] = CStringGetTextDatum(crmpay_link_result_json(&result));
				run_plan(PLAN_LINK_CREATED, values, NULL, SPI_OK_SELECT);
				return;
			}
		}
		f.retryable = failure.retryable;
		/* a 401 to credentials that may just have expired: once more with new ones */
		if (failure.kind == CRMPAY_FAIL_AUTH && failure.http_status == 401 &&
			account->provider->authorize != NULL && !job->fresh_credentials)
			f.retryable = true;
		if (failure.http_status == 429 || failure.http_status == 503)
			f.retry_after_s = failure.retry_after;
		f.error = crmpay_describe_failure(account, &failure);
		f.code = failure.code ? failure.code : crmpay_failure_kind_name(failure.kind);
		f.http_status = failure.http_status;
		f.counts = failure_counts(failure.kind);
		record_failure(&f);
	}
}

/* Records up to OUTBOX_BATCH finished jobs in one transaction. */
static void
record_finished(void)
{
	int			n = 0;

	if (!begin_tx(psprintf("crmpay worker: recording %d outcome(s), %d request(s) in flight",
						   Min(nfinished, OUTBOX_BATCH), in_flight)))
	{
		/* crmpay was dropped meanwhile: nothing left to record into */
		while (finished_head != NULL)
		{
			OutboxJob  *job = finished_head;

			finished_head = job->next;
			MemoryContextDelete(job->cxt);
		}
		finished_tail = NULL;
		nfinished = 0;
		return;
	}
	while (finished_head != NULL && n < OUTBOX_BATCH)
	{
		OutboxJob  *job = finished_head;
		ErrorData  *edata;

		finished_head = job->next;
		if (finished_head == NULL)
			finished_tail = NULL;
		nfinished--;
		n++;
		/* a failure to record is retried: the gateway call is idempotent */
		if (!in_subxact(record_outcome, job, &edata))
			record_error(job->id, job->attempts, true, "could not record the outcome: ", edata);
		MemoryContextDelete(job->cxt);
	}
	end_tx();
}

/* ----------------------------------------------------------------
 * The loop
 * ----------------------------------------------------------------
 */
static void
outbox_exit(int code, Datum arg)
{
	crmpay_multi_destroy(multi);
	multi = NULL;
}

/* Called once when the worker starts. */
void
crmpay_outbox_init(void)
{
	jobs_cxt = AllocSetContextCreate(TopMemoryContext, "crmpay jobs in flight",
									 ALLOCSET_DEFAULT_SIZES);
	pass_cxt = AllocSetContextCreate(TopMemoryContext, "crmpay worker loop",
									 ALLOCSET_DEFAULT_SIZES);
	multi = crmpay_multi_create(crmpay_max_concurrent_requests, crmpay_max_host_connections);
	on_proc_exit(outbox_exit, (Datum) 0);
	release_pending = true;
}

/* After a configuration reload. */
void
crmpay_outbox_reconfigure(void)
{
	crmpay_multi_set_limits(multi, crmpay_max_concurrent_requests, crmpay_max_host_connections);
}

/*
 * After an ERROR outside a job's handling: drops every transfer and job in
 * flight; their jobs are claimed again (same idempotency keys).
 */
void
crmpay_outbox_reset(void)
{
	crmpay_multi_abort_all(multi);
	MemoryContextReset(jobs_cxt);
	finished_head = finished_tail = NULL;
	nfinished = 0;
	in_flight = 0;
	next_retry = 0;
	release_pending = true;
}

/*
 * How long to sleep when there is nothing to do: until the next job is
 * due or a circuit's cool-down ends (at most 10 minutes, the housekeeping
 * interval); -1 for "until woken" (crmpay not installed).  Also deletes
 * old finished jobs (crmpay.job_retention) every 10 minutes.
 */
static long
idle_sleep_ms(void)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz due = 0;
	bool		isnull;
	Datum		d;
	long		ms = 600000;

	if (!begin_tx("crmpay worker: looking for the next due job"))
		return -1;
	run_plan(PLAN_NEXT_DUE, NULL, NULL, SPI_OK_SELECT);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (!isnull)
		due = DatumGetTimestampTz(d);
	if (crmpay_job_retention_s > 0 && TimestampDifferenceExceeds(last_cleanup, now, 600000))
	{
		Datum		values[1] = {Float8GetDatum((double) crmpay_job_retention_s)};

		crmpay_worker_report("crmpay worker: deleting old finished jobs");
		run_plan(PLAN_CLEANUP, values, NULL, SPI_OK_DELETE);
		last_cleanup = now;
	}
	end_tx();
	if (due != 0)
		ms = Min(ms, Max(0, (long) ((due - now) / 1000) + 1));
	return ms;
}

/*
 * crmpay_outbox_run
 *		Runs the pipeline (claim, send, record) until nothing is in flight,
 *		nothing finished waits to be recorded and no more job is due.
 *		Returns how long the worker may sleep (see idle_sleep_ms).
 */
long
crmpay_outbox_run(void)
{
	bool		want_claim = true;

	for (;;)
	{
		int			free_slots;
		bool		claim_now;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			crmpay_outbox_reconfigure();
		}
		MemoryContextReset(pass_cxt);
		MemoryContextSwitchTo(pass_cxt);

		/* woken (new work committed) or a retry came due */
		if (MyLatch->is_set)
		{
			ResetLatch(MyLatch);
			want_claim = true;
		}
		if (!want_claim && next_retry != 0 && GetCurrentTimestamp() >= next_retry)
		{
			want_claim = true;
			next_retry = 0;
		}

		/* refill the pipeline in batches, not one request at a time */
		free_slots = crmpay_max_concurrent_requests - in_flight;
		claim_now = want_claim && free_slots > 0 &&
			(in_flight == 0 || free_slots >= Max(1, crmpay_max_concurrent_requests / 8));
		if (claim_now)
		{
			int			asked = Min(free_slots, OUTBOX_CLAIM_BATCH);
			int			got = claim_jobs(asked);

			if (got < 0)
			{
				crmpay_outbox_reset();
				MemoryContextSwitchTo(TopMemoryContext);
				return -1;
			}
			if (got < asked)
				want_claim = false;
			/* send the new requests before spending time on recording */
			crmpay_multi_run(multi, 0);
			collect_finished();
		}

		if (nfinished > 0)
			record_finished();

		if (in_flight > 0)
		{
			/* wait for the network only when there is nothing else to do */
			bool		busy = nfinished > 0 ||
				(want_claim && crmpay_max_concurrent_requests - in_flight >= Max(1, crmpay_max_concurrent_requests / 8));

			crmpay_worker_report(psprintf("crmpay worker: %d request(s) in flight", in_flight));
			crmpay_multi_run(multi, busy ? 0 : 10);
			collect_finished();
		}
		if (in_flight == 0 && nfinished == 0 && !want_claim)
			break;
	}
	MemoryContextSwitchTo(pass_cxt);
	{
		long		ms = idle_sleep_ms();

		MemoryContextSwitchTo(TopMemoryContext);
		MemoryContextReset(pass_cxt);
		return ms;
	}
}
