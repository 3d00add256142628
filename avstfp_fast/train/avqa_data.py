"""MUSIC-AVQA data: the official JSON files, the question vocabulary, the dataset.

Layout (``<data-root>``)::

    avqa-train.json  avqa-val.json  avqa-test.json     (also found under json/ or data/json/)
    videos/<video_id>.mp4                              (the raw 60-second videos)

Each JSON file is a list of objects with (at least) ``video_id``, ``question_id``,
``type`` (a list such as ``["Audio", "Counting"]``, or that list written as a string, as
in the official files), ``question_content`` (with ``<Object>``-style slots),
``templ_values`` (the slot values in order: a list, or a list written as a string) and
``anser`` (sic: the official key for the answer).

Questions (as ST-AVQA): split on single spaces; a trailing ``?`` is removed; every word
containing ``<`` is replaced by the next template value (a value is one token, even with
spaces); then padded with ``<pad>`` (id 0) to ``max_len`` words (default 14, the
baseline's).  A question longer than ``max_len`` is an error naming the file, question
and length (raise ``max_len``; nothing is silently truncated).  The vocabulary is
``<pad>``, ``<unk>`` (id 1: val/test words absent from the training questions), then the
training words in first-seen order; answers are the sorted distinct training answers
(42 on MUSIC-AVQA); a val/test answer outside them gets target -1 (always counted wrong;
such questions are counted per split, printed at load time and reported as
``unseen_answers``).  A trained model carries its vocabulary and answers (checkpoint and
prompt file): evaluating or resuming it uses those, never the training file's order.

Bad rows (missing keys, unparsable type or template values, slot/value count mismatch,
empty question) are skipped with a warning and counted; missing or unreadable videos are
skipped and counted at load time, as for AVE.

Sampling (as the baseline): 10 one-second segments, one every ``hop`` = 6 seconds (0-1 s,
6-7 s, ..., 54-55 s): the clip's first ``segments x hop`` seconds are decoded as 1-s
spans and every ``hop``-th span is kept (its centre frame and its 1 s of audio), then the
usual front end (fbank, CLIP frames) runs on those.

Negatives for the matching loss: frames of OTHER videos of the same split, drawn from the
other samples of the training batch (:func:`sample_negatives`): the tower's features of
those frames are already computed, so the negatives cost no extra tower pass.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..models.avqa_text import MAX_LEN, PAD, UNK, Vocabulary, question_words
from ..models.avqa_text import as_list as _as_list
from .data import BadSample, ClipDataset, PreparedMixin, collate_skip_bad, decode_clip

log = logging.getLogger("avstfp_fast.train")

__all__ = ["AVQA_SPLIT_FILES", "QTYPES", "QuestionRow", "Vocabulary", "read_avqa_json",
           "question_words", "build_vocabulary", "avqa_splits", "AVQASplits", "AVQADataset",
           "collate_avqa", "sample_negatives", "MAX_LEN"]

AVQA_SPLIT_FILES = {"train": "avqa-train.json", "val": "avqa-val.json", "test": "avqa-test.json"}
# The question types of MUSIC-AVQA (paper Table 2 / the baseline's test report), in order;
# anything else is type index len(QTYPES) ("other": counted in the overall accuracy only).
QTYPES = (("Audio", "Counting"), ("Audio", "Comparative"),
          ("Visual", "Counting"), ("Visual", "Location"),
          ("Audio-Visual", "Existential"), ("Audio-Visual", "Location"),
          ("Audio-Visual", "Counting"), ("Audio-Visual", "Comparative"),
          ("Audio-Visual", "Temporal"))
_REQUIRED = ("video_id", "question_id", "type", "question_content", "templ_values", "anser")


@dataclass(frozen=True)
class QuestionRow:
    question_id: str
    video_id: str
    words: tuple          # template-filled words, no padding
    answer: str
    qtype: int            # index into QTYPES, len(QTYPES) for other types


def _qtype(value) -> int:
    t = tuple(_as_list(value, "type"))
    if len(t) < 2:
        raise ValueError(f"type: expected [modality, kind], got {list(t)}")
    return QTYPES.index(t[:2]) if t[:2] in QTYPES else len(QTYPES)


def read_avqa_json(path: str) -> tuple[list[QuestionRow], int]:
    """Parse one official AVQA JSON file: (rows, number of bad rows skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"AVQA question file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of question objects, got "
                         f"{type(data).__name__}")
    rows, bad = [], 0
    for i, rec in enumerate(data):
        try:
            if not isinstance(rec, dict):
                raise ValueError(f"expected an object, got {type(rec).__name__}")
            missing = [k for k in _REQUIRED if k not in rec]
            if missing:
                raise ValueError(f"missing keys {missing}")
            words = question_words(str(rec["question_content"]), rec["templ_values"])
            rows.append(QuestionRow(str(rec["question_id"]), str(rec["video_id"]),
                                    tuple(words), str(rec["anser"]).strip(),
                                    _qtype(rec["type"])))
        except ValueError as e:
            bad += 1
            log.warning("%s: skipping row %d: %s", path, i, e)
    return rows, bad


