"""The slide factory: ``open_slide(uri, storage_options=...)`` picks local, in-place S3 or staged.

Unit tier: local files (formats, special files, listed parts a worker cannot see, confinement of
staged names). Integration tier: the session's moto S3 server; an SVS is read in place (fewer
bytes fetched than the object holds), anything else is staged to scratch and the copy removed
on close and on every failure.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import SlideOpenError, StorageError, WorkerEnvironmentError

unit = pytest.mark.unit
integration = pytest.mark.integration


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from pipeline.samples import build_sample_slides

    return {s.path.suffix: s.path for s in build_sample_slides(tmp_path_factory.mktemp("samples"))}


def _png(path: Path, side: int = 64) -> Path:
    Image.fromarray(np.full((side, side, 3), 180, np.uint8)).save(path)
    return path


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


# -- local ---------------------------------------------------------------------------------------
@unit
def test_local_files_open_with_their_backend(samples, tmp_path):
    from pipeline.slides import open_slide

    png = _png(tmp_path / "field.png")
    for path, fmt in (
        (samples[".svs"], "openslide:aperio"),
        (samples[".tiff"], "openslide:generic-tiff"),
        (png, "image:png"),
    ):
        with open_slide(path, storage_options={"endpoint_url": "http://127.0.0.1:9"}) as s:
            assert s.format == fmt and s.path == str(path)
            assert s.staged is False and s.bytes_fetched is None
            w, h = s.level_dimensions[-1]
            assert s.read(s.level_count - 1, (0, 0, w, h)).shape == (h, w, 3)


@unit
def test_local_special_files_are_refused_without_being_opened(tmp_path):
    """A FIFO passed to open_slide used to be stat-ed as an empty file and a device opened by
    OpenSlide's format probe; now neither is opened and the cause is named."""
    from pipeline.slides import open_slide

    fifo = tmp_path / "fifo.svs"
    os.mkfifo(fifo)
    opened = threading.Event()

    def writer():  # opening the write end blocks until someone opens the read end
        try:
            with open(fifo, "wb") as fh:
                opened.set()
                fh.write(b"II*\x00")
        except OSError:
            pass

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        with pytest.raises(SlideOpenError, match=r"fifo\.svs: not a regular file \(FIFO\)"):
            open_slide(fifo)
        by_stage = opened.is_set()
    finally:
        if not opened.is_set():
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        t.join(10)
    assert not by_stage, "open_slide opened the FIFO"
    os.symlink("/dev/zero", tmp_path / "zero.svs")
    with pytest.raises(SlideOpenError, match=r"not a regular file \(character device\)"):
        open_slide(tmp_path / "zero.svs")
    os.symlink(tmp_path / "gone.svs", tmp_path / "dangling.svs")
    with pytest.raises(SlideOpenError, match="dangling symlink"):
        open_slide(tmp_path / "dangling.svs")
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(SlideOpenError, match="is a directory"):
        open_slide(tmp_path)


@unit
def test_listed_local_part_a_worker_cannot_see_is_its_environment(tmp_path):
    from pipeline.job.listing import SlidePart
    from pipeline.slides import open_slide

    gone = str(tmp_path / "gone.tiff")
    part = SlidePart(gone, "gone.tiff", 10, "etag-from-the-listing")
    with pytest.raises(WorkerEnvironmentError, match="not visible to this worker"):
        open_slide(gone, parts=(part,), open_rel="gone.tiff")
    with pytest.raises(SlideOpenError, match="no such file"):  # not listed: the path's own problem
        open_slide(gone)


@unit
@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        "a/../../../x.svs",
        "/abs/x.svs",
        "..\\..\\x.svs",
        "a/./b/../../../c",
        "x\x00/../y.svs",
    ],
)
def test_staged_names_stay_in_the_scratch_directory(tmp_path, key):
    from pipeline.slides import confined_path

    root = tmp_path / "scratch"
    root.mkdir()
    out = confined_path(root, key)
    assert root.resolve() in out.parents


# -- S3 ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bucket(s3_server):
    from fault_fixtures import new_bucket

    return new_bucket(s3_server, "open-slide")


def _put(s3_server, bucket: str, key: str, data: bytes) -> str:
    from fault_fixtures import make_s3_client

    make_s3_client(s3_server).put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


