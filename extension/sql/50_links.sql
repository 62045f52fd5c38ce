-- ---------------------------------------------------------------------
-- Amounts and link requests
-- ---------------------------------------------------------------------

/*
 * to_minor_units: exact conversion by the currency's ISO 4217 exponent.
 * 19.99 EUR -> 1999, 500 JPY -> 500, 1.234 KWD -> 1234.  Refuses more
 * decimals than the currency has, zero, negative and unknown currencies.
 */
CREATE FUNCTION crmpay.to_minor_units(amount numeric, currency text) RETURNS bigint
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_exponent smallint;
    v_scaled numeric;
BEGIN
    IF currency IS NULL THEN
        RAISE EXCEPTION 'currency must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT c.exponent INTO v_exponent FROM crmpay.currencies c WHERE c.code = upper(currency);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown currency "%"', currency
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use an ISO 4217 alphabetic code such as EUR, USD or JPY; crmpay.currencies lists them.';
    END IF;
    IF amount IS NULL THEN
        RAISE EXCEPTION 'amount must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF amount = 'NaN'::numeric OR amount <= 0 THEN
        RAISE EXCEPTION 'amount must be greater than zero'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The amount given was %s %s.', amount, upper(currency));
    END IF;
    v_scaled := amount * (10::numeric ^ v_exponent);
    IF v_scaled <> trunc(v_scaled) THEN
        RAISE EXCEPTION 'amount % has more decimals than % allows', amount, upper(currency)
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('%s has %s decimal places (ISO 4217).', upper(currency), v_exponent),
                  HINT = 'Round the amount to the currency''s minor unit before sending it.';
    END IF;
    IF v_scaled > 9223372036854775807 THEN
        RAISE EXCEPTION 'amount % % is out of range', amount, upper(currency)
            USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    RETURN v_scaled::bigint;
END
$$;

