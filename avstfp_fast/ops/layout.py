"""Batch-dimension merging for the kernel backends (one place for all of them).

The kernels address every operand as ``base + sum_d i_d * stride_d + pos * seq_stride``
over at most :data:`MAX_BATCH_DIMS` batch dims, recovering ``(i0, i1, i2, i3)`` from the
flat batch index by div/mod.  :func:`merge_batch_dims` turns an arbitrary batch shape
and the batch strides of every operand into that form: it drops size-1 dims and merges
adjacent dims that *every* operand lays out densely one inside the other (so a
``(B, N, H)`` batch of a contiguous buffer becomes one dim), then left-pads to four dims.
Broadcast operands (stride 0) merge only where all others are stride 0 too.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

MAX_BATCH_DIMS = 4


def merge_batch_dims(batch: Sequence[int], strides: Sequence[Sequence[int]],
                     max_dims: int = MAX_BATCH_DIMS, what: str = "q"
                     ) -> Tuple[Tuple[int, ...], List[Tuple[int, ...]]]:
    """Merge the batch dims of several operands that share the batch shape ``batch``.

    ``strides[t]`` are operand t's strides over the batch dims (same length as
    ``batch``).  Returns ``(sizes, merged)``: ``sizes`` has ``max_dims`` entries (leading
    1s), ``merged[t]`` the matching ``max_dims`` strides of operand t (leading 0s), such
    that for every flat row-major batch index the address is unchanged.  Raises
    ValueError (naming ``what``) if more than ``max_dims`` dims remain."""
    keep = [i for i, n in enumerate(batch) if n != 1]
    sizes = [int(batch[i]) for i in keep]
    sts = [[int(s[i]) for i in keep] for s in strides]
    i = len(sizes) - 2
    while i >= 0:
        if all(st[i] == st[i + 1] * sizes[i + 1] for st in sts):
            sizes[i] *= sizes.pop(i + 1)
            for st in sts:
                st[i] = st.pop(i + 1)
        i -= 1
    if len(sizes) > max_dims:
        raise ValueError(f"{what}: at most {max_dims} batch dims of size > 1 are supported "
                         f"(after merging dims laid out densely), got batch shape "
                         f"{tuple(batch)}")
    pad = max_dims - len(sizes)
    return (tuple([1] * pad + sizes), [tuple([0] * pad + st) for st in sts])


def dense_strides(sizes: Sequence[int], inner: int) -> Tuple[int, ...]:
    """Strides over merged batch dims ``sizes`` of a dense buffer of ``prod(sizes)``
    rows of ``inner`` elements each (e.g. an fp32 ``(batch, L, E)`` accumulator)."""
    out, acc = [], int(inner)
    for n in reversed(sizes):
        out.append(acc)
        acc *= int(n)
    return tuple(reversed(out))
