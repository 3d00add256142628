"""Visual augmentation (torchvision.transforms.v2) applied to a clip's uint8 frames.

The same random parameters are applied to every frame of a clip (v2 transforms draw one
set of parameters per call on a (T, 3, H, W) tensor), so the segments of a clip stay
consistent.  Output: (T, 3, size, size), uint8 (``light``) or float32 in [0, 1]
(``strong``: the colour operations run on floats, with no rounding between them), then
the front end normalises.

Levels (documented choice; the paper asks for "stronger visual augmentation" for AVE and
AVAR without details):
* ``strong``: RandomResizedCrop(scale 0.35-1), horizontal flip, colour jitter
  (brightness/contrast/saturation 0.4, then hue 0.1), random grayscale p=0.1;
* ``light``: RandomResizedCrop(scale 0.7-1, near-square), horizontal flip;
* ``none``: no augmentation (the front end resizes and centre-crops).
"""
from __future__ import annotations

import math

LEVELS = ("none", "light", "strong")


class HueRotate:
    """Hue jitter as a rotation of the chroma plane in YIQ space by an angle drawn
    uniformly from +-``hue`` turns (as NVIDIA DALI's hue): one 3x3 colour matrix per
    clip (the same for all its frames), about 10x cheaper than torchvision's
    RGB->HSV->RGB round trip, which took 20 of the 30 ms of CPU a strong augmentation
    of a 10-frame clip cost (bench/test_data_loading.py).  A callable for v2.Compose;
    (..., 3, H, W) float in [0, 1] (clamped) or uint8 (rounded, clamped)."""
    _YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))

    def __init__(self, hue: float):
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue: expected 0 <= hue <= 0.5, got {hue}")
        self.hue = hue

    def __call__(self, x):
        import torch
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[-3] != 3:
            raise ValueError(f"HueRotate: expected a (..., 3, H, W) tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        theta = float(torch.empty(()).uniform_(-self.hue, self.hue)) * 2 * math.pi
        c, s = math.cos(theta), math.sin(theta)
        yiq = torch.tensor(self._YIQ, dtype=torch.float64)
        rot = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)
        m = (torch.linalg.inv(yiq) @ rot @ yiq).float()
        y = torch.matmul(m, x.float().flatten(-2)).unflatten(-1, x.shape[-2:])
        if x.dtype == torch.uint8:
            return y.round_().clamp_(0, 255).to(torch.uint8)
        return y.clamp_(0, 1).to(x.dtype)


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
        import torch
        ops = [v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
               v2.RandomHorizontalFlip(),
               v2.ToDtype(torch.float32, scale=True),    # colour ops in float, once
               v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
               HueRotate(0.1),
               v2.RandomGrayscale(p=0.1)]
    return v2.Compose(ops)
