"""Fused linear cross-entropy: the LM head and its loss without the (N, V) logits.

``loss = cross_entropy(h @ W.T, labels)`` (mean or sum, ``ignore_index``)
computed chunk by chunk over tokens: only a per-token logsumexp is kept, and
the logits of a chunk are recomputed where they are needed, so neither the
(N, V) logits nor their gradient ever exist (Liger-Kernel's fused linear
cross-entropy and Apple's Cut Cross-Entropy, Wijmans et al. 2024, follow the
same idea; their code is not used).

For Functional-SAM (Singh et al., ICML 2025, arXiv 2502.02407, §4; SPEC §2)
the head's output z = h Wᵀ is the model output whose cotangent
c0 = ∂ℓ/∂z(θ) is replayed at θ+e. Pass 1 records only what rebuilds c0:
``(h0, lse, labels)`` and the upstream gradient, O(N·d) per micro-batch
instead of the O(N·V) cotangent. Pass 2 never computes the logits: its
backward produces exactly J(θ+e)ᵀ c0 for the head and everything below it,
``grad W += c0ᵀ h1`` and ``grad h1 = c0 W1``, with c0 rebuilt chunk by chunk
as ``coef · (softmax(h0 W0ᵀ) − onehot(y))``, W0 being the optimizer's own
backup of W (``optimizer.clean_param(W)``), never a copy kept by the head.

Three ways to use it:

* a plain loss with any optimizer: ``head(h, y).loss.backward()``;
* ``SAM`` / ``FunctionalSAM.step(closure)`` with a closure returning
  ``(out, out.loss)`` where ``out = head(h, y)``; FunctionalSAM recognises
  the head's output and records / replays it (its pass-2 call of the head
  returns a stand-in that computes nothing);
* hand-written two-phase loops with accumulation: :class:`HeadRecorder`.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from . import _torch

__all__ = ["FusedLinearCrossEntropy", "HeadOutput", "HeadRecorder",
           "fused_linear_cross_entropy", "is_head_output"]

_REDUCTIONS = ("mean", "sum")
_IMPLS = ("auto", "torch", "triton")


# ----------------------------------------------------------------- helpers
def _compute_dtype(h: Tensor, w: Tensor) -> torch.dtype:
    """The matmul operand dtype: autocast's (for float32 operands under an
    enabled autocast of their device type), else the promoted dtype."""
    dev = h.device.type
    try:
        on = torch.is_autocast_enabled(dev)
    except (TypeError, RuntimeError):  # pragma: no cover - old signature
        on = False
    if on and {h.dtype, w.dtype} <= {torch.float32, torch.float16, torch.bfloat16}:
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, w.dtype)


def _triton_usable(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on ``device``, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton is not importable ({exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return (f"the Triton head kernels run on CUDA tensors (or on CPU tensors under "
            f"TRITON_INTERPRET=1); got {device.type} tensors")


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "torch":
        return "torch"
    why = _triton_usable(device)
    if impl == "triton":
        if why is not None:
            raise RuntimeError(f"impl='triton': {why}")
        return "triton"
    return "triton" if device.type == "cuda" and why is None else "torch"


def _ops(impl: str):
    if impl == "triton":
        from . import _triton
        return _triton
    return _torch


class _Cfg:
    __slots__ = ("ignore_index", "reduction", "rows", "impl", "cd", "early")

    def __init__(self, ignore_index, reduction, rows, impl, cd, early=False):
        self.ignore_index, self.reduction, self.rows = ignore_index, reduction, rows
        self.impl, self.cd = impl, cd
        #: form the gradients in the forward pass (PyTorch path, a backward to come)
        self.early = early


class _Record:
    """What rebuilds one micro-batch's c0: (h0, lse, labels), the reduction
    factor, the head weight (the parameter itself, not a copy) and the
    upstream gradient of the pass-1 backward (filled in by it)."""

    __slots__ = ("h0", "lse", "labels", "factor", "weight", "cfg", "value", "shape",
                 "grad_output", "captured", "replayed", "gen")

    def __init__(self, h0, lse, labels, factor, weight, cfg, value, shape):
        self.h0, self.lse, self.labels, self.factor = h0, lse, labels, factor
        self.weight, self.cfg, self.value, self.shape = weight, cfg, value, shape
        self.grad_output: Optional[Tensor] = None
        self.captured = False
        self.replayed = False
        self.gen: Optional[int] = None     # the optimizer's step generation at capture


def _check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> None:
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden: expected a floating-point tensor (..., d), got "
                        f"{hidden.dtype if isinstance(hidden, Tensor) else type(hidden).__name__}")
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError("weight: expected a 2-D floating-point tensor (V, d), got "
                        + (f"{weight.dtype} of shape {tuple(weight.shape)}"
                           if isinstance(weight, Tensor) else type(weight).__name__))
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden: last dimension {tuple(hidden.shape)[-1:]} does not match "
                         f"the weight's d = {weight.shape[1]} (weight shape "
                         f"{tuple(weight.shape)}, expected hidden (..., {weight.shape[1]}))")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor of class indices, got "
                        f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match hidden's "
                         f"leading shape {tuple(hidden.shape[:-1])} (hidden {tuple(hidden.shape)})")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"hidden, weight, labels: on different devices ({hidden.device}, "
                         f"{weight.device}, {labels.device})")
    if hidden.dtype != weight.dtype and _compute_dtype(hidden, weight) not in (
            torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(f"hidden, weight: dtypes differ ({hidden.dtype}, {weight.dtype}); "
                        "cast one of them, or run the head under torch.autocast")
    v = weight.shape[0]
    if labels.numel():
        # compared in int64: a narrow label dtype (uint8, int16, ...) cannot hold V or
        # ignore_index, and some (uint16, uint32) have no comparison kernels
        lab = labels.to(torch.int64)
        bad = ((lab < 0) | (lab >= v)) & (lab != ignore_index)
        if bool(bad.any()):
            val = int(lab[bad].flatten()[0])
            raise ValueError(f"labels: value {val} is outside [0, {v}) (the vocabulary of the "
                             f"weight, shape {tuple(weight.shape)}) and is not "
                             f"ignore_index={ignore_index}")


def _factor(labels: Tensor, cfg: _Cfg, acc: torch.dtype) -> Tensor:
    """1/n_valid for the mean (inf when every token is ignored, as 0/0 in
    torch's cross-entropy gives nan), 1 for the sum; a 0-d tensor."""
    if cfg.reduction == "sum":
        return torch.ones((), dtype=acc, device=labels.device)
    n = (labels != cfg.ignore_index).sum().to(acc)
    return n.reciprocal()


# ------------------------------------------------------ autograd functions
class _LinearCE(torch.autograd.Function):
    """loss = reduce(lse − z_y) over valid tokens; backward c w and cᵀ h."""

    @staticmethod
    def forward(ctx, h, w, labels, cfg: _Cfg, record: Optional[_Record]):
        acc = _torch.acc_dtype(cfg.cd)
        factor = _factor(labels, cfg, acc)
        need_h, need_w = h.requires_grad, w.requires_grad
        ops = _ops(cfg.impl)
        with torch.autocast(h.device.type, enabled=False):
            if cfg.early:
                lse, zy, gh, gw = _torch.forward(h, w, labels, cfg.ignore_index, cfg.cd, cfg.rows,
                                                 coef=factor, need_h=need_h, need_w=need_w)
            else:
                lse, zy = ops.forward(h, w, labels, cfg.ignore_index, cfg.cd, cfg.rows)[:2]
                gh = gw = None
        valid = labels != cfg.ignore_index
        per_tok = torch.where(valid, lse - zy, torch.zeros((), dtype=acc, device=h.device))
        loss = per_tok.sum() * factor if cfg.reduction == "mean" else per_tok.sum()
        ctx.cfg = cfg
        ctx.record = record
        ctx.early = gh is not None or gw is not None
        ctx.dtypes = (h.dtype, w.dtype)
        if ctx.early:
            ctx.save_for_backward(gh, gw, factor)
        else:
            ctx.save_for_backward(h, w, labels, lse, factor)
        if record is not None:
            record.lse, record.factor, record.value = lse, factor, loss.detach()
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        cfg = ctx.cfg
        rec = ctx.record
        if rec is not None and rec.captured:
            rec.grad_output = g.detach().to(rec.factor.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.early:
            gh, gw, factor = ctx.saved_tensors
            gh = gh * g if gh is not None else None
            gw = gw * g if gw is not None else None
            h_dtype, w_dtype = ctx.dtypes
        else:
            h, w, labels, lse, factor = ctx.saved_tensors
            coef = g.to(factor.dtype) * factor
            with torch.autocast(h.device.type, enabled=False):
                gh, gw = _ops(cfg.impl).vjp(h, w, lse, labels, cfg.ignore_index, coef, h, w,
                                            cfg.cd, cfg.rows, need_h=need_h, need_w=need_w)
            h_dtype, w_dtype = h.dtype, w.dtype
        return (gh.to(h_dtype) if gh is not None and need_h else None,
                gw.to(w_dtype) if gw is not None and need_w else None, None, None, None)


class _Replay(torch.autograd.Function):
    """Functional-SAM's pass-2 head: value = the pass-1 loss (not recomputed);
    backward: grad_output · (c̃0 W1, c̃0ᵀ h1) with c̃0 = factor·(softmax(h0 W0ᵀ) −
    onehot(y)) rebuilt from the record and the clean weight W0."""

    @staticmethod
    def forward(ctx, h1, w1, record: _Record, w0: Tensor):
        ctx.record = record
        ctx.w0 = w0
        ctx.save_for_backward(h1, w1)
        return record.value.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        rec = ctx.record
        if rec.replayed:
            raise RuntimeError("HeadRecorder.replay: this micro-batch's record was already "
                               "replayed; each pass-1 record is replayed once, in order")
        rec.replayed = True
        h1, w1 = ctx.saved_tensors
        cfg = rec.cfg
        coef = g.to(rec.factor.dtype) * rec.factor
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h1.device.type, enabled=False):
            gh, gw = _ops(cfg.impl).vjp(rec.h0, ctx.w0, rec.lse, rec.labels, cfg.ignore_index,
                                        coef, h1, w1, cfg.cd, cfg.rows,
                                        need_h=need_h, need_w=need_w)
        return (gh.to(h1.dtype) if need_h else None, gw.to(w1.dtype) if need_w else None,
                None, None)


def _flat(hidden: Tensor, labels: Tensor):
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).to(torch.int64)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                               ignore_index: int = -100, reduction: str = "mean",
                               chunk_size: Optional[int] = None, impl: str = "auto") -> Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels)`` without the logits.

    Args:
        hidden: (..., d) floating tensor (float32, bfloat16, float16, float64).
        weight: (V, d) the head (or tied embedding) weight.
        labels: (...) integer class indices in [0, V), or ``ignore_index``.
        ignore_index: label value whose tokens add nothing (torch's default -100).
        reduction: "mean" (over non-ignored tokens; nan when all are ignored,
            as torch) or "sum".
        chunk_size: tokens per chunk (default max(256, 2**21 // V): 8 MiB of
            float32 logits per chunk, but at least 256 tokens, since every
            chunk reads the whole weight).
        impl: "auto" (Triton on CUDA, else PyTorch), "torch" or "triton".

    Returns a 0-d loss in float32 (float64 for float64 operands). Under
    ``torch.autocast`` the two matmul operands are cast to the autocast dtype
    (as ``F.linear`` is) and the softmax is taken in float32. Differentiable
    in ``hidden`` and ``weight``.

    Raises ``TypeError``/``ValueError`` naming ``hidden``, ``weight``,
    ``labels``, ``reduction``, ``chunk_size`` or ``impl`` for bad input
    (labels out of range, shape, dtype or device mismatches). The label range
    check reads one flag back from the device per call (one sync on a GPU).
    """
    return _call(hidden, weight, labels, ignore_index, reduction, chunk_size, impl, None)


def _check_args(ignore_index, reduction, chunk_size, impl):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")


def _call(hidden, weight, labels, ignore_index, reduction, chunk_size, impl, record_into):
    _check_args(ignore_index, reduction, chunk_size, impl)
    _check_inputs(hidden, weight, labels, ignore_index)
    h, y = _flat(hidden, labels)
    cd = _compute_dtype(hidden, weight)
    impl = _resolve_impl(impl, hidden.device)
    # the PyTorch path forms the gradients in the forward pass (three matmuls
    # per chunk in all, as an unfused head) when a backward will follow, except
    # in float16, whose cotangent needs the upstream loss scale (GradScaler)
    # before it is rounded: then, and for Triton, the backward recomputes
    early = (impl == "torch" and torch.is_grad_enabled() and cd != torch.float16
             and (hidden.requires_grad or weight.requires_grad))
    cfg = _Cfg(ignore_index, reduction, _torch.chunk_rows(h.shape[0], weight.shape[0], chunk_size),
               impl, cd, early)
    rec = None
    if record_into is not None:
        rec = _Record(h.detach(), None, y, None, weight, cfg, None, tuple(hidden.shape))
        record_into.append(rec)
    return _LinearCE.apply(h, weight, y, cfg, rec)


# ------------------------------------------------------------ the module
class HeadOutput(dict):
    """What :class:`FusedLinearCrossEntropy` returns: ``out.loss`` (0-d) is the
    loss; ``out`` itself is the model output for ``FunctionalSAM.step``'s
    closure (return ``(out, out.loss)``). A dict (key ``"loss"``) so that it
    passes wherever a model output may be a dict of tensors."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def is_head_output(obj: Any) -> bool:
    """True for the output of :class:`FusedLinearCrossEntropy`."""
    return isinstance(obj, HeadOutput)


#: what ``FusedLinearCrossEntropy(weight)`` accepts
WeightSource = Union[Tensor, nn.Module, Callable[[], Tensor]]


class FusedLinearCrossEntropy(nn.Module):
    """The LM head ``h @ W.T`` and its cross-entropy, fused (module docstring).

    Args:
        weight: where the (V, d) head weight comes from, read at every call:
            a module with a ``.weight`` (``nn.Linear`` without bias, or the
            ``nn.Embedding`` of a tied head), the parameter itself, or a
            callable returning it. It is not registered as a parameter or
            submodule here (it belongs to the model).
        ignore_index, reduction, chunk_size, impl: as
            :func:`fused_linear_cross_entropy`.

    ``forward(hidden, labels)``: hidden (..., d), labels (...) int; returns a
    :class:`HeadOutput` whose ``.loss`` is the 0-d loss. In
    ``FunctionalSAM.step(closure)``'s pass 2 the call returns a stand-in whose
    ``.loss`` has the pass-1 value and whose backward is J(θ+e)ᵀ c0 (no logits
    are computed; the pass-1 labels are used, ``labels`` must have their
    shape). The weight must be a parameter of the optimizer for that
    (its backup is W0); DTensor (FSDP2) weights are not supported there.

    Raises ``TypeError`` for a weight source that is none of the above, a
    module with a bias, and the errors of :func:`fused_linear_cross_entropy`.
    """

    def __init__(self, weight: WeightSource, *, ignore_index: int = -100,
                 reduction: str = "mean", chunk_size: Optional[int] = None,
                 impl: str = "auto") -> None:
        super().__init__()
        _check_args(ignore_index, reduction, chunk_size, impl)
        if isinstance(weight, nn.Module):
            if getattr(weight, "bias", None) is not None:
                raise TypeError("weight: the module has a bias; the fused head computes "
                                "h @ W.T without one (use bias=False)")
            if not isinstance(getattr(weight, "weight", None), Tensor):
                raise TypeError(f"weight: the module {type(weight).__name__} has no .weight tensor")
            kind = "module"
        elif isinstance(weight, Tensor):
            kind = "tensor"
        elif callable(weight):
            kind = "callable"
        else:
            raise TypeError(f"weight: expected a module with .weight, a tensor or a callable "
                            f"returning the (V, d) weight, got {type(weight).__name__}")
        # kept outside nn.Module's registries (the weight belongs to the model);
        # a plain attribute, so copy.deepcopy of the model re-points it
        object.__setattr__(self, "_src", weight)
        object.__setattr__(self, "_kind", kind)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.impl = impl
        object.__setattr__(self, "_armed", None)   # (recorder, record) for pass 2

    @property
    def weight(self) -> Tensor:
        """The head weight (V, d), read from the source given at construction."""
        src = self._src
        if self._kind == "module":
            return src.weight
        return src if self._kind == "tensor" else src()

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"chunk_size={self.chunk_size}, impl={self.impl!r}")

    def forward(self, hidden: Tensor, labels: Tensor) -> HeadOutput:
        w = self.weight
        armed = self._armed
        if armed is not None:
            object.__setattr__(self, "_armed", None)
            rec_obj, record = armed
            if rec_obj._pending():
                return rec_obj._stand_in(record, hidden, labels, w)
        records = []
        loss = _call(hidden, w, labels, self.ignore_index, self.reduction, self.chunk_size,
                     self.impl, records if torch.is_grad_enabled() else None)
        out = HeadOutput(loss=loss)
        object.__setattr__(out, "_record", records[0] if records else None)
        object.__setattr__(out, "_head", self)
        return out


# ----------------------------------------------------------- the recorder
class HeadRecorder:
    """Functional-SAM's pass-1 record and pass-2 replay through the fused head
    (the counterpart of :class:`fsam_kernels.CotangentRecorder`).

    Example (manual two-phase loop, K micro-batches)::

        rec = HeadRecorder(opt)
        opt.zero_grad()
        for x, y in micro_batches:                       # pass 1 at θ
            out = rec.capture(head(model.hidden(x), y))   # before backward
            (out.loss / K).backward()
        opt.first_step()                                  # θ -> θ + e
        opt.zero_grad()
        for x, y in micro_batches:                       # pass 2, same order
            rec.replay(model.hidden(x))                   # J(θ+e)ᵀ c0 into .grad
        opt.second_step()

    ``capture`` keeps (h0, lse, labels) of the micro-batch and the upstream
    gradient its backward brings (1/K above, a GradScaler's scale, ...), so
    ``replay`` reproduces c0 exactly as the pass-1 backward saw it.

    Args:
        optimizer: the FunctionalSAM (or any optimizer with ``clean_param``)
            holding the head weight; its backup of the weight is W0.

    Every record is tied to the optimizer's step of its pass 1 (its
    ``first_step()`` count): a record can be replayed only after that step's
    ``first_step()``, and ``optimizer.second_step()`` raises, before changing
    anything, while records of the step are not replayed (pass 2 must replay
    as many micro-batches as pass 1 captured).

    Raises ``ValueError`` naming ``weight`` when the head weight requires grad
    but is not among the optimizer's parameters; ``RuntimeError`` for a
    replay with no record left, a record whose pass-1 backward did not run,
    a replay with no ``first_step()`` pending, a record of an earlier step,
    a second replay of a record, a ``capture()`` with a ``first_step()``
    pending or while records of an earlier step remain (with their count);
    ``ValueError`` naming ``hidden`` (``TypeError`` for its dtype) for a
    pass-2 input that differs from pass 1's, checked before the record is
    removed, so a corrected replay may follow.
    """

    def __init__(self, optimizer) -> None:
        if not hasattr(optimizer, "clean_param"):
            raise TypeError(f"optimizer: expected a fsam_kernels optimizer (with clean_param), "
                            f"got {type(optimizer).__name__}")
        from ..cotangent import register_recorder
        self.optimizer = optimizer
        self._records: deque = deque()
        register_recorder(optimizer, self)

    def __len__(self) -> int:
        return len(self._records)

    def __bool__(self) -> bool:
        # always true: `if rec:` must not depend on whether records are held
        return True

    def clear(self) -> None:
        """Forget every record."""
        self._records.clear()

    def pending(self) -> int:
        """Records of the optimizer's current step (pass 1 before the pending
        ``first_step()``) not replayed yet; 0 with no first_step() pending."""
        from ..cotangent import step_generation
        if not self._pending():
            return 0
        now = step_generation(self.optimizer)
        return sum(1 for r in self._records if r.gen is not None and r.gen + 1 == now)

    def _check_weight(self, w: Tensor) -> None:
        if w.requires_grad:
            try:
                self.optimizer.clean_param(w)
            except ValueError:
                computed = w.grad_fn is not None
                raise ValueError(
                    f"weight: the head weight (shape {tuple(w.shape)}) is not among the "
                    "optimizer's parameters"
                    + (" (it is a computed tensor, made by "
                       f"{type(w.grad_fn).__name__}; Functional-SAM needs the parameter itself: "
                       "apply a scale to the hidden states or the loss instead)" if computed else "")
                    + "; Functional-SAM rebuilds c0 from the optimizer's "
                    "backup of it (pass the head weight, or the tied embedding, to the "
                    "optimizer)") from None

    def capture(self, out: HeadOutput, *, _closure: bool = False) -> HeadOutput:
        """Keep the record of a pass-1 head call; call before its backward.
        Returns ``out``. Raises ``TypeError`` for anything but a
        :class:`HeadOutput` made with grad enabled."""
        if not is_head_output(out):
            raise TypeError(f"out: expected the HeadOutput of a FusedLinearCrossEntropy call, "
                            f"got {type(out).__name__}")
        record = getattr(out, "_record", None)
        if record is None:
            raise TypeError("out: this HeadOutput has no record (made under torch.no_grad() "
                            "or in pass 2); capture the pass-1 call's output")
        if record.captured:
            raise RuntimeError("HeadRecorder.capture: this output was captured already")
        from ..cotangent import _stale_capture_error, step_generation
        if self._pending():
            raise RuntimeError("HeadRecorder.capture: a first_step() is pending (pass 2); "
                               "capture the pass-1 head outputs, replay() in pass 2")
        gen = step_generation(self.optimizer)
        old = sum(1 for r in self._records if r.gen != gen)
        if old:
            raise _stale_capture_error("HeadRecorder", old, "a first_step() came after them")
        self._check_weight(record.weight)
        record.gen = gen
        record.captured = True
        self._records.append(record)
        if _closure:
            object.__setattr__(out._head, "_armed", (self, record))
        return out

    def check_received(self, where: str = "capture") -> None:
        """``ValueError`` if the newest record's backward has not run."""
        if self._records and self._records[-1].grad_output is None:
            self.clear()
            raise ValueError(
                f"{where}: the loss returned in pass 1 does not depend on the head's output "
                "(no gradient reached it); Functional-SAM back-propagates the head with "
                "c0 = d loss / d logits, so return (out, out.loss)")

    def _pending(self) -> bool:
        return getattr(self.optimizer, "_perturbed", None) is not None

    def _peek(self) -> _Record:
        """The oldest record, checked (generation, received) but not removed."""
        from ..cotangent import _check_replay_generation
        if not self._records:
            raise RuntimeError("HeadRecorder.replay: no record left; capture() each pass-1 "
                               "head output before its backward, and replay each once")
        record = self._records[0]
        if record.grad_output is None:
            raise RuntimeError("HeadRecorder.replay: the recorded head output received no "
                               "gradient; run the pass-1 backward after capture()")
        _check_replay_generation("HeadRecorder", self.optimizer, record.gen)
        return record

    def _pop(self) -> _Record:
        record = self._peek()
        self._records.popleft()
        return record

    def _clean_weight(self, record: _Record) -> Tensor:
        w = record.weight
        if not w.requires_grad:
            return w
        if not self._pending():
            raise RuntimeError("HeadRecorder.replay: no first_step() is pending on the "
                               "optimizer; replay between first_step() and second_step()")
        self._check_weight(w)
        return self.optimizer.clean_param(w)

    def _stand_in(self, record: _Record, hidden: Tensor, labels: Tensor, w: Tensor) -> HeadOutput:
        if w is not record.weight:
            raise RuntimeError("FusedLinearCrossEntropy: the head weight is another tensor in "
                               "pass 2 than in pass 1")
        if tuple(labels.shape) != tuple(record.shape[:-1]):
            raise ValueError(f"labels: pass-2 shape {tuple(labels.shape)} differs from the "
                             f"recorded {record.shape[:-1]}")
        self._check_labels(record, labels)
        loss = self._replay_fn(record, hidden)
        out = HeadOutput(loss=loss)
        object.__setattr__(out, "_record", None)
        object.__setattr__(out, "_replay_of", record)
        object.__setattr__(out, "_head", None)
        return out

    def _replay_fn(self, record: _Record, hidden: Tensor) -> Tensor:
        if not isinstance(hidden, Tensor) or tuple(hidden.shape) != record.shape:
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(f"hidden: pass-2 hidden states have shape {got}, the pass-1 "
                             f"record has {record.shape}")
        if hidden.dtype != record.h0.dtype:
            raise TypeError(f"hidden: pass-2 dtype {hidden.dtype} differs from the pass-1 "
                            f"{record.h0.dtype}")
        w0 = self._clean_weight(record)
        h1 = hidden.reshape(-1, hidden.shape[-1])
        return _Replay.apply(h1, record.weight, record, w0)

    @staticmethod
    def _check_labels(record: _Record, labels: Tensor) -> None:
        """``ValueError`` naming ``labels`` when pass 2's labels are not the
        recorded micro-batch's (micro-batches replayed out of order, or other data)."""
        if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(record.shape[:-1]):
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels: pass-2 labels have shape {got}, the pass-1 record has "
                             f"{record.shape[:-1]}")
        if labels.device != record.labels.device or not torch.equal(
                labels.reshape(-1).to(torch.int64), record.labels):
            raise ValueError("labels: the pass-2 labels differ from those of the oldest pass-1 "
                             "record; replay the micro-batches of pass 1 in the same order")

    def replay(self, hidden: Tensor, labels: Optional[Tensor] = None) -> None:
        """Pass 2 of the oldest record: backward of the head at θ+e with its
        c0, through ``hidden`` (the head's input at θ+e, same shape as in
        pass 1) and the head weight; accumulates J(θ+e)ᵀ c0 into ``.grad``.
        The logits are not computed.

        ``labels`` (optional, the micro-batch's labels as given in pass 1) are
        checked against the record, so that micro-batches replayed in another
        order than pass 1's raise ``ValueError`` instead of pairing one
        micro-batch's c0 with another's hidden states (with equal shapes
        nothing else can tell). Pass them where the loop can."""
        record = self._peek()
        if labels is not None:
            self._check_labels(record, labels)
        surrogate = self._replay_fn(record, hidden)     # checks hidden before the pop
        self._records.popleft()
        torch.autograd.backward(surrogate, record.grad_output.to(surrogate.dtype))
        from ..cotangent import note_replay
        note_replay(self.optimizer)

    def replay_closure_output(self, out: Any) -> None:
        """``FunctionalSAM.step``'s pass 2: ``out`` is the closure's pass-2 head
        output (the stand-in); back-propagates it with the recorded gradient."""
        record = self._peek()
        if not is_head_output(out) or getattr(out, "_replay_of", None) is not record:
            raise ValueError("closure: in pass 2 the closure must call the same "
                             "FusedLinearCrossEntropy head once and return its output, "
                             "as in pass 1")
        self._records.popleft()
        torch.autograd.backward(out.loss, record.grad_output.to(out.loss.dtype))
        from ..cotangent import note_replay
        note_replay(self.optimizer)
