/*-------------------------------------------------------------------------
 *
 * reports.c
 *	  Gateway report files for reconciliation: the Adyen settlement details
 *	  report and the Redsys back-office ("Canales") operations export, read
 *	  into normalised gateway records (provider.h, CrmpayGatewayRecord).
 *
 *	  Reading is strict, so a report that crmpay might misread is refused
 *	  rather than half-used: every problem is an ERROR that names the line
 *	  (and the column): a cut or malformed file, a column crmpay does not
 *	  know, a currency that is not ISO 4217, an amount or date that does not
 *	  parse, a record type it does not know.  The caller (import_report)
 *	  runs in one statement, so nothing of a refused file is stored.
 *
 *	  Formats (checked against the gateways' documentation and public
 *	  parsers of real files; see gateways.md 4.6 and 5.6):
 *	  - adyen_settlement_details: comma-separated, a header line naming the
 *		columns (any order; Company Account, Merchant Account, Psp Reference,
 *		Merchant Reference, Payment Method, Creation Date, TimeZone, Type,
 *		Modification Reference, Gross Currency, Gross Debit (GC), Gross
 *		Credit (GC), Exchange Rate, Net Currency, Net Debit (NC), Net Credit
 *		(NC), Commission (NC), Markup (NC), Scheme Fees (NC), Interchange
 *		(NC), Payment Method Variant, Modification Merchant Reference, Batch
 *		Number, Reserved4..10 and the documented optional columns).  Amounts
 *		are decimal major units; Creation Date is "YYYY-MM-DD HH:MM:SS" in
 *		the TimeZone column's zone.
 *	  - redsys_operations: semicolon-separated export of "Consulta de
 *		operaciones": Fecha (dd/mm/yyyy, maybe with the time), Hora, Tipo
 *		operación, Cód. pedido (or Número de pedido), Resultado operación y
 *		código ("Autorizada 123456", "Denegada 0190", ...), Importe, Moneda,
 *		and optional columns; Spanish local time (settings.report_timezone,
 *		default Europe/Madrid).  Amounts may use a decimal comma.
 *
 *-------------------------------------------------------------------------
 */
#include "reconcile.h"

#include "executor/spi.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/memutils.h"

#include "csv.h"

/* ----------------------------------------------------------------
 * Currencies (crmpay.currencies), looked up by code or numeric code
 * ----------------------------------------------------------------
 */
typedef struct CurrencyEntry
{
	char		code[4];
	char		numeric[4];
	int			exponent;
} CurrencyEntry;

struct CrmpayCurrencyTable
{
	int			count;
	CurrencyEntry *entries;		/* sorted by code */
	const CurrencyEntry *last;	/* most lines share a currency */
};

/* Loads crmpay.currencies; the caller is connected to SPI. */
CrmpayCurrencyTable *
crmpay_load_currencies(MemoryContext cxt)
{
	CrmpayCurrencyTable *table;
	int			rc;
	uint64		i;

	rc = SPI_execute("SELECT code, numeric_code, exponent FROM crmpay.currencies ORDER BY code",
					 true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "crmpay: reading crmpay.currencies failed: %s", SPI_result_code_string(rc));
	table = MemoryContextAllocZero(cxt, sizeof(CrmpayCurrencyTable));
	table->count = (int) SPI_processed;
	table->entries = MemoryContextAllocZero(cxt, sizeof(CurrencyEntry) * Max(1, table->count));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;

		strlcpy(table->entries[i].code, SPI_getvalue(tuple, desc, 1), 4);
		strlcpy(table->entries[i].numeric, SPI_getvalue(tuple, desc, 2), 4);
		table->entries[i].exponent = pg_strtoint32(SPI_getvalue(tuple, desc, 3));
	}
	return table;
}

/* The currency with this alphabetic (any case) or numeric code, or NULL. */
static const CurrencyEntry *
find_currency(CrmpayCurrencyTable *table, const char *code)
{
	char		upper[4];
	int			lo = 0;
	int			hi = table->count - 1;
	int			i;

	if (strlen(code) != 3)
		return NULL;
	if (table->last && (pg_strcasecmp(table->last->code, code) == 0 ||
						strcmp(table->last->numeric, code) == 0))
		return table->last;
	if (isdigit((unsigned char) code[0]))
	{
		for (i = 0; i < table->count; i++)
			if (strcmp(table->entries[i].numeric, code) == 0)
				return table->last = &table->entries[i];
		return NULL;
	}
	for (i = 0; i < 3; i++)
		upper[i] = pg_ascii_toupper((unsigned char) code[i]);
	upper[3] = '\0';
	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;
		int			c = strcmp(table->entries[mid].code, upper);

		if (c == 0)
			return table->last = &table->entries[mid];
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return NULL;
}

/* ----------------------------------------------------------------
 * Reading lines
 * ----------------------------------------------------------------
 */

/* One data line being read: its number and fields (NUL-terminated). */
typedef struct Line
{
	int			line_no;
	int			nfields;
	char	   *fields[CRMPAY_CSV_MAX_FIELDS];
} Line;

typedef struct ReportColumn
{
	const char *name;			/* normalised header (see normalise_header) */
	int			id;				/* format's field id; -1 = read and ignored */
	bool		required;
} ReportColumn;

