"""Sharded (DTensor / FSDP2) parameter support for SAM and FunctionalSAM.

With ``torch.distributed.fsdp.fully_shard`` every parameter, its grad and
(as in torch's own optimizers) its Adam state are DTensors. The kernels work
on local shards: :func:`local` unwraps a DTensor to its local tensor (which
shares storage with the parameter, so in-place updates reach FSDP's sharded
storage). The ascent norm N² (SPEC §1) is a sum over all elements, so each
rank accumulates its shards' partial sum and the partials are all-reduced
(SUM) over the mesh dimensions on which the parameter is sharded
(:func:`all_reduce_over_shards`). Replicated DTensors (no ``Shard``
placement) hold the whole tensor locally and need no reduction.
"""
from __future__ import annotations

from typing import Hashable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch >= 2.4 public location
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover - very old torch or no distributed
    try:
        from torch.distributed._tensor import DTensor  # type: ignore
    except Exception:
        DTensor = None  # type: ignore

__all__ = ["is_dtensor", "local", "shard_key", "all_reduce_over_shards"]


def is_dtensor(t) -> bool:
    """True when ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The local shard of a DTensor (sharing its storage), else ``t`` itself."""
    if t is not None and is_dtensor(t):
        return t._local_tensor  # same as to_local() under no_grad, without autograd
    return t


def shard_key(p: Tensor) -> Optional[Tuple[Hashable, Tuple[int, ...]]]:
    """``(device_mesh, mesh dims)`` over which ``p`` is sharded, or None when
    the local tensor already is the whole tensor (plain tensor, or a DTensor
    that is replicated on every mesh dimension)."""
    if not is_dtensor(p):
        return None
    dims = tuple(i for i, pl in enumerate(p.placements) if pl.is_shard())
    if not dims:
        return None
    if any(pl.is_partial() for pl in p.placements):
        raise RuntimeError("SAM/FunctionalSAM: parameters with Partial DTensor placements "
                           "are not supported")
    return (p.device_mesh, dims)


def all_reduce_over_shards(t: Tensor, key, op=None) -> None:
    """In place: ``t`` ← reduction of ``t`` over every rank holding a shard of
    the parameters with ``key`` (one ``all_reduce`` per sharded mesh dim; one
    in total for FSDP2's 1-D mesh). ``op`` defaults to SUM."""
    mesh, dims = key
    op = dist.ReduceOp.SUM if op is None else op
    for dim in dims:
        group = mesh.get_group(dim) if mesh.ndim > 1 else mesh.get_group()
        if dist.get_world_size(group) > 1:
            torch.distributed.all_reduce(t, op=op, group=group)
