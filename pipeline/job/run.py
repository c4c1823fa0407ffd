"""Orchestration of one nightly run: list, skip what is done, stream, commit per chunk, summarise.

Exit status (returned by :func:`run_job` as ``RunResult.exit_code``): 0 when the run finished and
the fraction of failed slides is at most ``max_failed_fraction``; 1 when the threshold is
exceeded. A failure of the run itself (storage unreachable, an output that cannot be written,
model unusable, a stage crashing) raises; committed chunks stay committed and the next run resumes
after them. The output is probed with a small write before any slide is read, so an unwritable
location fails in seconds rather than at the first chunk commit.

Who does what: the Ray workers detect, caption and *write* the cells (``stage_write``: staged
Parquet files under ``OUTPUT/_staging/<run_id>/w/``); the driver receives per-file and per-slide
metadata only (:func:`consume`: O(slides) state plus the 16-byte ids of the cells of slides
still in flight), decides when a slide is complete, and commits chunks of slides with the
journal/lease protocol of :mod:`pipeline.job.writer`, moving the workers' files (compacted by a
worker task up to ``target_file_mb``) instead of writing cells itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from pipeline import __version__ as PIPELINE_VERSION
from pipeline.errors import ConfigError, PipelineError
from pipeline.job.config import JobConfig
from pipeline.job.lease import RunLease
from pipeline.job.listing import Listing, SlideRef, list_slides
from pipeline.job.storage import S3Settings, storage_for
from pipeline.job.writer import OutputWriter, Recovery, StagedCells
from pipeline.schema import SCHEMA_VERSION

__all__ = [
    "RunResult",
    "run_job",
    "model_identity",
    "format_summary",
    "consume",
    "Chunker",
    "choose_cover",
]


@dataclass
class RunResult:
    """What a run did. ``slides``: this run's ``slides/`` rows (plus ``cell_types`` counts)."""

    run_id: str
    run_date: str
    status: str  # ok | failed | threshold_exceeded | dry_run
    exit_code: int
    model_id: str
    model_version: str
    listed: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    cells_written: int = 0
    chunks: int = 0
    ignored: list[str] = field(default_factory=list)
    slides: list[dict] = field(default_factory=list)
    would_process: list[str] = field(default_factory=list)
    recovery: Recovery | None = None
    seconds: float = 0.0


def model_identity(
    model: str | None, s3: S3Settings | None = None, base: str | None = None
) -> tuple[str, str]:
    """``(model_id, model_version)`` of a checkpoint location, as the caption actors will see it.

    ``s3``: how an ``s3://`` model is reached (the run's storage settings; None: the
    environment). ``base``: the ``--base`` override of a LoRA adapter's base (the version hashes
    base + adapter).
    """
    from hemblip import inference
    from hemblip.errors import HemblipError

    options = (s3 or S3Settings()).storage_options()
    try:
        # Loading the checkpoint once on the driver is the only way to get exactly the version the
        # actors will compute (adapters hash base + adapter weights); it costs seconds, once per run.
        cap = inference.Captioner(
            model, device="cpu", batch_size=1, base=base, storage_options=options
        )
        ident = (cap.model_id, cap.model_version)
        del cap
    except HemblipError as exc:
        with_base = f" --base {base}" if base is not None else ""
        raise ConfigError(f"--model {model or '(demo checkpoint)'}{with_base}: {exc}") from None
    return ident


def _new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


