"""bench/summarize.py on a small fake pytest-benchmark JSON (no GPU, no timing)."""
from __future__ import annotations

import json
import os

import summarize

CEIL = {"copy_Bps": 3.0e12, "gemm_flops": 7.5e14, "gemm_dtype": "bfloat16", "gemm_n": 8192,
        "device": "FAKE GPU"}


def _b(group, name, median, extra, mn=None):
    return {"group": group, "name": name, "fullname": f"bench/x.py::{name}",
            "extra_info": extra,
            "stats": {"median": median, "min": mn or median, "mean": median, "rounds": 3}}


def _kernel(stage, contender, t, passes="fwdbwd", peak=100 << 20):
    e = dict(kind="kernel", stage=stage, arch="B16", batch=8, dtype="bf16", passes=passes,
             contender=contender, bytes=3e8, flops=1e10, executed_flops=2.5e10, floor_s=1e-4,
             copy_Bps=3e12,
             peak_mem=peak + (1 << 30), peak_mem_delta=peak)
    return _b(f"kernel {stage}", f"test_kernel[{stage}-{passes}-{contender}]", t, e)


def _e2e(variant, t, peak, mode="train"):
    backend, how = variant.split("-")
    e = dict(kind="e2e", mode=mode, arch="B16", batch=8, variant=variant, backend=backend,
             compiled=how == "compiled", peak_mem=peak, floor_s=0.02, autocast="bf16",
             compile_s=30.0 if how == "compiled" else None)
    return _b(f"e2e {mode}", f"test_e2e[{mode}-{variant}]", t, e)


def _cpu(backend, t, mn):
    e = dict(kind="cpu", arch="small", batch=2, backend=backend, threads=2, width=256,
             layers=4, heads=4, tokens=99, frames=10)
    return _b("cpu", f"test_cpu[{backend}]", t, e, mn)


def _fake(tmp_path):
    benches = [
        # temporal: ours 2.5x sdpa (PASS), faster than xformers and flex (PASS)
        _kernel("temporal", "ours-triton", 100e-6), _kernel("temporal", "ours-cuda", 120e-6),
        _kernel("temporal", "sdpa", 250e-6), _kernel("temporal", "xformers-cat", 300e-6),
        _kernel("temporal", "flex", 400e-6),
        # spatial: ours 1.2x sdpa (MISS), slower than flex (MISS)
        _kernel("spatial", "ours-cuda", 100e-6), _kernel("spatial", "sdpa", 120e-6),
        _kernel("spatial", "flex", 90e-6),
        _kernel("fusion", "ours-triton", 50e-6, passes="fwd"),
        _kernel("fusion", "sdpa", 80e-6, passes="fwd"),
        # training: triton-eager 0.05 s vs ref eager 0.12 (2.4x PASS), ref compiled 0.06
        # (1.2x MISS); memory 500/1000 (PASS); floor 0.02 -> 2.5x (MISS)
        _e2e("reference-eager", 0.12, 1000 << 20), _e2e("reference-compiled", 0.06, 900 << 20),
        _e2e("triton-eager", 0.05, 500 << 20), _e2e("triton-eager", 0.01, 300 << 20, "infer"),
        _e2e("reference-eager", 0.03, 400 << 20, "infer"),
        _cpu("reference", 0.30, 0.25), _cpu("torch", 0.20, 0.15),
    ]
    js = {"machine_info": {"node": "x"}, "datetime": "2026-11-28T00:00:00",
          "benchmarks": benches,
          "avstfp": {"size": "short", "ceilings": CEIL, "torch": "2.11", "device": "FAKE GPU"}}
    p = tmp_path / "res.json"
    p.write_text(json.dumps(js))
    # a partial JSONL adds one more case (the cut-short run's record format)
    rec = _kernel("spatial", "xformers-split", 200e-6)
    rec["avstfp"] = {"ceilings": CEIL, "size": "short"}
    q = tmp_path / "part.jsonl"
    q.write_text(json.dumps(rec) + "\n")
    return str(p), str(q)


