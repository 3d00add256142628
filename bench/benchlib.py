"""Shared machinery of the benchmark suite: shapes, contenders, roofline, timing.

Everything here is device-agnostic; the test modules decide what runs where.

Layout convention (SPEC §1 "one buffer"): every kernel case starts from ONE packed
projection buffer ``qkv`` of shape (B, M, N, 3, H, d) -- B clips, M frames, N tokens per
frame (Na+1 audio then Nv+1 visual), q/k/v, heads, head dim -- and must deliver the
attention output as a contiguous (B, M, N, H*d) tensor (what the out-projection reads).
Every contender pays for building its own inputs from that buffer (permute copies,
``torch.cat`` of prompts, ...) and for moving its output back into that layout, and,
in forward+backward cases, for producing the gradient of ``qkv`` and of the prompts.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from avstfp_fast.testing import TOL, rel_err

# --------------------------------------------------------------------------- shapes
MB = 1 << 20


@dataclass(frozen=True)
class Arch:
    """Token geometry of one backbone (SPEC §4)."""
    name: str
    heads: int
    head_dim: int
    patch: int
    image: int
    frames: int = 10
    n_temporal: int = 2
    n_spatial: int = 10
    n_fusion: int = 2
    audio_t: int = 98
    audio_f: int = 128

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

STAGES = ("temporal", "spatial", "fusion")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class KernelShape:
    arch: Arch
    batch: int
    stage: str
    dtype: torch.dtype

    @property
    def key(self) -> str:
        return f"{self.stage} {self.arch.name} B={self.batch} {dtype_name(self.dtype)}"

    # -- geometry of the attention problem
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


def dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dt, str(dt))


# --------------------------------------------------------------------------- roofline
def kernel_cost(shape: KernelShape, passes: str) -> Dict[str, float]:
    """Minimum bytes and FLOPs of one kernel case (SPEC §4).

    Forward: read q, k, v and the prompts once, write o once (plus the fp32 row
    log-sum-exp when a backward follows).  Backward: read q, k, v, prompts, o, do, lse;
    write dq, dk, dv, dprompts.  FLOPs count the two matrix products of the forward
    (4·Lq·(Lk+P)·d per sequence and head) and the four of a backward that keeps the
    probabilities (2x forward; FlashAttention-style recomputation would add 0.5x).
    """
    a = shape.arch
    el = torch.finfo(shape.dtype).bits // 8
    T = shape.batch * a.frames * a.tokens            # tokens
    x = T * a.heads * a.head_dim * el                # one of q / k / v / o
    pshape = shape.prompt_shape()
    prompt = 2 * len(shape.prompts) * math.prod(pshape) * el   # k and v prompts, all segments
    lse = T * a.heads * 4
    fl = 0.0
    for count, lq, lk, p in shape.sequences():
        fl += count * 4.0 * lq * (lk + p) * a.head_dim
    fwd_bytes = 3 * x + prompt + x
    if passes == "fwd":
        return {"bytes": float(fwd_bytes), "flops": fl}
    bwd_bytes = (3 * x + prompt + x + x + lse) + (3 * x + prompt)
    return {"bytes": float(fwd_bytes + lse + bwd_bytes), "flops": 3.0 * fl}


def floor_time(cost: Dict[str, float], ceilings: Dict[str, float]) -> float:
    """Roofline floor of a kernel: the larger of bytes/bandwidth and FLOPs/rate."""
    return max(cost["bytes"] / ceilings["copy_Bps"], cost["flops"] / ceilings["gemm_flops"])


# --------------------------------------------------------------------------- ceilings
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, reps: int) -> float:
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def measure_ceilings(device: torch.device, quick: bool = False) -> Dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written per second) and a large
    bf16 matrix-product rate, measured now, on random data (never zeros)."""
    g = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        n_copy = (1 << 28) if not quick else (1 << 26)          # 512 MiB of bf16 (128 MiB quick)
        n_mm, dt = (8192 if not quick else 4096), torch.bfloat16
    else:
        n_copy, n_mm, dt = 1 << 24, 1024, torch.float32          # 32 MiB fp16-equiv; CPU fp32 GEMM
    src = torch.randn(n_copy, device=device, dtype=torch.bfloat16, generator=g)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_copy = _median_time(lambda: dst.copy_(src), device, 10)
    copy_Bps = 2 * src.numel() * src.element_size() / t_copy
    del src, dst
    a = torch.randn(n_mm, n_mm, device=device, dtype=dt, generator=g)
    b = torch.randn(n_mm, n_mm, device=device, dtype=dt, generator=g)
    a @ b
    t_mm = _median_time(lambda: a @ b, device, 10 if device.type == "cuda" else 3)
    gemm = 2.0 * n_mm ** 3 / t_mm
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"copy_Bps": copy_Bps, "gemm_flops": gemm, "gemm_dtype": str(dt).replace("torch.", ""),
            "gemm_n": n_mm, "copy_bytes": 2 * n_copy * 2, "device": device_name(device)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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


