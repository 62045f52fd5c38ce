/*
 * raw_hmac.c
 *	  Baseline for bench/webhooks.py: HMAC-SHA256 over "t.body" in plain C,
 *	  with the same OpenSSL call crmpay uses, and hex-encoding the result,
 *	  so the ratio shows what crmpay's SQL layer costs on top.
 *
 *	  usage: raw_hmac BODY_FILE ITERATIONS   -> prints verifications/second
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
	static char payload[1 << 20];
	const char *secret = "whsec_bench_secret_0123456789";
	unsigned char mac[EVP_MAX_MD_SIZE];
	char hex[2 * EVP_MAX_MD_SIZE + 1];
	unsigned int maclen = 0;
	struct timespec t0, t1;
	long iterations;
	size_t len;
	FILE *f;
	volatile unsigned sink = 0;

	if (argc != 3)
		return 2;
	f = fopen(argv[1], "rb");
	if (!f)
		return 2;
	len = (size_t) snprintf(payload, sizeof(payload), "1700000000.");
	len += fread(payload + len, 1, sizeof(payload) - len, f);
	fclose(f);
	iterations = atol(argv[2]);

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < iterations; i++)
	{
		HMAC(EVP_sha256(), secret, (int) strlen(secret), (unsigned char *) payload, len, mac, &maclen);
		for (unsigned j = 0; j < maclen; j++)
			snprintf(hex + 2 * j, 3, "%02x", mac[j]);
		sink += (unsigned char) hex[0];
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%.1f\n", iterations / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9));
	return sink == 12345678 ? 1 : 0;
}
