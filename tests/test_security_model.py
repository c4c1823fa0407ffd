"""Model checkpoints and dataset rows are hostile input: names from data never become paths
outside the folder they belong to, and weights come from validated safetensors files only.

- the S3 model mirror writes nothing outside ``$HEMBLIP_CACHE`` whatever the keys, bucket or
  prefix say (``..``, absolute, ``//``, backslash, symlinks planted in the cache), refuses the
  whole checkpoint on a hostile key, mirrors only checkpoint files (json/safetensors/txt) and is
  safe when several processes fill the cache at once;
- a ``model.safetensors.index.json`` may only name ``.safetensors`` shards inside the checkpoint
  directory (pickle shard: UnsafeCheckpointError; anything else: one-line CheckpointError), and
  the same holds for LoRA adapters;
- dataset rows naming ``../x`` or an absolute image path are refused with a one-line
  DatasetError naming the file and row (or recorded and skipped with ``skip_missing``).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_security import _Exploit, _write_exploit  # noqa: F401

from hemblip.errors import CheckpointError, DatasetError, UnsafeCheckpointError


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


def _tree(root: Path) -> list[str]:
    """Every path below ``root`` (symlinks not followed), relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------- the path helper


@pytest.mark.unit
def test_safe_join_property(tmp_path):
    """Any name: refused, or a path below the root that writing touches nothing outside."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from hemblip._paths import UnsafePathError, create_dirs_inside, safe_join

    root = (tmp_path / "root").resolve()
    root.mkdir()
    parts = st.sampled_from(
        ["..", ".", "", "a", "ü b", "\\..", "..\\..", "%2E%2E", "x.json", "/", "C:", "\x00", "\n"]
    )

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(parts, min_size=0, max_size=6).map("/".join))
    def check(rel):
        here = Path(tempfile.mkdtemp(dir=root))  # each example starts from an empty folder
        try:
            out = safe_join(here, rel)
        except UnsafePathError:
            return
        assert out.resolve().is_relative_to(here) and out.resolve() != here
        parent = create_dirs_inside(here, rel.split("/")[:-1])
        (parent / rel.split("/")[-1]).touch()

    check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from hemblip.model import build_model, save_model

    m = build_model("tiny")
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(m.model, m.image_processor, m.tokenizer, out)
    return out


def _copy_meta(src: Path, dst: Path) -> Path:
    """``src`` without its weights."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, dst / p.name)
    return dst


