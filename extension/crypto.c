/*-------------------------------------------------------------------------
 *
 * crypto.c
 *	  Gateway secrets at rest, and the digests and HMACs the webhook
 *	  verifiers need, through OpenSSL's EVP interface.
 *
 *	  Secrets (API keys, webhook secrets) are sealed with AES-256-GCM under
 *	  a 32-byte master key read from the file named by crmpay.key_file.  A
 *	  sealed secret is:
 *
 *		version (1 byte, 0x01) | key id (8) | nonce (12) | tag (16) | ciphertext
 *
 *	  The key id is the first 8 bytes of SHA-256(master key), so a secret
 *	  sealed under another key is reported as such instead of as "corrupt".
 *	  The additional authenticated data binds each secret to its account and
 *	  column, so sealed values cannot be swapped between rows.
 *
 *	  OpenSSL objects are never kept across a possible ERROR: each function
 *	  frees its context before it reports a failure.
 *
 *-------------------------------------------------------------------------
 */
#include "crmpay.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "codec.h"
#include "port.h"
#include "storage/fd.h"
#include "utils/memutils.h"

#define SEAL_VERSION	0x01
#define KEY_LEN			32
#define KEY_ID_LEN		8
#define NONCE_LEN		12
#define TAG_LEN			16
#define HEADER_LEN		(1 + KEY_ID_LEN + NONCE_LEN + TAG_LEN)

/* The master key, cached per process; reloaded when the file or GUC changes. */
static unsigned char master_key[KEY_LEN];
static unsigned char master_key_id[KEY_ID_LEN];
static bool master_key_loaded = false;
static char master_key_path[MAXPGPATH];
static struct stat master_key_stat;

/*
 * load_master_key
 *		Reads crmpay.key_file (32 raw bytes, or 64 hex digits and an optional
 *		newline) into the per-process cache.  The file must not be readable
 *		or writable by other OS users.
 */
static void
load_master_key(void)
{
	struct stat st;
	unsigned char buf[KEY_LEN * 2 + 2];
	ssize_t		n;
	int			fd;
	unsigned char id[EVP_MAX_MD_SIZE];
	unsigned int idlen;

	if (crmpay_key_file == NULL || crmpay_key_file[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("crmpay has no master key"),
				 errdetail("crmpay.key_file is not set, so gateway secrets cannot be encrypted or decrypted."),
				 errhint("Create a key with \"head -c 32 /dev/urandom > /etc/postgresql/crmpay.key\", make it mode 0600 and owned by the server's OS user, and set crmpay.key_file to its path in postgresql.conf.")));

	if (stat(crmpay_key_file, &st) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not read crmpay master key file \"%s\": %m", crmpay_key_file),
				 errhint("Check crmpay.key_file; the file must be readable by the server's OS user.")));

	/* Fast path: same file, unchanged since we read it. */
	if (master_key_loaded && strcmp(master_key_path, crmpay_key_file) == 0 &&
		st.st_ino == master_key_stat.st_ino && st.st_dev == master_key_stat.st_dev &&
		st.st_mtime == master_key_stat.st_mtime && st.st_size == master_key_stat.st_size)
		return;

	if (!S_ISREG(st.st_mode))
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("crmpay master key file \"%s\" is not a regular file", crmpay_key_file)));
	if (st.st_mode & (S_IRWXG | S_IRWXO))
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("crmpay master key file \"%s\" has group or world access", crmpay_key_file),
				 errhint("Run: chmod 0600 %s", crmpay_key_file)));

	fd = OpenTransientFile(crmpay_key_file, O_RDONLY | PG_BINARY);
	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open crmpay master key file \"%s\": %m", crmpay_key_file)));
	n = read(fd, buf, sizeof(buf));
	CloseTransientFile(fd);

	master_key_loaded = false;
	if (n == KEY_LEN)
		memcpy(master_key, buf, KEY_LEN);
	else if ((n == KEY_LEN * 2 || (n == KEY_LEN * 2 + 1 && buf[KEY_LEN * 2] == '\n')) &&
			 crmpay_hex_decode((char *) buf, KEY_LEN * 2, master_key, KEY_LEN) == KEY_LEN)
		;
	else
	{
		explicit_bzero(buf, sizeof(buf));
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("crmpay master key file \"%s\" does not hold a 32-byte key", crmpay_key_file),
				 errdetail("The file must hold exactly 32 bytes, or 64 hexadecimal digits."),
				 errhint("Create one with: head -c 32 /dev/urandom > FILE")));
	}
	explicit_bzero(buf, sizeof(buf));

	crmpay_digest("SHA256", master_key, KEY_LEN, id, &idlen);
	memcpy(master_key_id, id, KEY_ID_LEN);
	strlcpy(master_key_path, crmpay_key_file, sizeof(master_key_path));
	master_key_stat = st;
	master_key_loaded = true;
}

/*
 * crmpay_encrypt_secret
 *		Seals plaintext under the master key with AES-256-GCM.
 */
