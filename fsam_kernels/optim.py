"""SAM and Functional-SAM optimizers over AdamW (SPEC.md).

Both optimizers run the two-pass SAM protocol with AdamW as the base update:

1. pass 1 at θ: g = ∇L(θ) (for Functional-SAM also the output cotangent
   c0 = ∂ℓ/∂z(θ));
2. ascent (SPEC §1): d = g, or d = g / (sqrt(v̂) + eps) when
   ``precondition=True`` (and the parameter has had at least one update);
   e = rho · d / (‖d‖ + 1e-12) with the norm taken over all groups;
   θ ← θ + e, keeping a bitwise backup of θ;
3. pass 2 at θ + e: SAM uses ĝ = ∇L(θ+e); Functional-SAM uses
   ĝ = J(θ+e)ᵀ c0 (SPEC §2, paper §4);
4. descent (SPEC §3): θ ← backup (bitwise), then AdamW with ĝ.

Source: Singh, Mobahi, Agarwala, Dauphin, "Avoiding spurious sharpness
minimization broadens applicability of SAM", ICML 2025 (arXiv 2502.02407);
AdamW semantics follow ``torch.optim.AdamW``.

The multi-tensor work is done by a backend (``backend=``): "reference"
(per-tensor transcription of SPEC, slow, for checks), "foreach"
(torch._foreach ops), "cpu"/"cuda" (native C++/CUDA kernels), "triton", or
"auto" (the fastest available for the parameters' device).

Real training loops (docs/loops.md): fp16 loss scaling through
``step(closure, grad_scaler=scaler)``, update-gradient clipping
(``max_grad_norm``), BatchNorm statistics from the clean pass only
(``model=``, ``bn_clean_pass_only``), any base optimizer
(``base_optimizer=torch.optim.SGD``), DDP ascent gradients
(``ascent_sync``) and FSDP2 (``fully_shard``: DTensor parameters; the
kernels run on local shards and N² is summed over the shard group,
fsam_kernels/distributed.py).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import numbers
import operator
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
# imported here, not lazily inside the first optimizer's __init__ (torch's
# @_disable_dynamo on Optimizer.add_param_group imports it on first use): its
# import leaves a frame cycle (torch.fx.wrap keeps its caller's frame) holding
# every frame of the importing call stack, which would keep that first
# optimizer alive until the garbage collector runs
import torch._dynamo  # noqa: F401
from torch import Tensor

from .backends import BACKEND_NAMES, Backend, get_backend
from .distributed import all_reduce_over_shards, is_dtensor, shard_key
from .distributed import local as _local
from ._plans import (FirstPlan, SecondPlan, check_grads, check_group_grads, grad_mask,
                     grads_of)
from .functional import differentiable_items, flatten_output
from . import _closure

__all__ = ["SAM", "FunctionalSAM", "bn_stats_frozen"]

_NORM_EPS = 1e-12
_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
#: per-parameter state keys of the AdamW-based optimizers (torch.optim.AdamW names)
_STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})
_CLIP_EPS = 1e-6          # as torch.nn.utils.clip_grad_norm_
_UNSET = object()         # "not given": lets base_optimizer users pass lr/eps/... to the base
_ADAMW_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False)
#: group keys torch's lr schedulers write (torch/optim/lr_scheduler.py)
_SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"})
#: group keys torch's optimizers fill in (__setstate__) for checkpoints saved without them
_TORCH_FILLED_KEYS = frozenset({"foreach", "fused", "differentiable", "capturable", "maximize",
                                "decoupled_weight_decay"})
_SCALER_STEP_MSG = (
    "scaler.step(optimizer) cannot drive a two-pass SAM step (the loss must be scaled "
    "in both passes and each pass unscaled once); call "
    "optimizer.step(closure, grad_scaler=scaler) and then scaler.update(), or in a "
    "hand-written loop first_step(grad_scaler=scaler) / second_step(grad_scaler=scaler)")


def _theta_changed() -> None:
    """θ was changed in place (θ → θ + e, or back): drop autocast's cached
    low-precision copies of the weights (``torch.clear_autocast_cache``; one
    thread-local cache for every device type and dtype), which were made at the
    old θ. Without this a pass 2 inside the same ``torch.autocast`` block as
    pass 1 would compute at θ (the cast copies), not θ + e."""
    torch.clear_autocast_cache()


def _compile_safe(t: Tensor) -> Tensor:
    """Under torch.compile, a 0-d float64 CPU tensor as a 1-element 1-d view of
    itself (same storage); any other tensor unchanged.

    torch 2.13's AOTAutograd drops in-place writes into a 0-d float64 (or
    integer) CPU tensor that is an input of a compiled graph: such inputs are
    treated as Python scalars (their ``item()`` becomes a symbol), and after
    the float-specialisation restart the mutation is lost. Every
    ``x.add_``/``x.copy_`` of a backend on the N² accumulator (float64, SPEC
    §1) or on a 0-d float64 parameter, backup or moment then silently did
    nothing (N² read as 0: a perturbation of 1e11, NaN from the second step).
    Writes through a 1-d view are kept. Minimal reproduction::

        def f(out): out.add_(1.0)
        out = torch.zeros((), dtype=torch.float64)
        torch.compile(f, backend="aot_eager")(out)   # out stays 0
    """
    if t.dim() == 0 and t.dtype == torch.float64 and t.device.type == "cpu":
        return t.view(1)
    return t


def _compile_safe_all(ts):
    """``_compile_safe`` of every tensor of a list under torch.compile (eager: ``ts``)."""
    if ts is None or not torch.compiler.is_compiling():
        return ts
    return [_compile_safe(t) for t in ts]


def _compile_safe_out(t: Tensor) -> Tensor:
    """``_compile_safe`` of one tensor under torch.compile (eager: ``t``)."""
    return _compile_safe(t) if torch.compiler.is_compiling() else t


#: backends whose steps run eagerly inside a torch.compile'd region (one graph
#: break around each phase): the reference backend reads device values on the
#: host (``.item()``, a graph break at every call) and the Triton backend
#: launches its kernels from Python with device pointer tables, which dynamo
#: cannot trace (fake tensors have no data pointers; under TRITON_INTERPRET it
#: would trace the interpreter). Traced piecewise, every small helper of the
#: phase became its own graph, recompiled per parameter.
_EAGER_UNDER_COMPILE = frozenset({"reference", "triton"})


@torch.compiler.disable
def _eagerly(fn, *args):
    """``fn(*args)`` outside any torch.compile graph."""
    return fn(*args)


def _clear_grads(param_groups) -> None:
    """``p.grad = None`` for every parameter (first_step's ``zero_grad``)."""
    for group in param_groups:
        for p in group["params"]:
            p.grad = None


def _state_dtype(p: Tensor) -> torch.dtype:
    """exp_avg / exp_avg_sq dtype: float64 for float64 params, else float32 (SPEC)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _check_float(name: str, value, *, low: float = 0.0, high: Optional[float] = None,
                 high_open: bool = True) -> None:
    if isinstance(value, Tensor):
        raise TypeError(
            f"{name}: expected a Python float, got a Tensor; tensor hyperparameters are "
            "not supported (pass float(value))")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (high is not None and (v >= high if high_open else v > high)):
        if high is None:
            raise ValueError(f"{name}: expected a finite value >= {low}, got {value!r}")
        br = ")" if high_open else "]"
        raise ValueError(f"{name}: expected a value in [{low}, {high}{br}, got {value!r}")


def _validate_sam_keys(group: Dict[str, Any], where: str) -> None:
    _check_float(f"{where}rho", group["rho"])
    if not isinstance(group["precondition"], bool):
        raise TypeError(f"{where}precondition: expected a bool, got {group['precondition']!r}")


def _validate_group(group: Dict[str, Any], where: str) -> None:
    _check_float(f"{where}lr", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}betas: expected a pair (beta1, beta2), got {betas!r}")
    _check_float(f"{where}betas[0]", betas[0], low=0.0, high=1.0)
    _check_float(f"{where}betas[1]", betas[1], low=0.0, high=1.0)
    _check_float(f"{where}eps", group["eps"])
    _check_float(f"{where}weight_decay", group["weight_decay"])
    _check_float(f"{where}rho", group["rho"])
    for flag in ("precondition", "maximize"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{where}{flag}: expected a bool, got {group[flag]!r}")


class _RNGState:
    """CPU and CUDA generator states, so pass 2 sees pass 1's dropout masks."""

    def __init__(self, devices) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = {}
        for d in devices:
            if d.type == "cuda":
                idx = d.index if d.index is not None else torch.cuda.current_device()
                if idx not in self.cuda:
                    self.cuda[idx] = torch.cuda.get_rng_state(idx)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for idx, s in self.cuda.items():
            torch.cuda.set_rng_state(s, idx)


class _BNSnapshot:
    """Running statistics of every training BatchNorm in a module, restorable exactly."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._saved = []
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training \
                    and m.track_running_stats:
                bufs = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                        if b is not None]
                self._saved.append((bufs, [b.clone() for b in bufs]))

    @torch.no_grad()
    def restore(self) -> None:
        for bufs, copies in self._saved:
            for b, c in zip(bufs, copies):
                b.copy_(c)


@contextlib.contextmanager
def bn_stats_frozen(model: Optional[torch.nn.Module]):
    """Context manager for hand-written loops: BatchNorm running_mean,
    running_var and num_batches_tracked of ``model`` (momentum=None included)
    are bitwise the same after the block as before it. Wrap pass 2 in it so
    only the clean pass updates the statistics. ``None`` does nothing."""
    snap = _BNSnapshot(model) if model is not None else None
    try:
        yield
    finally:
        if snap is not None:
            snap.restore()


def _scaler_scale(grad_scaler) -> Optional[Tensor]:
    """The scale tensor of an enabled GradScaler (after ``scaler.scale(loss)``)."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return None
    scale = getattr(grad_scaler, "_scale", None)
    if scale is None:
        raise RuntimeError("grad_scaler: the scaler has no scale yet; back-propagate "
                           "scaler.scale(loss) before first_step/second_step")
    return scale


class _SAMBase(torch.optim.Optimizer):
    _functional = False
    # GradScaler must not unscale our grads itself: step() refuses scaler.step(opt)
    # with a message pointing to step(closure, grad_scaler=scaler).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float = _UNSET,
        betas: Tuple[float, float] = _UNSET,
        eps: float = _UNSET,
        weight_decay: float = _UNSET,
        rho: float = 0.05,
        precondition: bool = False,
        *,
        maximize: bool = _UNSET,
        backend: str = "auto",
        same_dropout_masks: bool = True,
        base_optimizer: Optional[type] = None,
        max_grad_norm: Optional[float] = None,
        model: Optional[torch.nn.Module] = None,
        bn_clean_pass_only: bool = True,
        ascent_sync: str = "global",
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(backend, str) or backend not in BACKEND_NAMES:
            raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKEND_NAMES}")
        given = {k: v for k, v in dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                        maximize=maximize).items() if v is not _UNSET}
        if isinstance(given.get("betas"), list):
            given["betas"] = tuple(given["betas"])
        for name, v in (("same_dropout_masks", same_dropout_masks),
                        ("bn_clean_pass_only", bn_clean_pass_only)):
            if not isinstance(v, bool):
                raise TypeError(f"{name}: expected a bool, got {v!r}")
        if max_grad_norm is not None:
            _check_float("max_grad_norm", max_grad_norm)
            max_grad_norm = float(max_grad_norm)
        if ascent_sync not in ("global", "local"):
            raise ValueError(f"ascent_sync: expected 'global' or 'local', got {ascent_sync!r}")
        if ascent_sync == "local" and not hasattr(model, "no_sync"):
            raise ValueError("ascent_sync='local' needs model= the DistributedDataParallel "
                             "module (pass 1 runs under model.no_sync())")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if base_optimizer is None:
            if base_kwargs:
                raise TypeError(f"{type(self).__name__}: unexpected keyword argument(s) "
                                f"{sorted(base_kwargs)} (extra keywords go to base_optimizer, "
                                "and none was given)")
            defaults = dict(_ADAMW_DEFAULTS, **given, rho=rho, precondition=precondition)
            _validate_group(defaults, "")
        else:
            if not (isinstance(base_optimizer, type)
                    and issubclass(base_optimizer, torch.optim.Optimizer)):
                raise TypeError("base_optimizer: expected a torch.optim.Optimizer subclass "
                                f"(e.g. torch.optim.SGD), got {base_optimizer!r}")
            if isinstance(base_optimizer, type) and issubclass(base_optimizer, _SAMBase):
                raise TypeError("base_optimizer: cannot be SAM/FunctionalSAM itself")
            defaults = dict(rho=rho, precondition=precondition)
            _validate_sam_keys(defaults, "")
        self.backend_name = backend
        self.same_dropout_masks = same_dropout_masks
        self.max_grad_norm = max_grad_norm
        self.model = model
        self.bn_clean_pass_only = bn_clean_pass_only
        self.ascent_sync = ascent_sync
        self.norm_eps = _NORM_EPS
        self._base_mode = base_optimizer is not None
        #: the base optimizer instance (``base_optimizer=``), or None for the fused AdamW
        self.base_optimizer: Optional[torch.optim.Optimizer] = None
        self._backends: Dict[torch.device, Backend] = {}
        self._backups: Dict[Tensor, Tensor] = {}
        self._step_vars: Dict[str, Any] = {}
        #: cached per-group launch plans of the fast path (_plans.py)
        self._plans: Dict[Tuple[str, int], Any] = {}
        self._perturbed = None
        self._found_inf: Dict[torch.device, Tensor] = {}
        self.last_step_skipped = None
        if isinstance(params, (set, frozenset)):
            raise TypeError("params: a set has no order (the state_dict depends on it); "
                            "pass a list, e.g. list(model.parameters())")
        super().__init__(params, defaults)
        if base_optimizer is not None:
            base = base_optimizer(self.param_groups, **given, **base_kwargs)
            # one list of group dicts, holding the SAM keys (rho, precondition) and
            # the base's; lr schedulers on either object drive the base
            self.base_optimizer = base
            self.param_groups = base.param_groups
            self.state = base.state
            self.defaults = dict(base.defaults, **defaults)
            for gi, g in enumerate(self.param_groups):
                self._check_precondition_base(g, f"param_groups[{gi}].")

    # Values a step writes are kept in one dict behind properties: inside
    # torch.compile'd first_step/second_step, dynamo drops attribute stores on
    # an Optimizer object but keeps dict stores (checked with torch 2.13).
    @property
    def _perturbed(self) -> Optional[List[List[Tensor]]]:
        return self._step_vars.get("perturbed")

    @_perturbed.setter
    def _perturbed(self, value) -> None:
        self._step_vars["perturbed"] = value
        # the backups of the fast path's perturbed list (first_step sets it after)
        self._step_vars["perturbed_backups"] = None

    @property
    def last_step_skipped(self) -> Optional[Tensor]:
        """True when the last step was skipped (non-finite values; SPEC §4).
        A 0-d bool tensor on the device (reading it syncs), or None before any step."""
        return self._step_vars.get("last_step_skipped")

    @last_step_skipped.setter
    def last_step_skipped(self, value) -> None:
        self._step_vars["last_step_skipped"] = value

    @property
    def _opt_called(self) -> bool:
        """torch's lr schedulers read this flag (set by their wrapper of
        ``step``, and by ``second_step``): kept in ``_step_vars`` so that a
        compiled ``second_step`` sets it too."""
        return self._step_vars.get("opt_called", False)

    @_opt_called.setter
    def _opt_called(self, value) -> None:
        self._step_vars["opt_called"] = value

    @property
    def _last_norm_sq(self):
        return self._step_vars.get("last_norm_sq")

    @_last_norm_sq.setter
    def _last_norm_sq(self, value) -> None:
        self._step_vars["last_norm_sq"] = value

    def _check_precondition_base(self, group, where: str) -> None:
        if group["precondition"] and not isinstance(
                self.base_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(
                f"{where}precondition: the preconditioned ascent divides by Adam's second "
                f"moment (exp_avg_sq), which {type(self.base_optimizer).__name__} does not "
                "keep; use precondition=False or an Adam/AdamW base")

    # -- groups ---------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group (torch semantics); validates it and rejects duplicates.

        Raises ``ValueError`` if a parameter appears twice in the group or is
        already in another group, and ``TypeError``/``ValueError`` for invalid
        hyperparameters, naming the group.
        """
        if isinstance(param_group.get("params"), Tensor):
            param_group = dict(param_group, params=[param_group["params"]])
        elif isinstance(param_group.get("params"), set):
            raise TypeError("params: parameters must be an ordered collection, not a set")
        else:
            param_group = dict(param_group, params=list(param_group["params"]))
        idx = len(self.param_groups)
        seen = set()
        existing = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(param_group["params"]):
            if not isinstance(p, Tensor):
                raise TypeError(f"params: group {idx} item {i} is a {type(p).__name__}, expected a Tensor")
            if id(p) in seen or id(p) in existing:
                raise ValueError(
                    f"params: group {idx} item {i} (shape {tuple(p.shape)}) appears more than "
                    "once in the optimizer's parameters; each parameter may be given only once")
            seen.add(id(p))
            if p.device.type == "meta":
                raise ValueError(
                    f"params: group {idx} item {i} (shape {tuple(p.shape)}) is on the 'meta' "
                    "device (no data: the ascent cannot back it up or perturb it); "
                    "materialize the model first (e.g. module.to_empty(device=...) and "
                    "initialize or load its weights)")
            if p.layout != torch.strided:
                raise TypeError(f"params: group {idx} item {i} has layout {p.layout}; "
                                "only dense (strided) parameters are supported")
            if not p.is_floating_point():
                if p.is_complex():
                    raise TypeError(
                        f"params: group {idx} item {i} is complex ({p.dtype}); complex "
                        "parameters are not supported: pass torch.view_as_real views instead")
                raise TypeError(f"params: group {idx} item {i} has dtype {p.dtype}, "
                                "expected a floating-point tensor")
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        where = f"param_groups[{idx}]."
        if self._base_mode:
            _validate_sam_keys(param_group, where)
            if self.base_optimizer is not None:  # after __init__: the base owns the list
                self._check_precondition_base(param_group, where)
                self.base_optimizer.add_param_group(param_group)
            else:
                super().add_param_group(param_group)
        else:
            if isinstance(param_group["betas"], list):
                param_group["betas"] = tuple(param_group["betas"])
            _validate_group(param_group, where)
            super().add_param_group(param_group)
        for p in param_group["params"]:
            self._backend(p.device)

    def _backend(self, device: torch.device) -> Backend:
        b = self._backends.get(device)
        if b is None:
            b = get_backend(self.backend_name, device)
            self._backends[device] = b
        return b

    def _phase(self, fn):
        """``fn``, or under torch.compile with a backend of ``_EAGER_UNDER_COMPILE``
        the same run eagerly (``_eagerly``)."""
        if torch.compiler.is_compiling() and any(
                b.name in _EAGER_UNDER_COMPILE for b in self._backends.values()):
            return functools.partial(_eagerly, fn)
        return fn

    @property
    def backends(self) -> Dict[str, str]:
        """Backend chosen per device, e.g. ``{"cpu": "cpu"}``."""
        return {str(d): b.name for d, b in self._backends.items()}

    # -- state ----------------------------------------------------------------
    def _init_state(self, p: Tensor) -> Dict[str, Tensor]:
        state = self.state[p]
        if len(state) == 0:
            sd = _state_dtype(p)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if is_dtensor(p):
                # DTensor state with the parameter's mesh and placements (as torch's
                # optimizers keep it, so distributed checkpointing sees it sharded);
                # the kernels get its local shard
                state["exp_avg"] = torch.zeros_like(p, dtype=sd)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd)
            else:
                state["exp_avg"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
        elif not is_dtensor(p):
            self._match_state(p, state)
        return state

    @staticmethod
    def _match_state(p: Tensor, state: Dict[str, Tensor]) -> None:
        """Existing state follows its parameter after ``model.double()``,
        ``model.to(memory_format=torch.channels_last)`` or ``model.to(device)``
        between steps: exp_avg/exp_avg_sq are copied (values kept; float32 to
        float64 exact, float64 to float32 rounded once, as
        ``torch.optim.Optimizer.load_state_dict`` casts) to the dtype the
        parameter's state has (``_state_dtype``) and to the parameter's device
        and memory layout, and ``step`` to its device. A state tensor of another
        shape is left alone (the backends raise, naming it)."""
        sd = _state_dtype(p)
        dense = p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if not isinstance(t, Tensor) or t.shape != p.shape:
                continue
            if t.dtype != sd or t.device != p.device or (dense and t.stride() != p.stride()):
                state[key] = torch.empty_like(p, dtype=sd, memory_format=torch.preserve_format
                                              ).copy_(t)
        t = state.get("step")
        if isinstance(t, Tensor) and t.device != p.device:
            state["step"] = t.to(p.device)

    def _backup_for(self, p: Tensor) -> Tensor:
        """The backup of ``p``'s local tensor (a plain tensor, also for DTensors)."""
        lp = _local(p)
        b = self._backups.get(p)
        if b is None or b.shape != lp.shape or b.dtype != lp.dtype or b.stride() != lp.stride():
            b = torch.empty_like(lp, memory_format=torch.preserve_format)
            self._backups[p] = b
        return b

    def _flag(self, device: torch.device) -> Tensor:
        f = self._found_inf.get(device)
        if f is None:
            f = torch.zeros((), dtype=torch.float32, device=device)
            self._found_inf[device] = f
        return f

    @staticmethod
    def _check_param(p: Tensor, gi: int, i: int) -> None:
        """A parameter the ascent will write: dense (strided) floating point,
        as ``add_param_group`` checks (a tensor put into ``param_groups``
        directly, or changed since, is checked again before anything moves)."""
        if p.layout != torch.strided:
            raise TypeError(f"param_groups[{gi}] param {i}: has layout {p.layout}; only dense "
                            "(strided) parameters are supported")
        if p.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"param_groups[{gi}] param {i}: has dtype {p.dtype}, expected "
                            "float16, bfloat16, float32 or float64")

    def _perturb_done(self, backend: Backend, ps, bs) -> None:
        """Record a perturb call of the running first_step (undone if a later one raises)."""
        done = self._step_vars.get("perturb_calls")
        if done is not None:
            done.append((backend, ps, bs))

    def _run_step_hooks(self, pre: bool) -> None:
        """The step pre- or post-hooks (global and this optimizer's, torch order),
        called as for ``step()`` without arguments: ``hook(self, (self,), {})``.
        A pre-hook may return None or an (args, kwargs) pair (ignored here)."""
        from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

        if pre:
            hooks = (list(_global_optimizer_pre_hooks.values())
                     + list(self._optimizer_step_pre_hooks.values()))
        else:
            hooks = (list(self._optimizer_step_post_hooks.values())
                     + list(_global_optimizer_post_hooks.values()))
        for hook in hooks:
            result = hook(self, (self,), {})
            if pre and result is not None and not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"step pre-hook {hook!r} must return None or a tuple of "
                                   f"(new_args, new_kwargs), but got {result!r}")

    @staticmethod
    def _check_grad(p: Tensor, gi: int, i: int, which: str) -> None:
        g = p.grad
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(
                f"param_groups[{gi}] param {i}: {which} gradient is sparse ({g.layout}); "
                "SAM/FunctionalSAM support dense gradients only")
        if g.shape != p.shape:
            raise RuntimeError(f"param_groups[{gi}] param {i}: {which} gradient has shape "
                               f"{tuple(g.shape)}, parameter has {tuple(p.shape)}")

    def _by_device(self, items):
        out = defaultdict(list)
        for it in items:
            out[it[0].device].append(it)
        return out

    def _precond_state(self, p: Tensor) -> Dict[str, Tensor]:
        """exp_avg_sq and step for the preconditioned ascent (the base's in base mode)."""
        if not self._base_mode:
            st = self._init_state(p)
            return {"exp_avg_sq": _local(st["exp_avg_sq"]), "step": st["step"]}
        st = self.state.get(p, {})
        if "exp_avg_sq" in st:
            step = _local(st["step"])
            if not isinstance(step, Tensor):
                step = torch.tensor(float(step))
            return {"exp_avg_sq": _local(st["exp_avg_sq"]),
                    "step": step.to(device=p.device, dtype=torch.float32).reshape(())}
        # the base has not stepped yet: identity preconditioner (t = 0)
        return {"exp_avg_sq": torch.zeros_like(_local(p), dtype=_state_dtype(p)),
                "step": torch.zeros((), dtype=torch.float32, device=p.device)}

    def _resolve_scale(self, grad_scale, grad_scaler, where: str) -> Optional[Tensor]:
        if grad_scaler is None:
            return grad_scale
        if grad_scale is not None:
            raise ValueError(f"{where}: pass grad_scale or grad_scaler, not both")
        return _scaler_scale(grad_scaler)

    # -- the two phases -------------------------------------------------------
    @torch.no_grad()
    def first_step(self, grad_scale: Optional[Tensor] = None,
                   found_inf: Optional[Tensor] = None, *, grad_scaler=None,
                   zero_grad: bool = True) -> None:
        """Ascent (SPEC §1): perturb θ → θ + e using the current ``.grad``.

        Call after the pass-1 backward(s). ``grad_scale``: optional 0-d
        float32 tensor dividing every grad (loss scaling). ``found_inf``:
        optional 0-d float32 tensor; non-zero (or a non-finite norm) skips
        the perturbation and the coming update. ``grad_scaler``: a
        ``torch.amp.GradScaler`` whose scale is used as ``grad_scale`` (the
        grads came from ``scaler.scale(loss).backward()``). Raises
        ``RuntimeError`` if called twice without ``second_step()``.

        Outside ``step()`` it runs the optimizer's step pre-hooks first
        (``register_step_pre_hook`` and the global ones, as
        ``hook(optimizer, (optimizer,), {})``: a SAM step's hooks run once,
        pre-hooks here and post-hooks at the end of ``second_step()``; new
        arguments returned by a pre-hook are ignored, first_step takes none
        from hooks).

        ``zero_grad`` (default True): after perturbing, the ``.grad`` of every
        parameter of the optimizer is set to None, so the pass-2 backward
        cannot accumulate onto the pass-1 gradient (g(θ) + g(θ+e)) when the
        loop forgets ``zero_grad()``; ``zero_grad=False`` keeps them (then
        zero them before the pass-2 backward yourself). A ``first_step``
        compiled with torch.compile keeps them too (setting ``.grad`` inside
        the traced region makes aot_autograd refuse the next compiled
        ``second_step``, checked with torch 2.13): zero them outside it.

        Every group's hyperparameters are validated first (as at
        construction: a schedule may have changed them), raising
        ``TypeError``/``ValueError`` naming the group before anything changes.

        Atomic: if it raises (a bad gradient or parameter in any group, a
        backend refusing its inputs), θ is bitwise as before the call and no
        step is pending: every group is checked before any is perturbed, and
        groups already perturbed when a backend raises are restored.
        """
        if self._perturbed is not None:
            raise RuntimeError("first_step: called twice without second_step(); "
                               "the parameters are already perturbed")
        if not self._step_vars.get("in_step"):
            self._run_step_hooks(pre=True)
        self._validate_groups("first_step")
        grad_scale = self._resolve_scale(grad_scale, grad_scaler, "first_step")
        done: List[Tuple[Backend, Any, Any]] = []   # perturb calls made: (backend, ps, bs)
        self._step_vars["perturb_calls"] = done
        try:
            if not self._first_step_fast(grad_scale, found_inf):
                self._phase(self._first_step_general)(grad_scale, found_inf)
        except BaseException:
            for be, ps, bs in done:       # θ bitwise back, as before the call
                be.restore(ps, bs)
            self._perturbed = None
            raise
        finally:
            self._step_vars["perturb_calls"] = None
            _theta_changed()
        # records of pass 1 belong to this step (fsam_kernels.functional.step_generation)
        self._step_vars["generation"] = self._step_vars.get("generation", 0) + 1
        if zero_grad and not torch.compiler.is_compiling():
            _clear_grads(self.param_groups)

    def _validate_groups(self, where: str) -> None:
        """Every group's hyperparameters checked as at construction (a few
        Python checks per group, none per parameter)."""
        for gi, group in enumerate(self.param_groups):
            w = f"{where}: param_groups[{gi}]."
            if self._base_mode:
                _validate_sam_keys(group, w)
            else:
                _validate_group(group, w)

    def _prune_backups(self) -> None:
        """Drop the backups of tensors that are no longer parameters of any group
        (removed groups, replaced parameters), so the optimizer keeps neither them
        nor their backups alive. Only called with no step pending."""
        self._step_vars["n_groups"] = len(self.param_groups)
        if not self._backups:
            return
        live = {id(p) for g in self.param_groups for p in g["params"]}
        for k in [k for k in self._backups if id(k) not in live]:
            del self._backups[k]

    def _first_step_general(self, grad_scale, found_inf) -> None:
        """first_step for any parameters (DTensor / FSDP2 shards included)."""
        self._prune_backups()
        groups_items = []
        devices = set()
        for gi, group in enumerate(self.param_groups):
            items = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                self._check_param(p, gi, i)
                self._check_grad(p, gi, i, "pass-1")
                state = self._precond_state(p) if group["precondition"] else None
                items.append((p, _local(p.grad), state))
                devices.add(p.device)
            groups_items.append(items)
        for d in self._devices() | devices:
            f = self._flag(d)
            if found_inf is not None:
                f.copy_(found_inf.to(d, torch.float32).reshape(()))
            else:
                f.zero_()
        norm_sq = {d: torch.zeros((), dtype=self._backend(d).norm_dtype, device=d) for d in devices}
        sharded: Dict[Any, Dict[torch.device, Tensor]] = {}   # shard key -> partial N²
        for group, items in zip(self.param_groups, groups_items):
            beta2 = group["betas"][1] if group["precondition"] else 0.0
            eps = group["eps"] if group["precondition"] else 0.0
            for (d, key), its in self._by_device_shard(items).items():
                pre = group["precondition"]
                out = norm_sq[d] if key is None else self._partial(sharded, key, d)
                self._backend(d).sq_norm(
                    _compile_safe_all([g for _, g, _ in its]),
                    _compile_safe_all([s["exp_avg_sq"] for _, _, s in its]) if pre else None,
                    [s["step"] for _, _, s in its] if pre else None,
                    beta2=beta2, eps=eps, precondition=pre,
                    grad_scale=self._scale_on(grad_scale, d), out=_compile_safe_out(out))
        self._reduce_norm_sq(norm_sq, sharded)
        self._global_sum(norm_sq)
        perturbed = []
        for group, items in zip(self.param_groups, groups_items):
            plist = []
            pre = group["precondition"]
            for d, its in self._by_device(items).items():
                ps = [p for p, _, _ in its]
                be = self._backend(d)
                lps = _compile_safe_all([_local(p) for p in ps])
                bs = _compile_safe_all([self._backup_for(p) for p in ps])
                be.perturb(
                    lps, _compile_safe_all([g for _, g, _ in its]), bs,
                    _compile_safe_all([s["exp_avg_sq"] for _, _, s in its]) if pre else None,
                    [s["step"] for _, _, s in its] if pre else None,
                    rho=group["rho"], norm_sq=norm_sq[d], norm_eps=self.norm_eps,
                    beta2=group["betas"][1] if pre else 0.0, eps=group["eps"] if pre else 0.0,
                    precondition=pre,
                    grad_scale=self._scale_on(grad_scale, d), found_inf=self._flag(d))
                self._perturb_done(be, lps, bs)
                plist.extend(ps)
            perturbed.append(plist)
        self._perturbed = perturbed
        self._last_norm_sq = norm_sq

    def _plans_usable(self) -> bool:
        """Whether the cached plans may run this phase (eager, no dispatch mode);
        drops them all when ``optimizer.state`` changed since they were made
        (replaced, cleared, an entry added, removed or replaced: the plans
        hold the old per-parameter dicts) and those of removed groups."""
        if torch.compiler.is_compiling() or _dispatch_depth():
            return False
        plans = self._plans
        if plans:
            snap = self._step_vars.get("state_snapshot")
            st = self.state
            if (snap is None or snap[0] is not st or len(st) != len(snap[1])
                    or not all(map(operator.is_, st.values(), snap[1]))):
                plans.clear()
            else:
                n = len(self.param_groups)
                for key in [k for k in plans if k[1] >= n]:
                    del plans[key]
        return True

    def _snapshot_state(self) -> None:
        """Remember ``optimizer.state`` as the plans saw it (``_plans_usable``)."""
        self._step_vars["state_snapshot"] = (self.state, tuple(self.state.values()))

    def _first_step_fast(self, grad_scale, found_inf) -> bool:
        """first_step without DTensors, in eager mode: the same backend calls as
        ``_first_step_general`` (same tensors, same order) from cached per-group
        plans (fsam_kernels/_plans.py). Returns False, having changed nothing
        (but fresh zero state of preconditioned parameters, as the general path
        does), when a DTensor is present, under torch.compile, or in
        ``base_optimizer`` mode."""
        if self._base_mode or not self._plans_usable():
            return False
        plans = self._plans
        staged = []
        built = False
        try:
            for gi, group in enumerate(self.param_groups):
                grads = grads_of(group["params"])
                mask = grad_mask(grads)
                plan = plans.get(("first", gi))
                if plan is None or not plan.valid(self, group, mask):
                    plan = FirstPlan.build(self, group, grads, mask)
                    if plan is None:
                        return False
                    plans[("first", gi)] = plan
                    built = True
                staged.append((gi, group, plan, [c.get(grads) for c in plan.calls]))
        except RuntimeError:  # tensors without storage (meta, fake): the general path says
            return False
        if built:                 # a new plan may have created state
            self._snapshot_state()
        if built or len(self.param_groups) != self._step_vars.get("n_groups"):
            self._prune_backups()
        for gi, group, plan, gss in staged:   # every grad checked before any change
            for c, gs in zip(plan.calls, gss):
                if not check_grads(self, gi, c.idx, gs, c.shapes, group["params"], "pass-1"):
                    return False
        devs = {d for *_, plan, _ in staged for d in plan.devs}
        grad_devs = {c.device for *_, plan, _ in staged for c in plan.calls}
        for d in devs | grad_devs:
            f = self._flag(d)
            if found_inf is not None:
                f.copy_(found_inf.to(d, torch.float32).reshape(()))
            else:
                f.zero_()
        norm_sq = {d: torch.zeros((), dtype=self._backend(d).norm_dtype, device=d)
                   for d in grad_devs}
        for gi, group, plan, gss in staged:
            pre = plan.pre
            beta2 = group["betas"][1] if pre else 0.0
            eps = group["eps"] if pre else 0.0
            for c, gs in zip(plan.calls, gss):
                self._backend(c.device).sq_norm(
                    gs, c.vs if pre else None, c.ts if pre else None,
                    beta2=beta2, eps=eps, precondition=pre,
                    grad_scale=self._scale_on(grad_scale, c.device), out=norm_sq[c.device],
                    cache=c.cache)
        self._global_sum(norm_sq)
        for gi, group, plan, gss in staged:
            pre = plan.pre
            for c, gs in zip(plan.calls, gss):
                d = c.device
                be = self._backend(d)
                be.perturb(
                    c.ps, gs, c.bs, c.vs if pre else None, c.ts if pre else None,
                    rho=group["rho"], norm_sq=norm_sq[d], norm_eps=self.norm_eps,
                    beta2=group["betas"][1] if pre else 0.0, eps=group["eps"] if pre else 0.0,
                    precondition=pre, grad_scale=self._scale_on(grad_scale, d),
                    found_inf=self._flag(d), cache=c.cache)
                self._perturb_done(be, c.ps, c.bs)
        perturbed = [plan.perturbed for *_, plan, _ in staged]
        self._perturbed = perturbed
        # the backups of ``perturbed`` in the same order, for second_step
        self._step_vars["perturbed_backups"] = (perturbed, [plan.backups for *_, plan, _ in staged])
        self._last_norm_sq = norm_sq
        return True

    @staticmethod
    def _global_sum(per_device: Dict[torch.device, Tensor]) -> None:
        """Parameters on several devices: every entry becomes the sum (in place)."""
        if len(per_device) > 1:
            total = sum(n.to(torch.float64).cpu() for n in per_device.values())
            for d in per_device:
                per_device[d].copy_(total.to(d))

    def _share_flags(self) -> None:
        """A skip on one device skips the step on every device (atomic)."""
        if len(self._found_inf) > 1:
            anyf = torch.stack([f.cpu() for f in self._found_inf.values()]).amax()
            for d, f in self._found_inf.items():
                f.copy_(anyf.to(d))

    def _by_device_shard(self, items):
        """Group by (device, shard key): sharded parameters get their own N² partials."""
        out = defaultdict(list)
        for it in items:
            out[(it[0].device, shard_key(it[0]))].append(it)
        return out

    def _partial(self, sharded, key, d: torch.device) -> Tensor:
        per = sharded.setdefault(key, {})
        if d not in per:
            per[d] = torch.zeros((), dtype=self._backend(d).norm_dtype, device=d)
        return per[d]

    def _reduce_norm_sq(self, norm_sq: Dict[torch.device, Tensor],
                        sharded: Optional[Dict[Any, Dict[torch.device, Tensor]]] = None) -> None:
        """Sharded parameters (DTensor, FSDP2): each rank's partial N² over its local
        shards is all-reduced (SUM) over the shard group and added to ``norm_sq``.
        One all_reduce per shard key (per mesh dim): one per step for FSDP2; none
        without sharded parameters. Same order on every rank (group order)."""
        for key, per in (sharded or {}).items():
            devs = list(per)
            t = per[devs[0]]
            for d in devs[1:]:                   # a mesh has one device per rank
                t.add_(per[d].to(t.device, t.dtype))
            all_reduce_over_shards(t, key)
            d0 = devs[0]
            if d0 in norm_sq:
                norm_sq[d0].add_(t.to(norm_sq[d0].dtype))
            else:
                norm_sq[d0] = t

    def _share_flags_over_shards(self, params) -> None:
        """With sharded parameters, a non-finite local grad must skip the step on
        every rank: found_inf is all-reduced (MAX) over the shard group."""
        self._share_flags()
        seen = []
        for p in params:
            key = shard_key(p)
            if key is not None and key not in seen:
                seen.append(key)
                all_reduce_over_shards(self._flag(p.device), key,
                                       op=torch.distributed.ReduceOp.MAX)
        if seen:
            self._share_flags()

    @staticmethod
    def _scale_on(grad_scale: Optional[Tensor], device) -> Optional[Tensor]:
        if grad_scale is None:
            return None
        if not isinstance(grad_scale, Tensor) or grad_scale.numel() != 1:
            raise TypeError("grad_scale: expected a 1-element float32 tensor")
        return grad_scale.reshape(()).to(device=device, dtype=torch.float32)

    def _pass2_params(self) -> List[Tensor]:
        """Parameters with a pass-2 grad, every grad checked (sparse, shape)
        before anything is changed, so a bad grad leaves the step pending and
        θ + e, state and flags untouched (``restore()`` then undoes it)."""
        out = []
        for gi, g in enumerate(self.param_groups):
            for i, p in enumerate(g["params"]):
                if p.grad is not None:
                    self._check_grad(p, gi, i, "pass-2")
                    out.append(p)
        return out

    def _mark_non_finite(self, params: List[Tensor], inv_scale: Optional[Dict] = None) -> None:
        """found_inf |= any grad not finite; multiplies the grads by ``inv_scale[d]``
        (1 when None: a check without changing a value), with no host sync."""
        by = defaultdict(list)
        for p in params:
            g = _local(p.grad)
            by[g.device].append(g)
        self._mark_non_finite_grads(by, inv_scale)

    def _mark_non_finite_grads(self, grads_by_device: Dict[torch.device, List[Tensor]],
                               inv_scale: Optional[Dict] = None) -> None:
        """``_mark_non_finite`` for grads already grouped by device."""
        by = defaultdict(list)
        for d, gs in grads_by_device.items():
            for g in gs:
                by[(d, g.dtype)].append(g)
        for (d, _), gs in by.items():
            inv = (inv_scale or {}).get(d)
            if inv is None:
                inv = torch.ones((), dtype=torch.float32, device=d)
            torch._amp_foreach_non_finite_check_and_unscale_(gs, self._flag(d), inv)

    def _grad_sq_norm(self, params: List[Tensor], grad_scale: Optional[Tensor]):
        """Σ (g/s)² of the update gradient over all groups and devices (and shards)."""
        n2 = {}
        sharded: Dict[Any, Dict[torch.device, Tensor]] = {}
        for (d, key), ps in self._by_device_shard([(p,) for p in params]).items():
            if key is None:
                if d not in n2:
                    n2[d] = torch.zeros((), dtype=self._backend(d).norm_dtype, device=d)
                out = n2[d]
            else:
                out = self._partial(sharded, key, d)
            self._backend(d).sq_norm(_compile_safe_all([_local(p.grad) for (p,) in ps]), None,
                                     None, beta2=0.0, eps=0.0, precondition=False,
                                     grad_scale=self._scale_on(grad_scale, d),
                                     out=_compile_safe_out(out))
        self._reduce_norm_sq(n2, sharded)
        self._global_sum(n2)
        return n2

    def _clip_coef(self, n2: Tensor) -> Tensor:
        """min(1, max_grad_norm / (‖ĝ‖ + 1e-6)) on the device; marks a non-finite norm."""
        d = n2.device
        f = self._flag(d)
        f.copy_(torch.maximum(f, (~torch.isfinite(n2)).to(f.dtype)))
        n = n2.to(torch.float32).sqrt()
        return (self.max_grad_norm / (n + _CLIP_EPS)).clamp(max=1.0)

    @torch.no_grad()
    def second_step(self, grad_scale: Optional[Tensor] = None,
                    found_inf: Optional[Tensor] = None, *, grad_scaler=None) -> None:
        """Descent (SPEC §3): restore θ bitwise, then AdamW (or the base optimizer's
        step) with the pass-2 ``.grad``.

        Call after the pass-2 backward(s). Parameters perturbed in
        ``first_step`` without a pass-2 grad are restored and not updated;
        parameters with a pass-2 grad that were not perturbed get a normal
        update. ``found_inf`` (optional 0-d float32 tensor) non-zero skips the
        update (θ restored, state unchanged). ``grad_scaler``: as in
        ``first_step``; the pass-2 grads are also checked for inf/NaN and the
        outcome is recorded in the scaler, so ``scaler.update()`` backs off
        after a skipped step. With ``max_grad_norm`` the update gradient is
        clipped by its global norm (non-finite norm: step skipped).
        Raises ``RuntimeError`` if ``first_step()`` was not called, and
        ``TypeError``/``ValueError`` naming the group for a hyperparameter that
        is no longer valid (checked before anything changes: the step stays
        pending; fix the value and call again, or ``restore()``).

        Parameter groups may be reordered, replaced, added or removed between
        ``first_step()`` and ``second_step()``: every perturbed parameter is
        restored wherever it now is (or is no longer), and the parameters of
        the current groups are updated with their groups' hyperparameters.

        It counts as the optimizer's step: outside ``step()`` the step
        post-hooks run at its end (``hook(optimizer, (optimizer,), {})``), and
        learning-rate schedulers see the step (no "lr_scheduler.step() before
        optimizer.step()" warning).
        """
        if self._perturbed is None:
            raise RuntimeError("second_step: called without first_step(); nothing is perturbed")
        self._validate_groups("second_step")
        if self._step_vars.get("recorders") or self._step_vars.get("output_marks"):
            from .functional import check_unreplayed
            check_unreplayed(self)  # records of pass 1 not replayed: raise, nothing changed
        grad_scale = self._resolve_scale(grad_scale, grad_scaler, "second_step")
        perturbed = self._perturbed
        try:
            if self._base_mode or not self._second_step_fast(perturbed, grad_scale, found_inf):
                self._phase(self._second_step_general)(perturbed, grad_scale, found_inf)
        finally:
            _theta_changed()
        self._perturbed = None
        flags = [f != 0 for f in self._found_inf.values()]
        self.last_step_skipped = flags[0] if len(flags) == 1 else (
            torch.stack([f.cpu() for f in flags]).any() if flags else None)
        if grad_scaler is not None and grad_scaler.is_enabled():
            self._record_in_scaler(grad_scaler)
        # torch's lr schedulers wrap optimizer.step and read this flag
        # (torch/optim/lr_scheduler.py, patch_track_step_called)
        self._opt_called = True
        if not self._step_vars.get("in_step"):
            self._run_step_hooks(pre=False)

    def _second_step_general(self, perturbed, grad_scale, found_inf) -> None:
        """second_step for any parameters (DTensors, base optimizer)."""
        params2 = self._pass2_params()
        for d in self._devices():
            f = self._flag(d)
            if found_inf is not None:
                f.copy_(torch.maximum(f, found_inf.to(d, torch.float32).reshape(())))
        if self._base_mode:
            self._second_step_base(perturbed, params2, grad_scale)
        else:
            if grad_scale is not None and self.max_grad_norm is None:
                self._mark_non_finite(params2)          # pass-2 inf/NaN check (the clip
                self._share_flags_over_shards(params2)  # norm below checks it otherwise)
            self._share_flags()
            scales = {d: self._scale_on(grad_scale, d) for d in self._devices()}
            if self.max_grad_norm is not None:
                for d, n2 in self._grad_sq_norm(params2, grad_scale).items():
                    coef = self._clip_coef(n2)           # g/s' = (g/s)·coef
                    scales[d] = (scales[d] / coef) if scales[d] is not None else 1.0 / coef
                self._share_flags()
            self._second_step_adamw(perturbed, scales)

    def _second_step_fast(self, perturbed, grad_scale, found_inf) -> bool:
        """``_second_step_general`` for the fused AdamW without DTensors, in eager
        mode: the same backend calls (same tensors, same order) from cached
        per-group plans, every grad checked before anything is changed.
        Returns False, having changed nothing, when a DTensor is present or
        under torch.compile."""
        if not self._plans_usable():
            return False
        pb = self._step_vars.get("perturbed_backups")
        pbk = pb[1] if pb is not None and pb[0] is perturbed else None
        plans = self._plans
        staged = []
        built = False
        try:
            for gi, group in enumerate(self.param_groups):
                grads = grads_of(group["params"])
                mask = grad_mask(grads)
                pg = perturbed[gi] if gi < len(perturbed) else []
                bg = pbk[gi] if pbk is not None and gi < len(pbk) else None
                plan = plans.get(("second", gi))
                if plan is not None and not plan.valid(self, group, mask, pg, bg):
                    plan = None
                staged.append([gi, group, plan, grads, pg, bg])
        except RuntimeError:
            return False
        # every grad checked before anything changes (a new plan creates state)
        clip_gs: Dict[torch.device, List[Tensor]] = {}     # all groups, parameter order
        for gi, group, plan, grads, _, _ in staged:
            if plan is None:
                if not check_group_grads(self, gi, group["params"], grads, "pass-2"):
                    return False
            else:
                for c in plan.clip:
                    if not check_grads(self, gi, c.idx, c.get(grads), c.shapes, group["params"],
                                       "pass-2"):
                        return False
        for st in staged:
            gi, group, plan, grads, pg, bg = st
            if plan is None:
                plan = st[2] = SecondPlan.build(self, group, grads, grad_mask(grads), pg, bg)
                if plan is None:
                    return False
                plans[("second", gi)] = plan
                built = True
            for c in plan.clip:
                clip_gs.setdefault(c.device, []).extend(c.get(grads))
        if built:
            self._snapshot_state()
        if (any(st[2].matched != len(st[4]) for st in staged)
                or any(perturbed[len(staged):])):
            return False    # groups reordered/changed since first_step: the general path
        staged = [st[:4] for st in staged]
        all_devs = {d for *_, plan, _ in staged for d in plan.devs}
        for d in all_devs:
            f = self._flag(d)
            if found_inf is not None:
                f.copy_(torch.maximum(f, found_inf.to(d, torch.float32).reshape(())))
        if grad_scale is not None and self.max_grad_norm is None:
            self._mark_non_finite_grads(clip_gs)   # pass-2 inf/NaN check (the clip
            self._share_flags()                    # norm below checks it otherwise)
        self._share_flags()
        scales = {d: self._scale_on(grad_scale, d) for d in all_devs}
        if self.max_grad_norm is not None:
            n2 = {}
            for d, gs in clip_gs.items():
                n2[d] = torch.zeros((), dtype=self._backend(d).norm_dtype, device=d)
                self._backend(d).sq_norm(gs, None, None, beta2=0.0, eps=0.0,
                                         precondition=False,
                                         grad_scale=self._scale_on(grad_scale, d), out=n2[d])
            self._global_sum(n2)
            for d, n in n2.items():
                coef = self._clip_coef(n)                # g/s' = (g/s)·coef
                scales[d] = (scales[d] / coef) if scales[d] is not None else 1.0 / coef
            self._share_flags()
        for gi, group, plan, grads in staged:
            for c in plan.without:
                self._backend(c.device).restore(c.ps, c.bs, cache=c.cache)
            beta1, beta2 = group["betas"]
            for calls, has_backup in ((plan.restored, True), (plan.fresh, False)):
                for c in calls:
                    d = c.device
                    self._backend(d).restore_adamw(
                        c.ps, c.get(grads), c.bs if has_backup else None, c.ms, c.vs, c.ts,
                        lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], maximize=group["maximize"],
                        grad_scale=scales[d], found_inf=self._flag(d), cache=c.cache)
        return True

    def _second_step_adamw(self, perturbed, scales) -> None:
        # perturbed parameters by identity, wherever they are now (groups may have
        # been reordered, replaced or removed since first_step)
        pset = {id(p) for plist in perturbed for p in plist}
        seen = set()
        for gi, group in enumerate(self.param_groups):
            with_grad, without = [], []
            for i, p in enumerate(group["params"]):
                seen.add(id(p))
                if p.grad is not None:
                    with_grad.append(p)
                elif id(p) in pset:
                    without.append(p)
            self._restore_perturbed([without])
            restored = [p for p in with_grad if id(p) in pset]
            fresh = [p for p in with_grad if id(p) not in pset]
            beta1, beta2 = group["betas"]
            for plist, has_backup in ((restored, True), (fresh, False)):
                for d, ps in self._by_device([(p,) for p in plist]).items():
                    ps = [p for (p,) in ps]
                    states = [self._init_state(p) for p in ps]
                    cs = _compile_safe_all
                    self._backend(d).restore_adamw(
                        cs([_local(p) for p in ps]), cs([_local(p.grad) for p in ps]),
                        cs([self._backups[p] for p in ps]) if has_backup else None,
                        cs([_local(s["exp_avg"]) for s in states]),
                        cs([_local(s["exp_avg_sq"]) for s in states]),
                        [s["step"] for s in states],
                        lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], maximize=group["maximize"],
                        grad_scale=scales[d], found_inf=self._flag(d))
        self._restore_perturbed(perturbed, skip=seen)   # removed from the groups since

    def _second_step_base(self, perturbed, params2, grad_scale) -> None:
        """Restore θ, unscale (and clip) ĝ in place, then the base optimizer's own
        step, skipped when a flag is set: the one host read of this path."""
        self._restore_perturbed(perturbed)
        inv = None
        if grad_scale is not None:
            inv = {d: self._scale_on(grad_scale, d).reciprocal() for d in self._devices()}
        self._mark_non_finite(params2, inv)   # unscale once + pass-2 inf/NaN check
        if self.max_grad_norm is not None:
            for d, n2 in self._grad_sq_norm(params2, None).items():
                coef = self._clip_coef(n2)
                torch._foreach_mul_([_local(p.grad) for p in params2 if p.grad.device == d],
                                    coef)
        self._share_flags_over_shards(params2)
        if not any(bool(f.item()) for f in self._found_inf.values()):
            self.base_optimizer.step()

    def _record_in_scaler(self, scaler) -> None:
        """Record this step's inf/NaN outcome in the scaler, as torch's fused
        optimizers do, so that ``scaler.update()`` backs off after a skip."""
        from torch.amp.grad_scaler import OptState

        st = scaler._per_optimizer_states[id(self)]
        if st["stage"] is OptState.STEPPED:
            raise RuntimeError("grad_scaler: step already recorded since the last "
                               "scaler.update(); call scaler.update() once per step")
        dev = scaler._scale.device
        st["found_inf_per_device"] = {dev: self.last_step_skipped.to(dev, torch.float32)}
        st["stage"] = OptState.STEPPED

    @torch.no_grad()
    def restore(self) -> None:
        """Undo a pending ``first_step()``: θ + e → θ (bitwise), no update
        (and no step hooks: the step did not happen)."""
        if self._perturbed is None:
            return
        try:
            self._phase(self._restore_perturbed)(self._perturbed)
        finally:
            _theta_changed()
        self._perturbed = None

    def _restore_perturbed(self, perturbed, skip=None) -> None:
        """p ← backup for every parameter in ``perturbed`` (lists per group), except
        those whose id is in ``skip``."""
        for plist in perturbed:
            if skip:
                plist = [p for p in plist if id(p) not in skip]
            for d, ps in self._by_device([(p,) for p in plist]).items():
                ps = [p for (p,) in ps]
                self._backend(d).restore(_compile_safe_all([_local(p) for p in ps]),
                                         _compile_safe_all([self._backups[p] for p in ps]))

    def clean_param(self, p: Tensor) -> Tensor:
        """The value of parameter ``p`` at θ: its bitwise backup while a
        ``first_step()`` is pending and ``p`` was perturbed, else ``p`` itself
        (read-only: do not write to it). Raises ``ValueError`` if ``p`` is not
        a parameter of this optimizer."""
        if not any(q is p for g in self.param_groups for q in g["params"]):
            raise ValueError(f"clean_param: the tensor of shape {tuple(p.shape)} is not a "
                             "parameter of this optimizer")
        if self._perturbed is not None and any(q is p for pl in self._perturbed for q in pl):
            return self._backups[p]
        return p

    # -- closure API ----------------------------------------------------------
    def _devices(self):
        return {p.device for g in self.param_groups for p in g["params"]}

    @staticmethod
    def _unpack(result, which: str):
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
        if getattr(self, "found_inf", None) is not None or getattr(self, "grad_scale", None) is not None:
            raise RuntimeError(_SCALER_STEP_MSG)  # GradScaler.step's attribute contract
        if closure is None and grad_scaler is not None:
            raise RuntimeError(_SCALER_STEP_MSG)  # scaler.step(opt) without a closure
        if closure is not None and not callable(closure):
            raise TypeError(f"closure: expected a callable returning (output, loss) or a "
                            f"back-propagating callable returning the loss, got "
                            f"{type(closure).__name__}")
        if self._perturbed is not None:
            return _closure.complete_pending(self, closure)
        if closure is None:
            raise TypeError(
                f"closure: {type(self).__name__}.step needs a closure returning (output, loss) "
                "(or one that runs backward itself and returns the loss); in a hand-written "
                "loop call first_step() after pass 1, and second_step() (or step() with no "
                "closure) after pass 2; with the Hugging Face Trainer use "
                "fsam_kernels.integrations.hf.SAMTrainer")
        scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        scaled = (lambda l: scaler.scale(l)) if scaler is not None else (lambda l: l)
        rng = _RNGState(self._devices()) if self.same_dropout_masks else None
        sync = (self.model.no_sync() if self.ascent_sync == "local"
                else contextlib.nullcontext())
        snap = _closure.GradSnapshot(self.param_groups)
        _closure.clear_marks(self)      # the marks of this step's closure calls only
        with torch.enable_grad(), sync:
            result = closure()
            if isinstance(result, (tuple, list)):
                # forward-only form: (output, loss)
                back_prop = False
                output, loss = self._unpack(result, "pass 1")
                if snap.changed():
                    raise RuntimeError(_closure.BACKWARD_IN_PAIR_CLOSURE_MSG.format(which="pass-1"))
                self.zero_grad(set_to_none=True)
                try:
                    cot = self._pass1_backward(output, scaled(loss))
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
                if self._functional:
                    if not _closure.marks_count(self):
                        raise ValueError(_closure.FSAM_NEEDS_MARK_MSG)
                    if not _closure.marks_received(self):
                        raise ValueError(
                            "closure: the output marked with mark_output() in pass 1 received "
                            "no gradient; compute the loss from the marked output")
        self.first_step(grad_scaler=scaler)
        bn = (bn_stats_frozen(self.model) if self.bn_clean_pass_only
              else contextlib.nullcontext())
        try:
            if rng is not None:
                rng.restore()
            with torch.enable_grad(), bn:
                if back_prop:
                    self.zero_grad(set_to_none=True)
                    snap2 = _closure.GradSnapshot(self.param_groups)
                    loss2 = _closure.check_back_prop(closure(), snap2, None, "pass 2")
                    if loss2 is _closure.SKIPPED:
                        _closure.warn_pass2_skipped()
                        self.restore()
                        self.last_step_skipped = torch.tensor(True)
                        return loss
                    if self._functional and _closure.marks_count(self):
                        raise RuntimeError(
                            f"mark_output: {_closure.marks_count(self)} output(s) marked in "
                            "pass 1 were not marked again in pass 2; mark the same outputs "
                            "in both passes")
                else:
                    snap2 = _closure.GradSnapshot(self.param_groups)
                    output2, loss2 = self._unpack(closure(), "pass 2")
                    if snap2.changed():
                        raise RuntimeError(
                            _closure.BACKWARD_IN_PAIR_CLOSURE_MSG.format(which="pass-2"))
                    self.zero_grad(set_to_none=True)
                    try:
                        self._pass2_backward(output2, scaled(loss2), cot)
                    except RuntimeError as exc:
                        hinted = _closure.second_backward_hint(exc, "pass-2")
                        if hinted is not None:
                            raise hinted from None
                        raise
        except BaseException:
            _closure.clear_marks(self)
            self.restore()
            raise
        self.second_step(grad_scaler=scaler)
        return loss.detach() if isinstance(loss, Tensor) else loss

    def _pass1_backward(self, output, loss):
        loss.backward()
        return None

    def _pass2_backward(self, output, loss, cot):
        loss.backward()

    # -- copy / pickle ---------------------------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        """Everything but the cached plans (rebuilt on the next step): torch's
        ``Optimizer.__getstate__`` keeps only defaults, state and groups, which
        would leave a ``copy.deepcopy`` of this optimizer without its settings."""
        d = dict(self.__dict__)
        d["_plans"] = {}
        d["_step_vars"] = {k: v for k, v in self._step_vars.items() if k != "state_snapshot"}
        return d

    # -- state_dict -----------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """torch format. With ``base_optimizer`` it is the base's state_dict (its
        state, and groups that also hold rho and precondition). The hooks of
        ``register_state_dict_pre_hook`` / ``register_state_dict_post_hook``
        run as in torch (with ``base_optimizer`` the base's own hooks too)."""
        if not self._base_mode:
            return super().state_dict()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.base_optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @staticmethod
    def _load_state_tensor(val: Tensor, p: Tensor, key, k) -> Tensor:
        """A saved exp_avg/exp_avg_sq as this optimizer keeps it: a copy on the
        parameter's device, float32 (float64 for float64 params); a DTensor with
        the parameter's mesh and placements for a DTensor parameter."""
        sd = _state_dtype(p)
        if not is_dtensor(p):
            if is_dtensor(val):
                val = val.full_tensor()
            return val.detach().to(device=p.device, dtype=sd, copy=True)
        from torch.distributed.tensor import DTensor, distribute_tensor

        if is_dtensor(val):
            if val.device_mesh != p.device_mesh or tuple(val.placements) != tuple(p.placements):
                val = val.redistribute(p.device_mesh, p.placements)
            loc = _local(val)
            if loc.shape != _local(p).shape:
                raise ValueError(f"state_dict: state {key!r} of parameter {k} has local shape "
                                 f"{tuple(loc.shape)}, the parameter's shard has "
                                 f"{tuple(_local(p).shape)} (saved with another sharding)")
            loc = loc.detach().to(device=p.device, dtype=sd, copy=True)
            return DTensor.from_local(loc, p.device_mesh, p.placements, run_check=False,
                                      shape=p.shape, stride=p.stride())
        # a full (unsharded) tensor: every rank keeps its own shard of it
        full = val.detach().to(device=p.device, dtype=sd)
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load optimizer state (torch format: ``state`` and ``param_groups``).

        Unlike ``torch.optim.Optimizer.load_state_dict``, exp_avg/exp_avg_sq
        keep float32 for 16-bit parameters (never rounded to the parameter
        dtype) and ``step`` is placed on the parameter's device as float32.
        A saved group may hold fewer parameters than the current one (e.g. a
        group that was empty when saved): the extra current parameters start
        with fresh state (t = 0). Raises ``ValueError`` on mismatched groups
        or state shapes. The hooks of ``register_load_state_dict_pre_hook``
        (``hook(optimizer, state_dict)``, may return a replacement dict, given
        a shallow copy as in torch) and ``register_load_state_dict_post_hook``
        (``hook(optimizer)``) run before and after loading.
        """
        if not isinstance(state_dict, dict):
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups', got "
                             f"{type(state_dict).__name__}")
        state_dict = state_dict.copy()      # shallow, as torch (hooks may edit it)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_saved_group_keys(self, saved_groups) -> None:
        """``ValueError`` for saved groups that lack this optimizer's
        hyperparameters or carry another optimizer's (e.g. a torch.optim.SGD
        state dict loaded into the fused-AdamW SAM), naming the keys. Keys an lr
        scheduler adds (``initial_lr``, ...) and keys the current group carries
        are not foreign; in ``base_optimizer`` mode the keys torch fills in
        for older checkpoints (``foreach``, ``fused``, ...) may be missing."""
        if not isinstance(saved_groups, (list, tuple)):
            raise ValueError(f"state_dict: 'param_groups' must be a list of dicts, got "
                             f"{type(saved_groups).__name__}")
        for gi, sg in enumerate(saved_groups):
            if not isinstance(sg, dict) or "params" not in sg:
                raise ValueError(f"state_dict: param_groups[{gi}] must be a dict with 'params'")
            keys = set(sg)
            missing = set(self.defaults) - keys
            if self._base_mode:
                missing -= _TORCH_FILLED_KEYS
            current = self.param_groups[gi] if gi < len(self.param_groups) else {}
            foreign = keys - set(self.defaults) - set(current) - _SCHEDULER_KEYS - {"params"}
            if missing or foreign:
                what = (f"{type(self.base_optimizer).__name__}-based " if self._base_mode
                        else "fused-AdamW ")
                raise ValueError(
                    f"state_dict: param_groups[{gi}] " + (f"lacks {sorted(missing)}" if missing else "")
                    + (" and " if missing and foreign else "")
                    + (f"carries foreign keys {sorted(foreign)}" if foreign else "")
                    + f"; it was not saved by this {what}{type(self).__name__} (expected the "
                    f"keys {sorted(self.defaults)}); construct the optimizer that saved it "
                    "(base_optimizer= for another torch optimizer's state)")

    def _load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """``load_state_dict`` after its pre-hooks."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups'")
        self._check_saved_group_keys(state_dict["param_groups"])
        self.restore()          # a pending first_step is abandoned: θ bitwise back first
        if self._base_mode:
            self.base_optimizer.load_state_dict(state_dict)
            self.param_groups = self.base_optimizer.param_groups
            self.state = self.base_optimizer.state
            for gi, g in enumerate(self.param_groups):
                g.setdefault("rho", self.defaults["rho"])
                g.setdefault("precondition", self.defaults["precondition"])
                _validate_sam_keys(g, f"state_dict param_groups[{gi}].")
                self._check_precondition_base(g, f"state_dict param_groups[{gi}].")
            self._perturbed = None
            return
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict: has {len(saved_groups)} parameter groups, "
                             f"the optimizer has {len(self.param_groups)}")
        id_map = {}
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) > len(g["params"]):
                raise ValueError(f"state_dict: group {gi} has {len(sg['params'])} parameters, "
                                 f"the optimizer's has {len(g['params'])}")
            for old, p in zip(sg["params"], g["params"]):
                id_map[old] = p
        new_state = defaultdict(dict)
        for k, st in state_dict["state"].items():
            if k not in id_map:
                continue
            p = id_map[k]
            if not isinstance(st, dict) or set(st) != _STATE_KEYS:
                got = sorted(st) if isinstance(st, dict) else type(st).__name__
                raise ValueError(
                    f"state_dict: state of parameter {k} has keys {got}, expected "
                    f"{sorted(_STATE_KEYS)} (an AdamW-based SAM state; for another base "
                    "optimizer's state construct the optimizer with base_optimizer=)")
            ns = {}
            for key, val in st.items():
                if key != "step" and not (isinstance(val, Tensor) and val.is_floating_point()):
                    raise ValueError(
                        f"state_dict: state {key!r} of parameter {k} must be a real floating-point "
                        f"tensor, got {val.dtype if isinstance(val, Tensor) else type(val).__name__}")
                if key == "step":
                    ns[key] = (val.detach().clone() if isinstance(val, Tensor) else torch.tensor(float(val))
                               ).to(device=p.device, dtype=torch.float32).reshape(())
                elif isinstance(val, Tensor):
                    if val.shape != p.shape:
                        raise ValueError(f"state_dict: state {key!r} of parameter {k} has shape "
                                         f"{tuple(val.shape)}, the parameter has {tuple(p.shape)}")
                    ns[key] = self._load_state_tensor(val, p, key, k)
                else:
                    ns[key] = val
            new_state[p] = ns
        groups = []
        for sg, g in zip(saved_groups, self.param_groups):
            ng = {k: v for k, v in sg.items() if k != "params"}
            ng["params"] = g["params"]
            for k, v in self.defaults.items():
                ng.setdefault(k, v)
            if isinstance(ng.get("betas"), list):
                ng["betas"] = tuple(ng["betas"])
            groups.append(ng)
        for gi, ng in enumerate(groups):
            _validate_group(ng, f"state_dict param_groups[{gi}].")
        self.state = new_state
        self.param_groups = groups
        self._perturbed = None


