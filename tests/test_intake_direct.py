"""The webhook intake's direct path (extension/intake_direct.c): events that
name their payment by its link and move it are written through the table
access methods instead of SQL statements.  These tests check that it is
exactly equivalent to the SQL statements -- rows, NOTIFY payloads, user
triggers, domains, locking, errors -- and that it steps aside wherever it
would not be (REPEATABLE READ, statement triggers, a changed table)."""

import hashlib
import hmac
import json
import threading
import time

import psycopg
import pytest
from psycopg import errors

WHSEC = "whsec_direct_path_secret"
DIRECT = "applied by the direct path"


def stripe_event(event_id, event_type, obj):
    return json.dumps({"id": event_id, "object": "event", "api_version": "2024-06-20",
                       "type": event_type, "data": {"object": obj}}, indent=2)


def session(cs, order_ref, amount=1999, currency="eur", payment_status="paid", pi=None):
    return {"id": cs, "object": "checkout.session", "amount_total": amount, "currency": currency,
            "client_reference_id": order_ref, "payment_intent": pi, "payment_status": payment_status,
            "metadata": {"crmpay_order_ref": order_ref}}


def charge(pi, order_ref, refunded, amount=1999):
    return {"id": "ch_" + pi, "object": "charge", "amount": amount, "amount_refunded": refunded,
            "currency": "eur", "payment_intent": pi, "metadata": {"crmpay_order_ref": order_ref}}


