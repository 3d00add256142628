"""Backends of ``prompted_attention``, what each can run, and the dispatcher.

Each backend describes what it supports as data, a :class:`Capabilities` record
(devices, dtypes, head dims, segments, ...).  ``reasons(problem)`` lists EVERY reason the
backend refuses a problem (empty: it can run it): the capability checks plus whatever the
backend adds about its environment (a missing compiler, the Triton interpreter, grid
limits).  ``why_not(problem)`` is the same as one sentence, or None.  ``backend="auto"``
takes the first backend of the device's preference list that fits; an explicitly named
backend that does not fit raises with its reasons (no silent fallback that hides
slowness).  ``explain(...)`` prints every backend's reasons.

The class says how a backend computes:
- :class:`Backend` (``reference``, ``torch``): autograd-native, ``run(problem)`` returns a
  tensor built from differentiable PyTorch ops;
- :class:`KernelBackend` (``triton``, ``cuda``): ``forward``/``backward`` write into
  buffers that the shared autograd function (:mod:`avstfp_fast.ops.attention`) allocates
  in the caller's layout.

One registry holds the backend names; :func:`backend_choices` (the names plus "auto") is
the list that the model, the trainer, the demo and the command line accept.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .contract import SUPPORTED_DTYPES, AttnProblem, check_kernel_writes

AUTO = "auto"
_REGISTRY: Dict[str, "Backend"] = {}
_LAZY: Dict[str, str] = {}    # name -> module that registers it on import
_ORDER: List[str] = []        # names in the order they were first registered
_ENV_VARS: List[str] = []     # environment variables that backends' reasons read
_ENV_KEYS: list = []          # ... as os.environ's store keys them (env_token)
_VERSION = [0]                # bumped on every (lazy) registration


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run.  ``None`` means no limit.

    - ``devices``: device types it runs on (``("cuda",)``); None: any device;
    - ``dtypes``: element types of q/k/v/prompts;
    - ``head_dims``: allowed q/k last dims; None: any;
    - ``value_dim_is_head_dim``: v's last dim must equal q's;
    - ``dense_last_dim``: arguments whose last dim must have stride 1
      (names among "q", "k", "v", "prompt_k", "prompt_v");
    - ``max_segments``: most ``segments=`` pieces;
    - ``max_batch_dims``: most batch dims of size > 1;
    - ``min_capability``: lowest CUDA compute capability (major, minor);
    - ``deterministic``: honours ``torch.use_deterministic_algorithms(True)`` (bit-exact
      results run to run, gradients included).
    """
    devices: Optional[Tuple[str, ...]] = None
    dtypes: Tuple[torch.dtype, ...] = SUPPORTED_DTYPES
    head_dims: Optional[Tuple[int, ...]] = None
    value_dim_is_head_dim: bool = False
    dense_last_dim: Tuple[str, ...] = ()
    max_segments: Optional[int] = None
    max_batch_dims: Optional[int] = None
    min_capability: Optional[Tuple[int, int]] = None
    deterministic: bool = True

    def reasons(self, p: AttnProblem, name: str) -> List[str]:
        """Every limit of these capabilities that ``p`` exceeds, one sentence each."""
        out = []
        dev = p.device.type
        if self.devices is not None and dev not in self.devices:
            needs = " or ".join(f"{d.upper()} tensors" for d in self.devices)
            note = (f" (torch.cuda.is_available() = {torch.cuda.is_available()})"
                    if "cuda" in self.devices else "")
            out.append(f"q is on device {p.device}; the {name} backend needs {needs}{note}")
        if self.min_capability is not None and dev == "cuda":
            cap = torch.cuda.get_device_capability(p.device)
            if cap < self.min_capability:
                lo = self.min_capability
                out.append(f"device {p.device} ({torch.cuda.get_device_name(p.device)}) has "
                           f"compute capability {cap[0]}.{cap[1]}; the {name} backend needs "
                           f">= {lo[0]}.{lo[1]}")
        if p.dtype not in self.dtypes:
            out.append(f"dtype {p.dtype} is not supported by the {name} backend; expected one "
                       f"of {[str(d) for d in self.dtypes]}")
        if self.head_dims is not None and p.head_dim not in self.head_dims:
            out.append(f"head dim {p.head_dim} is not supported by the {name} backend: expected "
                       f"one of {tuple(self.head_dims)} (q shape {tuple(p.q.shape)})")
        if self.value_dim_is_head_dim and p.value_dim != p.head_dim:
            out.append(f"v: value dim {p.value_dim} != head dim {p.head_dim} is not supported "
                       f"by the {name} backend (q {tuple(p.q.shape)}, v {tuple(p.v.shape)})")
        for arg, t in _named_tensors(p, self.dense_last_dim):
            if t.stride(-1) != 1 and t.shape[-1] > 1:
                out.append(f"{arg}: last-dim stride must be 1 for the {name} backend, got "
                           f"strides {t.stride()} for shape {tuple(t.shape)}")
        if self.max_segments is not None and len(p.q_segments) > self.max_segments:
            out.append(f"segments: at most {self.max_segments} segments are supported by the "
                       f"{name} backend, got {len(p.q_segments)} ({p.q_segments})")
        if (self.max_batch_dims is not None
                and sum(1 for n in p.batch_shape if n != 1) > self.max_batch_dims):
            out.append(f"q: at most {self.max_batch_dims} batch dims of size > 1 are supported "
                       f"by the {name} backend, got batch shape {tuple(p.batch_shape)}")
        if not self.deterministic and torch.are_deterministic_algorithms_enabled():
            out.append(f"torch.use_deterministic_algorithms(True) is set and the {name} backend "
                       "has no deterministic mode")
        return out

    def summary(self) -> str:
        """One line for :func:`explain`: the limits that are set."""
        parts = [f"devices {'/'.join(self.devices) if self.devices else 'any'}",
                 "dtypes " + "/".join(str(d).replace("torch.", "") for d in self.dtypes)]
        if self.head_dims is not None:
            parts.append("head dims " + "/".join(map(str, self.head_dims)))
        if self.value_dim_is_head_dim:
            parts.append("value dim == head dim")
        if self.dense_last_dim:
            parts.append("dense last dim (" + ", ".join(self.dense_last_dim) + ")")
        if self.max_segments is not None:
            parts.append(f"<= {self.max_segments} segments")
        if self.max_batch_dims is not None:
            parts.append(f"<= {self.max_batch_dims} batch dims > 1")
        if self.min_capability is not None:
            parts.append(f"sm >= {self.min_capability[0]}.{self.min_capability[1]}")
        parts.append("deterministic" if self.deterministic else "not deterministic")
        return ", ".join(parts)