def test_summarize_tables_targets_plot(tmp_path, capsys):
    p, q = _fake(tmp_path)
    md, png, merged = (str(tmp_path / n) for n in ("s.md", "s.png", "m.json"))
    assert summarize.main([p, q, "--md", md, "--png", png, "--merged", merged]) == 0
    out = capsys.readouterr().out
    text = open(md).read()
    assert out.strip() == text.strip()
    assert "FAKE GPU" in text and "3000.0 GB/s" in text and "750.0 TFLOP/s" in text
    lines = text.splitlines()

    def row(*needles):
        hits = [ln for ln in lines if all(n in ln for n in needles)]
        assert hits, f"no line with {needles}"
        return hits[0]
    assert "2.50x" in row("2.0x SDPA", "temporal B16 B=8 bf16 fwd+bwd") and \
        "PASS" in row("2.0x SDPA", "temporal B16 B=8 bf16 fwd+bwd")
    assert "MISS" in row("1.5x SDPA", "spatial B16 B=8 bf16 fwd+bwd")
    assert "PASS" in row("xformers and FlexAttention", "temporal")
    assert "MISS" in row("xformers and FlexAttention", "spatial")
    assert "PASS" in row("2.0x eager reference", "triton-eager") and "2.40x" in row("2.0x eager")
    assert "MISS" in row("1.3x compiled reference")
    assert "PASS" in row("0.6x eager reference") and "0.50x" in row("0.6x eager reference")
    assert "MISS" in row("1.5x floor") and "2.50x" in row("1.5x floor")
    assert "PASS" in row("CPU fwd+bwd", "small B=2") and "1.50x" in row("CPU fwd+bwd")
    # tables: time, speedups (peer / ours), roofline, memory, e2e, inference, CPU
    assert "100" in row("temporal B16 B=8 bf16 fwd+bwd", "250")
    assert "2.00x" in row("spatial B16 B=8 bf16 fwd+bwd", "ours-cuda", "1.20x")   # xformers-split
    frac = text.split("## Kernels: fraction")[1].split("##")[0]
    assert "| temporal B16 B=8 bf16 fwd+bwd | 100% | 83% |" in frac     # triton, cuda
    assert "## Kernels: roofline" in text and "## Kernels: memory of one call" in text
    assert "| 100 | 100 |" in row("temporal B16 B=8 bf16 fwd+bwd | 100 | 100")   # delta, MiB
    assert "100%" in row("temporal B16 B=8 bf16 fwd+bwd", "300.0")    # floor == ours time
    roof = text.split("## Kernels: roofline")[1].split("##")[0]
    assert "| temporal B16 B=8 bf16 fwd+bwd | 300.0 | 10.00 | 25.00 | 2.50x | 100 |" in roof
    assert "clips/s" in text and "800.0" in row("triton-eager", "10.00")  # 8 clips / 10 ms
    assert "1.67x" in row("small", "D=256")                            # ratio of minima
    assert os.path.getsize(png) > 10_000
    m = json.load(open(merged))
    assert len(m["benchmarks"]) == 18 and m["avstfp"]["ceilings"]["copy_Bps"] == 3e12
    # records for bench/make_autotable.py: ours-triton / ours-cuda kernel medians
    recs = m["records"]
    assert {(r["stage"], r["backend"]) for r in recs} == {
        ("temporal", "triton"), ("temporal", "cuda"), ("spatial", "cuda"), ("fusion", "triton")}
    import make_autotable
    t = make_autotable.make_table(m)
    assert t["order"] == {"short": ["triton", "cuda"]}      # only temporal has both backends


def test_summarize_empty_and_missing(tmp_path, capsys):
    p = tmp_path / "empty.json"
    p.write_text(json.dumps({"benchmarks": []}))
    png = str(tmp_path / "e.png")
    assert summarize.main([str(p), str(tmp_path / "nope.json"), "--png", png]) == 0
    out = capsys.readouterr().out
    assert "No cases with targets" in out
    assert os.path.exists(png)
