"""AVQA answer accuracy per question type, as in the paper's Table 2 and the baseline.

Counts live in one int64 tensor ``(len(QTYPES) + 1, 2)``: per type (the last row is
"other") the number of correct answers and of questions, so that DDP can all-reduce it.
Group averages are pooled (correct / questions over the group's types, as the baseline's
test report computes them), and ``overall`` pools every question, other types included.
Question types outside the nine have their own row, ``other``.  Empty groups give None
(no questions: no accuracy; JSON null).
"""
from __future__ import annotations

import math

import torch

from .avqa_data import QTYPES

__all__ = ["new_counts", "update_counts", "avqa_report", "REPORT_ROWS", "format_avqa_table",
           "plot_avqa_bars"]

_SHORT = {"Audio": "audio", "Visual": "visual", "Audio-Visual": "av"}
# (report key, label, type indices pooled) in the order of the paper's Table 2
REPORT_ROWS = []
for _group in ("Audio", "Visual", "Audio-Visual"):
    _idx = [i for i, t in enumerate(QTYPES) if t[0] == _group]
    for _i in _idx:
        REPORT_ROWS.append((f"{_SHORT[_group]}_{QTYPES[_i][1].lower()}",
                            f"{_group} {QTYPES[_i][1]}", (_i,)))
    REPORT_ROWS.append((f"{_SHORT[_group]}_avg", f"{_group} avg", tuple(_idx)))
# question types outside the nine: their own row (the paper has none), then the overall
REPORT_ROWS.append(("other", "Other types", (len(QTYPES),)))
REPORT_ROWS.append(("overall", "Overall avg", tuple(range(len(QTYPES) + 1))))
REPORT_ROWS = tuple(REPORT_ROWS)


def new_counts() -> torch.Tensor:
    return torch.zeros(len(QTYPES) + 1, 2, dtype=torch.int64)


def update_counts(counts: torch.Tensor, qtype: torch.Tensor, correct: torch.Tensor) -> None:
    """Add a batch: ``qtype`` (B,) type indices, ``correct`` (B,) bools."""
    n = counts.shape[0]
    q = qtype.reshape(-1).long().cpu()
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= n):
        raise ValueError(f"qtype: expected indices in [0, {n}), got [{int(q.min())}, "
                         f"{int(q.max())}]")
    c = correct.reshape(-1).long().cpu()
    counts[:, 0] += torch.bincount(q, weights=c.double(), minlength=n).long()
    counts[:, 1] += torch.bincount(q, minlength=n)


def avqa_report(counts: torch.Tensor) -> dict:
    """{key: accuracy} for every row of :data:`REPORT_ROWS` plus ``n_<key>`` counts."""
    out = {}
    for key, _, idx in REPORT_ROWS:
        right = int(counts[list(idx), 0].sum())
        total = int(counts[list(idx), 1].sum())
        out[key] = right / total if total else None
        out[f"n_{key}"] = total
    return out


def format_avqa_table(report: dict, title: str = "") -> str:
    """The per-type accuracies as a text table (percent, question counts)."""
    from .metrics import format_table
    rows = []
    for key, label, _ in REPORT_ROWS:
        if key == "other" and not report.get("n_other"):
            continue
        acc = report.get(key, float("nan"))
        cell = "n/a" if acc is None or math.isnan(acc) else f"{100 * acc:.2f}%"
        rows.append((label, f"{cell} ({report.get(f'n_{key}', 0)})"))
    return format_table(rows, title)


def plot_avqa_bars(report: dict, path: str, title: str) -> str:
    """Bar chart of the per-type and group accuracies as a PNG (Agg canvas only)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, values, colours = [], [], []
    palette = {"audio": "#d9822b", "visual": "#3b7dd8", "av": "#3aa655", "other": "#999999",
               "overall": "#555555"}
    rows = [r for r in REPORT_ROWS if r[0] != "other" or report.get("n_other")]
    for key, label, _ in rows:
        acc = report.get(key, float("nan"))
        labels.append(label)
        values.append(0.0 if acc is None or math.isnan(acc) else 100 * acc)
        colours.append(palette[key.split("_")[0]])
    fig = Figure(figsize=(9, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(labels))
    bars = ax.bar(xs, values, color=colours)
    for b, (key, _, _) in zip(bars, rows):
        if key.endswith("avg"):
            b.set_edgecolor("black")
            b.set_linewidth(1.5)
    for x, v, (key, _, _) in zip(xs, values, rows):
        n = report.get(f"n_{key}", 0)
        ax.text(x, v + 1, f"{v:.1f}" if n else "n/a", ha="center", fontsize=7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("answer accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path
