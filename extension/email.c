/*-------------------------------------------------------------------------
 *
 * email.c
 *	  E-mailing payment links: filling in the account's templates, checking
 *	  what goes into message headers, and building the MIME message that
 *	  the worker hands to SMTP (through libcurl, in http.c).
 *
 *	  Safety rules kept here:
 *	  - Template values are inserted once and never read again as template
 *		text (a customer's name cannot contain a placeholder that expands).
 *		In HTML templates they are HTML-escaped.
 *	  - Nothing a customer or the CRM controls can add a header: addresses
 *		are checked (no spaces, quotes, angle brackets, commas or control
 *		characters), line breaks in the subject and sender name become
 *		spaces, and non-ASCII header text is sent as RFC 2047 encoded words.
 *	  - Bodies are sent base64-encoded (UTF-8), so no line is too long and
 *		no line of the customer's data can end the SMTP DATA phase.
 *
 *-------------------------------------------------------------------------
 */
#include "crmpay.h"

#include <ctype.h>

#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "codec.h"
#include "email.h"

/* Appends s HTML-escaped. */
static void
append_html_escaped(StringInfo buf, const char *s)
{
	for (; *s; s++)
	{
		switch (*s)
		{
			case '&':
				appendStringInfoString(buf, "&amp;");
				break;
			case '<':
				appendStringInfoString(buf, "&lt;");
				break;
			case '>':
				appendStringInfoString(buf, "&gt;");
				break;
			case '"':
				appendStringInfoString(buf, "&quot;");
				break;
			case '\'':
				appendStringInfoString(buf, "&#39;");
				break;
			default:
				appendStringInfoChar(buf, *s);
		}
	}
}

/*
 * The value of a placeholder: fields[name] for a plain name, and for
 * "group.key" the key of an object field (empty when the key is missing,
 * since metadata and order rows vary).  NULL (with *error set) for an
 * unknown name or a value that is not a scalar.
 */
static const char *
placeholder_value(const CrmpayJson *fields, const char *name, const char **error)
{
	const char *dot = strchr(name, '.');
	const CrmpayJson *node;

	if (dot == NULL)
		node = crmpay_json_member(fields, name);
	else
	{
		char	   *group = pnstrdup(name, dot - name);
		const CrmpayJson *parent = crmpay_json_member(fields, group);

		if (parent == NULL || parent->kind == CRMPAY_JSON_NULL)
		{
			*error = psprintf("unknown placeholder {{%s}}", name);
			return NULL;
		}
		if (parent->kind != CRMPAY_JSON_OBJECT)
		{
			*error = psprintf("placeholder {{%s}}: %s is not a group of fields", name, group);
			return NULL;
		}
		node = crmpay_json_member(parent, dot + 1);
		if (node == NULL)
			return "";
	}
	if (node == NULL)
	{
		*error = psprintf("unknown placeholder {{%s}}", name);
		return NULL;
	}
	switch (node->kind)
	{
		case CRMPAY_JSON_NULL:
			return "";
		case CRMPAY_JSON_OBJECT:
		case CRMPAY_JSON_ARRAY:
			*error = psprintf("placeholder {{%s}} is not a single value", name);
			return NULL;
		default:
			return node->text;
	}
}

/*
 * crmpay_email_render
 *		Fills {{name}} / {{group.key}} placeholders (spaces inside the braces
 *		are ignored).  Returns the text, or NULL with *error set.
 */
char *
crmpay_email_render(const char *template, const CrmpayJson *fields, bool html,
					const char **error)
{
	StringInfoData out;
	const char *p = template;

	initStringInfo(&out);
	while (*p)
	{
		const char *open = strstr(p, "{{");
		const char *close;
		const char *value;
		char	   *name;
		size_t		len;

		if (open == NULL)
		{
			appendStringInfoString(&out, p);
			break;
		}
		appendBinaryStringInfo(&out, p, open - p);
		close = strstr(open + 2, "}}");
		if (close == NULL)
		{
			*error = "unterminated placeholder: \"{{\" without \"}}\"";
			return NULL;
		}
		open += 2;
		while (open < close && *open == ' ')
			open++;
		len = close - open;
		while (len > 0 && open[len - 1] == ' ')
			len--;
		name = pnstrdup(open, len);
		if (len == 0 || strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") != len)
		{
			*error = psprintf("invalid placeholder {{%s}}", name);
			return NULL;
		}
		value = placeholder_value(fields, name, error);
		if (value == NULL)
			return NULL;
		if (html)
			append_html_escaped(&out, value);
		else
			appendStringInfoString(&out, value);
		p = close + 2;
	}
	return out.data;
}

PG_FUNCTION_INFO_V1(crmpay_render_template);

/*
 * crmpay._render_template(template text, fields jsonb, html boolean)
 *		RETURNS text; NULL for a NULL template.
 */
Datum
crmpay_render_template(PG_FUNCTION_ARGS)
{
	const char *error = NULL;
	CrmpayJson *fields;
	char	   *rendered;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("template fields must not be null")));
	fields = crmpay_json_from_jsonb_datum(PG_GETARG_DATUM(1));
	if (fields->kind != CRMPAY_JSON_OBJECT)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("template fields must be a JSON object")));
	rendered = crmpay_email_render(text_to_cstring(PG_GETARG_TEXT_PP(0)), fields,
							   !PG_ARGISNULL(2) && PG_GETARG_BOOL(2), &error);
	if (rendered == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("could not fill in the e-mail template: %s", error),
				 errhint("Placeholders are {{order_ref}}, {{amount}}, {{currency}}, {{url}}, {{description}}, {{email}}, {{account}}, {{expires_at}}, {{metadata.KEY}} and {{order.COLUMN}}.")));
	PG_RETURN_TEXT_P(cstring_to_text(rendered));
}

