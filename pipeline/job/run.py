"""Orchestration of one nightly run: list, skip what is done, stream, commit per chunk, summarise.

Exit status (returned by :func:`run_job` as ``RunResult.exit_code``): 0 when the run finished and
the fraction of failed slides is at most ``max_failed_fraction``; 1 when the threshold is
exceeded. A failure of the run itself (storage unreachable, an output that cannot be written,
model unusable, a stage crashing) raises; committed chunks stay committed and the next run resumes
after them. The output is probed with a small write before any slide is read, so an unwritable
location fails in seconds rather than at the first chunk commit.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from pipeline import __version__ as PIPELINE_VERSION
from pipeline.errors import ConfigError, PipelineError
from pipeline.job.config import JobConfig
from pipeline.job.lease import RunLease
from pipeline.job.listing import Listing, SlideRef, list_slides
from pipeline.job.storage import S3Settings, storage_for
from pipeline.job.writer import InjectedFault, OutputWriter, Recovery
from pipeline.schema import CELL_COLUMNS, SCHEMA_VERSION

__all__ = ["RunResult", "run_job", "model_identity", "format_summary"]

_CELL_NAMES = [c[0] for c in CELL_COLUMNS]


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


def _check_consistency():
    try:
        from pipeline.consistency import check_consistency
    except ImportError:  # the consistency module is optional: columns stay null without it
        return None
    return check_consistency


def model_identity(model: str | None, env: dict[str, str] | None = None,
                   base: str | None = None) -> tuple[str, str]:
    """``(model_id, model_version)`` of a checkpoint location, as the caption actors will see it.

    ``base``: the ``--base`` override of a LoRA adapter's base (the version hashes base + adapter).
    """
    from hemblip import inference
    from hemblip.errors import HemblipError

    saved = {key: os.environ.get(key) for key in (env or {})}
    # The run's settings (e.g. --s3-endpoint for an s3:// model) win over this process's
    # environment, and only for this load: a long-lived caller's environment is left as it was.
    os.environ.update(env or {})
    try:
        # Loading the checkpoint once on the driver is the only way to get exactly the version the
        # actors will compute (adapters hash base + adapter weights); it costs seconds, once per run.
        cap = inference.Captioner(model, device="cpu", batch_size=1, base=base)
        ident = (cap.model_id, cap.model_version)
        del cap
    except HemblipError as exc:
        with_base = f" --base {base}" if base is not None else ""
        raise ConfigError(f"--model {model or '(demo checkpoint)'}{with_base}: {exc}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return ident


def _new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _text(value) -> str | None:
    """A string cell of a numpy batch; Ray Data turns an all-null object column into float NaN."""
    if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
        return None
    return str(value)


def _cell_row(batch, i: int, base: dict, check) -> dict:
    rec = json.loads(batch["record"][i])
    row = {name: rec.get(name) for name in _CELL_NAMES}
    row["caption"] = _text(batch["caption"][i])
    row["caption_logprob"] = float(batch["caption_logprob"][i])
    row["cell_type"] = _text(batch["cell_type"][i])
    conf = batch["cell_type_confidence"][i] if "cell_type_confidence" in batch else None
    # NaN is how a float batch column says "none"; the table says it with null.
    row["cell_type_confidence"] = float(conf) if conf is not None and math.isfinite(conf) else None
    row["case"] = _text(batch["case"][i])
    attrs_json = _text(batch["attributes"][i])
    attrs = json.loads(attrs_json) if attrs_json else {}
    for name, value in attrs.items():
        if name in row:
            row[name] = value
    if check is not None:
        consistent, bad = check(row)
        row["consistent"] = consistent
        row["inconsistent_attributes"] = list(bad)
    thumb = batch["thumbnail"][i]
    row["thumbnail_jpeg"] = bytes(thumb) if isinstance(thumb, bytes | bytearray | np.bytes_) and len(thumb) else None
    row.update(base)
    return row


class _Chunker:
    """Collects finished slides and commits them in chunks (``chunk_slides`` / ``chunk_cells``)."""

    def __init__(self, writer: OutputWriter, cfg: JobConfig, run_id: str, model_version: str, say):
        self.writer, self.cfg, self.run_id, self.mv, self.say = writer, cfg, run_id, model_version, say
        self.cells: list[dict] = []
        self.slides: list[dict] = []
        self.all_slides: list[dict] = []

    def add(self, slide_row: dict, cell_rows: list[dict]) -> None:
        self.slides.append(slide_row)
        self.cells.extend(cell_rows)
        if len(self.slides) >= self.cfg.chunk_slides or len(self.cells) >= self.cfg.chunk_cells:
            self.flush()

    def flush(self) -> None:
        if not self.slides:
            return
        now = datetime.now(UTC)
        for s in self.slides:
            s["finished_at"] = now
        commit = self.writer.commit_chunk(self.cells, self.slides)
        self.say(f"committed chunk {commit.name}: {len(commit.slide_ids)} slides, {commit.cells} cells")
        self.all_slides.extend(self.slides)
        self.cells, self.slides = [], []


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
    return "".join("\\\\" if ch == "\\" else ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _slide_line(k: int, n: int, row: dict) -> str:
    uri = _shown(row["slide_uri"])
    if row["status"] == "ok":
        times = f"stage {row['stage_seconds'] or 0:.1f} s, detect {row['detect_seconds'] or 0:.1f} s, caption {row['caption_seconds'] or 0:.1f} s"
        return f"[{k}/{n}] ok      {uri}  {row['cell_count']} cells ({times})"
    return f"[{k}/{n}] FAILED  {uri}  {_shown(row['reason'])}"


def _stream(todo: list[SlideRef], cfg: JobConfig, model_id: str, model_version: str, run_id: str,
            chunker: _Chunker, env: dict[str, str], say) -> None:
    import ray

    from pipeline.job.plan import CaptionSettings, build_plan, resolve_gpus
    from pipeline.job.stage_detect import AttemptLedger, DetectSettings

    s3 = S3Settings(cfg.s3_endpoint, cfg.s3_max_attempts, cfg.transfer_concurrency, cfg.transfer_chunk_mb)
    detect = DetectSettings(s3, cfg.scratch_dir, cfg.crop_um, cfg.crop_px, cfg.mpp, cfg.thumbnails, cfg.thumbnail_px,
                            max_detect_mpp=cfg.max_detect_mpp, max_slide_attempts=cfg.max_slide_attempts,
                            max_decode_mb=cfg.max_decode_mb)
    caption = CaptionSettings(cfg.model, model_version, cfg.caption_batch_size, cfg.caption_min_actors,
                              cfg.caption_max_actors, resolve_gpus(cfg.caption_gpus_per_actor),
                              cfg.caption_cpus_per_actor, cfg.caption_cpu_threads, base=cfg.base)
    # Counts attempts per slide across worker processes: a slide that kills its worker is
    # recorded worker_died after `max_slide_attempts` deaths instead of being retried for ever.
    ledger = ray.remote(num_cpus=0, max_restarts=0)(AttemptLedger).remote()
    try:
        _consume(build_plan(todo, detect, caption, detect_cpus=cfg.detect_cpus, env=env, ledger=ledger,
                            max_task_retries=cfg.max_slide_attempts + 1),
                 todo, model_id, model_version, run_id, chunker, say)
    finally:
        ray.kill(ledger)


def _consume(ds, todo: list[SlideRef], model_id: str, model_version: str, run_id: str, chunker: _Chunker,
             say) -> None:
    """Turn the plan's rows into slide rows and cell rows, committing each slide once complete."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = True
    check = _check_consistency()
    base = {"run_id": run_id, "model_id": model_id, "model_version": model_version,
            "pipeline_version": PIPELINE_VERSION, "schema_version": SCHEMA_VERSION}
    cells: dict[str, list[dict]] = defaultdict(list)
    outcomes: dict[str, dict] = {}
    caption_s: dict[str, float] = defaultdict(float)
    finished: set[str] = set()
    seen: dict[str, set[str]] = defaultdict(set)
    n = len(todo)
    batches = ds.iter_batches(batch_size=None, batch_format="numpy")
    try:
        for batch in batches:
            for i in range(len(batch["kind"])):
                sid = str(batch["slide_id"][i])
                if sid in finished:  # a re-executed task's repeat of a committed slide
                    continue
                if batch["kind"][i] == "cell":
                    row = _cell_row(batch, i, base, check)
                    if row["cell_id"] in seen[sid]:  # idem, within a slide still in flight
                        continue
                    seen[sid].add(row["cell_id"])
                    cells[sid].append(row)
                    caption_s[sid] += float(batch["caption_seconds"][i])
                else:
                    # The first outcome stands: a re-executed task repeats it.
                    outcomes.setdefault(sid, json.loads(batch["record"][i]))
                out = outcomes.get(sid)
                if out is None:
                    continue
                ok = out["status"] == "ok"
                # A failed slide is complete at once: cells a killed attempt captioned are dropped.
                if not ok or len(cells[sid]) == out["cell_count"]:
                    finished.add(sid)
                    kept = cells.pop(sid, [])
                    if not ok:
                        kept = []
                    row = dict(out, caption_seconds=caption_s[sid] if ok else None,
                               run_id=run_id, model_version=model_version, finished_at=None)
                    row["cell_types"] = dict(Counter(c["cell_type"] or "(none)" for c in kept))
                    say(_slide_line(len(finished), n, row))
                    seen.pop(sid, None)
                    chunker.add(row, kept)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    chunker.flush()
    missing = [r.uri for r in todo if r.slide_id not in finished]
    if missing:
        raise PipelineError(f"{len(missing)} slides produced no outcome (first: {_shown(missing[0])}); "
                            "the run is incomplete")


