"""Parquet outputs and the commit protocol that makes a run exactly-once across crashes.

Layout (docs/interfaces.md)::

    OUTPUT/cells/run_date=D/part-<chunk>[-<k>].parquet  a committed chunk's cells (k = 0000, 0001, ...
                                                        when it has several files)
    OUTPUT/slides/run_date=D/part-<chunk>.parquet     the chunk's slide outcomes
    OUTPUT/runs/run_date=D/run-<run_id>.parquet       one row per run
    OUTPUT/_lease                                     the run lease (pipeline/job/lease.py)
    OUTPUT/_staging/<run_id>/w/<slide>-<digest>.parquet  cells a worker wrote (pipeline/job/stage_write.py)
    OUTPUT/_staging/<run_id>/<chunk>/...              compacted cells and the chunk's slides file
    OUTPUT/_journal/<chunk>.json                      the commit record of a chunk being published
    OUTPUT/_index/done.parquet                        the done-set index (pipeline/job/ledger.py)
    OUTPUT/_probe/<run_id>.probe                      the run's write probe, deleted at once

Who writes what: the cells of a slide are written by the Ray workers that captioned them, as
staged files with deterministic names (a re-executed task overwrites its own file); the driver
only chooses, per slide, staged files that cover its cells exactly once, and commits chunks of
slides. A chunk's small staged files are first *compacted* by a worker task into files of up to
``target_file_mb`` (:func:`plan_bins`; a file that fills a bin alone is moved as it is), so query
engines read few, large files. The driver writes only the chunk's ``slides`` file (one row per
slide), the journal and the index.

Publishing on S3 is a server-side ``CopyObject`` of each staged object to its visible name, then
a delete of the staged one; the bytes never pass through the driver. A manifest (a list of the
staged files that readers would have to honour) was rejected: DuckDB, pyarrow and Spark list
``cells/run_date=D/*.parquet`` and know nothing of a manifest, so they would read uncommitted or
duplicate staged files, or nothing; after a copy, a plain hive-partitioned listing is the truth,
readable without project code. The copy costs the store's time, not the driver's (locally it is
a rename).

One writer per OUTPUT: a run takes the lease ``OUTPUT/_lease`` (atomic create-if-absent,
renewed by compare-and-swap) before it recovers or writes anything, and a second run refuses
with a one-line error naming the first. Every commit point and every publication is *fenced*:
the writer renews the lease right before it and stops with
:class:`~pipeline.job.lease.LeaseLostError` when another run has taken it over.

Commit of a chunk: (1) compact its cells under ``_staging/<run_id>/<chunk>/`` (worker task) and
write its slides file there; (2) fence, then write the journal listing every ``staged ->
visible`` move: this is the commit point; (3) fence again (on failure the journal is withdrawn
and nothing is published), then publish the moves, cells before slides (local: rename; S3:
copy + delete); (4) delete the journal.

A restart, holding the lease (so every other run is dead or fenced), calls
:meth:`OutputWriter.recover`. A journal's paths are never followed as written: each source must
be a file of this journal's run under ``OUTPUT/_staging/<run>/`` (``w/<name>.parquet`` or
``<chunk>/cells[-<k>].parquet`` / ``<chunk>/slides.parquet``) and each destination exactly
``OUTPUT/cells/run_date=<D>/part-<chunk>[-<k>].parquet`` or ``OUTPUT/slides/run_date=<D>/part-<chunk>.parquet``
for the chunk named by the journal's file name, with the slides move last, else the journal is
corrupt. A readable journal whose every move still has its source or its destination is rolled
forward (publishing is idempotent). Any other journal is rolled back, never left to block later
runs: a readable one loses its published destinations (slides first); a corrupt one, whose moves
are unknown, loses every ``cells/run_date=D/part-<chunk>[-<k>]`` without the ``slides/`` part of the
same date (slides are published after cells, so such a cells part belongs to an unfinished
commit). Then everything under ``_staging/`` is deleted. A slide counts as done only through its
``status == "ok"`` row in ``slides/``, published after its cells, so "done" always implies
"cells visible", and a chunk is either wholly visible or, after recovery, wholly absent and
processed again. Chunk file names derive from the chunk's slide ids and model version, so the
same chunk always maps to the same files.

The done set is read through :class:`~pipeline.job.ledger.DoneIndex`, a cache of the ``slides/``
rows keyed by each file's listed name, size and ETag: whatever recovery published or rolled back
shows in the listing, so the index is never trusted past what the listing confirms.

Crash tests install a hook with :func:`set_fault_hook` (tests only; production code never sets
it): it is called with ``(writer, point, chunk_number)`` at ``after_journal``, ``mid_publish``,
``after_commit`` and ``write_run``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError, StorageError
from pipeline.job.identity import chunk_name
from pipeline.job.lease import LeaseLostError, RunLease
from pipeline.job.storage import Storage, is_s3, join_uri
from pipeline.schema import CELL_SCHEMA, RUN_SCHEMA, SLIDE_SCHEMA

__all__ = [
    "PERMANENT_FAILURES",
    "ChunkCommit",
    "Recovery",
    "OutputWriter",
    "StagedCells",
    "plan_bins",
    "set_fault_hook",
    "visible_parquet",
    "DEFAULT_TARGET_FILE_MB",
]

#: Default size bound of a committed cells file (MiB): large enough for query engines' scans,
#: small enough to compact on one worker.
DEFAULT_TARGET_FILE_MB = 128

_FAULT_HOOK: Callable[[OutputWriter, str, int], None] | None = None


def set_fault_hook(hook: Callable[[OutputWriter, str, int], None] | None):
    """Install ``hook(writer, point, chunk_number)`` (tests only: crash simulation); returns the
    previous hook. Production code never installs one."""
    global _FAULT_HOOK
    previous, _FAULT_HOOK = _FAULT_HOOK, hook
    return previous


@dataclass(frozen=True)
class StagedCells:
    """A cells file a worker staged: ``uri`` under ``OUTPUT/_staging/<run_id>/w/``, ``n_cells``
    rows, ``nbytes`` bytes (decides compaction)."""

    uri: str
    n_cells: int
    nbytes: int


def plan_bins(files: list[StagedCells], target_bytes: int) -> list[list[StagedCells]]:
    """Group ``files`` (in order) into bins of at most ``target_bytes`` (a file larger than that
    is a bin of its own); each bin becomes one committed file."""
    bins: list[list[StagedCells]] = []
    size = 0
    for f in files:
        if bins and size + f.nbytes <= target_bytes:
            bins[-1].append(f)
            size += f.nbytes
        else:
            bins.append([f])
            size = f.nbytes
    return bins


#: Reason prefixes (exception class names) of failures that depend only on the slide's bytes; used
#: only for rows written before the ``failure_class`` column (see ``OutputWriter.done_slides``).
PERMANENT_FAILURES: tuple[str, ...] = (
    "SlideOpenError:",
    "SlideReadError:",
    "SlideTooLargeError:",
    "ScaleError:",
)


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
    rolled_back: list[str] = field(
        default_factory=list
    )  # chunks whose journal could not be completed
    notes: list[str] = field(default_factory=list)  # one line per journal handled: what and why


#: A journal is a few KiB (its chunk's slide ids); a larger object is not one (bytes).
MAX_JOURNAL_BYTES = 16 * 1024 * 1024
_CHUNK_RE = re.compile(r"[0-9a-f]{24}")  # identity.chunk_name
_WORKER_FILE_RE = re.compile(r"[0-9a-f]{32}-[0-9a-f]{24}\.parquet")  # stage_write.staged_name
_CELLS_PART_RE = re.compile(r"part-([0-9a-f]{24})(?:-(\d{4}))?\.parquet")
_COMPACT_RE = re.compile(r"cells(?:-\d{4})?\.parquet")
MAX_CELL_FILES = 9999  # committed cells files of one chunk (the 4-digit part number)
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
        parts = uri[len(base) :].split("/")
    else:
        if is_s3(uri) or "://" in uri:
            return None
        base = os.path.abspath(root).rstrip(os.sep) + os.sep
        full = uri if os.path.isabs(uri) else os.path.join(os.getcwd(), uri)
        if not full.startswith(base):
            return None
        parts = full[len(base) :].split(os.sep)
    if any(p in ("", ".", "..") or "/" in p or "\\" in p for p in parts):
        return None
    return parts


def _rel_parts(root: str, uri: str) -> list[str]:
    norm_root = root.rstrip("/\\").replace("\\", "/")
    return uri.replace("\\", "/")[len(norm_root) :].strip("/").split("/")


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


def slide_rows_for_parquet(rows: list[dict]) -> list[dict]:
    """``slides`` rows as the detect stage's outcome JSON carries them, ready for
    :data:`SLIDE_SCHEMA`: ``zone_map_png`` arrives as base64 text (JSON has no bytes) and is
    stored as the PNG's bytes; zone maps stay ``{zone: value}`` dicts (Arrow maps)."""
    out = []
    for row in rows:
        png = row.get("zone_map_png")
        if isinstance(png, str):
            row = {**row, "zone_map_png": base64.b64decode(png.encode("ascii"), validate=True)}
        out.append(row)
    return out


