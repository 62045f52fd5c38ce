/*-------------------------------------------------------------------------
 *
 * json.c
 *	  A small JSON tree reader for gateway answers and webhook bodies.
 *
 *	  Unlike jsonb_in, this never raises an ERROR on bad input: malformed
 *	  JSON, "\u0000" and hostile nesting come back as an error string, so a
 *	  forged webhook can be recorded and answered instead of aborting the
 *	  transaction.  Duplicate object keys resolve to the last one, as in
 *	  jsonb and JavaScript.  Also: webhook headers (a jsonb object) read into
 *	  a case-insensitive list.
 *
 *-------------------------------------------------------------------------
 */
#ifdef FRONTEND
/* the fuzz harnesses build the tree reader alone, against libpgcommon */
#include "postgres_fe.h"
#include "json.h"
#else
#include "crmpay.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/formatting.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#endif

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"

#include "codec.h"

#ifdef FRONTEND
#define JSON_ENCODING PG_UTF8
#define TEXT_IS_VALID(t, n) (pg_encoding_verifymbstr(PG_UTF8, (t), (n)) == (n))
#ifndef MaxAllocSize
#define MaxAllocSize ((size_t) 0x3fffffff)
#endif
#else
#define JSON_ENCODING GetDatabaseEncoding()
#define TEXT_IS_VALID(t, n) pg_verifymbstr((t), (n), true)
#endif

/*
 * The reader: a recursive-descent parser of RFC 8259 JSON, accepting
 * exactly what the server's JSON lexer accepts (json_lex in
 * src/common/jsonapi.c: the same grammar, the same escapes, no "\u0000",
 * surrogates only in pairs, in a database that is not UTF-8 no \u escape
 * above 007F), but never raising and nested at most CRMPAY_MAX_JSON_DEPTH
 * deep.  It replaces pg_parse_json here because it copies each string in
 * one piece (the server's lexer appends de-escaped strings a character at
 * a time) and needs no separate pass to bound the nesting: webhook bodies
 * are parsed on the intake's hot path.  tests/fuzz/fuzz_json.c checks it
 * against pg_parse_json.
 */
typedef struct JsonReader
{
	const char *start;
	const char *p;
	const char *end;
	bool		utf8;			/* database encoding is UTF-8 */
	const char *error;
} JsonReader;

static CrmpayJson *read_value(JsonReader *r, int depth);

/* What the server's lexer reads as part of a word (JSON_ALPHANUMERIC_CHAR). */
#define WORD_CHAR(c) (((c) >= 'a' && (c) <= 'z') || ((c) >= 'A' && (c) <= 'Z') || \
					  ((c) >= '0' && (c) <= '9') || (c) == '_' || IS_HIGHBIT_SET(c))

static CrmpayJson *
json_fail(JsonReader *r, const char *what)
{
	if (r->error == NULL)
	{
		if (r->p >= r->end)
			r->error = psprintf("%s: the input ended unexpectedly", what);
		else
			r->error = psprintf("%s at byte %d", what, (int) (r->p - r->start));
	}
	return NULL;
}

static inline void
skip_ws(JsonReader *r)
{
	while (r->p < r->end && (*r->p == ' ' || *r->p == '\n' || *r->p == '\r' || *r->p == '\t'))
		r->p++;
}

static CrmpayJson *
new_node(CrmpayJsonKind kind, CrmpayJson *parent)
{
	CrmpayJson *node = palloc0(sizeof(CrmpayJson));

	node->kind = kind;
	node->parent = parent;
	return node;
}

