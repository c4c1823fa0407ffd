"""Query outputs stored on a real (moto) S3 server through the pyarrow S3 dataset."""

from __future__ import annotations

import sys
from pathlib import Path

import boto3
import pytest

from pipeline.__main__ import main as cli
from pipeline.query import query_arrow

sys.path.insert(0, str(Path(__file__).parent))
from outputs_fixture import build_outputs  # noqa: E402

pytestmark = pytest.mark.integration


def test_query_outputs_on_s3(s3_server, tmp_path, monkeypatch, capsys):
    fx = build_outputs(tmp_path / "local")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="results")
    for f in fx.root.rglob("*"):
        if f.is_file():  # the debris (_staging, .partial, _tmp-*) goes up too: it must be ignored
            s3.upload_file(str(f), "results", f"nightly/{f.relative_to(fx.root).as_posix()}")
    loc = "s3://results/nightly"
    t = query_arrow(
        loc,
        "SELECT slide_uri, run_date, count(*) AS n FROM cells GROUP BY ALL ORDER BY 1",
        s3_endpoint=s3_server,
    )
    assert t.column("n").to_pylist() == [22, 28, 30]
    assert {str(d) for d in t.column("run_date").to_pylist()} == {"2026-11-27", "2026-11-28"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # the standard variable works too
    failures = query_arrow(loc, "SELECT count(*) AS n FROM slides WHERE status = 'failed'")
    assert failures.to_pylist() == [{"n": sum(s["status"] == "failed" for s in fx.slides)}]
    assert (
        cli(
            [
                "query",
                "SELECT count(*) AS n FROM current_cells",
                "--output",
                loc,
                "--format",
                "json",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == '{"n": 80}'
    assert query_arrow("s3://results/not-there", "SELECT count(*) AS n FROM runs").to_pylist() == [
        {"n": 0}
    ]
