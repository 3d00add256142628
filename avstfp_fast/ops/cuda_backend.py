"""The ``cuda`` backend of ``prompted_attention``: hand-written CUDA C++ kernels.

Kernels: ``csrc/*.cu`` (design notes at the top of ``csrc/prompted_attention.cu``): a
FlashAttention-style forward with the prompts as a second key/value source of the same
online softmax, and a backward of two kernels, a dQ kernel (one 4-warp unit per query
tile; it also computes ``delta = rowsum(dO*O)`` of its tile for the next kernel) and a
dK/dV kernel (one unit per key tile, prompt tiles included), so dq/dk/dv need no atomics.  Streamed tiles go through a 1-3 stage cp.async
pipeline; sequences of at most 16 queries (the temporal stage) are packed 4 per CTA;
outputs are written with 16-byte stores.  The compile-time contract (registers, spills,
occupancy, cp.async in the SASS) is ``bench/static_sm90_cuda.py``.  Configs above 99 KiB of
shared memory (head dim 128, some fp32) need sm_80/sm_90 (163/227 KiB per CTA); on
sm_86/sm_89 their launch fails with a clear message.  fp16/bf16 kernels have
FlashAttention-2's structure (``mma.sync`` m16n8k16 + ``ldmatrix``, scores, probabilities
and accumulators in registers, fp32 accumulation); fp32 uses plain FMA through shared
memory.  Operands are read and written through their strides
(4 batch strides + row stride; the head dim must be dense), so the temporal and
spatial/fusion views of one QKV buffer and stride-0 (batch-shared) or per-position
prompts need no copies.  Up to 4 segments.

The kernels are registered as torch ops ``torch.ops.avstfp_cuda.fwd`` / ``.bwd`` by the
extension ``avstfp_fast._C`` (``csrc/binding.cpp``); their fake implementations are
registered below so that they trace under ``torch.compile``.  The extension is built by
``pip install`` when nvcc is present, else JIT-compiled (ninja, cached; see
:mod:`avstfp_fast._build`) on the first call of this backend.  Environment:
``AVSTFP_NO_JIT=1`` forbids the JIT build; ``AVSTFP_BUILD_DIR`` (default
``~/.cache/avstfp_fast``) holds it; ``AVSTFP_CUDA_ARCHS`` / ``TORCH_CUDA_ARCH_LIST`` pick
the architectures (default sm_80 + PTX, sm_90a; e.g. ``AVSTFP_CUDA_ARCHS=90a`` halves the
build time on an H100); ``MAX_JOBS`` sets ninja's parallelism; ``CUDA_HOME`` the toolkit
(default /usr/local/cuda).  ``load(verbose=True)`` builds now and shows the commands.

Launch parameters (merged batch dims, operand strides, segment table) come from the
launch plan shared by the backends (:class:`avstfp_fast.ops.layout.LaunchPlan`, cached per
layout); the binding only checks the tensors against it and adds the pointers.

Prompt gradients: one buffer ``(2, *lead, P, E)`` in the prompts' dtype per segment with
prompts (:func:`avstfp_fast.ops.layout.prompt_grad_shape`; index 0 for prompt_k, 1 for
prompt_v, lead = the prompts' own batch shape), written finished by the backward's last
kernel: the units that own prompt rows write fp32 partials per sequence into a scratch
buffer, and the last unit of each prompt row set (an int32 ticket counter per row set,
kept by the binding per device and stream, zeroed once when allocated and reset to 0 by
the kernels themselves) sums
them in sequence order and writes the prompts' dtype.  No zero-fill, no atomics on data,
no cast, bit-exact between runs in every mode.  The short fp16/bf16 backward keeps a
running sum instead where :func:`~avstfp_fast.ops.layout.seq_reps` applies.  The scratch
(partials, then the fp32 delta = rowsum(dO*O) that the dQ kernel writes and the dK/dV
kernel reads) is allocated here, per call; :func:`launches` is the launch decision the
ledger counts and the scratch is sized by.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import _build
from .backends import Capabilities, KernelBackend, register
from .contract import AttnProblem
from .layout import DTYPE_CODES, PLAN_HEADER, LaunchPlan, finish_prompt_grads

MAX_SEGMENTS = 4
MAX_BATCH_DIMS = 4
HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CAPABILITY = (8, 0)

_LOADED = False
_LOAD_ERROR: Optional[str] = None
_FAKES = False


# --------------------------------------------------------------------------- extension
def _installed() -> bool:
    try:
        return importlib.util.find_spec("avstfp_fast._C") is not None
    except (ImportError, ValueError):
        return False


def extension_status() -> Optional[str]:
    """None if the extension is loaded, installed, or can be JIT-built; else why not.
    Never builds anything."""
    if _LOADED:
        return None
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    if _installed():
        return None
    if os.environ.get("AVSTFP_NO_JIT", "0") == "1":
        return ("the CUDA extension avstfp_fast._C is not built and AVSTFP_NO_JIT=1 forbids "
                "compiling it; reinstall with nvcc available (pip install "
                "--no-build-isolation -e .)")
    if _build.nvcc_path() is None:
        return ("the CUDA extension avstfp_fast._C is not built and nvcc was not found to "
                "compile it (set CUDA_HOME to a CUDA toolkit, e.g. /usr/local/cuda, or "
                "reinstall with nvcc available)")
    return None


def load(verbose: bool = False) -> None:
    """Import the installed extension, or JIT-build it; register the fake impls."""
    global _LOADED, _LOAD_ERROR
    if _LOADED:
        return
    if _LOAD_ERROR is not None:
        raise ImportError(_LOAD_ERROR)
    try:
        try:
            importlib.import_module("avstfp_fast._C")
        except ImportError as e:
            reason = extension_status() if not _installed() else None
            if reason is not None:
                raise ImportError(reason) from e
            _build.jit_load(verbose=verbose)
        if not hasattr(torch.ops.avstfp_cuda, "fwd"):
            raise ImportError("the extension loaded but did not register torch.ops.avstfp_cuda")
        _register_fakes()
    except Exception as e:   # remember: do not retry a multi-minute build on every call
        _LOAD_ERROR = f"the CUDA extension could not be loaded or built: {e}"
        raise ImportError(_LOAD_ERROR) from e
    _LOADED = True


def _register_fakes() -> None:
    """Fake (meta) implementations: both ops only write into their mutable arguments."""
    global _FAKES
    if _FAKES:
        return

    @torch.library.register_fake("avstfp_cuda::fwd")
    def _fwd_fake(q, k, v, prompt_k, prompt_v, plan, out, lse):
        return None

    @torch.library.register_fake("avstfp_cuda::bwd")
    def _bwd_fake(q, k, v, prompt_k, prompt_v, plan, out, dout, lse, dq, dk, dv, dprompt,
                  scratch):
        return None

    _FAKES = True


# --------------------------------------------------------------------------- launches
#: The ops' schemas, as csrc/binding.cpp's TORCH_LIBRARY defines them (tests check the text).
OP_SCHEMAS = {
    "fwd": "fwd(Tensor q, Tensor k, Tensor v, Tensor?[] prompt_k, Tensor?[] prompt_v, "
           "int[] plan, Tensor(a!) out, Tensor(b!) lse) -> ()",
    "bwd": "bwd(Tensor q, Tensor k, Tensor v, Tensor?[] prompt_k, Tensor?[] prompt_v, "
           "int[] plan, Tensor out, Tensor dout, Tensor lse, Tensor(a!) dq, Tensor(b!) dk, "
           "Tensor(c!) dv, Tensor(d!)[] dprompt, Tensor(e!) scratch) -> ()",
}
#: head dims / dtypes with packed 16-query configs (csrc/attn_kernels.cuh Config PACK_*_S > 0)
_NO_PACKED = {(DTYPE_CODES["float32"], 128)}


@dataclasses.dataclass(frozen=True)
class Launches:
    """What one call of an ``avstfp_cuda`` op launches, and the scratch the backend
    allocates for it.  ``kernels``: the kernels the C++ launcher starts, in order (an empty
    grid launches nothing); ``scratch_floats``: the fp32 scratch of the call (csrc/binding.cpp
    ``scratch``): the prompt-gradient partials (2 * slots * P * E per segment with prompts;
    slots: nseq, or the row sets nseq / seq_reps of the short backward's running sums),
    then, for the two-kernel backward, delta (nseq * Lq: written by dq_kernel, read by
    dkv_kernel); ``tickets``: int32 ticket counters the kernels need (one per segment and
    prompt row set; the binding keeps a zeroed buffer per device and stream for them)."""
    kernels: Tuple[str, ...]
    scratch_floats: int = 0
    tickets: int = 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _reduced_reps(plan: Sequence[int], s: int) -> int:
    """attn_params.h ``prompt_reps``: sequences sharing one prompt row set of segment s (the
    product of the batch dims dpk{s} is broadcast over)."""
    from .layout import MAX_SEGMENTS, OPERANDS
    base = PLAN_HEADER + 5 * MAX_SEGMENTS + 5 * OPERANDS.index(f"dpk{s}")
    r = 1
    for d in range(4):
        if int(plan[2 + d]) > 1 and int(plan[base + d]) == 0:
            r *= int(plan[2 + d])
    return r


def launches(op: str, plan: Sequence[int]) -> Launches:
    """The launch decision of csrc/attn_kernels.cuh (``launch_fwd_d`` / ``launch_bwd_d``)
    for ``op`` ("fwd" or "bwd") and the plan's ints (:meth:`LaunchPlan.ints`, what the
    binding receives): the backend sizes the scratch by it and the ledger
    (bench/ledger.py) counts its kernels.  Keep in step with the C++ launchers."""
    nseq, Lq, nseg, D, dtype = (int(plan[i]) for i in (1, 6, 7, 8, 9))
    short = bool(plan[12])
    seg = [plan[PLAN_HEADER + 5 * s: PLAN_HEADER + 5 * s + 5] for s in range(nseg)]
    q_len = [int(x[1]) for x in seg]
    keys = [int(x[3]) + int(x[4]) for x in seg]        # k_len + n_prompt per segment
    packed = short and (dtype, D) not in _NO_PACKED
    if op == "fwd":
        bm = 16 if packed else 64
        return Launches(("fwd_kernel",) if nseq and sum(_cdiv(n, bm) for n in q_len) else ())
    if op != "bwd":
        raise ValueError(f"op: expected 'fwd' or 'bwd', got {op!r}")
    if nseq == 0:
        return Launches(())
    reps = int(plan[15])                               # seq_reps: one slot per row set
    parts = sum(2 * (nseq // reps if reps else nseq) * int(x[4]) * D for x in seg)
    tickets = sum(nseq // _reduced_reps(plan, s) for s, x in enumerate(seg) if int(x[4]))
    if dtype != DTYPE_CODES["float32"] and short:   # seq_bwd_kernel: delta in registers
        return Launches(("seq_bwd_kernel",) if nseg else (), parts, tickets)
    bm = 16 if packed else 64
    ks = []
    if sum(_cdiv(n, bm) for n in q_len):
        ks.append("dq_kernel")         # also writes delta = rowsum(dO*O) of its query tile
    if sum(_cdiv(n, bm) for n in keys):
        ks.append("dkv_kernel")
    return Launches(tuple(ks), parts + nseq * Lq, tickets)


def define_ops_for_tracing() -> None:
    """Define ``torch.ops.avstfp_cuda.fwd`` / ``.bwd`` from :data:`OP_SCHEMAS` with only
    their fake implementations, for tracing without the extension (bench/ledger.py on a
    machine without a GPU).  Not for a process that may load the extension."""
    global _LOADED
    if _LOADED:
        return
    if not hasattr(torch.ops.avstfp_cuda, "fwd"):
        lib = torch.library.Library("avstfp_cuda", "DEF")
        for schema in OP_SCHEMAS.values():
            lib.define(schema)
        _TRACING_LIBS.append(lib)
    _register_fakes()
    _LOADED = True


_TRACING_LIBS: List[object] = []


# --------------------------------------------------------------------------- helpers
def _dense_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _prompts(p: AttnProblem):
    """Prompts with a dense last dim; None for absent and empty (P = 0) ones, as the plan
    has them (n_prompt 0 <=> no pointer)."""
    pks = [None if t is None or t.shape[-2] == 0 else _dense_last(t) for t in p.prompt_k]
    pvs = [None if t is None or t.shape[-2] == 0 else _dense_last(t) for t in p.prompt_v]
    return pks, pvs


def _key(t: Optional[torch.Tensor]):
    return None if t is None else (tuple(t.shape), t.stride())


_PLANS: Dict[tuple, LaunchPlan] = {}
_MAX_PLANS = 256


def _plan(q, k, v, pks, pvs, p: AttnProblem, **kw) -> LaunchPlan:
    """The launch plan (ops/layout.py), cached per layout: shapes, strides, segments,
    dtype, scale, and the backward's outputs and mode."""
    key = (q.dtype, _key(q), _key(k), _key(v), tuple(map(_key, pks)), tuple(map(_key, pvs)),
           p.q_segments, p.k_segments, float(p.scale),
           tuple((n, _key(t) if isinstance(t, torch.Tensor) else t) for n, t in sorted(kw.items())))
    pl = _PLANS.get(key)
    if pl is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        pl = _PLANS[key] = LaunchPlan(q, k, v, pks, pvs, p.q_segments, p.k_segments, p.scale,
                                      **kw)
    return pl


