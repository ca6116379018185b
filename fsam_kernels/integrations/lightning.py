"""Lightning 2.x (``lightning.pytorch``) with SAM / Functional-SAM.

**Automatic optimization** needs no adapter. Lightning hands the optimizer a
closure that runs ``training_step``, ``zero_grad`` and ``backward`` and returns
the loss; ``SAM.step`` recognises this back-propagating closure and calls it
twice: at θ (pass 1), then ``first_step()``, then at θ + e (pass 2, grads set
to None first, the RNG restored so dropout draws the same masks), then
``second_step()``. ``trainer.global_step``, ``max_steps``, lr schedulers and
checkpoints count it as one step. Consequences of the second call:

* ``training_step`` and the hooks around backward (``on_before_backward``,
  ``on_after_backward``, ``on_before_optimizer_step``, gradient clipping) run
  in both passes. Clipping the pass-1 gradient does not change the ascent
  direction (e = ρ·d/‖d‖ is scale-free); the pass-2 clip is the one that acts.
  Guard logging with :func:`is_second_pass` to log only the pass-1 loss (the
  step's return value and Lightning's progress-bar "loss" are those of the
  last closure call, pass 2).
* Functional-SAM needs the model output: compute the loss from
  ``z = self.optimizers().mark_output(self.model(x))`` in ``training_step``
  (``FunctionalSAM.mark_output``: records c0 in pass 1, substitutes it in
  pass 2). Without it ``step`` raises a ``ValueError`` naming this fix.
* ``accumulate_grad_batches > 1`` cannot work this way (pass 2 would re-run only
  the last micro-batch): ``step`` raises ``RuntimeError``. Use manual
  optimization to accumulate.
* ``precision="16-mixed"`` (a GradScaler) is not supported (Lightning calls
  ``scaler.step(optimizer)`` without the closure); use ``"bf16-mixed"``, with
  the optimizer's ``max_grad_norm=`` rather than ``gradient_clip_val`` (which
  Lightning's mixed-precision plugin refuses for optimizers that unscale
  internally, as SAM declares).
* pass ``model=self`` to the optimizer in ``configure_optimizers`` so that
  BatchNorm statistics come from pass 1 only (``bn_clean_pass_only``).

**Manual optimization** (``self.automatic_optimization = False``): call
:func:`manual_step`, or write the passes yourself and end with
``opt.step()``: ``step()`` with a pending ``first_step()`` completes it, and
Lightning counts it in ``trainer.global_step`` (``opt.second_step()`` would
not be counted, and ``max_steps`` would never stop the run)::

    opt = self.optimizers()
    opt.zero_grad(); self.manual_backward(loss_fn(opt.mark_output(self.model(x)), y))
    opt.first_step()
    opt.zero_grad(); self.manual_backward(loss_fn(opt.mark_output(self.model(x)), y))
    opt.step()

Source: lightning 2.6 ``loops/optimization/automatic.py`` (``Closure``) and
``core/optimizer.py`` (``LightningOptimizer.step``), checked with 2.6.6.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from torch import Tensor

from ..optim import _RNGState, _SAMBase, bn_stats_frozen

__all__ = ["is_second_pass", "manual_step"]


def _raw(optimizer: Any) -> _SAMBase:
    opt = getattr(optimizer, "optimizer", optimizer)      # LightningOptimizer -> optimizer
    if not isinstance(opt, _SAMBase):
        raise TypeError(f"optimizer: expected SAM or FunctionalSAM (or Lightning's wrapper of "
                        f"one), got {type(opt).__name__}")
    return opt


def is_second_pass(optimizer: Any) -> bool:
    """True while a ``first_step()`` is pending, i.e. inside pass 2 (at θ + e).

    ``optimizer``: a SAM / FunctionalSAM or Lightning's ``LightningOptimizer``
    around one (``self.optimizers()``). Use it in ``training_step`` to log
    only pass-1 values: ``if not is_second_pass(self.optimizers()): self.log(...)``.
    Raises ``TypeError`` for any other optimizer."""
    return _raw(optimizer)._perturbed is not None


def manual_step(module: Any, compute_loss: Callable[[], Tensor]) -> Tensor:
    """One SAM step in Lightning's manual optimization; returns the pass-1 loss
    (detached).

    ``module``: the LightningModule (``self``), whose single optimizer is a SAM
    or FunctionalSAM. ``compute_loss``: a callable running the forward pass and
    returning the scalar loss (no backward); for Functional-SAM it must compute
    the loss from ``module.optimizers().mark_output(output)``. Runs: zero_grad,
    pass 1 (``module.manual_backward``), ``first_step()``, zero_grad, the RNG
    state restored (with the optimizer's ``same_dropout_masks``), pass 2 with
    BatchNorm statistics frozen (``bn_clean_pass_only``), then ``opt.step()``,
    which Lightning counts in ``trainer.global_step``. If pass 2 raises, θ is
    restored. Raises ``TypeError`` if the optimizer is not SAM/FunctionalSAM.
    """
    opt = module.optimizers()
    raw = _raw(opt)
    rng = _RNGState(raw._devices()) if raw.same_dropout_masks else None
    opt.zero_grad()
    loss = compute_loss()
    module.manual_backward(loss)
    opt.first_step()
    bn = bn_stats_frozen(module) if raw.bn_clean_pass_only else contextlib.nullcontext()
    try:
        if rng is not None:
            rng.restore()
        opt.zero_grad()
        with bn:
            module.manual_backward(compute_loss())
    except BaseException:
        opt.restore()
        raise
    opt.step()
    return loss.detach()
