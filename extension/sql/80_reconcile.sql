-- ---------------------------------------------------------------------
-- Reconciliation: what the gateways took against crmpay.payments
-- (extension/reconcile.c fetches and parses; matching is set-based here)
-- ---------------------------------------------------------------------

-- payments of an account by creation time: the window a run checks.
-- created_at never changes, so status updates stay HOT.
CREATE INDEX payments_account_created ON crmpay.payments (account, created_at);

/*
 * One row per reconciliation run.  status 'running' is committed only by
 * step-by-step runs (crmpay.reconcile_in_steps, the worker); a run of
 * crmpay.reconcile() lives in its caller's transaction.  counts holds the
 * discrepancies per kind, totals the gateway's money per currency.
 */
CREATE TABLE crmpay.reconciliation_runs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account          text NOT NULL REFERENCES crmpay.gateway_accounts (name),
    provider         text NOT NULL,
    window_start     timestamptz NOT NULL,
    window_end       timestamptz NOT NULL,
    margin           interval NOT NULL,
    match_on         text NOT NULL CHECK (match_on IN ('order_ref', 'gateway_ref', 'gateway_payment_ref')),
    heal             boolean NOT NULL,
    mode             text NOT NULL CHECK (mode IN ('sync', 'stepwise')),
    sources          text[] NOT NULL DEFAULT '{}',
    schedule_id      bigint,
    status           text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed')),
    phase            text NOT NULL DEFAULT 'starting',
    pid              integer NOT NULL DEFAULT pg_backend_pid(),
    started_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at      timestamptz,
    pages_fetched    integer NOT NULL DEFAULT 0,
    records_loaded   bigint NOT NULL DEFAULT 0,
    records_matched  bigint NOT NULL DEFAULT 0,
    payments_checked bigint NOT NULL DEFAULT 0,
    discrepancies    bigint NOT NULL DEFAULT 0,
    healed           bigint NOT NULL DEFAULT 0,
    counts           jsonb NOT NULL DEFAULT '{}',
    totals           jsonb NOT NULL DEFAULT '{}',
    fetch_state      jsonb,
    error            text,
    error_detail     text,
    error_hint       text,
    error_sqlstate   text,
    error_context    text,
    CHECK (window_end > window_start)
);
-- one running run per account (the backstop; _reconcile_begin says it nicely)
CREATE UNIQUE INDEX reconciliation_runs_one_running ON crmpay.reconciliation_runs (account)
    WHERE status = 'running';
CREATE INDEX reconciliation_runs_account ON crmpay.reconciliation_runs (account, started_at);
COMMENT ON TABLE crmpay.reconciliation_runs IS
    'Reconciliation runs: window, sources, counts, totals per currency, outcome';

CREATE TABLE crmpay.reconciliation_items (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id               bigint NOT NULL REFERENCES crmpay.reconciliation_runs ON DELETE CASCADE,
    kind                 text NOT NULL CHECK (kind IN ('missing_in_crm', 'missing_at_gateway',
                                                       'amount_mismatch', 'currency_mismatch',
                                                       'status_mismatch', 'duplicate_payment',
                                                       'refunded_at_gateway')),
    payment_id           bigint,
    order_ref            text,
    gateway_ref          text,
    crm_amount_minor     bigint,
    gateway_amount_minor bigint,
    crm_currency         text,
    gateway_currency     text,
    crm_status           text,
    gateway_status       text,
    detail               text NOT NULL,
    evidence             jsonb NOT NULL DEFAULT '{}',
    heal_action          text CHECK (heal_action IN ('paid', 'refund')),
    healed               boolean NOT NULL DEFAULT false,
    changes              jsonb
);
CREATE INDEX reconciliation_items_run ON crmpay.reconciliation_items (run_id, kind);
CREATE INDEX reconciliation_items_payment ON crmpay.reconciliation_items (payment_id)
    WHERE payment_id IS NOT NULL;
COMMENT ON TABLE crmpay.reconciliation_items IS
    'Discrepancies found by reconciliation runs; healed ones say what changed';

/*
 * Imported gateway reports (crmpay.import_report, crmpay.fetch_report).
 * Their records stay in crmpay.gateway_records and serve every run whose
 * window they cover.
 */
CREATE TABLE crmpay.report_imports (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account     text NOT NULL REFERENCES crmpay.gateway_accounts (name),
    format      text NOT NULL,
    source      text NOT NULL,
    imported_at timestamptz NOT NULL DEFAULT now(),
    imported_by text NOT NULL DEFAULT session_user,
    lines       integer NOT NULL,
    records     integer NOT NULL,
    duplicates  integer NOT NULL,
    first_at    timestamptz,
    last_at     timestamptz,
    sha256      text NOT NULL
);
CREATE INDEX report_imports_account ON crmpay.report_imports (account, first_at);

/*
 * Gateway records: fetched by a run (run_id) or imported from a report
 * (import_id).  Each is one line of the report or one object of a list
 * (see CrmpayGatewayRecord in provider.h).
 */
CREATE TABLE crmpay.gateway_records (
    run_id              bigint,
    import_id           bigint,
    account             text NOT NULL,
    line_no             integer,
    record_type         text NOT NULL CHECK (record_type IN ('link', 'charge', 'refund', 'chargeback',
                                                             'balance', 'other')),
    record_ref          text,
    match_key           text,
    order_ref           text,
    gateway_ref         text,
    gateway_payment_ref text,
    status              text,
    gateway_status      text,
    amount_minor        bigint,
    currency            text,
    refunded_minor      bigint,
    fin_currency        text,
    fin_amount_minor    bigint,
    fee_minor           bigint,
    net_minor           bigint,
    occurred_at         timestamptz,
    CHECK ((run_id IS NULL) <> (import_id IS NULL))
);
-- a run's records, and an order's records (per-order queries skip orders
-- another source already reported; people look orders up)
CREATE INDEX gateway_records_run ON crmpay.gateway_records (run_id, match_key) WHERE run_id IS NOT NULL;
CREATE INDEX gateway_records_report_key ON crmpay.gateway_records (account, match_key)
    WHERE import_id IS NOT NULL;
CREATE INDEX gateway_records_report ON crmpay.gateway_records (account, occurred_at)
    WHERE import_id IS NOT NULL;
