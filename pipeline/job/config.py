"""Typed configuration of the nightly job: one dataclass, a YAML loader, CLI-over-config merge.

A YAML file holds the same keys as the dataclass fields (``caption_batch_size: 16``; dashes are
accepted for underscores). Flags given on the command line override the file; every check in
``__post_init__`` names the flag (and config key) at fault.

One source of settings: every field is declared with :func:`setting`, which carries its help
line, default, bounds and group. :func:`settings` lists them; the ``run`` flags
(:mod:`pipeline.cli.run`), the JSON Schema of the config file (``cluster/job-config.schema.json``)
and ``docs/settings.md`` are generated from that list (:mod:`pipeline.job.settings_docs`,
``python -m pipeline config-docs``), and unit tests keep the generated files up to date.

Every value, whichever way it came (YAML, CLI override, API), is checked against the field's
declared type before anything runs: booleans only as real booleans (the string ``"false"`` is
refused, not truthy), numbers finite and never booleans, integers never floats (numbers may also
be given as decimal strings, ``"0.75"``), strings without control characters, lists as lists of
strings or one comma-separated string; then against the field's bounds. The checks are driven by
the dataclass's type hints and field metadata, so a new field is covered by declaring it.
Credentials never enter a URL setting: ``--s3-endpoint`` with ``user:password@`` is refused (S3
clients ignore them; see :meth:`JobConfig.worker_env`), and :meth:`JobConfig.to_json_dict`
redacts any that remain. Fault injection is not a setting: the crash tests hook the writer
themselves.
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

__all__ = [
    "JobConfig",
    "Setting",
    "DEFAULT_EXTENSIONS",
    "DEFAULT_FORWARD_ENV",
    "GROUPS",
    "load_config",
    "flag_of",
    "setting",
    "settings",
]

#: Object suffixes (lower case) treated as slides. ``.mrxs`` pulls in its data folder and ``.dcm``
#: files are grouped per folder into one DICOM series; add ``.jpg``/``.png`` to treat plain images
#: as slides.
DEFAULT_EXTENSIONS: tuple[str, ...] = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
)
#: Non-secret environment variables copied from the driver to every Ray task and actor, so a
#: worker resolves the same S3 endpoint and region as the driver (credentials come from the
#: worker's own chain: instance role, IRSA, mounted profile).
DEFAULT_FORWARD_ENV: tuple[str, ...] = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)
#: Largest integer any setting takes (fits a C int, a numpy int32 and Ray's resource counts).
_INT_MAX = 2**31 - 1
#: Groups of settings, in the order the help, the schema and the docs show them.
GROUPS: dict[str, str] = {
    "paths": "paths",
    "selection": "what to process",
    "detection": "detection stage (per-slide CPU tasks)",
    "caption": "caption stage (actor pool)",
    "outputs": "outputs",
    "runtime": "runtime",
    "storage": "storage (S3)",
}
# C0/C1 controls and Unicode line breaks: a value holding one would split a log line or an error.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_CHAIN = (
    "give credentials through the standard AWS credential chain (AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance role, IRSA)"
)


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


@dataclass(frozen=True)
class Setting:
    """One field of :class:`JobConfig` as the CLI, the schema and the docs see it.

    ``kind``: ``bool``, ``int``, ``float``, ``str`` or ``list`` (of strings); ``optional``: the
    field also takes ``None``. ``ge``/``gt``/``le``: inclusive/exclusive lower and inclusive upper
    bound of a number (every integer is also at most ``2**31 - 1``); ``max_length``: of a string;
    ``unit``: of a number (µm, px, MiB, s); ``default_text``: what ``None`` means, or how to show
    the default; ``required``: must be given (``input``, ``output``).
    """

    name: str
    kind: str
    optional: bool
    default: Any
    help: str
    group: str
    metavar: str | None = None
    unit: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    max_length: int | None = None
    default_text: str | None = None
    required: bool = False

    @property
    def flag(self) -> str:
        """``caption_batch_size`` -> ``--caption-batch-size``."""
        return "--" + self.name.replace("_", "-")

    @property
    def none_word(self) -> bool:
        """The field takes the word ``none`` (any case) for ``None``: an optional setting whose
        default is not ``None``, so that ``None`` is a choice to be written on the command line
        (``--candidate-mpp none``), where an absent flag already means the default."""
        return self.optional and self.default is not None

    def shown_default(self) -> str:
        """The default as the help and the docs show it."""
        if self.required:
            return "required"
        if self.default_text is not None:
            return self.default_text
        if self.kind == "bool":
            return "on" if self.default else "off"
        if self.kind == "list":
            return ",".join(self.default)
        return _number_text(self.default) if self.kind in ("int", "float") else str(self.default)

    def bounds_text(self) -> str:
        """``[16, 4096] px``, ``(0, 500] µm``, ``>= 1``; empty when the setting has none."""
        lo = (
            f"[{_number_text(self.ge)}"
            if self.ge is not None
            else (f"({_number_text(self.gt)}" if self.gt is not None else None)
        )
        if lo is not None and self.le is not None:
            text = f"{lo}, {_number_text(self.le)}]"
        elif lo is not None:
            text = (">= " if self.ge is not None else "> ") + lo[1:]
        elif self.le is not None:
            text = f"<= {_number_text(self.le)}"
        elif self.max_length is not None:
            return f"at most {self.max_length} characters"
        else:
            return ""
        return f"{text} {self.unit}".rstrip()


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else repr(x)


def setting(
    default: Any,
    help: str,
    *,
    group: str,
    metavar: str | None = None,
    unit: str = "",
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    max_length: int | None = None,
    default_text: str | None = None,
    required: bool = False,
) -> Any:
    """A :class:`JobConfig` field with what the CLI, the schema and the docs show of it.

    ``help``: one line, no final full stop, without the default (it is added from ``default`` or
    ``default_text``). The bounds are checked by ``JobConfig.__post_init__`` with a message
    naming the flag, and written into the schema. See :class:`Setting` for the rest.
    """
    if group not in GROUPS:
        raise ValueError(f"setting group {group!r} is not one of {', '.join(GROUPS)}")
    meta = {
        "help": help,
        "group": group,
        "metavar": metavar,
        "unit": unit,
        "ge": ge,
        "gt": gt,
        "le": le,
        "max_length": max_length,
        "default_text": default_text,
        "required": required,
    }
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class JobConfig:
    """Everything one run of ``python -m pipeline run`` needs.

    Each field is declared with :func:`setting`: its help line, default, flag, bounds and group
    are the single source of the ``run`` flags, the JSON Schema of the ``--config`` file and
    ``docs/settings.md`` (``python -m pipeline config-docs`` regenerates both files). Checks that
    involve several fields, or that a bound cannot express, are in ``__post_init__``.
    """

    # -- paths
    input: str = setting(
        "",
        "slide archive: s3://bucket/prefix/ or a local directory",
        group="paths",
        metavar="URI",
        required=True,
    )
    output: str = setting(
        "",
        "output location: s3://bucket/prefix/ or a local directory",
        group="paths",
        metavar="URI",
        required=True,
    )
    model: str | None = setting(
        None,
        "HemBLIP checkpoint: a directory or an s3:// prefix",
        group="paths",
        metavar="DIR|URI",
        default_text="the bundled demo checkpoint",
    )
    base: str | None = setting(
        None,
        "for a LoRA adapter --model: the base model to use instead of the one the adapter names "
        "(e.g. a local copy of Salesforce/blip-image-captioning-base); the model version hashes "
        "base + adapter",
        group="paths",
        metavar="DIR|URI",
        default_text="the base the adapter names",
    )
    shared_paths: tuple[str, ...] = setting(
        (),
        "absolute path prefixes mounted on every node (NFS, Lustre, EFS): local --input/--output/"
        "--model/--base under them are allowed on a multi-node cluster after a per-node check "
        "(comma-separated or repeated)",
        group="paths",
        metavar="PREFIX[,PREFIX]",
        default_text="none: local paths are refused on a multi-node cluster",
    )
    s3_endpoint: str | None = setting(
        None,
        "S3 endpoint URL, e.g. http://127.0.0.1:9000 (overrides AWS_ENDPOINT_URL_S3 / "
        "AWS_ENDPOINT_URL); no credentials in it",
        group="storage",
        metavar="URL",
        default_text="the AWS chain's endpoint",
    )
    # -- what to process
    dry_run: bool = setting(False, "list what would be processed and exit", group="selection")
    reprocess: bool = setting(
        False,
        "process every slide again, even those already done with this model",
        group="selection",
    )
    retry_failed: bool = setting(
        False,
        "also retry slides that failed for a reason of their own (unreadable, no scale)",
        group="selection",
    )
    max_failed_fraction: float = setting(
        0.1,
        "exit 1 when more than this fraction of processed slides failed",
        group="selection",
        metavar="F",
        ge=0.0,
        le=1.0,
    )
    extensions: tuple[str, ...] = setting(
        DEFAULT_EXTENSIONS,
        "slide suffixes (comma-separated or repeated); .mrxs pulls in its data folder, .dcm files "
        "are grouped per folder into one series",
        group="selection",
        metavar="EXT[,EXT]",
    )
    # -- detection stage (per-slide CPU tasks); DetectConfig/DetectorConfig hold the same limits
    crop_um: float = setting(
        36.0,
        "side of the square crop around each cell",
        group="detection",
        metavar="UM",
        unit="µm",
        gt=0.0,
        le=500.0,
    )
    crop_px: int = setting(
        224,
        "crop side after resampling",
        group="detection",
        metavar="PX",
        unit="px",
        ge=16,
        le=4096,
    )
    mpp: float | None = setting(
        None,
        "level-0 resolution for slides without it in their metadata",
        group="detection",
        metavar="UM_PER_PX",
        unit="µm/px",
        gt=0.0,
        le=50.0,
        default_text="none: such a slide fails (no scale)",
    )
    detect_cpus: float = setting(
        1.0,
        "CPUs per detect task",
        group="detection",
        metavar="N",
        gt=0.0,
    )
    max_detect_mpp: float | None = setting(
        None,
        "detect on the coarsest pyramid level at most this coarse (e.g. 1.1); see the README's "
        "detection-level section",
        group="detection",
        metavar="UM_PER_PX",
        unit="µm/px",
        ge=0.5,
        le=5.0,
        default_text="the level nearest 0.5 µm/px",
    )
    candidate_mpp: float | None = setting(
        1.1,
        "whole smears (zoned slides): find candidate white cells on the coarsest pyramid level at "
        "most this coarse (a 40x scan's 1.0 µm/px level) and read level 0 only in the windows "
        "their crops need (coarse-to-fine); none: one stage, detection over the zones' whole "
        "region boxes. A slide read whole, or with no such level coarser than its detection "
        "level, is read in one stage",
        group="detection",
        metavar="UM_PER_PX|none",
        unit="µm/px",
        ge=0.5,
        le=5.0,
    )
    max_decode_mb: float = setting(
        1024.0,
        "memory budget of any one image decode, checked from the header before decoding; a bigger "
        "image, tile or read fails as its slide (decompression-bomb guard)",
        group="detection",
        metavar="MIB",
        unit="MiB",
        ge=16.0,
        le=1024.0 * 1024,
    )
    max_slide_attempts: int = setting(
        3,
        "worker deaths (out of memory, signal, crash) on one slide before it is recorded failed "
        "with failure_class worker_died",
        group="detection",
        metavar="N",
        ge=1,
        le=100,
    )
    zones: tuple[str, ...] = setting(
        ("auto",),
        "smear zones whose cells are described. auto: a slide of at least --zone-min-area-mm2 "
        "(a whole smear) is zoned at ~4 µm/px first (glass, thick, monolayer, feathered) and only "
        "its monolayer is described, level 0 read only there; a smaller slide (a field mosaic) is "
        "read whole. Zone names (comma-separated or repeated, e.g. monolayer,feathered) zone "
        "every slide; none (or an empty list) reads every slide whole, without a zone map. Cells "
        "seen outside the chosen zones are counted per zone in slides/",
        group="detection",
        metavar="auto|none|ZONE[,ZONE]",
        default_text="auto",
    )
    zone_min_area_mm2: float = setting(
        20.0,
        "with --zones auto: level-0 area from which a slide is a whole smear and is zoned (a whole "
        "smear is 100-500 mm², a field mosaic a few mm² at most)",
        group="detection",
        metavar="MM2",
        unit="mm²",
        gt=0.0,
        le=100000.0,
    )
    region_task_mpx: int = setting(
        64,
        "a zoned slide's chosen zones are split into region tasks of at most this many level-0 "
        "megapixels; a slide with more than one, read in place or from a shared path (not "
        "staged), runs them as Ray tasks of their own, its cells still committed once as one slide",
        group="detection",
        metavar="MPX",
        unit="Mpx",
        ge=1,
        le=1000000,
    )
    region_tasks_in_flight: int = setting(
        4,
        "region tasks of one slide running at once, each a Ray task reserving --detect-cpus with "
        "its own open slide; 0 runs them one after another in the slide's task",
        group="detection",
        metavar="N",
        ge=0,
        le=1024,
    )
    max_cells_per_slide: int | None = setting(
        None,
        "describe at most this many cells per slide: a spatially balanced sample of the (chosen "
        "zones') cells, the way a 100/200-cell manual differential is read (a zoned slide reads "
        "256 um fields spread over the zones until it is met); slides/ records sampled, "
        "cells_total and cells_total_estimated",
        group="detection",
        metavar="N",
        ge=1,
        default_text="all cells",
    )
    # -- caption stage (actor pool)
    caption_batch_size: int = setting(
        32,
        "crops per caption batch",
        group="caption",
        metavar="N",
        ge=1,
        le=65536,
    )
    caption_min_actors: int = setting(
        1,
        "minimum caption actors",
        group="caption",
        metavar="N",
        ge=1,
    )
    caption_max_actors: int = setting(
        1,
        "maximum caption actors (at least --caption-min-actors)",
        group="caption",
        metavar="N",
        ge=1,
    )
    caption_gpus_per_actor: float | None = setting(
        None,
        "GPUs per caption actor, fractional allowed (whole above 1); 0 runs the actors on CPU",
        group="caption",
        metavar="G",
        ge=0.0,
        default_text="1 if the cluster has GPUs, else 0",
    )
    caption_cpus_per_actor: float = setting(
        0.25,
        "CPUs reserved per caption actor, fractional: actors holding whole CPUs can starve the "
        "detect tasks on a small node",
        group="caption",
        metavar="C",
        ge=0.0,
    )
    caption_cpu_threads: int | None = setting(
        None,
        "torch threads of a caption actor running on CPU (raise together with "
        "--caption-cpus-per-actor)",
        group="caption",
        metavar="N",
        ge=1,
        le=4096,
        default_text="what Ray gives the actor, 1 for a fractional one",
    )
    # -- outputs
    chunk_slides: int = setting(
        16,
        "slides per committed chunk",
        group="outputs",
        metavar="N",
        ge=1,
    )
    chunk_cells: int = setting(
        20000,
        "close a chunk early at this many cells",
        group="outputs",
        metavar="N",
        ge=1,
    )
    target_file_mb: int = setting(
        128,
        "target size of output Parquet files; small staged files are compacted up to it",
        group="outputs",
        metavar="MIB",
        unit="MiB",
        ge=1,
        le=4096,
    )
    thumbnails: bool = setting(
        True,
        "store a JPEG thumbnail of each crop",
        group="outputs",
    )
    thumbnail_px: int = setting(
        96,
        "side of the JPEG thumbnail stored per cell",
        group="outputs",
        metavar="PX",
        unit="px",
        ge=1,
        le=4096,
    )
    record_skipped: bool = setting(
        False,
        "also write a slides/ row (status skipped) for every slide already done",
        group="outputs",
    )
    run_id: str | None = setting(
        None,
        "run id, a path component of every output file: no / \\ or spaces, not starting with _ "
        "or a dot",
        group="outputs",
        metavar="ID",
        max_length=128,
        default_text="UTC timestamp + random suffix",
    )
    # -- runtime
    scratch_dir: str | None = setting(
        None,
        "local scratch for staged slides",
        group="runtime",
        metavar="DIR",
        default_text="the system temp dir",
    )
    ray_address: str | None = setting(
        None,
        "Ray cluster to connect to",
        group="runtime",
        metavar="ADDR",
        default_text="RAY_ADDRESS, a local cluster, or a new one",
    )
    forward_env: tuple[str, ...] = setting(
        DEFAULT_FORWARD_ENV,
        "environment variables copied from the driver to every Ray task and actor (comma-separated "
        "or repeated); names that look secret are refused",
        group="runtime",
        metavar="NAME[,NAME]",
    )
    lease_ttl_s: float = setting(
        600.0,
        "the run's lease on the output expires this long after its last renewal (renewed every "
        "third of it); a second run on the same output refuses while it is live",
        group="runtime",
        metavar="S",
        unit="s",
        gt=0.0,
        le=86400.0,
    )
    # -- storage
    s3_max_attempts: int = setting(
        5,
        "attempts per S3 request, with exponential backoff",
        group="storage",
        metavar="N",
        ge=1,
        le=100,
    )
    transfer_concurrency: int = setting(
        4,
        "parallel ranged GETs per staged slide",
        group="storage",
        metavar="N",
        ge=1,
        le=1024,
    )
    transfer_chunk_mb: int = setting(
        8,
        "part size of ranged GETs (S3's largest part is 5 GiB)",
        group="storage",
        metavar="MIB",
        unit="MiB",
        ge=1,
        le=5120,
    )

    def __post_init__(self) -> None:
        for f, s in zip(fields(self), _SETTINGS, strict=True):
            value = getattr(self, f.name)
            if s.none_word and isinstance(value, str) and value.strip().lower() == "none":
                value = None  # e.g. --candidate-mpp none (YAML null reads as None already)
            setattr(self, f.name, _typed(f.name, value, _HINTS[f.name]))
        for s in _SETTINGS:  # huge integers first: no later message may print 5000 digits
            value = getattr(self, s.name)
            if s.kind == "int" and value is not None and abs(value) > _INT_MAX:
                _check_bounds(s, value)
        for s in _SETTINGS:
            if s.required and not getattr(self, s.name):
                raise ConfigError(f"{flag_of(s.name)} is required: {s.help}")
        for name in ("input", "output", "model", "base"):
            value = getattr(self, name)
            if value is not None and value.startswith("s3://") and len(value) <= len("s3://"):
                raise ConfigError(f"{flag_of(name)} {_show(value)}: missing bucket name")
            if value is not None and "://" in value and not value.startswith("s3://"):
                raise ConfigError(
                    f"{flag_of(name)} {_show(value)}: only s3:// URIs and local paths are supported"
                )
            if (
                value is not None
                and value.startswith("s3://")
                and "@" in value[5:].split("/", 1)[0]
            ):
                raise ConfigError(
                    f"{flag_of(name)} {_show(value)}: an s3:// URI cannot carry credentials; {_CHAIN}"
                )
        if self.base is not None and self.model is None:
            raise ConfigError(
                f"{flag_of('base')} names the base of a LoRA adapter given with --model; "
                "the bundled demo checkpoint has no base"
            )
        if self.s3_endpoint is not None:
            _check_endpoint(self.s3_endpoint)
        self.extensions = tuple(
            e.lower() if e.startswith(".") else "." + e.lower() for e in self.extensions
        )
        for ext in self.extensions:
            if ext == "." or any(c in ext for c in "/\\ \t"):
                raise ConfigError(f"{flag_of('extensions')} {_show(ext)}: not a file suffix")
        for name in self.forward_env:
            if not _ENV_NAME.fullmatch(name):
                raise ConfigError(
                    f"{flag_of('forward_env')} {_show(name)}: not an environment variable name"
                )
            if _looks_secret(name):
                raise ConfigError(
                    f"{flag_of('forward_env')}: {name} looks like a secret; Ray records forwarded "
                    "variables in its logs, so give workers credentials through their own chain "
                    "(instance role, IRSA, mounted profile) instead"
                )
        if not self.extensions:
            raise ConfigError(f"{flag_of('extensions')} must list at least one suffix")
        self.zones = _check_zones(self.zones)
        from pipeline.detect import DetectConfig

        # The detection stage's own checks first: their messages say why (e.g. working_mpp).
        try:
            DetectConfig(
                crop_um=self.crop_um,
                crop_px=self.crop_px,
                mpp=self.mpp,
                candidate_mpp=self.candidate_mpp,
            )
        except ConfigError as exc:
            m = re.match(r"DetectConfig\.(\w+) \([^)]*\): (.*)", str(exc))
            name, why = (
                (m.group(1), m.group(2))
                if m and m.group(1) in _FIELD_NAMES
                else ("crop_um", str(exc))
            )
            if name == "candidate_mpp":  # the job's word for None (--candidate-mpp none)
                why = why.replace("None", "none")
            raise ConfigError(f"{flag_of(name)} {why}") from None
        if self.max_detect_mpp is not None:
            from pipeline.detection import DetectorConfig

            try:
                DetectorConfig(max_detect_mpp=self.max_detect_mpp)
            except ConfigError as exc:
                raise ConfigError(
                    f"{flag_of('max_detect_mpp')}: {str(exc).split(': ', 1)[-1]}"
                ) from None
        for s in _SETTINGS:
            _check_bounds(s, getattr(self, s.name))
        if self.caption_max_actors < self.caption_min_actors:
            raise ConfigError(
                f"{flag_of('caption_max_actors')} must be >= --caption-min-actors "
                f"({self.caption_min_actors}), got {self.caption_max_actors!r}"
            )
        gpus = self.caption_gpus_per_actor
        if gpus is not None and gpus > 1 and gpus != int(gpus):
            raise ConfigError(
                f"{flag_of('caption_gpus_per_actor')} above 1 must be a whole number, got {gpus!r}"
            )
        if self.run_id is not None and (
            not self.run_id
            or any(c in self.run_id for c in "/\\ ")
            or self.run_id.startswith(("_", "."))
        ):
            raise ConfigError(
                f"{flag_of('run_id')} {_show(self.run_id)}: must be non-empty, without / \\ or spaces, not starting with _ or ."
            )

    # -- the stages' settings objects, built by keyword so a new field cannot shift the others
    def s3_settings(self):
        """How every S3 client of this run reaches storage (:class:`~pipeline.job.storage.S3Settings`)."""
        from pipeline.job.storage import S3Settings

        return S3Settings(
            endpoint=self.s3_endpoint,
            max_attempts=self.s3_max_attempts,
            transfer_concurrency=self.transfer_concurrency,
            transfer_chunk_mb=self.transfer_chunk_mb,
        )

    def detect_settings(self):
        """What one detect task needs (:class:`~pipeline.job.stage_detect.DetectSettings`)."""
        from pipeline.job.stage_detect import DetectSettings

        return DetectSettings(
            s3=self.s3_settings(),
            scratch_dir=self.scratch_dir,
            crop_um=self.crop_um,
            crop_px=self.crop_px,
            mpp=self.mpp,
            thumbnails=self.thumbnails,
            thumbnail_px=self.thumbnail_px,
            max_detect_mpp=self.max_detect_mpp,
            candidate_mpp=self.candidate_mpp,
            max_slide_attempts=self.max_slide_attempts,
            max_decode_mb=self.max_decode_mb,
            zones=("monolayer",) if self.zones == ("auto",) else self.zones,
            max_cells=self.max_cells_per_slide,
            zone_min_area_mm2=self.zone_min_area_mm2 if self.zones == ("auto",) else None,
            region_task_px=self.region_task_mpx * 10**6,
            region_tasks_in_flight=self.region_tasks_in_flight,
            region_task_cpus=self.detect_cpus,
        )

    def caption_settings(self, model_version: str | None, gpus_per_actor: float | None = None):
        """The caption actor pool (:class:`~pipeline.job.plan.CaptionSettings`).

        ``model_version``: the identity of the loaded model (from ``model_identity``).
        ``gpus_per_actor``: GPUs per actor already resolved by the caller; ``None`` resolves
        ``caption_gpus_per_actor`` here (its ``None`` asks the connected Ray cluster whether it
        has GPUs, so Ray must be initialised first).
        """
        from pipeline.job.plan import CaptionSettings, resolve_gpus

        if gpus_per_actor is None:
            gpus_per_actor = resolve_gpus(self.caption_gpus_per_actor)
        return CaptionSettings(
            model=self.model,
            model_version=model_version,
            batch_size=self.caption_batch_size,
            min_actors=self.caption_min_actors,
            max_actors=self.caption_max_actors,
            gpus_per_actor=float(gpus_per_actor),
            cpus_per_actor=self.caption_cpus_per_actor,
            cpu_threads=self.caption_cpu_threads,
            base=self.base,
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The effective configuration for ``runs/config_json``, credentials in URLs redacted.

        Secrets are refused where they could be given (``--s3-endpoint``, ``--forward-env``); any
        URL that still carries userinfo or a secret query value (``--ray-address``) is recorded as
        ``scheme://***@host``.
        """
        out = dataclasses.asdict(self)
        out["extensions"] = list(self.extensions)
        out["forward_env"] = list(self.forward_env)
        out["zones"] = list(self.zones)
        return {
            k: [redact_urls_in(x) for x in v]
            if isinstance(v, list)
            else redact_urls_in(v)
            if isinstance(v, str)
            else v
            for k, v in out.items()
        }

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


