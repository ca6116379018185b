"""Faults found in review, each checked against an independent computation:

1. Functional-SAM keeps the gradient of loss terms that bypass the model
   output (a weight penalty, a MoE router loss): ĝ = J(θ+e)ᵀ c0 + ∇aux(θ+e),
   and rho=0 equals the base optimizer on the full loss;
2. first_step() sets the grads it consumed to None (a forgotten zero_grad()
   before pass 2 cannot accumulate g(θ) + g(θ+e));
3. hyperparameters changed after construction are validated at every step;
4. a state dict of another optimizer is refused, naming the keys;
5. a parameter on the meta device is refused at construction;
6. SAMTrainer refuses fp16=True on CPU as well.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp

from fsam_kernels import SAM, FunctionalSAM, CotangentRecorder
from helpers import GradSpy

# SPEC §3/§5: with ρ = 0 the fused AdamW equals torch.optim.AdamW to float32
# rounding; float32 tolerances of SPEC §5
F32 = dict(rtol=1e-6, atol=1e-7)
F64 = dict(rtol=1e-10, atol=1e-12)



def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _xy(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 4, generator=g, dtype=dtype), torch.randint(0, 3, (5,), generator=g)


COEF = 10.0


def _reg(params):
    return COEF * sum(p.pow(2).sum() for p in params)


# ----------------------------------------------------------------- 1
@pytest.mark.parametrize("form", ["forward_only", "mark_output"])
def test_regulariser_rho0_equals_adamw(form):
    """rho=0: Functional-SAM on CE + 10·Σ‖p‖² equals torch's AdamW on it."""
    x, y = _xy()
    m, ref = _mlp(), _mlp()
    opt = FunctionalSAM(m.parameters(), lr=1e-2, rho=0.0, backend="reference")
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    for _ in range(3):
        if form == "forward_only":
            opt.step(lambda: (lambda z: (z, F.cross_entropy(z, y) + _reg(m.parameters())))(m(x)))
        else:
            def closure():
                opt.zero_grad()
                z = opt.mark_output(m(x))
                loss = F.cross_entropy(z, y) + _reg(m.parameters())
                loss.backward()
                return loss
            opt.step(closure)
        topt.zero_grad()
        (F.cross_entropy(ref(x), y) + _reg(ref.parameters())).backward()
        topt.step()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F32)


def test_regulariser_rho_positive_equals_torch_func():
    """ĝ = J(θ+e)ᵀ c0 + ∇reg(θ+e), float64, computed with torch.func."""
    x, y = _xy(torch.float64)
    m = _mlp(torch.float64)
    names = [n for n, _ in m.named_parameters()]
    theta = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = FunctionalSAM(m.parameters(), lr=1e-3, rho=0.3, backend="reference")
    spy = GradSpy()
    opt._backends[torch.device("cpu")] = spy
    opt.step(lambda: (lambda z: (z, F.cross_entropy(z, y) + _reg(m.parameters())))(m(x)))
    params = dict(m.named_parameters())
    theta_e = {n: spy.perturbed[params[n]] for n in names}

    def f(ps):
        return functional_call(m, ps, (x,))
    z0 = f({n: t.clone().requires_grad_() for n, t in theta.items()})
    c0 = torch.autograd.grad(F.cross_entropy(z0, y), z0)[0]
    jt_c0 = vjp(f, theta_e)[1](c0)[0]
    g_reg = grad(lambda ps: _reg(ps.values()))(theta_e)
    # the ascent used the full loss's gradient at θ (loose: only its direction
    # matters here, the ascent's scale ρ/(N+ε_n) may be a float32 scalar)
    g1 = grad(lambda ps: F.cross_entropy(f(ps), y) + _reg(ps.values()))(theta)
    n1 = torch.sqrt(sum((g ** 2).sum() for g in g1.values()))
    for n in names:
        torch.testing.assert_close(theta_e[n] - theta[n], 0.3 * g1[n] / (n1 + 1e-12), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(spy.seen[params[n]], jt_c0[n] + g_reg[n], **F64)


def _mixtral(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=10.0,
        max_position_embeddings=16, use_cache=False, experts_implementation="eager")
    return transformers.MixtralForCausalLM(cfg).to(dtype)


IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(5))


def test_mixtral_router_loss_rho0_equals_sgd():
    """A MoE ModelOutput: .logits is z, .loss holds the router loss; at rho=0
    FunctionalSAM(base SGD) equals torch's SGD on out.loss."""
    m = _mixtral()
    ref = copy.deepcopy(m)
    out = m(IDS, labels=IDS)
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0
    opt = FunctionalSAM(m.parameters(), base_optimizer=torch.optim.SGD, lr=0.1, rho=0.0,
                        backend="reference")
    topt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        opt.step(lambda: (lambda o: (o, o.loss))(m(IDS, labels=IDS)))
        topt.zero_grad()
        ref(IDS, labels=IDS).loss.backward()
        topt.step()
    router = [n for n, _ in m.named_parameters() if n.endswith("gate.weight")]
    assert router
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F32, msg=n)


