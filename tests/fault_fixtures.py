"""Fixtures of the fault suite; a test module imports the ones it uses.

``from fault_fixtures import fault_proxy_fixture  # noqa: F401`` makes the fixture ``fault_proxy``
available in that module (the function's name differs from the fixture's so that test parameters
do not shadow the import).

``fault_proxy`` is a running :class:`faultproxy.FaultProxy` in front of the session's moto server
(``s3_server``), with no rules. A test sets its own rules (``fault_proxy.add("503", op="get",
first=2)``); the proxy is stopped and its rules dropped after the test. A test may also mark itself
``@pytest.mark.parametrize`` over rule dicts and call ``fault_proxy.add(**rule)``.

``s3_client_factory`` makes boto3 clients on any endpoint with a given retry budget.
"""

from __future__ import annotations

import pytest
from faultproxy import FaultProxy

__all__ = ["fault_proxy_fixture", "s3_client_factory_fixture", "make_s3_client"]


def make_s3_client(endpoint: str, max_attempts: int = 5, read_timeout: float = 30.0):
    """A boto3 S3 client on ``endpoint`` with standard-mode retries (``max_attempts`` tries in all, the first included)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=5,
            read_timeout=read_timeout,
            s3={"addressing_style": "path"},
        ),
    )


@pytest.fixture(name="fault_proxy")
def fault_proxy_fixture(s3_server):
    """A fault proxy in front of the session S3 server; set rules with ``.add(...)``."""
    proxy = FaultProxy(s3_server).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(name="s3_client_factory")
def s3_client_factory_fixture(s3_server):
    """``factory(endpoint=None, **kw)`` -> boto3 client (default endpoint: the S3 server)."""

    def factory(endpoint: str | None = None, **kw):
        return make_s3_client(endpoint or s3_server, **kw)

    return factory


# --------------------------------------------------------------------------- small slides

#: Level-0 µm/px written into the small slides (the BCCD scale, see pipeline/sample_data).
SMALL_MPP = 0.072


def _bccd_fields() -> list:
    from pipeline.samples import SAMPLE_DATA_DIR

    return sorted((SAMPLE_DATA_DIR / "bccd" / "JPEGImages").glob("*.jpg"))


def write_small_slide(path, field_index: int = 0, mpp: float | None = SMALL_MPP) -> int:
    """One real BCCD smear field (640x480, 1-3 WBCs, MIT, see pipeline/sample_data/ATTRIBUTION.md)
    as a 2-level JPEG-tiled pyramidal generic TIFF; ``mpp=None`` leaves the scale out.

    Returns the number of annotated WBCs in the field.
    """
    import numpy as np
    import tifffile
    from PIL import Image

    from pipeline.samples import SAMPLE_DATA_DIR, read_voc_boxes

    fields = _bccd_fields()
    f = fields[field_index % len(fields)]
    img = np.asarray(Image.open(f).convert("RGB"))
    levels = [img, np.asarray(Image.fromarray(img).resize((img.shape[1] // 2, img.shape[0] // 2)))]
    with tifffile.TiffWriter(path) as tw:
        for i, lvl in enumerate(levels):
            kw = {}
            if mpp is not None:
                ds = img.shape[1] / lvl.shape[1]
                kw = dict(
                    resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER"
                )
            tw.write(
                lvl,
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                subfiletype=1 if i else 0,
                metadata=None,
                software=False,
                **kw,
            )
    return len(read_voc_boxes(SAMPLE_DATA_DIR / "bccd" / "Annotations" / f"{f.stem}.xml"))


def make_small_slides(out_dir, n: int, start: int = 0) -> list:
    """``n`` small slides ``slide_0000.tiff``... in ``out_dir``; returns their paths."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = out / f"slide_{i:04d}.tiff"
        write_small_slide(p, i)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- archives and runs


