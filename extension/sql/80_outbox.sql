-- ---------------------------------------------------------------------
-- The outbox: payment-link requests queued in the caller's transaction
-- and carried out by the background worker (extension/worker.c,
-- extension/outbox.c), order tables linked to it, retries, dead letters,
-- the per-account circuit breaker, health and alerts.
-- ---------------------------------------------------------------------

-- The CRM table (crmpay.link_orders) whose insert asked for the payment.
ALTER TABLE crmpay.payments ADD COLUMN order_table regclass;
COMMENT ON COLUMN crmpay.payments.order_table IS
    'The CRM table (see crmpay.link_orders) whose new order asked for this payment; NULL otherwise';

-- ---------------------------------------------------------------------
-- Follow-up actions of every new or changed payment (extension/payments.c):
-- NOTIFY crmpay_payments on every status change, the payment_refs lookup,
-- and the CRM's own order row (extension/orders.c; a failure there becomes
-- a WARNING and an order_sync_failed alert, never blocks the payment).
-- One trigger, not three: each AFTER trigger costs a queued event and a
-- fetch of both row versions; no WHEN clause either (a WHEN is parsed and
-- planned again by every statement): each part returns at once when its
-- columns did not change.  SECURITY DEFINER: it writes crmpay's own tables
-- whoever changed the payment.
-- ---------------------------------------------------------------------
CREATE FUNCTION crmpay._payment_changed() RETURNS trigger
    LANGUAGE c SECURITY DEFINER AS 'MODULE_PATHNAME', 'crmpay_payment_changed';
CREATE TRIGGER payments_changed
    AFTER INSERT OR UPDATE OF status, url, order_table, gateway_payment_ref ON crmpay.payments
    FOR EACH ROW EXECUTE FUNCTION crmpay._payment_changed();

/*
 * Jobs.  One row per unit of work for the worker; WAL-logged like every
 * crmpay table, so a crash loses nothing.  kind says what to do:
 *   create_link  ask the account's gateway for the payment link of
 *                payment_id (payload = the link request of _link_request);
 *                a job queued by an order table's trigger has no payment
 *                yet (payload = {"order": {...}} as read from the new row)
 *   send_email   mail the link to the customer (payload = the rendered
 *                message: to, from, from_name, subject, text, html)
 *   capture      capture the approved PayPal order of payment_id (queued by
 *                receive_webhook when a CHECKOUT.ORDER.APPROVED event is
 *                applied; payload = {"event_key"}, and once done also
 *                {"capture": the gateway's answer}); at most one queued or
 *                running per payment
 * state: queued -> running (claimed; run_at is then the lease's end) ->
 * done, or back to queued (retry at run_at), or dead (out of attempts or
 * refused for good; last_error says why; crmpay.retry_job requeues).
 */
-- Domains rather than table CHECKs: a domain's check is prepared once per
-- session, a table CHECK is parsed again on every insert (and the trigger of
-- a linked order table inserts one job per order).
CREATE DOMAIN crmpay.job_kind AS text CHECK (VALUE IN ('create_link', 'send_email', 'capture'));
CREATE DOMAIN crmpay.job_state AS text CHECK (VALUE IN ('queued', 'running', 'done', 'dead'));

CREATE TABLE crmpay.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             crmpay.job_kind NOT NULL,
    account          text NOT NULL,
    payment_id       bigint,
    order_table      regclass,
    payload          jsonb NOT NULL DEFAULT '{}',
    state            crmpay.job_state NOT NULL DEFAULT 'queued',
    attempts         integer NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    last_error_code  text,
    last_http_status integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
-- What the worker claims (due jobs and expired leases), oldest first; the
-- finished ones (for dead-letter counts and the retention cleanup); the
-- jobs of a payment.  Few indexes, and few of them partial: every partial
-- index costs each insert the preparation of its predicate.
CREATE INDEX jobs_due ON crmpay.jobs (run_at, id) WHERE state IN ('queued', 'running');
CREATE INDEX jobs_finished ON crmpay.jobs (state, finished_at) WHERE state IN ('done', 'dead');
CREATE INDEX jobs_payment ON crmpay.jobs (payment_id);
COMMENT ON TABLE crmpay.jobs IS
    'The outbox: work for the background worker (payment links, e-mails, captures), with retries and dead letters';

/* The circuit breaker of each account, and its last error. */
CREATE TABLE crmpay.circuits (
    account              text PRIMARY KEY,
    state                text NOT NULL DEFAULT 'closed'
                         CHECK (state IN ('closed', 'open', 'half_open')),
    consecutive_failures integer NOT NULL DEFAULT 0,
    opened_at            timestamptz,
    open_until           timestamptz,
    last_error           text,
    last_failure_at      timestamptz,
    last_success_at      timestamptz
);
COMMENT ON TABLE crmpay.circuits IS
    'Per-account circuit breaker: open = the gateway failed too often, requests pause until open_until';

