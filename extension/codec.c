/*-------------------------------------------------------------------------
 *
 * codec.c
 *	  Pure C encoders, decoders and parsers for untrusted gateway input.
 *	  See codec.h.  No allocation, no PostgreSQL dependency; every function
 *	  is bounded by the lengths it is given and never reads past them.
 *
 *-------------------------------------------------------------------------
 */
#include "codec.h"

#include <string.h>

static const char b64_std[] =
"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char b64_url[] =
"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/*
 * crmpay_base64_encode
 *		Encodes with padding in the standard or the URL-safe alphabet.
 *		Returns the number of characters written (no terminating NUL).
 */
size_t
crmpay_base64_encode(const unsigned char *src, size_t len, char *dst,
					 bool url_alphabet)
{
	const char *alphabet = url_alphabet ? b64_url : b64_std;
	size_t		out = 0;
	size_t		i;

	for (i = 0; i + 2 < len; i += 3)
	{
		uint32_t	v = ((uint32_t) src[i] << 16) | ((uint32_t) src[i + 1] << 8) | src[i + 2];

		dst[out++] = alphabet[(v >> 18) & 63];
		dst[out++] = alphabet[(v >> 12) & 63];
		dst[out++] = alphabet[(v >> 6) & 63];
		dst[out++] = alphabet[v & 63];
	}
	if (i < len)
	{
		uint32_t	v = (uint32_t) src[i] << 16;

		if (i + 1 < len)
			v |= (uint32_t) src[i + 1] << 8;
		dst[out++] = alphabet[(v >> 18) & 63];
		dst[out++] = alphabet[(v >> 12) & 63];
		dst[out++] = (i + 1 < len) ? alphabet[(v >> 6) & 63] : '=';
		dst[out++] = '=';
	}
	return out;
}

static int
b64_value(unsigned char c, int flags)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if ((flags & CRMPAY_B64_STD) && c == '+')
		return 62;
	if ((flags & CRMPAY_B64_STD) && c == '/')
		return 63;
	if ((flags & CRMPAY_B64_URL) && c == '-')
		return 62;
	if ((flags & CRMPAY_B64_URL) && c == '_')
		return 63;
	return -1;
}

/*
 * crmpay_base64_decode
 *		Strict decoder: the alphabets allowed by flags, optional '=' padding
 *		(only at the end, at most two, and only where it is valid), no other
 *		characters except newlines with CRMPAY_B64_SKIP_NEWLINES.  Unused
 *		trailing bits must be zero so each byte string has exactly one
 *		accepted encoding per alphabet.  Returns the decoded length, or -1.
 */
long
crmpay_base64_decode(const char *src, size_t len, unsigned char *dst,
					 size_t dstlen, int flags)
{
	uint32_t	acc = 0;
	int			nbits = 0;
	size_t		out = 0;
	size_t		ndigits = 0;
	size_t		npad = 0;
	size_t		i;

	for (i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) src[i];
		int			v;

		if ((flags & CRMPAY_B64_SKIP_NEWLINES) && (c == '\n' || c == '\r'))
			continue;
		if (c == '=')
		{
			npad++;
			if (npad > 2)
				return -1;
			continue;
		}
		if (npad > 0)
			return -1;			/* data after padding */
		v = b64_value(c, flags);
		if (v < 0)
			return -1;
		ndigits++;
		acc = (acc << 6) | (uint32_t) v;
		nbits += 6;
		if (nbits >= 8)
		{
			nbits -= 8;
			if (out >= dstlen)
				return -1;
			dst[out++] = (unsigned char) (acc >> nbits);
			acc &= (1u << nbits) - 1;
		}
	}
	/* A lone digit in the last quantum can never encode a byte. */
	if (ndigits % 4 == 1)
		return -1;
	/* Padding, when present, must complete the last quantum exactly. */
	if (npad > 0 && (ndigits + npad) % 4 != 0)
		return -1;
	/* Leftover bits must be zero (canonical encoding). */
	if (acc != 0)
		return -1;
	return (long) out;
}

void
crmpay_hex_encode(const unsigned char *src, size_t len, char *dst)
{
	static const char digits[] = "0123456789abcdef";
	size_t		i;

	for (i = 0; i < len; i++)
	{
		dst[2 * i] = digits[src[i] >> 4];
		dst[2 * i + 1] = digits[src[i] & 15];
	}
}