bytea *
crmpay_encrypt_secret(const char *plaintext, size_t len, const char *aad)
{
	bytea	   *result;
	unsigned char *out;
	EVP_CIPHER_CTX *ctx;
	int			outlen = 0;
	int			finlen = 0;
	bool		ok;

	load_master_key();

	if (len > MaxAllocSize - HEADER_LEN - VARHDRSZ)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("secret too large to encrypt")));

	result = palloc(VARHDRSZ + HEADER_LEN + len);
	SET_VARSIZE(result, VARHDRSZ + HEADER_LEN + len);
	out = (unsigned char *) VARDATA(result);
	out[0] = SEAL_VERSION;
	memcpy(out + 1, master_key_id, KEY_ID_LEN);
	if (!pg_strong_random(out + 1 + KEY_ID_LEN, NONCE_LEN))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate a random nonce")));

	ctx = EVP_CIPHER_CTX_new();
	if (ctx == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory for an OpenSSL cipher context")));
	ok = EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_LEN, NULL) == 1 &&
		EVP_EncryptInit_ex(ctx, NULL, NULL, master_key, out + 1 + KEY_ID_LEN) == 1 &&
		EVP_EncryptUpdate(ctx, NULL, &outlen, (const unsigned char *) aad, (int) strlen(aad)) == 1 &&
		EVP_EncryptUpdate(ctx, out + HEADER_LEN, &outlen, (const unsigned char *) plaintext, (int) len) == 1 &&
		EVP_EncryptFinal_ex(ctx, out + HEADER_LEN + outlen, &finlen) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, out + 1 + KEY_ID_LEN + NONCE_LEN) == 1;
	EVP_CIPHER_CTX_free(ctx);

	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not encrypt a gateway secret")));
	return result;
}

/*
 * crmpay_decrypt_secret
 *		Opens a sealed secret; returns a NUL-terminated palloc'd string.
 *		Errors say why (other key, tampered) but never show the secret.
 */
char *
crmpay_decrypt_secret(const bytea *blob, const char *aad)
{
	const unsigned char *in = (const unsigned char *) VARDATA_ANY(blob);
	size_t		inlen = VARSIZE_ANY_EXHDR(blob);
	size_t		ctlen;
	char	   *plain;
	EVP_CIPHER_CTX *ctx;
	int			outlen = 0;
	int			finlen = 0;
	bool		ok;

	load_master_key();

	if (inlen < HEADER_LEN || in[0] != SEAL_VERSION)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("stored gateway secret is not in a format crmpay can read")));
	if (!crmpay_ct_equal(in + 1, master_key_id, KEY_ID_LEN))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("stored gateway secret was encrypted under a different master key"),
				 errhint("Point crmpay.key_file at the key that was in use when the account was added, or add the account again.")));

	ctlen = inlen - HEADER_LEN;
	plain = palloc(ctlen + 1);

	ctx = EVP_CIPHER_CTX_new();
	if (ctx == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory for an OpenSSL cipher context")));
	ok = EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_LEN, NULL) == 1 &&
		EVP_DecryptInit_ex(ctx, NULL, NULL, master_key, in + 1 + KEY_ID_LEN) == 1 &&
		EVP_DecryptUpdate(ctx, NULL, &outlen, (const unsigned char *) aad, (int) strlen(aad)) == 1 &&
		EVP_DecryptUpdate(ctx, (unsigned char *) plain, &outlen, in + HEADER_LEN, (int) ctlen) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN,
							(void *) (in + 1 + KEY_ID_LEN + NONCE_LEN)) == 1 &&
		EVP_DecryptFinal_ex(ctx, (unsigned char *) plain + outlen, &finlen) == 1;
	EVP_CIPHER_CTX_free(ctx);

	if (!ok)
	{
		explicit_bzero(plain, ctlen + 1);
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("stored gateway secret failed its integrity check"),
				 errdetail("The sealed value was altered or belongs to another account.")));
	}
	plain[ctlen] = '\0';
	return plain;
}

/*
 * Digests are fetched once per process: in OpenSSL 3 a fetch per call costs
 * more than hashing a small webhook body.
 */
static const EVP_MD *
fetch_digest(const char *digest_name)
{
	static EVP_MD *sha256 = NULL;
	static EVP_MD *sha1 = NULL;
	static EVP_MD *sha512 = NULL;
	EVP_MD	  **slot;

	if (strcmp(digest_name, "SHA256") == 0)
		slot = &sha256;
	else if (strcmp(digest_name, "SHA1") == 0)
		slot = &sha1;
	else if (strcmp(digest_name, "SHA512") == 0)
		slot = &sha512;
	else
		elog(ERROR, "crmpay: unsupported digest %s", digest_name);

	if (*slot == NULL)
	{
		*slot = EVP_MD_fetch(NULL, digest_name, NULL);
		if (*slot == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("OpenSSL does not provide digest %s", digest_name)));
	}
	return *slot;
}

/* One-shot digest. out must hold EVP_MAX_MD_SIZE bytes. */
void
crmpay_digest(const char *digest_name, const void *msg, size_t msglen,
			  unsigned char *out, unsigned int *outlen)
{
	if (EVP_Digest(msg, msglen, out, outlen, fetch_digest(digest_name), NULL) != 1)
		elog(ERROR, "crmpay: %s digest failed", digest_name);
}

/*
 * crmpay_hmac
 *		HMAC with the named digest.  out must hold EVP_MAX_MD_SIZE bytes.
 *		Uses OpenSSL's one-shot HMAC() with a cached digest.
 */
void
crmpay_hmac(const char *digest_name, const void *key, size_t keylen,
			const void *msg, size_t msglen,
			unsigned char *out, unsigned int *outlen)
{
	static const unsigned char empty_key[1] = {0};

	if (HMAC(fetch_digest(digest_name), keylen ? key : empty_key, (int) keylen,
			 msg, msglen, out, outlen) == NULL)
		elog(ERROR, "crmpay: HMAC-%s failed", digest_name);
}
