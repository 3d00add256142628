#!/usr/bin/env python3
"""Turn benchmark results into Markdown tables and a PNG plot.

    python bench/summarize.py RESULTS.json [MORE.json|PARTIAL.jsonl ...] \
        [--md OUT.md] [--png OUT.png] [--merged OUT.json] [--quiet]

Inputs are pytest-benchmark JSON files (``--benchmark-json``) written by this suite and/or
the JSON-lines files of ``--bench-partial`` (used when a run was cut short).  Cases are
recognised by ``extra_info["kind"]`` ("kernel", "e2e", "cpu").  Times are medians per call.

Output: the targets (PASS/MISS), kernel time / speedup / roofline / memory tables, the
end-to-end training-step and inference tables, the CPU case, and a PNG with three panels.
Needs only the standard library (and matplotlib, Agg backend, for the PNG).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict, defaultdict

from names import CONTENDERS as KERNEL_COLS, OURS, PEERS

STAGE_ORDER = {"temporal": 0, "spatial": 1, "fusion": 2}
ARCH_ORDER = {"tiny": 0, "small": 1, "B16": 2, "L14": 3}
SDPA_TARGET = {"temporal": 2.0, "spatial": 1.5, "fusion": 1.5}
TRAIN_VS_EAGER, TRAIN_VS_COMPILED, MEM_RATIO, FLOOR_RATIO, CPU_RATIO = 2.0, 1.3, 0.6, 1.5, 1.3
E2E_VARIANTS = ("reference-eager", "reference-compiled", "torch-eager", "torch-compiled",
                "triton-eager", "triton-compiled", "cuda-eager", "cuda-compiled")


# --------------------------------------------------------------------------- loading
def load(paths):
    """-> (benchmarks, meta).  Later files do not override cases already loaded from a
    complete JSON; partial JSONL records fill in cases a JSON lacks; their skip records
    (node id -> reason) land in meta["skipped"]."""
    full, partial, meta, skipped = OrderedDict(), OrderedDict(), {}, OrderedDict()
    for p in paths:
        if p.endswith(".jsonl"):
            with open(p) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    rec = json.loads(line)
                    if rec.get("skipped"):
                        skipped[rec["fullname"]] = rec["reason"]
                        continue
                    partial[rec.get("fullname") or rec.get("name")] = rec
                    if rec.get("avstfp") and not meta.get("ceilings"):
                        meta.update({k: v for k, v in rec["avstfp"].items() if v})
            continue
        with open(p) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            full.setdefault(b.get("fullname") or b["name"], b)
        av = data.get("avstfp") or {}
        for k, v in av.items():
            if v and not meta.get(k):
                meta[k] = v
        if "machine_info" in data and "machine_info" not in meta:
            meta["machine_info"] = data["machine_info"]
        if "datetime" in data and "datetime" not in meta:
            meta["datetime"] = data["datetime"]
        ci = data.get("commit_info") or {}
        if ci.get("id") and "commit" not in meta:
            meta["commit"] = ci["id"][:10] + (" (dirty)" if ci.get("dirty") else "")
    for k, v in partial.items():
        full.setdefault(k, v)
    meta["skipped"] = {k: v for k, v in skipped.items() if k not in full}
    return list(full.values()), meta


def median(b):
    s = (b or {}).get("stats") or {}
    return s.get("median")


def smin(b):
    s = (b or {}).get("stats") or {}
    return s.get("min")


# --------------------------------------------------------------------------- formatting
def fmt_us(t):
    if t is None:
        return "—"
    us = t * 1e6
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"


def fmt_ms(t):
    return "—" if t is None else (f"{t * 1e3:.2f}" if t < 0.1 else f"{t * 1e3:.1f}")


def fmt_x(r):
    return "—" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def fmt_mib(b):
    return "—" if b is None else f"{b / 2 ** 20:.0f}"


def fmt_pct(r):
    return "—" if r is None or not math.isfinite(r) else f"{100 * r:.0f}%"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def verdict(ok):
    return "N/A" if ok is None else ("PASS" if ok else "MISS")


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


# --------------------------------------------------------------------------- analysis
def _rows(benchmarks, kind, key, cell, order):
    """The benchmarks of one ``extra_info`` kind as {key(e): {e[cell]: benchmark}}, sorted
    by ``order(key)``."""
    rows = defaultdict(dict)
    for b in benchmarks:
        e = b.get("extra_info") or {}
        if e.get("kind") == kind:
            rows[key(e)][e[cell]] = b
    return OrderedDict(sorted(rows.items(), key=lambda kv: order(kv[0])))


def kernel_rows(benchmarks):
    """{(stage, arch, batch, dtype, passes): {contender: benchmark}}"""
    return _rows(benchmarks, "kernel",
                 lambda e: (e["stage"], e["arch"], int(e["batch"]), e["dtype"], e["passes"]),
                 "contender",
                 lambda k: (k[4] != "fwdbwd", k[3], ARCH_ORDER.get(k[1], 9), k[2],
                            STAGE_ORDER.get(k[0], 9)))


def best_ours(cells, fallback=False):
    """(time, name) of the faster of ours-triton / ours-cuda; with ``fallback``, the pure
    PyTorch backend stands in when neither kernel backend was measured (CPU runs)."""
    cands = [(median(cells[c]), c) for c in OURS if c in cells and median(cells[c])]
    if not cands and fallback and "ours-torch" in cells and median(cells["ours-torch"]):
        cands = [(median(cells["ours-torch"]), "ours-torch")]
    return min(cands) if cands else (None, None)


def e2e_rows(benchmarks):
    """{(mode, arch, batch): {variant: benchmark}}"""
    return _rows(benchmarks, "e2e", lambda e: (e["mode"], e["arch"], int(e["batch"])),
                 "variant", lambda k: (k[0] != "train", ARCH_ORDER.get(k[1], 9), k[2]))


def best_fast(cells):
    """The fastest variant using a fast kernel backend (triton or cuda; eager or compiled)."""
    cands = [(median(b), v) for v, b in cells.items()
             if v.split("-")[0] in ("triton", "cuda") and median(b)]
    return min(cands) if cands else (None, None)


def cpu_rows(benchmarks):
    """{(arch, batch): {backend: benchmark}}"""
    return _rows(benchmarks, "cpu", lambda e: (e["arch"], int(e["batch"])), "backend",
                 lambda k: ARCH_ORDER.get(k[0], 9))


def case_name(key):
    stage, arch, batch, dtype, passes = key
    return f"{stage} {arch} B={batch} {dtype} {'fwd+bwd' if passes == 'fwdbwd' else 'fwd'}"


# --------------------------------------------------------------------------- report
def _e(b):
    return (b or {}).get("extra_info") or {}


def _floor(cells):
    return next((_e(b).get("floor_s") for b in cells.values()), None)


def header(meta):
    """Title, versions, the measured ceilings, what the times mean."""
    ce = meta.get("ceilings") or {}
    md = ["# AV-STFP benchmark summary\n"]
    info = [f"device: {meta.get('device') or ce.get('device', '?')}",
            f"torch {meta.get('torch', '?')}", f"triton {meta.get('triton') or '—'}",
            f"xformers {meta.get('xformers') or 'not installed'}",
            f"size: {meta.get('size', '?')}"]
    if meta.get("datetime"):
        info.append(f"date: {meta['datetime'][:19]}")
    if meta.get("commit"):
        info.append(f"commit: {meta['commit']}")
    md.append(" · ".join(info) + "\n")
    if ce:
        g = ce["gemm_flops"]
        rate = f"{g / 1e12:.1f} TFLOP/s" if g >= 1e12 else f"{g / 1e9:.1f} GFLOP/s"
        md.append(f"Measured in the same run: device-to-device copy **{ce['copy_Bps'] / 1e9:.1f} GB/s** "
                  f"(bytes read + written), {ce.get('gemm_dtype', '')} GEMM "
                  f"{ce.get('gemm_n', '')}³ **{rate}**.\n")
    md.append("Times are medians per call. Every kernel contender starts from the packed QKV "
              "buffer (B, M, N, 3, H, d) and delivers (B, M, N, H·d); fwd+bwd also produces "
              "the gradients of that buffer and of the prompts. \"ours\" = the faster of the "
              "triton and cuda backends.\n")
    return md


def kernel_targets(kr):
    """ours vs SDPA-over-cat (fwd+bwd) and vs xformers / FlexAttention, per kernel case."""
    targets = []
    for key, cells in kr.items():
        stage, arch, batch, dtype, passes = key
        t_ours, which = best_ours(cells)
        if passes == "fwdbwd" and "sdpa" in cells:
            need = SDPA_TARGET.get(stage, 1.5)
            r = ratio(median(cells["sdpa"]), t_ours)
            targets.append((f"ours ≥ {need}x SDPA-over-cat (fwd+bwd)", case_name(key),
                            fmt_x(r), verdict(None if r is None else r >= need)))
        peers = {p: median(cells[p]) for p in ("xformers-cat", "xformers-split", "flex")
                 if p in cells and median(cells[p])}
        if peers:
            worst = min(peers.values())
            r = ratio(worst, t_ours)
            who = min(peers, key=peers.get)
            targets.append(("ours faster than xformers and FlexAttention", case_name(key),
                            f"{fmt_x(r)} vs {who}", verdict(None if r is None else r > 1.0)))
    return targets


def e2e_targets(er):
    """Training step vs the eager and compiled reference, its memory, its floor."""
    targets = []
    for (mode, arch, batch), cells in er.items():
        if mode != "train":
            continue
        t_fast, v_fast = best_fast(cells)
        name = f"{arch} B={batch} ({v_fast or 'no fast backend'})"
        ref_e = cells.get("reference-eager")
        ref_c = cells.get("reference-compiled")
        r = ratio(median(ref_e) if ref_e else None, t_fast)
        targets.append((f"training step ≥ {TRAIN_VS_EAGER}x eager reference", name, fmt_x(r),
                        verdict(None if r is None else r >= TRAIN_VS_EAGER)))
        r = ratio(median(ref_c) if ref_c else None, t_fast)
        targets.append((f"training step ≥ {TRAIN_VS_COMPILED}x compiled reference", name,
                        fmt_x(r), verdict(None if r is None else r >= TRAIN_VS_COMPILED)))
        if v_fast and ref_e:
            r = ratio(_e(cells[v_fast]).get("peak_mem"), _e(ref_e).get("peak_mem"))
            targets.append((f"peak training memory ≤ {MEM_RATIO}x eager reference", name,
                            fmt_x(r), verdict(None if r is None else r <= MEM_RATIO)))
        if v_fast:
            r = ratio(t_fast, _e(cells[v_fast]).get("floor_s"))
            targets.append((f"step time ≤ {FLOOR_RATIO}x floor", name, fmt_x(r),
                            verdict(None if r is None else r <= FLOOR_RATIO)))
    return targets


def cpu_targets(cr):
    """torch vs reference backend, forward+backward on the CPU."""
    targets = []
    for (arch, batch), cells in cr.items():
        r = ratio(median(cells["reference"]) if "reference" in cells else None,
                  median(cells["torch"]) if "torch" in cells else None)
        targets.append((f"CPU fwd+bwd: torch ≥ {CPU_RATIO}x reference", f"{arch} B={batch}",
                        fmt_x(r), verdict(None if r is None else r >= CPU_RATIO)))
    return targets


def targets_section(targets):
    md = ["## Targets\n"]
    if not targets:
        return md + ["No cases with targets in these results.\n"]
    n_pass = sum(t[3] == "PASS" for t in targets)
    n_miss = sum(t[3] == "MISS" for t in targets)
    md.append(f"{n_pass} PASS, {n_miss} MISS, {len(targets) - n_pass - n_miss} N/A "
              f"(N/A: a side of the comparison was not measured).\n")
    md.append(table(["target", "case", "measured", "verdict"], targets) + "\n")
    return md


def kernel_columns(kr):
    """The contenders measured in at least one kernel case, in report order."""
    return [c for c in KERNEL_COLS if any(c in cells for cells in kr.values())]


def kernel_times(kr, cols):
    rows = [[case_name(key)] + [fmt_us(median(cells[c])) if c in cells else "—" for c in cols]
            + [fmt_us(_floor(cells))] for key, cells in kr.items()]
    return ["## Kernels: median time per call (µs)\n",
            table(["case"] + cols + ["floor"], rows) + "\n"]


def kernel_speedups(kr, cols):
    peers = [c for c in PEERS + ("ours-torch",) if c in cols]
    if not any(c in cols for c in OURS) and "ours-torch" in peers:
        peers.remove("ours-torch")          # it is "ours" here
    rows = []
    for key, cells in kr.items():
        t, which = best_ours(cells, fallback=True)
        rows.append([case_name(key), which or "—"] +
                    [fmt_x(ratio(median(cells[p]), t)) if p in cells else "—" for p in peers])
    return ["## Kernels: speedup of ours over each peer (peer time / ours)\n",
            table(["case", "ours"] + peers, rows) + "\n"]


def kernel_roofline(kr):
    """Floor ingredients per case (min bytes, useful and executed FLOPs) and how close
    ours and SDPA come to the floor."""
    rows = []
    for key, cells in kr.items():
        e = _e(next(iter(cells.values())))
        fl, by, fo, ex = e.get("floor_s"), e.get("bytes"), e.get("flops"), e.get("executed_flops")
        t, which = best_ours(cells, fallback=True)
        t_s = median(cells["sdpa"]) if "sdpa" in cells else None
        bw = ratio(by, t)
        rows.append([case_name(key), f"{by / 1e6:.1f}" if by else "—",
                     f"{fo / 1e9:.2f}" if fo else "—", f"{ex / 1e9:.2f}" if ex else "—",
                     fmt_x(ratio(ex, fo)), fmt_us(fl), fmt_us(t),
                     f"{bw / 1e9:.0f}" if bw else "—",
                     fmt_pct(ratio(bw, e.get("copy_Bps"))), fmt_pct(ratio(fl, t)),
                     fmt_pct(ratio(fl, t_s))])
    return ["## Kernels: roofline (floor = max(min bytes / copy BW, executed FLOPs / GEMM rate))\n",
            "Fraction = floor / measured time (1.0 = at the floor). Min bytes and useful FLOPs "
            "as in docs/design.md, \"Floors: bytes and FLOPs\" (roofline.kernel_cost); executed "
            "FLOPs are those of the triton kernels, tile padding and backward recomputation "
            "included (roofline.executed_flops), so a peer that pads less can pass the floor "
            "(fraction > 100%); results without them used the useful FLOPs.\n",
            table(["case", "MB", "useful GFLOP", "executed GFLOP", "executed / useful",
                   "floor µs", "ours µs", "ours GB/s", "ours % copy BW", "ours fraction",
                   "sdpa fraction"], rows) + "\n"]


def kernel_fractions(kr, cols):
    rows = [[case_name(key)] + [fmt_pct(ratio(_floor(cells), median(cells[c])))
                                if c in cells else "—" for c in cols]
            for key, cells in kr.items()]
    return ["## Kernels: fraction of the floor reached by each contender (floor / time)\n",
            table(["case"] + cols, rows) + "\n"]


def kernel_memory(kr, cols):
    rows = [[case_name(key)] + [fmt_mib(_e(cells[c]).get("peak_mem_delta")) if c in cells
                                else "—" for c in cols]
            for key, cells in kr.items()]
    return ["## Kernels: memory of one call (MiB: peak max_memory_allocated minus what "
            "was allocated before the call: outputs, saved tensors, workspace, gradients)\n",
            table(["case"] + cols, rows) + "\n"]


def e2e_training(er):
    amps = sorted({_e(b).get("autocast", "?") for c in er.values() for b in c.values()})
    rows = []
    for (mode, arch, batch), cells in er.items():
        if mode != "train":
            continue
        ref_e = median(cells["reference-eager"]) if "reference-eager" in cells else None
        ref_c = median(cells["reference-compiled"]) if "reference-compiled" in cells else None
        mem_r = _e(cells.get("reference-eager")).get("peak_mem")
        for v in E2E_VARIANTS:
            if v not in cells:
                continue
            e = _e(cells[v])
            t = median(cells[v])
            rows.append([f"{arch} B={batch}", v, fmt_ms(t), fmt_x(ratio(ref_e, t)),
                         fmt_x(ratio(ref_c, t)), fmt_mib(e.get("peak_mem")),
                         fmt_x(ratio(e.get("peak_mem"), mem_r)), fmt_ms(e.get("floor_s")),
                         fmt_x(ratio(t, e.get("floor_s"))),
                         f"{e['compile_s']:.0f}" if e.get("compile_s") else "—"])
    return [f"## End to end: training step (forward, backward, Adam), autocast "
            f"{'/'.join(amps)}\n",
            table(["model", "variant", "step ms", "vs ref eager", "vs ref compiled",
                   "peak MiB", "mem / ref eager", "floor ms", "step / floor",
                   "compile s"], rows) + "\n",
            "Floor = GEMM FLOPs (projections, MLP, patch embedding, attention products; "
            "input gradients only, the backbone is frozen) at the measured GEMM rate "
            "+ minimum bytes (weights once per pass, inputs, attention floor bytes) at "
            "the measured copy bandwidth.\n"]


def e2e_inference(er):
    rows = []
    for (mode, arch, batch), cells in er.items():
        if mode != "infer":
            continue
        ref_e = median(cells["reference-eager"]) if "reference-eager" in cells else None
        for v in E2E_VARIANTS:
            if v not in cells:
                continue
            e = _e(cells[v])
            t = median(cells[v])
            rows.append([f"{arch} B={batch}", v, fmt_ms(t),
                         f"{batch / t:.1f}" if t else "—", fmt_x(ratio(ref_e, t)),
                         fmt_mib(e.get("peak_mem")), fmt_x(ratio(t, e.get("floor_s")))])
    if not rows:
        return []
    return ["## End to end: inference (forward, no grad), clips/s\n",
            table(["model", "variant", "ms", "clips/s", "vs ref eager", "peak MiB",
                   "time / floor"], rows) + "\n"]


def cpu_section(cr):
    rows = []
    for (arch, batch), cells in cr.items():
        e = _e(next(iter(cells.values())))
        tr = median(cells["reference"]) if "reference" in cells else None
        tt = median(cells["torch"]) if "torch" in cells else None
        r = ratio(tr, tt)
        r_min = ratio(smin(cells.get("reference")), smin(cells.get("torch")))
        rows.append([arch, f"D={e.get('width')} L={e.get('layers')} H={e.get('heads')} "
                           f"N={e.get('tokens')} M={e.get('frames')}", batch,
                     f"{e.get('threads', '—')} / {e.get('timer', 'wall')}",
                     fmt_ms(tr), fmt_ms(tt), fmt_x(r), fmt_x(r_min),
                     verdict(None if r is None else r >= CPU_RATIO)])
    return ["## CPU: forward+backward of a small PromptedCLIP, fp32, reference vs torch\n",
            table(["model", "config", "B", "threads / timer", "reference ms (median)",
                   "torch ms (median)", "ratio (medians)", "ratio (minima)",
                   f"≥ {CPU_RATIO}x (medians)"], rows) + "\n",
            "On a shared machine the minima are the better estimate of uncontended "
            "speed; the verdict uses the medians.\n"]


def skipped_section(skipped):
    """Cases that did not run, grouped by reason."""
    if not skipped:
        return []
    by = defaultdict(list)
    for node, reason in skipped.items():
        by[reason].append(node.split("[", 1)[-1].rstrip("]"))
    rows = [[len(v), reason.replace("|", "/"), ", ".join(v[:3]) + (" …" if len(v) > 3 else "")]
            for reason, v in sorted(by.items(), key=lambda kv: -len(kv[1]))]
    return [f"## Cases not run ({len(skipped)})\n", table(["cases", "reason", "e.g."], rows) + "\n"]


def build(benchmarks, meta):
    """-> (Markdown text, targets): the report's sections in order."""
    kr, er, cr = kernel_rows(benchmarks), e2e_rows(benchmarks), cpu_rows(benchmarks)
    targets = kernel_targets(kr) + e2e_targets(er) + cpu_targets(cr)
    md = header(meta) + targets_section(targets)
    if kr:
        cols = kernel_columns(kr)
        md += (kernel_times(kr, cols) + kernel_speedups(kr, cols) + kernel_roofline(kr)
               + kernel_fractions(kr, cols) + kernel_memory(kr, cols))
    if er:
        md += e2e_training(er) + e2e_inference(er)
    if cr:
        md += cpu_section(cr)
    md += skipped_section(meta.get("skipped"))
    return "\n".join(md), targets


