/*-------------------------------------------------------------------------
 *
 * provider.h
 *	  The gateway provider interface.  Each gateway is one file that fills
 *	  in a CrmpayProvider; provider.c lists them in one table.  The rest of
 *	  crmpay (sync links, the worker, webhook intake) only talks to this
 *	  interface.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CRMPAY_PROVIDER_H
#define CRMPAY_PROVIDER_H

#include "crmpay.h"
#include "http.h"

struct CrmpayProvider;

/*
 * An account with its secrets opened, as the provider functions see it.
 * Accounts come from a per-backend cache (crmpay_load_account): read-only.
 */
typedef struct CrmpayAccount
{
	char	   *name;
	const struct CrmpayProvider *provider;
	CrmpayJson *credentials;	/* decrypted */
	char	   *webhook_secret; /* decrypted; NULL if the account has none */
	CrmpayJson *settings;
	const char *api_base;		/* settings.api_base or the provider default */
} CrmpayAccount;

/* What the CRM asks for: one payment link for one order. */
typedef struct CrmpayLinkRequest
{
	const char *order_ref;
	int64		amount_minor;
	const char *currency;		/* upper-case ISO 4217 alphabetic code */
	const char *currency_numeric;	/* ISO 4217 numeric code, e.g. "978" */
	int			exponent;		/* ISO 4217 minor-unit exponent */
	const char *email;			/* NULL if none */
	const char *description;	/* NULL if none */
	CrmpayJson *metadata;		/* object of scalar values */
	const char *idempotency_key;
} CrmpayLinkRequest;

typedef struct CrmpayLinkResult
{
	char	   *gateway_ref;	/* the link or session id */
	char	   *url;			/* where the customer pays */
	const char *status;			/* crmpay status, normally "open" */
	TimestampTz expires_at;		/* 0 when the gateway did not say */
} CrmpayLinkResult;

/*
 * The capture step of a gateway whose links only authorise (PayPal: the
 * buyer approves an order, the merchant then captures it).
 */
typedef struct CrmpayCaptureRequest
{
	const char *gateway_ref;	/* the approved link/order */
	int64		amount_minor;	/* what the payment is for */
	const char *currency;
	const char *request_id;		/* idempotency key: the same on every retry */
} CrmpayCaptureRequest;

typedef struct CrmpayCaptureResult
{
	const char *status;			/* crmpay status it proves (paid, processing,
								 * failed), NULL when the gateway's status
								 * is not one we know */
	char	   *gateway_status; /* the gateway's own word, e.g. COMPLETED */
	char	   *order_status;	/* the link/order's status after it, or NULL */
	char	   *capture_id;		/* becomes the payment's gateway_payment_ref */
	int64		amount_minor;	/* captured; -1 when not given */
	char	   *currency;		/* NULL when not given */
} CrmpayCaptureResult;

/* Why a gateway call failed, and whether repeating it may succeed. */
typedef enum CrmpayFailureKind
{
	CRMPAY_FAIL_NONE = 0,
	CRMPAY_FAIL_REJECTED,		/* the request itself is wrong (4xx) */
	CRMPAY_FAIL_AUTH,			/* credentials refused (401/403) */
	CRMPAY_FAIL_CONFLICT,		/* idempotency key reused with other data */
	CRMPAY_FAIL_RATE_LIMITED,	/* 429 */
	CRMPAY_FAIL_UNAVAILABLE,	/* 5xx */
	CRMPAY_FAIL_TRANSPORT,		/* connect, TLS, timeout, dropped */
	CRMPAY_FAIL_BAD_RESPONSE	/* a 2xx we cannot read */
} CrmpayFailureKind;

typedef struct CrmpayGatewayFailure
{
	CrmpayFailureKind kind;
	bool		retryable;
	int			http_status;
	int			retry_after;	/* seconds, -1 if none */
	CrmpayTransport transport;
	char	   *code;			/* gateway's error code or type */
	char	   *message;		/* gateway's own words, for errdetail */
} CrmpayGatewayFailure;

/* One fact a webhook delivery proves, normalised across gateways. */
typedef struct CrmpayWebhookEvent
{
	char	   *event_key;		/* dedupe key: event id or stable composite */
	char	   *event_type;
	char	   *gateway_ref;	/* link/session the event is about */
	char	   *gateway_payment_ref;	/* payment/charge id */
	char	   *order_ref;		/* our order reference, if carried */
	const char *new_status;		/* crmpay status it proves; NULL = none */
	int64		amount_minor;	/* -1 when not given */
	char	   *currency;		/* upper-case; NULL when not given */
	int64		refunded_minor; /* cumulative refunded amount, -1 if n/a */
	int64		refund_minor;	/* one refund's own amount, for gateways that
								 * report refunds one by one (Adyen, Redsys);
								 * webhook.c adds it to the payment's refunded
								 * total, which decides refunded or
								 * partially_refunded; -1 if n/a */
	const char *follow_up;		/* gateway call due once applied ("capture"), or NULL */
	const char *rejected_reason;	/* non-NULL: this event failed its own
									 * authenticity check (one item of a
									 * batch); recorded as rejected, never
									 * applied */
	const char *ignore_reason;	/* non-NULL: authentic but not applicable
								 * (other merchant account, amount not
								 * representable...); recorded as ignored */
} CrmpayWebhookEvent;