_SETS: Dict[tuple, List["KernelInputs"]] = {}


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


# --------------------------------------------------------------------------- contenders
# Every contender is ``fn(qkv, pks, pvs) -> out (B, M, N, H*d)``; differentiable.
class Unavailable(Exception):
    """The contender cannot run here (missing package/device/backend); the message says why."""


def _views(qkv):
    """q, k, v as (B, M, N, H, d) views of the packed buffer."""
    return qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]


def ours(backend: str):
    from avstfp_fast import prompted_attention_qkv

    def run(shape: KernelShape):
        B, a = shape.batch, shape.arch
        M, N, H, d = a.frames, a.tokens, a.heads, a.head_dim

        if shape.stage == "temporal":
            def fn(qkv, pks, pvs):
                o = prompted_attention_qkv(qkv, pks[0], pvs[0], qkv_dim=3, seq_dim=1,
                                           backend=backend)          # (B, N, H, M, d)
                return o.permute(0, 3, 1, 2, 4).reshape(B, M, N, H * d)
        else:
            segs = shape.segments

            def fn(qkv, pks, pvs):
                if segs is None:
                    o = prompted_attention_qkv(qkv, pks[0], pvs[0], qkv_dim=3, seq_dim=2,
                                               backend=backend)      # (B, M, H, N, d)
                else:
                    o = prompted_attention_qkv(qkv, list(pks), list(pvs), qkv_dim=3,
                                               seq_dim=2, segments=segs, backend=backend)
                return o.transpose(2, 3).reshape(B, M, N, H * d)
        return fn
    return run


def _check_ours(backend: str, device) -> None:
    try:
        from avstfp_fast.ops import get_backend
        get_backend(backend)
    except (ImportError, ValueError, RuntimeError, OSError) as e:
        raise Unavailable(f"backend {backend!r} not available: {e}") from None
    if backend in ("triton", "cuda") and torch.device(device).type != "cuda":
        raise Unavailable(f"backend {backend!r} needs a CUDA device")


