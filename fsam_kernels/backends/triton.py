"""Triton backend: the four multi-tensor operations of SPEC §6 as Triton kernels.

One launch per operation per dtype combination covers every tensor of the
call, however many (plus one launch for the norm's finish, and one for the
per-tensor step coefficients in restore_adamw and in the preconditioned
sq_norm / perturb): the kernels read their tensors through device-memory
tables of data pointers and a table of (tensor, chunk) tiles, in the manner of
apex's Triton ``FusedAdamSWA`` and Triton's grouped-GEMM tutorial.

Preparation and caching are the native backends' (:mod:`._prepare`): the
same argument checks and record table (one row of pointers, numel and dtype
codes per tensor), cached on the call site's ``cache=`` dict under the same
rules (see base.py); the launch plan (:class:`_Plan`: every table above, in
one int64 device buffer) is derived from the records alone and hung on the
same entry, keyed by the grads' pointers, so a steady-state step with the
same tensors builds and uploads nothing; calls without a cache find their
plan by the records' content. Grads set to None and reallocated give a new
plan (one upload).

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
parameter's layout (one extra copy, and a fresh launch plan, per call).
Parameters that are not dense and non-overlapping are refused with a
``ValueError`` naming the index.

Devices: CUDA tensors with Triton importable; CPU tensors only through the
Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels module is
first imported), which is how the tests run without a GPU.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import _prepare as P
from .base import Backend


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

    # ------------------------------------------------------------------ calls
    def _cfg(self, device: torch.device):
        return self.config["cuda" if device.type == "cuda" else "cpu"]

    def _run(self, op: dict, a: dict, cache: Optional[dict]):
        """Every method: the checks and records of the shared preparation layer
        (:mod:`._prepare`, as the native backends), the launch plan hung on the
        same entry, then the op's launches."""
        name = op["name"]
        device = P.check_call(op, a, "triton " + name)
        if device is None:
            return None
        prep = P.prepare(op, cache, a, prefix="triton " + name, convert=False)
        chunk = self._cfg(device)[1]
        plan = P.device_tables(prep, ("triton", name, chunk), device,
                               lambda rec: _Plan(rec, chunk, device, name == "restore_adamw"))
        getattr(self, "_" + name)(a, plan, device)

    def _coef(self, plan: "_Plan", device, found_inf: Tensor, *,
              adamw: bool, lr: float = 0.0, beta1: float = 0.0, beta2: float) -> Tensor:
        """Launch coef_kernel over the plan's steps (in launch order); returns
        the float64 buffer."""
        n = plan.n_steps
        coef = torch.empty(2 * n, dtype=torch.float64, device=device)
        sb = self.small_block
        lr_, b1, b2 = _split(lr), _split(beta1), _split(beta2)
        _launch(_kernels().coef_kernel, ((n + sb - 1) // sb,), plan.steps, n, coef, found_inf,
                lr_[0], lr_[1], b1[0], b1[1], b2[0], b2[1], ADAMW=adamw, BLOCK=sb)
        return coef

    # ------------------------------------------------------------------ sq_norm
    def _sq_norm(self, a, plan, device):
        if not plan.groups:
            return
        precondition, grad_scale, out = a["precondition"], a["grad_scale"], a["out"]
        k = _kernels()
        block, chunk, warps = self._cfg(device)
        coef = (self._coef(plan, device, out, adamw=False, beta2=a["beta2"])
                if precondition else None)
        partials = torch.empty(plan.total_tiles, dtype=torch.float64, device=device)
        ep = _split(a["eps"])
        for grp in plan.groups:
            g_dt = grp.g_dt
            v_dt = grp.p_dt if precondition else None   # the state's dtype
            g_tab = grp.tab[_G]
            if precondition:
                v_tab, c = grp.tab[_V], coef[2 * grp.i_off:]
            else:
                v_tab, c = g_tab, partials
            f64 = g_dt == torch.float64 or v_dt == torch.float64
            _launch(k.sq_norm_partial_kernel, (grp.n_tiles,),
                    grp.tt, grp.tc, grp.nt, g_tab, v_tab, c,
                    grad_scale if grad_scale is not None else out, partials[grp.t_off:],
                    ep[0], ep[1],
                    G_DT=_tl_dtype(g_dt), V_DT=_tl_dtype(v_dt or torch.float32),
                    CT=_tl_dtype(torch.float64 if f64 else torch.float32), F64=f64,
                    PRECOND=precondition, HAS_SCALE=grad_scale is not None,
                    CHUNK=chunk, BLOCK=block, num_warps=warps)
        _launch(k.sq_norm_finish_kernel, (1,), partials, plan.total_tiles, out,
                BLOCK=self.small_block)

    # ------------------------------------------------------------------ perturb
    def _perturb(self, a, plan, device):
        precondition, grad_scale = a["precondition"], a["grad_scale"]
        norm_sq, found_inf = a["norm_sq"], a["found_inf"]
        k = _kernels()
        if not plan.groups:
            _launch(k.flag_nonfinite_kernel, (1,), norm_sq, found_inf)
            return
        block, chunk, warps = self._cfg(device)
        ep = _split(a["eps"])
        coef = (self._coef(plan, device, found_inf, adamw=False, beta2=a["beta2"])
                if precondition else None)
        for grp in plan.groups:
            p_tab = grp.tab[_P]
            if precondition:
                v_tab, c = grp.tab[_V], coef[2 * grp.i_off:]
            else:
                v_tab, c = p_tab, grp.nt
            f64 = grp.p_dt == torch.float64
            ct = _tl_dtype(torch.float64 if f64 else torch.float32)
            _launch(k.perturb_kernel, (grp.n_tiles,),
                    grp.tt, grp.tc, grp.nt, p_tab, grp.tab[_G], grp.tab[_B], v_tab, c,
                    grad_scale if grad_scale is not None else found_inf, norm_sq, found_inf,
                    a["rho"], a["norm_eps"], ep[0], ep[1],
                    P_DT=_tl_dtype(grp.p_dt), G_DT=_tl_dtype(grp.g_dt), V_DT=ct, CT=ct,
                    F64=f64, PRECOND=precondition, HAS_SCALE=grad_scale is not None,
                    CHUNK=chunk, BLOCK=block, num_warps=warps)

    # ------------------------------------------------------------ restore_adamw
    def _restore_adamw(self, a, plan, device):
        grad_scale, found_inf, has_backups = a["grad_scale"], a["found_inf"], a["has_backups"]
        lr, beta1, beta2 = a["lr"], a["beta1"], a["beta2"]
        if plan.n_steps == 0:
            return
        k = _kernels()
        block, chunk, warps = self._cfg(device)
        # reads every step (the empty tensors' last), writes step + 1 (unless
        # found_inf) before any tile runs
        coef = self._coef(plan, device, found_inf, adamw=True, lr=lr, beta1=beta1, beta2=beta2)
        decay = _split(1.0 - lr * a["weight_decay"])
        w1 = _split(1.0 - beta1)
        b2 = _split(beta2)
        omb2 = _split(1.0 - beta2)
        ep = _split(a["eps"])
        gsign = -1.0 if a["maximize"] else 1.0
        for grp in plan.groups:
            p_tab = grp.tab[_P]
            f64 = grp.p_dt == torch.float64
            _launch(k.restore_adamw_kernel, (grp.n_tiles,),
                    grp.tt, grp.tc, grp.nt, p_tab, grp.tab[_G],
                    grp.tab[_B] if has_backups else p_tab, grp.tab[_M], grp.tab[_V],
                    coef[2 * grp.i_off:],
                    grad_scale if grad_scale is not None else found_inf, found_inf,
                    decay[0], decay[1], w1[0], w1[1], b2[0], b2[1], omb2[0], omb2[1],
                    ep[0], ep[1], gsign,
                    P_DT=_tl_dtype(grp.p_dt), G_DT=_tl_dtype(grp.g_dt),
                    CT=_tl_dtype(torch.float64 if f64 else torch.float32), F64=f64,
                    HAS_BACKUP=has_backups, HAS_SCALE=grad_scale is not None,
                    CHUNK=chunk, BLOCK=block, num_warps=warps)

    # ------------------------------------------------------------------ restore
    def _restore(self, a, plan, device):
        k = _kernels()
        block, chunk, warps = self._cfg(device)
        for grp in plan.groups:
            _launch(k.restore_kernel, (grp.n_tiles,), grp.tt, grp.tc, grp.nt,
                    grp.tab[_P], grp.tab[_B],
                    P_DT=_tl_dtype(grp.p_dt), CHUNK=chunk, BLOCK=block, num_warps=warps)


for _name in P.OPS:
    setattr(TritonBackend, _name, P.backend_method(_name, TritonBackend._run))


# ------------------------------------------------------------ the launch plan
_P, _G, _B, _M, _V, _S = range(6)   # record columns (_prepare.ROLES)


def _aligned(n: int) -> int:
    """``n`` rounded up to an even count of int64 (16-byte aligned segments:
    Triton specialises pointer arguments on 16-byte divisibility)."""
    return n + (n & 1)


class _Group:
    """The tensors of one dtype combination: dtypes, their tables (views of the
    plan's one device buffer), offsets in the call's order."""

    __slots__ = ("p_dt", "g_dt", "tt", "tc", "nt", "n_tiles", "tab", "i_off", "t_off")


class _Plan:
    """The Triton launch tables of one call, derived from its records alone
    (so :func:`_prepare.device_tables` may reuse them for equal records):
    the non-empty tensors grouped by dtype combination (record column 7) in
    first-seen order; per group its tile table (``tile_tensor``,
    ``tile_chunk``: for program ``pid``, the tensor within the group and the
    chunk within the tensor), numel table and one pointer table per role; the
    step pointer table of every tensor in launch order (with ``with_empty``
    the empty tensors last: restore_adamw increments their steps too). All of
    it int64, in one host array uploaded once."""

    __slots__ = ("groups", "steps", "n_steps", "total_tiles", "buf")

    def __init__(self, rec: P.Records, chunk: int, device: torch.device, with_empty: bool):
        a = rec.a
        numel = a[:, 6]
        live = np.flatnonzero(numel > 0)
        by_code: Dict[int, List[int]] = {}
        for i, c in zip(live.tolist(), a[live, 7].tolist()):
            by_code.setdefault(c, []).append(i)
        order = [i for idx in by_code.values() for i in idx]
        if with_empty:
            order += np.flatnonzero(numel == 0).tolist()
        m = len(order)
        mp = _aligned(m)
        parts = [np.zeros((6, mp), dtype=np.int64)]
        parts[0][:, :m] = a[order, :6].T
        segs = []   # per group: (tt, tc, nt) offsets and lengths in the buffer
        off = 6 * mp
        i_off = t_off = 0
        for c, idx in by_code.items():
            n = numel[idx]
            counts = (n + chunk - 1) // chunk
            n_tiles = int(counts.sum())
            tt = np.repeat(np.arange(len(idx), dtype=np.int64), counts)
            first = np.cumsum(counts) - counts
            tc = np.arange(n_tiles, dtype=np.int64) - np.repeat(first, counts)
            seg = []
            for arr in (tt, tc, n.astype(np.int64)):
                padded = np.zeros(_aligned(len(arr)), dtype=np.int64)
                padded[:len(arr)] = arr
                parts.append(padded)
                seg.append((off, len(arr)))
                off += len(padded)
            segs.append((c, len(idx), n_tiles, seg, i_off, t_off))
            i_off += len(idx)
            t_off += n_tiles
        host = np.concatenate([p.reshape(-1) for p in parts])
        self.buf = buf = P.upload(host, device)
        self.groups = []
        for c, k, n_tiles, seg, i0, t0 in segs:
            g = _Group()
            g.p_dt, g.g_dt = P.CODE_DTYPE[c & 0xFFFFFFFF], P.CODE_DTYPE[c >> 32]
            g.tt, g.tc, g.nt = (buf[o:o + n] for o, n in seg)
            g.tab = [buf[r * mp + i0: r * mp + i0 + k] for r in range(6)]
            g.n_tiles, g.i_off, g.t_off = n_tiles, i0, t0
            self.groups.append(g)
        self.steps = buf[_S * mp: _S * mp + m]
        self.n_steps = m
        self.total_tiles = t_off


__all__ = ["TritonBackend"]
