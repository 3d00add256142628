"""Public entry points: ``prompted_attention``, ``prompted_attention_qkv``, ``explain``.

Kernel backends run under one autograd function, :class:`_KernelAttention`, which owns
every allocation: the output (in q's memory order, so callers can move it back to the
projection layout for free), the gradients of q/k/v (in the caller's layout; with
``prompted_attention_qkv`` one gradient buffer laid out like the QKV projection output,
so autograd never zero-fills and scatters three view gradients into it), and it passes
the determinism switch to the backend.

Eager calls of a validated layout (the plan cache below) take the backend's eager path
where it offers one (``KernelBackend.bind``): q/k/v and dq/dk/dv go to it as addresses
into the caller's buffers, so no views and no problem record are built per call; any
other call, or one the eager path refuses, takes the full path (``plan.problem`` and the
backend's ``forward``/``backward``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from . import backends as _b
from .contract import AttnProblem, empty_in_stride_order, make_problem, stride_order


def qkv_views(qkv: torch.Tensor, qkv_dim: int, seq_dim: int):
    """q, k, v as views of a packed projection buffer.

    ``qkv.select(qkv_dim, i)`` gives a tensor whose last dim is the head dim; its
    ``seq_dim`` is the attention sequence; all other dims are batch dims.  The views are
    ``select(qkv_dim, i).movedim(seq_dim, -2)``: shape (*batch, L, E), no copy.
    """
    qkv_dim = qkv_dim % qkv.dim()
    views = []
    for i in range(3):
        t = qkv.select(qkv_dim, i)
        views.append(t.movedim(seq_dim % t.dim(), -2))
    return tuple(views)


@dataclass(frozen=True)
class _Meta:
    backend: str
    packed: Optional[Tuple[int, int]]       # (qkv_dim, seq_dim) or None
    present: Tuple[bool, ...]               # prompts present, per segment
    q_segments: Tuple[int, ...]
    k_segments: Tuple[int, ...]
    scale: float


class _Layout:
    """The layout token of a cached plan (:attr:`AttnProblem.layout`): one object per
    validated layout, hashed by identity, so a backend keying its own per-layout plans on
    it never re-hashes the layout key per call (``key``: that key)."""
    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key


class _Plan:
    """One validated layout of a kernel-backend call: the backend, the autograd meta, and
    how to rebuild the q/k/v views and allocate the output without re-deriving them.

    Built after :func:`make_problem` and backend selection accepted a call; reused (see
    :func:`_plan_key`) only for calls whose every validated property is identical."""
    __slots__ = ("meta", "backend", "views", "out_shape", "out_strides", "traced", "layout",
                 "in_strides", "fast", "offs", "grads", "dtype", "device", "split")

    def __init__(self, meta: _Meta, backend, p: AttnProblem, qkv: Optional[torch.Tensor],
                 key=None):
        self.meta, self.backend = meta, backend
        self.layout = None if key is None else _Layout(key)
        # while tracing (torch.compile) views and buffers are built as the ops' own calls
        # (no storage offsets or strides read); the plan is then never cached either
        self.traced = torch.compiler.is_compiling()
        self.in_strides = None       # the inputs' strides, set by _run (see backward)
        # packed: (size, stride, offset from qkv's) of the q, k, v views of the buffer
        self.views = None if (qkv is None or self.traced) else tuple(
            (tuple(t.shape), t.stride(), t.storage_offset() - qkv.storage_offset())
            for t in (p.q, p.k, p.v))
        # the backend's eager path of this layout (KernelBackend.bind), which takes q/k/v
        # and dq/dk/dv as data pointers: packed, at these byte offsets into the buffer
        self.fast = self.offs = self.grads = None
        if not self.traced:
            self.out_shape = tuple(p.q.shape)
            self.out_strides = _dense_like(p.q.shape, p.q.stride())
            self.dtype, self.device = p.q.dtype, p.q.device
            if self.views is not None:
                es = qkv.element_size()
                self.offs = tuple(rel * es for _, _, rel in self.views)
                gstrides = tuple(st for _, st, _ in self.views)
            else:           # dq, dk, dv as _KernelAttention.backward allocates them
                self.grads = tuple((tuple(t.shape), _dense_like(t.shape, t.stride()))
                                   for t in (p.q, p.k, p.v))
                gstrides = tuple(st for _, st in self.grads)
            if self.layout is not None:
                self.fast = backend.bind(p, self.layout, self.out_strides, gstrides)
        # the flat prompts (present ones: keys, then values) as per-segment tuples
        n = sum(meta.present)
        if n == len(meta.present):
            self.split = n
        else:
            self.split = tuple(i for i, pr in enumerate(meta.present) if pr)

    def qkv_of(self, qkv: torch.Tensor, exact: bool = True):
        if self.views is None or not exact:
            return qkv_views(qkv, *self.meta.packed)
        off = qkv.storage_offset()
        return tuple(qkv.as_strided(size, stride, off + rel) for size, stride, rel in self.views)

    def problem(self, tensors, exact: bool = True) -> AttnProblem:
        """The call's problem.  ``exact``: the tensors have the layout this plan validated
        (else -- e.g. copies handed back by a saved-tensor hook -- the views are derived
        from them and the problem carries no layout token, so the backend reads every
        stride)."""
        if self.meta.packed is not None:
            q, k, v = self.qkv_of(tensors[0], exact)
            return self.problem_of(q, k, v, tensors[1:], exact)
        return self.problem_of(*tensors[:3], tensors[3:], exact)

    def problem_of(self, q, k, v, rest, exact: bool = True) -> AttnProblem:
        m = self.meta
        if len(m.present) == 1:                      # no segments: at most one pair
            pks, pvs = ((rest[0],), (rest[1],)) if rest else ((None,), (None,))
        else:
            n = sum(m.present)
            it_k, it_v = iter(rest[:n]), iter(rest[n:])
            pks = tuple(next(it_k) if pr else None for pr in m.present)
            pvs = tuple(next(it_v) if pr else None for pr in m.present)
        return AttnProblem(q, k, v, pks, pvs, m.q_segments, m.k_segments, m.scale,
                           self.layout if exact else None)

    def prompts_of(self, rest):
        """(pks, pvs) per segment (None where absent) from the flat present prompts."""
        n = self.split
        if n.__class__ is int:
            return (rest[:n], rest[n:]) if n else ((None,), (None,))
        pks, pvs = [None] * len(self.meta.present), [None] * len(self.meta.present)
        m = len(n)
        for j, i in enumerate(n):
            pks[i], pvs[i] = rest[j], rest[m + j]
        return tuple(pks), tuple(pvs)

    def empty_out(self, q: torch.Tensor) -> torch.Tensor:
        """The output buffer in q's stride order (as :func:`empty_in_stride_order`)."""
        if self.traced:
            return empty_in_stride_order(q.shape, q)
        return torch.empty_strided(self.out_shape, self.out_strides, dtype=q.dtype,
                                   device=q.device)