/* Adds item (and key, for objects) to a container, growing it by doubling. */
static void
add_member(CrmpayJson *parent, char *key, CrmpayJson *item)
{
	if (parent->count == parent->capacity)
	{
		int			newcap = parent->capacity ? parent->capacity * 2 : 8;

		if (parent->capacity == 0)
		{
			parent->items = palloc(sizeof(CrmpayJson *) * newcap);
			if (parent->kind == CRMPAY_JSON_OBJECT)
				parent->keys = palloc(sizeof(char *) * newcap);
		}
		else
		{
			parent->items = repalloc(parent->items, sizeof(CrmpayJson *) * newcap);
			if (parent->kind == CRMPAY_JSON_OBJECT)
				parent->keys = repalloc(parent->keys, sizeof(char *) * newcap);
		}
		parent->capacity = newcap;
	}
	if (parent->kind == CRMPAY_JSON_OBJECT)
		parent->keys[parent->count] = key;
	item->parent = parent;
	parent->items[parent->count++] = item;
}

/*
 * read_string
 *		The string starting at the opening quote, de-escaped into a palloc'd
 *		copy (which is never longer than the escaped text).  NULL on error.
 */
static char *
read_string(JsonReader *r)
{
	const char *q = ++r->p;		/* after the opening quote */
	bool		escaped = false;
	char	   *out;
	char	   *w;

	/* find the closing quote: the common string has no escape */
	while (q < r->end && *q != '"')
	{
		if ((unsigned char) *q < 0x20)
		{
			r->p = q;
			return (char *) json_fail(r, "control character in a string (it must be escaped)");
		}
		if (*q == '\\')
		{
			escaped = true;
			if (++q >= r->end)
				break;
		}
		q++;
	}
	if (q >= r->end)
	{
		r->p = r->end;
		return (char *) json_fail(r, "unterminated string");
	}
	if (!escaped)
	{
		out = pnstrdup(r->p, q - r->p);
		r->p = q + 1;
		return out;
	}

	out = w = palloc(q - r->p + 1);
	while (r->p < q)
	{
		char		c = *r->p;
		int			code;

		if (c != '\\')
		{
			*w++ = c;
			r->p++;
			continue;
		}
		c = r->p[1];
		switch (c)
		{
			case '"':
			case '\\':
			case '/':
				*w++ = c;
				break;
			case 'b':
				*w++ = '\b';
				break;
			case 'f':
				*w++ = '\f';
				break;
			case 'n':
				*w++ = '\n';
				break;
			case 'r':
				*w++ = '\r';
				break;
			case 't':
				*w++ = '\t';
				break;
			case 'u':
				if (q - r->p < 6 || (code = crmpay_hex4(r->p + 2)) < 0)
					return (char *) json_fail(r, "\\u must be followed by four hexadecimal digits");
				if (code == 0)
					return (char *) json_fail(r, "\\u0000 cannot be converted to text");
				if (code >= 0xDC00 && code <= 0xDFFF)
					return (char *) json_fail(r, "Unicode low surrogate must follow a high surrogate");
				if (code >= 0xD800 && code <= 0xDBFF)
				{
					int			low;

					if (q - r->p < 12 || r->p[6] != '\\' || r->p[7] != 'u' ||
						(low = crmpay_hex4(r->p + 8)) < 0xDC00 || low > 0xDFFF)
						return (char *) json_fail(r, "Unicode high surrogate must be followed by a low surrogate");
					code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
					r->p += 6;
				}
				if (code > 0x7F && !r->utf8)
					return (char *) json_fail(r, "Unicode escape values cannot be used for code point values above 007F when the encoding is not UTF8");
				unicode_to_utf8((pg_wchar) code, (unsigned char *) w);
				w += pg_utf_mblen((unsigned char *) w);
				r->p += 6;
				continue;
			default:
				r->p++;
				return (char *) json_fail(r, "invalid escape sequence in a string");
		}
		r->p += 2;
	}
	*w = '\0';
	r->p = q + 1;
	return out;
}

