-- Redsys: HMAC_SHA256_V1 against the reference vectors, account validation,
-- order numbers, amounts and currencies, the signed redirect form, and
-- notification intake through the state machine.
\set VERBOSITY default
\set SHOW_CONTEXT never
\pset null '(null)'
CREATE EXTENSION IF NOT EXISTS pgcrypto;

-- An oracle independent of crmpay's C code: pgcrypto's 3DES and HMAC.
-- order key = 3DES-CBC(base64-decoded key, IV 0, order zero-padded to 8)
CREATE FUNCTION pg_temp.oracle_order_key(merchant_key text, ord text) RETURNS bytea
    LANGUAGE sql AS $$
    SELECT encrypt_iv(convert_to(ord, 'UTF8')
                      || decode(repeat('00', (8 - octet_length(convert_to(ord, 'UTF8')) % 8) % 8), 'hex'),
                      decode(merchant_key, 'base64'), '\x0000000000000000'::bytea, '3des-cbc/pad:none') $$;
CREATE FUNCTION pg_temp.oracle_sig(merchant_key text, ord text, params text, url boolean DEFAULT false)
    RETURNS text LANGUAGE sql AS $$
    SELECT CASE WHEN url THEN translate(s, '+/', '-_') ELSE s END
      FROM (SELECT encode(hmac(convert_to(params, 'UTF8'), pg_temp.oracle_order_key(merchant_key, ord),
                               'sha256'), 'base64') AS s) x $$;

-- R4 (gateways.md 5.2; python-redsys test_encrypt_3DES): the order key only
SELECT encode(crmpay._redsys_order_key('sq7HjrUOBfKmC576ILgskD5srU870gJ7', '000000000001'), 'hex') AS r4,
       crmpay._redsys_order_key('sq7HjrUOBfKmC576ILgskD5srU870gJ7', '000000000001')
         = '\x2f175c360a1a59f3d7a597b9b6e08d48' AS r4_matches,
       pg_temp.oracle_order_key('sq7HjrUOBfKmC576ILgskD5srU870gJ7', '000000000001')
         = '\x2f175c360a1a59f3d7a597b9b6e08d48' AS r4_oracle_agrees;

