"""cluster/: every YAML parses, has the pieces the README promises, and every entrypoint (RayJob,
the CronJob's RayJob template, README and launcher commands) parses with the real CLI parser and
yields a valid JobConfig."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.__main__ import build_parser
from pipeline.cli.run import overrides_from
from pipeline.job.config import JobConfig, load_config

pytestmark = pytest.mark.unit

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml")) + sorted(CLUSTER.glob("*.yml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _by_kind(kind: str) -> list[dict]:
    return [d for p in YAMLS for d in _docs(p) if d.get("kind") == kind]


def _rendered_templates() -> list[dict]:
    out = []
    for cm in _by_kind("ConfigMap"):
        for text in cm.get("data", {}).values():
            out.append(yaml.safe_load(text.replace("__DATE__", "2026-01-02")))
    return out


def _parse_entrypoint(cmd: str) -> JobConfig:
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "pipeline"], cmd
    args = build_parser(argv[3]).parse_args(argv[3:])
    assert args.command == "run"
    return load_config(args.config, overrides_from(args))


def test_cluster_dir_has_only_yaml_and_readme():
    names = sorted(p.name for p in CLUSTER.iterdir())
    assert "README.md" in names and len(YAMLS) >= 4
    assert not [n for n in names if n.endswith(".py")]


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_raycluster_has_cpu_and_gpu_groups():
    (rc,) = _by_kind("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu.get("nvidia.com/gpu") == "1" and "nvidia.com/gpu" not in cpu
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def _check_rayjob(job: dict) -> JobConfig:
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    assert spec["jobId"] == job["metadata"]["name"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    groups = {g["groupName"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups == {"cpu-workers", "gpu-workers"}
    return _parse_entrypoint(spec["entrypoint"])


def test_rayjob_entrypoint_parses_with_real_cli():
    (job,) = _by_kind("RayJob")
    cfg = _check_rayjob(job)
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert cfg.caption_gpus_per_actor == 0.5 and cfg.caption_max_actors >= cfg.caption_min_actors


def test_cronjob_creates_one_rayjob_per_date():
    (cron,) = _by_kind("CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    script = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "date -u +%Y-%m-%d" in script and "kubectl create" in script
    (template,) = _rendered_templates()
    assert template["kind"] == "RayJob"
    assert template["metadata"]["name"] == "hemblip-nightly-2026-01-02"
    cfg = _check_rayjob(template)
    assert cfg.run_id == "nightly-2026-01-02"
    # The CronJob mounts the ConfigMap that holds the template.
    vols = spec["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    (cm,) = _by_kind("ConfigMap")
    assert vols[0]["configMap"]["name"] == cm["metadata"]["name"]
    role = _by_kind("Role")[0]
    assert role["rules"][0]["resources"] == ["rayjobs"]


def test_launcher_has_gpu_workers():
    (launcher,) = [d for p in YAMLS for d in _docs(p) if "available_node_types" in d]
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in types.values())


def _commands(text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*#?\s*", " ", text)
    return [
        m.group(1).strip() for m in re.finditer(r"--\s+(python -m pipeline run [^\n`]*)", joined)
    ]


def test_readme_and_launcher_commands_parse():
    cmds = _commands((CLUSTER / "README.md").read_text())
    cmds += _commands((CLUSTER / "launcher-aws-gpu.yaml").read_text())
    assert len(cmds) >= 2
    for cmd in cmds:
        cfg = _parse_entrypoint(cmd)
        assert cfg.model and cfg.model.startswith("s3://")


def test_a_bad_entrypoint_is_caught():
    with pytest.raises(SystemExit):
        _parse_entrypoint(
            "python -m pipeline run --input s3://a/ --output s3://b/ --caption-batch-size many"
        )
