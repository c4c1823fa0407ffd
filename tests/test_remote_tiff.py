"""Remote TIFF backend against OpenSlide on the same files, served by moto's S3 server."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile

import pipeline.detect as detect_mod
from pipeline.errors import SlideOpenError, SlideReadError, StorageError
from pipeline.samples import build_sample_slides
from pipeline.slides import open_slide
from pipeline.slides._remote_tiff import open_remote_slide
from pipeline.slides._s3range import S3RangeFile

pytestmark = pytest.mark.integration

FIXTURES = ("small.svs", "boxes.tiff")


@pytest.fixture(scope="module")
def s3(s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"remote-tiff-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


@pytest.fixture(scope="module")
def samples(tmp_path_factory, s3):
    client, bucket = s3
    out = build_sample_slides(tmp_path_factory.mktemp("samples"))
    for s in out:
        client.upload_file(str(s.path), bucket, f"samples/{s.path.name}")
    return {f"samples/{s.path.name}": s.path for s in out}


@pytest.fixture(scope="module")
def fixtures(shared_data, s3):
    client, bucket = s3
    out = {}
    for name in FIXTURES + ("unopenable.tiff", "unreadable.svs"):
        path = shared_data / "openslide_fixtures" / name
        client.upload_file(str(path), bucket, f"fixtures/{name}")
        out[f"fixtures/{name}"] = path
    return out


def _put(s3, key: str, data: bytes) -> None:
    client, bucket = s3
    client.put_object(Bucket=bucket, Key=key, Body=data)


def _assert_same_pixels(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.shape == b.shape, what
    # Both sides use libjpeg-turbo here (equal in practice); allow decoder rounding elsewhere.
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 2 and diff.mean() < 0.05, (
        f"{what}: max {diff.max()}, mean {diff.mean():.4f}"
    )


def _compare(local_path: Path, s3, key: str, integer_levels_only_boxes: bool = False) -> None:
    client, bucket = s3
    with open_slide(local_path) as loc, open_remote_slide(client, bucket, key) as rem:
        assert rem.format.split(":")[1] == loc.format.split(":")[1]
        assert rem.level_dimensions == loc.level_dimensions
        assert rem.level_downsamples == pytest.approx(loc.level_downsamples, rel=1e-12)
        assert rem.mpp == loc.mpp and rem.mpp_source == loc.mpp_source
        assert rem.path == f"s3://{bucket}/{key}"
        for lv, (w, h) in enumerate(loc.level_dimensions):
            _assert_same_pixels(
                rem.read(lv, (0, 0, w, h)), loc.read(lv, (0, 0, w, h)), f"{key} level {lv}"
            )
            # OpenSlide addresses a level through level-0 coordinates: at a level whose
            # downsample is not an integer it resamples a sub-pixel shift, so only boxes at
            # integer-downsample levels are comparable off the origin.
            if integer_levels_only_boxes and rem.level_downsamples[lv] != int(
                rem.level_downsamples[lv]
            ):
                continue
            for box in (
                (w // 3, h // 5, w // 3 + w // 2 + 3, h // 5 + h // 3 + 1),  # unaligned to tiles
                (w - 7, h - 5, w + 20, h + 9),  # over the right/bottom border: white padding
                (-11, -3, 13, 17),  # over the left/top border
            ):
                _assert_same_pixels(
                    rem.read(lv, box), loc.read(lv, box), f"{key} level {lv} box {box}"
                )


def test_sample_slides_read_like_openslide(samples, s3):
    for key, path in samples.items():
        _compare(path, s3, key)


@pytest.mark.parametrize("name", FIXTURES)
def test_openslide_fixtures_read_like_openslide(fixtures, s3, name):
    _compare(fixtures[f"fixtures/{name}"], s3, f"fixtures/{name}", integer_levels_only_boxes=True)


def test_border_padding_is_white(samples, s3):
    client, bucket = s3
    key = next(iter(samples))
    with open_remote_slide(client, bucket, key) as rem:
        w, h = rem.level_dimensions[1]
        out = rem.read(1, (w - 4, h - 4, w + 6, h + 6))
        assert (out[4:, :] == 255).all() and (out[:, 4:] == 255).all()
        assert not (out[:4, :4] == 255).all()


def test_reads_fetch_only_the_tiles_they_need(samples, s3):
    client, bucket = s3
    key, path = next(iter(samples.items()))
    size = path.stat().st_size
    with open_remote_slide(client, bucket, key) as rem:
        header = rem.bytes_fetched
        assert 0 < header < size / 4
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            tw, th = page.tilewidth, page.tilelength
            across = -(-page.imagewidth // tw)
            # A box inside level-0 tile (1, 2) costs that tile's bytes, nothing more.
            i = 2 * across + 1
            tile_bytes = int(page.databytecounts[i])
        rem.read(0, (tw + 5, 2 * th + 5, tw + 50, 2 * th + 60))
        assert rem.bytes_fetched - header == tile_bytes
        before = rem.bytes_fetched
        rem.read(0, (tw + 60, 2 * th + 60, tw + 70, 2 * th + 70))  # same tile: decoded-tile cache
        assert rem.bytes_fetched == before


def test_prefetch_batches_requests_and_reads_then_cost_none(samples, s3):
    client, bucket = s3
    key, path = next(iter(samples.items()))
    boxes = [(x, y, x + 300, y + 300) for x in (0, 900, 1800, 2600) for y in (0, 1000, 2000)]
    with open_remote_slide(client, bucket, key) as plain:
        expected = [plain.read(0, b) for b in boxes]
        plain_requests = plain.requests - 1  # minus the header's
    with open_remote_slide(client, bucket, key) as rem:
        start = rem.requests
        rem.prefetch(0, boxes + [(-50, -50, -1, -1), (5000, 5000, 6000, 6000)])  # outside: ignored
        batched = rem.requests - start
        after = rem.requests
        got = [rem.read(0, b) for b in boxes]
        assert rem.requests == after, "reads after a prefetch must be served from it"
        rem.prefetch(0, boxes)  # everything is held now: no request
        assert rem.requests == after
    for a, b in zip(got, expected):
        _assert_same_pixels(a, b, "prefetched read")
    # Tiles of neighbouring boxes share a request; the plain reads paid one per read at least.
    assert batched < plain_requests


def test_detection_on_a_remote_slide_costs_fewer_requests_than_cells(samples, s3):
    client, bucket = s3
    for key, path in samples.items():
        local = detect_mod.detect_slide(path)
        with open_remote_slide(client, bucket, key) as rem:
            remote = detect_mod.detect_slide(rem)
            requests = rem.requests
        assert [r["centroid_x"] for r in remote.records] == [r["centroid_x"] for r in local.records]
        _assert_same_pixels(remote.crops, local.crops, f"{key} crops")
        # Header, the detection level, then the crops' tiles in batches: not a request per cell.
        assert requests < len(remote.records), (key, requests, len(remote.records))


def test_detection_pass_matches_local_and_reads_less_than_the_file(tmp_path, s3, samples):
    # The sparse slide of the S3 benchmark: three WBC fields on a 7,680 x 5,760 px smear.
    from bench.bench_detect import _smear_slide

    client, bucket = s3
    path = tmp_path / "smear.tiff"
    _smear_slide(path)
    client.upload_file(str(path), bucket, "smear.tiff")
    local = detect_mod.detect_slide(path)
    with open_remote_slide(client, bucket, "smear.tiff") as rem:
        remote = detect_mod.detect_slide(rem)
    assert remote.records[0]["source"] == f"s3://{bucket}/smear.tiff"
    assert [r["bbox_x0"] for r in remote.records] == [r["bbox_x0"] for r in local.records]
    assert len(remote.records) == 3
    _assert_same_pixels(remote.crops, local.crops, "crops")
    assert rem.bytes_fetched < 0.3 * path.stat().st_size


def test_range_file_counts_and_coalesces(s3):
    client, bucket = s3
    data = bytes(range(256)) * 1024  # 256 KiB
    _put(s3, "blob.bin", data)
    f = S3RangeFile(client, bucket, "blob.bin", block_size=4096, merge_gap=100)
    assert f.size == len(data)
    f.seek(5000)
    assert f.read(10) == data[5000:5010]
    assert (f.bytes_fetched, f.requests) == (4096, 1)
    f.seek(-3, 2)
    assert f.read(10) == data[-3:]
    got = f.fetch_ranges([(1000, 10), (1050, 20), (200_000, 5), (0, 0)])
    assert got == [data[1000:1010], data[1050:1070], data[200_000:200_005], b""]
    # Two cached blocks (the one holding 5000, the last one); then (1000, 10) and (1050, 20),
    # 40 bytes apart, in one request of 70 bytes, and 5 bytes.
    assert f.requests == 2 + 2 and f.bytes_fetched == 4096 + 4096 + 70 + 5


def test_default_merge_gap_does_not_fetch_the_tiles_between_scattered_ones(s3):
    # A zoned smear reads tiles a few apart in a row: two ~7 KiB tiles with one ~7 KiB tile
    # between them are two requests of their own bytes, not one request with the middle one.
    client, bucket = s3
    data = bytes(range(256)) * 96  # 24 KiB
    _put(s3, "blob-tiles.bin", data)
    f = S3RangeFile(client, bucket, "blob-tiles.bin")
    got = f.fetch_ranges([(0, 7000), (14_000, 7000)])
    assert got == [data[:7000], data[14_000:21_000]]
    assert (f.requests, f.bytes_fetched) == (2, 14_000)
    # Adjacent tiles still share one request.
    f2 = S3RangeFile(client, bucket, "blob-tiles.bin")
    f2.fetch_ranges([(0, 7000), (7000, 7000)])
    assert (f2.requests, f2.bytes_fetched) == (1, 14_000)


def test_concurrent_range_fetch_returns_every_range_in_order(s3):
    client, bucket = s3
    data = bytes(range(251)) * 2048  # ~500 KiB; 251 keeps slices distinguishable
    _put(s3, "blob-concurrent.bin", data)
    f = S3RangeFile(client, bucket, "blob-concurrent.bin", merge_gap=0)
    ranges = [(o, 777) for o in range(400_000, 0, -20_000)] + [(0, 0)]
    got = f.fetch_ranges(ranges, workers=8)
    assert got == [data[o : o + n] for o, n in ranges]
    assert f.requests == 20 and f.bytes_fetched == 20 * 777
    with pytest.raises(SlideReadError, match="past the object"):
        f.fetch_ranges([(0, 10), (len(data) - 5, 10)], workers=8)


def test_object_replaced_mid_read_fails_loudly(s3, samples):
    client, bucket = s3
    src = next(iter(samples.values()))
    _put(s3, "changing.tiff", src.read_bytes())
    with open_remote_slide(client, bucket, "changing.tiff") as rem:
        _put(s3, "changing.tiff", src.read_bytes()[:-10] + b"0123456789")
        # Transient (the next run retries it), not a defect of the slide: StorageError.
        with pytest.raises(StorageError, match=r"changing\.tiff.*changed while it was being read"):
            rem.read(0, (0, 0, 600, 600))


def test_stale_listing_etag_is_a_storage_error(s3, samples):
    client, bucket = s3
    _put(s3, "stale.tiff", next(iter(samples.values())).read_bytes())
    with pytest.raises(StorageError, match=r"stale\.tiff.*changed"):
        open_remote_slide(client, bucket, "stale.tiff", etag="0123456789abcdef0123456789abcdef")


@pytest.mark.parametrize(
    "key, body, match",
    [
        ("missing.svs", None, "no such object"),
        ("empty.svs", b"", "empty object"),
        ("notes.svs", b"plain text, not an image\n" * 10, "not a TIFF file"),
        ("truncated.tiff", "half", "truncated"),
    ],
)
def test_unusable_objects_raise_open_errors_naming_the_object(s3, samples, key, body, match):
    client, bucket = s3
    if body == "half":
        full = next(iter(samples.values())).read_bytes()
        body = full[:2000]  # first IFD survives, its tiles and the IFD chain do not
    if body is not None:
        _put(s3, key, body)
    with (
        pytest.raises(SlideOpenError, match=match) as info,
        open_remote_slide(client, bucket, key) as rem,
    ):
        rem.read(0, (0, 0, 64, 64))
    assert str(info.value).startswith(f"s3://{bucket}/{key}: ")
    assert "\n" not in str(info.value)


def test_formats_needing_the_whole_file_are_refused_for_staging(s3, fixtures, tmp_path):
    client, bucket = s3
    # Plain (stripped) TIFF: OpenSlide does not treat it as a slide; the Pillow backend does.
    plain = tmp_path / "plain.tiff"
    tifffile.imwrite(plain, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    client.upload_file(str(plain), bucket, "plain.tiff")
    with pytest.raises(SlideOpenError, match="not tiled") as info:
        open_remote_slide(client, bucket, "plain.tiff")
    assert info.value.bytes_fetched > 0
    # Unsupported compression (OpenSlide cannot read it either).
    with pytest.raises(SlideOpenError, match="compression"):
        open_remote_slide(client, bucket, "fixtures/unopenable.tiff")
    # Separate colour planes.
    planar = tmp_path / "planar.tiff"
    tifffile.imwrite(
        planar,
        np.zeros((3, 256, 256), np.uint8),
        tile=(128, 128),
        photometric="rgb",
        planarconfig="separate",
    )
    client.upload_file(str(planar), bucket, "planar.tiff")
    with pytest.raises(SlideOpenError, match="interleaved"):
        open_remote_slide(client, bucket, "planar.tiff")


def test_corrupt_tile_is_a_read_error(s3, fixtures):
    client, bucket = s3
    with (
        open_remote_slide(client, bucket, "fixtures/unreadable.svs") as rem,
        pytest.raises(SlideReadError, match=r"unreadable\.svs: .*tile"),
    ):
        rem.read(0, (0, 0, 16, 16))


def test_user_mpp_is_the_fallback(s3, fixtures):
    client, bucket = s3
    with open_remote_slide(client, bucket, "fixtures/boxes.tiff", mpp=0.25) as rem:
        assert (rem.mpp, rem.mpp_source) == (0.25, "user")  # 72 dpi-style tags are not a scale
    with open_remote_slide(client, bucket, "fixtures/small.svs", mpp=0.25) as rem:
        assert (rem.mpp, rem.mpp_source) == (0.499, "metadata")


def test_job_detect_stage_reads_tiff_in_place_and_stages_the_rest(s3_server, s3, samples, tmp_path):

    import pipeline.job.stage_detect as stage
    from pipeline.job.listing import list_slides
    from pipeline.job.storage import S3Settings, storage_for

    client, bucket = s3
    plain = tmp_path / "plain.tif"  # not a tiled slide: refused remotely, staged, Pillow backend
    tifffile.imwrite(plain, np.full((300, 300, 3), 200, np.uint8), photometric="rgb")
    client.upload_file(str(plain), bucket, "job/plain.tif")
    key, svs = next((k, p) for k, p in samples.items() if k.endswith(".svs"))
    client.upload_file(str(svs), bucket, "job/" + svs.name)
    settings = stage.DetectSettings(
        s3=S3Settings(endpoint=s3_server), mpp=0.5, scratch_dir=str(tmp_path / "scratch")
    )
    prefix = f"s3://{bucket}/job/"
    refs = list_slides(storage_for(prefix, settings.s3), prefix, (".svs", ".tif")).slides
    outcomes = {}
    for ref in refs:
        cells = 0
        for batch in stage.process_slide(ref, settings):
            for rec in stage.records(batch):
                if "status" in rec:
                    outcomes[ref.uri.rsplit("/", 1)[1]] = rec
                else:
                    cells += 1
        assert cells == outcomes[ref.uri.rsplit("/", 1)[1]]["cell_count"]
    svs_row, plain_row = outcomes[svs.name], outcomes["plain.tif"]
    assert svs_row["status"] == "ok" and plain_row["status"] == "ok", outcomes
    assert 0 < svs_row["bytes_read"] < svs_row["slide_bytes"]  # read in place
    assert plain_row["bytes_read"] >= plain_row["slide_bytes"]  # staged whole
    assert svs_row["cell_count"] == len(detect_mod.detect_slide(svs).records)


def test_bodies_broken_off_mid_read_are_retried(s3_server, samples, s3):
    import boto3
    from faultproxy import FaultProxy

    _, bucket = s3
    key, path = next((k, p) for k, p in samples.items() if k.endswith(".svs"))
    proxy = FaultProxy(s3_server).start()
    try:
        client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
        # Headers with the full Content-Length, then part of the body and an RST: botocore does not
        # retry a body, so the reader must; three breaks in a row stay under its attempts.
        rule = proxy.add("truncate", op="ranged_get", path=rf"^/{bucket}/{key}$", first=3)
        with open_slide(path) as loc, open_remote_slide(client, bucket, key) as rem:
            w, h = loc.level_dimensions[-1]
            lv = loc.level_count - 1
            _assert_same_pixels(rem.read(lv, (0, 0, w, h)), loc.read(lv, (0, 0, w, h)), key)
        assert rule.injected == 3
        proxy.clear()
        proxy.add("truncate", op="ranged_get", path=rf"^/{bucket}/{key}$")  # every request: give up
        with pytest.raises(StorageError, match=r"failed after 4 attempts") as err:
            open_remote_slide(client, bucket, key).close()
        assert f"s3://{bucket}/{key}" in str(err.value)
    finally:
        proxy.stop()
