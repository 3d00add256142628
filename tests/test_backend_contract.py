"""The ``prompted_attention`` contract, one suite for every backend.

Each case runs for every registered backend (:func:`avstfp_fast.ops.backend_names`) on
every device present (the CPU always, CUDA when there is a GPU) and compares the output
and every gradient with the float64 reference (docs/design.md, "The op contract" and
"Tolerances").  A backend that cannot run a case is skipped with its own ``why_not``
reasons, never by name: on the CPU the reference and torch backends run, the triton
backend runs in the Triton CPU interpreter (``TRITON_INTERPRET=1``, which tests/conftest.py
sets; fp32/fp16 only) and the cuda backend skips; on a GPU every backend runs the same
cases at the ViT-B/16 stage shapes.

Sizes depend on the device: tiny on the CPU (the interpreter costs milliseconds per
program instance), realistic on CUDA; batch products above 65535 run on CUDA only.  The
backend-specific tests (refusal reasons, tile and backward-path choices, the offline sm_90
compile, the CUDA build and its emulation, compute-sanitizer) stay in the backends' own
files.
"""
import os

import torch

# deterministic mode on CUDA: cuBLAS (the autograd-native backends' matmuls) needs a fixed
# workspace, read when its first handle is made
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402

from avstfp_fast import prompted_attention, prompted_attention_qkv  # noqa: E402
from avstfp_fast.ops import backend_names, qkv_views  # noqa: E402
from avstfp_fast.testing import (TOL, check_vs_reference, leaf, randomize_,  # noqa: E402
                                 rel_err, skip_unless_supported, strided)

BACKENDS = backend_names()
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
GPU_DTYPES = (BF16, F16, F32)
_SHORT = {F64: "fp64", F32: "fp32", F16: "fp16", BF16: "bf16"}

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def on(cpu, cuda, name=str):
    """Parameters ``(dev, case)`` per device: the CPU list is kept small, CUDA's is
    realistic; ``name(case)`` is the id."""
    per = {"cpu": cpu, "cuda": cuda}
    return [pytest.param(dev, c, id=f"{dev}-{name(c)}") for dev in DEVICES for c in per[dev]]


def dtypes(cpu=(F32,), cuda=GPU_DTYPES):
    return on(cpu, cuda, lambda d: _SHORT[d])


def rnd(dev, dtype, *shape):
    return torch.randn(*shape, dtype=dtype, device=dev)


def attn(q, k, v, pk, pv, backend, **kw):
    return prompted_attention(q, k, v, pk, pv, backend=backend, **kw)


# ----------------------------------------------------------------------------- stages
# (B, M, N, 3, H, d) packed projection output; temporal attends over M (seq_dim 1),
# spatial/fusion over N (seq_dim 2).  CUDA: ViT-B/16, 10 frames, 48 audio + 196 visual
# patches (+ CLS each): temporal B*N*H sequences of 10 queries and 10 + 2 keys, spatial
# 49 | 197 queries + 10 prompts per segment, fusion 246 + 2.
STAGES = {
    "cpu": {"temporal": dict(B=1, M=10, N=7, H=2, d=32, P=(2,)),
            "temporal_per_position": dict(B=2, M=10, N=5, H=2, d=32, P=(2,)),
            "spatial": dict(B=1, M=2, N=83, H=2, d=32, P=(3, 5), segs=(13, 70)),
            "fusion": dict(B=1, M=2, N=67, H=2, d=64, P=(2,))},
    "cuda": {"temporal": dict(B=2, M=10, N=246, H=12, d=64, P=(2,)),
             "temporal_per_position": dict(B=2, M=10, N=246, H=12, d=64, P=(2,)),
             "spatial": dict(B=2, M=10, N=246, H=12, d=64, P=(10, 10), segs=(49, 197)),
             "fusion": dict(B=2, M=10, N=246, H=12, d=64, P=(2,)),
             # the image tower's own spatial attention at ViT-L/14 (256 patches + CLS)
             "spatial_vit_l14": dict(B=1, M=10, N=257, H=16, d=64, P=(10,))},
}


