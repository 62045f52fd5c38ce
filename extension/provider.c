/*-------------------------------------------------------------------------
 *
 * provider.c
 *	  The provider registry, gateway accounts (loading and opening their
 *	  secrets), and the gateway-neutral steps of creating a payment link:
 *	  request building and answer parsing belong to the providers; HTTP,
 *	  failure classification and error reporting live here, once.
 *
 *	  Adding a gateway: write its file (see stripe.c) and add one line to
 *	  the providers[] table below.
 *
 *-------------------------------------------------------------------------
 */
#include "provider.h"

#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "mb/pg_wchar.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/inval.h"
#include "utils/memutils.h"

/* Gateways accepted by add_account that have no implementation yet. */

/* The registry: one line per gateway. */
static const CrmpayProvider *const providers[] = {
	&crmpay_stripe_provider,
	&crmpay_paypal_provider,
	&crmpay_braintree_provider,
	&crmpay_adyen_provider,
	&crmpay_redsys_provider,
};

/* "stripe, paypal, ..." for error hints. */
const char *
crmpay_provider_names(void)
{
	StringInfoData buf;
	int			i;

	initStringInfo(&buf);
	for (i = 0; i < lengthof(providers); i++)
		appendStringInfo(&buf, "%s%s", i ? ", " : "", providers[i]->name);
	return buf.data;
}

/* Looks a provider up by name; ERROR (or NULL with missing_ok) if unknown. */
const CrmpayProvider *
crmpay_find_provider(const char *name, bool missing_ok)
{
	int			i;

	for (i = 0; i < lengthof(providers); i++)
		if (name != NULL && strcmp(providers[i]->name, name) == 0)
			return providers[i];
	if (missing_ok)
		return NULL;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown payment provider \"%s\"", name ? name : "(null)"),
			 errhint("Use one of: %s.", crmpay_provider_names())));
	pg_unreachable();
}

/* Raises "not supported yet" for a provider operation that is missing. */
static void
require_operation(const CrmpayProvider *provider, const void *operation,
				  const char *what)
{
	if (operation == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s is not supported for provider \"%s\" in this version of crmpay",
						what, provider->name)));
}

/*
 * Opened accounts are cached per backend: webhook intake and link creation
 * would otherwise read and decrypt the account on every call.  A statement
 * trigger on crmpay.gateway_accounts (crmpay._cached_table_changed) sends a
 * relcache invalidation for the table on every change; every backend then
 * drops its cache (wiping the secrets) when it processes the invalidation,
 * at the latest at its next transaction start.
 */
typedef struct CachedAccount
{
	struct CachedAccount *next;
	CrmpayAccount account;
	char	   *credentials_text;	/* decrypted, wiped on reset */
} CachedAccount;

static MemoryContext account_cache_cxt = NULL;
static CachedAccount *account_cache = NULL;
static Oid	accounts_relid = InvalidOid;

/* Drops the cache, wiping the decrypted secrets first. */
static void
reset_account_cache(void)
{
	CachedAccount *entry;

	for (entry = account_cache; entry != NULL; entry = entry->next)
	{
		if (entry->credentials_text)
			explicit_bzero(entry->credentials_text, strlen(entry->credentials_text));
		if (entry->account.webhook_secret)
			explicit_bzero(entry->account.webhook_secret, strlen(entry->account.webhook_secret));
	}
	account_cache = NULL;
	if (account_cache_cxt != NULL)
		MemoryContextReset(account_cache_cxt);
}

/* Relcache callback: any change to crmpay.gateway_accounts (or a full reset). */
static void
account_cache_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == accounts_relid)
	{
		reset_account_cache();
		accounts_relid = InvalidOid;	/* the table may have been recreated */
	}
}

/*
 * read_account
 *		Reads an account row and opens both secrets, allocating the result in
 *		the cache context.  NULL if there is no such account.
 */