def run_job(cfg: JobConfig, say: Callable[[str], None] | None = None) -> RunResult:
    """Run the job described by ``cfg`` (see :class:`JobConfig`); prints progress through ``say``."""
    say = say or (lambda line: print(line, file=sys.stdout, flush=True))
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    run_id = cfg.run_id or _new_run_id(started)
    run_date = f"{started:%Y-%m-%d}"
    s3 = S3Settings(cfg.s3_endpoint, cfg.s3_max_attempts, cfg.transfer_concurrency, cfg.transfer_chunk_mb)
    in_store = storage_for(cfg.input, s3)
    out_store = storage_for(cfg.output, s3)
    env = cfg.worker_env()
    listing: Listing = list_slides(in_store, cfg.input, cfg.extensions)
    model_id, model_version = model_identity(cfg.model, env, cfg.base)
    writer = OutputWriter(out_store, cfg.output, run_id, run_date, model_version,
                          cfg.fault_after_chunks, cfg.fault_point)
    result = RunResult(run_id, run_date, "ok", 0, model_id, model_version, listed=len(listing.slides),
                       ignored=list(listing.ignored))
    say(f"run {run_id}: {len(listing.slides)} slides under {_shown(cfg.input)} "
        f"({len(listing.ignored)} non-slide objects ignored); model {_shown(model_id)} version {model_version}")
    if cfg.dry_run:
        done = set() if cfg.reprocess else writer.done_slides(model_version, cfg.retry_failed)
        todo = [r for r in listing.slides if r.slide_id not in done]
        result.status, result.skipped = "dry_run", len(listing.slides) - len(todo)
        result.would_process = [r.uri for r in todo]
        for r in todo:
            say(f"would process {_shown(r.uri)}  ({r.size} bytes, slide_id {r.slide_id})")
        for uri in listing.ignored:
            say(f"ignored (not a slide) {_shown(uri)}")
        say(f"dry run: {len(todo)} to process, {result.skipped} already done with model {model_version}")
        result.seconds = time.perf_counter() - t0
        return result
    # One writer per OUTPUT (pipeline/job/lease.py): taken before recovery touches anything, so
    # what recovery finds belongs to runs that are dead or fenced; released however the run ends.
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
            say(f"recovered: completed {len(rec.rolled_forward)} half-published chunks, rolled back "
                f"{len(rec.rolled_back)}, removed {rec.orphans_deleted} uncommitted staged files")
        # A location that lists but cannot be written fails here, before any slide is read.
        writer.probe()
        done = set() if cfg.reprocess else writer.done_slides(model_version, cfg.retry_failed)
        todo = [r for r in listing.slides if r.slide_id not in done]
        result.skipped = len(listing.slides) - len(todo)
        chunker = _Chunker(writer, cfg, run_id, model_version, say)
        say(f"{len(todo)} slides to process, {result.skipped} already done")
        started_ray = False
        try:
            if todo:
                import ray

                if not ray.is_initialized():
                    ray.init(address=cfg.ray_address, runtime_env={"env_vars": env} if env else None)
                    started_ray = True
                _stream(todo, cfg, model_id, model_version, run_id, chunker, env, say)
            else:
                chunker.flush()
        except InjectedFault:
            raise  # simulates a kill: nothing more is written (but the lease goes, below)
        except BaseException:
            _finish(result, chunker, writer, cfg, started, "failed", t0)
            raise
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        if cfg.record_skipped and result.skipped:
            now = datetime.now(UTC)
            writer.write_skipped([
                {"slide_id": r.slide_id, "slide_uri": r.uri, "slide_etag": r.etag, "slide_bytes": r.size,
                 "status": "skipped", "reason": f"already settled with model {model_version}", "cell_count": 0,
                 "run_id": run_id, "model_version": model_version, "finished_at": now}
                for r in listing.slides if r.slide_id in done])
        _finish(result, chunker, writer, cfg, started, None, t0)
        return result
    finally:
        lease.release()


