"""``python -m pipeline run``: the nightly job (also the ``ray job submit`` entrypoint)."""

from __future__ import annotations

import argparse

from pipeline._redact import redact_urls_in
from pipeline.errors import ConfigError, PipelineError

HELP = "run the nightly job: slide archive (s3:// or local) -> cells/slides/runs Parquet"

# (flag field, argparse kwargs); every field of JobConfig that a user may set.
_OPTIONS: list[tuple[str, dict]] = [
    ("input", {"metavar": "URI", "help": "slide archive: s3://bucket/prefix/ or a local directory"}),
    ("output", {"metavar": "URI", "help": "output location: s3://bucket/prefix/ or a local directory"}),
    ("model", {"metavar": "DIR|URI", "help": "HemBLIP checkpoint (directory or s3:// prefix); default: the bundled demo checkpoint"}),
    ("base", {"metavar": "DIR|URI", "help": "for a LoRA adapter --model: the base model to use instead of the one the adapter names (e.g. a local copy of Salesforce/blip-image-captioning-base); the model version hashes base + adapter"}),
    ("s3_endpoint", {"metavar": "URL", "help": "S3 endpoint (overrides AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), e.g. http://127.0.0.1:9000"}),
    ("max_failed_fraction", {"type": float, "metavar": "F", "help": "exit 1 when more than this fraction of processed slides failed (default 0.1)"}),
    ("extensions", {"metavar": "EXT[,EXT]", "help": "slide suffixes, comma-separated (default: .svs,.tif,.tiff,.ndpi,.vms,.vmu,.scn,.mrxs,.svslide,.bif,.dcm)"}),
    ("crop_um", {"type": float, "metavar": "UM", "help": "side of the square crop around each cell, µm (default 36)"}),
    ("crop_px", {"type": int, "metavar": "PX", "help": "crop side after resampling, px (default 224)"}),
    ("mpp", {"type": float, "metavar": "UM_PER_PX", "help": "level-0 µm/px for slides without it in their metadata"}),
    ("max_detect_mpp", {"type": float, "metavar": "UM_PER_PX",
                        "help": "detect on the coarsest pyramid level at most this µm/px (e.g. 1.1; default: the "
                                "level nearest 0.5 µm/px, see the README's detection-level section)"}),
    ("max_decode_mb", {"type": float, "metavar": "MIB",
                       "help": "memory budget of any one image decode, checked from the header before decoding; "
                               "a bigger image, tile or read fails as its slide (decompression-bomb guard; default 1024)"}),
    ("max_slide_attempts", {"type": int, "metavar": "N",
                            "help": "worker deaths (out of memory, signal, crash) on one slide before it is recorded "
                                    "failed with failure_class worker_died (default 3)"}),
    ("detect_cpus", {"type": float, "metavar": "N", "help": "CPUs per detect task (default 1)"}),
    ("caption_batch_size", {"type": int, "metavar": "N", "help": "crops per caption batch (default 32)"}),
    ("caption_min_actors", {"type": int, "metavar": "N", "help": "minimum caption actors (default 1)"}),
    ("caption_max_actors", {"type": int, "metavar": "N", "help": "maximum caption actors (default 1)"}),
    ("caption_gpus_per_actor", {"type": float, "metavar": "G", "help": "GPUs per caption actor, fractional allowed; 0 = CPU (default: 1 if the cluster has GPUs, else 0)"}),
    ("caption_cpus_per_actor", {"type": float, "metavar": "C", "help": "CPUs reserved per caption actor, fractional (default 0.25)"}),
    ("caption_cpu_threads", {"type": int, "metavar": "N", "help": "torch threads of a caption actor running on CPU (default: what Ray gives it, 1 for a fractional actor; raise together with --caption-cpus-per-actor)"}),
    ("chunk_slides", {"type": int, "metavar": "N", "help": "slides per committed chunk / output file (default 16)"}),
    ("chunk_cells", {"type": int, "metavar": "N", "help": "close a chunk early at this many cells (default 20000)"}),
    ("thumbnail_px", {"type": int, "metavar": "PX", "help": "side of the JPEG thumbnail stored per cell (default 96)"}),
    ("run_id", {"metavar": "ID", "help": "run id (default: UTC timestamp + random suffix)"}),
    ("scratch_dir", {"metavar": "DIR", "help": "local scratch for staged slides (default: system temp dir)"}),
    ("ray_address", {"metavar": "ADDR", "help": "Ray cluster to connect to (default: RAY_ADDRESS, a local cluster, or a new one)"}),
    ("s3_max_attempts", {"type": int, "metavar": "N", "help": "attempts per S3 request, with exponential backoff (default 5)"}),
    ("transfer_concurrency", {"type": int, "metavar": "N", "help": "parallel ranged GETs per staged slide (default 4)"}),
    ("lease_ttl_s", {"type": float, "metavar": "S",
                     "help": "the run's lease on the output expires this long after its last renewal; a second run "
                             "on the same output refuses while it is live (default 600)"}),
    ("transfer_chunk_mb", {"type": int, "metavar": "MB", "help": "part size of ranged GETs (default 8)"}),
    ("fault_after_chunks", {"type": int, "metavar": "N", "help": argparse.SUPPRESS}),
    ("fault_point", {"metavar": "POINT", "help": argparse.SUPPRESS}),
]
_FLAGS = ("dry_run", "reprocess", "retry_failed", "record_skipped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="YAML file with the same keys as the flags (flags override it)")
    for name, kwargs in _OPTIONS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kwargs)
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", default=None,
                        help="list what would be processed and exit")
    parser.add_argument("--reprocess", dest="reprocess", action="store_true", default=None,
                        help="process every slide again, even those already done with this model")
    parser.add_argument("--retry-failed", dest="retry_failed", action="store_true", default=None,
                        help="also retry slides that failed for a reason of their own (unreadable, no scale)")
    parser.add_argument("--record-skipped", dest="record_skipped", action="store_true", default=None,
                        help="also write a slides/ row (status skipped) for every slide already done")
    parser.add_argument("--thumbnails", dest="thumbnails", action=argparse.BooleanOptionalAction, default=None,
                        help="store a JPEG thumbnail of each crop (default on)")
    parser.add_argument("--forward-env", dest="forward_env", action="append", default=None, metavar="NAME",
                        help="environment variable copied from the driver to every Ray task/actor (repeatable; "
                             "default: AWS endpoint/region/profile and HF offline flags)")


def overrides_from(args: argparse.Namespace) -> dict:
    names = [n for n, _ in _OPTIONS] + list(_FLAGS) + ["thumbnails", "forward_env"]
    return {n: getattr(args, n, None) for n in names}


def main(args: argparse.Namespace) -> int:
    from hemblip.errors import HemblipError
    from pipeline.job import format_summary, load_config, run_job

    cfg = load_config(args.config, overrides_from(args))

    def say(line: str) -> None:
        # Progress lines carry slide failure reasons, which may quote an S3 URL from a worker.
        print(redact_urls_in(line), flush=True)

    try:
        result = run_job(cfg, say=say)
    except HemblipError as exc:
        raise ConfigError(redact_urls_in(f"--model {cfg.model or '(demo checkpoint)'}: {exc}")) from None
    except PipelineError as exc:
        # The dispatcher prints str(exc) on stderr: a storage error may quote the endpoint URL.
        text = redact_urls_in(str(exc))
        if text != str(exc):
            raise PipelineError(text) from None
        raise
    print(redact_urls_in(format_summary(result, cfg.output)), flush=True)
    return result.exit_code
