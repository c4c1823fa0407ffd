"""Open the nightly job's output location (local directory or ``s3://bucket/prefix``) as Arrow datasets.

Layout (docs/interfaces.md "Output layout")::

    OUTPUT/cells/run_date=YYYY-MM-DD/<file>.parquet    CELL_SCHEMA
    OUTPUT/slides/run_date=YYYY-MM-DD/<file>.parquet   SLIDE_SCHEMA
    OUTPUT/runs/run_date=YYYY-MM-DD/<file>.parquet     RUN_SCHEMA

Only committed data is read: every visible ``*.parquet`` file under ``cells/``, ``slides/``,
``runs/``. A path with any component starting with ``_`` or ``.`` (staging, journals, temporary
uploads) is never read. The hive partition ``run_date`` becomes a ``date32`` column.

S3 goes through :class:`pyarrow.fs.S3FileSystem` with the standard AWS credential chain and the
same :class:`~pipeline.job.storage.S3Settings` as the job (endpoint, region, retries); without
settings the endpoint comes from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (for MinIO,
moto, ...). DuckDB's httpfs is not used: it cannot be loaded offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline.errors import ConfigError, StorageError
from pipeline.schema import CELL_SCHEMA, RUN_SCHEMA, SLIDE_SCHEMA

if TYPE_CHECKING:
    from pipeline.job.storage import StorageOptions

__all__ = ["TABLES", "PARTITION_FIELD", "Outputs", "open_outputs", "table_schema"]

#: table name -> schema of its Parquet files (without the partition column)
TABLES: dict[str, pa.Schema] = {"cells": CELL_SCHEMA, "slides": SLIDE_SCHEMA, "runs": RUN_SCHEMA}
PARTITION_FIELD = pa.field(
    "run_date",
    pa.date32(),
    metadata={"unit": "", "description": "hive partition: UTC date of the run"},
)


def table_schema(table: str) -> pa.Schema:
    """Schema of a table as read: the file schema plus the ``run_date`` partition column."""
    return TABLES[table].append(PARTITION_FIELD)


@dataclass(frozen=True)
class Outputs:
    """The three output tables of one location, as lazily scanned Arrow datasets."""

    location: str
    cells: ds.Dataset
    slides: ds.Dataset
    runs: ds.Dataset

    def table(self, name: str) -> ds.Dataset:
        if name not in TABLES:
            raise ConfigError(f"unknown table {name!r}; expected one of {', '.join(TABLES)}")
        return getattr(self, name)


def _settings(s3_endpoint: str | None, storage_options: StorageOptions):
    """One :class:`~pipeline.job.storage.S3Settings` from the two ways a caller may say it."""
    from pipeline.job.storage import S3Settings, as_s3_settings

    settings = as_s3_settings(storage_options)
    if s3_endpoint is not None:
        if settings.endpoint is not None and settings.endpoint != s3_endpoint:
            raise ConfigError(
                f"--s3-endpoint {s3_endpoint!r} contradicts the storage options' endpoint"
            )
        settings = S3Settings(
            s3_endpoint,
            settings.max_attempts,
            settings.transfer_concurrency,
            settings.transfer_chunk_mb,
            settings.region,
        )
    return settings


def _filesystem(
    location: str, s3_endpoint: str | None, storage_options: StorageOptions = None
) -> tuple[pafs.FileSystem, str]:
    if location.startswith("s3://"):
        parsed = urlparse(location)
        if not parsed.netloc:
            raise ConfigError(
                f"--output {location!r}: missing bucket name (expected s3://bucket/prefix)"
            )
        # Endpoint checks (no credentials in it, http(s)://host[:port]) are S3Settings'.
        settings = _settings(s3_endpoint, storage_options)
        kwargs: dict[str, object] = {
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
        }
        endpoint = settings.resolved_endpoint
        if endpoint:
            if settings.endpoint is None:  # from the environment: checked like a given one
                from pipeline.job.storage import S3Settings

                S3Settings(endpoint=endpoint)
            ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs["endpoint_override"] = ep.netloc
            kwargs["scheme"] = ep.scheme
        region = settings.resolved_region
        if not region and not endpoint:
            try:  # real AWS: a bucket must be addressed in its own region
                region = pafs.resolve_s3_region(parsed.netloc)
            except Exception:  # noqa: BLE001 - no network / no permission: let the SDK default apply
                region = None
        if region:
            kwargs["region"] = region
        try:
            fs = pafs.S3FileSystem(**kwargs)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types; one message for the user
            raise StorageError(f"{location}: cannot open S3 filesystem: {exc}") from exc
        return fs, f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    if "://" in location:
        raise ConfigError(
            f"--output {location!r}: only local directories and s3:// locations are supported"
        )
    path = os.path.abspath(os.path.expanduser(location))
    if not os.path.isdir(path):
        raise ConfigError(f"--output {location}: no such directory")
    return pafs.LocalFileSystem(), path


def _committed(rel: str) -> bool:
    parts = rel.split("/")
    return rel.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in parts)


def _open_table(fs: pafs.FileSystem, base: str, name: str, location: str) -> ds.Dataset:
    root = f"{base}/{name}"
    schema = table_schema(name)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{location.rstrip('/')}/{name}: cannot list: {exc}") from exc
    files = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File and _committed(i.path[len(root) + 1 :])
    )
    partitioning = ds.partitioning(pa.schema([PARTITION_FIELD]), flavor="hive")
    try:
        return ds.dataset(
            files,
            schema=schema,
            format="parquet",
            filesystem=fs,
            partitioning=partitioning,
            partition_base_dir=root,
        )
    except Exception as exc:  # noqa: BLE001
        raise StorageError(
            f"{location.rstrip('/')}/{name}: cannot open Parquet files: {exc}"
        ) from exc


def open_outputs(
    location: str, s3_endpoint: str | None = None, *, storage_options: StorageOptions = None
) -> Outputs:
    """Open ``location``'s ``cells``, ``slides`` and ``runs`` tables.

    ``storage_options``: how to reach S3, the job's :class:`~pipeline.job.storage.S3Settings` or
    a mapping (``endpoint_url``, ``region_name``, ``max_attempts``); ``s3_endpoint`` is the
    endpoint alone (``--s3-endpoint``). Neither: the environment's.
    A missing table is an empty dataset with the right schema (a location where the job has not
    finished a run yet is still queryable). Raises ``ConfigError`` for a bad location or
    settings and ``StorageError`` when listing fails.
    """
    fs, base = _filesystem(str(location), s3_endpoint, storage_options)
    tables = {name: _open_table(fs, base, name, str(location)) for name in TABLES}
    return Outputs(location=str(location), **tables)
