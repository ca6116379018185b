"""Correct in the loops people write (issue 10): autocast around both passes,
torch.optim hook and scheduler conventions, an atomic first_step, parameters
changed between steps (dtype, memory layout), parameter groups changed
between the two phases, and nothing kept alive that was let go.

Every expected value is computed independently: SPEC §1's perturbation from
the pass-1 gradient, the pass-2 gradient in a fresh autocast block at the
perturbed point, a run of the same steps without the disturbance, or the
reference backend. Tolerances are SPEC §5's.
"""
from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsam_kernels import SAM, FunctionalSAM, CotangentRecorder

from helpers import fused_backends

CLASSES = [SAM, FunctionalSAM]
RHO = 0.5          # large, so that gradients at θ and θ + e differ clearly
NORM_EPS = 1e-12   # SPEC §1 ε_n
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _grads(params):
    return [p.grad.detach().clone() for p in params]


# ------------------------------------------------------------------- autocast
def _autocast_devices():
    out = [("cpu", torch.bfloat16), ("cpu", torch.float16)]
    if torch.cuda.is_available():
        out += [("cuda", torch.bfloat16), ("cuda", torch.float16)]
    return out


def _expected_pass2(model, values, x, y, cls, theta, device, dtype):
    """The pass-2 gradient computed on its own: a copy of ``model`` set to
    ``values`` (θ + e), forward in a fresh autocast block (empty cast cache).
    SAM: ∇L(θ+e). Functional-SAM: J(θ+e)ᵀ c0 with c0 = ∂ℓ/∂z at ``theta``."""
    m = copy.deepcopy(model)

    def set_to(vals):
        with torch.no_grad():
            for p, v in zip(m.parameters(), vals):
                p.copy_(v)

    if cls is SAM:
        set_to(values)
        with torch.autocast(device, dtype=dtype):
            loss = F.cross_entropy(m(x), y)
        return torch.autograd.grad(loss, list(m.parameters()))
    set_to(theta)
    with torch.autocast(device, dtype=dtype):
        z0 = m(x)
        loss0 = F.cross_entropy(z0, y)
    c0, = torch.autograd.grad(loss0, z0)
    set_to(values)
    with torch.autocast(device, dtype=dtype):
        z1 = m(x)
    return torch.autograd.grad(z1, list(m.parameters()), c0)


def _expected_perturbed(theta, g1):
    """θ + e of SPEC §1 (plain SAM direction d = g), in float64."""
    n = torch.sqrt(sum(g.double().square().sum() for g in g1))
    return [t.double() + (RHO / (n + NORM_EPS)) * g.double() for t, g in zip(theta, g1)]


@pytest.mark.parametrize("device,dtype", _autocast_devices())
@pytest.mark.parametrize("form", ["closure", "manual"])
@pytest.mark.parametrize("cls", CLASSES)
def test_autocast_around_both_passes_gives_pass2_at_theta_plus_e(cls, form, device, dtype):
    """One autocast block around step(closure), or around both manual passes:
    pass 2 must be computed at θ + e (before the fix autocast's weight-cast
    cache still held the casts made at θ, so ĝ was the pass-1 gradient).

    Tolerances: the perturbed point is SPEC §1's within its float32 bounds
    (rtol 1e-6, atol 1e-7, §5); the expected ĝ comes from the same casts of
    the same values by the same ops, so it agrees to 1 ulp of the autocast
    dtype (§5, 16-bit) relative to the largest gradient entry."""
    model = _mlp().to(device)
    x, y = (t.to(device) for t in _data())
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    opt = cls(params, lr=1e-2, rho=RHO, backend="reference")
    seen = []
    if form == "closure":
        def closure():
            seen.append([p.detach().clone() for p in params])
            out = model(x)
            return out, F.cross_entropy(out, y)
        with torch.autocast(device, dtype=dtype):
            opt.step(closure)
        perturbed = seen[1]
        g2 = _grads(params)
        # the pass-1 gradient, on its own
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, t in zip(m.parameters(), theta):
                p.copy_(t)
        with torch.autocast(device, dtype=dtype):
            g1 = torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters()))
    else:
        rec = CotangentRecorder()
        with torch.autocast(device, dtype=dtype):
            opt.zero_grad()
            z = model(x)
            if cls is FunctionalSAM:
                z = rec.capture(z)
            F.cross_entropy(z, y).backward()
            g1 = _grads(params)
            opt.first_step()
            perturbed = [p.detach().clone() for p in params]
            opt.zero_grad()
            if cls is FunctionalSAM:
                rec.replay(model(x))
            else:
                F.cross_entropy(model(x), y).backward()
            g2 = _grads(params)
            opt.second_step()
    for a, b in zip(perturbed, _expected_perturbed(theta, g1)):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-7)
    expected = _expected_pass2(model, perturbed, x, y, cls, theta, device, dtype)
    ulp = torch.finfo(dtype).eps
    scale = max(float(e.abs().max()) for e in expected)
    for got, exp, first in zip(g2, expected, g1):
        torch.testing.assert_close(got, exp, rtol=ulp, atol=ulp * scale)
    assert any(not torch.allclose(a, b, rtol=ulp, atol=ulp * scale) for a, b in zip(g2, g1)), \
        "pass 2 gave the pass-1 gradient"


