/*-------------------------------------------------------------------------
 *
 * webhook.c
 *	  Webhook intake, the C half: authenticity checks and event parsing.
 *
 *	  crmpay.receive_webhook() opens the account's webhook secret, checks the
 *	  delivery with the provider's verifier, turns it into normalised events
 *	  and applies them through the payment state machine (payments.c),
 *	  recording every delivery in crmpay.events.  An applied event that
 *	  makes a gateway call due (PayPal's CHECKOUT.ORDER.APPROVED: the
 *	  capture) queues that call as a job of the outbox in the same
 *	  transaction and wakes the worker at commit.  It
 *	  never raises an ERROR for anything a sender controls (bad signature,
 *	  malformed body, unknown account).  The statements are prepared once
 *	  per backend and take parameters only; the common event (found by its
 *	  link, moving its payment) is found and written without them where
 *	  that is exact (intake_direct.c).  crmpay.verify_signature() is the
 *	  same check as a pure function.
 *
 *-------------------------------------------------------------------------
 */
#include "provider.h"
#include "intake.h"

#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/fmgrprotos.h"
#include "utils/builtins.h"
#include "mb/pg_wchar.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "worker.h"

/* Converts an interval to whole seconds (0 for NULL or negative). */
static int64
interval_to_seconds(const Interval *interval)
{
	int64		secs;

	if (interval == NULL)
		return 0;
	secs = interval->time / USECS_PER_SEC +
		(int64) interval->day * SECS_PER_DAY +
		(int64) interval->month * DAYS_PER_MONTH * SECS_PER_DAY;
	return secs > 0 ? secs : 0;
}

/* What the C side concluded about one delivery. */
typedef struct Verdict
{
	const char *provider;		/* NULL when the account is unknown */
	bool		valid;
	int			http_status;
	const char *reason;
	const char *ack;
	List	   *events;			/* of CrmpayWebhookEvent * */
} Verdict;

static Verdict
reject(const char *provider, int http_status, const char *reason)
{
	Verdict		v = {provider, false, http_status, reason, NULL, NIL};

	return v;
}

/*
 * check_delivery
 *		Opens the account's webhook secret, verifies the delivery and parses
 *		its events.  Never raises for anything the sender controls.
 */
static Verdict
check_delivery(const char *name, Datum headers_jsonb, bool headers_null,
			   text *body, TimestampTz at)
{
	CrmpayAccount *account;
	const CrmpayProvider *provider;
	CrmpayHeaders *headers;
	CrmpayVerifyResult check;
	const char *reason = NULL;
	Verdict		v;

	if (name == NULL)
		return reject(NULL, 404, "no account given");
	account = crmpay_load_account(name, true);
	if (account == NULL)
		return reject(NULL, 404, "unknown account");
	provider = account->provider;
	if (provider->receive_events == NULL &&
		(provider->verify_webhook == NULL || provider->parse_webhook == NULL))
		return reject(provider->name, 501, "webhooks are not supported for this provider yet");
	if (account->webhook_secret == NULL)
		return reject(provider->name, 400, "account has no webhook secret");
	if (body == NULL)
		return reject(provider->name, 400, "empty body");
	if (VARSIZE_ANY_EXHDR(body) > (Size) crmpay_max_webhook_bytes)
		return reject(provider->name, 413, "body larger than crmpay.max_webhook_bytes");

	headers = headers_null ? palloc0(sizeof(CrmpayHeaders)) : crmpay_headers_from_jsonb(headers_jsonb);
	if (provider->receive_events != NULL)
	{
		/*
		 * The gateway signs each event of a batch on its own: the delivery
		 * is accepted when at least one event is authentic; the others are
		 * recorded as rejected, one by one.
		 */
		ListCell   *lc;
		const char *first_rejection = NULL;
		bool		any_authentic = false;

		v.events = provider->receive_events(account, account->webhook_secret, headers,
											VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body),
											crmpay_webhook_tolerance_s, at, &reason);
		if (v.events == NIL)
			return reject(provider->name, 400, reason ? reason : "no events in delivery");
		foreach(lc, v.events)
		{
			CrmpayWebhookEvent *event = lfirst(lc);

			if (event->rejected_reason == NULL)
				any_authentic = true;
			else if (first_rejection == NULL)
				first_rejection = event->rejected_reason;
		}
		if (!any_authentic)
			return reject(provider->name, 400, first_rejection);
	}
	else
	{
		if (provider->verify_account_webhook != NULL)
			check = provider->verify_account_webhook(account, headers,
													 VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body),
													 crmpay_webhook_tolerance_s, at);
		else
			check = provider->verify_webhook(account->webhook_secret, headers,
											 VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body),
											 crmpay_webhook_tolerance_s, at);
		if (!check.valid)
			return reject(provider->name, 400, check.reason);

		v.events = provider->parse_webhook(headers, VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body), &reason);
		if (v.events == NIL)
			return reject(provider->name, 400, reason ? reason : "no events in delivery");
	}
	v.provider = provider->name;
	v.valid = true;
	v.http_status = 200;
	v.reason = NULL;
	v.ack = provider->webhook_ack;
	return v;
}

