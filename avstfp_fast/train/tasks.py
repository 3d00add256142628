"""Training tasks: what the trainer needs to know about a data set, a model head, a
batch, a loss and a metric -- and nothing about loops, DDP or checkpoints.

The trainer's step, end-of-epoch and evaluation functions only call the :class:`Task`
interface below, so a new task (say audio-visual question answering) is one subclass
listed in :mod:`.registry` (``TASKS``), with no edit to ``loop.py``:

* ``prepare_data(run_dir, rank)`` -> :class:`TaskData` (classes, splits and the data
  root it resolved); the task keeps them (``classes``, ``splits``, ``data_root``) and
  never writes to the config: data flows from the task to the trainer, not back.  A task
  for a trained model (``make_task(cfg, classes)``, as avstfp-predict evaluates) is given
  its classes when it is made, and nothing writes them into it afterwards;
  Subclasses implement ``read_data(root, rank)`` -> ``(classes, splits)``; ``splits``
  maps "train", "val", "test" to whatever ``dataset`` accepts; the synthetic tasks take
  ``resolve_data_root`` from :class:`GeneratedData` (generate the files when needed);
* ``dataset(split, train, image_size)`` and ``collate(samples)``: a batch is a dict with
  at least ``bad`` (paths of skipped files); ``is_empty(batch)`` says it has nothing usable;
* ``build_model(num_classes)``: the model with this task's head;
* ``train_loss(model, batch, ctx)`` -> :class:`StepOutput` (the loss to back-propagate and
  what to count: clips, correct items, items, extra per-step log fields);
* ``new_metrics()`` -> an evaluation accumulator (:class:`Metrics`): ``update(model, batch,
  ctx)``, ``all_reduce()``, ``summary()`` (scalars; ``"acc"`` selects ``best.pt``,
  ``"n"`` is the number of items; tensors such as a confusion matrix go only to the
  ``final_eval`` record);
* ``figures(summary, run_dir, split)``: PNG files of a final evaluation;
* ``summary_rows(result, split)``: the lines of the printed summary table for a split.

The AVE (per-second event classes), synthetic (AVE layout, generated) and AVAR
(Kinetics-Sounds, one class per clip) tasks share :class:`ClassificationTask`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shards import check_settings, is_prepared
from . import ddp
from .augment import build_visual_augment
from .data import (ClipDataset, PreparedClipDataset, ave_splits, collate_skip_bad, ks_splits,
                   prepared_splits)
from .metrics import accuracy_from_confusion, confusion_update, plot_confusion
from .mixup import audio_mixup, one_hot
from .synthetic import make_synthetic_ave

log = logging.getLogger("avstfp_fast.train")

__all__ = ["Task", "Metrics", "StepContext", "StepOutput", "ClassificationTask", "AVETask",
           "SyntheticAVETask", "AVARTask", "GeneratedData", "build_model"]


@dataclass
class StepContext:
    """What a task's forward pass may use: where to put the batch, the autocast context,
    and (training only) the step's own random generator (seeded per (seed, step, rank))."""
    device: torch.device
    autocast: Callable[[], Any] = nullcontext
    rng: Optional[np.random.Generator] = None


@dataclass
class StepOutput:
    loss: torch.Tensor            # scalar, to back-propagate
    clips: int                    # clips in this process's batch
    correct: float = 0.0          # correctly predicted items (for train accuracy)
    items: float = 0.0
    log: dict = field(default_factory=dict)   # extra fields of the metrics.jsonl step record


class Metrics:
    """Evaluation accumulator of one split (see the module docstring)."""

    def update(self, model, batch: dict, ctx: StepContext) -> None:
        raise NotImplementedError

    def all_reduce(self) -> None:
        raise NotImplementedError

    def summary(self) -> dict:
        raise NotImplementedError


