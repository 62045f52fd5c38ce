-- The outbox without a worker (this instance has no crmpay.database):
-- what request_payment_link and link_orders write in the caller's
-- transaction, their errors, the job records the worker relies on, dead
-- letters, circuits, alerts, health, e-mail templates and privileges.
\set SHOW_CONTEXT never
SELECT crmpay.add_account('outbox', 'stripe', '{"secret_key": "sk_test_outbox"}', NULL,
                          '{"success_url": "https://shop.example/ok", "api_base": "https://127.0.0.1:9"}');

-- the outbox is WAL-logged
SELECT relname, relpersistence FROM pg_class
 WHERE oid IN ('crmpay.jobs'::regclass, 'crmpay.circuits'::regclass, 'crmpay.alerts'::regclass)
 ORDER BY 1;

-- request_payment_link: payment link_pending plus a create_link job, at once
SELECT order_ref, amount_minor, currency, status, url, email
  FROM crmpay.request_payment_link('outbox', 'A-1', 19.99, 'eur', 'ana@example.com', 'Two hats');
SELECT j.kind, j.state, j.attempts, j.payment_id = p.id AS same_payment,
       j.payload->>'idempotency_key' = crmpay.idempotency_key('outbox', 'A-1') AS fixed_key,
       j.payload->>'amount_minor' AS amount_minor
  FROM crmpay.jobs j JOIN crmpay.payments p ON p.order_ref = 'A-1' AND p.account = 'outbox';
-- asking again returns the same payment and queues nothing more
SELECT status FROM crmpay.request_payment_link('outbox', 'A-1', 19.99, 'EUR');
SELECT count(*) AS jobs FROM crmpay.jobs;
-- the same order for another amount is refused
SELECT crmpay.request_payment_link('outbox', 'A-1', 25, 'EUR');
\set VERBOSITY default
-- bad input: clear errors, nothing written
SELECT crmpay.request_payment_link('outbox', 'A-2', 19.999, 'EUR');
SELECT crmpay.request_payment_link('outbox', 'A-2', 10, 'XYZ');
SELECT crmpay.request_payment_link('nobody', 'A-2', 10, 'EUR');
SELECT crmpay.request_payment_link('outbox', 'A-2', 10, 'EUR', 'not an email');
\set VERBOSITY terse
SELECT count(*) AS payments, (SELECT count(*) FROM crmpay.jobs) AS jobs
  FROM crmpay.payments WHERE account = 'outbox';
-- rollback: nothing left behind
BEGIN;
SELECT status FROM crmpay.request_payment_link('outbox', 'A-3', 5, 'EUR');
ROLLBACK;
SELECT count(*) AS payments, (SELECT count(*) FROM crmpay.jobs) AS jobs
  FROM crmpay.payments WHERE account = 'outbox';

-- ---------------------------------------------------------------------
-- link_orders on the CRM's own table (identifiers that need quoting)
-- ---------------------------------------------------------------------
CREATE SCHEMA "CRM data";
CREATE TABLE "CRM data"."Order Book" (
    id          bigserial PRIMARY KEY,
    "Ref ""No"""  text NOT NULL,
    total       numeric(12,2) NOT NULL,
    cur         char(3) NOT NULL,
    mail        text,
    note        text,
    "Pay URL"   text,
    pay_status  varchar(20),
    qty         integer
);
\set VERBOSITY default
-- a missing column is named
SELECT crmpay.link_orders('"CRM data"."Order Book"', 'outbox', 'Ref "No"', 'amount', 'cur');
SELECT crmpay.link_orders('"CRM data"."Order Book"', 'outbox', 'Ref "No"', 'total', 'cur',
                          url_column => 'pay url');
-- the link and status columns must hold text and be columns of their own
SELECT crmpay.link_orders('"CRM data"."Order Book"', 'outbox', 'Ref "No"', 'total', 'cur',
                          status_column => 'qty');
SELECT crmpay.link_orders('"CRM data"."Order Book"', 'outbox', 'Ref "No"', 'total', 'cur',
                          url_column => 'Pay URL', status_column => 'Pay URL');
SELECT crmpay.link_orders('"CRM data"."Order Book"', 'nobody', 'Ref "No"', 'total', 'cur');
SELECT crmpay.link_orders('crmpay.accounts', 'outbox', 'name', 'name', 'name');
SELECT crmpay.unlink_orders('"CRM data"."Order Book"');
-- linked; without an index on the order_ref column it warns
SELECT crmpay.link_orders('"CRM data"."Order Book"', 'outbox', 'Ref "No"', 'total', 'cur',
                          email => 'mail', description => 'note',
                          url_column => 'Pay URL', status_column => 'pay_status');
