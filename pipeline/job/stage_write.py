"""Write stage: the workers write the cells they captioned; the driver receives metadata only.

A Ray Data actor (:class:`WriteStage`, fractional CPU) after the caption stage. For each slide in
a batch it builds the typed ``cells`` table (:data:`pipeline.schema.CELL_SCHEMA`) from the batch's
columns and writes it as one Parquet file under ``OUTPUT/_staging/<run_id>/w/`` named after the
slide and a digest of its sorted cell ids (:func:`staged_name`): a task that Ray re-executes with
the same rows overwrites the same file, and a re-execution that batches differently writes other
names, which the driver tells apart by their cell ids (``pipeline.job.run``). Slide outcome rows
pass through. Nothing per cell reaches the driver but 16 bytes of id.

Batch in (from :mod:`pipeline.job.stage_caption`): ``kind``, ``slide_id``, ``thumbnail``, the
detect stage's typed cell columns (``stage_detect.CELL_FIELDS``), ``outcome``, and the caption
columns (``stage_caption.OUTPUT_KEYS``). In string columns ``""`` means null (as do ``None``
and NaN, should a column arrive as Ray Data's float for all-null).

Batch out (one row per staged file, then one per slide outcome in the batch):

``kind``             (M,) object   ``"file"`` or ``"slide"``
``slide_id``         (M,) object   slide identity (32 hex chars)
``uri``              (M,) object   the staged file (``""`` on slide rows)
``n_cells``          (M,) int64    rows in the file (0 on slide rows)
``nbytes``           (M,) int64    size of the file, bytes
``cell_ids``         (M,) object   bytes: the file's cell ids, 16 bytes each (binary of the hex id), sorted
``caption_seconds``  (M,) float64  caption time of the file's cells, s
``cell_types``       (M,) object   JSON ``{cell_type or "(none)": count}`` of the file's cells
``outcome``          (M,) object   the slide's outcome JSON on slide rows (``""`` on file rows)

:func:`compact_files` runs as a worker task at commit: it merges a chunk's small staged files
into one file of up to ``target_file_mb``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import socket
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.consistency import CHECKED_COLUMNS
from pipeline.job.storage import S3Settings, Storage, join_uri, storage_for
from pipeline.schema import CELL_SCHEMA, QC_FLAGS

__all__ = [
    "WriteStage",
    "OUTPUT_KEYS",
    "staged_name",
    "cells_table",
    "compact_files",
    "ray_compactor",
    "WRITER_KEY",
    "ID_BYTES",
]

OUTPUT_KEYS = (
    "kind",
    "slide_id",
    "uri",
    "n_cells",
    "nbytes",
    "cell_ids",
    "caption_seconds",
    "cell_types",
    "outcome",
)
#: Parquet key-value metadata naming the process that wrote a cells file (``host:pid``).
WRITER_KEY = b"hemblip.writer"
ID_BYTES = 16  # a cell id is 32 hex chars


def staged_name(slide_id: str, cell_ids: Sequence[str]) -> str:
    """``<slide_id>-<24 hex>.parquet``: the same slide and set of cells always give the same name."""
    h = hashlib.sha256(slide_id.encode())
    for cid in sorted(cell_ids):
        h.update(b"\n" + cid.encode())
    return f"{slide_id}-{h.hexdigest()[:24]}.parquet"


def _texts(col: np.ndarray) -> list[str | None]:
    """Strings of a batch column; ``""``, ``None`` and NaN (the stages' "none") become null."""
    out: list[str | None] = []
    for v in col:
        if v is None or v == "" or (isinstance(v, float | np.floating) and math.isnan(v)):
            out.append(None)
        else:
            out.append(str(v))
    return out


def _floats(col: np.ndarray) -> pa.Array:
    # NaN is how a float batch column says "none" (not measured, no confidence); the table says null.
    arr = np.asarray(col, dtype=np.float64)
    return pa.array(arr, pa.float64(), mask=~np.isfinite(arr))


def _writer_tag() -> bytes:
    return f"{socket.gethostname()}:{os.getpid()}".encode()


def _parquet_bytes(table: pa.Table) -> bytes:
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), WRITER_KEY: _writer_tag()}
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=8192)
    return buf.getvalue()


def cells_table(
    batch: dict[str, np.ndarray], rows: np.ndarray, base: dict[str, str], check=None
) -> pa.Table:
    """The ``cells`` rows ``rows`` (indices into ``batch``) as a table of :data:`CELL_SCHEMA`.
    ``base``: the run-wide columns (run_id, model_id, model_version, pipeline_version,
    schema_version). ``check``: :func:`pipeline.consistency.check_consistency` or None (nulls)."""
    n = len(rows)
    cols: dict[str, pa.Array] = {}
    for field in CELL_SCHEMA:
        name, typ = field.name, field.type
        if name in base:
            cols[name] = pa.array([base[name]] * n, typ)
        elif name == "qc_flags":
            masks = np.asarray(batch["qc_mask"], dtype=np.int64)[rows]
            cols[name] = pa.array(
                [[f for i, f in enumerate(QC_FLAGS) if m >> i & 1] for m in masks.tolist()], typ
            )
        elif name == "thumbnail_jpeg":
            thumbs = batch["thumbnail"][rows]
            cols[name] = pa.array(
                [
                    bytes(t) if isinstance(t, bytes | bytearray | np.bytes_) and len(t) else None
                    for t in thumbs
                ],
                typ,
            )
        elif name in ("consistent", "inconsistent_attributes"):
            continue  # below, from the other columns
        elif pa.types.is_floating(typ):
            cols[name] = _floats(batch[name][rows])
        elif pa.types.is_integer(typ):
            cols[name] = pa.array(np.asarray(batch[name][rows]).astype(typ.to_pandas_dtype()), typ)
        else:
            cols[name] = pa.array(_texts(batch[name][rows]), typ)
    consistent: list[bool | None] = [None] * n
    bad: list[list[str]] = [[] for _ in range(n)]
    if check is not None:
        needed = [c for c in CHECKED_COLUMNS if c in cols]
        view = {c: cols[c].to_pylist() for c in needed}
        for i in range(n):
            consistent[i], b = check({c: view[c][i] for c in needed})
            bad[i] = list(b)
    cols["consistent"] = pa.array(consistent, pa.bool_())
    cols["inconsistent_attributes"] = pa.array(bad, pa.list_(pa.string()))
    return pa.Table.from_arrays([cols[f.name] for f in CELL_SCHEMA], schema=CELL_SCHEMA)


