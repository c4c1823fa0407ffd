"""S3 faults under the nightly job, injected by the fault proxy in front of the moto server.

The job is given the proxy as ``s3_endpoint`` (driver and Ray workers alike); its outputs are read
back directly from the S3 server and compared with one clean run of the same archive
(``fault_fixtures.baseline_archive``): same cell ids, each exactly once.

Also here, because they need a real run: S3 credentials never appear in anything the job
produces, and the job writes nothing outside its output prefix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fault_fixtures import (
    all_keys,
    assert_outputs_consistent,
    baseline_archive,
    cell_ids,
    fault_proxy_fixture,  # noqa: F401 - the "fault_proxy" fixture
    read_table,
    run_job_collect,
    visible_parquet_keys,
)

pytestmark = pytest.mark.integration


def _print_stats(name: str, stats: dict) -> None:
    """What a scenario injected (visible with ``pytest -s``; figures in docs/reliability.md)."""
    print(f"\n{name}: requests {dict(sorted(stats['requests'].items()))}")
    for rule, c in stats["rules"].items():
        print(f"  {rule}: {c['injected']} injected / {c['matched']} matched")


#: Recognisable credentials the driver uses throughout this module; the Ray workers use the
#: session's own (``testing-key-id``/``testing-secret-key`` from conftest). Everything the runs
#: produce is kept in PRODUCED and scanned by ``test_credentials_never_leak``.
LEAK_KEY_ID = "AKIAG0LEAKCHECK0DRVR"
LEAK_SECRET = "LeakCheck/Secret+Drv0123456789abcdefghijk"
LEAK_TOKEN = "LeakCheckSessionToken0000"
PRODUCED: dict[str, str] = {}
OUTPUTS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def leak_credentials(s3_server):
    import os

    worker_secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", LEAK_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", LEAK_SECRET)
        mp.setenv("AWS_SESSION_TOKEN", LEAK_TOKEN)
        yield [LEAK_KEY_ID, LEAK_SECRET, LEAK_TOKEN, worker_secret]


@pytest.fixture(scope="module")
def base(s3_server, ray_cluster, tmp_path_factory):
    return baseline_archive(s3_server, tmp_path_factory.mktemp("base"))


def _record(name: str, res=None, lines=None, exc=None, out=None) -> None:
    if res is not None:
        PRODUCED[f"{name}: result"] = repr(res)
    if lines is not None:
        PRODUCED[f"{name}: progress"] = "\n".join(lines)
    if exc is not None:
        PRODUCED[f"{name}: error"] = f"{exc!r} {exc}"
    if out is not None:
        OUTPUTS.append(out)


def _out(bucket: str, name: str) -> str:
    return f"s3://{bucket}/{name}/"


def test_transient_faults_everywhere_are_retried(s3_server, ray_cluster, base, fault_proxy):
    """Resets, 500/503 SlowDown, throttling, truncated bodies and slow answers on listing, slide
    transfer and output writes: the run completes with exactly the clean run's cells."""
    b = base["bucket"]
    arch = rf"^/{b}/archive/"
    outp = rf"^/{b}/out-transient/"
    rules = [
        fault_proxy.add("reset", op="list", first=2, name="list reset"),
        fault_proxy.add("503", op="list", every=3, limit=3, name="list 503 SlowDown"),
        fault_proxy.add("500", op="head", path=arch, first=2, name="slide HEAD 500"),
        fault_proxy.add(
            "truncate", op=("get", "ranged_get"), path=arch, first=2, name="slide GET truncated"
        ),
        fault_proxy.add(
            "503", op=("get", "ranged_get"), path=arch, every=2, name="slide GET 503 SlowDown"
        ),
        fault_proxy.add(
            "reset", op=("get", "ranged_get"), path=arch, every=5, name="slide GET reset"
        ),
        fault_proxy.add(
            "delay",
            op=("get", "ranged_get"),
            path=arch,
            probability=0.3,
            seed=3,
            delay_s=0.3,
            name="slide GET slow 0.3 s",
        ),
        fault_proxy.add("500", op=("put", "multipart"), path=outp, first=2, name="output PUT 500"),
        fault_proxy.add(
            "throttle",
            op=("put", "multipart"),
            path=outp,
            every=3,
            status=429,
            retry_after=0,
            name="output PUT 429 throttle",
        ),
        fault_proxy.add(
            "reset",
            op=("put", "multipart", "delete"),
            path=outp,
            every=4,
            limit=3,
            name="output PUT/DELETE reset",
        ),
    ]
    out = _out(b, "out-transient")
    lines: list[str] = []
    res = run_job_collect(
        lines, input=base["input"], output=out, s3_endpoint=fault_proxy.url, chunk_slides=2
    )
    _record("transient", res, lines, out=out)
    _print_stats("transient faults", fault_proxy.stats())
    assert res.exit_code == 0, res.slides
    assert res.ok == len(base["keys"]) and res.failed == 0
    # Every kind of fault reached the job where it was aimed (the exact split across rules
    # depends on how many requests of each kind the job makes).
    by_target = {"list": 0, "slide": 0, "output": 0}
    for rule in rules:
        by_target[rule.name.split()[0]] += rule.injected
    assert all(n >= 3 for n in by_target.values()), (by_target, fault_proxy.stats())
    for name in ("slide GET truncated", "slide GET 503 SlowDown", "output PUT 429 throttle"):
        assert next(r for r in rules if r.name == name).injected > 0, name
    ids = cell_ids(out, s3_server)
    assert len(ids) == len(set(ids)) and set(ids) == base["cells"]
    assert_outputs_consistent(out, s3_server)


