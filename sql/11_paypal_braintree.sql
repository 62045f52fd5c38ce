-- PayPal and Braintree: account shapes, amounts, signature vectors with a fixed `at`.
\set VERBOSITY default
\set SHOW_CONTEXT never
\pset null '(null)'

-- PayPal account shapes: clear errors, nothing written
SELECT crmpay.add_account('pp', 'paypal', '{"client_id": "AXclient"}', NULL,
                          '{"return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no"}');
SELECT crmpay.add_account('pp', 'paypal', '{"client_id": "AXclient", "client_secret": "ECsecret"}');
SELECT crmpay.add_account('pp', 'paypal', '{"client_id": "AXclient", "client_secret": "ECsecret"}', NULL,
                          '{"return_url": "http://shop.example/ok", "cancel_url": "https://shop.example/no"}');
SELECT crmpay.add_account('pp', 'paypal', '{"client_id": "AXclient", "client_secret": "ECsecret"}', NULL,
                          '{"return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no",
                            "webhook_verification": "sometimes"}');
SELECT crmpay.add_account('pp', 'paypal', '{"client_id": "AXclient", "client_secret": "ECsecret"}', 'WH-ID-NOT-JSON',
                          '{"return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no"}');
SELECT crmpay.add_account('pp', 'paypal', '{"client_id": "AXclient", "client_secret": "ECsecret"}',
                          '{"webhook_id": "X", "cert_pem": "not a pem"}',
                          '{"return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no"}');
SELECT count(*) AS paypal_accounts FROM crmpay.gateway_accounts WHERE provider = 'paypal';
SELECT crmpay.add_account('pp', 'paypal', '{"client_id": "AXclient", "client_secret": "ECsecret"}',
                          '{"webhook_id": "8PT597110X687430LKGECATA"}',
                          '{"return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no",
                            "api_base": "https://127.0.0.1:9"}');
SELECT name, provider, has_webhook_secret FROM crmpay.accounts WHERE name = 'pp';

-- Braintree account shapes
SELECT crmpay.add_account('bt', 'braintree', '{"merchant_id": "m1", "public_key": "integration_public_key"}');
SELECT crmpay.add_account('bt', 'braintree', '{"merchant_id": "m1", "public_key": "a|b", "private_key": "k"}');
SELECT crmpay.add_account('bt', 'braintree',
                          '{"merchant_id": "m1", "public_key": "integration_public_key", "private_key": "integration_private_key"}',
                          '{"public_key": "integration_public_key"}');
SELECT crmpay.add_account('bt', 'braintree',
                          '{"merchant_id": "m1", "public_key": "integration_public_key", "private_key": "integration_private_key"}',
                          '{"public_key": "integration_public_key", "private_key": "integration_private_key"}');

-- PayPal amounts: currencies it refuses, decimals it refuses (checked before any gateway call)
SELECT crmpay.create_payment_link('pp', 'kwd-1', 1.234, 'KWD');
SELECT crmpay.create_payment_link('pp', 'huf-1', 1500.50, 'HUF');
SELECT crmpay.create_payment_link('pp', 'twd-1', 10.01, 'TWD');
SELECT crmpay.create_payment_link('pp', 'jpy-1', 500.5, 'JPY');
SELECT count(*) AS payments_after_refusals FROM crmpay.payments WHERE account = 'pp';
-- Braintree has no link API
SELECT crmpay.create_payment_link('bt', 'bt-1', 10, 'EUR');

-- the C side's ISO 4217 exponents agree with crmpay.currencies
SELECT code, exponent, crmpay._currency_exponent(code) FROM crmpay.currencies
 WHERE exponent <> crmpay._currency_exponent(code);

-- capture_payment: clear refusals
SELECT crmpay.capture_payment(NULL);
SELECT crmpay.capture_payment(424242);

-- B1: Braintree's official challenge vector (braintree_python test_webhooks.py)
SELECT crmpay.braintree_challenge('bt', '20f9f8ed05f77439fe955c977e4c8a53');
SELECT crmpay.braintree_challenge('bt', 'NOT-HEX');
SELECT crmpay.braintree_challenge('bt', '20f9f8ed05');
SELECT crmpay.braintree_challenge('pp', '20f9f8ed05f77439fe955c977e4c8a53');