def signed(body):
    t = int(time.time())
    mac = hmac.new(WHSEC.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
    return json.dumps({"Stripe-Signature": f"t={t},v1={mac}"})


class Intake:
    """A connection that delivers events and counts the DEBUG lines of the
    direct path."""

    def __init__(self, conn):
        self.conn = conn
        self.direct = 0
        conn.add_notice_handler(self._notice)
        conn.execute("SET client_min_messages = debug1")

    def _notice(self, diag):
        if diag.message_primary and DIRECT in diag.message_primary:
            self.direct += 1

    def deliver(self, body):
        return self.conn.execute("SELECT http_status, reply, outcome, event_id FROM crmpay.receive_webhook("
                                 "'shop', %s::jsonb, %s)", (signed(body), body)).fetchall()


def delivered_after(release, waiting_for, intake_for):
    """Delivers from another thread (intake_for() gives the Intake, the body
    and what to do after), checks that the delivery waits, runs release(),
    and returns the reply and how many direct writes that Intake counted."""
    result = {}

    def deliver():
        intake, body, done = intake_for()
        try:
            result["reply"] = intake.deliver(body)
            result["direct"] = intake.direct
        finally:
            done()

    thread = threading.Thread(target=deliver)
    thread.start()
    time.sleep(0.5)
    assert "reply" not in result, f"the delivery must wait for {waiting_for}"
    release()
    thread.join(10)
    return result["reply"], result["direct"]


def in_new_session(pg, db_name, body):
    """For delivered_after: an Intake on a new connection, closed afterwards."""
    def intake_for():
        conn = pg.connect(db_name)
        return Intake(conn), body, conn.close
    return intake_for


def set_up_shop(conn, orders=("A", "B", "C", "D", "E", "F")):
    conn.execute("SELECT crmpay.add_account('shop', 'stripe', '{\"secret_key\": \"sk_test_x\"}', %s, "
                 "'{\"success_url\": \"https://shop.example/paid\"}')", (WHSEC,))
    for order in orders:
        conn.execute("INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, "
                     "gateway_ref, idempotency_key) VALUES ('shop', %s, 1999, 'EUR', 'open', %s, %s)",
                     ("ORD-" + order, "cs_" + order, "k" + order))


# Every kind of outcome, in an order that exercises the state machine:
# moves by link (direct), duplicates, backwards moves, money mismatches,
# unknown links, and events found by the payment id (SQL lookups).
SCENARIO = [
    stripe_event("evt_1", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_A")),
    stripe_event("evt_1", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_A")),
    stripe_event("evt_2", "checkout.session.expired", session("cs_A", "ORD-A")),
    stripe_event("evt_3", "charge.refunded", charge("pi_A", "ORD-A", 500)),
    stripe_event("evt_4", "checkout.session.completed", session("cs_B", "ORD-B", payment_status="unpaid",
                                                                pi="pi_B")),
    stripe_event("evt_5", "checkout.session.async_payment_succeeded", session("cs_B", "ORD-B", pi="pi_B")),
    stripe_event("evt_6", "checkout.session.completed", session("cs_C", "ORD-C", amount=1000, pi="pi_C")),
    stripe_event("evt_7", "checkout.session.expired", session("cs_D", "ORD-D")),
    stripe_event("evt_8", "checkout.session.completed", session("cs_ZZ", "ORD-ZZ", pi="pi_ZZ")),
    stripe_event("evt_9", "payment_intent.succeeded",
                 {"id": "pi_E", "object": "payment_intent", "amount_received": 1999, "currency": "eur",
                  "metadata": {"crmpay_order_ref": "ORD-E"}}),
    stripe_event("evt_10", "charge.refunded", charge("pi_A", "ORD-A", 1999)),
    stripe_event("evt_11", "checkout.session.completed", session("cs_F", "ORD-F", currency="usd", pi="pi_F")),
    stripe_event("evt_12", "checkout.session.async_payment_failed", session("cs_B", "ORD-B")),
]


def state(conn):
    """Everything the intake writes, without ids and clock times (compared
    to each other instead)."""
    payments = conn.execute(
        "SELECT order_ref, status, gateway_payment_ref, refunded_minor, paid_at IS NOT NULL, "
        "       paid_at IS NULL OR paid_at = updated_at, updated_at >= created_at "
        "  FROM crmpay.payments ORDER BY order_ref").fetchall()
    events = conn.execute(
        "SELECT e.event_key, e.event_type, p.order_ref, e.outcome, e.reason, e.old_status, e.new_status, "
        "       e.http_status, e.headers IS NOT NULL, e.body, e.follow_up, e.provider "
        "  FROM crmpay.events e LEFT JOIN crmpay.payments p ON p.id = e.payment_id ORDER BY e.id").fetchall()
    refs = conn.execute(
        "SELECT r.account, r.gateway_payment_ref, p.order_ref FROM crmpay.payment_refs r "
        "  JOIN crmpay.payments p ON p.id = r.payment_id ORDER BY 2").fetchall()
    return payments, events, refs


def log_triggers(conn):
    """AFTER and BEFORE row triggers on the three tables that log, in
    firing order, what they saw."""
    conn.execute("CREATE TABLE public.log (n serial, what text)")
    conn.execute("""CREATE FUNCTION public.log_it() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN
                        INSERT INTO public.log (what) VALUES (concat_ws(':', TG_WHEN, TG_OP, TG_TABLE_NAME,
                            (SELECT string_agg(order_ref || '=' || status, ',' ORDER BY order_ref)
                               FROM crmpay.payments)));
                        RETURN CASE WHEN TG_WHEN = 'BEFORE' THEN NEW END;
                    END $$""")
    for table in ("payments", "events"):
        for when in ("BEFORE", "AFTER"):
            conn.execute(f"CREATE TRIGGER log_{when.lower()} {when} INSERT OR UPDATE ON crmpay.{table} "
                         f"FOR EACH ROW EXECUTE FUNCTION public.log_it()")


def run_scenario(pg, db, db_name):
    log_triggers(db)
    listener = pg.connect(db_name)
    notified = []
    listener.add_notify_handler(lambda n: notified.append(json.loads(n.payload)))
    listener.execute("LISTEN crmpay_payments")
    intake = Intake(db)
    replies = [intake.deliver(body) for body in SCENARIO]
    listener.execute("SELECT 1")  # take the notifications in
    listener.close()
    for n in notified:
        del n["payment_id"]
    log = [r[0] for r in db.execute("SELECT what FROM public.log ORDER BY n")]
    return replies, notified, state(db), intake.direct, log


def test_direct_path_writes_what_the_sql_statements_write(pg, db, db_name):
    """The same deliveries, once as they come and once with a statement
    trigger on payments (which sends every event through the SQL
    statements): the same replies, rows, mappings and notifications, and
    the same row triggers firing in the same order on the same data."""
    set_up_shop(db)
    direct = run_scenario(pg, db, db_name)

    other = db_name + "_sql"
    pg.drop_database(other)
    pg.create_database(other)
    try:
        with pg.connect(other) as conn:
            conn.execute("CREATE EXTENSION crmpay")
            set_up_shop(conn)
            conn.execute("CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS "
                         "$$ BEGIN RETURN NULL; END $$")
            conn.execute("CREATE TRIGGER statement_noop AFTER UPDATE ON crmpay.payments "
                         "FOR EACH STATEMENT EXECUTE FUNCTION public.noop()")
            through_sql = run_scenario(pg, conn, other)
    finally:
        pg.drop_database(other)

    replies, notified, rows, direct_writes, log = direct
    assert direct_writes == 4           # evt_1, evt_4, evt_5 and evt_7 move a payment found by its link
    assert through_sql[3] == 0
    assert log == through_sql[4] and len(log) == 40
    assert replies == through_sql[0]
    assert notified == through_sql[1]
    assert rows == through_sql[2]
    outcomes = [r[0][2] for r in replies]
    assert outcomes == ["applied", "duplicate", "ignored", "applied", "applied", "applied", "ignored",
                        "applied", "ignored", "applied", "applied", "ignored", "ignored"]
    payments = {p[0]: p for p in rows[0]}
    assert payments["ORD-A"][1:4] == ("refunded", "pi_A", 1999)
    assert payments["ORD-B"][1:3] == ("paid", "pi_B")
    assert payments["ORD-D"][1] == "expired"
    assert payments["ORD-E"][1:3] == ("paid", "pi_E")
    assert ("shop", "pi_A", "ORD-A") in rows[2] and ("shop", "pi_B", "ORD-B") in rows[2]


def test_user_triggers_fire_as_for_the_sql_update(db):
    """BEFORE row triggers may change the row; AFTER UPDATE OF triggers fire
    for the columns the move sets only; triggers on events fire too; all in
    the order the SQL statement fires them (crmpay.webhook_direct_path off)."""
    set_up_shop(db, orders=("A", "B"))
    db.execute("CREATE TABLE public.log (n serial, what text)")
    db.execute("""CREATE FUNCTION public.stamp() RETURNS trigger LANGUAGE plpgsql AS $$
                  BEGIN NEW.metadata := NEW.metadata || '{"stamped": true}'; RETURN NEW; END $$""")
    db.execute("""CREATE FUNCTION public.log_it() RETURNS trigger LANGUAGE plpgsql AS $$
                  BEGIN INSERT INTO public.log (what) VALUES (TG_NAME || ':' || TG_TABLE_NAME); RETURN NULL; END $$""")
    db.execute("CREATE TRIGGER stamp BEFORE UPDATE ON crmpay.payments FOR EACH ROW EXECUTE FUNCTION public.stamp()")
    db.execute("CREATE TRIGGER of_paid_at AFTER UPDATE OF paid_at ON crmpay.payments "
               "FOR EACH ROW EXECUTE FUNCTION public.log_it()")
    db.execute("CREATE TRIGGER of_url AFTER UPDATE OF url ON crmpay.payments "
               "FOR EACH ROW EXECUTE FUNCTION public.log_it()")
    db.execute("CREATE TRIGGER when_paid AFTER UPDATE ON crmpay.payments FOR EACH ROW "
               "WHEN (NEW.status = 'paid') EXECUTE FUNCTION public.log_it()")
    db.execute("CREATE TRIGGER new_event AFTER INSERT ON crmpay.events "
               "FOR EACH ROW EXECUTE FUNCTION public.log_it()")
    intake = Intake(db)
    logs = []
    for order, direct_path in (("A", "on"), ("B", "off")):
        db.execute(f"SET crmpay.webhook_direct_path = {direct_path}")
        db.execute("TRUNCATE public.log")
        reply = intake.deliver(stripe_event("evt_" + order, "checkout.session.completed",
                                            session("cs_" + order, "ORD-" + order, pi="pi_" + order)))
        assert reply[0][2] == "applied"
        logs.append([r[0] for r in db.execute("SELECT what FROM public.log ORDER BY n")])
    assert intake.direct == 1
    assert logs[0] == logs[1] == ["new_event:events", "of_paid_at:payments", "when_paid:payments"]
    assert db.execute("SELECT array_agg(metadata->>'stamped' || status ORDER BY order_ref) FROM crmpay.payments"
                      ).fetchone() == (["truepaid", "truepaid"],)


def test_domains_are_checked(db):
    """A value its domain refuses fails the delivery as the SQL would, and
    nothing is written."""
    set_up_shop(db, orders=("A",))
    db.execute("ALTER DOMAIN crmpay.payment_status ADD CONSTRAINT not_paid_today CHECK (VALUE <> 'paid') NOT VALID")
    intake = Intake(db)
    with pytest.raises(errors.CheckViolation) as exc:
        intake.deliver(stripe_event("evt_d", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_A")))
    assert "payment_status" in str(exc.value) and "not_paid_today" in str(exc.value)
    assert db.execute("SELECT status FROM crmpay.payments").fetchone() == ("open",)
    assert db.execute("SELECT count(*) FROM crmpay.events").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM crmpay.payment_refs").fetchone() == (0,)


def test_a_changed_events_table_takes_the_sql_statements(db):
    """After ALTER TABLE adds a column to crmpay.events (in the same session,
    so the cached description must be dropped), events go through SQL and
    the new column gets its default."""
    set_up_shop(db, orders=("A", "B"))
    intake = Intake(db)
    intake.deliver(stripe_event("evt_a", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_A")))
    assert intake.direct == 1
    db.execute("ALTER TABLE crmpay.events ADD COLUMN note text NOT NULL DEFAULT 'noted'")
    reply = intake.deliver(stripe_event("evt_b", "checkout.session.completed", session("cs_B", "ORD-B", pi="pi_B")))
    assert reply[0][2] == "applied" and intake.direct == 1
    assert db.execute("SELECT note FROM crmpay.events WHERE event_key = 'evt_b'").fetchone() == ("noted",)
    db.execute("ALTER TABLE crmpay.events DROP COLUMN note")
    set_up_shop_more(db, "C")
    intake.deliver(stripe_event("evt_c", "checkout.session.completed", session("cs_C", "ORD-C", pi="pi_C")))
    assert intake.direct == 2


def set_up_shop_more(conn, order):
    conn.execute("INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, "
                 "gateway_ref, idempotency_key) VALUES ('shop', %s, 1999, 'EUR', 'open', %s, %s)",
                 ("ORD-" + order, "cs_" + order, "k" + order))


def test_repeatable_read_keeps_its_rules(pg, db, db_name):
    """In REPEATABLE READ the SQL statements decide: a payment changed since
    the transaction's snapshot is a serialization failure, not a silent
    decision on a row the transaction cannot see."""
    set_up_shop(db, orders=("A",))
    intake = Intake(db)
    db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    db.execute("SELECT count(*) FROM crmpay.payments")  # the snapshot is taken
    with pg.connect(db_name) as other:
        Intake(other).deliver(stripe_event("evt_x", "checkout.session.expired", session("cs_A", "ORD-A")))
    with pytest.raises(errors.SerializationFailure):
        intake.deliver(stripe_event("evt_y", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_A")))
    db.execute("ROLLBACK")
    assert intake.direct == 0
    db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    reply = intake.deliver(stripe_event("evt_y", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_A")))
    db.execute("COMMIT")
    # decided on the expired payment (money taken after expiry still counts)
    assert reply[0][2] == "applied" and intake.direct == 0
    assert db.execute("SELECT old_status, new_status FROM crmpay.events WHERE event_key = 'evt_y'"
                      ).fetchone() == ("expired", "paid")


@pytest.mark.parametrize("first, second, outcome, old_status, final", [
    (session("cs_A", "ORD-A", pi="pi_A"), ("checkout.session.expired", session("cs_A", "ORD-A")),
     "ignored", None, "paid"),
    (session("cs_A", "ORD-A", payment_status="unpaid", pi="pi_A"),
     ("checkout.session.async_payment_succeeded", session("cs_A", "ORD-A", pi="pi_A")),
     "applied", "processing", "paid"),
], ids=["backwards-is-ignored", "forward-from-the-new-status"])
def test_concurrent_events_decide_on_the_latest_status(pg, db, db_name, first, second, outcome, old_status, final):
    """A second event for a payment another transaction is moving waits for
    its row lock, then decides on the status that transaction committed
    (the direct path locks the latest version, as FOR UPDATE does)."""
    set_up_shop(db, orders=("A",))
    db.execute("BEGIN")
    assert Intake(db).deliver(stripe_event("evt_first", "checkout.session.completed", first))[0][2] == "applied"
    reply, direct = delivered_after(lambda: db.execute("COMMIT"), "the payment's row lock",
                                    in_new_session(pg, db_name, stripe_event("evt_second", *second)))
    assert reply[0][2] == outcome
    assert direct == (1 if outcome == "applied" else 0)
    event = db.execute("SELECT old_status, reason FROM crmpay.events WHERE event_key = 'evt_second'").fetchone()
    if outcome == "applied":
        assert event[0] == old_status
    else:
        assert event[1] == "payment is paid; expired would not move it forward"
    assert db.execute("SELECT status FROM crmpay.payments").fetchone() == (final,)


def test_concurrent_copies_of_one_event_apply_once(pg, db, db_name):
    set_up_shop(db, orders=("A",))
    body = stripe_event("evt_same", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_A"))
    db.execute("BEGIN")
    assert Intake(db).deliver(body)[0][2] == "applied"
    reply, _ = delivered_after(lambda: db.execute("COMMIT"), "the first copy", in_new_session(pg, db_name, body))
    assert reply[0][2] == "duplicate"
    assert db.execute("SELECT count(*) FROM crmpay.events WHERE outcome = 'applied'").fetchone() == (1,)


def test_an_error_in_a_trigger_leaves_nothing_and_the_session_sound(db):
    """A user trigger that fails aborts the delivery whole; the session's
    next writes to payments keep payment_refs as always."""
    set_up_shop(db, orders=("A", "B"))
    db.execute("""CREATE FUNCTION public.fail() RETURNS trigger LANGUAGE plpgsql AS $$
                  BEGIN RAISE EXCEPTION 'invoice service down'; END $$""")
    db.execute("CREATE TRIGGER fail AFTER UPDATE ON crmpay.payments FOR EACH ROW EXECUTE FUNCTION public.fail()")
    intake = Intake(db)
    body = stripe_event("evt_f", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_A"))
    with pytest.raises(errors.RaiseException, match="invoice service down"):
        intake.deliver(body)
    assert db.execute("SELECT status, gateway_payment_ref FROM crmpay.payments WHERE order_ref = 'ORD-A'"
                      ).fetchone() == ("open", None)
    assert db.execute("SELECT count(*) FROM crmpay.events").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM crmpay.payment_refs").fetchone() == (0,)
    db.execute("DROP TRIGGER fail ON crmpay.payments")
    # the payment the failed delivery was writing: its refs are the trigger's again
    db.execute("UPDATE crmpay.payments SET gateway_payment_ref = 'pi_manual' WHERE order_ref = 'ORD-A'")
    assert db.execute("SELECT p.order_ref FROM crmpay.payment_refs r JOIN crmpay.payments p ON p.id = r.payment_id "
                      "WHERE r.gateway_payment_ref = 'pi_manual'").fetchone() == ("ORD-A",)
    assert intake.deliver(stripe_event("evt_g", "checkout.session.completed",
                                       session("cs_B", "ORD-B", pi="pi_B")))[0][2] == "applied"
    assert intake.direct == 1


def test_a_mapping_to_another_payment_moves(db):
    """payment_refs left pointing at another payment (a reference that
    changed hands) is moved to the payment that now has it, as the SQL's
    ON CONFLICT does."""
    set_up_shop(db, orders=("A", "B"))
    db.execute("INSERT INTO crmpay.payment_refs SELECT 'shop', 'pi_X', id FROM crmpay.payments "
               "WHERE order_ref = 'ORD-B'")
    intake = Intake(db)
    assert intake.deliver(stripe_event("evt_m", "checkout.session.completed",
                                       session("cs_A", "ORD-A", pi="pi_X")))[0][2] == "applied"
    assert intake.direct == 1
    assert db.execute("SELECT p.order_ref FROM crmpay.payment_refs r JOIN crmpay.payments p ON p.id = r.payment_id "
                      "WHERE r.gateway_payment_ref = 'pi_X'").fetchall() == [("ORD-A",)]


def test_a_mapping_being_written_elsewhere_is_waited_for(pg, db, db_name):
    """Another transaction is writing the mapping of the gateway payment id
    (not committed yet): the delivery waits for it, as ON CONFLICT does,
    then moves the mapping instead of failing on the primary key."""
    set_up_shop(db, orders=("A", "B"))
    other = pg.connect(db_name)
    other.execute("BEGIN")
    other.execute("INSERT INTO crmpay.payment_refs SELECT 'shop', 'pi_X', id FROM crmpay.payments "
                  "WHERE order_ref = 'ORD-B'")

    def release():
        other.execute("COMMIT")
        other.close()

    body = stripe_event("evt_w", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_X"))
    reply, direct = delivered_after(release, "the transaction writing the mapping",
                                    in_new_session(pg, db_name, body))
    assert reply[0][2] == "applied" and direct == 1
    assert db.execute("SELECT p.order_ref FROM crmpay.payment_refs r JOIN crmpay.payments p ON p.id = r.payment_id "
                      "WHERE r.gateway_payment_ref = 'pi_X'").fetchall() == [("ORD-A",)]


def test_an_update_skipped_by_a_before_trigger_writes_no_mapping(db):
    """A BEFORE UPDATE trigger returning NULL skips the move: as with the SQL
    statement, the event is still recorded and no payment_refs row appears."""
    set_up_shop(db, orders=("A", "B"))
    db.execute("""CREATE FUNCTION public.skip() RETURNS trigger LANGUAGE plpgsql AS $$
                  BEGIN RETURN NULL; END $$""")
    db.execute("CREATE TRIGGER skip BEFORE UPDATE ON crmpay.payments FOR EACH ROW EXECUTE FUNCTION public.skip()")
    intake = Intake(db)
    seen = []
    for order, direct_path in (("A", "on"), ("B", "off")):
        db.execute(f"SET crmpay.webhook_direct_path = {direct_path}")
        reply = intake.deliver(stripe_event("evt_" + order, "checkout.session.completed",
                                            session("cs_" + order, "ORD-" + order, pi="pi_" + order)))
        seen.append((reply[0][2],) + db.execute(
            "SELECT p.status, p.gateway_payment_ref, (SELECT count(*) FROM crmpay.payment_refs), "
            "       (SELECT count(*) FROM crmpay.events WHERE event_key = %s) "
            "  FROM crmpay.payments p WHERE order_ref = %s", ("evt_" + order, "ORD-" + order)).fetchone())
    assert intake.direct == 1
    assert seen[0] == seen[1] == ("applied", "open", None, 0, 1)


@pytest.mark.parametrize("change", [
    "CREATE TRIGGER refs AFTER INSERT ON crmpay.payment_refs FOR EACH ROW EXECUTE FUNCTION public.noop()",
    "CREATE TRIGGER statement AFTER INSERT ON crmpay.events FOR EACH STATEMENT EXECUTE FUNCTION public.noop()",
    "ALTER TABLE crmpay.events ALTER COLUMN received_at SET DEFAULT clock_timestamp()",
    "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'crmpay.events_applied_once'::regclass",
    "DROP INDEX crmpay.payments_gateway_ref",
    "SET crmpay.webhook_direct_path = off",
], ids=["trigger-on-refs", "statement-trigger-on-events", "other-default", "index-not-valid",
        "index-dropped", "turned-off"])
def test_the_sql_statements_take_over_where_the_direct_path_would_differ(db, change):
    set_up_shop(db, orders=("A", "B"))
    db.execute("CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$")
    intake = Intake(db)
    body = stripe_event("evt_a", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_A"))
    assert intake.deliver(body)[0][2] == "applied" and intake.direct == 1
    db.execute(change)
    assert intake.deliver(stripe_event("evt_b", "checkout.session.completed",
                                       session("cs_B", "ORD-B", pi="pi_B")))[0][2] == "applied"
    assert intake.deliver(body)[0][2] == "duplicate"
    assert intake.direct == 1
    assert db.execute("SELECT status FROM crmpay.payments ORDER BY order_ref").fetchall() == [("paid",), ("paid",)]


def test_a_read_only_transaction_is_refused_as_by_sql(db):
    set_up_shop(db, orders=("A",))
    intake = Intake(db)
    db.execute("BEGIN READ ONLY")
    with pytest.raises(errors.ReadOnlySqlTransaction, match="cannot execute SELECT FOR UPDATE"):
        intake.deliver(stripe_event("evt_r", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_A")))
    db.execute("ROLLBACK")
    assert intake.direct == 0
    assert db.execute("SELECT status FROM crmpay.payments").fetchone() == ("open",)


def test_ddl_committed_while_waiting_for_the_tables_is_seen(pg, db, db_name):
    """The table description is checked under the intake's table locks: a
    column added by a transaction the delivery waited for gets its default."""
    set_up_shop(db, orders=("A", "B"))
    intake = Intake(db)
    intake.deliver(stripe_event("evt_a", "checkout.session.completed", session("cs_A", "ORD-A", pi="pi_A")))
    assert intake.direct == 1
    ddl = pg.connect(db_name)
    ddl.execute("BEGIN")
    ddl.execute("ALTER TABLE crmpay.events ADD COLUMN note text DEFAULT 'noted'")

    def release():
        ddl.execute("COMMIT")
        ddl.close()

    body = stripe_event("evt_b", "checkout.session.completed", session("cs_B", "ORD-B", pi="pi_B"))
    reply, direct = delivered_after(release, "the ALTER TABLE", lambda: (intake, body, lambda: None))
    assert reply[0][2] == "applied" and direct == 1
    assert db.execute("SELECT note FROM crmpay.events WHERE event_key = 'evt_b'").fetchone() == ("noted",)