@pytest.mark.parametrize("dev,case", on(
    cpu=[(dt, st) for dt in (F32, F16, BF16) for st in STAGES["cpu"]],
    cuda=[(dt, st) for dt in GPU_DTYPES for st in STAGES["cuda"]],
    name=lambda c: f"{_SHORT[c[0]]}-{c[1]}"))
def test_stage(backend, dev, case):
    """The three AV-STFP stages through ``prompted_attention_qkv`` (one gradient buffer
    shaped like the projection output for kernel backends)."""
    dtype, stage = case
    g = STAGES[dev][stage]
    qkv = rnd(dev, dtype, g["B"], g["M"], g["N"], 3, g["H"], g["d"])
    seq_dim = 1 if stage.startswith("temporal") else 2
    lead = (g["N"], g["H"]) if stage == "temporal_per_position" else (g["H"],)
    pks = [rnd(dev, dtype, *lead, P, g["d"]) for P in g["P"]]
    pvs = [rnd(dev, dtype, *lead, P, g["d"]) for P in g["P"]]
    segs = g.get("segs")
    one = segs is None
    skip_unless_supported(backend, *qkv_views(qkv, 3, seq_dim), pks[0] if one else pks,
            pvs[0] if one else pvs, segments=segs)

    def fn(qkv, *prompts):
        *prompts, backend = prompts
        n = len(prompts) // 2
        pk, pv = list(prompts[:n]), list(prompts[n:])
        return prompted_attention_qkv(qkv, pk[0] if one else pk, pv[0] if one else pv,
                                      qkv_dim=3, seq_dim=seq_dim, segments=segs,
                                      backend=backend)
    check_vs_reference(fn, [qkv, *pks, *pvs], dtype, backend, f"{stage} on {dev}")


@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("dev,dtype", dtypes(cpu=(F64, F32), cuda=(BF16, F32)))
def test_packed_equals_views(backend, dev, dtype, seq_dim):
    """``prompted_attention_qkv`` == ``prompted_attention`` on the same views, output and
    the gradient of the packed buffer, on the same backend."""
    shape = (2, 3, 5, 3, 2, 32) if dev == "cpu" else (2, 10, 50, 3, 12, 64)
    qkv = leaf(rnd(dev, dtype, *shape))
    pk, pv = rnd(dev, dtype, shape[-2], 2, shape[-1]), rnd(dev, dtype, shape[-2], 2, shape[-1])
    skip_unless_supported(backend, *qkv_views(qkv, 3, seq_dim), pk, pv)
    out = prompted_attention_qkv(qkv, pk, pv, qkv_dim=3, seq_dim=seq_dim, backend=backend)
    want = attn(*qkv_views(qkv, 3, seq_dim), pk, pv, backend)
    go = torch.randn_like(out)
    g1, = torch.autograd.grad(out, qkv, go)
    g2, = torch.autograd.grad(want, qkv, go)
    assert rel_err(out, want) <= TOL[dtype] and rel_err(g1, g2) <= TOL[dtype]


# ----------------------------------------------------------------------------- layouts
LAYOUTS = ("contiguous", "permuted", "sliced")
PROMPT_SHAPES = ("shared", "partial", "full")


@pytest.mark.parametrize("dev,case", on(
    cpu=[(F32, "permuted", "partial"), (F32, "sliced", "partial"), (F32, "permuted", "full"),
         (F32, "sliced", "shared")],
    cuda=[(dt, lay, pr) for dt in GPU_DTYPES for lay in LAYOUTS for pr in PROMPT_SHAPES],
    name=lambda c: "-".join([_SHORT[c[0]], *c[1:]])))