def _to4d(shape: KernelShape, qkv, pks, pvs):
    """SDPA-style (batch, heads, L, d) inputs per segment, prompts concatenated.

    Returns a list of (q, k, v) per segment and a function mapping the list of
    per-segment outputs back to (B, M, N, H*d)."""
    B, a = shape.batch, shape.arch
    M, N, H, d = a.frames, a.tokens, a.heads, a.head_dim
    q5, k5, v5 = _views(qkv)
    if shape.stage == "temporal":
        P = pks[0].shape[-2]
        # sequence over frames: (B, N, H, M, d); the q reshape copies (not mergeable)
        q = q5.permute(0, 2, 3, 1, 4).reshape(B * N, H, M, d)
        k = torch.cat([k5.permute(0, 2, 3, 1, 4), pks[0].expand(B, N, H, P, d)], -2)
        v = torch.cat([v5.permute(0, 2, 3, 1, 4), pvs[0].expand(B, N, H, P, d)], -2)
        parts = [(q, k.reshape(B * N, H, M + P, d), v.reshape(B * N, H, M + P, d))]

        def back(outs):
            return outs[0].view(B, N, H, M, d).permute(0, 3, 1, 2, 4).reshape(B, M, N, H * d)
        return parts, back
    bounds = [(0, N)] if shape.segments is None else \
        [(0, shape.segments[0]), (shape.segments[0], N)]
    parts = []
    for s, (lo, hi) in enumerate(bounds):
        n, P = hi - lo, pks[s].shape[-2]
        q = q5[:, :, lo:hi].transpose(2, 3).reshape(B * M, H, n, d)   # a view: B,M merge
        k = k5[:, :, lo:hi].transpose(2, 3).reshape(B * M, H, n, d)
        v = v5[:, :, lo:hi].transpose(2, 3).reshape(B * M, H, n, d)
        k = torch.cat([k, pks[s].expand(B * M, H, P, d)], -2)
        v = torch.cat([v, pvs[s].expand(B * M, H, P, d)], -2)
        parts.append((q, k, v))

    def back(outs):
        o = outs[0] if len(outs) == 1 else torch.cat(outs, -2)          # (B*M, H, N, d)
        return o.transpose(1, 2).reshape(B, M, N, H * d)
    return parts, back


def sdpa(kernel: Optional[str]):
    """F.scaled_dot_product_attention over torch.cat; ``kernel`` forces one SDPA backend."""
    def run(shape: KernelShape):
        ctx = _sdpa_ctx(kernel)

        def fn(qkv, pks, pvs):
            parts, back = _to4d(shape, qkv, pks, pvs)
            with ctx():
                outs = [F.scaled_dot_product_attention(q, k, v) for q, k, v in parts]
            return back(outs)
        return fn
    return run


def _sdpa_ctx(kernel: Optional[str]):
    import contextlib
    if kernel is None:
        return contextlib.nullcontext
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        raise Unavailable("torch.nn.attention.sdpa_kernel not available") from None
    name = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
            "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[kernel]
    if not hasattr(SDPBackend, name):
        raise Unavailable(f"SDPBackend.{name} not in this torch")
    be = getattr(SDPBackend, name)
    return lambda: sdpa_kernel([be])


def naive():
    """Explicit math over the concatenation: softmax(q kᵀ · scale) v."""
    def run(shape: KernelShape):
        scale = shape.arch.head_dim ** -0.5

        def fn(qkv, pks, pvs):
            parts, back = _to4d(shape, qkv, pks, pvs)
            outs = [torch.softmax((q @ k.transpose(-1, -2)) * scale, -1) @ v
                    for q, k, v in parts]
            return back(outs)
        return fn
    return run


# -- xformers (BMHK layout: batch, seq, heads, d)
def _xformers():
    try:
        import xformers.ops as xops
        from xformers.ops import fmha
    except Exception as e:     # ImportError, or a binary mismatch with this torch
        raise Unavailable(f"xformers not importable: {type(e).__name__}: {e}") from None
    return xops, fmha


