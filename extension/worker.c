/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The background workers that drain the outbox (crmpay.jobs), and how
 *	  backends wake them.
 *
 *	  With shared_preload_libraries = 'crmpay' and crmpay.database naming
 *	  one or more databases, the postmaster starts a launcher (after
 *	  recovery, so only on a primary).  The launcher connects to no
 *	  database; it starts one worker per listed database that exists and
 *	  accepts connections, and starts it again when it exits (1 s after a
 *	  worker that ran a while, backing off up to 60 s after one that keeps
 *	  failing at once).  The worker of a database runs the outbox (see
 *	  outbox.c).  Both appear in pg_stat_activity as "crmpay launcher" /
 *	  "crmpay worker" (backend_type and application_name), the worker with
 *	  what it is doing as its query.
 *
 *	  Signals: SIGTERM ends either process (the launcher is restarted by
 *	  the postmaster, a worker by the launcher); SIGHUP reloads the
 *	  configuration; SIGUSR1 is core's procsignal handler, so a worker
 *	  answers the barrier that DROP DATABASE of any database waits for.
 *	  Both exit when the postmaster dies.
 *
 *	  Waking: a transaction that queues work calls
 *	  crmpay_wake_worker_at_commit(); at COMMIT (never before, never on
 *	  ROLLBACK) an XactCallback sets the latch of its database's worker.
 *	  The worker otherwise sleeps until the next job is due; it does not
 *	  poll.
 *
 *	  DROP DATABASE of a database with a worker: a ProcessUtility hook stops
 *	  the worker first (and holds the launcher off until the transaction
 *	  ends), so the drop neither fails with "being accessed by other users"
 *	  nor leaves a worker trying to reconnect to a dropped database.
 *
 *	  Shared memory holds values only (process ids, PGPROC numbers, OIDs,
 *	  names), never a pointer into a process's memory.
 *
 *-------------------------------------------------------------------------
 */
#include "crmpay.h"

#include <signal.h>
#include <unistd.h>

#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/backend_status.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"
#include "utils/wait_event.h"

#include "http.h"
#include "reconcile.h"
#include "worker.h"

/* The most databases crmpay.database may list. */
#define CRMPAY_MAX_DATABASES 64

char	   *crmpay_databases = NULL;
int			crmpay_max_concurrent_requests = 32;
int			crmpay_max_host_connections = 16;
int			crmpay_retry_base_delay_ms = 1000;
int			crmpay_retry_max_delay_ms = 600000;
int			crmpay_max_attempts = 10;
int			crmpay_circuit_failure_threshold = 5;
int			crmpay_circuit_cooldown_s = 30;
int			crmpay_job_lease_s = 300;
int			crmpay_job_retention_s = 7 * 24 * 3600;
char	   *crmpay_smtp_url = NULL;
static int	crmpay_alert_rejected_webhooks = 20;
static int	crmpay_alert_window_s = 300;

/* One listed database and its worker. */
typedef struct CrmpayDbSlot
{
	char		dbname[NAMEDATALEN];
	pid_t		pid;			/* its worker, 0 when none runs */
	int			pgprocno;		/* the worker's PGPROC number, while pid != 0 */
	Oid			dboid;			/* set by the worker once connected */
	pid_t		hold_by;		/* backend dropping the database, or 0 */
	bool		told_to_stop;	/* the last worker exited on SIGTERM */
} CrmpayDbSlot;

typedef struct CrmpayShared
{
	slock_t		mutex;			/* protects everything below */
	pid_t		launcher_pid;
	int			launcher_pgprocno;
	int			ndatabases;
	CrmpayDbSlot slots[CRMPAY_MAX_DATABASES];
} CrmpayShared;

static CrmpayShared *shared = NULL;

/* crmpay.database as parsed in the postmaster (inherited by its children) */
static int	ndatabases = 0;
static char database_names[CRMPAY_MAX_DATABASES][NAMEDATALEN];

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static ProcessUtility_hook_type prev_ProcessUtility = NULL;

