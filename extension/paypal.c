/*-------------------------------------------------------------------------
 *
 * paypal.c
 *	  The PayPal provider: Orders v2 as payment links, the shared OAuth2
 *	  token, the capture step, PayPal's error formats and webhook
 *	  verification (offline with the signing certificate, or online).
 *
 *	  Wire format (https://developer.paypal.com/docs/api/orders/v2/):
 *	  - POST {api_base}/v1/oauth2/token, HTTP Basic client_id:client_secret,
 *		form body grant_type=client_credentials -> {"access_token",
 *		"expires_in", ...}.  One token per account, shared by every session
 *		and the worker through crmpay.oauth_tokens (sealed like the other
 *		secrets), refreshed shortly before it expires or after a 401.
 *	  - POST {api_base}/v2/checkout/orders with "PayPal-Request-Id" (the
 *		order's idempotency key), intent CAPTURE, the amount as a decimal
 *		string in major units; the link rel "approve" is the payment link.
 *	  - POST {api_base}/v2/checkout/orders/{id}/capture with its own
 *		PayPal-Request-Id, once the buyer approved (CHECKOUT.ORDER.APPROVED).
 *	  - Errors: {"name", "message", "debug_id", "details": [{"issue",
 *		"description", "field"}]}; OAuth errors {"error", "error_description"}.
 *	  - Webhooks: headers PAYPAL-TRANSMISSION-ID/-TIME/-SIG, PAYPAL-CERT-URL,
 *		PAYPAL-AUTH-ALGO; the signature is RSA-SHA256 over
 *		"id|time|webhook_id|crc32(raw body)" with the certificate at
 *		PAYPAL-CERT-URL (or pinned in the webhook secret).
 *
 *	  OpenSSL objects never outlive a function except in the certificate
 *	  cache, which owns them; nothing between their creation and their
 *	  release can raise an ERROR.
 *
 *-------------------------------------------------------------------------
 */
#include "provider.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

#include "codec.h"

char	   *crmpay_paypal_cert_hosts = NULL;

/* Refresh the token this long before PayPal says it expires (at most). */
#define TOKEN_EARLY_REFRESH_S	300
/* Largest signing certificate file we fetch */
#define MAX_CERT_BYTES			(64 * 1024)
/* Certificates kept per backend */
#define CERT_CACHE_SIZE			8
/* PayPal's custom_id and description limits */
#define PAYPAL_CUSTOM_ID_MAX	127
#define PAYPAL_DESCRIPTION_MAX	127

/* Defines crmpay.paypal_cert_hosts; called from _PG_init. */
void
crmpay_paypal_define_gucs(void)
{
	DefineCustomStringVariable("crmpay.paypal_cert_hosts",
							   gettext_noop("Extra hosts (comma-separated) PayPal webhook signing certificates may be fetched from."),
							   gettext_noop("Certificates are always fetched over verified HTTPS; paypal.com and its subdomains are always allowed. For local test doubles only."),
							   &crmpay_paypal_cert_hosts,
							   NULL,
							   PGC_SUSET,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
}

/* ----------------------------------------------------------------
 * Money: ISO 4217 exponents and exact decimal strings
 * ----------------------------------------------------------------
 */

/*
 * crmpay_iso_exponent
 *		The ISO 4217 minor-unit exponent of a currency; 2 for any code not
 *		listed (an unknown code never matches a payment's currency anyway).
 *		Must agree with crmpay.currencies (checked by the regression tests).
 */
int
crmpay_iso_exponent(const char *currency)
{
	static const char *const zero[] = {"BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW",
	"PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"};
	static const char *const three[] = {"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"};
	static const char *const four[] = {"CLF", "UYW"};
	int			i;

	if (currency == NULL)
		return 2;
	for (i = 0; i < lengthof(zero); i++)
		if (strcmp(currency, zero[i]) == 0)
			return 0;
	for (i = 0; i < lengthof(three); i++)
		if (strcmp(currency, three[i]) == 0)
			return 3;
	for (i = 0; i < lengthof(four); i++)
		if (strcmp(currency, four[i]) == 0)
			return 4;
	return 2;
}

/*
 * crmpay_minor_to_decimal
 *		"1999" minor units with exponent 2 -> "19.99"; exponent 0 -> "1999".
 *		Exact integer arithmetic, never floating point.
 */
char *
crmpay_minor_to_decimal(int64 amount_minor, int exponent)
{
	int64		scale = 1;
	int			i;

	Assert(amount_minor >= 0 && exponent >= 0 && exponent <= 4);
	for (i = 0; i < exponent; i++)
		scale *= 10;
	if (exponent == 0)
		return psprintf(INT64_FORMAT, amount_minor);
	return psprintf(INT64_FORMAT ".%0*" INT64_MODIFIER "d", amount_minor / scale,
					exponent, amount_minor % scale);
}

/*
 * crmpay_decimal_to_minor
 *		Parses a non-negative decimal string ("19.99", "500", "1.5") into
 *		minor units of the given exponent.  false if it is malformed, has
 *		more decimals than the exponent or does not fit in int64.
 */
bool
crmpay_decimal_to_minor(const char *value, int exponent, int64 *out)
{
	const char *dot;
	size_t		int_len;
	size_t		frac_len = 0;
	int64_t		whole;
	int64		frac = 0;
	int64		scale = 1;
	int			i;

	if (value == NULL || *value == '\0' || exponent < 0 || exponent > 4)
		return false;
	dot = strchr(value, '.');
	int_len = dot ? (size_t) (dot - value) : strlen(value);
	if (int_len == 0 || !crmpay_parse_int64(value, int_len, &whole))
		return false;
	if (dot != NULL)
	{
		frac_len = strlen(dot + 1);
		if (frac_len == 0 || frac_len > (size_t) exponent)
			return false;
		for (i = 0; i < (int) frac_len; i++)
		{
			if (dot[1 + i] < '0' || dot[1 + i] > '9')
				return false;
			frac = frac * 10 + (dot[1 + i] - '0');
		}
	}
	for (i = 0; i < exponent; i++)
		scale *= 10;
	for (i = (int) frac_len; i < exponent; i++)
		frac *= 10;
	if (whole > (PG_INT64_MAX - frac) / scale)
		return false;
	*out = whole * scale + frac;
	return true;
}

/* Currencies PayPal's REST API takes (developer.paypal.com, "Currency codes"). */
static const char *const paypal_currencies[] = {
	"AUD", "BRL", "CAD", "CNY", "CZK", "DKK", "EUR", "HKD", "HUF", "ILS", "JPY", "MYR",
	"MXN", "TWD", "NZD", "NOK", "PHP", "PLN", "GBP", "RUB", "SGD", "SEK", "CHF", "THB", "USD"
};

static bool
paypal_takes_currency(const char *currency)
{
	int			i;

	for (i = 0; i < lengthof(paypal_currencies); i++)
		if (strcmp(currency, paypal_currencies[i]) == 0)
			return true;
	return false;
}

/* PayPal refuses decimals for these, whatever ISO 4217 says (HUF, TWD: 2). */
static bool
paypal_no_decimals(const char *currency)
{
	return strcmp(currency, "JPY") == 0 || strcmp(currency, "HUF") == 0 ||
		strcmp(currency, "TWD") == 0;
}

/* The "value" PayPal wants for an amount in minor units. */
static char *
paypal_amount_value(const char *currency, int exponent, int64 amount_minor)
{
	if (paypal_no_decimals(currency))
	{
		int64		scale = 1;
		int			i;

		for (i = 0; i < exponent; i++)
			scale *= 10;
		Assert(amount_minor % scale == 0);
		return psprintf(INT64_FORMAT, amount_minor / scale);
	}
	return crmpay_minor_to_decimal(amount_minor, exponent);
}

/* Reads {"currency_code", "value"} into minor units; false if unreadable. */
static bool
paypal_read_amount(const CrmpayJson *amount, int64 *minor, char **currency)
{
	const char *code = crmpay_json_str(amount, "currency_code");
	const char *value = crmpay_json_str(amount, "value");

	if (code == NULL || value == NULL || strlen(code) != 3)
		return false;
	if (!crmpay_decimal_to_minor(value, crmpay_iso_exponent(code), minor))
		return false;
	*currency = pstrdup(code);
	return true;
}

static void
paypal_check_amount(const char *currency, int exponent, int64 amount_minor)
{
	if (!paypal_takes_currency(currency))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("PayPal does not accept currency %s", currency),
				 errdetail("PayPal's REST API takes: AUD, BRL, CAD, CHF, CNY, CZK, DKK, EUR, GBP, HKD, HUF, ILS, JPY, MXN, MYR, NOK, NZD, PHP, PLN, RUB, SEK, SGD, THB, TWD, USD."),
				 errhint("Use another currency, or an account of a gateway that takes %s.", currency)));
	if (paypal_no_decimals(currency) && exponent > 0)
	{
		int64		scale = 1;
		int			i;

		for (i = 0; i < exponent; i++)
			scale *= 10;
		if (amount_minor % scale != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("PayPal cannot charge %s amounts with decimals", currency),
					 errdetail("PayPal takes %s in whole units only; this order has " INT64_FORMAT " minor units.",
							   currency, amount_minor),
					 errhint("Round the amount to a whole number of %s.", currency)));
	}
}

