"""Failure classes, bounded attempts for a slide that kills its worker, hostile local entries
(dangling symlinks, loops, FIFOs, devices) and quoting of names in progress lines.

Unit tests need neither Ray nor a network. The integration tests run one S3 staging check (no
Ray) and two small jobs on the session Ray cluster, one of them with a slide whose worker is
SIGKILLed by the test every time it opens the slide.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import (
    ConfigError,
    ScaleError,
    SlideOpenError,
    SlideReadError,
    SlideTooLargeError,
    StorageError,
)

unit = pytest.mark.unit
integration = pytest.mark.integration

_EXTS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs")
_CONTROL = ("\n", "\r", "\x1b", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\u202e")


def _small_slide(path: Path, field: int = 0) -> Path:
    from fault_fixtures import write_small_slide

    path.parent.mkdir(parents=True, exist_ok=True)
    write_small_slide(path, field)
    return path


def _outcome(ref, **kw) -> dict:
    from pipeline.job.stage_detect import DetectSettings, process_slide

    batches = list(
        process_slide(ref, DetectSettings(s3=kw.pop("s3", None), thumbnails=False, **kw))
    )
    return json.loads(batches[-1]["outcome"][-1])


def _local_refs(root: Path) -> dict:
    from pipeline.job._storage_local import LocalStorage
    from pipeline.job.listing import list_slides

    listing = list_slides(LocalStorage(), str(root), _EXTS)
    return {Path(r.uri).name: r for r in listing.slides}, listing


# -- classification by type ------------------------------------------------------------------
@unit
@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (SlideOpenError("s3://b/x.svs", "not a recognised slide or image format"), "slide"),
        (SlideReadError("s3://b/x.svs", "truncated"), "slide"),
        (SlideTooLargeError("s3://b/bomb.tiff", "declared dimensions exceed the limit"), "slide"),
        (ScaleError("s3://b/x.svs", "no mpp"), "slide"),
        (StorageError("s3://b/x.svs: download failed after retries (HTTP 500)"), "storage"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "storage"),
        (OSError(errno.EIO, "Input/output error"), "storage"),
        (ConfigError("--mpp must be positive"), "config"),
        (PermissionError(errno.EACCES, "Permission denied"), "config"),
        (OSError(errno.ENOSPC, "No space left on device"), "config"),
        (OSError(errno.EROFS, "Read-only file system"), "config"),
        (OSError(errno.ENAMETOOLONG, "File name too long"), "config"),
        (MemoryError(), "config"),
        (ValueError("SlideOpenError: a bug whose text looks like a slide problem"), "internal"),
        (KeyError("mpp"), "internal"),
        (RuntimeError("boom"), "internal"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v,
)
def test_failure_class_follows_the_exception_type(exc, expected):
    from pipeline.job.stage_detect import failure_class

    assert failure_class(exc) == expected


@unit
def test_failure_classes_are_declared_in_the_schema():
    from pipeline.schema import FAILURE_CLASSES, PERMANENT_FAILURE_CLASSES, SLIDE_COLUMNS

    assert set(FAILURE_CLASSES) == {"slide", "storage", "config", "internal", "worker_died"}
    assert set(PERMANENT_FAILURE_CLASSES) == {"slide", "worker_died"}
    names = [c[0] for c in SLIDE_COLUMNS]
    assert names.index("failure_class") == names.index("reason") + 1


# -- done_slides: the stored class decides; old files fall back to the reason prefix ----------
def _slide_row(sid: str, status: str, reason: str | None, cls: str | None, mv: str = "mv1") -> dict:
    return {
        "slide_id": sid,
        "slide_uri": f"s3://b/{sid}.svs",
        "slide_etag": "e",
        "slide_bytes": 1,
        "status": status,
        "reason": reason,
        "failure_class": cls,
        "cell_count": 0,
        "run_id": "r1",
        "model_version": mv,
    }


@unit
def test_done_slides_uses_failure_class_and_reads_old_files(tmp_path):
    from pipeline.job.storage import storage_for
    from pipeline.job.writer import OutputWriter
    from pipeline.schema import SLIDE_SCHEMA

    out = tmp_path / "out"
    w = OutputWriter(storage_for(str(out)), str(out), "r1", "2024-01-02", "mv1")
    w.commit_chunk(
        [],
        [
            _slide_row(
                "s-slide", "failed", "SlideTooLargeError: s3://b/bomb.tiff: too large", "slide"
            ),
            # The reason text says SlideOpenError, the class says config: the class wins (retried).
            _slide_row("s-config", "failed", "SlideOpenError: /data/x.svs: no such file", "config"),
            _slide_row("s-storage", "failed", "StorageError: s3://b/x: download failed", "storage"),
            _slide_row("s-internal", "failed", "KeyError: 'mpp'", "internal"),
            _slide_row(
                "s-died",
                "failed",
                "WorkerDiedError: s3://b/k.svs: worker process died 3 times",
                "worker_died",
            ),
            _slide_row("s-ok", "ok", None, None),
            _slide_row("s-other-model", "ok", None, None, mv="mv0"),
        ],
    )
    # A slides file written before the column existed.
    old_schema = pa.schema([f for f in SLIDE_SCHEMA if f.name != "failure_class"])
    old_rows = [
        _slide_row(
            "o-bytes", "failed", "SlideOpenError: s3://b/o.svs: not a recognised slide", None
        ),
        _slide_row("o-storage", "failed", "StorageError: s3://b/o2.svs: download failed", None),
        _slide_row("o-ok", "ok", None, None),
    ]
    for r in old_rows:
        del r["failure_class"]
    old = out / "slides" / "run_date=2023-12-31" / "part-old.parquet"
    old.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(old_rows, schema=old_schema), old)
    assert w.done_slides("mv1") == {"s-slide", "s-died", "s-ok", "o-bytes", "o-ok"}
    assert w.done_slides("mv1", retry_failed=True) == {"s-ok", "o-ok"}


# -- local entries: symlinks, loops, FIFOs, devices, permissions --------------------------------
def _hostile_dir(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    _small_slide(root / "good.tiff")
    _small_slide(root / "sub" / "inner.tiff", 1)
    (root / "fake.svs").write_text("not a slide\n" * 20)
    os.symlink(root / "missing-target.svs", root / "dangling.svs")
    os.symlink(root / "notes-missing.txt", root / "notes-link.txt")  # not a slide suffix
    os.symlink("loop.svs", root / "loop.svs")
    os.mkfifo(root / "fifo.svs")
    os.symlink("/dev/zero", root / "zero.svs")
    outside = tmp_path / "elsewhere"
    _small_slide(outside / "other.tiff", 2)
    os.symlink(outside, root / "dirlink")
    os.symlink(".", root / "dirloop")  # a directory symlink to its own parent
    return root


@unit
def test_local_listing_survives_hostile_entries(tmp_path):
    root = _hostile_dir(tmp_path)
    refs, listing = _local_refs(root)
    assert sorted(refs) == [
        "dangling.svs",
        "fake.svs",
        "fifo.svs",
        "good.tiff",
        "inner.tiff",
        "loop.svs",
        "zero.svs",
    ]
    ignored = {Path(u).name for u in listing.ignored}
    # Directory symlinks are not followed (no loop, no escape, no duplicate), but shown.
    assert {"notes-link.txt", "dirlink", "dirloop"} <= ignored
    assert not any("elsewhere" in u or "other.tiff" in u for u in listing.ignored + tuple(refs))


@unit
def test_hostile_local_entries_fail_alone_with_their_reason(tmp_path):
    root = _hostile_dir(tmp_path)
    refs, _ = _local_refs(root)
    fifo_opened = threading.Event()

    def fifo_writer():  # opening the write end blocks until someone opens the FIFO to read it
        try:
            with open(root / "fifo.svs", "wb") as fh:
                fifo_opened.set()
                fh.write(b"II*\x00" + b"\x00" * 64)
        except OSError:
            pass

    t = threading.Thread(target=fifo_writer, daemon=True)
    t.start()
    try:
        out = {name: _outcome(ref) for name, ref in refs.items()}
        opened_by_stage = fifo_opened.is_set()
    finally:
        if not fifo_opened.is_set():  # release the writer: open (and close) the read end ourselves
            os.close(os.open(root / "fifo.svs", os.O_RDONLY | os.O_NONBLOCK))
        t.join(10)
    assert not opened_by_stage, "the FIFO was opened by the detect stage"
    assert out["good.tiff"]["status"] == "ok" and out["good.tiff"]["failure_class"] is None
    assert out["inner.tiff"]["status"] == "ok"
    expect = {
        "fake.svs": "SlideOpenError: ",
        "dangling.svs": "dangling symlink",
        "loop.svs": "symlink loop",
        "fifo.svs": "not a regular file (FIFO)",
        "zero.svs": "not a regular file (character device)",
    }
    for name, text in expect.items():
        o = out[name]
        assert o["status"] == "failed" and o["failure_class"] == "slide", (name, o)
        assert o["reason"].startswith("SlideOpenError: ") and text in o["reason"], (
            name,
            o["reason"],
        )
        assert "\n" not in o["reason"]


@unit
def test_local_path_a_worker_cannot_see_is_config_not_slide(tmp_path):
    root = _hostile_dir(tmp_path)
    target = _small_slide(tmp_path / "mount" / "linked.tiff", 3)
    os.symlink(target, root / "linked.svs")
    refs, _ = _local_refs(root)
    # As on a node that does not mount the input directory (or the link's target): the listing,
    # on the driver, saw both files.
    os.unlink(refs["good.tiff"].uri)
    os.unlink(target)
    for name in ("good.tiff", "linked.svs"):
        o = _outcome(refs[name])
        assert o["status"] == "failed" and o["failure_class"] == "config", (name, o)
        assert refs[name].uri in o["reason"] and "not visible to this worker" in o["reason"]


@unit
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_unreadable_local_file_is_config(tmp_path):
    p = _small_slide(tmp_path / "in" / "locked.tiff")
    p.chmod(0)
    try:
        refs, _ = _local_refs(p.parent)
        o = _outcome(refs["locked.tiff"])
    finally:
        p.chmod(0o644)
    assert (
        o["status"] == "failed"
        and o["failure_class"] == "config"
        and "permission denied" in o["reason"]
    )


# -- staging names that are too long for the local file system -----------------------------------
@unit
@pytest.mark.parametrize(
    "name", ["a" * 300 + ".tiff", "é" * 200 + ".svs", "x" * 252 + ".ndpi", "b" * 600]
)
def test_confined_path_shortens_overlong_names(tmp_path, name):
    from pipeline.job.stage_detect import confined_path

    out = confined_path(tmp_path, name, shorten=True)
    assert out.parent == tmp_path.resolve()
    assert len(out.name.encode()) <= 255
    assert out.suffix == Path(name).suffix
    assert confined_path(tmp_path, name, shorten=True) == out  # deterministic
    assert confined_path(tmp_path, name[:-6] + "Z" + name[-5:], shorten=True) != out
    out.write_bytes(b"x")  # the file system accepts it
    assert confined_path(tmp_path, "short.svs", shorten=True) == tmp_path.resolve() / "short.svs"


@integration
def test_overlong_keys_staged_or_failed_as_slide(s3_server, tmp_path):
    """A single-object slide whose key's name is over NAME_MAX is staged under a short name and
    processed (it used to fail every night); an MRXS member that long is the slide's fault."""
    import numpy as np
    import tifffile
    from fault_fixtures import SMALL_MPP, make_s3_client, new_bucket

    from pipeline.job.listing import SlidePart, SlideRef
    from pipeline.job.storage import S3Settings

    field = tmp_path / "field.tiff"
    _small_slide(field)
    img = tifffile.imread(
        field
    )  # re-written stripped: the in-place reader refuses it, so it is staged
    plain = tmp_path / "plain.tiff"
    tifffile.imwrite(plain, np.ascontiguousarray(img), photometric="rgb")
    bucket = new_bucket(s3_server)
    s3 = make_s3_client(s3_server)
    key = "slides/" + "long-name-" * 30 + ".tiff"
    s3.put_object(Bucket=bucket, Key=key, Body=plain.read_bytes())
    etag = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    uri, size = f"s3://{bucket}/{key}", plain.stat().st_size
    name = key.rsplit("/", 1)[1]
    ref = SlideRef("a" * 32, uri, etag, size, (SlidePart(uri, name, size, etag),), name)
    scratch = tmp_path / "scratch"
    o = _outcome(ref, s3=S3Settings(endpoint=s3_server), mpp=SMALL_MPP, scratch_dir=str(scratch))
    assert o["status"] == "ok", o["reason"]
    assert list(scratch.iterdir()) == []  # the staged copy was removed

    member = "m/" + "d" * 300 + ".dat"
    parts = (
        SlidePart(f"s3://{bucket}/x.mrxs", "x.mrxs", 1, "e1"),
        SlidePart(f"s3://{bucket}/x/{member}", f"x/{member}", 1, "e2"),
    )
    mref = SlideRef("b" * 32, f"s3://{bucket}/x.mrxs", "e", 2, parts, "x.mrxs")
    o = _outcome(mref, s3=S3Settings(endpoint=s3_server), scratch_dir=str(scratch))
    assert o["status"] == "failed" and o["failure_class"] == "slide", o
    assert o["reason"].startswith("SlideOpenError: ") and "too long" in o["reason"]


