"""The calibration report: per category a precision–recall curve and a score histogram (PNG,
matplotlib), a confusion matrix, with probability maps a reliability diagram and the held-out
expected calibration error, and an ``index.html`` plus ``summary.json`` that a reviewer can
open without running anything."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve  # noqa: E402

from .run import CalibrationResult, CategoryOutcome  # noqa: E402

__all__ = ["write_report"]


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _plot_pr(o: CategoryOutcome, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for scores, labels, name, style in (
        (o.fit_scores, o.fit_labels, "fitting split", "--"),
        (o.test_scores, o.test_labels, "held-out split", "-"),
    ):
        if scores is not None and labels is not None and labels.any() and (~labels).any():
            precision, recall, _ = precision_recall_curve(labels, scores)
            ax.plot(recall, precision, style, label=name)
    if o.held_out is not None:
        ax.plot(o.held_out.recall, o.held_out.precision, "o", color="crimson",
                label=f"chosen threshold {o.value:.4f}")
    if o.goal is not None and o.goal.precision is not None:
        ax.axhline(o.goal.precision, color="grey", lw=0.8, ls=":", label="precision target")
    if o.goal is not None and o.goal.recall is not None:
        ax.axvline(o.goal.recall, color="grey", lw=0.8, ls=":", label="recall target")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title=f"{o.category}: precision–recall")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "not enough positives and negatives\nfor a curve", ha="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_hist(o: CategoryOutcome, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    scores, labels = o.test_scores, o.test_labels
    if scores is not None and labels is not None and len(scores):
        bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-6, 40).tolist()
        ax.hist(scores[~labels], bins=bins, alpha=0.6, label=f"negatives ({(~labels).sum()})")
        ax.hist(scores[labels], bins=bins, alpha=0.6, label=f"positives ({labels.sum()})")
    value = o.value if o.value is not None else o.old_value
    ax.axvline(value, color="crimson", label=f"threshold {value:.4f}"
               + ("" if o.value is not None else " (unchanged)"))
    review = o.review_from if o.value is not None else o.old_review_from
    if review is not None:
        ax.axvline(review, color="orange", ls="--", label=f"review from {review:.4f}")
    ax.set(xlabel="score", ylabel="images", title=f"{o.category}: held-out scores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_reliability(o: CategoryOutcome, path: Path) -> None:
    """Held-out mean predicted probability against observed frequency per bin (marker area:
    images in the bin), with the diagonal of perfect calibration."""
    r = o.reliability
    assert r is not None and o.probability is not None
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    sizes = [20 + 200 * w / max(r.weight) for w in r.weight]
    ax.plot(r.predicted, r.observed, "-", color="steelblue", lw=1)
    ax.scatter(r.predicted, r.observed, s=sizes, color="steelblue",
               label=f"held out ({sum(r.count)} images)")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1),
           ylim=(0, 1), title=f"{o.category}: {o.probability['method']} map, "
                              f"ECE {r.ece:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _finite(value: Any) -> Any:
    """NaN (an undefined precision or recall) → None, so that the JSON is valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _summary(result: CalibrationResult) -> dict[str, Any]:
    def category(o: CategoryOutcome) -> dict[str, Any]:
        e = o.held_out
        return {
            "status": o.status,
            "message": o.message,
            "goal": o.goal.model_dump(exclude_none=True) if o.goal else None,
            "old": {"value": o.old_value, "review_from": o.old_review_from},
            "new": {"value": o.value, "review_from": o.review_from} if o.calibrated else None,
            "review": o.review_message,
            "probability": None if o.probability is None or o.reliability is None else {
                **o.probability, "held_out": {
                    "ece": o.reliability.ece, "brier": o.reliability.brier,
                    "bins": o.reliability.bins, "predicted": o.reliability.predicted,
                    "observed": o.reliability.observed, "count": o.reliability.count}},
            "probability_message": o.probability_message,
            "fit": {"positives": o.fit_positives, "negatives": o.fit_negatives},
            "held_out": {
                "positives": o.test_positives,
                "negatives": o.test_negatives,
                **(
                    {
                        "precision": e.precision,
                        "recall": e.recall,
                        "precision_interval": list(e.precision_interval),
                        "recall_interval": list(e.recall_interval),
                        "confusion": {"tp": e.tp, "fp": e.fp, "fn": e.fn, "tn": e.tn},
                    }
                    if e is not None
                    else {}
                ),
            },
        }

    return {
        "policy": {"name": result.policy.name, "version": result.policy.version},
        "new_policy_version": result.new_policy.version,
        "model": result.model,
        "profile": result.profile,
        "dataset": {"name": result.dataset, "fingerprint": result.fingerprint},
        "split": result.split,
        "date": result.date.isoformat(),
        "intervals": "95% percentile bootstrap over held-out images",
        "weighting": result.weighting,
        "cannot_represent": result.caveats,
        "left_out": result.left_out,
        "categories": {o.category: category(o) for o in result.outcomes},
    }


def _confusion_table(o: CategoryOutcome) -> str:
    e = o.held_out
    if e is None:
        return ""
    return (
        "<table class='cm'><tr><th></th><th>flagged</th><th>not flagged</th></tr>"
        f"<tr><th>positive</th><td>{e.tp} (TP)</td><td>{e.fn} (FN)</td></tr>"
        f"<tr><th>negative</th><td>{e.fp} (FP)</td><td>{e.tn} (TN)</td></tr></table>"
    )