# --------------------------------------------------------------------------- backend
class CudaBackend(KernelBackend):
    name = "cuda"
    capabilities = Capabilities(
        devices=("cuda",), min_capability=MIN_CAPABILITY,
        dtypes=DTYPES, head_dims=HEAD_DIMS, value_dim_is_head_dim=True,
        dense_last_dim=("q", "k", "v"),       # prompts are made dense by the backend
        max_segments=MAX_SEGMENTS, max_batch_dims=MAX_BATCH_DIMS, deterministic=True)

    def reasons(self, p: AttnProblem) -> List[str]:
        out = super().reasons(p)
        nseq = 1
        for n in p.batch_shape:
            nseq *= n
        if nseq > 2**31 - 1:
            out.append(f"q: batch product {nseq} exceeds the CUDA grid limit 2^31-1")
        if p.device.type == "cuda":             # the extension matters only where it runs
            status = extension_status()
            if status is not None:
                out.append(status)
        return out

    def forward(self, p: AttnProblem, out: torch.Tensor) -> torch.Tensor:
        self.check_writes(out=out)
        load()
        lse = torch.empty(tuple(p.batch_shape) + (p.q.shape[-2],), dtype=torch.float32,
                          device=p.device)
        pks, pvs = _prompts(p)
        # check_writes guarantees a dense last dim (head dims > 1): the kernel writes out
        plan = _plan(p.q, p.k, p.v, pks, pvs, p, out=out)
        torch.ops.avstfp_cuda.fwd(p.q, p.k, p.v, pks, pvs, plan.ints(), out, lse)
        return lse

    def backward(self, p, out, lse, dout, dq, dk, dv, deterministic: bool):
        self.check_writes(dq=dq, dk=dk, dv=dv)
        load()
        dout = _dense_last(dout)
        out = _dense_last(out)
        pks, pvs = _prompts(p)
        # as in forward, check_writes guarantees dq/dk/dv a dense last dim
        # deterministic needs nothing of its own: every mode sums the prompt gradients in
        # one fixed order (no atomics)
        plan = _plan(p.q, p.k, p.v, pks, pvs, p, out=out, dout=dout, dq=dq, dk=dk, dv=dv,
                     backward=True)
        # one buffer (2, *lead, P, E) in the prompts' dtype per segment with prompts
        # (layout.prompt_grad_shape), all carved from one allocation; the kernels write
        # every element, finished
        ints = plan.ints()
        la = launches("bwd", ints)
        sizes = [0 if shp is None else math.prod(shp) for shp in plan.grad_shapes]
        flat = torch.empty(sum(sizes), dtype=p.q.dtype, device=p.device)
        bufs, o = [], 0
        for shp, n in zip(plan.grad_shapes, sizes):
            bufs.append(None if shp is None else flat[o:o + n].view(shp))
            o += n
        scratch = torch.empty(la.scratch_floats, dtype=torch.float32, device=p.device)
        torch.ops.avstfp_cuda.bwd(p.q, p.k, p.v, pks, pvs, ints, out, dout, lse,
                                  dq, dk, dv, [b for b in bufs if b is not None], scratch)
        dpk, dpv = [], []
        for s, (pk, pv) in enumerate(zip(p.prompt_k, p.prompt_v)):
            if pk is None:
                dpk.append(None)
                dpv.append(None)
            elif bufs[s] is None:                     # P = 0
                dpk.append(torch.zeros_like(pk))
                dpv.append(torch.zeros_like(pv))
            else:                                     # views (prompt shapes), no kernel
                gk, gv = finish_prompt_grads(bufs[s], pk, pv)
                dpk.append(gk)
                dpv.append(gv)
        return tuple(dpk), tuple(dpv)


register(CudaBackend())
