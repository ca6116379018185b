"""Per-group launch plans: the one way the optimizers call their backends.

A plan holds, for one parameter group and one phase of the step, the tuples
the backend is called with for each (device, shard key) (local parameters,
backups, exp_avg, exp_avg_sq, step), which group positions' grads go into each
call, and, when cached, one ``cache`` dict per call (backends/base.py: the
native backends keep their validated tensor tables there). Every step builds
or reuses one plan per group and phase and then executes it
(``_SAMBase._first_step_impl`` / ``_second_step_impl``); DTensor shards,
``base_optimizer`` mode and torch.compile'd phases included.

Data flows one way: the optimizer owns its state and backups, checks the
parameters and gradients (fsam_kernels/_validation.py) and hands a plan
builder plain tensors (:class:`Entry`); a plan never calls the optimizer.

Caching is the only difference between eager and the rest: in eager mode
(no torch.compile, no dispatch mode) plans of plain tensors are kept in a
:class:`PlanCache` and a steady-state step then reads each parameter's
``.grad`` and checks the gradients, and builds no per-parameter lists, dict
lookups or tensor hashes: at 10,000 parameters that is most of the
optimizer's own time (docs/loops.md, "Per-step overhead"). Plans holding
DTensors, state made up for one step (``base_optimizer`` mode's
preconditioner) or built under torch.compile are used once.

A cached plan is reused while

- the group holds the same parameter objects, with the same data pointers,
  shapes and dtypes (``p.data = ...``, ``module.to()`` and ``.half()`` rebuild it,
  with new backups where the shape, dtype or strides changed);
- the same parameters have a gradient (``grad is None`` pattern);
- ``optimizer.state`` is the same dict with the same per-parameter dicts
  (:meth:`PlanCache.usable`, once per phase: ``load_state_dict``, ``clear()``,
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
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .distributed import local

__all__ = ["Entry", "FirstPlan", "SecondPlan", "PlanCache", "grads_of", "grad_mask",
           "getter", "caching_allowed", "compile_safe", "compile_safe_all", "compile_safe_out"]

_grad_of = attrgetter("grad")
_shape_of = attrgetter("shape")
_dtype_of = attrgetter("dtype")
_data_ptr = Tensor.data_ptr
_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)


def compile_safe(t: Tensor) -> Tensor:
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


def compile_safe_all(ts):
    """``compile_safe`` of every tensor of a sequence under torch.compile (eager: ``ts``)."""
    if ts is None or not torch.compiler.is_compiling():
        return ts
    return [compile_safe(t) for t in ts]


def compile_safe_out(t: Tensor) -> Tensor:
    """``compile_safe`` of one tensor under torch.compile (eager: ``t``)."""
    return compile_safe(t) if torch.compiler.is_compiling() else t


def caching_allowed() -> bool:
    """Plans may be cached and reused: eager mode, no dispatch mode active."""
    return not torch.compiler.is_compiling() and not _dispatch_depth()


def grads_of(params) -> list:
    """``[p.grad for p in params]`` (one C-level pass in eager mode)."""
    if torch.compiler.is_compiling():
        return [p.grad for p in params]
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


class Entry(NamedTuple):
    """What the optimizer hands a plan builder for one parameter of a group.

    ``i``: position in the group; ``param``: the group's tensor (a DTensor
    stays one: it is what ``perturbed`` lists); ``local``: the tensor the
    kernels write (its local shard); ``key``: ``distributed.shard_key`` (None
    for a whole tensor); ``grad``: whether it has a gradient this phase;
    ``backup``: its backup (first phase, and perturbed parameters of the
    second), else None; ``state``: for parameters whose state the kernels
    use, ``(state dict or None, exp_avg or None, exp_avg_sq, step)`` as local
    tensors (the dict: what a cached plan compares its tensors against).
    """
    i: int
    param: Tensor
    local: Tensor
    key: Any
    grad: bool
    backup: Optional[Tensor]
    state: Optional[Tuple[Optional[dict], Optional[Tensor], Tensor, Tensor]]


class _Call:
    """One backend call of a plan: one device and shard key, fixed tensors."""

    __slots__ = ("device", "key", "idx", "get", "owners", "ps", "bs", "ms", "vs", "ts",
                 "shapes", "cache")

    def __init__(self, device: torch.device, key, cached: bool) -> None:
        self.device = device
        self.key = key
        self.idx: List[int] = []
        self.owners: Any = []     # the group's tensors (DTensors stay DTensors)
        self.ps: Any = []
        self.bs: Any = []
        self.ms: Any = []
        self.vs: Any = []
        self.ts: Any = []
        self.shapes: List[torch.Size] = []
        # the backend's, for every call of this group and device (cached plans only)
        self.cache: Optional[dict] = {} if cached else None

    def add(self, e: Entry, grad_shape, backup: bool, state: str) -> None:
        self.idx.append(e.i)
        self.owners.append(e.param)
        self.ps.append(e.local)
        self.shapes.append(grad_shape)
        if backup:
            self.bs.append(e.backup)
        if state == "precond":
            self.vs.append(e.state[2])
            self.ts.append(e.state[3])
        elif state == "adamw":
            self.ms.append(e.state[1])
            self.vs.append(e.state[2])
            self.ts.append(e.state[3])

    def freeze(self, n: int) -> "_Call":
        if self.cache is not None:
            self.get = getter(self.idx, n)
        else:                       # no operator.itemgetter: torch.compile traces this
            self.get = lambda seq, idx=tuple(self.idx): tuple([seq[i] for i in idx])
        self.ps, self.bs = tuple(self.ps), tuple(self.bs)
        self.ms, self.vs, self.ts = tuple(self.ms), tuple(self.vs), tuple(self.ts)
        return self


def _call(calls: Dict[Any, _Call], e: Entry, cached: bool) -> _Call:
    k = (e.local.device, e.key)
    c = calls.get(k)
    if c is None:
        c = calls[k] = _Call(e.local.device, e.key, cached)
    return c


def _state_entries_same(sds, key, tensors) -> bool:
    try:
        return all(map(is_, map(getitem, sds, repeat(key)), tensors))
    except (KeyError, TypeError):
        return False


class _Plan:
    """What both phases' plans share: the group's tensors and their validity."""

    __slots__ = ("params", "ptrs", "shapes", "dtypes", "mask", "cached", "sharded", "devs",
                 "sds", "ms", "vs", "ts")

    def _init(self, params, mask, cached: bool, entries, sds) -> None:
        self.params = tuple(params)
        self.mask = mask
        self.cached = cached
        self.sharded = any(e.local is not e.param for e in entries)
        devs: List[torch.device] = []
        for p in params:
            if p.device not in devs:
                devs.append(p.device)
        self.devs = devs
        if cached:                  # (what valid() compares)
            self.shapes = list(map(_shape_of, params))
            try:
                self.ptrs = tuple(map(_data_ptr, params))
            except RuntimeError:    # tensors without storage (meta, fake): used once
                self.cached = False
            self.dtypes = list(map(_dtype_of, params))
        # state dicts and their tensors in one order, for valid()
        self.sds = tuple(s[0] for s in sds)
        self.ms = tuple(s[1] for s in sds)
        self.vs = tuple(s[2] for s in sds)
        self.ts = tuple(s[3] for s in sds)

    def _same(self, params, mask, storage: bool) -> bool:
        """Same parameter objects and grad pattern, shapes (and with ``storage``
        the same data pointers and dtypes)."""
        try:
            return self._same_as(params, mask, storage)
        except RuntimeError:        # a parameter without storage now: rebuild
            return False

    def _same_as(self, params, mask, storage: bool) -> bool:
        return (self.cached and mask == self.mask and len(params) == len(self.params)
                and all(map(is_, params, self.params))
                and (not storage or (tuple(map(_data_ptr, params)) == self.ptrs
                                     and list(map(_dtype_of, params)) == self.dtypes))
                and list(map(_shape_of, params)) == self.shapes)

    def _state_same(self, moments: bool) -> bool:
        return ((not moments or _state_entries_same(self.sds, "exp_avg", self.ms))
                and _state_entries_same(self.sds, "exp_avg_sq", self.vs)
                and _state_entries_same(self.sds, "step", self.ts))

    def kernel_grads(self, gs):
        """One call's grads ``gs`` for the kernels (compile-safe when not cached)."""
        return gs if self.cached else compile_safe_all(gs)

    def grads(self, grads: list) -> list:
        """The group's grads as the kernels take them (local shards of DTensors)."""
        return [local(g) for g in grads] if self.sharded else grads