-- R1 (official apiRedsys PHP example, via Som-Energia/sermepa): a request
\set r1_params 'eyJEU19NRVJDSEFOVF9BTU9VTlQiOiIxNDUiLCJEU19NRVJDSEFOVF9PUkRFUiI6IjE0NDc5NjE4NDQiLCJEU19NRVJDSEFOVF9NRVJDSEFOVENPREUiOiI5OTkwMDg4ODEiLCJEU19NRVJDSEFOVF9DVVJSRU5DWSI6Ijk3OCIsIkRTX01FUkNIQU5UX1RSQU5TQUNUSU9OVFlQRSI6IjAiLCJEU19NRVJDSEFOVF9URVJNSU5BTCI6Ijg3MSIsIkRTX01FUkNIQU5UX01FUkNIQU5UVVJMIjoiIiwiRFNfTUVSQ0hBTlRfVVJMT0siOiIiLCJEU19NRVJDSEFOVF9VUkxLTyI6IiJ9'
SELECT encode(crmpay._redsys_order_key('Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '1447961844'), 'base64')
         = '38t5Zm5RjlVHNycd8Nutcg==' AS r1_order_key,
       crmpay._redsys_signature('Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '1447961844', :'r1_params') AS r1,
       crmpay._redsys_signature('Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '1447961844', :'r1_params')
         = 'Ejse86yr96Xbr1mf6UvQLoTPwwTyFiLXM+2uT09i9nY=' AS r1_matches;

-- RE1 (redsys-easy test/fixtures/rest/redirect.ts): a redirect request
\set re1_params 'eyJEU19NRVJDSEFOVF9UUkFOU0FDVElPTlRZUEUiOiIwIiwiRFNfTUVSQ0hBTlRfT1JERVIiOiIwNzI2cUkzSDdzWngiLCJEU19NRVJDSEFOVF9NRVJDSEFOVENPREUiOiI5OTkwMDg4ODEiLCJEU19NRVJDSEFOVF9URVJNSU5BTCI6IjEiLCJEU19NRVJDSEFOVF9BTU9VTlQiOiI0OTk5IiwiRFNfTUVSQ0hBTlRfQ1VSUkVOQ1kiOiI5NzgiLCJEU19NRVJDSEFOVF9NRVJDSEFOVFVSTCI6Imh0dHA6Ly93d3cucHJ1ZWJhLmNvbS91cmxOb3RpZmljYWNpb24ucGhwIiwiRFNfTUVSQ0hBTlRfVVJMT0siOiJodHRwOi8vd3d3LnBydWViYS5jb20vdXJsT0sucGhwIiwiRFNfTUVSQ0hBTlRfVVJMS08iOiJodHRwOi8vd3d3LnBydWViYS5jb20vdXJsS08ucGhwIn0='
SELECT encode(crmpay._redsys_order_key('sq7HjrUOBfKmC576ILgskD5srU870gJ7', '0726qI3H7sZx'), 'base64')
         = 'GViV77kFjMPKVUcE9qxzlg==' AS re1_order_key,
       crmpay._redsys_signature('sq7HjrUOBfKmC576ILgskD5srU870gJ7', '0726qI3H7sZx', :'re1_params')
         = 'TyW+LIa2GZnhCPLM7JSPwbQn4ZjOvMO/KiIf4yJgwo8=' AS re1_matches;

-- R2 (official PHP example, notification side): form-encoded, base64url
-- signature; also as JSON, with the standard alphabet, and unpadded
SELECT encode(crmpay._redsys_order_key('Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '666'), 'base64') AS r2_order_key,
       crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '{}',
         'Ds_SignatureVersion=HMAC_SHA256_V1&Ds_MerchantParameters=eyJEc19PcmRlciI6ICI2NjYifQ%3D%3D&Ds_Signature=BskiXgq875tls56oClRVg72-ppcLpOSW0JUY9riQEKs%3D') AS r2_form,
       crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '{}',
         '{"Ds_SignatureVersion": "HMAC_SHA256_V1", "Ds_MerchantParameters": "eyJEc19PcmRlciI6ICI2NjYifQ==", "Ds_Signature": "BskiXgq875tls56oClRVg72+ppcLpOSW0JUY9riQEKs="}') AS r2_json_std_alphabet,
       crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', NULL,
         'Ds_Signature=BskiXgq875tls56oClRVg72-ppcLpOSW0JUY9riQEKs&Ds_MerchantParameters=eyJEc19PcmRlciI6ICI2NjYifQ%3D%3D&Ds_SignatureVersion=HMAC_SHA256_V1') AS r2_unpadded_signature_any_order,
       crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', NULL,
         'Ds_Signature=BskiXgq875tls56oClRVg72-ppcLpOSW0JUY9riQEKs&Ds_MerchantParameters=eyJEc19PcmRlciI6ICI2NjYifQ&Ds_SignatureVersion=HMAC_SHA256_V1') AS r2_params_not_as_signed,
       pg_temp.oracle_sig('Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '666', 'eyJEc19PcmRlciI6ICI2NjYifQ==', true)
         = 'BskiXgq875tls56oClRVg72-ppcLpOSW0JUY9riQEKs=' AS r2_oracle_agrees;

-- RE2, RE3, RE4 (redsys-easy fixtures): a REST notification (Ds_Order 0069),
-- a redirect notification, a signed REST answer as JSON
\set re2_params 'eyJEc19EYXRlIjoiMDklMkYxMSUyRjIwMTUiLCJEc19Ib3VyIjoiMTglM0EwMyIsIkRzX1NlY3VyZVBheW1lbnQiOiIwIiwiRHNfQ2FyZF9Db3VudHJ5IjoiNzI0IiwiRHNfQW1vdW50IjoiMTQ1IiwiRHNfQ3VycmVuY3kiOiI5NzgiLCJEc19PcmRlciI6IjAwNjkiLCJEc19NZXJjaGFudENvZGUiOiI5OTkwMDg4ODEiLCJEc19UZXJtaW5hbCI6Ijg3MSIsIkRzX1Jlc3BvbnNlIjoiMDAwMCIsIkRzX01lcmNoYW50RGF0YSI6IiIsIkRzX1RyYW5zYWN0aW9uVHlwZSI6IjAiLCJEc19Db25zdW1lckxhbmd1YWdlIjoiMSIsIkRzX0F1dGhvcmlzYXRpb25Db2RlIjoiMDgyMTUwIn0='
\set re3_params 'eyJEc19EYXRlIjoiMjIlMkYxMCUyRjIwMjEiLCJEc19Ib3VyIjoiMjIlM0E1MSIsIkRzX1NlY3VyZVBheW1lbnQiOiIxIiwiRHNfQ2FyZF9OdW1iZXIiOiI0NTQ4ODEqKioqKiowMDA0IiwiRHNfQ2FyZF9Db3VudHJ5IjoiNzI0IiwiRHNfQW1vdW50IjoiNDk5OSIsIkRzX0N1cnJlbmN5IjoiOTc4IiwiRHNfT3JkZXIiOiIwNzI2cUkzSDdzWngiLCJEc19NZXJjaGFudENvZGUiOiI5OTkwMDg4ODEiLCJEc19UZXJtaW5hbCI6IjAwMSIsIkRzX1Jlc3BvbnNlIjoiMDAwMCIsIkRzX01lcmNoYW50RGF0YSI6IiIsIkRzX1RyYW5zYWN0aW9uVHlwZSI6IjAiLCJEc19Db25zdW1lckxhbmd1YWdlIjoiMSIsIkRzX0F1dGhvcmlzYXRpb25Db2RlIjoiMDUyMDI5IiwiRHNfQ2FyZF9CcmFuZCI6IjEiLCJEc19Qcm9jZXNzZWRQYXlNZXRob2QiOiIxIn0='
\set re4_params 'eyJEc19BbW91bnQiOiIxNDUiLCJEc19DdXJyZW5jeSI6Ijk3OCIsIkRzX09yZGVyIjoiMTQ0NjA2ODU4MSIsIkRzX01lcmNoYW50Q29kZSI6Ijk5OTAwODg4MSIsIkRzX1Rlcm1pbmFsIjoiMSIsIkRzX1Jlc3BvbnNlIjoiMDAwMCIsIkRzX0F1dGhvcmlzYXRpb25Db2RlIjoiNTAxNjAyIiwiRHNfVHJhbnNhY3Rpb25UeXBlIjoiMCIsIkRzX1NlY3VyZVBheW1lbnQiOiIwIiwiRHNfTGFuZ3VhZ2UiOiIxIiwiRHNfQ2FyZE51bWJlciI6IjQ1NDg4MSoqKioqKioqMDQiLCJEc19NZXJjaGFudERhdGEiOiIiLCJEc19DYXJkX0NvdW50cnkiOiI3MjQiLCJEc19DYXJkX0JyYW5kIjoiMSJ9'
SELECT crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '{}',
         'Ds_SignatureVersion=HMAC_SHA256_V1&Ds_MerchantParameters=' || replace(:'re2_params', '=', '%3D')
         || '&Ds_Signature=6DVpRPAPoChZh2cgaWnLqlfFsKeXdRfAO_tz-UrxJcU%3D') AS re2,
       encode(crmpay._redsys_order_key('Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '0069'), 'base64') = '0mL++6eIic8=' AS re2_order_key,
       crmpay.verify_signature('redsys', 'sq7HjrUOBfKmC576ILgskD5srU870gJ7', '{}',
         'Ds_SignatureVersion=HMAC_SHA256_V1&Ds_MerchantParameters=' || replace(:'re3_params', '=', '%3D')
         || '&Ds_Signature=52nPyUkyDws__OfMqDka_yN-arxzulELZC1TYTvvR0s%3D') AS re3,
       crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '{}',
         json_build_object('Ds_SignatureVersion', 'HMAC_SHA256_V1', 'Ds_MerchantParameters', :'re4_params',
                           'Ds_Signature', 'IoGNijSDZGbk+qChH2iqRCg6jZVl3Ee6Ha/WBM4wgto=')::text) AS re4;

-- anything changed fails: key (redsys-easy's incorrectMerchantKey), a
-- parameter byte, the order, the version; malformed input is just false
SELECT crmpay.verify_signature('redsys', 'Lk9m98IfEblmPfrpsawt7BmxObt98Jev', '{}',
         'Ds_SignatureVersion=HMAC_SHA256_V1&Ds_MerchantParameters=eyJEc19PcmRlciI6ICI2NjYifQ%3D%3D&Ds_Signature=BskiXgq875tls56oClRVg72-ppcLpOSW0JUY9riQEKs%3D') AS other_key,
       crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '{}',
         'Ds_SignatureVersion=HMAC_SHA256_V1&Ds_MerchantParameters=eyJEc19PcmRlciI6ICI2NjcifQ%3D%3D&Ds_Signature=BskiXgq875tls56oClRVg72-ppcLpOSW0JUY9riQEKs%3D') AS order_667,
       crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '{}',
         'Ds_SignatureVersion=HMAC_SHA256_V2&Ds_MerchantParameters=eyJEc19PcmRlciI6ICI2NjYifQ%3D%3D&Ds_Signature=BskiXgq875tls56oClRVg72-ppcLpOSW0JUY9riQEKs%3D') AS version_v2,
       crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '{}',
         'Ds_SignatureVersion=HMAC_SHA256_V1&Ds_MerchantParameters=eyJEc19PcmRlciI6ICI2NjYifQ%3D%3D&Ds_Signature=BskiXgq875tls56oClRVg72-ppcLpOSW0JUY9riQEKs%3D&Ds_Signature=x') AS two_signatures,
       crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '{}',
         'Ds_SignatureVersion=HMAC_SHA256_V1&Ds_MerchantParameters=eyJEc19PcmRlciI6ICI2NjYifQ%3D%3D') AS no_signature,
       crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '{}', 'garbage%zz') AS garbage,
       crmpay.verify_signature('redsys', 'not a key', '{}',
         'Ds_SignatureVersion=HMAC_SHA256_V1&Ds_MerchantParameters=eyJEc19PcmRlciI6ICI2NjYifQ%3D%3D&Ds_Signature=BskiXgq875tls56oClRVg72-ppcLpOSW0JUY9riQEKs%3D') AS bad_key;
