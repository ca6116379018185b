"""Reference backend: SPEC.md transcribed per tensor, in plain PyTorch.

This is the slow path kept for correctness checks. It reads device values
back to the host (``.item()``) where that keeps the code a literal
transcription; every fused backend is tested against it (SPEC §5).
The AdamW update follows ``torch.optim.adam._single_tensor_adam`` op by op
(lerp for m, mul+addcmul for v, sqrt(v)/sqrt(bc2) + eps, addcdiv), so that
with rho = 0 it equals ``torch.optim.AdamW(foreach=False)`` bitwise for
float32 parameters.

Numerics (SPEC §1, §3): N² is float64 throughout (``norm_dtype``), tested for
finiteness in float64 and rounded once to float32 to form the scale; the bias
corrections 1 - β^t are Python (float64) values, rounded once where torch
applies them to float32 tensors; 16-bit parameters are updated in float32 and
rounded by torch's conversion (round to nearest even).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import Backend


def _unscaled(g: Tensor, grad_scale: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    g = g.to(dtype)
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=dtype)
    return g


def ascent_direction(g: Tensor, v: Optional[Tensor], t: float, *, beta2: float, eps: float,
                     precondition: bool = True) -> Tensor:
    """The per-element ascent direction d of SPEC §1 for one tensor: the one
    Python definition (the reference backend and
    :func:`fsam_kernels.diagnostics.ascent_direction` use it; the C++/CUDA
    kernels' is ``fsam::precond_direction`` in csrc/include/fsam/math.h, the
    Triton kernels' ``_direction`` in _triton_kernels.py).

    ``d = g / (sqrt(v / (1 - beta2**t)) + eps)`` when ``precondition`` and
    ``t >= 1``, else ``d = g`` (returned as is). ``g``: the unscaled grad in
    the working dtype (float32, float64 for float64 parameters); ``v``: the
    exp_avg_sq, same shape and dtype (unused, may be None, when the plain
    direction applies); ``t``: the step as a Python number; the bias
    correction is formed in float64 as a Python float. Returns a new tensor
    of ``g``'s dtype (or ``g``)."""
    if precondition and t >= 1:
        bc2 = 1.0 - beta2 ** t
        return g / ((v / bc2).sqrt() + eps)
    return g



def _work_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class ReferenceBackend(Backend):
    name = "reference"
    norm_dtype = torch.float64
    fused = False

    def sq_norm(self, grads, exp_avg_sqs, steps, *, beta2, eps, precondition,
                grad_scale, out, cache=None):
        total = torch.zeros((), dtype=torch.float64, device=out.device)
        for i, g in enumerate(grads):
            wd = torch.float64 if g.dtype == torch.float64 else torch.float32
            gg = _unscaled(g, grad_scale, wd)
            v = exp_avg_sqs[i] if precondition else None
            t = steps[i].item() if precondition else 0.0
            d = ascent_direction(gg, v, t, beta2=beta2, eps=eps, precondition=precondition)
            total += d.double().square().sum().to(total.device)
        out.add_(total.to(out.dtype))

    def perturb(self, params, grads, backups, exp_avg_sqs, steps, *, rho, norm_sq,
                norm_eps, beta2, eps, precondition, grad_scale, found_inf, cache=None):
        n2 = norm_sq.double().item()
        if not math.isfinite(n2):
            found_inf.fill_(1.0)
        skip = found_inf.item() != 0
        # scale formed in float32 from N² rounded once to float32 (SPEC §1)
        n2_32 = torch.tensor(n2, dtype=torch.float32)
        scale32 = (torch.tensor(rho, dtype=torch.float32)
                   / (n2_32.sqrt() + torch.tensor(norm_eps, dtype=torch.float32)))
        for i, p in enumerate(params):
            backups[i].copy_(p)
            if skip:
                continue
            wd = _work_dtype(p)
            gg = _unscaled(grads[i], grad_scale, wd)
            v = exp_avg_sqs[i] if precondition else None
            t = steps[i].item() if precondition else 0.0
            d = ascent_direction(gg, v, t, beta2=beta2, eps=eps, precondition=precondition)
            e = d * scale32.to(device=p.device, dtype=wd)
            p.copy_((p.to(wd) + e).to(p.dtype))

    def restore_adamw(self, params, grads, backups, exp_avgs, exp_avg_sqs, steps, *,
                      lr, beta1, beta2, eps, weight_decay, maximize, grad_scale,
                      found_inf, cache=None):
        skip = found_inf.item() != 0
        for i, p in enumerate(params):
            if backups is not None:
                p.copy_(backups[i])
            if skip:
                continue
            exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], steps[i]
            g = grads[i]
            if grad_scale is not None or g.dtype != exp_avg.dtype:
                g = _unscaled(g, grad_scale, exp_avg.dtype)
            if maximize:
                g = -g
            step_t += 1
            step = step_t.item()
            low = p.dtype != exp_avg.dtype
            work = p.to(exp_avg.dtype) if low else p
            if weight_decay != 0:
                work.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2 ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            work.addcdiv_(exp_avg, denom, value=-step_size)
            if low:
                p.copy_(work)

    def restore(self, params, backups, *, cache=None):
        for p, b in zip(params, backups):
            p.copy_(b)