/* ----------------------------------------------------------------
 * Accounts
 * ----------------------------------------------------------------
 */

/* A string member that is present and not empty. */
static bool
has_text(const CrmpayJson *object, const char *key)
{
	const char *v = crmpay_json_str(object, key);

	return v != NULL && v[0] != '\0';
}

/*
 * paypal_validate_account
 *		credentials {"client_id", "client_secret"}; settings return_url and
 *		cancel_url (https), optional webhook_verification offline|online;
 *		webhook secret {"webhook_id", "cert_pem"?} as JSON text.
 */
static void
paypal_validate_account(const CrmpayJson *credentials, const CrmpayJson *settings,
						const char *webhook_secret)
{
	const char *return_url = settings ? crmpay_json_str(settings, "return_url") : NULL;
	const char *cancel_url = settings ? crmpay_json_str(settings, "cancel_url") : NULL;
	const char *verification = settings ? crmpay_json_str(settings, "webhook_verification") : NULL;

	if (!has_text(credentials, "client_id") || !has_text(credentials, "client_secret"))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("PayPal credentials need \"client_id\" and \"client_secret\""),
				 errdetail("crmpay obtains OAuth2 tokens with the REST app's client credentials."),
				 errhint("Pass credentials like {\"client_id\": \"AX...\", \"client_secret\": \"EC...\"} from the app in PayPal's developer dashboard.")));
	if (return_url == NULL || cancel_url == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("PayPal accounts need settings.return_url and settings.cancel_url"),
				 errdetail("PayPal sends the buyer to return_url after approving, and to cancel_url on cancel."),
				 errhint("Pass settings like {\"return_url\": \"https://shop.example/paid\", \"cancel_url\": \"https://shop.example/cart\"}.")));
	crmpay_http_check_url(return_url, "settings.return_url");
	crmpay_http_check_url(cancel_url, "settings.cancel_url");
	if (verification != NULL && strcmp(verification, "offline") != 0 &&
		strcmp(verification, "online") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("settings.webhook_verification must be \"offline\" or \"online\""),
				 errhint("\"offline\" (the default) checks the signature with PayPal's certificate; \"online\" asks PayPal's verify-webhook-signature API.")));
	if (webhook_secret != NULL)
	{
		const char *error;
		CrmpayJson *secret = crmpay_json_parse(webhook_secret, strlen(webhook_secret), &error);
		const char *pem = secret ? crmpay_json_str(secret, "cert_pem") : NULL;

		if (secret == NULL || secret->kind != CRMPAY_JSON_OBJECT || !has_text(secret, "webhook_id"))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("a PayPal webhook secret is a JSON object with \"webhook_id\""),
					 errhint("Pass webhook_secret like '{\"webhook_id\": \"8PT597110X687430LKGECATA\"}', optionally with \"cert_pem\" to pin PayPal's signing certificate.")));
		if (pem != NULL && strstr(pem, "-----BEGIN CERTIFICATE-----") == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("webhook secret \"cert_pem\" is not a PEM certificate"),
					 errhint("Paste the PEM text, starting with -----BEGIN CERTIFICATE-----.")));
	}
}

/* ----------------------------------------------------------------
 * The shared OAuth2 token (crmpay.oauth_tokens)
 * ----------------------------------------------------------------
 */
enum
{
	TOKEN_READ,
	TOKEN_READ_LOCKED,
	TOKEN_ENSURE_ROW,
	TOKEN_STORE,
	NUM_TOKEN_PLANS
};

static SPIPlanPtr token_plans[NUM_TOKEN_PLANS];

static SPIPlanPtr
token_plan(int which)
{
	static const char *const sql[NUM_TOKEN_PLANS] = {
		[TOKEN_READ] = "SELECT token, refresh_after FROM crmpay.oauth_tokens WHERE account = $1",
		[TOKEN_READ_LOCKED] = "SELECT token, refresh_after FROM crmpay.oauth_tokens WHERE account = $1 FOR UPDATE",
		[TOKEN_ENSURE_ROW] = "INSERT INTO crmpay.oauth_tokens (account) VALUES ($1) ON CONFLICT DO NOTHING",
		[TOKEN_STORE] = ("UPDATE crmpay.oauth_tokens SET token = $2, expires_at = $3, refresh_after = $4,"
						 " refreshed_at = now(), refresh_count = refresh_count + 1 WHERE account = $1"),
	};
	static const int nargs[NUM_TOKEN_PLANS] = {1, 1, 1, 4};
	Oid			types[4] = {TEXTOID, BYTEAOID, TIMESTAMPTZOID, TIMESTAMPTZOID};

	return crmpay_saved_plan(&token_plans[which], sql[which], nargs[which], types);
}

static char *
token_aad(const CrmpayAccount *account)
{
	return psprintf("crmpay:%s:oauth_token", account->name);
}

/*
 * read_token
 *		The stored token of the account (opened) if it is still fresh and is
 *		not the one the gateway just refused; NULL otherwise.  The caller is
 *		connected to SPI; result allocated in caller_cxt.
 */
static char *
read_token(const CrmpayAccount *account, int which, const char *refused,
		   MemoryContext caller_cxt)
{
	Datum		values[1] = {CStringGetTextDatum(account->name)};
	bool		isnull;
	Datum		sealed;
	TimestampTz refresh_after;
	char	   *token;
	int			rc = SPI_execute_plan(token_plan(which), values, NULL, which == TOKEN_READ, 1);

	if (rc != SPI_OK_SELECT)
		elog(ERROR, "crmpay: token lookup failed: %s", SPI_result_code_string(rc));
	if (SPI_processed != 1)
		return NULL;
	sealed = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		return NULL;
	refresh_after = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
													  SPI_tuptable->tupdesc, 2, &isnull));
	if (isnull || refresh_after <= GetCurrentTimestamp())
		return NULL;
	token = crmpay_decrypt_secret(DatumGetByteaPP(sealed), token_aad(account));
	if (refused != NULL && strcmp(token, refused) == 0)
	{
		explicit_bzero(token, strlen(token));
		return NULL;
	}
	return MemoryContextStrdup(caller_cxt, token);
}

/*
 * fetch_token
 *		Asks PayPal for a new token (client credentials grant).  Returns it
 *		with its lifetime, or NULL with *failure.  The token never reaches a
 *		message: failures carry PayPal's OAuth error only.
 */
