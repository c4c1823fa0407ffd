"""Bad input to the nightly job: every bad object is recorded with its reason, the rest goes on.

One run over an archive mixing good slides with every kind of bad object (expected behaviour of
each in ``EXPECTED`` and docs/reliability.md), a listing of 10,000 objects (pagination, with
faults between pages), unusable models and malformed config files (clear errors before any work).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from fault_fixtures import (
    _bccd_fields,
    all_keys,
    assert_outputs_consistent,
    fault_proxy_fixture,  # noqa: F401 - the "fault_proxy" fixture
    new_bucket,
    read_table,
    run_job_collect,
    tiny_model,
    upload,
    write_bomb_tiff,
    write_small_slide,
)
from faultproxy import FaultProxy

pytestmark = pytest.mark.integration

#: key under the archive prefix -> (expected status, reason pattern or mpp source)
EXPECTED = {
    "good_a.tiff": ("ok", "metadata"),
    "ünï cödé/good b.tiff": ("ok", "metadata"),  # unicode and spaces in the key
    "x/../dotdot.tiff": ("ok", "metadata"),  # a literal ../ in the key: staged inside scratch
    "no mpp.tiff": ("ok", "estimated"),  # scale estimated from red-cell size
    "jpeg named.svs": ("ok", "estimated"),  # wrong extension: content decides (a JPEG image)
    "fake.svs": ("failed", r"SlideOpenError: .*: not a recognised slide or image format"),
    "empty.tiff": ("failed", r"SlideOpenError: .*: empty file \(0 bytes\)"),
    "truncated.svs": ("failed", r"Slide(Open|Read)Error: .*(truncated|corrupt)"),
    "bomb.tiff": ("failed", r"SlideTooLargeError: .*declared dimensions 200000x200000"),
    "bomb tiled.tif": (
        "failed",
        r"SlideTooLargeError: .*(declared dimensions 1048577x1048577|1048577|65536x65536 px tiles.*decode budget)",
    ),
    "blank no mpp.tiff": ("failed", r"ScaleError: .*no mpp in metadata"),
}
IGNORED = ("notes.txt", "slide named.jpg", ".partial.tiff", "sub/README")


def _bad_objects(tmp: Path) -> dict:
    import numpy as np
    from PIL import Image

    tmp.mkdir(parents=True, exist_ok=True)
    objs: dict = {}
    for i, name in enumerate(["good_a.tiff", "ünï cödé/good b.tiff", "x/../dotdot.tiff"]):
        p = tmp / f"good{i}.tiff"
        write_small_slide(p, i)
        objs[name] = p
    write_small_slide(tmp / "nompp.tiff", 3, mpp=None)
    objs["no mpp.tiff"] = tmp / "nompp.tiff"
    objs["jpeg named.svs"] = _bccd_fields()[5]
    objs["fake.svs"] = b"this is not a slide\n" * 20
    objs["empty.tiff"] = b""
    good = (tmp / "good0.tiff").read_bytes()
    objs["truncated.svs"] = good[: int(len(good) * 0.4)]
    write_bomb_tiff(tmp / "bomb.tiff")
    objs["bomb.tiff"] = tmp / "bomb.tiff"
    write_bomb_tiff(tmp / "bomb2.tiff", side=2**20 + 1, tiled=True)
    objs["bomb tiled.tif"] = tmp / "bomb2.tiff"
    Image.fromarray(np.full((480, 640, 3), 238, np.uint8)).save(tmp / "blank.tiff")
    objs["blank no mpp.tiff"] = tmp / "blank.tiff"
    objs["notes.txt"] = b"lab notes"
    objs["slide named.jpg"] = tmp / "good0.tiff"
    objs[".partial.tiff"] = good[:100]
    objs["sub/README"] = b"readme"
    return objs


@pytest.fixture(scope="module")
def bad_run(s3_server, ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    bucket = new_bucket(s3_server, "bad")
    upload(s3_server, bucket, {f"archive/{k}": v for k, v in _bad_objects(tmp / "objs").items()})
    out = f"s3://{bucket}/out/"
    lines: list[str] = []
    scratch = tmp / "scratch"
    res = run_job_collect(
        lines,
        input=f"s3://{bucket}/archive/",
        output=out,
        s3_endpoint=s3_server,
        model=tiny_model(tmp),
        chunk_slides=4,
        scratch_dir=str(scratch),
    )
    return {
        "bucket": bucket,
        "out": out,
        "result": res,
        "lines": lines,
        "tmp": tmp,
        "scratch": scratch,
    }


def test_every_bad_object_recorded_with_its_reason(bad_run, s3_server):
    res, b = bad_run["result"], bad_run["bucket"]
    slides = {
        r["slide_uri"]: r for r in read_table(bad_run["out"], "slides", s3_server).to_pylist()
    }
    assert res.listed == len(EXPECTED) == len(slides), sorted(slides)
    for key, (status, detail) in EXPECTED.items():
        uri = f"s3://{b}/archive/{key}"
        row = slides[uri]
        assert row["status"] == status, (key, row["reason"])
        if status == "ok":
            assert row["mpp_source"] == detail, (key, row["mpp_source"])
            assert row["reason"] is None
        else:
            reason = row["reason"]
            assert "\n" not in reason and uri in reason, reason
            assert re.search(detail, reason), (key, reason)
            assert row["cell_count"] == 0
    # Progress shows each failure on its own line, naming the object.
    for key, (status, _) in EXPECTED.items():
        if status == "failed":
            assert any("FAILED" in ln and f"archive/{key}" in ln for ln in bad_run["lines"]), key


def test_non_slide_objects_listed_as_ignored(bad_run):
    b = bad_run["bucket"]
    assert sorted(bad_run["result"].ignored) == sorted(f"s3://{b}/archive/{k}" for k in IGNORED)


def test_good_slides_have_cells_and_outputs_consistent(bad_run, s3_server):
    res = bad_run["result"]
    cells = read_table(bad_run["out"], "cells", s3_server)
    per_uri = set(cells.column("slide_uri").to_pylist())
    b = bad_run["bucket"]
    for key, (status, _) in EXPECTED.items():
        assert (f"s3://{b}/archive/{key}" in per_uri) == (status == "ok"), key
    assert res.cells_written == cells.num_rows > 0
    assert_outputs_consistent(bad_run["out"], s3_server)


def test_failed_fraction_over_threshold_sets_exit_code(bad_run, s3_server):
    res = bad_run["result"]
    n_failed = sum(s == "failed" for s, _ in EXPECTED.values())
    assert res.failed == n_failed and res.ok == len(EXPECTED) - n_failed
    assert res.status == "threshold_exceeded" and res.exit_code == 1  # 6/11 failed > 0.1
    run = read_table(bad_run["out"], "runs", s3_server).to_pylist()
    assert [(r["status"], r["slides_failed"], r["slides_ok"]) for r in run] == [
        ("threshold_exceeded", n_failed, len(EXPECTED) - n_failed)
    ]


def test_rerun_skips_everything_settled(bad_run, s3_server):
    """Slides that failed for a reason in their own bytes fail the same way again: the next
    nightly run does not retry them (nor the ok ones) and writes no new cells."""
    b = bad_run["bucket"]
    before = read_table(bad_run["out"], "cells", s3_server).num_rows
    res = run_job_collect(
        input=f"s3://{b}/archive/",
        output=bad_run["out"],
        s3_endpoint=s3_server,
        model=tiny_model(bad_run["tmp"]),
    )
    assert (res.ok, res.failed, res.skipped) == (0, 0, len(EXPECTED))
    assert read_table(bad_run["out"], "cells", s3_server).num_rows == before


def test_archive_untouched_and_scratch_clean(bad_run, s3_server):
    """Only the output prefix was written; every staged copy (good or bad slide, hostile key)
    was removed from scratch, and nothing was staged beside it."""
    b = bad_run["bucket"]
    keys = all_keys(s3_server, b)
    assert all(k.startswith(("archive/", "out/")) for k in keys)
    scratch = bad_run["scratch"]
    assert scratch.is_dir()  # the run did stage into it
    assert [p for p in scratch.rglob("*") if p.is_file()] == []
    assert {p.name for p in bad_run["tmp"].iterdir()} <= {"objs", "scratch", "tiny-model"}


# --------------------------------------------------------------------------- 10,000 objects


_SEEDED_SERVER = """
import logging, sys
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer

logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
backend.create_bucket("big", "us-east-1")
for i in range(10_000):
    backend.put_object("big", f"archive/objects/obj_{i:05d}.json", b"{}")
for i, path in enumerate(sys.argv[1:]):
    backend.put_object("big", f"archive/slides/s{i}.tiff", open(path, "rb").read())
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # serve until the test closes our stdin
server.stop()
"""


@pytest.fixture(scope="module")
def big_archive(s3_server, tmp_path_factory):  # s3_server: sets the dummy credentials
    """A moto S3 server (its own process), seeded through moto's backend API with 10,000 tiny
    non-slide objects and 3 slides: 10,000 HTTP PUTs would take ~45 s on 2 cores."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("big")
    paths = []
    for i in range(3):
        write_small_slide(tmp / f"s{i}.tiff", i)
        paths.append(str(tmp / f"s{i}.tiff"))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SEEDED_SERVER, *paths],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://"), "seeded moto server did not start"
        yield endpoint, tmp
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_listing_10000_objects_paginates_through_faults(big_archive):
    endpoint, tmp = big_archive
    with FaultProxy(endpoint) as proxy:
        rule = proxy.add("reset", op="list", every=4, limit=2)
        throttle = proxy.add("503", op="list", every=7, limit=1)
        res = run_job_collect(
            input="s3://big/archive/",
            output=str(tmp / "out"),
            s3_endpoint=proxy.url,
            model=tiny_model(tmp),
            dry_run=True,
        )
        stats = proxy.stats()
    assert res.listed == 3 and len(res.ignored) == 10_000
    assert sorted(res.would_process) == [f"s3://big/archive/slides/s{i}.tiff" for i in range(3)]
    assert len(set(res.ignored)) == 10_000
    assert rule.injected == 2 and throttle.injected == 1
    assert stats["requests"]["list"] >= 10 + 3  # 10 pages of 1,000 keys, plus the faulted tries


