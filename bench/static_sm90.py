"""Compile-time performance contract of the Triton kernels on sm_90 (no GPU needed).

Every kernel launch that ``avstfp_fast.ops.triton_backend`` makes for the AV-STFP stage
shapes (ViT-B/16, ViT-L/14; batch 8; bf16 and fp16; head dim 64 and 128 -- the latter
with half the heads; deterministic backward off and on) is captured on the CPU (the
launch is replaced by a recorder), then compiled for sm_90 with the specialisation a
real launch applies: the launch's own arguments go through Triton's argument binder
(16-byte divisibility of pointers and integers, integers equal to 1 made constexpr),
exactly as ``kernel[grid](...)`` would on a GPU.  From ptxas and the PTX it reads
registers, spill bytes, shared memory, whether the matrix products lowered to wgmma and
whether global->shared loads are 16-byte ``cp.async``; from these the occupancy
(CTAs and warps per SM) and the waves on 132 SMs.  Floors (minimum bytes, useful and
executed FLOPs, at nominal sm_90 ceilings) come from ``bench/floors.py``.

The kernels: forward; sequence-owning backward and its prompt-gradient reduction (every
AV-STFP stage shape); the key-block-parallel (fa2) backward kernels run only for longer
sequences and do not appear at these shapes.

Fails (exit 1) on: any spill for head dim 64, fewer than 2 CTAs/SM for head dim 64,
a bf16/fp16 main (64+ row) matrix product not on wgmma, a bf16/fp16 per-sequence
(batched, 3-D) product of the packed temporal tile not on tensor cores (mma.sync: wgmma
has no batched form), acq_rel atomics, a forward whose first K/V tile is not requested
(L2 prefetch) before the wait for its Q tile.

CUDA kernels join the table when ``bench/static_sm90_cuda.py`` exists: its
``cuda_rows()`` rows are appended and ``cuda_failures(rows)`` added to the failures.

    python bench/static_sm90.py                 # full matrix -> bench/results/static-sm90.md
    python bench/static_sm90.py --ci            # the CI subset (ViT-B/16 bf16), no file
    python bench/static_sm90.py --triton-path .whl/triton36   # also with another Triton

``--triton-path DIR`` runs the same contract a second time with the Triton installed in
DIR (``pip install --no-deps --target DIR triton==3.6.0``; the GPU image's version); a
missing DIR is reported and skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# sm_90 (H100/H200) per-SM limits
SMS = 132
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024           # usable by CTAs, 1 KB of it reserved per CTA
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32

MODELS = ("B16", "L14")
STAGES = ("temporal", "spatial", "fusion")
DTYPES = ("bf16", "fp16")
HEAD_DIMS = (64, 128)
BATCH = 8


# --------------------------------------------------------------------------- capture
@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict
    case: str


def _recorders(K, sink: List[Launch], case_ref: list):
    """Replace every @triton.jit kernel of module K by a recorder of its launches."""
    import triton
    saved = {}
    for name in dir(K):
        fn = getattr(K, name)
        if isinstance(fn, triton.runtime.jit.JITFunction) and not name.startswith("_"):
            saved[name] = fn

            class Rec:
                def __init__(self, fn):
                    self.fn = fn

                def __getitem__(self, grid):
                    def call(*args, **kwargs):
                        sink.append(Launch(self.fn.__name__, tuple(grid), args, kwargs,
                                           case_ref[0]))
                    return call
            setattr(K, name, Rec(fn))
    return saved


def stage_problem(model: str, stage: str, dtype: str, head_dim: int, batch: int = BATCH):
    """(problem, qkv, packed) of one stage call on the CPU (uninitialised memory)."""
    import torch
    from geometry import ARCHS, DTYPES as DT, KernelShape
    from avstfp_fast.ops import make_problem
    from avstfp_fast.ops.attention import qkv_views
    a = ARCHS[model]
    if head_dim != a.head_dim:
        a = dataclasses.replace(a, heads=a.heads * a.head_dim // head_dim, head_dim=head_dim)
    shape = KernelShape(a, batch, stage, DT[dtype])
    qkv = torch.empty(batch, a.frames, a.tokens, 3, a.heads, a.head_dim, dtype=DT[dtype])
    ps = shape.prompt_shape()
    pks = [torch.randn(*ps[:-2], P, ps[-1]).to(DT[dtype]) for P in shape.prompts]
    pvs = [torch.randn(*ps[:-2], P, ps[-1]).to(DT[dtype]) for P in shape.prompts]
    seq_dim = 1 if stage == "temporal" else 2
    q, k, v = qkv_views(qkv, 3, seq_dim)
    segs = shape.segments
    p = make_problem(q, k, v, pks if segs else pks[0], pvs if segs else pvs[0],
                     segments=segs)
    return p, qkv, shape


def capture(cases) -> List[Launch]:
    """Run the launchers for every (model, stage, dtype, head_dim, det) case; record."""
    import torch
    from avstfp_fast.ops import triton_backend as TB
    from avstfp_fast.ops.attention import qkv_views
    from avstfp_fast.ops.contract import empty_in_stride_order
    K = TB._kernels()
    sink: List[Launch] = []
    case_ref = [""]
    saved = _recorders(K, sink, case_ref)
    be = TB.TritonBackend()
    try:
        for (model, stage, dtype, d, det) in cases:
            case_ref[0] = f"{stage} {model} {dtype} d{d}" + (" det" if det else "")
            p, qkv, _ = stage_problem(model, stage, dtype, d)
            out = empty_in_stride_order(p.q.shape, p.q)
            lse = be.forward(p, out)
            dqkv = torch.empty_like(qkv)
            dq, dk, dv = qkv_views(dqkv, 3, 1 if stage == "temporal" else 2)
            dout = empty_in_stride_order(p.q.shape, p.q)
            be.backward(p, out, lse, dout, dq, dk, dv, det)
    finally:
        for name, fn in saved.items():
            setattr(K, name, fn)
    return sink


# --------------------------------------------------------------------------- compile
def _specialise(fn, args, kwargs):
    """What ``fn[grid](*args, **kwargs)`` compiles on an sm_90 device: Triton's own
    binder and argument packing, with the target fixed to sm_90."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options, (
        repr(specialization), repr(sorted(options.__dict__.items())))


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_CPASYNC16 = re.compile(r"cp\.async\.c[ag]\.shared\.global[^\n]*,\s*(?:16|0x10)\s*(?:,|;)")
_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) [^\n]*-> tensor<((?:\d+x)+)\w+, (#\w+)>")
_MMA = re.compile(r"^(#\w+) = #ttg\.nvidia_mma<", re.M)


def compile_one(fn, args, kwargs, dump: Optional[str] = None) -> Dict:
    import triton
    src, target, options, _ = _specialise(fn, args, kwargs)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        c = triton.compile(src, target=target, options=options.__dict__)
    log = buf.getvalue()
    ptx, ttgir = c.asm.get("ptx", ""), c.asm.get("ttgir", "")
    if dump:   # the compiled stages, for reading by hand (--dump)
        for ext in ("ttgir", "ptx"):
            with open(f"{dump}.{ext}", "w") as f:
                f.write(c.asm.get(ext, ""))
        from triton.tools.disasm import get_sass
        with open(f"{dump}.sass", "w") as f:
            f.write(get_sass(c.asm["cubin"]))
    regs = int(_PTXAS.search(log).group(1)) if _PTXAS.search(log) else -1
    sp = _SPILL.search(log)
    spills = int(sp.group(1)) + int(sp.group(2)) if sp else -1
    smem = int(c.metadata.shared)
    nw = int(c.metadata.num_warps)
    # (op, result shape, result encoding) of every matrix product; 2-D products with 64+
    # rows are "main" (a warpgroup's tile, wgmma); 3-D ones are the packed tile's
    # per-sequence (batched) products, which wgmma cannot do: they must still run on
    # tensor cores (mma.sync, an nvidia_mma result layout), not as FMA loops
    dots = [(op, [int(x) for x in shp.strip("x").split("x")], enc)
            for op, shp, enc in _DOT.findall(ttgir)]
    mma_enc = set(_MMA.findall(ttgir))
    n_dot, n_wgmma = len(dots), sum(op != "tt.dot" for op, _, _ in dots)
    main = [op for op, shp, _ in dots if len(shp) == 2 and shp[0] >= 64]
    n_main, n_main_wgmma = len(main), sum(op != "tt.dot" for op in main)
    batched = [enc for _, shp, enc in dots if len(shp) == 3]
    n_bat, n_bat_mma = len(batched), sum(enc in mma_enc for enc in batched)
    # the forward's Q tile is a plain load whose shared-memory store waits for it; the
    # first K/V tile's L2 prefetches must be issued before that store (and so before
    # the wait), or the K/V reads start only once Q has arrived
    pf, sts = ptx.find("prefetch.global.L2"), ptx.find("st.shared")
    kv_before_q = "-" if pf < 0 else ("yes" if sts < 0 or pf < sts else "no")
    atomics = set(re.findall(r"\b(?:atom|red)\.global\.[\w.:]+", ptx))
    sems = {"acq_rel" if ("acq_rel" in a or "acquire" in a or "release" in a) else
            "relaxed" if "relaxed" in a else "other" for a in atomics}
    return dict(regs=regs, spills=spills, atomics="/".join(sorted(sems)) or "-",
                smem=smem, num_warps=nw,
                num_stages=int(c.metadata.num_stages), dots=n_dot, wgmma_dots=n_wgmma,
                main_dots=n_main, main_wgmma=n_main_wgmma, batched_dots=n_bat,
                batched_mma=n_bat_mma, mma_sync_ptx="mma.sync" in ptx,
                wgmma_ptx="wgmma.mma_async" in ptx, cp_async16=bool(_CPASYNC16.search(ptx)),
                cp_async_any="cp.async" in ptx, kv_before_q=kv_before_q,
                compile_s=round(time.time() - t0, 1))


def occupancy(regs: int, smem: int, num_warps: int) -> Dict[str, int]:
    per_warp = -(-max(regs, 1) * 32 // 256) * 256           # allocation unit: 256 regs/warp
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_smem = SMEM_PER_SM // (smem + 1024)
    by_warps = MAX_WARPS_PER_SM // num_warps
    ctas = max(0, min(by_regs, by_smem, by_warps, MAX_CTAS_PER_SM))
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps,
            "limit": min((by_regs, "regs"), (by_smem, "smem"), (by_warps, "warps"))[1]}


def _cases(ci: bool):
    if ci:   # the CI subset: ViT-B/16 bf16 head dim 64, every stage, both backwards
        return [("B16", s, "bf16", 64, det) for s in STAGES for det in (False, True)]
    return [(m, s, dt, d, det) for m in MODELS for s in STAGES for dt in DTYPES
            for d in HEAD_DIMS for det in (False, True)]


def _config(kwargs) -> str:
    c = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    tiles = " ".join(f"{k}={v}" for k, v in c.items() if isinstance(v, (int, bool)) and k != "D"
                     and not isinstance(v, str))
    return f"{tiles} w{kwargs.get('num_warps')} s{kwargs.get('num_stages')}"


def worker(ci: bool, shard: int, nshards: int, dump: Optional[str] = None) -> List[Dict]:
    """Capture every case, compile this shard's distinct specialisations; rows as dicts."""
    launches = capture(_cases(ci))
    from avstfp_fast.ops import triton_backend as TB
    K = TB._kernels()
    import triton
    uniq: Dict[tuple, Dict] = {}
    for L in launches:
        fn = getattr(K, L.kernel)
        _, _, _, key = _specialise(fn, L.args, L.kwargs)
        key = (L.kernel,) + key
        if key not in uniq:
            uniq[key] = dict(kernel=L.kernel, config=_config(L.kwargs),
                             dtype=L.case.split()[2], head_dim=int(L.case.split()[3][1:]),
                             cases=[], grids=[], first=L)
        u = uniq[key]
        u["cases"].append(L.case)
        u["grids"].append(list(L.grid))
    rows = []
    for i, (key, u) in enumerate(sorted(uniq.items(), key=lambda kv: kv[0])):
        if i % nshards != shard:
            continue
        L = u.pop("first")
        stem = None
        if dump:
            os.makedirs(dump, exist_ok=True)
            stem = os.path.join(dump, f"{triton.__version__}-{L.kernel}-{u['dtype']}-"
                                      f"d{u['head_dim']}-" + "-".join(
                                          sorted({c.split()[0] for c in u['cases']})) +
                                f"-{i}")
        r = compile_one(getattr(K, L.kernel), L.args, L.kwargs, stem)
        r.update(u)
        r.update(occupancy(r["regs"], r["smem"], r["num_warps"]))
        r["triton"] = triton.__version__
        rows.append(r)
    return rows


def run_contract(ci: bool, jobs: int, pythonpath: Optional[str] = None,
                 dump: Optional[str] = None) -> List[Dict]:
    """Compile in ``jobs`` worker processes (clean env: no interpreter, fresh cache)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(
            [pythonpath, env.get("PYTHONPATH", "")]).strip(os.pathsep)
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        procs = []
        for s in range(jobs):
            outp = os.path.join(tmp, f"rows{s}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(s), str(jobs),
                   "--json", outp] + (["--ci"] if ci else []) + (
                       ["--dump", os.path.abspath(dump)] if dump else [])
            procs.append((subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True), outp))
        for p, outp in procs:
            log, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"static_sm90 worker failed:\n{log[-4000:]}")
            with open(outp) as f:
                rows += json.load(f)
    return rows


def failures(rows: List[Dict]) -> List[str]:
    bad = []
    for r in rows:
        what = f"[triton {r['triton']}] {r['kernel']} ({r['config']}; {r['cases'][0]})"
        if r["head_dim"] == 64 and r["spills"] != 0:
            bad.append(f"{what}: {r['spills']} bytes of spills (head dim 64 must not spill)")
        if r["head_dim"] == 64 and r["ctas_per_sm"] < 2:
            bad.append(f"{what}: {r['ctas_per_sm']} CTA/SM (< 2 for head dim 64; "
                       f"{r['regs']} regs, {r['smem']} B smem)")
        if r["kernel"] == "prompted_attn_fwd" and r.get("kv_before_q") != "yes":
            bad.append(f"{what}: the first K/V tile's L2 prefetch is "
                       f"{'missing' if r.get('kv_before_q') == '-' else 'after'} the Q "
                       f"tile's wait (st.shared of the loaded Q)")
        if "acq_rel" in r.get("atomics", ""):
            bad.append(f"{what}: acq_rel atomics (fence + L1 invalidate each; use sem='relaxed')")
        if r["dtype"] in ("bf16", "fp16") and r["main_wgmma"] < r["main_dots"]:
            bad.append(f"{what}: {r['main_dots'] - r['main_wgmma']} of {r['main_dots']} "
                       f"main (64+ row) matrix products not on wgmma")
        if r["dtype"] in ("bf16", "fp16") and r.get("batched_mma", 0) < r.get("batched_dots", 0):
            bad.append(f"{what}: {r['batched_dots'] - r['batched_mma']} of "
                       f"{r['batched_dots']} per-sequence (batched) matrix products not on "
                       f"tensor cores (mma.sync)")
    return bad


# --------------------------------------------------------------------------- floors
def floor_rows(models=MODELS) -> List[Dict]:
    """Per stage (bf16, head dim 64, batch 8): bytes, useful and executed FLOPs, floor."""
    import floors
    from avstfp_fast.ops import triton_backend as TB
    rows = []
    for model in models:
        for stage in STAGES:
            p, _, shape = stage_problem(model, stage, "bf16", 64)
            pr = [t for t in p.prompt_k if t is not None]
            call = floors.Call(
                batch=int(p.q.shape[:-2].numel()), q_segments=tuple(p.q_segments),
                k_segments=tuple(p.k_segments),
                prompts=tuple(t.shape[-2] for t in pr), head_dim=64, elem=2,
                prompt_rows=sum(t.numel() // 64 for t in pr))
            t = TB.tile_for(p)
            # the kernels the tile table launches: the forward walks keys + prompts as
            # one source; the sequence-owning backward two passes (3 + 4 products) or,
            # packed one-tile sequences, one step (5)
            tile, bwd, bq = floors.for_tiles(t, TB.BACKWARD_SCHEME)
            s = floors.summary(call, tile, bwd, bwd_slot_m=bq)
            s.update(model=model, stage=stage,
                     tile=f"{t.g}x({t.slot_m},{t.slot_kp} keys+prompts)",
                     backward={"seq-one": "sequence-owning, one step (5 products)",
                               "seq": f"sequence-owning, two passes (3 + 4 products; "
                                      f"{t.slot_m}- / {bq}-row query tiles)"}.get(
                         bwd, bwd + (f", {bq}-row q tiles" if bq and bq != t.slot_m else "")))
            rows.append(s)
    return rows


# --------------------------------------------------------------------------- report
def _cuda_module():
    path = os.path.join(HERE, "static_sm90_cuda.py")
    if not os.path.exists(path):
        return None
    sys.path.insert(0, HERE)
    import static_sm90_cuda
    return static_sm90_cuda


def markdown(rows_by_version: Dict[str, List[Dict]], frows: List[Dict], cuda_rows: List[Dict],
             bad: List[str], title: str) -> str:
    L = [f"# {title}", "",
         "Generated by `python bench/static_sm90.py` (no GPU: offline compiles for sm_90 with "
         "the real launch specialisation). Occupancy from registers, shared memory and warps "
         f"with sm_90 limits ({REGS_PER_SM} regs, {SMEM_PER_SM // 1024} KB smem, "
         f"{MAX_WARPS_PER_SM} warps per SM); waves = CTAs / ({SMS} SMs x CTAs/SM), batch {BATCH}.",
         ""]
    for ver, rows in rows_by_version.items():
        L += [f"## Triton {ver}", "",
              "| kernel | config | dtype | d | regs | spills B | smem KB | CTAs/SM | warps/SM "
              "(limit) | wgmma: main, all | cp.async 16B | K/V read before Q wait | atomics | "
              "grid (largest case) | waves | cases |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["head_dim"], r["config"])):
            g = max(r["grids"], key=lambda g: math.prod(g))
            ctas = math.prod(g)
            waves = ctas / (SMS * max(1, r["ctas_per_sm"]))
            cases = sorted(set(c.split(" d")[0].replace(f" {r['dtype']}", "") +
                               (" det" if c.endswith("det") else "") for c in r["cases"]))
            L.append(f"| {r['kernel']} | {r['config']} | {r['dtype']} | {r['head_dim']} | "
                     f"{r['regs']} | {r['spills']} | {r['smem'] / 1024:.1f} | {r['ctas_per_sm']} | "
                     f"{r['warps_per_sm']} ({r['limit']}) | "
                     f"{r['main_wgmma']}/{r['main_dots']}, {r['wgmma_dots']}/{r['dots']}"
                     + (f"; batched on mma {r['batched_mma']}/{r['batched_dots']}"
                        if r.get("batched_dots") else "") + " | "
                     f"{'yes' if r['cp_async16'] else ('other' if r['cp_async_any'] else 'no')} | "
                     f"{r.get('kv_before_q', '?')} | {r.get('atomics', '?')} | "
                     f"{tuple(g)} | {waves:.1f} | {', '.join(cases)} |")
        L.append("")
    if cuda_rows:
        L += ["## CUDA kernels", "",
              "| kernel | config | regs | spills B | smem KB | CTAs/SM | warps/SM | cp.async | "
              "notes |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in cuda_rows:
            L.append(f"| {r['kernel']} | {r['config']} | {r['registers']} | {r['spills_bytes']} | "
                     f"{r['smem_bytes'] / 1024:.1f} | {r['ctas_per_sm']} | {r['warps_per_sm']} | "
                     f"{'yes' if r['cp_async'] else 'no'} | {r.get('notes', '')} |")
        L.append("")
    if frows:
        L += ["## Floors per stage call (bf16, head dim 64, batch 8; estimates at nominal "
              "3.0 TB/s and 790 TFLOP/s)", "",
              "| stage | model | tile g x (m, n, p) | backward | fwd MB | fwd useful GFLOP | "
              "fwd executed GFLOP | fwd floor µs | fwd+bwd MB | fwd+bwd useful GFLOP | "
              "fwd+bwd executed GFLOP (useful %) | byte floor µs | floor µs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for f in frows:
            L.append(f"| {f['stage']} | {f['model']} | {f['tile']} | {f['backward']} | "
                     f"{f['fwd_bytes'] / 1e6:.1f} | {f['fwd_useful_flops'] / 1e9:.1f} | "
                     f"{f['fwd_executed_flops'] / 1e9:.1f} | {f['fwd_floor_s'] * 1e6:.1f} | "
                     f"{f['fwdbwd_bytes'] / 1e6:.1f} | {f['fwdbwd_useful_flops'] / 1e9:.1f} | "
                     f"{f['fwdbwd_executed_flops'] / 1e9:.1f} "
                     f"({100 * f['fwdbwd_useful_fraction']:.0f}%) | "
                     f"{f['fwdbwd_byte_floor_s'] * 1e6:.1f} | {f['fwdbwd_floor_s'] * 1e6:.1f} |")
        L.append("")
    L += ["## Contract", "",
          "Fails on: any spill for head dim 64; fewer than 2 CTAs/SM for head dim 64; a "
          "bf16/fp16 main matrix product (64+ result rows, the token-key tiles) not lowered "
          "to wgmma; a bf16/fp16 per-sequence (batched, 3-D) product of the packed temporal "
          "tile not on tensor cores; acq_rel atomics; a forward whose first K/V tile's L2 "
          "prefetch is not issued before the wait for its Q tile (\"K/V read before Q "
          "wait\": the PTX's first `prefetch.global.L2` precedes its first `st.shared`). "
          "Products of 16-row prompt tiles use "
          "mma.sync (wgmma needs 64 rows per warpgroup); so do the packed tile's batched "
          "products (wgmma has no batched form: each sequence's 16 x 16 block is one warp's "
          "mma.sync tile), which is why they are checked for tensor cores, not for wgmma.", ""]
    L += [f"- FAIL: {b}" for b in bad] or ["- all checks pass"]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ci", action="store_true", help="CI subset; write no file unless --out")
    ap.add_argument("--out", default=None, help="Markdown output "
                    "(default bench/results/static-sm90.md; none with --ci)")
    ap.add_argument("--title", default="Static sm_90 contract of the Triton kernels")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--triton-path", default=None,
                    help="directory with a second Triton (pip --target) to check as well")
    ap.add_argument("--dump", default=None, metavar="DIR",
                    help="also write each compiled kernel's TTGIR, PTX and SASS to DIR "
                         "(<triton>-<kernel>-<dtype>-d<head dim>-<stages>-<n>.{ttgir,ptx,sass})")
    ap.add_argument("--worker", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    if a.worker is not None:
        os.environ.pop("TRITON_INTERPRET", None)
        rows = worker(a.ci, *a.worker, dump=a.dump)
        with open(a.json, "w") as f:
            json.dump(rows, f)
        return 0
    t0 = time.time()
    by_ver: Dict[str, List[Dict]] = {}
    rows = run_contract(a.ci, a.jobs, dump=a.dump)
    by_ver[rows[0]["triton"] if rows else "?"] = rows
    notes = []
    if a.triton_path:
        if os.path.isdir(os.path.join(a.triton_path, "triton")):
            rows2 = run_contract(a.ci, a.jobs, a.triton_path, a.dump)
            by_ver[rows2[0]["triton"] if rows2 else "?"] = rows2
        else:
            notes.append(f"SKIPPED: no Triton under {a.triton_path} (install it with "
                         f"`pip install --no-deps --target {a.triton_path} triton==3.6.0`)")
    bad = [b for rs in by_ver.values() for b in failures(rs)]
    cuda_rows: List[Dict] = []
    cm = _cuda_module()
    if cm is not None:
        try:
            cuda_rows = cm.cuda_rows()
        except (FileNotFoundError, ImportError) as e:     # no nvcc / toolchain here
            notes.append(f"SKIPPED: CUDA rows (bench/static_sm90_cuda.py): {e}")
        else:
            bad += cm.cuda_failures(cuda_rows)
    frows = floor_rows(MODELS if not a.ci else ("B16",))
    md = markdown(by_ver, frows, cuda_rows, bad, a.title)
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    out = a.out or (None if a.ci else os.path.join(HERE, "results", "static-sm90.md"))
    if out:
        with open(out, "w") as f:
            f.write(md)
    print(md)
    for n in notes:
        print(n)
    print(f"static_sm90: {sum(len(r) for r in by_ver.values())} Triton compiles, "
          f"{len(cuda_rows)} CUDA rows, {len(bad)} failures, {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
