"""The closure forms of ``SAM.step`` / ``FunctionalSAM.step`` and ``mark_output``.

``step(closure)`` accepts two kinds of closure (docs/loops.md, "The closure API"):

* the forward-only form: the closure returns ``(output, loss)`` and the
  optimizer runs both backward passes itself;
* the back-propagating form of ``torch.optim`` (and of Lightning's automatic
  optimization): the closure runs forward *and* backward and returns the loss
  (a tensor, or ``None`` when it skipped the batch). The optimizer then calls
  it once at θ and once at θ + e.

This module holds what tells the two apart (which gradients a closure call
produced, by identity and version counter, without copying any gradient), and
the output marks with which Functional-SAM works with a back-propagating
closure: ``opt.mark_output(z)`` records c0 = ∂ℓ/∂z in pass 1 and, in pass 2,
returns a tensor equal to z whose backward hands c0 on instead of the
incoming gradient, so the caller's own ``loss.backward()`` accumulates
J(θ+e)ᵀ c0 (SPEC §2; Singh et al., ICML 2025, arXiv 2502.02407, §4).
"""
from __future__ import annotations

import warnings
import weakref
from collections import deque
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

#: the raw autograd message of a second backward through a freed graph
_SECOND_BACKWARD = "backward through the graph a second time"

BACKWARD_IN_PAIR_CLOSURE_MSG = (
    "closure: it returned (output, loss) but its {which} call already ran backward(); "
    "the (output, loss) form is forward only (the optimizer runs both backward passes). "
    "Remove the backward (and zero_grad) from the closure, or use the back-propagating "
    "form: call zero_grad() and loss.backward() in the closure and return only the loss")

ACCUMULATED_MSG = (
    "closure: its backward accumulated into gradients that were already there (from "
    "backward passes run before step(): gradient accumulation over micro-batches, e.g. "
    "Lightning's accumulate_grad_batches > 1, or the previous step's gradients). Pass 2 "
    "re-runs only this closure, so it would not see those micro-batches. Zero the "
    "gradients before the backward (optimizer.zero_grad() in the closure, the torch.optim "
    "convention, or before step()); to accumulate over micro-batches use first_step() "
    "after the pass-1 backward of all of them, pass 2 over the same micro-batches, then "
    "step() (docs/loops.md)")

FSAM_NEEDS_MARK_MSG = (
    "closure: FunctionalSAM got a closure that runs backward itself, but no model output "
    "was marked; Functional-SAM back-propagates the pass-2 output with the pass-1 "
    "cotangent c0 = d loss / d output, which such a closure cannot hand over. Inside the "
    "closure (or LightningModule.training_step) wrap the model output: "
    "z = optimizer.mark_output(model(x)) (for a transformers ModelOutput, "
    "optimizer.mark_output(out.logits)) and compute the loss from z; or return "
    "(output, loss) without calling backward")


class GradSnapshot:
    """Which parameters hold which ``.grad`` before a closure call (weak
    references and version counters: no gradient is copied or kept alive)."""

    __slots__ = ("entries",)

    def __init__(self, param_groups) -> None:
        entries = []
        for g in param_groups:
            for p in g["params"]:
                gr = p.grad
                entries.append((p, None if gr is None else weakref.ref(gr),
                                None if gr is None else gr._version))
        self.entries = entries

    def changed(self) -> bool:
        """True when a backward (or anything else) wrote a ``.grad`` since."""
        for p, ref, ver in self.entries:
            gr = p.grad
            if ref is None:
                if gr is not None:
                    return True
            elif gr is not ref() or gr._version != ver:
                return True
        return False

    def accumulated(self) -> bool:
        """True when a gradient that existed before was written in place (a
        backward accumulating into it, rather than into a zeroed ``.grad``)."""
        return any(ref is not None and p.grad is ref() and p.grad._version != ver
                   for p, ref, ver in self.entries)


def second_backward_hint(exc: RuntimeError, which: str) -> Optional[RuntimeError]:
    """The error naming the fix for autograd's raw second-backward message."""
    if _SECOND_BACKWARD in str(exc):
        return RuntimeError(BACKWARD_IN_PAIR_CLOSURE_MSG.format(which=which)
                            + f" (autograd said: {exc})")
    return None


# -- output marks (FunctionalSAM with a back-propagating closure) ---------------
class _Record:
    __slots__ = ("version", "shape", "cotangent")

    def __init__(self, version: int, shape: Tuple[int, ...]) -> None:
        self.version = version
        self.shape = shape
        self.cotangent: Optional[Tensor] = None


class _SubstituteCotangent(torch.autograd.Function):
    """y = z in the forward; the backward passes c0 on to z, whatever gradient
    arrives at y (its value is ignored). Only the shape and dtype are checked."""

    @staticmethod
    def forward(ctx, z: Tensor, c0: Tensor) -> Tensor:
        ctx.c0 = c0
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: Tensor):
        c0 = ctx.c0
        del ctx.c0
        return c0, None


def _marks(opt) -> deque:
    m = opt._step_vars.get("output_marks")
    if m is None:
        m = deque()
        opt._step_vars["output_marks"] = m
    return m


