"""Local paths on a multi-node Ray cluster: found up front, refused unless declared shared.

A Ray worker on another node opens paths in *its* node's file system. A local ``--input``,
``--output``, ``--model`` or ``--base`` that only the driver's machine has would otherwise fail
slide by slide (input), leave outputs scattered over the nodes' disks (output), or fail every
caption actor at start-up (model) — long after the run began. :func:`enforce_shared_paths` checks
this right after ``ray.init``: on a cluster of more than one alive node such a path is refused with
a one-line :class:`~pipeline.errors.ConfigError` naming the flag, unless it lies under a prefix the
user declares shared (an NFS/Lustre/EFS mount that every node has). A declared prefix is then
verified: a zero-CPU Ray task pinned to every node stats the path (or its nearest existing
ancestor) and must see the same inode and modification time as the driver; a node that sees
something else, or nothing, means the mount is missing there.

``--scratch-dir`` is per node by design (each worker stages the slides it reads) and is never
refused; a scratch directory under a shared prefix only draws a warning (staging traffic then
crosses the network and the nodes share one directory).

S3 URIs, the bundled demo checkpoint (``--model`` unset) and a Hugging Face hub id as ``--base``
are not local paths and are never findings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pipeline.errors import ConfigError

__all__ = [
    "Finding",
    "FLAGS",
    "alive_nodes",
    "check_shared_paths",
    "enforce_shared_paths",
    "path_fingerprint",
    "probe_on_nodes",
    "raise_for",
]

# Config field -> the CLI flag a user typed (messages name the flag, not the field).
FLAGS: dict[str, str] = {
    "input": "--input",
    "output": "--output",
    "model": "--model",
    "base": "--base",
    "scratch_dir": "--scratch-dir",
}
# Roles a worker on any node must be able to read or write.
_MUST_BE_SHARED = ("input", "output", "model", "base")
# Roles that may also be a Hugging Face hub id ("org/name"), fetched per node and not a path.
_MAY_BE_HUB_ID = ("model", "base")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# (path the driver asked about, nearest existing ancestor, st_ino, st_mtime_ns) or None.
Fingerprint = tuple[str, int, int] | None
Probe = Callable[[Sequence[str], Sequence[Mapping]], dict[str, dict[str, Fingerprint]]]


@dataclass(frozen=True)
class Finding:
    """One problem with one path. ``severity`` is ``"error"`` (the run is refused) or
    ``"warning"`` (the run goes on; the message is printed)."""

    role: str
    flag: str
    path: str
    severity: str
    message: str


def _shown(value: str) -> str:
    """The value on one line: a config value is the user's (or an attacker's) text and may hold
    newlines or terminal escapes that would forge log lines."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)


def _is_local(role: str, value: str) -> bool:
    if value.startswith("file://"):
        return True
    if _URL.match(value):
        return False  # s3:// (and any other scheme the storage layer accepts or refuses itself)
    if role in _MAY_BE_HUB_ID:
        # "Salesforce/blip-image-captioning-base" is a hub id unless the driver has such a path;
        # anything spelled as a path is one.
        spelled_as_path = value.startswith(("/", "./", "../", "~")) or value in (".", "..")
        return spelled_as_path or os.path.exists(value)
    return True


def _local_path(value: str) -> str:
    path = value[len("file://") :] if value.startswith("file://") else value
    return os.path.abspath(os.path.expanduser(path))


def _under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or inside it, by whole components (``/mnt/nfs2`` is not under
    ``/mnt/nfs``); both are normalised, neither is resolved through symlinks on the driver."""
    path, prefix = os.path.normpath(path), os.path.normpath(prefix)
    return path == prefix or path.startswith(prefix.rstrip(os.sep) + os.sep)


def _node_id(node: Mapping) -> str:
    return str(node.get("NodeID") or node.get("node_id") or "?")


def _node_name(node: Mapping) -> str:
    host = node.get("NodeManagerHostname") or node.get("NodeManagerAddress") or "?"
    return f"{host} (node {_node_id(node)[:8]})"


def _alive(nodes: Iterable[Mapping]) -> list[Mapping]:
    return [n for n in nodes if n.get("Alive", n.get("alive", False))]


def path_fingerprint(path: str) -> Fingerprint:
    """``(ancestor, st_ino, st_mtime_ns)`` of ``path`` or, when it does not exist yet (an output
    about to be created), of its nearest existing ancestor; None when nothing on the way exists.
    Two nodes that mount the same file system see the same inode and modification time; two
    look-alike local directories practically never do."""
    current = os.path.abspath(path)
    while True:
        try:
            st = os.stat(current)
        except OSError:
            parent = os.path.dirname(current)
            if parent == current:
                return None
            current = parent
            continue
        return (current, st.st_ino, st.st_mtime_ns)


def _fingerprints(paths: Sequence[str]) -> dict[str, Fingerprint]:
    return {p: path_fingerprint(p) for p in paths}


def alive_nodes() -> list[dict]:
    """The alive nodes of the Ray cluster this process is connected to (``ray.nodes()`` rows)."""
    import ray

    return [dict(n) for n in _alive(ray.nodes())]


def probe_on_nodes(
    paths: Sequence[str], nodes: Sequence[Mapping], timeout_s: float = 60.0
) -> dict[str, dict[str, Fingerprint]]:
    """``{path: {node_id: fingerprint}}`` as each node sees it: one zero-CPU task per node, pinned
    with a hard :class:`NodeAffinitySchedulingStrategy` (zero CPUs, so a busy node answers too).
    A node that does not answer within ``timeout_s`` seconds is missing from the inner dicts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_fingerprints)
    pending = {
        task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(_node_id(n), soft=False)
        ).remote(list(paths)): _node_id(n)
        for n in nodes
    }
    out: dict[str, dict[str, Fingerprint]] = {p: {} for p in paths}
    ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    for ref in ready:
        try:
            seen = ray.get(ref)
        except Exception:  # noqa: BLE001 - a node that cannot run the probe proves nothing
            continue
        for p in paths:
            out[p][pending[ref]] = seen.get(p)
    for ref in not_ready:
        ray.cancel(ref, force=True)
    return out


