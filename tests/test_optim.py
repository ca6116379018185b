"""SAM / FunctionalSAM against independent float64 computations (issue 2)."""
from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vjp

import fsam_kernels
from fsam_kernels import SAM, FunctionalSAM, CotangentRecorder
from fsam_kernels.backends.reference import ReferenceBackend

from helpers import (F32_ATOL, F32_RTOL_1, F32_RTOL_10, F32_SCALE_ROUNDINGS, U32, oracle_adamw,
                     oracle_direction)

ALL = ["reference", "foreach"]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _random_steps(opt, params, n):
    """``n`` SAM steps with random grads in both passes."""
    for _ in range(n):
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.first_step()
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.second_step()


# --------------------------------------------------------------------- ascent
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("precondition", [False, True])
def test_ascent_direction_and_radius(backend, precondition):
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2)]
    grads = [torch.randn_like(p) for p in params]
    rho, beta2, eps = 0.07, 0.99, 1e-8
    opt = SAM([params[0], params[1]], lr=1e-3, betas=(0.9, beta2), eps=eps, rho=rho,
              precondition=precondition, backend=backend)
    opt.add_param_group({"params": [params[2]], "rho": 2 * rho})
    # step 1: the preconditioned variant uses the identity on its first step
    for step in range(2):
        theta = [p.clone() for p in params]
        _set_grads(params, grads)
        opt.first_step(zero_grad=False)     # the same grads drive the descent below
        states = [opt.state.get(p, {}) for p in params]
        ts = [s["step"].item() if "step" in s else 0 for s in states]
        ds = [oracle_direction(g, s.get("exp_avg_sq"), t, beta2, eps, precondition)
              for g, s, t in zip(grads, states, ts)]
        n = math.sqrt(sum(float((d * d).sum()) for d in ds))
        rhos = [rho, rho, 2 * rho]
        # float32 against the exact e (SPEC §1), in units of U32 = 2^-24: θ + e
        # rounded once to float32 (U32·|θ+e|, +1 U32·|e| for forming it from the
        # computed e); the scale's float32 rounding (F32_SCALE_ROUNDINGS); the
        # product scale·d (1); and, when d is preconditioned, d's float32 ops
        # (1 - β2^t rounded, v/bc2, sqrt, + ε, g/denom: ≤ 4) on d itself and
        # again through N (≤ 4).
        k = F32_SCALE_ROUNDINGS + 2 + (8 if precondition and step >= 1 else 0)
        tols = []
        for i, (p, th, d, r) in enumerate(zip(params, theta, ds, rhos)):
            e_expected = r * d / (n + 1e-12)
            tol = U32 * (th.double() + e_expected).abs() + k * U32 * e_expected.abs()
            err = (p.double() - th.double() - e_expected).abs()
            assert bool((err <= tol).all()), \
                f"step {step} param {i}: e off by {(err / tol).max().item():.3g}x the bound"
            tols.append(tol)
        # the radius of the first group's share is rho * N_group-share / (N + ε_n):
        # |‖e_c‖ - ‖e‖| ≤ ‖e_c - e‖ ≤ ‖tol‖ (the per-element bounds above)
        e01 = torch.cat([(p.double() - th.double()).flatten() for p, th in zip(params[:2], theta[:2])])
        d01 = torch.cat([d.flatten() for d in ds[:2]])
        tol01 = torch.cat([t.flatten() for t in tols[:2]]).norm().item()
        assert abs(e01.norm().item() - rho * d01.norm().item() / (n + 1e-12)) <= tol01
        opt.second_step()
        if step == 0:
            assert all(opt.state[p]["step"].item() == 1 for p in params)
    if precondition:
        # second step really used the preconditioner: direction differs from g
        assert not torch.allclose(ds[0], grads[0].double())


