"""What is the triton backend's own: its tile table, the choice between
its backward paths (each checked against the float64 reference, docs/design.md
"Tolerances"), its refusal reasons and the offline sm_90 compile.  The op's shape classes
(stages, lengths, segments, short queries over long keys, layouts) run for every backend
in tests/test_backend_contract.py.

Without a GPU this runs the Triton kernels in the CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1; the backend re-checks it at call time).  With a GPU the same tests run
the compiled kernels.  Grids are kept tiny (the interpreter costs milliseconds per
program instance)."""
import os

import pytest
import torch

from avstfp_fast import prompted_attention
from avstfp_fast.ops import get_backend, make_problem
from avstfp_fast.testing import check_vs_reference

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


# ------------------------------------------------------------- tiles
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


# ------------------------------------------------------------- backward paths
def _grads(q, k, v, pks, pvs, segs, deterministic=False):
    xs = [t.detach().clone().requires_grad_() for t in [q, k, v, *pks, *pvs]]
    n = len(pks)
    pk, pv = xs[3:3 + n], xs[3 + n:]
    if segs is None:
        pk, pv = pk[0], pv[0]
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = prompted_attention(*xs[:3], pk, pv, segments=segs, backend="triton")
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(g.to(out.dtype).to(out.device))
    finally:
        torch.use_deterministic_algorithms(prev)
    return [out.detach()] + [x.grad for x in xs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["long", "packed-one", "packed-direct", "packed-two-phase",
                                  "segments", "shared"])
def test_sequence_and_fa2_backwards_agree(monkeypatch, dtype, case):
    """The sequence-owning backward (one program per sequence; AVSTFP_TRITON_BWD=seq) and
    the key-block-parallel one (fa2) give the same gradients on the same inputs, on every
    tile kind it runs on: long 64 x 64 tiles (key tiles + prompts crossing a tile edge),
    packed one-tile sequences (keys + prompts in one 16-slot tile), packed sequences
    whose keys + prompts need two tiles, several segments (one empty, one unprompted,
    prompts shared or per sample), and programs that walk several sequences sharing their
    prompts (spatial layout, one partial per program; the last program's group short)."""
    from avstfp_fast.ops import triton_backend as TB
    if case == "long":           # 70 keys + 5 prompts: 2 key tiles, prompts in the 2nd
        q, k, v = rnd(2, 40, 32, dtype=dtype), rnd(2, 70, 32, dtype=dtype), rnd(2, 70, 32, dtype=dtype)
        pks, pvs, segs = [rnd(5, 32, dtype=dtype)], [rnd(5, 32, dtype=dtype)], None
    elif case == "packed-one":   # temporal-like: 10 queries, 10 keys + 2 prompts
        q, k, v = (rnd(5, 10, 32, dtype=dtype) for _ in range(3))
        pks, pvs, segs = [rnd(5, 2, 32, dtype=dtype)], [rnd(1, 2, 32, dtype=dtype)], None
    elif case == "packed-direct":   # temporal layout: prompts (N, P, d) over batch (B, N)
        monkeypatch.setattr(TB, "DIRECT_MIN_PROGRAMS", 1)
        q, k, v = (rnd(8, 3, 10, 32, dtype=dtype) for _ in range(3))
        pks, pvs, segs = [rnd(3, 2, 32, dtype=dtype)], [rnd(3, 2, 32, dtype=dtype)], None
    elif case == "packed-two-phase":   # 30 keys + 5 prompts: more than one key tile
        q, k, v = rnd(5, 10, 32, dtype=dtype), rnd(5, 30, 32, dtype=dtype), rnd(5, 30, 32, dtype=dtype)
        pks, pvs, segs = [rnd(5, 32, dtype=dtype)], [rnd(5, 32, dtype=dtype)], None
    elif case == "shared":   # spatial layout: prompts (H, P, d) over batch (B M, H)
        monkeypatch.setattr(TB, "SEQ_PARTIAL_TARGET", 0.0)   # 4 sequences per program
        segs = (1, 0, 36)
        q, k, v = (rnd(5, 3, 37, 32, dtype=dtype) for _ in range(3))
        pks = [rnd(3, n, 32, dtype=dtype) for n in (2, 3, 4)]
        pvs = [rnd(3, n, 32, dtype=dtype) for n in (2, 3, 4)]
    else:
        segs = (1, 0, 37, 3)
        q, k, v = (rnd(2, 41, 32, dtype=dtype) for _ in range(3))
        pks = [rnd(3, 32, dtype=dtype), rnd(2, 32, dtype=dtype), rnd(2, 4, 32, dtype=dtype),
               rnd(1, 32, dtype=dtype)]
        pvs = [rnd(3, 32, dtype=dtype), rnd(2, 32, dtype=dtype), rnd(2, 4, 32, dtype=dtype),
               rnd(1, 32, dtype=dtype)]
    res = {}
    TB._PLANS.clear()
    for path in ("seq", "fa2"):
        monkeypatch.setenv("AVSTFP_TRITON_BWD", path)
        res[path] = _grads(q, k, v, pks, pvs, segs)
    p = make_problem(q, k, v, pks if segs else pks[0], pvs if segs else pvs[0], segments=segs)
    monkeypatch.setenv("AVSTFP_TRITON_BWD", "seq")
    t = TB.tile_for(p)
    assert t.bwd == "seq", t.describe()
    assert t.bwd_one == (case in ("packed-one", "packed-direct")), t.describe()
    assert any(pl.direct for pl in TB._PLANS.values()) == (case == "packed-direct")
    if case == "shared":
        assert max(pl.ns for pl in TB._PLANS.values()) == 4
    TB._PLANS.clear()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for i, (a, b) in enumerate(zip(res["seq"], res["fa2"])):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol), \
            (case, i, (a.float() - b.float()).abs().max())
    # and the sequence-owning path is right (vs the float64 reference)
    check(lambda q, k, v, *ps: prompted_attention(
        q, k, v, list(ps[:len(pks)]) if segs else ps[0],
        list(ps[len(pks):-1]) if segs else ps[1], segments=segs, backend=ps[-1]),
        [q, k, v, *pks, *pvs], dtype, case)


