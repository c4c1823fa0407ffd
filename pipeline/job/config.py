"""Typed configuration of the nightly job: one dataclass, a YAML loader, CLI-over-config merge.

A YAML file holds the same keys as the dataclass fields (``caption_batch_size: 16``; dashes are
accepted for underscores). Flags given on the command line override the file; every check in
``__post_init__`` names the flag (and config key) at fault.

Every value, whichever way it came (YAML, CLI override, API, ``PIPELINE_FAULT_*``), is checked
against the field's declared type before anything runs: booleans only as real booleans (the
string ``"false"`` is refused, not truthy), numbers finite and never booleans, integers never
floats (numbers may also be given as decimal strings, ``"0.75"``), strings without control
characters, lists as lists of strings or one comma-separated string. The check is driven by the
dataclass's type hints, so a new field is covered by adding it. Credentials never enter a URL
setting: ``--s3-endpoint`` with ``user:password@`` is refused (S3 clients ignore them; see
:meth:`JobConfig.worker_env`), and :meth:`JobConfig.to_json_dict` redacts any that remain.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline._redact import has_credentials, redact_urls_in
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
#: Largest integer any setting takes (fits a C int, a numpy int32 and Ray's resource counts).
_INT_MAX = 2**31 - 1
#: Tighter upper bounds where an integer sizes memory, threads or requests.
_INT_LIMITS = {
    "crop_px": 4096,  # the detection stage's own limit
    "thumbnail_px": 4096,
    "caption_batch_size": 65536,
    "caption_cpu_threads": 4096,
    "s3_max_attempts": 100,
    "transfer_concurrency": 1024,
    "transfer_chunk_mb": 5120,  # S3's largest part, 5 GiB
    "max_slide_attempts": 100,
}
# C0/C1 controls and Unicode line breaks: a value holding one would split a log line or an error.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_CHAIN = ("give credentials through the standard AWS credential chain (AWS_ACCESS_KEY_ID/"
          "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance role, IRSA)")


def _looks_secret(name: str) -> bool:
    upper = name.upper()
    return upper in ("AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN") or any(
        word in upper for word in ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
    )


def flag_of(name: str) -> str:
    """``caption_batch_size`` -> ``--caption-batch-size (config key caption_batch_size)``."""
    return f"--{name.replace('_', '-')} (config key {name})"


def _show(value: Any, limit: int = 120) -> str:
    """A value for an error message: its type, a short repr, credentials removed, one line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    text = redact_urls_in(text)
    return text if isinstance(value, str | type(None)) else f"{type(value).__name__} {text}"