def _with_step_hooks(step):
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


_SAMBase.step = _with_step_hooks(_SAMBase.step)


class SAM(_SAMBase):
    r"""Sharpness-Aware Minimization over AdamW (Foret et al. 2021), with the
    preconditioned ascent of Singh et al. 2025 (arXiv 2502.02407, §5).

    Args:
        params: iterable of tensors or of dicts (parameter groups, torch
            convention; every hyperparameter below may be overridden per group).
        lr (float, >= 0): AdamW learning rate η. Default 1e-3.
        betas (tuple[float, float], each in [0, 1)): AdamW β1, β2.
        eps (float, >= 0): AdamW ε (also used by the preconditioner).
        weight_decay (float, >= 0): decoupled weight decay λ (AdamW).
        rho (float, >= 0): perturbation radius ρ (Euclidean, over all groups'
            directions; per-group ρ scales that group's share). ``rho=0`` gives
            AdamW.
        precondition (bool): divide the ascent direction by sqrt(v̂) + ε
            (Adam's second moment, bias corrected) before normalising; the
            first step of a parameter uses the identity (SPEC §1 choice).
        maximize (bool): maximise the objective (AdamW semantics).
        backend (str): "auto", "reference", "foreach", "cpu", "cuda" or "triton".
        same_dropout_masks (bool): in ``step(closure)``, restore the RNG state
            before pass 2 so both passes draw the same dropout masks.
        base_optimizer (type or None): a ``torch.optim.Optimizer`` class (e.g.
            ``torch.optim.SGD``) whose own ``step()`` replaces the fused AdamW
            after the fused ascent and restore; every keyword SAM does not use
            (and lr, betas, eps, weight_decay, maximize when given) goes to it.
            ``param_groups``, ``state`` and ``state_dict()`` are the base's.
            ``precondition=True`` needs an Adam/AdamW base (``ValueError``).
        max_grad_norm (float or None): clip the update gradient (pass 2) by its
            global norm, ``min(1, c / (norm + 1e-6))``, without a host sync.
        model (nn.Module or None): the trained module (or its DDP wrapper), for
            ``bn_clean_pass_only`` and ``ascent_sync="local"``.
        bn_clean_pass_only (bool): in ``step(closure)`` with ``model``, BatchNorm
            running statistics are restored after pass 2 (clean pass only).
        ascent_sync (str): DDP; "global" (averaged ascent gradient) or "local"
            (pass 1 under ``model.no_sync()``: per-rank ascent gradients).

    See docs/loops.md for GradScaler, clipping, BatchNorm, DDP and base optimizers.

    State per parameter (torch.optim.AdamW names): ``step`` (0-d float32 on
    the parameter's device), ``exp_avg``, ``exp_avg_sq`` (float32; float64 for
    float64 parameters). The perturbation backup is not part of the state.

    Raises:
        ValueError / TypeError naming the argument for invalid hyperparameters,
        unknown backend names, duplicate or non-floating parameters;
        RuntimeError for a backend that is not available on the parameters'
        device.
    """