@pytest.mark.parametrize("backend", ALL)
def test_radius_is_rho(backend):
    torch.manual_seed(1)
    params = [torch.randn(100), torch.randn(10, 10)]
    gs = [torch.randn(100) * 5, torch.randn(10, 10)]
    _set_grads(params, gs)
    theta = [p.clone() for p in params]
    opt = SAM(params, rho=0.3, backend=backend)
    opt.first_step()
    e = torch.cat([(p - t).double().flatten() for p, t in zip(params, theta)])
    # SPEC §1: ‖e‖ = ρ·N/(N + ε_n) exactly; the float32 e is within the
    # per-element bound of test_ascent_direction_and_radius (plain SAM, d = g
    # exact), so its norm within that bound's norm
    g = torch.cat([x.double().flatten() for x in gs])
    th = torch.cat([t.double().flatten() for t in theta])
    n = g.norm().item()
    e_exact = 0.3 * g / (n + 1e-12)
    tol = U32 * (th + e_exact).abs() + (F32_SCALE_ROUNDINGS + 2) * U32 * e_exact.abs()
    assert abs(e.norm().item() - 0.3 * n / (n + 1e-12)) <= tol.norm().item()
    opt.restore()
    assert all(torch.equal(p, t) for p, t in zip(params, theta))


# -------------------------------------------------------------------- descent
@pytest.mark.parametrize("backend", ALL)
def test_descent_is_adamw_at_theta_and_restore_bitwise(backend):
    torch.manual_seed(2)
    params = [torch.randn(6, 4), torch.randn(4)]
    lr, b1, b2, eps, wd = 1e-2, 0.8, 0.95, 1e-6, 0.1
    opt = SAM(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, rho=0.5, backend=backend)
    ref = [(p.double().clone(), torch.zeros_like(p, dtype=torch.float64),
            torch.zeros_like(p, dtype=torch.float64)) for p in params]
    # float32 rounding is relative to the size of the terms a value sums, not to
    # the (possibly cancelling) sum: mag_m = β1·mag_m + (1-β1)·|ĝ| bounds |m|
    # and the terms that made it; v sums non-negative terms, so v itself.
    mags = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for t in range(3):
        theta = [p.clone() for p in params]
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.first_step()
        assert not any(torch.equal(p, th) for p, th in zip(params, theta))
        g2 = [torch.randn_like(p) for p in params]
        _set_grads(params, g2)
        # restore alone is bitwise
        opt.restore()
        assert all(torch.equal(p, th) for p, th in zip(params, theta))
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.first_step()
        _set_grads(params, g2)
        opt.second_step()
        new_ref = []
        # SPEC §5's figures: rtol F32_RTOL_1 after one update, F32_RTOL_10 up to
        # 10; applied to the magnitudes of the terms (mags; for p: |θ|·(1-ηλ)
        # plus the update's magnitude η/(1-β1^t)·mag_m/(sqrt(v̂)+ε)), which
        # is what makes an atol unnecessary near 0. Float32 roundings, first
        # step (units of 2^-24 of those magnitudes): m 2, v 3, denominator
        # 5.5, the update 11.5 and θ·(1-ηλ) 3: ≤ 12 < F32_RTOL_1 = 16.8; three
        # steps ≤ 3 × that < F32_RTOL_10 = 168.
        rtol = F32_RTOL_1 if t == 0 else F32_RTOL_10
        for i, ((rp, rm, rv), g, p, th) in enumerate(zip(ref, g2, params, theta)):
            rp, rm, rv = oracle_adamw(th, g, rm, rv, t, lr, b1, b2, eps, wd)
            new_ref.append((rp, rm, rv))
            mags[i] = b1 * mags[i] + (1 - b1) * g.double().abs()
            decayed = th.double().abs() * (1 - lr * wd)
            upd = lr / (1 - b1 ** (t + 1)) * mags[i] / (rv.sqrt() / math.sqrt(1 - b2 ** (t + 1)) + eps)
            for what, got, want, tol in (("p", p, rp, rtol * (decayed + upd)),
                                         ("exp_avg", opt.state[p]["exp_avg"], rm, rtol * mags[i]),
                                         ("exp_avg_sq", opt.state[p]["exp_avg_sq"], rv, rtol * rv)):
                err = (got.double() - want).abs()
                assert bool((err <= tol).all()), \
                    f"step {t + 1} param {i} {what}: off by {(err / tol).max().item():.3g}x the bound"
            assert opt.state[p]["step"].item() == t + 1
        ref = new_ref


