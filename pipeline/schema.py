"""Column contracts of every table the service writes, with types and units.

One place defines them so that the detect CLI, the nightly job's ``cells/``/``slides/``/``runs/``
tables, the query views and the README agree. Coordinates are level-0 pixels; lengths µm;
areas µm². ``SCHEMA_VERSION`` is bumped on any change of the columns. Version 2 added the smear-zone
columns (:data:`ZONE_CELL_COLUMNS` on ``cells``, the ``zones_selected`` ... ``zone_map_png`` columns
on ``slides``); the change is additive, so files written under version 1 stay readable: the readers
(:mod:`pipeline.outputs`) open every file with the current schema and a column a file lacks reads
as null. Version 3 added how each slide was read to ``slides`` (``zoning``, ``region_tasks``,
``region_tasks_fanned_out``, ``candidate_mpp``), additive in the same way: in files of versions 1
and 2 they read as null. Version 4 added ``slides.cells_total_estimated`` (a per-slide budget now
reads fields until it is met, and estimates ``cells_total`` from them), null in older files.
"""

from __future__ import annotations

import pyarrow as pa

from hemblip.ontology import ATTRIBUTE_NAMES

__all__ = [
    "SCHEMA_VERSION",
    "DETECT_COLUMNS",
    "ZONE_CELL_COLUMNS",
    "CELL_COLUMNS",
    "SLIDE_COLUMNS",
    "RUN_COLUMNS",
    "QC_FLAGS",
    "MPP_SOURCES",
    "FAILURE_CLASSES",
    "PERMANENT_FAILURE_CLASSES",
    "schema_of",
    "DETECT_SCHEMA",
    "CELL_SCHEMA",
    "SLIDE_SCHEMA",
    "RUN_SCHEMA",
]

SCHEMA_VERSION = "4"

#: Every QC flag a cell may carry (a cell is flagged, never dropped).
QC_FLAGS: tuple[str, ...] = (
    "slide_edge",  # whole-cell box touches the slide/image border
    "out_of_focus",  # crop sharpness below threshold
    "clumped",  # touches/overlaps another nucleated cell
    "implausible_size",  # cell diameter outside the plausible WBC range
    "crop_incomplete",  # the fixed-size crop extends past the slide border (padded)
)
MPP_SOURCES: tuple[str, ...] = ("metadata", "user", "estimated")

#: What a slide's failure is attributed to, decided by the exception's type (never its text).
FAILURE_CLASSES: tuple[str, ...] = (
    "slide",  # the slide's bytes: unreadable, truncated, too large, no scale, over-long member name
    "storage",  # transient storage trouble (after retries): retried by the next run
    "config",  # configuration / the worker's environment (path not visible, permissions, disk)
    "internal",  # an unexpected exception (a bug): retried by the next run
    "worker_died",  # the worker process died on every attempt at this slide (signal, OOM, crash)
)
#: Classes that repeat for the same slide identity (URI + ETag + size): a later run with the same
#: model skips such a slide until its bytes change, unless ``--retry-failed``. ``worker_died`` is
#: one: several deaths in a row on one slide, with other slides passing, point at its bytes.
PERMANENT_FAILURE_CLASSES: tuple[str, ...] = ("slide", "worker_died")

# (name, arrow type, unit or "", description)
DETECT_COLUMNS: list[tuple[str, pa.DataType, str, str]] = [
    ("source", pa.string(), "", "input path or URI as given"),
    ("cell_index", pa.int32(), "", "0-based index of the cell within its slide, in reading order"),
    ("bbox_x0", pa.int64(), "px (level 0)", "whole-cell bounding box, left (inclusive)"),
    ("bbox_y0", pa.int64(), "px (level 0)", "whole-cell bounding box, top (inclusive)"),
    ("bbox_x1", pa.int64(), "px (level 0)", "whole-cell bounding box, right (exclusive)"),
    ("bbox_y1", pa.int64(), "px (level 0)", "whole-cell bounding box, bottom (exclusive)"),
    ("centroid_x", pa.float64(), "px (level 0)", "cell centroid x"),
    ("centroid_y", pa.float64(), "px (level 0)", "cell centroid y"),
    ("mpp", pa.float64(), "µm/px", "level-0 microns per pixel used for this slide"),
    ("mpp_source", pa.string(), "", "metadata | user | estimated"),
    ("crop_size_um", pa.float64(), "µm", "physical side of the square crop"),
    ("cell_area_um2", pa.float64(), "µm²", "whole-cell area from segmentation"),
    ("nucleus_area_um2", pa.float64(), "µm²", "nucleus area from segmentation"),
    ("cell_diameter_um", pa.float64(), "µm", "equivalent-circle diameter of the cell"),
    ("nc_ratio", pa.float64(), "", "nucleus area / cytoplasm area"),
    ("nucleus_circularity", pa.float64(), "", "4π·area/perimeter² of the nucleus (1 = circle)"),
    ("nucleus_lobes", pa.int32(), "", "number of nucleus lobes"),
    ("cytoplasm_r", pa.float64(), "0-255", "mean cytoplasm colour, red"),
    ("cytoplasm_g", pa.float64(), "0-255", "mean cytoplasm colour, green"),
    ("cytoplasm_b", pa.float64(), "0-255", "mean cytoplasm colour, blue"),
    ("nucleus_r", pa.float64(), "0-255", "mean nucleus colour, red"),
    ("nucleus_g", pa.float64(), "0-255", "mean nucleus colour, green"),
    ("nucleus_b", pa.float64(), "0-255", "mean nucleus colour, blue"),
    ("focus_score", pa.float64(), "", "variance of the Laplacian of the crop (higher = sharper)"),
    ("qc_flags", pa.list_(pa.string()), "", f"subset of {', '.join(QC_FLAGS)}"),
]