def test_mixtral_router_loss_rho_positive_equals_torch_func():
    """ĝ = J_logits(θ+e)ᵀ c0 + ∇(coef·aux)(θ+e), float64, independently."""
    m = _mixtral(torch.float64)
    names = [n for n, _ in m.named_parameters()]
    theta = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = FunctionalSAM(m.parameters(), lr=1e-3, rho=0.05, backend="reference")
    spy = GradSpy()
    opt._backends[torch.device("cpu")] = spy
    opt.step(lambda: (lambda o: (o, o.loss))(m(IDS, labels=IDS)))
    params = dict(m.named_parameters())
    theta_e = {n: spy.perturbed[params[n]].clone().requires_grad_() for n in names}
    th0 = {n: t.clone().requires_grad_() for n, t in theta.items()}
    out0 = functional_call(m, th0, (IDS,), {"labels": IDS})
    c0 = torch.autograd.grad(out0.loss, out0.logits)[0]
    out1 = functional_call(m, theta_e, (IDS,), {"labels": IDS})
    coef = m.config.router_aux_loss_coef
    ps = [theta_e[n] for n in names]
    jt = torch.autograd.grad(out1.logits, ps, c0, retain_graph=True, allow_unused=True)
    ga = torch.autograd.grad(coef * out1.aux_loss, ps, allow_unused=True)
    nonzero_aux = 0
    for n, a, b in zip(names, jt, ga):
        want = (torch.zeros_like(theta[n]) if a is None else a) + (0 if b is None else b)
        if b is not None and b.abs().max() > 0:
            nonzero_aux += 1
        got = spy.seen.get(params[n])
        if got is None:
            assert a is None and b is None, n
            continue
        # float32 tolerance: transformers' Mixtral router takes its softmax in
        # float32 (routing weights summing both paths' gradients in float32)
        torch.testing.assert_close(got, want, **F32, msg=n)
    assert nonzero_aux > 0           # the router loss does reach parameters


def test_pass2_loss_must_reach_the_output():
    """A pass-2 loss that no longer uses z would lose J(θ+e)ᵀ c0: refused,
    θ restored."""
    x, y = _xy()
    m = _mlp()
    theta = [p.detach().clone() for p in m.parameters()]
    opt = FunctionalSAM(m.parameters(), lr=1e-2, rho=0.1, backend="reference")
    calls = []

    def closure():
        calls.append(1)
        z = m(x)
        if len(calls) == 1:
            return z, F.cross_entropy(z, y)
        return z, _reg(m.parameters())
    with pytest.raises(RuntimeError, match="does not depend on the model output"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(theta, m.parameters()))


# ----------------------------------------------------------------- 2
@pytest.mark.parametrize("cls", [SAM, FunctionalSAM])
def test_first_step_sets_grads_to_none(cls):
    """A manual loop without zero_grad() before pass 2 equals one with it;
    zero_grad=False keeps the pass-1 grads (the old behaviour)."""
    x, y = _xy()
    results = []
    for forget in (False, True):
        m = _mlp()
        opt = cls(m.parameters(), lr=1e-2, rho=0.1, backend="reference")
        rec = CotangentRecorder()
        for _ in range(2):
            opt.zero_grad()
            z = rec.capture(m(x)) if cls is FunctionalSAM else m(x)
            F.cross_entropy(z, y).backward()
            opt.first_step()
            assert all(p.grad is None for p in m.parameters())
            if not forget:
                opt.zero_grad()
            if cls is FunctionalSAM:
                rec.replay(m(x))
            else:
                F.cross_entropy(m(x), y).backward()
            opt.second_step()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    m = _mlp()
    opt = cls(m.parameters(), lr=1e-2, rho=0.1, backend="reference")
    F.cross_entropy(m(x), y).backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    opt.first_step(zero_grad=False)
    for p, g in zip(m.parameters(), g1):
        assert torch.equal(p.grad, g)
    opt.restore()


