"""Host path of one Triton forward: the Python work between the op call and the driver
launch (argument building, batch-dim merging, tile choice, grid), with the kernel launch
replaced by a no-op, so it runs on any CPU.  Target: <= 20 µs per forward on the 2-core
CI-class machine (a benchmark target, not a timed test).

Cases: the temporal, spatial and fusion stage calls of ViT-B/16 at batch 8 (bf16, CPU
tensors of uninitialised memory; nothing is computed), through the backend's ``forward``
(eager: the launcher directly) and through the ``avstfp_triton::attn_fwd`` custom op
(what compiled graphs call)."""
from __future__ import annotations

import pytest
import torch

import geometry
from static_sm90 import stage_problem

try:
    from avstfp_fast.ops import triton_backend as TB
    TB._kernels()
except Exception as e:          # pragma: no cover - triton missing
    pytest.skip(f"triton backend unavailable: {e}", allow_module_level=True)


class _NoLaunch:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def no_launch(monkeypatch):
    K = TB._kernels()
    import triton
    for name in dir(K):
        fn = getattr(K, name)
        if isinstance(fn, triton.runtime.jit.JITFunction) and not name.startswith("_"):
            monkeypatch.setattr(K, name, _NoLaunch(fn))


@pytest.mark.parametrize("via", ["eager", "custom_op"])
@pytest.mark.parametrize("stage", geometry.STAGES)
def test_triton_forward_host_path(benchmark, no_launch, stage, via):
    """``eager``: what an eager call runs (the launcher directly); ``custom_op``: the
    ``avstfp_triton::attn_fwd`` custom op around it, which torch.compile graphs call."""
    p, _, _ = stage_problem("B16", stage, "bf16", 64, batch=8)
    from avstfp_fast.ops.contract import empty_in_stride_order
    out = empty_in_stride_order(p.q.shape, p.q)
    be = TB.TritonBackend()
    be.forward(p, out)                              # warm the caches
    benchmark.extra_info.update(kind="host", stage=stage, arch="B16", batch=8, via=via,
                                target_s=20e-6 if via == "eager" else None)
    if via == "eager":
        benchmark(be.forward, p, out)
    else:
        args = (p.q, p.k, p.v, list(p.prompt_k), list(p.prompt_v), list(p.q_segments),
                list(p.k_segments), p.scale, out)
        benchmark(torch.ops.avstfp_triton.attn_fwd, *args)
