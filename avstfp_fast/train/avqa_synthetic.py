"""Synthetic MUSIC-AVQA-layout data: real .mp4 files and official-format JSON.

Each video shows two "instruments" of different kinds, one in the left half of the frame
(horizontal stripes) and one in the right half (vertical stripes), for the whole clip.
Every kind has a colour and a sound (noise in a frequency band of its own).  The
instruments do not move: which one sounds, and when, is only in the audio.  Either both
sound, one after the other (the first in an interval starting in the first 3 segments,
the second after it, no overlap, one loud and one soft), or only one of them sounds.
Visual Counting questions need an absent kind, so they occur only with ``n_kinds > 2``.

Questions (official templates style, ``<...>`` slots filled from ``templ_values``); the
answers are balanced by construction, so that a model without sound (or without sight)
stays near chance on the questions that need it:

==========================  ==========================================================  =========
type                        question                                                    needs
==========================  ==========================================================  =========
Audio-Visual / Temporal     Is the instrument on the <LR> sounding before the ... <LR>? A, V, time
Audio-Visual / Location     Where is the first sounding instrument?                     A, V, time
Audio-Visual / Existential  Is the <Object> in the video sounding?                      A
Audio-Visual / Counting     How many instruments are sounding in the video?             A
Audio / Counting            How many different sounds can be heard?                     A
Audio / Comparative         Is the <Object> louder than the <Object>? (not by default)  A
Visual / Location           Where is the <Object>?                                      V
Visual / Counting           How many <Object> are in the video?                         V
==========================  ==========================================================  =========

Content is constant within each ``hop``-second block (segment ``s`` is the block
``[s*hop, (s+1)*hop)``), so sampling one second every ``hop`` seconds sees every block:
the default ``hop=6`` gives 60-second videos like MUSIC-AVQA.  Everything is drawn from
``numpy.random.default_rng(seed)``.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .synthetic import write_clip

__all__ = ["make_synthetic_avqa", "KINDS"]

# (name, RGB colour, frequency band of its sound in Hz)
KINDS = (("piano", (225, 45, 45), (150.0, 450.0)), ("violin", (45, 190, 70), (600.0, 1300.0)),
         ("flute", (50, 85, 230), (1700.0, 3200.0)), ("drum", (235, 205, 40), (4000.0, 7000.0)))
SIDES = ("left", "right")
_QUESTIONS = {   # key: (type, template)
    "temporal": (["Audio-Visual", "Temporal"],
                 "Is the instrument on the <LR> sounding before the instrument on the <LR>?"),
    "av_location": (["Audio-Visual", "Location"], "Where is the first sounding instrument?"),
    "existential": (["Audio-Visual", "Existential"], "Is the <Object> in the video sounding?"),
    "av_counting": (["Audio-Visual", "Counting"],
                    "How many instruments are sounding in the video?"),
    "a_counting": (["Audio", "Counting"], "How many different sounds can be heard?"),
    "a_comparative": (["Audio", "Comparative"], "Is the <Object> louder than the <Object>?"),
    "v_location": (["Visual", "Location"], "Where is the <Object>?"),
    "v_counting": (["Visual", "Counting"], "How many <Object> are in the video?"),
}
_NUM = ("zero", "one", "two")


def _frame(rng, kinds, size):
    img = rng.uniform(100, 150) + rng.normal(0, 12, size=(size, size, 1)) * np.ones((1, 1, 3))
    h0, h1 = size // 8, size - size // 8
    half = size // 2
    yy, xx = np.mgrid[h0:h1, 0:half - size // 8]
    for side, k in enumerate(kinds):
        x0 = side * half + size // 16
        x1 = x0 + half - size // 8
        col = np.asarray(KINDS[k][1], dtype=np.float64) * rng.uniform(0.85, 1.0)
        # stripes: horizontal on the left, vertical on the right (a side cue that a
        # frame's global feature keeps, as a pretrained tower's would)
        stripes = 0.6 + 0.4 * np.sin(2 * np.pi * (yy if side == 0 else xx) / 8.0)
        img[h0:h1, x0:x1] = col * stripes[..., None] + rng.normal(0, 6, size=(h1 - h0, x1 - x0, 3))
    return img.clip(0, 255).astype(np.uint8)


def _scene(rng, segments, n_kinds):
    """Two kinds (left, right), per-side sounding intervals and loudness."""
    kinds = [int(k) for k in rng.choice(n_kinds, size=2, replace=False)]
    pattern = rng.choice(["both", "both", "left", "right"])
    intervals = [None, None]
    loud = [bool(rng.integers(2)), False]
    if pattern == "both":
        first = int(rng.integers(2))
        s1 = int(rng.integers(0, 3))
        e1 = s1 + int(rng.integers(2, 4))
        s2 = e1 + int(rng.integers(0, 2))
        e2 = min(segments, s2 + int(rng.integers(2, 5)))
        intervals[first], intervals[1 - first] = (s1, e1), (s2, e2)
        loud[1] = not loud[0]
    else:
        side = SIDES.index(pattern)
        s = int(rng.integers(0, segments - 3))
        intervals[side] = (s, min(segments, s + int(rng.integers(3, 8))))
    return kinds, intervals, loud


def _media(rng, kinds, intervals, loud, *, segments, hop, fps, size, sample_rate):
    frames = [_frame(rng, kinds, size) for _ in range(segments * hop * fps)]
    n = segments * hop * sample_rate
    wave = rng.normal(0, rng.uniform(0.002, 0.004), size=n)
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    for side, iv in enumerate(intervals):
        if iv is None:
            continue
        lo, hi = KINDS[kinds[side]][2]
        band = np.fft.rfft(rng.normal(size=n)) * ((freqs >= lo) & (freqs <= hi))
        sound = np.fft.irfft(band, n)
        rms = rng.uniform(0.15, 0.2) if loud[side] else rng.uniform(0.03, 0.04)
        sound *= rms / max(float(sound.std()), 1e-9)
        mask = np.zeros(n)
        mask[iv[0] * hop * sample_rate:iv[1] * hop * sample_rate] = 1.0
        wave += mask * sound
    return np.stack(frames), wave.astype(np.float32)


def _questions(rng, kinds, intervals, loud, n_kinds):
    """Every applicable question of one scene: (key, templ_values, answer)."""
    names = [KINDS[k][0] for k in kinds]
    sounding = [iv is not None for iv in intervals]
    out = []
    if all(sounding):
        first = 0 if intervals[0][0] < intervals[1][0] else 1
        x = int(rng.integers(2))
        out.append(("temporal", [SIDES[x], SIDES[1 - x]], "yes" if x == first else "no"))
        x = int(rng.integers(2))
        out.append(("a_comparative", [names[x], names[1 - x]], "yes" if loud[x] else "no"))
    else:
        first = sounding.index(True)
        x = int(rng.integers(2))
        out.append(("existential", [names[x]], "yes" if sounding[x] else "no"))
    out.append(("av_location", [], SIDES[first]))
    out.append(("av_counting", [], _NUM[sum(sounding)]))
    out.append(("a_counting", [], _NUM[sum(sounding)]))
    x = int(rng.integers(2))
    out.append(("v_location", [names[x]], SIDES[x]))
    absent = [k for k in range(n_kinds) if k not in kinds]
    if absent and rng.integers(2):
        out.append(("v_counting", [KINDS[int(rng.choice(absent))][0]], "zero"))
    elif absent:
        out.append(("v_counting", [names[int(rng.integers(2))]], "one"))
    return out


# the default question set leaves out the loudness comparison (slow for the tiny CPU model)
DEFAULT_QUESTIONS = ("temporal", "av_location", "existential", "av_counting", "a_counting",
                     "v_location", "v_counting")


def make_synthetic_avqa(root: str, *, n_train: int = 96, n_val: int = 24, n_test: int = 24,
                        questions_per_video: int = 6, n_kinds: int = 2, segments: int = 10,
                        hop: int = 6, questions=DEFAULT_QUESTIONS,
                        fps: int = 2, size: int = 64, sample_rate: int = 16000,
                        seed: int = 0) -> dict:
    """Write ``videos/<id>.mp4`` and ``avqa-{train,val,test}.json`` under ``root``.

    ``n_*``: videos per split; each gets ``questions_per_video`` questions drawn without
    replacement from its applicable ones (all of them when fewer) whose kind is in
    ``questions`` (keys of the table above: temporal, av_location, existential,
    av_counting, a_counting, a_comparative, v_location, v_counting).  ``n_kinds``: how many
    instrument kinds occur (2..4).  Returns a description
    (counts of videos and questions per split and type).
    """
    bad = [q for q in questions if q not in _QUESTIONS]
    if bad or not questions:
        raise ValueError(f"questions: expected a non-empty subset of {tuple(_QUESTIONS)}, "
                         f"got {tuple(questions)}")
    if not 2 <= n_kinds <= len(KINDS):
        raise ValueError(f"n_kinds: expected 2..{len(KINDS)}, got {n_kinds}")
    if segments < 8:
        raise ValueError(f"segments: the scenes need at least 8 segments, got {segments}")
    if size % 16:
        raise ValueError(f"size: expected a multiple of 16 (H.264, two halves), got {size}")
    rng = np.random.default_rng(seed)
    counts, qid = {}, 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = []
        for i in range(n):
            vid = f"syn_{split}_{i:04d}"
            kinds, intervals, loud = _scene(rng, segments, n_kinds)
            frames, wave = _media(rng, kinds, intervals, loud, segments=segments, hop=hop,
                                  fps=fps, size=size, sample_rate=sample_rate)
            write_clip(os.path.join(root, "videos", vid + ".mp4"), frames, fps, wave,
                       sample_rate)
            qs = [q for q in _questions(rng, kinds, intervals, loud, n_kinds)
                  if q[0] in questions]
            pick = rng.permutation(len(qs))[:questions_per_video]
            for j in sorted(pick):
                key, values, answer = qs[j]
                qtype, text = _QUESTIONS[key]
                rows.append({"video_id": vid, "question_id": qid, "type": json.dumps(qtype),
                             "question_content": text, "templ_values": json.dumps(values),
                             "question_deleted": 0, "anser": answer})
                qid += 1
        with open(os.path.join(root, f"avqa-{split}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        counts[split] = {"videos": n, "questions": len(rows)}
    return {"root": root, "seed": seed, "counts": counts, "hop": hop, "segments": segments}