def _named_tensors(p: AttnProblem, names):
    """(label, tensor) for the named arguments of ``p``; prompts per segment when segmented."""
    for name in names:
        if name in ("q", "k", "v"):
            yield name, getattr(p, name)
            continue
        ts = getattr(p, name)
        for s, t in enumerate(ts):
            if t is not None:
                yield (name if len(ts) == 1 else f"{name}[{s}]"), t


class Backend:
    """An autograd-native backend; subclasses set ``name`` and ``capabilities``, and
    override :meth:`reasons` (calling ``super()``) to add limits that are not data."""
    name: str = ""
    capabilities: Capabilities = Capabilities()

    def reasons(self, p: AttnProblem) -> List[str]:
        """Every reason this backend cannot run ``p``; empty when it can."""
        return self.capabilities.reasons(p, self.name)

    def why_not(self, p: AttnProblem) -> Optional[str]:
        """None when this backend can run ``p``, else all its reasons in one sentence."""
        r = self.reasons(p)
        return "; ".join(r) if r else None

    def run(self, p: AttnProblem) -> torch.Tensor:      # autograd-native backends
        raise NotImplementedError(f"backend {self.name!r} does not implement run()")


class KernelBackend(Backend):
    """A backend made of a forward and a backward kernel.

    ``forward(p, out)`` writes the attention output into ``out`` (shape of q; any strides
    with a dense last dim and no self-overlap, which ``check_writes`` verifies) and
    returns the row log-sum-exp, float32, shape ``(*batch, Lq)`` (natural log, scores
    already scaled).  ``backward(p, out, lse, dout, dq, dk, dv, deterministic)`` writes
    dq/dk/dv into the given tensors (same layout rule; often views of one QKV-gradient
    buffer)
    and returns ``(dprompt_k, dprompt_v)``: tuples with one entry per segment, each of the
    prompt's own (un-broadcast) shape and dtype, or None for absent prompts.
    """

    def forward(self, p: AttnProblem, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, p, out, lse, dout, dq, dk, dv, deterministic: bool):
        raise NotImplementedError

    def bind(self, p: AttnProblem, layout, out_stride, grad_strides):
        """Optional eager path of one validated layout: an object whose
        ``forward(q, k, v, pks, pvs, out)`` returns the log-sum-exp as :meth:`forward`
        does, ``backward_plan(dout, deterministic)`` an opaque plan (None: this call
        takes :meth:`backward`) and ``backward(plan, q, k, v, pks, pvs, out, lse, dout,
        dq, dk, dv)`` returns ``(dprompt_k, dprompt_v)`` as :meth:`backward` does; either
        returns None where the call must take :meth:`forward`/:meth:`backward` instead
        (nothing launched).  q/k/v and dq/dk/dv may be passed as data pointers (ints).
        ``layout``: the op's layout token (``p.layout`` of later calls); ``out_stride``,
        ``grad_strides``: the strides of the output and of dq, dk, dv as the op
        allocates them.  None (the default): every call takes
        :meth:`forward`/:meth:`backward`."""
        return None

    def check_writes(self, **buffers: Optional[torch.Tensor]) -> None:
        """Call before launch on every buffer the kernel writes: see
        :func:`avstfp_fast.ops.contract.check_kernel_writes` (ValueError on a layout the
        kernels do not write correctly: a strided last dim, self-overlapping memory)."""
        check_kernel_writes(self.name, **buffers)


