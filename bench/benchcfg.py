"""Run-wide settings of the benchmark suite, filled in by conftest.py (one place, so that
test modules and helpers read the same values)."""
from __future__ import annotations

import time

import pytest

SIZES = {
    # tiny: CI smoke sizes; every case that can run here runs once (--benchmark-disable).
    "tiny": dict(archs=["tiny"], batches=[1], dtypes=["bf16", "fp16"], e2e_archs=["tiny"],
                 e2e_batches=[1], rounds=2, round_s=0.002, e2e_rounds=1, e2e_warmup=1,
                 cpu_model="tiny", cpu_batch=1, cpu_rounds=1),
    # short: ViT-B/16 and ViT-L/14 shapes, few short rounds (bench/gpu_check.sh).
    "short": dict(archs=["B16", "L14"], batches=[2, 8], dtypes=["bf16", "fp16"],
                  e2e_archs=["B16", "L14"], e2e_batches=[2, 8], rounds=3, round_s=0.01,
                  e2e_rounds=3, e2e_warmup=2, cpu_model="small", cpu_batch=2, cpu_rounds=3),
    # full: the same shapes, more rounds.
    "full": dict(archs=["B16", "L14"], batches=[2, 8], dtypes=["bf16", "fp16"],
                 e2e_archs=["B16", "L14"], e2e_batches=[2, 8], rounds=15, round_s=0.05,
                 e2e_rounds=10, e2e_warmup=3, cpu_model="small", cpu_batch=2, cpu_rounds=11),
}

STATE = {"t0": time.time(), "ceilings": {}, "size": "full", "budget": None,
         "compile": "regional", "partial": None}


def size_config() -> dict:
    return dict(SIZES[STATE["size"]], name=STATE["size"])


def compile_mode() -> str:
    return STATE["compile"]


def time_left() -> float:
    b = STATE["budget"]
    return float("inf") if b is None else b - (time.time() - STATE["t0"])


def require_time(seconds: float = 0.0, what: str = "case") -> None:
    """Skip the current case when the soft budget (--bench-budget) cannot cover it."""
    if time_left() <= seconds:
        pytest.skip("time budget spent (--bench-budget / AVSTFP_BENCH_BUDGET)")
