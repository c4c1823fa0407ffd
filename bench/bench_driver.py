"""Driver cost of the nightly job, old path vs new path, and start-up over a long output history.

**Throughput and driver CPU.** The real job (``pipeline.job.run_job``: listing, Ray Data plan,
detect stage, caption stage, write stage, chunk commits with journal and lease) runs on a local
Ray cluster over local slides, twice in separate processes: the *old* path (the code of
``--old-ref``, extracted with ``git archive`` into a temporary directory; every cell row went
through the driver, which wrote the Parquet) and the *new* path (this tree: workers write, the
driver commits metadata). Two models are replaced by instant stand-ins, identical in both runs:

* the caption model by :class:`InstantCaption` (a fixed caption per cell, no torch);
* the detector by a replay of one real detection (``pipeline.detect.detect_slide`` on a
  generated BCCD slide, its cells repeated with shifted centroids to ``--cells-per-slide``),
  installed in every Ray worker by a setup hook. The real detector spends ~90 ms per cell on this
  machine (1,014 cells in 100 s on one core); with it the run measures the detector, not the
  driver.

Everything else (reading the slide file, thumbnails, cell ids, the object store, batching, the
driver's loop, Parquet writing, commits) is the job's own code. Printed per path: cells/s through
the job (wall time of ``run_job``) and the driver's CPU seconds per 100,000 cells
(``time.process_time`` of the driver process around its consume loop: the loop itself, Ray Data's
executor threads in the driver, chunk commits). The *ceiling* is the cells/s one driver core
could sustain: 100,000 / (driver CPU-s per 100,000 cells).

**Start-up over history.** ``done_slides`` (what a run does before its first slide) over an
empty output, over an output with ``--history`` past runs' ``slides/`` files (one file each,
five slides per file) without an index (first run: the index is built), and with the index.

    python bench/bench_driver.py [--slides 12] [--cells-per-slide 2000] [--history 10000]
    python -m bench bench_driver
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["run", "InstantCaption"]

REPO = Path(__file__).resolve().parents[1]
#: The last commit before workers wrote the cells (the old path).
OLD_REF = "3a60e57"
_REPLAY_ENV = "BENCH_DRIVER_REPLAY"


# --------------------------------------------------------------------------- stand-ins


class InstantCaption:
    """Stand-in for ``CaptionStage`` (same constructor): a fixed caption per cell, no model.
    Produces the batch keys of whichever caption stage the running code has (old: JSON
    ``record``/``attributes`` columns; new: typed columns via ``stage_caption.caption_columns``)."""

    def __init__(
        self,
        model=None,
        batch_size=32,
        device=None,
        expected_version=None,
        env=None,
        cpu_threads=None,
        base=None,
    ):
        from types import SimpleNamespace

        self.result = SimpleNamespace(
            caption="a lymphocyte",
            mean_logprob=-0.1,
            cell_type="lymphocyte",
            cell_type_confidence=0.9,
            case="healthy",
            attributes={"cell_size": "small", "nucleus_shape": "round"},
        )

    def __call__(self, batch):
        started = time.time()
        kinds = batch["kind"]
        n = len(kinds)
        idx = [i for i in range(n) if kinds[i] == "cell"]
        if "record" not in batch:
            from pipeline.job.stage_caption import caption_columns

            return caption_columns(batch, idx, [self.result] * len(idx), 0.0, started)
        r = self.result
        out = {k: batch[k] for k in ("kind", "slide_id", "record", "thumbnail")}
        out["caption"] = np.array([r.caption if k == "cell" else None for k in kinds], dtype=object)
        out["caption_logprob"] = np.where(kinds == "cell", r.mean_logprob, np.nan).astype(
            np.float64
        )
        out["cell_type"] = np.array(
            [r.cell_type if k == "cell" else None for k in kinds], dtype=object
        )
        out["cell_type_confidence"] = np.where(
            kinds == "cell", r.cell_type_confidence, np.nan
        ).astype(np.float64)
        out["case"] = np.array([r.case if k == "cell" else None for k in kinds], dtype=object)
        attrs = json.dumps(r.attributes)
        out["attributes"] = np.array([attrs if k == "cell" else None for k in kinds], dtype=object)
        out["caption_seconds"] = np.zeros(n, np.float64)
        out["caption_started"] = np.full(n, started, np.float64)
        return out


def _install_replay() -> None:
    """Ray worker setup hook: ``detect_slide`` returns the cached detection (see module doc)."""
    path = os.environ.get(_REPLAY_ENV)
    if not path:
        return
    import pipeline.detect as detect

    with open(path, "rb") as fh:
        cached = pickle.load(fh)

    def replay(_path, config=None, source=None):
        return cached

    detect.detect_slide = replay


def _replay_result(work: Path, cells: int):
    """One real detection on a generated slide, its cells repeated to ``cells`` with shifted
    centroids (distinct cell ids), crops at 64 px."""
    from pipeline import samples as S
    from pipeline.detect import DetectConfig, detect_slide

    slides = S.build_sample_slides(work / "sample")
    res = detect_slide(slides[0].path, DetectConfig(crop_px=64))
    base_n = len(res.records)
    reps = -(-cells // base_n)
    span = float(max(res.info.get("width") or 10_000, res.info.get("height") or 10_000))
    records = []
    for k in range(reps):
        for rec in res.records:
            r = dict(rec)
            r["centroid_x"] = float(r["centroid_x"]) + k * span
            r["cell_index"] = len(records)
            records.append(r)
    res.records = records[:cells]
    res.crops = np.resize(res.crops, (cells, *res.crops.shape[1:]))
    return res


# --------------------------------------------------------------------------- one path (subprocess)


class _Batches:
    """What ``_consume`` of the old path iterates: ``ds.iter_batches(...)``."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def iter_batches(self, **_kw):
        return iter(self.batches)