static CachedAccount *
read_account(const char *name)
{
	static SPIPlanPtr plan = NULL;
	CachedAccount *entry = NULL;
	Datum		values[1];

	values[0] = CStringGetTextDatum(name);
	SPI_connect();
	{
		static const Oid argtypes[1] = {TEXTOID};

		crmpay_saved_plan(&plan,
						  "SELECT provider, credentials, webhook_secret, settings::text,"
						  "       'crmpay.gateway_accounts'::regclass::oid"
						  "  FROM crmpay.gateway_accounts WHERE name = $1",
						  1, argtypes);
	}
	crmpay_spi_run(plan, values, NULL, true, 1, SPI_OK_SELECT, "account lookup");

	if (SPI_processed == 1)
	{
		TupleDesc	desc = SPI_tuptable->tupdesc;
		HeapTuple	tuple = SPI_tuptable->vals[0];
		bool		isnull;
		Datum		d;
		MemoryContext spicxt = MemoryContextSwitchTo(account_cache_cxt);
		CrmpayAccount *account;
		const char *settings_text;
		const char *error;

		entry = palloc0(sizeof(CachedAccount));
		account = &entry->account;
		account->name = pstrdup(name);
		account->provider = crmpay_find_provider(SPI_getvalue(tuple, desc, 1), false);
		accounts_relid = DatumGetObjectId(SPI_getbinval(tuple, desc, 5, &isnull));

		settings_text = SPI_getvalue(tuple, desc, 4);
		account->settings = crmpay_json_parse(settings_text, strlen(settings_text), &error);
		if (account->settings == NULL)
			elog(ERROR, "crmpay: settings of account \"%s\" unreadable: %s", name, error);

		d = SPI_getbinval(tuple, desc, 2, &isnull);
		entry->credentials_text = crmpay_decrypt_secret(DatumGetByteaPP(d),
														psprintf("crmpay:%s:credentials", name));
		account->credentials = crmpay_json_parse(entry->credentials_text,
												 strlen(entry->credentials_text), &error);
		if (account->credentials == NULL)
			elog(ERROR, "crmpay: credentials of account \"%s\" unreadable", name);

		d = SPI_getbinval(tuple, desc, 3, &isnull);
		if (!isnull)
			account->webhook_secret = crmpay_decrypt_secret(DatumGetByteaPP(d),
															psprintf("crmpay:%s:webhook_secret", name));
		if (account->webhook_secret == NULL &&
			account->provider->webhook_secret_credential != NULL)
		{
			/* the gateway signs webhooks with one of the credentials */
			const char *key = crmpay_json_str(account->credentials,
											  account->provider->webhook_secret_credential);

			account->webhook_secret = key ? pstrdup(key) : NULL;
		}
		account->api_base = crmpay_setting(account, "api_base");
		if (account->api_base == NULL)
			account->api_base = account->provider->default_api_base;
		MemoryContextSwitchTo(spicxt);
	}
	SPI_finish();
	return entry;
}

/*
 * crmpay_load_account
 *		The named account with its secrets opened, from the backend's cache
 *		or read now.  The result belongs to the cache: read it, do not change
 *		it, and do not keep it across transactions.
 */
CrmpayAccount *
crmpay_load_account(const char *name, bool missing_ok)
{
	CachedAccount *entry;

	if (account_cache_cxt == NULL)
	{
		account_cache_cxt = AllocSetContextCreate(CacheMemoryContext, "crmpay accounts",
												  ALLOCSET_SMALL_SIZES);
		CacheRegisterRelcacheCallback(account_cache_invalidate, (Datum) 0);
	}

	for (entry = account_cache; entry != NULL; entry = entry->next)
		if (strcmp(entry->account.name, name) == 0)
			return &entry->account;

	PG_TRY();
	{
		entry = read_account(name);
	}
	PG_CATCH();
	{
		/* a half-built entry is not in the list; drop what it allocated */
		reset_account_cache();
		PG_RE_THROW();
	}
	PG_END_TRY();

	if (entry != NULL)
	{
		entry->next = account_cache;
		account_cache = entry;
		return &entry->account;
	}
	if (!missing_ok)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("payment account \"%s\" does not exist", name),
				 errhint("Add it with crmpay.add_account(); crmpay.accounts lists the existing ones.")));
	return NULL;
}

PG_FUNCTION_INFO_V1(crmpay_cached_table_changed);

/*
 * crmpay._cached_table_changed() statement trigger on the tables backends
 * cache (crmpay.gateway_accounts, crmpay.status_transitions): tells every
 * backend (at commit) to drop its cached copy.
 */
Datum
crmpay_cached_table_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "crmpay: _cached_table_changed must be called as a trigger");
	CacheInvalidateRelcache(trigdata->tg_relation);
	return PointerGetDatum(NULL);
}

/* A string setting of the account, or NULL. */
const char *
crmpay_setting(const CrmpayAccount *account, const char *key)
{
	return crmpay_json_str(account->settings, key);
}

