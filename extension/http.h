/*-------------------------------------------------------------------------
 *
 * http.h
 *	  Gateway HTTP through libcurl: the only module that includes curl.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CRMPAY_HTTP_H
#define CRMPAY_HTTP_H

#include "crmpay.h"

/* What happened on the wire, before looking at the HTTP status. */
typedef enum CrmpayTransport
{
	CRMPAY_TRANSPORT_OK = 0,	/* an HTTP response arrived (any status) */
	CRMPAY_TRANSPORT_CONNECT,	/* DNS, refused, unreachable */
	CRMPAY_TRANSPORT_TLS,		/* handshake or certificate verification */
	CRMPAY_TRANSPORT_TIMEOUT,	/* connect or total timeout */
	CRMPAY_TRANSPORT_BROKEN,	/* dropped connection, garbled response */
	CRMPAY_TRANSPORT_TOO_LARGE	/* response larger than we accept */
} CrmpayTransport;

typedef struct CrmpayHttpRequest
{
	const char *method;			/* "GET", "POST", "PATCH" */
	const char *url;
	List	   *headers;		/* of char * "Name: value" */
	const char *body;			/* NULL for none */
	size_t		body_len;
	size_t		max_response_bytes; /* 0: the default limit (8 MB) */
} CrmpayHttpRequest;

typedef struct CrmpayHttpResponse
{
	CrmpayTransport transport;
	long		status;			/* HTTP status, 0 if none */
	char	   *body;			/* palloc'd, NUL-terminated */
	size_t		body_len;
	int			retry_after;	/* seconds from Retry-After, -1 if absent */
	char	   *request_id;		/* gateway's request id header, if any */
	char	   *error;			/* curl's explanation for transport errors */
} CrmpayHttpResponse;

/* One e-mail for SMTP delivery (the worker's send_email jobs). */
typedef struct CrmpaySmtpRequest
{
	const char *url;			/* crmpay.smtp_url */
	const char *mail_from;		/* envelope sender, a bare address */
	const char *rcpt_to;		/* envelope recipient, a bare address */
	const char *message;		/* the whole RFC 5322 message, CRLF lines */
	size_t		message_len;
} CrmpaySmtpRequest;

/* Many concurrent transfers (libcurl multi); process-local, opaque. */
typedef struct CrmpayMulti CrmpayMulti;

extern void crmpay_http_check_url(const char *url, const char *what);
extern bool crmpay_smtp_url_ok(const char *url);
extern void crmpay_smtp_check_url(const char *url);
extern const char *crmpay_http_library_versions(void);
extern void crmpay_http_perform(const CrmpayHttpRequest *request,
								CrmpayHttpResponse *response);
extern const char *crmpay_transport_name(CrmpayTransport transport);

extern CrmpayMulti *crmpay_multi_create(int max_total, int max_per_host);
extern void crmpay_multi_set_limits(CrmpayMulti *m, int max_total, int max_per_host);
extern void crmpay_multi_add_http(CrmpayMulti *m, const CrmpayHttpRequest *request,
								  int64 tag);
extern void crmpay_multi_add_smtp(CrmpayMulti *m, const CrmpaySmtpRequest *request,
								  int64 tag);
extern int	crmpay_multi_pending(const CrmpayMulti *m);
extern int	crmpay_multi_run(CrmpayMulti *m, int timeout_ms);
extern bool crmpay_multi_peek_done(const CrmpayMulti *m, int64 *tag);
extern bool crmpay_multi_next_done(CrmpayMulti *m, int64 *tag,
								   CrmpayHttpResponse *response);
extern void crmpay_multi_abort_all(CrmpayMulti *m);
extern void crmpay_multi_destroy(CrmpayMulti *m);
extern void crmpay_url_append_escaped(StringInfo buf, const char *s);

#endif							/* CRMPAY_HTTP_H */
