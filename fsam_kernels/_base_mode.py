"""The update rule of a SAM step, one strategy object per optimizer.

The ascent (first phase) and the restore of θ are the same for every SAM
optimizer; what differs is the update of the second phase and what the
optimizer's state is:

- :class:`FusedAdamW` (the default): the optimizer keeps torch.optim.AdamW's
  state and the backend runs restore + AdamW in one fused kernel per call;
- :class:`BaseOptimizer` (``base_optimizer=torch.optim.SGD``, ...): θ is
  restored, the update gradient unscaled (and clipped) in place, and the base
  optimizer's own ``step()`` runs unless the step is skipped; ``param_groups``,
  ``state`` and ``state_dict()`` are the base's.

The optimizer (``_SAMBase``) holds one as ``_mode`` and calls it where the two
differ: group validation, the preconditioner's state, the state the update
kernels take, the second phase's update, ``state_dict`` and its loading.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .distributed import local, share_flags, share_flags_over_shards
from ._norms import clip_coefs, clip_grads, flag, mark_non_finite, scale_on
from ._plans import compile_safe_out as _cs
from ._state_dict import (check_saved_group_keys, load_adamw_state_dict, load_base_state_dict,
                          run_state_dict_hooks, state_dtype)
from ._validation import validate_group, validate_sam_keys

__all__ = ["FusedAdamW", "BaseOptimizer"]


class FusedAdamW:
    """SAM over the fused AdamW of the backends (SPEC §3)."""

    #: the base optimizer instance (None: the fused AdamW)
    base: Optional[torch.optim.Optimizer] = None
    #: whether plans holding the preconditioner's state may be cached
    precond_cacheable = True

    def validate(self, group: Dict[str, Any], where: str) -> None:
        validate_group(group, where)

    def add_param_group(self, opt, group: Dict[str, Any], where: str, torch_add) -> None:
        """Validate a new group (defaults filled in) and add it (``torch_add``:
        ``torch.optim.Optimizer.add_param_group``)."""
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        validate_group(group, where)
        torch_add(group)

    def precond_state(self, opt, p: Tensor):
        """``(state dict, None, exp_avg_sq, step)`` of ``p`` for the preconditioned
        ascent (its AdamW state, created at t = 0 if new; local tensors)."""
        st = opt._init_state(p)
        return (st, None, _cs(local(st["exp_avg_sq"])), st["step"])

    def update_state(self, opt, p: Tensor):
        """``(state dict, exp_avg, exp_avg_sq, step)`` of ``p`` for restore+AdamW."""
        st = opt._init_state(p)
        return (st, _cs(local(st["exp_avg"])), _cs(local(st["exp_avg_sq"])), st["step"])

    def second_step(self, opt, staged, devs, grad_scale: Optional[Tensor]) -> None:
        """Restore θ and run AdamW with the pass-2 grads, from the plans
        ``staged`` (``(group, plan, grads)``, grads as the kernels take them).
        A loss scale is folded into the kernels' ``grad_scale`` (and the grads
        checked for inf/NaN), the clip coefficient likewise: no grad is
        changed in place."""
        clip = clip_grads(staged)
        flags = opt._found_inf
        if grad_scale is not None and opt.max_grad_norm is None:
            mark_non_finite(flags, clip)                 # pass-2 inf/NaN check (the clip
            share_flags_over_shards(flags, list(clip))   # norm below checks it otherwise)
        share_flags(flags)
        scales = {d: scale_on(grad_scale, d) for d in devs}
        if opt.max_grad_norm is not None:
            coefs = clip_coefs(opt._backend, flags, clip, opt.max_grad_norm, grad_scale)
            for d, coef in coefs.items():                # g/s' = (g/s)·coef
                scales[d] = (scales[d] / coef) if scales[d] is not None else 1.0 / coef
            share_flags(flags)
        for group, plan, grads in staged:
            for c in plan.without:
                opt._backend(c.device).restore(c.ps, c.bs, cache=c.cache)
            beta1, beta2 = group["betas"]
            for calls, has_backup in ((plan.restored, True), (plan.fresh, False)):
                for c in calls:
                    d = c.device
                    opt._backend(d).restore_adamw(
                        c.ps, plan.kernel_grads(c.get(grads)),
                        c.bs if has_backup else None, c.ms, c.vs, c.ts,
                        lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], maximize=group["maximize"],
                        grad_scale=scales[d], found_inf=flag(opt._found_inf, d), cache=c.cache)

    def state_dict(self, opt, torch_state_dict) -> Dict[str, Any]:
        return torch_state_dict()

    def check_saved_groups(self, opt, saved_groups) -> None:
        check_saved_group_keys(opt, saved_groups, None)

    def load_state_dict(self, opt, state_dict: Dict[str, Any]) -> None:
        load_adamw_state_dict(opt, state_dict)


class BaseOptimizer(FusedAdamW):
    """SAM around any ``torch.optim.Optimizer`` (``base_optimizer=``)."""

    precond_cacheable = False    # the preconditioner's state is made for each step

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.base = base

    def validate(self, group: Dict[str, Any], where: str) -> None:
        validate_sam_keys(group, where)

    def check_precondition(self, group: Dict[str, Any], where: str) -> None:
        """``precondition=True`` needs the base's exp_avg_sq (Adam/AdamW)."""
        if group["precondition"] and not isinstance(self.base,
                                                    (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(
                f"{where}precondition: the preconditioned ascent divides by Adam's second "
                f"moment (exp_avg_sq), which {type(self.base).__name__} does not "
                "keep; use precondition=False or an Adam/AdamW base")

    def add_param_group(self, opt, group: Dict[str, Any], where: str, torch_add) -> None:
        validate_sam_keys(group, where)
        if self.base is None:            # inside __init__, before the base exists
            torch_add(group)
        else:                            # the base owns the list of groups
            self.check_precondition(group, where)
            self.base.add_param_group(group)

    def precond_state(self, opt, p: Tensor):
        """The base's exp_avg_sq and step (as a 0-d float32 on ``p``'s device),
        or the identity preconditioner (t = 0) before the base has stepped."""
        st = opt.state.get(p, {})
        if "exp_avg_sq" in st:
            step = local(st["step"])
            if not isinstance(step, Tensor):
                step = torch.tensor(float(step))
            return (None, None, _cs(local(st["exp_avg_sq"])),
                    step.to(device=p.device, dtype=torch.float32).reshape(()))
        return (None, None, torch.zeros_like(local(p), dtype=state_dtype(p)),
                torch.zeros((), dtype=torch.float32, device=p.device))

    def update_state(self, opt, p: Tensor):
        return None          # the base's step() updates its own state

    def second_step(self, opt, staged, devs, grad_scale: Optional[Tensor]) -> None:
        """Restore θ, unscale (and clip) the pass-2 grads in place, then the base
        optimizer's own step, skipped when a flag is set: the one host read of
        this mode."""
        for group, plan, grads in staged:
            for calls in (plan.without, plan.restored):
                for c in calls:
                    opt._backend(c.device).restore(c.ps, c.bs, cache=c.cache)
        clip = clip_grads(staged)
        flags = opt._found_inf
        inv = None
        if grad_scale is not None:
            inv = {d: scale_on(grad_scale, d).reciprocal() for d in devs}
        mark_non_finite(flags, clip, inv)       # unscale once + pass-2 inf/NaN check
        if opt.max_grad_norm is not None:
            coefs = clip_coefs(opt._backend, flags, clip, opt.max_grad_norm, None)
            for d, coef in coefs.items():
                torch._foreach_mul_([g for (dd, _), gs in clip.items() if dd == d for g in gs],
                                    coef)
        share_flags_over_shards(flags, list(clip))
        if not any(bool(f.item()) for f in flags.values()):
            self.base.step()

    def state_dict(self, opt, torch_state_dict) -> Dict[str, Any]:
        return run_state_dict_hooks(opt, self.base.state_dict)

    def check_saved_groups(self, opt, saved_groups) -> None:
        check_saved_group_keys(opt, saved_groups, self.base)

    def load_state_dict(self, opt, state_dict: Dict[str, Any]) -> None:
        load_base_state_dict(opt, self.base, state_dict, self.check_precondition)
