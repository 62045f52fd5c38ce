/*-------------------------------------------------------------------------
 *
 * worker.h
 *	  The background worker that drains the outbox (crmpay.jobs).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CRMPAY_WORKER_H
#define CRMPAY_WORKER_H

extern void crmpay_worker_define_gucs(void);
extern void crmpay_worker_register(void);

#endif							/* CRMPAY_WORKER_H */