def test_strided_views_several_batch_dims(backend, dev, case):
    """Non-contiguous views (memory order reversed, every second row of a wider buffer)
    with a size-1 dim among the batch dims; prompts shared, broadcast over some batch dims
    (stride 0), or one per sample."""
    dtype, layout, prompt = case
    batch, Lq, Lk, E, P = ((2, 1, 3, 2), 9, 21, 32, 4) if dev == "cpu" else \
        ((2, 5, 3), 37, 41, 64, 3)
    q = strided((*batch, Lq, E), dtype, layout, dev)
    k = strided((*batch, Lk, E), dtype, layout, dev)
    v = strided((*batch, Lk, E), dtype, layout, dev)
    lead = {"shared": (), "partial": (*batch[1:-1], 1), "full": batch}[prompt]
    pk, pv = rnd(dev, dtype, *lead, P, E), rnd(dev, dtype, *lead, P, E)
    skip_unless_supported(backend, q, k, v, pk, pv)
    check_vs_reference(attn, [q, k, v, pk, pv], dtype, backend, f"{layout}/{prompt}")


@pytest.mark.parametrize("dev,dtype", dtypes(cpu=(F16,)))
def test_four_batch_dims_and_per_sample_prompts(backend, dev, dtype):
    batch, L, E = ((2, 2, 2, 2), 20, 32) if dev == "cpu" else ((2, 3, 4, 5), 37, 64)
    q, k, v = (rnd(dev, dtype, *batch, L, E) for _ in range(3))
    pk, pv = rnd(dev, dtype, *batch, 3, E), rnd(dev, dtype, *batch, 3, E)
    skip_unless_supported(backend, q, k, v, pk, pv)
    check_vs_reference(attn, [q, k, v, pk, pv], dtype, backend, "4 batch dims")


# ----------------------------------------------------------------------------- lengths
# (batch, Lq, Lk, P, E): lengths not multiple of any tile, Lk = 0 (prompts only), 1 x 1,
# head dims 32/64/128, no batch dims
_CPU_LENGTHS = [((2,), 5, 40, 3, 32), ((2,), 33, 7, 17, 32), ((2,), 1, 1, 1, 32),
                ((2,), 70, 0, 2, 32), ((2,), 1, 1, 0, 64), ((2,), 17, 5, 3, 64),
                ((), 20, 20, 2, 128)]
_GPU_LENGTHS = [((3, 2), Lq, Lk, P, E) for E in (32, 64, 128)
                for Lq, Lk, P in [(1, 1, 0), (10, 10, 2), (17, 5, 3), (63, 65, 1), (7, 13, 3),
                                  (130, 200, 10), (129, 67, 17), (16, 0, 4), (33, 97, 0),
                                  (300, 300, 0)]] + [((), 20, 20, 2, 128)] + [
    # Lq = 0 (keys and prompts that no query sees: zero gradients, no work left in flight)
    ((3, 2), 0, 5, 2, 64), ((3, 2), 0, 5, 0, 64), ((3, 2), 0, 0, 3, 32)]


@pytest.mark.parametrize("dev,case", on(
    cpu=[(F32, c) for c in _CPU_LENGTHS],
    cuda=[(dt, c) for dt in GPU_DTYPES for c in _GPU_LENGTHS],
    name=lambda c: "{}-b{}-Lq{}-Lk{}-P{}-E{}".format(_SHORT[c[0]], len(c[1][0]), *c[1][1:])))
def test_lengths_and_head_dims(backend, dev, case):
    dtype, (batch, Lq, Lk, P, E) = case
    q, k, v = rnd(dev, dtype, *batch, Lq, E), rnd(dev, dtype, *batch, Lk, E), \
        rnd(dev, dtype, *batch, Lk, E)
    if len(batch) >= 2:                           # k in another batch stride order
        k = k.transpose(0, 1).contiguous().transpose(0, 1)
    inputs = [q, k, v]
    if P:
        lead = batch[-1:]
        inputs += [rnd(dev, dtype, *lead, P, E), rnd(dev, dtype, *lead, P, E)]
    skip_unless_supported(backend, *inputs)

    def fn(q, k, v, *rest):
        *prompts, backend = rest
        # a non-default scale, sharper than E ** -0.5 (not much: the reference backend in
        # bf16 rounds the scores themselves and misses 1e-2 on sharp long rows at E = 128)
        return prompted_attention(q, k, v, *(prompts or (None, None)), scale=1.7 * E ** -0.5,
                                  backend=backend)
    check_vs_reference(fn, inputs, dtype, backend, f"batch {batch} Lq={Lq} Lk={Lk} P={P} E={E}")


