"""E-mailing payment links: a job sends the link to the customer through a
real SMTP server on loopback (aiosmtpd) over STARTTLS verified against the
test CA, with the account's templates filled in safely; SMTP failures
retry like any job, refusals are dead at once."""

import email
import email.policy
import json
import ssl
import time

import pytest

from lib.cluster import free_port
from outbox_support import (WORKER_DB, crm_orders_table, job_rows, set_worker_settings,  # noqa: F401
                            shop, stripe, wait_for, wait_until_drained, worker_cluster)

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")


class Mailbox:
    """aiosmtpd handler keeping every message; scripted replies for tests."""

    def __init__(self):
        self.messages = []      # (mail_from, rcpt_tos, raw bytes, tls)
        self.data_replies = []  # replies to DATA before accepting
        self.refuse_rcpt = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse_rcpt:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_replies:
            return self.data_replies.pop(0)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                              session.ssl is not None))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server(tls):
    """A loopback SMTP server that requires STARTTLS (the test CA's certificate)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls["server_cert"], tls["server_key"])
    mailbox = Mailbox()
    port = free_port()
    controller = aiosmtpd_controller.Controller(mailbox, hostname="127.0.0.1", port=port,
                                                tls_context=context, require_starttls=True)
    controller.start()
    mailbox.url = f"smtp://127.0.0.1:{port}"
    yield mailbox
    controller.stop()


TEMPLATES = {
    "email_from": "shop@example.com",
    "email_from_name": "Tienda Ñandú",
    "email_subject": "Pago del pedido {{order_ref}} – {{amount}} {{currency}}",
    "email_text": "Hola {{order.customer}},\n\npague aquí: {{url}}\n",
    "email_html": "<p>Hola {{order.customer}}</p><p><a href=\"{{url}}\">Pagar {{amount}} {{currency}}</a></p>",
}


def use_templates(conn, stripe, **overrides):
    settings = {"api_base": stripe.base_url, "success_url": "https://shop.example/paid"}
    settings.update(TEMPLATES)
    settings.update(overrides)
    conn.execute("SELECT crmpay.update_account('shop', settings => %s::jsonb)", (json.dumps(settings),))


def parse(raw):
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_order_link_is_mailed_with_the_template_filled_in_safely(worker_cluster, shop, stripe, smtp_server):
    set_worker_settings(worker_cluster, {"crmpay.smtp_url": smtp_server.url})
    use_templates(shop, stripe)
    crm_orders_table(shop)
    shop.execute("INSERT INTO orders (order_no, customer, total, email) VALUES"
                 " ('M-1', '<b>Ana</b> & \"Bo\" {{url}}', 42.50, 'ana@example.com')")
    wait_until_drained(worker_cluster)
    jobs = job_rows(shop)
    assert [(j["kind"], j["state"]) for j in jobs] == [("create_link", "done"), ("send_email", "done")]
    url = shop.execute("SELECT pay_url FROM orders WHERE order_no = 'M-1'").fetchone()[0]

    [(mail_from, rcpt_tos, raw, over_tls)] = smtp_server.messages
    assert over_tls, "the message was sent before STARTTLS"
    assert mail_from == "shop@example.com" and rcpt_tos == ["ana@example.com"]
    msg = parse(raw)
    assert msg["Subject"] == "Pago del pedido M-1 – 42.50 EUR"
    [sender] = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Tienda Ñandú", "shop@example.com")
    assert msg["To"].addresses[0].addr_spec == "ana@example.com"
    assert msg["Message-ID"] == f"<crmpay-job-{jobs[1]['id']}@example.com>"
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    # values go in once, as text; in HTML escaped
    assert text == f"Hola <b>Ana</b> & \"Bo\" {{{{url}}}},\n\npague aquí: {url}\n"
    assert "&lt;b&gt;Ana&lt;/b&gt; &amp; &quot;Bo&quot; {{url}}" in html
    assert f'<a href="{url}">Pagar 42.50 EUR</a>' in html
    # no header can be injected through the data
    assert all(not line.lower().startswith(b"bcc") for line in raw.splitlines())


def test_smtp_failures_retry_and_refusals_are_dead(worker_cluster, shop, stripe, smtp_server):
    set_worker_settings(worker_cluster, {"crmpay.smtp_url": smtp_server.url})
    use_templates(shop, stripe)
    smtp_server.data_replies = ["451 4.3.0 try again later", "421 4.7.0 busy"]
    smtp_server.refuse_rcpt = {"nobody@example.com"}
    crm_orders_table(shop)
    shop.execute("INSERT INTO orders (order_no, customer, total, email) VALUES"
                 " ('M-2', 'Cy', 10, 'cy@example.com'), ('M-3', 'No', 10, 'nobody@example.com')")
    wait_until_drained(worker_cluster)
    mails = {j["payload"]["to"]: j for j in job_rows(shop, "kind = 'send_email'")}
    assert mails["cy@example.com"]["state"] == "done" and mails["cy@example.com"]["attempts"] == 3
    assert mails["nobody@example.com"]["state"] == "dead" and mails["nobody@example.com"]["attempts"] == 1
    assert mails["nobody@example.com"]["last_http_status"] == 550
    assert "refused for good" in mails["nobody@example.com"]["last_error"]
    assert [m[1] for m in smtp_server.messages] == [["cy@example.com"]]
    assert shop.execute("SELECT kind FROM crmpay.alerts").fetchall() == [("job_dead",)]


def test_mail_waits_for_crmpay_smtp_url(worker_cluster, shop, stripe, smtp_server):
    set_worker_settings(worker_cluster, {"crmpay.retry_base_delay": "200ms", "crmpay.retry_max_delay": "200ms"})
    use_templates(shop, stripe)
    crm_orders_table(shop)
    shop.execute("INSERT INTO orders (order_no, customer, total, email) VALUES ('M-4', 'Di', 3, 'di@example.com')")
    wait_for(lambda: [j for j in job_rows(shop, "kind = 'send_email'") if j["attempts"] >= 1 and j["state"] == "queued"],
             timeout=10, what="a failed e-mail attempt")
    [mail] = job_rows(shop, "kind = 'send_email'")
    assert "crmpay.smtp_url is not set" in mail["last_error"]
    # configured with a reload: the queued job goes out
    set_worker_settings(worker_cluster, {"crmpay.smtp_url": smtp_server.url})
    wait_until_drained(worker_cluster)
    assert [m[1] for m in smtp_server.messages] == [["di@example.com"]]


def test_plain_smtp_is_refused(worker_cluster, shop, stripe):
    """A server that offers no STARTTLS gets no message (credentials and
    customer data would travel in clear)."""
    mailbox = Mailbox()
    port = free_port()
    controller = aiosmtpd_controller.Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        set_worker_settings(worker_cluster, {"crmpay.smtp_url": f"smtp://127.0.0.1:{port}",
                                             "crmpay.max_attempts": 2})
        use_templates(shop, stripe)
        crm_orders_table(shop)
        shop.execute("INSERT INTO orders (order_no, customer, total, email) VALUES ('M-5', 'Ed', 3, 'ed@example.com')")
        wait_until_drained(worker_cluster)
        [mail] = job_rows(shop, "kind = 'send_email'")
        assert mail["state"] == "dead" and mailbox.messages == []
        assert "SMTP delivery failed" in mail["last_error"]
    finally:
        controller.stop()


def test_sender_name_cannot_change_the_sender(worker_cluster, shop, stripe, smtp_server):
    set_worker_settings(worker_cluster, {"crmpay.smtp_url": smtp_server.url})
    tricky = 'Shop, "Inc" <evil@example.net>'
    use_templates(shop, stripe, email_from_name=tricky, email_subject="Order {{order_ref}}\r\nBcc: x@example.net")
    crm_orders_table(shop)
    shop.execute("INSERT INTO orders (order_no, customer, total, email) VALUES ('M-6', 'Fe', 3, 'fe@example.com')")
    wait_until_drained(worker_cluster)
    [(_, rcpt_tos, raw, _)] = smtp_server.messages
    assert rcpt_tos == ["fe@example.com"]
    msg = parse(raw)
    [sender] = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == (tricky, "shop@example.com")
    assert msg["Subject"] == "Order M-6  Bcc: x@example.net"
    assert msg["Bcc"] is None
