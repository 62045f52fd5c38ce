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
