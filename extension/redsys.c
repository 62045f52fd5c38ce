/*-------------------------------------------------------------------------
 *
 * redsys.c
 *	  The Redsys provider (Spain's card switch, "TPV Virtual"): the signed
 *	  redirect form, pay-by-link ("Paygold") through the REST endpoint, the
 *	  HMAC_SHA256_V1 signature both ways, notification intake, and the
 *	  per-order status query reconciliation uses.
 *
 *	  Wire format (pagosonline.redsys.es, the official apiRedsys examples;
 *	  see shared/reference/gateways.md section 5):
 *	  - Every message is a triple Ds_SignatureVersion ("HMAC_SHA256_V1"),
 *		Ds_MerchantParameters (base64 of a JSON object of string values)
 *		and Ds_Signature.
 *	  - Signature: the merchant key (base64 of 24 bytes) encrypts the order
 *		number with 3DES-CBC, zero IV, the order zero-padded to a multiple
 *		of 8 (no PKCS#7); that "order key" is the HMAC-SHA256 key over the
 *		Ds_MerchantParameters text exactly as transmitted.  Requests use
 *		standard base64; notifications and answers use base64url.
 *	  - Redirect: the customer's browser POSTs the triple (form-encoded) to
 *		{api_base}/sis/realizarPago.  crmpay.payment_form() hands the CRM
 *		what to post; no gateway call happens when the link is made.
 *	  - Paygold: POST {api_base}/sis/rest/trataPeticionREST with the triple
 *		as JSON and DS_MERCHANT_TRANSACTIONTYPE "F"; the signed answer
 *		carries the link in Ds_UrlPago2Fases (Ds_Response 9998: waiting
 *		for the card).  Refusals come as HTTP 200 {"errorCode": "SIS0xxx"}.
 *	  - Notifications: the triple, form-encoded (or JSON), POSTed to
 *		DS_MERCHANT_MERCHANTURL; Ds_Response 0000-0099 authorised, 0900
 *		refund/confirmation accepted, 0400 cancellation accepted, anything
 *		else denied.  No event id and no timestamp in the signature: the
 *		dedupe key is made of the notification's own fields.
 *	  - Reconciliation: a signed SOAP status query ("Consulta", Monitor
 *		message) per order, {api_base}/apl02/services/SerClsWSConsulta; see
 *		the section "Status queries" below for its sources.
 *
 *	  Redsys has no idempotency key: the order number (Ds_Order, 4-12
 *	  characters, the first 4 digits, unique per merchant) plays that part.
 *	  crmpay derives it from (merchant, account, order_ref), so a retry of
 *	  the same order reuses it, and checks it against the merchant's other
 *	  payments; it is stored as the payment's gateway_ref.
 *
 *	  OpenSSL contexts are created and freed within one function, with no
 *	  ERROR in between.
 *
 *-------------------------------------------------------------------------
 */
#include "provider.h"

#include <openssl/evp.h>

#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/fmgrprotos.h"

#include "codec.h"
#include "reconcile.h"

#define REDSYS_SIGNATURE_VERSION	"HMAC_SHA256_V1"
#define REDSYS_KEY_LEN				24	/* 3DES (EDE3) key */
#define REDSYS_MAC_LEN				32	/* HMAC-SHA256 */
#define REDSYS_MAX_AMOUNT			INT64CONST(999999999999)	/* 12 digits */
#define REDSYS_ORDER_DIGITS			12
#define REDSYS_MAX_DESCRIPTION		125 /* DS_MERCHANT_PRODUCTDESCRIPTION */
#define REDSYS_MAX_MERCHANT_NAME	25	/* DS_MERCHANT_MERCHANTNAME */
#define REDSYS_MAX_URL				250 /* DS_MERCHANT_URLOK etc. */
#define REDSYS_MAX_EVENT_KEY		200
#define REDSYS_REDIRECT_PATH		"/sis/realizarPago"
#define REDSYS_REST_PATH			"/sis/rest/trataPeticionREST"

/*
 * The currencies Redsys processes, with their ISO 4217 numeric codes.
 * Redsys amounts have two decimals, "except the yen, which has none" (its
 * integration manual); no three-decimal currency is on the list.  A given
 * terminal takes only the currencies its bank set up (else SIS0027).
 */
static const struct
{
	const char *code;
	const char *numeric;
}			redsys_currencies[] = {
	{"EUR", "978"}, {"USD", "840"}, {"GBP", "826"}, {"JPY", "392"},
	{"AUD", "036"}, {"BGN", "975"}, {"CAD", "124"}, {"CHF", "756"},
	{"COP", "170"}, {"CZK", "203"}, {"DKK", "208"}, {"HRK", "191"},
	{"HUF", "348"}, {"ILS", "376"}, {"INR", "356"}, {"MYR", "458"},
	{"NOK", "578"}, {"NZD", "554"}, {"PEN", "604"}, {"PLN", "985"},
	{"RUB", "643"}, {"SAR", "682"}, {"SEK", "752"}, {"SGD", "702"},
	{"THB", "764"}, {"ZAR", "710"},
};

/* SIS error codes crmpay explains, and how it classifies them. */
static const struct
{
	const char *code;
	CrmpayFailureKind kind;
	const char *text;
}			redsys_sis_errors[] = {
	{"SIS0007", CRMPAY_FAIL_REJECTED, "the message sent by the merchant is not correct"},
	{"SIS0008", CRMPAY_FAIL_AUTH, "Ds_Merchant_MerchantCode is missing"},
	{"SIS0009", CRMPAY_FAIL_AUTH, "Ds_Merchant_MerchantCode is malformed"},
	{"SIS0010", CRMPAY_FAIL_AUTH, "Ds_Merchant_Terminal is missing"},
	{"SIS0011", CRMPAY_FAIL_AUTH, "Ds_Merchant_Terminal is malformed"},
	{"SIS0014", CRMPAY_FAIL_REJECTED, "Ds_Merchant_Order is malformed"},
	{"SIS0015", CRMPAY_FAIL_REJECTED, "Ds_Merchant_Currency is missing"},
	{"SIS0016", CRMPAY_FAIL_REJECTED, "Ds_Merchant_Currency is malformed"},
	{"SIS0018", CRMPAY_FAIL_REJECTED, "Ds_Merchant_Amount is missing"},
	{"SIS0019", CRMPAY_FAIL_REJECTED, "Ds_Merchant_Amount is malformed"},
	{"SIS0026", CRMPAY_FAIL_AUTH, "the merchant / terminal does not exist"},
	{"SIS0027", CRMPAY_FAIL_REJECTED, "the currency is not the one set up for the terminal"},
	{"SIS0028", CRMPAY_FAIL_AUTH, "the merchant / terminal is deregistered"},
	{"SIS0030", CRMPAY_FAIL_REJECTED, "wrong transaction type (Paygold may not be enabled)"},
	{"SIS0041", CRMPAY_FAIL_AUTH, "signature calculation error"},
	{"SIS0042", CRMPAY_FAIL_AUTH, "signature calculation error (wrong merchant key)"},
	{"SIS0051", CRMPAY_FAIL_CONFLICT, "repeated order number"},
};

/* ----------------------------------------------------------------
 * The signature
 * ----------------------------------------------------------------
 */

/* Decodes a base64 merchant key; true if it is exactly 24 bytes. */
static bool
redsys_decode_key(const char *b64, unsigned char key[REDSYS_KEY_LEN])
{
	unsigned char buf[CRMPAY_BASE64_DECODED_MAX(64)];
	size_t		len;
	long		n;

	if (b64 == NULL)
		return false;
	len = strlen(b64);
	if (len > 64)
		return false;
	n = crmpay_base64_decode(b64, len, buf, sizeof(buf), CRMPAY_B64_ANY);
	if (n != REDSYS_KEY_LEN)
	{
		explicit_bzero(buf, sizeof(buf));
		return false;
	}
	memcpy(key, buf, REDSYS_KEY_LEN);
	explicit_bzero(buf, sizeof(buf));
	return true;
}

/* DES-EDE3-CBC, fetched once per process (OpenSSL 3 fetches are costly). */
static const EVP_CIPHER *
redsys_cipher(void)
{
	static EVP_CIPHER *cipher = NULL;

	if (cipher == NULL)
		cipher = EVP_CIPHER_fetch(NULL, "DES-EDE3-CBC", NULL);
	return cipher;
}

/*
 * redsys_order_key
 *		The per-order HMAC key: 3DES-CBC(key, IV 0, order zero-padded to a
 *		multiple of 8 bytes).  out must hold order_len + 8 bytes.  Returns
 *		false (never raises) if OpenSSL fails; the context is always freed.
 */
static bool
redsys_order_key(const unsigned char key[REDSYS_KEY_LEN], const char *order,
				 size_t order_len, unsigned char *out, size_t *out_len)
{
	static const unsigned char iv[8] = {0};
	const EVP_CIPHER *cipher = redsys_cipher();
	size_t		padded_len = (order_len + 7) / 8 * 8;
	unsigned char *padded;
	EVP_CIPHER_CTX *ctx;
	int			n1 = 0;
	int			n2 = 0;
	bool		ok;

	*out_len = 0;
	if (cipher == NULL || padded_len > INT_MAX)
		return false;
	padded = palloc0(padded_len + 1);
	memcpy(padded, order, order_len);

	ctx = EVP_CIPHER_CTX_new();
	ok = ctx != NULL &&
		EVP_EncryptInit_ex(ctx, cipher, NULL, key, iv) == 1 &&
		EVP_CIPHER_CTX_set_padding(ctx, 0) == 1 &&
		EVP_EncryptUpdate(ctx, out, &n1, padded, (int) padded_len) == 1 &&
		EVP_EncryptFinal_ex(ctx, out + n1, &n2) == 1;
	EVP_CIPHER_CTX_free(ctx);
	pfree(padded);
	if (!ok || (size_t) (n1 + n2) != padded_len)
		return false;
	*out_len = padded_len;
	return true;
}

/*
 * redsys_mac
 *		HMAC-SHA256(order key, merchant parameters text).  False if the
 *		3DES step failed.
 */
static bool
redsys_mac(const unsigned char key[REDSYS_KEY_LEN], const char *order, size_t order_len,
		   const char *params, size_t params_len, unsigned char mac[CRMPAY_MAX_MAC])
{
	unsigned char *order_key = palloc(order_len + 8);
	size_t		order_key_len;
	unsigned int maclen = 0;

	if (!redsys_order_key(key, order, order_len, order_key, &order_key_len))
	{
		pfree(order_key);
		return false;
	}
	crmpay_hmac("SHA256", order_key, order_key_len, params, params_len, mac, &maclen);
	explicit_bzero(order_key, order_key_len);
	pfree(order_key);
	return maclen == REDSYS_MAC_LEN;
}

/* base64 (standard or url alphabet) of bytes, palloc'd and NUL-terminated. */
static char *
b64(const unsigned char *src, size_t len, bool url)
{
	char	   *out = palloc(CRMPAY_BASE64_ENCODED_LEN(len) + 1);
	size_t		n = crmpay_base64_encode(src, len, out, url);

	out[n] = '\0';
	return out;
}

/*
 * redsys_sign
 *		Ds_Signature (standard base64, as requests use) of a parameters
 *		text for an order; ERROR on a bad key.
 */
