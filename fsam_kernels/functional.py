"""Capture and replay of the output cotangent (Functional-SAM, SPEC §2).

Functional-SAM's second gradient is ĝ = J(θ+e)ᵀ c0: the vector-Jacobian
product at the perturbed point of the model output with the loss cotangent
c0 = ∂ℓ/∂z taken at θ (Singh et al., ICML 2025, arXiv 2502.02407, §4).
With gradient accumulation every micro-batch has its own c0, so pass 1
records one cotangent per micro-batch and pass 2 replays them in order.

Example (manual two-phase loop with accumulation)::

    rec = CotangentRecorder()
    opt.zero_grad()
    for x, y in micro_batches:                 # pass 1 at θ
        z = rec.capture(model(x))              # registers hooks on z
        loss_fn(z, y).backward()               # c0 recorded by the hooks
    opt.first_step()                           # θ -> θ + e
    opt.zero_grad()
    for x, y in micro_batches:                 # pass 2 at θ + e, same order
        rec.replay(model(x))                   # backward of z1 with its c0
    opt.second_step()                          # restore θ, AdamW
"""
from __future__ import annotations

from collections import deque
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["CotangentRecorder", "flatten_output"]


def flatten_output(output: Any, *, argname: str = "output") -> List[Tuple[str, Tensor]]:
    """Flatten a model output into ``[(key, tensor), ...]``.

    ``output`` may be a tensor, a tuple/list of tensors or a dict of tensors
    (nested one level or more). Non-tensor leaves are rejected with a
    ``TypeError`` naming ``argname``.
    """
    items: List[Tuple[str, Tensor]] = []

    def walk(obj, key):
        if isinstance(obj, Tensor):
            items.append((key, obj))
        elif isinstance(obj, (tuple, list)):
            for i, o in enumerate(obj):
                walk(o, f"{key}[{i}]")
        elif isinstance(obj, dict):
            for k in obj:
                walk(obj[k], f"{key}[{k!r}]")
        else:
            raise TypeError(
                f"{argname}: expected a tensor, or a tuple/list/dict of tensors; "
                f"found {type(obj).__name__} at {key}")

    walk(output, argname)
    if not items:
        raise TypeError(f"{argname}: contains no tensor")
    return items


def differentiable_items(output: Any, *, argname: str = "output") -> List[Tuple[str, Tensor]]:
    """The flattened outputs that require grad; ``ValueError`` if none do
    (the output does not depend on the parameters)."""
    items = flatten_output(output, argname=argname)
    diff = [(k, t) for k, t in items if t.requires_grad]
    if not diff:
        raise ValueError(
            f"{argname}: does not depend on any parameter (no tensor in it requires grad); "
            "Functional-SAM needs the model output, not a detached copy")
    return diff


class _Slot:
    __slots__ = ("keys", "shapes", "cotangents", "handles")

    def __init__(self, items):
        self.keys = [k for k, _ in items]
        self.shapes = [tuple(t.shape) for _, t in items]
        self.cotangents: List[Optional[Tensor]] = [None] * len(items)
        self.handles = []


class CotangentRecorder:
    """Records ∂ℓ/∂z of each pass-1 micro-batch and replays it in pass 2.

    ``capture(z)`` registers gradient hooks on every tensor of ``z`` that
    requires grad and returns ``z`` unchanged; the user's ``loss.backward()``
    then fills the recorded cotangents (same shape and dtype as the
    outputs). ``replay(z1)`` pops the oldest record and runs
    ``torch.autograd.backward(z1, c0)``, accumulating J(θ+e)ᵀ c0 into
    ``.grad``. Outputs that received no gradient in pass 1 (the loss does not
    use them) are skipped in pass 2.

    Raises ``RuntimeError`` when replaying with nothing recorded, when the
    pass-1 backward has not run, or when the pass-2 output's structure or
    shapes differ from the recorded ones.
    """

    def __init__(self) -> None:
        self._slots: deque = deque()

    def __len__(self) -> int:
        return len(self._slots)

    def clear(self) -> None:
        """Forget every recorded cotangent (and remove pending hooks)."""
        for s in self._slots:
            for h in s.handles:
                h.remove()
        self._slots.clear()

    def capture(self, output: Any) -> Any:
        """Register hooks recording ∂ℓ/∂output; returns ``output`` unchanged."""
        items = differentiable_items(output, argname="output")
        slot = _Slot(items)
        for i, (_, t) in enumerate(items):
            def hook(grad, i=i, slot=slot):
                slot.cotangents[i] = grad.detach()
            slot.handles.append(t.register_hook(hook))
        self._slots.append(slot)
        return output

    def received(self) -> bool:
        """True when the newest record received a gradient (its backward ran
        and the loss depends on at least one of the captured outputs)."""
        return bool(self._slots) and any(c is not None for c in self._slots[-1].cotangents)

    def pop(self) -> Tuple[List[str], List[Optional[Tensor]]]:
        """Remove and return the oldest record: (keys, cotangents)."""
        if not self._slots:
            raise RuntimeError("CotangentRecorder.replay: no recorded cotangent left; "
                               "call capture() on each pass-1 output before backward()")
        slot = self._slots.popleft()
        for h in slot.handles:
            h.remove()
        if all(c is None for c in slot.cotangents):
            raise RuntimeError(
                "CotangentRecorder.replay: the recorded output received no gradient; "
                "run loss.backward() in pass 1 after capture()")
        return slot, slot.cotangents

    def replay(self, output: Any, *, retain_graph: bool = False) -> None:
        """Backward of the pass-2 ``output`` with the oldest recorded cotangent."""
        slot, cots = self.pop()
        items = differentiable_items(output, argname="output")
        keys = [k for k, _ in items]
        if keys != slot.keys:
            raise RuntimeError(
                f"CotangentRecorder.replay: output structure {keys} differs from the "
                f"recorded {slot.keys}")
        tensors, grads = [], []
        for (k, t), shape, c in zip(items, slot.shapes, cots):
            if tuple(t.shape) != shape:
                raise RuntimeError(
                    f"CotangentRecorder.replay: output {k} has shape {tuple(t.shape)}, "
                    f"the recorded cotangent has shape {shape}")
            if c is None:
                continue
            tensors.append(t)
            grads.append(c)
        torch.autograd.backward(tensors, grads, retain_graph=retain_graph)