/* Result of checking a delivery's authenticity. */
typedef struct CrmpayVerifyResult
{
	bool		valid;
	const char *reason;			/* why not valid (never contains secrets) */
} CrmpayVerifyResult;

/* ----------------------------------------------------------------
 * Reconciliation (reconcile.c): what the gateway says it took.
 * ----------------------------------------------------------------
 */

/*
 * One gateway record, normalised.  record_type says what it proves:
 *	 "link"		a payment link / checkout session / order and its state
 *	 "charge"	an attempt to take money (status paid, processing, failed,
 *				canceled, open); one per gateway payment
 *	 "refund"	one refund of amount_minor (positive)
 *	 "chargeback" a dispute or chargeback of amount_minor
 *	 "balance"	money movement only (fees and net of a charge), no state
 *	 "other"	fees, payouts, corrections: count in the totals only
 * match_key is the value of the payments column the account matches on
 * (order_ref for most gateways, gateway_ref for Redsys); NULL when the
 * record is about no order (fees, payouts, foreign charges).  Amounts are
 * ISO 4217 minor units, CRMPAY_NO_AMOUNT when unknown.  fin_* is the
 * bookkeeping view in the settlement currency (signed: refunds and fees
 * booked against the merchant are negative gross); fin_currency NULL
 * means the record has none.
 */
#define CRMPAY_NO_AMOUNT PG_INT64_MIN

typedef struct CrmpayGatewayRecord
{
	const char *record_type;
	char	   *record_ref;		/* the gateway's id of this record */
	char	   *match_key;
	char	   *order_ref;
	char	   *gateway_ref;
	char	   *gateway_payment_ref;
	const char *status;			/* crmpay status it proves, or NULL */
	char	   *gateway_status; /* the gateway's own words */
	int64		amount_minor;
	char	   *currency;		/* upper-case ISO 4217 */
	int64		refunded_minor; /* cumulative refunds of a charge */
	char	   *fin_currency;
	int64		fin_amount_minor;	/* gross booked */
	int64		fee_minor;
	int64		net_minor;
	TimestampTz occurred_at;	/* gateway's creation time; 0 unknown */
	int			line_no;		/* report line (imports), 0 otherwise */
} CrmpayGatewayRecord;

/*
 * Where a listing is.  The driver keeps it between pages (across
 * transactions for the worker) as JSON in the run row; stream and cursor
 * belong to the provider (e.g. Stripe: which list, and starting_after).
 */
typedef struct CrmpayFetchState
{
	TimestampTz since;			/* list records created in [since, until] */
	TimestampTz until;
	int			page_size;		/* records per page the driver asks for */
	int			stream;			/* provider's: which list, from 0 */
	char	   *cursor;			/* provider's: position in it; NULL = start */
	bool		done;			/* set when every list is exhausted */
} CrmpayFetchState;

/* One CRM payment whose state the driver asks the gateway about. */
typedef struct CrmpayOrderQuery
{
	int64		payment_id;
	const char *order_ref;
	const char *gateway_ref;	/* link id, or Redsys Ds_Order */
	const char *gateway_payment_ref;
	int64		amount_minor;
	const char *currency;
	const char *status;			/* CRM status now */
} CrmpayOrderQuery;

