"""Timing and measurement: device sync, medians, the roofline ceilings of this device,
pytest-benchmark's CUDA timer, round calibration, peak memory of one call."""
from __future__ import annotations

import platform
import time
from typing import Dict, Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, reps: int) -> float:
    """Median wall time of ``reps`` synchronized calls of ``fn``."""
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure_ceilings(device: torch.device, quick: bool = False) -> Dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written per second) and a large
    bf16 matrix-product rate, measured now, on random data (never zeros)."""
    g = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        n_copy = (1 << 28) if not quick else (1 << 26)          # 512 MiB of bf16 (128 MiB quick)
        n_mm, dt = (8192 if not quick else 4096), torch.bfloat16
    else:
        n_copy, n_mm, dt = 1 << 24, 1024, torch.float32          # 32 MiB fp16-equiv; CPU fp32 GEMM
    src = torch.randn(n_copy, device=device, dtype=torch.bfloat16, generator=g)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_copy = median_time(lambda: dst.copy_(src), device, 10)
    copy_Bps = 2 * src.numel() * src.element_size() / t_copy
    del src, dst
    a = torch.randn(n_mm, n_mm, device=device, dtype=dt, generator=g)
    b = torch.randn(n_mm, n_mm, device=device, dtype=dt, generator=g)
    a @ b
    t_mm = median_time(lambda: a @ b, device, 10 if device.type == "cuda" else 3)
    gemm = 2.0 * n_mm ** 3 / t_mm
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"copy_Bps": copy_Bps, "gemm_flops": gemm, "gemm_dtype": str(dt).replace("torch.", ""),
            "gemm_n": n_mm, "copy_bytes": 2 * n_copy * 2, "device": device_name(device)}


def sync_timer():
    """pytest-benchmark timer for CUDA work: waits for the device, then reads the clock,
    so a round of ``iterations`` asynchronous calls is timed end to end."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def calibrate(fn, device, target_s: float, max_iter: int = 10000) -> int:
    """Iterations per round so that a round lasts about ``target_s``."""
    t = median_time(fn, torch.device(device), 3)
    return int(max(1, min(max_iter, round(target_s / max(t, 1e-7)))))


def peak_memory(fn, device) -> Dict[str, Optional[int]]:
    """Peak allocated bytes during one call (torch.cuda.max_memory_allocated after a
    reset), and the same minus what was allocated before the call."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"peak_mem": None, "peak_mem_delta": None}
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    return {"peak_mem": int(peak), "peak_mem_delta": int(peak - base)}