# short queries over long keys (Lq <= 32, Lk > 64; the kernels' short-query tiles walk the
# keys in blocks): (batch, Lq, Lk); shared prompts on the CPU, per head on CUDA
_CPU_SHORT_Q = [((2,), 3, 239)]
_GPU_SHORT_Q = [((4, 3), 1, 239), ((4, 3), 10, 512), ((4, 3), 32, 1000)]


@pytest.mark.parametrize("dev,case", on(
    cpu=[(dt, c) for dt in (F32, F16) for c in _CPU_SHORT_Q],
    cuda=[(BF16, c) for c in _GPU_SHORT_Q],
    name=lambda c: "{}-b{}-Lq{}-Lk{}".format(_SHORT[c[0]], len(c[1][0]), *c[1][1:])))
def test_short_queries_over_long_keys(backend, dev, case):
    dtype, (batch, Lq, Lk) = case
    E, P, lead = (32, 3, ()) if dev == "cpu" else (64, 2, batch[-1:])
    inputs = [rnd(dev, dtype, *batch, Lq, E), rnd(dev, dtype, *batch, Lk, E),
              rnd(dev, dtype, *batch, Lk, E), rnd(dev, dtype, *lead, P, E),
              rnd(dev, dtype, *lead, P, E)]
    skip_unless_supported(backend, *inputs)
    check_vs_reference(attn, inputs, dtype, backend, f"short queries {Lq}x{Lk}")


# batch products above 65535 (GPU only: the grid limit of one axis): one sequence per
# program (L = 40), packed short tiles (L = 10), 270 000 sequences in 3 batch dims
_GPU_BIG_BATCH = [((70_000,), 10), ((70_000,), 40), ((10, 2250, 12), 10)]


@pytest.mark.parametrize("dev,case", on(
    cpu=[], cuda=[(F16, c) for c in _GPU_BIG_BATCH],
    name=lambda c: "{}-{}-L{}".format(_SHORT[c[0]], "x".join(map(str, c[1][0])), c[1][1]))
    or [pytest.param(None, None, id="gpu-only", marks=pytest.mark.skip(reason="needs a GPU"))])
def test_batch_product_above_65535(backend, dev, case):
    dtype, (batch, L) = case
    inputs = [rnd(dev, dtype, *batch, L, 32) for _ in range(3)]
    inputs += [rnd(dev, dtype, 2, 32), rnd(dev, dtype, 2, 32)]
    skip_unless_supported(backend, *inputs)
    check_vs_reference(attn, inputs, dtype, backend, f"batch {batch} L={L}")


@pytest.mark.parametrize("dev,dtype", dtypes())
def test_zero_prompts_and_no_prompts(backend, dev, dtype):
    """P = 0 prompt tensors; no prompts at all, with q, k and v views of one tensor."""
    shape = (1, 3, 19, 3, 2, 32) if dev == "cpu" else (2, 10, 246, 3, 12, 64)
    qkv = rnd(dev, dtype, *shape)
    pk, pv = rnd(dev, dtype, shape[-2], 0, shape[-1]), rnd(dev, dtype, shape[-2], 0, shape[-1])
    skip_unless_supported(backend, *qkv_views(qkv, 3, 2), pk, pv)

    def packed(qkv, pk, pv, backend):
        return prompted_attention_qkv(qkv, pk, pv, qkv_dim=3, seq_dim=2, backend=backend)
    check_vs_reference(packed, [qkv, pk, pv], dtype, backend, "P=0")

    x = rnd(dev, dtype, *((3, 45, 64) if dev == "cpu" else (24, 300, 64)))

    def aliased(x, backend):
        return prompted_attention(x[..., :16, :], x[..., 16:, :], x[..., 16:, :] * 2,
                                  backend=backend)
    check_vs_reference(aliased, [x], dtype, backend, "no prompts, aliasing q/k/v")


