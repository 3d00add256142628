"""Checks that the trainer and ``avstfp-predict`` run before any data or model work, so
that a wrong device, a backend that cannot run there or an unusable weights file is one
line at once -- not a traceback after minutes of data generation or a model build.

Each check raises ValueError (or FileNotFoundError) with a message naming the option.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["resolve_device", "check_backend_on_device", "check_weights", "preflight",
           "default_num_workers", "setup_cli_logging"]


def setup_cli_logging(level: int) -> None:
    """Command-line logging: this package's messages at ``level``, other libraries' at
    WARNING and above only (open_clip logs INFO chatter through the root logger)."""
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("avstfp_fast").setLevel(level)


def default_num_workers(cap: int = 4) -> int:
    """Data-loading processes by default: ``cap``, at most the CPU cores this process may
    use (more only make torch warn and compete for the same cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(0, min(cap, cores))


def resolve_device(device: Optional[str], option: str = "--device") -> torch.device:
    """``device`` (None: cuda if available else cpu) as a torch.device, refused in one line
    when this machine does not have it."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{option}: {device!r} is not a torch device ({e})") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option}: {device!r} requested, but CUDA is not available on "
                             f"this machine (torch {torch.__version__}: "
                             f"torch.cuda.is_available() is False); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"{option}: {device!r} requested, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{option}: {device!r} requested, but MPS (Apple GPU) is not "
                             f"available on this machine; use --device cpu")
    elif d.type != "cpu":
        raise ValueError(f"{option}: expected cpu, cuda[:N] or mps, got {device!r}")
    return d


#: ``torch.compile`` modes (``--compile-mode``); the CUDA-graph ones need a CUDA device.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_mode(mode: Optional[str], device) -> None:
    """ValueError unless ``mode`` is None or a ``torch.compile`` mode that runs on
    ``device`` (CUDA graphs -- reduce-overhead, max-autotune -- need a CUDA device)."""
    if mode is None:
        return
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode: expected one of {COMPILE_MODES}, got {mode!r}")
    dev = str(device)
    if mode in CUDA_GRAPH_MODES and not dev.startswith("cuda"):
        raise ValueError(f"compile_mode: {mode!r} captures CUDA graphs and needs a CUDA "
                         f"device, got device {dev!r}")


def check_backend_on_device(backend: str, device: torch.device,
                            option: str = "--backend") -> None:
    """A named kernel backend must be able to run on ``device`` (e.g. triton or cuda on a
    CPU-only machine is refused here, with the backend's own reasons)."""
    from ..models.prompted_clip import LITERAL_BACKEND, check_model_backend
    from ..ops.backends import AUTO, get_backend
    from ..ops.contract import AttnProblem
    check_model_backend(backend, option.lstrip("-"))
    if backend in (AUTO, LITERAL_BACKEND):     # the literal layers call no op backend
        return
    try:
        b = get_backend(backend)
    except ImportError as e:
        raise ValueError(f"{option}: {backend!r} is not available: {e}") from None
    if device.type == "cuda":       # GPU limits (capability, extension) are checked at use
        return
    q = torch.zeros(1, 4, 64, device=device)
    why = b.why_not(AttnProblem(q=q, k=q, v=q, prompt_k=(None,), prompt_v=(None,),
                                q_segments=(4,), k_segments=(4,), scale=0.125))
    if why:
        raise ValueError(f"{option}: {backend!r} cannot run on {device}: {why}")


def check_weights(backbone: str, pretrained) -> None:
    """The tower weights ``pretrained`` (a file or an open_clip tag) are readable and fit
    ``backbone`` (activation, shapes); read once, the model build reuses them."""
    if backbone == "tiny":
        if pretrained:
            raise ValueError("--pretrained: the 'tiny' backbone is random; drop --pretrained")
        return
    from ..models.backbone import check_pretrained
    check_pretrained(backbone, pretrained)


def preflight(cfg) -> torch.device:
    """All checks for a TrainConfig, in the order a user would want them; returns the
    device."""
    device = resolve_device(cfg.device)
    check_backend_on_device(cfg.backend, device)
    if cfg.compile_mode is not None:
        check_compile_mode(cfg.compile_mode, device)
    if cfg.resume:
        from .checkpoint import load_checkpoint
        load_checkpoint(cfg.resume)          # exists and is a training checkpoint
    check_weights(cfg.backbone, cfg.pretrained)
    return device
