"""Visual augmentation (torchvision.transforms.v2) applied to a clip's uint8 frames.

The same random parameters are applied to every frame of a clip (v2 transforms draw one
set of parameters per call on a (T, 3, H, W) tensor), so the segments of a clip stay
consistent.  Output: (T, 3, size, size), uint8 (``light``) or float32 in [0, 1]
(``strong``: the colour operations run on floats, with no rounding between them), then
the front end normalises.

Levels (documented choice; the paper asks for "stronger visual augmentation" for AVE and
AVAR without details):
* ``strong``: RandomResizedCrop(scale 0.35-1), horizontal flip, colour jitter
  (brightness/contrast/saturation 0.4, hue 0.1; :class:`ColorJitterFused`: one affine
  colour map per frame, clamped once), random grayscale p=0.1;
* ``light``: RandomResizedCrop(scale 0.7-1, near-square), horizontal flip;
* ``none``: no augmentation (the front end resizes and centre-crops).
"""
from __future__ import annotations

import math

LEVELS = ("none", "light", "strong")


_GREY = (0.2989, 0.587, 0.114)     # torchvision's grayscale weights
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


class ColorJitterFused:
    """Brightness, contrast, saturation and hue jitter, in a random order, as ONE affine
    colour map per frame: each of the four is affine in RGB (hue: a rotation of the
    chroma plane in YIQ space, as NVIDIA DALI's hue), so their composition is one 3x3
    matrix plus a per-frame offset (contrast blends with the frame's mean grey), applied
    in a few elementwise passes and clamped to [0, 1] once.  torchvision's ColorJitter on the same clip
    made 12 passes with a clamp after each and an RGB->HSV->RGB round trip for the hue:
    25 of the 30 ms of CPU a strong augmentation of a 10-frame 224-pixel clip cost
    (bench/test_data_loading.py); this costs about 2 ms.  Factors are drawn as
    torchvision draws them (brightness/contrast/saturation uniform in [1-x, 1+x], hue in
    +-x turns), from the torch RNG, once per clip.  Input and output: (..., 3, H, W)
    float in [0, 1]."""

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
        for name, v, hi in (("brightness", brightness, 1.0), ("contrast", contrast, 1.0),
                            ("saturation", saturation, 1.0), ("hue", hue, 0.5)):
            if not 0 <= v <= hi:
                raise ValueError(f"{name}: expected 0 <= {name} <= {hi}, got {v}")
        self.b, self.c, self.s, self.h = brightness, contrast, saturation, hue

    def matrices(self, mean_rgb):
        """``(A (3, 3), t (N, 3))`` float64 for frames whose RGB means are ``mean_rgb``
        (N, 3): the jitter maps a pixel p of frame n to ``A p + t[n]``."""
        import torch
        f64 = dict(dtype=torch.float64)
        u = lambda lo, hi: float(torch.empty(()).uniform_(lo, hi))    # noqa: E731
        order = torch.randperm(4).tolist()
        b, c, s = (u(1 - x, 1 + x) for x in (self.b, self.c, self.s))
        theta = u(-self.h, self.h) * 2 * math.pi
        eye, grey = torch.eye(3, **f64), torch.tensor(_GREY, **f64)
        yiq = torch.tensor(_YIQ, **f64)
        rot = torch.tensor([[1, 0, 0], [0, math.cos(theta), -math.sin(theta)],
                            [0, math.sin(theta), math.cos(theta)]], **f64)
        A, t = eye.clone(), torch.zeros_like(mean_rgb, **f64)
        for op in order:
            off = 0.0
            if op == 0:
                m = b * eye
            elif op == 1:                      # blend with the current mean grey
                m = c * eye
                off = (1 - c) * ((mean_rgb.double() @ A.T + t) @ grey)[:, None]
            elif op == 2:                      # blend with each pixel's grey
                m = s * eye + (1 - s) * torch.ones(3, 1, **f64) @ grey[None]
            else:
                m = torch.linalg.inv(yiq) @ rot @ yiq
            A, t = m @ A, t @ m.T + off
        return A, t

    def __call__(self, x):
        import torch
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 3 \
                or x.shape[-3] != 3:
            raise ValueError(f"ColorJitterFused: expected a float (..., 3, H, W) tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        flat = x.reshape(-1, 3, *x.shape[-2:])
        A, t = self.matrices(flat.sum(dim=(-2, -1), dtype=torch.float64)
                             / (flat.shape[-1] * flat.shape[-2]))
        # elementwise (not a 1x1 convolution, whose rounding depends on the thread count:
        # a loader worker, 1 thread, must give the main process's bits)
        y = torch.empty_like(flat)
        r, g, b = flat.unbind(-3)
        t = t.to(x.dtype)[:, :, None, None]
        for c in range(3):
            o = y[:, c]
            torch.mul(r, float(A[c, 0]), out=o)
            o.add_(g, alpha=float(A[c, 1])).add_(b, alpha=float(A[c, 2])).add_(t[:, c])
        return y.clamp_(0, 1).reshape(x.shape)


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
               ColorJitterFused(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
               v2.RandomGrayscale(p=0.1)]
    return v2.Compose(ops)
