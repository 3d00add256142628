"""Executed FLOPs and minimum bytes of one ``prompted_attention`` call, per tile config.

The byte floor and the *useful* FLOPs depend on the problem only; the *executed* FLOPs
also depend on how the kernels tile it: rows padded up to the tile (197 tokens walk 4
blocks of 64 = 256 rows), slots of packed short sequences (a tile of 4 sequences x 16
slots computes one 16 x 16 score block per sequence and key or prompt step -- per-sequence
batched products, not the whole 64 x 64 block grid -- of which 10 x 10 token and 10 x 2
prompt scores are useful), and the number of matrix products per score tile in the
backward.  Definitions:
``docs/design.md``, "Floors: bytes and FLOPs".

Everything here is plain arithmetic (no torch, no GPU), used by ``bench/static_sm90.py``
and meant for the summary's roofline.

Interface
---------
``Call(batch, q_segments, k_segments, prompts, head_dim, elem, prompt_rows)``
    one call of the op: ``batch`` sequences per segment (the product of the batch dims),
    per-segment query/key lengths and prompt counts, the element size in bytes, and the
    number of distinct stored prompt rows (k and v counted separately by
    :func:`min_bytes`; e.g. ``heads * P`` for batch-shared ``(H, P, d)`` prompts).
``Tile(g, slot_m, slot_n, slot_p, batched=True, slot_kp=None)``
    ``g`` sequences per program, ``slot_m`` query rows, ``slot_n`` key rows and
    ``slot_p`` prompt rows per sequence and step (tile rows = g * slot).  ``batched``:
    the products are per sequence (g blocks of slot x slot; the kernels since the
    packed tile uses batched dots); False models the earlier block-diagonal tile, which
    computed the whole (g slot_m) x (g slot_n) grid and masked all but its diagonal.
    ``slot_kp``: the key tile of the kernels that walk a sequence's keys and then its
    prompts as one source (the forward and the sequence-owning backward: the prompts
    share the last key tile where they fit); None models the earlier forward, whose
    prompts took their own ``slot_p`` step.
``min_bytes(call, passes)``, ``useful_flops(call, passes)``,
``executed_flops(call, tile, passes, backward, bwd_slot_m=None)`` with ``passes`` in
("fwd", "fwdbwd"), ``backward`` in :data:`BACKWARDS` and ``bwd_slot_m`` the query tile
of the fused backward's or the sequence-owning backward's key pass if it differs;
``floor_s(bytes, flops, copy_Bps, gemm_flops)``;
``summary(call, tile, backward, ceilings, bwd_slot_m)`` -> all of them in one dict;
``for_tiles(t, fa2_backward)`` -> ``(Tile, backward, bwd_slot_m)`` of a tile-table entry
(``avstfp_fast.ops.triton_backend._Tiles``): the kernels that entry launches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

#: Backward schemes and their matrix products per (query tile, key tile) pair.
#: Key-block-parallel ("fa2") kernels, prompts in their own slot_p steps:
#:   "two-pass": a dq pass (S, dP, dQ; on prompt tiles also dPK, dPV) and a dk/dv pass
#:               (S, dV, dP, dK): S and dP are computed twice -> 7 per token tile.
#:   "fused":    one pass per key tile: S, dP, dV, dK and dQ (fp32 atomics) -> 5.
#: Sequence-owning kernels (``prompted_attn_bwd_seq``), keys + prompts as one source in
#: slot_kp tiles:
#:   "seq":      a query-outer pass (per slot_m-row query tile, over every key tile: S,
#:               dP, dQ) and a key-outer pass (per key tile, over bwd_slot_m-row query
#:               tiles: S, dP, dV, dK): S and dP twice -> 3 + 4 = 7 per tile pair, the
#:               two passes over different query tilings.
#:   "seq-one":  sequences that are one query tile and one key tile (packed temporal):
#:               one step, S and dP once -> 5.
BACKWARDS = ("two-pass", "fused", "seq", "seq-one")

#: Nominal sm_90 ceilings used for *estimated* floors when nothing was measured (H100 SXM:
#: ~3.0 TB/s device copy, ~790 TFLOP/s dense bf16 measured-class GEMM rate).
NOMINAL_SM90 = {"copy_Bps": 3.0e12, "gemm_flops": 790e12}


@dataclass(frozen=True)
class Call:
    batch: int
    q_segments: Tuple[int, ...]
    k_segments: Tuple[int, ...]
    prompts: Tuple[int, ...]
    head_dim: int
    elem: int
    prompt_rows: int


@dataclass(frozen=True)
class Tile:
    g: int
    slot_m: int
    slot_n: int
    slot_p: int
    batched: bool = True
    slot_kp: Optional[int] = None

    @property
    def rows_m(self) -> int:
        return self.g * self.slot_m

    @property
    def rows_n(self) -> int:
        return self.g * self.slot_n

    @property
    def rows_p(self) -> int:
        return self.g * self.slot_p


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _segments(c: Call):
    for s, (nq, nk) in enumerate(zip(c.q_segments, c.k_segments)):
        yield nq, nk, (c.prompts[s] if s < len(c.prompts) else 0)


def min_bytes(c: Call, passes: str) -> float:
    """Bytes a perfect kernel moves: forward reads q, k, v, prompts once and writes o
    (and the fp32 lse when a backward follows); the backward reads q, k, v, prompts, o,
    do, lse and writes dq, dk, dv and the prompt gradients."""
    lq, lk = sum(c.q_segments), sum(c.k_segments)
    x_q = c.batch * lq * c.head_dim * c.elem
    x_k = c.batch * lk * c.head_dim * c.elem
    prompt = 2 * c.prompt_rows * c.head_dim * c.elem          # k and v prompts
    lse = 4 * c.batch * lq
    fwd = 2 * x_q + 2 * x_k + prompt                           # q, k, v in; o out
    if passes == "fwd":
        return float(fwd)
    bwd = (x_q + 2 * x_k + prompt + 2 * x_q + lse) + (x_q + 2 * x_k + prompt)
    return float(fwd + lse + bwd)


def useful_flops(c: Call, passes: str) -> float:
    """4 Lq (Lk + P) d per sequence for the forward (two products); the backward's four
    products (dV, dP, dQ, dK) are twice that."""
    f = sum(4.0 * c.batch * nq * (nk + p) * c.head_dim for nq, nk, p in _segments(c))
    return f if passes == "fwd" else 3.0 * f


def executed_flops(c: Call, t: Tile, passes: str, backward: str = "two-pass",
                   bwd_slot_m: Optional[int] = None) -> float:
    """FLOPs of the matrix products the kernels issue, padding and packing included.

    Programs: ``cdiv(batch, g)`` groups x query (forward, dq) or key (dk/dv) blocks per
    segment; each walks the other side in tile steps.  A product of an (a x d) by a
    (d x b) tile is 2 a b d FLOPs; per-sequence (batched) products of g sequences are g
    such products of one sequence's slots.  With ``t.slot_kp`` the forward (and the
    "seq" backwards) walk keys + prompts in slot_kp tiles; without it, keys in slot_n
    and prompts in slot_p steps.  ``bwd_slot_m``: the query tile of the fused
    backward's inner loop or of the "seq" backward's key pass when it differs from the
    forward's (``g == 1`` only)."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward: expected one of {BACKWARDS}, got {backward!r}")
    if backward.startswith("seq") and not t.slot_kp:
        raise ValueError(f"backward {backward!r} walks keys + prompts as one source: "
                         f"the tile needs slot_kp, got {t}")
    d, groups = c.head_dim, _cdiv(c.batch, t.g)
    w = t.g if (t.batched or t.g == 1) else 1              # key columns a query row meets

    def prod(rows_a: int, rows_b: int) -> float:           # one product of two tiles
        return 2.0 * rows_a * rows_b // w * d

    fwd = bwd = 0.0
    for nq, nk, p in _segments(c):
        mb = _cdiv(nq, t.slot_m)                            # query blocks
        nb, pb = _cdiv(nk, t.slot_n), _cdiv(p, t.slot_p)    # key / prompt steps
        kp = _cdiv(nk + p, t.slot_kp) if t.slot_kp else 0   # keys + prompts as one source
        tok, prm = prod(t.rows_m, t.rows_n), prod(t.rows_m, t.rows_p)
        if t.slot_kp:
            fwd += groups * mb * 2 * kp * prod(t.rows_m, t.g * t.slot_kp)
        else:
            fwd += groups * mb * (2 * nb * tok + 2 * pb * prm)
        bq = bwd_slot_m or t.slot_m
        if backward == "two-pass":
            bwd += groups * mb * (3 * nb * tok + 5 * pb * prm)   # dq pass (+ prompt grads)
            bwd += groups * nb * mb * 4 * tok                    # dk/dv pass
        elif backward == "fused":                               # query tile bq rows/seq
            rq = t.g * bq
            bwd += groups * _cdiv(nq, bq) * 5 * (nb * prod(rq, t.rows_n)
                                                 + pb * prod(rq, t.rows_p))
        elif backward == "seq":
            kt = t.g * t.slot_kp
            bwd += groups * mb * kp * 3 * prod(t.rows_m, kt)             # query pass
            bwd += groups * kp * _cdiv(nq, bq) * 4 * prod(t.g * bq, kt)  # key pass
        else:                                                   # "seq-one"
            bwd += groups * mb * kp * 5 * prod(t.rows_m, t.g * t.slot_kp)
    return fwd if passes == "fwd" else fwd + bwd


