/*-------------------------------------------------------------------------
 *
 * adyen.c
 *	  The Adyen provider: Pay by Link payment links, Adyen's minor units and
 *	  error format, and HMAC verification of Adyen webhooks.
 *
 *	  Wire format (https://docs.adyen.com/api-explorer/Checkout/71):
 *	  - POST {base}/v71/paymentLinks, "X-API-Key", "Idempotency-Key" (at
 *		most 64 characters), JSON body {reference, amount{value, currency},
 *		merchantAccount, returnUrl, expiresAt, reusable, shopperEmail,
 *		description, metadata}; 201 answers {id, url, status, expiresAt}.
 *	  - GET {base}/v71/paymentLinks/{id} reads a link; PATCH with
 *		{"status": "expired"} expires it.  Link statuses: active, expired,
 *		completed, paid, paymentPending.
 *	  - Errors: {"status", "errorCode", "message", "errorType",
 *		"pspReference"}.
 *	  - Base URL: https://checkout-test.adyen.com for test accounts;
 *		https://{live_url_prefix}-checkout-live.adyenpayments.com/checkout
 *		for live ones; settings.api_base overrides both.
 *	  - Amounts in Adyen's minor units, which follow ISO 4217 except CLP and
 *		ISK (2 decimals at Adyen, 0 in ISO) and CVE and IDR (0 at Adyen, 2
 *		in ISO); https://docs.adyen.com/development-resources/currency-codes
 *
 *	  Webhooks (https://docs.adyen.com/development-resources/webhooks):
 *	  - Standard notifications {"live", "notificationItems": [{
 *		"NotificationRequestItem": {...}}]}: each item carries
 *		additionalData.hmacSignature = base64(HMAC-SHA256(hex-decoded key,
 *		pspReference:originalReference:merchantAccountCode:merchantReference:
 *		amount.value:amount.currency:eventCode:success)), missing fields as
 *		"".  The values are joined as they are, without escaping: that is
 *		what Adyen signs (real notifications with ':' and '\' in
 *		merchantReference in the official SDKs' tests verify only so) and
 *		what the official libraries compute.  Each item is checked on its
 *		own.
 *	  - Other webhooks carry an "HmacSignature" header: base64 HMAC-SHA256
 *		of the raw body with the same kind of key.
 *	  - The webhook secret is the hex HMAC key; during a key rotation it may
 *		hold several keys separated by commas, any of which may match.
 *	  - No timestamp is signed: replays are caught by the dedupe key.
 *	  - The receiver answers "[accepted]".
 *
 *-------------------------------------------------------------------------
 */
#include "provider.h"

#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/json.h"

#include "codec.h"

#define ADYEN_API_VERSION		"v71"
#define ADYEN_TEST_BASE			"https://checkout-test.adyen.com"
#define ADYEN_MAX_REFERENCE		80
#define ADYEN_MAX_DESCRIPTION	280
#define ADYEN_MAX_METADATA		20	/* key-value pairs (error 177) */
#define ADYEN_MAX_METADATA_KEY	20	/* characters per key (error 178) */
#define ADYEN_DEFAULT_TTL		(24 * 3600) /* Adyen's own default */
#define ADYEN_MIN_TTL			60
#define ADYEN_MAX_TTL			(70 * 24 * 3600)	/* Adyen's maximum */
#define ADYEN_MAX_KEYS			8	/* HMAC keys during a rotation */
#define ADYEN_MAX_KEY_BYTES		64
#define ADYEN_SIGNATURE_B64		44	/* base64 of 32 bytes */

/* ----------------------------------------------------------------
 * Currencies
 * ----------------------------------------------------------------
 */
typedef struct AdyenCurrency
{
	char		code[4];
	int8		exponent;		/* Adyen's minor-unit exponent */
	int8		iso_exponent;	/* ISO 4217's (as in crmpay.currencies) */
} AdyenCurrency;

/*
 * The currencies Adyen processes, sorted by code, from Adyen's table
 * (docs.adyen.com/development-resources/currency-codes), restricted to
 * codes of crmpay.currencies.  The regression tests check iso_exponent
 * against crmpay.currencies.
 */
static const AdyenCurrency adyen_currencies[] = {
	{"AED", 2, 2}, {"ALL", 2, 2}, {"AMD", 2, 2}, {"ANG", 2, 2}, {"AOA", 2, 2},
	{"ARS", 2, 2}, {"AUD", 2, 2}, {"AWG", 2, 2}, {"AZN", 2, 2}, {"BAM", 2, 2},
	{"BBD", 2, 2}, {"BDT", 2, 2}, {"BGN", 2, 2}, {"BHD", 3, 3}, {"BMD", 2, 2},
	{"BND", 2, 2}, {"BOB", 2, 2}, {"BRL", 2, 2}, {"BSD", 2, 2}, {"BWP", 2, 2},
	{"BYN", 2, 2}, {"BZD", 2, 2}, {"CAD", 2, 2}, {"CHF", 2, 2}, {"CLP", 2, 0},
	{"CNY", 2, 2}, {"COP", 2, 2}, {"CRC", 2, 2}, {"CUP", 2, 2}, {"CVE", 0, 2},
	{"CZK", 2, 2}, {"DJF", 0, 0}, {"DKK", 2, 2}, {"DOP", 2, 2}, {"DZD", 2, 2},
	{"EGP", 2, 2}, {"ETB", 2, 2}, {"EUR", 2, 2}, {"FJD", 2, 2}, {"FKP", 2, 2},
	{"GBP", 2, 2}, {"GEL", 2, 2}, {"GHS", 2, 2}, {"GIP", 2, 2}, {"GMD", 2, 2},
	{"GNF", 0, 0}, {"GTQ", 2, 2}, {"GYD", 2, 2}, {"HKD", 2, 2}, {"HNL", 2, 2},
	{"HTG", 2, 2}, {"HUF", 2, 2}, {"IDR", 0, 2}, {"ILS", 2, 2}, {"INR", 2, 2},
	{"IQD", 3, 3}, {"ISK", 2, 0}, {"JMD", 2, 2}, {"JOD", 3, 3}, {"JPY", 0, 0},
	{"KES", 2, 2}, {"KGS", 2, 2}, {"KHR", 2, 2}, {"KMF", 0, 0}, {"KRW", 0, 0},
	{"KWD", 3, 3}, {"KYD", 2, 2}, {"KZT", 2, 2}, {"LAK", 2, 2}, {"LBP", 2, 2},
	{"LKR", 2, 2}, {"LYD", 3, 3}, {"MAD", 2, 2}, {"MDL", 2, 2}, {"MKD", 2, 2},
	{"MMK", 2, 2}, {"MNT", 2, 2}, {"MOP", 2, 2}, {"MRU", 2, 2}, {"MUR", 2, 2},
	{"MVR", 2, 2}, {"MWK", 2, 2}, {"MXN", 2, 2}, {"MYR", 2, 2}, {"MZN", 2, 2},
	{"NAD", 2, 2}, {"NGN", 2, 2}, {"NIO", 2, 2}, {"NOK", 2, 2}, {"NPR", 2, 2},
	{"NZD", 2, 2}, {"OMR", 3, 3}, {"PAB", 2, 2}, {"PEN", 2, 2}, {"PGK", 2, 2},
	{"PHP", 2, 2}, {"PKR", 2, 2}, {"PLN", 2, 2}, {"PYG", 0, 0}, {"QAR", 2, 2},
	{"RON", 2, 2}, {"RSD", 2, 2}, {"RUB", 2, 2}, {"RWF", 0, 0}, {"SAR", 2, 2},
	{"SBD", 2, 2}, {"SCR", 2, 2}, {"SEK", 2, 2}, {"SGD", 2, 2}, {"SHP", 2, 2},
	{"SLE", 2, 2}, {"SOS", 2, 2}, {"SRD", 2, 2}, {"STN", 2, 2}, {"SVC", 2, 2},
	{"SZL", 2, 2}, {"THB", 2, 2}, {"TND", 3, 3}, {"TOP", 2, 2}, {"TRY", 2, 2},
	{"TTD", 2, 2}, {"TWD", 2, 2}, {"TZS", 2, 2}, {"UAH", 2, 2}, {"UGX", 0, 0},
	{"USD", 2, 2}, {"UYU", 2, 2}, {"UZS", 2, 2}, {"VND", 0, 0}, {"VUV", 0, 0},
	{"WST", 2, 2}, {"XAF", 0, 0}, {"XCD", 2, 2}, {"XOF", 0, 0}, {"XPF", 0, 0},
	{"YER", 2, 2}, {"ZAR", 2, 2}, {"ZMW", 2, 2},
};

