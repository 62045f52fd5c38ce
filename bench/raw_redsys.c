/*
 * raw_redsys.c
 *	  Baseline for bench/verify_redsys.py: one Redsys HMAC_SHA256_V1
 *	  verification in plain C with the primitives crmpay uses -- 3DES-CBC of
 *	  the order (EVP, padding off, zero-padded by hand, cipher fetched once),
 *	  HMAC-SHA256 over the Ds_MerchantParameters text, base64-decoding the
 *	  received signature and a constant-time compare -- so the ratio shows
 *	  what crmpay adds on top (SQL call, form and JSON parsing).
 *
 *	  usage: raw_redsys KEY24_HEX ORDER PARAMS_FILE SIGNATURE_B64 ITERATIONS
 *	  prints verifications/second (exits 1 if a verification fails)
 */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int
b64url_value(int c)
{
	if (c >= 'A' && c <= 'Z') return c - 'A';
	if (c >= 'a' && c <= 'z') return c - 'a' + 26;
	if (c >= '0' && c <= '9') return c - '0' + 52;
	if (c == '+' || c == '-') return 62;
	if (c == '/' || c == '_') return 63;
	return -1;
}

/* Either base64 alphabet, padding optional. */
static int
b64_decode(const char *s, unsigned char *out)
{
	unsigned acc = 0;
	int bits = 0, n = 0;

	for (; *s && *s != '='; s++)
	{
		int v = b64url_value((unsigned char) *s);

		if (v < 0)
			return -1;
		acc = (acc << 6) | (unsigned) v;
		bits += 6;
		if (bits >= 8)
		{
			bits -= 8;
			out[n++] = (unsigned char) (acc >> bits);
			acc &= (1u << bits) - 1;
		}
	}
	return n;
}

int
main(int argc, char **argv)
{
	static char params[1 << 16];
	static const unsigned char iv[8] = {0};
	unsigned char key[24], given[64], padded[64], order_key[64], mac[EVP_MAX_MD_SIZE];
	unsigned int maclen = 0;
	size_t params_len, order_len, padded_len;
	struct timespec t0, t1;
	long iterations;
	EVP_CIPHER *cipher;
	FILE *f;

	if (argc != 6)
		return 2;
	for (int i = 0; i < 24; i++)
		sscanf(argv[1] + 2 * i, "%2hhx", &key[i]);
	order_len = strlen(argv[2]);
	if (order_len > 48)
		return 2;
	f = fopen(argv[3], "rb");
	if (!f)
		return 2;
	params_len = fread(params, 1, sizeof(params), f);
	fclose(f);
	iterations = atol(argv[5]);
	cipher = EVP_CIPHER_fetch(NULL, "DES-EDE3-CBC", NULL);

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < iterations; i++)
	{
		EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
		int n1 = 0, n2 = 0;

		padded_len = (order_len + 7) / 8 * 8;
		memset(padded, 0, padded_len);
		memcpy(padded, argv[2], order_len);
		if (!EVP_EncryptInit_ex(ctx, cipher, NULL, key, iv) ||
			!EVP_CIPHER_CTX_set_padding(ctx, 0) ||
			!EVP_EncryptUpdate(ctx, order_key, &n1, padded, (int) padded_len) ||
			!EVP_EncryptFinal_ex(ctx, order_key + n1, &n2))
			return 1;
		EVP_CIPHER_CTX_free(ctx);
		HMAC(EVP_sha256(), order_key, n1 + n2, (unsigned char *) params, params_len, mac, &maclen);
		if (b64_decode(argv[4], given) != 32 || CRYPTO_memcmp(given, mac, 32) != 0)
			return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	EVP_CIPHER_free(cipher);
	printf("%.1f\n", iterations / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9));
	return 0;
}
