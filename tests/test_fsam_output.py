"""What Functional-SAM takes as the model output (issue 10, "wrong results" 2).

The cotangent is taken on the model output only: an explicit selector
(``FunctionalSAM(output=...)``, ``CotangentRecorder(output=...)``), the
``.logits`` of a transformers ModelOutput, and outputs that contain the loss
or depend on one another are refused. The selected gradient is checked
against an independent torch.func J(θ+e)ᵀ c0 in float64.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp

from fsam_kernels import CotangentRecorder, FunctionalSAM
from helpers import GradSpy
from fsam_kernels.cotangent import is_model_output, select_output


class FakeModelOutput(dict):
    """Stands in for transformers' ModelOutput (a dict subclass of that name
    in a transformers module) when transformers is not installed."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


FakeModelOutput.__name__ = "ModelOutput"
FakeModelOutput.__module__ = "transformers.utils.generic"


class WithLogits:
    """A non-container output object carrying ``.logits`` (and a loss)."""

    def __init__(self, logits, loss):
        self.logits, self.loss = logits, loss


def _model():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 6)).double()


X = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 6, (8,), generator=torch.Generator().manual_seed(2))


def _step(model, closure, **kw):
    opt = FunctionalSAM(model.parameters(), lr=1e-3, rho=0.3, backend="reference", **kw)
    spy = GradSpy()
    opt._backends[torch.device("cpu")] = spy
    opt.step(closure)
    return opt, spy


def _independent(model, theta, theta_e):
    """J(θ+e)ᵀ c0 with torch.func, c0 = ∂CE/∂z at θ (float64)."""
    def f(params):
        return functional_call(model, params, (X,))
    z0 = f({n: t.clone().requires_grad_() for n, t in theta.items()})
    c0 = torch.autograd.grad(F.cross_entropy(z0, Y), z0)[0]
    _, pull = vjp(f, theta_e)
    return pull(c0)[0]