/* What a format's columns are, and where they sit in this file. */
typedef struct Layout
{
	int			column_of[64];	/* field id -> column index, -1 absent */
	int			ncolumns;		/* header fields, the trailing empty one
								 * excluded */
	bool		trailing_empty; /* header ends with a delimiter */
} Layout;

/*
 * A header name in a comparable form: ASCII lower case, Spanish accents
 * and the ordinal signs dropped (ó -> o, º -> ""), dots dropped, runs of
 * spaces as one.  "N.º tarjeta", "Nº Tarjeta" -> "n tarjeta".
 */
static char *
normalise_header(const char *s)
{
	StringInfoData buf;
	const unsigned char *p = (const unsigned char *) s;
	bool		space = false;

	initStringInfo(&buf);
	while (*p)
	{
		char		c = 0;

		if (p[0] == 0xC3 && p[1] != 0)
		{
			switch (p[1])
			{
				case 0xA1: case 0x81: c = 'a'; break;
				case 0xA9: case 0x89: c = 'e'; break;
				case 0xAD: case 0x8D: c = 'i'; break;
				case 0xB3: case 0x93: c = 'o'; break;
				case 0xBA: case 0x9A: case 0xBC: case 0x9C: c = 'u'; break;
				case 0xB1: case 0x91: c = 'n'; break;
				default: c = '?'; break;
			}
			p += 2;
		}
		else if (p[0] == 0xC2 && (p[1] == 0xBA || p[1] == 0xAA))
		{
			p += 2;				/* º ª */
			continue;
		}
		else if (p[0] == '.')
		{
			p++;
			continue;
		}
		else if (p[0] == ' ' || p[0] == '\t')
		{
			space = true;
			p++;
			continue;
		}
		else if (p[0] >= 0x80)
		{
			c = '?';
			p++;
		}
		else
			c = pg_ascii_tolower(*p++);
		if (space && buf.len > 0)
			appendStringInfoChar(&buf, ' ');
		space = false;
		appendStringInfoChar(&buf, c);
	}
	return buf.data;
}

/* The list of a format's column names, for hints. */
static char *
column_names(const ReportColumn *defs)
{
	StringInfoData buf;
	int			i;

	initStringInfo(&buf);
	for (i = 0; defs[i].name; i++)
		if (defs[i].id >= 0)
			appendStringInfo(&buf, "%s\"%s\"", buf.len ? ", " : "", defs[i].name);
	return buf.data;
}

/* Copies a field out of the content, unescaped and NUL-terminated. */
static char *
field_text(const CrmpayCsvField *f)
{
	char	   *out = palloc(f->len + 1);
	size_t		n = crmpay_csv_unescape(f, out);

	out[n] = '\0';
	return out;
}

/* Trims spaces in place (reports pad some fields). */
static char *
trim(char *s)
{
	char	   *end;

	while (*s == ' ' || *s == '\t')
		s++;
	end = s + strlen(s);
	while (end > s && (end[-1] == ' ' || end[-1] == '\t'))
		*--end = '\0';
	return s;
}

/*
 * read_header
 *		Maps the header line onto the format's columns; refuses unknown and
 *		duplicate columns and missing required ones.
 */
static void
read_header(CrmpayCsvReader *reader, const char *format, const ReportColumn *defs,
			Layout *layout)
{
	CrmpayCsvField fields[CRMPAY_CSV_MAX_FIELDS];
	int			nfields;
	int			line;
	bool		newline;
	const char *error;
	CrmpayCsvResult res;
	int			i;

	for (i = 0; i < lengthof(layout->column_of); i++)
		layout->column_of[i] = -1;
	do
		res = crmpay_csv_next(reader, fields, &nfields, &line, &newline, &error);
	while (res == CRMPAY_CSV_BLANK);
	if (res == CRMPAY_CSV_END)
		ereport(ERROR,
				(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
				 errmsg("the %s report is empty", format),
				 errhint("Pass the whole file, header line included.")));
	if (res == CRMPAY_CSV_ERROR)
		ereport(ERROR,
				(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
				 errmsg("line %d of the %s report: %s", line, format, error)));

	layout->ncolumns = nfields;
	layout->trailing_empty = false;
	if (nfields > 1 && fields[nfields - 1].len == 0)
	{
		layout->ncolumns = nfields - 1;
		layout->trailing_empty = true;
	}
	for (i = 0; i < layout->ncolumns; i++)
	{
		char	   *raw = trim(field_text(&fields[i]));
		char	   *name = normalise_header(raw);
		int			d;

		/* a UTF-8 byte order mark before the first name */
		if (i == 0 && strncmp(raw, "\xEF\xBB\xBF", 3) == 0)
			name = normalise_header(trim(raw + 3));
		for (d = 0; defs[d].name; d++)
			if (strcmp(defs[d].name, name) == 0)
				break;
		if (defs[d].name == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
					 errmsg("line %d of the %s report: unknown column \"%s\" (column %d)",
							line, format, raw, i + 1),
					 errdetail("crmpay reads these columns: %s.", column_names(defs)),
					 errhint("Check that the format is right for this file; remove columns crmpay does not know from the export.")));
		if (defs[d].id >= 0)
		{
			if (layout->column_of[defs[d].id] >= 0)
				ereport(ERROR,
						(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
						 errmsg("line %d of the %s report: column \"%s\" appears twice", line, format, raw)));
			layout->column_of[defs[d].id] = i;
		}
	}
	for (i = 0; defs[i].name; i++)
		if (defs[i].required && defs[i].id >= 0 && layout->column_of[defs[i].id] < 0)
			ereport(ERROR,
					(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
					 errmsg("line %d of the %s report: required column \"%s\" is missing",
							line, format, defs[i].name),
					 errhint("Is this file in the %s format? Its first line must name the columns.", format)));
}

