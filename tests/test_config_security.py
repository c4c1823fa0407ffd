"""Issue 11: configuration values are typed and finite before anything starts, and credentials
in URLs are never recorded or forwarded.

* Every ``JobConfig`` field is checked against its declared type (booleans only as real booleans,
  numbers finite and not booleans, ints not floats, strings without control characters, lists of
  strings), then against its declared bounds; YAML and CLI overrides go through the same checks. A bad value
  is one ``ConfigError`` line naming the flag/key; the CLI exits 2 with no traceback and no Ray.
* ``--s3-endpoint http://user:secret@host`` is refused (botocore ignores userinfo in an endpoint
  URL, so the credentials could only leak); so is a forwarded ``AWS_ENDPOINT_URL*`` carrying them.
  ``pipeline._redact`` removes credentials from any text before it is recorded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.job.config import JobConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-Pa55"
unit = pytest.mark.unit


# -- pipeline._redact ------------------------------------------------------------------------
@unit
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:secret@host:9000", "http://***@host:9000"),
        ("http://user:p@ss@host:9000/b/k", "http://***@host:9000/b/k"),  # '@' inside the password
        ("https://us%40er:s%3Acr%2Fet@host/x", "https://***@host/x"),  # percent-encoded
        ("http://user:secret@[::1]:9000/b", "http://***@[::1]:9000/b"),  # IPv6 host
        ("http://user:secret@[fe80::1%25eth0]:9000", "http://***@[fe80::1%25eth0]:9000"),
        ("HTTP://tokenonly@host", "HTTP://***@host"),
        ("ray://admin:pw@head:10001", "ray://***@head:10001"),
        ("http://host:9000", "http://host:9000"),
        ("http://[::1]:9000/b", "http://[::1]:9000/b"),
        (
            "http://host:9000/bucket/user@example.com.svs",
            "http://host:9000/bucket/user@example.com.svs",
        ),
        ("s3://bucket/key@x.svs", "s3://bucket/key@x.svs"),
    ],
)
def test_redact_url_userinfo(url, expected):
    from pipeline._redact import redact_url

    assert redact_url(url) == expected
    assert redact_url(expected) == expected  # idempotent


@unit
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # SigV4 pre-signed URL: credential, signature and session token hidden, the rest kept
        (
            "https://b.s3.amazonaws.com/k.svs?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F20240101"
            "%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600"
            "&X-Amz-Security-Token=FQoGZX&X-Amz-SignedHeaders=host&X-Amz-Signature=0123abcd",
            "https://b.s3.amazonaws.com/k.svs?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
            "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token=***"
            "&X-Amz-SignedHeaders=host&X-Amz-Signature=***",
        ),
        # SigV2 pre-signed URL
        (
            "https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIAX&Expires=1700000000&Signature=abc%2Bdef",
            "https://b.s3.amazonaws.com/k?AWSAccessKeyId=***&Expires=1700000000&Signature=***",
        ),
        ("http://h/p?token=t0k&page=2", "http://h/p?token=***&page=2"),
        ("http://h/?PASSWORD=pw#frag", "http://h/?PASSWORD=***#frag"),
        (
            "http://h/?secret=s;api_key=k;sig=x;access_token=y",
            "http://h/?secret=***;api_key=***;sig=***;access_token=***",
        ),
        ("http://h/?x-amz-security-token=a&x=1", "http://h/?x-amz-security-token=***&x=1"),
        ("http://u:p@h/?sessionKey=v", "http://***@h/?sessionKey=***"),
        ("http://h/?token", "http://h/?token"),  # no value: nothing to hide
        ("http://h/?page=2&sort=asc", "http://h/?page=2&sort=asc"),
    ],
)
def test_redact_url_query(url, expected):
    from pipeline._redact import redact_url

    assert redact_url(url) == expected
    assert redact_url(expected) == expected


@unit
def test_redact_urls_in_text():
    from pipeline._redact import redact_urls_in

    botocore = (
        'Could not connect to the endpoint URL: "http://user:secret@127.0.0.1:9000/bkt?list-type=2"'
    )
    assert (
        redact_urls_in(botocore)
        == 'Could not connect to the endpoint URL: "http://***@127.0.0.1:9000/bkt?list-type=2"'
    )
    several = (
        "copy http://a:one@h1/x?token=two to 'https://b:three@[::1]:443/y' then "
        "<ray://c:four@head:10001>, and s3://bucket/k@v.svs\nnext line http://h/?sig=five"
    )
    out = redact_urls_in(several)
    for secret in ("one", "two", "three", "four", "five"):
        assert secret not in out, out
    assert "s3://bucket/k@v.svs" in out and "\nnext line " in out and "[::1]:443/y'" in out
    plain = "no urls here: user:pass@host is not a URL; a@b; 3 µm"
    assert redact_urls_in(plain) == plain
    assert redact_urls_in("") == ""


# -- JobConfig.to_json_dict / worker_env --------------------------------------------------------
@unit
def test_to_json_dict_redacts_every_url_value():
    cfg = JobConfig(
        input="in",
        output="out",
        ray_address=f"ray://admin:{SECRET}@head:10001",
        scratch_dir="/scratch",
        s3_endpoint="http://127.0.0.1:9000",
    )
    text = json.dumps(cfg.to_json_dict())
    assert SECRET not in text
    assert cfg.to_json_dict()["ray_address"] == "ray://***@head:10001"
    assert cfg.to_json_dict()["s3_endpoint"] == "http://127.0.0.1:9000"
    assert (
        cfg.ray_address.endswith("@head:10001") and SECRET in cfg.ray_address
    )  # the run still uses it


@unit
@pytest.mark.parametrize(
    "endpoint",
    [
        f"http://user:{SECRET}@127.0.0.1:9000",
        f"http://{SECRET}@127.0.0.1:9000",
        f"https://user:p@{SECRET}@minio.local",
        f"http://user:{SECRET}@[::1]:9000/",
        f"http://127.0.0.1:9000/?X-Amz-Security-Token={SECRET}",
    ],
)
def test_endpoint_credentials_are_refused_without_echoing_them(endpoint):
    with pytest.raises(ConfigError) as err:
        JobConfig(input="s3://b/in/", output="s3://b/out/", s3_endpoint=endpoint)
    msg = str(err.value)
    assert msg.startswith("--s3-endpoint") and "\n" not in msg
    assert SECRET not in msg and "credential chain" in msg


@unit
@pytest.mark.parametrize(
    "endpoint",
    [
        "127.0.0.1:9000",
        "ftp://host",
        "http://",
        "http://host:99999",
        "http://host:port",
        "http://ho st",
        "http://host#frag",
    ],
)
def test_malformed_endpoint_is_one_line(endpoint):
    with pytest.raises(ConfigError, match=r"^--s3-endpoint") as err:
        JobConfig(input="s3://b/in/", output="s3://b/out/", s3_endpoint=endpoint)
    assert "\n" not in str(err.value)


@unit
@pytest.mark.parametrize(
    "value",
    [
        f"https://user:{SECRET}@host/x",
        f"s3://user:{SECRET}@bucket/x",
        f"http://host/x?token={SECRET}",
    ],
)
@pytest.mark.parametrize("name", ["input", "output", "model"])
def test_uri_errors_do_not_echo_credentials(name, value):
    kw = {"input": "in", "output": "out", name: value}
    with pytest.raises(ConfigError, match=f"--{name}") as err:
        JobConfig(**kw)
    assert SECRET not in str(err.value)


@unit
def test_worker_env_forwards_the_endpoint_and_the_named_variables():
    cfg = JobConfig(
        input="s3://b/in/",
        output="s3://b/out/",
        s3_endpoint="http://127.0.0.1:9000",
        forward_env=("AWS_REGION", "AWS_PROFILE", "HF_HUB_OFFLINE"),
    )
    environ = {"AWS_REGION": "eu-west-1", "HF_HUB_OFFLINE": "1", "AWS_SECRET_ACCESS_KEY": SECRET}
    assert cfg.worker_env(environ) == {
        "AWS_REGION": "eu-west-1",
        "HF_HUB_OFFLINE": "1",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000",
    }
    no_endpoint = JobConfig(input="s3://b/in/", output="s3://b/out/", forward_env=("AWS_REGION",))
    assert no_endpoint.worker_env(environ) == {"AWS_REGION": "eu-west-1"}


@unit
@pytest.mark.parametrize("name", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
@pytest.mark.parametrize(
    "value",
    [f"http://user:{SECRET}@127.0.0.1:9000", f"https://minio.local/?X-Amz-Signature={SECRET}"],
)
def test_worker_env_refuses_a_forwarded_url_with_credentials(name, value):
    cfg = JobConfig(input="s3://b/in/", output="s3://b/out/")
    with pytest.raises(ConfigError) as err:
        cfg.worker_env({name: value})
    msg = str(err.value)
    assert msg.startswith(name) and "--forward-env" in msg and "\n" not in msg and SECRET not in msg


@unit
def test_run_job_refuses_a_forwarded_endpoint_with_credentials_before_any_work(
    tmp_path, monkeypatch
):
    """run.py builds the workers' environment with ``cfg.worker_env()`` before listing."""
    from pipeline.job import run_job

    (tmp_path / "in").mkdir()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:{SECRET}@127.0.0.1:9")
    cfg = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    lines: list[str] = []
    with pytest.raises(ConfigError, match="^AWS_ENDPOINT_URL") as err:
        run_job(cfg, say=lines.append)
    assert SECRET not in str(err.value) and not lines
    assert not (tmp_path / "out").exists()


