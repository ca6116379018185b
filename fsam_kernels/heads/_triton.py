"""Triton kernels of the fused linear cross-entropy head (same API as _torch.py).

Three kernels, none of which writes a logit to memory: each recomputes its
tiles of z = h wᵀ (BLOCK_N tokens x BLOCK_V vocabulary entries, the product
accumulated over d in BLOCK_D slices with ``tl.dot``) where it needs them.

* ``_fwd``: one program per BLOCK_N tokens; an online logsumexp over the
  vocabulary tiles (running max and rescaled sum, in float32) and the target
  logit; writes lse and z_y (N,).
* ``_grad_h``: one program per (BLOCK_N tokens, BLOCK_D features); for every
  vocabulary tile, c = coef·valid·(exp(z − lse) − onehot(y)) rebuilt from
  (h_a, w_a, lse), then ``gh += c @ w_b``.
* ``_grad_w``: one program per (BLOCK_V entries, BLOCK_D features); for every
  token tile, the same c, then ``gw += cᵀ @ h_b``.

With (h_a, w_a) = (h_b, w_b) the two gradient kernels are the loss's
backward; with the clean (h0, W0) and the perturbed (h1, W1) they are
Functional-SAM's J(θ+e)ᵀ c0 for the head. Each output element is owned by
one program (no atomics), so results are deterministic.

Numerics: 16-bit operands are loaded and cast to float32 before any
arithmetic (under autocast the float32 operands are first rounded to the
autocast dtype, as ``F.linear`` would); dots in float32 (``ieee`` under the
interpreter and when torch disallows TF32, else ``tf32``); lse, z_y and the
gradients are float32. float64 operands are refused (the PyTorch path
handles them). Runs on CUDA tensors, or on CPU tensors through the Triton
interpreter (``TRITON_INTERPRET=1``), which is how the tests check it
against the PyTorch implementation.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N, BLOCK_V, BLOCK_D = 32, 64, 32


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, sh, sw,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 PREC: tl.constexpr):
    """z[rows, cols] in float32, accumulated over d in BLOCK_D slices."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    d0 = 0
    while d0 < D:  # not range(): runtime bounds break the Triton 3.6 interpreter
        dd = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(h_ptr + rows[:, None] * sh + dd[None, :],
                    mask=(rows[:, None] < N) & (dd[None, :] < D), other=0.0).to(tl.float32)
        b = tl.load(w_ptr + cols[:, None] * sw + dd[None, :],
                    mask=(cols[:, None] < V) & (dd[None, :] < D), other=0.0).to(tl.float32)
        z += tl.dot(a, tl.trans(b), input_precision=PREC)
        d0 += BLOCK_D
    return z


@triton.jit
def _cotangent_tile(z, lse_ptr, y_ptr, coef_ptr, rows, cols, N, V, ignore_index):
    """coef·valid·(exp(z − lse) − onehot(y)) for one tile (float32)."""
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
    y = tl.load(y_ptr + rows, mask=rows < N, other=ignore_index)
    coef = tl.load(coef_ptr).to(tl.float32)
    valid = (y != ignore_index) & (rows < N)
    p = tl.exp(z - lse[:, None])
    p = tl.where(cols[None, :] == y[:, None], p - 1.0, p)
    scale = tl.where(valid, coef, 0.0)
    p = p * scale[:, None]
    return tl.where(cols[None, :] < V, p, 0.0)