static char *
redsys_sign(const char *merchant_key, const char *order, const char *params)
{
	unsigned char key[REDSYS_KEY_LEN];
	unsigned char mac[CRMPAY_MAX_MAC];
	bool		ok;

	if (!redsys_decode_key(merchant_key, key))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Redsys merchant key is not base64 of 24 bytes")));
	ok = redsys_mac(key, order, strlen(order), params, strlen(params), mac);
	explicit_bzero(key, sizeof(key));
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute a Redsys signature"),
				 errdetail("OpenSSL's DES-EDE3-CBC failed.")));
	return b64(mac, REDSYS_MAC_LEN, false);
}

/* ----------------------------------------------------------------
 * Reading a triple (notification, REST answer)
 * ----------------------------------------------------------------
 */
typedef struct RedsysTriple
{
	char	   *version;
	char	   *params;			/* as transmitted (after form decoding) */
	char	   *signature;
	size_t		params_len;
	size_t		signature_len;
} RedsysTriple;

/* Which of the three fields a name is (case-insensitive), or -1. */
static int
triple_field(const char *name, size_t len)
{
	static const char *const names[] = {"Ds_SignatureVersion", "Ds_MerchantParameters", "Ds_Signature"};
	int			i;

	for (i = 0; i < 3; i++)
		if (strlen(names[i]) == len && pg_strncasecmp(name, names[i], len) == 0)
			return i;
	return -1;
}

static void
triple_set(RedsysTriple *t, int field, char *value, size_t len)
{
	if (field == 0)
		t->version = value;
	else if (field == 1)
	{
		t->params = value;
		t->params_len = len;
	}
	else
	{
		t->signature = value;
		t->signature_len = len;
	}
}

static bool
triple_has(const RedsysTriple *t, int field)
{
	return field == 0 ? t->version != NULL : field == 1 ? t->params != NULL : t->signature != NULL;
}

/*
 * redsys_read_triple
 *		Reads Ds_SignatureVersion, Ds_MerchantParameters and Ds_Signature
 *		from a form-encoded body (values URL-decoded) or a JSON object.
 *		Returns NULL, or why the body is unusable.  Never raises.
 */
static const char *
redsys_read_triple(const char *body, size_t len, RedsysTriple *t)
{
	size_t		i = 0;

	memset(t, 0, sizeof(*t));
	while (i < len && (body[i] == ' ' || body[i] == '\t' || body[i] == '\r' || body[i] == '\n'))
		i++;
	if (i < len && body[i] == '{')
	{
		const char *error;
		CrmpayJson *root = crmpay_json_parse(body, len, &error);
		int			k;

		if (root == NULL || root->kind != CRMPAY_JSON_OBJECT)
			return "body is neither a form nor a JSON object";
		for (k = 0; k < root->count; k++)
		{
			int			field = triple_field(root->keys[k], strlen(root->keys[k]));
			const CrmpayJson *v = root->items[k];

			if (field < 0)
				continue;
			if (triple_has(t, field))
				return "a signature field appears more than once";
			if (v->kind != CRMPAY_JSON_STRING)
				return "a signature field is not a string";
			triple_set(t, field, v->text, strlen(v->text));
		}
	}
	else
	{
		size_t		pos = 0;
		CrmpayKVItem item;

		while (crmpay_kv_next(body, len, '&', &pos, &item))
		{
			char	   *name = palloc(item.name_len + 1);
			long		name_len = crmpay_form_unescape(item.name, item.name_len, name);
			int			field;
			char	   *value;
			long		value_len;

			if (name_len < 0)
				return "malformed form encoding";
			field = triple_field(name, (size_t) name_len);
			if (field < 0)
				continue;
			if (triple_has(t, field))
				return "a signature field appears more than once";
			value = palloc(item.value_len + 1);
			value_len = crmpay_form_unescape(item.value, item.value_len, value);
			if (value_len < 0)
				return "malformed form encoding";
			value[value_len] = '\0';
			if (memchr(value, '\0', value_len) != NULL)
				return "a signature field contains a NUL byte";
			triple_set(t, field, value, (size_t) value_len);
		}
	}
	if (t->version == NULL)
		return "missing Ds_SignatureVersion";
	if (t->params == NULL || t->params_len == 0)
		return "missing Ds_MerchantParameters";
	if (t->signature == NULL || t->signature_len == 0)
		return "missing Ds_Signature";
	if (strcmp(t->version, REDSYS_SIGNATURE_VERSION) != 0)
		return "unsupported Ds_SignatureVersion (crmpay knows HMAC_SHA256_V1)";
	return NULL;
}

/*
 * redsys_decode_params
 *		The JSON object inside Ds_MerchantParameters (base64 or base64url).
 *		NULL + *reason when it is not one.
 */
static CrmpayJson *
redsys_decode_params(const RedsysTriple *t, const char **reason)
{
	size_t		cap = CRMPAY_BASE64_DECODED_MAX(t->params_len) + 1;
	unsigned char *json = palloc(cap);
	long		n = crmpay_base64_decode(t->params, t->params_len, json, cap, CRMPAY_B64_ANY);
	const char *error;
	CrmpayJson *root;

	if (n < 0)
	{
		*reason = "Ds_MerchantParameters is not valid base64";
		return NULL;
	}
	root = crmpay_json_parse((char *) json, (size_t) n, &error);
	if (root == NULL || root->kind != CRMPAY_JSON_OBJECT)
	{
		*reason = root == NULL
			? psprintf("Ds_MerchantParameters does not hold valid JSON: %s", error)
			: "Ds_MerchantParameters does not hold a JSON object";
		return NULL;
	}
	return root;
}

/*
 * redsys_field
 *		A parameter by name in any letter case ("Ds_Order", "DS_ORDER").
 *		NULL when absent or not a string/number; *ambiguous is set when the
 *		name appears more than once, in any spelling.
 */
static const char *
redsys_field(const CrmpayJson *params, const char *name, bool *ambiguous)
{
	const char *found = NULL;
	int			hits = 0;
	int			i;

	for (i = 0; i < params->count; i++)
	{
		const CrmpayJson *v = params->items[i];

		if (pg_strcasecmp(params->keys[i], name) != 0)
			continue;
		hits++;
		found = (v->kind == CRMPAY_JSON_STRING || v->kind == CRMPAY_JSON_NUMBER) ? v->text : NULL;
	}
	if (ambiguous && hits > 1)
		*ambiguous = true;
	return hits > 1 ? NULL : found;
}

/*
 * redsys_order_of
 *		The order number a triple is signed for: Ds_Order (notifications,
 *		answers) or else DS_MERCHANT_ORDER (requests), in any letter case.
 */
static const char *
redsys_order_of(const CrmpayJson *params, const char **reason)
{
	bool		ambiguous = false;
	const char *order = redsys_field(params, "Ds_Order", &ambiguous);

	if (order == NULL && !ambiguous)
		order = redsys_field(params, "Ds_Merchant_Order", &ambiguous);
	if (ambiguous)
		*reason = "the order number appears more than once in Ds_MerchantParameters";
	else if (order == NULL || order[0] == '\0')
		*reason = "no Ds_Order in Ds_MerchantParameters";
	return ambiguous ? NULL : order;
}

/*
 * redsys_check_triple
 *		Verifies a triple against a merchant key.  Returns NULL if authentic,
 *		else why not.  On success *params_out is the decoded object.  Never
 *		raises for bad input.
 */
static const char *
redsys_check_triple(const char *merchant_key, const RedsysTriple *t, CrmpayJson **params_out)
{
	unsigned char key[REDSYS_KEY_LEN];
	unsigned char expected[CRMPAY_MAX_MAC];
	unsigned char given[CRMPAY_BASE64_DECODED_MAX(64)];
	const char *reason = NULL;
	CrmpayJson *params;
	const char *order;
	long		given_len;
	bool		ok;

	params = redsys_decode_params(t, &reason);
	if (params == NULL)
		return reason;
	order = redsys_order_of(params, &reason);
	if (order == NULL)
		return reason;
	if (t->signature_len > 64)
		return "Ds_Signature is not a 32-byte base64 value";
	given_len = crmpay_base64_decode(t->signature, t->signature_len, given, sizeof(given),
									 CRMPAY_B64_ANY);
	if (given_len != REDSYS_MAC_LEN)
		return "Ds_Signature is not a 32-byte base64 value";
	if (!redsys_decode_key(merchant_key, key))
		return "the merchant key is not base64 of 24 bytes";
	ok = redsys_mac(key, order, strlen(order), t->params, t->params_len, expected);
	explicit_bzero(key, sizeof(key));
	if (!ok)
		return "could not compute the signature (OpenSSL DES-EDE3-CBC failed)";
	/* both sides as bytes: base64 and base64url spellings compare equal */
	if (!crmpay_ct_equal(given, expected, REDSYS_MAC_LEN))
		return "Ds_Signature does not match the merchant key and parameters";
	*params_out = params;
	return NULL;
}

/* ----------------------------------------------------------------
 * Building requests
 * ----------------------------------------------------------------
 */

/*
 * Appends a JSON string with every non-ASCII character as a \u escape
 * (as PHP's json_encode does), so the parameters are plain ASCII whatever
 * the SIS makes of character sets.
 */
static void
json_ascii_string(StringInfo buf, const char *s)
{
	const unsigned char *p;
	char	   *utf8 = (char *) s;

	if (GetDatabaseEncoding() != PG_UTF8)
		utf8 = pg_server_to_any(s, (int) strlen(s), PG_UTF8);
	appendStringInfoChar(buf, '"');
	for (p = (const unsigned char *) utf8; *p;)
	{
		if (*p == '"' || *p == '\\')
		{
			appendStringInfoChar(buf, '\\');
			appendStringInfoChar(buf, (char) *p++);
		}
		else if (*p < 0x20 || *p == 0x7f)
			appendStringInfo(buf, "\\u%04x", *p++);
		else if (*p < 0x80)
			appendStringInfoChar(buf, (char) *p++);
		else
		{
			int			n = pg_utf_mblen(p);
			pg_wchar	c = utf8_to_unicode(p);

			if (c >= 0x10000)
			{
				c -= 0x10000;
				appendStringInfo(buf, "\\u%04x\\u%04x",
								 (unsigned int) (0xd800 + (c >> 10)),
								 (unsigned int) (0xdc00 + (c & 0x3ff)));
			}
			else
				appendStringInfo(buf, "\\u%04x", (unsigned int) c);
			p += n;
		}
	}
	appendStringInfoChar(buf, '"');
}

static void
param_add(StringInfo json, const char *name, const char *value)
{
	if (value == NULL)
		return;
	appendStringInfoChar(json, json->len == 0 ? '{' : ',');
	json_ascii_string(json, name);
	appendStringInfoChar(json, ':');
	json_ascii_string(json, value);
}

/* The first max characters of s (not bytes). */
static char *
clip_chars(const char *s, int max)
{
	int			len = (int) strlen(s);

	if (pg_mbstrlen(s) <= max)
		return pstrdup(s);
	return pnstrdup(s, pg_mbcharcliplen(s, len, max));
}

/* A member of an object that may be NULL. */
static const CrmpayJson *
member(const CrmpayJson *object, const char *key)
{
	return object ? crmpay_json_member(object, key) : NULL;
}