def new_bucket(endpoint: str, prefix: str = "g") -> str:
    """A fresh bucket on ``endpoint`` (the session S3 server is shared by many tests)."""
    import uuid

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    make_s3_client(endpoint).create_bucket(Bucket=name)
    return name


def upload(endpoint: str, bucket: str, objects: dict) -> None:
    """Put ``{key: bytes | Path}`` into ``bucket`` (16 threads: seeding 10,000 objects is fast)."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    s3 = make_s3_client(endpoint)

    def put(item):
        key, body = item
        s3.put_object(
            Bucket=bucket, Key=key, Body=Path(body).read_bytes() if isinstance(body, Path) else body
        )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, objects.items()))


def run_job_collect(lines: list | None = None, **settings):
    """``pipeline.job.run_job`` with ``settings`` (JobConfig fields), progress lines into ``lines``.

    The model defaults to :func:`tiny_model`. The process environment is restored afterwards: the
    job copies the S3 endpoint into ``os.environ``, which would leak into the next test.
    """
    import os

    from pipeline.job import load_config, run_job

    sink = lines if lines is not None else []
    if "model" not in settings:
        settings["model"] = tiny_model(None)
    saved = dict(os.environ)
    try:
        cfg = load_config(overrides=settings)
        return run_job(cfg, say=sink.append)
    finally:
        for k in set(os.environ) - set(saved):
            del os.environ[k]
        os.environ.update(saved)


def read_table(output: str, table: str, endpoint: str | None = None):
    """A committed output table (pyarrow.Table) as queries see it."""
    from pipeline.outputs import open_outputs

    return open_outputs(output, s3_endpoint=endpoint).table(table).to_table()


def cell_ids(output: str, endpoint: str | None = None) -> list[str]:
    return read_table(output, "cells", endpoint).column("cell_id").to_pylist()


def visible_parquet_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    """Every ``*.parquet`` key under ``prefix`` that a query would read (no ``_``/``.`` component)."""
    s3 = make_s3_client(endpoint)
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :].strip("/").split("/")
            if rel[-1].endswith(".parquet") and not any(p.startswith(("_", ".")) for p in rel):
                keys.append(obj["Key"])
    return sorted(keys)


def all_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    s3 = make_s3_client(endpoint)
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def assert_outputs_consistent(output: str, endpoint: str | None = None) -> None:
    """Committed outputs agree with themselves: every cell once, every ``ok`` slide's cells all
    present and no cell without its slide's ``ok`` row (per run)."""
    from collections import Counter

    cells = read_table(output, "cells", endpoint)
    slides = read_table(output, "slides", endpoint)
    ids = cells.column("cell_id").to_pylist()
    dups = [k for k, v in Counter(ids).items() if v > 1]
    assert not dups, f"{len(dups)} cells written more than once, e.g. {dups[:3]}"
    per_slide = Counter(
        zip(cells.column("run_id").to_pylist(), cells.column("slide_id").to_pylist())
    )
    ok = {}
    for row in slides.to_pylist():
        if row["status"] == "ok":
            key = (row["run_id"], row["slide_id"])
            assert key not in ok, (
                f"slide {row['slide_uri']} recorded ok twice in run {row['run_id']}"
            )
            ok[key] = row["cell_count"]
    for key, n in per_slide.items():
        assert key in ok, f"cells of slide {key[1]} (run {key[0]}) have no ok row in slides/"
        assert ok[key] == n, f"slide {key[1]}: slides/ says {ok[key]} cells, cells/ holds {n}"
    for key, n in ok.items():
        assert per_slide.get(key, 0) == n, (
            f"slide {key[1]}: {n} cells expected, {per_slide.get(key, 0)} present"
        )


_BASELINES: dict = {}


