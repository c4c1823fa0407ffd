"""Issue 11 item 3: two writers on one OUTPUT. The run lease (``OUTPUT/_lease``), fencing of every
commit point, and recovery that completes or undoes every journal instead of blocking on it.

Unit tier: the lease and the writer on local storage with a fake clock (no Ray, no network, no
sleep). Integration tier: the conditional writes on the real moto S3 server, and real runs of
``python -m pipeline run`` on the session's Ray cluster.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from job_helpers import InjectedFault, chunk_rows, injected_fault, visible_cell_ids

from pipeline.errors import PipelineError, StorageError
from pipeline.job import writer as writer_mod
from pipeline.job._storage_local import LocalStorage
from pipeline.job.identity import chunk_name
from pipeline.job.lease import LEASE_NAME, LeaseHeldError, LeaseLostError, RunLease, parse_lease
from pipeline.job.storage import storage_for
from pipeline.job.writer import OutputWriter

REPO = Path(__file__).resolve().parents[1]
DAY = "2026-01-02"
unit = pytest.mark.unit
integration = pytest.mark.integration


# --------------------------------------------------------------------------- helpers
class Clock:
    """Wall clock and monotonic clock that move only when told."""

    def __init__(self):
        self.t = datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
        self.m = 1000.0

    def now(self) -> datetime:
        return self.t

    def mono(self) -> float:
        return self.m

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)
        self.m += seconds


class HookStorage(LocalStorage):
    """Real local storage with hooks that let a test act at an exact step of another run."""

    def __init__(self):
        self.before_replace = None  # called once, before the next replace_if
        self.after_write = None  # (substring, fn): fn() once after writing a matching uri
        self.fail_replace = False

    def replace_if(self, uri, data, token):
        hook, self.before_replace = self.before_replace, None
        if hook:
            hook()
        if self.fail_replace:
            raise StorageError(f"{uri}: cannot write (injected 503)")
        return super().replace_if(uri, data, token)

    def write_bytes(self, uri, data):
        super().write_bytes(uri, data)
        if self.after_write and self.after_write[0] in uri:
            fn, self.after_write = self.after_write[1], None
            fn()


def _lease(st, out, run_id, clock, lines=None, ttl_s=60.0):
    return RunLease(
        st,
        str(out),
        run_id,
        ttl_s=ttl_s,
        clock=clock.now,
        monotonic=clock.mono,
        say=(lines if lines is not None else []).append,
    )


_rows, _visible_cells = chunk_rows, visible_cell_ids


def _private(out: Path) -> list[str]:
    """Files left under OUTPUT's private (``_``) folders, the lease included."""
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and p.relative_to(out).parts[0].startswith("_")
    )


ALL_CELLS = ["s1-0", "s1-1", "s2-0", "s2-1", "s3-0", "s3-1"]


def _half_published(out: Path, point: str = "mid_publish") -> tuple[OutputWriter, str, Path]:
    """Chunk 1 (s1) committed; chunk 2 (s2, s3) crashed at ``point``. Returns the writer, chunk 2's
    name and its journal."""
    w = OutputWriter(storage_for(str(out)), str(out), "r1", DAY, "v1")
    with injected_fault(1, point):
        w.commit_chunk(*_rows(["s1"]))
        with pytest.raises(InjectedFault):
            w.commit_chunk(*_rows(["s2", "s3"]))
    name = chunk_name(["s2", "s3"], "v1")
    journal = out / "_journal" / f"{name}.json"
    assert journal.is_file()
    return w, name, journal


def _finish_again(out: Path, run_id: str = "r2") -> OutputWriter:
    """A later run: recover, then commit what is not done yet."""
    w = OutputWriter(storage_for(str(out)), str(out), run_id, DAY, "v1")
    w.recover()
    todo = [s for s in ("s2", "s3") if s not in w.done_slides("v1")]
    if todo:
        w.commit_chunk(*_rows(todo))
    return w