-- test vectors, made once (tests/doubles: braintree_double.py; a pinned self-signed
-- RSA certificate for messageverificationcerts.paypal.com, 2020..2040)
CREATE TEMP TABLE vec (name text PRIMARY KEY, val text NOT NULL);
CREATE FUNCTION pg_temp.v(text) RETURNS text LANGUAGE sql STABLE AS $$ SELECT val FROM vec WHERE name = $1 $$;
\set ECHO none
INSERT INTO vec VALUES
  ('v1', 'bt_signature=integration_public_key%7Cc93ea7d3500209c203891f3b1c631223cd8ef87a&bt_payload=PD94bWwgdmVyc2lvbj0iMS4wIiBlbmNvZGluZz0iVVRGLTgiPz4KPG5vdGlm%0AaWNhdGlvbj4KICA8dGltZXN0YW1wIHR5cGU9ImRhdGV0aW1lIj4yMDI0LTA1%0ALTAxVDEwOjAwOjAwWjwvdGltZXN0YW1wPgogIDxraW5kPnRyYW5zYWN0aW9u%0AX3NldHRsZWQ8L2tpbmQ%2BCiAgPHN1YmplY3Q%2BPHRyYW5zYWN0aW9uPgogIDxp%0AZD50eG4tcmVncmVzcy0xPC9pZD4KICA8c3RhdHVzPnNldHRsZWQ8L3N0YXR1%0Acz4KICA8dHlwZT5zYWxlPC90eXBlPgogIDxjdXJyZW5jeS1pc28tY29kZT5F%0AVVI8L2N1cnJlbmN5LWlzby1jb2RlPgogIDxhbW91bnQ%2BMTkuOTk8L2Ftb3Vu%0AdD4KICA8b3JkZXItaWQ%2BYnQtb3JkZXItMTwvb3JkZXItaWQ%2BCiAgPG1lcmNo%0AYW50LWFjY291bnQtaWQ%2BY3JtcGF5dGVzdDwvbWVyY2hhbnQtYWNjb3VudC1p%0AZD4KICA8cGF5bWVudC1pbnN0cnVtZW50LXR5cGU%2BY3JlZGl0X2NhcmQ8L3Bh%0AeW1lbnQtaW5zdHJ1bWVudC10eXBlPgo8L3RyYW5zYWN0aW9uPjwvc3ViamVj%0AdD4KPC9ub3RpZmljYXRpb24%2BCg%3D%3D%0A'),
  ('v2', 'bt_signature=old_public_key%7Ca8b1207cd8fe29567446536279a814a602fe5f6e%26integration_public_key%7Cc93ea7d3500209c203891f3b1c631223cd8ef87a&bt_payload=PD94bWwgdmVyc2lvbj0iMS4wIiBlbmNvZGluZz0iVVRGLTgiPz4KPG5vdGlm%0AaWNhdGlvbj4KICA8dGltZXN0YW1wIHR5cGU9ImRhdGV0aW1lIj4yMDI0LTA1%0ALTAxVDEwOjAwOjAwWjwvdGltZXN0YW1wPgogIDxraW5kPnRyYW5zYWN0aW9u%0AX3NldHRsZWQ8L2tpbmQ%2BCiAgPHN1YmplY3Q%2BPHRyYW5zYWN0aW9uPgogIDxp%0AZD50eG4tcmVncmVzcy0xPC9pZD4KICA8c3RhdHVzPnNldHRsZWQ8L3N0YXR1%0Acz4KICA8dHlwZT5zYWxlPC90eXBlPgogIDxjdXJyZW5jeS1pc28tY29kZT5F%0AVVI8L2N1cnJlbmN5LWlzby1jb2RlPgogIDxhbW91bnQ%2BMTkuOTk8L2Ftb3Vu%0AdD4KICA8b3JkZXItaWQ%2BYnQtb3JkZXItMTwvb3JkZXItaWQ%2BCiAgPG1lcmNo%0AYW50LWFjY291bnQtaWQ%2BY3JtcGF5dGVzdDwvbWVyY2hhbnQtYWNjb3VudC1p%0AZD4KICA8cGF5bWVudC1pbnN0cnVtZW50LXR5cGU%2BY3JlZGl0X2NhcmQ8L3Bh%0AeW1lbnQtaW5zdHJ1bWVudC10eXBlPgo8L3RyYW5zYWN0aW9uPjwvc3ViamVj%0AdD4KPC9ub3RpZmljYXRpb24%2BCg%3D%3D%0A'),
  ('v3', 'bt_signature=integration_public_key%7Cc93ea7d3500209c203891f3b1c631223cd8ef87a&bt_payload=PD94bWwgdmVyc2lvbj0iMS4wIiBlbmNvZGluZz0iVVRGLTgiPz4KPG5vdGlm%0AaWNhdGlvbj4KICA8dGltZXN0YW1wIHR5cGU9ImRhdGV0aW1lIj4yMDI0LTA1%0ALTAxVDEwOjAwOjAwWjwvdGltZXN0YW1wPgogIDxraW5kPnRyYW5zYWN0aW9u%0AX3NldHRsZWQ8L2tpbmQ%2BCiAgPHN1YmplY3Q%2BPHRyYW5zYWN0aW9uPgogIDxp%0AZD50eG4tcmVncmVzcy0xPC9pZD4KICA8c3RhdHVzPnNldHRsZWQ8L3N0YXR1%0Acz4KICA8dHlwZT5zYWxlPC90eXBlPgogIDxjdXJyZW5jeS1pc28tY29kZT5F%0AVVI8L2N1cnJlbmN5LWlzby1jb2RlPgogIDxhbW91bnQ%2BMTkuOTk8L2Ftb3Vu%0AdD4KICA8b3JkZXItaWQ%2BYnQtb3JkZXItMTwvb3JkZXItaWQ%2BCiAgPG1lcmNo%0AYW50LWFjY291bnQtaWQ%2BY3JtcGF5dGVzdDwvbWVyY2hhbnQtYWNjb3VudC1p%0AZD4KICA8cGF5bWVudC1pbnN0cnVtZW50LXR5cGU%2BY3JlZGl0X2NhcmQ8L3Bh%0AeW1lbnQtaW5zdHJ1bWVudC10eXBlPgo8L3RyYW5zYWN0aW9uPjwvc3ViamVj%0AdD4KPC9ub3RpZmljYXRpb24%2BCg%3D%3D'),
  ('v4', 'bt_signature=other_public_key%7C47376738e69ad21fe9cb112aebcbb4317f1a038d&bt_payload=PD94bWwgdmVyc2lvbj0iMS4wIiBlbmNvZGluZz0iVVRGLTgiPz4KPG5vdGlm%0AaWNhdGlvbj4KICA8dGltZXN0YW1wIHR5cGU9ImRhdGV0aW1lIj4yMDI0LTA1%0ALTAxVDEwOjAwOjAwWjwvdGltZXN0YW1wPgogIDxraW5kPnRyYW5zYWN0aW9u%0AX3NldHRsZWQ8L2tpbmQ%2BCiAgPHN1YmplY3Q%2BPHRyYW5zYWN0aW9uPgogIDxp%0AZD50eG4tcmVncmVzcy0xPC9pZD4KICA8c3RhdHVzPnNldHRsZWQ8L3N0YXR1%0Acz4KICA8dHlwZT5zYWxlPC90eXBlPgogIDxjdXJyZW5jeS1pc28tY29kZT5F%0AVVI8L2N1cnJlbmN5LWlzby1jb2RlPgogIDxhbW91bnQ%2BMTkuOTk8L2Ftb3Vu%0AdD4KICA8b3JkZXItaWQ%2BYnQtb3JkZXItMTwvb3JkZXItaWQ%2BCiAgPG1lcmNo%0AYW50LWFjY291bnQtaWQ%2BY3JtcGF5dGVzdDwvbWVyY2hhbnQtYWNjb3VudC1p%0AZD4KICA8cGF5bWVudC1pbnN0cnVtZW50LXR5cGU%2BY3JlZGl0X2NhcmQ8L3Bh%0AeW1lbnQtaW5zdHJ1bWVudC10eXBlPgo8L3RyYW5zYWN0aW9uPjwvc3ViamVj%0AdD4KPC9ub3RpZmljYXRpb24%2BCg%3D%3D%0A'),
  ('v5', 'bt_signature=integration_public_key%7Cc93ea7d3500209c203891f3b1c631223cd8ef87a&bt_payload=QD94bWwgdmVyc2lvbj0iMS4wIiBlbmNvZGluZz0iVVRGLTgiPz4KPG5vdGlm%0AaWNhdGlvbj4KICA8dGltZXN0YW1wIHR5cGU9ImRhdGV0aW1lIj4yMDI0LTA1%0ALTAxVDEwOjAwOjAwWjwvdGltZXN0YW1wPgogIDxraW5kPnRyYW5zYWN0aW9u%0AX3NldHRsZWQ8L2tpbmQ%2BCiAgPHN1YmplY3Q%2BPHRyYW5zYWN0aW9uPgogIDxp%0AZD50eG4tcmVncmVzcy0xPC9pZD4KICA8c3RhdHVzPnNldHRsZWQ8L3N0YXR1%0Acz4KICA8dHlwZT5zYWxlPC90eXBlPgogIDxjdXJyZW5jeS1pc28tY29kZT5F%0AVVI8L2N1cnJlbmN5LWlzby1jb2RlPgogIDxhbW91bnQ%2BMTkuOTk8L2Ftb3Vu%0AdD4KICA8b3JkZXItaWQ%2BYnQtb3JkZXItMTwvb3JkZXItaWQ%2BCiAgPG1lcmNo%0AYW50LWFjY291bnQtaWQ%2BY3JtcGF5dGVzdDwvbWVyY2hhbnQtYWNjb3VudC1p%0AZD4KICA8cGF5bWVudC1pbnN0cnVtZW50LXR5cGU%2BY3JlZGl0X2NhcmQ8L3Bh%0AeW1lbnQtaW5zdHJ1bWVudC10eXBlPgo8L3RyYW5zYWN0aW9uPjwvc3ViamVj%0AdD4KPC9ub3RpZmljYXRpb24%2BCg%3D%3D%0A'),
  ('v6', '{"webhook_id": "8PT597110X687430LKGECATA", "cert_pem": "-----BEGIN CERTIFICATE-----\nMIIDGjCCAgKgAwIBAgIUPgELydeEF7QONB9gRV6q4RMBP/cwDQYJKoZIhvcNAQEL\nBQAwRzEXMBUGA1UECgwOY3JtcGF5IHJlZ3Jlc3MxLDAqBgNVBAMMI21lc3NhZ2V2\nZXJpZmljYXRpb25jZXJ0cy5wYXlwYWwuY29tMB4XDTIwMDEwMTAwMDAwMFoXDTQw\nMDEwMTAwMDAwMFowRzEXMBUGA1UECgwOY3JtcGF5IHJlZ3Jlc3MxLDAqBgNVBAMM\nI21lc3NhZ2V2ZXJpZmljYXRpb25jZXJ0cy5wYXlwYWwuY29tMIIBIjANBgkqhkiG\n9w0BAQEFAAOCAQ8AMIIBCgKCAQEAxJkTG/4aHIIUmAQdKSw6wr8+UOKsrLWXSe1g\nPD22AO9Rr5vLe0MU+zgTKHhC+8omaEEC4qA9fqQnXZKU5GcvJkwbIquaO/9GoCoW\nKw9Y8xNxgWnDFt88gYBb8HD+hDAswh07Xy2ne1Ck8/IY8gBDRo59QwWJHYSOUohn\nhBrds9hbtAlTl46jBqeIlheiDDI4wT0Uh7P2cEWuEhDAn7dOHoFg9QM3mgW5MYOy\n9wC60JomxRGnvZdku0uE+snv7Hdg0a/okuJ1QRJyxBhjtx9+ovqbfmDiLeylOIJb\nrwPSMBBtAbpBXnL6sW3xxC0sYR7t+pC2fEHakSqJOPRk4WrqCQIDAQABMA0GCSqG\nSIb3DQEBCwUAA4IBAQAmAjt5AL4CHnKOKei9ZSw5Zuk/IyVkjOH2LOQclbXVVPUN\nMszWsvb/edh573JG2EDg7FNFdmLKUmTemyUfx5IFoQktXsOan00YkqdmRYQiQALx\n4jEZTR8wE5cKFW6URsZH5lg2Xvc7+o0VMktGPGKPTXy9Tbzu74qSAgPTtvBd4o6J\np0BSAjbqS8mzdacD7nOcjHcGY+j1ffc3zb4mawW2SBGnWXDP+McKSzYFzM2Wt1l5\n99W1eNBAW3oDaC9JiPYfWJjmsZ189WrSb0YNgohF7ORFbmk88Ky1R1FUKRlRA0D3\n6dpb3Y89ZhZ0YXSXmi+ZX2Ec3CkEDyn4q8PVGyNJ\n-----END CERTIFICATE-----\n"}'),
  ('v7', '{"PAYPAL-TRANSMISSION-ID": "b2384410-f8d2-11ee-8e40-b5ae8a4ab7a3", "PAYPAL-TRANSMISSION-TIME": "2024-05-01T10:00:05Z", "PAYPAL-TRANSMISSION-SIG": "EI3RrTCndGuk7a6m2j4yyl70s258ugKNO8lmrxrjyFK2qRX18XSsPaF8/QV8dvKP/uc782b2F7qs1Vw1suoMvKL8btbiksYdzvTxmu+beA5TMgn5/uWWMgB+TOejSYBYldCSeoh/starHukmalGjlWBMvq6QLO7gRoluT3RzxMkZkHTHj6k04sZWwzaCS2x0l6u37csSldesvNTs/XRkuayS3Qd/RnYdlUJ4t9gzUi4wgsd7an2B7ZcL323bZ5t+YAG3uAM7GWeSzqwnTttE02EOZR1anAiMn7LqpeOnuxsehTjUeMaXu+QvbtFhRnZxCP8J8c2aDW2jYZlahFIxkw==", "PAYPAL-AUTH-ALGO": "SHA256withRSA"}'),
  ('v8', '{"id":"WH-REGRESS-0001","event_version":"1.0","create_time":"2024-05-01T10:00:00Z","resource_type":"checkout-order","event_type":"CHECKOUT.ORDER.APPROVED","summary":"An order has been approved by buyer","resource":{"id":"5O190127TN364715T","status":"APPROVED","intent":"CAPTURE","purchase_units":[{"reference_id":"order-1","custom_id":"order-1","amount":{"currency_code":"EUR","value":"19.99"}}]}}'),
  ('v9', '{"id":"WH-REGRESS-0001","event_version":"1.0","create_time":"2024-05-01T10:00:00Z","resource_type":"checkout-order","event_type":"CHECKOUT.ORDER.APPROVED","summary":"An order has been approved by buyer","resource":{"id":"5O190127TN364715T","status":"APPROVED","intent":"CAPTURE","purchase_units":[{"reference_id":"order-1","custom_id":"order-1","amount":{"currency_code":"EUR","value":"1.99"}}]}}'),
  ('v10', '{"webhook_id": "WRONGWEBHOOKID", "cert_pem": "-----BEGIN CERTIFICATE-----\nMIIDGjCCAgKgAwIBAgIUPgELydeEF7QONB9gRV6q4RMBP/cwDQYJKoZIhvcNAQEL\nBQAwRzEXMBUGA1UECgwOY3JtcGF5IHJlZ3Jlc3MxLDAqBgNVBAMMI21lc3NhZ2V2\nZXJpZmljYXRpb25jZXJ0cy5wYXlwYWwuY29tMB4XDTIwMDEwMTAwMDAwMFoXDTQw\nMDEwMTAwMDAwMFowRzEXMBUGA1UECgwOY3JtcGF5IHJlZ3Jlc3MxLDAqBgNVBAMM\nI21lc3NhZ2V2ZXJpZmljYXRpb25jZXJ0cy5wYXlwYWwuY29tMIIBIjANBgkqhkiG\n9w0BAQEFAAOCAQ8AMIIBCgKCAQEAxJkTG/4aHIIUmAQdKSw6wr8+UOKsrLWXSe1g\nPD22AO9Rr5vLe0MU+zgTKHhC+8omaEEC4qA9fqQnXZKU5GcvJkwbIquaO/9GoCoW\nKw9Y8xNxgWnDFt88gYBb8HD+hDAswh07Xy2ne1Ck8/IY8gBDRo59QwWJHYSOUohn\nhBrds9hbtAlTl46jBqeIlheiDDI4wT0Uh7P2cEWuEhDAn7dOHoFg9QM3mgW5MYOy\n9wC60JomxRGnvZdku0uE+snv7Hdg0a/okuJ1QRJyxBhjtx9+ovqbfmDiLeylOIJb\nrwPSMBBtAbpBXnL6sW3xxC0sYR7t+pC2fEHakSqJOPRk4WrqCQIDAQABMA0GCSqG\nSIb3DQEBCwUAA4IBAQAmAjt5AL4CHnKOKei9ZSw5Zuk/IyVkjOH2LOQclbXVVPUN\nMszWsvb/edh573JG2EDg7FNFdmLKUmTemyUfx5IFoQktXsOan00YkqdmRYQiQALx\n4jEZTR8wE5cKFW6URsZH5lg2Xvc7+o0VMktGPGKPTXy9Tbzu74qSAgPTtvBd4o6J\np0BSAjbqS8mzdacD7nOcjHcGY+j1ffc3zb4mawW2SBGnWXDP+McKSzYFzM2Wt1l5\n99W1eNBAW3oDaC9JiPYfWJjmsZ189WrSb0YNgohF7ORFbmk88Ky1R1FUKRlRA0D3\n6dpb3Y89ZhZ0YXSXmi+ZX2Ec3CkEDyn4q8PVGyNJ\n-----END CERTIFICATE-----\n"}'),
  ('v11', '{"PAYPAL-TRANSMISSION-ID": "b2384410-f8d2-11ee-8e40-b5ae8a4ab7a4", "PAYPAL-TRANSMISSION-TIME": "2024-05-01T10:00:05Z", "PAYPAL-TRANSMISSION-SIG": "EI3RrTCndGuk7a6m2j4yyl70s258ugKNO8lmrxrjyFK2qRX18XSsPaF8/QV8dvKP/uc782b2F7qs1Vw1suoMvKL8btbiksYdzvTxmu+beA5TMgn5/uWWMgB+TOejSYBYldCSeoh/starHukmalGjlWBMvq6QLO7gRoluT3RzxMkZkHTHj6k04sZWwzaCS2x0l6u37csSldesvNTs/XRkuayS3Qd/RnYdlUJ4t9gzUi4wgsd7an2B7ZcL323bZ5t+YAG3uAM7GWeSzqwnTttE02EOZR1anAiMn7LqpeOnuxsehTjUeMaXu+QvbtFhRnZxCP8J8c2aDW2jYZlahFIxkw==", "PAYPAL-AUTH-ALGO": "SHA256withRSA"}'),
  ('v12', '{"webhook_id": "8PT597110X687430LKGECATA", "cert_pem": "-----BEGIN CERTIFICATE-----\nMIIDNDCCAhygAwIBAgIUCV+pYnmHFeYnSyMJk7RMHJSogJMwDQYJKoZIhvcNAQEL\nBQAwVDEXMBUGA1UECgwOY3JtcGF5IHJlZ3Jlc3MxOTA3BgNVBAMMMG1lc3NhZ2V2\nZXJpZmljYXRpb25jZXJ0cy5wYXlwYWwuY29tLmV2aWwuZXhhbXBsZTAeFw0yMDAx\nMDEwMDAwMDBaFw00MDAxMDEwMDAwMDBaMFQxFzAVBgNVBAoMDmNybXBheSByZWdy\nZXNzMTkwNwYDVQQDDDBtZXNzYWdldmVyaWZpY2F0aW9uY2VydHMucGF5cGFsLmNv\nbS5ldmlsLmV4YW1wbGUwggEiMA0GCSqGSIb3DQEBAQUAA4IBDwAwggEKAoIBAQDb\n0CxsmiyHVtJbv2J04H3yNz5l/dQzseq59TdBm/sIuDlJDQfv06j9z9BKp3D4Qt6J\nCtkDlfhNMJNujmqMcRRaFzA1b5oi3Rs4gMW02b8+3ZnmPJoLaGYE1XMY80dldrGR\nQhGbyKRuujdGLw+8W6lh/C4JOyLjtTpYrpPZsa5lr81+tDVldKdHa4Zk/o/s9/dN\nQqOAO76PDSAhVQI5VolJydSNEqgnNjLYninz4wc20Xr1yxEEc2Cui8bC/jpuHerh\nfapY9PCdARX90nWFXCnr683Q32KNWhxbtrpqPXYMVN8ntvvMwCYyY7ZszL+LYtJi\n59cbOy1OTNWu5+gJ881LAgMBAAEwDQYJKoZIhvcNAQELBQADggEBAA06g54HuDH/\nWqcIg6NrLsSrvOd9pq1pa4VJ+zMUvAhPAWL3jPlQtSeCufqS6UkA6dPCJpo3vpCI\nyu4dQ4fkLHSv50z1c2KWA1LwocVd6E4O2tI2dkcJVnsYeKwYB8xMN2tZYDzagE9h\nks3v006negabcddT5VegAs1k16PwRaBffEBMVcCxKf4W0Ffh/JAcrRPOfPGyqESw\nfkqh63taM2y6fjT+mGrpRjTj+jndx/wNZqwCmR3TGf9r7VrZ6TsOvb4A1daeh4fo\n9nc0Pir8WR0kn4yE+jMN6yCf2EBAhaW/T4ChEiezyT+7+55+cd++X2UfhHi+oShS\nCgUWutOUlH8=\n-----END CERTIFICATE-----\n"}'),
  ('v13', '{"PAYPAL-TRANSMISSION-ID": "b2384410-f8d2-11ee-8e40-b5ae8a4ab7a3", "PAYPAL-TRANSMISSION-TIME": "2024-05-01T10:00:05Z", "PAYPAL-TRANSMISSION-SIG": "I3Z/Y0tvePtcPH6/J660MfRXLkjVn8et5ntnlkQLMsACS+R+dEns1fSHJSx3aFegAkvjrOem3A033+e0OkqGRdTE74nbtS7y9F6hrhAvLRlUtEvu4ytf9KL3BxBGX/R7XoiIjJMZoRaenH/wCv7HVcMK6gvFn3zStEWWhFx6CA/iMYKCbveBUAgVoYSkJfZtziuNq+EhFb8YMmxmvGsaPAR3ZsqNYU6IIIi9CFwJtxMyIPpYR2O5ouKs79ejxARwG533DX8bvoBK5LdKL1H+kDCzS1rdt8zcqXCXFofZyIUNm4IrsZwKY9Wm2U5tNlunhocV1L+TdO+eoWMxaJj5zQ==", "PAYPAL-AUTH-ALGO": "SHA256withRSA"}'),
  ('v14', '{"PAYPAL-TRANSMISSION-ID": "b2384410-f8d2-11ee-8e40-b5ae8a4ab7a3", "PAYPAL-TRANSMISSION-TIME": "2024-05-01T10:00:05Z", "PAYPAL-TRANSMISSION-SIG": "EI3RrTCndGuk7a6m2j4yyl70s258ugKNO8lmrxrjyFK2qRX18XSsPaF8/QV8dvKP/uc782b2F7qs1Vw1suoMvKL8btbiksYdzvTxmu+beA5TMgn5/uWWMgB+TOejSYBYldCSeoh/starHukmalGjlWBMvq6QLO7gRoluT3RzxMkZkHTHj6k04sZWwzaCS2x0l6u37csSldesvNTs/XRkuayS3Qd/RnYdlUJ4t9gzUi4wgsd7an2B7ZcL323bZ5t+YAG3uAM7GWeSzqwnTttE02EOZR1anAiMn7LqpeOnuxsehTjUeMaXu+QvbtFhRnZxCP8J8c2aDW2jYZlahFIxkw==", "PAYPAL-AUTH-ALGO": "SHA1withRSA"}'),
  ('v15', '{"PAYPAL-TRANSMISSION-ID": "b2384410-f8d2-11ee-8e40-b5ae8a4ab7a3", "PAYPAL-TRANSMISSION-TIME": "2024-05-01T10:00:05Z", "PAYPAL-TRANSMISSION-SIG": "%%%notbase64", "PAYPAL-AUTH-ALGO": "SHA256withRSA"}'),
  ('v16', '{"PAYPAL-TRANSMISSION-ID": "b2384410-f8d2-11ee-8e40-b5ae8a4ab7a3", "PAYPAL-TRANSMISSION-TIME": "yesterday", "PAYPAL-TRANSMISSION-SIG": "EI3RrTCndGuk7a6m2j4yyl70s258ugKNO8lmrxrjyFK2qRX18XSsPaF8/QV8dvKP/uc782b2F7qs1Vw1suoMvKL8btbiksYdzvTxmu+beA5TMgn5/uWWMgB+TOejSYBYldCSeoh/starHukmalGjlWBMvq6QLO7gRoluT3RzxMkZkHTHj6k04sZWwzaCS2x0l6u37csSldesvNTs/XRkuayS3Qd/RnYdlUJ4t9gzUi4wgsd7an2B7ZcL323bZ5t+YAG3uAM7GWeSzqwnTttE02EOZR1anAiMn7LqpeOnuxsehTjUeMaXu+QvbtFhRnZxCP8J8c2aDW2jYZlahFIxkw==", "PAYPAL-AUTH-ALGO": "SHA256withRSA"}'),
  ('v17', '{"PAYPAL-TRANSMISSION-ID": "b2384410-f8d2-11ee-8e40-b5ae8a4ab7a3", "PAYPAL-TRANSMISSION-TIME": "2024-05-01T10:00:05Z", "PAYPAL-TRANSMISSION-SIG": "EI3RrTCndGuk7a6m2j4yyl70s258ugKNO8lmrxrjyFK2qRX18XSsPaF8/QV8dvKP/uc782b2F7qs1Vw1suoMvKL8btbiksYdzvTxmu+beA5TMgn5/uWWMgB+TOejSYBYldCSeoh/starHukmalGjlWBMvq6QLO7gRoluT3RzxMkZkHTHj6k04sZWwzaCS2x0l6u37csSldesvNTs/XRkuayS3Qd/RnYdlUJ4t9gzUi4wgsd7an2B7ZcL323bZ5t+YAG3uAM7GWeSzqwnTttE02EOZR1anAiMn7LqpeOnuxsehTjUeMaXu+QvbtFhRnZxCP8J8c2aDW2jYZlahFIxkw==", "PAYPAL-AUTH-ALGO": "SHA256withRSA", "PAYPAL-CERT-URL": "https://evil.example/cert.pem"}'),
  ('v18', '{"PAYPAL-TRANSMISSION-ID": "b2384410-f8d2-11ee-8e40-b5ae8a4ab7a3", "PAYPAL-TRANSMISSION-TIME": "2024-05-01T10:00:05Z", "PAYPAL-TRANSMISSION-SIG": "EI3RrTCndGuk7a6m2j4yyl70s258ugKNO8lmrxrjyFK2qRX18XSsPaF8/QV8dvKP/uc782b2F7qs1Vw1suoMvKL8btbiksYdzvTxmu+beA5TMgn5/uWWMgB+TOejSYBYldCSeoh/starHukmalGjlWBMvq6QLO7gRoluT3RzxMkZkHTHj6k04sZWwzaCS2x0l6u37csSldesvNTs/XRkuayS3Qd/RnYdlUJ4t9gzUi4wgsd7an2B7ZcL323bZ5t+YAG3uAM7GWeSzqwnTttE02EOZR1anAiMn7LqpeOnuxsehTjUeMaXu+QvbtFhRnZxCP8J8c2aDW2jYZlahFIxkw==", "PAYPAL-AUTH-ALGO": "SHA256withRSA", "PAYPAL-CERT-URL": "http://api.paypal.com/cert.pem"}'),
  ('v19', '{"PAYPAL-TRANSMISSION-ID": "b2384410-f8d2-11ee-8e40-b5ae8a4ab7a3", "PAYPAL-TRANSMISSION-TIME": "2024-05-01T10:00:05Z", "PAYPAL-TRANSMISSION-SIG": "EI3RrTCndGuk7a6m2j4yyl70s258ugKNO8lmrxrjyFK2qRX18XSsPaF8/QV8dvKP/uc782b2F7qs1Vw1suoMvKL8btbiksYdzvTxmu+beA5TMgn5/uWWMgB+TOejSYBYldCSeoh/starHukmalGjlWBMvq6QLO7gRoluT3RzxMkZkHTHj6k04sZWwzaCS2x0l6u37csSldesvNTs/XRkuayS3Qd/RnYdlUJ4t9gzUi4wgsd7an2B7ZcL323bZ5t+YAG3uAM7GWeSzqwnTttE02EOZR1anAiMn7LqpeOnuxsehTjUeMaXu+QvbtFhRnZxCP8J8c2aDW2jYZlahFIxkw==", "PAYPAL-AUTH-ALGO": "SHA256withRSA", "PAYPAL-CERT-URL": "https://api.paypal.com.evil.example/c"}'),
  ('v20', '{"PAYPAL-TRANSMISSION-ID": "b2384410-f8d2-11ee-8e40-b5ae8a4ab7a3", "PAYPAL-TRANSMISSION-TIME": "2024-05-01T10:00:05Z", "PAYPAL-TRANSMISSION-SIG": "EI3RrTCndGuk7a6m2j4yyl70s258ugKNO8lmrxrjyFK2qRX18XSsPaF8/QV8dvKP/uc782b2F7qs1Vw1suoMvKL8btbiksYdzvTxmu+beA5TMgn5/uWWMgB+TOejSYBYldCSeoh/starHukmalGjlWBMvq6QLO7gRoluT3RzxMkZkHTHj6k04sZWwzaCS2x0l6u37csSldesvNTs/XRkuayS3Qd/RnYdlUJ4t9gzUi4wgsd7an2B7ZcL323bZ5t+YAG3uAM7GWeSzqwnTttE02EOZR1anAiMn7LqpeOnuxsehTjUeMaXu+QvbtFhRnZxCP8J8c2aDW2jYZlahFIxkw==", "PAYPAL-AUTH-ALGO": "SHA256withRSA", "PAYPAL-CERT-URL": "https://user@api.paypal.com/c"}');
