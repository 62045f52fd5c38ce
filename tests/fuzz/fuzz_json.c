/*
 * fuzz_json.c
 *	  libFuzzer harness for extension/json.c, the JSON tree reader every
 *	  gateway answer and webhook body goes through, built in frontend mode
 *	  on PostgreSQL's own JSON lexer/parser (libpgcommon).  Checks that
 *	  parsing never crashes, that the tree is consistent, and that the path
 *	  lookups the providers use stay in bounds, with leak detection on.
 */
#include "postgres_fe.h"

#include <stdlib.h>

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

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *error = NULL;
	CrmpayJson *root = crmpay_json_parse((const char *) data, size, &error);
	size_t		i;

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
