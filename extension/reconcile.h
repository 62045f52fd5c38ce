/*-------------------------------------------------------------------------
 *
 * reconcile.h
 *	  Reconciliation: gateway report files (reports.c), the fetch driver
 *	  and step-by-step runners (reconcile.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CRMPAY_RECONCILE_H
#define CRMPAY_RECONCILE_H

#include "provider.h"

typedef struct CrmpayCurrencyTable CrmpayCurrencyTable;

extern CrmpayCurrencyTable *crmpay_load_currencies(MemoryContext cxt);
struct pg_tz;
extern bool crmpay_local_timestamp(int y, int mo, int d, int h, int mi, int s,
								   struct pg_tz *tz, TimestampTz *result);
extern const char *crmpay_report_format(const char *format, const char *provider);
extern int	crmpay_read_report(const char *format, const CrmpayAccount *account,
							   const char *content, size_t len,
							   CrmpayCurrencyTable *currencies,
							   void (*emit) (CrmpayGatewayRecord *record, void *arg),
							   void (*flush) (void *arg), void *arg, int batch_lines);

/* reconcile.c */
extern void crmpay_reconcile_define_gucs(void);
extern void crmpay_reconcile_shmem_request(void);

/*
 * For the background worker: runs every due reconciliation schedule step
 * by step, committing between gateway calls.  Call it from a worker
 * connected to the database, outside any transaction; it starts and
 * commits its own.  Returns the number of runs done.
 */
extern int	crmpay_reconcile_run_due_in_worker(void);

/*
 * For the outbox worker's loop, outside any transaction: starts the
 * reconciliation worker when a schedule is due (checked once a minute).
 * Returns the milliseconds until the next check.
 */
extern long crmpay_reconcile_start_due(void);

#endif							/* CRMPAY_RECONCILE_H */
