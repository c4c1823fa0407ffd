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


@pytest.fixture(scope="module")
def base(s3_server, ray_cluster, tmp_path_factory):
    return baseline_archive(s3_server, tmp_path_factory.mktemp("base"))


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
        fault_proxy.add("truncate", op=("get", "ranged_get"), path=arch, first=2, name="slide GET truncated"),
        fault_proxy.add("503", op=("get", "ranged_get"), path=arch, every=2, name="slide GET 503 SlowDown"),
        fault_proxy.add("reset", op=("get", "ranged_get"), path=arch, every=5, name="slide GET reset"),
        fault_proxy.add("delay", op=("get", "ranged_get"), path=arch, probability=0.3, seed=3,
                        delay_s=0.3, name="slide GET slow 0.3 s"),
        fault_proxy.add("500", op=("put", "multipart"), path=outp, first=2, name="output PUT 500"),
        fault_proxy.add("throttle", op=("put", "multipart"), path=outp, every=3, status=429,
                        retry_after=0, name="output PUT 429 throttle"),
        fault_proxy.add("reset", op=("put", "multipart", "delete"), path=outp, every=4, limit=3,
                        name="output PUT/DELETE reset"),
    ]
    out = _out(b, "out-transient")
    res = run_job_collect(input=base["input"], output=out, s3_endpoint=fault_proxy.url, chunk_slides=2)
    _print_stats("transient faults", fault_proxy.stats())
    assert res.exit_code == 0, res.slides
    assert res.ok == len(base["keys"]) and res.failed == 0
    for rule in rules:
        if rule.name != "slide GET slow 0.3 s" or rule.matched >= 4:
            assert rule.injected > 0, f"rule {rule.name!r} never fired: {fault_proxy.stats()}"
    ids = cell_ids(out, s3_server)
    assert len(ids) == len(set(ids)) and set(ids) == base["cells"]
    assert_outputs_consistent(out, s3_server)


def test_persistent_slide_fault_is_recorded_and_retried_next_run(s3_server, ray_cluster, base, fault_proxy):
    b = base["bucket"]
    bad_key = base["keys"][1]
    bad_uri = f"s3://{b}/{bad_key}"
    rule = fault_proxy.add("500", op=("get", "ranged_get"), path=rf"^/{b}/{re.escape(bad_key)}$")
    out = _out(b, "out-persistent")
    res = run_job_collect(input=base["input"], output=out, s3_endpoint=fault_proxy.url,
                          chunk_slides=2, s3_max_attempts=2, max_failed_fraction=0.5)
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
    res2 = run_job_collect(input=base["input"], output=out, s3_endpoint=fault_proxy.url, chunk_slides=2)
    assert res2.exit_code == 0 and res2.ok == 1 and res2.skipped == len(base["keys"]) - 1
    ids = cell_ids(out, s3_server)
    assert len(ids) == len(set(ids)) and set(ids) == expected


def test_persistent_output_write_failure_fails_the_run_and_rerun_completes(
        s3_server, ray_cluster, base, fault_proxy):
    from pipeline.errors import StorageError

    b = base["bucket"]
    out = _out(b, "out-unwritable-later")
    rule = fault_proxy.add("503", op=("put", "multipart"), path=rf"^/{b}/out-unwritable-later/")
    with pytest.raises(StorageError) as err:
        run_job_collect(input=base["input"], output=out, s3_endpoint=fault_proxy.url, chunk_slides=2,
                        s3_max_attempts=2)
    msg = str(err.value)
    assert msg.startswith(f"s3://{b}/out-unwritable-later/") and "SlowDown" in msg and "\n" not in msg
    assert rule.injected >= 2
    assert visible_parquet_keys(s3_server, b, "out-unwritable-later/") == []
    fault_proxy.clear()
    res = run_job_collect(input=base["input"], output=out, s3_endpoint=fault_proxy.url, chunk_slides=2)
    assert res.exit_code == 0 and res.ok == len(base["keys"])
    ids = cell_ids(out, s3_server)
    assert len(ids) == len(set(ids)) and set(ids) == base["cells"]
    assert_outputs_consistent(out, s3_server)
    assert [k for k in all_keys(s3_server, b, "out-unwritable-later/") if "/_" in k] == []


def test_missing_output_bucket_is_a_clear_error_before_any_work(s3_server, ray_cluster, base, fault_proxy):
    from pipeline.errors import PipelineError

    lines: list[str] = []
    out = "s3://no-such-bucket-g0/out/"
    with pytest.raises(PipelineError) as err:
        run_job_collect(lines, input=base["input"], output=out, s3_endpoint=fault_proxy.url, s3_max_attempts=1)
    assert "no-such-bucket-g0" in str(err.value) and "\n" not in str(err.value)
    # No slide was read: the error came before any work.
    assert fault_proxy.stats()["requests"].get("get", 0) == 0
    assert not any(line.startswith("[") for line in lines)


