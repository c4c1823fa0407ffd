"""Helpers of the nightly-job integration tests: buckets on the session S3 server, job configs
whose Ray workers can reach it, expected cell ids computed independently, output readers."""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.job.config import DEFAULT_FORWARD_ENV, JobConfig
from pipeline.job.identity import cell_id
from pipeline.job.listing import list_slides
from pipeline.job.storage import S3Settings, storage_for
from pipeline.job.writer import set_fault_hook, visible_parquet

__all__ = [
    "new_bucket",
    "put",
    "job_config",
    "read_table",
    "visible_files",
    "expected_cell_ids",
    "CORRUPT",
    "chunk_rows",
    "visible_cell_ids",
    "InjectedFault",
    "injected_fault",
    "FAULT_POINTS",
]

CORRUPT = b"not a slide: random bytes with a slide suffix\n" * 50
# Only the default (non-secret) variables: the session Ray cluster starts after the S3 fixture set
# its dummy credentials (conftest's ray_cluster depends on s3_server), so workers inherit them.
# Forwarding secrets would put them into Ray's logs (runtime_env), which test_faults_s3's
# credential scan of the session's Ray logs rightly reports.
_FORWARD = DEFAULT_FORWARD_ENV


def client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def new_bucket(endpoint: str) -> str:
    name = f"job-{uuid.uuid4().hex[:12]}"
    client(endpoint).create_bucket(Bucket=name)
    return name


def put(endpoint: str, bucket: str, key: str, data: bytes | Path) -> None:
    body = data.read_bytes() if isinstance(data, Path) else data
    client(endpoint).put_object(Bucket=bucket, Key=key, Body=body)


def job_config(
    endpoint: str, bucket: str, output: str | None = None, input: str | None = None, **kw
) -> JobConfig:
    kw.setdefault("caption_batch_size", 8)
    kw.setdefault("chunk_slides", 2)
    kw.setdefault("thumbnail_px", 48)
    # The bundled demo checkpoint unless JOB_TEST_MODEL names another checkpoint directory.
    kw.setdefault("model", os.environ.get("JOB_TEST_MODEL") or None)
    return JobConfig(
        input=input or f"s3://{bucket}/slides/",
        output=output or f"s3://{bucket}/out/",
        s3_endpoint=endpoint,
        forward_env=_FORWARD,
        **kw,
    )


def visible_files(cfg: JobConfig, table: str) -> list[str]:
    st = storage_for(cfg.output, S3Settings(cfg.s3_endpoint))
    return sorted(visible_parquet(st, cfg.output, table))


def read_table(cfg: JobConfig, table: str) -> pa.Table | None:
    st = storage_for(cfg.output, S3Settings(cfg.s3_endpoint))
    tables = [pq.read_table(io.BytesIO(st.read_bytes(u))) for u in visible_files(cfg, table)]
    return pa.concat_tables(tables) if tables else None


def expected_cell_ids(cfg: JobConfig, local: dict[str, Path]) -> dict[str, set[str]]:
    """``{slide_uri: {cell_id}}`` for slides whose local copy is given (key: object name), from
    the listing's identities and the detection stage run directly on the local file."""
    from pipeline.detect import DetectConfig, detect_slide

    st = storage_for(cfg.input, S3Settings(cfg.s3_endpoint))
    out = {}
    for ref in list_slides(st, cfg.input, cfg.extensions).slides:
        name = ref.uri.rsplit("/", 1)[-1]
        if name in local:
            res = detect_slide(
                local[name], DetectConfig(crop_um=cfg.crop_um, crop_px=cfg.crop_px, mpp=cfg.mpp)
            )
            out[ref.uri] = {
                cell_id(ref.slide_id, r["centroid_x"], r["centroid_y"]) for r in res.records
            }
    return out


def chunk_rows(ids, cells_per=2):
    """(cell rows, slide rows) of a chunk whose slides ``ids`` are ``ok`` with ``cells_per`` cells."""
    slides, cells = [], []
    for sid in ids:
        slides.append(
            {
                "slide_id": sid,
                "slide_uri": f"s3://b/{sid}.svs",
                "status": "ok",
                "cell_count": cells_per,
                "model_version": "v1",
                "run_id": "r1",
            }
        )
        for k in range(cells_per):
            cells.append({"cell_id": f"{sid}-{k}", "slide_id": sid, "cell_index": k})
    return cells, slides


def visible_cell_ids(out: Path) -> list[str]:
    """Sorted ``cell_id``s of the committed cells under a local output ``out``."""
    st = storage_for(str(out))
    ids = []
    for uri in visible_parquet(st, str(out), "cells"):
        ids += pq.read_table(io.BytesIO(st.read_bytes(uri))).column("cell_id").to_pylist()
    return sorted(ids)


# --------------------------------------------------------------------------- crash simulation

FAULT_POINTS = ("after_commit", "after_journal", "mid_publish")


class InjectedFault(PipelineError):
    """Raised by :func:`injected_fault`'s hook: the simulated kill of the writing process."""


@contextlib.contextmanager
def injected_fault(after_chunks: int, point: str = "after_commit"):
    """While active, every :class:`~pipeline.job.writer.OutputWriter` "dies" at ``point``:
    ``after_commit`` raises after chunk ``after_chunks`` is committed; ``after_journal`` /
    ``mid_publish`` raise while committing chunk ``after_chunks + 1``, after its journal is
    written / after its first cells file is published. A writer that died raises again at every
    later hook point (its run row, ...): a killed process writes nothing more."""
    if point not in FAULT_POINTS:
        raise ValueError(f"unknown fault point {point!r}")
    dead: set[int] = set()

    def hook(writer, at: str, number: int) -> None:
        if id(writer) in dead:
            raise InjectedFault(f"writer already killed (at {at})")
        due = number == after_chunks if at == "after_commit" else number == after_chunks + 1
        if at == point and due:
            dead.add(id(writer))
            raise InjectedFault(
                f"injected fault at {point} of chunk {number} (after {after_chunks} chunks)"
            )

    previous = set_fault_hook(hook)
    try:
        yield
    finally:
        set_fault_hook(previous)
