"""CUDA backend, CPU side: the kernels compile (nvcc, sm_80 + sm_90a), build settings,
and the backend's refusals (why_not) with clear reasons.  No GPU needed."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from avstfp_fast import prompted_attention
from avstfp_fast.ops import get_backend, make_problem
from avstfp_fast.ops.backends import KernelBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.fixture(scope="module")
def cuda_objs():
    """.ci/compile_cuda.sh output (objects + ptxas -v logs) for the current sources,
    compiled once and shared with bench/static_sm90.py (see cached_objects)."""
    if _nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    out, r = _static_module().cached_objects()
    return pathlib.Path(out), r


def test_cu_files_compile_for_sm80_and_sm90a(cuda_objs):
    out, r = cuda_objs
    assert r.returncode == 0, f"nvcc failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert "all CUDA sources compiled" in r.stdout
    cus = [f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".cu")]
    for f in cus:
        obj = out / (f[:-3] + ".o")
        assert obj.exists() and obj.stat().st_size > 0, f"no object for {f}"


def _static_module():
    spec = importlib.util.spec_from_file_location(
        "_avstfp_static_cuda", os.path.join(ROOT, "bench", "static_sm90_cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_static_contract_sm90(cuda_objs, emu):
    """The compile-time performance contract (bench/static_sm90_cuda.py) on the objects
    compiled above: every kernel instance found, cp.async (LDGSTS) in every kernel that
    streams tiles, no spills, >= 4 warps per CTA, 16-byte stores of the outputs, no
    floating-point atomics."""
    out, r = cuda_objs
    assert r.returncode == 0, "compile failed (see test_cu_files_compile_for_sm80_and_sm90a)"
    st = _static_module()
    rows = st.cuda_rows(objdir=str(out), emu_lib=emu._name)
    assert len(rows) >= 9 * 4, [x["kernel"] for x in rows]
    assert st.cuda_failures(rows) == []
    for x in rows:
        what = f"{x['kernel']}<{x['config']}>"
        if x["kernel"] in ("fwd_kernel", "dq_kernel"):
            assert 128 in x["store_bits"], f"{what}: no 16-byte stores"
        assert x["cp_async_16B"], f"{what}: cp.async copies narrower than 16 bytes"
        if not x["config"].startswith("float"):
            assert x["hmma"] > 0, f"{what}: no tensor-core instructions (HMMA)"
        # the prompt gradients are summed in a fixed order: the one atomic is the ticket
        # counter's integer add, never a floating-point one on the data
        assert not any("F32" in op or "F16" in op for op in x["atomics"]), (what, x["atomics"])
    # FlashAttention-2's structure in every fp16/bf16 kernel: ldmatrix operand loads, no
    # fp32 score or accumulator tile in shared memory (the kernels' own layout), 16-byte
    # cp.async
    assert st.fa2_gaps(rows) == []
    for x in rows:
        if not x["config"].startswith("float"):
            assert x["acc_smem_bytes"] == 0, f"{x['kernel']}<{x['config']}>: fp32 accumulators in smem"


# The extension as a GPU user gets it: cuda_backend.load() JIT-builds csrc/*.cu and
# binding.cpp with torch's cpp_extension, links against libcudart and loads it (nothing
# launches here: no GPU).  Run in a child process so that the real library's ops never
# meet the tracing-only definitions other tests and bench/ledger.py make.
_EXT_CHILD = r"""
import json, os, sys, torch
sys.path.insert(0, os.path.join(os.environ["AVSTFP_ROOT"], "bench"))
from avstfp_fast.ops import cuda_backend as cb
cb._installed = lambda: False          # the JIT path, even where _C was installed
cb.load()
ops = torch.ops.avstfp_cuda
maps = open("/proc/self/maps").read()          # the library this process mapped
res = {"so": sorted({ln.split()[-1] for ln in maps.splitlines() if ln.endswith(".so")
                     and "avstfp_fast_C" in ln}),
       "schemas": {n: [str(getattr(ops, n).default._schema),
                       str(torch._C.parse_schema("avstfp_cuda::" + s))]
                   for n, s in cb.OP_SCHEMAS.items()},
       "smem": {f"{d},{h},{s}": ops.smem_bytes(d, h, bool(s))
                for d in (0, 1, 2) for h in (32, 48, 64, 128) for s in (0, 1)}}
q = torch.randn(2, 8, 64)
plan = list(range(8))
try:
    ops.fwd(q, q, q, [], [], plan, torch.empty_like(q), torch.empty(2, 8))
    res["cpu_call"] = "ran"
except Exception as e:
    res["cpu_call"] = f"{type(e).__name__}: {e}"