/* A boolean setting (JSON true/false); def when absent. */
static bool
setting_bool(const CrmpayJson *settings, const char *key, bool def)
{
	const CrmpayJson *v = member(settings, key);

	if (v == NULL || v->kind != CRMPAY_JSON_BOOL)
		return def;
	return strcmp(v->text, "true") == 0;
}

/*
 * The Ds_MerchantParameters JSON (before base64) for a payment.  A form
 * for the redirect ("0", authorisation) or a Paygold request ("F").
 */
static char *
redsys_params_json(const CrmpayAccount *account, const char *order, int64 amount_minor,
				   const char *currency_numeric, const char *order_ref,
				   const char *description, const char *email, bool paygold)
{
	StringInfoData json;
	const char *expiry = crmpay_setting(account, "paygold_expiry_minutes");

	initStringInfo(&json);
	param_add(&json, "DS_MERCHANT_AMOUNT", psprintf(INT64_FORMAT, amount_minor));
	param_add(&json, "DS_MERCHANT_ORDER", order);
	param_add(&json, "DS_MERCHANT_MERCHANTCODE", crmpay_setting(account, "merchant_code"));
	param_add(&json, "DS_MERCHANT_CURRENCY", currency_numeric);
	param_add(&json, "DS_MERCHANT_TRANSACTIONTYPE", paygold ? "F" : "0");
	param_add(&json, "DS_MERCHANT_TERMINAL", crmpay_setting(account, "terminal"));
	param_add(&json, "DS_MERCHANT_MERCHANTURL", crmpay_setting(account, "notification_url"));
	param_add(&json, "DS_MERCHANT_URLOK", crmpay_setting(account, "url_ok"));
	param_add(&json, "DS_MERCHANT_URLKO", crmpay_setting(account, "url_ko"));
	param_add(&json, "DS_MERCHANT_PRODUCTDESCRIPTION",
			  description ? clip_chars(description, REDSYS_MAX_DESCRIPTION) : NULL);
	param_add(&json, "DS_MERCHANT_MERCHANTNAME", crmpay_setting(account, "merchant_name"));
	param_add(&json, "DS_MERCHANT_CONSUMERLANGUAGE", crmpay_setting(account, "consumer_language"));
	param_add(&json, "DS_MERCHANT_MERCHANTDATA", order_ref);
	if (paygold)
	{
		param_add(&json, "DS_MERCHANT_CUSTOMER_MAIL", email);
		param_add(&json, "DS_MERCHANT_P2F_EXPIRYDATE", expiry);
	}
	appendStringInfoChar(&json, '}');
	return json.data;
}

/* base64 of the parameters JSON and its signature. */
static void
redsys_signed_params(const CrmpayAccount *account, const char *order, const char *json,
					 char **params_b64, char **signature)
{
	*params_b64 = b64((const unsigned char *) json, strlen(json), false);
	*signature = redsys_sign(crmpay_json_str(account->credentials, "merchant_key"),
							 order, *params_b64);
}

/* ----------------------------------------------------------------
 * Order numbers
 * ----------------------------------------------------------------
 */

/*
 * redsys_order_number
 *		The Redsys order number of (account, order_ref): 12 digits taken
 *		from SHA-256 of the merchant code, the account and the order ref, so
 *		a retry (even after a rolled-back attempt) reuses it.  A number
 *		already used by another payment of the same merchant (any account
 *		with that merchant_code) is skipped for the next candidate, under an
 *		advisory lock on (merchant, number), so concurrent orders cannot
 *		take the same one.
 */
static char *
redsys_order_number(const CrmpayAccount *account, const char *order_ref)
{
	static SPIPlanPtr plan = NULL;
	const char *merchant = crmpay_setting(account, "merchant_code");
	int			attempt;

	if (merchant == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no Redsys merchant_code", account->name)));

	SPI_connect();
	{
		static const Oid types[4] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID};

		crmpay_saved_plan(&plan,
						  "SELECT 1 FROM crmpay.payments p"
						  " WHERE p.gateway_ref = $1"
						  "   AND p.account IN (SELECT a.name FROM crmpay.gateway_accounts a"
						  "                      WHERE a.provider = 'redsys'"
						  "                        AND a.settings->>'merchant_code' = $2)"
						  "   AND NOT (p.account = $3 AND p.order_ref = $4)"
						  " LIMIT 1", 4, types);
	}

	for (attempt = 0; attempt < 100; attempt++)
	{
		char	   *seed = psprintf("crmpay/redsys-order/v1\x1f%s\x1f%s\x1f%s\x1f%d",
									merchant, account->name, order_ref, attempt);
		unsigned char digest[CRMPAY_MAX_MAC];
		unsigned int digest_len;
		uint64		v = 0;
		char		number[REDSYS_ORDER_DIGITS + 1];
		char	   *lock_key;
		Datum		values[4];
		int			i;

		crmpay_digest("SHA256", seed, strlen(seed), digest, &digest_len);
		for (i = 0; i < 8; i++)
			v = (v << 8) | digest[i];
		snprintf(number, sizeof(number), "%012" INT64_MODIFIER "u", v % UINT64CONST(1000000000000));

		lock_key = psprintf("crmpay/redsys-order\x1f%s\x1f%s", merchant, number);
		DirectFunctionCall1(pg_advisory_xact_lock_int8,
							Int64GetDatum((int64) hash_bytes_extended((unsigned char *) lock_key,
																	  strlen(lock_key), 0)));
		values[0] = CStringGetTextDatum(number);
		values[1] = CStringGetTextDatum(merchant);
		values[2] = CStringGetTextDatum(account->name);
		values[3] = CStringGetTextDatum(order_ref);
		crmpay_spi_run(plan, values, NULL, true, 1, SPI_OK_SELECT, "Redsys order number lookup");
		if (SPI_processed == 0)
		{
			SPI_finish();
			return pstrdup(number);
		}
	}
	SPI_finish();
	ereport(ERROR,
			(errcode(ERRCODE_INTERNAL_ERROR),
			 errmsg("could not find a free Redsys order number for order \"%s\"", order_ref)));
	pg_unreachable();
}

/* ----------------------------------------------------------------
 * The provider
 * ----------------------------------------------------------------
 */

/* All digits, length within [min, max]. */
static bool
all_digits(const char *s, size_t min, size_t max)
{
	size_t		len = s ? strlen(s) : 0;
	size_t		i;

	if (s == NULL || len < min || len > max)
		return false;
	for (i = 0; i < len; i++)
		if (s[i] < '0' || s[i] > '9')
			return false;
	return true;
}

/* A URL setting: optional or required, http(s), at most 250 characters. */
static void
check_url_setting(const CrmpayJson *settings, const char *key, bool required)
{
	const CrmpayJson *v = member(settings, key);
	char	   *what = psprintf("settings.%s", key);

	if (v == NULL || v->kind == CRMPAY_JSON_NULL)
	{
		if (required)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("Redsys accounts need settings.%s", key),
					 errdetail("Redsys POSTs the signed result of every payment to this URL (DS_MERCHANT_MERCHANTURL); the CRM hands it to crmpay.receive_webhook()."),
					 errhint("Pass settings like {\"merchant_code\": \"999008881\", \"terminal\": \"1\", \"notification_url\": \"https://crm.example/redsys/notify\"}.")));
		return;
	}
	if (v->kind != CRMPAY_JSON_STRING)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a string", what)));
	crmpay_http_check_url(v->text, what);
	if (strlen(v->text) > REDSYS_MAX_URL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is longer than Redsys accepts", what),
				 errdetail("Redsys takes URLs of at most %d characters.", REDSYS_MAX_URL)));
}

static void
redsys_validate_account(const CrmpayJson *credentials, const CrmpayJson *settings,
						const char *webhook_secret)
{
	const CrmpayJson *keynode = crmpay_json_member(credentials, "merchant_key");
	unsigned char key[REDSYS_KEY_LEN];
	const char *merchant_code = settings ? crmpay_json_str(settings, "merchant_code") : NULL;
	const char *terminal = settings ? crmpay_json_str(settings, "terminal") : NULL;
	const CrmpayJson *v;

	if (keynode == NULL || keynode->kind != CRMPAY_JSON_STRING)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Redsys credentials need a \"merchant_key\""),
				 errdetail("It is the terminal's SHA-256 secret key (\"clave secreta\"), 32 base64 characters."),
				 errhint("Pass credentials like {\"merchant_key\": \"<the 32-character key from the Redsys administration module>\"}.")));
	if (!redsys_decode_key(keynode->text, key))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Redsys merchant_key must be base64 of a 24-byte key"),
				 errdetail("The key given is %d characters long and does not decode to 24 bytes.",
						   (int) strlen(keynode->text)),
				 errhint("Copy the terminal's SHA-256 key (32 characters, such as the public test key sq7HjrUOBfKmC576ILgskD5srU870gJ7) from the Redsys administration module.")));
	explicit_bzero(key, sizeof(key));

	if (!all_digits(merchant_code, 9, 9))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Redsys accounts need settings.merchant_code, the 9-digit merchant number (FUC)"),
				 merchant_code ? errdetail("\"%s\" is not 9 digits.", merchant_code)
				 : errdetail("settings.merchant_code is missing or not a string."),
				 errhint("Pass it as a string, e.g. {\"merchant_code\": \"999008881\"}.")));
	if (!all_digits(terminal, 1, 3))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Redsys accounts need settings.terminal, the terminal number (1 to 3 digits)"),
				 terminal ? errdetail("\"%s\" is not 1 to 3 digits.", terminal)
				 : errdetail("settings.terminal is missing or not a string."),
				 errhint("Pass it as a string, e.g. {\"terminal\": \"1\"}.")));
	check_url_setting(settings, "notification_url", true);
	check_url_setting(settings, "url_ok", false);
	check_url_setting(settings, "url_ko", false);
	check_url_setting(settings, "payment_page_url", false);

	v = member(settings, "paygold");
	if (v != NULL && v->kind != CRMPAY_JSON_BOOL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("settings.paygold must be true or false"),
				 errhint("Set it to true only if the bank enabled Paygold (pay-by-link) on this terminal.")));
	v = member(settings, "paygold_expiry_minutes");
	if (v != NULL && (v->kind != CRMPAY_JSON_STRING || !all_digits(v->text, 1, 6) || atoi(v->text) == 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("settings.paygold_expiry_minutes must be a string of 1 to 6 digits, not zero"),
				 errhint("For example {\"paygold_expiry_minutes\": \"1440\"} for links valid one day.")));
	v = member(settings, "merchant_name");
	if (v != NULL && (v->kind != CRMPAY_JSON_STRING || pg_mbstrlen(v->text) > REDSYS_MAX_MERCHANT_NAME))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("settings.merchant_name must be a string of at most %d characters",
						REDSYS_MAX_MERCHANT_NAME)));
	v = member(settings, "consumer_language");
	if (v != NULL && (v->kind != CRMPAY_JSON_STRING || !all_digits(v->text, 1, 3)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("settings.consumer_language must be a Redsys language code of 1 to 3 digits"),
				 errhint("For example \"001\" for Spanish, \"002\" for English.")));
	if (webhook_secret != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Redsys accounts take no webhook_secret"),
				 errdetail("Redsys signs its notifications with the merchant key (credentials.merchant_key)."),
				 errhint("Pass NULL as webhook_secret.")));
}

