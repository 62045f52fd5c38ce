/*-------------------------------------------------------------------------
 *
 * http.c
 *	  Gateway HTTP through libcurl.  This is the only file that includes
 *	  curl.h.
 *
 *	  Rules kept here:
 *	  - libcurl is initialised lazily in the process that uses it, never in
 *		the postmaster (a forked child must not share curl state).
 *	  - TLS peer and host verification are always on; crmpay.ca_file may
 *		name the CA bundle to trust instead of the system's.  Only https://
 *		is allowed unless crmpay.allow_insecure_http is on; redirects are
 *		never followed.
 *	  - The transfer is interruptible: a progress callback aborts it when a
 *		cancel or terminate request (pg_cancel_backend, statement_timeout)
 *		is pending, and CHECK_FOR_INTERRUPTS then raises the usual error
 *		after everything has been freed.
 *	  - curl callbacks never call palloc or ereport (a longjmp through curl
 *		would leak its state); they fill malloc'd buffers that are copied
 *		into palloc'd memory and freed before anything can raise an ERROR.
 *	  - One easy handle is kept per process so connections and TLS sessions
 *		are reused across calls; it is reset before each request.
 *	  - The background worker runs many requests (and SMTP deliveries) at
 *		once through the multi interface below; every transfer, sync or
 *		not, gets its TLS, trust, protocol and timeout options from the same
 *		setup_common(), so the rules above hold for all of them.
 *
 *-------------------------------------------------------------------------
 */
#include "http.h"

#include <curl/curl.h>

#include "codec.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/wait_event.h"

/* libcurl 7.85 brought CURLOPT_PROTOCOLS_STR; Debian 12 ships 7.88. */
_Static_assert(LIBCURL_VERSION_NUM >= 0x075500, "crmpay needs libcurl 7.85 or newer");

/*
 * Responses larger than this are refused: no API answer comes near it.
 * Report downloads ask for more (max_response_bytes), up to the largest
 * text value.
 */
#define MAX_RESPONSE_BYTES (8 * 1024 * 1024)
#define MAX_REPORT_BYTES ((size_t) 1024 * 1024 * 1024 - 1024)

/* A growable malloc'd buffer filled from curl callbacks. */
typedef struct CurlSink
{
	char	   *data;
	size_t		len;
	size_t		cap;
	bool		too_large;
	size_t		max_len;
	int			retry_after;
	char		request_id[128];
} CurlSink;

static bool curl_initialised = false;
static CURL *shared_handle = NULL;

/* Initialises libcurl in this process (never in the postmaster). */
static void
ensure_curl_global(void)
{
	if (!curl_initialised)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			ereport(ERROR,
					(errcode(ERRCODE_SYSTEM_ERROR),
					 errmsg("could not initialise libcurl")));
		curl_initialised = true;
	}
}

/*
 * ensure_curl
 *		Initialises libcurl in this process (not in the postmaster) and
 *		returns the process's reusable easy handle, reset to defaults.
 */
static CURL *
ensure_curl(void)
{
	ensure_curl_global();
	if (shared_handle == NULL)
	{
		shared_handle = curl_easy_init();
		if (shared_handle == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("could not create a libcurl handle")));
	}
	else
		curl_easy_reset(shared_handle);
	return shared_handle;
}

/* Protocols gateway requests may use (checked by curl as well as by us). */
static const char *
http_protocols(void)
{
	return crmpay_allow_insecure_http ? "http,https" : "https";
}

/* "libcurl 7.88.1, OpenSSL/3.0.11": for the worker's start-up log line. */
const char *
crmpay_http_library_versions(void)
{
	curl_version_info_data *info = curl_version_info(CURLVERSION_NOW);

	return psprintf("libcurl %s, %s", info->version,
					info->ssl_version ? info->ssl_version : "no TLS library");
}

static size_t
sink_write(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	CurlSink   *sink = userdata;
	size_t		n = size * nmemb;

	/* max_len 0 means the default limit for API answers */
	if (sink->len + n > (sink->max_len ? sink->max_len : MAX_RESPONSE_BYTES))
	{
		sink->too_large = true;
		return 0;				/* makes curl stop with CURLE_WRITE_ERROR */
	}
	if (sink->len + n + 1 > sink->cap)
	{
		size_t		newcap = sink->cap ? sink->cap : 4096;
		char	   *grown;

		while (newcap < sink->len + n + 1)
			newcap *= 2;
		grown = realloc(sink->data, newcap);
		if (grown == NULL)
			return 0;
		sink->data = grown;
		sink->cap = newcap;
	}
	memcpy(sink->data + sink->len, ptr, n);
	sink->len += n;
	return n;
}