def for_tiles(t, fa2_backward: str = "fused") -> Tuple[Tile, str, Optional[int]]:
    """``(Tile, backward, bwd_slot_m)`` of the kernels a tile-table entry launches (``t``:
    an ``avstfp_fast.ops.triton_backend._Tiles``; its ``bwd`` path, ``fa2_backward`` the
    scheme of the key-block-parallel path): the forward and the sequence-owning backward
    walk keys + prompts in ``slot_kp`` tiles; "seq" runs its key pass over
    ``bwd_slot_m``-row query tiles, the fused fa2 backward its inner loop."""
    tile = Tile(t.g, t.slot_m, t.slot_n, t.slot_p, slot_kp=t.slot_kp)
    if t.bwd == "seq":
        return tile, ("seq-one" if t.bwd_one else "seq"), t.bwd_slot_m
    return tile, fa2_backward, (t.bwd_slot_m if fa2_backward == "fused" else None)


def floor_s(nbytes: float, flops: float, copy_Bps: float, gemm_flops: float) -> float:
    """Roofline floor: the larger of bytes at the copy bandwidth and FLOPs at the GEMM rate."""
    return max(nbytes / copy_Bps, flops / gemm_flops)


def summary(c: Call, t: Tile, backward: str, ceilings: Dict[str, float] = NOMINAL_SM90,
            bwd_slot_m: Optional[int] = None) -> Dict[str, float]:
    """All of the above for one call and tile, forward and forward+backward."""
    out: Dict[str, float] = {}
    for passes in ("fwd", "fwdbwd"):
        b, u = min_bytes(c, passes), useful_flops(c, passes)
        e = executed_flops(c, t, passes, backward, bwd_slot_m)
        out[f"{passes}_bytes"], out[f"{passes}_useful_flops"] = b, u
        out[f"{passes}_executed_flops"] = e
        out[f"{passes}_useful_fraction"] = u / e if e else 1.0
        out[f"{passes}_floor_s"] = floor_s(b, e, ceilings["copy_Bps"], ceilings["gemm_flops"])
        out[f"{passes}_byte_floor_s"] = b / ceilings["copy_Bps"]
    return out
