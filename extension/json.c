/*-------------------------------------------------------------------------
 *
 * json.c
 *	  A small JSON tree built with the server's JSON lexer/parser
 *	  (pg_parse_json), for reading gateway answers and webhook bodies.
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
#define JSON_ERROR_TEXT(rc, lex) "invalid JSON"
#ifndef MaxAllocSize
#define MaxAllocSize ((size_t) 0x3fffffff)
#endif
#else
#define JSON_ENCODING GetDatabaseEncoding()
#define TEXT_IS_VALID(t, n) pg_verifymbstr((t), (n), true)
#define JSON_ERROR_TEXT(rc, lex) json_errdetail((rc), (lex))
#endif

typedef struct JsonBuildState
{
	CrmpayJson *root;
	CrmpayJson *current;		/* innermost open object/array */
	char	   *pending_key;	/* key of the next object member */
} JsonBuildState;

static void
json_attach(JsonBuildState *state, CrmpayJson *node)
{
	CrmpayJson *parent = state->current;

	node->parent = parent;
	if (parent == NULL)
	{
		state->root = node;
		return;
	}
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
		parent->keys[parent->count] = state->pending_key;
	parent->items[parent->count++] = node;
}

static CrmpayJson *
json_new_node(CrmpayJsonKind kind)
{
	CrmpayJson *node = palloc0(sizeof(CrmpayJson));

	node->kind = kind;
	return node;
}

static void
json_container_start(void *arg, CrmpayJsonKind kind)
{
	JsonBuildState *state = arg;
	CrmpayJson *node = json_new_node(kind);

	json_attach(state, node);
	state->current = node;
}

static void
json_object_start(void *arg)
{
	json_container_start(arg, CRMPAY_JSON_OBJECT);
}

static void
json_array_start(void *arg)
{
	json_container_start(arg, CRMPAY_JSON_ARRAY);
}

static void
json_container_end(void *arg)
{
	JsonBuildState *state = arg;

	state->current = state->current->parent;
}

static void
json_field_start(void *arg, char *fname, bool isnull)
{
	((JsonBuildState *) arg)->pending_key = fname;
}

static void
json_scalar(void *arg, char *token, JsonTokenType tokentype)
{
	CrmpayJsonKind kind;
	CrmpayJson *node;

	switch (tokentype)
	{
		case JSON_TOKEN_STRING:
			kind = CRMPAY_JSON_STRING;
			break;
		case JSON_TOKEN_NUMBER:
			kind = CRMPAY_JSON_NUMBER;
			break;
		case JSON_TOKEN_TRUE:
		case JSON_TOKEN_FALSE:
			kind = CRMPAY_JSON_BOOL;
			break;
		default:
			kind = CRMPAY_JSON_NULL;
			break;
	}
	node = json_new_node(kind);
	node->text = token;
	json_attach((JsonBuildState *) arg, node);
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
	JsonBuildState state = {0};
	JsonSemAction sem = {0};
	JsonLexContext *lex;
	JsonParseErrorType rc;
	char	   *copy;
	int			depth;

	*error = NULL;
	if (len > MaxAllocSize - 1)
	{
		*error = "JSON text too large";
		return NULL;
	}
	depth = crmpay_json_nesting_depth(text, len);
	if (depth < 0)
	{
		*error = "JSON brackets do not balance";
		return NULL;
	}
	if (depth > CRMPAY_MAX_JSON_DEPTH)
	{
		*error = "JSON nested too deeply";
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

	copy = pnstrdup(text, len);
	lex = makeJsonLexContextCstringLen(copy, (int) len, JSON_ENCODING, true);

	sem.semstate = &state;
	sem.object_start = json_object_start;
	sem.object_end = json_container_end;
	sem.array_start = json_array_start;
	sem.array_end = json_container_end;
	sem.object_field_start = json_field_start;
	sem.scalar = json_scalar;

	rc = pg_parse_json(lex, &sem);
	if (rc != JSON_SUCCESS)
		*error = JSON_ERROR_TEXT(rc, lex);
	if (rc != JSON_SUCCESS)
		return NULL;
	return state.root;
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