@unit
def test_cli_redacts_progress_and_errors(tmp_path, monkeypatch, capsys):
    """Worker failure reasons and storage errors may quote a URL (botocore: ``Could not connect to
    the endpoint URL: "http://user:pw@host/..."``); the CLI prints them redacted."""
    import pipeline.job
    from pipeline.__main__ import main
    from pipeline.errors import StorageError

    quoted = f'Could not connect to the endpoint URL: "http://user:{SECRET}@127.0.0.1:9/b?X-Amz-Signature={SECRET}"'

    def fake_run_job(cfg, say=print):
        say(f"[1/1] FAILED  s3://b/in/a.svs  EndpointConnectionError: {quoted}")
        raise StorageError(f"s3://b/in/: {quoted}")

    monkeypatch.setattr(pipeline.job, "run_job", fake_run_job)
    rc = main(["run", "--input", "s3://b/in/", "--output", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert (
        rc == 2
        and "FAILED  s3://b/in/a.svs" in out
        and err.startswith("error: s3://b/in/: Could not connect")
    )
    assert SECRET not in out + err and "http://***@127.0.0.1:9/b" in out + err


# -- field types, through YAML ---------------------------------------------------------------
_HINTS = typing.get_type_hints(JobConfig)
_BASE = {"input": "in", "output": "out"}


def _wrong_values(name: str) -> list:
    """Values of the wrong type for field ``name``, derived from its declared type."""
    tp = _HINTS[name]
    args = set(typing.get_args(tp)) - {type(None)}
    base = next(iter(args)) if args else tp
    if typing.get_origin(tp) is tuple:
        return [[1, 2], [[".svs"]], {"a": 1}, 5, [None], True]
    if base is bool:
        return ["false", "true", "no", 0, 1, 1.0]
    if base is int:
        return [2.5, True, "7", [1], {"a": 1}, 10**30]
    if base is float:
        return [True, "abc", [1.0], {"a": 1}, float("nan"), float("inf"), float("-inf"), 10**400]
    if base is str:
        return [
            5,
            2.5,
            True,
            ["a"],
            [["a"]],
            {"a": "b"},
            "bad\nvalue",
            "nul\x00byte",
            "x" * 5000 + "\x07",
        ]
    raise AssertionError(f"no wrong values for {name}: {tp}")


def _load_yaml(tmp_path: Path, data: dict) -> JobConfig:
    y = tmp_path / "job.yaml"
    y.write_text(yaml.safe_dump(data))
    return load_config(y)


@unit
@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(JobConfig)])
def test_every_field_rejects_wrong_types_from_yaml(name, tmp_path):
    flag = "--" + name.replace("_", "-")
    for value in _wrong_values(name):
        with pytest.raises(ConfigError) as err:
            _load_yaml(tmp_path, {**_BASE, name: value})
        msg = str(err.value)
        assert msg.startswith(flag) and f"config key {name}" in msg, (value, msg)
        assert "\n" not in msg and len(msg) < 400, (value, msg)


