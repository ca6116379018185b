"""foreach backend: the four SPEC §6 operations with ``torch._foreach_*`` ops.

The best PyTorch alone can do: a handful of multi-tensor launches per
operation, no host synchronisation (bias corrections and the perturbation
scale are computed from device tensors, as in torch's capturable
``_multi_tensor_adam``). Arithmetic is in float32 (float64 for float64
parameters); bf16/fp16 parameters are updated in float32 and rounded once
(round to nearest even, torch's own conversion).

Step-dependent coefficients (the bias corrections 1 - β1^t, 1 - β2^t of
SPEC §1 and §3) are computed in float64 from the float32 step tensors, all
tensors of a call at once, and rounded once to the working dtype, as the
reference backend (Python floats) and the native kernels do: in float32,
β2^t for β2 close to 1 and t ~ 10^4 would be off by ~1e-4 relative.

N² (``sq_norm``'s ``out``, ``norm_dtype`` float64): per-tensor Σ d² in float64,
added in float64 to ``out``, so the sum across tensors, calls and groups is
float64 and is rounded to float32 once, where ``perturb`` forms the scale
(SPEC §1).

A skipped step (``found_inf`` non-zero) is applied with a per-tensor
``torch.where`` select so that parameters, exp_avg, exp_avg_sq and step stay
bitwise unchanged without reading ``found_inf`` on the host.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

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


def _per_tensor(values: Tensor, dtypes: Sequence[torch.dtype]) -> List[Tensor]:
    """The float64 vector ``values`` (one entry per tensor) as 0-d tensors, each
    rounded once to its tensor's work dtype."""
    out = {torch.float64: values}
    if any(d != torch.float64 for d in dtypes):
        out[torch.float32] = values.to(torch.float32)
    rows = {d: v.unbind(0) for d, v in out.items()}
    return [rows[d][i] for i, d in enumerate(dtypes)]


def _steps64(steps: Sequence[Tensor]) -> Tensor:
    """The 0-d float32 step tensors of one call as one float64 vector."""
    return torch.stack([s.reshape(()) for s in steps]).to(torch.float64)


def _one_minus_pow(beta: float, t: Tensor) -> Tensor:
    """1 - beta**t elementwise, in float64 (``t`` float64)."""
    return torch.pow(beta, t).neg_().add_(1.0)


def _directions(grads, exp_avg_sqs, steps, *, dtypes, beta2, eps, precondition, grad_scale):
    """d of SPEC §1, out of place, one tensor per input (work dtype)."""
    gs = _unscaled(grads, dtypes, grad_scale)
    if not precondition or len(gs) == 0:
        return gs
    t = _steps64(steps)
    started = t >= 1                                # the preconditioner applies from t = 1
    bc2 = torch.where(started, _one_minus_pow(beta2, t), 1.0)   # 1 where t = 0: no 0/0
    s = started.to(torch.float64)
    bc2s, use, unused = (_per_tensor(x, dtypes) for x in (bc2, s, 1.0 - s))
    denom = torch._foreach_div(list(exp_avg_sqs), bc2s)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    # denom where started, exactly 1 elsewhere
    torch._foreach_mul_(denom, use)
    torch._foreach_add_(denom, unused)
    return torch._foreach_div(gs, denom)


def _adamw_coefficients(new_steps: Sequence[Tensor], dtypes, *, lr: float, beta1: float,
                        beta2: float) -> Tuple[List[Tensor], List[Tensor]]:
    """Per tensor, -lr / (1 - β1^t) and sqrt(1 - β2^t) (SPEC §3) for the steps t
    after the increment: computed in float64, rounded once to the work dtype."""
    t = _steps64(new_steps)
    neg_step_size = _one_minus_pow(beta1, t).reciprocal_().mul_(-lr)
    bc2_sqrt = _one_minus_pow(beta2, t).sqrt_()
    return _per_tensor(neg_step_size, dtypes), _per_tensor(bc2_sqrt, dtypes)


class ForeachBackend(Backend):
    name = "foreach"
    norm_dtype = torch.float64
    fused = True

    def sq_norm(self, grads, exp_avg_sqs, steps, *, beta2, eps, precondition,
                grad_scale, out, cache=None):
        grads = list(grads)
        if not grads:
            return
        if out.dtype != torch.float64:
            raise TypeError(f"foreach backend: out is {out.dtype}; expected a 0-d float64 "
                            f"tensor (norm_dtype, SPEC §1)")
        dtypes = [_work_dtype(g) for g in grads]
        ds = _directions(grads, exp_avg_sqs, steps, dtypes=dtypes, beta2=beta2, eps=eps,
                         precondition=precondition, grad_scale=grad_scale)
        norms = torch._foreach_norm(ds, 2, dtype=torch.float64)
        out.add_(torch.stack(norms).square().sum())

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
        # the scale of SPEC §1: N² rounded once to float32, then float32 ops (a true
        # division, as the reference: ``rho / tensor`` would multiply by a reciprocal)
        n32 = norm_sq.to(torch.float32)
        rho32 = torch.full((), rho, dtype=torch.float32, device=n32.device)
        scale = torch.div(rho32, n32.sqrt().add_(norm_eps))
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
        neg_step_size, bc2_sqrt = _adamw_coefficients(new_steps, dtypes, lr=lr, beta1=beta1,
                                                      beta2=beta2)
        # p + (-lr / bc1) * (m / (sqrt(v) / sqrt(bc2) + eps)): the reference's op order
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        upd = torch._foreach_div(m, denom)
        del denom
        torch._foreach_mul_(upd, neg_step_size)
        torch._foreach_add_(ps, upd)
        del upd
        for lst_old, lst_new in ((params, ps), (list(exp_avgs), m),
                                 (list(exp_avg_sqs), v), (list(steps), new_steps)):
            for o, n in zip(lst_old, lst_new):
                o.copy_(torch.where(skip, o, n.to(o.dtype)))

    def restore(self, params, backups, *, cache=None):
        params = list(params)
        if params:
            torch._foreach_copy_(params, list(backups))