def _finish(result: RunResult, chunker: _Chunker, writer: OutputWriter, cfg: JobConfig,
            started: datetime, status: str | None, t0: float) -> None:
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
    row = {"run_id": result.run_id, "started_at": started, "finished_at": datetime.now(UTC),
           "status": status, "config_json": json.dumps(cfg.to_json_dict(), sort_keys=True),
           "model_id": result.model_id, "model_version": result.model_version,
           "pipeline_version": PIPELINE_VERSION, "schema_version": SCHEMA_VERSION,
           "slides_listed": result.listed, "slides_ok": result.ok, "slides_failed": result.failed,
           "slides_skipped": result.skipped, "cells_written": result.cells_written}
    try:
        writer.write_run(row)
    except PipelineError:
        if status == "ok":
            raise
    result.seconds = time.perf_counter() - t0


def format_summary(result: RunResult, output: str) -> str:
    """Human summary: one line per processed slide (cells, cell-type counts, failure reason)."""
    lines = [f"run {result.run_id} ({result.run_date}): {result.status}; {result.listed} slides listed, "
             f"{result.ok} ok, {result.failed} failed, {result.skipped} already done; "
             f"{result.cells_written} cells written in {result.chunks} chunks; {result.seconds:.1f} s"]
    for r in sorted(result.slides, key=lambda r: r["slide_uri"]):
        uri = _shown(r["slide_uri"])
        if r["status"] == "ok":
            types = ", ".join(f"{_shown(k)} {v}" for k, v in sorted(r.get("cell_types", {}).items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"  ok      {uri}: {r['cell_count']} cells" + (f" ({types})" if types else ""))
        else:
            lines.append(f"  {r['status']:<7} {uri}: {_shown(r['reason'])}")
    if result.ignored:
        lines.append(f"  {len(result.ignored)} non-slide objects ignored, e.g. {_shown(result.ignored[0])}")
    if result.status != "dry_run":
        lines.append(f"outputs: {_shown(output)} (cells/, slides/, runs/ partitioned by run_date={result.run_date})")
    return "\n".join(lines)
