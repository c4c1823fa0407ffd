"""The run lease: at most one run writes an OUTPUT at a time, and a run that lost it stops writing.

A run creates ``OUTPUT/_lease`` (a name starting with ``_``, so queries never read it) before it
recovers or writes anything, with an atomic create-if-absent (S3: ``PUT`` with
``If-None-Match: *``; local: ``link()`` under a directory ``flock``). The object is a small JSON
record: ``run_id``, ``host``, ``pid``, ``started_at``, ``renewed_at``, ``expires_at``, ``ttl_s``,
a random ``lease_id`` and the facts that tell whether the process is still alive on this machine.

* A second run finds the object and refuses with :class:`LeaseHeldError`, one line naming the run
  that holds it (run id, host, pid, since, expires); the CLI exits 2.
* The holder renews the record from a heartbeat thread every ``ttl_s / 3`` s and before each
  commit point, each time with a compare-and-swap (S3: ``PUT`` with ``If-Match: <etag>``). A
  renewal that finds the record changed means another run took over: the holder stops with
  :class:`LeaseLostError` and never publishes again (*fencing*: :meth:`RunLease.check`).
* A lease not renewed for ``ttl_s`` s is stale: the next run takes it over with the same
  compare-and-swap, so of two runs taking over at once exactly one wins. A lease whose process
  is provably gone (same host, same kernel boot, same PID namespace, and that PID is not running
  or is another process now) is taken over at once: a killed run on this machine does not block
  the next one for ``ttl_s``. A record this version cannot read (corrupt, hostile values, from
  more than ``ttl_s`` in the future) is stale too; its strings are never printed raw.
* At the end of the run, failed or not, the lease is deleted, conditionally on still being ours.

Guarantee: after a successful renewal at time t no other run can take over before t + ``ttl_s``
(clocks of the hosts agreeing to well within ``ttl_s``), and every commit point is preceded by a
renewal, so a commit never overlaps another run's recovery unless a single commit stalls for
longer than ``ttl_s``. The store must honour conditional writes; :meth:`RunLease.acquire` checks
that it does and refuses a store that silently ignores them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta

from pipeline.errors import PipelineError, StorageError
from pipeline.job.storage import Storage, join_uri

__all__ = [
    "LEASE_NAME",
    "DEFAULT_LEASE_TTL_S",
    "LeaseError",
    "LeaseHeldError",
    "LeaseLostError",
    "LeaseRecord",
    "RunLease",
    "parse_lease",
]

#: Object name of the lease under OUTPUT.
LEASE_NAME = "_lease"
#: Seconds a lease stays valid without renewal (the ``lease_ttl_s`` setting).
DEFAULT_LEASE_TTL_S = 600.0
#: Longest ``ttl_s`` a record may claim (s); a longer one is not a record this version wrote.
MAX_LEASE_TTL_S = 86_400.0
#: A lease record is a few hundred bytes; anything above this is not one (bytes).
MAX_LEASE_BYTES = 64 * 1024


class LeaseError(PipelineError, RuntimeError):
    """The run lease on OUTPUT could not be taken or was lost; the message names OUTPUT and the run."""


class LeaseHeldError(LeaseError):
    """Another live run holds the lease on OUTPUT: this run refuses to start."""


class LeaseLostError(LeaseError):
    """This run no longer holds the lease (taken over, deleted, or not renewable in time)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds")