def _consume_replay(args, cfg) -> dict:
    """The driver's loop alone at full speed: the batches it receives in the job (made here by
    the job's own stage functions before the clock starts) fed to its consume loop, commits
    included. Compaction runs in a helper process, as it runs on a worker in the job."""
    from concurrent.futures import ProcessPoolExecutor

    import pipeline.job.run as run_mod
    from pipeline.job.listing import list_slides
    from pipeline.job.stage_detect import DetectSettings, process_slide
    from pipeline.job.storage import S3Settings, storage_for
    from pipeline.job.writer import OutputWriter

    new = hasattr(run_mod, "consume")
    out = args.output + "-replay"
    refs = list_slides(storage_for(args.input), args.input, cfg.extensions).slides
    settings = DetectSettings(S3Settings(), crop_px=cfg.crop_px, thumbnail_px=cfg.thumbnail_px)
    cap = InstantCaption()
    batches: list[dict] = []
    stage = None
    if new:
        from pipeline.job.stage_write import WriteStage

        base = {
            "run_id": "replay",
            "model_id": "m",
            "model_version": "v1",
            "pipeline_version": "p",
            "schema_version": "1",
        }
        stage = WriteStage(out, S3Settings(), "replay", base)
    for ref in refs:
        captioned = [cap(b) for b in process_slide(ref, settings)]
        if stage is None:
            batches += captioned
            continue
        merged = {k: np.concatenate([c[k] for c in captioned]) for k in captioned[0]}
        n = len(merged["kind"])
        for start in range(0, n, 1024):
            batches.append(stage({k: v[start : start + 1024] for k, v in merged.items()}))
    pool = ProcessPoolExecutor(1)
    kw = {}
    if new:
        from pipeline.job.stage_write import compact_files

        def compactor(storage, jobs):
            list(
                pool.map(
                    compact_files, [storage] * len(jobs), [j[0] for j in jobs], [j[1] for j in jobs]
                )
            )

        kw["compactor"] = compactor
        pool.submit(int).result()  # start the helper before the clock
    writer = OutputWriter(storage_for(out), out, "replay", "2026-01-01", "v1", **kw)
    # the old code (a git archive of the previous commit) named it _Chunker
    chunker = (run_mod.Chunker if new else run_mod._Chunker)(
        writer, cfg, "replay", "v1", lambda line: None
    )
    t0 = time.process_time()
    if new:
        run_mod.consume(iter(batches), refs, "replay", "v1", chunker, lambda line: None)
    else:
        run_mod._consume(_Batches(batches), refs, "m", "v1", "replay", chunker, lambda line: None)
    cpu = time.process_time() - t0
    pool.shutdown()
    return {"cells": sum(c.cells for c in writer.committed), "cpu_s": cpu}


