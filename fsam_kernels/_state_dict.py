"""``state_dict`` / ``load_state_dict`` of SAM and FunctionalSAM (torch format).

The fused-AdamW optimizers save torch.optim.AdamW's per-parameter state
(``step``, ``exp_avg``, ``exp_avg_sq``) and groups; with ``base_optimizer=``
the state dict is the base optimizer's (its state, groups that also hold
``rho`` and ``precondition``). Loading checks everything before anything
changes: a refused load leaves the optimizer as it was.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict

import torch
from torch import Tensor

from .distributed import is_dtensor, local
from ._validation import validate_group, validate_sam_keys

__all__ = ["STATE_KEYS", "state_dtype", "init_state", "match_state", "load_state_dict",
           "check_saved_group_keys", "load_state_tensor", "load_adamw_state_dict",
           "load_base_state_dict", "run_state_dict_hooks"]

#: per-parameter state keys of the AdamW-based optimizers (torch.optim.AdamW names)
STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})
#: group keys torch's lr schedulers write (torch/optim/lr_scheduler.py)
_SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"})
#: group keys torch's optimizers fill in (__setstate__) for checkpoints saved without them
_TORCH_FILLED_KEYS = frozenset({"foreach", "fused", "differentiable", "capturable", "maximize",
                                "decoupled_weight_decay"})


def state_dtype(p: Tensor) -> torch.dtype:
    """exp_avg / exp_avg_sq dtype: float64 for float64 params, else float32 (SPEC)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def init_state(state_of, p: Tensor) -> Dict[str, Tensor]:
    """``state_of[p]``, ``p``'s AdamW state: created at t = 0 (``step`` a 0-d
    float32 on ``p``'s device, zero moments of ``state_dtype(p)`` in ``p``'s
    layout; DTensors for a DTensor parameter, as torch's optimizers keep it),
    or the existing one following its parameter (:func:`match_state`)."""
    state = state_of[p]
    if len(state) == 0:
        sd = state_dtype(p)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        fmt = {} if is_dtensor(p) else {"memory_format": torch.preserve_format}
        state["exp_avg"] = torch.zeros_like(p, dtype=sd, **fmt)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd, **fmt)
    elif not is_dtensor(p):
        match_state(p, state)
    return state


def match_state(p: Tensor, state: Dict[str, Tensor]) -> None:
    """Existing state follows its parameter after ``model.double()``,
    ``model.to(memory_format=torch.channels_last)`` or ``model.to(device)``
    between steps: exp_avg/exp_avg_sq are copied (values kept; float32 to
    float64 exact, float64 to float32 rounded once, as
    ``torch.optim.Optimizer.load_state_dict`` casts) to the dtype the
    parameter's state has (``state_dtype``) and to the parameter's device
    and memory layout, and ``step`` to its device. A state tensor of another
    shape is left alone (the backends raise, naming it)."""
    sd = state_dtype(p)
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


def load_state_dict(opt, state_dict: Dict[str, Any]) -> None:
    """``opt.load_state_dict(state_dict)``: the load pre-hooks, every check
    (nothing changes when one fails), ``restore()`` of a pending step, the
    load by ``opt``'s update rule, the post-hooks."""
    if not isinstance(state_dict, dict):
        raise ValueError("state_dict: expected a dict with 'state' and 'param_groups', got "
                         f"{type(state_dict).__name__}")
    state_dict = state_dict.copy()      # shallow, as torch (hooks may edit it)
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict: expected a dict with 'state' and 'param_groups'")
    opt._mode.check_saved_groups(opt, state_dict["param_groups"])
    opt.restore()          # a pending first_step is abandoned: θ bitwise back first
    opt._mode.load_state_dict(opt, state_dict)
    opt._set_var("perturbed", None)
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def run_state_dict_hooks(opt, make) -> Dict[str, Any]:
    """``make()`` (the state dict) between ``opt``'s state_dict pre- and
    post-hooks, as ``torch.optim.Optimizer.state_dict`` runs them."""
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    state_dict = make()
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def check_saved_group_keys(opt, saved_groups, base) -> None:
    """``ValueError`` for saved groups that lack ``opt``'s hyperparameters or
    carry another optimizer's (e.g. a torch.optim.SGD state dict loaded into
    the fused-AdamW SAM), naming the keys. Keys an lr scheduler adds
    (``initial_lr``, ...) and keys the current group carries are not foreign;
    with a base optimizer (``base``) the keys torch fills in for older
    checkpoints (``foreach``, ``fused``, ...) may be missing."""
    if not isinstance(saved_groups, (list, tuple)):
        raise ValueError(f"state_dict: 'param_groups' must be a list of dicts, got "
                         f"{type(saved_groups).__name__}")
    for gi, sg in enumerate(saved_groups):
        if not isinstance(sg, dict) or "params" not in sg:
            raise ValueError(f"state_dict: param_groups[{gi}] must be a dict with 'params'")
        keys = set(sg)
        missing = set(opt.defaults) - keys
        if base is not None:
            missing -= _TORCH_FILLED_KEYS
        current = opt.param_groups[gi] if gi < len(opt.param_groups) else {}
        foreign = keys - set(opt.defaults) - set(current) - _SCHEDULER_KEYS - {"params"}
        if missing or foreign:
            what = f"{type(base).__name__}-based " if base is not None else "fused-AdamW "
            raise ValueError(
                f"state_dict: param_groups[{gi}] " + (f"lacks {sorted(missing)}" if missing else "")
                + (" and " if missing and foreign else "")
                + (f"carries foreign keys {sorted(foreign)}" if foreign else "")
                + f"; it was not saved by this {what}{type(opt).__name__} (expected the "
                f"keys {sorted(opt.defaults)}); construct the optimizer that saved it "
                "(base_optimizer= for another torch optimizer's state)")


