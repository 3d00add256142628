"""The ``prompted_attention`` contract: argument checking and the normalised problem.

Every backend receives an :class:`AttnProblem`, never raw user arguments, so the
checks below are the single place where bad input is rejected.  Messages always name
the argument, the expected and the actual shape/dtype/device.

Semantics (docs/design.md, "The op contract").  With ``segments=None``::

    out = SDPA(q, cat([k, pk], -2), cat([v, pv], -2), scale)

with ``pk``/``pv`` broadcast to q's batch dims.  With ``segments=(n_0, ..., n_{S-1})``
(self-attention layout, ``Lq == Lk == sum(n_s)``) the sequence is cut into S
consecutive pieces; the queries of piece s attend only to the keys/values of piece s
plus the prompts of piece s (``prompt_k``/``prompt_v`` are then sequences of S
tensors, or None).  This is block-diagonal attention with per-block prompts: the AV-STFP
spatial stage inside the joint audio|visual token buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class AttnProblem:
    q: torch.Tensor                      # (*batch, Lq, E)
    k: torch.Tensor                      # (*batch, Lk, E)
    v: torch.Tensor                      # (*batch, Lk, Ev)
    prompt_k: Tuple[Optional[torch.Tensor], ...]   # per segment, broadcastable to (*batch, P_s, E)
    prompt_v: Tuple[Optional[torch.Tensor], ...]   # per segment, broadcastable to (*batch, P_s, Ev)
    q_segments: Tuple[int, ...]          # lengths of the query pieces (one piece when no segments)
    k_segments: Tuple[int, ...]          # lengths of the key pieces
    scale: float
    #: token of everything but the data pointers (shapes, strides, dtypes, device,
    #: segments, scale), set when the op's plan cache has validated this layout: one
    #: object per layout, hashed by identity; backends may key their own per-layout state
    #: on it (None: derive it from the tensors)
    layout: Optional[object] = None

    @property
    def batch_shape(self) -> torch.Size:
        return self.q.shape[:-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def value_dim(self) -> int:
        return self.v.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def expanded_prompts(self, s: int):
        """Prompts of segment s as stride-0 views of shape (*batch, P, E) (no copy)."""
        pk, pv = self.prompt_k[s], self.prompt_v[s]
        if pk is None:
            return None, None
        b = tuple(self.batch_shape)
        return (pk.expand(*b, pk.shape[-2], pk.shape[-1]),
                pv.expand(*b, pv.shape[-2], pv.shape[-1]))


def _shape(t) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _check_tensor(name: str, t, ref: Optional[torch.Tensor] = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; expected one of "
                        f"{[str(d) for d in SUPPORTED_DTYPES]}")
    if ref is not None:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match q's dtype {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name}: on device {t.device}, but q is on {ref.device}")


def _check_prompt(name: str, p: torch.Tensor, batch: torch.Size, last: int, q: torch.Tensor):
    _check_tensor(name, p, q)
    expected = f"broadcastable to {tuple(batch) + ('P', last)}"
    if p.dim() < 2:
        raise ValueError(f"{name}: expected a tensor {expected}, got shape {_shape(p)}")
    if p.shape[-1] != last:
        raise ValueError(f"{name}: last dim must be {last} ({expected}), got shape {_shape(p)}")
    lead = p.shape[:-2]
    if len(lead) > len(batch):
        raise ValueError(f"{name}: has more batch dims than q ({expected}), got shape {_shape(p)}")
    for dp, db in zip(reversed(lead), reversed(batch)):
        if dp != 1 and dp != db:
            raise ValueError(f"{name}: shape {_shape(p)} is not {expected}")


def make_problem(q, k, v, prompt_k=None, prompt_v=None, *, scale=None,
                 segments: Optional[Sequence[int]] = None) -> AttnProblem:
    """Validate user arguments and normalise them into an :class:`AttnProblem`."""
    _check_tensor("q", q)
    _check_tensor("k", k, q)
    _check_tensor("v", v, q)
    if q.dim() < 2:
        raise ValueError(f"q: expected shape (*batch, Lq, E), got {_shape(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != q.dim():
            raise ValueError(f"{name}: expected {q.dim()} dims like q (*batch, L, E) with q "
                             f"{_shape(q)}, got {_shape(t)}")
        if t.shape[:-2] != q.shape[:-2]:
            raise ValueError(f"{name}: batch dims {tuple(t.shape[:-2])} do not match q's "
                             f"{tuple(q.shape[:-2])} (q {_shape(q)}, {name} {_shape(t)})")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: head dim must equal q's {q.shape[-1]}; q {_shape(q)}, k {_shape(k)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v: sequence length must equal k's {k.shape[-2]}; k {_shape(k)}, "
                         f"v {_shape(v)}")
    if (prompt_k is None) != (prompt_v is None):
        raise ValueError("prompt_k and prompt_v must be given together: got prompt_k "
                         f"{_shape(prompt_k) if not isinstance(prompt_k, (list, tuple)) else 'a sequence'}"
                         f" and prompt_v "
                         f"{_shape(prompt_v) if not isinstance(prompt_v, (list, tuple)) else 'a sequence'}")
    Lq, Lk, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    batch = q.shape[:-2]

    if segments is None:
        q_segs, k_segs = (Lq,), (Lk,)
        if isinstance(prompt_k, (list, tuple)) or isinstance(prompt_v, (list, tuple)):
            raise TypeError("prompt_k/prompt_v: per-segment sequences need segments=; "
                            "without segments pass tensors")
        pks, pvs = (prompt_k,), (prompt_v,)
    else:
        try:
            segs = tuple(int(n) for n in segments)
        except TypeError:
            raise TypeError(f"segments: expected a sequence of ints, got {segments!r}") from None
        if any(n < 0 for n in segs) or sum(segs) != Lq or Lq != Lk:
            raise ValueError(f"segments: lengths {segs} must be >= 0 and sum to Lq == Lk; "
                             f"q {_shape(q)}, k {_shape(k)}")
        q_segs = k_segs = segs
        if prompt_k is None:
            pks = pvs = (None,) * len(segs)
        else:
            if not isinstance(prompt_k, (list, tuple)) or not isinstance(prompt_v, (list, tuple)):
                raise TypeError("prompt_k/prompt_v: with segments=, pass one prompt tensor "
                                f"(or None) per segment, got {type(prompt_k).__name__}")
            if len(prompt_k) != len(segs) or len(prompt_v) != len(segs):
                raise ValueError(f"prompt_k/prompt_v: expected {len(segs)} entries (one per "
                                 f"segment), got {len(prompt_k)} and {len(prompt_v)}")
            pks, pvs = tuple(prompt_k), tuple(prompt_v)

    for s, (pk, pv) in enumerate(zip(pks, pvs)):
        sfx = "" if segments is None else f"[{s}]"
        if (pk is None) != (pv is None):
            raise ValueError(f"prompt_k{sfx} and prompt_v{sfx} must be given together")
        if pk is None:
            continue
        _check_prompt(f"prompt_k{sfx}", pk, batch, E, q)
        _check_prompt(f"prompt_v{sfx}", pv, batch, Ev, q)
        if pk.shape[-2] != pv.shape[-2]:
            raise ValueError(f"prompt_v{sfx}: number of prompts {pv.shape[-2]} does not match "
                             f"prompt_k{sfx}'s {pk.shape[-2]} (prompt_k {_shape(pk)}, "
                             f"prompt_v {_shape(pv)})")
    # Attention over an empty key set is undefined: refuse it rather than invent a value.
    for s, (nq, nk) in enumerate(zip(q_segs, k_segs)):
        p = 0 if pks[s] is None else pks[s].shape[-2]
        if nq > 0 and nk + p == 0:
            where = "" if segments is None else f" in segment {s}"
            raise ValueError(f"k: no keys to attend to{where} (Lk=0 and no prompts); "
                             f"q {_shape(q)}, k {_shape(k)}")

    if scale is None:
        scale = E ** -0.5
    elif not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    return AttnProblem(q, k, v, tuple(pks), tuple(pvs), q_segs, k_segs, float(scale))


def stride_order(shape, strides):
    """The dims of a tensor of ``shape`` laid out like ``strides``, outermost first, as
    :func:`empty_in_stride_order` allocates them (the last dim always innermost)."""
    n = len(shape)

    def key(i):
        broadcast = shape[i] == 1 or strides[i] == 0
        return (not broadcast, -strides[i], i)         # outermost first

    return sorted(range(n - 1), key=key) + ([n - 1] if n else [])


def empty_in_stride_order(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fresh dense tensor of ``shape`` whose memory follows ``like``'s stride order.

    Outputs written this way keep the caller's layout: the attention output of a
    (B, M, N, H, d)-ordered q view can be moved back to (B, M, N, H*d) without a copy.
    Whatever ``like``'s strides, the last dim is the innermost (stride 1: the kernels
    write rows of the head dim densely), and dims of size 1 or stride 0 in ``like`` (an
    ``expand``-ed batch dim carries no order) are the outermost.
    """
    n = len(shape)
    order = stride_order(shape, like.stride())
    t = torch.empty([shape[i] for i in order], dtype=dtype or like.dtype, device=like.device)
    inv = [0] * n
    for pos, i in enumerate(order):
        inv[i] = pos
    return t.permute(inv)


