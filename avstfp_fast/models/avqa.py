"""Audio-visual question answering (MUSIC-AVQA): the ST-AVQA head on AV-STFP features.

The paper's recipe for AVQA keeps the ST-AVQA baseline (Li et al., CVPR 2022) and swaps its
feature extractors (VGGish audio, ResNet-18 14x14 visual maps) for the frozen CLIP tower
with AV-STFP prompts.  Per segment the tower gives the audio CLS feature and the visual
tokens (CLS and patches, ln_post-normalised); the head then does what ST-AVQA does:

* **question encoder**: word embedding -> tanh -> LSTM; the final hidden and cell states of
  every layer are concatenated -> tanh -> linear to the head width ``H``;
* **audio**: ``Linear(D, H) -> ReLU -> Linear(H, H)`` of the audio CLS feature;
* **spatial grounding** (per segment): the visual patch tokens are projected to ``H``
  and L2-normalised; the L2-normalised audio feature scores every patch (cosine), a
  softmax over the patches pools them into the grounded feature; it is concatenated with
  the frame's global feature (the projected visual CLS token) -> tanh -> ``Linear(2H, H)``;
* **audio-visual matching** (training only): ``[audio; grounded visual]`` ->
  ``2H -> H -> H/2 -> H/4 -> 1`` MLP with ReLUs, one logit "this frame goes with this
  sound", for the positive frames and for negative frames taken from other videos
  (grounded with the positive audio).  Binary cross-entropy, weight 0.5 (ST-AVQA's
  two-way softmax cross-entropy is the same function of the logit difference);
* **temporal grounding**: the question embedding attends over the M segments (multi-head
  attention, 4 heads) separately for the audio and the grounded visual features, each
  followed by a feed-forward residual block and LayerNorm;
* **fusion**: per modality, attended feature + mean over segments; concatenated -> tanh ->
  ``Linear(2H, H)``; multiplied with the question embedding -> tanh -> answer logits.

One deliberate addition: ST-AVQA's temporal attention has no notion of segment order (it
is invariant to permuting the segments, and so are the tower's temporal stages), which
makes "before/after" questions unanswerable except by bias.  ``temporal_pos=True`` adds a
learned per-segment embedding to the audio and grounded visual features before the
temporal attention; it starts at zero, so at initialisation the head computes exactly
the baseline's function.  ``temporal_pos=False`` removes it.

Modalities: with ``modalities=("visual",)`` there is no audio branch; spatial grounding
then pools the patches uniformly and there is no matching head.  With ``("audio",)``
there is no visual branch.  The fusion layer takes whatever branches exist.

``PromptedCLIPAVQA`` is a ``PromptedCLIP`` (same prompts, backends, ``set_backend``,
``parameter_summary``, ``param_groups``, state_dict layout ``visual.*`` / prompts /
``head.*``) whose ``head`` is the :class:`AVQAHead` and whose forward takes the question.
It can carry the question ``vocabulary`` (token id -> word) and the ``answers`` (class id
-> answer) it was trained with: :meth:`PromptedCLIPAVQA.encode_questions` and
:meth:`PromptedCLIPAVQA.decode_answers` use them, and its prompt files record them with the
head configuration, so ``PromptedCLIPAVQA.from_prompts(path)`` rebuilds the same model
(``docs/avqa.md``, "Sharing a trained AVQA model").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .avqa_text import Vocabulary, question_words
from .config import AVSTFPConfig
from .prompted_clip import PromptedCLIP

__all__ = ["AVQAHeadConfig", "QuestionEncoder", "AVQAHead", "AVQAOutput", "PromptedCLIPAVQA",
           "avqa_loss"]


@dataclass
class AVQAHeadConfig:
    """Sizes of the ST-AVQA head (defaults: the baseline's 512-wide head, 42 answers)."""
    vocab_size: int
    num_answers: int = 42
    hidden: int = 512            # H: width of every head feature (ST-AVQA: 512)
    word_dim: int = 512          # word embedding width (ST-AVQA: 512)
    lstm_layers: int = 1
    heads: int = 4               # temporal attention heads
    dropout: float = 0.1
    segments: int = 10           # M, for the temporal position embedding
    temporal_pos: bool = True
    input_norm: bool = True      # BatchNorm of the tower features entering the head
    match_weight: float = 0.5    # weight of the matching loss (ST-AVQA: 0.5)

    def __post_init__(self):
        for name in ("vocab_size", "num_answers", "hidden", "word_dim", "lstm_layers", "heads",
                     "segments"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size: expected >= 2 (<pad> and at least one word), got "
                             f"{self.vocab_size}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden: must be divisible by heads={self.heads}, got "
                             f"{self.hidden}")
        if self.hidden < 4:
            raise ValueError(f"hidden: expected >= 4 (the matching MLP narrows to H/4), got "
                             f"{self.hidden}")

    def to_dict(self) -> dict:
        return asdict(self)


class QuestionEncoder(nn.Module):
    """Token ids (B, L) -> question embedding (B, out_dim).

    Embedding -> tanh -> LSTM -> [h_n; c_n] of every layer -> tanh -> linear.  The LSTM
    stops at each question's last word (ids after it are the padding id 0): ST-AVQA runs
    it over the padding too, which, with forget gates starting near 0.5, all but erases
    the early words from the final state until training repairs it.
    """

    def __init__(self, vocab_size: int, word_dim: int, hidden: int, layers: int, out_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.lstm = nn.LSTM(word_dim, hidden, layers, batch_first=True)
        self.out = nn.Linear(2 * layers * hidden, out_dim)

    def forward(self, question: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.embed(question))
        pos = torch.arange(1, question.shape[1] + 1, device=question.device)
        lengths = ((question != 0) * pos).amax(dim=1).clamp_min(1)     # last non-pad + 1
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, (h, c) = self.lstm(packed)                                # (layers, B, hidden)
        state = torch.cat([h, c], dim=-1).transpose(0, 1).flatten(1)  # (B, layers*2*hidden)
        return self.out(torch.tanh(state))


class TemporalGrounding(nn.Module):
    """Question-guided attention over segments + feed-forward residual + LayerNorm."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """q (B, H), seq (B, M, H) -> (B, H)."""
        x = self.attn(q.unsqueeze(1), seq, seq, need_weights=False)[0].squeeze(1)
        return self.norm(x + self.drop(self.ffn(x)))


class AVQAOutput(NamedTuple):
    logits: torch.Tensor                   # (B, num_answers)
    match_pos: Optional[torch.Tensor]      # (B, M) matching logits of the true frames
    match_neg: Optional[torch.Tensor]      # (B, M) ... of the negative frames (or None)


def avqa_loss(out: AVQAOutput, answer: torch.Tensor, match_weight: float = 0.5) -> torch.Tensor:
    """Answer cross-entropy (targets < 0 are ignored) + ``match_weight`` x binary
    cross-entropy of the matching logits (positives 1, negatives 0, mean over both)."""
    loss = F.cross_entropy(out.logits.float(), answer, ignore_index=-1)
    if out.match_neg is not None and match_weight:
        logits = torch.cat([out.match_pos.flatten(), out.match_neg.flatten()]).float()
        target = torch.cat([torch.ones(out.match_pos.numel()),
                            torch.zeros(out.match_neg.numel())]).to(logits)
        loss = loss + match_weight * F.binary_cross_entropy_with_logits(logits, target)
    return loss


def _norm(bn, x):
    """BatchNorm1d over every leading dim of (..., D) features."""
    return bn(x.reshape(-1, x.shape[-1])).view(x.shape)


class AVQAHead(nn.Module):
    """The ST-AVQA head on per-segment tower tokens (see the module docstring)."""

    def __init__(self, width: int, cfg: AVQAHeadConfig, modalities=("audio", "visual")):
        super().__init__()
        self.cfg = cfg
        self.modalities = tuple(modalities)
        H = cfg.hidden
        self.has_audio = "audio" in self.modalities
        self.has_visual = "visual" in self.modalities
        self.question = QuestionEncoder(cfg.vocab_size, cfg.word_dim, H, cfg.lstm_layers, H)
        norm = (lambda: nn.BatchNorm1d(width)) if cfg.input_norm else (lambda: nn.Identity())
        if self.has_audio:
            self.audio_norm = norm()
            self.audio_proj = nn.Sequential(nn.Linear(width, H), nn.ReLU(), nn.Linear(H, H))
            self.temporal_audio = TemporalGrounding(H, cfg.heads, cfg.dropout)
        if self.has_visual:
            self.visual_norm, self.patch_norm = norm(), norm()
            self.visual_proj = nn.Linear(width, H)
            self.global_local = nn.Linear(2 * H, H)
            self.temporal_visual = TemporalGrounding(H, cfg.heads, cfg.dropout)
        if self.has_audio and self.has_visual:
            self.match = nn.Sequential(nn.Linear(2 * H, H), nn.ReLU(), nn.Linear(H, H // 2),
                                       nn.ReLU(), nn.Linear(H // 2, H // 4), nn.ReLU(),
                                       nn.Linear(H // 4, 1))
        if cfg.temporal_pos:
            self.segment_pos = nn.Parameter(torch.zeros(cfg.segments, H))
        self.fusion = nn.Linear(H * len(self.modalities), H)
        self.answer = nn.Linear(H, cfg.num_answers)

    # ---------------------------------------------------------------- pieces
    def _ground(self, patches, glob, a):
        """patches (B, M, Nv, H) L2-normalised, glob (B, M, H), a (B, M, H) or None."""
        if a is None:
            pooled = patches.mean(dim=2)
        else:
            score = torch.einsum("bmnh,bmh->bmn", patches, F.normalize(a, dim=-1))
            pooled = torch.einsum("bmn,bmnh->bmh", score.softmax(dim=-1), patches)
        return self.global_local(torch.tanh(torch.cat([glob, pooled], dim=-1)))

    def _match(self, a, v):
        return self.match(torch.cat([a, v], dim=-1)).squeeze(-1)

    def forward(self, audio_tokens: Optional[torch.Tensor], visual_tokens: Optional[torch.Tensor],
                question: torch.Tensor, negatives: Optional[torch.Tensor] = None) -> AVQAOutput:
        """audio_tokens (B, M, Na, D) / visual_tokens (B, M, Nv+1, D): the tower's final
        normalised tokens, CLS at row 0 (only the audio CLS is used); question (B, L)
        token ids; negatives (B, M, 2) long: for every (sample, segment), the (sample,
        segment) of this batch whose frame is its negative (training only, or None)."""
        q = self.question(question)
        a = v = match_pos = match_neg = None
        if self.has_audio:
            a = self.audio_proj(_norm(self.audio_norm, audio_tokens[:, :, 0]))   # (B, M, H)
        if self.has_visual:
            glob = self.visual_proj(_norm(self.visual_norm, visual_tokens[:, :, 0]))
            patches = self.visual_proj(_norm(self.patch_norm, visual_tokens[:, :, 1:]))
            patches = F.normalize(patches, dim=-1)                              # (B, M, Nv, H)
            v = self._ground(patches, glob, a)
            if a is not None:
                match_pos = self._match(a, v)
                if negatives is not None:
                    nb, nt = negatives[..., 0], negatives[..., 1]
                    v_neg = self._ground(patches[nb, nt], glob[nb, nt], a)
                    match_neg = self._match(a, v_neg)
        feats = []
        for x, block in ((a, "temporal_audio"), (v, "temporal_visual")):
            if x is None:
                continue
            seq = x + self.segment_pos[:x.shape[1]] if self.cfg.temporal_pos else x
            feats.append(getattr(self, block)(q, seq) + x.mean(dim=1))
        fused = self.fusion(torch.tanh(torch.cat(feats, dim=-1)))
        logits = self.answer(torch.tanh(fused * q))
        return AVQAOutput(logits, match_pos, match_neg)


class PromptedCLIPAVQA(PromptedCLIP):
    """AV-STFP tower + ST-AVQA head: ``model(audio, video, question, negatives=None)``.

    ``head=``: an :class:`AVQAHeadConfig` or a dict of its fields (``vocab_size`` is
    required); ``vocabulary``: the question words by token id (``<pad>`` first,
    ``vocab_size`` of them) and ``answers``: the answer strings by class id
    (``num_answers`` of them), both optional (needed by :meth:`encode_questions` /
    :meth:`decode_answers`, recorded in prompt files); the remaining keywords are
    ``PromptedCLIP``'s (tower, backend, prompt switches; ``task`` is fixed to None for the
    tower: the head is this class's).
    """
    prompt_file_kind = "PromptedCLIPAVQA"

    def __init__(self, model: Union[str, nn.Module] = "ViT-L-14", *,
                 head: Union[AVQAHeadConfig, dict], vocabulary: Optional[list] = None,
                 answers: Optional[list] = None, config: Optional[AVSTFPConfig] = None,
                 **kw):
        if config is None:
            if kw.pop("task", None) is not None:
                raise ValueError("task: PromptedCLIPAVQA builds its own head; leave task unset")
            switches = {k: kw.pop(k) for k in list(kw) if k in AVSTFPConfig.__dataclass_fields__}
            config = AVSTFPConfig(task=None, **switches)
        elif config.task is not None:
            raise ValueError(f"config.task: expected None for PromptedCLIPAVQA (the head is "
                             f"the AVQA head), got {config.task!r}")
        super().__init__(model, config=config, **kw)
        self.head_config = head if isinstance(head, AVQAHeadConfig) else AVQAHeadConfig(**head)
        self.vocabulary = _word_list(vocabulary, "vocabulary", self.head_config.vocab_size,
                                     "head.vocab_size")
        if self.vocabulary is not None and self.vocabulary[0] != "<pad>":
            raise ValueError(f"vocabulary: token id 0 must be '<pad>', got "
                             f"{self.vocabulary[0]!r}")
        if self.vocabulary is not None and len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError("vocabulary: words must be distinct (one token id per word)")
        self.answers = _word_list(answers, "answers", self.head_config.num_answers,
                                  "head.num_answers")
        dev = self.visual.conv1.weight.device
        self.head = AVQAHead(self.width, self.head_config, config.modalities).to(dev)

    def forward(self, audio: Optional[torch.Tensor], video: Optional[torch.Tensor],
                question: torch.Tensor, negatives: Optional[torch.Tensor] = None) -> AVQAOutput:
        ref = video if video is not None else audio
        B = ref.shape[0] if isinstance(ref, torch.Tensor) else None
        M = ref.shape[1] if isinstance(ref, torch.Tensor) and ref.dim() > 1 else None
        _check_question(question, B, self.head_config.vocab_size)
        if negatives is not None:
            _check_negatives(negatives, B, M)
        if self.head_config.temporal_pos and M is not None and M > self.head_config.segments:
            raise ValueError(f"audio/video: {M} segments, but the head's temporal position "
                             f"embedding has {self.head_config.segments}")
        a_tok, v_tok = self.encode(audio, video, tokens=True)
        return self.head(a_tok, v_tok, question, negatives)

    # ------------------------------------------------------------------ questions, answers
    def encode_questions(self, questions, templ_values=None,
                         max_len: Optional[int] = None) -> torch.Tensor:
        """Token ids (B, L) of question strings, as the trainer encodes them (template
        slots such as ``<Object>`` filled from ``templ_values``: one list per question;
        unknown words -> ``<unk>``; padded with ``<pad>`` to ``max_len``, default the
        longest question -- the answer does not depend on the padding length)."""
        if self.vocabulary is None:
            raise ValueError("vocabulary: this model has none (build it with vocabulary=, or "
                             "load a prompt file written by the AVQA trainer)")
        if isinstance(questions, str):
            questions = [questions]
        if templ_values is None:
            templ_values = [[] for _ in questions]
        if len(templ_values) != len(questions):
            raise ValueError(f"templ_values: expected one list per question "
                             f"({len(questions)}), got {len(templ_values)}")
        words = [question_words(q, t) for q, t in zip(questions, templ_values)]
        vocab = Vocabulary(self.vocabulary)
        L = max_len if max_len is not None else max(len(w) for w in words)
        ids = [vocab.encode(w, L, f"questions[{i}]: ") for i, w in enumerate(words)]
        return torch.as_tensor(np.stack(ids), device=self.visual.conv1.weight.device)

    def decode_answers(self, logits: torch.Tensor) -> list:
        """The answer strings of logits (B, num_answers) (their argmax)."""
        if self.answers is None:
            raise ValueError("answers: this model has none (build it with answers=, or load "
                             "a prompt file written by the AVQA trainer)")
        return [self.answers[i] for i in logits.argmax(dim=-1).tolist()]

    def prompt_file_init(self) -> dict:
        """The head configuration, the vocabulary and the answers (the prompt-file hook)."""
        return {"head": self.head_config.to_dict(), "vocabulary": self.vocabulary,
                "answers": self.answers}


def _word_list(words, name, n, field):
    if words is None:
        return None
    words = list(words)
    if not all(isinstance(w, str) for w in words):
        raise TypeError(f"{name}: expected a list of strings")
    if len(words) != n:
        raise ValueError(f"{name}: expected {n} entries ({field}), got {len(words)}")
    return words


def _check_question(question, B, vocab_size):
    if not isinstance(question, torch.Tensor):
        raise TypeError(f"question: expected a LongTensor (B, L), got {type(question).__name__}")
    if question.dtype != torch.long:
        raise TypeError(f"question: expected dtype torch.int64 token ids, got {question.dtype}")
    if question.dim() != 2 or (B is not None and question.shape[0] != B) or question.shape[1] < 1:
        raise ValueError(f"question: expected shape (B={B}, L>=1), got {tuple(question.shape)}")
    if question.numel() and (int(question.min()) < 0 or int(question.max()) >= vocab_size):
        raise ValueError(f"question: token ids must lie in [0, {vocab_size}), got "
                         f"[{int(question.min())}, {int(question.max())}]")


def _check_negatives(neg, B, M):
    if not isinstance(neg, torch.Tensor) or neg.dtype != torch.long:
        raise TypeError(f"negatives: expected a LongTensor (B, M, 2), got "
                        f"{getattr(neg, 'dtype', type(neg).__name__)}")
    if neg.shape != (B, M, 2):
        raise ValueError(f"negatives: expected shape ({B}, {M}, 2), got {tuple(neg.shape)}")
    if neg.numel() and (int(neg.min()) < 0 or int(neg[..., 0].max()) >= B
                        or int(neg[..., 1].max()) >= M):
        raise ValueError(f"negatives: (sample, segment) indices must lie in [0, {B}) x "
                         f"[0, {M})")
