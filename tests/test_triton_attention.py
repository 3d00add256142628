"""Triton backend of prompted_attention vs the float64 reference (docs/design.md,
"The op contract" and "Tolerances").

Without a GPU this runs the Triton kernels in the CPU interpreter: TRITON_INTERPRET=1 is
set below before the kernels are first imported (the backend re-checks it at call time).
With a GPU the same tests run the compiled kernels.  Grids are kept tiny (the interpreter
costs milliseconds per program instance)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from avstfp_fast import prompted_attention, prompted_attention_qkv  # noqa: E402
from avstfp_fast.ops import get_backend, make_problem  # noqa: E402
from avstfp_fast.testing import TOL, leaf, rel_err, strided, check_vs_reference  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cpu" if INTERP else "cuda"
DTYPES = (torch.float32, torch.float16)

pytestmark = pytest.mark.skipif(not INTERP and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEV)


def check(fn, inputs, dtype, what=""):
    """fn(*inputs, backend) with triton vs reference in float64: output and every grad."""
    check_vs_reference(fn, inputs, dtype, "triton", what)


def _qkv_fn(seq_dim, segments=None):
    def fn(qkv, pk, pv, backend):
        return prompted_attention_qkv(qkv, pk, pv, qkv_dim=3, seq_dim=seq_dim,
                                      segments=segments, backend=backend)
    return fn


# ------------------------------------------------------------- the three AV-STFP stages
@pytest.mark.parametrize("dtype", DTYPES)
def test_temporal_stage_shared_prompts(dtype):
    # (B, M, N, 3, H, d): sequence over frames M (10 queries, 10 + 2 keys), packed tiles
    qkv = rnd(1, 10, 7, 3, 2, 32, dtype=dtype)
    check(_qkv_fn(1), [qkv, rnd(2, 2, 32, dtype=dtype), rnd(2, 2, 32, dtype=dtype)], dtype,
          "temporal")


@pytest.mark.parametrize("dtype", DTYPES)
def test_temporal_stage_per_position_prompts(dtype):
    # prompts (N, H, P, d): different per token position, broadcast over B (stride 0)
    qkv = rnd(2, 10, 5, 3, 2, 32, dtype=dtype)
    check(_qkv_fn(1), [qkv, rnd(5, 2, 2, 32, dtype=dtype), rnd(5, 2, 2, 32, dtype=dtype)],
          dtype, "temporal per-position")


@pytest.mark.parametrize("dtype", DTYPES)
def test_spatial_stage_two_segments(dtype):
    # joint audio|visual buffer, sequence over tokens, block-diagonal with per-segment
    # prompts of different counts (tails not multiple of 64 in both segments)
    qkv = rnd(1, 2, 13 + 70, 3, 2, 32, dtype=dtype)
    pks = [rnd(2, 3, 32, dtype=dtype), rnd(2, 5, 32, dtype=dtype)]
    pvs = [rnd(2, 3, 32, dtype=dtype), rnd(2, 5, 32, dtype=dtype)]

    def fn(qkv, pk0, pk1, pv0, pv1, backend):
        return prompted_attention_qkv(qkv, [pk0, pk1], [pv0, pv1], qkv_dim=3, seq_dim=2,
                                      segments=(13, 70), backend=backend)
    check(fn, [qkv, *pks, *pvs], dtype, "spatial segments")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fusion_stage(dtype):
    qkv = rnd(1, 2, 67, 3, 2, 64, dtype=dtype)
    check(_qkv_fn(2), [qkv, rnd(2, 2, 64, dtype=dtype), rnd(2, 2, 64, dtype=dtype)], dtype,
          "fusion")


# ------------------------------------------------------------- layouts, shapes, prompts
@pytest.mark.parametrize("layout", ["permuted", "sliced"])
def test_strided_views_several_batch_dims(layout):
    dt = torch.float32
    batch = (2, 1, 3, 2)                           # a size-1 dim among 4 batch dims
    q = strided((*batch, 9, 32), dt, layout, DEV)
    k = strided((*batch, 21, 32), dt, layout, DEV)
    v = strided((*batch, 21, 32), dt, layout, DEV)
    pk, pv = rnd(3, 1, 4, 32), rnd(3, 1, 4, 32)    # broadcast over dims 0 and 3

    def fn(q, k, v, pk, pv, backend):
        return prompted_attention(q, k, v, pk, pv, backend=backend)
    check(fn, [q, k, v, pk, pv], dt, layout)


def test_four_batch_dims_and_per_sample_prompts():
    dt = torch.float16
    q, k, v = (rnd(2, 2, 2, 2, 20, 32, dtype=dt) for _ in range(3))
    pk, pv = rnd(2, 2, 2, 2, 3, 32, dtype=dt), rnd(2, 2, 2, 2, 3, 32, dtype=dt)

    def fn(q, k, v, pk, pv, backend):
        return prompted_attention(q, k, v, pk, pv, backend=backend)
    check(fn, [q, k, v, pk, pv], dt, "4 batch dims")


@pytest.mark.parametrize("Lq,Lk,P", [(5, 40, 3), (33, 7, 17), (1, 1, 1), (70, 0, 2)])
def test_lengths_not_multiple_of_tile(Lq, Lk, P):
    dt = torch.float32

    def fn(q, k, v, pk, pv, backend):
        return prompted_attention(q, k, v, pk, pv, scale=0.3, backend=backend)
    check(fn, [rnd(2, Lq, 32), rnd(2, Lk, 32), rnd(2, Lk, 32), rnd(P, 32), rnd(P, 32)], dt,
          f"Lq={Lq} Lk={Lk} P={P}")


def test_no_batch_dims_head_dim_128():
    def fn(q, k, v, pk, pv, backend):
        return prompted_attention(q, k, v, pk, pv, backend=backend)
    check(fn, [rnd(20, 128), rnd(20, 128), rnd(20, 128), rnd(2, 128), rnd(2, 128)],
          torch.float32, "2-D, E=128")


def test_zero_prompts_and_no_prompts():
    qkv = rnd(1, 3, 19, 3, 2, 32)
    check(_qkv_fn(2), [qkv, rnd(2, 0, 32), rnd(2, 0, 32)], torch.float32, "P=0")

    def fn(q, backend):
        return prompted_attention(q[..., :16, :], q[..., 16:, :], q[..., 16:, :] * 2,
                                  backend=backend)
    check(fn, [rnd(3, 45, 64)], torch.float32, "no prompts, aliasing q/k/v")


def test_segments_with_one_unprompted_segment():
    q, k, v = rnd(2, 2, 30, 32), rnd(2, 2, 30, 32), rnd(2, 2, 30, 32)

    def fn(q, k, v, pk, pv, backend):
        return prompted_attention(q, k, v, [None, pk], [None, pv], segments=(9, 21),
                                  backend=backend)
    check(fn, [q, k, v, rnd(2, 2, 4, 32), rnd(2, 1, 4, 32)], torch.float32,
          "segments (None, per-sample prompts)")


def test_segments_with_an_empty_segment():
    q, k, v = rnd(3, 17, 32), rnd(3, 17, 32), rnd(3, 17, 32)

    def fn(q, k, v, pk0, pk1, pv0, pv1, backend):
        return prompted_attention(q, k, v, [pk0, pk1], [pv0, pv1], segments=(0, 17),
                                  backend=backend)
    check(fn, [q, k, v, *(rnd(2, 32) for _ in range(4))], torch.float32, "segments (0, 17)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segs", [(5, 0, 11), (3, 7, 2, 9)])
def test_three_and_four_segments(dtype, segs):
    # up to 4 block-diagonal segments in one launch, each with its own prompts (one
    # unprompted, counts differ), on a packed-QKV view
    n = sum(segs)
    qkv = rnd(1, 2, n, 3, 2, 32, dtype=dtype)
    counts = [2, 0, 3, 1][:len(segs)]
    pks = [None if c == 0 else rnd(2, c, 32, dtype=dtype) for c in counts]
    pvs = [None if c == 0 else rnd(2, c, 32, dtype=dtype) for c in counts]
    given = [t for t in pks + pvs if t is not None]

    def fn(qkv, *ps):
        *ps, backend = ps
        it = iter(ps)
        pk = [None if c == 0 else next(it) for c in counts]
        pv = [None if c == 0 else next(it) for c in counts]
        return prompted_attention_qkv(qkv, pk, pv, qkv_dim=3, seq_dim=2, segments=segs,
                                      backend=backend)
    check(fn, [qkv, *given], dtype, f"segments {segs}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_short_queries_over_long_keys(dtype):
    # Lq <= 32 over a few hundred keys: the "short-q" tile walks keys in 64-row blocks
    q, k, v = rnd(2, 3, 32, dtype=dtype), rnd(2, 239, 32, dtype=dtype), rnd(2, 239, 32, dtype=dtype)

    def fn(q, k, v, pk, pv, backend):
        return prompted_attention(q, k, v, pk, pv, backend=backend)
    check(fn, [q, k, v, rnd(3, 32, dtype=dtype), rnd(3, 32, dtype=dtype)], dtype, "1x239")


def test_tile_table_and_print(monkeypatch, capsys):
    from avstfp_fast.ops import triton_backend as TB
    kinds = {(10, 12, 2): "packed", (1, 239, 3): "short-q", (197, 197, 10): "long"}
    for (lq, lk, p), kind in kinds.items():
        t = TB._Tiles(lq, lk, p, 64, torch.bfloat16)
        assert t.kind == kind, (lq, lk, p, t.describe())
    assert TB._Tiles(10, 12, 2, 64, torch.bfloat16).g == 4
    monkeypatch.setenv("AVSTFP_PRINT_TILES", "1")
    TB._PLANS.clear()
    prompted_attention(rnd(2, 5, 32), rnd(2, 7, 32), rnd(2, 7, 32), backend="triton")
    assert "packed: G=" in capsys.readouterr().err


def test_merge_batch_dims():
    from avstfp_fast.ops.layout import dense_strides, merge_batch_dims
    # temporal view (B, N, H, M, d) of a contiguous (B, M, N, H, d): N and H merge
    q = torch.empty(2, 10, 5, 4, 8).movedim(1, -2)
    sizes, (st,) = merge_batch_dims(q.shape[:-2], [q.stride()[:-2]])
    assert sizes == (1, 1, 2, 20) and st == (0, 0, q.stride(0), q.stride(2))
    # a broadcast operand keeps the dims apart; size-1 dims vanish
    sizes, sts = merge_batch_dims((3, 1, 4), [(4, 99, 1), (0, 5, 1)])
    assert sizes == (1, 1, 3, 4) and sts == [(0, 0, 4, 1), (0, 0, 0, 1)]
    with pytest.raises(ValueError, match="batch dims"):
        merge_batch_dims((2,) * 5, [(0, 1, 0, 1, 0)])
    assert dense_strides((1, 2, 3, 4), 10) == (240, 120, 40, 10)


def test_stride0_grad_output():
    # out.sum() hands the backward a gradient with all-zero strides
    q, k, v = (leaf(rnd(2, 11, 32)) for _ in range(3))
    pk, pv = leaf(rnd(2, 32)), leaf(rnd(2, 32))
    prompted_attention(q, k, v, pk, pv, backend="triton").sum().backward()
    ref = [leaf(t.detach().double()) for t in (q, k, v, pk, pv)]
    prompted_attention(*ref, backend="reference").sum().backward()
    for a, b in zip((q, k, v, pk, pv), ref):
        assert rel_err(a.grad, b.grad) <= TOL[torch.float32]


# ------------------------------------------------------------- determinism
def test_deterministic_mode_is_bit_exact_and_correct():
    qkv = rnd(2, 4, 9, 3, 2, 32)
    pk, pv = rnd(2, 3, 32), rnd(2, 3, 32)

    def grads():
        x, a, b = leaf(qkv), leaf(pk), leaf(pv)
        out = prompted_attention_qkv(x, a, b, qkv_dim=3, seq_dim=1, backend="triton")
        out.backward(go)
        return [out.detach(), x.grad, a.grad, b.grad]

    go = torch.randn(2, 9, 2, 4, 32, device=DEV)
    torch.use_deterministic_algorithms(True)
    try:
        r1, r2 = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)
    r3 = grads()                                   # atomic mode agrees within tolerance
    for a, b in zip(r1, r3):
        assert rel_err(a, b) <= 1e-5


# ------------------------------------------------------------- refusals
def _reason(q, k, v, pk=None, pv=None, **kw):
    return get_backend("triton").why_not(make_problem(q, k, v, pk, pv, **kw))


def test_why_not_refuses_unsupported_inputs(monkeypatch):
    q = rnd(2, 8, 32)
    assert _reason(q, q, q) is None
    assert "float64" in _reason(q.double(), q.double(), q.double())
    assert "head dim 48" in _reason(rnd(2, 8, 48), rnd(2, 8, 48), rnd(2, 8, 48))
    assert "value dim" in _reason(q, q, rnd(2, 8, 64))
    t = rnd(2, 32, 8).transpose(-1, -2)
    assert "stride" in _reason(t, q, q)
    assert "segments" in _reason(rnd(2, 10, 32), rnd(2, 10, 32), rnd(2, 10, 32),
                                 segments=(2, 2, 2, 2, 2))
    assert "batch dims" in _reason(rnd(2, 2, 2, 2, 2, 4, 32), rnd(2, 2, 2, 2, 2, 4, 32),
                                   rnd(2, 2, 2, 2, 2, 4, 32))
    if INTERP:
        assert "bfloat16" in _reason(q.bfloat16(), q.bfloat16(), q.bfloat16())
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET" in _reason(q, q, q)


def test_named_backend_raises_with_reason():
    q = rnd(2, 8, 48)
    with pytest.raises(ValueError, match="head dim 48"):
        prompted_attention(q, q, q, backend="triton")


# ------------------------------------------------------------- torch.compile
def test_custom_ops_trace_without_graph_breaks():
    # fake kernels + mutation handling of the custom ops under dynamo/AOTAutograd
    qkv = leaf(rnd(1, 3, 19, 3, 2, 32))
    pk, pv = leaf(rnd(2, 2, 32)), leaf(rnd(2, 2, 32))

    def f(qkv, pk, pv):
        return prompted_attention_qkv(qkv, pk, pv, qkv_dim=3, seq_dim=2, backend="triton")

    get_backend("triton")                          # registered (imported) before tracing
    cf = torch.compile(f, fullgraph=True, backend="aot_eager" if INTERP else "inductor")
    out = cf(qkv, pk, pv)
    out.sum().backward()
    got = [out.detach(), qkv.grad, pk.grad, pv.grad]
    qkv2, pk2, pv2 = leaf(qkv.detach()), leaf(pk.detach()), leaf(pv.detach())
    ref = f(qkv2, pk2, pv2)
    ref.sum().backward()
    for a, b in zip(got, [ref.detach(), qkv2.grad, pk2.grad, pv2.grad]):
        assert rel_err(a, b) <= 1e-5


# ------------------------------------------------------------- model level
def test_prompted_clip_tiny_matches_reference():
    models = pytest.importorskip("avstfp_fast.models.prompted_clip")
    torch.manual_seed(0)
    m = models.PromptedCLIP.tiny(task="ave").to(DEV)
    with torch.no_grad():                          # random prompts, gates, head
        for n, p in m.named_parameters():
            if not n.startswith("visual."):
                p.copy_(torch.randn_like(p) * 0.5)
    B, M = 1, 2
    a = torch.randn(B, M, 98, 128, dtype=torch.float64, device=DEV)
    v = torch.randn(B, M, 3, m.image_size, m.image_size, dtype=torch.float64, device=DEV)

    def run(model, backend, dtype):
        model = model.to(dtype).set_backend(backend)
        out = model(a.to(dtype), v.to(dtype))
        params = [p for p in model.parameters() if p.requires_grad]
        return out, params

    ref, params = run(m, "reference", torch.float64)
    go = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, params, go, allow_unused=True)
    out, params = run(m, "triton", torch.float32)
    g = torch.autograd.grad(out, params, go.float(), allow_unused=True)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert rel_err(out, ref) <= TOL[torch.float32], "logits"
    for n, x, y in zip(names, g, ref_g):
        assert (x is None) == (y is None), n
        if x is not None:
            assert rel_err(x, y) <= TOL[torch.float32], f"grad {n}: {rel_err(x, y):.3g}"


# ------------------------------------------------------------- offline GPU compile (slow)
_COMPILE_SCRIPT = r"""
import sys, torch
sys.path.insert(0, "bench")
import static_sm90 as S                     # the compile-time contract's machinery
from avstfp_fast.ops import make_problem
from avstfp_fast.ops import triton_backend as TB

