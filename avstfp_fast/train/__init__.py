"""Reference trainer for AV-STFP: ``python -m avstfp_fast.train`` / ``avstfp-train``.

Modules: ``config`` (the recipe; holds the model's ``AVSTFPConfig``), ``tasks`` (the
``Task`` interface: data, head, loss and metrics of AVE, Kinetics-Sounds and the synthetic
task), ``avqa_task`` (MUSIC-AVQA), ``registry`` (the tasks by name, for ``--task``),
``data`` (AVE / Kinetics-Sounds readers, PyAV decoding, loaders), ``synthetic``
(AVE-layout .mp4 generator), ``schedule``, ``mixup``, ``augment``, ``checkpoint``,
``metrics``, ``state`` (run status, epoch statistics), ``ddp`` (process groups),
``loop`` (the step / end-of-epoch / evaluation functions), ``cli``.
"""
from __future__ import annotations

import os
import tempfile

from .config import TrainConfig, task_defaults

__all__ = ["TrainConfig", "train", "run_synthetic"]


def train(cfg: TrainConfig) -> dict:
    from .loop import train as _train
    return _train(cfg)


def run_synthetic(backend: str = "torch", steps: int | None = None, *, epochs: int | None = None,
                  out: str | None = None, data_root: str | None = None, seed: int = 0,
                  progress: bool = False, task: str = "synthetic", **overrides) -> dict:
    """Train the tiny model on a synthetic task and return its metrics.

    ``task``: "synthetic" (AVE layout) or "synthetic_avqa" (MUSIC-AVQA layout).
    ``steps`` caps the optimiser steps (the schedule still spans ``epochs``); by default
    the run uses the task's defaults (``tasks.SyntheticAVETask.defaults`` for "synthetic").
    Files are generated (deterministically from ``seed``) under ``data_root`` or inside
    the run folder; the run folder defaults to a new temporary folder.  Returned keys include ``val_acc``, ``test_acc``,
    ``best_val_acc``, ``steps``, ``wall_s``, ``run_dir``, ``losses``.
    """
    kw = task_defaults(task)
    kw.update(task=task, backend=backend, seed=seed, progress=progress,
              out=out or tempfile.mkdtemp(prefix=f"avstfp-{task}-"), data_root=data_root)
    if epochs is not None:
        kw["epochs"] = epochs
    if steps is not None:
        kw["max_steps"] = steps
    kw.update(overrides)
    os.makedirs(kw["out"], exist_ok=True)
    return train(TrainConfig.from_dict(kw, strict=True))