/* this backend's pending wake-ups and DROP DATABASE hold */
/* Loop state of a database worker (statics: they survive an error's longjmp). */
static int	wait_events = WL_LATCH_SET;	/* what woke the last wait */
static TimestampTz next_outbox_pass = 0;	/* when the outbox must run next */

static bool xact_callback_registered = false;
static bool wake_worker_pending = false;
static bool wake_launcher_pending = false;
static bool hold_pending = false;

PGDLLEXPORT void crmpay_launcher_main(Datum main_arg);
PGDLLEXPORT void crmpay_worker_main(Datum main_arg);

/* ----------------------------------------------------------------
 * Configuration
 * ----------------------------------------------------------------
 */

/*
 * Splits crmpay.database into names (comma-separated, double quotes for
 * names with commas or spaces; case is kept).  False with a message in
 * *error when the list is malformed.
 */
static bool
parse_database_list(const char *value, List **names, char **error)
{
	char	   *copy = pstrdup(value ? value : "");
	List	   *list = NIL;
	ListCell   *lc;

	*names = NIL;
	if (!SplitGUCList(copy, ',', &list))
	{
		*error = "invalid list syntax";
		return false;
	}
	foreach(lc, list)
	{
		char	   *name = lfirst(lc);
		ListCell   *seen;
		bool		duplicate = false;

		if (name[0] == '\0')
		{
			*error = "empty database name";
			return false;
		}
		if (strlen(name) >= NAMEDATALEN)
		{
			*error = psprintf("database name \"%s\" is too long", name);
			return false;
		}
		foreach(seen, *names)
			if (strcmp(lfirst(seen), name) == 0)
				duplicate = true;
		if (!duplicate)
			*names = lappend(*names, name);
	}
	if (list_length(*names) > CRMPAY_MAX_DATABASES)
	{
		*error = psprintf("at most %d databases may be listed", CRMPAY_MAX_DATABASES);
		return false;
	}
	return true;
}

static bool
check_databases(char **newval, void **extra, GucSource source)
{
	List	   *names;
	char	   *error = NULL;

	if (!parse_database_list(*newval, &names, &error))
	{
		GUC_check_errdetail("crmpay.database: %s.", error);
		GUC_check_errhint("List database names separated by commas, e.g. 'crm' or 'crm, shop'.");
		return false;
	}
	return true;
}

static bool
check_smtp_url(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0' || crmpay_smtp_url_ok(*newval))
		return true;
	GUC_check_errdetail("crmpay.smtp_url must be an smtps:// or smtp:// URL.");
	GUC_check_errhint("For example smtps://mail.example.com:465, or smtp://mail.example.com:587 with STARTTLS.");
	return false;
}

/*
 * crmpay_worker_define_gucs
 *		The outbox's settings.  crmpay.database needs a restart; the rest
 *		are read by the running worker after a reload.
 */
