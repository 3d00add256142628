"""Training configuration: the paper's recipe as defaults, per-task overrides.

``TrainConfig.model`` is the model's own :class:`~avstfp_fast.models.config.AVSTFPConfig`
(prompt counts, stages, modalities, gates, full fine-tuning); its ``task`` and
``num_classes`` are left unset here and filled in by the training task from the data.
Flat dictionaries (the command line, and run folders written before the model config was
nested) are accepted by :meth:`TrainConfig.from_dict`, which routes each model field name
into ``model``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..models.config import AVSTFPConfig
from ..models.prompted_clip import check_model_backend
from .preflight import (COMPILE_MODES, CUDA_GRAPH_MODES, check_compile_mode,  # noqa: F401
                        default_num_workers)
from .registry import task_defaults, task_names  # noqa: F401  (TrainConfig's names)


def default_model_config(**kw) -> AVSTFPConfig:
    """The trainer's model defaults: the model's own, with the head left to the task
    (fields the model config no longer has, from older checkpoints, are dropped)."""
    return AVSTFPConfig.from_dict({"task": None, **kw})


# Model fields settable from the trainer (the head's task/num_classes come from the data).
MODEL_OPTIONS = tuple(f.name for f in dataclasses.fields(AVSTFPConfig)
                      if f.name not in ("task", "num_classes"))


@dataclass
class TrainConfig:
    # what to train
    task: str = "ave"
    backbone: str = "ViT-B-16"            # open_clip model name, or "tiny"
    pretrained: Optional[str] = None      # tower weights: a local file or an open_clip tag
    backend: str = "auto"
    data_root: Optional[str] = None
    prepared: Optional[str] = None        # folder of avstfp-prepare shards (also detected
                                          # when data_root holds its manifest.json)
    out: Optional[str] = None             # run folder (default runs/<task>-<time>)
    model: AVSTFPConfig = field(default_factory=default_model_config)
    # recipe (the paper's; see the trainer README)
    epochs: int = 30
    warmup_epochs: float = 2.0
    lr_prompts: float = 3e-4
    lr_head: float = 1e-3                 # documented choice: the paper gives no number
    min_lr: float = 2e-6
    weight_decay: float = 0.2
    optimizer: str = "adam"               # "adam" (paper) or "adamw"
    batch_size: int = 8                   # per process
    clip_grad: float = 1.0                # max grad norm; 0 disables
    mixup_alpha: float = 0.5
    mixup_prob: float = 0.5
    visual_aug: str = "strong"            # none | light | strong
    amp: bool = True                      # bf16 autocast on GPU
    seed: int = 0
    compile: bool = False
    compile_mode: Optional[str] = None    # torch.compile mode; implies compile (GPU modes:
                                          # reduce-overhead = CUDA graphs)
    # data
    segments: int = 10
    clip_seconds: float = 10.0
    sample_rate: int = 16000
    num_workers: int = field(default_factory=lambda: default_num_workers())  # 4, at most
                                          # the CPU cores this process may use
    cache: bool = False                   # keep decoded clips in memory (small data sets)
    # run control
    resume: Optional[str] = None
    eval_only: bool = False
    max_steps: Optional[int] = None       # stop after this many optimiser steps (schedule
                                          # still spans all epochs)
    ckpt_every: int = 0                   # also checkpoint every N steps (0: per epoch only)
    eval_every: int = 1                   # validate every N epochs (0: never during training)
    final_eval: bool = True               # evaluate best checkpoint on val and test at the end
    progress: bool = True
    device: Optional[str] = None          # default: cuda if available else cpu
    threads: Optional[int] = None         # torch CPU threads for this run (None: leave as is;
                                          # 1 is much faster on an oversubscribed CPU)
    find_unused_parameters: bool = False
    # synthetic task
    synthetic_events: int = 4
    synthetic_train: int = 48
    synthetic_val: int = 16
    synthetic_test: int = 16
    synthetic_header: bool = True
    # audio-visual question answering (tasks avqa, synthetic_avqa)
    avqa_hop: int = 6                     # seconds between the 1-s segments (MUSIC-AVQA: 6)
    question_len: int = 14                # words per question, padded (longer: an error)
    match_weight: float = 0.5             # weight of the audio-visual matching loss

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = default_model_config(**self.model)
        if not isinstance(self.model, AVSTFPConfig):
            raise TypeError(f"model: expected an AVSTFPConfig, got {type(self.model).__name__}")
        tasks = task_names()
        if self.task not in tasks:
            raise ValueError(f"task: expected one of {tasks}, got {self.task!r}")
        check_model_backend(self.backend)
        if self.compile_mode is not None:
            check_compile_mode(self.compile_mode, "cuda")      # the device is checked at run
            self.compile = True
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer: expected 'adam' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs: expected >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        """JSON-ready; the model config nested under ``model`` (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["model"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, strict: bool = False) -> "TrainConfig":
        """Build from a nested (``to_dict``) or flat dict; unknown keys are ignored, or
        with ``strict`` refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - set(MODEL_OPTIONS))
        if strict and unknown:
            raise TypeError(f"TrainConfig: unknown fields {unknown}")
        model = dict(d.get("model") or {})
        model.update({k: d[k] for k in MODEL_OPTIONS if k in d and k not in names})
        kw = {k: v for k, v in d.items() if k in names and k != "model"}
        return cls(model=default_model_config(**model), **kw)

    def flat(self) -> dict:
        """One level: the trainer's fields and the model options side by side."""
        d = self.to_dict()
        model = d.pop("model")
        d.update({k: model[k] for k in MODEL_OPTIONS})
        return d