def _to_parquet(rows: list[dict], schema: pa.Schema) -> bytes:
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=8192)
    return buf.getvalue()


class OutputWriter:
    """Commits one run's chunks and writes its run row under ``root`` (a local directory or ``s3://`` URI).

    ``target_file_mb``: size bound of a committed cells file (MiB); a chunk's smaller staged
    files are compacted up to it. ``compactor``: runs the compaction jobs ``[(sources, dest)]``
    (:func:`pipeline.job.stage_write.compact_files` each) on workers; ``None`` runs them here,
    which only unit tests and tools without Ray should do.
    """

    def __init__(
        self,
        storage: Storage,
        root: str,
        run_id: str,
        run_date: str,
        model_version: str,
        lease: RunLease | None = None,
        target_file_mb: float = DEFAULT_TARGET_FILE_MB,
        compactor: Callable[[Storage, list[tuple[list[str], str]]], None] | None = None,
    ):
        self.storage = storage
        # The run's lease on root; every commit point and publication is fenced on it. ``None``
        # (tests of the writer alone) means the caller guarantees a single writer.
        self.lease = lease
        self.root = root
        self.run_id = run_id
        self.run_date = run_date
        self.model_version = model_version
        if not (isinstance(target_file_mb, int | float) and target_file_mb > 0):
            raise ValueError(
                f"target_file_mb must be a positive number of MiB, got {target_file_mb!r}"
            )
        self.target_bytes = int(target_file_mb * 1024 * 1024)
        self.compactor = compactor
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
            chunk = name[: -len(".json")] if name.endswith(".json") else ""
            if parts is None or len(parts) != 2 or not _CHUNK_RE.fullmatch(chunk):
                # Not a journal this protocol writes (a stray file, a temp file of a journal
                # write that never completed): no chunk's files can be derived from it.
                self.storage.delete(obj.uri)
                rec.notes.append(f"deleted {obj.uri}: not a commit journal")
                continue
            moves, why = None, f"larger than {MAX_JOURNAL_BYTES} bytes"
            if obj.size <= MAX_JOURNAL_BYTES:
                try:
                    moves, why = self._journal_moves(
                        json.loads(self.storage.read_bytes(obj.uri)), chunk
                    )
                except (ValueError, RecursionError) as exc:
                    why = f"not JSON ({type(exc).__name__})"
            if moves is None:
                unreadable.append((obj.uri, chunk))
                rec.notes.append(
                    f"rolling back chunk {chunk}: journal {obj.uri} is corrupt ({why})"
                )
                continue
            if all(self.storage.exists(src) or self.storage.exists(dst) for src, dst in moves):
                for src, dst in moves:
                    self.storage.publish(src, dst)
                self.storage.delete(obj.uri)
                rec.rolled_forward.append(chunk)
                rec.notes.append(f"rolled forward chunk {chunk} ({len(moves)} files published)")
                continue
            lost = [
                src
                for src, dst in moves
                if not self.storage.exists(src) and not self.storage.exists(dst)
            ]
            # Slides first: a visible slides part without its cells would make slides "done".
            for _, dst in reversed(moves):
                self.storage.delete(dst)
            self.storage.delete(obj.uri)
            rec.rolled_back.append(chunk)
            rec.notes.append(
                f"rolled back chunk {chunk}: {lost[0]} is gone and was never published; "
                f"its slides are processed again"
            )
        if unreadable:
            self._roll_back_unreadable(unreadable, rec)
        staging = self._uri("_staging")
        for obj in self._list_or_empty(staging + "/" if is_s3(staging) else staging):
            self.storage.delete(obj.uri)
            rec.orphans_deleted += 1
        return rec

    def _journal_moves(
        self, record: object, chunk: str
    ) -> tuple[list[tuple[str, str]] | None, str]:
        """The journal's moves rebuilt from their validated components, or ``(None, why)``.

        The result is built with this writer's own paths, never the journal's strings, so a
        journal can only ever move one run's staged files to this chunk's visible names.
        """
        if not isinstance(record, dict):
            return None, "not a JSON object"
        if record.get("chunk", chunk) != chunk:
            return None, "its chunk differs from its file name"
        moves = record.get("moves")
        if not isinstance(moves, list) or not 1 <= len(moves) <= MAX_CELL_FILES + 1:
            return None, f"no list of 1-{MAX_CELL_FILES + 1} moves"
        out, runs, dates, tables, parts_seen = [], set(), set(), [], set()
        for move in moves:
            if not isinstance(move, list | tuple) or len(move) != 2:
                return None, "a move is not a [source, destination] pair"
            src, dst = _confined_parts(self.root, move[0]), _confined_parts(self.root, move[1])
            if src is None or dst is None:
                return None, f"a move leaves {self.root}"
            if len(dst) != 3 or dst[0] not in _TABLES or not _RUN_DATE_RE.fullmatch(dst[1]):
                return None, "a destination is not this chunk's visible file"
            table = dst[0]
            if len(src) != 4 or src[0] != "_staging":
                return None, "a source is not a staged file"
            if table == "slides":
                if (
                    src[2] != chunk
                    or src[3] != "slides.parquet"
                    or dst[2] != f"part-{chunk}.parquet"
                ):
                    return None, "the slides move is not this chunk's"
            else:
                m = _CELLS_PART_RE.fullmatch(dst[2])
                if m is None or m.group(1) != chunk or m.group(2) in parts_seen:
                    return None, "a destination is not this chunk's visible file"
                parts_seen.add(m.group(2) or "")
                worker = src[2] == "w" and _WORKER_FILE_RE.fullmatch(src[3])
                compacted = src[2] == chunk and _COMPACT_RE.fullmatch(src[3])
                if not (worker or compacted):
                    return None, "a source is not this chunk's staged file"
            runs.add(src[1])
            dates.add(dst[1])
            tables.append(table)
            out.append((self._uri(*src), self._uri(*dst)))
        if (
            tables[-1] != "slides"
            or tables.count("slides") != 1
            or len(runs) != 1
            or len(dates) != 1
        ):
            return None, "moves of different runs, dates or an unknown order"
        if record.get("run_id", next(iter(runs))) != next(iter(runs)):
            return None, "its run_id differs from its staging directory"
        return out, ""

    def _roll_back_unreadable(self, items: list[tuple[str, str]], rec: Recovery) -> None:
        """Undo chunks whose journals cannot be read: delete each ``cells`` part of the chunk
        that has no ``slides`` part of the same ``run_date`` (slides are published last), then
        the journal. Staged files go with the staging sweep."""
        slides: dict[str, set[str]] = {}
        cells: dict[str, list[tuple[str, str]]] = {}
        for table in _TABLES:
            for uri in visible_parquet(self.storage, self.root, table):
                rel = _confined_parts(self.root, uri)
                if not (rel and len(rel) == 3 and _RUN_DATE_RE.fullmatch(rel[1])):
                    continue
                if table == "slides" and rel[2].startswith("part-"):
                    slides.setdefault(rel[2][len("part-") : -len(".parquet")], set()).add(rel[1])
                elif table == "cells" and (m := _CELLS_PART_RE.fullmatch(rel[2])):
                    cells.setdefault(m.group(1), []).append((rel[1], uri))
        for juri, chunk in items:
            complete = slides.get(chunk, set())
            for date, uri in sorted(cells.get(chunk, [])):
                if date in complete:
                    continue
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

    def done_slides(
        self, model_version: str, retry_failed: bool = False, update_index: bool = False
    ) -> set[str]:
        """Slide ids an earlier run with ``model_version`` settled: ``status == "ok"``, or failed
        with a permanent ``failure_class`` (:data:`pipeline.schema.PERMANENT_FAILURE_CLASSES`: the
        same identity fails the same way again) unless ``retry_failed``. Storage, config and
        internal failures are retried by the next run. Rows written before the ``failure_class``
        column existed fall back to their reason's prefix (:data:`PERMANENT_FAILURES`).

        Read through the done index (:class:`~pipeline.job.ledger.DoneIndex`): one listing of
        ``slides/`` plus the files the index does not cover yet. ``update_index``: store the
        refreshed index (fenced on the lease; a dry run leaves the output untouched)."""
        from pipeline.job.ledger import DoneIndex

        index = DoneIndex(self.storage, self.root)
        index.refresh(fence=self._fence if update_index else None, write=update_index)
        return index.done(model_version, retry_failed)

    def update_index(self) -> None:
        """Bring the done index up to date with ``slides/`` (this run's commits); fenced."""
        from pipeline.job.ledger import DoneIndex

        DoneIndex(self.storage, self.root).refresh(fence=self._fence, write=True)

    # -- commits ---------------------------------------------------------------------------
    def _fault(self, point: str, chunk_number: int) -> None:
        if _FAULT_HOOK is not None:
            _FAULT_HOOK(self, point, chunk_number)

    def _stage_rows(self, cell_rows: list[dict], name: str) -> list[StagedCells]:
        """Rows handed in directly (tests, tools): staged here as the chunk's one cells file."""
        data = _to_parquet(cell_rows, CELL_SCHEMA)
        uri = self._uri("_staging", self.run_id, name, "cells.parquet")
        self.storage.write_bytes(uri, data)
        return [StagedCells(uri, len(cell_rows), len(data))]

    def commit_chunk(
        self, cells: list[StagedCells] | list[dict], slide_rows: list[dict]
    ) -> ChunkCommit:
        """Atomically publish one chunk: its cells and one row per slide in it.

        ``cells``: the staged files the workers wrote for these slides (:class:`StagedCells`,
        together holding each cell of the chunk once), or (tests, tools) the cell rows themselves.
        """
        if not slide_rows:
            raise ValueError("a chunk holds at least one slide")
        ids = tuple(r["slide_id"] for r in slide_rows)
        name = chunk_name(ids, self.model_version)
        staged = [c for c in cells if isinstance(c, StagedCells)]
        if len(staged) != len(cells):
            staged = self._stage_rows(list(cells), name) if cells else []
        part = f"run_date={self.run_date}"
        stage = ("_staging", self.run_id, name)
        bins = plan_bins(staged, self.target_bytes)
        if len(bins) > MAX_CELL_FILES:
            raise PipelineError(
                f"chunk {name}: {len(bins)} cells files exceed {MAX_CELL_FILES}; raise target_file_mb"
            )
        moves: list[tuple[str, str]] = []
        jobs: list[tuple[list[str], str]] = []
        for k, group in enumerate(bins):
            if len(group) == 1:
                src = group[0].uri
            else:
                src = self._uri(*stage, f"cells-{k:04d}.parquet")
                jobs.append(([f.uri for f in group], src))
            # One file keeps the plain chunk name; several are numbered.
            stem = f"part-{name}" if len(bins) == 1 else f"part-{name}-{k:04d}"
            moves.append((src, self._uri("cells", part, f"{stem}.parquet")))
        if jobs:
            if self.compactor is not None:
                self.compactor(self.storage, jobs)
            else:
                from pipeline.job.stage_write import compact_files

                for sources, dest in jobs:
                    compact_files(self.storage, sources, dest)
        src = self._uri(*stage, "slides.parquet")
        self.storage.write_bytes(src, _to_parquet(slide_rows_for_parquet(slide_rows), SLIDE_SCHEMA))
        moves.append((src, self._uri("slides", part, f"part-{name}.parquet")))
        number = len(self.committed) + 1
        journal = self._uri("_journal", f"{name}.json")
        record = {
            "chunk": name,
            "run_id": self.run_id,
            "moves": moves,
            "slide_ids": list(ids),
            "written_at": datetime.now(UTC).isoformat(),
        }
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
        commit = ChunkCommit(
            name, ids, sum(f.n_cells for f in staged), tuple(dst for _, dst in moves)
        )
        self.committed.append(commit)
        self._fault("after_commit", number)
        return commit

    def sweep_staging(self) -> int:
        """Delete what is left under this run's ``_staging/<run_id>/`` (staged files no chosen
        cover used: a re-executed task's duplicates, cells of failed slides); returns the count."""
        prefix = self._uri("_staging", self.run_id)
        n = 0
        for obj in self._list_or_empty(prefix + "/" if is_s3(prefix) else prefix):
            self.storage.delete(obj.uri)
            n += 1
        return n

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
        self._fault("write_run", len(self.committed))
        self._fence(f"publishing {uri}")
        self.storage.write_bytes(uri, _to_parquet([row], RUN_SCHEMA))
        return uri


def read_table(storage: Storage, uris: Iterable[str]) -> pa.Table | None:
    """Concatenate Parquet files (used by the summary and tests); ``None`` when there are none."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in uris]
    # Files of an older schema version lack the newer columns: they read as null.
    return pa.concat_tables(tables, promote_options="default") if tables else None
