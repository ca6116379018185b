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

import torch
from torch import Tensor

from .cotangent import differentiable_items
from . import _closure

__all__ = ["SCALER_STEP_MSG", "run_closure_step", "unpack", "with_step_hooks", "run_step_hooks"]

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
                    opt.last_step_skipped = torch.tensor(True)
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
    opt.second_step(grad_scaler=scaler)
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


