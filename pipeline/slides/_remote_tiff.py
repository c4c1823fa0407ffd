"""Remote TIFF backend: Aperio SVS and generic tiled TIFF read straight from S3, tile by tile.

The TIFF header and IFDs are parsed by tifffile over :class:`S3RangeFile` (a block-cached ranged
reader); pixels come from the tiles a ``read`` touches, located through each level's
TileOffsets/TileByteCounts, fetched with coalesced ranged GETs and decoded with imagecodecs. So a
detection pass fetches the low-resolution detection level plus the level-0 tiles under the cells,
never the whole file. Levels, downsamples and mpp follow OpenSlide's rules for the two formats so
that this backend and :class:`~pipeline.slides._openslide.OpenSlideSlide` report the same slide
(pixels equal up to JPEG decoder differences). Formats with other rules (NDPI, Philips, Leica
SCN, Ventana BIF, OME, SubIFD pyramids, unusual sample layouts) raise ``SlideOpenError``: the
caller stages the whole file and opens it locally instead.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import imagecodecs
import numpy as np
import tifffile

from pipeline.errors import SlideOpenError, SlideReadError, SlideTooLargeError, StorageError
from pipeline.slides._s3range import S3RangeFile
from pipeline.slides._tiff import first_pages
from pipeline.slides.base import (
    DEFAULT_MAX_DECODE_MB,
    DEFAULT_MAX_PIXELS,
    Slide,
    _why,
    check_open_args,
    decode_budget_bytes,
    over_budget,
)

__all__ = ["RemoteTiffSlide", "open_remote_slide"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
# Compressions decoded here (TIFF tag 259): none, LZW, JPEG, Deflate (both codes).
_COMPRESSIONS = {1: "none", 5: "lzw", 7: "jpeg", 8: "deflate", 32946: "deflate"}
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6
_SUBFILE_REDUCED = 1
# A tile this large (px) is a corrupt or hostile header, not a slide (scanners use 240-1024 px).
_MAX_TILE_SIDE = 8192
_MAX_TILE_BYTES = 64 * 1024 * 1024
#: Decoded-tile cache: detection tiles overlap and neighbouring cells' crops share tiles.
DEFAULT_TILE_CACHE_BYTES = 64 * 1024 * 1024
#: Compressed tiles fetched ahead by ``prefetch`` and not yet read (oldest dropped beyond this).
DEFAULT_PREFETCH_BYTES = 128 * 1024 * 1024
#: Ranged GETs in flight at once during a prefetch.
PREFETCH_WORKERS = 8
_RES_UNIT_UM = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre -> µm
_APERIO_MPP = re.compile(r"^\s*MPP\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class _Level:
    width: int
    height: int
    tile_w: int
    tile_h: int
    tiles_across: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    compression: int
    jpeg_tables: bytes | None
    jpeg_colorspace: int | None  # None: let the decoder decide (YCbCr / JFIF streams)
    decode: object  # tifffile's decoder for non-JPEG compressions


def open_remote_slide(
    s3_client,
    bucket: str,
    key: str,
    mpp: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    size: int | None = None,
    etag: str | None = None,
    max_decode_mb: float = DEFAULT_MAX_DECODE_MB,
) -> RemoteTiffSlide:
    """Open ``s3://bucket/key`` (Aperio SVS or generic tiled TIFF) for ranged reads.

    ``s3_client``: a boto3 S3 client; ``mpp``: level-0 µm/px used when the file records none
    (``mpp_source`` "user"); ``size``/``etag``: the object's, when known from a listing (saves a
    HEAD request; the ETag pins every read to that version); ``max_decode_mb``: memory budget in
    MiB of one tile decode and one ``read`` (as :func:`pipeline.slides.open_slide`).
    Raises :class:`~pipeline.errors.SlideOpenError` for a missing object or any format this
    backend does not handle (the caller then stages the file and uses
    :func:`pipeline.slides.open_slide`); the error carries ``bytes_fetched`` (int) so the
    caller can account for the bytes the attempt cost. S3 failures after the client's retries,
    and an object that no longer has ``etag``, raise :class:`~pipeline.errors.StorageError`
    (here and from ``read``); undecodable tiles raise ``SlideReadError`` from ``read``.
    """
    mpp = check_open_args(mpp, max_pixels, max_decode_mb)
    reader = S3RangeFile(s3_client, bucket, key, size=size, etag=etag)
    try:
        return RemoteTiffSlide(
            reader, mpp, max_pixels, max_decode_bytes=decode_budget_bytes(max_decode_mb)
        )
    except SlideOpenError as exc:
        exc.bytes_fetched = reader.bytes_fetched
        reader.close()
        raise
    except BaseException:
        reader.close()
        raise


class RemoteTiffSlide(Slide):
    """A TIFF-family slide on S3 read tile by tile (see the module doc).

    Extra attributes: ``bytes_fetched`` (bytes received from S3 so far, header included),
    ``requests`` (ranged GETs so far), ``uri``.
    """

    # The RGB result plus the decoded tiles under the box, held together until it is filled.
    _read_bytes_per_px = 6

    def __init__(
        self,
        reader: S3RangeFile,
        user_mpp: float | None,
        max_pixels: int,
        tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES,
        *,
        max_decode_bytes: int | None = None,
    ):
        uri = reader.uri
        budget = (
            decode_budget_bytes(DEFAULT_MAX_DECODE_MB)
            if max_decode_bytes is None
            else int(max_decode_bytes)
        )
        self._reader = reader
        head = reader.read(4)
        reader.seek(0)
        if head not in _TIFF_MAGIC:
            raise SlideOpenError(uri, "not a TIFF file: the remote TIFF backend cannot read it")
        try:
            tf = tifffile.TiffFile(reader, name=uri.rsplit("/", 1)[-1])
        except SlideReadError as exc:
            raise SlideOpenError(uri, exc.cause) from exc
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types on bad headers
            raise SlideOpenError(uri, f"cannot parse the TIFF header: {_why(exc)}") from exc
        self._tf = tf
        try:
            vendor, pages = _select_levels(tf, uri)
            levels = [_level(p, uri, reader.size, budget) for p in pages]
            metadata_mpp = (
                _aperio_mpp(pages[0]) if vendor == "aperio" else _resolution_mpp(pages[0])
            )
        except SlideReadError as exc:
            tf.close()
            raise SlideOpenError(uri, exc.cause) from exc
        except (SlideOpenError, SlideTooLargeError, StorageError):
            tf.close()
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged IFD surfaces as assorted errors
            tf.close()
            raise SlideOpenError(uri, f"cannot parse the TIFF directories: {_why(exc)}") from exc
        self.format = f"remote-tiff:{vendor}"
        self.uri = uri
        self._levels = levels
        w0, h0 = levels[0].width, levels[0].height
        # OpenSlide's rule: the mean of the two axes' ratios (levels are rarely exact halves).
        downsamples = tuple((w0 / lv.width + h0 / lv.height) / 2.0 for lv in levels)
        try:
            super().__init__(
                uri,
                tuple((lv.width, lv.height) for lv in levels),
                downsamples,
                metadata_mpp,
                user_mpp,
                max_pixels,
                budget,
            )
        except Exception:
            tf.close()
            raise
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(tile_cache_bytes)
        self._lock = threading.Lock()
        self._ahead: OrderedDict[tuple[int, int], bytes] = OrderedDict()  # prefetched, compressed
        self._ahead_bytes = 0
        self._ahead_limit = DEFAULT_PREFETCH_BYTES

    @property
    def bytes_fetched(self) -> int:
        return self._reader.bytes_fetched

    @property
    def requests(self) -> int:
        return self._reader.requests

    def _read_checked(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        # The base class turns every OSError into SlideReadError, which the job records as a
        # defect of the slide's bytes; a failed or changed S3 object is transient: keep its type.
        try:
            return super()._read_checked(level, x0, y0, x1, y1)
        except SlideReadError as exc:
            if isinstance(exc.__cause__, StorageError):
                raise exc.__cause__ from None
            raise

    def prefetch(self, level: int, boxes) -> None:
        """Fetch the compressed tiles under ``boxes`` (``(x0, y0, x1, y1)`` in ``level`` px) in
        one batch of coalesced, concurrent ranged GETs, so that the ``read`` calls that follow
        cost no request each. Tiles already held are not fetched again; boxes are clipped to
        the level. Raises like ``read`` (:class:`~pipeline.errors.StorageError` for S3,
        :class:`~pipeline.errors.SlideReadError` for a damaged tile table)."""
        if self._closed:
            raise ValueError(f"{self.path}: slide is closed")
        lv = self._levels[level]
        wanted: dict[int, None] = {}  # ordered set of tile indices
        for box in boxes:
            x0, y0, x1, y1 = (int(v) for v in box)
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, lv.width), min(y1, lv.height)
            if x1 <= x0 or y1 <= y0:
                continue
            for ty in range(y0 // lv.tile_h, (y1 - 1) // lv.tile_h + 1):
                for tx in range(x0 // lv.tile_w, (x1 - 1) // lv.tile_w + 1):
                    wanted[ty * lv.tiles_across + tx] = None
        with self._lock:
            index = [
                i for i in wanted if (level, i) not in self._cache and (level, i) not in self._ahead
            ]
        if not index:
            return
        try:
            blobs = self._fetch_tiles(level, lv, index, workers=PREFETCH_WORKERS)
        except SlideReadError as exc:
            if isinstance(exc.__cause__, StorageError):
                raise exc.__cause__ from None
            raise
        with self._lock:
            for i, blob in zip(index, blobs):
                self._ahead[(level, i)] = blob
                self._ahead_bytes += len(blob)
            while self._ahead_bytes > self._ahead_limit and self._ahead:
                _, old = self._ahead.popitem(last=False)
                self._ahead_bytes -= len(old)

    def _fetch_tiles(
        self, level: int, lv: _Level, index: list[int], workers: int = 1
    ) -> list[bytes]:
        """Compressed bytes of tiles ``index`` of ``level`` (``b""`` for a skipped tile)."""
        for i in index:
            if i >= len(lv.offsets):
                raise SlideReadError(
                    self.path, f"level {level} has no tile {i} (TileOffsets too short)"
                )
            if lv.counts[i] > _MAX_TILE_BYTES:
                raise SlideReadError(
                    self.path, f"level {level} tile {i} declares {lv.counts[i]} bytes"
                )
        # A zero byte count is a tile the scanner skipped (no tissue): OpenSlide draws it
        # transparent, which the base contract renders white.
        ranges = [(lv.offsets[i], lv.counts[i]) if lv.counts[i] > 0 else (0, 0) for i in index]
        return self._reader.fetch_ranges(ranges, workers=workers)

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        lv = self._levels[level]
        tx0, tx1 = x0 // lv.tile_w, (x1 - 1) // lv.tile_w
        ty0, ty1 = y0 // lv.tile_h, (y1 - 1) // lv.tile_h
        wanted = [(ty, tx) for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]
        tiles: dict[tuple[int, int], np.ndarray | None] = {}
        missing = []
        ahead: dict[int, bytes] = {}
        with self._lock:
            for t in wanted:
                key = (level, t[0] * lv.tiles_across + t[1])
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    tiles[t] = hit
                else:
                    missing.append(t)
                    blob = self._ahead.pop(key, None)
                    if blob is not None:
                        self._ahead_bytes -= len(blob)
                        ahead[key[1]] = blob
        if missing:
            index = [ty * lv.tiles_across + tx for ty, tx in missing]
            fetch = [i for i in index if i not in ahead]
            if fetch:
                ahead.update(zip(fetch, self._fetch_tiles(level, lv, fetch)))
            blobs = [ahead[i] for i in index]
            for t, i, blob in zip(missing, index, blobs):
                tile = self._decode(level, lv, i, blob) if blob else None
                tiles[t] = tile
                if tile is not None:
                    self._remember((level, i), tile)
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for (ty, tx), tile in tiles.items():
            # Intersection of the tile with the box, in level px.
            gx0, gy0 = tx * lv.tile_w, ty * lv.tile_h
            ix0, iy0 = max(x0, gx0), max(y0, gy0)
            ix1, iy1 = min(x1, gx0 + lv.tile_w), min(y1, gy0 + lv.tile_h)
            dst = out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            if tile is None:
                dst[...] = 255
            else:
                dst[...] = tile[iy0 - gy0 : iy1 - gy0, ix0 - gx0 : ix1 - gx0]
        return out

    def _decode(self, level: int, lv: _Level, index: int, data: bytes) -> np.ndarray:
        if lv.compression == 7:
            # libjpeg allocates what the JPEG's own frame header declares, whatever the TIFF
            # says; OpenSlide refuses a mismatch before decoding, and so do we.
            dims = _jpeg_dimensions(data)
            if dims != (lv.tile_w, lv.tile_h):
                got = "no frame header" if dims is None else f"{dims[0]}x{dims[1]} px"
                raise SlideReadError(
                    self.path,
                    f"level {level} tile {index}: JPEG declares {got}, expected the TIFF tile "
                    f"size {lv.tile_w}x{lv.tile_h}",
                )
        try:
            if lv.compression == 7:
                tile = imagecodecs.jpeg8_decode(
                    data, tables=lv.jpeg_tables, colorspace=lv.jpeg_colorspace, outcolorspace="RGB"
                )
            else:
                tile = lv.decode(data, index)[0]
        except Exception as exc:  # noqa: BLE001 - codec errors have no common base
            raise SlideReadError(
                self.path, f"level {level} tile {index} cannot be decoded: {_why(exc)}"
            ) from exc
        tile = np.asarray(tile)
        if tile.ndim == 4:  # tifffile's (depth, length, width, samples)
            tile = tile[0]
        if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3:
            raise SlideReadError(
                self.path, f"level {level} tile {index} decoded to {tile.shape} {tile.dtype}"
            )
        if tile.shape[0] < lv.tile_h or tile.shape[1] < lv.tile_w:
            raise SlideReadError(
                self.path,
                f"level {level} tile {index} decoded to {tile.shape[1]}x{tile.shape[0]} px, "
                f"expected {lv.tile_w}x{lv.tile_h}",
            )
        return tile[: lv.tile_h, : lv.tile_w]

    def _remember(self, key: tuple[int, int], tile: np.ndarray) -> None:
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = tile
            self._cache_bytes += tile.nbytes
            while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes

    def close(self) -> None:
        if not self._closed:
            self._tf.close()
            self._reader.close()
            with self._lock:
                self._cache.clear()
                self._cache_bytes = 0
                self._ahead.clear()
                self._ahead_bytes = 0
        super().close()


def _select_levels(tf: tifffile.TiffFile, uri: str) -> tuple[str, list]:
    """(vendor, level pages largest first) by OpenSlide's rules for Aperio and generic TIFF."""
    for flag, name in (
        ("is_ndpi", "Hamamatsu NDPI"),
        ("is_philips", "Philips TIFF"),
        ("is_scn", "Leica SCN"),
        ("is_bif", "Ventana BIF"),
        ("is_ome", "OME-TIFF"),
    ):
        if getattr(tf, flag, False):
            raise SlideOpenError(uri, f"{name} is not read remotely (needs the whole file)")
    first = tf.pages.first
    if not first.is_tiled:
        raise SlideOpenError(uri, "first TIFF page is not tiled: a plain image, not read remotely")
    # Tiled: OpenSlide's case, so OpenSlide's verdict on the directory count (see open_slide).
    pages = first_pages(tf, uri)
    if (first.description or "").startswith("Aperio"):
        vendor = "aperio"
        # Aperio: every tiled directory is a level; stripped ones are thumbnail/label/macro.
        levels = [p for p in pages if p.is_tiled]
    else:
        vendor = "generic-tiff"
        # Generic TIFF: the first directory plus every tiled reduced-resolution one.
        levels = [first] + [
            p for p in pages[1:] if p.is_tiled and (int(p.subfiletype) & _SUBFILE_REDUCED)
        ]
    levels.sort(key=lambda p: -int(p.imagewidth))
    return vendor, levels


