"""A two-node Ray cluster on this one machine: two raylets started with ``ray start``.

``from multinode_fixtures import two_node_cluster_fixture, two_nodes_fixture  # noqa: F401`` makes
the fixture ``two_nodes`` available in a test module. It yields a :class:`RayNodes` whose head and worker node each have
their own ``--temp-dir`` and free ports, token authentication (``RAY_AUTH_MODE=token``, so no
other local user can run code on it) and small CPU counts; the worker node carries the custom
resource ``multinode_worker``. Everything a node runs has its temp dir in its command line or
descends from such a process, so one node can be killed (SIGKILL, as a lost machine) without
``ray stop``, which would stop every Ray process of the user on the machine (other test sessions,
the session ``ray_cluster`` of conftest). The cluster is module-scoped; before each test the
fixture makes sure a worker node is alive again (a test may have killed it).

The test process never connects to this cluster (it may already hold the session ``ray_cluster``):
jobs and checks run as subprocesses with ``env`` and ``address``.

Skipped with the reason when two raylets cannot be started here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

__all__ = [
    "RayNodes",
    "two_node_cluster_fixture",
    "two_nodes_fixture",
    "WORKER_RESOURCE",
    "node_processes",
]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
WORKER_RESOURCE = "multinode_worker"
# Agents and other per-node services: present on an idle node, so they do not mean "busy".
_SERVICE_TITLES = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")

_NODES_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps([{k: n.get(k) for k in ("NodeID", "Alive", "NodeManagerHostname", "RayletSocketName", "Resources")}
                  for n in ray.nodes()]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports(*flags: str) -> list[str]:
    # Every port chosen free: the defaults (client server 10001, dashboard 8265, agent 52365) are
    # taken by the session's in-process cluster, another test's head, or the other node.
    out: list[str] = []
    for flag in flags:
        out += [flag, str(_free_port())]
    return out


def _mentions(arg: str, marker: str) -> bool:
    # Whole marker only: "/tmp/rmnhAB12" must not match "/tmp/rmnhAB12x", nor ":5775" ":57751".
    return re.search(re.escape(marker) + r"(?=$|[/\s,])", arg) is not None


def node_processes(*markers: str) -> list[psutil.Process]:
    """Every process with one of ``markers`` (a node's temp dir; the head's ``--address=...``,
    which the Ray client server has instead) in an argument of its command line, and their
    descendants (the workers and agents a raylet starts); never this process or its ancestors."""
    mine = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            args = p.info["cmdline"] or []
            if p.pid not in mine and any(_mentions(arg, m) for m in markers for arg in args):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    procs = {p.pid: p for p in roots}
    for p in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in p.children(recursive=True):
                procs[c.pid] = c
    return [p for pid, p in procs.items() if pid not in mine]


def _kill(procs: list[psutil.Process], graceful: bool) -> None:
    if graceful:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        _, procs = psutil.wait_procs(procs, timeout=3)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=15)


class RayNodes:
    """A head and worker nodes started with ``ray start`` on this machine; see the module doc."""

    def __init__(self, base_env: dict[str, str]):
        self.env = dict(base_env)
        self.address: str | None = None
        self.head_dir: str | None = None
        self.worker_dirs: list[str] = []  # alive or killed; all removed at the end

    def _start(self, args: list[str], temp_dir: str) -> str:
        cmd = [
            RAY,
            "start",
            *args,
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
            "--object-store-memory",
            str(100 * 1024 * 1024),
        ]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(
                f"ray start failed ({done.returncode}): {done.stdout[-1500:]} {done.stderr[-1500:]}"
            )
        return done.stdout + done.stderr

    def start_head(self, num_cpus: float = 1) -> None:
        # Short paths: Ray's Unix socket paths are length-limited.
        self.head_dir = tempfile.mkdtemp(prefix="rmnh", dir="/tmp")
        port = _free_port()
        self._start(
            [
                "--head",
                "--port",
                str(port),
                "--num-cpus",
                str(num_cpus),
                "--include-dashboard",
                "false",
                *_ports(
                    "--ray-client-server-port",
                    "--node-manager-port",
                    "--object-manager-port",
                    "--dashboard-port",
                    "--dashboard-agent-listen-port",
                    "--dashboard-agent-grpc-port",
                    "--runtime-env-agent-port",
                    "--metrics-export-port",
                ),
            ],
            self.head_dir,
        )
        # `ray start` prints the address others join with (the node's own IP, not 127.0.0.1).
        addr_file = Path(self.head_dir) / "ray_current_cluster"
        self.address = addr_file.read_text().strip() if addr_file.is_file() else f"127.0.0.1:{port}"

    def start_worker(self, num_cpus: float = 1) -> str:
        temp_dir = tempfile.mkdtemp(prefix="rmnw", dir="/tmp")
        self.worker_dirs.append(temp_dir)
        self._start(
            [
                "--address",
                self.address,
                "--num-cpus",
                str(num_cpus),
                "--resources",
                json.dumps({WORKER_RESOURCE: 1}),
                *_ports(
                    "--node-manager-port",
                    "--object-manager-port",
                    "--dashboard-agent-listen-port",
                    "--dashboard-agent-grpc-port",
                    "--runtime-env-agent-port",
                    "--metrics-export-port",
                ),
            ],
            temp_dir,
        )
        return temp_dir

    @property
    def worker_dir(self) -> str:
        """Temp dir of the newest worker node."""
        return self.worker_dirs[-1]

    def nodes(self) -> list[dict]:
        """``ray.nodes()`` as a fresh driver subprocess sees it (this process stays unconnected)."""
        done = subprocess.run(
            [sys.executable, "-c", _NODES_SCRIPT, self.address],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def alive_workers(self) -> list[dict]:
        return [
            n for n in self.nodes() if n["Alive"] and WORKER_RESOURCE in (n.get("Resources") or {})
        ]

    def worker_alive(self) -> bool:
        """The newest worker node's raylet process is running (cheap; no driver)."""
        return bool(self.worker_dirs) and any(
            "raylet" in " ".join(p.cmdline()[:1])
            for p in node_processes(self.worker_dir)
            if p.is_running()
        )

    def busy_titles(self, temp_dir: str) -> list[str]:
        """Process titles of the tasks/actors the node ``temp_dir`` runs now (Ray sets a worker's
        title to ``ray::<task or actor>`` while it executes, ``ray::IDLE`` otherwise)."""
        titles = []
        for p in node_processes(temp_dir):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                cmd = p.cmdline()
                title = cmd[0] if cmd else ""
                if title.startswith("ray::") and not title.startswith(_SERVICE_TITLES):
                    titles.append(title)
        return titles

    def kill_node(self, temp_dir: str) -> int:
        """SIGKILL every process of the node ``temp_dir`` (raylet, object store, agents, workers), as
        when its machine is lost. Returns how many processes were killed."""
        procs = node_processes(temp_dir)
        _kill(procs, graceful=False)
        return len(procs)

    def task_log_names(self, temp_dir: str) -> set[str]:
        """Task and actor names the node ``temp_dir`` ran, from the ``:task_name:``/``:actor_name:``
        lines Ray writes into each worker's log when it starts one."""
        names = set()
        for log in Path(temp_dir).glob("session_*/logs/worker-*.out"):
            with contextlib.suppress(OSError):
                for line in log.read_text(errors="replace").splitlines():
                    if line.startswith((":task_name:", ":actor_name:")):
                        names.add(line.split(":", 2)[2].strip())
        return names

    def stop(self) -> None:
        for d in reversed(self.worker_dirs):
            _kill(node_processes(d), graceful=True)
        if self.head_dir:
            _kill(node_processes(self.head_dir, f"--address={self.address}"), graceful=True)
        for d in [*self.worker_dirs, self.head_dir]:
            if d:
                shutil.rmtree(d, ignore_errors=True)


