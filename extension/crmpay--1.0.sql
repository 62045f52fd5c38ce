/*
 * crmpay--1.0.sql
 *	  Install script: tables, the payment state machine, the SQL API and
 *	  the privileges of the three crmpay roles.
 *
 *	  Conventions: functions whose name starts with "_" are internal and
 *	  granted to nobody; the public API functions that need more rights
 *	  than their callers have are SECURITY DEFINER with a pinned
 *	  search_path.  No SQL is ever built from user or gateway data.
 */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION crmpay" to load this file. \quit

-- ---------------------------------------------------------------------
-- Roles (cluster-wide; created once, kept if the extension is dropped)
-- ---------------------------------------------------------------------
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'crmpay_admin') THEN
        CREATE ROLE crmpay_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'crmpay_app') THEN
        CREATE ROLE crmpay_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'crmpay_webhook') THEN
        CREATE ROLE crmpay_webhook NOLOGIN;
    END IF;
END
$roles$;

-- ---------------------------------------------------------------------
-- Reference data
-- ---------------------------------------------------------------------
CREATE TABLE crmpay.currencies (
    code         text PRIMARY KEY CHECK (code ~ '^[A-Z]{3}$'),
    numeric_code text NOT NULL UNIQUE CHECK (numeric_code ~ '^[0-9]{3}$'),
    exponent     smallint NOT NULL CHECK (exponent BETWEEN 0 AND 4),
    name         text NOT NULL
);
COMMENT ON TABLE crmpay.currencies IS
    'ISO 4217 currencies with their minor-unit exponent (EUR 2, JPY 0, KWD 3)';