# the backend's real calls, traced through the library's own schemas (fake CUDA tensors)
import ledger
rows = ledger.run_case("B16", "spatial", backend="cuda")
res["ledger"] = [[r.direction, r.kernel_launches, r.failures()] for r in rows]
print("RESULT " + json.dumps(res))
"""


@pytest.mark.skipif(shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None,
                    reason="ninja is needed to build the extension")
def test_extension_builds_links_and_registers(tmp_path, emu):
    """csrc/ builds and links into the torch extension (binding.cpp included, ~40 s on 2
    cores); its registered schemas are the ones the Python side traces with; its
    shared-memory figures equal the emulated source's; a CPU call is refused by the
    dispatcher, not crashed on; the backend's real stage calls type-check against it."""
    if _nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    # one arch (sm_90a) keeps it to ~40 s; both default archs compile in the static
    # contract's objects above, and linking does not depend on the arch
    env = dict(os.environ, AVSTFP_ROOT=ROOT, AVSTFP_BUILD_DIR=str(tmp_path),
               MAX_JOBS=str(os.cpu_count() or 2), AVSTFP_CUDA_ARCHS="90a")
    env.pop("TRITON_INTERPRET", None)
    env.pop("AVSTFP_NO_JIT", None)
    r = subprocess.run([sys.executable, "-c", _EXT_CHILD], capture_output=True, text=True,
                       timeout=900, env=env, cwd=ROOT)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    res = json.loads(line[0][len("RESULT "):])
    assert len(res["so"]) == 1 and res["so"][0].startswith(str(tmp_path)), res["so"]
    for name, (built, traced) in res["schemas"].items():
        assert built == traced, f"{name}: binding.cpp registers {built}, Python traces {traced}"
    emu.emu_max_smem_bytes.argtypes = [C.c_int, C.c_int, C.c_int]
    for key, got in res["smem"].items():
        d, h, s = (int(x) for x in key.split(","))
        assert got == emu.emu_max_smem_bytes(d, h, s), key
        assert (got == -1) == (h == 48), (key, got)
        assert got <= 227 * 1024, (key, got)
    assert "CPU" in res["cpu_call"] and "NotImplementedError" in res["cpu_call"], res["cpu_call"]
    assert [d for d, _, _ in res["ledger"]] == ["fwd", "bwd"]
    assert all(n >= 1 and not bad for _, n, bad in res["ledger"]), res["ledger"]


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
    assert isinstance(get_backend("cuda"), KernelBackend)


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


# --------------------------------------------------------------------------- CPU emulation
# The kernels' own code (csrc/attn_kernels.cuh: tiling, strided addressing, masking, online
# softmax, backward, launch logic) compiled with g++ against csrc/cpu_emulation.h (fibers
# for threads, WMMA emulated) and driven through ctypes exactly as the binding drives them:
# a launch plan (avstfp_fast/ops/layout.py) read by attn_params.h's unpack_params, plus the
# data pointers.  Checks out, lse, dq/dk/dv and prompt grads (atomic and deterministic)
# against the float64 reference, and that nothing outside the output views is written.
import ctypes as C  # noqa: E402
import math  # noqa: E402

from avstfp_fast.testing import TOL, rel_err, strided  # noqa: E402

from avstfp_fast.ops import layout  # noqa: E402