-- a report line imported twice (overlapping exports) counts once
CREATE UNIQUE INDEX gateway_records_report_once ON crmpay.gateway_records (account, record_ref)
    WHERE import_id IS NOT NULL;
CREATE INDEX gateway_records_import ON crmpay.gateway_records (import_id) WHERE import_id IS NOT NULL;
COMMENT ON TABLE crmpay.gateway_records IS
    'Gateway records fetched by reconciliation runs or imported from reports, normalised';

CREATE TABLE crmpay.reconciliation_schedules (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account       text NOT NULL UNIQUE REFERENCES crmpay.gateway_accounts (name) ON DELETE CASCADE,
    every         interval NOT NULL CHECK (every >= interval '1 minute'),
    window_length interval NOT NULL CHECK (window_length > interval '0'),
    lag           interval NOT NULL DEFAULT '0' CHECK (lag >= interval '0'),
    heal          boolean NOT NULL DEFAULT true,
    enabled       boolean NOT NULL DEFAULT true,
    next_run_at   timestamptz NOT NULL,
    last_run_id   bigint,
    last_run_at   timestamptz,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE crmpay.reconciliation_schedules IS
    'Reconciliations run by crmpay.run_due_reconciliations() (the worker, or pg_cron)';

SELECT pg_catalog.pg_extension_config_dump('crmpay.reconciliation_runs', '');
SELECT pg_catalog.pg_extension_config_dump('crmpay.reconciliation_items', '');
SELECT pg_catalog.pg_extension_config_dump('crmpay.report_imports', '');
SELECT pg_catalog.pg_extension_config_dump('crmpay.gateway_records', '');
SELECT pg_catalog.pg_extension_config_dump('crmpay.reconciliation_schedules', '');

-- ---------------------------------------------------------------------
-- C parts (extension/reconcile.c, extension/reports.c)
-- ---------------------------------------------------------------------

/* What a run of this account reads: {list}, {orders}, both, or {} (reports only). */
CREATE FUNCTION crmpay._reconcile_sources(account text) RETURNS text[]
    LANGUAGE c STRICT STABLE AS 'MODULE_PATHNAME', 'crmpay_reconcile_sources';

/* Fetches every page of the run's gateway records, in this transaction. */
CREATE FUNCTION crmpay._reconcile_fetch(run_id bigint) RETURNS void
    LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'crmpay_reconcile_fetch';

/* Sets this backend's progress slot (phase, counters); NULL leaves one as is. */
CREATE FUNCTION crmpay._reconcile_report(run_id bigint, phase text, records_matched bigint DEFAULT NULL,
                                         discrepancies bigint DEFAULT NULL, healed bigint DEFAULT NULL)
    RETURNS void
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'crmpay_reconcile_report';

/* Pages fetched and records loaded so far by this backend for the run. */
CREATE FUNCTION crmpay._reconcile_counters(run_id bigint, OUT pages_fetched integer, OUT records_loaded bigint)
    LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'crmpay_reconcile_counters';

/*
 * reconciliation_live_progress: every backend's running reconciliation,
 * from shared memory (empty when crmpay is not preloaded); the function
 * behind the view crmpay.reconciliation_progress.
 */
CREATE FUNCTION crmpay.reconciliation_live_progress(
    OUT pid integer, OUT run_id bigint, OUT account text, OUT phase text,
    OUT pages_fetched integer, OUT records_loaded bigint, OUT records_matched bigint,
    OUT discrepancies bigint, OUT healed bigint, OUT started_at timestamptz, OUT updated_at timestamptz)
    RETURNS SETOF record
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'crmpay_reconcile_progress';

/* Parses a report and stores its records; returns the import id. */
CREATE FUNCTION crmpay._import_report(account text, format text, content text, source text)
    RETURNS bigint
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'crmpay_import_report';

/* Runs the due schedules step by step in a one-off background worker; returns its pid. */
CREATE FUNCTION crmpay._run_due_reconciliations_in_background(wait boolean DEFAULT false) RETURNS integer
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'crmpay_run_due_in_background';

/* Downloads a report with the account's report credentials. */
CREATE FUNCTION crmpay._download_report(account text, url text) RETURNS text
    LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'crmpay_download_report';

-- ---------------------------------------------------------------------
-- Matching (set-based)
-- ---------------------------------------------------------------------

/* The per-order view of the gateway records: one row per match key. */
CREATE TYPE crmpay._recon_key AS (
    match_key          text,
    records            integer,
    first_line         integer,
    order_ref          text,
    gateway_ref        text,
    gateway_payment_ref text,
    link_status        text,
    link_amount_minor  bigint,
    charge_status      text,
    paid_count         integer,
    paid_min_minor     bigint,
    paid_max_minor     bigint,
    paid_total_minor   bigint,
    paid_first_ref     text,
    paid_last_ref      text,
    paid_at            timestamptz,
    refunded_minor     bigint,
    refund_known       boolean,
    disputed           boolean,
    currency_min       text,
    currency_max       text,
    in_window          boolean,
    payment_id         bigint,
    order_ref_is_key   boolean     -- order_ref is match_key (not repeated)
);

/*
 * _recon_candidates: the run's gateway records (fetched, and imported
 * reports' records between lo and hi) and the account's payments created
 * between lo and hi, grouped by the match key in one hash table (a full
 * outer join of the two in one pass, extension/reconcile_match.c); returns
 * the orders that are not plainly clean, each with its gateway view.  Also
 * counts, for _recon_stats(), what it read.
 */
CREATE FUNCTION crmpay._recon_candidates(run_id bigint, account text, since timestamptz, until timestamptz,
                                         lo timestamptz, hi timestamptz, match_on text)
    RETURNS SETOF crmpay._recon_key
    LANGUAGE c VOLATILE STRICT ROWS 1000 AS 'MODULE_PATHNAME', 'crmpay_recon_candidates';
CREATE FUNCTION crmpay._recon_stats(OUT loaded bigint, OUT keyed bigint, OUT payments_checked bigint,
                                    OUT totals jsonb)
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'crmpay_recon_stats';

/*
 * _recon_classify: the discrepancies of one candidate (a match key, its
 * payment, or both), with the safe fix when there is one.  Only the few
 * rows the set-based pass could not pass as clean get here.
 */
CREATE FUNCTION crmpay._recon_classify(match_key text, k crmpay._recon_key, p crmpay.payments,
                                       window_start timestamptz, window_end timestamptz,
                                       match_on text)
    RETURNS TABLE (kind text, heal_action text, gateway_status text,
                   gateway_amount_minor bigint, gateway_currency text, detail text, evidence jsonb)
    LANGUAGE plpgsql STABLE ROWS 1
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    money_statuses CONSTANT text[] := '{paid,partially_refunded,refunded,disputed}';
    v_money_g boolean;
    v_money_crm boolean;
    v_status text;
    v_amount bigint;
    v_currency text;
    v_cur_bad boolean := false;
    v_amt_bad boolean := false;
    v_ok boolean;
    v_refs text;
    v_ev jsonb;
BEGIN
    k.match_key := match_key;
    IF k.order_ref_is_key THEN
        k.order_ref := match_key;
    END IF;
    IF coalesce(k.records, 0) > 0 THEN
        v_money_g := k.paid_count > 0 OR k.link_status = 'paid' OR k.refunded_minor > 0 OR k.disputed;
        v_amount := CASE WHEN k.paid_count > 0 THEN k.paid_max_minor ELSE k.link_amount_minor END;
        v_currency := k.currency_max;
        IF v_money_g THEN
            v_status := CASE WHEN k.disputed THEN 'disputed'
                             WHEN k.refunded_minor > 0
                                  AND k.refunded_minor >= coalesce(p.amount_minor, v_amount, k.refunded_minor) THEN 'refunded'
                             WHEN k.refunded_minor > 0 THEN 'partially_refunded'
                             ELSE 'paid' END;
        ELSIF k.charge_status = 'processing' AND coalesce(k.link_status, 'open') IN ('open', 'processing') THEN
            v_status := 'processing';
        ELSE
            v_status := coalesce(k.link_status, k.charge_status);
        END IF;
        v_refs := concat_ws(', ', k.paid_first_ref, nullif(k.paid_last_ref, k.paid_first_ref));
        v_ev := jsonb_strip_nulls(jsonb_build_object(
            'match_key', k.match_key, 'records', k.records, 'first_line', k.first_line,
            'gateway_ref', k.gateway_ref, 'gateway_payment_ref', k.gateway_payment_ref,
            'link_status', k.link_status, 'charge_status', k.charge_status,
            'successful_charges', k.paid_count, 'charges', nullif(v_refs, ''),
            'refunded_minor', nullif(k.refunded_minor, 0), 'disputed', nullif(k.disputed, false),
            'paid_at', k.paid_at));
    END IF;

    -- gateway only
    IF p.id IS NULL THEN
        IF k.in_window AND v_money_g THEN
            RETURN QUERY SELECT 'missing_in_crm', NULL::text, v_status, v_amount, v_currency,
                format('The gateway took %s %s for %s "%s"%s, but no CRM payment has that %s.',
                       coalesce(k.paid_total_minor, v_amount), coalesce(v_currency, '?'), match_on, k.match_key,
                       CASE WHEN v_refs <> '' THEN ' (' || v_refs || ')' ELSE '' END, match_on),
                v_ev;
        END IF;
        RETURN;
    END IF;
    v_money_crm := p.status = ANY (money_statuses);

    -- CRM only
    IF coalesce(k.records, 0) = 0 THEN
        IF v_money_crm AND p.created_at >= window_start AND p.created_at < window_end THEN
            RETURN QUERY SELECT 'missing_at_gateway', NULL::text, NULL::text, NULL::bigint, NULL::text,
                format('The CRM has order %s as %s, but the gateway reported nothing for it between %s and %s.',
                       p.order_ref, p.status, window_start, window_end),
                jsonb_build_object('match_key', CASE match_on WHEN 'order_ref' THEN p.order_ref
                                                              WHEN 'gateway_ref' THEN p.gateway_ref
                                                              ELSE p.gateway_payment_ref END);
        END IF;
        RETURN;
    END IF;

    -- both
    IF k.currency_min IS NOT NULL AND (k.currency_min <> p.currency OR k.currency_max <> p.currency) THEN
        v_cur_bad := true;
        RETURN QUERY SELECT 'currency_mismatch', NULL::text, v_status, v_amount, v_currency,
            format('The CRM expects %s for order %s; the gateway recorded %s.', p.currency, p.order_ref,
                   CASE WHEN k.currency_min = k.currency_max THEN k.currency_min
                        ELSE k.currency_min || ' and ' || k.currency_max END),
            v_ev;
    END IF;
    IF NOT v_cur_bad AND v_amount IS NOT NULL
       AND (CASE WHEN k.paid_count > 0 THEN k.paid_min_minor <> p.amount_minor OR k.paid_max_minor <> p.amount_minor
                 ELSE k.link_amount_minor <> p.amount_minor END) THEN
        v_amt_bad := true;
        RETURN QUERY SELECT 'amount_mismatch', NULL::text, v_status, v_amount, v_currency,
            format('The CRM expects %s %s for order %s; the gateway %s %s %s.', p.amount_minor, p.currency,
                   p.order_ref, CASE WHEN k.paid_count > 0 THEN 'took' ELSE 'asks for' END,
                   CASE WHEN k.paid_min_minor <> k.paid_max_minor THEN k.paid_min_minor || '..' || k.paid_max_minor
                        ELSE v_amount::text END, v_currency),
            v_ev;
    END IF;
    v_ok := NOT v_cur_bad AND NOT v_amt_bad;
    IF k.paid_count > 1 THEN
        RETURN QUERY SELECT 'duplicate_payment', NULL::text, v_status, k.paid_total_minor, v_currency,
            format('%s successful charges (%s) for order %s, %s %s in all; the order is for %s %s.',
                   k.paid_count, v_refs, p.order_ref, k.paid_total_minor, v_currency, p.amount_minor, p.currency),
            v_ev;
    END IF;

    IF v_money_g AND NOT v_money_crm THEN
        RETURN QUERY SELECT 'status_mismatch', CASE WHEN v_ok THEN 'paid' END, v_status, v_amount, v_currency,
            format('The gateway took the money for order %s (%s) but the CRM has it %s: a lost webhook.%s',
                   p.order_ref, coalesce(nullif(v_refs, ''), k.gateway_ref, k.match_key), p.status,
                   CASE WHEN NOT v_ok THEN ' Not healed automatically: the amount or currency differs.' ELSE '' END),
            v_ev || jsonb_strip_nulls(jsonb_build_object('heal_gateway_payment_ref',
                                                         coalesce(k.gateway_payment_ref, k.paid_first_ref),
                                                         'heal_at', k.paid_at));
        IF k.refunded_minor > p.refunded_minor THEN
            RETURN QUERY SELECT 'refunded_at_gateway', CASE WHEN v_ok THEN 'refund' END, v_status, v_amount, v_currency,
                format('The gateway refunded %s %s of order %s; the CRM records %s.', k.refunded_minor, v_currency,
                       p.order_ref, p.refunded_minor),
                v_ev || jsonb_build_object('heal_refunded_minor', k.refunded_minor);
        END IF;
    ELSIF v_money_g AND v_money_crm THEN
        IF k.refunded_minor > p.refunded_minor THEN
            RETURN QUERY SELECT 'refunded_at_gateway', CASE WHEN v_ok THEN 'refund' END, v_status, v_amount, v_currency,
                format('The gateway refunded %s %s of order %s; the CRM records %s.', k.refunded_minor, v_currency,
                       p.order_ref, p.refunded_minor),
                v_ev || jsonb_build_object('heal_refunded_minor', k.refunded_minor);
        ELSIF k.refund_known AND p.refunded_minor > k.refunded_minor THEN
            RETURN QUERY SELECT 'status_mismatch', NULL::text, v_status, v_amount, v_currency,
                format('The CRM records %s %s refunded for order %s; the gateway only %s.', p.refunded_minor,
                       p.currency, p.order_ref, k.refunded_minor),
                v_ev;
        END IF;
        IF k.disputed AND p.status NOT IN ('disputed', 'refunded') THEN
            RETURN QUERY SELECT 'status_mismatch', NULL::text, v_status, v_amount, v_currency,
                format('The gateway has a dispute or chargeback on order %s; the CRM has it %s.', p.order_ref, p.status),
                v_ev;
        END IF;
    ELSIF v_money_crm THEN
        RETURN QUERY SELECT 'status_mismatch', NULL::text, v_status, v_amount, v_currency,
            format('The CRM has order %s as %s, but the gateway took no money for it (%s).', p.order_ref, p.status,
                   coalesce(v_status, 'no status')),
            v_ev;
    ELSIF v_status IS NOT NULL AND v_status <> p.status
          AND NOT (p.status IN ('open', 'link_pending', 'failed') AND v_status IN ('open', 'failed')) THEN
        RETURN QUERY SELECT 'status_mismatch', NULL::text, v_status, v_amount, v_currency,
            format('The gateway has order %s as %s; the CRM has it %s.', p.order_ref, v_status, p.status),
            v_ev;
    END IF;
END
$$;

/*
 * _reconcile_match: the set-based pass.  The run's gateway records (and
 * imported report records of its window) and the account's payments of the
 * window go through one hash table keyed on the match key
 * (_recon_candidates, in C): like a FULL OUTER JOIN, it gives both sides of
 * every order, and it folds each order's records into its gateway view,
 * passing over the plainly clean ones (normally over 99 %).  The few others
 * get their payment (by id, or, for a payment created before the window, by
 * the key's index), are classified (_recon_classify) and stored as items.
 * Records, payments and money per currency are counted on the way.
 */
CREATE FUNCTION crmpay._reconcile_match(run_id bigint) RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r crmpay.reconciliation_runs;
    v_col text;
    v_lo timestamptz;
    v_hi timestamptz;
    v_unmatched bigint;
    v_counts jsonb;
    v_discrepancies bigint;
    v_keyed bigint;
    v_loaded bigint;
    v_checked bigint;
    v_totals jsonb;
    v_work_mem text := current_setting('work_mem');
    v_jit text := current_setting('jit');
BEGIN
    SELECT * INTO STRICT r FROM crmpay.reconciliation_runs WHERE id = _reconcile_match.run_id;
    UPDATE crmpay.reconciliation_runs SET phase = 'matching', heartbeat_at = clock_timestamp()
     WHERE id = r.id;
    PERFORM crmpay._reconcile_report(r.id, 'matching');
    -- a fixed whitelist: the column name never comes from the caller
    v_col := CASE r.match_on WHEN 'order_ref' THEN 'order_ref' WHEN 'gateway_ref' THEN 'gateway_ref'
                             WHEN 'gateway_payment_ref' THEN 'gateway_payment_ref' END;
    v_lo := r.window_start - r.margin;
    v_hi := r.window_end + r.margin;
    -- the hash table's memory (times hash_mem_multiplier, as for a hash join)
    PERFORM set_config('work_mem', current_setting('crmpay.reconcile_work_mem'), true);
    -- statements run once: compiling them (JIT) costs more than it saves
    PERFORM set_config('jit', 'off', true);

    EXECUTE format($q$
    WITH c AS MATERIALIZED (
        SELECT k.match_key AS key, k
          FROM crmpay._recon_candidates($1, $2, $3, $4, $5, $6, $8) k
    ), m AS MATERIALIZED (
        -- the payment, or (a record of a payment created outside the window)
        -- the one with that key anywhere, by its index
        SELECT c.key, c.k, pp.q AS pay
          FROM c
          LEFT JOIN LATERAL (
                SELECT q FROM crmpay.payments q WHERE q.id = (c.k).payment_id
                UNION ALL
                SELECT q FROM crmpay.payments q
                 WHERE (c.k).payment_id IS NULL AND q.account = $2 AND q.%1$I = c.key
                LIMIT 1) pp ON true
    ), ins AS (
        INSERT INTO crmpay.reconciliation_items
            (run_id, kind, payment_id, order_ref, gateway_ref, crm_amount_minor, gateway_amount_minor,
             crm_currency, gateway_currency, crm_status, gateway_status, detail, evidence, heal_action)
        SELECT $1, d.kind, (m.pay).id,
               coalesce((m.pay).order_ref, (m.k).order_ref, CASE WHEN (m.k).order_ref_is_key THEN m.key END),
               coalesce((m.k).gateway_payment_ref, (m.k).gateway_ref, (m.k).paid_first_ref, (m.pay).gateway_ref),
               (m.pay).amount_minor, d.gateway_amount_minor, (m.pay).currency, d.gateway_currency,
               (m.pay).status, d.gateway_status, d.detail, d.evidence,
               CASE WHEN $7 THEN d.heal_action END
          FROM m CROSS JOIN LATERAL crmpay._recon_classify(m.key, m.k, m.pay, $3, $4, $8) d
        RETURNING kind
    )
    SELECT (SELECT coalesce(sum((m.k).records), 0) FROM m WHERE m.pay IS NULL),
           (SELECT coalesce(jsonb_object_agg(i.kind, i.n), '{}')
              FROM (SELECT ins.kind, count(*) AS n FROM ins GROUP BY ins.kind) i)
    $q$, v_col)
    INTO v_unmatched, v_counts
    USING r.id, r.account, r.window_start, r.window_end, v_lo, v_hi, r.heal, r.match_on;

    SELECT st.loaded, st.keyed, st.payments_checked, st.totals INTO v_loaded, v_keyed, v_checked, v_totals
      FROM crmpay._recon_stats() st;
    v_discrepancies := (SELECT coalesce(sum(value::bigint), 0) FROM jsonb_each_text(v_counts));

    PERFORM set_config('work_mem', v_work_mem, true);
    PERFORM set_config('jit', v_jit, true);
    UPDATE crmpay.reconciliation_runs
       SET records_loaded = v_loaded, records_matched = v_keyed - v_unmatched,
           payments_checked = v_checked, counts = v_counts, totals = v_totals,
           discrepancies = v_discrepancies, heartbeat_at = clock_timestamp()
     WHERE id = r.id;
    PERFORM crmpay._reconcile_report(r.id, 'matched', v_keyed - v_unmatched, v_discrepancies);
END
$$;

-- ---------------------------------------------------------------------
-- Healing: the safe fixes, through the payment state machine
-- ---------------------------------------------------------------------

/*
 * _reconcile_heal: applies the items' safe fixes (a missed success, a
 * missed refund) one payment at a time, as a webhook would: the payment
 * row is locked first, so a webhook arriving meanwhile is either applied
 * before (and the fix is skipped) or waits and then finds the payment
 * already moved.  Nothing moves backwards, nothing is deleted; each fix is
 * recorded in crmpay.events (event_type crmpay.reconcile.heal, http_status
 * 0) and on the item (healed, changes).
 */
CREATE FUNCTION crmpay._reconcile_heal(run_id bigint) RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r crmpay.reconciliation_runs;
    it crmpay.reconciliation_items;
    v_before crmpay.payments;
    v_after crmpay.payments;
    v_target bigint;
    v_new text;
    v_event bigint;
    v_healed bigint := 0;
    v_why text;
BEGIN
    SELECT * INTO STRICT r FROM crmpay.reconciliation_runs WHERE id = _reconcile_heal.run_id;
    IF NOT r.heal THEN
        RETURN 0;
    END IF;
    UPDATE crmpay.reconciliation_runs SET phase = 'healing', heartbeat_at = clock_timestamp() WHERE id = r.id;
    PERFORM crmpay._reconcile_report(r.id, 'healing');
    FOR it IN
        SELECT * FROM crmpay.reconciliation_items i
         WHERE i.run_id = r.id AND i.heal_action IS NOT NULL
         ORDER BY i.payment_id, CASE i.heal_action WHEN 'paid' THEN 1 ELSE 2 END, i.id
    LOOP
        -- the latest committed state, under the row lock webhooks take too
        SELECT * INTO v_before FROM crmpay.payments p WHERE p.id = it.payment_id FOR UPDATE;
        v_why := NULL;
        IF it.heal_action = 'paid' THEN
            IF v_before.status NOT IN ('link_pending', 'open', 'processing', 'failed', 'expired', 'canceled') THEN
                v_why := format('the payment was already %s when healing came to it', v_before.status);
            ELSE
                PERFORM crmpay._apply_status(it.payment_id, 'paid', it.evidence->>'heal_gateway_payment_ref', NULL,
                                             coalesce((it.evidence->>'heal_at')::timestamptz, now()));
            END IF;
        ELSE
            v_target := (it.evidence->>'heal_refunded_minor')::bigint;
            IF v_before.refunded_minor >= v_target THEN
                v_why := format('the payment already had %s refunded when healing came to it', v_before.refunded_minor);
            ELSIF v_before.status NOT IN ('paid', 'partially_refunded', 'refunded', 'disputed') THEN
                v_why := format('the payment is %s, so a refund cannot apply', v_before.status);
            ELSE
                v_new := CASE WHEN v_target >= v_before.amount_minor THEN 'refunded' ELSE 'partially_refunded' END;
                PERFORM crmpay._apply_status(it.payment_id, v_new, NULL, v_target, now());
            END IF;
        END IF;
        SELECT * INTO v_after FROM crmpay.payments p WHERE p.id = it.payment_id;
        IF v_why IS NULL AND v_after.status = v_before.status AND v_after.refunded_minor = v_before.refunded_minor THEN
            v_why := format('the state machine does not move a %s payment that way', v_before.status);
        END IF;
        IF v_why IS NOT NULL THEN
            UPDATE crmpay.reconciliation_items i
               SET detail = i.detail || ' Not healed: ' || v_why || '.'
             WHERE i.id = it.id;
            CONTINUE;
        END IF;
        INSERT INTO crmpay.events (account, provider, event_key, event_type, payment_id, outcome, reason,
                                   old_status, new_status, http_status)
        VALUES (r.account, r.provider, format('crmpay-reconcile:%s:%s', r.id, it.id), 'crmpay.reconcile.heal',
                it.payment_id, 'applied', format('reconciliation run %s: %s', r.id, it.kind),
                v_before.status, v_after.status, 0)
        RETURNING id INTO v_event;
        UPDATE crmpay.reconciliation_items i
           SET healed = true,
               changes = jsonb_strip_nulls(jsonb_build_object(
                   'status', CASE WHEN v_after.status <> v_before.status
                                  THEN jsonb_build_array(v_before.status, v_after.status) END,
                   'refunded_minor', CASE WHEN v_after.refunded_minor <> v_before.refunded_minor
                                          THEN jsonb_build_array(v_before.refunded_minor, v_after.refunded_minor) END,
                   'gateway_payment_ref', CASE WHEN v_after.gateway_payment_ref IS DISTINCT FROM v_before.gateway_payment_ref
                                               THEN v_after.gateway_payment_ref END,
                   'event_id', v_event)),
               detail = i.detail || format(' Healed: %s.',
                   concat_ws(', ',
                       CASE WHEN v_after.status <> v_before.status
                            THEN format('status %s -> %s', v_before.status, v_after.status) END,
                       CASE WHEN v_after.refunded_minor <> v_before.refunded_minor
                            THEN format('refunded %s -> %s', v_before.refunded_minor, v_after.refunded_minor) END))
         WHERE i.id = it.id;
        v_healed := v_healed + 1;
        PERFORM crmpay._reconcile_report(r.id, 'healing', NULL, NULL, v_healed);
    END LOOP;
    UPDATE crmpay.reconciliation_runs SET healed = v_healed WHERE id = r.id;
    RETURN v_healed;
END
$$;

-- ---------------------------------------------------------------------
-- Run lifecycle
-- ---------------------------------------------------------------------

/* _reconcile_begin: checks the request, records the run (status running). */
CREATE FUNCTION crmpay._reconcile_begin(account text, since timestamptz, until timestamptz, heal boolean,
                                        mode text, schedule_id bigint)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a crmpay.gateway_accounts;
    v_match text;
    v_sources text[];
    v_running bigint;
    v_run bigint;
BEGIN
    IF account IS NULL THEN
        RAISE EXCEPTION 'account must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO a FROM crmpay.gateway_accounts g WHERE g.name = _reconcile_begin.account;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'payment account "%" does not exist', account
            USING ERRCODE = 'undefined_object',
                  HINT = 'crmpay.accounts lists the existing accounts.';
    END IF;
    IF since IS NULL OR until IS NULL OR heal IS NULL THEN
        RAISE EXCEPTION 'since, until and heal must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF since >= until OR since = '-infinity' OR until = 'infinity' THEN
        RAISE EXCEPTION 'the reconciliation window must be a finite, non-empty time range'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('since = %s, until = %s.', since, until);
    END IF;
    IF until - since > interval '366 days' THEN
        RAISE EXCEPTION 'the reconciliation window is longer than 366 days'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('since = %s, until = %s.', since, until),
                  HINT = 'Reconcile a long period as several runs, one window at a time.';
    END IF;

    v_match := coalesce(a.settings->>'reconcile_match_on',
                        CASE a.provider WHEN 'redsys' THEN 'gateway_ref' ELSE 'order_ref' END);
    IF v_match NOT IN ('order_ref', 'gateway_ref', 'gateway_payment_ref') THEN
        RAISE EXCEPTION 'invalid settings.reconcile_match_on "%" of account "%"', v_match, account
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use order_ref, gateway_ref or gateway_payment_ref: the payments column the gateway''s references are in.';
    END IF;
    v_sources := crmpay._reconcile_sources(account);
    IF EXISTS (SELECT FROM crmpay.report_imports i
                WHERE i.account = _reconcile_begin.account AND i.first_at < until AND i.last_at >= since) THEN
        v_sources := v_sources || 'reports'::text;
    END IF;
    IF cardinality(v_sources) = 0 THEN
        RAISE EXCEPTION 'nothing tells what gateway "%" took between % and %', a.provider, since, until
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('crmpay cannot list %s records through its API, and no imported report covers the window.', a.provider),
                  HINT = 'Import the gateway''s report for the period first: crmpay.import_report(account, format, content) or crmpay.fetch_report(account, url).';
    END IF;

    -- a step-by-step run whose backend is gone is abandoned
    UPDATE crmpay.reconciliation_runs r
       SET status = 'failed', phase = 'failed', finished_at = clock_timestamp(),
           error = 'abandoned: the session running it ended before it finished'
     WHERE r.account = _reconcile_begin.account AND r.status = 'running'
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_stat_activity s WHERE s.pid = r.pid);
    DELETE FROM crmpay.gateway_records g
     WHERE g.run_id IN (SELECT r.id FROM crmpay.reconciliation_runs r
                         WHERE r.account = _reconcile_begin.account AND r.status = 'failed'
                           AND r.error LIKE 'abandoned:%')
       AND g.run_id IS NOT NULL;
    SELECT r.id INTO v_running FROM crmpay.reconciliation_runs r
     WHERE r.account = _reconcile_begin.account AND r.status = 'running';
    IF FOUND THEN
        RAISE EXCEPTION 'a reconciliation of account "%" is already running (run %)', account, v_running
            USING ERRCODE = 'object_in_use',
                  HINT = 'crmpay.reconciliation_progress shows how far it is; runs of one account do not overlap.';
    END IF;

    INSERT INTO crmpay.reconciliation_runs AS r
        (account, provider, window_start, window_end, margin, match_on, heal, mode, sources, schedule_id)
    VALUES (account, a.provider, since, until,
            current_setting('crmpay.reconcile_margin')::interval,
            v_match, heal, mode, v_sources, schedule_id)
    RETURNING r.id INTO v_run;
    PERFORM crmpay._reconcile_report(v_run, 'starting');
    RETURN v_run;
