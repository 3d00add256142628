"""Kernel cases: the three AV-STFP attention stages at the ViT-B/16 and ViT-L/14 shapes.

One benchmark group per (stage, backbone, batch, dtype, pass); inside a group every
contender does the same work, starting from the packed QKV buffer (B, M, N, 3, H, d)
and delivering (B, M, N, H*d) (see geometry.py's module docstring).  Each contender is
checked once against the float64 reference backend before it is timed.

Order of the cases = priority when a time budget is set (gpu_check.sh): bf16 fwd+bwd
first, FlexAttention (compiles per shape) after the cheap contenders, fp16 and the pure
PyTorch backend last.
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import pytest
import torch

import contenders
import roofline
import timing
from benchcfg import require_time, size_config
from contenders import Unavailable
from geometry import ARCHS, DTYPES, STAGES, KernelShape, drop_input_sets, input_sets

MAIN = ["ours-triton", "ours-cuda", "sdpa", "xformers-cat", "xformers-split", "sdpa-flash",
        "sdpa-efficient", "sdpa-cudnn", "naive"]


@dataclass(frozen=True)
class Case:
    arch: str
    batch: int
    stage: str
    dtype: str
    passes: str          # "fwd" | "fwdbwd"
    contender: str

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.arch}-b{self.batch}-{self.dtype}-{self.passes}-{self.contender}"


def _cases():
    cfg = size_config()
    # batch 8 first: under a time budget the training-size cases come first
    grid = [(a, b, s) for b in sorted(cfg["batches"], reverse=True) for a in cfg["archs"]
            for s in STAGES]
    out = []

    def add(dtype, passes, contenders):
        if dtype not in cfg["dtypes"]:
            return
        for (arch, b, stage) in grid:
            for c in contenders:
                out.append(Case(arch, b, stage, dtype, passes, c))
    add("bf16", "fwdbwd", MAIN)
    add("bf16", "fwdbwd", ["flex"])
    add("bf16", "fwd", MAIN)
    add("bf16", "fwd", ["flex"])
    for p in ("fwdbwd", "fwd"):
        add("fp16", p, MAIN + ["flex"])
    for d in ("bf16", "fp16"):
        for p in ("fwdbwd", "fwd"):
            add(d, p, ["ours-torch"])
    return out


CASES = _cases()
_CHECKED = {}      # (shape key, contender) -> errors dict (fwd+bwd or fwd-only check)
_REF = {}          # LRU-1 cache of the float64 reference of one shape


def _reference(shape, device, seed):
    key = (shape.key, seed)
    if key not in _REF:
        _REF.clear()
        _REF[key] = contenders.reference_results(shape, device, seed)
    return _REF[key]


def _runtime_error_is_unsupported(name: str, e: Exception) -> bool:
    """Peers that cannot run an input raise; that is a skip (with the reason), not a
    failure.  Our own backends never get that excuse."""
    if name.startswith("ours-"):      # only the dispatcher's refusal (with its reason)
        return isinstance(e, ValueError) and "cannot run this input" in str(e)
    return isinstance(e, (RuntimeError, NotImplementedError, ValueError, TypeError))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel(case: Case, bench, device, ceilings):
    cfg = size_config()
    if device.type != "cuda" and cfg["name"] != "tiny":
        pytest.skip("ViT-B/16 and ViT-L/14 kernel shapes are GPU cases (no CUDA device here); "
                    "--bench-size tiny runs them at smoke sizes on CPU")
    compiled = contenders.CONTENDERS[case.contender][2] and device.type == "cuda"
    require_time(40 if compiled else 3, case.contender)
    shape = KernelShape(ARCHS[case.arch], case.batch, case.stage, DTYPES[case.dtype])
    grad = case.passes == "fwdbwd"
    seed = zlib.crc32(f"{case.arch}{case.batch}{case.stage}{case.dtype}".encode())

    try:
        fn = contenders.build_contender(case.contender, shape, device)
    except Unavailable as e:
        pytest.skip(str(e))

    # -- correctness, once per (shape, contender); a fwd+bwd check also covers fwd
    ck = (shape.key, case.contender)
    if ck not in _CHECKED or (grad and "dqkv" not in _CHECKED[ck]):
        ref = _reference(shape, device, seed)
        try:
            _CHECKED[ck] = contenders.check_contender(fn, shape, ref, grad)
        except Unavailable as e:
            pytest.skip(str(e))
        except AssertionError:
            raise
        except Exception as e:
            if _runtime_error_is_unsupported(case.contender, e):
                pytest.skip(f"{case.contender} cannot run this input: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            raise

    # -- timing
    sets = input_sets(shape, device, grad, seed + 1)
    it = itertools.cycle(sets)

    if grad:
        def step():
            s = next(it)
            out = fn(s.qkv, s.pks, s.pvs)
            torch.autograd.grad(out, s.leaves(), s.dout)
    else:
        def step():
            s = next(it)
            with torch.no_grad():
                fn(s.qkv, s.pks, s.pvs)

    cost = roofline.kernel_cost(shape, case.passes)
    bench.group = f"kernel {shape.key} {case.passes}"
    info = bench.extra_info
    info.update(kind="kernel", arch=case.arch, batch=case.batch, stage=case.stage,
                dtype=case.dtype, passes=case.passes, contender=case.contender,
                bytes=cost["bytes"], flops=cost["flops"], executed_flops=cost["executed_flops"],
                floor_s=roofline.floor_time(cost, ceilings),
                copy_Bps=ceilings["copy_Bps"], gemm_flops=ceilings["gemm_flops"],
                rel_err=_CHECKED[ck], input_sets=len(sets),
                shape=dict(tokens=shape.arch.tokens, frames=shape.arch.frames,
                           heads=shape.arch.heads, head_dim=shape.arch.head_dim,
                           prompts=list(shape.prompts), segments=shape.segments))
    if bench.disabled:                       # smoke run: one call
        bench.pedantic(step, rounds=1, iterations=1)
        return
    try:
        step()                               # first call: compile / autotune
        info.update(timing.peak_memory(step, device))
        iters = timing.calibrate(step, device, cfg["round_s"])
        info["iterations"] = iters
        bench.pedantic(step, rounds=cfg["rounds"], iterations=iters, warmup_rounds=1)
    except torch.cuda.OutOfMemoryError as e:
        del sets, it, step
        drop_input_sets()
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory: {str(e).splitlines()[0][:160]}")
