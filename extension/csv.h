/*-------------------------------------------------------------------------
 *
 * csv.h
 *	  Pure C reading of gateway report files (reports.c): an RFC 4180 CSV
 *	  tokenizer that says where each record starts, and a strict decimal
 *	  amount parser.
 *
 *	  Like codec.h: no postgres.h, no allocation; fields point into the
 *	  caller's text, so the libFuzzer harness in tests/fuzz/ can run them.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CRMPAY_CSV_H
#define CRMPAY_CSV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Most fields a record may have. */
#define CRMPAY_CSV_MAX_FIELDS 128

typedef struct CrmpayCsvField
{
	const char *start;			/* inside the quotes, if quoted */
	size_t		len;
	bool		quoted;
	bool		escaped;		/* contains "" pairs: unescape before use */
} CrmpayCsvField;

typedef struct CrmpayCsvReader
{
	const char *src;
	size_t		len;
	size_t		pos;
	char		delimiter;
	int			line;			/* physical line of pos, from 1 */
} CrmpayCsvReader;

/* Result of crmpay_csv_next */
typedef enum CrmpayCsvResult
{
	CRMPAY_CSV_RECORD,			/* a record (nfields >= 1) */
	CRMPAY_CSV_BLANK,			/* an empty line */
	CRMPAY_CSV_END,				/* nothing left */
	CRMPAY_CSV_ERROR			/* *error says what; *record_line where */
} CrmpayCsvResult;

extern void crmpay_csv_init(CrmpayCsvReader *reader, const char *src,
							size_t len, char delimiter);
extern CrmpayCsvResult crmpay_csv_next(CrmpayCsvReader *reader,
									   CrmpayCsvField *fields, int *nfields,
									   int *record_line, bool *ended_with_newline,
									   const char **error);
extern size_t crmpay_csv_unescape(const CrmpayCsvField *field, char *dst);

/*
 * A decimal amount in major units to minor units: "-1.234,56" style with
 * the given separators (group_sep 0: none allowed).  At most `exponent`
 * decimals (more only if they are zeros).  false if malformed or out of
 * range.
 */
extern bool crmpay_parse_decimal_minor(const char *src, size_t len, int exponent,
									   char decimal_sep, char group_sep,
									   int64_t *out);

#endif							/* CRMPAY_CSV_H */