/* Header callback: picks out Retry-After and the gateway's request id. */
static size_t
sink_header(char *buffer, size_t size, size_t nitems, void *userdata)
{
	CurlSink   *sink = userdata;
	size_t		n = size * nitems;
	const char *colon = memchr(buffer, ':', n);
	size_t		namelen;
	const char *value;
	size_t		valuelen;

	if (colon == NULL)
		return n;
	namelen = colon - buffer;
	value = colon + 1;
	valuelen = n - namelen - 1;
	while (valuelen > 0 && (*value == ' ' || *value == '\t'))
	{
		value++;
		valuelen--;
	}
	while (valuelen > 0 && (value[valuelen - 1] == '\r' || value[valuelen - 1] == '\n' ||
							value[valuelen - 1] == ' '))
		valuelen--;

	if (namelen == 11 && pg_strncasecmp(buffer, "retry-after", 11) == 0)
	{
		int64_t		seconds;

		if (crmpay_parse_int64(value, valuelen, &seconds))
			sink->retry_after = (int) Min(seconds, 86400);
	}
	else if ((namelen == 10 && pg_strncasecmp(buffer, "request-id", 10) == 0) ||
			 (namelen == 14 && pg_strncasecmp(buffer, "paypal-debug-id", 14) == 0) ||
			 (namelen == 12 && pg_strncasecmp(buffer, "pspreference", 12) == 0))
	{
		size_t		copy = Min(valuelen, sizeof(sink->request_id) - 1);

		memcpy(sink->request_id, value, copy);
		sink->request_id[copy] = '\0';
	}
	return n;
}

/*
 * Progress callback: a non-zero return aborts the transfer.  Reading the
 * interrupt flags is async-signal-safe; acting on them happens after curl
 * has returned.
 */
static int
progress_check_interrupts(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
						  curl_off_t ultotal, curl_off_t ulnow)
{
	return (QueryCancelPending || ProcDiePending) ? 1 : 0;
}

/*
 * crmpay_http_check_url
 *		Refuses URLs crmpay must not call: anything but https://, or http://
 *		when crmpay.allow_insecure_http is off.  "what" names the setting the
 *		URL came from, for the error message.
 */
void
crmpay_http_check_url(const char *url, const char *what)
{
	if (pg_strncasecmp(url, "https://", 8) == 0 && url[8] != '\0')
		return;
	if (pg_strncasecmp(url, "http://", 7) == 0 && url[7] != '\0')
	{
		if (crmpay_allow_insecure_http)
			return;
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s uses plain http, which crmpay refuses", what),
				 errdetail("Gateway traffic carries credentials and must use TLS."),
				 errhint("Use an https:// URL. For a local test double only, a superuser may set crmpay.allow_insecure_http = on.")));
	}
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("%s is not an http(s) URL", what),
			 errhint("Gateway base URLs look like https://api.example.com.")));
}

const char *
crmpay_transport_name(CrmpayTransport transport)
{
	switch (transport)
	{
		case CRMPAY_TRANSPORT_OK:
			return "ok";
		case CRMPAY_TRANSPORT_CONNECT:
			return "connection failed";
		case CRMPAY_TRANSPORT_TLS:
			return "TLS failure";
		case CRMPAY_TRANSPORT_TIMEOUT:
			return "timed out";
		case CRMPAY_TRANSPORT_BROKEN:
			return "connection broken";
		case CRMPAY_TRANSPORT_TOO_LARGE:
			return "response too large";
	}
	return "unknown";
}

