"""Host path of the Triton backend: the CPU time of one eager call through the public op,
as the model calls it, with only the lowest-level launch stubbed.

Method.  ``prompted_attention_qkv`` on the packed QKV buffer (``qkv_dim=3``, the stage's
``seq_dim`` and segments; prompts with ``requires_grad``), forward under autograd, and the
backward via ``.backward()`` (leaf gradients reset to None before each call, as an
optimizer's ``zero_grad`` does).  Kernels launch on a faked sm_90 target
(``bench/fake_sm90.py``): Triton's ``JITFunction.run``, argument binder, cache lookup and
``CudaLauncher`` run; the compile and the C launch (argument unpacking,
``cuLaunchKernelEx``) are stubbed.  So validation, backend choice, autograd, allocations
and Triton's Python launch path are all counted.

Tensors are CPU tensors standing in for CUDA ones (no GPU here): the backend's one refusal
of CPU tensors outside the interpreter is lifted for the measurement, nothing else.  Sizes
are the CI geometry (``tiny``: a few tokens, batch 1): host work does not depend on the
sizes, while CPU allocations and fills of full-size buffers would be real work on the
CPU (a GPU allocates from its caching allocator and fills on the device).  Torch ops
that a GPU runs as kernels (fills, copies, casts) run here on the CPU at that tiny size,
at roughly their launch cost.

Timer: thread CPU time (``time.thread_time``), median; targets on the 2-core CI machine:
eager forward <= 20 µs, eager backward <= 40 µs (benchmark targets, never timed tests).

    python bench/test_triton_host.py [--runs 3] [--out bench/results/host-path-after.md]

prints the totals and the components (validation, backend choice, the backend's
forward/backward, Triton's launch path) per stage; the backward again on the
sequence-owning path (``AVSTFP_TRITON_BWD=seq``: the one the stages take at ViT-B/16,
while the CI geometry's temporal and spatial calls take the fa2 path by size); the
forward and backward again at the ViT-B/16 stage shape (batch 1), where the plan picks
that path itself; and the autograd engine's own share, a no-op ``autograd.Function`` of
the same arity.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Dict

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import geometry  # noqa: E402
from fake_sm90 import fake_sm90  # noqa: E402

try:
    from avstfp_fast.ops import triton_backend as TB
    if TB.interpreting():
        raise ImportError("TRITON_INTERPRET=1: the host path is the compiled kernels' one")
    TB._kernels()
except Exception as e:          # pragma: no cover - triton missing
    if __name__ != "__main__":
        pytest.skip(f"triton backend unavailable: {e}", allow_module_level=True)
    raise

from avstfp_fast.ops import backends as B  # noqa: E402
from avstfp_fast.ops.attention import prompted_attention_qkv, qkv_views  # noqa: E402
from avstfp_fast.ops.contract import empty_in_stride_order, make_problem  # noqa: E402

FWD_TARGET_S, BWD_TARGET_S = 20e-6, 40e-6
_CPU_REASON = "q is on the CPU"


@contextlib.contextmanager
def host_env():
    """Faked sm_90 launches, and CPU tensors accepted by the triton backend as if they
    were CUDA tensors (its reasons are still computed; that one is dropped)."""
    cls = TB.TritonBackend
    orig = cls.reasons

    def reasons(self, p):
        return [r for r in orig(self, p) if not r.startswith(_CPU_REASON)]
    cls.reasons = reasons
    count = [0]

    def sink(launch):               # keep nothing: held arguments would pin buffers
        count[0] += 1
    try:
        with fake_sm90([TB._kernels()], sink=sink):
            yield count
    finally:
        cls.reasons = orig


class Case:
    """One stage call of the CI geometry: leaves, the op's keyword arguments, dout."""

    def __init__(self, stage: str, arch: str = "tiny", batch: int = 1,
                 dtype=torch.bfloat16):
        a = geometry.ARCHS[arch]
        shape = geometry.KernelShape(a, batch, stage, dtype)
        self.qkv = torch.randn(batch, a.frames, a.tokens, 3, a.heads, a.head_dim,
                               dtype=dtype, requires_grad=True)
        ps = shape.prompt_shape()
        self.pks = [torch.randn(*ps[:-2], P, ps[-1], dtype=dtype, requires_grad=True)
                    for P in shape.prompts]
        self.pvs = [torch.randn(*ps[:-2], P, ps[-1], dtype=dtype, requires_grad=True)
                    for P in shape.prompts]
        self.segments = shape.segments
        self.seq_dim = 1 if stage == "temporal" else 2
        self.prompts = ((self.pks, self.pvs) if self.segments else (self.pks[0], self.pvs[0]))
        self.leaves = [self.qkv, *self.pks, *self.pvs]
        with torch.no_grad():
            o = self.forward()
        self.dout = torch.randn_like(o)          # o's layout: what the model's backward sends

    def forward(self):
        return prompted_attention_qkv(self.qkv, *self.prompts, qkv_dim=3, seq_dim=self.seq_dim,
                                      segments=self.segments, backend="triton")

    def zero_grad(self):
        for t in self.leaves:
            t.grad = None

    def problem(self):
        q, k, v = qkv_views(self.qkv.detach(), 3, self.seq_dim)
        return make_problem(q, k, v, *[_detach(x) for x in self.prompts],
                            segments=self.segments)


