"""The plan cache of the optimizers (fsam_kernels/_plans.py).

Every step builds one plan per group and phase and executes it; in eager mode
plans of plain tensors are cached and reused. Caching must change nothing:
the same values bitwise with the cache on and off, on every (backend,
device) this machine runs (tests/helpers.py ``backend_device_pairs``: the
reference, foreach, cpu and triton (TRITON_INTERPRET=1) backends on CPU, cuda
emulated where that process runs, the GPU backends on a CUDA device), and a
steady-state step reuses its plans (the point of caching).
"""
from __future__ import annotations

import copy

import pytest
import torch

import fsam_kernels._plans as plans_mod
from fsam_kernels import SAM
from helpers import backend_device_params

VARIANTS = ["plain", "scale", "clip", "found_inf", "changes", "regroup", "base_optimizer"]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _run(backend, device, variant, cached, monkeypatch):
    """Seven SAM steps on three groups (preconditioned, own rho, plain), with
    parameters lacking a pass-1 or pass-2 grad; the parameters after each
    phase, the skip flags and the final state."""
    with monkeypatch.context() as m:
        if not cached:
            m.setattr(plans_mod, "caching_allowed", lambda: False)
        torch.manual_seed(0)
        shapes = [(5, 3), (7,), (2, 2, 2), (4,), (3, 3), (6,), (1,)]
        params = [torch.randn(s).to(device) for s in shapes]
        kw = dict(max_grad_norm=0.5 if variant == "clip" else None)
        if variant == "base_optimizer":     # the base's own step after the fused ascent
            kw.update(base_optimizer=torch.optim.Adam, foreach=False)
        opt = SAM([{"params": params[:3], "precondition": True},
                   {"params": params[3:5], "rho": 0.1},
                   {"params": params[5:]}],
                  lr=1e-2, rho=0.05, backend=backend, **kw)
        out = []
        junk = []
        for step in range(7):
            if variant == "changes" and step == 2:
                params[0].data = params[0].data.clone()      # new storage
                params[3].data = params[3].data.to(torch.bfloat16)   # new dtype: new backup
            if variant == "changes" and step == 3:
                for i in (1, 3):
                    st = opt.state[params[i]]
                    st["exp_avg"] = st["exp_avg"] * 0.5
                    st["exp_avg_sq"] = st["exp_avg_sq"] * 2.0
            if variant == "changes" and step == 5:   # the "move the optimizer" snippet
                for st in opt.state.values():
                    for v in st.values():
                        v.data = v.data.clone()          # same objects, new storage
                junk = [torch.full((3, 3), 7.0, device=device) for _ in range(20)]
            if variant == "changes" and step == 4:
                sd = copy.deepcopy(opt.state_dict())
                for st in sd["state"].values():
                    st["exp_avg"].mul_(0.25)
                opt.load_state_dict(sd)
            no1 = {1, 5} if step % 2 else {6}          # no pass-1 grad
            no2 = {2, 6} if step % 2 else {0, 4}       # no pass-2 grad
            if variant == "changes":                   # one pattern: the plans are reused
                no1, no2 = {6}, {2}
            scale = torch.tensor(8.0, device=device) if variant == "scale" else None
            fi = (torch.tensor(float(step == 2), device=device) if variant == "found_inf"
                  else None)
            _set_grads(params, [None if i in no1 else torch.randn_like(p)
                                for i, p in enumerate(params)])
            opt.first_step(grad_scale=scale, found_inf=fi)
            out.append([p.clone() for p in params])
            if variant == "regroup" and step in (2, 3, 5):
                g = opt.param_groups
                if step == 2:                          # reordered between the phases
                    g[0], g[2] = g[2], g[0]
                elif step == 3:                        # a parameter moved to another group
                    g[1]["params"].append(g[0]["params"].pop())
                else:                                  # a group removed
                    del g[1]
            _set_grads(params, [None if i in no2 else torch.randn_like(p)
                                for i, p in enumerate(params)])
            opt.second_step(grad_scale=scale)
            out.append([p.clone() for p in params])
            out.append([opt.last_step_skipped.clone()])
            if cached and variant not in ("regroup",):
                # every phase of every group ran from a cached plan (base mode:
                # the preconditioned group's first phase is rebuilt each step)
                n = len(opt.param_groups)
                want = {("second", gi) for gi in range(n)} | {
                    ("first", gi) for gi in range(n)
                    if variant != "base_optimizer" or not opt.param_groups[gi]["precondition"]}
                assert set(opt._plans) == want, (step, sorted(opt._plans))
            elif not cached:
                assert len(opt._plans) == 0
        for p in params:
            st = opt.state.get(p, {})
            out.append([st[k].clone() if torch.is_tensor(st[k]) else torch.tensor(st[k])
                        for k in sorted(st)])
        assert all(bool((j == 7.0).all()) for j in junk)   # nothing wrote to freed memory
        return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend,device", backend_device_params())
def test_cached_equals_uncached(backend, device, variant, monkeypatch):
    """first_step/second_step give bitwise the same parameters, skip flags and
    state with the plan cache on and off (groups, preconditioning, parameters
    without a pass-1 or pass-2 grad, loss scale, clipping, skips, a base
    optimizer). "changes": between steps a parameter is re-pointed (``.data
    =``: new storage, new dtype), state tensors are replaced by assignment and
    by ``load_state_dict``, and re-pointed in place (same objects, new
    storage); the plans and the native tables notice each. "regroup": groups
    reordered, a parameter moved and a group removed between the phases."""
    a = _run(backend, device, variant, True, monkeypatch)
    b = _run(backend, device, variant, False, monkeypatch)
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b)):
        assert len(x) == len(y), k
        for t, u in zip(x, y):
            assert t.dtype == u.dtype and torch.equal(t, u), k


def test_plans_are_reused_in_a_steady_state():
    """A steady-state step reuses its plans and the native tables (the point of
    caching); a new grad-None pattern or a re-pointed parameter builds new ones."""
    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.randn(5), torch.randn(2)]
    opt = SAM(params, lr=1e-2, backend="foreach")
    seen = []
    for step in range(5):
        if step == 3:
            params[1].data = params[1].data.clone()
        grads = [torch.randn_like(p) for p in params]
        if step == 4:
            grads[2] = None
        _set_grads(params, grads)
        opt.first_step()
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.second_step()
        seen.append((opt._plans[("first", 0)], opt._plans[("second", 0)]))
    assert seen[1][0] is seen[0][0] and seen[2][0] is seen[0][0]
    assert seen[1][1] is seen[0][1] and seen[2][1] is seen[0][1]
    assert seen[3][0] is not seen[2][0]          # re-pointed parameter
    assert seen[4][0] is not seen[3][0]          # params[2] without a pass-1 grad
    assert seen[4][1] is not seen[3][1]          # ... so not perturbed


def test_plans_hold_no_optimizer_and_are_not_copied():
    """Data flows optimizer -> plan only: a plan holds tensors and the state
    dicts it compares against, never the optimizer; a deepcopy of the
    optimizer starts with an empty cache and steps alike."""
    import gc

    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.randn(5)]
    opt = SAM([{"params": params, "precondition": True}], lr=1e-2, backend="foreach")
    for _ in range(2):
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.first_step()
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.second_step()
    for plan in opt._plans.values():
        assert not any(r is opt for r in gc.get_referents(plan))
        for slot in type(plan).__mro__[0].__slots__ + plans_mod._Plan.__slots__:
            assert getattr(plan, slot, None) is not opt
    twin = copy.deepcopy(opt)
    assert len(twin._plans) == 0