def build_vocabulary(rows) -> tuple[Vocabulary, list[str]]:
    """(question vocabulary, sorted answers) from the training rows."""
    vocab = Vocabulary(w for r in rows for w in r.words)
    answers = sorted({r.answer for r in rows})
    if not answers:
        raise ValueError("avqa: the training split has no usable questions")
    return vocab, answers


def _find_json(root: str, fname: str):
    for sub in ("", "json", os.path.join("data", "json")):
        p = os.path.join(root, sub, fname)
        if os.path.isfile(p):
            return p
    return None


@dataclass
class AVQASplits:
    vocab: Vocabulary
    answers: list                 # answer strings, index = class id
    splits: dict                  # split -> list of items (path, answer id, video id, ids, qtype, qid)
    bad_rows: dict                # split -> rows skipped in the JSON
    missing_videos: dict          # split -> questions whose video file is missing
    unseen_answers: dict = None   # split -> questions whose answer is not one of ``answers``
    unseen_answer_names: dict = None   # split -> sorted distinct unseen answers
    new_train_words: list = None  # training words outside a given vocabulary
    new_train_answers: list = None     # training answers outside the given answers


def avqa_splits(root: str, *, video_dir: str = "videos", max_len: int = MAX_LEN,
                vocabulary: list | None = None, answers: list | None = None,
                has_video=os.path.isfile) -> AVQASplits:
    """Read ``avqa-{train,val,test}.json`` under ``root``.

    Vocabulary and answers come from the training file (first-seen words, sorted
    answers), or -- when a model already has them (a checkpoint being evaluated or
    resumed) -- are the given ``vocabulary`` (token id -> word, ``<pad>`` and ``<unk>``
    first) and ``answers``; then the row order of the training file does not matter, its
    words outside ``vocabulary`` are listed in ``new_train_words`` (and, like any unknown
    word, encoded as ``<unk>``) and its answers outside ``answers`` in
    ``new_train_answers``, for the caller to refuse or accept.  Val/test questions whose
    answer is not one of the answers (always scored wrong) are counted per split in
    ``unseen_answers``.  ``has_video(path)`` says whether a question's video exists
    (prepared data: whether it was prepared)."""
    paths = {s: _find_json(root, f) for s, f in AVQA_SPLIT_FILES.items()}
    if paths["train"] is None:
        raise FileNotFoundError(f"{root}: no {AVQA_SPLIT_FILES['train']} (looked in ., json/, "
                                f"data/json/)")
    rows, bad = {}, {}
    for split, p in paths.items():
        if p is not None:
            rows[split], bad[split] = read_avqa_json(p)
    new_words = new_answers = None
    if vocabulary is None and answers is None:
        vocab, answers = build_vocabulary(rows["train"])
    else:
        if vocabulary is None or answers is None:
            raise ValueError("avqa_splits: pass both vocabulary and answers, or neither")
        vocabulary, answers = list(vocabulary), list(answers)
        if vocabulary[:2] != [PAD, UNK]:
            raise ValueError(f"vocabulary: expected {PAD!r}, {UNK!r} first, got "
                             f"{vocabulary[:2]}")
        vocab = Vocabulary(vocabulary[2:])
        if vocab.words != vocabulary:
            raise ValueError("vocabulary: words must be distinct")
        new_words = sorted({w for r in rows["train"] for w in r.words} - set(vocab.index))
        new_answers = sorted({r.answer for r in rows["train"]} - set(answers))
    ans_index = {a: i for i, a in enumerate(answers)}
    splits, missing, unseen, unseen_names = {}, {}, {}, {}
    for split, rs in rows.items():
        items, miss = [], 0
        for r in rs:
            path = os.path.join(root, video_dir, r.video_id + ".mp4")
            miss += not has_video(path)
            ids = vocab.encode(r.words, max_len, f"{paths[split]}: question {r.question_id}: ")
            items.append((path, ans_index.get(r.answer, -1), r.video_id, ids, r.qtype,
                          r.question_id))
        splits[split], missing[split] = items, miss
        names = sorted({r.answer for r in rs if r.answer not in ans_index})
        unseen[split] = sum(r.answer not in ans_index for r in rs)
        unseen_names[split] = names
        if miss:
            log.warning("avqa %s: %d of %d questions refer to missing videos (skipped when "
                        "loaded)", split, miss, len(items))
    return AVQASplits(vocab, answers, splits, bad, missing, unseen, unseen_names, new_words,
                      new_answers)