def load_state_tensor(val: Tensor, p: Tensor, key, k) -> Tensor:
    """A saved exp_avg/exp_avg_sq as the optimizer keeps it: a copy on the
    parameter's device, float32 (float64 for float64 params); a DTensor with
    the parameter's mesh and placements for a DTensor parameter. ``ValueError``
    for a DTensor saved with another sharding (``key``, ``k``: the state key
    and saved parameter id, for the message)."""
    sd = state_dtype(p)
    if not is_dtensor(p):
        if is_dtensor(val):
            val = val.full_tensor()
        return val.detach().to(device=p.device, dtype=sd, copy=True)
    from torch.distributed.tensor import DTensor, distribute_tensor

    if is_dtensor(val):
        if val.device_mesh != p.device_mesh or tuple(val.placements) != tuple(p.placements):
            val = val.redistribute(p.device_mesh, p.placements)
        loc = local(val)
        if loc.shape != local(p).shape:
            raise ValueError(f"state_dict: state {key!r} of parameter {k} has local shape "
                             f"{tuple(loc.shape)}, the parameter's shard has "
                             f"{tuple(local(p).shape)} (saved with another sharding)")
        loc = loc.detach().to(device=p.device, dtype=sd, copy=True)
        return DTensor.from_local(loc, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
    # a full (unsharded) tensor: every rank keeps its own shard of it
    full = val.detach().to(device=p.device, dtype=sd)
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)


def load_adamw_state_dict(opt, state_dict: Dict[str, Any]) -> None:
    """The fused-AdamW load (after the group-key check and ``restore()``): the
    state converted (``load_state_tensor``, ``step`` a 0-d float32 on the
    parameter's device) and every group validated before ``opt.state`` and
    ``opt.param_groups`` are replaced."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict: has {len(saved_groups)} parameter groups, "
                         f"the optimizer has {len(opt.param_groups)}")
    id_map = {}
    for gi, (sg, g) in enumerate(zip(saved_groups, opt.param_groups)):
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
        if not isinstance(st, dict) or set(st) != STATE_KEYS:
            got = sorted(st) if isinstance(st, dict) else type(st).__name__
            raise ValueError(
                f"state_dict: state of parameter {k} has keys {got}, expected "
                f"{sorted(STATE_KEYS)} (an AdamW-based SAM state; for another base "
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
                ns[key] = load_state_tensor(val, p, key, k)
            else:
                ns[key] = val
        new_state[p] = ns
    groups = []
    for sg, g in zip(saved_groups, opt.param_groups):
        ng = {k: v for k, v in sg.items() if k != "params"}
        ng["params"] = g["params"]
        for k, v in opt.defaults.items():
            ng.setdefault(k, v)
        if isinstance(ng.get("betas"), list):
            ng["betas"] = tuple(ng["betas"])
        groups.append(ng)
    for gi, ng in enumerate(groups):
        validate_group(ng, f"state_dict param_groups[{gi}].")
    opt.state = new_state
    opt.param_groups = groups


def load_base_state_dict(opt, base, state_dict: Dict[str, Any], check_precondition) -> None:
    """The ``base_optimizer`` load: the base loads it; the SAM keys are filled
    in from ``opt.defaults`` where missing and validated."""
    base.load_state_dict(state_dict)
    opt.param_groups = base.param_groups
    opt.state = base.state
    for gi, g in enumerate(opt.param_groups):
        g.setdefault("rho", opt.defaults["rho"])
        g.setdefault("precondition", opt.defaults["precondition"])
        validate_sam_keys(g, f"state_dict param_groups[{gi}].")
        check_precondition(g, f"state_dict param_groups[{gi}].")
