"""A real S3-compatible server on loopback for the object-storage tests: moto's server, behind a fault proxy.

``S3Server`` starts moto's threaded server (``moto.server.ThreadedMotoServer``) on 127.0.0.1 and, in front
of it, a small HTTP proxy that forwards every request as it came and relays the answer — unless a
``Fault`` matches: then it answers an S3 error (``status``: e.g. 503 ``SlowDown``, 403 ``AccessDenied``) or
relays only the first ``after`` bytes of the body and drops the connection (``cut``). Clients (boto3, on
the driver and in Ray's workers) talk to ``endpoint`` (the proxy). ``served`` logs every answer: method,
key, Range header, status and body bytes sent.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Fault:
    """Answer requests whose path contains ``match`` (and method in ``methods``) with a fault, ``times`` times
    (-1: always). ``kind``: ``"status"`` (an S3 error ``code`` with HTTP ``status``) or ``"cut"`` (the body cut
    after ``after`` bytes)."""

    match: str
    kind: str = "status"
    status: int = 503
    code: str = "SlowDown"
    after: int = 0
    times: int = 1
    methods: tuple[str, ...] = ("GET",)


@dataclass(frozen=True)
class Served:
    method: str
    path: str  # /bucket/key, unquoted
    range: str | None
    status: int
    body_bytes: int


class S3Server:
    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.upstream = (host, port)
        self.faults: list[Fault] = []
        self.served: list[Served] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = unquote(urlsplit(self.path).path)
                fault = server._take_fault(self.command, path)
                if fault is not None and fault.kind == "status":
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code><Message>injected by the "
                           f"test proxy</Message><Resource>{path}</Resource></Error>").encode()
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    server._log(self.command, path, self.headers.get("Range"), fault.status, 0)
                    return
                conn = http.client.HTTPConnection(*server.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None,
                                 headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                    r = conn.getresponse()
                    data = r.read()
                    self.send_response(r.status)
                    for k, v in r.getheaders():
                        if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", r.getheader("Content-Length") or str(len(data)))
                    self.end_headers()
                    if fault is not None and fault.kind == "cut":
                        data = data[: fault.after]
                        self.close_connection = True
                    if self.command != "HEAD":
                        self.wfile.write(data)
                        self.wfile.flush()
                    server._log(self.command, path, self.headers.get("Range"), r.status, 0 if self.command == "HEAD" else len(data))
                finally:
                    conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

        self._proxy = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._proxy.daemon_threads = True
        self._thread = threading.Thread(target=self._proxy.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._proxy.server_address[1]}"

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.times != 0 and method in f.methods and f.match in path:
                    if f.times > 0:
                        f.times -= 1
                    return f
        return None

    def _log(self, method: str, path: str, rng: str | None, status: int, n: int) -> None:
        with self._lock:
            self.served.append(Served(method, path, rng, status, n))

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def stop(self) -> None:
        self._proxy.shutdown()
        self._proxy.server_close()
        self._moto.stop()