END
$$;

CREATE FUNCTION crmpay._reconcile_finish(run_id bigint) RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE crmpay.reconciliation_runs r
       SET status = 'succeeded', phase = 'done', finished_at = clock_timestamp(),
           heartbeat_at = clock_timestamp(), fetch_state = NULL
     WHERE r.id = _reconcile_finish.run_id;
    PERFORM crmpay._reconcile_report(run_id, 'done');
END
$$;

/*
 * _reconcile_fail: records why a run failed.  Whatever the run had staged
 * or healed was rolled back by the caller (a subtransaction); records a
 * step-by-step run committed are removed here.
 */
CREATE FUNCTION crmpay._reconcile_fail(run_id bigint, sqlstate text, message text, detail text,
                                       hint text, context text)
    RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c record;
BEGIN
    SELECT * INTO c FROM crmpay._reconcile_counters(run_id);
    DELETE FROM crmpay.gateway_records g WHERE g.run_id = _reconcile_fail.run_id;
    DELETE FROM crmpay.reconciliation_items i WHERE i.run_id = _reconcile_fail.run_id;
    UPDATE crmpay.reconciliation_runs r
       SET status = 'failed', phase = 'failed', finished_at = clock_timestamp(),
           pages_fetched = greatest(r.pages_fetched, coalesce(c.pages_fetched, 0)),
           records_loaded = greatest(r.records_loaded, coalesce(c.records_loaded, 0)),
           records_matched = 0, discrepancies = 0, healed = 0, counts = '{}', totals = '{}',
           error = message, error_detail = detail, error_hint = hint, error_sqlstate = sqlstate,
           error_context = context
     WHERE r.id = _reconcile_fail.run_id;
    PERFORM crmpay._reconcile_report(run_id, 'failed');
