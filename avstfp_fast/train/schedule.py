"""Per-step learning-rate schedule: linear warm-up, then cosine decay to a floor.

The paper's recipe (see the trainer README): warm up linearly to the peak (3e-4) over
the first 2 epochs, then decay with a cosine to 2e-6.  The schedule is evaluated per optimiser
step, not per epoch.

Convention (documented choice): for ``step`` counted from 0,

* warm-up, ``step < W``: ``lr = peak * (step + 1) / W``  (the first step already moves;
  ``step = W - 1`` reaches the peak);
* decay, ``W <= step < total``: ``lr = floor + (peak - floor) * (1 + cos(pi * p)) / 2``
  with ``p = (step - W) / (total - W - 1)``, so ``step = W`` is the peak and the last
  step ``total - 1`` is exactly the floor;
* ``step >= total`` stays at the floor.

Each parameter group has its own peak (prompts and heads use separate learning rates);
the floor is shared.
"""
from __future__ import annotations

import math

import torch

__all__ = ["warmup_cosine_lr", "WarmupCosine", "build_scheduler"]


def warmup_cosine_lr(step: int, *, peak: float, floor: float, warmup_steps: int,
                     total_steps: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if floor > peak:
        raise ValueError(f"floor ({floor}) must not exceed peak ({peak})")
    warmup_steps = min(warmup_steps, total_steps)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if step >= total_steps:
        return floor
    span = total_steps - warmup_steps - 1
    if span <= 0:
        return peak if step == warmup_steps and span == 0 else floor
    p = (step - warmup_steps) / span
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


class WarmupCosine:
    """Picklable multiplier for ``torch.optim.lr_scheduler.LambdaLR`` (one per group)."""

    def __init__(self, peak: float, floor: float, warmup_steps: int, total_steps: int):
        self.peak = float(peak)
        self.floor = float(min(floor, peak))
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        if self.peak == 0.0:
            return 0.0
        return warmup_cosine_lr(step, peak=self.peak, floor=self.floor,
                                warmup_steps=self.warmup_steps,
                                total_steps=self.total_steps) / self.peak


def build_scheduler(optimizer: torch.optim.Optimizer, *, floor: float, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose group ``g`` follows ``warmup_cosine_lr`` with peak = the group's lr.

    Calling ``scheduler.step()`` once per optimiser step makes ``group['lr']`` equal to
    ``warmup_cosine_lr(n, ...)`` after ``n`` steps.
    """
    lambdas = []
    for g in optimizer.param_groups:
        peak = g.get("initial_lr", g["lr"])
        lambdas.append(WarmupCosine(peak, floor, warmup_steps, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