@integration
def test_s3_svs_is_read_in_place(s3_server, bucket, samples, tmp_path, monkeypatch):
    """Endpoint from the settings only (none in the environment); detection through the factory
    fetches a fraction of the object and stages nothing."""
    from pipeline.detect import DetectConfig, detect_slide
    from pipeline.job.storage import S3Settings
    from pipeline.slides import open_slide

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    svs = samples[".svs"]
    uri = _put(s3_server, bucket, "in-place/" + svs.name, svs.read_bytes())
    scratch = tmp_path / "scratch"
    size = svs.stat().st_size
    with open_slide(
        uri, mpp=0.5, storage_options=S3Settings(endpoint=s3_server), scratch_dir=scratch
    ) as s:
        assert s.format == "remote-tiff:aperio" and s.staged is False and s.path == uri
        result = detect_slide(s, DetectConfig(mpp=0.5), source=uri)
        fetched = s.bytes_fetched
    assert 0 < fetched < size, (fetched, size)
    print(f"in place: {fetched} of {size} bytes fetched ({fetched / size:.1%})")
    assert not scratch.exists() or _files(scratch) == []
    assert len(result.records) == len(detect_slide(svs, DetectConfig(mpp=0.5)).records)


@integration
def test_s3_slide_needing_the_whole_file_is_staged_and_removed(s3_server, bucket, tmp_path):
    from pipeline.slides import open_slide

    opts = {"endpoint_url": s3_server}
    png = _png(tmp_path / "f.png")
    uri = _put(s3_server, bucket, "staged/f.png", png.read_bytes())
    scratch = tmp_path / "scratch"
    s = open_slide(uri, storage_options=opts, scratch_dir=scratch)
    try:
        assert s.staged is True and s.path == uri and s.format == "image:png"
        assert s.bytes_fetched == png.stat().st_size
        assert [Path(f).name for f in _files(scratch)] == ["f.png"]  # the copy, while open
        assert s.read(0, (0, 0, 8, 8)).shape == (8, 8, 3)
    finally:
        s.close()
    assert _files(scratch) == [] and list(scratch.iterdir()) == []
    # A stripped TIFF: the in-place reader refuses it, its header bytes count, then it is staged.
    tif = tmp_path / "plain.tif"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tif)
    uri = _put(s3_server, bucket, "staged/plain.tif", tif.read_bytes())
    with open_slide(uri, storage_options=opts, scratch_dir=scratch) as s:
        assert s.staged is True and s.bytes_fetched > tif.stat().st_size
    assert list(scratch.iterdir()) == []
    # Dropped without close: the copy goes with the object.
    s = open_slide(uri, storage_options=opts, scratch_dir=scratch)
    del s
    assert list(scratch.iterdir()) == []


@integration
def test_staged_copy_is_removed_on_every_failure(s3_server, bucket, tmp_path):
    from pipeline.job.listing import SlidePart
    from pipeline.slides import open_slide

    opts = {"endpoint_url": s3_server}
    scratch = tmp_path / "scratch"
    # Not an image: the error names the object, never the scratch copy.
    uri = _put(s3_server, bucket, "bad/corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(SlideOpenError) as err:
        open_slide(uri, storage_options=opts, scratch_dir=scratch)
    assert str(err.value).startswith(uri + ": ") and str(scratch) not in str(err.value)
    assert "\n" not in str(err.value)
    assert list(scratch.iterdir()) == []
    # Replaced since it was listed: the download fails, nothing is left behind.
    part = SlidePart(uri, "corrupt.png", 108, "0" * 32)
    with pytest.raises(StorageError, match="changed since it was listed"):
        open_slide(
            uri, storage_options=opts, scratch_dir=scratch, parts=(part,), open_rel="corrupt.png"
        )
    assert list(scratch.iterdir()) == []
    # Missing object (in-place attempt first, then the download's own error).
    with pytest.raises(StorageError, match="missing.svs"):
        open_slide(f"s3://{bucket}/bad/missing.svs", storage_options=opts, scratch_dir=scratch)
    assert list(scratch.iterdir()) == []


@integration
def test_hostile_member_names_of_a_multi_object_slide_stay_in_scratch(s3_server, bucket, tmp_path):
    """The members' relative names come from object keys: whatever they say, every staged byte
    lands under the slide's scratch directory, and the directory is gone afterwards."""
    from pipeline.job.listing import SlidePart
    from pipeline.slides import open_slide

    scratch = tmp_path / "deep" / "scratch"
    index = _put(s3_server, bucket, "mrxs/x.mrxs", b"[GENERAL]\nnot really\n")
    member = _put(s3_server, bucket, "mrxs/x/Data0000.dat", b"payload")
    parts = (
        SlidePart(index, "x.mrxs", 21, ""),
        SlidePart(member, "x/../../../escaped.dat", 7, ""),
        SlidePart(member, "/abs/escaped2.dat", 7, ""),
    )
    with pytest.raises(SlideOpenError) as err:
        open_slide(
            index,
            storage_options={"endpoint_url": s3_server},
            scratch_dir=scratch,
            parts=parts,
            open_rel="x.mrxs",
        )
    assert str(err.value).startswith(index + ": ") and "\n" not in str(err.value)
    assert str(scratch) not in str(err.value)
    assert _files(tmp_path) == []  # nothing escaped, and the staged copies are gone
    assert not Path("/abs/escaped2.dat").exists()
