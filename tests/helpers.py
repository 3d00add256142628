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