# --------------------------------------------------------------------------- registry
def _remember(name: str) -> None:
    if name not in _ORDER:
        _ORDER.append(name)


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    _remember(backend.name)
    _VERSION[0] += 1
    return backend


def register_lazy(name: str, module: str, env: Tuple[str, ...] = ()) -> None:
    """Backends with heavy imports (triton, the CUDA extension) load on first use.
    ``env``: environment variables its ``reasons`` read (see :func:`env_token`)."""
    _LAZY[name] = module
    _remember(name)
    _ENV_VARS.extend(v for v in env if v not in _ENV_VARS)
    _ENV_KEYS[:] = [_ENV_KEY(v) for v in _ENV_VARS]
    _VERSION[0] += 1


try:        # os.environ's own store: what os.environ.get decodes (CPython, every platform)
    _ENV_GET, _ENV_KEY = os.environ._data.get, os.environ.encodekey
except AttributeError:      # pragma: no cover - another Python
    _ENV_GET, _ENV_KEY = os.environ.get, str


def env_reader(name: str):
    """A function returning environment variable ``name`` as os.environ holds it (None
    if unset; compare only for equality), read on every call like ``os.environ.get``
    (os.environ's updates included) at a fraction of its cost: the per-call plan keys
    read it."""
    key = _ENV_KEY(name)
    return lambda: _ENV_GET(key)


def env_token() -> tuple:
    """Everything outside a problem that the backends' verdicts depend on: the
    deterministic-algorithms switch, the registry, and the environment variables that
    backends declared.  The op's per-layout plan cache (ops/attention.py) keys on it, so
    a change re-runs validation and backend selection."""
    return (torch.are_deterministic_algorithms_enabled(), _VERSION[0],
            tuple(map(_ENV_GET, _ENV_KEYS)))


def backend_names() -> Tuple[str, ...]:
    """Every registered backend, loaded or not, in registration order."""
    return tuple(_ORDER)


def backend_choices() -> Tuple[str, ...]:
    """The names a user may pass as ``backend=``: every backend, then "auto"."""
    return backend_names() + (AUTO,)


def check_backend_name(name, arg: str = "backend") -> str:
    """``name`` if it is one of :func:`backend_choices`, else a ValueError naming ``arg``."""
    choices = backend_choices()
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"{arg}: expected one of {choices}, got {name!r}")
    return name


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY and name in _LAZY:
        import importlib
        importlib.import_module(_LAZY[name])
    if name not in _REGISTRY:
        raise ValueError(f"backend: unknown name {name!r}; expected one of "
                         f"{sorted(backend_choices())}")
    return _REGISTRY[name]


def preference(device: torch.device, p: Optional[AttnProblem] = None) -> List[str]:
    """The order in which ``auto`` tries backends on a device."""
    if device.type == "cuda":
        from . import autotable
        return autotable.gpu_preference(p) + ["torch"]
    return ["torch"]


def select(p: AttnProblem, backend: str = AUTO) -> Backend:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a name (str), got {type(backend).__name__}")
    if backend != AUTO:
        try:
            b = get_backend(backend)
        except ImportError as e:
            raise ValueError(f"backend={backend!r} is not available: {e}") from e
        reasons = _reasons(b, p)
        if reasons:
            raise ValueError(f"backend={backend!r} cannot run this input: {'; '.join(reasons)}")
        return b
    for name in preference(p.device, p):
        try:
            b = get_backend(name)
        except (ValueError, ImportError):
            continue
        if not _reasons(b, p):
            return b
    raise ValueError("backend='auto': no backend supports this input:\n" + explain_problem(p))


def _reasons(b: Backend, p: AttnProblem) -> List[str]:
    try:
        return b.reasons(p)
    except ImportError as e:    # e.g. triton missing, extension not built
        return [f"not available: {e}"]


