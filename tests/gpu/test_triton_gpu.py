"""Triton backend on a GPU: parity with the float64 reference (SPEC §5) for outputs and
every gradient at the SPEC §4 stage shapes (bf16/fp16/fp32), head dims 32/64/128 with odd
lengths, bit-exact determinism, batch products above 65535 (grid axis 0), and
torch.compile(fullgraph=True) of a small module.  Skipped without CUDA (marker ``gpu``)."""
import os
import sys

import pytest
import torch

from avstfp_fast import prompted_attention, prompted_attention_qkv
from avstfp_fast.ops import get_backend, make_problem

from avstfp_fast.testing import TOL, rel_err, check_vs_reference  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _triton_ready():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: these tests need the compiled kernels")
    q = torch.randn(1, 4, 64, device=DEV, dtype=torch.float16)
    r = get_backend("triton").why_not(make_problem(q, q, q))
    if r is not None:
        pytest.skip(f"triton backend unavailable: {r}")


def _leaf(t):
    return t.detach().requires_grad_(True)


def _check(fn, inputs, dtype, what):
    check_vs_reference(fn, inputs, dtype, "triton", what)


def _qkv(B, M, N, H, d, dtype):
    return torch.randn(B, M, N, 3, H, d, device=DEV, dtype=dtype)


def _p(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=dtype)


# --------------------------------------------------------------------------- SPEC §4 stages
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("stage", ["temporal", "temporal_per_position", "spatial", "fusion"])
def test_stage_shapes_vit_b16(stage, dtype):
    B, M, Na, Nv, H, d = 2, 10, 48, 196, 12, 64
    N = Na + 1 + Nv + 1
    qkv = _qkv(B, M, N, H, d, dtype)
    if stage.startswith("temporal"):
        lead = (N, H) if stage == "temporal_per_position" else (H,)
        pk, pv = _p(*lead, 2, d, dtype=dtype), _p(*lead, 2, d, dtype=dtype)

        def fn(x, pk, pv, backend):
            return prompted_attention_qkv(x, pk, pv, qkv_dim=3, seq_dim=1, backend=backend)
        _check(fn, [qkv, pk, pv], dtype, stage)
    elif stage == "spatial":
        ps = [_p(H, 10, d, dtype=dtype) for _ in range(4)]

        def fn(x, a, b, c, e, backend):
            return prompted_attention_qkv(x, [a, b], [c, e], qkv_dim=3, seq_dim=2,
                                          segments=(Na + 1, Nv + 1), backend=backend)
        _check(fn, [qkv, *ps], dtype, stage)
    else:
        pk, pv = _p(H, 2, d, dtype=dtype), _p(H, 2, d, dtype=dtype)

        def fn(x, pk, pv, backend):
            return prompted_attention_qkv(x, pk, pv, qkv_dim=3, seq_dim=2, backend=backend)
        _check(fn, [qkv, pk, pv], dtype, stage)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spatial_visual_vit_l14(dtype):
    B, M, N, H, d = 1, 10, 257, 16, 64
    qkv = _qkv(B, M, N, H, d, dtype)

    def fn(x, pk, pv, backend):
        return prompted_attention_qkv(x, pk, pv, qkv_dim=3, seq_dim=2, backend=backend)
    _check(fn, [qkv, _p(H, 10, d, dtype=dtype), _p(H, 10, d, dtype=dtype)], dtype, "L/14")