# --------------------------------------------------------------------------- lease (unit)
@unit
def test_second_run_refuses_with_one_line_naming_the_first(tmp_path):
    clock, out = Clock(), tmp_path / "out"
    a = _lease(LocalStorage(), out, "run-a", clock)
    rec = a.acquire()
    with pytest.raises(LeaseHeldError) as err:
        _lease(LocalStorage(), out, "run-b", clock).acquire()
    msg = str(err.value)
    assert isinstance(err.value, PipelineError) and "\n" not in msg
    for part in (
        "run run-a",
        f"host {rec.host}",
        f"pid {os.getpid()}",
        f"since {rec.started_at}",
        f"expires {rec.expires_at}",
        str(out),
    ):
        assert part in msg, (part, msg)
    # Still A's: renewing works, and A's release deletes it.
    a.check("a commit")
    assert a.release() is True and not (out / LEASE_NAME).exists()


@unit
def test_live_lease_is_not_taken_over_before_its_ttl(tmp_path):
    clock, out = Clock(), tmp_path / "out"
    _lease(LocalStorage(), out, "run-a", clock).acquire()
    clock.advance(59)
    with pytest.raises(LeaseHeldError, match="run run-a"):
        _lease(LocalStorage(), out, "run-b", clock).acquire()


@unit
def test_stale_lease_is_taken_over_and_the_old_holder_is_fenced(tmp_path):
    clock, out, lines = Clock(), tmp_path / "out", []
    a = _lease(LocalStorage(), out, "run-a", clock)
    a.acquire()
    clock.advance(61)  # A stopped renewing for longer than its ttl
    b = _lease(LocalStorage(), out, "run-b", clock, lines)
    b.acquire()
    assert any("took over the output lease of run run-a" in ln for ln in lines), lines
    with pytest.raises(LeaseLostError, match="now held by run run-b") as err:
        a.check("the journal of chunk X")
    assert "stopped before the journal of chunk X" in str(err.value) and "\n" not in str(err.value)
    assert a.release() is False  # never deletes the lease it lost
    assert json.loads((out / LEASE_NAME).read_bytes())["run_id"] == "run-b"
    assert b.release() is True


@unit
def test_two_takers_of_a_stale_lease_cannot_both_win(tmp_path):
    clock, out = Clock(), tmp_path / "out"
    _lease(LocalStorage(), out, "run-a", clock).acquire()
    clock.advance(61)
    st_c = HookStorage()
    b = _lease(LocalStorage(), out, "run-b", clock)
    c = _lease(st_c, out, "run-c", clock)
    # C has read the stale lease and is about to replace it when B takes it over first.
    st_c.before_replace = b.acquire
    with pytest.raises(LeaseHeldError, match="run run-b"):
        c.acquire()
    assert b.held and not c.held
    assert json.loads((out / LEASE_NAME).read_bytes())["run_id"] == "run-b"


@unit
@pytest.mark.skipif(not os.path.exists("/proc/self/ns/pid"), reason="needs Linux /proc")
def test_lease_of_a_process_gone_from_this_host_is_taken_over_at_once(tmp_path):
    clock, out, lines = Clock(), tmp_path / "out", []
    st = LocalStorage()
    dead = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    template = _lease(st, out, "run-killed", clock)._new_record()
    st.write_bytes(str(out / LEASE_NAME), replace(template, pid=dead, pid_start="1").encode())
    b = _lease(st, out, "run-b", clock, lines)
    b.acquire()  # no ttl to wait for: that process cannot be running
    assert any(f"its process {dead} on this host is gone" in ln for ln in lines), lines
    b.release()
    # A live process on this host (the one that started pytest) keeps its lease.
    ppid = os.getppid()
    from pipeline.job.lease import _pid_start

    st.write_bytes(
        str(out / LEASE_NAME), replace(template, pid=ppid, pid_start=_pid_start(ppid)).encode()
    )
    with pytest.raises(LeaseHeldError, match=f"pid {ppid}"):
        _lease(st, out, "run-c", clock).acquire()


