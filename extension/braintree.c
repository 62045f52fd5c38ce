/*-------------------------------------------------------------------------
 *
 * braintree.c
 *	  The Braintree provider: account shapes, webhook verification and
 *	  parsing, and the answer to Braintree's URL challenge.
 *
 *	  Wire format (Braintree's server SDKs, WebhookNotificationGateway):
 *	  - A delivery is a form-encoded POST with bt_signature and bt_payload.
 *		bt_payload is base64 (MIME style, with "\n") of an XML
 *		<notification> with <timestamp>, <kind> and <subject>.
 *	  - bt_signature is "public_key|hex" pairs joined by "&"; hex is
 *		HMAC-SHA1 with key SHA1(private_key) over the payload as sent, or
 *		over the payload plus "\n" (both are accepted, as the SDKs do).
 *	  - The URL challenge (bt_challenge, ^[a-f0-9]{20,32}$) is answered with
 *		public_key|hex HMAC-SHA1(SHA1(private_key), challenge).
 *
 *	  Braintree has no hosted payment-link API: payments for a Braintree
 *	  account are made by the shop's own checkout, and crmpay follows their
 *	  transactions (by transaction id or order id) through webhooks.
 *
 *-------------------------------------------------------------------------
 */
#include "provider.h"

#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"

#include "codec.h"

/* Largest decoded payload and XML nesting we read */
#define BT_MAX_PAYLOAD		(512 * 1024)
#define BT_MAX_DEPTH		32
#define BT_MAX_NODES		4096

static bool
has_text(const CrmpayJson *object, const char *key)
{
	const char *v = crmpay_json_str(object, key);

	return v != NULL && v[0] != '\0';
}

/*
 * braintree_validate_account
 *		credentials {"merchant_id", "public_key", "private_key"}; webhook
 *		secret {"public_key", "private_key"} as JSON text.
 */
static void
braintree_validate_account(const CrmpayJson *credentials, const CrmpayJson *settings,
						   const char *webhook_secret)
{
	if (!has_text(credentials, "merchant_id") || !has_text(credentials, "public_key") ||
		!has_text(credentials, "private_key"))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("Braintree credentials need \"merchant_id\", \"public_key\" and \"private_key\""),
				 errhint("Pass credentials like {\"merchant_id\": \"...\", \"public_key\": \"...\", \"private_key\": \"...\"} from the Braintree control panel's API keys page.")));
	if (strchr(crmpay_json_str(credentials, "public_key"), '|') != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a Braintree public_key cannot contain \"|\"")));
	if (webhook_secret != NULL)
	{
		const char *error;
		CrmpayJson *secret = crmpay_json_parse(webhook_secret, strlen(webhook_secret), &error);

		if (secret == NULL || secret->kind != CRMPAY_JSON_OBJECT ||
			!has_text(secret, "public_key") || !has_text(secret, "private_key"))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("a Braintree webhook secret is a JSON object with \"public_key\" and \"private_key\""),
					 errdetail("Braintree signs webhooks with the API key pair."),
					 errhint("Pass webhook_secret like '{\"public_key\": \"...\", \"private_key\": \"...\"}'.")));
	}
}

/* A form field of the body, unescaped; NULL if absent or malformed. */
static char *
form_field(const char *body, size_t body_len, const char *name)
{
	size_t		pos = 0;
	CrmpayKVItem item;
	size_t		name_len = strlen(name);

	while (crmpay_kv_next(body, body_len, '&', &pos, &item))
	{
		if (item.name_len == name_len && memcmp(item.name, name, name_len) == 0 && item.has_value)
		{
			char	   *out = palloc(item.value_len + 1);
			long		n = crmpay_form_unescape(item.value, item.value_len, out);

			if (n < 0)
				return NULL;
			out[n] = '\0';
			if ((size_t) n != strlen(out))
				return NULL;	/* embedded NUL */
			return out;
		}
	}
	return NULL;
}

/* hex HMAC-SHA1 with the given key; out holds 41 bytes. */
static void
bt_hmac_hex_key(const unsigned char *key, unsigned int keylen, const char *msg, size_t msglen,
				char *out)
{
	unsigned char mac[CRMPAY_MAX_MAC];
	unsigned int maclen;

	crmpay_hmac("SHA1", key, keylen, msg, msglen, mac, &maclen);
	crmpay_hex_encode(mac, maclen, out);
	out[2 * maclen] = '\0';
}