static char *
fetch_token(const CrmpayAccount *account, int64 *expires_in, CrmpayGatewayFailure *failure)
{
	const char *client_id = crmpay_json_str(account->credentials, "client_id");
	const char *client_secret = crmpay_json_str(account->credentials, "client_secret");
	CrmpayHttpRequest request = {0};
	CrmpayHttpResponse response;
	char	   *pair;
	char	   *b64;
	size_t		n;
	const char *error;
	CrmpayJson *answer;
	const char *token;
	const char *type;

	if (client_id == NULL || client_secret == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no PayPal client_id/client_secret", account->name)));
	pair = psprintf("%s:%s", client_id, client_secret);
	b64 = palloc(CRMPAY_BASE64_ENCODED_LEN(strlen(pair)) + 1);
	n = crmpay_base64_encode((unsigned char *) pair, strlen(pair), b64, false);
	b64[n] = '\0';
	explicit_bzero(pair, strlen(pair));

	request.method = "POST";
	request.url = psprintf("%s/v1/oauth2/token", account->api_base);
	request.headers = list_make3(psprintf("Authorization: Basic %s", b64),
								 "Content-Type: application/x-www-form-urlencoded",
								 "Accept: application/json");
	request.body = "grant_type=client_credentials";
	request.body_len = strlen(request.body);
	crmpay_http_perform(&request, &response);
	explicit_bzero(b64, n);

	crmpay_classify_http_failure(account, &response, failure);
	if (failure->kind != CRMPAY_FAIL_NONE)
	{
		if (failure->message != NULL)
			failure->message = psprintf("token request: %s", failure->message);
		return NULL;
	}
	answer = crmpay_json_parse(response.body, response.body_len, &error);
	token = answer ? crmpay_json_str(answer, "access_token") : NULL;
	type = answer ? crmpay_json_str(answer, "token_type") : NULL;
	if (token == NULL || token[0] == '\0' || strpbrk(token, "\r\n") != NULL ||
		(type != NULL && pg_strcasecmp(type, "Bearer") != 0) ||
		!crmpay_json_int64(answer, "expires_in", expires_in) || *expires_in <= 0)
	{
		failure->kind = CRMPAY_FAIL_BAD_RESPONSE;
		failure->retryable = true;
		failure->http_status = (int) response.status;
		failure->message = pstrdup("PayPal's token answer has no usable access_token and expires_in");
		return NULL;
	}
	return pstrdup(token);
}

/*
 * paypal_token
 *		The account's shared bearer token.  Fresh stored tokens are used as
 *		they are; otherwise the token row is locked (FOR UPDATE: concurrent
 *		refreshers wait, then see the committed new token instead of asking
 *		PayPal again) and a new token is fetched and stored sealed.
 *		refused: the token PayPal just answered 401 to (NULL if none).
 */
static char *
paypal_token(const CrmpayAccount *account, const char *refused, CrmpayGatewayFailure *failure)
{
	MemoryContext caller_cxt = CurrentMemoryContext;
	Datum		name = CStringGetTextDatum(account->name);
	char	   *token;
	int64		expires_in;
	int			rc;

	SPI_connect();
	token = read_token(account, TOKEN_READ, refused, caller_cxt);
	if (token == NULL)
	{
		rc = SPI_execute_plan(token_plan(TOKEN_ENSURE_ROW), &name, NULL, false, 0);
		if (rc != SPI_OK_INSERT)
			elog(ERROR, "crmpay: token row insert failed: %s", SPI_result_code_string(rc));
		/* someone may have refreshed it while we waited for the lock */
		token = read_token(account, TOKEN_READ_LOCKED, refused, caller_cxt);
	}
	if (token == NULL)
	{
		MemoryContext spi_cxt = MemoryContextSwitchTo(caller_cxt);
		char	   *fresh = fetch_token(account, &expires_in, failure);

		MemoryContextSwitchTo(spi_cxt);
		if (fresh != NULL)
		{
			TimestampTz now = GetCurrentTimestamp();
			int64		early = Min(TOKEN_EARLY_REFRESH_S, expires_in / 4);
			Datum		values[4];

			values[0] = name;
			values[1] = PointerGetDatum(crmpay_encrypt_secret(fresh, strlen(fresh),
															  token_aad(account)));
			values[2] = TimestampTzGetDatum(now + expires_in * USECS_PER_SEC);
			values[3] = TimestampTzGetDatum(now + (expires_in - early) * USECS_PER_SEC);
			rc = SPI_execute_plan(token_plan(TOKEN_STORE), values, NULL, false, 0);
			if (rc != SPI_OK_UPDATE)
				elog(ERROR, "crmpay: token store failed: %s", SPI_result_code_string(rc));
			token = fresh;
		}
	}
	SPI_finish();
	return token;
}

/* The token last put on a request, to tell PayPal's 401 about it. */
static char *last_token = NULL;

/* CrmpayProvider.authorize: "Authorization: Bearer <shared token>". */
static bool
paypal_authorize(const CrmpayAccount *account, CrmpayHttpRequest *request, bool refresh,
				 CrmpayGatewayFailure *failure)
{
	char	   *token = paypal_token(account, refresh ? last_token : NULL, failure);

	if (last_token != NULL)
	{
		explicit_bzero(last_token, strlen(last_token));
		pfree(last_token);
		last_token = NULL;
	}
	if (token == NULL)
		return false;
	last_token = MemoryContextStrdup(TopMemoryContext, token);
	request->headers = lappend(request->headers, psprintf("Authorization: Bearer %s", token));
	return true;
}

/* ----------------------------------------------------------------
 * Orders
 * ----------------------------------------------------------------
 */

/* Appends "key": "value" (value escaped), with a comma if needed. */
static void
json_member(StringInfo buf, const char *key, const char *value, bool first)
{
	if (!first)
		appendStringInfoString(buf, ", ");
	escape_json(buf, key);
	appendStringInfoString(buf, ": ");
	escape_json(buf, value);
}

/* At most max characters of s (never cutting a multibyte character). */
static char *
clip(const char *s, int max)
{
	return pnstrdup(s, pg_mbcharcliplen(s, strlen(s), max));
}

static void
paypal_build_create_link(const CrmpayAccount *account, const CrmpayLinkRequest *request,
						 CrmpayHttpRequest *out)
{
	StringInfoData body;
	const char *return_url = crmpay_setting(account, "return_url");
	const char *cancel_url = crmpay_setting(account, "cancel_url");

	initStringInfo(&body);
	appendStringInfoString(&body, "{\"intent\": \"CAPTURE\", \"purchase_units\": [{");
	json_member(&body, "reference_id", request->order_ref, true);
	if (strlen(request->order_ref) <= PAYPAL_CUSTOM_ID_MAX)
		json_member(&body, "custom_id", request->order_ref, false);
	json_member(&body, "description",
				clip(request->description ? request->description
					 : psprintf("Order %s", request->order_ref), PAYPAL_DESCRIPTION_MAX), false);
	appendStringInfoString(&body, ", \"amount\": {");
	json_member(&body, "currency_code", request->currency, true);
	json_member(&body, "value", paypal_amount_value(request->currency, request->exponent,
													request->amount_minor), false);
	appendStringInfoString(&body, "}}]");
	if (request->email != NULL)
	{
		appendStringInfoString(&body, ", \"payer\": {");
		json_member(&body, "email_address", request->email, true);
		appendStringInfoChar(&body, '}');
	}
	appendStringInfoString(&body, ", \"application_context\": {");
	json_member(&body, "return_url", return_url ? return_url : "", true);
	json_member(&body, "cancel_url", cancel_url ? cancel_url : "", false);
	json_member(&body, "user_action", "PAY_NOW", false);
	json_member(&body, "shipping_preference", "NO_SHIPPING", false);
	appendStringInfoString(&body, "}}");

	out->method = "POST";
	out->url = psprintf("%s/v2/checkout/orders", account->api_base);
	out->headers = list_make3(crmpay_header_line("PayPal-Request-Id", request->idempotency_key),
							  "Content-Type: application/json",
							  "Prefer: return=minimal");
	out->body = body.data;
	out->body_len = body.len;
}

/* The href of the first link with one of the given rels. */
static const char *
paypal_link(const CrmpayJson *object, const char *rel1, const char *rel2)
{
	const CrmpayJson *links = crmpay_json_member(object, "links");
	int			i;

	if (links == NULL || links->kind != CRMPAY_JSON_ARRAY)
		return NULL;
	for (i = 0; i < links->count; i++)
	{
		const char *rel = crmpay_json_str(links->items[i], "rel");

		if (rel != NULL && (strcmp(rel, rel1) == 0 || (rel2 && strcmp(rel, rel2) == 0)))
			return crmpay_json_str(links->items[i], "href");
	}
	return NULL;
}

static bool
paypal_parse_create_link(const CrmpayAccount *account, const CrmpayHttpResponse *response,
						 CrmpayLinkResult *result, CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *order = crmpay_json_parse(response->body, response->body_len, &error);
	const char *id = order ? crmpay_json_str(order, "id") : NULL;
	const char *approve = order ? paypal_link(order, "approve", "payer-action") : NULL;
	const char *status = order ? crmpay_json_str(order, "status") : NULL;

	if (id == NULL || approve == NULL)
	{
		failure->message = psprintf("PayPal answered HTTP %ld without an order id and approve link%s%s",
									response->status, error ? ": " : "", error ? error : "");
		return false;
	}
	result->gateway_ref = pstrdup(id);
	result->url = pstrdup(approve);
	(void) status;
	result->status = "open";
	return true;
}

/*
 * paypal_parse_error
 *		Orders errors {"name", "message", "debug_id", "details": [{"issue",
 *		"description", "field"}]} and OAuth errors {"error",
 *		"error_description"}.
 */
static void
paypal_parse_error(const CrmpayHttpResponse *response, CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *body = crmpay_json_parse(response->body, response->body_len, &error);
	const char *name;
	const char *message;
	const char *issue;
	const char *description;
	const char *field;
	const char *debug_id;
	StringInfoData buf;

	if (body == NULL || body->kind != CRMPAY_JSON_OBJECT)
		return;
	if (crmpay_json_str(body, "error") != NULL)
	{
		failure->code = pstrdup(crmpay_json_str(body, "error"));
		if (crmpay_json_str(body, "error_description") != NULL)
			failure->message = pstrdup(crmpay_json_str(body, "error_description"));
		return;
	}
	name = crmpay_json_str(body, "name");
	message = crmpay_json_str(body, "message");
	issue = crmpay_json_str(body, "details.0.issue");
	description = crmpay_json_str(body, "details.0.description");
	field = crmpay_json_str(body, "details.0.field");
	debug_id = crmpay_json_str(body, "debug_id");
	if (name == NULL && message == NULL)
		return;
	if (issue != NULL && strcmp(issue, "PAYPAL_REQUEST_ID_PREVIOUSLY_USED") == 0)
		failure->kind = CRMPAY_FAIL_CONFLICT;
	failure->code = crmpay_pstrdup_or_null(issue ? issue : name);
	initStringInfo(&buf);
	appendStringInfoString(&buf, message ? message : name);
	if (description != NULL)
		appendStringInfo(&buf, " %s", description);
	if (field != NULL)
		appendStringInfo(&buf, " (field %s)", field);
	if (debug_id != NULL)
		appendStringInfo(&buf, " [debug_id %s]", debug_id);
	failure->message = buf.data;
}

/*
 * paypal_build_capture
 *		POST {api_base}/v2/checkout/orders/{id}/capture with the payment's
 *		own PayPal-Request-Id (a retry replays PayPal's first answer).
 */
static void
paypal_build_capture(const CrmpayAccount *account, const CrmpayCaptureRequest *request,
					 CrmpayHttpRequest *out)
{
	StringInfoData url;

	initStringInfo(&url);
	appendStringInfo(&url, "%s/v2/checkout/orders/", account->api_base);
	crmpay_url_append_escaped(&url, request->gateway_ref);
	appendStringInfoString(&url, "/capture");

	out->method = "POST";
	out->url = url.data;
	out->headers = list_make3(crmpay_header_line("PayPal-Request-Id", request->request_id),
							  "Content-Type: application/json",
							  "Prefer: return=representation");
	out->body = "{}";
	out->body_len = 2;
}

/*
 * paypal_parse_capture
 *		The order with purchase_units[0].payments.captures[0]: its id, status
 *		(COMPLETED -> paid, PENDING -> processing, DECLINED/FAILED ->
 *		failed) and amount.
 */
static bool
paypal_parse_capture(const CrmpayAccount *account, const CrmpayHttpResponse *response,
					 CrmpayCaptureResult *result, CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *order = crmpay_json_parse(response->body, response->body_len, &error);
	const CrmpayJson *capture;
	const char *id;
	const char *status;

	capture = order ? crmpay_json_path(order, "purchase_units.0.payments.captures.0") : NULL;
	id = capture ? crmpay_json_str(capture, "id") : NULL;
	status = capture ? crmpay_json_str(capture, "status") : NULL;
	if (id == NULL || status == NULL)
	{
		failure->message = psprintf("PayPal's capture answer has no purchase_units[0].payments.captures[0] with id and status%s%s",
									error ? ": " : "", error ? error : "");
		return false;
	}
	result->capture_id = pstrdup(id);
	result->gateway_status = pstrdup(status);
	result->order_status = crmpay_pstrdup_or_null(crmpay_json_str(order, "status"));
	if (strcmp(status, "COMPLETED") == 0)
		result->status = "paid";
	else if (strcmp(status, "PENDING") == 0)
		result->status = "processing";
	else if (strcmp(status, "DECLINED") == 0 || strcmp(status, "FAILED") == 0)
		result->status = "failed";
	if (!paypal_read_amount(crmpay_json_path(capture, "amount"), &result->amount_minor,
							&result->currency))
	{
		result->amount_minor = -1;
		result->currency = NULL;
	}
	return true;
}

/* ----------------------------------------------------------------
 * Webhook authenticity
 * ----------------------------------------------------------------
 */

/*
 * parse_transmission_time
 *		"2024-05-01T10:00:00Z" (fractions of a second allowed) -> Unix seconds.
 */
static bool
parse_transmission_time(const char *s, int64 *out)
{
	int			y, mo, d, h, mi, sec;
	int			n = 0;
	const char *p;
	int64		days;
	int			yy;
	int			era;
	unsigned	yoe, doy, doe;

	if (s == NULL || sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &n) != 6 ||
		n != 19)
		return false;
	p = s + n;
	if (*p == '.')
	{
		p++;
		if (*p < '0' || *p > '9')
			return false;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	if (strcmp(p, "Z") != 0 && strcmp(p, "+00:00") != 0)
		return false;
	if (y < 1970 || y > 9999 || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60)
		return false;
	/* days from civil (proleptic Gregorian) */
	yy = y - (mo <= 2);
	era = yy / 400;
	yoe = (unsigned) (yy - era * 400);
	doy = (unsigned) ((153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1);
	doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	days = (int64) era * 146097 + (int64) doe - 719468;
	*out = days * 86400 + h * 3600 + mi * 60 + sec;
	return true;
}

/* Is host one crmpay may fetch signing certificates from? */
static bool
cert_host_allowed(const char *host)
{
	size_t		len = strlen(host);
	char	   *list;
	char	   *tok;
	char	   *save = NULL;

	if (pg_strcasecmp(host, "paypal.com") == 0 ||
		(len > 11 && pg_strcasecmp(host + len - 11, ".paypal.com") == 0))
		return true;
	if (crmpay_paypal_cert_hosts == NULL || crmpay_paypal_cert_hosts[0] == '\0')
		return false;
	list = pstrdup(crmpay_paypal_cert_hosts);
	for (tok = strtok_r(list, ", ", &save); tok != NULL; tok = strtok_r(NULL, ", ", &save))
		if (pg_strcasecmp(tok, host) == 0)
			return true;
	return false;
}

/* The host of an https:// URL, or NULL if it is not one we accept. */
static char *
cert_url_host(const char *url)
{
	const char *start;
	size_t		n;
	const char *p;

	if (pg_strncasecmp(url, "https://", 8) != 0)
		return NULL;
	start = url + 8;
	n = strcspn(start, "/?#");
	if (n == 0 || memchr(start, '@', n) != NULL)
		return NULL;
	for (p = start; p < start + n; p++)
		if (!(isalnum((unsigned char) *p) || *p == '.' || *p == '-' || *p == ':'))
			return NULL;
	/* strip the port */
	p = memchr(start, ':', n);
	if (p != NULL)
		n = p - start;
	return n > 0 ? pnstrdup(start, n) : NULL;
}

typedef struct CertEntry
{
	char		key[128];		/* the URL, or "pin:" + sha256 of the PEM */
	X509	   *leaf;
	bool		chain_ok;
	const char *problem;		/* static text when the certificate is unusable */
} CertEntry;

static CertEntry cert_cache[CERT_CACHE_SIZE];
static int	cert_cache_next = 0;

/* Does CN or a DNS SAN of the certificate end in ".paypal.com"? */
static bool
cert_is_paypal(X509 *cert)
{
	GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
	X509_NAME  *subject = X509_get_subject_name(cert);
	bool		ok = false;
	int			i;

#define PAYPAL_SUFFIX(data, len) \
	((len) > 11 && memchr((data), '\0', (len)) == NULL && \
	 pg_strncasecmp((const char *) (data) + (len) - 11, ".paypal.com", 11) == 0)

	for (i = 0; names != NULL && i < sk_GENERAL_NAME_num(names) && !ok; i++)
	{
		const GENERAL_NAME *gn = sk_GENERAL_NAME_value(names, i);

		if (gn->type == GEN_DNS)
			ok = PAYPAL_SUFFIX(ASN1_STRING_get0_data(gn->d.dNSName),
							   ASN1_STRING_length(gn->d.dNSName));
	}
	if (names != NULL)
		GENERAL_NAMES_free(names);
	i = -1;
	while (!ok && subject != NULL &&
		   (i = X509_NAME_get_index_by_NID(subject, NID_commonName, i)) >= 0)
	{
		ASN1_STRING *cn = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i));

		ok = PAYPAL_SUFFIX(ASN1_STRING_get0_data(cn), ASN1_STRING_length(cn));
	}
	return ok;
}