# -- quoting of names in progress lines and the summary ------------------------------------------
_EVIL = "s3://b/evil\n[2/2] ok      s3://b/forged.svs  9 cells\x1b[2K\r\u2028\u202e.svs"


def _assert_one_line(text: str) -> None:
    for ch in _CONTROL:
        assert ch not in text, (ch, text)


@unit
def test_progress_line_and_summary_quote_control_characters():
    from pipeline.job.run import RunResult, _slide_line, format_summary

    failed = {
        "status": "failed",
        "slide_uri": _EVIL,
        "reason": f"SlideOpenError: {_EVIL}: bad\nforged line",
        "cell_count": 0,
    }
    ok = {
        "status": "ok",
        "slide_uri": _EVIL + "2",
        "cell_count": 2,
        "stage_seconds": 0.1,
        "detect_seconds": 0.2,
        "caption_seconds": 0.3,
        "cell_types": {"neutrophil\n[9/9] ok": 2},
    }
    for row in (failed, ok):
        line = _slide_line(1, 2, row)
        _assert_one_line(line)
        assert "\\n" in line and "\\x1b" in line and "\\u2028" in line
    res = RunResult(
        "r",
        "2024-01-02",
        "ok",
        0,
        "m",
        "v",
        listed=2,
        ok=1,
        failed=1,
        slides=[failed, ok],
        ignored=[_EVIL + ".txt"],
    )
    text = format_summary(res, "s3://out/\nforged")
    assert len(text.splitlines()) == 5  # head, two slides, ignored, outputs
    for line in text.split("\n"):
        _assert_one_line(line)
    assert failed["slide_uri"] == _EVIL  # the stored value stays verbatim