/*
 * crmpay_email_address_ok
 *		A bare address local@domain that is safe in an SMTP envelope and a
 *		header: printable ASCII without spaces, quotes, angle brackets,
 *		parentheses, commas, semicolons or backslashes; one '@'; a dot in
 *		the domain; at most 254 characters.
 */
bool
crmpay_email_address_ok(const char *address)
{
	const char *at;
	const char *p;

	if (address == NULL || address[0] == '\0' || strlen(address) > 254)
		return false;
	for (p = address; *p; p++)
		if (*p <= ' ' || *p >= 0x7f || strchr("<>()[],;:\\\"", *p) != NULL)
			return false;
	at = strchr(address, '@');
	return at != NULL && at != address && strchr(at + 1, '@') == NULL &&
		strchr(at + 1, '.') != NULL && at[1] != '.' && address[strlen(address) - 1] != '.';
}

PG_FUNCTION_INFO_V1(crmpay_check_email_payload);

/*
 * crmpay._check_email_payload(payload jsonb) RETURNS void
 *		Refuses a send_email payload whose addresses could inject headers
 *		or that has no body.
 */
Datum
crmpay_check_email_payload(PG_FUNCTION_ARGS)
{
	CrmpayJson *payload = crmpay_json_from_jsonb_datum(PG_GETARG_DATUM(0));
	const char *to = crmpay_json_str(payload, "to");
	const char *from = crmpay_json_str(payload, "from");

	if (!crmpay_email_address_ok(to))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"%s\" is not an e-mail address crmpay sends to", to ? to : "(none)"),
				 errdetail("A recipient is one plain address like ana@example.com.")));
	if (!crmpay_email_address_ok(from))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("settings.email_from \"%s\" is not a plain e-mail address", from ? from : "(none)"),
				 errhint("Use an address like shop@example.com; put a display name in settings.email_from_name.")));
	if (crmpay_json_str(payload, "text") == NULL && crmpay_json_str(payload, "html") == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the e-mail has neither a text nor an HTML body")));
	PG_RETURN_VOID();
}

/* Copies s with CR, LF and tabs turned into spaces (header text). */
static char *
one_line(const char *s)
{
	char	   *copy = pstrdup(s);
	char	   *p;

	for (p = copy; *p; p++)
		if (*p == '\r' || *p == '\n' || *p == '\t')
			*p = ' ';
	return copy;
}

/* Appends text as RFC 2047 base64 encoded words of whole UTF-8 characters, folded. */
static void
append_encoded_words(StringInfo buf, const char *header)
{
	const unsigned char *s = (const unsigned char *) header;
	size_t		len = strlen(header);
	size_t		i = 0;

	while (i < len)
	{
		size_t		chunk = 0;
		char		encoded[CRMPAY_BASE64_ENCODED_LEN(45) + 1];
		size_t		n;

		/* at most 45 bytes per word, never splitting a UTF-8 character */
		while (i + chunk < len)
		{
			int			clen = pg_utf_mblen(s + i + chunk);

			if (chunk + clen > 45)
				break;
			chunk += clen;
		}
		if (chunk == 0)
			chunk = Min(len - i, 4);
		n = crmpay_base64_encode(s + i, chunk, encoded, false);
		encoded[n] = '\0';
		if (i > 0)
			appendStringInfoString(buf, "\r\n ");
		appendStringInfo(buf, "=?UTF-8?B?%s?=", encoded);
		i += chunk;
	}
}

/*
 * Appends unstructured header text (the subject): as is when it is short
 * printable ASCII, else as encoded words.
 */
static void
append_header_text(StringInfo buf, const char *header)
{
	const unsigned char *s = (const unsigned char *) header;
	size_t		len = strlen(header);
	size_t		i;
	bool		plain = len <= 70;

	for (i = 0; plain && i < len; i++)
		if (s[i] < 0x20 || s[i] >= 0x7f || (s[i] == '=' && i + 1 < len && s[i + 1] == '?'))
			plain = false;
	if (plain)
		appendStringInfoString(buf, header);
	else
		append_encoded_words(buf, header);
}