/*
 * load_cert
 *		Parses a PEM (leaf first, then intermediates) and, unless pinned,
 *		verifies its chain against crmpay.ca_file or the system CAs at time
 *		at.  Fills *entry (which then owns the leaf).  Raises nothing.
 */
static void
load_cert(const char *pem, size_t pem_len, bool pinned, time_t at, CertEntry *entry)
{
	BIO		   *bio = BIO_new_mem_buf(pem, (int) pem_len);
	STACK_OF(X509) *chain = sk_X509_new_null();
	X509_STORE *store = NULL;
	X509_STORE_CTX *ctx = NULL;
	X509	   *leaf = NULL;
	X509	   *extra;

	entry->leaf = NULL;
	entry->chain_ok = false;
	entry->problem = NULL;
	if (bio == NULL || chain == NULL)
		entry->problem = "out of memory reading the certificate";
	else if ((leaf = PEM_read_bio_X509(bio, NULL, NULL, NULL)) == NULL)
		entry->problem = "PAYPAL-CERT-URL did not give a PEM certificate";
	else
	{
		while ((extra = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL)
			if (!sk_X509_push(chain, extra))
				X509_free(extra);
		if (!cert_is_paypal(leaf))
			entry->problem = "signing certificate is not issued to a .paypal.com name";
		else if (pinned)
			entry->chain_ok = true;
		else
		{
			store = X509_STORE_new();
			ctx = X509_STORE_CTX_new();
			if (store != NULL && ctx != NULL &&
				(crmpay_ca_file != NULL && crmpay_ca_file[0] != '\0'
				 ? X509_STORE_load_file(store, crmpay_ca_file)
				 : X509_STORE_set_default_paths(store)) == 1 &&
				X509_STORE_CTX_init(ctx, store, leaf, chain) == 1)
			{
				X509_VERIFY_PARAM_set_time(X509_STORE_CTX_get0_param(ctx), at);
				entry->chain_ok = X509_verify_cert(ctx) == 1;
			}
			if (!entry->chain_ok)
				entry->problem = "signing certificate does not chain to a trusted CA";
		}
	}
	if (ctx != NULL)
		X509_STORE_CTX_free(ctx);
	if (store != NULL)
		X509_STORE_free(store);
	if (chain != NULL)
		sk_X509_pop_free(chain, X509_free);
	if (bio != NULL)
		BIO_free(bio);
	ERR_clear_error();
	if (entry->problem == NULL)
		entry->leaf = leaf;
	else if (leaf != NULL)
		X509_free(leaf);
}

/* The cache slot for key, or NULL. */
static CertEntry *
cert_cache_find(const char *key)
{
	int			i;

	for (i = 0; i < CERT_CACHE_SIZE; i++)
		if (cert_cache[i].leaf != NULL && strcmp(cert_cache[i].key, key) == 0)
			return &cert_cache[i];
	return NULL;
}

/* Puts a loaded certificate in the cache (evicting the oldest entry). */
static CertEntry *
cert_cache_put(const char *key, CertEntry *loaded)
{
	CertEntry  *slot = &cert_cache[cert_cache_next];

	cert_cache_next = (cert_cache_next + 1) % CERT_CACHE_SIZE;
	if (slot->leaf != NULL)
		X509_free(slot->leaf);
	*slot = *loaded;
	strlcpy(slot->key, key, sizeof(slot->key));
	return slot;
}

/*
 * signing_cert
 *		The certificate to check a delivery with: pinned in the secret, or
 *		fetched (over verified HTTPS, from an allowed host) from cert_url and
 *		cached.  NULL with *reason when there is none we trust.
 */
static X509 *
signing_cert(const char *pinned_pem, const char *cert_url, time_t at, const char **reason)
{
	char		key[128];
	CertEntry  *entry;
	CertEntry	loaded;

	if (pinned_pem != NULL)
	{
		unsigned char digest[CRMPAY_MAX_MAC];
		unsigned int len;
		char		hex[2 * CRMPAY_MAX_MAC + 1];

		crmpay_digest("SHA256", pinned_pem, strlen(pinned_pem), digest, &len);
		crmpay_hex_encode(digest, len, hex);
		hex[2 * len] = '\0';
		snprintf(key, sizeof(key), "pin:%s", hex);
	}
	else
	{
		char	   *host;

		if (cert_url == NULL)
		{
			*reason = "missing PAYPAL-CERT-URL header";
			return NULL;
		}
		host = cert_url_host(cert_url);
		if (host == NULL)
		{
			*reason = "PAYPAL-CERT-URL is not an https URL";
			return NULL;
		}
		if (!cert_host_allowed(host))
		{
			*reason = "PAYPAL-CERT-URL is not on a PayPal host";
			return NULL;
		}
		if (strlen(cert_url) >= sizeof(key))
		{
			*reason = "PAYPAL-CERT-URL is too long";
			return NULL;
		}
		strlcpy(key, cert_url, sizeof(key));
	}

	entry = cert_cache_find(key);
	if (entry != NULL)
		return entry->leaf;

	if (pinned_pem != NULL)
		load_cert(pinned_pem, strlen(pinned_pem), true, at, &loaded);
	else
	{
		CrmpayHttpRequest request = {0};
		CrmpayHttpResponse response;

		request.method = "GET";
		request.url = cert_url;
		request.headers = list_make1("Accept: application/x-pem-file, */*");
		crmpay_http_perform(&request, &response);
		if (response.transport != CRMPAY_TRANSPORT_OK || response.status != 200)
		{
			*reason = "could not fetch the certificate at PAYPAL-CERT-URL";
			return NULL;
		}
		if (response.body_len > MAX_CERT_BYTES)
		{
			*reason = "certificate at PAYPAL-CERT-URL is too large";
			return NULL;
		}
		load_cert(response.body, response.body_len, false, at, &loaded);
	}
	if (loaded.problem != NULL)
	{
		*reason = loaded.problem;
		return NULL;
	}
	return cert_cache_put(key, &loaded)->leaf;
}

/* Verifies an RSA PKCS#1 v1.5 signature with the certificate's key. */
static bool
rsa_verify(X509 *cert, const EVP_MD *md, const unsigned char *sig, size_t siglen,
		   const char *msg, size_t msglen)
{
	EVP_PKEY   *pkey = X509_get0_pubkey(cert);
	EVP_MD_CTX *ctx;
	bool		ok;

	if (pkey == NULL || EVP_PKEY_base_id(pkey) != EVP_PKEY_RSA)
		return false;
	ctx = EVP_MD_CTX_new();
	if (ctx == NULL)
		return false;
	ok = EVP_DigestVerifyInit(ctx, NULL, md, NULL, pkey) == 1 &&
		EVP_DigestVerify(ctx, sig, siglen, (const unsigned char *) msg, msglen) == 1;
	EVP_MD_CTX_free(ctx);
	ERR_clear_error();
	return ok;
}

/* The PAYPAL-* headers of a delivery. */
typedef struct PaypalHeaders
{
	const char *id;
	const char *time;
	const char *sig;
	const char *cert_url;
	const char *algo;
} PaypalHeaders;

static const char *
read_headers(const CrmpayHeaders *headers, PaypalHeaders *h, int64 tolerance_s,
			 TimestampTz at, int64 *sent)
{
	h->id = crmpay_header_get(headers, "paypal-transmission-id");
	h->time = crmpay_header_get(headers, "paypal-transmission-time");
	h->sig = crmpay_header_get(headers, "paypal-transmission-sig");
	h->cert_url = crmpay_header_get(headers, "paypal-cert-url");
	h->algo = crmpay_header_get(headers, "paypal-auth-algo");

	if (h->id == NULL || h->time == NULL || h->sig == NULL)
		return "missing PAYPAL-TRANSMISSION-ID, -TIME or -SIG header";
	if (h->id[0] == '\0' || strchr(h->id, '|') != NULL)
		return "malformed PAYPAL-TRANSMISSION-ID";
	if (!parse_transmission_time(h->time, sent))
		return "malformed PAYPAL-TRANSMISSION-TIME";
	if (tolerance_s > 0)
	{
		int64		now = crmpay_timestamptz_to_unix(at);

		if (*sent < now - tolerance_s || *sent > now + tolerance_s)
			return "transmission time outside the tolerance";
	}
	return NULL;
}

/*
 * paypal_verify_webhook
 *		Offline verification.  secret: {"webhook_id", "cert_pem"?}.  The
 *		signature is RSA over id|time|webhook_id|crc32(body) (unsigned
 *		decimal), with SHA-256 (PAYPAL-AUTH-ALGO SHA256withRSA, the only one
 *		accepted).  The certificate must be for a .paypal.com name, valid at
 *		at, and (unless pinned) chain to a trusted CA.
 */
static CrmpayVerifyResult
paypal_verify_webhook(const char *secret, const CrmpayHeaders *headers, const char *body,
					  size_t body_len, int64 tolerance_s, TimestampTz at)
{
	CrmpayVerifyResult result = {false, NULL};
	const char *error;
	CrmpayJson *config = crmpay_json_parse(secret, strlen(secret), &error);
	const char *webhook_id = config ? crmpay_json_str(config, "webhook_id") : NULL;
	const char *pinned = config ? crmpay_json_str(config, "cert_pem") : NULL;
	PaypalHeaders h;
	int64		sent;
	size_t		sig_chars;
	unsigned char *sig;
	long		siglen;
	X509	   *cert;
	char	   *msg;
	time_t		at_unix = (time_t) crmpay_timestamptz_to_unix(at);

	if (webhook_id == NULL)
	{
		result.reason = "webhook secret is not a PayPal secret ({\"webhook_id\": ...})";
		return result;
	}
	if ((result.reason = read_headers(headers, &h, tolerance_s, at, &sent)) != NULL)
		return result;
	if (h.algo != NULL && strcmp(h.algo, "SHA256withRSA") != 0)
	{
		result.reason = "unsupported PAYPAL-AUTH-ALGO";
		return result;
	}
	sig_chars = strlen(h.sig);
	if (sig_chars == 0 || sig_chars > 2048)
	{
		result.reason = "malformed PAYPAL-TRANSMISSION-SIG";
		return result;
	}
	sig = palloc(CRMPAY_BASE64_DECODED_MAX(sig_chars) + 1);
	siglen = crmpay_base64_decode(h.sig, sig_chars, sig, CRMPAY_BASE64_DECODED_MAX(sig_chars),
								  CRMPAY_B64_STD);
	if (siglen <= 0)
	{
		result.reason = "PAYPAL-TRANSMISSION-SIG is not valid base64";
		return result;
	}

	cert = signing_cert(pinned, h.cert_url, at_unix, &result.reason);
	if (cert == NULL)
		return result;
	if (X509_cmp_time(X509_get0_notBefore(cert), &at_unix) != -1 ||
		X509_cmp_time(X509_get0_notAfter(cert), &at_unix) != 1)
	{
		result.reason = "signing certificate is not valid at the time of checking";
		return result;
	}

	msg = psprintf("%s|%s|%s|%u", h.id, h.time, webhook_id,
				   (unsigned int) crmpay_crc32((const unsigned char *) body, body_len));
	if (!rsa_verify(cert, EVP_sha256(), sig, (size_t) siglen, msg, strlen(msg)))
	{
		result.reason = "signature does not match";
		return result;
	}
	result.valid = true;
	return result;
}

/*
 * paypal_verify_online
 *		Asks PayPal's POST /v1/notifications/verify-webhook-signature (the
 *		account chose settings.webhook_verification = online).  PayPal checks
 *		a re-serialised event there, so crmpay still parses the body first.
 */
static CrmpayVerifyResult
paypal_verify_online(const CrmpayAccount *account, const CrmpayHeaders *headers,
					 const char *body, size_t body_len, int64 tolerance_s, TimestampTz at)
{
	CrmpayVerifyResult result = {false, NULL};
	const char *error;
	CrmpayJson *config = crmpay_json_parse(account->webhook_secret,
										   strlen(account->webhook_secret), &error);
	const char *webhook_id = config ? crmpay_json_str(config, "webhook_id") : NULL;
	CrmpayJson *event;
	PaypalHeaders h;
	int64		sent;
	StringInfoData req;
	CrmpayHttpRequest request = {0};
	CrmpayHttpResponse response;
	CrmpayGatewayFailure failure;
	CrmpayJson *answer;
	const char *status;

	if (webhook_id == NULL)
	{
		result.reason = "webhook secret is not a PayPal secret ({\"webhook_id\": ...})";
		return result;
	}
	if ((result.reason = read_headers(headers, &h, tolerance_s, at, &sent)) != NULL)
		return result;
	event = crmpay_json_parse(body, body_len, &error);
	if (event == NULL || event->kind != CRMPAY_JSON_OBJECT)
	{
		result.reason = "body is not a JSON object";
		return result;
	}

	initStringInfo(&req);
	appendStringInfoChar(&req, '{');
	json_member(&req, "auth_algo", h.algo ? h.algo : "SHA256withRSA", true);
	json_member(&req, "cert_url", h.cert_url ? h.cert_url : "", false);
	json_member(&req, "transmission_id", h.id, false);
	json_member(&req, "transmission_sig", h.sig, false);
	json_member(&req, "transmission_time", h.time, false);
	json_member(&req, "webhook_id", webhook_id, false);
	appendStringInfoString(&req, ", \"webhook_event\": ");
	appendBinaryStringInfo(&req, body, (int) body_len);
	appendStringInfoChar(&req, '}');

	request.method = "POST";
	request.url = psprintf("%s/v1/notifications/verify-webhook-signature", account->api_base);
	request.headers = list_make1("Content-Type: application/json");
	request.body = req.data;
	request.body_len = req.len;
	if (!crmpay_gateway_call(account, &request, &response, &failure))
	{
		result.reason = psprintf("PayPal's verify-webhook-signature failed (%s)",
								 crmpay_failure_kind_name(failure.kind));
		return result;
	}
	answer = crmpay_json_parse(response.body, response.body_len, &error);
	status = answer ? crmpay_json_str(answer, "verification_status") : NULL;
	if (status == NULL || strcmp(status, "SUCCESS") != 0)
	{
		result.reason = "PayPal's verify-webhook-signature answered FAILURE";
		return result;
	}
	result.valid = true;
	return result;
}

/* CrmpayProvider.verify_account_webhook: offline unless the account says online. */
static CrmpayVerifyResult
paypal_verify_account_webhook(const CrmpayAccount *account, const CrmpayHeaders *headers,
							  const char *body, size_t body_len, int64 tolerance_s,
							  TimestampTz at)
{
	const char *mode = crmpay_setting(account, "webhook_verification");

	if (mode != NULL && strcmp(mode, "online") == 0)
		return paypal_verify_online(account, headers, body, body_len, tolerance_s, at);
	return paypal_verify_webhook(account->webhook_secret, headers, body, body_len,
								 tolerance_s, at);
}

/* ----------------------------------------------------------------
 * Webhook events
 * ----------------------------------------------------------------
 */

/*
 * paypal_parse_webhook
 *		CHECKOUT.ORDER.APPROVED -> processing, with a capture due;
 *		PAYMENT.CAPTURE.COMPLETED -> paid, .PENDING -> processing,
 *		.DENIED/.DECLINED -> failed.  Other types are recorded and ignored.
 *		The dedupe key is PayPal's event id.
 */
static List *
paypal_parse_webhook(const CrmpayHeaders *headers, const char *body, size_t body_len,
					 const char **reason)
{
	const char *error;
	CrmpayJson *root = crmpay_json_parse(body, body_len, &error);
	const CrmpayJson *resource;
	const CrmpayJson *amount = NULL;
	CrmpayWebhookEvent *event;
	const char *id;
	const char *type;

	if (root == NULL)
	{
		*reason = psprintf("malformed JSON: %s", error);
		return NIL;
	}
	id = crmpay_json_str(root, "id");
	type = crmpay_json_str(root, "event_type");
	resource = crmpay_json_member(root, "resource");
	if (id == NULL || id[0] == '\0' || type == NULL || resource == NULL ||
		resource->kind != CRMPAY_JSON_OBJECT)
	{
		*reason = "not a PayPal event (id, event_type and resource required)";
		return NIL;
	}

	event = crmpay_new_event();
	event->event_key = pstrdup(id);
	event->event_type = pstrdup(type);

	if (strncmp(type, "CHECKOUT.ORDER.", 15) == 0)
	{
		const char *custom = crmpay_json_str(resource, "purchase_units.0.custom_id");

		event->gateway_ref = crmpay_pstrdup_or_null(crmpay_json_str(resource, "id"));
		event->order_ref = crmpay_pstrdup_or_null(custom ? custom
												  : crmpay_json_str(resource, "purchase_units.0.reference_id"));
		amount = crmpay_json_path(resource, "purchase_units.0.amount");
		if (strcmp(type, "CHECKOUT.ORDER.APPROVED") == 0)
		{
			event->new_status = "processing";
			event->follow_up = "capture";
		}
	}
	else if (strncmp(type, "PAYMENT.CAPTURE.", 16) == 0)
	{
		event->gateway_payment_ref = crmpay_pstrdup_or_null(crmpay_json_str(resource, "id"));
		event->gateway_ref = crmpay_pstrdup_or_null(crmpay_json_str(resource,
																	"supplementary_data.related_ids.order_id"));
		event->order_ref = crmpay_pstrdup_or_null(crmpay_json_str(resource, "custom_id"));
		if (strcmp(type, "PAYMENT.CAPTURE.COMPLETED") == 0)
		{
			event->new_status = "paid";
			amount = crmpay_json_member(resource, "amount");
		}
		else if (strcmp(type, "PAYMENT.CAPTURE.PENDING") == 0)
		{
			event->new_status = "processing";
			amount = crmpay_json_member(resource, "amount");
		}
		else if (strcmp(type, "PAYMENT.CAPTURE.DENIED") == 0 ||
				 strcmp(type, "PAYMENT.CAPTURE.DECLINED") == 0)
			event->new_status = "failed";
	}

	if (amount != NULL && event->new_status != NULL &&
		!paypal_read_amount(amount, &event->amount_minor, &event->currency))
	{
		*reason = "event amount is not a currency_code and decimal value";
		return NIL;
	}
	return list_make1(event);
}

/* ----------------------------------------------------------------
 * Reconciliation: the Transaction Search API
 *
 *	GET {api_base}/v1/reporting/transactions?start_date=..&end_date=..
 *		&fields=all&page_size=500&page=N
 *	PayPal answers at most 31 days per request, so the window is cut into
 *	31-day pieces (the fetch state's stream is the piece, its cursor the
 *	page).  Each transaction_details[].transaction_info is one record:
 *	T00xx with a positive amount are payments received (capture ids, our
 *	order reference in custom_field), T1107 refunds, T1106/T12xx reversals
 *	and chargebacks, anything else fees and transfers.  Amounts are signed
 *	decimal strings in major units; fee_amount is negative.
 *	(https://developer.paypal.com/docs/api/transaction-search/v1/)
 * ----------------------------------------------------------------
 */
#define PAYPAL_SEARCH_DAYS 31
#define PAYPAL_PAGE_MAX 500

/* The n-th 31-day piece of the window, or false past the end. */
static bool
paypal_search_piece(const CrmpayFetchState *state, int n, TimestampTz *from, TimestampTz *to)
{
	TimestampTz piece = (TimestampTz) PAYPAL_SEARCH_DAYS * USECS_PER_DAY;

	*from = state->since + (TimestampTz) n * piece;
	if (*from > state->until)
		return false;
	*to = Min(*from + piece, state->until);
	return true;
}

/* "2024-03-01T10:00:00-0000", as the search wants its dates. */
static char *
paypal_search_date(TimestampTz t)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (timestamp2tm(t, NULL, &tm, &fsec, NULL, NULL) != 0)
		elog(ERROR, "crmpay: timestamp out of range");
	return psprintf("%04d-%02d-%02dT%02d:%02d:%02d-0000", tm.tm_year, tm.tm_mon, tm.tm_mday,
					tm.tm_hour, tm.tm_min, tm.tm_sec);
}

