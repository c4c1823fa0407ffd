"""Open the nightly job's output location (local directory or ``s3://bucket/prefix``) as Arrow datasets.

Layout (docs/interfaces.md "Output layout")::

    OUTPUT/cells/run_date=YYYY-MM-DD/<file>.parquet    CELL_SCHEMA
    OUTPUT/slides/run_date=YYYY-MM-DD/<file>.parquet   SLIDE_SCHEMA
    OUTPUT/runs/run_date=YYYY-MM-DD/<file>.parquet     RUN_SCHEMA

Only committed data is read: every visible ``*.parquet`` file under ``cells/``, ``slides/``,
``runs/``. A path with any component starting with ``_`` or ``.`` (staging, journals, temporary
uploads) is never read. The hive partition ``run_date`` becomes a ``date32`` column.

S3 goes through :class:`pyarrow.fs.S3FileSystem` with the standard AWS credential chain; the
endpoint comes from ``s3_endpoint`` or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (for MinIO,
moto, ...). DuckDB's httpfs is not used: it cannot be loaded offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline.errors import ConfigError, StorageError
from pipeline.schema import CELL_SCHEMA, RUN_SCHEMA, SLIDE_SCHEMA

__all__ = ["TABLES", "PARTITION_FIELD", "Outputs", "open_outputs", "table_schema"]

#: table name -> schema of its Parquet files (without the partition column)
TABLES: dict[str, pa.Schema] = {"cells": CELL_SCHEMA, "slides": SLIDE_SCHEMA, "runs": RUN_SCHEMA}
PARTITION_FIELD = pa.field("run_date", pa.date32(), metadata={"unit": "", "description": "hive partition: UTC date of the run"})


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


def _endpoint(s3_endpoint: str | None) -> str | None:
    return s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _filesystem(location: str, s3_endpoint: str | None) -> tuple[pafs.FileSystem, str]:
    if location.startswith("s3://"):
        parsed = urlparse(location)
        if not parsed.netloc:
            raise ConfigError(f"--output {location!r}: missing bucket name (expected s3://bucket/prefix)")
        kwargs: dict[str, object] = {}
        endpoint = _endpoint(s3_endpoint)
        if endpoint:
            from pipeline._redact import has_credentials, redact_url

            if has_credentials(endpoint) or "@" in endpoint.partition("://")[2].split("/", 1)[0]:
                # As for the job: S3 clients never use an endpoint's userinfo; it could only leak.
                raise ConfigError(f"--s3-endpoint {redact_url(endpoint)!r}: credentials in the endpoint URL are "
                                  "not used by S3 clients; remove them and use the standard AWS credential chain")
            ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            if not ep.netloc:
                raise ConfigError(f"--s3-endpoint {redact_url(endpoint)!r}: expected http(s)://host[:port]")
            kwargs["endpoint_override"] = ep.netloc
            kwargs["scheme"] = ep.scheme
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
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
        raise ConfigError(f"--output {location!r}: only local directories and s3:// locations are supported")
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
        i.path for i in infos
        if i.type == pafs.FileType.File and _committed(i.path[len(root) + 1:])
    )
    partitioning = ds.partitioning(pa.schema([PARTITION_FIELD]), flavor="hive")
    try:
        return ds.dataset(
            files, schema=schema, format="parquet", filesystem=fs,
            partitioning=partitioning, partition_base_dir=root,
        )
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{location.rstrip('/')}/{name}: cannot open Parquet files: {exc}") from exc


def open_outputs(location: str, s3_endpoint: str | None = None) -> Outputs:
    """Open ``location``'s ``cells``, ``slides`` and ``runs`` tables.

    A missing table is an empty dataset with the right schema (a location where the job has not
    finished a run yet is still queryable). Raises ``ConfigError`` for a bad location and
    ``StorageError`` when listing fails.
    """
    fs, base = _filesystem(str(location), s3_endpoint)
    tables = {name: _open_table(fs, base, name, str(location)) for name in TABLES}
    return Outputs(location=str(location), **tables)
