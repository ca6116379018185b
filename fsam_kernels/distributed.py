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

from typing import Any, Dict, Hashable, Optional, Tuple

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

__all__ = ["is_dtensor", "local", "shard_key", "all_reduce_over_shards", "global_sum",
           "reduce_norm_sq", "share_flags", "share_flags_over_shards"]


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


# -- the optimizer's norms and skip flags over devices and shards ----------------
def global_sum(per_device: Dict[torch.device, Tensor]) -> None:
    """Parameters on several devices: every entry (a 0-d N² partial) becomes
    the sum of all of them, in place (float64 on the host). One device: nothing."""
    if len(per_device) > 1:
        total = sum(n.to(torch.float64).cpu() for n in per_device.values())
        for d in per_device:
            per_device[d].copy_(total.to(d))


def reduce_norm_sq(norm_sq: Dict[torch.device, Tensor],
                   sharded: Optional[Dict[Any, Dict[torch.device, Tensor]]] = None) -> None:
    """Sharded parameters (DTensor, FSDP2): each rank's partial N² over its local
    shards (``sharded[key][device]``) is all-reduced (SUM) over the shard group
    and added to ``norm_sq[device]``. One all_reduce per shard key (per mesh
    dim): one per step for FSDP2; none without sharded parameters. Same order
    on every rank (group order)."""
    for key, per in (sharded or {}).items():
        devs = list(per)
        t = per[devs[0]]
        for d in devs[1:]:                   # a mesh has one device per rank
            t.add_(per[d].to(t.device, t.dtype))
        all_reduce_over_shards(t, key)
        d0 = devs[0]
        if d0 in norm_sq:
            norm_sq[d0].add_(t.to(norm_sq[d0].dtype))
        else:
            norm_sq[d0] = t


def share_flags(flags: Dict[torch.device, Tensor]) -> None:
    """A skip on one device skips the step on every device (atomic): every
    0-d found_inf flag becomes the maximum of all, in place."""
    if len(flags) > 1:
        anyf = torch.stack([f.cpu() for f in flags.values()]).amax()
        for d, f in flags.items():
            f.copy_(anyf.to(d))


def share_flags_over_shards(flags: Dict[torch.device, Tensor], keyed) -> None:
    """With sharded parameters, a non-finite local grad must skip the step on
    every rank: the flags are shared over devices, then each shard key's
    device flag is all-reduced (MAX) over its shard group (``keyed``: pairs
    ``(device, shard key or None)``), then shared again."""
    share_flags(flags)
    seen = []
    for d, key in keyed:
        if key is not None and key not in seen:
            seen.append(key)
            all_reduce_over_shards(flags[d], key, op=dist.ReduceOp.MAX)
    if seen:
        share_flags(flags)
