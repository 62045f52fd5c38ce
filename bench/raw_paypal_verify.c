/*
 * raw_paypal_verify.c
 *	  Baseline for bench/verify_paypal_braintree.py: PayPal's offline webhook
 *	  check in plain C with OpenSSL, the certificate parsed once (as crmpay
 *	  caches it): CRC32 of the body, "id|time|webhook_id|crc", base64-decode
 *	  the signature, RSA-SHA256 (PKCS#1 v1.5) verify.
 *
 *	  usage: raw_paypal_verify CERT_PEM BODY_FILE SIG_B64 ID TIME WEBHOOK_ID ITERATIONS
 *	  prints verifications/second
 */
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint32_t crc_table[256];

static void
crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++)
	{
		uint32_t	c = i;

		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t
crc32_buf(const unsigned char *p, size_t n)
{
	uint32_t	c = 0xFFFFFFFFu;

	while (n--)
		c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
	return c ^ 0xFFFFFFFFu;
}

int
main(int argc, char **argv)
{
	static unsigned char body[1 << 20];
	char		msg[4096];
	unsigned char sig[1024];
	struct timespec t0, t1;
	size_t		len;
	long		iterations;
	int			ok = 0;
	FILE	   *f;
	X509	   *cert;
	EVP_PKEY   *pkey;

	if (argc != 8)
		return 2;
	crc_init();
	f = fopen(argv[1], "r");
	if (!f || !(cert = PEM_read_X509(f, NULL, NULL, NULL)))
		return 2;
	fclose(f);
	pkey = X509_get0_pubkey(cert);
	f = fopen(argv[2], "rb");
	if (!f)
		return 2;
	len = fread(body, 1, sizeof(body), f);
	fclose(f);
	iterations = atol(argv[7]);

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < iterations; i++)
	{
		int			n = snprintf(msg, sizeof(msg), "%s|%s|%s|%u", argv[4], argv[5], argv[6],
								 crc32_buf(body, len));
		int			siglen = EVP_DecodeBlock(sig, (const unsigned char *) argv[3], (int) strlen(argv[3]));
		EVP_MD_CTX *ctx = EVP_MD_CTX_new();

		siglen -= (argv[3][strlen(argv[3]) - 1] == '=') + (argv[3][strlen(argv[3]) - 2] == '=');
		ok += EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, pkey) == 1 &&
			EVP_DigestVerify(ctx, sig, siglen, (unsigned char *) msg, n) == 1;
		EVP_MD_CTX_free(ctx);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (ok != iterations)
	{
		fprintf(stderr, "only %d of %ld verified\n", ok, iterations);
		return 1;
	}
	printf("%.1f\n", iterations / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9));
	X509_free(cert);
	return 0;
}