@unit
@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('dry_run: "false"', "dry_run"),
        ("reprocess: 'false'", "reprocess"),
        ("thumbnails: 'off'", "thumbnails"),
        ("input: 5", "input"),
        ("output: [[a, b]]", "output"),
        ("model: {path: x}", "model"),
        ("extensions: [[.svs]]", "extensions"),
        ("extensions: {svs: 1}", "extensions"),
        ("extensions: [.svs, 3]", "extensions"),
        ("forward_env: AWS_REGION AWS_PROFILE", "forward_env"),  # not a list, not a name
        ("forward_env: [A=B]", "forward_env"),
        ("crop_um: .inf", "crop_um"),
        ("detect_cpus: .inf", "detect_cpus"),
        ("caption_cpus_per_actor: .inf", "caption_cpus_per_actor"),
        ("caption_gpus_per_actor: .nan", "caption_gpus_per_actor"),
        ("crop_um: true", "crop_um"),
        ("crop_px: 100000000000000000000", "crop_px"),
        ("chunk_cells: 100000000000000000000", "chunk_cells"),
        ("caption_max_actors: true", "caption_max_actors"),
        ("target_file_mb: true", "target_file_mb"),
        ("target_file_mb: 5000", "target_file_mb"),
        ("transfer_chunk_mb: 1000000000", "transfer_chunk_mb"),
        # typed right but beyond what the detection stage accepts: refused before any slide
        ("crop_um: 1.0e+6", "crop_um"),
        ("crop_px: 8", "crop_px"),
        ("mpp: 1.0e+6", "mpp"),
        ("run_id: " + "x" * 300, "run_id"),
        ("dry_run:", "dry_run"),
    ],
)
def test_yaml_examples_are_one_line_errors(tmp_path, text, key):
    y = tmp_path / "job.yaml"
    y.write_text("input: s3://b/in/\noutput: s3://b/out/\n".replace(f"{key}: ", "# ") + text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(y)
    msg = str(err.value)
    assert msg.startswith("--" + key.replace("_", "-")) and "\n" not in msg, msg


@unit
def test_yaml_integer_too_long_to_parse_is_one_line(tmp_path):
    # PyYAML raises a bare ValueError for an integer beyond Python's 4300-digit conversion limit
    y = tmp_path / "job.yaml"
    y.write_text("input: a\noutput: b\nchunk_slides: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="^--config ") as err:
        load_config(y)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


@unit
def test_real_values_still_load(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text(
        "input: s3://b/in/\noutput: s3://b/out/\ndry_run: false\nreprocess: true\ncrop_um: 36\n"
        "mpp: 0.25\ncaption_cpus_per_actor: -0.0\ncaption_gpus_per_actor: -0.0\n"
        "extensions: [svs, .TIF]\nforward_env: AWS_REGION,HF_HUB_OFFLINE\n"
        "s3_endpoint: http://[::1]:9000\n"
    )
    cfg = load_config(y)
    assert cfg.dry_run is False and cfg.reprocess is True
    assert cfg.crop_um == 36.0 and isinstance(cfg.crop_um, float) and cfg.mpp == 0.25
    # negative zero is zero (Ray and the printed config must not see "-0.0")
    assert (
        math.copysign(1, cfg.caption_cpus_per_actor) == 1
        and math.copysign(1, cfg.caption_gpus_per_actor) == 1
    )
    assert cfg.extensions == (".svs", ".tif") and cfg.forward_env == (
        "AWS_REGION",
        "HF_HUB_OFFLINE",
    )


# -- the same rules for overrides (CLI / API) ----------------------------------------------
@unit
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dry_run", "false"),
        ("reprocess", "no"),
        ("crop_um", float("inf")),
        ("detect_cpus", float("inf")),
        ("mpp", True),
        ("caption_cpus_per_actor", float("inf")),
        ("crop_px", 10**30),
        ("input", 7),
        ("extensions", [".svs", 1]),
        ("forward_env", 3),
    ],
)
def test_overrides_get_the_same_checks(key, value):
    with pytest.raises(ConfigError, match="^--" + key.replace("_", "-")) as err:
        load_config(None, {**_BASE, key: value})
    assert "\n" not in str(err.value)


# -- the CLI: exit 2, one line, no traceback, Ray never imported -----------------------------
def _cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    ray_tmp = tmp_path / "ray-tmp"
    e = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "", **(env or {})}
    # A Ray start creates its session directory under RAY_TMPDIR; no directory, no Ray.
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", *args],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not ray_tmp.exists(), "Ray started"
    return proc