def _one(args) -> dict:
    """Runs inside the path's own process (old or new code on sys.path)."""
    import ray

    import pipeline.job.plan as plan
    import pipeline.job.run as run_mod
    from pipeline.job import load_config, run_job

    os.environ[_REPLAY_ENV] = args.replay
    _install_replay()  # for the in-process replay of the driver's loop
    cfg = load_config(
        overrides={
            "input": args.input,
            "output": args.output,
            "model": args.model,
            "crop_px": 64,
            "caption_batch_size": 64,
            "chunk_slides": 4,
        }
    )
    loop = _consume_replay(args, cfg)
    plan.CaptionStage = InstantCaption  # both paths: build_plan looks the class up at call time
    spent = {"cpu": 0.0, "thread": 0.0}
    name = "consume" if hasattr(run_mod, "consume") else "_consume"
    inner = getattr(run_mod, name)

    def timed(*a, **kw):
        t0, th0 = time.process_time(), time.thread_time()
        try:
            return inner(*a, **kw)
        finally:
            spent["cpu"] += time.process_time() - t0
            spent["thread"] += time.thread_time() - th0

    setattr(run_mod, name, timed)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "worker_process_setup_hook": _install_replay,
            "env_vars": {_REPLAY_ENV: args.replay},
        },
    )
    t0 = time.perf_counter()
    res = run_job(cfg, say=lambda line: None)
    wall = time.perf_counter() - t0
    ray.shutdown()
    from pipeline.job.storage import storage_for
    from pipeline.job.writer import OutputWriter

    t1 = time.perf_counter()
    OutputWriter(
        storage_for(args.history_dir), args.history_dir, "bench", "2026-01-01", "v1"
    ).done_slides("v1")
    start_s = time.perf_counter() - t1
    return {
        "cells": res.cells_written,
        "ok": res.ok,
        "wall_s": wall,
        "driver_cpu_s": spent["cpu"],
        "loop_thread_cpu_s": spent["thread"],
        "loop_cells": loop["cells"],
        "loop_cpu_s": loop["cpu_s"],
        "history_done_s": start_s,
        "status": res.status,
    }


# --------------------------------------------------------------------------- orchestration