def baseline_archive(endpoint: str, tmp_root, n_slides: int = 6):
    """A session-wide archive of ``n_slides`` small slides and the result of one unfaulted run.

    Returns a dict: ``bucket``, ``input`` (``s3://bucket/archive/``), ``keys``, ``output``,
    ``cells`` (set of cell ids), ``per_slide`` (slide_uri -> cell count), ``seconds``.
    Cached per endpoint, so every fault test compares against the same clean run.
    """
    from collections import Counter
    from pathlib import Path

    key = (endpoint, n_slides)
    if key in _BASELINES:
        return _BASELINES[key]
    bucket = new_bucket(endpoint, "base")
    paths = make_small_slides(Path(tmp_root) / "baseline-slides", n_slides)
    keys = {f"archive/{p.name}": p for p in paths}
    upload(endpoint, bucket, keys)
    out = f"s3://{bucket}/baseline-out/"
    res = run_job_collect(
        input=f"s3://{bucket}/archive/", output=out, s3_endpoint=endpoint, chunk_slides=2
    )
    assert res.exit_code == 0 and res.ok == n_slides, (res.status, res.slides)
    cells = read_table(out, "cells", endpoint)
    info = {
        "bucket": bucket,
        "input": f"s3://{bucket}/archive/",
        "keys": sorted(keys),
        "output": out,
        "cells": set(cells.column("cell_id").to_pylist()),
        "per_slide": dict(Counter(cells.column("slide_uri").to_pylist())),
        "seconds": res.seconds,
    }
    assert len(info["cells"]) >= n_slides, "the small slides should hold at least one cell each"
    _BASELINES[key] = info
    return info


def write_bomb_tiff(path, side: int = 200_000, tiled: bool = False, mpp: float = SMALL_MPP) -> None:
    """A small TIFF *declaring* ``side`` x ``side`` RGB px (a decompression bomb's header).

    ``tiled=False``: one uncompressed strip holding only 768 real bytes (decoders refuse or would
    allocate ``3·side²`` bytes). ``tiled=True``: 65,536-px deflate tiles that all point at one
    tiny compressed stream. 200,000² px = 40 Gpx = 120 GB decoded, in < 1 kB (stripped).
    """
    import struct
    import zlib

    res = round(1e4 / mpp)  # pixels per cm
    if tiled:
        tile = 65536
        n = ((side + tile - 1) // tile) ** 2
        payload = zlib.compress(b"\xff" * 4096)
        layout = [
            (259, 3, 1, 8),
            (322, 4, 1, tile),
            (323, 4, 1, tile),
            (324, 4, n, "offs"),
            (325, 4, n, "counts"),
        ]
    else:
        n = 1
        payload = b"\xff" * 768
        layout = [(259, 3, 1, 1), (273, 4, 1, "data"), (278, 4, 1, side), (279, 4, 1, len(payload))]
    entries = sorted(
        [
            (256, 4, 1, side),
            (257, 4, 1, side),
            (258, 3, 3, "bps"),
            (262, 3, 1, 2),
            (277, 3, 1, 3),
            (282, 5, 1, "xres"),
            (283, 5, 1, "yres"),
            (284, 3, 1, 1),
            (296, 3, 1, 3),
            *layout,
        ]
    )
    at = 8 + 2 + 12 * len(entries) + 4
    where = {"bps": at, "xres": at + 6, "yres": at + 14, "offs": at + 22, "counts": at + 22 + 4 * n}
    data_at = at + 22 + (8 * n if tiled else 0)
    where["data"] = data_at
    out = bytearray(b"II" + struct.pack("<HI", 42, 8) + struct.pack("<H", len(entries)))
    for tag, typ, count, value in entries:
        if isinstance(value, str):
            if value == "data":
                out += struct.pack("<HHII", tag, typ, count, data_at)
            else:
                out += struct.pack("<HHII", tag, typ, count, where[value])
        elif typ == 3:
            out += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0)
    out += struct.pack("<HHH", 8, 8, 8) + struct.pack("<IIII", res, 1, res, 1)
    if tiled:
        out += struct.pack(f"<{n}I", *([data_at] * n)) + struct.pack(
            f"<{n}I", *([len(payload)] * n)
        )
    assert len(out) == data_at
    out += payload
    with open(path, "wb") as fh:
        fh.write(out)


