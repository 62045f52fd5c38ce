-- ---------------------------------------------------------------------
-- Privileges: PUBLIC gets nothing; each role gets what its job needs
-- ---------------------------------------------------------------------
REVOKE ALL ON ALL TABLES IN SCHEMA crmpay FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA crmpay FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA crmpay FROM PUBLIC;

GRANT crmpay_app, crmpay_webhook TO crmpay_admin;
GRANT USAGE ON SCHEMA crmpay TO crmpay_admin, crmpay_app, crmpay_webhook;

-- the CRM application: create links, read payments
GRANT SELECT ON crmpay.payments, crmpay.currencies, crmpay.payment_statuses,
                crmpay.status_transitions TO crmpay_app;
GRANT EXECUTE ON FUNCTION
    crmpay.create_payment_link(text, text, numeric, text, text, text, jsonb),
    crmpay.to_minor_units(numeric, text),
    crmpay.idempotency_key(text, text)
    TO crmpay_app;

-- the webhook endpoint: intake only
GRANT EXECUTE ON FUNCTION crmpay.receive_webhook(text, jsonb, text) TO crmpay_webhook;

-- administrators: accounts, events, verification (and all of the above)
GRANT SELECT ON crmpay.accounts, crmpay.events TO crmpay_admin;
GRANT EXECUTE ON FUNCTION
    crmpay.add_account(text, text, jsonb, text, jsonb),
    crmpay.update_account(text, jsonb, text, jsonb),
    crmpay.remove_account(text),
    crmpay.verify_signature(text, text, jsonb, text, interval, timestamptz)
    TO crmpay_admin;
