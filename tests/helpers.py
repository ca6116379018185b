"""Shared test helpers: float64 oracles of SPEC §1/§3 and backend lists."""
from __future__ import annotations

import math

import pytest
import torch

from fsam_kernels.backends import backend_availability

# ------------------------------------------------------------------ tolerances
# The one definition of the SPEC-derived tolerances the tests share
# (../shared/SPEC.md §1, §5); every tolerance follows from SPEC, never from what
# one machine printed.
#
# SPEC §5 "float32 params: params and state within rtol 1e-6, atol 1e-7 after
# 1 step, and after 10 steps within rtol 1e-5; N² within rtol 1e-6." (read: the
# atol 1e-7 holds after 10 steps as well; it is the figure for values near 0.)
F32_RTOL_1, F32_ATOL, F32_RTOL_10 = 1e-6, 1e-7, 1e-5
NORM_RTOL = 1e-6
# Unit roundoffs (round to nearest): |fl(x) - x| <= u |x| for one correctly
# rounded float32 / float64 operation (u = 2^-24 / 2^-53). Bounds against an
# exact (float64) oracle count the float32 roundings of SPEC §1/§3's op
# sequence in units of U32.
U32 = 2.0 ** -24
U64 = 2.0 ** -53
# SPEC §5 "bfloat16/float16 params: within 1 ulp of the parameter dtype; state
# as fp32": ``within_ulps`` below.
# float64 params: SPEC §5 gives no figure; the arithmetic is float64 throughout
# (SPEC notation: float64 state for float64 parameters), each value a few dozen
# correctly rounded operations (≤ u = 2^-53 each), amplified only where the
# bias corrections cancel: an error of k·u in β^t (k ≤ 64: β^t by squaring)
# becomes k·u·β^t/(1-β^t) ≤ 64·u/(1-β2) ≈ 7e-12 for β2 = 0.999, t ≥ 1. Rounded
# up: rtol 1e-10, and atol 1e-13 = 1e-10 × lr (an update term of size lr may
# cancel the parameter).
F64_RTOL, F64_ATOL = 1e-10, 1e-13
# A float64 parameter's perturbation carries the float32 rounding of its scale
# (SPEC §1: N² rounded once to float32, then sqrt, + ε_n and the division in
# float32, "the product formed in float32"): two conforming backends whose N²
# differ by float64 rounding may round N² to adjacent float32 values (2^-23
# relative), which moves sqrt by ≤ 2^-24 + its own rounding 2^-24, and the sum
# and division round once more each (2^-24): |Δscale| ≤ 2^-22·scale; a product
# formed in float32 adds 2^-24 on each side. Bound: 1.5·2^-22 < 2^-21 of |e|.
F64_SCALE_RTOL = 2.0 ** -21
# The scale ρ/(sqrt(N²) + ε_n) of SPEC §1 against its exact value: ρ rounded
# to float32 (1 u), N² rounded once to float32 (1 u, halved by the sqrt), the
# sqrt, the sum and the division (1 u each): ≤ 4.5 u, rounded up to 5 u.
F32_SCALE_ROUNDINGS = 5

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


from fsam_kernels.backends.reference import ReferenceBackend as _ReferenceBackend


class GradSpy(_ReferenceBackend):
    """Reference backend recording the pass-2 grads handed to ``restore_adamw``
    (``seen[p]``) and the perturbed point (``perturbed[p]``), for tests that
    compare them with an independent computation."""

    def __init__(self):
        self.seen = {}
        self.perturbed = {}

    def perturb(self, params, grads, backups, *a, **k):
        super().perturb(params, grads, backups, *a, **k)
        self.perturbed = {p: p.detach().clone() for p in params}

    def restore_adamw(self, params, grads, backups, *a, **k):
        for p, g in zip(params, grads):
            self.seen[p] = g.clone()
        return super().restore_adamw(params, grads, backups, *a, **k)


# ------------------------------------------------------------------ CLI help
def help_entries(parser) -> tuple[str, dict[str, str]]:
    """(``parser``'s --help text at 100 columns, option -> its help joined
    on one line with whitespace collapsed), for the CLI help tests."""
    import os
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        text = parser.format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    entries, flag = {}, None
    for line in text[text.index("options:"):].splitlines()[1:]:
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = ""
        if flag is not None:
            entries[flag] = " ".join((entries[flag] + " " + line).split())
    return text, entries
