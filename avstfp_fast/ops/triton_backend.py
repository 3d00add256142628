"""The ``triton`` backend of ``prompted_attention``.

Design note
-----------
Kernels: ``avstfp_fast/kernels/prompted_attention.py`` (forward; backward = a dq kernel
that also reduces the prompt gradients, then a dk/dv kernel).  Each program runs ONE
online-softmax pass over its sequence's token keys/values and then the prompt
keys/values, read in place: nothing is concatenated, expanded, permuted or padded.

*Addressing.*  q, k, v, out, dout, dq, dk, dv and the prompts are read through their own
strides (4 batch strides + the sequence stride; the head dim must have stride 1), so the
temporal view (sequence = frames M, batch = (B, N, H)) and the spatial/fusion view
(sequence = tokens, batch = (B, M, H)) of one ``(B, M, N, 3, H, d)`` QKV buffer are just
different stride sets.  Batch dims of size 1 are dropped and adjacent dims that every
tensor lays out contiguously are merged; at most 4 remain.  The kernel recovers the
batch coordinates from the flat batch index with div/mod.  The (possibly huge) batch
product is grid axis 0 (limit 2^31-1), query/key blocks axis 1, segments axis 2.

*Tiles.*  Long sequences (spatial/fusion, 50-520 tokens): 64 queries x 64 keys per
step, one sequence per program.  Short sequences (Lq <= 32, the temporal stage with
10 queries and 10+2 keys): ``G`` sequences are packed into one 64-row tile
(``SLOT_M = next_pow2(Lq)``, ``G = 64 / SLOT_M``; per sequence ``SLOT_N =
next_pow2(Lk)`` keys and ``SLOT_P = next_pow2(P)`` prompts per step, clamped so that the
key tile ``G * SLOT_N`` is 16..128 rows) and a block-diagonal mask keeps each query on
its own sequence's keys, instead of padding every 10-query sequence to a 64-row tile
(temporal stage: 4 sequences x 16 slots; key tiles 4 x 16, prompt tiles 4 x 4).  Every
``tl.dot`` operand has dims >= 16.  Tails are masked.  fp32 uses IEEE dots (no tf32),
one pipeline stage and key tiles <= 64 rows, as does head dim 128, so shared memory
stays <= 144 KB (sm_80 and sm_90; checked by offline sm_90 compiles of the tested
variants).
Batch-index div/mod runs in int32, address products in int64.

*Prompts.*  ``prompt_k``/``prompt_v`` are a second key/value source addressed through
their broadcast strides (stride 0 over batch dims they are shared in; per-position
prompts such as (N, H, P, d) have non-zero strides there), loaded once per program.

*Segments.*  ``segments=(n0, n1)``: grid axis 2 is the segment; each segment's lengths,
prompt pointers, prompt strides and prompt count are scalar kernel arguments (suffix
``a``/``b``), so both modalities of the joint buffer run in ONE launch.  Max 2 segments
(``why_not`` refuses more).

*Backward.*  The dq kernel computes ``delta = rowsum(do * o)`` (stored for the dk/dv
kernel), dq, and for each prompt row the program's partial ``dpk = scale * ds^T q`` and
``dpv = p^T do``.  Default: fp32 ``atomic_add`` into a buffer of the prompt's own
(un-broadcast) shape addressed through its broadcast strides (so the batch reduction
happens in the atomics), then cast.  ``deterministic=True``
(``torch.use_deterministic_algorithms``): no atomics; each program stores its partial at
``[b, block]`` of a ``(2, *batch, n_blocks, P, E)`` fp32 buffer, reduced afterwards by
``sum``/``sum_to_size`` in a fixed order — bit-exact across runs.  dq/dk/dv are written
directly into the given (possibly strided, aliasing one QKV-gradient buffer) tensors.

*Floor in bytes* (the op is memory-bound; SPEC §4), with s = element size:
forward  = s * (|q| + |k| + |v| + |out|) + s * |prompts| + 4 * Lq * batch (lse);
backward = s * (|q| + |k| + |v| + |out| + |dout| + |dq| + |dk| + |dv|) + 4 * Lq * batch
(lse) + prompts and their gradients.  Our kernels read q/do/k/v twice in the backward
(dq pass and dk/dv pass), and write+read ``delta`` (4 * Lq * batch bytes).  Example,
ViT-B/16 (B=2, M=10, N=246 tokens, 12 heads of 64, bf16): each of q/k/v/o is 7.56 MB
whatever the stage, so the forward floor is ~30.5 MB and the backward floor ~61 MB per
stage call; our backward moves ~91 MB (q, k, v, do read twice).  Long sequences re-read
k/v once per 64-query block (served mostly by L2).

*PyTorch integration.*  The kernels run inside two ``torch.library.custom_op``s,
``avstfp_triton::attn_fwd`` (mutates ``out``, returns lse) and
``avstfp_triton::attn_bwd`` (mutates dq/dk/dv, returns the prompt grads), each with a fake
implementation, so ``torch.compile(fullgraph=True)`` traces through the shared
``_KernelAttention`` autograd function without graph breaks.

*CPU.*  With ``TRITON_INTERPRET=1`` set before the kernels are first imported, CPU
tensors run in the Triton interpreter (fp32/fp16 only).
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from .backends import KernelBackend, kernel_limits, register
from .contract import AttnProblem

MAX_SEGMENTS = 2
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_BATCH_DIMS = 4
HEAD_DIMS = (32, 64, 128)
_KMOD = "avstfp_fast.kernels.prompted_attention"


def interpreting() -> bool:
    """TRITON_INTERPRET=1 in the environment (checked at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    from avstfp_fast.kernels import prompted_attention as K   # imports triton lazily
    return K


def _kernels_interpreted() -> Optional[bool]:
    """None if the kernels are not imported yet, else whether they run in the interpreter."""
    mod = sys.modules.get(_KMOD)
    if mod is None:
        return None
    return type(mod.prompted_attn_fwd).__name__ == "InterpretedFunction"


def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class _Tiles:
    """Tile shape for a problem; see the design note.  fp32 (IEEE FMA dots, no tensor
    cores) and head dim 128 use key tiles of at most 64 rows and fp32 a single pipeline
    stage, which keeps shared memory under ~160 KB (fits sm_80 and sm_90)."""

    def __init__(self, max_q: int, max_k: int, max_p: int, head_dim: int, dtype):
        wide = 64 if (dtype == torch.float32 or head_dim >= 128) else 128
        if max_q <= 32:                         # pack G short sequences per 64-row tile
            self.slot_m = _p2(max(max_q, 1))
            self.g = 64 // self.slot_m
            lo, hi = max(1, 16 // self.g), max(1, wide // self.g)
        else:
            self.slot_m, self.g, lo, hi = 64, 1, 16, 64
        clamp = lambda n: min(max(_p2(max(n, 1)), lo), max(lo, hi))   # noqa: E731
        self.slot_n = clamp(max_k)
        self.slot_p = clamp(max_p)
        self.num_warps = 8 if head_dim >= 128 else 4
        self.num_stages = 1 if dtype == torch.float32 else 2


def tile_for(p: AttnProblem) -> _Tiles:
    """The tile configuration the launchers use for problem ``p``."""
    return _Tiles(max(p.q_segments), max(p.k_segments),
                  max([0] + [t.shape[-2] for t in p.prompt_k if t is not None]),
                  p.head_dim, p.dtype)


def _coalesce(batch: Sequence[int], strides: List[List[int]]):
    """Drop size-1 batch dims and merge adjacent dims that every tensor lays out densely.

    Returns (S1, S2, S3) and, per tensor, 4 batch strides (left-padded with 0)."""
    keep = [i for i, n in enumerate(batch) if n != 1]
    sizes = [int(batch[i]) for i in keep]
    sts = [[int(s[i]) for i in keep] for s in strides]
    i = len(sizes) - 2
    while i >= 0:
        if all(st[i] == st[i + 1] * sizes[i + 1] for st in sts):
            sizes[i] *= sizes.pop(i + 1)
            for st in sts:
                st[i] = st.pop(i + 1)
        i -= 1
    if len(sizes) > MAX_BATCH_DIMS:
        raise ValueError(f"q: at most {MAX_BATCH_DIMS} batch dims of size > 1 are supported "
                         f"by the triton backend, got batch shape {tuple(batch)}")
    pad = MAX_BATCH_DIMS - len(sizes)
    sizes = [1] * pad + sizes
    return sizes[1:], [[0] * pad + st for st in sts]


def _seg_info(q_segments, k_segments):
    nqa, nka = q_segments[0], k_segments[0]
    nqb = q_segments[1] if len(q_segments) > 1 else 0
    nkb = k_segments[1] if len(k_segments) > 1 else 0
    return [nqa, nka, nqb, nkb]


def _prompt_views(pks, pvs, batch, E, dummy):
    """Per segment (2 slots): (pk, pv, expanded pk, expanded pv, P); dummies when absent."""
    out = []
    for s in range(MAX_SEGMENTS):
        pk = pks[s] if s < len(pks) else None
        pv = pvs[s] if s < len(pvs) else None
        if pk is None:
            z = dummy.as_strided((*batch, 0, E), [0] * (len(batch) + 2))
            out.append((dummy, dummy, z, z, 0))
        else:
            P = pk.shape[-2]
            out.append((pk, pv, pk.expand(*batch, P, pk.shape[-1]),
                        pv.expand(*batch, P, pv.shape[-1]), P))
    return out


def _sargs(bstr, t):
    """4 coalesced batch strides + the sequence stride of t (*batch, L, E)."""
    return list(bstr) + [t.stride(-2)]


def _forward_impl(q, k, v, pks, pvs, q_segments, k_segments, scale, out):
    K = _kernels()
    batch, Lq, E = tuple(q.shape[:-2]), q.shape[-2], q.shape[-1]
    nb = len(batch)
    lse = torch.empty((*batch, Lq), dtype=torch.float32, device=q.device)
    Bt = int(torch.Size(batch).numel())
    t = _Tiles(max(q_segments), max(k_segments),
               max([0] + [p.shape[-2] for p in pks if p is not None]), E, q.dtype)
    grid = (triton_cdiv(Bt, t.g), max(triton_cdiv(n, t.slot_m) for n in q_segments),
            len(q_segments))
    if min(grid) == 0:
        return lse
    pr = _prompt_views(pks, pvs, batch, E, q)
    tens = [q, k, v, out] + [x for s in pr for x in (s[2], s[3])]
    S, bst = _coalesce(batch, [list(x.stride()[:nb]) for x in tens])
    args = [q, k, v, out, lse]
    for i in range(4):
        args += _sargs(bst[i], tens[i])
    for s in range(MAX_SEGMENTS):
        pk, pv, ek, ev, P = pr[s]
        args += [pk, pv] + _sargs(bst[4 + 2 * s], ek) + _sargs(bst[5 + 2 * s], ev) + [P]
    args += _seg_info(q_segments, k_segments) + S + [Bt, Lq, scale * 1.4426950408889634]
    K.prompted_attn_fwd[grid](
        *args, G=t.g, SLOT_M=t.slot_m, SLOT_N=t.slot_n, SLOT_P=t.slot_p, D=E,
        PREC=_prec(q), num_warps=t.num_warps, num_stages=t.num_stages)
    return lse


def _prec(q):
    return "ieee" if q.dtype == torch.float32 else "tf32"


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _grad_buffer(pk, pv, batch, P, E, n_blocks, deterministic, device):
    """fp32 buffer for (dpk, dpv) + its kernel strides: (buf, 4+... strides, m, l, kv)."""
    nb = len(batch)
    if deterministic:
        buf = torch.empty((2, *batch, n_blocks, P, E), dtype=torch.float32, device=device)
        view, mstride = buf[0], buf.stride(-3)
    else:
        lead = torch.broadcast_shapes(pk.shape[:-2], pv.shape[:-2])
        buf = torch.zeros((2, *lead, P, E), dtype=torch.float32, device=device)
        view, mstride = buf[0].expand(*batch, P, E), 0
    return buf, list(view.stride()[:nb]), mstride, view.stride(-2), buf.stride(0)


def _finish_grad(buf, pk, pv, deterministic):
    g = buf.sum(-3) if deterministic else buf          # (2, *lead, P, E)
    return (g[0].sum_to_size(pk.shape).to(pk.dtype, copy=True),
            g[1].sum_to_size(pv.shape).to(pv.dtype, copy=True))


def _backward_impl(q, k, v, pks, pvs, q_segments, k_segments, scale, out, lse, dout,
                   dq, dk, dv, deterministic):
    K = _kernels()
    if dout.shape[-1] > 1 and dout.stride(-1) != 1:
        dout = dout.contiguous()        # e.g. the stride-0 gradient of out.sum()
    batch, Lq, E = tuple(q.shape[:-2]), q.shape[-2], q.shape[-1]
    nb = len(batch)
    Bt = int(torch.Size(batch).numel())
    t = _Tiles(max(q_segments), max(k_segments),
               max([0] + [p.shape[-2] for p in pks if p is not None]), E, q.dtype)
    pr = _prompt_views(pks, pvs, batch, E, q)
    n_blocks = [triton_cdiv(n, t.slot_m) for n in q_segments]
    bufs = []
    for s in range(MAX_SEGMENTS):
        if pr[s][4] > 0 and Bt > 0:
            bufs.append(_grad_buffer(pr[s][0], pr[s][1], batch, pr[s][4], E, n_blocks[s],
                                     deterministic, q.device))
        else:
            bufs.append((lse, [0] * nb, 0, 0, 0))
    delta = torch.empty_like(lse)
    grid_q = (triton_cdiv(Bt, t.g), max(n_blocks), len(q_segments))
    grid_k = (triton_cdiv(Bt, t.g), max(triton_cdiv(n, t.slot_n) for n in k_segments),
              len(k_segments))
    seg = _seg_info(q_segments, k_segments)
    common = dict(G=t.g, SLOT_M=t.slot_m, SLOT_N=t.slot_n, D=E, PREC=_prec(q),
                  num_warps=t.num_warps, num_stages=t.num_stages)
    if min(grid_q) > 0:
        tens = [q, k, v, out, dout, dq] + [x for s in pr for x in (s[2], s[3])]
        strides = [list(x.stride()[:nb]) for x in tens] + [b[1] for b in bufs]
        S, bst = _coalesce(batch, strides)
        args = [q, k, v, out, dout, dq, lse, delta]
        for i in range(6):
            args += _sargs(bst[i], tens[i])
        for s in range(MAX_SEGMENTS):
            pk, pv, ek, ev, P = pr[s]
            buf, _, mstr, lstr, kv = bufs[s]
            args += [pk, pv] + _sargs(bst[6 + 2 * s], ek) + _sargs(bst[7 + 2 * s], ev) + [P]
            args += [buf] + bst[10 + s] + [mstr, lstr, kv]
        args += seg + S + [Bt, Lq, scale * 1.4426950408889634, scale]
        K.prompted_attn_bwd_dq[grid_q](*args, SLOT_P=t.slot_p, DETERMINISTIC=bool(deterministic),
                                       **common)
    if min(grid_k) > 0:
        tens = [q, k, v, dout, dk, dv]
        S, bst = _coalesce(batch, [list(x.stride()[:nb]) for x in tens])
        args = [q, k, v, dout, dk, dv, lse, delta]
        for i in range(6):
            args += _sargs(bst[i], tens[i])
        args += seg + S + [Bt, Lq, scale * 1.4426950408889634, scale]
        K.prompted_attn_bwd_dkdv[grid_k](*args, **common)
    grads = [q.new_empty(0) for _ in range(2 * MAX_SEGMENTS)]   # (dpk_a, dpk_b, dpv_a, dpv_b)
    for s, (pk, pv) in enumerate(zip(pks, pvs)):
        if pk is None:
            continue
        if pk.shape[-2] == 0 or Bt == 0:
            grads[s], grads[MAX_SEGMENTS + s] = torch.zeros_like(pk), torch.zeros_like(pv)
        else:
            grads[s], grads[MAX_SEGMENTS + s] = _finish_grad(bufs[s][0], pk, pv, deterministic)
    return tuple(grads)


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("avstfp_triton::attn_fwd", mutates_args=("out",))
def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             prompt_k: List[Optional[torch.Tensor]], prompt_v: List[Optional[torch.Tensor]],
             q_segments: List[int], k_segments: List[int], scale: float,
             out: torch.Tensor) -> torch.Tensor:
    """Writes the attention output into ``out``; returns the fp32 row log-sum-exp."""
    return _forward_impl(q, k, v, prompt_k, prompt_v, q_segments, k_segments, scale, out)


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, prompt_k, prompt_v, q_segments, k_segments, scale, out):
    return q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("avstfp_triton::attn_bwd", mutates_args=("dq", "dk", "dv"))