def test_persistent_slide_fault_is_recorded_and_retried_next_run(
    s3_server, ray_cluster, base, fault_proxy
):
    b = base["bucket"]
    bad_key = base["keys"][1]
    bad_uri = f"s3://{b}/{bad_key}"
    rule = fault_proxy.add("500", op=("get", "ranged_get"), path=rf"^/{b}/{re.escape(bad_key)}$")
    out = _out(b, "out-persistent")
    lines: list[str] = []
    res = run_job_collect(
        lines,
        input=base["input"],
        output=out,
        s3_endpoint=fault_proxy.url,
        chunk_slides=2,
        s3_max_attempts=2,
        max_failed_fraction=0.5,
    )
    _record("persistent slide fault", res, lines, out=out)
    _print_stats("persistent slide fault", fault_proxy.stats())
    assert res.exit_code == 0 and res.failed == 1 and res.ok == len(base["keys"]) - 1
    assert rule.injected >= 2  # every attempt of the budget hit the fault
    slides = {r["slide_uri"]: r for r in read_table(out, "slides", s3_server).to_pylist()}
    assert slides[bad_uri]["status"] == "failed"
    reason = slides[bad_uri]["reason"]
    assert bad_uri in reason and "InternalError" in reason and "\n" not in reason
    assert slides[bad_uri]["cell_count"] == 0
    assert read_table(out, "runs", s3_server).column("slides_failed").to_pylist() == [1]
    expected = {c for c in base["cells"]}
    bad_cells = base["per_slide"][bad_uri]
    ids = cell_ids(out, s3_server)
    assert len(ids) == len(set(ids)) == len(expected) - bad_cells
    assert set(ids) <= expected
    assert_outputs_consistent(out, s3_server)
    # The failure was transient for the archive (storage, not the slide's bytes): the next run
    # retries exactly that slide and the outputs then hold every cell once.
    fault_proxy.clear()
    res2 = run_job_collect(
        input=base["input"], output=out, s3_endpoint=fault_proxy.url, chunk_slides=2
    )
    assert res2.exit_code == 0 and res2.ok == 1 and res2.skipped == len(base["keys"]) - 1
    ids = cell_ids(out, s3_server)
    assert len(ids) == len(set(ids)) and set(ids) == expected


def test_persistent_output_write_failure_fails_the_run_and_rerun_completes(
    s3_server, ray_cluster, base, fault_proxy
):
    from pipeline.errors import StorageError

    b = base["bucket"]
    out = _out(b, "out-unwritable-later")
    rule = fault_proxy.add("503", op=("put", "multipart"), path=rf"^/{b}/out-unwritable-later/")
    lines: list[str] = []
    with pytest.raises(StorageError) as err:
        run_job_collect(
            lines,
            input=base["input"],
            output=out,
            s3_endpoint=fault_proxy.url,
            chunk_slides=2,
            s3_max_attempts=2,
        )
    _record("unwritable output", lines=lines, exc=err.value, out=out)
    msg = str(err.value)
    assert (
        msg.startswith(f"s3://{b}/out-unwritable-later/") and "SlowDown" in msg and "\n" not in msg
    )
    assert rule.injected >= 2
    assert visible_parquet_keys(s3_server, b, "out-unwritable-later/") == []
    fault_proxy.clear()
    res = run_job_collect(
        input=base["input"], output=out, s3_endpoint=fault_proxy.url, chunk_slides=2
    )
    assert res.exit_code == 0 and res.ok == len(base["keys"])
    ids = cell_ids(out, s3_server)
    assert len(ids) == len(set(ids)) and set(ids) == base["cells"]
    assert_outputs_consistent(out, s3_server)
    # only the done index (a cache, kept on purpose) may remain of the commit machinery
    assert [
        k
        for k in all_keys(s3_server, b, "out-unwritable-later/")
        if "/_" in k and "/_index/" not in k
    ] == []