-- the order in any letter case (DS_ORDER, DS_MERCHANT_ORDER); twice is refused
SELECT crmpay.verify_signature('redsys', 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '{}',
         format('{"Ds_SignatureVersion": "HMAC_SHA256_V1", "Ds_MerchantParameters": "%s", "Ds_Signature": "%s"}',
                p, pg_temp.oracle_sig('Mk9m98IfEblmPfrpsawt7BmxObt98Jev', '12345678', p))) AS verified, j
  FROM (VALUES ('{"DS_ORDER":"12345678"}'), ('{"ds_merchant_order":"12345678"}'),
               ('{"Ds_Merchant_Order":"12345678","DS_MERCHANT_AMOUNT":"100"}'),
               ('{"Ds_Order":"12345678","DS_ORDER":"12345678"}'),
               ('{"Ds_Amount":"100"}')) v(j),
       LATERAL (SELECT replace(encode(convert_to(j, 'UTF8'), 'base64'), E'\n', '') AS p) b;

-- ---------------------------------------------------------------------
-- Accounts: clear errors, nothing written
-- ---------------------------------------------------------------------
SELECT crmpay.add_account('rs', 'redsys', '{"key": "x"}', NULL, '{}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "c3E3SGpyVU9CZkttQzU3NklMZ3NrRDVzclU4NzBnSjc="}', NULL, '{}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ!"}', NULL, '{}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL, '{}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": 999008881}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": "99900888"}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": "999008881", "terminal": "0001"}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": "999008881", "terminal": "1"}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": "999008881", "terminal": "1", "notification_url": "http://crm.example/n"}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": "999008881", "terminal": "1", "notification_url": "https://crm.example/n",
                            "paygold": "yes"}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": "999008881", "terminal": "1", "notification_url": "https://crm.example/n",
                            "paygold": true, "paygold_expiry_minutes": 60}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": "999008881", "terminal": "1", "notification_url": "https://crm.example/n",
                            "merchant_name": "A merchant name far too long for Redsys"}');
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}',
                          'sq7HjrUOBfKmC576ILgskD5srU870gJ7',
                          '{"merchant_code": "999008881", "terminal": "1", "notification_url": "https://crm.example/n"}');