#: ``--zones`` words that stand alone: ``auto`` (zone whole smears only) and ``none`` (no zones).
_ZONE_WORDS = ("auto", "none")


def _check_zones(zones: tuple[str, ...]) -> tuple[str, ...]:
    """``--zones`` normalised: ``("auto",)``, ``()`` (none) or zone names (lower case, each
    once, in the order given); anything else is a one-line error naming the flag."""
    from pipeline.zones import ZONE_NAMES

    flag = flag_of("zones")
    words = tuple(dict.fromkeys(z.lower() for z in zones))  # a zone named twice is one zone
    for word in words:
        if word not in ZONE_NAMES and word not in _ZONE_WORDS:
            raise ConfigError(
                f"{flag} {_show(word)}: not a smear zone; choose from {', '.join(ZONE_NAMES)}, "
                f"or auto or none alone"
            )
    alone = [w for w in words if w in _ZONE_WORDS]
    if alone and len(words) > 1:
        raise ConfigError(
            f"{flag} {_show(','.join(words))}: {alone[0]} stands alone (auto: the monolayer of "
            f"slides of at least --zone-min-area-mm2; none: every slide whole), or list zones"
        )
    return () if words == ("none",) else words


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
        raise ConfigError(
            f"{flag} {_show(url)}: must be an http:// or https:// URL, e.g. http://127.0.0.1:9000"
        )
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
            raise ConfigError(
                f"{flag} must be a list of strings (or one comma-separated string), got {_show(value)}"
            )
        items = [v.strip() for v in items]
        for v in items:
            if _CONTROL.search(v):
                raise ConfigError(f"{flag} must not contain control characters, got {_show(v)}")
        return tuple(v for v in items if v)
    if base is bool:
        if type(value) is not bool:
            raise ConfigError(
                f"{flag} must be true or false (a YAML boolean, not a string or number), got {_show(value)}"
            )
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


