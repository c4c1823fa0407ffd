"""Issue 13 item 5: one source of settings.

``JobConfig``'s fields carry their help, default, flag and bounds; the ``run`` flags, the JSON
Schema of the ``--config`` file (``cluster/job-config.schema.json``) and the settings table
(``docs/settings.md``) are generated from them, and these tests fail when a generated file is
stale or when the schema and the checks of ``JobConfig`` disagree. Fault injection is not a
setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.job.config import JobConfig, Setting, load_config, settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "cluster" / "job-config.schema.json"
DOCS_FILE = REPO / "docs" / "settings.md"
EXAMPLE = REPO / "cluster" / "job-config.example.yaml"
_BASE = {"input": "in", "output": "out"}


def _parser() -> argparse.ArgumentParser:
    from pipeline.cli.run import add_arguments

    p = argparse.ArgumentParser(prog="python -m pipeline run")
    add_arguments(p)
    return p


def _load(argv: list[str], config: Path | None = None) -> JobConfig:
    from pipeline.cli.run import overrides_from

    args = _parser().parse_args(argv)
    return load_config(config or args.config, overrides_from(args))


def _validator():
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# -- the source: every field carries its help, group and flag ---------------------------------
def test_every_field_carries_help_group_and_flag():
    by_name = {s.name: s for s in settings()}
    assert list(by_name) == [f.name for f in dataclasses.fields(JobConfig)]
    for s in by_name.values():
        assert isinstance(s, Setting)
        assert s.help and not s.help.endswith(".") and "\n" not in s.help, s.name
        assert "default" not in s.help.lower(), f"{s.name}: the default is generated, not written"
        assert s.flag == "--" + s.name.replace("_", "-") and s.group


def test_run_flags_are_generated_from_the_dataclass():
    parser = _parser()
    dests = {a.dest for a in parser._actions} - {"help", "config"}
    assert dests == {f.name for f in dataclasses.fields(JobConfig)}
    helps = {a.dest: a.help for a in parser._actions}
    for s in settings():
        assert helps[s.name].startswith(s.help.replace("%", "%%")), s.name
    # no help text is written a second time in the CLI module
    source = (REPO / "pipeline" / "cli" / "run.py").read_text()
    for s in settings():
        assert s.help[:40] not in source, s.name


def test_help_shows_every_flag_and_default():
    text = " ".join(_parser().format_help().split())
    for s in settings():
        assert s.flag in text, s.name
    assert "(default: 128; [1, 4096] MiB)" in text and "--no-thumbnails" in text


def _sample(s: Setting):
    """A valid non-default value of setting ``s`` (CLI text, expected value)."""
    if s.kind == "bool":
        return None, not s.default
    if s.kind == "list":
        lists = {"extensions": ".svs,.ndpi", "zones": "monolayer,feathered"}
        return lists.get(s.name, "AWS_REGION,HF_HUB_OFFLINE"), None
    if s.kind == "int":
        v = s.le if s.le is not None and s.le < 10_000 else (s.ge or 0) + 3
        return str(int(v)), int(v)
    if s.kind == "float":
        lo = s.ge if s.ge is not None else s.gt if s.gt is not None else 0.0
        v = s.le if s.le is not None else lo + 2.0
        return repr(float(v)), float(v)
    specials = {"s3_endpoint": "http://127.0.0.1:9000", "run_id": "r-1", "model": "s3://m/x/"}
    v = specials.get(s.name, f"/tmp/{s.name}")
    return v, v


@pytest.mark.parametrize("name", [s.name for s in settings()])
def test_every_flag_reaches_its_field(name):
    s = next(x for x in settings() if x.name == name)
    text, expected = _sample(s)
    base = {"input": "/tmp/in", "output": "/tmp/out"}
    argv = [f"--{k}={v}" for k, v in base.items() if k != name]
    if name == "base":
        argv.append("--model=s3://m/adapter/")
    if name == "caption_min_actors":
        argv.append("--caption-max-actors=4096")
    if s.kind == "bool":
        argv.append(s.flag if expected else "--no-" + s.flag[2:])
    else:
        argv.append(f"{s.flag}={text}")
    cfg = _load(argv)
    got = getattr(cfg, name)
    if s.kind == "list":
        assert got == tuple(text.split(","))
    else:
        assert got == expected and type(got) is type(expected), (got, expected)


def test_flags_override_yaml_both_ways(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("input: a\noutput: b\nreprocess: true\nthumbnails: false\nchunk_slides: 4\n")
    cfg = _load(["--config", str(y), "--no-reprocess", "--thumbnails", "--chunk-slides", "2"])
    assert (cfg.reprocess, cfg.thumbnails, cfg.chunk_slides) == (False, True, 2)
    assert _load(["--config", str(y)]).reprocess is True


def test_list_flags_take_commas_and_repeats():
    cfg = _load(
        [
            "--input=a",
            "--output=b",
            "--extensions",
            "svs,.TIF",
            "--extensions",
            "ndpi",
            "--forward-env",
            "AWS_REGION",
            "--forward-env",
            "HF_HUB_OFFLINE,AWS_PROFILE",
        ]
    )
    assert cfg.extensions == (".svs", ".tif", ".ndpi")
    assert cfg.forward_env == ("AWS_REGION", "HF_HUB_OFFLINE", "AWS_PROFILE")


@pytest.mark.parametrize(
    "argv",
    [
        ["--crop-px", "١٢٠"],  # int() takes Arabic-Indic digits; a setting does not
        ["--crop-px", "1_000"],
        ["--crop-px", "2.5"],
        ["--crop-um", "nan"],
        ["--crop-um", "inf"],
        ["--crop-um", "0x10"],
        ["--chunk-cells", "9" * 40],
    ],
)
def test_cli_numbers_are_plain_ascii(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["--input=a", "--output=b", *argv])
    assert exit_.value.code == 2
    assert argv[0] in capsys.readouterr().err


# -- target_file_mb (for the distributed writer) -----------------------------------------------
def test_target_file_mb():
    assert JobConfig(**_BASE).target_file_mb == 128
    assert _load(["--input=a", "--output=b", "--target-file-mb", "512"]).target_file_mb == 512
    for bad in (0, 4097, -1):
        with pytest.raises(ConfigError, match=r"^--target-file-mb \(config key target_file_mb\)"):
            JobConfig(**_BASE, target_file_mb=bad)


# -- fault injection is not a setting ----------------------------------------------------------
def test_fault_hooks_are_not_settings(tmp_path, monkeypatch, capsys):
    names = {f.name for f in dataclasses.fields(JobConfig)}
    assert not [n for n in names if n.startswith("fault")]
    monkeypatch.setenv("PIPELINE_FAULT_AFTER_CHUNKS", "1")
    monkeypatch.setenv("PIPELINE_FAULT_POINT", "mid_publish")
    assert "fault" not in json.dumps(load_config(None, dict(_BASE)).to_json_dict())
    with pytest.raises(SystemExit):
        _parser().parse_args(["--input=a", "--output=b", "--fault-after-chunks", "1"])
    y = tmp_path / "job.yaml"
    y.write_text("input: a\noutput: b\nfault_point: mid_publish\n")
    with pytest.raises(ConfigError, match="unknown key 'fault_point'"):
        load_config(y)


# -- YAML keys --------------------------------------------------------------------------------
def test_a_key_given_twice_with_dash_and_underscore_is_refused(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("input: a\noutput: b\nchunk_slides: 4\nchunk-slides: 8\n")
    with pytest.raises(ConfigError, match="chunk.slides.*twice") as err:
        load_config(y)
    assert str(err.value).startswith(f"--config {y}") and "\n" not in str(err.value)


# -- the generated files are up to date -------------------------------------------------------
def test_schema_file_is_up_to_date():
    from pipeline.job.settings_docs import json_schema_text

    assert SCHEMA_FILE.read_text() == json_schema_text(), (
        "regenerate with: python -m pipeline config-docs"
    )


def test_docs_file_is_up_to_date():
    from pipeline.job.settings_docs import settings_markdown

    assert DOCS_FILE.read_text() == settings_markdown(), (
        "regenerate with: python -m pipeline config-docs"
    )
    for s in settings():
        assert f"| `{s.name}` | `{s.flag}" in DOCS_FILE.read_text(), s.name


def test_config_docs_command_writes_and_checks(tmp_path, capsys):
    from pipeline.__main__ import main

    (tmp_path / "cluster").mkdir()
    (tmp_path / "docs").mkdir()
    assert main(["config-docs", "--root", str(tmp_path), "--check"]) == 1
    assert "docs/settings.md" in capsys.readouterr().err
    assert main(["config-docs", "--root", str(tmp_path)]) == 0
    assert (tmp_path / "docs" / "settings.md").read_text() == DOCS_FILE.read_text()
    assert (tmp_path / "cluster" / "job-config.schema.json").read_text() == SCHEMA_FILE.read_text()
    assert main(["config-docs", "--root", str(tmp_path), "--check"]) == 0
    (tmp_path / "docs" / "settings.md").write_text("edited by hand\n")
    assert main(["config-docs", "--root", str(tmp_path), "--check"]) == 1


# -- the schema and the checks agree ----------------------------------------------------------
def _bound_cases(s: Setting):
    """(value, valid) pairs at and just beyond each bound of a numeric setting."""
    step = 1 if s.kind == "int" else 1e-6
    cast = int if s.kind == "int" else float
    out = []
    if s.ge is not None:
        out += [(cast(s.ge), True), (cast(s.ge - step), False)]
    if s.gt is not None:
        out += [(cast(s.gt), False), (cast(s.gt + (step if s.kind == "int" else 1e-3)), True)]
    if s.le is not None:
        out += [(cast(s.le), True), (cast(s.le + step), False)]
    return out


_NUMERIC = [s.name for s in settings() if s.kind in ("int", "float")]


@pytest.mark.parametrize("name", _NUMERIC)
def test_schema_bounds_agree_with_the_checks(name):
    s = next(x for x in settings() if x.name == name)
    cases = _bound_cases(s)
    assert cases, f"{name}: a number without bounds"
    validator = _validator()
    for value, valid in cases:
        extra = {"caption_max_actors": max(value, 1)} if name == "caption_min_actors" else {}
        schema_ok = validator.is_valid({name: value})
        try:
            JobConfig(**_BASE, **extra, **{name: value})
            checks_ok = True
        except ConfigError as exc:
            checks_ok = False
            assert str(exc).startswith(s.flag), str(exc)
        assert schema_ok == checks_ok == valid, (name, value, schema_ok, checks_ok)


_HINTS = typing.get_type_hints(JobConfig)


@pytest.mark.parametrize("name", [s.name for s in settings()])
def test_schema_refuses_what_the_loader_refuses_by_type(name, tmp_path):
    s = next(x for x in settings() if x.name == name)
    wrong = {
        "bool": ["false", 0, 1.0, None],
        "int": [2.5, True, "7", [1], None],
        "float": [True, "abc", [1.0], {"a": 1}, -math.inf],
        "str": [5, True, ["a"], {"a": "b"}, "bad\nvalue", "nul\x00"],
        "list": [[1], [[".svs"]], {"a": 1}, 5, True],
    }[s.kind]
    if s.optional:
        wrong = [w for w in wrong if w is not None]
    validator = _validator()
    y = tmp_path / "job.yaml"
    for value in wrong:
        assert not validator.is_valid({name: value}), (name, value)
        y.write_text(yaml.safe_dump({**_BASE, name: value}))
        with pytest.raises(ConfigError, match="^" + s.flag):
            load_config(y)


def test_dashed_keys_are_in_the_schema_too():
    validator = _validator()
    assert validator.is_valid({"caption-batch-size": 8})
    assert not validator.is_valid({"caption-batch-size": 0})
    assert not validator.is_valid({"batchsize": 3})


def test_example_config_is_valid_for_the_schema_and_the_loader():
    data = yaml.safe_load(EXAMPLE.read_text())
    errors = [e.message for e in _validator().iter_errors(data)]
    assert not errors, errors
    cfg = load_config(EXAMPLE)
    assert cfg.input.startswith("s3://") and cfg.target_file_mb == data["target_file_mb"]
    assert EXAMPLE.read_text().startswith("# yaml-language-server: $schema=job-config.schema.json")


# -- settings objects are built by keyword, from every relevant field ---------------------------
def test_stage_settings_are_built_by_keyword():
    from pipeline.job.plan import CaptionSettings
    from pipeline.job.stage_detect import DetectSettings
    from pipeline.job.storage import S3Settings

    cfg = JobConfig(
        input="s3://b/in/",
        output="s3://b/out/",
        model="s3://m/a/",
        base="/m/base",
        s3_endpoint="http://127.0.0.1:9000",
        s3_max_attempts=7,
        transfer_concurrency=3,
        transfer_chunk_mb=16,
        scratch_dir="/scratch",
        crop_um=40.0,
        crop_px=128,
        mpp=0.3,
        thumbnails=False,
        thumbnail_px=64,
        max_detect_mpp=1.1,
        candidate_mpp=2.0,
        max_slide_attempts=2,
        max_decode_mb=512.0,
        zones=("auto",),
        zone_min_area_mm2=5.0,
        region_task_mpx=16,
        region_tasks_in_flight=2,
        detect_cpus=0.5,
        max_cells_per_slide=200,
        caption_batch_size=9,
        caption_min_actors=2,
        caption_max_actors=5,
        caption_gpus_per_actor=0.5,
        caption_cpus_per_actor=0.75,
        caption_cpu_threads=3,
    )
    s3 = cfg.s3_settings()
    assert s3 == S3Settings(
        endpoint="http://127.0.0.1:9000",
        max_attempts=7,
        transfer_concurrency=3,
        transfer_chunk_mb=16,
    )
    detect = cfg.detect_settings()
    assert detect == DetectSettings(
        s3=s3,
        scratch_dir="/scratch",
        crop_um=40.0,
        crop_px=128,
        mpp=0.3,
        thumbnails=False,
        thumbnail_px=64,
        max_detect_mpp=1.1,
        candidate_mpp=2.0,
        max_slide_attempts=2,
        max_decode_mb=512.0,
        zones=("monolayer",),
        zone_min_area_mm2=5.0,
        region_task_px=16_000_000,
        region_tasks_in_flight=2,
        region_task_cpus=0.5,
        max_cells=200,
    )
    caption = cfg.caption_settings("v1", gpus_per_actor=0.5)
    assert caption == CaptionSettings(
        model="s3://m/a/",
        model_version="v1",
        batch_size=9,
        min_actors=2,
        max_actors=5,
        gpus_per_actor=0.5,
        cpus_per_actor=0.75,
        cpu_threads=3,
        base="/m/base",
    )
    # every field of the settings objects is set from the config (none left at its default),
    # except what the job leaves to each node's environment on purpose
    from_environment = {"region"}  # AWS_REGION / AWS_DEFAULT_REGION, forwarded (--forward-env)
    for obj, default in (
        (detect, DetectSettings(s3=S3Settings())),
        (s3, S3Settings()),
        (caption, CaptionSettings(None, None)),
    ):
        same = [
            f.name
            for f in dataclasses.fields(obj)
            if getattr(obj, f.name) == getattr(default, f.name) and f.name not in from_environment
        ]
        assert not same, (type(obj).__name__, same)
