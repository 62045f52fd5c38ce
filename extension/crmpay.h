/*-------------------------------------------------------------------------
 *
 * crmpay.h
 *	  Declarations shared by the crmpay modules: configuration (GUCs),
 *	  the JSON reader, secrets, and small helpers.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CRMPAY_H
#define CRMPAY_H

#include "postgres.h"

#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "utils/timestamp.h"

/* GUCs (see crmpay.c for their documentation) */
extern char *crmpay_key_file;
extern char *crmpay_ca_file;
extern bool crmpay_allow_insecure_http;
extern int	crmpay_connect_timeout_ms;
extern int	crmpay_request_timeout_ms;
extern int	crmpay_webhook_tolerance_s;
extern int	crmpay_max_webhook_bytes;
extern bool crmpay_webhook_direct_path;

/* ----------------------------------------------------------------
 * json.c: a small, non-throwing JSON tree reader (see json.h)
 * ----------------------------------------------------------------
 */
#include "json.h"

extern CrmpayJson *crmpay_json_from_jsonb_datum(Datum jsonb);

/* Largest MAC or digest crmpay computes (SHA-512) */
#define CRMPAY_MAX_MAC 64

/* ----------------------------------------------------------------
 * crypto.c: secrets at rest, HMAC and digests
 * ----------------------------------------------------------------
 */
extern bytea *crmpay_encrypt_secret(const char *plaintext, size_t len,
									const char *aad);
extern char *crmpay_decrypt_secret(const bytea *blob, const char *aad);
extern void crmpay_hmac(const char *digest_name, const void *key, size_t keylen,
						const void *msg, size_t msglen,
						unsigned char *out, unsigned int *outlen);
extern void crmpay_digest(const char *digest_name, const void *msg,
						  size_t msglen, unsigned char *out,
						  unsigned int *outlen);

/* ----------------------------------------------------------------
 * Webhook headers, as handed to receive_webhook (jsonb object)
 * ----------------------------------------------------------------
 */
typedef struct CrmpayHeader
{
	char	   *name;			/* lower-cased */
	char	   *value;
} CrmpayHeader;

typedef struct CrmpayHeaders
{
	int			count;
	CrmpayHeader *items;
} CrmpayHeaders;

extern CrmpayHeaders *crmpay_headers_from_jsonb(Datum jsonb);
extern const char *crmpay_header_get(const CrmpayHeaders *headers,
									 const char *name);

/* spi_plans.c: saved plans and NULL-able text parameters */
struct _SPI_plan;
extern struct _SPI_plan *crmpay_saved_plan(struct _SPI_plan **slot, const char *sql,
										   int nargs, const Oid *types);
extern void crmpay_spi_run(struct _SPI_plan *plan, Datum *values, const char *nulls,
						   bool read_only, long count, int expected_rc, const char *what);
extern Datum crmpay_text_param(const char *s, char *isnull);

/*
 * payments.c: the state machine.  CRMPAY_PAYMENT_MOVE_SQL is the one UPDATE
 * that moves a payment (allowed by crmpay_transition_allowed, row locked):
 * $1 payment id, $2 new status, $3 gateway payment ref (kept if already
 * known), $4 refunded total (only grows; NULL for none), $5 paid at.
 */
#define CRMPAY_PAYMENT_MOVE_SQL \
	"UPDATE crmpay.payments p" \
	"   SET status = $2," \
	"       gateway_payment_ref = coalesce(p.gateway_payment_ref, $3)," \
	"       refunded_minor = greatest(p.refunded_minor, coalesce($4, 0))," \
	"       paid_at = CASE WHEN $2 = 'paid' THEN coalesce(p.paid_at, $5) ELSE p.paid_at END," \
	"       updated_at = now()" \
	" WHERE p.id = $1"
/*
 * The INSERT that keeps crmpay.payment_refs (account, gateway payment ref,
 * payment id) in step, in two halves around its row source: a new mapping,
 * or a mapping moved to the payment that now has the reference.
 */
#define CRMPAY_KEEP_PAYMENT_REF_SQL \
	"INSERT INTO crmpay.payment_refs (account, gateway_payment_ref, payment_id)"
#define CRMPAY_KEEP_PAYMENT_REF_CONFLICT \
	" ON CONFLICT (account, gateway_payment_ref) DO UPDATE SET payment_id = excluded.payment_id" \
	" WHERE payment_refs.payment_id <> excluded.payment_id"
extern void crmpay_statement_keeps_payment_ref(int64 payment_id);
extern void crmpay_upsert_payment_ref(const char *account, const char *gateway_payment_ref,
									  int64 payment_id);
struct TriggerData;
extern void crmpay_sync_order_row(struct TriggerData *trigdata);
extern bool crmpay_transition_allowed(const char *from_status, const char *to_status);
extern bool crmpay_record_payment_facts(int64 payment_id, const char *gateway_payment_ref,
										int64 refunded_minor);
extern bool crmpay_apply_status_locked(int64 payment_id, const char *current_status,
									   const char *new_status, const char *gateway_payment_ref,
									   int64 refunded_minor, TimestampTz at);
extern char *crmpay_apply_status(int64 payment_id, const char *new_status,
								 const char *gateway_payment_ref, int64 refunded_minor,
								 TimestampTz at);

/* money */
extern int64 crmpay_timestamptz_to_unix(TimestampTz ts);

#endif							/* CRMPAY_H */