def _record(clock, **over):
    base = {
        "version": 1,
        "run_id": "run-x",
        "lease_id": "0" * 32,
        "host": "h",
        "pid": 4242,
        "started_at": clock.t.isoformat(),
        "renewed_at": clock.t.isoformat(),
        "expires_at": (clock.t + timedelta(seconds=60)).isoformat(),
        "ttl_s": 60,
        "boot_id": None,
        "pid_ns": None,
        "pid_start": None,
    }
    base.update(over)
    return json.dumps(base).encode()


@unit
@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe not json",
        b"[]",
        b'{"version": 1}',
        "far-future renewal",
        "ttl of a year",
        "expiry beyond renewal + ttl",
        "pid not an int",
        "oversized",
    ],
)
def test_unreadable_or_hostile_lease_is_stale_not_a_permanent_block(tmp_path, content):
    clock, out, lines = Clock(), tmp_path / "out", []
    t = clock.t
    data = {
        "far-future renewal": lambda: _record(
            clock, renewed_at="9999-01-01T00:00:00+00:00", expires_at="9999-01-01T00:01:00+00:00"
        ),
        "ttl of a year": lambda: _record(
            clock, ttl_s=365 * 86400, expires_at=(t + timedelta(days=365)).isoformat()
        ),
        "expiry beyond renewal + ttl": lambda: _record(
            clock, expires_at=(t + timedelta(days=30)).isoformat()
        ),
        "pid not an int": lambda: _record(clock, pid="4242; rm -rf /"),
        "oversized": lambda: _record(clock, host="h" * 100_000),
    }.get(content, lambda: content)()
    st = LocalStorage()
    st.write_bytes(str(out / LEASE_NAME), data)
    assert parse_lease(data, clock.now()) is None
    b = _lease(st, out, "run-b", clock, lines)
    b.acquire()
    assert any("took over the output lease of an unreadable lease" in ln for ln in lines), lines


@unit
def test_hostile_strings_of_a_live_lease_stay_on_one_line(tmp_path):
    clock, out = Clock(), tmp_path / "out"
    st = LocalStorage()
    st.write_bytes(
        str(out / LEASE_NAME),
        _record(clock, run_id="evil\nerror: forged\x1b[2J", host="h\r\nx" * 50),
    )
    with pytest.raises(LeaseHeldError) as err:
        _lease(st, out, "run-b", clock).acquire()
    msg = str(err.value)
    assert (
        "\n" not in msg
        and "\r" not in msg
        and "\x1b" not in msg
        and "run evil?error: forged?[2J" in msg
    )
    assert len(msg) < 600


@unit
def test_renewal_survives_a_transient_storage_error_only_while_the_lease_protects(tmp_path):
    clock, out, lines = Clock(), tmp_path / "out", []
    st = HookStorage()
    a = _lease(st, out, "run-a", clock, lines)
    a.acquire()
    st.fail_replace = True
    a.check("chunk 1")  # 60 s of protection left: nobody can take over yet
    assert any("could not renew the output lease" in ln for ln in lines)
    clock.advance(45)  # 15 s left, less than a third of the ttl: stop rather than risk overlap
    with pytest.raises(LeaseLostError, match="could not renew the output lease in time"):
        a.check("chunk 2")


@unit
def test_store_that_ignores_conditional_writes_is_refused(tmp_path):
    class Ignoring(LocalStorage):
        def create_exclusive(self, uri, data):
            self.write_bytes(uri, data)
            return self._token(data)

    out = tmp_path / "out"
    with pytest.raises(StorageError, match=r"ignores conditional writes \(If-None-Match\)"):
        _lease(Ignoring(), out, "run-a", Clock()).acquire()
    assert not (out / LEASE_NAME).exists()