# --------------------------------------------------------- torch.optim hooks
class _Counter:
    def __init__(self):
        self.events = []

    def pre(self, opt, args, kwargs):
        self.events.append("pre")

    def post(self, opt, args, kwargs):
        self.events.append("post")


def _manual_step(opt, params, k=0):
    g = torch.Generator().manual_seed(k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.first_step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.second_step()


@pytest.mark.parametrize("cls", CLASSES)
def test_step_hooks_fire_once_per_sam_step(cls):
    """Pre-hooks at the start of first_step (or of step), post-hooks at the end
    of second_step (or of step): once per SAM step whichever way it is driven;
    the global hooks too; none for an abandoned step (restore)."""
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    model = _mlp()
    params = list(model.parameters())
    opt = cls(params, lr=1e-2, backend="reference")
    mine, glob = _Counter(), _Counter()
    handles = [opt.register_step_pre_hook(mine.pre), opt.register_step_post_hook(mine.post),
               register_optimizer_step_pre_hook(glob.pre),
               register_optimizer_step_post_hook(glob.post)]
    try:
        for p in params:
            p.grad = torch.ones_like(p)
        opt.first_step()
        assert mine.events == ["pre"] and glob.events == ["pre"]
        opt.second_step()
        assert mine.events == ["pre", "post"] and glob.events == ["pre", "post"]

        x, y = _data()

        def closure():
            out = model(x)
            return out, F.cross_entropy(out, y)
        opt.step(closure)
        assert mine.events == ["pre", "post"] * 2

        # step() with no closure completes a pending first_step: its post-hooks only
        for p in params:
            p.grad = torch.ones_like(p)
        opt.first_step()
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        assert mine.events == ["pre", "post"] * 3

        opt.first_step()
        opt.restore()                      # abandoned: no post-hook
        assert mine.events == ["pre", "post"] * 3 + ["pre"]
        assert glob.events == mine.events
    finally:
        for h in handles:
            h.remove()


def test_scheduler_sees_manual_steps_without_warning():
    """torch's scheduler warns "lr_scheduler.step() before optimizer.step()"
    unless the optimizer's step ran; second_step() counts as that step."""
    params = list(_mlp().parameters())
    opt = SAM(params, lr=1e-2, backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(2):
            _manual_step(opt, params, k)
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)


@pytest.mark.parametrize("base", [None, torch.optim.SGD])
def test_state_dict_and_load_state_dict_hooks_fire(base):
    params = list(_mlp().parameters())
    kw = {} if base is None else dict(base_optimizer=base, lr=0.1)
    opt = SAM(params, backend="reference", **kw)
    _manual_step(opt, params)
    events = []

    def sd_post(o, sd):
        events.append("sd_post")
        sd["extra"] = 1
        return sd

    def load_pre(o, sd):
        events.append(("load_pre", sd.get("extra")))
        sd = dict(sd)
        sd.pop("extra")
        return sd

    opt.register_state_dict_pre_hook(lambda o: events.append("sd_pre"))
    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: events.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert events == ["sd_pre", "sd_post", ("load_pre", 1), "load_post"]
    assert "extra" in sd                  # the caller's dict is not changed


# ------------------------------------------------------ atomic first_step
class _FailingPerturb:
    """A backend whose perturb raises on its ``n``-th call (fault injection)."""

    def __init__(self, backend, n):
        self._b, self._n, self.calls = backend, n, 0

    def __getattr__(self, name):
        return getattr(self._b, name)

    def perturb(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self._n:
            raise RuntimeError("injected failure")
        return self._b.perturb(*args, **kwargs)


def _two_groups(seed=0):
    torch.manual_seed(seed)
    a, b = nn.Linear(4, 3), nn.Linear(3, 2)
    return a, b, list(a.parameters()) + list(b.parameters())


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("cpu"))
@pytest.mark.parametrize("precondition", [False, True])
def test_failing_first_step_leaves_theta_bitwise(backend, precondition):
    """A backend raising in the second group's perturb (after the first group
    was perturbed) leaves every parameter bitwise at θ and no step pending;
    the next step equals a run that never failed."""
    runs = []
    for inject in (False, True):
        a, b, params = _two_groups()
        opt = SAM([{"params": a.parameters()}, {"params": b.parameters(), "lr": 3e-2}],
                  lr=1e-2, rho=0.1, precondition=precondition, backend=backend)
        _manual_step(opt, params, 0)
        if inject:
            dev = params[0].device
            opt._backends[dev] = _FailingPerturb(opt._backends[dev], 2)
            g = torch.Generator().manual_seed(7)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            theta = [p.detach().clone() for p in params]
            with pytest.raises(RuntimeError, match="injected failure"):
                opt.first_step()
            for p, t in zip(params, theta):
                assert torch.equal(p, t)
            assert opt._perturbed is None
            opt._backends[dev] = opt._backends[dev]._b
        _manual_step(opt, params, 1)
        runs.append([p.detach().clone() for p in params])
    for u, v in zip(*runs):
        assert torch.equal(u, v)


def test_model_double_of_one_part_between_steps():
    """model.double() of one group's module between steps on the cpu backend:
    before, its float32 state made the perturb of that group raise after the
    other group was perturbed (θ left at θ + e). Now the state follows the
    parameter (float32 → float64, exact) and the run equals the reference
    backend's within SPEC §5 (float32 params rtol 1e-5 over steps; the
    float64 params' perturbation carries the float32 rounding of its scale)."""
    if "cpu" not in fused_backends("cpu"):
        pytest.skip("cpu backend not built")
    runs = {}
    for backend in ("reference", "cpu"):
        a, b, params = _two_groups()
        opt = SAM([{"params": a.parameters()}, {"params": b.parameters()}], lr=1e-2, rho=0.1,
                  precondition=True, backend=backend)
        _manual_step(opt, params, 0)
        b.double()
        params = list(a.parameters()) + list(b.parameters())
        for k in (1, 2):
            g = torch.Generator().manual_seed(k)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.first_step()
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.second_step()
        for p in b.parameters():
            assert opt.state[p]["exp_avg"].dtype == torch.float64
        runs[backend] = [p.detach().clone() for p in params]
    for r, c in zip(runs["reference"], runs["cpu"]):
        assert r.dtype == c.dtype
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("cpu"))
def test_channels_last_between_steps(backend):
    """model.to(memory_format=torch.channels_last) between steps: the state
    takes the parameters' layout (values kept) and the run equals one that
    stayed contiguous (same values, other strides: bitwise)."""
    runs = []
    for cl in (False, True):
        torch.manual_seed(0)
        conv = nn.Conv2d(2, 3, 3)
        params = list(conv.parameters())
        opt = SAM(params, lr=1e-2, rho=0.1, precondition=True, backend=backend)
        _manual_step(opt, params, 0)
        if cl:
            conv.to(memory_format=torch.channels_last)
            assert not conv.weight.is_contiguous()
        for k in (1, 2):
            _manual_step(opt, params, k)
        if cl:
            st = opt.state[conv.weight]
            assert st["exp_avg"].stride() == conv.weight.stride()
        runs.append([p.detach().contiguous() for p in params])
    for u, v in zip(*runs):
        assert torch.equal(u, v)