/* The numeric code of a currency Redsys takes, or NULL. */
static const char *
redsys_currency_numeric(const char *code)
{
	int			i;

	for (i = 0; i < lengthof(redsys_currencies); i++)
		if (strcmp(redsys_currencies[i].code, code) == 0)
			return redsys_currencies[i].numeric;
	return NULL;
}

/* The alphabetic code of a Redsys numeric currency code, or NULL. */
static const char *
redsys_currency_alpha(const char *numeric)
{
	int			i;

	char		padded[4];

	/* "36" and "036" are the same code */
	if (!all_digits(numeric, 1, 3))
		return NULL;
	snprintf(padded, sizeof(padded), "%03d", atoi(numeric));
	for (i = 0; i < lengthof(redsys_currencies); i++)
		if (strcmp(redsys_currencies[i].numeric, padded) == 0)
			return redsys_currencies[i].code;
	return NULL;
}

/*
 * Redsys takes the currencies above, amounts in minor units of at most
 * 12 digits; two decimals, or none for the yen.
 */
static void
redsys_check_amount(const char *currency, int exponent, int64 amount_minor)
{
	if (redsys_currency_numeric(currency) == NULL)
	{
		StringInfoData list;
		int			i;

		initStringInfo(&list);
		for (i = 0; i < lengthof(redsys_currencies); i++)
			appendStringInfo(&list, "%s%s", i ? ", " : "", redsys_currencies[i].code);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Redsys does not accept currency %s", currency),
				 exponent == 3
				 ? errdetail("Redsys amounts have two decimals, or none for JPY; %s has three.", currency)
				 : errdetail("Redsys processes %s (each terminal only those its bank set up).", list.data),
				 errhint("Charge the order in EUR, or through another gateway.")));
	}
	if (amount_minor > REDSYS_MAX_AMOUNT)
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("amount is too large for Redsys"),
				 errdetail("Redsys amounts have at most 12 digits in minor units; this order has " INT64_FORMAT " of %s.",
						   amount_minor, currency)));
}

/* The CRM's own payment page for a payment, from settings.payment_page_url. */
static char *
payment_page_url(const CrmpayAccount *account, const char *order, const char *order_ref)
{
	const char *template = crmpay_setting(account, "payment_page_url");
	StringInfoData url;
	const char *p;

	if (template == NULL)
		return NULL;
	initStringInfo(&url);
	for (p = template; *p;)
	{
		if (strncmp(p, "{order}", 7) == 0)
		{
			appendStringInfoString(&url, order);
			p += 7;
		}
		else if (strncmp(p, "{order_ref}", 11) == 0)
		{
			crmpay_url_append_escaped(&url, order_ref);
			p += 11;
		}
		else
			appendStringInfoChar(&url, *p++);
	}
	return url.data;
}

/*
 * Without Paygold the link is the signed redirect form: nothing to ask
 * Redsys.  The payment keeps its order number; crmpay.payment_form()
 * signs the form when the customer comes; url is the CRM's own payment
 * page when settings.payment_page_url names one, else NULL.
 */
static bool
redsys_local_link(const CrmpayAccount *account, const CrmpayLinkRequest *request,
				  CrmpayLinkResult *result)
{
	if (setting_bool(account->settings, "paygold", false))
		return false;
	result->gateway_ref = redsys_order_number(account, request->order_ref);
	result->url = payment_page_url(account, result->gateway_ref, request->order_ref);
	result->status = "open";
	return true;
}

/* Paygold: POST the signed "F" request to trataPeticionREST. */
static void
redsys_build_create_link(const CrmpayAccount *account, const CrmpayLinkRequest *request,
						 CrmpayHttpRequest *out)
{
	StringInfoData body;
	char	   *order = redsys_order_number(account, request->order_ref);
	char	   *params;
	char	   *signature;
	const char *numeric = request->currency_numeric ? request->currency_numeric
		: redsys_currency_numeric(request->currency);

	redsys_signed_params(account, order,
						 redsys_params_json(account, order, request->amount_minor, numeric,
											request->order_ref, request->description,
											request->email, true),
						 &params, &signature);
	initStringInfo(&body);
	appendStringInfo(&body, "{\"Ds_SignatureVersion\":\"%s\",\"Ds_MerchantParameters\":\"%s\",\"Ds_Signature\":\"%s\"}",
					 REDSYS_SIGNATURE_VERSION, params, signature);
	out->method = "POST";
	out->url = psprintf("%s%s", account->api_base, REDSYS_REST_PATH);
	out->headers = list_make2("Content-Type: application/json",
							  "Accept: application/json");
	out->body = body.data;
	out->body_len = body.len;
}

/* Fills kind, code and message from a Redsys {"errorCode": "SIS0xxx"}. */
static bool
redsys_error_code(const CrmpayJson *root, CrmpayGatewayFailure *failure)
{
	const char *code = root ? crmpay_json_str(root, "errorCode") : NULL;
	int			i;

	if (code == NULL)
		return false;
	failure->kind = CRMPAY_FAIL_REJECTED;
	failure->code = pstrdup(code);
	failure->message = psprintf("Redsys error %s", code);
	for (i = 0; i < lengthof(redsys_sis_errors); i++)
		if (strcmp(redsys_sis_errors[i].code, code) == 0)
		{
			failure->kind = redsys_sis_errors[i].kind;
			failure->message = psprintf("Redsys error %s: %s", code, redsys_sis_errors[i].text);
		}
	if (failure->kind == CRMPAY_FAIL_CONFLICT)
		failure->message = psprintf("%s; an earlier attempt may already have created this order's Paygold link, which Redsys sent to the customer",
									failure->message);
	failure->retryable = false;
	return true;
}

/*
 * Reads trataPeticionREST's answer: an error code, or a triple signed
 * with the merchant key whose parameters carry Ds_UrlPago2Fases.
 */
static bool
redsys_parse_create_link(const CrmpayAccount *account, const CrmpayHttpResponse *response,
						 CrmpayLinkResult *result, CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *root = crmpay_json_parse(response->body, response->body_len, &error);
	RedsysTriple triple;
	CrmpayJson *params = NULL;
	const char *reason;
	const char *url;
	const char *ds_response;
	const char *expiry;

	if (root == NULL || root->kind != CRMPAY_JSON_OBJECT)
	{
		failure->message = psprintf("Redsys answered HTTP %ld with no JSON object%s%s",
									response->status, error ? ": " : "", error ? error : "");
		return false;
	}
	if (redsys_error_code(root, failure))
		return false;
	reason = redsys_read_triple(response->body, response->body_len, &triple);
	if (reason == NULL)
		reason = redsys_check_triple(crmpay_json_str(account->credentials, "merchant_key"),
									 &triple, &params);
	if (reason != NULL)
	{
		failure->message = psprintf("Redsys answer not accepted: %s", reason);
		return false;
	}
	ds_response = redsys_field(params, "Ds_Response", NULL);
	if (ds_response != NULL && strcmp(ds_response, "9998") != 0 &&
		!(all_digits(ds_response, 1, 4) && atoi(ds_response) <= 99))
	{
		failure->kind = CRMPAY_FAIL_REJECTED;
		failure->code = pstrdup(ds_response);
		failure->message = psprintf("Redsys refused the Paygold request with Ds_Response %s", ds_response);
		return false;
	}
	url = redsys_field(params, "Ds_UrlPago2Fases", NULL);
	result->gateway_ref = crmpay_pstrdup_or_null(redsys_field(params, "Ds_Order", NULL));
	if (url == NULL || url[0] == '\0' || result->gateway_ref == NULL)
	{
		failure->message = "Redsys answer has no Ds_UrlPago2Fases (is Paygold enabled on the terminal?)";
		return false;
	}
	result->url = pstrdup(url);
	result->status = "open";
	expiry = crmpay_setting(account, "paygold_expiry_minutes");
	if (expiry != NULL)
		result->expires_at = GetCurrentTimestamp() + (TimestampTz) atoi(expiry) * 60 * USECS_PER_SEC;
	return true;
}

static char *redsys_soap_return(const char *body, size_t len, const char **reason);

/*
 * An HTTP error: a REST {"errorCode"}, or a SOAP fault from the status
 * query (its faultstring), keeping the HTTP classification.
 */
static void
redsys_parse_error(const CrmpayHttpResponse *response, CrmpayGatewayFailure *failure)
{
	const char *error;
	CrmpayJson *root = crmpay_json_parse(response->body, response->body_len, &error);
	CrmpayFailureKind kind = failure->kind;
	const char *reason = NULL;

	/* keep the HTTP classification (5xx stays retryable) */
	if (redsys_error_code(root, failure))
	{
		if (kind == CRMPAY_FAIL_UNAVAILABLE || kind == CRMPAY_FAIL_RATE_LIMITED)
			failure->kind = kind;
	}
	else if (root == NULL && redsys_soap_return(response->body, response->body_len, &reason) == NULL &&
			 reason != NULL && strncmp(reason, "SOAP fault", 10) == 0)
		failure->message = pstrdup(reason);
}

/*
 * redsys_verify_webhook
 *		Checks a notification: the triple from a form or JSON body, the
 *		order number from its parameters, the signature in base64 or
 *		base64url.  secret is the merchant key.  Redsys signs no timestamp,
 *		so there is no replay window (dedupe takes care of replays).
 */
static CrmpayVerifyResult
redsys_verify_webhook(const char *secret, const CrmpayHeaders *headers,
					  const char *body, size_t body_len,
					  int64 tolerance_s, TimestampTz at)
{
	CrmpayVerifyResult result = {false, NULL};
	RedsysTriple triple;
	CrmpayJson *params = NULL;

	result.reason = redsys_read_triple(body, body_len, &triple);
	if (result.reason == NULL)
		result.reason = redsys_check_triple(secret, &triple, &params);
	result.valid = (result.reason == NULL);
	return result;
}

/* A short, printable value for event keys and types. */
static const char *
field_or_empty(const CrmpayJson *params, const char *name)
{
	const char *v = redsys_field(params, name, NULL);

	return v ? v : "";
}

/*
 * redsys_parse_webhook
 *		One event per notification.  Status by Ds_Response (0000-0099
 *		authorised: paid, or processing for a preauthorisation; 0900 refund
 *		or confirmation accepted; 0400 cancellation accepted; 9998/9999 still
 *		in progress; anything else denied: failed).  The dedupe key is the
 *		notification's identity: order, transaction type, response,
 *		authorisation code, amount, date and hour.
 */