void
crmpay_worker_define_gucs(void)
{
	/* a postmaster setting: defined only while preloading (worker_spi's rule) */
	if (process_shared_preload_libraries_in_progress)
		DefineCustomStringVariable("crmpay.database",
								   gettext_noop("Databases whose outbox a crmpay background worker drains (comma-separated)."),
								   gettext_noop("Needs shared_preload_libraries = 'crmpay'. One worker per database, plus a launcher; count them in max_worker_processes."),
								   &crmpay_databases,
								   "",
								   PGC_POSTMASTER,
								   GUC_SUPERUSER_ONLY | GUC_LIST_INPUT,
								   check_databases, NULL, NULL);

	DefineCustomIntVariable("crmpay.max_concurrent_requests",
							gettext_noop("Most gateway and SMTP requests a worker runs at once."),
							NULL,
							&crmpay_max_concurrent_requests,
							32, 1, 1024,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.max_host_connections",
							gettext_noop("Most concurrent requests (connections) a worker opens to one gateway host."),
							NULL,
							&crmpay_max_host_connections,
							16, 1, 1024,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.retry_base_delay",
							gettext_noop("Base of the exponential backoff between attempts of a job."),
							gettext_noop("Attempt n waits a random time between 0 and min(retry_max_delay, retry_base_delay * 2^(n-1)) (full jitter)."),
							&crmpay_retry_base_delay_ms,
							1000, 1, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.retry_max_delay",
							gettext_noop("Cap of the backoff between attempts of a job."),
							NULL,
							&crmpay_retry_max_delay_ms,
							600000, 1, 24 * 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.max_attempts",
							gettext_noop("Attempts after which a failing job is dead."),
							NULL,
							&crmpay_max_attempts,
							10, 1, 1000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.circuit_failure_threshold",
							gettext_noop("Consecutive gateway failures of an account that open its circuit."),
							gettext_noop("0 turns the circuit breaker off."),
							&crmpay_circuit_failure_threshold,
							5, 0, 1000000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.circuit_cooldown",
							gettext_noop("How long an open circuit pauses an account's requests before a trial call."),
							NULL,
							&crmpay_circuit_cooldown_s,
							30, 1, 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.job_lease",
							gettext_noop("How long a claimed job stays reserved for its worker."),
							gettext_noop("A job whose worker died is claimed again when its lease ends; keep it above crmpay.request_timeout."),
							&crmpay_job_lease_s,
							300, 10, 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.job_retention",
							gettext_noop("How long finished jobs are kept before the worker deletes them."),
							gettext_noop("0 keeps them. Dead jobs are always kept."),
							&crmpay_job_retention_s,
							7 * 24 * 3600, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomStringVariable("crmpay.smtp_url",
							   gettext_noop("SMTP server that e-mails payment links: smtps://host:465 or smtp://host:587 (STARTTLS required)."),
							   gettext_noop("Credentials may be given in the URL (smtps://user:password@host)."),
							   &crmpay_smtp_url,
							   NULL,
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   check_smtp_url, NULL, NULL);

	DefineCustomIntVariable("crmpay.alert_rejected_webhooks",
							gettext_noop("Rejected webhook deliveries of an account within crmpay.alert_window above which an alert is raised."),
							gettext_noop("0 turns the alert off."),
							&crmpay_alert_rejected_webhooks,
							20, 0, INT_MAX,
							PGC_SUSET, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.alert_window",
							gettext_noop("Window over which rejected webhook deliveries are counted for alerts."),
							NULL,
							&crmpay_alert_window_s,
							300, 1, 7 * 24 * 3600,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);
}

/* ----------------------------------------------------------------
 * Shared memory
 * ----------------------------------------------------------------
 */
static void
crmpay_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(CrmpayShared)));
}

static void
crmpay_shmem_startup(void)
{
	bool		found;
	int			i;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared = ShmemInitStruct("crmpay", sizeof(CrmpayShared), &found);
	if (!found)
	{
		memset(shared, 0, sizeof(CrmpayShared));
		SpinLockInit(&shared->mutex);
		shared->ndatabases = ndatabases;
		for (i = 0; i < ndatabases; i++)
			strlcpy(shared->slots[i].dbname, database_names[i], NAMEDATALEN);
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Sets the latch of a process known by its PGPROC number. */
static void
set_latch_of(int pgprocno)
{
	if (pgprocno >= 0)
		SetLatch(&GetPGProcByNumber(pgprocno)->procLatch);
}

static void
wake_launcher(void)
{
	int			pgprocno = -1;

	if (shared == NULL)
		return;
	SpinLockAcquire(&shared->mutex);
	if (shared->launcher_pid != 0)
		pgprocno = shared->launcher_pgprocno;
	SpinLockRelease(&shared->mutex);
	set_latch_of(pgprocno);
}

/* Wakes the worker of a database, if one runs. */
static void
wake_worker(Oid dboid)
{
	int			pgprocno = -1;
	int			i;

	if (shared == NULL)
		return;
	SpinLockAcquire(&shared->mutex);
	for (i = 0; i < shared->ndatabases; i++)
		if (shared->slots[i].pid != 0 && shared->slots[i].dboid == dboid)
			pgprocno = shared->slots[i].pgprocno;
	SpinLockRelease(&shared->mutex);
	set_latch_of(pgprocno);
}

/* ----------------------------------------------------------------
 * Waking at commit, and releasing DROP DATABASE holds
 * ----------------------------------------------------------------
 */
static void
release_holds(void)
{
	int			i;

	SpinLockAcquire(&shared->mutex);
	for (i = 0; i < shared->ndatabases; i++)
		if (shared->slots[i].hold_by == MyProcPid)
			shared->slots[i].hold_by = 0;
	SpinLockRelease(&shared->mutex);
}

static void
crmpay_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_worker_pending)
				wake_worker(MyDatabaseId);
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			break;
		default:
			return;
	}
	/* the transaction is over either way */
	wake_worker_pending = false;
	if (hold_pending)
	{
		hold_pending = false;
		release_holds();
		wake_launcher_pending = true;
	}
	if (wake_launcher_pending)
	{
		wake_launcher_pending = false;
		wake_launcher();
	}
}

