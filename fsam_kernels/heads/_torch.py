"""Chunked PyTorch implementation of the fused linear cross-entropy head.

The reference for the Triton kernels and the CPU path. Nothing here ever
holds more than ``rows × V`` logits (one chunk of tokens): the logits of a
chunk are recomputed wherever they are needed, in the manner of Liger-Kernel's
fused linear cross-entropy and Apple's Cut Cross-Entropy (Wijmans et al.
2024), whose code is not used here.

Notation (all functions): ``h`` (N, d) hidden states, ``w`` (V, d) the head
weight, logits ``z = h wᵀ`` (N, V), ``labels`` (N,) int64, ``cd`` the compute
dtype of the two matmul operands (the autocast dtype under autocast, else the
promoted dtype of h and w), ``acc`` the accumulation dtype (float64 for
float64 operands, else float32). Softmax, logsumexp and the cotangent are
formed in ``acc`` from the logits rounded to ``cd`` (as ``F.linear`` under
autocast followed by ``F.cross_entropy(logits.float())`` does).

The cotangent of row i is ``c_i = coef · valid_i · (softmax(z_i) − onehot(y_i))``
with ``valid_i = (y_i != ignore_index)`` and ``coef`` a 0-d tensor (the
upstream gradient times 1/n_valid for the mean): exactly ∂ℓ/∂z of the loss.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

#: default chunk budget in logits elements (rows × V): 8 MiB of float32 ...
DEFAULT_CHUNK_ELEMENTS = 1 << 21
#: ... but at least this many tokens: every chunk reads the whole weight (three
#: times with its gradient), so fewer rows make the head memory-bound on W
#: (measured on the CPU here at V = 131072, d = 128: 16 rows 3x slower than 256)
MIN_CHUNK_ROWS = 256


def acc_dtype(cd: torch.dtype) -> torch.dtype:
    return torch.float64 if cd == torch.float64 else torch.float32


def chunk_rows(n: int, v: int, chunk_size: Optional[int]) -> int:
    """Tokens per chunk, in [1, N]: ``chunk_size``, or by default
    ``max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_ELEMENTS // V)``."""
    rows = (chunk_size if chunk_size is not None
            else max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_ELEMENTS // max(v, 1)))
    return max(1, min(max(n, 1), int(rows)))


def _cotangent_(z: Tensor, lse: Tensor, labels: Tensor, ignore_index: int,
                coef: Tensor) -> Tensor:
    """In place: z (R, V) logits in acc -> coef·valid·(softmax − onehot)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    z.sub_(lse.unsqueeze(1)).exp_()
    z.scatter_add_(1, safe.unsqueeze(1), -valid.to(z.dtype).unsqueeze(1))
    # where, not coef·valid: coef is inf (1/0) for a mean over no valid token,
    # whose gradient is exactly 0 in torch's cross-entropy (inf·0 would be nan)
    z.mul_(torch.where(valid, coef.to(z.dtype), torch.zeros((), dtype=z.dtype,
                                                          device=z.device)).unsqueeze(1))
    return z


def forward(h: Tensor, w: Tensor, labels: Tensor, ignore_index: int, cd: torch.dtype,
            rows: int, *, coef: Optional[Tensor] = None, need_h: bool = False,
            need_w: bool = False) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Per-token logsumexp and target logit, and optionally the gradients.

    Returns ``(lse, zy, gh, gw)``: ``lse`` and ``zy`` (N,) in acc (zy = 0 on
    ignored rows); with ``coef`` given, ``gh = c w`` (N, d) and
    ``gw = cᵀ h`` (V, d) in acc for the cotangent c of the module docstring
    (each only when ``need_h`` / ``need_w``), computed in the same pass over
    each chunk (three matmuls per chunk, as an unfused linear layer plus
    cross-entropy forward and backward); else None.
    """
    n, d = h.shape
    v = w.shape[0]
    acc = acc_dtype(cd)
    wc = w.to(cd)
    lse = torch.empty(n, dtype=acc, device=h.device)
    zy = torch.empty(n, dtype=acc, device=h.device)
    gh = torch.empty(n, d, dtype=acc, device=h.device) if coef is not None and need_h else None
    gw = torch.zeros(v, d, dtype=acc, device=h.device) if coef is not None and need_w else None
    for s in range(0, n, rows):
        e = min(n, s + rows)
        hc = h[s:e].to(cd)
        z = (hc @ wc.t()).to(acc)
        y = labels[s:e]
        valid = y != ignore_index
        safe = torch.where(valid, y, torch.zeros_like(y))
        zy[s:e] = torch.where(valid, z.gather(1, safe.unsqueeze(1)).squeeze(1),
                              torch.zeros((), dtype=acc, device=h.device))
        m = z.amax(dim=1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        ez = z.sub_(m).exp_()                     # z is not needed any more: in place
        tot = ez.sum(dim=1, keepdim=True)
        lse[s:e] = (m + tot.log()).squeeze(1)
        if coef is not None and (need_h or need_w):
            # c = coef·valid·(exp(z − m)/Σ − onehot): one scaling pass and a scatter
            r = torch.where(valid, coef.to(acc), torch.zeros((), dtype=acc, device=h.device))
            c = ez.mul_(r.unsqueeze(1) / tot)
            c.scatter_add_(1, safe.unsqueeze(1), -r.unsqueeze(1))
            c = c.to(cd)
            if gh is not None:
                gh[s:e] = c @ wc
            if gw is not None:
                gw += c.t() @ hc
    return lse, zy, gh, gw


def vjp(h_a: Tensor, w_a: Tensor, lse: Tensor, labels: Tensor, ignore_index: int,
        coef: Tensor, h_b: Tensor, w_b: Tensor, cd: torch.dtype, rows: int, *,
        need_h: bool = True, need_w: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(c w_b, cᵀ h_b)`` for the cotangent c rebuilt from ``(h_a, w_a, lse)``.

    With ``h_a = h_b`` and ``w_a = w_b`` this is the backward of the loss;
    with ``(h_a, w_a)`` the clean ``(h0, W0)`` and ``(h_b, w_b)`` the perturbed
    ``(h1, W1)`` it is Functional-SAM's J(θ+e)ᵀ c0 for the head (the
    gradient into h1 and the head weight's share). ``lse`` must be the
    logsumexp of ``h_a w_aᵀ`` (from :func:`forward`). Results in acc.
    """
    n, d = h_a.shape
    v = w_a.shape[0]
    acc = acc_dtype(cd)
    wa = w_a.to(cd)
    wb = wa if w_b is w_a else w_b.to(cd)
    gh = torch.empty(n, d, dtype=acc, device=h_a.device) if need_h else None
    gw = torch.zeros(v, d, dtype=acc, device=h_a.device) if need_w else None
    for s in range(0, n, rows):
        e = min(n, s + rows)
        ha = h_a[s:e].to(cd)
        z = (ha @ wa.t()).to(acc)
        c = _cotangent_(z, lse[s:e], labels[s:e], ignore_index, coef).to(cd)
        if gh is not None:
            gh[s:e] = c @ wb
        if gw is not None:
            hb = ha if h_b is h_a else h_b[s:e].to(cd)
            gw += c.t() @ hb
    return gh, gw
