"""HTML report under hostile stored strings, hostile URL hashes and unusable ``--out`` paths.

Every string the job stores can be chosen by someone else (S3 keys, slide names, captions a
model wrote, QC flags of a foreign writer): the outputs are rewritten here so that every string
column carries every payload below, and the report must show them as text only. The page is
checked twice: by parsing it (stdlib ``html.parser``: the element set, attributes, the script and
its Content Security Policy hash) and by rendering it in headless Chromium with a hostile hash.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.__main__ import main as cli
from pipeline.report import build_report

sys.path.insert(0, str(Path(__file__).parent))
from outputs_fixture import build_outputs  # noqa: E402

pytestmark = pytest.mark.unit

CHROMIUM = "/usr/bin/chromium"

# Each payload targets one context a stored string can land in; a side effect marks success of
# an injection (data-pwned on <body>), so the rendered DOM shows whether any of them ran.
PAYLOADS = [
    '"><img src=x onerror=document.body.dataset.pwned=1>',  # HTML attribute (double quotes)
    "'><svg onload=document.body.dataset.pwned=2>",  # HTML attribute (single quotes)
    "</script><script>document.body.dataset.pwned=3</script>",  # JSON/script block breakout
    "');document.body.dataset.pwned=4;alert(1);//",  # JS string inside an inline handler
    "\u2028\u2029<!--<script>",  # JS line terminators; script-data double-escape state
    "{{7*7}}${7*7}",  # template syntax
    "javascript:document.body.dataset.pwned=5",  # URL scheme
    "</style><style>body{display:none}</style>",  # CSS breakout
    "</title><b id=pwned-title>",  # RCDATA breakout
    "&amp;&lt;b&gt;&#x3c;",  # must stay these literal characters, not be decoded once more
]
HOSTILE = "".join(PAYLOADS)
# elements the report itself writes (the static page; the gallery adds <img> from its script)
ALLOWED_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "header",
    "h1",
    "h2",
    "h3",
    "div",
    "nav",
    "a",
    "main",
    "section",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "span",
    "p",
    "details",
    "summary",
    "label",
    "select",
    "option",
    "button",
    "script",
    "ul",
    "li",
    "i",
    "svg",
    "g",
    "line",
    "rect",
    "circle",
    "text",
}
FIXED_IDS = {
    "cell-data",
    "runs",
    "consistency",
    "cohorts",
    "slides",
    "cells",
    "gallery",
    "f-slide",
    "f-type",
    "f-flag",
    "f-consistency",
    "p-prev",
    "p-next",
    "gallery-count",
}


def _mangle(v):
    if isinstance(v, str):
        return v + HOSTILE
    if isinstance(v, list):
        return [_mangle(x) for x in v]
    return v


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or (pa.types.is_list(t) and pa.types.is_string(t.value_type))


def _hostile_outputs(root: Path):
    """The fixture outputs with HOSTILE appended to every stored string (list items included).

    The same value maps to the same string everywhere, so slide ids, URIs and run ids still join.
    Slide ``status`` keeps its values (they drive which cells are current) and one extra slide row
    carries a hostile status instead.
    """
    fx = build_outputs(root)
    for table in ("cells", "slides", "runs"):
        for f in sorted((root / table).glob("run_date=*/part-*.parquet")):
            t = pq.read_table(f)
            schema = t.schema
            rows = t.to_pylist()
            for r in rows:
                for field in schema:
                    if _is_text(field.type) and not (table == "slides" and field.name == "status"):
                        r[field.name] = _mangle(r[field.name])
            if table == "slides" and "2026-11-28" in str(f):
                extra = dict(rows[-1])
                extra.update(
                    status=HOSTILE,
                    slide_uri=_mangle("s3://smears/archive/odd-01.svs"),
                    slide_id=_mangle("odd"),
                )
                rows.append(extra)
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)
    manifest = root.parent / f"{root.name}-cohorts.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_uri", "cohort", "patient"])
        for i, name in enumerate(["healthy-01", "aml-01", "cll-01"]):
            w.writerow(
                [
                    _mangle(f"s3://smears/archive/{name}.svs"),
                    _mangle("control" if i == 0 else "leukemia"),
                    _mangle(f"P{i}"),
                ]
            )
        w.writerow([_mangle("s3://smears/archive/missing.svs"), _mangle("leukemia"), "P9"])
    return fx, manifest


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    fx, manifest = _hostile_outputs(base / "out")
    out = base / "report.html"
    build_report(str(fx.root), out, manifest=manifest, page_size=100)
    return fx, out


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.scripts: list[tuple[dict, str]] = []
        self.styles: list[str] = []
        self._in: str | None = None  # inside <script> or <style>: raw text, not page text

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag == "script":
            self._in = tag
            self.scripts.append((dict(attrs), ""))
        elif tag == "style":
            self._in = tag
            self.styles.append("")

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "script":
            a, s = self.scripts[-1]
            self.scripts[-1] = (a, s + data)
        elif self._in == "style":
            self.styles[-1] += data
        else:
            self.text.append(data)


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    p.close()
    return p


def _csp(page: _Page) -> dict[str, list[str]]:
    metas = [
        a
        for t, a in page.elements
        if t == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy"
    ]
    assert len(metas) == 1, "exactly one CSP <meta>"
    out = {}
    for d in metas[0]["content"].split(";"):
        if d.strip():
            name, *values = d.split()
            out[name] = values
    return out


def _sha(s: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(s.encode("utf-8")).digest()).decode() + "'"


def test_hostile_strings_stay_text(hostile):
    fx, out = hostile
    raw = out.read_text(encoding="utf-8")
    page = _parse(raw)
    tags = {t for t, _ in page.elements}
    assert tags <= ALLOWED_TAGS, f"unexpected elements {tags - ALLOWED_TAGS}"
    for tag, attrs in page.elements:
        for name, value in attrs.items():
            assert not name.startswith("on"), f"<{tag} {name}=...>: inline event handler"
            assert name not in ("style", "src", "srcdoc", "formaction", "xlink:href"), (
                f"<{tag} {name}=...>"
            )
            if name == "href":
                assert value.startswith("#"), f"<{tag} href={value!r}>: only in-page links"
            assert "pwned" not in name
    ids = [a["id"] for _, a in page.elements if "id" in a]
    assert len(ids) == len(set(ids)), "duplicate element ids"
    assert {
        i for i in ids if not i.startswith("slide-")
    } <= FIXED_IDS  # stored ids cannot clobber the script's
    assert not any(i.startswith("pwned") for i in ids)

    # one executable script, allowed by its hash; the cell data are an inert JSON block
    runnable = [s for a, s in page.scripts if "type" not in a]
    data = [(a, s) for a, s in page.scripts if a.get("type") == "application/json"]
    assert len(runnable) == 1 and len(data) == 1 and len(page.scripts) == 2
    csp = _csp(page)
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == [_sha(runnable[0])]
    assert len(page.styles) == 1 and csp["style-src"] == [_sha(page.styles[0])]
    assert "'unsafe-inline'" not in raw and "'unsafe-eval'" not in raw
    first_active = next(
        i for i, (t, _) in enumerate(page.elements) if t in ("style", "script", "body")
    )
    assert any(
        t == "meta" and a.get("http-equiv") for t, a in page.elements[:first_active]
    )  # CSP before content
    body = data[0][1]
    assert "<" not in body and ">" not in body and "\u2028" not in body and "\u2029" not in body
    blob = json.loads(body)
    cols = blob["columns"]
    row = blob["rows"][0]
    assert row[cols.index("caption")].endswith(HOSTILE)  # kept exactly, not mangled
    assert all(f.endswith(HOSTILE) for f in row[cols.index("qc_flags")] or [])

    # every payload is shown, as text (entities decoded exactly once)
    text = "".join(page.text)
    for p in PAYLOADS:
        assert p.replace("\u2028", "").replace("\u2029", "") in text.replace("\u2028", "").replace(
            "\u2029", ""
        ), p
    flagged = [c for c in fx.cells if c["qc_flags"]]
    assert (
        flagged and f"{flagged[0]['qc_flags'][0]}{HOSTILE}" in text
    )  # the QC flag summary of a slide


def _chromium(url: str, tmp_path: Path) -> tuple[str, str]:
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"{CHROMIUM} not installed (scripts/ensure_chromium.sh could not install Debian's chromium)"
        )
    profile = tmp_path / "profile"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1200,1600",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def test_chromium_hostile_data_and_hash(hostile, tmp_path):
    fx, out = hostile
    ctype = next(c["cell_type"] for c in fx.cells if c["cell_type"] == "lymphocyte") + HOSTILE
    n = sum(c["cell_type"] == "lymphocyte" for c in fx.cells)
    # a valid hostile filter, then garbage the parser must shrug off: malformed percent-encoding,
    # markup, prototype keys, a page number too big for a double, a huge value, a bare '%'
    frag = (
        "type="
        + quote(ctype, safe="")
        + "&flag=%E0%A4%A&slide=%&page="
        + "9" * 400
        + "&__proto__=x&constructor=%3Cimg%20src%3Dx%20onerror%3Ddocument.body.dataset.pwned%3D9%3E"
        + "&<script>alert(1)</script>=\"'&x="
        + "A" * 50_000
        + "&&=&%"
    )
    dom, log = _chromium(out.resolve().as_uri() + "#" + frag, tmp_path)
    assert 'data-gallery-ready="1"' in dom, "the report's script did not finish: " + log[-1500:]
    page = _parse(dom)
    # no payload ran or became an element (their text is shown, so look at elements, not the text)
    assert not [
        (t, a) for t, a in page.elements if "data-pwned" in a or a.get("id") == "pwned-title"
    ]
    tags = {t for t, _ in page.elements}
    assert tags <= ALLOWED_TAGS | {"img"}, f"unexpected elements {tags - ALLOWED_TAGS}"
    imgs = [a for t, a in page.elements if t == "img"]
    assert imgs and all((a.get("src") or "").startswith("data:image/jpeg;base64,") for a in imgs)
    assert not [(t, k) for t, a in page.elements for k in a if k.startswith("on")]
    # the hostile type filter from the hash applied; the garbage was ignored
    assert f'data-matching="{n}"' in dom and len(imgs) == n
    assert HOSTILE.replace("\u2028", "").replace("\u2029", "")[:40] in "".join(page.text)
    bad = [
        ln
        for ln in log.splitlines()
        if "CONSOLE" in ln or "Content Security Policy" in ln or "Uncaught" in ln
    ]
    assert not bad, "console messages: " + "\n".join(bad)[:2000]


def _run_out(fx_root: Path, out: str, capsys) -> tuple[int, str]:
    rc = cli(["report", "--output", str(fx_root), "--out", out])
    err = capsys.readouterr().err
    return rc, err


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return build_outputs(tmp_path_factory.mktemp("plain"))


def test_out_under_a_regular_file(plain, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    for out in (blocker / "x.html", blocker / "deeper" / "x.html"):
        rc, err = _run_out(plain.root, str(out), capsys)
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: --out {out}: ") and "not a directory" in err, err
    assert blocker.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_out_is_a_directory(plain, tmp_path, capsys):
    d = tmp_path / "already-a-dir"
    d.mkdir()
    rc, err = _run_out(plain.root, str(d), capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --out {d}: "), err
    assert "is a directory" in err.lower()
    assert os.listdir(d) == [] and sorted(os.listdir(tmp_path)) == ["already-a-dir"]


def test_out_unwritable_directory(plain, tmp_path, capsys):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "sub" / "r.html"
    else:  # root writes wherever mode bits say no; sysfs refuses new entries even to root
        out = Path("/sys/hemblip-report-test/r.html")
        try:
            out.parent.mkdir()
        except OSError:
            pass
        else:
            out.parent.rmdir()
            pytest.skip("no directory on this machine refuses writes to this user")
    try:
        rc, err = _run_out(plain.root, str(out), capsys)
    finally:
        if os.geteuid() != 0:
            (tmp_path / "locked").chmod(0o700)
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --out {out}: "), err
    assert "Traceback" not in err and not out.parent.exists()


def test_out_write_fails_midway_keeps_old_report(plain, tmp_path):
    """A write that fails part-way (here: the file-size limit, as on a full disk) leaves the
    previous report intact and no temporary file; the error is one line."""
    out = tmp_path / "r.html"
    out.write_text("old report")
    limit = 64_000  # well under the report's size (80 thumbnails)

    def limited():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "report",
            "--output",
            str(plain.root),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limited,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: --out {out}: ") and "too large" in proc.stderr.lower(), (
        proc.stderr
    )
    assert out.read_text() == "old report" and os.listdir(tmp_path) == ["r.html"]
    # without the limit it is replaced whole, with the mode a plain open() would have given it
    assert cli(["report", "--output", str(plain.root), "--out", str(out), "--thumb-px", "16"]) == 0
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>") and os.listdir(
        tmp_path
    ) == ["r.html"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_type_filter_options_are_ordered_not_hash_ordered(hostile):
    """Cell types outside the ontology (all of them here: each carries HOSTILE) are listed by
    name after the known ones, the same on every build, not in a set's per-process hash order."""
    _, out = hostile
    page = _parse(out.read_text(encoding="utf-8"))
    values, inside = [], False
    for tag, attrs in page.elements:
        if tag == "select":
            inside = attrs.get("id") == "f-type"
        elif tag == "option" and inside and attrs.get("value") not in ("", "(untyped)"):
            values.append(attrs["value"])
    assert len(values) >= 4 and values == sorted(values)
