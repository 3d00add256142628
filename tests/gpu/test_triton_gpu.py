"""Triton backend on a GPU, what only a GPU shows: both backward paths (sequence-owning and
fa2) at the stage layouts.  The op's contract cases (stage shapes, layouts, odd lengths,
segments, short queries over long keys, batch products above 65535, determinism,
torch.compile) run for every backend in tests/test_backend_contract.py.  Skipped without
CUDA (marker ``gpu``)."""
import os

import pytest
import torch

from avstfp_fast import prompted_attention_qkv
from avstfp_fast.testing import check_vs_reference, skip_unless_supported

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _triton_ready():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: these tests need the compiled kernels")
    q = torch.randn(1, 4, 64, device=DEV, dtype=torch.float16)
    skip_unless_supported("triton", q, q, q)


def _check(fn, inputs, dtype, what):
    check_vs_reference(fn, inputs, dtype, "triton", what)


def _qkv(B, M, N, H, d, dtype):
    return torch.randn(B, M, N, 3, H, d, device=DEV, dtype=dtype)


def _p(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=dtype)


# --------------------------------------------------------------------------- backward paths
@pytest.mark.parametrize("stage", ["temporal", "spatial", "fusion"])
@pytest.mark.parametrize("path", ["seq", "fa2"])
def test_stage_backward_paths(monkeypatch, stage, path):
    """Both backward paths at the ViT-B/16 stage layouts (batch 2, bf16): the sequence-
    owning one (with the temporal stage's direct prompt gradients: DIRECT_MIN_PROGRAMS
    lowered so that batch 2 qualifies) and the key-block-parallel fa2 one."""
    from avstfp_fast.ops import triton_backend as TB
    monkeypatch.setenv("AVSTFP_TRITON_BWD", path)
    monkeypatch.setattr(TB, "DIRECT_MIN_PROGRAMS", 1)
    TB._PLANS.clear()
    dtype = torch.bfloat16
    qkv = _qkv(2, 10, 246, 12, 64, dtype)
    if stage == "temporal":
        ps, segs, seq_dim = [_p(246, 12, 2, 64, dtype=dtype)] * 2, None, 1
    elif stage == "spatial":
        ps, segs, seq_dim = [_p(12, 10, 64, dtype=dtype) for _ in range(4)], (49, 197), 2
    else:
        ps, segs, seq_dim = [_p(12, 2, 64, dtype=dtype)] * 2, None, 2
    ps = [t.clone() for t in ps]

    def fn(x, *rest):
        *ps, backend = rest
        n = len(ps) // 2
        pk, pv = (list(ps[:n]), list(ps[n:])) if segs else (ps[0], ps[1])
        return prompted_attention_qkv(x, pk, pv, qkv_dim=3, seq_dim=seq_dim, segments=segs,
                                      backend=backend)
    _check(fn, [qkv, *ps], dtype, f"{stage} backward {path}")
    TB._PLANS.clear()