def _check_against_func(model, closure, **kw):
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, spy = _step(model, closure, **kw)
    params = dict(model.named_parameters())
    theta_e = {n: spy.perturbed[params[n]] for n in names}
    want = _independent(model, theta, theta_e)
    for n in names:
        torch.testing.assert_close(spy.seen[params[n]], want[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["fake_model_output", "logits_attr", "selector_key",
                                  "selector_index", "selector_callable", "tensor"])
def test_selected_logits_gradient_equals_torch_func(kind):
    model = _model()
    kw = {}

    def closure():
        z = model(X)
        loss = F.cross_entropy(z, Y)
        if kind == "fake_model_output":
            return FakeModelOutput(loss=loss, logits=z), loss
        if kind == "logits_attr":
            return WithLogits(z, loss), loss
        if kind == "selector_key":
            return {"loss": loss, "logits": z}, loss
        if kind == "selector_index":
            return (loss, z), loss
        if kind == "selector_callable":
            return {"out": [z, loss]}, loss
        return z, loss
    kw = {"selector_key": {"output": "logits"}, "selector_index": {"output": 1},
          "selector_callable": {"output": lambda o: o["out"][0]}}.get(kind, {})
    _check_against_func(model, closure, **kw)


def test_real_transformers_model_output():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 32, (2, 8))
    out = m(input_ids=ids, labels=ids, use_cache=False)
    assert is_model_output(out) and select_output(out) is out.logits
    results = []
    for form in ("model_output", "logits", "model_output_with_cache"):
        mm = copy.deepcopy(m)
        opt = FunctionalSAM(mm.parameters(), lr=1e-3, rho=0.1, backend="reference")
        spy = GradSpy()
        opt._backends[torch.device("cpu")] = spy

        def closure():
            o = mm(input_ids=ids, labels=ids, use_cache=form.endswith("cache"))
            return (o.logits if form == "logits" else o), o.loss
        opt.step(closure)
        results.append([spy.seen[p] for p in mm.parameters() if p in spy.seen])
    for r in results[1:]:
        for a, b in zip(results[0], r):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_refused_outputs():
    model = _model()

    def run(closure, **kw):
        theta = [p.detach().clone() for p in model.parameters()]
        opt = FunctionalSAM(model.parameters(), lr=1e-3, rho=0.3, backend="reference", **kw)
        try:
            opt.step(closure)
        finally:
            # refused in pass 1: nothing perturbed, nothing updated
            assert opt._perturbed is None
            for p, t in zip(model.parameters(), theta):
                assert torch.equal(p.detach(), t)

    def loss_loss():
        loss = F.cross_entropy(model(X), Y)
        return loss, loss
    with pytest.raises(ValueError, match="closure output.*is the loss itself"):
        run(loss_loss)

    def dict_with_loss():
        z = model(X)
        loss = F.cross_entropy(z, Y)
        return {"loss": loss, "logits": z}, loss
    with pytest.raises(ValueError, match=r"closure output\['loss'\] is the loss itself"):
        run(dict_with_loss)

    def dict_with_loss_term():               # the returned loss is computed from it
        z = model(X)
        loss = F.cross_entropy(z, Y)
        return {"loss": loss, "logits": z}, loss + 0.0
    with pytest.raises(ValueError, match=r"closure output\['loss'\].*0-d tensor.*output='logits'"):
        run(dict_with_loss_term)

    def dependent():
        z = model(X)
        z2 = z * 2.0 + 1.0                 # computed from z; the loss uses both
        return (z, z2), F.cross_entropy(z, Y) + F.cross_entropy(z2, Y)
    with pytest.raises(ValueError, match=r"closure output\[1\] is computed from closure output\[0\]"):
        run(dependent)

    def same_twice():
        z = model(X)
        return (z, z), F.cross_entropy(z, Y)
    with pytest.raises(ValueError, match="same tensor"):
        run(same_twice)

    def through_view():
        z = model(X)
        v = z.view(-1)
        return {"z": z, "v": v}, F.cross_entropy(z, Y) + v.square().sum()
    with pytest.raises(ValueError, match="computed from"):
        run(through_view)

    with pytest.raises(KeyError, match="output= 'logits': closure output has no such key"):
        run(lambda: (lambda z: ({"z": z}, F.cross_entropy(z, Y)))(model(X)), output="logits")
    with pytest.raises(TypeError, match="output: expected None"):
        FunctionalSAM(model.parameters(), output=2.5)
    with pytest.raises(TypeError, match="output: expected None"):
        CotangentRecorder(output=[0])


def test_independent_outputs_still_allowed():
    """Two outputs of one node (split) are not computed one from the other."""
    model = _model()

    def closure():
        z = model(X)
        a, b = z.split(3, dim=1)
        return (a, b), F.cross_entropy(torch.cat([a, b], 1), Y)
    _check_against_func(model, closure)


def test_recorder_refuses_loss_and_applies_rule():
    model = _model()
    opt = FunctionalSAM(model.parameters(), lr=1e-3, rho=0.3, backend="reference")
    rec = CotangentRecorder()
    z = model(X)
    loss = F.cross_entropy(z, Y)
    rec.capture({"logits": z, "loss": loss})
    loss.backward()
    with pytest.raises(ValueError, match="0-d tensor"):
        rec.check()
    with pytest.raises(ValueError, match="0-d tensor"):
        rec.replay({"logits": z, "loss": loss})
    # the ModelOutput rule and an explicit selector in the recorder
    for r, wrap in ((CotangentRecorder(), lambda z, l: FakeModelOutput(logits=z, loss=l)),
                    (CotangentRecorder(output="logits"), lambda z, l: {"logits": z, "loss": l})):
        opt.zero_grad()
        z = model(X)
        loss = F.cross_entropy(z, Y)
        r.capture(wrap(z, loss))
        loss.backward()
        g1 = [p.grad.clone() for p in model.parameters()]
        opt.zero_grad()
        z = model(X)
        r.replay(wrap(z, F.cross_entropy(z, Y)))
        # at θ (no first_step) J(θ)ᵀ c0 is the plain gradient
        for p, g in zip(model.parameters(), g1):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_cache_hint():
    class DynamicCache:
        pass

    model = _model()
    opt = FunctionalSAM(model.parameters(), lr=1e-3, rho=0.3, backend="reference")

    def closure():
        z = model(X)
        return {"h": z, "past_key_values": DynamicCache()}, F.cross_entropy(z, Y)
    with pytest.raises(TypeError, match="use_cache=False"):
        opt.step(closure)


