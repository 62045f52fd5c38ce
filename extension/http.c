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

/*
 * ensure_curl
 *		Initialises libcurl in this process (not in the postmaster) and
 *		returns the process's reusable easy handle, reset to defaults.
 */
static CURL *
ensure_curl(void)
{
	if (!curl_initialised)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			ereport(ERROR,
					(errcode(ERRCODE_SYSTEM_ERROR),
					 errmsg("could not initialise libcurl")));
		curl_initialised = true;
	}
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

static size_t
sink_write(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	CurlSink   *sink = userdata;
	size_t		n = size * nmemb;

	if (sink->len + n > sink->max_len)
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
	struct curl_slist *volatile headers = NULL;
	CurlSink	sink = {0};
	char		errbuf[CURL_ERROR_SIZE];
	CURLcode	rc = CURLE_OK;
	bool		setup_ok = true;
	ListCell   *lc;

	crmpay_http_check_url(request->url, "gateway URL");
	curl = ensure_curl();

	memset(response, 0, sizeof(*response));
	response->retry_after = -1;
	sink.retry_after = -1;
	sink.max_len = request->max_response_bytes > 0
		? Min(request->max_response_bytes, MAX_REPORT_BYTES) : MAX_RESPONSE_BYTES;
	errbuf[0] = '\0';

	foreach(lc, request->headers)
	{
		struct curl_slist *grown = curl_slist_append(headers, (const char *) lfirst(lc));

		if (grown == NULL)
		{
			setup_ok = false;
			break;
		}
		headers = grown;
	}
	if (setup_ok)
	{
		/* Suppress curl's default "Expect: 100-continue" round trip. */
		struct curl_slist *grown = curl_slist_append(headers, "Expect:");

		if (grown != NULL)
			headers = grown;
		else
			setup_ok = false;
	}

#define SETOPT(opt, val) (setup_ok = setup_ok && curl_easy_setopt(curl, opt, val) == CURLE_OK)
	SETOPT(CURLOPT_URL, request->url);
	SETOPT(CURLOPT_PROTOCOLS_STR, crmpay_allow_insecure_http ? "http,https" : "https");
	SETOPT(CURLOPT_FOLLOWLOCATION, 0L);
	SETOPT(CURLOPT_SSL_VERIFYPEER, 1L);
	SETOPT(CURLOPT_SSL_VERIFYHOST, 2L);
	if (crmpay_ca_file != NULL && crmpay_ca_file[0] != '\0')
		SETOPT(CURLOPT_CAINFO, crmpay_ca_file);
	SETOPT(CURLOPT_CONNECTTIMEOUT_MS, (long) crmpay_connect_timeout_ms);
	SETOPT(CURLOPT_TIMEOUT_MS, (long) crmpay_request_timeout_ms);
	SETOPT(CURLOPT_NOSIGNAL, 1L);
	SETOPT(CURLOPT_HTTPHEADER, headers);
	SETOPT(CURLOPT_USERAGENT, "crmpay/1.0");
	SETOPT(CURLOPT_ERRORBUFFER, errbuf);
	SETOPT(CURLOPT_WRITEFUNCTION, sink_write);
	SETOPT(CURLOPT_WRITEDATA, &sink);
	SETOPT(CURLOPT_HEADERFUNCTION, sink_header);
	SETOPT(CURLOPT_HEADERDATA, &sink);
	SETOPT(CURLOPT_NOPROGRESS, 0L);
	SETOPT(CURLOPT_XFERINFOFUNCTION, progress_check_interrupts);
	SETOPT(CURLOPT_CUSTOMREQUEST, request->method);
	if (request->body != NULL)
	{
		SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) request->body_len);
		SETOPT(CURLOPT_POSTFIELDS, request->body);
	}
	else if (strcmp(request->method, "GET") == 0)
		SETOPT(CURLOPT_HTTPGET, 1L);
#undef SETOPT

	if (setup_ok)
	{
		pgstat_report_wait_start(PG_WAIT_EXTENSION);
		rc = curl_easy_perform(curl);
		pgstat_report_wait_end();
		if (rc == CURLE_OK)
			curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response->status);
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

	response->body = palloc_extended(sink.len + 1, MCXT_ALLOC_NO_OOM);
	if (response->body == NULL)
	{
		free(sink.data);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory for a gateway response of %zu bytes", sink.len)));
	}
	if (sink.len > 0)
		memcpy(response->body, sink.data, sink.len);
	response->body[sink.len] = '\0';
	response->body_len = sink.len;
	free(sink.data);

	response->retry_after = sink.retry_after;
	response->request_id = sink.request_id[0] ? pstrdup(sink.request_id) : NULL;
	if (sink.too_large)
		response->transport = CRMPAY_TRANSPORT_TOO_LARGE;
	else if (rc != CURLE_OK)
		response->transport = classify_curl_error(rc);
	else
		response->transport = CRMPAY_TRANSPORT_OK;
	if (rc != CURLE_OK)
		response->error = pstrdup(errbuf[0] ? errbuf : curl_easy_strerror(rc));
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