@unit
def test_unwritable_output_names_output_when_taking_the_lease(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="output location is not writable") as err:
        _lease(LocalStorage(), blocker / "out", "run-a", Clock()).acquire()
    assert str(err.value).startswith(f"{blocker / 'out'}: ") and "\n" not in str(err.value)


# --------------------------------------------------------------------------- fencing (unit)
@unit
def test_writer_that_lost_its_lease_publishes_nothing(tmp_path):
    clock, out = Clock(), tmp_path / "out"
    st = LocalStorage()
    a = _lease(st, out, "r1", clock)
    a.acquire()
    w = OutputWriter(st, str(out), "r1", DAY, "v1", lease=a)
    w.commit_chunk(*_rows(["s1"]))
    clock.advance(61)
    b = _lease(LocalStorage(), out, "r2", clock)
    b.acquire()
    with pytest.raises(LeaseLostError, match="stopped before the commit point"):
        w.commit_chunk(*_rows(["s2", "s3"]))
    with pytest.raises(LeaseLostError):
        w.write_run({"run_id": "r1"})
    assert _visible_cells(out) == ["s1-0", "s1-1"]
    assert not list((out / "_journal").glob("*")) and not list((out / "runs").rglob("*.parquet"))


@unit
def test_takeover_between_commit_point_and_publish_withdraws_the_commit(tmp_path):
    clock, out = Clock(), tmp_path / "out"
    st = HookStorage()
    a = _lease(st, out, "r1", clock)
    a.acquire()
    w = OutputWriter(st, str(out), "r1", DAY, "v1", lease=a)
    b = _lease(LocalStorage(), out, "r2", clock)

    def stall_then_takeover():  # A's journal write took longer than the ttl; B took over
        clock.advance(61)
        b.acquire()

    st.after_write = ("_journal", stall_then_takeover)
    with pytest.raises(LeaseLostError, match="stopped before publishing chunk"):
        w.commit_chunk(*_rows(["s1", "s2"]))
    assert _visible_cells(out) == [] and not list((out / "_journal").glob("*"))
    # B recovers (A's staged files are of a run without the lease) and does the slides once.
    wb = OutputWriter(LocalStorage(), str(out), "r2", DAY, "v1", lease=b)
    assert wb.recover().orphans_deleted == 2
    wb.commit_chunk(*_rows(["s1", "s2"]))
    b.release()
    assert _visible_cells(out) == ["s1-0", "s1-1", "s2-0", "s2-1"] and _private(out) == []


# --------------------------------------------------------------------------- recovery (unit)
@unit
@pytest.mark.parametrize(
    ("point", "gone"),
    [
        ("mid_publish", "slides.parquet"),
        ("after_journal", "cells.parquet"),
        ("after_journal", "slides.parquet"),
    ],
)
def test_journal_whose_staged_file_is_gone_is_rolled_back(tmp_path, point, gone):
    out = tmp_path / "out"
    _, name, journal = _half_published(out, point)
    # Another run deleted the staged file (the defect): the journal cannot be completed.
    (next((out / "_staging").rglob(gone))).unlink()
    w = OutputWriter(storage_for(str(out)), str(out), "r2", DAY, "v1")
    rec = w.recover()
    assert rec.rolled_back == [name] and rec.rolled_forward == []
    assert any(f"rolled back chunk {name}" in n for n in rec.notes), rec.notes
    assert _visible_cells(out) == ["s1-0", "s1-1"] and w.done_slides("v1") == {"s1"}
    assert _private(out) == []
    _finish_again(out)
    assert _visible_cells(out) == ALL_CELLS


