"""``python -m pipeline run``: the nightly job (also the ``ray job submit`` entrypoint)."""

from __future__ import annotations

import argparse
import re

from pipeline._redact import redact_urls_in
from pipeline.errors import ConfigError, PipelineError
from pipeline.job.config import GROUPS, Setting, settings

HELP = "run the nightly job: slide archive (s3:// or local) -> cells/slides/runs Parquet"

_INT_TEXT = re.compile(r"[+-]?[0-9]{1,19}")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")


def _integer(text: str) -> int:
    # int() would also take "1_000", " 7" and other scripts' digits ("١٢٠")
    if not _INT_TEXT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid integer value: {text[:40]!r}")
    return int(text)


def _number(text: str) -> float:
    # float() would also take "nan", "inf", "1_0" and other scripts' digits
    if not _FLOAT_TEXT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid number: {text[:40]!r}")
    return float(text)


_ARG_TYPES = {"int": _integer, "float": _number, "str": str}


def _or_none(parse):
    """``parse``, also taking the word ``none`` (kept as text: ``JobConfig`` reads it as None,
    and a flag left out stays None, i.e. not given)."""

    def parse_or_none(text: str):
        return "none" if text.strip().lower() == "none" else parse(text)

    return parse_or_none


def _help(s: Setting) -> str:
    extra = "required, here or in --config" if s.required else f"default: {s.shown_default()}"
    if s.bounds_text() and s.kind in ("int", "float") and "2147483647" not in s.bounds_text():
        extra += f"; {s.bounds_text()}"
    return f"{s.help} ({extra})".replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~pipeline.job.config.JobConfig` field, generated from its setting.

    Every flag defaults to ``None`` (not given) so that :func:`overrides_from` passes on only
    what the command line set, over the ``--config`` file. Booleans get ``--x``/``--no-x``;
    lists take one comma-separated value and may be repeated.
    """
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="YAML file with the settings below as keys (flags override it); "
        "schema: cluster/job-config.schema.json",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for s in settings():
        if s.group not in groups:
            groups[s.group] = parser.add_argument_group(GROUPS[s.group])
        kwargs: dict = {"dest": s.name, "default": None, "help": _help(s)}
        if s.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif s.kind == "list":
            kwargs.update(action="append", metavar=s.metavar)
        else:
            parse = _ARG_TYPES[s.kind]
            kwargs.update(type=_or_none(parse) if s.none_word else parse, metavar=s.metavar)
        groups[s.group].add_argument(s.flag, **kwargs)


def overrides_from(args: argparse.Namespace) -> dict:
    """The settings given on the command line (``None``: not given), lists flattened."""
    out = {}
    for s in settings():
        value = getattr(args, s.name, None)
        if s.kind == "list" and value is not None:
            value = [item for given in value for item in given.split(",")]
        out[s.name] = value
    return out


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
        raise ConfigError(
            redact_urls_in(f"--model {cfg.model or '(demo checkpoint)'}: {exc}")
        ) from None
    except PipelineError as exc:
        # The dispatcher prints str(exc) on stderr: a storage error may quote the endpoint URL.
        text = redact_urls_in(str(exc))
        if text != str(exc):
            raise PipelineError(text) from None
        raise
    print(redact_urls_in(format_summary(result, cfg.output)), flush=True)
    return result.exit_code