# --------------------------------------------------------------------------- models and config


@pytest.fixture
def small_input(s3_server, tmp_path):
    bucket = new_bucket(s3_server, "mdl")
    write_small_slide(tmp_path / "s.tiff", 0)
    upload(s3_server, bucket, {"archive/s.tiff": tmp_path / "s.tiff"})
    return bucket


def _model_variant(tmp_path: Path, kind: str) -> Path:
    src = Path(tiny_model(tmp_path))
    d = tmp_path / f"model-{kind}"
    shutil.copytree(src, d)
    (d / "model.safetensors").unlink()
    if kind == "pickle":
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(src / "model.safetensors"), d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        ("noweights", r"missing model\.safetensors"),
        ("pickle", r"pickle"),
    ],
)
def test_unusable_model_fails_before_any_work(
    s3_server, small_input, fault_proxy, tmp_path, kind, pattern
):
    from pipeline.errors import ConfigError

    model = _model_variant(tmp_path, kind)
    lines: list[str] = []
    with pytest.raises(ConfigError) as err:
        run_job_collect(
            lines,
            input=f"s3://{small_input}/archive/",
            output=f"s3://{small_input}/out/",
            s3_endpoint=fault_proxy.url,
            model=str(model),
        )
    msg = str(err.value)
    assert "--model" in msg and str(model) in msg and re.search(pattern, msg) and "\n" not in msg
    assert fault_proxy.stats()["requests"].get("get", 0) == 0  # no slide was fetched
    assert [k for k in all_keys(s3_server, small_input) if k.startswith("out/")] == []


def test_unusable_model_cli_exit_code(small_input, s3_server, tmp_path, capsys):
    from pipeline.__main__ import main

    model = _model_variant(tmp_path, "pickle")
    rc = main(
        [
            "run",
            "--input",
            f"s3://{small_input}/archive/",
            "--output",
            str(tmp_path / "out"),
            "--s3-endpoint",
            s3_server,
            "--model",
            str(model),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --model") and "pickle" in err[0]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("input: [unclosed\noutput: x\n", r"--config .*bad\.yaml: line \d+ not valid YAML"),
        ("- just\n- a list\n", r"--config .*bad\.yaml: expected a mapping"),
        ("input: s3://a/b\noutput: /tmp/x\ncaption_batch: 4\n", r"unknown key 'caption_batch'"),
        (
            "input: s3://a/b\noutput: /tmp/x\ncaption_batch_size: many\n",
            r"--caption-batch-size .* must be an integer",
        ),
        (
            "input: s3://a/b\noutput: /tmp/x\nmax_failed_fraction: 2\n",
            r"--max-failed-fraction .* must be (a number )?in \[0, 1\]",
        ),
        ("input: ftp://a/b\noutput: /tmp/x\n", r"--input .*only s3:// URIs and local paths"),
    ],
)
def test_malformed_config_file_is_a_one_line_error(tmp_path, capsys, text, pattern):
    from pipeline.__main__ import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    rc = main(["run", "--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert re.search(pattern, err[0]), err[0]


def test_missing_config_file(tmp_path, capsys):
    from pipeline.__main__ import main

    rc = main(["run", "--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "nope.yaml" in err and "cannot read" in err