@unit
def test_dry_run_lines_quote_file_names(tmp_path):
    from fault_fixtures import tiny_model

    from pipeline.job import load_config, run_job

    root = tmp_path / "in"
    evil = "evil\n[1/1] ok      forged.tiff  9 cells\x1b[31m.tiff"
    _small_slide(root / evil)
    (root / "notes\u2028forged.txt").write_text("x")
    lines: list[str] = []
    cfg = load_config(
        overrides={
            "input": str(root),
            "output": str(tmp_path / "out"),
            "dry_run": True,
            "model": tiny_model(str(tmp_path)),
        },
    )
    res = run_job(cfg, say=lines.append)
    assert res.would_process == [str(root / evil)]  # verbatim in the result
    for line in lines:
        _assert_one_line(line)
    assert any("would process" in line and "\\n" in line for line in lines)


# -- integration: a slide that kills its worker, and the stored classes --------------------------
class OpenFileKiller(threading.Thread):
    """SIGKILLs every descendant of this process that has ``path`` open, up to ``limit`` times (the
    limit only keeps a run without bounded attempts from looping for ever)."""

    def __init__(self, path: Path, limit: int):
        super().__init__(daemon=True)
        self.path, self.limit = str(path), limit
        self.kills: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process(os.getpid())
        while not self._halt.is_set() and len(self.kills) < self.limit:
            for p in me.children(recursive=True):
                try:
                    holds = any(f.path == self.path for f in p.open_files())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                if holds and p.pid not in self.kills:  # a killed process lingers a moment
                    os.kill(p.pid, signal.SIGKILL)
                    self.kills.append(p.pid)
                    break
            time.sleep(0.01)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _big_slide(path: Path) -> Path:
    """8 x 8 copies of a BCCD field (5120 x 3840 px): detection keeps the file open for seconds."""
    import numpy as np
    import tifffile
    from fault_fixtures import SMALL_MPP, _bccd_fields
    from PIL import Image

    img = np.tile(np.asarray(Image.open(_bccd_fields()[0]).convert("RGB")), (8, 8, 1))
    with tifffile.TiffWriter(path) as tw:
        for i, lvl in enumerate((img, np.ascontiguousarray(img[::2, ::2]))):
            ds = img.shape[1] / lvl.shape[1]
            tw.write(
                lvl,
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                subfiletype=1 if i else 0,
                metadata=None,
                software=False,
                resolution=(1e4 / (SMALL_MPP * ds),) * 2,
                resolutionunit="CENTIMETER",
            )
    return path


