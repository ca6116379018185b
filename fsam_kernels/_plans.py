"""Cached per-group launch plans for the optimizers' per-step fast path.

A plan holds, for one parameter group and one phase of the step, the tuples
the backend is called with on each device (params, backups, exp_avg,
exp_avg_sq, step), which group positions' grads go into each call, and one
``cache`` dict per group and device (backends/base.py: the native backends keep
their validated tensor tables there). A steady-state step then reads each
parameter's ``.grad`` and checks the gradients, and builds no per-parameter
lists, dict lookups or tensor hashes: at 10,000 parameters that is most of
the optimizer's own time (docs/loops.md, "Per-step overhead").

A plan is reused while

- the group holds the same parameter objects, with the same data pointers,
  shapes and dtypes (``p.data = ...``, ``module.to()`` and ``.half()`` rebuild it,
  with new backups where the shape, dtype or strides changed);
- the same parameters have a gradient (``grad is None`` pattern);
- ``optimizer.state`` is the same dict with the same per-parameter dicts
  (checked once per phase by the optimizer: ``load_state_dict``, ``clear()``,
  ``del``, ``state[p] = {}`` drop every plan), and for every planned
  parameter the state entries are the same tensor objects (assignment of a
  new state tensor rebuilds it; in-place changes need nothing; a tensor
  re-pointed in place is caught by the native backends' pointer checks);
- for the second phase, the first phase used the same plan.

Tensors changed in shape or strides in place keeping their storage pointer
(``resize_``, ``t_``, ``as_strided_``) are not looked for by the optimizer;
the native backends then notice the lost contiguity, and a parameter whose
size changed no longer matches its state (an error, as before).
"""
from __future__ import annotations

from itertools import repeat
from operator import attrgetter, getitem, is_, is_not, itemgetter
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .distributed import is_dtensor

__all__ = ["FirstPlan", "SecondPlan", "check_grads", "check_group_grads", "grads_of",
           "grad_mask", "getter"]

_grad_of = attrgetter("grad")
_layout_of = attrgetter("layout")
_shape_of = attrgetter("shape")
_dtype_of = attrgetter("dtype")
_data_ptr = Tensor.data_ptr
_STRIDED = {torch.strided}
_PLAIN_GRAD = {Tensor}
_Param = torch.nn.Parameter
_PARAM_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def grads_of(params) -> list:
    """``[p.grad for p in params]`` (one C-level pass)."""
    return list(map(_grad_of, params))


def grad_mask(grads) -> bytes:
    """Which entries of ``grads`` are not None, as bytes (a dict key)."""
    return bytes(map(is_not, grads, repeat(None)))


def getter(idx: List[int], n: int):
    """A callable taking the group's grads list to the tuple of entries ``idx``."""
    if len(idx) == n and idx == list(range(n)):
        return tuple
    if not idx:
        return lambda seq: ()
    if len(idx) == 1:
        i = idx[0]
        return lambda seq: (seq[i],)
    return itemgetter(*idx)


class _Call:
    """One backend call of a plan: one device, fixed tensors, its own cache."""

    __slots__ = ("device", "idx", "get", "ps", "bs", "ms", "vs", "ts", "shapes", "cache")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.idx: List[int] = []
        self.ps: Any = []
        self.bs: Any = []
        self.ms: Any = []
        self.vs: Any = []
        self.ts: Any = []
        self.shapes: List[torch.Size] = []
        self.cache: dict = {}   # the backend's, for every call of this group and device

    def freeze(self, n: int) -> "_Call":
        self.get = getter(self.idx, n)
        self.ps, self.bs = tuple(self.ps), tuple(self.bs)
        self.ms, self.vs, self.ts = tuple(self.ms), tuple(self.vs), tuple(self.ts)
        return self


def _devices(params) -> Optional[List[torch.device]]:
    """The parameters' devices in first-seen order; None if one is a DTensor."""
    devs: List[torch.device] = []
    for p in params:
        tp = type(p)
        if tp is not _Param and tp is not Tensor and is_dtensor(p):
            return None
        if p.device not in devs:
            devs.append(p.device)
    return devs


def _state_entries_same(sds, key, tensors) -> bool:
    try:
        return all(map(is_, map(getitem, sds, repeat(key)), tensors))
    except (KeyError, TypeError):
        return False


def check_grads(opt, gi: int, idx, gs, shapes, params, which: str) -> bool:
    """The grads ``gs`` of group positions ``idx`` (expected shapes ``shapes``):
    sparse or mis-shaped ones raise ``RuntimeError`` naming the parameter
    (``opt._check_grad``); a DTensor returns False (the general path's job).
    True when all are plain dense grads of the right shape."""
    if (set(map(_layout_of, gs)) <= _STRIDED and list(map(_shape_of, gs)) == shapes
            and set(map(type, gs)) <= _PLAIN_GRAD):
        return True
    for i, g in zip(idx, gs):
        if type(g) is not Tensor and is_dtensor(g):
            return False
        opt._check_grad(params[i], gi, i, which)
    return True


def check_group_grads(opt, gi: int, params, grads, which: str) -> bool:
    """``check_grads`` over every grad of a group (before a plan is built)."""
    idx = [i for i, g in enumerate(grads) if g is not None]
    return check_grads(opt, gi, idx, [grads[i] for i in idx], [params[i].shape for i in idx],
                       params, which)


