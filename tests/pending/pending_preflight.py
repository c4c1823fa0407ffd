"""PENDING (not collected by default): "output location unwritable -> a clear error before any
work starts" (issue 6). ``pipeline/job/run.py`` checks the output only by listing it
(``OutputWriter.recover``), which succeeds on a location that can be listed but not written; the
first write happens at the first chunk commit, after slides were staged, detected and captioned.
Fix: a write probe (put + delete of ``OUTPUT/_probe-<run_id>``) before ``_stream``.
Run with ``pytest tests/pending/pending_preflight.py``.
"""

from __future__ import annotations

import pytest
from fault_fixtures import (
    baseline_archive,
    fault_proxy_fixture,  # noqa: F401 - the "fault_proxy" fixture
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
        run_job_collect(lines, input=base["input"], output=f"s3://{b}/out-denied/",
                        s3_endpoint=fault_proxy.url, s3_max_attempts=1)
    assert f"s3://{b}/out-denied/" in str(err.value) and "AccessDenied" in str(err.value)
    assert fault_proxy.stats()["requests"].get("get", 0) == 0, "slides were read before the error"
    assert not any(line.startswith("[") for line in lines)


def test_unwritable_local_output_fails_before_any_work(s3_server, ray_cluster, tmp_path):
    from pipeline.errors import PipelineError

    base = baseline_archive(s3_server, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    lines: list[str] = []
    with pytest.raises(PipelineError) as err:
        run_job_collect(lines, input=base["input"], output=str(blocker / "out"), s3_endpoint=s3_server)
    assert str(blocker) in str(err.value)
    assert not any(line.startswith("[") for line in lines), "slides were processed before the error"
