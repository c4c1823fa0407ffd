"""Ray process faults during a run: a caption actor's process and a detect task's worker are
SIGKILLed mid-run. Ray restarts/retries them; the run completes with every cell exactly once
(the same cell ids as a clean run of the same archive).

Only processes of this session's own Ray cluster (descendants of the test process) are killed.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
from fault_fixtures import (
    assert_outputs_consistent,
    baseline_archive,
    cell_ids,
    read_table,
    run_job_collect,
)

pytestmark = pytest.mark.integration

DETECT_TITLE = "ray::MapBatches(detect_batch)"  # a worker executing a detect task
ACTOR_BUSY_TITLE = "ray::MapWorker(MapBatches(CaptionStage)).submit"  # an actor captioning a batch


class Killer(threading.Thread):
    """SIGKILLs the process (a descendant of this one) that is the ``nth`` to take ``title``."""

    def __init__(self, title: str, nth: int = 1):
        super().__init__(daemon=True)
        self.title, self.nth = title, nth
        self.seen: list[int] = []
        self.killed: list[tuple[int, float]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        me = psutil.Process(os.getpid())
        last: dict[int, str] = {}  # pid -> title at the previous poll: a worker runs many tasks
        while not self._halt.is_set() and not self.killed:
            for p in me.children(recursive=True):
                try:
                    title = " ".join(p.cmdline()).strip()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                entered = title == self.title and last.get(p.pid) != title
                last[p.pid] = title
                if entered:
                    self.seen.append(p.pid)
                    if len(self.seen) == self.nth:
                        os.kill(p.pid, signal.SIGKILL)
                        self.killed.append((p.pid, time.monotonic() - self._t0))
                        return
            time.sleep(0.02)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


@pytest.fixture(scope="module")
def base(s3_server, ray_cluster, tmp_path_factory):
    return baseline_archive(s3_server, tmp_path_factory.mktemp("base"))


def _run_with_killer(base, s3_server, out_name: str, killer: Killer):
    out = f"s3://{base['bucket']}/{out_name}/"
    lines: list[str] = []
    killer.start()
    try:
        res = run_job_collect(
            lines, input=base["input"], output=out, s3_endpoint=s3_server, chunk_slides=2
        )
    finally:
        killer.stop()
    return out, res, lines


def _assert_exactly_once(base, s3_server, out: str, res) -> None:
    assert res.exit_code == 0, [s["reason"] for s in res.slides if s["status"] != "ok"]
    assert res.ok == len(base["keys"]) and res.failed == 0
    ids = cell_ids(out, s3_server)
    assert len(ids) == len(set(ids)), "a cell was written twice"
    assert set(ids) == base["cells"], "cells lost or invented"
    slides = read_table(out, "slides", s3_server).to_pylist()
    assert sorted(s["slide_uri"] for s in slides) == sorted(
        f"s3://{base['bucket']}/{k}" for k in base["keys"]
    )
    assert_outputs_consistent(out, s3_server)


def test_caption_actor_killed_mid_run(base, s3_server, ray_cluster):
    killer = Killer(ACTOR_BUSY_TITLE, nth=1)
    out, res, _ = _run_with_killer(base, s3_server, "out-kill-actor", killer)
    assert killer.killed, f"no busy caption actor was seen to kill (seen {killer.seen})"
    print(
        f"\ncaption actor pid {killer.killed[0][0]} SIGKILLed {killer.killed[0][1]:.1f} s into the run"
    )
    _assert_exactly_once(base, s3_server, out, res)


def test_detect_task_worker_killed_mid_slide(base, s3_server, ray_cluster):
    killer = Killer(DETECT_TITLE, nth=2)  # the 2nd detect task: after the run is under way
    out, res, _ = _run_with_killer(base, s3_server, "out-kill-task", killer)
    assert killer.killed, f"no detect task was seen to kill (seen {killer.seen})"
    print(
        f"\ndetect worker pid {killer.killed[0][0]} SIGKILLed {killer.killed[0][1]:.1f} s into the run"
    )
    _assert_exactly_once(base, s3_server, out, res)
