/*-------------------------------------------------------------------------
 *
 * csv.c
 *	  Pure C CSV tokenizer and decimal parser for gateway reports.  See
 *	  csv.h.  No allocation, no PostgreSQL dependency; every function is
 *	  bounded by the lengths it is given.
 *
 *	  The tokenizer is strict RFC 4180: a field is either unquoted (no
 *	  quote characters in it) or entirely quoted, with "" for a quote;
 *	  quoted fields may span lines.  Records end at LF, CRLF or CR.
 *
 *-------------------------------------------------------------------------
 */
#include "csv.h"

#include <string.h>

void
crmpay_csv_init(CrmpayCsvReader *reader, const char *src, size_t len,
				char delimiter)
{
	reader->src = src;
	reader->len = len;
	reader->pos = 0;
	reader->delimiter = delimiter;
	reader->line = 1;
}

/* Consumes a line break at pos (LF, CRLF or CR); true if there was one. */
static bool
eat_newline(CrmpayCsvReader *r)
{
	if (r->pos >= r->len)
		return false;
	if (r->src[r->pos] == '\n')
	{
		r->pos++;
		r->line++;
		return true;
	}
	if (r->src[r->pos] == '\r')
	{
		r->pos++;
		if (r->pos < r->len && r->src[r->pos] == '\n')
			r->pos++;
		r->line++;
		return true;
	}
	return false;
}

/*
 * crmpay_csv_next
 *		Reads the next record into fields[0..*nfields-1] (at most
 *		CRMPAY_CSV_MAX_FIELDS).  *record_line is the line the record starts
 *		on; *ended_with_newline tells a complete last line from a cut one.
 */
CrmpayCsvResult
crmpay_csv_next(CrmpayCsvReader *r, CrmpayCsvField *fields, int *nfields,
				int *record_line, bool *ended_with_newline, const char **error)
{
	int			n = 0;

	*nfields = 0;
	*error = NULL;
	*ended_with_newline = false;
	*record_line = r->line;
	if (r->pos >= r->len)
		return CRMPAY_CSV_END;
	if (eat_newline(r))
	{
		*ended_with_newline = true;
		return CRMPAY_CSV_BLANK;
	}

	for (;;)
	{
		CrmpayCsvField *f;

		if (n >= CRMPAY_CSV_MAX_FIELDS)
		{
			*error = "too many fields";
			return CRMPAY_CSV_ERROR;
		}
		f = &fields[n++];
		f->quoted = false;
		f->escaped = false;
		if (r->pos < r->len && r->src[r->pos] == '"')
		{
			int			open_line = r->line;

			f->quoted = true;
			r->pos++;
			f->start = r->src + r->pos;
			for (;;)
			{
				if (r->pos >= r->len)
				{
					*record_line = open_line;
					*error = "a quoted field is not closed (the file may be cut short)";
					return CRMPAY_CSV_ERROR;
				}
				if (r->src[r->pos] == '"')
				{
					if (r->pos + 1 < r->len && r->src[r->pos + 1] == '"')
					{
						f->escaped = true;
						r->pos += 2;
						continue;
					}
					break;
				}
				if (r->src[r->pos] == '\n' || (r->src[r->pos] == '\r' &&
											  !(r->pos + 1 < r->len && r->src[r->pos + 1] == '\n')))
					r->line++;
				r->pos++;
			}
			f->len = (size_t) (r->src + r->pos - f->start);
			r->pos++;			/* the closing quote */
			if (r->pos < r->len && r->src[r->pos] != r->delimiter &&
				r->src[r->pos] != '\n' && r->src[r->pos] != '\r')
			{
				*error = "a closing quote is followed by something other than a delimiter or the end of the line";
				return CRMPAY_CSV_ERROR;
			}
		}
		else
		{
			f->start = r->src + r->pos;
			while (r->pos < r->len && r->src[r->pos] != r->delimiter &&
				   r->src[r->pos] != '\n' && r->src[r->pos] != '\r')
			{
				if (r->src[r->pos] == '"')
				{
					*error = "a quote character inside an unquoted field";
					return CRMPAY_CSV_ERROR;
				}
				r->pos++;
			}
			f->len = (size_t) (r->src + r->pos - f->start);
		}

		if (r->pos >= r->len)
			break;
		if (r->src[r->pos] == r->delimiter)
		{
			r->pos++;
			continue;
		}
		*ended_with_newline = eat_newline(r);
		break;
	}
	*nfields = n;
	return CRMPAY_CSV_RECORD;
}

/* Copies a field to dst (at least field->len bytes), turning "" into ". */
size_t
crmpay_csv_unescape(const CrmpayCsvField *field, char *dst)
{
	size_t		i;
	size_t		out = 0;

	for (i = 0; i < field->len; i++)
	{
		dst[out++] = field->start[i];
		if (field->escaped && field->start[i] == '"' && i + 1 < field->len &&
			field->start[i + 1] == '"')
			i++;
	}
	return out;
}

/*
 * crmpay_parse_decimal_minor
 *		[-]digits[group digits{3}]...[decimal digits] in minor units.  Group
 *		separators, when allowed, must sit every three digits from the
 *		decimal point; decimals beyond the exponent must be zeros.
 */
bool
crmpay_parse_decimal_minor(const char *src, size_t len, int exponent,
						   char decimal_sep, char group_sep, int64_t *out)
{
	size_t		i = 0;
	bool		negative = false;
	uint64_t	value = 0;
	int			int_digits = 0;
	int			group_len = -1; /* digits since the last group separator */
	int			decimals = 0;
	int			e;
	const uint64_t limit = (uint64_t) INT64_MAX;

	if (exponent < 0 || exponent > 4 || len == 0)
		return false;
	if (src[0] == '-')
	{
		negative = true;
		i++;
	}
	for (; i < len; i++)
	{
		char		c = src[i];

		if (c >= '0' && c <= '9')
		{
			if (value > (limit - (uint64_t) (c - '0')) / 10)
				return false;
			value = value * 10 + (uint64_t) (c - '0');
			int_digits++;
			if (group_len >= 0)
				group_len++;
		}
		else if (group_sep != 0 && c == group_sep)
		{
			/* first group: 1-3 digits; later groups exactly 3 */
			if (int_digits == 0 || (group_len >= 0 ? group_len != 3 : int_digits > 3))
				return false;
			group_len = 0;
		}
		else
			break;
	}
	if (int_digits == 0 || (group_len >= 0 && group_len != 3))
		return false;
	if (i < len)
	{
		if (src[i] != decimal_sep || i + 1 >= len)
			return false;
		for (i++; i < len; i++)
		{
			char		c = src[i];

			if (c < '0' || c > '9')
				return false;
			if (decimals >= exponent)
			{
				if (c != '0')
					return false;	/* a fraction of the minor unit */
				continue;
			}
			if (value > (limit - (uint64_t) (c - '0')) / 10)
				return false;
			value = value * 10 + (uint64_t) (c - '0');
			decimals++;
		}
	}
	for (e = decimals; e < exponent; e++)
	{
		if (value > limit / 10)
			return false;
		value *= 10;
	}
	*out = negative ? -(int64_t) value : (int64_t) value;
	return true;
}