static int
currency_cmp(const void *key, const void *entry)
{
	return strcmp((const char *) key, ((const AdyenCurrency *) entry)->code);
}

/* Adyen's entry for an upper-case code, or NULL if Adyen does not take it. */
static const AdyenCurrency *
adyen_currency(const char *code)
{
	if (code == NULL || strlen(code) != 3)
		return NULL;
	return bsearch(code, adyen_currencies, lengthof(adyen_currencies),
				   sizeof(AdyenCurrency), currency_cmp);
}

static int64
pow10_int64(int n)
{
	int64		p = 1;

	while (n-- > 0)
		p *= 10;
	return p;
}

/*
 * ISO minor units -> Adyen minor units.  False when the amount cannot be
 * expressed exactly (a fraction of Adyen's unit) or does not fit.
 */
static bool
iso_to_adyen(const AdyenCurrency *c, int64 iso_minor, int64 *out)
{
	int			diff = c->exponent - c->iso_exponent;

	if (diff >= 0)
	{
		int64		factor = pow10_int64(diff);

		if (iso_minor > PG_INT64_MAX / factor || iso_minor < PG_INT64_MIN / factor)
			return false;
		*out = iso_minor * factor;
		return true;
	}
	if (iso_minor % pow10_int64(-diff) != 0)
		return false;
	*out = iso_minor / pow10_int64(-diff);
	return true;
}

/* Adyen minor units -> ISO minor units; false when not a whole ISO amount. */
static bool
adyen_to_iso(const AdyenCurrency *c, int64 adyen_minor, int64 *out)
{
	AdyenCurrency reverse = *c;

	reverse.exponent = c->iso_exponent;
	reverse.iso_exponent = c->exponent;
	return iso_to_adyen(&reverse, adyen_minor, out);
}

PG_FUNCTION_INFO_V1(crmpay_adyen_currencies);

/*
 * crmpay._adyen_currencies() RETURNS TABLE (code text, exponent int,
 *		iso_exponent int): the table above, for tests and documentation.
 */
Datum
crmpay_adyen_currencies(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			i;

	InitMaterializedSRF(fcinfo, 0);
	for (i = 0; i < lengthof(adyen_currencies); i++)
	{
		Datum		values[3];
		bool		nulls[3] = {false, false, false};

		values[0] = CStringGetTextDatum(adyen_currencies[i].code);
		values[1] = Int32GetDatum(adyen_currencies[i].exponent);
		values[2] = Int32GetDatum(adyen_currencies[i].iso_exponent);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* ----------------------------------------------------------------
 * Accounts
 * ----------------------------------------------------------------
 */

/*
 * Splits a webhook secret into its HMAC keys: hex strings separated by
 * commas (several during a key rotation), spaces around them ignored.
 * False when any part is not an even-length hex string of 1 to 64 bytes.
 */
typedef struct AdyenKeys
{
	int			count;
	size_t		len[ADYEN_MAX_KEYS];
	unsigned char key[ADYEN_MAX_KEYS][ADYEN_MAX_KEY_BYTES];
} AdyenKeys;

static bool
adyen_parse_keys(const char *secret, AdyenKeys *keys)
{
	const char *p = secret;

	keys->count = 0;
	for (;;)
	{
		const char *start;
		const char *end;
		long		n;

		while (*p == ' ')
			p++;
		start = p;
		while (*p != '\0' && *p != ',')
			p++;
		end = p;
		while (end > start && end[-1] == ' ')
			end--;
		if (end == start || keys->count == ADYEN_MAX_KEYS)
			return false;
		n = crmpay_hex_decode(start, end - start, keys->key[keys->count], ADYEN_MAX_KEY_BYTES);
		if (n <= 0)
			return false;
		keys->len[keys->count++] = (size_t) n;
		if (*p == '\0')
			return true;
		p++;					/* the comma */
	}
}

/* True when s is non-empty printable ASCII without spaces. */
static bool
is_token(const char *s, size_t maxlen)
{
	size_t		n = 0;

	if (s == NULL || *s == '\0')
		return false;
	for (; *s; s++, n++)
		if (*s <= ' ' || *s > '~' || n >= maxlen)
			return false;
	return true;
}

static void
adyen_validate_account(const CrmpayJson *credentials,
					   const CrmpayJson *settings, const char *webhook_secret)
{
	const char *api_key = crmpay_json_str(credentials, "api_key");
	const char *merchant = settings ? crmpay_json_str(settings, "merchant_account") : NULL;
	const char *return_url = settings ? crmpay_json_str(settings, "return_url") : NULL;
	const char *prefix = settings ? crmpay_json_str(settings, "live_url_prefix") : NULL;
	const CrmpayJson *ttl_node = settings ? crmpay_json_member(settings, "link_ttl") : NULL;

	if (!is_token(api_key, 4096))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Adyen credentials need an \"api_key\""),
				 errdetail("The API key of a web service user (Customer Area > Developers > API credentials), without spaces."),
				 errhint("Pass credentials like {\"api_key\": \"AQE...\"}.")));
	if (!is_token(merchant, 200))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Adyen accounts need settings.merchant_account"),
				 errdetail("Every payment link is created for one merchant account; its code has no spaces."),
				 errhint("Pass settings like {\"merchant_account\": \"ShopECOM\", \"return_url\": \"https://shop.example/paid\"}.")));
	if (return_url == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Adyen accounts need settings.return_url"),
				 errdetail("Adyen sends the customer there after paying on the payment link page."),
				 errhint("Pass settings like {\"merchant_account\": \"ShopECOM\", \"return_url\": \"https://shop.example/paid\"}.")));
	crmpay_http_check_url(return_url, "settings.return_url");
	if (prefix != NULL)
	{
		const char *c;

		for (c = prefix; *c; c++)
			if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
				  (*c >= '0' && *c <= '9') || *c == '-'))
				break;
		if (*prefix == '\0' || *c != '\0' || strlen(prefix) > 100)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid settings.live_url_prefix \"%s\"", prefix),
					 errdetail("The prefix is letters, digits and \"-\", as in https://{prefix}-checkout-live.adyenpayments.com."),
					 errhint("Copy it from Customer Area > Developers > API URLs; leave it out for a test account.")));
	}
	if (ttl_node != NULL)
	{
		int64		ttl;

		if (!crmpay_json_int64(settings, "link_ttl", &ttl) ||
			ttl < ADYEN_MIN_TTL || ttl > ADYEN_MAX_TTL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("settings.link_ttl must be a whole number of seconds from %d to %d",
							ADYEN_MIN_TTL, ADYEN_MAX_TTL),
					 errdetail("Adyen payment links expire at most 70 days after they are created."),
					 errhint("Leave it out for Adyen's default of 24 hours (86400).")));
	}
	if (webhook_secret != NULL)
	{
		AdyenKeys	keys;
		int			i;
		bool		ok = adyen_parse_keys(webhook_secret, &keys);

		for (i = 0; ok && i < keys.count; i++)
			ok = (keys.len[i] == 32);
		explicit_bzero(&keys, sizeof(keys));
		if (!ok)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("an Adyen webhook secret is the webhook's HMAC key: 64 hexadecimal characters"),
					 errdetail("During a key rotation, give up to %d keys separated by commas.", ADYEN_MAX_KEYS),
					 errhint("Copy the HMAC key from Customer Area > Developers > Webhooks.")));
	}
}