/* A number, as the server's lexer reads it: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
static CrmpayJson *
read_number(JsonReader *r, CrmpayJson *parent)
{
	const char *q = r->p;
	CrmpayJson *node;

	if (q < r->end && *q == '-')
		q++;
	if (q < r->end && *q == '0')
		q++;
	else if (q < r->end && *q >= '1' && *q <= '9')
		while (q < r->end && *q >= '0' && *q <= '9')
			q++;
	else
	{
		r->p = q;
		return json_fail(r, "invalid number");
	}
	if (q < r->end && *q == '.')
	{
		if (++q >= r->end || *q < '0' || *q > '9')
		{
			r->p = q;
			return json_fail(r, "invalid number");
		}
		while (q < r->end && *q >= '0' && *q <= '9')
			q++;
	}
	if (q < r->end && (*q == 'e' || *q == 'E'))
	{
		q++;
		if (q < r->end && (*q == '+' || *q == '-'))
			q++;
		if (q >= r->end || *q < '0' || *q > '9')
		{
			r->p = q;
			return json_fail(r, "invalid number");
		}
		while (q < r->end && *q >= '0' && *q <= '9')
			q++;
	}
	/* like the server's lexer: a number runs into no letter, digit or '_' */
	if (q < r->end && WORD_CHAR(*q))
	{
		r->p = q;
		return json_fail(r, "invalid token");
	}
	node = new_node(CRMPAY_JSON_NUMBER, parent);
	node->text = pnstrdup(r->p, q - r->p);
	r->p = q;
	return node;
}

/* true, false or null, not running into another word character. */
static CrmpayJson *
read_literal(JsonReader *r, CrmpayJson *parent)
{
	static const struct
	{
		const char *word;
		size_t		len;
		CrmpayJsonKind kind;
	}			literals[] = {
		{"true", 4, CRMPAY_JSON_BOOL},
		{"false", 5, CRMPAY_JSON_BOOL},
		{"null", 4, CRMPAY_JSON_NULL},
	};

	for (int i = 0; i < lengthof(literals); i++)
	{
		size_t		n = literals[i].len;
		CrmpayJson *node;

		if ((size_t) (r->end - r->p) < n || memcmp(r->p, literals[i].word, n) != 0)
			continue;
		if (r->p + n < r->end && WORD_CHAR(r->p[n]))
			break;
		node = new_node(literals[i].kind, parent);
		node->text = pstrdup(literals[i].word);
		r->p += n;
		return node;
	}
	return json_fail(r, "invalid token");
}

/* An object or an array, starting at its bracket. */
static CrmpayJson *
read_container(JsonReader *r, int depth, CrmpayJson *parent)
{
	bool		object = (*r->p == '{');
	char		close = object ? '}' : ']';
	CrmpayJson *node;

	if (depth > CRMPAY_MAX_JSON_DEPTH)
	{
		r->error = "JSON nested too deeply";
		return NULL;
	}
	node = new_node(object ? CRMPAY_JSON_OBJECT : CRMPAY_JSON_ARRAY, parent);
	r->p++;
	skip_ws(r);
	if (r->p < r->end && *r->p == close)
	{
		r->p++;
		return node;
	}
	for (;;)
	{
		char	   *key = NULL;
		CrmpayJson *item;

		if (object)
		{
			if (r->p >= r->end || *r->p != '"')
				return json_fail(r, "expected a string key");
			if ((key = read_string(r)) == NULL)
				return NULL;
			skip_ws(r);
			if (r->p >= r->end || *r->p != ':')
				return json_fail(r, "expected ':'");
			r->p++;
			skip_ws(r);
		}
		if ((item = read_value(r, depth + 1)) == NULL)
			return NULL;
		add_member(node, key, item);
		skip_ws(r);
		if (r->p < r->end && *r->p == ',')
		{
			r->p++;
			skip_ws(r);
			continue;
		}
		if (r->p < r->end && *r->p == close)
		{
			r->p++;
			return node;
		}
		return json_fail(r, object ? "expected ',' or '}'" : "expected ',' or ']'");
	}
}