def test_backward_path_rule_at_its_boundary(monkeypatch):
    """The tile table picks the sequence-owning backward up to SEQ_MAX_ROWS rows (queries,
    or keys + prompts) and the fa2 one above; both sides of the edge are right."""
    from avstfp_fast.ops import triton_backend as TB
    monkeypatch.setattr(TB, "SEQ_MAX_ROWS", 48)
    TB._PLANS.clear()
    for lk, want in ((44, "seq"), (45, "fa2")):
        q, k, v = rnd(2, 40, 32), rnd(2, lk, 32), rnd(2, lk, 32)
        pk, pv = rnd(4, 32), rnd(4, 32)
        assert TB.tile_for(make_problem(q, k, v, pk, pv)).bwd == want
        check(lambda q, k, v, pk, pv, backend: prompted_attention(q, k, v, pk, pv,
                                                                  backend=backend),
              [q, k, v, pk, pv], torch.float32, f"Lk={lk}")
    assert TB._Tiles(197, 197, 10, 64, torch.bfloat16).bwd == "fa2"   # patched bound
    monkeypatch.undo()
    TB._PLANS.clear()
    for lq, lk, p in ((197, 197, 10), (49, 49, 10), (248, 246, 2), (321, 321, 2),
                      (10, 10, 2)):
        assert TB._Tiles(lq, lk, p, 64, torch.bfloat16).bwd == "seq", (lq, lk, p)
    assert TB._Tiles(10, 10, 2, 64, torch.bfloat16).bwd_one
    assert TB._Tiles(512, 512, 0, 64, torch.bfloat16).bwd == "fa2"


