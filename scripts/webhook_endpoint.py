"""A reference CRM webhook endpoint for crmpay.

Gateways POST their notifications to an HTTP endpoint the CRM runs; that
endpoint hands the request's headers and raw body to
crmpay.receive_webhook() and answers the gateway with the status and reply
crmpay returns.  This is that endpoint, small enough to copy into any stack:

    POST /webhooks/<account>   ->   SELECT * FROM crmpay.receive_webhook(account, headers, body)

Run it with a connection string for a role that is a member of
crmpay_webhook (the role can do nothing else):

    /usr/bin/python3 scripts/webhook_endpoint.py --dsn "host=... user=hook" --port 8088

The body is passed on exactly as received (signatures are over raw bytes).
"""

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg

MAX_BODY = 1024 * 1024


class WebhookEndpoint:
    """Serves POST /webhooks/<account> on a thread; one DB connection per request thread."""

    def __init__(self, dsn, host="127.0.0.1", port=0, log=None):
        self.dsn = dsn
        self.log = log or (lambda message: None)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet: the caller logs what matters
                pass

            def do_POST(self):
                parts = self.path.strip("/").split("/")
                if len(parts) != 2 or parts[0] != "webhooks":
                    self._answer(404, "not found")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._answer(413, "too large")
                    return
                raw = self.rfile.read(length)
                try:
                    body = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._answer(400, "body is not UTF-8")
                    return
                headers = {name: value for name, value in self.headers.items()}
                with psycopg.connect(endpoint.dsn, autocommit=True) as conn:
                    rows = conn.execute(
                        "SELECT http_status, reply, outcome, event_id FROM crmpay.receive_webhook(%s, %s, %s)",
                        (parts[1], json.dumps(headers), body)).fetchall()
                status, reply = rows[0][0], rows[0][1]
                for row in rows:
                    endpoint.log(f"webhook {parts[1]}: {row[3] or '-'} -> {row[2]} (HTTP {row[0]})")
                self._answer(status, reply or "")

            def _answer(self, status, text):
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8088)
    args = parser.parse_args()
    endpoint = WebhookEndpoint(args.dsn, args.host, args.port, log=print).start()
    print(f"listening on {endpoint.url}/webhooks/<account>")
    try:
        endpoint.thread.join()
    except KeyboardInterrupt:
        endpoint.stop()


if __name__ == "__main__":
    main()