static List *
redsys_parse_webhook(const CrmpayHeaders *headers, const char *body, size_t body_len,
					 const char **reason)
{
	RedsysTriple triple;
	CrmpayJson *params;
	CrmpayWebhookEvent *event;
	const char *order;
	const char *response;
	const char *type;
	const char *amount;
	const char *currency;
	const char *auth;
	int			code;
	bool		refund;
	char	   *key;

	*reason = redsys_read_triple(body, body_len, &triple);
	if (*reason != NULL)
		return NIL;
	params = redsys_decode_params(&triple, reason);
	if (params == NULL)
		return NIL;
	order = redsys_order_of(params, reason);
	if (order == NULL)
		return NIL;
	response = redsys_field(params, "Ds_Response", NULL);
	if (!all_digits(response, 1, 4))
	{
		*reason = "Ds_Response is missing or not a number of up to 4 digits";
		return NIL;
	}
	amount = redsys_field(params, "Ds_Amount", NULL);
	if (amount != NULL && !all_digits(amount, 1, 12))
	{
		*reason = "Ds_Amount is not a number of up to 12 digits";
		return NIL;
	}
	currency = redsys_field(params, "Ds_Currency", NULL);
	if (currency != NULL && !all_digits(currency, 1, 3))
	{
		*reason = "Ds_Currency is not an ISO 4217 numeric code";
		return NIL;
	}
	type = redsys_field(params, "Ds_TransactionType", NULL);
	if (type == NULL)
		type = "0";
	auth = redsys_field(params, "Ds_AuthorisationCode", NULL);

	event = crmpay_new_event();
	event->gateway_ref = pstrdup(order);
	if (amount != NULL)
		(void) crmpay_parse_int64(amount, strlen(amount), &event->amount_minor);
	if (currency != NULL)
	{
		const char *alpha = redsys_currency_alpha(currency);

		event->currency = alpha ? pstrdup(alpha) : psprintf("ISO 4217 %s", currency);
	}

	code = atoi(response);
	refund = (strcmp(type, "3") == 0 || strcmp(type, "34") == 0);
	if (code <= 99)
	{
		bool		preauth = (strcmp(type, "1") == 0 || strcmp(type, "7") == 0 ||
							   strcmp(type, "O") == 0);

		event->event_type = preauth ? "preauthorisation.authorised" : "payment.authorised";
		event->new_status = preauth ? "processing" : "paid";
		if (auth != NULL && auth[0] != '\0')
			event->gateway_payment_ref = psprintf("%s/%s", order, auth);
	}
	else if (code == 900 && refund)
	{
		event->event_type = "refund.accepted";
		if (event->amount_minor > 0)
		{
			event->refund_minor = event->amount_minor;
			event->new_status = "refunded";	/* or partial: decided by the intake */
		}
		event->amount_minor = -1;	/* a refund's amount is not the payment's */
	}
	else if (code == 900)
	{
		event->event_type = "confirmation.accepted";
		event->new_status = "paid";
	}
	else if (code == 400)
	{
		event->event_type = "cancellation.accepted";
		event->new_status = "canceled";
	}
	else if (code == 9998 || code == 9999)
		event->event_type = "payment.in_progress";
	else if (refund)
		event->event_type = "refund.denied";
	else
	{
		event->event_type = "payment.denied";
		event->new_status = "failed";
	}

	key = psprintf("redsys:%s:%s:%s:%s:%s:%s:%s", order, type, response,
				   auth ? auth : "", amount ? amount : "",
				   field_or_empty(params, "Ds_Date"), field_or_empty(params, "Ds_Hour"));
	if (strlen(key) > REDSYS_MAX_EVENT_KEY || !pg_verifymbstr(key, (int) strlen(key), true))
	{
		unsigned char digest[CRMPAY_MAX_MAC];
		unsigned int digest_len;
		char		hex[2 * CRMPAY_MAX_MAC + 1];

		crmpay_digest("SHA256", key, strlen(key), digest, &digest_len);
		crmpay_hex_encode(digest, digest_len, hex);
		hex[2 * digest_len] = '\0';
		key = psprintf("redsys:sha256:%s", hex);
	}
	event->event_key = key;
	return list_make1(event);
}

/* ----------------------------------------------------------------
 * Status queries for reconciliation: the SOAP "Consulta" service
 * ----------------------------------------------------------------
 *
 * Wire format, from Redsys' manual "TPV-Virtual Consulta SOAP" (RS.TE.CEL.
 * MAN.0021 v1.4, 13/08/2020; a copy is in the public repository
 * Metadrop/redsys-query-php), whose worked examples crmpay's tests
 * reproduce byte for byte (tests/test_redsys_reconcile.py):
 * - POST {api_base}/apl02/services/SerClsWSConsulta (test environment
 *	 https://sis-t.redsys.es:25443, live https://sis.redsys.es), a SOAP
 *	 call of consultaOperaciones whose one argument, cadenaXML, is the
 *	 message <Messages><Version Ds_Version="0.0"><Message><Monitor>
 *	 <Ds_MerchantCode/><Ds_Terminal/><Ds_Order/></Monitor></Message>
 *	 </Version><Signature/><SignatureVersion>HMAC_SHA256_V1
 *	 </SignatureVersion></Messages>, written without whitespace between
 *	 tags (the manual asks for that).  "Monitor" (simple) answers every
 *	 operation of one order, whatever its type (manual 3.1).
 * - Signature: HMAC-SHA256 of the whole <Version ...>...</Version> element
 *	 text, keyed with the 3DES order key of Ds_Order (the same key as every
 *	 Redsys signature), standard base64 (manual 3.4.1).  The answer is
 *	 signed the same way over its own <Version> element, with the key of the
 *	 order asked about (the manual's example answers verify so; it has no
 *	 example of a signed error answer, so crmpay does not ask errors for a
 *	 signature).
 * - Answer: <Messages><Version Ds_Version="0.0"><Message> with one
 *	 <Response> per operation (Ds_MerchantCode, Ds_Terminal, Ds_Order,
 *	 Ds_TransactionType, Ds_Date yyyy-mm-dd, Ds_Hour HH:mm:ss, Ds_Amount,
 *	 Ds_Currency, card fields, Ds_SecurePayment, Ds_State, and Ds_Response
 *	 once the operation has a result), or <ErrorMsg><Ds_ErrorCode>: XML0024
 *	 "no operations for the data requested" is an order Redsys does not
 *	 know; XML0023 a wrong signature; the rest are in redsys_query_errors.
 *	 Ds_State: S requested, P authorising, A authenticating, F finished,
 *	 T no answer / technical error, E D L W O other payment methods in
 *	 progress.
 *
 * Not in the manual, taken from public clients (PHP civitatis/ and
 * Metadrop/redsys-query-php, the Rust Redsys connector of juspay's
 * hyperswitch, and a Python client's test fixture, which agree): the SOAP
 * envelope (namespace http://webservices.apl02.redsys.es, the message in a
 * CDATA section of cadenaXML), the header SOAPAction: consultaOperaciones,
 * and an answer that carries the message as escaped text in
 * consultaOperacionesResponse/consultaOperacionesReturn.  crmpay also takes
 * the message there as a CDATA section or as plain child elements.  Not
 * verified anywhere: that error answers come with HTTP 200 (the clients
 * assume it; a SOAP fault, usually HTTP 500, is reported with its
 * faultstring), whether they are signed, and the time zone of Ds_Date /
 * Ds_Hour, which crmpay reads like the back-office export
 * (settings.report_timezone, default Europe/Madrid).  Ds_State T (no
 * answer / technical error) counts as failed: nothing was taken.
 *
 * Statuses follow the notification mapping: Ds_Response 0000-0099
 * authorised (paid; processing for a preauthorisation), 0900 refund or
 * confirmation accepted, 0400 cancellation accepted, 9998/9999 still
 * waiting, anything else denied; an operation without Ds_Response is in
 * progress (by Ds_State).
 */
#define REDSYS_QUERY_PATH		"/apl02/services/SerClsWSConsulta"
#define REDSYS_QUERY_NS			"http://webservices.apl02.redsys.es"
#define REDSYS_QUERY_UNKNOWN	"XML0024"

/* Consulta error codes (manual section 4), and how crmpay classifies them. */
static const struct
{
	const char *code;
	CrmpayFailureKind kind;
	const char *text;
}			redsys_query_errors[] = {
	{"XML0000", CRMPAY_FAIL_REJECTED, "errors processing the XML message sent"},
	{"XML0001", CRMPAY_FAIL_REJECTED, "the XML message sent does not follow Redsys' DTD"},
	{"XML0002", CRMPAY_FAIL_REJECTED, "no Message element in the XML message sent"},
	{"XML0003", CRMPAY_FAIL_REJECTED, "unknown message type"},
	{"XML0004", CRMPAY_FAIL_AUTH, "Ds_MerchantCode is missing"},
	{"XML0005", CRMPAY_FAIL_AUTH, "Ds_MerchantCode is empty"},
	{"XML0006", CRMPAY_FAIL_AUTH, "Ds_MerchantCode has the wrong length"},
	{"XML0007", CRMPAY_FAIL_AUTH, "Ds_MerchantCode is not numeric"},
	{"XML0008", CRMPAY_FAIL_AUTH, "Ds_Terminal is missing"},
	{"XML0009", CRMPAY_FAIL_AUTH, "Ds_Terminal is empty"},
	{"XML0010", CRMPAY_FAIL_AUTH, "Ds_Terminal has the wrong length"},
	{"XML0011", CRMPAY_FAIL_AUTH, "Ds_Terminal is not numeric"},
	{"XML0012", CRMPAY_FAIL_REJECTED, "Ds_Order is missing"},
	{"XML0013", CRMPAY_FAIL_REJECTED, "Ds_Order is empty"},
	{"XML0014", CRMPAY_FAIL_REJECTED, "Ds_Order has the wrong length"},
	{"XML0015", CRMPAY_FAIL_REJECTED, "the first 4 characters of Ds_Order are not digits"},
	{"XML0021", CRMPAY_FAIL_REJECTED, "no Signature element"},
	{"XML0022", CRMPAY_FAIL_REJECTED, "the Signature element is empty"},
	{"XML0023", CRMPAY_FAIL_AUTH, "the signature is not correct (is credentials.merchant_key this terminal's key?)"},
	{"XML0025", CRMPAY_FAIL_UNAVAILABLE, "Redsys' answer XML is malformed"},
	{"XML0028", CRMPAY_FAIL_AUTH, "the merchant / terminal is deregistered"},
	{"XML0029", CRMPAY_FAIL_REJECTED, "the SignatureVersion element is empty"},
	{"XML0030", CRMPAY_FAIL_REJECTED, "wrong SignatureVersion"},
	{"XML0041", CRMPAY_FAIL_REJECTED, "this merchant may not use the SOAP status query (Consulta SOAP); ask the bank to enable it, or set the account's settings.reconcile_sources to [] to reconcile from imported reports only"},
};

/* memmem, which is not portable. */
static const char *
find_bytes(const char *hay, const char *end, const char *needle)
{
	size_t		n = strlen(needle);

	for (; hay + n <= end; hay++)
		if (*hay == *needle && memcmp(hay, needle, n) == 0)
			return hay;
	return NULL;
}

