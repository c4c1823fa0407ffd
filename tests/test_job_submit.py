"""``ray job submit`` end to end: a local head started with ``ray start --head`` (token auth, its
own ports and temp dir, so it never meets the session ``ray_cluster``), the job entrypoint
``python -m pipeline run`` against the session's moto S3 server, the Parquet checked, the head
stopped.

The head is stopped by the ids of its own processes rather than ``ray stop``, which would stop
every Ray process of the user on the machine (other test sessions included).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from job_helpers import job_config, new_bucket, put, read_table

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head_processes(temp_dir: str) -> list[psutil.Process]:
    """Every process of the head started with ``--temp-dir temp_dir``, and their descendants."""
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.NoSuchProcess:
            continue
    return list(procs.values())


def _stop_head(temp_dir: str) -> None:
    procs = _head_processes(temp_dir)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def ray_head(s3_server):
    temp_dir = tempfile.mkdtemp(
        prefix="rjs", dir="/tmp"
    )  # short: Ray's socket paths are length-limited
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HEMBLIP_CACHE=os.path.join(temp_dir, "model-cache"),
    )
    for key in (
        "RAY_ADDRESS",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):  # the job gets --s3-endpoint
        env.pop(key, None)
    dash = _free_port()
    # Every port of the head is chosen free: the defaults (e.g. the dashboard agent's 52365) are
    # taken when the session's in-process Ray cluster or another one already runs here.
    ports = {
        flag: str(_free_port())
        for flag in (
            "--port",
            "--ray-client-server-port",
            "--node-manager-port",
            "--object-manager-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
        )
    }
    cmd = [
        RAY,
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--num-cpus",
        "2",
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
        "--include-dashboard",
        "true",
    ]
    for flag, port in ports.items():
        cmd += [flag, port]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_job(s3_server, ray_head, tmp_path_factory):
    from hemblip.inference import DEMO_CHECKPOINT
    from pipeline.samples import build_sample_slides

    address, env = ray_head
    bucket = new_bucket(s3_server)
    samples = build_sample_slides(tmp_path_factory.mktemp("submit-samples"))[:2]
    for s in samples:
        put(s3_server, bucket, "slides/" + s.path.name, s.path)
    # The model comes from S3 too, as on a cluster (downloaded once per node into HEMBLIP_CACHE).
    model_dir = Path(os.environ.get("JOB_TEST_MODEL") or DEMO_CHECKPOINT)
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        put(s3_server, bucket, "models/demo/" + f.relative_to(model_dir).as_posix(), f)
    excludes = [
        ".venv",
        ".git",
        "demo_output",
        "*.egg-info",
        "tests",
        "bench",
        "docs",
        "cluster",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
    ]
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        f"hemblip-test-{bucket}",
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": excludes}),
        "--",
        sys.executable,
        "-m",
        "pipeline",
        "run",
        "--input",
        f"s3://{bucket}/slides/",
        "--output",
        f"s3://{bucket}/out/",
        "--s3-endpoint",
        s3_server,
        "--model",
        f"s3://{bucket}/models/demo/",
        "--caption-batch-size",
        "8",
        "--thumbnail-px",
        "48",
    ]
    for _ in range(12):
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=420)
        log = done.stdout[-4000:] + done.stderr[-4000:]
        # `ray start` returns before the head's job agent registers (slow on a loaded machine);
        # that refusal happens before the job exists, so submitting again is safe.
        if "No available agent to submit job" not in log:
            break
        time.sleep(5)
    assert done.returncode == 0, log
    assert "succeeded" in log and "2 ok, 0 failed" in log, log
    cfg = job_config(s3_server, bucket)
    cells = read_table(cfg, "cells")
    runs = read_table(cfg, "runs")
    assert cells is not None and cells.num_rows > 0
    assert set(cells.column("slide_uri").to_pylist()) == {
        f"s3://{bucket}/slides/{s.path.name}" for s in samples
    }
    assert runs.column("status").to_pylist() == ["ok"] and runs.column("slides_ok").to_pylist() == [
        2
    ]
    assert runs.column("model_id").to_pylist() == [f"s3://{bucket}/models/demo/"]