# ----------------------------------------------------------------------------- segments
# lengths and, per segment, its prompts: "-" none, "s" shared (P, E), "h" per head
# (H, P, E), "b" per sample: k prompt (*batch, P, E), v prompt broadcast over the last dim
_CPU_SEGMENTS = [((9, 21), "-b"), ((0, 17), "ss"), ((7, 0, 20), "s-h"), ((5, 6, 7), "hhh"),
                 ((3, 4, 5, 6), "sh-s"), ((5, 0, 11), "h-h"), ((3, 7, 2, 9), "h-hh")]
#: also run in float16 on the CPU (3 and 4 segments, an empty and an unprompted one)
_CPU_SEGMENTS_F16 = [((5, 0, 11), "h-h"), ((3, 7, 2, 9), "h-hh")]
_GPU_SEGMENTS = _CPU_SEGMENTS + [((49, 197), "hh"), ((16, 16), "h-"), ((1, 2, 3, 4), "h-h-"),
                                 ((7, 0, 20), "h-h"),
                                 # 4 segments at stage lengths (one unprompted)
                                 ((49, 3, 197, 37), "hhh-"),
                                 # empty first segment with prompts (packed 16-row tiles and
                                 # 64-row tiles), 1-token segments
                                 ((0, 10), "hh"), ((0, 10), "--"), ((0, 40), "s-"),
                                 ((1, 1, 0, 14), "h-sh")]


@pytest.mark.parametrize("dev,case", on(
    cpu=[(F32, c) for c in _CPU_SEGMENTS] + [(F16, c) for c in _CPU_SEGMENTS_F16],
    cuda=[(dt, c) for dt in GPU_DTYPES for c in _GPU_SEGMENTS],
    name=lambda c: f"{_SHORT[c[0]]}-{'_'.join(map(str, c[1][0]))}-{c[1][1]}"))
def test_segments(backend, dev, case):
    """Block-diagonal attention with per-segment prompts, incl. an unprompted and an
    empty segment, and up to 4 segments."""
    dtype, (segs, kinds) = case
    batch, E = ((2, 2), 32) if dev == "cpu" else ((2, 3), 64)
    L = sum(segs)
    q, k, v = (rnd(dev, dtype, *batch, L, E) for _ in range(3))
    pks, pvs = [], []
    for i, kind in enumerate(kinds):
        P = 2 + i
        if kind == "-":
            pks.append(None)
            pvs.append(None)
            continue
        lk = {"s": (), "h": batch[-1:], "b": batch}[kind]
        lv = (*batch[:-1], 1) if kind == "b" else lk
        pks.append(rnd(dev, dtype, *lk, P, E))
        pvs.append(rnd(dev, dtype, *lv, P, E))
    skip_unless_supported(backend, q, k, v, pks, pvs, segments=segs)
    present = [t is not None for t in pks]

    def fn(q, k, v, *rest):
        *prompts, backend = rest
        n = len(prompts) // 2
        it_k, it_v = iter(prompts[:n]), iter(prompts[n:])
        pk = [next(it_k) if pr else None for pr in present]
        pv = [next(it_v) if pr else None for pr in present]
        return prompted_attention(q, k, v, pk, pv, segments=segs, backend=backend)
    prompts = [t for t in pks if t is not None] + [t for t in pvs if t is not None]
    check_vs_reference(fn, [q, k, v, *prompts], dtype, backend, f"segments {segs} {kinds}")


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("dev,dtype", dtypes(cuda=(F32,)))
def test_stride0_grad_output(backend, dev, dtype):
    """``out.sum()`` hands the backward a gradient whose strides are all zero."""
    shape = (2, 11, 32) if dev == "cpu" else (2, 12, 197, 64)
    q, k, v = (leaf(rnd(dev, dtype, *shape)) for _ in range(3))
    pk, pv = leaf(rnd(dev, dtype, 2, shape[-1])), leaf(rnd(dev, dtype, 2, shape[-1]))
    skip_unless_supported(backend, q, k, v, pk, pv)
    attn(q, k, v, pk, pv, backend).sum().backward()
    ref = [leaf(t.detach().double()) for t in (q, k, v, pk, pv)]
    attn(*ref, "reference").sum().backward()
    for name, a, b in zip(("q", "k", "v", "pk", "pv"), (q, k, v, pk, pv), ref):
        assert rel_err(a.grad, b.grad) <= TOL[dtype], f"grad {name}: {rel_err(a.grad, b.grad)}"