def _dense_like(shape, strides) -> Tuple[int, ...]:
    """Strides of a dense tensor of ``shape`` in the stride order of ``strides`` (as
    :func:`empty_in_stride_order` lays it out)."""
    order = stride_order(shape, strides)
    out, acc = [0] * len(order), 1
    for i in reversed(order):
        out[i] = acc
        acc *= shape[i]
    return tuple(out)


_no_modes = torch._C._len_torch_dispatch_stack


class _KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, *tensors):
        fast = plan.fast
        lse = None
        if fast is not None and not _no_modes():
            # the layout's eager path: no views, no problem record (a dispatch mode, e.g.
            # a FLOP counter, sees the full path's custom op instead)
            out = torch.empty_strided(plan.out_shape, plan.out_strides, dtype=plan.dtype,
                                      device=plan.device)
            o = plan.offs
            if o is not None:
                b = tensors[0].data_ptr()
                pks, pvs = plan.prompts_of(tensors[1:])
                lse = fast.forward(b + o[0], b + o[1], b + o[2], pks, pvs, out)
            else:
                pks, pvs = plan.prompts_of(tensors[3:])
                lse = fast.forward(*tensors[:3], pks, pvs, out)
        if lse is None:
            p = plan.problem(tensors)
            out = plan.empty_out(p.q)
            lse = plan.backend.forward(p, out)
        ctx.plan = plan
        # the inputs themselves, not the q/k/v views; under saved-tensor hooks the
        # backward may get copies in another layout (a clone of an expanded prompt is
        # dense): then it derives the layout from them instead of the plan's (traced:
        # the plan holds no layout and the views are derived anyway)
        ctx.exact = plan.traced or torch._C._autograd._top_saved_tensors_default_hooks(
            False) is None
        ctx.save_for_backward(*tensors, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        plan = ctx.plan
        meta = plan.meta
        *tensors, out, lse = ctx.saved_tensors
        # a hook registered on this node after the forward (grad_fn._raw_saved_tensors)
        # can also hand back copies: the plan's layout holds only if the strides still do
        exact = ctx.exact and (plan.in_strides is None
                               or [t.stride() for t in tensors] == plan.in_strides)
        fast = plan.fast
        if fast is not None and exact and not _no_modes():
            grads = _fast_backward(ctx, plan, fast, tensors, out, lse, dout)
            if grads is not None:
                return grads
        if meta.packed is not None:
            p = plan.problem(tensors, exact)
            dqkv = torch.empty_like(tensors[0])   # dense: the three views tile it exactly
            dq, dk, dv = plan.qkv_of(dqkv, exact)
            lead = (dqkv,)
        else:
            p = plan.problem(tensors, exact)
            dq = empty_in_stride_order(p.q.shape, p.q)
            dk = empty_in_stride_order(p.k.shape, p.k)
            dv = empty_in_stride_order(p.v.shape, p.v)
            lead = (dq, dk, dv)
        dpk, dpv = plan.backend.backward(p, out, lse, dout, dq, dk, dv,
                                         torch.are_deterministic_algorithms_enabled())
        grads = list(lead)
        grads += [g for g, pr in zip(dpk, meta.present) if pr]
        grads += [g for g, pr in zip(dpv, meta.present) if pr]
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:])]
        return (None, *grads)