#: Per-cell smear-zone columns, from the slide's zone map (``--zones``); null when zones are off.
#: Not in :data:`DETECT_COLUMNS`: the detector's records do not carry them (``SlideCells.cell_zones``).
ZONE_CELL_COLUMNS: list[tuple[str, pa.DataType, str, str]] = [
    (
        "smear_zone",
        pa.string(),
        "",
        "smear zone of the cell: glass | thick | monolayer | feathered (null: zones off)",
    ),
    (
        "rbc_density",
        pa.float64(),
        "red-cell layers (1 = touching monolayer)",
        "local red-cell coverage around the cell, the zone rule's quantity: area covered by red "
        "cells in single-cell layers, median on a ring around the cell (null: zones off)",
    ),
]

_ATTRIBUTE_COLUMNS = [
    (name, pa.string(), "", "parsed from the caption; null when the caption does not mention it")
    for name in ATTRIBUTE_NAMES
]

CELL_COLUMNS: list[tuple[str, pa.DataType, str, str]] = (
    [
        ("cell_id", pa.string(), "", "sha256 of slide identity + rounded centroid (hex, 32 chars)"),
        ("slide_id", pa.string(), "", "sha256 of slide URI + ETag + size (hex, 32 chars)"),
        ("slide_uri", pa.string(), "", "s3://bucket/key or local path of the slide"),
        ("slide_etag", pa.string(), "", "ETag of the slide object (local: size+mtime hash)"),
    ]
    + DETECT_COLUMNS
    + ZONE_CELL_COLUMNS
    + [
        ("caption", pa.string(), "", "HemBLIP generated caption"),
        (
            "caption_logprob",
            pa.float64(),
            "nats/token",
            "mean token log-probability of the caption",
        ),
        ("cell_type", pa.string(), "", "cell type parsed from the caption (null if not mentioned)"),
        (
            "cell_type_confidence",
            pa.float64(),
            "probability (0-1)",
            "calibrated probability that cell_type is right (model's calibration.json; null when no cell_type)",
        ),
        ("case", pa.string(), "", "case context parsed from the caption (healthy, ALL, AML, ...)"),
    ]
    + _ATTRIBUTE_COLUMNS
    + [
        (
            "consistent",
            pa.bool_(),
            "",
            "caption agrees with morphometry (null: nothing comparable)",
        ),
        (
            "inconsistent_attributes",
            pa.list_(pa.string()),
            "",
            "attributes whose caption value disagrees with the measurement",
        ),
        ("thumbnail_jpeg", pa.binary(), "", "JPEG of the crop (optional; null when disabled)"),
        ("run_id", pa.string(), "", "id of the run that wrote the row"),
        ("model_id", pa.string(), "", "model location as configured"),
        ("model_version", pa.string(), "", "sha256 prefix of the model weights"),
        ("pipeline_version", pa.string(), "", "version of this package"),
        ("schema_version", pa.string(), "", "version of this schema"),
    ]
)

