"""The HTTPS server every gateway double runs on.

A ThreadingHTTPServer that does the TLS handshake in the worker thread (so
a slow or broken client never blocks accept()), sets TCP_NODELAY (http.server
writes the headers and the body separately; without it Nagle holds the body
until the client's delayed ACK, about 40 ms per request on loopback), and
can shut down every open connection (fault injection, stop()).

The double passed in must have a ``verbose`` attribute and a
``_note_tls_failure(exc)`` method (it counts failed handshakes).
"""

import http.server
import socket
import ssl
import threading


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