/*
 * next_line
 *		Reads the next data line; false at the end.  Refuses a line whose
 *		field count differs from the header's (the usual sign of a file cut
 *		short or of an unquoted delimiter).
 */
static bool
next_line(CrmpayCsvReader *reader, const char *format, const Layout *layout,
		  Line *out)
{
	CrmpayCsvField fields[CRMPAY_CSV_MAX_FIELDS];
	int			nfields;
	bool		newline;
	const char *error;
	CrmpayCsvResult res;
	int			i;
	int			expected = layout->ncolumns + (layout->trailing_empty ? 1 : 0);

	do
		res = crmpay_csv_next(reader, fields, &nfields, &out->line_no, &newline, &error);
	while (res == CRMPAY_CSV_BLANK);
	if (res == CRMPAY_CSV_END)
		return false;
	if (res == CRMPAY_CSV_ERROR)
		ereport(ERROR,
				(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
				 errmsg("line %d of the %s report: %s", out->line_no, format, error)));
	if (nfields != expected)
	{
		bool		cut = (nfields < expected && !newline && reader->pos >= reader->len);

		ereport(ERROR,
				(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
				 errmsg("line %d of the %s report %s: it has %d fields, the header has %d",
						out->line_no, format, cut ? "is cut short" : "does not fit the header",
						nfields, expected),
				 cut ? errhint("The file seems truncated; download or export it again.")
				 : errhint("A field containing the delimiter must be quoted.")));
	}
	if (layout->trailing_empty && fields[nfields - 1].len != 0)
		ereport(ERROR,
				(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
				 errmsg("line %d of the %s report has a value in the unnamed last column",
						out->line_no, format)));
	out->nfields = layout->ncolumns;
	for (i = 0; i < layout->ncolumns; i++)
		out->fields[i] = trim(field_text(&fields[i]));
	return true;
}

/* The value of a field id on this line ("" when the column is absent). */
static char *
value(const Layout *layout, const Line *line, int id)
{
	int			col = layout->column_of[id];

	return col >= 0 ? line->fields[col] : "";
}

static void bad_value(const char *format, const Line *line, const char *column,
					  const char *value, const char *what, const char *expected,
					  int sqlstate) pg_attribute_noreturn();

/* "line N of the X report: invalid date "..." in column "..."" */
static void
bad_value(const char *format, const Line *line, const char *column,
		  const char *value, const char *what, const char *expected, int sqlstate)
{
	ereport(ERROR,
			(errcode(sqlstate),
			 errmsg("line %d of the %s report: invalid %s \"%s\" in column \"%s\"",
					line->line_no, format, what, value, column),
			 expected ? errdetail("Expected %s.", expected) : 0));
}

/* A currency code that must be in crmpay.currencies. */
static const CurrencyEntry *
currency_value(CrmpayCurrencyTable *currencies, const char *format,
			   const Line *line, const char *column, const char *code)
{
	const CurrencyEntry *c = find_currency(currencies, code);

	if (c == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("line %d of the %s report: unknown currency \"%s\" in column \"%s\"",
						line->line_no, format, code, column),
				 errhint("crmpay.currencies lists the ISO 4217 currencies.")));
	return c;
}

/*
 * An amount in minor units; CRMPAY_NO_AMOUNT for an empty field.  Reports
 * use decimal major units; comma_ok also takes a decimal comma and
 * thousands separators (Spanish exports).
 */
static int64
amount_value(const char *format, const Line *line, const char *column,
			 const char *text, const CurrencyEntry *currency, bool comma_ok)
{
	int64		v;
	char		decimal_sep = '.';
	char		group_sep = 0;
	const char *lastdot = strrchr(text, '.');
	const char *lastcomma = strrchr(text, ',');

	if (text[0] == '\0')
		return CRMPAY_NO_AMOUNT;
	if (currency == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
				 errmsg("line %d of the %s report: an amount in column \"%s\" has no currency",
						line->line_no, format, column)));
	if (comma_ok)
	{
		if (lastcomma && (!lastdot || lastcomma > lastdot))
		{
			decimal_sep = ',';
			group_sep = lastdot ? '.' : 0;
		}
		else if (lastcomma)
			group_sep = ',';
	}
	if (!crmpay_parse_decimal_minor(text, strlen(text), currency->exponent,
									decimal_sep, group_sep, (int64_t *) &v))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("line %d of the %s report: amount \"%s\" in column \"%s\" does not parse",
						line->line_no, format, text, column),
				 errdetail("Expected a decimal number of %s with at most %d decimals.",
						   currency->code, currency->exponent)));
	return v;
}