def _detach(x):
    return [t.detach() for t in x] if isinstance(x, list) else x.detach()


def _median(fn, n: int, setup=None) -> float:
    """Median thread CPU time of ``fn()`` over ``n`` calls (``setup()`` untimed before
    each)."""
    ts = []
    for _ in range(n):
        arg = setup() if setup is not None else None
        t0 = time.thread_time_ns()
        fn() if arg is None else fn(arg)
        ts.append(time.thread_time_ns() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e-9


def measure(stage: str, n: int = 2000) -> Dict[str, float]:
    """Medians (seconds) of the op's forward and backward and of their components."""
    c = Case(stage)
    be = B.get_backend("triton")
    p = c.problem()
    out = empty_in_stride_order(p.q.shape, p.q)
    lse = be.forward(p, out)
    dq = empty_in_stride_order(p.q.shape, p.q)
    dk = empty_in_stride_order(p.k.shape, p.k)
    dv = empty_in_stride_order(p.v.shape, p.v)
    dout = c.dout

    def bwd_setup():
        c.zero_grad()
        return c.forward()

    r = {}
    for _ in range(50):                                     # warm every cache
        c.forward().backward(dout)
        c.zero_grad()
    r["op forward"] = _median(c.forward, n)
    r["op backward"] = _median(lambda o: o.backward(dout), n, bwd_setup)
    # the backward path the AV-STFP stages take at ViT-B/16 (the sequence-owning one; the
    # CI geometry's temporal and spatial calls take the fa2 path by size)
    old = os.environ.get("AVSTFP_TRITON_BWD")
    os.environ["AVSTFP_TRITON_BWD"] = "seq"
    try:
        for _ in range(20):
            c.forward().backward(dout)
            c.zero_grad()
        r["op backward, seq path"] = _median(lambda o: o.backward(dout), n, bwd_setup)
    finally:
        if old is None:
            del os.environ["AVSTFP_TRITON_BWD"]
        else:
            os.environ["AVSTFP_TRITON_BWD"] = old
    # the autograd engine's own share: a no-op Function of the same arity whose backward
    # allocates one gradient per input (as the op's does), .backward() as above
    one = torch.randn(1, dtype=c.qkv.dtype)

    def noop_setup():
        c.zero_grad()
        return _Noop.apply(*c.leaves)
    r["autograd floor (no-op Function) backward"] = _median(
        lambda o: o.backward(one), n, noop_setup)
    r["autograd floor (no-op Function) forward"] = _median(lambda: _Noop.apply(*c.leaves), n)
    r["validation (make_problem)"] = _median(c.problem, n)
    r["backend choice (select)"] = _median(lambda: B.select(p, "triton"), n)
    r["backend forward"] = _median(lambda: be.forward(p, out), n)
    r["backend backward"] = _median(
        lambda: be.backward(p, out, lse, dout, dq, dk, dv, False), n)
    r.update(_eager_parts(c, n))
    r.update(_stage_shapes(stage, n))
    return r


def _stage_shapes(stage: str, n: int) -> Dict[str, float]:
    """The op forward and backward at the ViT-B/16 stage shape (batch 1), on the backward
    path the plan chooses there by itself (the sequence-owning one; nothing forced).  CPU
    buffers of that size are only allocated, never filled, on this path (outputs,
    gradients and scratch come from torch.empty), so the sizes cost no CPU work that a
    GPU would not also do on the host."""
    c = Case(stage, arch="B16", batch=1)
    dout = c.dout

    def bwd_setup():
        c.zero_grad()
        return c.forward()
    for _ in range(20):
        c.forward().backward(dout)
        c.zero_grad()
    return {"op forward, ViT-B/16 stage shape": _median(c.forward, n),
            "op backward, ViT-B/16 stage shape (its own path)": _median(
                lambda o: o.backward(dout), n, bwd_setup)}


def _eager_parts(c: "Case", n: int) -> Dict[str, float]:
    """The op's eager path in pieces (see docs/performance.md, "Host path"): the plan
    key and lookup, the backend's eager forward (log-sum-exp allocation and launch) and
    its sequence-owning backward (the plan lookup; scratch and prompt-gradient buffers
    and two launches), each called alone with the op's arguments."""
    from avstfp_fast.ops import attention as A
    r = {}
    args = ((c.qkv,), *c.prompts, None, c.segments, "triton", (3, c.seq_dim))
    r["eager: plan key and lookup"] = _median(lambda: A._PLANS.get(A._plan_key(*args)), n)
    plan = A._PLANS[A._plan_key(*args)]
    fast = plan.fast
    qkv, flat = c.qkv.detach(), [t.detach() for t in c.leaves[1:]]
    pks, pvs = plan.prompts_of(tuple(flat))
    b, o = qkv.data_ptr(), plan.offs
    out = torch.empty_strided(plan.out_shape, plan.out_strides, dtype=plan.dtype)
    r["eager: backend forward"] = _median(
        lambda: fast.forward(b + o[0], b + o[1], b + o[2], pks, pvs, out), n)
    lse = fast.forward(b + o[0], b + o[1], b + o[2], pks, pvs, out)
    dout = c.dout
    old = os.environ.get("AVSTFP_TRITON_BWD")
    os.environ["AVSTFP_TRITON_BWD"] = "seq"
    try:
        for _ in range(3):                      # the seq path's plans exist
            c.forward().backward(dout)
            c.zero_grad()
        r["eager: backward plan lookup"] = _median(lambda: fast.backward_plan(dout, False), n)
        bp = fast.backward_plan(dout, False)
        g = torch.empty_like(qkv).data_ptr()
        r["eager: backend backward (seq path)"] = _median(lambda: fast.backward(
            bp, b + o[0], b + o[1], b + o[2], pks, pvs, out, lse, dout, g + o[0], g + o[1],
            g + o[2]), n)
    finally:
        if old is None:
            del os.environ["AVSTFP_TRITON_BWD"]
        else:
            os.environ["AVSTFP_TRITON_BWD"] = old
    return r


class _Noop(torch.autograd.Function):
    """The op's autograd arity without its work: saves its inputs, returns a 1-element
    output, and its backward returns one fresh gradient per input."""

    @staticmethod
    def forward(ctx, *ts):
        ctx.save_for_backward(*ts)
        return ts[0].new_empty(1)

    @staticmethod
    def backward(ctx, g):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


# --------------------------------------------------------------------------- pytest
@pytest.fixture
def host(benchmark):
    benchmark._timer = time.thread_time            # CPU time of this thread
    with host_env():
        yield benchmark


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("stage", geometry.STAGES)
def test_triton_host_path(host, stage, direction):
    """One eager call of the public op, forward (under autograd) or backward
    (``.backward()``), with only the C launch stubbed."""
    c = Case(stage)
    for _ in range(5):
        c.forward().backward(c.dout)
        c.zero_grad()
    host.extra_info.update(kind="host", stage=stage, arch="tiny", batch=1, direction=direction,
                           timer="thread_time",
                           target_s=FWD_TARGET_S if direction == "forward" else BWD_TARGET_S)
    if direction == "forward":
        host(c.forward)
    else:
        def setup():
            c.zero_grad()
            return (c.forward(), c.dout), {}
        host.pedantic(lambda o, d: o.backward(d), setup=setup, rounds=200)


# --------------------------------------------------------------------------- report
def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--title", default="Host path of the Triton backend")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat the whole measurement; report each cell's median run")
    a = ap.parse_args(argv)
    runs = []
    for _ in range(a.runs):         # the stages interleaved run by run (shared machine)
        with host_env():
            runs.append({stage: measure(stage, a.n) for stage in geometry.STAGES})
    rows = {s: {k: sorted(r[s][k] for r in runs)[len(runs) // 2] for k in runs[0][s]}
            for s in geometry.STAGES}
    comps = list(next(iter(rows.values())))
    how = (f"median of {a.n} calls" if a.runs == 1 else
           f"median of {a.n} calls, then the median of {a.runs} such runs")
    L = [f"# {a.title}", "",
         f"`python bench/test_triton_host.py --runs {a.runs}`: thread CPU time per call, "
         f"{how}, on the 2-core CPU machine (other jobs running). Public op "
         "`prompted_attention_qkv` as the model calls it (forward under autograd; "
         "`.backward()`), bf16, CI geometry (the last two rows: the ViT-B/16 stage shape, "
         "batch 1, where each stage takes the sequence-owning backward by itself); kernels "
         "launched on a faked sm_90 target "
         "(only the compile and the C launch stubbed). Targets: forward <= 20 µs, "
         "backward <= 40 µs.", "",
         "| µs | " + " | ".join(geometry.STAGES) + " |",
         "|---|" + "---|" * len(geometry.STAGES)]
    for k in comps:
        L.append(f"| {k} | " + " | ".join(f"{rows[s][k] * 1e6:.1f}" for s in geometry.STAGES)
                 + " |")
    md = "\n".join(L) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------- launch cache
def test_cached_launch_is_the_full_launch():
    """ops/launch_cache.py: the cached launcher receives exactly what Triton's full path
    passes (grid, every bound argument), with the new call's tensors; a misaligned
    pointer or an attached launch hook takes the full path again."""
    import triton
    import triton.language as tl
    from avstfp_fast.ops.launch_cache import _Entry, launch

    @triton.jit
    def toy(X, Y, strides, n, scale, BLOCK: tl.constexpr):
        pass

    mod = type(sys)("toy_kernels")
    mod.toy = toy
    recs = []
    slots = {}
    x1, y1, x2, y2 = (torch.empty(64) for _ in range(4))
    kw = lambda: dict(BLOCK=16, num_warps=4)      # noqa: E731
    with fake_sm90([mod], sink=recs.append):
        launch(toy, (3, 2), (x1, (y1, x1), (5, 7), 33, 0.5), kw, slots)
        assert isinstance(slots[id(toy)], _Entry)
        launch(toy, (3, 2), (x2, (y2, x2), (5, 7), 33, 0.5), kw, slots)
        toy[(3, 2)](x2, (y2, x2), (5, 7), 33, 0.5, **kw())                # full path
        assert recs[1].grid == recs[2].grid == (3, 2, 1)
        assert len(recs[1].args) == len(recs[2].args)
        for a, b in zip(recs[1].args, recs[2].args):
            assert a is b or a == b, (a, b)
        launch(toy, (3, 2), (x2[1:], (y2, x2), (5, 7), 33, 0.5), kw, slots)   # misaligned
        assert recs[-1].args[0].data_ptr() == x2[1:].data_ptr()
        assert isinstance(slots[id(toy)], _Entry)                                 # kept
        from triton import knobs
        seen = []
        hook = seen.append
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            launch(toy, (3, 2), (x1, (y1, x1), (5, 7), 33, 0.5), kw, slots)
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        assert len(seen) == 1                       # the hook saw the launch
    assert len(recs) == 5


# --------------------------------------------------------------------------- eager path
def _norm_launches(recs, named):
    """Launch records with every pointer argument (a tensor, or an int where the full path
    has a tensor) as (buffer name, byte offset) for the named buffers, else as the order
    in which the fresh buffer first appears; other arguments as they are."""
    fresh = {}

    def ptr(p):
        p = p if isinstance(p, int) else p.data_ptr()
        for name, t in named.items():
            lo = t.data_ptr()
            if lo <= p < lo + t.numel() * t.element_size():
                return (name, p - lo)
        return ("fresh", fresh.setdefault(p, len(fresh)))

    def arg(ref, a):
        if isinstance(ref, torch.Tensor):
            return ptr(a)
        if isinstance(ref, tuple):
            return tuple(arg(r, b) for r, b in zip(ref, a))
        assert not isinstance(a, torch.Tensor)
        return a
    return recs, arg


@pytest.mark.parametrize("stage", geometry.STAGES)
@pytest.mark.parametrize("path", ["seq", "auto", "direct", "seq-det", "seq-split",
                                  "seq-noprompt"])
def test_eager_path_launches_what_the_full_path_does(stage, path, monkeypatch):
    """The op's eager path (ops/triton_backend.py ``_Bound``: addresses instead of views,
    one scratch buffer, one buffer of prompt gradients) launches the same kernels with
    the same grids and arguments as the full path (views, AttnProblem, _backward_impl):
    every pointer at the same offset into the same input, output or gradient, fresh
    scratch used in the same places; and the gradients have the same shapes/dtypes."""
    from avstfp_fast.ops import attention as A
    path, _, variant = path.partition("-")
    if path == "direct":            # prompt gradients written by the backward kernel
        if stage != "temporal":
            pytest.skip("packed one-step sequences only")
        monkeypatch.setattr(TB, "DIRECT_MIN_PROGRAMS", 1)
    monkeypatch.setenv("AVSTFP_TRITON_BWD", "seq" if path == "direct" else path)
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(variant == "det")
    try:
        _eager_vs_full(A, stage, path, variant, monkeypatch)
    finally:
        torch.use_deterministic_algorithms(det)


def _eager_vs_full(A, stage, path, variant, monkeypatch):
    recs = []
    runs = {}
    cls = TB.TritonBackend
    orig = cls.reasons
    monkeypatch.setattr(cls, "reasons", lambda self, p: [
        r for r in orig(self, p) if not r.startswith(_CPU_REASON)])
    returned = []                   # the gradients the op returns (the sink holds the
    bwd = A._KernelAttention.backward     # full path's views: autograd then copies them)

    def spy(ctx, dout):
        grads = bwd(ctx, dout)
        returned[:] = grads[1:]
        return grads
    monkeypatch.setattr(A._KernelAttention, "backward", staticmethod(spy))
    count, built = [0], {}          # problem records built (the full path builds one)
    problem = A._Plan.problem

    def counted(self, *a, **k):
        count[0] += 1
        return problem(self, *a, **k)
    monkeypatch.setattr(A._Plan, "problem", counted)
    with fake_sm90([TB._kernels()], sink=recs.append):
        c = Case(stage)
        if variant == "noprompt":
            c.forward = lambda: prompted_attention_qkv(
                c.qkv, qkv_dim=3, seq_dim=c.seq_dim, segments=c.segments, backend="triton")
        if variant == "split":          # prompted_attention on separate q, k, v
            from avstfp_fast.ops.attention import prompted_attention
            c.forward = lambda: prompted_attention(
                *qkv_views(c.qkv, 3, c.seq_dim), *c.prompts, segments=c.segments,
                backend="triton")
        for _ in range(3):                                # plans and launchers made
            c.zero_grad()
            c.forward().backward(c.dout)
        if path == "direct":
            assert any(getattr(pl, "direct", False) for pl in TB._PLANS.values())
        plans = [pl for pl in A._PLANS.values() if pl.fast is not None]
        assert plans, "no eager binding was made"
        fast = [pl.fast for pl in plans]
        for mode in ("fast", "full"):
            for pl, f in zip(plans, fast):
                pl.fast = f if mode == "fast" else None
            c.zero_grad()
            del recs[:]
            count[0] = 0
            o = c.forward()
            nf = count[0]
            lse = o.grad_fn.saved_tensors[-1]
            o.backward(c.dout)
            built[mode] = (nf, count[0] - nf)
            named = dict(qkv=c.qkv, out=o, lse=lse, dout=c.dout,
                         **{f"p{i}": t for i, t in enumerate(c.leaves[1:])},
                         **{f"g{i}": t for i, t in enumerate(returned)})
            runs[mode] = (list(recs), named,
                          [(t.shape, t.dtype, t.stride()) for t in returned])
        # saved-tensor hooks that hand back copies (another layout): the full path
        for pl, f in zip(plans, fast):
            pl.fast = f
        del recs[:]
        c.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: t.clone(memory_format=torch.contiguous_format), lambda t: t):
            o = c.forward()
        o.backward(c.dout)
        hooked = [r for r in recs[1:] if r.kernel == "prompted_attn_bwd_seq"]
        for r in hooked:                # views of the copies, as tensors (no addresses)
            assert all(isinstance(a, torch.Tensor) for a in r.args[:8])
    (fr, fnamed, fg), (rr, rnamed, rg) = runs["fast"], runs["full"]
    assert fg == rg
    assert [(r.kernel, r.grid) for r in fr] == [(r.kernel, r.grid) for r in rr]
    _, farg = _norm_launches(fr, fnamed)
    _, rarg = _norm_launches(rr, rnamed)
    for f, r in zip(fr, rr):
        assert len(f.args) == len(r.args)
        assert farg(r.args, f.args) == rarg(r.args, r.args), r.kernel
    # the eager path ran: no problem record built in the forward, nor in the backward
    # where it applies (sequence-owning backward)
    assert built["fast"][0] == 0 and (path == "auto" or built["fast"][1] == 0), built
    assert built["full"][0] > 0 and built["full"][1] > 0, built