/* Saved plans of the intake, prepared once per backend. */
enum
{
	PLAN_INSERT_EVENT,
	PLAN_MOVE_AND_INSERT_EVENT,
	PLAN_FIND_BY_LINK,
	PLAN_FIND_PAYMENT,
	PLAN_EVENT_APPLIED,
	PLAN_QUEUE_CAPTURE,
	PLAN_NOTE_REJECTED,
	NUM_PLANS
};

static SPIPlanPtr intake_plans[NUM_PLANS];

static SPIPlanPtr
intake_plan(int which)
{
	static const struct
	{
		const char *sql;
		int			nargs;
		Oid			types[18];
	}			defs[NUM_PLANS] = {
		[PLAN_INSERT_EVENT] = {
			"INSERT INTO crmpay.events (account, provider, event_key, event_type, payment_id, outcome,"
			" reason, old_status, new_status, http_status, headers, body, follow_up)"
			" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
			13, {TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
			INT4OID, JSONBOID, TEXTOID, TEXTOID}
		},
		/*
		 * An event that moves its payment: the state machine's UPDATE
		 * ($1-$5, payments.c), the payment_refs row of a gateway payment id
		 * it learns (written here rather than by the trigger, which this
		 * statement tells to skip the payment), and the event's row
		 * ($6-$18), in one statement.  For a payment found by the direct
		 * path, crmpay_intake_write_move() writes the same rows.
		 */
		[PLAN_MOVE_AND_INSERT_EVENT] = {
			"WITH moved AS (" CRMPAY_PAYMENT_MOVE_SQL
			"                RETURNING p.id, p.account, p.gateway_payment_ref),"
			" ref AS (" CRMPAY_KEEP_PAYMENT_REF_SQL
			"         SELECT m.account, m.gateway_payment_ref, m.id FROM moved m"
			"          WHERE m.gateway_payment_ref IS NOT NULL AND $3 IS NOT NULL"
			"         " CRMPAY_KEEP_PAYMENT_REF_CONFLICT ")"
			" INSERT INTO crmpay.events (account, provider, event_key, event_type, payment_id, outcome,"
			" reason, old_status, new_status, http_status, headers, body, follow_up)"
			" VALUES ($6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
			18, {INT8OID, TEXTOID, TEXTOID, INT8OID, TIMESTAMPTZOID,
				TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
			INT4OID, JSONBOID, TEXTOID, TEXTOID}
		},
		/*
		 * The common case of PLAN_FIND_PAYMENT: the event names the link
		 * (the gateway's id of the payment page or order) and it is ours.
		 * Run when crmpay_intake_find_by_link() cannot do the same.
		 */
		[PLAN_FIND_BY_LINK] = {
			"SELECT EXISTS (SELECT 1 FROM crmpay.events e WHERE e.account = $1"
			"                 AND e.event_key = $5 AND e.outcome = 'applied') AS applied,"
			"       p.id, p.status, p.amount_minor, p.currency, p.refunded_minor"
			"  FROM crmpay.payments p"
			" WHERE p.account = $1 AND p.gateway_ref = $2"
			" LIMIT 1 FOR UPDATE OF p",
			5, {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID}
		},
		/*
		 * Was this event applied already, and which payment is it about (by
		 * the gateway's link id, then its payment id, then our order ref)?
		 * The payment row is locked, so the state machine decides on its
		 * latest status.  Each lookup is one index probe (the gateway's
		 * payment id through payment_refs, checked against the payment), and
		 * coalesce stops at the first that finds the payment.  No row when
		 * no payment matches (PLAN_EVENT_APPLIED then dedupes).
		 */
		[PLAN_FIND_PAYMENT] = {
			"SELECT EXISTS (SELECT 1 FROM crmpay.events e WHERE e.account = $1"
			"                 AND e.event_key = $5 AND e.outcome = 'applied') AS applied,"
			"       p.id, p.status, p.amount_minor, p.currency, p.refunded_minor"
			"  FROM crmpay.payments p"
			" WHERE p.id = coalesce("
			"         (SELECT id FROM crmpay.payments WHERE account = $1 AND gateway_ref = $2 LIMIT 1),"
			"         (SELECT r.payment_id FROM crmpay.payment_refs r"
			"            JOIN crmpay.payments q ON q.id = r.payment_id AND q.gateway_payment_ref = r.gateway_payment_ref"
			"           WHERE r.account = $1 AND r.gateway_payment_ref = $3),"
			"         (SELECT id FROM crmpay.payments WHERE account = $1 AND order_ref = $4))"
			"   FOR UPDATE OF p",
			5, {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID}
		},
		/* the dedupe alone, for an event whose payment is not found */
		[PLAN_EVENT_APPLIED] = {
			"SELECT EXISTS (SELECT 1 FROM crmpay.events e WHERE e.account = $1"
			"                 AND e.event_key = $2 AND e.outcome = 'applied')",
			2, {TEXTOID, TEXTOID}
		},
		/*
		 * The capture job an approved order makes due: at most one queued or
		 * running per payment (the payment row is locked by FIND_PAYMENT, so
		 * concurrent deliveries for it queue one after the other).
		 */
		[PLAN_QUEUE_CAPTURE] = {
			"INSERT INTO crmpay.jobs (kind, account, payment_id, payload)"
			" SELECT 'capture', $1, $2, jsonb_build_object('event_key', $3)"
			"  WHERE NOT EXISTS (SELECT 1 FROM crmpay.jobs j WHERE j.payment_id = $2"
			"                       AND j.kind = 'capture' AND j.state IN ('queued', 'running'))",
			3, {TEXTOID, INT8OID, TEXTOID}
		},
		/* the alert on a burst of rejected deliveries (80_outbox.sql) */
		[PLAN_NOTE_REJECTED] = {
			"SELECT crmpay._webhook_rejected($1, $2)",
			2, {TEXTOID, TEXTOID}
		},
	};

	return crmpay_saved_plan(&intake_plans[which], defs[which].sql, defs[which].nargs,
							 defs[which].types);
}

