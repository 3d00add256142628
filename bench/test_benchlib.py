"""Unit checks of the suite's own arithmetic: token geometry, roofline costs, floors."""
from __future__ import annotations

import math

import pytest
import torch

import benchlib
from benchlib import ARCHS, KernelShape


def test_spec_geometry():
    b16, l14 = ARCHS["B16"], ARCHS["L14"]
    assert (b16.na, b16.nv, b16.tokens) == (48, 196, 246)       # 6*8 audio, 14*14 visual
    assert (l14.na, l14.nv, l14.tokens) == (63, 256, 321)       # 7*9 audio, 16*16 visual
    s = KernelShape(b16, 8, "spatial", torch.bfloat16)
    assert s.segments == (49, 197) and s.prompts == (10, 10)
    assert s.sequences() == [(8 * 10 * 12, 49, 49, 10), (8 * 10 * 12, 197, 197, 10)]
    t = KernelShape(l14, 2, "temporal", torch.bfloat16)
    assert t.sequences() == [(2 * 321 * 16, 10, 10, 2)]
    assert t.prompt_shape() == (321, 16, 2, 64)


def test_kernel_cost_by_hand():
    s = KernelShape(ARCHS["B16"], 2, "fusion", torch.bfloat16)
    T = 2 * 10 * 246
    x = T * 12 * 64 * 2                       # one of q/k/v/o in bytes
    prompts = 2 * 12 * 2 * 64 * 2             # k and v prompts (H, P=2, d), bf16
    fwd = benchlib.kernel_cost(s, "fwd")
    assert fwd["bytes"] == 4 * x + prompts
    assert fwd["flops"] == 2 * 10 * 12 * 4.0 * 246 * (246 + 2) * 64
    both = benchlib.kernel_cost(s, "fwdbwd")
    lse = T * 12 * 4
    # backward reads q, k, v, o, do (5x), prompts, lse; writes dq, dk, dv (3x), dprompts
    assert both["bytes"] == fwd["bytes"] + lse + (5 * x + prompts + lse) + (3 * x + prompts)
    assert both["flops"] == 3 * fwd["flops"]
    ce = {"copy_Bps": 1e12, "gemm_flops": 1e15}
    assert benchlib.floor_time(fwd, ce) == pytest.approx(fwd["bytes"] / 1e12)


def test_e2e_cost_and_contender_list():
    torch.manual_seed(0)
    m = benchlib.make_model("tiny", "cpu")
    c1, c8 = (benchlib.e2e_cost(m, b, "train") for b in (1, 8))
    assert c8["flops"] == pytest.approx(8 * c1["flops"], rel=1e-6)
    inf = benchlib.e2e_cost(m, 1, "infer")
    assert inf["flops"] < c1["flops"] < 3 * inf["flops"]
    floor = benchlib.e2e_floor(c1, {"copy_Bps": 1e10, "gemm_flops": 1e11})
    assert math.isclose(floor, c1["flops"] / 1e11 + c1["bytes"] / 1e10)
    assert set(benchlib.OURS) <= set(benchlib.CONTENDERS)
    with pytest.raises(benchlib.Unavailable, match="CUDA"):
        benchlib.build_contender("sdpa-flash", KernelShape(ARCHS["tiny"], 1, "fusion",
                                                           torch.float16), "cpu")
