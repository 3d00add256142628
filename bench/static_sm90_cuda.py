"""Compile-time performance contract of the CUDA kernels (csrc/) on sm_90a (H100/H200).

No GPU needed.  For every kernel instance the launchers can start it joins

- ptxas -v output of ``.ci/compile_cuda.sh`` (registers, spill stores/loads, per arch),
- the sm_90a SASS (``cuobjdump -sass``): whether global->shared copies are asynchronous
  (``LDGSTS``, i.e. cp.async), and the widths of the global stores,
- the launch configuration the kernels themselves report (threads, dynamic shared memory,
  pipeline stages, bytes one stage copies), read through the CPU emulation library
  (csrc/cpu_emulation.h, ``emu_kernel_table``), so nothing here restates the tile sizes,

and derives CTAs and warps per SM (sm_90 limits: 64 K registers in 4 partitions, 2048
threads, 32 CTAs, 228 KiB shared memory with 1 KiB reserved per CTA) and an estimate of
the bytes of K/V (or Q/dO) tiles in flight per SM: ``max(1, stages - 1) * stage_bytes``
per CTA for a cp.async pipeline (the next tiles load while the current one is used; with
one stage a whole tile is in flight, but not while computing), or one
16-byte load per thread for synchronous copies (each thread waits for its load before it
stores it to shared memory and issues the next).  By Little's law an H200 SM needs about
23 KB in flight to cover the memory latency at full bandwidth (4.8 TB/s x ~650 ns / 132).

API (bench/static_sm90.py imports these): :func:`cuda_rows` and :func:`cuda_failures`.
Alone: ``python bench/static_sm90_cuda.py --out bench/results/static-sm90-cuda.md``
(compiles with nvcc, ~20-60 s; ``--objdir DIR`` reuses a compile_cuda.sh output folder).
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# sm_90 (H100/H200) per-SM limits
SM90_REGS_PER_PARTITION = 16384
SM90_PARTITIONS = 4
SM90_MAX_WARPS = 64
SM90_MAX_CTAS = 32
SM90_SMEM = 233472            # 228 KiB per SM
SM90_SMEM_RESERVED = 1024     # per CTA
H200_BYTES_IN_FLIGHT = 23_000  # Little's law estimate per SM (see the module docstring)
MIN_WARPS = 4


# --------------------------------------------------------------------------- tools
def _tool(name: str) -> Optional[str]:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cands = [os.path.join(home, "bin", name)]
    try:   # triton wheels ship cuobjdump/nvdisasm
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                  "bin", name))
    except Exception:
        pass
    for c in cands:
        if os.path.exists(c):
            return c
    return shutil.which(name)


def compile_objects(outdir: str) -> str:
    """Run .ci/compile_cuda.sh into outdir (objects + ptxas -v logs); return outdir."""
    r = run_compile(outdir)
    if r.returncode != 0:
        raise RuntimeError(f"compile_cuda.sh failed:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}")
    return outdir


def run_compile(outdir: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JOBS=os.environ.get("JOBS", "2"))
    return subprocess.run(["bash", os.path.join(ROOT, ".ci", "compile_cuda.sh"), outdir],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def cached_objects() -> Tuple[str, subprocess.CompletedProcess]:
    """compile_cuda.sh output for the current sources, compiled at most once: cached under
    AVSTFP_STATIC_CACHE (default ~/.cache/avstfp_fast/static_cuda) by a hash of csrc/*,
    the script and the nvcc version, so that the CI test and bench/static_sm90.py share
    one compile.  Returns (folder, the compile's result); a failed compile is not cached."""
    import hashlib
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(CSRC, "*"))) + [
            os.path.join(ROOT, ".ci", "compile_cuda.sh")]:
        with open(f, "rb") as fh:
            h.update(os.path.basename(f).encode() + fh.read())
    nvcc = _tool("nvcc")
    if nvcc:
        h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    base = os.environ.get("AVSTFP_STATIC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "avstfp_fast",
        "static_cuda")
    d = os.path.join(base, h.hexdigest()[:16])
    ok = os.path.join(d, "compile.ok")
    if os.path.exists(ok):
        with open(ok) as f:
            return d, subprocess.CompletedProcess([], 0, f.read(), "")
    tmp = d + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    r = run_compile(tmp)
    if r.returncode != 0:
        return tmp, r
    with open(os.path.join(tmp, "compile.ok"), "w") as f:
        f.write(r.stdout)
    try:
        os.replace(tmp, d)
    except OSError:   # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return d, r


def emulation_library(outdir: str) -> str:
    """Compile the CPU emulation (a few seconds) and return the .so path."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler for the CPU emulation")
    src = os.path.join(outdir, "emu_static.cpp")
    lib = os.path.join(outdir, "libemu_static.so")
    with open(src, "w") as f:
        f.write('#include "cpu_emulation.h"\n')
    r = subprocess.run([cxx, "-std=c++17", "-O0", "-fPIC", "-shared", "-I", CSRC, src, "-o", lib],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-4000:])
    return lib


# --------------------------------------------------------------------------- parsing
def kernel_table(lib_path: str) -> Dict[str, dict]:
    lib = ctypes.CDLL(lib_path)
    lib.emu_kernel_table.restype = ctypes.c_char_p
    out = {}
    for line in lib.emu_kernel_table().decode().splitlines():
        name, threads, smem, stages, stage_bytes, loads, pack, score, acc = line.split("|")
        out[name] = dict(threads=int(threads), smem=int(smem), stages=int(stages),
                         stage_bytes=int(stage_bytes), loads_tiles=bool(int(loads)),
                         pack=int(pack), score_smem=int(score), acc_smem=int(acc))
    return out


def _demangle(names: List[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt")
    if filt is None or not names:
        return {n: n for n in names}
    r = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, r.stdout.splitlines()))


_SHORT = re.compile(r"(\w+_kernel<[^>]*>)")


def _short(demangled: str) -> str:
    m = _SHORT.search(demangled)
    return m.group(1) if m else demangled


def ptxas_info(objdir: str) -> Dict[str, Dict[str, dict]]:
    """{arch: {mangled name: {registers, spill_stores, spill_loads, stack}}} from the logs."""
    res: Dict[str, Dict[str, dict]] = {}
    for log in glob.glob(os.path.join(objdir, "*.o.log")):
        cur = None
        with open(log) as f:
            for line in f:
                m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
                if m:
                    cur = res.setdefault(m.group(2), {}).setdefault(m.group(1), {})
                    continue
                if cur is None:
                    continue
                m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                              r"(\d+) bytes spill loads", line)
                if m:
                    cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                               spill_loads=int(m.group(3)))
                m = re.search(r"Used (\d+) registers", line)
                if m:
                    cur["registers"] = int(m.group(1))
    return res


_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_ops(objdir: str, arch: str = "sm_90a") -> Dict[str, Counter]:
    """{mangled name: Counter of opcodes (static instruction counts)} of the sm_90a SASS
    of every object."""
    tool = _tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or the triton wheel)")
    res: Dict[str, set] = {}
    for obj in sorted(glob.glob(os.path.join(objdir, "*.o"))):
        r = subprocess.run([tool, "-sass", "-arch", arch, obj], capture_output=True, text=True)
        cur = None
        for line in r.stdout.splitlines():
            m = re.search(r"Function : (\w+)", line)
            if m:
                cur = res.setdefault(m.group(1), Counter())
                continue
            if cur is not None:
                m = _OP.search(line)
                if m:
                    cur[m.group(1)] += 1
    return res


def _store_widths(ops: set) -> List[int]:
    w = set()
    for op in ops:
        if op.startswith("STG."):
            m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
            w.add({"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}[m.group(1)]
                  if m else 32)
    return sorted(w)


def occupancy(threads: int, registers: int, smem: int) -> int:
    """CTAs per SM on sm_90 for a kernel of `threads` threads, `registers` per thread and
    `smem` bytes of dynamic shared memory (static shared memory: none in these kernels)."""
    warps = (threads + 31) // 32
    per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256
    warps_by_regs = SM90_PARTITIONS * (SM90_REGS_PER_PARTITION // per_warp)
    by_regs = warps_by_regs // warps
    by_smem = SM90_SMEM // (smem + SM90_SMEM_RESERVED)
    by_warps = SM90_MAX_WARPS // warps
    return max(0, min(by_regs, by_smem, by_warps, SM90_MAX_CTAS))


# --------------------------------------------------------------------------- contract
def cuda_rows(objdir: Optional[str] = None, emu_lib: Optional[str] = None) -> List[dict]:
    """One row per kernel instance (sm_90a).  Compiles what is not given (nvcc ~20-90 s on
    2 cores, shared through :func:`cached_objects`; g++ a few s).  Keys: kernel, config, registers, spills_bytes, smem_bytes, ctas_per_sm,
    warps_per_sm, cp_async, bytes_in_flight_per_sm, notes (+ threads, stages,
    store_bits, spills_sm80_bytes, hmma, ldsm (SASS counts), cp_async_16B, score_smem_bytes,
    acc_smem_bytes)."""
    tmp = None
    try:
        if emu_lib is None:
            tmp = tempfile.mkdtemp(prefix="static_sm90_cuda_")
        if objdir is None:
            objdir, r = cached_objects()
            if r.returncode != 0:
                raise RuntimeError(f"compile_cuda.sh failed:\n{r.stdout[-4000:]}\n"
                                   f"{r.stderr[-2000:]}")
        if emu_lib is None:
            emu_lib = emulation_library(tmp)
        table = kernel_table(emu_lib)
        info = ptxas_info(objdir)
        ops = sass_ops(objdir)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    names = sorted(set(info.get("sm_90a", {})) | set(info.get("sm_80", {})) | set(ops))
    dem = _demangle(names)
    by_short: Dict[str, str] = {}
    for n in names:
        by_short[_short(dem[n])] = n
    rows = []
    for short, cfg in table.items():
        kernel, args = short.split("<", 1)
        row = dict(kernel=kernel, config=args.rstrip(">"), threads=cfg["threads"],
                   stages=cfg["stages"], pack=cfg["pack"], smem_bytes=cfg["smem"], registers=None,
                   spills_bytes=None, spills_sm80_bytes=None, ctas_per_sm=0, warps_per_sm=0,
                   cp_async=False, store_bits=[], bytes_in_flight_per_sm=None,
                   loads_tiles=cfg["loads_tiles"], notes="")
        mangled = by_short.get(short)
        notes = []
        if mangled is None:
            row["notes"] = "not found in the compiled objects"
            rows.append(row)
            continue
        p90 = info.get("sm_90a", {}).get(mangled, {})
        p80 = info.get("sm_80", {}).get(mangled, {})
        row["registers"] = p90.get("registers")
        if "spill_stores" in p90:
            row["spills_bytes"] = p90["spill_stores"] + p90["spill_loads"]
        if "spill_stores" in p80:
            row["spills_sm80_bytes"] = p80["spill_stores"] + p80["spill_loads"]
        o = ops.get(mangled, set())
        row["cp_async"] = any(op.startswith("LDGSTS") for op in o)
        row["store_bits"] = _store_widths(o)
        row["hmma"] = sum(n for op, n in o.items() if op.startswith("HMMA"))
        row["ldsm"] = sum(n for op, n in o.items() if op.startswith("LDSM"))
        cp = {op: n for op, n in o.items() if op.startswith("LDGSTS")}
        row["cp_async_16B"] = bool(cp) and all(".128" in op for op in cp)
        row["score_smem_bytes"] = cfg["score_smem"]
        row["acc_smem_bytes"] = cfg["acc_smem"]
        red = {op: n for op, n in o.items() if op.startswith(("RED", "ATOM"))}
        row["atomics"] = red
        if red:   # the prompt-gradient ticket counter (int); float ones would be data atomics
            notes.append("atomics: " + ", ".join(f"{op} x{n}" for op, n in sorted(red.items())))
        if row["registers"] is not None:
            ctas = occupancy(cfg["threads"], row["registers"], cfg["smem"])
            row["ctas_per_sm"] = ctas
            row["warps_per_sm"] = ctas * ((cfg["threads"] + 31) // 32)
            if cfg["loads_tiles"]:
                per_cta = (max(1, cfg["stages"] - 1) * cfg["stage_bytes"] if row["cp_async"]
                           else min(cfg["stage_bytes"], 16 * cfg["threads"]))
                row["bytes_in_flight_per_sm"] = ctas * per_cta
                if row["cp_async"] and cfg["stages"] == 1:
                    notes.append("1 stage: the CTA's 4 units overlap one another's loads"
                                 if cfg["pack"] > 1 else
                                 "1 stage: tile loads not overlapped with compute")
        if row["spills_sm80_bytes"]:
            notes.append(f"sm_80 spills {row['spills_sm80_bytes']} B")
        row["notes"] = "; ".join(notes)
        rows.append(row)
    return rows


def cuda_failures(rows: List[dict]) -> List[str]:
    """Violations of the contract: any spill (sm_90a or sm_80), a kernel that loops over
    K/V (or Q/dO) tiles without cp.async (LDGSTS), fewer than 4 warps per CTA, a kernel
    that does not fit on an SM, or one missing from the compiled objects."""
    bad = []
    for r in rows:
        what = f"{r['kernel']}<{r['config']}>"
        if r["registers"] is None:
            bad.append(f"{what}: {r['notes'] or 'no ptxas data'}")
            continue
        if r["spills_bytes"] or r.get("spills_sm80_bytes"):
            bad.append(f"{what}: spills (sm_90a {r['spills_bytes']} B, "
                       f"sm_80 {r.get('spills_sm80_bytes')} B)")
        if r.get("loads_tiles", True) and not r["cp_async"]:
            bad.append(f"{what}: synchronous tile loads (no LDGSTS in the SASS)")
        if r["threads"] // 32 < MIN_WARPS:
            bad.append(f"{what}: {r['threads'] // 32} warp(s) per CTA (< {MIN_WARPS})")
        if r["ctas_per_sm"] < 1:
            bad.append(f"{what}: does not fit on an SM")
    return bad


def fa2_gaps(rows: List[dict]) -> List[str]:
    """What the fp16/bf16 kernels lack of FlashAttention-2's structure: operands loaded
    with ldmatrix (LDSM), no fp32 score tile in shared memory (per the kernels' own
    layout), 16-byte cp.async.  Empty since the mma.sync kernels; the CI test asserts it."""
    out = []
    for r in rows:
        if r["config"].startswith("float"):
            continue
        miss = []
        if not r.get("ldsm"):
            miss.append("no LDSM")
        if r.get("score_smem_bytes"):
            miss.append(f"{r['score_smem_bytes']} B of fp32 scores in shared memory")
        if r.get("loads_tiles", True) and not r.get("cp_async_16B"):
            miss.append("cp.async not all 16-byte")
        if miss:
            out.append(f"{r['kernel']}<{r['config']}>: " + ", ".join(miss))
    return out


def markdown(rows: List[dict], title: str = "CUDA kernels, sm_90a") -> str:
    head = ("| kernel | <dtype, d, rows, N, stages, pack> | threads | stages | regs | spills B "
            "| smem B | CTAs/SM | warps/SM | cp.async | 16 B | KB in flight/SM | store bits "
            "| HMMA | LDSM | fp32 score smem B | fp32 acc smem B | notes |")
    lines = [f"### {title}", "", head, "|" + "---|" * 19]
    for r in rows:
        fl = r["bytes_in_flight_per_sm"]
        lines.append("| " + " | ".join(str(x) for x in (
            r["kernel"], r["config"], r["threads"], r["stages"], r["registers"],
            r["spills_bytes"], r["smem_bytes"], r["ctas_per_sm"], r["warps_per_sm"],
            "yes" if r["cp_async"] else "no", "yes" if r.get("cp_async_16B") else "no",
            "-" if fl is None else f"{fl / 1000:.1f}",
            ",".join(map(str, r["store_bits"])) or "-", r.get("hmma", "-"),
            r.get("ldsm", "-"), r.get("score_smem_bytes", "-"), r.get("acc_smem_bytes", "-"),
            r["notes"] or "")) + " |")
    fails = cuda_failures(rows)
    lines += ["", f"Contract failures ({len(fails)}):" if fails else "Contract: no failures."]
    lines += [f"- {f}" for f in fails]
    gaps = fa2_gaps(rows)
    lines += ["", f"FlashAttention-2 structure, not met ({len(gaps)} kernel instances):"
              if gaps else "FlashAttention-2 structure (fp16/bf16: LDSM, no fp32 score tile "
              "in shared memory, 16-byte cp.async): met."]
    lines += [f"- {g}" for g in gaps[:12]] + ([f"- ... {len(gaps) - 12} more"]
                                               if len(gaps) > 12 else [])
    lines += ["", "fp32 score smem B: bytes per CTA of fp32 score-shaped tiles (S, dP) in the "
              "kernel's own shared-memory layout (csrc/attn_kernels.cuh, reported through the "
              "CPU emulation's kernel table); 0 means scores and probabilities stay in "
              "registers.  HMMA/LDSM: static instruction counts in the sm_90a SASS."]
    lines += ["", f"KB in flight/SM: estimate (see bench/static_sm90_cuda.py); an H200 SM "
              f"needs about {H200_BYTES_IN_FLIGHT // 1000} KB to cover memory latency."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the Markdown table here (default: stdout)")
    ap.add_argument("--objdir", help="reuse a .ci/compile_cuda.sh output folder")
    ap.add_argument("--title", default="CUDA kernels, sm_90a")
    a = ap.parse_args(argv)
    rows = cuda_rows(objdir=a.objdir)
    text = markdown(rows, a.title)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    fails = cuda_failures(rows)
    for f in fails:
        print("FAIL", f, file=sys.stderr)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
