"""The one DDP helper of the training scripts (scripts/train_mini_world.py via miniworld/train_family.py,
scripts/train_evaluators.py). Every function is a no-op in a single process, so the scripts run unchanged without
``torchrun``.

    with distributed.process_group(cuda=...):    # joins when launched by torchrun (WORLD_SIZE > 1), leaves at exit
        rank, world_size = distributed.rank_and_world()
        model = distributed.wrap(net)             # DistributedDataParallel when a group exists
        ...
        distributed.check_replicas_identical(net) # every rank ends with the same weights, or RuntimeError

Backend: nccl with one GPU per local rank (``LOCAL_RANK``) when the caller trains on CUDA and the node has a GPU for
each local rank; otherwise gloo (CPU, or more ranks than GPUs: gloo all-reduces CUDA tensors too). Pure torch; no
host import, no work at import time.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if is_active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init(cuda: bool = False) -> bool:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1 and ``RANK`` in the environment) and
    none exists yet; ``cuda``: the caller trains on a CUDA device (nccl when every local rank has a GPU). Returns
    whether this call created the group."""
    if not launched_by_torchrun() or is_active():
        return False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    nccl = cuda and dist.is_nccl_available() and torch.cuda.device_count() >= local_world
    if nccl:
        torch.cuda.set_device(local_rank)  # ComfyUI's get_torch_device() follows the current device
    dist.init_process_group("nccl" if nccl else "gloo")
    return True


def shutdown() -> None:
    if is_active():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(cuda: bool = False):
    """:func:`init` on entry; on exit, leave the group if this block created it."""
    created = init(cuda)
    try:
        yield rank_and_world()
    finally:
        if created:
            shutdown()


def collective_device() -> torch.device:
    """Where small all-reduce tensors must live: the rank's GPU under nccl, else the CPU."""
    if is_active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` when a process group exists, else ``module`` itself."""
    if is_active():
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(module, find_unused_parameters=False)
    return module


def mean_across_ranks(value: float) -> float:
    """The mean of a Python float over the ranks (float64 all-reduce); ``value`` itself in one process."""
    if not is_active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def check_replicas_identical(*modules: torch.nn.Module) -> None:
    """Under DDP every rank must end with the same weights: compare a float64 checksum of all parameters (sum and
    sum of absolute values) across ranks (min == max after all-reduce) and raise if they differ."""
    if not is_active():
        return
    total = sum(float(p.detach().double().sum()) + float(p.detach().double().abs().sum())
                for m in modules for p in m.parameters())
    lo, hi = (torch.tensor([total], dtype=torch.float64, device=collective_device()) for _ in range(2))
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if float(lo) != float(hi):
        raise RuntimeError(f"DDP replicas diverged: parameter checksums {float(lo)!r} .. {float(hi)!r}")
