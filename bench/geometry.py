"""Shapes of the benchmark cases: backbone token geometry, kernel problems, their inputs.

Layout convention ("one buffer"; docs/design.md, "The op contract"): every kernel case
starts from ONE packed projection buffer ``qkv`` of shape (B, M, N, 3, H, d) -- B clips,
M frames, N tokens per frame (Na+1 audio then Nv+1 visual), q/k/v, heads, head dim -- and
must deliver the attention output as a contiguous (B, M, N, H*d) tensor (what the
out-projection reads).  Every contender pays for building its own inputs from that
buffer (permute copies, ``torch.cat`` of prompts, ...) and for moving its output back
into that layout, and, in forward+backward cases, for producing the gradient of ``qkv``
and of the prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from avstfp_fast.models.config import STAGES  # noqa: F401  (re-exported: the stage vocabulary)

MB = 1 << 20
# one second of audio = 98 x 128 fbank frames; 10 one-second segments per clip
AUDIO_T, AUDIO_F, FRAMES = 98, 128, 10
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dt, str(dt))


@dataclass(frozen=True)
class Arch:
    """Token geometry of one backbone (docs/design.md, "The model")."""
    name: str
    heads: int
    head_dim: int
    patch: int
    image: int
    frames: int = FRAMES
    n_temporal: int = 2
    n_spatial: int = 10
    n_fusion: int = 2
    audio_t: int = AUDIO_T
    audio_f: int = AUDIO_F

    @property
    def na(self) -> int:                 # audio patches
        return (self.audio_t // self.patch) * (self.audio_f // self.patch)

    @property
    def nv(self) -> int:                 # visual patches
        return (self.image // self.patch) ** 2

    @property
    def tokens(self) -> int:             # N = Na+1 + Nv+1
        return self.na + 1 + self.nv + 1


ARCHS: Dict[str, Arch] = {
    "B16": Arch("B16", heads=12, head_dim=64, patch=16, image=224),   # Na 48, Nv 196
    "L14": Arch("L14", heads=16, head_dim=64, patch=14, image=224),   # Na 63, Nv 256
    # CPU/CI geometry: a few tokens, 3 frames, real head dim.
    "tiny": Arch("tiny", heads=2, head_dim=64, patch=16, image=64, frames=3,
                 n_spatial=4, audio_t=32, audio_f=64),                # Na 8, Nv 16
}


def model_arch(model, name: str = "model", frames: int = FRAMES) -> Arch:
    """The token geometry of a PromptedCLIP (read off the model)."""
    c = model.config
    return Arch(name, heads=model.num_heads, head_dim=model.width // model.num_heads,
                patch=model.patch_size, image=model.image_size, frames=frames,
                n_temporal=c.n_temporal, n_spatial=c.n_spatial, n_fusion=c.n_fusion)


@dataclass(frozen=True)
class KernelShape:
    """One attention problem: a backbone's stage at a batch size and dtype."""
    arch: Arch
    batch: int
    stage: str
    dtype: torch.dtype

    @property
    def key(self) -> str:
        return f"{self.stage} {self.arch.name} B={self.batch} {dtype_name(self.dtype)}"

    @property
    def segments(self) -> Optional[Tuple[int, int]]:
        a = self.arch
        return (a.na + 1, a.nv + 1) if self.stage == "spatial" else None

    @property
    def prompts(self) -> Tuple[int, ...]:
        """Prompt count per segment."""
        a = self.arch
        if self.stage == "temporal":
            return (a.n_temporal,)
        if self.stage == "spatial":
            return (a.n_spatial, a.n_spatial)
        return (a.n_fusion,)

    def prompt_shape(self) -> Tuple[int, ...]:
        a = self.arch
        P = self.prompts[0]
        if self.stage == "temporal":        # per token position: (N, H, P, d)
            return (a.tokens, a.heads, P, a.head_dim)
        return (a.heads, P, a.head_dim)     # batch-shared: (H, P, d)

    def sequences(self) -> List[Tuple[int, int, int, int]]:
        """(count, Lq, Lk, P) per kind of attention sequence (per head)."""
        a, B = self.arch, self.batch
        if self.stage == "temporal":
            return [(B * a.tokens * a.heads, a.frames, a.frames, a.n_temporal)]
        n = B * a.frames * a.heads
        if self.stage == "spatial":
            return [(n, a.na + 1, a.na + 1, a.n_spatial), (n, a.nv + 1, a.nv + 1, a.n_spatial)]
        return [(n, a.tokens, a.tokens, a.n_fusion)]


# --------------------------------------------------------------------------- inputs
@dataclass
class KernelInputs:
    qkv: torch.Tensor                      # (B, M, N, 3, H, d)
    pks: List[torch.Tensor]                # per segment
    pvs: List[torch.Tensor]
    dout: Optional[torch.Tensor] = None    # (B, M, N, H*d)

    def leaves(self) -> List[torch.Tensor]:
        return [self.qkv, *self.pks, *self.pvs]

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.leaves())
        if self.dout is not None:
            n += self.dout.numel() * self.dout.element_size()
        return n


def make_inputs(shape: KernelShape, device, grad: bool, seed: int, dtype=None) -> KernelInputs:
    """Fresh random inputs (normal, never zeros) for a kernel case."""
    a = shape.arch
    dt = dtype or shape.dtype
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)      # generated where it is used

    def rnd(*s):
        return torch.randn(*s, generator=g, device=dev, dtype=dt)

    qkv = rnd(shape.batch, a.frames, a.tokens, 3, a.heads, a.head_dim)
    ps = shape.prompt_shape()
    pks, pvs = [], []
    for P in shape.prompts:
        s = ps[:-2] + (P, ps[-1])
        pks.append(rnd(*s))
        pvs.append(rnd(*s))
    dout = rnd(shape.batch, a.frames, a.tokens, a.heads * a.head_dim) if grad else None
    for t in [qkv, *pks, *pvs]:
        t.requires_grad_(grad)
    return KernelInputs(qkv, pks, pvs, dout)


_SETS: Dict[tuple, List[KernelInputs]] = {}


def input_sets(shape: KernelShape, device, grad: bool, seed: int,
               min_total: int = 256 * MB, max_sets: int = 8) -> List[KernelInputs]:
    """Several input sets, cycled through while timing, so that repeated calls do not
    just re-read the last-level cache (GPU only; one set on CPU).  The contenders of one
    shape share them (the last shape's sets are kept; leaves are never modified: the
    timed steps use autograd.grad, which accumulates nothing)."""
    key = (shape.key, str(device), grad, seed)
    if key in _SETS:
        return _SETS[key]
    _SETS.clear()
    first = make_inputs(shape, device, grad, seed)
    sets = [first]
    if torch.device(device).type == "cuda":
        n = max(1, min(max_sets, math.ceil(min_total / max(1, first.nbytes()))))
        sets += [make_inputs(shape, device, grad, seed + 1000 * i) for i in range(1, n)]
    _SETS[key] = sets
    return sets


def drop_input_sets() -> None:
    """Free the cached input sets (after an out-of-memory error)."""
    _SETS.clear()
