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
