"""Per-slide CPU stage: read the slide (in place or from a local copy), detect/crop/measure.

Runs as a Ray Data task over one slide reference at a time. A single-object SVS/tiled TIFF on S3
is read in place with ranged GETs of only the tiles detection touches; anything else (local
files, multi-file slides, formats that need the whole file) is staged to the worker's local disk
and the copy removed afterwards. Slide bytes never go through the object store; what leaves the
task are the crops (the object store carries them to the caption actors) and JSON records. Any
failure (transfer after retries, unreadable slide, no scale) becomes the slide's outcome row
with ``status = "failed"``, a one-line reason and a ``failure_class`` decided by the exception's
type (:func:`failure_class`); the task itself never raises, so one bad slide cannot fail the
dataset. A slide whose worker process dies (signal, out of memory, a crash in a decoder) cannot
record anything itself: an :class:`AttemptLedger` actor counts the attempts at each slide across
worker processes, and the attempt after ``max_slide_attempts`` records the slide as
``worker_died`` without opening it.

Output batch keys (one row per cell, then one ``kind == "slide"`` row per slide):

``kind``       (N,) object   ``"cell"`` or ``"slide"``
``slide_id``   (N,) object   slide identity (32 hex chars)
``crop``       (N, P, P, 3) uint8   the cell crop (zeros on the slide row); P = ``crop_px``
``record``     (N,) object   JSON: a cell's DETECT columns + ids, or the slide's outcome
``thumbnail``  (N,) object   JPEG bytes of the crop (``b""`` when disabled / slide row)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline._redact import redact_urls_in
from pipeline.errors import (
    ConfigError,
    SlideError,
    SlideOpenError,
    StorageError,
    WorkerDiedError,
    WorkerEnvironmentError,
)
from pipeline.job.identity import cell_id
from pipeline.job.listing import SlidePart, SlideRef
from pipeline.job.storage import S3Settings, is_s3, split_s3, storage_for

__all__ = ["DetectSettings", "AttemptLedger", "confined_path", "detect_batch", "failure_class", "ref_to_json",
           "ref_from_json", "BATCH_KEYS"]

BATCH_KEYS = ("kind", "slide_id", "crop", "record", "thumbnail")
_PIECE = 64  # cells per yielded batch: bounds the size of one block in the object store


@dataclass(frozen=True)
class DetectSettings:
    """What a detect task needs (picklable). Sizes: ``crop_um`` µm, ``crop_px`` px."""

    s3: S3Settings
    scratch_dir: str | None = None
    crop_um: float = 36.0
    crop_px: int = 224
    mpp: float | None = None
    thumbnails: bool = True
    thumbnail_px: int = 96
    max_detect_mpp: float | None = None  # None: DetectorConfig's default
    max_slide_attempts: int = 3  # worker deaths on one slide before it is recorded worker_died
    max_decode_mb: float = 1024.0  # decode budget of one read / whole-image decode, MiB


def ref_to_json(ref: SlideRef) -> str:
    return json.dumps(asdict(ref))


def ref_from_json(text: str) -> SlideRef:
    d = json.loads(text)
    d["parts"] = tuple(SlidePart(**p) for p in d["parts"])
    return SlideRef(**d)


_NAME_MAX = 255  # bytes of one path component on common Linux file systems (ext4, xfs, btrfs)
_PATH_MAX = 4096  # bytes of a whole path (Linux)


def _name_max(root: Path) -> int:
    try:
        return min(_NAME_MAX, int(os.pathconf(root, "PC_NAME_MAX")))
    except (OSError, ValueError):
        return _NAME_MAX


def _nbytes(name: str) -> int:
    return len(name.encode("utf-8", "surrogateescape"))


def _short_name(comp: str, limit: int) -> str:
    """``comp`` if it fits ``limit`` bytes, else a hash of it plus its suffix (OpenSlide picks
    some formats by suffix); deterministic, and distinct names give distinct results."""
    if _nbytes(comp) <= limit:
        return comp
    digest = hashlib.sha256(comp.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    suffix = os.path.splitext(comp)[1]
    if _nbytes(suffix) > 32 or any(c in suffix for c in "/\\"):
        suffix = ""
    return digest + suffix


def confined_path(root: Path, rel: str, shorten: bool = False) -> Path:
    """``root/rel`` with ``rel`` (an object key, untrusted) kept inside ``root``.

    Empty and ``.`` components are dropped and ``..`` is renamed, so ``a/../../etc/x`` becomes
    ``root/a/%2E%2E/%2E%2E/etc/x``; the resolved result is checked to lie under ``root``.
    ``shorten``: a component longer than the file system's name limit (255 bytes) is replaced by
    a hash of it plus its suffix (for a copy whose name does not matter, e.g. a single-object
    slide). Raises :class:`~pipeline.errors.StorageError` naming the key otherwise.
    """
    limit = _name_max(root) if shorten else None
    parts = []
    for comp in rel.replace("\\", "/").split("/"):
        comp = comp.replace("\x00", "")
        if comp in ("", "."):
            continue
        comp = "%2E%2E" if comp == ".." else comp
        parts.append(_short_name(comp, limit) if limit else comp)
    if not parts:
        raise StorageError(f"{rel!r}: object key has no file name")
    base = root.resolve()
    out = base.joinpath(*parts).resolve()
    if out != base and base not in out.parents:
        raise StorageError(f"{rel!r}: object key escapes the scratch directory")
    return out


_FILE_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
               stat.S_IFBLK: "block device", stat.S_IFDIR: "directory"}


def _listed_as_link(path: Path, etag: str) -> bool:
    """Whether the listing saw ``path`` as the symlink itself (its target unreachable there too):
    the listing falls back to the link's own ``lstat`` identity exactly then."""
    from pipeline.job._storage_local import local_etag

    try:
        return local_etag(os.lstat(path)) == etag
    except OSError:
        return False