@pytest.mark.parametrize("stage", ["temporal", "spatial"])
@pytest.mark.parametrize("dev,dtype", dtypes(cuda=(BF16, F32)))
def test_deterministic_mode_is_bit_exact_and_correct(backend, dev, dtype, stage):
    """Under ``torch.use_deterministic_algorithms(True)`` two runs give bit-identical
    outputs and gradients (prompt gradients included: the kernel backends reduce them
    over the batch in a fixed order), and both modes are within tolerance of the
    reference.  A backend without a deterministic mode refuses through ``why_not``."""
    B, M, N, H, d = (2, 4, 9, 2, 32) if dev == "cpu" else (2, 10, 246, 12, 64)
    qkv = rnd(dev, dtype, B, M, N, 3, H, d)
    if stage == "temporal":
        seq_dim, segs = 1, None
        pks, pvs = [rnd(dev, dtype, H, 3, d)], [rnd(dev, dtype, H, 3, d)]
    else:
        seq_dim, segs = 2, (4, N - 4) if dev == "cpu" else (49, 197)
        pks = [rnd(dev, dtype, H, 2 + i, d) for i in range(2)]
        pvs = [rnd(dev, dtype, H, 2 + i, d) for i in range(2)]
    one = segs is None

    def run(backend, qkv=qkv, pks=pks, pvs=pvs):
        x, a, b = leaf(qkv), [leaf(t) for t in pks], [leaf(t) for t in pvs]
        out = prompted_attention_qkv(x, a[0] if one else a, b[0] if one else b, qkv_dim=3,
                                     seq_dim=seq_dim, segments=segs, backend=backend)
        out.backward(go.to(out.dtype))
        return [out.detach(), x.grad] + [t.grad for t in a + b]

    go = rnd(dev, dtype, *qkv_views(qkv, 3, seq_dim)[0].shape)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        skip_unless_supported(backend, *qkv_views(qkv, 3, seq_dim), pks[0] if one else pks,
                pvs[0] if one else pvs, segments=segs)
        r1, r2 = run(backend), run(backend)
    finally:
        torch.use_deterministic_algorithms(prev)
    ref = run("reference", qkv.double(), [t.double() for t in pks], [t.double() for t in pvs])
    r3 = run(backend)
    names = ["out", "dqkv"] + [f"dprompt{i}" for i in range(len(pks) + len(pvs))]
    for n, a, b, c, r in zip(names, r1, r2, r3, ref):
        assert torch.equal(a, b), f"{n}: deterministic mode is not bit-exact"
        assert rel_err(a, r) <= TOL[dtype], f"{n} (deterministic): {rel_err(a, r):.3g}"
        assert rel_err(c, r) <= TOL[dtype], f"{n} (default mode): {rel_err(c, r):.3g}"


# ----------------------------------------------------------------------------- model level
_TINY = dict(width=64, heads=2, task="ave")
_MODEL_CASES = {}


def _tiny_model_case(dev):
    """(float64 model, audio, video, dlogits, reference logits, reference gradients) of
    the literal reference model, computed once per device (fixed seed: every backend
    is compared on the same model and inputs)."""
    if dev not in _MODEL_CASES:
        from avstfp_fast import PromptedCLIP
        with torch.random.fork_rng(devices=[] if dev == "cpu" else None):
            torch.manual_seed(0)
            m = randomize_(PromptedCLIP.tiny(**_TINY)).to(dev, torch.float64)
            B, M = 1, 2
            a = torch.randn(B, M, 98, 128, dtype=torch.float64, device=dev)
            v = torch.randn(B, M, 3, m.image_size, m.image_size, dtype=torch.float64,
                            device=dev)
            ref = m.set_backend("reference")(a, v)
            go = torch.randn_like(ref)
        params = [p for p in m.parameters() if p.requires_grad]
        ref_g = torch.autograd.grad(ref, params, go, allow_unused=True)
        _MODEL_CASES[dev] = (m, a, v, go, ref.detach(), ref_g)
    return _MODEL_CASES[dev]