def _bmhk(shape: KernelShape, qkv, pks, pvs, with_prompts_cat: bool):
    """Per segment: q (b, Lq, H, d), k/v (b, Lk, H, d), prompts (b, P, H, d)."""
    B, a = shape.batch, shape.arch
    M, N, H, d = a.frames, a.tokens, a.heads, a.head_dim
    q5, k5, v5 = _views(qkv)
    if shape.stage == "temporal":
        P = pks[0].shape[-2]
        q = q5.transpose(1, 2).reshape(B * N, M, H, d)                 # copy
        k = k5.transpose(1, 2)
        v = v5.transpose(1, 2)                                          # (B, N, M, H, d)
        pk = pks[0].transpose(-2, -3).expand(B, N, P, H, d)
        pv = pvs[0].transpose(-2, -3).expand(B, N, P, H, d)
        if with_prompts_cat:
            k = torch.cat([k, pk], 2).reshape(B * N, M + P, H, d)
            v = torch.cat([v, pv], 2).reshape(B * N, M + P, H, d)
            parts = [(q, k, v, None, None)]
        else:       # (reshape of the stride-0 prompt expansion materialises it)
            parts = [(q, k.reshape(B * N, M, H, d), v.reshape(B * N, M, H, d),
                      pk.reshape(B * N, P, H, d), pv.reshape(B * N, P, H, d))]

        def back(outs):
            return outs[0].view(B, N, M, H, d).transpose(1, 2).reshape(B, M, N, H * d)
        return parts, back
    bounds = [(0, N)] if shape.segments is None else \
        [(0, shape.segments[0]), (shape.segments[0], N)]
    parts = []
    for s, (lo, hi) in enumerate(bounds):
        n, P = hi - lo, pks[s].shape[-2]
        q = q5[:, :, lo:hi].reshape(B * M, n, H, d)                    # views (B, M merge)
        k = k5[:, :, lo:hi].reshape(B * M, n, H, d)
        v = v5[:, :, lo:hi].reshape(B * M, n, H, d)
        pk = pks[s].transpose(0, 1).expand(B * M, P, H, d)
        pv = pvs[s].transpose(0, 1).expand(B * M, P, H, d)
        if with_prompts_cat:
            parts.append((q, torch.cat([k, pk], 1), torch.cat([v, pv], 1), None, None))
        else:       # xformers kernels want real strides: materialise the prompt batch
            parts.append((q, k, v, pk.contiguous(), pv.contiguous()))

    def back(outs):
        o = outs[0] if len(outs) == 1 else torch.cat(outs, 1)           # (B*M, N, H, d)
        return o.reshape(B, M, N, H * d)
    return parts, back


def xformers_cat():
    """xformers memory_efficient_attention over the concatenation."""
    xops, _ = _xformers()

    def run(shape: KernelShape):
        def fn(qkv, pks, pvs):
            parts, back = _bmhk(shape, qkv, pks, pvs, with_prompts_cat=True)
            return back([xops.memory_efficient_attention(q, k, v) for q, k, v, _, _ in parts])
        return fn
    return run


def xformers_split():
    """No concatenation: partial attention over the tokens and over the prompts, merged
    with their log-sum-exps (xformers' merge_attentions; with autograd through
    xformers.ops.fmha.merge_training).  The prompts are expanded to the batch in memory
    (P rows per sequence), the tokens are read in place."""
    _, fmha = _xformers()
    if not hasattr(fmha, "memory_efficient_attention_partial") or \
            not hasattr(fmha, "merge_attentions"):
        raise Unavailable("this xformers has no memory_efficient_attention_partial/merge_attentions")
    try:
        from xformers.ops.fmha import merge_training as mt
        part_ag, merge_ag = mt.memory_efficient_attention_partial_autograd, mt.merge_attentions_autograd
    except Exception:
        part_ag = merge_ag = None

    def run(shape: KernelShape):
        def fn(qkv, pks, pvs):
            parts, back = _bmhk(shape, qkv, pks, pvs, with_prompts_cat=False)
            grad = torch.is_grad_enabled() and qkv.requires_grad
            outs = []
            for q, k, v, pk, pv in parts:
                if grad:
                    if part_ag is None:
                        raise Unavailable("this xformers has no autograd for partial attention "
                                          "(xformers.ops.fmha.merge_training)")
                    outs.append(merge_ag(part_ag(q, k, v), part_ag(q, pk, pv)).to(q.dtype))
                else:
                    o1, l1 = fmha.memory_efficient_attention_partial(q, k, v)
                    o2, l2 = fmha.memory_efficient_attention_partial(q, pk, pv)
                    o, _ = fmha.merge_attentions([o1, o2], [l1, l2], write_lse=False,
                                                 output_dtype=q.dtype)
                    outs.append(o)
            return back(outs)
        return fn
    return run


# -- FlexAttention
_FLEX = {}