INSERT INTO crmpay.currencies (code, numeric_code, exponent, name) VALUES
  ('AED', '784', 2, 'UAE Dirham'),
  ('AFN', '971', 2, 'Afghani'),
  ('ALL', '008', 2, 'Lek'),
  ('AMD', '051', 2, 'Armenian Dram'),
  ('ANG', '532', 2, 'Netherlands Antillean Guilder'),
  ('AOA', '973', 2, 'Kwanza'),
  ('ARS', '032', 2, 'Argentine Peso'),
  ('AUD', '036', 2, 'Australian Dollar'),
  ('AWG', '533', 2, 'Aruban Florin'),
  ('AZN', '944', 2, 'Azerbaijan Manat'),
  ('BAM', '977', 2, 'Convertible Mark'),
  ('BBD', '052', 2, 'Barbados Dollar'),
  ('BDT', '050', 2, 'Taka'),
  ('BGN', '975', 2, 'Bulgarian Lev'),
  ('BHD', '048', 3, 'Bahraini Dinar'),
  ('BIF', '108', 0, 'Burundi Franc'),
  ('BMD', '060', 2, 'Bermudian Dollar'),
  ('BND', '096', 2, 'Brunei Dollar'),
  ('BOB', '068', 2, 'Boliviano'),
  ('BOV', '984', 2, 'Mvdol'),
  ('BRL', '986', 2, 'Brazilian Real'),
  ('BSD', '044', 2, 'Bahamian Dollar'),
  ('BTN', '064', 2, 'Ngultrum'),
  ('BWP', '072', 2, 'Pula'),
  ('BYN', '933', 2, 'Belarusian Ruble'),
  ('BZD', '084', 2, 'Belize Dollar'),
  ('CAD', '124', 2, 'Canadian Dollar'),
  ('CDF', '976', 2, 'Congolese Franc'),
  ('CHE', '947', 2, 'WIR Euro'),
  ('CHF', '756', 2, 'Swiss Franc'),
  ('CHW', '948', 2, 'WIR Franc'),
  ('CLF', '990', 4, 'Unidad de Fomento'),
  ('CLP', '152', 0, 'Chilean Peso'),
  ('CNY', '156', 2, 'Yuan Renminbi'),
  ('COP', '170', 2, 'Colombian Peso'),
  ('COU', '970', 2, 'Unidad de Valor Real'),
  ('CRC', '188', 2, 'Costa Rican Colon'),
  ('CUC', '931', 2, 'Peso Convertible'),
  ('CUP', '192', 2, 'Cuban Peso'),
  ('CVE', '132', 2, 'Cabo Verde Escudo'),
  ('CZK', '203', 2, 'Czech Koruna'),
  ('DJF', '262', 0, 'Djibouti Franc'),
  ('DKK', '208', 2, 'Danish Krone'),
  ('DOP', '214', 2, 'Dominican Peso'),
  ('DZD', '012', 2, 'Algerian Dinar'),
  ('EGP', '818', 2, 'Egyptian Pound'),
  ('ERN', '232', 2, 'Nakfa'),
  ('ETB', '230', 2, 'Ethiopian Birr'),
  ('EUR', '978', 2, 'Euro'),
  ('FJD', '242', 2, 'Fiji Dollar'),
  ('FKP', '238', 2, 'Falkland Islands Pound'),
  ('GBP', '826', 2, 'Pound Sterling'),
  ('GEL', '981', 2, 'Lari'),
  ('GHS', '936', 2, 'Ghana Cedi'),
  ('GIP', '292', 2, 'Gibraltar Pound'),
  ('GMD', '270', 2, 'Dalasi'),
  ('GNF', '324', 0, 'Guinean Franc'),
  ('GTQ', '320', 2, 'Quetzal'),
  ('GYD', '328', 2, 'Guyana Dollar'),
  ('HKD', '344', 2, 'Hong Kong Dollar'),
  ('HNL', '340', 2, 'Lempira'),
  ('HRK', '191', 2, 'Kuna'),
  ('HTG', '332', 2, 'Gourde'),
  ('HUF', '348', 2, 'Forint'),
  ('IDR', '360', 2, 'Rupiah'),
  ('ILS', '376', 2, 'New Israeli Sheqel'),
  ('INR', '356', 2, 'Indian Rupee'),
  ('IQD', '368', 3, 'Iraqi Dinar'),
  ('IRR', '364', 2, 'Iranian Rial'),
  ('ISK', '352', 0, 'Iceland Krona'),
  ('JMD', '388', 2, 'Jamaican Dollar'),
  ('JOD', '400', 3, 'Jordanian Dinar'),
  ('JPY', '392', 0, 'Yen'),
  ('KES', '404', 2, 'Kenyan Shilling'),
  ('KGS', '417', 2, 'Som'),
  ('KHR', '116', 2, 'Riel'),
  ('KMF', '174', 0, 'Comorian Franc'),
  ('KPW', '408', 2, 'North Korean Won'),
  ('KRW', '410', 0, 'Won'),
  ('KWD', '414', 3, 'Kuwaiti Dinar'),
  ('KYD', '136', 2, 'Cayman Islands Dollar'),
  ('KZT', '398', 2, 'Tenge'),
  ('LAK', '418', 2, 'Lao Kip'),
  ('LBP', '422', 2, 'Lebanese Pound'),
  ('LKR', '144', 2, 'Sri Lanka Rupee'),
  ('LRD', '430', 2, 'Liberian Dollar'),
  ('LSL', '426', 2, 'Loti'),
  ('LYD', '434', 3, 'Libyan Dinar'),
  ('MAD', '504', 2, 'Moroccan Dirham'),
  ('MDL', '498', 2, 'Moldovan Leu'),
  ('MGA', '969', 2, 'Malagasy Ariary'),
  ('MKD', '807', 2, 'Denar'),
  ('MMK', '104', 2, 'Kyat'),
  ('MNT', '496', 2, 'Tugrik'),
  ('MOP', '446', 2, 'Pataca'),
  ('MRU', '929', 2, 'Ouguiya'),
  ('MUR', '480', 2, 'Mauritius Rupee'),
  ('MVR', '462', 2, 'Rufiyaa'),
  ('MWK', '454', 2, 'Malawi Kwacha'),
  ('MXN', '484', 2, 'Mexican Peso'),
  ('MXV', '979', 2, 'Mexican Unidad de Inversion (UDI)'),
  ('MYR', '458', 2, 'Malaysian Ringgit'),
  ('MZN', '943', 2, 'Mozambique Metical'),
  ('NAD', '516', 2, 'Namibia Dollar'),
  ('NGN', '566', 2, 'Naira'),
  ('NIO', '558', 2, 'Cordoba Oro'),
  ('NOK', '578', 2, 'Norwegian Krone'),
  ('NPR', '524', 2, 'Nepalese Rupee'),
  ('NZD', '554', 2, 'New Zealand Dollar'),
  ('OMR', '512', 3, 'Rial Omani'),
  ('PAB', '590', 2, 'Balboa'),
  ('PEN', '604', 2, 'Sol'),
  ('PGK', '598', 2, 'Kina'),
  ('PHP', '608', 2, 'Philippine Peso'),
  ('PKR', '586', 2, 'Pakistan Rupee'),
  ('PLN', '985', 2, 'Zloty'),
  ('PYG', '600', 0, 'Guarani'),
  ('QAR', '634', 2, 'Qatari Rial'),
  ('RON', '946', 2, 'Romanian Leu'),
  ('RSD', '941', 2, 'Serbian Dinar'),
  ('RUB', '643', 2, 'Russian Ruble'),
  ('RWF', '646', 0, 'Rwanda Franc'),
  ('SAR', '682', 2, 'Saudi Riyal'),
  ('SBD', '090', 2, 'Solomon Islands Dollar'),
  ('SCR', '690', 2, 'Seychelles Rupee'),
  ('SDG', '938', 2, 'Sudanese Pound'),
  ('SEK', '752', 2, 'Swedish Krona'),
  ('SGD', '702', 2, 'Singapore Dollar'),
  ('SHP', '654', 2, 'Saint Helena Pound'),
  ('SLE', '925', 2, 'Leone'),
  ('SLL', '694', 2, 'Leone'),
  ('SOS', '706', 2, 'Somali Shilling'),
  ('SRD', '968', 2, 'Surinam Dollar'),
  ('SSP', '728', 2, 'South Sudanese Pound'),
  ('STN', '930', 2, 'Dobra'),
  ('SVC', '222', 2, 'El Salvador Colon'),
  ('SYP', '760', 2, 'Syrian Pound'),
  ('SZL', '748', 2, 'Lilangeni'),
  ('THB', '764', 2, 'Baht'),
  ('TJS', '972', 2, 'Somoni'),
  ('TMT', '934', 2, 'Turkmenistan New Manat'),
  ('TND', '788', 3, 'Tunisian Dinar'),
  ('TOP', '776', 2, 'Pa’anga'),
  ('TRY', '949', 2, 'Turkish Lira'),
  ('TTD', '780', 2, 'Trinidad and Tobago Dollar'),
  ('TWD', '901', 2, 'New Taiwan Dollar'),
  ('TZS', '834', 2, 'Tanzanian Shilling'),
  ('UAH', '980', 2, 'Hryvnia'),
  ('UGX', '800', 0, 'Uganda Shilling'),
  ('USD', '840', 2, 'US Dollar'),
  ('USN', '997', 2, 'US Dollar (Next day)'),
  ('UYI', '940', 0, 'Uruguay Peso en Unidades Indexadas (UI)'),
  ('UYU', '858', 2, 'Peso Uruguayo'),
  ('UYW', '927', 4, 'Unidad Previsional'),
  ('UZS', '860', 2, 'Uzbekistan Sum'),
  ('VED', '926', 2, 'Bolívar Soberano'),
  ('VES', '928', 2, 'Bolívar Soberano'),
  ('VND', '704', 0, 'Dong'),
  ('VUV', '548', 0, 'Vatu'),
  ('WST', '882', 2, 'Tala'),
  ('XAF', '950', 0, 'CFA Franc BEAC'),
  ('XCD', '951', 2, 'East Caribbean Dollar'),
  ('XOF', '952', 0, 'CFA Franc BCEAO'),
  ('XPF', '953', 0, 'CFP Franc'),
  ('YER', '886', 2, 'Yemeni Rial'),
  ('ZAR', '710', 2, 'Rand'),
  ('ZMW', '967', 2, 'Zambian Kwacha'),
  ('ZWG', '924', 2, 'Zimbabwe Gold'),
  ('ZWL', '932', 2, 'Zimbabwe Dollar');

