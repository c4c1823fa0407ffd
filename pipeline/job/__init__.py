"""The nightly job: slide archive (S3 or local) -> Ray Data -> per-cell Parquet, exactly once.

Public surface: :class:`JobConfig`/:func:`load_config` (settings), :func:`run_job` (one run),
:class:`RunResult`. Stages, storage backends and the writer live in their own modules.
"""

from __future__ import annotations

from pipeline.job.config import JobConfig, load_config
from pipeline.job.run import RunResult, format_summary, run_job

__all__ = ["JobConfig", "load_config", "run_job", "RunResult", "format_summary"]
