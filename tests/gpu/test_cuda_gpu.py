"""CUDA backend on a GPU: parity with the float64 reference (tolerances: docs/design.md)
for outputs and every gradient, at the model's stage shapes, odd lengths, all layouts, stride-0 and per-position
prompts, segments, a batch product > 65535, bit-exact determinism, torch.compile, and a
compute-sanitizer memcheck.  Skipped without CUDA (conftest: marker ``gpu``)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from avstfp_fast import prompted_attention, prompted_attention_qkv
from avstfp_fast.ops import get_backend, make_problem

from avstfp_fast.testing import TOL, rel_err, strided, check_vs_reference  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(scope="module", autouse=True)
def _cuda_backend_ready():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q = torch.randn(1, 4, 64, device=DEV, dtype=torch.float16)
    r = get_backend("cuda").why_not(make_problem(q, q, q))
    if r is not None:
        pytest.skip(f"cuda backend unavailable: {r}")
    from avstfp_fast.ops import cuda_backend
    cuda_backend.load()     # JIT build (minutes) happens here, once


def _leaf(t):
    return t.detach().requires_grad_(True)


def _check(fn, inputs, dtype, what):
    check_vs_reference(fn, inputs, dtype, "cuda", what)


# --------------------------------------------------------------------------- model stages
def _stage_inputs(stage, dtype, B=2, M=10, Na=48, Nv=196, H=12, d=64, per_position=False):
    N = Na + 1 + Nv + 1
    qkv = _leaf(torch.randn(B, M, N, 3, H, d, device=DEV, dtype=dtype))
    if stage == "temporal":
        shape = (N, H, 2, d) if per_position else (H, 2, d)
        pk = _leaf(torch.randn(*shape, device=DEV, dtype=dtype))
        pv = _leaf(torch.randn(*shape, device=DEV, dtype=dtype))
        return qkv, [pk], [pv], None
    if stage == "spatial":
        pks = [_leaf(torch.randn(H, 10, d, device=DEV, dtype=dtype)) for _ in range(2)]
        pvs = [_leaf(torch.randn(H, 10, d, device=DEV, dtype=dtype)) for _ in range(2)]
        return qkv, pks, pvs, (Na + 1, Nv + 1)
    pk = _leaf(torch.randn(H, 2, d, device=DEV, dtype=dtype))
    pv = _leaf(torch.randn(H, 2, d, device=DEV, dtype=dtype))
    return qkv, [pk], [pv], None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stage", ["temporal", "temporal_pp", "spatial", "fusion"])
def test_stage_parity(stage, dtype):
    pp = stage == "temporal_pp"
    st = "temporal" if pp else stage
    qkv, pks, pvs, segs = _stage_inputs(st, dtype, per_position=pp)
    # (B, M, N, 3, H, d): temporal attends over M (dim 1), spatial/fusion over N (dim 2);
    # after select(3) the view is (B, M, N, H, d)
    seq_dim = 1 if st == "temporal" else 2

    def fn(qkv, *prompts, backend):
        n = len(prompts) // 2
        pk, pv = list(prompts[:n]), list(prompts[n:])
        if segs is None:
            pk, pv = pk[0], pv[0]
        return prompted_attention_qkv(qkv, pk, pv, qkv_dim=3, seq_dim=seq_dim,
                                      segments=segs, backend=backend)

    _check(lambda *a: fn(*a[:-1], backend=a[-1]), [qkv, *pks, *pvs], dtype, stage)


# --------------------------------------------------------------------------- lengths/layouts
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [32, 64, 128])
@pytest.mark.parametrize("Lq,Lk,P", [(1, 1, 0), (10, 10, 2), (17, 5, 3), (63, 65, 1),
                                     (130, 200, 10), (16, 0, 4), (33, 97, 0)])
def test_odd_lengths(dtype, E, Lq, Lk, P):
    q = _leaf(torch.randn(3, 2, Lq, E, device=DEV, dtype=dtype))
    k = _leaf(torch.randn(3, 2, Lk, E, device=DEV, dtype=dtype))
    v = _leaf(torch.randn(3, 2, Lk, E, device=DEV, dtype=dtype))
    inputs = [q, k, v]
    if P:
        inputs += [_leaf(torch.randn(2, P, E, device=DEV, dtype=dtype)),
                   _leaf(torch.randn(2, P, E, device=DEV, dtype=dtype))]

    def fn(*a):
        *t, backend = a
        pk, pv = (t[3], t[4]) if P else (None, None)
        return prompted_attention(t[0], t[1], t[2], pk, pv, backend=backend)

    _check(fn, inputs, dtype, f"Lq={Lq} Lk={Lk} P={P} E={E}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced"])
@pytest.mark.parametrize("prompt", ["shared", "per_position", "full"])
def test_layouts_and_prompt_broadcast(dtype, layout, prompt):
    batch, L, E, P = (2, 5, 3), 37, 64, 3
    q = _leaf(strided((*batch, L, E), dtype, layout, DEV))
    k = _leaf(strided((*batch, L + 4, E), dtype, layout, DEV))
    v = _leaf(strided((*batch, L + 4, E), dtype, layout, DEV))
    shape = {"shared": (P, E), "per_position": (5, 3, P, E), "full": (*batch, P, E)}[prompt]
    pk = _leaf(torch.randn(*shape, device=DEV, dtype=dtype))
    pv = _leaf(torch.randn(*shape, device=DEV, dtype=dtype))
    _check(lambda q, k, v, pk, pv, b: prompted_attention(q, k, v, pk, pv, backend=b),
           [q, k, v, pk, pv], dtype, f"{layout}/{prompt}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segs", [(7, 0, 20), (49, 197), (1, 2, 3, 4), (16, 16)])
def test_segments(dtype, segs):
    L, E = sum(segs), 64
    q = _leaf(torch.randn(2, 3, L, E, device=DEV, dtype=dtype))
    k = _leaf(torch.randn(2, 3, L, E, device=DEV, dtype=dtype))
    v = _leaf(torch.randn(2, 3, L, E, device=DEV, dtype=dtype))
    present = [i % 2 == 0 for i in range(len(segs))]
    pks = [_leaf(torch.randn(3, 2 + i, E, device=DEV, dtype=dtype)) for i, pr in
           enumerate(present) if pr]
    pvs = [_leaf(torch.randn(3, 2 + i, E, device=DEV, dtype=dtype)) for i, pr in
           enumerate(present) if pr]

    def fn(q, k, v, *rest):
        *prompts, backend = rest
        n = len(prompts) // 2
        it_k, it_v = iter(prompts[:n]), iter(prompts[n:])
        pk = [next(it_k) if pr else None for pr in present]
        pv = [next(it_v) if pr else None for pr in present]
        return prompted_attention(q, k, v, pk, pv, segments=segs, backend=backend)

    _check(fn, [q, k, v, *pks, *pvs], dtype, f"segments {segs}")


@pytest.mark.parametrize("L", [10, 40])
def test_large_batch_grid(L):
    """Batch product 70000 > 65535: work items (sequence, tile) are numbered over
    grid.x (query tile fastest), packed short tiles (L=10) and 64-row tiles (L=40)."""
    dtype = torch.float16
    q = _leaf(torch.randn(70000, L, 32, device=DEV, dtype=dtype))
    k = _leaf(torch.randn(70000, L, 32, device=DEV, dtype=dtype))
    v = _leaf(torch.randn(70000, L, 32, device=DEV, dtype=dtype))
    pk = _leaf(torch.randn(2, 32, device=DEV, dtype=dtype))
    pv = _leaf(torch.randn(2, 32, device=DEV, dtype=dtype))
    _check(lambda q, k, v, pk, pv, b: prompted_attention(q, k, v, pk, pv, backend=b),
           [q, k, v, pk, pv], dtype, "large batch")


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_deterministic_bit_exact(dtype):
    qkv, pks, pvs, segs = _stage_inputs("spatial", dtype, B=2, M=4)

    grad_out = []

    def run():
        for t in (qkv, *pks, *pvs):
            t.grad = None
        out = prompted_attention_qkv(qkv, pks, pvs, qkv_dim=3, seq_dim=2, segments=segs,
                                     backend="cuda")
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        out.backward(grad_out[0])
        return [out.detach().clone()] + [t.grad.clone() for t in (qkv, *pks, *pvs)]

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = run(), run()
    finally:
        torch.use_deterministic_algorithms(prev)
    for x, y in zip(a, b):
        assert torch.equal(x, y), "deterministic mode is not bit-exact"
    c = run()                                   # atomic prompt grads: close, not bit-exact
    for x, y in zip(a, c):
        assert rel_err(y, x) <= TOL[dtype]


# --------------------------------------------------------------------------- torch.compile
def test_torch_compile():
    q = torch.randn(2, 3, 40, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    pk = torch.randn(3, 2, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    pv = torch.randn(3, 2, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)

    def f(q, pk, pv):
        return prompted_attention(q, q, q, pk, pv, backend="cuda").float().square().sum()

    eager = f(q, pk, pv)
    ge = torch.autograd.grad(eager, (q, pk, pv))
    comp = torch.compile(f)(q, pk, pv)
    gc = torch.autograd.grad(comp, (q, pk, pv))
    assert rel_err(comp, eager) <= 1e-2
    for a, b in zip(gc, ge):
        assert rel_err(a, b) <= 1e-2


# --------------------------------------------------------------------------- memcheck
_MEMCHECK = r"""
import torch
from avstfp_fast import prompted_attention
for dtype in (torch.float16, torch.float32):
    for L, P, segs in ((10, 2, None), (37, 3, None), (30, 2, (13, 17))):
        q = torch.randn(2, 3, L, 64, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(2, 3, L, 3, 64, device="cuda", dtype=dtype)[..., 1, :].requires_grad_(True)
        v = torch.randn(2, 3, L, 64, device="cuda", dtype=dtype, requires_grad=True)
        if segs is None:
            pk = torch.randn(3, P, 64, device="cuda", dtype=dtype, requires_grad=True)
            pv = torch.randn(3, P, 64, device="cuda", dtype=dtype, requires_grad=True)
        else:
            pk = [torch.randn(3, P, 64, device="cuda", dtype=dtype, requires_grad=True), None]
            pv = [torch.randn(3, P, 64, device="cuda", dtype=dtype, requires_grad=True), None]
        out = prompted_attention(q, k, v, pk, pv, segments=segs, backend="cuda")
        out.float().sum().backward()
torch.cuda.synchronize()
print("MEMCHECK-DONE")
"""


def test_compute_sanitizer_memcheck(tmp_path):
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cs = shutil.which("compute-sanitizer") or os.path.join(home, "bin", "compute-sanitizer")
    if not os.path.exists(cs):
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "memcheck_case.py"
    script.write_text(_MEMCHECK)
    r = subprocess.run([cs, "--tool", "memcheck", "--error-exitcode", "3",
                        sys.executable, str(script)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "MEMCHECK-DONE" in r.stdout, \
        f"memcheck failed (rc={r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "ERROR SUMMARY: 0 errors" in r.stdout + r.stderr