@integration
def test_slide_killing_its_worker_is_failed_after_bounded_attempts(ray_cluster, tmp_path):
    from fault_fixtures import run_job_collect

    root = tmp_path / "in"
    _small_slide(root / "good.tiff")
    killer_slide = _big_slide(root / "kills-its-worker.tiff")
    (root / "fake.svs").write_text("not a slide\n" * 20)
    os.symlink(root / "gone.svs", root / "dangling.svs")
    out = tmp_path / "out"
    lines: list[str] = []
    killer = OpenFileKiller(killer_slide, limit=6)
    killer.start()
    try:
        res = run_job_collect(
            lines, input=str(root), output=str(out), chunk_slides=2, max_failed_fraction=1.0
        )
    finally:
        killer.stop()
    print(f"\nworker SIGKILLed {len(killer.kills)} times; {res.seconds:.1f} s", *lines, sep="\n")
    assert len(killer.kills) == 3, "each of the 3 attempts must have opened the slide, the 4th none"
    assert res.exit_code == 0 and res.ok == 1 and res.failed == 3
    slides = pq.read_table(out / "slides").to_pylist()
    by_name = {Path(s["slide_uri"]).name: s for s in slides}
    assert len(slides) == len(by_name) == 4, "a slide row was written twice or is missing"
    dead = by_name["kills-its-worker.tiff"]
    assert dead["status"] == "failed" and dead["failure_class"] == "worker_died", dead
    assert dead["reason"].startswith(
        f"WorkerDiedError: {killer_slide}: worker process died 3 times while processing this slide (last: "
    )
    # What Ray's worker table says (a SIGKILL is SYSTEM_ERROR); "cause unknown" if it answers late.
    assert re.search(
        r"\(last: (killed by a signal or crashed, e\.g\. SIGKILL.*|cause unknown)\)$",
        dead["reason"],
    )
    assert by_name["good.tiff"]["status"] == "ok" and by_name["good.tiff"]["failure_class"] is None
    assert by_name["fake.svs"]["failure_class"] == "slide"
    assert (
        by_name["dangling.svs"]["failure_class"] == "slide"
        and "dangling symlink" in by_name["dangling.svs"]["reason"]
    )
    assert sum(1 for line in lines if line.startswith("[")) == 4  # one progress line per slide

    # The next night: everything is settled (ok, or failed for a reason that repeats) until the
    # files change; --retry-failed would run the failed ones again.
    again = run_job_collect([], input=str(root), output=str(out), max_failed_fraction=1.0)
    assert again.skipped == 4 and again.ok == again.failed == 0