static CrmpayTransport
classify_curl_error(CURLcode rc)
{
	switch (rc)
	{
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_RESOLVE_PROXY:
		case CURLE_COULDNT_CONNECT:
			return CRMPAY_TRANSPORT_CONNECT;
		case CURLE_OPERATION_TIMEDOUT:
			return CRMPAY_TRANSPORT_TIMEOUT;
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_PEER_FAILED_VERIFICATION:
		case CURLE_SSL_CERTPROBLEM:
		case CURLE_SSL_CIPHER:
		case CURLE_SSL_CACERT_BADFILE:
		case CURLE_SSL_ISSUER_ERROR:
		case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
		case CURLE_SSL_INVALIDCERTSTATUS:
			return CRMPAY_TRANSPORT_TLS;
		default:
			return CRMPAY_TRANSPORT_BROKEN;
	}
}

/*
 * Options every transfer gets, whatever its protocol: TLS verification
 * and trust, timeouts, no signals, no redirects, the interrupt check and
 * the response sink.  Returns false if curl refused an option.
 */
static bool
setup_common(CURL *curl, const char *url, const char *protocols,
			 CurlSink *sink, char *errbuf)
{
	bool		ok = true;

#define SETOPT(opt, val) (ok = ok && curl_easy_setopt(curl, opt, val) == CURLE_OK)
	SETOPT(CURLOPT_URL, url);
	SETOPT(CURLOPT_PROTOCOLS_STR, protocols);
	SETOPT(CURLOPT_FOLLOWLOCATION, 0L);
	SETOPT(CURLOPT_SSL_VERIFYPEER, 1L);
	SETOPT(CURLOPT_SSL_VERIFYHOST, 2L);
	if (crmpay_ca_file != NULL && crmpay_ca_file[0] != '\0')
		SETOPT(CURLOPT_CAINFO, crmpay_ca_file);
	SETOPT(CURLOPT_CONNECTTIMEOUT_MS, (long) crmpay_connect_timeout_ms);
	SETOPT(CURLOPT_TIMEOUT_MS, (long) crmpay_request_timeout_ms);
	SETOPT(CURLOPT_NOSIGNAL, 1L);
	SETOPT(CURLOPT_ERRORBUFFER, errbuf);
	SETOPT(CURLOPT_WRITEFUNCTION, sink_write);
	SETOPT(CURLOPT_WRITEDATA, sink);
	SETOPT(CURLOPT_HEADERFUNCTION, sink_header);
	SETOPT(CURLOPT_HEADERDATA, sink);
	SETOPT(CURLOPT_NOPROGRESS, 0L);
	SETOPT(CURLOPT_XFERINFOFUNCTION, progress_check_interrupts);
#undef SETOPT
	return ok;
}

/*
 * Builds the malloc'd header list of an HTTP request (plus "Expect:", which
 * suppresses curl's 100-continue round trip).  NULL if out of memory.
 */
static struct curl_slist *
http_header_list(const CrmpayHttpRequest *request)
{
	struct curl_slist *headers = NULL;
	struct curl_slist *grown;
	ListCell   *lc;

	foreach(lc, request->headers)
	{
		grown = curl_slist_append(headers, (const char *) lfirst(lc));
		if (grown == NULL)
		{
			curl_slist_free_all(headers);
			return NULL;
		}
		headers = grown;
	}
	grown = curl_slist_append(headers, "Expect:");
	if (grown == NULL)
		curl_slist_free_all(headers);
	return grown;
}

/* The HTTP-specific options: method, headers, body. */
static bool
setup_http(CURL *curl, const CrmpayHttpRequest *request,
		   struct curl_slist *headers, const char *body)
{
	bool		ok = true;

#define SETOPT(opt, val) (ok = ok && curl_easy_setopt(curl, opt, val) == CURLE_OK)
	SETOPT(CURLOPT_HTTPHEADER, headers);
	SETOPT(CURLOPT_USERAGENT, "crmpay/1.0");
	SETOPT(CURLOPT_CUSTOMREQUEST, request->method);
	if (body != NULL)
	{
		SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) request->body_len);
		SETOPT(CURLOPT_POSTFIELDS, body);
	}
	else if (strcmp(request->method, "GET") == 0)
		SETOPT(CURLOPT_HTTPGET, 1L);
#undef SETOPT
	return ok;
}

/*
 * Fills *response (palloc'd copies) from a finished transfer and frees the
 * sink's malloc'd buffer.  Never raises: false when out of memory (the
 * caller raises once its own malloc'd state is freed).
 */
