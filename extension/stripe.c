/*-------------------------------------------------------------------------
 *
 * stripe.c
 *	  The Stripe provider: hosted Checkout Sessions as payment links, the
 *	  Stripe error format, and Stripe-Signature webhook verification.
 *
 *	  Wire format (https://stripe.com/docs/api):
 *	  - POST {api_base}/v1/checkout/sessions, "Authorization: Bearer sk_...",
 *		form-encoded with bracket notation, "Idempotency-Key" header.
 *	  - Errors: {"error": {"type", "code", "message", "param"}}.
 *	  - Webhooks: "Stripe-Signature: t=<unix>,v1=<hex>[,v1=...]", where v1 =
 *		hex(HMAC-SHA256(key = whole whsec_ string, t + "." + raw body)).
 *		Any v1 may match (secret rotation); other schemes are ignored; only
 *		timestamps older than the tolerance are refused, as Stripe's SDKs do.
 *
 *-------------------------------------------------------------------------
 */
#include "provider.h"

#include "utils/builtins.h"
#include "utils/formatting.h"

#include "codec.h"

#define STRIPE_MAX_AMOUNT	99999999	/* Stripe's 8-digit amount limit */

/* Appends "&name=value" (value percent-encoded) to a form body. */
static void
form_add(StringInfo body, const char *name, const char *value)
{
	if (body->len > 0)
		appendStringInfoChar(body, '&');
	appendStringInfoString(body, name);
	appendStringInfoChar(body, '=');
	crmpay_url_append_escaped(body, value);
}

/* Appends "&prefix[key]=value" with the key percent-encoded too. */
static void
form_add_keyed(StringInfo body, const char *prefix, const char *key,
			   const char *value)
{
	if (body->len > 0)
		appendStringInfoChar(body, '&');
	appendStringInfoString(body, prefix);
	appendStringInfoChar(body, '[');
	crmpay_url_append_escaped(body, key);
	appendStringInfoString(body, "]=");
	crmpay_url_append_escaped(body, value);
}

static void
stripe_validate_account(const CrmpayJson *credentials,
						const CrmpayJson *settings, const char *webhook_secret)
{
	const char *key = crmpay_json_str(credentials, "secret_key");
	const char *success_url = settings ? crmpay_json_str(settings, "success_url") : NULL;
	const char *cancel_url = settings ? crmpay_json_str(settings, "cancel_url") : NULL;

	if (key == NULL || (strncmp(key, "sk_", 3) != 0 && strncmp(key, "rk_", 3) != 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Stripe credentials need a \"secret_key\" (sk_... or rk_...)"),
				 errhint("Pass credentials like {\"secret_key\": \"sk_live_...\"}.")));
	if (success_url == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Stripe accounts need settings.success_url"),
				 errdetail("Stripe sends the customer there after paying on the hosted page."),
				 errhint("Pass settings like {\"success_url\": \"https://shop.example/paid\", \"cancel_url\": \"https://shop.example/cart\"}.")));
	crmpay_http_check_url(success_url, "settings.success_url");
	if (cancel_url != NULL)
		crmpay_http_check_url(cancel_url, "settings.cancel_url");
	if (webhook_secret != NULL && strncmp(webhook_secret, "whsec_", 6) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Stripe webhook secrets start with \"whsec_\""),
				 errhint("Copy the endpoint's signing secret from the Stripe dashboard.")));
}

/*
 * Stripe takes amounts in the currency's minor unit with at most 8 digits;
 * for three-decimal currencies the last digit must be 0.
 */
static void
stripe_check_amount(const char *currency, int exponent, int64 amount_minor)
{
	if (amount_minor > STRIPE_MAX_AMOUNT)
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("amount is too large for Stripe"),
				 errdetail("Stripe accepts at most %d minor units of %s; this order has " INT64_FORMAT ".",
						   STRIPE_MAX_AMOUNT, currency, amount_minor)));
	if (exponent == 3 && amount_minor % 10 != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Stripe cannot charge %s amounts with a non-zero third decimal", currency),
				 errdetail("Stripe requires three-decimal currencies to be charged in multiples of 10 minor units."),
				 errhint("Round the amount to two decimals.")));
	if (exponent > 3)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Stripe does not accept currency %s", currency)));
}

