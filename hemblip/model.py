"""Build, load and save HemBLIP models (``transformers.BlipForConditionalGeneration``).

A *location* is one of:

* a local directory holding a checkpoint (``config.json``, ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``, the image-processor settings in ``preprocessor_config.json``
  or, as transformers 5's ``BlipProcessor.save_pretrained`` writes them, in the
  ``image_processor`` section of ``processor_config.json``, tokenizer files) or a LoRA adapter
  directory (merged on load): written by :func:`hemblip.lora.save_adapter`, or by peft's
  ``save_pretrained`` alone. An adapter's base is, first found: ``load_model(..., base=)``
  (``--base``), ``hemblip_base.json``, peft's ``base_model_name_or_path``; a relative local
  path there is resolved against the adapter's directory (``s3://`` adapters: its URI);
* ``s3://bucket/prefix``: the checkpoint files under the prefix (``*.json``, ``*.safetensors``,
  ``*.txt``) are downloaded once to a local cache (``$HEMBLIP_CACHE`` or ``~/.cache/hemblip``)
  with boto3's standard credential chain, then loaded as a directory; where the store is
  (endpoint, region, retries) comes from ``load_model(..., storage_options=)`` (the job passes
  its own S3 settings there), else from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``; a hostile key (``..``, ``//``, backslash) refuses the checkpoint, and nothing is
  written outside the cache;
* a Hugging Face hub id (``Salesforce/blip-image-captioning-base``), only where a network exists
  (or the hub cache already holds it); only safetensors/JSON/text files are fetched.

Weights are read from safetensors only, by this module: a safetensors index may name only
``.safetensors`` shards inside the checkpoint folder (transformers never picks weight files). Pickle weights (``.bin``/``.pt``/``.pth``/``.ckpt``) raise
:class:`~hemblip.errors.UnsafeCheckpointError` unless ``allow_pickle=True``. Remote code is never
trusted. A config *spec* (``tiny``, ``random-demo-shape``, ``blip-base`` or
``config:NAME[,key=value...]``) builds a fresh randomly initialised model with the offline
word-level tokenizer. ``demo`` is refused with a hint: it is easily taken for the bundled (trained)
demo checkpoint, which is what ``--model`` uses by default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hemblip._paths import UnsafePathError, create_dirs_inside, inside, name_problem, safe_join
from hemblip.errors import CheckpointError, HemblipConfigError, UnsafeCheckpointError

__all__ = [
    "LoadedModel",
    "PRESETS",
    "build_model",
    "check_spec",
    "is_config_spec",
    "load_model",
    "resolve_location",
    "save_model",
    "weights_version",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"  # the only pickle name peft reads
ADAPTER_BASE = "hemblip_base.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"  # transformers 5 BlipProcessor.save_pretrained

#: Named architectures for ``config:`` specs. Dimensions: image px, ViT patch px, hidden sizes.
PRESETS: dict[str, dict[str, int]] = {
    # Unit tests: trains in seconds on a CPU.
    "tiny": dict(
        image_size=64,
        patch_size=16,
        vision_hidden=64,
        vision_layers=2,
        vision_heads=2,
        text_hidden=64,
        text_layers=2,
        text_heads=2,
        max_positions=64,
    ),
    # The shape of the committed demo checkpoint (trained from it on 2 CPU cores in about 20
    # minutes); built from this spec the weights are random, hence the name.
    "random-demo-shape": dict(
        image_size=112,
        patch_size=14,
        vision_hidden=192,
        vision_layers=4,
        vision_heads=4,
        text_hidden=192,
        text_layers=3,
        text_heads=4,
        max_positions=96,
    ),
    # BLIP-base (Salesforce/blip-image-captioning-base): ViT-B/16 at 384 px, BERT-base decoder.
    "blip-base": dict(
        image_size=384,
        patch_size=16,
        vision_hidden=768,
        vision_layers=12,
        vision_heads=12,
        text_hidden=768,
        text_layers=12,
        text_heads=12,
        max_positions=512,
        vocab_size=30524,
    ),
}
_ALIASES = {"base": "blip-base"}
#: Spec names refused with a hint: a random model under a name users read as a trained one.
_RETIRED = {
    "demo": (
        "builds a randomly initialised model, not the bundled demo checkpoint "
        "(hemblip/demo_checkpoint, what --model uses by default); for a random model of the "
        "demo's shape use 'random-demo-shape'"
    ),
}

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to train or caption, with the processors and where it came from.

    ``weights_files``: the safetensors (or opted-in pickle) files its weights were read from, in
    load order (base then adapter); empty for a freshly built model.
    """

    model: Any
    image_processor: Any
    tokenizer: Any
    location: str
    weights_files: list[Path] = field(default_factory=list)
    merged_adapter: bool = False

    @property
    def version(self) -> str:
        """First 16 hex chars of the sha256 of the weights file(s); ``"untrained"`` when none."""
        return weights_version(self.weights_files)