# ------------------------------------------ pass counts and stale records (review)
_CHUNKS = [slice(0, 3), slice(3, 6), slice(6, 8)]


def _opt_with_spy(model):
    opt = FunctionalSAM(model.parameters(), lr=1e-3, rho=0.3, backend="reference")
    spy = GradSpy()
    opt._backends[torch.device("cpu")] = spy
    return opt, spy


def _check_pass2(model, theta, spy):
    params = dict(model.named_parameters())
    want = _independent(model, theta, {n: spy.perturbed[p] for n, p in params.items()})
    for n, p in params.items():
        torch.testing.assert_close(spy.seen[p], want[n], rtol=1e-10, atol=1e-12)


def _loss(z, s):      # micro-batch share of the full batch's mean cross-entropy
    return F.cross_entropy(z, Y[s], reduction="sum") / len(Y)


def test_recorder_with_optimizer_refuses_fewer_replays():
    """CotangentRecorder(optimizer=): 3 captures, 2 replays: second_step()
    raises and changes nothing; a wrong-shaped replay keeps its record; the
    completed step's pass-2 gradient is torch.func's J(θ+e)ᵀ c0."""
    model = _model()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, spy = _opt_with_spy(model)
    rec = CotangentRecorder(optimizer=opt)
    for s in _CHUNKS:
        _loss(rec.capture(model(X[s])), s).backward()
    opt.first_step()
    for s in _CHUNKS[:2]:
        rec.replay(model(X[s]))
    at = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"second_step: 1 record\(s\) captured in pass 1"):
        opt.second_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), at))
    assert opt._perturbed is not None and not spy.seen
    with pytest.raises(RuntimeError, match="has shape"):
        rec.replay(model(X[:1]))
    assert len(rec) == 1                     # kept: the retry below works
    rec.replay(model(X[_CHUNKS[2]]))
    opt.second_step()
    _check_pass2(model, theta, spy)


def test_recorder_records_belong_to_their_step():
    model = _model()
    opt, _ = _opt_with_spy(model)
    rec = CotangentRecorder(optimizer=opt)
    for s in _CHUNKS:
        _loss(rec.capture(model(X[s])), s).backward()
    opt.first_step()
    for s in _CHUNKS[:2]:
        rec.replay(model(X[s]))
    opt.restore()                            # the step abandoned, one record left
    with pytest.raises(RuntimeError, match=r"capture: 1 record\(s\) of an earlier pass 1"):
        rec.capture(model(X[:3]))
    F.cross_entropy(model(X), Y).backward()  # a step of its own, not recorded
    opt.first_step()
    with pytest.raises(RuntimeError, match="made in the pass 1 of an earlier step"):
        rec.replay(model(X[_CHUNKS[2]]))
    with pytest.raises(RuntimeError, match="first_step.. is pending"):
        rec.capture(model(X[:3]))
    opt.restore()
    with pytest.raises(RuntimeError, match="no first_step"):
        rec.replay(model(X[_CHUNKS[2]]))
    with pytest.raises(TypeError, match="optimizer: expected a fsam_kernels optimizer"):
        CotangentRecorder(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_recorder_without_optimizer_refuses_a_new_pass_with_records_left():
    model = _model()
    rec = CotangentRecorder()
    for s in _CHUNKS:
        _loss(rec.capture(model(X[s])), s).backward()
    for s in _CHUNKS[:2]:
        rec.replay(model(X[s]))
    with pytest.raises(RuntimeError, match=r"CotangentRecorder.capture: 1 record\(s\) of an "
                                           r"earlier pass 1 were never replayed"):
        rec.capture(model(X[:3]))
    assert len(rec) == 1
    rec.clear()
    rec.capture(model(X[:3]))                # a fresh pass after clear()
    assert len(rec) == 1


def test_mark_output_hand_loop_refuses_fewer_marks():
    model = _model()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, spy = _opt_with_spy(model)
    for s in _CHUNKS:
        _loss(opt.mark_output(model(X[s])), s).backward()
    opt.first_step()
    for s in _CHUNKS[:2]:
        _loss(opt.mark_output(model(X[s])), s).backward()
    at = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"1 output\(s\) marked with mark_output\(\) in pass 1"):
        opt.second_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), at))
    _loss(opt.mark_output(model(X[_CHUNKS[2]])), _CHUNKS[2]).backward()
    opt.second_step()
    _check_pass2(model, theta, spy)