def flex():
    """FlexAttention over the concatenation; a block mask keeps the spatial segments apart.

    Compiled on CUDA (the only way it is fast); on CPU it runs eagerly, forward only
    (PyTorch has no CPU backward for it) -- that only exercises the code path."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Unavailable(f"FlexAttention not in this torch: {e}") from None

    def run(shape: KernelShape):
        B, a = shape.batch, shape.arch
        M, N, H, d = a.frames, a.tokens, a.heads, a.head_dim

        def fn(qkv, pks, pvs):
            dev = qkv.device
            if dev.type == "cuda":
                if "compiled" not in _FLEX:
                    raise_dynamo_limits()
                    _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
                fa = _FLEX["compiled"]
            else:
                if torch.is_grad_enabled() and qkv.requires_grad:
                    raise Unavailable("FlexAttention has no CPU backward")
                fa = flex_attention
            if shape.stage != "spatial":
                parts, back = _to4d(shape, qkv, pks, pvs)
                return back([fa(q, k, v) for q, k, v in parts])
            # one call over [audio | visual | audio prompts | visual prompts]
            na1 = shape.segments[0]
            Pa, Pv = pks[0].shape[-2], pks[1].shape[-2]
            q5, k5, v5 = _views(qkv)
            q = q5.transpose(2, 3).reshape(B * M, H, N, d)
            k = torch.cat([k5.transpose(2, 3).reshape(B * M, H, N, d),
                           pks[0].expand(B * M, H, Pa, d), pks[1].expand(B * M, H, Pv, d)], 2)
            v = torch.cat([v5.transpose(2, 3).reshape(B * M, H, N, d),
                           pvs[0].expand(B * M, H, Pa, d), pvs[1].expand(B * M, H, Pv, d)], 2)
            key = ("mask", N, Pa, Pv, na1, str(dev))
            if key not in _FLEX:
                def mask_mod(b, h, qi, ki):
                    kseg = torch.where(ki < N, ki >= na1, ki >= N + Pa)
                    return (qi >= na1) == kseg
                _FLEX[key] = create_block_mask(mask_mod, None, None, N, N + Pa + Pv,
                                               device=dev)
            o = fa(q, k, v, block_mask=_FLEX[key])
            return o.transpose(1, 2).reshape(B, M, N, H * d)
        return fn
    return run


# name -> (factory, needs_cuda, compiled)
CONTENDERS: Dict[str, Tuple[Callable, bool, bool]] = {
    "ours-triton": (lambda: ours("triton"), True, False),
    "ours-cuda": (lambda: ours("cuda"), True, False),
    "ours-torch": (lambda: ours("torch"), False, False),
    "sdpa": (lambda: sdpa(None), False, False),
    "sdpa-flash": (lambda: sdpa("flash"), True, False),
    "sdpa-efficient": (lambda: sdpa("efficient"), True, False),
    "sdpa-cudnn": (lambda: sdpa("cudnn"), True, False),
    "xformers-cat": (xformers_cat, True, False),
    "xformers-split": (xformers_split, True, False),
    "flex": (flex, False, True),
    "naive": (naive, False, False),
}
OURS = ("ours-triton", "ours-cuda")
PEERS = ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers-cat",
         "xformers-split", "flex", "naive", "ours-torch")


def build_contender(name: str, shape: KernelShape, device) -> Callable:
    factory, needs_cuda, _ = CONTENDERS[name]
    dev = torch.device(device)
    if needs_cuda and dev.type != "cuda":
        raise Unavailable(f"{name} needs a CUDA device")
    if name.startswith("ours-"):
        backend = name.split("-", 1)[1]
        if backend == "cuda" and os.environ.get("AVSTFP_BENCH_SKIP_CUDA") == "1":
            raise Unavailable("AVSTFP_BENCH_SKIP_CUDA=1 (extension build failed or timed out)")
        _check_ours(backend, dev)
    return factory()(shape)


# --------------------------------------------------------------------------- correctness
def reference_results(shape: KernelShape, device, seed: int):
    """Output and gradients of the reference backend in float64 on the case's inputs."""
    from avstfp_fast import prompted_attention_qkv
    inp = make_inputs(shape, device, grad=True, seed=seed)
    leaves64 = [t.detach().double().requires_grad_(True) for t in inp.leaves()]
    qkv64, rest = leaves64[0], leaves64[1:]
    n = len(inp.pks)
    pks, pvs = rest[:n], rest[n:]
    # the reference backend through our own public op: cat + math (SPEC §3 oracle)
    out = ours("reference")(shape)(qkv64, pks, pvs)
    grads = torch.autograd.grad(out, leaves64, inp.dout.double())
    return inp, out.detach(), [g.detach() for g in grads]