/* Any value at r->p (no leading whitespace). */
static CrmpayJson *
read_value(JsonReader *r, int depth)
{
	CrmpayJson *node;
	char	   *text;

	if (r->p >= r->end)
		return json_fail(r, "expected a value");
	switch (*r->p)
	{
		case '{':
		case '[':
			return read_container(r, depth, NULL);
		case '"':
			if ((text = read_string(r)) == NULL)
				return NULL;
			node = new_node(CRMPAY_JSON_STRING, NULL);
			node->text = text;
			return node;
		case '-':
		case '0':
		case '1':
		case '2':
		case '3':
		case '4':
		case '5':
		case '6':
		case '7':
		case '8':
		case '9':
			return read_number(r, NULL);
		default:
			return read_literal(r, NULL);
	}
}

/*
 * crmpay_json_parse
 *		Parses JSON text into a tree in the current memory context.  Returns
 *		NULL and sets *error (a static or palloc'd message) when the text is
 *		not valid JSON, is nested more than CRMPAY_MAX_JSON_DEPTH deep, or
 *		contains a character the database cannot hold.
 */
CrmpayJson *
crmpay_json_parse(const char *text, size_t len, const char **error)
{
	JsonReader	r;
	CrmpayJson *root;

	*error = NULL;
	if (len > MaxAllocSize - 1)
	{
		*error = "JSON text too large";
		return NULL;
	}
	if (memchr(text, '\0', len) != NULL)
	{
		*error = "JSON text contains a NUL byte";
		return NULL;
	}
	if (!TEXT_IS_VALID(text, (int) len))
	{
		*error = "JSON text is not valid in the database encoding";
		return NULL;
	}

	r.start = r.p = text;
	r.end = text + len;
	r.utf8 = (JSON_ENCODING == PG_UTF8);
	r.error = NULL;
	skip_ws(&r);
	root = read_value(&r, 1);
	if (root != NULL)
	{
		skip_ws(&r);
		if (r.p < r.end)
			root = json_fail(&r, "unexpected text after the JSON value");
	}
	if (root == NULL)
		*error = r.error ? r.error : "invalid JSON";
	return root;
}

/* Returns the member named key of an object (the last one if repeated). */
const CrmpayJson *
crmpay_json_member(const CrmpayJson *object, const char *key)
{
	int			i;

	if (object == NULL || object->kind != CRMPAY_JSON_OBJECT)
		return NULL;
	for (i = object->count - 1; i >= 0; i--)
		if (strcmp(object->keys[i], key) == 0)
			return object->items[i];
	return NULL;
}

/*
 * crmpay_json_path
 *		Follows a dotted path such as "data.object.id" or "items.0.x"
 *		(numeric steps index arrays).  NULL when any step is missing.
 */
const CrmpayJson *
crmpay_json_path(const CrmpayJson *root, const char *dotted_path)
{
	const CrmpayJson *node = root;
	const char *p = dotted_path;
	char		step[256];

	while (node != NULL && *p != '\0')
	{
		const char *dot = strchr(p, '.');
		size_t		n = dot ? (size_t) (dot - p) : strlen(p);

		if (n >= sizeof(step))
			return NULL;
		memcpy(step, p, n);
		step[n] = '\0';
		p += n + (dot ? 1 : 0);

		if (node->kind == CRMPAY_JSON_ARRAY)
		{
			int64_t		index;

			if (!crmpay_parse_int64(step, n, &index) || index >= node->count)
				return NULL;
			node = node->items[index];
		}
		else
			node = crmpay_json_member(node, step);
	}
	return node;
}

/*
 * Returns the scalar text at a path (strings de-escaped; numbers and
 * booleans as written), or NULL if missing, null, an object or an array.
 */
const char *
crmpay_json_str(const CrmpayJson *root, const char *dotted_path)
{
	const CrmpayJson *node = crmpay_json_path(root, dotted_path);

	if (node == NULL || node->kind == CRMPAY_JSON_NULL ||
		node->kind == CRMPAY_JSON_OBJECT || node->kind == CRMPAY_JSON_ARRAY)
		return NULL;
	return node->text;
}