static void
register_xact_callback(void)
{
	if (!xact_callback_registered)
	{
		RegisterXactCallback(crmpay_xact_callback, NULL);
		xact_callback_registered = true;
	}
}

/*
 * crmpay_wake_worker_at_commit
 *		Wakes this database's worker when the current transaction commits
 *		(nothing happens on rollback, or when no worker runs).
 */
void
crmpay_wake_worker_at_commit(void)
{
	if (shared == NULL)
		return;
	register_xact_callback();
	wake_worker_pending = true;
}

PG_FUNCTION_INFO_V1(crmpay_wake);

/* crmpay._wake() RETURNS void: crmpay_wake_worker_at_commit for SQL. */
Datum
crmpay_wake(PG_FUNCTION_ARGS)
{
	crmpay_wake_worker_at_commit();
	PG_RETURN_VOID();
}

/* ----------------------------------------------------------------
 * DROP DATABASE / CREATE DATABASE
 * ----------------------------------------------------------------
 */

/*
 * Before DROP DATABASE of a database that has a worker: holds the launcher
 * off it until this transaction ends and stops the worker, waiting (up to
 * 10 s) for it to go.  Only for a role allowed to drop the database.
 */
static void
stop_worker_for_drop(const char *dbname)
{
	int			i;
	int			slot = -1;
	Oid			dboid;
	pid_t		pid;
	TimestampTz deadline;

	for (i = 0; i < shared->ndatabases; i++)
		if (strcmp(shared->slots[i].dbname, dbname) == 0)
			slot = i;
	if (slot < 0)
		return;
	dboid = get_database_oid(dbname, true);
	if (!OidIsValid(dboid) || !pg_database_ownercheck(dboid, GetUserId()))
		return;

	register_xact_callback();
	SpinLockAcquire(&shared->mutex);
	shared->slots[slot].hold_by = MyProcPid;
	pid = shared->slots[slot].pid;
	SpinLockRelease(&shared->mutex);
	hold_pending = true;
	if (pid == 0)
		return;

	ereport(LOG,
			(errmsg("crmpay: stopping the worker of database \"%s\" (pid %d) for DROP DATABASE",
					dbname, (int) pid)));
	kill(pid, SIGTERM);
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 10000);
	for (;;)
	{
		pid_t		now_pid;

		SpinLockAcquire(&shared->mutex);
		now_pid = shared->slots[slot].pid;
		SpinLockRelease(&shared->mutex);
		if (now_pid != pid || GetCurrentTimestamp() >= deadline)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 10, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

static void
crmpay_process_utility(PlannedStmt *pstmt, const char *queryString,
					   bool readOnlyTree, ProcessUtilityContext context,
					   ParamListInfo params, QueryEnvironment *queryEnv,
					   DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	if (shared != NULL)
	{
		/* (DROP DATABASE refuses to run anywhere else) */
		if (IsA(parsetree, DropdbStmt) && context == PROCESS_UTILITY_TOPLEVEL &&
			!IsTransactionBlock())
			stop_worker_for_drop(((DropdbStmt *) parsetree)->dbname);
		else if (IsA(parsetree, CreatedbStmt) ||
				 (IsA(parsetree, RenameStmt) &&
				  ((RenameStmt *) parsetree)->renameType == OBJECT_DATABASE))
		{
			/* a listed database may appear: let the launcher look after commit */
			register_xact_callback();
			wake_launcher_pending = true;
		}
	}
	if (prev_ProcessUtility)
		prev_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
							queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
								queryEnv, dest, qc);
}

