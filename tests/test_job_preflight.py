"""Output pre-flight (issue 6): an output location that can be listed but not written fails with
a one-line error naming OUTPUT and the cause before any slide is read, staged or processed.

``OutputWriter.probe`` (write + delete of ``OUTPUT/_probe/<run_id>.probe``) runs after recovery
and before the stream; ``--dry-run`` writes nothing, so it skips the probe.
"""

from __future__ import annotations

import os

import pytest
from fault_fixtures import (
    baseline_archive,
    fault_proxy_fixture,  # noqa: F401 - the "fault_proxy" fixture
    make_s3_client,
    run_job_collect,
)

pytestmark = pytest.mark.integration


def test_unwritable_s3_output_fails_before_any_work(s3_server, ray_cluster, fault_proxy, tmp_path):
    from pipeline.errors import PipelineError

    base = baseline_archive(s3_server, tmp_path)
    b = base["bucket"]
    fault_proxy.add("403", op=("put", "multipart"), path=rf"^/{b}/out-denied/")
    lines: list[str] = []
    with pytest.raises(PipelineError) as err:
        run_job_collect(
            lines,
            input=base["input"],
            output=f"s3://{b}/out-denied/",
            s3_endpoint=fault_proxy.url,
            s3_max_attempts=1,
        )
    assert f"s3://{b}/out-denied/" in str(err.value) and "AccessDenied" in str(err.value)
    assert "\n" not in str(err.value)
    assert fault_proxy.stats()["requests"].get("get", 0) == 0, "slides were read before the error"
    assert not any(line.startswith("[") for line in lines)


def test_unwritable_local_output_fails_before_any_work(s3_server, ray_cluster, tmp_path):
    from pipeline.errors import PipelineError

    base = baseline_archive(s3_server, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    lines: list[str] = []
    with pytest.raises(PipelineError) as err:
        run_job_collect(
            lines, input=base["input"], output=str(blocker / "out"), s3_endpoint=s3_server
        )
    assert str(blocker) in str(err.value)
    assert not any(line.startswith("[") for line in lines), "slides were processed before the error"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_local_output_fails_before_any_work(s3_server, ray_cluster, tmp_path):
    from pipeline.errors import PipelineError

    base = baseline_archive(s3_server, tmp_path)
    out = tmp_path / "read-only-out"
    out.mkdir()
    out.chmod(0o555)
    lines: list[str] = []
    try:
        with pytest.raises(PipelineError, match="not writable") as err:
            run_job_collect(lines, input=base["input"], output=str(out), s3_endpoint=s3_server)
    finally:
        out.chmod(0o755)
    assert str(out) in str(err.value)
    assert not any(line.startswith("[") for line in lines)


def test_missing_bucket_fails_before_any_work(s3_server, ray_cluster, tmp_path):
    from pipeline.errors import PipelineError

    base = baseline_archive(s3_server, tmp_path)
    lines: list[str] = []
    with pytest.raises(PipelineError) as err:
        run_job_collect(
            lines,
            input=base["input"],
            output="s3://no-such-bucket-preflight/out/",
            s3_endpoint=s3_server,
            s3_max_attempts=1,
        )
    assert "s3://no-such-bucket-preflight/out/" in str(err.value) and "NoSuchBucket" in str(
        err.value
    )
    assert not any(line.startswith("[") for line in lines)


def test_dry_run_skips_the_probe_and_a_real_run_leaves_none(s3_server, tmp_path):
    base = baseline_archive(s3_server, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    res = run_job_collect(
        input=base["input"], output=str(blocker / "out"), s3_endpoint=s3_server, dry_run=True
    )
    assert res.status == "dry_run" and len(res.would_process) == len(base["keys"])
    # The baseline run probed its output: nothing of the probe is left behind.
    listed = make_s3_client(s3_server).list_objects_v2(
        Bucket=base["bucket"], Prefix="baseline-out/"
    )
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert keys and not any("/_probe/" in k for k in keys)
