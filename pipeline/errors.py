"""Exceptions of the ``pipeline`` package.

One base class, :class:`PipelineError`; every subclass also inherits the builtin error a caller
would naturally catch (``OSError`` for unreadable inputs, ``ValueError`` for bad settings), so
generic handlers keep working. Messages are one line and name the file/object and the cause.
"""

from __future__ import annotations

__all__ = [
    "PipelineError",
    "ConfigError",
    "SlideError",
    "SlideOpenError",
    "SlideReadError",
    "SlideTooLargeError",
    "ScaleError",
    "StorageError",
]


class PipelineError(Exception):
    """Base class of every error raised on purpose by ``pipeline``."""


class ConfigError(PipelineError, ValueError):
    """A setting (CLI flag, config-file key, dataclass field) is invalid; the message names it."""


class SlideError(PipelineError, OSError):
    """A slide or image could not be used. ``str(err)`` is ``"<path>: <cause>"``."""

    def __init__(self, path: object, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")

    def __str__(self) -> str:  # OSError's own __str__ would print the errno tuple
        return f"{self.path}: {self.cause}"

    def __reduce__(self):  # picklable across Ray workers
        return (type(self), (self.path, self.cause))


class SlideOpenError(SlideError):
    """The file is missing, empty, truncated, not an image, or in an unsupported format."""


class SlideReadError(SlideError):
    """The file opened but pixel data could not be decoded (e.g. a corrupt tile)."""


class SlideTooLargeError(SlideError):
    """Declared dimensions exceed the configured limit (decompression-bomb guard)."""


class ScaleError(SlideError):
    """No physical scale: no mpp in metadata, none given, and it could not be estimated."""


class StorageError(PipelineError, OSError):
    """An S3/local storage operation failed after retries; the message names the URI."""
