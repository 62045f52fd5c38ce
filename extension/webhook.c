/*-------------------------------------------------------------------------
 *
 * webhook.c
 *	  Webhook intake, the C half: authenticity checks and event parsing.
 *
 *	  crmpay._webhook_check() opens the account's webhook secret, checks the
 *	  delivery with the provider's verifier and turns it into normalised
 *	  events, returned as jsonb.  It never raises an ERROR for anything a
 *	  sender controls (bad signature, malformed body, unknown account): the
 *	  SQL half (crmpay.receive_webhook in the install script) records every
 *	  delivery, rejected or not, and applies events through the payment
 *	  state machine.  crmpay.verify_signature() is the same check as a pure
 *	  function.
 *
 *-------------------------------------------------------------------------
 */
#include "provider.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "mb/pg_wchar.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

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

static void
append_json_field(StringInfo buf, const char *name, const char *value, bool *first)
{
	if (!*first)
		appendStringInfoString(buf, ", ");
	*first = false;
	escape_json(buf, name);
	appendStringInfoString(buf, ": ");
	if (value == NULL)
		appendStringInfoString(buf, "null");
	else
		escape_json(buf, value);
}

static void
append_json_int(StringInfo buf, const char *name, int64 value, bool *first)
{
	if (!*first)
		appendStringInfoString(buf, ", ");
	*first = false;
	escape_json(buf, name);
	if (value < 0)
		appendStringInfoString(buf, ": null");
	else
		appendStringInfo(buf, ": " INT64_FORMAT, value);
}

/* Builds the verdict jsonb for receive_webhook. */
static Datum
verdict(const char *provider, bool valid, int http_status, const char *reason,
		const char *ack, List *events)
{
	StringInfoData buf;
	bool		first = true;
	ListCell   *lc;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	append_json_field(&buf, "provider", provider, &first);
	appendStringInfo(&buf, ", \"valid\": %s, \"http_status\": %d", valid ? "true" : "false", http_status);
	append_json_field(&buf, "reason", reason, &first);
	append_json_field(&buf, "ack", ack, &first);
	appendStringInfoString(&buf, ", \"events\": [");
	foreach(lc, events)
	{
		CrmpayWebhookEvent *e = lfirst(lc);

		first = true;
		if (lc != list_head(events))
			appendStringInfoString(&buf, ", ");
		appendStringInfoChar(&buf, '{');
		append_json_field(&buf, "event_key", e->event_key, &first);
		append_json_field(&buf, "event_type", e->event_type, &first);
		append_json_field(&buf, "gateway_ref", e->gateway_ref, &first);
		append_json_field(&buf, "gateway_payment_ref", e->gateway_payment_ref, &first);
		append_json_field(&buf, "order_ref", e->order_ref, &first);
		append_json_field(&buf, "new_status", e->new_status, &first);
		append_json_int(&buf, "amount_minor", e->amount_minor, &first);
		append_json_field(&buf, "currency", e->currency, &first);
		append_json_int(&buf, "refunded_minor", e->refunded_minor, &first);
		appendStringInfoChar(&buf, '}');
	}
	appendStringInfoString(&buf, "]}");
	return DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data));
}

PG_FUNCTION_INFO_V1(crmpay_webhook_check);

/*
 * crmpay._webhook_check(account text, headers jsonb, body text,
 *						 at timestamptz) RETURNS jsonb
 *		{"provider", "valid", "http_status", "reason", "ack", "events": [...]}
 */
Datum
crmpay_webhook_check(PG_FUNCTION_ARGS)
{
	char	   *name;
	CrmpayHeaders *headers;
	text	   *body;
	TimestampTz at = PG_ARGISNULL(3) ? GetCurrentTimestamp() : PG_GETARG_TIMESTAMPTZ(3);
	CrmpayAccount *account;
	const CrmpayProvider *provider;
	CrmpayVerifyResult check;
	const char *reason = NULL;
	List	   *events;

	if (PG_ARGISNULL(0))
		PG_RETURN_DATUM(verdict(NULL, false, 404, "no account given", NULL, NIL));
	if (PG_ARGISNULL(2))
		PG_RETURN_DATUM(verdict(NULL, false, 400, "empty body", NULL, NIL));
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	body = PG_GETARG_TEXT_PP(2);

	account = crmpay_load_account(name, false, true, true);
	if (account == NULL)
		PG_RETURN_DATUM(verdict(NULL, false, 404, "unknown account", NULL, NIL));
	provider = account->provider;

	if (provider->verify_webhook == NULL || provider->parse_webhook == NULL)
		PG_RETURN_DATUM(verdict(provider->name, false, 501,
								"webhooks are not supported for this provider yet", NULL, NIL));
	if (account->webhook_secret == NULL)
		PG_RETURN_DATUM(verdict(provider->name, false, 400,
								"account has no webhook secret", NULL, NIL));
	if (VARSIZE_ANY_EXHDR(body) > (Size) crmpay_max_webhook_bytes)
		PG_RETURN_DATUM(verdict(provider->name, false, 413,
								"body larger than crmpay.max_webhook_bytes", NULL, NIL));

	headers = PG_ARGISNULL(1) ? palloc0(sizeof(CrmpayHeaders))
		: crmpay_headers_from_jsonb(PG_GETARG_DATUM(1));

	check = provider->verify_webhook(account->webhook_secret, headers,
									 VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body),
									 crmpay_webhook_tolerance_s, at);
	if (!check.valid)
		PG_RETURN_DATUM(verdict(provider->name, false, 400, check.reason, NULL, NIL));

	events = provider->parse_webhook(headers, VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body), &reason);
	if (events == NIL)
		PG_RETURN_DATUM(verdict(provider->name, false, 400,
								reason ? reason : "no events in delivery", NULL, NIL));
	PG_RETURN_DATUM(verdict(provider->name, true, 200, NULL, provider->webhook_ack, events));
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