@dataclass
class JobConfig:
    """Everything one run of ``python -m pipeline run`` needs.

    ``input``/``output``/``model`` are local paths or ``s3://bucket/prefix`` URIs; ``model=None``
    is the bundled demo checkpoint. ``base``: for a LoRA adapter ``model``, the base model to use
    instead of the one the adapter names (e.g. a local copy of a hub base). Sizes: ``crop_um`` µm, ``crop_px``/``thumbnail_px`` px.
    """

    input: str = ""
    output: str = ""
    model: str | None = None
    base: str | None = None
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
    #: memory budget of any one decode (whole plain image, tile, read box), MiB, checked from the
    #: header before decoding: a decompression bomb fails as its slide instead of killing workers
    max_decode_mb: float = 1024.0
    #: worker deaths (OOM kill, signal, crash) on one slide before it is recorded failed
    max_slide_attempts: int = 3
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
    #: a run's lease on OUTPUT expires this many seconds after its last renewal (renewed every
    #: third of it); a second run refuses while the lease is live and takes over a stale one
    lease_ttl_s: float = 600.0
    # test hook: raise in the driver after committing N chunks (env PIPELINE_FAULT_AFTER_CHUNKS)
    fault_after_chunks: int | None = None
    fault_point: str = "after_commit"

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), _HINTS[f.name]))
        if not self.input:
            raise ConfigError(f"{flag_of('input')} is required: an s3://bucket/prefix/ or a local directory")
        if not self.output:
            raise ConfigError(f"{flag_of('output')} is required: an s3://bucket/prefix/ or a local directory")
        for name in ("input", "output", "model", "base"):
            value = getattr(self, name)
            if value is not None and value.startswith("s3://") and len(value) <= len("s3://"):
                raise ConfigError(f"{flag_of(name)} {_show(value)}: missing bucket name")
            if value is not None and "://" in value and not value.startswith("s3://"):
                raise ConfigError(f"{flag_of(name)} {_show(value)}: only s3:// URIs and local paths are supported")
            if value is not None and value.startswith("s3://") and "@" in value[5:].split("/", 1)[0]:
                raise ConfigError(f"{flag_of(name)} {_show(value)}: an s3:// URI cannot carry credentials; {_CHAIN}")
        if self.base is not None and self.model is None:
            raise ConfigError(f"{flag_of('base')} names the base of a LoRA adapter given with --model; "
                              "the bundled demo checkpoint has no base")
        if self.s3_endpoint is not None:
            _check_endpoint(self.s3_endpoint)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in self.extensions)
        for ext in self.extensions:
            if ext == "." or any(c in ext for c in "/\\ \t"):
                raise ConfigError(f"{flag_of('extensions')} {_show(ext)}: not a file suffix")
        for name in self.forward_env:
            if not _ENV_NAME.fullmatch(name):
                raise ConfigError(f"{flag_of('forward_env')} {_show(name)}: not an environment variable name")
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
                        "transfer_chunk_mb", "max_slide_attempts")
        for name in positive_int:
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{flag_of(name)} must be an integer >= 1, got {value!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            limit = _INT_LIMITS.get(f.name, _INT_MAX)
            if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                raise ConfigError(f"{flag_of(f.name)} must be at most {limit}, got {_show(value, 40)}")
        if self.caption_max_actors < self.caption_min_actors:
            raise ConfigError(
                f"{flag_of('caption_max_actors')} must be >= --caption-min-actors "
                f"({self.caption_min_actors}), got {self.caption_max_actors!r}"
            )
        for name in ("crop_um", "detect_cpus"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{flag_of(name)} must be > 0, got {getattr(self, name)!r}")
        if self.mpp is not None and not float(self.mpp) > 0:
            raise ConfigError(f"{flag_of('mpp')} must be > 0 µm/px, got {self.mpp!r}")
        if not 16.0 <= self.max_decode_mb <= 1024.0 * 1024:
            raise ConfigError(f"{flag_of('max_decode_mb')} must be in [16, 1048576] MiB, got {self.max_decode_mb!r}")
        if not 0.0 < self.lease_ttl_s <= 86400.0:
            raise ConfigError(f"{flag_of('lease_ttl_s')} must be in (0, 86400] seconds, got {self.lease_ttl_s!r}")
        from pipeline.detect import DetectConfig

        try:  # the detection stage's own limits (crop_um <= 500, crop_px >= 16...), before any slide
            DetectConfig(crop_um=self.crop_um, crop_px=self.crop_px, mpp=self.mpp)
        except ConfigError as exc:
            m = re.match(r"DetectConfig\.(\w+) \([^)]*\): (.*)", str(exc))
            name, why = (m.group(1), m.group(2)) if m and m.group(1) in _FIELD_NAMES else ("crop_um", str(exc))
            raise ConfigError(f"{flag_of(name)} {why}") from None
        if len(self.run_id or "") > 128:  # a path component of every output file
            raise ConfigError(f"{flag_of('run_id')} must be at most 128 characters, got {len(self.run_id)}")
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
            raise ConfigError(f"{flag_of('run_id')} {_show(self.run_id)}: must be non-empty, without / \\ or spaces, not starting with _ or .")
        if self.caption_cpu_threads is not None and self.caption_cpu_threads < 1:
            raise ConfigError(f"{flag_of('caption_cpu_threads')} must be an integer >= 1, got {self.caption_cpu_threads!r}")
        if self.fault_after_chunks is not None and self.fault_after_chunks < 0:
            raise ConfigError(f"{flag_of('fault_after_chunks')} must be an integer >= 0, got {self.fault_after_chunks!r}")
        if self.fault_point not in _FAULT_POINTS:
            raise ConfigError(f"{flag_of('fault_point')} must be one of {', '.join(_FAULT_POINTS)}, got {_show(self.fault_point)}")

    def to_json_dict(self) -> dict[str, Any]:
        """The effective configuration for ``runs/config_json``, credentials in URLs redacted.

        Secrets are refused where they could be given (``--s3-endpoint``, ``--forward-env``); any
        URL that still carries userinfo or a secret query value (``--ray-address``) is recorded as
        ``scheme://***@host``.
        """
        out = dataclasses.asdict(self)
        out["extensions"] = list(self.extensions)
        out["forward_env"] = list(self.forward_env)
        return {k: [redact_urls_in(x) for x in v] if isinstance(v, list)
                else redact_urls_in(v) if isinstance(v, str) else v for k, v in out.items()}

    def worker_env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for every Ray task and actor: the ``forward_env`` variables set in
        ``environ`` (default ``os.environ``) plus ``AWS_ENDPOINT_URL_S3`` = ``s3_endpoint``.

        Ray records these values in its logs, so a forwarded value holding a URL with
        credentials (``AWS_ENDPOINT_URL=http://user:password@host``) raises :class:`ConfigError`
        naming the variable. Stripping them instead would change nothing for S3 (botocore
        ignores the userinfo of an endpoint URL and signs with the standard credential chain),
        but refusing tells the user that the credentials they wrote are not the ones used.
        """
        environ = os.environ if environ is None else environ
        env = {k: environ[k] for k in self.forward_env if k in environ}
        for name, value in env.items():
            if has_credentials(value):
                raise ConfigError(
                    f"{name} {_show(value)} (forwarded to every worker, see {flag_of('forward_env')}) "
                    f"carries credentials in a URL; S3 clients ignore them there and the workers' "
                    f"logs would record them: remove them and {_CHAIN}"
                )
        if self.s3_endpoint:
            env["AWS_ENDPOINT_URL_S3"] = self.s3_endpoint
        return env


def _check_endpoint(url: str) -> None:
    """``--s3-endpoint``: ``http(s)://host[:port][/path]``, no credentials, query or fragment."""
    flag = flag_of("s3_endpoint")
    authority = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if has_credentials(url) or "@" in authority:
        # botocore ignores an endpoint's userinfo (requests are signed with the credential chain),
        # so credentials here are never used, and they would be recorded with the configuration.
        raise ConfigError(
            f"{flag} {_show(url)}: credentials in the endpoint URL are not used by S3 clients and "
            f"would be recorded in logs; remove them and {_CHAIN}"
        )
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ConfigError(f"{flag} {_show(url)}: must be an http:// or https:// URL, e.g. http://127.0.0.1:9000")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ConfigError(f"{flag} {_show(url)}: must not have a query or fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise ConfigError(f"{flag} {_show(url)}: invalid port") from None
    host = parts.hostname or ""
    if host.startswith("[") or ":" in host:
        try:
            ipaddress.IPv6Address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            raise ConfigError(f"{flag} {_show(url)}: invalid IPv6 host") from None
    elif not _HOST_NAME.fullmatch(host):
        raise ConfigError(f"{flag} {_show(url)}: missing or invalid host name")


def _typed(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the field type ``tp`` (and normalised: floats as ``float``,
    ``-0.0`` as ``0.0``, lists as tuples); a wrong type raises a one-line :class:`ConfigError`."""
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else tp
    flag = flag_of(name)
    if value is None:
        if optional:
            return None
        if typing.get_origin(base) is tuple:
            return ()  # an empty YAML key: forward no variables / no suffixes (checked after)
    if typing.get_origin(base) is tuple:
        if isinstance(value, str):
            items = value.split(",")
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            items = list(value)
        else:
            raise ConfigError(f"{flag} must be a list of strings (or one comma-separated string), got {_show(value)}")
        items = [v.strip() for v in items]
        for v in items:
            if _CONTROL.search(v):
                raise ConfigError(f"{flag} must not contain control characters, got {_show(v)}")
        return tuple(v for v in items if v)
    if base is bool:
        if type(value) is not bool:
            raise ConfigError(f"{flag} must be true or false (a YAML boolean, not a string or number), got {_show(value)}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{flag} must be an integer, got {_show(value)}")
        return int(value)
    if base is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            value = value.strip()
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{flag} must be a number, got {_show(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{flag} must be a finite number, got {_show(value)}")
        return number + 0.0  # -0.0 -> 0.0
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{flag} must be a string, got {_show(value)}")
        if _CONTROL.search(value):
            raise ConfigError(f"{flag} must not contain control characters, got {_show(value)}")
        return value
    raise TypeError(f"JobConfig.{name}: no type check for {tp!r}")  # a new kind of field: add one


_HINTS = typing.get_type_hints(JobConfig)
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
    except ValueError as exc:  # PyYAML lets int()'s digit limit through for a huge integer
        raise ConfigError(f"--config {p}: not a usable YAML value ({str(exc)[:100]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping of keys to values, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELD_NAMES:
            raise ConfigError(f"--config {p}: unknown key {_show(key, 60)}; known keys: {', '.join(_FIELD_NAMES)}")
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
        raw = env["PIPELINE_FAULT_AFTER_CHUNKS"].strip()
        # ASCII digits only: int() would also take "١٢" or "1_0", and a huge one costs seconds
        if not re.fullmatch(r"[0-9]{1,9}", raw):
            raise ConfigError(f"PIPELINE_FAULT_AFTER_CHUNKS must be an integer >= 0, got {_show(raw, 40)}")
        data["fault_after_chunks"] = int(raw)
    if "fault_point" not in data and env.get("PIPELINE_FAULT_POINT"):
        if env["PIPELINE_FAULT_POINT"] not in _FAULT_POINTS:
            raise ConfigError(f"PIPELINE_FAULT_POINT must be one of {', '.join(_FAULT_POINTS)}, "
                              f"got {_show(env['PIPELINE_FAULT_POINT'], 40)}")
        data["fault_point"] = env["PIPELINE_FAULT_POINT"]
    return JobConfig(**data)