SELECT count(*) AS redsys_accounts_after_errors FROM crmpay.gateway_accounts WHERE provider = 'redsys';

-- good accounts: two share the public test merchant; one has Paygold
SELECT crmpay.add_account('rs', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": "999008881", "terminal": "1", "notification_url": "https://crm.example/redsys/rs",
                            "url_ok": "https://shop.example/ok", "url_ko": "https://shop.example/ko",
                            "merchant_name": "Tienda Ejemplo"}');
SELECT crmpay.add_account('rs2', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": "999008881", "terminal": "2", "notification_url": "https://crm.example/redsys/rs2",
                            "payment_page_url": "https://crm.example/pay/{order}?ref={order_ref}"}');
SELECT crmpay.add_account('rs-pg', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": "999008882", "terminal": "1", "notification_url": "https://crm.example/redsys/pg",
                            "paygold": true, "paygold_expiry_minutes": "1440"}');
SELECT name, provider, has_webhook_secret FROM crmpay.accounts WHERE provider = 'redsys' ORDER BY name;
-- update_account re-validates the merged account
SELECT crmpay.update_account('rs', NULL, NULL, '{"merchant_code": "1"}');
SELECT crmpay.update_account('rs', '{"merchant_key": "short"}');
SELECT crmpay.update_account('rs', NULL, 'a-webhook-secret');