class FirstPlan:
    """first_step of one group: per device, the sq_norm + perturb call."""

    __slots__ = ("params", "ptrs", "shapes", "dtypes", "mask", "pre", "state", "sds", "vs", "ts",
                 "calls", "devs", "perturbed", "backups")

    @classmethod
    def build(cls, opt, group, grads, mask) -> Optional["FirstPlan"]:
        """None when a parameter is a DTensor (the general path runs)."""
        params = group["params"]
        pre = bool(group["precondition"])
        calls: Dict[torch.device, _Call] = {}
        devs = _devices(params)
        if devs is None:
            return None
        sds = []
        for i, p in enumerate(params):
            if grads[i] is None:
                continue
            if p.layout is not torch.strided or p.dtype not in _PARAM_DTYPES:
                gi = next(j for j, g in enumerate(opt.param_groups) if g is group)
                opt._check_param(p, gi, i)       # raises, naming the parameter
            d = p.device
            c = calls.get(d)
            if c is None:
                c = calls[d] = _Call(d)
            c.idx.append(i)
            c.ps.append(p)
            c.bs.append(opt._backup_for(p))
            c.shapes.append(p.shape)
            if pre:
                s = opt._init_state(p)
                sds.append(s)
                c.vs.append(s["exp_avg_sq"])
                c.ts.append(s["step"])
        self = cls()
        self.params = tuple(params)
        self.ptrs = tuple(map(_data_ptr, params))
        self.shapes = list(map(_shape_of, params))
        self.dtypes = list(map(_dtype_of, params))
        self.mask = mask
        self.pre = pre
        self.state = opt.state
        self.calls = [c.freeze(len(params)) for c in calls.values()]
        self.sds = tuple(sds)
        self.vs = tuple(s["exp_avg_sq"] for s in sds)
        self.ts = tuple(s["step"] for s in sds)
        self.devs = devs
        # the order the general path records: device by device (first-seen order)
        self.perturbed = [p for c in self.calls for p in c.ps]
        self.backups = [b for c in self.calls for b in c.bs]
        return self

    def valid(self, opt, group, mask) -> bool:
        params = group["params"]
        if (mask != self.mask or bool(group["precondition"]) != self.pre
                or opt.state is not self.state or len(params) != len(self.params)
                or not all(map(is_, params, self.params))
                or tuple(map(_data_ptr, params)) != self.ptrs
                or list(map(_shape_of, params)) != self.shapes
                or list(map(_dtype_of, params)) != self.dtypes):
            return False
        return not self.pre or (_state_entries_same(self.sds, "exp_avg_sq", self.vs)
                                and _state_entries_same(self.sds, "step", self.ts))


class SecondPlan:
    """second_step of one group: per device the restore of perturbed parameters
    without a pass-2 grad, restore+AdamW of perturbed ones with a grad, AdamW of
    unperturbed ones with a grad (``fresh``), and the grads in parameter order
    (``clip``: the update gradient's norm, the inf/NaN check)."""

    __slots__ = ("params", "shapes", "mask", "perturbed", "backups", "state", "sds", "ms", "vs",
                 "ts", "without", "restored", "fresh", "clip", "devs", "matched")

    @classmethod
    def build(cls, opt, group, grads, mask, perturbed, backups) -> Optional["SecondPlan"]:
        params = group["params"]
        if backups is not None:
            bmap = dict(zip(map(id, perturbed), backups))
        else:
            bmap = {id(p): opt._backups[p] for p in (perturbed or ())}
        without: Dict[torch.device, _Call] = {}
        restored: Dict[torch.device, _Call] = {}
        fresh: Dict[torch.device, _Call] = {}
        clip: Dict[torch.device, _Call] = {}
        devs = _devices(params)
        if devs is None:
            return None
        sd_of = {}
        matched = 0
        for i, p in enumerate(params):
            d = p.device
            k = id(p)
            matched += k in bmap
            if grads[i] is None:
                if k in bmap:
                    c = without.get(d) or without.setdefault(d, _Call(d))
                    c.ps.append(p)
                    c.bs.append(bmap[k])
                continue
            c = clip.get(d) or clip.setdefault(d, _Call(d))
            c.idx.append(i)
            c.shapes.append(p.shape)
            s = sd_of[i] = opt._init_state(p)
            target = restored if k in bmap else fresh
            c = target.get(d) or target.setdefault(d, _Call(d))
            c.idx.append(i)
            c.ps.append(p)
            if k in bmap:
                c.bs.append(bmap[k])
            c.ms.append(s["exp_avg"])
            c.vs.append(s["exp_avg_sq"])
            c.ts.append(s["step"])
        n = len(params)
        self = cls()
        self.params = tuple(params)
        self.shapes = list(map(_shape_of, params))
        self.mask = mask
        self.perturbed = perturbed
        self.backups = backups
        self.state = opt.state
        self.without = [c.freeze(n) for c in without.values()]
        self.restored = [c.freeze(n) for c in restored.values()]
        self.fresh = [c.freeze(n) for c in fresh.values()]
        self.clip = [c.freeze(n) for c in clip.values()]
        # state dicts and their tensors in one order (clip order) for valid()
        order = [i for c in self.clip for i in c.idx]
        self.sds = tuple(sd_of[i] for i in order)
        self.ms = tuple(sd_of[i]["exp_avg"] for i in order)
        self.vs = tuple(sd_of[i]["exp_avg_sq"] for i in order)
        self.ts = tuple(sd_of[i]["step"] for i in order)
        self.devs = devs
        #: how many of ``perturbed`` are in this group (all of them unless the
        #: groups were reordered or changed between the two phases)
        self.matched = matched
        return self

    def valid(self, opt, group, mask, perturbed, backups) -> bool:
        params = group["params"]
        return (mask == self.mask and perturbed is self.perturbed and backups is self.backups
                and opt.state is self.state and len(params) == len(self.params)
                and all(map(is_, params, self.params))
                and list(map(_shape_of, params)) == self.shapes
                and _state_entries_same(self.sds, "exp_avg", self.ms)
                and _state_entries_same(self.sds, "exp_avg_sq", self.vs)
                and _state_entries_same(self.sds, "step", self.ts))