/* hex HMAC-SHA1 with key SHA1(private_key); out holds 41 bytes. */
static void
bt_hmac_hex(const char *private_key, const char *msg, size_t msglen, char *out)
{
	unsigned char key[CRMPAY_MAX_MAC];
	unsigned int keylen;

	crmpay_digest("SHA1", private_key, strlen(private_key), key, &keylen);
	bt_hmac_hex_key(key, keylen, msg, msglen, out);
}

/*
 * verify_pair_list
 *		Checks a bt_signature value ("pub|hex&pub|hex...") for payload.
 */
static const char *
verify_pair_list(const char *signature, const char *payload, const char *public_key,
				 const char *private_key)
{
	size_t		publen = strlen(public_key);
	size_t		paylen = strlen(payload);
	const char *p = signature;
	const char *hex = NULL;
	char		expected[41];
	char		expected_nl[41];
	char	   *with_nl;
	unsigned char key[CRMPAY_MAX_MAC];
	unsigned int keylen;

	while (*p != '\0')
	{
		const char *end = strchr(p, '&');
		size_t		len = end ? (size_t) (end - p) : strlen(p);
		const char *bar = memchr(p, '|', len);

		if (bar != NULL && (size_t) (bar - p) == publen && memcmp(p, public_key, publen) == 0)
		{
			hex = pnstrdup(bar + 1, len - (bar + 1 - p));
			break;
		}
		p += len + (end ? 1 : 0);
	}
	if (hex == NULL)
		return "no matching public key";
	if (strlen(hex) != 40)
		return "signature does not match";

	crmpay_digest("SHA1", private_key, strlen(private_key), key, &keylen);
	bt_hmac_hex_key(key, keylen, payload, paylen, expected);
	if (crmpay_ct_equal_nocase_hex(hex, expected, 40))
		return NULL;
	/* the SDKs also accept the signature of the payload plus "\n" */
	with_nl = palloc(paylen + 2);
	memcpy(with_nl, payload, paylen);
	with_nl[paylen] = '\n';
	with_nl[paylen + 1] = '\0';
	bt_hmac_hex_key(key, keylen, with_nl, paylen + 1, expected_nl);
	if (crmpay_ct_equal_nocase_hex(hex, expected_nl, 40))
		return NULL;
	return "signature does not match";
}

/*
 * braintree_verify_webhook
 *		secret {"public_key", "private_key"}; body the form-encoded
 *		bt_signature / bt_payload pair.  There is no timestamp in the
 *		signature, so tolerance does not apply.
 */
static CrmpayVerifyResult
braintree_verify_webhook(const char *secret, const CrmpayHeaders *headers, const char *body,
						 size_t body_len, int64 tolerance_s, TimestampTz at)
{
	CrmpayVerifyResult result = {false, NULL};
	const char *error;
	CrmpayJson *keys = crmpay_json_parse(secret, strlen(secret), &error);
	const char *public_key = keys ? crmpay_json_str(keys, "public_key") : NULL;
	const char *private_key = keys ? crmpay_json_str(keys, "private_key") : NULL;
	char	   *signature;
	char	   *payload;
	const char *p;

	if (public_key == NULL || private_key == NULL)
	{
		result.reason = "webhook secret is not a Braintree key pair ({\"public_key\", \"private_key\"})";
		return result;
	}
	signature = form_field(body, body_len, "bt_signature");
	payload = form_field(body, body_len, "bt_payload");
	if (signature == NULL || payload == NULL || signature[0] == '\0' || payload[0] == '\0')
	{
		result.reason = "missing bt_signature or bt_payload";
		return result;
	}
	for (p = payload; *p != '\0'; p++)
		if (!(isalnum((unsigned char) *p) || *p == '+' || *p == '=' || *p == '/' || *p == '\n'))
		{
			result.reason = "payload contains non-base64 characters";
			return result;
		}
	result.reason = verify_pair_list(signature, payload, public_key, private_key);
	result.valid = (result.reason == NULL);
	return result;
}