CREATE TABLE crmpay.payment_statuses (
    status      text PRIMARY KEY,
    description text NOT NULL
);
INSERT INTO crmpay.payment_statuses VALUES
    ('link_pending',       'the link is being created at the gateway'),
    ('open',               'the link exists; the customer has not paid yet'),
    ('processing',         'the customer paid with a method that settles later'),
    ('paid',               'the money was taken'),
    ('failed',             'the payment attempt failed; the customer may try again'),
    ('expired',            'the link expired unpaid'),
    ('canceled',           'the payment was canceled'),
    ('refunded',           'the whole amount was refunded'),
    ('partially_refunded', 'part of the amount was refunded'),
    ('disputed',           'the customer disputed the charge');

/*
 * The payment state machine: a status may only move along these edges.
 * Money evidence wins (a paid event for an expired or canceled link still
 * marks it paid); nothing moves a paid payment back to open, processing or
 * failed, so late or out-of-order webhooks cannot corrupt it.
 */
CREATE TABLE crmpay.status_transitions (
    from_status text NOT NULL REFERENCES crmpay.payment_statuses,
    to_status   text NOT NULL REFERENCES crmpay.payment_statuses,
    PRIMARY KEY (from_status, to_status),
    CHECK (from_status <> to_status)
);
INSERT INTO crmpay.status_transitions (from_status, to_status) VALUES
    ('link_pending', 'open'), ('link_pending', 'processing'), ('link_pending', 'paid'),
    ('link_pending', 'failed'), ('link_pending', 'expired'), ('link_pending', 'canceled'),
    ('open', 'processing'), ('open', 'paid'), ('open', 'failed'), ('open', 'expired'),
    ('open', 'canceled'),
    ('processing', 'paid'), ('processing', 'failed'), ('processing', 'canceled'),
    ('failed', 'processing'), ('failed', 'paid'), ('failed', 'expired'), ('failed', 'canceled'),
    ('expired', 'paid'), ('canceled', 'paid'),
    ('paid', 'partially_refunded'), ('paid', 'refunded'), ('paid', 'disputed'),
    ('partially_refunded', 'refunded'), ('partially_refunded', 'disputed'),
    ('disputed', 'refunded');

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
CREATE FUNCTION crmpay._accounts_changed() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'crmpay_accounts_changed';
CREATE TRIGGER accounts_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON crmpay.gateway_accounts
    FOR EACH STATEMENT EXECUTE FUNCTION crmpay._accounts_changed();