const char *
crmpay_failure_kind_name(CrmpayFailureKind kind)
{
	switch (kind)
	{
		case CRMPAY_FAIL_NONE:
			return "none";
		case CRMPAY_FAIL_REJECTED:
			return "rejected";
		case CRMPAY_FAIL_AUTH:
			return "authentication";
		case CRMPAY_FAIL_CONFLICT:
			return "idempotency_conflict";
		case CRMPAY_FAIL_RATE_LIMITED:
			return "rate_limited";
		case CRMPAY_FAIL_UNAVAILABLE:
			return "unavailable";
		case CRMPAY_FAIL_TRANSPORT:
			return "transport";
		case CRMPAY_FAIL_BAD_RESPONSE:
			return "bad_response";
	}
	return "unknown";
}

/*
 * crmpay_classify_http_failure
 *		Sorts a response into a failure kind by transport and HTTP status,
 *		then lets the provider read its error body for code and message.
 */
void
crmpay_classify_http_failure(const CrmpayAccount *account,
							 const CrmpayHttpResponse *response,
							 CrmpayGatewayFailure *failure)
{
	memset(failure, 0, sizeof(*failure));
	failure->http_status = (int) response->status;
	failure->retry_after = response->retry_after;
	failure->transport = response->transport;

	if (response->transport != CRMPAY_TRANSPORT_OK)
	{
		failure->kind = CRMPAY_FAIL_TRANSPORT;
		failure->retryable = true;
		failure->code = pstrdup(crmpay_transport_name(response->transport));
		failure->message = response->error ? pstrdup(response->error) : NULL;
		return;
	}
	if (response->status >= 200 && response->status < 300)
		return;

	if (response->status == 401 || response->status == 403)
		failure->kind = CRMPAY_FAIL_AUTH;
	else if (response->status == 429)
		failure->kind = CRMPAY_FAIL_RATE_LIMITED;
	else if (response->status >= 500 || response->status == 408 || response->status == 409)
		failure->kind = CRMPAY_FAIL_UNAVAILABLE;	/* 409: same key in flight */
	else
		failure->kind = CRMPAY_FAIL_REJECTED;

	if (account->provider->parse_error != NULL)
		account->provider->parse_error(response, failure);
	failure->retryable = (failure->kind == CRMPAY_FAIL_RATE_LIMITED ||
						  failure->kind == CRMPAY_FAIL_UNAVAILABLE ||
						  failure->kind == CRMPAY_FAIL_TRANSPORT);
	if (failure->message == NULL)
	{
		/* No readable error body: show a bounded, printable excerpt. */
		size_t		n = Min(response->body_len, 200);

		failure->message = psprintf("HTTP %ld: %s", response->status,
									n > 0 && pg_verifymbstr(response->body, (int) n, true)
									? pnstrdup(response->body, n) : "(no readable body)");
	}
}

/*
 * scrub_secrets
 *		Masks any credential value of the account that a gateway message
 *		might echo, so no secret reaches an error, a log or a table.
 */
static char *
scrub_secrets(const CrmpayAccount *account, const char *text)
{
	char	   *result;
	int			i;

	if (text == NULL)
		return NULL;
	result = pstrdup(text);
	if (account == NULL || account->credentials == NULL ||
		account->credentials->kind != CRMPAY_JSON_OBJECT)
		return result;
	for (i = 0; i < account->credentials->count; i++)
	{
		const CrmpayJson *v = account->credentials->items[i];
		char	   *hit;

		if (v->kind != CRMPAY_JSON_STRING || strlen(v->text) < 6)
			continue;
		while ((hit = strstr(result, v->text)) != NULL)
			memset(hit, '*', strlen(v->text));
	}
	return result;
}

/*
 * failure_message
 *		What a failed gateway call means, for an ERROR or a job's record:
 *		the message, its SQLSTATE and a hint (may be NULL).  SQLSTATE by
 *		kind: 08001 cannot connect (incl. TLS), 08006 timeout/dropped/5xx,
 *		08P01 unreadable answer, 28000 credentials refused, 53400 rate
 *		limited, 22023 request refused or idempotency conflict.
 */