/* ----------------------------------------------------------------
 * A small XML reader for notification payloads: elements, attributes
 * (skipped), text and the five predefined entities plus character
 * references.  No DTDs, comments, CDATA or external entities.
 * ----------------------------------------------------------------
 */
typedef struct XmlNode
{
	char	   *name;
	StringInfoData text;
	List	   *children;
	struct XmlNode *parent;
} XmlNode;

/* Appends the UTF-8 form of a code point; false if it is not a valid XML char. */
static bool
append_codepoint(StringInfo buf, unsigned long cp)
{
	unsigned char out[4];
	int			n;

	if (cp == 0 || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
		return false;
	if (cp < 0x80)
	{
		out[0] = (unsigned char) cp;
		n = 1;
	}
	else if (cp < 0x800)
	{
		out[0] = 0xC0 | (cp >> 6);
		out[1] = 0x80 | (cp & 0x3F);
		n = 2;
	}
	else if (cp < 0x10000)
	{
		out[0] = 0xE0 | (cp >> 12);
		out[1] = 0x80 | ((cp >> 6) & 0x3F);
		out[2] = 0x80 | (cp & 0x3F);
		n = 3;
	}
	else
	{
		out[0] = 0xF0 | (cp >> 18);
		out[1] = 0x80 | ((cp >> 12) & 0x3F);
		out[2] = 0x80 | ((cp >> 6) & 0x3F);
		out[3] = 0x80 | (cp & 0x3F);
		n = 4;
	}
	appendBinaryStringInfo(buf, (char *) out, n);
	return true;
}

/* Decodes an entity at s (after '&'); returns its length incl. ';' or -1. */
static int
xml_entity(const char *s, const char *end, StringInfo out)
{
	const char *semi = memchr(s, ';', Min(end - s, 12));
	size_t		len;

	if (semi == NULL)
		return -1;
	len = semi - s;
	if (len == 3 && memcmp(s, "amp", 3) == 0)
		appendStringInfoChar(out, '&');
	else if (len == 2 && memcmp(s, "lt", 2) == 0)
		appendStringInfoChar(out, '<');
	else if (len == 2 && memcmp(s, "gt", 2) == 0)
		appendStringInfoChar(out, '>');
	else if (len == 4 && memcmp(s, "quot", 4) == 0)
		appendStringInfoChar(out, '"');
	else if (len == 4 && memcmp(s, "apos", 4) == 0)
		appendStringInfoChar(out, '\'');
	else if (len >= 2 && s[0] == '#')
	{
		unsigned long cp = 0;
		bool		hex = (s[1] == 'x');
		size_t		i;

		if (hex && len < 3)
			return -1;
		for (i = hex ? 2 : 1; i < len; i++)
		{
			int			c = (unsigned char) s[i];
			int			v;

			if (c >= '0' && c <= '9')
				v = c - '0';
			else if (hex && c >= 'a' && c <= 'f')
				v = c - 'a' + 10;
			else if (hex && c >= 'A' && c <= 'F')
				v = c - 'A' + 10;
			else
				return -1;
			cp = cp * (hex ? 16 : 10) + v;
			if (cp > 0x10FFFF)
				return -1;
		}
		if (!append_codepoint(out, cp))
			return -1;
	}
	else
		return -1;
	return (int) len + 1;
}

static bool
xml_name_char(char c)
{
	return isalnum((unsigned char) c) || c == '-' || c == '_' || c == '.' || c == ':';
}

/*
 * xml_parse
 *		Parses doc into a tree; NULL with *error when it is not the small,
 *		well-formed XML Braintree sends.
 */
static XmlNode *
xml_parse(const char *doc, size_t len, const char **error)
{
	const char *p = doc;
	const char *end = doc + len;
	XmlNode    *root = NULL;
	XmlNode    *current = NULL;
	int			depth = 0;
	int			nodes = 0;

	*error = NULL;
	while (p < end)
	{
		if (*p == '<')
		{
			if (p + 1 < end && p[1] == '?')
			{
				/* XML declaration / processing instruction, before the root only */
				const char *close = p + 2;

				if (root != NULL)
				{
					*error = "processing instruction after the root element";
					return NULL;
				}
				while (close + 1 < end && !(close[0] == '?' && close[1] == '>'))
					close++;
				if (close + 1 >= end)
				{
					*error = "unterminated processing instruction";
					return NULL;
				}
				p = close + 2;
			}
			else if (p + 1 < end && p[1] == '!')
			{
				*error = "DTDs, comments and CDATA are not accepted";
				return NULL;
			}
			else if (p + 1 < end && p[1] == '/')
			{
				const char *name = p + 2;
				const char *q = name;

				while (q < end && xml_name_char(*q))
					q++;
				if (current == NULL || (size_t) (q - name) != strlen(current->name) ||
					memcmp(name, current->name, q - name) != 0)
				{
					*error = "mismatched closing tag";
					return NULL;
				}
				while (q < end && isspace((unsigned char) *q))
					q++;
				if (q >= end || *q != '>')
				{
					*error = "malformed closing tag";
					return NULL;
				}
				p = q + 1;
				current = current->parent;
				depth--;
			}
			else
			{
				const char *name = p + 1;
				const char *q = name;
				XmlNode    *node;
				bool		empty = false;

				while (q < end && xml_name_char(*q))
					q++;
				if (q == name)
				{
					*error = "malformed tag";
					return NULL;
				}
				if ((root != NULL && current == NULL) || ++nodes > BT_MAX_NODES ||
					++depth > BT_MAX_DEPTH)
				{
					*error = root != NULL && current == NULL ? "content after the root element"
						: "XML too large or nested too deeply";
					return NULL;
				}
				node = palloc0(sizeof(XmlNode));
				node->name = pnstrdup(name, q - name);
				initStringInfo(&node->text);
				node->parent = current;
				/* attributes: name="value" or name='value', skipped */
				for (;;)
				{
					while (q < end && isspace((unsigned char) *q))
						q++;
					if (q >= end)
					{
						*error = "unterminated tag";
						return NULL;
					}
					if (*q == '>')
					{
						q++;
						break;
					}
					if (*q == '/' && q + 1 < end && q[1] == '>')
					{
						q += 2;
						empty = true;
						break;
					}
					if (!xml_name_char(*q))
					{
						*error = "malformed attribute";
						return NULL;
					}
					while (q < end && xml_name_char(*q))
						q++;
					if (q + 1 >= end || *q != '=' || (q[1] != '"' && q[1] != '\''))
					{
						*error = "malformed attribute";
						return NULL;
					}
					{
						char		quote = q[1];
						const char *close = memchr(q + 2, quote, end - (q + 2));

						if (close == NULL || memchr(q + 2, '<', close - (q + 2)) != NULL)
						{
							*error = "malformed attribute";
							return NULL;
						}
						q = close + 1;
					}
				}
				if (current != NULL)
					current->children = lappend(current->children, node);
				else
					root = node;
				if (empty)
					depth--;
				else
					current = node;
				p = q;
			}
		}
		else
		{
			/* text */
			if (current == NULL)
			{
				if (!isspace((unsigned char) *p))
				{
					*error = "text outside the root element";
					return NULL;
				}
				p++;
				continue;
			}
			if (*p == '&')
			{
				int			n = xml_entity(p + 1, end, &current->text);

				if (n < 0)
				{
					*error = "unknown or malformed entity";
					return NULL;
				}
				p += n + 1;
			}
			else if (*p == '>')
			{
				*error = "stray '>' in text";
				return NULL;
			}
			else
				appendStringInfoChar(&current->text, *p++);
		}
	}
	if (root == NULL || current != NULL)
	{
		*error = root == NULL ? "no root element" : "unterminated element";
		return NULL;
	}
	return root;
}

/* The first child of node named name, or NULL. */
static XmlNode *
xml_child(const XmlNode *node, const char *name)
{
	ListCell   *lc;

	if (node == NULL)
		return NULL;
	foreach(lc, node->children)
	{
		XmlNode    *child = lfirst(lc);

		if (strcmp(child->name, name) == 0)
			return child;
	}
	return NULL;
}

/* Text at a "/"-separated path of child names, trimmed; NULL if absent. */
static char *
xml_text(const XmlNode *node, const char *path)
{
	char	   *copy = pstrdup(path);
	char	   *save = NULL;
	char	   *step;
	const XmlNode *at = node;
	char	   *text;
	int			len;

	for (step = strtok_r(copy, "/", &save); step != NULL && at != NULL;
		 step = strtok_r(NULL, "/", &save))
		at = xml_child(at, step);
	if (at == NULL || at->children != NIL)
		return NULL;
	text = at->text.data;
	while (isspace((unsigned char) *text))
		text++;
	len = strlen(text);
	while (len > 0 && isspace((unsigned char) text[len - 1]))
		len--;
	return pnstrdup(text, len);
}

/* Fills amount/currency of a transaction node; false if unreadable. */
static bool
bt_amount(CrmpayWebhookEvent *event, const XmlNode *transaction)
{
	char	   *amount = xml_text(transaction, "amount");
	char	   *currency = xml_text(transaction, "currency-iso-code");

	if (amount == NULL)
		return true;
	if (currency != NULL && strlen(currency) != 3)
		return false;
	if (!crmpay_decimal_to_minor(amount, crmpay_iso_exponent(currency), &event->amount_minor))
		return false;
	event->currency = currency;
	return true;
}

/*
 * braintree_parse_webhook
 *		transaction_settled -> paid, transaction_settlement_declined ->
 *		failed, subscription_charged_successfully -> paid and
 *		_unsuccessfully -> failed (for the subscription's latest
 *		transaction), dispute_opened -> disputed; check and the other kinds
 *		are recorded and ignored.  Braintree notifications carry no id: the
 *		dedupe key is kind:subject-id[:transaction-id], or kind:timestamp for
 *		kinds without a subject id.
 */
static List *
braintree_parse_webhook(const CrmpayHeaders *headers, const char *body, size_t body_len,
						const char **reason)
{
	char	   *payload = form_field(body, body_len, "bt_payload");
	unsigned char *xml;
	long		xml_len;
	const char *error;
	XmlNode    *root;
	XmlNode    *subject;
	char	   *kind;
	char	   *timestamp;
	CrmpayWebhookEvent *event;

	if (payload == NULL)
	{
		*reason = "missing bt_payload";
		return NIL;
	}
	if (strlen(payload) > BT_MAX_PAYLOAD * 4 / 3 + 1024)
	{
		*reason = "bt_payload too large";
		return NIL;
	}
	xml = palloc(CRMPAY_BASE64_DECODED_MAX(strlen(payload)) + 1);
	xml_len = crmpay_base64_decode(payload, strlen(payload), xml,
								   CRMPAY_BASE64_DECODED_MAX(strlen(payload)),
								   CRMPAY_B64_STD | CRMPAY_B64_SKIP_NEWLINES);
	if (xml_len <= 0)
	{
		*reason = "bt_payload is not valid base64";
		return NIL;
	}
	xml[xml_len] = '\0';
	if (memchr(xml, '\0', xml_len) != NULL ||
		!pg_verify_mbstr(PG_UTF8, (char *) xml, (int) xml_len, true))
	{
		*reason = "notification is not valid UTF-8";
		return NIL;
	}
	root = xml_parse((char *) xml, xml_len, &error);
	if (root == NULL)
	{
		*reason = psprintf("malformed notification XML: %s", error);
		return NIL;
	}
	kind = xml_text(root, "kind");
	timestamp = xml_text(root, "timestamp");
	subject = xml_child(root, "subject");
	if (strcmp(root->name, "notification") != 0 || kind == NULL || kind[0] == '\0' ||
		subject == NULL)
	{
		*reason = "not a Braintree notification (kind and subject required)";
		return NIL;
	}

	event = crmpay_new_event();
	event->event_type = kind;

	if (strncmp(kind, "transaction_", 12) == 0)
	{
		XmlNode    *txn = xml_child(subject, "transaction");
		char	   *id = xml_text(txn, "id");

		if (id == NULL || id[0] == '\0')
		{
			*reason = "transaction notification without a transaction id";
			return NIL;
		}
		event->event_key = psprintf("%s:%s", kind, id);
		event->gateway_payment_ref = id;
		event->order_ref = xml_text(txn, "order-id");
		if (strcmp(kind, "transaction_settled") == 0)
		{
			event->new_status = "paid";
			if (!bt_amount(event, txn))
			{
				*reason = "transaction amount is not a decimal";
				return NIL;
			}
		}
		else if (strcmp(kind, "transaction_settlement_declined") == 0)
			event->new_status = "failed";
	}
	else if (strncmp(kind, "subscription_", 13) == 0)
	{
		XmlNode    *sub = xml_child(subject, "subscription");
		char	   *id = xml_text(sub, "id");
		XmlNode    *txn = xml_child(xml_child(sub, "transactions"), "transaction");
		char	   *txn_id = xml_text(txn, "id");

		if (id == NULL || id[0] == '\0')
		{
			*reason = "subscription notification without a subscription id";
			return NIL;
		}
		event->event_key = txn_id ? psprintf("%s:%s:%s", kind, id, txn_id)
			: psprintf("%s:%s:%s", kind, id, timestamp ? timestamp : "");
		event->gateway_ref = id;
		event->gateway_payment_ref = txn_id;
		if (txn_id != NULL && strcmp(kind, "subscription_charged_successfully") == 0)
		{
			event->new_status = "paid";
			if (!bt_amount(event, txn))
			{
				*reason = "transaction amount is not a decimal";
				return NIL;
			}
		}
		else if (txn_id != NULL && strcmp(kind, "subscription_charged_unsuccessfully") == 0)
			event->new_status = "failed";
	}
	else if (strncmp(kind, "dispute_", 8) == 0)
	{
		XmlNode    *dispute = xml_child(subject, "dispute");
		char	   *id = xml_text(dispute, "id");

		if (id == NULL || id[0] == '\0')
		{
			*reason = "dispute notification without a dispute id";
			return NIL;
		}
		event->event_key = psprintf("%s:%s", kind, id);
		event->gateway_payment_ref = xml_text(dispute, "transaction/id");
		if (strcmp(kind, "dispute_opened") == 0 && event->gateway_payment_ref != NULL)
			event->new_status = "disputed";
	}
	else
		event->event_key = psprintf("%s:%s", kind, timestamp ? timestamp : "");
	return list_make1(event);
}

const CrmpayProvider crmpay_braintree_provider = {
	.name = "braintree",
	.default_api_base = "https://api.braintreegateway.com",
	.webhook_ack = "",
	.validate_account = braintree_validate_account,
	.verify_webhook = braintree_verify_webhook,
	.parse_webhook = braintree_parse_webhook,
};

PG_FUNCTION_INFO_V1(crmpay_braintree_challenge);

/*
 * crmpay.braintree_challenge(account text, challenge text) RETURNS text
 *		The answer to Braintree's webhook URL check:
 *		public_key|hex(HMAC-SHA1(SHA1(private_key), challenge)).
 */
Datum
crmpay_braintree_challenge(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *challenge = text_to_cstring(PG_GETARG_TEXT_PP(1));
	CrmpayAccount *account = crmpay_load_account(name, false);
	const char *public_key;
	const char *private_key;
	size_t		len = strlen(challenge);
	size_t		i;
	char		hex[41];

	if (account->provider != &crmpay_braintree_provider)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" is not a Braintree account", name)));
	for (i = 0; i < len; i++)
		if (!((challenge[i] >= '0' && challenge[i] <= '9') ||
			  (challenge[i] >= 'a' && challenge[i] <= 'f')))
			break;
	if (len < 20 || len > 32 || i != len)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid Braintree challenge"),
				 errdetail("A challenge is 20 to 32 lower-case hexadecimal digits."),
				 errhint("Pass the bt_challenge query parameter exactly as Braintree sent it.")));
	public_key = crmpay_json_str(account->credentials, "public_key");
	private_key = crmpay_json_str(account->credentials, "private_key");
	if (public_key == NULL || private_key == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("account \"%s\" has no Braintree key pair", name)));
	bt_hmac_hex(private_key, challenge, len, hex);
	PG_RETURN_TEXT_P(cstring_to_text(psprintf("%s|%s", public_key, hex)));
}
