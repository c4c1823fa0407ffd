"""Build, load and save HemBLIP models (``transformers.BlipForConditionalGeneration``).

A *location* is one of:

* a local directory holding a checkpoint (``config.json``, ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``, ``preprocessor_config.json``, tokenizer files) or a LoRA
  adapter directory written by :func:`hemblip.lora.save_adapter` (merged on load);
* ``s3://bucket/prefix``: every object under the prefix is downloaded once to a local cache
  (``$HEMBLIP_CACHE`` or ``~/.cache/hemblip``) with boto3's standard credential chain
  (``AWS_ENDPOINT_URL`` included), then loaded as a directory;
* a Hugging Face hub id (``Salesforce/blip-image-captioning-base``), only where a network exists
  (or the hub cache already holds it); only safetensors/JSON/text files are fetched.

Weights are read from safetensors only. Pickle weights (``.bin``/``.pt``/``.pth``/``.ckpt``) raise
:class:`~hemblip.errors.UnsafeCheckpointError` unless ``allow_pickle=True``. Remote code is never
trusted. A config *spec* (``tiny``, ``demo``, ``blip-base`` or ``config:NAME[,key=value...]``)
builds a fresh randomly initialised model with the offline word-level tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hemblip.errors import CheckpointError, HemblipConfigError, UnsafeCheckpointError

__all__ = [
    "LoadedModel",
    "PRESETS",
    "build_model",
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
ADAPTER_BASE = "hemblip_base.json"

#: Named architectures for ``config:`` specs. Dimensions: image px, ViT patch px, hidden sizes.
PRESETS: dict[str, dict[str, int]] = {
    # Unit tests: trains in seconds on a CPU.
    "tiny": dict(image_size=64, patch_size=16, vision_hidden=64, vision_layers=2, vision_heads=2,
                 text_hidden=64, text_layers=2, text_heads=2, max_positions=64),
    # The committed demo checkpoint (trained on 2 CPU cores in about 20 minutes).
    "demo": dict(image_size=112, patch_size=14, vision_hidden=192, vision_layers=4, vision_heads=4,
                 text_hidden=192, text_layers=3, text_heads=4, max_positions=96),
    # BLIP-base (Salesforce/blip-image-captioning-base): ViT-B/16 at 384 px, BERT-base decoder.
    "blip-base": dict(image_size=384, patch_size=16, vision_hidden=768, vision_layers=12,
                      vision_heads=12, text_hidden=768, text_layers=12, text_heads=12,
                      max_positions=512, vocab_size=30524),
}
_ALIASES = {"base": "blip-base"}


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
    return (s in PRESETS or s in _ALIASES) and not Path(s).exists()


def _parse_spec(spec: str) -> dict[str, int]:
    body = spec[len("config:"):] if spec.startswith("config:") else spec
    name, _, rest = body.partition(",")
    name = _ALIASES.get(name.strip(), name.strip())
    if name not in PRESETS:
        raise HemblipConfigError(
            f"--base {spec!r}: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    dims = dict(PRESETS[name])
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in PRESETS["tiny"] and key != "vocab_size":
            raise HemblipConfigError(
                f"--base {spec!r}: bad override {item!r}; use key=value with key in "
                f"{', '.join(list(PRESETS['tiny']) + ['vocab_size'])}")
        try:
            dims[key] = int(value)
        except ValueError:
            raise HemblipConfigError(f"--base {spec!r}: {key} must be an integer, got {value!r}") from None
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
        vocab_size=vocab_size, hidden_size=dims["text_hidden"],
        encoder_hidden_size=dims["vision_hidden"], intermediate_size=4 * dims["text_hidden"],
        num_hidden_layers=dims["text_layers"], num_attention_heads=dims["text_heads"],
        max_position_embeddings=dims["max_positions"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id,
    )
    if dims.get("vocab_size") == 30524:
        # BLIP-base keeps BERT's special-token ids; the word-level tokenizer is only for decoding.
        text_config.update(pad_token_id=0, bos_token_id=30522, eos_token_id=2, sep_token_id=102)
    vision_config = dict(
        image_size=dims["image_size"], patch_size=dims["patch_size"],
        hidden_size=dims["vision_hidden"], intermediate_size=4 * dims["vision_hidden"],
        num_hidden_layers=dims["vision_layers"], num_attention_heads=dims["vision_heads"],
        # BlipVisionConfig's default initializer_range is 1e-10 (fine for loading pretrained
        # weights): a model trained from scratch would start with an all-zero image embedding.
        initializer_range=0.02,
    )
    config = BlipConfig(text_config=text_config, vision_config=vision_config)
    if seed is not None:
        torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    image_processor = BlipImageProcessorPil(
        size={"height": dims["image_size"], "width": dims["image_size"]})
    return LoadedModel(model, image_processor, tokenizer, location=f"config:{spec.removeprefix('config:')}")


# ----------------------------------------------------------------------------- locations

def _quiet() -> None:
    """No per-shard progress bars from transformers: logs of batch jobs stay readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _cache_root() -> Path:
    return Path(os.environ.get("HEMBLIP_CACHE", Path.home() / ".cache" / "hemblip"))