def _level(page, uri: str, size: int, budget: int) -> _Level:
    where = f"TIFF page {page.index}"
    comp = int(page.compression)
    if comp not in _COMPRESSIONS:
        raise SlideOpenError(uri, f"{where}: compression {comp} is not read remotely")
    if int(page.planarconfig) != 1 or int(page.samplesperpixel) != 3 or page.extrasamples:
        raise SlideOpenError(uri, f"{where}: only interleaved 3-sample RGB is read remotely")
    if int(page.bitspersample) != 8:
        raise SlideOpenError(
            uri, f"{where}: {page.bitspersample}-bit samples are not read remotely"
        )
    photometric = int(page.photometric)
    if photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR) or (
        photometric == _PHOTOMETRIC_YCBCR and comp != 7
    ):
        raise SlideOpenError(
            uri, f"{where}: photometric {photometric} with compression {comp} is not read remotely"
        )
    if int(page.imagedepth) != 1:
        raise SlideOpenError(uri, f"{where}: volumetric tiles are not read remotely")
    tw, th = int(page.tilewidth), int(page.tilelength)
    # OpenSlide's rule and arithmetic (a tile decodes to 4-byte ARGB there), so that a slide
    # refused here is refused the same way when staged and opened locally.
    if tw * th * 4 > budget:
        raise over_budget(uri, f"{where} declares {tw}x{th} px tiles, each", tw * th * 4, budget)
    if not (0 < tw <= _MAX_TILE_SIDE and 0 < th <= _MAX_TILE_SIDE):
        raise SlideOpenError(uri, f"{where}: implausible tile size {tw}x{th}")
    w, h = int(page.imagewidth), int(page.imagelength)
    across = -(-w // tw)
    offsets = tuple(int(v) for v in page.dataoffsets)
    counts = tuple(int(v) for v in page.databytecounts)
    if len(offsets) != len(counts) or len(offsets) < across * -(-h // th):
        raise SlideOpenError(
            uri,
            f"{where}: {len(offsets)} tile offsets for a {w}x{h} image of {tw}x{th} tiles (truncated?)",
        )
    end = max((o + n for o, n in zip(offsets, counts) if n > 0), default=0)
    if end > size:
        raise SlideOpenError(
            uri,
            f"{where}: tile data ends at byte {end}, past the object's {size} bytes (truncated)",
        )
    tables = page.jpegtables if comp == 7 else None
    tables = bytes(tables) if tables is not None else None
    colorspace = None
    if comp == 7 and photometric == _PHOTOMETRIC_RGB and not (tables and b"JFIF" in tables[:64]):
        # Aperio writes RGB (not YCbCr) JPEG tiles without a JFIF marker; libjpeg would assume
        # YCbCr. Same decision as OpenSlide and tifffile.
        colorspace = "RGB"
    decode = None if comp == 7 else page.decode
    return _Level(w, h, tw, th, across, offsets, counts, comp, tables, colorspace, decode)


# JPEG markers that start a frame header (SOF0-SOF15 less DHT, JPG and DAC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first frame header of the JPEG stream ``data``, or None when
    there is none before the first scan (or the stream is not JPEG)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: no frame header before the data
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 9 > n or length < 7:
                return None
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            return w, h
        i += 2 + length
    return None


def _aperio_mpp(page) -> float | None:
    """``MPP`` from an Aperio ImageDescription (``...|MPP = 0.2520|...``), as OpenSlide reads it."""
    for field in (page.description or "").split("|")[1:]:
        m = _APERIO_MPP.match(field)
        if m:
            try:
                return float(m.group(1))
            except ValueError:
                return None
    return None


def _resolution_mpp(page) -> float | None:
    """Mean of X/Y µm/px from the resolution tags in centimetre or inch units (OpenSlide's
    generic-TIFF rule as measured on OpenSlide 4; no unit tag: None here)."""
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    um_per_unit = _RES_UNIT_UM.get(int(unit.value)) if unit is not None else None
    if um_per_unit is None:
        return None
    vals = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is None:
            continue
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        if num and den:
            vals.append(um_per_unit / (num / den))
    return sum(vals) / len(vals) if vals else None
