"""Evaluate a captioning model on a caption dataset: JSON report + Markdown tables (paper layout).

The report compares the model with a majority-class baseline: a constant caption rendered from the
training set's most frequent cell type, case and value of every attribute.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from hemblip.data import CaptionSample
from hemblip.metrics import baseline_caption, check_bertscore_model, score_captions
from hemblip.ontology import ATTRIBUTE_NAMES

__all__ = ["evaluate", "evaluate_captions", "render_markdown"]

N_EXAMPLES = 5


def _labels(s: CaptionSample) -> dict:
    return {"cell_type": s.cell_type, "case": s.case, "attributes": dict(s.attributes)}


def evaluate(
    model,
    samples: Sequence[CaptionSample],
    captioner_kwargs: Mapping | None = None,
    *,
    train_samples: Sequence[CaptionSample] | None = None,
    with_bertscore: bool = True,
    bertscore_model: str | os.PathLike | None = None,
    bertscore_layers: int | None = None,
) -> dict:
    """Caption ``samples`` with :class:`hemblip.Captioner` and score them (see :func:`evaluate_captions`).

    ``model``: a checkpoint location (``None`` = the demo checkpoint) or an existing ``Captioner``;
    ``captioner_kwargs`` go to ``Captioner(...)`` (``batch_size``, ``num_beams``, ``device``...).
    ``bertscore_model``: local BERTScore model directory, checked before any captioning (see
    :func:`hemblip.metrics.bertscore`; without one BERTScore is n/a and nothing is downloaded).
    """
    if with_bertscore and bertscore_model is not None:
        check_bertscore_model(bertscore_model)  # fail before minutes of captioning, not after
    if hasattr(model, "caption") and hasattr(model, "model_id"):
        captioner = model
    else:
        from hemblip import Captioner

        captioner = Captioner(model=model, **dict(captioner_kwargs or {}))
    results = captioner.caption([s.image for s in samples]) if samples else []
    report = evaluate_captions(
        samples,
        [r.caption for r in results],
        train_samples=train_samples,
        model_name=str(captioner.model_id),
        with_bertscore=with_bertscore,
        bertscore_model=bertscore_model,
        bertscore_layers=bertscore_layers,
    )
    report["model"] = {
        "id": str(captioner.model_id),
        "version": getattr(captioner, "model_version", None),
        "captioner_kwargs": dict(captioner_kwargs or {}),
    }
    logprobs = [r.mean_logprob for r in results if r.mean_logprob is not None]
    report["rows"][0]["mean_logprob"] = sum(logprobs) / len(logprobs) if logprobs else None
    return report


def evaluate_captions(
    samples: Sequence[CaptionSample],
    predictions: Sequence[str],
    *,
    train_samples: Sequence[CaptionSample] | None = None,
    model_name: str = "model",
    with_bertscore: bool = True,
    bertscore_model: str | os.PathLike | None = None,
    bertscore_layers: int | None = None,
) -> dict:
    """Score generated captions against the samples' references and labels.

    Returns ``{"n_samples", "rows": [model row, baseline row], "baseline": {...}, "examples"}``;
    each row is :func:`hemblip.metrics.score_captions`' dict plus ``"name"``. The baseline's
    majority comes from ``train_samples`` when given (and non-empty), else from ``samples``
    themselves (said in ``baseline["source"]``). ``bertscore_model``/``bertscore_layers``: see
    :func:`hemblip.metrics.bertscore`.
    """
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    refs = [s.caption for s in samples]
    labels = [_labels(s) for s in samples]
    bs = {
        "with_bertscore": with_bertscore,
        "bertscore_model": bertscore_model,
        "bertscore_layers": bertscore_layers,
    }
    model_row = {"name": model_name, **score_captions(refs, predictions, labels, **bs)}
    train = list(train_samples or [])
    source = (
        f"training split ({len(train)} cells)"
        if train
        else "evaluated set (no training split given)"
    )
    base = baseline_caption([_labels(s) for s in (train or samples)]) if (train or samples) else ""
    base_row = {
        "name": "majority baseline",
        **score_captions(refs, [base] * len(refs), labels, **bs),
    }
    return {
        "n_samples": len(samples),
        "rows": [model_row, base_row],
        "baseline": {"source": source, "caption": base},
        "examples": [
            {"sample_id": s.sample_id, "reference": s.caption, "prediction": p}
            for s, p in list(zip(samples, predictions))[:N_EXAMPLES]
        ],
    }


# --------------------------------------------------------------------------- markdown
def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render_markdown(report: Mapping) -> str:
    """Markdown tables in the paper's layout: Table 1 (text metrics, cell type, exact match, mean
    balanced accuracy), Table 2 (per-attribute accuracy over cells whose reference states it,
    then balanced accuracy), and the model's cell-type confusion matrix."""
    rows = report["rows"]
    lines = [
        f"Evaluated on {report['n_samples']} cells; baseline majority from the "
        f"{report['baseline']['source']}.",
        "",
    ]
    lines += ["**Table 1: caption quality**", ""]
    lines += _table(
        [
            "Model",
            "BLEU",
            "ROUGE-L",
            "BERTScore",
            "Cell type acc.",
            "Exact match",
            "Mean bal. acc.",
            "Mean bal. acc. (WBCAtt)",
        ],
        [
            [
                r["name"],
                _f(r["bleu"]),
                _f(r["rouge_l"]),
                _f(r["bertscore"]),
                _f(r["cell_type"]["accuracy"]),
                _f(r["exact_match"]),
                _f(r["mean_balanced_accuracy"]),
                _f(r["mean_balanced_accuracy_wbcatt"]),
            ]
            for r in rows
        ],
    )
    reasons = {
        r["bertscore_reason"] for r in rows if r["bertscore"] is None and r["bertscore_reason"]
    }
    if reasons:
        lines += ["", "BERTScore n/a: " + "; ".join(sorted(reasons)) + "."]
    stated = [n for n in ATTRIBUTE_NAMES if rows[0]["attributes"][n]["n_mentioned"] > 0]
    if stated:
        for title, key in (
            ("accuracy over cells whose reference states the attribute", "accuracy_mentioned"),
            ("balanced accuracy (mean per-value recall)", "balanced_accuracy"),
        ):
            lines += ["", f"**Table 2: per-attribute {title}**", ""]
            header = ["Model", *stated]
            body = [[r["name"], *(_f(r["attributes"][n][key]) for n in stated)] for r in rows]
            body.append(
                ["n cells", *(str(rows[0]["attributes"][n]["n_mentioned"]) for n in stated)]
            )
            lines += _table(header, body)
    conf = rows[0]["cell_type"]["confusion"]
    if conf["labels"]:
        lines += [
            "",
            f"**Cell-type confusion ({rows[0]['name']}; rows reference, columns prediction)**",
            "",
        ]
        lines += _table(
            ["reference \\ predicted", *conf["columns"]],
            [[lab, *(str(v) for v in row)] for lab, row in zip(conf["labels"], conf["matrix"])],
        )
    return "\n".join(lines) + "\n"