def check_shared_paths(
    paths: Mapping[str, str | None],
    nodes: Sequence[Mapping],
    *,
    shared_paths: Sequence[str] = (),
    probe: Probe | None = None,
) -> list[Finding]:
    """Findings for the local paths among ``paths`` (role -> URI; roles ``input``, ``output``,
    ``model``, ``base``, ``scratch_dir``; None = unset) on a cluster whose nodes are ``nodes``
    (``ray.nodes()`` rows; only alive ones count).

    One alive node: no findings. More: a local input/output/model/base path is an error unless it
    lies under one of ``shared_paths`` (absolute prefixes the user declares mounted on every node)
    and, when ``probe`` is given, every alive node sees there what the driver sees. A scratch
    directory under a shared prefix is a warning; a local one is fine.
    """
    alive = _alive(nodes)
    if len(alive) <= 1:
        return []
    bad_prefix = [p for p in shared_paths if not isinstance(p, str) or not os.path.isabs(p)]
    if bad_prefix:
        raise ConfigError(
            f"--shared-paths {_shown(str(bad_prefix[0]))}: must be an absolute path (a mount every node has)"
        )
    n = len(alive)
    findings: list[Finding] = []
    to_verify: dict[str, list[str]] = {}  # local path -> roles that use it
    for role, value in paths.items():
        if value is None or value == "" or role not in FLAGS:
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{FLAGS[role]}: expected a path or URI, got {type(value).__name__}")
        if not _is_local(role, value):
            continue
        flag, shown = FLAGS[role], _shown(value)
        path = _local_path(value)
        shared = any(_under(path, prefix) for prefix in shared_paths)
        if role == "scratch_dir":
            if shared:
                findings.append(
                    Finding(
                        role,
                        flag,
                        value,
                        "warning",
                        f"{flag} {shown}: under a declared shared path; every node stages slides into the same network "
                        "directory (a node-local disk is faster)",
                    )
                )
            continue
        if role not in _MUST_BE_SHARED:
            continue
        if not shared:
            findings.append(
                Finding(
                    role,
                    flag,
                    value,
                    "error",
                    f"{flag} {shown}: a local path on a {n}-node Ray cluster; workers on other nodes cannot see the "
                    "driver's files: use an s3:// URI, or a file system every node mounts declared with --shared-paths PREFIX",
                )
            )
            continue
        if not value.startswith(("/", "~", "file://")):
            findings.append(
                Finding(
                    role,
                    flag,
                    value,
                    "error",
                    f"{flag} {shown}: a relative path on a {n}-node Ray cluster; workers resolve it against their own "
                    "working directory: give the absolute path under the shared mount",
                )
            )
            continue
        to_verify.setdefault(path, []).append(role)
    if probe is not None and to_verify:
        findings += _verify(to_verify, paths, alive, probe)
    return findings


def _verify(
    to_verify: dict[str, list[str]],
    values: Mapping[str, str | None],
    alive: Sequence[Mapping],
    probe: Probe,
) -> list[Finding]:
    mine = _fingerprints(list(to_verify))
    seen = probe(list(to_verify), alive)
    out = []
    for path, roles in to_verify.items():
        for node in alive:
            theirs = seen.get(path, {}).get(_node_id(node), "no answer")
            if theirs == mine[path] and mine[path] is not None:
                continue
            why = (
                "did not answer the check"
                if theirs == "no answer"
                else "sees nothing there"
                if theirs is None
                else f"sees a different file system object at {_shown(theirs[0])}"
            )
            for role in roles:
                flag = FLAGS[role]
                out.append(
                    Finding(
                        role,
                        flag,
                        str(values[role]),
                        "error",
                        f"{flag} {_shown(str(values[role]))}: declared shared, but node {_shown(_node_name(node))} {why}; "
                        "mount it on every node (or use an s3:// URI)",
                    )
                )
            break  # one node named per path is enough to act on
    return out


def raise_for(findings: Sequence[Finding], say: Callable[[str], None] | None = None) -> None:
    """Print the warnings through ``say``; raise one :class:`ConfigError` whose one-line message
    holds every error (first the flag the user is most likely to fix first: input, output, ...)."""
    for f in findings:
        if f.severity == "warning" and say is not None:
            say(f"warning: {f.message}")
    errors = [f.message for f in findings if f.severity == "error"]
    if errors:
        raise ConfigError("; ".join(errors))


def enforce_shared_paths(
    cfg,
    say: Callable[[str], None] | None = None,
    *,
    nodes: Sequence[Mapping] | None = None,
    probe: Probe | None = probe_on_nodes,
) -> list[Finding]:
    """Check ``cfg`` (any object with ``input``, ``output``, ``model``, ``base``, ``scratch_dir``
    and optionally ``shared_paths`` attributes) against the connected Ray cluster; call right
    after ``ray.init``. Raises :class:`ConfigError` on an error finding, prints warnings through
    ``say``, returns the findings."""
    nodes = alive_nodes() if nodes is None else nodes
    paths = {role: getattr(cfg, role, None) for role in FLAGS}
    findings = check_shared_paths(
        paths, nodes, shared_paths=tuple(getattr(cfg, "shared_paths", None) or ()), probe=probe
    )
    raise_for(findings, say)
    return findings