/* ----------------------------------------------------------------
 * Registration
 * ----------------------------------------------------------------
 */

/*
 * crmpay_worker_register
 *		Called from _PG_init while the postmaster preloads the library:
 *		shared memory, the DROP DATABASE hook and, when crmpay.database
 *		lists databases, the launcher.
 */
void
crmpay_worker_register(void)
{
	BackgroundWorker worker;
	List	   *names;
	char	   *error = NULL;
	ListCell   *lc;

	if (!parse_database_list(crmpay_databases, &names, &error))
		names = NIL;			/* the check hook has refused it already */
	ndatabases = 0;
	foreach(lc, names)
		strlcpy(database_names[ndatabases++], lfirst(lc), NAMEDATALEN);

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = crmpay_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = crmpay_shmem_startup;
	prev_ProcessUtility = ProcessUtility_hook;
	ProcessUtility_hook = crmpay_process_utility;

	if (ndatabases == 0)
		return;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 1;
	strlcpy(worker.bgw_library_name, "crmpay", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "crmpay_launcher_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "crmpay launcher", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "crmpay launcher", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

/* ----------------------------------------------------------------
 * The launcher
 * ----------------------------------------------------------------
 */
static void
launcher_detach(int code, Datum arg)
{
	SpinLockAcquire(&shared->mutex);
	if (shared->launcher_pid == MyProcPid)
		shared->launcher_pid = 0;
	SpinLockRelease(&shared->mutex);
}

/*
 * True when the database exists and accepts connections.  A heap scan of
 * pg_database, as the autovacuum launcher does: a process connected to no
 * database can open shared catalogs but not their indexes.
 */
static bool
database_usable(const char *dbname)
{
	bool		usable = false;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tuple = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tuple);

		if (strcmp(NameStr(db->datname), dbname) == 0)
			usable = db->datallowconn;
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	return usable;
}

static bool
start_worker(int slot, BackgroundWorkerHandle **handle)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;	/* the launcher restarts it */
	strlcpy(worker.bgw_library_name, "crmpay", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "crmpay_worker_main", BGW_MAXLEN);
	snprintf(worker.bgw_name, BGW_MAXLEN, "crmpay worker for database %s",
			 shared->slots[slot].dbname);
	strlcpy(worker.bgw_type, "crmpay worker", BGW_MAXLEN);
	worker.bgw_main_arg = Int32GetDatum(slot);
	worker.bgw_notify_pid = MyProcPid;
	return RegisterDynamicBackgroundWorker(&worker, handle);
}

/*
 * crmpay_launcher_main
 *		Keeps one worker running per usable database of crmpay.database.
 *		Woken by worker start/stop (bgw_notify_pid), by a worker's exit,
 *		and after CREATE/DROP/ALTER DATABASE; otherwise it sleeps (at most a
 *		minute, to notice databases made usable by other means).
 */