def weights_version(files: list[Path]) -> str:
    """sha256 over the bytes of ``files`` in order, first 16 hex chars (``"untrained"`` if none)."""
    if not files:
        return "untrained"
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- building


def is_config_spec(spec: str) -> bool:
    """True when ``spec`` names a preset/``config:`` spec rather than a location."""
    s = str(spec)
    if s.startswith("config:"):
        return True
    return (s in PRESETS or s in _ALIASES or s in _RETIRED) and not Path(s).exists()


def check_spec(spec: str) -> None:
    """Raise :class:`HemblipConfigError` for a config spec that :func:`build_model` would refuse
    (unknown preset, bad override, the retired ``demo``); locations pass unchecked."""
    if is_config_spec(spec):
        _parse_spec(str(spec))


def _parse_spec(spec: str) -> dict[str, int]:
    body = spec[len("config:") :] if spec.startswith("config:") else spec
    name, _, rest = body.partition(",")
    name = _ALIASES.get(name.strip(), name.strip())
    if name in _RETIRED:
        raise HemblipConfigError(f"model spec {spec!r}: {name!r} {_RETIRED[name]}")
    if name not in PRESETS:
        raise HemblipConfigError(
            f"--base {spec!r}: unknown preset {name!r}; choose one of {', '.join(PRESETS)}"
        )
    dims = dict(PRESETS[name])
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in PRESETS["tiny"] and key != "vocab_size":
            raise HemblipConfigError(
                f"--base {spec!r}: bad override {item!r}; use key=value with key in "
                f"{', '.join(list(PRESETS['tiny']) + ['vocab_size'])}"
            )
        try:
            dims[key] = int(value)
        except ValueError:
            raise HemblipConfigError(
                f"--base {spec!r}: {key} must be an integer, got {value!r}"
            ) from None
    if dims["image_size"] % dims["patch_size"]:
        raise HemblipConfigError(f"--base {spec!r}: image_size must be a multiple of patch_size")
    return dims


def build_model(spec: str = "tiny", *, seed: int | None = 0) -> LoadedModel:
    """A freshly initialised BLIP captioner from a preset/``config:`` spec (no download).

    The tokenizer is the offline word-level one (:func:`hemblip.tokenizer.build_tokenizer`); the
    text vocabulary is sized to it unless the spec sets ``vocab_size`` (``blip-base``: 30524).
    """
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil

    from hemblip.tokenizer import build_tokenizer

    dims = _parse_spec(spec)
    tokenizer = build_tokenizer()
    vocab_size = max(dims.get("vocab_size", len(tokenizer)), len(tokenizer))
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=dims["text_hidden"],
        encoder_hidden_size=dims["vision_hidden"],
        intermediate_size=4 * dims["text_hidden"],
        num_hidden_layers=dims["text_layers"],
        num_attention_heads=dims["text_heads"],
        max_position_embeddings=dims["max_positions"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
    )
    if dims.get("vocab_size") == 30524:
        # BLIP-base keeps BERT's special-token ids; the word-level tokenizer is only for decoding.
        text_config.update(pad_token_id=0, bos_token_id=30522, eos_token_id=2, sep_token_id=102)
    vision_config = dict(
        image_size=dims["image_size"],
        patch_size=dims["patch_size"],
        hidden_size=dims["vision_hidden"],
        intermediate_size=4 * dims["vision_hidden"],
        num_hidden_layers=dims["vision_layers"],
        num_attention_heads=dims["vision_heads"],
        # BlipVisionConfig's default initializer_range is 1e-10 (fine for loading pretrained
        # weights): a model trained from scratch would start with an all-zero image embedding.
        initializer_range=0.02,
    )
    config = BlipConfig(text_config=text_config, vision_config=vision_config)
    if seed is not None:
        torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    image_processor = BlipImageProcessorPil(
        size={"height": dims["image_size"], "width": dims["image_size"]}
    )
    return LoadedModel(
        model, image_processor, tokenizer, location=f"config:{spec.removeprefix('config:')}"
    )


# ----------------------------------------------------------------------------- locations


