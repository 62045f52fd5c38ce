-- ---------------------------------------------------------------------
-- Payments and webhook events
-- ---------------------------------------------------------------------
-- The rules of these columns are domains rather than table CHECKs: a table
-- CHECK is parsed and planned again by every statement that writes a row,
-- which is most of the cost of a webhook's UPDATE and INSERT; a domain's
-- check is prepared once per session (the type cache keeps it).
CREATE DOMAIN crmpay.payment_status AS text
    CHECK (VALUE IN ('link_pending', 'open', 'processing', 'paid', 'failed', 'expired',
                     'canceled', 'refunded', 'partially_refunded', 'disputed'));
CREATE DOMAIN crmpay.positive_minor AS bigint CHECK (VALUE > 0);
CREATE DOMAIN crmpay.refunded_minor AS bigint CHECK (VALUE >= 0);
CREATE DOMAIN crmpay.event_outcome AS text
    CHECK (VALUE IN ('applied', 'duplicate', 'ignored', 'rejected'));

CREATE TABLE crmpay.payments (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account             text NOT NULL REFERENCES crmpay.gateway_accounts (name),
    order_ref           text NOT NULL,
    amount_minor        crmpay.positive_minor NOT NULL,
    currency            text NOT NULL REFERENCES crmpay.currencies (code),
    status              crmpay.payment_status NOT NULL DEFAULT 'link_pending',
    url                 text,
    gateway_ref         text,
    gateway_payment_ref text,
    email               text,
    description         text,
    metadata            jsonb NOT NULL DEFAULT '{}',
    refunded_minor      crmpay.refunded_minor NOT NULL DEFAULT 0,
    idempotency_key     text NOT NULL,
    expires_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    paid_at             timestamptz,
    UNIQUE (account, order_ref)
) WITH (fillfactor = 85);   -- room for HOT updates: status changes touch no index
CREATE INDEX payments_gateway_ref ON crmpay.payments (account, gateway_ref)
    WHERE gateway_ref IS NOT NULL;
-- The gateway's payment id is learnt when the payment is paid, in the same
-- UPDATE that moves its status.  An index on payments.gateway_payment_ref
-- would make that UPDATE write a new entry in every index of the table;
-- the lookup lives in payment_refs instead, kept by a trigger
-- (crmpay._payment_changed, extension/payments.c) whoever writes the column.
CREATE TABLE crmpay.payment_refs (
    account             text NOT NULL,
    gateway_payment_ref text NOT NULL,
    payment_id          bigint NOT NULL,    -- crmpay.payments.id
    PRIMARY KEY (account, gateway_payment_ref)
);
COMMENT ON TABLE crmpay.payment_refs IS
    'Lookup of payments by the gateway''s payment id (crmpay.payments.gateway_payment_ref)';
-- No index mentions status, gateway_payment_ref, refunded_minor, paid_at or
-- updated_at (not even in a predicate), so the state machine's UPDATE is a
-- HOT update that touches no index.
COMMENT ON TABLE crmpay.payments IS 'One row per (account, order_ref): the payment link and its status';

CREATE TABLE crmpay.events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account     text NOT NULL,
    provider    text,
    event_key   text,
    event_type  text,
    payment_id  bigint,                -- crmpay.payments.id (payments are never deleted)
    outcome     crmpay.event_outcome NOT NULL,
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
SELECT pg_catalog.pg_extension_config_dump('crmpay.payment_refs', '');
