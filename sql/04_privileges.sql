-- Privileges: PUBLIC gets nothing; crmpay_app creates links and reads
-- payments; crmpay_webhook only takes deliveries; crmpay_admin manages
-- accounts but never sees a secret.
\set VERBOSITY terse
\set SHOW_CONTEXT never
CREATE ROLE regress_app LOGIN IN ROLE crmpay_app;
CREATE ROLE regress_hook LOGIN IN ROLE crmpay_webhook;
CREATE ROLE regress_admin LOGIN IN ROLE crmpay_admin;
CREATE ROLE regress_nobody LOGIN;

SET ROLE regress_nobody;
SELECT count(*) FROM crmpay.payments;
SELECT crmpay.create_payment_link('shop', 'P-1', 1, 'EUR');
SELECT * FROM crmpay.receive_webhook('shop', '{}', '{}');
SELECT crmpay.to_minor_units(1, 'EUR');
RESET ROLE;

SET ROLE regress_app;
SELECT count(*) > 0 AS app_reads_payments FROM crmpay.payments;
SELECT crmpay.to_minor_units(1, 'EUR') AS app_converts;
SELECT count(*) FROM crmpay.gateway_accounts;
SELECT count(*) FROM crmpay.accounts;
SELECT count(*) FROM crmpay.events;
SELECT crmpay.add_account('x', 'stripe', '{"secret_key": "sk_test_1"}');
SELECT * FROM crmpay.receive_webhook('shop', '{}', '{}');
SELECT crmpay._gateway_create_link('shop', '{}');
SELECT crmpay._seal('x', 'y');
UPDATE crmpay.payments SET status = 'paid';
RESET ROLE;

SET ROLE regress_hook;
SELECT http_status, outcome FROM crmpay.receive_webhook('shop', '{}', '{}');
SELECT count(*) FROM crmpay.payments;
SELECT count(*) FROM crmpay.events;
SELECT crmpay.create_payment_link('shop', 'P-1', 1, 'EUR');
SELECT crmpay._apply_status(1, 'paid');
SELECT crmpay.verify_signature('stripe', 'x', '{}', '{}');
RESET ROLE;

SET ROLE regress_admin;
SELECT name, has_webhook_secret FROM crmpay.accounts ORDER BY name;
SELECT count(*) >= 0 AS admin_reads_events FROM crmpay.events;
SELECT count(*) FROM crmpay.gateway_accounts;
SELECT credentials FROM crmpay.gateway_accounts;
SELECT crmpay._seal('x', 'y');
SELECT crmpay.add_account('admin-made', 'stripe', '{"secret_key": "sk_test_admin"}', NULL,
                          '{"success_url": "https://shop.example/ok"}');
SELECT crmpay.verify_signature('stripe', 'x', '{}', '{}') AS admin_verifies;
RESET ROLE;
SELECT name FROM crmpay.accounts ORDER BY name;

-- no crmpay function is executable by PUBLIC
SELECT p.proname
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'crmpay' AND has_function_privilege('regress_nobody', p.oid, 'EXECUTE')
 ORDER BY 1;
-- internal functions are executable by none of the crmpay roles
SELECT p.proname, r.rolname
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 CROSS JOIN (VALUES ('crmpay_admin'), ('crmpay_app'), ('crmpay_webhook')) r(rolname)
 WHERE n.nspname = 'crmpay' AND p.proname LIKE '\_%' AND has_function_privilege(r.rolname, p.oid, 'EXECUTE')
 ORDER BY 1, 2;
-- security-relevant settings are superuser-only
SET ROLE regress_admin;
SET crmpay.webhook_tolerance = 0;
SET crmpay.allow_insecure_http = on;
SET crmpay.ca_file = '/tmp/evil.pem';
SET crmpay.key_file = '/tmp/evil.key';
SHOW crmpay.key_file;
RESET ROLE;

DROP OWNED BY regress_app, regress_hook, regress_admin, regress_nobody;
DROP ROLE regress_app, regress_hook, regress_admin, regress_nobody;
