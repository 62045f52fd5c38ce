-- Accounts: validation, encryption at rest, the secret-free view.
CREATE EXTENSION crmpay;
\set VERBOSITY default
\set SHOW_CONTEXT never
\pset null '(null)'

-- unknown provider, bad names, missing pieces: clear errors, nothing written
SELECT crmpay.add_account('shop', 'acme', '{"secret_key": "sk_test_1"}');
SELECT crmpay.add_account('shop', NULL, '{"secret_key": "sk_test_1"}');
SELECT crmpay.add_account('bad name!', 'stripe', '{"secret_key": "sk_test_1"}');
SELECT crmpay.add_account('shop', 'stripe', '{"api_key": "sk_test_1"}', NULL, '{"success_url": "https://shop.example/ok"}');
SELECT crmpay.add_account('shop', 'stripe', '{"secret_key": "sk_test_1"}');
SELECT crmpay.add_account('shop', 'stripe', '{"secret_key": "sk_test_1"}', 'not-a-whsec',
                          '{"success_url": "https://shop.example/ok"}');
SELECT crmpay.add_account('shop', 'stripe', '{"secret_key": "sk_test_1"}', NULL,
                          '{"success_url": "https://shop.example/ok", "api_base": "http://127.0.0.1:1"}');
SELECT crmpay.add_account('shop', 'stripe', '{"secret_key": "sk_test_1"}', NULL,
                          '{"success_url": "https://shop.example/ok", "api_base": "ftp://x"}');
SELECT crmpay.add_account('shop', 'stripe', '[1, 2]');
SELECT crmpay.add_account('shop', 'stripe', '{"secret_key": "sk_test_1"}', '',
                          '{"success_url": "https://shop.example/ok"}');
SELECT count(*) AS accounts_after_errors FROM crmpay.gateway_accounts;

-- without a usable master key, adding an account fails with a hint
SET crmpay.key_file = '';
SELECT crmpay.add_account('shop', 'stripe', '{"secret_key": "sk_test_1"}', NULL,
                          '{"success_url": "https://shop.example/ok"}');
SET crmpay.key_file = '/nonexistent/crmpay.key';
SELECT crmpay.add_account('shop', 'stripe', '{"secret_key": "sk_test_1"}', NULL,
                          '{"success_url": "https://shop.example/ok"}');
RESET crmpay.key_file;

-- a good account
SELECT crmpay.add_account('shop', 'stripe', '{"secret_key": "sk_test_regress_0123456789"}',
                          'whsec_regress_secret',
                          '{"success_url": "https://shop.example/ok", "cancel_url": "https://shop.example/cart"}');
SELECT crmpay.add_account('shop', 'stripe', '{"secret_key": "sk_test_1"}', NULL,
                          '{"success_url": "https://shop.example/ok"}');
-- the other providers are accepted names
SELECT crmpay.add_account('eu-adyen', 'adyen', '{"api_key": "AQE_test"}', NULL,
                          '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid"}');
SELECT name, provider, settings, has_webhook_secret FROM crmpay.accounts ORDER BY name;

-- secrets are stored encrypted: no plaintext in the row, a versioned, keyed blob
SELECT position('sk_test_regress' IN encode(credentials, 'escape')) AS plaintext_found,
       position('whsec_regress' IN encode(webhook_secret, 'escape')) AS whsec_found,
       get_byte(credentials, 0) AS format_version,
       length(credentials) > 37 + length('{"secret_key": "sk_test_regress_0123456789"}') - 1 AS sealed_length_ok
  FROM crmpay.gateway_accounts WHERE name = 'shop';
-- the same secret sealed twice differs (random nonce)
SELECT crmpay._seal('x', 'aad') <> crmpay._seal('x', 'aad') AS nonces_differ;

-- a sealed value moved to another account fails its integrity check
CREATE TEMP TABLE stolen AS SELECT credentials FROM crmpay.gateway_accounts WHERE name = 'shop';
UPDATE crmpay.gateway_accounts SET credentials = (SELECT credentials FROM stolen) WHERE name = 'eu-adyen';
SELECT crmpay.update_account('eu-adyen', settings => '{"merchant_account": "M"}');
UPDATE crmpay.gateway_accounts
   SET credentials = crmpay._seal('{"api_key": "AQE_test"}', 'crmpay:eu-adyen:credentials')
 WHERE name = 'eu-adyen';

-- update_account validates the merged account
SELECT crmpay.update_account('shop', settings => '{"cancel_url": "https://shop.example/cart"}');
SELECT crmpay.update_account('shop', settings => '{"success_url": "https://shop.example/thanks"}');
SELECT crmpay.update_account('nope', settings => '{}');
SELECT settings FROM crmpay.accounts WHERE name = 'shop';

-- remove_account
SELECT crmpay.remove_account('eu-adyen');
SELECT crmpay.remove_account('eu-adyen');
SELECT name FROM crmpay.accounts ORDER BY name;
