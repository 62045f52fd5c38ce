-- ---------------------------------------------------------------------
-- PayPal and Braintree (extension/paypal.c, extension/braintree.c)
-- ---------------------------------------------------------------------

/*
 * The shared OAuth2 token of each account that needs one (PayPal): one per
 * account, used by every session and the worker, sealed like the other
 * secrets (AAD 'crmpay:<account>:oauth_token').  Read and written only by
 * the C side; refreshers lock the row so they do not stampede.
 */
CREATE TABLE crmpay.oauth_tokens (
    account       text PRIMARY KEY REFERENCES crmpay.gateway_accounts (name) ON DELETE CASCADE,
    token         bytea,
    expires_at    timestamptz,
    refresh_after timestamptz,
    refreshed_at  timestamptz,
    refresh_count bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE crmpay.oauth_tokens IS
    'Gateway OAuth tokens shared by all sessions (sealed); rows are dropped when the account''s credentials change';

-- new credentials or another api_base: the stored token is no longer theirs
CREATE FUNCTION crmpay._drop_oauth_token() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM crmpay.oauth_tokens t WHERE t.account = OLD.name;
    RETURN NULL;
END
$$;
CREATE TRIGGER accounts_drop_oauth_token
    AFTER UPDATE ON crmpay.gateway_accounts
    FOR EACH ROW
    WHEN (OLD.credentials IS DISTINCT FROM NEW.credentials
          OR OLD.settings->'api_base' IS DISTINCT FROM NEW.settings->'api_base')
    EXECUTE FUNCTION crmpay._drop_oauth_token();

/*
 * A gateway call an applied event makes due (PayPal: capture the approved
 * order).  Set only on 'applied' events; the worker's outbox picks it up.
 */
ALTER TABLE crmpay.events ADD COLUMN follow_up text CHECK (follow_up IN ('capture'));
CREATE INDEX events_follow_up ON crmpay.events (id) WHERE follow_up IS NOT NULL;

CREATE FUNCTION crmpay._paypal_capture(account text, order_id text, request_id text)
    RETURNS jsonb
    LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'crmpay_paypal_capture';

CREATE FUNCTION crmpay._currency_exponent(currency text) RETURNS integer
    LANGUAGE c STRICT IMMUTABLE AS 'MODULE_PATHNAME', 'crmpay_currency_exponent';

/* The PayPal-Request-Id of a payment's capture: fixed, so a retry is replayed. */
CREATE FUNCTION crmpay._capture_request_id(payment crmpay.payments) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
    SET search_path = pg_catalog, pg_temp
RETURN payment.idempotency_key || '-capture';

/*
 * capture_payment: takes the money of an approved PayPal order now (the
 * step a CHECKOUT.ORDER.APPROVED webhook makes due), synchronously, and
 * returns the updated payment.  Safe to repeat: the PayPal-Request-Id is
 * derived from the payment, and paid payments are returned as they are.
 */
CREATE FUNCTION crmpay.capture_payment(payment_id bigint) RETURNS crmpay.payments
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_payment crmpay.payments;
    v_provider text;
    v_capture jsonb;
    v_status text;
BEGIN
    IF payment_id IS NULL THEN
        RAISE EXCEPTION 'payment_id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO v_payment FROM crmpay.payments p WHERE p.id = capture_payment.payment_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'payment % does not exist', payment_id USING ERRCODE = 'undefined_object';
    END IF;
    SELECT a.provider INTO v_provider FROM crmpay.gateway_accounts a WHERE a.name = v_payment.account;
    IF v_provider <> 'paypal' THEN
        RAISE EXCEPTION 'payment % is a % payment; only PayPal payments are captured', payment_id, v_provider
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Other gateways take the money when the customer pays.';
    END IF;
    IF v_payment.status IN ('paid', 'partially_refunded', 'refunded', 'disputed') THEN
        RETURN v_payment;   -- captured already
    END IF;
    IF v_payment.status NOT IN ('open', 'processing', 'failed') OR v_payment.gateway_ref IS NULL THEN
        RAISE EXCEPTION 'payment % is % and cannot be captured', payment_id, v_payment.status
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only PayPal orders the buyer approved can be captured.';
    END IF;

    v_capture := crmpay._paypal_capture(v_payment.account, v_payment.gateway_ref,
                                        crmpay._capture_request_id(v_payment));
    v_status := CASE v_capture->>'status'
                    WHEN 'COMPLETED' THEN 'paid'
                    WHEN 'PENDING' THEN 'processing'
                    WHEN 'DECLINED' THEN 'failed'
                    WHEN 'FAILED' THEN 'failed'
                END;
    IF v_status = 'paid' AND ((v_capture->>'amount_minor')::bigint IS DISTINCT FROM v_payment.amount_minor
                              OR v_capture->>'currency' IS DISTINCT FROM v_payment.currency) THEN
        RAISE WARNING 'PayPal captured % % for payment %, which is for % %; not marking it paid',
            v_capture->>'amount_minor', v_capture->>'currency', payment_id,
            v_payment.amount_minor, v_payment.currency;
        v_status := NULL;
    END IF;
    IF v_status IS NOT NULL THEN
        PERFORM crmpay._apply_status(v_payment.id, v_status, v_capture->>'capture_id', NULL, now());
    END IF;
    SELECT * INTO v_payment FROM crmpay.payments p WHERE p.id = v_payment.id;
    RETURN v_payment;
END
$$;

CREATE FUNCTION crmpay.braintree_challenge(account text, challenge text) RETURNS text
    LANGUAGE c STRICT STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'crmpay_braintree_challenge';
COMMENT ON FUNCTION crmpay.braintree_challenge(text, text) IS
    'The answer to Braintree''s webhook URL check (bt_challenge) for an account';

REVOKE ALL ON crmpay.oauth_tokens FROM PUBLIC;
GRANT EXECUTE ON FUNCTION crmpay.capture_payment(bigint) TO crmpay_app;
GRANT EXECUTE ON FUNCTION crmpay.braintree_challenge(text, text) TO crmpay_webhook;