END
$$;

/*
 * _reconcile_sync: a whole run in the caller's transaction.  A failure at
 * any point (a gateway error on page 37, a bad record, a lock timeout)
 * rolls back everything the run staged or healed and leaves the run
 * recorded as failed, with the reason; the caller gets a WARNING.
 */
CREATE FUNCTION crmpay._reconcile_sync(account text, since timestamptz, until timestamptz, heal boolean,
                                       schedule_id bigint)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_run bigint;
    v_state text;
    v_msg text;
    v_detail text;
    v_hint text;
    v_context text;
BEGIN
    v_run := crmpay._reconcile_begin(account, since, until, heal, 'sync', schedule_id);
    BEGIN
        PERFORM crmpay._reconcile_fetch(v_run);
        PERFORM crmpay._reconcile_match(v_run);
        PERFORM crmpay._reconcile_heal(v_run);
        PERFORM crmpay._reconcile_finish(v_run);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT,
                                v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                                v_context = PG_EXCEPTION_CONTEXT;
        PERFORM crmpay._reconcile_fail(v_run, v_state, v_msg, nullif(v_detail, ''), nullif(v_hint, ''),
                                       nullif(v_context, ''));
        RAISE WARNING 'reconciliation run % of account "%" failed: %', v_run, account, v_msg
            USING DETAIL = concat_ws(' ', nullif(v_detail, ''), 'Nothing of this run was healed or kept.'),
                  HINT = 'crmpay.reconciliation_runs has the reason; run it again once the cause is fixed.';
    END;
    RETURN v_run;