static void
spi_run(int which, Datum *values, const char *nulls, int expected)
{
	crmpay_spi_run(intake_plan(which), values, nulls, false, 0, expected, "an intake statement");
}

/* PLAN_MOVE_AND_INSERT_EVENT, telling the refs trigger that it keeps the payment's ref itself. */
static void
run_move_and_insert(Datum *values, const char *nulls, int64 payment_id)
{
	crmpay_statement_keeps_payment_ref(payment_id);
	PG_TRY();
	{
		spi_run(PLAN_MOVE_AND_INSERT_EVENT, values, nulls, SPI_OK_INSERT);
	}
	PG_FINALLY();
	{
		crmpay_statement_keeps_payment_ref(0);
	}
	PG_END_TRY();
}

/*
 * record_event
 *		Records one delivery or event in crmpay.events; with a move, moves the
 *		payment in the same statement, or through the direct path when the
 *		payment was found by it (locked->row set).
 */
static void
record_event(const EventRow *row, const PaymentMove *move, LockedPayment *locked)
{
	Datum		all_values[18];
	char		all_nulls[18];
	int			first = (move != NULL) ? 5 : 0;
	Datum	   *values = all_values + first;
	char	   *nulls = all_nulls + first;

	/* found by the direct path: written by it too (intake_direct.c) */
	if (move != NULL && locked != NULL && locked->row != NULL &&
		crmpay_intake_write_move(locked, move, row))
		return;
	if (move != NULL)
	{
		all_values[0] = Int64GetDatum(move->payment_id);
		all_nulls[0] = ' ';
		all_values[1] = crmpay_text_param(move->new_status, &all_nulls[1]);
		all_values[2] = crmpay_text_param(move->gateway_payment_ref, &all_nulls[2]);
		all_values[3] = Int64GetDatum(move->refunded_minor);
		all_nulls[3] = move->refunded_minor >= 0 ? ' ' : 'n';
		all_values[4] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
		all_nulls[4] = ' ';
	}
	values[0] = crmpay_text_param(row->account, &nulls[0]);
	values[1] = crmpay_text_param(row->provider, &nulls[1]);
	values[2] = crmpay_text_param(row->event_key, &nulls[2]);
	values[3] = crmpay_text_param(row->event_type, &nulls[3]);
	values[4] = Int64GetDatum(row->payment_id);
	nulls[4] = row->payment_id > 0 ? ' ' : 'n';
	values[5] = crmpay_text_param(row->outcome, &nulls[5]);
	values[6] = crmpay_text_param(row->reason, &nulls[6]);
	values[7] = crmpay_text_param(row->old_status, &nulls[7]);
	values[8] = crmpay_text_param(row->new_status, &nulls[8]);
	values[9] = Int32GetDatum(row->http_status);
	nulls[9] = ' ';
	values[10] = row->headers;
	nulls[10] = row->headers_null ? 'n' : ' ';
	values[11] = PointerGetDatum(row->body);
	nulls[11] = row->body ? ' ' : 'n';
	values[12] = crmpay_text_param(row->follow_up, &nulls[12]);
	if (move == NULL)
		spi_run(PLAN_INSERT_EVENT, values, nulls, SPI_OK_INSERT);
	else
		run_move_and_insert(all_values, all_nulls, move->payment_id);
	if (strcmp(row->outcome, "rejected") == 0)
	{
		values[1] = values[6];	/* (account, reason) */
		nulls[1] = nulls[6];
		spi_run(PLAN_NOTE_REJECTED, values, nulls, SPI_OK_SELECT);
	}
}