CREATE VIEW crmpay.accounts AS
    SELECT name, provider, settings,
           webhook_secret IS NOT NULL AS has_webhook_secret,
           created_at, updated_at
      FROM crmpay.gateway_accounts;
COMMENT ON VIEW crmpay.accounts IS 'Gateway accounts without their secrets';

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
);
CREATE INDEX payments_gateway_ref ON crmpay.payments (account, gateway_ref)
    WHERE gateway_ref IS NOT NULL;
CREATE INDEX payments_gateway_payment_ref ON crmpay.payments (account, gateway_payment_ref)
    WHERE gateway_payment_ref IS NOT NULL;
CREATE INDEX payments_status ON crmpay.payments (status);
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
CREATE INDEX events_received ON crmpay.events (account, received_at);
CREATE INDEX events_payment ON crmpay.events (payment_id) WHERE payment_id IS NOT NULL;
COMMENT ON TABLE crmpay.events IS 'Every webhook delivery, rejected ones included, with its outcome';

-- pg_dump keeps the data of these extension tables
SELECT pg_catalog.pg_extension_config_dump('crmpay.gateway_accounts', '');
SELECT pg_catalog.pg_extension_config_dump('crmpay.payments', '');
SELECT pg_catalog.pg_extension_config_dump('crmpay.events', '');

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

-- ---------------------------------------------------------------------
-- Accounts API
-- ---------------------------------------------------------------------

/*
 * add_account: stores an account with its secrets encrypted.  The SET
 * clause keeps the server from logging the calling statement (which holds
 * the secrets) when the call fails.
 */
CREATE FUNCTION crmpay.add_account(name text, provider text, credentials jsonb,
                                   webhook_secret text DEFAULT NULL,
                                   settings jsonb DEFAULT '{}')
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET log_min_error_statement = 'panic'
AS $$
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid account name "%"', name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Account names are 1 to 63 letters, digits, "_", "." or "-", starting with a letter or digit.';
    END IF;
    PERFORM crmpay._validate_account(name, provider, credentials, webhook_secret,
                                     coalesce(settings, '{}'));
    IF EXISTS (SELECT FROM crmpay.gateway_accounts a WHERE a.name = add_account.name) THEN
        RAISE EXCEPTION 'payment account "%" already exists', name
            USING ERRCODE = 'unique_violation',
                  HINT = 'Use crmpay.update_account() to change it.';
    END IF;
    INSERT INTO crmpay.gateway_accounts (name, provider, credentials, webhook_secret, settings)
    VALUES (name, provider,
            crmpay._seal(credentials::text, 'crmpay:' || name || ':credentials'),
            CASE WHEN webhook_secret IS NOT NULL
                 THEN crmpay._seal(webhook_secret, 'crmpay:' || name || ':webhook_secret') END,
            coalesce(settings, '{}'));
