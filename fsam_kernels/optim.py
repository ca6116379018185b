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
from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
# imported here, not lazily inside the first optimizer's __init__ (torch's
# @_disable_dynamo on Optimizer.add_param_group imports it on first use): its
# import leaves a frame cycle (torch.fx.wrap keeps its caller's frame) holding
# every frame of the importing call stack, which would keep that first
# optimizer alive until the garbage collector runs
import torch._dynamo  # noqa: F401
from torch import Tensor

from .backends import BACKEND_NAMES, Backend, get_backend
from .cotangent import differentiable_items
from .distributed import global_sum, reduce_norm_sq
from .distributed import local as _local
from ._base_mode import BaseOptimizer, FusedAdamW
from ._norms import flag, scale_on, set_flags, sq_norm_into
from ._plans import PlanCache, compile_safe_all
from ._sam_step import ClosureAPI, record_in_scaler, run_step_hooks
from ._staging import first_plans, second_plans
from ._state_dict import init_state, load_state_dict
from ._validation import check_new_group, check_options, sam_defaults

__all__ = ["SAM", "FunctionalSAM", "bn_stats_frozen"]

_NORM_EPS = 1e-12
_UNSET = object()         # "not given": lets base_optimizer users pass lr/eps/... to the base
_ADAMW_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False)


def _theta_changed() -> None:
    """θ was changed in place (θ → θ + e, or back): drop autocast's cached
    low-precision copies of the weights (``torch.clear_autocast_cache``; one
    thread-local cache for every device type and dtype), which were made at the
    old θ. Without this a pass 2 inside the same ``torch.autocast`` block as
    pass 1 would compute at θ (the cast copies), not θ + e.

    Only inside an enabled autocast region: the cache is emptied whenever the
    outermost region exits, so outside one there is nothing to drop, and
    skipping the call there keeps compiled phases free of graph breaks on
    torch versions whose dynamo cannot trace it (2.11; 2.13 traces it)."""
    if any(torch.is_autocast_enabled(d) for d in _AUTOCAST_DEVICE_TYPES):
        torch.clear_autocast_cache()


#: device types whose autocast state ``_theta_changed`` looks at
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


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