def build_model(cfg, head: Optional[str], num_classes: Optional[int], model_cls=None,
                model_kw: Optional[dict] = None):
    """PromptedCLIP (or ``model_cls`` with the extra keywords ``model_kw``) for a
    TrainConfig: its model config with ``head``'s classes."""
    from avstfp_fast import PromptedCLIP      # lazily: models load open_clip (slow)
    model_cls = model_cls or PromptedCLIP
    kw = model_kw or {}
    config = dataclasses.replace(cfg.model, task=head, num_classes=num_classes)
    if cfg.backbone == "tiny":
        if cfg.pretrained:
            raise ValueError("pretrained: the 'tiny' backbone is random; drop --pretrained")
        return model_cls.tiny(backend=cfg.backend, config=config, **kw)
    if cfg.pretrained is None:
        log.warning("no --pretrained checkpoint: the %s tower is randomly initialised",
                    cfg.backbone)
    return model_cls(cfg.backbone, pretrained=cfg.pretrained, backend=cfg.backend,
                     config=config, **kw)


@dataclass(frozen=True)
class TaskData:
    """What :meth:`Task.prepare_data` resolved: the class (answer) names, the splits, and
    the data root it read (``data_root`` as given, or where a synthetic task generated its
    files; the trainer records it in config.json and checkpoints)."""
    classes: list
    splits: dict
    data_root: Optional[str]