@pytest.mark.parametrize("d", [32, 128])
@pytest.mark.parametrize("Lq,Lk,P", [(7, 13, 3), (129, 67, 17), (300, 300, 0)])
def test_head_dims_and_odd_lengths(d, Lq, Lk, P):
    dtype = torch.float16
    q, k, v = _p(3, 2, Lq, d, dtype=dtype), _p(3, 2, Lk, d, dtype=dtype), _p(3, 2, Lk, d, dtype=dtype)
    k = k.transpose(0, 1).contiguous().transpose(0, 1)      # another batch stride order

    def fn(q, k, v, pk, pv, backend):
        return prompted_attention(q, k, v, pk, pv, backend=backend)
    _check(fn, [q, k, v, _p(2, P, d, dtype=dtype), _p(2, P, d, dtype=dtype)], dtype,
           f"d={d} Lq={Lq} Lk={Lk} P={P}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_four_segments_fused_backward(dtype):
    # 4 block-diagonal segments in one launch (one unprompted), packed QKV view
    segs, counts = (49, 3, 197, 37), (10, 2, 10, 0)
    qkv = _qkv(2, 3, sum(segs), 4, 64, dtype)
    ps = [_p(4, c, 64, dtype=dtype) for c in counts if c] * 2

    def fn(x, *rest):
        *ps, backend = rest
        it = iter(ps)
        pk = [next(it) if c else None for c in counts]
        pv = [next(it) if c else None for c in counts]
        return prompted_attention_qkv(x, pk, pv, qkv_dim=3, seq_dim=2, segments=segs,
                                      backend=backend)
    _check(fn, [qkv, *ps], dtype, "4 segments")


@pytest.mark.parametrize("Lq,Lk", [(1, 239), (10, 512), (32, 1000)])
def test_short_queries_over_long_keys(Lq, Lk):
    dtype = torch.bfloat16
    q = _p(4, 3, Lq, 64, dtype=dtype)
    k, v = _p(4, 3, Lk, 64, dtype=dtype), _p(4, 3, Lk, 64, dtype=dtype)

    def fn(q, k, v, pk, pv, backend):
        return prompted_attention(q, k, v, pk, pv, backend=backend)
    _check(fn, [q, k, v, _p(3, 2, 64, dtype=dtype), _p(3, 2, 64, dtype=dtype)], dtype,
           f"short-q {Lq}x{Lk}")


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("seq_dim", [1, 2])
def test_deterministic_bit_exact(seq_dim):
    qkv = _qkv(2, 10, 246, 12, 64, torch.bfloat16)
    pk, pv = _p(12, 2, 64, dtype=torch.bfloat16), _p(12, 2, 64, dtype=torch.bfloat16)
    q_shape = qkv.select(3, 0).movedim(seq_dim, -2).shape
    go = torch.randn(q_shape, device=DEV, dtype=torch.bfloat16)

    def run():
        x, a, b = _leaf(qkv), _leaf(pk), _leaf(pv)
        out = prompted_attention_qkv(x, a, b, qkv_dim=3, seq_dim=seq_dim, backend="triton")
        out.backward(go)
        return [out, x.grad, a.grad, b.grad]

    torch.use_deterministic_algorithms(True)
    try:
        r1, r2 = run(), run()
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)
    for a, b in zip(r1, run()):                   # atomic mode: same values within bf16 tol
        assert rel_err(a, b) <= TOL[torch.bfloat16]


# --------------------------------------------------------------------------- big grids
@pytest.mark.parametrize("case", ["long", "packed"])
def test_batch_product_above_65535(case):
    dtype = torch.float16
    if case == "long":     # one sequence per program: 70 000 programs on grid axis 0
        q = _p(70_000, 40, 32, dtype=dtype)
        k, v = _p(70_000, 40, 32, dtype=dtype), _p(70_000, 40, 32, dtype=dtype)
    else:                  # 4 sequences per program: 270 000 sequences in 3 batch dims
        q = _p(10, 2250, 12, 10, 32, dtype=dtype)
        k, v = _p(10, 2250, 12, 10, 32, dtype=dtype), _p(10, 2250, 12, 10, 32, dtype=dtype)
    pk, pv = _p(2, 32, dtype=dtype), _p(2, 32, dtype=dtype)

    def fn(q, k, v, pk, pv, backend):
        return prompted_attention(q, k, v, pk, pv, backend=backend)
    _check(fn, [q, k, v, pk, pv], dtype, f"batch > 65535 ({case})")


# --------------------------------------------------------------------------- torch.compile
class _Block(torch.nn.Module):
    def __init__(self, D=128, H=2, P=3):
        super().__init__()
        self.H = H
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.proj = torch.nn.Linear(D, D)
        self.pk = torch.nn.Parameter(torch.randn(H, P, D // H))
        self.pv = torch.nn.Parameter(torch.randn(H, P, D // H))

    def forward(self, x):                      # x (B, M, N, D); temporal then spatial
        B, M, N, D = x.shape
        for seq_dim in (1, 2):
            qkv = self.qkv(x).view(B, M, N, 3, self.H, D // self.H)
            o = prompted_attention_qkv(qkv, self.pk, self.pv, qkv_dim=3, seq_dim=seq_dim,
                                       backend=self.backend)
            x = x + self.proj(o.movedim(-2, seq_dim).reshape(B, M, N, D))
        return x


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    m = _Block().to(DEV)
    x = torch.randn(2, 10, 50, 128, device=DEV)
    m.backend = "reference"
    m.double()
    ref = m(x.double())
    ref_g = torch.autograd.grad(ref.sum(), list(m.parameters()))
    m.float()
    m.backend = "triton"
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True)       # fp32: IEEE dots, tf32 off (conftest)
    out = cm(x)
    g = torch.autograd.grad(out.sum(), list(m.parameters()))
    assert rel_err(out, ref) <= 1e-5
    for a, b in zip(g, ref_g):
        assert rel_err(a, b) <= 1e-4
