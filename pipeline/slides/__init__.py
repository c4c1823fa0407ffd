"""Open any whole slide or smear image behind one interface, wherever it is stored.

``open_slide(uri, storage_options=...)`` returns a :class:`Slide` (a context manager) and picks
the backend itself:

* a local file: OpenSlide formats through the OpenSlide backend, plain images through Pillow;
* ``s3://`` Aperio SVS or tiled TIFF in one object: read in place with ranged GETs of the tiles
  that reads touch (:func:`open_remote_slide`), never the whole object;
* anything else on S3 (multi-object slides such as MRXS or a DICOM series, formats that need
  the whole file, TIFFs the remote reader refuses): copied to a private scratch directory, opened
  there, and the copy removed when the slide is closed (or fails to open).

Errors are :class:`pipeline.errors.SlideError` subclasses whose text is ``"<uri>: <cause>"``
(always the slide's own name, never a scratch path), :class:`~pipeline.errors.StorageError` for
S3 failures after retries and :class:`~pipeline.errors.WorkerEnvironmentError` for a local
environment that cannot serve the slide (scratch space, a path this machine does not see).
"""

from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError, SlideError, SlideOpenError, WorkerEnvironmentError
from pipeline.slides._remote_tiff import open_remote_slide
from pipeline.slides._s3range import DEFAULT_MERGE_GAP, merge_ranges
from pipeline.slides._staging import (
    PartLike,
    check_local_file,
    confined_path,
    make_scratch_dir,
    staged_paths,
)
from pipeline.slides._tiff import _is_tiled_tiff, check_tiff_directories
from pipeline.slides.base import (
    DEFAULT_MAX_DECODE_MB,
    DEFAULT_MAX_PIXELS,
    MAX_SIDE_PX,
    MAX_TIFF_DIRECTORIES,
    Slide,
    check_open_args,
    decode_budget_bytes,
)

if TYPE_CHECKING:
    from pipeline.job.storage import StorageOptions

__all__ = [
    "open_slide",
    "open_remote_slide",
    "confined_path",
    "Slide",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_DECODE_MB",
    "MAX_SIDE_PX",
    "MAX_TIFF_DIRECTORIES",
    "REMOTE_SUFFIXES",
    "DEFAULT_MERGE_GAP",
    "merge_ranges",
]

#: TIFF-family suffixes the remote backend may read in place; it refuses (and the slide is
#: staged) anything else inside such a file, e.g. NDPI-like or plain non-tiled TIFFs.
REMOTE_SUFFIXES = (".svs", ".tif", ".tiff")


@dataclass(frozen=True)
class _Part:
    uri: str
    rel: str
    size: int | None
    etag: str


def open_slide(
    path: str | os.PathLike,
    mpp: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_mb: float = DEFAULT_MAX_DECODE_MB,
    *,
    storage_options: StorageOptions = None,
    scratch_dir: str | os.PathLike | None = None,
    parts: Sequence[PartLike] | None = None,
    open_rel: str | None = None,
) -> Slide:
    """Open ``path`` (a local file or an ``s3://bucket/key`` URI) as a :class:`Slide`.

    ``mpp``: level-0 µm/px to use when the file records none (``mpp_source`` becomes "user").
    ``max_pixels``: refuse plain images declaring more level-0 pixels than this, and any single
    read larger than this (:class:`~pipeline.errors.SlideTooLargeError`).
    ``max_decode_mb``: memory budget in MiB of any one decode, checked from the header before
    decoding: a plain image decoded whole, one tile of a tiled slide, one ``read``
    (:class:`~pipeline.errors.SlideTooLargeError` naming the dimensions, the need and the budget).
    ``storage_options``: how to reach S3, a :class:`pipeline.job.storage.S3Settings` or a mapping
    (``endpoint_url``, ``region_name``, ``max_attempts``, ...); None: the environment's.
    ``scratch_dir``: where a slide that must be staged is copied (default: the system temp
    folder's ``hemblip-scratch``); the copy is removed on ``close``, on a failed open, and when
    the slide object is garbage-collected unclosed.
    ``parts``/``open_rel``: a slide listed by the job (:class:`pipeline.job.listing.SlideRef`'s
    ``parts`` and ``open_rel``): its objects (several for MRXS or DICOM) and the one to open;
    the listed size and ETag pin what is read (an object replaced since the listing fails with
    :class:`~pipeline.errors.StorageError`), and a local part this machine cannot see is
    :class:`~pipeline.errors.WorkerEnvironmentError` rather than a defect of the slide.

    The returned slide has ``path`` = ``path`` (the URI, also for a staged copy),
    ``bytes_fetched`` (bytes read from S3; None for a local file) and ``staged``.
    Raises :class:`~pipeline.errors.SlideOpenError` for a missing, empty, truncated,
    unsupported, non-regular (FIFO, device) or non-image file, and for a TIFF with more than
    ``MAX_TIFF_DIRECTORIES`` directories.
    """
    mpp = check_open_args(mpp, max_pixels, max_decode_mb)
    uri = os.fspath(path)
    if not isinstance(uri, str):
        raise ConfigError(f"slide location must be a path or an s3:// URI, got {uri!r}")
    if parts is None and open_rel is not None:
        raise ConfigError(f"{uri}: open_rel names a part, but no parts were given")
    if parts is not None:
        parts = tuple(parts)
        rels = [p.rel for p in parts]
        if not parts or (open_rel if open_rel is not None else rels[0]) not in rels:
            raise ConfigError(
                f"{uri}: open_rel {open_rel!r} is not one of the slide's parts {rels!r}"
            )
        open_rel = open_rel if open_rel is not None else rels[0]
    if not uri.startswith("s3://"):
        if parts is None:
            check_local_file(Path(uri), uri)
            return _open_local(Path(uri), mpp, max_pixels, max_decode_mb)
        for part in parts:
            check_local_file(Path(part.uri), part.uri, part.etag or "")
        target = next(p for p in parts if p.rel == open_rel)
        return _open_local(Path(target.uri), mpp, max_pixels, max_decode_mb)

    from pipeline.job.storage import as_s3_settings, split_s3

    settings = as_s3_settings(storage_options)
    if parts is None:
        bucket, key = split_s3(uri)
        name = key.rsplit("/", 1)[-1]
        parts, open_rel = (_Part(uri, name, None, ""),), name
    spent = 0
    if len(parts) == 1 and parts[0].uri.lower().endswith(REMOTE_SUFFIXES):
        from pipeline.job.storage import s3_client

        part = parts[0]
        bucket, key = split_s3(part.uri)
        try:
            slide = open_remote_slide(
                s3_client(settings),
                bucket,
                key,
                mpp,
                max_pixels,
                size=part.size,
                etag=part.etag or None,
                max_decode_mb=max_decode_mb,
            )
        except SlideOpenError as exc:
            # Not a format read in place (or no such object): stage it, which either opens it
            # locally or reports the object's own error. The header bytes still count.
            spent = int(getattr(exc, "bytes_fetched", 0))
        else:
            return slide
    return _open_staged(
        uri, parts, open_rel, settings, scratch_dir, spent, mpp, max_pixels, max_decode_mb
    )