\set ECHO all

-- Braintree signatures: valid; two pairs (rotation); payload without its final newline
-- (the SDK accepts payload + "\n"); another key; tampered payload; missing fields
SELECT crmpay.verify_signature('braintree', '{"public_key": "integration_public_key", "private_key": "integration_private_key"}', '{}', pg_temp.v('v1')) AS bt_valid,
       crmpay.verify_signature('braintree', '{"public_key": "integration_public_key", "private_key": "integration_private_key"}', '{}', pg_temp.v('v2')) AS bt_two_pairs,
       crmpay.verify_signature('braintree', '{"public_key": "integration_public_key", "private_key": "integration_private_key"}', '{}', pg_temp.v('v3')) AS bt_newline_variant,
       crmpay.verify_signature('braintree', '{"public_key": "integration_public_key", "private_key": "integration_private_key"}', '{}', pg_temp.v('v4')) AS bt_other_key,
       crmpay.verify_signature('braintree', '{"public_key": "integration_public_key", "private_key": "integration_private_key"}', '{}', pg_temp.v('v5')) AS bt_tampered,
       crmpay.verify_signature('braintree', '{"public_key": "integration_public_key", "private_key": "integration_private_key"}', '{}', 'bt_payload=abc') AS bt_no_signature,
       crmpay.verify_signature('braintree', '{"public_key": "x"}', '{}', pg_temp.v('v1')) AS bt_bad_secret;

