/*
 * fuzz_json.c
 *	  libFuzzer harness for extension/json.c, the JSON tree reader every
 *	  gateway answer and webhook body goes through, built in frontend mode.
 *	  Checks that parsing never crashes, that the tree is consistent, that
 *	  the path lookups the providers use stay in bounds (leak detection
 *	  on), and, differentially, that it accepts exactly what PostgreSQL's
 *	  own JSON parser (pg_parse_json of libpgcommon, asked for de-escaped
 *	  strings as a tree builder asks) accepts, up to crmpay's nesting limit,
 *	  and builds the same tree.
 */
#include "postgres_fe.h"

#include <stdlib.h>

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"

#include "json.h"

/*
 * In the server every allocation of a parse lives in a memory context that
 * is reset afterwards.  Here the harness provides the palloc family itself
 * (overriding libpgcommon's malloc wrappers) as an arena released after each
 * input: the same lifetime, every block still a separate malloc so ASan
 * checks its bounds, and no leak reports for memory the server would free.
 */
typedef struct ArenaBlock
{
	struct ArenaBlock *prev;
	struct ArenaBlock *next;
	size_t		size;
	max_align_t align[];
} ArenaBlock;

static ArenaBlock *arena = NULL;

static void *
arena_alloc(size_t size, bool zero)
{
	ArenaBlock *b = zero ? calloc(1, sizeof(ArenaBlock) + size) : malloc(sizeof(ArenaBlock) + size);

	if (b == NULL)
		abort();
	b->size = size;
	b->prev = NULL;
	b->next = arena;
	if (arena)
		arena->prev = b;
	arena = b;
	return b->align;
}

static void
arena_unlink(ArenaBlock *b)
{
	if (b->prev)
		b->prev->next = b->next;
	else
		arena = b->next;
	if (b->next)
		b->next->prev = b->prev;
}

static void
arena_reset(void)
{
	while (arena)
	{
		ArenaBlock *next = arena->next;

		free(arena);
		arena = next;
	}
}

void *
palloc(Size size)
{
	return arena_alloc(size, false);
}

void *
palloc0(Size size)
{
	return arena_alloc(size, true);
}

void *
palloc_extended(Size size, int flags)
{
	return arena_alloc(size, (flags & MCXT_ALLOC_ZERO) != 0);
}

void
pfree(void *pointer)
{
	ArenaBlock *b = (ArenaBlock *) ((char *) pointer - offsetof(ArenaBlock, align));

	arena_unlink(b);
	free(b);
}

void *
repalloc(void *pointer, Size size)
{
	ArenaBlock *old = (ArenaBlock *) ((char *) pointer - offsetof(ArenaBlock, align));
	void	   *fresh = arena_alloc(size, false);

	memcpy(fresh, pointer, Min(old->size, size));
	pfree(pointer);
	return fresh;
}

char *
pstrdup(const char *in)
{
	return pnstrdup(in, strlen(in));
}

char *
pnstrdup(const char *in, Size len)
{
	char	   *out;

	len = strnlen(in, len);
	out = palloc(len + 1);
	memcpy(out, in, len);
	out[len] = '\0';
	return out;
}

#define CHECK(cond) do { if (!(cond)) abort(); } while (0)

static const char *paths[] = {
	"id", "type", "data.object.id", "data.object.metadata.crmpay_order_ref",
	"error.message", "notificationItems.0.NotificationRequestItem.amount.value",
	"purchase_units.0.payments.captures.0.id", "links.1.href", "0", "a.b.c.d.e.f",
};

static void
walk(const CrmpayJson *node, int depth)
{
	int			i;

	CHECK(depth <= CRMPAY_MAX_JSON_DEPTH + 1);
	if (node->kind == CRMPAY_JSON_OBJECT || node->kind == CRMPAY_JSON_ARRAY)
	{
		CHECK(node->count <= node->capacity);
		for (i = 0; i < node->count; i++)
		{
			CHECK(node->items[i]->parent == node);
			if (node->kind == CRMPAY_JSON_OBJECT)
				CHECK(node->keys[i] != NULL);
			walk(node->items[i], depth + 1);
		}
	}
	else
		CHECK(node->text != NULL);
}

/* The reference: a tree built by pg_parse_json's semantic actions. */
typedef struct RefState
{
	CrmpayJson *root;
	CrmpayJson *current;
	char	   *pending_key;
	int			depth;
	int			max_depth;
} RefState;