static void
paypal_build_list_records(const CrmpayAccount *account, const CrmpayFetchState *state,
						  CrmpayHttpRequest *out)
{
	TimestampTz from;
	TimestampTz to;

	if (!paypal_search_piece(state, state->stream, &from, &to))
		elog(ERROR, "crmpay: PayPal search piece %d is past the window", state->stream);
	out->method = "GET";
	out->url = psprintf("%s/v1/reporting/transactions?start_date=%s&end_date=%s&fields=all"
						"&page_size=%d&page=%s",
						account->api_base, paypal_search_date(from), paypal_search_date(to),
						Min(Max(state->page_size, 1), PAYPAL_PAGE_MAX),
						state->cursor ? state->cursor : "1");
	out->headers = list_make1(pstrdup("Accept: application/json"));
}

/* A signed amount {"currency_code", "value": "-10.00"} in minor units. */
static bool
paypal_signed_amount(const CrmpayJson *amount, int64 *minor, char **currency)
{
	const char *code = amount ? crmpay_json_str(amount, "currency_code") : NULL;
	const char *value = amount ? crmpay_json_str(amount, "value") : NULL;
	bool		negative;

	if (code == NULL || value == NULL || strlen(code) != 3)
		return false;
	negative = (value[0] == '-');
	if (!crmpay_decimal_to_minor(value + (negative ? 1 : 0), crmpay_iso_exponent(code), minor))
		return false;
	if (negative)
		*minor = -*minor;
	*currency = pstrdup(code);
	return true;
}

