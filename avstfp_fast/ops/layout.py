"""Batch-dimension merging and the launch plan for the kernel backends (one place for all).

The kernels address every operand as ``base + sum_d i_d * stride_d + pos * seq_stride``
over at most :data:`MAX_BATCH_DIMS` batch dims, recovering ``(i0, i1, i2, i3)`` from the
flat batch index by div/mod.  :func:`merge_batch_dims` turns an arbitrary batch shape
and the batch strides of every operand into that form: it drops size-1 dims and merges
adjacent dims that *every* operand lays out densely one inside the other (so a
``(B, N, H)`` batch of a contiguous buffer becomes one dim), then left-pads to four dims.
Broadcast operands (stride 0) merge only where all others are stride 0 too.

:class:`LaunchPlan` builds on it: the whole launch description of one call (merged batch
sizes, every operand's strides, the segment table, the prompt-gradient buffers) in the
names of ``csrc/attn_params.h``; the CUDA binding and the emulation tests read it as is.
"""
from __future__ import annotations

import struct
from typing import List, Optional, Sequence, Tuple

MAX_BATCH_DIMS = 4


def merge_batch_dims(batch: Sequence[int], strides: Sequence[Sequence[int]],
                     max_dims: int = MAX_BATCH_DIMS, what: str = "q"
                     ) -> Tuple[Tuple[int, ...], List[Tuple[int, ...]]]:
    """Merge the batch dims of several operands that share the batch shape ``batch``.

    ``strides[t]`` are operand t's strides over the batch dims (same length as
    ``batch``).  Returns ``(sizes, merged)``: ``sizes`` has ``max_dims`` entries (leading
    1s), ``merged[t]`` the matching ``max_dims`` strides of operand t (leading 0s), such
    that for every flat row-major batch index the address is unchanged.  Raises
    ValueError (naming ``what``) if more than ``max_dims`` dims remain."""
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
    if len(sizes) > max_dims:
        raise ValueError(f"{what}: at most {max_dims} batch dims of size > 1 are supported "
                         f"(after merging dims laid out densely), got batch shape "
                         f"{tuple(batch)}")
    pad = max_dims - len(sizes)
    return (tuple([1] * pad + sizes), [tuple([0] * pad + st) for st in sts])


def dense_strides(sizes: Sequence[int], inner: int) -> Tuple[int, ...]:
    """Strides over merged batch dims ``sizes`` of a dense buffer of ``prod(sizes)``
    rows of ``inner`` elements each (e.g. an fp32 ``(batch, L, E)`` accumulator)."""
    out, acc = [], int(inner)
    for n in reversed(sizes):
        out.append(acc)
        acc *= int(n)
    return tuple(reversed(out))


# =========================================================================== launch plan
# The launch plan of one call: merged batch sizes, every operand's strides and the segment
# table, in the names of csrc/attn_params.h (AttnParams), computed here once for every
# kernel backend.  The CUDA binding only adds the data pointers (csrc/attn_params.h,
# unpack_params, reads `LaunchPlan.ints()`); the CPU-emulation tests feed the very same
# ints to the same unpack_params.  Nothing here depends on data pointers, so a plan can
# be cached per layout.

PLAN_VERSION = 2
MAX_SEGMENTS = 4
# Operands in attn_params.h's order (pointer i of unpack_params belongs to OPERANDS[i]).
OPERANDS = (("q", "k", "v", "o", "dout", "dq", "dk", "dv")
            + tuple(f"{n}{s}" for n in ("pk", "pv", "dpk", "dpv") for s in range(MAX_SEGMENTS)))
LOADED = ("q", "k", "v", "dout") + tuple(f"{n}{s}" for n in ("pk", "pv")
                                         for s in range(MAX_SEGMENTS))   # 16-byte cp.async
STORED = ("o", "dq", "dk", "dv")                                         # 16-byte stores
#: the pointers unpack_params reads: the operands, then lse and the backward's scratch
POINTERS = OPERANDS + ("lse", "delta", "part", "tickets")
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}                # attn_params.h DType
PLAN_HEADER = 16
PLAN_INTS = PLAN_HEADER + 5 * MAX_SEGMENTS + (MAX_BATCH_DIMS + 1) * len(OPERANDS)
SHORT_QUERIES = 16   # short_tiles: every segment has at most this many queries
#: seq_reps: at most this many sequences run in series in one warp (else: the ticket sum)
SEQ_REPS_MAX = 64


def contiguous_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(out))


def prompt_grad_shape(pk, pv) -> Tuple[int, ...]:
    """The one buffer, in the prompts' dtype, that receives a segment's prompt gradients
    (k at index 0, v at index 1): ``(2, *lead, P, E)`` where lead is the prompts' own
    (broadcast) batch shape.  The kernels sum the sequences that share a prompt row set
    themselves, in a fixed order, in every mode (csrc/attn_params.h prompt_part_offset)."""
    P, E = int(pk.shape[-2]), int(pk.shape[-1])
    return (2, *_broadcast(tuple(pk.shape[:-2]), tuple(pv.shape[:-2])), P, E)


