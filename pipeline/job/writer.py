"""Parquet outputs and the commit protocol that makes a run exactly-once across crashes.

Layout (docs/interfaces.md)::

    OUTPUT/cells/run_date=D/part-<chunk>.parquet     one file per committed chunk of slides
    OUTPUT/slides/run_date=D/part-<chunk>.parquet    the chunk's slide outcomes
    OUTPUT/runs/run_date=D/run-<run_id>.parquet      one row per run
    OUTPUT/_staging/<run_id>/<chunk>/...             written first, invisible to queries
    OUTPUT/_journal/<chunk>.json                     the commit record of a chunk being published
    OUTPUT/_probe/<run_id>.probe                     the run's write probe, deleted at once

Commit of a chunk: (1) write its files under ``_staging/``; (2) write the journal listing every
``staged -> visible`` move: this is the commit point; (3) publish the moves, cells before slides
(local: rename; S3: copy + delete); (4) delete the journal. A restart first calls
:meth:`OutputWriter.recover`: every journal left behind is rolled forward (publishing is
idempotent), then everything left under ``_staging/`` (never journalled, so never visible) is
deleted. A slide counts as done only through its ``status == "ok"`` row in ``slides/``, which is
published after its cells, so "done" always implies "cells visible", and a chunk is either wholly
visible or, after recovery, wholly absent and processed again. Chunk file names derive from the
chunk's slide ids and model version, so the same chunk always maps to the same files.
One writer per OUTPUT at a time (the CronJob forbids concurrent runs).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError, StorageError
from pipeline.job.identity import chunk_name
from pipeline.job.storage import Storage, is_s3, join_uri
from pipeline.schema import CELL_SCHEMA, RUN_SCHEMA, SLIDE_SCHEMA

__all__ = ["PERMANENT_FAILURES", "InjectedFault", "ChunkCommit", "Recovery", "OutputWriter", "visible_parquet"]


#: Reason prefixes (exception class names) of failures that depend only on the slide's bytes.
PERMANENT_FAILURES: tuple[str, ...] = ("SlideOpenError:", "SlideReadError:", "SlideTooLargeError:", "ScaleError:")


class InjectedFault(PipelineError):
    """Raised on purpose by the fault-injection test hook (``--fault-after-chunks``)."""


@dataclass(frozen=True)
class ChunkCommit:
    name: str
    slide_ids: tuple[str, ...]
    cells: int
    files: tuple[str, ...]


@dataclass
class Recovery:
    rolled_forward: list[str] = field(default_factory=list)  # chunk names completed
    orphans_deleted: int = 0  # staged files of chunks that never reached their commit point


def _rel_parts(root: str, uri: str) -> list[str]:
    norm_root = root.rstrip("/\\").replace("\\", "/")
    return uri.replace("\\", "/")[len(norm_root):].strip("/").split("/")


def visible_parquet(storage: Storage, root: str, table: str) -> list[str]:
    """Committed ``*.parquet`` files of ``table``: no path component starts with ``_`` or ``.``."""
    prefix = join_uri(root, table)
    if not is_s3(prefix):
        from pathlib import Path

        if not Path(prefix).is_dir():
            return []
    else:
        prefix += "/"
    out = []
    for obj in storage.list(prefix):
        rel = _rel_parts(root, obj.uri)
        if rel and rel[-1].endswith(".parquet") and not any(p.startswith(("_", ".")) for p in rel):
            out.append(obj.uri)
    return out


def _to_parquet(rows: list[dict], schema: pa.Schema) -> bytes:
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=8192)
    return buf.getvalue()


class OutputWriter:
    """Writes one run's chunks and run row under ``root`` (a local directory or ``s3://`` URI).

    ``fault_after_chunks``/``fault_point`` are the crash-test hook: ``after_commit`` raises after
    chunk N is committed; ``after_journal``/``mid_publish`` raise while committing chunk N + 1,
    after its journal is written / after its cells are published.
    """

    def __init__(self, storage: Storage, root: str, run_id: str, run_date: str, model_version: str,
                 fault_after_chunks: int | None = None, fault_point: str = "after_commit"):
        self.storage = storage
        self.root = root
        self.run_id = run_id
        self.run_date = run_date
        self.model_version = model_version
        self.fault_after_chunks = fault_after_chunks
        self.fault_point = fault_point
        self.committed: list[ChunkCommit] = []

    # -- paths -----------------------------------------------------------------------------
    def _uri(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    def _journal_prefix(self) -> str:
        p = self._uri("_journal")
        return p + "/" if is_s3(p) else p

    # -- recovery and state ----------------------------------------------------------------
    def recover(self) -> Recovery:
        """Roll forward every half-published chunk, then delete never-committed staging."""
        rec = Recovery()
        journals = [o.uri for o in self._list_or_empty(self._journal_prefix()) if o.uri.endswith(".json")]
        for juri in sorted(journals):
            try:
                record = json.loads(self.storage.read_bytes(juri))
                moves = record["moves"]
            except (ValueError, KeyError, TypeError) as exc:
                raise StorageError(f"{juri}: unreadable commit journal ({exc}); inspect it by hand") from None
            for src, dst in moves:
                self.storage.publish(src, dst)
            self.storage.delete(juri)
            rec.rolled_forward.append(record.get("chunk", juri))
        staging = self._uri("_staging")
        for obj in self._list_or_empty(staging + "/" if is_s3(staging) else staging):
            self.storage.delete(obj.uri)
            rec.orphans_deleted += 1
        return rec

    def probe(self) -> None:
        """Write and delete one small object under ``OUTPUT/_probe/`` (never read by queries).

        Listing succeeds on locations that cannot be written (an S3 prefix whose PUT is denied, a
        local path under a regular file or in a read-only directory), and the first real write
        would come only at the first chunk commit, after slides were read, detected and captioned.
        The run calls this before any work, so such a location fails in seconds with
        :class:`~pipeline.errors.StorageError` naming OUTPUT and the cause. Deleting is probed too:
        an S3 publish (copy + delete) and recovery both need it.
        """
        uri = self._uri("_probe", f"{self.run_id}.probe")
        try:
            self.storage.write_bytes(uri, f"write probe of run {self.run_id}\n".encode())
            self.storage.delete(uri)
        except StorageError as exc:
            raise StorageError(f"{self.root}: output location is not writable: {exc}") from None
        if not is_s3(uri):
            import contextlib
            from pathlib import Path

            # Leave no empty directory behind; another run's probe may still be in it.
            with contextlib.suppress(OSError):
                Path(uri).parent.rmdir()

    def _list_or_empty(self, prefix: str):
        if not is_s3(prefix):
            from pathlib import Path

            if not Path(prefix).is_dir():
                return []
        return list(self.storage.list(prefix))

    def done_slides(self, model_version: str, retry_failed: bool = False) -> set[str]:
        """Slide ids an earlier run with ``model_version`` settled: ``status == "ok"``, or failed
        for a reason inherent to the slide's bytes (:data:`PERMANENT_FAILURES`: the same identity
        fails the same way again) unless ``retry_failed``. Transient failures (storage, crashes)
        are retried by the next run."""
        done: set[str] = set()
        cols = ("slide_id", "status", "model_version", "reason")
        for uri in visible_parquet(self.storage, self.root, "slides"):
            try:
                t = pq.read_table(io.BytesIO(self.storage.read_bytes(uri)), columns=list(cols))
            except (pa.ArrowException, OSError) as exc:
                if isinstance(exc, StorageError):
                    raise
                raise StorageError(f"{uri}: unreadable slides file ({exc})") from None
            for sid, status, mv, reason in zip(*(t.column(c).to_pylist() for c in cols)):
                if mv != model_version:
                    continue
                if status == "ok" or (status == "failed" and not retry_failed
                                      and (reason or "").startswith(PERMANENT_FAILURES)):
                    done.add(sid)
        return done

    # -- commits ---------------------------------------------------------------------------
    def _fault(self, point: str, chunk_number: int) -> None:
        n = self.fault_after_chunks
        if n is None or point != self.fault_point:
            return
        due = chunk_number == n if point == "after_commit" else chunk_number == n + 1
        if due:
            raise InjectedFault(f"injected fault at {point} of chunk {chunk_number} (--fault-after-chunks {n})")

    def commit_chunk(self, cell_rows: list[dict], slide_rows: list[dict]) -> ChunkCommit:
        """Atomically publish one chunk: its cells (may be empty) and one row per slide in it."""
        if not slide_rows:
            raise ValueError("a chunk holds at least one slide")
        ids = tuple(r["slide_id"] for r in slide_rows)
        name = chunk_name(ids, self.model_version)
        part = f"run_date={self.run_date}"
        stage = ("_staging", self.run_id, name)
        moves: list[tuple[str, str]] = []
        if cell_rows:
            src = self._uri(*stage, "cells.parquet")
            self.storage.write_bytes(src, _to_parquet(cell_rows, CELL_SCHEMA))
            moves.append((src, self._uri("cells", part, f"part-{name}.parquet")))
        src = self._uri(*stage, "slides.parquet")
        self.storage.write_bytes(src, _to_parquet(slide_rows, SLIDE_SCHEMA))
        moves.append((src, self._uri("slides", part, f"part-{name}.parquet")))
        number = len(self.committed) + 1
        journal = self._uri("_journal", f"{name}.json")
        record = {"chunk": name, "run_id": self.run_id, "moves": moves, "slide_ids": list(ids),
                  "written_at": datetime.now(UTC).isoformat()}
        self.storage.write_bytes(journal, json.dumps(record, indent=1).encode())
        self._fault("after_journal", number)
        for i, (src, dst) in enumerate(moves):
            self.storage.publish(src, dst)
            if i == 0 and len(moves) > 1:
                self._fault("mid_publish", number)
        self.storage.delete(journal)
        commit = ChunkCommit(name, ids, len(cell_rows), tuple(dst for _, dst in moves))
        self.committed.append(commit)
        self._fault("after_commit", number)
        return commit

    def write_skipped(self, rows: list[dict]) -> str:
        """``--record-skipped``: one file of ``status == "skipped"`` rows, named after the run (never
        a chunk name, so it cannot replace a chunk's rows; skipped rows never make a slide done)."""
        uri = self._uri("slides", f"run_date={self.run_date}", f"skipped-{self.run_id}.parquet")
        self.storage.write_bytes(uri, _to_parquet(rows, SLIDE_SCHEMA))
        return uri

    def write_run(self, row: dict) -> str:
        """Publish the run's one-row table (a single object: a PUT/rename is already atomic)."""
        uri = self._uri("runs", f"run_date={self.run_date}", f"run-{self.run_id}.parquet")
        self.storage.write_bytes(uri, _to_parquet([row], RUN_SCHEMA))
        return uri


def read_table(storage: Storage, uris: Iterable[str]) -> pa.Table | None:
    """Concatenate Parquet files (used by the summary and tests); ``None`` when there are none."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in uris]
    return pa.concat_tables(tables) if tables else None
