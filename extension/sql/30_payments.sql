-- ---------------------------------------------------------------------
-- Payments and webhook events
-- ---------------------------------------------------------------------
CREATE TABLE crmpay.payments (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account             text NOT NULL REFERENCES crmpay.gateway_accounts (name),
    order_ref           text NOT NULL,
    amount_minor        bigint NOT NULL CHECK (amount_minor > 0),
    currency            text NOT NULL REFERENCES crmpay.currencies (code),
    status              text NOT NULL DEFAULT 'link_pending'
                        CHECK (status IN ('link_pending', 'open', 'processing', 'paid', 'failed', 'expired',
                                          'canceled', 'refunded', 'partially_refunded', 'disputed')),
    url                 text,
    gateway_ref         text,
    gateway_payment_ref text,
    email               text,
    description         text,
    metadata            jsonb NOT NULL DEFAULT '{}',
    refunded_minor      bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
    idempotency_key     text NOT NULL,
    expires_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    paid_at             timestamptz,
    UNIQUE (account, order_ref)
) WITH (fillfactor = 85);   -- room for HOT updates: status changes touch no index
CREATE INDEX payments_gateway_ref ON crmpay.payments (account, gateway_ref)
    WHERE gateway_ref IS NOT NULL;
CREATE INDEX payments_gateway_payment_ref ON crmpay.payments (account, gateway_payment_ref)
    WHERE gateway_payment_ref IS NOT NULL;
-- No index mentions status (not even in a predicate), so a status change is
-- a HOT update that touches no index.
COMMENT ON TABLE crmpay.payments IS 'One row per (account, order_ref): the payment link and its status';

CREATE TABLE crmpay.events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account     text NOT NULL,
    provider    text,
    event_key   text,
    event_type  text,
    payment_id  bigint,                -- crmpay.payments.id (payments are never deleted)
    outcome     text NOT NULL CHECK (outcome IN ('applied', 'duplicate', 'ignored', 'rejected')),
    reason      text,
    old_status  text,
    new_status  text,
    http_status integer NOT NULL,
    headers     jsonb,
    body        text,
    received_at timestamptz NOT NULL DEFAULT now()
);
-- An event id is applied at most once per account.
-- bodies are kept as received; lz4 keeps storing them cheap
ALTER TABLE crmpay.events ALTER COLUMN body SET COMPRESSION lz4,
                          ALTER COLUMN headers SET COMPRESSION lz4;
CREATE UNIQUE INDEX events_applied_once ON crmpay.events (account, event_key)
    WHERE outcome = 'applied';
-- events arrive in time order: a BRIN index serves time windows at almost no write cost
CREATE INDEX events_received ON crmpay.events USING brin (received_at);
CREATE INDEX events_payment ON crmpay.events (payment_id) WHERE payment_id IS NOT NULL;
COMMENT ON TABLE crmpay.events IS 'Every webhook delivery, rejected ones included, with its outcome';

-- pg_dump keeps the data of these extension tables
SELECT pg_catalog.pg_extension_config_dump('crmpay.gateway_accounts', '');
SELECT pg_catalog.pg_extension_config_dump('crmpay.payments', '');
SELECT pg_catalog.pg_extension_config_dump('crmpay.events', '');