def _quiet() -> None:
    """No per-shard progress bars from transformers: logs of batch jobs stay readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _cache_root() -> Path:
    return Path(os.environ.get("HEMBLIP_CACHE", Path.home() / ".cache" / "hemblip"))


_MIRROR_SUFFIXES = (".json", ".safetensors", ".txt")  # what a checkpoint needs; as the hub path
_ETAGS = ".etags.json"
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
#: How long (s) a process waits for another one filling the same cache folder.
_LOCK_WAIT_S = 1800.0


#: Keys of ``storage_options`` (botocore's names; ``endpoint``/``region`` accepted too).
_OPTION_KEYS = {
    "endpoint_url": "endpoint_url",
    "endpoint": "endpoint_url",
    "region_name": "region_name",
    "region": "region_name",
    "max_attempts": "max_attempts",
}
#: Keys the pipeline's settings may carry that concern transfers the mirror does not tune.
_IGNORED_OPTION_KEYS = ("transfer_concurrency", "transfer_chunk_mb")


def _s3_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` checked: ``{"endpoint_url": str|None, "region_name": str|None,
    "max_attempts": int}``. Raises :class:`HemblipConfigError` naming a bad or unknown key."""
    out: dict[str, Any] = {"endpoint_url": None, "region_name": None, "max_attempts": 5}
    if options is None:
        return out
    if not isinstance(options, Mapping):
        raise HemblipConfigError(f"storage_options must be a mapping, got {type(options).__name__}")
    for key, value in options.items():
        if key in _IGNORED_OPTION_KEYS:
            continue
        name = _OPTION_KEYS.get(key) if isinstance(key, str) else None
        if name is None:
            raise HemblipConfigError(
                f"storage_options: unknown key {key!r}; expected one of {', '.join(_OPTION_KEYS)}"
            )
        if value is None:
            continue
        if name == "max_attempts":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100:
                raise HemblipConfigError(
                    f"storage_options: max_attempts must be an integer in 1..100, got {value!r}"
                )
        elif not isinstance(value, str) or not value or any(ord(c) < 33 for c in value):
            raise HemblipConfigError(
                f"storage_options: {key} must be a non-empty string, got {value!r}"
            )
        elif name == "endpoint_url":
            scheme, sep, rest = value.partition("://")
            if (
                not sep
                or scheme.lower() not in ("http", "https")
                or not rest
                or "@" in rest.split("/", 1)[0]
            ):
                # An endpoint's userinfo is never used for signing; it could only end up in a log.
                raise HemblipConfigError(
                    "storage_options: endpoint_url must be http(s)://host[:port] without credentials"
                )
        out[name] = value
    return out


