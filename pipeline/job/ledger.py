"""The done-set index: which slides earlier runs settled, without reading every ``slides/`` file.

``OUTPUT/_index/done.parquet`` holds, for every ``slides/`` file it covers, that file's name
(relative to ``slides/``), listed size and ETag, and per row of the file: ``slide_id``,
``status``, ``model_version`` and ``permanent`` (a failure the same identity repeats). A file with
no rows has one marker row with a null ``slide_id``, so that it counts as covered.

The index is a cache, never the truth: :meth:`DoneIndex.refresh` lists ``slides/`` once, drops
entries of files that are gone or changed (size or ETag differ: recovery rolled a chunk back, a
chunk was re-committed under the same name, someone deleted a file), reads only the files it
does not cover (normally none, or the last run's few if that run died before updating it) and,
when asked to, writes the result back. So whatever recovery publishes or rolls back is reflected
at the next read, and a missing, unreadable or foreign index is rebuilt from ``slides/``. Start-up
costs one listing plus one small file instead of one read per past chunk
(``bench/bench_driver.py``: 10,000 past runs).

The index is written only by the run holding the lease (the write is fenced), at start-up after
recovery and at the end of the run; a dry run reads it but never writes.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StorageError
from pipeline.job.storage import Storage, is_s3, join_uri

__all__ = ["DoneIndex", "INDEX_SCHEMA", "index_uri"]

INDEX_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("slide_id", pa.string()),
        ("status", pa.string()),
        ("model_version", pa.string()),
        ("permanent", pa.bool_()),
    ]
)
#: Index files larger than this are not one this module wrote for any plausible output (bytes).
MAX_INDEX_BYTES = 1 << 30
_READERS = 8  # files read at once while (re)building: S3 reads are latency-bound

# open_slide's texts for a missing or unreadable local file: the worker's environment, not the
# bytes, though old rows recorded them as SlideOpenError.
_LEGACY_TRANSIENT = (": no such file", ": permission denied")


def index_uri(root: str) -> str:
    return join_uri(root, "_index", "done.parquet")


def _permanent(status: str | None, cls: str | None, reason: str | None) -> bool:
    from pipeline.job.writer import PERMANENT_FAILURES
    from pipeline.schema import PERMANENT_FAILURE_CLASSES

    if status != "failed":
        return False
    if cls is not None:
        return cls in PERMANENT_FAILURE_CLASSES
    text = reason or ""
    return text.startswith(PERMANENT_FAILURES) and not text.endswith(_LEGACY_TRANSIENT)


class DoneIndex:
    """The done index of OUTPUT ``root``. ``notes`` collects one line per repair (rebuilt,
    dropped entries); ``reads`` counts the ``slides/`` files read by the last refresh."""

    def __init__(self, storage: Storage, root: str):
        self.storage, self.root = storage, root
        self.uri = index_uri(root)
        self._slides = join_uri(root, "slides")
        self.table: pa.Table = INDEX_SCHEMA.empty_table()
        self.notes: list[str] = []
        self.reads = 0

    def _rel(self, uri: str) -> str:
        return uri[len(self._slides) :].lstrip("/\\").replace("\\", "/")

    def _load(self) -> pa.Table:
        try:
            got = self.storage.read_versioned(self.uri, MAX_INDEX_BYTES)
        except StorageError as exc:
            self.notes.append(f"{self.uri}: unreadable ({exc}); rebuilding it from slides/")
            return INDEX_SCHEMA.empty_table()
        if got is None:
            return INDEX_SCHEMA.empty_table()
        data, _ = got
        try:
            if len(data) > MAX_INDEX_BYTES:
                raise ValueError(f"larger than {MAX_INDEX_BYTES} bytes")
            table = pq.read_table(io.BytesIO(data))
            if not table.schema.equals(INDEX_SCHEMA, check_metadata=False):
                raise ValueError("not the index schema")
        except (pa.ArrowException, OSError, ValueError) as exc:
            self.notes.append(f"{self.uri}: not a done index ({exc}); rebuilding it from slides/")
            return INDEX_SCHEMA.empty_table()
        return table

    def _read_file(self, uri: str, size: int, etag: str) -> pa.Table:
        rel = self._rel(uri)
        try:
            pf = pq.ParquetFile(io.BytesIO(self.storage.read_bytes(uri)))
            names = pf.schema_arrow.names
            cols = [
                c
                for c in ("slide_id", "status", "model_version", "reason", "failure_class")
                if c in names
            ]
            t = pf.read(columns=cols)
        except (pa.ArrowException, OSError) as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"{uri}: unreadable slides file ({exc})") from None

        def col(name):
            return t.column(name).to_pylist() if name in cols else [None] * t.num_rows

        sids, statuses, mvs = col("slide_id"), col("status"), col("model_version")
        perm = [
            _permanent(s, c, r)
            for s, c, r in zip(statuses, col("failure_class"), col("reason"), strict=True)
        ]
        n = t.num_rows
        if n == 0:
            sids, statuses, mvs, perm, n = [None], [None], [None], [False], 1
        return pa.table(
            {
                "file": [rel] * n,
                "size": [size] * n,
                "etag": [etag] * n,
                "slide_id": sids,
                "status": statuses,
                "model_version": mvs,
                "permanent": perm,
            },
            schema=INDEX_SCHEMA,
        )

    def refresh(self, fence: Callable[[str], None] | None = None, write: bool = False) -> DoneIndex:
        """Validate the stored index against one listing of ``slides/``, read the files it does
        not cover, and (``write``) store the result when it changed, after ``fence(what)``."""
        stored = self._load()
        listed: dict[str, tuple[str, int, str]] = {}
        prefix = join_uri(self.root, "slides")
        if is_s3(prefix) or _is_dir(prefix):
            # The same rule as writer.visible_parquet (what queries read), on one listing.
            for o in self.storage.list(prefix + "/" if is_s3(prefix) else prefix):
                rel = self._rel(o.uri)
                parts = rel.split("/")
                if parts[-1].endswith(".parquet") and not any(
                    p.startswith(("_", ".")) for p in parts
                ):
                    listed[rel] = (o.uri, int(o.size), str(o.etag))
        keys = {rel: (size, etag) for rel, (_, size, etag) in listed.items()}
        # Compared per file, not per row: the index's distinct (file, size, etag) triples.
        triples = (
            stored.select(["file", "size", "etag"]).group_by(["file", "size", "etag"]).aggregate([])
        )
        cols = [triples.column(c).to_pylist() for c in ("file", "size", "etag")]
        stale = {f for f, sz, et in zip(*cols, strict=True) if keys.get(f) != (sz, et)}
        dropped = len(stale)
        kept = stored
        if stale:
            files = stored.column("file").to_pylist()
            sizes = stored.column("size").to_pylist()
            etags = stored.column("etag").to_pylist()
            keep = [keys.get(f) == (sz, et) for f, sz, et in zip(files, sizes, etags, strict=True)]
            kept = stored.filter(pa.array(keep, pa.bool_()))
        if dropped:
            self.notes.append(
                f"{self.uri}: dropped {dropped} files no longer in slides/ (or changed)"
            )
        covered = set(kept.column("file").to_pylist())
        missing = [v for rel, v in sorted(listed.items()) if rel not in covered]
        self.reads = len(missing)
        if missing:
            with ThreadPoolExecutor(min(_READERS, len(missing))) as pool:
                parts = list(pool.map(lambda v: self._read_file(*v), missing))
            kept = pa.concat_tables([kept, *parts])
        self.table = kept
        if write and (missing or dropped or self.notes):
            if fence is not None:
                fence(f"updating {self.uri}")
            buf = io.BytesIO()
            pq.write_table(self.table, buf, compression="zstd")
            self.storage.write_bytes(self.uri, buf.getvalue())
        return self

    def done(self, model_version: str, retry_failed: bool = False) -> set[str]:
        """Slide ids settled with ``model_version`` (see ``OutputWriter.done_slides``)."""
        t = self.table
        if t.num_rows == 0:
            return set()
        import pyarrow.compute as pc

        mine = pc.equal(t.column("model_version"), model_version)
        settled = pc.equal(t.column("status"), "ok")
        if not retry_failed:
            settled = pc.or_(
                settled, pc.and_(pc.equal(t.column("status"), "failed"), t.column("permanent"))
            )
        picked = t.filter(pc.and_(mine, settled))
        return {s for s in picked.column("slide_id").to_pylist() if s is not None}


def _is_dir(path: str) -> bool:
    from pathlib import Path

    return Path(path).is_dir()
