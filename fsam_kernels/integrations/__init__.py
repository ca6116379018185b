"""Adapters for the training frameworks people combine SAM with (docs/loops.md).

* :mod:`fsam_kernels.integrations.hf`: ``SAMTrainer``, a Hugging Face
  ``transformers.Trainer`` whose training step runs both SAM passes (gradient
  accumulation, Trainer's clipping, scheduler, logging and checkpoints).
* :mod:`fsam_kernels.integrations.lightning`: helpers for Lightning 2.x
  (automatic optimization needs none: ``SAM.step`` takes Lightning's
  back-propagating closure; ``optimizer.mark_output`` gives Functional-SAM its
  model output).

Neither framework is imported by ``fsam_kernels`` itself: import these modules
only where transformers / lightning are installed.
"""