def attn_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             prompt_k: List[Optional[torch.Tensor]], prompt_v: List[Optional[torch.Tensor]],
             q_segments: List[int], k_segments: List[int], scale: float,
             out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
             dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
             deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Writes dq/dk/dv; returns (dpk_0, dpk_1, dpv_0, dpv_1), empty where a segment has no
    prompts (a fixed tuple: mutating custom ops cannot return a Tensor list)."""
    return _backward_impl(q, k, v, prompt_k, prompt_v, q_segments, k_segments, scale, out,
                          lse, dout, dq, dk, dv, deterministic)


@attn_bwd.register_fake
def _attn_bwd_fake(q, k, v, prompt_k, prompt_v, q_segments, k_segments, scale, out, lse,
                   dout, dq, dk, dv, deterministic):
    def g(ps, s):
        p = ps[s] if s < len(ps) else None
        return q.new_empty(0) if p is None else p.new_empty(p.shape)
    return tuple([g(prompt_k, s) for s in range(MAX_SEGMENTS)]
                 + [g(prompt_v, s) for s in range(MAX_SEGMENTS)])


# --------------------------------------------------------------------------- backend
class TritonBackend(KernelBackend):
    name = "triton"

    def why_not(self, p: AttnProblem) -> Optional[str]:
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"triton is not installed ({e})"
        dev = p.device.type
        interp = interpreting()
        if dev == "cpu":
            if not interp:
                return ("q is on the CPU: the triton backend needs a CUDA device "
                        "(or TRITON_INTERPRET=1 for the CPU interpreter)")
            if _kernels_interpreted() is False:
                return ("TRITON_INTERPRET=1 was set after the Triton kernels were compiled "
                        "for the GPU; set it before the first use of the triton backend")
        elif dev != "cuda":
            return f"q is on device {p.device}; the triton backend runs on cuda (or cpu when interpreting)"
        if p.dtype == torch.bfloat16 and (interp or _kernels_interpreted()):
            return "dtype torch.bfloat16 is not supported by the Triton CPU interpreter (float16, float32)"
        reason = kernel_limits(p, "triton", dtypes=DTYPES, head_dims=HEAD_DIMS,
                               max_segments=MAX_SEGMENTS, max_batch_dims=MAX_BATCH_DIMS)
        if reason is not None:
            return reason
        for s, (pk, pv) in enumerate(zip(p.prompt_k, p.prompt_v)):
            for name, t in (("prompt_k", pk), ("prompt_v", pv)):
                if t is not None and t.stride(-1) != 1:
                    return (f"{name}[{s}]: last-dim stride must be 1, got strides {t.stride()} "
                            f"for shape {tuple(t.shape)}")
        return None

    def forward(self, p: AttnProblem, out: torch.Tensor) -> torch.Tensor:
        return torch.ops.avstfp_triton.attn_fwd(
            p.q, p.k, p.v, list(p.prompt_k), list(p.prompt_v), list(p.q_segments),
            list(p.k_segments), p.scale, out)

    def backward(self, p, out, lse, dout, dq, dk, dv, deterministic: bool):
        grads = torch.ops.avstfp_triton.attn_bwd(
            p.q, p.k, p.v, list(p.prompt_k), list(p.prompt_v), list(p.q_segments),
            list(p.k_segments), p.scale, out, lse, dout, dq, dk, dv, bool(deterministic))
        S = len(p.prompt_k)
        dpk = tuple(grads[s] if p.prompt_k[s] is not None else None for s in range(S))
        dpv = tuple(grads[MAX_SEGMENTS + s] if p.prompt_k[s] is not None else None
                    for s in range(S))
        return dpk, dpv


register(TritonBackend())
