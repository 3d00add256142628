"""Visual augmentation (torchvision.transforms.v2) applied to a clip's uint8 frames.

The same random parameters are applied to every frame of a clip (v2 transforms draw one
set of parameters per call on a (T, 3, H, W) tensor), so the segments of a clip stay
consistent.  Output: (T, 3, size, size) uint8, then the front end normalises.

Levels (documented choice; the paper asks for "stronger visual augmentation" for AVE and
AVAR without details):
* ``strong``: RandomResizedCrop(scale 0.35-1), horizontal flip, colour jitter
  (brightness/contrast/saturation 0.4, hue 0.1), random grayscale p=0.1;
* ``light``: RandomResizedCrop(scale 0.7-1, near-square), horizontal flip;
* ``none``: no augmentation (the front end resizes and centre-crops).
"""
from __future__ import annotations

LEVELS = ("none", "light", "strong")


def build_visual_augment(level: str, size: int):
    if level not in LEVELS:
        raise ValueError(f"visual_aug: expected one of {LEVELS}, got {level!r}")
    if level == "none":
        return None
    from torchvision.transforms import v2
    if level == "light":
        ops = [v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True),
               v2.RandomHorizontalFlip()]
    else:
        ops = [v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
               v2.RandomHorizontalFlip(),
               v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
               v2.RandomGrayscale(p=0.1)]
    return v2.Compose(ops)
