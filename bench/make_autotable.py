"""Build ``avstfp_fast/ops/autotable.json`` (the order ``backend="auto"`` tries cuda/triton).

Input: a benchmark JSON written by the bench suite on a GPU: a list of records (or a dict
with a "records" list) of the form ``{"case": str, "backend": str, "stage": str,
"median_s": float}``; other keys are ignored.  A record may carry ``"class"`` ("short" or
"long", see :func:`avstfp_fast.ops.autotable.shape_class`); otherwise the stage decides:
``temporal`` -> short (10 frames), anything else (spatial, fusion) -> long.

Rule: per shape class, over the cases measured with BOTH cuda and triton, take the
geometric mean of median_s(cuda) / median_s(triton); below 1 the order is
["cuda", "triton"], else ["triton", "cuda"].  Classes without such a pair get no entry
(autotable.py then uses its documented default).  The evidence is kept in the JSON.

Usage::

    python bench/make_autotable.py bench_results.json [-o avstfp_fast/ops/autotable.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "avstfp_fast", "ops", "autotable.json")
BACKENDS = ("cuda", "triton")


def shape_class(rec: dict) -> str:
    return rec.get("class") or ("short" if rec.get("stage") == "temporal" else "long")


def make_table(records) -> dict:
    if isinstance(records, dict):
        records = records.get("records", [])
    times = defaultdict(dict)            # (class, case, stage) -> {backend: seconds}
    for r in records:
        if r.get("backend") in BACKENDS and r.get("median_s"):
            times[(shape_class(r), r.get("case"), r.get("stage"))][r["backend"]] = float(r["median_s"])
    logs = defaultdict(list)
    for (cls, _case, _stage), t in times.items():
        if all(b in t for b in BACKENDS):
            logs[cls].append(math.log(t["cuda"] / t["triton"]))
    order, evidence = {}, {}
    for cls, ls in sorted(logs.items()):
        gm = math.exp(sum(ls) / len(ls))
        order[cls] = ["cuda", "triton"] if gm < 1.0 else ["triton", "cuda"]
        evidence[cls] = {"cases": len(ls), "geomean_cuda_over_triton": round(gm, 4)}
    return {"order": order, "evidence": evidence}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", help="benchmark JSON (list of {case, backend, stage, median_s})")
    ap.add_argument("-o", "--out", default=DEFAULT_OUT, help="autotable JSON to write")
    a = ap.parse_args(argv)
    with open(a.results) as f:
        table = make_table(json.load(f))
    table["source"] = os.path.basename(a.results)
    with open(a.out, "w") as f:
        json.dump(table, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps(table, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
