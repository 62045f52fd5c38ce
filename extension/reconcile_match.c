/*-------------------------------------------------------------------------
 *
 * reconcile_match.c
 *	  The set-based heart of reconciliation: crmpay._recon_candidates(), one
 *	  pass over a run's gateway records (fetched by the run, and imported
 *	  reports' records of its window) and the account's payments of the
 *	  window, grouped by the match key in one hash table: a FULL OUTER JOIN
 *	  of the two sides and the grouping of an order's several records (link,
 *	  charges, refunds, fees) in a single pass.
 *
 *	  The inputs are three plain SELECTs, run through SPI into a
 *	  DestReceiver: each row is folded into its order's small C state as it
 *	  comes out of the scan, without copying the row, without a call through
 *	  fmgr and without the executor's hash aggregate, whose bookkeeping cost
 *	  more than the matching itself (a copied key tuple and a group array
 *	  per order, key comparison by expression evaluation, a finalize call per
 *	  order, and a group limit derived from the planner's row width, which
 *	  made a million orders spill to disk with memory to spare).  An order's
 *	  state and key sit together, in the order the orders were first seen,
 *	  so the final walk over the table is sequential; only the orders that
 *	  are not plainly clean (normally well under 1 %) come out, as
 *	  crmpay._recon_key rows, to be classified in SQL (_recon_classify).
 *
 *	  Memory: at most get_hash_memory_limit(), as for a hash aggregate
 *	  (work_mem, which the caller sets to crmpay.reconcile_work_mem, times
 *	  hash_mem_multiplier).  A window with more orders than that holds is
 *	  matched in several passes, each over a share of the keys (by hash),
 *	  each reading the inputs again under the same snapshot.
 *
 *	  On the way, the records loaded, the payments of the window and the
 *	  gateway's money per currency are counted into backend-local totals,
 *	  read by crmpay._recon_stats() after the statement (so no second scan).
 *
 *-------------------------------------------------------------------------
 */
#include "crmpay.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/params.h"
#include "tcop/dest.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

/* Statuses, as evidence; rank: higher is further along (see _recon_rank). */
typedef enum ReconStatus
{
	RS_NONE = 0,
	RS_LINK_PENDING,
	RS_OPEN,
	RS_PROCESSING,
	RS_PAID,
	RS_FAILED,
	RS_EXPIRED,
	RS_CANCELED,
	RS_REFUNDED,
	RS_PARTIALLY_REFUNDED,
	RS_DISPUTED,
	RS_OTHER
} ReconStatus;

static const char *const status_names[] = {
	NULL, "link_pending", "open", "processing", "paid", "failed", "expired",
	"canceled", "refunded", "partially_refunded", "disputed", NULL
};
static const int status_rank[] = {0, 1, 2, 5, 7, 4, 3, 3, 7, 7, 7, 0};

#define IS_MONEY(s) ((s) == RS_PAID || (s) == RS_REFUNDED || (s) == RS_PARTIALLY_REFUNDED || \
					 (s) == RS_DISPUTED)

static ReconStatus
status_of(text *t)
{
	const char *s;
	int			len;
	int			i;

	if (t == NULL)
		return RS_NONE;
	s = VARDATA_ANY(t);
	len = VARSIZE_ANY_EXHDR(t);
	for (i = 1; i < RS_OTHER; i++)
		if ((int) strlen(status_names[i]) == len && memcmp(status_names[i], s, len) == 0)
			return (ReconStatus) i;
	return RS_OTHER;
}

/* Better evidence: higher rank, then the greater name (as max("rank:name")). */
static bool
status_better(ReconStatus a, ReconStatus b)
{
	if (status_rank[a] != status_rank[b])
		return status_rank[a] > status_rank[b];
	if (a == RS_NONE || b == RS_NONE || a == RS_OTHER || b == RS_OTHER)
		return a != RS_NONE && b == RS_NONE;
	return strcmp(status_names[a], status_names[b]) > 0;
}

typedef enum RecordType
{
	RT_LINK, RT_CHARGE, RT_REFUND, RT_CHARGEBACK, RT_BALANCE, RT_OTHER
} RecordType;

static RecordType
record_type_of(text *t)
{
	const char *s = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);

#define IS(lit) (len == (int) sizeof(lit) - 1 && memcmp(s, lit, len) == 0)
	if (IS("charge"))
		return RT_CHARGE;
	if (IS("link"))
		return RT_LINK;
	if (IS("refund"))
		return RT_REFUND;
	if (IS("chargeback"))
		return RT_CHARGEBACK;
	if (IS("balance"))
		return RT_BALANCE;
#undef IS
	return RT_OTHER;
}