# --------------------------------------- groups changed between the two phases
@pytest.mark.parametrize("backend", ["reference"] + fused_backends("cpu"))
@pytest.mark.parametrize("change", ["reverse", "replace_list", "remove_group"])
def test_param_groups_changed_between_first_and_second_step(backend, change):
    """Reversing param_groups (in place or as a new list) between first_step
    and second_step changes nothing: each perturbed parameter is restored
    bitwise and updated with its own group's hyperparameters (before, the
    restore followed group positions: parameters kept θ + e). A group removed
    in between has its parameters restored to θ and not updated."""
    runs = []
    for disturb in (False, True):
        a, b, params = _two_groups()
        opt = SAM([{"params": a.parameters()}, {"params": b.parameters(), "lr": 3e-2}],
                  lr=1e-2, rho=0.1, backend=backend)
        _manual_step(opt, params, 0)
        theta_b = [p.detach().clone() for p in b.parameters()]
        g = torch.Generator().manual_seed(5)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.first_step()
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        if change == "remove_group":
            if disturb:
                del opt.param_groups[1]
            else:                  # the same without the group: its grads unused
                for p in b.parameters():
                    p.grad = None
        elif disturb:
            if change == "reverse":
                opt.param_groups.reverse()
            else:
                opt.param_groups = [opt.param_groups[1], opt.param_groups[0]]
        opt.second_step()
        if change == "remove_group" and disturb:
            for p, t in zip(b.parameters(), theta_b):
                assert torch.equal(p, t)
        runs.append([p.detach().clone() for p in params])
    for u, v in zip(*runs):
        assert torch.equal(u, v)


