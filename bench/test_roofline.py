"""Unit checks of the suite's own arithmetic: token geometry, roofline costs, floors."""
from __future__ import annotations

import math

import pytest
import torch

import contenders
import models
import names
from geometry import ARCHS, STAGES, KernelShape
from roofline import e2e_cost, e2e_floor, executed_flops, floor_time, kernel_cost


def test_backbone_geometry():
    b16, l14 = ARCHS["B16"], ARCHS["L14"]
    assert (b16.na, b16.nv, b16.tokens) == (48, 196, 246)       # 6*8 audio, 14*14 visual
    assert (l14.na, l14.nv, l14.tokens) == (63, 256, 321)       # 7*9 audio, 16*16 visual
    s = KernelShape(b16, 8, "spatial", torch.bfloat16)
    assert s.segments == (49, 197) and s.prompts == (10, 10)
    assert s.sequences() == [(8 * 10 * 12, 49, 49, 10), (8 * 10 * 12, 197, 197, 10)]
    t = KernelShape(l14, 2, "temporal", torch.bfloat16)
    assert t.sequences() == [(2 * 321 * 16, 10, 10, 2)]
    assert t.prompt_shape() == (321, 16, 2, 64)
    assert STAGES == ("temporal", "spatial", "fusion")


def test_kernel_cost_by_hand():
    s = KernelShape(ARCHS["B16"], 2, "fusion", torch.bfloat16)
    T = 2 * 10 * 246
    x = T * 12 * 64 * 2                       # one of q/k/v/o in bytes
    prompts = 2 * 12 * 2 * 64 * 2             # k and v prompts (H, P=2, d), bf16
    fwd = kernel_cost(s, "fwd")
    assert fwd["bytes"] == 4 * x + prompts
    assert fwd["flops"] == 2 * 10 * 12 * 4.0 * 246 * (246 + 2) * 64
    both = kernel_cost(s, "fwdbwd")
    lse = T * 12 * 4
    # backward reads q, k, v, o, do (5x), prompts, lse; writes dq, dk, dv (3x), dprompts
    assert both["bytes"] == fwd["bytes"] + lse + (5 * x + prompts + lse) + (3 * x + prompts)
    assert both["flops"] == 3 * fwd["flops"]
    ce = {"copy_Bps": 1e12, "gemm_flops": 1e15}
    assert floor_time(fwd, ce) == pytest.approx(fwd["bytes"] / 1e12)


def test_executed_flops_by_hand():
    b16 = ARCHS["B16"]
    # fusion, B=2: 240 sequences of 246 queries/keys + 2 prompts; the forward walks keys
    # + prompts as one source (248 -> 4 tiles of 64 = 256 rows, the prompts in the last
    # one), 64-row query tiles (246 -> 256); 2 products
    f = KernelShape(b16, 2, "fusion", torch.bfloat16)
    assert executed_flops(f, "fwd") == 240 * 2.0 * 64 * 256 * (2 * 256)
    # the sequence-owning backward: a query pass (S, dP, dQ: 3 products over 64-row query
    # tiles x the 4 key tiles) and a key pass (S, dP, dV, dK: 4 products over the 4 key
    # tiles x 32-row query tiles, 246 -> 256 rows again): S and dP twice
    assert executed_flops(f, "fwdbwd") == 240 * 2.0 * 64 * 256 * ((2 + 3 + 4) * 256)
    # temporal: 4 sequences of 10 frames packed in a 64-row tile (16 slots each), the 10
    # keys + 2 prompts in one 16-slot step, per-sequence (batched) products: one 16 x 16
    # block per sequence, 10 x 12 useful (46.9% of the forward's tensor work; 23.4% with
    # the prompts in their own step, 9.4% with the block-diagonal 64 x (64 + 16) tile);
    # the backward is one step of 5 products (S and dP once): 40.2% of fwd+bwd
    t = KernelShape(b16, 2, "temporal", torch.bfloat16)
    c = kernel_cost(t, "fwd")
    assert c["executed_flops"] == math.ceil(2 * 246 * 12 / 4) * 4 * 2.0 * 16 * 64 * (2 * 16)
    assert c["flops"] / c["executed_flops"] == pytest.approx(0.46875)
    c = kernel_cost(t, "fwdbwd")
    assert c["flops"] / c["executed_flops"] == pytest.approx(3 * 480 / (7 * 512))
    # spatial B=8 backward alone: ~55.9 GFLOP (audio 49 + 10 -> 1 key tile, visual
    # 197 + 10 -> 4; query pass 64-row tiles, key pass 32-row: 197 -> 224 rows); the
    # fa2 fused backward (5 products, prompts in their own step) was ~40.6, the two-pass
    # one ~63
    s = KernelShape(b16, 8, "spatial", torch.bfloat16)
    bwd = executed_flops(s, "fwdbwd") - executed_flops(s, "fwd")
    seqs = 8 * 10 * 12
    q_pass = seqs * 3 * (1 * 1 + 4 * 4) * 2.0 * 64 * 64 * 64
    k_pass = seqs * 4 * (1 * 2 + 4 * 7) * 2.0 * 32 * 64 * 64
    assert bwd == q_pass + k_pass == pytest.approx(55.9e9, rel=0.01)
    for stage in STAGES:
        for passes in ("fwd", "fwdbwd"):
            c = kernel_cost(KernelShape(ARCHS["L14"], 8, stage, torch.bfloat16), passes)
            assert c["executed_flops"] >= c["flops"]
    # a compute-bound floor: executed FLOPs at the GEMM rate, not the useful ones
    cs = kernel_cost(s, "fwdbwd")
    ce = {"copy_Bps": 1e20, "gemm_flops": 1e15}
    assert floor_time(cs, ce) == pytest.approx(cs["executed_flops"] / 1e15)
    assert floor_time({"bytes": 1.0, "flops": 2e15}, ce) == pytest.approx(2.0)


def test_e2e_cost_and_contender_list():
    torch.manual_seed(0)
    m = models.make_model("tiny", "cpu")
    c1, c8 = (e2e_cost(m, b, "train") for b in (1, 8))
    assert c8["flops"] == pytest.approx(8 * c1["flops"], rel=1e-6)
    inf = e2e_cost(m, 1, "infer")
    assert inf["flops"] < c1["flops"] < 3 * inf["flops"]
    floor = e2e_floor(c1, {"copy_Bps": 1e10, "gemm_flops": 1e11})
    assert math.isclose(floor, c1["flops"] / 1e11 + c1["bytes"] / 1e10)
    assert tuple(contenders.CONTENDERS) == names.CONTENDERS
    assert set(names.OURS) <= set(contenders.CONTENDERS)
    with pytest.raises(contenders.Unavailable, match="CUDA"):
        contenders.build_contender("sdpa-flash", KernelShape(ARCHS["tiny"], 1, "fusion",
                                                             torch.float16), "cpu")