def _shard(
    src: Path,
    dst: Path,
    names: tuple[str, str] = (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ),
) -> Path:
    """A two-shard copy of ``src`` (index + shards written inside ``dst``)."""
    from safetensors.torch import load_file, save_file

    _copy_meta(src, dst)
    state = load_file(src / "model.safetensors")
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for name, part in zip(names, (keys[:half], keys[half:]), strict=True):
        save_file({k: state[k].contiguous() for k in part}, dst / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return dst


def _rewrite_index(d: Path, old: str, new: str) -> None:
    idx = d / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["weight_map"] = {k: (new if v == old else v) for k, v in doc["weight_map"].items()}
    idx.write_text(json.dumps(doc))


# --------------------------------------------------------------------------- sharded checkpoints

SHARD2 = "model-00002-of-00002.safetensors"


@pytest.mark.unit
def test_sharded_checkpoint_loads_its_own_shards(tiny_ckpt, tmp_path):
    from hemblip.model import load_model

    d = _shard(tiny_ckpt, tmp_path / "sharded")
    got = load_model(d)
    assert [p.name for p in got.weights_files] == sorted(
        ["model-00001-of-00002.safetensors", SHARD2]
    )
    ref = load_model(tiny_ckpt).model.state_dict()
    for k, v in got.model.state_dict().items():
        assert (v == ref[k]).all(), k


@pytest.mark.unit
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_index_naming_a_pickle_shard_is_refused(tiny_ckpt, tmp_path, allow_pickle):
    """The index is a safetensors index: a ``.bin`` shard in it is never unpickled."""
    from hemblip.model import load_model

    d = _shard(tiny_ckpt, tmp_path / "sharded")
    marker = tmp_path / "PWNED"
    _write_exploit(d / "pytorch_model-00002.bin", marker)
    (d / SHARD2).unlink()
    _rewrite_index(d, SHARD2, "pytorch_model-00002.bin")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_model(d, allow_pickle=allow_pickle)
    assert "pytorch_model-00002.bin" in _one_line(err.value)
    assert not marker.exists()


def _outside_shard(tmp_path: Path, d: Path) -> Path:
    """Move shard 2 out of the checkpoint, to ``tmp_path/outside/``."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    shutil.move(d / SHARD2, outside / SHARD2)
    return outside / SHARD2


@pytest.mark.unit
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "backslash", "nul"])
def test_index_entry_outside_the_checkpoint_is_refused(tiny_ckpt, tmp_path, how):
    from hemblip.model import load_model

    d = _shard(tiny_ckpt, tmp_path / "sharded")
    target = _outside_shard(tmp_path, d)
    entry = {
        "dotdot": f"../outside/{SHARD2}",
        "absolute": str(target),
        "symlink": SHARD2,
        "backslash": f"..\\outside\\{SHARD2}",
        "nul": f"{SHARD2}\x00.txt",
    }[how]
    if how == "symlink":
        (d / SHARD2).symlink_to(target)
    else:
        _rewrite_index(d, SHARD2, entry)
    with pytest.raises(CheckpointError) as err:
        load_model(d)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert repr(entry) in _one_line(err.value) or entry in str(err.value)


@pytest.mark.unit
def test_single_weights_file_symlinked_out_of_the_checkpoint_is_refused(tiny_ckpt, tmp_path):
    from hemblip.model import load_model

    d = _copy_meta(tiny_ckpt, tmp_path / "ckpt")
    (tmp_path / "elsewhere.safetensors").write_bytes((tiny_ckpt / "model.safetensors").read_bytes())
    (d / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors") as err:
        load_model(d)
    _one_line(err.value)


@pytest.mark.unit
def test_hub_snapshot_symlinks_into_its_blobs_still_load(tiny_ckpt, tmp_path):
    """The Hugging Face cache links ``snapshots/<rev>/*`` to ``../../blobs/<hash>``: allowed."""
    from hemblip.model import load_model

    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for p in tiny_ckpt.iterdir():
        shutil.copy(p, repo / "blobs" / p.name)
        (snap / p.name).symlink_to(Path("..", "..", "blobs", p.name))
    assert load_model(snap).version == load_model(tiny_ckpt).version


@pytest.mark.unit
@pytest.mark.parametrize(
    "index",
    [
        "{not json",
        "[]",
        '{"weight_map": []}',
        '{"weight_map": {}}',
        '{"weight_map": {"a": 5}}',
    ],
)
def test_malformed_index_is_a_one_line_error(tiny_ckpt, tmp_path, index):
    from hemblip.model import load_model

    d = _shard(tiny_ckpt, tmp_path / "sharded")
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json") as err:
        load_model(d)
    _one_line(err.value)


@pytest.mark.unit
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_shard_is_a_one_line_error(tiny_ckpt, tmp_path, damage):
    from hemblip.model import load_model

    d = _shard(tiny_ckpt, tmp_path / "sharded")
    data = (d / SHARD2).read_bytes()
    (d / SHARD2).write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError, match=SHARD2) as err:
        load_model(d)
    _one_line(err.value)


@pytest.mark.unit
def test_missing_shard_is_a_one_line_error(tiny_ckpt, tmp_path):
    from hemblip.model import load_model

    d = _shard(tiny_ckpt, tmp_path / "sharded")
    (d / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=SHARD2) as err:
        load_model(d)
    _one_line(err.value)


# --------------------------------------------------------------------------- LoRA adapters


@pytest.fixture(scope="module")
def tiny_adapter(tiny_ckpt, tmp_path_factory) -> Path:
    from hemblip.lora import LoraSettings, apply_lora, save_adapter
    from hemblip.model import load_model

    base = load_model(tiny_ckpt)
    peft_model = apply_lora(base.model, LoraSettings(full_layers=1))
    out = tmp_path_factory.mktemp("adapter") / "a"
    save_adapter(
        peft_model,
        out,
        base=str(tiny_ckpt),
        image_processor=base.image_processor,
        tokenizer=base.tokenizer,
    )
    return out


def _copy_adapter(src: Path, dst: Path, *, weights: bool = True) -> Path:
    shutil.copytree(src, dst)
    if not weights:
        (dst / "adapter_model.safetensors").unlink()
    return dst


@pytest.mark.unit
def test_adapter_loads(tiny_adapter, tmp_path):
    from hemblip.model import load_model

    got = load_model(_copy_adapter(tiny_adapter, tmp_path / "a"))
    assert got.merged_adapter and got.weights_files[-1].name == "adapter_model.safetensors"


@pytest.mark.unit
def test_adapter_weights_symlinked_out_are_refused(tiny_adapter, tmp_path):
    from hemblip.model import load_model

    d = _copy_adapter(tiny_adapter, tmp_path / "a")
    shutil.move(d / "adapter_model.safetensors", tmp_path / "elsewhere.safetensors")
    (d / "adapter_model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors") as err:
        load_model(d)
    _one_line(err.value)


@pytest.mark.unit
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_pickle_adapter_with_code_is_refused(tiny_adapter, tmp_path, allow_pickle):
    from hemblip.model import load_model

    d = _copy_adapter(tiny_adapter, tmp_path / "a", weights=False)
    marker = tmp_path / "PWNED"
    _write_exploit(d / "adapter_model.bin", marker)
    with pytest.raises((CheckpointError, UnsafeCheckpointError)) as err:
        load_model(d, allow_pickle=allow_pickle)
    assert isinstance(err.value, UnsafeCheckpointError) == (not allow_pickle)
    assert "adapter_model.bin" in _one_line(err.value)
    assert not marker.exists()


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, content",
    [
        ("adapter_model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"),
        ("adapter_model.safetensors", b""),
        ("adapter_config.json", b"{not json"),
        ("adapter_config.json", b"[1, 2]"),
        ("hemblip_base.json", b"{not json"),
        ("hemblip_base.json", b'{"base": 5}'),
    ],
)
def test_corrupt_adapter_files_are_one_line_errors(tiny_adapter, tmp_path, name, content):
    from hemblip.model import load_model

    d = _copy_adapter(tiny_adapter, tmp_path / "a")
    (d / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=name) as err:
        load_model(d)
    _one_line(err.value)


@pytest.mark.unit
@pytest.mark.parametrize("base", [".", "self"])
def test_adapter_naming_an_adapter_as_its_base_is_refused(tiny_adapter, tmp_path, base):
    """An adapter whose base is itself (or another adapter) would recurse without end."""
    from hemblip.model import load_model

    d = _copy_adapter(tiny_adapter, tmp_path / "a")
    (d / "hemblip_base.json").write_text(json.dumps({"base": "." if base == "." else str(d)}))
    with pytest.raises(CheckpointError, match="adapter") as err:
        load_model(d)
    _one_line(err.value)


# --------------------------------------------------------------------------- dataset rows


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(path)
    return path


def _hostile_names(tmp_path: Path) -> list[str]:
    """Names that would reach ``tmp_path/outside.png`` (a real image) from ``tmp_path/ds``."""
    _png(tmp_path / "outside.png")
    return [
        "../outside.png",
        "images/../../outside.png",
        str(tmp_path / "outside.png"),
        "..\\outside.png",
        "images//../../outside.png",
    ]


@pytest.mark.unit
def test_generic_csv_rows_cannot_leave_the_image_root(tmp_path):
    from hemblip.data import read_generic_csv

    root = tmp_path / "ds"
    _png(root / "images" / "ok.png")
    for bad in _hostile_names(tmp_path):
        csv_path = root / "samples.csv"
        with csv_path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "caption"])
            w.writerow(["images/ok.png", "This is a neutrophil."])
            w.writerow([bad, "This is a neutrophil."])
        with pytest.raises(DatasetError) as err:
            read_generic_csv(csv_path)
        assert f"{csv_path}:3" in _one_line(err.value), err.value
        with pytest.warns(UserWarning, match="skipped 1"):
            got = read_generic_csv(csv_path, skip_missing=True)
        assert len(got) == 1 and got.skipped[0].item.startswith(f"{csv_path}:3")


@pytest.mark.unit
def test_coco_file_names_cannot_leave_the_image_root(tmp_path):
    from hemblip.data import read_leukemia_attri

    root = tmp_path / "ds"
    _png(root / "ok.png")
    for bad in _hostile_names(tmp_path):
        doc = {
            "images": [{"id": 1, "file_name": "ok.png"}, {"id": 2, "file_name": bad}],
            "categories": [{"id": 1, "name": "myeloblast"}],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5]},
                {"id": 11, "image_id": 2, "category_id": 1, "bbox": [2, 2, 5, 5]},
            ],
        }
        p = root / "coco.json"
        p.write_text(json.dumps(doc))
        with pytest.raises(DatasetError) as err:
            read_leukemia_attri(p, mpp=0.1)
        assert f"{p}: annotation 11" in _one_line(err.value), err.value
        with pytest.warns(UserWarning, match="skipped 1"):
            got = read_leukemia_attri(p, skip_missing=True, mpp=0.1)
        assert len(got) == 1


@pytest.mark.unit
def test_wbcatt_rows_cannot_leave_the_image_root(tmp_path):
    from hemblip.data import read_wbcatt
    from hemblip.ontology import HEALTHY_ATTRIBUTES

    root = tmp_path / "ds"
    _png(root / "EO_1.jpg")
    row = {
        "img_name": "EO_1.jpg",
        "label": "Eosinophil",
        "cell_size": "small",
        "cell_shape": "round",
        "nucleus_shape": "segmented-bilobed",
        "nuclear_cytoplasmic_ratio": "low",
        "chromatin_density": "densely",
        "cytoplasm_vacuole": "no",
        "cytoplasm_texture": "clear",
        "cytoplasm_colour": "light blue",
        "granule_type": "round",
        "granule_colour": "red",
        "granularity": "yes",
        "path": "EO_1.jpg",
    }
    cols = ["img_name", "label", *(a.name for a in HEALTHY_ATTRIBUTES), "path"]
    for bad in _hostile_names(tmp_path):
        for column in ("path", "img_name"):
            csv_path = root / "pbc_attr_v1_train.csv"
            with csv_path.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=cols)
                w.writeheader()
                w.writerow(row)
                # Both candidates hostile: nothing inside the root may be tried instead.
                w.writerow(
                    dict(row, path=bad, img_name=bad)
                    if column == "path"
                    else dict(row, path="", img_name=bad)
                )
            with pytest.raises(DatasetError) as err:
                read_wbcatt(csv_path, root, mpp=0.1)
            assert f"{csv_path}:3" in _one_line(err.value), (bad, err.value)
            with pytest.warns(UserWarning, match="skipped 1"):
                got = read_wbcatt(csv_path, root, skip_missing=True, mpp=0.1)
            assert len(got) == 1


# --------------------------------------------------------------------------- S3 model mirror


@pytest.fixture
def s3_env(s3_server, tmp_path, monkeypatch):
    """(boto3 client, cache dir, a folder outside the cache that must stay empty)."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("HEMBLIP_CACHE", str(cache))
    outside = tmp_path / "outside"
    outside.mkdir()
    s3 = boto3.client("s3", endpoint_url=s3_server)
    if "models" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket="models")
    return s3, cache, outside


def _hostile_keys(prefix: str, outside: Path) -> list[str]:
    target = str(outside / "pwned.pth").lstrip("/")
    return [
        f"{prefix}/{'../' * 30}{target}",  # climbs out of the cache
        f"{prefix}//{target}",  # '//' makes the rest absolute
        f"{prefix}/sub/../../../../../../../../../../../../../../../../{target}",
        f"{prefix}/..",  # the cache folder's parent itself
        f"{prefix}/./config.json",
        f"{prefix}/..\\..\\x.json",  # a separator on Windows
    ]


@pytest.mark.integration
@pytest.mark.parametrize("i", range(6))
def test_s3_hostile_key_refuses_the_whole_checkpoint(s3_env, i):
    from hemblip.model import resolve_location

    s3, cache, outside = s3_env
    prefix = f"hostile{i}"
    key = _hostile_keys(prefix, outside)[i]
    s3.put_object(Bucket="models", Key=f"{prefix}/config.json", Body=b"{}")
    s3.put_object(Bucket="models", Key=key, Body=b"import os  # a .pth line runs at start-up\n")
    with pytest.raises(CheckpointError) as err:
        resolve_location(f"s3://models/{prefix}")
    assert repr(key) in _one_line(err.value) or key in str(err.value)
    assert _tree(outside) == []
    # Nothing of the checkpoint, not even its config (only the cache's own lock file).
    assert not [p for p in cache.rglob("*") if p.is_file() and p.parent.name != ".locks"], _tree(
        cache
    )


@pytest.mark.integration
def test_s3_hostile_bucket_or_prefix_in_the_uri_is_refused(s3_env, tmp_path):
    from hemblip.model import resolve_location

    _s3, cache, outside = s3_env
    climb = "../" * 30 + str(outside).lstrip("/")
    for uri in (
        "s3://../x",
        "s3://./x",
        f"s3://models/{climb}",
        "s3://models/a/../../../x",
        "s3://models/a//b",
        "s3://models/a\\..\\..\\b",
        "s3://models/./x",
    ):
        with pytest.raises(CheckpointError) as err:
            resolve_location(uri)
        assert uri in _one_line(err.value)
        assert _tree(outside) == []
        assert _tree(cache) in ([], ["s3"]), (uri, _tree(cache))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "outside"]


@pytest.mark.integration
def test_s3_mirror_does_not_follow_symlinks_planted_in_the_cache(s3_env):
    from hemblip.model import resolve_location

    s3, cache, outside = s3_env
    for key in ("planted/config.json", "planted/sub/tokenizer.json", "etags/config.json"):
        s3.put_object(Bucket="models", Key=key, Body=b"{}")
    # A folder of the mirror that is a symlink out of the cache.
    (cache / "s3" / "models" / "planted").mkdir(parents=True)
    (cache / "s3" / "models" / "planted" / "sub").symlink_to(outside)
    with pytest.raises(CheckpointError, match="planted/sub/tokenizer.json") as err:
        resolve_location("s3://models/planted")
    _one_line(err.value)
    assert _tree(outside) == []
    # A metadata file or a mirrored file that is a symlink out of the cache is replaced, not
    # written through.
    (cache / "s3" / "models" / "etags").mkdir()
    sentinel = outside / "sentinel"
    sentinel.write_text("SENTINEL")
    (cache / "s3" / "models" / "etags" / ".etags.json").symlink_to(sentinel)
    (cache / "s3" / "models" / "etags" / "config.json").symlink_to(sentinel)
    d = resolve_location("s3://models/etags")
    assert sentinel.read_text() == "SENTINEL" and _tree(outside) == ["sentinel"]
    assert (d / "config.json").read_bytes() == b"{}" and not (d / "config.json").is_symlink()


@pytest.mark.integration
def test_s3_mirror_writes_only_checkpoint_files(s3_env):
    from hemblip.model import resolve_location

    s3, cache, _outside = s3_env
    keys = {
        "only/config.json": b"{}",
        "only/vocab.txt": b"a\n",
        "only/model.safetensors": b"x",
        "only/evil.pth": b"import os\n",
        "only/sitecustomize.py": b"import os\n",
        "only/sub/x.pth": b"import os\n",
        "only/pytorch_model.bin": b"pickle",
        "only/.hidden.json": b"{}",
        "only/run.sh": b"rm -rf /\n",
    }
    for key, body in keys.items():
        s3.put_object(Bucket="models", Key=key, Body=body)
    d = resolve_location("s3://models/only")
    assert sorted(p.name for p in d.rglob("*") if not p.name.startswith(".")) == [
        "config.json",
        "model.safetensors",
        "vocab.txt",
    ]
    assert not (d / ".hidden.json").exists()


def _mirror_in_child(uri: str, env: dict, barrier) -> str:
    os.environ.update(env)
    from hemblip.model import resolve_location

    barrier.wait()
    return str(resolve_location(uri))


@pytest.mark.integration
def test_s3_mirror_is_safe_with_several_processes_at_once(s3_env, tiny_ckpt, tmp_path):
    """Several fresh processes mirror the same checkpoint into one cache at the same moment."""
    from concurrent.futures import ProcessPoolExecutor

    from hemblip.model import load_model

    s3, cache, _outside = s3_env
    for f in tiny_ckpt.iterdir():
        s3.upload_file(str(f), "models", f"race/tiny/{f.name}")
    env = {
        k: os.environ[k]
        for k in (
            "AWS_ENDPOINT_URL_S3",
            "HEMBLIP_CACHE",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        )
    }
    n = 4
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ProcessPoolExecutor(n, mp_context=ctx) as pool:
            futures = [
                pool.submit(_mirror_in_child, "s3://models/race/tiny", env, barrier)
                for _ in range(n)
            ]
            dirs = {f.result(timeout=300) for f in futures}
    assert len(dirs) == 1
    d = Path(dirs.pop())
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in tiny_ckpt.iterdir() if p.suffix in (".json", ".safetensors", ".txt")
    )
    assert not [p.name for p in d.rglob("*") if "part" in p.name or p.name.startswith(".tmp")]
    assert json.loads((d / ".etags.json").read_text())
    assert load_model(d).version == load_model(tiny_ckpt).version