/* "2024-03-01T10:00:00+0000" (or with Z, or +01:00) to a timestamptz; 0 if unreadable. */
static TimestampTz
paypal_search_time(const char *s)
{
	int			y,
				mo,
				d,
				h,
				mi,
				sec,
				oh = 0,
				om = 0;
	char		sign = '+';
	int			n = 0;
	struct pg_tm tm;
	int			tz;
	TimestampTz result;

	if (s == NULL || sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &n) != 6)
		return 0;
	s += n;
	if (*s == 'Z')
		s++;
	else if (*s == '+' || *s == '-')
	{
		sign = *s++;
		if (sscanf(s, "%2d", &oh) != 1)
			return 0;
		s += 2;
		if (*s == ':')
			s++;
		if (sscanf(s, "%2d", &om) != 1)
			return 0;
	}
	memset(&tm, 0, sizeof(tm));
	tm.tm_year = y;
	tm.tm_mon = mo;
	tm.tm_mday = d;
	tm.tm_hour = h;
	tm.tm_min = mi;
	tm.tm_sec = sec;
	/* tm2timestamp wants seconds west of UTC */
	tz = (sign == '+' ? -1 : 1) * (oh * 3600 + om * 60);
	if (tm2timestamp(&tm, 0, &tz, &result) != 0)
		return 0;
	return result;
}

