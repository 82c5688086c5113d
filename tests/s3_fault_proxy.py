"""A small HTTP proxy in front of a real S3 store that answers a share of requests with ``503 SlowDown`` and
resets another share of connections, as an overloaded object store does.

Requests are passed through unchanged (the Host header too, so SigV4 signatures stay valid). Faults are
deterministic: every ``slowdown_every``-th request gets a 503, every ``reset_every``-th (of the rest) a
connection reset, so a run through the proxy is reproducible."""
from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

HOST = "127.0.0.1"
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, slowdown_every: int = 5, reset_every: int = 13):
        self.upstream = urlsplit(upstream)
        self.slowdown_every, self.reset_every = slowdown_every, reset_every
        self.requests = self.slowdowns = self.resets = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((HOST, 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://{HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            n = self.requests
            if n % self.slowdown_every == 0:
                self.slowdowns += 1
                return "slowdown"
            if n % self.reset_every == 0:
                self.resets += 1
                return "reset"
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._fault()
                if fault == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN)
                    return
                if fault == "reset":  # RST instead of an answer: linger 0, then close
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    up.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    resp = up.getresponse()
                    data = resp.read()
                finally:
                    up.close()
                self.send_response(resp.status, resp.reason)
                # a HEAD keeps the object's length (its body is empty); a GET's body is sent whole
                hop = ("transfer-encoding", "connection") + (() if self.command == "HEAD" else ("content-length",))
                for name, value in resp.getheaders():
                    if name.lower() not in hop:
                        self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler
