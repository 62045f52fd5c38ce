"""The HTTPS server every gateway double runs on.

A ThreadingHTTPServer that does the TLS handshake in the worker thread (so
a slow or broken client never blocks accept()), sets TCP_NODELAY (http.server
writes the headers and the body separately; without it Nagle holds the body
until the client's delayed ACK, about 40 ms per request on loopback), and
can shut down every open connection (fault injection, stop()).

The double passed in must have a ``verbose`` attribute and a
``_note_tls_failure(exc)`` method (it counts failed handshakes).
``ServedDouble`` is the lifecycle every double shares: serve in a
background thread, stop, and use as a context manager; ``DoubleHandler`` is
the request plumbing they share (read the body, hand it to the double's
``_dispatch``, write its answer or drop the connection).
"""

import http.server
import socket
import ssl
import sys
import threading
import traceback


class TLSThreadingServer(http.server.ThreadingHTTPServer):
    """Threading HTTPS server; the TLS handshake happens in the worker thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, addr, handler, double, ssl_context):
        self.double = double
        self.ssl_context = ssl_context
        self.active = set()
        self.active_lock = threading.Lock()
        super().__init__(addr, handler)

    def finish_request(self, request, client_address):
        try:
            request.settimeout(10)
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.double._note_tls_failure(exc)
            try:
                request.close()
            except OSError:
                pass
            return
        with self.active_lock:
            self.active.add(conn)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        except (ConnectionError, ssl.SSLError, socket.timeout, OSError):
            pass
        finally:
            with self.active_lock:
                self.active.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def handle_error(self, request, client_address):
        if self.double.verbose:
            super().handle_error(request, client_address)

    def close_all_connections(self):
        with self.active_lock:
            conns = list(self.active)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class DoubleHandler(http.server.BaseHTTPRequestHandler):
    """Every method goes to ``self.server.double._dispatch(method, path,
    headers, body)``, which returns (status, headers, payload), or None to
    close the connection without answering (drop faults).  Subclasses set
    the Server header, the log prefix and the answer to a bug in the
    double."""

    protocol_version = "HTTP/1.1"
    timeout = 60             # idle keep-alive timeout per connection
    server_header = "Apache"
    double_name = "double"
    internal_error = (500, {"Content-Type": "text/plain"}, b"internal error of the double")

    def version_string(self):
        return self.server_header

    def log_message(self, fmt, *args):
        if self.server.double.verbose:
            sys.stderr.write("%s: %s - %s\n" % (self.double_name, self.address_string(), fmt % args))

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")

    def _read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method, body):
        return self.server.double._dispatch(method, self.path, self.headers, body)

    def _handle(self, method):
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        try:
            resp = self._dispatch(method, body)
        except Exception:  # a bug in the double: answer 500, keep serving
            traceback.print_exc()
            resp = self.internal_error
        if resp is None:
            self._drop()
            return
        status, headers, payload = resp
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except (ConnectionError, ssl.SSLError, socket.timeout, OSError):
            self.close_connection = True

    def _drop(self):
        """Close the TCP connection without sending anything back."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ServedDouble:
    """Serving a double over HTTPS: ``serve(handler, name)`` starts the
    server thread and returns the base URL; ``stop()`` drops open keep-alive
    connections and stops; ``with double:`` does both.  The subclass sets
    host, port (0: any free one), certfile and keyfile."""

    _server = None
    _thread = None

    def serve(self, handler, name):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.certfile, self.keyfile)
        try:
            ctx.set_alpn_protocols(["http/1.1"])
        except NotImplementedError:
            pass
        self._server = TLSThreadingServer((self.host, self.port), handler, self, ctx)
        self.port = self._server.server_address[1]
        host = self.host if ":" not in self.host else "[%s]" % self.host
        self.base_url = "https://%s:%d" % (host, self.port)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=name, daemon=True)
        self._thread.start()
        return self.base_url

    def stop(self):
        """Stop serving and drop open keep-alive connections."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_all_connections()
        self._server.server_close()
        self._thread.join(5)
        self._server = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