# ------------------------------------------------------ rho = 0 equals AdamW
def test_rho_zero_equals_torch_adamw_bitwise():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    model2 = copy.deepcopy(model)
    kw = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.05)
    opt = SAM([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 1e-3}],
              rho=0.0, backend="reference", **kw)
    opt2 = torch.optim.AdamW([{"params": model2[0].parameters()},
                              {"params": model2[2].parameters(), "lr": 1e-3}], foreach=False, **kw)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(10):
        def closure():
            z = model(x)
            return z, nn.functional.mse_loss(z, y)
        opt.step(closure)
        opt2.zero_grad()
        nn.functional.mse_loss(model2(x), y).backward()
        opt2.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
        assert opt.state[p]["step"].item() == opt2.state[q]["step"].item() == 10


# ------------------------------------------------ the second gradient (§2)
class _Spy(ReferenceBackend):
    """Reference backend recording the pass-2 grads handed to restore_adamw."""

    def __init__(self):
        self.seen = {}

    def restore_adamw(self, params, grads, backups, *a, **k):
        for p, g in zip(params, grads):
            self.seen[p] = g.clone()
        return super().restore_adamw(params, grads, backups, *a, **k)

    def perturb(self, params, grads, backups, *a, **k):
        super().perturb(params, grads, backups, *a, **k)
        self.perturbed = {p: p.detach().clone() for p in params}


def _mlp():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 6)).double()


def _ce(z, y):
    return nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))


def _independent_grads(model, x, y, theta, theta_e):
    """∇L(θ+e) and J(θ+e)ᵀ c0 via torch.func, independently of the optimizer."""
    names = [n for n, _ in model.named_parameters()]
    theta = dict(zip(names, theta))
    pert = dict(zip(names, theta_e))

    def loss_at(ps):
        return _ce(functional_call(model, ps, (x,)), y)

    g_sam = grad(loss_at)(pert)
    z0 = functional_call(model, theta, (x,)).detach().requires_grad_(True)
    c0 = torch.autograd.grad(_ce(z0, y), z0)[0]
    _, pullback = vjp(lambda ps: functional_call(model, ps, (x,)), pert)
    g_fsam = pullback(c0)[0]
    return [g_sam[n] for n in names], [g_fsam[n] for n in names]


@pytest.mark.parametrize("cls", [SAM, FunctionalSAM])
def test_second_gradient_mlp(cls):
    model = _mlp()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 6, (16,))
    opt = cls(model.parameters(), lr=1e-3, rho=0.2, backend="reference")
    spy = _Spy()
    opt._backends[torch.device("cpu")] = spy
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    opt.step(lambda: (lambda z: (z, _ce(z, y)))(model(x)))
    theta_e = [spy.perturbed[p] for p in params]
    g_sam, g_fsam = _independent_grads(model, x, y, theta, theta_e)
    want = g_sam if cls is SAM else g_fsam
    other = g_fsam if cls is SAM else g_sam
    for p, w, o in zip(params, want, other):
        torch.testing.assert_close(spy.seen[p], w, rtol=1e-10, atol=1e-12)
    # the two really differ here (nonlinear model), so the test tells them apart
    assert any((w - o).abs().max() > 1e-6 for w, o in zip(want, other))


def test_fsam_linear_model_equals_clean_gradient():
    torch.manual_seed(5)
    model = nn.Linear(6, 4, bias=True).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    z = model(x)
    clean = torch.autograd.grad(_ce(z, y), list(model.parameters()))
    opt = FunctionalSAM(model.parameters(), lr=1e-3, rho=0.5, backend="reference")
    spy = _Spy()
    opt._backends[torch.device("cpu")] = spy
    opt.step(lambda: (lambda z: (z, _ce(z, y)))(model(x)))
    for p, g in zip(model.parameters(), clean):
        torch.testing.assert_close(spy.seen[p], g, rtol=1e-12, atol=1e-14)


