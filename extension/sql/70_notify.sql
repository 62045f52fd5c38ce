-- ---------------------------------------------------------------------
-- Follow-up actions: NOTIFY on every status change
-- ---------------------------------------------------------------------
CREATE FUNCTION crmpay._notify_payment_change() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'crmpay_notify_payment_change';

CREATE TRIGGER payments_notify_insert AFTER INSERT ON crmpay.payments
    FOR EACH ROW EXECUTE FUNCTION crmpay._notify_payment_change();
CREATE TRIGGER payments_notify_update AFTER UPDATE OF status ON crmpay.payments
    FOR EACH ROW EXECUTE FUNCTION crmpay._notify_payment_change();