END
$$;

/*
 * update_account: replaces the parts given (NULL keeps the current one).
 */
CREATE FUNCTION crmpay.update_account(name text, credentials jsonb DEFAULT NULL,
                                      webhook_secret text DEFAULT NULL,
                                      settings jsonb DEFAULT NULL)
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET log_min_error_statement = 'panic'
AS $$
DECLARE
    v_provider text;
BEGIN
    SELECT a.provider INTO v_provider
      FROM crmpay.gateway_accounts a WHERE a.name = update_account.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'payment account "%" does not exist', name
            USING ERRCODE = 'undefined_object',
                  HINT = 'crmpay.accounts lists the existing accounts.';
    END IF;
    -- the merged account must still be valid (NULL credentials: the stored ones)
    PERFORM crmpay._validate_account(name, v_provider, credentials, webhook_secret,
                                     coalesce(settings, (SELECT a.settings FROM crmpay.gateway_accounts a
                                                          WHERE a.name = update_account.name)));
    UPDATE crmpay.gateway_accounts a
       SET credentials = CASE WHEN update_account.credentials IS NOT NULL
                              THEN crmpay._seal(update_account.credentials::text,
                                                'crmpay:' || a.name || ':credentials')
                              ELSE a.credentials END,
           webhook_secret = CASE WHEN update_account.webhook_secret IS NOT NULL
                                 THEN crmpay._seal(update_account.webhook_secret,
                                                   'crmpay:' || a.name || ':webhook_secret')
                                 ELSE a.webhook_secret END,
           settings = coalesce(update_account.settings, a.settings),
           updated_at = now()
     WHERE a.name = update_account.name;
END
$$;

/* remove_account: only for accounts with no payments (history is kept). */
CREATE FUNCTION crmpay.remove_account(name text) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT FROM crmpay.payments p WHERE p.account = remove_account.name) THEN
        RAISE EXCEPTION 'payment account "%" has payments and cannot be removed', name
            USING ERRCODE = 'dependent_objects_still_exist',
                  DETAIL = 'Payments keep the account they were made with.';
    END IF;
    DELETE FROM crmpay.gateway_accounts a WHERE a.name = remove_account.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'payment account "%" does not exist', name
            USING ERRCODE = 'undefined_object';
    END IF;
END
$$;

-- ---------------------------------------------------------------------
-- Amounts and link requests
-- ---------------------------------------------------------------------

/*
 * to_minor_units: exact conversion by the currency's ISO 4217 exponent.
 * 19.99 EUR -> 1999, 500 JPY -> 500, 1.234 KWD -> 1234.  Refuses more
 * decimals than the currency has, zero, negative and unknown currencies.
 */
CREATE FUNCTION crmpay.to_minor_units(amount numeric, currency text) RETURNS bigint
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_exponent smallint;
    v_scaled numeric;
BEGIN
    IF currency IS NULL THEN
        RAISE EXCEPTION 'currency must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT c.exponent INTO v_exponent FROM crmpay.currencies c WHERE c.code = upper(currency);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown currency "%"', currency
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use an ISO 4217 alphabetic code such as EUR, USD or JPY; crmpay.currencies lists them.';
    END IF;
    IF amount IS NULL THEN
        RAISE EXCEPTION 'amount must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF amount = 'NaN'::numeric OR amount <= 0 THEN
        RAISE EXCEPTION 'amount must be greater than zero'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The amount given was %s %s.', amount, upper(currency));
    END IF;
    v_scaled := amount * (10::numeric ^ v_exponent);
    IF v_scaled <> trunc(v_scaled) THEN
        RAISE EXCEPTION 'amount % has more decimals than % allows', amount, upper(currency)
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('%s has %s decimal places (ISO 4217).', upper(currency), v_exponent),
                  HINT = 'Round the amount to the currency''s minor unit before sending it.';
    END IF;
    IF v_scaled > 9223372036854775807 THEN
        RAISE EXCEPTION 'amount % % is out of range', amount, upper(currency)
            USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    RETURN v_scaled::bigint;
