-- Adyen: HMAC vectors from the official SDKs' test suites (fixed `at`),
-- account validation, Adyen's minor units, and the webhook intake with
-- per-item verification of batches.
\set VERBOSITY default
\set SHOW_CONTEXT never
\pset null '(null)'

-- ---------------------------------------------------------------------
-- Signature vectors
-- ---------------------------------------------------------------------
-- A3 (adyen-python/ruby tests), key K2: the item's 8 fields are signed.
\set a3 '{"live": "false", "notificationItems": [{"NotificationRequestItem": {"additionalData": {"hmacSignature": "coqCmt/IZ4E3CzPvMY8zTjQVL5hYJUiBRg8UU+iCWo0="}, "amount": {"currency": "EUR", "value": 1130}, "pspReference": "7914073381342284", "eventCode": "AUTHORISATION", "eventDate": "2019-05-06T17:15:34.121+02:00", "merchantAccountCode": "TestMerchant", "merchantReference": "TestPayment-1407325143704", "operations": ["CANCEL", "CAPTURE", "REFUND"], "paymentMethod": "visa", "success": "true"}}]}'
\set k2 '44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056'
-- A1 (adyen-node hmacValidator.spec.ts), key K1: all 8 fields present.
\set a1 '{"live": "false", "notificationItems": [{"NotificationRequestItem": {"pspReference": "pspReference", "originalReference": "originalReference", "merchantAccountCode": "merchantAccount", "merchantReference": "reference", "amount": {"currency": "EUR", "value": 1000}, "eventCode": "CAPTURE", "eventDate": "1970-01-01T00:00:00.000Z", "paymentMethod": "VISA", "reason": "reason", "success": "true", "additionalData": {"hmacSignature": "xhpHvYq2u2Np0rstbZ6QjLGu7JWhvf7Iwaa6EviJSX0="}}}]}'
\set k1 'DFB1EB5485895CFA84146406857104ABB4CBCABDC8AAF103A624C8F6A3EAAB00'
-- Real test-environment notifications with ':', '\' and '/' in
-- merchantReference (adyen-python test/mocks/util/*_notification.json,
-- adyen-ruby spec/mocks/responses/Webhooks/mixed_webhook.json): Adyen
-- joins the fields without escaping them.  (psql's \set turns \\ into \, so
-- the JSON texts below read "\\\\slashes" and "\\:/\\/slashes".)
\set k3 '74F490DD33F7327BAECC88B2947C011FC02D014A473AAA33A8EC93E4DC069174'
\set colon '{"live": "false", "notificationItems": [{"NotificationRequestItem": {"additionalData": {"hmacSignature": "2EQYm7YJpKO4EtHSPu55SQTyWf8dkW5u2nD1tJFpViA=", "paymentMethod": "visa", "expiryDate": "03/2030"}, "amount": {"currency": "EUR", "value": 1000}, "eventCode": "AUTHORISATION", "eventDate": "2023-01-10T13:40:54+01:00", "merchantAccountCode": "AntoniStroinski", "merchantReference": ":slashes are fun", "operations": ["CANCEL", "CAPTURE", "REFUND"], "paymentMethod": "visa", "pspReference": "M8NB66SBZSGLNK82", "success": "true"}}]}'
\set backslash '{"live": "false", "notificationItems": [{"NotificationRequestItem": {"additionalData": {"hmacSignature": "nIgT81gaB5oJpn2jPXupDq68iRo2wUlBsuYjtYfwKqo=", "paymentMethod": "visa", "expiryDate": "03/2030"}, "amount": {"currency": "EUR", "value": 1000}, "eventCode": "AUTHORISATION", "eventDate": "2023-01-09T16:27:29+01:00", "merchantAccountCode": "AntoniStroinski", "merchantReference": "\\\\\\\\slashes are fun", "operations": ["CANCEL", "CAPTURE", "REFUND"], "paymentMethod": "visa", "pspReference": "T7FD4VM4D3RZNN82", "success": "true"}}]}'
\set forwardslash '{"live": "false", "notificationItems": [{"NotificationRequestItem": {"additionalData": {"hmacSignature": "9Z0xdpG9Xi3zcmXv14t/BvMBut77O/Xq9D4CQXSDUi4=", "paymentMethod": "visa", "expiryDate": "03/2030"}, "amount": {"currency": "EUR", "value": 1000}, "eventCode": "AUTHORISATION", "eventDate": "2023-01-10T13:37:30+01:00", "merchantAccountCode": "AntoniStroinski", "merchantReference": "//slashes are fun", "operations": ["CANCEL", "CAPTURE", "REFUND"], "paymentMethod": "visa", "pspReference": "X3GWNS6KJ8NKGK82", "success": "true"}}]}'
\set mixed '{"live": "false", "notificationItems": [{"NotificationRequestItem": {"additionalData": {"hmacSignature": "CZErGCNQaSsxbaQfZaJlakqo7KPP+mIa8a+wx3yNs9A=", "paymentMethod": "visa", "expiryDate": "03/2030"}, "amount": {"currency": "EUR", "value": 1000}, "eventCode": "AUTHORISATION", "eventDate": "2023-01-10T13:42:29+01:00", "merchantAccountCode": "AntoniStroinski", "merchantReference": "\\\\:/\\\\/slashes are fun", "operations": ["CANCEL", "CAPTURE", "REFUND"], "paymentMethod": "visa", "pspReference": "ZVWN7D3WSMK2WN82", "success": "true"}}]}'

SELECT crmpay.verify_signature('adyen', :'k2', '{}', :'a3', '0', '2026-01-01 00:00+00') AS a3,
       crmpay.verify_signature('adyen', :'k1', '{}', :'a1', '0', '2026-01-01 00:00+00') AS a1_node,
       crmpay.verify_signature('adyen', lower(:'k2'), '{}', :'a3', '0', '2026-01-01 00:00+00') AS a3_lowercase_key,
       crmpay.verify_signature('adyen', :'k3', '{}', :'colon', '0', '2026-01-01 00:00+00') AS colon,
       crmpay.verify_signature('adyen', :'k3', '{}', :'backslash', '0', '2026-01-01 00:00+00') AS backslash,
       crmpay.verify_signature('adyen', :'k3', '{}', :'forwardslash', '0', '2026-01-01 00:00+00') AS forwardslash,
       crmpay.verify_signature('adyen', :'k3', '{}', :'mixed', '0', '2026-01-01 00:00+00') AS mixed;
-- what an escaping signer (\ -> \\, : -> \:) would have sent does not verify
SELECT crmpay.verify_signature('adyen', :'k3', '{}',
         replace(:'colon', '2EQYm7YJpKO4EtHSPu55SQTyWf8dkW5u2nD1tJFpViA=',
                 encode(hmac(convert_to('M8NB66SBZSGLNK82::AntoniStroinski:\:slashes are fun:1000:EUR:AUTHORISATION:true', 'UTF8'),
                             decode(:'k3', 'hex'), 'sha256'), 'base64')), '0') AS escaped_colon;
-- the body around the signed fields may change (only the 8 fields are signed)
SELECT crmpay.verify_signature('adyen', :'k2', '{}', replace(:'a3', '"visa"', '"mc"'), '0') AS unsigned_field_changed,
       crmpay.verify_signature('adyen', :'k2', '{}', replace(:'a3', '1130', '1131'), '0') AS amount_changed,
       crmpay.verify_signature('adyen', :'k2', '{}', replace(:'a3', '"true"', '"false"'), '0') AS success_changed,
       crmpay.verify_signature('adyen', :'k2', '{}', replace(:'a3', '"value": 1130', '"value": "1130"'), '0') AS value_as_string,
       crmpay.verify_signature('adyen', :'k1', '{}', :'a3', '0') AS other_key,
       crmpay.verify_signature('adyen', :'k1' || ',' || :'k2', '{}', :'a3', '0') AS rotation_second_key,
       crmpay.verify_signature('adyen', :'k2' || ', ' || :'k1', '{}', :'a3', '0') AS rotation_first_key,
       crmpay.verify_signature('adyen', 'not hex', '{}', :'a3', '0') AS secret_not_hex,
       crmpay.verify_signature('adyen', :'k2', '{}', replace(:'a3', 'coqCmt/IZ4E3CzPvMY8zTjQVL5hYJUiBRg8UU+iCWo0=', 'coqCmt/IZ4E3CzPvMY8zTjQVL5hYJUiBRg8UU+iCWo0'), '0') AS unpadded,
       crmpay.verify_signature('adyen', :'k2', '{}', replace(:'a3', '"hmacSignature": "coqCmt/IZ4E3CzPvMY8zTjQVL5hYJUiBRg8UU+iCWo0="', '"hmac": "x"'), '0') AS no_signature,
       crmpay.verify_signature('adyen', :'k2', '{}', '{"live": "false", "notificationItems": []}', '0') AS no_items,
       crmpay.verify_signature('adyen', :'k2', '{}', left(:'a3', 100), '0') AS truncated;
-- every item must verify: a good item next to a forged one is not enough
SELECT crmpay.verify_signature('adyen', :'k2', '{}',
         replace(:'a3', ']}', ', ' || ((:'a3')::jsonb->'notificationItems'->0)::text || ', ' ||
                 replace(((:'a3')::jsonb->'notificationItems'->0)::text, '1130', '9999') || ']}'), '0') AS batch_with_forged_item,
       crmpay.verify_signature('adyen', :'k2', '{}',
         replace(:'a3', ']}', ', ' || ((:'a3')::jsonb->'notificationItems'->0)::text || ']}'), '0') AS batch_of_good_items;

-- HmacSignature header (Management/platform webhooks): HMAC of the raw body
-- (adyen-python test_is_valid_hmac_payload, key K2, body byte for byte).
\set raw '\n        {\n            "type": "merchant.created",\n            "environment": "test",\n            "createdAt": "01-01-2024",\n            "data": {\n                "capabilities": {\n                    "sendToTransferInstrument": {\n                        "requested": true,\n                        "requestedLevel": "notApplicable"\n                    }\n                },\n                "companyId": "YOUR_COMPANY_ID",\n                "merchantId": "YOUR_MERCHANT_ACCOUNT",\n                "status": "PreActive"\n            }\n        }\n        '
SELECT length(E:'raw') AS raw_bytes,
       crmpay.verify_signature('adyen', :'k2', '{"HmacSignature": "fX74xUdztFmaXAn3IusMFFUBUSkLmDQUK0tm8xL6ZTU="}', E:'raw', '0') AS raw_body,
       crmpay.verify_signature('adyen', :'k2', '{"hmacsignature": "fX74xUdztFmaXAn3IusMFFUBUSkLmDQUK0tm8xL6ZTU="}', rtrim(E:'raw', ' '), '0') AS raw_body_trimmed,
       crmpay.verify_signature('adyen', :'k2', '{"HmacSignature": "MismatchingHmacKey="}', E:'raw', '0') AS raw_mismatch,
       crmpay.verify_signature('adyen', :'k2', '{"HmacSignature": "coqCmt/IZ4E3CzPvMY8zTjQVL5hYJUiBRg8UU+iCWo0="}', :'a3', '0') AS header_overrides_items;

-- ---------------------------------------------------------------------
-- Accounts: credentials {"api_key"}, settings merchant_account, return_url
-- ---------------------------------------------------------------------
SELECT crmpay.add_account('ady', 'adyen', '{}', NULL, '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid"}');
SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQE key"}', NULL, '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid"}');
SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQEtestkey0123456789"}', NULL, '{"return_url": "https://shop.example/paid"}');
SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQEtestkey0123456789"}', NULL, '{"merchant_account": "ShopECOM"}');
SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQEtestkey0123456789"}', NULL, '{"merchant_account": "ShopECOM", "return_url": "http://shop.example/paid"}');
SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQEtestkey0123456789"}', NULL, '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid", "live_url_prefix": "evil.example/x"}');
SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQEtestkey0123456789"}', NULL, '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid", "link_ttl": 8000000}');
SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQEtestkey0123456789"}', NULL, '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid", "link_ttl": "1 day"}');
SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQEtestkey0123456789"}', 'whsec_not_adyen', '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid"}');
SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQEtestkey0123456789"}', left(:'k2', 32), '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid"}');
SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQEtestkey0123456789"}', :'k2' || ',', '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid"}');
-- good ones: a test account (webhook key K2), a live one with a rotation in progress
SELECT crmpay.add_account('ady', 'adyen', '{"api_key": "AQEtestkey0123456789"}', :'k2',
                          '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid", "link_ttl": 3600}');
SELECT crmpay.add_account('ady-live', 'adyen', '{"api_key": "AQElivekey0123456789"}', :'k1' || ',' || :'k2',
                          '{"merchant_account": "ShopLIVE", "return_url": "https://shop.example/paid", "live_url_prefix": "1797a841fbb37ca7-AdyenDemo"}');
SELECT name, provider, settings, has_webhook_secret FROM crmpay.accounts WHERE provider = 'adyen' ORDER BY name;
SELECT crmpay.update_account('ady', settings => '{"merchant_account": "ShopECOM"}');

-- ---------------------------------------------------------------------
-- Amounts: Adyen's minor units differ from ISO 4217 for CLP, CVE, IDR, ISK
-- ---------------------------------------------------------------------
-- the C table agrees with crmpay.currencies on every ISO exponent
SELECT count(*) AS adyen_currencies,
       count(*) FILTER (WHERE c.code IS NULL) AS unknown_to_crmpay,
       count(*) FILTER (WHERE c.exponent <> a.iso_exponent) AS iso_mismatches
  FROM crmpay._adyen_currencies() a LEFT JOIN crmpay.currencies c USING (code);
SELECT code, exponent AS adyen, iso_exponent AS iso FROM crmpay._adyen_currencies()
 WHERE exponent <> iso_exponent ORDER BY code;
SELECT r->>'currency' AS currency, r->>'amount_minor' AS iso_minor
  FROM (VALUES ('1999.99', 'JPY'), ('1.234', 'KWD'), ('1500', 'ISK'), ('990', 'CLP'),
               ('15000', 'IDR'), ('250', 'CVE'), ('12.5', 'EUR')) v(amount, currency),
       LATERAL crmpay._link_request('ady', 'A-' || v.currency, v.amount::numeric, v.currency, NULL, NULL, NULL) r
 WHERE v.currency <> 'JPY';
SELECT crmpay._link_request('ady', 'A-1', 1999.99, 'JPY', NULL, NULL, NULL);
SELECT crmpay._link_request('ady', 'A-1', 15000.50, 'IDR', NULL, NULL, NULL);
SELECT crmpay._link_request('ady', 'A-1', 12.50, 'CVE', NULL, NULL, NULL);
SELECT crmpay._link_request('ady', 'A-1', 100, 'BIF', NULL, NULL, NULL);
SELECT crmpay._link_request('ady', 'A-1', 92233720368547759, 'ISK', NULL, NULL, NULL);

-- ---------------------------------------------------------------------
-- Webhook intake
-- ---------------------------------------------------------------------
-- Helpers: a signed NotificationRequestItem and a notification body, made
-- independently of crmpay (pgcrypto's HMAC).
CREATE FUNCTION pg_temp.item(psp text, code text, success boolean, value bigint, currency text,
                             ref text DEFAULT NULL, orig text DEFAULT NULL,
                             link text DEFAULT NULL, merchant text DEFAULT 'ShopECOM',
                             key text DEFAULT '44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056')
    RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
             'pspReference', psp, 'originalReference', orig, 'merchantAccountCode', merchant,
             'merchantReference', ref, 'amount', jsonb_build_object('value', value, 'currency', currency),
             'eventCode', code, 'success', success::text, 'eventDate', '2026-01-01T10:00:00+01:00',
             'paymentMethod', 'visa',
             'additionalData', jsonb_build_object('paymentLinkId', link, 'hmacSignature',
                encode(hmac(convert_to(concat_ws(':', psp, coalesce(orig, ''), merchant, coalesce(ref, ''),
                                                 value, currency, code, success::text), 'UTF8'),
                            decode(key, 'hex'), 'sha256'), 'base64')))) $$;
CREATE FUNCTION pg_temp.notification(VARIADIC items jsonb[]) RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object('live', 'false', 'notificationItems',
             (SELECT jsonb_agg(jsonb_build_object('NotificationRequestItem', i)) FROM unnest(items) i))::text $$;
CREATE FUNCTION pg_temp.deliver(VARIADIC items jsonb[])
    RETURNS TABLE (http_status int, reply text, outcome text, event_id text)
    LANGUAGE sql AS $$
    SELECT * FROM crmpay.receive_webhook('ady', '{"Content-Type": "application/json"}', pg_temp.notification(VARIADIC items)) $$;

INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, gateway_ref, idempotency_key)
VALUES ('ady', 'AD-1', 1999, 'EUR', 'open', 'PL0000000001', crmpay.idempotency_key('ady', 'AD-1')),
       ('ady', 'AD-2', 500, 'EUR', 'open', 'PL0000000002', crmpay.idempotency_key('ady', 'AD-2')),
       ('ady', 'AD-3', 1500, 'ISK', 'open', 'PL0000000003', crmpay.idempotency_key('ady', 'AD-3')),
       ('ady', 'AD-4', 15000, 'IDR', 'open', 'PL0000000004', crmpay.idempotency_key('ady', 'AD-4')),
       ('ady', 'AD-5', 700, 'EUR', 'open', 'PL0000000005', crmpay.idempotency_key('ady', 'AD-5')),
       ('ady', 'AD-6', 900, 'EUR', 'open', 'PL0000000006', crmpay.idempotency_key('ady', 'AD-6'));

-- AD-1: paid by the link (matched by paymentLinkId), then the same delivery again
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP1', 'AUTHORISATION', true, 1999, 'EUR', 'AD-1', link => 'PL0000000001'));
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP1', 'AUTHORISATION', true, 1999, 'EUR', 'AD-1', link => 'PL0000000001'));
-- partial refunds add up (each REFUND carries its own amount), a failed one changes nothing
SELECT * FROM pg_temp.deliver(pg_temp.item('RF1', 'REFUND', true, 500, 'EUR', 'refund-1', 'PSP1'));
SELECT * FROM pg_temp.deliver(pg_temp.item('RF1', 'REFUND', true, 500, 'EUR', 'refund-1', 'PSP1'));
SELECT * FROM pg_temp.deliver(pg_temp.item('RF2', 'REFUND', false, 600, 'EUR', 'refund-2', 'PSP1'));
SELECT * FROM pg_temp.deliver(pg_temp.item('RF3', 'REFUND', true, 1499, 'EUR', 'refund-3', 'PSP1'));
-- AD-2: a refused attempt, then a successful one (matched by merchantReference)
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP2A', 'AUTHORISATION', false, 500, 'EUR', 'AD-2'));
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP2B', 'AUTHORISATION', true, 500, 'EUR', 'AD-2'));
-- a late failure of the first attempt cannot undo it; a chargeback disputes it
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP2C', 'AUTHORISATION', false, 500, 'EUR', 'AD-2'));
SELECT * FROM pg_temp.deliver(pg_temp.item('CB2', 'CHARGEBACK', true, 500, 'EUR', 'AD-2', 'PSP2B'));
-- AD-3: ISK has 2 decimals at Adyen: 1500 ISK is value 150000
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP3', 'AUTHORISATION', true, 1500, 'ISK', 'AD-3'));
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP3', 'AUTHORISATION', true, 150000, 'ISK', 'AD-3'));
-- an ISK value with Adyen decimals is no whole ISO amount: never compared
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP3X', 'REFUND', true, 150050, 'ISK', 'r', 'PSP3'));
-- AD-4: IDR has no decimals at Adyen: 150.00 IDR (15000 ISO minor) is
-- value 150; value 15000 would be 15000 IDR
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP4X', 'AUTHORISATION', true, 15000, 'IDR', 'AD-4'));
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP4', 'AUTHORISATION', true, 150, 'IDR', 'AD-4'));
-- AD-5: canceled; another merchant account's notification is ignored
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP5', 'AUTHORISATION', true, 700, 'EUR', 'AD-5', merchant => 'OtherECOM'));
SELECT * FROM pg_temp.deliver(pg_temp.item('CX5', 'CANCELLATION', true, 700, 'EUR', 'AD-5', 'PSP5', link => 'PL0000000005'));
-- AD-6 refunds: too early (not paid yet), then after the capture-less payment
SELECT * FROM pg_temp.deliver(pg_temp.item('RF6', 'REFUND', true, 100, 'EUR', 'r6', 'PSP6', link => 'PL0000000006'));
-- events that do not move payments
SELECT * FROM pg_temp.deliver(pg_temp.item('RP1', 'REPORT_AVAILABLE', true, 0, 'EUR', 'report.csv'));
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP9', 'AUTHORISATION', true, 100, 'EUR', 'NO-SUCH-ORDER'));

-- AD-6: a batch with a good item and a forged one: the good one is applied,
-- the forged one recorded as rejected, and Adyen gets its [accepted]
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP6', 'AUTHORISATION', true, 900, 'EUR', 'AD-6'),
                              pg_temp.item('PSP6X', 'REFUND', true, 900, 'EUR', 'x', 'PSP6', key => :'k1'));
-- nothing authentic: the delivery is refused (Adyen retries it later)
SELECT * FROM pg_temp.deliver(pg_temp.item('PSP6Y', 'REFUND', true, 900, 'EUR', 'x', 'PSP6', key => :'k1'));
-- the same item twice in one batch is applied once; a capture of a paid payment changes nothing;
-- a refund larger than what is left refunds the rest
SELECT * FROM pg_temp.deliver(pg_temp.item('RF6B', 'REFUND', true, 400, 'EUR', 'r6', 'PSP6'),
                              pg_temp.item('RF6B', 'REFUND', true, 400, 'EUR', 'r6', 'PSP6'),
                              pg_temp.item('CP6', 'CAPTURE', true, 900, 'EUR', 'c6', 'PSP6'),
                              pg_temp.item('RF6C', 'REFUND', true, 900, 'EUR', 'r6', 'PSP6'));
-- an authentic whole delivery (HmacSignature header) needs no per-item signature
SELECT * FROM crmpay.receive_webhook('ady',
    jsonb_build_object('HmacSignature', encode(hmac(convert_to(pg_temp.notification(
        pg_temp.item('PSP7', 'AUTHORISATION', true, 1, 'EUR', 'H-1') #- '{additionalData,hmacSignature}'), 'UTF8'),
        decode(:'k2', 'hex'), 'sha256'), 'base64')),
    pg_temp.notification(pg_temp.item('PSP7', 'AUTHORISATION', true, 1, 'EUR', 'H-1') #- '{additionalData,hmacSignature}'));
SELECT * FROM crmpay.receive_webhook('ady', '{"HmacSignature": "fX74xUdztFmaXAn3IusMFFUBUSkLmDQUK0tm8xL6ZTU="}',
    pg_temp.notification(pg_temp.item('PSP7', 'AUTHORISATION', true, 1, 'EUR', 'H-1')));
SELECT * FROM crmpay.receive_webhook('ady', '{}', '{"live": "false"}');
SELECT * FROM crmpay.receive_webhook('ady', '{}', 'not json');
SELECT * FROM crmpay.receive_webhook('nope', '{}', pg_temp.notification(pg_temp.item('P', 'AUTHORISATION', true, 1, 'EUR')));
-- the live account accepts items signed with either key of its rotation
SELECT * FROM crmpay.receive_webhook('ady-live', '{}',
    pg_temp.notification(pg_temp.item('PSPL1', 'AUTHORISATION', true, 100, 'EUR', 'L-1', merchant => 'ShopLIVE', key => :'k1'),
                         pg_temp.item('PSPL2', 'AUTHORISATION', true, 100, 'EUR', 'L-2', merchant => 'ShopLIVE', key => :'k2')));

SELECT order_ref, status, amount_minor, currency, refunded_minor, gateway_payment_ref, paid_at IS NOT NULL AS has_paid_at
  FROM crmpay.payments WHERE account = 'ady' ORDER BY order_ref;
SELECT event_key, event_type, outcome, reason, old_status, new_status, http_status
  FROM crmpay.events WHERE account IN ('ady', 'ady-live', 'nope') ORDER BY id;