def _old_tree(work: Path, ref: str) -> Path:
    dest = work / "old"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _history(root: Path, runs: int) -> None:
    """``runs`` past runs' slides/ files (5 ok rows each, model v1) under ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schema import SLIDE_SCHEMA

    rows = 5
    for r in range(runs):
        day = f"2020-01-{1 + r % 28:02d}"
        d = root / "slides" / f"run_date={day}"
        d.mkdir(parents=True, exist_ok=True)
        ids = [f"{r:08d}{k:024d}" for k in range(rows)]
        t = pa.table(
            {
                "slide_id": ids,
                "slide_uri": [f"s3://b/{i}.svs" for i in ids],
                "status": ["ok"] * rows,
                "cell_count": [1] * rows,
                "run_id": [f"run{r}"] * rows,
                "model_version": ["v1"] * rows,
            }
        )
        t = pa.Table.from_pylist(t.to_pylist(), schema=SLIDE_SCHEMA)
        pq.write_table(t, d / f"part-{r:024x}.parquet")


def _done_seconds(root: Path, update: bool) -> tuple[float, int]:
    from pipeline.job.storage import storage_for
    from pipeline.job.writer import OutputWriter

    w = OutputWriter(storage_for(str(root)), str(root), "bench", "2026-01-01", "v1")
    t0 = time.perf_counter()
    n = len(w.done_slides("v1", update_index=update))
    return time.perf_counter() - t0, n


def _child(tree: Path, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--one", *argv],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{tree}: path failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def run(
    slides: int = 12, cells_per_slide: int = 2000, history: int = 10_000, old_ref: str = OLD_REF
) -> list[dict]:
    """Rows for ``python -m bench`` (see the module doc)."""
    from pipeline import samples as S

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        work = Path(tmp)
        replay = work / "replay.pkl"
        with open(replay, "wb") as fh:
            pickle.dump(_replay_result(work, cells_per_slide), fh)
        src = S.build_sample_slides(work / "src")[0].path.read_bytes()
        inp = work / "in"
        inp.mkdir()
        for i in range(slides):  # distinct identities; the replayed detection ignores the pixels
            (inp / f"slide_{i:03d}.tiff").write_bytes(src + i.to_bytes(4, "big"))
        from hemblip.model import build_model, save_model

        m = build_model("tiny")
        model = work / "tiny-model"
        save_model(m.model, m.image_processor, m.tokenizer, model)
        hist = work / "history"
        t0 = time.perf_counter()
        _history(hist, history)
        print(
            f"wrote {history} past runs' slides files in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )

        empty = work / "empty"
        empty.mkdir()
        empty_s, _ = _done_seconds(empty, True)
        cold_s, n_done = _done_seconds(hist, True)  # no index yet: built from slides/
        warm_s, _ = _done_seconds(hist, True)  # the next run: index + one listing
        results = {}
        for label, tree in (("old", _old_tree(work, old_ref)), ("new", REPO)):
            argv = [
                "--input",
                str(inp),
                "--output",
                str(work / f"out-{label}"),
                "--model",
                str(model),
                "--replay",
                str(replay),
                "--history-dir",
                str(work / f"hist-{label}"),
            ]
            # Each path reads its own copy of the history (the new one would otherwise find the index).
            subprocess.run(["cp", "-r", str(hist), str(work / f"hist-{label}")], check=True)
            (work / f"hist-{label}" / "_index" / "done.parquet").unlink(missing_ok=True)
            print(f"running the {label} path ...", file=sys.stderr, flush=True)
            results[label] = r = _child(tree, argv)
            per100k = r["driver_cpu_s"] / r["cells"] * 100_000
            detail = f"{r['ok']} slides x {cells_per_slide} cells, {r['cells']} cells in {r['wall_s']:.1f} s"
            loop100k = r["loop_cpu_s"] / r["loop_cells"] * 100_000
            rows += [
                {
                    "name": f"{label}_driver_loop_cpu_per_100k_cells",
                    "value": loop100k,
                    "unit": "CPU-s",
                    "goal": "<= 1" if label == "new" else "",
                    "detail": f"the driver's consume loop + commits alone, {r['loop_cells']} cells replayed",
                },
                {
                    "name": f"{label}_driver_ceiling",
                    "value": 100_000 / max(loop100k, 1e-9),
                    "unit": "cells/s",
                    "goal": "",
                    "detail": "cells/s one driver core could sustain (from the loop alone)",
                },
                {
                    "name": f"{label}_cells_per_s",
                    "value": r["cells"] / r["wall_s"],
                    "unit": "cells/s",
                    "goal": "",
                    "detail": detail,
                },
                {
                    "name": f"{label}_driver_cpu_per_100k_cells_in_job",
                    "value": per100k,
                    "unit": "CPU-s",
                    "goal": "",
                    "detail": detail
                    + "; includes Ray Data's executor threads and the plan's start-up, "
                    "which scale with wall time, not cells",
                },
            ]
        old, new = results["old"], results["new"]
        ceiling_ratio = (old["loop_cpu_s"] / old["loop_cells"]) / max(
            new["loop_cpu_s"] / new["loop_cells"], 1e-12
        )
        rows += [
            {
                "name": "ceiling_new_vs_old",
                "value": ceiling_ratio,
                "unit": "x",
                "goal": ">= 5",
                "detail": "",
            },
            {
                "name": "cells_per_s_new_vs_old",
                "value": (new["cells"] / new["wall_s"]) / (old["cells"] / old["wall_s"]),
                "unit": "x",
                "goal": "",
                "detail": "end to end on this machine's 2 cores",
            },
            {
                "name": "startup_empty",
                "value": empty_s,
                "unit": "s",
                "goal": "",
                "detail": "done_slides, empty output",
            },
            {
                "name": f"startup_{history}_runs_index_built",
                "value": cold_s,
                "unit": "s",
                "goal": "",
                "detail": f"first run: the index is built from {history} slides files ({n_done} slides done)",
            },
            {
                "name": f"startup_{history}_runs_indexed",
                "value": warm_s,
                "unit": "s",
                "goal": "",
                "detail": "with the index: one listing + one file",
            },
            {
                "name": f"startup_{history}_runs_old",
                "value": old["history_done_s"],
                "unit": "s",
                "goal": "",
                "detail": "old code: every slides file read serially",
            },
            {
                "name": "startup_indexed_vs_empty",
                "value": warm_s / max(empty_s, 1e-9),
                "unit": "x",
                "goal": "",
                "detail": "ratio of start-up times",
            },
            {
                "name": "startup_old_vs_indexed",
                "value": old["history_done_s"] / warm_s,
                "unit": "x",
                "goal": "",
                "detail": "",
            },
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", type=int, default=12)
    p.add_argument("--cells-per-slide", type=int, default=2000)
    p.add_argument(
        "--history", type=int, default=10_000, help="past runs in the start-up benchmark"
    )
    p.add_argument("--old-ref", default=OLD_REF, help="git ref of the old path")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--input", "--output", "--model", "--replay"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--history-dir", dest="history_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args)))
        return 0
    for row in run(args.slides, args.cells_per_slide, args.history, args.old_ref):
        value = row["value"]
        shown = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        print(f"{row['name']:<40} {shown:>10} {row['unit']:<8} {row['goal']:<6} {row['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