def test_missing_input_bucket_is_a_clear_error(s3_server, fault_proxy, tmp_path):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError) as err:
        run_job_collect(input="s3://no-such-bucket-g1/archive/", output=str(tmp_path / "out"),
                        s3_endpoint=fault_proxy.url, s3_max_attempts=1)
    assert "s3://no-such-bucket-g1/archive/" in str(err.value) and "NoSuchBucket" in str(err.value)


# --------------------------------------------------------------------------- security (needs a run)

LEAK_KEY_ID = "AKIAG0LEAKCHECK0DRVR"
LEAK_SECRET = "LeakCheck/Secret+Drv0123456789abcdefghijk"


def _leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


def test_credentials_never_leak(s3_server, ray_cluster, base, fault_proxy, monkeypatch, tmp_path, capfd):
    """Recognisable credentials in the driver, the workers' own (the session's), a run with
    retries and a failing slide, a failing run, the report and the query output: scan them all."""
    import os

    worker_secrets = [os.environ.get("AWS_SECRET_ACCESS_KEY", "testing-secret-key")]
    secrets = [LEAK_KEY_ID, LEAK_SECRET, *worker_secrets]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", LEAK_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LEAK_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "LeakCheckSessionToken0000")
    secrets.append("LeakCheckSessionToken0000")
    b = base["bucket"]
    bad_key = base["keys"][0]
    fault_proxy.add("500", op=("get", "ranged_get"), path=rf"^/{b}/{re.escape(bad_key)}$")
    fault_proxy.add("503", op="list", first=1)
    out = _out(b, "out-leakcheck")
    lines: list[str] = []
    res = run_job_collect(lines, input=base["input"], output=out, s3_endpoint=fault_proxy.url,
                          chunk_slides=3, s3_max_attempts=2, max_failed_fraction=0.5)
    assert res.failed == 1
    texts = {"progress lines": "\n".join(lines), "result": repr(res)}
    from pipeline.errors import PipelineError

    for name, kwargs in {
        "failing run (missing bucket)": dict(output="s3://no-such-bucket-g2/out/"),
        "failing run (bad model)": dict(output=out, model=str(tmp_path / "no-model")),
    }.items():
        try:
            run_job_collect(lines, **{"input": base["input"], "output": out,
                                      "s3_endpoint": fault_proxy.url, "s3_max_attempts": 1, **kwargs})
        except PipelineError as exc:
            texts[name] = f"{exc!r} {exc}"
    from pipeline.__main__ import main

    report = tmp_path / "report.html"
    assert main(["report", "--output", out, "--out", str(report), "--s3-endpoint", s3_server]) == 0
    texts["report"] = report.read_text(errors="replace")
    assert main(["query", "SELECT * FROM runs", "--output", out, "--s3-endpoint", s3_server,
                 "--format", "json"]) == 0
    captured = capfd.readouterr()
    texts["stdout/stderr"] = captured.out + captured.err
    runs = read_table(out, "runs", s3_server).to_pylist()
    texts["runs table"] = json.dumps(runs, default=str)
    texts["slides table"] = json.dumps(read_table(out, "slides", s3_server).to_pylist(), default=str)
    cfg = json.loads(runs[0]["config_json"])
    assert not any(re.search("secret|password|token|access_key", k, re.I) for k in cfg), cfg
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for key in all_keys(s3_server, b, "out-leakcheck/"):
        texts[f"object {key}"] = s3.get_object(Bucket=b, Key=key)["Body"].read().decode("latin-1")
    # Ray's logs of this session (driver, raylet, every worker).
    import ray

    log_dir = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for p in log_dir.rglob("*"):
        if p.is_file() and p.stat().st_size < 50_000_000:
            texts[f"ray log {p.name}"] = p.read_text(errors="replace")
    found = {name: _leaks(text, secrets) for name, text in texts.items()}
    found = {k: v for k, v in found.items() if v}
    assert not found, f"credentials leaked into: {found}"
    assert len(texts) > 10


def test_writes_confined_to_output_prefix(s3_server, base):
    """Everything the runs above wrote into the archive's bucket lies under their output prefixes
    (the archive itself untouched)."""
    b = base["bucket"]
    keys = all_keys(s3_server, b)
    outside = [k for k in keys if not k.startswith(("archive/", "baseline-out/", "out-"))]
    assert outside == []
    assert sorted(k for k in keys if k.startswith("archive/")) == base["keys"]