static CrmpayGatewayRecord *
paypal_search_record(const CrmpayJson *info)
{
	const char *code = crmpay_json_str(info, "transaction_event_code");
	const char *status = crmpay_json_str(info, "transaction_status");
	const char *custom = crmpay_json_str(info, "custom_field");
	const char *invoice = crmpay_json_str(info, "invoice_id");
	const char *id = crmpay_json_str(info, "transaction_id");
	const char *ref = crmpay_json_str(info, "paypal_reference_id");
	const char *order = custom ? custom : invoice;
	CrmpayGatewayRecord *rec;
	int64		amount;
	int64		fee = 0;
	char	   *currency = NULL;
	char	   *fee_currency = NULL;
	bool		has_fee;

	if (code == NULL || id == NULL ||
		!paypal_signed_amount(crmpay_json_member(info, "transaction_amount"), &amount, &currency))
		return NULL;
	has_fee = paypal_signed_amount(crmpay_json_member(info, "fee_amount"), &fee, &fee_currency);

	if (strncmp(code, "T00", 3) == 0 && amount > 0)
	{
		rec = crmpay_new_record("charge");
		rec->gateway_payment_ref = pstrdup(id);
		rec->amount_minor = amount;
		if (status && strcmp(status, "S") == 0)
			rec->status = "paid";
		else if (status && strcmp(status, "P") == 0)
			rec->status = "processing";
		else if (status && strcmp(status, "D") == 0)
			rec->status = "failed";
		else if (status && strcmp(status, "V") == 0)
		{
			rec->status = "refunded";	/* reversed: all of it went back */
			rec->refunded_minor = amount;
		}
	}
	else if (strcmp(code, "T1107") == 0)
	{
		rec = crmpay_new_record("refund");
		rec->gateway_payment_ref = crmpay_pstrdup_or_null(ref);
		rec->amount_minor = -amount;
	}
	else if (strcmp(code, "T1106") == 0 || strncmp(code, "T12", 3) == 0)
	{
		rec = crmpay_new_record("chargeback");
		rec->gateway_payment_ref = crmpay_pstrdup_or_null(ref);
		rec->amount_minor = -amount;
		rec->status = "disputed";
	}
	else
		rec = crmpay_new_record("other");

	rec->record_ref = psprintf("%s:%s", code, id);
	rec->gateway_status = psprintf("%s/%s", code, status ? status : "?");
	rec->currency = currency;
	if (order)
	{
		rec->order_ref = pstrdup(order);
		rec->match_key = pstrdup(order);
	}
	else if (strcmp(rec->record_type, "charge") == 0)
		rec->match_key = psprintf("paypal:%s", id);
	rec->occurred_at = paypal_search_time(crmpay_json_str(info, "transaction_initiation_date"));
	if (!status || strcmp(status, "D") != 0)
	{
		rec->fin_currency = pstrdup(currency);
		rec->fin_amount_minor = amount;
		if (!has_fee)
			fee = 0;			/* no fee_amount: nothing was charged */
		if (!has_fee || strcmp(fee_currency, currency) == 0)
		{
			rec->fee_minor = -fee;
			rec->net_minor = amount + fee;
		}
	}
	return rec;
}

