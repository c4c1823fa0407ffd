"""Caption and attribute metrics (the HemBLIP paper's Table 1/2 measures).

Text metrics compare generated captions with reference captions: BLEU (NLTK ``sentence_bleu``,
4-gram uniform weights, ``SmoothingFunction().method4``, whitespace tokens of lower-cased text,
averaged over samples), ROUGE-L F (``rouge_score``, Porter stemmer, averaged), and BERTScore F1
only when the ``bert_score`` package is installed and a local model directory is given (else None
+ reason, at once: nothing is ever downloaded).

Attribute metrics compare the *reference labels* (a sample's cell type/attributes, None = not
mentioned) with what :func:`hemblip.captions.parse_caption` reads from the generated caption:

* ``accuracy_all``: over all cells, prediction == reference, where "not mentioned" on both sides
  counts as agreement;
* ``accuracy_mentioned``: over cells whose reference states the attribute;
* ``balanced_accuracy``: mean per-class recall over cells whose reference states it (a missing
  prediction is wrong);
* ``exact_match``: share of cells (with at least one stated attribute) whose stated attributes are
  all predicted correctly;
* cell-type accuracy (cells with a reference type) and confusion matrix (rows reference, columns
  prediction, last column ``"(none)"`` for captions naming no/ambiguous type).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from hemblip.captions import parse_caption, render_caption
from hemblip.errors import HemblipConfigError
from hemblip.ontology import ATTRIBUTE_NAMES, CELL_TYPES, HEALTHY_ATTRIBUTES

__all__ = [
    "bleu",
    "rouge_l",
    "bertscore",
    "check_bertscore_model",
    "attribute_metrics",
    "cell_type_metrics",
    "exact_match",
    "majority_labels",
    "score_captions",
    "baseline_caption",
    "NONE_LABEL",
]

NONE_LABEL = "(none)"

Labels = Mapping[str, object]  # {"cell_type": str|None, "case": str|None, "attributes": {...}}


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} references but {len(b)} predictions")


def _missing_extra(package: str, metric: str) -> Exception:
    from hemblip.errors import HemblipConfigError

    return HemblipConfigError(
        f"{metric} needs {package}, an evaluation extra the job does not install: "
        "pip install 'hemblip-pipeline[eval]'"
    )


def bleu(references: Sequence[str], predictions: Sequence[str]) -> float | None:
    """Mean sentence BLEU-4 (NLTK, smoothing method4) on whitespace tokens of lower-cased text."""
    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    except ImportError:
        raise _missing_extra("nltk", "BLEU") from None

    _check_lengths(references, predictions)
    if not references:
        return None
    smooth = SmoothingFunction().method4
    scores = []
    for ref, hyp in zip(references, predictions):
        r, h = ref.lower().split(), hyp.lower().split()
        # method4 divides by log(len(hypothesis)): an empty hypothesis scores 0 by definition.
        scores.append(
            0.0
            if not h or not r
            else sentence_bleu([r], h, weights=(0.25, 0.25, 0.25, 0.25), smoothing_function=smooth)
        )
    return float(sum(scores) / len(scores))


def rouge_l(references: Sequence[str], predictions: Sequence[str]) -> float | None:
    """Mean ROUGE-L F-measure (``rouge_score``, ``use_stemmer=True``)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise _missing_extra("rouge-score", "ROUGE-L") from None

    _check_lengths(references, predictions)
    if not references:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(references, predictions)]
    return float(sum(scores) / len(scores))


def _show(value: object) -> str:
    """``value`` as text safe on one line (control characters escaped)."""
    s = str(value)
    return s if s.isprintable() else ascii(s)


def check_bertscore_model(model_path: str | os.PathLike) -> Path:
    """The BERTScore model directory ``model_path`` as a Path, or :class:`HemblipConfigError`.

    It must be an existing local directory (a hub name is refused: nothing is downloaded) with a
    ``config.json`` and safetensors weights (pickle ``.bin`` weights are not loaded).
    """
    path = Path(os.fspath(model_path))
    where = f"--bertscore-model {_show(path)}"
    if not path.exists():
        raise HemblipConfigError(
            f"{where}: no such directory (give a local copy of the model; nothing is downloaded)"
        )
    if not path.is_dir():
        raise HemblipConfigError(f"{where}: not a directory")
    if not (path / "config.json").is_file():
        raise HemblipConfigError(f"{where}: no config.json (not a transformers model directory)")
    if not any(path.glob("*.safetensors")):
        raise HemblipConfigError(
            f"{where}: no *.safetensors weights (pickle .bin weights are not "
            "loaded; convert them to safetensors)"
        )
    return path