END
$$;

-- ---------------------------------------------------------------------
-- Public API
-- ---------------------------------------------------------------------

/*
 * reconcile: matches what the account's gateway recorded between since and
 * until with crmpay.payments and returns the run id.  Synchronous: the
 * gateway is called inside the caller's transaction (use
 * crmpay.reconcile_in_steps or a schedule to keep transactions short).
 */
CREATE FUNCTION crmpay.reconcile(account text, since timestamptz, until timestamptz DEFAULT now(),
                                 heal boolean DEFAULT false)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN crmpay._reconcile_sync(account, since, until, heal, NULL);
END
$$;

/* import_report: a gateway report passed in as text; returns the import id. */
CREATE FUNCTION crmpay.import_report(account text, format text, content text) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN crmpay._import_report(account, format, content, 'import_report');
END
$$;

/*
 * fetch_report: downloads a report (Adyen: the settlement details report
 * URL) with the account's report credentials and imports it.
 */
CREATE FUNCTION crmpay.fetch_report(account text, url text, format text DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN crmpay._import_report(account, format, crmpay._download_report(account, url), url);
END
$$;

/* remove_report: forgets an import and its records (runs already made keep their items). */
CREATE FUNCTION crmpay.remove_report(import_id bigint) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM crmpay.gateway_records g WHERE g.import_id = remove_report.import_id;
    DELETE FROM crmpay.report_imports i WHERE i.id = remove_report.import_id;
    RETURN FOUND;
END
$$;

/*
 * schedule_reconciliation: one call per account.  Every `every`, the
 * worker (or pg_cron calling crmpay.run_due_reconciliations()) reconciles
 * the `window` that ends `lag` before the time of the run.  Calling it
 * again replaces the account's schedule.
 */
CREATE FUNCTION crmpay.schedule_reconciliation(account text, every interval, "window" interval,
                                               heal boolean DEFAULT true, lag interval DEFAULT '0',
                                               starting timestamptz DEFAULT NULL)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    IF account IS NULL OR every IS NULL OR "window" IS NULL OR heal IS NULL OR lag IS NULL THEN
        RAISE EXCEPTION 'account, every, window, heal and lag must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT EXISTS (SELECT FROM crmpay.gateway_accounts g WHERE g.name = schedule_reconciliation.account) THEN
        RAISE EXCEPTION 'payment account "%" does not exist', account
            USING ERRCODE = 'undefined_object',
                  HINT = 'crmpay.accounts lists the existing accounts.';
    END IF;
    IF every < interval '1 minute' OR "window" <= interval '0' OR "window" > interval '366 days'
       OR lag < interval '0' THEN
        RAISE EXCEPTION 'invalid reconciliation schedule'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('every = %s (at least 1 minute), window = %s (more than 0, at most 366 days), lag = %s (not negative).',
                                  every, "window", lag);
    END IF;
    INSERT INTO crmpay.reconciliation_schedules AS s (account, every, window_length, lag, heal, next_run_at)
    VALUES (account, every, "window", lag, heal, coalesce(starting, now()))
    ON CONFLICT ON CONSTRAINT reconciliation_schedules_account_key DO UPDATE
       SET every = excluded.every, window_length = excluded.window_length, lag = excluded.lag,
           heal = excluded.heal, next_run_at = excluded.next_run_at, enabled = true
    RETURNING s.id INTO v_id;
    RETURN v_id;
END
$$;

CREATE FUNCTION crmpay.unschedule_reconciliation(account text) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM crmpay.reconciliation_schedules s WHERE s.account = unschedule_reconciliation.account;
    RETURN FOUND;
END
$$;

/*
 * run_due_reconciliations: runs every schedule that is due, each as
 * crmpay.reconcile() would (a failed run is recorded and the next schedule
 * still runs), and returns the run ids.  Concurrent callers (the worker and
 * pg_cron) never run the same schedule twice: due rows are locked with SKIP
 * LOCKED.  Records of runs older than crmpay.reconcile_keep_records are
 * pruned.
 */
CREATE FUNCTION crmpay.run_due_reconciliations() RETURNS SETOF bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s crmpay.reconciliation_schedules;
    v_until timestamptz;
    v_run bigint;
    v_next timestamptz;
    v_error text;
BEGIN
    FOR s IN
        SELECT * FROM crmpay.reconciliation_schedules q
         WHERE q.enabled AND q.next_run_at <= clock_timestamp()
         ORDER BY q.next_run_at
         FOR UPDATE SKIP LOCKED
    LOOP
        v_until := date_trunc('second', clock_timestamp()) - s.lag;
        v_error := NULL;
        BEGIN
            v_run := crmpay._reconcile_sync(s.account, v_until - s.window_length, v_until, s.heal, s.id);
        EXCEPTION WHEN OTHERS THEN
            -- it could not even start (another run of the account is going,
            -- no report covers the window...): say so, try again next time
            v_error := SQLERRM;
            v_run := NULL;
            RAISE WARNING 'scheduled reconciliation of account "%" did not start: %', s.account, v_error;
        END;
        v_next := s.next_run_at;
        IF s.every < interval '1 day' AND date_part('month', s.every) = 0 AND date_part('day', s.every) = 0 THEN
            v_next := v_next + s.every * (floor(extract(epoch FROM clock_timestamp() - v_next)
                                                / extract(epoch FROM s.every)) + 1);
        END IF;
        WHILE v_next <= clock_timestamp() LOOP
            v_next := v_next + s.every;
        END LOOP;
        UPDATE crmpay.reconciliation_schedules q
           SET next_run_at = v_next, last_run_id = coalesce(v_run, q.last_run_id),
               last_run_at = clock_timestamp(), last_error = v_error
         WHERE q.id = s.id;
        IF v_run IS NOT NULL THEN
            RETURN NEXT v_run;
        END IF;
    END LOOP;
    PERFORM crmpay.prune_reconciliations(current_setting('crmpay.reconcile_keep_records')::interval);
END
$$;

/*
 * prune_reconciliations: drops the fetched gateway records of runs that
 * finished longer ago than keep (runs and items stay); returns how many.
 */
CREATE FUNCTION crmpay.prune_reconciliations(keep interval) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n bigint;
BEGIN
    IF keep IS NULL OR keep < interval '0' THEN
        RAISE EXCEPTION 'keep must be a non-negative interval' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM crmpay.gateway_records g
     WHERE g.run_id IN (SELECT r.id FROM crmpay.reconciliation_runs r
                         WHERE r.finished_at < clock_timestamp() - keep)
       AND g.run_id IS NOT NULL;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;

/*
 * reconcile_in_steps: the same run, committing after every page so that no
 * transaction (and no snapshot) is held while the gateway answers, and the
 * run's progress is visible in crmpay.reconciliation_runs as it goes.
 * CALL it outside a transaction block; the run id comes back in run_id.
 */
CREATE PROCEDURE crmpay.reconcile_in_steps(account text, since timestamptz,
                                           until timestamptz DEFAULT now(),
                                           heal boolean DEFAULT false, INOUT run_id bigint DEFAULT NULL)
    LANGUAGE c AS 'MODULE_PATHNAME', 'crmpay_reconcile_in_steps';

-- ---------------------------------------------------------------------
-- Views
-- ---------------------------------------------------------------------

/* Runs going on now: live counters from shared memory, else the run row. */
CREATE VIEW crmpay.reconciliation_progress AS
    SELECT p.run_id, p.account, p.pid, p.phase, p.pages_fetched, p.records_loaded,
           p.records_matched, p.discrepancies, p.healed, p.started_at, p.updated_at,
           clock_timestamp() - p.started_at AS elapsed
      FROM crmpay.reconciliation_live_progress() p
    UNION ALL
    SELECT r.id, r.account, r.pid, r.phase, r.pages_fetched, r.records_loaded,
           r.records_matched, r.discrepancies, r.healed, r.started_at, r.heartbeat_at,
           clock_timestamp() - r.started_at
      FROM crmpay.reconciliation_runs r
     WHERE r.status = 'running'
       AND NOT EXISTS (SELECT FROM crmpay.reconciliation_live_progress() p WHERE p.run_id = r.id);
COMMENT ON VIEW crmpay.reconciliation_progress IS
    'Reconciliation runs in progress: pages fetched, records loaded and matched';

/* One line per run: what was checked, what was found, what was healed. */
CREATE VIEW crmpay.reconciliation_summary AS
    SELECT r.id AS run_id, r.account, r.provider, r.window_start, r.window_end, r.heal, r.mode,
           r.sources, r.status, r.started_at, r.finished_at, r.finished_at - r.started_at AS duration,
           r.pages_fetched, r.records_loaded, r.records_matched, r.payments_checked,
           r.discrepancies, r.healed,
           coalesce((r.counts->>'missing_in_crm')::bigint, 0) AS missing_in_crm,
           coalesce((r.counts->>'missing_at_gateway')::bigint, 0) AS missing_at_gateway,
           coalesce((r.counts->>'amount_mismatch')::bigint, 0) AS amount_mismatch,
           coalesce((r.counts->>'currency_mismatch')::bigint, 0) AS currency_mismatch,
           coalesce((r.counts->>'status_mismatch')::bigint, 0) AS status_mismatch,
           coalesce((r.counts->>'duplicate_payment')::bigint, 0) AS duplicate_payment,
           coalesce((r.counts->>'refunded_at_gateway')::bigint, 0) AS refunded_at_gateway,
           r.totals, r.error
      FROM crmpay.reconciliation_runs r;
COMMENT ON VIEW crmpay.reconciliation_summary IS 'Reconciliation runs, one line each';

-- ---------------------------------------------------------------------
-- Privileges: reconciliation is an administrator's job
-- ---------------------------------------------------------------------
GRANT SELECT ON crmpay.reconciliation_runs, crmpay.reconciliation_items, crmpay.report_imports,
                crmpay.gateway_records, crmpay.reconciliation_schedules,
                crmpay.reconciliation_progress, crmpay.reconciliation_summary
    TO crmpay_admin;
GRANT EXECUTE ON FUNCTION
    crmpay.reconcile(text, timestamptz, timestamptz, boolean),
    crmpay.import_report(text, text, text),
    crmpay.fetch_report(text, text, text),
    crmpay.remove_report(bigint),
    crmpay.schedule_reconciliation(text, interval, interval, boolean, interval, timestamptz),
    crmpay.unschedule_reconciliation(text),
    crmpay.run_due_reconciliations(),
    crmpay.prune_reconciliations(interval),
    crmpay.reconciliation_live_progress()
    TO crmpay_admin;
-- (99_privileges revokes ALL FUNCTIONS, which leaves procedures alone)
REVOKE ALL ON PROCEDURE crmpay.reconcile_in_steps(text, timestamptz, timestamptz, boolean, bigint) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE crmpay.reconcile_in_steps(text, timestamptz, timestamptz, boolean, bigint)
    TO crmpay_admin;
