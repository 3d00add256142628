"""Test utilities shared by the test suite, the benchmarks and users checking their own inputs.

``TOL`` holds the accuracy contract: the relative error ``||out - ref|| / ||ref||`` of a result
against a float64 reference on the same inputs (see docs/design.md, "Tolerances").
"""
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


def check_vs_reference(fn, inputs, dtype, backend, what=""):
    """``fn(*inputs, backend)`` against ``fn(*inputs_in_float64, "reference")``: the output
    and the gradient of every input, each within ``TOL[dtype]``."""
    inputs = [leaf(t) for t in inputs]
    out = fn(*inputs, backend)
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    g = torch.randn_like(out)
    out.backward(g)
    ref_in = [leaf(t.detach().double()) for t in inputs]
    ref = fn(*ref_in, "reference")
    ref.backward(g.double())
    errs = {"out": rel_err(out, ref)}
    for i, (a, b) in enumerate(zip(inputs, ref_in)):
        assert a.grad is not None, f"{what}: no gradient for input {i}"
        assert a.grad.shape == b.shape, f"{what}: grad {i} shape {tuple(a.grad.shape)} != {tuple(b.shape)}"
        errs[f"grad{i}"] = rel_err(a.grad, b.grad)
    bad = {k: f"{e:.3g}" for k, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"{what} ({dtype}): relative errors above {TOL[dtype]}: {bad}"
