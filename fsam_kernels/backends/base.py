"""The backend interface: the four multi-tensor operations of SPEC §6.

Every backend (reference, foreach, cpu, cuda, triton) subclasses
:class:`Backend` and implements the same four in-place operations. One call
covers every tensor of a parameter group (however many), on one device. No
operation reads a device value back to the host (SPEC §4), except in the
reference backend, which is the slow transcription kept for checks.

Conventions shared by all operations
------------------------------------
- ``params``, ``grads``, ``backups``: lists of tensors of equal length, the
  i-th entries having the same shape. Parameter dtype is float32, float16,
  bfloat16 or float64; a grad may have a different floating dtype and
  different strides from its parameter (it is read by logical index).
  ``backups[i]`` has the parameter's dtype, shape and strides.
- ``exp_avgs``, ``exp_avg_sqs``: float32 state (float64 for float64 params),
  same shape and strides as the parameter.
- ``steps``: 0-d float32 tensors on the parameter's device, the number of
  AdamW updates each parameter has received (SPEC notation t).
- ``grad_scale``: ``None`` or a 0-d float32 tensor s; every grad read is
  divided by s exactly once (SPEC §4).
- ``found_inf``: a 0-d float32 tensor; non-zero means "skip this step".
- ``norm_sq`` / ``out``: 0-d tensor of dtype ``backend.norm_dtype``
  (float64 on every built-in backend) holding N² of SPEC §1. Partial sums
  and their total across tiles, calls and groups are float64 (float32
  accumulation is allowed only inside one tile), so N² does not depend on how
  the parameters are grouped; it is rounded to float32 once, where
  ``perturb`` forms the scale.
- Hyperparameters are Python floats / bools (never baked into a kernel).
- ``cache``: ``None`` or a dict owned by the caller, one per parameter group
  and device, passed to every operation of that group (the operations keep
  separate entries in it). A backend may keep the validated tensor table of
  each operation in it; on a later call with the *same tuple objects* for
  every list but ``grads`` (lists, being mutable, are checked in full every
  call), it may then check only the tensors' data pointers, the parameters'
  contiguity, sizes and dtypes, and the grads in full. The fused backends
  (cpu, cuda, triton: backends/_prepare.py) hold the storages of the cached
  backups and state, so an unchanged pointer means the same storage (a
  ``.data =`` re-pointing is always noticed). Pass
  a cache only for tensors you own and do not reshape in place within their
  storage (``resize_``, ``as_strided_``, ``.data = x.view(...)`` of another
  size) between calls. Backends that keep no table ignore it. Results never
  depend on it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


class Backend:
    """Abstract multi-tensor backend (SPEC §6). Subclasses override all four ops."""

    #: registry name, e.g. "reference"
    name: str = "base"
    #: dtype of the N² accumulator this backend reads and writes (SPEC §1: float64)
    norm_dtype: torch.dtype = torch.float64
    #: True for backends that never synchronise with the device in the step path
    fused: bool = False

    @classmethod
    def availability(cls, device: torch.device) -> tuple[bool, str]:
        """Return ``(available, reason)`` for tensors on ``device``."""
        return True, ""

    # 1. sq_norm -------------------------------------------------------------
    def sq_norm(
        self,
        grads: Sequence[Tensor],
        exp_avg_sqs: Optional[Sequence[Tensor]],
        steps: Optional[Sequence[Tensor]],
        *,
        beta2: float,
        eps: float,
        precondition: bool,
        grad_scale: Optional[Tensor],
        out: Tensor,
        cache: Optional[dict] = None,
    ) -> None:
        """``out += Σ_i Σ d_i²`` with d of SPEC §1.

        d = (g/s) / (sqrt(v / (1 - beta2**t)) + eps) where ``precondition`` and
        t >= 1 for that tensor, else d = g/s; the bias correction 1 - beta2**t
        is computed in float64 from the float32 step and rounded once to the
        working dtype. ``exp_avg_sqs`` and ``steps`` may be None when
        ``precondition`` is False. ``out`` (0-d, ``norm_dtype``) is added to in
        float64; within one tile the squares may be summed in float32. The
        reduction order is fixed (deterministic: the same inputs give the same
        bits whichever CPU runs them). Raises ``TypeError`` when ``out`` is not
        a 0-d ``norm_dtype`` tensor (fused backends).
        """
        raise NotImplementedError

    # 2. perturb -------------------------------------------------------------
    def perturb(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        backups: Sequence[Tensor],
        exp_avg_sqs: Optional[Sequence[Tensor]],
        steps: Optional[Sequence[Tensor]],
        *,
        rho: float,
        norm_sq: Tensor,
        norm_eps: float,
        beta2: float,
        eps: float,
        precondition: bool,
        grad_scale: Optional[Tensor],
        found_inf: Tensor,
        cache: Optional[dict] = None,
    ) -> None:
        """``b <- p``; then ``p <- p + (rho / (sqrt(N²) + norm_eps)) * d``.

        ``norm_sq`` is a 0-d ``norm_dtype`` (float64) tensor. The scale is
        computed on the device in float32 from ``norm_sq`` rounded once to
        float32 (so a finite N² of 2^128 or more gives a scale of 0); the
        product is formed in float32 (float64 for float64 parameters) and
        rounded once to the parameter dtype, to nearest even for bfloat16 and
        float16. If ``norm_sq`` is not finite (tested in float64),
        ``found_inf`` is set to 1. If ``found_inf`` is non-zero (already, or
        just set), parameters are left unchanged (backups are still written).
        """
        raise NotImplementedError

    # 3. restore_adamw -------------------------------------------------------
    def restore_adamw(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        backups: Optional[Sequence[Tensor]],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        steps: Sequence[Tensor],
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        maximize: bool,
        grad_scale: Optional[Tensor],
        found_inf: Tensor,
        cache: Optional[dict] = None,
    ) -> None:
        """``p <- b`` (bitwise; skipped when ``backups`` is None), then unless
        ``found_inf`` is non-zero the AdamW update of SPEC §3 with
        ĝ = grads/s (negated if ``maximize``), incrementing ``steps``. The
        bias corrections 1 - beta1**t, 1 - beta2**t are computed in float64
        and rounded once to the working dtype; a 16-bit parameter is updated
        in float32 and rounded to nearest even once.
        When ``found_inf`` is non-zero, exp_avg, exp_avg_sq and steps are
        left bitwise unchanged.
        """
        raise NotImplementedError

    # 4. restore -------------------------------------------------------------
    def restore(self, params: Sequence[Tensor], backups: Sequence[Tensor], *,
                cache: Optional[dict] = None) -> None:
        """``p <- b`` bitwise for every pair."""
        raise NotImplementedError

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"<fsam_kernels backend {self.name!r}>"
