"""prompted_attention: the torch backend against the reference on random problems
(docs/design.md, "The op contract"), the contract's own semantics, and errors.  The
cases every backend must pass are in tests/test_backend_contract.py."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from avstfp_fast import explain, prompted_attention, prompted_attention_qkv
from avstfp_fast.testing import assert_close, leaf, strided, tolerance_failures

LAYOUTS = ("contiguous", "permuted", "sliced")


@st.composite
def problems(draw):
    nb = draw(st.integers(1, 3))
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=nb, max_size=nb)))
    E = draw(st.sampled_from([4, 8]))
    Ev = draw(st.sampled_from([4, 8]))
    use_segments = draw(st.booleans())
    if use_segments:
        segs = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
        Lq = Lk = sum(segs)
        Ps = [draw(st.integers(0, 3)) for _ in segs]
        for i, n in enumerate(segs):     # often give unprompted non-empty segments a prompt
            if n > 0 and Ps[i] == 0 and draw(st.booleans()):
                Ps[i] = 1
    else:
        segs = None
        Lq = draw(st.integers(1, 9))
        Lk = draw(st.integers(0, 9))
        Ps = [draw(st.integers(1 if Lk == 0 else 0, 3))]
    # prompt broadcast pattern: (P,E) / (last batch dim,P,E) / full batch / none
    pshape = draw(st.sampled_from(["shared", "per_head", "full"]))
    layout = draw(st.sampled_from(LAYOUTS))
    return batch, Lq, Lk, E, Ev, segs, Ps, pshape, layout


def _prompt(batch, P, E, pshape, dtype):
    if pshape == "shared":
        return torch.randn(P, E, dtype=dtype)
    if pshape == "per_head":
        return torch.randn(batch[-1], P, E, dtype=dtype)
    return torch.randn(*batch, P, E, dtype=dtype)


def _build(batch, Lq, Lk, E, Ev, segs, Ps, pshape, layout, dtype):
    q = leaf(strided((*batch, Lq, E), dtype, layout))
    k = leaf(strided((*batch, Lk, E), dtype, layout))
    v = leaf(strided((*batch, Lk, Ev), dtype, layout))
    pks = [leaf(_prompt(batch, P, E, pshape, dtype)) for P in Ps]
    pvs = [leaf(_prompt(batch, P, Ev, pshape, dtype)) for P in Ps]
    if segs is None:
        return q, k, v, pks[0], pvs[0], [q, k, v, pks[0], pvs[0]]
    return q, k, v, pks, pvs, [q, k, v, *pks, *pvs]


def _run(backend, q, k, v, pk, pv, segs, grad_out):
    out = prompted_attention(q, k, v, pk, pv, segments=segs, backend=backend)
    inputs = [q, k, v] + (list(pk) + list(pv) if isinstance(pk, list) else [pk, pv])
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return out, grads


def _segments_have_keys(segs, Ps):
    return segs is None or all(n == 0 or n + p > 0 for n, p in zip(segs, Ps))


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from([torch.float32, torch.float64, torch.float16,
                                    torch.bfloat16]))
def test_torch_backend_matches_reference(prob, dtype):
    """Segments, per-segment prompts, every layout; fp16/bf16 too (the CPU path computes
    them in fp32: its prompt gradients of block-diagonal cases failed in fp16 before)."""
    batch, Lq, Lk, E, Ev, segs, Ps, pshape, layout = prob
    if not _segments_have_keys(segs, Ps):
        return
    q, k, v, pk, pv, leaves = _build(*prob, torch.float64)
    go = torch.randn(*batch, Lq, Ev, dtype=torch.float64)
    with torch.no_grad():              # the reference sees the values the backend sees
        for t in leaves + [go]:
            t.copy_(t.to(dtype))
    ref, ref_g = _run("reference", q, k, v, pk, pv, segs, go)

    def cast(t):
        return [leaf(x.to(dtype)) for x in t] if isinstance(t, list) else leaf(t.to(dtype))
    q2, k2, v2, pk2, pv2 = (cast(t) for t in (q, k, v, pk, pv))
    out, g = _run("torch", q2, k2, v2, pk2, pv2, segs, go.to(dtype))
    assert out.shape == ref.shape and out.dtype == dtype
    # the floor: the reference in float32 on the same values (problems that cancel, e.g.
    # dq of one query over two keys, lose digits in any float32 computation)
    q3, k3, v3, pk3, pv3 = ([leaf(x.float()) for x in t] if isinstance(t, list)
                            else leaf(t.float()) for t in (q, k, v, pk, pv))
    flo, flo_g = _run("reference", q3, k3, v3, pk3, pv3, segs, go.float())
    for what, a, b, c in [("out", out, ref, flo)] + [
            (f"grad {i}", a, b, c) for i, (a, b, c) in enumerate(zip(g, ref_g, flo_g))]:
        if a is None and b is None:
            continue
        why = tolerance_failures(a, b, dtype, floor=c)
        assert not why, f"{what}: {why}"


def test_reference_equals_sdpa_over_cat():
    q = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    k = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    pk, pv = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 2, 6, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q, torch.cat([k, pk.expand(2, 3, 2, 8)], -2),
                                          torch.cat([v, pv.expand(2, 3, 2, 6)], -2), scale=0.3)
    got = prompted_attention(q, k, v, pk, pv, scale=0.3, backend="reference")
    assert_close(got, want, torch.float64)


def test_segments_are_block_diagonal():
    """Segment s attends to its own keys + prompts only: compare with separate calls."""
    q, k, v = (torch.randn(2, 9, 8, dtype=torch.float64) for _ in range(3))
    pks = [torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)]
    pvs = [torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)]
    got = prompted_attention(q, k, v, pks, pvs, segments=(4, 5), backend="torch")
    a = prompted_attention(q[:, :4], k[:, :4], v[:, :4], pks[0], pvs[0], backend="reference")
    b = prompted_attention(q[:, 4:], k[:, 4:], v[:, 4:], pks[1], pvs[1], backend="reference")
    assert_close(got, torch.cat([a, b], 1), torch.float64)


def test_prompt_gradient_is_summed_over_broadcast():
    q = torch.randn(4, 2, 3, 8, dtype=torch.float64)
    k = torch.randn(4, 2, 3, 8, dtype=torch.float64)
    pk = torch.randn(2, 2, 8, dtype=torch.float64, requires_grad=True)
    pv = torch.randn(2, 2, 8, dtype=torch.float64, requires_grad=True)
    out = prompted_attention(q, k, k, pk, pv, backend="torch")
    g, = torch.autograd.grad(out.sum(), pv)
    manual = torch.zeros_like(pv)
    for b in range(4):
        pvb = pv.detach().clone().requires_grad_(True)
        o = prompted_attention(q[b:b + 1], k[b:b + 1], k[b:b + 1], pk, pvb, backend="reference")
        manual += torch.autograd.grad(o.sum(), pvb)[0]
    assert_close(g, manual, torch.float64)


def test_output_follows_q_memory_order_for_helpers():
    from avstfp_fast.ops.contract import empty_in_stride_order
    base = torch.randn(2, 5, 3, 4, 8)            # (B, M, N, H, d)
    q = base.permute(0, 2, 3, 1, 4)               # (B, N, H, M, d) view
    o = empty_in_stride_order(q.shape, q)
    assert o.shape == q.shape
    assert o.permute(0, 3, 1, 2, 4).is_contiguous()


# ----------------------------------------------------------------------------- bad input
def _ok():
    return (torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8),
            torch.randn(3, 2, 8), torch.randn(3, 2, 8))


@pytest.mark.parametrize("case,exc,words", [
    ("q_rank", ValueError, ["q", "(*batch, Lq, E)", "(5,)"]),
    ("k_rank", ValueError, ["k", "(2, 6, 8)", "(2, 3, 5, 8)"]),
    ("batch_mismatch", ValueError, ["k", "(2, 4)", "(2, 3)"]),
    ("head_dim", ValueError, ["k", "8", "(2, 3, 6, 4)"]),
    ("v_len", ValueError, ["v", "(2, 3, 7, 8)", "(2, 3, 6, 8)"]),
    ("pk_without_pv", ValueError, ["prompt_k", "prompt_v", "together"]),
    ("prompt_shape", ValueError, ["prompt_k", "(4, 2, 8)", "broadcastable"]),
    ("prompt_count", ValueError, ["prompt_v", "(3, 1, 8)", "(3, 2, 8)"]),
    ("dtype_mix", TypeError, ["k", "torch.float64", "torch.float32"]),
    ("int_dtype", TypeError, ["q", "torch.int64"]),
    ("not_tensor", TypeError, ["v", "list"]),
    ("segments_sum", ValueError, ["segments", "(2, 2)"]),
    ("segments_prompts", ValueError, ["prompt_k", "2 entries"]),
    ("no_keys", ValueError, ["k", "no keys"]),
    ("backend", ValueError, ["backend", "nope"]),
    ("scale", TypeError, ["scale", "str"]),
])
def test_bad_input_names_argument(case, exc, words):
    q, k, v, pk, pv = _ok()
    kw = {}
    if case == "q_rank":
        q = torch.randn(5)
    elif case == "k_rank":
        k = torch.randn(2, 6, 8)
    elif case == "batch_mismatch":
        k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    elif case == "head_dim":
        k = torch.randn(2, 3, 6, 4)
    elif case == "v_len":
        v = torch.randn(2, 3, 7, 8)
    elif case == "pk_without_pv":
        pv = None
    elif case == "prompt_shape":
        pk = torch.randn(4, 2, 8)
    elif case == "prompt_count":
        pv = torch.randn(3, 1, 8)
    elif case == "dtype_mix":
        k = k.double()
    elif case == "int_dtype":
        q = torch.ones(2, 3, 5, 8, dtype=torch.int64)
    elif case == "not_tensor":
        v = [1, 2]
    elif case == "segments_sum":
        k = v = torch.randn(2, 3, 5, 8)
        kw["segments"] = (2, 2)
    elif case == "segments_prompts":
        k = v = torch.randn(2, 3, 5, 8)
        kw["segments"] = (2, 3)
        pk, pv = [pk], [pv]
    elif case == "no_keys":
        k = v = torch.randn(2, 3, 0, 8)
        pk = pv = None
    elif case == "backend":
        kw["backend"] = "nope"
    elif case == "scale":
        kw["scale"] = "big"
    with pytest.raises(exc) as ei:
        prompted_attention(q, k, v, pk, pv, **kw)
    msg = str(ei.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the mix")
def test_mixed_devices():
    q, k, v, pk, pv = _ok()
    with pytest.raises(ValueError, match="device"):
        prompted_attention(q, k.cuda(), v, pk, pv)


def test_mixed_devices_meta():
    """Device mismatch without a GPU: a meta tensor stands in for the other device."""
    q, k, v, pk, pv = _ok()
    with pytest.raises(ValueError, match=r"prompt_k: on device meta, but q is on cpu"):
        prompted_attention(q, k, v, pk.to("meta"), pv)


def test_named_backend_that_does_not_fit_raises_with_reason():
    q, k, v, pk, pv = _ok()
    with pytest.raises(ValueError, match="backend='cuda' (cannot run this input|is not available)"):
        prompted_attention(q, k, v, pk, pv, backend="cuda")


def test_explain_lists_every_backend():
    q, k, v, pk, pv = _ok()
    text = explain(q, k, v, pk, pv)
    for name in ("reference", "torch", "triton", "cuda", "auto picks: torch"):
        assert name in text


def test_qkv_must_be_contiguous():
    qkv = torch.randn(2, 3, 5, 3, 2, 8).transpose(1, 2)
    with pytest.raises(ValueError, match="qkv: must be contiguous"):
        prompted_attention_qkv(qkv, qkv_dim=3, seq_dim=1)
    with pytest.raises(ValueError, match="qkv: expected size 3 at qkv_dim=2"):
        prompted_attention_qkv(torch.randn(2, 3, 4, 8), qkv_dim=2, seq_dim=1)


def test_autocast_runs_in_the_autocast_dtype():
    q, k, v, pk, pv = _ok()
    want = prompted_attention(q.double(), k.double(), v.double(), pk.double(), pv.double(),
                              backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prompted_attention(q, k, v, pk, pv, backend="torch")
        qkv = torch.randn(2, 4, 3, 2, 8)
        packed = prompted_attention_qkv(qkv, pk[:2], pv[:2], qkv_dim=2, seq_dim=1)
    assert out.dtype == torch.bfloat16 and packed.dtype == torch.bfloat16
    assert_close(out, want, torch.bfloat16)
