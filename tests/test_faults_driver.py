"""The driver SIGKILLed mid-run, then the same run started again.

The driver is a real ``python -m pipeline run`` subprocess attached to the session's Ray cluster
(as a driver submitted to a long-lived cluster would be). It is killed right after its first
chunk is committed, while the next chunk is in flight. Expect: what is visible is whole committed
chunks only; the restarted run redoes the interrupted chunk, and in the end every cell of the
clean run is present exactly once, with no staging or journal left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from fault_fixtures import (
    all_keys,
    assert_outputs_consistent,
    baseline_archive,
    cell_ids,
    read_table,
    run_job_collect,
    tiny_model,
    visible_parquet_keys,
)

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base(s3_server, ray_cluster, tmp_path_factory):
    return baseline_archive(s3_server, tmp_path_factory.mktemp("base"))


def _driver(base, s3_server, out: str, ray_address: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        "--input",
        base["input"],
        "--output",
        out,
        "--s3-endpoint",
        s3_server,
        "--model",
        tiny_model(),
        "--chunk-slides",
        "2",
        "--ray-address",
        ray_address,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _kill_after(proc: subprocess.Popen, marker: str, timeout: float) -> tuple[list[str], bool]:
    """Read the driver's output; SIGKILL it on the first line starting with ``marker``."""
    lines: list[str] = []
    killed = threading.Event()

    def guard() -> None:  # never hang the suite on a stuck driver
        if not killed.wait(timeout) and proc.poll() is None:
            proc.kill()

    threading.Thread(target=guard, daemon=True).start()
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(marker):
            os.kill(proc.pid, signal.SIGKILL)
            killed.set()
            break
    proc.wait(30)
    proc.stdout.close()
    return lines, killed.is_set()


def test_driver_sigkill_then_rerun_is_exactly_once(base, s3_server, ray_cluster):
    b = base["bucket"]
    out = f"s3://{b}/out-driver-kill/"
    address = ray_cluster.get_runtime_context().gcs_address
    t0 = time.monotonic()
    proc = _driver(base, s3_server, out, address)
    lines, killed = _kill_after(proc, "committed chunk", timeout=240)
    assert killed, "driver finished or hung before its first commit:\n" + "\n".join(lines[-20:])
    assert proc.returncode == -signal.SIGKILL
    print(f"\ndriver SIGKILLed {time.monotonic() - t0:.1f} s after start, after its first commit")

    # What queries see after the crash: whole committed chunks only, readable, consistent.
    visible = visible_parquet_keys(s3_server, b, "out-driver-kill/")
    cells_files = [k for k in visible if "/cells/" in k]
    slides_files = [k for k in visible if "/slides/" in k]
    assert len(slides_files) == 1 and len(cells_files) <= 1, visible
    assert not [k for k in visible if "/runs/" in k]  # the run never finished
    assert_outputs_consistent(out, s3_server)
    committed = read_table(out, "slides", s3_server).to_pylist()
    assert len(committed) == 2 and all(r["status"] == "ok" for r in committed)
    partial = len(cell_ids(out, s3_server))
    assert 0 < partial < len(base["cells"])

    # The same run again: resumes after the committed chunk, redoes the interrupted one.
    res = run_job_collect(input=base["input"], output=out, s3_endpoint=s3_server, chunk_slides=2)
    assert res.exit_code == 0 and res.failed == 0
    assert res.skipped == 2 and res.ok == len(base["keys"]) - 2
    ids = cell_ids(out, s3_server)
    assert len(ids) == len(set(ids)), "a cell was written twice"
    assert set(ids) == base["cells"], "cells lost or invented"
    assert_outputs_consistent(out, s3_server)
    # The done index (_index/) stays on purpose; staging and journals must not.
    leftovers = [
        k
        for k in all_keys(s3_server, b, "out-driver-kill/")
        if any(p.startswith(("_", ".")) for p in k[len("out-driver-kill/") :].split("/"))
        and not k[len("out-driver-kill/") :].startswith("_index/")
    ]
    assert leftovers == [], f"staging/journal objects left behind: {leftovers}"
    # The killed run left no runs/ row; the restart wrote exactly one.
    assert len(read_table(out, "runs", s3_server)) == 1