class FunctionalSAM(_SAMBase):
    r"""Functional-SAM (Singh et al., ICML 2025, arXiv 2502.02407, §4) over AdamW.

    The second gradient is ĝ = J(θ+e)ᵀ c0: the pass-2 output is
    back-propagated with the pass-1 loss cotangent c0 = ∂ℓ/∂z(θ), never
    the pass-2 loss's own cotangent (SPEC §2). ``precondition=True`` gives the
    paper's preconditioned Functional-SAM. Arguments, state and errors as :class:`SAM`.

    Loss terms that do not pass through the output z (a weight penalty
    added to the loss, a MoE router's load-balancing loss inside a
    ModelOutput's ``.loss``) keep their gradient: ``step(closure)`` runs the
    pass-2 ``loss.backward()`` with the gradient arriving at z replaced by
    c0, so ĝ = J(θ+e)ᵀ c0 + ∇aux(θ+e), and ``rho=0`` is the base optimizer
    on the full loss (the fused head's ``out.loss`` likewise).

    With ``step(closure)`` the cotangent capture and replay are automatic.
    In a hand-written loop use :class:`fsam_kernels.CotangentRecorder`:
    ``z = rec.capture(model(x)); loss_fn(z, y).backward()`` in pass 1, then
    ``opt.first_step()``, ``rec.replay(model(x))`` in pass 2, then
    ``opt.second_step()``.
    """

    _functional = True

    def __init__(self, params: Iterable, *args: Any, output: Any = None, **kwargs: Any) -> None:
        from .functional import check_selector

        check_selector(output, argname="output")
        super().__init__(params, *args, **kwargs)
        #: which part of the closure's output is the model output z (see ``step``)
        self.output = output

    def _pass1_backward(self, output, loss):
        from .functional import CotangentRecorder, check_not_loss, select_output
        from .heads import is_head_output

        sel = getattr(self, "output", None)
        try:
            z = select_output(output, sel, argname="closure output")
        except (KeyError, IndexError, TypeError) as exc:
            raise type(exc)(f"closure: {exc.args[0] if exc.args else exc}") from None
        if is_head_output(z):
            from .heads import HeadRecorder

            rec = HeadRecorder(self)
            rec.capture(z, _closure=True)
            loss.backward()
            rec.check_received("closure")
            return rec
        rec = CotangentRecorder(output=None)
        try:
            items = differentiable_items(z, argname="closure output")
            check_not_loss(items, loss, argname="closure output")
            rec.capture(z, argname="closure output")
        except ValueError as exc:
            raise ValueError(f"closure: {exc}") from None
        loss.backward()
        if not rec.received():
            raise ValueError(
                "closure: the loss returned in pass 1 does not depend on the returned output "
                "(no gradient reached it); Functional-SAM back-propagates the output with "
                "c0 = d loss / d output, so return the output the loss is computed from")
        try:
            rec.check(argname="closure output")
        except ValueError as exc:
            rec.clear()
            raise ValueError(f"closure: {exc}") from None
        return rec

    def _pass2_backward(self, output, loss, rec):
        """Pass 2 of ``step(closure)``: ``loss.backward()`` with the gradient
        arriving at each selected output tensor replaced by its pass-1
        cotangent c0 (tensor hooks), so the output path gives J(θ+e)ᵀ c0 and
        loss terms that bypass the output (regularisers, a MoE router's
        load-balancing loss) are differentiated at θ+e as in SAM."""
        from .functional import select_output
        from .heads import is_head_output

        z = select_output(output, getattr(self, "output", None), argname="closure output")
        if hasattr(rec, "replay_closure_output"):      # the fused head's record
            record = rec._pop()
            if not is_head_output(z) or getattr(z, "_replay_of", None) is not record:
                raise ValueError("closure: in pass 2 the closure must call the same "
                                 "FusedLinearCrossEntropy head once and return its output, "
                                 "as in pass 1")
            _backward_substituted(loss, [z.loss], [record.grad_output])
            return
        try:
            items = differentiable_items(z, argname="closure output")
        except ValueError as exc:
            raise ValueError(f"closure: {exc}") from None
        slot, cots = rec.pop()
        keys = [k for k, _ in items]
        if keys != slot.keys:
            raise RuntimeError(f"closure: the pass-2 output structure {keys} differs from "
                               f"pass 1's {slot.keys}")
        tensors, grads = [], []
        for (k, t), shape, c in zip(items, slot.shapes, cots):
            if tuple(t.shape) != shape:
                raise RuntimeError(f"closure: the pass-2 output {k} has shape "
                                   f"{tuple(t.shape)}, pass 1's had {shape}")
            if c is not None:          # outputs the pass-1 loss did not use keep their grad
                tensors.append(t)
                grads.append(c)
        _backward_substituted(loss, tensors, grads)


def _backward_substituted(loss: Tensor, tensors: List[Tensor], cotangents: List[Tensor]) -> None:
    """``loss.backward()`` where the gradient reaching ``tensors[i]`` is replaced
    by ``cotangents[i]`` (cast to its dtype): the terms of ``loss`` computed from
    those tensors contribute Jᵀ c0 whatever their own gradient, the other terms
    their ordinary gradient. ``RuntimeError`` if the loss does not reach one of
    the tensors (its Jᵀ c0 would be lost)."""
    fired = [False] * len(tensors)
    handles = []
    for i, (t, c) in enumerate(zip(tensors, cotangents)):
        def hook(grad, i=i, c=c.to(t.dtype)):
            fired[i] = True
            return c
        handles.append(t.register_hook(hook))
    try:
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    if not all(fired):
        raise RuntimeError(
            "closure: the loss returned in pass 2 does not depend on the model output it was "
            "computed from in pass 1; Functional-SAM replaces the gradient arriving at that "
            "output by the pass-1 cotangent c0, so compute the pass-2 loss from it as well")