/*
 * One order: everything its records and payment say.  Kept small (one
 * exists per order: a million of them for a million orders); it lives in
 * the hash table's entry, next to its key, and its strings in the arena.
 */
typedef struct ReconState
{
	int64		payment_id;
	int64		p_amount;
	int64		p_refunded;
	int64		link_amount;
	int64		paid_min;
	int64		paid_max;
	int64		paid_total;
	int64		refunded_cum;	/* max of charges' cumulative refunds */
	int64		refund_sum;		/* sum of single refunds */
	TimestampTz paid_at;
	char	   *order_ref;		/* NULL when it is the key itself */
	char	   *gateway_ref;
	char	   *gateway_payment_ref;
	char	   *paid_first_ref;
	char	   *paid_last_ref;
	int32		records;
	int32		first_line;
	int32		paid_count;
	int16		payments;		/* CRM payments with this key (1 normally) */
	int16		payments_in_window;
	uint8		p_status;		/* ReconStatus */
	uint8		link_status;
	uint8		charge_status;
	bool		link_amount_set;
	bool		refund_known;
	bool		disputed;
	bool		currency_set;
	bool		in_window;
	bool		key_null;		/* the group of rows without a key */
	bool		order_ref_is_key;
	char		p_currency[4];
	char		currency_min[4];
	char		currency_max[4];
} ReconState;

/*
 * The arena: order states' strings come from blocks of the matching's
 * memory context, not palloc'd one by one (a million orders, two or three
 * strings each).
 */
typedef struct Arena
{
	MemoryContext cxt;
	char	   *ptr;
	Size		left;
	Size		next_block;
	Size		allocated;		/* bytes in all blocks */
} Arena;

static void *
arena_alloc(Arena *arena, Size size)
{
	void	   *p;

	size = MAXALIGN(size);
	if (arena->left < size)
	{
		Size		block = Max(arena->next_block, size);

		arena->next_block = Min(arena->next_block * 2, 256 * 1024);
		arena->ptr = MemoryContextAllocHuge(arena->cxt, block);
		arena->left = block;
		arena->allocated += block;
	}
	p = arena->ptr;
	arena->ptr += size;
	arena->left -= size;
	return p;
}

/* ----------------------------------------------------------------
 * Backend-local totals of the current statement (see file header)
 * ----------------------------------------------------------------
 */
#define MAX_TOTAL_CURRENCIES 64

typedef struct CurrencyTotals
{
	char		code[4];
	int64		gross;
	int64		refunds;
	int64		fees;
	int64		net;
	int64		records;
	bool		has_gross;
	bool		has_refunds;
	bool		has_fees;
	bool		has_net;
} CurrencyTotals;

static struct
{
	int64		loaded;
	int64		keyed;
	int64		payments_checked;
	int			ncurrencies;
	bool		overflow;
	CurrencyTotals currencies[MAX_TOTAL_CURRENCIES];
} stats;

static void
add_totals(const char *code, RecordType type, bool fin_null, int64 fin, bool fee_null,
		   int64 fee, bool net_null, int64 net)
{
	CurrencyTotals *t = NULL;
	int			i;

	for (i = 0; i < stats.ncurrencies; i++)
		if (strcmp(stats.currencies[i].code, code) == 0)
		{
			t = &stats.currencies[i];
			break;
		}
	if (t == NULL)
	{
		if (stats.ncurrencies >= MAX_TOTAL_CURRENCIES)
		{
			stats.overflow = true;
			return;
		}
		t = &stats.currencies[stats.ncurrencies++];
		memset(t, 0, sizeof(*t));
		strlcpy(t->code, code, sizeof(t->code));
	}
	t->records++;
	if (!fin_null && fin > 0 && type != RT_REFUND)
	{
		t->gross += fin;
		t->has_gross = true;
	}
	if (!fin_null && type == RT_REFUND)
	{
		t->refunds -= fin;
		t->has_refunds = true;
	}
	if (!fee_null)
	{
		t->fees += fee;
		t->has_fees = true;
	}
	if (!net_null)
	{
		t->net += net;
		t->has_net = true;
	}
}

/* strcmp of a text and a C string. */
static int
text_cmp(text *t, const char *c)
{
	int			len = VARSIZE_ANY_EXHDR(t);
	int			r = strncmp(VARDATA_ANY(t), c, len);

	if (r == 0)
		r = c[len] == '\0' ? 0 : -1;
	return r;
}

/* Keeps the smaller (or larger) of *slot and the text, copied into the arena. */
static void
keep_text(char **slot, text *t, bool want_max, Arena *arena)
{
	int			len = VARSIZE_ANY_EXHDR(t);

	if (*slot != NULL)
	{
		int			c = text_cmp(t, *slot);

		if (want_max ? c <= 0 : c >= 0)
			return;
	}
	*slot = arena_alloc(arena, len + 1);
	memcpy(*slot, VARDATA_ANY(t), len);
	(*slot)[len] = '\0';
}