/*
 * Adyen takes the currencies of its table, in its own minor units; an
 * amount that is a fraction of Adyen's unit (IDR and CVE have no decimals
 * at Adyen) is refused rather than rounded.
 */
static void
adyen_check_amount(const char *currency, int exponent, int64 amount_minor)
{
	const AdyenCurrency *c = adyen_currency(currency);
	int64		value;

	if (c == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Adyen does not accept currency %s", currency),
				 errhint("https://docs.adyen.com/development-resources/currency-codes lists the currencies Adyen processes.")));
	if (c->iso_exponent != exponent)
		elog(ERROR, "crmpay: exponent of %s is %d, Adyen's table says %d",
			 currency, exponent, c->iso_exponent);
	if (!iso_to_adyen(c, amount_minor, &value))
	{
		if (c->exponent < c->iso_exponent)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("Adyen cannot charge fractions of a %s", currency),
					 errdetail("Adyen uses %d decimals for %s (ISO 4217: %d); this amount is " INT64_FORMAT " ISO minor units.",
							   c->exponent, currency, c->iso_exponent, amount_minor),
					 errhint("Round the amount to whole %s.", currency)));
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("amount is too large for Adyen")));
	}
}

/* The account's API base: api_base, else live or test by live_url_prefix. */
static const char *
adyen_base(const CrmpayAccount *account)
{
	const char *prefix = crmpay_setting(account, "live_url_prefix");

	if (crmpay_setting(account, "api_base") == NULL && prefix != NULL)
		return psprintf("https://%s-checkout-live.adyenpayments.com/checkout", prefix);
	return account->api_base;
}

static const char *
adyen_api_key(const CrmpayAccount *account)
{
	const char *key = crmpay_json_str(account->credentials, "api_key");

	if (key == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no Adyen api_key", account->name)));
	return key;
}

/* "2026-01-31T12:00:00Z" */
static char *
iso8601_utc(TimestampTz ts)
{
	pg_time_t	t = timestamptz_to_time_t(ts);
	struct pg_tm *tm = pg_gmtime(&t);

	return psprintf("%04d-%02d-%02dT%02d:%02d:%02dZ", tm->tm_year + 1900, tm->tm_mon + 1,
					tm->tm_mday, tm->tm_hour, tm->tm_min, tm->tm_sec);
}

/* Appends ,"name": "value" (JSON-escaped) to an object being built. */
static void
json_add(StringInfo buf, const char *name, const char *value)
{
	if (buf->len > 1)
		appendStringInfoString(buf, ", ");
	escape_json(buf, name);
	appendStringInfoString(buf, ": ");
	escape_json(buf, value);
}

/* Refuses what Adyen would refuse in the link request, before any call. */
static void
adyen_refuse(const char *message, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("%s", message),
			 errdetail("%s", detail)));
}