# ----------------------------------------------------------------- 3
@pytest.mark.parametrize("key,value,exc,match", [
    ("rho", -0.5, ValueError, r"first_step: param_groups\[0\]\.rho"),
    ("betas", (1.0, 0.999), ValueError, r"param_groups\[0\]\.betas\[0\]"),
    ("lr", torch.tensor(0.01), TypeError, r"param_groups\[0\]\.lr.*Tensor"),
    ("eps", float("nan"), ValueError, r"param_groups\[0\]\.eps"),
])
def test_hyperparameters_set_later_are_validated_at_first_step(key, value, exc, match):
    x, y = _xy()
    m = _mlp()
    opt = SAM(m.parameters(), lr=1e-2, backend="reference")
    theta = [p.detach().clone() for p in m.parameters()]
    opt.param_groups[0][key] = value
    with pytest.raises(exc, match=match):
        opt.step(lambda: (lambda z: (z, F.cross_entropy(z, y)))(m(x)))
    assert opt._perturbed is None
    assert all(torch.equal(a, b) for a, b in zip(theta, m.parameters()))
    assert not opt.state          # no moment was touched


def test_hyperparameters_validated_at_second_step_and_base_mode():
    x, y = _xy()
    m = _mlp()
    opt = SAM(m.parameters(), lr=1e-2, rho=0.1, backend="reference")
    F.cross_entropy(m(x), y).backward()
    opt.first_step()
    perturbed = [p.detach().clone() for p in m.parameters()]
    F.cross_entropy(m(x), y).backward()
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"second_step: param_groups\[0\]\.lr"):
        opt.second_step()
    assert opt._perturbed is not None          # still pending, nothing changed
    assert all(torch.equal(a, b) for a, b in zip(perturbed, m.parameters()))
    opt.param_groups[0]["lr"] = 1e-2
    opt.second_step()
    mb = _mlp()
    ob = SAM(mb.parameters(), base_optimizer=torch.optim.SGD, lr=0.1, backend="reference")
    ob.param_groups[0]["rho"] = -0.5
    with pytest.raises(ValueError, match=r"param_groups\[0\]\.rho"):
        ob.step(lambda: (lambda z: (z, F.cross_entropy(z, y)))(mb(x)))


# ----------------------------------------------------------------- 4
def test_foreign_state_dict_refused_naming_keys():
    m = _mlp()
    opt = SAM(m.parameters(), lr=1e-3, backend="reference")
    sgd = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match=r"lacks \['betas', 'eps', 'precondition', 'rho'\]"
                                         r".*foreign keys \[.*'momentum'"):
        opt.load_state_dict(sgd)
    assert opt.param_groups[0]["lr"] == 1e-3 and "momentum" not in opt.param_groups[0]
    ob = SAM(m.parameters(), base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9,
             backend="reference")
    adamw = torch.optim.AdamW(m.parameters()).state_dict()
    with pytest.raises(ValueError, match=r"lacks \[.*'momentum'.*'rho'\].*foreign keys "
                                         r"\[.*'betas'"):
        ob.load_state_dict(adamw)
    # a plain SGD state dict lacks rho/precondition for the SGD-based SAM
    with pytest.raises(ValueError, match=r"lacks \['precondition', 'rho'\]"):
        ob.load_state_dict(sgd)
    # its own state dicts load, also after an lr scheduler added initial_lr
    x, y = _xy()
    for o in (opt, ob):
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5)
        o.step(lambda: (lambda z: (z, F.cross_entropy(z, y)))(m(x)))
        sd = o.state_dict()
        assert "initial_lr" in sd["param_groups"][0]
        fresh = (SAM(m.parameters(), lr=1e-3, backend="reference") if o is opt else
                 SAM(m.parameters(), base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9,
                     backend="reference"))
        fresh.load_state_dict(sd)
        assert fresh.param_groups[0]["lr"] == o.param_groups[0]["lr"]


# ----------------------------------------------------------------- 5
def test_meta_parameter_refused_naming_it():
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(2, 3, device="meta"))
    with pytest.raises(ValueError, match=r"group 0 item 1 \(shape \(2, 3\)\).*'meta'"):
        SAM([a, b])
    opt = FunctionalSAM([a])
    with pytest.raises(ValueError, match=r"group 1 item 0 .*'meta'"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1


# ----------------------------------------------------------------- 6
def test_sam_trainer_refuses_fp16_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from fsam_kernels.integrations.hf import SAMTrainer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=4, n_embd=8, n_layer=1,
                                       n_head=2, use_cache=False))
    ids = torch.randint(0, 16, (4, 4))
    ds = [{"input_ids": r, "labels": r} for r in ids]
    try:
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                 max_steps=1, fp16=True, use_cpu=True, report_to=[],
                                 save_strategy="no", disable_tqdm=True)
    except ValueError as exc:          # a transformers version refusing it itself
        pytest.skip(f"TrainingArguments refuses fp16 on CPU: {exc}")
    theta = [p.detach().clone() for p in model.parameters()]
    tr = SAMTrainer(model=model, args=args, train_dataset=ds,
                    optimizers=(SAM(model.parameters(), backend="reference"), None))
    with pytest.raises(ValueError, match=r"fp16=True"):
        tr.train()
    assert all(torch.equal(a, b) for a, b in zip(theta, model.parameters()))