def explain_problem(p: AttnProblem) -> str:
    """Every backend's verdict: OK, or each reason on its own line followed by what the
    backend supports; then the auto order."""
    lines = []
    for name in backend_names():
        try:
            b = get_backend(name)
            rs = _reasons(b, p)
        except (ImportError, RuntimeError) as e:
            b, rs = None, [f"not available: {e}"]
        lines.append(f"  {name:9s} {rs[0] if rs else 'OK'}")
        lines += [f"  {'':9s} {r}" for r in rs[1:]]
        if rs and b is not None:
            lines.append(f"  {'':9s} (supports: {b.capabilities.summary()})")
    auto = preference(p.device, p)
    how = ""
    if p.device.type == "cuda":
        from . import autotable
        how = f" ({autotable.source(p)})"
    lines.append(f"  auto order on {p.device.type}: {auto}{how}")
    return "\n".join(lines)


def _pieces(p: AttnProblem):
    """(q, k, v, pk, pv) per segment, with the prompts appended to k/v (expanded views).

    ``split`` (not slicing) so that autograd joins the pieces' gradients with one cat
    instead of zero-filling a full-size buffer per piece.
    """
    qs = p.q.split(list(p.q_segments), dim=-2)
    ks = p.k.split(list(p.k_segments), dim=-2)
    vs = p.v.split(list(p.k_segments), dim=-2)
    for s, (q, k, v) in enumerate(zip(qs, ks, vs)):
        pk, pv = p.expanded_prompts(s)
        if pk is not None:
            k = torch.cat([k, pk], dim=-2)
            v = torch.cat([v, pv], dim=-2)
        yield q, k, v


def _join(outs):
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


# --------------------------------------------------------------------------- reference
class ReferenceBackend(Backend):
    """The oracle: concatenate prompts (expanded to the batch), softmax(q k^T) v, per segment.
    The scale multiplies q before the product, so that fp16 scores overflow only where
    the scaled scores themselves exceed 65504."""
    name = "reference"
    capabilities = Capabilities()           # any device, every supported dtype, any shape

    def run(self, p: AttnProblem) -> torch.Tensor:
        return _join([torch.softmax((q * p.scale) @ k.transpose(-1, -2), dim=-1) @ v
                      for q, k, v in _pieces(p)])


# --------------------------------------------------------------------------- torch
_HALF = (torch.float16, torch.bfloat16)


def _sdpa(q, k, v, scale):
    """SDPA with the batch folded to exactly 4 dims: PyTorch's fused CPU (flash) kernel
    takes only 4-D inputs and otherwise falls back to the unfused math path."""
    batch = q.shape[:-2]
    if q.device.type == "cpu" and q.shape[-2] <= 16:
        # very short sequences (the temporal stage): the unfused path is faster on CPU
        return torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1) @ v
    if q.dim() == 4:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if q.dim() > 4:
        n = 1
        for x in batch[:-1]:
            n *= x
        lead = (n, batch[-1])
    else:
        lead = (1,) * (4 - q.dim()) + tuple(batch)
    q4, k4, v4 = (t.reshape(*lead, *t.shape[-2:]) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q4, k4, v4, scale=scale)
    return o.reshape(*batch, *o.shape[-2:])


class TorchBackend(Backend):
    """Pure-PyTorch fast path: SDPA (fused kernels where PyTorch has them) on the strided
    views.  Prompts are appended to K/V by a concatenation whose cost is P rows per
    sequence; the kernel backends avoid even that.  Segments run one SDPA each."""
    name = "torch"
    capabilities = Capabilities()           # any device, every supported dtype, any shape

    def run(self, p: AttnProblem) -> torch.Tensor:
        if p.device.type == "cpu" and p.dtype in _HALF:
            return self._run_upcast(p)
        return _join([_sdpa(q, k, v, p.scale) for q, k, v in _pieces(p)])

    def _run_upcast(self, p: AttnProblem) -> torch.Tensor:
        """Precision rule on the CPU (docs/performance.md): half inputs (fp16, bf16) run in
        fp32 from the start (scores, softmax, SDPA forward and backward, the prompts'
        batch reduction), and the output is rounded to the input dtype once.  Scores of
        fp16 inputs overflow 65504 easily, and PyTorch's fp16 CPU SDPA backward loses
        accuracy over long sequences; the CPU has no fast half arithmetic to lose."""
        def up(t):
            return None if t is None else t.float()
        with torch.autocast("cpu", enabled=False):      # autocast would cast back down
            p32 = dataclasses.replace(p, q=p.q.float(), k=p.k.float(), v=p.v.float(),
                                      prompt_k=tuple(up(t) for t in p.prompt_k),
                                      prompt_v=tuple(up(t) for t in p.prompt_v))
            return self.run(p32).to(p.dtype)


register(ReferenceBackend())
register(TorchBackend())
register_lazy("triton", "avstfp_fast.ops.triton_backend", env=("TRITON_INTERPRET",))
register_lazy("cuda", "avstfp_fast.ops.cuda_backend")