static const char *
failure_message(const CrmpayGatewayFailure *failure, int *sqlstate, const char **hint)
{
	*hint = NULL;
	switch (failure->kind)
	{
		case CRMPAY_FAIL_AUTH:
			*sqlstate = ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
			*hint = "Check the account's credentials with crmpay.update_account().";
			return "gateway refused the account's credentials";
		case CRMPAY_FAIL_CONFLICT:
			*sqlstate = ERRCODE_INVALID_PARAMETER_VALUE;
			*hint = "The idempotency key of an order is fixed; send the same details again, or use a new order_ref.";
			return "gateway already received this order with different details";
		case CRMPAY_FAIL_REJECTED:
			*sqlstate = ERRCODE_INVALID_PARAMETER_VALUE;
			return "gateway rejected the request";
		case CRMPAY_FAIL_RATE_LIMITED:
			*sqlstate = ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;
			*hint = "Retry later, or use crmpay.request_payment_link(), which retries with backoff.";
			return "gateway is rate limiting requests";
		case CRMPAY_FAIL_UNAVAILABLE:
			*sqlstate = ERRCODE_CONNECTION_FAILURE;
			*hint = "Retry later, or use crmpay.request_payment_link(), which retries with backoff.";
			return "gateway is unavailable";
		case CRMPAY_FAIL_TRANSPORT:
			*sqlstate = (failure->transport == CRMPAY_TRANSPORT_CONNECT ||
						 failure->transport == CRMPAY_TRANSPORT_TLS)
				? ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
				: ERRCODE_CONNECTION_FAILURE;
			if (failure->transport == CRMPAY_TRANSPORT_TLS)
				*hint = "The gateway's certificate must verify against the system CAs or crmpay.ca_file.";
			else if (failure->transport == CRMPAY_TRANSPORT_TIMEOUT)
				*hint = "The gateway may have created the link anyway: retrying the same call is safe (same idempotency key). See crmpay.connect_timeout and crmpay.request_timeout.";
			else
				*hint = "The gateway may have created the link anyway: retrying the same call is safe (same idempotency key).";
			return failure->transport == CRMPAY_TRANSPORT_TLS
				? "could not establish a verified TLS connection to the gateway"
				: failure->transport == CRMPAY_TRANSPORT_TIMEOUT
				? "gateway request timed out"
				: failure->transport == CRMPAY_TRANSPORT_CONNECT
				? "could not connect to the gateway"
				: "gateway connection failed";
		case CRMPAY_FAIL_BAD_RESPONSE:
		default:
			*sqlstate = ERRCODE_PROTOCOL_VIOLATION;
			*hint = "Retrying the same call is safe (same idempotency key); check the account's api_base.";
			return "gateway answered something crmpay cannot read";
	}
}

/* The errdetail of a failure: "HTTP 400, code: gateway's words" (secrets masked). */
static char *
failure_detail(const CrmpayAccount *account, const CrmpayGatewayFailure *failure)
{
	char	   *detail = scrub_secrets(account, failure->message);

	if (failure->http_status)
		return psprintf("HTTP %d%s%s: %s", failure->http_status,
						failure->code ? ", " : "", failure->code ? failure->code : "",
						detail ? detail : "");
	return detail ? detail : pstrdup(crmpay_failure_kind_name(failure->kind));
}

/*
 * crmpay_describe_failure
 *		A failed gateway call in one line, for a job's last_error:
 *		"gateway is unavailable: HTTP 503, api_error: ...".  No secrets.
 */
char *
crmpay_describe_failure(const CrmpayAccount *account, const CrmpayGatewayFailure *failure)
{
	int			sqlstate;
	const char *hint;

	return psprintf("%s: %s", failure_message(failure, &sqlstate, &hint),
					failure_detail(account, failure));
}

/* The SQLSTATE (five characters) a failed gateway call is reported with. */
const char *
crmpay_failure_sqlstate(const CrmpayGatewayFailure *failure)
{
	int			sqlstate;
	const char *hint;

	failure_message(failure, &sqlstate, &hint);
	return unpack_sql_state(sqlstate);
}

/*
 * crmpay_raise_gateway_failure
 *		Reports a failed gateway call as an ERROR (SQLSTATE by kind, see
 *		failure_message).
 */
void
crmpay_raise_gateway_failure(const CrmpayAccount *account,
							 const CrmpayGatewayFailure *failure)
{
	int			sqlstate;
	const char *hint;
	const char *message = failure_message(failure, &sqlstate, &hint);

	ereport(ERROR,
			(errcode(sqlstate),
			 errmsg("%s (account \"%s\", provider %s)", message, account->name,
					account->provider->name),
			 errdetail("%s", failure_detail(account, failure)),
			 hint ? errhint("%s", hint) : 0));
	pg_unreachable();
}