class Task:
    """One training task (see the module docstring).  An instance serves one run."""
    name: str = ""
    head: Optional[str] = None      # AVSTFPConfig.task of the model head
    defaults: dict = {}             # TrainConfig values this task changes (options win)
    item_name: str = "items"        # what accuracy counts, for figure titles

    def __init__(self, cfg, classes: Optional[list] = None):
        self.cfg = cfg
        # a trained model's classes; else what prepare_data reads
        self.classes: list = list(classes or [])
        self.splits: dict = {}
        self.data_root: Optional[str] = None
        self.prepared: Optional[dict] = None     # manifest, when reading prepared shards

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prepare_data(self, run_dir: str, rank: int) -> TaskData:
        """Resolve the data root, read classes and splits, keep them; return them."""
        root = self.resolve_data_root(run_dir, rank)
        classes, splits = self.read_data(root, rank)
        self.classes, self.splits, self.data_root = classes, splits, root
        return TaskData(classes, splits, root)

    def resolve_data_root(self, run_dir: str, rank: int) -> Optional[str]:
        """The folder the data is read from: the configured ``data_root``."""
        return self.cfg.data_root

    def read_data(self, root: Optional[str], rank: int) -> tuple[list, dict]:
        """``(classes, splits)`` read from ``root`` (or the prepared folder)."""
        raise NotImplementedError

    def load_prepared(self, layout: str, **settings) -> tuple[list, dict]:
        """Read the run's prepared folder (its manifest checked against the run's
        settings); keeps the manifest (``prepared``), returns ``(classes, splits)``."""
        cfg = self.cfg
        root = prepared_root(cfg)
        settings = {"clip_seconds": float(cfg.clip_seconds), **settings}
        man, classes, splits = prepared_splits(root, layout, segments=cfg.segments,
                                               sample_rate=cfg.sample_rate, **settings)
        self.prepared = {**man, "root": root}
        return classes, splits

    def dataset(self, split: str, train: bool, image_size: int):
        raise NotImplementedError

    def collate(self, samples: list) -> dict:
        raise NotImplementedError

    def is_empty(self, batch: dict) -> bool:
        raise NotImplementedError

    def build_model(self, num_classes: int):
        return build_model(self.cfg, self.head, num_classes)

    def train_loss(self, model, batch: dict, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    def new_metrics(self) -> Metrics:
        raise NotImplementedError

    def summary_rows(self, result: dict, split: str) -> list[tuple[str, str]]:
        return [(f"{split} acc", f"{result[f'{split}_acc']:.4f}")]

    def checkpoint_state(self) -> dict:
        """What this task stores in checkpoints (``task_state``) so that evaluating or
        resuming rebuilds the same model whatever the data files' order (AVQA: the
        question vocabulary and the answers).  JSON-able."""
        return {}

    def restore(self, state: Optional[dict], resuming: bool) -> None:
        """Called before :meth:`prepare_data` when a checkpoint is evaluated
        (``resuming`` False) or resumed, with its ``task_state`` (None: a checkpoint
        written before it existed)."""

    def prompt_file_inputs(self) -> dict:
        """Extra input settings recorded in the prompt file's ``inputs`` (AVQA: the
        sampling hop and the question length), so that prediction samples the same way."""
        return {}

    def split_info(self, split: str) -> dict:
        """Counts about a split known at load time, added to its final evaluation
        (``<split>_<key>`` in the result and summary.json), e.g. AVQA's unseen answers."""
        return {}

    def figures(self, summary: dict, run_dir: str, split: str) -> dict:
        """PNG files of a final evaluation (``summary``: its metrics); name -> path."""
        return {}


# --------------------------------------------------------------------------------------
# AVE / synthetic / Kinetics-Sounds: classification of clips (AVAR) or of their segments
# --------------------------------------------------------------------------------------
class ClassificationMetrics(Metrics):
    """Confusion matrix and top-5 hits."""

    def __init__(self, num_classes: int):
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.top5_hits = torch.zeros(1, dtype=torch.float64)

    def update(self, model, batch, ctx):
        a = batch["audio"].to(ctx.device, non_blocking=True)
        v = batch["video"].to(ctx.device, non_blocking=True)
        y = batch["label"].to(ctx.device)
        with ctx.autocast():
            logits = model(a, v)
        logits = logits.float()
        confusion_update(self.cm, logits.argmax(-1), y)
        topk = logits.topk(min(5, self.cm.shape[0]), dim=-1).indices
        self.top5_hits += float((topk == y.unsqueeze(-1)).any(-1).sum())

    def all_reduce(self):
        ddp.all_reduce(self.cm)
        ddp.all_reduce(self.top5_hits)

    def summary(self):
        n = int(self.cm.sum())
        return {"acc": accuracy_from_confusion(self.cm),
                "top5": float(self.top5_hits) / n if n else float("nan"),
                "n": n, "confusion": self.cm}


class ClassificationTask(Task):
    """Audio + frames in, class logits out (per segment for AVE, per clip for AVAR);
    soft-target cross-entropy with the audio mix-up of the recipe."""
    report_top5 = False

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        c = logits.shape[-1]
        return F.cross_entropy(logits.reshape(-1, c).float(), targets.reshape(-1, c))

    def dataset(self, split, train, image_size):
        cfg = self.cfg
        aug = build_visual_augment(cfg.visual_aug, image_size) if train else None
        if self.prepared is not None:
            check_prepared_image_size(self.prepared, image_size)
            refs, sizes = self.splits[split]
            return PreparedClipDataset(refs, sizes, image_size=image_size,
                                       segments=cfg.segments, clip_seconds=cfg.clip_seconds,
                                       sample_rate=cfg.sample_rate, augment=aug)
        return ClipDataset(self.splits[split], image_size=image_size, segments=cfg.segments,
                           clip_seconds=cfg.clip_seconds, sample_rate=cfg.sample_rate,
                           augment=aug, cache=cfg.cache)

    def collate(self, samples):
        return collate_skip_bad(samples)

    def is_empty(self, batch):
        return batch["audio"] is None

    def train_loss(self, model, batch, ctx):
        cfg = self.cfg
        a = batch["audio"].to(ctx.device, non_blocking=True)
        v = batch["video"].to(ctx.device, non_blocking=True)
        y = batch["label"].to(ctx.device, non_blocking=True)
        targets = one_hot(y, self.num_classes)
        a, targets, lam = audio_mixup(a, targets, alpha=cfg.mixup_alpha, prob=cfg.mixup_prob,
                                      rng=ctx.rng)
        with ctx.autocast():
            logits = model(a, v)
        loss = self.loss(logits, targets)
        with torch.no_grad():
            correct = float((logits.detach().float().argmax(-1) == y).sum())
        return StepOutput(loss=loss, clips=a.shape[0], correct=correct, items=y.numel(),
                          log={"mixup_lam": lam})

    def new_metrics(self):
        return ClassificationMetrics(self.num_classes)

    def figures(self, summary, run_dir, split):
        png = os.path.join(run_dir, f"confusion_{split}.png")
        plot_confusion(summary["confusion"], self.classes, png,
                       f"{self.name} {split}: accuracy {summary['acc']:.3f} "
                       f"({summary['n']} {self.item_name})")
        return {"confusion_png": png}

    def summary_rows(self, result, split):
        rows = [(f"{split} acc (top-1)", f"{result[f'{split}_acc']:.4f}")]
        if self.report_top5:
            rows.append((f"{split} top-5", f"{result[f'{split}_top5']:.4f}"))
        return rows


def prepared_root(cfg) -> Optional[str]:
    """The prepared folder of a run: ``--prepared``, or a ``--data-root`` holding a
    prepared manifest (avstfp-prepare); None for the official layout (decoded)."""
    if cfg.prepared:
        return cfg.prepared
    return cfg.data_root if is_prepared(cfg.data_root) else None


def check_prepared_image_size(man: dict, image_size: int) -> None:
    """The model's input size must be the one the frames were prepared for."""
    check_settings(man, man["root"], image_size=int(image_size),
                   short_side=math.ceil(1.25 * image_size))


class AVETask(ClassificationTask):
    """AVE: 28 events + background, one label per 1-s segment; segment accuracy."""
    name, head, item_name = "ave", "ave", "segments"

    def read_data(self, root, rank):
        if prepared_root(self.cfg):
            return self.load_prepared("ave")
        if root is None:
            raise ValueError(f"data_root: required for task {self.name!r}")
        return ave_splits(root, segments=self.cfg.segments,
                          clip_seconds=self.cfg.clip_seconds)


class GeneratedData:
    """Mixin of the synthetic tasks: their data root is ``data_root``, or
    ``<run folder>/<data_folder>``; rank 0 generates the files there (:meth:`generate`)
    when ``marker`` is missing -- never into a prepared folder."""
    data_folder: str = ""
    marker: str = ""

    def generate(self, root: str) -> None:
        raise NotImplementedError

    def resolve_data_root(self, run_dir, rank):
        cfg = self.cfg
        if prepared_root(cfg):
            return cfg.data_root
        root = cfg.data_root or os.path.join(run_dir, self.data_folder)
        if rank == 0 and not os.path.isfile(os.path.join(root, self.marker)):
            self.generate(root)
        ddp.barrier()
        return root


class SyntheticAVETask(GeneratedData, AVETask):
    """AVE-layout .mp4 files generated (once, by rank 0) under the data root or the run
    folder: the tiny-model smoke task."""
    name = "synthetic"
    data_folder, marker = "synthetic_data", "Annotations.txt"
    # Tuned so the tiny CPU model reaches >= 90 % segment accuracy in well under 5
    # minutes; one torch thread: the model is tiny, and on a shared 2-core CPU two threads
    # are several times slower.  Any field given explicitly wins.
    defaults = dict(backbone="tiny", epochs=12, warmup_epochs=1.0, lr_prompts=3e-3,
                    lr_head=3e-3, weight_decay=1e-4, batch_size=8, visual_aug="light",
                    mixup_prob=0.0, num_workers=0, cache=True, threads=1)

    def generate(self, root):
        cfg = self.cfg
        make_synthetic_ave(root, n_events=cfg.synthetic_events, n_train=cfg.synthetic_train,
                           n_val=cfg.synthetic_val, n_test=cfg.synthetic_test,
                           segments=cfg.segments, seed=cfg.seed, header=cfg.synthetic_header)


class AVARTask(ClassificationTask):
    """Kinetics-Sounds: one class per clip; top-1 and top-5."""
    name, head, item_name = "avar", "avar", "clips"
    report_top5 = True

    def read_data(self, root, rank):
        if prepared_root(self.cfg):
            return self.load_prepared("ks")
        if root is None:
            raise ValueError(f"data_root: required for task {self.name!r}")
        return ks_splits(root)