static void
ref_attach(RefState *st, CrmpayJson *node)
{
	CrmpayJson *parent = st->current;

	node->parent = parent;
	if (parent == NULL)
	{
		st->root = node;
		return;
	}
	if (parent->count == parent->capacity)
	{
		parent->capacity = parent->capacity ? parent->capacity * 2 : 8;
		parent->items = parent->items ? repalloc(parent->items, sizeof(CrmpayJson *) * parent->capacity)
			: palloc(sizeof(CrmpayJson *) * parent->capacity);
		if (parent->kind == CRMPAY_JSON_OBJECT)
			parent->keys = parent->keys ? repalloc(parent->keys, sizeof(char *) * parent->capacity)
				: palloc(sizeof(char *) * parent->capacity);
	}
	if (parent->kind == CRMPAY_JSON_OBJECT)
		parent->keys[parent->count] = st->pending_key;
	parent->items[parent->count++] = node;
}

static void
ref_container(void *arg, CrmpayJsonKind kind)
{
	RefState   *st = arg;
	CrmpayJson *node = palloc0(sizeof(CrmpayJson));

	node->kind = kind;
	ref_attach(st, node);
	st->current = node;
	if (++st->depth > st->max_depth)
		st->max_depth = st->depth;
}

static void
ref_object_start(void *arg)
{
	ref_container(arg, CRMPAY_JSON_OBJECT);
}

static void
ref_array_start(void *arg)
{
	ref_container(arg, CRMPAY_JSON_ARRAY);
}

static void
ref_end(void *arg)
{
	RefState   *st = arg;

	st->current = st->current->parent;
	st->depth--;
}

static void
ref_field(void *arg, char *fname, bool isnull)
{
	((RefState *) arg)->pending_key = fname;
}

static void
ref_scalar(void *arg, char *token, JsonTokenType type)
{
	CrmpayJson *node = palloc0(sizeof(CrmpayJson));

	node->kind = type == JSON_TOKEN_STRING ? CRMPAY_JSON_STRING
		: type == JSON_TOKEN_NUMBER ? CRMPAY_JSON_NUMBER
		: (type == JSON_TOKEN_TRUE || type == JSON_TOKEN_FALSE) ? CRMPAY_JSON_BOOL
		: CRMPAY_JSON_NULL;
	node->text = token;
	ref_attach(arg, node);
}

static void
same_tree(const CrmpayJson *a, const CrmpayJson *b)
{
	int			i;

	CHECK(a->kind == b->kind && a->count == b->count);
	if (a->kind == CRMPAY_JSON_OBJECT || a->kind == CRMPAY_JSON_ARRAY)
		for (i = 0; i < a->count; i++)
		{
			if (a->kind == CRMPAY_JSON_OBJECT)
				CHECK(strcmp(a->keys[i], b->keys[i]) == 0);
			same_tree(a->items[i], b->items[i]);
		}
	else
		CHECK(strcmp(a->text, b->text) == 0);
}

/* pg_parse_json's verdict on the input, and its tree in *st. */
static bool
reference_parse(const uint8_t *data, size_t size, RefState *st)
{
	JsonSemAction sem = {0};
	char	   *copy = pnstrdup((const char *) data, size);
	JsonLexContext *lex = makeJsonLexContextCstringLen(copy, (int) size, PG_UTF8, true);

	memset(st, 0, sizeof(*st));
	sem.semstate = st;
	sem.object_start = ref_object_start;
	sem.object_end = ref_end;
	sem.array_start = ref_array_start;
	sem.array_end = ref_end;
	sem.object_field_start = ref_field;
	sem.scalar = ref_scalar;
	return pg_parse_json(lex, &sem) == JSON_SUCCESS;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *error = NULL;
	CrmpayJson *root = crmpay_json_parse((const char *) data, size, &error);
	size_t		i;

	/*
	 * The differential check, on what both are meant to read: valid UTF-8
	 * without NUL bytes (crmpay refuses the rest before parsing) and not so
	 * deep that the reference's recursion would need a deep stack.
	 */
	if (size < 4096 && memchr(data, '\0', size) == NULL &&
		pg_encoding_verifymbstr(PG_UTF8, (const char *) data, (int) size) == (int) size)
	{
		RefState	ref;
		bool		ref_ok = reference_parse(data, size, &ref);

		if (ref_ok && ref.max_depth <= CRMPAY_MAX_JSON_DEPTH)
		{
			CHECK(root != NULL);
			same_tree(root, ref.root);
		}
		else
			CHECK(root == NULL);
	}

	if (root == NULL)
	{
		CHECK(error != NULL);
		arena_reset();
		return 0;
	}
	walk(root, 0);
	for (i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
	{
		int64		v;

		(void) crmpay_json_str(root, paths[i]);
		(void) crmpay_json_int64(root, paths[i], &v);
	}
	arena_reset();
	return 0;
}
