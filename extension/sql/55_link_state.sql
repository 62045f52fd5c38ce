-- ---------------------------------------------------------------------
-- Existing links: status lookups and expiry at the gateway (any provider
-- with build_get_link / build_expire_link; Adyen first), and Adyen's
-- currency table
-- ---------------------------------------------------------------------
CREATE FUNCTION crmpay._gateway_link_state(account text, gateway_ref text, expire boolean)
    RETURNS jsonb
    LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'crmpay_gateway_link_state';

CREATE FUNCTION crmpay._adyen_currencies()
    RETURNS TABLE (code text, exponent integer, iso_exponent integer)
    LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'crmpay_adyen_currencies';

/* _payment_for_link: the payment row, with a link at the gateway; ERROR otherwise. */
CREATE FUNCTION crmpay._payment_for_link(payment_id bigint) RETURNS crmpay.payments
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_payment crmpay.payments;
BEGIN
    IF payment_id IS NULL THEN
        RAISE EXCEPTION 'payment_id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO v_payment FROM crmpay.payments p WHERE p.id = _payment_for_link.payment_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'payment % does not exist', payment_id
            USING ERRCODE = 'undefined_object',
                  HINT = 'crmpay.payments lists the payments and their ids.';
    END IF;
    IF v_payment.gateway_ref IS NULL THEN
        RAISE EXCEPTION 'payment % has no payment link at the gateway yet', payment_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('Its status is %s.', v_payment.status),
                  HINT = 'Create the link with crmpay.create_payment_link() first.';
    END IF;
    RETURN v_payment;
END
$$;

/*
 * refresh_payment: asks the gateway for the link's current status and
 * applies it through the state machine (crmpay.status_transitions), as a
 * webhook would; for when a webhook is late or was lost.  Synchronous: one
 * gateway call in the caller's transaction, no row lock held during it.
 */
CREATE FUNCTION crmpay.refresh_payment(payment_id bigint) RETURNS crmpay.payments
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_payment crmpay.payments;
    v_state jsonb;
BEGIN
    v_payment := crmpay._payment_for_link(payment_id);
    v_state := crmpay._gateway_link_state(v_payment.account, v_payment.gateway_ref, false);
    IF v_state->>'status' IS NOT NULL THEN
        PERFORM crmpay._apply_status(v_payment.id, v_state->>'status');
    END IF;
    UPDATE crmpay.payments p
       SET expires_at = (v_state->>'expires_at')::timestamptz, updated_at = now()
     WHERE p.id = v_payment.id AND v_state->>'expires_at' IS NOT NULL
       AND p.expires_at IS DISTINCT FROM (v_state->>'expires_at')::timestamptz;
    SELECT * INTO v_payment FROM crmpay.payments p WHERE p.id = refresh_payment.payment_id;
    RETURN v_payment;
END
$$;

/*
 * expire_payment_link: deactivates the link at the gateway so the customer
 * can no longer pay, then marks the payment expired through the state
 * machine.  Refused for payments already paid (or refunded, disputed);
 * a payment already expired is returned as it is.
 */
CREATE FUNCTION crmpay.expire_payment_link(payment_id bigint) RETURNS crmpay.payments
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_payment crmpay.payments;
    v_state jsonb;
BEGIN
    v_payment := crmpay._payment_for_link(payment_id);
    IF v_payment.status = 'expired' THEN
        RETURN v_payment;
    END IF;
    IF v_payment.status IN ('paid', 'refunded', 'partially_refunded', 'disputed') THEN
        RAISE EXCEPTION 'payment % is %; its link cannot be expired', payment_id, v_payment.status
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Refund the payment at the gateway instead.';
    END IF;
    v_state := crmpay._gateway_link_state(v_payment.account, v_payment.gateway_ref, true);
    PERFORM crmpay._apply_status(v_payment.id, coalesce(v_state->>'status', 'expired'));
    SELECT * INTO v_payment FROM crmpay.payments p WHERE p.id = expire_payment_link.payment_id;
    RETURN v_payment;
END
$$;

GRANT EXECUTE ON FUNCTION
    crmpay.refresh_payment(bigint),
    crmpay.expire_payment_link(bigint)
    TO crmpay_app;
