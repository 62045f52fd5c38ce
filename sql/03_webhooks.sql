-- Stripe webhook verification and intake: signature vectors, rejected
-- deliveries, dedupe, the state machine under late and out-of-order events.
\set VERBOSITY default
\set SHOW_CONTEXT never
\pset null '(null)'
CREATE EXTENSION pgcrypto;

-- Vector S1 (../shared/reference/gateways.md): stripe-python's test payload,
-- secret whsec_test_secret; t=12345 and t=1700000000.
\set s1_body '{\n  "id": "evt_test_webhook",\n  "object": "event",\n  "data": { "object": { "id": "rdr_123", "object": "terminal.reader" } }\n}'
SELECT length(E:'s1_body') AS s1_body_bytes;
SELECT crmpay.verify_signature('stripe', 'whsec_test_secret',
         '{"Stripe-Signature": "t=12345,v1=07b1ede164afb7b5de91267ffa656f568c65d6e0783ce0ac55ee094643578eda"}',
         E:'s1_body', '0', '2026-01-01 00:00+00') AS s1_no_tolerance,
       crmpay.verify_signature('stripe', 'whsec_test_secret',
         '{"Stripe-Signature": "t=12345,v1=07b1ede164afb7b5de91267ffa656f568c65d6e0783ce0ac55ee094643578eda"}',
         E:'s1_body', '5 minutes', '2026-01-01 00:00+00') AS s1_stale,
       crmpay.verify_signature('stripe', 'whsec_test_secret',
         '{"stripe-signature": "t=1700000000,v1=3bfab77baf5f7b6991a46c9b53b6547d7afc56148b10468fcad9f35c1992ffbd"}',
         E:'s1_body', '5 minutes', to_timestamp(1700000299)) AS s1_fresh_lowercase_header,
       crmpay.verify_signature('stripe', 'whsec_test_secret',
         '{"STRIPE-SIGNATURE": "t=1700000000, v1=bad_signature, v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39, v1=3bfab77baf5f7b6991a46c9b53b6547d7afc56148b10468fcad9f35c1992ffbd"}',
         E:'s1_body', '5 minutes', to_timestamp(1700000000)) AS s1_rotation;

-- any changed byte, key, timestamp or a malformed header fails
SELECT crmpay.verify_signature('stripe', 'whsec_test_secret',
         '{"Stripe-Signature": "t=12345,v1=07b1ede164afb7b5de91267ffa656f568c65d6e0783ce0ac55ee094643578eda"}',
         E:'s1_body' || ' ', '0') AS body_plus_space,
       crmpay.verify_signature('stripe', 'whsec_test_secreT',
         '{"Stripe-Signature": "t=12345,v1=07b1ede164afb7b5de91267ffa656f568c65d6e0783ce0ac55ee094643578eda"}',
         E:'s1_body', '0') AS other_key,
       crmpay.verify_signature('stripe', 'whsec_test_secret',
         '{"Stripe-Signature": "t=12346,v1=07b1ede164afb7b5de91267ffa656f568c65d6e0783ce0ac55ee094643578eda"}',
         E:'s1_body', '0') AS other_timestamp,
       crmpay.verify_signature('stripe', 'whsec_test_secret',
         '{"Stripe-Signature": "t=12345,v1=07B1EDE164AFB7B5DE91267FFA656F568C65D6E0783CE0AC55EE094643578EDA"}',
         E:'s1_body', '0') AS uppercase_hex,
       crmpay.verify_signature('stripe', 'whsec_test_secret',
         '{"Stripe-Signature": "v1=07b1ede164afb7b5de91267ffa656f568c65d6e0783ce0ac55ee094643578eda"}',
         E:'s1_body', '0') AS no_timestamp,
       crmpay.verify_signature('stripe', 'whsec_test_secret',
         '{"Stripe-Signature": "t=12345,v0=07b1ede164afb7b5de91267ffa656f568c65d6e0783ce0ac55ee094643578eda"}',
         E:'s1_body', '0') AS only_v0,
       crmpay.verify_signature('stripe', 'whsec_test_secret', '{}', E:'s1_body', '0') AS no_header,
       crmpay.verify_signature('stripe', 'whsec_test_secret',
         '{"Stripe-Signature": "garbage"}', E:'s1_body', '0') AS garbage_header;