@unit
@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe\x00binary",
        b"[]",
        b'{"chunk": "x"}',
        b'{"moves": "xy"}',
        b'{"moves": [[1, 2]]}',
        b"[" * 100_000,  # nesting deep enough to exhaust the parser's recursion
    ],
)
def test_corrupt_journal_is_rolled_back_not_a_permanent_block(tmp_path, content):
    out = tmp_path / "out"
    _, name, journal = _half_published(out)  # chunk 2's cells are already visible
    journal.write_bytes(content)
    w = OutputWriter(storage_for(str(out)), str(out), "r2", DAY, "v1")
    rec = w.recover()
    assert rec.rolled_back == [name]
    assert any(f"rolling back chunk {name}" in n and "corrupt" in n for n in rec.notes), rec.notes
    # The half-published cells part (its slides part never appeared) is gone, and so is the rest.
    assert _visible_cells(out) == ["s1-0", "s1-1"] and _private(out) == []
    assert w.recover().rolled_back == []  # idempotent
    _finish_again(out)
    assert _visible_cells(out) == ALL_CELLS


@unit
@pytest.mark.parametrize(
    "attack",
    [
        "src-dotdot",
        "src-absolute-outside",
        "src-other-bucket",
        "dst-dotdot",
        "dst-absolute-outside",
        "dst-runs-table",
        "src-other-chunk",
        "dst-bad-date",
    ],
)
def test_hostile_journal_paths_are_never_followed(tmp_path, attack):
    out = tmp_path / "out"
    _, name, journal = _half_published(out)
    victim = tmp_path / "victim.parquet"
    victim.write_bytes(b"precious")
    staged = str(next((out / "_staging").rglob("slides.parquet")))
    other_chunk = chunk_name(["s1"], "v1")
    dst = str(out / "slides" / f"run_date={DAY}" / f"part-{name}.parquet")
    moves = {
        "src-dotdot": [
            [
                str(out / "_staging" / "r1" / name / ".." / ".." / ".." / ".." / "victim.parquet"),
                dst,
            ]
        ],
        "src-absolute-outside": [[str(victim), dst]],
        "src-other-bucket": [["s3://other-bucket/secret.parquet", dst]],
        "dst-dotdot": [[staged, str(out / "slides" / ".." / ".." / "escaped.parquet")]],
        "dst-absolute-outside": [[staged, str(tmp_path / "escaped.parquet")]],
        "dst-runs-table": [
            [staged, str(out / "runs" / f"run_date={DAY}" / f"part-{name}.parquet")]
        ],
        "src-other-chunk": [
            [
                str(out / "_staging" / "r1" / other_chunk / "slides.parquet"),
                str(out / "slides" / f"run_date={DAY}" / f"part-{other_chunk}.parquet"),
            ]
        ],
        "dst-bad-date": [[staged, str(out / "slides" / "run_date=../.." / f"part-{name}.parquet")]],
    }[attack]
    if attack == "src-dotdot":
        assert os.path.exists(moves[0][0]) and os.path.samefile(moves[0][0], victim)
    journal.write_text(json.dumps({"chunk": name, "run_id": "r1", "moves": moves}))
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents)
    w = OutputWriter(storage_for(str(out)), str(out), "r2", DAY, "v1")
    rec = w.recover()
    assert rec.rolled_back == [name] and rec.rolled_forward == []
    assert victim.read_bytes() == b"precious"
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents) == before
    assert not (out / "runs").exists()
    assert _visible_cells(out) == ["s1-0", "s1-1"] and w.done_slides("v1") == {"s1"}
    _finish_again(out)
    assert _visible_cells(out) == ALL_CELLS


@unit
def test_corrupt_journal_keeps_the_complete_chunk_of_another_date(tmp_path):
    out = tmp_path / "out"
    st = storage_for(str(out))
    OutputWriter(st, str(out), "r0", "2026-01-01", "v1").commit_chunk(*_rows(["s1", "s2"]))
    w = OutputWriter(st, str(out), "r1", DAY, "v1")
    # --reprocess of the same chunk on a later day, half published
    with injected_fault(0, "mid_publish"), pytest.raises(InjectedFault):
        w.commit_chunk(*_rows(["s1", "s2"]))
    assert len(_visible_cells(out)) == 8
    name = chunk_name(["s1", "s2"], "v1")
    (out / "_journal" / f"{name}.json").write_bytes(b"garbage")
    rec = OutputWriter(st, str(out), "r2", DAY, "v1").recover()
    assert rec.rolled_back == [name]
    assert not (out / "cells" / f"run_date={DAY}").exists() or not any(
        (out / "cells" / f"run_date={DAY}").iterdir()
    )
    assert (out / "cells" / "run_date=2026-01-01" / f"part-{name}.parquet").is_file()
    assert _visible_cells(out) == ["s1-0", "s1-1", "s2-0", "s2-1"]


