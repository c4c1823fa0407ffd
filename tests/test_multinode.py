"""Multi-node: local paths refused up front, and the job on a two-node Ray cluster (two raylets on
this machine, tests/multinode_fixtures.py) S3 to S3, exactly once, also when the worker node is
lost mid-run.

The unit tests drive :func:`pipeline.job.cluster_paths.check_shared_paths` with ``ray.nodes()``
rows and, for the verification of a declared shared path, a probe answer table: a node that sees
another file system cannot be made on one machine. The integration tests run the job and the
check as subprocess drivers of the two-node cluster (this process may hold the session Ray).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from job_helpers import expected_cell_ids, job_config, new_bucket, put, read_table
from multinode_fixtures import two_node_cluster_fixture, two_nodes_fixture  # noqa: F401

from pipeline.errors import ConfigError
from pipeline.job.cluster_paths import (
    check_shared_paths,
    enforce_shared_paths,
    path_fingerprint,
    raise_for,
)


def _node(i: int, alive: bool = True) -> dict:
    return {"NodeID": f"{i:02d}" * 28, "Alive": alive, "NodeManagerHostname": f"host{i}"}


TWO = [_node(1), _node(2)]


def _errors(findings):
    return [f for f in findings if f.severity == "error"]


# ---------------------------------------------------------------- unit: the decision


@pytest.mark.unit
@pytest.mark.parametrize(
    "nodes", [[], [_node(1)], [_node(1), _node(2, alive=False)]], ids=["none", "one", "one-alive"]
)
def test_one_alive_node_has_no_findings(nodes, tmp_path):
    paths = {
        "input": str(tmp_path),
        "output": str(tmp_path / "out"),
        "model": str(tmp_path),
        "base": None,
    }
    assert check_shared_paths(paths, nodes) == []


@pytest.mark.unit
@pytest.mark.parametrize(
    "role,flag",
    [("input", "--input"), ("output", "--output"), ("model", "--model"), ("base", "--base")],
)
def test_local_path_on_two_nodes_is_refused_naming_the_flag(role, flag, tmp_path):
    findings = check_shared_paths({role: str(tmp_path)}, TWO)
    assert [(f.role, f.flag, f.severity) for f in findings] == [(role, flag, "error")]
    msg = findings[0].message
    assert msg.startswith(f"{flag} {tmp_path}: ") and "\n" not in msg
    assert (
        "2-node" in msg
        and "other nodes cannot see the driver's files" in msg
        and "--shared-paths" in msg
    )


@pytest.mark.unit
@pytest.mark.parametrize("value", ["relative/out", "./out", "file:///data/out", "~/out"])
def test_every_spelling_of_a_local_output_is_local(value):
    assert [f.flag for f in _errors(check_shared_paths({"output": value}, TWO))] == ["--output"]


@pytest.mark.unit
def test_remote_and_bundled_paths_are_fine_on_many_nodes():
    paths = {
        "input": "s3://b/slides/",
        "output": "s3://b/out/",
        "model": None,
        "base": "Salesforce/blip-image-captioning-base",
        "scratch_dir": "/tmp/scratch",
    }
    assert check_shared_paths(paths, TWO) == []
    assert (
        check_shared_paths(
            {"model": "s3://b/models/demo/", "base": "s3://b/base/"}, TWO + [_node(3)]
        )
        == []
    )


@pytest.mark.unit
def test_model_spelled_as_path_is_local_even_if_missing_on_the_driver():
    assert [
        f.flag for f in check_shared_paths({"model": "/models/missing", "base": "./base"}, TWO)
    ] == ["--model", "--base"]


@pytest.mark.unit
def test_declared_shared_prefix_matches_whole_components(tmp_path):
    shared = str(tmp_path / "nfs")
    ok = check_shared_paths(
        {"output": f"{shared}/out", "input": shared}, TWO, shared_paths=[shared]
    )
    assert ok == []
    sibling = check_shared_paths({"output": f"{shared}2/out"}, TWO, shared_paths=[shared])
    assert [f.flag for f in sibling] == ["--output"]
    # ".." cannot climb out of a declared prefix
    escaped = check_shared_paths({"output": f"{shared}/../elsewhere"}, TWO, shared_paths=[shared])
    assert [f.flag for f in escaped] == ["--output"]


@pytest.mark.unit
def test_relative_path_under_a_shared_prefix_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    findings = check_shared_paths({"input": "slides"}, TWO, shared_paths=[str(tmp_path)])
    assert [f.flag for f in findings] == ["--input"] and "relative path" in findings[0].message


@pytest.mark.unit
@pytest.mark.parametrize("prefix", ["nfs", "", "./mnt"])
def test_shared_prefix_must_be_absolute(prefix):
    with pytest.raises(ConfigError, match=r"^--shared-paths .*absolute"):
        check_shared_paths({"output": "/mnt/out"}, TWO, shared_paths=[prefix])


@pytest.mark.unit
def test_scratch_dir_is_per_node_and_only_warned_about_when_shared(tmp_path):
    assert check_shared_paths({"scratch_dir": str(tmp_path)}, TWO) == []
    findings = check_shared_paths(
        {"scratch_dir": str(tmp_path / "s")}, TWO, shared_paths=[str(tmp_path)]
    )
    assert [(f.flag, f.severity) for f in findings] == [("--scratch-dir", "warning")]


@pytest.mark.unit
@pytest.mark.parametrize(
    "value", ["/data/out\nrun x: ok; 0 failed", "/data/\x1b[2Jout", "/data/out\r"]
)
def test_hostile_path_is_shown_on_one_line(value):
    [finding] = check_shared_paths({"output": value}, TWO)
    assert (
        "\n" not in finding.message
        and "\r" not in finding.message
        and "\x1b" not in finding.message
    )
    with pytest.raises(ConfigError) as err:
        raise_for([finding])
    assert "\n" not in str(err.value)


@pytest.mark.unit
def test_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^--output: expected a path or URI, got list"):
        check_shared_paths({"output": ["/a"]}, TWO)


@pytest.mark.unit
def test_declared_shared_path_is_verified_on_every_node(tmp_path):
    shared = tmp_path / "nfs"
    (shared / "slides").mkdir(parents=True)
    paths = {"input": str(shared / "slides"), "output": str(shared / "out")}
    here = {p: path_fingerprint(p) for p in (paths["input"], paths["output"])}

    def probe_with(answers):
        def probe(asked, nodes):
            assert sorted(asked) == sorted(here) and [n["NodeID"] for n in nodes] == [
                n["NodeID"] for n in TWO
            ]
            return {p: {n["NodeID"]: answers(n, p) for n in nodes} for p in asked}

        return probe

    same = probe_with(lambda n, p: here[p])
    assert check_shared_paths(paths, TWO, shared_paths=[str(shared)], probe=same) == []
    # node 2 has a look-alike local directory (other inode), sees nothing, or does not answer
    for answers, why in [
        (
            lambda n, p: here[p] if n is TWO[0] else (here[p][0], here[p][1] + 1, here[p][2]),
            "sees a different file system object",
        ),
        (lambda n, p: here[p] if n is TWO[0] else None, "sees nothing there"),
    ]:
        findings = check_shared_paths(
            paths, TWO, shared_paths=[str(shared)], probe=probe_with(answers)
        )
        assert sorted(f.flag for f in findings) == ["--input", "--output"]
        assert all(
            why in f.message and "host2" in f.message and "declared shared" in f.message
            for f in findings
        )

    def silent(asked, nodes):
        return {p: {TWO[0]["NodeID"]: here[p]} for p in asked}

    findings = check_shared_paths(paths, TWO, shared_paths=[str(shared)], probe=silent)
    assert findings and all("did not answer" in f.message for f in findings)


@pytest.mark.unit
def test_fingerprint_of_a_path_to_be_created_is_its_nearest_ancestor(tmp_path):
    fp = path_fingerprint(str(tmp_path / "out" / "cells"))
    st = tmp_path.stat()
    assert fp == (str(tmp_path), st.st_ino, st.st_mtime_ns)


@pytest.mark.unit
def test_enforce_raises_one_line_with_every_error_and_prints_warnings(tmp_path):
    said = []
    cfg = types.SimpleNamespace(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        model=None,
        base=None,
        scratch_dir=str(tmp_path / "s"),
        shared_paths=None,
    )
    with pytest.raises(ConfigError) as err:
        enforce_shared_paths(cfg, said.append, nodes=TWO, probe=None)
    text = str(err.value)
    assert "\n" not in text and text.startswith("--input ") and "; --output " in text
    cfg.shared_paths = [str(tmp_path)]
    assert [f.severity for f in enforce_shared_paths(cfg, said.append, nodes=TWO, probe=None)] == [
        "warning"
    ]
    assert said == [
        f"warning: --scratch-dir {tmp_path / 's'}: under a declared shared path; every node stages "
        "slides into the same network directory (a node-local disk is faster)"
    ]
    assert enforce_shared_paths(cfg, said.append, nodes=TWO[:1], probe=None) == []


# ---------------------------------------------------------------- integration: two raylets


_CHECK = """
import json, sys, types, ray
from pipeline.errors import ConfigError
from pipeline.job.cluster_paths import alive_nodes, enforce_shared_paths, path_fingerprint, probe_on_nodes
ray.init(address=sys.argv[1], log_to_driver=False)
out, shared = sys.argv[2], sys.argv[3]
nodes = alive_nodes()
res = {"nodes": [n["NodeID"] for n in nodes]}
cfg = types.SimpleNamespace(input="s3://b/slides/", output=out, model=None, base=None, scratch_dir="/tmp")
try:
    enforce_shared_paths(cfg)
    res["refused"] = None