def _download_s3(uri: str) -> Path:
    """Mirror every object under ``s3://bucket/prefix/`` into the cache; returns the local dir.

    Objects whose size and ETag match the cached copy are not fetched again.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise CheckpointError(f"{uri}: no bucket in the S3 URI")
    prefix = prefix.strip("/")
    local = _cache_root() / "s3" / bucket / prefix
    local.mkdir(parents=True, exist_ok=True)
    etags_path = local / ".etags.json"
    etags = json.loads(etags_path.read_text()) if etags_path.exists() else {}
    try:
        s3 = boto3.client("s3")
        n = 0
        for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) + 1 if prefix else 0:]
                if not rel or rel.endswith("/"):
                    continue
                n += 1
                dest = local / rel
                if (dest.exists() and dest.stat().st_size == obj["Size"]
                        and etags.get(rel) == obj["ETag"]):
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + ".part")
                s3.download_file(bucket, obj["Key"], str(tmp))
                tmp.replace(dest)
                etags[rel] = obj["ETag"]
    except (BotoCoreError, ClientError) as exc:
        raise CheckpointError(f"{uri}: cannot download checkpoint: {exc}") from exc
    if n == 0:
        raise CheckpointError(f"{uri}: no objects under this prefix")
    etags_path.write_text(json.dumps(etags))
    return local


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        return Path(snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"],
            local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not a usable location"
        raise CheckpointError(
            f"{repo_id}: not a local directory, not an s3:// URI, and not fetchable from the "
            f"Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def resolve_location(location: str | os.PathLike) -> Path:
    """Local directory for a location (downloading S3/hub checkpoints to the cache first)."""
    loc = str(location)
    if loc.startswith("s3://"):
        return _download_s3(loc)
    path = Path(loc).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{loc}: is a file; a checkpoint is a directory")
        return path
    if loc.count("/") == 1 and not loc.startswith((".", "/", "~")):
        return _download_hub(loc)
    raise CheckpointError(f"{loc}: no such directory")


# ----------------------------------------------------------------------------- loading

def _pickle_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES
                  and p.name not in ("optimizer.pt", "scheduler.pt"))


def _check_checkpoint_dir(d: Path, location: str, allow_pickle: bool) -> Path | None:
    """Validate a full checkpoint dir; return the pickle weights file to use, or None."""
    has_weights = (d / WEIGHTS_FILE).is_file() or (d / WEIGHTS_INDEX).is_file()
    pickles = _pickle_files(d)
    missing = []
    if not (d / "config.json").is_file():
        missing.append("config.json")
    if not has_weights and not pickles:
        missing.append(f"{WEIGHTS_FILE} (or {WEIGHTS_INDEX})")
    if not (d / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json")
    if not ((d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file()):
        missing.append("tokenizer.json or vocab.txt")
    if missing:
        raise CheckpointError(f"{location}: not a HemBLIP checkpoint; missing {', '.join(missing)}")
    if has_weights:
        return None
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{location}: weights are pickle files ({', '.join(p.name for p in pickles)}), which can "
            "run arbitrary code when loaded; convert them to safetensors or pass allow_pickle=True")
    return pickles[0]


def _load_processors(d: Path, location: str):
    from transformers import AutoTokenizer, BlipImageProcessorPil

    try:
        image_processor = BlipImageProcessorPil.from_pretrained(str(d))
        tokenizer = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{location}: cannot load processor/tokenizer: {exc}") from exc
    if tokenizer.bos_token is None:
        # BLIP's captions start with [DEC]; some tokenizer configs do not declare it.
        tokenizer.bos_token = "[DEC]"
    return image_processor, tokenizer


def _load_full(d: Path, location: str, allow_pickle: bool) -> LoadedModel:
    import torch
    from safetensors import SafetensorError
    from transformers import BlipConfig, BlipForConditionalGeneration

    pickle_file = _check_checkpoint_dir(d, location, allow_pickle)
    _quiet()
    image_processor, tokenizer = _load_processors(d, location)
    try:
        if pickle_file is None:
            model = BlipForConditionalGeneration.from_pretrained(str(d), use_safetensors=True)
            if (d / WEIGHTS_FILE).is_file():
                files = [d / WEIGHTS_FILE]
            else:
                index = json.loads((d / WEIGHTS_INDEX).read_text())
                files = [d / f for f in sorted(set(index["weight_map"].values()))]
        else:
            config = BlipConfig.from_pretrained(str(d))
            model = BlipForConditionalGeneration(config)
            # The caller opted in to pickle; the restricted unpickler still refuses code objects.
            try:
                state = torch.load(pickle_file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:  # code objects refused by the restricted unpickler
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{pickle_file}: refused by the restricted unpickler: {first}") from exc
            result = model.load_state_dict(state, strict=False)
            missing = [k for k in result.missing_keys if "decoder.weight" not in k]
            if missing:
                raise CheckpointError(f"{pickle_file}: missing weights {', '.join(missing[:5])}")
            model.tie_weights()
            files = [pickle_file]
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{location}: cannot load weights: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return LoadedModel(model, image_processor, tokenizer, location, files)


def _load_adapter(d: Path, location: str, allow_pickle: bool) -> LoadedModel:
    from hemblip.lora import load_adapter

    if not (d / ADAPTER_WEIGHTS).is_file():
        pickles = [p for p in _pickle_files(d) if p.name.startswith("adapter_model")]
        if pickles and not allow_pickle:
            raise UnsafeCheckpointError(
                f"{location}: adapter weights are pickle ({pickles[0].name}); pass allow_pickle=True")
        if not pickles:
            raise CheckpointError(f"{location}: adapter directory; missing {ADAPTER_WEIGHTS}")
    base_ref = None
    if (d / ADAPTER_BASE).is_file():
        base_ref = json.loads((d / ADAPTER_BASE).read_text()).get("base")
        if base_ref and not base_ref.startswith("s3://") and not Path(base_ref).is_absolute():
            candidate = d / base_ref
            if candidate.exists():
                base_ref = str(candidate)
    if not base_ref:
        base_ref = json.loads((d / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_ref:
        raise CheckpointError(f"{location}: adapter names no base model ({ADAPTER_BASE} missing)")
    base = load_model(base_ref, allow_pickle=allow_pickle)
    merged = load_adapter(base.model, d, merge=True)
    merged.eval()
    adapter_file = d / ADAPTER_WEIGHTS
    files = base.weights_files + ([adapter_file] if adapter_file.is_file() else [])
    return LoadedModel(merged, base.image_processor, base.tokenizer, location, files, merged_adapter=True)


def load_model(location: str | os.PathLike, *, allow_pickle: bool = False) -> LoadedModel:
    """Load a checkpoint or adapter from a directory, ``s3://`` URI, hub id, or build a spec.

    Raises :class:`CheckpointError` (message lists what is missing) or
    :class:`UnsafeCheckpointError` (pickle weights without ``allow_pickle``).
    """
    loc = str(location)
    if is_config_spec(loc):
        return build_model(loc)
    d = resolve_location(loc)
    if (d / ADAPTER_CONFIG).is_file():
        return _load_adapter(d, loc, allow_pickle)
    return _load_full(d, loc, allow_pickle)


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
