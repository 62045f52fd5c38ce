-- ---------------------------------------------------------------------
-- Accounts (secrets sealed with AES-256-GCM; see extension/crypto.c)
-- ---------------------------------------------------------------------
CREATE TABLE crmpay.gateway_accounts (
    name           text PRIMARY KEY
                   CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    provider       text NOT NULL
                   CHECK (provider IN ('stripe', 'paypal', 'braintree', 'adyen', 'redsys')),
    credentials    bytea NOT NULL,
    webhook_secret bytea,
    settings       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(settings) = 'object'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE crmpay.gateway_accounts IS
    'Gateway accounts; credentials and webhook_secret are encrypted. Read crmpay.accounts instead.';

-- every change tells all backends to drop their cached, opened accounts
CREATE FUNCTION crmpay._cached_table_changed() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'crmpay_cached_table_changed';
CREATE TRIGGER accounts_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON crmpay.gateway_accounts
    FOR EACH STATEMENT EXECUTE FUNCTION crmpay._cached_table_changed();

CREATE VIEW crmpay.accounts AS
    SELECT name, provider, settings,
           webhook_secret IS NOT NULL AS has_webhook_secret,
           created_at, updated_at
      FROM crmpay.gateway_accounts;
COMMENT ON VIEW crmpay.accounts IS 'Gateway accounts without their secrets';