static bool
fill_response(CURL *curl, CURLcode rc, CurlSink *sink, const char *errbuf,
			  CrmpayHttpResponse *response)
{
	memset(response, 0, sizeof(*response));
	/* the last HTTP status or SMTP reply code, 0 when none arrived */
	curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response->status);

	response->body = palloc_extended(sink->len + 1, MCXT_ALLOC_NO_OOM);
	if (response->body == NULL)
	{
		free(sink->data);
		sink->data = NULL;
		return false;
	}
	if (sink->len > 0)
		memcpy(response->body, sink->data, sink->len);
	response->body[sink->len] = '\0';
	response->body_len = sink->len;
	free(sink->data);
	sink->data = NULL;

	response->retry_after = sink->retry_after;
	response->request_id = sink->request_id[0] ? pstrdup(sink->request_id) : NULL;
	if (sink->too_large)
		response->transport = CRMPAY_TRANSPORT_TOO_LARGE;
	else if (rc == CURLE_ABORTED_BY_CALLBACK)
		response->transport = CRMPAY_TRANSPORT_BROKEN;
	else if (rc != CURLE_OK)
		response->transport = classify_curl_error(rc);
	else
		response->transport = CRMPAY_TRANSPORT_OK;
	if (rc == CURLE_ABORTED_BY_CALLBACK)
		response->error = pstrdup("transfer interrupted (server shutting down or worker terminated)");
	else if (rc != CURLE_OK)
		response->error = pstrdup(errbuf[0] ? errbuf : curl_easy_strerror(rc));
	return true;
}

static void
raise_response_oom(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_OUT_OF_MEMORY),
			 errmsg("out of memory for a gateway response")));
}

/*
 * crmpay_http_perform
 *		Runs one request synchronously.  Transport failures and HTTP error
 *		statuses are reported in *response, not raised: the caller maps them
 *		to gateway errors.  Raises only for cancel/terminate requests (after
 *		cleanup) and for setup failures.
 */
void
crmpay_http_perform(const CrmpayHttpRequest *request, CrmpayHttpResponse *response)
{
	CURL	   *curl;
	struct curl_slist *headers;
	CurlSink	sink = {0};
	char		errbuf[CURL_ERROR_SIZE];
	CURLcode	rc = CURLE_OK;
	bool		setup_ok;

	crmpay_http_check_url(request->url, "gateway URL");
	curl = ensure_curl();

	memset(response, 0, sizeof(*response));
	response->retry_after = -1;
	sink.retry_after = -1;
	sink.max_len = request->max_response_bytes > 0
		? Min(request->max_response_bytes, MAX_REPORT_BYTES) : MAX_RESPONSE_BYTES;
	errbuf[0] = '\0';

	headers = http_header_list(request);
	setup_ok = headers != NULL &&
		setup_common(curl, request->url, http_protocols(), &sink, errbuf) &&
		setup_http(curl, request, headers, request->body);

	if (setup_ok)
	{
		pgstat_report_wait_start(PG_WAIT_EXTENSION);
		rc = curl_easy_perform(curl);
		pgstat_report_wait_end();
	}

	/* Nothing below may raise an ERROR until the malloc'd state is freed. */
	curl_easy_setopt(curl, CURLOPT_HTTPHEADER, NULL);
	curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, NULL);
	curl_slist_free_all(headers);

	if (!setup_ok)
	{
		free(sink.data);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not set up a gateway request")));
	}

	if (rc == CURLE_ABORTED_BY_CALLBACK)
	{
		free(sink.data);
		/* Raises the pending cancel or terminate error. */
		CHECK_FOR_INTERRUPTS();
		ereport(ERROR,
				(errcode(ERRCODE_QUERY_CANCELED),
				 errmsg("gateway request interrupted")));
	}

	if (!fill_response(curl, rc, &sink, errbuf, response))
		raise_response_oom();
}

/* ----------------------------------------------------------------
 * Many transfers at once: the libcurl multi interface
 *
 * Used by the background worker.  Everything here lives in malloc'd,
 * process-local memory (never in shared memory, never in a memory context
 * that an ERROR could reset under curl's feet).  Requests are copied when
 * added, so the caller's memory may go away while they are in flight.
 *
 * Concurrency is capped twice: the caller adds at most max_total transfers
 * (the worker claims no more jobs than that), and at most max_per_host of
 * them run against one scheme://host:port at a time; the rest wait here in
 * a per-host FIFO, not inside curl, so a queued request's timeout only
 * starts when it really starts.
 * ----------------------------------------------------------------
 */
