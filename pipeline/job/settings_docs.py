"""Generate the JSON Schema of the job's config file and the settings table from ``JobConfig``.

    python -m pipeline config-docs            # rewrites both files (below)
    python -m pipeline config-docs --check    # exit 1 when one is out of date

* ``cluster/job-config.schema.json``: JSON Schema (draft 2020-12) of the ``--config`` YAML file:
  every key with its type, bounds, default and help; dashed spellings of keys refer to the
  underscored ones.
* ``docs/settings.md``: one table per group of settings: key, flag, type, default, bounds, help.

Both are rendered from :func:`pipeline.job.config.settings`, the field declarations of
:class:`~pipeline.job.config.JobConfig`; a unit test fails when a file differs from what this
module renders. What the schema cannot express (finite numbers, cross-field rules such as
``caption_max_actors >= caption_min_actors``, URI forms) is still checked by ``JobConfig``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.job.config import GROUPS, Setting, settings

__all__ = [
    "SCHEMA_PATH",
    "DOCS_PATH",
    "json_schema",
    "json_schema_text",
    "settings_markdown",
    "generated_files",
]

#: Where the generated files live, relative to the repository root.
SCHEMA_PATH = Path("cluster") / "job-config.schema.json"
DOCS_PATH = Path("docs") / "settings.md"

# Any C0/C1 control or Unicode line break: JobConfig refuses strings holding one. Matched with
# "not" + an unanchored pattern because "$" in Python's re also matches before a final newline.
_CONTROL_PATTERN = "[\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]"
_STRING = {"type": "string", "not": {"pattern": _CONTROL_PATTERN}}
# The word none, any case, surrounding white space allowed (JobConfig strips it).
_NONE_PATTERN = "^\\s*[Nn][Oo][Nn][Ee]\\s*$"


def _json_default(s: Setting) -> Any:
    return list(s.default) if s.kind == "list" else s.default


def _property(s: Setting) -> dict[str, Any]:
    if s.kind == "bool":
        prop: dict[str, Any] = {"type": "boolean"}
    elif s.kind in ("int", "float"):
        prop = {"type": "integer" if s.kind == "int" else "number"}
        if s.ge is not None:
            prop["minimum"] = s.ge
        if s.gt is not None:
            prop["exclusiveMinimum"] = s.gt
        if s.le is not None:
            prop["maximum"] = s.le
    elif s.kind == "str":
        prop = dict(_STRING)
        if s.max_length is not None:
            prop["maxLength"] = s.max_length
        if s.required:
            prop["minLength"] = 1
    else:  # a list of strings, or one comma-separated string; null: an empty list
        prop = {"anyOf": [{"type": "array", "items": _STRING}, _STRING, {"type": "null"}]}
    if s.optional:
        prop["type"] = [prop["type"], "null"]
    if s.none_word:  # e.g. candidate_mpp: none (as null), the default being a number
        prop = {"anyOf": [prop, {"type": "string", "pattern": _NONE_PATTERN}]}
    described = f"{s.help} ({'required' if s.required else 'default: ' + s.shown_default()})"
    out: dict[str, Any] = {"description": described}
    if not s.required:
        out["default"] = _json_default(s)
    out.update(prop)
    out["x-flag"] = s.flag
    if s.unit:
        out["x-unit"] = s.unit
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the ``--config`` file of ``python -m pipeline run``."""
    props: dict[str, Any] = {s.name: _property(s) for s in settings()}
    for s in settings():
        if "_" in s.name:
            props[s.name.replace("_", "-")] = {"$ref": f"#/properties/{s.name}"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "python -m pipeline run --config FILE",
        "description": (
            "Settings of the nightly job. Generated from pipeline/job/config.py by "
            "`python -m pipeline config-docs`; do not edit. Flags given on the command line "
            "override the file; input and output may come from flags. Keys may be written with "
            "dashes instead of underscores (not both)."
        ),
        "type": "object",
        "additionalProperties": False,
        "properties": props,
    }


def json_schema_text() -> str:
    """:func:`json_schema` as the text of ``cluster/job-config.schema.json``."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type_text(s: Setting) -> str:
    text = {
        "bool": "boolean",
        "int": "integer",
        "float": "number",
        "str": "string",
        "list": "list of strings",
    }[s.kind]
    if s.none_word:
        return text + ", null or `none`"
    return text + " or null" if s.optional else text


def _flag_text(s: Setting) -> str:
    if s.kind == "bool":
        return f"`{s.flag}` / `--no-{s.flag[2:]}`"
    return f"`{s.flag} {s.metavar}`" if s.metavar else f"`{s.flag}`"


def settings_markdown() -> str:
    """The text of ``docs/settings.md``: every setting, grouped, as markdown tables."""
    lines = [
        "# Settings of `python -m pipeline run`",
        "",
        "<!-- Generated from pipeline/job/config.py by `python -m pipeline config-docs`; edit the",
        "     field declarations there, then regenerate. A unit test fails when this file is stale. -->",
        "",
        "Each setting is a flag of `python -m pipeline run` and a key of its `--config` YAML file",
        "(flags override the file; a key may be written with dashes instead of underscores, not",
        "both). The file's JSON Schema is [`cluster/job-config.schema.json`](../cluster/job-config.schema.json)",
        "(editors that honour `# yaml-language-server: $schema=...` check a file as it is typed);",
        "[`cluster/job-config.example.yaml`](../cluster/job-config.example.yaml) is a complete example.",
        "Every value is checked against its type and bounds before anything runs: a bad one is a",
        "one-line error naming the flag and the key, and the command exits 2. Lists are given as a",
        "YAML list or one comma-separated string (on the command line: comma-separated or repeated).",
        "",
    ]
    for group, title in GROUPS.items():
        rows = [s for s in settings() if s.group == group]
        if not rows:
            continue
        lines += [
            f"## {title[0].upper()}{title[1:]}",
            "",
            "| key | flag | type | default | bounds | description |",
            "|---|---|---|---|---|---|",
        ]
        for s in rows:
            default = s.shown_default()
            default = default if s.required or s.default_text else f"`{default}`"
            lines.append(
                f"| `{s.name}` | {_cell(_flag_text(s))} | {_type_text(s)} | {_cell(default)} | "
                f"{_cell(s.bounds_text())} | {_cell(s.help)} |"
            )
        lines.append("")
    return "\n".join(lines)


def generated_files() -> dict[Path, str]:
    """Path relative to the repository root -> the text it must hold."""
    return {SCHEMA_PATH: json_schema_text(), DOCS_PATH: settings_markdown()}