def _build_emu(d, defines=()):
    """Compile csrc/cpu_emulation.h (the kernels' own source on the CPU) into d; load it."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CPU emulation")
    (d / "emu.cpp").write_text('#include "cpu_emulation.h"\n')
    r = subprocess.run([cxx, "-std=c++17", "-O1", "-fPIC", "-shared", *[f"-D{x}" for x in defines],
                        "-I", os.path.join(ROOT, "csrc"), str(d / "emu.cpp"),
                        "-o", str(d / "libemu.so")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = C.CDLL(str(d / "libemu.so"))
    lib.emu_error.restype = C.c_char_p
    for f in (lib.emu_forward, lib.emu_backward):
        f.argtypes = [C.POINTER(C.c_int64), C.c_int64, C.POINTER(C.c_void_p)]
    # the plan layout.py writes is the one attn_params.h reads
    assert lib.emu_plan_ints() == layout.PLAN_INTS
    assert lib.emu_num_pointers() == len(layout.POINTERS)
    return lib


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _build_emu(tmp_path_factory.mktemp("emu"))


def _nan_view(shape, dtype, gaps):
    """A NaN-filled buffer and a view of `shape` into it: dense (gaps False), with unused
    gaps between rows and a 16-byte aligned start (True), or starting one element in, so
    that 16-byte vector stores are not allowed ("odd")."""
    if not gaps:
        big = torch.full(shape, float("nan"), dtype=dtype)
        return big, big
    off = 1 if gaps == "odd" else 8
    big = torch.full((*shape[:-2], 2 * shape[-2] + 1, shape[-1] + 8), float("nan"), dtype=dtype)
    return big, big[..., 1::2, off:off + shape[-1]]


def _untouched(big, view):
    mask = torch.ones_like(big, dtype=torch.bool)
    mask.as_strided(view.shape, view.stride(), view.storage_offset() - big.storage_offset()).fill_(False)
    return bool(torch.isnan(big[mask].float()).all())


def _reference(q, k, v, pks, pvs, segs, scale, dout):
    from avstfp_fast import prompted_attention
    lv = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    pl = [None if t is None else t.detach().double().requires_grad_(True) for t in pks]
    vl = [None if t is None else t.detach().double().requires_grad_(True) for t in pvs]
    if segs:
        o = prompted_attention(*lv, pl, vl, scale=scale, segments=segs, backend="reference")
    else:
        o = prompted_attention(*lv, pl[0], vl[0], scale=scale, backend="reference")
    o.backward(dout.double())
    # row log-sum-exp, segment by segment
    lses, a = [], 0
    for s, n in enumerate(segs or (q.shape[-2],)):
        qs = lv[0].detach()[..., a:a + n, :]
        ks = lv[1].detach()[..., a:a + n, :] if segs else lv[1].detach()
        sc = qs @ ks.transpose(-1, -2)
        if pl[s] is not None:
            pk = pl[s].detach().expand(*q.shape[:-2], *pl[s].shape[-2:])
            sc = torch.cat([sc, qs @ pk.transpose(-1, -2)], -1)
        lses.append(torch.logsumexp(sc * scale, -1))
        a += n
    return (o.detach(), torch.cat(lses, -1), [t.grad for t in lv],
            [None if t is None else t.grad for t in pl], [None if t is None else t.grad for t in vl])


class EmulationError(AssertionError):
    pass


def _emulated(lib, q, k, v, pks, pvs, segs, nan_scratch, gaps):
    """Forward then backward of the kernels under the emulation, driven exactly as the
    binding drives them: a layout.LaunchPlan plus the data pointers.  nan_scratch: the fp32
    scratch (prompt-gradient partials, delta) starts as NaN (every element must be written
    before it is read) or 0.  The ticket counters must be back at 0 after the backward."""
    dtype, E = q.dtype, q.shape[-1]
    scale = E ** -0.5
    batch = tuple(q.shape[:-2])
    Lq = q.shape[-2]
    qs = tuple(segs or (Lq,))
    ks = tuple(segs or (k.shape[-2],))
    pks = [None if t is None or t.shape[-2] == 0 else t for t in pks]
    pvs = [None if t is None or t.shape[-2] == 0 else t for t in pvs]
    big_o, out = _nan_view(q.shape, dtype, gaps)
    lse = torch.full(batch + (Lq,), float("nan"))
    ptrs = {"q": q, "k": k, "v": v, "o": out, "lse": lse}
    for s in range(len(qs)):
        ptrs[f"pk{s}"], ptrs[f"pv{s}"] = pks[s], pvs[s]
    plan = layout.LaunchPlan(q, k, v, pks, pvs, qs, ks, scale, out=out)
    _launch_checked(lib, lib.emu_forward, plan, ptrs)

    dout = torch.randn(q.shape, dtype=dtype)
    bigs, grads = [], []
    for t in (q, k, v):
        bg, g = _nan_view(t.shape, dtype, gaps)
        bigs.append(bg)
        grads.append(g)
    plan = layout.LaunchPlan(q, k, v, pks, pvs, qs, ks, scale, out=out, dout=dout,
                             dq=grads[0], dk=grads[1], dv=grads[2], backward=True)
    ptrs.update(dout=dout, dq=grads[0], dk=grads[1], dv=grads[2])
    bufs = []
    for s, shp in enumerate(plan.grad_shapes):
        if shp is None:
            bufs.append(None)
            continue
        # every element is written, finished, in the prompts' dtype (NaN shows a missed one)
        b = torch.full(shp, float("nan"), dtype=dtype)
        ptrs[f"dpk{s}"], ptrs[f"dpv{s}"] = b[0], b[1]
        bufs.append(b)
    tickets = _scratch_ptrs(plan.ints(), ptrs, nan_scratch)
    _launch_checked(lib, lib.emu_backward, plan, ptrs)
    assert not tickets.any(), "a ticket counter was left non-zero"
    gp = [None if b is None else layout.finish_prompt_grads(b, pks[s], pvs[s])
          for s, b in enumerate(bufs)]
    gp = [None if g is None else (g[0].float(), g[1].float()) for g in gp]
    return scale, out, lse, dout, grads, gp, list(zip(bigs, grads)) + [(big_o, out)]


def _scratch_ptrs(ints, ptrs, nan=True):
    """The backend's scratch for a backward plan, as csrc/binding.cpp splits it: fp32
    partials then delta (NaN-filled: the kernels write before they read), and zeroed
    ticket counters (returned)."""
    from avstfp_fast.ops.cuda_backend import launches
    la = launches("bwd", ints)
    scratch = torch.full((la.scratch_floats,), float("nan") if nan else 0.0)
    nparts = la.scratch_floats - (ints[1] * ints[6] if "dq_kernel" in la.kernels
                                  or "dkv_kernel" in la.kernels else 0)
    ptrs["part"] = scratch[:nparts]
    ptrs["delta"] = scratch[nparts:] if la.scratch_floats > nparts else None
    ptrs["tickets"] = tickets = torch.zeros(max(la.tickets, 1), dtype=torch.int32)
    ptrs["_keep"] = scratch
    return tickets


def _launch_checked(lib, fn, plan, ptrs):
    _launch_ints(lib, fn, plan.ints(), ptrs)


def _case(name, dtype):
    t = lambda *s: torch.randn(*s, dtype=dtype)   # noqa: E731
    if name == "temporal_per_position":       # (B, M, N, 3, H, d), sequence over M
        qkv = t(1, 10, 3, 3, 2, 32)
        q, k, v = (qkv.select(3, i).movedim(1, -2) for i in range(3))
        return q, k, v, [t(3, 2, 2, 32)], [t(3, 2, 2, 32)], None
    if name == "temporal_batch2":             # as above, batch 2: seq_reps 2 (16-bit)
        qkv = t(2, 10, 3, 3, 2, 32)
        q, k, v = (qkv.select(3, i).movedim(1, -2) for i in range(3))
        return q, k, v, [t(3, 2, 2, 32)], [t(3, 2, 2, 32)], None
    if name == "spatial_segments":           # joint buffer, sequence over N, (5, 20)
        qkv = t(1, 2, 25, 3, 2, 64)
        q, k, v = (qkv.select(3, i).movedim(2, -2) for i in range(3))
        return q, k, v, [t(2, 3, 64), t(2, 4, 64)], [t(2, 3, 64), t(2, 4, 64)], (5, 20)
    if name == "long_d128":                  # two query tiles, stride-0 prompts
        return t(2, 70, 128), t(2, 70, 128), t(2, 70, 128), [t(2, 128)], [t(2, 128)], None
    if name == "sliced_odd":                 # unaligned rows: scalar loads
        return (strided((2, 17, 32), dtype, "sliced"), strided((2, 33, 32), dtype, "sliced"),
                strided((2, 33, 32), dtype, "sliced"), [None], [None], None)
    if name == "prompts_only":               # Lk = 0
        return (strided((3, 2, 5, 64), dtype, "permuted"), t(3, 2, 0, 64), t(3, 2, 0, 64),
                [t(3, 1, 4, 64)], [t(3, 1, 4, 64)], None)
    if name == "four_segments":              # a zero-length segment, one without prompts
        return (t(2, 22, 32), t(2, 22, 32), t(2, 22, 32),
                [t(2, 32), t(1, 32), None, t(2, 5, 32)], [t(2, 32), t(1, 32), None, t(2, 5, 32)],
                (1, 0, 18, 3))
    if name == "short_d128":                 # 16-row tiles, head dim 128
        return t(2, 3, 9, 128), t(2, 3, 11, 128), t(2, 3, 11, 128), [t(3, 2, 128)], [t(3, 2, 128)], None
    if name == "four_batch_dims":            # 4 batch dims, permuted, prompt broadcast in one
        return (strided((2, 3, 2, 2, 12, 32), dtype, "permuted"),
                strided((2, 3, 2, 2, 7, 32), dtype, "permuted"),
                strided((2, 3, 2, 2, 7, 32), dtype, "permuted"),
                [t(3, 1, 2, 4, 32)], [t(3, 1, 2, 4, 32)], None)
    if name == "three_segments_short":      # packed 16-row tiles, 3 segments, 7 sequences
        return (t(7, 16, 64), t(7, 16, 64), t(7, 16, 64),
                [t(2, 64), None, t(7, 3, 64)], [t(2, 64), None, t(7, 3, 64)], (5, 7, 4))
    if name == "prompts_span_tiles":         # 16 keys + 20 prompts: prompt rows from 16 on
        return (t(2, 16, 32), t(2, 16, 32), t(2, 16, 32), [t(2, 20, 32)], [t(2, 20, 32)], None)
    if name == "shared_span_tiles":          # one prompt row set shared by 3 x 2 sequences,
        # its 10 rows split over two 64-row key tiles (60 keys + 4, then 6): 12 partials
        return (t(3, 2, 60, 32), t(3, 2, 60, 32), t(3, 2, 60, 32), [t(10, 32)], [t(10, 32)],
                None)
    if name == "shared_by_many_short":       # temporal-like, prompts shared by 70 sequences:
        # more than SEQ_REPS_MAX, so one warp per sequence and the ticket reduction
        return (t(70, 10, 32), t(70, 10, 32), t(70, 10, 32), [t(2, 32)], [t(2, 32)], None)
    if name == "many_tiles_d32":             # more K/V and Q/dO tiles than pipeline stages
        return (t(1, 2, 150, 32), t(1, 2, 150, 32), t(1, 2, 150, 32),
                [t(2, 3, 32)], [t(2, 3, 32)], None)
    raise ValueError(name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,nan_scratch,gaps", [
    ("temporal_per_position", False, False), ("temporal_per_position", True, True),
    ("spatial_segments", False, True), ("spatial_segments", True, False),
    ("long_d128", False, False), ("sliced_odd", False, "odd"),
    ("prompts_only", True, False), ("four_segments", False, False),
    ("short_d128", True, True), ("four_batch_dims", False, True),
    ("three_segments_short", False, "odd"), ("many_tiles_d32", True, False),
    ("prompts_span_tiles", True, False), ("temporal_batch2", False, True),
    ("temporal_batch2", True, False), ("shared_span_tiles", True, False),
    ("shared_by_many_short", True, False)])
def test_emulated_kernels(emu, dtype, name, nan_scratch, gaps):
    q, k, v, pks, pvs, segs = _case(name, dtype)
    _check_emulated(emu, q, k, v, pks, pvs, segs, nan_scratch, gaps, name)


def _check_emulated(emu, q, k, v, pks, pvs, segs, nan_scratch, gaps, name):
    """Forward and backward under the emulation (any emulation error, e.g. a cp.async
    still pending when a CTA ends, raises EmulationError) against the float64 reference."""
    dtype = q.dtype
    scale, out, lse, dout, (dq, dk, dv), gp, written = _emulated(
        emu, q, k, v, pks, pvs, segs, nan_scratch, gaps)
    ro, rlse, (gq, gk, gv), gpk, gpv = _reference(q, k, v, pks, pvs, segs, scale, dout)
    errs = {"out": rel_err(out, ro), "lse": rel_err(lse, rlse) if lse.numel() else 0.0,
            "dq": rel_err(dq, gq),
            "dk": rel_err(dk, gk) if k.numel() else 0.0,
            "dv": rel_err(dv, gv) if v.numel() else 0.0}
    for s, g in enumerate(gp):
        if g is not None:
            errs[f"dprompt_k[{s}]"] = rel_err(g[0].to(dtype), gpk[s])
            errs[f"dprompt_v[{s}]"] = rel_err(g[1].to(dtype), gpv[s])
    tol = TOL[dtype]
    bad = {n: e for n, e in errs.items() if not e <= (1e-5 if n == "lse" else tol)}
    assert not bad, f"{name} {dtype}: errors above tolerance {tol}: {bad}"
    for big, view in written:
        assert _untouched(big, view), f"{name}: a kernel wrote outside its output view"


def test_emulation_pending_copy_at_exit_is_fatal(emu):
    """A CTA that ends with a cp.async it never waited for fails its launch, whether the
    copy was never committed or committed and not waited for (on a GPU it would land in
    shared memory after the CTA exits, under the next CTA on the SM).  Every emulated
    launch of the suite goes through this check: _emulated raises on any launch error."""
    assert emu.emu_selftest_pending_copy(0) == 719
    assert b"never waited for" in emu.emu_error()
    assert emu.emu_selftest_pending_copy(1) == 719
    assert emu.emu_selftest_pending_copy(2) == 0


def _t(dtype, *shape):
    return torch.randn(*shape, dtype=dtype)


# Queries that own no tile: a zero-length segment whose prompts still make a key tile (its
# dK/dV program used to exit with the K/V copies pending), Lq = 0, 1-token segments; with
# and without prompts; packed 16-row tiles (every segment <= 16) and 64-row tiles.
_EMPTY_CASES = {
    "seg0_prompts": lambda t: (t(3, 2, 10, 32), t(3, 2, 10, 32), t(3, 2, 10, 32),
                               [t(2, 2, 32), t(2, 2, 32)], [t(2, 2, 32), t(2, 2, 32)], (0, 10)),
    "seg0_no_prompts": lambda t: (t(3, 2, 10, 32), t(3, 2, 10, 32), t(3, 2, 10, 32),
                                  [None, None], [None, None], (0, 10)),
    "seg0_prompt_only_there": lambda t: (t(2, 10, 64), t(2, 10, 64), t(2, 10, 64),
                                         [t(3, 64), None], [t(3, 64), None], (0, 10)),
    "seg0_long": lambda t: (t(2, 40, 32), t(2, 40, 32), t(2, 40, 32),
                            [t(2, 32), t(5, 32)], [t(2, 32), t(5, 32)], (0, 40)),
    "lq0_prompts": lambda t: (t(3, 2, 0, 32), t(3, 2, 5, 32), t(3, 2, 5, 32),
                              [t(2, 2, 32)], [t(2, 2, 32)], None),
    "lq0_no_prompts": lambda t: (t(2, 0, 64), t(2, 7, 64), t(2, 7, 64), [None], [None], None),
    "lq0_lk0_prompts": lambda t: (t(2, 0, 32), t(2, 0, 32), t(2, 0, 32),
                                  [t(3, 32)], [t(3, 32)], None),
    "one_token_segments": lambda t: (t(2, 2, 12, 32), t(2, 2, 12, 32), t(2, 2, 12, 32),
                                     [t(2, 1, 32), None, t(2, 3, 32), t(1, 32)],
                                     [t(2, 1, 32), None, t(2, 3, 32), t(1, 32)], (1, 1, 0, 10)),
    "one_query": lambda t: (t(2, 1, 64), t(2, 1, 64), t(2, 1, 64), [t(2, 64)], [t(2, 64)],
                            None),
    # MQA / GQA: k and v shared by the heads of a group through stride-0 batch dims
    "mqa_stride0": lambda t: (t(2, 4, 12, 32), t(2, 1, 12, 32).expand(2, 4, 12, 32),
                              t(2, 1, 12, 32).expand(2, 4, 12, 32),
                              [t(4, 2, 32)], [t(4, 2, 32)], None),
    "gqa_stride0_long": lambda t: (t(2, 2, 3, 40, 32), t(2, 2, 1, 40, 32).expand(2, 2, 3, 40, 32),
                                   t(2, 2, 1, 40, 32).expand(2, 2, 3, 40, 32),
                                   [t(2, 1, 2, 32), t(3, 32)], [t(2, 1, 2, 32), t(3, 32)],
                                   (0, 40)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(_EMPTY_CASES))
def test_emulated_empty_and_one_token(emu, dtype, name):
    q, k, v, pks, pvs, segs = _EMPTY_CASES[name](lambda *s: _t(dtype, *s))
    _check_emulated(emu, q, k, v, pks, pvs, segs, True, False, name)


def _draw_block_diagonal(gen, dtype):
    """A block-diagonal problem drawn the way xformers' BlockDiagonalMask tests draw one:
    1-4 segments of random lengths, 0 and 1 included, each with its own prompts (none,
    P = 0, shared, per head, per sample) and a random batch and head dim."""
    r = lambda n: int(torch.randint(n, (1,), generator=gen))   # noqa: E731
    nseg = 1 + r(4)
    segs = tuple([0, 1, 2 + r(14), 17 + r(30)][r(4)] for _ in range(nseg))
    if sum(segs) == 0:
        segs = segs[:-1] + (1,)
    batch = (1 + r(3), 1 + r(2))
    E = (32, 64)[r(2)]
    L = sum(segs)
    q, k, v = (_t(dtype, *batch, L, E) for _ in range(3))
    pks, pvs = [], []
    for _ in segs:
        kind = r(5)
        if kind == 0:
            pks.append(None)
            pvs.append(None)
            continue
        P = 0 if kind == 1 else 1 + r(5)
        lead = {1: (), 2: (), 3: batch[-1:], 4: batch}[kind]
        pks.append(_t(dtype, *lead, P, E))
        pvs.append(_t(dtype, *lead, P, E))
    return q, k, v, pks, pvs, segs, bool(r(2)), (False, True, "odd")[r(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("draw", range(8))
def test_emulated_block_diagonal_random(emu, dtype, draw):
    """Random block-diagonal segments (seeded from the test id and AVSTFP_TEST_SEED)."""
    gen = torch.Generator().manual_seed(torch.initial_seed() + draw)
    q, k, v, pks, pvs, segs, det, gaps = _draw_block_diagonal(gen, dtype)
    _check_emulated(emu, q, k, v, pks, pvs, segs, det, gaps,
                    f"segments {segs}, prompts {[None if t is None else tuple(t.shape) for t in pks]}, "
                    f"batch {tuple(q.shape[:-2])}, E {q.shape[-1]}, NaN scratch {det}, gaps {gaps}")


def _offsets_by_plan(plan, name, t, rows):
    """Storage offsets of every element of operand `name` as the kernels address it from
    the plan: flat sequence b -> row-major (b0..b3) over bsize, sum b_i * bstride_i +
    r * rstride + c."""
    st = plan.strides[name]
    idx = torch.arange(plan.nseq)
    off = torch.zeros(plan.nseq, dtype=torch.int64)
    for d in reversed(range(4)):
        off += (idx % plan.bsize[d]) * st[d]
        idx = idx // plan.bsize[d]
    E = t.shape[-1]
    return (t.storage_offset() + off[:, None, None] + torch.arange(rows)[None, :, None] * st[4]
            + torch.arange(E)[None, None, :])


def _true_offsets(t, batch):
    """Storage offsets of t broadcast to (*batch, rows, E), flattened to (nseq, rows, E)."""
    t = t.expand(*batch, *t.shape[-2:])
    base = torch.arange(t.untyped_storage().nbytes() // t.element_size())
    return base.as_strided(t.shape, t.stride(), t.storage_offset()).reshape(-1, *t.shape[-2:])


@pytest.mark.parametrize("layout_name", ["temporal", "spatial", "mqa", "four_dims", "size1",
                                         "sliced"])
def test_launch_plan_addresses_every_element(layout_name):
    """The plan (ops/layout.py) addresses exactly the elements of every operand, prompts
    and prompt-grad buffers included, for the views the model passes and those users pass."""
    t = torch.randn
    if layout_name in ("temporal", "spatial"):
        qkv = t(2, 10, 7, 3, 2, 32)
        sd = 1 if layout_name == "temporal" else 2
        q, k, v = (qkv.select(3, i).movedim(sd, -2) for i in range(3))
        pk = t(7, 2, 2, 32) if sd == 1 else t(2, 3, 32)
        pv = pk.clone()
    elif layout_name == "mqa":
        q = t(2, 4, 12, 64)
        k = v = t(2, 1, 12, 64).expand(2, 4, 12, 64)
        pk = pv = t(1, 32, 64)[:, :1].expand(4, 1, 64)
    elif layout_name == "four_dims":
        q = strided((2, 3, 2, 2, 12, 32), torch.float32, "permuted")
        k = v = strided((2, 3, 2, 2, 7, 32), torch.float32, "permuted")
        pk = pv = t(3, 1, 2, 4, 32)
    elif layout_name == "size1":
        q = k = v = t(1, 3, 1, 5, 32)
        pk = pv = t(3, 1, 1, 32)
    else:
        q = strided((3, 2, 9, 32), torch.float32, "sliced")
        k = v = strided((3, 2, 21, 32), torch.float32, "sliced")
        pk = pv = t(2, 4, 32)
    batch = tuple(q.shape[:-2])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    plan = layout.LaunchPlan(q, k, v, [pk], [pv], (q.shape[-2],), (k.shape[-2],), 0.1,
                             out=q, dout=q, dq=dq, dk=dk, dv=dv, backward=True)
    assert plan.nseq == math.prod(batch)
    for name, x in (("q", q), ("k", k), ("v", v), ("dq", dq), ("dk", dk), ("dv", dv),
                    ("pk0", pk), ("pv0", pv)):
        want = _true_offsets(x, batch)
        assert torch.equal(_offsets_by_plan(plan, name, x.expand(*batch, *x.shape[-2:]),
                                            x.shape[-2]), want), (layout_name, name)
    # the prompt grads: (2, *lead, P, E) in the prompts' shape, broadcast over the batch
    g = torch.zeros(plan.grad_shapes[0])
    assert plan.grad_shapes[0] == (2, *pk.shape)
    assert torch.equal(_offsets_by_plan(plan, "dpk0", g[0], g.shape[-2]), _true_offsets(g[0], batch))
    assert torch.equal(_offsets_by_plan(plan, "dpv0", g[1], g.shape[-2]), _true_offsets(g[1], batch))
    assert len(plan.ints()) == layout.PLAN_INTS


@pytest.mark.parametrize("what,edit,msg", [
    ("length", lambda a: a[:-1], "wrong length"),
    ("version", lambda a: [99] + a[1:], "wrong version"),
    ("nseq", lambda a: a[:1] + [a[1] + 1] + a[2:], "nseq"),
    ("prompt", "drop_prompt_ptr", "prompt pointers"),
])
def test_unpack_rejects_bad_plans(emu, what, edit, msg):
    """attn_params.h's unpack_params (shared by the binding and the emulation) refuses a
    plan that does not match its own layout or the pointers, with a message."""
    q = k = v = torch.randn(2, 5, 32)
    pk = pv = torch.randn(2, 32)
    plan = layout.LaunchPlan(q, k, v, [pk], [pv], (5,), (5,), 0.2, out=q)
    ints = plan.ints()
    ptrs = {"q": q, "k": k, "v": v, "o": torch.empty_like(q), "lse": torch.empty(2, 5),
            "pk0": pk, "pv0": pv}
    if edit == "drop_prompt_ptr":
        ptrs.pop("pv0")
    else:
        ints = edit(ints)
    with pytest.raises(EmulationError, match=msg):
        _launch_ints(emu, emu.emu_forward, ints, ptrs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,N", [(32, 16), (64, 16), (128, 16), (32, 32), (64, 32), (128, 32),
                                 (32, 64), (64, 64), (128, 64)])
def test_emulated_mma_fragments(emu, dtype, D, N):
    """warp_mma.cuh's ldmatrix / mma.sync products, emulated lane by lane from the PTX
    fragment layouts, equal plain matrix products for every (head dim, key tile) shape the
    forward uses: S = A B^T (A 16 x D, B the key tile N x D) and O = round(S) V."""
    a = torch.randn(16, D, dtype=dtype)
    b = torch.randn(N, D, dtype=dtype)
    v = torch.randn(N, D, dtype=dtype)
    s = torch.full((16, N), float("nan"))
    o = torch.full((16, D), float("nan"))
    emu.emu_mma_fragments.argtypes = [C.c_int, C.c_int, C.c_int] + [C.c_void_p] * 5
    rc = emu.emu_mma_fragments(int(dtype == torch.bfloat16), D, N, a.data_ptr(), b.data_ptr(),
                               v.data_ptr(), s.data_ptr(), o.data_ptr())
    assert rc == 0, emu.emu_error().decode()
    s_ref = a.double() @ b.double().T
    assert rel_err(s, s_ref) < 1e-6
    o_ref = s.to(dtype).double() @ v.double()   # P rounded to the input type, as the kernel
    assert rel_err(o, o_ref) < 1e-6


class _EmulatedOps:
    """torch.ops.avstfp_cuda with the kernels run by the emulation on CPU tensors: the
    pointer filling of csrc/binding.cpp (operand order of the plan; one (2, *lead, P, E)
    prompt-grad buffer per segment with prompts; scratch split into partials and delta; the
    ticket counters kept across calls) over the plan the backend computed."""

    def __init__(self, lib):
        self.lib = lib
        self.tickets = torch.zeros(1, dtype=torch.int32)

    def fwd(self, q, k, v, pks, pvs, plan, out, lse):
        ptrs = {"q": q, "k": k, "v": v, "o": out, "lse": lse}
        for s, (a, b) in enumerate(zip(pks, pvs)):
            ptrs[f"pk{s}"], ptrs[f"pv{s}"] = a, b
        if plan[1] > 0 and q.shape[-2] > 0:
            _launch_ints(self.lib, self.lib.emu_forward, plan, ptrs)

    def bwd(self, q, k, v, pks, pvs, plan, out, dout, lse, dq, dk, dv, dprompt, scratch):
        from avstfp_fast.ops.cuda_backend import launches
        la = launches("bwd", plan)
        assert scratch.numel() == la.scratch_floats
        if self.tickets.numel() < la.tickets:   # the binding's buffer: zeroed once, kept
            self.tickets = torch.zeros(la.tickets, dtype=torch.int32)
        tickets = self.tickets
        slots = plan[1] // plan[15] if plan[15] else plan[1]
        nparts = sum(2 * slots * plan[layout.PLAN_HEADER + 5 * s + 4] * plan[8]
                     for s in range(plan[7]))
        ptrs = {"q": q, "k": k, "v": v, "o": out, "dout": dout, "dq": dq, "dk": dk, "dv": dv,
                "lse": lse, "part": scratch,
                "delta": scratch[nparts:] if scratch.numel() >= nparts + plan[1] * plan[6]
                else None, "tickets": tickets}
        it = iter(dprompt)
        for s, (a, b) in enumerate(zip(pks, pvs)):
            ptrs[f"pk{s}"], ptrs[f"pv{s}"] = a, b
            if a is not None:
                g = next(it)
                ptrs[f"dpk{s}"], ptrs[f"dpv{s}"] = g[0], g[1]
        if plan[1] > 0:
            _launch_ints(self.lib, self.lib.emu_backward, plan, ptrs)


def _launch_ints(lib, fn, ints, ptrs):
    arr = (C.c_int64 * len(ints))(*ints)
    pv = (C.c_void_p * len(layout.POINTERS))()
    for i, name in enumerate(layout.POINTERS):
        t = ptrs.get(name)
        pv[i] = None if t is None else t.data_ptr()
    if fn(arr, len(ints), pv) != 0:
        raise EmulationError(lib.emu_error().decode())


@pytest.fixture
def emulated_backend(emu, monkeypatch):
    """The registered cuda backend (ops/cuda_backend.py: plan, buffers, prompt-grad
    protocol) on CPU tensors, its two torch ops replaced by the emulation."""
    from avstfp_fast.ops import cuda_backend as cb
    monkeypatch.setattr(cb, "load", lambda verbose=False: None)
    monkeypatch.setattr(torch.ops, "avstfp_cuda", _EmulatedOps(emu), raising=False)
    monkeypatch.setattr(cb, "_PLANS", {})
    return get_backend("cuda")


def _through_backend(be, q, k, v, pks, pvs, segs, deterministic):
    p = make_problem(q, k, v, pks if segs else pks[0], pvs if segs else pvs[0], segments=segs)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse = be.forward(p, out)
    dout = torch.randn(q.shape, dtype=q.dtype)
    dq, dk, dv = (torch.full(t.shape, float("nan"), dtype=t.dtype) for t in (q, k, v))
    dpk, dpv = be.backward(p, out, lse, dout, dq, dk, dv, deterministic)
    return out, lse, dout, (dq, dk, dv), dpk, dpv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["seg0_prompts", "lq0_prompts", "one_token_segments",
                                  "gqa_stride0_long", "spatial_segments", "temporal_per_position",
                                  "three_segments_short", "prompts_only", "temporal_batch2"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_backend_python_path_emulated(emulated_backend, dtype, name, deterministic):
    """CudaBackend.forward/backward end to end (launch plan cache, the torch op protocol,
    prompt-grad buffers and their reduction) with the kernels emulated, against float64."""
    t = lambda *s: _t(dtype, *s)   # noqa: E731
    if name in _EMPTY_CASES:
        q, k, v, pks, pvs, segs = _EMPTY_CASES[name](t)
    else:
        q, k, v, pks, pvs, segs = _case(name, dtype)
    for _ in range(2):   # the second call reuses the cached plan
        out, lse, dout, (dq, dk, dv), dpk, dpv = _through_backend(
            emulated_backend, q, k, v, pks, pvs, segs, deterministic)
    scale = q.shape[-1] ** -0.5
    ro, rlse, (gq, gk, gv), gpk, gpv = _reference(q, k, v, pks, pvs, segs, scale, dout)
    errs = {"out": rel_err(out, ro), "dq": rel_err(dq, gq), "dk": rel_err(dk, gk),
            "dv": rel_err(dv, gv)}
    if lse.numel():
        errs["lse"] = rel_err(lse, rlse) * TOL[dtype] / 1e-5
    for s in range(len(pks)):
        if pks[s] is not None:
            assert dpk[s].shape == pks[s].shape and dpk[s].dtype == dtype
            errs[f"dpk{s}"] = rel_err(dpk[s], gpk[s])
            errs[f"dpv{s}"] = rel_err(dpv[s], gpv[s])
        else:
            assert dpk[s] is None and dpv[s] is None
    bad = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"{name} {dtype}: {bad}"
    from avstfp_fast.ops import cuda_backend as cb
    assert len(cb._PLANS) == 2, "one forward and one backward plan, reused"


@pytest.mark.parametrize("name,dtype", [("temporal_batch2", torch.float16),
                                        ("shared_span_tiles", torch.float16),
                                        ("shared_by_many_short", torch.bfloat16),
                                        ("four_batch_dims", torch.float32)])
def test_prompt_grads_bit_exact_and_tickets_reset(emulated_backend, name, dtype):
    """The prompt gradients are summed in one fixed order in every mode (the short
    backward's running sum, seq_reps; the last unit of a row set, by ticket): successive
    calls give the same bits, in deterministic and default mode alike, with no zero-fill
    (the buffers are allocated empty) and the ticket counters back at 0 after each call."""
    q, k, v, pks, pvs, segs = _case(name, dtype)
    p = make_problem(q, k, v, pks[0], pvs[0])
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse = emulated_backend.forward(p, out)
    dout = torch.randn(q.shape, dtype=q.dtype)
    res = []
    for det in (True, True, False):
        grads = [torch.full(t.shape, float("nan"), dtype=t.dtype) for t in (q, k, v)]
        dpk, dpv = emulated_backend.backward(p, out, lse, dout, *grads, det)
        assert not torch.ops.avstfp_cuda.tickets.any(), "a ticket counter was left non-zero"
        res.append([*grads, dpk[0], dpv[0]])
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for other in res[1:]:
        for a, b in zip(res[0], other):
            assert torch.equal(a.view(bits), b.view(bits))


@pytest.fixture(scope="module", params=[1, 2], ids=["wait_one_group_short", "no_barrier"])
def emu_fault(request, tmp_path_factory):
    """The same kernels compiled with a pipeline fault (AVSTFP_TEST_FAULT, attn_kernels.cuh):
    1 = every pipeline waits for one cp.async group too few before it uses a tile (a
    misplaced cp.async.wait_group); 2 = no barrier between the wait and the use (the tile
    rows other warps copy may not have landed)."""
    return request.param, _build_emu(tmp_path_factory.mktemp(f"emu_fault{request.param}"),
                                     defines=[f"AVSTFP_TEST_FAULT={request.param}"])


@pytest.mark.parametrize("name,dtype", [("spatial_segments", torch.float16),
                                        ("temporal_per_position", torch.float16),
                                        ("spatial_segments", torch.float32)])
def test_emulation_catches_pipeline_faults(emu, emu_fault, name, dtype):
    """The emulation must catch the fault (pipelined 64-row tiles and packed 16-row tiles;
    WMMA and fp32 FMA products), while the correct build passes the same case.  A misplaced
    wait is reported as a read of a pending cp.async.  Without the barrier, warp 0 runs
    ahead (the emulation's schedule) and reads tile rows that other warps have either not
    waited for (reported) or not even issued yet (shared memory still NaN: NaN results)."""
    fault, broken = emu_fault
    if fault == 2 and name.startswith("temporal"):
        pytest.skip("packed one-warp units: every warp_mm starts with __syncwarp, so a missing "
                    "warp barrier after the wait is harmless there")
    q, k, v, pks, pvs, segs = _case(name, dtype)
    _emulated(emu, q, k, v, pks, pvs, segs, False, False)
    try:
        res = _emulated(broken, q, k, v, pks, pvs, segs, False, False)
    except EmulationError as e:
        assert "cp.async has not been waited for" in str(e)
        return
    assert fault == 2, "a misplaced cp.async wait was not reported"
    _, out, _, _, grads, _, _ = res
    assert any(torch.isnan(t).any() for t in [out, *grads]), "a missing barrier went unseen"