def _s3_client(options: Mapping[str, Any] | None):
    """A boto3 S3 client for ``storage_options`` (see :func:`load_model`); unset values fall back
    to boto3's standard chain (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``)."""
    import boto3
    from botocore.config import Config

    opts = _s3_options(options)
    endpoint = (
        opts["endpoint_url"]
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    cfg = Config(
        retries={"max_attempts": opts["max_attempts"], "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        # S3-compatible stores on a custom endpoint rarely resolve virtual-host buckets.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=opts["endpoint_url"], region_name=opts["region_name"], config=cfg
    )


def _parse_s3(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of an ``s3://`` model URI, refusing names that are not a safe local path."""
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise CheckpointError(f"{uri}: no bucket in the S3 URI")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise CheckpointError(f"{uri}: {bucket!r} is not a valid S3 bucket name")
    prefix = prefix.strip("/")
    problem = name_problem(prefix) if prefix else None
    if problem:
        raise CheckpointError(f"{uri}: refusing the model prefix {prefix!r}: {problem}")
    return bucket, prefix


class _CacheLock:
    """An exclusive lock on one cache folder, shared by every process on this machine.

    ``fcntl.flock`` is released by the kernel when its holder dies, so a crashed download never
    leaves the cache locked. The lock file is opened with ``O_NOFOLLOW`` and never truncated, so a
    symlink planted in its place cannot be used to clobber a file elsewhere.
    """

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = path, what, -1

    def __enter__(self) -> _CacheLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking, the atomic renames still keep files whole
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise CheckpointError(
                        f"{self.what}: another process has held the cache lock {self.path} for "
                        f"{_LOCK_WAIT_S:.0f} s; remove it if that process is gone"
                    ) from None
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock


def _read_etags(path: Path) -> dict[str, str]:
    """The ETags recorded by the last mirror; ``{}`` when missing or unreadable (re-download)."""
    try:
        doc = (
            json.loads(path.read_text(encoding="utf-8"))
            if path.is_file() and not path.is_symlink()
            else {}
        )
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return (
        {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(doc, dict)
        else {}
    )


def _write_atomic(dest: Path, data: bytes) -> None:
    """Write ``dest`` through a unique temporary file in its folder and one rename.

    The rename replaces a symlink at ``dest`` instead of writing through it.
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plan_mirror(
    uri: str, prefix: str, objects: list[dict]
) -> tuple[list[tuple[str, dict]], list[str]]:
    """(``(relative name, object)`` to mirror, keys not needed by a checkpoint).

    A key that is not a safe relative name refuses the whole checkpoint: whoever wrote it did not
    mean well, so no file of it is trusted.
    """
    plan, skipped = [], []
    for obj in objects:
        key = obj["Key"]
        rel = key[len(prefix) + 1 :] if prefix else key
        if rel == "":
            continue
        if rel.endswith("/"):  # a "folder" marker object (S3 console); holds no data
            rel = rel[:-1]
            if not name_problem(rel):
                continue
        problem = name_problem(rel)
        if problem:
            raise CheckpointError(
                f"{uri}: refusing the checkpoint: object key {key!r} is unsafe ({problem})"
            )
        parts = rel.split("/")
        # Hidden names are never checkpoint files and would collide with the cache's own files.
        if any(p.startswith(".") for p in parts) or not parts[-1].endswith(_MIRROR_SUFFIXES):
            skipped.append(key)
            continue
        plan.append((rel, obj))
    return plan, skipped


def _download_s3(uri: str, storage_options: Mapping[str, Any] | None = None) -> Path:
    """Mirror the checkpoint files under ``s3://bucket/prefix/`` into the cache; returns the local dir.

    Only ``*.json``, ``*.safetensors`` and ``*.txt`` objects are fetched (as from the hub); other
    objects are logged and ignored. A key that is not a safe relative name (``..``, ``//``,
    backslash, control characters) refuses the whole checkpoint before anything is written, and
    nothing is ever written outside ``$HEMBLIP_CACHE`` (symlinks in the cache are not followed).
    Objects whose size and ETag match the cached copy are not fetched again; files mirrored
    earlier whose object is gone are removed. Concurrent processes are serialised by a lock per
    folder, and each file appears whole (unique temporary name, then an atomic rename).
    ``storage_options``: where the store is (see :func:`load_model`).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    _s3_options(storage_options)  # a bad setting is the caller's error, before any I/O
    bucket, prefix = _parse_s3(uri)
    parts = ["s3", bucket, *(prefix.split("/") if prefix else [])]
    try:
        root = _cache_root()
        root.mkdir(
            parents=True, exist_ok=True
        )  # the cache root is the user's choice, links and all
        locks = create_dirs_inside(root, ["s3", ".locks"])
        lock_name = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:32] + ".lock"
        with _CacheLock(locks / lock_name, uri):
            local = create_dirs_inside(root, parts)
            etags_path = local / _ETAGS
            etags = _read_etags(etags_path)
            s3 = _s3_client(storage_options)
            objects = [
                obj
                for page in s3.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix + "/" if prefix else ""
                )
                for obj in page.get("Contents", [])
            ]
            if not objects:
                raise CheckpointError(f"{uri}: no objects under this prefix")
            plan, skipped = _plan_mirror(uri, prefix, objects)
            if skipped:
                log.info(
                    "%s: %d object(s) are not checkpoint files and were not mirrored: %s%s",
                    uri,
                    len(skipped),
                    ", ".join(skipped[:5]),
                    " ..." if len(skipped) > 5 else "",
                )
            if not plan:
                raise CheckpointError(
                    f"{uri}: no checkpoint files (*.json, *.safetensors, *.txt) under this prefix; "
                    f"{len(skipped)} other object(s) ignored"
                )
            for rel, obj in plan:
                *dirs, name = rel.split("/")
                try:
                    parent = create_dirs_inside(local, dirs)
                except UnsafePathError as exc:
                    raise CheckpointError(
                        f"{uri}: refusing to write object {obj['Key']!r} into the model cache: {exc}"
                    ) from None
                dest = parent / name
                if (
                    not dest.is_symlink()
                    and dest.is_file()
                    and dest.stat().st_size == obj["Size"]
                    and etags.get(rel) == obj["ETag"]
                ):
                    continue
                fd, tmp = tempfile.mkstemp(dir=parent, prefix=".", suffix=".part")
                os.close(fd)
                try:
                    s3.download_file(bucket, obj["Key"], tmp)
                    os.replace(tmp, dest)
                finally:
                    Path(tmp).unlink(missing_ok=True)
                etags[rel] = obj["ETag"]
            wanted = {rel for rel, _ in plan}
            for rel in sorted(set(etags) - wanted):
                _remove_stale(local, rel)
                del etags[rel]
            _write_atomic(etags_path, json.dumps(etags, sort_keys=True).encode())
    except CheckpointError:
        raise
    except UnsafePathError as exc:
        raise CheckpointError(f"{uri}: refusing to write into the model cache: {exc}") from exc
    except (BotoCoreError, ClientError) as exc:
        raise CheckpointError(f"{uri}: cannot download checkpoint: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(
            f"{uri}: cannot write the model cache {_cache_root()}: {exc}"
        ) from exc
    return local


def _remove_stale(local: Path, rel: str) -> None:
    """Delete a file mirrored earlier whose object is gone (it must not be loaded with the rest)."""
    try:
        path = safe_join(local, rel, resolve=False)
        if inside(local, path.parent):  # never unlink through a symlinked folder
            path.unlink(missing_ok=True)
    except (UnsafePathError, OSError):
        pass  # a name we did not write, or already gone: nothing of ours to remove


def _download_hub(repo_id: str) -> Path:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt"],
                local_files_only=offline,
            )
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not a usable location"
        if offline:
            raise CheckpointError(
                f"{repo_id}: not a local directory, not an s3:// URI, and not in the Hugging Face "
                "hub cache (HF_HUB_OFFLINE is set, so the hub is not asked)"
            ) from exc
        raise CheckpointError(
            f"{repo_id}: not a local directory, not an s3:// URI, and not fetchable from the "
            f"Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def resolve_location(
    location: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None
) -> Path:
    """Local directory for a location (downloading S3/hub checkpoints to the cache first);
    ``storage_options``: where an ``s3://`` location's store is (see :func:`load_model`)."""
    loc = str(location)
    if loc.startswith("s3://"):
        return _download_s3(loc, storage_options)
    path = Path(loc).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{loc}: is a file; a checkpoint is a directory")
        return path
    if _looks_like_hub_id(loc):
        return _download_hub(loc)
    raise CheckpointError(f"{loc}: no such directory")


# ----------------------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _trust_root(d: Path) -> Path:
    """The folder a checkpoint's files may resolve into.

    The checkpoint folder itself, except for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>``), whose files are links to ``../../blobs/<sha>``.
    """
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        return d.parent.parent
    return d


def _checked_weights(d: Path, name: object, where: str) -> Path:
    """``d/name`` for a weights file named by the checkpoint (file name or index entry).

    Pickle names raise :class:`UnsafeCheckpointError`; a name that is not a ``.safetensors`` file
    inside the checkpoint folder (``..``, absolute, symlink out of it) or is missing raises
    :class:`CheckpointError`.
    """
    if isinstance(name, str) and name.lower().endswith(PICKLE_SUFFIXES):
        raise UnsafeCheckpointError(
            f"{where}: weights file {name!r} is pickle, which can run arbitrary code when loaded; "
            "only .safetensors shards are read"
        )
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise CheckpointError(f"{where}: weights file {name!r} is not a .safetensors file")
    try:
        path = safe_join(d, name, resolve=False)
    except UnsafePathError as exc:
        raise CheckpointError(f"{where}: weights file {name!r} is refused: {exc}") from None
    if not inside(_trust_root(d), path):
        raise CheckpointError(
            f"{where}: weights file {name!r} resolves outside the checkpoint folder (symlink)"
        )
    if not path.is_file():
        raise CheckpointError(f"{where}: weights file {name!r} not found")
    return path


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from a checkpoint file; one-line CheckpointError naming it otherwise."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable {what} ({_first_line(exc)})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(
            f"{path}: not a {what}: expected a JSON object, got {type(doc).__name__}"
        )
    return doc