def test_fsam_output_structures_tuple_and_dict():
    model = _mlp()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 6, (8,))
    results = []
    for kind in ("tensor", "tuple", "dict"):
        m = copy.deepcopy(model)
        opt = FunctionalSAM(m.parameters(), lr=1e-3, rho=0.1, backend="reference")
        spy = _Spy()
        opt._backends[torch.device("cpu")] = spy

        def closure():
            z = m(x)
            aux = (z * 0.5).sum(-1)            # an output the loss does not use
            out = {"tensor": z, "tuple": (z, aux), "dict": {"logits": z, "aux": aux}}[kind]
            return out, _ce(z, y)
        opt.step(closure)
        results.append([spy.seen[p] for p in m.parameters()])
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b)


# ------------------------------------------------------------ accumulation
@pytest.mark.parametrize("cls", [SAM, FunctionalSAM])
@pytest.mark.parametrize("backend", ALL)
def test_accumulation_equals_one_big_batch(cls, backend):
    model = _mlp().float()
    x, y = torch.randn(12, 5), torch.randint(0, 6, (12,))
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    o1 = cls(m1.parameters(), lr=1e-2, rho=0.1, precondition=True, backend=backend)
    o2 = cls(m2.parameters(), lr=1e-2, rho=0.1, precondition=True, backend=backend)
    for _ in range(3):
        o1.step(lambda: (lambda z: (z, _ce(z, y)))(m1(x)))
        # 3 micro-batches of 4, loss scaled by 1/3 so the sum equals the mean
        rec = CotangentRecorder()
        o2.zero_grad()
        for i in range(3):
            z = m2(x[4 * i:4 * i + 4])
            if cls is FunctionalSAM:
                rec.capture(z)
            (_ce(z, y[4 * i:4 * i + 4]) / 3).backward()
        o2.first_step()
        o2.zero_grad()
        for i in range(3):
            z = m2(x[4 * i:4 * i + 4])
            if cls is FunctionalSAM:
                rec.replay(z)
            else:
                (_ce(z, y[4 * i:4 * i + 4]) / 3).backward()
        o2.second_step()
    # the two runs differ only by the float32 rounding of the gradient sums (one
    # mean over 12 against three means over 4, each / 3, accumulated): like a
    # fused backend against the reference, SPEC §5's figures after ≤ 10 steps
    # (F32_ATOL for values near 0 covers far more than 3 updates' lr·ulp, 2e-9)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=F32_RTOL_10, atol=F32_ATOL)


# -------------------------------------------------------- closure convention
def test_closure_called_twice_and_returns_pass1_loss():
    model = _mlp()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 6, (8,))
    calls = []
    opt = SAM(model.parameters(), lr=1e-3, rho=0.1, backend="reference")

    def closure():
        z = model(x)
        loss = _ce(z, y)
        calls.append(loss.item())
        return z, loss
    out = opt.step(closure)
    assert len(calls) == 2
    assert out.item() == calls[0]
    assert calls[1] > calls[0]          # the ascent really increased the loss
    assert not out.requires_grad


def test_zero_loss_still_steps():
    p = nn.Parameter(torch.ones(4))
    opt = SAM([p], lr=0.1, weight_decay=0.0, rho=0.05, backend="reference")
    loss = opt.step(lambda: (p * 1.0, (p * 0.0).sum()))
    assert loss.item() == 0.0
    assert opt.state[p]["step"].item() == 1
    assert torch.equal(p.detach(), torch.ones(4))    # zero grad: no move, no NaN


def test_dropout_same_masks_in_both_passes():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 32), nn.Dropout(0.5), nn.Linear(32, 3)).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    masks = []
    h = model[1].register_forward_hook(lambda m, i, o: masks.append((o != 0)))
    opt = SAM(model.parameters(), lr=1e-3, rho=0.0, backend="reference")
    opt.step(lambda: (lambda z: (z, z.square().mean()))(model(x)))
    h.remove()
    assert torch.equal(masks[0], masks[1])