/*
 * Appends a sender's display name: as is when it is plain words (letters,
 * digits, spaces and RFC 5322 "atext" punctuation), else as encoded words,
 * so that commas, quotes or angle brackets in it cannot change the
 * address the header names.
 */
static void
append_display_name(StringInfo buf, const char *name)
{
	const char *p;

	for (p = name; *p; p++)
		if (!(isalnum((unsigned char) *p) || strchr(" !#$%&'*+-/=?^_`{|}~", *p) != NULL) ||
			(unsigned char) *p >= 0x80)
			break;
	if (*p == '\0' && strlen(name) <= 70 && strstr(name, "=?") == NULL)
		appendStringInfoString(buf, name);
	else
		append_encoded_words(buf, name);
}

/* Appends a body part: base64 of the UTF-8 text in 76-character lines. */
static void
append_base64_body(StringInfo buf, const char *body)
{
	const unsigned char *s = (const unsigned char *) body;
	size_t		len = strlen(body);
	size_t		i;

	for (i = 0; i < len; i += 57)
	{
		char		line[CRMPAY_BASE64_ENCODED_LEN(57) + 1];
		size_t		n = crmpay_base64_encode(s + i, Min(len - i, 57), line, false);

		appendBinaryStringInfo(buf, line, (int) n);
		appendStringInfoString(buf, "\r\n");
	}
}

static void
append_part(StringInfo buf, const char *boundary, const char *subtype, const char *body)
{
	if (boundary != NULL)
		appendStringInfo(buf, "--%s\r\n", boundary);
	appendStringInfo(buf, "Content-Type: text/%s; charset=UTF-8\r\n"
					 "Content-Transfer-Encoding: base64\r\n\r\n", subtype);
	append_base64_body(buf, body);
}

/*
 * crmpay_email_build
 *		The RFC 5322 message of a send_email job's payload (to, from,
 *		from_name, subject, text, html): multipart/alternative when it has
 *		both bodies.  The Message-ID is derived from the job id, so a
 *		message sent twice (after a crash) can be recognised as the same.
 *		Raises for an unusable payload (the job is then dead).
 */
char *
crmpay_email_build(const CrmpayJson *payload, int64 job_id, size_t *len)
{
	const char *to = crmpay_json_str(payload, "to");
	const char *from = crmpay_json_str(payload, "from");
	const char *from_name = crmpay_json_str(payload, "from_name");
	const char *subject = crmpay_json_str(payload, "subject");
	const char *plain = crmpay_json_str(payload, "text");
	const char *html = crmpay_json_str(payload, "html");
	StringInfoData buf;
	char		date[64];
	pg_time_t	now = timestamptz_to_time_t(GetCurrentTimestamp());
	const char *boundary = NULL;

	if (!crmpay_email_address_ok(to) || !crmpay_email_address_ok(from) ||
		(plain == NULL && html == NULL))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("send_email job " INT64_FORMAT " has an unusable message", job_id),
				 errdetail("It needs a plain recipient and sender address and a text or HTML body.")));

	pg_strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S +0000", pg_gmtime(&now));
	initStringInfo(&buf);
	appendStringInfo(&buf, "Date: %s\r\n", date);
	appendStringInfoString(&buf, "From: ");
	if (from_name != NULL && from_name[0] != '\0')
	{
		append_display_name(&buf, one_line(from_name));
		appendStringInfoChar(&buf, ' ');
	}
	appendStringInfo(&buf, "<%s>\r\n", from);
	appendStringInfo(&buf, "To: <%s>\r\n", to);
	appendStringInfoString(&buf, "Subject: ");
	append_header_text(&buf, one_line(subject ? subject : ""));
	appendStringInfoString(&buf, "\r\n");
	appendStringInfo(&buf, "Message-ID: <crmpay-job-" INT64_FORMAT "@%s>\r\n", job_id,
					 strchr(from, '@') + 1);
	appendStringInfoString(&buf, "MIME-Version: 1.0\r\n");
	if (plain != NULL && html != NULL)
	{
		boundary = psprintf("crmpay-part-" INT64_FORMAT, job_id);
		appendStringInfo(&buf, "Content-Type: multipart/alternative; boundary=\"%s\"\r\n\r\n",
						 boundary);
		append_part(&buf, boundary, "plain", plain);
		append_part(&buf, boundary, "html", html);
		appendStringInfo(&buf, "--%s--\r\n", boundary);
	}
	else
		append_part(&buf, NULL, plain ? "plain" : "html", plain ? plain : html);
	*len = buf.len;
	return buf.data;
}