def _theta_version(opt) -> int:
    """Sum of the parameters' version counters: constant while θ is not
    written, bumped by every first_step / second_step / restore."""
    return sum(p._version for g in opt.param_groups for p in g["params"])


def _drop_stale(m: deque, version: int) -> None:
    # records made at another θ belong to an earlier, unfinished step
    while m and m[0].version != version:
        m.popleft()


def mark_output(opt, output: Tensor) -> Tensor:
    """See ``_SAMBase.mark_output``."""
    if not isinstance(output, Tensor):
        raise TypeError(
            f"mark_output: expected the model output tensor, got {type(output).__name__}"
            " (for a transformers ModelOutput pass out.logits; for several outputs mark "
            "each tensor)")
    if not opt._functional or not output.requires_grad or not torch.is_grad_enabled():
        return output           # SAM, evaluation, no_grad: nothing to record
    m = _marks(opt)
    if opt._perturbed is None:                      # pass 1 at θ: record c0
        version = _theta_version(opt)
        _drop_stale(m, version)
        if m and m[-1].cotangent is None:
            # the previous mark's backward never ran (a batch skipped before its
            # backward): it belongs to no step
            m.pop()
        rec = _Record(version, tuple(output.shape))

        def hook(grad: Tensor, rec=rec) -> None:
            rec.cotangent = grad.detach()
        output.register_hook(hook)
        m.append(rec)
        return output
    if m:                                           # pass 2 at θ + e: substitute c0
        _drop_stale(m, m[-1].version)
    if not m:
        raise RuntimeError(
            "mark_output: called in pass 2 (a first_step() is pending) more often than in "
            "pass 1; mark the model output of every pass-1 micro-batch before its backward, "
            "then the pass-2 outputs in the same order")
    rec = m.popleft()
    if rec.cotangent is None:
        raise RuntimeError(
            "mark_output: the pass-1 output marked for this micro-batch received no gradient "
            "(its loss.backward() did not run, or the loss does not depend on it)")
    if tuple(output.shape) != rec.shape:
        raise RuntimeError(
            f"mark_output: the pass-2 output has shape {tuple(output.shape)}, the pass-1 "
            f"output of this micro-batch had {rec.shape}; pass 2 must see the same "
            "micro-batches in the same order")
    from .cotangent import note_replay
    note_replay(opt)
    return _SubstituteCotangent.apply(output, rec.cotangent.to(output.dtype))


def marks_count(opt) -> int:
    """Number of pass-1 records not yet replayed (stale ones dropped)."""
    m = opt._step_vars.get("output_marks")
    if not m:
        return 0
    _drop_stale(m, m[-1].version)
    return len(m)


def marks_received(opt) -> bool:
    """True when every current pass-1 record received its cotangent."""
    m = opt._step_vars.get("output_marks")
    return bool(m) and all(r.cotangent is not None for r in m)


def clear_marks(opt) -> None:
    m = opt._step_vars.get("output_marks")
    if m:
        m.clear()


# -- step() helpers ---------------------------------------------------------------
#: check_back_prop's answer for a closure that returned None and ran no backward
SKIPPED = object()


def check_back_prop(result, snap: GradSnapshot, scaler, which: str):
    """The loss of a back-propagating closure call (``SKIPPED`` for None without
    a backward); raises for what would be silently wrong."""
    if result is not None and not isinstance(result, Tensor):
        raise TypeError(
            f"closure: expected (output, loss), or a loss tensor (or None) from a closure "
            f"that runs backward itself, in {which}; got {type(result).__name__}")
    if not snap.changed():
        if result is None:
            return SKIPPED
        raise TypeError(
            f"closure: returned a single tensor in {which} but ran no backward; the "
            "forward-only closure returns (output, loss), a back-propagating one calls "
            "zero_grad() and loss.backward() itself and returns the loss")
    if scaler is not None:
        raise TypeError(
            "grad_scaler: needs the forward-only closure form returning (output, loss), "
            "so that the optimizer scales both losses itself; this closure ran backward")
    if snap.accumulated():
        raise RuntimeError(ACCUMULATED_MSG)
    return result


def warn_pass2_skipped() -> None:
    warnings.warn("closure: returned None without a backward in pass 2; the step is "
                  "skipped (θ restored, no update)", stacklevel=3)


def complete_pending(opt, closure) -> None:
    """step() with a first_step() pending: second_step() on the pass-2 grads.

    A closure (Lightning's manual optimization passes a do-nothing one that
    runs its gradient clipping and hooks) is called once and must return None
    without a backward."""
    if closure is not None:
        snap = GradSnapshot(opt.param_groups)
        with torch.enable_grad():
            result = closure()
        if result is not None or snap.changed():
            raise RuntimeError(
                "step: a first_step() is pending and the closure returned a value or ran "
                "a backward; to complete the pending step after your pass-2 backward call "
                "step() with no closure (or second_step()), or restore() to undo it")
    n = marks_count(opt) if opt._functional else 0
    if n:
        clear_marks(opt)
        opt.restore()
        raise RuntimeError(
            f"mark_output: {n} output(s) marked in pass 1 were not marked in pass 2; "
            "θ was restored and the step not taken")
    opt.second_step()
    return None
