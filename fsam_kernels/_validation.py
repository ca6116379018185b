"""Argument, parameter and gradient checks of SAM / FunctionalSAM.

Every check raises ``TypeError`` / ``ValueError`` / ``RuntimeError`` naming the
argument (``lr``, ``param_groups[1].betas[0]``, ``param_groups[0] param 3``);
none changes anything. The optimizer calls them; the plans never do
(fsam_kernels/_plans.py receives only tensors that passed them).
"""
from __future__ import annotations

import math
import numbers
from operator import attrgetter
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor

from .distributed import is_dtensor

__all__ = ["check_float", "validate_sam_keys", "validate_group", "check_param", "check_grad",
           "check_grads", "check_group_grads", "check_new_group", "check_options", "sam_defaults",
           "PARAM_DTYPES"]

#: dtypes a parameter may have (the ascent writes it)
PARAM_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_STRIDED = {torch.strided}
_PLAIN = {Tensor}
_layout_of = attrgetter("layout")
_shape_of = attrgetter("shape")


def check_float(name: str, value, *, low: float = 0.0, high: Optional[float] = None,
                high_open: bool = True) -> None:
    """``value`` is a finite Python real in ``[low, high)`` (``[low, high]`` with
    ``high_open=False``; ``>= low`` without ``high``). ``TypeError`` for a tensor,
    a bool or a non-number; ``ValueError`` out of range; both name ``name``."""
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


def validate_sam_keys(group: Dict[str, Any], where: str) -> None:
    """The SAM keys of a group (``rho``, ``precondition``); ``where`` prefixes the names."""
    check_float(f"{where}rho", group["rho"])
    if not isinstance(group["precondition"], bool):
        raise TypeError(f"{where}precondition: expected a bool, got {group['precondition']!r}")


def validate_group(group: Dict[str, Any], where: str) -> None:
    """Every hyperparameter of a fused-AdamW group (lr, betas, eps, weight_decay,
    rho, precondition, maximize)."""
    check_float(f"{where}lr", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}betas: expected a pair (beta1, beta2), got {betas!r}")
    check_float(f"{where}betas[0]", betas[0], low=0.0, high=1.0)
    check_float(f"{where}betas[1]", betas[1], low=0.0, high=1.0)
    check_float(f"{where}eps", group["eps"])
    check_float(f"{where}weight_decay", group["weight_decay"])
    check_float(f"{where}rho", group["rho"])
    for flag in ("precondition", "maximize"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{where}{flag}: expected a bool, got {group[flag]!r}")


def check_options(*, same_dropout_masks, bn_clean_pass_only, max_grad_norm, ascent_sync,
                  model) -> Optional[float]:
    """The optimizer-wide constructor arguments; returns ``max_grad_norm`` as a float (or None)."""
    for name, v in (("same_dropout_masks", same_dropout_masks),
                    ("bn_clean_pass_only", bn_clean_pass_only)):
        if not isinstance(v, bool):
            raise TypeError(f"{name}: expected a bool, got {v!r}")
    if max_grad_norm is not None:
        check_float("max_grad_norm", max_grad_norm)
        max_grad_norm = float(max_grad_norm)
    if ascent_sync not in ("global", "local"):
        raise ValueError(f"ascent_sync: expected 'global' or 'local', got {ascent_sync!r}")
    if ascent_sync == "local" and not hasattr(model, "no_sync"):
        raise ValueError("ascent_sync='local' needs model= the DistributedDataParallel "
                         "module (pass 1 runs under model.no_sync())")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return max_grad_norm


def sam_defaults(name: str, base_optimizer, given: Dict[str, Any], base_kwargs: Dict[str, Any],
                 *, rho, precondition, adamw: Dict[str, Any], sam_base: type):
    """``(defaults, given)`` of a SAM optimizer (class ``name``): AdamW's
    defaults overridden by the ``given`` hyperparameters, or with a
    ``base_optimizer`` only the SAM keys (``given`` then goes to the base).
    ``TypeError`` for keywords without a base optimizer and for a base that
    is not a torch optimizer class (or is SAM itself)."""
    if isinstance(given.get("betas"), list):
        given["betas"] = tuple(given["betas"])
    if base_optimizer is None:
        if base_kwargs:
            raise TypeError(f"{name}: unexpected keyword argument(s) "
                            f"{sorted(base_kwargs)} (extra keywords go to base_optimizer, "
                            "and none was given)")
        return dict(adamw, **given, rho=rho, precondition=precondition), given
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError("base_optimizer: expected a torch.optim.Optimizer subclass "
                        f"(e.g. torch.optim.SGD), got {base_optimizer!r}")
    if issubclass(base_optimizer, sam_base):
        raise TypeError("base_optimizer: cannot be SAM/FunctionalSAM itself")
    return dict(rho=rho, precondition=precondition), given


def check_new_group(param_group: Dict[str, Any], idx: int, existing: Iterable) -> Dict[str, Any]:
    """A copy of the group being added as group ``idx`` with ``params`` as a
    list (a lone tensor becomes a list of one; a set is refused: no order),
    its parameters checked: tensors, each given once (``existing``: ids of
    the other groups' parameters), not on 'meta', dense, real floating point."""
    if isinstance(param_group.get("params"), Tensor):
        param_group = dict(param_group, params=[param_group["params"]])
    elif isinstance(param_group.get("params"), set):
        raise TypeError("params: parameters must be an ordered collection, not a set")
    else:
        param_group = dict(param_group, params=list(param_group["params"]))
    params = param_group["params"]
    seen = set()
    existing = set(existing)
    for i, p in enumerate(params):
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
    return param_group


def check_param(p: Tensor, gi: int, i: int) -> None:
    """A parameter the ascent will write: dense (strided) floating point,
    as ``add_param_group`` checks (a tensor put into ``param_groups``
    directly, or changed since, is checked again before anything moves)."""
    if p.layout != torch.strided:
        raise TypeError(f"param_groups[{gi}] param {i}: has layout {p.layout}; only dense "
                        "(strided) parameters are supported")
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"param_groups[{gi}] param {i}: has dtype {p.dtype}, expected "
                        "float16, bfloat16, float32 or float64")