# ----------------------------------------------------------------- bad input
def test_bad_hyperparameters_name_the_argument():
    p = [nn.Parameter(torch.ones(2))]
    for kw, name in [(dict(rho=-0.1), "rho"), (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.9)), "betas"),
                     (dict(betas=(0.9, -0.1)), "betas"), (dict(eps=-1.0), "eps"),
                     (dict(weight_decay=-1.0), "weight_decay"), (dict(rho=float("nan")), "rho")]:
        with pytest.raises(ValueError, match=name):
            SAM(p, **kw)
    with pytest.raises(ValueError, match="backend"):
        SAM(p, backend="magic")
    with pytest.raises(TypeError, match="lr"):
        SAM(p, lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.rho"):
        SAM([{"params": p}, {"params": [nn.Parameter(torch.ones(1))], "rho": -1.0}])
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        SAM(p, backend="cuda")


def test_duplicate_parameters_rejected_same_error():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="more than once"):
        SAM([p, p])
    with pytest.raises(ValueError, match="more than once"):
        SAM([{"params": [p]}, {"params": [p]}])


def test_bad_closures():
    model = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    opt = FunctionalSAM(model.parameters(), backend="reference")
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="closure"):
        opt.step(lambda: model(x).sum())                       # loss only
    with pytest.raises(TypeError, match="closure"):
        opt.step(lambda: (model(x), model(x)))                 # non-scalar loss
    with pytest.raises(ValueError, match="does not depend"):
        opt.step(lambda: (model(x).detach(), model(x).sum()))  # detached output
    with pytest.raises(TypeError, match="closure output"):
        opt.step(lambda: ("logits", model(x).sum()))
    # pass 2 raising leaves θ restored
    n = [0]

    def flaky():
        n[0] += 1
        if n[0] == 2:
            raise KeyError("boom")
        z = model(x)
        return z, z.square().mean()
    with pytest.raises(KeyError):
        opt.step(flaky)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))
    opt.step(flaky)   # and the optimizer is usable afterwards


def test_sparse_and_complex_rejected():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = SAM(emb.parameters(), backend="reference")
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(lambda: (lambda z: (z, z.sum()))(emb(torch.tensor([1, 2]))))
    with pytest.raises(TypeError, match="complex"):
        SAM([nn.Parameter(torch.ones(2, dtype=torch.complex64))])


def test_phase_order_errors():
    p = nn.Parameter(torch.ones(3))
    opt = SAM([p], backend="reference")
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    p.grad = torch.ones(3)
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()


@pytest.mark.parametrize("cls", [SAM, FunctionalSAM])
def test_second_gradient_tiny_transformer(cls):
    from fsam_kernels.lm.model import GPT, config_for

    torch.manual_seed(7)
    model = GPT(config_for("tiny", vocab_size=50, block_size=16)).double()
    x = torch.randint(0, 50, (2, 16))
    y = torch.randint(0, 50, (2, 16))
    opt = cls(model.parameters(), lr=1e-3, rho=0.5, precondition=False, backend="reference")
    spy = _Spy()
    opt._backends[torch.device("cpu")] = spy
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    opt.step(lambda: (lambda z: (z, _ce(z, y)))(model(x)))
    theta_e = [spy.perturbed[p] for p in params]
    g_sam, g_fsam = _independent_grads(model, x, y, theta, theta_e)
    want, other = (g_sam, g_fsam) if cls is SAM else (g_fsam, g_sam)
    for p, w in zip(params, want):
        torch.testing.assert_close(spy.seen[p], w, rtol=1e-9, atol=1e-12)
    assert any((w - o).abs().max() > 1e-8 for w, o in zip(want, other))


