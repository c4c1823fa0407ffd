"""The embedded default: a whole nightly run on this machine, nothing to configure.

Starts moto's S3 server on 127.0.0.1, seeds a bucket with a sample archive (pyramidal slides
built from the bundled real smear fields, plus one corrupt object and two non-slide objects),
starts a local Ray, runs the job with the demo checkpoint writing Parquet locally, prints the
per-slide summary, then runs again to show that nothing new is processed. Ray and the S3 server
are shut down on the way out, also on errors and Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError, PipelineError

__all__ = [
    "DemoResult",
    "run_demo",
    "MotoServer",
    "seed_archive",
    "use_local_test_environment",
    "DEMO_BUCKET",
    "DEMO_PREFIX",
]

DEMO_BUCKET = "demo-archive"
DEMO_PREFIX = "slides/"
_MARKER = ".hemblip-demo-output"
#: Not a slide at all: a clear failure with a reason, not a crash of the run.
CORRUPT_BYTES = b"this object claims to be an Aperio slide but holds no image data\n" * 64


class MotoServer:
    """moto's S3 server as a subprocess on 127.0.0.1 (a context manager); ``.url`` is its endpoint."""

    def __init__(self, port: int | None = None, start_timeout_s: float = 60.0):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = start_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> MotoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise PipelineError(
                        f"moto S3 server on port {self.port} exited at start-up (is moto[server] installed?)"
                    ) from None
                time.sleep(0.2)
        self.__exit__(None, None, None)
        raise PipelineError(
            f"moto S3 server did not answer on 127.0.0.1:{self.port} within {self.timeout:.0f} s"
        )

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_archive(
    endpoint: str,
    bucket: str = DEMO_BUCKET,
    prefix: str = DEMO_PREFIX,
    work_dir: Path | None = None,
    corrupt: bool = True,
    extras: bool = True,
) -> list[str]:
    """Create ``bucket`` and upload the sample slides under ``prefix``; returns the slide keys.

    With ``corrupt``: also ``corrupt.svs`` (not an image). With ``extras``: the slides' JSON
    truth sidecars and a README.txt, which are not slides and must be ignored.
    """
    from pipeline.job.storage import S3Settings, s3_client
    from pipeline.samples import build_sample_slides

    # moto needs some region; the environment's wins, as for every other client.
    region = (
        None
        if os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        else "us-east-1"
    )
    client = s3_client(S3Settings(endpoint=endpoint, region=region))
    client.create_bucket(Bucket=bucket)
    tmp = Path(tempfile.mkdtemp(prefix="hemblip-demo-slides-", dir=work_dir))
    keys = []
    try:
        for s in build_sample_slides(tmp):
            key = prefix + s.path.name
            client.upload_file(str(s.path), bucket, key)
            keys.append(key)
            if extras:
                client.upload_file(str(s.truth_path), bucket, prefix + "truth/" + s.truth_path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if corrupt:
        client.put_object(Bucket=bucket, Key=prefix + "corrupt.svs", Body=CORRUPT_BYTES)
        keys.append(prefix + "corrupt.svs")
    if extras:
        client.put_object(
            Bucket=bucket, Key=prefix + "README.txt", Body=b"sample archive of the HemBLIP demo\n"
        )
    return keys


@dataclass
class DemoResult:
    first: object  # RunResult of the first run
    second: object  # RunResult of the re-run
    output: Path
    seconds: float


def use_local_test_environment(name: str) -> None:
    """Dummy AWS credentials and offline flags for a run against a local S3 server.

    moto accepts any credentials, and real ones must never be sent to a local test server. Set
    them before Ray starts so its workers inherit them: credentials are never forwarded through
    Ray's runtime environment, which Ray writes to its logs.
    """
    os.environ["AWS_ACCESS_KEY_ID"] = f"{name}-key-id"
    os.environ["AWS_SECRET_ACCESS_KEY"] = f"{name}-secret-key"
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _prepare_output(out: Path) -> None:
    if out.exists():
        if not (out / _MARKER).exists() and any(out.iterdir()):
            raise ConfigError(
                f"--output {out}: exists and was not written by the demo; choose another directory"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / _MARKER).write_text(
        "written by `python -m pipeline demo`; deleted by the next demo run\n"
    )


def run_demo(
    output: str | Path = "demo_output",
    say: Callable[[str], None] | None = None,
    caption_batch_size: int = 16,
    rerun: bool = True,
    model: str | None = None,
) -> DemoResult:
    """Run the demo end to end (see the module doc). ``output``: local directory, recreated;
    ``model``: a checkpoint directory instead of the bundled demo checkpoint."""
    from pipeline.job.config import DEFAULT_FORWARD_ENV, JobConfig
    from pipeline.job.run import format_summary, run_job

    say = say or (lambda line: print(line, flush=True))
    t0 = time.perf_counter()
    out = Path(output).resolve()
    _prepare_output(out)
    use_local_test_environment("demo")
    import ray

    with MotoServer() as s3:
        say(f"S3 endpoint (moto) at {s3.url}")
        keys = seed_archive(s3.url)
        say(
            f"seeded s3://{DEMO_BUCKET}/{DEMO_PREFIX} with {len(keys)} slide objects "
            f"(one corrupt) and non-slide objects"
        )
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(
                num_cpus=max(2, os.cpu_count() or 2),
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
            )
        try:
            cfg = JobConfig(
                input=f"s3://{DEMO_BUCKET}/{DEMO_PREFIX}",
                output=str(out),
                model=model,
                s3_endpoint=s3.url,
                caption_batch_size=caption_batch_size,
                max_failed_fraction=0.5,
                chunk_slides=2,
                forward_env=DEFAULT_FORWARD_ENV,
            )
            say("== first run ==")
            first = run_job(cfg, say)
            say(format_summary(first, str(out)))
            second = None
            if rerun:
                say("== second run (same archive, same model) ==")
                second = run_job(cfg, say)
                say(format_summary(second, str(out)))
                say(
                    f"second run: {second.ok + second.failed} slides processed, {second.cells_written} cells written "
                    f"(one runs/ row records the run); {second.skipped} slides skipped: done, or failed for a reason "
                    f"of their own bytes (retried with --retry-failed)"
                )
        finally:
            if started_ray:
                ray.shutdown()
    secs = time.perf_counter() - t0
    query = "SELECT cell_type, count(*) AS n FROM cells GROUP BY 1 ORDER BY n DESC"
    say(
        f"demo finished in {secs:.0f} s; query the outputs, e.g.: python -m pipeline query '{query}' --output {out}"
    )
    return DemoResult(first, second, out, secs)