typedef struct Transfer
{
	struct Transfer *next;		/* in its host queue or the done list */
	struct Transfer *prev_active;	/* in the list of transfers inside curl */
	struct Transfer *next_active;
	CURL	   *easy;
	struct curl_slist *list;	/* HTTP headers, or SMTP recipients */
	CurlSink	sink;
	char		errbuf[CURL_ERROR_SIZE];
	int64		tag;
	int			host;			/* index into CrmpayMulti.hosts */
	CURLcode	result;
	char	   *url;			/* malloc'd copies that curl reads */
	char	   *body;
	size_t		body_len;
	size_t		body_sent;		/* SMTP upload cursor */
	char	   *mail_from;
} Transfer;

typedef struct HostQueue
{
	char	   *key;			/* "https://api.stripe.com:443", malloc'd */
	int			active;			/* transfers of this host inside curl */
	Transfer   *head;			/* waiting for a slot */
	Transfer   *tail;
} HostQueue;

struct CrmpayMulti
{
	CURLM	   *multi;
	int			max_total;
	int			max_per_host;
	int			active;			/* inside curl */
	int			waiting;		/* in host queues */
	int			ndone;
	HostQueue  *hosts;
	int			nhosts;
	Transfer   *done_head;
	Transfer   *done_tail;
	Transfer   *active_head;	/* inside curl */
	CURL	  **spare;			/* reset easy handles kept for reuse */
	int			nspare;
};

/* Frees a transfer and keeps its easy handle for reuse (or frees it). */
static void
transfer_free(CrmpayMulti *m, Transfer *t)
{
	if (t->easy != NULL)
	{
		if (m->nspare < m->max_total)
		{
			curl_easy_reset(t->easy);
			m->spare[m->nspare++] = t->easy;
		}
		else
			curl_easy_cleanup(t->easy);
	}
	curl_slist_free_all(t->list);
	free(t->sink.data);
	free(t->url);
	free(t->body);
	free(t->mail_from);
	free(t);
}

/* Index of the host queue for a URL's scheme://authority, created if new. */
static int
host_index(CrmpayMulti *m, const char *url)
{
	const char *p = strstr(url, "://");
	size_t		len;
	int			i;
	HostQueue  *grown;

	p = p ? p + 3 : url;
	len = (p - url) + strcspn(p, "/?#");
	for (i = 0; i < m->nhosts; i++)
		if (strlen(m->hosts[i].key) == len && strncmp(m->hosts[i].key, url, len) == 0)
			return i;
	grown = realloc(m->hosts, sizeof(HostQueue) * (m->nhosts + 1));
	if (grown == NULL)
		return -1;
	m->hosts = grown;
	memset(&m->hosts[m->nhosts], 0, sizeof(HostQueue));
	m->hosts[m->nhosts].key = strndup(url, len);
	if (m->hosts[m->nhosts].key == NULL)
		return -1;
	return m->nhosts++;
}

/* Hands waiting transfers to curl while their hosts have free slots. */
static void
start_waiting(CrmpayMulti *m)
{
	int			i;

	for (i = 0; i < m->nhosts && m->waiting > 0; i++)
	{
		HostQueue  *h = &m->hosts[i];

		while (h->head != NULL && h->active < m->max_per_host)
		{
			Transfer   *t = h->head;

			h->head = t->next;
			if (h->head == NULL)
				h->tail = NULL;
			t->next = NULL;
			m->waiting--;
			if (curl_multi_add_handle(m->multi, t->easy) != CURLM_OK)
			{
				/* finish it at once as a failed transfer */
				t->result = CURLE_OUT_OF_MEMORY;
				if (m->done_tail)
					m->done_tail->next = t;
				else
					m->done_head = t;
				m->done_tail = t;
				m->ndone++;
				continue;
			}
			h->active++;
			m->active++;
			t->prev_active = NULL;
			t->next_active = m->active_head;
			if (m->active_head)
				m->active_head->prev_active = t;
			m->active_head = t;
		}
	}
}

