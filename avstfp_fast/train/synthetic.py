"""Synthetic audio-visual event data in the AVE layout, written as real .mp4 files.

Each clip lasts ``segments`` seconds.  A clip has one event category ``c`` that is
present during ``[StartTime, EndTime)`` (whole seconds) and background elsewhere, like
AVE.  During the event the audio carries a tone whose pitch depends on ``c`` and the
frames show a colour/stripe pattern that depends on ``c``; background seconds have only
low noise (audio) and a grey textured frame (video).  Pitch, colour, stripe phase,
loudness and the noise vary from clip to clip, so the task is easy but not trivial.

The files go through PyAV (H.264 video + AAC audio in .mp4) and are read back by the
same AVE loader as the real data set.  Everything is drawn from
``numpy.random.default_rng(seed)``: the same seed gives the same annotations and the
same pixels/samples.
"""
from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

__all__ = ["write_clip", "make_synthetic_ave", "synthetic_class_names"]

_PALETTE = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 235], [235, 210, 40],
                     [200, 50, 210], [40, 210, 220], [245, 140, 30], [140, 90, 40]],
                    dtype=np.float64)
_BASE_HZ = 300.0


def synthetic_class_names(n_events: int) -> list[str]:
    return [f"event_{c}" for c in range(n_events)]


def write_clip(path: str, frames: np.ndarray, fps: int, wave: np.ndarray | None,
               sample_rate: int = 16000, faststart: bool = False) -> None:
    """Write an .mp4 with H.264 video (frames: (N, H, W, 3) uint8) and AAC mono audio
    (wave: (samples,) float in [-1, 1]; None = no audio stream).  ``faststart`` puts the
    index (moov) before the media data, as streaming sites do."""
    import av

    n, h, w, _ = frames.shape
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(path, mode="w", format="mp4", options=opts) as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "12"}
        vs.codec_context.thread_count = 1
        aus = None
        if wave is not None:
            aus = out.add_stream("aac", rate=sample_rate)
            aus.codec_context.layout = "mono"
        for i in range(n):
            fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            fr.pts = i
            fr.time_base = Fraction(1, fps)
            _encode(out, vs, fr)
        _encode(out, vs, None)
        if aus is not None:
            block = 1024
            x = np.asarray(wave, dtype=np.float32).clip(-1, 1)
            for start in range(0, x.shape[0], block):
                chunk = x[start:start + block]
                if chunk.shape[0] < block:
                    chunk = np.pad(chunk, (0, block - chunk.shape[0]))
                af = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="fltp",
                                                layout="mono")
                af.sample_rate = sample_rate
                af.pts = start
                af.time_base = Fraction(1, sample_rate)
                _encode(out, aus, af)
            _encode(out, aus, None)


def _encode(out, stream, frame) -> None:
    """Encode one frame on ``stream`` (None flushes it) and mux the packets into ``out``."""
    for pkt in stream.encode(frame):
        out.mux(pkt)


def _event_frame(rng, c, h, w, colour_scale, phase):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    kind = c % 4
    period = 16.0
    if kind == 0:
        t = yy
    elif kind == 1:
        t = xx
    elif kind == 2:
        t = xx + yy
    else:
        t = xx - yy
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (t / period + phase))
    col = _PALETTE[c % len(_PALETTE)] * colour_scale
    img = col[None, None, :] * (0.45 + 0.55 * stripes[..., None])
    img = img + rng.normal(0, 6, size=img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _background_frame(rng, h, w):
    level = rng.uniform(90, 160)
    img = level + rng.normal(0, 18, size=(h, w, 1)) * np.ones((1, 1, 3))
    return img.clip(0, 255).astype(np.uint8)


def _clip(rng, c, start, end, *, segments, fps, size, sample_rate):
    n_per_seg = fps
    frames = []
    colour_scale = rng.uniform(0.8, 1.0)
    phase = rng.uniform(0, 1)
    for s in range(segments):
        event = start <= s < end
        for _ in range(n_per_seg):
            frames.append(_event_frame(rng, c, size, size, colour_scale, phase) if event
                          else _background_frame(rng, size, size))
    n = segments * sample_rate
    t = np.arange(n) / sample_rate
    wave = rng.normal(0, rng.uniform(0.01, 0.03), size=n)
    hz = _BASE_HZ * 2 ** (c * 0.8) * rng.uniform(0.97, 1.03)
    amp = rng.uniform(0.25, 0.5)
    tone = amp * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
    mask = np.zeros(n)
    mask[int(start * sample_rate):int(end * sample_rate)] = 1.0
    wave = wave + tone * mask
    return np.stack(frames), wave.astype(np.float32)


def make_synthetic_ave(root: str, *, n_events: int = 4, n_train: int = 48, n_val: int = 16,
                       n_test: int = 16, segments: int = 10, fps: int = 4, size: int = 64,
                       sample_rate: int = 16000, seed: int = 0, header: bool = True) -> dict:
    """Write a synthetic AVE-layout data set under ``root`` and return its description.

    Layout: ``Annotations.txt`` (with the header row unless ``header=False``),
    ``trainSet.txt``/``valSet.txt``/``testSet.txt`` (no header, as in AVE) and
    ``AVE/<VideoID>.mp4``.  Classes: ``n_events`` event categories + background.
    """
    if n_events < 1 or n_events > len(_PALETTE):
        raise ValueError(f"n_events: expected 1..{len(_PALETTE)}, got {n_events}")
    if size % 2:
        raise ValueError(f"size: H.264 needs an even frame size, got {size}")
    rng = np.random.default_rng(seed)
    names = synthetic_class_names(n_events)
    rows = {"train": [], "val": [], "test": []}
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(count):
            c = int(rng.integers(n_events))
            length = int(rng.integers(2, segments + 1))
            start = int(rng.integers(0, segments - length + 1))
            end = start + length
            vid = f"syn_{split}_{i:04d}"
            frames, wave = _clip(rng, c, start, end, segments=segments, fps=fps, size=size,
                                 sample_rate=sample_rate)
            write_clip(os.path.join(root, "AVE", vid + ".mp4"), frames, fps, wave,
                       sample_rate)
            rows[split].append(f"{names[c]}&{vid}&good&{start}&{end}")
    with open(os.path.join(root, "Annotations.txt"), "w") as f:
        if header:
            f.write("Category&VideoID&Quality&StartTime&EndTime\n")
        for split in ("train", "val", "test"):
            f.writelines(r + "\n" for r in rows[split])
    for split, fname in (("train", "trainSet.txt"), ("val", "valSet.txt"),
                         ("test", "testSet.txt")):
        with open(os.path.join(root, fname), "w") as f:
            f.writelines(r + "\n" for r in rows[split])
    return {"root": root, "classes": names + ["background"], "seed": seed,
            "counts": {k: len(v) for k, v in rows.items()}}