/* Fills *tm if y-m-d H:M:S is a real date and time. */
static bool
valid_tm(int y, int mo, int d, int h, int mi, int s, struct pg_tm *tm)
{
	memset(tm, 0, sizeof(*tm));
	if (y < 1970 || y > 9999 || mo < 1 || mo > 12 || d < 1 ||
		d > day_tab[isleap(y)][mo - 1] || h > 23 || mi > 59 || s > 59)
		return false;
	tm->tm_year = y;
	tm->tm_mon = mo;
	tm->tm_mday = d;
	tm->tm_hour = h;
	tm->tm_min = mi;
	tm->tm_sec = s;
	return true;
}

/*
 * crmpay_local_timestamp
 *		The instant of a wall-clock date and time in zone tz (Redsys gives its
 *		times in Spanish local time); false if it is not a real date and time
 *		or is out of range.
 */
bool
crmpay_local_timestamp(int y, int mo, int d, int h, int mi, int s, pg_tz *tz,
					   TimestampTz *result)
{
	struct pg_tm tm;
	int			tzoff;

	if (!valid_tm(y, mo, d, h, mi, s, &tm) || h < 0 || mi < 0 || s < 0)
		return false;
	tzoff = DetermineTimeZoneOffset(&tm, tz);
	return tm2timestamp(&tm, 0, &tzoff, result) == 0;
}

/* Reads exactly n digits at *p. */
static bool
digits(const char **p, int n, int *out)
{
	int			v = 0;

	while (n-- > 0)
	{
		if (!isdigit((unsigned char) **p))
			return false;
		v = v * 10 + (*(*p)++ - '0');
	}
	*out = v;
	return true;
}

/* ----------------------------------------------------------------
 * Adyen settlement details report
 * ----------------------------------------------------------------
 */
enum
{
	A_COMPANY, A_MERCHANT, A_PSP, A_MREF, A_PMETHOD, A_CDATE, A_TZ, A_TYPE,
	A_MODREF, A_GCUR, A_GDEBIT, A_GCREDIT, A_XRATE, A_NCUR, A_NDEBIT,
	A_NCREDIT, A_COMMISSION, A_MARKUP, A_SCHEME, A_INTERCHANGE, A_PMVARIANT,
	A_MODMREF, A_BATCH, A_PAYFEES, A_DCCMARKUP
};

static const ReportColumn adyen_columns[] = {
	{"company account", A_COMPANY, false},
	{"merchant account", A_MERCHANT, false},
	{"psp reference", A_PSP, true},
	{"merchant reference", A_MREF, true},
	{"payment method", A_PMETHOD, false},
	{"creation date", A_CDATE, true},
	{"timezone", A_TZ, true},
	{"type", A_TYPE, true},
	{"modification reference", A_MODREF, true},
	{"gross currency", A_GCUR, true},
	{"gross debit (gc)", A_GDEBIT, true},
	{"gross credit (gc)", A_GCREDIT, true},
	{"exchange rate", A_XRATE, false},
	{"net currency", A_NCUR, true},
	{"net debit (nc)", A_NDEBIT, true},
	{"net credit (nc)", A_NCREDIT, true},
	{"commission (nc)", A_COMMISSION, false},
	{"markup (nc)", A_MARKUP, false},
	{"scheme fees (nc)", A_SCHEME, false},
	{"interchange (nc)", A_INTERCHANGE, false},
	{"payment method variant", A_PMVARIANT, false},
	{"modification merchant reference", A_MODMREF, false},
	{"batch number", A_BATCH, false},
	{"payment fees (nc)", A_PAYFEES, false},
	{"dcc markup (nc)", A_DCCMARKUP, false},
	/* documented optional columns crmpay reads past */
	{"surcharge amount", -1, false},
	{"merchant order reference", -1, false},
	{"creation date (ams)", -1, false},
	{"store", -1, false},
	{"acquirer", -1, false},
	{"reserved1", -1, false}, {"reserved2", -1, false}, {"reserved3", -1, false},
	{"reserved4", -1, false}, {"reserved5", -1, false}, {"reserved6", -1, false},
	{"reserved7", -1, false}, {"reserved8", -1, false}, {"reserved9", -1, false},
	{"reserved10", -1, false},
	{NULL, 0, false}
};

/* Record types of the report ("Type" column) and what crmpay makes of them. */
typedef enum AdyenKind
{
	AK_CHARGE, AK_REFUND, AK_CHARGEBACK, AK_FEE, AK_NET, AK_TRANSFER
} AdyenKind;

static const struct
{
	const char *type;
	AdyenKind	kind;
}			adyen_types[] = {
	{"Settled", AK_CHARGE},
	{"SettledBulk", AK_CHARGE},
	{"Refunded", AK_REFUND},
	{"RefundedBulk", AK_REFUND},
	{"Chargeback", AK_CHARGEBACK},
	{"SecondChargeback", AK_CHARGEBACK},
	{"ChargebackReversed", AK_NET},
	{"RefundedReversed", AK_NET},
	{"Fee", AK_FEE},
	{"MiscCosts", AK_FEE},
	{"PaymentCost", AK_FEE},
	{"InvoiceDeduction", AK_FEE},
	{"DepositCorrection", AK_NET},
	{"ManualCorrected", AK_NET},
	{"MatchedStatement", AK_NET},
	{"BankInstructionReturned", AK_NET},
	{"EpaPaid", AK_NET},
	{"MerchantPayout", AK_TRANSFER},
	{"Balancetransfer", AK_TRANSFER},
	{"PaidOut", AK_TRANSFER},
	{"PaidOutReversed", AK_TRANSFER},
};