# ------------------------------------------------------------ kept alive
@pytest.mark.parametrize("backend", ["reference"] + fused_backends("cpu"))
def test_removed_parameter_is_freed(backend):
    """A parameter removed from the optimizer (its group deleted and its state
    popped, as torch needs) is freed once the next step has run: the backups
    of the ascent no longer keep it (or a copy of it) alive."""
    keep = nn.Linear(3, 2)
    drop = nn.Parameter(torch.randn(5))
    opt = SAM([{"params": keep.parameters()}, {"params": [drop]}], lr=1e-2, backend=backend,
              precondition=True)
    params = list(keep.parameters()) + [drop]
    _manual_step(opt, params, 0)
    del opt.param_groups[1]
    opt.state.pop(drop)
    _manual_step(opt, list(keep.parameters()), 1)
    r = weakref.ref(drop)
    del drop, params
    gc.collect()
    assert r() is None


_GC_SCRIPT = r"""
import gc, weakref, sys
import torch, torch.nn.functional as F
from fsam_kernels import SAM, FunctionalSAM
gc.disable()
for backend, cls in [(b, c) for b in sys.argv[1:] for c in (SAM, FunctionalSAM)]:
    for kw in ({}, {"precondition": True, "max_grad_norm": 1.0}, {"base_optimizer": torch.optim.SGD, "lr": 0.1}):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        opt = cls(model.parameters(), backend=backend, model=model, **kw)
        x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        closure = lambda: (lambda o: (o, F.cross_entropy(o, y)))(model(x))
        opt.step(closure)
        opt.step(closure)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1)
        sched.step()
        opt.load_state_dict(opt.state_dict())
        r = weakref.ref(opt)
        del opt, sched, closure
        if r() is not None:
            print("ALIVE", backend, cls.__name__, kw)
print("done")
"""


def test_optimizer_is_freed_without_the_garbage_collector():
    """With gc disabled, in a fresh interpreter (the first optimizer of a
    process included): an optimizer that stepped, had a scheduler attached and
    a state dict round trip is freed as soon as its last reference goes (no
    reference cycle through it). Before, the first optimizer of a process
    stayed alive: torch._dynamo, imported lazily by torch inside its
    __init__, leaves a frame cycle holding the importing call stack."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    backends = ["reference"] + [b for b in fused_backends("cpu") if b != "triton"]
    r = subprocess.run([sys.executable, "-c", _GC_SCRIPT, *backends], capture_output=True,
                       text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "done" and "ALIVE" not in r.stdout, r.stdout
