"""Read-only SQL over the outputs: DuckDB views ``cells``, ``slides``, ``runs``, ``current_cells``,
``current_slides``.

The views are the Arrow datasets of :mod:`pipeline.outputs` (local or S3, hive column
``run_date``) plus ``current_cells`` (each slide's latest successful processing) and
``current_slides`` (each slide's latest outcome), registered on a private in-memory DuckDB
connection. After registration the connection is locked down (``enable_external_access=false``, ``lock_configuration=true``), so a
query can read the registered views and nothing else: no files, no ``COPY``, ``ATTACH`` or
extension installs. Only a single ``SELECT`` statement (``WITH ...``, ``FROM ...`` forms included)
is accepted.

Notebook use::

    from pipeline.query import query, query_arrow
    query("s3://bucket/out", "SELECT cell_type, count(*) FROM cells GROUP BY 1").df()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.outputs import TABLES, Outputs, open_outputs

if TYPE_CHECKING:
    from pipeline.job.storage import StorageOptions

__all__ = [
    "QueryError",
    "CURRENT_CELLS_SQL",
    "CURRENT_SLIDES_SQL",
    "connect",
    "query",
    "query_arrow",
    "open_outputs",
    "Outputs",
]


class QueryError(PipelineError, ValueError):
    """The SQL was refused (not a single SELECT) or failed in DuckDB; the message says why."""


#: Cells of each slide's latest successful processing (a slide re-run with a new model has
#: cells from several runs in ``cells``; analyses want one set per slide).
CURRENT_CELLS_SQL = """
CREATE VIEW current_cells AS
WITH latest AS (
    -- a row without finished_at still counts, ordered by its partition date
    SELECT slide_id, arg_max(run_id, coalesce(finished_at, run_date::TIMESTAMPTZ)) AS latest_run_id
    FROM slides WHERE status = 'ok' GROUP BY slide_id
)
SELECT c.* FROM cells AS c
JOIN latest AS l ON c.slide_id = l.slide_id AND c.run_id = l.latest_run_id
"""

#: Each slide's current state: its latest non-skipped ``slides`` row, one row per slide URI.
#: A skip is not an outcome (the job writes no row for a skipped slide unless --record-skipped),
#: so a run that skipped everything leaves a corrupt slide listed as failed until a later row
#: supersedes it: an ``ok`` of the same bytes (same slide_id) or of new bytes at the same URI (a
#: new etag, hence a new slide_id). A slide with only skipped rows keeps its latest skipped row.
CURRENT_SLIDES_SQL = """
CREATE VIEW current_slides AS
SELECT * FROM slides
QUALIFY row_number() OVER (
    PARTITION BY coalesce(slide_uri, slide_id)
    ORDER BY (status IS DISTINCT FROM 'skipped') DESC,
             coalesce(finished_at, run_date::TIMESTAMPTZ) DESC NULLS LAST, run_id DESC NULLS LAST) = 1
"""


def connect(
    outputs: Outputs | str,
    s3_endpoint: str | None = None,
    extra: dict[str, pa.Table] | None = None,
    *,
    storage_options: StorageOptions = None,
) -> duckdb.DuckDBPyConnection:
    """A locked-down in-memory DuckDB connection over the outputs.

    Views: ``cells``, ``slides``, ``runs`` (every committed row, column ``run_date`` from the
    partition), ``current_cells`` (cells of each slide's latest ``ok`` processing) and
    ``current_slides`` (each slide URI's latest non-skipped ``slides`` row: its current outcome). ``outputs``
    is an :class:`Outputs` or a location (local directory or ``s3://bucket/prefix``); ``extra``
    registers more Arrow tables (e.g. a cohort manifest) before the connection is locked;
    ``s3_endpoint``/``storage_options``: how to reach S3 (:func:`pipeline.outputs.open_outputs`).
    """
    if not isinstance(outputs, Outputs):
        outputs = open_outputs(outputs, s3_endpoint=s3_endpoint, storage_options=storage_options)
    con = duckdb.connect(":memory:")
    for name in TABLES:
        con.register(name, outputs.table(name))
    for name, table in (extra or {}).items():
        con.register(name, table)
    con.execute(CURRENT_CELLS_SQL)
    con.execute(CURRENT_SLIDES_SQL)
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _check_sql(sql: str) -> str:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"SQL does not parse: {str(exc).splitlines()[0]}") from exc
    if len(statements) != 1:
        raise QueryError(f"expected exactly one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryError(f"only read-only SELECT queries are allowed, got a {kind.name} statement")
    return sql.strip().rstrip(";")


def query(
    location: Outputs | str,
    sql: str,
    s3_endpoint: str | None = None,
    *,
    storage_options: StorageOptions = None,
) -> duckdb.DuckDBPyRelation:
    """Run one SELECT over the outputs; returns a lazy DuckDB relation (``.df()``, ``.arrow()``, ...).

    Raises :class:`QueryError` for anything but a single SELECT, or when DuckDB rejects it (e.g. a
    file read: external access is disabled).
    """
    sql = _check_sql(sql)
    con = connect(location, s3_endpoint=s3_endpoint, storage_options=storage_options)
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {str(exc).splitlines()[0]}") from exc


def query_arrow(
    location: Outputs | str,
    sql: str,
    s3_endpoint: str | None = None,
    *,
    storage_options: StorageOptions = None,
) -> pa.Table:
    """Like :func:`query`, materialised as an Arrow table."""
    rel = query(location, sql, s3_endpoint=s3_endpoint, storage_options=storage_options)
    try:
        return rel.to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {str(exc).splitlines()[0]}") from exc