def _open_staged(
    uri, parts, open_rel, settings, scratch_dir, spent, mpp, max_pixels, max_decode_mb
) -> Slide:
    """Copy ``parts`` to a new scratch directory and open ``open_rel`` there (see open_slide)."""
    from pipeline.job.storage import storage_for

    slide_dir = make_scratch_dir(scratch_dir, uri.rstrip("/").rsplit("/", 1)[-1])
    try:
        storage = storage_for(uri, settings)
        dests, opened = staged_paths(uri, parts, open_rel, slide_dir)
        total = spent
        for part, dest in zip(parts, dests, strict=True):
            total += storage.download(part.uri, dest, etag=part.etag or None)
        try:
            slide = _open_local(opened, mpp, max_pixels, max_decode_mb)
        except (SlideError, WorkerEnvironmentError) as exc:
            raise _named(exc, uri, opened, slide_dir) from exc
        slide.path = uri  # later errors (reads, scale) name the object, not the copy
        slide.bytes_fetched = total
        slide.staged = True
        # Also when the caller drops the slide unclosed: the copy can be as large as the slide.
        slide.add_cleanup(weakref.finalize(slide, shutil.rmtree, str(slide_dir), True))
        return slide
    except BaseException:
        shutil.rmtree(slide_dir, ignore_errors=True)
        raise


def _named(exc: SlideError | WorkerEnvironmentError, uri: str, opened: Path, slide_dir: Path):
    """``exc`` (same class) naming ``uri`` instead of the staged copy's local path."""
    cause = exc.cause.replace(str(opened), uri).replace(str(slide_dir), "<scratch>")
    out = type(exc)(uri, cause)
    if hasattr(exc, "bytes_fetched"):
        out.bytes_fetched = exc.bytes_fetched
    return out


def _open_local(p: Path, mpp: float | None, max_pixels: int, max_decode_mb: float) -> Slide:
    """Open the local regular file ``p`` (already checked) with the OpenSlide or Pillow backend."""
    budget = decode_budget_bytes(max_decode_mb)
    try:
        st = p.stat()
    except OSError as exc:
        raise SlideOpenError(p, f"cannot stat: {exc.strerror or exc}") from None
    if st.st_size == 0:
        raise SlideOpenError(p, "empty file (0 bytes)")

    from pipeline.slides._openslide import OpenSlideSlide, detect_vendor

    vendor = detect_vendor(p)
    if vendor is not None:
        # Before OpenSlide walks every directory (the remote reader applies the same rule; a
        # plain multi-page TIFF goes to Pillow, which reads its first page only).
        check_tiff_directories(p)
        return OpenSlideSlide(p, vendor, mpp, max_pixels, budget)
    if _is_tiled_tiff(p):
        # A tiled TIFF is a slide format; when OpenSlide cannot walk it the file is damaged
        # (typically truncated), and decoding a surviving first page whole would hide that.
        raise SlideOpenError(p, "tiled TIFF that OpenSlide cannot read (truncated or corrupt)")
    from pipeline.slides._image import ImageSlide

    return ImageSlide(p, mpp, max_pixels, budget)