/*
 * apply_event
 *		Dedupes one authentic event and decides what it does to its payment
 *		(locked here); returns its outcome and fills *reason, *payment_id
 *		and the status change (*old_status and *new_status are set when the
 *		payment moves, and *move says how: the caller writes the move with
 *		the event's row).  Facts without a move are written here.  A payment
 *		found by the direct path is left in *locked (its row), for the
 *		caller to write the move through it or release.
 */
static const char *
apply_event(const char *account, const CrmpayWebhookEvent *event, const char **reason,
			int64 *payment_id, char **old_status, const char **new_status,
			PaymentMove *move, LockedPayment *locked)
{
	Datum		values[5];
	char		nulls[5];
	char	   *lock_key;
	bool		isnull;
	bool		found;
	bool		applied;
	HeapTuple	row = NULL;
	TupleDesc	desc = NULL;
	char	   *status;
	int64		amount;
	char	   *currency;
	int64		refunded;
	const char *target = event->new_status;
	int64		refunded_total = event->refunded_minor;
	IntakeLookup lookup;

	*payment_id = 0;
	*old_status = NULL;
	*new_status = NULL;
	move->payment_id = 0;

	if (event->event_key == NULL)
	{
		*reason = event->ignore_reason ? event->ignore_reason : "event without an id";
		return "ignored";
	}

	/* deliveries of the same event are handled one at a time */
	lock_key = psprintf("crmpay/event\x1f%s\x1f%s", account, event->event_key);
	DirectFunctionCall1(pg_advisory_xact_lock_int8,
						Int64GetDatum((int64) hash_bytes_extended((unsigned char *) lock_key,
																  strlen(lock_key), 0)));

	values[0] = CStringGetTextDatum(account);
	nulls[0] = ' ';
	values[1] = crmpay_text_param(event->gateway_ref, &nulls[1]);
	values[2] = crmpay_text_param(event->gateway_payment_ref, &nulls[2]);
	values[3] = crmpay_text_param(event->order_ref, &nulls[3]);
	values[4] = CStringGetTextDatum(event->event_key);
	nulls[4] = ' ';
	found = false;
	lookup = LOOKUP_USE_SQL;
	if (event->gateway_ref != NULL)
	{
		/* the common case, by two index probes where that is exact (intake_direct.c) */
		lookup = crmpay_intake_find_by_link(account, event->gateway_ref, event->event_key, locked);
		found = (lookup == LOOKUP_FOUND);
		if (lookup == LOOKUP_USE_SQL)
		{
			spi_run(PLAN_FIND_BY_LINK, values, nulls, SPI_OK_SELECT);
			found = (SPI_processed > 0);
		}
	}
	if (!found)
	{
		spi_run(PLAN_FIND_PAYMENT, values, nulls, SPI_OK_SELECT);
		found = (SPI_processed > 0);
	}
	if (found && locked->row != NULL)
		applied = locked->applied;
	else if (found)
	{
		row = SPI_tuptable->vals[0];
		desc = SPI_tuptable->tupdesc;
		applied = DatumGetBool(SPI_getbinval(row, desc, 1, &isnull));
	}
	else
	{
		values[1] = values[4];	/* (account, event key) */
		nulls[1] = nulls[4];
		spi_run(PLAN_EVENT_APPLIED, values, nulls, SPI_OK_SELECT);
		applied = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}

	if (applied)
	{
		*reason = "event already applied";
		return "duplicate";
	}
	if (event->ignore_reason != NULL)
	{
		*reason = event->ignore_reason;
		return "ignored";
	}
	if (target == NULL)
	{
		*reason = psprintf("event type %s does not change payments", event->event_type);
		return "ignored";
	}
	if (!found)
	{
		*reason = "no matching payment";
		return "ignored";
	}
	if (locked->row != NULL)
	{
		*payment_id = locked->id;
		status = locked->status;
		amount = locked->amount_minor;
		currency = locked->currency;
		refunded = locked->refunded_minor;
	}
	else
	{
		*payment_id = DatumGetInt64(SPI_getbinval(row, desc, 2, &isnull));
		status = SPI_getvalue(row, desc, 3);
		amount = DatumGetInt64(SPI_getbinval(row, desc, 4, &isnull));
		currency = SPI_getvalue(row, desc, 5);
		refunded = DatumGetInt64(SPI_getbinval(row, desc, 6, &isnull));
	}

	/* money facts must match what was asked for before they count */
	if ((strcmp(target, "paid") == 0 || strcmp(target, "processing") == 0) &&
		((event->amount_minor >= 0 && event->amount_minor != amount) ||
		 (event->currency != NULL && strcmp(event->currency, currency) != 0)))
	{
		*reason = psprintf("amount mismatch: event says " INT64_FORMAT " %s, payment is " INT64_FORMAT " %s",
						   event->amount_minor, event->currency ? event->currency : "?",
						   amount, currency);
		return "ignored";
	}

	/*
	 * One refund of several (gateways that report each refund on its own):
	 * it adds to the refunded total, which decides full or partial.  Each
	 * such event changes the total, so it counts as applied (and is never
	 * added twice) even when the status stays.
	 */
	if (event->refund_minor > 0)
	{
		if (event->currency != NULL && strcmp(event->currency, currency) != 0)
		{
			*reason = psprintf("currency mismatch: refund in %s, payment is %s",
							   event->currency, currency);
			return "ignored";
		}
		if (strcmp(status, "paid") != 0 && strcmp(status, "partially_refunded") != 0 &&
			strcmp(status, "disputed") != 0)
		{
			*reason = psprintf("payment is %s; a refund applies to a paid payment only", status);
			return "ignored";
		}
		refunded_total = Min(amount, refunded + Min(event->refund_minor, amount));
		target = refunded_total >= amount ? "refunded" : "partially_refunded";
		if (!crmpay_transition_allowed(status, target))
		{
			crmpay_record_payment_facts(*payment_id, event->gateway_payment_ref, refunded_total);
			*reason = psprintf("refund recorded (" INT64_FORMAT " of " INT64_FORMAT " %s refunded); payment stays %s",
							   refunded_total, amount, currency, status);
			return "applied";
		}
	}
	else if (!crmpay_transition_allowed(status, target))
	{
		crmpay_record_payment_facts(*payment_id, event->gateway_payment_ref, refunded_total);
		*reason = strcmp(status, target) == 0
			? psprintf("payment is already %s", status)
			: psprintf("payment is %s; %s would not move it forward", status, target);
		return "ignored";
	}

	move->payment_id = *payment_id;
	move->new_status = target;
	move->gateway_payment_ref = event->gateway_payment_ref;
	move->refunded_minor = refunded_total;
	*old_status = status;
	*new_status = target;
	return "applied";
}