def _fast_backward(ctx, plan: _Plan, fast, tensors, out, lse, dout):
    """The backward through the layout's eager path (the backend's ``bind``), or None."""
    bp = fast.backward_plan(dout, torch.are_deterministic_algorithms_enabled())
    if bp is None:
        return None
    o = plan.offs
    if o is not None:                 # one gradient buffer laid out like qkv (dense)
        lead = (torch.empty_like(tensors[0]),)
        b, g = tensors[0].data_ptr(), lead[0].data_ptr()
        n = plan.split
        if n.__class__ is int and n:
            pks, pvs = tensors[1:1 + n], tensors[1 + n:]
        else:
            pks, pvs = plan.prompts_of(tensors[1:])
        r = fast.backward(bp, b + o[0], b + o[1], b + o[2], pks, pvs, out, lse, dout,
                          g + o[0], g + o[1], g + o[2])
    else:
        lead = tuple(torch.empty_strided(shp, st, dtype=plan.dtype, device=plan.device)
                     for shp, st in plan.grads)
        pks, pvs = plan.prompts_of(tensors[3:])
        r = fast.backward(bp, *tensors[:3], pks, pvs, out, lse, dout, *lead)
    if r is None:
        return None
    dpk, dpv = r
    if plan.split.__class__ is int:
        grads = lead + dpk[:plan.split] + dpv[:plan.split]
    else:
        grads = lead + tuple(dpk[i] for i in plan.split) + tuple(dpv[i] for i in plan.split)
    need = ctx.needs_input_grad
    if False in need[1:]:
        grads = tuple(g if n else None for g, n in zip(grads, need[1:]))
    return (None,) + grads


def _autocast(tensors, prompt_k, prompt_v):
    """Under autocast, attention runs in the autocast dtype (as SDPA does)."""
    dev = tensors[0].device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return tensors, prompt_k, prompt_v
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        return t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def cast_prompts(pr):
        return [cast(t) for t in pr] if isinstance(pr, (list, tuple)) else cast(pr)
    return [cast(t) for t in tensors], cast_prompts(prompt_k), cast_prompts(prompt_v)


# --------------------------------------------------------------------------- plan cache
# Validation (make_problem) and backend selection run once per layout: a call whose
# every property they read -- each tensor's class, shape, strides, dtype and device, the
# prompt structure, segments, scale, backend name, the packed dims, and the state the
# backends' reasons read (deterministic mode, registered backends, their environment
# variables) -- equals an accepted earlier call's reuses its plan.  Any difference is a
# new key: the call is validated from scratch (and errors are raised exactly as before).
# Autocast and tracing (torch.compile) always take the full path.
_PLANS: Dict[tuple, _Plan] = {}
_MAX_PLANS = 512


def _tkey(t):
    return (t.__class__, t.shape, t.stride(), t.dtype, t.device)


def _pkey(x):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return _tkey(x)
    if isinstance(x, (list, tuple)):
        return tuple([len(x)] + [None if t is None else _tkey(t) for t in x])
    raise TypeError("not a prompt")          # the full path says what is wrong


def _plan_key(lead, prompt_k, prompt_v, scale, segments, backend, packed):
    """The cache key of a call, or None when it must take the full path."""
    if torch._C._is_any_autocast_enabled() or torch.compiler.is_compiling():
        return None
    if segments is not None and not isinstance(segments, (list, tuple)):
        return None                           # e.g. a generator: read it only once
    try:
        key = (backend, packed, scale, None if segments is None else tuple(segments),
               _b.env_token(), tuple(map(_tkey, lead)), _pkey(prompt_k), _pkey(prompt_v))
        hash(key)
    except (TypeError, AttributeError, RuntimeError):
        return None
    return key


def _remember(key, plan: _Plan) -> None:
    if key is None:
        return
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan


def _flat_prompts(prompt_k, prompt_v):
    if prompt_k is None:
        return ()
    if isinstance(prompt_k, torch.Tensor):
        return (prompt_k, prompt_v)
    return [t for t in prompt_k if t is not None] + [t for t in prompt_v if t is not None]