_MODELS: dict = {}


def tiny_model(tmp_root=None) -> str:
    """A real (randomly initialised, ``tiny`` preset) HemBLIP safetensors checkpoint directory:
    captions are meaningless but every code path of the caption stage runs, fast on CPU."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    if "tiny" not in _MODELS:
        from hemblip.model import build_model, save_model

        if tmp_root is None:
            tmp_root = tempfile.mkdtemp(prefix="fault-suite-model-")
            atexit.register(shutil.rmtree, tmp_root, True)
        m = build_model("tiny")
        out = Path(tmp_root) / "tiny-model"
        save_model(m.model, m.image_processor, m.tokenizer, out)
        _MODELS["tiny"] = str(out)
    return _MODELS["tiny"]


# --------------------------------------------------------------------------- load


class RssSampler:
    """Samples RSS (bytes) every ``period`` s: this process (the driver) and every Ray worker
    process descending from it (titles ``ray::...``, Ray's own agents excluded)."""

    _AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")

    def __init__(self, period: float = 0.25):
        import threading

        self.period = period
        self.driver_peak = 0
        self.worker_peak = 0  # largest single worker
        self.workers_total_peak = 0  # largest sum over workers at one instant
        self.worker_pids: set[int] = set()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import os

        import psutil

        me = psutil.Process(os.getpid())
        while not self._halt.is_set():
            try:
                self.driver_peak = max(self.driver_peak, me.memory_info().rss)
                total = 0
                for p in me.children(recursive=True):
                    try:
                        title = " ".join(p.cmdline()).strip()
                        if not title.startswith("ray::") or title.startswith(self._AGENTS):
                            continue
                        rss = p.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        continue
                    self.worker_pids.add(p.pid)
                    total += rss
                    self.worker_peak = max(self.worker_peak, rss)
                self.workers_total_peak = max(self.workers_total_peak, total)
            except psutil.Error:
                pass
            self._halt.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._halt.set()
        self._thread.join(5)


def load_run(endpoint: str, n_slides: int, workdir, chunk_slides: int = 16) -> dict:
    """Process an archive of ``n_slides`` small slides (each a real BCCD field) on ``endpoint``
    in one run of the job on the current Ray cluster, sampling memory. Returns the figures:
    ``result``, ``output``, ``seconds``, ``cells``, ``slides_per_hour``, ``cells_per_s``,
    ``driver_peak_mib``, ``worker_peak_mib``, ``workers_total_peak_mib``, ``workers_seen``."""
    import time
    from pathlib import Path

    workdir = Path(workdir)
    bucket = new_bucket(endpoint, "load")
    paths = make_small_slides(workdir / "slides", n_slides)
    upload(endpoint, bucket, {f"archive/{p.name}": p for p in paths})
    out = f"s3://{bucket}/out/"
    lines: list[str] = []
    tiny_model(workdir)
    t0 = time.perf_counter()
    with RssSampler() as rss:
        res = run_job_collect(
            lines,
            input=f"s3://{bucket}/archive/",
            output=out,
            s3_endpoint=endpoint,
            chunk_slides=chunk_slides,
        )
    seconds = time.perf_counter() - t0
    mib = 1024 * 1024
    return {
        "result": res,
        "output": out,
        "bucket": bucket,
        "seconds": seconds,
        "cells": res.cells_written,
        "slides_per_hour": res.ok / seconds * 3600,
        "cells_per_s": res.cells_written / seconds,
        "driver_peak_mib": rss.driver_peak / mib,
        "worker_peak_mib": rss.worker_peak / mib,
        "workers_total_peak_mib": rss.workers_total_peak / mib,
        "workers_seen": len(rss.worker_pids),
    }
