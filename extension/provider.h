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
} CrmpayWebhookEvent;

/* Result of checking a delivery's authenticity. */
typedef struct CrmpayVerifyResult
{
	bool		valid;
	const char *reason;			/* why not valid (never contains secrets) */
} CrmpayVerifyResult;

typedef struct CrmpayProvider
{
	const char *name;
	const char *default_api_base;
	const char *webhook_ack;	/* reply body for an accepted delivery */

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
	/* Reads a 2xx answer into *result; false + *failure if unreadable. */
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
} CrmpayProvider;

extern const CrmpayProvider *crmpay_find_provider(const char *name,
												  bool missing_ok);
extern const char *crmpay_provider_names(void);
extern CrmpayAccount *crmpay_load_account(const char *name, bool missing_ok);
extern const char *crmpay_setting(const CrmpayAccount *account,
								  const char *key);
extern void crmpay_link_prepare(const CrmpayAccount *account,
								const CrmpayLinkRequest *request,
								CrmpayHttpRequest *http);
extern bool crmpay_link_finish(const CrmpayAccount *account,
							   const CrmpayHttpResponse *response,
							   CrmpayLinkResult *result,
							   CrmpayGatewayFailure *failure);
extern CrmpayLinkRequest *crmpay_link_request_from_json(CrmpayJson *tree);
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

/* Helpers for provider files */
extern CrmpayWebhookEvent *crmpay_new_event(void);
extern char *crmpay_pstrdup_or_null(const char *s);
extern char *crmpay_header_line(const char *name, const char *value);

/* The providers (one file each) */
extern const CrmpayProvider crmpay_stripe_provider;

#endif							/* CRMPAY_PROVIDER_H */
