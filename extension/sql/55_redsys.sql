-- ---------------------------------------------------------------------
-- Redsys: the signed redirect form (extension/redsys.c)
-- ---------------------------------------------------------------------
CREATE FUNCTION crmpay._redsys_form(account text, ds_order text, amount_minor bigint,
                                    currency text, order_ref text, description text,
                                    OUT action text, OUT signature_version text,
                                    OUT merchant_parameters text, OUT signature text)
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'crmpay_redsys_form';

-- HMAC_SHA256_V1 of a Ds_MerchantParameters text, and its 3DES order key
-- (internal: for tests and support, granted to nobody)
CREATE FUNCTION crmpay._redsys_signature(merchant_key text, ds_order text,
                                         merchant_parameters text) RETURNS text
    LANGUAGE c STRICT IMMUTABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'crmpay_redsys_signature';
CREATE FUNCTION crmpay._redsys_order_key(merchant_key text, ds_order text) RETURNS bytea
    LANGUAGE c STRICT IMMUTABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'crmpay_redsys_order_key';

CREATE FUNCTION crmpay._html_escape(s text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
RETURN replace(replace(replace(replace(replace(s, '&', '&amp;'), '<', '&lt;'), '>', '&gt;'),
                       '"', '&quot;'), '''', '&#39;');

/*
 * payment_form: what a CRM page posts to Redsys so the customer pays a
 * Redsys payment (accounts without Paygold, whose create_payment_link
 * returns url NULL, or the CRM's own page from settings.payment_page_url).
 * action is the Redsys URL; the three fields go in a form POSTed there by
 * the customer's browser; html is that form, ready to embed.  Signed
 * anew on each call, for the payment's own order number (gateway_ref).
 */
CREATE FUNCTION crmpay.payment_form(payment_id bigint)
    RETURNS TABLE (action text, signature_version text, merchant_parameters text,
                   signature text, html text)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_payment crmpay.payments;
    v_account crmpay.gateway_accounts;
    v_form record;
BEGIN
    IF payment_id IS NULL THEN
        RAISE EXCEPTION 'payment_id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO v_payment FROM crmpay.payments p WHERE p.id = payment_form.payment_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'payment % does not exist', payment_id
            USING ERRCODE = 'no_data_found',
                  HINT = 'Payment ids come from crmpay.create_payment_link() (crmpay.payments.id).';
    END IF;
    SELECT * INTO v_account FROM crmpay.gateway_accounts a WHERE a.name = v_payment.account;
    IF v_account.provider <> 'redsys' THEN
        RAISE EXCEPTION 'payment % is not a Redsys payment', payment_id
            USING ERRCODE = 'wrong_object_type',
                  DETAIL = format('Its account "%s" uses provider %s, whose customers pay at the payment''s url.',
                                  v_account.name, v_account.provider);
    END IF;
    IF coalesce((v_account.settings->>'paygold')::boolean, false) THEN
        RAISE EXCEPTION 'payment % is a Paygold link', payment_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('Account "%s" has Paygold: Redsys registered the order for its link, and a form for the same order number would be refused.', v_account.name),
                  HINT = 'Send the customer to the payment''s url.';
    END IF;
    IF v_payment.status NOT IN ('open', 'failed') OR v_payment.gateway_ref IS NULL THEN
        RAISE EXCEPTION 'payment % cannot be paid now: it is %', payment_id, v_payment.status
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'A form is signed only for open payments, and for failed ones the customer tries again.';
    END IF;
    SELECT * INTO v_form
      FROM crmpay._redsys_form(v_payment.account, v_payment.gateway_ref, v_payment.amount_minor,
                               v_payment.currency, v_payment.order_ref, v_payment.description) f;
    action := v_form.action;
    signature_version := v_form.signature_version;
    merchant_parameters := v_form.merchant_parameters;
    signature := v_form.signature;
    html := format('<form method="post" action="%s">'
                   '<input type="hidden" name="Ds_SignatureVersion" value="%s">'
                   '<input type="hidden" name="Ds_MerchantParameters" value="%s">'
                   '<input type="hidden" name="Ds_Signature" value="%s">'
                   '<button type="submit">Pay</button></form>',
                   crmpay._html_escape(action), crmpay._html_escape(signature_version),
                   crmpay._html_escape(merchant_parameters), crmpay._html_escape(signature));
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION crmpay.payment_form(bigint) IS
    'The signed Redsys redirect form of a payment: action URL, Ds_SignatureVersion, Ds_MerchantParameters, Ds_Signature, and as HTML';

GRANT EXECUTE ON FUNCTION crmpay.payment_form(bigint) TO crmpay_app;