static void
adyen_build_create_link(const CrmpayAccount *account,
						const CrmpayLinkRequest *request,
						CrmpayHttpRequest *out)
{
	const AdyenCurrency *c = adyen_currency(request->currency);
	const char *merchant = crmpay_setting(account, "merchant_account");
	const char *return_url = crmpay_setting(account, "return_url");
	const char *key = adyen_api_key(account);
	int64		ttl = ADYEN_DEFAULT_TTL;
	int64		value;
	StringInfoData body;
	StringInfoData metadata;
	int			npairs = 1;

	if (c == NULL || !iso_to_adyen(c, request->amount_minor, &value))
		adyen_check_amount(request->currency, request->exponent, request->amount_minor);
	if (merchant == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no settings.merchant_account", account->name)));
	if (strlen(request->order_ref) > ADYEN_MAX_REFERENCE)
		adyen_refuse("order_ref is too long for Adyen",
					 psprintf("Adyen takes references of at most %d characters.", ADYEN_MAX_REFERENCE));
	if (request->description && pg_mbstrlen(request->description) > ADYEN_MAX_DESCRIPTION)
		adyen_refuse("description is too long for Adyen",
					 psprintf("Adyen shows descriptions of at most %d characters.", ADYEN_MAX_DESCRIPTION));
	(void) crmpay_json_int64(account->settings, "link_ttl", &ttl);

	/* metadata: crmpay's order reference, then the CRM's own keys */
	initStringInfo(&metadata);
	appendStringInfoChar(&metadata, '{');
	json_add(&metadata, "crmpay_order_ref", request->order_ref);
	if (request->metadata != NULL && request->metadata->kind == CRMPAY_JSON_OBJECT)
	{
		int			i;

		for (i = 0; i < request->metadata->count; i++)
		{
			const CrmpayJson *v = request->metadata->items[i];

			if (v->kind == CRMPAY_JSON_NULL || v->text == NULL)
				continue;
			if (pg_mbstrlen(request->metadata->keys[i]) > ADYEN_MAX_METADATA_KEY)
				adyen_refuse(psprintf("metadata key \"%s\" is too long for Adyen",
									  request->metadata->keys[i]),
							 psprintf("Adyen takes metadata keys of at most %d characters.",
									  ADYEN_MAX_METADATA_KEY));
			if (++npairs > ADYEN_MAX_METADATA)
				adyen_refuse("too many metadata keys for Adyen",
							 psprintf("Adyen takes at most %d metadata pairs; crmpay uses one for crmpay_order_ref.",
									  ADYEN_MAX_METADATA));
			json_add(&metadata, request->metadata->keys[i], v->text);
		}
	}
	appendStringInfoChar(&metadata, '}');

	initStringInfo(&body);
	appendStringInfoChar(&body, '{');
	json_add(&body, "reference", request->order_ref);
	appendStringInfo(&body, ", \"amount\": {\"value\": " INT64_FORMAT ", \"currency\": ", value);
	escape_json(&body, request->currency);
	appendStringInfoChar(&body, '}');
	json_add(&body, "merchantAccount", merchant);
	if (return_url)
		json_add(&body, "returnUrl", return_url);
	json_add(&body, "expiresAt",
			 iso8601_utc(GetCurrentTimestamp() + ttl * USECS_PER_SEC));
	appendStringInfoString(&body, ", \"reusable\": false");
	if (request->email)
		json_add(&body, "shopperEmail", request->email);
	if (request->description)
		json_add(&body, "description", request->description);
	appendStringInfoString(&body, ", \"metadata\": ");
	appendBinaryStringInfo(&body, metadata.data, metadata.len);
	appendStringInfoChar(&body, '}');

	out->method = "POST";
	out->url = psprintf("%s/" ADYEN_API_VERSION "/paymentLinks", adyen_base(account));
	out->headers = list_make3(crmpay_header_line("X-API-Key", key),
							  crmpay_header_line("Idempotency-Key", request->idempotency_key),
							  "Content-Type: application/json");
	out->body = body.data;
	out->body_len = body.len;
}

/* Reads two decimal digits; -1 if they are not digits. */
static int
two_digits(const char *s)
{
	if (s[0] < '0' || s[0] > '9' || s[1] < '0' || s[1] > '9')
		return -1;
	return (s[0] - '0') * 10 + (s[1] - '0');
}

/*
 * Parses an ISO 8601 date-time as Adyen writes it ("2026-01-31T12:00:00Z",
 * "...+01:00", optional fraction).  Returns false, without raising, for
 * anything else.
 */
static bool
parse_iso8601(const char *s, TimestampTz *out)
{
	int			year,
				mon,
				day,
				hour,
				min,
				sec,
				offset = 0;
	int64		days;
	int			y,
				era,
				yoe,
				doy,
				doe;
	const char *p;

	if (s == NULL || strlen(s) < 20 || s[4] != '-' || s[7] != '-' ||
		(s[10] != 'T' && s[10] != ' ') || s[13] != ':' || s[16] != ':')
		return false;
	if ((y = two_digits(s)) < 0 || (year = two_digits(s + 2)) < 0)
		return false;
	year += y * 100;
	mon = two_digits(s + 5);
	day = two_digits(s + 8);
	hour = two_digits(s + 11);
	min = two_digits(s + 14);
	sec = two_digits(s + 17);
	if (mon < 1 || mon > 12 || day < 1 || day > 31 || hour < 0 || hour > 23 ||
		min < 0 || min > 59 || sec < 0 || sec > 60)
		return false;
	p = s + 19;
	if (*p == '.')
		for (p++; *p >= '0' && *p <= '9'; p++)
			;
	if (*p == 'Z' && p[1] == '\0')
		offset = 0;
	else if ((*p == '+' || *p == '-') && strlen(p) == 6 && p[3] == ':')
	{
		int			oh = two_digits(p + 1);
		int			om = two_digits(p + 4);

		if (oh < 0 || oh > 23 || om < 0 || om > 59)
			return false;
		offset = (oh * 60 + om) * 60 * (*p == '-' ? -1 : 1);
	}
	else
		return false;

	/* days since 1970-01-01 (proleptic Gregorian civil calendar) */
	y = year - (mon <= 2);
	era = (y >= 0 ? y : y - 399) / 400;
	yoe = y - era * 400;
	doy = (153 * (mon + (mon > 2 ? -3 : 9)) + 2) / 5 + day - 1;
	doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	days = (int64) era * 146097 + doe - 719468;

	*out = time_t_to_timestamptz((pg_time_t) (days * 86400 + hour * 3600 + min * 60 + sec - offset));
	return true;
}

/* Adyen link status -> crmpay status (NULL when unknown). */
static const char *
adyen_link_status(const char *status)
{
	if (status == NULL)
		return NULL;
	if (strcmp(status, "active") == 0)
		return "open";
	if (strcmp(status, "paymentPending") == 0)
		return "processing";
	if (strcmp(status, "completed") == 0 || strcmp(status, "paid") == 0)
		return "paid";
	if (strcmp(status, "expired") == 0)
		return "expired";
	return NULL;
}

/* Reads a PaymentLinkResponse; need_link: id and url are required. */
static bool
adyen_parse_link(const CrmpayHttpResponse *response, bool need_link,
				 CrmpayLinkResult *result, CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *link = crmpay_json_parse(response->body, response->body_len, &error);
	const char *status = link ? crmpay_json_str(link, "status") : NULL;

	if (link == NULL || link->kind != CRMPAY_JSON_OBJECT ||
		(need_link && (crmpay_json_str(link, "id") == NULL ||
					   crmpay_json_str(link, "url") == NULL)) ||
		adyen_link_status(status) == NULL)
	{
		failure->message = psprintf("Adyen answered HTTP %ld without a payment link%s%s%s%s",
									response->status,
									error ? ": " : "", error ? error : "",
									status ? "; status " : "", status ? status : "");
		return false;
	}
	result->gateway_ref = crmpay_pstrdup_or_null(crmpay_json_str(link, "id"));
	result->url = crmpay_pstrdup_or_null(crmpay_json_str(link, "url"));
	result->status = adyen_link_status(status);
	if (!parse_iso8601(crmpay_json_str(link, "expiresAt"), &result->expires_at))
		result->expires_at = 0;
	return true;
}

static bool
adyen_parse_create_link(const CrmpayAccount *account,
						const CrmpayHttpResponse *response,
						CrmpayLinkResult *result,
						CrmpayGatewayFailure *failure)
{
	return adyen_parse_link(response, true, result, failure);
}

static bool
adyen_parse_link_state(const CrmpayAccount *account,
					   const CrmpayHttpResponse *response,
					   CrmpayLinkResult *result,
					   CrmpayGatewayFailure *failure)
{
	return adyen_parse_link(response, false, result, failure);
}

/* {base}/v71/paymentLinks/{id}, the id percent-encoded */
static char *
adyen_link_url(const CrmpayAccount *account, const char *gateway_ref)
{
	StringInfoData url;

	initStringInfo(&url);
	appendStringInfo(&url, "%s/" ADYEN_API_VERSION "/paymentLinks/", adyen_base(account));
	crmpay_url_append_escaped(&url, gateway_ref);
	return url.data;
}

static void
adyen_build_get_link(const CrmpayAccount *account, const char *gateway_ref,
					 CrmpayHttpRequest *out)
{
	out->method = "GET";
	out->url = adyen_link_url(account, gateway_ref);
	out->headers = list_make1(crmpay_header_line("X-API-Key", adyen_api_key(account)));
	out->body = NULL;
	out->body_len = 0;
}

static void
adyen_build_expire_link(const CrmpayAccount *account, const char *gateway_ref,
						CrmpayHttpRequest *out)
{
	static const char body[] = "{\"status\": \"expired\"}";

	out->method = "PATCH";
	out->url = adyen_link_url(account, gateway_ref);
	out->headers = list_make2(crmpay_header_line("X-API-Key", adyen_api_key(account)),
							  "Content-Type: application/json");
	out->body = body;
	out->body_len = sizeof(body) - 1;
}

/*
 * Reads Adyen's error body.  errorCode 704 ("request already processed or
 * in progress": the same idempotency key is still being handled) is worth
 * a retry.
 */
static void
adyen_parse_error(const CrmpayHttpResponse *response, CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *body = crmpay_json_parse(response->body, response->body_len, &error);
	const char *code;
	const char *type;
	const char *message;
	const char *psp;

	if (body == NULL || body->kind != CRMPAY_JSON_OBJECT)
		return;
	code = crmpay_json_str(body, "errorCode");
	type = crmpay_json_str(body, "errorType");
	message = crmpay_json_str(body, "message");
	psp = crmpay_json_str(body, "pspReference");

	if (code != NULL && strcmp(code, "704") == 0)
		failure->kind = CRMPAY_FAIL_UNAVAILABLE;
	failure->code = crmpay_pstrdup_or_null(code ? code : type);
	if (message != NULL)
		failure->message = psprintf("%s%s%s%s%s%s", message,
									type ? " (errorType " : "", type ? type : "",
									psp ? (type ? ", pspReference " : " (pspReference ") : "",
									psp ? psp : "", (type || psp) ? ")" : "");
}

/* ----------------------------------------------------------------
 * Webhooks
 * ----------------------------------------------------------------
 */

/*
 * A single-pass JSON scanner for Adyen notifications.  It checks the whole
 * body against RFC 8259 exactly as crmpay_json_parse does (the server's
 * lexer: strict numbers, escapes, surrogate pairs, no \u0000, no raw control
 * characters, valid UTF-8, at most CRMPAY_MAX_JSON_DEPTH levels), and keeps
 * only what verification and matching need, without building a tree:
 * notificationItems[].NotificationRequestItem's signed fields,
 * additionalData.hmacSignature and .paymentLinkId, and the root's "type".
 * A repeated key counts with its last value, as in crmpay_json_member().
 * Verification runs for every delivery, so this is the hot path.
 */
typedef enum AdyenFieldKind
{
	AF_MISSING = 0,
	AF_NULL,
	AF_SCALAR,
	AF_COMPOSITE
} AdyenFieldKind;

typedef struct AdyenField
{
	AdyenFieldKind kind;
	const char *text;			/* scalars: de-escaped text (not terminated) */
	size_t		len;
} AdyenField;

enum
{
	F_PSP, F_ORIG, F_MERCHANT, F_REFERENCE, F_VALUE, F_CURRENCY, F_CODE, F_SUCCESS,
	F_SIGNATURE, F_LINK, NUM_FIELDS
};

typedef struct AdyenItem
{
	bool		is_object;		/* NotificationRequestItem is an object */
	AdyenField	f[NUM_FIELDS];
} AdyenItem;

typedef struct AdyenScan
{
	const char *p;
	const char *end;
	const char *error;
	int			depth;
	bool		utf8;			/* database encoding is UTF-8 */
	bool		has_items;		/* root has notificationItems */
	bool		items_array;	/* ... and it is an array */
	int			nitems;
	int			capacity;
	AdyenItem  *items;
	AdyenField	type;			/* root "type" */
} AdyenScan;

/* What the value being scanned is to the notification. */
typedef enum AdyenRole
{
	R_SKIP, R_ROOT, R_ITEMS, R_WRAPPER, R_ITEM, R_AMOUNT, R_ADDITIONAL, R_FIELD
} AdyenRole;

static bool scan_value(AdyenScan *sc, AdyenRole role, AdyenItem *item, AdyenField *field);

static inline void
scan_ws(AdyenScan *sc)
{
	while (sc->p < sc->end && (*sc->p == ' ' || *sc->p == '\n' || *sc->p == '\r' || *sc->p == '\t'))
		sc->p++;
}

static bool
scan_fail(AdyenScan *sc, const char *error)
{
	if (sc->error == NULL)
		sc->error = error;
	return false;
}

/*
 * Scans a string (sc->p at the opening quote).  When out is given, the
 * de-escaped text is returned there: a slice of the input when the string
 * has no escapes, else a palloc'd copy.
 */
static bool
scan_string(AdyenScan *sc, AdyenField *out)
{
	const char *start = ++sc->p;
	StringInfoData buf;
	bool		escaped = false;

	for (;;)
	{
		unsigned char c;

		if (sc->p >= sc->end)
			return scan_fail(sc, "unterminated string");
		c = (unsigned char) *sc->p;
		if (c == '"')
			break;
		if (c < 0x20)
			return scan_fail(sc, "control character in a string");
		if (c != '\\')
		{
			if (escaped)
				appendStringInfoChar(&buf, (char) c);
			sc->p++;
			continue;
		}
		if (!escaped)
		{
			initStringInfo(&buf);
			appendBinaryStringInfo(&buf, start, (int) (sc->p - start));
			escaped = true;
		}
		if (sc->p + 1 >= sc->end)
			return scan_fail(sc, "unterminated escape");
		switch (sc->p[1])
		{
			case '"':
			case '\\':
			case '/':
				appendStringInfoChar(&buf, sc->p[1]);
				break;
			case 'b':
				appendStringInfoChar(&buf, '\b');
				break;
			case 'f':
				appendStringInfoChar(&buf, '\f');
				break;
			case 'n':
				appendStringInfoChar(&buf, '\n');
				break;
			case 'r':
				appendStringInfoChar(&buf, '\r');
				break;
			case 't':
				appendStringInfoChar(&buf, '\t');
				break;
			case 'u':
				{
					int			cp;
					unsigned char utf8[4];
					int			n;

					if (sc->end - sc->p < 6 || (cp = crmpay_hex4(sc->p + 2)) < 0)
						return scan_fail(sc, "invalid \\u escape");
					if (cp >= 0xDC00 && cp <= 0xDFFF)
						return scan_fail(sc, "lone low surrogate");
					if (cp >= 0xD800 && cp <= 0xDBFF)
					{
						int			lo;

						if (sc->end - sc->p < 12 || sc->p[6] != '\\' || sc->p[7] != 'u' ||
							(lo = crmpay_hex4(sc->p + 8)) < 0xDC00 || lo > 0xDFFF)
							return scan_fail(sc, "high surrogate without a low one");
						cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
						sc->p += 6;
					}
					if (cp == 0)
						return scan_fail(sc, "\\u0000 cannot be converted to text");
					if (cp > 0x7F && !sc->utf8)
						return scan_fail(sc, "non-ASCII \\u escape in a database that is not UTF-8");
					if (cp < 0x80)
					{
						utf8[0] = (unsigned char) cp;
						n = 1;
					}
					else if (cp < 0x800)
					{
						utf8[0] = 0xC0 | (cp >> 6);
						utf8[1] = 0x80 | (cp & 0x3F);
						n = 2;
					}
					else if (cp < 0x10000)
					{
						utf8[0] = 0xE0 | (cp >> 12);
						utf8[1] = 0x80 | ((cp >> 6) & 0x3F);
						utf8[2] = 0x80 | (cp & 0x3F);
						n = 3;
					}
					else
					{
						utf8[0] = 0xF0 | (cp >> 18);
						utf8[1] = 0x80 | ((cp >> 12) & 0x3F);
						utf8[2] = 0x80 | ((cp >> 6) & 0x3F);
						utf8[3] = 0x80 | (cp & 0x3F);
						n = 4;
					}
					appendBinaryStringInfo(&buf, (char *) utf8, n);
					sc->p += 4;
					break;
				}
			default:
				return scan_fail(sc, "invalid escape");
		}
		sc->p += 2;
	}
	if (out != NULL)
	{
		out->kind = AF_SCALAR;
		out->text = escaped ? buf.data : start;
		out->len = escaped ? (size_t) buf.len : (size_t) (sc->p - start);
	}
	else if (escaped)
		pfree(buf.data);
	sc->p++;					/* closing quote */
	return true;
}

static bool
scan_digits(AdyenScan *sc)
{
	const char *start = sc->p;

	while (sc->p < sc->end && *sc->p >= '0' && *sc->p <= '9')
		sc->p++;
	return sc->p > start;
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static bool
scan_number(AdyenScan *sc, AdyenField *out)
{
	const char *start = sc->p;

	if (*sc->p == '-')
		sc->p++;
	if (sc->p < sc->end && *sc->p == '0')
		sc->p++;
	else if (!scan_digits(sc))
		return scan_fail(sc, "invalid number");
	if (sc->p < sc->end && *sc->p == '.')
	{
		sc->p++;
		if (!scan_digits(sc))
			return scan_fail(sc, "invalid number");
	}
	if (sc->p < sc->end && (*sc->p == 'e' || *sc->p == 'E'))
	{
		sc->p++;
		if (sc->p < sc->end && (*sc->p == '+' || *sc->p == '-'))
			sc->p++;
		if (!scan_digits(sc))
			return scan_fail(sc, "invalid number");
	}
	if (out != NULL)
	{
		out->kind = AF_SCALAR;
		out->text = start;
		out->len = sc->p - start;
	}
	return true;
}

/* The field of item that key names in a container of this role, or NULL. */
static AdyenField *
scan_field_for(AdyenRole role, AdyenItem *item, const AdyenField *key)
{
	static const struct
	{
		AdyenRole	role;
		const char *name;
		int			field;
	}			fields[] = {
		{R_ITEM, "pspReference", F_PSP},
		{R_ITEM, "originalReference", F_ORIG},
		{R_ITEM, "merchantAccountCode", F_MERCHANT},
		{R_ITEM, "merchantReference", F_REFERENCE},
		{R_ITEM, "eventCode", F_CODE},
		{R_ITEM, "success", F_SUCCESS},
		{R_AMOUNT, "value", F_VALUE},
		{R_AMOUNT, "currency", F_CURRENCY},
		{R_ADDITIONAL, "hmacSignature", F_SIGNATURE},
		{R_ADDITIONAL, "paymentLinkId", F_LINK},
	};
	int			i;

	for (i = 0; i < lengthof(fields); i++)
		if (fields[i].role == role && strlen(fields[i].name) == key->len &&
			memcmp(fields[i].name, key->text, key->len) == 0)
			return &item->f[fields[i].field];
	return NULL;
}

static bool
key_is(const AdyenField *key, const char *name)
{
	return strlen(name) == key->len && memcmp(name, key->text, key->len) == 0;
}

/* What follows a member of an object or array. */
typedef enum
{
	SCAN_MORE,					/* a ',' (consumed): another member follows */
	SCAN_CLOSED,				/* the closing bracket (consumed) */
	SCAN_BROKEN					/* anything else: sc records the error */
} ScanAfter;

static ScanAfter
scan_after_member(AdyenScan *sc, char close)
{
	scan_ws(sc);
	if (sc->p < sc->end && *sc->p == ',')
	{
		sc->p++;
		scan_ws(sc);
		return SCAN_MORE;
	}
	if (sc->p < sc->end && *sc->p == close)
	{
		sc->p++;
		return SCAN_CLOSED;
	}
	(void) scan_fail(sc, close == '}' ? "',' or '}' expected" : "',' or ']' expected");
	return SCAN_BROKEN;
}

/* An object (sc->p at '{'); members get their role from this one's. */
static bool
scan_object(AdyenScan *sc, AdyenRole role, AdyenItem *item)
{
	sc->p++;
	scan_ws(sc);
	if (sc->p < sc->end && *sc->p == '}')
	{
		sc->p++;
		return true;
	}
	for (;;)
	{
		AdyenField	key = {0};
		AdyenRole	member = R_SKIP;
		AdyenItem  *member_item = item;
		AdyenField *field = NULL;

		if (sc->p >= sc->end || *sc->p != '"')
			return scan_fail(sc, "object key expected");
		if (!scan_string(sc, &key))
			return false;
		scan_ws(sc);
		if (sc->p >= sc->end || *sc->p != ':')
			return scan_fail(sc, "':' expected");
		sc->p++;
		scan_ws(sc);

		switch (role)
		{
			case R_ROOT:
				if (key_is(&key, "notificationItems"))
				{
					member = R_ITEMS;
					sc->has_items = true;
					sc->items_array = false;
					sc->nitems = 0;		/* a repeated key: the last one counts */
				}
				else if (key_is(&key, "type"))
				{
					member = R_FIELD;
					field = &sc->type;
				}
				break;
			case R_WRAPPER:
				if (key_is(&key, "NotificationRequestItem"))
				{
					memset(item, 0, sizeof(AdyenItem));
					member = R_ITEM;
				}
				break;
			case R_ITEM:
				if (key_is(&key, "amount"))
				{
					item->f[F_VALUE].kind = item->f[F_CURRENCY].kind = AF_MISSING;
					member = R_AMOUNT;
				}
				else if (key_is(&key, "additionalData"))
				{
					item->f[F_SIGNATURE].kind = item->f[F_LINK].kind = AF_MISSING;
					member = R_ADDITIONAL;
				}
				else if ((field = scan_field_for(role, item, &key)) != NULL)
					member = R_FIELD;
				break;
			case R_AMOUNT:
			case R_ADDITIONAL:
				if ((field = scan_field_for(role, item, &key)) != NULL)
					member = R_FIELD;
				break;
			default:
				break;
		}
		if (!scan_value(sc, member, member_item, field))
			return false;
		switch (scan_after_member(sc, '}'))
		{
			case SCAN_MORE:
				continue;
			case SCAN_CLOSED:
				return true;
			default:
				return false;
		}
	}
}

/* An array (sc->p at '['); the elements of notificationItems are items. */
static bool
scan_array(AdyenScan *sc, AdyenRole role)
{
	sc->p++;
	scan_ws(sc);
	if (sc->p < sc->end && *sc->p == ']')
	{
		sc->p++;
		return true;
	}
	for (;;)
	{
		AdyenItem  *item = NULL;

		if (role == R_ITEMS)
		{
			if (sc->nitems == sc->capacity)
			{
				sc->capacity = sc->capacity ? 2 * sc->capacity : 4;
				sc->items = sc->items ? repalloc(sc->items, sc->capacity * sizeof(AdyenItem))
					: palloc(sc->capacity * sizeof(AdyenItem));
			}
			item = &sc->items[sc->nitems++];
			memset(item, 0, sizeof(AdyenItem));
		}
		if (!scan_value(sc, role == R_ITEMS ? R_WRAPPER : R_SKIP, item, NULL))
			return false;
		switch (scan_after_member(sc, ']'))
		{
			case SCAN_MORE:
				continue;
			case SCAN_CLOSED:
				return true;
			default:
				return false;
		}
	}
}

static bool
scan_literal(AdyenScan *sc, const char *word, AdyenField *out, AdyenFieldKind kind)
{
	size_t		n = strlen(word);

	if ((size_t) (sc->end - sc->p) < n || memcmp(sc->p, word, n) != 0)
		return scan_fail(sc, "invalid token");
	if (out != NULL)
	{
		out->kind = kind;
		out->text = sc->p;
		out->len = n;
	}
	sc->p += n;
	return true;
}

/*
 * One value.  role says what it is: R_FIELD values are captured into
 * *field (scalars as text, containers only as AF_COMPOSITE); containers
 * pass their role on to their members.
 */
static bool
scan_value(AdyenScan *sc, AdyenRole role, AdyenItem *item, AdyenField *field)
{
	AdyenField *out = (role == R_FIELD) ? field : NULL;
	bool		ok;

	if (sc->p >= sc->end)
		return scan_fail(sc, "value expected");
	switch (*sc->p)
	{
		case '{':
		case '[':
			if (++sc->depth > CRMPAY_MAX_JSON_DEPTH)
				return scan_fail(sc, "JSON nested too deeply");
			if (out != NULL)
				out->kind = AF_COMPOSITE;
			if (*sc->p == '{' && role == R_ITEM)
				item->is_object = true;
			if (*sc->p == '{')
				ok = scan_object(sc, (role == R_ROOT || role == R_WRAPPER || role == R_ITEM ||
									  role == R_AMOUNT || role == R_ADDITIONAL) ? role : R_SKIP,
								 item);
			else
			{
				if (role == R_ITEMS)
					sc->items_array = true;
				ok = scan_array(sc, role == R_ITEMS ? R_ITEMS : R_SKIP);
			}
			sc->depth--;
			return ok;
		case '"':
			return scan_string(sc, out);
		case 't':
			return scan_literal(sc, "true", out, AF_SCALAR);
		case 'f':
			return scan_literal(sc, "false", out, AF_SCALAR);
		case 'n':
			return scan_literal(sc, "null", out, AF_NULL);
		default:
			if (*sc->p == '-' || (*sc->p >= '0' && *sc->p <= '9'))
				return scan_number(sc, out);
			return scan_fail(sc, "invalid token");
	}
}

/* Scans a whole body; false with sc->error when it is not valid JSON. */
static bool
adyen_scan(AdyenScan *sc, const char *body, size_t body_len)
{
	memset(sc, 0, sizeof(*sc));
	sc->p = body;
	sc->end = body + body_len;
	sc->utf8 = (GetDatabaseEncoding() == PG_UTF8);
	if (memchr(body, '\0', body_len) != NULL)
		return scan_fail(sc, "JSON text contains a NUL byte");
	if (!pg_verifymbstr(body, (int) body_len, true))
		return scan_fail(sc, "JSON text is not valid in the database encoding");
	scan_ws(sc);
	if (!scan_value(sc, R_ROOT, NULL, NULL))
		return false;
	scan_ws(sc);
	if (sc->p != sc->end)
		return scan_fail(sc, "text after the JSON value");
	return true;
}

/* A scanned field as the signer saw it: "" when missing or null. */
static inline void
append_field(StringInfo buf, const AdyenField *f)
{
	if (f->kind == AF_SCALAR)
		appendBinaryStringInfo(buf, f->text, (int) f->len);
}

static char *
field_dup(const AdyenField *f)
{
	return f->kind == AF_SCALAR ? pnstrdup(f->text, f->len) : pstrdup("");
}

/* Does base64 text sig equal the base64 of HMAC-SHA256(key, msg) for any key? */
static bool
adyen_signature_matches(const AdyenKeys *keys, const char *msg, size_t msglen,
						const char *sig, size_t siglen)
{
	bool		match = false;
	int			i;

	if (siglen != ADYEN_SIGNATURE_B64)
		return false;
	for (i = 0; i < keys->count; i++)
	{
		unsigned char mac[CRMPAY_MAX_MAC];
		unsigned int maclen;
		char		expected[CRMPAY_BASE64_ENCODED_LEN(CRMPAY_MAX_MAC)];

		crmpay_hmac("SHA256", keys->key[i], keys->len[i], msg, msglen, mac, &maclen);
		if (crmpay_base64_encode(mac, maclen, expected, false) == ADYEN_SIGNATURE_B64 &&
			crmpay_ct_equal(expected, sig, ADYEN_SIGNATURE_B64))
			match = true;
	}
	return match;
}

/*
 * Fills the normalised event of one authentic item: status by eventCode
 * and success, references for matching, and amounts in ISO minor units.
 */
static void
adyen_describe_item(const CrmpayAccount *account, const AdyenItem *item,
					CrmpayWebhookEvent *event, const char *psp, const char *orig,
					const char *merchant, const char *value, const char *currency,
					const char *code, bool success)
{
	const char *our_merchant = account ? crmpay_setting(account, "merchant_account") : NULL;
	const AdyenCurrency *c = adyen_currency(currency);
	int64		adyen_value = -1;
	int64		iso_value = -1;
	bool		is_authorisation = strcmp(code, "AUTHORISATION") == 0;

	if (item->f[F_LINK].kind == AF_SCALAR)
		event->gateway_ref = field_dup(&item->f[F_LINK]);

	/*
	 * The payment's own pspReference: modifications name it
	 * originalReference.  A refused attempt's is not kept: the customer may
	 * pay the same link with another attempt, whose reference refunds and
	 * chargebacks will name.
	 */
	if (!is_authorisation)
		event->gateway_payment_ref = pstrdup(*orig != '\0' ? orig : psp);
	else if (success)
		event->gateway_payment_ref = pstrdup(psp);
	/* merchantReference is the link's reference (our order_ref) on payments only */
	if (is_authorisation && item->f[F_REFERENCE].kind == AF_SCALAR)
		event->order_ref = field_dup(&item->f[F_REFERENCE]);
	if (*currency != '\0')
		event->currency = pstrdup(currency);

	if (our_merchant != NULL && strcmp(merchant, our_merchant) != 0)
	{
		event->ignore_reason = psprintf("notification for merchant account \"%s\", not this account's \"%s\"",
										merchant, our_merchant);
		return;
	}
	if (*value != '\0')
	{
		int64_t		v;

		if (!crmpay_parse_int64(value, strlen(value), &v) || c == NULL ||
			!adyen_to_iso(c, (int64) v, &iso_value))
		{
			event->ignore_reason = psprintf("amount %s %s is not a whole amount crmpay can compare",
											value, currency);
			return;
		}
		adyen_value = (int64) v;
	}

	if (is_authorisation)
	{
		event->new_status = success ? "paid" : "failed";
		event->amount_minor = iso_value;
	}
	else if (strcmp(code, "CAPTURE") == 0)
	{
		if (!success)
			event->ignore_reason = "CAPTURE with success false: the capture failed";
		event->new_status = "paid";
		event->amount_minor = iso_value;
	}
	else if (strcmp(code, "REFUND") == 0)
	{
		if (!success)
			event->ignore_reason = "REFUND with success false: the refund failed";
		else if (adyen_value <= 0)
			event->ignore_reason = "REFUND without a positive amount";
		event->new_status = "refunded";
		event->refund_minor = iso_value;
	}
	else if (strcmp(code, "CANCELLATION") == 0)
	{
		if (!success)
			event->ignore_reason = "CANCELLATION with success false: the payment was not canceled";
		event->new_status = "canceled";
	}
	else if (strcmp(code, "CHARGEBACK") == 0)
	{
		if (!success)
			event->ignore_reason = "CHARGEBACK with success false";
		event->new_status = "disputed";
	}
}

/*
 * Checks one scanned NotificationRequestItem.  keys NULL: the delivery was
 * already authenticated as a whole (HmacSignature header).  Returns NULL
 * when authentic, else why not.  *signing is a reusable buffer.
 */
static const char *
adyen_check_item(const AdyenKeys *keys, const AdyenItem *item, int index, StringInfo signing)
{
	int			i;

	if (!item->is_object)
		return psprintf("item %d is not a NotificationRequestItem", index);
	for (i = F_PSP; i <= F_SUCCESS; i++)
		if (item->f[i].kind == AF_COMPOSITE)
			return psprintf("item %d has a signed field that is not a scalar", index);
	if (keys == NULL)
		return NULL;
	if (item->f[F_SIGNATURE].kind != AF_SCALAR)
		return psprintf("item %d has no additionalData.hmacSignature", index);

	resetStringInfo(signing);
	for (i = F_PSP; i <= F_SUCCESS; i++)
	{
		if (i > F_PSP)
			appendStringInfoChar(signing, ':');
		append_field(signing, &item->f[i]);
	}
	if (!adyen_signature_matches(keys, signing->data, signing->len,
								 item->f[F_SIGNATURE].text, item->f[F_SIGNATURE].len))
		return psprintf("item %d: HMAC signature does not match", index);
	return NULL;
}

/* The normalised event of one item (checked already: rejected says how). */
static CrmpayWebhookEvent *
adyen_item_event(const CrmpayAccount *account, const AdyenItem *item, const char *rejected)
{
	CrmpayWebhookEvent *event = crmpay_new_event();
	char	   *psp,
			   *orig,
			   *code,
			   *success;

	event->rejected_reason = rejected;
	if (!item->is_object)
		return event;
	psp = field_dup(&item->f[F_PSP]);
	orig = field_dup(&item->f[F_ORIG]);
	code = field_dup(&item->f[F_CODE]);
	success = field_dup(&item->f[F_SUCCESS]);
	if (*psp != '\0' && *code != '\0')
	{
		event->event_key = psprintf("%s:%s:%s:%s", psp, code, success, orig);
		event->event_type = code;
	}
	if (rejected != NULL)
		return event;
	if (*psp == '\0' || *code == '\0')
	{
		event->ignore_reason = "notification without pspReference or eventCode";
		return event;
	}
	adyen_describe_item(account, item, event, psp, orig, field_dup(&item->f[F_MERCHANT]),
						field_dup(&item->f[F_VALUE]), field_dup(&item->f[F_CURRENCY]),
						code, strcmp(success, "true") == 0);
	return event;
}

/*
 * The work of receive_events and verify_webhook: authenticate (header or
 * per item) and, with describe, normalise.  NIL + *reason when the
 * delivery as a whole is unusable.  Without describe, returns a one-element
 * list holding the first rejection (or NULL) when the delivery was read.
 */
static List *
adyen_process(const CrmpayAccount *account, const char *secret,
			  const CrmpayHeaders *headers, const char *body, size_t body_len,
			  bool describe, const char **reason)
{
	AdyenKeys	keys;
	const char *header_sig = crmpay_header_get(headers, "hmacsignature");
	AdyenScan	sc;
	StringInfoData signing;
	List	   *events = NIL;
	int			i;

	if (secret == NULL || !adyen_parse_keys(secret, &keys))
	{
		*reason = "the webhook secret is not a hex HMAC key";
		return NIL;
	}
	if (header_sig != NULL &&
		!adyen_signature_matches(&keys, body, body_len, header_sig, strlen(header_sig)))
	{
		explicit_bzero(&keys, sizeof(keys));
		*reason = "HmacSignature header does not match the body";
		return NIL;
	}
	if (!adyen_scan(&sc, body, body_len))
	{
		explicit_bzero(&keys, sizeof(keys));
		*reason = psprintf("malformed JSON: %s at byte %ld", sc.error, (long) (sc.p - body));
		return NIL;
	}
	if (!sc.has_items && header_sig != NULL)
	{
		/* an authentic webhook of another kind (Management, platforms...) */
		CrmpayWebhookEvent *event = crmpay_new_event();
		unsigned char digest[CRMPAY_MAX_MAC];
		unsigned int dlen;
		char		hex[2 * CRMPAY_MAX_MAC + 1];

		explicit_bzero(&keys, sizeof(keys));
		if (!describe)
			return list_make1(NULL);
		crmpay_digest("SHA256", body, body_len, digest, &dlen);
		crmpay_hex_encode(digest, 16, hex);
		hex[32] = '\0';
		event->event_key = psprintf("body:%s", hex);
		event->event_type = sc.type.kind == AF_SCALAR ? field_dup(&sc.type) : "unknown";
		return list_make1(event);
	}
	if (!sc.has_items || !sc.items_array || sc.nitems == 0)
	{
		explicit_bzero(&keys, sizeof(keys));
		*reason = "not an Adyen notification (notificationItems required)";
		return NIL;
	}
	initStringInfo(&signing);
	for (i = 0; i < sc.nitems; i++)
	{
		const char *rejected = adyen_check_item(header_sig ? NULL : &keys, &sc.items[i], i + 1, &signing);

		if (describe)
			events = lappend(events, adyen_item_event(account, &sc.items[i], rejected));
		else if (rejected != NULL)
		{
			events = list_make1((void *) rejected);
			break;
		}
	}
	if (!describe && events == NIL)
		events = list_make1(NULL);
	explicit_bzero(signing.data, signing.maxlen);
	pfree(signing.data);
	explicit_bzero(&keys, sizeof(keys));
	return events;
}

static List *
adyen_receive_events(const CrmpayAccount *account, const char *secret,
					 const CrmpayHeaders *headers, const char *body, size_t body_len,
					 int64 tolerance_s, TimestampTz at, const char **reason)
{
	return adyen_process(account, secret, headers, body, body_len, true, reason);
}

/*
 * crmpay.verify_signature('adyen', ...): true when the HmacSignature header
 * matches the body, or, without it, when every item of the notification
 * carries a matching hmacSignature.
 */
static CrmpayVerifyResult
adyen_verify_webhook(const char *secret, const CrmpayHeaders *headers,
					 const char *body, size_t body_len,
					 int64 tolerance_s, TimestampTz at)
{
	CrmpayVerifyResult result = {false, NULL};
	List	   *verdict = adyen_process(NULL, secret, headers, body, body_len, false, &result.reason);

	if (verdict == NIL)
		return result;
	result.reason = linitial(verdict);
	result.valid = (result.reason == NULL);
	return result;
}

/* Parsing without the secret is not possible for Adyen: receive_events does it. */
static List *
adyen_parse_webhook(const CrmpayHeaders *headers, const char *body,
					size_t body_len, const char **reason)
{
	*reason = "Adyen deliveries are checked and parsed per item";
	return NIL;
}

const CrmpayProvider crmpay_adyen_provider = {
	.name = "adyen",
	.default_api_base = ADYEN_TEST_BASE,
	.webhook_ack = "[accepted]",
	.validate_account = adyen_validate_account,
	.check_amount = adyen_check_amount,
	.build_create_link = adyen_build_create_link,
	.parse_create_link = adyen_parse_create_link,
	.parse_error = adyen_parse_error,
	.verify_webhook = adyen_verify_webhook,
	.parse_webhook = adyen_parse_webhook,
	.receive_events = adyen_receive_events,
	.build_get_link = adyen_build_get_link,
	.build_expire_link = adyen_build_expire_link,
	.parse_link_state = adyen_parse_link_state,
};
