"""Hugging Face ``transformers.Trainer`` with SAM / Functional-SAM.

``Trainer`` runs, per optimizer step, ``training_step`` on each of its K
gradient-accumulation micro-batches, clips the gradients
(``args.max_grad_norm``), calls ``optimizer.step()`` without a closure, steps
the lr scheduler and zeroes the gradients. :class:`SAMTrainer` keeps all of
that and changes only ``training_step``:

1. every call runs pass 1 (forward, loss, backward at θ) on its micro-batch,
   as ``Trainer`` does, and keeps the micro-batch and the RNG state it started
   from;
2. the call on the last micro-batch of the window then runs ``first_step()``
   (θ → θ + e from the gradient accumulated over all K micro-batches), sets the
   gradients to None and runs pass 2 over the same K micro-batches, in order,
   with the same RNG states (same dropout masks when the optimizer's
   ``same_dropout_masks``), BatchNorm statistics frozen (``bn_clean_pass_only``)
   and the DDP gradient sync on the last micro-batch only;
3. ``Trainer`` then clips the pass-2 gradient and its ``optimizer.step()``
   completes the SAM step (``SAM.step()`` with a pending ``first_step()`` runs
   ``second_step()``), so the scheduler, ``global_step``, logging and
   checkpoints behave as with any optimizer. The logged training loss is the
   pass-1 loss (at θ).

Functional-SAM: the model output ``z`` (the logits, taken where the LM head
produces them: :meth:`SAMTrainer.sam_output_module`; override it or
:meth:`SAMTrainer.sam_output` for another model) gets a gradient hook in pass 1
that records c0 = ∂ℓ/∂z of each micro-batch, and in pass 2 a hook that replaces
the incoming gradient by that c0, so Trainer's own backward of the pass-2 loss
accumulates J(θ+e)ᵀ c0 (SPEC §2). Loss terms that do not pass through ``z``
(a MoE router's load-balancing loss) keep their own gradient at θ+e, as in
``FunctionalSAM.step(closure)``.

Not supported (``ValueError`` at the first training step): fp16 loss scaling
(``fp16=True``, on any device, CPU included: use ``bf16=True``, which needs no
scaler), DeepSpeed, and
``ascent_sync="local"``.

Source: transformers 5.x ``Trainer._run_epoch`` / ``training_step`` (checked
with transformers 5.25.0 and accelerate 1.16.0).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from transformers import Trainer

from ..optim import SAM, FunctionalSAM, _RNGState, _SAMBase, bn_stats_frozen

__all__ = ["SAMTrainer"]


def _unwrap(optimizer) -> Any:
    """The SAM optimizer behind accelerate's AcceleratedOptimizer (or itself)."""
    seen = 0
    while not isinstance(optimizer, _SAMBase) and hasattr(optimizer, "optimizer") and seen < 4:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer step is a SAM step.

    Args:
        *args, **kwargs: as ``transformers.Trainer``. Give the optimizer as
            ``optimizers=(SAM(...), None)`` (or ``FunctionalSAM``, any
            hyperparameters), or as ``optimizer_cls_and_kwargs=(SAM, {...})``;
            with neither, the optimizer is ``sam_class`` built on Trainer's
            parameter groups (weight decay on all but biases and norms, as for
            AdamW) with ``lr=args.learning_rate``, ``betas=(args.adam_beta1,
            args.adam_beta2)``, ``eps=args.adam_epsilon`` (not with a
            ``base_optimizer`` in ``sam_kwargs``: it gets only ``lr``) and
            ``sam_kwargs``, whose values take precedence.
        sam_class (type): ``SAM`` (default) or ``FunctionalSAM``, for the
            default optimizer.
        sam_kwargs (dict or None): more keywords for it, e.g.
            ``{"rho": 0.05, "precondition": True}`` (not ``model``: pass 2 runs
            with the BatchNorm statistics of Trainer's model frozen whenever
            the optimizer's ``bn_clean_pass_only`` is true).

    Raises:
        TypeError: at the first training step, if the optimizer is not a
            ``SAM`` / ``FunctionalSAM``.
        ValueError: ``model`` in ``sam_kwargs``; at the first training step,
            fp16 loss scaling, DeepSpeed or ``ascent_sync="local"``.
        RuntimeError: (Functional-SAM) if a pass-1 loss does not reach the
            model output.
    """

    def __init__(self, *args: Any, sam_class: type = SAM,
                 sam_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        if not (isinstance(sam_class, type) and issubclass(sam_class, _SAMBase)):
            raise TypeError(f"sam_class: expected SAM or FunctionalSAM, got {sam_class!r}")
        if sam_kwargs is not None and not isinstance(sam_kwargs, dict):
            raise TypeError(f"sam_kwargs: expected a dict or None, got {type(sam_kwargs).__name__}")
        if sam_kwargs and "model" in sam_kwargs:
            # Trainer.create_optimizer reads a "model" keyword as LOMO's parameters
            raise ValueError("sam_kwargs: leave out 'model'; SAMTrainer freezes the BatchNorm "
                             "statistics of Trainer's model in pass 2 itself")
        super().__init__(*args, **kwargs)
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            a = self.args
            kw: Dict[str, Any] = dict(lr=a.learning_rate)
            if (sam_kwargs or {}).get("base_optimizer") is None:
                # AdamW's settings from TrainingArguments; a base_optimizer (SGD, ...) gets
                # only lr and what sam_kwargs gives it
                kw.update(betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon)
            kw.update(sam_kwargs or {})     # sam_kwargs win over TrainingArguments
            self.optimizer_cls_and_kwargs = (sam_class, kw)
        self._sam_window: List[tuple] = []     # (inputs, rng state) of this step's micro-batches
        self._sam_cotangents: List[Optional[Tensor]] = []
        self._sam_phase = 0                     # 1 or 2 while a pass runs, else 0

    # -- what Functional-SAM back-propagates ----------------------------------
    def sam_output_module(self, model) -> Optional[torch.nn.Module]:
        """The module whose forward output is Functional-SAM's z: by default the
        model's output embeddings (``get_output_embeddings()``, the LM head), so
        z is the logits tensor the model's own loss is computed from, even where
        accelerate hands back float32 copies of the outputs (``bf16=True``).
        Override (or return None to use :meth:`sam_output`) for other models."""
        unwrapped = self.accelerator.unwrap_model(model)
        get = getattr(unwrapped, "get_output_embeddings", None)
        head = get() if callable(get) else None
        return head if isinstance(head, torch.nn.Module) else None

    def sam_output(self, outputs: Any) -> Tensor:
        """z when :meth:`sam_output_module` gives None: ``outputs.logits`` for a
        transformers ModelOutput (or dict with ``"logits"``); it must be the
        tensor the loss is computed from. Override for other models. Raises
        ``TypeError`` when there is none."""
        z = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
        if not isinstance(z, Tensor):
            raise TypeError(
                "SAMTrainer.sam_output: the model output has no 'logits' tensor (got "
                f"{type(outputs).__name__}); override sam_output(outputs) to return the "
                "tensor the loss is computed from")
        return z

    def _sam_optimizer(self):
        opt = _unwrap(self.optimizer)
        if not isinstance(opt, _SAMBase):
            raise TypeError(f"SAMTrainer: the optimizer must be SAM or FunctionalSAM, got "
                            f"{type(opt).__name__}")
        if getattr(self.args, "fp16", False) or getattr(self.accelerator, "scaler", None) is not None:
            raise ValueError("SAMTrainer: fp16 loss scaling (fp16=True) is not supported; use "
                             "bf16=True, which needs no GradScaler")
        if self.is_deepspeed_enabled:
            raise ValueError("SAMTrainer: DeepSpeed runs its own optimizer step; not supported")
        if opt.ascent_sync != "global":
            raise ValueError("SAMTrainer: ascent_sync='local' is not supported (pass 1 of the "
                             "last micro-batch is all-reduced by Trainer)")
        return opt

    def compute_loss(self, model, inputs, return_outputs: bool = False,
                     num_items_in_batch=None):
        """``Trainer.compute_loss``; for Functional-SAM during a pass it also
        hooks the model output (records c0 in pass 1, substitutes it in pass 2)."""
        phase = self._sam_phase
        if phase == 0 or not isinstance(_unwrap(self.optimizer), FunctionalSAM):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        head = self.sam_output_module(model)
        seen: List[Any] = []
        handle = (head.register_forward_hook(lambda mod, args, out: seen.append(out))
                  if head is not None else None)
        try:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        finally:
            if handle is not None:
                handle.remove()
        if head is None:
            z = self.sam_output(outputs)
        elif len(seen) == 1 and isinstance(seen[0], Tensor):
            z = seen[0]
        else:
            raise RuntimeError(
                f"SAMTrainer: the output module {type(head).__name__} ran {len(seen)} times in "
                "one forward (or returned no tensor); override sam_output_module() to name "
                "the module whose output the loss is computed from")
        if phase == 1:
            i = len(self._sam_cotangents)
            self._sam_cotangents.append(None)

            def record(grad, i=i):
                self._sam_cotangents[i] = grad.detach()
            z.register_hook(record)
        else:
            c0 = self._sam_cotangents.pop(0)
            if c0 is None:
                raise RuntimeError("SAMTrainer: the pass-1 loss of this micro-batch did not "
                                   "reach the model output (sam_output); Functional-SAM needs "
                                   "the loss computed from it")
            if tuple(c0.shape) != tuple(z.shape):
                raise RuntimeError(f"SAMTrainer: pass-2 output shape {tuple(z.shape)} differs "
                                   f"from pass 1's {tuple(c0.shape)}")
            z.register_hook(lambda grad, c0=c0: c0)
            from ..cotangent import note_replay
            note_replay(_unwrap(self.optimizer))    # a Functional-SAM pass 2 (c0 substituted)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> Tensor:
        """Pass 1 on this micro-batch; on the last micro-batch of the accumulation
        window also ``first_step()`` and pass 2 over the whole window. Returns the
        pass-1 loss (detached), as ``Trainer.training_step``."""
        opt = self._sam_optimizer()
        rng = _RNGState(opt._devices()) if opt.same_dropout_masks else None
        if not self._sam_window:
            self._sam_cotangents = []
        kept = dict(inputs)                     # compute_loss may pop "labels"
        self._sam_window.append((kept, rng, num_items_in_batch))
        self._sam_phase = 1
        try:
            loss = super().training_step(model, dict(kept), num_items_in_batch)
        except BaseException:
            self._sam_window, self._sam_cotangents, self._sam_phase = [], [], 0
            raise
        finally:
            self._sam_phase = 0
        if not self.accelerator.sync_gradients:
            return loss                         # more micro-batches to come
        window, self._sam_window = self._sam_window, []
        opt.first_step()
        opt.zero_grad(set_to_none=True)
        bn = bn_stats_frozen(model) if opt.bn_clean_pass_only else contextlib.nullcontext()
        self._sam_phase = 2
        try:
            with bn:
                for i, (mb, mb_rng, n_items) in enumerate(window):
                    if mb_rng is not None:
                        mb_rng.restore()
                    sync = (contextlib.nullcontext() if i == len(window) - 1
                            else self.accelerator.no_sync(model))
                    with sync:
                        super().training_step(model, dict(mb), n_items)
        except BaseException:
            opt.restore()
            raise
        finally:
            self._sam_phase = 0
            self._sam_cotangents = []
        return loss