def _weighting(result: CalibrationResult) -> str:
    """How a weighted sample (reviewers' verdicts) was used, and what it cannot stand for."""
    if not result.weighting:
        return ""
    caveats = "".join(f"<li>{html.escape(c)}</li>" for c in result.caveats)
    return (f"<dt>Weighting</dt><dd id='weighting'>{html.escape(result.weighting)}: precision "
            "and recall are estimates for the traffic the verdicts were sampled from, not for "
            "the verdicts themselves.</dd><dt>What the sample cannot represent</dt>"
            f"<dd><ul id='caveats'>{caveats}</ul></dd>")


def _probability_method(result: CalibrationResult) -> str:
    if result.probabilities is None:
        return ""
    how = ("scikit-learn's isotonic regression (piecewise linear between its knots)"
           if result.probabilities == "isotonic"
           else "Platt's sigmoid (scikit-learn's logistic regression on the one score)")
    return (f"Score → probability maps: {how}, fitted on the fitting split; their expected "
            "calibration error (10 equal-width bins of probability, weighted by images) and "
            "reliability diagrams are on the held-out split.")


def _html(result: CalibrationResult, summary: dict[str, Any]) -> str:
    esc = html.escape
    rows = []
    for o in result.outcomes:
        e = o.held_out
        status = "calibrated" if o.calibrated else o.status.replace("_", " ")
        rows.append(
            f"<tr class='{'ok' if o.calibrated else 'no'}'><td><a href='#{o.category}'>"
            f"{esc(o.category)}</a></td><td>{esc(status)}</td>"
            f"<td>{esc(json.dumps(summary['categories'][o.category]['goal']))}</td>"
            f"<td>{_num(o.old_value, 4)} → {_num(o.value, 4) if o.calibrated else 'unchanged'}"
            f"</td><td>{_num(e.precision if e else None)} "
            f"[{_num(e.precision_interval[0] if e else None)}, "
            f"{_num(e.precision_interval[1] if e else None)}]</td>"
            f"<td>{_num(e.recall if e else None)} [{_num(e.recall_interval[0] if e else None)}, "
            f"{_num(e.recall_interval[1] if e else None)}]</td>"
            f"<td>{o.fit_positives} / {o.fit_negatives}</td>"
            f"<td>{o.test_positives} / {o.test_negatives}</td>"
            f"<td>{_num(o.reliability.ece) if o.reliability else '–'}</td></tr>"
        )
    sections = []
    for o in result.outcomes:
        sections.append(
            f"<section id='{o.category}'><h2>{esc(o.category)}</h2>"
            f"<p class='msg'>{esc(o.message)}</p>"
            + (f"<p class='msg'>{esc(o.review_message)}</p>" if o.review_message else "")
            + (f"<p class='msg'>{esc(o.probability_message)}</p>"
               if o.probability_message else "")
            + f"<div class='plots'><img src='{o.category}_pr.png' alt='precision-recall curve "
            f"for {o.category}'><img src='{o.category}_hist.png' alt='score histogram for "
            f"{o.category}'>"
            + (f"<img src='{o.category}_reliability.png' alt='reliability diagram for "
               f"{o.category}'>" if o.reliability is not None else "")
            + f"</div>{_confusion_table(o)}</section>"
        )
    left_out = "".join(f"<li>{esc(x)}</li>" for x in result.left_out)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Calibration: {esc(result.policy.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
tr.no td {{ background: #fff3f3; }} tr.ok td {{ background: #f3fff5; }}
.plots img {{ width: 480px; margin-right: 8px; border: 1px solid #eee; }}
.msg {{ font-family: ui-monospace, monospace; font-size: 90%; }}
dt {{ font-weight: bold; }}
</style></head><body>
<h1>Calibration of policy “{esc(result.policy.name)}”</h1>
<dl>
<dt>Model</dt><dd>{esc(result.model)}</dd>
<dt>Profile</dt><dd>{esc(result.profile)}</dd>
<dt>Data</dt><dd>{esc(result.dataset)} (fingerprint {esc(result.fingerprint)})</dd>
<dt>Method</dt><dd>{esc(result.split)}. Thresholds are chosen on the fitting split with
scikit-learn's precision_recall_curve; precision and recall are reported on the held-out split
with 95% percentile-bootstrap intervals (1,000 resamples of the held-out images).
{_probability_method(result)}</dd>
{_weighting(result)}
<dt>Policy version</dt><dd>{esc(result.policy.version)} → {esc(result.new_policy.version)}</dd>
<dt>Date</dt><dd>{result.date.isoformat()}</dd>
</dl>
<table><tr><th>category</th><th>status</th><th>target</th><th>threshold</th>
<th>held-out precision [95% CI]</th><th>held-out recall [95% CI]</th>
<th>fit positives / negatives</th><th>held-out positives / negatives</th>
<th>held-out ECE of the probability map</th></tr>
{''.join(rows)}</table>
{f'<h2>Images left out</h2><ul>{left_out}</ul>' if left_out else ''}
{''.join(sections)}
</body></html>
"""


def write_report(result: CalibrationResult, directory: Path) -> Path:
    """Write the report into ``directory``; returns the path of ``index.html``."""
    directory.mkdir(parents=True, exist_ok=True)
    for o in result.outcomes:
        _plot_pr(o, directory / f"{o.category}_pr.png")
        _plot_hist(o, directory / f"{o.category}_hist.png")
        if o.reliability is not None:
            _plot_reliability(o, directory / f"{o.category}_reliability.png")
    summary = _summary(result)
    (directory / "summary.json").write_text(
        json.dumps(_finite(summary), indent=2, allow_nan=False), encoding="utf-8"
    )
    index = directory / "index.html"
    index.write_text(_html(result, summary), encoding="utf-8")
    return index
