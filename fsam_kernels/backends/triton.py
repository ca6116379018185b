"""Triton backend: the four multi-tensor operations of SPEC §6 as Triton kernels.

One launch per operation per dtype combination covers every tensor of the
call, however many (plus one launch for the norm's finish, and one for the
per-tensor step coefficients in restore_adamw and in the preconditioned
sq_norm / perturb): the kernels read their tensors through device-memory
tables of data pointers and a table of (tensor, chunk) tiles, in the manner of
apex's Triton ``FusedAdamSWA`` and Triton's grouped-GEMM tutorial. The tables
are cached, keyed by the tuple of data pointers (pointer tables) and of sizes
(tile tables), and rebuilt only when a storage changes (for example gradients
set to None and reallocated: only the grad pointer table is rebuilt).

Numerics (SPEC §1-§4): arithmetic in float32 (float64 for float64
parameters), 16-bit values cast on load and rounded once on store, to nearest
even (bfloat16 explicitly in the kernels: the interpreter's cast truncates);
the norm in two deterministic stages (per-tile partials in float64, then one
program adding them in a fixed order into the float64 ``out``, so N² stays
float64 across calls and groups and is rounded to float32 once, where the
perturbation kernel forms the scale), left on the device and read through a
pointer by the perturbation kernel; ``grad_scale`` divides grads
inside the kernels; ``found_inf`` is read inside the kernels; per-tensor steps
are read through a pointer table, bias corrections are computed in-kernel and
steps are incremented in-kernel. Nothing in the step path reads a device value
back to the host.

Layout: parameters, backups and optimizer state must share strides (state
created with ``zeros_like(p)`` does); each such tensor is processed in memory
order, so dense non-contiguous parameters (channels_last, transposed) work. A
grad whose strides differ from its parameter's is first copied into the
parameter's layout (one extra copy, and a fresh grad pointer table, per call).
Parameters that are not dense and non-overlapping are refused with a
``ValueError`` naming the index.

Devices: CUDA tensors with Triton importable; CPU tensors only through the
Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels module is
first imported), which is how the tests run without a GPU.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .base import Backend
from . import layout as L

#: maximum number of cached device tables (pointer and tile tables together)
_CACHE_SIZE = 256


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton is not importable: {exc}"
    return None


def _kernels():
    from . import _triton_kernels
    return _triton_kernels


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }[dtype]


def _launch(kernel, grid, *args, **meta):
    """Every kernel launch of this backend goes through here (tests count them).

    Launches on the device of the tensor arguments (Triton launches on the
    current CUDA device otherwise).
    """
    # no mul+add contraction: each operation rounds as in the reference
    meta.setdefault("enable_fp_fusion", False)
    dev = next(a.device for a in args if isinstance(a, Tensor))
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _split(x: float) -> Tuple[float, float]:
    """A float64 value as a float32 (hi, lo) pair: hi + lo == x to ~2^-48."""
    hi = float(np.float32(x))
    lo = float(np.float32(x - hi))
    return hi, lo


def _given(xs):
    """A required list argument for the length checks (None has no entries)."""
    return () if xs is None else xs


# ----------------------------------------------------------------- the backend
class TritonBackend(Backend):
    """Triton multi-tensor kernels (see the module docstring)."""

    name = "triton"
    norm_dtype = torch.float64
    fused = True

    #: (BLOCK, CHUNK, num_warps) per device type: a program handles CHUNK
    #: elements in CHUNK // BLOCK blocks. The interpreter is slow per program,
    #: so large chunks there.
    config = {
        "cuda": (1024, 8192, 4),
        "cpu": (4096, 4096, 1),
    }
    #: block of the norm-finish and coefficient kernels
    small_block = 1024

    def __init__(self) -> None:
        self._cache: "OrderedDict[tuple, object]" = OrderedDict()

    # ------------------------------------------------------------ availability
    @classmethod
    def availability(cls, device: torch.device) -> tuple[bool, str]:
        device = torch.device(device)
        err = _triton_import_error()
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False, "CUDA is not available"
            if err:
                return False, err
            return True, ""
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                return False, ("CPU tensors need the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before triton is imported")
            if err:
                return False, err
            try:
                from triton.runtime.interpreter import InterpretedFunction
                if not isinstance(_kernels().restore_kernel, InterpretedFunction):
                    return False, ("the triton kernels were compiled without the "
                                   "interpreter (TRITON_INTERPRET=1 was set too late)")
            except Exception as exc:  # pragma: no cover
                return False, f"triton interpreter unavailable: {exc}"
            return True, ""
        return False, f"device type {device.type!r} is not supported (cuda, or cpu " \
                      f"through the Triton interpreter)"

    # ------------------------------------------------------------------ tables
    def _cached(self, key: tuple, build):
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        value = build()
        self._cache[key] = value
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return value

    @staticmethod
    def _to_device(host: Tensor, device: torch.device) -> Tensor:
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host

    def _ptr_table(self, tensors: Sequence[Tensor], device: torch.device) -> Tensor:
        ptrs = tuple(t.data_ptr() for t in tensors)
        return self._cached(
            ("ptr", device, ptrs),
            lambda: self._to_device(torch.tensor(ptrs, dtype=torch.int64), device))

    def _tiles(self, numels: Tuple[int, ...], chunk: int, device: torch.device):
        """(tile_tensor int32, tile_chunk int32, numel int64, n_tiles) for ``numels``."""
        def build():
            n = torch.tensor(numels, dtype=torch.int64)
            counts = (n + chunk - 1) // chunk
            n_tiles = int(counts.sum())
            tile_tensor = torch.repeat_interleave(
                torch.arange(len(numels), dtype=torch.int64), counts)
            first = torch.cumsum(counts, 0) - counts
            tile_chunk = torch.arange(n_tiles, dtype=torch.int64) - torch.repeat_interleave(first, counts)
            if n_tiles and int(tile_chunk.max()) >= 2 ** 31:  # pragma: no cover
                raise ValueError("triton backend: a tensor has more than 2^31 chunks")
            return (self._to_device(tile_tensor.to(torch.int32), device),
                    self._to_device(tile_chunk.to(torch.int32), device),
                    self._to_device(n, device), n_tiles)
        return self._cached(("tiles", device, numels, chunk), build)

    def _cfg(self, device: torch.device):
        return self.config["cuda" if device.type == "cuda" else "cpu"]

    @staticmethod
    def _group(indices: Sequence[int], key_of) -> Dict[tuple, List[int]]:
        """Indices grouped by dtype combination, in first-seen order."""
        groups: Dict[tuple, List[int]] = {}
        for i in indices:
            groups.setdefault(key_of(i), []).append(i)
        return groups

    def _coef(self, steps_in_order: Sequence[Tensor], device, found_inf: Tensor, *,
              adamw: bool, lr: float = 0.0, beta1: float = 0.0, beta2: float) -> Tensor:
        """Launch coef_kernel over ``steps_in_order``; returns the float64 buffer."""
        n = len(steps_in_order)
        coef = torch.empty(2 * n, dtype=torch.float64, device=device)
        s_tab = self._ptr_table(steps_in_order, device)
        sb = self.small_block
        lr_, b1, b2 = _split(lr), _split(beta1), _split(beta2)
        _launch(_kernels().coef_kernel, ((n + sb - 1) // sb,), s_tab, n, coef, found_inf,
                lr_[0], lr_[1], b1[0], b1[1], b2[0], b2[1], ADAMW=adamw, BLOCK=sb)
        return coef

    # ------------------------------------------------------------------ sq_norm
    def sq_norm(self, grads, exp_avg_sqs, steps, *, beta2, eps, precondition,
                grad_scale, out, cache=None):
        if out.dtype != self.norm_dtype or out.numel() != 1:
            raise TypeError(f"triton backend: out is {out.dtype} of shape {tuple(out.shape)}; "
                            f"expected a 0-d float64 tensor (norm_dtype, SPEC §1)")
        op = "triton sq_norm"
        device = out.device
        n = len(grads)
        L.check_scalar(grad_scale, "grad_scale", device, op, optional=True)
        if precondition:
            L.check_lengths(op, n, exp_avg_sqs=_given(exp_avg_sqs), steps=_given(steps))
        gs = L.check_norm_args(op, grads, exp_avg_sqs, steps, precondition, device, False)

        live = [i for i in range(n) if gs[i].numel() > 0]
        if not live:
            return
        groups = self._group(
            live, lambda i: (gs[i].dtype, exp_avg_sqs[i].dtype if precondition else None))
        order = [i for idx in groups.values() for i in idx]
        k = _kernels()
        block, chunk, warps = self._cfg(device)
        coef = (self._coef([steps[i] for i in order], device, out, adamw=False, beta2=beta2)
                if precondition else None)
        plans = []
        total_tiles = 0
        done = 0
        for key, idx in groups.items():
            tiles = self._tiles(tuple(gs[i].numel() for i in idx), chunk, device)
            plans.append((key, idx, tiles, total_tiles, done))
            total_tiles += tiles[3]
            done += len(idx)
        partials = torch.empty(total_tiles, dtype=torch.float64, device=device)
        ep = _split(eps)
        for (g_dt, v_dt), idx, (tt, tc, nt, n_tiles), t_off, i_off in plans:
            g_tab = self._ptr_table([gs[i] for i in idx], device)
            if precondition:
                v_tab = self._ptr_table([exp_avg_sqs[i] for i in idx], device)
                c = coef[2 * i_off:]
            else:
                v_tab, c = g_tab, partials
            f64 = g_dt == torch.float64 or v_dt == torch.float64
            _launch(k.sq_norm_partial_kernel, (n_tiles,),
                    tt, tc, nt, g_tab, v_tab, c,
                    grad_scale if grad_scale is not None else out, partials[t_off:],
                    ep[0], ep[1],
                    G_DT=_tl_dtype(g_dt), V_DT=_tl_dtype(v_dt or torch.float32),
                    CT=_tl_dtype(torch.float64 if f64 else torch.float32), F64=f64,
                    PRECOND=bool(precondition), HAS_SCALE=grad_scale is not None,
                    CHUNK=chunk, BLOCK=block, num_warps=warps)
        _launch(k.sq_norm_finish_kernel, (1,), partials, total_tiles, out,
                BLOCK=self.small_block)

    # ------------------------------------------------------------------ perturb
    def perturb(self, params, grads, backups, exp_avg_sqs, steps, *, rho, norm_sq,
                norm_eps, beta2, eps, precondition, grad_scale, found_inf, cache=None):
        op = "triton perturb"
        n = len(params)
        L.check_lengths(op, n, grads=_given(grads), backups=_given(backups))
        if precondition:
            L.check_lengths(op, n, exp_avg_sqs=_given(exp_avg_sqs), steps=_given(steps))
        device = found_inf.device
        L.check_scalar(found_inf, "found_inf", device, op)
        L.check_scalar(norm_sq, "norm_sq", device, op, dtype=self.norm_dtype)
        L.check_scalar(grad_scale, "grad_scale", device, op, optional=True)
        gs = L.check_update_args(op, params, grads, backups, None,
                                 exp_avg_sqs if precondition else None,
                                 steps if precondition else None, device, False)

        k = _kernels()
        live = [i for i in range(n) if params[i].numel() > 0]
        if not live:
            _launch(k.flag_nonfinite_kernel, (1,), norm_sq, found_inf)
            return
        block, chunk, warps = self._cfg(device)
        ep = _split(eps)
        groups = self._group(live, lambda i: (params[i].dtype, gs[i].dtype))
        order = [i for idx in groups.values() for i in idx]
        coef = (self._coef([steps[i] for i in order], device, found_inf, adamw=False,
                           beta2=beta2)
                if precondition else None)
        done = 0
        for (p_dt, g_dt), idx in groups.items():
            tt, tc, nt, n_tiles = self._tiles(tuple(params[i].numel() for i in idx),
                                              chunk, device)
            p_tab = self._ptr_table([params[i] for i in idx], device)
            g_tab = self._ptr_table([gs[i] for i in idx], device)
            b_tab = self._ptr_table([backups[i] for i in idx], device)
            if precondition:
                v_tab = self._ptr_table([exp_avg_sqs[i] for i in idx], device)
                c = coef[2 * done:]
            else:
                v_tab, c = p_tab, nt
            done += len(idx)
            f64 = p_dt == torch.float64
            ct = _tl_dtype(torch.float64 if f64 else torch.float32)
            _launch(k.perturb_kernel, (n_tiles,),
                    tt, tc, nt, p_tab, g_tab, b_tab, v_tab, c,
                    grad_scale if grad_scale is not None else found_inf, norm_sq, found_inf,
                    float(rho), float(norm_eps), ep[0], ep[1],
                    P_DT=_tl_dtype(p_dt), G_DT=_tl_dtype(g_dt), V_DT=ct, CT=ct, F64=f64,
                    PRECOND=bool(precondition), HAS_SCALE=grad_scale is not None,
                    CHUNK=chunk, BLOCK=block, num_warps=warps)

    # ------------------------------------------------------------ restore_adamw
    def restore_adamw(self, params, grads, backups, exp_avgs, exp_avg_sqs, steps, *,
                      lr, beta1, beta2, eps, weight_decay, maximize, grad_scale,
                      found_inf, cache=None):
        op = "triton restore_adamw"
        n = len(params)
        L.check_lengths(op, n, grads=_given(grads), backups=backups, exp_avgs=_given(exp_avgs),
                        exp_avg_sqs=_given(exp_avg_sqs), steps=_given(steps))
        device = found_inf.device
        L.check_scalar(found_inf, "found_inf", device, op)
        L.check_scalar(grad_scale, "grad_scale", device, op, optional=True)
        gs = L.check_update_args(op, params, grads, backups, exp_avgs, exp_avg_sqs, steps,
                                 device, False)
        if n == 0:
            return
        k = _kernels()
        block, chunk, warps = self._cfg(device)
        live = [i for i in range(n) if params[i].numel() > 0]
        groups = self._group(live, lambda i: (params[i].dtype, gs[i].dtype))
        live_set = set(live)
        # live tensors in launch order, then the empty ones (their steps count too)
        order = [i for idx in groups.values() for i in idx] + \
                [i for i in range(n) if i not in live_set]
        # reads every step, writes step + 1 (unless found_inf) before any tile runs
        coef = self._coef([steps[i] for i in order], device, found_inf, adamw=True,
                          lr=lr, beta1=beta1, beta2=beta2)
        decay = _split(1.0 - lr * weight_decay)
        w1 = _split(1.0 - beta1)
        b2 = _split(beta2)
        omb2 = _split(1.0 - beta2)
        ep = _split(eps)
        gsign = -1.0 if maximize else 1.0
        done = 0
        for (p_dt, g_dt), idx in groups.items():
            tt, tc, nt, n_tiles = self._tiles(tuple(params[i].numel() for i in idx),
                                              chunk, device)
            p_tab = self._ptr_table([params[i] for i in idx], device)
            g_tab = self._ptr_table([gs[i] for i in idx], device)
            b_tab = (self._ptr_table([backups[i] for i in idx], device)
                     if backups is not None else p_tab)
            m_tab = self._ptr_table([exp_avgs[i] for i in idx], device)
            v_tab = self._ptr_table([exp_avg_sqs[i] for i in idx], device)
            c = coef[2 * done:]
            done += len(idx)
            f64 = p_dt == torch.float64
            _launch(k.restore_adamw_kernel, (n_tiles,),
                    tt, tc, nt, p_tab, g_tab, b_tab, m_tab, v_tab, c,
                    grad_scale if grad_scale is not None else found_inf, found_inf,
                    decay[0], decay[1], w1[0], w1[1], b2[0], b2[1], omb2[0], omb2[1],
                    ep[0], ep[1], gsign,
                    P_DT=_tl_dtype(p_dt), G_DT=_tl_dtype(g_dt),
                    CT=_tl_dtype(torch.float64 if f64 else torch.float32), F64=f64,
                    HAS_BACKUP=backups is not None, HAS_SCALE=grad_scale is not None,
                    CHUNK=chunk, BLOCK=block, num_warps=warps)

    # ------------------------------------------------------------------ restore
    def restore(self, params, backups, *, cache=None):
        op = "triton restore"
        n = len(params)
        L.check_lengths(op, n, backups=_given(backups))
        if n == 0:
            return
        device = params[0].device
        L.check_update_args(op, params, None, backups, None, None, None, device, False)
        live = [i for i in range(n) if params[i].numel() > 0]
        if not live:
            return
        k = _kernels()
        block, chunk, warps = self._cfg(device)
        for (p_dt,), idx in self._group(live, lambda i: (params[i].dtype,)).items():
            tt, tc, nt, n_tiles = self._tiles(tuple(params[i].numel() for i in idx),
                                              chunk, device)
            _launch(k.restore_kernel, (n_tiles,), tt, tc, nt,
                    self._ptr_table([params[i] for i in idx], device),
                    self._ptr_table([backups[i] for i in idx], device),
                    P_DT=_tl_dtype(p_dt), CHUNK=chunk, BLOCK=block, num_warps=warps)


__all__ = ["TritonBackend"]
