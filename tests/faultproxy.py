"""A fault-injecting HTTP proxy for S3 on 127.0.0.1, placed in front of a real S3 server (moto).

Clients (boto3, the nightly job, its Ray workers) use the proxy's URL as their S3 endpoint; every
request is forwarded unchanged to the upstream server unless a :class:`FaultRule` matches it, in
which case the rule's fault is injected instead of (or on top of) the real answer:

==============  ===================================================================================
``reset``       read the request, then close the socket with an RST (no response at all)
``500``         ``500 InternalError`` with an S3 XML error body
``503``         ``503 SlowDown`` with an S3 XML error body
``403``         ``403 AccessDenied`` (a permanent error: not retried by clients)
``throttle``    ``429``/``503 Throttling`` (``status=``) with a ``Retry-After`` header
``truncate``    forward, send the real headers (full ``Content-Length``) but only part of the body,
                then close the connection
``delay``       sleep ``delay_s`` seconds, then forward normally
==============  ===================================================================================

A rule matches on HTTP method, a regular expression searched in the *decoded* path
(``/bucket/key``) and the S3 operation (see :func:`classify`). Which of its matching requests get
the fault: the first ``first`` ones, every ``every``-th one, or each with ``probability`` drawn from
a generator seeded with ``seed`` (deterministic for a given request order); at most ``limit``
faults in all. Counters (``matched``/``injected`` per rule, requests per operation) are kept under
one lock, so the proxy is safe with boto3's concurrent transfers and many Ray workers.

Only path-style addressing is supported, which is what botocore uses for an IP-address endpoint.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["FAULTS", "OPERATIONS", "FaultRule", "FaultProxy", "classify"]

FAULTS = ("reset", "500", "503", "403", "throttle", "truncate", "delay")
OPERATIONS = (
    "list",  # GET on a bucket (ListObjects/ListObjectsV2, list-type or no key)
    "list_buckets",  # GET /
    "get",  # GET of an object, whole
    "ranged_get",  # GET of an object with a Range header (managed transfers)
    "head",  # HEAD of a bucket or object
    "put",  # PUT of a whole object (also CopyObject)
    "multipart",  # CreateMultipartUpload / UploadPart / Complete / Abort
    "delete",  # DELETE of an object, or POST ?delete
    "bucket",  # any other bucket-level call (CreateBucket, GetBucketLocation, ...)
)

# Hop-by-hop headers are never forwarded (RFC 9110 §7.6.1); Expect is answered by the proxy itself.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "content-length",
}

_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
    "throttle": (503, "Throttling", "Rate exceeded."),
}


def classify(method: str, path: str, query: str, headers) -> str:
    """The S3 operation of a path-style request; one of :data:`OPERATIONS`.

    ``path`` is the raw (still percent-encoded) path, ``query`` the raw query string,
    ``headers`` any mapping with case-insensitive ``get`` (``http.client.HTTPMessage``).
    """
    method = method.upper()
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    parts = path.lstrip("/").split("/", 1)
    bucket = parts[0]
    key = parts[1] if len(parts) > 1 else ""
    if not bucket:
        return "list_buckets" if method == "GET" else "bucket"
    if not key:
        if method == "GET" and ("list-type" in params or not params or "prefix" in params):
            return "list"
        if method == "HEAD":
            return "head"
        if method == "POST" and "delete" in params:
            return "delete"
        return "bucket"
    if "uploads" in params or "uploadId" in params:
        return "multipart"
    if method == "GET":
        return "ranged_get" if headers.get("Range") else "get"
    if method == "HEAD":
        return "head"
    if method == "PUT":
        return "put"
    if method == "DELETE":
        return "delete"
    return "bucket"


@dataclass
class FaultRule:
    """One fault and the requests it applies to.

    Attributes:
        fault: one of :data:`FAULTS`.
        op: S3 operation(s) to match (a name of :data:`OPERATIONS` or a tuple of them); None = any.
        method: HTTP method to match (``"GET"``...); None = any.
        path: regular expression searched in the decoded path ``/bucket/key``; None = any.
        first: inject on the first ``first`` matching requests only.
        every: inject on every ``every``-th matching request (the ``every``-th, ``2*every``-th...).
        probability: inject on each matching request with this probability (seeded by ``seed``).
        limit: never inject more than ``limit`` faults with this rule.
        delay_s: seconds to wait (``delay``; also applied before any other fault when set).
        status: HTTP status of a ``throttle`` (429 or 503).
        retry_after: value of the ``Retry-After`` header of a ``throttle``, seconds.
        truncate_fraction: part of the body sent before closing (``truncate``), 0 ≤ f < 1.
        name: label used in :meth:`FaultProxy.stats`; defaults to ``fault@op``.
    """

    fault: str
    op: str | tuple[str, ...] | None = None
    method: str | None = None
    path: str | None = None
    first: int | None = None
    every: int | None = None
    probability: float | None = None
    seed: int = 0
    limit: int | None = None
    delay_s: float = 0.0
    status: int = 503
    retry_after: int = 1
    truncate_fraction: float = 0.5
    name: str = ""
    matched: int = field(default=0, init=False)
    injected: int = field(default=0, init=False)
    injected_paths: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault: {self.fault!r} is not one of {', '.join(FAULTS)}")
        ops = (self.op,) if isinstance(self.op, str) else (self.op or ())
        for op in ops:
            if op not in OPERATIONS:
                raise ValueError(f"op: {op!r} is not one of {', '.join(OPERATIONS)}")
        self._ops = frozenset(ops)
        if sum(x is not None for x in (self.first, self.every, self.probability)) > 1:
            raise ValueError("first/every/probability: give at most one trigger")
        if self.first is not None and self.first < 0:
            raise ValueError(f"first: must be >= 0, got {self.first}")
        if self.every is not None and self.every < 1:
            raise ValueError(f"every: must be >= 1, got {self.every}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability: must be in [0, 1], got {self.probability}")
        if self.fault == "throttle" and self.status not in (429, 503):
            raise ValueError(f"status: a throttle is 429 or 503, got {self.status}")
        if not 0.0 <= self.truncate_fraction < 1.0:
            raise ValueError(f"truncate_fraction: must be in [0, 1), got {self.truncate_fraction}")
        if self.delay_s < 0:
            raise ValueError(f"delay_s: must be >= 0, got {self.delay_s}")
        self._regex = re.compile(self.path) if self.path is not None else None
        self._rng = random.Random(self.seed)
        if not self.name:
            self.name = f"{self.fault}@{'|'.join(sorted(self._ops)) or 'any'}"

    def _matches(self, method: str, path: str, op: str) -> bool:
        if self.method is not None and method.upper() != self.method.upper():
            return False
        if self._ops and op not in self._ops:
            return False
        return self._regex is None or self._regex.search(path) is not None

    def _decide(self) -> bool:
        """Count one matching request and say whether it gets the fault (caller holds the lock)."""
        self.matched += 1
        if self.limit is not None and self.injected >= self.limit:
            return False
        if self.first is not None:
            hit = self.matched <= self.first
        elif self.every is not None:
            hit = self.matched % self.every == 0
        elif self.probability is not None:
            hit = self._rng.random() < self.probability
        else:
            hit = True
        if hit:
            self.injected += 1
        return hit


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    proxy: FaultProxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and the 100-continue handshake boto3 uses on PUT
    timeout = 60  # an idle keep-alive connection frees its thread after this many seconds
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # the tests read counters, not an access log

    def handle(self) -> None:
        # The client went away (often on purpose: we reset or truncated): nothing to report.
        with contextlib.suppress(OSError):
            super().handle()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _dispatch(self) -> None:
        proxy = self.server.proxy
        raw_path, _, query = self.path.partition("?")
        path = urllib.parse.unquote(raw_path)
        op = classify(self.command, raw_path, query, self.headers)
        body = self._read_body()
        rule = proxy._pick(self.command, path, op)
        if rule is not None and rule.delay_s:
            time.sleep(rule.delay_s)
        fault = rule.fault if rule is not None else None
        if fault == "reset":
            self._reset()
            return
        if fault in _ERRORS:
            self._send_error(rule, path)
            return
        status, reason, headers, payload = proxy._forward(
            self.command, self.path, self.headers, body
        )
        self.send_response(status, reason)
        for k, v in headers:
            if k.lower() not in _HOP:
                self.send_header(k, v)
        if self.command == "HEAD":
            length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
            self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(payload)))
        if fault == "truncate" and payload:
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload[: int(len(payload) * rule.truncate_fraction)])
            self.wfile.flush()
            self.close_connection = True
            self._reset()
            return
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _dispatch

    def _send_error(self, rule: FaultRule, path: str) -> None:
        status, code, message = _ERRORS[rule.fault]
        if rule.fault == "throttle":
            status = rule.status
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{_xml_escape(path)}</Resource>"
            f"<RequestId>faultproxy-{rule.injected}</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        if rule.fault == "throttle":
            self.send_header("Retry-After", str(rule.retry_after))
        if self.command == "HEAD":
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        self.wfile.write(xml)

    def _reset(self) -> None:
        # SO_LINGER 0 turns close() into an RST: the client sees "connection reset by peer".
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class FaultProxy:
    """A fault-injecting S3 proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``).

    Use as a context manager or call :meth:`start`/:meth:`stop`. ``url`` is the endpoint to give
    clients. Rules are tried in the order added; the first rule that matches a request *and*
    decides to inject wins (a matching rule that does not inject still counts the request).
    """

    def __init__(self, upstream: str, port: int = 0):
        u = urllib.parse.urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream: expected http://host:port, got {upstream!r}")
        self.upstream = upstream
        self._up_host, self._up_port = u.hostname, u.port or 80
        self._port = port
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self.requests: Counter[str] = Counter()  # S3 operation -> requests seen
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="faultproxy",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("fault proxy is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The endpoint clients use, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    # -- rules -----------------------------------------------------------------------------------
    def add(self, fault: str, **kwargs) -> FaultRule:
        """Add a rule (keyword arguments of :class:`FaultRule`); returns it for its counters."""
        rule = FaultRule(fault, **kwargs)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule and reset the request counters."""
        with self._lock:
            self._rules.clear()
            self.requests.clear()

    @property
    def rules(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules)

    def stats(self) -> dict:
        """``{"requests": {op: n}, "rules": {name: {"matched": n, "injected": n}}}``."""
        with self._lock:
            return {
                "requests": dict(self.requests),
                "rules": {
                    r.name: {"matched": r.matched, "injected": r.injected} for r in self._rules
                },
            }

    def _pick(self, method: str, path: str, op: str) -> FaultRule | None:
        with self._lock:
            self.requests[op] += 1
            for rule in self._rules:
                if rule._matches(method, path, op) and rule._decide():
                    rule.injected_paths.append(path)
                    return rule
        return None

    # -- forwarding ------------------------------------------------------------------------------
    def _forward(self, method: str, target: str, headers, body: bytes):
        conn = http.client.HTTPConnection(self._up_host, self._up_port, timeout=120)
        try:
            fwd = {k: v for k, v in headers.items() if k.lower() not in _HOP}
            fwd["Content-Length"] = str(len(body))
            conn.request(method, target, body=body, headers=fwd)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, resp.reason, resp.getheaders(), payload
        finally:
            conn.close()