class Chunker:
    """Collects finished slides and commits them in chunks (``chunk_slides`` / ``chunk_cells``).

    Commits run one at a time, in order, on a background thread (``background``), so the stream
    keeps flowing while a chunk's files are compacted, copied and journaled (seconds on S3).
    After a failed commit nothing more is committed, as after a kill; the failure is raised in
    the caller's thread at the next :meth:`add`, :meth:`flush` or :meth:`drain`."""

    def __init__(
        self,
        writer: OutputWriter,
        cfg: JobConfig,
        run_id: str,
        model_version: str,
        say,
        background: bool = True,
    ):
        from concurrent.futures import ThreadPoolExecutor

        self.writer, self.cfg, self.run_id, self.mv, self.say = (
            writer,
            cfg,
            run_id,
            model_version,
            say,
        )
        self.files: list[StagedCells] = []
        self.n_cells = 0
        self.slides: list[dict] = []
        self.all_slides: list[dict] = []
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="chunk-commit") if background else None
        )
        self._pending: list = []
        self._failed: BaseException | None = None

    def add(self, slide_row: dict, files: list[StagedCells]) -> None:
        self._raise_failed()
        self.slides.append(slide_row)
        self.files.extend(files)
        self.n_cells += sum(f.n_cells for f in files)
        if len(self.slides) >= self.cfg.chunk_slides or self.n_cells >= self.cfg.chunk_cells:
            self.flush()

    def flush(self) -> None:
        self._raise_failed()
        if not self.slides:
            return
        files, slides = self.files, self.slides
        self.files, self.slides, self.n_cells = [], [], 0
        if self._pool is None:
            self._commit(files, slides)
        else:
            self._pending.append(self._pool.submit(self._commit, files, slides))

    def _commit(self, files: list[StagedCells], slides: list[dict]) -> None:
        if self._failed is not None:
            return
        try:
            now = datetime.now(UTC)
            for s in slides:
                s["finished_at"] = now
            commit = self.writer.commit_chunk(files, slides)
        except BaseException as exc:
            self._failed = exc
            raise
        self.say(
            f"committed chunk {commit.name}: {len(commit.slide_ids)} slides, {commit.cells} cells"
        )
        self.all_slides.extend(slides)

    def _raise_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    def drain(self, raise_failure: bool = True) -> None:
        """Wait for every submitted commit; raise the first failure (``raise_failure``)."""
        from concurrent.futures import wait

        wait(self._pending)
        self._pending = []
        if raise_failure:
            self._raise_failed()


#: Search steps :func:`choose_cover` spends before waiting for more files (re-executions are rare
#: and leave few overlapping files; the bound keeps a pathological case from stalling the driver).
_COVER_STEPS = 100_000


def _ids(blob: bytes) -> set[bytes]:
    return {blob[i : i + 16] for i in range(0, len(blob), 16)}


def choose_cover(files: dict[str, bytes], cell_count: int) -> list[str] | None:
    """Staged files (``{uri: concatenated 16-byte cell ids}``) of one slide that together hold
    each of its ``cell_count`` cells exactly once, or ``None`` while the files seen so far cannot.

    Normally the files are disjoint and complete (fast path). After Ray re-executed a detect or
    write task, files of two attempts overlap (the same cells batched differently); each attempt
    partitions the cells it wrote, so an exact cover exists once one attempt is complete, and a
    small search finds one. Cell ids are deterministic, so any file's ids are the slide's."""
    total = sum(len(b) for b in files.values()) // 16
    if total < cell_count:
        return None
    if total == cell_count:
        blob = b"".join(files.values())
        distinct = len(np.unique(np.frombuffer(blob, dtype="V16"))) if blob else 0
        return list(files) if distinct == cell_count else None
    sets = {uri: _ids(b) for uri, b in files.items()}
    universe = set().union(*sets.values())
    if len(universe) != cell_count:
        return None
    steps = 0

    def search(uncovered: set[bytes], chosen: list[str]) -> list[str] | None:
        nonlocal steps
        if not uncovered:
            return chosen
        cell = next(iter(uncovered))
        for uri, ids in sets.items():
            steps += 1
            if steps > _COVER_STEPS:
                return None
            if cell in ids and ids <= uncovered:
                found = search(uncovered - ids, [*chosen, uri])
                if found is not None:
                    return found
        return None

    return search(universe, [])


