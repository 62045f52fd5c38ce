/*-------------------------------------------------------------------------
 *
 * reconcile_agg.c
 *	  The set-based heart of reconciliation: crmpay._recon_agg, an
 *	  aggregate over the UNION ALL of a run's gateway records and the
 *	  account's payments, GROUP BY the match key.  One hash table keyed on
 *	  the order gives both sides of every order, as a FULL OUTER JOIN would,
 *	  and one pass folds all records of an order (link, charges, refunds,
 *	  fees) into a small C state.
 *
 *	  The final function returns NULL for an order that is plainly clean
 *	  (the usual case), and the order's gateway view (crmpay._recon_key)
 *	  for the few that need a closer look (_recon_classify, in SQL).  In the
 *	  same pass the transition function counts the records loaded, the
 *	  payments of the window and the gateway's money per currency into
 *	  backend-local totals, read by crmpay._recon_stats() after the
 *	  statement (so no second scan).  The aggregate is parallel-unsafe, so
 *	  all of that happens in this backend, once per input row.
 *
 *-------------------------------------------------------------------------
 */
#include "crmpay.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

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
 * exists per order: a million of them for a million orders) and carved
 * from an arena with its strings, not palloc'd piece by piece.
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
 * The arena: states and their strings come from blocks of the aggregate's
 * memory context; a reset callback forgets the block when the context is
 * reset (a hash aggregate spilling to disk resets it between batches).
 */
static struct
{
	MemoryContext cxt;
	char	   *ptr;
	Size		left;
	Size		next_block;
} arena;

static void
arena_forget(void *arg)
{
	arena.cxt = NULL;
	arena.left = 0;
}

