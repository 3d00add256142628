"""Atomic training checkpoints with full RNG state.

A checkpoint is one ``torch.save`` file written to a temporary name in the same folder,
flushed and fsync'ed, then moved into place with ``os.replace`` (atomic on POSIX): a
crash or SIGKILL while saving leaves the previous checkpoint intact.

Contents (a plain dict, loadable with ``torch.load(weights_only=True)``):
``format``, ``model`` (trainable parameters only, or the full state_dict when
``model_full`` is true), ``optimizer``, ``scheduler``, ``rng`` (python, numpy, torch CPU,
and CUDA when present), ``step`` (optimiser steps done), ``epoch`` (epoch the next step
belongs to), ``best`` (best validation metric so far), ``config`` and ``classes``.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .._io import atomic_write

__all__ = ["FORMAT", "atomic_write", "atomic_save", "load_checkpoint", "capture_rng", "restore_rng",
           "model_state", "load_model_state"]

FORMAT = "avstfp_fast.train/1"


def atomic_save(obj, path: str) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:     # a TorchScript archive, a pickle with code, a damaged file
        lines = str(e).strip().splitlines()
        raise ValueError(f"{path}: not an avstfp_fast training checkpoint (torch.load: "
                         f"{type(e).__name__}: {lines[0] if lines else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not an avstfp_fast training checkpoint "
                         f"(expected format {FORMAT!r}, got "
                         f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt)})")
    return ckpt


def capture_rng() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def model_state(model: torch.nn.Module, full: bool) -> dict:
    """Trainable parameters and the buffers outside the frozen tower (e.g. a head's
    BatchNorm statistics), by name; or the full state_dict when ``full``."""
    if full:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    out = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    out.update({n: b.detach().cpu().clone() for n, b in model.named_buffers()
                if not n.startswith("visual.")})
    return out


def load_model_state(model: torch.nn.Module, state: dict, full: bool) -> None:
    if full:
        have = model.state_dict()
        shapes = [f"{n}: checkpoint {tuple(v.shape)}, model {tuple(have[n].shape)}"
                  for n, v in state.items() if n in have and v.shape != have[n].shape]
        if shapes:
            raise ValueError(f"checkpoint model state does not fit the model (built from "
                             f"other data or options?): {'; '.join(shapes[:3])}")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint model state does not match the model: missing "
                             f"{list(missing)[:8]}, unexpected {list(unexpected)[:8]}")
        return
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    params.update(model.named_buffers())
    missing = sorted(trainable - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint trainable state does not match the model: missing "
                         f"{missing[:8]}, unexpected {unexpected[:8]}")
    with torch.no_grad():
        for n, v in state.items():
            p = params[n]
            if p.shape != v.shape:
                raise ValueError(f"checkpoint parameter {n}: expected shape {tuple(p.shape)}, "
                                 f"got {tuple(v.shape)}")
            p.copy_(v.to(p.device, p.dtype))