def test_old_module_name_functional_gives_the_cotangent_objects():
    """fsam_kernels.functional (the module's former name) re-exports
    fsam_kernels.cotangent: every name, private helpers and module state
    included, is the very same object; unknown names still raise."""
    import importlib

    import fsam_kernels
    import fsam_kernels.cotangent as new
    import fsam_kernels.functional as old
    from fsam_kernels.functional import CotangentRecorder as OldRecorder
    from fsam_kernels.functional import _stale_capture_error, register_recorder

    assert OldRecorder is new.CotangentRecorder is fsam_kernels.CotangentRecorder
    assert register_recorder is new.register_recorder
    assert _stale_capture_error is new._stale_capture_error
    assert old.__all__ == new.__all__ == ["CotangentRecorder", "flatten_output", "select_output",
                                          "is_model_output"]
    names = [n for n in vars(new) if not (n.startswith("__") and n.endswith("__"))]
    assert {"_REGISTRY", "check_unreplayed", "step_generation", "check_selector"} <= set(names)
    for n in names:
        assert getattr(old, n) is getattr(new, n), n
    assert set(names) <= set(dir(old))
    star: dict = {}
    exec("from fsam_kernels.functional import *", star)
    assert {n for n in star if n != "__builtins__"} == set(new.__all__)
    assert all(star[n] is getattr(new, n) for n in new.__all__)
    with pytest.raises(AttributeError, match="'fsam_kernels.functional'.*no attribute 'nope'"):
        old.nope  # noqa: B018
    assert importlib.import_module("fsam_kernels.functional") is old


def test_functional_sam_manual_loop_without_replay_warns_once():
    """A hand-written FunctionalSAM loop whose pass 2 used none of the library's
    cotangent mechanisms (an ordinary loss.backward() would make it plain SAM;
    a user's own z1.backward(c0) is right) warns once per optimizer; with a
    recorder replay (bound to the optimizer or to none) it does not warn."""
    import warnings

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)

    def plain_step(opt):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.first_step()
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.second_step()

    opt = FunctionalSAM(net.parameters(), lr=1e-2, rho=0.1, backend="reference")
    with pytest.warns(UserWarning, match="used no recorded cotangent.*plain SAM"):
        plain_step(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain_step(opt)                               # once per optimizer
        for rec_opt in (opt, None):
            opt2 = FunctionalSAM(net.parameters(), lr=1e-2, rho=0.1, backend="reference")
            rec = CotangentRecorder(optimizer=opt2) if rec_opt is not None else CotangentRecorder()
            opt2.zero_grad()
            z = rec.capture(net(x))
            ((z - y) ** 2).mean().backward()
            opt2.first_step()
            opt2.zero_grad()
            rec.replay(net(x))
            opt2.second_step()                        # no warning