/*
 * crmpay_gateway_call
 *		Sends one request to the account's gateway: lets the provider add its
 *		credentials (authorize), and when the gateway answers 401, has them
 *		refreshed once and sends the request again.  Returns true for a 2xx
 *		answer; false with *failure classified otherwise.
 */
bool
crmpay_gateway_call(const CrmpayAccount *account, CrmpayHttpRequest *request,
					CrmpayHttpResponse *response, CrmpayGatewayFailure *failure)
{
	const CrmpayProvider *provider = account->provider;
	List	   *base_headers = request->headers;
	int			attempt;

	memset(failure, 0, sizeof(*failure));
	for (attempt = 0; attempt < 2; attempt++)
	{
		request->headers = list_copy(base_headers);
		if (provider->authorize != NULL &&
			!provider->authorize(account, request, attempt > 0, failure))
			return false;
		crmpay_http_perform(request, response);
		if (provider->authorize == NULL || response->transport != CRMPAY_TRANSPORT_OK ||
			response->status != 401)
			break;
	}
	request->headers = base_headers;
	crmpay_classify_http_failure(account, response, failure);
	return failure->kind == CRMPAY_FAIL_NONE;
}

/*
 * crmpay_link_prepare
 *		The first half of creating a payment link, shared by the synchronous
 *		path and the worker (which sends many at once): checks the account
 *		can do it, and either makes the link at once without a gateway call
 *		(providers with local_link; returns true with *result filled) or
 *		builds the gateway request without credentials (returns false; the
 *		caller has the provider's authorize add them).  Raises for
 *		configuration errors, which no retry would fix.
 */