/* Adds metadata both to the session and to its PaymentIntent. */
static void
stripe_add_metadata(StringInfo body, const char *prefix,
					const CrmpayLinkRequest *request)
{
	form_add_keyed(body, prefix, "crmpay_order_ref", request->order_ref);
	if (request->metadata != NULL && request->metadata->kind == CRMPAY_JSON_OBJECT)
	{
		int			i;

		for (i = 0; i < request->metadata->count; i++)
		{
			const CrmpayJson *v = request->metadata->items[i];

			if (v->kind != CRMPAY_JSON_NULL && v->text != NULL)
				form_add_keyed(body, prefix, request->metadata->keys[i], v->text);
		}
	}
}

static void
stripe_build_create_link(const CrmpayAccount *account,
						 const CrmpayLinkRequest *request,
						 CrmpayHttpRequest *out)
{
	StringInfoData body;
	const char *key = crmpay_json_str(account->credentials, "secret_key");
	const char *success_url = crmpay_setting(account, "success_url");
	const char *cancel_url = crmpay_setting(account, "cancel_url");
	char	   *currency_lower = asc_tolower(request->currency, strlen(request->currency));

	if (key == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no Stripe secret_key", account->name)));

	initStringInfo(&body);
	form_add(&body, "mode", "payment");
	form_add(&body, "line_items[0][price_data][currency]", currency_lower);
	form_add(&body, "line_items[0][price_data][unit_amount]",
			 psprintf(INT64_FORMAT, request->amount_minor));
	form_add(&body, "line_items[0][price_data][product_data][name]",
			 request->description ? request->description
			 : psprintf("Order %s", request->order_ref));
	form_add(&body, "line_items[0][quantity]", "1");
	form_add(&body, "client_reference_id", request->order_ref);
	if (request->email)
		form_add(&body, "customer_email", request->email);
	if (success_url)
		form_add(&body, "success_url", success_url);
	if (cancel_url)
		form_add(&body, "cancel_url", cancel_url);
	stripe_add_metadata(&body, "metadata", request);
	stripe_add_metadata(&body, "payment_intent_data[metadata]", request);

	out->method = "POST";
	out->url = psprintf("%s/v1/checkout/sessions", account->api_base);
	out->headers = list_make3(crmpay_header_line("Authorization", psprintf("Bearer %s", key)),
							  crmpay_header_line("Idempotency-Key", request->idempotency_key),
							  "Content-Type: application/x-www-form-urlencoded");
	out->body = body.data;
	out->body_len = body.len;
}

static bool
stripe_parse_create_link(const CrmpayAccount *account,
						 const CrmpayHttpResponse *response,
						 CrmpayLinkResult *result,
						 CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *session = crmpay_json_parse(response->body, response->body_len, &error);
	int64		expires;

	if (session == NULL || crmpay_json_str(session, "id") == NULL ||
		crmpay_json_str(session, "url") == NULL)
	{
		failure->message = psprintf("Stripe answered HTTP %ld without a session id and url%s%s",
									response->status, error ? ": " : "", error ? error : "");
		return false;
	}
	result->gateway_ref = pstrdup(crmpay_json_str(session, "id"));
	result->url = pstrdup(crmpay_json_str(session, "url"));
	result->status = "open";
	if (crmpay_json_int64(session, "expires_at", &expires))
		result->expires_at = time_t_to_timestamptz((pg_time_t) expires);
	return true;
}

static void
stripe_parse_error(const CrmpayHttpResponse *response, CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *body = crmpay_json_parse(response->body, response->body_len, &error);
	const char *type;
	const char *code;
	const char *message;
	const char *param;

	if (body == NULL)
		return;
	type = crmpay_json_str(body, "error.type");
	code = crmpay_json_str(body, "error.code");
	message = crmpay_json_str(body, "error.message");
	param = crmpay_json_str(body, "error.param");

	if (type != NULL && strcmp(type, "idempotency_error") == 0)
		failure->kind = CRMPAY_FAIL_CONFLICT;
	failure->code = crmpay_pstrdup_or_null(code ? code : type);
	if (message != NULL)
		failure->message = param ? psprintf("%s (param: %s)", message, param) : pstrdup(message);
}

/*
 * stripe_verify_webhook
 *		Checks Stripe-Signature over the raw body.  Mirrors the official
 *		SDKs: split the header on ',', each item on the first '='; accept if
 *		any v1 matches; refuse timestamps older than the tolerance.
 */
static CrmpayVerifyResult
stripe_verify_webhook(const char *secret, const CrmpayHeaders *headers,
					  const char *body, size_t body_len,
					  int64 tolerance_s, TimestampTz at)
{
	CrmpayVerifyResult result = {false, NULL};
	const char *header = crmpay_header_get(headers, "stripe-signature");
	size_t		header_len;
	size_t		pos = 0;
	CrmpayKVItem item;
	const char *timestamp = NULL;
	size_t		timestamp_len = 0;
	int64_t		t;
	bool		has_v1 = false;
	unsigned char mac[CRMPAY_MAX_MAC];
	unsigned int maclen;
	char		expected[2 * CRMPAY_MAX_MAC];
	StringInfoData signed_payload;

	if (header == NULL)
	{
		result.reason = "missing Stripe-Signature header";
		return result;
	}
	header_len = strlen(header);
	while (crmpay_kv_next(header, header_len, ',', &pos, &item))
	{
		if (item.name_len == 1 && item.name[0] == 't' && item.has_value && timestamp == NULL)
		{
			timestamp = item.value;
			timestamp_len = item.value_len;
		}
		else if (item.name_len == 2 && memcmp(item.name, "v1", 2) == 0 && item.has_value)
			has_v1 = true;
	}
	if (timestamp == NULL || !crmpay_parse_int64(timestamp, timestamp_len, &t))
	{
		result.reason = "Unable to extract timestamp and signatures from header";
		return result;
	}
	if (!has_v1)
	{
		result.reason = "No signatures found with expected scheme v1";
		return result;
	}

	/* signed_payload = t + "." + raw body */
	initStringInfo(&signed_payload);
	appendBinaryStringInfo(&signed_payload, timestamp, (int) timestamp_len);
	appendStringInfoChar(&signed_payload, '.');
	appendBinaryStringInfo(&signed_payload, body, (int) body_len);
	crmpay_hmac("SHA256", secret, strlen(secret), signed_payload.data,
				signed_payload.len, mac, &maclen);
	pfree(signed_payload.data);
	crmpay_hex_encode(mac, maclen, expected);

	pos = 0;
	while (crmpay_kv_next(header, header_len, ',', &pos, &item))
	{
		if (item.name_len == 2 && memcmp(item.name, "v1", 2) == 0 &&
			item.value_len == 2 * maclen &&
			crmpay_ct_equal(item.value, expected, 2 * maclen))
			result.valid = true;
	}
	if (!result.valid)
	{
		result.reason = "No signatures found matching the expected signature for payload";
		return result;
	}
	if (tolerance_s > 0 && t < crmpay_timestamptz_to_unix(at) - tolerance_s)
	{
		result.valid = false;
		result.reason = "Timestamp outside the tolerance zone";
	}
	return result;
}

/* The id of a field that may be a string id or an expanded object. */
static const char *
stripe_ref(const CrmpayJson *object, const char *field)
{
	const CrmpayJson *node = crmpay_json_member(object, field);

	if (node == NULL)
		return NULL;
	if (node->kind == CRMPAY_JSON_OBJECT)
		return crmpay_json_str(node, "id");
	return node->kind == CRMPAY_JSON_STRING ? node->text : NULL;
}

/* Fills amount and currency from fields of a Stripe object. */
static void
stripe_event_amount(CrmpayWebhookEvent *event, const CrmpayJson *object,
					const char *amount_field)
{
	const char *currency = crmpay_json_str(object, "currency");
	int64		amount;

	if (crmpay_json_int64(object, amount_field, &amount))
		event->amount_minor = amount;
	if (currency != NULL)
		event->currency = asc_toupper(currency, strlen(currency));
}

/*
 * stripe_parse_webhook
 *		Maps a Stripe event to the payment state machine:
 *		checkout.session.completed (paid, or processing while an async
 *		method settles), .async_payment_succeeded/failed, .expired;
 *		payment_intent.succeeded/.payment_failed/.processing;
 *		charge.refunded (full or partial) and charge.dispute.created.
 *		Other types are recorded and ignored.
 */
static List *
stripe_parse_webhook(const CrmpayHeaders *headers, const char *body,
					 size_t body_len, const char **reason)
{
	const char *error;
	CrmpayJson *root = crmpay_json_parse(body, body_len, &error);
	const CrmpayJson *object;
	CrmpayWebhookEvent *event;
	const char *type;
	const char *id;

	if (root == NULL)
	{
		*reason = psprintf("malformed JSON: %s", error);
		return NIL;
	}
	id = crmpay_json_str(root, "id");
	type = crmpay_json_str(root, "type");
	object = crmpay_json_path(root, "data.object");
	if (id == NULL || type == NULL || object == NULL || object->kind != CRMPAY_JSON_OBJECT)
	{
		*reason = "not a Stripe event (id, type and data.object required)";
		return NIL;
	}

	event = crmpay_new_event();
	event->event_key = pstrdup(id);
	event->event_type = pstrdup(type);

	if (strncmp(type, "checkout.session.", 17) == 0)
	{
		const char *payment_status = crmpay_json_str(object, "payment_status");

		event->gateway_ref = crmpay_pstrdup_or_null(crmpay_json_str(object, "id"));
		event->gateway_payment_ref = crmpay_pstrdup_or_null(stripe_ref(object, "payment_intent"));
		event->order_ref = crmpay_pstrdup_or_null(crmpay_json_str(object, "client_reference_id"));
		stripe_event_amount(event, object, "amount_total");
		if (strcmp(type, "checkout.session.completed") == 0)
			event->new_status = (payment_status && strcmp(payment_status, "unpaid") == 0)
				? "processing" : "paid";
		else if (strcmp(type, "checkout.session.async_payment_succeeded") == 0)
			event->new_status = "paid";
		else if (strcmp(type, "checkout.session.async_payment_failed") == 0)
			event->new_status = "failed";
		else if (strcmp(type, "checkout.session.expired") == 0)
			event->new_status = "expired";
	}
	else if (strncmp(type, "payment_intent.", 15) == 0)
	{
		event->gateway_payment_ref = crmpay_pstrdup_or_null(crmpay_json_str(object, "id"));
		event->order_ref = crmpay_pstrdup_or_null(crmpay_json_str(object, "metadata.crmpay_order_ref"));
		if (strcmp(type, "payment_intent.succeeded") == 0)
		{
			event->new_status = "paid";
			stripe_event_amount(event, object, "amount_received");
		}
		else if (strcmp(type, "payment_intent.payment_failed") == 0)
			event->new_status = "failed";
		else if (strcmp(type, "payment_intent.processing") == 0)
			event->new_status = "processing";
	}
	else if (strcmp(type, "charge.refunded") == 0)
	{
		int64		amount;
		int64		refunded;

		event->gateway_payment_ref = crmpay_pstrdup_or_null(stripe_ref(object, "payment_intent"));
		event->order_ref = crmpay_pstrdup_or_null(crmpay_json_str(object, "metadata.crmpay_order_ref"));
		if (crmpay_json_int64(object, "amount", &amount) &&
			crmpay_json_int64(object, "amount_refunded", &refunded) && refunded > 0)
		{
			event->refunded_minor = refunded;
			event->new_status = refunded >= amount ? "refunded" : "partially_refunded";
		}
	}
	else if (strcmp(type, "charge.dispute.created") == 0)
	{
		event->gateway_payment_ref = crmpay_pstrdup_or_null(stripe_ref(object, "payment_intent"));
		event->new_status = "disputed";
	}
	return list_make1(event);
}

/* ----------------------------------------------------------------
 * Reconciliation: list endpoints and one session at a time
 *
 *	Lists (newest first, "created[gte]/[lte]", "limit", "starting_after" the
 *	last id of the page, until "has_more" is false), one after the other:
 *	  0  /v1/checkout/sessions			the links and their state
 *	  1  /v1/payment_intents, expand data.latest_charge
 *										the charges (refunds, disputes)
 *	  2  /v1/balance_transactions, expand data.source.payment_intent
 *										amounts, fees and net; refunds
 * ----------------------------------------------------------------
 */
#define STRIPE_STREAMS 3

static const char *const stripe_list_paths[STRIPE_STREAMS] = {
	"/v1/checkout/sessions", "/v1/payment_intents", "/v1/balance_transactions"
};
static const char *const stripe_list_expand[STRIPE_STREAMS] = {
	NULL, "data.latest_charge", "data.source.payment_intent"
};

static const char *
stripe_key(const CrmpayAccount *account)
{
	const char *key = crmpay_json_str(account->credentials, "secret_key");

	if (key == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no Stripe secret_key", account->name)));
	return key;
}

static void
stripe_build_list_records(const CrmpayAccount *account, const CrmpayFetchState *state,
						  CrmpayHttpRequest *out)
{
	StringInfoData url;
	int64		since = crmpay_timestamptz_to_unix(state->since);
	int64		until = crmpay_timestamptz_to_unix(state->until);

	initStringInfo(&url);
	appendStringInfo(&url, "%s%s?limit=%d&created%%5Bgte%%5D=" INT64_FORMAT "&created%%5Blte%%5D=" INT64_FORMAT,
					 account->api_base, stripe_list_paths[state->stream],
					 Min(Max(state->page_size, 1), 100), since, until);
	if (stripe_list_expand[state->stream])
	{
		appendStringInfoString(&url, "&expand%5B%5D=");
		crmpay_url_append_escaped(&url, stripe_list_expand[state->stream]);
	}
	if (state->cursor)
	{
		appendStringInfoString(&url, "&starting_after=");
		crmpay_url_append_escaped(&url, state->cursor);
	}
	out->method = "GET";
	out->url = url.data;
	out->headers = list_make1(crmpay_header_line("Authorization", psprintf("Bearer %s", stripe_key(account))));
}

static TimestampTz
stripe_time(const CrmpayJson *object)
{
	int64		created;

	if (!crmpay_json_int64(object, "created", &created))
		return 0;
	return time_t_to_timestamptz((pg_time_t) created);
}

static char *
stripe_upper(const char *s)
{
	return s ? asc_toupper(s, strlen(s)) : NULL;
}

static int64
stripe_amount(const CrmpayJson *object, const char *field)
{
	int64		v;

	return crmpay_json_int64(object, field, &v) ? v : CRMPAY_NO_AMOUNT;
}

/* The order a Stripe object is for; otherwise a key of its own (a charge
 * crmpay did not ask for still has to be reported). */
static void
stripe_set_key(CrmpayGatewayRecord *rec, const char *order_ref, const char *own_id)
{
	rec->order_ref = crmpay_pstrdup_or_null(order_ref);
	if (order_ref)
		rec->match_key = pstrdup(order_ref);
	else if (own_id)
		rec->match_key = psprintf("stripe:%s", own_id);
}

static CrmpayGatewayRecord *
stripe_session_record(const CrmpayJson *session)
{
	CrmpayGatewayRecord *rec = crmpay_new_record("link");
	const char *id = crmpay_json_str(session, "id");
	const char *status = crmpay_json_str(session, "status");
	const char *payment_status = crmpay_json_str(session, "payment_status");
	const char *order = crmpay_json_str(session, "client_reference_id");

	if (order == NULL)
		order = crmpay_json_str(session, "metadata.crmpay_order_ref");
	rec->record_ref = crmpay_pstrdup_or_null(id);
	rec->gateway_ref = crmpay_pstrdup_or_null(id);
	rec->gateway_payment_ref = crmpay_pstrdup_or_null(stripe_ref(session, "payment_intent"));
	stripe_set_key(rec, order, NULL);
	if (rec->match_key == NULL && rec->gateway_payment_ref)
		rec->match_key = psprintf("stripe:%s", rec->gateway_payment_ref);
	if (status && strcmp(status, "open") == 0)
		rec->status = "open";
	else if (status && strcmp(status, "expired") == 0)
		rec->status = "expired";
	else if (status && strcmp(status, "complete") == 0)
		rec->status = (payment_status && strcmp(payment_status, "unpaid") == 0) ? "processing" : "paid";
	rec->gateway_status = psprintf("%s/%s", status ? status : "?", payment_status ? payment_status : "?");
	rec->amount_minor = stripe_amount(session, "amount_total");
	rec->currency = stripe_upper(crmpay_json_str(session, "currency"));
	rec->occurred_at = stripe_time(session);
	return rec;
}

static CrmpayGatewayRecord *
stripe_intent_record(const CrmpayJson *pi)
{
	CrmpayGatewayRecord *rec = crmpay_new_record("charge");
	const char *id = crmpay_json_str(pi, "id");
	const char *status = crmpay_json_str(pi, "status");
	const CrmpayJson *charge = crmpay_json_member(pi, "latest_charge");

	rec->record_ref = crmpay_pstrdup_or_null(id);
	rec->gateway_payment_ref = crmpay_pstrdup_or_null(id);
	stripe_set_key(rec, crmpay_json_str(pi, "metadata.crmpay_order_ref"), id);
	rec->gateway_status = crmpay_pstrdup_or_null(status);
	rec->currency = stripe_upper(crmpay_json_str(pi, "currency"));
	rec->occurred_at = stripe_time(pi);
	rec->amount_minor = stripe_amount(pi, "amount");
	if (status == NULL)
		rec->status = NULL;
	else if (strcmp(status, "succeeded") == 0)
	{
		rec->status = "paid";
		rec->amount_minor = stripe_amount(pi, "amount_received");
		if (charge != NULL && charge->kind == CRMPAY_JSON_OBJECT)
		{
			const char *disputed = crmpay_json_str(charge, "disputed");

			rec->refunded_minor = stripe_amount(charge, "amount_refunded");
			if (disputed && strcmp(disputed, "true") == 0)
				rec->status = "disputed";
		}
	}
	else if (strcmp(status, "processing") == 0 || strcmp(status, "requires_capture") == 0)
		rec->status = "processing";
	else if (strcmp(status, "canceled") == 0)
		rec->status = "canceled";
	else if (strcmp(status, "requires_payment_method") == 0)
	{
		const CrmpayJson *err = crmpay_json_member(pi, "last_payment_error");

		rec->status = (err && err->kind == CRMPAY_JSON_OBJECT) ? "failed" : "open";
	}
	else
		rec->status = "open";
	return rec;
}

static CrmpayGatewayRecord *
stripe_balance_record(const CrmpayJson *txn)
{
	const char *type = crmpay_json_str(txn, "type");
	const CrmpayJson *source = crmpay_json_member(txn, "source");
	const CrmpayJson *pi = NULL;
	const char *pi_id = NULL;
	const char *order = NULL;
	bool		is_charge = type && (strcmp(type, "charge") == 0 || strcmp(type, "payment") == 0);
	bool		is_refund = type && (strcmp(type, "refund") == 0 || strcmp(type, "payment_refund") == 0);
	CrmpayGatewayRecord *rec = crmpay_new_record(is_charge ? "balance" : is_refund ? "refund" : "other");

	if (source && source->kind == CRMPAY_JSON_OBJECT && (is_charge || is_refund))
	{
		pi = crmpay_json_member(source, "payment_intent");
		pi_id = stripe_ref(source, "payment_intent");
		if (pi && pi->kind == CRMPAY_JSON_OBJECT)
			order = crmpay_json_str(pi, "metadata.crmpay_order_ref");
		if (order == NULL)
			order = crmpay_json_str(source, "metadata.crmpay_order_ref");
		rec->gateway_payment_ref = crmpay_pstrdup_or_null(pi_id);
		stripe_set_key(rec, order, pi_id ? pi_id : crmpay_json_str(source, "id"));
		if (is_refund)
		{
			rec->amount_minor = stripe_amount(source, "amount");
			rec->currency = stripe_upper(crmpay_json_str(source, "currency"));
		}
	}
	rec->record_ref = crmpay_pstrdup_or_null(crmpay_json_str(txn, "id"));
	rec->gateway_status = crmpay_pstrdup_or_null(type);
	rec->fin_currency = stripe_upper(crmpay_json_str(txn, "currency"));
	rec->fin_amount_minor = stripe_amount(txn, "amount");
	rec->fee_minor = stripe_amount(txn, "fee");
	rec->net_minor = stripe_amount(txn, "net");
	if (rec->fin_currency == NULL || rec->fin_amount_minor == CRMPAY_NO_AMOUNT)
		rec->fin_currency = NULL;
	rec->occurred_at = stripe_time(txn);
	return rec;
}

/* Reads a list page: {"object": "list", "data": [...], "has_more": bool}. */
static bool
stripe_parse_list_records(const CrmpayAccount *account, const CrmpayHttpResponse *response,
						  CrmpayFetchState *state, List **records, CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *root = crmpay_json_parse(response->body, response->body_len, &error);
	const CrmpayJson *data;
	const char *has_more;
	const char *last_id = NULL;
	int			i;

	*records = NIL;
	data = root ? crmpay_json_member(root, "data") : NULL;
	has_more = root ? crmpay_json_str(root, "has_more") : NULL;
	if (root == NULL || data == NULL || data->kind != CRMPAY_JSON_ARRAY || has_more == NULL)
	{
		failure->message = psprintf("Stripe answered HTTP %ld to %s without a list%s%s",
									response->status, stripe_list_paths[state->stream],
									error ? ": " : "", error ? error : "");
		return false;
	}
	for (i = 0; i < data->count; i++)
	{
		const CrmpayJson *item = data->items[i];
		CrmpayGatewayRecord *rec;

		if (item->kind != CRMPAY_JSON_OBJECT || crmpay_json_str(item, "id") == NULL)
		{
			failure->message = psprintf("Stripe list %s has an item without an id",
										stripe_list_paths[state->stream]);
			return false;
		}
		last_id = crmpay_json_str(item, "id");
		rec = state->stream == 0 ? stripe_session_record(item)
			: state->stream == 1 ? stripe_intent_record(item)
			: stripe_balance_record(item);
		*records = lappend(*records, rec);
	}
	if (strcmp(has_more, "true") == 0)
	{
		if (last_id == NULL)
		{
			failure->message = psprintf("Stripe list %s says has_more with no items",
										stripe_list_paths[state->stream]);
			return false;
		}
		state->cursor = pstrdup(last_id);
	}
	else
	{
		state->cursor = NULL;
		state->stream++;
		state->done = (state->stream >= STRIPE_STREAMS);
	}
	return true;
}

/* One session (with its PaymentIntent and charge) by the link's id. */
static bool
stripe_build_query_order(const CrmpayAccount *account, const CrmpayOrderQuery *order,
						 CrmpayHttpRequest *out)
{
	StringInfoData url;

	if (order->gateway_ref == NULL)
		return false;
	initStringInfo(&url);
	appendStringInfo(&url, "%s/v1/checkout/sessions/", account->api_base);
	crmpay_url_append_escaped(&url, order->gateway_ref);
	appendStringInfoString(&url, "?expand%5B%5D=payment_intent.latest_charge");
	out->method = "GET";
	out->url = url.data;
	out->headers = list_make1(crmpay_header_line("Authorization", psprintf("Bearer %s", stripe_key(account))));
	return true;
}

static bool
stripe_parse_query_order(const CrmpayAccount *account, const CrmpayOrderQuery *order,
						 const CrmpayHttpResponse *response, List **records,
						 CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *session = crmpay_json_parse(response->body, response->body_len, &error);
	const CrmpayJson *pi;

	*records = NIL;
	if (session == NULL || crmpay_json_str(session, "id") == NULL)
	{
		failure->message = psprintf("Stripe answered HTTP %ld without a checkout session%s%s",
									response->status, error ? ": " : "", error ? error : "");
		return false;
	}
	*records = lappend(*records, stripe_session_record(session));
	pi = crmpay_json_member(session, "payment_intent");
	if (pi && pi->kind == CRMPAY_JSON_OBJECT && crmpay_json_str(pi, "id"))
	{
		CrmpayGatewayRecord *rec = stripe_intent_record(pi);

		/* the session's order wins: the PaymentIntent may carry no metadata */
		if (rec->order_ref == NULL && ((CrmpayGatewayRecord *) linitial(*records))->order_ref)
		{
			rec->order_ref = pstrdup(((CrmpayGatewayRecord *) linitial(*records))->order_ref);
			rec->match_key = pstrdup(rec->order_ref);
		}
		*records = lappend(*records, rec);
	}
	return true;
}

const CrmpayProvider crmpay_stripe_provider = {
	.name = "stripe",
	.default_api_base = "https://api.stripe.com",
	.webhook_ack = "",
	.validate_account = stripe_validate_account,
	.check_amount = stripe_check_amount,
	.build_create_link = stripe_build_create_link,
	.parse_create_link = stripe_parse_create_link,
	.parse_error = stripe_parse_error,
	.verify_webhook = stripe_verify_webhook,
	.parse_webhook = stripe_parse_webhook,
	.build_list_records = stripe_build_list_records,
	.parse_list_records = stripe_parse_list_records,
	.build_query_order = stripe_build_query_order,
	.parse_query_order = stripe_parse_query_order,
};