# --------------------------------------------------------------------------- plot
def plot(benchmarks, path):
    """A PNG with three panels: kernel speedups, training-step times, the CPU ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 6), gridspec_kw={"width_ratios": [3, 2, 1]})
    plot_kernel_speedups(axes[0], benchmarks)
    plot_training_steps(axes[1], benchmarks)
    plot_cpu_ratio(axes[2], benchmarks)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grouped_bars(ax, series, labels, **label_kw):
    """One bar group per label, one bar per series entry ({name: [value or None per
    label]}; None and 0 draw nothing), with a legend."""
    w = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        xs = [j + i * w for j, v in enumerate(vals) if v]
        ax.bar(xs, [v for v in vals if v], width=w, label=name)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, **label_kw)
    ax.legend(fontsize=7)


def plot_kernel_speedups(ax, benchmarks):
    """Kernels fwd+bwd: speedup of ours over each peer."""
    kr = [(k, c) for k, c in kernel_rows(benchmarks).items() if k[4] == "fwdbwd"]
    peers = [p for p in ("sdpa", "xformers-cat", "xformers-split", "flex", "naive")
             if any(p in c for _, c in kr)]
    labels, series = [], {p: [] for p in peers}
    for key, cells in kr:
        t, _ = best_ours(cells)
        labels.append(f"{key[0][:4]} {key[1]} b{key[2]} {key[3]}")
        for p in peers:
            series[p].append(ratio(median(cells[p]), t) if p in cells else None)
    if labels and any(v for s in series.values() for v in s if v):
        _grouped_bars(ax, {f"vs {p}": series[p] for p in peers}, labels, rotation=70,
                      fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speedup of ours (peer time / ours)")
    else:
        ax.text(0.5, 0.5, "no kernel fwd+bwd results with ours", ha="center", va="center")
    ax.set_title("kernels, fwd+bwd")


def plot_training_steps(ax, benchmarks):
    er = [(k, c) for k, c in e2e_rows(benchmarks).items() if k[0] == "train"]
    if er:
        variants = [v for v in E2E_VARIANTS if any(v in c for _, c in er)]
        series = {v: [median(c[v]) * 1e3 if v in c and median(c[v]) else None for _, c in er]
                  for v in variants}
        _grouped_bars(ax, series, [f"{k[1]} B={k[2]}" for k, _ in er], fontsize=8)
        ax.set_ylabel("training step, ms")
    else:
        ax.text(0.5, 0.5, "no end-to-end results", ha="center", va="center")
    ax.set_title("training step (bf16 autocast)")


def plot_cpu_ratio(ax, benchmarks):
    xs, ys, names = [], [], []
    for j, ((arch, batch), cells) in enumerate(cpu_rows(benchmarks).items()):
        r = ratio(median(cells.get("reference")) if "reference" in cells else None,
                  median(cells.get("torch")) if "torch" in cells else None)
        if r:
            xs.append(j)
            ys.append(r)
            names.append(f"{arch} B={batch}")
    if ys:
        ax.bar(xs, ys, color="tab:green")
        ax.axhline(CPU_RATIO, color="r", ls="--", lw=1, label=f"target {CPU_RATIO}x")
        ax.set_xticks(xs)
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylabel("reference time / torch time")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no CPU results", ha="center", va="center")
    ax.set_title("CPU fwd+bwd")


def autotable_records(benchmarks):
    """Kernel timings of our two kernel backends in the record format that
    bench/make_autotable.py reads: {"case", "backend", "stage", "median_s"}."""
    out = []
    for b in benchmarks:
        e = b.get("extra_info") or {}
        c = e.get("contender", "")
        med = median(b)
        if e.get("kind") != "kernel" or c not in OURS or not med:
            continue
        out.append({"case": f"{e['stage']} {e['arch']} B={e['batch']} {e['dtype']} {e['passes']}",
                    "backend": c.split("-", 1)[1], "stage": e["stage"], "median_s": med})
    return out


def merged_json(benchmarks, meta):
    return {"avstfp": {k: v for k, v in meta.items() if k not in ("machine_info", "datetime")},
            "commit_info": {"id": meta.get("commit")},
            # (avstfp.skipped: node id -> reason of every case that did not run)
            "machine_info": meta.get("machine_info", {}), "datetime": meta.get("datetime"),
            "benchmarks": benchmarks,
            "records": autotable_records(benchmarks)}   # input of bench/make_autotable.py


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="pytest-benchmark JSON and/or partial .jsonl files")
    ap.add_argument("--md", help="write the Markdown summary here")
    ap.add_argument("--png", help="write the plot here")
    ap.add_argument("--merged", help="write all loaded cases as one JSON here")
    ap.add_argument("--quiet", action="store_true", help="do not print the Markdown")
    a = ap.parse_args(argv)
    paths = [p for p in a.inputs if os.path.exists(p)]
    missing = [p for p in a.inputs if not os.path.exists(p)]
    for p in missing:
        print(f"[summarize] no such file, skipped: {p}", file=sys.stderr)
    benchmarks, meta = load(paths)
    text, _ = build(benchmarks, meta)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text + "\n")
    if a.merged:
        with open(a.merged, "w") as f:
            json.dump(merged_json(benchmarks, meta), f, indent=1, default=str)
    if a.png:
        try:
            plot(benchmarks, a.png)
        except Exception as e:          # a plot must never hide the tables
            print(f"[summarize] plot failed: {type(e).__name__}: {e}", file=sys.stderr)
    if not a.quiet:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
