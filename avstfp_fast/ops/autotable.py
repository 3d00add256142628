"""How ``backend="auto"`` orders the GPU kernel backends.

The order comes from a measured table (``autotable.json`` beside this file, written by
``bench/make_autotable.py`` from a GPU benchmark run): for each stage-like shape class it
records which of ``cuda``/``triton`` was faster.  Without a table entry for a shape class
the order is ``triton`` first (the backend that needs no compiled extension) — this is a
default, not a measurement, and ``explain()`` says so.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import List, Optional

_PATH = os.path.join(os.path.dirname(__file__), "autotable.json")
DEFAULT = ["triton", "cuda"]


@lru_cache(maxsize=1)
def _table() -> dict:
    if not os.path.exists(_PATH):
        return {}
    with open(_PATH) as f:
        return json.load(f).get("order", {})


def shape_class(p) -> str:
    """Bucket a problem: short sequences (temporal stage) vs long (spatial/fusion)."""
    if p is None:
        return "any"
    lq = max(p.q_segments)
    return "short" if lq <= 32 else "long"


def gpu_preference(p=None) -> List[str]:
    order = _table().get(shape_class(p))
    return list(order) if order else list(DEFAULT)


def source(p=None) -> Optional[str]:
    return "measured" if _table().get(shape_class(p)) else "default (no measurement)"