\set VERBOSITY terse
CREATE INDEX ON "CRM data"."Order Book" ("Ref ""No""");
SELECT crmpay.link_orders('"CRM data"."Order Book"', 'outbox', 'Ref "No"', 'total', 'cur',
                          email => 'mail', description => 'note',
                          url_column => 'Pay URL', status_column => 'pay_status');
SELECT orders, account, order_ref_column, amount_column, currency_column, email_column,
       description_column, url_column, status_column
  FROM crmpay.linked_orders;
SELECT tgname, pg_get_triggerdef(oid) LIKE '%EXECUTE FUNCTION crmpay._order_inserted(''outbox'', ''2'', ''3'', ''4'', ''5'', ''6'')' AS args
  FROM pg_trigger WHERE tgrelid = '"CRM data"."Order Book"'::regclass;

-- each new order queues one job with the row's values, in the CRM's transaction
INSERT INTO "CRM data"."Order Book" ("Ref ""No""", total, cur, mail, note)
VALUES ('O-1', 12.50, 'EUR', 'bo@example.com', 'Blue "mug"'),
       ('O-2', 7, 'usd', NULL, NULL),
       ('O-3', 1, 'ZZZ', NULL, NULL);
BEGIN;
INSERT INTO "CRM data"."Order Book" ("Ref ""No""", total, cur) VALUES ('O-rolled-back', 1, 'EUR');
ROLLBACK;
SELECT kind, state, payment_id, order_table, payload FROM crmpay.jobs
 WHERE order_table IS NOT NULL ORDER BY id;

-- the worker turns each into a payment (validated like request_payment_link)
SELECT crmpay._materialize_order(id)->>'amount_minor' AS amount_minor
  FROM crmpay.jobs WHERE payload->'order'->>'order_ref' IN ('O-1', 'O-2') ORDER BY id;
SELECT order_ref, amount_minor, currency, status, email, description, order_table
  FROM crmpay.payments WHERE order_table IS NOT NULL ORDER BY order_ref;
\set VERBOSITY default
SELECT crmpay._materialize_order(id) FROM crmpay.jobs WHERE payload->'order'->>'order_ref' = 'O-3';
\set VERBOSITY terse
-- the status is written back into the order row at once, the link when it exists
SELECT "Ref ""No""", "Pay URL", pay_status FROM "CRM data"."Order Book" ORDER BY id;
UPDATE crmpay.payments SET url = 'https://pay.example/O-1', status = 'open' WHERE order_ref = 'O-1';
UPDATE crmpay.payments SET status = 'paid' WHERE order_ref = 'O-2';
SELECT "Ref ""No""", "Pay URL", pay_status FROM "CRM data"."Order Book" ORDER BY id;
-- renaming a linked column is fine (columns are known by number)
ALTER TABLE "CRM data"."Order Book" RENAME COLUMN pay_status TO "Payment Status";
UPDATE crmpay.payments SET status = 'paid' WHERE order_ref = 'O-1';
SELECT "Ref ""No""", "Payment Status" FROM "CRM data"."Order Book" ORDER BY id;
SELECT status_column FROM crmpay.linked_orders;
-- a CRM-side failure does not block the payment: a WARNING and an alert
ALTER TABLE "CRM data"."Order Book" ADD CONSTRAINT no_refunds CHECK ("Payment Status" <> 'refunded');
UPDATE crmpay.payments SET status = 'refunded' WHERE order_ref = 'O-1';
SELECT order_ref, status FROM crmpay.payments WHERE order_ref = 'O-1';
SELECT kind, account, message FROM crmpay.alerts WHERE kind = 'order_sync_failed';

-- unlinking removes the trigger; new orders queue nothing
SELECT crmpay.unlink_orders('"CRM data"."Order Book"');
INSERT INTO "CRM data"."Order Book" ("Ref ""No""", total, cur) VALUES ('O-4', 1, 'EUR');
SELECT count(*) AS jobs_for_o4 FROM crmpay.jobs WHERE payload->'order'->>'order_ref' = 'O-4';
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = '"CRM data"."Order Book"'::regclass;
SELECT crmpay.unlink_orders('"CRM data"."Order Book"');