SELECT crmpay.verify_signature('nope', 's', '{}', 'b');
SELECT crmpay.verify_signature('stripe', 's', '"not an object"', 'b');

-- Helpers: a Stripe event body and its signed headers, made independently
-- of crmpay (pgcrypto's HMAC).
CREATE FUNCTION pg_temp.evt(id text, type text, obj jsonb) RETURNS text
    LANGUAGE sql AS $$
    SELECT jsonb_build_object('id', id, 'object', 'event', 'api_version', '2024-06-20',
                              'type', type, 'data', jsonb_build_object('object', obj))::text $$;
CREATE FUNCTION pg_temp.signed(body text, secret text DEFAULT 'whsec_regress_secret',
                               t bigint DEFAULT extract(epoch FROM now())::bigint) RETURNS jsonb
    LANGUAGE sql AS $$
    SELECT jsonb_build_object('Stripe-Signature',
             format('t=%s,v1=%s', t, encode(hmac(t || '.' || body, secret, 'sha256'), 'hex')),
             'Content-Type', 'application/json; charset=utf-8') $$;
CREATE FUNCTION pg_temp.deliver(body text, secret text DEFAULT 'whsec_regress_secret',
                                t bigint DEFAULT extract(epoch FROM now())::bigint)
    RETURNS TABLE (http_status int, reply text, outcome text, event_id text)
    LANGUAGE sql AS $$ SELECT * FROM crmpay.receive_webhook('shop', pg_temp.signed(body, secret, t), body) $$;

-- Payments as the link step leaves them
INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, gateway_ref, idempotency_key)
VALUES ('shop', 'W-1', 1999, 'EUR', 'open', 'cs_test_w1', crmpay.idempotency_key('shop', 'W-1')),
       ('shop', 'W-2', 500, 'EUR', 'open', 'cs_test_w2', crmpay.idempotency_key('shop', 'W-2')),
       ('shop', 'W-3', 700, 'EUR', 'open', 'cs_test_w3', crmpay.idempotency_key('shop', 'W-3')),
       ('shop', 'W-4', 900, 'EUR', 'open', 'cs_test_w4', crmpay.idempotency_key('shop', 'W-4'));

-- A CRM follow-up action: issue an invoice when a payment becomes paid.
-- crmpay's functions pin search_path, so trigger code names its tables
-- with their schema.
CREATE TABLE public.invoices (payment_id bigint PRIMARY KEY, order_ref text, amount_minor bigint);
CREATE FUNCTION issue_invoice() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.invoices VALUES (NEW.id, NEW.order_ref, NEW.amount_minor);
    RETURN NULL;
END $$;
CREATE TRIGGER issue_invoice AFTER UPDATE OF status ON crmpay.payments
    FOR EACH ROW WHEN (NEW.status = 'paid' AND OLD.status <> 'paid')
    EXECUTE FUNCTION issue_invoice();

-- W-1: paid, then the same event again, then late failures and expiry
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_1', 'checkout.session.completed',
    '{"id": "cs_test_w1", "object": "checkout.session", "client_reference_id": "W-1",
      "payment_status": "paid", "status": "complete", "payment_intent": "pi_w1",
      "amount_total": 1999, "currency": "eur"}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_1', 'checkout.session.completed',
    '{"id": "cs_test_w1", "object": "checkout.session", "client_reference_id": "W-1",
      "payment_status": "paid", "status": "complete", "payment_intent": "pi_w1",
      "amount_total": 1999, "currency": "eur"}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_2', 'payment_intent.payment_failed',
    '{"id": "pi_w1", "object": "payment_intent", "metadata": {"crmpay_order_ref": "W-1"}}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_3', 'checkout.session.expired',
    '{"id": "cs_test_w1", "object": "checkout.session", "payment_status": "unpaid"}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_4', 'payment_intent.succeeded',
    '{"id": "pi_w1", "object": "payment_intent", "amount_received": 1999, "currency": "eur"}'));