static bool
paypal_parse_list_records(const CrmpayAccount *account, const CrmpayHttpResponse *response,
						  CrmpayFetchState *state, List **records, CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *root = crmpay_json_parse(response->body, response->body_len, &error);
	const CrmpayJson *details = root ? crmpay_json_member(root, "transaction_details") : NULL;
	int64		page = 1;
	int64		pages = 1;
	int			i;
	TimestampTz from;
	TimestampTz to;

	*records = NIL;
	if (root == NULL || details == NULL || details->kind != CRMPAY_JSON_ARRAY)
	{
		failure->message = psprintf("PayPal answered HTTP %ld to the transaction search without transaction_details%s%s",
									response->status, error ? ": " : "", error ? error : "");
		return false;
	}
	for (i = 0; i < details->count; i++)
	{
		const CrmpayJson *info = crmpay_json_member(details->items[i], "transaction_info");
		CrmpayGatewayRecord *rec = info ? paypal_search_record(info) : NULL;

		if (rec == NULL)
		{
			failure->message = psprintf("PayPal transaction search item %d has no readable transaction_info", i);
			return false;
		}
		*records = lappend(*records, rec);
	}
	(void) crmpay_json_int64(root, "page", &page);
	(void) crmpay_json_int64(root, "total_pages", &pages);
	if (page < pages)
		state->cursor = psprintf(INT64_FORMAT, page + 1);
	else
	{
		state->cursor = NULL;
		state->stream++;
		state->done = !paypal_search_piece(state, state->stream, &from, &to) || from >= state->until;
	}
	return true;
}

const CrmpayProvider crmpay_paypal_provider = {
	.name = "paypal",
	.default_api_base = "https://api-m.paypal.com",
	.webhook_ack = "",
	.validate_account = paypal_validate_account,
	.check_amount = paypal_check_amount,
	.build_create_link = paypal_build_create_link,
	.parse_create_link = paypal_parse_create_link,
	.parse_error = paypal_parse_error,
	.verify_webhook = paypal_verify_webhook,
	.parse_webhook = paypal_parse_webhook,
	.authorize = paypal_authorize,
	.build_capture = paypal_build_capture,
	.parse_capture = paypal_parse_capture,
	.verify_account_webhook = paypal_verify_account_webhook,
	.build_list_records = paypal_build_list_records,
	.parse_list_records = paypal_parse_list_records,
};

PG_FUNCTION_INFO_V1(crmpay_currency_exponent);

/* crmpay._currency_exponent(text): the exponent the C side uses (for tests). */
Datum
crmpay_currency_exponent(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT32(crmpay_iso_exponent(text_to_cstring(PG_GETARG_TEXT_PP(0))));
}
