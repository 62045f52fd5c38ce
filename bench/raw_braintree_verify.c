/*
 * raw_braintree_verify.c
 *	  Baseline for bench/verify_paypal_braintree.py: Braintree's webhook
 *	  check in plain C with OpenSSL: key = SHA1(private_key), hex
 *	  HMAC-SHA1 over bt_payload, compared with the signature.
 *
 *	  usage: raw_braintree_verify PAYLOAD_FILE PRIVATE_KEY HEX_SIG ITERATIONS
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
	static unsigned char payload[1 << 20];
	unsigned char key[EVP_MAX_MD_SIZE];
	unsigned char mac[EVP_MAX_MD_SIZE];
	char		hex[2 * EVP_MAX_MD_SIZE + 1];
	unsigned int keylen = 0;
	unsigned int maclen = 0;
	struct timespec t0, t1;
	size_t		len;
	long		iterations;
	long		ok = 0;
	FILE	   *f;

	if (argc != 5)
		return 2;
	f = fopen(argv[1], "rb");
	if (!f)
		return 2;
	len = fread(payload, 1, sizeof(payload), f);
	fclose(f);
	iterations = atol(argv[4]);

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < iterations; i++)
	{
		EVP_Digest(argv[2], strlen(argv[2]), key, &keylen, EVP_sha1(), NULL);
		HMAC(EVP_sha1(), key, (int) keylen, payload, len, mac, &maclen);
		for (unsigned j = 0; j < maclen; j++)
			snprintf(hex + 2 * j, 3, "%02x", mac[j]);
		ok += strcmp(hex, argv[3]) == 0;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (ok != iterations)
	{
		fprintf(stderr, "only %ld of %ld verified\n", ok, iterations);
		return 1;
	}
	printf("%.1f\n", iterations / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9));
	return 0;
}
