"""torch.distributed for the trainer: process group from torchrun's environment, small
all-reduces of CPU statistics, barriers, and the DistributedDataParallel wrapper.

Every helper is a no-op in a single process, so the trainer calls them unconditionally.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["info", "maybe_init", "all_reduce", "barrier", "broadcast_object", "wrap",
           "destroy"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if _active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init(device_type: str) -> bool:
    """Initialise torch.distributed from torchrun's environment (WORLD_SIZE > 1).

    Returns True when this call created the process group (the caller then owns it and
    should :func:`destroy` it)."""
    if _active():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


def local_device(device: torch.device, rank: int) -> torch.device:
    """The CUDA device of this process under torchrun (LOCAL_RANK), set as current."""
    if device.type != "cuda" or info()[1] <= 1:
        return device
    d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(d)
    return d


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over ranks in place (NCCL needs a CUDA copy)."""
    if _active() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            d = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(d)
            t.copy_(d.cpu())
        else:
            dist.all_reduce(t)
    return t


def barrier() -> None:
    if _active() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it (e.g. one run folder for all ranks, whose clocks may
    disagree)."""
    if _active() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def wrap(model: torch.nn.Module, device: torch.device, find_unused_parameters: bool):
    """DistributedDataParallel around ``model`` when more than one process runs."""
    if info()[1] <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


def destroy(owned: bool) -> None:
    """Tear down a process group this run created.  All ranks meet first: a rank that
    closes its gloo connections while a peer is still finishing its last collective can
    make the peer abort at exit (seen as 'terminate called without an active exception'
    in about 1 of 8 two-process CPU runs)."""
    if owned and _active():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
