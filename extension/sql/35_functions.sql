-- ---------------------------------------------------------------------
-- C functions (internal ones are granted to nobody)
-- ---------------------------------------------------------------------
CREATE FUNCTION crmpay._seal(plaintext text, aad text) RETURNS bytea
    LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'crmpay_seal';

CREATE FUNCTION crmpay._validate_account(name text, provider text, credentials jsonb,
                                         webhook_secret text, settings jsonb) RETURNS void
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'crmpay_validate_account';

CREATE FUNCTION crmpay._check_link_request(account text, request jsonb) RETURNS text
    LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'crmpay_check_link_request';

CREATE FUNCTION crmpay._gateway_create_link(account text, request jsonb) RETURNS jsonb
    LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'crmpay_gateway_create_link';

CREATE FUNCTION crmpay.verify_signature(provider text, secret text, headers jsonb, body text,
                                        tolerance interval DEFAULT '5 minutes',
                                        at timestamptz DEFAULT now())
    RETURNS boolean
    LANGUAGE c VOLATILE PARALLEL SAFE AS 'MODULE_PATHNAME', 'crmpay_verify_signature';
COMMENT ON FUNCTION crmpay.verify_signature(text, text, jsonb, text, interval, timestamptz) IS
    'True when a webhook delivery (headers + raw body) is authentic and not older than tolerance';
