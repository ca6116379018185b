"""The optimizer's norms and skip flags (SPEC §1, §4) over groups, devices and shards.

``flags`` is the optimizer's ``{device: 0-d float32 found_inf}``; ``clip``
maps ``(device, shard key)`` to the update gradients of every group in group
and parameter order (:func:`clip_grads`). Shard partials are all-reduced and
device values summed with fsam_kernels/distributed.py. No host sync here
except where parameters span several devices (``distributed.global_sum``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .distributed import global_sum, reduce_norm_sq
from ._plans import compile_safe_all, compile_safe_out

__all__ = ["CLIP_EPS", "flag", "set_flags", "scale_on", "sq_norm_into", "clip_grads",
           "clip_coefs", "mark_non_finite"]

CLIP_EPS = 1e-6          # as torch.nn.utils.clip_grad_norm_


def flag(flags: Dict[torch.device, Tensor], device: torch.device) -> Tensor:
    """The found_inf flag of ``device`` (created as 0 on first use)."""
    f = flags.get(device)
    if f is None:
        f = flags[device] = torch.zeros((), dtype=torch.float32, device=device)
    return f


def set_flags(flags, devs, found_inf: Optional[Tensor], merge: bool) -> None:
    """The flag of every device in ``devs``: ``found_inf`` (or 0), or with
    ``merge`` the maximum of the flag and ``found_inf`` (unchanged without one)."""
    for d in devs:
        f = flag(flags, d)
        if found_inf is not None:
            v = found_inf.to(d, torch.float32).reshape(())
            f.copy_(torch.maximum(f, v) if merge else v)
        elif not merge:
            f.zero_()


def scale_on(grad_scale: Optional[Tensor], device) -> Optional[Tensor]:
    """``grad_scale`` as a 0-d float32 tensor on ``device`` (None stays None);
    ``TypeError`` unless it is a 1-element tensor."""
    if grad_scale is None:
        return None
    if not isinstance(grad_scale, Tensor) or grad_scale.numel() != 1:
        raise TypeError("grad_scale: expected a 1-element float32 tensor")
    return grad_scale.reshape(()).to(device=device, dtype=torch.float32)


def sq_norm_into(backend, out: Dict, sharded: Dict, d, key, gs, vs, ts, *, pre: bool,
                 beta2: float, eps: float, grad_scale, cache) -> None:
    """One ``backend.sq_norm`` call into the N² accumulator of ``(d, key)``:
    ``out[d]`` for whole tensors, ``sharded[key][d]`` for shards (all-reduced
    by ``distributed.reduce_norm_sq``); accumulators made in the backend's
    ``norm_dtype`` on first use."""
    per = out if key is None else sharded.setdefault(key, {})
    acc = per.get(d)
    if acc is None:
        acc = per[d] = torch.zeros((), dtype=backend.norm_dtype, device=d)
    backend.sq_norm(compile_safe_all(gs), vs, ts, beta2=beta2, eps=eps, precondition=pre,
                    grad_scale=scale_on(grad_scale, d), out=compile_safe_out(acc), cache=cache)


def clip_grads(staged) -> Dict[Tuple[torch.device, Any], List[Tensor]]:
    """The update gradients of every group of ``staged`` (``(group, plan,
    grads)``), per (device, shard key), in group and parameter order."""
    clip: Dict[Tuple[torch.device, Any], List[Tensor]] = {}
    for _, plan, grads in staged:
        for c in plan.clip:
            clip.setdefault((c.device, c.key), []).extend(c.get(grads))
    return clip


def clip_coefs(backend_of, flags, clip, max_grad_norm: float,
               grad_scale: Optional[Tensor]) -> Dict[torch.device, Tensor]:
    """Per device min(1, max_grad_norm / (‖ĝ/s‖ + 1e-6)), the norm over all
    groups, devices and shards (``backend_of(device)`` computes it); a
    non-finite norm sets the flags."""
    n2: Dict[torch.device, Tensor] = {}
    sharded: Dict[Any, Dict[torch.device, Tensor]] = {}
    for (d, key), gs in clip.items():
        sq_norm_into(backend_of(d), n2, sharded, d, key, gs, None, None, pre=False, beta2=0.0,
                     eps=0.0, grad_scale=grad_scale, cache=None)
    reduce_norm_sq(n2, sharded)
    global_sum(n2)
    coefs = {}
    for d, n in n2.items():
        f = flag(flags, d)
        f.copy_(torch.maximum(f, (~torch.isfinite(n)).to(f.dtype)))
        coefs[d] = (max_grad_norm / (n.to(torch.float32).sqrt() + CLIP_EPS)).clamp(max=1.0)
    return coefs


def mark_non_finite(flags, clip, inv_scale: Optional[Dict] = None) -> None:
    """found_inf |= any grad of ``clip`` not finite; multiplies the grads by
    ``inv_scale[d]`` (1 when None: a check without changing a value)."""
    by: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for (d, _), gs in clip.items():
        for g in gs:
            by.setdefault((d, g.dtype), []).append(g)
    for (d, _), gs in by.items():
        inv = (inv_scale or {}).get(d)
        if inv is None:
            inv = torch.ones((), dtype=torch.float32, device=d)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, flag(flags, d), inv)