def test_sequence_backward_is_bit_exact_and_launches_twice():
    """The sequence-owning backward has no atomics: two runs (and the deterministic
    mode) give identical bits; it is one kernel plus the prompt-gradient reduction."""
    from avstfp_fast.ops import triton_backend as TB
    # (prompts small next to the sequences: partials within SEQ_MAX_PARTIAL, see below)
    q, k, v = (rnd(2, 3, 40, 32, dtype=torch.float16) for _ in range(3))
    pks = [rnd(3, 2, 32, dtype=torch.float16), rnd(3, 1, 32, dtype=torch.float16)]
    pvs = [rnd(3, 2, 32, dtype=torch.float16), rnd(3, 1, 32, dtype=torch.float16)]
    # (16, 24): packed one-tile sequences; (36, 4): 64-row tiles, two sequences sharing
    # their prompts per program (one partial for both, summed in a fixed order)
    TB._PLANS.clear()
    for segs in ((16, 24), (36, 4)):
        runs = [_grads(q, k, v, pks, pvs, segs, det) for det in (False, False, True)]
        for a, b, c in zip(*runs):
            assert torch.equal(a, b) and torch.equal(a, c)
    assert sorted(pl.ns for pl in TB._PLANS.values() if pl.seq) == [1, 1, 2, 2]
    launches = []
    K = TB._kernels()

    class Rec:                          # records kernel[grid](...) without running it
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append(self.name)
    saved = {n: getattr(K, n) for n in dir(K) if n.startswith("prompted_attn")}
    for n in saved:
        setattr(K, n, Rec(n))
    try:
        p = make_problem(q, k, v, pks, pvs, segments=(16, 24))
        out = torch.empty_like(q)
        be = TB.TritonBackend()
        lse = be.forward(p, out)
        n_fwd = len(launches)
        be.backward(p, out, lse, out, torch.empty_like(q), torch.empty_like(k),
                    torch.empty_like(v), False)
    finally:
        for name, fn in saved.items():
            setattr(K, name, fn)
    assert n_fwd == 1
    assert launches[1:] == ["prompted_attn_bwd_seq", "prompted_attn_pgrad"]
    # where the partials would cost more (2 prompts on 10 + 10 rows, shared over the whole
    # batch: no direct mode), the fa2 path takes over
    assert TB._partial_share(q, [rnd(2, 32)], [10], [10]) > TB.SEQ_MAX_PARTIAL


def test_direct_prompt_gradients_through_the_custom_op(monkeypatch):
    """Traced calls get the backward through the ``avstfp_triton::attn_bwd`` custom op,
    whose outputs may not alias each other: the direct mode's dpk and dpv are separate
    buffers; compiled and eager gradients agree."""
    from avstfp_fast.ops import triton_backend as TB
    monkeypatch.setattr(TB, "DIRECT_MIN_PROGRAMS", 1)
    TB._PLANS.clear()
    q, k, v = (rnd(8, 3, 10, 32) for _ in range(3))
    pk, pv = rnd(3, 2, 32), rnd(3, 2, 32)

    def f(q, k, v, pk, pv):
        return prompted_attention(q, k, v, pk, pv, backend="triton")
    grads = []
    for fn in (torch.compile(f, backend="aot_eager", fullgraph=True), f):
        xs = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
        fn(*xs).square().sum().backward()
        grads.append([x.grad for x in xs])
    assert any(pl.direct for pl in TB._PLANS.values())
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    TB._PLANS.clear()


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
import os                                  # the fa2 backward kernels (longer sequences)
os.environ["AVSTFP_TRITON_BWD"] = "fa2"
run(torch.bfloat16, 10, 64, 2)                               # packed, fused
run(torch.float16, 246, 64, 10, segs=(49, 197))              # long, fused
run(torch.float16, 246, 64, 10, segs=(49, 197), det=True)    # long, two-pass
del os.environ["AVSTFP_TRITON_BWD"]
for name, fn in saved.items():
    setattr(K, name, fn)
seen = set()
for L in launches:                         # real launch specialisation, sm_90
    key = (L.kernel,) + S._specialise(getattr(K, L.kernel), L.args, L.kwargs)[3]
    if key in seen:                        # compiled already (a cached compile: no log)
        continue
    seen.add(key)
    r = S.compile_one(getattr(K, L.kernel), L.args, L.kwargs)
    assert r["smem"] <= 160 * 1024, (L.kernel, r)
    assert r["spills"] == 0 or L.kwargs["D"] == 128, (L.kernel, r)
print("compiled", len(launches))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_offline(tmp_path):
    """The kernels must also compile for a real GPU (the interpreter accepts more), with
    the specialisation a real launch applies (``bench/static_sm90.py``)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)     # a cached kernel prints no ptxas log
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=1800, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled" in r.stdout, r.stdout
