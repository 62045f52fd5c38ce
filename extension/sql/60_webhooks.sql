-- ---------------------------------------------------------------------
-- The state machine and webhook intake
-- ---------------------------------------------------------------------

-- backends cache the state machine's edges (extension/payments.c); every
-- change to them tells all backends to read them again
CREATE TRIGGER status_transitions_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON crmpay.status_transitions
    FOR EACH STATEMENT EXECUTE FUNCTION crmpay._cached_table_changed();

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