static void *
arena_alloc(MemoryContext cxt, Size size)
{
	void	   *p;

	size = MAXALIGN(size);
	if (arena.cxt != cxt || arena.left < size)
	{
		Size		block;

		if (arena.cxt != cxt)
		{
			MemoryContextCallback *cb = MemoryContextAlloc(cxt, sizeof(MemoryContextCallback));

			cb->func = arena_forget;
			cb->arg = NULL;
			MemoryContextRegisterResetCallback(cxt, cb);
			arena.cxt = cxt;
			arena.next_block = 1024;
		}
		block = Max(arena.next_block, size);
		arena.next_block = Min(arena.next_block * 2, 256 * 1024);
		arena.ptr = MemoryContextAlloc(cxt, block);
		arena.left = block;
	}
	p = arena.ptr;
	arena.ptr += size;
	arena.left -= size;
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
keep_text(char **slot, text *t, bool want_max, MemoryContext cxt)
{
	int			len = VARSIZE_ANY_EXHDR(t);

	if (*slot != NULL)
	{
		int			c = text_cmp(t, *slot);

		if (want_max ? c <= 0 : c >= 0)
			return;
	}
	*slot = arena_alloc(cxt, len + 1);
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

/*
 * The state travels as a tagged pointer: bit 0 set means "nothing to look
 * at (so far)".  internal is a pass-by-value type that the executor never
 * dereferences, and states are MAXALIGNed, so the bit is free; the final
 * function then passes over the clean orders (nearly all of them) without
 * touching their memory, which in hash order would be a cache miss each.
 */
#define QUIET_TAG ((uintptr_t) 1)

static ReconState *
untag(Datum d)
{
	return (ReconState *) (DatumGetPointer(d) - (DatumGetUInt64(d) & QUIET_TAG));
}

static Datum
tagged(ReconState *st)
{
	bool		quiet = st->key_null || plainly_clean(st) ||
		(st->records == 0 && !crm_only_candidate(st));

	return PointerGetDatum((char *) st + (quiet ? QUIET_TAG : 0));
}

/* Argument positions of crmpay._recon_agg (after the state). */
enum
{
	A_KEY = 1, A_SIDE, A_TYPE, A_STATUS, A_AMOUNT, A_CURRENCY, A_REFUNDED, A_RECORD_REF,
	A_ORDER_REF, A_GATEWAY_REF, A_GATEWAY_PAYMENT_REF, A_AT, A_LINE, A_PAYMENT_ID,
	A_FIN_CURRENCY, A_FIN_AMOUNT, A_FEE, A_NET, A_SINCE, A_UNTIL
};

#define ARG_TEXT(n) (PG_ARGISNULL(n) ? NULL : PG_GETARG_TEXT_PP(n))
#define ARG_INT8(n, dflt) (PG_ARGISNULL(n) ? (dflt) : PG_GETARG_INT64(n))

PG_FUNCTION_INFO_V1(crmpay_recon_trans);

/*
 * crmpay._recon_trans(state, key, side, record_type, status, amount,
 *		currency, refunded, record_ref, order_ref, gateway_ref,
 *		gateway_payment_ref, at, line_no, payment_id, fin_currency,
 *		fin_amount, fee, net, since, until)
 *		side 'r': a gateway record; side 'p': a CRM payment (status, amount,
 *		currency, refunded, refs, at = created_at, payment_id).
 */
Datum
crmpay_recon_trans(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	ReconState *st;
	char		side;
	TimestampTz at;
	TimestampTz since;
	TimestampTz until;
	bool		at_null = PG_ARGISNULL(A_AT);
	text	   *t;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "crmpay._recon_trans called outside an aggregate");
	if (PG_ARGISNULL(0))
	{
		st = arena_alloc(aggcxt, sizeof(ReconState));
		memset(st, 0, sizeof(ReconState));
		st->first_line = -1;
		st->key_null = PG_ARGISNULL(A_KEY);
	}
	else
		st = untag(PG_GETARG_DATUM(0));

	side = PG_GETARG_CHAR(A_SIDE);
	at = at_null ? 0 : PG_GETARG_TIMESTAMPTZ(A_AT);
	since = PG_GETARG_TIMESTAMPTZ(A_SINCE);
	until = PG_GETARG_TIMESTAMPTZ(A_UNTIL);

	if ((t = ARG_TEXT(A_ORDER_REF)) != NULL && !st->order_ref_is_key)
	{
		/* the order reference is usually the key itself: no copy then */
		if (st->order_ref == NULL && !st->key_null && text_cmp(t, "") != 0 &&
			VARSIZE_ANY_EXHDR(t) == VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(A_KEY)) &&
			memcmp(VARDATA_ANY(t), VARDATA_ANY(PG_GETARG_TEXT_PP(A_KEY)), VARSIZE_ANY_EXHDR(t)) == 0)
			st->order_ref_is_key = true;
		else
			keep_text(&st->order_ref, t, false, aggcxt);
	}
	if ((t = ARG_TEXT(A_GATEWAY_REF)) != NULL && side == 'r')
		keep_text(&st->gateway_ref, t, false, aggcxt);
	if ((t = ARG_TEXT(A_GATEWAY_PAYMENT_REF)) != NULL && side == 'r')
		keep_text(&st->gateway_payment_ref, t, false, aggcxt);

	if (side == 'p')
	{
		st->payments++;
		if (!at_null && at >= since && at < until)
		{
			st->payments_in_window++;
			stats.payments_checked++;
		}
		st->payment_id = ARG_INT8(A_PAYMENT_ID, 0);
		st->p_status = status_of(ARG_TEXT(A_STATUS));
		st->p_amount = ARG_INT8(A_AMOUNT, 0);
		st->p_refunded = ARG_INT8(A_REFUNDED, 0);
		if ((t = ARG_TEXT(A_CURRENCY)) != NULL)
			copy_currency(st->p_currency, t);
		PG_RETURN_DATUM(tagged(st));
	}

	/* a gateway record */
	{
		RecordType type = record_type_of(PG_GETARG_TEXT_PP(A_TYPE));
		ReconStatus status = status_of(ARG_TEXT(A_STATUS));
		bool		amount_null = PG_ARGISNULL(A_AMOUNT);
		int64		amount = ARG_INT8(A_AMOUNT, 0);
		bool		in_window = at_null || (at >= since && at < until);

		stats.loaded++;
		if (!PG_ARGISNULL(A_KEY))
			stats.keyed++;
		if (!PG_ARGISNULL(A_FIN_CURRENCY) && in_window)
		{
			char		code[4];

			copy_currency(code, PG_GETARG_TEXT_PP(A_FIN_CURRENCY));
			add_totals(code, type, PG_ARGISNULL(A_FIN_AMOUNT), ARG_INT8(A_FIN_AMOUNT, 0),
					   PG_ARGISNULL(A_FEE), ARG_INT8(A_FEE, 0),
					   PG_ARGISNULL(A_NET), ARG_INT8(A_NET, 0));
		}

		st->records++;
		if (!PG_ARGISNULL(A_LINE) && (st->first_line < 0 || PG_GETARG_INT32(A_LINE) < st->first_line))
			st->first_line = PG_GETARG_INT32(A_LINE);
		if (in_window)
			st->in_window = true;
		if (type != RT_BALANCE && (t = ARG_TEXT(A_CURRENCY)) != NULL)
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
				if (!PG_ARGISNULL(A_REFUNDED))
				{
					st->refund_known = true;
					if (PG_GETARG_INT64(A_REFUNDED) > st->refunded_cum)
						st->refunded_cum = PG_GETARG_INT64(A_REFUNDED);
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
					if ((t = ARG_TEXT(A_RECORD_REF)) != NULL)
					{
						keep_text(&st->paid_first_ref, t, false, aggcxt);
						if (st->paid_last_ref == NULL)
							st->paid_last_ref = st->paid_first_ref;
						else
							keep_text(&st->paid_last_ref, t, true, aggcxt);
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
	PG_RETURN_DATUM(tagged(st));
}

PG_FUNCTION_INFO_V1(crmpay_recon_final);

/*
 * crmpay._recon_final(state) RETURNS crmpay._recon_key
 *		NULL for an order that is plainly clean (and for records without a
 *		key); the order's gateway view otherwise.
 */
Datum
crmpay_recon_final(PG_FUNCTION_ARGS)
{
	ReconState *st;
	TupleDesc	desc;
	Datum		values[24];
	bool		nulls[24];
	int			i;

	if (PG_ARGISNULL(0) || (DatumGetUInt64(PG_GETARG_DATUM(0)) & QUIET_TAG))
		PG_RETURN_NULL();
	st = untag(PG_GETARG_DATUM(0));

	if (fcinfo->flinfo->fn_extra == NULL)
	{
		TupleDesc	d;
		MemoryContext old = MemoryContextSwitchTo(fcinfo->flinfo->fn_mcxt);

		if (get_call_result_type(fcinfo, NULL, &d) != TYPEFUNC_COMPOSITE)
			elog(ERROR, "crmpay._recon_final must return a composite type");
		fcinfo->flinfo->fn_extra = BlessTupleDesc(CreateTupleDescCopy(d));
		MemoryContextSwitchTo(old);
	}
	desc = (TupleDesc) fcinfo->flinfo->fn_extra;
	for (i = 0; i < lengthof(nulls); i++)
		nulls[i] = true;

#define SET(n, d) (values[n] = (d), nulls[n] = false)
#define SET_TEXT(n, s) do { if ((s) != NULL) SET(n, CStringGetTextDatum(s)); } while (0)
	/* match_key is filled in by the caller (it is the group key) */
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
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}

PG_FUNCTION_INFO_V1(crmpay_recon_stats_reset);

/* crmpay._recon_stats_reset(): before a matching statement. */
Datum
crmpay_recon_stats_reset(PG_FUNCTION_ARGS)
{
	memset(&stats, 0, sizeof(stats));
	PG_RETURN_VOID();
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
