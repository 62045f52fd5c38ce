-- Amounts: exact conversion by ISO 4217 exponent, and request validation.
\set VERBOSITY default
\set SHOW_CONTEXT never
\pset null '(null)'

SELECT crmpay.to_minor_units(19.99, 'EUR') AS eur,
       crmpay.to_minor_units(19.9, 'eur') AS eur_one_decimal,
       crmpay.to_minor_units(19.990000, 'EUR') AS eur_trailing_zeros,
       crmpay.to_minor_units(500, 'JPY') AS jpy,
       crmpay.to_minor_units(500.0, 'JPY') AS jpy_point_zero,
       crmpay.to_minor_units(1.234, 'KWD') AS kwd,
       crmpay.to_minor_units(0.001, 'BHD') AS bhd_smallest,
       crmpay.to_minor_units(1.2345, 'CLF') AS clf,
       crmpay.to_minor_units(92233720368547758.07, 'USD') AS usd_max;

SELECT code, numeric_code, exponent FROM crmpay.currencies
 WHERE code IN ('EUR', 'USD', 'JPY', 'KWD', 'BHD', 'CLF', 'GBP', 'ISK') ORDER BY code;

-- refused: too many decimals, zero, negative, NaN, unknown currency, nulls, overflow
SELECT crmpay.to_minor_units(19.999, 'EUR');
SELECT crmpay.to_minor_units(500.5, 'JPY');
SELECT crmpay.to_minor_units(1.2345, 'KWD');
SELECT crmpay.to_minor_units(0, 'EUR');
SELECT crmpay.to_minor_units(-5, 'EUR');
SELECT crmpay.to_minor_units('NaN', 'EUR');
SELECT crmpay.to_minor_units(10, 'EUX');
SELECT crmpay.to_minor_units(10, 'XAU');
SELECT crmpay.to_minor_units(NULL, 'EUR');
SELECT crmpay.to_minor_units(10, NULL);
SELECT crmpay.to_minor_units(92233720368547758.08, 'USD');

-- the idempotency key is fixed per (account, order_ref) and differs otherwise
SELECT crmpay.idempotency_key('shop', 'A-1') = crmpay.idempotency_key('shop', 'A-1') AS stable,
       crmpay.idempotency_key('shop', 'A-1') <> crmpay.idempotency_key('shop', 'A-2') AS per_order,
       crmpay.idempotency_key('shop', 'A-1') <> crmpay.idempotency_key('shop2', 'A-1') AS per_account,
       crmpay.idempotency_key('shop', 'A-1') ~ '^crmpay-[0-9a-f]{32}$' AS shape;

-- link requests: everything checked before anything is written or sent
SELECT crmpay._link_request('shop', 'A-1', 19.99, 'eur', 'ana@example.com', 'Two hats', '{"crm_id": 42}')
       - 'idempotency_key' AS request;
SELECT crmpay._link_request('nope', 'A-1', 19.99, 'EUR', NULL, NULL, '{}');
SELECT crmpay._link_request('shop', '', 19.99, 'EUR', NULL, NULL, '{}');
SELECT crmpay._link_request('shop', E'A\n1', 19.99, 'EUR', NULL, NULL, '{}');
SELECT crmpay._link_request('shop', repeat('x', 201), 19.99, 'EUR', NULL, NULL, '{}');
SELECT crmpay._link_request('shop', 'A-1', 19.99, 'EUR', 'not an email', NULL, '{}');
SELECT crmpay._link_request('shop', 'A-1', 19.99, 'EUR', NULL, NULL, '[1]');
SELECT crmpay._link_request('shop', 'A-1', 19.99, 'EUR', NULL, NULL, '{"crmpay_order_ref": "x"}');
SELECT crmpay._link_request('shop', 'A-1', 19.99, 'EUR', NULL, NULL, '{"nested": {"a": 1}}');
SELECT crmpay._link_request('shop', 'A-1', 19.99, 'EUR', NULL, NULL, '{"k[0]": "v"}');
-- Stripe's own limits: three-decimal currencies in multiples of 10, at most 8 digits
SELECT crmpay._link_request('shop', 'A-1', 1.230, 'KWD', NULL, NULL, '{}')->>'amount_minor' AS kwd_ok;
SELECT crmpay._link_request('shop', 'A-1', 1.234, 'KWD', NULL, NULL, '{}');
SELECT crmpay._link_request('shop', 'A-1', 1000000, 'EUR', NULL, NULL, '{}');
SELECT crmpay._link_request('shop', 'A-1', 99999999, 'JPY', NULL, NULL, '{}')->>'amount_minor' AS jpy_max;

-- create_payment_link refuses bad input before any gateway call; nothing written
SELECT crmpay.create_payment_link('shop', 'A-1', 19.999, 'EUR');
SELECT crmpay.create_payment_link('shop', 'A-1', 19.99, 'ZZZ');
SELECT count(*) AS payments FROM crmpay.payments;