/*
 * crmpay_multi_create
 *		A multi handle for up to max_total concurrent transfers, at most
 *		max_per_host of them to one host.  Process-local; lives until
 *		crmpay_multi_destroy.
 */
CrmpayMulti *
crmpay_multi_create(int max_total, int max_per_host)
{
	CrmpayMulti *m;

	ensure_curl_global();
	m = calloc(1, sizeof(CrmpayMulti));
	if (m == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	m->multi = curl_multi_init();
	if (m->multi == NULL)
	{
		free(m);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl multi handle")));
	}
	crmpay_multi_set_limits(m, max_total, max_per_host);
	return m;
}

/* Changes the caps (after a configuration reload). */
void
crmpay_multi_set_limits(CrmpayMulti *m, int max_total, int max_per_host)
{
	CURL	  **spare;

	max_total = Max(max_total, 1);
	max_per_host = Max(Min(max_per_host, max_total), 1);
	/* drop spare handles beyond the new total before shrinking the array */
	while (m->nspare > max_total)
		curl_easy_cleanup(m->spare[--m->nspare]);
	spare = realloc(m->spare, sizeof(CURL *) * max_total);
	if (spare == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	m->spare = spare;
	m->max_total = max_total;
	m->max_per_host = max_per_host;
	/* curl's own caps match ours; its connection cache keeps them alive */
	curl_multi_setopt(m->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long) max_per_host);
	curl_multi_setopt(m->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long) max_total);
	curl_multi_setopt(m->multi, CURLMOPT_MAXCONNECTS, (long) max_total);
}

/*
 * Allocates a transfer with an easy handle, or raises (nothing leaked).
 * The caller fills it and passes it to enqueue_transfer.
 */
static Transfer *
new_transfer(CrmpayMulti *m, const char *url, int64 tag)
{
	Transfer   *t = calloc(1, sizeof(Transfer));

	if (t != NULL)
	{
		t->tag = tag;
		t->sink.retry_after = -1;
		t->sink.max_len = MAX_RESPONSE_BYTES;
		t->easy = m->nspare > 0 ? m->spare[--m->nspare] : curl_easy_init();
		t->url = strdup(url);
		t->host = host_index(m, url);
	}
	if (t == NULL || t->easy == NULL || t->url == NULL || t->host < 0)
	{
		if (t != NULL)
			transfer_free(m, t);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory for a gateway transfer")));
	}
	return t;
}

/* Puts a set-up transfer in its host's queue and starts what can start. */
static void
enqueue_transfer(CrmpayMulti *m, Transfer *t)
{
	HostQueue  *h = &m->hosts[t->host];

	curl_easy_setopt(t->easy, CURLOPT_PRIVATE, t);
	if (h->tail)
		h->tail->next = t;
	else
		h->head = t;
	h->tail = t;
	m->waiting++;
	start_waiting(m);
}

/*
 * crmpay_multi_add_http
 *		Queues an HTTP request; its outcome comes back from
 *		crmpay_multi_next_done with the same tag.  Raises (leaking nothing)
 *		only for refused URLs and out-of-memory.
 */
void
crmpay_multi_add_http(CrmpayMulti *m, const CrmpayHttpRequest *request, int64 tag)
{
	Transfer   *t;

	crmpay_http_check_url(request->url, "gateway URL");
	t = new_transfer(m, request->url, tag);
	if (request->body != NULL)
	{
		t->body = malloc(request->body_len + 1);
		if (t->body != NULL)
		{
			memcpy(t->body, request->body, request->body_len);
			t->body[request->body_len] = '\0';
		}
	}
	t->list = http_header_list(request);
	if ((request->body != NULL && t->body == NULL) || t->list == NULL ||
		!setup_common(t->easy, t->url, http_protocols(), &t->sink, t->errbuf) ||
		!setup_http(t->easy, request, t->list, t->body))
	{
		transfer_free(m, t);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not set up a gateway request")));
	}
	enqueue_transfer(m, t);
}

/* curl read callback of an SMTP upload: hands out the message. */
static size_t
smtp_read(char *buffer, size_t size, size_t nitems, void *userdata)
{
	Transfer   *t = userdata;
	size_t		n = Min(size * nitems, t->body_len - t->body_sent);

	memcpy(buffer, t->body + t->body_sent, n);
	t->body_sent += n;
	return n;
}