def _safetensors_files(d: Path, location: str) -> list[Path]:
    """The validated safetensors weights of a full checkpoint, in load order."""
    if (d / WEIGHTS_FILE).is_file() or (d / WEIGHTS_FILE).is_symlink():
        return [_checked_weights(d, WEIGHTS_FILE, location)]
    index_path = d / WEIGHTS_INDEX
    weight_map = _read_json(index_path, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' object naming the weight shards")
    names = list(dict.fromkeys(weight_map.values()))
    if not all(isinstance(n, str) for n in names):
        bad = next(n for n in names if not isinstance(n, str))
        raise CheckpointError(
            f"{index_path}: weight_map values must be shard file names, got {bad!r}"
        )
    return [_checked_weights(d, n, str(index_path)) for n in sorted(names)]


def _read_safetensors(files: list[Path]) -> dict:
    """Tensors of every file, merged; one-line CheckpointError naming a corrupt/truncated file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict = {}
    for f in files:
        try:
            state.update(load_file(str(f), device="cpu"))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{f}: cannot load weights: not a readable safetensors file ({_first_line(exc)})"
            ) from None
    return state


def _pickle_files(d: Path) -> list[Path]:
    return sorted(
        p
        for p in d.iterdir()
        if p.is_file()
        and p.suffix in PICKLE_SUFFIXES
        and p.name not in ("optimizer.pt", "scheduler.pt")
    )


def _check_checkpoint_dir(d: Path, location: str, allow_pickle: bool) -> Path | None:
    """Validate a full checkpoint dir; return the pickle weights file to use, or None."""
    has_weights = any(
        (d / n).is_file() or (d / n).is_symlink() for n in (WEIGHTS_FILE, WEIGHTS_INDEX)
    )
    pickles = _pickle_files(d)
    missing = []
    if not (d / "config.json").is_file():
        missing.append("config.json")
    if not has_weights and not pickles:
        missing.append(f"{WEIGHTS_FILE} (or {WEIGHTS_INDEX})")
    if not ((d / PREPROCESSOR_CONFIG).is_file() or (d / PROCESSOR_CONFIG).is_file()):
        missing.append(f"{PREPROCESSOR_CONFIG} (or {PROCESSOR_CONFIG})")
    if not ((d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file()):
        missing.append("tokenizer.json or vocab.txt")
    if missing:
        raise CheckpointError(f"{location}: not a HemBLIP checkpoint; missing {', '.join(missing)}")
    if has_weights:
        return None
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{location}: weights are pickle files ({', '.join(p.name for p in pickles)}), which can "
            "run arbitrary code when loaded; convert them to safetensors or pass allow_pickle=True"
        )
    if not inside(_trust_root(d), pickles[0]):
        raise CheckpointError(
            f"{location}: weights file {pickles[0].name!r} resolves outside the "
            "checkpoint folder (symlink)"
        )
    return pickles[0]


def _image_processor(d: Path, location: str):
    """The BLIP image processor of a checkpoint folder.

    ``preprocessor_config.json`` when present; otherwise the ``image_processor`` section of
    ``processor_config.json`` (what transformers 5's ``BlipProcessor.save_pretrained`` writes),
    read here rather than left to transformers' file lookup, so a malformed one is a one-line
    error naming it.
    """
    from transformers import BlipImageProcessorPil

    if (d / PREPROCESSOR_CONFIG).is_file():
        try:
            return BlipImageProcessorPil.from_pretrained(str(d))
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{location}: cannot load {PREPROCESSOR_CONFIG}: {_first_line(exc)}"
            ) from exc
    path = d / PROCESSOR_CONFIG
    section = _read_json(path, "processor config").get("image_processor")
    if not isinstance(section, dict):
        raise CheckpointError(
            f"{path}: no 'image_processor' object with the image-processor settings "
            f"(got {type(section).__name__})"
        )
    try:
        return BlipImageProcessorPil.from_dict(section)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: bad 'image_processor' settings: {_first_line(exc)}"
        ) from None


def _load_processors(d: Path, location: str):
    from transformers import AutoTokenizer

    image_processor = _image_processor(d, location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{location}: cannot load processor/tokenizer: {exc}") from exc
    if tokenizer.bos_token is None:
        # BLIP's captions start with [DEC]; some tokenizer configs do not declare it.
        tokenizer.bos_token = "[DEC]"
    return image_processor, tokenizer


def _check_processor_size(image_processor, config, location: str) -> None:
    """The processor must resize crops to the vision tower's own input side (px).

    A checkpoint's processor settings are data: a hostile or mistaken ``size`` (say 60000 px)
    would make every crop be upsampled to it before the model, a memory bomb per batch, and any
    other size than ``vision_config.image_size`` does not fit BLIP's position embeddings anyway.
    """
    side = int(getattr(config.vision_config, "image_size", 0) or 0)
    size = getattr(image_processor, "size", None)
    size = dict(size) if size is not None else {}
    if getattr(image_processor, "do_resize", True) is False:
        raise CheckpointError(
            f"{location}: image processor has do_resize false; crops must be resized to "
            f"the model's {side} px input"
        )
    got = (size.get("height"), size.get("width"))
    if not (side and got == (side, side)):
        raise CheckpointError(
            f"{location}: image processor size {size or None!r} does not match the model's "
            f"{side} x {side} px input (vision_config.image_size)"
        )


def _load_full(d: Path, location: str, allow_pickle: bool) -> LoadedModel:
    import torch
    from safetensors import SafetensorError
    from transformers import BlipConfig, BlipForConditionalGeneration, GenerationConfig

    pickle_file = _check_checkpoint_dir(d, location, allow_pickle)
    # Weights are validated and read here, never chosen by transformers: from_pretrained(dir)
    # would follow the index to any file it names (a .bin shard is unpickled, ../ is followed).
    files = _safetensors_files(d, location) if pickle_file is None else [pickle_file]
    _quiet()
    image_processor, tokenizer = _load_processors(d, location)
    try:
        config = BlipConfig.from_pretrained(str(d))
        _check_processor_size(image_processor, config, location)
        if pickle_file is None:
            state = _read_safetensors(files)
            model = BlipForConditionalGeneration.from_pretrained(
                None, config=config, state_dict=state
            )
            # Where the weights came from, as from_pretrained(d) records it (peft's adapter
            # config and vocabulary check read it).
            model.name_or_path = model.config.name_or_path = str(d)
            if (d / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(str(d))
        else:
            model = BlipForConditionalGeneration(config)
            # The caller opted in to pickle; the restricted unpickler still refuses code objects.
            try:
                state = torch.load(pickle_file, map_location="cpu", weights_only=True)
            except (
                pickle.UnpicklingError
            ) as exc:  # code objects refused by the restricted unpickler
                raise CheckpointError(
                    f"{pickle_file}: refused by the restricted unpickler: {_first_line(exc)}"
                ) from exc
            result = model.load_state_dict(state, strict=False)
            missing = [k for k in result.missing_keys if "decoder.weight" not in k]
            if missing:
                raise CheckpointError(f"{pickle_file}: missing weights {', '.join(missing[:5])}")
            model.tie_weights()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{location}: cannot load weights: {_first_line(exc)}") from exc
    model.eval()
    return LoadedModel(model, image_processor, tokenizer, location, files)


def _adapter_weights(d: Path, location: str, allow_pickle: bool) -> Path:
    """The adapter weights file peft will read, validated (peft reads ``adapter_model.safetensors``
    when present, else ``adapter_model.bin``; nothing else)."""
    if (d / ADAPTER_WEIGHTS).is_file() or (d / ADAPTER_WEIGHTS).is_symlink():
        path = _checked_weights(d, ADAPTER_WEIGHTS, location)
        _read_safetensors([path])  # corrupt/truncated: a one-line error naming it, before peft
        return path
    pickles = [p for p in _pickle_files(d) if p.name.startswith("adapter_model")]
    if pickles and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{location}: adapter weights are pickle ({pickles[0].name}); pass allow_pickle=True"
        )
    pickle_file = d / ADAPTER_PICKLE
    if not pickle_file.is_file():
        raise CheckpointError(f"{location}: adapter directory; missing {ADAPTER_WEIGHTS}")
    if not inside(_trust_root(d), pickle_file):
        raise CheckpointError(
            f"{location}: adapter weights {ADAPTER_PICKLE!r} resolve outside the "
            "checkpoint folder (symlink)"
        )
    return pickle_file


def _relative_base(ref: str, d: Path, location: str) -> str:
    """A base location named by an adapter, a relative local path resolved against the adapter.

    Relative to the adapter's folder when it is there (for an ``s3://`` adapter: its URI,
    unless the name is a hub id); else relative to the current directory when it is there (what
    older releases wrote: the path as given at training time); else a hub id as written, or
    the adapter-relative path (reported missing).
    """
    if ref.startswith(("s3://", "~")) or Path(ref).is_absolute():
        return ref
    if (d / ref).exists():  # before specs: "base" is OUT/base, not the blip-base preset
        return str(d / ref)
    if is_config_spec(ref):
        return ref
    if location.startswith("s3://") and not _looks_like_hub_id(ref):
        import posixpath

        bucket, prefix = _parse_s3(location)
        key = posixpath.normpath(posixpath.join("/", prefix, ref)).lstrip("/")
        return f"s3://{bucket}/{key}"
    if Path(ref).exists() or _looks_like_hub_id(ref):
        return ref
    return str(d / ref)  # missing: the error names the path that was looked for


def _looks_like_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~"))


def _adapter_base(d: Path, location: str, adapter_config: dict) -> tuple[str, str]:
    """(base location, where it was read) from the adapter's own files."""
    if (d / ADAPTER_BASE).is_file():
        ref = _read_json(d / ADAPTER_BASE, "adapter base pointer").get("base")
        if ref is not None and not isinstance(ref, str):
            raise CheckpointError(
                f"{d / ADAPTER_BASE}: 'base' must be a location string, got {ref!r}"
            )
        if ref:
            return _relative_base(ref, d, location), ADAPTER_BASE
    ref = adapter_config.get("base_model_name_or_path")
    if not ref or not isinstance(ref, str):
        raise CheckpointError(
            f"{location}: adapter names no base model ({ADAPTER_BASE} missing and no "
            f"base_model_name_or_path in {ADAPTER_CONFIG}); pass --base DIR|URI"
        )
    return _relative_base(ref, d, location), ADAPTER_CONFIG


def _load_adapter(
    d: Path,
    location: str,
    allow_pickle: bool,
    base_override: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedModel:
    from safetensors import SafetensorError

    from hemblip.lora import load_adapter

    adapter_config = _read_json(d / ADAPTER_CONFIG, "adapter config")
    adapter_file = _adapter_weights(d, location, allow_pickle)
    if base_override is not None:
        base_ref, source = base_override, "--base"
    else:
        base_ref, source = _adapter_base(d, location, adapter_config)
    try:
        base = _load(base_ref, allow_pickle, adapter_ok=False, storage_options=storage_options)
    except CheckpointError as exc:
        hint = "" if source == "--base" else "; point --base DIR|URI at a local copy of the base"
        # Same class (UnsafeCheckpointError stays one); the adapter and the pointer are named.
        raise type(exc)(
            f"{location}: base model {base_ref!r} (from {source}): {_first_line(exc)}{hint}"
        ) from exc
    try:
        merged = load_adapter(base.model, d, merge=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{adapter_file}: refused by the restricted unpickler: {_first_line(exc)}"
        ) from exc
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{location}: cannot load adapter: {_first_line(exc)}") from exc
    merged.eval()
    files = [*base.weights_files, adapter_file]
    return LoadedModel(
        merged, base.image_processor, base.tokenizer, location, files, merged_adapter=True
    )


def _load(
    loc: str,
    allow_pickle: bool,
    *,
    adapter_ok: bool = True,
    base: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedModel:
    not_adapter = (
        f"--base {base!r} applies only to a LoRA adapter, and {loc!r} is not one "
        "(it is a full checkpoint or a config spec)"
    )
    if is_config_spec(loc):
        if base is not None:
            raise CheckpointError(not_adapter)
        return build_model(loc)
    d = resolve_location(loc, storage_options=storage_options)
    if (d / ADAPTER_CONFIG).is_file():
        if not adapter_ok:  # an adapter whose base is an adapter (or itself) would never end
            raise CheckpointError(
                f"{loc}: is an adapter, but it is named as an adapter's base model"
            )
        return _load_adapter(d, loc, allow_pickle, base, storage_options)
    if base is not None:
        raise CheckpointError(not_adapter)
    return _load_full(d, loc, allow_pickle)


def load_model(
    location: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    base: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load a checkpoint or adapter from a directory, ``s3://`` URI, hub id, or build a spec.

    ``base``: for a LoRA adapter, the base model location to use instead of the one the adapter
    names (``hemblip_base.json`` / peft's ``base_model_name_or_path``, e.g. a hub id), as
    ``--base`` gives it; relative paths are relative to the current directory. The version
    hashes the base's weights then the adapter's, as for any adapter. Refused (CheckpointError)
    for anything but an adapter.

    ``storage_options``: where ``s3://`` locations (the model, an adapter's base) are stored:
    ``endpoint_url`` (``http(s)://host[:port]``), ``region_name``, ``max_attempts`` (requests
    tried, botocore's standard retry mode); a missing key falls back to the environment
    (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``). The pipeline passes its run's
    settings here (``S3Settings.storage_options()``). Credentials always come from the standard
    AWS chain. An unknown key or bad value raises :class:`HemblipConfigError`.

    Raises :class:`CheckpointError` (message lists what is missing or what is refused) or
    :class:`UnsafeCheckpointError` (pickle weights without ``allow_pickle``, or a pickle shard
    named by a safetensors index).
    """
    _s3_options(storage_options)
    return _load(
        str(location),
        allow_pickle,
        base=None if base is None else os.fspath(base),
        storage_options=storage_options,
    )


# ----------------------------------------------------------------------------- saving


def save_model(model, image_processor, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write a loadable checkpoint: safetensors weights, config, processor and tokenizer files.

    Returns the weights file path (``out_dir/model.safetensors``).
    """
    from hemblip.tokenizer import vocab_lines

    _quiet()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    model.save_pretrained(str(out), safe_serialization=True)
    image_processor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "vocab.txt").write_text("\n".join(vocab_lines(tokenizer)) + "\n")
    return out / WEIGHTS_FILE