def _run(p: AttnProblem, b: "_b.Backend", key=None, packed=None, qkv=None) -> torch.Tensor:
    if not isinstance(b, _b.KernelBackend):
        return b.run(p)
    meta = _Meta(b.name, packed, tuple(pk is not None for pk in p.prompt_k),
                 p.q_segments, p.k_segments, p.scale)
    plan = _Plan(meta, b, p, qkv if packed is not None else None, key)
    _remember(key, plan)
    lead = (qkv,) if packed is not None else (p.q, p.k, p.v)
    prompts = [t for t in p.prompt_k if t is not None] + [t for t in p.prompt_v if t is not None]
    if not plan.traced:
        plan.in_strides = [t.stride() for t in (*lead, *prompts)]
    return _KernelAttention.apply(plan, *lead, *prompts)


def prompted_attention(q, k, v, prompt_k=None, prompt_v=None, *, scale: Optional[float] = None,
                       segments: Optional[Sequence[int]] = None, backend: str = "auto"
                       ) -> torch.Tensor:
    """Attention whose keys/values are extended with (batch-shared) prompt tokens.

    Equals ``SDPA(q, cat([k, pk]), cat([v, pv]), scale=scale)`` with the prompts
    broadcast to q's batch dims (docs/design.md, "The op contract"), without materialising the concatenation in the
    kernel backends.  ``segments=(n_0, n_1, ...)`` makes it block-diagonal with one prompt
    pair per block (``prompt_k``/``prompt_v`` then are sequences).  Output memory follows
    q's stride order.  ``backend``: one of :func:`~avstfp_fast.ops.backends.backend_choices`
    ("reference", "torch", "triton", "cuda", "auto").
    """
    key = _plan_key((q, k, v), prompt_k, prompt_v, scale, segments, backend, None)
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        return _KernelAttention.apply(plan, q, k, v, *_flat_prompts(prompt_k, prompt_v))
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
    (q, k, v), prompt_k, prompt_v = _autocast([q, k, v], prompt_k, prompt_v)
    p = make_problem(q, k, v, prompt_k, prompt_v, scale=scale, segments=segments)
    return _run(p, _b.select(p, backend), key)


def prompted_attention_qkv(qkv: torch.Tensor, prompt_k=None, prompt_v=None, *, qkv_dim: int,
                           seq_dim: int, scale: Optional[float] = None,
                           segments: Optional[Sequence[int]] = None, backend: str = "auto"
                           ) -> torch.Tensor:
    """``prompted_attention`` on q/k/v packed in one projection buffer (see :func:`qkv_views`).

    With a kernel backend the gradient arrives as ONE buffer shaped like ``qkv``, written
    by the backward kernel directly — no zero-fill and scatter of three view gradients.
    ``qkv`` must be contiguous (it normally is: the output of the QKV linear layer).
    """
    key = _plan_key((qkv,), prompt_k, prompt_v, scale, segments, backend, (qkv_dim, seq_dim))
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        return _KernelAttention.apply(plan, qkv, *_flat_prompts(prompt_k, prompt_v))
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv: expected a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() < 3 or qkv.shape[qkv_dim] != 3:
        raise ValueError(f"qkv: expected size 3 at qkv_dim={qkv_dim}, got shape {tuple(qkv.shape)}")
    if not qkv.is_contiguous():
        raise ValueError(f"qkv: must be contiguous (the projection output), got strides "
                         f"{qkv.stride()} for shape {tuple(qkv.shape)}")
    (qkv,), prompt_k, prompt_v = _autocast([qkv], prompt_k, prompt_v)
    q, k, v = qkv_views(qkv, qkv_dim, seq_dim)
    p = make_problem(q, k, v, prompt_k, prompt_v, scale=scale, segments=segments)
    b = _b.select(p, backend)
    if not isinstance(b, _b.KernelBackend):
        # autograd-native backends: views from unbind, whose backward stacks the three
        # gradients (select would zero-fill a qkv-sized buffer per view)
        p.q, p.k, p.v = (t.movedim(seq_dim % t.dim(), -2) for t in qkv.unbind(qkv_dim))
    return _run(p, b, key, packed=(qkv_dim % qkv.dim(), seq_dim), qkv=qkv)


def explain(q, k, v, prompt_k=None, prompt_v=None, *, scale=None, segments=None) -> str:
    """Which backends can run this input, every reason the others cannot, and what "auto"
    picks."""
    p = make_problem(q, k, v, prompt_k, prompt_v, scale=scale, segments=segments)
    text = _b.explain_problem(p)
    try:
        chosen = _b.select(p, "auto").name
    except ValueError:
        chosen = "none"
    return text + f"\n  auto picks: {chosen}"