def test_missing_output_bucket_is_a_clear_error_before_any_work(
    s3_server, ray_cluster, base, fault_proxy
):
    from pipeline.errors import PipelineError

    lines: list[str] = []
    out = "s3://no-such-bucket-g0/out/"
    with pytest.raises(PipelineError) as err:
        run_job_collect(
            lines, input=base["input"], output=out, s3_endpoint=fault_proxy.url, s3_max_attempts=1
        )
    _record("missing output bucket", lines=lines, exc=err.value)
    assert "no-such-bucket-g0" in str(err.value) and "\n" not in str(err.value)
    # No slide was read: the error came before any work.
    assert fault_proxy.stats()["requests"].get("get", 0) == 0
    assert not any(line.startswith("[") for line in lines)


def test_missing_input_bucket_is_a_clear_error(s3_server, fault_proxy, tmp_path):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError) as err:
        run_job_collect(
            input="s3://no-such-bucket-g1/archive/",
            output=str(tmp_path / "out"),
            s3_endpoint=fault_proxy.url,
            s3_max_attempts=1,
        )
    _record("missing input bucket", exc=err.value)
    assert "s3://no-such-bucket-g1/archive/" in str(err.value) and "NoSuchBucket" in str(err.value)


# --------------------------------------------------------------------------- security (needs a run)


def test_credentials_never_leak(
    s3_server, ray_cluster, base, fault_proxy, leak_credentials, tmp_path, capfd
):
    """Scan everything this module's runs produced (progress lines, results, errors, every object
    they wrote: Parquet incl. ``runs/config_json``, journals), plus a bad-model run, the HTML
    report, a query's output, stdout/stderr and every Ray log of the session."""
    from pipeline.__main__ import main
    from pipeline.errors import PipelineError

    if not OUTPUTS:  # run alone: produce something first (retries and a failing slide)
        b = base["bucket"]
        fault_proxy.add(
            "500", op=("get", "ranged_get"), path=rf"^/{b}/{re.escape(base['keys'][0])}$"
        )
        fault_proxy.add("503", op="list", first=1)
        out = _out(b, "out-leakcheck")
        lines: list[str] = []
        res = run_job_collect(
            lines,
            input=base["input"],
            output=out,
            s3_endpoint=fault_proxy.url,
            chunk_slides=3,
            s3_max_attempts=2,
            max_failed_fraction=0.5,
        )
        _record("leakcheck", res, lines, out=out)
    try:
        run_job_collect(
            input=base["input"],
            output=OUTPUTS[0],
            s3_endpoint=fault_proxy.url,
            s3_max_attempts=1,
            model=str(tmp_path / "no-model"),
        )
    except PipelineError as exc:
        _record("bad model", exc=exc)
    texts = dict(PRODUCED)
    out = OUTPUTS[0]
    report = tmp_path / "report.html"
    assert main(["report", "--output", out, "--out", str(report), "--s3-endpoint", s3_server]) == 0
    texts["report"] = report.read_text(errors="replace")
    assert (
        main(
            [
                "query",
                "SELECT * FROM runs",
                "--output",
                out,
                "--s3-endpoint",
                s3_server,
                "--format",
                "json",
            ]
        )
        == 0
    )
    captured = capfd.readouterr()
    texts["stdout/stderr"] = captured.out + captured.err
    for o in OUTPUTS:
        for row in read_table(o, "runs", s3_server).to_pylist():
            cfg = json.loads(row["config_json"])
            assert not any(re.search("secret|password|token|access_key", k, re.I) for k in cfg), cfg
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    b = base["bucket"]
    for key in all_keys(s3_server, b):
        if not key.startswith("archive/"):
            texts[f"object {key}"] = (
                s3.get_object(Bucket=b, Key=key)["Body"].read().decode("latin-1")
            )
    import ray

    log_dir = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for p in log_dir.rglob("*"):
        if p.is_file() and p.stat().st_size < 50_000_000:
            texts[f"ray log {p.relative_to(log_dir)}"] = p.read_text(errors="replace")
    found = {name: [s for s in leak_credentials if s in text] for name, text in texts.items()}
    found = {k: v for k, v in found.items() if v}
    assert not found, f"credentials leaked into: {found}"
    assert len(texts) > 10 and any(k.startswith("object ") and "/runs/" in k for k in texts)
    print(
        f"\ncredential scan: {len(texts)} texts, {sum(map(len, texts.values())) / 1e6:.1f} MB, no leak"
    )


def test_writes_confined_to_output_prefix(s3_server, base):
    """Everything the runs above wrote into the archive's bucket lies under their output prefixes
    (the archive itself untouched)."""
    b = base["bucket"]
    keys = all_keys(s3_server, b)
    outside = [k for k in keys if not k.startswith(("archive/", "baseline-out/", "out-"))]
    assert outside == []
    assert sorted(k for k in keys if k.startswith("archive/")) == base["keys"]