def _check_consistency():
    try:
        from pipeline.consistency import check_consistency
    except ImportError:  # optional: the columns stay null without it
        return None
    return check_consistency


class WriteStage:
    """Callable class for ``Dataset.map_batches(compute=ActorPoolStrategy(...))``: writes each
    slide's cells of a batch under ``OUTPUT/_staging/<run_id>/w/`` (see the module doc).

    ``output``: OUTPUT (local directory shared by every node, or ``s3://``); ``base``: the
    run-wide cell columns (see :func:`cells_table`).
    """

    def __init__(self, output: str, s3: S3Settings, run_id: str, base: dict[str, str]):
        self.storage: Storage = storage_for(output, s3)
        self.dir = join_uri(output, "_staging", run_id, "w")
        self.base = dict(base)
        self.check = _check_consistency()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds = batch["kind"]
        sids = batch["slide_id"]
        n = len(kinds)
        by_slide: dict[str, list[int]] = {}
        outcomes: list[int] = []
        for i in range(n):
            if kinds[i] == "cell":
                by_slide.setdefault(str(sids[i]), []).append(i)
            else:
                outcomes.append(i)
        out: dict[str, list] = {k: [] for k in OUTPUT_KEYS}
        for sid, idx in by_slide.items():
            rows = np.asarray(idx, dtype=np.int64)
            ids = [str(c) for c in batch["cell_id"][rows]]
            table = cells_table(batch, rows, self.base, self.check)
            data = _parquet_bytes(table)
            uri = join_uri(self.dir, staged_name(sid, ids))
            self.storage.write_bytes(uri, data)
            types = Counter(
                t if t is not None else "(none)" for t in _texts(batch["cell_type"][rows])
            )
            secs = np.asarray(batch["caption_seconds"][rows], dtype=np.float64)
            out["kind"].append("file")
            out["slide_id"].append(sid)
            out["uri"].append(uri)
            out["n_cells"].append(len(ids))
            out["nbytes"].append(len(data))
            out["cell_ids"].append(b"".join(bytes.fromhex(c) for c in sorted(ids)))
            out["caption_seconds"].append(float(np.nansum(secs)))
            out["cell_types"].append(json.dumps(dict(types)))
            out["outcome"].append("")
        for i in outcomes:
            out["kind"].append("slide")
            out["slide_id"].append(str(sids[i]))
            out["uri"].append("")
            out["n_cells"].append(0)
            out["nbytes"].append(0)
            out["cell_ids"].append(b"")
            out["caption_seconds"].append(0.0)
            out["cell_types"].append("{}")
            out["outcome"].append(str(batch["outcome"][i]))
        result = {}
        for key, values in out.items():
            if key in ("n_cells", "nbytes"):
                result[key] = np.asarray(values, dtype=np.int64)
            elif key == "caption_seconds":
                result[key] = np.asarray(values, dtype=np.float64)
            else:
                arr = np.empty(len(values), dtype=object)
                arr[:] = values
                result[key] = arr
        return result


def compact_files(storage: Storage, sources: Sequence[str], dest: str) -> int:
    """Merge the staged cells files ``sources`` into ``dest`` (written atomically), then delete the
    sources; returns rows written. Idempotent for a retried task: when ``dest`` exists and a
    source is already gone, the earlier attempt finished."""
    try:
        tables = [pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in sources]
    except Exception:
        if storage.exists(dest) and not all(storage.exists(u) for u in sources):
            return -1
        raise
    table = pa.concat_tables([t.cast(CELL_SCHEMA) for t in tables])
    storage.write_bytes(dest, _parquet_bytes(table))
    for u in sources:
        storage.delete(u)
    return table.num_rows


def ray_compactor(num_cpus: float = 0.0, runtime_env: dict | None = None):
    """A ``compactor`` for :class:`~pipeline.job.writer.OutputWriter` that runs each job as a Ray
    task. It reserves no CPU by default: the commit waits on it while the stream's detect tasks
    and actors hold the node's CPUs, so any reservation can wait for ever on a small node."""

    def run(storage: Storage, jobs: list[tuple[list[str], str]]) -> None:
        import ray

        opts = {"num_cpus": num_cpus, "max_retries": 3}
        if runtime_env:
            opts["runtime_env"] = runtime_env
        task = ray.remote(**opts)(compact_files)
        ray.get([task.remote(storage, sources, dest) for sources, dest in jobs])

    return run