def check_contender(fn, shape: KernelShape, ref, grad: bool) -> Dict[str, float]:
    """Relative errors of ``fn`` vs the float64 reference; raises AssertionError if any
    exceeds the SPEC §5 tolerance (NaN never passes)."""
    inp, out_ref, grads_ref = ref
    tol = TOL[shape.dtype]
    leaves = [t.detach().clone().requires_grad_(grad) for t in inp.leaves()]
    n = len(inp.pks)
    with torch.set_grad_enabled(grad):
        out = fn(leaves[0], leaves[1:1 + n], leaves[1 + n:])
    if tuple(out.shape) != tuple(out_ref.shape):
        raise AssertionError(f"output shape {tuple(out.shape)} != {tuple(out_ref.shape)}")
    errs = {"out": rel_err(out, out_ref)}
    if grad:
        gs = torch.autograd.grad(out, leaves, inp.dout)
        names = ["dqkv"] + [f"dpk{i}" for i in range(n)] + [f"dpv{i}" for i in range(n)]
        for nm, g, r in zip(names, gs, grads_ref):
            errs[nm] = rel_err(g, r)
    bad = {k: v for k, v in errs.items() if not (v <= tol)}
    if bad:
        raise AssertionError(f"{shape.key}: error above {tol:g}: {bad}")
    return errs


# --------------------------------------------------------------------------- timing
def sync_timer():
    """pytest-benchmark timer for CUDA work: waits for the device, then reads the clock,
    so a round of ``iterations`` asynchronous calls is timed end to end."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def calibrate(fn, device, target_s: float, max_iter: int = 10000) -> int:
    """Iterations per round so that a round lasts about ``target_s``."""
    dev = torch.device(device)
    t = _median_time(fn, dev, 3)
    return int(max(1, min(max_iter, round(target_s / max(t, 1e-7)))))


def peak_memory(fn, device) -> Dict[str, Optional[int]]:
    """Peak allocated bytes during one call (torch.cuda.max_memory_allocated after a
    reset), and the same minus what was allocated before the call."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"peak_mem": None, "peak_mem_delta": None}
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    return {"peak_mem": int(peak), "peak_mem_delta": int(peak - base)}


# --------------------------------------------------------------------------- end to end
OPEN_CLIP_NAMES = {"B16": "ViT-B-16", "L14": "ViT-L-14"}
# CPU configurations of PromptedCLIP.tiny: "tiny" is the CI default tower; "small" is a
# slightly bigger one (head dim 64, 7x7 visual grid) for the CPU speed ratio.
SMALL_MODELS = {"tiny": dict(), "small": dict(width=256, layers=4, heads=4, image_size=112)}
AUDIO_T, AUDIO_F, FRAMES = 98, 128, 10


def make_model(arch: str, device, backend: str = "reference"):
    """A randomly initialised PromptedCLIP (task AVE) on ``device`` (weights never
    downloaded)."""
    from avstfp_fast import PromptedCLIP
    if arch in OPEN_CLIP_NAMES:
        m = PromptedCLIP(OPEN_CLIP_NAMES[arch], pretrained=None, task="ave", backend=backend,
                         device=device)
    else:
        m = PromptedCLIP.tiny(task="ave", backend=backend, **SMALL_MODELS[arch])
    return m.to(device)