typedef struct CrmpayProvider
{
	const char *name;
	const char *default_api_base;
	const char *webhook_ack;	/* reply body for an accepted delivery */

	/*
	 * Name of the credentials member that also signs webhooks, for gateways
	 * with one key for both (Redsys); NULL when webhooks have their own
	 * secret (webhook_secret).
	 */
	const char *webhook_secret_credential;

	/* Checks the credentials/settings shapes for add_account; ERROR if bad. */
	void		(*validate_account) (const CrmpayJson *credentials,
									 const CrmpayJson *settings,
									 const char *webhook_secret);
	/* Refuses amounts/currencies the gateway does not take; ERROR if bad. */
	void		(*check_amount) (const char *currency, int exponent,
								 int64 amount_minor);
	/* Builds the create-link HTTP request. */
	void		(*build_create_link) (const CrmpayAccount *account,
									  const CrmpayLinkRequest *request,
									  CrmpayHttpRequest *out);
	/*
	 * Optional: makes the link without calling the gateway (Redsys' signed
	 * redirect form) and returns true; false to go through
	 * build_create_link and HTTP.
	 */
	bool		(*local_link) (const CrmpayAccount *account,
							   const CrmpayLinkRequest *request,
							   CrmpayLinkResult *result);
	/*
	 * Reads a 2xx answer into *result; false + *failure if unreadable (or
	 * refused in a 2xx, with failure->kind set by the provider).
	 */
	bool		(*parse_create_link) (const CrmpayAccount *account,
									  const CrmpayHttpResponse *response,
									  CrmpayLinkResult *result,
									  CrmpayGatewayFailure *failure);
	/* Fills code/message of a non-2xx answer from the gateway's error body. */
	void		(*parse_error) (const CrmpayHttpResponse *response,
								CrmpayGatewayFailure *failure);
	/* Checks authenticity of a delivery; never raises for bad input. */
	CrmpayVerifyResult (*verify_webhook) (const char *secret,
										  const CrmpayHeaders *headers,
										  const char *body, size_t body_len,
										  int64 tolerance_s, TimestampTz at);
	/* Turns an authentic delivery into events; NULL + *reason if unusable. */
	List	   *(*parse_webhook) (const CrmpayHeaders *headers,
								  const char *body, size_t body_len,
								  const char **reason);

	/*
	 * Optional.  Gives a request its credentials just before it is sent
	 * (an OAuth bearer token, say); refresh is true after the gateway
	 * answered 401 to the previous ones.  false + *failure when no
	 * credentials could be had.  Used by crmpay_gateway_call.
	 */
	bool		(*authorize) (const CrmpayAccount *account,
							  CrmpayHttpRequest *request, bool refresh,
							  CrmpayGatewayFailure *failure);
	/*
	 * Optional.  Checks a delivery with the whole account at hand (its
	 * settings may ask for the gateway's online check); receive_webhook
	 * prefers it to verify_webhook.  Never raises for bad input.
	 */
	CrmpayVerifyResult (*verify_account_webhook) (const CrmpayAccount *account,
												  const CrmpayHeaders *headers,
												  const char *body, size_t body_len,
												  int64 tolerance_s, TimestampTz at);

	/*
	 * Optional, for gateways that sign each event of a batch on its own
	 * (Adyen): checks and parses a delivery in one pass.  Returns every
	 * event, each one that fails its own check carrying rejected_reason;
	 * NIL + *reason when the delivery as a whole is unusable.  account is
	 * the receiving account (NULL from crmpay.verify_signature).  When set,
	 * receive_webhook uses it instead of verify_webhook + parse_webhook.
	 */
	List	   *(*receive_events) (const struct CrmpayAccount *account,
								   const char *secret,
								   const CrmpayHeaders *headers,
								   const char *body, size_t body_len,
								   int64 tolerance_s, TimestampTz at,
								   const char **reason);

	/*
	 * Optional link lookups (crmpay.refresh_payment, expire_payment_link):
	 * build the request that reads a link's current state, the one that
	 * expires it, and read either 2xx answer into *result (status and
	 * expires_at; gateway_ref and url may stay NULL).
	 */
	void		(*build_get_link) (const struct CrmpayAccount *account,
								   const char *gateway_ref,
								   CrmpayHttpRequest *out);
	void		(*build_expire_link) (const struct CrmpayAccount *account,
									  const char *gateway_ref,
									  CrmpayHttpRequest *out);
	bool		(*parse_link_state) (const struct CrmpayAccount *account,
									 const CrmpayHttpResponse *response,
									 CrmpayLinkResult *result,
									 CrmpayGatewayFailure *failure);

	/*
	 * Optional capture step (PayPal), shared by crmpay.capture_payment
	 * (sync) and the worker's 'capture' jobs: build the request; read a 2xx
	 * answer into *result (false + *failure if unreadable).  parse must not
	 * touch the database.  authorize, when set, adds the credentials.
	 */
	void		(*build_capture) (const struct CrmpayAccount *account,
								  const CrmpayCaptureRequest *request,
								  CrmpayHttpRequest *out);
	bool		(*parse_capture) (const struct CrmpayAccount *account,
								  const CrmpayHttpResponse *response,
								  CrmpayCaptureResult *result,
								  CrmpayGatewayFailure *failure);

	/*
	 * Reconciliation, listing mode (Stripe, PayPal): build the request for
	 * the next page of records created in [state->since, state->until];
	 * read a 2xx answer into records (List of CrmpayGatewayRecord *) and
	 * advance *state (next stream/cursor, done).  false + *failure if the
	 * answer is unreadable.  parse must not touch the database: the worker
	 * calls it outside any transaction.
	 */
	void		(*build_list_records) (const struct CrmpayAccount *account,
									   const CrmpayFetchState *state,
									   CrmpayHttpRequest *out);
	bool		(*parse_list_records) (const struct CrmpayAccount *account,
									   const CrmpayHttpResponse *response,
									   CrmpayFetchState *state,
									   List **records,
									   CrmpayGatewayFailure *failure);

	/*
	 * Reconciliation, per-order mode (Redsys): ask for one order's state;
	 * the driver calls it for every payment of the window that is still
	 * pending in the CRM or that no other source reported.  build returns
	 * false when there is nothing to ask for this order (no gateway
	 * reference yet).  A 404, or a 2xx answer for an order the gateway does
	 * not know, gives no records.  parse returns false + *failure when the
	 * answer is unreadable (kind left NONE: the driver makes it
	 * BAD_RESPONSE) or is an error of the gateway's (kind set by parse).
	 * parse must not touch the database.
	 */
	bool		(*build_query_order) (const struct CrmpayAccount *account,
									  const CrmpayOrderQuery *order,
									  CrmpayHttpRequest *out);
	bool		(*parse_query_order) (const struct CrmpayAccount *account,
									  const CrmpayOrderQuery *order,
									  const CrmpayHttpResponse *response,
									  List **records,
									  CrmpayGatewayFailure *failure);
} CrmpayProvider;