def _check_local(path: Path, uri: str, etag: str = "") -> None:
    """Refuse, with the cause, a local input that is not a readable regular file, without ever
    opening anything but a regular file (opening a FIFO blocks; opening a device may act on it).

    A dangling symlink, a symlink loop or a special file is the entry's own problem
    (:class:`SlideOpenError`); a file this worker cannot see or read is its environment's
    (:class:`WorkerEnvironmentError`): on a multi-node cluster a worker on another node sees only
    file systems its node mounts, so a link whose target the listing reached (``etag`` is the
    target's) but this worker does not is the environment's too.
    """
    not_visible = WorkerEnvironmentError(
        uri, f"not visible to this worker (host {socket.gethostname()}): no such file; a local input must be "
             "on a file system that every node of the cluster mounts")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path) and _listed_as_link(path, etag):
            raise SlideOpenError(uri, f"dangling symlink (its target {os.readlink(path)!r} does not exist)") from None
        raise not_visible from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and _listed_as_link(path, etag):
            raise SlideOpenError(uri, "symlink loop") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise WorkerEnvironmentError(uri, "permission denied (a folder on the path cannot be searched)") from None
        raise WorkerEnvironmentError(uri, f"cannot stat ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SlideOpenError(uri, f"not a regular file ({_FILE_KINDS.get(stat.S_IFMT(st.st_mode), 'special file')})")
    try:
        # O_NONBLOCK: should the entry have become a FIFO since the stat, the open cannot block.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise WorkerEnvironmentError(uri, "permission denied") from None
        raise WorkerEnvironmentError(uri, f"cannot open ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SlideOpenError(uri, "not a regular file (replaced while being checked)")
    finally:
        os.close(fd)


def _scratch_dir(ref: SlideRef, settings: DetectSettings) -> Path:
    root = Path(settings.scratch_dir or os.path.join(tempfile.gettempdir(), "hemblip-scratch"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{ref.slide_id[:12]}-", dir=root))
    except OSError as exc:
        raise WorkerEnvironmentError(root, f"scratch directory unusable on host {socket.gethostname()} "
                                           f"({exc.strerror or exc})") from None


def _staged_paths(ref: SlideRef, slide_dir: Path) -> tuple[list[Path], Path]:
    """Where each part and the file to open go under ``slide_dir``. A single-object slide's name
    does not matter, so an over-long one is shortened; the members of a multi-object slide keep
    their names (its index file refers to them), so an over-long one fails the slide."""
    single = len(ref.parts) == 1
    if not single:
        limit = _name_max(slide_dir)
        for part in ref.parts:
            for comp in part.rel.replace("\\", "/").split("/"):
                if _nbytes(comp) > limit:
                    shown = part.rel if len(part.rel) <= 80 else part.rel[:80] + "…"
                    raise SlideOpenError(ref.uri, f"member {shown!r}: a name of {_nbytes(comp)} bytes is too long "
                                                  f"for the local file system ({limit} bytes at most)")
    dests = [confined_path(slide_dir, p.rel, shorten=single) for p in ref.parts]
    opened = confined_path(slide_dir, ref.open_rel, shorten=single)
    longest = max(_nbytes(str(d)) for d in [*dests, opened])
    if longest >= _PATH_MAX:
        raise WorkerEnvironmentError(ref.uri, f"staged path of {longest} bytes exceeds the local limit of {_PATH_MAX}; "
                                              "use a shorter --scratch-dir")
    return dests, opened


def _stage(ref: SlideRef, settings: DetectSettings) -> tuple[Path, Path | None, int]:
    """(path to open, scratch dir to remove or None, bytes read from storage)."""
    if not is_s3(ref.uri):
        by_rel = {p.rel: p for p in ref.parts}
        for part in ref.parts:
            _check_local(Path(part.uri), part.uri, part.etag)
        return Path(by_rel[ref.open_rel].uri), None, 0
    slide_dir = _scratch_dir(ref, settings)
    storage = storage_for(ref.uri, settings.s3)
    total = 0
    try:
        dests, opened = _staged_paths(ref, slide_dir)
        for part, dest in zip(ref.parts, dests, strict=True):
            total += storage.download(part.uri, dest, etag=part.etag or None)
        return opened, slide_dir, total
    except BaseException:
        shutil.rmtree(slide_dir, ignore_errors=True)
        raise


# TIFF-family suffixes the remote backend may read in place; it refuses (and the slide is
# staged) anything else inside such a file, e.g. NDPI-like or plain non-tiled TIFFs.
_REMOTE_SUFFIXES = (".svs", ".tif", ".tiff")


def _open_remote(ref: SlideRef, settings: DetectSettings):
    """(slide opened for ranged S3 reads or None, bytes the attempt fetched). None: not on S3,
    several objects, another suffix, or a format the remote backend refuses (staged instead)."""
    if not is_s3(ref.uri) or len(ref.parts) != 1 or not ref.uri.lower().endswith(_REMOTE_SUFFIXES):
        return None, 0
    from pipeline.errors import SlideOpenError
    from pipeline.slides import open_remote_slide

    part = ref.parts[0]
    bucket, key = split_s3(part.uri)
    client = storage_for(ref.uri, settings.s3).client
    try:
        slide = open_remote_slide(client, bucket, key, mpp=settings.mpp, size=part.size, etag=part.etag or None,
                                  max_decode_mb=settings.max_decode_mb)
    except SlideOpenError as exc:
        return None, int(getattr(exc, "bytes_fetched", 0))
    return slide, 0


def _jpeg(crop: np.ndarray, side: int) -> bytes:
    """The crop's thumbnail: :func:`hemblip.crops.thumbnail_jpeg`, the one pixel path shared
    with hemblip (bilinear to ``side`` px, JPEG quality 85)."""
    from hemblip.crops import thumbnail_jpeg

    return thumbnail_jpeg(crop, side)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _dumps(record: dict) -> str:
    return json.dumps(record, default=_jsonable)


def _reason(exc: BaseException, local: Path | None, uri: str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if local is not None:
        text = text.replace(str(local), uri)
    if not text.startswith(uri):
        text = f"{uri}: {text}"
    # Reasons are stored in slides/ and printed: an endpoint URL in a botocore message may carry
    # credentials or a pre-signed signature.
    return redact_urls_in(f"{type(exc).__name__}: {text}")


# errno values that point at the worker's environment (permissions, a full or read-only disk,
# limits of the local file system or of the process) rather than at storage or the slide.
_CONFIG_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENAMETOOLONG", "EMFILE",
                                      "ENFILE", "EXDEV") if hasattr(errno, name))


def failure_class(exc: BaseException) -> str:
    """What a slide's failure is attributed to (one of :data:`pipeline.schema.FAILURE_CLASSES`),
    from the exception's type, never its text.

    ``slide``: the slide's bytes (:class:`~pipeline.errors.SlideError` subclasses: unreadable,
    truncated, too large, no scale); permanent for that identity. ``config``: settings or the
    worker's environment (:class:`~pipeline.errors.ConfigError`,
    :class:`~pipeline.errors.WorkerEnvironmentError`, an ``OSError`` for permissions, space or
    name limits, ``MemoryError``: this worker's memory at this concurrency, the bomb guard being
    what settles slides too large for any worker). ``storage``: :class:`~pipeline.errors.StorageError`
    and other ``OSError`` (I/O, connections). ``worker_died``: :class:`~pipeline.errors.WorkerDiedError`.
    Anything else is ``internal`` (a bug). Only ``slide`` and ``worker_died`` are permanent.
    """
    if isinstance(exc, WorkerDiedError):
        return "worker_died"
    if isinstance(exc, ConfigError | WorkerEnvironmentError | MemoryError):
        return "config"
    if isinstance(exc, SlideError):
        return "slide"
    if isinstance(exc, StorageError):
        return "storage"
    if isinstance(exc, OSError):
        return "config" if exc.errno in _CONFIG_ERRNOS else "storage"
    return "internal"


def _batch(kinds, sid, crops, records, thumbs) -> dict[str, np.ndarray]:
    return {
        "kind": np.array(kinds, dtype=object),
        "slide_id": np.array([sid] * len(kinds), dtype=object),
        "crop": crops,
        "record": np.array(records, dtype=object),
        "thumbnail": np.array(thumbs, dtype=object),
    }


def _new_outcome(ref: SlideRef) -> dict:
    return {
        "slide_id": ref.slide_id, "slide_uri": ref.uri, "slide_etag": ref.etag,
        "slide_bytes": ref.size, "status": "failed", "reason": None, "failure_class": None, "cell_count": 0,
        "mpp": None, "mpp_source": None, "width": None, "height": None, "bytes_read": None,
        "stage_seconds": None, "detect_seconds": None,
    }


def _slide_batch(ref: SlideRef, settings: DetectSettings, outcome: dict) -> dict[str, np.ndarray]:
    P = settings.crop_px
    return _batch(["slide"], ref.slide_id, np.zeros((1, P, P, 3), np.uint8), [_dumps(outcome)], [b""])


def process_slide(ref: SlideRef, settings: DetectSettings):
    """Yield the output batches of one slide (see the module doc for the keys)."""
    from pipeline.detect import DetectConfig, detect_slide
    from pipeline.detection import DetectorConfig

    outcome = _new_outcome(ref)
    P = settings.crop_px
    t0 = time.perf_counter()
    local: Path | None = None
    scratch: Path | None = None
    try:
        cfg = DetectConfig(crop_um=settings.crop_um, crop_px=P, mpp=settings.mpp,
                           max_decode_mb=settings.max_decode_mb,
                           detector=DetectorConfig(max_detect_mpp=settings.max_detect_mpp))
        remote, spent = _open_remote(ref, settings)
        if remote is None:
            local, scratch, nread = _stage(ref, settings)
        t1 = time.perf_counter()
        outcome["stage_seconds"] = t1 - t0  # remote: opening (header and IFDs) only
        if remote is None:
            outcome["bytes_read"] = spent + nread if scratch is not None else None
            result = detect_slide(local, cfg, source=ref.uri)
        else:
            try:
                with remote:
                    result = detect_slide(remote, cfg, source=ref.uri)
            finally:
                outcome["bytes_read"] = remote.bytes_fetched
        outcome["detect_seconds"] = time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001 - any failure is this slide's outcome, not the run's
        outcome["reason"] = _reason(exc, local, ref.uri)
        outcome["failure_class"] = failure_class(exc)
        if outcome["stage_seconds"] is None:
            outcome["stage_seconds"] = time.perf_counter() - t0
        yield _slide_batch(ref, settings, outcome)
        return
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    info = result.info
    outcome.update(status="ok", cell_count=len(result.records), mpp=info.get("mpp"),
                   mpp_source=info.get("mpp_source"), width=info.get("width"), height=info.get("height"))
    crops = np.ascontiguousarray(result.crops, dtype=np.uint8)
    n = len(result.records)
    for start in range(0, n, _PIECE):
        stop = min(n, start + _PIECE)
        records, thumbs = [], []
        for i in range(start, stop):
            rec = dict(result.records[i])
            rec.update(cell_id=cell_id(ref.slide_id, rec["centroid_x"], rec["centroid_y"]),
                       slide_id=ref.slide_id, slide_uri=ref.uri, slide_etag=ref.etag)
            records.append(_dumps(rec))
            thumbs.append(_jpeg(crops[i], settings.thumbnail_px) if settings.thumbnails else b"")
        yield _batch(["cell"] * (stop - start), ref.slide_id, crops[start:stop], records, thumbs)
    yield _slide_batch(ref, settings, outcome)


def _match_cpu_reservation() -> None:
    """OpenCV's thread pool to the task's CPU reservation. Ray caps OpenMP and BLAS pools at
    the task's CPUs (``OMP_NUM_THREADS``), but OpenCV sizes its own pool to the machine: two
    1-CPU tasks on two cores each ran 2 OpenCV threads, so slides competed for the cores."""
    import cv2

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and cv2.getNumThreads() != int(threads):
        cv2.setNumThreads(int(threads))


class AttemptLedger:
    """Counts the attempts at each slide during one run; runs as a Ray actor (created by the
    driver, handle passed to :func:`detect_batch`) so that the count survives the worker
    processes that die. State lives in this one process: it is lost with the run, as it should
    be (a later run starts counting again, and permanence across runs is the slides table's).
    """

    def __init__(self) -> None:
        self._workers: dict[str, list[str]] = {}

    def begin(self, slide_id: str, worker_id: str, max_attempts: int) -> tuple[int, str | None]:
        """Record an attempt at ``slide_id`` by worker ``worker_id`` (hex). Returns its number
        (1-based) and, once the number exceeds ``max_attempts``, what killed the previous
        attempt's worker as far as Ray knows."""
        workers = self._workers.setdefault(slide_id, [])
        workers.append(worker_id)
        if len(workers) <= max_attempts:
            return len(workers), None
        return len(workers), _death_cause(workers[-2])


def _death_cause(worker_id: str) -> str:
    """Why Ray says worker ``worker_id`` (hex) ended, in a few words; best effort: the worker
    table is Ray's internal state API, and the death may reach it late."""
    try:
        import ray
        from ray._private.state import state
        from ray.core.generated import common_pb2, gcs_pb2

        accessor = state._connect_and_get_accessor()
        info = None
        for _ in range(20):  # the raylet reports a death to the GCS shortly after the retry starts
            raw = accessor.get_worker_info(ray.WorkerID(bytes.fromhex(worker_id)))
            info = gcs_pb2.WorkerTableData.FromString(raw) if raw else None
            if info is not None and not info.is_alive:
                break
            time.sleep(0.1)
        if info is None or info.is_alive:
            return "cause unknown"
        kind = common_pb2.WorkerExitType.Name(info.exit_type)
    except Exception:  # noqa: BLE001 - an internal API; the count alone is still the answer
        return "cause unknown"
    mem = f", {info.memory_used_bytes_at_death / 2**20:.0f} MiB in use" if info.memory_used_bytes_at_death else ""
    if kind == "NODE_OUT_OF_MEMORY":
        return f"out of memory: killed by Ray's memory monitor{mem}"
    if kind == "SYSTEM_ERROR":
        return f"killed by a signal or crashed, e.g. SIGKILL, the kernel's OOM killer, SIGSEGV in a decoder{mem}"
    return f"exited: Ray exit type {kind}{mem}"


def _attempt_refused(ledger, ref: SlideRef, max_attempts: int) -> WorkerDiedError | None:
    """The slide's :class:`WorkerDiedError` when its earlier attempts used up ``max_attempts``."""
    if ledger is None:
        return None
    import ray

    try:
        n, cause = ray.get(ledger.begin.remote(ref.slide_id, ray.get_runtime_context().get_worker_id(),
                                               max_attempts), timeout=120)
    except Exception:  # noqa: BLE001 - the ledger is an aid; Ray's max_retries still bounds the attempts
        return None
    if n <= max_attempts:
        return None
    return WorkerDiedError(ref.uri, f"worker process died {n - 1} times while processing this slide (last: {cause})")


def detect_batch(batch: dict[str, np.ndarray], settings: DetectSettings, ledger=None):
    """Ray Data UDF. In: ``ref`` (N,) JSON of :class:`SlideRef` (N is 1 in the plan). Out: see
    module doc. ``ledger``: handle of an :class:`AttemptLedger` actor, or None (no counting)."""
    _match_cpu_reservation()
    for text in batch["ref"]:
        ref = ref_from_json(str(text))
        died = _attempt_refused(ledger, ref, settings.max_slide_attempts)
        if died is None:
            yield from process_slide(ref, settings)
            continue
        outcome = _new_outcome(ref)
        outcome.update(reason=_reason(died, None, ref.uri), failure_class=failure_class(died))
        yield _slide_batch(ref, settings, outcome)


