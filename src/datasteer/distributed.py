"""Which process this is in a multi-process launch, and the few collectives datasteer needs.

Launchers (torchrun, `accelerate launch`, SLURM through either) say where a process stands in environment
variables (RANK, LOCAL_RANK, WORLD_SIZE); `torch.distributed` says it once a process group is initialised. Both
are read here, so the rest of datasteer asks one place: `launched()` (started by a launcher with more than one
process), `is_main_process()` (rank 0 or no launcher: the process that writes files), `active()` (an initialised
process group of more than one process: collectives are due).

Collectives work on the process group's own device (gloo: CPU tensors; NCCL: CUDA tensors): `all_reduce_sum`
flattens a list of tensors into one buffer per dtype, so a step costs one collective however many parameters.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

# torchrun and accelerate's torchrun launcher set RANK/LOCAL_RANK/WORLD_SIZE; MPI launchers (accelerate's multi-CPU
# path with a hostfile) set PMI_* or OMPI_COMM_WORLD_*
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else None
    except ValueError:
        return None


def active() -> bool:
    """True when torch.distributed has an initialised process group of more than one process."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    if active():
        import torch.distributed as dist

        return dist.get_world_size()
    for variable in _SIZE_VARIABLES:
        value = _env_int(variable)
        if value:
            return value
    return 1


def rank() -> int:
    if active():
        import torch.distributed as dist

        return dist.get_rank()
    for variable in _RANK_VARIABLES:
        value = _env_int(variable)
        if value is not None:
            return value
    return 0


def launched() -> bool:
    """Started by a launcher as one of several processes (whether or not a process group exists yet)."""
    return world_size() > 1 or rank() != 0


def is_main_process() -> bool:
    """False on every rank but 0 of a distributed run (torchrun, accelerate launch): those never write."""
    if active():
        return rank() == 0
    for variable in _RANK_VARIABLES:
        value = os.environ.get(variable)
        if value is not None and value.strip() not in ("", "0"):
            return False
    return True


def all_reduce_sum(tensors: Sequence[Any]) -> None:
    """Sum every tensor over the process group, in place (one collective per dtype and device)."""
    if not active() or not tensors:
        return
    import torch
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    groups: dict[tuple[Any, Any], list[Any]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for members in groups.values():
        flat = _flatten_dense_tensors([m.contiguous() for m in members])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        with torch.no_grad():
            for m, reduced in zip(members, _unflatten_dense_tensors(flat, members)):
                m.copy_(reduced)


def all_gather_objects(value: Any) -> list[Any]:
    """[value of rank 0, value of rank 1, ...] on every rank; [value] without a process group."""
    if not active():
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, src: int = 0) -> Any:
    """The value of rank `src` on every rank (itself without a process group)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(n: int, parts: int, index: int) -> range:
    """The `index`-th of `parts` contiguous near-equal slices of range(n) (earlier slices one longer)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if active():
        import torch.distributed as dist

        dist.barrier()


def init_from_launcher(device: str | None = None) -> str | None:
    """Join the process group a launcher (torchrun, `accelerate launch`) set up in the environment, once: NCCL when
    the work runs on CUDA, gloo otherwise. Returns the device this rank should use (`cuda:LOCAL_RANK` on CUDA, the
    given device otherwise); nothing to do outside a launch."""
    if not launched():
        return device
    import torch
    import torch.distributed as dist

    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        device = f"cuda:{_env_int('LOCAL_RANK') or 0}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device
