"""Shared test helpers: float64 oracles of SPEC §1/§3 and backend lists."""
from __future__ import annotations

import math

import pytest
import torch

from fsam_kernels.backends import backend_availability

#: backend names in the order parametrized tests list them
BACKEND_ORDER = ("reference", "foreach", "cpu", "cuda", "triton")


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


def backend_device_pairs(*, reference=True):
    """``(backend, device)`` pairs that can run on this machine, in a fixed order.

    Asks the backend registry (``backend_availability``, i.e. each backend's
    ``Backend.availability(device)``) for every name of ``BACKEND_ORDER`` on
    every device of ``devices()``; nothing is hard-coded. On a CPU-only
    machine that is reference/foreach/cpu on cpu, triton on cpu when
    ``TRITON_INTERPRET=1`` (tests/conftest.py sets it), and cuda on cpu when
    the emulated CUDA backend reports itself available; with a CUDA device
    also reference/foreach/cuda/triton on cuda. ``reference=False`` leaves
    the reference backend out (it is what the fused ones are compared to).
    """
    pairs = []
    for dev in devices():
        for name in BACKEND_ORDER:
            if name == "reference" and not reference:
                continue
            if backend_availability(name, dev)[0]:
                pairs.append((name, dev))
    return pairs


def backend_device_params(*, reference=True):
    """``backend_device_pairs`` as ``pytest.param(backend, device, id="backend-device")``,
    for ``@pytest.mark.parametrize("backend,device", ...)``."""
    return [pytest.param(b, d, id=f"{b}-{d}") for b, d in backend_device_pairs(reference=reference)]


def unavailable_backends():
    """``[(backend, device, reason)]`` for the pairs ``backend_device_pairs`` leaves out."""
    out = []
    for dev in devices():
        for name in BACKEND_ORDER:
            ok, why = backend_availability(name, dev)
            if not ok:
                out.append((name, dev, why))
    return out


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
