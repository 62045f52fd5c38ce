"""A model of crmpay's webhook intake rules, for the adversarial intake tests:
what outcome each delivery must get and which status each payment must end in."""


def transitions(conn):
    """The state machine's edges, as crmpay.status_transitions holds them."""
    return set(conn.execute("SELECT from_status, to_status FROM crmpay.status_transitions").fetchall())


class Model:
    """What crmpay's intake should do: verify, dedupe applied events by id,
    find the payment, check money facts, then the state machine."""

    def __init__(self, transitions, payments):
        self.transitions = transitions
        self.payments = payments            # key -> {"status", "amount", "currency"}
        self.applied = set()

    def expect(self, authentic, event_key, new_status, pay_key, amount=None, currency=None):
        if not authentic:
            return "rejected"
        if event_key in self.applied:
            return "duplicate"
        if new_status is None or pay_key not in self.payments:
            return "ignored"
        p = self.payments[pay_key]
        if new_status in ("paid", "processing") and (
                (amount is not None and amount != p["amount"]) or
                (currency is not None and currency != p["currency"])):
            return "ignored"
        if p["status"] != new_status and (p["status"], new_status) in self.transitions:
            p["status"] = new_status
            self.applied.add(event_key)
            return "applied"
        return "ignored"