@triton.jit
def _fwd(h_ptr, w_ptr, y_ptr, lse_ptr, zy_ptr, N, V, D, sh, sw, ignore_index,
         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
         PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.load(y_ptr + rows, mask=rows < N, other=ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v0 = 0
    while v0 < V:  # not range(): runtime bounds break the Triton 3.6 interpreter
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, sh, sw,
                         BLOCK_N, BLOCK_V, BLOCK_D, PREC)
        z = tl.where(cols[None, :] < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        v0 += BLOCK_V
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=rows < N)
    tl.store(zy_ptr + rows, tl.where(y != ignore_index, zy, 0.0), mask=rows < N)


@triton.jit
def _grad_h(ha_ptr, wa_ptr, lse_ptr, y_ptr, coef_ptr, wb_ptr, gh_ptr, N, V, D, sh, sw, sg,
            ignore_index, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
            PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    v0 = 0
    while v0 < V:  # not range(): runtime bounds break the Triton 3.6 interpreter
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(ha_ptr, wa_ptr, rows, cols, N, V, D, sh, sw,
                         BLOCK_N, BLOCK_V, BLOCK_D, PREC)
        c = _cotangent_tile(z, lse_ptr, y_ptr, coef_ptr, rows, cols, N, V, ignore_index)
        wb = tl.load(wb_ptr + cols[:, None] * sw + dd[None, :],
                     mask=(cols[:, None] < V) & (dd[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.dot(c, wb, input_precision=PREC)
        v0 += BLOCK_V
    tl.store(gh_ptr + rows[:, None] * sg + dd[None, :], acc,
             mask=(rows[:, None] < N) & (dd[None, :] < D))


@triton.jit
def _grad_w(ha_ptr, wa_ptr, lse_ptr, y_ptr, coef_ptr, hb_ptr, gw_ptr, N, V, D, sh, sw, sg,
            ignore_index, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
            PREC: tl.constexpr):
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    n0 = 0
    while n0 < N:  # not range(): runtime bounds break the Triton 3.6 interpreter
        rows = n0 + tl.arange(0, BLOCK_N)
        z = _logits_tile(ha_ptr, wa_ptr, rows, cols, N, V, D, sh, sw,
                         BLOCK_N, BLOCK_V, BLOCK_D, PREC)
        c = _cotangent_tile(z, lse_ptr, y_ptr, coef_ptr, rows, cols, N, V, ignore_index)
        hb = tl.load(hb_ptr + rows[:, None] * sh + dd[None, :],
                     mask=(rows[:, None] < N) & (dd[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(c), hb, input_precision=PREC)
        n0 += BLOCK_N
    tl.store(gw_ptr + cols[:, None] * sg + dd[None, :], acc,
             mask=(cols[:, None] < V) & (dd[None, :] < D))


def _precision(device: torch.device) -> str:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _operand(t: Tensor, cd: torch.dtype) -> Tensor:
    if cd == torch.float64 or t.dtype == torch.float64:
        raise TypeError("impl='triton': float64 operands are not supported by the Triton "
                        "head kernels; use impl='torch' (or 'auto')")
    if cd in (torch.float16, torch.bfloat16) and t.dtype == torch.float32:
        t = t.to(cd)                        # autocast: the operand rounding of F.linear
    return t.contiguous()


def forward(h: Tensor, w: Tensor, labels: Tensor, ignore_index: int, cd: torch.dtype,
            rows: int, *, coef: Optional[Tensor] = None, need_h: bool = False,
            need_w: bool = False) -> Tuple[Tensor, Tensor, None, None]:
    """``(lse, zy, None, None)`` as :func:`fsam_kernels.heads._torch.forward`
    (``rows``, ``coef`` and ``need_*`` are not used: the gradients are always
    recomputed by :func:`vjp`)."""
    h, w = _operand(h, cd), _operand(w, cd)
    y = labels.contiguous()
    n, d = h.shape
    v = w.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    zy = torch.empty(n, dtype=torch.float32, device=h.device)
    if n:
        _fwd[(triton.cdiv(n, BLOCK_N),)](h, w, y, lse, zy, n, v, d, h.stride(0), w.stride(0),
                                        ignore_index, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
                                        BLOCK_D=BLOCK_D, PREC=_precision(h.device))
    return lse, zy, None, None


def vjp(h_a: Tensor, w_a: Tensor, lse: Tensor, labels: Tensor, ignore_index: int,
        coef: Tensor, h_b: Tensor, w_b: Tensor, cd: torch.dtype, rows: int, *,
        need_h: bool = True, need_w: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(c w_b, cᵀ h_b)`` (float32) as :func:`fsam_kernels.heads._torch.vjp`."""
    ha, wa = _operand(h_a, cd), _operand(w_a, cd)
    hb = ha if h_b is h_a else _operand(h_b, cd)
    wb = wa if w_b is w_a else _operand(w_b, cd)
    if hb.stride() != ha.stride() or wb.stride() != wa.stride():
        raise ValueError("impl='triton': the pass-2 operands' layout differs from pass 1's")
    y = labels.contiguous()
    lse = lse.to(torch.float32).contiguous()
    c = coef.to(device=ha.device, dtype=torch.float32).reshape(1)
    n, d = ha.shape
    v = wa.shape[0]
    prec = _precision(ha.device)
    gh = torch.zeros(n, d, dtype=torch.float32, device=ha.device) if need_h else None
    gw = torch.zeros(v, d, dtype=torch.float32, device=ha.device) if need_w else None
    if n == 0:
        return gh, gw
    if gh is not None:
        grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(d, BLOCK_D))
        _grad_h[grid](ha, wa, lse, y, c, wb, gh, n, v, d, ha.stride(0), wa.stride(0),
                      gh.stride(0), ignore_index, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
                      BLOCK_D=BLOCK_D, PREC=prec)
    if gw is not None:
        grid = (triton.cdiv(v, BLOCK_V), triton.cdiv(d, BLOCK_D))
        _grad_w[grid](ha, wa, lse, y, c, hb, gw, n, v, d, ha.stride(0), wa.stride(0),
                      gw.stride(0), ignore_index, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
                      BLOCK_D=BLOCK_D, PREC=prec)
    return gh, gw