except ConfigError as exc:
    res["refused"] = str(exc)
cfg.shared_paths = [shared]
res["declared"] = [f.message for f in enforce_shared_paths(cfg)]
seen = probe_on_nodes([out], nodes)[out]
res["probe"] = {k: list(v) if v else None for k, v in seen.items()}
res["here"] = list(path_fingerprint(out))
print(json.dumps(res))
"""


def _job_cmd(nodes, endpoint: str, bucket: str, output: str | None = None) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        "--ray-address",
        nodes.address,
        "--input",
        f"s3://{bucket}/slides/",
        "--output",
        output or f"s3://{bucket}/out/",
        "--s3-endpoint",
        endpoint,
        "--caption-batch-size",
        "8",
        "--thumbnail-px",
        "48",
        "--chunk-slides",
        "2",
        # 0.75 CPU: a node holding the caption actor (0.25) still fits one detect task, so with
        # one CPU per node both nodes detect at once.
        "--detect-cpus",
        "0.75",
    ]
    if os.environ.get("JOB_TEST_MODEL"):
        cmd += ["--model", os.environ["JOB_TEST_MODEL"]]
    return cmd


def _run_job(nodes, cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=nodes.env, capture_output=True, text=True, timeout=timeout)


def _seed(endpoint: str, samples, copies: int = 1) -> tuple[str, dict[str, Path]]:
    """A bucket with ``copies`` copies of each sample slide under ``slides/``; ``{name: local}``."""
    bucket, local = new_bucket(endpoint), {}
    for c in range(copies):
        for s in samples:
            name = f"c{c}_{s.path.name}"
            put(endpoint, bucket, "slides/" + name, s.path)
            local[name] = s.path
    return bucket, local


def _assert_exactly_once(cfg, expected: dict[str, set[str]]) -> None:
    """Every slide has exactly one ok row; the committed cells are exactly the expected ones, each once."""
    slides = read_table(cfg, "slides").to_pylist()
    ok = [r["slide_uri"] for r in slides if r["status"] == "ok"]
    assert sorted(ok) == sorted(expected), [
        (r["slide_uri"], r["status"], r.get("reason")) for r in slides
    ]
    cells = read_table(cfg, "cells")
    ids = cells.column("cell_id").to_pylist()
    assert len(ids) == len(set(ids)), "a cell was committed twice"
    got: dict[str, set[str]] = {}
    for uri, cid in zip(cells.column("slide_uri").to_pylist(), ids):
        got.setdefault(uri, set()).add(cid)
    assert got == expected


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from pipeline.samples import build_sample_slides

    return build_sample_slides(tmp_path_factory.mktemp("multinode-samples"))


@pytest.mark.integration
def test_local_output_is_refused_on_the_live_two_node_cluster(two_nodes, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    out = str(shared / "out")
    done = subprocess.run(
        [sys.executable, "-c", _CHECK, two_nodes.address, out, str(shared)],
        env=two_nodes.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(res["nodes"]) == 2
    assert res["refused"] == (
        f"--output {out}: a local path on a 2-node Ray cluster; workers on other nodes cannot "
        "see the driver's files: use an s3:// URI, or a file system every node mounts declared "
        "with --shared-paths PREFIX"
    )
    # Declared shared: both raylets of this machine see the same directory, so the pinned probes
    # (one per node, both answered) agree with the driver and nothing is refused.
    assert res["declared"] == []
    assert sorted(res["probe"]) == sorted(res["nodes"])
    assert all(v == res["here"] for v in res["probe"].values())


@pytest.mark.integration
def test_cli_refuses_local_output_on_two_nodes(two_nodes, s3_server, samples, tmp_path):
    bucket, _ = _seed(s3_server, samples[:1])
    done = _run_job(two_nodes, _job_cmd(two_nodes, s3_server, bucket, output=str(tmp_path / "out")))
    last = [line for line in done.stderr.splitlines() if line.strip()][-1:]
    assert done.returncode != 0 and last, done.stdout[-2000:]
    assert "--output" in last[0] and "other nodes cannot see the driver's files" in last[0], (
        done.stderr[-2000:]
    )
    assert not (tmp_path / "out" / "cells").exists()


@pytest.mark.integration
def test_job_runs_s3_to_s3_on_two_nodes_exactly_once(two_nodes, s3_server, samples):
    bucket, local = _seed(s3_server, samples, copies=1)
    cfg = job_config(s3_server, bucket)
    expected = expected_cell_ids(cfg, local)
    t0 = time.monotonic()
    done = _run_job(two_nodes, _job_cmd(two_nodes, s3_server, bucket))
    print(f"two-node S3->S3 job: {time.monotonic() - t0:.1f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{len(local)} ok, 0 failed" in done.stdout, done.stdout[-3000:]
    _assert_exactly_once(cfg, expected)
    # The worker node (not the driver's) ran detection: Ray logs each task a worker starts.
    assert "MapBatches(detect_batch)" in two_nodes.task_log_names(two_nodes.worker_dir)


@pytest.mark.integration
def test_exactly_once_after_the_worker_node_is_killed_mid_run(
    two_nodes, s3_server, samples, tmp_path
):
    bucket, local = _seed(s3_server, samples, copies=2)
    cfg = job_config(s3_server, bucket)
    expected = expected_cell_ids(cfg, local)
    worker = two_nodes.worker_dir
    log = tmp_path / "run1.log"
    with open(log, "w") as sink:
        job = subprocess.Popen(
            _job_cmd(two_nodes, s3_server, bucket),
            env=two_nodes.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            # Kill the worker node the moment it works on slides: a detect task, or the caption actor
            # once constructed (killed in its constructor or as the idle AttemptLedger, no rows are
            # in flight: that tests less).
            busy: list[str] = []
            while job.poll() is None and not busy:
                busy = [
                    t
                    for t in two_nodes.busy_titles(worker)
                    if "MapBatches(" in t and not t.endswith(".__init__")
                ]
                time.sleep(0.05)
            assert busy, (
                "the job finished before the worker node got any work:\n" + log.read_text()[-3000:]
            )
            killed = two_nodes.kill_node(worker)
            running_at_kill = job.poll() is None
            first_rc = job.wait(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
    first = log.read_text()
    print(
        f"killed {killed} processes of the worker node while it ran {busy}; first run exit {first_rc}"
    )
    assert running_at_kill, first[-3000:]
    reruns = []
    slides = read_table(cfg, "slides")
    ok = (
        set()
        if slides is None
        else {r["slide_uri"] for r in slides.to_pylist() if r["status"] == "ok"}
    )
    if first_rc != 0 or ok != set(expected):
        # The run failed or recorded slides failed: a re-run on the surviving head completes them.
        again = _run_job(two_nodes, _job_cmd(two_nodes, s3_server, bucket))
        reruns.append(again.returncode)
        assert again.returncode == 0, first[-2000:] + again.stdout[-3000:] + again.stderr[-2000:]
    print(f"re-runs needed: {reruns}")
    _assert_exactly_once(cfg, expected)