-- ---------------------------------------------------------------------
-- Links without Paygold: no gateway call; the order number is the
-- payment's gateway_ref (12 digits, fixed for (merchant, account, order_ref))
-- ---------------------------------------------------------------------
SELECT status, url, gateway_ref, amount_minor, currency, gateway_ref ~ '^[0-9]{12}$' AS redsys_order_format
  FROM crmpay.create_payment_link('rs', 'R-1', 14.50, 'eur', 'ana@example.com', 'Dos sombreros, talla M');
SELECT id AS r1_id, gateway_ref FROM crmpay.payments WHERE account = 'rs' AND order_ref = 'R-1' \gset
-- the same order again: same row, same order number
SELECT id = :r1_id AS same_row, gateway_ref = :'gateway_ref' AS same_order_number
  FROM crmpay.create_payment_link('rs', 'R-1', 14.50, 'EUR');
-- the same order_ref on another account of the same merchant: another number
SELECT gateway_ref <> :'gateway_ref' AS distinct_number, url
  FROM crmpay.create_payment_link('rs2', 'R-1', 3, 'EUR');
-- a number another payment of the merchant holds is skipped
BEGIN;
SELECT gateway_ref AS r9_candidate FROM crmpay.create_payment_link('rs', 'R-9', 1, 'EUR') \gset
ROLLBACK;
INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, gateway_ref, idempotency_key)
VALUES ('rs2', 'BLOCKER', 100, 'EUR', 'open', :'r9_candidate', crmpay.idempotency_key('rs2', 'BLOCKER'));
SELECT gateway_ref <> :'r9_candidate' AS skipped_taken_number, gateway_ref ~ '^[0-9]{12}$' AS format_ok
  FROM crmpay.create_payment_link('rs', 'R-9', 1, 'EUR');

-- currencies and amounts: exponents respected, the unsupported refused clearly
SELECT amount_minor, currency FROM crmpay.create_payment_link('rs', 'R-JPY', 500, 'JPY');
SELECT amount_minor, currency FROM crmpay.create_payment_link('rs', 'R-USD', 0.01, 'USD');
SELECT crmpay.create_payment_link('rs', 'R-KWD', 1.234, 'KWD');
SELECT crmpay.create_payment_link('rs', 'R-XOF', 100, 'XOF');
SELECT crmpay.create_payment_link('rs', 'R-BIG', 10000000000, 'EUR');
SELECT amount_minor FROM crmpay.create_payment_link('rs', 'R-MAX', 9999999999.99, 'EUR');
SELECT crmpay.create_payment_link('rs', 'R-JPY2', 1.5, 'JPY');
SELECT count(*) AS refused_orders_written FROM crmpay.payments
 WHERE order_ref IN ('R-KWD', 'R-XOF', 'R-BIG', 'R-JPY2');

-- ---------------------------------------------------------------------
-- The redirect form
-- ---------------------------------------------------------------------
SELECT action, signature_version,
       convert_from(decode(merchant_parameters, 'base64'), 'UTF8') AS parameters
  FROM crmpay.payment_form(:r1_id);
