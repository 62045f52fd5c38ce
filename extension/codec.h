/*-------------------------------------------------------------------------
 *
 * codec.h
 *	  Pure C encoders, decoders and parsers used on untrusted gateway input:
 *	  base64/base64url, hex, URL/form encoding, key=value header lists,
 *	  constant-time comparison and a JSON nesting-depth guard.
 *
 *	  Nothing here includes postgres.h or allocates memory: callers supply
 *	  the output buffers.  That keeps these functions usable from the
 *	  libFuzzer harnesses in tests/fuzz/ without a server.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CRMPAY_CODEC_H
#define CRMPAY_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Flags for crmpay_base64_decode */
#define CRMPAY_B64_STD			0x01	/* accept '+' and '/' */
#define CRMPAY_B64_URL			0x02	/* accept '-' and '_' */
#define CRMPAY_B64_ANY			(CRMPAY_B64_STD | CRMPAY_B64_URL)
#define CRMPAY_B64_SKIP_NEWLINES 0x04	/* ignore '\r' and '\n' (MIME style) */

/* Output size needed by crmpay_base64_encode for n input bytes (no NUL). */
#define CRMPAY_BASE64_ENCODED_LEN(n) ((((n) + 2) / 3) * 4)
/* Output size that is always enough for crmpay_base64_decode of n chars. */
#define CRMPAY_BASE64_DECODED_MAX(n) ((((n) + 3) / 4) * 3)

extern size_t crmpay_base64_encode(const unsigned char *src, size_t len,
								   char *dst, bool url_alphabet);
extern long crmpay_base64_decode(const char *src, size_t len,
								 unsigned char *dst, size_t dstlen, int flags);

extern void crmpay_hex_encode(const unsigned char *src, size_t len, char *dst);
extern long crmpay_hex_decode(const char *src, size_t len,
							  unsigned char *dst, size_t dstlen);

extern bool crmpay_ct_equal(const void *a, const void *b, size_t len);
extern bool crmpay_ct_equal_nocase_hex(const char *a, const char *b, size_t len);

/*
 * URL/form encoding.  crmpay_url_escape writes at most 3*len bytes;
 * crmpay_form_unescape decodes "+" as space and %XX escapes, writing at
 * most len bytes, and returns -1 on a malformed escape.
 */
extern size_t crmpay_url_escape(const char *src, size_t len, char *dst);
extern long crmpay_form_unescape(const char *src, size_t len, char *dst);

/*
 * Iterates over "name=value" items separated by sep (',' for the
 * Stripe-Signature header, '&' for form bodies).  *pos is the cursor (start
 * at 0).  Returns false when no item is left.  The name is everything
 * before the first '='; an item without '=' has value_len == 0 and
 * *has_value == false.  Surrounding spaces are trimmed for ',' lists.
 */
typedef struct CrmpayKVItem
{
	const char *name;
	size_t		name_len;
	const char *value;
	size_t		value_len;
	bool		has_value;
} CrmpayKVItem;

extern bool crmpay_kv_next(const char *src, size_t len, char sep,
						   size_t *pos, CrmpayKVItem *item);

/* The value of four hex digits (a JSON \u escape), or -1. */
extern int	crmpay_hex4(const char *p);

/* Parses a non-negative decimal integer that fits in int64; false otherwise. */
extern bool crmpay_parse_int64(const char *src, size_t len, int64_t *out);

extern uint32_t crmpay_crc32(const unsigned char *buf, size_t len);

#endif							/* CRMPAY_CODEC_H */