-- ---------------------------------------------------------------------
-- Recording outcomes: retries, dead letters, circuits, alerts, health
-- ---------------------------------------------------------------------
UPDATE crmpay.jobs SET state = 'running' WHERE payload->>'order_ref' = 'A-1';
-- a retryable failure goes back to the queue, and counts against the circuit
SELECT crmpay._job_failed(id, now() + interval '1 minute', 'gateway is unavailable: HTTP 503',
                          'api_error', 503, true)
  FROM crmpay.jobs WHERE payload->>'order_ref' = 'A-1';
SELECT state, attempts, run_at > now() AS later, last_error, last_error_code, last_http_status
  FROM crmpay.jobs WHERE payload->>'order_ref' = 'A-1';
-- a refusal makes it dead at once, with the gateway's words, and an alert
UPDATE crmpay.jobs SET state = 'running', attempts = 1 WHERE payload->>'order_ref' = 'A-1';
SELECT crmpay._job_failed(id, NULL, 'gateway rejected the request: HTTP 400, parameter_invalid: Invalid currency',
                          'parameter_invalid', 400, false)
  FROM crmpay.jobs WHERE payload->>'order_ref' = 'A-1';
SELECT state, finished_at IS NOT NULL AS finished, last_error FROM crmpay.jobs
 WHERE payload->>'order_ref' = 'A-1';
SELECT kind, account, regexp_replace(message, 'job \d+', 'job N') AS message, details
  FROM crmpay.alerts WHERE kind = 'job_dead';
-- a job that is not running is left alone (an outcome recorded twice)
SELECT crmpay._job_failed(id, NULL, 'late', NULL, NULL, true)
  FROM crmpay.jobs WHERE payload->>'order_ref' = 'A-1';
SELECT count(*) AS job_dead_alerts FROM crmpay.alerts WHERE kind = 'job_dead';

-- five consecutive counted failures open the circuit (crmpay.circuit_failure_threshold)
SELECT count(*) AS requested
  FROM generate_series(1, 4) g, crmpay.request_payment_link('outbox', 'C-' || g, 1, 'EUR');
UPDATE crmpay.jobs SET state = 'running' WHERE payload->>'order_ref' LIKE 'C-%';
SELECT crmpay._job_failed(id, now(), 'could not connect to the gateway: Connection refused',
                          'connection failed', NULL, true)
  FROM crmpay.jobs WHERE payload->>'order_ref' LIKE 'C-%' ORDER BY id;
SELECT state, consecutive_failures, open_until > now() AS cooling_down, last_error
  FROM crmpay.circuits WHERE account = 'outbox';
SELECT kind, account, message FROM crmpay.alerts WHERE kind = 'circuit_open';
-- a success closes it
UPDATE crmpay.jobs SET state = 'running' WHERE payload->>'order_ref' = 'C-1';
SELECT crmpay._job_link_created(id, '{"gateway_ref": "cs_1", "url": "https://pay.example/C-1", "status": "open"}')
  FROM crmpay.jobs WHERE payload->>'order_ref' = 'C-1';
SELECT state, consecutive_failures, open_until FROM crmpay.circuits WHERE account = 'outbox';
SELECT p.status, p.url, j.state FROM crmpay.payments p JOIN crmpay.jobs j ON j.payment_id = p.id
 WHERE p.order_ref = 'C-1';

SELECT account, provider, queue_depth, oldest_pending_age IS NOT NULL AS has_age, dead_jobs,
       circuit_state, consecutive_failures, last_error
  FROM crmpay.health WHERE account = 'outbox';

-- dead letters are queued again on request
\set VERBOSITY default
SELECT crmpay.retry_job(-1);
DO $$
BEGIN
    PERFORM crmpay.retry_job(id) FROM crmpay.jobs WHERE payload->>'order_ref' = 'C-2';
EXCEPTION WHEN object_not_in_prerequisite_state THEN
    RAISE NOTICE '%', regexp_replace(SQLERRM, 'job \d+', 'job N');
END
$$;
SELECT crmpay.retry_dead('nobody');
\set VERBOSITY terse
SELECT state, attempts, finished_at FROM crmpay.retry_job(
    (SELECT id FROM crmpay.jobs WHERE payload->>'order_ref' = 'A-1'));
UPDATE crmpay.jobs SET state = 'dead' WHERE payload->>'order_ref' IN ('C-2', 'C-3');
SELECT crmpay.retry_dead('outbox') AS requeued;
SELECT crmpay.retry_dead(NULL) AS requeued;
SELECT state, count(*) FROM crmpay.jobs WHERE account = 'outbox' GROUP BY 1 ORDER BY 1;
-- asking again for an order whose job died queues that job again
UPDATE crmpay.jobs SET state = 'dead', attempts = 10 WHERE payload->>'order_ref' = 'C-4';
SELECT status FROM crmpay.request_payment_link('outbox', 'C-4', 1, 'EUR');
SELECT state, attempts FROM crmpay.jobs WHERE payload->>'order_ref' = 'C-4';

