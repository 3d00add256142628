"""CUDA backend on a GPU, what only a GPU shows: compute-sanitizer (memcheck, racecheck,
synccheck).  The op's contract cases (stage shapes, odd lengths, layouts, prompt
broadcasts, segments, batch products above 65535, determinism, torch.compile) run for
every backend in tests/test_backend_contract.py.  Skipped without CUDA (conftest: marker
``gpu``)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from avstfp_fast.testing import skip_unless_supported

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _cuda_backend_ready():
    # (without CUDA the conftest skips every test marked gpu before this runs)
    q = torch.randn(1, 4, 64, device=DEV, dtype=torch.float16)
    skip_unless_supported("cuda", q, q, q)
    from avstfp_fast.ops import cuda_backend
    cuda_backend.load()     # JIT build (minutes) happens here, once


# --------------------------------------------------------------------------- memcheck
_MEMCHECK = r"""
import torch
from avstfp_fast import prompted_attention
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    # packed and 64-row tiles; a zero-query segment with prompts (its dK/dV program once
    # left cp.async copies pending at exit); 1-token segments
    for L, P, segs in ((10, 2, None), (37, 3, None), (30, 2, (13, 17)), (10, 2, (0, 10)),
                       (40, 2, (0, 40)), (12, 2, (1, 11))):
        q = torch.randn(2, 3, L, 64, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(2, 3, L, 3, 64, device="cuda", dtype=dtype)[..., 1, :].requires_grad_(True)
        v = torch.randn(2, 3, L, 64, device="cuda", dtype=dtype, requires_grad=True)
        if segs is None:
            pk = torch.randn(3, P, 64, device="cuda", dtype=dtype, requires_grad=True)
            pv = torch.randn(3, P, 64, device="cuda", dtype=dtype, requires_grad=True)
        else:
            pk = [torch.randn(3, P, 64, device="cuda", dtype=dtype, requires_grad=True), None]
            pv = [torch.randn(3, P, 64, device="cuda", dtype=dtype, requires_grad=True), None]
        out = prompted_attention(q, k, v, pk, pv, segments=segs, backend="cuda")
        out.float().sum().backward()
    # Lq = 0 with keys and prompts
    q = torch.randn(2, 3, 0, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 3, 5, 64, device="cuda", dtype=dtype, requires_grad=True)
    pk = torch.randn(3, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    out = prompted_attention(q, k, k, pk, pk, backend="cuda")
    out.float().sum().backward()
torch.cuda.synchronize()
print("MEMCHECK-DONE")
"""


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer(tmp_path, tool):
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cs = shutil.which("compute-sanitizer") or os.path.join(home, "bin", "compute-sanitizer")
    if not os.path.exists(cs):
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "memcheck_case.py"
    script.write_text(_MEMCHECK)
    r = subprocess.run([cs, "--tool", tool, "--error-exitcode", "3",
                        sys.executable, str(script)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "MEMCHECK-DONE" in r.stdout, \
        f"{tool} failed (rc={r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "ERROR SUMMARY: 0 errors" in r.stdout + r.stderr
