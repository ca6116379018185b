"""The SAM users run today: a per-tensor wrapper in the common style.

This is the baseline of the kernel benchmark (bench/kernels.py). It follows
the widely copied wrapper of davda54/sam (``sam.py``; the pattern most SAM
code on GitHub uses) around ``torch.optim.AdamW``:

- first_step: the gradient norm as the norm of the stacked per-tensor norms,
  ``torch.norm(torch.stack([g.norm(2) for g in grads]), 2)``; then, per
  tensor, a fresh ``clone()`` of the parameter as backup and ``p.add_(e)``
  with ``e = g * rho / (norm + 1e-12)``;
- second_step: restore every parameter from its backup, then
  ``torch.optim.AdamW(fused=True).step()`` (``foreach=True`` where the fused
  implementation is not available for the device; ``base_impl`` says which).

Restoring: davda54/sam writes ``p.data = old_p`` (it swaps the parameter's
storage for the clone); this file restores by ``p.copy_(old_p)`` by default
(``restore="copy"``), which keeps parameter storage and views valid, as the
fsam_kernels optimizers do. ``restore="swap"`` gives the storage swap.

It is plain SAM (no preconditioning, not adaptive) and never skips a step on
non-finite values; it is a timing baseline, not part of the library.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch


def adamw_fused_supported(device) -> Tuple[bool, str]:
    """Whether ``torch.optim.AdamW(fused=True)`` steps on ``device`` (tried on a tiny tensor)."""
    device = torch.device(device)
    try:
        p = torch.zeros(4, device=device)
        p.grad = torch.ones(4, device=device)
        torch.optim.AdamW([p], lr=1e-3, fused=True).step()
        return True, ""
    except Exception as exc:  # old torch, unsupported device
        return False, f"torch.optim.AdamW(fused=True) failed on {device}: {type(exc).__name__}: {exc}"


class CommonSAM(torch.optim.Optimizer):
    """Per-tensor SAM wrapper around torch.optim.AdamW (davda54/sam style).

    Usage (hand-written loop)::

        loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)
    """

    def __init__(self, params: Iterable, rho: float = 0.05, *, lr: float = 1e-3,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 fused: Optional[bool] = None, restore: str = "copy") -> None:
        if rho < 0:
            raise ValueError(f"rho: expected >= 0, got {rho!r}")
        if restore not in ("copy", "swap"):
            raise ValueError(f"restore: expected 'copy' or 'swap', got {restore!r}")
        params = list(params)
        super().__init__(params, dict(rho=rho, lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay))
        self.restore_mode = restore
        kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.base_note = ""
        if fused is None:
            dev = self.param_groups[0]["params"][0].device
            fused, why = adamw_fused_supported(dev)
            if not fused:
                self.base_note = why + "; using foreach=True"
        if fused:
            self.base_optimizer = torch.optim.AdamW(self.param_groups, fused=True, **kw)
            self.base_impl = "fused"
        else:
            self.base_optimizer = torch.optim.AdamW(self.param_groups, foreach=True, **kw)
            self.base_impl = "foreach"
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        shared_device = self.param_groups[0]["params"][0].device
        return torch.norm(torch.stack([
            p.grad.norm(p=2).to(shared_device)
            for group in self.param_groups for p in group["params"] if p.grad is not None
        ]), p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or "old_p" not in self.state[p]:
                    continue
                if self.restore_mode == "copy":
                    p.copy_(self.state[p]["old_p"])
                else:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):  # pragma: no cover - same protocol as davda54/sam
        if closure is None:
            raise TypeError("CommonSAM.step needs a closure that runs forward + backward")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