class AVQADataset(ClipDataset):
    """Questions -> dict(audio (M, T, F), video (M, 3, S, S), label (answer id), id (video
    id), question (L,) ids, qtype, qid).  Items come from :func:`avqa_splits`.

    Questions share their video's decoded clip: with ``cache`` every video is kept, else
    the last ``keep_videos`` decoded videos are (evaluation orders its questions by video,
    so each video is decoded once).  Segments sampled beyond the end of a video (``hop`` x
    ``segments`` longer than the file) are padding: warned about once per video and
    listed in the sample's ``padded``."""

    def __init__(self, items, *, hop: int = 6, keep_videos: int = 8, **kw):
        if not isinstance(hop, int) or hop < 1:
            raise ValueError(f"hop: expected an int >= 1 (seconds between segments), got {hop!r}")
        self.questions = [it[3] for it in items]
        self.qtypes = [it[4] for it in items]
        self.qids = [it[5] for it in items]
        self.hop = hop
        self.keep_videos = int(keep_videos)
        self._recent: OrderedDict = OrderedDict()
        self._warned_short: set = set()
        kw.setdefault("clip_seconds", float(kw.get("segments", 10)))
        super().__init__([it[:3] for it in items], **kw)

    def _decode(self, path, info=None):
        m, hop = self.segments, self.hop
        spans: dict = {}
        frames, wave = decode_clip(path, segments=m * hop, clip_seconds=float(m * hop),
                                   sample_rate=self.sample_rate,
                                   short_side=int(np.ceil(1.25 * self.image_size)),
                                   info=spans)
        sr = self.sample_rate
        wave = wave[:m * hop * sr].reshape(m * hop, sr)[::hop].reshape(-1)
        if info is not None:
            padded = set(spans.get("padded", []))
            info["padded"] = [i for i in range(m) if i * hop in padded]
            info["media_seconds"] = spans.get("media_seconds")
        return frames[::hop], wave

    def _load(self, idx):
        if self.cache or self.keep_videos <= 0:
            return super()._load(idx)
        path = self.items[idx][0]
        hit = self._recent.get(path)
        if hit is None:
            try:
                hit = super()._load(idx)
            except BadSample as e:
                hit = e
            self._recent[path] = hit
            while len(self._recent) > self.keep_videos:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(path)
        if isinstance(hit, BadSample):
            raise hit
        return hit

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if "bad" in out:
            return out
        idx = key[0] if isinstance(key, tuple) else key
        if out["padded"] and out["id"] not in self._warned_short:
            self._warned_short.add(out["id"])
            log.warning("avqa: video %s covers %s s; sampling %d segments every %d s reads "
                        "to %d s, so segments %s are padding (repeated last frame, silence)",
                        out["id"], out["media_seconds"], self.segments, self.hop,
                        self.segments * self.hop, out["padded"])
        out.update(question=torch.from_numpy(self.questions[idx]), qtype=self.qtypes[idx],
                   qid=self.qids[idx])
        return out


class PreparedAVQADataset(PreparedMixin, AVQADataset):
    """:class:`AVQADataset` whose questions reference prepared clips (one per video,
    shared by all its questions): items carry a :class:`ClipRef` in the path column."""

    def __init__(self, items, **kw):
        kw["cache"] = False
        super().__init__(items, **kw)


def prepared_avqa_items(splits: "AVQASplits", refs) -> dict:
    """Questions of ``splits`` pointed at the prepared clips ``refs`` (``split_refs``
    output, by video id): ``{split: items}``; a question whose video was not prepared
    keeps its path and is skipped (counted) when loaded."""
    by_id = {m["id"]: r for r, m in refs}
    return {split: [(by_id.get(it[2], it[0]),) + tuple(it[1:]) for it in rows]
            for split, rows in splits.splits.items()}


def collate_avqa(batch):
    """:func:`collate_skip_bad` plus ``question`` (B, L), ``qtype`` (B,), ``qid``."""
    out = collate_skip_bad(batch)
    good = [b for b in batch if b is not None and "bad" not in b]
    out["question"] = torch.stack([b["question"] for b in good]) if good else None
    out["qtype"] = torch.tensor([b["qtype"] for b in good], dtype=torch.long) if good else None
    out["qid"] = [b["qid"] for b in good]
    return out


def sample_negatives(video_ids, segments: int, rng: np.random.Generator):
    """Negative frames for the matching loss: (B, M, 2) long (sample, segment) indices,
    each pointing at a random segment of a random OTHER video of the batch; None when the
    batch holds a single video (then there is no negative)."""
    vids = list(video_ids)
    B = len(vids)
    others = [[j for j in range(B) if vids[j] != vids[i]] for i in range(B)]
    if any(not o for o in others):
        return None
    out = np.empty((B, segments, 2), dtype=np.int64)
    for i, o in enumerate(others):
        out[i, :, 0] = rng.choice(o, size=segments)
        out[i, :, 1] = rng.integers(0, segments, size=segments)
    return torch.from_numpy(out)