class _SAMBase(ClosureAPI, torch.optim.Optimizer):
    """What SAM and FunctionalSAM share: the two phases of a step, each one
    path for plain tensors, DTensor shards, base-optimizer mode and
    torch.compile: build or reuse one plan per group (_staging.py hands the
    plans plain tensors, _plans.py caches them in eager mode), then execute
    it; the update rule is a strategy (``_mode``, _base_mode.py). Checks:
    _validation.py; state and state dicts: _state_dict.py; norms and found_inf
    flags: _norms.py and distributed.py; ``step(closure)`` and
    ``mark_output``: ``ClosureAPI`` (_sam_step.py)."""

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
            raise ValueError(f"backend: unknown backend {backend!r}; "
                             f"expected one of {BACKEND_NAMES}")
        max_grad_norm = check_options(
            same_dropout_masks=same_dropout_masks, bn_clean_pass_only=bn_clean_pass_only,
            max_grad_norm=max_grad_norm, ascent_sync=ascent_sync, model=model)
        given = {k: v for k, v in dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                        maximize=maximize).items() if v is not _UNSET}
        defaults, given = sam_defaults(type(self).__name__, base_optimizer, given, base_kwargs,
                                       rho=rho, precondition=precondition, adamw=_ADAMW_DEFAULTS,
                                       sam_base=_SAMBase)
        # the update rule; in base mode the base is made once the groups exist
        self._mode = FusedAdamW() if base_optimizer is None else BaseOptimizer(None)
        self._mode.validate(defaults, "")
        self.backend_name = backend
        self.same_dropout_masks = same_dropout_masks
        self.max_grad_norm = max_grad_norm
        self.model = model
        self.bn_clean_pass_only = bn_clean_pass_only
        self.ascent_sync = ascent_sync
        self.norm_eps = _NORM_EPS
        self._backends: Dict[torch.device, Backend] = {}
        self._backups: Dict[Tensor, Tensor] = {}
        self._step_vars: Dict[str, Any] = {}
        #: cached per-group launch plans (_plans.py)
        self._plans = PlanCache()
        self._set_var("perturbed", None)
        self._found_inf: Dict[torch.device, Tensor] = {}
        self._set_var("last_step_skipped", None)
        if isinstance(params, (set, frozenset)):
            raise TypeError("params: a set has no order (the state_dict depends on it); "
                            "pass a list, e.g. list(model.parameters())")
        super().__init__(params, defaults)
        if base_optimizer is not None:
            base = base_optimizer(self.param_groups, **given, **base_kwargs)
            # one list of group dicts, holding the SAM keys (rho, precondition) and
            # the base's; lr schedulers on either object drive the base
            self._mode = BaseOptimizer(base)
            self.param_groups = base.param_groups
            self.state = base.state
            self.defaults = dict(base.defaults, **defaults)
            for gi, g in enumerate(self.param_groups):
                self._mode.check_precondition(g, f"param_groups[{gi}].")

    @property
    def base_optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The base optimizer instance (``base_optimizer=``), or None for the fused AdamW."""
        return self._mode.base

    @property
    def _base_mode(self) -> bool:
        return isinstance(self._mode, BaseOptimizer)

    # Values a step writes are kept in one dict behind properties: inside
    # torch.compile'd first_step/second_step, dynamo drops attribute stores on
    # an Optimizer object but keeps dict stores (torch 2.13), and torch 2.11's
    # dynamo refuses a property setter outright ("Attempted setattr on a
    # user-defined object..."). So the library's own code writes them with
    # _set_var (a dict store, traced by both); the setters are for users.
    def _set_var(self, name: str, value) -> None:
        """``_step_vars[name] = value`` (the store every step-path write uses)."""
        self._step_vars[name] = value
        if name == "perturbed":
            self._step_vars["perturbed_backups"] = None   # set by first_step after it

    def _var(name: str, default=None, doc: Optional[str] = None):
        def fset(self, value) -> None:
            self._step_vars[name] = value
        return property(lambda self: self._step_vars.get(name, default), fset, doc=doc)

    last_step_skipped = _var("last_step_skipped", doc=(
        "True when the last step was skipped (non-finite values; SPEC §4). A 0-d bool "
        "tensor on the device (reading it syncs), or None before any step."))
    #: torch's lr schedulers read this flag (set by their wrapper of ``step``, and
    #: by ``second_step``): kept in ``_step_vars`` so a compiled ``second_step`` sets it
    _opt_called = _var("opt_called", False)
    _last_norm_sq = _var("last_norm_sq")
    del _var

    @property
    def _perturbed(self) -> Optional[List[List[Tensor]]]:
        """The parameters perturbed by the pending ``first_step`` (a list per group)."""
        return self._step_vars.get("perturbed")

    @_perturbed.setter
    def _perturbed(self, value) -> None:
        self._set_var("perturbed", value)

    # -- groups, backends, state ------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group (torch semantics); validates it and rejects duplicates.

        Raises ``ValueError`` if a parameter appears twice in the group or is
        already in another group, and ``TypeError``/``ValueError`` for invalid
        hyperparameters, naming the group.
        """
        idx = len(self.param_groups)
        param_group = check_new_group(param_group, idx,
                                      (id(p) for g in self.param_groups for p in g["params"]))
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        self._mode.add_param_group(self, param_group, f"param_groups[{idx}].",
                                   super().add_param_group)
        for p in param_group["params"]:
            self._backend(p.device)

    def _backend(self, device: torch.device) -> Backend:
        b = self._backends.get(device)
        if b is None:
            b = self._backends[device] = get_backend(self.backend_name, device)
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

    def _devices(self):
        return {p.device for g in self.param_groups for p in g["params"]}

    def _init_state(self, p: Tensor) -> Dict[str, Tensor]:
        """``p``'s AdamW state (``_state_dict.init_state``: created at t = 0, or
        following its parameter's dtype, device and layout)."""
        return init_state(self.state, p)

    def _backup_for(self, p: Tensor) -> Tensor:
        """The backup of ``p``'s local tensor (a plain tensor, also for DTensors)."""
        lp = _local(p)
        b = self._backups.get(p)
        if b is None or b.shape != lp.shape or b.dtype != lp.dtype or b.stride() != lp.stride():
            b = self._backups[p] = torch.empty_like(lp, memory_format=torch.preserve_format)
        return b

    def _prune_backups(self) -> None:
        """Drop the backups of tensors that are no longer parameters of any group
        (removed groups, replaced parameters), so the optimizer keeps neither them
        nor their backups alive. Only called with no step pending."""
        self._step_vars["n_groups"] = len(self.param_groups)
        if self._backups:
            live = {id(p) for g in self.param_groups for p in g["params"]}
            for k in [k for k in self._backups if id(k) not in live]:
                del self._backups[k]

    def _flag(self, device: torch.device) -> Tensor:
        return flag(self._found_inf, device)

    def _resolve_scale(self, grad_scale, grad_scaler, where: str) -> Optional[Tensor]:
        if grad_scaler is None:
            return grad_scale
        if grad_scale is not None:
            raise ValueError(f"{where}: pass grad_scale or grad_scaler, not both")
        return _scaler_scale(grad_scaler)

    # -- the two phases: plans built (or reused), then executed ------------------
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
            run_step_hooks(self, pre=True)
        self._validate_groups("first_step")
        grad_scale = self._resolve_scale(grad_scale, grad_scaler, "first_step")
        done: List[Tuple[Backend, Any, Any]] = []   # perturb calls made: (backend, ps, bs)
        self._step_vars["perturb_calls"] = done
        try:
            self._phase(self._first_step_impl)(grad_scale, found_inf)
        except BaseException:
            for be, ps, bs in done:       # θ bitwise back, as before the call
                be.restore(ps, bs)
            self._set_var("perturbed", None)
            raise
        finally:
            self._step_vars["perturb_calls"] = None
            _theta_changed()
        # records of pass 1 belong to this step (fsam_kernels.cotangent.step_generation)
        self._step_vars["generation"] = self._step_vars.get("generation", 0) + 1
        # pass-2 replays of this step, counted for FunctionalSAM.second_step's check
        from .cotangent import _UNBOUND_REPLAYS
        self._step_vars["functional_replays"] = 0
        self._step_vars["unbound_replays_at"] = _UNBOUND_REPLAYS[0]
        if zero_grad and not torch.compiler.is_compiling():
            _clear_grads(self.param_groups)

    def _validate_groups(self, where: str) -> None:
        """Every group's hyperparameters checked as at construction (a few
        Python checks per group, none per parameter)."""
        for gi, group in enumerate(self.param_groups):
            self._mode.validate(group, f"{where}: param_groups[{gi}].")

    def _first_step_impl(self, grad_scale, found_inf) -> None:
        """first_step's work: N² over all groups (SPEC §1), then the perturbation."""
        staged = first_plans(self)
        set_flags(self._found_inf, {d for _, plan, _, _ in staged for d in plan.devs}, found_inf,
                  False)
        norm_sq: Dict[torch.device, Tensor] = {}
        sharded: Dict[Any, Dict[torch.device, Tensor]] = {}
        for group, plan, _, gss in staged:
            pre = plan.pre
            for c, gs in zip(plan.calls, gss):
                sq_norm_into(self._backend(c.device), norm_sq, sharded, c.device, c.key, gs,
                             c.vs if pre else None, c.ts if pre else None, pre=pre,
                             beta2=group["betas"][1] if pre else 0.0,
                             eps=group["eps"] if pre else 0.0, grad_scale=grad_scale,
                             cache=c.cache)
        reduce_norm_sq(norm_sq, sharded)
        global_sum(norm_sq)
        done = self._step_vars.get("perturb_calls")
        for group, plan, _, gss in staged:
            pre = plan.pre
            for c, gs in zip(plan.calls, gss):
                d = c.device
                be = self._backend(d)
                be.perturb(
                    c.ps, plan.kernel_grads(gs), c.bs, c.vs if pre else None,
                    c.ts if pre else None, rho=group["rho"], norm_sq=norm_sq[d],
                    norm_eps=self.norm_eps, beta2=group["betas"][1] if pre else 0.0,
                    eps=group["eps"] if pre else 0.0, precondition=pre,
                    grad_scale=scale_on(grad_scale, d), found_inf=self._flag(d),
                    cache=c.cache)
                if done is not None:      # undone if a later call raises
                    done.append((be, c.ps, c.bs))
        perturbed = [plan.perturbed for _, plan, _, _ in staged]
        self._set_var("perturbed", perturbed)
        # the backups of ``perturbed`` in the same order, for second_step
        self._step_vars["perturbed_backups"] = (perturbed,
                                                [plan.backups for _, plan, _, _ in staged])
        self._set_var("last_norm_sq", norm_sq)

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
            from .cotangent import check_unreplayed
            check_unreplayed(self)  # records of pass 1 not replayed: raise, nothing changed
        if self._functional and not torch.compiler.is_compiling():
            from .cotangent import check_replayed
            check_replayed(self)    # warns once when pass 2 may have been plain SAM's
        grad_scale = self._resolve_scale(grad_scale, grad_scaler, "second_step")
        try:
            self._phase(self._second_step_impl)(self._perturbed, grad_scale, found_inf)
        finally:
            _theta_changed()
        self._set_var("perturbed", None)
        flags = [f != 0 for f in self._found_inf.values()]
        self._set_var("last_step_skipped", flags[0] if len(flags) == 1 else (
            torch.stack([f.cpu() for f in flags]).any() if flags else None))
        if grad_scaler is not None and grad_scaler.is_enabled():
            record_in_scaler(self, grad_scaler)
        # torch's lr schedulers wrap optimizer.step and read this flag
        # (torch/optim/lr_scheduler.py, patch_track_step_called)
        self._set_var("opt_called", True)
        if not self._step_vars.get("in_step"):
            run_step_hooks(self, pre=False)

    def _second_step_impl(self, perturbed, grad_scale, found_inf) -> None:
        """second_step's work: the plans, the flags, the update rule (``_mode``)."""
        staged, leftover = second_plans(self, perturbed)
        devs = {d for _, plan, _ in staged for d in plan.devs}
        set_flags(self._found_inf, devs, found_inf, True)
        self._mode.second_step(self, staged, devs, grad_scale)
        self._restore_perturbed([leftover])       # removed from the groups since

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
        self._set_var("perturbed", None)

    def _restore_perturbed(self, perturbed) -> None:
        """p ← backup for every parameter in ``perturbed`` (lists per group)."""
        for plist in perturbed:
            by: Dict[torch.device, List[Tensor]] = {}
            for p in plist:
                by.setdefault(p.device, []).append(p)
            for d, ps in by.items():
                self._backend(d).restore(compile_safe_all([_local(p) for p in ps]),
                                         compile_safe_all([self._backups[p] for p in ps]))

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

    # -- copy / pickle / state_dict ----------------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        """Everything but the cached plans (rebuilt on the next step): torch's
        ``Optimizer.__getstate__`` keeps only defaults, state and groups, which
        would leave a ``copy.deepcopy`` of this optimizer without its settings."""
        d = dict(self.__dict__)
        d["_plans"] = PlanCache()
        return d

    def state_dict(self) -> Dict[str, Any]:
        """torch format. With ``base_optimizer`` it is the base's state_dict (its
        state, and groups that also hold rho and precondition). The hooks of
        ``register_state_dict_pre_hook`` / ``register_state_dict_post_hook``
        run as in torch (with ``base_optimizer`` the base's own hooks too)."""
        return self._mode.state_dict(self, super().state_dict)

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
        load_state_dict(self, state_dict)


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
        from .cotangent import check_selector

        check_selector(output, argname="output")
        super().__init__(params, *args, **kwargs)
        #: which part of the closure's output is the model output z (see ``step``)
        self.output = output

    def _pass1_backward(self, output, loss):
        from .cotangent import CotangentRecorder, check_not_loss, select_output
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
        from .cotangent import note_replay, select_output
        from .heads import is_head_output

        z = select_output(output, getattr(self, "output", None), argname="closure output")
        if hasattr(rec, "replay_closure_output"):      # the fused head's record
            record = rec._pop()
            if not is_head_output(z) or getattr(z, "_replay_of", None) is not record:
                raise ValueError("closure: in pass 2 the closure must call the same "
                                 "FusedLinearCrossEntropy head once and return its output, "
                                 "as in pass 1")
            _backward_substituted(loss, [z.loss], [record.grad_output])
            note_replay(self)
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
        note_replay(self)


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