static int
hex_value(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Decodes hex (either case); returns the byte count or -1 when malformed. */
long
crmpay_hex_decode(const char *src, size_t len, unsigned char *dst,
				  size_t dstlen)
{
	size_t		i;

	if (len % 2 != 0 || len / 2 > dstlen)
		return -1;
	for (i = 0; i < len; i += 2)
	{
		int			hi = hex_value((unsigned char) src[i]);
		int			lo = hex_value((unsigned char) src[i + 1]);

		if (hi < 0 || lo < 0)
			return -1;
		dst[i / 2] = (unsigned char) ((hi << 4) | lo);
	}
	return (long) (len / 2);
}

/*
 * crmpay_ct_equal
 *		Constant-time comparison of two buffers of the same length: the time
 *		taken does not depend on where they differ.
 */
bool
crmpay_ct_equal(const void *a, const void *b, size_t len)
{
	const volatile unsigned char *pa = a;
	const volatile unsigned char *pb = b;
	unsigned char diff = 0;
	size_t		i;

	for (i = 0; i < len; i++)
		diff |= pa[i] ^ pb[i];
	return diff == 0;
}

/* Constant-time comparison of hex strings, ignoring the letters' case. */
bool
crmpay_ct_equal_nocase_hex(const char *a, const char *b, size_t len)
{
	unsigned char diff = 0;
	size_t		i;

	for (i = 0; i < len; i++)
		diff |= (unsigned char) ((a[i] | 0x20) ^ (b[i] | 0x20));
	return diff == 0;
}

/*
 * crmpay_url_escape
 *		Percent-encodes everything except RFC 3986 unreserved characters.
 *		dst must hold 3 * len bytes.  Returns the length written.
 */
size_t
crmpay_url_escape(const char *src, size_t len, char *dst)
{
	static const char digits[] = "0123456789ABCDEF";
	size_t		out = 0;
	size_t		i;

	for (i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) src[i];

		if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
			(c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.' || c == '~')
			dst[out++] = (char) c;
		else
		{
			dst[out++] = '%';
			dst[out++] = digits[c >> 4];
			dst[out++] = digits[c & 15];
		}
	}
	return out;
}

/*
 * crmpay_form_unescape
 *		Decodes application/x-www-form-urlencoded text: '+' is a space and
 *		%XX an escaped byte.  Returns the length written or -1 on a broken
 *		escape.  dst may equal src (decoding never grows the text).
 */
long
crmpay_form_unescape(const char *src, size_t len, char *dst)
{
	size_t		out = 0;
	size_t		i;

	for (i = 0; i < len; i++)
	{
		char		c = src[i];

		if (c == '+')
			dst[out++] = ' ';
		else if (c == '%')
		{
			int			hi,
						lo;

			if (i + 2 >= len)
				return -1;	/* truncated escape */
			hi = hex_value((unsigned char) src[i + 1]);
			lo = hex_value((unsigned char) src[i + 2]);
			if (hi < 0 || lo < 0)
				return -1;
			dst[out++] = (char) ((hi << 4) | lo);
			i += 2;
		}
		else
			dst[out++] = c;
	}
	return (long) out;
}

/*
 * crmpay_kv_next
 *		Steps through a sep-separated list of name=value items; see codec.h.
 *		Empty items are skipped.
 */
bool
crmpay_kv_next(const char *src, size_t len, char sep, size_t *pos,
			   CrmpayKVItem *item)
{
	while (*pos <= len)
	{
		size_t		start = *pos;
		size_t		end = start;
		size_t		eq;

		while (end < len && src[end] != sep)
			end++;
		*pos = end + 1;

		/* trim blanks around header items (not around form items) */
		if (sep == ',')
		{
			while (start < end && (src[start] == ' ' || src[start] == '\t'))
				start++;
			while (end > start && (src[end - 1] == ' ' || src[end - 1] == '\t'))
				end--;
		}
		if (end == start)
		{
			if (*pos > len)
				return false;
			continue;
		}

		for (eq = start; eq < end && src[eq] != '='; eq++)
			;
		item->name = src + start;
		item->name_len = eq - start;
		if (eq < end)
		{
			item->has_value = true;
			item->value = src + eq + 1;
			item->value_len = end - eq - 1;
		}
		else
		{
			item->has_value = false;
			item->value = src + end;
			item->value_len = 0;
		}
		return true;
	}
	return false;
}

/* The value of the four hex digits at p (which must have four bytes), or -1. */
int
crmpay_hex4(const char *p)
{
	int			v = 0;

	for (int i = 0; i < 4; i++)
	{
		char		c = p[i];

		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= c - '0';
		else if (c >= 'a' && c <= 'f')
			v |= c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v |= c - 'A' + 10;
		else
			return -1;
	}
	return v;
}

bool
crmpay_parse_int64(const char *src, size_t len, int64_t *out)
{
	uint64_t	v = 0;
	size_t		i;

	if (len == 0 || len > 19)
		return false;
	for (i = 0; i < len; i++)
	{
		if (src[i] < '0' || src[i] > '9')
			return false;
		v = v * 10 + (uint64_t) (src[i] - '0');
	}
	if (v > (uint64_t) INT64_MAX)
		return false;
	*out = (int64_t) v;
	return true;
}

/* CRC-32 (IEEE 802.3, as zlib's crc32), bitwise table built on first use. */
uint32_t
crmpay_crc32(const unsigned char *buf, size_t len)
{
	static uint32_t table[256];
	static bool table_ready = false;
	uint32_t	crc = 0xFFFFFFFFu;
	size_t		i;

	if (!table_ready)
	{
		uint32_t	n;

		for (n = 0; n < 256; n++)
		{
			uint32_t	c = n;
			int			k;

			for (k = 0; k < 8; k++)
				c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
			table[n] = c;
		}
		table_ready = true;
	}
	for (i = 0; i < len; i++)
		crc = table[(crc ^ buf[i]) & 0xFF] ^ (crc >> 8);
	return crc ^ 0xFFFFFFFFu;
}