/*
 * Creation Date "YYYY-MM-DD HH:MM:SS" in the zone of the TimeZone column: a
 * time zone abbreviation (CET, CEST, BST, UTC...) or a full zone name.
 */
static TimestampTz
adyen_time(const char *format, const Line *line, const char *date, const char *zone)
{
	const char *p = date;
	int			y,
				mo,
				d,
				h,
				mi,
				s;
	struct pg_tm tm;
	char		lower[64];
	int			offset;
	pg_tz	   *tz = NULL;
	int			type;
	int			tzoff;
	int			i;
	TimestampTz result;

	if (!(digits(&p, 4, &y) && *p++ == '-' && digits(&p, 2, &mo) && *p++ == '-' &&
		  digits(&p, 2, &d) && *p++ == ' ' && digits(&p, 2, &h) && *p++ == ':' &&
		  digits(&p, 2, &mi) && *p++ == ':' && digits(&p, 2, &s) && *p == '\0') ||
		!valid_tm(y, mo, d, h, mi, s, &tm))
		bad_value(format, line, "Creation Date", date, "date", "YYYY-MM-DD HH:MM:SS",
				  ERRCODE_INVALID_DATETIME_FORMAT);
	if (zone[0] == '\0' || strlen(zone) >= sizeof(lower))
		bad_value(format, line, "TimeZone", zone, "time zone", "an abbreviation such as CET or a zone name",
				  ERRCODE_INVALID_DATETIME_FORMAT);
	for (i = 0; zone[i]; i++)
		lower[i] = pg_ascii_tolower((unsigned char) zone[i]);
	lower[i] = '\0';
	type = DecodeTimezoneAbbrev(0, lower, &offset, &tz);
	if (type == TZ || type == DTZ)
		tzoff = -offset;
	else if (type == DYNTZ)
		tzoff = DetermineTimeZoneAbbrevOffset(&tm, zone, tz);
	else
	{
		tz = strchr(zone, '/') ? pg_tzset(zone) : NULL;
		if (tz == NULL)
			bad_value(format, line, "TimeZone", zone, "time zone", "an abbreviation such as CET or a zone name",
					  ERRCODE_INVALID_DATETIME_FORMAT);
		tzoff = DetermineTimeZoneOffset(&tm, tz);
	}
	if (tm2timestamp(&tm, 0, &tzoff, &result) != 0)
		bad_value(format, line, "Creation Date", date, "date", NULL, ERRCODE_DATETIME_VALUE_OUT_OF_RANGE);
	return result;
}

static char *
nonempty(const char *s)
{
	return s[0] ? pstrdup(s) : NULL;
}

/* Adds an optional fee column (NC) to *fee. */
static void
add_fee(const char *format, const Layout *layout, const Line *line, int id,
		const char *column, const CurrencyEntry *ncur, int64 *fee, bool *any)
{
	int64		v = amount_value(format, line, column, value(layout, line, id), ncur, false);

	if (v != CRMPAY_NO_AMOUNT)
	{
		*fee += v;
		*any = true;
	}
}