bool
crmpay_link_prepare(const CrmpayAccount *account,
					const CrmpayLinkRequest *request,
					CrmpayHttpRequest *http,
					CrmpayLinkResult *result)
{
	const CrmpayProvider *provider = account->provider;

	require_operation(provider, provider->build_create_link, "creating payment links");
	memset(result, 0, sizeof(*result));
	memset(http, 0, sizeof(*http));
	if (provider->local_link != NULL && provider->local_link(account, request, result))
		return true;
	if (account->api_base == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no api_base setting", account->name)));
	crmpay_http_check_url(account->api_base, "the account's api_base");
	provider->build_create_link(account, request, http);
	return false;
}

/*
 * crmpay_unreadable_answer
 *		After a provider's parse function refused a 2xx answer: the failure
 *		is an unreadable answer (worth another try), unless the parser read
 *		the gateway's own refusal in it, whose verdict is kept.  Returns
 *		false, for "return crmpay_unreadable_answer(...)".
 */
bool
crmpay_unreadable_answer(const CrmpayHttpResponse *response, CrmpayGatewayFailure *failure)
{
	if (failure->kind == CRMPAY_FAIL_NONE)
	{
		failure->kind = CRMPAY_FAIL_BAD_RESPONSE;
		failure->retryable = true;
	}
	failure->http_status = (int) response->status;
	return false;
}

/*
 * crmpay_link_finish
 *		The second half: reads the gateway's answer to a create-link
 *		request.  True with *result filled, or false with *failure saying
 *		why (and whether a retry with the same idempotency key may succeed).
 */
bool
crmpay_link_finish(const CrmpayAccount *account,
				   const CrmpayHttpResponse *response,
				   CrmpayLinkResult *result,
				   CrmpayGatewayFailure *failure)
{
	memset(result, 0, sizeof(*result));
	crmpay_classify_http_failure(account, response, failure);
	if (failure->kind != CRMPAY_FAIL_NONE)
		return false;
	/* a gateway may refuse inside a 2xx (Redsys); its verdict is kept */
	if (!account->provider->parse_create_link(account, response, result, failure))
		return crmpay_unreadable_answer(response, failure);
	return true;
}

/*
 * crmpay_create_link
 *		Asks the account's gateway for a payment link, synchronously.
 *		Returns true with *result filled, or false with *failure saying why
 *		(and whether a retry with the same idempotency key may succeed).
 *		Raises only for programming or configuration errors and interrupts.
 */
bool
crmpay_create_link(const CrmpayAccount *account,
				   const CrmpayLinkRequest *request,
				   CrmpayLinkResult *result,
				   CrmpayGatewayFailure *failure)
{
	CrmpayHttpRequest http;
	CrmpayHttpResponse response;

	memset(failure, 0, sizeof(*failure));
	if (crmpay_link_prepare(account, request, &http, result))
		return true;
	if (!crmpay_gateway_call(account, &http, &response, failure))
		return false;
	return crmpay_link_finish(account, &response, result, failure);
}

/*
 * crmpay_capture_prepare
 *		Builds the capture request of an approved link (the same for the
 *		sync crmpay.capture_payment and the worker's 'capture' jobs); the
 *		caller adds the provider's credentials (authorize) and sends it.
 */
void
crmpay_capture_prepare(const CrmpayAccount *account,
					   const CrmpayCaptureRequest *request,
					   CrmpayHttpRequest *http)
{
	const CrmpayProvider *provider = account->provider;

	require_operation(provider, provider->build_capture, "capturing payments");
	memset(http, 0, sizeof(*http));
	if (account->api_base == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no api_base setting", account->name)));
	crmpay_http_check_url(account->api_base, "the account's api_base");
	provider->build_capture(account, request, http);
}

/*
 * crmpay_capture_finish
 *		Reads the gateway's answer to a capture request.  True with *result
 *		filled (which may be a declined capture: result->status "failed"),
 *		or false with *failure saying why and whether a retry with the same
 *		request id may succeed.  Touches no database.
 */
bool
crmpay_capture_finish(const CrmpayAccount *account,
					  const CrmpayHttpResponse *response,
					  CrmpayCaptureResult *result,
					  CrmpayGatewayFailure *failure)
{
	memset(result, 0, sizeof(*result));
	result->amount_minor = -1;
	crmpay_classify_http_failure(account, response, failure);
	if (failure->kind != CRMPAY_FAIL_NONE)
		return false;
	/* unreadable: the same request id replays the answer, worth another try */
	if (!account->provider->parse_capture(account, response, result, failure))
		return crmpay_unreadable_answer(response, failure);
	return true;
}

/*
 * crmpay_capture_request_from_json
 *		Reads a capture request as built by crmpay._capture_request():
 *		{"gateway_ref", "amount_minor", "currency", "request_id"}.
 */
CrmpayCaptureRequest *
crmpay_capture_request_from_json(CrmpayJson *tree)
{
	CrmpayCaptureRequest *request = palloc0(sizeof(CrmpayCaptureRequest));

	request->gateway_ref = crmpay_json_str(tree, "gateway_ref");
	request->currency = crmpay_json_str(tree, "currency");
	request->request_id = crmpay_json_str(tree, "request_id");
	if (!crmpay_json_int64(tree, "amount_minor", &request->amount_minor) ||
		request->gateway_ref == NULL || request->currency == NULL ||
		request->request_id == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed crmpay capture request")));
	return request;
}

/*
 * crmpay_capture_result_json
 *		The capture as the JSON text crmpay._gateway_capture returns and the
 *		worker records: {"status", "gateway_status", "order_status",
 *		"capture_id", "amount_minor", "currency"} (status null when the
 *		gateway's word is unknown; amount and currency only when given).
 */
char *
crmpay_capture_result_json(const CrmpayCaptureResult *result)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"status\": ");
	if (result->status != NULL)
		escape_json(&buf, result->status);
	else
		appendStringInfoString(&buf, "null");
	appendStringInfoString(&buf, ", \"gateway_status\": ");
	escape_json(&buf, result->gateway_status ? result->gateway_status : "");
	appendStringInfoString(&buf, ", \"order_status\": ");
	if (result->order_status != NULL)
		escape_json(&buf, result->order_status);
	else
		appendStringInfoString(&buf, "null");
	appendStringInfoString(&buf, ", \"capture_id\": ");
	escape_json(&buf, result->capture_id ? result->capture_id : "");
	if (result->currency != NULL && result->amount_minor >= 0)
	{
		appendStringInfo(&buf, ", \"amount_minor\": " INT64_FORMAT ", \"currency\": ",
						 result->amount_minor);
		escape_json(&buf, result->currency);
	}
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

/* ----------------------------------------------------------------
 * Helpers for provider files
 * ----------------------------------------------------------------
 */
CrmpayWebhookEvent *
crmpay_new_event(void)
{
	CrmpayWebhookEvent *event = palloc0(sizeof(CrmpayWebhookEvent));

	event->amount_minor = -1;
	event->refunded_minor = -1;
	event->refund_minor = -1;
	return event;
}

/* A gateway record with every amount unknown (see provider.h). */
CrmpayGatewayRecord *
crmpay_new_record(const char *record_type)
{
	CrmpayGatewayRecord *rec = palloc0(sizeof(CrmpayGatewayRecord));

	rec->record_type = record_type;
	rec->amount_minor = CRMPAY_NO_AMOUNT;
	rec->refunded_minor = CRMPAY_NO_AMOUNT;
	rec->fin_amount_minor = CRMPAY_NO_AMOUNT;
	rec->fee_minor = CRMPAY_NO_AMOUNT;
	rec->net_minor = CRMPAY_NO_AMOUNT;
	return rec;
}

char *
crmpay_pstrdup_or_null(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

/* "Name: value" for an HTTP header list; refuses CR/LF injection. */
char *
crmpay_header_line(const char *name, const char *value)
{
	if (strpbrk(value, "\r\n") != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("value for HTTP header %s contains a line break", name)));
	return psprintf("%s: %s", name, value);
}

/* ----------------------------------------------------------------
 * SQL-callable functions (internal: called by the SECURITY DEFINER
 * wrappers in the install script, not granted to anyone)
 * ----------------------------------------------------------------
 */

/*
 * crmpay_link_request_from_json
 *		Reads a link request as built by crmpay._link_request() (the jsonb
 *		that the outbox stores as a job's payload).
 */
CrmpayLinkRequest *
crmpay_link_request_from_json(CrmpayJson *tree)
{
	CrmpayLinkRequest *request = palloc0(sizeof(CrmpayLinkRequest));
	int64		exponent;

	request->order_ref = crmpay_json_str(tree, "order_ref");
	request->currency = crmpay_json_str(tree, "currency");
	request->currency_numeric = crmpay_json_str(tree, "currency_numeric");
	request->email = crmpay_json_str(tree, "email");
	request->description = crmpay_json_str(tree, "description");
	request->idempotency_key = crmpay_json_str(tree, "idempotency_key");
	request->metadata = (CrmpayJson *) crmpay_json_path(tree, "metadata");
	if (!crmpay_json_int64(tree, "amount_minor", &request->amount_minor) ||
		!crmpay_json_int64(tree, "exponent", &exponent) ||
		request->order_ref == NULL || request->currency == NULL ||
		request->idempotency_key == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("malformed crmpay link request")));
	request->exponent = (int) exponent;
	return request;
}

static CrmpayLinkRequest *
link_request_from_jsonb(Datum request_jsonb)
{
	return crmpay_link_request_from_json(crmpay_json_from_jsonb_datum(request_jsonb));
}

/*
 * crmpay_link_result_json
 *		The link as the JSON text that crmpay._gateway_create_link returns
 *		and the worker records: {"gateway_ref", "url", "status", "expires_at"}.
 */
char *
crmpay_link_result_json(const CrmpayLinkResult *result)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"gateway_ref\": ");
	escape_json(&buf, result->gateway_ref);
	appendStringInfoString(&buf, ", \"url\": ");
	if (result->url != NULL)
		escape_json(&buf, result->url);
	else
		appendStringInfoString(&buf, "null");	/* a link without a URL (Redsys form) */
	appendStringInfoString(&buf, ", \"status\": ");
	escape_json(&buf, result->status ? result->status : "open");
	if (result->expires_at != 0)
	{
		appendStringInfoString(&buf, ", \"expires_at\": ");
		escape_json(&buf, timestamptz_to_str(result->expires_at));
	}
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