-- the signature checks out with the independent oracle, for the stored order
SELECT f.signature = pg_temp.oracle_sig('sq7HjrUOBfKmC576ILgskD5srU870gJ7', p.gateway_ref,
                                        f.merchant_parameters) AS oracle_agrees,
       f.html LIKE '<form method="post" action="https://sis.redsys.es/sis/realizarPago">%' AS html_form
  FROM crmpay.payments p, crmpay.payment_form(p.id) f WHERE p.id = :r1_id;
SELECT convert_from(decode(merchant_parameters, 'base64'), 'UTF8')::jsonb->>'DS_MERCHANT_AMOUNT' AS jpy_amount,
       convert_from(decode(merchant_parameters, 'base64'), 'UTF8')::jsonb->>'DS_MERCHANT_CURRENCY' AS jpy_currency
  FROM crmpay.payments p, crmpay.payment_form(p.id) WHERE p.order_ref = 'R-JPY';
-- refusals (payment ids, which depend on earlier tests, shown as N)
CREATE FUNCTION pg_temp.form_error(payment_id bigint) RETURNS TABLE (sqlstate text, message text, detail text, hint text)
    LANGUAGE plpgsql AS $$
DECLARE
    v_state text; v_message text; v_detail text; v_hint text;
BEGIN
    PERFORM crmpay.payment_form(payment_id);
    RETURN QUERY SELECT 'no error'::text, NULL::text, NULL::text, NULL::text;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT,
                            v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
    RETURN QUERY SELECT v_state, regexp_replace(v_message, 'payment -?[0-9]+', 'payment N'),
                        nullif(v_detail, ''), nullif(v_hint, '');
END $$;
\x on
SELECT * FROM pg_temp.form_error(NULL);
SELECT * FROM pg_temp.form_error(-1);
SELECT * FROM pg_temp.form_error((SELECT id FROM crmpay.payments WHERE account = 'shop' ORDER BY id LIMIT 1));
\x off
INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, url, gateway_ref, idempotency_key)
VALUES ('rs-pg', 'PG-1', 100, 'EUR', 'open', 'https://sis.redsys.es/sis/p2f?t=AB', '000000000777',
        crmpay.idempotency_key('rs-pg', 'PG-1'));
\x on
SELECT * FROM pg_temp.form_error((SELECT id FROM crmpay.payments WHERE order_ref = 'PG-1'));
\x off

-- ---------------------------------------------------------------------
-- Notifications (signed here with the oracle, like Redsys would)
-- ---------------------------------------------------------------------
CREATE FUNCTION pg_temp.note(params jsonb, merchant_key text DEFAULT 'sq7HjrUOBfKmC576ILgskD5srU870gJ7')
    RETURNS text LANGUAGE sql AS $$
    SELECT 'Ds_SignatureVersion=HMAC_SHA256_V1&Ds_MerchantParameters=' || replace(p, '=', '%3D')
           || '&Ds_Signature=' || replace(pg_temp.oracle_sig(merchant_key, params->>'Ds_Order', p, true), '=', '%3D')
      FROM (SELECT translate(replace(encode(convert_to(params::text, 'UTF8'), 'base64'), E'\n', ''), '+/', '-_') AS p) x $$;
CREATE FUNCTION pg_temp.params(ord text, response text, amount text DEFAULT '1450', type text DEFAULT '0',
                               auth text DEFAULT '123456', hour text DEFAULT '10%3A00') RETURNS jsonb
    LANGUAGE sql AS $$
    SELECT jsonb_build_object('Ds_Date', '01%2F02%2F2026', 'Ds_Hour', hour, 'Ds_Amount', amount,
                              'Ds_Currency', '978', 'Ds_Order', ord, 'Ds_MerchantCode', '999008881',
                              'Ds_Terminal', '001', 'Ds_Response', response, 'Ds_MerchantData', '',
                              'Ds_SecurePayment', '1', 'Ds_TransactionType', type,
                              'Ds_AuthorisationCode', auth) $$;
CREATE FUNCTION pg_temp.deliver(account text, body text)
    RETURNS TABLE (http_status int, reply text, outcome text, event_id text)
    LANGUAGE sql AS $$
    SELECT * FROM crmpay.receive_webhook(account, '{"Content-Type": "application/x-www-form-urlencoded"}', body) $$;