static void
adyen_line(const Layout *layout, const Line *line, CrmpayCurrencyTable *currencies,
		   CrmpayGatewayRecord *rec)
{
	const char *format = "adyen_settlement_details";
	const char *type = value(layout, line, A_TYPE);
	const char *gcur_text = value(layout, line, A_GCUR);
	const char *ncur_text = value(layout, line, A_NCUR);
	const CurrencyEntry *gcur = NULL;
	const CurrencyEntry *ncur = NULL;
	int64		gdebit,
				gcredit,
				ndebit,
				ncredit;
	int64		fee = 0;
	bool		fee_any = false;
	int64		net = CRMPAY_NO_AMOUNT;
	AdyenKind	kind = AK_NET;
	int			i;
	bool		known = false;
	const char *psp = value(layout, line, A_PSP);
	const char *modref = value(layout, line, A_MODREF);

	for (i = 0; i < lengthof(adyen_types); i++)
		if (strcmp(adyen_types[i].type, type) == 0)
		{
			kind = adyen_types[i].kind;
			known = true;
			break;
		}
	if (!known)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("line %d of the %s report: unknown record type \"%s\" in column \"Type\"",
						line->line_no, format, type),
				 errhint("crmpay knows Settled, Refunded, Chargeback, SecondChargeback, ChargebackReversed, RefundedReversed, Fee, MiscCosts, PaymentCost, InvoiceDeduction, DepositCorrection, ManualCorrected, MatchedStatement, BankInstructionReturned, EpaPaid, MerchantPayout, Balancetransfer, PaidOut and PaidOutReversed.")));

	if (gcur_text[0])
		gcur = currency_value(currencies, format, line, "Gross Currency", gcur_text);
	if (ncur_text[0])
		ncur = currency_value(currencies, format, line, "Net Currency", ncur_text);
	gdebit = amount_value(format, line, "Gross Debit (GC)", value(layout, line, A_GDEBIT), gcur, false);
	gcredit = amount_value(format, line, "Gross Credit (GC)", value(layout, line, A_GCREDIT), gcur, false);
	ndebit = amount_value(format, line, "Net Debit (NC)", value(layout, line, A_NDEBIT), ncur, false);
	ncredit = amount_value(format, line, "Net Credit (NC)", value(layout, line, A_NCREDIT), ncur, false);
	add_fee(format, layout, line, A_COMMISSION, "Commission (NC)", ncur, &fee, &fee_any);
	add_fee(format, layout, line, A_MARKUP, "Markup (NC)", ncur, &fee, &fee_any);
	add_fee(format, layout, line, A_SCHEME, "Scheme Fees (NC)", ncur, &fee, &fee_any);
	add_fee(format, layout, line, A_INTERCHANGE, "Interchange (NC)", ncur, &fee, &fee_any);
	add_fee(format, layout, line, A_PAYFEES, "Payment Fees (NC)", ncur, &fee, &fee_any);
	add_fee(format, layout, line, A_DCCMARKUP, "DCC Markup (NC)", ncur, &fee, &fee_any);
	if (ndebit != CRMPAY_NO_AMOUNT || ncredit != CRMPAY_NO_AMOUNT)
		net = (ncredit == CRMPAY_NO_AMOUNT ? 0 : ncredit) - (ndebit == CRMPAY_NO_AMOUNT ? 0 : ndebit);

	rec->line_no = line->line_no;
	rec->occurred_at = adyen_time(format, line, value(layout, line, A_CDATE), value(layout, line, A_TZ));
	rec->gateway_status = pstrdup(type);
	rec->gateway_payment_ref = nonempty(psp);

	if (kind == AK_CHARGE || kind == AK_REFUND || kind == AK_CHARGEBACK)
	{
		const char *mref = value(layout, line, A_MREF);
		int64		gross;

		if (psp[0] == '\0' || mref[0] == '\0')
			ereport(ERROR,
					(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
					 errmsg("line %d of the %s report: a %s record needs a Psp Reference and a Merchant Reference",
							line->line_no, format, type)));
		if (gcur == NULL || (gdebit == CRMPAY_NO_AMOUNT && gcredit == CRMPAY_NO_AMOUNT))
			ereport(ERROR,
					(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
					 errmsg("line %d of the %s report: a %s record needs a gross amount and currency",
							line->line_no, format, type)));
		gross = (gcredit == CRMPAY_NO_AMOUNT ? 0 : gcredit) - (gdebit == CRMPAY_NO_AMOUNT ? 0 : gdebit);
		rec->record_type = kind == AK_CHARGE ? "charge" : kind == AK_REFUND ? "refund" : "chargeback";
		rec->status = kind == AK_CHARGE ? "paid" : kind == AK_CHARGEBACK ? "disputed" : NULL;
		rec->match_key = pstrdup(mref);
		rec->order_ref = pstrdup(mref);
		rec->amount_minor = kind == AK_CHARGE ? gross : -gross;
		rec->currency = pstrdup(gcur->code);
		rec->record_ref = psprintf("%s:%s", type, modref[0] ? modref : psp);
	}
	else
	{
		rec->record_type = "other";
		rec->record_ref = psprintf("%s:%s:%s:%s:%s", type, modref, psp,
								   value(layout, line, A_CDATE), value(layout, line, A_BATCH));
		if (gcur)
			rec->currency = pstrdup(gcur->code);
	}

	/* the bookkeeping view, in the net currency */
	if (ncur != NULL && kind != AK_TRANSFER)
	{
		rec->fin_currency = pstrdup(ncur->code);
		rec->net_minor = net == CRMPAY_NO_AMOUNT ? 0 : net;
		if (kind == AK_FEE)
		{
			rec->fee_minor = -rec->net_minor;
		}
		else
		{
			rec->fee_minor = fee_any ? fee : 0;
			if (kind != AK_NET)
				rec->fin_amount_minor = rec->net_minor + rec->fee_minor;
		}
	}
}

/* ----------------------------------------------------------------
 * Redsys operations export (Canales, "Consulta de operaciones")
 * ----------------------------------------------------------------
 */
enum
{
	R_FECHA, R_HORA, R_TIPO, R_PEDIDO, R_RESULTADO, R_IMPORTE, R_MONEDA,
	R_IMPORTE_EUROS, R_IMPORTE_NETO
};

static const ReportColumn redsys_columns[] = {
	{"fecha", R_FECHA, true},
	{"hora", R_HORA, false},
	{"tipo operacion", R_TIPO, true},
	{"cod pedido", R_PEDIDO, false},
	{"numero de pedido", R_PEDIDO, false},
	{"n pedido", R_PEDIDO, false},
	{"resultado operacion y codigo", R_RESULTADO, true},
	{"importe", R_IMPORTE, true},
	{"moneda", R_MONEDA, false},
	{"importe euros", R_IMPORTE_EUROS, false},
	{"importe neto", R_IMPORTE_NETO, false},
	{"tipo de pago", -1, false},
	{"tipo pago original", -1, false},
	{"n tarjeta", -1, false},
	{"titular", -1, false},
	{"n de terminal", -1, false},
	{"terminal", -1, false},
	{"cierre de sesion", -1, false},
	{"n de comercio", -1, false},
	{"comercio", -1, false},
	{NULL, 0, false}
};