def _shown(value) -> str:
    """``value`` as text safe to print on one line: control characters (C0, C1, DEL, ANSI escape
    sequences), line and paragraph separators and bidi/format characters are escaped like
    ``repr`` does (``\\n``, ``\\x1b``, ``\\u2028``), and so is a backslash, so the escape
    is unambiguous. Object keys and file names may hold any of them; printed raw they forge
    progress lines or rewrite the terminal. Stored values stay verbatim."""
    text = str(value)
    if text.isprintable() and "\\" not in text:
        return text
    # str.isprintable() is False for every Cc, Cf, Zl, Zp (and non-ASCII space) character.
    return "".join(
        "\\\\" if ch == "\\" else ch if ch.isprintable() else repr(ch)[1:-1] for ch in text
    )


def _slide_line(k: int, n: int, row: dict) -> str:
    uri = _shown(row["slide_uri"])
    if row["status"] == "ok":
        times = f"stage {row['stage_seconds'] or 0:.1f} s, detect {row['detect_seconds'] or 0:.1f} s, caption {row['caption_seconds'] or 0:.1f} s"
        return f"[{k}/{n}] ok      {uri}  {row['cell_count']} cells ({times})"
    return f"[{k}/{n}] FAILED  {uri}  {_shown(row['reason'])}"


def _stream(
    todo: list[SlideRef],
    cfg: JobConfig,
    model_id: str,
    model_version: str,
    run_id: str,
    chunker: Chunker,
    env: dict[str, str],
    say,
    caption_stage: type | None = None,
) -> None:
    import ray

    from pipeline.job.plan import WriteSettings, build_plan, resolve_gpus
    from pipeline.job.stage_detect import AttemptLedger

    s3 = cfg.s3_settings()
    detect = cfg.detect_settings()
    caption = cfg.caption_settings(
        model_version, gpus_per_actor=resolve_gpus(cfg.caption_gpus_per_actor)
    )
    base = (
        ("run_id", run_id),
        ("model_id", model_id),
        ("model_version", model_version),
        ("pipeline_version", PIPELINE_VERSION),
        ("schema_version", SCHEMA_VERSION),
    )
    write = WriteSettings(cfg.output, s3, run_id, base)
    # Counts attempts per slide across worker processes: a slide that kills its worker is
    # recorded worker_died after `max_slide_attempts` deaths instead of being retried for ever.
    ledger = ray.remote(num_cpus=0, max_restarts=0)(AttemptLedger).remote()
    try:
        ds = build_plan(
            todo,
            detect,
            caption,
            detect_cpus=cfg.detect_cpus,
            env=env,
            ledger=ledger,
            max_task_retries=cfg.max_slide_attempts + 1,
            write=write,
            caption_stage=caption_stage,
        )
        ray.data.DataContext.get_current().enable_progress_bars = True
        batches = ds.iter_batches(batch_size=None, batch_format="numpy")
        try:
            consume(batches, todo, run_id, model_version, chunker, say)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
    finally:
        ray.kill(ledger)


@dataclass
class _InFlight:
    """A slide whose outcome or cells are still arriving: its outcome row once seen, and every
    staged file reported for it (``uri -> (n_cells, nbytes, ids, caption_seconds, cell_types JSON)``)."""

    outcome: dict | None = None
    files: dict[str, tuple[int, int, bytes, float, str]] = field(default_factory=dict)
    cells_seen: int = 0


