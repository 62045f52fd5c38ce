-- ---------------------------------------------------------------------
-- Follow-up actions: NOTIFY on every status change
-- ---------------------------------------------------------------------
CREATE FUNCTION crmpay._notify_payment_change() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'crmpay_notify_payment_change';

CREATE TRIGGER payments_notify_insert AFTER INSERT ON crmpay.payments
    FOR EACH ROW EXECUTE FUNCTION crmpay._notify_payment_change();
CREATE TRIGGER payments_notify_update AFTER UPDATE OF status ON crmpay.payments
    FOR EACH ROW EXECUTE FUNCTION crmpay._notify_payment_change();

-- the lookup of payments by the gateway's payment id (crmpay.payment_refs)
CREATE FUNCTION crmpay._keep_payment_ref() RETURNS trigger
    LANGUAGE c SECURITY DEFINER AS 'MODULE_PATHNAME', 'crmpay_keep_payment_ref';
CREATE TRIGGER payments_keep_ref AFTER INSERT OR UPDATE OF gateway_payment_ref ON crmpay.payments
    FOR EACH ROW EXECUTE FUNCTION crmpay._keep_payment_ref();
