"""Test utilities shared by the test suite, the benchmarks and users checking their own inputs.

``TOL`` holds the accuracy contract: the relative error ``||out - ref|| / ||ref||`` of a result
against a float64 reference on the same inputs (see docs/design.md, "Tolerances").
:func:`tolerance_failures` adds FlashAttention's same-precision rule for fp16/bf16.
:func:`edge_cases` (a hypothesis strategy) and :func:`check_edge_case` test any backend on
the inputs that once gave silent wrong answers (tests/test_edge_inputs.py; the GPU suites
can reuse them with ``device="cuda"``).  hypothesis is imported only by ``edge_cases``.
"""
from dataclasses import dataclass
from typing import Tuple

import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` computed in float64; NaN/inf in ``out`` give ``inf``."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    num = (out - ref).norm()
    if denom == 0:
        return float(num)
    return float(num / denom)


def assert_close(out, ref, dtype, what=""):
    e = rel_err(out, ref)
    assert e <= TOL[dtype], f"{what}: relative error {e:.3g} > {TOL[dtype]:g} ({dtype})"


def strided(shape, dtype, layout: str, device="cpu"):
    """A random tensor of ``shape`` that is a non-contiguous view of a bigger buffer."""
    if layout == "contiguous":
        return torch.randn(*shape, dtype=dtype, device=device)
    if layout == "permuted":           # memory order reversed in the batch/seq dims
        n = len(shape)
        order = list(range(n - 2, -1, -1)) + [n - 1]
        base = torch.randn(*[shape[i] for i in order], dtype=dtype, device=device)
        inv = [order.index(i) for i in range(n)]
        return base.permute(inv)
    if layout == "sliced":             # every second row of a wider buffer, offset 1
        big = torch.randn(*shape[:-2], 2 * shape[-2] + 1, shape[-1] + 3, dtype=dtype, device=device)
        return big[..., 1::2, 2:2 + shape[-1]]
    raise ValueError(layout)


def leaf(t):
    return t.detach().requires_grad_(True)


def randomize_(model, scale=0.5):
    """Random prompts, gates and head of a PromptedCLIP (every parameter outside the
    ``visual.`` tower), so that no gradient is trivially zero."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith("visual."):
                p.copy_(torch.randn_like(p) * scale)
    return model


def skip_unless_supported(backend: str, q, k, v, prompt_k=None, prompt_v=None, **kw) -> None:
    """``pytest.skip`` with ``backend``'s own reasons when it refuses this input (its
    ``why_not``; a backend whose module cannot be imported is refused too)."""
    import pytest

    from .ops import get_backend, make_problem
    p = make_problem(q, k, v, prompt_k, prompt_v, **kw)
    try:
        reason = get_backend(backend).why_not(p)
    except ImportError as e:
        reason = f"not available: {e}"
    if reason:
        pytest.skip(f"{backend}: {reason}")


def check_vs_reference(fn, inputs, dtype, backend, what=""):
    """``fn(*inputs, backend)`` against ``fn(*inputs_in_float64, "reference")``: the output
    and the gradient of every input, each within ``TOL[dtype]`` -- or, where the problem
    itself cancels (e.g. dq of one query over two keys: its terms nearly cancel, so every
    float32 computation loses digits), within twice the error of the float32 reference
    (the fixed rule of :func:`tolerance_failures` with that floor)."""
    inputs = [leaf(t) for t in inputs]
    out = fn(*inputs, backend)
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    g = torch.randn_like(out)
    out.backward(g)
    ref_in = [leaf(t.detach().double()) for t in inputs]
    ref = fn(*ref_in, "reference")
    ref.backward(g.double())
    flo_in = [leaf(t.detach().float()) for t in inputs]
    flo = fn(*flo_in, "reference")
    flo.backward(g.float())
    results = {"out": (out, ref, flo)}
    for i, (a, b, c) in enumerate(zip(inputs, ref_in, flo_in)):
        assert a.grad is not None, f"{what}: no gradient for input {i}"
        assert a.grad.shape == b.shape, f"{what}: grad {i} shape {tuple(a.grad.shape)} != {tuple(b.shape)}"
        results[f"grad{i}"] = (a.grad, b.grad, c.grad)
    bad = {k: why for k, (a, b, c) in results.items()
           if (why := tolerance_failures(a, b, dtype, floor=c))}
    assert not bad, f"{what} ({dtype}): {bad}"


# ----------------------------------------------------------------------------- tolerance rule
HALF = (torch.float16, torch.bfloat16)
# unit roundoff of the dtype: the "small eps" of the same-precision rule below
ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
SAME_PRECISION = "pytorch-same-precision"   # the baseline's name for :func:`attention`


def same_precision_attention(q, k, v, prompt_k=None, prompt_v=None, *, scale=None,
                             segments=None):
    """What a user would write in plain PyTorch, in the inputs' own dtype: SDPA over
    ``cat([k, prompts])`` per segment, batch folded to 4-D (PyTorch's fused kernels).
    The baseline of the same-precision rule in :func:`tolerance_failures`."""
    import torch.nn.functional as F
    from .ops.backends import _pieces
    from .ops.contract import make_problem
    p = make_problem(q, k, v, prompt_k, prompt_v, scale=scale, segments=segments)
    outs = []
    for qs, ks, vs in _pieces(p):
        lead = qs.shape[:-2]
        q4, k4, v4 = (t.reshape(-1, 1, *t.shape[-2:]) for t in (qs, ks, vs))
        o = F.scaled_dot_product_attention(q4, k4, v4, scale=p.scale)
        outs.append(o.reshape(*lead, *o.shape[-2:]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def attention(q, k, v, prompt_k=None, prompt_v=None, *, scale=None, segments=None,
              backend="auto"):
    """``prompted_attention``, or with ``backend=SAME_PRECISION`` the plain-PyTorch baseline."""
    if backend == SAME_PRECISION:
        return same_precision_attention(q, k, v, prompt_k, prompt_v, scale=scale,
                                        segments=segments)
    from .ops.attention import prompted_attention
    return prompted_attention(q, k, v, prompt_k, prompt_v, scale=scale, segments=segments,
                              backend=backend)


def tolerance_failures(out, ref, dtype, baseline=None, floor=None, fixed=True):
    """Why ``out`` fails the accuracy contract against the float64 ``ref`` ('' if it passes).

    Two rules, both must hold (NaN/inf never pass):
    - fixed: ``rel_err(out, ref) <= TOL[dtype] + 2 * rel_err(floor, ref)``;
    - same precision (fp16/bf16, when ``baseline`` is given; FlashAttention's rule):
      ``rel_err(out, ref) <= 2 * rel_err(baseline, ref) + max(ROUNDOFF[dtype],
      2 * rel_err(floor, ref))``, where ``baseline`` is the same quantity from a plain
      PyTorch computation in ``dtype`` (:func:`same_precision_attention`): a kernel may
      not be much worse than what the user would get without it.

    ``floor`` (optional) is the same quantity computed as well as the interface allows:
    float32 arithmetic, with the gradients of the (expanded) views rounded to ``dtype``
    before autograd sums them over broadcast dims (:meth:`EdgeCase.build`,
    ``round_views``).  It is about ``TOL`` or far below on ordinary inputs and widens the
    rules only where no implementation can do better: the fp16 sum of per-head gradients
    of an expanded k that cancel, or scores of magnitude 10^3 and more, whose fp32 rounding
    moves the softmax by more than ``TOL``, or a softmax so sharp that its gradient is the
    difference of nearly equal terms (one query over two keys).  The floor is added, not
    maxed, as FlashAttention adds its eps: two float32 computations of such a problem
    round differently, and either may be the luckier one.  ``fixed=False`` checks the same-precision
    rule only (and finiteness): for a known, reported limitation of a backend.
    """
    e = rel_err(out, ref)
    f = 0.0 if floor is None else 2 * rel_err(floor, ref)
    if e == float("inf"):
        return "not finite"
    if fixed and not e <= TOL[dtype] + f:
        return f"relative error {e:.3g} > {TOL[dtype]:g} ({dtype}) + {f:.3g} (2 x floor)"
    if baseline is not None and dtype in HALF:
        b = rel_err(baseline, ref)
        if not e <= 2 * b + max(ROUNDOFF[dtype], f):
            return (f"relative error {e:.3g} > 2 x {b:.3g} (plain PyTorch in {dtype}) + "
                    f"max({ROUNDOFF[dtype]:.3g}, {f:.3g} (2 x floor))")
    return ""


# ----------------------------------------------------------------------------- edge inputs
@dataclass(frozen=True)
class EdgeCase:
    """One drawn input of :func:`edge_cases`: shapes, layouts and values of q, k, v, the
    prompts and the output gradient ``dout``; ``build`` makes the tensors.

    ``expanded[t]`` lists the batch dims of tensor t (q, k, v, dout) that are stride-0
    ``expand`` views of a size-1 dim; ``nan_pad`` puts every tensor inside a bigger
    NaN-filled buffer; ``magnitude`` > 0 makes |scale * q.k| that large (fp16: q.k
    beyond 65504) while the softmax stays well-conditioned (a large common offset of q
    and k plus small variations)."""
    dtype: torch.dtype
    batch: Tuple[int, ...]
    Lq: int
    Lk: int
    E: int
    P: int
    expanded: Tuple[Tuple[int, ...], ...]      # for q, k, v, dout
    magnitude: float
    nan_pad: bool
    seed: int

    @property
    def scale(self) -> float:
        return self.E ** -0.5

    def values(self):
        """float64 values (already rounded to ``dtype``) of the un-expanded q, k, v,
        dout and the prompts pk, pv (None when P == 0)."""
        g = torch.Generator().manual_seed(self.seed)

        def base(i, L, E):
            shape = [1 if d in self.expanded[i] else n for d, n in enumerate(self.batch)]
            return torch.randn(*shape, L, E, generator=g, dtype=torch.float64)
        q, k, v, do = base(0, self.Lq, self.E), base(1, self.Lk, self.E), \
            base(2, self.Lk, self.E), base(3, self.Lq, self.E)
        pk = torch.randn(self.P, self.E, generator=g, dtype=torch.float64) if self.P else None
        pv = torch.randn(self.P, self.E, generator=g, dtype=torch.float64) if self.P else None
        if self.magnitude > 0:
            # common offset c: scale * E * c^2 = magnitude; spread of the scores ~ 2
            c = (self.magnitude / (self.scale * self.E)) ** 0.5
            sd = 2.0 / (self.scale * c * self.E ** 0.5)
            q, k = c + sd * q, c + sd * k
            if pk is not None:
                pk = c + sd * pk
        tens = [q, k, v, do, pk, pv]
        return [None if t is None else t.to(self.dtype).double() for t in tens]

    def build(self, dtype=None, device="cpu", nan_pad=None, round_views=None):
        """(leaves, call): leaves = [q, k, v, pk, pv] (un-expanded, requires_grad; pk/pv
        absent when P == 0) in ``dtype`` (default: the case's), inside NaN buffers when
        ``nan_pad`` (default: the case's); ``call(backend)`` runs attention on the
        expanded views and returns (out, grads of the leaves) for the case's dout.
        ``round_views=dt``: the views pass through a round trip to ``dt``, so their
        gradients are rounded to ``dt`` (as a backend computing in ``dt`` returns them)
        before autograd sums them over the expanded dims."""
        dtype = dtype or self.dtype
        pad = self.nan_pad if nan_pad is None else nan_pad
        vals = self.values()

        def place(t):
            if t is None:
                return None
            t = t.to(dtype=dtype, device=device)
            if not pad:
                return t
            big = torch.full([n + 3 for n in t.shape[:-1]] + [t.shape[-1] + 5], float("nan"),
                             dtype=dtype, device=device)
            view = big[tuple(slice(1, 1 + n) for n in t.shape[:-1]) + (slice(2, 2 + t.shape[-1]),)]
            view.copy_(t)
            return view
        q, k, v, do, pk, pv = (place(t) for t in vals)
        leaves = [t.requires_grad_(True) for t in (q, k, v, pk, pv) if t is not None]

        def ex(t, L):
            t = t.expand(*self.batch, L, t.shape[-1])
            return t if round_views is None else t.to(round_views).to(dtype)

        def call(backend):
            rp = (lambda t: t) if round_views is None else (lambda t: t.to(round_views).to(dtype))
            out = attention(ex(q, self.Lq), ex(k, self.Lk), ex(v, self.Lk),
                            None if pk is None else rp(pk), None if pv is None else rp(pv),
                            backend=backend)
            grads = torch.autograd.grad(out, leaves, ex(do, self.Lq), allow_unused=True)
            return out.detach(), [torch.zeros_like(x) if gr is None else gr
                                  for x, gr in zip(leaves, grads)]
        return leaves, call


EDGE_RESULTS = ("out", "dq", "dk", "dv", "dprompt_k", "dprompt_v")


def check_edge_case(case: EdgeCase, backend: str, device="cpu", same_precision_rule=True,
                    fixed_rule_for=EDGE_RESULTS, same_precision_for=EDGE_RESULTS,
                    either_for=()):
    """``case`` on ``backend``: output and every gradient against the float64 reference
    (:func:`tolerance_failures`; for the results named in ``either_for``, passing the
    fixed or the same-precision rule is enough; otherwise the fixed rule for those named in
    ``fixed_rule_for``, the same-precision rule unless disabled for those named in
    ``same_precision_for``; NaN never passes), and with
    ``case.nan_pad`` on a kernel backend bitwise equal to the compact run of the same
    values (the autograd-native backends leave the algorithm to PyTorch, whose matmuls
    may round differently for other strides: for them NaN-free and within tolerance)."""
    _, call = case.build(device=device)
    out, grads = call(backend)
    _, ref_call = case.build(dtype=torch.float64, device=device, nan_pad=False)
    ref, ref_grads = ref_call("reference")
    _, floor_call = case.build(dtype=torch.float32, device=device, nan_pad=False,
                               round_views=case.dtype)
    f32, f32_grads = floor_call("reference")
    base, base_grads = None, [None] * len(grads)
    if same_precision_rule and case.dtype in HALF and case.Lq > 0:
        _, base_call = case.build(device=device, nan_pad=False)
        base, base_grads = base_call(SAME_PRECISION)
    assert out.shape == ref.shape and out.dtype == case.dtype, (out.shape, out.dtype)
    names = EDGE_RESULTS
    bad = {}
    for name, a, b, c, f in zip(names, [out, *grads], [ref, *ref_grads], [base, *base_grads],
                                [f32, *f32_grads]):
        if b.numel() and not b.abs().max() > 0 and name in ("dq", "dk", "dprompt_k"):
            # exactly zero (one key: the softmax is constant): any result is rounding
            # noise of terms scale * p * (dout . v) * k that cancel; measure against those
            q, k, v, do = (float(t.abs().max()) if t.numel() else 0.0
                           for t in case.values()[:4])
            natural = case.scale * do * v * max(q, k)
            if natural > 0:
                a = a.double() / natural              # b == 0: rel_err is then absolute
        if name in either_for:
            why = tolerance_failures(a, b, case.dtype, None, f)
            if why and c is not None:
                alt = tolerance_failures(a, b, case.dtype, c, f, fixed=False)
                why = alt and f"{why}; and {alt}"
        else:
            why = tolerance_failures(a, b, case.dtype,
                                     c if name in same_precision_for else None, f,
                                     fixed=name in fixed_rule_for)
        if why:
            bad[name] = why
    assert not bad, f"{backend}: {bad}"
    from .ops.backends import KernelBackend, get_backend
    if case.nan_pad and isinstance(get_backend(backend), KernelBackend):
        _, compact_call = case.build(device=device, nan_pad=False)
        c_out, c_grads = compact_call(backend)
        for name, a, b in zip(names, [out, *grads], [c_out, *c_grads]):
            assert torch.equal(a, b), f"{backend}: {name} inside NaN buffers differs from " \
                                      f"the compact run (max diff {(a - b).abs().max()})"


def edge_cases(dtypes=(torch.float32, torch.float16), head_dims=(32, 64), max_lq=40,
               max_lk=40, max_batch=3, large=True):
    """Hypothesis strategy of :class:`EdgeCase`: the inputs that broke kernels before.

    Draws, each independently: expanded (stride-0) batch dims on q, k, v and dout;
    MQA/GQA (k and v expanded over the query-group dim, batch (B, kv heads, group));
    large-magnitude fp16/bf16 inputs; inputs inside NaN-filled buffers; and the shape
    classes tiny Lq x long Lk (up to ``max_lk``), long Lq x tiny Lk, Lk = 1, Lq = 0.
    Bound ``max_lq``/``max_lk`` for slow backends (the Triton CPU interpreter);
    ``large=False`` leaves out the large magnitudes (for computations in fp16 itself)."""
    from hypothesis import strategies as st

    @st.composite
    def draw_case(draw):
        dtype = draw(st.sampled_from(dtypes))
        E = draw(st.sampled_from(head_dims))
        layout = draw(st.sampled_from(["independent", "gqa", "mqa"]))
        if layout == "independent":
            nb = draw(st.integers(1, max_batch))
            batch = tuple(draw(st.lists(st.integers(1, 3), min_size=nb, max_size=nb)))
            subsets = st.sets(st.integers(0, nb - 1), max_size=nb)
            expanded = tuple(tuple(sorted(draw(subsets))) for _ in range(4))
        else:                       # (B, kv heads, heads per kv head); k, v shared
            kv = 1 if layout == "mqa" else draw(st.integers(2, 3))
            batch = (draw(st.integers(1, 2)), kv, draw(st.integers(2, 3)))
            expanded = ((), (2,), (2,), tuple(sorted(draw(st.sets(st.integers(0, 2))))))
        shape = draw(st.sampled_from(["small", "short_q_long_k", "long_q_short_k",
                                      "lk1", "lq0"]))
        if shape == "small":
            Lq, Lk = draw(st.integers(1, 17)), draw(st.integers(1, 17))
        elif shape == "short_q_long_k":
            Lq, Lk = draw(st.integers(1, 3)), draw(st.integers(max(1, max_lk // 2), max_lk))
        elif shape == "long_q_short_k":
            Lq, Lk = draw(st.integers(max(1, max_lq // 2), max_lq)), draw(st.integers(1, 3))
        elif shape == "lk1":
            Lq, Lk = draw(st.integers(1, 17)), 1
        else:
            Lq, Lk = 0, draw(st.integers(1, 17))
        P = draw(st.integers(0, 2))
        magnitude = 0.0
        if large and dtype in HALF and draw(st.booleans()):
            # scale*q.k up to 2^13: q.k itself beyond fp16's 65504 for E >= 64 (near for 32)
            magnitude = float(draw(st.sampled_from([2.0 ** 11, 2.0 ** 12, 2.0 ** 13])))
        return EdgeCase(dtype=dtype, batch=batch, Lq=Lq, Lk=Lk, E=E, P=P, expanded=expanded,
                        magnitude=magnitude, nan_pad=draw(st.booleans()),
                        seed=draw(st.integers(0, 2 ** 31 - 1)))
    return draw_case()
