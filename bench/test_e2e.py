"""End-to-end cases: one AV-STFP training step and inference clips/s.

Training step = zero grads, forward under bf16 autocast, cross-entropy, backward, Adam
step, for ViT-B/16 and ViT-L/14 (random weights), 10 frames, batch 2 and 8.  Variants:
the reference model (``backend="reference"``: the paper's math written literally) eager
and under ``torch.compile``, and PromptedCLIP with each fast backend (torch, triton,
cuda) eager and compiled.  Every case records the peak GPU memory of one steady-state
step (``torch.cuda.max_memory_allocated`` after a reset) and its roofline floor
(roofline.e2e_cost / e2e_floor) in ``extra_info``.

"compiled" is ``torch.compile(model)`` (default mode, whole model).  On a CPU the
compiled cases skip unless AVSTFP_BENCH_CPU_COMPILE=1 (inductor on a few cores takes
minutes).  Its first call
compiles and is excluded from the timing (it is the warm-up); the case records it as
``compile_s``.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import pytest
import torch

from avstfp_fast.ops import backend_names

import models
import roofline
import timing
from benchcfg import require_time, size_config
from contenders import Unavailable, build_contender
from geometry import ARCHS, FRAMES, KernelShape

BACKENDS = backend_names()     # every registered attention backend
_MODEL = {}      # LRU-1: arch -> model (weights are shared by every variant of that arch)


@dataclass(frozen=True)
class Case:
    arch: str
    batch: int
    mode: str          # "train" | "infer"
    backend: str
    compiled: bool

    @property
    def variant(self) -> str:
        return f"{self.backend}-{'compiled' if self.compiled else 'eager'}"

    @property
    def id(self) -> str:
        return f"{self.mode}-{self.arch}-b{self.batch}-{self.variant}"


def _cases():
    cfg = size_config()
    grid = [(a, b) for b in sorted(cfg["e2e_batches"], reverse=True) for a in cfg["e2e_archs"]]
    out = []
    for compiled in (False, True):
        for mode in ("train", "infer"):
            for a, b in grid:
                for be in BACKENDS:
                    out.append(Case(a, b, mode, be, compiled))
    return out


CASES = _cases()


def _model(arch, device):
    if arch not in _MODEL:
        _MODEL.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        _MODEL[arch] = {"eager": models.make_model(arch, device)}
    return _MODEL[arch]


def _compiled(entry, model):
    if "compiled" not in entry:
        models.raise_dynamo_limits()
        entry["compiled"] = torch.compile(model)
    return entry["compiled"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_e2e(case: Case, bench, device, ceilings):
    cfg = size_config()
    cuda = device.type == "cuda"
    if not cuda and case.arch in models.OPEN_CLIP_NAMES:
        pytest.skip("ViT-B/16 and ViT-L/14 training steps are GPU cases (no CUDA device here)")
    if case.backend in ("triton", "cuda") and not cuda:
        pytest.skip(f"backend {case.backend!r} needs a CUDA device")
    if case.compiled and not cuda and os.environ.get("AVSTFP_BENCH_CPU_COMPILE") != "1":
        pytest.skip("compiled end-to-end cases are GPU cases (inductor on a few CPU cores "
                    "takes minutes per variant)")
    big = case.arch == "L14"
    require_time((240 if big else 120) if case.compiled else (40 if big else 20), case.id)
    if case.backend in ("triton", "cuda"):
        try:
            build_contender(f"ours-{case.backend}", KernelShape(
                ARCHS["tiny"], 1, "fusion", torch.bfloat16), device)
        except Unavailable as e:
            pytest.skip(str(e))

    entry = _model(case.arch, device)
    model = entry["eager"]
    model.set_backend(case.backend)
    forward = _compiled(entry, model) if case.compiled else model
    audio, video, labels = models.make_batch(model, case.batch, device, seed=case.batch)
    amp = torch.bfloat16 if cuda else None
    if case.mode == "train":
        model.train()
        fn = models.train_step_fn(model, forward, audio, video, labels, amp)
    else:
        model.eval()
        fn = models.infer_fn(forward, audio, video, amp)

    info = bench.extra_info
    cost = roofline.e2e_cost(model, case.batch, case.mode)
    bench.group = f"e2e {case.mode} {case.arch} B={case.batch}"
    info.update(kind="e2e", arch=case.arch, batch=case.batch, mode=case.mode,
                backend=case.backend, compiled=case.compiled, variant=case.variant,
                contender=case.variant, clips=case.batch, frames=FRAMES,
                autocast="bf16" if amp else "fp32", flops=cost["flops"], bytes=cost["bytes"],
                tokens=cost["tokens"], floor_s=roofline.e2e_floor(cost, ceilings),
                copy_Bps=ceilings["copy_Bps"], gemm_flops=ceilings["gemm_flops"])
    try:
        t0 = time.perf_counter()
        fn()                                            # warm-up (compiles when compiled)
        timing.sync(device)
        info["first_call_s"] = time.perf_counter() - t0
        if case.compiled:
            info["compile_s"] = info["first_call_s"]
        for _ in range(cfg["e2e_warmup"] - 1):
            fn()
        if cuda:
            info["base_mem"] = int(torch.cuda.memory_allocated(device))
        info.update(timing.peak_memory(fn, device))
        if bench.disabled:
            bench.pedantic(fn, rounds=1, iterations=1)
        else:
            bench.pedantic(fn, rounds=cfg["e2e_rounds"], iterations=1, warmup_rounds=0)
    except ValueError as e:
        if "cannot run this input" not in str(e):
            raise
        pytest.skip(f"backend {case.backend!r}: {str(e).splitlines()[0][:200]}")
    except torch.cuda.OutOfMemoryError as e:
        info["oom"] = True
        del fn
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory: {str(e).splitlines()[0][:160]}")
    if bench.stats is not None:
        med = bench.stats.stats.median
        info["clips_per_s"] = case.batch / med if med > 0 else None
    del fn
    if cuda:
        torch.cuda.empty_cache()