def test_bad_pass2_grad_changes_nothing():
    # a wrong pass-2 grad is caught before any group is restored or updated
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(7))
    opt = SAM([{"params": [a]}, {"params": [b]}], lr=0.1, rho=0.2, backend="reference")
    theta = [a.detach().clone(), b.detach().clone()]
    a.grad, b.grad = torch.randn(5), torch.randn(7)
    opt.first_step()
    perturbed = [a.detach().clone(), b.detach().clone()]
    a.grad, b.grad = torch.randn(5), torch.randn(7).to_sparse()
    with pytest.raises(RuntimeError, match=r"param_groups\[1\] param 0: pass-2 gradient is sparse"):
        opt.second_step()
    assert torch.equal(a.detach(), perturbed[0]) and torch.equal(b.detach(), perturbed[1])
    assert all(len(opt.state.get(p, {})) == 0 for p in (a, b))
    opt.restore()
    assert torch.equal(a.detach(), theta[0]) and torch.equal(b.detach(), theta[1])


def test_load_state_dict_rejects_foreign_state():
    p = nn.Parameter(torch.randn(4))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(4)
    sgd.step()
    opt = SAM([p], backend="reference")
    with pytest.raises(ValueError, match=r"foreign keys \[.*'momentum'"):   # the groups
        opt.load_state_dict(sgd.state_dict())
    sd = copy.deepcopy(sgd.state_dict())          # SAM's groups, SGD's state
    sd["param_groups"] = copy.deepcopy(opt.state_dict()["param_groups"])
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.load_state_dict(sd)
    good = SAM([p], backend="reference")
    good.step(lambda: (p * 1.0, p.square().sum()))
    sd = copy.deepcopy(good.state_dict())
    del sd["state"][0]["exp_avg"]
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(good.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].to(torch.complex64)
    with pytest.raises(ValueError, match="real floating-point"):
        opt.load_state_dict(sd)
    assert len(opt.state) == 0       # a refused load leaves the optimizer as it was


def test_more_bad_input():
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="params: a set"):
        SAM({p})
    with pytest.raises(TypeError, match="layout"):
        SAM([torch.sparse_coo_tensor([[0]], [1.0], (3,)).requires_grad_()])
    opt = SAM([p], backend="reference")
    with pytest.raises(TypeError, match="closure: expected a callable"):
        opt.step(5)
    with pytest.raises(ValueError, match="does not depend"):
        opt.step(lambda: (p.detach() * 1.0, p.sum()))        # SAM checks the output too
    f = FunctionalSAM([p], backend="reference")
    with pytest.raises(ValueError, match="does not depend on the returned output"):
        f.step(lambda: (p * 2.0, p.square().sum()))            # loss not computed from output
    assert torch.equal(p.detach(), torch.ones(3)) and f._perturbed is None


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reset", ["clear", "assign", "del", "replace"])
def test_state_resets_mid_run_are_seen(backend, reset):
    """``opt.state.clear()``, ``opt.state[p] = {}``, ``del opt.state[p]`` or a new
    ``optimizer.state`` mid-run restart those moments, as torch's AdamW does
    (rho = 0: SAM is AdamW), though the cached plans hold the old dicts."""
    if backend == "cpu" and "cpu" not in fsam_kernels.available_backends("cpu"):
        pytest.skip("native cpu backend not built")
    torch.manual_seed(0)
    w0 = [torch.randn(4, 3), torch.randn(5)]
    a = [nn.Parameter(w.clone()) for w in w0]
    b = [nn.Parameter(w.clone()) for w in w0]
    sam = SAM(a, lr=1e-2, rho=0.0, backend=backend)
    ref = torch.optim.AdamW(b, lr=1e-2, foreach=False)
    for step in range(6):
        if step == 3:
            for o, ps in ((sam, a), (ref, b)):
                if reset == "clear":
                    o.state.clear()
                elif reset == "assign":
                    o.state[ps[0]] = {}
                elif reset == "del":
                    del o.state[ps[1]]
                else:
                    o.state = defaultdict(dict)
        gs = [torch.randn_like(p) for p in a]
        _set_grads(b, [g.clone() for g in gs])
        ref.step()
        _set_grads(a, gs)
        sam.first_step()
        _set_grads(a, [g.clone() for g in gs])
        sam.second_step()
        for x, y in zip(a, b):
            if backend == "reference":    # SPEC §3: torch's op order, bitwise for float32
                assert torch.equal(x.detach(), y.detach()), (step, reset)
            else:                         # SPEC §5: a fused backend against it, ≤ 10 steps
                torch.testing.assert_close(x.detach(), y.detach(), atol=F32_ATOL,
                                           rtol=F32_RTOL_1 if step == 0 else F32_RTOL_10)
    assert len(sam.state_dict()["state"]) == 2