SLIDE_COLUMNS: list[tuple[str, pa.DataType, str, str]] = [
    ("slide_id", pa.string(), "", "sha256 of slide URI + ETag + size"),
    ("slide_uri", pa.string(), "", "s3://bucket/key or local path"),
    ("slide_etag", pa.string(), "", "ETag of the object"),
    ("slide_bytes", pa.int64(), "bytes", "size of the slide object(s)"),
    ("status", pa.string(), "", "ok | failed | skipped"),
    ("reason", pa.string(), "", "why it failed or was skipped (null when ok)"),
    (
        "failure_class",
        pa.string(),
        "",
        "slide | storage | config | internal | worker_died (null unless failed)",
    ),
    ("cell_count", pa.int64(), "", "cells written for this slide"),
    ("mpp", pa.float64(), "µm/px", "level-0 scale used"),
    ("mpp_source", pa.string(), "", "metadata | user | estimated"),
    ("width", pa.int64(), "px (level 0)", "slide width"),
    ("height", pa.int64(), "px (level 0)", "slide height"),
    ("bytes_read", pa.int64(), "bytes", "bytes fetched from storage for this slide"),
    ("stage_seconds", pa.float64(), "s", "time to stage the slide locally"),
    ("detect_seconds", pa.float64(), "s", "time to open, detect, crop and measure"),
    ("caption_seconds", pa.float64(), "s", "caption time attributed to this slide's cells"),
    (
        "zones_selected",
        pa.list_(pa.string()),
        "",
        "smear zones whose cells were described (--zones); null: the whole slide, no zone map",
    ),
    (
        "zone_areas_mm2",
        pa.map_(pa.string(), pa.float64()),
        "mm²",
        "area of each smear zone (glass, thick, monolayer, feathered) from the zone map (null: zones off)",
    ),
    (
        "cells_outside_zones",
        pa.map_(pa.string(), pa.int64()),
        "",
        "white cells seen in zones not selected (in the margins read around the chosen zones), per "
        "zone: counted, not described (null: zones off)",
    ),
    (
        "cells_total",
        pa.int64(),
        "",
        "white cells found in the selected zones (whole slide: all) before the per-slide budget",
    ),
    (
        "sampled",
        pa.bool_(),
        "",
        "true when --max-cells-per-slide kept a spatially balanced sample of cells_total",
    ),
    (
        "cells_total_estimated",
        pa.bool_(),
        "",
        "true: cells_total is an estimate (--max-cells-per-slide on a zoned slide read fields "
        "until the budget was met and scaled their cells by area); false: counted; null: written "
        "before schema version 4",
    ),
    (
        "zone_map_png",
        pa.binary(),
        "",
        "PNG of the zone map (at most 512 px a side) with the described cells as dots (null: zones off)",
    ),
    (
        "zoning",
        pa.string(),
        "",
        "how the slide was read: zoned (zone map first, the chosen zones' cells described) | whole "
        "(--zones none, or --zones auto on a slide under --zone-min-area-mm2); null: failed before "
        "it was decided, or written before schema version 3",
    ),
    (
        "region_tasks",
        pa.int32(),
        "",
        "regions a zoned slide's chosen zones were detected in (null: read whole)",
    ),
    (
        "region_tasks_fanned_out",
        pa.bool_(),
        "",
        "true: the region tasks ran as Ray tasks of their own; false: one after another in the "
        "slide's task (null: read whole)",
    ),
    (
        "candidate_mpp",
        pa.float64(),
        "µm/px",
        "level coarse-to-fine candidates were sought on (--candidate-mpp); null: one stage (read "
        "whole, --candidate-mpp none, or no such level coarser than the detection level)",
    ),
    ("run_id", pa.string(), "", "run that processed the slide"),
    ("model_version", pa.string(), "", "sha256 prefix of the model weights"),
    ("finished_at", pa.timestamp("us", tz="UTC"), "", "when the slide's outcome was committed"),
]

RUN_COLUMNS: list[tuple[str, pa.DataType, str, str]] = [
    ("run_id", pa.string(), "", "unique run id"),
    ("started_at", pa.timestamp("us", tz="UTC"), "", "run start"),
    ("finished_at", pa.timestamp("us", tz="UTC"), "", "run end"),
    ("status", pa.string(), "", "ok | failed | threshold_exceeded"),
    ("config_json", pa.string(), "", "effective configuration (secrets removed)"),
    ("model_id", pa.string(), "", "model location"),
    ("model_version", pa.string(), "", "sha256 prefix of the model weights"),
    ("pipeline_version", pa.string(), "", "version of this package"),
    ("schema_version", pa.string(), "", "version of this schema"),
    ("slides_listed", pa.int64(), "", "slides found in the archive"),
    ("slides_ok", pa.int64(), "", "slides processed successfully in this run"),
    ("slides_failed", pa.int64(), "", "slides that failed in this run"),
    ("slides_skipped", pa.int64(), "", "slides already done (same identity and model version)"),
    ("cells_written", pa.int64(), "", "cells written in this run"),
]


def schema_of(columns: list[tuple[str, pa.DataType, str, str]]) -> pa.Schema:
    """Arrow schema from a column table, with unit and description as field metadata."""
    return pa.schema(
        [pa.field(n, t, metadata={"unit": u, "description": d}) for n, t, u, d in columns]
    )


DETECT_SCHEMA = schema_of(DETECT_COLUMNS)
CELL_SCHEMA = schema_of(CELL_COLUMNS)
SLIDE_SCHEMA = schema_of(SLIDE_COLUMNS)
RUN_SCHEMA = schema_of(RUN_COLUMNS)
