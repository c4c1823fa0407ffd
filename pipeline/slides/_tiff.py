"""TIFF sniffing shared by the backends' dispatch."""

from __future__ import annotations

from pathlib import Path

__all__: list[str] = []

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


def _is_tiled_tiff(path: Path) -> bool:
    """True when ``path`` is a TIFF whose first page is tiled (False on any parse problem)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) not in _TIFF_MAGIC:
                return False
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return bool(tf.pages.first.is_tiled)
    except Exception:  # noqa: BLE001 - sniffing only: the real open reports the problem
        return False
