/*-------------------------------------------------------------------------
 *
 * crmpay.c
 *	  Module entry point: PG_MODULE_MAGIC, the configuration parameters
 *	  (GUCs) and the module's initialisation.
 *
 *	  crmpay is meant to be preloaded (shared_preload_libraries = 'crmpay')
 *	  so its background worker can start; the SQL functions also work when
 *	  the library is loaded on first use.  Security-relevant settings are
 *	  superuser-only: a role that could change them could turn off replay
 *	  protection, TLS trust or the key that protects gateway secrets.
 *
 *-------------------------------------------------------------------------
 */
#include "crmpay.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

#include "provider.h"
#include "reconcile.h"
#include "worker.h"

PG_MODULE_MAGIC;

char	   *crmpay_key_file = NULL;
char	   *crmpay_ca_file = NULL;
bool		crmpay_allow_insecure_http = false;
int			crmpay_connect_timeout_ms = 5000;
int			crmpay_request_timeout_ms = 30000;
int			crmpay_webhook_tolerance_s = 300;
int			crmpay_max_webhook_bytes = 1024 * 1024;
bool		crmpay_webhook_direct_path = true;

void		_PG_init(void);

/*
 * _PG_init
 *		Defines the GUCs and, when preloaded, registers the background worker.
 */
void
_PG_init(void)
{
	DefineCustomStringVariable("crmpay.key_file",
							   gettext_noop("File holding the 32-byte master key that encrypts gateway secrets."),
							   gettext_noop("Create it with: head -c 32 /dev/urandom > FILE; chmod 600 FILE (owned by the server's OS user)."),
							   &crmpay_key_file,
							   NULL,
							   PGC_SUSET,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("crmpay.ca_file",
							   gettext_noop("CA bundle trusted for gateway TLS instead of the system's."),
							   NULL,
							   &crmpay_ca_file,
							   NULL,
							   PGC_SUSET,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomBoolVariable("crmpay.allow_insecure_http",
							 gettext_noop("Allows plain http:// gateway base URLs (for local test doubles only)."),
							 NULL,
							 &crmpay_allow_insecure_http,
							 false,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.connect_timeout",
							gettext_noop("Longest wait for a gateway connection (TCP and TLS)."),
							NULL,
							&crmpay_connect_timeout_ms,
							5000, 1, 600000,
							PGC_USERSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.request_timeout",
							gettext_noop("Longest time one gateway HTTP request may take in total."),
							NULL,
							&crmpay_request_timeout_ms,
							30000, 1, 3600000,
							PGC_USERSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.webhook_tolerance",
							gettext_noop("Largest age of a signed webhook timestamp that receive_webhook accepts."),
							gettext_noop("0 turns the timestamp check off."),
							&crmpay_webhook_tolerance_s,
							300, 0, 7 * 24 * 3600,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("crmpay.max_webhook_bytes",
							gettext_noop("Largest webhook body receive_webhook accepts."),
							NULL,
							&crmpay_max_webhook_bytes,
							1024 * 1024, 1024, 64 * 1024 * 1024,
							PGC_SUSET,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("crmpay.webhook_direct_path",
							 gettext_noop("Whether receive_webhook writes its common case without SQL statements."),
							 gettext_noop("Off: every event goes through SQL statements (for executor-hook "
										  "auditing such as pgaudit or pg_stat_statements)."),
							 &crmpay_webhook_direct_path,
							 true,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	crmpay_worker_define_gucs();
	crmpay_paypal_define_gucs();
	crmpay_reconcile_define_gucs();

	MarkGUCPrefixReserved("crmpay");

	if (process_shared_preload_libraries_in_progress && !IsBinaryUpgrade)
	{
		crmpay_worker_register();
		crmpay_reconcile_shmem_request();
	}
}

/* Converts a timestamptz to whole Unix seconds (floor). */
int64
crmpay_timestamptz_to_unix(TimestampTz ts)
{
	/* TimestampTz counts microseconds from 2000-01-01, Unix time from 1970 */
	int64		usecs = ts + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * USECS_PER_SEC;

	return usecs >= 0 ? usecs / USECS_PER_SEC : -((-usecs + USECS_PER_SEC - 1) / USECS_PER_SEC);
}