static void
copy_currency(char *dst, text *t)
{
	int			len = Min(VARSIZE_ANY_EXHDR(t), 3);

	memcpy(dst, VARDATA_ANY(t), len);
	dst[len] = '\0';
}

/* Is this order plainly in order?  (Anything else is looked at closely.) */
static bool
plainly_clean(const ReconState *st)
{
	int64		refunded = Max(st->refunded_cum, st->refund_sum);

	if (st->payments != 1 || st->records == 0)
		return false;
	if (!st->currency_set || strcmp(st->currency_min, st->p_currency) != 0 ||
		strcmp(st->currency_max, st->p_currency) != 0)
		return false;
	if (st->paid_count > 1 || st->disputed)
		return false;
	if (st->paid_count == 1)
		return st->paid_min == st->p_amount && st->paid_max == st->p_amount &&
			IS_MONEY(st->p_status) && refunded == st->p_refunded &&
			(st->link_status == RS_NONE || status_rank[st->link_status] == 7) &&
			(!st->link_amount_set || st->link_amount == st->p_amount);
	return refunded == 0 &&
		(st->link_status == RS_OPEN || st->link_status == RS_EXPIRED ||
		 st->link_status == RS_CANCELED) &&
		st->link_status == st->p_status &&
		(st->charge_status == RS_NONE || st->charge_status == RS_OPEN ||
		 st->charge_status == RS_FAILED) &&
		(!st->link_amount_set || st->link_amount == st->p_amount);
}

/* A CRM-only order worth reporting: money taken in the window. */
static bool
crm_only_candidate(const ReconState *st)
{
	return st->records == 0 && st->payments_in_window > 0 && IS_MONEY(st->p_status);
}

/* Nothing to look at: no key, plainly clean, or a CRM-only order of no interest. */
static bool
quiet(const ReconState *st)
{
	return st->key_null || plainly_clean(st) ||
		(st->records == 0 && !crm_only_candidate(st));
}

/* ----------------------------------------------------------------
 * The hash table: open addressing (linear probing) over 8-byte buckets
 * holding the key's hash and the entry's number; entries (state and key)
 * in chunks, numbered from 1 in the order their keys were first seen.
 * ----------------------------------------------------------------
 */
#define KEY_INLINE 28			/* longer keys live in the arena */
#define CHUNK_BITS 8			/* 256 entries (48 kB) per chunk */
#define CHUNK_ENTRIES (1 << CHUNK_BITS)
#define MAX_PASSES 256			/* beyond that, the limit gives way */

typedef struct ReconEntry
{
	ReconState	st;
	int32		keylen;
	char		key[KEY_INLINE];	/* the key, or (longer) a pointer to it */
} ReconEntry;

typedef struct Bucket
{
	uint32		hash;
	uint32		entry;			/* 0: empty */
} Bucket;

/* Everything one call of crmpay._recon_candidates works with. */
typedef struct MatchState
{
	MemoryContext cxt;			/* table, entries, strings: reset per pass */
	MemoryContext rowcxt;		/* detoasted values of the current row */
	Arena		arena;
	Bucket	   *buckets;
	uint32		nbuckets;		/* a power of 2 */
	uint32		grow_at;		/* entries that make it grow (3/4 full) */
	uint32		nentries;
	ReconEntry **chunks;
	int			nchunks;
	int			maxchunks;
	Size		mem_limit;
	bool		overflow;		/* this pass needed more than mem_limit */
	int			npasses;
	int			pass;
	ReconState	null_state;		/* the rows without a key: counted, never reported */
	TimestampTz since;
	TimestampTz until;
} MatchState;

static inline ReconEntry *
entry_at(MatchState *ms, uint32 n)
{
	n--;
	return &ms->chunks[n >> CHUNK_BITS][n & (CHUNK_ENTRIES - 1)];
}

static inline const char *
entry_key(ReconEntry *e)
{
	char	   *p;

	if (e->keylen <= KEY_INLINE)
		return e->key;
	memcpy(&p, e->key, sizeof(p));
	return p;
}

/* Memory the table holds now. */
static Size
table_memory(MatchState *ms)
{
	return (Size) ms->nbuckets * sizeof(Bucket) +
		(Size) ms->nchunks * CHUNK_ENTRIES * sizeof(ReconEntry) +
		(Size) ms->maxchunks * sizeof(ReconEntry *) + ms->arena.allocated;
}

