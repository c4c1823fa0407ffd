"""Files of the static HTML report: the page template, its stylesheet and its script.

``report.html.j2`` is the page (a Jinja2 template rendered with autoescaping on); ``report.css``
and ``report.js`` are put inline into it. The page runs under a Content Security Policy that
allows exactly these two texts (by hash), so the script must not use inline handlers, ``eval`` or
style attributes, and it puts data into the page only through ``textContent``, ``dataset`` and
properties, never as markup. The URL hash is anyone's input: the parser ignores what it cannot
decode or does not know and never throws.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS_DIR", "SCRIPT", "STYLE", "TEMPLATE"]

#: Folder of the template and its includes (shipped as package data).
ASSETS_DIR = Path(__file__).resolve().parent
#: Name of the page template inside :data:`ASSETS_DIR`.
TEMPLATE = "report.html.j2"


def _read(name: str) -> str:
    # bytes, then decode: the CSP hash is of these exact characters, with no newline translation
    return (ASSETS_DIR / name).read_bytes().decode("utf-8")


STYLE = _read("report.css")
SCRIPT = _read("report.js")
