"""Typed configuration of the nightly job: one dataclass, a YAML loader, CLI-over-config merge.

A YAML file holds the same keys as the dataclass fields (``caption_batch_size: 16``; dashes are
accepted for underscores). Flags given on the command line override the file; every check in
``__post_init__`` names the flag (and config key) at fault.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

__all__ = ["JobConfig", "DEFAULT_EXTENSIONS", "DEFAULT_FORWARD_ENV", "load_config", "flag_of"]

#: Object suffixes (lower case) treated as slides. ``.mrxs`` pulls in its data folder and ``.dcm``
#: files are grouped per folder into one DICOM series; add ``.jpg``/``.png`` to treat plain images
#: as slides.
DEFAULT_EXTENSIONS: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
)
#: Non-secret environment variables copied from the driver to every Ray task and actor, so a
#: worker resolves the same S3 endpoint and region as the driver (credentials come from the
#: worker's own chain: instance role, IRSA, mounted profile).
DEFAULT_FORWARD_ENV: tuple[str, ...] = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
)
_FAULT_POINTS = ("after_commit", "after_journal", "mid_publish")


def _looks_secret(name: str) -> bool:
    upper = name.upper()
    return upper in ("AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN") or any(
        word in upper for word in ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
    )


def flag_of(name: str) -> str:
    """``caption_batch_size`` -> ``--caption-batch-size (config key caption_batch_size)``."""
    return f"--{name.replace('_', '-')} (config key {name})"


@dataclass
class JobConfig:
    """Everything one run of ``python -m pipeline run`` needs.

    ``input``/``output``/``model`` are local paths or ``s3://bucket/prefix`` URIs; ``model=None``
    is the bundled demo checkpoint. Sizes: ``crop_um`` µm, ``crop_px``/``thumbnail_px`` px.
    """

    input: str = ""
    output: str = ""
    model: str | None = None
    s3_endpoint: str | None = None
    dry_run: bool = False
    reprocess: bool = False
    retry_failed: bool = False
    max_failed_fraction: float = 0.1
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    # detection stage (per-slide CPU tasks)
    crop_um: float = 36.0
    crop_px: int = 224
    mpp: float | None = None
    detect_cpus: float = 1.0
    #: coarsest pyramid level detection reads, µm/px (None: the level closest to 0.5 µm/px)
    max_detect_mpp: float | None = None
    # caption stage (actor pool)
    caption_batch_size: int = 32
    caption_min_actors: int = 1
    caption_max_actors: int = 1
    caption_gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0 (CPU)
    caption_cpus_per_actor: float = 0.25
    caption_cpu_threads: int | None = None  # torch threads of a CPU actor; None: Ray's (its CPUs)
    # outputs
    chunk_slides: int = 16
    chunk_cells: int = 20000
    thumbnails: bool = True
    thumbnail_px: int = 96
    record_skipped: bool = False
    run_id: str | None = None
    # runtime
    scratch_dir: str | None = None
    ray_address: str | None = None
    forward_env: tuple[str, ...] = DEFAULT_FORWARD_ENV
    s3_max_attempts: int = 5
    transfer_concurrency: int = 4
    transfer_chunk_mb: int = 8
    # test hook: raise in the driver after committing N chunks (env PIPELINE_FAULT_AFTER_CHUNKS)
    fault_after_chunks: int | None = None
    fault_point: str = "after_commit"

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError(f"{flag_of('input')} is required: an s3://bucket/prefix/ or a local directory")
        if not self.output:
            raise ConfigError(f"{flag_of('output')} is required: an s3://bucket/prefix/ or a local directory")
        for name in ("input", "output", "model"):
            value = getattr(self, name)
            if value is not None and value.startswith("s3://") and len(value) <= len("s3://"):
                raise ConfigError(f"{flag_of(name)} {value!r}: missing bucket name")
            if value is not None and "://" in value and not value.startswith("s3://"):
                raise ConfigError(f"{flag_of(name)} {value!r}: only s3:// URIs and local paths are supported")
        self.extensions = tuple(
            e.lower() if e.startswith(".") else "." + e.lower() for e in _as_tuple(self.extensions)
        )
        self.forward_env = _as_tuple(self.forward_env)
        for name in self.forward_env:
            if _looks_secret(name):
                raise ConfigError(
                    f"{flag_of('forward_env')}: {name} looks like a secret; Ray records forwarded "
                    "variables in its logs, so give workers credentials through their own chain "
                    "(instance role, IRSA, mounted profile) instead"
                )
        if not self.extensions:
            raise ConfigError(f"{flag_of('extensions')} must list at least one suffix")
        if not 0.0 <= float(self.max_failed_fraction) <= 1.0:
            raise ConfigError(f"{flag_of('max_failed_fraction')} must be in [0, 1], got {self.max_failed_fraction}")
        positive_int = ("crop_px", "caption_batch_size", "caption_min_actors", "chunk_slides",
                        "chunk_cells", "thumbnail_px", "s3_max_attempts", "transfer_concurrency",
                        "transfer_chunk_mb")
        for name in positive_int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag_of(name)} must be an integer >= 1, got {value!r}")
        if not isinstance(self.caption_max_actors, int) or self.caption_max_actors < self.caption_min_actors:
            raise ConfigError(
                f"{flag_of('caption_max_actors')} must be >= --caption-min-actors "
                f"({self.caption_min_actors}), got {self.caption_max_actors!r}"
            )
        for name in ("crop_um", "detect_cpus"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{flag_of(name)} must be > 0, got {getattr(self, name)!r}")
        if self.mpp is not None and not float(self.mpp) > 0:
            raise ConfigError(f"{flag_of('mpp')} must be > 0 µm/px, got {self.mpp!r}")
        if self.max_detect_mpp is not None:
            from pipeline.detection import DetectorConfig

            try:
                DetectorConfig(max_detect_mpp=self.max_detect_mpp)
            except ConfigError as exc:
                raise ConfigError(f"{flag_of('max_detect_mpp')}: {str(exc).split(': ', 1)[-1]}") from None
        if float(self.caption_cpus_per_actor) < 0:
            raise ConfigError(f"{flag_of('caption_cpus_per_actor')} must be >= 0, got {self.caption_cpus_per_actor!r}")
        if self.caption_gpus_per_actor is not None and float(self.caption_gpus_per_actor) < 0:
            raise ConfigError(f"{flag_of('caption_gpus_per_actor')} must be >= 0, got {self.caption_gpus_per_actor!r}")
        if self.caption_gpus_per_actor is not None and float(self.caption_gpus_per_actor) > 1 and float(self.caption_gpus_per_actor) != int(self.caption_gpus_per_actor):
            raise ConfigError(f"{flag_of('caption_gpus_per_actor')} above 1 must be a whole number, got {self.caption_gpus_per_actor!r}")
        if self.run_id is not None and (not self.run_id or any(c in self.run_id for c in "/\\ ") or self.run_id.startswith(("_", "."))):
            raise ConfigError(f"{flag_of('run_id')} {self.run_id!r}: must be non-empty, without / \\ or spaces, not starting with _ or .")
        if self.caption_cpu_threads is not None and (isinstance(self.caption_cpu_threads, bool) or not isinstance(self.caption_cpu_threads, int) or self.caption_cpu_threads < 1):
            raise ConfigError(f"{flag_of('caption_cpu_threads')} must be an integer >= 1, got {self.caption_cpu_threads!r}")
        if self.fault_after_chunks is not None and (not isinstance(self.fault_after_chunks, int) or self.fault_after_chunks < 0):
            raise ConfigError(f"{flag_of('fault_after_chunks')} must be an integer >= 0, got {self.fault_after_chunks!r}")
        if self.fault_point not in _FAULT_POINTS:
            raise ConfigError(f"{flag_of('fault_point')} must be one of {', '.join(_FAULT_POINTS)}, got {self.fault_point!r}")

    def to_json_dict(self) -> dict[str, Any]:
        """The effective configuration for ``runs/config_json`` (no secrets are ever held here)."""
        out = dataclasses.asdict(self)
        out["extensions"] = list(self.extensions)
        out["forward_env"] = list(self.forward_env)
        return out


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(str(v) for v in value)


_FIELD_NAMES = tuple(f.name for f in fields(JobConfig))


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {p}: cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {p}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping of keys to values, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELD_NAMES:
            raise ConfigError(f"--config {p}: unknown key {key!r}; known keys: {', '.join(_FIELD_NAMES)}")
        out[name] = value
    return out


def load_config(config_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                env: dict[str, str] | None = None) -> JobConfig:
    """Merge defaults < YAML file < ``overrides`` (CLI flags that were given, i.e. not ``None``).

    ``PIPELINE_FAULT_AFTER_CHUNKS`` / ``PIPELINE_FAULT_POINT`` in ``env`` (default ``os.environ``)
    set the fault-injection test hook when the config does not.
    """
    env = os.environ if env is None else env
    data = _read_yaml(config_path) if config_path else {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _FIELD_NAMES:
            raise ConfigError(f"unknown setting {key!r}")
        data[key] = value
    if data.get("fault_after_chunks") is None and env.get("PIPELINE_FAULT_AFTER_CHUNKS"):
        try:
            data["fault_after_chunks"] = int(env["PIPELINE_FAULT_AFTER_CHUNKS"])
        except ValueError:
            raise ConfigError(f"PIPELINE_FAULT_AFTER_CHUNKS must be an integer, got {env['PIPELINE_FAULT_AFTER_CHUNKS']!r}") from None
    if "fault_point" not in data and env.get("PIPELINE_FAULT_POINT"):
        data["fault_point"] = env["PIPELINE_FAULT_POINT"]
    for name in ("max_failed_fraction", "crop_um", "detect_cpus", "caption_cpus_per_actor"):
        if name in data and isinstance(data[name], int | float | str) and not isinstance(data[name], bool):
            data[name] = _to_float(name, data[name])
    for name in ("mpp", "caption_gpus_per_actor", "max_detect_mpp"):
        if data.get(name) is not None:
            data[name] = _to_float(name, data[name])
    return JobConfig(**data)


def _to_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag_of(name)} must be a number, got {value!r}") from None
