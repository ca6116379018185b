"""foreach backend: the four SPEC §6 operations with ``torch._foreach_*`` ops.

The best PyTorch alone can do: a handful of multi-tensor launches per
operation, no host synchronisation (bias corrections and the perturbation
scale are computed from device tensors, as in torch's capturable
``_multi_tensor_adam``). Arithmetic is in float32 (float64 for float64
parameters); bf16/fp16 parameters are updated in float32 and rounded once.

A skipped step (``found_inf`` non-zero) is applied with a per-tensor
``torch.where`` select so that parameters, exp_avg, exp_avg_sq and step stay
bitwise unchanged without reading ``found_inf`` on the host.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .base import Backend


def _work_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _as(tensors: Sequence[Tensor], dtypes: Sequence[torch.dtype]) -> List[Tensor]:
    return [t if t.dtype == d else t.to(d) for t, d in zip(tensors, dtypes)]


def _unscaled(grads, dtypes, grad_scale: Optional[Tensor]) -> List[Tensor]:
    gs = _as(grads, dtypes)
    if grad_scale is not None:
        gs = torch._foreach_div(gs, grad_scale)
    return gs


def _directions(grads, exp_avg_sqs, steps, *, dtypes, beta2, eps, precondition, grad_scale):
    """d of SPEC §1, out of place, one tensor per input (work dtype)."""
    gs = _unscaled(grads, dtypes, grad_scale)
    if not precondition or len(gs) == 0:
        return gs
    # steps are 0-d float32 device tensors: t >= 1 selects the preconditioner
    t = [s.to(d) for s, d in zip(steps, dtypes)]
    started = [(s >= 1).to(d) for s, d in zip(steps, dtypes)]
    bc2 = torch._foreach_pow(beta2, t)            # beta2**t
    torch._foreach_neg_(bc2)
    torch._foreach_add_(bc2, 1.0)                  # 1 - beta2**t (0 where t = 0)
    # where t = 0 use bc2 = 1 so that nothing divides by zero
    notstarted = torch._foreach_neg(started)
    torch._foreach_add_(notstarted, 1.0)
    torch._foreach_add_(bc2, notstarted)
    denom = torch._foreach_div(exp_avg_sqs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    # denom where started, exactly 1 elsewhere
    torch._foreach_mul_(denom, started)
    torch._foreach_add_(denom, notstarted)
    return torch._foreach_div(gs, denom)


class ForeachBackend(Backend):
    name = "foreach"
    norm_dtype = torch.float32
    fused = True

    def sq_norm(self, grads, exp_avg_sqs, steps, *, beta2, eps, precondition,
                grad_scale, out, cache=None):
        grads = list(grads)
        if not grads:
            return
        dtypes = [_work_dtype(g) for g in grads]
        ds = _directions(grads, exp_avg_sqs, steps, dtypes=dtypes, beta2=beta2, eps=eps,
                         precondition=precondition, grad_scale=grad_scale)
        norms = torch._foreach_norm(ds, 2, dtype=torch.float32) if all(
            d.dtype == torch.float32 for d in ds) else [d.double().norm() for d in ds]
        out.add_(torch.stack([n.to(torch.float32) for n in norms]).square().sum())

    def perturb(self, params, grads, backups, exp_avg_sqs, steps, *, rho, norm_sq,
                norm_eps, beta2, eps, precondition, grad_scale, found_inf, cache=None):
        params, backups = list(params), list(backups)
        if params:
            torch._foreach_copy_(backups, params)
        bad = ~torch.isfinite(norm_sq)
        found_inf.copy_(torch.maximum(found_inf, bad.to(found_inf.dtype)))
        if not params:
            return
        skip = found_inf != 0
        n32 = norm_sq.to(torch.float32)
        scale = rho / (n32.sqrt() + norm_eps)
        dtypes = [_work_dtype(p) for p in params]
        ds = _directions(grads, exp_avg_sqs, steps, dtypes=dtypes, beta2=beta2, eps=eps,
                         precondition=precondition, grad_scale=grad_scale)
        es = torch._foreach_mul(ds, scale)
        ps = _as(params, dtypes)
        new = torch._foreach_add(ps, es)
        for p, n in zip(params, new):
            p.copy_(torch.where(skip, p, n.to(p.dtype)))

    def restore_adamw(self, params, grads, backups, exp_avgs, exp_avg_sqs, steps, *,
                      lr, beta1, beta2, eps, weight_decay, maximize, grad_scale,
                      found_inf, cache=None):
        params = list(params)
        if backups is not None and params:
            torch._foreach_copy_(params, list(backups))
        if not params:
            return
        skip = found_inf != 0
        dtypes = [m.dtype for m in exp_avgs]
        gs = _unscaled(grads, dtypes, grad_scale)
        if maximize:
            gs = torch._foreach_neg(gs)
        new_steps = torch._foreach_add(list(steps), 1.0)
        m = torch._foreach_lerp(list(exp_avgs), gs, 1 - beta1)
        v = torch._foreach_mul(list(exp_avg_sqs), beta2)
        torch._foreach_addcmul_(v, gs, gs, value=1 - beta2)
        ps = _as(params, dtypes)
        # out of place: the parameters themselves change only in the final select
        ps = (torch._foreach_mul(ps, 1 - lr * weight_decay) if weight_decay != 0
              else [p.clone() if p.dtype == d else p for p, d in zip(ps, dtypes)])
        t = [s.to(d) for s, d in zip(new_steps, dtypes)]
        bc1 = torch._foreach_pow(beta1, t)
        torch._foreach_neg_(bc1)
        torch._foreach_add_(bc1, 1.0)                  # 1 - beta1**t
        bc2 = torch._foreach_pow(beta2, t)
        torch._foreach_neg_(bc2)
        torch._foreach_add_(bc2, 1.0)
        torch._foreach_sqrt_(bc2)                      # sqrt(1 - beta2**t)
        step_size = torch._foreach_div(bc1, -lr) if lr != 0 else None
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, eps)
        if step_size is not None:
            torch._foreach_mul_(denom, step_size)      # denom * (-(1-b1^t)/lr)
            torch._foreach_addcdiv_(ps, m, denom)
        for lst_old, lst_new in ((params, ps), (list(exp_avgs), m),
                                 (list(exp_avg_sqs), v), (list(steps), new_steps)):
            for o, n in zip(lst_old, lst_new):
                o.copy_(torch.where(skip, o, n.to(o.dtype)))

    def restore(self, params, backups, *, cache=None):
        params = list(params)
        if params:
            torch._foreach_copy_(params, list(backups))