/* Alerts: also sent as NOTIFY crmpay_alerts. */
CREATE TABLE crmpay.alerts (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       text NOT NULL
               CHECK (kind IN ('job_dead', 'circuit_open', 'webhooks_rejected', 'order_sync_failed')),
    account    text,
    job_id     bigint,
    payment_id bigint,
    message    text NOT NULL,
    details    jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alerts_recent ON crmpay.alerts (account, kind, created_at);
COMMENT ON TABLE crmpay.alerts IS
    'Things an operator should look at: dead jobs, open circuits, bursts of rejected webhooks';

/* Order tables linked with crmpay.link_orders (columns by number: renames are fine). */
CREATE TABLE crmpay.order_links (
    orders             regclass PRIMARY KEY,
    account            text NOT NULL REFERENCES crmpay.gateway_accounts (name),
    order_ref_attnum   smallint NOT NULL,
    amount_attnum      smallint NOT NULL,
    currency_attnum    smallint NOT NULL,
    email_attnum       smallint,
    description_attnum smallint,
    url_attnum         smallint,
    status_attnum      smallint,
    linked_by          name NOT NULL,
    linked_at          timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE crmpay.order_links IS 'CRM tables whose new rows get payment links; see crmpay.linked_orders';

CREATE VIEW crmpay.linked_orders AS
    SELECT l.orders, l.account,
           (SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = l.orders AND a.attnum = l.order_ref_attnum) AS order_ref_column,
           (SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = l.orders AND a.attnum = l.amount_attnum) AS amount_column,
           (SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = l.orders AND a.attnum = l.currency_attnum) AS currency_column,
           (SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = l.orders AND a.attnum = l.email_attnum) AS email_column,
           (SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = l.orders AND a.attnum = l.description_attnum) AS description_column,
           (SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = l.orders AND a.attnum = l.url_attnum) AS url_column,
           (SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = l.orders AND a.attnum = l.status_attnum) AS status_column,
           l.linked_by, l.linked_at
      FROM crmpay.order_links l;
COMMENT ON VIEW crmpay.linked_orders IS 'CRM tables linked with crmpay.link_orders, with their column names';

-- ---------------------------------------------------------------------
-- Waking the worker and alerts
-- ---------------------------------------------------------------------

/* _wake: the worker of this database is woken when the transaction commits. */
CREATE FUNCTION crmpay._wake() RETURNS void
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'crmpay_wake';

CREATE FUNCTION crmpay._alert_notify() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('crmpay_alerts',
                      json_build_object('id', NEW.id, 'kind', NEW.kind, 'account', NEW.account,
                                        'job_id', NEW.job_id, 'payment_id', NEW.payment_id,
                                        'message', left(NEW.message, 1000))::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER alerts_notify AFTER INSERT ON crmpay.alerts
    FOR EACH ROW EXECUTE FUNCTION crmpay._alert_notify();

/*
 * _webhook_rejected: raises a 'webhooks_rejected' alert when more than
 * crmpay.alert_rejected_webhooks deliveries for an existing account were
 * rejected within crmpay.alert_window (once per window and account).
 * receive_webhook calls it after recording a rejected delivery (the only
 * writer of rejected events): a trigger on crmpay.events would cost every
 * accepted delivery too.
 */
CREATE FUNCTION crmpay._webhook_rejected(rejected_account text, last_reason text) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_threshold integer := coalesce(nullif(current_setting('crmpay.alert_rejected_webhooks', true), '')::integer, 20);
    v_window interval := coalesce(nullif(current_setting('crmpay.alert_window', true), '')::interval, '5 minutes');
    v_count bigint;
BEGIN
    IF v_threshold <= 0
       OR NOT EXISTS (SELECT FROM crmpay.gateway_accounts a WHERE a.name = rejected_account) THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('crmpay/alert' || chr(31) || rejected_account, 0));
    IF EXISTS (SELECT FROM crmpay.alerts al
                WHERE al.account = rejected_account AND al.kind = 'webhooks_rejected'
                  AND al.created_at > now() - v_window) THEN
        RETURN;
    END IF;
    SELECT count(*) INTO v_count FROM crmpay.events e
     WHERE e.account = rejected_account AND e.outcome = 'rejected' AND e.received_at > now() - v_window;
    IF v_count > v_threshold THEN
        INSERT INTO crmpay.alerts (kind, account, message, details)
        VALUES ('webhooks_rejected', rejected_account,
                format('%s webhook deliveries for account "%s" were rejected within %s (last reason: %s)',
                       v_count, rejected_account, v_window, last_reason),
                jsonb_build_object('rejected', v_count, 'window', v_window::text,
                                   'threshold', v_threshold, 'last_reason', last_reason));
    END IF;
END
$$;

-- ---------------------------------------------------------------------
-- Requesting links
-- ---------------------------------------------------------------------

/*
 * _pending_payment: the payment of (account, order_ref) for a validated
 * link request, created with status link_pending if there is none.  The
 * same order with another amount or currency is refused.
 */
CREATE FUNCTION crmpay._pending_payment(account text, request jsonb, order_table regclass)
    RETURNS crmpay.payments
    LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_order_ref text := request->>'order_ref';
    v_payment crmpay.payments;
BEGIN
    v_payment := crmpay._existing_payment(account, request);
    IF v_payment.id IS NULL THEN
        INSERT INTO crmpay.payments AS p
            (account, order_ref, amount_minor, currency, status, email, description, metadata,
             idempotency_key, order_table)
        VALUES (account, v_order_ref, (request->>'amount_minor')::bigint, request->>'currency',
                'link_pending', request->>'email', request->>'description', request->'metadata',
                request->>'idempotency_key', order_table)
        RETURNING * INTO v_payment;
        RETURN v_payment;
    END IF;
    IF v_payment.order_table IS NULL AND order_table IS NOT NULL THEN
        UPDATE crmpay.payments p SET order_table = _pending_payment.order_table, updated_at = now()
         WHERE p.id = v_payment.id
        RETURNING * INTO v_payment;
    END IF;
    RETURN v_payment;
END
$$;

/*
 * request_payment_link: the asynchronous path.  Writes the payment
 * (status link_pending) and a create_link job in the caller's transaction
 * and returns at once; the worker, woken when the transaction commits,
 * asks the gateway and sets url and status 'open' (NOTIFY
 * crmpay_payments).  A rollback leaves nothing behind.  Asking again for
 * the same order returns its payment and queues nothing new (a dead job
 * for it is queued again).
 */
CREATE FUNCTION crmpay.request_payment_link(account text, order_ref text, amount numeric,
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
BEGIN
    v_request := crmpay._link_request(account, order_ref, amount, currency, email, description, metadata);
    v_payment := crmpay._pending_payment(account, v_request, NULL);
    IF v_payment.status <> 'link_pending' THEN
        RETURN v_payment;
    END IF;
    UPDATE crmpay.jobs j SET state = 'queued', attempts = 0, run_at = now(), updated_at = now(),
                             finished_at = NULL
     WHERE j.payment_id = v_payment.id AND j.kind = 'create_link' AND j.state = 'dead';
    IF NOT EXISTS (SELECT FROM crmpay.jobs j
                    WHERE j.payment_id = v_payment.id AND j.kind = 'create_link' AND j.state <> 'done') THEN
        INSERT INTO crmpay.jobs (kind, account, payment_id, payload)
        VALUES ('create_link', account, v_payment.id, v_request);
    END IF;
    PERFORM crmpay._wake();
    RETURN v_payment;
END
$$;

-- ---------------------------------------------------------------------
-- What the worker calls (internal; it runs as the bootstrap superuser)
--
-- These internal functions have no SET search_path: on the worker's hot
-- path that clause costs a configuration save and restore per call.  The
-- worker pins search_path = pg_catalog, pg_temp for its whole session,
-- the public functions that call them pin their own, and every name in
-- them is schema-qualified anyway.
-- ---------------------------------------------------------------------

/*
 * _materialize_order: turns a job queued by an order table's trigger into
 * a link request: validates the order's values as request_payment_link
 * would and creates its payment.  Returns the request to send, or NULL
 * when the order already has its link (the job is then done).  Raises for
 * an invalid order; the worker makes the job dead with that error.
 */
CREATE FUNCTION crmpay._materialize_order(job_id bigint) RETURNS jsonb
    LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_job crmpay.jobs;
    v_order jsonb;
    v_request jsonb;
    v_payment crmpay.payments;
BEGIN
    SELECT * INTO STRICT v_job FROM crmpay.jobs j WHERE j.id = job_id;
    IF v_job.payment_id IS NOT NULL THEN
        RETURN v_job.payload;
    END IF;
    v_order := v_job.payload->'order';
    v_request := crmpay._link_request(v_job.account, v_order->>'order_ref',
                                      (v_order->>'amount')::numeric, v_order->>'currency',
                                      v_order->>'email', v_order->>'description', '{}');
    v_payment := crmpay._pending_payment(v_job.account, v_request, v_job.order_table);
    UPDATE crmpay.jobs j SET payment_id = v_payment.id, payload = v_request, updated_at = now()
     WHERE j.id = job_id;
    IF v_payment.status <> 'link_pending' THEN
        RETURN NULL;
    END IF;
    RETURN v_request;
END
$$;

/*
 * _job_link_created: records the link the gateway created for a job's
 * payment: url, gateway_ref, expires_at and status link_pending -> open
 * (a guarded UPDATE: a payment that moved on keeps its status; NOTIFY and
 * the order-table sync fire through the payments triggers).  Closes the
 * account's circuit and queues the e-mail to the customer when the account
 * has an e-mail template.
 */
CREATE FUNCTION crmpay._job_link_created(job_id bigint, link jsonb) RETURNS void
    LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_job crmpay.jobs;
    v_old_status text;
    v_payment crmpay.payments;
BEGIN
    UPDATE crmpay.jobs j
       SET state = 'done', finished_at = now(), updated_at = now(),
           last_error = NULL, last_error_code = NULL, last_http_status = NULL
     WHERE j.id = job_id AND j.state = 'running'
    RETURNING * INTO v_job;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT p.status INTO v_old_status FROM crmpay.payments p WHERE p.id = v_job.payment_id FOR UPDATE;
    UPDATE crmpay.payments p
       SET url = coalesce(p.url, link->>'url'),
           gateway_ref = coalesce(p.gateway_ref, link->>'gateway_ref'),
           expires_at = coalesce(p.expires_at, (link->>'expires_at')::timestamptz),
           status = CASE WHEN p.status = 'link_pending' THEN coalesce(link->>'status', 'open') ELSE p.status END,
           updated_at = now()
     WHERE p.id = v_job.payment_id
    RETURNING * INTO v_payment;
    -- a call of the account worked: its circuit closes
    UPDATE crmpay.circuits c
       SET state = 'closed', consecutive_failures = 0, open_until = NULL, last_success_at = now()
     WHERE c.account = v_job.account AND (c.state <> 'closed' OR c.consecutive_failures <> 0);
    IF v_old_status = 'link_pending' AND v_payment.email IS NOT NULL THEN
        PERFORM crmpay._enqueue_link_email(v_payment.id, false);
    END IF;
END
$$;

/*
 * _capture_job_request: the capture request of a capture job's payment
 * (crmpay._capture_request), read when the worker prepares the job: NULL
 * when the payment is captured already (the job is then done without a
 * call); raises when it cannot be captured (the job goes dead).
 */
CREATE FUNCTION crmpay._capture_job_request(job_id bigint) RETURNS jsonb
    LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_job crmpay.jobs;
    v_payment crmpay.payments;
BEGIN
    SELECT * INTO STRICT v_job FROM crmpay.jobs j WHERE j.id = job_id;
    SELECT * INTO v_payment FROM crmpay.payments p WHERE p.id = v_job.payment_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'payment % of capture job % does not exist', v_job.payment_id, job_id
            USING ERRCODE = 'undefined_object';
    END IF;
    RETURN crmpay._capture_request(v_payment);
END
$$;

/*
 * _job_captured: records the gateway's answer to a capture job: the
 * payment moves through the state machine (crmpay._apply_capture), the
 * answer is kept in the job's payload, the account's circuit closes.  An
 * answer that cannot be applied (another amount) makes the job dead, with
 * an alert.
 */
CREATE FUNCTION crmpay._job_captured(job_id bigint, capture jsonb) RETURNS void
    LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_job crmpay.jobs;
    v_problem text;
BEGIN
    SELECT * INTO v_job FROM crmpay.jobs j WHERE j.id = job_id AND j.state = 'running' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE crmpay.circuits c
       SET state = 'closed', consecutive_failures = 0, open_until = NULL, last_success_at = now()
     WHERE c.account = v_job.account AND (c.state <> 'closed' OR c.consecutive_failures <> 0);
    v_problem := crmpay._apply_capture(v_job.payment_id, capture);
    UPDATE crmpay.jobs j
       SET payload = j.payload || jsonb_build_object('capture', capture), updated_at = now()
     WHERE j.id = job_id;
    IF v_problem IS NOT NULL THEN
        PERFORM crmpay._job_failed(job_id, NULL, v_problem, 'capture_not_applied', NULL, false);
        RETURN;
    END IF;
    UPDATE crmpay.jobs j
       SET state = 'done', finished_at = now(), updated_at = now(),
           last_error = NULL, last_error_code = NULL, last_http_status = NULL
     WHERE j.id = job_id;
END
$$;

/*
 * _job_failed: records a failed attempt.  retry_at NULL makes the job dead
 * (alert job_dead); otherwise it is queued again for retry_at.  counts
 * says whether the failure counts against the account's circuit (gateway
 * unavailable, rate limited, unreachable, credentials refused); after
 * crmpay.circuit_failure_threshold consecutive ones the circuit opens for
 * crmpay.circuit_cooldown (alert circuit_open), and a failed trial call of
 * a half-open circuit opens it again.
 */
CREATE FUNCTION crmpay._job_failed(job_id bigint, retry_at timestamptz, error text,
                                   error_code text, http_status integer, counts boolean)
    RETURNS void
    LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_job crmpay.jobs;
    v_circuit crmpay.circuits;
    v_threshold integer := coalesce(nullif(current_setting('crmpay.circuit_failure_threshold', true), '')::integer, 5);
    v_cooldown interval := coalesce(nullif(current_setting('crmpay.circuit_cooldown', true), '')::interval, '30 seconds');
BEGIN
    UPDATE crmpay.jobs j
       SET state = CASE WHEN retry_at IS NULL THEN 'dead' ELSE 'queued' END,
           run_at = coalesce(retry_at, now()),
           finished_at = CASE WHEN retry_at IS NULL THEN now() END,
           last_error = error, last_error_code = error_code, last_http_status = http_status,
           updated_at = now()
     WHERE j.id = job_id AND j.state = 'running'
    RETURNING * INTO v_job;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF retry_at IS NULL THEN
        INSERT INTO crmpay.alerts (kind, account, job_id, payment_id, message, details)
        VALUES ('job_dead', v_job.account, v_job.id, v_job.payment_id,
                format('%s job %s for account "%s" is dead after %s attempt(s): %s',
                       v_job.kind, v_job.id, v_job.account, v_job.attempts, error),
                jsonb_build_object('kind', v_job.kind, 'attempts', v_job.attempts,
                                   'error_code', error_code, 'http_status', http_status));
    END IF;
    -- the account's last error (for crmpay.health); gateway failures may trip its circuit
    counts := counts AND v_job.kind <> 'send_email';
    INSERT INTO crmpay.circuits AS c (account, consecutive_failures, last_error, last_failure_at)
    VALUES (v_job.account, CASE WHEN counts THEN 1 ELSE 0 END, error, now())
    ON CONFLICT (account) DO UPDATE
       SET consecutive_failures = c.consecutive_failures + CASE WHEN counts THEN 1 ELSE 0 END,
           last_error = excluded.last_error, last_failure_at = excluded.last_failure_at
    RETURNING * INTO v_circuit;
    IF NOT counts OR v_threshold <= 0 THEN
        RETURN;
    END IF;
    IF v_circuit.state = 'half_open'
       OR (v_circuit.state = 'closed' AND v_circuit.consecutive_failures >= v_threshold) THEN
        UPDATE crmpay.circuits c
           SET state = 'open', open_until = clock_timestamp() + v_cooldown,
               opened_at = CASE WHEN c.state = 'closed' THEN now() ELSE c.opened_at END
         WHERE c.account = v_job.account;
        IF v_circuit.state = 'closed' THEN
            INSERT INTO crmpay.alerts (kind, account, job_id, message, details)
            VALUES ('circuit_open', v_job.account, v_job.id,
                    format('circuit of account "%s" opened after %s consecutive failures; requests pause for %s (last error: %s)',
                           v_job.account, v_circuit.consecutive_failures, v_cooldown, error),
                    jsonb_build_object('consecutive_failures', v_circuit.consecutive_failures,
                                       'cooldown', v_cooldown::text));
        END IF;
    END IF;
END
$$;

-- ---------------------------------------------------------------------
-- E-mailing the link
-- ---------------------------------------------------------------------

/*
 * _render_template(template, fields, html): fills {{name}} and
 * {{group.name}} placeholders from a jsonb object (extension/email.c).
 * Values are inserted once, never re-read as template text; with html
 * they are HTML-escaped.  An unknown placeholder is an error.
 */
CREATE FUNCTION crmpay._render_template(template text, fields jsonb, html boolean DEFAULT false)
    RETURNS text
    LANGUAGE c IMMUTABLE AS 'MODULE_PATHNAME', 'crmpay_render_template';

/*
 * _enqueue_link_email: queues a send_email job with the account's
 * template filled in for the payment.  Template fields: order_ref, amount
 * (in major units, e.g. 19.99), currency, url, description, email,
 * account, expires_at, metadata.KEY, and order.COLUMN (the CRM row, for
 * orders that came through crmpay.link_orders).  With strict = false it
 * quietly does nothing when the account has no template or the payment no
 * e-mail, and a template that cannot be filled gives a dead job (with
 * the error) instead of an ERROR.  Returns the job id, or NULL.
 */
CREATE FUNCTION crmpay._enqueue_link_email(payment_id bigint, strict boolean) RETURNS bigint
    LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_payment crmpay.payments;
    v_settings jsonb;
    v_fields jsonb;
    v_row jsonb;
    v_link crmpay.order_links;
    v_ref_column name;
    v_ref_type text;
    v_payload jsonb;
    v_job bigint;
BEGIN
    SELECT * INTO v_payment FROM crmpay.payments p WHERE p.id = payment_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'payment % does not exist', payment_id USING ERRCODE = 'undefined_object';
    END IF;
    SELECT a.settings INTO v_settings FROM crmpay.gateway_accounts a WHERE a.name = v_payment.account;
    IF v_settings->>'email_from' IS NULL
       OR (v_settings->>'email_text' IS NULL AND v_settings->>'email_html' IS NULL) THEN
        IF strict THEN
            RAISE EXCEPTION 'account "%" has no e-mail template', v_payment.account
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Set settings.email_from and settings.email_text and/or settings.email_html with crmpay.update_account().';
        END IF;
        RETURN NULL;
    END IF;
    IF v_payment.email IS NULL OR v_payment.url IS NULL THEN
        IF strict THEN
            RAISE EXCEPTION 'payment % has no %', payment_id,
                            CASE WHEN v_payment.email IS NULL THEN 'customer e-mail address' ELSE 'link yet' END
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        RETURN NULL;
    END IF;

    BEGIN
        -- the CRM's order row, for {{order.COLUMN}}
        SELECT * INTO v_link FROM crmpay.order_links l WHERE l.orders = v_payment.order_table;
        IF FOUND THEN
            SELECT a.attname, format_type(a.atttypid, a.atttypmod) INTO v_ref_column, v_ref_type
              FROM pg_attribute a
             WHERE a.attrelid = v_link.orders AND a.attnum = v_link.order_ref_attnum AND NOT a.attisdropped;
            EXECUTE format('SELECT to_jsonb(o) FROM %s o WHERE o.%I = CAST($1 AS %s) LIMIT 1',
                           v_link.orders, v_ref_column, v_ref_type)
               INTO v_row USING v_payment.order_ref;
        END IF;
        v_fields := jsonb_build_object(
            'order_ref', v_payment.order_ref,
            'amount', (SELECT round(v_payment.amount_minor::numeric / (10::numeric ^ c.exponent), c.exponent)::text
                         FROM crmpay.currencies c WHERE c.code = v_payment.currency),
            'currency', v_payment.currency,
            'url', v_payment.url,
            'description', v_payment.description,
            'email', v_payment.email,
            'account', v_payment.account,
            'expires_at', v_payment.expires_at::text,
            'metadata', v_payment.metadata,
            'order', coalesce(v_row, '{}'));
        v_payload := jsonb_build_object(
            'to', v_payment.email,
            'from', v_settings->>'email_from',
            'from_name', v_settings->>'email_from_name',
            'subject', crmpay._render_template(coalesce(v_settings->>'email_subject',
                                                        'Your payment link for order {{order_ref}}'),
                                               v_fields, false),
            'text', crmpay._render_template(v_settings->>'email_text', v_fields, false),
            'html', crmpay._render_template(v_settings->>'email_html', v_fields, true));
        PERFORM crmpay._check_email_payload(v_payload);
    EXCEPTION WHEN OTHERS THEN
        IF strict THEN
            RAISE;
        END IF;
        INSERT INTO crmpay.jobs (kind, account, payment_id, state, attempts, last_error, finished_at)
        VALUES ('send_email', v_payment.account, v_payment.id, 'dead', 0,
                'could not prepare the e-mail: ' || SQLERRM, now())
        RETURNING id INTO v_job;
        INSERT INTO crmpay.alerts (kind, account, job_id, payment_id, message)
        VALUES ('job_dead', v_payment.account, v_job, v_payment.id,
                format('send_email job %s for account "%s" is dead: could not prepare the e-mail: %s',
                       v_job, v_payment.account, SQLERRM));
        RETURN v_job;
    END;
    INSERT INTO crmpay.jobs (kind, account, payment_id, payload)
    VALUES ('send_email', v_payment.account, v_payment.id, v_payload)
    RETURNING id INTO v_job;
    PERFORM crmpay._wake();
    RETURN v_job;
END
$$;

/* _check_email_payload: refuses addresses and subjects that could inject headers. */
CREATE FUNCTION crmpay._check_email_payload(payload jsonb) RETURNS void
    LANGUAGE c STRICT IMMUTABLE AS 'MODULE_PATHNAME', 'crmpay_check_email_payload';

/*
 * send_link_email: (re)sends a payment's link to its customer now (a
 * send_email job), with the account's template.  Returns the job id.
 */
CREATE FUNCTION crmpay.send_link_email(payment_id bigint) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN crmpay._enqueue_link_email(payment_id, true);
END
$$;

-- ---------------------------------------------------------------------
-- Dead letters
-- ---------------------------------------------------------------------

/* retry_job: queues a dead job again with a fresh set of attempts. */
CREATE FUNCTION crmpay.retry_job(id bigint) RETURNS crmpay.jobs
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job crmpay.jobs;
BEGIN
    SELECT * INTO v_job FROM crmpay.jobs j WHERE j.id = retry_job.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist', id USING ERRCODE = 'undefined_object';
    END IF;
    IF v_job.state <> 'dead' THEN
        RAISE EXCEPTION 'job % is % and not dead', id, v_job.state
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only dead jobs can be retried; the worker retries queued ones by itself.';
    END IF;
    UPDATE crmpay.jobs j
       SET state = 'queued', attempts = 0, run_at = now(), finished_at = NULL, updated_at = now()
     WHERE j.id = retry_job.id
    RETURNING * INTO v_job;
    PERFORM crmpay._wake();
    RETURN v_job;
END
$$;

/* retry_dead: queues every dead job of an account (all accounts for NULL) again. */
CREATE FUNCTION crmpay.retry_dead(account text) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    IF account IS NOT NULL
       AND NOT EXISTS (SELECT FROM crmpay.gateway_accounts a WHERE a.name = retry_dead.account) THEN
        RAISE EXCEPTION 'payment account "%" does not exist', account
            USING ERRCODE = 'undefined_object',
                  HINT = 'crmpay.accounts lists the existing ones; pass NULL for all accounts.';
    END IF;
    UPDATE crmpay.jobs j
       SET state = 'queued', attempts = 0, run_at = now(), finished_at = NULL, updated_at = now()
     WHERE j.state = 'dead' AND (retry_dead.account IS NULL OR j.account = retry_dead.account);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        PERFORM crmpay._wake();
    END IF;
    RETURN v_count;
END
$$;

-- ---------------------------------------------------------------------
-- Health
-- ---------------------------------------------------------------------
CREATE VIEW crmpay.health AS
    SELECT a.name AS account,
           a.provider,
           coalesce(q.queue_depth, 0) AS queue_depth,
           q.oldest_pending_age,
           coalesce(d.dead_jobs, 0) AS dead_jobs,
           coalesce(c.state, 'closed') AS circuit_state,
           coalesce(c.consecutive_failures, 0) AS consecutive_failures,
           c.open_until AS circuit_open_until,
           c.last_error,
           c.last_failure_at AS last_error_at,
           c.last_success_at
      FROM crmpay.gateway_accounts a
      LEFT JOIN (SELECT j.account, count(*) AS queue_depth,
                        now() - min(j.created_at) AS oldest_pending_age
                   FROM crmpay.jobs j WHERE j.state IN ('queued', 'running')
                  GROUP BY j.account) q ON q.account = a.name
      LEFT JOIN (SELECT j.account, count(*) AS dead_jobs
                   FROM crmpay.jobs j WHERE j.state = 'dead'
                  GROUP BY j.account) d ON d.account = a.name
      LEFT JOIN crmpay.circuits c ON c.account = a.name;
COMMENT ON VIEW crmpay.health IS
    'Per account: jobs waiting (queue_depth, oldest_pending_age), dead jobs, circuit state, last error';

-- ---------------------------------------------------------------------
-- Order tables
-- ---------------------------------------------------------------------

/* _order_inserted: the AFTER INSERT trigger link_orders installs (extension/orders.c). */
CREATE FUNCTION crmpay._order_inserted() RETURNS trigger
    LANGUAGE c SECURITY DEFINER AS 'MODULE_PATHNAME', 'crmpay_order_inserted';

/* The caller of a SECURITY DEFINER function: its SET ROLE, else the session user. */
CREATE FUNCTION crmpay._invoker() RETURNS name
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN current_setting('role') = 'none' THEN session_user
            ELSE current_setting('role')::name END;

/*
 * _order_column: the number of a column of a linked table, or NULL for a
 * NULL name; a clear error naming the column when it does not exist.
 */
CREATE FUNCTION crmpay._order_column(orders regclass, column_name text, purpose text,
                                     writable boolean DEFAULT false)
    RETURNS smallint
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_attnum smallint;
    v_category "char";
BEGIN
    IF column_name IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT a.attnum, t.typcategory INTO v_attnum, v_category
      FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
     WHERE a.attrelid = orders AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'column "%" of relation % does not exist', column_name, orders
            USING ERRCODE = 'undefined_column',
                  DETAIL = format('crmpay.link_orders was given "%s" as the %s column.', column_name, purpose),
                  HINT = 'Pass the exact (case-sensitive) name of an existing column of the table.';
    END IF;
    IF writable THEN
        IF v_category <> 'S' THEN
            RAISE EXCEPTION 'column "%" of relation % cannot hold the payment %', column_name, orders, purpose
                USING ERRCODE = 'datatype_mismatch',
                      DETAIL = 'crmpay writes text there.',
                      HINT = 'Use a column of type text or varchar.';
        END IF;
        IF NOT has_column_privilege(crmpay._invoker(), orders, column_name, 'UPDATE') THEN
            RAISE EXCEPTION 'permission denied to write column "%" of relation %', column_name, orders
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('crmpay would write the payment %s there on your behalf.', purpose);
        END IF;
    END IF;
    RETURN v_attnum;
END
$$;

/*
 * link_orders: makes every new row of a CRM table ask for its payment link
 * with no application code.  An AFTER INSERT trigger queues a job with the
 * row's order_ref, amount, currency, email and description (column names
 * given here, checked now); the worker validates the order, creates its
 * payment and link, and writes the URL into url_column and every later
 * status of the payment into status_column (when given).  An invalid
 * order never fails the CRM's insert: its job goes dead with the reason
 * (see crmpay.health and crmpay.alerts).  Calling it again replaces the
 * table's link.  Needs ownership of the table.
 */
CREATE FUNCTION crmpay.link_orders(orders regclass, account text, order_ref text, amount text,
                                   currency text, email text DEFAULT NULL,
                                   description text DEFAULT NULL, url_column text DEFAULT NULL,
                                   status_column text DEFAULT NULL)
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_class pg_class;
    v_ref smallint;
    v_amount smallint;
    v_currency smallint;
    v_email smallint;
    v_description smallint;
    v_url smallint;
    v_status smallint;
BEGIN
    IF orders IS NULL THEN
        RAISE EXCEPTION 'orders must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO v_class FROM pg_class c WHERE c.oid = orders;
    IF v_class.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', orders
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Link the table the CRM inserts its orders into.';
    END IF;
    IF v_class.relnamespace = 'crmpay'::regnamespace THEN
        RAISE EXCEPTION 'crmpay''s own tables cannot be linked' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT pg_has_role(crmpay._invoker(), v_class.relowner, 'USAGE') THEN
        RAISE EXCEPTION 'must be owner of table %', orders
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'link_orders installs a trigger on the table and lets crmpay write to it.';
    END IF;
    IF account IS NULL OR NOT EXISTS (SELECT FROM crmpay.gateway_accounts a WHERE a.name = link_orders.account) THEN
        RAISE EXCEPTION 'payment account "%" does not exist', account
            USING ERRCODE = 'undefined_object',
                  HINT = 'Add it with crmpay.add_account(); crmpay.accounts lists the existing ones.';
    END IF;
    IF order_ref IS NULL OR amount IS NULL OR currency IS NULL THEN
        RAISE EXCEPTION 'the order_ref, amount and currency columns must be given'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_ref := crmpay._order_column(orders, order_ref, 'order_ref');
    v_amount := crmpay._order_column(orders, amount, 'amount');
    v_currency := crmpay._order_column(orders, currency, 'currency');
    v_email := crmpay._order_column(orders, email, 'email');
    v_description := crmpay._order_column(orders, description, 'description');
    v_url := crmpay._order_column(orders, url_column, 'url', true);
    v_status := crmpay._order_column(orders, status_column, 'status', true);
    IF v_url IN (v_ref, v_amount, v_currency, v_email, v_description, v_status)
       OR v_status IN (v_ref, v_amount, v_currency, v_email, v_description) THEN
        RAISE EXCEPTION 'url_column and status_column must be columns of their own'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'crmpay overwrites them; they cannot also be read as order data.';
    END IF;

    IF EXISTS (SELECT FROM pg_trigger t
                WHERE t.tgrelid = orders AND t.tgname = 'crmpay_request_payment_link'
                  AND t.tgfoid <> 'crmpay._order_inserted()'::regprocedure) THEN
        RAISE EXCEPTION 'table % already has a trigger named crmpay_request_payment_link', orders
            USING ERRCODE = 'duplicate_object';
    END IF;
    IF EXISTS (SELECT FROM pg_trigger t
                WHERE t.tgrelid = orders AND t.tgname = 'crmpay_request_payment_link') THEN
        EXECUTE format('DROP TRIGGER crmpay_request_payment_link ON %s', orders);
    END IF;
    EXECUTE format('CREATE TRIGGER crmpay_request_payment_link AFTER INSERT ON %s FOR EACH ROW'
                   ' EXECUTE FUNCTION crmpay._order_inserted(%L, %L, %L, %L, %L, %L)',
                   orders, account, v_ref, v_amount, v_currency,
                   coalesce(v_email, 0), coalesce(v_description, 0));

    INSERT INTO crmpay.order_links AS l
        (orders, account, order_ref_attnum, amount_attnum, currency_attnum, email_attnum,
         description_attnum, url_attnum, status_attnum, linked_by)
    VALUES (orders, account, v_ref, v_amount, v_currency, v_email, v_description, v_url, v_status,
            crmpay._invoker())
    ON CONFLICT ON CONSTRAINT order_links_pkey DO UPDATE
       SET account = excluded.account, order_ref_attnum = excluded.order_ref_attnum,
           amount_attnum = excluded.amount_attnum, currency_attnum = excluded.currency_attnum,
           email_attnum = excluded.email_attnum, description_attnum = excluded.description_attnum,
           url_attnum = excluded.url_attnum, status_attnum = excluded.status_attnum,
           linked_by = excluded.linked_by, linked_at = now();

    IF (v_url IS NOT NULL OR v_status IS NOT NULL)
       AND NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = orders AND i.indkey[0] = v_ref) THEN
        RAISE WARNING 'no index of % starts with its order_ref column "%"', orders, order_ref
            USING HINT = format('crmpay finds the order row to write the link and status into by order_ref; CREATE INDEX ON %s (%I) keeps that fast.',
                                orders, order_ref);
    END IF;
END
$$;

/* unlink_orders: removes link_orders' trigger; payments already asked for carry on. */
CREATE FUNCTION crmpay.unlink_orders(orders regclass) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner oid;
BEGIN
    SELECT c.relowner INTO v_owner FROM pg_class c WHERE c.oid = orders;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'orders must name a table' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT pg_has_role(crmpay._invoker(), v_owner, 'USAGE') THEN
        RAISE EXCEPTION 'must be owner of table %', orders USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM crmpay.order_links l WHERE l.orders = unlink_orders.orders;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not linked to crmpay', orders
            USING ERRCODE = 'undefined_object',
                  HINT = 'crmpay.linked_orders lists the linked tables.';
    END IF;
    IF EXISTS (SELECT FROM pg_trigger t
                WHERE t.tgrelid = orders AND t.tgname = 'crmpay_request_payment_link') THEN
        EXECUTE format('DROP TRIGGER crmpay_request_payment_link ON %s', orders);
    END IF;
END
$$;


-- ---------------------------------------------------------------------
-- Privileges of this part (99_privileges.sql revokes PUBLIC's)
-- ---------------------------------------------------------------------
GRANT EXECUTE ON FUNCTION
    crmpay.request_payment_link(text, text, numeric, text, text, text, jsonb),
    crmpay.send_link_email(bigint)
    TO crmpay_app;
GRANT SELECT ON crmpay.jobs, crmpay.circuits, crmpay.alerts, crmpay.health,
                crmpay.order_links, crmpay.linked_orders TO crmpay_admin;
GRANT EXECUTE ON FUNCTION
    crmpay.retry_job(bigint),
    crmpay.retry_dead(text),
    crmpay.link_orders(regclass, text, text, text, text, text, text, text, text),
    crmpay.unlink_orders(regclass)
    TO crmpay_admin;
