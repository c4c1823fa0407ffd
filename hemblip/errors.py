"""Exceptions of the ``hemblip`` package: one base class, subclasses also inherit a builtin."""

from __future__ import annotations

__all__ = [
    "HemblipError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "DatasetError",
    "HemblipConfigError",
]


class HemblipError(Exception):
    """Base class of every error raised on purpose by ``hemblip``."""


class CheckpointError(HemblipError, FileNotFoundError):
    """A model location is not a usable checkpoint; the message lists what is missing."""


class UnsafeCheckpointError(HemblipError, PermissionError):
    """A checkpoint holds pickle weights (``.bin``/``.pt``/``.pth``) and pickle was not allowed."""


class DatasetError(HemblipError, ValueError):
    """A training/evaluation dataset file is malformed; the message names the file and row."""


class HemblipConfigError(HemblipError, ValueError):
    """A training/inference setting is invalid; the message names the flag at fault."""
