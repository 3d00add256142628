"""Timeline pictures of a prediction: what the model sees, second by second.

``plot_timeline(result, path)`` draws, for one video (a result dict of ``avstfp-predict``
or :class:`~avstfp_fast.predict.Predictor`):

* along the top, the frame the model sees in each second;
* the per-second class probabilities of the most likely classes as a heat map;
* the predicted event segments (class and mean confidence), and under them the true
  segments when the result carries ground truth, with the per-video segment accuracy in
  the title;
* seconds beyond the end of a short media file (``padded_seconds``) hatched in every row.

AVAR (clip-level) results get the frames and a bar chart of the top-k classes instead.
matplotlib's Agg canvas is used directly (pyplot and the process-wide backend are left
alone), so this works in scripts, servers and notebooks (the Figure is returned; in a
notebook it displays itself).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["plot_timeline", "load_frames"]


def load_frames(path: str, segments: int, clip_seconds: float, size: int = 96) -> np.ndarray:
    """The frame per segment the model sees, small: (segments, size, size, 3) uint8 --
    the centre square, as the model's front end crops it (not the whole frame squashed)."""
    from ..train.data import decode_clip
    frames, _ = decode_clip(path, segments=segments, clip_seconds=clip_seconds,
                            short_side=size)
    return centre_square(frames)