END
$$;

/* The gateway idempotency key of an order: fixed for (account, order_ref). */
CREATE FUNCTION crmpay.idempotency_key(account text, order_ref text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
RETURN 'crmpay-' || left(encode(sha256(convert_to('crmpay/v1' || chr(31) || account || chr(31) || order_ref, 'UTF8')), 'hex'), 32);

/*
 * _link_request: validates a link request and returns it as the jsonb the
 * C side and the outbox store.  Nothing is written.
 */
CREATE FUNCTION crmpay._link_request(account text, order_ref text, amount numeric, currency text,
                                     email text, description text, metadata jsonb)
    RETURNS jsonb
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_currency crmpay.currencies;
    v_amount_minor bigint;
    v_key text;
    v_value jsonb;
    v_request jsonb;
BEGIN
    IF account IS NULL THEN
        RAISE EXCEPTION 'account must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT EXISTS (SELECT FROM crmpay.gateway_accounts a WHERE a.name = account) THEN
        RAISE EXCEPTION 'payment account "%" does not exist', account
            USING ERRCODE = 'undefined_object',
                  HINT = 'Add it with crmpay.add_account(); crmpay.accounts lists the existing ones.';
    END IF;
    IF order_ref IS NULL OR length(order_ref) NOT BETWEEN 1 AND 200
       OR order_ref ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid order_ref'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'order_ref must be 1 to 200 characters without control characters.';
    END IF;
    v_amount_minor := crmpay.to_minor_units(amount, currency);
    SELECT * INTO v_currency FROM crmpay.currencies c WHERE c.code = upper(currency);
    IF email IS NOT NULL AND (length(email) > 254 OR email !~ '^[^[:space:][:cntrl:]@]+@[^[:space:][:cntrl:]@]+\.[^[:space:][:cntrl:]@]+$') THEN
        RAISE EXCEPTION 'invalid email address "%"', email
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF description IS NOT NULL AND (length(description) > 500 OR description ~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION 'invalid description'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A description is at most 500 characters without control characters.';
    END IF;
    metadata := coalesce(metadata, '{}');
    IF jsonb_typeof(metadata) <> 'object' THEN
        RAISE EXCEPTION 'metadata must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (SELECT count(*) FROM jsonb_object_keys(metadata)) > 40 THEN
        RAISE EXCEPTION 'metadata has more than 40 keys' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_key, v_value IN SELECT * FROM jsonb_each(metadata) LOOP
        IF length(v_key) NOT BETWEEN 1 AND 40 OR v_key ~ '[[:cntrl:]\[\]]' OR v_key LIKE 'crmpay\_%' THEN
            RAISE EXCEPTION 'invalid metadata key "%"', v_key
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'Keys are 1 to 40 characters, without brackets or control characters; the prefix "crmpay_" is reserved.';
        END IF;
        IF jsonb_typeof(v_value) NOT IN ('string', 'number', 'boolean')
           OR length(v_value #>> '{}') > 500 THEN
            RAISE EXCEPTION 'metadata value for "%" must be a string, number or boolean of at most 500 characters', v_key
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;

    v_request := jsonb_build_object(
        'order_ref', order_ref,
        'amount_minor', v_amount_minor,
        'currency', v_currency.code,
        'currency_numeric', v_currency.numeric_code,
        'exponent', v_currency.exponent,
        'email', email,
        'description', description,
        'metadata', metadata,
        'idempotency_key', crmpay.idempotency_key(account, order_ref));
    -- the gateway's own limits (amount ranges, currencies it refuses)
    PERFORM crmpay._check_link_request(account, v_request);
    RETURN v_request;
END
$$;

/*
 * create_payment_link: the synchronous path.  Calls the gateway in the
 * caller's transaction (prefer request_payment_link for that reason) and
 * returns the payment row with the hosted URL.  The same (account,
 * order_ref) again returns the existing row without a gateway call.
 */
CREATE FUNCTION crmpay.create_payment_link(account text, order_ref text, amount numeric,
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
    v_link jsonb;
BEGIN
    v_request := crmpay._link_request(account, order_ref, amount, currency, email, description, metadata);

    -- one creator per order at a time; a second caller waits, then sees the row
    PERFORM pg_advisory_xact_lock(hashtextextended('crmpay/order' || chr(31) || account || chr(31) || order_ref, 0));

    SELECT * INTO v_payment FROM crmpay.payments p
     WHERE p.account = create_payment_link.account AND p.order_ref = create_payment_link.order_ref;
    IF FOUND THEN
        IF v_payment.amount_minor <> (v_request->>'amount_minor')::bigint
           OR v_payment.currency <> v_request->>'currency' THEN
            RAISE EXCEPTION 'order "%" already has a payment link for a different amount', order_ref
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = format('The existing payment %s is for %s minor units of %s; this call asks for %s of %s.',
                                      v_payment.id, v_payment.amount_minor, v_payment.currency,
                                      v_request->>'amount_minor', v_request->>'currency'),
                      HINT = 'Use a new order_ref for a new amount.';
        END IF;
        IF v_payment.status <> 'link_pending' THEN
            RETURN v_payment;
        END IF;
    END IF;

    v_link := crmpay._gateway_create_link(account, v_request);

    IF v_payment.id IS NULL THEN
        INSERT INTO crmpay.payments AS p
            (account, order_ref, amount_minor, currency, status, url, gateway_ref,
             email, description, metadata, idempotency_key, expires_at)
        VALUES (account, order_ref, (v_request->>'amount_minor')::bigint, v_request->>'currency',
                coalesce(v_link->>'status', 'open'), v_link->>'url', v_link->>'gateway_ref',
                email, description, v_request->'metadata', v_request->>'idempotency_key',
                (v_link->>'expires_at')::timestamptz)
        RETURNING * INTO v_payment;
    ELSE
        UPDATE crmpay.payments p
           SET status = coalesce(v_link->>'status', 'open'), url = v_link->>'url',
               gateway_ref = v_link->>'gateway_ref',
               expires_at = (v_link->>'expires_at')::timestamptz, updated_at = now()
         WHERE p.id = v_payment.id AND p.status = 'link_pending'
        RETURNING * INTO v_payment;
    END IF;
    RETURN v_payment;
END
$$;

-- ---------------------------------------------------------------------
-- The state machine and webhook intake
-- ---------------------------------------------------------------------

/*
 * _apply_status: moves a payment to new_status if crmpay.status_transitions
 * allows it, after locking its row (extension/payments.c).  Also records
 * facts that only grow (the gateway's payment id, the cumulative refund).
 * Returns the old status when the status moved, NULL otherwise.
 */
CREATE FUNCTION crmpay._apply_status(payment_id bigint, new_status text,
                                     gateway_payment_ref text DEFAULT NULL,
                                     refunded_minor bigint DEFAULT NULL,
                                     at timestamptz DEFAULT NULL)
    RETURNS text
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'crmpay_apply_status_sql';

/*
 * receive_webhook: the intake for every gateway (extension/webhook.c).  The
 * CRM's HTTP endpoint passes the request's headers (a JSON object) and raw
 * body, and answers the gateway with http_status and reply.  Every delivery
 * is recorded in crmpay.events; an event id is applied at most once; late
 * and out-of-order events cannot move a payment backwards (_apply_status).
 */
CREATE FUNCTION crmpay.receive_webhook(account text, headers jsonb, body text)
    RETURNS TABLE (http_status integer, reply text, outcome text, event_id text)
    LANGUAGE c VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'crmpay_receive_webhook';

-- ---------------------------------------------------------------------
-- Follow-up actions: NOTIFY on every status change
-- ---------------------------------------------------------------------
CREATE FUNCTION crmpay._notify_payment_change() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'crmpay_notify_payment_change';

CREATE TRIGGER payments_notify_insert AFTER INSERT ON crmpay.payments
    FOR EACH ROW EXECUTE FUNCTION crmpay._notify_payment_change();
CREATE TRIGGER payments_notify_update AFTER UPDATE OF status ON crmpay.payments
    FOR EACH ROW EXECUTE FUNCTION crmpay._notify_payment_change();

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