@contextlib.contextmanager
def _hub_offline():
    """Hub offline mode for the duration of the block, then exactly the previous setting.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import, into a module constant that
    transformers consults on every load; once imported (the captioner imports it), changing the
    environment alone does nothing, so both are set here.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # no hub client: nothing can reach the network through it
        constants = None
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in names}
    saved_const = getattr(constants, "HF_HUB_OFFLINE", None)
    try:
        for k in names:
            os.environ[k] = "1"
        if constants is not None:
            constants.HF_HUB_OFFLINE = True
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_const


def bertscore(
    references: Sequence[str],
    predictions: Sequence[str],
    model_path: str | os.PathLike | None = None,
    num_layers: int | None = None,
) -> tuple[float | None, str | None]:
    """Mean BERTScore F1 with the local model directory ``model_path``, or ``(None, reason)``.

    Never touches the network: without ``model_path`` the answer is n/a at once (the package is
    not even imported); with one, the model is loaded from that directory with the hub in offline
    mode. ``num_layers``: the hidden layer whose embeddings are compared; default bert_score's
    own choice for a model of the directory's name (e.g. 17 for ``roberta-large``), else the
    reason asks for it. A bad ``model_path`` raises :class:`HemblipConfigError` (one line).
    """
    _check_lengths(references, predictions)
    path = check_bertscore_model(model_path) if model_path is not None else None
    if num_layers is not None and (
        isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1
    ):
        raise HemblipConfigError(f"--bertscore-layers must be an integer >= 1, got {num_layers!r}")
    if importlib.util.find_spec("bert_score") is None:
        return None, "package bert_score not installed"
    if path is None:
        return None, "no local BERTScore model given (--bertscore-model DIR); nothing is downloaded"
    if not references:
        return None, "no samples"
    try:
        if num_layers is None:
            from bert_score.utils import model2layers

            num_layers = model2layers.get(path.name)
            if num_layers is None:
                return None, (
                    f"bert_score has no default layer for a model named {_show(path.name)}; "
                    "pass --bertscore-layers N"
                )
        from bert_score import score

        with _hub_offline():
            _p, _r, f1 = score(
                list(predictions),
                list(references),
                model_type=str(path),
                num_layers=int(num_layers),
                verbose=False,
            )
        return float(f1.mean()), None
    except Exception as exc:  # noqa: BLE001 - any failure to load the model means "not available"
        why = " ".join(str(exc).split())[:120]
        return (
            None,
            f"bert_score model at {_show(path)} not usable ({exc.__class__.__name__}: {why})",
        )


def attribute_metrics(
    references: Sequence[Mapping[str, str | None]],
    predictions: Sequence[Mapping[str, str | None]],
    names: Sequence[str] = ATTRIBUTE_NAMES,
) -> dict[str, dict[str, float | int | None]]:
    """Per attribute: ``accuracy_all``, ``accuracy_mentioned``, ``balanced_accuracy``,
    ``n_mentioned`` (cells whose reference states it) and ``n`` (all cells). Rates are None when
    their denominator is 0."""
    _check_lengths(references, predictions)
    out: dict[str, dict[str, float | int | None]] = {}
    n = len(references)
    for name in names:
        agree_all = sum(r.get(name) == p.get(name) for r, p in zip(references, predictions))
        pairs = [
            (r[name], p.get(name))
            for r, p in zip(references, predictions)
            if r.get(name) is not None
        ]
        correct = sum(rv == pv for rv, pv in pairs)
        per_class: dict[str, list[int]] = {}
        for rv, pv in pairs:
            per_class.setdefault(rv, [0, 0])
            per_class[rv][0] += rv == pv
            per_class[rv][1] += 1
        out[name] = {
            "accuracy_all": agree_all / n if n else None,
            "accuracy_mentioned": correct / len(pairs) if pairs else None,
            "balanced_accuracy": (
                sum(c / t for c, t in per_class.values()) / len(per_class) if per_class else None
            ),
            "n_mentioned": len(pairs),
            "n": n,
        }
    return out


def exact_match(
    references: Sequence[Mapping[str, str | None]], predictions: Sequence[Mapping[str, str | None]]
) -> tuple[float | None, int]:
    """Share of cells whose reference-stated attributes are all predicted correctly, and the number
    of cells counted (those stating at least one attribute)."""
    _check_lengths(references, predictions)
    hits, total = 0, 0
    for r, p in zip(references, predictions):
        stated = {k: v for k, v in r.items() if v is not None}
        if not stated:
            continue
        total += 1
        hits += all(p.get(k) == v for k, v in stated.items())
    return (hits / total if total else None), total


def cell_type_metrics(references: Sequence[str | None], predictions: Sequence[str | None]) -> dict:
    """Cell-type ``accuracy`` over cells with a reference type, ``balanced_accuracy``, ``n``, and
    ``confusion``: ``{"labels": [...reference types], "columns": [... , "(none)"], "matrix": rows}``."""
    _check_lengths(references, predictions)
    pairs = [(r, p) for r, p in zip(references, predictions) if r is not None]
    order = {ct: i for i, ct in enumerate(CELL_TYPES)}
    labels = sorted(
        {r for r, _ in pairs} | {p for _, p in pairs if p is not None},
        key=lambda c: (order.get(c, len(order)), c),
    )
    columns = labels + [NONE_LABEL]
    matrix = [[0] * len(columns) for _ in labels]
    per_class: dict[str, list[int]] = {}
    for r, p in pairs:
        matrix[labels.index(r)][columns.index(p if p is not None else NONE_LABEL)] += 1
        per_class.setdefault(r, [0, 0])
        per_class[r][0] += r == p
        per_class[r][1] += 1
    return {
        "accuracy": sum(r == p for r, p in pairs) / len(pairs) if pairs else None,
        "balanced_accuracy": (
            sum(c / t for c, t in per_class.values()) / len(per_class) if per_class else None
        ),
        "n": len(pairs),
        "confusion": {"labels": labels, "columns": columns, "matrix": matrix},
    }


def majority_labels(train: Sequence[Labels]) -> dict:
    """Most frequent cell type, case and value of every attribute among ``train`` labels (ties: the
    value seen first); None where the training labels never state it."""

    def most(values):
        c = Counter(v for v in values if v is not None)
        return max(c, key=lambda v: (c[v], -_first_index(values, v))) if c else None

    return {
        "cell_type": most([t.get("cell_type") for t in train]),
        "case": most([t.get("case") for t in train]),
        "attributes": {n: most([t["attributes"].get(n) for t in train]) for n in ATTRIBUTE_NAMES},
    }


def _first_index(values: Sequence, v) -> int:
    return values.index(v)


def score_captions(
    references: Sequence[str],
    predictions: Sequence[str],
    labels: Sequence[Labels] | None = None,
    *,
    with_bertscore: bool = True,
    bertscore_model: str | os.PathLike | None = None,
    bertscore_layers: int | None = None,
) -> dict:
    """Every metric of one model on one set: text metrics on the caption strings, attribute and
    cell-type metrics of ``parse_caption(prediction)`` against ``labels`` (each
    ``{"cell_type", "case", "attributes"}``; default: parsed from the references).

    Returns ``{"n", "bleu", "rouge_l", "bertscore", "bertscore_reason", "cell_type",
    "case_accuracy", "exact_match", "exact_match_n", "mean_balanced_accuracy",
    "mean_balanced_accuracy_wbcatt", "attributes"}``;
    ``mean_balanced_accuracy`` averages over attributes some reference states,
    ``mean_balanced_accuracy_wbcatt`` over the 11 WBCAtt ones among them.
    ``bertscore_model``/``bertscore_layers``: see :func:`bertscore` (no model: n/a, no download).
    """
    _check_lengths(references, predictions)
    if labels is None:
        labels = [_labels_of(parse_caption(r)) for r in references]
    _check_lengths(references, labels)
    parsed = [parse_caption(p) for p in predictions]
    ref_attrs = [dict(lab["attributes"]) for lab in labels]
    pred_attrs = [p.attributes for p in parsed]
    per_attr = attribute_metrics(ref_attrs, pred_attrs)
    stated = [
        v["balanced_accuracy"] for v in per_attr.values() if v["balanced_accuracy"] is not None
    ]
    wbcatt = [
        per_attr[a.name]["balanced_accuracy"]
        for a in HEALTHY_ATTRIBUTES
        if per_attr[a.name]["balanced_accuracy"] is not None
    ]
    em, em_n = exact_match(ref_attrs, pred_attrs)
    case_pairs = [
        (lab.get("case"), p.case) for lab, p in zip(labels, parsed) if lab.get("case") is not None
    ]
    if with_bertscore:
        bs, bs_reason = bertscore(references, predictions, bertscore_model, bertscore_layers)
    else:
        bs, bs_reason = None, "not requested"
    return {
        "n": len(references),
        "bleu": bleu(references, predictions),
        "rouge_l": rouge_l(references, predictions),
        "bertscore": bs,
        "bertscore_reason": bs_reason,
        "cell_type": cell_type_metrics(
            [lab.get("cell_type") for lab in labels], [p.cell_type for p in parsed]
        ),
        "case_accuracy": (sum(r == p for r, p in case_pairs) / len(case_pairs))
        if case_pairs
        else None,
        "exact_match": em,
        "exact_match_n": em_n,
        "mean_balanced_accuracy": sum(stated) / len(stated) if stated else None,
        "mean_balanced_accuracy_wbcatt": sum(wbcatt) / len(wbcatt) if wbcatt else None,
        "attributes": per_attr,
    }


def _labels_of(parsed) -> dict:
    return {"cell_type": parsed.cell_type, "case": parsed.case, "attributes": parsed.attributes}


def baseline_caption(train: Sequence[Labels]) -> str:
    """The majority-class baseline's constant caption (training-set majority of everything)."""
    m = majority_labels(train)
    return render_caption(m["cell_type"], m["case"], m["attributes"])