static bool
xml_space(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* One element of a document: where it is, and its local name. */
typedef struct XmlNode
{
	const char *name;			/* local name (after any "prefix:") */
	size_t		name_len;
	const char *start;			/* its '<' */
	const char *content;		/* between the start and the end tag */
	size_t		content_len;
	const char *end;			/* just after its end tag */
} XmlNode;

/*
 * Skips whitespace, comments, processing instructions and a DOCTYPE (no
 * internal subset).  NULL if one is not closed.
 */
static const char *
xml_skip_misc(const char *p, const char *end)
{
	for (;;)
	{
		const char *q;

		while (p < end && xml_space(*p))
			p++;
		if (end - p >= 4 && memcmp(p, "<!--", 4) == 0)
		{
			q = find_bytes(p + 4, end, "-->");
			p = q ? q + 3 : NULL;
		}
		else if (end - p >= 2 && memcmp(p, "<?", 2) == 0)
		{
			q = find_bytes(p + 2, end, "?>");
			p = q ? q + 2 : NULL;
		}
		else if (end - p >= 9 && memcmp(p, "<!DOCTYPE", 9) == 0)
		{
			q = memchr(p, '>', end - p);
			p = q ? q + 1 : NULL;
		}
		else
			return p;
		if (p == NULL)
			return NULL;
	}
}

/*
 * The end of the tag that starts at p ('<'): just after its '>', quoted
 * attribute values skipped; *empty when it is "<name/>".  NULL if unclosed.
 */
static const char *
xml_tag_end(const char *p, const char *end, bool *empty)
{
	char		quote = 0;

	for (p++; p < end; p++)
	{
		if (quote)
		{
			if (*p == quote)
				quote = 0;
		}
		else if (*p == '"' || *p == '\'')
			quote = *p;
		else if (*p == '<')
			return NULL;
		else if (*p == '>')
		{
			*empty = (p[-1] == '/');
			return p + 1;
		}
	}
	return NULL;
}

/* Does a tag named qname (of qlen bytes) start at p, just after '<' or "</"? */
static bool
xml_names(const char *p, const char *end, const char *qname, size_t qlen)
{
	return (size_t) (end - p) > qlen && memcmp(p, qname, qlen) == 0 &&
		(xml_space(p[qlen]) || p[qlen] == '>' || p[qlen] == '/');
}

/*
 * xml_next_element
 *		Reads the element at *pos (after whitespace and comments) of a piece
 *		of a document ending at end, finding its end tag (nested elements of
 *		the same name, CDATA sections and comments taken into account), and
 *		moves *pos past it.  Returns false at the end of the piece; false and
 *		*bad when there is text or broken markup instead.  Never raises.
 */
static bool
xml_next_element(const char **pos, const char *end, XmlNode *node, bool *bad)
{
	const char *p = xml_skip_misc(*pos, end);
	const char *qname;
	size_t		qlen;
	const char *q;
	const char *colon;
	bool		empty;
	int			depth = 0;

	*bad = false;
	if (p == NULL || (p < end && (*p != '<' || end - p < 2 || p[1] == '/' || p[1] == '!')))
	{
		*bad = true;
		return false;
	}
	if (p >= end)
		return false;
	qname = p + 1;
	for (q = qname; q < end && !xml_space(*q) && *q != '>' && *q != '/'; q++)
		;
	qlen = q - qname;
	q = qlen > 0 ? xml_tag_end(p, end, &empty) : NULL;
	if (q == NULL)
	{
		*bad = true;
		return false;
	}
	colon = memchr(qname, ':', qlen);
	node->name = colon ? colon + 1 : qname;
	node->name_len = qlen - (node->name - qname);
	node->start = p;
	node->content = q;
	node->content_len = 0;
	if (empty)
	{
		node->end = q;
		*pos = q;
		return true;
	}
	while ((q = memchr(q, '<', end - q)) != NULL)
	{
		const char *after;

		if (end - q >= 9 && memcmp(q, "<![CDATA[", 9) == 0)
		{
			after = find_bytes(q + 9, end, "]]>");
			q = after ? after + 3 : NULL;
		}
		else if (end - q >= 4 && memcmp(q, "<!--", 4) == 0)
		{
			after = find_bytes(q + 4, end, "-->");
			q = after ? after + 3 : NULL;
		}
		else if (end - q >= 2 && q[1] == '/' && xml_names(q + 2, end, qname, qlen))
		{
			after = memchr(q, '>', end - q);
			if (after == NULL)
				break;
			if (depth-- == 0)
			{
				node->content_len = q - node->content;
				node->end = after + 1;
				*pos = node->end;
				return true;
			}
			q = after + 1;
		}
		else if (xml_names(q + 1, end, qname, qlen))
		{
			after = xml_tag_end(q, end, &empty);
			if (after != NULL && !empty)
				depth++;
			q = after;
		}
		else
			q++;
		if (q == NULL)
			break;
	}
	*bad = true;
	return false;
}

/* Is a node called name? */
static bool
xml_is(const XmlNode *node, const char *name)
{
	return node->name_len == strlen(name) && memcmp(node->name, name, node->name_len) == 0;
}

/*
 * The first child element called name of a piece of a document; false if
 * there is none (or the piece is broken).
 */
static bool
xml_child(const char *content, size_t len, const char *name, XmlNode *child)
{
	const char *pos = content;
	bool		bad;

	while (xml_next_element(&pos, content + len, child, &bad))
		if (xml_is(child, name))
			return true;
	return false;
}

/* Appends c as UTF-8; false for code points XML does not allow. */
static bool
append_utf8(StringInfo buf, unsigned long c)
{
	unsigned char out[4];

	if (c == 0 || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
		return false;
	unicode_to_utf8((pg_wchar) c, out);
	appendBinaryStringInfo(buf, (char *) out, pg_utf_mblen(out));
	return true;
}

/*
 * xml_text
 *		The character data of a piece of a document: entity and character
 *		references decoded, CDATA sections as they are, comments dropped.
 *		NULL if it holds an element or a bad reference.
 */
static char *
xml_text(const char *p, size_t len)
{
	const char *end = p + len;
	StringInfoData buf;

	initStringInfo(&buf);
	while (p < end)
	{
		if (*p == '<')
		{
			const char *q;

			if (end - p >= 9 && memcmp(p, "<![CDATA[", 9) == 0 &&
				(q = find_bytes(p + 9, end, "]]>")) != NULL)
			{
				appendBinaryStringInfo(&buf, p + 9, q - (p + 9));
				p = q + 3;
			}
			else if (end - p >= 4 && memcmp(p, "<!--", 4) == 0 &&
					 (q = find_bytes(p + 4, end, "-->")) != NULL)
				p = q + 3;
			else
				return NULL;
		}
		else if (*p == '&')
		{
			const char *semi = memchr(p, ';', Min(end - p, 12));
			static const struct
			{
				const char *name;
				char		c;
			}			named[] = {{"lt", '<'}, {"gt", '>'}, {"amp", '&'}, {"quot", '"'}, {"apos", '\''}};
			size_t		n;
			int			i;

			if (semi == NULL)
				return NULL;
			n = semi - (p + 1);
			if (n >= 2 && p[1] == '#')
			{
				bool		hex = (p[2] == 'x');
				const char *d = p + (hex ? 3 : 2);
				unsigned long c = 0;

				if (d == semi)
					return NULL;
				for (; d < semi; d++)
				{
					int			v = (*d >= '0' && *d <= '9') ? *d - '0'
						: (hex && *d >= 'a' && *d <= 'f') ? *d - 'a' + 10
						: (hex && *d >= 'A' && *d <= 'F') ? *d - 'A' + 10 : -1;

					if (v < 0 || c > 0x10FFFF)
						return NULL;
					c = c * (hex ? 16 : 10) + v;
				}
				if (!append_utf8(&buf, c))
					return NULL;
			}
			else
			{
				for (i = 0; i < lengthof(named); i++)
					if (strlen(named[i].name) == n && memcmp(p + 1, named[i].name, n) == 0)
						break;
				if (i == lengthof(named))
					return NULL;
				appendStringInfoChar(&buf, named[i].c);
			}
			p = semi + 1;
		}
		else
			appendStringInfoChar(&buf, *p++);
	}
	return buf.data;
}

/* A text without the whitespace around it (in place). */
static char *
trim(char *s)
{
	char	   *e;

	while (xml_space(*s))
		s++;
	e = s + strlen(s);
	while (e > s && xml_space(e[-1]))
		*--e = '\0';
	return s;
}

/*
 * redsys_soap_return
 *		The message inside a SOAP answer of consultaOperaciones (Envelope /
 *		Body / consultaOperacionesResponse / consultaOperacionesReturn), as
 *		the text Redsys signed.  NULL + *reason when there is none (a SOAP
 *		fault says its faultstring).
 */
static char *
redsys_soap_return(const char *body, size_t len, const char **reason)
{
	const char *pos = body;
	XmlNode		envelope;
	XmlNode		soap_body;
	XmlNode		node;
	XmlNode		ret;
	bool		bad;
	char	   *text;
	const char *p;

	if (!xml_next_element(&pos, body + len, &envelope, &bad) || !xml_is(&envelope, "Envelope") ||
		!xml_child(envelope.content, envelope.content_len, "Body", &soap_body))
	{
		*reason = "the body is not a SOAP envelope with a Body";
		return NULL;
	}
	if (xml_child(soap_body.content, soap_body.content_len, "Fault", &node))
	{
		XmlNode		fs;
		char	   *fault = xml_child(node.content, node.content_len, "faultstring", &fs)
			? xml_text(fs.content, fs.content_len) : NULL;

		if (fault != NULL && pg_verifymbstr(fault, strlen(fault), true))
		{
			fault = trim(fault);
			if (strlen(fault) > 200)
				fault = pnstrdup(fault, pg_mbcliplen(fault, strlen(fault), 200));
		}
		*reason = psprintf("SOAP fault: %s", fault && pg_verifymbstr(fault, strlen(fault), true)
						   ? fault : "(no readable faultstring)");
		return NULL;
	}
	if (!xml_child(soap_body.content, soap_body.content_len, "consultaOperacionesResponse", &node) ||
		!xml_child(node.content, node.content_len, "consultaOperacionesReturn", &ret))
	{
		*reason = "no consultaOperacionesResponse/consultaOperacionesReturn in the SOAP body";
		return NULL;
	}
	/* escaped text or CDATA (what clients see), or the elements themselves */
	for (p = ret.content; p < ret.content + ret.content_len && xml_space(*p); p++)
		;
	if (p < ret.content + ret.content_len && *p == '<' &&
		!(ret.content + ret.content_len - p >= 9 && memcmp(p, "<![CDATA[", 9) == 0))
		text = pnstrdup(ret.content, ret.content_len);
	else
		text = xml_text(ret.content, ret.content_len);
	if (text == NULL)
		*reason = "consultaOperacionesReturn holds an unreadable text";
	return text;
}

/* A short field for record strings: up to max ASCII letters and digits, else NULL. */
static const char *
plain_field(const char *v, size_t max)
{
	size_t		i;

	if (v == NULL || strlen(v) > max)
		return NULL;
	for (i = 0; v[i]; i++)
		if (!((v[i] >= '0' && v[i] <= '9') || (v[i] >= 'A' && v[i] <= 'Z') || (v[i] >= 'a' && v[i] <= 'z')))
			return NULL;
	return v;
}

/* One operation of an order, as the query answers it. */
typedef struct RedsysOperation
{
	char	   *merchant;
	char	   *terminal;
	char	   *order;
	char	   *type;
	char	   *date;
	char	   *hour;
	char	   *amount;
	char	   *currency;
	char	   *state;
	char	   *response;
} RedsysOperation;

/* What a query answer says: an error code, or the signed operations. */
typedef struct RedsysQueryAnswer
{
	char	   *error_code;		/* Ds_ErrorCode, or NULL */
	List	   *operations;		/* of RedsysOperation * */
	const char *version;		/* the signed <Version> element */
	size_t		version_len;
	char	   *signature;		/* NULL if the answer has none */
} RedsysQueryAnswer;

/* The fields crmpay reads from a <Response>; the rest are skipped. */
static char **
operation_field(RedsysOperation *op, const XmlNode *node)
{
	static const char *const names[] = {"Ds_MerchantCode", "Ds_Terminal", "Ds_Order",
		"Ds_TransactionType", "Ds_Date", "Ds_Hour", "Ds_Amount", "Ds_Currency", "Ds_State",
	"Ds_Response"};
	char	  **slots[] = {&op->merchant, &op->terminal, &op->order, &op->type, &op->date,
		&op->hour, &op->amount, &op->currency, &op->state, &op->response};
	int			i;

	for (i = 0; i < lengthof(names); i++)
		if (xml_is(node, names[i]))
			return slots[i];
	return NULL;
}

/*
 * redsys_read_query_answer
 *		Reads the <Messages> document of an answer.  NULL if it is readable,
 *		else why not.  Values are trimmed; nothing is checked against the
 *		request yet.
 */
static const char *
redsys_read_query_answer(const char *text, RedsysQueryAnswer *answer)
{
	const char *pos = text;
	const char *end = text + strlen(text);
	XmlNode		messages;
	XmlNode		version;
	XmlNode		message;
	XmlNode		node;
	bool		bad;

	memset(answer, 0, sizeof(*answer));
	memset(&version, 0, sizeof(version));
	if (!xml_next_element(&pos, end, &messages, &bad) || !xml_is(&messages, "Messages"))
		return "the answer is not a <Messages> document";
	pos = messages.content;
	while (xml_next_element(&pos, messages.content + messages.content_len, &node, &bad))
	{
		if (xml_is(&node, "Version") && answer->version == NULL)
		{
			version = node;
			answer->version = node.start;
			answer->version_len = node.end - node.start;
		}
		else if (xml_is(&node, "Signature") && answer->signature == NULL)
		{
			answer->signature = xml_text(node.content, node.content_len);
			if (answer->signature == NULL)
				return "the Signature element is unreadable";
			answer->signature = trim(answer->signature);
		}
		else if (xml_is(&node, "Version") || xml_is(&node, "Signature"))
			return "the answer has more than one Version or Signature";
	}
	if (bad)
		return "the <Messages> document is malformed";
	if (answer->version == NULL ||
		!xml_child(version.content, version.content_len, "Message", &message))
		return "the answer has no Version/Message";

	if (xml_child(message.content, message.content_len, "ErrorMsg", &node))
	{
		XmlNode		code;

		answer->error_code = xml_child(node.content, node.content_len, "Ds_ErrorCode", &code)
			? xml_text(code.content, code.content_len) : NULL;
		if (answer->error_code != NULL)
			answer->error_code = trim(answer->error_code);
		if (answer->error_code == NULL || plain_field(answer->error_code, 16) == NULL ||
			answer->error_code[0] == '\0')
			return "ErrorMsg has no readable Ds_ErrorCode";
		return NULL;
	}
	pos = message.content;
	while (xml_next_element(&pos, message.content + message.content_len, &node, &bad))
	{
		RedsysOperation *op;
		const char *fpos;
		XmlNode		field;

		if (!xml_is(&node, "Response"))
			return "the Message holds something else than Response elements";
		op = palloc0(sizeof(RedsysOperation));
		fpos = node.content;
		while (xml_next_element(&fpos, node.content + node.content_len, &field, &bad))
		{
			char	  **slot = operation_field(op, &field);
			char	   *value;

			if (slot == NULL)
				continue;
			if (*slot != NULL)
				return psprintf("a Response has more than one %.*s", (int) field.name_len, field.name);
			value = xml_text(field.content, field.content_len);
			if (value == NULL)
				return psprintf("a Response has an unreadable %.*s", (int) field.name_len, field.name);
			*slot = trim(value);
		}
		if (bad)
			return "a Response element is malformed";
		answer->operations = lappend(answer->operations, op);
	}
	if (bad)
		return "the Message element is malformed";
	return NULL;
}

/* An order number crmpay can put in the query: 1 to 12 ASCII letters or digits. */
static bool
redsys_order_ok(const char *order)
{
	size_t		len = order ? strlen(order) : 0;
	size_t		i;

	if (len < 1 || len > REDSYS_ORDER_DIGITS)
		return false;
	for (i = 0; i < len; i++)
		if (!((order[i] >= '0' && order[i] <= '9') || (order[i] >= 'A' && order[i] <= 'Z') ||
			  (order[i] >= 'a' && order[i] <= 'z')))
			return false;
	return true;
}

/*
 * redsys_build_query_order
 *		The signed Monitor query of one payment's order number (gateway_ref).
 *		Nothing to ask when the payment has none, or one that is not a
 *		Redsys order number (1-12 letters and digits): such a payment is
 *		reported from what other sources say.
 */
static bool
redsys_build_query_order(const CrmpayAccount *account, const CrmpayOrderQuery *order,
						 CrmpayHttpRequest *out)
{
	const char *merchant = crmpay_setting(account, "merchant_code");
	const char *terminal = crmpay_setting(account, "terminal");
	char	   *version;
	char	   *signature;
	StringInfoData body;

	if (!redsys_order_ok(order->gateway_ref))
		return false;
	/* both checked by add_account: digits only, nothing to escape */
	if (!all_digits(merchant, 9, 9) || !all_digits(terminal, 1, 3))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no valid Redsys merchant_code and terminal", account->name)));
	version = psprintf("<Version Ds_Version=\"0.0\"><Message><Monitor>"
					   "<Ds_MerchantCode>%s</Ds_MerchantCode><Ds_Terminal>%s</Ds_Terminal>"
					   "<Ds_Order>%s</Ds_Order></Monitor></Message></Version>",
					   merchant, terminal, order->gateway_ref);
	signature = redsys_sign(crmpay_json_str(account->credentials, "merchant_key"),
							order->gateway_ref, version);
	initStringInfo(&body);
	appendStringInfo(&body,
					 "<?xml version=\"1.0\" encoding=\"UTF-8\"?>"
					 "<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\""
					 " xmlns:web=\"%s\"><soapenv:Header/><soapenv:Body><web:consultaOperaciones>"
					 "<cadenaXML><![CDATA[<Messages>%s<Signature>%s</Signature>"
					 "<SignatureVersion>%s</SignatureVersion></Messages>]]></cadenaXML>"
					 "</web:consultaOperaciones></soapenv:Body></soapenv:Envelope>",
					 REDSYS_QUERY_NS, version, signature, REDSYS_SIGNATURE_VERSION);
	out->method = "POST";
	out->url = psprintf("%s%s", account->api_base, REDSYS_QUERY_PATH);
	out->headers = list_make3("Content-Type: text/xml; charset=utf-8",
							  "Accept: text/xml",
							  "SOAPAction: consultaOperaciones");
	out->body = body.data;
	out->body_len = body.len;
	return true;
}

/* Fills *failure from a Consulta or SIS error code. */
static void
redsys_query_error(const char *code, CrmpayGatewayFailure *failure)
{
	int			i;

	failure->kind = CRMPAY_FAIL_REJECTED;
	failure->code = pstrdup(code);
	failure->message = psprintf("Redsys error %s (see the Consulta SOAP manual's error codes)", code);
	for (i = 0; i < lengthof(redsys_query_errors); i++)
		if (strcmp(redsys_query_errors[i].code, code) == 0)
		{
			failure->kind = redsys_query_errors[i].kind;
			failure->message = psprintf("Redsys error %s: %s", code, redsys_query_errors[i].text);
		}
	for (i = 0; i < lengthof(redsys_sis_errors); i++)
		if (strcmp(redsys_sis_errors[i].code, code) == 0)
		{
			failure->kind = redsys_sis_errors[i].kind == CRMPAY_FAIL_CONFLICT
				? CRMPAY_FAIL_REJECTED : redsys_sis_errors[i].kind;
			failure->message = psprintf("Redsys error %s: %s", code, redsys_sis_errors[i].text);
		}
	failure->retryable = (failure->kind == CRMPAY_FAIL_UNAVAILABLE);
}

/* Ds_Date (yyyy-mm-dd, or dd/mm/yyyy) and Ds_Hour (HH:mm[:ss]) in Spanish time; 0 if unreadable. */
static TimestampTz
redsys_query_time(const CrmpayAccount *account, const char *date, const char *hour)
{
	const char *zone = crmpay_setting(account, "report_timezone");
	pg_tz	   *tz;
	int			y,
				mo,
				d,
				h = 0,
				mi = 0,
				s = 0;
	char		tail;
	TimestampTz result;

	if (date == NULL)
		return 0;
	if (sscanf(date, "%4d-%2d-%2d%c", &y, &mo, &d, &tail) != 3 &&
		sscanf(date, "%2d/%2d/%4d%c", &d, &mo, &y, &tail) != 3)
		return 0;
	if (hour != NULL && hour[0] != '\0' &&
		sscanf(hour, "%2d:%2d:%2d%c", &h, &mi, &s, &tail) != 3 &&
		(s = 0, sscanf(hour, "%2d:%2d%c", &h, &mi, &tail) != 2))
		return 0;
	tz = pg_tzset(zone ? zone : "Europe/Madrid");
	if (tz == NULL || !crmpay_local_timestamp(y, mo, d, h, mi, s, tz, &result))
		return 0;
	return result;
}

/*
 * redsys_operation_record
 *		One operation as a gateway record (record types as the back-office
 *		export's: a charge, a refund, or "other" for what proves nothing).
 */
static CrmpayGatewayRecord *
redsys_operation_record(const CrmpayAccount *account, const RedsysOperation *op)
{
	CrmpayGatewayRecord *rec = crmpay_new_record("charge");
	const char *type = op->type ? op->type : "0";
	bool		refund = (strcmp(type, "3") == 0 || strcmp(type, "34") == 0);
	bool		preauth = (strcmp(type, "1") == 0 || strcmp(type, "7") == 0 || strcmp(type, "O") == 0);
	const char *response = all_digits(op->response, 1, 4) ? op->response : NULL;
	const char *state = plain_field(op->state, 1);
	int64		amount;
	const char *status = NULL;

	rec->match_key = pstrdup(op->order);
	rec->gateway_ref = pstrdup(op->order);
	rec->record_ref = psprintf("%s|%s|%s %s|%s", op->order, type, op->date ? op->date : "",
							   op->hour ? op->hour : "", response ? response : state ? state : "");
	rec->gateway_status = psprintf("type %s, state %s, Ds_Response %s", type,
								   state ? state : "?", response ? response : "none");
	if (op->amount && crmpay_parse_int64(op->amount, strlen(op->amount), &amount) && amount >= 0)
		rec->amount_minor = amount;
	if (op->currency)
	{
		const char *alpha = redsys_currency_alpha(op->currency);

		rec->currency = pstrdup(alpha ? alpha : op->currency);
	}
	rec->occurred_at = redsys_query_time(account, op->date, op->hour);

	if (response != NULL)
	{
		int			code = atoi(response);

		if (refund)
		{
			if (code <= 99 || code == 900)
				rec->record_type = "refund";
			else
				rec->record_type = "other"; /* a denied refund moved no money */
		}
		else if (code <= 99)
			status = preauth ? "processing" : "paid";
		else if (code == 900)
			status = "paid";	/* a confirmation accepted */
		else if (code == 400)
			status = "canceled";
		else if (code == 9998 || code == 9999)
			status = "open";	/* waiting for the card or the issuer */
		else
			status = "failed";
	}
	else if (refund)
		rec->record_type = "other";
	else if (state != NULL && strchr("SAWOL", state[0]))
		status = "open";		/* requested, authenticating, redirected */
	else if (state != NULL && strchr("PED", state[0]))
		status = "processing";	/* being authorised; transfers, direct debits */
	else if (state != NULL && state[0] == 'T')
		status = "failed";		/* no answer / technical error: nothing taken */

	rec->status = status;
	if (strcmp(rec->record_type, "refund") == 0 && rec->currency && rec->amount_minor != CRMPAY_NO_AMOUNT)
	{
		rec->fin_currency = pstrdup(rec->currency);
		rec->fin_amount_minor = -rec->amount_minor;
	}
	else if (status && strcmp(status, "paid") == 0 && rec->currency &&
			 rec->amount_minor != CRMPAY_NO_AMOUNT)
	{
		rec->fin_currency = pstrdup(rec->currency);
		rec->fin_amount_minor = rec->amount_minor;
	}
	return rec;
}

/*
 * redsys_parse_query_order
 *		Reads a Monitor answer: XML0024 (Redsys knows no operation of the
 *		order) gives no records; another error code is a failure; otherwise
 *		the answer must be signed with the merchant key for this order, be
 *		about this order, merchant and terminal, and each operation becomes
 *		a record (paid charges carry the order's refunds so far).  Never
 *		touches the database and never raises.
 */
static bool
redsys_parse_query_order(const CrmpayAccount *account, const CrmpayOrderQuery *order,
						 const CrmpayHttpResponse *response, List **records,
						 CrmpayGatewayFailure *failure)
{
	const char *reason = NULL;
	char	   *text;
	RedsysQueryAnswer answer;
	const char *merchant = crmpay_setting(account, "merchant_code");
	const char *terminal = crmpay_setting(account, "terminal");
	ListCell   *lc;
	int64		refunded = 0;

	*records = NIL;
	if (merchant == NULL || terminal == NULL)
	{
		failure->message = "the account has no merchant_code or terminal";
		return false;
	}
	text = redsys_soap_return(response->body, response->body_len, &reason);
	if (text != NULL)
		reason = redsys_read_query_answer(text, &answer);
	if (reason != NULL)
	{
		failure->message = psprintf("Redsys query answer for order %s not readable: %s",
									order->gateway_ref, reason);
		return false;
	}
	if (answer.error_code != NULL)
	{
		if (strcmp(answer.error_code, REDSYS_QUERY_UNKNOWN) == 0)
			return true;		/* no operation of this order */
		redsys_query_error(answer.error_code, failure);
		failure->message = psprintf("%s (query of order %s)", failure->message, order->gateway_ref);
		return false;
	}
	if (answer.operations == NIL && answer.signature == NULL)
		return true;			/* no operation, nothing to verify */

	/* the answer is signed over its <Version> element, with this order's key */
	{
		unsigned char key[REDSYS_KEY_LEN];
		unsigned char expected[CRMPAY_MAX_MAC];
		unsigned char given[CRMPAY_BASE64_DECODED_MAX(64)];
		long		given_len = -1;
		bool		ok;

		if (answer.signature == NULL)
			reason = "the answer has no Signature";
		else if (strlen(answer.signature) <= 64)
			given_len = crmpay_base64_decode(answer.signature, strlen(answer.signature), given,
											 sizeof(given), CRMPAY_B64_ANY);
		if (reason == NULL && given_len != REDSYS_MAC_LEN)
			reason = "its Signature is not a 32-byte base64 value";
		else if (reason == NULL && !redsys_decode_key(crmpay_json_str(account->credentials, "merchant_key"), key))
			reason = "the merchant key is not base64 of 24 bytes";
		else if (reason == NULL)
		{
			ok = redsys_mac(key, order->gateway_ref, strlen(order->gateway_ref),
							answer.version, answer.version_len, expected);
			explicit_bzero(key, sizeof(key));
			if (!ok)
				reason = "could not compute the signature (OpenSSL DES-EDE3-CBC failed)";
			else if (!crmpay_ct_equal(given, expected, REDSYS_MAC_LEN))
				reason = "its Signature does not match the merchant key, the order and its <Version> element";
		}
	}
	foreach(lc, answer.operations)
	{
		RedsysOperation *op = lfirst(lc);

		if (reason != NULL)
			break;
		if (op->order == NULL || strcmp(op->order, order->gateway_ref) != 0)
			reason = psprintf("it reports an operation of order \"%s\"",
							  op->order && pg_verifymbstr(op->order, strlen(op->order), true)
							  ? op->order : "(none)");
		else if (op->merchant != NULL && strcmp(op->merchant, merchant) != 0)
			reason = "it reports an operation of another merchant";
		else if (op->terminal != NULL && (!all_digits(op->terminal, 1, 3) ||
										  atoi(op->terminal) != atoi(terminal)))
			reason = "it reports an operation of another terminal";
		else if (op->type != NULL && plain_field(op->type, 2) == NULL)
			reason = "an operation has an unreadable Ds_TransactionType";
		else if (op->amount != NULL && !all_digits(op->amount, 1, 12))
			reason = "an operation's Ds_Amount is not a number of up to 12 digits";
		else if (op->currency != NULL && !all_digits(op->currency, 1, 4))
			reason = "an operation's Ds_Currency is not an ISO 4217 numeric code";
		else if (op->response != NULL && op->response[0] != '\0' && !all_digits(op->response, 1, 4))
			reason = "an operation's Ds_Response is not a number of up to 4 digits";
		else if ((op->date != NULL && (strlen(op->date) > 10 ||
									   strspn(op->date, "0123456789-/") != strlen(op->date))) ||
				 (op->hour != NULL && (strlen(op->hour) > 8 ||
									   strspn(op->hour, "0123456789:") != strlen(op->hour))))
			reason = "an operation's Ds_Date or Ds_Hour is unreadable";
	}
	if (reason != NULL)
	{
		failure->message = psprintf("Redsys query answer for order %s not accepted: %s",
									order->gateway_ref, reason);
		return false;
	}
	/*
	 * Monitor lists every operation of the order: its refunds are all
	 * there, so the charges say how much of them was refunded (which tells
	 * matching that a CRM refund the gateway lacks is wrong).
	 */
	foreach(lc, answer.operations)
	{
		CrmpayGatewayRecord *rec = redsys_operation_record(account, lfirst(lc));

		if (strcmp(rec->record_type, "refund") == 0 && rec->amount_minor != CRMPAY_NO_AMOUNT)
			refunded += rec->amount_minor;
		*records = lappend(*records, rec);
	}
	foreach(lc, *records)
	{
		CrmpayGatewayRecord *rec = lfirst(lc);

		if (strcmp(rec->record_type, "charge") == 0 && rec->status && strcmp(rec->status, "paid") == 0)
			rec->refunded_minor = refunded;
	}
	return true;
}

const CrmpayProvider crmpay_redsys_provider = {
	.name = "redsys",
	.default_api_base = "https://sis.redsys.es",
	.webhook_ack = "",
	.webhook_secret_credential = "merchant_key",
	.validate_account = redsys_validate_account,
	.check_amount = redsys_check_amount,
	.local_link = redsys_local_link,
	.build_create_link = redsys_build_create_link,
	.parse_create_link = redsys_parse_create_link,
	.parse_error = redsys_parse_error,
	.verify_webhook = redsys_verify_webhook,
	.parse_webhook = redsys_parse_webhook,
	.build_query_order = redsys_build_query_order,
	.parse_query_order = redsys_parse_query_order,
};

/* ----------------------------------------------------------------
 * SQL-callable functions
 * ----------------------------------------------------------------
 */

PG_FUNCTION_INFO_V1(crmpay_redsys_form);

/*
 * crmpay._redsys_form(account text, ds_order text, amount_minor bigint,
 *		currency text, order_ref text, description text)
 *	RETURNS TABLE (action text, signature_version text,
 *				   merchant_parameters text, signature text)
 *		The signed redirect form of a payment (crmpay.payment_form checks
 *		the payment first).
 */
Datum
crmpay_redsys_form(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *order = text_to_cstring(PG_GETARG_TEXT_PP(1));
	int64		amount = PG_GETARG_INT64(2);
	char	   *currency = text_to_cstring(PG_GETARG_TEXT_PP(3));
	char	   *order_ref = text_to_cstring(PG_GETARG_TEXT_PP(4));
	char	   *description = PG_ARGISNULL(5) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(5));
	CrmpayAccount *account = crmpay_load_account(name, false);
	const char *numeric;
	char	   *params;
	char	   *signature;
	TupleDesc	desc;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};

	if (strcmp(account->provider->name, "redsys") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("account \"%s\" is not a Redsys account", name)));
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "crmpay: _redsys_form must return a composite type");
	redsys_check_amount(currency, 2, amount);
	numeric = redsys_currency_numeric(currency);
	redsys_signed_params(account, order,
						 redsys_params_json(account, order, amount, numeric, order_ref,
											description, NULL, false),
						 &params, &signature);
	values[0] = CStringGetTextDatum(psprintf("%s%s", account->api_base, REDSYS_REDIRECT_PATH));
	values[1] = CStringGetTextDatum(REDSYS_SIGNATURE_VERSION);
	values[2] = CStringGetTextDatum(params);
	values[3] = CStringGetTextDatum(signature);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

