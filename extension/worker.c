/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The background worker that drains the outbox (crmpay.jobs).
 *
 *	  Placeholder until the outbox lands: defines no GUCs and registers no
 *	  worker, so preloading the library is already the supported setup.
 *
 *-------------------------------------------------------------------------
 */
#include "crmpay.h"

#include "worker.h"

void
crmpay_worker_define_gucs(void)
{
}

void
crmpay_worker_register(void)
{
}