/* An empty table (for a new pass). */
static void
table_reset(MatchState *ms)
{
	MemoryContextReset(ms->cxt);
	memset(&ms->arena, 0, sizeof(ms->arena));
	ms->arena.cxt = ms->cxt;
	ms->arena.next_block = 8192;
	ms->nbuckets = 1024;
	ms->grow_at = ms->nbuckets / 4 * 3;
	ms->buckets = MemoryContextAllocZero(ms->cxt, ms->nbuckets * sizeof(Bucket));
	ms->nentries = 0;
	ms->maxchunks = 256;
	ms->nchunks = 0;
	ms->chunks = MemoryContextAlloc(ms->cxt, ms->maxchunks * sizeof(ReconEntry *));
	ms->overflow = false;
	memset(&ms->null_state, 0, sizeof(ms->null_state));
	ms->null_state.first_line = -1;
	ms->null_state.key_null = true;
}

/* Twice the buckets; entries stay where they are. */
static void
table_grow(MatchState *ms)
{
	uint32		nbuckets;
	uint32		mask;
	Bucket	   *buckets;
	uint32		i;

	if (ms->nbuckets > PG_UINT32_MAX / 2)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("too many orders in one reconciliation window"),
				 errhint("Reconcile a long period as several runs, one window at a time.")));
	nbuckets = ms->nbuckets * 2;
	mask = nbuckets - 1;
	buckets = MemoryContextAllocExtended(ms->cxt, (Size) nbuckets * sizeof(Bucket),
										 MCXT_ALLOC_HUGE | MCXT_ALLOC_ZERO);
	for (i = 0; i < ms->nbuckets; i++)
	{
		uint32		j;

		if (ms->buckets[i].entry == 0)
			continue;
		j = ms->buckets[i].hash & mask;
		while (buckets[j].entry != 0)
			j = (j + 1) & mask;
		buckets[j] = ms->buckets[i];
	}
	pfree(ms->buckets);
	ms->buckets = buckets;
	ms->nbuckets = nbuckets;
	ms->grow_at = nbuckets / 4 * 3;
}

/*
 * The state of the order with this key, new if the key was not seen yet.
 * Sets ms->overflow when the table has outgrown its memory and another
 * pass could still share the keys out.
 */
static ReconState *
table_lookup(MatchState *ms, const char *key, int len, uint32 hash)
{
	uint32		mask;
	uint32		i;
	ReconEntry *e;
	uint32		n;

	if (ms->nentries >= ms->grow_at)
		table_grow(ms);
	mask = ms->nbuckets - 1;
	for (i = hash & mask; ms->buckets[i].entry != 0; i = (i + 1) & mask)
	{
		if (ms->buckets[i].hash != hash)
			continue;
		e = entry_at(ms, ms->buckets[i].entry);
		if (e->keylen == len && memcmp(entry_key(e), key, len) == 0)
			return &e->st;
	}

	/* a new order */
	n = ms->nentries;
	if ((n >> CHUNK_BITS) >= (uint32) ms->nchunks)
	{
		if (ms->nchunks == ms->maxchunks)
		{
			ms->maxchunks *= 2;
			ms->chunks = repalloc_huge(ms->chunks, ms->maxchunks * sizeof(ReconEntry *));
		}
		ms->chunks[ms->nchunks++] = MemoryContextAllocHuge(ms->cxt, CHUNK_ENTRIES * sizeof(ReconEntry));
	}
	e = &ms->chunks[n >> CHUNK_BITS][n & (CHUNK_ENTRIES - 1)];
	memset(&e->st, 0, sizeof(e->st));
	e->st.first_line = -1;
	e->keylen = len;
	if (len <= KEY_INLINE)
		memcpy(e->key, key, len);
	else
	{
		char	   *p = arena_alloc(&ms->arena, len);

		memcpy(p, key, len);
		memcpy(e->key, &p, sizeof(p));
	}
	ms->nentries = n + 1;
	ms->buckets[i].hash = hash;
	ms->buckets[i].entry = n + 1;

	if (ms->npasses < MAX_PASSES && table_memory(ms) > ms->mem_limit)
		ms->overflow = true;
	return &e->st;
}

/* ----------------------------------------------------------------
 * Folding rows into their order's state
 * ----------------------------------------------------------------
 */

/* Columns of the gateway records' SELECT (records_sql) */
enum
{
	R_KEY, R_TYPE, R_STATUS, R_AMOUNT, R_CURRENCY, R_REFUNDED, R_RECORD_REF, R_ORDER_REF,
	R_GATEWAY_REF, R_GATEWAY_PAYMENT_REF, R_AT, R_LINE, R_FIN_CURRENCY, R_FIN_AMOUNT, R_FEE, R_NET
};

