/*-------------------------------------------------------------------------
 *
 * intake.h
 *	  What the webhook intake (webhook.c) and its direct path
 *	  (intake_direct.c) share: an event's row, a payment move, and a
 *	  payment found and locked by its link.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CRMPAY_INTAKE_H
#define CRMPAY_INTAKE_H

#include "crmpay.h"

#include "executor/tuptable.h"

/* One row of crmpay.events, as the intake records it. */
typedef struct EventRow
{
	const char *account;
	const char *provider;		/* NULL for an unknown account */
	const char *event_key;
	const char *event_type;
	int64		payment_id;		/* 0: none */
	const char *outcome;
	const char *reason;
	const char *old_status;
	const char *new_status;
	int			http_status;
	Datum		headers;		/* jsonb */
	bool		headers_null;
	text	   *body;			/* NULL: none */
	const char *follow_up;
} EventRow;

/* A status move decided by the intake, written with the event's row. */
typedef struct PaymentMove
{
	int64		payment_id;		/* 0: no move */
	const char *new_status;
	const char *gateway_payment_ref;
	int64		refunded_minor; /* -1: none */
} PaymentMove;

/* A payment found by its link and locked (FOR UPDATE), latest version. */
typedef struct LockedPayment
{
	bool		applied;		/* the event was applied already */
	int64		id;
	char	   *status;
	int64		amount_minor;
	char	   *currency;
	int64		refunded_minor;
	TupleTableSlot *row;		/* the locked row version */
} LockedPayment;

typedef enum IntakeLookup
{
	LOOKUP_USE_SQL,				/* the direct path does not apply: use SQL */
	LOOKUP_NOT_FOUND,			/* no payment has this link */
	LOOKUP_FOUND				/* *locked is filled */
} IntakeLookup;

extern IntakeLookup crmpay_intake_find_by_link(const char *account, const char *gateway_ref,
											   const char *event_key, LockedPayment *locked);
extern bool crmpay_intake_write_move(LockedPayment *locked, const PaymentMove *move,
									 const EventRow *event);
extern void crmpay_intake_release(LockedPayment *locked);

#endif							/* CRMPAY_INTAKE_H */
