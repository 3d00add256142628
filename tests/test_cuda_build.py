"""CUDA backend, CPU side: the kernels compile (nvcc, sm_80 + sm_90a), build settings,
and the backend's refusals (why_not) with clear reasons.  No GPU needed."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from avstfp_fast import prompted_attention
from avstfp_fast.ops import get_backend, make_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "compile_cuda.sh")


def _load_build():
    spec = importlib.util.spec_from_file_location("_avstfp_build_t",
                                                  os.path.join(ROOT, "avstfp_fast", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    p = os.path.join(home, "bin", "nvcc")
    return p if os.path.exists(p) else shutil.which("nvcc")


# --------------------------------------------------------------------------- compile
def test_kernels_do_not_include_torch():
    for name in os.listdir(os.path.join(ROOT, "csrc")):
        if name.endswith((".cu", ".cuh", ".h")):
            with open(os.path.join(ROOT, "csrc", name)) as f:
                text = f.read()
            for bad in ("<torch/", "<ATen/", "<c10/", '"torch/', '"ATen/'):
                assert bad not in text, f"csrc/{name} includes a torch header ({bad})"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
def test_cu_files_compile_for_sm80_and_sm90a(tmp_path):
    env = dict(os.environ, NVCC=_nvcc(), JOBS=os.environ.get("JOBS", "2"))
    r = subprocess.run(["bash", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"nvcc failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert "all CUDA sources compiled" in r.stdout
    cus = [f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".cu")]
    for f in cus:
        obj = tmp_path / (f[:-3] + ".o")
        assert obj.exists() and obj.stat().st_size > 0, f"no object for {f}"


# --------------------------------------------------------------------------- _build.py
def test_default_arch_flags(monkeypatch):
    monkeypatch.delenv("AVSTFP_CUDA_ARCHS", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    b = _load_build()
    flags = " ".join(b.arch_flags())
    assert "arch=compute_80,code=sm_80" in flags
    assert "arch=compute_90a,code=sm_90a" in flags
    assert "-O3" in b.nvcc_flags()


def test_arch_env_overrides(monkeypatch):
    b = _load_build()
    monkeypatch.setenv("AVSTFP_CUDA_ARCHS", "86;90a")
    assert b.arch_flags() == ["-gencode", "arch=compute_86,code=sm_86",
                              "-gencode", "arch=compute_90a,code=sm_90a"]
    monkeypatch.delenv("AVSTFP_CUDA_ARCHS")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    flags = b.arch_flags()
    assert "arch=compute_80,code=sm_80" in flags
    assert "arch=compute_90,code=sm_90" in flags and "arch=compute_90,code=compute_90" in flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    with pytest.raises(ValueError, match="compute capability >= 8.0"):
        b.arch_flags()


def test_sources_and_extension_spec(monkeypatch):
    monkeypatch.delenv("AVSTFP_CUDA_ARCHS", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    b = _load_build()
    src = b.sources()
    assert "csrc/binding.cpp" in src
    assert {s for s in src if s.endswith(".cu")} == {
        "csrc/" + f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".cu")}
    exts, cmdclass = b.cuda_extension()
    assert exts[0].name == "avstfp_fast._C"
    assert "build_ext" in cmdclass
    nv = exts[0].extra_compile_args["nvcc"]
    assert "arch=compute_80,code=sm_80" in nv and "arch=compute_90a,code=sm_90a" in nv


# --------------------------------------------------------------------------- why_not
def _problem(dtype=torch.float16, E=64, Ev=None, segments=None, batch=(2, 3), L=10, P=2):
    Ev = Ev or E
    q = torch.randn(*batch, L, E).to(dtype)
    k = torch.randn(*batch, L, E).to(dtype)
    v = torch.randn(*batch, L, Ev).to(dtype)
    if segments is None:
        pk, pv = torch.randn(batch[-1], P, E).to(dtype), torch.randn(batch[-1], P, Ev).to(dtype)
    else:
        pk = [torch.randn(P, E).to(dtype) for _ in segments]
        pv = [torch.randn(P, Ev).to(dtype) for _ in segments]
    return make_problem(q, k, v, pk, pv, segments=segments)


def test_registered():
    assert get_backend("cuda").name == "cuda"
    assert get_backend("cuda").kind == "kernel"


def test_why_not_cpu_tensors():
    r = get_backend("cuda").why_not(_problem())
    assert r is not None and "device cpu" in r and "CUDA" in r


@pytest.mark.parametrize("kw,words", [
    (dict(dtype=torch.float64), ["dtype torch.float64", "float16"]),
    (dict(E=48), ["head dim 48", "(32, 64, 128)"]),
    (dict(E=64, Ev=32), ["value dim 32", "head dim 64"]),
    (dict(segments=(2, 2, 2, 2, 2), L=10), ["at most 4 segments"]),
    (dict(batch=(2, 2, 2, 2, 2)), ["at most 4 batch dims"]),
])
def test_why_not_reasons(kw, words):
    r = get_backend("cuda").why_not(_problem(**kw))
    assert r is not None
    for w in words:
        assert w in r, r


def test_why_not_strided_last_dim():
    q = torch.randn(2, 10, 64, 2, dtype=torch.float16)[..., 0]
    k = v = torch.randn(2, 10, 64, dtype=torch.float16)
    r = get_backend("cuda").why_not(make_problem(q, k, v))
    assert r is not None and "q: last-dim stride must be 1" in r


def test_named_backend_on_cpu_raises_with_reason():
    q = k = v = torch.randn(2, 10, 64)
    with pytest.raises(ValueError, match="backend='cuda' cannot run this input: .*CUDA tensors"):
        prompted_attention(q, k, v, backend="cuda")


def test_extension_missing_and_no_nvcc(monkeypatch):
    from avstfp_fast.ops import cuda_backend as cb
    monkeypatch.setattr(cb, "_LOADED", False)
    monkeypatch.setattr(cb, "_LOAD_ERROR", None)
    monkeypatch.setattr(cb, "_installed", lambda: False)
    monkeypatch.setattr(cb._build, "nvcc_path", lambda: None)
    r = cb.extension_status()
    assert r is not None and "not built" in r and "nvcc" in r
    with pytest.raises(ImportError, match="nvcc"):
        cb.load()
    monkeypatch.setattr(cb, "_LOAD_ERROR", None)


def test_extension_no_jit(monkeypatch):
    from avstfp_fast.ops import cuda_backend as cb
    monkeypatch.setattr(cb, "_LOADED", False)
    monkeypatch.setattr(cb, "_LOAD_ERROR", None)
    monkeypatch.setattr(cb, "_installed", lambda: False)
    monkeypatch.setenv("AVSTFP_NO_JIT", "1")
    r = cb.extension_status()
    assert r is not None and "AVSTFP_NO_JIT=1" in r


# --------------------------------------------------------------------------- autotable
def test_make_autotable(tmp_path):
    recs = [
        {"case": "t1", "backend": "cuda", "stage": "temporal", "median_s": 1e-3},
        {"case": "t1", "backend": "triton", "stage": "temporal", "median_s": 2e-3},
        {"case": "s1", "backend": "cuda", "stage": "spatial", "median_s": 3e-3},
        {"case": "s1", "backend": "triton", "stage": "spatial", "median_s": 2e-3},
        {"case": "f1", "backend": "cuda", "stage": "fusion", "median_s": 3e-3},
        {"case": "f1", "backend": "torch", "stage": "fusion", "median_s": 1e-3},
    ]
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(recs))
    out = tmp_path / "autotable.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_autotable.py"),
                        str(src), "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    assert table["order"] == {"short": ["cuda", "triton"], "long": ["triton", "cuda"]}
    assert table["evidence"]["long"]["cases"] == 1     # f1 has no triton time: not counted