/* Columns of the payments' SELECT (payments_sql) */
enum
{
	P_KEY, P_STATUS, P_AMOUNT, P_CURRENCY, P_REFUNDED, P_AT, P_ID
};

#define COL_NULL(n) (slot->tts_isnull[n])
#define COL_TEXT(n) (COL_NULL(n) ? NULL : DatumGetTextPP(slot->tts_values[n]))
#define COL_INT8(n, dflt) (COL_NULL(n) ? (dflt) : DatumGetInt64(slot->tts_values[n]))

/* A CRM payment of the order (at = created_at). */
static void
add_payment(MatchState *ms, ReconState *st, TupleTableSlot *slot)
{
	text	   *t;

	st->payments++;
	if (!COL_NULL(P_AT))
	{
		TimestampTz at = DatumGetTimestampTz(slot->tts_values[P_AT]);

		if (at >= ms->since && at < ms->until)
		{
			st->payments_in_window++;
			stats.payments_checked++;
		}
	}
	st->payment_id = COL_INT8(P_ID, 0);
	st->p_status = status_of(COL_TEXT(P_STATUS));
	st->p_amount = COL_INT8(P_AMOUNT, 0);
	st->p_refunded = COL_INT8(P_REFUNDED, 0);
	if ((t = COL_TEXT(P_CURRENCY)) != NULL)
		copy_currency(st->p_currency, t);
}

/* A gateway record of the order; key is the record's match key (NULL: none). */
static void
add_record(MatchState *ms, ReconState *st, TupleTableSlot *slot, text *key)
{
	RecordType	type = record_type_of(DatumGetTextPP(slot->tts_values[R_TYPE]));
	ReconStatus status = status_of(COL_TEXT(R_STATUS));
	bool		amount_null = COL_NULL(R_AMOUNT);
	int64		amount = COL_INT8(R_AMOUNT, 0);
	bool		at_null = COL_NULL(R_AT);
	TimestampTz at = at_null ? 0 : DatumGetTimestampTz(slot->tts_values[R_AT]);
	bool		in_window = at_null || (at >= ms->since && at < ms->until);
	text	   *t;

	/* the order reference is usually the key itself: no copy then */
	if ((t = COL_TEXT(R_ORDER_REF)) != NULL && !st->order_ref_is_key)
	{
		if (st->order_ref == NULL && key != NULL && text_cmp(t, "") != 0 &&
			VARSIZE_ANY_EXHDR(t) == VARSIZE_ANY_EXHDR(key) &&
			memcmp(VARDATA_ANY(t), VARDATA_ANY(key), VARSIZE_ANY_EXHDR(t)) == 0)
			st->order_ref_is_key = true;
		else
			keep_text(&st->order_ref, t, false, &ms->arena);
	}
	if ((t = COL_TEXT(R_GATEWAY_REF)) != NULL)
		keep_text(&st->gateway_ref, t, false, &ms->arena);
	if ((t = COL_TEXT(R_GATEWAY_PAYMENT_REF)) != NULL)
		keep_text(&st->gateway_payment_ref, t, false, &ms->arena);

	stats.loaded++;
	if (key != NULL)
		stats.keyed++;
	if (!COL_NULL(R_FIN_CURRENCY) && in_window)
	{
		char		code[4];

		copy_currency(code, DatumGetTextPP(slot->tts_values[R_FIN_CURRENCY]));
		add_totals(code, type, COL_NULL(R_FIN_AMOUNT), COL_INT8(R_FIN_AMOUNT, 0),
				   COL_NULL(R_FEE), COL_INT8(R_FEE, 0), COL_NULL(R_NET), COL_INT8(R_NET, 0));
	}

	st->records++;
	if (!COL_NULL(R_LINE))
	{
		int32		line = DatumGetInt32(slot->tts_values[R_LINE]);

		if (st->first_line < 0 || line < st->first_line)
			st->first_line = line;
	}
	if (in_window)
		st->in_window = true;
	if (type != RT_BALANCE && (t = COL_TEXT(R_CURRENCY)) != NULL)
	{
		char		code[4];

		copy_currency(code, t);
		if (!st->currency_set)
		{
			strcpy(st->currency_min, code);
			strcpy(st->currency_max, code);
			st->currency_set = true;
		}
		else if (strcmp(code, st->currency_min) < 0)
			strcpy(st->currency_min, code);
		else if (strcmp(code, st->currency_max) > 0)
			strcpy(st->currency_max, code);
	}
	if (type == RT_CHARGEBACK || status == RS_DISPUTED)
		st->disputed = true;

	switch (type)
	{
		case RT_LINK:
			if (status != RS_NONE && status_better(status, st->link_status))
				st->link_status = status;
			if (!amount_null && (!st->link_amount_set || amount > st->link_amount))
			{
				st->link_amount = amount;
				st->link_amount_set = true;
			}
			break;
		case RT_CHARGE:
			if (!COL_NULL(R_REFUNDED))
			{
				int64		refunded = DatumGetInt64(slot->tts_values[R_REFUNDED]);

				st->refund_known = true;
				if (refunded > st->refunded_cum)
					st->refunded_cum = refunded;
			}
			if (IS_MONEY(status))
			{
				if (!amount_null)
				{
					if (st->paid_count == 0 || amount < st->paid_min)
						st->paid_min = amount;
					if (st->paid_count == 0 || amount > st->paid_max)
						st->paid_max = amount;
					st->paid_total += amount;
				}
				st->paid_count++;
				if (!at_null && (st->paid_at == 0 || at < st->paid_at))
					st->paid_at = at;
				if ((t = COL_TEXT(R_RECORD_REF)) != NULL)
				{
					keep_text(&st->paid_first_ref, t, false, &ms->arena);
					if (st->paid_last_ref == NULL)
						st->paid_last_ref = st->paid_first_ref;
					else
						keep_text(&st->paid_last_ref, t, true, &ms->arena);
				}
			}
			else if (status != RS_NONE && status_better(status, st->charge_status))
				st->charge_status = status;
			break;
		case RT_REFUND:
			if (!amount_null)
				st->refund_sum += amount;
			break;
		default:
			break;
	}
}