def check_grad(p: Tensor, gi: int, i: int, which: str) -> None:
    """``p.grad`` (not None) is dense and has ``p``'s shape; ``RuntimeError``
    naming the parameter and the pass (``which``: "pass-1" / "pass-2")."""
    g = p.grad
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(
            f"param_groups[{gi}] param {i}: {which} gradient is sparse ({g.layout}); "
            "SAM/FunctionalSAM support dense gradients only")
    if g.shape != p.shape:
        raise RuntimeError(f"param_groups[{gi}] param {i}: {which} gradient has shape "
                           f"{tuple(g.shape)}, parameter has {tuple(p.shape)}")


def check_grads(gi: int, idx: Sequence[int], gs: Sequence[Tensor], shapes: List[torch.Size],
                params: Sequence[Tensor], which: str) -> None:
    """The grads ``gs`` of group ``gi``'s positions ``idx`` (expected shapes
    ``shapes``): one C-level pass when all are plain dense tensors of the right
    shape; otherwise each is checked with :func:`check_grad` (DTensor grads
    included: global shapes), raising for the first bad one."""
    if (not torch.compiler.is_compiling()      # (attrgetter: not traced by dynamo)
            and set(map(_layout_of, gs)) <= _STRIDED and list(map(_shape_of, gs)) == shapes
            and set(map(type, gs)) <= _PLAIN):
        return
    for i in idx:
        check_grad(params[i], gi, i, which)


def check_group_grads(gi: int, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                      which: str) -> None:
    """:func:`check_grads` over every grad of a group that is not None."""
    for i, g in enumerate(grads):
        if g is not None:
            check_grad(params[i], gi, i, which)


def is_plain(p: Tensor) -> bool:
    """Not a DTensor (cheap for plain tensors and Parameters)."""
    tp = type(p)
    return tp is torch.nn.Parameter or tp is Tensor or not is_dtensor(p)