def make_batch(model, batch: int, device, seed: int = 0, frames: int = FRAMES):
    """Random normalised fbank (B, M, 98, 128), frames (B, M, 3, S, S), AVE labels (B, M)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = model.image_size
    audio = torch.randn(batch, frames, AUDIO_T, AUDIO_F, generator=g).to(device)
    video = torch.randn(batch, frames, 3, S, S, generator=g).to(device)
    labels = torch.randint(0, model.config.num_classes, (batch, frames), generator=g).to(device)
    return audio, video, labels


def model_arch(model, name: str = "model", frames: int = FRAMES) -> Arch:
    """The token geometry of a PromptedCLIP (read off the model)."""
    c = model.config
    return Arch(name, heads=model.num_heads, head_dim=model.width // model.num_heads,
                patch=model.patch_size, image=model.image_size, frames=frames,
                n_temporal=c.n_temporal, n_spatial=c.n_spatial, n_fusion=c.n_fusion,
                audio_t=AUDIO_T, audio_f=AUDIO_F)


def e2e_cost(model, batch: int, mode: str, dtype=torch.bfloat16) -> Dict[str, float]:
    """Floor ingredients of one training step ("train") or inference forward ("infer").

    FLOPs: the matrix products a perfect implementation must do -- per layer and token,
    one QKV and one output projection per attention stage (3 stages), the MLP; patch
    embedding; the attention products (benchlib.kernel_cost, prompts included).  The
    backward of a prompt-tuned model needs input gradients only (frozen weights): 1x the
    forward's products again (2x if the backbone is fine-tuned).
    Bytes: the frozen weights read once per pass (bf16), the inputs read once, and the
    attention floor bytes of every stage and layer (benchlib.kernel_cost).  Everything
    else (layer norms, GELU, residual adds) could live in GEMM epilogues, so the floor
    leaves it out.
    """
    a = model_arch(model)
    c = model.config
    D, L = model.width, model.num_layers
    blk = model.visual.transformer.resblocks[0]
    hidden = blk.mlp.c_fc.out_features
    T = batch * a.frames * a.tokens
    stages = [s for s in STAGES if c.has(s)]
    per_layer = len(stages) * (2 * T * D * 3 * D + 2 * T * D * D) + 2 * T * D * hidden * 2
    p = a.patch
    embed = 2 * batch * a.frames * (a.nv * 3 + a.na) * p * p * D
    fwd_gemm = L * per_layer + embed
    passes = "fwd" if mode == "infer" else "fwdbwd"
    att_fl = att_by = 0.0
    for s in stages:
        kc = kernel_cost(KernelShape(a, batch, s, dtype), passes)
        att_fl += L * kc["flops"]
        att_by += L * kc["bytes"]
    if mode == "infer":
        gemm = fwd_gemm
        wpasses = 1
    else:
        gemm = fwd_gemm * (3 if c.full_finetune else 2)
        wpasses = 2
    el = torch.finfo(dtype).bits // 8
    wbytes = sum(q.numel() for q in model.visual.parameters()) * el * wpasses
    inbytes = batch * a.frames * (AUDIO_T * AUDIO_F + 3 * a.image ** 2) * 4
    return {"flops": float(gemm + att_fl), "bytes": float(wbytes + inbytes + att_by),
            "tokens": T}


def e2e_floor(cost: Dict[str, float], ceilings: Dict[str, float]) -> float:
    """Training/inference floor: FLOPs at the GEMM rate PLUS bytes at the copy bandwidth."""
    return cost["flops"] / ceilings["gemm_flops"] + cost["bytes"] / ceilings["copy_Bps"]


def train_step_fn(model, forward, audio, video, labels, autocast_dtype=None):
    """One optimisation step: zero grads, forward (optionally under autocast), CE loss,
    backward, Adam step.  Returns the step function (it returns nothing)."""
    opt = torch.optim.Adam(model.param_groups(3e-4, 3e-4, 0.0))
    dev = audio.device.type

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = forward(audio, video)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
    return step


def infer_fn(forward, audio, video, autocast_dtype=None):
    dev = audio.device.type

    def run():
        with torch.no_grad(), torch.autocast(dev, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            forward(audio, video)
    return run


# --------------------------------------------------------------------------- compile
def raise_dynamo_limits(n: int = 256) -> None:
    """Every benchmark shape compiles its own graph: lift dynamo's recompile limits so
    that no case silently falls back to eager."""
    import torch._dynamo as dynamo
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), n))