void
crmpay_launcher_main(Datum main_arg)
{
	BackgroundWorkerHandle *handles[CRMPAY_MAX_DATABASES] = {0};
	TimestampTz started_at[CRMPAY_MAX_DATABASES] = {0};
	TimestampTz next_start[CRMPAY_MAX_DATABASES] = {0};
	int			failures[CRMPAY_MAX_DATABASES] = {0};
	bool		reported[CRMPAY_MAX_DATABASES] = {0};

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("crmpay launcher");

	SpinLockAcquire(&shared->mutex);
	shared->launcher_pid = MyProcPid;
	shared->launcher_pgprocno = MyProc->pgprocno;
	SpinLockRelease(&shared->mutex);
	before_shmem_exit(launcher_detach, (Datum) 0);
	ereport(LOG,
			(errmsg("crmpay launcher started for crmpay.database = '%s'", crmpay_databases)));

	for (;;)
	{
		long		timeout = 60000;
		TimestampTz now;
		int			i;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		pgstat_report_activity(STATE_RUNNING, "crmpay launcher: checking workers");
		now = GetCurrentTimestamp();
		for (i = 0; i < shared->ndatabases; i++)
		{
			CrmpayDbSlot *slot = &shared->slots[i];
			pid_t		pid;
			pid_t		hold_by;

			if (handles[i] != NULL)
			{
				pid_t		handle_pid;
				BgwHandleStatus status = GetBackgroundWorkerPid(handles[i], &handle_pid);
				bool		told_to_stop;

				if (status == BGWH_STARTED || status == BGWH_NOT_YET_STARTED)
					continue;

				/*
				 * It stopped: again in 1 s when it was told to stop (SIGTERM,
				 * DROP DATABASE) or ran a while; backing off up to a minute
				 * after failures at start (a database that cannot be used).
				 */
				SpinLockAcquire(&shared->mutex);
				told_to_stop = slot->told_to_stop;
				SpinLockRelease(&shared->mutex);
				pfree(handles[i]);
				handles[i] = NULL;
				if (told_to_stop || TimestampDifferenceExceeds(started_at[i], now, 30000))
					failures[i] = 0;
				else
					failures[i] = Min(failures[i] + 1, 6);
				next_start[i] = TimestampTzPlusMilliseconds(now, 1000L << failures[i]);
				if (failures[i] > 0)
					next_start[i] = Min(next_start[i], TimestampTzPlusMilliseconds(now, 60000));
			}

			SpinLockAcquire(&shared->mutex);
			pid = slot->pid;
			hold_by = slot->hold_by;
			SpinLockRelease(&shared->mutex);
			if (hold_by != 0 && kill(hold_by, 0) != 0 && errno == ESRCH)
			{
				/* the backend that was dropping the database is gone */
				SpinLockAcquire(&shared->mutex);
				if (slot->hold_by == hold_by)
					slot->hold_by = 0;
				SpinLockRelease(&shared->mutex);
				hold_by = 0;
			}
			if (pid != 0 || hold_by != 0)
				continue;
			if (now < next_start[i])
			{
				timeout = Min(timeout, (long) ((next_start[i] - now) / 1000) + 1);
				continue;
			}
			if (!database_usable(slot->dbname))
			{
				if (!reported[i])
					ereport(LOG,
							(errmsg("crmpay: database \"%s\" of crmpay.database does not exist or does not allow connections; no worker for it",
									slot->dbname)));
				reported[i] = true;
				continue;
			}
			reported[i] = false;
			if (!start_worker(i, &handles[i]))
			{
				ereport(WARNING,
						(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
						 errmsg("crmpay: could not start the worker for database \"%s\"", slot->dbname),
						 errhint("Raise max_worker_processes: crmpay needs one worker per database of crmpay.database plus its launcher.")));
				handles[i] = NULL;
				next_start[i] = TimestampTzPlusMilliseconds(now, 10000);
				timeout = Min(timeout, 10000);
				continue;
			}
			started_at[i] = now;
		}
		pgstat_report_activity(STATE_IDLE, "crmpay launcher: waiting");
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/* ----------------------------------------------------------------
 * The worker of a database
 * ----------------------------------------------------------------
 */
static int	my_slot = -1;

static void
worker_detach(int code, Datum arg)
{
	CrmpayDbSlot *slot = &shared->slots[my_slot];

	SpinLockAcquire(&shared->mutex);
	if (slot->pid == MyProcPid)
	{
		slot->pid = 0;
		slot->told_to_stop = ProcDiePending;
	}
	SpinLockRelease(&shared->mutex);
	wake_launcher();
}

/* Shows what the worker does in pg_stat_activity (NULL: idle). */
void
crmpay_worker_report(const char *activity)
{
	if (activity != NULL)
		pgstat_report_activity(STATE_RUNNING, activity);
	else
		pgstat_report_activity(STATE_IDLE, "crmpay worker: waiting for jobs");
}

/*
 * crmpay_worker_main
 *		The worker of one database: runs the outbox until told to stop.  An
 *		ERROR outside a job's own handling is logged, the transfers in
 *		flight are dropped (their jobs are claimed again, with the same
 *		idempotency keys), and the loop resumes after a growing pause; the
 *		process does not exit, so a persistent error cannot make it restart
 *		in a loop.
 */
void
crmpay_worker_main(Datum main_arg)
{
	sigjmp_buf	local_sigjmp_buf;
	int			errors = 0;
	CrmpayDbSlot *slot;
	pid_t		other;
	char		dbname[NAMEDATALEN];

	my_slot = DatumGetInt32(main_arg);
	slot = &shared->slots[my_slot];
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	pqsignal(SIGINT, SIG_IGN);	/* nothing to cancel: jobs are not queries */
	BackgroundWorkerUnblockSignals();

	strlcpy(dbname, slot->dbname, NAMEDATALEN);
	BackgroundWorkerInitializeConnection(dbname, NULL, 0);
	pgstat_report_appname("crmpay worker");
	/* the internal functions it calls rely on this (see 80_outbox.sql) */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	/* short statements only: JIT would just load LLVM into the worker */
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	/* one worker per database, whatever happens to launchers */
	SpinLockAcquire(&shared->mutex);
	other = slot->pid;
	SpinLockRelease(&shared->mutex);
	if (other != 0 && other != MyProcPid && kill(other, 0) != 0 && errno == ESRCH)
	{
		/* left behind by a worker that is gone */
		SpinLockAcquire(&shared->mutex);
		if (slot->pid == other)
			slot->pid = 0;
		SpinLockRelease(&shared->mutex);
	}
	SpinLockAcquire(&shared->mutex);
	other = slot->pid;
	if (other == 0 || other == MyProcPid)
	{
		slot->told_to_stop = false;
		slot->pid = MyProcPid;
		slot->pgprocno = MyProc->pgprocno;
		slot->dboid = MyDatabaseId;
		other = 0;
	}
	SpinLockRelease(&shared->mutex);
	if (other != 0)
	{
		ereport(LOG,
				(errmsg("crmpay: database \"%s\" already has a worker (pid %d)", dbname, (int) other)));
		proc_exit(0);
	}
	before_shmem_exit(worker_detach, (Datum) 0);

	ereport(LOG,
			(errmsg("crmpay worker started for database \"%s\" (%s)",
					dbname, crmpay_http_library_versions())));
	crmpay_outbox_init();

	if (sigsetjmp(local_sigjmp_buf, 1) != 0)
	{
		TimestampTz until;

		/* Since not using PG_TRY, must reset error stack by hand */
		error_context_stack = NULL;
		HOLD_INTERRUPTS();
		EmitErrorReport();
		AbortOutOfAnyTransaction();
		crmpay_outbox_reset();
		MemoryContextSwitchTo(TopMemoryContext);
		FlushErrorState();
		RESUME_INTERRUPTS();

		errors = Min(errors + 1, 6);
		until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 1000L << (errors - 1));
		crmpay_worker_report("crmpay worker: pausing after an error");
		while (GetCurrentTimestamp() < until)
		{
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 Max(1, (until - GetCurrentTimestamp()) / 1000), PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
		}
		SetLatch(MyLatch);		/* look for work at once */
		wait_events = WL_LATCH_SET;
	}
	PG_exception_stack = &local_sigjmp_buf;

	for (;;)
	{
		long		sleep_ms;
		TimestampTz now;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			crmpay_outbox_reconfigure();
		}

		/*
		 * The outbox runs when woken (a commit that queued work, a signal)
		 * or when its next job falls due; a timer wake for reconciliation
		 * schedules alone does not touch it, so an idle worker stays idle.
		 */
		now = GetCurrentTimestamp();
		if ((wait_events & WL_LATCH_SET) || now >= next_outbox_pass)
		{
			long		outbox_ms = crmpay_outbox_run();

			now = GetCurrentTimestamp();
			next_outbox_pass = outbox_ms < 0 ? DT_NOEND
				: TimestampTzPlusMilliseconds(now, outbox_ms);
			errors = 0;
			crmpay_worker_report(NULL);
		}

		/* due reconciliation schedules run in their own worker (reconcile.c) */
		sleep_ms = crmpay_reconcile_start_due();
		if (next_outbox_pass != DT_NOEND)
			sleep_ms = Min(sleep_ms, Max(0, (next_outbox_pass - now) / 1000));
		wait_events = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								sleep_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
