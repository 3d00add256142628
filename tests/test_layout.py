"""The launch-plan helpers both kernel backends build on (avstfp_fast/ops/layout.py):
batch-dim merging and the prompt-sharing rule.  Plain Python: no kernel, no GPU, no
interpreter.  The CUDA plan as a whole (every element addressed once) is checked with
the emulation in tests/test_cuda_build.py."""
import pytest
import torch
from hypothesis import given, settings, strategies as st


def test_merge_batch_dims():
    from avstfp_fast.ops.layout import dense_strides, merge_batch_dims
    # temporal view (B, N, H, M, d) of a contiguous (B, M, N, H, d): N and H merge
    q = torch.empty(2, 10, 5, 4, 8).movedim(1, -2)
    sizes, (strides,) = merge_batch_dims(q.shape[:-2], [q.stride()[:-2]])
    assert sizes == (1, 1, 2, 20) and strides == (0, 0, q.stride(0), q.stride(2))
    # a broadcast operand keeps the dims apart; size-1 dims vanish
    sizes, sts = merge_batch_dims((3, 1, 4), [(4, 99, 1), (0, 5, 1)])
    assert sizes == (1, 1, 3, 4) and sts == [(0, 0, 4, 1), (0, 0, 0, 1)]
    with pytest.raises(ValueError, match="batch dims"):
        merge_batch_dims((2,) * 5, [(0, 1, 0, 1, 0)])
    assert dense_strides((1, 2, 3, 4), 10) == (240, 120, 40, 10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.booleans()), min_size=1, max_size=4))
def test_leading_reps_matches_the_sharing_sets(dims):
    """layout.leading_reps (the prompt-gradient sums of both backends rest on it) against
    brute force: the flat sequence indices that share a prompt row set (equal kept
    coordinates) are exactly {r * GS + g : r < R} for each g < GS, or None when they are
    not of that form."""
    import itertools
    from avstfp_fast.ops.layout import leading_reps
    sizes = [n for n, _ in dims]
    kept = [n if k else 1 for n, k in dims]
    reps = [1 if k else n for n, k in dims]
    sets = {}
    for b, idx in enumerate(itertools.product(*[range(n) for n in sizes])):
        key = tuple(i for i, (_, k) in zip(idx, dims) if k)
        sets.setdefault(key, []).append(b)
    groups = sorted(sets.values())
    split = leading_reps(kept, reps)
    R = 1
    for r in reps:
        R *= r
    GS = len(groups)
    arith = all(g == [r * GS + g[0] for r in range(R)] for g in groups)
    assert (split is not None) == arith, (dims, split)
    if split is not None:
        assert split == (R, GS)
