"""Memory-layout checks shared by the fused backends (native, triton).

The fused kernels walk a parameter and its backup/state/grad in memory order,
which is correct by logical index exactly when all of them are dense
(non-overlapping, no gaps) and share strides. The argument checks below are
the one set both fused backends use (same signatures, same messages).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """True when ``t`` is non-overlapping and dense in some dimension order
    (contiguous, channels_last, a transposed matrix...)."""
    if t.numel() <= 1 or t.is_contiguous():
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same strides on every dimension of size > 1."""
    if a.shape != b.shape:
        return False
    if a.is_contiguous() and b.is_contiguous():
        return True
    return all(sa == sb for sa, sb, sz in zip(a.stride(), b.stride(), a.shape) if sz != 1)


# ---------------------------------------------------------------------------
# Argument checks of the fused backends (native cpu/cuda and triton share
# them, so the two refuse the same arguments with the same messages). ``op`` is
# the message prefix: the operation's name, e.g. "perturb" or "triton perturb".
# ---------------------------------------------------------------------------
#: parameter (and grad) dtypes the fused kernels take
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """dtype of exp_avg / exp_avg_sq for a parameter of ``param_dtype`` (float64
    for float64 parameters, else float32; SPEC §3)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, strides {tuple(t.stride())}, dtype {t.dtype}"


def check_lengths(op: str, n: int, **lists) -> None:
    """ValueError unless every list given (None: not checked) has ``n`` entries."""
    for name, lst in lists.items():
        if lst is not None and len(lst) != n:
            raise ValueError(f"{op}: {name} has {len(lst)} entries, expected {n} "
                             f"(one per parameter)")


def check_dtype(t: Tensor, what: str, i: int, op: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {what}[{i}] has dtype {t.dtype}; expected float32, float16, "
                        f"bfloat16 or float64")


def check_param(p: Tensor, i: int, op: str, device: torch.device) -> None:
    """``params[i]`` must be a dense (any dimension order), non-overlapping,
    strided float tensor on ``device``: ValueError / TypeError naming it."""
    if p.device != device:
        raise ValueError(f"{op}: params[{i}] is on {p.device}, expected {device} "
                         f"(one call covers one device)")
    check_dtype(p, "params", i, op)
    if p.is_sparse or p.layout != torch.strided:
        raise ValueError(f"{op}: params[{i}] has layout {p.layout}; expected torch.strided")
    if p.numel() and not is_dense(p):
        raise ValueError(
            f"{op}: params[{i}] ({describe(p)}) is not dense and non-overlapping (an "
            f"overlapping or strided view); the fused kernels need a dense parameter "
            f"(contiguous, channels_last or any permutation of those)")


def check_like(t: Optional[Tensor], p: Tensor, what: str, i: int, op: str,
               dtype: Optional[torch.dtype] = None) -> None:
    """``what[i]`` (a backup or state tensor) must have ``dtype`` and the shape,
    strides and device of its parameter ``p``."""
    if t is None:
        raise ValueError(f"{op}: {what}[{i}] is None")
    if t.device != p.device:
        raise ValueError(f"{op}: {what}[{i}] is on {t.device}, expected {p.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {what}[{i}] has dtype {t.dtype}, expected {dtype} for a "
                        f"{p.dtype} parameter")
    if t.shape != p.shape:
        raise ValueError(f"{op}: {what}[{i}] has shape {tuple(t.shape)}, expected "
                         f"{tuple(p.shape)} (the parameter's)")
    if p.numel() and not same_layout(t, p):
        raise ValueError(f"{op}: {what}[{i}] ({describe(t)}) does not have the layout of "
                         f"params[{i}] ({describe(p)}); state and backups must share the "
                         f"parameter's layout (create them with zeros_like/empty_like)")


def check_state(v: Optional[Tensor], i: int, op: str, device: torch.device) -> None:
    """``exp_avg_sqs[i]`` of sq_norm (no parameter to compare with): a dense
    float32/float64 tensor on ``device``."""
    if v is None or v.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: exp_avg_sqs[{i}] has dtype {getattr(v, 'dtype', None)}; "
                        f"expected float32 (float64 for float64 parameters)")
    if v.device != device:
        raise ValueError(f"{op}: exp_avg_sqs[{i}] is on {v.device}, expected {device}")
    if v.numel() and not is_dense(v):
        raise ValueError(f"{op}: exp_avg_sqs[{i}] ({describe(v)}) is not dense and "
                         f"non-overlapping")


def check_scalar(t: Optional[Tensor], name: str, device: torch.device, op: str, *,
                 optional: bool = False, dtype: torch.dtype = torch.float32) -> None:
    """``name`` must be a one-element ``dtype`` tensor on ``device`` (None only
    when ``optional``): TypeError for the dtype or size, ValueError otherwise."""
    if t is None:
        if optional:
            return
        raise ValueError(f"{op}: {name} is required")
    if not isinstance(t, Tensor) or t.dtype != dtype or t.numel() != 1:
        what = " (N², the backend's norm_dtype)" if dtype == torch.float64 else ""
        desc = (f"dtype {t.dtype} with {t.numel()} elements" if isinstance(t, Tensor)
                else type(t).__name__)
        raise TypeError(f"{op}: {name} must be a one-element "
                        f"{str(dtype).replace('torch.', '')} tensor{what}, got {desc}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} "
                         f"(the tensors' device)")


def grad_in_layout(g: Optional[Tensor], like: Tensor, i: int, op: str,
                   want64: Optional[bool] = None) -> Tensor:
    """``grads[i]`` checked against ``like`` (its parameter, or exp_avg_sq) and
    returned in ``like``'s memory layout (copied when its strides differ or it
    is not dense), so the kernels read it by logical index. ``want64`` True /
    False: converted to float64 / to a 16/32-bit dtype (float32) if needed;
    None: dtype kept."""
    if g is None:
        raise ValueError(f"{op}: grads[{i}] is None (the optimizer passes only parameters "
                         f"that have a grad)")
    if g.device != like.device:
        raise ValueError(f"{op}: grads[{i}] is on {g.device}, expected {like.device}")
    if g.layout != torch.strided:
        raise ValueError(f"{op}: grads[{i}] has layout {g.layout}; sparse grads are not "
                         f"supported")
    if g.shape != like.shape:
        raise ValueError(f"{op}: grads[{i}] has shape {tuple(g.shape)}, expected "
                         f"{tuple(like.shape)}")
    check_dtype(g, "grads", i, op)
    if want64 is True and g.dtype != torch.float64:
        g = g.to(torch.float64)
    elif want64 is False and g.dtype == torch.float64:
        g = g.to(torch.float32)
    if g.numel() and not (is_dense(g) and same_layout(g, like)):
        g2 = torch.empty_like(like, dtype=g.dtype)  # preserve_format: like's strides
        g2.copy_(g)
        g = g2
    return g


def plain_grad(g: Optional[Tensor], i: int, op: str, device: torch.device) -> Tensor:
    """``grads[i]`` of the plain sq_norm (Σ g² needs no particular order): a
    dense copy when it is not dense."""
    if g is None:
        raise ValueError(f"{op}: grads[{i}] is None")
    if g.device != device:
        raise ValueError(f"{op}: grads[{i}] is on {g.device}, expected {device}")
    check_dtype(g, "grads", i, op)
    if g.layout != torch.strided:
        raise ValueError(f"{op}: grads[{i}] has layout {g.layout}; sparse grads are not "
                         f"supported")
    return g.contiguous() if g.numel() and not is_dense(g) else g


def check_update_args(op: str, params, grads, backups, exp_avgs, exp_avg_sqs, steps,
                      device: torch.device, convert: bool) -> list:
    """Per-tensor checks of perturb / restore_adamw / restore (a role the op
    does not take: None): every parameter (:func:`check_param`), backups in
    its dtype and layout, state in :func:`state_dtype` and its layout, steps as
    one-element float32 tensors on ``device``. Returns the grads in their
    parameters' layouts (:func:`grad_in_layout`; ``convert``: float64 exactly
    for float64 parameters, as the native kernels read them), [] without grads."""
    gs = []
    for i, p in enumerate(params):
        check_param(p, i, op, device)
        if backups is not None:
            check_like(backups[i], p, "backups", i, op, p.dtype)
        sd = state_dtype(p.dtype)
        if exp_avgs is not None:
            check_like(exp_avgs[i], p, "exp_avgs", i, op, sd)
        if exp_avg_sqs is not None:
            check_like(exp_avg_sqs[i], p, "exp_avg_sqs", i, op, sd)
        if steps is not None:
            check_scalar(steps[i], f"steps[{i}]", device, op)
        if grads is not None:
            gs.append(grad_in_layout(grads[i], p, i, op,
                                     (p.dtype == torch.float64) if convert else None))
    return gs


def check_norm_args(op: str, grads, exp_avg_sqs, steps, precondition: bool,
                    device: torch.device, convert: bool) -> list:
    """Per-tensor checks of sq_norm: with ``precondition`` each exp_avg_sq
    (:func:`check_state`) and step, and the grad in the exp_avg_sq's layout;
    without, the grad on ``device`` (a dense copy if it is not dense). Returns
    the grads as the kernels read them (``convert``: float64 exactly where the
    state is float64)."""
    gs = []
    for i, g in enumerate(grads):
        if precondition:
            v = exp_avg_sqs[i]
            check_state(v, i, op, device)
            check_scalar(steps[i], f"steps[{i}]", device, op)
            g = grad_in_layout(g, v, i, op, (v.dtype == torch.float64) if convert else None)
        else:
            g = plain_grad(g, i, op, device)
        gs.append(g)
    return gs