/*
 * queue_follow_up
 *		The gateway call an applied event makes due, as a job of the outbox
 *		(written in this transaction; the worker is woken when it commits).
 *		Without a running worker the job waits; crmpay.capture_payment
 *		captures synchronously meanwhile.
 */
static void
queue_follow_up(const char *account, const CrmpayWebhookEvent *event, int64 payment_id)
{
	Datum		values[3];

	if (event->follow_up == NULL || strcmp(event->follow_up, "capture") != 0)
		return;
	values[0] = CStringGetTextDatum(account);
	values[1] = Int64GetDatum(payment_id);
	values[2] = CStringGetTextDatum(event->event_key);
	spi_run(PLAN_QUEUE_CAPTURE, values, NULL, SPI_OK_INSERT);
	if (SPI_processed > 0)
		crmpay_wake_worker_at_commit();
}

static void
emit_row(ReturnSetInfo *rsinfo, int http_status, const char *reply,
		 const char *outcome, const char *event_id)
{
	Datum		values[4];
	bool		nulls[4] = {false, reply == NULL, false, event_id == NULL};

	values[0] = Int32GetDatum(http_status);
	values[1] = reply ? CStringGetTextDatum(reply) : (Datum) 0;
	values[2] = CStringGetTextDatum(outcome);
	values[3] = event_id ? CStringGetTextDatum(event_id) : (Datum) 0;
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

PG_FUNCTION_INFO_V1(crmpay_receive_webhook);

/*
 * crmpay.receive_webhook(account text, headers jsonb, body text)
 *	RETURNS TABLE (http_status int, reply text, outcome text, event_id text)
 *
 *		The intake for every gateway.  Every delivery is recorded in
 *		crmpay.events (rejected ones with the reason); each event is applied
 *		at most once per account, through crmpay_apply_status, so late and
 *		out-of-order events cannot move a payment backwards.  One row per
 *		event (a batch gives several), or one row for a rejected delivery.
 */
Datum
crmpay_receive_webhook(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	const char *account = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	bool		headers_null = PG_ARGISNULL(1);
	Datum		headers = headers_null ? (Datum) 0 : PG_GETARG_DATUM(1);
	text	   *body = PG_ARGISNULL(2) ? NULL : PG_GETARG_TEXT_PP(2);
	Verdict		verdict;
	ListCell   *lc;

	InitMaterializedSRF(fcinfo, 0);
	verdict = check_delivery(account, headers, headers_null, body, GetCurrentTimestamp());

	SPI_connect();
	if (!verdict.valid)
	{
		EventRow	row = {account ? account : "", verdict.provider, NULL, NULL, 0, "rejected",
		verdict.reason, NULL, NULL, verdict.http_status, headers, headers_null, body, NULL};

		record_event(&row, NULL, NULL);
		emit_row(rsinfo, verdict.http_status, verdict.reason, "rejected", NULL);
	}
	else
	{
		foreach(lc, verdict.events)
		{
			CrmpayWebhookEvent *event = lfirst(lc);
			const char *reason = NULL;
			int64		payment_id = 0;
			char	   *old_status = NULL;
			const char *new_status = NULL;
			const char *outcome;
			PaymentMove move = {0};
			LockedPayment locked = {0};
			EventRow	row;

			/* an item of a batch that failed its own check is never applied */
			if (event->rejected_reason != NULL)
			{
				outcome = "rejected";
				reason = event->rejected_reason;
			}
			else
			{
				outcome = apply_event(account, event, &reason, &payment_id,
									  &old_status, &new_status, &move, &locked);
				if (strcmp(outcome, "applied") == 0 && event->follow_up != NULL)
					queue_follow_up(account, event, payment_id);
			}

			if (move.payment_id == 0)
				crmpay_intake_release(&locked);
			/* a follow-up (e.g. PayPal's capture) is due only when the event moved the payment */
			row = (EventRow) {account, verdict.provider, event->event_key, event->event_type,
				payment_id, outcome, reason, old_status, new_status, 200, headers, headers_null,
			body, strcmp(outcome, "applied") == 0 ? event->follow_up : NULL};
			record_event(&row, move.payment_id > 0 ? &move : NULL, &locked);
			emit_row(rsinfo, 200, verdict.ack ? verdict.ack : "", outcome, event->event_key);
		}
	}
	SPI_finish();
	return (Datum) 0;
}

PG_FUNCTION_INFO_V1(crmpay_verify_signature);

/*
 * crmpay.verify_signature(provider text, secret text, headers jsonb,
 *		body text, tolerance interval, at timestamptz) RETURNS boolean
 *		True only when the delivery is authentic and fresh enough.
 */
Datum
crmpay_verify_signature(PG_FUNCTION_ARGS)
{
	const CrmpayProvider *provider;
	CrmpayHeaders *headers;
	text	   *body;
	CrmpayVerifyResult check;
	int64		tolerance;
	TimestampTz at;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("provider must not be null"),
				 errhint("Use one of: %s.", crmpay_provider_names())));
	provider = crmpay_find_provider(text_to_cstring(PG_GETARG_TEXT_PP(0)), false);
	if (provider->verify_webhook == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("signature verification is not supported for provider \"%s\" in this version of crmpay",
						provider->name)));
	if (PG_ARGISNULL(1) || PG_ARGISNULL(3))
		PG_RETURN_BOOL(false);

	body = PG_GETARG_TEXT_PP(3);
	headers = PG_ARGISNULL(2) ? palloc0(sizeof(CrmpayHeaders))
		: crmpay_headers_from_jsonb(PG_GETARG_DATUM(2));
	tolerance = PG_ARGISNULL(4) ? 0 : interval_to_seconds(PG_GETARG_INTERVAL_P(4));
	at = PG_ARGISNULL(5) ? GetCurrentTimestamp() : PG_GETARG_TIMESTAMPTZ(5);

	check = provider->verify_webhook(text_to_cstring(PG_GETARG_TEXT_PP(1)), headers,
									 VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body),
									 tolerance, at);
	PG_RETURN_BOOL(check.valid);
}