/* Reads an integer number (no fraction, no exponent) at a path. */
bool
crmpay_json_int64(const CrmpayJson *root, const char *dotted_path, int64 *out)
{
	const CrmpayJson *node = crmpay_json_path(root, dotted_path);
	const char *t;
	bool		negative = false;
	int64_t		v;

	if (node == NULL || node->kind != CRMPAY_JSON_NUMBER)
		return false;
	t = node->text;
	if (*t == '-')
	{
		negative = true;
		t++;
	}
	if (!crmpay_parse_int64(t, strlen(t), &v))
		return false;
	*out = negative ? -v : v;
	return true;
}

#ifndef FRONTEND

/* Builds a tree from a jsonb datum (already validated by the server). */
CrmpayJson *
crmpay_json_from_jsonb_datum(Datum jsonb_datum)
{
	char	   *text = DatumGetCString(DirectFunctionCall1(jsonb_out, jsonb_datum));
	const char *error;
	CrmpayJson *tree = crmpay_json_parse(text, strlen(text), &error);

	if (tree == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("jsonb value cannot be read: %s", error)));
	return tree;
}

/*
 * crmpay_headers_from_jsonb
 *		Reads webhook headers given as a jsonb object {"Name": "value", ...}.
 *		Names are matched case-insensitively later, so they are lower-cased
 *		here.  A value may also be an array of strings (a header repeated);
 *		its parts are joined with ", " as HTTP allows.  Other value types are
 *		ignored.  Walks the jsonb directly: this runs for every delivery and
 *		every crmpay.verify_signature() call.
 */
CrmpayHeaders *
crmpay_headers_from_jsonb(Datum jsonb)
{
	Jsonb	   *in = DatumGetJsonbP(jsonb);
	CrmpayHeaders *headers = palloc0(sizeof(CrmpayHeaders));
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	char	   *name = NULL;
	StringInfoData joined;
	int			capacity;
	int			depth = 0;
	bool		in_array = false;

	if (!JB_ROOT_IS_OBJECT(in) || JB_ROOT_IS_SCALAR(in))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("webhook headers must be a JSON object"),
				 errhint("Pass the request's headers as {\"Header-Name\": \"value\", ...}.")));

	capacity = Max(JB_ROOT_COUNT(in), 1);
	headers->items = palloc0(sizeof(CrmpayHeader) * capacity);
	initStringInfo(&joined);
	it = JsonbIteratorInit(&in->root);
	while ((tok = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		switch (tok)
		{
			case WJB_BEGIN_OBJECT:
			case WJB_BEGIN_ARRAY:
				depth++;
				if (depth == 2 && tok == WJB_BEGIN_ARRAY && name != NULL)
				{
					in_array = true;
					resetStringInfo(&joined);
				}
				break;
			case WJB_END_OBJECT:
			case WJB_END_ARRAY:
				if (depth == 2 && in_array)
				{
					headers->items[headers->count].name = name;
					headers->items[headers->count].value = pstrdup(joined.data);
					headers->count++;
					in_array = false;
				}
				depth--;
				break;
			case WJB_KEY:
				if (depth == 1)
					name = asc_tolower(v.val.string.val, v.val.string.len);
				break;
			case WJB_VALUE:
				/* a scalar member of the top object */
				if (depth == 1 && v.type == jbvString)
				{
					headers->items[headers->count].name = name;
					headers->items[headers->count].value = pnstrdup(v.val.string.val, v.val.string.len);
					headers->count++;
				}
				break;
			case WJB_ELEM:
				if (depth == 2 && in_array && v.type == jbvString)
				{
					if (joined.len > 0)
						appendStringInfoString(&joined, ", ");
					appendBinaryStringInfo(&joined, v.val.string.val, v.val.string.len);
				}
				break;
			default:
				break;
		}
	}
	pfree(joined.data);
	return headers;
}

/* Case-insensitive header lookup (name must be lower case); NULL if absent. */
const char *
crmpay_header_get(const CrmpayHeaders *headers, const char *name)
{
	int			i;

	if (headers == NULL)
		return NULL;
	for (i = 0; i < headers->count; i++)
		if (strcmp(headers->items[i].name, name) == 0)
			return headers->items[i].value;
	return NULL;
}

#endif							/* !FRONTEND */