/* The DestReceiver the inputs are run into. */
typedef struct MatchReceiver
{
	DestReceiver pub;
	MatchState *ms;
	bool		payments;		/* the payments' SELECT (else records) */
} MatchReceiver;

/*
 * One row: into its order's state, if its key belongs to this pass (rows
 * without a key, which are counted but never reported, go to pass 0).
 * Returns false, which stops the scan, once the table has overflowed.
 */
static bool
match_receive(TupleTableSlot *slot, DestReceiver *self)
{
	MatchReceiver *r = (MatchReceiver *) self;
	MatchState *ms = r->ms;
	MemoryContext old;
	ReconState *st = NULL;
	text	   *key = NULL;

	slot_getallattrs(slot);
	MemoryContextReset(ms->rowcxt);
	old = MemoryContextSwitchTo(ms->rowcxt);
	if (slot->tts_isnull[0])
	{
		if (ms->pass == 0)
			st = &ms->null_state;
	}
	else
	{
		uint32		hash;

		key = DatumGetTextPP(slot->tts_values[0]);
		hash = hash_bytes((const unsigned char *) VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key));
		if (ms->npasses == 1 || (int) (((uint64) hash * ms->npasses) >> 32) == ms->pass)
			st = table_lookup(ms, VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key), hash);
	}
	if (st != NULL)
	{
		if (r->payments)
			add_payment(ms, st, slot);
		else
			add_record(ms, st, slot, key);
	}
	MemoryContextSwitchTo(old);
	return !ms->overflow;
}

static void
match_startup(DestReceiver *self, int operation, TupleDesc typeinfo)
{
}

static void
match_shutdown(DestReceiver *self)
{
}

static void
match_destroy(DestReceiver *self)
{
}

/* The order's gateway view, as crmpay._recon_key. */
static void
emit(ReconState *st, const char *key, int keylen, Tuplestorestate *out, TupleDesc desc)
{
	Datum		values[24];
	bool		nulls[24];
	int			i;

	for (i = 0; i < lengthof(nulls); i++)
		nulls[i] = true;

#define SET(n, d) (values[n] = (d), nulls[n] = false)
#define SET_TEXT(n, s) do { if ((s) != NULL) SET(n, CStringGetTextDatum(s)); } while (0)
	SET(0, PointerGetDatum(cstring_to_text_with_len(key, keylen)));
	SET(1, Int32GetDatum(st->records));
	if (st->first_line >= 0)
		SET(2, Int32GetDatum(st->first_line));
	SET_TEXT(3, st->order_ref);
	SET_TEXT(4, st->gateway_ref);
	SET_TEXT(5, st->gateway_payment_ref);
	if (st->link_status != RS_NONE && st->link_status != RS_OTHER)
		SET_TEXT(6, status_names[st->link_status]);
	if (st->link_amount_set)
		SET(7, Int64GetDatum(st->link_amount));
	if (st->charge_status != RS_NONE && st->charge_status != RS_OTHER)
		SET_TEXT(8, status_names[st->charge_status]);
	SET(9, Int32GetDatum(st->paid_count));
	if (st->paid_count > 0)
	{
		SET(10, Int64GetDatum(st->paid_min));
		SET(11, Int64GetDatum(st->paid_max));
		SET(12, Int64GetDatum(st->paid_total));
	}
	SET_TEXT(13, st->paid_first_ref);
	SET_TEXT(14, st->paid_last_ref);
	if (st->paid_at != 0)
		SET(15, TimestampTzGetDatum(st->paid_at));
	SET(16, Int64GetDatum(Max(st->refunded_cum, st->refund_sum)));
	SET(17, BoolGetDatum(st->refund_known));
	SET(18, BoolGetDatum(st->disputed));
	if (st->currency_set)
	{
		SET_TEXT(19, st->currency_min);
		SET_TEXT(20, st->currency_max);
	}
	SET(21, BoolGetDatum(st->in_window));
	if (st->payments > 0)
		SET(22, Int64GetDatum(st->payment_id));
	SET(23, BoolGetDatum(st->order_ref_is_key));
#undef SET
#undef SET_TEXT
	tuplestore_putvalues(out, desc, values, nulls);
}