-- refunds: partial, full, then a late partial that must not undo the full one
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_5', 'charge.refunded',
    '{"id": "ch_w1", "object": "charge", "payment_intent": "pi_w1", "amount": 1999, "amount_refunded": 500}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_6', 'charge.refunded',
    '{"id": "ch_w1", "object": "charge", "payment_intent": "pi_w1", "amount": 1999, "amount_refunded": 1999}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_7', 'charge.refunded',
    '{"id": "ch_w1", "object": "charge", "payment_intent": "pi_w1", "amount": 1999, "amount_refunded": 700}'));

-- W-2: out of order: payment_failed arrives after success; async settlement
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_20', 'checkout.session.completed',
    '{"id": "cs_test_w2", "client_reference_id": "W-2", "payment_status": "unpaid",
      "payment_intent": {"id": "pi_w2", "object": "payment_intent"}, "amount_total": 500, "currency": "eur"}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_22', 'checkout.session.async_payment_succeeded',
    '{"id": "cs_test_w2", "client_reference_id": "W-2", "payment_status": "paid",
      "payment_intent": "pi_w2", "amount_total": 500, "currency": "eur"}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_21', 'checkout.session.async_payment_failed',
    '{"id": "cs_test_w2", "client_reference_id": "W-2", "payment_status": "unpaid", "payment_intent": "pi_w2"}'));

-- W-3: a failed attempt, then the customer pays with another card
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_30', 'payment_intent.payment_failed',
    '{"id": "pi_w3", "metadata": {"crmpay_order_ref": "W-3"}}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_31', 'payment_intent.succeeded',
    '{"id": "pi_w3", "metadata": {"crmpay_order_ref": "W-3"}, "amount_received": 700, "currency": "eur"}'));

-- W-4: an amount that does not match is not applied; expiry is
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_40', 'checkout.session.completed',
    '{"id": "cs_test_w4", "payment_status": "paid", "amount_total": 1, "currency": "eur"}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_41', 'checkout.session.completed',
    '{"id": "cs_test_w4", "payment_status": "paid", "amount_total": 900, "currency": "usd"}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_42', 'checkout.session.expired',
    '{"id": "cs_test_w4", "payment_status": "unpaid"}'));

-- unknown payments and event types are recorded and ignored
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_50', 'checkout.session.completed',
    '{"id": "cs_test_unknown", "payment_status": "paid", "amount_total": 1, "currency": "eur"}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_51', 'customer.created', '{"id": "cus_1"}'));

-- rejected: nothing applied, each delivery recorded with its reason
SELECT * FROM crmpay.receive_webhook('shop', '{}',
    pg_temp.evt('evt_60', 'checkout.session.completed', '{"id": "cs_test_w3", "payment_status": "paid"}'));
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_61', 'checkout.session.completed',
    '{"id": "cs_test_w3", "payment_status": "paid"}'), 'whsec_wrong');
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_62', 'checkout.session.completed',
    '{"id": "cs_test_w3", "payment_status": "paid"}'), t => extract(epoch FROM now())::bigint - 400);
SELECT * FROM pg_temp.deliver('{"id": "evt_63", "type": "checkout.session.completed", ');
SELECT * FROM pg_temp.deliver('[1, 2, 3]');
SELECT * FROM pg_temp.deliver(repeat('[', 100) || repeat(']', 100));
SELECT * FROM pg_temp.deliver('{"id": "evt_64", "type": "x", "data": {"object": {"id": "\u0000"}}}');
SELECT * FROM crmpay.receive_webhook('no-such-account', '{}', '{}');
SELECT * FROM crmpay.receive_webhook('shop', '{"Stripe-Signature": ["t=1", "v1=2"]}', '{}');
-- a tampered body with a valid signature of the original
SELECT * FROM crmpay.receive_webhook('shop',
    pg_temp.signed(pg_temp.evt('evt_65', 'charge.refunded', '{"payment_intent": "pi_w3", "amount": 700, "amount_refunded": 1}')),
    pg_temp.evt('evt_65', 'charge.refunded', '{"payment_intent": "pi_w3", "amount": 700, "amount_refunded": 700}'));
