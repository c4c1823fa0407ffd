"""A file-backed S3 endpoint on 127.0.0.1 for gigabyte objects (HEAD and ranged GET only).

moto's server (5.2.5), which the tests and the other benchmarks use, reads and copies the whole
object on every ranged GET (``FakeKey.value``): ~1 GB per request for a 5 GP slide, hours for
the thousands of tile reads one zoned slide makes. This endpoint answers the two calls a ranged
slide read makes (``head_object``, ``get_object`` with ``Range`` and ``IfMatch``) over real HTTP
from a file on disk, so boto3, the client's retries and the bytes on the wire are the job's own;
only the server is smaller. It counts the body bytes it sends. Nothing else of S3 is served.
"""

from __future__ import annotations

import hashlib
import re
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class RangeS3:
    """Serve ``files`` ({(bucket, key): path}) at ``.url`` (a context manager); ``.sent`` is the
    body bytes sent so far."""

    def __init__(self, files: dict[tuple[str, str], Path]):
        self.files = {k: Path(v) for k, v in files.items()}
        self.sent = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _target(self):
                parts = unquote(self.path.split("?", 1)[0]).lstrip("/").split("/", 1)
                path = outer.files.get(tuple(parts)) if len(parts) == 2 else None
                if path is None:
                    self._error(404, "NoSuchKey")
                    return None
                st = path.stat()
                etag = (
                    '"' + hashlib.md5(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest() + '"'
                )
                want = self.headers.get("If-Match")
                if want is not None and want != etag:
                    self._error(412, "PreconditionFailed")
                    return None
                return path, st, etag

            def _error(self, code: int, name: str) -> None:
                body = f"<Error><Code>{name}</Code></Error>".encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _headers(self, st, etag, length: int) -> None:
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))

            def do_HEAD(self):
                t = self._target()
                if t is None:
                    return
                _, st, etag = t
                self.send_response(200)
                self._headers(st, etag, st.st_size)
                self.end_headers()

            def do_GET(self):
                t = self._target()
                if t is None:
                    return
                path, st, etag = t
                start, end = 0, st.st_size - 1
                rng = self.headers.get("Range")
                if rng is not None:
                    m = _RANGE.match(rng.strip())
                    if m is None or int(m.group(1)) >= st.st_size:
                        self._error(416, "InvalidRange")
                        return
                    start = int(m.group(1))
                    end = min(int(m.group(2)), end) if m.group(2) else end
                with open(path, "rb") as f:
                    f.seek(start)
                    body = f.read(end - start + 1)
                self.send_response(206 if rng is not None else 200)
                self._headers(st, etag, len(body))
                if rng is not None:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{st.st_size}")
                self.end_headers()
                self.wfile.write(body)
                with outer._lock:
                    outer.sent += len(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RangeS3:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
