"""The results folder of a cross-validation: summary.json, folds.csv, summary.md and figures.

Figures follow the paper's: confusion matrices summed over folds (Fig. 8), one-vs-rest
ROC curves per class from the pooled out-of-fold predictions with a log-scaled x axis
(Fig. 9), per-class AUC bars (Fig. 10) and macro-average AUC bars (Fig. 11), both as
mean +- std over folds.

Layout read here: ``OUT/<pipeline>/fold_<k>/metrics.json`` and ``predictions.csv``.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._files import write_json, write_text
from ..viz import pyplot
from .metrics import roc_curve, summarize_folds

__all__ = ["PAPER_RESULTS", "PIPELINE_TITLES", "markdown_table", "read_predictions", "write_report"]

#: The paper's 10-fold means (ResNet-101, 20,973 panoramic radiographs; Table 2 and section 4).
PAPER_RESULTS = {
    "resize": {"accuracy": 0.927, "macro_auc": 0.989, "epochs": 96},
    "dac": {"accuracy": 0.945, "macro_auc": 0.993, "epochs": 144},
}
#: How each pipeline kind is named in tables and figures.
PIPELINE_TITLES = {"resize": "resize (whole image)", "dac": "DAC", "dac_e2e": "DAC end to end", "stn": "STN", "oracle": "oracle (true region)"}


def read_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices array[N], labels array[N], probabilities array[N, C]) of a predictions.csv."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = [k for k in rows[0] if k.startswith("prob_")] if rows else []
    index = np.array([int(r["index"]) for r in rows], dtype=np.int64)
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    probs = np.array([[float(r[c]) for c in columns] for r in rows], dtype=np.float64).reshape(len(rows), len(columns))
    return index, labels, probs


def write_report(
    out_dir: str | Path, pipelines: dict[str, dict[str, Any]], classes: Sequence[str], folds: int, *, figures: bool = True
) -> dict[str, Any]:
    """Summarise finished folds into summary.json, folds.csv, summary.md and figures/.

    Args:
        out_dir: the results folder.
        pipelines: name -> ``{"kind", "input_size", "epochs"}`` of each pipeline, in order.
        classes: class names.
        folds: k.
        figures: also draw figures/*.png (needs matplotlib).

    Returns:
        The summary: pipeline name -> :func:`~dac.train.metrics.summarize_folds` result
        plus ``kind``, ``input_size``, ``epochs`` and ``train_seconds_mean``.
    """
    out = Path(out_dir)
    summary: dict[str, Any] = {}
    pooled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, info in pipelines.items():
        metrics = [json.loads((out / name / f"fold_{k}" / "metrics.json").read_text()) for k in range(folds)]
        s = summarize_folds(metrics)
        s.update(
            kind=info["kind"],
            input_size=list(info["input_size"]),
            epochs=info["epochs"],
            train_seconds_mean=float(np.mean([m["train_seconds"] for m in metrics])),
        )
        summary[name] = s
        preds = [read_predictions(out / name / f"fold_{k}" / "predictions.csv") for k in range(folds)]
        pooled[name] = (np.concatenate([p[1] for p in preds]), np.concatenate([p[2] for p in preds]))
    write_json(out / "summary.json", summary)
    _write_folds_csv(out / "folds.csv", summary, classes)
    write_text(out / "summary.md", markdown_table(summary, classes))
    if figures:
        folder = out / "figures"
        folder.mkdir(exist_ok=True)
        _plot_confusions(folder / "confusion.png", summary, classes)
        _plot_roc(folder / "roc.png", pooled, classes)
        _plot_auc_per_class(folder / "auc_per_class.png", summary, classes)
        _plot_macro_auc(folder / "macro_auc.png", summary)
    return summary


def _write_folds_csv(path: Path, summary: dict[str, Any], classes: Sequence[str]) -> None:
    fields = ["pipeline", "fold", "n", "accuracy", "macro_auc", *[f"auc_{c}" for c in classes], "epochs", "train_seconds", "eval_seconds",
              "train_accuracy", "eval_train_accuracy"]
    lines = [",".join(fields)]
    for name, s in summary.items():
        for f in s["folds"]:
            row = [name, f["fold"], f["n"], f["accuracy"], f["macro_auc"], *f["per_class_auc"], f["epochs"], f["train_seconds"], f["eval_seconds"],
                   f.get("train_accuracy"), f.get("eval_train_accuracy")]
            lines.append(",".join("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in row))
    write_text(path, "\n".join(lines) + "\n")


def _pm(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if mean is None:
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def markdown_table(summary: dict[str, Any], classes: Sequence[str]) -> str:
    """Markdown tables: accuracy and macro AUC per pipeline (mean ± std over folds), the
    paper's numbers beside them where it has them, then per-class AUC.

    Examples:
        >>> s = {"dac": {"kind": "dac", "input_size": [20, 37], "epochs": 2, "accuracy_mean": .5, "accuracy_std": .1,
        ...              "macro_auc_mean": .7, "macro_auc_std": .05, "per_class_auc_mean": [.7, .7],
        ...              "per_class_auc_std": [.1, .1], "train_seconds_mean": 3.0, "folds": [{}, {}]}}
        >>> print(markdown_table(s, ["a", "b"]).splitlines()[2])
        | DAC | 20×37 | 2 | 50.0 ± 10.0 | 0.700 ± 0.050 | 3 | 94.5 / 0.993 (144 ep.) |
    """
    k = max(len(s["folds"]) for s in summary.values())
    lines = [
        f"| pipeline | classifier input | epochs | accuracy % ({k}-fold mean ± std) | macro AUC | train s / fold | paper: accuracy % / macro AUC |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, s in summary.items():
        title = PIPELINE_TITLES.get(name, f"{name} ({s['kind']})")
        paper = PAPER_RESULTS.get(name)
        ref = f"{paper['accuracy'] * 100:.1f} / {paper['macro_auc']:.3f} ({paper['epochs']} ep.)" if paper else "– (not in the paper)"
        lines.append(
            f"| {title} | {s['input_size'][0]}×{s['input_size'][1]} | {s['epochs']} | "
            f"{_pm(s['accuracy_mean'], s['accuracy_std'], 100)} | {_pm(s['macro_auc_mean'], s['macro_auc_std'], digits=3)} | "
            f"{s['train_seconds_mean']:.0f} | {ref} |"
        )
    lines += ["", "| pipeline | " + " | ".join(f"AUC {c}" for c in classes) + " |", "|---|" + "---:|" * len(classes)]
    for name, s in summary.items():
        title = PIPELINE_TITLES.get(name, name)
        cells = [_pm(m, sd, digits=3) for m, sd in zip(s["per_class_auc_mean"], s["per_class_auc_std"])]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    flagged = [
        f"{name} fold {f.get('fold', '?')} ({f['eval_train_accuracy']:.2f} in eval mode vs {f['train_accuracy']:.2f} in training)"
        for name, s in summary.items() for f in s["folds"] if f.get("eval_gap_warning")
    ]
    if flagged:
        lines += ["", "**Warning**: eval-mode accuracy on the training images far below train-mode accuracy in " + "; ".join(flagged)
                  + ": those models behave differently at evaluation, and their test numbers do not measure what they learned."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def _title(name: str) -> str:
    return PIPELINE_TITLES.get(name, name)


def _plot_confusions(path: Path, summary: dict[str, Any], classes: Sequence[str]) -> None:
    plt = pyplot()
    n = len(summary)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    for ax, (name, s) in zip(axes[0], summary.items()):
        counts = np.asarray(s["confusion"], dtype=np.float64)
        rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{int(counts[i, j])}\n{rates[i, j]:.0%}", ha="center", va="center", fontsize=6,
                        color="white" if rates[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(classes)), classes, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{_title(name)}\naccuracy {s['accuracy_mean']:.1%}", fontsize=9)
    fig.suptitle("Confusion matrices, summed over folds (cf. paper Fig. 8)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_roc(path: Path, pooled: dict[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str]) -> None:
    plt = pyplot()
    n = len(pooled)
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n, 3.6), squeeze=False)
    for ax, (name, (labels, probs)) in zip(axes[0], pooled.items()):
        for k, cls in enumerate(classes):
            positive = labels == k
            if positive.all() or not positive.any():
                continue
            fpr, tpr, _ = roc_curve(probs[:, k], positive)
            floor = 0.5 / max(1, int((~positive).sum()))
            ax.plot(np.maximum(fpr, floor), tpr, lw=1.2, label=cls)
        ax.set_xscale("log")
        ax.set_xlim(right=1.0)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate (log)", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.set_title(_title(name), fontsize=9)
        ax.legend(fontsize=6, loc="lower right", title="class", title_fontsize=6)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("One-vs-rest ROC, out-of-fold predictions pooled (cf. paper Fig. 9)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_auc_per_class(path: Path, summary: dict[str, Any], classes: Sequence[str]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(classes), 3.6))
    width = 0.8 / max(1, len(summary))
    for i, (name, s) in enumerate(summary.items()):
        means = [np.nan if m is None else m for m in s["per_class_auc_mean"]]
        stds = [0.0 if sd is None else sd for sd in s["per_class_auc_std"]]
        ax.bar(np.arange(len(classes)) + (i - (len(summary) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=_title(name))
    ax.set_xticks(range(len(classes)), classes)
    ax.set_xlabel("class")
    ax.set_ylabel("AUC (mean ± std over folds)")
    ax.set_ylim(_auc_floor(summary), 1.0)
    ax.legend(fontsize=7, ncol=len(summary), loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    ax.set_title("AUC per class (cf. paper Fig. 10)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_macro_auc(path: Path, summary: dict[str, Any]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(summary), 3.4))
    names = list(summary)
    means = [summary[n]["macro_auc_mean"] for n in names]
    stds = [summary[n]["macro_auc_std"] or 0.0 for n in names]
    bars = ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(names))])
    for bar, m in zip(bars, means):
        ax.text(bar.get_x() + bar.get_width() / 2, m, f"{m:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), [_title(n) for n in names], fontsize=8)
    ax.set_ylabel("macro-average AUC")
    ax.set_ylim(_auc_floor(summary), 1.0)
    ax.set_title("Macro-average AUC (cf. paper Fig. 11)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _auc_floor(summary: dict[str, Any]) -> float:
    values = [m for s in summary.values() for m in s["per_class_auc_mean"] + [s["macro_auc_mean"]] if m is not None]
    low = min(values) if values else 0.5
    return max(0.0, np.floor((low - 0.05) * 20) / 20)
