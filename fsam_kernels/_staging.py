"""The optimizer's side of the plans: what it hands them, and the lookup.

For each group and phase :func:`first_plans` / :func:`second_plans` take the
cached plan when it is still valid (eager mode, fsam_kernels/_plans.py) or
build one: the optimizer checks the parameters and grads
(fsam_kernels/_validation.py), makes the backups and the state the kernels
use (its own, or through its update rule ``opt._mode``) and hands the plan
builder plain tensors (``_plans.Entry``). Plans are data; they never call back.
Every grad is checked before anything is changed.
"""
from __future__ import annotations

from typing import Tuple

from .distributed import local, shard_key
from ._plans import Entry, FirstPlan, SecondPlan, compile_safe_out, grad_mask, grads_of
from ._validation import check_grads, check_group_grads, check_param, is_plain

__all__ = ["first_plans", "second_plans"]


def first_plans(opt) -> list:
    """``[(group, plan, grads as the kernels take them, per-call grads)]``
    for first_step, every parameter and grad checked before anything moves."""
    cache = opt._plans
    caching = cache.usable(opt.state, len(opt.param_groups))
    staged, built = [], False
    for gi, group in enumerate(opt.param_groups):
        params, pre = group["params"], group["precondition"]
        grads = grads_of(params)
        mask = grad_mask(grads) if caching else None
        plan = cache.get(("first", gi)) if caching else None
        if plan is None or not plan.valid(params, mask, pre):
            entries = []
            for i, p in enumerate(params):
                if grads[i] is not None:
                    check_param(p, gi, i)
                    entries.append(Entry(
                        i, p, compile_safe_out(local(p)), shard_key(p), True,
                        compile_safe_out(opt._backup_for(p)),
                        opt._mode.precond_state(opt, p) if pre else None))
            plan = FirstPlan.build(params, mask, pre, entries, cached=caching and all(
                map(is_plain, params)) and (not pre or opt._mode.precond_cacheable))
            if plan.cached:
                cache[("first", gi)] = plan
            built = True
        staged.append((gi, group, plan, grads))
    if built and caching:             # a new plan may have created state
        cache.remember(opt.state)
    if built or len(opt.param_groups) != opt._step_vars.get("n_groups"):
        opt._prune_backups()
    out = []
    for gi, group, plan, grads in staged:     # every grad checked before any change
        gss = [c.get(grads) for c in plan.calls]
        for c, gs in zip(plan.calls, gss):
            check_grads(gi, c.idx, gs, c.shapes, group["params"], "pass-1")
        if plan.sharded:                       # the kernels take the local shards
            grads = plan.grads(grads)
            gss = [c.get(grads) for c in plan.calls]
        out.append((group, plan, grads, gss))
    return out


def _second_plan(opt, gi, group, grads, mask, bmap, pg, bg, cacheable) -> SecondPlan:
    """The second phase's plan of group ``gi``: ``bmap`` maps ``id(param)`` to
    the backup of each perturbed parameter; ``pg``/``bg``: the first phase's
    lists of this group (what a cached plan is valid for)."""
    params = group["params"]
    entries = []
    for i, p in enumerate(params):
        b = bmap.get(id(p))
        if grads[i] is not None or b is not None:
            entries.append(Entry(
                i, p, compile_safe_out(local(p)), shard_key(p), grads[i] is not None, b,
                opt._mode.update_state(opt, p) if grads[i] is not None else None))
    return SecondPlan.build(params, mask, entries, pg, bg, cached=cacheable and all(
        map(is_plain, params)))


def second_plans(opt, perturbed) -> Tuple[list, list]:
    """``([(group, plan, grads)], perturbed parameters in no group now)`` for
    second_step, every grad checked before anything changes. Groups
    reordered, replaced, added or removed since first_step: every perturbed
    parameter found by identity wherever it is now (plans used once)."""
    cache = opt._plans
    caching = cache.usable(opt.state, len(opt.param_groups))
    pb = opt._step_vars.get("perturbed_backups")
    pbk = pb[1] if pb is not None and pb[0] is perturbed else None
    staged = []
    for gi, group in enumerate(opt.param_groups):
        grads = grads_of(group["params"])
        mask = grad_mask(grads) if caching else None
        pg = perturbed[gi] if gi < len(perturbed) else []
        bg = pbk[gi] if pbk is not None and gi < len(pbk) else None
        plan = cache.get(("second", gi)) if caching else None
        if plan is not None and not plan.valid(group["params"], mask, pg, bg):
            plan = None
        staged.append([gi, group, plan, grads, mask, pg, bg])
    for gi, group, plan, grads, *_ in staged:    # before a new plan creates state
        if plan is None:
            check_group_grads(gi, group["params"], grads, "pass-2")
        else:
            for c in plan.clip:
                check_grads(gi, c.idx, c.get(grads), c.shapes, group["params"], "pass-2")

    def backups_of(pg, bg):
        return (dict(zip(map(id, pg), bg)) if bg is not None
                else {id(p): opt._backups[p] for p in pg})

    built, aligned = False, not any(perturbed[len(staged):])
    for st in staged:
        if st[2] is None:
            gi, group, _, grads, mask, pg, bg = st
            st[2] = _second_plan(opt, gi, group, grads, mask, backups_of(pg, bg), pg, bg,
                                      caching)
            built = True
        aligned = aligned and st[2].matched == len(st[5])
    leftover = []
    if not aligned:        # groups changed since first_step: one map of all backups
        bmap = {}
        for gi, plist in enumerate(perturbed):
            bmap.update(backups_of(plist, pbk[gi] if pbk is not None else None))
        for st in staged:
            gi, group, _, grads, mask, pg, bg = st
            st[2] = _second_plan(opt, gi, group, grads, mask, bmap, pg, bg, False)
        seen = {id(p) for g in opt.param_groups for p in g["params"]}
        leftover = [p for plist in perturbed for p in plist if id(p) not in seen]
    for gi, _, plan, *_ in staged:
        if plan.cached:
            cache[("second", gi)] = plan
    if built and caching:
        cache.remember(opt.state)
    return [(st[1], st[2], st[2].grads(st[3])) for st in staged], leftover