extern const CrmpayProvider *crmpay_find_provider(const char *name,
												  bool missing_ok);
extern const char *crmpay_provider_names(void);
extern CrmpayAccount *crmpay_load_account(const char *name, bool missing_ok);
extern const char *crmpay_setting(const CrmpayAccount *account,
								  const char *key);
extern bool crmpay_unreadable_answer(const CrmpayHttpResponse *response,
									 CrmpayGatewayFailure *failure);
extern bool crmpay_link_prepare(const CrmpayAccount *account,
								const CrmpayLinkRequest *request,
								CrmpayHttpRequest *http,
								CrmpayLinkResult *result);
extern bool crmpay_link_finish(const CrmpayAccount *account,
							   const CrmpayHttpResponse *response,
							   CrmpayLinkResult *result,
							   CrmpayGatewayFailure *failure);
extern CrmpayLinkRequest *crmpay_link_request_from_json(CrmpayJson *tree);
extern void crmpay_capture_prepare(const CrmpayAccount *account,
								   const CrmpayCaptureRequest *request,
								   CrmpayHttpRequest *http);
extern bool crmpay_capture_finish(const CrmpayAccount *account,
								  const CrmpayHttpResponse *response,
								  CrmpayCaptureResult *result,
								  CrmpayGatewayFailure *failure);
extern CrmpayCaptureRequest *crmpay_capture_request_from_json(CrmpayJson *tree);
extern char *crmpay_capture_result_json(const CrmpayCaptureResult *result);
extern char *crmpay_link_result_json(const CrmpayLinkResult *result);
extern bool crmpay_create_link(const CrmpayAccount *account,
							   const CrmpayLinkRequest *request,
							   CrmpayLinkResult *result,
							   CrmpayGatewayFailure *failure);
extern void crmpay_classify_http_failure(const CrmpayAccount *account,
										 const CrmpayHttpResponse *response,
										 CrmpayGatewayFailure *failure);
extern void crmpay_raise_gateway_failure(const CrmpayAccount *account,
										 const CrmpayGatewayFailure *failure)
			pg_attribute_noreturn();
extern const char *crmpay_failure_kind_name(CrmpayFailureKind kind);
extern char *crmpay_describe_failure(const CrmpayAccount *account,
									 const CrmpayGatewayFailure *failure);
extern const char *crmpay_failure_sqlstate(const CrmpayGatewayFailure *failure);
extern bool crmpay_gateway_call(const CrmpayAccount *account,
								CrmpayHttpRequest *request,
								CrmpayHttpResponse *response,
								CrmpayGatewayFailure *failure);

/* Helpers for provider files */
extern CrmpayWebhookEvent *crmpay_new_event(void);
extern CrmpayGatewayRecord *crmpay_new_record(const char *record_type);
extern char *crmpay_pstrdup_or_null(const char *s);
extern char *crmpay_header_line(const char *name, const char *value);

/* The providers (one file each) */
extern const CrmpayProvider crmpay_stripe_provider;
extern const CrmpayProvider crmpay_redsys_provider;
extern const CrmpayProvider crmpay_paypal_provider;
extern const CrmpayProvider crmpay_braintree_provider;

/* paypal.c: its GUCs, and decimal amounts (also used by braintree.c) */
extern char *crmpay_paypal_cert_hosts;
extern void crmpay_paypal_define_gucs(void);
extern int	crmpay_iso_exponent(const char *currency);
extern bool crmpay_decimal_to_minor(const char *value, int exponent,
									int64 *out);
extern char *crmpay_minor_to_decimal(int64 amount_minor, int exponent);
extern const CrmpayProvider crmpay_adyen_provider;

#endif							/* CRMPAY_PROVIDER_H */
