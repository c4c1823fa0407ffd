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
    "WorkerEnvironmentError",
    "WorkerDiedError",
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


class WorkerEnvironmentError(PipelineError, OSError):
    """The worker's environment cannot serve a slide that may well be fine: a local input path
    this node does not see, permission denied, a scratch directory that is read-only, full or too
    deep for the file system's path limit. Not the slide's fault, so never settled for good: the
    next run retries it. ``str(err)`` is ``"<path>: <cause>"``."""

    def __init__(self, path: object, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")

    def __str__(self) -> str:
        return f"{self.path}: {self.cause}"

    def __reduce__(self):
        return (type(self), (self.path, self.cause))


class WorkerDiedError(PipelineError, RuntimeError):
    """The worker process died (killed by a signal, out of memory, crashed in a decoder) every
    time it worked on a slide, as many times as the job allows (``max_slide_attempts``); the slide
    is then recorded failed without being opened again. ``str(err)`` is ``"<uri>: <cause>"``."""

    def __init__(self, uri: object, cause: str):
        self.uri = str(uri)
        self.cause = cause
        super().__init__(f"{self.uri}: {cause}")

    def __reduce__(self):
        return (type(self), (self.uri, self.cause))