def _kind(tp: Any) -> tuple[str, bool]:
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else tp
    if typing.get_origin(base) is tuple:
        return "list", optional
    return {bool: "bool", int: "int", float: "float", str: "str"}[base], optional


def _setting_of(f: dataclasses.Field) -> Setting:
    kind, optional = _kind(_HINTS[f.name])
    meta = dict(f.metadata)
    if not meta.get("help"):
        raise TypeError(f"JobConfig.{f.name}: declare it with setting(...), with its help")
    if kind == "int" and meta.get("le") is None:
        meta["le"] = _INT_MAX
    return Setting(name=f.name, kind=kind, optional=optional, default=f.default, **meta)


_SETTINGS: tuple[Setting, ...] = tuple(_setting_of(f) for f in fields(JobConfig))


def settings() -> tuple[Setting, ...]:
    """Every setting of :class:`JobConfig`, in field order (the source of flags, schema, docs)."""
    return _SETTINGS


def _check_bounds(s: Setting, value: Any) -> None:
    """Refuse a number outside ``s``'s bounds, or a string longer than its ``max_length``."""
    if value is None:
        return
    if s.kind == "str":
        if s.max_length is not None and len(value) > s.max_length:
            raise ConfigError(
                f"{flag_of(s.name)} must be at most {s.max_length} characters, got {len(value)}"
            )
        return
    if s.kind not in ("int", "float"):
        return
    if (
        (s.ge is not None and value < s.ge)
        or (s.gt is not None and value <= s.gt)
        or (s.le is not None and value > s.le)
    ):
        what = "an integer" if s.kind == "int" else "a number"
        bounds = s.bounds_text()
        where = f"in {bounds}" if bounds[0] in "[(" else bounds
        shown = _show(value, 40) if s.kind == "int" and value.bit_length() > 64 else repr(value)
        raise ConfigError(f"{flag_of(s.name)} must be {what} {where}, got {shown}")


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
        raise ConfigError(
            f"--config {p}:{where} not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None
    except ValueError as exc:  # PyYAML lets int()'s digit limit through for a huge integer
        raise ConfigError(f"--config {p}: not a usable YAML value ({str(exc)[:100]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"--config {p}: expected a mapping of keys to values, got {type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELD_NAMES:
            raise ConfigError(
                f"--config {p}: unknown key {_show(key, 60)}; known keys: {', '.join(_FIELD_NAMES)}"
            )
        if name in out:  # `chunk_slides` and `chunk-slides`: one would silently win
            raise ConfigError(
                f"--config {p}: key {_show(key, 60)} gives {name} twice (dashes and underscores are one key)"
            )
        out[name] = value
    return out


def load_config(
    config_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> JobConfig:
    """Merge defaults < YAML file < ``overrides`` (CLI flags that were given, i.e. not ``None``)."""
    data = _read_yaml(config_path) if config_path else {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _FIELD_NAMES:
            raise ConfigError(f"unknown setting {key!r}")
        data[key] = value
    return JobConfig(**data)
