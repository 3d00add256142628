"""The ``triton`` backend of ``prompted_attention``.

Design note
-----------
Kernels: ``avstfp_fast/kernels/prompted_attention.py``.  Forward (one launch): one
online-softmax pass per query block over its sequence's token keys/values and then the
prompt keys/values as one key source (the prompts share the last key tile where they
fit), read in place: nothing is concatenated, expanded, permuted or padded.

Backward, short sequences (the tile table's ``bwd == "seq"``: every AV-STFP stage): the
*sequence-owning* kernel, one program per (sequence group, segment), so no other program
touches its sequences' gradients: it computes ``delta`` itself, writes dq once in the
input dtype and the caller's layout (no fp32 accumulator, no zero fill, no copy) and dk,
dv once each.  Spatial/fusion: a query-outer pass (S, dP, dQ) and a key-outer pass (S,
dP, dV, dK; 7 products per tile pair); the prompt rows' dk/dv are summed on chip over
the NS sequences a program owns (sequences sharing their prompts; spatial: NS = 2) into
one fp32 partial per program, then summed over the batch in a fixed order and cast by
``prompted_attn_pgrad`` (2 launches).  Packed one-tile sequences (temporal: 10 queries,
10 keys + 2 prompts in 16 slots): one step, 5 products; with prompts broadcast over the leading batch dims a
program walks all sequences of one prompt row set and writes their prompt gradient
directly (1 launch).  No atomics: bit-exact, so ``deterministic=True`` takes the same
path.

Backward, long sequences (``bwd == "fa2"``): a small kernel computing ``delta = rowsum(do
* o)``, then ONE pass per key block (token blocks, then prompt blocks) computing dk/dv and
adding ``scale * ds^T k`` into an fp32 dq accumulator with atomics -- 5 matrix products
per tile pair (S, dP, dV, dK, dQ), as FlashAttention-2.  ``deterministic=True``: a dq pass
(which also stores the per-program prompt-gradient partials) and a dk/dv pass, no
atomics -- S and dP are computed twice (7 products), bit-exact across runs.

*Operand descriptors.*  Each operand is a base pointer plus a stride tuple (4 merged
batch strides + the sequence stride; the head dim must have stride 1); per-segment
lengths, prompt pointers, prompt strides and prompt counts are small tuples, one entry
per segment (up to 4).  The temporal view (sequence = frames M, batch = (B, N, H)) and
the spatial/fusion view (sequence = tokens, batch = (B, M, H)) of one
``(B, M, N, 3, H, d)`` QKV buffer are different stride sets.  Batch dims are merged once
(``ops/layout.py``: size-1 dims dropped, dims every operand lays out densely merged, at
most 4 remain); the kernel recovers batch coordinates by div/mod.  Everything that does
not change with the data pointers (merged dims, strides, tiles, grid) is cached per
layout (:class:`_Plan`, with the launches' fixed argument runs), and eager calls run the
compiled kernel's launcher directly (``ops/launch_cache.py``); the op's eager path of a
validated layout (:class:`_Bound`) passes q/k/v and dq/dk/dv as addresses, so an eager
call builds no views (``bench/test_triton_host.py``: the public op's forward ~11-14 µs
of host time, backward ~32-38 µs, autograd included).  Traced calls (torch.compile) go
through the custom ops below.

*Grid.*  Axis 0 = ``group * blocks + block``: the query (or key) blocks of one sequence
group are adjacent, so they run at the same time and share its K/V in L2; limit 2^31-1
(batch products above 65535 are fine).  Segments: the forward lays each group's segment
blocks end to end on axis 0 (no empty programs), the sequence-owning backward uses
``group * segments + segment``, the fa2 kernels axis 1.

*Tiles.*  A small table of shape classes (:class:`_Tiles`), chosen per call from the
lengths, never autotuned; ``AVSTFP_PRINT_TILES=1`` prints the choice for each new
layout.  ``packed`` (Lq <= 32, Lk <= 64; the temporal stage, 10 queries, 10+2 keys): G
sequences share a 64-row tile, each multiplied only with its own keys (batched 3-D
dots; SLOT_M = max(16, next_pow2(Lq)), G = 64 / SLOT_M, key/prompt slots >= 16).  ``short-q`` (Lq <= 32 over longer keys): one sequence, keys in full
64-row blocks.  ``long`` (spatial, fusion): 64 x 64.  fp32 uses IEEE dots (no tf32) and
one pipeline stage; head dim 128 uses 8 warps.  Shared memory, registers and the wgmma /
cp.async lowering of every variant the stage shapes use are checked at compile time for
sm_90 by ``bench/static_sm90.py`` (run in CI).

*Prompts.*  ``prompt_k``/``prompt_v`` are a second key/value source addressed through
their broadcast strides (stride 0 over batch dims they are shared in).  Their gradients
are reduced without atomics on the sequence-owning path (fp32 partials, one per program
-- ``(2, *batch, P, E)``, or ``(2, C, GS, P, E)`` when a program owns NS > 1 sequences
sharing a prompt row set -- summed by ``prompted_attn_pgrad`` over the dims the prompt is
broadcast over, in a fixed order, or summed on chip and written directly, see above).
fa2 path: default, relaxed fp32 atomics into a buffer of the prompt's own (un-broadcast)
shape addressed through the broadcast strides; deterministic, each dq-pass program stores
its partial at ``[b, block]`` of a ``(2, *batch, n_blocks, P, E)`` buffer, summed
afterwards in a fixed order.

*Floors* (bytes and executed FLOPs per stage and tile): ``bench/floors.py`` and
``docs/design.md``, "Floors: bytes and FLOPs".

*CPU.*  With ``TRITON_INTERPRET=1`` set before the kernels are first imported, CPU
tensors run in the Triton interpreter (fp32/fp16 only); loops over run-time lengths are
then ``while`` loops (Triton 3.6's interpreter fails on run-time ``range`` bounds with
NumPy 2).
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

from .backends import Capabilities, KernelBackend, env_reader, register
from .contract import AttnProblem
from .launch_cache import launch
from .layout import MAX_BATCH_DIMS, dense_strides, leading_reps, merge_batch_dims

MAX_SEGMENTS = 4
#: The sequence-owning backward's bounds (see :class:`_Tiles`): rows of a sequence
#: (queries, and keys + prompts) and bytes one program re-reads from L2 (2 x rows x d x
#: element size: bf16 d 64 allows 768 rows, d 128 384; fp32 d 128 192).
SEQ_MAX_ROWS = 384
SEQ_MAX_BYTES = 192 * 1024
#: Direct prompt gradients of packed one-step sequences (see :class:`_Plan`) only with at
#: least this many programs (prompt row sets): ViT-B/16 temporal has 2952.
DIRECT_MIN_PROGRAMS = 512
#: Otherwise the sequence-owning backward reduces per-sequence fp32 partials of the prompt
#: gradients; it is chosen only while they add at most this share to the backward's
#: minimum bytes (ViT-B/16 spatial 8%, fusion 0.8%); above (e.g. 2 prompts on 10 + 10
#: rows and no direct mode: 20%), the fa2 path's atomics into the prompt's own shape.
SEQ_MAX_PARTIAL = 0.10
#: Multi-tile sequences (spatial, fusion) whose per-sequence partials would add more than
#: this share: a program walks up to SEQ_MAX_PER_PROGRAM sequences sharing one prompt row
#: set and keeps one partial for them (:func:`_seq_per_program`).
SEQ_PARTIAL_TARGET = 0.05
SEQ_MAX_PER_PROGRAM = 4
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (32, 64, 128)
_KMOD = "avstfp_fast.kernels.prompted_attention"
_LOG2E = 1.4426950408889634
#: Backward scheme of the default (non-deterministic) mode of the long-sequence ("fa2")
#: path; ``bench/floors.py`` names.  (Short sequences: see ``_Tiles.bwd``.)
BACKWARD_SCHEME = "fused"


#: AVSTFP_TRITON_BWD as the backward's plan keys hold it (a forced path is a new plan)
_forced_path = env_reader("AVSTFP_TRITON_BWD")


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
    return mod.INTERPRETED


def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# --------------------------------------------------------------------------- tiles
class _Tiles:
    """Tile configuration of one shape class (the table in the design note).

    ``packed``   Lq <= 32 and Lk <= 64 (temporal: 10 queries, 10 + 2 keys): G short
                 sequences share one 64-row tile (SLOT_M = max(16, next_pow2(Lq)),
                 G = 64 / SLOT_M), keys/prompts SLOT_N/SLOT_P >= 16 slots per sequence
                 (16..wide/G); products are per sequence (batched 3-D dots, mma.sync).
                 Head dim 128: G = 1 (batched products of several sequences spill).
    ``short-q``  Lq <= 32, Lk > 64 (one or a few queries over long keys): one sequence
                 per program, max(16, next_pow2(Lq)) query rows, keys in full 64-row
                 blocks (packing would advance only a couple of keys per step).
    ``long``     Lq > 32 (spatial, fusion): 64 queries x 64 keys, one sequence.
    Prompt tiles: next_pow2(P) clamped to the key tile's bounds.  Head dim 128 uses 8
    warps (4 for tiles of fewer than 64 query rows); fp32 (IEEE FMA dots, no tensor cores) one pipeline stage and key tiles of at
    most 64 rows, so shared memory stays under ~160 KB (sm_80 and sm_90).
    ``slot_kp``: the key tile of the kernels that walk keys + prompts as one source.
    Backward path ``bwd``: ``"seq"`` (sequence-owning) while a sequence has at most
    SEQ_MAX_ROWS queries and keys + prompts and 2 x rows x d x element size <=
    SEQ_MAX_BYTES, else ``"fa2"``; ``bwd_one``: packed sequences that are one tile
    (one backward step).  Multi-tile ``"seq"`` programs own NS sequences that share their
    prompts (one fp32 prompt partial for all of them): NS from :func:`_seq_per_program`
    (the wave and byte arithmetic is there; spatial stage: 2)."""

    def __init__(self, max_q: int, max_k: int, max_p: int, head_dim: int, dtype):
        wide = 64 if (dtype == torch.float32 or head_dim >= 128) else 128
        if max_q <= 32 and max_k <= 64:
            self.kind = "packed"
            self.slot_m = max(16, _p2(max(max_q, 1)))     # 16-row MMA granularity
            # head dim 128: one sequence per program (plain 2-D products); the batched
            # products of several sequences need more than 255 registers there and spill
            # ~1.4 KB in the fused backward (offline sm_90 compile)
            self.g = 1 if head_dim >= 128 else 64 // self.slot_m
            # per-sequence (batched) products: a key slot is the K of the p v product,
            # which tensor cores need >= 16 (16-bit) -- 16..wide/G keys per sequence
            lo, hi = 16, max(16, wide // self.g)
        elif max_q <= 32:
            self.kind, self.slot_m, self.g, lo, hi = "short-q", max(16, _p2(max_q)), 1, 64, 64
        else:
            self.kind, self.slot_m, self.g, lo, hi = "long", 64, 1, 64, 64
        clamp = lambda n, lo=lo: min(max(_p2(max(n, 1)), lo), max(lo, hi))   # noqa: E731
        self.slot_n = clamp(max_k)
        self.slot_p = clamp(max_p, 16)
        # key tile of the sequence-owning backward, which walks a sequence's keys and then
        # its prompts as one source (the prompts share the last key tile where they fit)
        self.slot_kp = clamp(max_k + max_p)
        # 8 warps at head dim 128, except a 16/32-row tile (one packed sequence or a few
        # queries per program): a 16 x 128 packed forward at 8 warps compiled to 94
        # registers under Triton 3.6, 2 CTAs/SM (3.8: 80, 3); at 4 warps 68-71, 7 under both
        self.num_warps = 8 if head_dim >= 128 and self.g * self.slot_m >= 64 else 4
        self.num_stages = 1 if dtype == torch.float32 else 2
        # backward kernels (fused, and dk/dv of the deterministic mode) hold dk, dv in fp32
        # plus transposed score tiles.  Head dim 64: 4 warps (8 barely lower the
        # registers: the 64-row wgmma tile is split by columns, and halve the CTAs/SM);
        # head dim 128: 8 warps (4 spill).  Packed tiles walk one query block per key
        # block, so they gain nothing from pipelining; one stage keeps them at ~240
        # registers without spills (two stages: 255 + spills).
        self.bwd_warps = 8 if head_dim >= 128 else 4
        self.bwd_stages = 1 if self.kind == "packed" else self.num_stages
        # The fused backward walks queries in 32-row tiles when G == 1: at 64 it needs
        # 220 registers (Triton 3.8) and spills under 3.6 (255 + 308 B); at 32, 158 / 182
        # and no spills.  Its dq product then has 32 rows (mma.sync; the other four
        # products keep 64 key rows and stay on wgmma).
        self.bwd_slot_m = 32 if self.g == 1 else self.slot_m
        # Backward path.  "seq" (the sequence-owning backward, one program per sequence
        # group and segment, one launch, no dq accumulator) when a sequence is short:
        # at most SEQ_MAX_ROWS queries and keys + prompts (6 tiles of 64: every AV-STFP
        # stage, ViT-L/14 fusion's 321 + 2 included), and
        # the rows one program re-reads while it walks the other side (its K, V and
        # prompts in the query pass, its Q and dO in the key pass) within SEQ_MAX_BYTES,
        # so that ~264 resident programs (2 per SM) re-read them from L2, not DRAM.
        # Otherwise "fa2": the key-block-parallel fused backward (or, deterministic, the
        # two-pass one), which spreads a long sequence over many programs.
        # AVSTFP_TRITON_BWD=seq|fa2 forces a path (tests of the boundary).
        elem = 4 if dtype == torch.float32 else 2
        rows = max(max_q, max_k + max_p)
        fits = rows <= SEQ_MAX_ROWS and 2 * rows * head_dim * elem <= SEQ_MAX_BYTES
        force = os.environ.get("AVSTFP_TRITON_BWD", "auto")
        if force in ("seq", "fa2"):
            fits = force == "seq"
        self.bwd = "seq" if fits else "fa2"
        # "seq" on packed tiles whose sequences are one query tile and one key tile (the
        # temporal stage: 10 queries, 10 keys + 2 prompts in 16 slots): a single step,
        # S and dP computed once (5 products), nothing carried across loops
        self.bwd_one = fits and self.kind == "packed" and max_k + max_p <= self.slot_kp
        # a packed forward whose keys + prompts are one tile walks one step: nothing to
        # pipeline, and one stage keeps Triton 3.6 at 3 CTAs/SM (167 registers; 2 stages:
        # 172, 2 CTAs/SM; Triton 3.8: 168 either way)
        self.fwd_stages = (1 if self.kind == "packed" and max_k + max_p <= self.slot_kp
                           else self.num_stages)

    def describe(self) -> str:
        return (f"{self.kind}: G={self.g} SLOT_M={self.slot_m} SLOT_N={self.slot_n} "
                f"SLOT_P={self.slot_p} num_warps={self.num_warps} "
                f"num_stages={self.num_stages} (backward {self.bwd}: {self.bwd_stages} stages, "
                f"{self.bwd_slot_m}-row query tiles)")


def _direct_shape(batch, q, pks, pvs, t: _Tiles, nseg: int) -> bool:
    """Whether the sequence-owning backward can write the prompt gradients directly (see
    ``_Plan``): packed one-step tiles, one segment with prompts of q's dtype, pk and pv
    shaped alike, broadcast only over leading batch dims, and enough prompt row sets."""
    pk, pv = pks[0], pvs[0]
    if not (t.bwd_one and nseg == 1 and pk is not None and pk.shape[-2] > 0
            and pk.dtype == q.dtype == pv.dtype):
        return False
    lead = tuple(torch.broadcast_shapes(pk.shape[:-2], pv.shape[:-2]))
    if tuple(pk.shape[:-2]) != lead or tuple(pv.shape[:-2]) != lead or len(lead) > len(batch):
        return False
    full = (1,) * (len(batch) - len(lead)) + lead
    split = leading_reps([nb if nl == nb else 1 for nb, nl in zip(batch, full)],
                         [1 if nl == nb else nb for nb, nl in zip(batch, full)])
    return split is not None and split[1] >= DIRECT_MIN_PROGRAMS


def _partial_share(q, pks, q_segments, k_segments) -> float:
    """Bytes of the per-sequence prompt-gradient partials (fp32 dpk and dpv rows, written
    and read) over the backward's minimum bytes (~8 rows of d elements per query and key
    row: q, o, do, dq; k, v, dk, dv): 4 P / (elem (Lq + Lk))."""
    P = sum(0 if pk is None else pk.shape[-2] for pk in pks)
    return 4.0 * P / (q.element_size() * max(1, sum(q_segments) + sum(k_segments)))


def _seq_per_program(share: float, r: int) -> int:
    """Sequences per program of the multi-tile sequence-owning backward (spatial, fusion):
    1 while the per-sequence prompt partials add at most SEQ_PARTIAL_TARGET (``share``,
    see :func:`_partial_share`), else the fewest (<= SEQ_MAX_PER_PROGRAM, <= r, the
    sequences sharing one prompt row set) that bring them under it.

    Waves (132 SMs x 2 CTAs/SM at head dim 64, bench/results/static-sm90.md), batch 8,
    both segments:
      ViT-B/16 spatial, Bt 960 = 80 x 12 heads, share 8.1%: 1 -> 1920 programs, 7.3
        waves; 2 -> 960, 3.64 waves (91% of the last one busy); 4 -> 480, 1.82 (91%);
      ViT-L/14 spatial, Bt 1280 = 80 x 16 heads, share 6.2%: 2 -> 1280, 4.85 waves
        (97%); 4 -> 640, 2.42 (81%);
      fusion, share < 1%: 1 (960 / 1280 programs).
    Bytes: the ledger charges the partials (fp32, (2, programs, P, d) per segment) one
    write + one read in each of the 2 kernels: ViT-B/16 spatial 39.3 MB at 1 (16% of the
    242.9 MB minimum), 19.7 MB at 2 (8.1%; + 1.9 MB deltas = 8.9%), 9.8 MB at 4; ViT-L/14
    52.4 MB at 1, 26.2 at 2 (+ 3.3 MB deltas = 7.0% of 422.5 MB).  2 meets the 10% bound
    with the better waves; more would shorten the grid below ~2 waves for little.
    Registers: NS > 1 compiles to 254-255 registers, no spills, 2 CTAs/SM under Triton
    3.8 and 3.6 (its query pass unpipelined, see ``_Plan.seq_st1``)."""
    n = 1
    while share / n > SEQ_PARTIAL_TARGET and n < min(SEQ_MAX_PER_PROGRAM, r):
        n += 1
    return n


def tile_for(p: AttnProblem) -> _Tiles:
    """The tile configuration the launchers use for problem ``p``."""
    return _Tiles(max(p.q_segments), max(p.k_segments),
                  max([0] + [t.shape[-2] for t in p.prompt_k if t is not None]),
                  p.head_dim, p.dtype)


# --------------------------------------------------------------------------- launch plans
def _st(bstr, t) -> Tuple[int, ...]:
    """Descriptor strides of t (*batch, L, E): 4 merged batch strides + the sequence stride."""
    return tuple(bstr) + (t.stride(-2),)


def _layout_key(t: Optional[torch.Tensor]):
    return None if t is None else (t.shape, t.stride())


class _Plan:
    """Everything about a call that does not change with the data pointers: merged
    batch dims, descriptor strides, grid, tiles.  Built once per layout (cached)."""

    def __init__(self, q, k, v, out, pks, pvs, q_segments, k_segments, scale, dout=None,
                 dq=None, dk=None, dv=None, deterministic=False):
        self.batch = batch = tuple(q.shape[:-2])
        nb = len(batch)
        self.Lq, self.E = q.shape[-2], q.shape[-1]
        self.Bt = int(torch.Size(batch).numel())
        self.nseg = len(q_segments)
        self.P = [0 if pk is None else pk.shape[-2] for pk in pks]
        self.t = t = _Tiles(max(q_segments), max(k_segments), max([0] + self.P), self.E,
                            q.dtype)
        ex = []                                    # prompts broadcast to (*batch, P, E)
        for pk, pv in zip(pks, pvs):
            if pk is not None:
                ex += [pk.expand(*batch, *pk.shape[-2:]), pv.expand(*batch, *pv.shape[-2:])]
        if dout is None:
            tens = [q, k, v, out]
        else:
            tens = [q, k, v, out, dout, dq, dk, dv]
        # per-segment prompt-gradient buffers: (2, *lead, P, E) fp32, broadcast like pk
        # (fused backward: atomics); (2, *batch, P, E), one partial per sequence (the
        # sequence-owning backward); (2, *batch, blocks, P, E) (two-pass)
        self.seq = seq = dout is not None and t.bwd == "seq" and (
            os.environ.get("AVSTFP_TRITON_BWD") == "seq"
            or _direct_shape(batch, q, pks, pvs, t, len(q_segments))
            or _partial_share(q, pks, q_segments, k_segments) <= SEQ_MAX_PARTIAL)
        part = deterministic or seq
        self.gshape, gviews = [], []
        for s, (pk, pv) in enumerate(zip(pks, pvs)):
            if pk is None or self.P[s] == 0:
                self.gshape.append(None)
                continue
            P = self.P[s]
            if seq:
                shp = (2, *batch, P, self.E)
            elif deterministic:
                nblk = cdiv(q_segments[s], t.slot_m)
                shp = (2, *batch, nblk, P, self.E)
            else:
                lead = torch.broadcast_shapes(pk.shape[:-2], pv.shape[:-2])
                shp = (2, *lead, P, self.E)
            self.gshape.append(shp)
            g = torch.empty(shp, dtype=torch.float32, device="meta")
            gviews.append(g[0] if part else g[0].expand(*batch, P, self.E))
        # sequence-owning backward: the prompt gradients (*lead, P, E), dense, in the
        # prompt's dtype (fp32 where pk and pv broadcast differently: summed further on
        # the host), written by the reduction kernel; their views over the batch keep
        # apart the dims they are broadcast over when merging
        self.pg_lead, self.pg_direct, oviews = [], [], []
        for s, (pk, pv) in enumerate(zip(pks, pvs)):
            if not seq or self.gshape[s] is None:
                self.pg_lead.append(None)
                self.pg_direct.append(False)
                continue
            lead = tuple(torch.broadcast_shapes(pk.shape[:-2], pv.shape[:-2]))
            self.pg_lead.append(lead)
            self.pg_direct.append(tuple(pk.shape[:-2]) == lead == tuple(pv.shape[:-2]))
            oviews.append(torch.empty((*lead, self.P[s], self.E), device="meta")
                          .expand(*batch, self.P[s], self.E))
        bs, st = merge_batch_dims(batch, [x.stride()[:nb] for x in tens + ex + gviews
                                          + oviews])
        o = len(tens) + len(ex) + len(gviews)
        self.pg_ks, self.pg_rs, self.pg_rows = [], [], 0
        for s in range(len(pks)):
            if self.pg_lead[s] is None:
                self.pg_ks.append((0,) * 5)
                self.pg_rs.append((0,) * 5)
                continue
            so = st[o]
            o += 1
            ks = tuple(n if x != 0 else 1 for n, x in zip(bs, so)) + (0,)
            rs = tuple(n if x == 0 else 1 for n, x in zip(bs, so)) + (0,)
            self.pg_ks.append(ks)
            self.pg_rs.append(rs)
            self.pg_rows = max(self.pg_rows, ks[0] * ks[1] * ks[2] * ks[3])
        # Packed one-step sequences whose prompts are broadcast over the leading batch
        # dims only (the temporal stage: prompts (N, H, P, d) over batch (B, N, H)): each
        # program owns the R = B sequences of one prompt row set, one per step, and writes
        # their summed prompt gradient directly (one launch, no partials).  Needs enough
        # programs (GS >= DIRECT_MIN_PROGRAMS).
        self.direct, self.gs, self.nit, self.ns = False, 0, 0, 1
        if (seq and t.bwd_one and self.nseg == 1 and self.pg_lead[0] is not None
                and self.pg_direct[0] and pks[0].dtype == q.dtype == pvs[0].dtype):
            R, GS = leading_reps(self.pg_ks[0][:4], self.pg_rs[0][:4]) or (0, 0)
            if GS >= DIRECT_MIN_PROGRAMS:
                # one sequence per step (G = 1, 16-row tiles, 8 steps at batch 8): with
                # G = 4 the prompt-gradient sums carried across steps spill (offline sm_90
                # compile: 255 registers + 32 B; G = 1: 128 registers, 4 CTAs/SM)
                self.direct, self.gs, self.nit = True, GS, R
        # Spatial / fusion (multi-tile sequences, G = 1): a program may own NS sequences
        # that share their prompts and sum their prompt rows' dk, dv into one partial (see
        # :func:`_seq_per_program`): program c GS + g owns sequences (c NS + i) GS + g,
        # which needs the dims the prompts are broadcast over (R sequences) to lead the
        # kept ones (GS) and every prompted segment broadcast alike.  NS = GS = 1: one
        # sequence per program.
        self.pg_bs, self.seq_groups = None, cdiv(self.Bt, t.g)
        if seq and not t.bwd_one:
            self.gs = 1
            sets = {(self.pg_ks[s][:4], self.pg_rs[s][:4]) for s in range(len(pks))
                    if self.pg_lead[s] is not None}
            if t.g == 1 and len(sets) == 1:
                (ks, rs), = sets
                split = leading_reps(ks, rs)
                R, GS = split or (1, 1)
                n = (_seq_per_program(_partial_share(q, pks, q_segments, k_segments), R)
                     if split is not None else 1)
                if n > 1:
                    C = cdiv(R, n)
                    self.gs, self.ns, self.seq_groups = GS, n, C * GS
                    # partials (2, C, GS, P, E): reduced over C by prompted_attn_pgrad
                    self.pg_bs = (1, C, GS, C * GS)
                    for s in range(len(pks)):
                        if self.pg_lead[s] is not None:
                            self.pg_ks[s], self.pg_rs[s] = (1, 1, 1, GS, 0), (1, 1, C, 1, 0)
                    self.pg_rows = GS
        self.BS = (bs[1], bs[2], bs[3], self.Bt)
        self.sdqa = dense_strides(bs, self.Lq * self.E) + (self.E,)   # fp32 dq accumulator
        self.st = [_st(st[i], x) for i, x in enumerate(tens)]
        i, j = len(tens), len(tens) + len(ex)
        dummy = (0,) * 5
        self.spk, self.spv, self.sgr, self.gm, self.gkv = [], [], [], [], []
        for s, pk in enumerate(pks):
            if pk is None:
                self.spk.append(dummy)
                self.spv.append(dummy)
            else:
                self.spk.append(_st(st[i], ex[i - len(tens)]))
                self.spv.append(_st(st[i + 1], ex[i + 1 - len(tens)]))
                i += 2
            if self.gshape[s] is None:
                self.sgr.append(dummy)
                self.gm.append(0)
                self.gkv.append(0)
            else:
                g = torch.empty(self.gshape[s], dtype=torch.float32, device="meta")
                self.sgr.append(tuple(st[j]) + (g.stride(-2),))
                self.gm.append(g.stride(-3) if deterministic and not seq else 0)
                self.gkv.append(g.stride(0))
                j += 1
        if self.direct:          # the gradient itself, (2, *lead, P, E) in q's dtype
            self.gshape[0] = (2, *self.pg_lead[0], self.P[0], self.E)
            self.gkv[0] = self.gs * self.P[0] * self.E
        if self.pg_bs is not None:   # one partial per program: (2, C GS, P, E)
            for s in range(len(pks)):
                if self.gshape[s] is not None:
                    self.gshape[s] = (2, self.seq_groups, self.P[s], self.E)
                    self.gkv[s] = self.seq_groups * self.P[s] * self.E
        self.pg_bs = self.pg_bs or self.BS
        self.q_len, self.k_len = tuple(q_segments), tuple(k_segments)
        self.n_prompt = tuple(self.P)
        self.nqb = max(cdiv(n, t.slot_m) for n in q_segments)
        self.nqbs = tuple(cdiv(n, t.slot_m) for n in q_segments)   # per segment
        self.nkb = max(cdiv(n, t.slot_n) for n in k_segments)
        self.npb = max([0] + [cdiv(n, t.slot_p) for n in self.P])
        self.groups = cdiv(self.Bt, t.g)
        self.qk_scale, self.scale = scale * _LOG2E, scale
        self.const = dict(G=t.g, SLOT_M=t.slot_m, D=self.E, NSEG=self.nseg,
                          PREC="ieee" if q.dtype == torch.float32 else "tf32",
                          WHILE=interpreting(), num_warps=t.num_warps,
                          num_stages=t.num_stages)
        self.bwd_const = dict(self.const, num_warps=t.bwd_warps, num_stages=t.bwd_stages)
        # a sequence-owning program that walks several sequence groups (ns > 1) does not
        # software-pipeline its query pass (ST1 = 1; the key pass, 4 of the 7 products
        # over 7 query tiles per key tile at ViT-B/16, keeps 2 stages): both pipelined,
        # the walk spills (offline sm_90 compile, spatial d 64: Triton 3.6 bf16 128 B,
        # 3.8 fp16 8 B); so, 254-255 registers, no spills, 2 CTAs/SM under 3.8 and 3.6
        self.seq_st1 = t.bwd_stages if self.ns == 1 else 1
        self.launchers = {}            # kernel -> its cached launcher (ops/launch_cache.py)
        self.fwd_const = dict(self.const, num_stages=t.fwd_stages)
        # the per-segment argument lists go to every launch as tuples: build them once
        for a in ("spk", "spv", "sgr", "gm", "gkv", "pg_ks", "pg_rs"):
            if isinstance(getattr(self, a, None), list):
                setattr(self, a, tuple(getattr(self, a)))
        self.pg_sizes = tuple(n * self.E for n in self.P)
        # the reduction kernel's outputs: in q's dtype where every prompt gradient is
        # written as is (else fp32, summed and cast further on the host), their shapes,
        # and whether that is the prompt's own shape (no view needed)
        self.pg_all_direct = all(
            self.pg_direct[s] and pks[s].dtype == q.dtype and pvs[s].dtype == q.dtype
            for s in range(len(pks)) if self.pg_lead[s] is not None)
        self.pg_odt = q.dtype if self.pg_all_direct else torch.float32
        self.pg_oshape = tuple(None if ld is None else (*ld, self.P[s], self.E)
                               for s, ld in enumerate(self.pg_lead))
        self._launch_args(dout is not None)
        if os.environ.get("AVSTFP_PRINT_TILES", "0") == "1":
            print(f"avstfp_fast triton: batch={batch} Lq={self.Lq} segments={self.q_len}/"
                  f"{self.k_len} prompts={self.n_prompt} E={self.E} {q.dtype} -> {t.describe()}"
                  + ("" if dout is None else
                     f"; backward path {'seq' if self.seq else 'fa2'}"
                     + (" (direct prompt gradients)" if self.direct else "")),
                  file=sys.stderr)

    def _launch_args(self, backward: bool) -> None:
        """The launches' arguments that are fixed by the layout, as the tuple runs that
        go between the pointers (built once; the full path and the eager one,
        :class:`_Bound`, join the same runs)."""
        self.lse_shape = (*self.batch, self.Lq)
        self.fwd_mid = tuple(self.st[:4])                           # sq, sk, sv, so
        self.fwd_tail = (self.spk, self.spv, self.n_prompt, self.q_len, self.k_len, self.nqbs,
                         self.BS, self.Lq, self.qk_scale)
        self.fwd_grid = (self.groups * sum(self.nqbs),)
        if not backward:
            return
        t = self.t
        self.seq_mid = tuple(self.st)                 # sq sk sv so sdo sdq sdk sdv
        self.seq_p = (self.spk, self.spv, self.n_prompt)
        self.seq_tail = (self.sgr, self.gkv, self.q_len, self.k_len, self.BS, self.Lq,
                         self.qk_scale, self.scale, self.gs, self.nit)
        self.seq_grid = (self.gs if self.direct else self.seq_groups * self.nseg,)
        self.seq_kw = dict(SLOT_MB=t.bwd_slot_m, SLOT_N=t.slot_kp, HAS_P=self.npb > 0,
                           NS=self.ns, ST1=self.seq_st1, ONE=t.bwd_one, DIRECT=self.direct,
                           **(dict(self.bwd_const, G=1) if self.direct else self.bwd_const))
        self.pg_tail = (self.n_prompt, self.pg_ks, self.pg_rs, self.pg_bs, self.pg_sizes)
        self.pg_grid = (self.pg_rows * max(self.P), self.nseg)
        self.pg_kw = dict(RB=16, D=self.E, NSEG=self.nseg, WHILE=interpreting(), num_warps=4)
        # the eager path's scratch (see _Bound.backward): delta and the per-program prompt
        # partials in ONE fp32 buffer, each part starting on a 16-byte boundary (the
        # binder's alignment), as (byte offset, shape) per part
        parts, n = [], 0
        for i, shp in enumerate([self.lse_shape] + list(self.gshape)):
            if shp is None or (i > 0 and self.direct):    # direct: q's dtype, see there
                parts.append(None)
                continue
            parts.append((4 * n, shp))
            n += -(-int(torch.Size(shp).numel()) // 4) * 4
        self.scratch_parts, self.scratch_numel = tuple(parts), n
        self.scratch_goffs = tuple(None if x is None else x[0] for x in parts[1:])
        # the prompt gradients the reduction writes: one buffer for all of them where
        # they are the prompts' own shape and dtype and alike across segments
        oshapes = {shp for shp in self.pg_oshape if shp is not None}
        self.pg_one = (self.seq and not self.direct and self.pg_rows > 0
                       and self.pg_all_direct and len(oshapes) == 1)
        self.pg_count = sum(shp is not None for shp in self.pg_oshape)
        self.pg_oshape1 = next(iter(oshapes)) if self.pg_one else None

    def grid(self, blocks: int):
        return (self.groups * blocks, self.nseg)


_PLANS: Dict[tuple, _Plan] = {}
_MAX_PLANS = 256


def _plan(key, *args, **kw) -> _Plan:
    pl = _PLANS.get(key)
    if pl is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        pl = _PLANS[key] = _Plan(*args, **kw)
    return pl


def _ptrs(ts, dummy):
    return tuple(dummy if t is None else t for t in ts)


def _forward_impl(q, k, v, pks, pvs, q_segments, k_segments, scale, out, layout=None):
    # layout: the op's validated layout token (AttnProblem.layout), which fixes every
    # input's shape and strides; else they are read off the tensors
    if layout is not None:
        # the token is hashed by identity (cheap) and its key holds TRITON_INTERPRET
        pl = _plan(("f", layout, out.stride()), q, k, v, out, pks, pvs, q_segments,
                   k_segments, scale)
    else:
        pl = _plan(("f", q.dtype, q.device.type, interpreting(), _layout_key(q), k.stride(),
                    v.stride(), k.shape[-2], out.stride(), tuple(map(_layout_key, pks)),
                    tuple(map(_layout_key, pvs)), tuple(q_segments), tuple(k_segments),
                    scale), q, k, v, out, pks, pvs, q_segments, k_segments, scale)
    lse = torch.empty(pl.lse_shape, dtype=torch.float32, device=q.device)
    if pl.Bt == 0 or pl.nqb == 0:
        return lse
    launch(_kernels().prompted_attn_fwd, pl.fwd_grid,
           (q, k, v, out, lse) + pl.fwd_mid + (_ptrs(pks, q), _ptrs(pvs, q)) + pl.fwd_tail,
           lambda: dict(SLOT_N=pl.t.slot_kp, **pl.fwd_const), pl.launchers)
    return lse


def _finish_grad(buf, pk, pv, per_block):
    g = buf.sum(-3) if per_block else buf              # (2, *lead or *batch, P, E)
    return (g[0].sum_to_size(pk.shape).to(pk.dtype, copy=True),
            g[1].sum_to_size(pv.shape).to(pv.dtype, copy=True))


def _backward_impl(q, k, v, pks, pvs, q_segments, k_segments, scale, out, lse, dout,
                   dq, dk, dv, deterministic, layout=None, placeholders=True, check=None):
    """Writes dq/dk/dv; returns (dpk_0.., dpv_0..) with MAX_SEGMENTS entries each: empty
    tensors where a segment has no prompts (``placeholders``, the custom op's fixed tuple)
    or None (eager calls).  ``check(dq, dk, dv)``: the write-layout check, run only when
    the call's plan is new (with a layout token, whose plan key holds their strides)."""
    K = _kernels()
    if dout.shape[-1] > 1 and dout.stride(-1) != 1:
        dout = dout.contiguous()        # e.g. the stride-0 gradient of out.sum()
    det = bool(deterministic)
    path = _forced_path()                                   # a forced path is a new plan
    if layout is not None:
        # (order: what _Bound.backward joins, a fixed prefix and the per-call rest)
        key = ("b", layout, out.stride(), dq.stride(), dk.stride(), dv.stride(), det, path,
               dout.stride())
        pl = _PLANS.get(key)
        if pl is None:
            if check is not None:
                check(dq, dk, dv)
            pl = _plan(key, q, k, v, out, pks, pvs, q_segments, k_segments, scale, dout, dq,
                       dk, dv, det)
    else:
        if check is not None:
            check(dq, dk, dv)
        pl = _plan(("b", det, path, q.dtype, q.device.type, interpreting(), _layout_key(q),
                    k.stride(), v.stride(), k.shape[-2], out.stride(), dout.stride(),
                    dq.stride(), dk.stride(), dv.stride(), tuple(map(_layout_key, pks)),
                    tuple(map(_layout_key, pvs)), tuple(q_segments), tuple(k_segments),
                    scale), q, k, v, out, pks, pvs, q_segments, k_segments, scale, dout, dq,
                   dk, dv, det)
    t = pl.t
    dev = q.device
    if pl.direct and pl.Bt > 0:       # dpk, dpv themselves (separate: the custom op's
        shp = pl.gshape[0][1:]         # outputs must not alias each other)
        bufs = [torch.empty(shp, dtype=q.dtype, device=dev)]
        gvs = (torch.empty(shp, dtype=q.dtype, device=dev),)
    else:
        bufs = [None if s is None or pl.Bt == 0 else
                (torch.empty if det or pl.seq else torch.zeros)(s, dtype=torch.float32,
                                                                 device=dev)
                for s in pl.gshape]
    grs = tuple(lse if b is None else b for b in bufs)
    if not (pl.direct and pl.Bt > 0):
        gvs = grs
    delta = torch.empty_like(lse)
    sq, sk, sv, so, sdo, sdq, sdk, sdv = pl.st
    PK, PV = _ptrs(pks, q), _ptrs(pvs, q)
    if pl.seq and pl.Bt > 0:
        # one launch: dq, dk, dv written once each; per-sequence prompt partials
        # (direct: one program per prompt row set, its gradient written in place)
        launch(K.prompted_attn_bwd_seq, pl.seq_grid,
               (q, k, v, out, dout, dq, dk, dv, lse, delta) + pl.seq_mid + (PK, PV) + pl.seq_p
               + (grs, gvs) + pl.seq_tail, lambda: pl.seq_kw, pl.launchers)
    elif pl.Bt > 0 and pl.nqb > 0:
        if det:
            launch(K.prompted_attn_bwd_dq, pl.grid(pl.nqb), (
                q, k, v, out, dout, dq, lse, delta, sq, sk, sv, so, sdo, sdq, PK, PV,
                tuple(pl.spk), tuple(pl.spv), pl.n_prompt, grs, tuple(pl.sgr), tuple(pl.gm),
                tuple(pl.gkv), pl.q_len, pl.k_len, pl.BS, pl.nqb, pl.Lq, pl.qk_scale, pl.scale),
                lambda: dict(SLOT_N=t.slot_n, SLOT_P=t.slot_p, **pl.const), pl.launchers)
            if pl.nkb > 0:
                launch(K.prompted_attn_bwd_dkv, pl.grid(pl.nkb), (
                    q, k, v, dout, dk, dv, lse, delta, sq, sk, sv, sdo, sdk, sdv, pl.q_len,
                    pl.k_len, pl.BS, pl.nkb, pl.Lq, pl.qk_scale, pl.scale),
                    lambda: dict(SLOT_N=t.slot_n, **pl.bwd_const), pl.launchers)
        else:
            dqa = torch.zeros((pl.Bt, pl.Lq, pl.E), dtype=torch.float32, device=dev)
            launch(K.prompted_attn_delta, pl.grid(pl.nqb), (
                out, dout, delta, so, sdo, pl.q_len, pl.BS, pl.nqb, pl.Lq), lambda: pl.const,
                pl.launchers)
            nb = pl.nkb + pl.npb
            launch(K.prompted_attn_bwd, pl.grid(nb), (
                q, k, v, dout, dk, dv, dqa, lse, delta, sq, sk, sv, sdo, sdk, sdv, pl.sdqa,
                PK, PV, tuple(pl.spk), tuple(pl.spv), pl.n_prompt, grs, tuple(pl.sgr),
                tuple(pl.gkv), pl.q_len, pl.k_len, pl.BS, pl.nkb, nb, pl.Lq, pl.qk_scale,
                pl.scale), lambda: dict(pl.bwd_const, SLOT_M=t.bwd_slot_m, SLOT_N=t.slot_n,
                                        SLOT_P=t.slot_p), pl.launchers)
            dq.copy_(dqa.view(q.shape))
    elif pl.Bt > 0 and pl.nkb > 0:          # no queries: dk = dv = 0
        dk.zero_()
        dv.zero_()
    if pl.Bt > 0 and pl.nqb == 0 and not pl.seq:
        dq.zero_()
    grads = [None] * (2 * MAX_SEGMENTS)                          # (dpk_0.., dpv_0..)
    done = [False] * len(pks)
    if pl.direct and pl.Bt > 0:
        grads[0] = bufs[0].view(pks[0].shape)
        grads[MAX_SEGMENTS] = gvs[0].view(pvs[0].shape)
        done[0] = True
    elif pl.seq and pl.Bt > 0 and pl.pg_rows > 0:
        # one more launch: the batch reduction of the per-sequence partials and the cast
        # (into fp32 where a prompt gradient needs a further host reduction: pk and pv
        # broadcast differently, or prompts of another dtype than q)
        odt = pl.pg_odt
        outs = [None if shp is None else
                (torch.empty(shp, dtype=odt, device=dev), torch.empty(shp, dtype=odt, device=dev))
                for shp in pl.pg_oshape]
        some = next(o for o in outs if o is not None)
        outs = [some if o is None else o for o in outs]
        launch(K.prompted_attn_pgrad, pl.pg_grid,
               (grs, pl.gkv, tuple([o[0] for o in outs]), tuple([o[1] for o in outs]))
               + pl.pg_tail, lambda: pl.pg_kw, pl.launchers)
        direct = pl.pg_all_direct
        for s, (pk, pv) in enumerate(zip(pks, pvs)):
            if pl.pg_lead[s] is None:
                continue
            gk, gv = outs[s]
            if not direct:
                gk = gk.sum_to_size(pk.shape).to(pk.dtype)
                gv = gv.sum_to_size(pv.shape).to(pv.dtype)
            if gk.shape != pk.shape:
                gk = gk.view(pk.shape)
            if gv.shape != pv.shape:
                gv = gv.view(pv.shape)
            grads[s], grads[MAX_SEGMENTS + s] = gk, gv
            done[s] = True
    for s, (pk, pv) in enumerate(zip(pks, pvs)):
        if pk is None or done[s]:
            continue
        if bufs[s] is None:
            grads[s], grads[MAX_SEGMENTS + s] = torch.zeros_like(pk), torch.zeros_like(pv)
        else:
            grads[s], grads[MAX_SEGMENTS + s] = _finish_grad(bufs[s], pk, pv,
                                                              det and not pl.seq)
    if placeholders:
        grads = [q.new_empty(0) if g is None else g for g in grads]
    return tuple(grads)


class _Bound:
    """The eager path of one validated layout (the op's layout token): everything a call
    does besides the data pointers, fixed, so that a call is a plan lookup, the
    allocations and direct launcher calls (ops/launch_cache.py).

    The op (:mod:`avstfp_fast.ops.attention`) calls it only for plain eager calls of a
    layout it validated, with the inputs in exactly that layout (its plan key, and in the
    backward the saved inputs' strides), and passes q/k/v (and dq/dk/dv) either as
    tensors or as their data pointers (ints: views of a packed QKV buffer need not be
    built to pass their address).  It uses the backend plans that the full path made
    (:func:`_forward_impl`, :func:`_backward_impl` with the layout token: same keys,
    same argument runs) and the launchers cached on them; it returns None -- nothing
    launched, nothing returned -- when a plan or a cached launcher is missing or refuses
    the call (a misaligned pointer, another device, a launch hook), and the op then
    takes the full path, which makes them.  Sequence-owning backward only (the AV-STFP
    stages' path); the fa2 backward and host-side prompt-gradient reductions always take
    the full path."""
    __slots__ = ("fkey", "bkey", "seg", "kfwd", "kseq", "kpg", "dense", "npresent")

    def __init__(self, p: AttnProblem, layout, out_stride, grad_strides):
        self.fkey = ("f", layout, tuple(out_stride))
        self.bkey = ("b", layout, tuple(out_stride)) + tuple(map(tuple, grad_strides))
        self.seg = len(p.prompt_k)
        self.dense = all(t is not None for t in p.prompt_k)    # no dummy pointers needed
        self.npresent = sum(t is not None for t in p.prompt_k)
        K = _kernels()
        self.kpg = K.prompted_attn_pgrad
        # the launchers' slots are keyed by id(kernel) (ops/launch_cache.py)
        self.kfwd, self.kseq = id(K.prompted_attn_fwd), id(K.prompted_attn_bwd_seq)

    def forward(self, q, k, v, pks, pvs, out):
        pl = _PLANS.get(self.fkey)
        if pl is None or pl.Bt == 0 or pl.nqb == 0:
            return None
        ent = pl.launchers.get(self.kfwd)
        if ent is None:
            return None
        lse = torch.empty(pl.lse_shape, dtype=torch.float32, device=out.device)
        if self.dense and q.__class__ is int:      # every pointer as an int
            out, lse_p = out.data_ptr(), lse.data_ptr()
            pks, pvs = tuple(map(_PTR, pks)), tuple(map(_PTR, pvs))
            ok = ent((q, k, v, out, lse_p) + pl.fwd_mid + (pks, pvs) + pl.fwd_tail,
                     _or(pvs, _or(pks, q | k | v | out | lse_p)))
        else:
            if not self.dense:
                pks, pvs = _ptrs(pks, q), _ptrs(pvs, q)
            ok = ent((q, k, v, out, lse) + pl.fwd_mid + (pks, pvs) + pl.fwd_tail)
        if not ok:
            return None
        return lse

    def backward_plan(self, dout, det):
        """The backward's plan for this gradient layout and mode where the eager path
        runs it (sequence-owning backward, prompt gradients written by the kernels in
        their own shape and dtype, cached launcher), else None: checked before the op
        allocates anything."""
        pl = _PLANS.get(self.bkey + (det, _forced_path(), dout.stride()))
        # (every present prompt gets its gradient from the kernels: 0-row prompts, whose
        # empty gradients the full path makes, take the full path)
        if pl is None or not pl.seq or pl.Bt == 0 or not (
                pl.direct or ((pl.pg_one or pl.pg_rows == 0)
                              and pl.pg_count == self.npresent)):
            return None
        return pl if pl.launchers.get(self.kseq) is not None else None

    def backward(self, pl, q, k, v, pks, pvs, out, lse, dout, dq, dk, dv):
        """(dpk, dpv) per segment, as :meth:`TritonBackend.backward`, for a plan of
        :meth:`backward_plan`; or None (nothing launched)."""
        ent = pl.launchers[self.kseq]
        dev = out.device
        parts = pl.scratch_parts
        scratch = torch.empty(pl.scratch_numel, dtype=torch.float32, device=dev)
        base = scratch.data_ptr()
        delta = base + parts[0][0]
        if pl.direct:       # the prompt gradients themselves: one (2, *lead, P, E) buffer
            g = torch.empty(pl.gshape[0], dtype=out.dtype, device=dev)
            gp = g.data_ptr()
            grs, gvs = (gp,), (gp + g.numel() // 2 * g.element_size(),)
        else:
            grs = tuple([lse if x is None else base + x for x in pl.scratch_goffs])
            gvs = grs
        if self.dense and q.__class__ is int and dq.__class__ is int and not pl.direct:
            po, pd, pl_ = out.data_ptr(), dout.data_ptr(), lse.data_ptr()
            pks, pvs = tuple(map(_PTR, pks)), tuple(map(_PTR, pvs))
            ok = ent((q, k, v, po, pd, dq, dk, dv, pl_, delta) + pl.seq_mid + (pks, pvs)
                     + pl.seq_p + (grs, gvs) + pl.seq_tail,
                     _or(pvs, _or(pks, q | k | v | po | pd | dq | dk | dv | pl_ | base)))
        else:
            if not self.dense:
                pks, pvs = _ptrs(pks, q), _ptrs(pvs, q)
            ok = ent((q, k, v, out, dout, dq, dk, dv, lse, delta) + pl.seq_mid + (pks, pvs)
                     + pl.seq_p + (grs, gvs) + pl.seq_tail)
        if not ok:
            return None
        S = self.seg
        if pl.direct:                       # one segment
            gk, gv = g.unbind(0)
            return (gk,), (gv,)
        if pl.pg_rows == 0:
            return (None,) * S, (None,) * S
        # the batch reduction and cast of the partials, into one buffer of all the prompt
        # gradients (views returned: each has its prompt's shape and dtype)
        n = pl.pg_count
        gl = torch.empty((2 * n, *pl.pg_oshape1), dtype=out.dtype, device=dev).unbind(0)
        if n == S:
            dpk, dpv = gl[:n], gl[n:]
            ks, vs = dpk, dpv
        else:                               # absent prompts: None, and any buffer
            it = iter(range(n))
            idx = [None if shp is None else next(it) for shp in pl.pg_oshape]
            dpk = tuple(None if i is None else gl[i] for i in idx)
            dpv = tuple(None if i is None else gl[n + i] for i in idx)
            ks = tuple(gl[0] if i is None else gl[i] for i in idx)
            vs = tuple(gl[n] if i is None else gl[n + i] for i in idx)

        def full():                         # the partials as tensors
            return (tuple(lse if x is None else scratch.as_strided(x[1], _dense(x[1]),
                                                                   x[0] // 4)
                          for x in parts[1:]), pl.gkv, ks, vs) + pl.pg_tail
        args = (grs, pl.gkv, ks, vs) + pl.pg_tail
        ent = pl.launchers.get(id(self.kpg))
        if ent is None or not ent(args):
            launch(self.kpg, pl.pg_grid, args, lambda: pl.pg_kw, pl.launchers, full=full)
        return dpk, dpv


_PTR = torch.Tensor.data_ptr


def _or(xs, m: int) -> int:
    for x in xs:
        m |= x
    return m


def _dense(shape):
    st, acc = [], 1
    for n in reversed(shape):
        st.append(acc)
        acc *= n
    return tuple(reversed(st))


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
             deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Writes dq/dk/dv; returns (dpk_0..dpk_3, dpv_0..dpv_3), empty where a segment has no
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
def _eager(q: torch.Tensor) -> bool:
    """Plain eager call: no tracing, no tensor subclass (fake/functional), no dispatch
    mode.  Then the launcher runs directly; the custom op's dispatch (~half of the host
    path) only matters to the tracers, which always get the custom op."""
    return (type(q) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0)


class TritonBackend(KernelBackend):
    name = "triton"
    capabilities = Capabilities(
        devices=("cuda", "cpu"),              # cpu: only under TRITON_INTERPRET=1 (reasons)
        dtypes=DTYPES, head_dims=HEAD_DIMS, value_dim_is_head_dim=True,
        dense_last_dim=("q", "k", "v", "prompt_k", "prompt_v"),
        max_segments=MAX_SEGMENTS, max_batch_dims=MAX_BATCH_DIMS, deterministic=True)

    def reasons(self, p: AttnProblem) -> List[str]:
        out = []
        try:
            import triton  # noqa: F401
        except ImportError as e:
            out.append(f"triton is not installed ({e})")
        interp = interpreting()
        if p.device.type == "cpu":
            if not interp:
                out.append("q is on the CPU: the triton backend needs a CUDA device "
                           "(or TRITON_INTERPRET=1 for the CPU interpreter)")
            elif _kernels_interpreted() is False:
                out.append("TRITON_INTERPRET=1 was set after the Triton kernels were compiled "
                           "for the GPU; set it before the first use of the triton backend")
        if p.dtype == torch.bfloat16 and (interp or _kernels_interpreted()):
            out.append("dtype torch.bfloat16 is not supported by the Triton CPU interpreter "
                       "(float16, float32)")
        return out + super().reasons(p)

    def forward(self, p: AttnProblem, out: torch.Tensor) -> torch.Tensor:
        self.check_writes(out=out)
        if _eager(p.q):
            return _forward_impl(p.q, p.k, p.v, p.prompt_k, p.prompt_v, p.q_segments,
                                 p.k_segments, p.scale, out, p.layout)
        return torch.ops.avstfp_triton.attn_fwd(
            p.q, p.k, p.v, list(p.prompt_k), list(p.prompt_v), list(p.q_segments),
            list(p.k_segments), p.scale, out)

    def bind(self, p: AttnProblem, layout, out_stride, grad_strides) -> Optional[_Bound]:
        """The eager path of the op's validated layout (see :class:`_Bound`), for plain
        tensors outside the interpreter (whose kernels cache no launcher)."""
        if layout is None or type(p.q) is not torch.Tensor or interpreting():
            return None
        return _Bound(p, layout, out_stride, grad_strides)

    def _check_grads(self, dq, dk, dv):
        self.check_writes(dq=dq, dk=dk, dv=dv)

    def backward(self, p, out, lse, dout, dq, dk, dv, deterministic: bool):
        if _eager(p.q):
            # the write check runs with each new plan (its key holds dq/dk/dv's strides)
            grads = _backward_impl(p.q, p.k, p.v, p.prompt_k, p.prompt_v, p.q_segments,
                                   p.k_segments, p.scale, out, lse, dout, dq, dk, dv,
                                   bool(deterministic), p.layout, False, self._check_grads)
            S = len(p.prompt_k)         # None where a segment has no prompts
            return grads[:S], grads[MAX_SEGMENTS:MAX_SEGMENTS + S]
        self.check_writes(dq=dq, dk=dk, dv=dv)
        grads = torch.ops.avstfp_triton.attn_bwd(
            p.q, p.k, p.v, list(p.prompt_k), list(p.prompt_v), list(p.q_segments),
            list(p.k_segments), p.scale, out, lse, dout, dq, dk, dv, bool(deterministic))
        S = len(p.prompt_k)
        dpk = tuple(grads[s] if p.prompt_k[s] is not None else None for s in range(S))
        dpv = tuple(grads[MAX_SEGMENTS + s] if p.prompt_k[s] is not None else None
                    for s in range(S))
        return dpk, dpv


register(TritonBackend())