PG_FUNCTION_INFO_V1(crmpay_redsys_signature);

/*
 * crmpay._redsys_signature(merchant_key text, order text,
 *		merchant_parameters text) RETURNS text
 *		HMAC_SHA256_V1 of a parameters text, standard base64.
 */
Datum
crmpay_redsys_signature(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(redsys_sign(text_to_cstring(PG_GETARG_TEXT_PP(0)),
												 text_to_cstring(PG_GETARG_TEXT_PP(1)),
												 text_to_cstring(PG_GETARG_TEXT_PP(2)))));
}

PG_FUNCTION_INFO_V1(crmpay_redsys_order_key);

/* crmpay._redsys_order_key(merchant_key text, order text) RETURNS bytea */
Datum
crmpay_redsys_order_key(PG_FUNCTION_ARGS)
{
	char	   *merchant_key = text_to_cstring(PG_GETARG_TEXT_PP(0));
	text	   *order = PG_GETARG_TEXT_PP(1);
	size_t		order_len = VARSIZE_ANY_EXHDR(order);
	unsigned char key[REDSYS_KEY_LEN];
	bytea	   *out = palloc(VARHDRSZ + order_len + 8);
	size_t		out_len;
	bool		ok;

	if (!redsys_decode_key(merchant_key, key))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Redsys merchant key is not base64 of 24 bytes")));
	ok = redsys_order_key(key, VARDATA_ANY(order), order_len, (unsigned char *) VARDATA(out), &out_len);
	explicit_bzero(key, sizeof(key));
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute a Redsys order key")));
	SET_VARSIZE(out, VARHDRSZ + out_len);
	PG_RETURN_BYTEA_P(out);
}