def _base_env() -> dict[str, str]:
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        # A lost node is declared dead after ~2 s instead of Ray's default ~15-30 s.
        RAY_health_check_period_ms="500",
        RAY_health_check_failure_threshold="4",
        RAY_health_check_timeout_ms="1000",
        RAY_health_check_initial_delay_ms="1000",
    )
    # The jobs get --ray-address and --s3-endpoint; nothing must point them elsewhere.
    for key in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(key, None)
    return env


@pytest.fixture(name="two_node_cluster", scope="module")
def two_node_cluster_fixture(s3_server):
    # After s3_server: the nodes' workers inherit its dummy credentials at start-up.
    nodes = RayNodes(_base_env())
    try:
        try:
            nodes.start_head(num_cpus=1)
            nodes.start_worker(num_cpus=1)
            alive = [n for n in nodes.nodes() if n["Alive"]]
        except (RuntimeError, subprocess.TimeoutExpired, AssertionError, OSError) as exc:
            pytest.skip(f"cannot start a two-raylet Ray cluster on this machine: {str(exc)[:300]}")
        if len(alive) != 2:
            pytest.skip(
                f"cannot start a two-raylet Ray cluster on this machine: {len(alive)} alive nodes"
            )
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(name="two_nodes")
def two_nodes_fixture(two_node_cluster):
    """The module's two-node cluster, with a live worker node (a new one if a test killed it)."""
    nodes = two_node_cluster
    if not nodes.worker_alive():
        nodes.start_worker(num_cpus=1)
        deadline = time.monotonic() + 60
        while len(nodes.alive_workers()) != 1 and time.monotonic() < deadline:
            time.sleep(1)
    return nodes