@unit
@pytest.mark.parametrize(
    "text", ['dry_run: "false"', "crop_um: .inf", "input: [[a]]", "detect_cpus: .inf"]
)
def test_cli_bad_yaml_value_exits_2_with_one_line(tmp_path, text):
    key = text.split(":")[0]
    y = tmp_path / "job.yaml"
    y.write_text(
        f"input: {tmp_path}/in\noutput: {tmp_path}/out\n".replace(f"{key}: ", "# ") + text + "\n"
    )
    (tmp_path / "in").mkdir()
    proc = _cli(tmp_path, "--config", str(y))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --" + key.replace("_", "-")), proc.stderr
    assert "Traceback" not in proc.stderr and "ray" not in (proc.stdout + proc.stderr).lower()
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_cli_refuses_endpoint_credentials_before_ray(s3_server, tmp_path):
    """The endpoint is real and reachable: without the refusal the run would list, load the model,
    write ``runs/`` with the secret in ``config_json`` and hand it to Ray's runtime_env."""
    from job_helpers import new_bucket

    bucket = new_bucket(s3_server)
    endpoint = s3_server.replace("http://", f"http://user:{SECRET}@")
    proc = _cli(
        tmp_path,
        "--input",
        f"s3://{bucket}/in/",
        "--output",
        f"s3://{bucket}/out/",
        "--s3-endpoint",
        endpoint,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --s3-endpoint"), out
    assert SECRET not in out and "Traceback" not in out and "ray" not in out.lower()
    import boto3

    listed = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").list_objects_v2(
        Bucket=bucket
    )
    assert listed.get("KeyCount", 0) == 0, "the run wrote to the output before refusing"
