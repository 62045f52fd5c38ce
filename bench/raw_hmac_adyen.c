/*
 * raw_hmac_adyen.c
 *	  Baseline for bench/verify_adyen.py: Adyen's notification HMAC in plain
 *	  C with the same OpenSSL call crmpay uses: HMAC-SHA256 of the 8-field
 *	  signing string with the hex-decoded key, base64 of the result, and a
 *	  comparison with the expected signature.  No JSON: the signing string
 *	  is given, so the ratio shows what crmpay costs on top of the primitive
 *	  (parsing the body, building the string, the SQL call).
 *
 *	  usage: raw_hmac_adyen HEX_KEY SIGNING_STRING EXPECTED_BASE64 ITERATIONS
 *	  prints verifications/second
 */
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int
main(int argc, char **argv)
{
	unsigned char key[64];
	size_t		keylen = 0;
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned char b64[4 * ((EVP_MAX_MD_SIZE + 2) / 3) + 1];
	unsigned int maclen = 0;
	struct timespec t0, t1;
	long		iterations, ok = 0;
	const char *msg;
	const char *expected;

	if (argc != 5 || strlen(argv[1]) % 2 != 0 || strlen(argv[1]) > 128)
		return 2;
	for (keylen = 0; keylen < strlen(argv[1]) / 2; keylen++)
		if (sscanf(argv[1] + 2 * keylen, "%2hhx", &key[keylen]) != 1)
			return 2;
	msg = argv[2];
	expected = argv[3];
	iterations = atol(argv[4]);

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < iterations; i++)
	{
		HMAC(EVP_sha256(), key, (int) keylen, (const unsigned char *) msg, strlen(msg), mac, &maclen);
		EVP_EncodeBlock(b64, mac, (int) maclen);
		ok += (CRYPTO_memcmp(b64, expected, 44) == 0);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (ok != iterations)
	{
		fprintf(stderr, "raw_hmac_adyen: the expected signature does not match\n");
		return 1;
	}
	printf("%.1f\n", iterations / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9));
	return 0;
}
