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
 * order).  Set only on 'applied' events; receive_webhook queues the job
 * that makes the call (crmpay.jobs, kind 'capture') in the same transaction.
 */
CREATE DOMAIN crmpay.event_follow_up AS text CHECK (VALUE IN ('capture'));
ALTER TABLE crmpay.events ADD COLUMN follow_up crmpay.event_follow_up;

/*
 * _gateway_capture: one capture call (extension/provider.c) with the
 * request of _capture_request; returns {"status" (crmpay's), "gateway_status",
 * "order_status", "capture_id", "amount_minor", "currency"}.  The worker's
 * 'capture' jobs build and read the same request in C.
 */
CREATE FUNCTION crmpay._gateway_capture(account text, request jsonb)
    RETURNS jsonb
    LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'crmpay_gateway_capture';

CREATE FUNCTION crmpay._currency_exponent(currency text) RETURNS integer
    LANGUAGE c STRICT IMMUTABLE AS 'MODULE_PATHNAME', 'crmpay_currency_exponent';

/* The PayPal-Request-Id of a payment's capture: fixed, so a retry is replayed. */
CREATE FUNCTION crmpay._capture_request_id(payment crmpay.payments) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
    SET search_path = pg_catalog, pg_temp
RETURN payment.idempotency_key || '-capture';

/*
 * _capture_request: what capturing a payment asks its gateway for
 * ({"gateway_ref", "amount_minor", "currency", "request_id"}), the same for
 * capture_payment and the worker's capture jobs; NULL when the payment is
 * captured already (paid or later).  Raises when it cannot be captured.
 */
CREATE FUNCTION crmpay._capture_request(payment crmpay.payments) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_provider text;
BEGIN
    SELECT a.provider INTO v_provider FROM crmpay.gateway_accounts a WHERE a.name = payment.account;
    IF v_provider IS DISTINCT FROM 'paypal' THEN
        RAISE EXCEPTION 'payment % is a % payment; only PayPal payments are captured',
                        payment.id, coalesce(v_provider, 'removed account''s')
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Other gateways take the money when the customer pays.';
    END IF;
    IF payment.status IN ('paid', 'partially_refunded', 'refunded', 'disputed') THEN
        RETURN NULL;   -- captured already
    END IF;
    IF payment.status NOT IN ('open', 'processing', 'failed') OR payment.gateway_ref IS NULL THEN
        RAISE EXCEPTION 'payment % is % and cannot be captured', payment.id, payment.status
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only PayPal orders the buyer approved can be captured.';
    END IF;
    RETURN jsonb_build_object('gateway_ref', payment.gateway_ref, 'amount_minor', payment.amount_minor,
                              'currency', payment.currency,
                              'request_id', crmpay._capture_request_id(payment));
END
$$;

/*
 * _apply_capture: moves a payment by the outcome of its capture (COMPLETED
 * -> paid, PENDING -> processing, DECLINED -> failed, through the state
 * machine, the capture id becoming gateway_payment_ref).  Returns NULL, or
 * why the outcome was not applied (an amount other than the payment's, a
 * status crmpay does not know).
 */
CREATE FUNCTION crmpay._apply_capture(payment_id bigint, capture jsonb) RETURNS text
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_payment crmpay.payments;
    v_status text := capture->>'status';
BEGIN
    SELECT * INTO STRICT v_payment FROM crmpay.payments p WHERE p.id = _apply_capture.payment_id FOR UPDATE;
    IF v_status IS NULL THEN
        RETURN format('the gateway answered capture status %s for payment %s, which crmpay does not know',
                      coalesce(capture->>'gateway_status', '(none)'), payment_id);
    END IF;
    IF v_status IN ('paid', 'processing')
       AND ((capture->>'amount_minor')::bigint IS DISTINCT FROM v_payment.amount_minor
            OR capture->>'currency' IS DISTINCT FROM v_payment.currency) THEN
        RETURN format('the gateway captured %s %s for payment %s, which is for %s %s; not marking it %s',
                      coalesce(capture->>'amount_minor', '?'), coalesce(capture->>'currency', '?'),
                      payment_id, v_payment.amount_minor, v_payment.currency, v_status);
    END IF;
    PERFORM crmpay._apply_status(payment_id, v_status, nullif(capture->>'capture_id', ''), NULL, now());
    RETURN NULL;
END
$$;

/*
 * capture_payment: takes the money of an approved PayPal order now,
 * synchronously, and returns the updated payment.  The worker does the
 * same by itself when a CHECKOUT.ORDER.APPROVED webhook is applied (a
 * 'capture' job); this is for databases without a running worker, or to
 * capture at once.  Safe to repeat, and safe next to the job: the
 * PayPal-Request-Id is derived from the payment (PayPal replays its first
 * answer), and paid payments are returned as they are.
 */
CREATE FUNCTION crmpay.capture_payment(payment_id bigint) RETURNS crmpay.payments
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_payment crmpay.payments;
    v_request jsonb;
    v_problem text;
BEGIN
    IF payment_id IS NULL THEN
        RAISE EXCEPTION 'payment_id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO v_payment FROM crmpay.payments p WHERE p.id = capture_payment.payment_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'payment % does not exist', payment_id USING ERRCODE = 'undefined_object';
    END IF;
    v_request := crmpay._capture_request(v_payment);
    IF v_request IS NULL THEN
        RETURN v_payment;   -- captured already
    END IF;
    v_problem := crmpay._apply_capture(v_payment.id,
                                       crmpay._gateway_capture(v_payment.account, v_request));
    IF v_problem IS NOT NULL THEN
        RAISE WARNING '%', v_problem;
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