/* Whether a URL names an SMTP server crmpay may use: smtps:// or smtp://. */
bool
crmpay_smtp_url_ok(const char *url)
{
	return url != NULL &&
		((pg_strncasecmp(url, "smtps://", 8) == 0 && url[8] != '\0') ||
		 (pg_strncasecmp(url, "smtp://", 7) == 0 && url[7] != '\0'));
}

/*
 * crmpay_smtp_check_url
 *		Refuses SMTP URLs crmpay must not use: only smtps:// (TLS from the
 *		start) and smtp:// (STARTTLS required, unless
 *		crmpay.allow_insecure_http allows a plain local test server).
 */
void
crmpay_smtp_check_url(const char *url)
{
	if (!crmpay_smtp_url_ok(url))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("crmpay.smtp_url is not an smtp:// or smtps:// URL"),
				 errhint("Set crmpay.smtp_url to something like smtps://mail.example.com:465 or smtp://mail.example.com:587 (STARTTLS).")));
}

/*
 * crmpay_multi_add_smtp
 *		Queues one message for SMTP delivery through crmpay.smtp_url.
 *		TLS is verified as for gateways: smtps:// from the start, smtp://
 *		with STARTTLS required (only tried when crmpay.allow_insecure_http
 *		is on).  The outcome's status is the last SMTP reply code.
 */
void
crmpay_multi_add_smtp(CrmpayMulti *m, const CrmpaySmtpRequest *request, int64 tag)
{
	Transfer   *t;
	bool		ok;
	bool		implicit_tls = pg_strncasecmp(request->url, "smtps://", 8) == 0;
	char	   *rcpt;

	crmpay_smtp_check_url(request->url);
	t = new_transfer(m, request->url, tag);
	t->body = malloc(request->message_len + 1);
	t->body_len = request->message_len;
	t->mail_from = malloc(strlen(request->mail_from) + 3);
	rcpt = malloc(strlen(request->rcpt_to) + 3);
	if (t->body != NULL)
		memcpy(t->body, request->message, request->message_len);
	if (t->mail_from != NULL)
		sprintf(t->mail_from, "<%s>", request->mail_from);
	if (rcpt != NULL)
	{
		sprintf(rcpt, "<%s>", request->rcpt_to);
		t->list = curl_slist_append(NULL, rcpt);
		free(rcpt);
	}

	ok = t->body != NULL && t->mail_from != NULL && t->list != NULL &&
		setup_common(t->easy, t->url,
					 implicit_tls ? "smtps" : (crmpay_allow_insecure_http ? "smtp,smtps" : "smtp"),
					 &t->sink, t->errbuf);
#define SETOPT(opt, val) (ok = ok && curl_easy_setopt(t->easy, opt, val) == CURLE_OK)
	if (!implicit_tls)
		SETOPT(CURLOPT_USE_SSL, crmpay_allow_insecure_http ? (long) CURLUSESSL_TRY : (long) CURLUSESSL_ALL);
	SETOPT(CURLOPT_MAIL_FROM, t->mail_from);
	SETOPT(CURLOPT_MAIL_RCPT, t->list);
	SETOPT(CURLOPT_UPLOAD, 1L);
	SETOPT(CURLOPT_READFUNCTION, smtp_read);
	SETOPT(CURLOPT_READDATA, t);
	SETOPT(CURLOPT_INFILESIZE_LARGE, (curl_off_t) t->body_len);
#undef SETOPT
	if (!ok)
	{
		transfer_free(m, t);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not set up an SMTP transfer")));
	}
	enqueue_transfer(m, t);
}

/* Transfers added and not yet collected with crmpay_multi_next_done. */
int
crmpay_multi_pending(const CrmpayMulti *m)
{
	return m->active + m->waiting + m->ndone;
}

/* Takes a transfer out of curl's hands (the caller removed its handle). */
static void
unlink_active(CrmpayMulti *m, Transfer *t)
{
	if (t->prev_active)
		t->prev_active->next_active = t->next_active;
	else
		m->active_head = t->next_active;
	if (t->next_active)
		t->next_active->prev_active = t->prev_active;
	t->prev_active = t->next_active = NULL;
	m->hosts[t->host].active--;
	m->active--;
}

