"""Backends of ``prompted_attention`` and the dispatcher that chooses between them.

Each backend states what it supports: ``why_not(problem)`` returns None when it can run
the problem, else a sentence saying why not.  ``backend="auto"`` takes the first backend
of the device's preference list that fits; an explicitly named backend that does not fit
raises (no silent fallback that hides slowness).  ``explain(...)`` prints every verdict.

Two kinds of backend:
- *autograd-native* (``reference``, ``torch``): ``run(problem)`` returns a tensor built
  from differentiable PyTorch ops;
- *kernel* (``triton``, ``cuda``): ``forward``/``backward`` write into buffers that the
  shared autograd function (:mod:`avstfp_fast.ops.autograd`) allocates in the caller's
  layout.  See :class:`KernelBackend`.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .contract import AttnProblem, check_kernel_writes

_REGISTRY: Dict[str, "Backend"] = {}
_LAZY: Dict[str, str] = {}    # name -> module that registers it on import


class Backend:
    name: str = ""
    kind: str = "autograd"     # or "kernel"

    def why_not(self, p: AttnProblem) -> Optional[str]:
        return None

    def run(self, p: AttnProblem) -> torch.Tensor:      # autograd-native backends
        raise NotImplementedError(f"backend {self.name!r} is a kernel backend")


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
    kind = "kernel"

    def forward(self, p: AttnProblem, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, p, out, lse, dout, dq, dk, dv, deterministic: bool):
        raise NotImplementedError

    def check_writes(self, **buffers: Optional[torch.Tensor]) -> None:
        """Call before launch on every buffer the kernel writes: see
        :func:`avstfp_fast.ops.contract.check_kernel_writes` (ValueError on a layout the
        kernels do not write correctly: a strided last dim, self-overlapping memory)."""
        check_kernel_writes(self.name, **buffers)


def kernel_limits(p: AttnProblem, name: str, *, dtypes, head_dims, max_segments: int,
                  max_batch_dims: int) -> Optional[str]:
    """The checks every kernel backend shares; None when ``p`` is within its limits."""
    if p.dtype not in dtypes:
        return (f"dtype {p.dtype} is not supported by the {name} backend; expected one of "
                f"{[str(d) for d in dtypes]}")
    if p.head_dim not in head_dims:
        return (f"head dim {p.head_dim} is not supported by the {name} backend: expected one "
                f"of {tuple(head_dims)} (q shape {tuple(p.q.shape)})")
    if p.value_dim != p.head_dim:
        return (f"v: value dim {p.value_dim} != head dim {p.head_dim} is not supported by "
                f"the {name} backend (q {tuple(p.q.shape)}, v {tuple(p.v.shape)})")
    for arg, t in (("q", p.q), ("k", p.k), ("v", p.v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            return (f"{arg}: last-dim stride must be 1 for the {name} backend, got strides "
                    f"{t.stride()} for shape {tuple(t.shape)}")
    if len(p.q_segments) > max_segments:
        return (f"segments: at most {max_segments} segments are supported by the {name} "
                f"backend, got {len(p.q_segments)} ({p.q_segments})")
    if sum(1 for n in p.batch_shape if n != 1) > max_batch_dims:
        return (f"q: at most {max_batch_dims} batch dims of size > 1 are supported by the "
                f"{name} backend, got batch shape {tuple(p.batch_shape)}")
    return None


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def register_lazy(name: str, module: str) -> None:
    """Backends with heavy imports (triton, the CUDA extension) load on first use."""
    _LAZY[name] = module


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY and name in _LAZY:
        import importlib
        importlib.import_module(_LAZY[name])
    if name not in _REGISTRY:
        raise ValueError(f"backend: unknown name {name!r}; expected one of "
                         f"{sorted(set(_REGISTRY) | set(_LAZY) | {'auto'})}")
    return _REGISTRY[name]


def available_backends() -> List[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def preference(device: torch.device, p: Optional[AttnProblem] = None) -> List[str]:
    """The order in which ``auto`` tries backends on a device."""
    if device.type == "cuda":
        from . import autotable
        return autotable.gpu_preference(p) + ["torch"]
    return ["torch"]


def select(p: AttnProblem, backend: str = "auto") -> Backend:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a name (str), got {type(backend).__name__}")
    if backend != "auto":
        try:
            b = get_backend(backend)
        except ImportError as e:
            raise ValueError(f"backend={backend!r} is not available: {e}") from e
        reason = _why_not(b, p)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run this input: {reason}")
        return b
    for name in preference(p.device, p):
        try:
            b = get_backend(name)
        except (ValueError, ImportError):
            continue
        if _why_not(b, p) is None:
            return b
    raise ValueError("backend='auto': no backend supports this input:\n" + explain_problem(p))


def _why_not(b: Backend, p: AttnProblem) -> Optional[str]:
    try:
        return b.why_not(p)
    except ImportError as e:    # e.g. triton missing, extension not built
        return f"not available: {e}"


def explain_problem(p: AttnProblem) -> str:
    lines = []
    for name in available_backends():
        try:
            b = get_backend(name)
            r = _why_not(b, p)
        except (ImportError, RuntimeError) as e:
            r = f"not available: {e}"
        lines.append(f"  {name:9s} {'OK' if r is None else r}")
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
register_lazy("triton", "avstfp_fast.ops.triton_backend")
register_lazy("cuda", "avstfp_fast.ops.cuda_backend")