/* Fecha (dd/mm/yyyy[ HH:MM[:SS]]) and Hora (HH:MM[:SS]) in Spanish time. */
static TimestampTz
redsys_time(const char *format, const Line *line, const char *date, const char *time, pg_tz *tz)
{
	const char *p = date;
	int			d,
				mo,
				y,
				h = 0,
				mi = 0,
				s = 0;
	struct pg_tm tm;
	int			tzoff;
	TimestampTz result;
	const char *t;
	const char *column = "Hora";

	if (!(digits(&p, 2, &d) && *p++ == '/' && digits(&p, 2, &mo) && *p++ == '/' && digits(&p, 4, &y)) ||
		(*p != '\0' && *p != ' ') || !valid_tm(y, mo, d, 0, 0, 0, &tm))
		bad_value(format, line, "Fecha", date, "date", "dd/mm/yyyy", ERRCODE_INVALID_DATETIME_FORMAT);
	t = time;
	if (*p == ' ')
	{
		t = p + 1;
		column = "Fecha";
	}
	if (t[0] != '\0')
	{
		const char *q = t;

		if (!(digits(&q, 2, &h) && *q++ == ':' && digits(&q, 2, &mi) &&
			  (*q == '\0' || (*q++ == ':' && digits(&q, 2, &s) && *q == '\0'))) ||
			!valid_tm(y, mo, d, h, mi, s, &tm))
			bad_value(format, line, column, t, "time", "HH:MM:SS", ERRCODE_INVALID_DATETIME_FORMAT);
	}
	tzoff = DetermineTimeZoneOffset(&tm, tz);
	if (tm2timestamp(&tm, 0, &tzoff, &result) != 0)
		bad_value(format, line, "Fecha", date, "date", NULL, ERRCODE_DATETIME_VALUE_OUT_OF_RANGE);
	return result;
}

/* Lower-case, accent-free words of a value ("Autorización" -> "autorizacion"). */
static char *
plain(const char *s)
{
	return normalise_header(s);
}

static void
redsys_line(const Layout *layout, const Line *line, CrmpayCurrencyTable *currencies,
			pg_tz *tz, CrmpayGatewayRecord *rec)
{
	const char *format = "redsys_operations";
	const char *order = value(layout, line, R_PEDIDO);
	const char *tipo_raw = value(layout, line, R_TIPO);
	const char *result_raw = value(layout, line, R_RESULTADO);
	char	   *tipo = plain(tipo_raw);
	char	   *result = plain(result_raw);
	const char *moneda = value(layout, line, R_MONEDA);
	const CurrencyEntry *cur;
	int64		amount;
	const char *outcome;		/* paid, failed, canceled, open, processing */
	enum
	{
		OP_CHARGE, OP_PREAUTH, OP_CONFIRM, OP_REFUND, OP_VOID
	}			op;

	if (order[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
				 errmsg("line %d of the %s report has no order number", line->line_no, format)));

	if (strcmp(tipo, "autorizacion") == 0 || strcmp(tipo, "pago") == 0 ||
		strcmp(tipo, "autorizacion diferida") == 0)
		op = OP_CHARGE;
	else if (strcmp(tipo, "preautorizacion") == 0)
		op = OP_PREAUTH;
	else if (strcmp(tipo, "confirmacion de preautorizacion") == 0 || strcmp(tipo, "confirmacion") == 0 ||
			 strcmp(tipo, "confirmacion de autorizacion diferida") == 0)
		op = OP_CONFIRM;
	else if (strcmp(tipo, "devolucion") == 0 || strcmp(tipo, "devolucion parcial") == 0)
		op = OP_REFUND;
	else if (strncmp(tipo, "anulacion", 9) == 0)
		op = OP_VOID;
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("line %d of the %s report: unknown operation type \"%s\" in column \"Tipo operación\"",
						line->line_no, format, tipo_raw),
				 errhint("crmpay knows Autorización, Pago, Preautorización, Confirmación (de preautorización), Devolución and Anulación.")));

	if (strncmp(result, "autorizada", 10) == 0)
		outcome = "paid";
	else if (strncmp(result, "denegada", 8) == 0)
		outcome = "failed";
	else if (strncmp(result, "cancelada", 9) == 0 || strncmp(result, "anulada", 7) == 0)
		outcome = "canceled";
	else if (strncmp(result, "sin finalizar", 13) == 0)
		outcome = "open";
	else if (strncmp(result, "pendiente", 9) == 0)
		outcome = "processing";
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("line %d of the %s report: unknown result \"%s\" in column \"Resultado operación y código\"",
						line->line_no, format, result_raw),
				 errhint("crmpay knows Autorizada, Denegada, Cancelada, Anulada, Sin finalizar and Pendiente.")));

	cur = currency_value(currencies, format, line, "Moneda", moneda[0] ? moneda : "EUR");
	amount = amount_value(format, line, "Importe", value(layout, line, R_IMPORTE), cur, true);
	if (amount == CRMPAY_NO_AMOUNT || amount < 0)
		bad_value(format, line, "Importe", value(layout, line, R_IMPORTE), "amount",
				  "a positive amount", ERRCODE_INVALID_TEXT_REPRESENTATION);

	rec->line_no = line->line_no;
	rec->occurred_at = redsys_time(format, line, value(layout, line, R_FECHA), value(layout, line, R_HORA), tz);
	rec->match_key = pstrdup(order);
	rec->gateway_ref = pstrdup(order);
	rec->gateway_status = psprintf("%s: %s", tipo_raw, result_raw);
	rec->record_ref = psprintf("%s|%s|%s|%s %s", order, tipo, result, value(layout, line, R_FECHA),
							   value(layout, line, R_HORA));
	rec->amount_minor = amount;
	rec->currency = pstrdup(cur->code);

	if (op == OP_REFUND)
	{
		if (strcmp(outcome, "paid") == 0)
		{
			rec->record_type = "refund";
			rec->fin_currency = pstrdup(cur->code);
			rec->fin_amount_minor = -amount;
		}
		else
			rec->record_type = "other";
		return;
	}
	rec->record_type = "charge";
	if (op == OP_VOID)
		rec->status = strcmp(outcome, "paid") == 0 ? "canceled" : NULL;
	else if (op == OP_PREAUTH && strcmp(outcome, "paid") == 0)
		rec->status = "processing";
	else
		rec->status = outcome;
	if (rec->status == NULL)
		rec->record_type = "other";
	if (rec->status && strcmp(rec->status, "paid") == 0)
	{
		rec->fin_currency = pstrdup(cur->code);
		rec->fin_amount_minor = amount;
	}
}