-- denied first (9915: the customer cancelled), then authorised: paid
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'gateway_ref', '9915', auth => '', hour => '09%3A58')));
SELECT status FROM crmpay.payments WHERE id = :r1_id;
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'gateway_ref', '0000')));
SELECT status, gateway_payment_ref, paid_at IS NOT NULL AS has_paid_at FROM crmpay.payments WHERE id = :r1_id;
-- the same notification again (Redsys or a replay): a duplicate
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'gateway_ref', '0000')));
-- a late denial does not move a paid payment back
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'gateway_ref', '0190', auth => '', hour => '10%3A05')));
-- the form is no longer offered
\x on
SELECT * FROM pg_temp.form_error(:r1_id);
\x off
-- refunds (type 3, 0900) come one by one: partial, a replay, another
-- partial (still partially_refunded, but counted once), then the rest
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'gateway_ref', '0900', '450', '3', '111111', '11%3A00')));
SELECT status, refunded_minor FROM crmpay.payments WHERE id = :r1_id;
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'gateway_ref', '0900', '450', '3', '111111', '11%3A00')));
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'gateway_ref', '0900', '300', '3', '222222', '11%3A30')));
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'gateway_ref', '0900', '300', '3', '222222', '11%3A30')));
SELECT status, refunded_minor FROM crmpay.payments WHERE id = :r1_id;
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'gateway_ref', '0900', '700', '3', '333333', '12%3A00')));
SELECT status, refunded_minor FROM crmpay.payments WHERE id = :r1_id;
-- a refund denied by Redsys changes nothing; a refund of an unpaid payment is ignored
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'gateway_ref', '0190', '100', '3', '', '12%3A01')));
SELECT gateway_ref AS open_ref FROM crmpay.payments WHERE order_ref = 'R-9' \gset
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'open_ref', '0900', '100', '3', '444444', '12%3A02')));
SELECT status, refunded_minor FROM crmpay.payments WHERE order_ref = 'R-9';

-- the money must match: another amount or currency is not applied
SELECT gateway_ref AS usd_ref FROM crmpay.payments WHERE order_ref = 'R-USD' \gset
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'usd_ref', '0000', '1')));
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'usd_ref', '0000', '2') || '{"Ds_Currency": "840"}'));
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'usd_ref', '0000', '1') || '{"Ds_Currency": "840"}'));
SELECT status FROM crmpay.payments WHERE order_ref = 'R-USD';
-- JPY: no decimals on the wire either
SELECT gateway_ref AS jpy_ref FROM crmpay.payments WHERE order_ref = 'R-JPY' \gset
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'jpy_ref', '0000', '500') || '{"Ds_Currency": "392"}'));
-- a cancellation (0400) of an open payment
SELECT gateway_ref AS max_ref FROM crmpay.payments WHERE order_ref = 'R-MAX' \gset
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'max_ref', '0400', '999999999999', '9')));
SELECT order_ref, status FROM crmpay.payments WHERE order_ref IN ('R-USD', 'R-JPY', 'R-MAX') ORDER BY order_ref;

-- rejected and ignored deliveries, each recorded with its reason
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params('999999999999', '0000')));
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'usd_ref', '0000'), 'Mk9m98IfEblmPfrpsawt7BmxObt98Jev'));
SELECT * FROM pg_temp.deliver('rs', replace(pg_temp.note(pg_temp.params(:'usd_ref', '0000')), 'Ds_Signature=', 'Ds_Signature=A'));
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'usd_ref', 'OK')));
SELECT * FROM pg_temp.deliver('rs', pg_temp.note(pg_temp.params(:'usd_ref', '0000', '12.5')));
SELECT * FROM pg_temp.deliver('rs', '');
SELECT * FROM pg_temp.deliver('rs', NULL);
-- the same notification for another account of the merchant: not its payment
SELECT * FROM pg_temp.deliver('rs2', pg_temp.note(pg_temp.params(:'usd_ref', '0000', '1') || '{"Ds_Currency": "840"}'));
SELECT outcome, http_status, event_type, reason, old_status, new_status
  FROM crmpay.events WHERE provider = 'redsys' ORDER BY id;
