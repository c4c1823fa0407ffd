"""One storage layer: the same S3 settings reach the job's storage, the model mirror and the
outputs readers, with nothing taken from ``AWS_ENDPOINT_URL*`` when settings are given.

Unit tier: the settings type (checks, mapping form) and the one client factory. Integration
tier: the session's moto S3 server, with the endpoint variables removed from the environment, so
that only the explicitly passed settings can find it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError

unit = pytest.mark.unit
integration = pytest.mark.integration

_ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture
def no_endpoint_env(monkeypatch):
    for var in _ENDPOINT_VARS:
        monkeypatch.delenv(var, raising=False)


# -- the settings type --------------------------------------------------------------------------
@unit
@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"endpoint": "http://user:secret@127.0.0.1:9000"}, "credentials"),
        ({"endpoint": "http://127.0.0.1:9000/?X-Amz-Signature=abc"}, "credentials"),
        ({"endpoint": "ftp://127.0.0.1"}, "http(s)://"),
        ({"endpoint": "http://"}, "host"),
        ({"endpoint": "http://127.0.0.1:99999"}, "port"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"transfer_chunk_mb": 10**6}, "transfer_chunk_mb"),
        ({"region": "us east\n1"}, "region"),
    ],
)
def test_settings_refuse_bad_values_naming_them(kwargs, text):
    from pipeline.job.storage import S3Settings

    with pytest.raises(ConfigError) as err:
        S3Settings(**kwargs)
    msg = str(err.value)
    assert text in msg and "\n" not in msg
    assert "secret" not in msg and "abc" not in msg


@unit
def test_settings_mapping_form_round_trips_and_refuses_unknown_keys():
    from pipeline.job.storage import S3Settings, as_s3_settings

    s = S3Settings(endpoint="http://127.0.0.1:9000", max_attempts=3, region="eu-west-1")
    assert s.storage_options() == {
        "endpoint_url": "http://127.0.0.1:9000",
        "region_name": "eu-west-1",
        "max_attempts": 3,
    }
    assert as_s3_settings(s.storage_options()) == s
    assert (
        as_s3_settings(
            {"endpoint": "http://127.0.0.1:9000", "max_attempts": 3, "region": "eu-west-1"}
        )
        == s
    )
    assert as_s3_settings(None) == S3Settings()
    with pytest.raises(ConfigError, match="endpiont"):
        as_s3_settings({"endpiont": "http://127.0.0.1:9000"})  # a typo must not mean "default"
    with pytest.raises(ConfigError, match="contradicts"):
        as_s3_settings({"endpoint": "http://a:1", "endpoint_url": "http://b:1"})


@unit
def test_one_client_factory_serves_every_s3_storage(no_endpoint_env):
    from pipeline.job.storage import S3Settings, s3_client, storage_for

    s = S3Settings(endpoint="http://127.0.0.1:9", max_attempts=2, region="eu-west-1")
    client = s3_client(s)
    assert storage_for("s3://b/x", s).client is client
    assert s3_client(s.storage_options()) is client
    assert (
        client.meta.endpoint_url == "http://127.0.0.1:9" and client.meta.region_name == "eu-west-1"
    )
    # botocore counts max_attempts as retries after the first try
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert s3_client(S3Settings(endpoint="http://127.0.0.1:9", max_attempts=3)) is not client


@unit
def test_model_loading_refuses_bad_storage_options_before_any_io(tmp_path, monkeypatch):
    from hemblip.errors import HemblipConfigError
    from hemblip.model import load_model

    monkeypatch.setenv("HEMBLIP_CACHE", str(tmp_path / "cache"))
    for opts in (
        {"endpiont": "http://127.0.0.1:9"},
        {"endpoint_url": "http://u:p@127.0.0.1:9"},
        {"max_attempts": "five"},
        "http://127.0.0.1:9",
    ):
        with pytest.raises(HemblipConfigError) as err:
            load_model("s3://models/x", storage_options=opts)
        assert "\n" not in str(err.value) and "u:p" not in str(err.value)
    assert not (tmp_path / "cache").exists()


# -- the same settings reach the model mirror and the outputs readers ---------------------------
@integration
def test_model_mirror_uses_the_settings_passed_not_the_environment(
    s3_server, tmp_path, monkeypatch, no_endpoint_env
):
    from fault_fixtures import make_s3_client, new_bucket

    from hemblip.model import build_model, load_model, save_model
    from pipeline.job.storage import S3Settings

    ckpt = tmp_path / "tiny"
    m = build_model("tiny")
    save_model(m.model, m.image_processor, m.tokenizer, ckpt)
    bucket = new_bucket(s3_server, "models")
    client = make_s3_client(s3_server)
    for f in ckpt.iterdir():
        client.upload_file(str(f), bucket, f"tiny/{f.name}")
    monkeypatch.setenv("HEMBLIP_CACHE", str(tmp_path / "cache"))
    settings = S3Settings(endpoint=s3_server, max_attempts=2)
    loaded = load_model(f"s3://{bucket}/tiny", storage_options=settings.storage_options())
    assert loaded.version == load_model(ckpt).version
    # The settings win over the environment: pointed at a port where nothing listens, the load
    # fails although the environment names the live server.
    monkeypatch.setenv("HEMBLIP_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    from hemblip.errors import CheckpointError

    dead = S3Settings(endpoint="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(CheckpointError, match="cannot download"):
        load_model(f"s3://{bucket}/tiny", storage_options=dead.storage_options())
    # Without settings the environment still applies (the standalone hemblip CLI relies on it).
    assert load_model(f"s3://{bucket}/tiny").version == loaded.version


@integration
def test_outputs_readers_use_the_settings_passed(s3_server, tmp_path, no_endpoint_env):
    sys.path.insert(0, str(Path(__file__).parent))
    from fault_fixtures import make_s3_client, new_bucket
    from outputs_fixture import build_outputs

    from pipeline.job.storage import S3Settings
    from pipeline.query import query_arrow

    fx = build_outputs(tmp_path / "local")
    bucket = new_bucket(s3_server, "results")
    client = make_s3_client(s3_server)
    for f in fx.root.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"nightly/{f.relative_to(fx.root).as_posix()}")
    loc = f"s3://{bucket}/nightly"
    sql = "SELECT count(*) AS n FROM cells"
    want = [{"n": len(fx.cells)}]
    assert (
        query_arrow(
            loc, sql, storage_options=S3Settings(endpoint=s3_server, max_attempts=2)
        ).to_pylist()
        == want
    )
    assert query_arrow(loc, sql, storage_options={"endpoint_url": s3_server}).to_pylist() == want
    with pytest.raises(ConfigError, match="contradicts"):
        query_arrow(
            loc, sql, s3_endpoint="http://127.0.0.1:9", storage_options={"endpoint_url": s3_server}
        )