def _clean(value: object, limit: int = 80) -> str:
    """A stored string as it may appear in a one-line message: printable, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- facts that make "that process is gone" provable ---------------------------------------------
def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22): with the
    boot id it tells one process from a later one that reuses the PID. ``None`` when not running
    or a zombie."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return fields[19]


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return True
    return True


@dataclass(frozen=True)
class LeaseRecord:
    """The content of ``OUTPUT/_lease`` (times are ISO 8601 UTC strings)."""

    run_id: str
    lease_id: str
    host: str
    pid: int
    started_at: str
    renewed_at: str
    expires_at: str
    ttl_s: float
    boot_id: str | None = None
    pid_ns: str | None = None
    pid_start: str | None = None
    version: int = 1

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def describe(self) -> str:
        return (
            f"run {_clean(self.run_id)} (host {_clean(self.host)}, pid {self.pid}, "
            f"since {_clean(self.started_at)}, lease expires {_clean(self.expires_at)})"
        )

    @property
    def expires(self) -> datetime:
        return datetime.fromisoformat(self.expires_at)

    @property
    def renewed(self) -> datetime:
        return datetime.fromisoformat(self.renewed_at)


def parse_lease(data: bytes, now: datetime) -> LeaseRecord | None:
    """The record in ``data``, or ``None`` when it is not one this version could have written:
    not JSON, a wrong type, unknown version, a ``ttl_s`` outside ``(0, MAX_LEASE_TTL_S]``, an
    expiry later than renewal + ttl, or a renewal more than one ttl in the future (a lease that
    could otherwise never expire)."""
    if len(data) > MAX_LEASE_BYTES:
        return None
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("version") != 1:
            return None
        strings = ("run_id", "lease_id", "host", "started_at", "renewed_at", "expires_at")
        if not all(isinstance(raw.get(k), str) and raw[k] for k in strings):
            return None
        optional = ("boot_id", "pid_ns", "pid_start")
        if not all(raw.get(k) is None or isinstance(raw[k], str) for k in optional):
            return None
        pid, ttl = raw.get("pid"), raw.get("ttl_s")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31:
            return None
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, int | float)
            or not 0 < ttl <= MAX_LEASE_TTL_S
        ):
            return None
        rec = LeaseRecord(
            **{k: raw.get(k) for k in (*strings, *optional)}, pid=pid, ttl_s=float(ttl)
        )
        renewed, expires = rec.renewed, rec.expires
        if renewed.tzinfo is None or expires.tzinfo is None:
            return None
        slack = timedelta(seconds=1)
        if expires > renewed + timedelta(seconds=rec.ttl_s) + slack:
            return None
        if renewed > now + timedelta(seconds=rec.ttl_s):
            return None
    except (ValueError, TypeError, OverflowError):
        return None
    return rec


class RunLease:
    """The lease of run ``run_id`` on OUTPUT ``root``.

    ``ttl_s``: seconds a lease stays valid without renewal (default 600). ``renew_every_s``:
    heartbeat period (default ``ttl_s / 3``). ``takeover_dead_local``: take over at once a lease
    whose process is provably gone on this machine. ``say``: where progress lines go.
    ``clock``/``monotonic`` are the time sources (tests pass fakes).
    """

    def __init__(
        self,
        storage: Storage,
        root: str,
        run_id: str,
        *,
        ttl_s: float = DEFAULT_LEASE_TTL_S,
        renew_every_s: float | None = None,
        takeover_dead_local: bool = True,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], datetime] = _now,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        if not 0 < float(ttl_s) <= MAX_LEASE_TTL_S:
            from pipeline.errors import ConfigError

            raise ConfigError(f"lease_ttl_s: {ttl_s!r} is not in (0, {MAX_LEASE_TTL_S:g}] seconds")
        self.storage = storage
        self.root = root
        self.run_id = run_id
        self.uri = join_uri(root, LEASE_NAME)
        self.ttl_s = float(ttl_s)
        self.renew_every_s = float(renew_every_s) if renew_every_s else self.ttl_s / 3
        self.takeover_dead_local = takeover_dead_local
        self.say = say or (lambda line: None)
        self.clock = clock
        self.monotonic = monotonic
        self._lock = threading.RLock()
        self._record: LeaseRecord | None = None
        self._token: str | None = None
        self._deadline = 0.0  # monotonic time until which no other run can take over
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._released = False

    # -- state ---------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self._record is not None and self._lost is None

    @property
    def record(self) -> LeaseRecord | None:
        return self._record

    def _new_record(self) -> LeaseRecord:
        now = self.clock()
        pid = os.getpid()
        return LeaseRecord(
            run_id=self.run_id,
            lease_id=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=pid,
            started_at=_iso(now),
            renewed_at=_iso(now),
            expires_at=_iso(now + timedelta(seconds=self.ttl_s)),
            ttl_s=self.ttl_s,
            boot_id=_read_text("/proc/sys/kernel/random/boot_id"),
            pid_ns=_pid_ns(),
            pid_start=_pid_start(pid),
        )

    def _renewed(self, rec: LeaseRecord) -> LeaseRecord:
        now = self.clock()
        return replace(
            rec, renewed_at=_iso(now), expires_at=_iso(now + timedelta(seconds=self.ttl_s))
        )

    def _process_gone(self, rec: LeaseRecord) -> bool:
        """True only when the holder provably cannot be running: it ran on this very kernel boot
        and PID namespace, and its PID is not running or now belongs to a later process."""
        if not self.takeover_dead_local or rec.boot_id is None or rec.pid_ns is None:
            return False
        if rec.host != socket.gethostname() or rec.boot_id != _read_text(
            "/proc/sys/kernel/random/boot_id"
        ):
            return False
        if rec.pid_ns != _pid_ns():
            return False
        if rec.pid == os.getpid():
            return False  # this process: maybe another run in another thread
        if not _pid_running(rec.pid):
            return True
        start = _pid_start(rec.pid)
        return rec.pid_start is not None and start is not None and start != rec.pid_start

    def _stale_reason(self, rec: LeaseRecord | None) -> str | None:
        """Why the lease in ``rec`` may be taken over, or ``None`` while its holder is live."""
        if rec is None:
            return "its content is not a lease record this version can read"
        if rec.expires <= self.clock():
            return f"not renewed since {_clean(rec.renewed_at)}"
        if self._process_gone(rec):
            return f"its process {rec.pid} on this host is gone"
        return None

    def _take(self, rec: LeaseRecord, token: str, started: float) -> None:
        self._record, self._token, self._lost = rec, token, None
        self._deadline = started + self.ttl_s

    # -- acquire / renew / release -------------------------------------------------------------
    def acquire(self) -> LeaseRecord:
        """Take the lease or raise :class:`LeaseHeldError` naming the live holder.

        A write that fails for another reason raises :class:`~pipeline.errors.StorageError`
        ``"<OUTPUT>: output location is not writable: …"``.
        """
        with self._lock:
            for _ in range(5):  # each pass either wins, refuses, or saw the lease change hands
                rec = self._new_record()
                data = rec.encode()
                started = self.monotonic()
                try:
                    token = self.storage.create_exclusive(self.uri, data)
                except StorageError as exc:
                    raise StorageError(
                        f"{self.root}: output location is not writable: {exc}"
                    ) from None
                if token is not None:
                    self._take(rec, token, started)
                    self._check_store_honours_conditions(data, token)
                    return rec
                current = self.storage.read_versioned(self.uri, MAX_LEASE_BYTES)
                if current is None:
                    continue  # released in between: try to create it again
                cur_data, cur_token = current
                if cur_data == data:  # our own create, retried after its reply was lost
                    self._take(rec, cur_token, started)
                    self._check_store_honours_conditions(data, cur_token)
                    return rec
                other = parse_lease(cur_data, self.clock())
                reason = self._stale_reason(other)
                if reason is None:
                    raise LeaseHeldError(
                        f"{self.root}: another run is writing this output: {other.describe()}; refusing to "
                        f"start a second writer (the lease {self.uri} expires {self.ttl_desc(other)})"
                    )
                token = self.storage.replace_if(self.uri, data, cur_token)
                if token is not None:
                    self._take(rec, token, started)
                    who = other.describe() if other else "an unreadable lease"
                    self.say(f"took over the output lease of {who}: {reason}")
                    return rec
            raise LeaseHeldError(
                f"{self.root}: the lease {self.uri} kept changing hands; another run is starting"
            )

    @staticmethod
    def ttl_desc(rec: LeaseRecord) -> str:
        return f"if that run stops renewing it for {rec.ttl_s:g} s"

    def _check_store_honours_conditions(self, data: bytes, token: str) -> None:
        """A store that ignores ``If-None-Match``/``If-Match`` would let two runs both "win";
        both probes rewrite identical bytes, so they change nothing where they do go through."""
        problem = None
        if self.storage.create_exclusive(self.uri, data) is not None:
            problem = "If-None-Match"
        elif (
            self.storage.replace_if(self.uri, data, "0" * 32 if token != "0" * 32 else "1" * 32)
            is not None
        ):
            problem = "If-Match"
        if problem:
            current = self.storage.read_versioned(self.uri, MAX_LEASE_BYTES)
            if current is not None:
                self.storage.delete_if(self.uri, current[1])
            self._record = None
            raise StorageError(
                f"{self.root}: the store ignores conditional writes ({problem}), so a run "
                f"lease cannot keep a second run out; use a store that supports them"
            )

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` from now (compare-and-swap). Raises
        :class:`LeaseLostError` when another run holds it now, it is gone, or it could not be
        renewed while it still protected us; a transient storage error is tolerated while at
        least a third of the ttl is left."""
        with self._lock:
            if self._lost is not None:
                raise LeaseLostError(self._lost)
            if self._record is None:
                raise LeaseLostError(
                    f"{self.root}: run {_clean(self.run_id)} does not hold the output lease"
                )
            rec = self._renewed(self._record)
            data = rec.encode()
            started = self.monotonic()
            try:
                token = self.storage.replace_if(self.uri, data, self._token)
                if token is None:
                    current = self.storage.read_versioned(self.uri, MAX_LEASE_BYTES)
                    if current is not None and current[0] == data:
                        token = current[1]  # our own write, retried after its reply was lost
                    else:
                        other = parse_lease(current[0], self.clock()) if current else None
                        now_held = (
                            "it was deleted"
                            if current is None
                            else f"now held by {other.describe()}"
                            if other
                            else "it was overwritten"
                        )
                        self._lose(
                            f"{self.root}: run {_clean(self.run_id)} lost the output lease ({now_held})"
                        )
            except StorageError as exc:
                left = self._deadline - started
                if left > self.ttl_s / 3:
                    self.say(
                        f"could not renew the output lease ({exc}); {left:.0f} s of it left, retrying"
                    )
                    return
                self._lose(
                    f"{self.root}: run {_clean(self.run_id)} could not renew the output lease "
                    f"in time ({exc})"
                )
            self._take(rec, token, started)

    def _lose(self, why: str) -> None:
        self._lost = why
        self._stop.set()
        raise LeaseLostError(why)

    def check(self, what: str) -> None:
        """Fencing: renew now, before ``what`` (e.g. "the journal of chunk X"); raises
        :class:`LeaseLostError` naming the step that was not done."""
        try:
            self.renew()
        except LeaseLostError as exc:
            raise LeaseLostError(f"{exc}; stopped before {what}, which was not published") from None

    def start_heartbeat(self) -> None:
        """Renew every ``renew_every_s`` s from a daemon thread until :meth:`release`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except LeaseLostError as exc:
                if not self._released:  # a renewal racing release() is not news
                    self.say(f"lease lost: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 - the heartbeat must never die silently
                self.say(f"lease heartbeat error: {type(exc).__name__}: {exc}")

    def release(self) -> bool:
        """Stop the heartbeat and delete the lease if it is still ours. Never raises (it runs in
        ``finally`` after the run's own error); returns whether the lease was deleted."""
        self._released = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._thread = None
        with self._lock:
            if self._record is None:
                return False
            token, self._record, self._token = self._token, None, None
            try:
                current = self.storage.read_versioned(self.uri, MAX_LEASE_BYTES)
                if current is None or current[1] != token:
                    return False
                return self.storage.delete_if(self.uri, token)
            except StorageError as exc:
                self.say(
                    f"could not release the output lease {self.uri}: {exc}; it expires by itself"
                )
                return False

    def __enter__(self) -> RunLease:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