def _broadcast(a: Tuple[int, ...], b: Tuple[int, ...]) -> Tuple[int, ...]:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    return tuple(max(x, y) for x, y in zip(a, b))


def leading_reps(kept: Sequence[int], reps: Sequence[int]) -> Optional[Tuple[int, int]]:
    """The rule both backends' prompt-gradient sums rest on.  Each batch dim is either kept
    by the prompts (``kept[i]`` its size, ``reps[i]`` 1) or broadcast by them (``reps[i]``
    its size, ``kept[i]`` 1); size-1 dims are 1 in both.  When every broadcast dim of size
    > 1 leads every kept one, the sequences sharing one prompt row set are ``b = r * GS + g``
    (r < R, g < GS): return ``(R, GS)``, the products of the broadcast and the kept sizes;
    else None (a broadcast dim inside a kept one)."""
    seen_kept, R, GS = False, 1, 1
    for k, r in zip(kept, reps):
        if k > 1:
            seen_kept, GS = True, GS * int(k)
        if r > 1:
            if seen_kept:
                return None
            R *= int(r)
    return R, GS


def seq_reps(pks, pvs, batch: Sequence[int]) -> int:
    """Sequences per prompt row set for the short backward's in-kernel prompt-gradient sum
    (attn_params.h ``seq_reps``), or 0 where it does not apply.  It applies when every
    segment with prompts is broadcast over the same batch dims and those dims (of size > 1)
    all lead the dims the prompts keep: then the sequences sharing a row set are
    ``b = r * (nseq / R) + g`` (R = product of the broadcast dims; the temporal stage:
    prompts (N, H, P, E) over batch (B, N, H), R = B), and R <= :data:`SEQ_REPS_MAX` (one
    warp runs them in series).  No segment with prompts: 0."""
    n = len(batch)
    pattern = None
    for pk, pv in zip(pks, pvs):
        if pk is None or pk.shape[-2] == 0:
            continue
        lead = _broadcast(tuple(pk.shape[:-2]), tuple(pv.shape[:-2]))
        if len(lead) > n:
            return 0
        lead = (1,) * (n - len(lead)) + lead
        red = tuple(int(lead[i] == 1 and batch[i] > 1) for i in range(n))
        if pattern is not None and red != pattern:
            return 0
        pattern = red
    if pattern is None:
        return 0
    split = leading_reps([1 if red else int(nb) for red, nb in zip(pattern, batch)],
                         [int(nb) if red else 1 for red, nb in zip(pattern, batch)])
    return split[0] if split is not None and split[0] <= SEQ_REPS_MAX else 0


def finish_prompt_grads(buf, pk, pv):
    """(dpk, dpv) in the prompts' shapes from a :func:`prompt_grad_shape` buffer: views of
    its halves where they have the prompts' shapes (the usual case: no kernel); else
    (prompt_k and prompt_v broadcast differently) the remaining broadcast dims are summed
    in fp32."""
    out = []
    for g, t in ((buf[0], pk), (buf[1], pv)):
        if tuple(g.shape) == tuple(t.shape):
            out.append(g)
        else:
            out.append(g.float().sum_to_size(t.shape).to(t.dtype))
    return out[0], out[1]