class FirstPlan(_Plan):
    """first_step of one group: per (device, shard key) the sq_norm + perturb call."""

    __slots__ = ("pre", "calls", "perturbed", "backups")

    @classmethod
    def build(cls, params, mask, pre: bool, entries: List[Entry], *, cached: bool) -> "FirstPlan":
        """``entries``: the parameters with a pass-1 grad, in group order, each
        with its backup and (``pre``) its preconditioner state."""
        calls: Dict[Any, _Call] = {}
        for e in entries:
            _call(calls, e, cached).add(e, e.param.shape, True, "precond" if pre else "")
        self = cls()
        self._init(params, mask, cached, entries, [e.state for e in entries] if pre else [])
        self.pre = pre
        self.calls = [c.freeze(len(params)) for c in calls.values()]
        self.perturbed = [p for c in self.calls for p in c.owners]
        self.backups = [b for c in self.calls for b in c.bs]
        return self

    def valid(self, params, mask, pre: bool) -> bool:
        """Whether this cached plan still describes the group (``pre``: its precondition)."""
        return (pre == self.pre and self._same(params, mask, True)
                and (not pre or self._state_same(False)))


class SecondPlan(_Plan):
    """second_step of one group: per (device, shard key) the restore of perturbed
    parameters without a pass-2 grad (``without``), restore+update of perturbed
    ones with a grad (``restored``), update of unperturbed ones with a grad
    (``fresh``), and the grads in parameter order (``clip``: the update
    gradient's norm, the inf/NaN check)."""

    __slots__ = ("perturbed", "backups", "without", "restored", "fresh", "clip", "matched")

    @classmethod
    def build(cls, params, mask, entries: List[Entry], perturbed, backups, *,
              cached: bool) -> "SecondPlan":
        """``entries``: every parameter of the group, in group order; those with
        a backup are perturbed; those with a grad carry their AdamW state (or
        None in ``base_optimizer`` mode). ``perturbed``/``backups``: the first
        phase's lists this plan was built for (its validity)."""
        groups = ({}, {}, {}, {})       # without, restored, fresh, clip
        without, restored, fresh, clip = groups
        matched = 0
        for e in entries:
            has_b = e.backup is not None
            matched += has_b
            if not e.grad:
                if has_b:
                    _call(without, e, cached).add(e, e.param.shape, True, "")
                continue
            _call(clip, e, cached).add(e, e.param.shape, False, "")
            mode = "adamw" if e.state is not None else ""
            _call(restored if has_b else fresh, e, cached).add(e, e.param.shape, has_b, mode)
        n = len(params)
        self = cls()
        # state dicts and their tensors in one order (clip order) for valid()
        state_of = {e.i: e.state for e in entries if e.grad and e.state is not None}
        self._init(params, mask, cached, entries,
                   [state_of[i] for c in clip.values() for i in c.idx if i in state_of])
        self.perturbed = perturbed
        self.backups = backups
        self.without, self.restored, self.fresh, self.clip = (
            [c.freeze(n) for c in g.values()] for g in groups)
        #: how many of the group's parameters were perturbed (all of the first
        #: phase's list unless the groups were reordered or changed since)
        self.matched = matched
        return self

    def valid(self, params, mask, perturbed, backups) -> bool:
        """Whether this cached plan still describes the group after the first
        phase that perturbed ``perturbed`` (backups ``backups``)."""
        return (perturbed is self.perturbed and backups is self.backups
                and self._same(params, mask, False) and self._state_same(True))


class PlanCache(dict):
    """The cached plans of one optimizer: ``{(phase, group index): plan}``,
    with the ``optimizer.state`` they were made for."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshot: Optional[Tuple[Any, tuple]] = None

    def usable(self, state, n_groups: int) -> bool:
        """Whether plans may be cached this phase (:func:`caching_allowed`);
        drops them all when ``state`` changed since they were made (replaced,
        cleared, an entry added, removed or replaced: the plans hold the old
        per-parameter dicts) and those of removed groups."""
        if not caching_allowed():
            return False
        if self:
            snap = self.snapshot
            if (snap is None or snap[0] is not state or len(state) != len(snap[1])
                    or not all(map(is_, state.values(), snap[1]))):
                self.clear()
            else:
                for key in [k for k in self if k[1] >= n_groups]:
                    del self[key]
        return True

    def remember(self, state) -> None:
        """Remember ``state`` as the plans now in the cache saw it."""
        self.snapshot = (state, tuple(state.values()))

    def __reduce__(self):                 # copies and pickles start empty
        return (PlanCache, ())