/* ----------------------------------------------------------------
 * The inputs: fixed statements (the payments' key column comes from a
 * whitelist), parameters $1 run id, $2 account, $3/$4 the window with its
 * margin.  Run records first, then imported ones, then payments: the order
 * an order's rows are folded in is the order they are scanned in.
 * ----------------------------------------------------------------
 */
#define RECORD_COLUMNS \
	"match_key, record_type, status, amount_minor, currency, refunded_minor, record_ref, order_ref," \
	" gateway_ref, gateway_payment_ref, occurred_at, line_no, fin_currency, fin_amount_minor," \
	" fee_minor, net_minor"

static const char *const run_records_sql =
"SELECT " RECORD_COLUMNS " FROM crmpay.gateway_records WHERE run_id = $1";

static const char *const report_records_sql =
"SELECT " RECORD_COLUMNS " FROM crmpay.gateway_records"
" WHERE import_id IS NOT NULL AND account = $2 AND occurred_at >= $3 AND occurred_at < $4";

#define PAYMENTS_SQL(col) \
	"SELECT " col ", status, amount_minor, currency, refunded_minor, created_at, id FROM crmpay.payments" \
	" WHERE account = $2 AND created_at >= $3 AND created_at < $4"

PG_FUNCTION_INFO_V1(crmpay_recon_candidates);

/*
 * crmpay._recon_candidates(run_id, account, since, until, lo, hi, match_on)
 *		RETURNS SETOF crmpay._recon_key
 *		The orders of the run that are not plainly clean, with their gateway
 *		view (match_key set); resets and fills the totals of _recon_stats().
 *		lo/hi: the window with its margin, for what is read; since/until:
 *		the window proper.
 */
