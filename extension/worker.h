/*-------------------------------------------------------------------------
 *
 * worker.h
 *	  The background workers that drain the outbox (crmpay.jobs): the
 *	  launcher, one worker per database of crmpay.database, their shared
 *	  state, and the outbox steps they run (outbox.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CRMPAY_WORKER_H
#define CRMPAY_WORKER_H

#include "crmpay.h"

/* GUCs of the outbox (see worker.c for their documentation) */
extern char *crmpay_databases;
extern int	crmpay_max_concurrent_requests;
extern int	crmpay_max_host_connections;
extern int	crmpay_retry_base_delay_ms;
extern int	crmpay_retry_max_delay_ms;
extern int	crmpay_max_attempts;
extern int	crmpay_circuit_failure_threshold;
extern int	crmpay_circuit_cooldown_s;
extern int	crmpay_job_lease_s;
extern int	crmpay_job_retention_s;
extern char *crmpay_smtp_url;

/* worker.c */
extern void crmpay_worker_define_gucs(void);
extern void crmpay_worker_register(void);
extern void crmpay_wake_worker_at_commit(void);
extern void crmpay_worker_report(const char *activity);

/* outbox.c: what a database's worker does */
extern void crmpay_outbox_init(void);
extern long crmpay_outbox_run(void);
extern void crmpay_outbox_reset(void);
extern void crmpay_outbox_reconfigure(void);

#endif							/* CRMPAY_WORKER_H */