def check_kernel_writes(backend: str, **buffers: Optional[torch.Tensor]) -> None:
    """Refuse to launch a kernel into a buffer laid out otherwise than kernels assume.

    Every kernel backend calls this before launch, on each buffer it writes (``out``;
    ``dq``, ``dk``, ``dv``): the last dim must be dense (stride 1) and no two elements
    may share memory (no stride-0 dim of size > 1, no interleaved strides), else the
    kernel would silently write wrong values.  Raises ValueError naming the buffer.
    ``_KernelAttention`` allocates such buffers (:func:`empty_in_stride_order`, or views
    of one dense QKV-gradient buffer); this guards direct backend calls and regressions.
    """
    for name, t in buffers.items():
        if t is None or t.numel() == 0 or t.is_contiguous():    # the common case, cheap
            continue
        sizes, strides = t.shape, t.stride()
        if torch.compiler.is_compiling():                      # traced: no cache state
            _check_writable(backend, name, tuple(sizes), strides)
            continue
        if (sizes, strides) in _WRITABLE:                       # checked before
            continue
        _check_writable(backend, name, tuple(sizes), strides)
        if len(_WRITABLE) >= 1024:
            _WRITABLE.clear()
        _WRITABLE.add((sizes, strides))


#: (shape, strides) of non-contiguous buffers that passed the check (the result depends
#: on nothing else)
_WRITABLE: set = set()


def _check_writable(backend: str, name: str, sizes, strides) -> None:
    if sizes[-1] > 1 and strides[-1] != 1:
        raise ValueError(f"{name}: the {backend} backend writes it with a dense last dim "
                         f"(stride 1), got strides {strides} for shape {sizes}")
    extent = 1              # memory span of the dims already visited (inner ones)
    for size, stride in sorted((d for d in zip(sizes, strides) if d[0] > 1),
                               key=lambda d: d[1]):
        if stride < extent:
            raise ValueError(f"{name}: the {backend} backend writes every element once, "
                             f"but strides {strides} for shape {sizes} make elements "
                             f"share memory (e.g. an expand()-ed dim)")
        extent += (size - 1) * stride
