"""Parquet outputs and the commit protocol that makes a run exactly-once across crashes.

Layout (docs/interfaces.md)::

    OUTPUT/cells/run_date=D/part-<chunk>.parquet     one file per committed chunk of slides
    OUTPUT/slides/run_date=D/part-<chunk>.parquet    the chunk's slide outcomes
    OUTPUT/runs/run_date=D/run-<run_id>.parquet      one row per run
    OUTPUT/_lease                                    the run lease (pipeline/job/lease.py)
    OUTPUT/_staging/<run_id>/<chunk>/...             written first, invisible to queries
    OUTPUT/_journal/<chunk>.json                     the commit record of a chunk being published
    OUTPUT/_probe/<run_id>.probe                     the run's write probe, deleted at once

One writer per OUTPUT: a run takes the lease ``OUTPUT/_lease`` (atomic create-if-absent,
renewed by compare-and-swap) before it recovers or writes anything, and a second run refuses
with a one-line error naming the first. Every commit point and every publication is *fenced*:
the writer renews the lease right before it and stops with
:class:`~pipeline.job.lease.LeaseLostError` when another run has taken it over.

Commit of a chunk: (1) write its files under ``_staging/<run_id>/``; (2) fence, then write the
journal listing every ``staged -> visible`` move: this is the commit point; (3) fence again (on
failure the journal is withdrawn and nothing is published), then publish the moves, cells before
slides (local: rename; S3: copy + delete); (4) delete the journal.

A restart, holding the lease (so every other run is dead or fenced), calls
:meth:`OutputWriter.recover`. A journal's paths are never followed as written: each move must be
exactly ``OUTPUT/_staging/<run>/<chunk>/{cells,slides}.parquet ->
OUTPUT/{cells,slides}/run_date=<D>/part-<chunk>.parquet`` for the chunk named by the journal's
file name, else the journal is corrupt. A readable journal whose every move still has its source
or its destination is rolled forward (publishing is idempotent). Any other journal is rolled
back, never left to block later runs: a readable one loses its published destinations (slides
first); a corrupt one, whose moves are unknown, loses every ``cells/run_date=D/part-<chunk>``
without the ``slides/`` part of the same date (slides are published after cells, so such a cells
part belongs to an unfinished commit). Then everything under ``_staging/`` is deleted. A slide
counts as done only through its ``status == "ok"`` row in ``slides/``, published after its cells,
so "done" always implies "cells visible", and a chunk is either wholly visible or, after
recovery, wholly absent and processed again. Chunk file names derive from the chunk's slide ids
and model version, so the same chunk always maps to the same files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError, StorageError
from pipeline.job.identity import chunk_name
from pipeline.job.lease import LeaseLostError, RunLease
from pipeline.job.storage import Storage, is_s3, join_uri
from pipeline.schema import CELL_SCHEMA, RUN_SCHEMA, SLIDE_SCHEMA

__all__ = ["PERMANENT_FAILURES", "InjectedFault", "ChunkCommit", "Recovery", "OutputWriter", "visible_parquet"]


#: Reason prefixes (exception class names) of failures that depend only on the slide's bytes; used
#: only for rows written before the ``failure_class`` column (see ``OutputWriter.done_slides``).
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
    rolled_back: list[str] = field(default_factory=list)  # chunks whose journal could not be completed
    notes: list[str] = field(default_factory=list)  # one line per journal handled: what and why


#: A journal is a few KiB (its chunk's slide ids); a larger object is not one (bytes).
MAX_JOURNAL_BYTES = 16 * 1024 * 1024
_CHUNK_RE = re.compile(r"[0-9a-f]{24}")  # identity.chunk_name
_RUN_DATE_RE = re.compile(r"run_date=\d{4}-\d{2}-\d{2}")
_TABLES = ("cells", "slides")  # publication order


def _confined_parts(root: str, uri: object) -> list[str] | None:
    """``uri``'s path components below OUTPUT ``root``, or ``None`` when it is not a plain path
    under it: another scheme or bucket, outside the prefix, or any ``..``/``.``/empty component
    (nothing is normalised away first, so ``_staging/../../x`` is refused, not resolved)."""
    if not isinstance(uri, str) or "\x00" in uri:
        return None
    if is_s3(root):
        base = root.rstrip("/") + "/"
        if not uri.startswith(base):
            return None
        parts = uri[len(base):].split("/")
    else:
        if is_s3(uri) or "://" in uri:
            return None
        base = os.path.abspath(root).rstrip(os.sep) + os.sep
        full = uri if os.path.isabs(uri) else os.path.join(os.getcwd(), uri)
        if not full.startswith(base):
            return None
        parts = full[len(base):].split(os.sep)
    if any(p in ("", ".", "..") or "/" in p or "\\" in p for p in parts):
        return None
    return parts


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
                 fault_after_chunks: int | None = None, fault_point: str = "after_commit",
                 lease: RunLease | None = None):
        self.storage = storage
        # The run's lease on root; every commit point and publication is fenced on it. ``None``
        # (tests of the writer alone) means the caller guarantees a single writer.
        self.lease = lease
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
    def _fence(self, what: str) -> None:
        if self.lease is not None:
            self.lease.check(what)

    def recover(self) -> Recovery:
        """Complete or undo every journal left behind, then delete all staging.

        Runs with the lease held, so every other run that left files is dead or fenced. A journal
        is rolled forward when it is readable and each move has its source or destination;
        otherwise it is rolled back (see the module docstring). Each journal handled adds a line
        to :attr:`Recovery.notes`.
        """
        self._fence("recovery")
        rec = Recovery()
        unreadable: list[tuple[str, str]] = []
        for obj in sorted(self._list_or_empty(self._journal_prefix()), key=lambda o: o.uri):
            parts = _confined_parts(self.root, obj.uri)
            name = parts[-1] if parts else obj.uri
            chunk = name[:-len(".json")] if name.endswith(".json") else ""
            if parts is None or len(parts) != 2 or not _CHUNK_RE.fullmatch(chunk):
                # Not a journal this protocol writes (a stray file, a temp file of a journal
                # write that never completed): no chunk's files can be derived from it.
                self.storage.delete(obj.uri)
                rec.notes.append(f"deleted {obj.uri}: not a commit journal")
                continue
            moves, why = None, f"larger than {MAX_JOURNAL_BYTES} bytes"
            if obj.size <= MAX_JOURNAL_BYTES:
                try:
                    moves, why = self._journal_moves(json.loads(self.storage.read_bytes(obj.uri)), chunk)
                except (ValueError, RecursionError) as exc:
                    why = f"not JSON ({type(exc).__name__})"
            if moves is None:
                unreadable.append((obj.uri, chunk))
                rec.notes.append(f"rolling back chunk {chunk}: journal {obj.uri} is corrupt ({why})")
                continue
            if all(self.storage.exists(src) or self.storage.exists(dst) for src, dst in moves):
                for src, dst in moves:
                    self.storage.publish(src, dst)
                self.storage.delete(obj.uri)
                rec.rolled_forward.append(chunk)
                rec.notes.append(f"rolled forward chunk {chunk} ({len(moves)} files published)")
                continue
            lost = [src for src, dst in moves if not self.storage.exists(src) and not self.storage.exists(dst)]
            # Slides first: a visible slides part without its cells would make slides "done".
            for _, dst in reversed(moves):
                self.storage.delete(dst)
            self.storage.delete(obj.uri)
            rec.rolled_back.append(chunk)
            rec.notes.append(f"rolled back chunk {chunk}: {lost[0]} is gone and was never published; "
                             f"its slides are processed again")
        if unreadable:
            self._roll_back_unreadable(unreadable, rec)
        staging = self._uri("_staging")
        for obj in self._list_or_empty(staging + "/" if is_s3(staging) else staging):
            self.storage.delete(obj.uri)
            rec.orphans_deleted += 1
        return rec

    def _journal_moves(self, record: object, chunk: str) -> tuple[list[tuple[str, str]] | None, str]:
        """The journal's moves rebuilt from their validated components, or ``(None, why)``.

        The result is built with this writer's own paths, never the journal's strings, so a
        journal can only ever move this chunk's staged files to this chunk's visible names.
        """
        if not isinstance(record, dict):
            return None, "not a JSON object"
        if record.get("chunk", chunk) != chunk:
            return None, "its chunk differs from its file name"
        moves = record.get("moves")
        if not isinstance(moves, list) or not 1 <= len(moves) <= len(_TABLES):
            return None, "no list of 1-2 moves"
        out, runs, dates, tables = [], set(), set(), []
        for move in moves:
            if not isinstance(move, list | tuple) or len(move) != 2:
                return None, "a move is not a [source, destination] pair"
            src, dst = _confined_parts(self.root, move[0]), _confined_parts(self.root, move[1])
            if src is None or dst is None:
                return None, f"a move leaves {self.root}"
            table = src[-1].removesuffix(".parquet")
            if (len(src) != 4 or src[0] != "_staging" or src[2] != chunk or table not in _TABLES
                    or src[3] != f"{table}.parquet"):
                return None, "a source is not this chunk's staged file"
            if len(dst) != 3 or dst[0] != table or not _RUN_DATE_RE.fullmatch(dst[1]) or dst[2] != f"part-{chunk}.parquet":
                return None, "a destination is not this chunk's visible file"
            runs.add(src[1])
            dates.add(dst[1])
            tables.append(table)
            out.append((self._uri(*src), self._uri(*dst)))
        if tables not in (["slides"], list(_TABLES)) or len(runs) != 1 or len(dates) != 1:
            return None, "moves of different runs, dates or an unknown order"
        if record.get("run_id", next(iter(runs))) != next(iter(runs)):
            return None, "its run_id differs from its staging directory"
        return out, ""

    def _roll_back_unreadable(self, items: list[tuple[str, str]], rec: Recovery) -> None:
        """Undo chunks whose journals cannot be read: delete each ``cells`` part of the chunk
        that has no ``slides`` part of the same ``run_date`` (slides are published last), then
        the journal. Staged files go with the staging sweep."""
        parts: dict[str, dict[str, set[str]]] = {t: {} for t in _TABLES}
        for table in _TABLES:
            for uri in visible_parquet(self.storage, self.root, table):
                rel = _confined_parts(self.root, uri)
                if rel and len(rel) == 3 and rel[2].startswith("part-") and _RUN_DATE_RE.fullmatch(rel[1]):
                    parts[table].setdefault(rel[2][len("part-"):-len(".parquet")], set()).add(rel[1])
        for juri, chunk in items:
            complete = parts["slides"].get(chunk, set())
            for date in sorted(parts["cells"].get(chunk, set()) - complete):
                uri = self._uri("cells", date, f"part-{chunk}.parquet")
                self.storage.delete(uri)
                rec.notes.append(f"deleted {uri}: cells of an unfinished commit of chunk {chunk}")
            self.storage.delete(juri)
            rec.rolled_back.append(chunk)

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
        with a permanent ``failure_class`` (:data:`pipeline.schema.PERMANENT_FAILURE_CLASSES`: the
        same identity fails the same way again) unless ``retry_failed``. Storage, config and
        internal failures are retried by the next run. Rows written before the ``failure_class``
        column existed fall back to their reason's prefix (:data:`PERMANENT_FAILURES`)."""
        from pipeline.schema import PERMANENT_FAILURE_CLASSES

        # open_slide's texts for a missing or unreadable local file: the worker's environment,
        # not the bytes, though old rows recorded them as SlideOpenError.
        legacy_transient = (": no such file", ": permission denied")
        done: set[str] = set()
        base = ["slide_id", "status", "model_version", "reason"]
        for uri in visible_parquet(self.storage, self.root, "slides"):
            try:
                pf = pq.ParquetFile(io.BytesIO(self.storage.read_bytes(uri)))
                cols = base + (["failure_class"] if "failure_class" in pf.schema_arrow.names else [])
                t = pf.read(columns=cols)
            except (pa.ArrowException, OSError) as exc:
                if isinstance(exc, StorageError):
                    raise
                raise StorageError(f"{uri}: unreadable slides file ({exc})") from None
            values = [t.column(c).to_pylist() for c in base]
            classes = t.column("failure_class").to_pylist() if "failure_class" in cols else [None] * t.num_rows
            for sid, status, mv, reason, cls in zip(*values, classes):
                if mv != model_version:
                    continue
                if status == "ok":
                    done.add(sid)
                elif status == "failed" and not retry_failed:
                    if cls is not None:
                        permanent = cls in PERMANENT_FAILURE_CLASSES
                    else:
                        permanent = (reason or "").startswith(PERMANENT_FAILURES) and not (
                            reason or "").endswith(legacy_transient)
                    if permanent:
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
        self._fence(f"the commit point (journal) of chunk {name}")
        self.storage.write_bytes(journal, json.dumps(record, indent=1).encode())
        self._fault("after_journal", number)
        try:
            self._fence(f"publishing chunk {name}")
        except LeaseLostError:
            # Withdraw the commit: the run that took over may already be processing these slides
            # under other chunk names, so a later recovery must not roll this one forward.
            with contextlib.suppress(StorageError):
                self.storage.delete(journal)
            raise
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
        self._fence(f"publishing {uri}")
        self.storage.write_bytes(uri, _to_parquet(rows, SLIDE_SCHEMA))
        return uri

    def write_run(self, row: dict) -> str:
        """Publish the run's one-row table (a single object: a PUT/rename is already atomic)."""
        uri = self._uri("runs", f"run_date={self.run_date}", f"run-{self.run_id}.parquet")
        self._fence(f"publishing {uri}")
        self.storage.write_bytes(uri, _to_parquet([row], RUN_SCHEMA))
        return uri


def read_table(storage: Storage, uris: Iterable[str]) -> pa.Table | None:
    """Concatenate Parquet files (used by the summary and tests); ``None`` when there are none."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in uris]
    return pa.concat_tables(tables) if tables else None
