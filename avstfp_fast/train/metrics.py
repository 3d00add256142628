"""Evaluation metrics, the confusion-matrix figure and the summary table."""
from __future__ import annotations

import json
import math

import torch

__all__ = ["confusion_update", "accuracy_from_confusion", "plot_confusion", "format_table",
           "json_ready", "dump_json", "dumps_json"]


def json_ready(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no NaN/Infinity:
    a strict parser refuses them), tuples as lists, other objects as str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, torch.Tensor):
        return json_ready(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):     # numpy scalars
        return json_ready(obj.item())
    return str(obj)


def dumps_json(obj, **kw) -> str:
    """Strict JSON text of ``obj`` (non-finite numbers written as null)."""
    return json.dumps(json_ready(obj), allow_nan=False, **kw)


def dump_json(obj, path: str, **kw) -> None:
    """Write ``obj`` as strict JSON to ``path`` (see :func:`dumps_json`)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps_json(obj, **kw))


def confusion_update(cm: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> None:
    """Add (target, pred) pairs to ``cm`` (C, C) in place (rows: truth, cols: prediction)."""
    c = cm.shape[0]
    idx = target.reshape(-1).long() * c + pred.reshape(-1).long()
    cm += torch.bincount(idx.cpu(), minlength=c * c).reshape(c, c).to(cm.dtype)


def accuracy_from_confusion(cm: torch.Tensor) -> float:
    total = int(cm.sum())
    return float(cm.diagonal().sum()) / total if total else float("nan")


def plot_confusion(cm: torch.Tensor, classes: list[str], path: str, title: str) -> str:
    """Row-normalised confusion matrix as a PNG (matplotlib's Agg canvas; pyplot and the
    process-wide backend are left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cmf = cm.double()
    rows = cmf.sum(dim=1, keepdim=True).clamp_min(1)
    norm = (cmf / rows).numpy()
    n = len(classes)
    side = max(4.0, 0.32 * n + 2.5)
    fig = Figure(figsize=(side, side), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    fs = 8 if n <= 12 else 5
    ax.set_xticklabels(classes, rotation=90, fontsize=fs)
    ax.set_yticklabels(classes, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    return path


def format_table(rows: list[tuple[str, str]], title: str = "") -> str:
    w = max([len(k) for k, _ in rows] + [4])
    v = max([len(str(x)) for _, x in rows] + [5])
    line = "+" + "-" * (w + 2) + "+" + "-" * (v + 2) + "+"
    out = [title] if title else []
    out.append(line)
    for k, x in rows:
        out.append(f"| {k:<{w}} | {str(x):>{v}} |")
    out.append(line)
    return "\n".join(out)
