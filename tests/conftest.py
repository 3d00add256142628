import os

import pytest
import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (SPEC §5); NaN/inf never pass."""
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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_precision():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))   # fresh inputs every run
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
