"""Real training loops (issue 5, CASES B S4/S5/S11/S13, D-C3, D-C4): fp16 with
GradScaler, gradient clipping, BatchNorm clean-pass statistics, any base
optimizer with exact resume, torch.compile, and smoke runs of python/."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fsam_kernels import SAM, FunctionalSAM
from fsam_kernels.optim import bn_stats_frozen

from helpers import fused_backends

BACKENDS = ["reference"] + [b for b in fused_backends("cpu") if b != "triton"]
CLASSES = [SAM, FunctionalSAM]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)


def _closure(model, x, y, inject=None):
    """inject: set of 1-based call numbers whose output is made non-finite."""
    calls = [0]

    def closure():
        calls[0] += 1
        out = model(x)
        if inject and calls[0] in inject:
            out = out * torch.tensor(float("inf"), dtype=out.dtype)
        return out, nn.functional.cross_entropy(out.float(), y)

    return closure


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: (v.clone() if torch.is_tensor(v) else v)
             for p in model.parameters() for k, v in opt.state.get(p, {}).items()}
    return params, state


# ------------------------------------------------------------------ fp16 / GradScaler
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["pass2", "pass1"])
def test_fp16_inf_skips_step_atomically_and_backs_off_once(cls, backend, where):
    """D-C3 / D-C4 a, b / S5: θ bitwise, state and step unchanged, one backoff."""
    model = _mlp(torch.float16)
    x, y = _data(torch.float16)
    opt = cls(model.parameters(), lr=1e-2, rho=0.05, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt.step(_closure(model, x, y), grad_scaler=scaler)        # one good step: state exists
    scaler.update()
    assert not bool(opt.last_step_skipped)
    assert scaler.get_scale() == 1024.0
    params, state = _snapshot(model, opt)
    opt.step(_closure(model, x, y, inject={2} if where == "pass2" else {1}), grad_scaler=scaler)
    assert bool(opt.last_step_skipped)
    for p, p0 in zip(model.parameters(), params):
        assert torch.equal(p, p0)
    new_state = {k: v for p in model.parameters() for k, v in opt.state[p].items()}
    for k, v in state.items():
        assert torch.equal(new_state[k], v)
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())
    scaler.update()
    assert scaler.get_scale() == 512.0
    # training continues normally afterwards
    opt.step(_closure(model, x, y), grad_scaler=scaler)
    scaler.update()
    assert not bool(opt.last_step_skipped)
    assert scaler.get_scale() == 512.0
    assert all(opt.state[p]["step"].item() == 2 for p in model.parameters())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_scaled_step_equals_unscaled(cls, backend):
    """D-C4 c / S4: finite passes: the loss scale (a power of two) never reaches
    the update; each pass is unscaled exactly once."""
    x, y = _data(torch.float16)
    m1, m2 = _mlp(torch.float16), _mlp(torch.float16)
    o1 = cls(m1.parameters(), lr=1e-2, rho=0.05, backend=backend)
    o2 = cls(m2.parameters(), lr=1e-2, rho=0.05, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for _ in range(3):
        o1.step(_closure(m1, x, y), grad_scaler=scaler)
        scaler.update()
        o2.step(_closure(m2, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3)
    assert scaler.get_scale() == 256.0


def test_manual_loop_with_grad_scaler():
    model = _mlp(torch.float16)
    ref = copy.deepcopy(model)
    x, y = _data(torch.float16)
    opt = SAM(model.parameters(), lr=1e-2, backend="reference")
    oref = SAM(ref.parameters(), lr=1e-2, backend="reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    scaler.scale(nn.functional.cross_entropy(model(x).float(), y)).backward()
    opt.first_step(grad_scaler=scaler)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x).float(), y)).backward()
    opt.second_step(grad_scaler=scaler)
    scaler.update()
    oref.step(_closure(ref, x, y))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3)
    with pytest.raises(ValueError, match="not both"):
        opt.first_step(torch.ones(()), grad_scaler=scaler)


def test_scaler_step_gives_clear_error():
    model = _mlp()
    x, y = _data()
    opt = SAM(model.parameters(), backend="reference")
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        scaler.step(opt)
    # the legacy GradScaler contract (it passes itself as grad_scaler=) is the same call
    ref = copy.deepcopy(model)
    oref = SAM(ref.parameters(), backend="reference")
    with pytest.warns(FutureWarning):
        scaler.step(opt, _closure(model, x, y))
    scaler.update()
    oref.step(_closure(ref, x, y))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturbation_independent_of_loss_scale(backend):
    """S13: loss × 1000 gives the same perturbation up to rounding."""
    torch.manual_seed(3)
    params = [torch.randn(5, 4), torch.randn(4)]
    grads = [torch.randn_like(p) for p in params]
    es = []
    for mult in (1.0, 1000.0):
        ps = [p.clone() for p in params]
        for p, g in zip(ps, grads):
            p.grad = g * mult
        opt = SAM(ps, rho=0.1, backend=backend)
        opt.first_step()
        es.append([p - q for p, q in zip(ps, params)])
        opt.restore()
    for a, b in zip(*es):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ clipping
def _two_phase(opt, params, g1, g2):
    for p, g in zip(params, g1):
        p.grad = g.clone()
    opt.first_step()
    for p, g in zip(params, g2):
        p.grad = g.clone()
    opt.second_step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", [None, torch.optim.SGD])
def test_max_grad_norm_clips_update_gradient(backend, base):
    torch.manual_seed(4)
    init = [torch.randn(7, 3), torch.randn(3)]
    g1 = [torch.randn_like(p) for p in init]
    g2 = [torch.randn_like(p) * 3 for p in init]
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in g2))
    for max_norm in (0.5, 1e6):
        coef = min(1.0, max_norm / (norm + 1e-6))
        kw = dict(lr=0.1, rho=0.05, backend=backend)
        if base is not None:
            kw.update(base_optimizer=base, momentum=0.9)
        pa, pb = [p.clone() for p in init], [p.clone() for p in init]
        oa = SAM(pa, max_grad_norm=max_norm, **kw)
        ob = SAM(pb, **kw)
        for _ in range(2):
            _two_phase(oa, pa, g1, g2)
            _two_phase(ob, pb, g1, [g * coef for g in g2])
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_clipping_before_ascent_keeps_direction(backend):
    """S11: clipping pass-1 grads changes only the ascent's magnitude, which the
    normalisation removes."""
    torch.manual_seed(5)
    init = [torch.randn(6, 2), torch.randn(2)]
    g1 = [torch.randn_like(p) * 10 for p in init]
    es = []
    for clip in (False, True):
        ps = [p.clone() for p in init]
        for p, g in zip(ps, g1):
            p.grad = g.clone()
        if clip:
            total = torch.nn.utils.clip_grad_norm_(ps, 0.01)
            assert total > 1
        opt = SAM(ps, rho=0.05, backend=backend)
        opt.first_step()
        es.append([p - q for p, q in zip(ps, init)])
    for a, b in zip(*es):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_stats_from_clean_pass_only(cls, momentum):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, momentum=momentum), nn.Linear(5, 3))
    clean = copy.deepcopy(model)
    x, y = _data()
    with torch.no_grad():
        clean(x)                                  # what pass 1 at θ does to the stats
    opt = cls(model.parameters(), lr=1e-2, rho=0.5, backend="reference", model=model)
    opt.step(_closure(model, x, y))
    bn, bn0 = model[1], clean[1]
    assert torch.equal(bn.running_mean, bn0.running_mean)
    assert torch.equal(bn.running_var, bn0.running_var)
    assert bn.num_batches_tracked.item() == 1
    # the option off: pass 2 updates them too
    model2 = copy.deepcopy(clean)
    opt2 = cls(model2.parameters(), lr=1e-2, rho=0.5, backend="reference", model=model2,
               bn_clean_pass_only=False)
    opt2.step(_closure(model2, x, y))
    assert model2[1].num_batches_tracked.item() == 3


def test_bn_stats_frozen_context():
    bn = nn.BatchNorm1d(4, momentum=None)
    before = [b.clone() for b in bn.buffers()]
    with bn_stats_frozen(bn):
        bn(torch.randn(8, 4))
    assert all(torch.equal(a, b) for a, b in zip(bn.buffers(), before))


# ------------------------------------------------------------------ base optimizer
def _sam_sgd_reference(model, x, y, steps, lr, momentum, rho, functional=False):
    """Hand-written SAM + torch SGD (the original two-pass recipe)."""
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    params = list(model.parameters())
    for _ in range(steps):
        base.zero_grad()
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        if functional:
            c0 = torch.autograd.grad(loss, out, retain_graph=True)[0]
        loss.backward()
        n = torch.sqrt(sum(p.grad.double().square().sum() for p in params)).float()
        es = [rho * p.grad / (n + 1e-12) for p in params]
        with torch.no_grad():
            for p, e in zip(params, es):
                p.add_(e)
        base.zero_grad()
        out2 = model(x)
        if functional:
            out2.backward(c0)
        else:
            nn.functional.cross_entropy(out2, y).backward()
        with torch.no_grad():
            for p, e in zip(params, es):
                p.sub_(e)
        base.step()


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_base_equals_hand_written_sam_sgd(cls, backend):
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    opt = cls(m1.parameters(), base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05,
              backend=backend)
    for _ in range(3):
        opt.step(_closure(m1, x, y))
    _sam_sgd_reference(m2, x, y, 3, 0.1, 0.9, 0.05, functional=cls is FunctionalSAM)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    st = opt.state_dict()
    assert "momentum_buffer" in st["state"][0]
    assert st["param_groups"][0]["rho"] == 0.05 and st["param_groups"][0]["momentum"] == 0.9


def test_base_optimizer_resume_exact_and_scheduler():
    x, y = _data()
    kw = dict(base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05, backend="foreach"
              if "foreach" in BACKENDS else "reference")
    ma = _mlp()
    oa = SAM(ma.parameters(), **kw)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=1, gamma=0.5)
    for _ in range(2):
        oa.step(_closure(ma, x, y))
        sa.step()
    assert oa.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    sd = copy.deepcopy(oa.state_dict())
    ssd = sa.state_dict()
    mb = copy.deepcopy(ma)
    ob = SAM(mb.parameters(), **kw)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=1, gamma=0.5)
    ob.load_state_dict(sd)
    sb.load_state_dict(ssd)
    for _ in range(2):
        oa.step(_closure(ma, x, y))
        sa.step()
        ob.step(_closure(mb, x, y))
        sb.step()
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(a, b)
    assert ob.param_groups is ob.base_optimizer.param_groups
    assert ob.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 16)


def test_base_optimizer_fp16_scaler_skip():
    model = _mlp(torch.float16)
    x, y = _data(torch.float16)
    opt = SAM(model.parameters(), base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9,
              backend="reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    opt.step(_closure(model, x, y), grad_scaler=scaler)
    scaler.update()
    params = [p.clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.step(_closure(model, x, y, inject={2}), grad_scaler=scaler)
    scaler.update()
    assert bool(opt.last_step_skipped) and scaler.get_scale() == 64.0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b)
               for p, b in zip(model.parameters(), bufs))


def test_base_optimizer_precondition_rules():
    p = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="exp_avg_sq"):
        SAM(p, base_optimizer=torch.optim.SGD, lr=0.1, precondition=True)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(p, base_optimizer="sgd")
    with pytest.raises(TypeError, match="unexpected keyword"):
        SAM(p, momentum=0.9)
    # Adam base: the preconditioner reads Adam's own exp_avg_sq
    model = _mlp()
    x, y = _data()
    opt = SAM(model.parameters(), base_optimizer=torch.optim.Adam, lr=1e-2, precondition=True,
              backend="reference")
    for _ in range(2):
        opt.step(_closure(model, x, y))
    assert all("exp_avg_sq" in opt.state[p] for p in model.parameters())


# --------------------------------------------------------------------- torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference"] + fused_backends("cpu"))
def test_compiled_model_trains(backend):
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    c1 = torch.compile(m1)
    o1 = SAM(m1.parameters(), lr=1e-2, backend=backend)
    o2 = SAM(m2.parameters(), lr=1e-2, backend=backend)
    for _ in range(2):
        o1.step(_closure(c1, x, y))
        o2.step(_closure(m2, x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ examples
EXAMPLES = ["plain_loop.py", "accumulation.py", "fp16_grad_scaler.py", "vision_sgd.py",
            "ddp.py"]


@pytest.mark.parametrize("script", EXAMPLES)
def test_examples_tiny(script):
    path = os.path.join(ROOT, "python", script)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, path, "--tiny"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
