"""The kernel contenders and their correctness check.

Every contender is ``fn(qkv, pks, pvs) -> out (B, M, N, H*d)``, differentiable, and
starts from the packed QKV buffer (see geometry.py's layout convention): ours through
``prompted_attention_qkv`` on each backend, SDPA over ``torch.cat`` (any / a forced SDPA
kernel), xformers over the concatenation or split with a log-sum-exp merge,
FlexAttention with a block mask, and the explicit math.  ``build_contender`` raises
``Unavailable`` (with the reason) where one cannot run; ``check_contender`` holds each
against the float64 reference backend at the tolerances of docs/design.md
("Tolerances"; the values come from avstfp_fast.testing).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import names
from avstfp_fast.testing import TOL, rel_err
from geometry import KernelShape, make_inputs
from models import raise_dynamo_limits

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


def _segments(shape: KernelShape, N: int, pks):
    """(segment, first token, end, length, prompt count) of each key segment of a
    spatial/fusion stage: one segment, or the audio and visual ones."""
    bounds = [(0, N)] if shape.segments is None else \
        [(0, shape.segments[0]), (shape.segments[0], N)]
    return [(s, lo, hi, hi - lo, pks[s].shape[-2]) for s, (lo, hi) in enumerate(bounds)]


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
    parts = []
    for s, lo, hi, n, P in _segments(shape, N, pks):
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
    parts = []
    for s, lo, hi, n, P in _segments(shape, N, pks):
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
if tuple(CONTENDERS) != names.CONTENDERS:
    raise ImportError("bench/names.py and contenders.CONTENDERS list different contenders")


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
    inp = make_inputs(shape, device, grad=True, seed=seed)
    leaves64 = [t.detach().double().requires_grad_(True) for t in inp.leaves()]
    qkv64, rest = leaves64[0], leaves64[1:]
    n = len(inp.pks)
    pks, pvs = rest[:n], rest[n:]
    # the reference backend through our own public op: cat + math (the oracle of
    # docs/design.md, "The op contract")
    out = ours("reference")(shape)(qkv64, pks, pvs)
    grads = torch.autograd.grad(out, leaves64, inp.dout.double())
    return inp, out.detach(), [g.detach() for g in grads]


def check_contender(fn, shape: KernelShape, ref, grad: bool) -> Dict[str, float]:
    """Relative errors of ``fn`` vs the float64 reference; raises AssertionError if any
    exceeds the tolerance of docs/design.md, "Tolerances" (NaN never passes)."""
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
        labels = ["dqkv"] + [f"dpk{i}" for i in range(n)] + [f"dpv{i}" for i in range(n)]
        for nm, g, r in zip(labels, gs, grads_ref):
            errs[nm] = rel_err(g, r)
    bad = {k: v for k, v in errs.items() if not (v <= tol)}
    if bad:
        raise AssertionError(f"{shape.key}: error above {tol:g}: {bad}")
    return errs

