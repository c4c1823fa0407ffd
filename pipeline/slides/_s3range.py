"""A read-only, seekable file object over one S3 object, fetched with ranged GET requests.

Parsers that expect a local file (tifffile walking a TIFF's IFD chain) get small reads served
from a block cache, so the header and tag arrays cost a few requests. Bulk data (tiles) bypasses
the cache through :meth:`S3RangeFile.fetch_ranges`, which merges nearby ranges into one request.
Every byte received is counted in ``bytes_fetched``; every request in ``requests``.

Every GET is pinned to the ETag seen when the object was opened (``IfMatch``), so an object
replaced mid-read fails loudly instead of mixing two versions' bytes.
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from pipeline.errors import SlideOpenError, SlideReadError, StorageError

__all__ = ["S3RangeFile", "merge_ranges"]

#: Block of the header cache: TIFF IFDs and tag arrays are small and mostly contiguous.
DEFAULT_BLOCK = 8 * 1024
#: Header-cache capacity in blocks (4 MiB at the default block size).
DEFAULT_MAX_BLOCKS = 512
#: Two requested ranges closer than this are fetched as one request: a round trip costs more than
#: a few KiB of unused bytes (S3 first-byte latency is ~10-50 ms, ~1 MB at 100 MB/s), but a
#: zoned smear's tile ranges are scattered and a larger gap pulls in the tiles between them. On a
#: 5 GP smear's zoned read (bench_smear, 2026-12-03) the tile ranges cost 0.227 of the object in
#: 4,689 requests at 4 KiB (as at 0: only adjacent tiles merge), 0.240 in 4,014 at 16 KiB and
#: 0.317 in 2,731 at 64 KiB; requests run concurrently (``fetch_ranges(workers=)``).
DEFAULT_MERGE_GAP = 4 * 1024
#: Most bytes the file interface (the parser's reads: TIFF header, IFDs, tag arrays) fetches in
#: all. A slide's header is well under 10 MB (tile tables of a 100k x 100k px slide are ~2 MB);
#: a hostile one could declare tag arrays as large as the object, read again and again.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024 * 1024
#: Tries of one ranged GET whose response body breaks off mid-read (see ``S3RangeFile._get``).
_BODY_ATTEMPTS = 4


def merge_ranges(
    order: list[tuple[int, int, int]], gap: int
) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """``(start, stop, members)`` requests for ``order``, ``(offset, length, index)`` sorted by
    offset: ranges within ``gap`` bytes of the request so far join it
    (:meth:`S3RangeFile.fetch_ranges`' rule)."""
    groups: list[tuple[int, int, list[tuple[int, int, int]]]] = []
    k = 0
    while k < len(order):
        start, n, _ = order[k]
        stop = start + n
        j = k + 1
        while j < len(order) and order[j][0] <= stop + gap:
            stop = max(stop, order[j][0] + order[j][1])
            j += 1
        groups.append((start, stop, order[k:j]))
        k = j
    return groups


class S3RangeFile(io.RawIOBase):
    """``s3://bucket/key`` as a read-only binary file.

    ``client``: a boto3 S3 client (caller-configured: endpoint, retries, credentials).
    ``size``/``etag``: pass them when known (from a listing) to skip the HEAD request.
    Raises :class:`~pipeline.errors.SlideOpenError` when the object does not exist or is empty,
    :class:`~pipeline.errors.StorageError` when a request fails after the client's retries or
    the object changed (transient: not a defect of the slide), and
    :class:`~pipeline.errors.SlideReadError` for a read past the object's end (truncated file)
    or once the file interface has fetched more than ``max_header_bytes`` in all (bulk ranges
    from :meth:`fetch_ranges` do not count).
    """

    def __init__(
        self,
        client,
        bucket: str,
        key: str,
        *,
        size: int | None = None,
        etag: str | None = None,
        block_size: int = DEFAULT_BLOCK,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        merge_gap: int = DEFAULT_MERGE_GAP,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ):
        super().__init__()
        if block_size <= 0 or max_blocks <= 0 or merge_gap < 0:
            raise ValueError("block_size and max_blocks must be positive, merge_gap non-negative")
        self.client = client
        self.bucket = bucket
        self.key = key
        self.uri = f"s3://{bucket}/{key}"
        self.block_size = int(block_size)
        self.max_blocks = int(max_blocks)
        self.merge_gap = int(merge_gap)
        self.max_header_bytes = int(max_header_bytes)
        self._header_fetched = 0
        self.bytes_fetched = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._pos = 0
        if size is None or etag is None:
            try:
                head = client.head_object(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001 - botocore's errors have no common base we can rely on
                cause = _client_cause(exc)
                if cause == _NO_SUCH_OBJECT:
                    raise SlideOpenError(self.uri, cause) from exc
                raise StorageError(f"{self.uri}: cannot open the S3 object: {cause}") from exc
            size = int(head["ContentLength"]) if size is None else size
            etag = head.get("ETag") if etag is None else etag
        self.size = int(size)
        # An entity tag is quoted in HTTP; listings often hand it over without the quotes.
        self.etag = f'"{etag.strip(chr(34))}"' if etag else None
        if self.size == 0:
            raise SlideOpenError(self.uri, "empty object (0 bytes)")

    # -- io.RawIOBase ---------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(f"{self.uri}: negative seek position {pos}")
        self._pos = int(pos)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), max(self.size - self._pos, 0))
        if n <= 0:
            return 0
        data = self._read_cached(self._pos, n)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        return self.read(max(self.size - self._pos, 0))

    # -- bulk ranges ----------------------------------------------------------------------------
    def fetch_ranges(self, ranges: list[tuple[int, int]], workers: int = 1) -> list[bytes]:
        """Bytes of each ``(offset, length)`` in ``ranges``, in the given order, bypassing the
        block cache. Ranges within ``merge_gap`` bytes of each other (after sorting) share one
        request; up to ``workers`` requests are in flight at once (S3's first-byte latency, not
        bandwidth, bounds a run of small sequential GETs). Raises
        :class:`~pipeline.errors.SlideReadError` on a short or failed read (the first failure
        when several requests fail)."""
        out: list[bytes | None] = [None] * len(ranges)
        order = sorted((o, n, i) for i, (o, n) in enumerate(ranges) if n > 0)
        for i, (o, n) in enumerate(ranges):
            if n <= 0:
                out[i] = b""
            elif o < 0 or o + n > self.size:
                raise SlideReadError(
                    self.uri,
                    f"bytes {o}-{o + n - 1} lie past the object's {self.size} bytes (truncated)",
                )
        groups = merge_ranges(order, self.merge_gap)

        def fill(group: tuple[int, int, list[tuple[int, int, int]]]) -> None:
            start, stop, members = group
            blob = self._get(start, stop)
            for o, m, i in members:
                out[i] = blob[o - start : o - start + m]

        if workers <= 1 or len(groups) <= 1:
            for g in groups:
                fill(g)
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(groups))) as pool:
                # list() re-raises the first failure in request order, after all have finished.
                list(pool.map(fill, groups))
        return out  # type: ignore[return-value]

    # -- internals ------------------------------------------------------------------------------
    def _read_cached(self, pos: int, n: int) -> bytes:
        bs = self.block_size
        first, last = pos // bs, (pos + n - 1) // bs
        with self._lock:
            missing = [b for b in range(first, last + 1) if b not in self._blocks]
        # One request per run of consecutive missing blocks.
        run: list[int] = []
        for b in missing + [None]:
            if run and (b is None or b != run[-1] + 1):
                start, stop = run[0] * bs, min((run[-1] + 1) * bs, self.size)
                with self._lock:
                    self._header_fetched += stop - start
                    over = self._header_fetched > self.max_header_bytes
                if over:
                    raise SlideReadError(
                        self.uri,
                        f"header reads exceed {self.max_header_bytes} bytes (oversized or "
                        "repeated tag arrays: corrupt or hostile file)",
                    )
                blob = self._get(start, stop)
                with self._lock:
                    for r in run:
                        self._blocks[r] = blob[(r - run[0]) * bs : (r - run[0] + 1) * bs]
                run = []
            if b is not None:
                run.append(b)
        with self._lock:
            parts = []
            for b in range(first, last + 1):
                self._blocks.move_to_end(b)
                parts.append(self._blocks[b])
            while len(self._blocks) > max(self.max_blocks, last - first + 1):
                self._blocks.popitem(last=False)
        data = b"".join(parts)
        off = pos - first * bs
        return data[off : off + n]

    def _get(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` in one ranged GET (clipped to the object)."""
        stop = min(stop, self.size)
        if stop <= start:
            return b""
        kwargs = {"Bucket": self.bucket, "Key": self.key, "Range": f"bytes={start}-{stop - 1}"}
        if self.etag:
            kwargs["IfMatch"] = self.etag
        for attempt in range(1, _BODY_ATTEMPTS + 1):
            try:
                resp = self.client.get_object(**kwargs)
            except Exception as exc:  # noqa: BLE001 - botocore/urllib3 errors have no common base
                # The client already retried this request (its own retry policy): give up.
                raise StorageError(
                    f"{self.uri}: ranged read of bytes {start}-{stop - 1} failed: {_client_cause(exc)}"
                ) from exc
            body = resp["Body"]
            try:
                data = body.read()
                break
            except Exception as exc:  # noqa: BLE001
                # botocore retries a request until its headers arrive, never a body that breaks
                # off afterwards (connection reset, incomplete read): retry that here, as the
                # managed transfer does for staged downloads.
                if attempt == _BODY_ATTEMPTS:
                    raise StorageError(
                        f"{self.uri}: ranged read of bytes {start}-{stop - 1} failed after "
                        f"{attempt} attempts: {_client_cause(exc)}"
                    ) from exc
                time.sleep(min(1.0, 0.05 * 2**attempt))
            finally:
                body.close()
        with self._lock:
            self.requests += 1
            self.bytes_fetched += len(data)
        if len(data) != stop - start:
            raise SlideReadError(
                self.uri,
                f"short ranged read: asked bytes {start}-{stop - 1}, got {len(data)} bytes",
            )
        return data


_NO_SUCH_OBJECT = "no such object"


def _client_cause(exc: BaseException) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {})
        code = str(err.get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return _NO_SUCH_OBJECT
        if code in ("412", "PreconditionFailed"):
            return "the object changed while it was being read (ETag mismatch)"
        if code in ("403", "AccessDenied"):
            return "access denied"
        msg = err.get("Message") or ""
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        head = f"{code} (HTTP {status})" if status else code
        return f"{head}: {msg}".strip(" :") or type(exc).__name__
    return " ".join(str(exc).split()) or type(exc).__name__