K = TB._kernels()
launches = []
saved = S._recorders(K, launches, ["small"])
be = TB.TritonBackend()

def run(dt, Lq, E, P, segs=None, det=False):
    q, k, v = (torch.randn(2, 2, Lq, E, dtype=dt) for _ in range(3))
    n = 1 if segs is None else len(segs)
    pks = [torch.randn(2, P, E, dtype=dt) for _ in range(n)]
    p = make_problem(q, k, v, pks if segs else pks[0], pks if segs else pks[0], segments=segs)
    out = torch.empty_like(q)
    lse = be.forward(p, out)
    be.backward(p, out, lse, out, q.clone(), k.clone(), v.clone(), det)

run(torch.bfloat16, 10, 64, 2)                               # temporal: packed tiles
run(torch.float16, 246, 64, 10, segs=(49, 197), det=True)    # spatial: segments, partials
run(torch.float16, 30, 64, 3, segs=(3, 7, 11, 9))           # 4 segments, fused backward
run(torch.float32, 7, 128, 3)                                # fp32 IEEE dots, head dim 128
for name, fn in saved.items():
    setattr(K, name, fn)
for L in launches:                         # real launch specialisation, sm_90
    r = S.compile_one(getattr(K, L.kernel), L.args, L.kwargs)
    assert r["smem"] <= 160 * 1024, (L.kernel, r)
    assert r["spills"] == 0 or L.kwargs["D"] == 128, (L.kernel, r)
print("compiled", len(launches))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_offline():
    """The kernels must also compile for a real GPU (the interpreter accepts more), with
    the specialisation a real launch applies (``bench/static_sm90.py``)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=1800, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled" in r.stdout, r.stdout