@pytest.mark.parametrize("dev", DEVICES)
def test_prompted_clip_tiny_matches_reference(backend, dev):
    """The tiny PromptedCLIP on this backend (fp32) vs the literal reference model in
    float64: logits and every trainable gradient."""
    import copy
    probe = rnd(dev, F32, 2, 8, _TINY["width"] // _TINY["heads"])
    skip_unless_supported(backend, probe, probe, probe)
    m64, a, v, go, ref, ref_g = _tiny_model_case(dev)
    m = copy.deepcopy(m64).float().set_backend(backend)
    out = m(a.float(), v.float())
    params = [p for p in m.parameters() if p.requires_grad]
    g = torch.autograd.grad(out, params, go.float(), allow_unused=True)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert rel_err(out, ref) <= TOL[F32], f"logits: {rel_err(out, ref):.3g}"
    for n, x, y in zip(names, g, ref_g):
        assert (x is None) == (y is None), n
        if x is not None:
            # a gate's gradient is one sum over every token: ~1e-5 rounding in fp32 alone
            tol = 5e-5 if n.startswith("beta_") else TOL[F32]
            assert rel_err(x, y) <= tol, f"grad {n}: {rel_err(x, y):.3g}"


# ----------------------------------------------------------------------------- torch.compile
class _Block(torch.nn.Module):
    """Temporal then spatial prompted attention with projections (a transformer block's
    attention half): what the model compiles."""

    def __init__(self, D, H, P=3):
        super().__init__()
        self.H = H
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.proj = torch.nn.Linear(D, D)
        self.pk = torch.nn.Parameter(torch.randn(H, P, D // H))
        self.pv = torch.nn.Parameter(torch.randn(H, P, D // H))
        self.backend = "reference"

    def forward(self, x):                      # x (B, M, N, D)
        B, M, N, D = x.shape
        for seq_dim in (1, 2):
            qkv = self.qkv(x).view(B, M, N, 3, self.H, D // self.H)
            o = prompted_attention_qkv(qkv, self.pk, self.pv, qkv_dim=3, seq_dim=seq_dim,
                                       backend=self.backend)
            x = x + self.proj(o.movedim(-2, seq_dim).reshape(B, M, N, D))
        return x


@pytest.mark.parametrize("dev", DEVICES)
def test_torch_compile_fullgraph(backend, dev):
    """``torch.compile(fullgraph=True)`` captures the op without a graph break (kernel
    backends: custom ops with fake implementations) and computes the same values."""
    (B, M, N, D, H), compiler = ((1, 3, 7, 64, 2), "aot_eager") if dev == "cpu" else \
        ((2, 10, 50, 128, 2), "inductor")
    m = _Block(D, H).to(dev)
    x = torch.randn(B, M, N, D, device=dev)
    probe = x.new_empty(2, 8, D // H)
    skip_unless_supported(backend, probe, probe, probe)
    m.double()
    ref = m(x.double())
    ref_g = torch.autograd.grad(ref.sum(), list(m.parameters()))
    m.float()
    m.backend = backend
    with torch.no_grad():                      # load (build, import) the backend eagerly,
        m(x)                                   # outside the traced region
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend=compiler)(x)
    g = torch.autograd.grad(out.sum(), list(m.parameters()))
    assert rel_err(out, ref) <= TOL[F32], f"out: {rel_err(out, ref):.3g}"
    for (n, _), a, b in zip(m.named_parameters(), g, ref_g):
        assert rel_err(a, b) <= 1e-4, f"grad {n}: {rel_err(a, b):.3g}"