def consume(
    batches: Iterable[dict],
    todo: list[SlideRef],
    run_id: str,
    model_version: str,
    chunker: Chunker,
    say,
) -> None:
    """Turn the write stage's metadata rows (``stage_write.OUTPUT_KEYS``) into slide rows and
    commit each slide once complete: its outcome seen and, when ok, a set of its staged files
    covering its ``cell_count`` cells exactly once (:func:`choose_cover`). A failed slide is
    complete at once (cells a killed attempt wrote are left to the staging sweep), and so is
    everything reported again for a slide already complete."""
    inflight: dict[str, _InFlight] = {}
    finished: set[str] = set()
    n = len(todo)
    for batch in batches:
        kinds = batch["kind"]
        for i in range(len(kinds)):
            sid = str(batch["slide_id"][i])
            if sid in finished:  # a re-executed task's repeat of a completed slide
                continue
            st = inflight.setdefault(sid, _InFlight())
            if kinds[i] == "file":
                uri = str(batch["uri"][i])
                if uri not in st.files:
                    st.files[uri] = (
                        int(batch["n_cells"][i]),
                        int(batch["nbytes"][i]),
                        bytes(batch["cell_ids"][i]),
                        float(batch["caption_seconds"][i]),
                        str(batch["cell_types"][i]),
                    )
                    st.cells_seen += int(batch["n_cells"][i])
            elif st.outcome is None:  # the first outcome stands: a re-executed task repeats it
                st.outcome = json.loads(batch["outcome"][i])
            out = st.outcome
            if out is None:
                continue
            ok = out["status"] == "ok"
            if ok and st.cells_seen < out["cell_count"]:
                continue
            chosen = (
                choose_cover({u: f[2] for u, f in st.files.items()}, out["cell_count"])
                if ok
                else []
            )
            if chosen is None:
                continue
            finished.add(sid)
            del inflight[sid]
            types: Counter = Counter()
            seconds = 0.0
            for uri in chosen:
                seconds += st.files[uri][3]
                types.update(json.loads(st.files[uri][4]))
            row = dict(
                out,
                caption_seconds=seconds if ok else None,
                run_id=run_id,
                model_version=model_version,
                finished_at=None,
            )
            row["cell_types"] = dict(types)
            say(_slide_line(len(finished), n, row))
            chunker.add(row, [StagedCells(u, st.files[u][0], st.files[u][1]) for u in chosen])
    chunker.flush()
    chunker.drain()
    missing = [r.uri for r in todo if r.slide_id not in finished]
    if missing:
        raise PipelineError(
            f"{len(missing)} slides produced no outcome (first: {_shown(missing[0])}); "
            "the run is incomplete"
        )


