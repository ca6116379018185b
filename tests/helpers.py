"""Shared test helpers: float64 oracles of SPEC §1/§3 and backend lists."""
from __future__ import annotations

import math

import torch

from fsam_kernels.backends import backend_availability


def fused_backends(device="cpu"):
    """Fused backends to compare against the reference on ``device``."""
    names = []
    for n in ("foreach", "cpu", "cuda", "triton"):
        ok, _ = backend_availability(n, device)
        if ok:
            names.append(n)
    return names


def devices():
    d = ["cpu"]
    if torch.cuda.is_available():
        d.append("cuda")
    return d


def oracle_direction(g, v, t, beta2, eps, precondition):
    """d of SPEC §1 in float64."""
    g = g.double()
    if precondition and t >= 1:
        return g / ((v.double() / (1 - beta2 ** t)).sqrt() + eps)
    return g


def oracle_adamw(p, g, m, v, t, lr, beta1, beta2, eps, wd):
    """One AdamW update (SPEC §3) in float64; returns (p, m, v) after step t+1."""
    p, g, m, v = p.double(), g.double(), m.double(), v.double()
    t = t + 1
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p * (1 - lr * wd)
    p = p - (lr / (1 - beta1 ** t)) * m / (v.sqrt() / math.sqrt(1 - beta2 ** t) + eps)
    return p, m, v


MANT = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}


def within_ulps(a: torch.Tensor, b: torch.Tensor, n: int = 1) -> bool:
    """True if ``a`` and ``b`` (same low-precision dtype) differ by at most ``n`` ulps."""
    a64, b64 = a.double(), b.double()
    mag = torch.maximum(a64.abs(), b64.abs())
    tiny = torch.finfo(a.dtype).tiny
    e = torch.floor(torch.log2(torch.clamp(mag, min=tiny)))
    spacing = torch.pow(2.0, e - MANT[a.dtype])
    return bool(((a64 - b64).abs() <= n * spacing + 0).all())
