"""Adapter tensors of a sharded model (FSDP2 ``fully_shard``: parameters are ``DTensor`` shards).

Saving gathers each shard into its full value (a collective: every rank calls it, in the same order) and
lets rank 0 alone write; loading turns a full checkpoint tensor into the target's shard locally (every rank
holds the full value already, so no communication is needed).
"""

from __future__ import annotations

import sys
from typing import Iterable

from torch import Tensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (one rank's part of a sharded parameter)."""
    # No DTensor can exist before torch.distributed.tensor is imported, so deltatune never imports it
    # itself (importing it costs every user of a plain model start-up time).
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def any_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor``."""
    return any(is_sharded(t) for t in tensors)


def full_value(tensor: Tensor) -> Tensor:
    """The full value of a ``DTensor`` (gathered from every rank: all ranks must call this, in the same
    order), or ``tensor`` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def writes_files() -> bool:
    """Whether this process writes a gathered checkpoint: rank 0, or a process outside a process group."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def wait_for_writer() -> None:
    """Every rank waits until rank 0 has written (so the folder is complete wherever the save returns)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def as_target_layout(value: Tensor, target: Tensor) -> Tensor:
    """``value`` (a full tensor or a ``DTensor``) laid out as ``target``, ready for ``target.copy_``.

    A full tensor going into a shard is cut locally (``src_data_rank=None``: each rank already holds the
    whole value, as after reading a file), so ranks need not load in step; a ``DTensor`` of another layout
    is redistributed (a collective).
    """
    value = value.to(device=target.device, dtype=target.dtype)
    if not is_sharded(target):
        return full_value(value)
    if not is_sharded(value):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
    if tuple(value.placements) != tuple(target.placements) or value.device_mesh != target.device_mesh:
        value = value.redistribute(target.device_mesh, target.placements)
    return value


__all__ = ["any_sharded", "as_target_layout", "full_value", "is_sharded", "wait_for_writer", "writes_files"]