PG_FUNCTION_INFO_V1(crmpay_check_link_request);

/*
 * crmpay._check_link_request(account text, request jsonb) RETURNS text
 *		Refuses what the account's gateway cannot take (currency, amount
 *		limits) before anything is written.  Returns the provider name.
 */
Datum
crmpay_check_link_request(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	CrmpayAccount *account = crmpay_load_account(name, false);
	CrmpayLinkRequest *request = link_request_from_jsonb(PG_GETARG_DATUM(1));

	require_operation(account->provider, account->provider->build_create_link,
					  "creating payment links");
	if (account->provider->check_amount)
		account->provider->check_amount(request->currency, request->exponent,
										request->amount_minor);
	PG_RETURN_TEXT_P(cstring_to_text(account->provider->name));
}

PG_FUNCTION_INFO_V1(crmpay_gateway_create_link);

/*
 * crmpay._gateway_create_link(account text, request jsonb) RETURNS jsonb
 *		Synchronous link creation: one gateway call; ERROR on failure with
 *		the SQLSTATE of crmpay_raise_gateway_failure.
 */
Datum
crmpay_gateway_create_link(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	CrmpayAccount *account = crmpay_load_account(name, false);
	CrmpayLinkRequest *request = link_request_from_jsonb(PG_GETARG_DATUM(1));
	CrmpayLinkResult result;
	CrmpayGatewayFailure failure;

	if (!crmpay_create_link(account, request, &result, &failure))
		crmpay_raise_gateway_failure(account, &failure);

	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in,
										CStringGetDatum(crmpay_link_result_json(&result))));
}

