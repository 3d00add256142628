"""What the training loop carries between steps and epochs: its status, the running
statistics of the current epoch, and the state of the run."""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import ddp

__all__ = ["Status", "EpochStats", "RunState"]


class Status(enum.StrEnum):
    """How a run ended (written as the plain string to summary.json and the result)."""
    FINISHED = "finished"          # all epochs (or max_steps) done
    INTERRUPTED = "interrupted"    # SIGTERM: last.pt saved, resumable
    NONFINITE = "nonfinite"        # a non-finite loss: stopped before applying that update
    EVALUATED = "evaluated"        # --eval-only


@dataclass
class EpochStats:
    """Running sums over the steps of one epoch (this process; :meth:`all_reduce` sums
    them over the processes)."""
    loss_sum: float = 0.0      # sum of (step loss x clips in the step)
    correct: float = 0.0       # correctly classified items (segments, clips, questions)
    items: float = 0.0         # items classified
    bad_files: float = 0.0     # unreadable files the loader skipped
    clips: float = 0.0         # clips trained on

    def add_step(self, loss: float, clips: int, correct: float, items: float) -> None:
        self.loss_sum += loss * clips
        self.clips += clips
        self.correct += correct
        self.items += items

    def all_reduce(self) -> "EpochStats":
        names = [f.name for f in dataclasses.fields(self)]
        t = ddp.all_reduce(torch.tensor([getattr(self, n) for n in names],
                                        dtype=torch.float64))
        return EpochStats(**{n: float(v) for n, v in zip(names, t.tolist())})

    @property
    def train_loss(self) -> float:
        return self.loss_sum / self.clips if self.clips else float("nan")

    @property
    def train_acc(self) -> float:
        return self.correct / self.items if self.items else float("nan")


@dataclass
class RunState:
    """Progress of a training run; ``step`` counts optimiser steps (skipped empty batches
    included), ``epoch`` is the epoch the next step belongs to."""
    step: int = 0
    epoch: int = 0
    best: float = -math.inf             # best validation accuracy so far
    status: Status = Status.FINISHED
    message: str = ""
    last_good_ckpt: Optional[str] = None
    last_saved: int = -1                # step of the last last.pt written
    skipped_files: int = 0              # unreadable training files over the run
    losses: list = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.status is Status.FINISHED

    def stop(self, status: Status, message: str) -> None:
        self.status, self.message = status, message