@unit
def test_stray_files_in_the_journal_folder_do_not_block_recovery(tmp_path):
    out = tmp_path / "out"
    st = storage_for(str(out))
    st.write_bytes(str(out / "_journal" / "x.json"), b"{not json")
    st.write_bytes(str(out / "_journal" / ".tmp-abc"), b"partial journal write")
    st.write_bytes(str(out / "_journal" / "sub" / f"{'a' * 24}.json"), b"{}")
    rec = OutputWriter(st, str(out), "r1", DAY, "v1").recover()
    assert len(rec.notes) == 3 and all("not a commit journal" in n for n in rec.notes)
    assert _private(out) == []


@unit
def test_oversized_journal_is_not_read(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _, name, journal = _half_published(out)
    monkeypatch.setattr(writer_mod, "MAX_JOURNAL_BYTES", 64)
    rec = OutputWriter(storage_for(str(out)), str(out), "r2", DAY, "v1").recover()
    assert rec.rolled_back == [name] and any("larger than 64 bytes" in n for n in rec.notes)
    _finish_again(out)
    assert _visible_cells(out) == ALL_CELLS


@unit
def test_completable_journal_is_still_rolled_forward(tmp_path):
    out = tmp_path / "out"
    _, name, journal = _half_published(out)
    rec = OutputWriter(storage_for(str(out)), str(out), "r2", DAY, "v1").recover()
    assert rec.rolled_forward == [name] and rec.rolled_back == []
    assert _visible_cells(out) == ALL_CELLS and _private(out) == []


# --------------------------------------------------------------------------- S3 (integration)
def _s3(endpoint):
    from pipeline.job._storage_s3 import S3Storage
    from pipeline.job.storage import S3Settings

    return S3Storage(S3Settings(endpoint=endpoint, max_attempts=2))


@integration
def test_s3_conditional_writes_on_the_moto_server(s3_server):
    from fault_fixtures import new_bucket

    st = _s3(s3_server)
    b = new_bucket(s3_server, "lease")
    uri = f"s3://{b}/out/_lease"
    assert st.read_versioned(uri, 100) is None
    t1 = st.create_exclusive(uri, b"one")
    assert t1 and st.create_exclusive(uri, b"two") is None
    assert st.read_versioned(uri, 100) == (b"one", t1)
    assert st.read_versioned(uri, 1) == (b"on", t1)  # bounded read, same version
    assert st.replace_if(uri, b"three", "0" * 32) is None
    t3 = st.replace_if(uri, b"three", t1)
    assert t3 and t3 != t1 and st.replace_if(uri, b"four", t1) is None
    assert st.delete_if(uri, t1) is False and st.read_versioned(uri, 100)[0] == b"three"
    assert st.delete_if(uri, t3) is True and st.read_versioned(uri, 100) is None
    assert st.replace_if(uri, b"x", t3) is None and st.delete_if(uri, t3) is False
    st.write_bytes(f"s3://{b}/out/empty", b"")
    assert st.read_versioned(f"s3://{b}/out/empty", 10)[0] == b""
    with pytest.raises(StorageError, match="no-such-bucket-lease"):
        st.read_versioned("s3://no-such-bucket-lease/out/_lease", 10)
    with pytest.raises(StorageError, match="no-such-bucket-lease"):
        st.create_exclusive("s3://no-such-bucket-lease/out/_lease", b"x")


@integration
def test_s3_lease_refuse_takeover_race_and_release(s3_server):
    from fault_fixtures import new_bucket

    from pipeline.job._storage_s3 import S3Storage
    from pipeline.job.storage import S3Settings

    class HookS3(S3Storage):
        before_replace = None

        def replace_if(self, uri, data, token):
            hook, self.before_replace = self.before_replace, None
            if hook:
                hook()
            return super().replace_if(uri, data, token)

    clock = Clock()
    out = f"s3://{new_bucket(s3_server, 'lease')}/out/"
    a = _lease(_s3(s3_server), out, "run-a", clock)
    a.acquire()
    with pytest.raises(LeaseHeldError, match="run run-a"):
        _lease(_s3(s3_server), out, "run-b", clock).acquire()
    clock.advance(61)
    st_c = HookS3(S3Settings(endpoint=s3_server, max_attempts=2))
    b, c = _lease(_s3(s3_server), out, "run-b", clock), _lease(st_c, out, "run-c", clock)
    st_c.before_replace = b.acquire  # both saw the stale lease; B's If-Match lands first
    with pytest.raises(LeaseHeldError, match="run run-b"):
        c.acquire()
    with pytest.raises(LeaseLostError, match="now held by run run-b"):
        a.check("publishing chunk X")
    assert a.release() is False and b.release() is True
    assert _s3(s3_server).read_versioned(out + LEASE_NAME, 100) is None


@integration
def test_s3_heartbeat_renews_until_released(s3_server):
    from fault_fixtures import new_bucket

    out = f"s3://{new_bucket(s3_server, 'lease')}/out/"
    st = _s3(s3_server)
    lease = RunLease(st, out, "run-hb", ttl_s=30, renew_every_s=0.2)
    first = lease.acquire().renewed_at
    lease.start_heartbeat()
    deadline = time.monotonic() + 60
    while json.loads(st.read_versioned(out + LEASE_NAME, 4096)[0])["renewed_at"] == first:
        assert time.monotonic() < deadline, "the heartbeat never renewed the lease"
        time.sleep(0.1)
    assert lease.release() is True and st.read_versioned(out + LEASE_NAME, 100) is None


# --------------------------------------------------------------------------- real runs (integration)
@pytest.fixture(scope="module")
def base(s3_server, ray_cluster, tmp_path_factory):
    from fault_fixtures import baseline_archive

    return baseline_archive(s3_server, tmp_path_factory.mktemp("base"))


def _run_cmd(base, s3_server, out, address):
    from fault_fixtures import tiny_model

    return [
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
        address,
    ]


def _leftovers(s3_server, bucket, prefix):
    """Private objects left under OUTPUT but the done index (``_index/``, kept on purpose)."""
    from fault_fixtures import all_keys

    return [
        k
        for k in all_keys(s3_server, bucket, prefix)
        if any(p.startswith(("_", ".")) for p in k[len(prefix) :].split("/"))
        and not k[len(prefix) :].startswith("_index/")
    ]


@integration
def test_second_concurrent_run_refuses_naming_the_first_and_output_is_exactly_once(
    base, s3_server, ray_cluster
):
    from fault_fixtures import assert_outputs_consistent, cell_ids, read_table

    b, prefix = base["bucket"], "out-two-runs/"
    out = f"s3://{b}/{prefix}"
    address = ray_cluster.get_runtime_context().gcs_address
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    cmd = _run_cmd(base, s3_server, out, address)
    first = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    guard = threading.Timer(
        600, lambda: first.poll() is None and first.kill()
    )  # never hang the suite
    guard.daemon = True
    guard.start()
    lines: list[str] = []
    for line in first.stdout:
        lines.append(line.rstrip("\n"))
        if "slides to process" in line:
            break
    run_a = next(
        (m.group(1) for ln in lines if (m := re.match(r"run (\S+): \d+ slides under", ln))), None
    )
    assert run_a and lines[-1].startswith("6 slides to process"), "\n".join(lines[-20:])
    # The first run holds the lease and is about to write; it is made slow (stopped) while the
    # second run starts on the same output.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error: ")]
    assert second.returncode == 2, (second.returncode, second.stdout[-2000:], second.stderr[-2000:])
    assert len(errors) == 1, second.stderr[-2000:]
    for part in (f"run {run_a}", f"pid {first.pid}", "since ", "expires ", out):
        assert part in errors[0], (part, errors[0])
    assert not any(ln.startswith("[") for ln in second.stdout.splitlines()), (
        "the second run processed slides"
    )
    rest = first.stdout.read()
    first.wait(300)
    first.stdout.close()
    guard.cancel()
    assert first.returncode == 0, (lines + rest.splitlines())[-30:]
    ids = cell_ids(out, s3_server)
    assert len(ids) == len(set(ids)), "a cell was written twice"
    assert set(ids) == base["cells"]
    assert_outputs_consistent(out, s3_server)
    assert len(read_table(out, "runs", s3_server)) == 1
    assert _leftovers(s3_server, b, prefix) == [], "lease, staging or journal left behind"


@integration
def test_uncompletable_corrupt_and_hostile_journals_are_rolled_back_then_exactly_once(
    base, s3_server, ray_cluster
):
    from fault_fixtures import (
        all_keys,
        assert_outputs_consistent,
        cell_ids,
        make_s3_client,
        run_job_collect,
    )

    b, prefix = base["bucket"], "out-bad-journals/"
    out = f"s3://{b}/{prefix}"
    s3 = make_s3_client(s3_server)
    with injected_fault(1, "mid_publish"), pytest.raises(InjectedFault):
        run_job_collect(
            input=base["input"],
            output=out,
            s3_endpoint=s3_server,
            chunk_slides=2,
        )
    keys = all_keys(s3_server, b, prefix)
    assert len([k for k in keys if "/_journal/" in k]) == 1
    # Another run deleted the staged slides of the half-published chunk: uncompletable.
    staged = [k for k in keys if "/_staging/" in k and k.endswith("slides.parquet")]
    assert len(staged) == 1
    s3.delete_object(Bucket=b, Key=staged[0])
    # Two more journals left by someone else: unreadable, and one moving another object in.
    s3.put_object(Bucket=b, Key="victim/secret.bin", Body=b"precious")
    hostile = {
        "chunk": "ab" * 12,
        "moves": [
            [
                f"s3://{b}/victim/secret.bin",
                f"{out}cells/run_date=2026-01-01/part-{'ab' * 12}.parquet",
            ],
            [f"{out}_staging/x/{'ab' * 12}/slides.parquet", f"s3://{b}/{prefix}../escaped.parquet"],
        ],
    }
    s3.put_object(
        Bucket=b, Key=f"{prefix}_journal/{'ab' * 12}.json", Body=json.dumps(hostile).encode()
    )
    s3.put_object(Bucket=b, Key=f"{prefix}_journal/{'cd' * 12}.json", Body=b"\xff{not json")

    lines: list[str] = []
    res = run_job_collect(
        lines, input=base["input"], output=out, s3_endpoint=s3_server, chunk_slides=2
    )
    assert res.exit_code == 0 and res.failed == 0, res.slides
    assert len(res.recovery.rolled_back) == 3 and res.recovery.rolled_forward == []
    assert any("rolled back 3" in ln for ln in lines), lines
    assert s3.get_object(Bucket=b, Key="victim/secret.bin")["Body"].read() == b"precious"
    assert not [k for k in all_keys(s3_server, b) if k.endswith("escaped.parquet")]
    ids = cell_ids(out, s3_server)
    assert len(ids) == len(set(ids)), "a cell was written twice"
    assert set(ids) == base["cells"]
    assert_outputs_consistent(out, s3_server)
    assert _leftovers(s3_server, b, prefix) == []