PG_FUNCTION_INFO_V1(crmpay_gateway_capture);

/*
 * crmpay._gateway_capture(account text, request jsonb) RETURNS jsonb
 *		Synchronous capture (crmpay.capture_payment): one gateway call with
 *		the request of crmpay._capture_request (a retry with its request id
 *		replays the gateway's first answer).  Returns the capture as
 *		crmpay_capture_result_json; ERROR with the gateway failure otherwise.
 */
Datum
crmpay_gateway_capture(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	CrmpayAccount *account = crmpay_load_account(name, false);
	CrmpayCaptureRequest *request =
		crmpay_capture_request_from_json(crmpay_json_from_jsonb_datum(PG_GETARG_DATUM(1)));
	CrmpayHttpRequest http;
	CrmpayHttpResponse response;
	CrmpayCaptureResult result;
	CrmpayGatewayFailure failure;

	crmpay_capture_prepare(account, request, &http);
	if (!crmpay_gateway_call(account, &http, &response, &failure) ||
		!crmpay_capture_finish(account, &response, &result, &failure))
		crmpay_raise_gateway_failure(account, &failure);
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in,
										CStringGetDatum(crmpay_capture_result_json(&result))));
}

PG_FUNCTION_INFO_V1(crmpay_validate_account);

/*
 * crmpay._validate_account(name, provider, credentials, webhook_secret,
 *							settings) RETURNS void
 *		Checks an account's shape for add_account/update_account.
 */
Datum
crmpay_validate_account(PG_FUNCTION_ARGS)
{
	const CrmpayProvider *provider;
	CrmpayJson *credentials;
	CrmpayJson *settings;
	const char *webhook_secret = PG_ARGISNULL(3) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(3));
	const char *api_base;

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("provider must not be null"),
				 errhint("Use one of: %s.", crmpay_provider_names())));
	provider = crmpay_find_provider(text_to_cstring(PG_GETARG_TEXT_PP(1)), false);
	if (!PG_ARGISNULL(2))
		credentials = crmpay_json_from_jsonb_datum(PG_GETARG_DATUM(2));
	else
	{
		/* update_account without new credentials: check against the stored ones */
		CrmpayAccount *existing = PG_ARGISNULL(0) ? NULL
			: crmpay_load_account(text_to_cstring(PG_GETARG_TEXT_PP(0)), true);

		if (existing == NULL || existing->credentials == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("credentials must not be null")));
		credentials = existing->credentials;
	}
	settings = PG_ARGISNULL(4) ? NULL : crmpay_json_from_jsonb_datum(PG_GETARG_DATUM(4));

	if (credentials->kind != CRMPAY_JSON_OBJECT)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("credentials must be a JSON object")));
	if (settings != NULL && settings->kind != CRMPAY_JSON_OBJECT)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("settings must be a JSON object")));
	if (webhook_secret != NULL && webhook_secret[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("webhook_secret must not be empty"),
				 errhint("Pass NULL when the account has no webhook secret yet.")));

	api_base = settings ? crmpay_json_str(settings, "api_base") : NULL;
	if (api_base != NULL)
		crmpay_http_check_url(api_base, "settings.api_base");

	if (provider->validate_account != NULL)
		provider->validate_account(credentials, settings, webhook_secret);
	PG_RETURN_VOID();
}

PG_FUNCTION_INFO_V1(crmpay_seal);

/* crmpay._seal(plaintext text, aad text) RETURNS bytea */
Datum
crmpay_seal(PG_FUNCTION_ARGS)
{
	text	   *plain = PG_GETARG_TEXT_PP(0);
	char	   *aad = text_to_cstring(PG_GETARG_TEXT_PP(1));

	PG_RETURN_BYTEA_P(crmpay_encrypt_secret(VARDATA_ANY(plain),
											VARSIZE_ANY_EXHDR(plain), aad));
}