-- the tolerance is superuser-only configuration (SUSET)
SET crmpay.webhook_tolerance = 0;
SELECT * FROM pg_temp.deliver(pg_temp.evt('evt_66', 'customer.created', '{"id": "cus_2"}'), t => 12345);
RESET crmpay.webhook_tolerance;

SELECT order_ref, status, gateway_payment_ref, refunded_minor, paid_at IS NOT NULL AS has_paid_at
  FROM crmpay.payments ORDER BY order_ref;
SELECT order_ref, amount_minor FROM invoices ORDER BY order_ref;
SELECT outcome, count(*) FROM crmpay.events GROUP BY outcome ORDER BY outcome;
SELECT event_key, outcome, old_status, new_status, reason
  FROM crmpay.events WHERE account = 'shop' AND event_key IS NOT NULL ORDER BY id;
SELECT http_status, reason, body IS NOT NULL AS body_kept
  FROM crmpay.events WHERE outcome = 'rejected' ORDER BY id;

-- The state machine's edges are data, cached per backend: a change applies
-- at once, and a rolled-back change is forgotten.
INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, gateway_ref, idempotency_key)
VALUES ('shop', 'W-5', 300, 'EUR', 'open', 'cs_test_w5', crmpay.idempotency_key('shop', 'W-5'));
BEGIN;
DELETE FROM crmpay.status_transitions WHERE from_status = 'open' AND to_status = 'paid';
SELECT outcome, event_id FROM pg_temp.deliver(pg_temp.evt('evt_70', 'checkout.session.completed',
    '{"id": "cs_test_w5", "payment_status": "paid", "payment_intent": "pi_w5", "amount_total": 300, "currency": "eur"}'));
SELECT reason FROM crmpay.events WHERE event_key = 'evt_70';
ROLLBACK;
SELECT outcome, event_id FROM pg_temp.deliver(pg_temp.evt('evt_70', 'checkout.session.completed',
    '{"id": "cs_test_w5", "payment_status": "paid", "payment_intent": "pi_w5", "amount_total": 300, "currency": "eur"}'));

-- Payments are found by the gateway's payment id through payment_refs,
-- whoever wrote it (here a shop inserting its own payment, as for
-- Braintree); a changed id is found by its new value only.
INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, gateway_payment_ref, idempotency_key)
VALUES ('shop', 'W-6', 300, 'EUR', 'open', 'pi_w6', crmpay.idempotency_key('shop', 'W-6'));
SELECT outcome FROM pg_temp.deliver(pg_temp.evt('evt_80', 'payment_intent.succeeded',
    '{"id": "pi_w6", "object": "payment_intent", "amount_received": 300, "currency": "eur"}'));
UPDATE crmpay.payments SET gateway_payment_ref = 'pi_w6b' WHERE account = 'shop' AND order_ref = 'W-6';
SELECT outcome FROM pg_temp.deliver(pg_temp.evt('evt_81', 'charge.refunded',
    '{"id": "ch_w6", "object": "charge", "payment_intent": "pi_w6", "amount": 300, "amount_refunded": 300}'));
SELECT reason FROM crmpay.events WHERE event_key = 'evt_81';
SELECT outcome FROM pg_temp.deliver(pg_temp.evt('evt_82', 'charge.refunded',
    '{"id": "ch_w6", "object": "charge", "payment_intent": "pi_w6b", "amount": 300, "amount_refunded": 300}'));
SELECT order_ref, status, gateway_payment_ref FROM crmpay.payments
 WHERE account = 'shop' AND order_ref IN ('W-5', 'W-6') ORDER BY order_ref;
SELECT r.gateway_payment_ref, p.order_ref FROM crmpay.payment_refs r JOIN crmpay.payments p ON p.id = r.payment_id
 WHERE r.account = 'shop' ORDER BY 1;

-- statuses and outcomes outside the lists are refused, whoever writes them
UPDATE crmpay.payments SET status = 'settled' WHERE account = 'shop' AND order_ref = 'W-5';
UPDATE crmpay.payments SET amount_minor = 0 WHERE account = 'shop' AND order_ref = 'W-5';
INSERT INTO crmpay.events (account, outcome, http_status) VALUES ('shop', 'accepted', 200);
