/*
 * fuzz_codec.c
 *	  libFuzzer harness for extension/codec.c, the decoders that see raw
 *	  gateway input: base64/base64url, hex, form decoding, header and form
 *	  item lists, the JSON nesting guard, integers and CRC32.  Besides
 *	  ASan/UBSan findings it checks round trips: whatever decodes must
 *	  re-encode and decode to the same bytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

#define CHECK(cond) do { if (!(cond)) abort(); } while (0)

static void
check_base64(const char *s, size_t n, int flags)
{
	size_t		cap = CRMPAY_BASE64_DECODED_MAX(n) + 1;
	unsigned char *raw = malloc(cap);
	char	   *enc;
	unsigned char *again;
	long		len;
	long		len2;
	size_t		enclen;

	len = crmpay_base64_decode(s, n, raw, cap, flags);
	if (len >= 0)
	{
		CHECK((size_t) len <= CRMPAY_BASE64_DECODED_MAX(n));
		enc = malloc(CRMPAY_BASE64_ENCODED_LEN((size_t) len) + 1);
		enclen = crmpay_base64_encode(raw, (size_t) len, enc, (flags & CRMPAY_B64_URL) && !(flags & CRMPAY_B64_STD));
		CHECK(enclen == CRMPAY_BASE64_ENCODED_LEN((size_t) len));
		again = malloc(CRMPAY_BASE64_DECODED_MAX(enclen) + 1);
		len2 = crmpay_base64_decode(enc, enclen, again, CRMPAY_BASE64_DECODED_MAX(enclen) + 1, flags);
		CHECK(len2 == len && memcmp(raw, again, (size_t) len) == 0);
		free(again);
		free(enc);
	}
	/* a too-small output buffer must be refused, never overrun */
	if (len > 0)
		CHECK(crmpay_base64_decode(s, n, raw, (size_t) len - 1, flags) < 0);
	free(raw);
}

static void
check_hex(const char *s, size_t n)
{
	unsigned char *raw = malloc(n / 2 + 1);
	long		len = crmpay_hex_decode(s, n, raw, n / 2 + 1);

	if (len >= 0)
	{
		char	   *enc = malloc(2 * (size_t) len + 1);

		crmpay_hex_encode(raw, (size_t) len, enc);
		CHECK(crmpay_ct_equal_nocase_hex(enc, s, 2 * (size_t) len));
		free(enc);
	}
	free(raw);
}

static void
check_form(const char *s, size_t n)
{
	char	   *dec = malloc(n + 1);
	long		len = crmpay_form_unescape(s, n, dec);

	if (len >= 0)
	{
		char	   *esc = malloc(3 * (size_t) len + 1);
		size_t		esclen;
		char	   *dec2;
		long		len2;

		CHECK((size_t) len <= n);
		esclen = crmpay_url_escape(dec, (size_t) len, esc);
		CHECK(esclen <= 3 * (size_t) len);
		dec2 = malloc(esclen + 1);
		len2 = crmpay_form_unescape(esc, esclen, dec2);
		CHECK(len2 == len && memcmp(dec, dec2, (size_t) len) == 0);
		free(dec2);
		free(esc);
	}
	free(dec);
}

static void
check_kv(const char *s, size_t n, char sep)
{
	size_t		pos = 0;
	CrmpayKVItem item;
	int			guard = 0;

	while (crmpay_kv_next(s, n, sep, &pos, &item))
	{
		CHECK(item.name >= s && item.name + item.name_len <= s + n);
		CHECK(item.value >= s && item.value + item.value_len <= s + n);
		CHECK(++guard <= (int) n + 1);
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *s = (const char *) data;
	int64_t		v;

	check_base64(s, size, CRMPAY_B64_STD);
	check_base64(s, size, CRMPAY_B64_URL);
	check_base64(s, size, CRMPAY_B64_ANY);
	check_base64(s, size, CRMPAY_B64_STD | CRMPAY_B64_SKIP_NEWLINES);
	check_hex(s, size);
	check_form(s, size);
	check_kv(s, size, ',');
	check_kv(s, size, '&');
	(void) crmpay_crc32(data, size);
	if (crmpay_parse_int64(s, size, &v))
		CHECK(v >= 0);
	return 0;
}