-- PayPal: the pinned-certificate vector (RSA-SHA256 over id|time|webhook_id|crc32)
SELECT crmpay.verify_signature('paypal', pg_temp.v('v6'), pg_temp.v('v7')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_valid;
SELECT crmpay.verify_signature('paypal', pg_temp.v('v6'), pg_temp.v('v7')::jsonb, pg_temp.v('v9'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_tampered,
       crmpay.verify_signature('paypal', pg_temp.v('v10'), pg_temp.v('v7')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_other_webhook_id,
       crmpay.verify_signature('paypal', pg_temp.v('v6'), pg_temp.v('v11')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_other_transmission,
       crmpay.verify_signature('paypal', pg_temp.v('v6'), pg_temp.v('v7')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:10:00+00') AS pp_too_late,
       crmpay.verify_signature('paypal', pg_temp.v('v6'), pg_temp.v('v7')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 09:50:00+00') AS pp_too_early,
       crmpay.verify_signature('paypal', pg_temp.v('v6'), pg_temp.v('v7')::jsonb, pg_temp.v('v8'), NULL, '2024-06-01 10:00:00+00') AS pp_no_tolerance,
       crmpay.verify_signature('paypal', pg_temp.v('v6'), pg_temp.v('v7')::jsonb, pg_temp.v('v8'), NULL, '2041-01-01 00:00:00+00') AS pp_cert_expired,
       crmpay.verify_signature('paypal', pg_temp.v('v12'), pg_temp.v('v13')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_not_paypal_cert,
       crmpay.verify_signature('paypal', pg_temp.v('v6'), pg_temp.v('v14')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_sha1,
       crmpay.verify_signature('paypal', pg_temp.v('v6'), pg_temp.v('v15')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_bad_base64,
       crmpay.verify_signature('paypal', pg_temp.v('v6'), pg_temp.v('v16')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_bad_time,
       crmpay.verify_signature('paypal', pg_temp.v('v6'), '{}', pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_no_headers,
       crmpay.verify_signature('paypal', '{"cert_pem": "x"}', pg_temp.v('v7')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_bad_secret;
-- without a pinned certificate, only PayPal hosts may serve it
SELECT crmpay.verify_signature('paypal', '{"webhook_id": "8PT597110X687430LKGECATA"}', pg_temp.v('v17')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_foreign_cert_host,
       crmpay.verify_signature('paypal', '{"webhook_id": "8PT597110X687430LKGECATA"}', pg_temp.v('v18')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_plain_http_cert,
       crmpay.verify_signature('paypal', '{"webhook_id": "8PT597110X687430LKGECATA"}', pg_temp.v('v19')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_lookalike_host,
       crmpay.verify_signature('paypal', '{"webhook_id": "8PT597110X687430LKGECATA"}', pg_temp.v('v20')::jsonb, pg_temp.v('v8'), '5 minutes', '2024-05-01 10:01:00+00') AS pp_userinfo;

-- the intake parses what it verified: a Braintree settlement for a payment it knows
INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, gateway_payment_ref, idempotency_key)
VALUES ('bt', 'bt-order-1', 1999, 'EUR', 'open', 'txn-regress-1', crmpay.idempotency_key('bt', 'bt-order-1'));
SELECT http_status, outcome, event_id FROM crmpay.receive_webhook('bt', '{}', pg_temp.v('v1'));
SELECT http_status, outcome, event_id FROM crmpay.receive_webhook('bt', '{}', pg_temp.v('v1'));
SELECT http_status, reply, outcome FROM crmpay.receive_webhook('bt', '{}', pg_temp.v('v4'));
SELECT order_ref, status, gateway_payment_ref FROM crmpay.payments WHERE account = 'bt';
SELECT event_key, event_type, outcome, reason, old_status, new_status FROM crmpay.events WHERE account = 'bt' ORDER BY id;