def run_job(
    cfg: JobConfig,
    say: Callable[[str], None] | None = None,
    *,
    caption_stage: type | None = None,
    target_file_mb: float | None = None,
) -> RunResult:
    """Run the job described by ``cfg`` (see :class:`JobConfig`); prints progress through ``say``.

    ``caption_stage``: a stand-in for :class:`~pipeline.job.stage_caption.CaptionStage` with the
    same constructor (tests, benchmarks). ``target_file_mb``: size bound of a committed cells
    file in MiB (default ``cfg.target_file_mb``, else 128)."""
    say = say or (lambda line: print(line, file=sys.stdout, flush=True))
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    run_id = cfg.run_id or _new_run_id(started)
    run_date = f"{started:%Y-%m-%d}"
    s3 = cfg.s3_settings()
    in_store = storage_for(cfg.input, s3)
    out_store = storage_for(cfg.output, s3)
    env = cfg.worker_env()
    listing: Listing = list_slides(in_store, cfg.input, cfg.extensions)
    model_id, model_version = model_identity(cfg.model, s3, cfg.base)
    if target_file_mb is None:
        target_file_mb = cfg.target_file_mb
    from pipeline.job.stage_write import ray_compactor

    writer = OutputWriter(
        out_store,
        cfg.output,
        run_id,
        run_date,
        model_version,
        target_file_mb=target_file_mb,
        compactor=ray_compactor(runtime_env={"env_vars": env} if env else None),
    )
    result = RunResult(
        run_id,
        run_date,
        "ok",
        0,
        model_id,
        model_version,
        listed=len(listing.slides),
        ignored=list(listing.ignored),
    )
    say(
        f"run {run_id}: {len(listing.slides)} slides under {_shown(cfg.input)} "
        f"({len(listing.ignored)} non-slide objects ignored); model {_shown(model_id)} version {model_version}"
    )
    if cfg.dry_run:
        done = set() if cfg.reprocess else writer.done_slides(model_version, cfg.retry_failed)
        todo = [r for r in listing.slides if r.slide_id not in done]
        result.status, result.skipped = "dry_run", len(listing.slides) - len(todo)
        result.would_process = [r.uri for r in todo]
        for r in todo:
            say(f"would process {_shown(r.uri)}  ({r.size} bytes, slide_id {r.slide_id})")
        for uri in listing.ignored:
            say(f"ignored (not a slide) {_shown(uri)}")
        say(
            f"dry run: {len(todo)} to process, {result.skipped} already done with model {model_version}"
        )
        result.seconds = time.perf_counter() - t0
        return result
    # One writer per OUTPUT (pipeline/job/lease.py): taken before recovery touches anything, so
    # what recovery finds belongs to runs that are dead or fenced; released however the run ends.
    started_ray = False
    if listing.slides and (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        # On a cluster, refuse local paths other nodes cannot see before the output is touched.
        import ray

        from pipeline.job.cluster_paths import enforce_shared_paths

        if not ray.is_initialized():
            ray.init(address=cfg.ray_address, runtime_env={"env_vars": env} if env else None)
            started_ray = True
        try:
            enforce_shared_paths(cfg, say)
        except BaseException:
            if started_ray:
                ray.shutdown()
            raise
    lease = RunLease(out_store, cfg.output, run_id, ttl_s=cfg.lease_ttl_s, say=say)
    lease.acquire()
    writer.lease = lease
    lease.start_heartbeat()
    try:
        result.recovery = writer.recover()
        rec = result.recovery
        for note in rec.notes:
            say(f"recovery: {note}")
        if rec.rolled_forward or rec.rolled_back or rec.orphans_deleted:
            say(
                f"recovered: completed {len(rec.rolled_forward)} half-published chunks, rolled back "
                f"{len(rec.rolled_back)}, removed {rec.orphans_deleted} uncommitted staged files"
            )
        # A location that lists but cannot be written fails here, before any slide is read.
        writer.probe()
        done = (
            set()
            if cfg.reprocess
            else writer.done_slides(model_version, cfg.retry_failed, update_index=True)
        )
        todo = [r for r in listing.slides if r.slide_id not in done]
        result.skipped = len(listing.slides) - len(todo)
        chunker = Chunker(writer, cfg, run_id, model_version, say)
        say(f"{len(todo)} slides to process, {result.skipped} already done")
        try:
            if todo:
                import ray

                if not ray.is_initialized():
                    ray.init(
                        address=cfg.ray_address, runtime_env={"env_vars": env} if env else None
                    )
                    started_ray = True
                _stream(
                    todo, cfg, model_id, model_version, run_id, chunker, env, say, caption_stage
                )
                # Files no chosen cover used (a re-execution's duplicates, a failed slide's cells).
                writer.sweep_staging()
            else:
                chunker.flush()
                chunker.drain()
        except BaseException:
            _finish(result, chunker, writer, cfg, started, "failed", t0)
            raise
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        if cfg.record_skipped and result.skipped:
            now = datetime.now(UTC)
            writer.write_skipped(
                [
                    {
                        "slide_id": r.slide_id,
                        "slide_uri": r.uri,
                        "slide_etag": r.etag,
                        "slide_bytes": r.size,
                        "status": "skipped",
                        "reason": f"already settled with model {model_version}",
                        "cell_count": 0,
                        "run_id": run_id,
                        "model_version": model_version,
                        "finished_at": now,
                    }
                    for r in listing.slides
                    if r.slide_id in done
                ]
            )
        _finish(result, chunker, writer, cfg, started, None, t0)
        return result
    finally:
        lease.release()
        if started_ray:
            import ray

            if ray.is_initialized():  # the early cluster check started it and the run failed before
                ray.shutdown()


def _finish(
    result: RunResult,
    chunker: Chunker,
    writer: OutputWriter,
    cfg: JobConfig,
    started: datetime,
    status: str | None,
    t0: float,
) -> None:
    # Commits still in flight finish (or fail) before the run row is written and the lease goes.
    chunker.drain(raise_failure=False)
    rows = [r for r in chunker.all_slides if r["status"] != "skipped"]
    result.slides = rows
    result.ok = sum(r["status"] == "ok" for r in rows)
    result.failed = sum(r["status"] == "failed" for r in rows)
    result.cells_written = sum(c.cells for c in writer.committed)
    result.chunks = len(writer.committed)
    processed = result.ok + result.failed
    if status is None:
        frac = result.failed / processed if processed else 0.0
        status = "threshold_exceeded" if frac > cfg.max_failed_fraction else "ok"
    result.status = status
    result.exit_code = 0 if status == "ok" else 1
    row = {
        "run_id": result.run_id,
        "started_at": started,
        "finished_at": datetime.now(UTC),
        "status": status,
        "config_json": json.dumps(cfg.to_json_dict(), sort_keys=True),
        "model_id": result.model_id,
        "model_version": result.model_version,
        "pipeline_version": PIPELINE_VERSION,
        "schema_version": SCHEMA_VERSION,
        "slides_listed": result.listed,
        "slides_ok": result.ok,
        "slides_failed": result.failed,
        "slides_skipped": result.skipped,
        "cells_written": result.cells_written,
    }
    try:
        writer.write_run(row)
        # The next run then reads one small index instead of every slides/ file (ledger.py).
        writer.update_index()
    except PipelineError:
        if status == "ok":
            raise
    result.seconds = time.perf_counter() - t0


def _zone_note(row: dict) -> str:
    """`` [zones monolayer; 200 of 1,234 cells sampled; seen outside: thick 12; 27 region tasks
    as Ray tasks; candidates at 1.0 µm/px]`` for a slide read by zone or under a cell budget,
    else ``""`` (the slides/ columns zoning, region_tasks, region_tasks_fanned_out and
    candidate_mpp, in words)."""
    parts = []
    if row.get("zones_selected"):
        parts.append("zones " + ",".join(_shown(z) for z in row["zones_selected"]))
    if row.get("sampled"):
        about = "~" if row.get("cells_total_estimated") else ""
        parts.append(f"{row['cell_count']} of {about}{row.get('cells_total')} cells sampled")
    outside = {k: v for k, v in (row.get("cells_outside_zones") or {}).items() if v}
    if outside:
        parts.append(
            "seen outside: " + ", ".join(f"{_shown(k)} {v}" for k, v in sorted(outside.items()))
        )
    n = row.get("region_tasks")
    if row.get("zoning") == "zoned" and n:
        where = "as Ray tasks" if row.get("region_tasks_fanned_out") else "in one process"
        parts.append(f"{n} region task{'s' * (n != 1)} {where}")
    if row.get("candidate_mpp"):
        parts.append(f"candidates at {row['candidate_mpp']:.2f} µm/px")
    return f" [{'; '.join(parts)}]" if parts else ""


def format_summary(result: RunResult, output: str) -> str:
    """Human summary: one line per processed slide (cells, cell-type counts, failure reason)."""
    lines = [
        f"run {result.run_id} ({result.run_date}): {result.status}; {result.listed} slides listed, "
        f"{result.ok} ok, {result.failed} failed, {result.skipped} already done; "
        f"{result.cells_written} cells written in {result.chunks} chunks; {result.seconds:.1f} s"
    ]
    for r in sorted(result.slides, key=lambda r: r["slide_uri"]):
        uri = _shown(r["slide_uri"])
        if r["status"] == "ok":
            types = ", ".join(
                f"{_shown(k)} {v}"
                for k, v in sorted(r.get("cell_types", {}).items(), key=lambda kv: (-kv[1], kv[0]))
            )
            lines.append(
                f"  ok      {uri}: {r['cell_count']} cells"
                + (f" ({types})" if types else "")
                + _zone_note(r)
            )
        else:
            lines.append(f"  {r['status']:<7} {uri}: {_shown(r['reason'])}")
    if result.ignored:
        lines.append(
            f"  {len(result.ignored)} non-slide objects ignored, e.g. {_shown(result.ignored[0])}"
        )
    if result.status != "dry_run":
        lines.append(
            f"outputs: {_shown(output)} (cells/, slides/, runs/ partitioned by run_date={result.run_date})"
        )
    return "\n".join(lines)
