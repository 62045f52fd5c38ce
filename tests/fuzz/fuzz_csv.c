/*
 * fuzz_csv.c
 *	  libFuzzer harness for extension/csv.c, which reads gateway report
 *	  files: the CSV tokenizer (both delimiters) and the decimal amount
 *	  parser.  Besides ASan/UBSan findings it checks invariants: fields lie
 *	  inside the input, line numbers only grow, the reader always advances,
 *	  and a parsed amount prints back to an equal amount.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "csv.h"

#define CHECK(cond) do { if (!(cond)) abort(); } while (0)

static void
check_csv(const char *s, size_t n, char delimiter)
{
	CrmpayCsvReader r;
	CrmpayCsvField fields[CRMPAY_CSV_MAX_FIELDS];
	int			nfields;
	int			line;
	int			last_line = 0;
	bool		newline;
	const char *error;
	CrmpayCsvResult res;

	crmpay_csv_init(&r, s, n, delimiter);
	for (;;)
	{
		size_t		before = r.pos;
		int			i;

		res = crmpay_csv_next(&r, fields, &nfields, &line, &newline, &error);
		if (res == CRMPAY_CSV_END || res == CRMPAY_CSV_ERROR)
		{
			CHECK(res != CRMPAY_CSV_ERROR || error != NULL);
			break;
		}
		CHECK(r.pos > before && r.pos <= n);
		CHECK(line >= last_line && line >= 1);
		last_line = line;
		for (i = 0; i < nfields; i++)
		{
			char	   *copy;
			size_t		len;

			CHECK(fields[i].start >= s && fields[i].start + fields[i].len <= s + n);
			copy = malloc(fields[i].len + 1);
			len = crmpay_csv_unescape(&fields[i], copy);
			CHECK(len <= fields[i].len);
			free(copy);
		}
	}
}

static void
check_decimal(const char *s, size_t n)
{
	int			exponent;

	for (exponent = 0; exponent <= 4; exponent++)
	{
		int64_t		v;
		int64_t		again;
		char		buf[64];
		int64_t		scale = 1;
		int			e;
		uint64_t	mag;

		if (!crmpay_parse_decimal_minor(s, n, exponent, '.', ',', &v))
			continue;
		for (e = 0; e < exponent; e++)
			scale *= 10;
		mag = v < 0 ? -(uint64_t) v : (uint64_t) v;
		if (exponent == 0)
			snprintf(buf, sizeof(buf), "%s%llu", v < 0 ? "-" : "", (unsigned long long) mag);
		else
			snprintf(buf, sizeof(buf), "%s%llu.%0*llu", v < 0 ? "-" : "",
					 (unsigned long long) (mag / scale), exponent, (unsigned long long) (mag % scale));
		CHECK(crmpay_parse_decimal_minor(buf, strlen(buf), exponent, '.', 0, &again));
		CHECK(again == v);
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *s = (const char *) data;

	check_csv(s, size, ',');
	check_csv(s, size, ';');
	if (size < 64)
		check_decimal(s, size);
	return 0;
}
