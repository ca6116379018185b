"""``step(closure)`` of SAM and FunctionalSAM, and its step hooks.

:func:`run_closure_step` is the body of ``_SAMBase.step``: pass 1 (the
closure at θ, its backward), ``first_step``, pass 2 (at θ + e, with the same
dropout masks and frozen BatchNorm statistics), ``second_step``; both closure
forms (forward-only ``(output, loss)`` and back-propagating) and GradScaler.
:func:`with_step_hooks` wraps ``step`` as torch wraps an optimizer's step.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .cotangent import differentiable_items
from . import _closure

__all__ = ["ClosureAPI", "SCALER_STEP_MSG", "run_closure_step", "unpack", "with_step_hooks",
           "run_step_hooks", "record_in_scaler"]

SCALER_STEP_MSG = (
    "scaler.step(optimizer) cannot drive a two-pass SAM step (the loss must be scaled "
    "in both passes and each pass unscaled once); call "
    "optimizer.step(closure, grad_scaler=scaler) and then scaler.update(), or in a "
    "hand-written loop first_step(grad_scaler=scaler) / second_step(grad_scaler=scaler)")


def run_closure_step(opt, closure, grad_scaler):
    """``opt.step(closure, grad_scaler=grad_scaler)`` (see ``_SAMBase.step``)."""
    from .optim import _RNGState, bn_stats_frozen

    if getattr(opt, "found_inf", None) is not None or getattr(opt, "grad_scale", None) is not None:
        raise RuntimeError(SCALER_STEP_MSG)  # GradScaler.step's attribute contract
    if closure is None and grad_scaler is not None:
        raise RuntimeError(SCALER_STEP_MSG)  # scaler.step(opt) without a closure
    if closure is not None and not callable(closure):
        raise TypeError(f"closure: expected a callable returning (output, loss) or a "
                        f"back-propagating callable returning the loss, got "
                        f"{type(closure).__name__}")
    if opt._perturbed is not None:
        return _closure.complete_pending(opt, closure)
    if closure is None:
        raise TypeError(
            f"closure: {type(opt).__name__}.step needs a closure returning (output, loss) "
            "(or one that runs backward itself and returns the loss); in a hand-written "
            "loop call first_step() after pass 1, and second_step() (or step() with no "
            "closure) after pass 2; with the Hugging Face Trainer use "
            "fsam_kernels.integrations.hf.SAMTrainer")
    scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
    scaled = (lambda l: scaler.scale(l)) if scaler is not None else (lambda l: l)
    rng = _RNGState(opt._devices()) if opt.same_dropout_masks else None
    sync = (opt.model.no_sync() if opt.ascent_sync == "local"
            else contextlib.nullcontext())
    from .cotangent import held_records
    held = held_records(opt)
    if held:
        # records of a hand-written pass 1 that never reached first_step(): this
        # step's pass 2 could not replay them, and would fail with θ perturbed
        raise RuntimeError(
            f"step(closure): {held} record(s) captured by a CotangentRecorder/HeadRecorder "
            "of this optimizer are left over from a pass 1 that was not stepped; step(closure) "
            "records its own: call the recorder's clear() first (nothing was changed)")
    snap = _closure.GradSnapshot(opt.param_groups)
    _closure.clear_marks(opt)      # the marks of this step's closure calls only
    with torch.enable_grad(), sync:
        result = closure()
        if isinstance(result, (tuple, list)):
            # forward-only form: (output, loss)
            back_prop = False
            output, loss = unpack(result, "pass 1")
            if snap.changed():
                raise RuntimeError(_closure.BACKWARD_IN_PAIR_CLOSURE_MSG.format(which="pass-1"))
            opt.zero_grad(set_to_none=True)
            try:
                cot = opt._pass1_backward(output, scaled(loss))
            except RuntimeError as exc:
                hinted = _closure.second_backward_hint(exc, "pass-1")
                if hinted is not None:
                    raise hinted from None
                raise
        else:
            back_prop = True
            loss = _closure.check_back_prop(result, snap, scaler, "pass 1")
            if loss is _closure.SKIPPED:
                return None
            if opt._functional:
                if not _closure.marks_count(opt):
                    raise ValueError(_closure.FSAM_NEEDS_MARK_MSG)
                if not _closure.marks_received(opt):
                    raise ValueError(
                        "closure: the output marked with mark_output() in pass 1 received "
                        "no gradient; compute the loss from the marked output")
    opt.first_step(grad_scaler=scaler)
    bn = (bn_stats_frozen(opt.model) if opt.bn_clean_pass_only
          else contextlib.nullcontext())
    try:
        if rng is not None:
            rng.restore()
        with torch.enable_grad(), bn:
            if back_prop:
                opt.zero_grad(set_to_none=True)
                snap2 = _closure.GradSnapshot(opt.param_groups)
                loss2 = _closure.check_back_prop(closure(), snap2, None, "pass 2")
                if loss2 is _closure.SKIPPED:
                    _closure.warn_pass2_skipped()
                    opt.restore()
                    opt._set_var("last_step_skipped", torch.tensor(True))
                    return loss
                if opt._functional and _closure.marks_count(opt):
                    raise RuntimeError(
                        f"mark_output: {_closure.marks_count(opt)} output(s) marked in "
                        "pass 1 were not marked again in pass 2; mark the same outputs "
                        "in both passes")
            else:
                snap2 = _closure.GradSnapshot(opt.param_groups)
                output2, loss2 = unpack(closure(), "pass 2")
                if snap2.changed():
                    raise RuntimeError(
                        _closure.BACKWARD_IN_PAIR_CLOSURE_MSG.format(which="pass-2"))
                opt.zero_grad(set_to_none=True)
                try:
                    opt._pass2_backward(output2, scaled(loss2), cot)
                except RuntimeError as exc:
                    hinted = _closure.second_backward_hint(exc, "pass-2")
                    if hinted is not None:
                        raise hinted from None
                    raise
    except BaseException:
        _closure.clear_marks(opt)
        opt.restore()
        raise
    try:
        opt.second_step(grad_scaler=scaler)
    except BaseException:
        # step(closure) never leaves θ perturbed: the caller did not call first_step()
        _closure.clear_marks(opt)
        opt.restore()
        raise
    return loss.detach() if isinstance(loss, Tensor) else loss


def unpack(result, which: str):
    """The ``(output, loss)`` of a forward-only closure, checked (``TypeError`` /
    ``ValueError`` naming the pass)."""
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError(
            f"closure: expected it to return (output, loss) in {which}, got "
            f"{type(result).__name__}; the forward-only closure returns the model output "
            "and the scalar loss (no backward), a back-propagating closure calls "
            "zero_grad() and loss.backward() itself and returns the loss")
    output, loss = result
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"closure: the loss returned in {which} must be a 1-element "
                        f"tensor, got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
    if not loss.requires_grad:
        raise ValueError(f"closure: the loss returned in {which} does not depend on any "
                         "parameter (it does not require grad)")
    # the model output must depend on the parameters (Functional-SAM
    # back-propagates it; SAM checks it too so the convention is one)
    differentiable_items(output, argname="closure output")
    return output, loss


def record_in_scaler(opt, scaler) -> None:
    """Record this step's inf/NaN outcome in the scaler, as torch's fused
    optimizers do, so that ``scaler.update()`` backs off after a skip."""
    from torch.amp.grad_scaler import OptState

    st = scaler._per_optimizer_states[id(opt)]
    if st["stage"] is OptState.STEPPED:
        raise RuntimeError("grad_scaler: step already recorded since the last "
                           "scaler.update(); call scaler.update() once per step")
    dev = scaler._scale.device
    st["found_inf_per_device"] = {dev: opt.last_step_skipped.to(dev, torch.float32)}
    st["stage"] = OptState.STEPPED


def run_step_hooks(opt, pre: bool) -> None:
    """The step pre- or post-hooks (global and ``opt``'s, torch order),
    called as for ``step()`` without arguments: ``hook(opt, (opt,), {})``.
    A pre-hook may return None or an (args, kwargs) pair (ignored here)."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    if pre:
        hooks = (list(_global_optimizer_pre_hooks.values())
                 + list(opt._optimizer_step_pre_hooks.values()))
    else:
        hooks = (list(opt._optimizer_step_post_hooks.values())
                 + list(_global_optimizer_post_hooks.values()))
    for hook in hooks:
        result = hook(opt, (opt,), {})
        if pre and result is not None and not (isinstance(result, tuple) and len(result) == 2):
            raise RuntimeError(f"step pre-hook {hook!r} must return None or a tuple of "
                               f"(new_args, new_kwargs), but got {result!r}")


def with_step_hooks(step):
    """``_SAMBase.step`` as ``torch.optim.Optimizer.profile_hook_step`` wraps a
    step: the step pre-hooks before it (they may replace its arguments), the
    post-hooks after it, inside a profiler range; ``first_step`` and
    ``second_step`` called from it then run no hooks of their own, so a SAM
    step runs each hook once however it is driven. A ``step()`` that completes
    a pending ``first_step()`` (whose pre-hooks already ran) runs only the
    post-hooks."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        self = args[0]
        sv = self._step_vars
        if sv.get("in_step"):                      # re-entered: hooks already running
            return step(*args, **kwargs)
        with torch.autograd.profiler.record_function(
                f"Optimizer.step#{type(self).__name__}.step"):
            if self._perturbed is None:
                for pre_hook in itertools.chain(_global_optimizer_pre_hooks.values(),
                                                self._optimizer_step_pre_hooks.values()):
                    result = pre_hook(self, args, kwargs)
                    if result is not None:
                        if isinstance(result, tuple) and len(result) == 2:
                            args, kwargs = result
                        else:
                            raise RuntimeError(f"{step} must return None or a tuple of "
                                               f"(new_args, new_kwargs), but got {result}.")
            sv["in_step"] = True
            try:
                out = step(*args, **kwargs)
            finally:
                sv["in_step"] = False
            self._optimizer_step_code()
            for post_hook in itertools.chain(self._optimizer_step_post_hooks.values(),
                                             _global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

    wrapper.hooked = True        # torch.optim.Optimizer._patch_step_function: do not wrap again
    return wrapper




class ClosureAPI:
    """``step(closure)`` and ``mark_output`` of SAM and FunctionalSAM (a base of
    ``_SAMBase``; FunctionalSAM overrides the two backward passes)."""

    def mark_output(self, output: Tensor) -> Tensor:
        """Mark the model output for Functional-SAM in a closure that runs backward
        itself (torch.optim convention, Lightning's automatic optimization), or in
        a hand-written loop; ``z = opt.mark_output(model(x))``, loss from ``z``.

        ``output``: the model output tensor (any shape and floating dtype; for a
        transformers ModelOutput pass ``.logits``). With no ``first_step()``
        pending (pass 1) it returns ``output`` itself and records the cotangent
        c0 = ∂ℓ/∂output that the caller's ``loss.backward()`` produces (one record
        per call: mark every micro-batch). With a ``first_step()`` pending (pass 2)
        it returns a tensor equal to ``output`` whose backward hands on the
        oldest record's c0 instead of the incoming gradient, so the caller's
        ``loss.backward()`` accumulates J(θ+e)ᵀ c0 into ``.grad`` (SPEC §2). Loss
        terms that do not pass through marked outputs (a weight penalty) add
        their own gradient at θ+e, as in the forward-only closure. For ``SAM``, under
        ``torch.no_grad()`` and for outputs that do not require grad it returns
        ``output`` unchanged and records nothing.

        Raises ``TypeError`` for a non-tensor; ``RuntimeError`` in pass 2 when
        more outputs are marked than in pass 1, when the pass-1 output received
        no gradient, or when the shapes differ.
        """
        return _closure.mark_output(self, output)

    @with_step_hooks
    def step(self, closure: Optional[Callable[[], Any]] = None, *,
             grad_scaler=None) -> Optional[Tensor]:
        """One SAM step: pass 1, ascent, pass 2, descent. Returns the pass-1 loss.

        ``closure`` takes one of two forms (docs/loops.md, "The closure API"):

        * forward only: it returns ``(output, loss)``: the model output (tensor,
          tuple or dict of tensors) and the scalar loss. Do not call
          ``backward`` or ``zero_grad`` inside it: the optimizer sets grads to
          None and runs the backward passes itself (SAM: ``loss.backward()`` in
          both passes; Functional-SAM: pass 2 runs ``loss.backward()`` with the
          gradient arriving at the output replaced by the pass-1 cotangent c0,
          SPEC §2, so loss terms that bypass the output keep their gradient).
        * back-propagating (torch.optim convention, Lightning's automatic
          optimization): it zeroes the grads, runs forward and
          ``loss.backward()`` itself and returns the loss (a tensor, or None
          when it skipped the batch: then nothing is done and None is
          returned). It is called at θ (pass 1) and at θ + e (pass 2, grads set
          to None before). Grads that existed before the call must not be
          accumulated into (``RuntimeError``: a closure cannot re-run earlier
          micro-batches in pass 2). Functional-SAM needs the model output
          marked with :meth:`mark_output` inside the closure (``ValueError``
          otherwise). If pass 2 returns None without a backward, θ is restored,
          the update skipped and ``last_step_skipped`` set.

        With ``same_dropout_masks`` (default) the RNG state is restored before
        pass 2 so dropout draws the same masks; with ``model=`` and
        ``bn_clean_pass_only`` (default) BatchNorm statistics are restored after
        pass 2; with ``ascent_sync="local"`` pass 1 runs under
        ``model.no_sync()``.

        With a ``first_step()`` pending, ``step()`` completes it: it runs
        ``second_step()`` on the current (pass-2) grads and returns None, so
        wrappers that call ``optimizer.step()`` after the user's own pass 2
        (accelerate / the Hugging Face Trainer, Lightning's manual
        optimization) count the step. A closure given then is called once
        and must run no backward and return None (Lightning's do-nothing
        closure); otherwise ``RuntimeError``.

        ``grad_scaler`` (forward-only form only): an fp16
        ``torch.amp.GradScaler``: both losses are
        scaled (Functional-SAM's c0 comes from the scaled loss), each pass's
        grads are unscaled once inside the kernels, both passes are checked
        for inf/NaN, a bad step is skipped atomically (θ bitwise unchanged,
        state unchanged, ``last_step_skipped`` true) and recorded in the
        scaler; call ``scaler.update()`` after the step.
        ``scaler.step(opt, closure)`` is the same call (GradScaler passes
        itself as ``grad_scaler``); ``scaler.step(opt)`` without a closure
        raises ``RuntimeError`` pointing here.

        Raises ``TypeError`` if ``closure`` is missing (nothing pending) or
        returns the wrong thing, ``ValueError`` if the loss or output does not
        depend on the parameters, ``RuntimeError`` for a forward-only closure
        that already ran backward (the message names the fix). If pass 2
        raises, θ is restored before re-raising.
        """
        return run_closure_step(self, closure, grad_scaler)

    def _pass1_backward(self, output, loss):
        loss.backward()
        return None

    def _pass2_backward(self, output, loss, cot):
        loss.backward()
