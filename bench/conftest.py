"""pytest configuration of the benchmark suite (``pytest bench/``).

Options (each also settable by environment variable):

  --bench-size tiny|short|full   AVSTFP_BENCH_SIZE    default: full
      tiny:  CI smoke sizes (a few tokens, 3 frames); every case that can run on the
             machine runs once with --benchmark-disable in well under two minutes on CPU.
      short: the ViT-B/16 and ViT-L/14 shapes (bench/geometry.py) with few, short
             rounds (bench/gpu_check.sh uses it).
      full:  the same shapes, more rounds.
  --bench-budget SECONDS         AVSTFP_BENCH_BUDGET  default: none
      soft time budget of this pytest run: once spent, the remaining cases skip with
      the reason "time budget spent" (the JSON is still written).
  --bench-compile regional|full  AVSTFP_BENCH_COMPILE default: regional
      how the end-to-end "compiled" cases use torch.compile (see test_e2e.py).
  --bench-partial PATH           AVSTFP_BENCH_PARTIAL default: none
      append each finished case as one JSON line to PATH (survives a hard kill).

Kernel and end-to-end cases at ViT-B/16 and ViT-L/14 sizes are GPU cases: on a machine
without CUDA they skip with a reason; the CPU case (test_cpu.py) runs everywhere.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

import timing
from benchcfg import STATE as _STATE, SIZES, size_config
from summarize import autotable_records


def pytest_addoption(parser):
    g = parser.getgroup("avstfp-bench")
    g.addoption("--bench-size", default=None, choices=sorted(SIZES),
                help="benchmark sizes (env AVSTFP_BENCH_SIZE; default full)")
    g.addoption("--bench-budget", default=None, type=float,
                help="soft time budget in seconds (env AVSTFP_BENCH_BUDGET)")
    g.addoption("--bench-compile", default=None, choices=["regional", "full"],
                help="torch.compile granularity of end-to-end cases (env AVSTFP_BENCH_COMPILE)")
    g.addoption("--bench-partial", default=None,
                help="append finished cases as JSON lines here (env AVSTFP_BENCH_PARTIAL)")


def _opt(config, name, env, default=None):
    v = config.getoption(name)
    if v is None:
        v = os.environ.get(env) or default
    return v


def pytest_configure(config):
    size = _opt(config, "--bench-size", "AVSTFP_BENCH_SIZE", "full")
    if size not in SIZES:
        raise pytest.UsageError(f"--bench-size/AVSTFP_BENCH_SIZE: expected one of "
                                f"{sorted(SIZES)}, got {size!r}")
    _STATE["size"] = size
    b = _opt(config, "--bench-budget", "AVSTFP_BENCH_BUDGET")
    _STATE["budget"] = float(b) if b not in (None, "") else None
    _STATE["compile"] = _opt(config, "--bench-compile", "AVSTFP_BENCH_COMPILE", "regional")
    _STATE["partial"] = _opt(config, "--bench-partial", "AVSTFP_BENCH_PARTIAL")
    _STATE["t0"] = time.time()
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "compiled: uses torch.compile (slow first call)")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(scope="session")
def ceilings(device):
    """Copy bandwidth and GEMM rate of this device, measured once per run."""
    c = timing.measure_ceilings(device, quick=size_config()["name"] == "tiny")
    _STATE["ceilings"] = c
    return c


@pytest.fixture
def bench(benchmark, device):
    """The pytest-benchmark fixture, set up for asynchronous CUDA work: its timer
    synchronizes the device before reading the clock."""
    if device.type == "cuda" and hasattr(benchmark, "_timer"):
        benchmark._timer = timing.sync_timer
    benchmark.extra_info["size"] = size_config()["name"]
    return benchmark


# --------------------------------------------------------------------------- results
def _meta() -> dict:
    return {
        "size": _STATE["size"], "ceilings": _STATE["ceilings"],
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": timing.device_name(torch.device("cuda" if torch.cuda.is_available()
                                                    else "cpu")),
        "triton": _version("triton"), "xformers": _version("xformers"),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["avstfp"] = _meta()
    # for bench/make_autotable.py: {"case", "backend", "stage", "median_s"} of ours-*
    output_json["records"] = autotable_records(output_json.get("benchmarks", []))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["avstfp_device"] = timing.device_name(
        torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _version(mod):
    """Version of an installed package, without importing it (no import side effects)."""
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:
        return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    path = _STATE.get("partial")
    fx = getattr(item, "funcargs", {}).get("bench") or getattr(item, "funcargs", {}).get("benchmark")
    if not path or fx is None or getattr(fx, "stats", None) is None:
        return
    try:
        st = fx.stats.stats
        rec = {"group": fx.group, "name": fx.name, "fullname": fx.fullname,
               "params": {k: str(v) for k, v in (fx.params or {}).items()},
               "extra_info": fx.extra_info,
               "stats": {k: getattr(st, k) for k in ("min", "max", "mean", "median",
                                                     "stddev", "rounds", "iterations")
                         if hasattr(st, k)},
               "avstfp": _meta()}
        rec["stats"]["iterations"] = fx.stats.iterations
        with open(path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
    except Exception as e:      # never let bookkeeping fail a benchmark
        print(f"[bench] could not append partial result: {e}")


def pytest_runtest_logreport(report):
    """With --bench-partial, skipped cases are recorded too (summarize.py lists the
    reasons: which contender or backend could not run, or which budget ran out)."""
    path = _STATE.get("partial")
    if not path or not report.skipped or report.when not in ("setup", "call"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    try:
        with open(path, "a") as f:
            f.write(json.dumps({"skipped": True, "fullname": report.nodeid,
                                "reason": reason[:300]}) + "\n")
    except OSError as e:
        print(f"[bench] could not append skip record: {e}")
