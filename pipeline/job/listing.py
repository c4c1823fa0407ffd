"""List a slide archive (S3 prefix or local directory) and group objects into slides.

Rules: an object is a slide when its suffix is in the configured extensions (case-insensitive).
``NAME.mrxs`` is one slide together with every object under ``NAME/`` (its data folder).
``.dcm`` files in the same folder are one DICOM series = one slide (OpenSlide opens a series from
any of its files). Everything else is reported as a non-slide object and not processed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from pipeline.job.identity import combined_etag, slide_id
from pipeline.job.storage import ObjectInfo, Storage, is_s3

__all__ = ["SlidePart", "SlideRef", "Listing", "list_slides"]


@dataclass(frozen=True)
class SlidePart:
    """One object of a slide; ``rel`` is its path relative to the slide's base folder."""

    uri: str
    rel: str
    size: int  # bytes
    etag: str


@dataclass(frozen=True)
class SlideRef:
    """A slide to process: identity (``slide_id`` from ``uri`` + ``etag`` + ``size``) and its parts.

    ``open_rel`` is the part OpenSlide opens once all parts are staged side by side.
    """

    slide_id: str
    uri: str
    etag: str
    size: int  # bytes, all parts
    parts: tuple[SlidePart, ...]
    open_rel: str


@dataclass(frozen=True)
class Listing:
    slides: tuple[SlideRef, ...]
    ignored: tuple[str, ...]  # URIs of non-slide objects


def _split(uri: str) -> tuple[str, str]:
    """(folder, name) with ``/`` separators for S3 and local paths alike."""
    norm = uri if is_s3(uri) else uri.replace("\\", "/")
    folder, _, name = norm.rpartition("/")
    return folder, name


def _ext(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _single(obj: ObjectInfo) -> SlideRef:
    _, name = _split(obj.uri)
    part = SlidePart(obj.uri, name, obj.size, obj.etag)
    return SlideRef(
        slide_id(obj.uri, obj.etag, obj.size), obj.uri, obj.etag, obj.size, (part,), name
    )


def _group(uri: str, base: str, objs: list[ObjectInfo], open_name: str) -> SlideRef:
    parts = tuple(
        SlidePart(o.uri, o.uri.replace("\\", "/")[len(base) + 1 :], o.size, o.etag) for o in objs
    )
    etag = combined_etag((p.rel, p.etag, p.size) for p in parts)
    size = sum(p.size for p in parts)
    return SlideRef(slide_id(uri, etag, size), uri, etag, size, parts, open_name)


def list_slides(storage: Storage, prefix: str, extensions: tuple[str, ...]) -> Listing:
    """Every slide under ``prefix`` (paginated listing), in URI order, plus the ignored objects."""
    objects = [o for o in storage.list(prefix)]
    exts = {e.lower() for e in extensions}
    slides: list[SlideRef] = []
    ignored: list[str] = []
    claimed: set[str] = set()
    by_uri = {o.uri.replace("\\", "/"): o for o in objects}
    # MRXS first: claim the data folder's objects so they are not reported as non-slides.
    if ".mrxs" in exts:
        for o in objects:
            folder, name = _split(o.uri)
            if _ext(name) != ".mrxs":
                continue
            data_dir = o.uri.replace("\\", "/")[: -len(".mrxs")] + "/"
            members = [v for k, v in by_uri.items() if k.startswith(data_dir)]
            group = [o] + members
            claimed.update(x.uri for x in group)
            slides.append(_group(o.uri, folder, group, name))
    if ".dcm" in exts:
        series: dict[str, list[ObjectInfo]] = defaultdict(list)
        for o in objects:
            if o.uri in claimed:
                continue
            folder, name = _split(o.uri)
            if _ext(name) == ".dcm":
                series[folder].append(o)
        for folder, members in series.items():
            members.sort(key=lambda x: x.uri)
            claimed.update(x.uri for x in members)
            uri = folder + "/"
            slides.append(_group(uri, folder, members, _split(members[0].uri)[1]))
    for o in objects:
        if o.uri in claimed:
            continue
        _, name = _split(o.uri)
        if name.startswith("."):  # hidden/temporary files (e.g. partial uploads) are never slides
            ignored.append(o.uri)
        elif _ext(name) in exts:
            slides.append(_single(o))  # even an empty object: it fails later with a reason
        else:
            ignored.append(o.uri)
    slides.sort(key=lambda s: s.uri)
    return Listing(tuple(slides), tuple(ignored))