/* Moves transfers curl has finished to the done list. */
static void
collect_done(CrmpayMulti *m)
{
	CURLMsg    *msg;
	int			left;

	while ((msg = curl_multi_info_read(m->multi, &left)) != NULL)
	{
		Transfer   *t = NULL;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &t);
		t->result = msg->data.result;
		curl_multi_remove_handle(m->multi, t->easy);
		unlink_active(m, t);
		if (m->done_tail)
			m->done_tail->next = t;
		else
			m->done_head = t;
		m->done_tail = t;
		m->ndone++;
	}
	start_waiting(m);
}

/*
 * crmpay_multi_run
 *		Drives the transfers; when none has finished yet, waits up to
 *		timeout_ms for network activity.  Returns how many finished
 *		transfers are ready for crmpay_multi_next_done.  The wait is short
 *		and the caller checks its interrupts between calls; the progress
 *		callback aborts transfers when the process is told to die.
 */
int
crmpay_multi_run(CrmpayMulti *m, int timeout_ms)
{
	int			running;

	curl_multi_perform(m->multi, &running);
	collect_done(m);
	if (m->ndone == 0 && m->active > 0 && timeout_ms > 0)
	{
		pgstat_report_wait_start(PG_WAIT_EXTENSION);
		curl_multi_poll(m->multi, NULL, 0, timeout_ms, NULL);
		pgstat_report_wait_end();
		curl_multi_perform(m->multi, &running);
		collect_done(m);
	}
	return m->ndone;
}

/* The tag of the next finished transfer, without taking it; false if none. */
bool
crmpay_multi_peek_done(const CrmpayMulti *m, int64 *tag)
{
	if (m->done_head == NULL)
		return false;
	*tag = m->done_head->tag;
	return true;
}

/*
 * crmpay_multi_next_done
 *		Takes one finished transfer: its tag and its outcome (palloc'd in
 *		the current memory context).  False when none is ready.
 */
bool
crmpay_multi_next_done(CrmpayMulti *m, int64 *tag, CrmpayHttpResponse *response)
{
	Transfer   *t = m->done_head;
	bool		ok;

	if (t == NULL)
		return false;
	m->done_head = t->next;
	if (m->done_head == NULL)
		m->done_tail = NULL;
	m->ndone--;
	*tag = t->tag;
	ok = fill_response(t->easy, t->result, &t->sink, t->errbuf, response);
	transfer_free(m, t);
	if (!ok)
		raise_response_oom();
	return true;
}

/*
 * crmpay_multi_abort_all
 *		Drops every transfer (running, waiting or finished and not yet
 *		collected), freeing all their memory.  For error recovery and exit.
 */
void
crmpay_multi_abort_all(CrmpayMulti *m)
{
	int			i;
	Transfer   *t;

	if (m == NULL)
		return;
	while ((t = m->active_head) != NULL)
	{
		curl_multi_remove_handle(m->multi, t->easy);
		unlink_active(m, t);
		transfer_free(m, t);
	}
	for (i = 0; i < m->nhosts; i++)
	{
		while ((t = m->hosts[i].head) != NULL)
		{
			m->hosts[i].head = t->next;
			transfer_free(m, t);
		}
		m->hosts[i].tail = NULL;
	}
	while ((t = m->done_head) != NULL)
	{
		m->done_head = t->next;
		transfer_free(m, t);
	}
	m->done_tail = NULL;
	m->waiting = m->ndone = 0;
}

/* Frees the multi handle and everything in it. */
void
crmpay_multi_destroy(CrmpayMulti *m)
{
	int			i;

	if (m == NULL)
		return;
	crmpay_multi_abort_all(m);
	while (m->nspare > 0)
		curl_easy_cleanup(m->spare[--m->nspare]);
	curl_multi_cleanup(m->multi);
	for (i = 0; i < m->nhosts; i++)
		free(m->hosts[i].key);
	free(m->hosts);
	free(m->spare);
	free(m);
}

/* Appends s to buf, percent-encoded for a URL or form body. */
void
crmpay_url_append_escaped(StringInfo buf, const char *s)
{
	size_t		len = strlen(s);

	enlargeStringInfo(buf, (int) (len * 3 + 1));
	buf->len += (int) crmpay_url_escape(s, len, buf->data + buf->len);
	buf->data[buf->len] = '\0';
}