-- rejected webhooks: above crmpay.alert_rejected_webhooks within crmpay.alert_window, one alert
SET crmpay.alert_rejected_webhooks = 2;
SELECT r.http_status, r.outcome
  FROM generate_series(1, 4) g, crmpay.receive_webhook('outbox', '{}', '{"forged": ' || g || '}') r;
SELECT kind, account, details->>'rejected' AS rejected FROM crmpay.alerts WHERE kind = 'webhooks_rejected';
-- unknown accounts raise none (their names are the sender's choice)
SELECT r.http_status
  FROM generate_series(1, 4) g, crmpay.receive_webhook('no-such-account', '{}', '{"n": ' || g || '}') r;
SELECT count(*) AS webhook_alerts FROM crmpay.alerts WHERE kind = 'webhooks_rejected';
RESET crmpay.alert_rejected_webhooks;

-- ---------------------------------------------------------------------
-- E-mail templates
-- ---------------------------------------------------------------------
SELECT crmpay._render_template('Hi {{ email }}, pay {{amount}} {{currency}} for {{order_ref}}: {{url}}',
                               '{"email": "ana@example.com", "amount": "19.99", "currency": "EUR",
                                 "order_ref": "A-1", "url": "https://pay.example/A-1"}');
-- values are inserted once: a placeholder inside a value stays text
SELECT crmpay._render_template('Dear {{order.name}} ({{metadata.tier}}{{metadata.none}})',
                               '{"order": {"name": "{{url}}"}, "metadata": {"tier": "gold"}, "url": "x"}');
-- HTML templates escape every value
SELECT crmpay._render_template('<p>Dear {{order.name}}</p><a href="{{url}}">pay</a>',
                               '{"order": {"name": "<script>alert(1)</script> & \"Bo\""},
                                 "url": "https://pay.example/?a=1&b=''2''"}', true);
SELECT crmpay._render_template(NULL, '{}') IS NULL AS null_template;
\set VERBOSITY default
SELECT crmpay._render_template('Hi {{nmae}}', '{"name": "x"}');
SELECT crmpay._render_template('Hi {{name', '{"name": "x"}');
SELECT crmpay._render_template('Hi {{metadata}}', '{"metadata": {"a": 1}}');
SELECT crmpay._render_template('Hi {{na me}}', '{"name": "x"}');
-- addresses that could inject headers are refused
SELECT crmpay._check_email_payload('{"to": "ana@example.com\r\nBcc: all@example.com", "from": "shop@example.com", "text": "x"}');
SELECT crmpay._check_email_payload('{"to": "Ana <ana@example.com>", "from": "shop@example.com", "text": "x"}');
SELECT crmpay._check_email_payload('{"to": "ana@example.com", "from": "shop", "text": "x"}');
SELECT crmpay._check_email_payload('{"to": "ana@example.com", "from": "shop@example.com"}');
-- send_link_email needs a template, an address and a link
SELECT crmpay.send_link_email((SELECT id FROM crmpay.payments WHERE order_ref = 'C-1'));
\set VERBOSITY terse
SELECT crmpay.update_account('outbox', settings =>
    '{"success_url": "https://shop.example/ok", "api_base": "https://127.0.0.1:9",
      "email_from": "shop@example.com", "email_from_name": "Shop",
      "email_subject": "Order {{order_ref}}: {{amount}} {{currency}}",
      "email_text": "Pay here: {{url}}", "email_html": "<a href=\"{{url}}\">Pay {{description}}</a>"}');
DO $$
BEGIN
    PERFORM crmpay.send_link_email((SELECT id FROM crmpay.payments WHERE order_ref = 'C-1'));
EXCEPTION WHEN object_not_in_prerequisite_state THEN
    RAISE NOTICE '%', regexp_replace(SQLERRM, 'payment \d+', 'payment N');
END
$$;
UPDATE crmpay.payments SET email = 'cy@example.com', description = 'a <b>bold</b> hat'
 WHERE order_ref = 'C-1';
SELECT crmpay.send_link_email((SELECT id FROM crmpay.payments WHERE order_ref = 'C-1')) IS NOT NULL AS queued;
SELECT kind, state, payload FROM crmpay.jobs WHERE kind = 'send_email' ORDER BY id DESC LIMIT 1;
-- a template that cannot be filled gives a dead job with the reason, not an ERROR
SELECT crmpay.update_account('outbox', settings =>
    '{"success_url": "https://shop.example/ok", "api_base": "https://127.0.0.1:9",
      "email_from": "shop@example.com", "email_text": "Hi {{customer}}"}');
UPDATE crmpay.jobs SET state = 'running' WHERE payload->>'order_ref' = 'C-2';
UPDATE crmpay.payments SET email = 'cy@example.com' WHERE order_ref = 'C-2';
SELECT crmpay._job_link_created(id, '{"gateway_ref": "cs_2", "url": "https://pay.example/C-2"}')
  FROM crmpay.jobs WHERE payload->>'order_ref' = 'C-2';
SELECT j.kind, j.state, j.last_error FROM crmpay.jobs j JOIN crmpay.payments p ON p.id = j.payment_id
 WHERE p.order_ref = 'C-2' ORDER BY j.id;

-- ---------------------------------------------------------------------
-- Privileges
-- ---------------------------------------------------------------------
CREATE ROLE regress_app LOGIN IN ROLE crmpay_app;
CREATE ROLE regress_admin LOGIN IN ROLE crmpay_admin;
CREATE ROLE regress_crm LOGIN;
GRANT USAGE ON SCHEMA "CRM data" TO regress_app, regress_admin, regress_crm;
CREATE TABLE "CRM data".crm_orders (ref text, total numeric, cur text, url text);
ALTER TABLE "CRM data".crm_orders OWNER TO regress_crm;
GRANT INSERT ON "CRM data".crm_orders TO regress_app;
SET ROLE regress_app;
SELECT status FROM crmpay.request_payment_link('outbox', 'P-1', 3, 'EUR');
SELECT crmpay.link_orders('"CRM data".crm_orders', 'outbox', 'ref', 'total', 'cur');
SELECT crmpay.retry_dead('outbox');
SELECT count(*) FROM crmpay.jobs;
RESET ROLE;
SET ROLE regress_admin;
SELECT count(*) > 0 AS admin_reads_jobs FROM crmpay.jobs;
SELECT count(*) > 0 AS admin_reads_health FROM crmpay.health;
-- linking needs ownership of the table
SELECT crmpay.link_orders('"CRM data".crm_orders', 'outbox', 'ref', 'total', 'cur');
RESET ROLE;
GRANT crmpay_admin TO regress_crm;
SET ROLE regress_crm;
SELECT crmpay.link_orders('"CRM data".crm_orders', 'outbox', 'ref', 'total', 'cur', url_column => 'url');
SELECT linked_by FROM crmpay.linked_orders;
RESET ROLE;
-- the CRM application's inserts queue jobs though it cannot touch crmpay.jobs itself
SET ROLE regress_app;
INSERT INTO "CRM data".crm_orders VALUES ('P-2', 4, 'EUR');
RESET ROLE;
SELECT account, payload->'order'->>'order_ref' AS order_ref FROM crmpay.jobs
 WHERE order_table = '"CRM data".crm_orders'::regclass;
-- the write-back runs as the role that linked the table, not as crmpay: the
-- CRM's own triggers get no superuser rights from it
GRANT CREATE ON SCHEMA "CRM data" TO regress_crm;
SET ROLE regress_crm;
CREATE TABLE "CRM data".who (name name);
CREATE FUNCTION "CRM data".note_who() RETURNS trigger LANGUAGE plpgsql
    AS $$ BEGIN INSERT INTO "CRM data".who VALUES (current_user); RETURN NULL; END $$;
CREATE TRIGGER note_who AFTER UPDATE ON "CRM data".crm_orders
    FOR EACH ROW EXECUTE FUNCTION "CRM data".note_who();
RESET ROLE;
SELECT crmpay._materialize_order(id) IS NOT NULL AS materialized FROM crmpay.jobs
 WHERE order_table = '"CRM data".crm_orders'::regclass;
UPDATE crmpay.payments SET url = 'https://pay.example/P-2', status = 'open' WHERE order_ref = 'P-2';
SELECT ref, url FROM "CRM data".crm_orders;
SELECT name AS trigger_ran_as FROM "CRM data".who;

SELECT crmpay.unlink_orders('"CRM data".crm_orders');
DROP TABLE "CRM data".crm_orders, "CRM data".who;
DROP OWNED BY regress_app, regress_admin, regress_crm;
DROP ROLE regress_app, regress_admin, regress_crm;