def centre_square(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (N, s, s, 3), s = min(H, W): the centre crop the model sees."""
    h, w = frames.shape[1:3]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return frames[:, top:top + s, left:left + s]


def _hatch_padding(ax, result: dict, sps: float, label: bool = False):
    """Hatch the seconds that are padding (beyond the end of the media file)."""
    for i, t in enumerate(result.get("padded_seconds") or []):
        ax.axvspan(t, t + sps, facecolor="none", edgecolor="#444444", hatch="///",
                   linewidth=0, zorder=5, label="padding (no media)" if label and i == 0
                   else None)


def _colour(classes: list, name: str):
    from matplotlib import colormaps
    return colormaps["tab10"](classes.index(name) % 10)


def _track(ax, events: list, classes: list, label: str, total: float):
    ax.set_xlim(0, total)
    ax.set_ylim(0, 1)
    ax.set_yticks([0.5])
    ax.set_yticklabels([label], fontsize=9)
    ax.set_facecolor("#eeeeee")          # background (no event)
    for ev in events:
        w = ev["end"] - ev["start"]
        ax.broken_barh([(ev["start"], w)], (0.1, 0.8), color=_colour(classes, ev["class"]))
        text = ev["class"] if "confidence" not in ev or ev["confidence"] >= 0.999999 else \
            f"{ev['class']} ({ev['confidence']:.2f})"
        ax.text(ev["start"] + w / 2, 0.5, text, ha="center", va="center", fontsize=8,
                color="white", fontweight="bold", clip_on=True)
    if not events:
        ax.text(total / 2, 0.5, "no event (background)", ha="center", va="center",
                fontsize=8, color="#666666")


def _frame_strip(ax, frames, sps: float, total: float):
    frames = centre_square(np.asarray(frames))
    ax.set_xlim(0, total)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xticks([(s + 0.5) * sps for s in range(len(frames))])
    ax.set_xticklabels([f"{s * sps:g} s" for s in range(len(frames))], fontsize=8)
    ax.xaxis.tick_top()
    for s, fr in enumerate(frames):
        ax.imshow(fr, extent=(s * sps + 0.03 * sps, (s + 1) * sps - 0.03 * sps, 0, 1),
                  aspect="auto", interpolation="bilinear")
    for side in ("left", "right", "bottom"):
        ax.spines[side].set_visible(False)


def plot_timeline(result: dict, path: Optional[str] = None, *, frames=None, top: int = 5,
                  dpi: int = 100):
    """Draw ``result`` (see the module docstring); write a PNG to ``path`` if given.

    ``frames``: the per-segment frames (segments, H, W, 3) uint8; by default they are
    decoded again from ``result["video"]`` (pass ``frames=False`` to leave the strip out).
    Returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = list(result["classes"])
    probs = np.asarray(result["probabilities"], dtype=np.float64)
    clip_level = result.get("task") == "avar"
    segments = result.get("segments", probs.shape[0])
    sps = result.get("seconds_per_segment", 1.0)
    total = segments * sps
    if frames is None and result.get("video"):
        try:
            frames = load_frames(result["video"], segments, total)
        except Exception:          # a picture without frames beats no picture
            frames = None
    if frames is False:
        frames = None
    title = result.get("id", "")
    if result.get("segment_accuracy") is not None:
        title += f"   segment accuracy {result['segment_accuracy']:.0%}"
    if clip_level and result.get("label"):
        title += f"   true class: {result['label']}"

    if clip_level:
        k = len(result["top_k"])
        heights = ([1.3] if frames is not None else []) + [0.35 * k + 0.7]
        fig = Figure(figsize=(max(8.0, 1.0 * segments), sum(heights) + 0.8), dpi=dpi)
        FigureCanvasAgg(fig)
        gs = fig.add_gridspec(len(heights), 1, height_ratios=heights, hspace=0.45)
        row = 0
        if frames is not None:
            _frame_strip(fig.add_subplot(gs[0]), frames, total / len(frames), total)
            row = 1
        ax = fig.add_subplot(gs[row])
        names = [t["class"] for t in result["top_k"]][::-1]
        vals = [t["probability"] for t in result["top_k"]][::-1]
        ax.barh(names, vals, color=[_colour(classes, n) for n in names])
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability (clip level)")
        fig.suptitle(title, fontsize=10)
        if path:
            fig.savefig(path)
        return fig

    top = min(top, len(classes))
    order = np.argsort(-probs.max(axis=0), kind="stable")[:top]
    truth = result.get("ground_truth_events")
    heights = ([1.3] if frames is not None else []) + [0.3 * top + 0.4, 0.45] + \
        ([0.45] if truth is not None else [])
    fig = Figure(figsize=(max(8.0, 1.1 * segments + 2.5), sum(heights) + 1.0), dpi=dpi)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[1, 0.015],
                          hspace=0.35, wspace=0.02)
    row = 0
    axes = []
    if frames is not None:
        strip = fig.add_subplot(gs[0, 0])
        _frame_strip(strip, frames, sps, total)
        _hatch_padding(strip, result, sps)
        row = 1
    ax = fig.add_subplot(gs[row, 0])
    im = ax.imshow(probs[:, order].T, aspect="auto", extent=(0, total, top, 0), vmin=0.0,
                   vmax=1.0, cmap="magma", interpolation="nearest")
    ax.set_yticks(np.arange(top) + 0.5)
    ax.set_yticklabels([classes[i] for i in order], fontsize=8)
    ax.set_xticks([])
    fig.colorbar(im, cax=fig.add_subplot(gs[row, 1])).set_label("p", fontsize=8)
    axes.append(ax)
    ax = fig.add_subplot(gs[row + 1, 0])
    _track(ax, result["events"], classes, "predicted", total)
    axes.append(ax)
    if truth is not None:
        ax = fig.add_subplot(gs[row + 2, 0])
        _track(ax, truth, classes, "true", total)
        axes.append(ax)
    for i, a in enumerate(axes):
        _hatch_padding(a, result, sps, label=i == 0)
    if result.get("padded_seconds"):
        title += (f"   (media ends at {result.get('media_seconds', 0):g} s: hatched seconds "
                  f"are padding)")
        fig.suptitle(title, fontsize=10)
    for a in axes[1:-1]:
        a.set_xticks([])
    axes[-1].set_xticks(np.arange(0, total + 1e-9, sps))
    axes[-1].tick_params(axis="x", labelsize=8)
    axes[-1].set_xlabel("time (s)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    if path:
        fig.savefig(path)
    return fig