/* ----------------------------------------------------------------
 * Entry points
 * ----------------------------------------------------------------
 */
typedef struct FormatDef
{
	const char *name;
	const char *alias;
	const char *provider;
	char		delimiter;
	const ReportColumn *columns;
} FormatDef;

static const FormatDef formats[] = {
	{"adyen_settlement_details", "adyen_settlement", "adyen", ',', adyen_columns},
	{"redsys_operations", "redsys_csv", "redsys", ';', redsys_columns},
};

/* The canonical name of a report format for a provider; ERROR if none. */
const char *
crmpay_report_format(const char *format, const char *provider)
{
	int			i;

	if (format == NULL)
	{
		for (i = 0; i < lengthof(formats); i++)
			if (strcmp(formats[i].provider, provider) == 0)
				return formats[i].name;
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("crmpay reads no report format of provider \"%s\"", provider),
				 errhint("Formats: adyen_settlement_details (Adyen), redsys_operations (Redsys).")));
	}
	for (i = 0; i < lengthof(formats); i++)
		if (strcmp(formats[i].name, format) == 0 || strcmp(formats[i].alias, format) == 0)
		{
			if (strcmp(formats[i].provider, provider) != 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("a %s report cannot be imported into an account of provider %s",
								formats[i].name, provider)));
			return formats[i].name;
		}
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown report format \"%s\"", format),
			 errhint("Formats: adyen_settlement_details (Adyen), redsys_operations (Redsys).")));
	pg_unreachable();
}

/*
 * crmpay_read_report
 *		Reads a whole report, handing each record to emit() as it goes
 *		(the caller stores them in batches).  Records and the line they came
 *		from are allocated in a context that is reset every batch_lines
 *		lines, after emit has had them; ERROR on the first bad line.
 *		Returns the number of data lines.
 */
int
crmpay_read_report(const char *format, const CrmpayAccount *account,
				   const char *content, size_t len,
				   CrmpayCurrencyTable *currencies,
				   void (*emit) (CrmpayGatewayRecord *record, void *arg),
				   void (*flush) (void *arg), void *arg, int batch_lines)
{
	const FormatDef *def = NULL;
	CrmpayCsvReader reader;
	Layout		layout;
	Line		line;
	int			lines = 0;
	int			i;
	pg_tz	   *tz = NULL;
	MemoryContext linecxt;
	MemoryContext oldcxt;

	for (i = 0; i < lengthof(formats); i++)
		if (strcmp(formats[i].name, format) == 0)
			def = &formats[i];
	if (def == NULL)
		elog(ERROR, "crmpay: no report format %s", format);
	if (strcmp(def->provider, "redsys") == 0)
	{
		const char *zone = crmpay_setting(account, "report_timezone");

		tz = pg_tzset(zone ? zone : "Europe/Madrid");
		if (tz == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown time zone \"%s\" in settings.report_timezone of account \"%s\"",
							zone, account->name)));
	}

	crmpay_csv_init(&reader, content, len, def->delimiter);
	read_header(&reader, def->name, def->columns, &layout);

	linecxt = AllocSetContextCreate(CurrentMemoryContext, "crmpay report lines",
									ALLOCSET_DEFAULT_SIZES);
	oldcxt = MemoryContextSwitchTo(linecxt);
	while (next_line(&reader, def->name, &layout, &line))
	{
		CrmpayGatewayRecord *rec = crmpay_new_record(NULL);

		if (def->columns == adyen_columns)
			adyen_line(&layout, &line, currencies, rec);
		else
			redsys_line(&layout, &line, currencies, tz, rec);
		MemoryContextSwitchTo(oldcxt);
		emit(rec, arg);
		lines++;
		if (lines % batch_lines == 0)
		{
			flush(arg);
			MemoryContextReset(linecxt);
		}
		MemoryContextSwitchTo(linecxt);
	}
	MemoryContextSwitchTo(oldcxt);
	flush(arg);
	MemoryContextDelete(linecxt);
	return lines;
}