Datum
crmpay_recon_candidates(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	const char *match_on = text_to_cstring(PG_GETARG_TEXT_PP(6));
	const char *sql[3] = {run_records_sql, report_records_sql, NULL};
	Oid			argtypes[4] = {INT8OID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	SPIPlanPtr	plans[3];
	ParamListInfo params;
	SPIExecuteOptions options;
	MatchReceiver receiver;
	MatchState	ms;
	int			q;

	if (strcmp(match_on, "order_ref") == 0)
		sql[2] = PAYMENTS_SQL("order_ref");
	else if (strcmp(match_on, "gateway_ref") == 0)
		sql[2] = PAYMENTS_SQL("gateway_ref");
	else if (strcmp(match_on, "gateway_payment_ref") == 0)
		sql[2] = PAYMENTS_SQL("gateway_payment_ref");
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid match column \"%s\"", match_on),
				 errhint("Use order_ref, gateway_ref or gateway_payment_ref.")));

	InitMaterializedSRF(fcinfo, 0);

	memset(&ms, 0, sizeof(ms));
	ms.since = PG_GETARG_TIMESTAMPTZ(2);
	ms.until = PG_GETARG_TIMESTAMPTZ(3);
	ms.mem_limit = get_hash_memory_limit();
	ms.cxt = AllocSetContextCreate(CurrentMemoryContext, "crmpay reconciliation matching",
								   ALLOCSET_DEFAULT_SIZES);
	ms.rowcxt = AllocSetContextCreate(CurrentMemoryContext, "crmpay reconciliation row",
									  ALLOCSET_SMALL_SIZES);

	params = makeParamList(4);
	params->numParams = 4;
	for (q = 0; q < 4; q++)
	{
		params->params[q].ptype = argtypes[q];
		params->params[q].pflags = PARAM_FLAG_CONST;
		params->params[q].isnull = false;
	}
	params->params[0].value = PG_GETARG_DATUM(0);
	params->params[1].value = PG_GETARG_DATUM(1);
	params->params[2].value = PG_GETARG_DATUM(4);
	params->params[3].value = PG_GETARG_DATUM(5);

	receiver.pub.receiveSlot = match_receive;
	receiver.pub.rStartup = match_startup;
	receiver.pub.rShutdown = match_shutdown;
	receiver.pub.rDestroy = match_destroy;
	receiver.pub.mydest = DestNone;
	receiver.ms = &ms;

	memset(&options, 0, sizeof(options));
	options.params = params;
	options.read_only = true;	/* every pass under the caller's snapshot */
	options.dest = (DestReceiver *) &receiver;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "crmpay: SPI_connect failed");
	for (q = 0; q < 3; q++)
	{
		/*
		 * Planned for these parameter values (a window of a day and one of
		 * a month are best read differently), as EXECUTE ... USING would;
		 * never parallel: an order's rows are folded in scan order.
		 */
		plans[q] = SPI_prepare_cursor(sql[q], 4, argtypes, CURSOR_OPT_CUSTOM_PLAN);
		if (plans[q] == NULL)
			elog(ERROR, "crmpay: SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	}

	ms.npasses = 1;
	for (;;)
	{
		memset(&stats, 0, sizeof(stats));
		for (ms.pass = 0; ms.pass < ms.npasses; ms.pass++)
		{
			uint32		n;

			table_reset(&ms);
			for (q = 0; q < 3 && !ms.overflow; q++)
			{
				int			rc;

				receiver.payments = (q == 2);
				/* (SPI says SPI_OK_UTILITY for rows sent to a DestNone receiver) */
				rc = SPI_execute_plan_extended(plans[q], &options);
				if (rc < 0)
					elog(ERROR, "crmpay: reconciliation input %d failed: %s", q, SPI_result_code_string(rc));
			}
			if (ms.overflow)
				break;
			for (n = 1; n <= ms.nentries; n++)
			{
				ReconEntry *e = entry_at(&ms, n);

				if (!quiet(&e->st))
				{
					MemoryContext old = MemoryContextSwitchTo(ms.rowcxt);

					emit(&e->st, entry_key(e), e->keylen, rsinfo->setResult, rsinfo->setDesc);
					MemoryContextSwitchTo(old);
					MemoryContextReset(ms.rowcxt);
				}
			}
		}
		if (!ms.overflow)
			break;
		/*
		 * Start again, the keys shared out over twice as many passes (how
		 * many orders the window has is only known at the end): at most
		 * twice the passes needed, and less than two passes' worth of
		 * reading lost on the way.
		 */
		elog(DEBUG1, "crmpay: reconciliation matching needs more than %zu kB; starting again in %d passes",
			 ms.mem_limit / 1024, Min(ms.npasses * 2, MAX_PASSES));
		tuplestore_clear(rsinfo->setResult);
		ms.npasses = Min(ms.npasses * 2, MAX_PASSES);
	}
	elog(DEBUG1, "crmpay: reconciliation matching done in %d pass%s", ms.npasses, ms.npasses > 1 ? "es" : "");
	SPI_finish();
	MemoryContextDelete(ms.cxt);
	MemoryContextDelete(ms.rowcxt);
	return (Datum) 0;
}

PG_FUNCTION_INFO_V1(crmpay_recon_stats);

/*
 * crmpay._recon_stats(OUT loaded, OUT keyed, OUT payments_checked,
 *		OUT totals jsonb): what the last matching statement counted.
 *		totals: {"EUR": {"gross", "refunds", "fees", "net", "records"}}.
 */
Datum
crmpay_recon_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};
	StringInfoData buf;
	int			i;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "crmpay._recon_stats must return a record");
	if (stats.overflow)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("the gateway records of this run have more than %d currencies", MAX_TOTAL_CURRENCIES)));
	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	for (i = 0; i < stats.ncurrencies; i++)
	{
		CurrencyTotals *t = &stats.currencies[i];
		bool		first = true;

		if (i > 0)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, t->code);
		appendStringInfoString(&buf, ": {");
#define MEMBER(name, has, v) \
		do { if (has) { appendStringInfo(&buf, "%s\"" name "\": " INT64_FORMAT, first ? "" : ", ", (v)); first = false; } } while (0)
		MEMBER("gross", t->has_gross, t->gross);
		MEMBER("refunds", t->has_refunds, t->refunds);
		MEMBER("fees", t->has_fees, t->fees);
		MEMBER("net", t->has_net, t->net);
		MEMBER("records", true, t->records);
#undef MEMBER
		appendStringInfoChar(&buf, '}');
	}
	appendStringInfoChar(&buf, '}');
	values[0] = Int64GetDatum(stats.loaded);
	values[1] = Int64GetDatum(stats.keyed);
	values[2] = Int64GetDatum(stats.payments_checked);
	values[3] = DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data));
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}
