"""Shared test helpers: strided problem builders and tolerance checks."""
import torch

from conftest import TOL, assert_close, rel_err  # noqa: F401


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
    and the gradient of every input, each within SPEC §5's tolerance for ``dtype``."""
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
