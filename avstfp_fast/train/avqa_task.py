"""The AVQA training tasks: ``--task avqa`` (MUSIC-AVQA layout) and ``--task synthetic_avqa``.

Data and vocabulary: :mod:`.avqa_data`; model: :class:`~avstfp_fast.models.avqa.PromptedCLIPAVQA`
(the ST-AVQA head on the prompted tower); metrics per question type: :mod:`.avqa_metrics`.

Loss: answer cross-entropy + ``match_weight`` (0.5) x the audio-visual matching loss, whose
negative frames are frames of other videos of the batch (:func:`.avqa_data.sample_negatives`,
drawn with the step's own generator, so resumed runs replay them).  No audio mix-up (mixing
two clips' sound would change the answers) and, as in the baseline, no visual
augmentation by default.  Model selection: overall validation answer accuracy.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from . import ddp
from .augment import build_visual_augment
from .avqa_data import (AVQADataset, PreparedAVQADataset, Vocabulary, avqa_splits,
                        collate_avqa, prepared_avqa_items, sample_negatives)
from .avqa_metrics import (REPORT_ROWS, avqa_report, new_counts, plot_avqa_bars,
                           update_counts)
from .avqa_synthetic import make_synthetic_avqa
from .tasks import (GeneratedData, Metrics, StepOutput, Task, build_model,
                    check_prepared_image_size, prepared_root)

__all__ = ["AVQATask", "SyntheticAVQATask", "AVQAMetrics"]

log = logging.getLogger("avstfp_fast.train")


def _few(names, k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def _inputs(model, batch, device):
    mods = _unwrap(model).config.modalities
    a = batch["audio"].to(device, non_blocking=True) if "audio" in mods else None
    v = batch["video"].to(device, non_blocking=True) if "visual" in mods else None
    return a, v, batch["question"].to(device, non_blocking=True)


def _unwrap(model):
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


class AVQAMetrics(Metrics):
    """Answer accuracy per question type (counts all-reduced over processes)."""

    def __init__(self):
        self.counts = new_counts()

    def update(self, model, batch, ctx):
        a, v, q = _inputs(model, batch, ctx.device)
        with ctx.autocast():
            out = model(a, v, q)
        pred = out.logits.float().argmax(-1).cpu()
        update_counts(self.counts, batch["qtype"], pred == batch["label"])

    def all_reduce(self):
        ddp.all_reduce(self.counts)

    def summary(self):
        report = avqa_report(self.counts)
        acc = report["overall"]
        return {"acc": float("nan") if acc is None else acc, "n": report["n_overall"],
                **report}


class AVQATask(Task):
    """MUSIC-AVQA: official JSON files + raw videos (see :mod:`.avqa_data`)."""
    name, item_name = "avqa", "questions"
    defaults = dict(visual_aug="none", mixup_prob=0.0)

    stored: Optional[dict] = None     # a checkpoint's task_state (vocabulary, answers)
    restoring: Optional[str] = None   # None, "eval" or "resume"

    def restore(self, state, resuming):
        """Also makes the trained model's vocabulary and answers this task's own, so that
        :meth:`build_model` rebuilds it without reading data (avstfp-predict)."""
        self.stored = state
        self.restoring = "resume" if resuming else "eval"
        st = state or {}
        if "vocabulary" in st and "answers" in st:
            self.vocab = Vocabulary(st["vocabulary"][2:])
            self.answers = self.classes = list(st["answers"])

    def checkpoint_state(self):
        return {"vocabulary": list(self.vocab.words), "answers": list(self.answers)}

    def read_data(self, root, rank):
        cfg = self.cfg
        root, has_video = self._data_source(root)
        st = self.stored or {}
        have = "vocabulary" in st and "answers" in st
        s = avqa_splits(root, max_len=cfg.question_len,
                        vocabulary=st.get("vocabulary") if have else None,
                        answers=st.get("answers") if have else None, has_video=has_video)
        self.vocab, self.answers = s.vocab, s.answers
        self.unseen_answers = s.unseen_answers
        if have:
            diffs = []
            if s.new_train_words:
                diffs.append(f"{len(s.new_train_words)} word(s) not in the checkpoint's "
                             f"vocabulary ({_few(s.new_train_words)})")
            if s.new_train_answers:
                diffs.append(f"{len(s.new_train_answers)} answer(s) not among its "
                             f"{len(s.answers)} answers ({_few(s.new_train_answers)})")
            if diffs and self.restoring == "resume":
                raise ValueError(
                    "resume: avqa-train.json does not match the checkpoint's training data: "
                    + "; ".join(diffs) + "; a resumed run keeps the checkpoint's vocabulary "
                    "and answers (start a new run to train on the new data)")
            if diffs and rank == 0:
                print(f"avqa: using the checkpoint's vocabulary ({len(s.vocab)} words) and "
                      f"answers ({len(s.answers)}); avqa-train.json has "
                      + "; ".join(diffs) + " -- unknown words read as <unk>", flush=True)
        elif self.restoring is not None:
            log.warning("avqa: the checkpoint stores no vocabulary (written by an older "
                        "version): rebuilding it from avqa-train.json in first-seen order, "
                        "which must be the file and row order it was trained on")
        if rank == 0:
            for split, items in s.splits.items():
                line = (f"avqa {split}: {len(items)} questions, {s.bad_rows[split]} bad rows "
                        f"skipped, {s.missing_videos[split]} with a missing video")
                if split != "train" or have:
                    n = s.unseen_answers[split]
                    line += f", {n} with an answer never seen in training"
                    if n:
                        line += (f" (scored wrong: {_few(s.unseen_answer_names[split])}; "
                                 f"accuracy at most {100 * (1 - n / len(items)):.1f}%)")
                print(line, flush=True)
        return s.answers, self._clips(s)

    def _data_source(self, root):
        """``(folder of the question files, has_video(path))``: the data root, or a
        prepared folder (its ``json/`` copies; a video is there when it was prepared)."""
        cfg = self.cfg
        if prepared_root(cfg):
            _, vids = self.load_prepared("avqa", clip_seconds=float(cfg.segments),
                                         avqa_hop=cfg.avqa_hop)
            self._refs = vids["videos"][0]
            have = {m["id"] for _, m in self._refs}
            return (self.prepared["root"],
                    lambda p: os.path.splitext(os.path.basename(p))[0] in have)
        if root is None:
            raise ValueError(f"data_root: required for task {self.name!r}")
        return root, os.path.isfile

    def _clips(self, s) -> dict:
        """The questions of each split; from prepared data, pointed at their clips."""
        if self.prepared is None:
            return s.splits
        return prepared_avqa_items(s, self._refs)

    def prompt_file_inputs(self):
        return {"avqa_hop": self.cfg.avqa_hop, "question_len": self.cfg.question_len}

    def split_info(self, split):
        n = getattr(self, "unseen_answers", {}).get(split)
        return {} if n is None else {"unseen_answers": n}

    def dataset(self, split, train, image_size):
        cfg = self.cfg
        aug = build_visual_augment(cfg.visual_aug, image_size) if train else None
        items = self.splits[split]
        if self.prepared is not None:
            check_prepared_image_size(self.prepared, image_size)
            return PreparedAVQADataset(items, hop=cfg.avqa_hop,
                                       image_size=image_size, segments=cfg.segments,
                                       sample_rate=cfg.sample_rate, augment=aug)
        if not train:       # questions of one video together: its clip is decoded once
            items = sorted(items, key=lambda it: it[2])
        return AVQADataset(items, hop=cfg.avqa_hop, image_size=image_size,
                           segments=cfg.segments, sample_rate=cfg.sample_rate, augment=aug,
                           cache=cfg.cache)

    def collate(self, samples):
        return collate_avqa(samples)

    def is_empty(self, batch):
        return batch["audio"] is None

    def build_model(self, num_classes):
        # lazily: models load open_clip (slow), which data preparation does not need
        from avstfp_fast.models.avqa import AVQAHeadConfig, PromptedCLIPAVQA
        cfg = self.cfg
        head = AVQAHeadConfig(vocab_size=len(self.vocab), num_answers=num_classes,
                              hidden=cfg.model.head_hidden, word_dim=cfg.model.head_hidden,
                              segments=cfg.segments, match_weight=cfg.match_weight)
        # the model carries its vocabulary and answers: its prompt file (written beside
        # best.pt) then rebuilds, encodes questions and decodes answers on its own
        return build_model(cfg, None, None, model_cls=PromptedCLIPAVQA,
                           model_kw={"head": head, "vocabulary": list(self.vocab.words),
                                     "answers": list(self.answers)})

    def train_loss(self, model, batch, ctx):
        from avstfp_fast.models.avqa import avqa_loss
        a, v, q = _inputs(model, batch, ctx.device)
        y = batch["label"].to(ctx.device, non_blocking=True)
        neg = sample_negatives(batch["id"], self.cfg.segments, ctx.rng)
        if neg is not None:
            neg = neg.to(ctx.device)
        with ctx.autocast():
            out = model(a, v, q, neg)
        loss = avqa_loss(out, y, self.cfg.match_weight)
        with torch.no_grad():
            correct = float((out.logits.detach().float().argmax(-1) == y).sum())
        return StepOutput(loss=loss, clips=y.shape[0], correct=correct, items=y.numel(),
                          log={"negatives": neg is not None})

    def new_metrics(self):
        return AVQAMetrics()

    def figures(self, summary, run_dir, split):
        png = os.path.join(run_dir, f"avqa_{split}.png")
        plot_avqa_bars(summary, png, f"{self.name} {split}: answer accuracy "
                                     f"{summary['acc']:.3f} ({summary['n']} questions)")
        return {"bars_png": png}

    def summary_rows(self, result, split):
        rows = []
        if f"{split}_unseen_answers" in result:
            rows.append((f"{split} unseen answers",
                         f"{result[f'{split}_unseen_answers']} questions (scored wrong)"))
        for key, label, _ in REPORT_ROWS:
            acc, n = result.get(f"{split}_{key}"), result.get(f"{split}_n_{key}", 0)
            if key == "other" and not n:
                continue
            cell = f"{100 * acc:.2f}% ({n})" if n else "n/a"
            rows.append((f"{split} {label}", cell))
        return rows


class SyntheticAVQATask(GeneratedData, AVQATask):
    """Synthetic AVQA data (:mod:`.avqa_synthetic`) generated once, by rank 0, under the
    data root or the run folder; ``synthetic_train/val/test`` count videos and
    ``synthetic_events`` the instrument kinds."""
    name = "synthetic_avqa"
    defaults = dict(backbone="tiny", epochs=15, warmup_epochs=1.0, lr_prompts=3e-4,
                    lr_head=3e-3, weight_decay=1e-4, batch_size=16, visual_aug="none",
                    mixup_prob=0.0, num_workers=0, cache=True, threads=1, avqa_hop=1,
                    synthetic_events=2, synthetic_train=80, synthetic_val=24,
                    synthetic_test=24, head_hidden=64)

    data_folder, marker = "synthetic_avqa", "avqa-train.json"

    def generate(self, root):
        cfg = self.cfg
        make_synthetic_avqa(root, n_train=cfg.synthetic_train, n_val=cfg.synthetic_val,
                            n_test=cfg.synthetic_test, n_kinds=cfg.synthetic_events,
                            segments=cfg.segments, hop=cfg.avqa_hop, seed=cfg.seed)