class LaunchPlan:
    """Everything about a call that does not depend on the data: see the section comment.

    Attributes (attn_params.h names): ``bsize`` (4 merged batch sizes), ``nseq``,
    ``strides[name]`` = (4 batch strides, row stride) in elements for every operand of
    :data:`OPERANDS` that is present (absent ones: all 0), ``Lq``, ``nseg``,
    ``q_start``/``q_len``/``k_start``/``k_len``/``n_prompt`` (4 each), ``head_dim``,
    ``dtype`` (code), ``scale``, ``vec16``/``vec16_out`` (every stride of the loaded /
    stored operands allows 16-byte accesses; the pointers are checked where they are known),
    ``short_tiles`` (every segment <= 16 queries), ``atomic_prompt_grads``, and
    ``grad_shapes[s]`` (:func:`prompt_grad_shape`, None for a segment without prompts)."""

    def __init__(self, q, k, v, pks, pvs, q_segments, k_segments, scale, *, out=None,
                 dout=None, dq=None, dk=None, dv=None, backward=False):
        batch = tuple(int(n) for n in q.shape[:-2])
        nb = len(batch)
        E = int(q.shape[-1])
        nseg = len(q_segments)
        if nseg > MAX_SEGMENTS:
            raise ValueError(f"segments: at most {MAX_SEGMENTS} segments, got {nseg}")
        self.Lq, self.head_dim, self.nseg = int(q.shape[-2]), E, nseg
        self.dtype = DTYPE_CODES.get(str(q.dtype).replace("torch.", ""), -1)
        self.elsize = q.element_size()
        self.scale = float(scale)
        # the short fp16/bf16 backward (seq_bwd_kernel) sums the prompt gradients of the
        # sequences sharing a prompt row set in one warp, as a running sum
        short = (max(int(n) for n in q_segments) <= SHORT_QUERIES) if nseg else True
        self.seq_reps = (seq_reps(pks, pvs, batch) if backward and short
                         and str(q.dtype) in ("torch.float16", "torch.bfloat16") else 0)
        # prompt gradients are summed in a fixed order in every mode (no atomics, so
        # torch.use_deterministic_algorithms changes nothing here): always 0
        self.atomic_prompt_grads = 0
        # operands as (name, shape, strides) broadcast to the batch
        ops = [("q", q.shape, q.stride()), ("k", k.shape, k.stride()),
               ("v", v.shape, v.stride())]
        for name, t in (("o", out), ("dout", dout), ("dq", dq), ("dk", dk), ("dv", dv)):
            if t is not None:
                ops.append((name, t.shape, t.stride()))
        self.n_prompt = [0] * MAX_SEGMENTS
        self.grad_shapes: List[Optional[Tuple[int, ...]]] = [None] * nseg
        for s, (pk, pv) in enumerate(zip(pks, pvs)):
            if pk is None or pk.shape[-2] == 0:
                continue
            P = int(pk.shape[-2])
            self.n_prompt[s] = P
            for name, t in ((f"pk{s}", pk), (f"pv{s}", pv)):
                ops.append((name, (*batch, P, E), _expand_strides(t, batch)))
            if backward:
                shp = prompt_grad_shape(pk, pv)
                self.grad_shapes[s] = shp
                st = contiguous_strides(shp)[1:]
                lead = shp[1:-2]
                for name in (f"dpk{s}", f"dpv{s}"):
                    ops.append((name, (*batch, P, E),
                                _expand_strides_of(lead, st, batch)))
        sizes, merged = merge_batch_dims(batch, [tuple(st[:nb]) for _, _, st in ops],
                                         what="q")
        self.bsize = tuple(sizes)
        nseq = 1
        for n in batch:
            nseq *= n
        self.nseq = nseq
        self.strides = {n: (0,) * (MAX_BATCH_DIMS + 1) for n in OPERANDS}
        for (name, shape, st), bst in zip(ops, merged):
            self.strides[name] = tuple(bst) + (0 if shape[-2] <= 1 else int(st[-2]),)
        self.present = tuple(name for name, _, _ in ops)
        # segment table
        self.q_start, self.q_len, self.k_start, self.k_len = ([0] * MAX_SEGMENTS for _ in range(4))
        a = b = 0
        for s in range(nseg):
            self.q_start[s], self.q_len[s] = a, int(q_segments[s])
            self.k_start[s], self.k_len[s] = b, int(k_segments[s])
            a, b = a + int(q_segments[s]), b + int(k_segments[s])
        self.short_tiles = int(max(q_segments) <= SHORT_QUERIES) if nseg else 1

        def aligned(names):
            return int(all((x * self.elsize) % 16 == 0 for n in names if n in self.present
                           for x in self.strides[n]))
        self.vec16, self.vec16_out = aligned(LOADED), aligned(STORED)

    def ints(self) -> List[int]:
        """The plan as csrc/attn_params.h's unpack_params reads it (PLAN_INTS int64s)."""
        scale_bits = struct.unpack("<i", struct.pack("<f", self.scale))[0]
        out = [PLAN_VERSION, self.nseq, *self.bsize, self.Lq, self.nseg, self.head_dim,
               self.dtype, self.vec16, self.vec16_out, self.short_tiles,
               self.atomic_prompt_grads, scale_bits, self.seq_reps]
        out += [0] * (PLAN_HEADER - len(out))
        for s in range(MAX_SEGMENTS):
            out += [self.q_start[s], self.q_len[s], self.k_start[s], self.k_len[s],
                    self.n_prompt[s]]
        for name in OPERANDS:
            out += list(self.strides[name])
        assert len(out) == PLAN_INTS
        return out


def _expand_strides(t, batch: Sequence[int]) -> Tuple[int, ...]:
    """Strides of ``t.expand(*batch, *t.shape[-2:])`` (no tensor made)."""
    return _expand_strides_of(tuple(t.shape[:-2]), tuple(t.stride()[:-2]), batch) + \
        tuple(t.stride()[-2:])


def _expand_strides_of(lead: Sequence[int], lead_strides: Sequence[int],
                       batch: Sequence[int]) -> Tuple[int, ...]:
    n = len(batch)
    lead, lst = tuple(lead), tuple(lead_strides)
    if len(lead) > n:
        raise ValueError(f"prompt: {len(lead)} leading dims, more than q's batch {tuple(batch)}")
    pad = n - len(lead)
    out = []
    for i in range(n):
        j = i - pad
        out.append(0 if j < 0 or lead[j] == 1 else int(lst[j]))
    return tuple(out) + tuple(lst[len(lead):])
