/*-------------------------------------------------------------------------
 *
 * links.c
 *	  Looking up and expiring existing payment links at their gateway, for
 *	  crmpay.refresh_payment() and crmpay.expire_payment_link().  The
 *	  requests and answers belong to the providers (build_get_link,
 *	  build_expire_link, parse_link_state); the HTTP call, failure
 *	  classification and error reporting are the shared ones of provider.c.
 *
 *-------------------------------------------------------------------------
 */
#include "provider.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"

/*
 * crmpay_link_state
 *		Reads (expire false) or expires (expire true) a link.  Returns true
 *		with *result filled, or false with *failure saying why.
 */
static bool
crmpay_link_state(const CrmpayAccount *account, const char *gateway_ref, bool expire,
				  CrmpayLinkResult *result, CrmpayGatewayFailure *failure)
{
	const CrmpayProvider *provider = account->provider;
	CrmpayHttpRequest http = {0};
	CrmpayHttpResponse response;

	if ((expire ? provider->build_expire_link == NULL : provider->build_get_link == NULL) ||
		provider->parse_link_state == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s payment links is not supported for provider \"%s\" in this version of crmpay",
						expire ? "expiring" : "looking up", provider->name)));
	memset(result, 0, sizeof(*result));
	memset(failure, 0, sizeof(*failure));
	crmpay_http_check_url(account->api_base, "the account's api_base");

	if (expire)
		provider->build_expire_link(account, gateway_ref, &http);
	else
		provider->build_get_link(account, gateway_ref, &http);
	crmpay_http_perform(&http, &response);

	crmpay_classify_http_failure(account, &response, failure);
	if (failure->kind != CRMPAY_FAIL_NONE)
		return false;
	if (!provider->parse_link_state(account, &response, result, failure))
		return crmpay_unreadable_answer(&response, failure);
	return true;
}

PG_FUNCTION_INFO_V1(crmpay_gateway_link_state);

/*
 * crmpay._gateway_link_state(account text, gateway_ref text, expire boolean)
 *	RETURNS jsonb {"status", "expires_at", "url"}
 *		One synchronous gateway call; ERROR on failure with the SQLSTATE of
 *		crmpay_raise_gateway_failure.  status is a crmpay status.
 */
Datum
crmpay_gateway_link_state(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *gateway_ref = text_to_cstring(PG_GETARG_TEXT_PP(1));
	bool		expire = PG_GETARG_BOOL(2);
	CrmpayAccount *account = crmpay_load_account(name, false);
	CrmpayLinkResult result;
	CrmpayGatewayFailure failure;
	StringInfoData buf;

	if (!crmpay_link_state(account, gateway_ref, expire, &result, &failure))
		crmpay_raise_gateway_failure(account, &failure);

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"status\": ");
	if (result.status)
		escape_json(&buf, result.status);
	else
		appendStringInfoString(&buf, "null");
	if (result.expires_at != 0)
	{
		appendStringInfoString(&buf, ", \"expires_at\": ");
		escape_json(&buf, timestamptz_to_str(result.expires_at));
	}
	if (result.url != NULL)
	{
		appendStringInfoString(&buf, ", \"url\": ");
		escape_json(&buf, result.url);
	}
	appendStringInfoChar(&buf, '}');
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}
