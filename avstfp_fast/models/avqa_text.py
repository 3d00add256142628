"""Question text of the AVQA model: words, vocabulary, padding.

Questions (as ST-AVQA): split on single spaces; a trailing ``?`` is removed; every word
containing ``<`` is replaced by the next template value (a value is one token, even with
spaces); then padded with ``<pad>`` (id 0) to ``max_len`` words (default 14, the
baseline's).  A question longer than ``max_len`` is an error (nothing is silently
truncated).  The vocabulary is ``<pad>``, ``<unk>`` (id 1: words it does not know), then
its words in first-seen order.

Used by :class:`avstfp_fast.models.avqa.AVQAModel` (``encode_questions``) and by the
trainer's AVQA data (``avstfp_fast.train.avqa_data``), which reads the official files.
"""
from __future__ import annotations

import ast
import json

import numpy as np

__all__ = ["PAD", "UNK", "MAX_LEN", "Vocabulary", "question_words", "as_list"]

PAD, UNK = "<pad>", "<unk>"
MAX_LEN = 14


def as_list(value, what):
    """``value`` as a list of strings (a list, or a list written as JSON / Python text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ValueError(f"{what}: expected a list, got {value!r}") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what}: expected a list, got {value!r}")
    return [str(v) for v in value]


def question_words(content: str, templ_values) -> list[str]:
    """Template-filled words of one question (split on single spaces, a trailing ``?``
    removed, each word containing ``<`` replaced by the next template value)."""
    text = content.strip()
    if text.endswith("?"):
        text = text[:-1].rstrip()
    words = [w for w in text.split(" ") if w]
    if not words:
        raise ValueError("question_content: empty question")
    values = as_list(templ_values, "templ_values")
    slots = [i for i, w in enumerate(words) if "<" in w]
    if len(slots) != len(values):
        raise ValueError(f"templ_values: the question has {len(slots)} slot(s), "
                         f"got {len(values)} value(s) {values}")
    for i, val in zip(slots, values):
        words[i] = val
    return words


class Vocabulary:
    """Word -> id (``<pad>`` = 0, ``<unk>`` = 1, then words in first-seen order)."""

    def __init__(self, words):
        self.words = [PAD, UNK]
        self.index = {PAD: 0, UNK: 1}
        for w in words:
            if w not in self.index:
                self.index[w] = len(self.words)
                self.words.append(w)

    def __len__(self):
        return len(self.words)

    def encode(self, words, max_len: int = MAX_LEN, where: str = "") -> np.ndarray:
        if len(words) > max_len:
            raise ValueError(f"{where}question of {len(words)} words is longer than "
                             f"max_len={max_len}: {' '.join(words)!r}; raise the maximum "
                             f"question length (--question-len)")
        ids = np.zeros(max_len, dtype=np.int64)
        ids[:len(words)] = [self.index.get(w, 1) for w in words]
        return ids