def test_removed_group_and_state_are_not_kept_alive():
    """Plans of a removed parameter group, or of state that was cleared, hold
    no tensors after the next step."""
    import gc
    import weakref

    params = [torch.randn(3), torch.randn(4)]
    opt = SAM([{"params": [params[0]]}, {"params": [params[1]]}], lr=1e-2, backend="foreach")
    _random_steps(opt, params, 2)
    dead = [weakref.ref(t) for t in opt.state[params[1]].values()] + [weakref.ref(params[1])]
    del opt.param_groups[1]
    del opt.state[params[1]]
    opt._backups.pop(params[1])
    del params[1]
    _random_steps(opt, params, 1)
    gc.collect()
    assert all(r() is None for r in dead)


def test_deepcopy_keeps_settings_and_steps_alike():
    import copy as _copy

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6))
    opt = SAM([p], lr=1e-2, rho=0.1, backend="foreach", max_grad_norm=1.0)
    g = [torch.randn(6) for _ in range(4)]
    for k in range(2):
        _set_grads([p], [g[k]])
        opt.first_step()
        _set_grads([p], [g[k]])
        opt.second_step()
    twin = _copy.deepcopy(opt)
    q = twin.param_groups[0]["params"][0]
    assert twin.max_grad_norm == 1.0 and twin.backend_name == "foreach"
    for k in range(2, 4):
        for o, t in ((opt, p), (twin, q)):
            _set_grads([t], [g[k]])
            o.first_step()
            _set_grads([t], [g[k]])
            o.second_step()
    assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("backend", ["foreach", "cpu"])
def test_param_or_state_resized_under_a_plan_is_an_error(backend):
    """A parameter shrunk with ``p.data = p.data[:10]`` (same address) while its
    grad keeps the old shape, or a state tensor re-pointed to a buffer of
    another size, raises as the plan-free path does: never a write past a
    buffer (the plans compare shapes and dtypes; the native tables hold the
    state's storages, so an address cannot come back with another size)."""
    if backend == "cpu" and "cpu" not in fsam_kernels.available_backends("cpu"):
        pytest.skip("native cpu backend not built")
    p = nn.Parameter(torch.randn(1000))
    opt = SAM([p], lr=1e-2, backend=backend)
    _random_steps(opt, [p], 2)
    _set_grads([p], [torch.randn(1000)])
    p.data = p.data[:10]
    with pytest.raises(RuntimeError, match="gradient has shape"):
        opt.first_step()
    p.data = torch.randn(1000)
    st = opt.state[p]
    st["exp_avg"].data = torch.zeros(700)
    _set_grads([p], [torch.randn(1000)])
    with pytest.raises((RuntimeError, ValueError), match="700"):
        opt.first_step()
        _set_grads([p], [torch.randn(1000)])
        opt.second_step()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_state_version_counters_are_bumped(backend):
    """A state tensor saved for backward and then updated by a step makes that
    backward raise, as with torch.optim.AdamW (autograd's in-place check)."""
    if backend == "cpu" and "cpu" not in fsam_kernels.available_backends("cpu"):
        pytest.skip("native cpu backend not built")
    p = nn.Parameter(torch.randn(5))
    opt = SAM([p], lr=1e-2, backend=backend)
    _random_steps(opt, [p], 2)
    for key in ("exp_avg", "exp_avg_sq"):
        x = torch.randn(5, requires_grad=True)
        y = (x * opt.state[p][key]).sum()       # saves the state tensor
        _random_steps(opt, [p], 1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
