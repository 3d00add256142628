"""Audio mix-up (the paper follows LAVISH: mix-up on the audio signal only).

Documented choice: with probability ``prob`` per batch, draw ``lam ~ Beta(alpha, alpha)``,
take ``lam = max(lam, 1 - lam)`` so the clip's own audio dominates (its frames are not
mixed), pair every clip with another clip of the batch (a random permutation), and
replace the audio fbank by ``lam * a + (1 - lam) * a[perm]``.  Targets become the same
convex combination of the one-hot targets (per segment for AVE, per clip for AVAR).

Randomness comes only from the ``rng`` passed in (the trainer seeds one per step),
so a resumed run draws exactly the same mix-ups as an uninterrupted one.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["audio_mixup", "one_hot"]


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels: expected an integer tensor, got dtype {labels.dtype}")
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()


def audio_mixup(audio: torch.Tensor, targets: torch.Tensor, *, alpha: float, prob: float,
                rng: np.random.Generator):
    """Mix the audio of a batch.

    audio: (B, ...) fbank features; targets: (B, ...) soft/one-hot targets (float).
    Returns ``(audio, targets, lam)``; ``lam == 1.0`` means the batch was left unchanged.
    """
    if audio.shape[0] != targets.shape[0]:
        raise ValueError(f"audio and targets: batch sizes differ, audio {tuple(audio.shape)} "
                         f"vs targets {tuple(targets.shape)}")
    if not targets.is_floating_point():
        raise TypeError(f"targets: expected float (one-hot or soft) targets, got {targets.dtype}")
    b = audio.shape[0]
    # Draw everything up front so the number of draws does not depend on the outcome.
    u = float(rng.random())
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    perm = torch.from_numpy(rng.permutation(b))
    if alpha <= 0 or prob <= 0 or b < 2 or u >= prob:
        return audio, targets, 1.0
    lam = max(lam, 1.0 - lam)
    perm = perm.to(audio.device)
    mixed_audio = audio.mul(lam).add_(audio[perm], alpha=1.0 - lam)
    mixed_targets = targets.mul(lam).add_(targets[perm.to(targets.device)], alpha=1.0 - lam)
    return mixed_audio, mixed_targets, lam