/* The gateway idempotency key of an order: fixed for (account, order_ref). */
CREATE FUNCTION crmpay.idempotency_key(account text, order_ref text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
RETURN 'crmpay-' || left(encode(sha256(convert_to('crmpay/v1' || chr(31) || account || chr(31) || order_ref, 'UTF8')), 'hex'), 32);

/*
 * _link_request: validates a link request and returns it as the jsonb the
 * C side and the outbox store.  Nothing is written.
 */
CREATE FUNCTION crmpay._link_request(account text, order_ref text, amount numeric, currency text,
                                     email text, description text, metadata jsonb)
    RETURNS jsonb
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_currency crmpay.currencies;
    v_amount_minor bigint;
    v_key text;
    v_value jsonb;
    v_request jsonb;
BEGIN
    IF account IS NULL THEN
        RAISE EXCEPTION 'account must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT EXISTS (SELECT FROM crmpay.gateway_accounts a WHERE a.name = account) THEN
        RAISE EXCEPTION 'payment account "%" does not exist', account
            USING ERRCODE = 'undefined_object',
                  HINT = 'Add it with crmpay.add_account(); crmpay.accounts lists the existing ones.';
    END IF;
    IF order_ref IS NULL OR length(order_ref) NOT BETWEEN 1 AND 200
       OR order_ref ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid order_ref'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'order_ref must be 1 to 200 characters without control characters.';
    END IF;
    v_amount_minor := crmpay.to_minor_units(amount, currency);
    SELECT * INTO v_currency FROM crmpay.currencies c WHERE c.code = upper(currency);
    IF email IS NOT NULL AND (length(email) > 254 OR email !~ '^[^[:space:][:cntrl:]@]+@[^[:space:][:cntrl:]@]+\.[^[:space:][:cntrl:]@]+$') THEN
        RAISE EXCEPTION 'invalid email address "%"', email
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF description IS NOT NULL AND (length(description) > 500 OR description ~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION 'invalid description'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A description is at most 500 characters without control characters.';
    END IF;
    metadata := coalesce(metadata, '{}');
    IF jsonb_typeof(metadata) <> 'object' THEN
        RAISE EXCEPTION 'metadata must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (SELECT count(*) FROM jsonb_object_keys(metadata)) > 40 THEN
        RAISE EXCEPTION 'metadata has more than 40 keys' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_key, v_value IN SELECT * FROM jsonb_each(metadata) LOOP
        IF length(v_key) NOT BETWEEN 1 AND 40 OR v_key ~ '[[:cntrl:]\[\]]' OR v_key LIKE 'crmpay\_%' THEN
            RAISE EXCEPTION 'invalid metadata key "%"', v_key
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'Keys are 1 to 40 characters, without brackets or control characters; the prefix "crmpay_" is reserved.';
        END IF;
        IF jsonb_typeof(v_value) NOT IN ('string', 'number', 'boolean')
           OR length(v_value #>> '{}') > 500 THEN
            RAISE EXCEPTION 'metadata value for "%" must be a string, number or boolean of at most 500 characters', v_key
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;

    v_request := jsonb_build_object(
        'order_ref', order_ref,
        'amount_minor', v_amount_minor,
        'currency', v_currency.code,
        'currency_numeric', v_currency.numeric_code,
        'exponent', v_currency.exponent,
        'email', email,
        'description', description,
        'metadata', metadata,
        'idempotency_key', crmpay.idempotency_key(account, order_ref));
    -- the gateway's own limits (amount ranges, currencies it refuses)
    PERFORM crmpay._check_link_request(account, v_request);
    RETURN v_request;
END
$$;

/*
 * _existing_payment: takes the order's lock (one creator per order at a
 * time; a second caller waits, then sees the row) and returns the order's
 * payment, or a row of NULLs when there is none yet.  An existing payment
 * for another amount or currency is an error.
 */
CREATE FUNCTION crmpay._existing_payment(account text, request jsonb)
    RETURNS crmpay.payments
    LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_order_ref text := request->>'order_ref';
    v_payment crmpay.payments;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('crmpay/order' || chr(31) || account || chr(31) || v_order_ref, 0));
    SELECT * INTO v_payment FROM crmpay.payments p
     WHERE p.account = _existing_payment.account AND p.order_ref = v_order_ref;
    IF FOUND AND (v_payment.amount_minor <> (request->>'amount_minor')::bigint
                  OR v_payment.currency <> request->>'currency') THEN
        RAISE EXCEPTION 'order "%" already has a payment link for a different amount', v_order_ref
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The existing payment %s is for %s minor units of %s; this request asks for %s of %s.',
                                  v_payment.id, v_payment.amount_minor, v_payment.currency,
                                  request->>'amount_minor', request->>'currency'),
                  HINT = 'Use a new order_ref for a new amount.';
    END IF;
    RETURN v_payment;
END
$$;

/*
 * create_payment_link: the synchronous path.  Calls the gateway in the
 * caller's transaction (prefer request_payment_link for that reason) and
 * returns the payment row with the hosted URL.  The same (account,
 * order_ref) again returns the existing row without a gateway call.
 */
CREATE FUNCTION crmpay.create_payment_link(account text, order_ref text, amount numeric,
                                           currency text, email text DEFAULT NULL,
                                           description text DEFAULT NULL,
                                           metadata jsonb DEFAULT '{}')
    RETURNS crmpay.payments
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_request jsonb;
    v_payment crmpay.payments;
    v_link jsonb;
BEGIN
    v_request := crmpay._link_request(account, order_ref, amount, currency, email, description, metadata);

    v_payment := crmpay._existing_payment(account, v_request);
    IF v_payment.id IS NOT NULL AND v_payment.status <> 'link_pending' THEN
        RETURN v_payment;
    END IF;

    v_link := crmpay._gateway_create_link(account, v_request);

    IF v_payment.id IS NULL THEN
        INSERT INTO crmpay.payments AS p
            (account, order_ref, amount_minor, currency, status, url, gateway_ref,
             email, description, metadata, idempotency_key, expires_at)
        VALUES (account, order_ref, (v_request->>'amount_minor')::bigint, v_request->>'currency',
                coalesce(v_link->>'status', 'open'), v_link->>'url', v_link->>'gateway_ref',
                email, description, v_request->'metadata', v_request->>'idempotency_key',
                (v_link->>'expires_at')::timestamptz)
        RETURNING * INTO v_payment;
    ELSE
        UPDATE crmpay.payments p
           SET status = coalesce(v_link->>'status', 'open'), url = v_link->>'url',
               gateway_ref = v_link->>'gateway_ref',
               expires_at = (v_link->>'expires_at')::timestamptz, updated_at = now()
         WHERE p.id = v_payment.id AND p.status = 'link_pending'
        RETURNING * INTO v_payment;
    END IF;
    RETURN v_payment;
END
$$;
