"""The fused linear cross-entropy head (issue 11): loss and gradients against
torch's own ``F.cross_entropy`` over the full logits; Functional-SAM and SAM
through the head against the plain path (``CotangentRecorder`` over full
logits) and against an independent torch.func J(θ+e)ᵀ c0; bad input; the
Triton kernels against the PyTorch implementation under the interpreter.

Tolerances. float32: the fused and the plain path sum the same products in
another order (chunks over tokens, the softmax formed per chunk), so results
agree to a few hundred float32 ulps of the largest gradient entry:
``rtol = atol/max|g| = 256 · 2⁻²³ ≈ 3e-5``. bf16 autocast: both paths round the
matmul operands and the cotangent to bfloat16 (2⁻⁸ relative), but at other
points (per-chunk partial sums of grad W are rounded to bfloat16 before they
are added in float32; the plain path rounds the full sum once), so they agree
to a few bfloat16 ulps of the largest entry: ``8 · 2⁻⁸ ≈ 0.03`` of max|g|.
float64 checks against torch.func: 1e-10 relative (float64 rounding).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp

from fsam_kernels import SAM, CotangentRecorder, FunctionalSAM
from helpers import GradSpy
from fsam_kernels.heads import (FusedLinearCrossEntropy, HeadRecorder,
                                fused_linear_cross_entropy)

F32_TOL = 256 * 2.0 ** -23
BF16_TOL = 8 * 2.0 ** -8


def _close(a, b, tol):
    scale = max(float(b.detach().abs().max()), 1e-30)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


# ----------------------------------------------------------- loss and grads
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_loss_and_grads_equal_cross_entropy(reduction, dtype, chunk_size):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 50, (3, 7))
    y[0, ::3] = -100
    loss = fused_linear_cross_entropy(h, w, y, reduction=reduction, chunk_size=chunk_size)
    ref = F.cross_entropy((h @ w.T).flatten(0, 1), y.flatten(), reduction=reduction)
    tol = F32_TOL if dtype == torch.float32 else 1e-12
    _close(loss, ref, tol)
    g = torch.autograd.grad(2.5 * loss, (h, w))
    gr = torch.autograd.grad(2.5 * ref, (h, w))
    for a, b in zip(g, gr):
        _close(a, b, tol)
    with torch.no_grad():              # no grad: the forward alone
        _close(fused_linear_cross_entropy(h, w, y, reduction=reduction), ref.detach(), tol)


def test_float16_path_and_all_ignored():
    """float16 recomputes in the backward (its cotangent needs the upstream
    scale before rounding); all tokens ignored gives nan, as torch does."""
    torch.manual_seed(1)
    h = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    y = torch.randint(0, 30, (12,))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = fused_linear_cross_entropy(h, w, y, chunk_size=4)
        ref = F.cross_entropy(F.linear(h, w).float(), y)
    _close(loss, ref, 2 ** -10 * 8)
    g = torch.autograd.grad(1024 * loss, (h, w))
    gr = torch.autograd.grad(1024 * ref, (h, w))
    for a, b in zip(g, gr):
        _close(a, b, 8 * 2 ** -10)
    yy = torch.full((12,), -100)
    assert torch.isnan(fused_linear_cross_entropy(h, w, yy))
    assert torch.isnan(F.cross_entropy(h @ w.T, yy))


def test_bf16_autocast_loss_and_grads():
    torch.manual_seed(2)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    y = torch.randint(0, 64, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, y, chunk_size=8)
        ref = F.cross_entropy(F.linear(h, w).float(), y)
    assert loss.dtype == torch.float32
    _close(loss, ref, BF16_TOL)
    for a, b in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        _close(a, b, BF16_TOL)


def test_bad_input():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    head = FusedLinearCrossEntropy(w)
    with pytest.raises(ValueError, match=r"labels: value 10 is outside \[0, 10\)"):
        head(h, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="labels: value -3"):
        head(h, torch.tensor([0, -3, 1, 2]))
    head(h, torch.tensor([0, -100, 1, 2]))                      # ignore_index is fine
    with pytest.raises(ValueError, match="hidden: last dimension"):
        head(torch.randn(4, 7), y)
    with pytest.raises(ValueError, match="labels: shape"):
        head(h, y[:3])
    with pytest.raises(TypeError, match="labels: expected an integer"):
        head(h, y.float())
    with pytest.raises(TypeError, match="hidden, weight: dtypes differ"):
        head(h.double(), y)
    with pytest.raises(TypeError, match="weight: expected a 2-D"):
        fused_linear_cross_entropy(h, torch.randn(10), y)
    with pytest.raises(ValueError, match="reduction"):
        FusedLinearCrossEntropy(w, reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearCrossEntropy(w, chunk_size=0)
    with pytest.raises(TypeError, match="bias"):
        FusedLinearCrossEntropy(nn.Linear(8, 10))
    with pytest.raises(TypeError, match="weight: expected a module"):
        FusedLinearCrossEntropy(3)


# ------------------------------------------------------------ tiny model
class TinyLM(nn.Module):
    """Embedding → tanh MLP with a residual → LayerNorm → head (tied or not)."""

    def __init__(self, vocab=40, d=16, tied=True, dtype=torch.float32, impl="torch"):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.head = FusedLinearCrossEntropy(self.lm_head, chunk_size=7, impl=impl)
        self.to(dtype)

    def hidden(self, x):
        e = self.embed(x)
        return self.ln(e + torch.tanh(self.fc(e)))

    def forward(self, x):
        return self.lm_head(self.hidden(x))



def _batches(n_micro, vocab=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_micro):
        x = torch.randint(0, vocab, (2, 6), generator=g)
        y = torch.randint(0, vocab, (2, 6), generator=g)
        y[0, :2] = -100
        out.append((x, y))
    return out


def _run(model, cls, precondition, head, batches, amp, steps=2):
    """``steps`` optimizer steps; returns the last step's pass-2 grads (by name)."""
    opt = cls(model.parameters(), lr=1e-2, rho=0.2, precondition=precondition,
              backend="reference")
    spy = GradSpy()
    opt._backends[torch.device("cpu")] = spy
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else torch.enable_grad
    k = len(batches)
    functional = cls is FunctionalSAM
    for _ in range(steps):
        if k == 1:
            (x, y), = batches

            def closure():
                with ctx():
                    if head == "fused":
                        out = model.head(model.hidden(x), y)
                        return out, out.loss
                    z = model(x)
                return z, F.cross_entropy(z.flatten(0, 1).float(), y.flatten())
            opt.step(closure)
            continue
        rec = (HeadRecorder(opt) if head == "fused" else CotangentRecorder()) if functional else None
        opt.zero_grad()
        for x, y in batches:
            with ctx():
                if head == "fused":
                    out = model.head(model.hidden(x), y)
                    if rec is not None:
                        rec.capture(out)
                    loss = out.loss
                else:
                    z = model(x)
                    if rec is not None:
                        rec.capture(z)
                    loss = F.cross_entropy(z.flatten(0, 1).float(), y.flatten())
            (loss / k).backward()
        opt.first_step()
        opt.zero_grad()
        for x, y in batches:
            with ctx():
                if head == "fused":
                    h1 = model.hidden(x)
                    if rec is not None:
                        rec.replay(h1, y)          # labels checked against the record
                    else:
                        (model.head(h1, y).loss / k).backward()
                else:
                    z = model(x)
                    if rec is not None:
                        rec.replay(z)
                    else:
                        (F.cross_entropy(z.flatten(0, 1).float(), y.flatten()) / k).backward()
        opt.second_step()
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: g for p, g in spy.seen.items()}, model


@pytest.mark.parametrize("cls", [FunctionalSAM, SAM])
@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_pass2_grads_equal_plain_path(cls, precondition, tied, micro, amp):
    torch.manual_seed(11)
    base = TinyLM(tied=tied)
    batches = _batches(micro)
    # bf16: one step (the grads are compared at the same θ; a second step would
    # start from parameters that differ by AdamW's ±lr on near-zero grads whose
    # sign bf16 rounding decides); float32: two steps (state and step 2 too)
    steps = 1 if amp else 2
    g_fused, m_fused = _run(copy.deepcopy(base), cls, precondition, "fused", batches, amp, steps)
    g_plain, m_plain = _run(copy.deepcopy(base), cls, precondition, "plain", batches, amp, steps)
    tol = BF16_TOL if amp else F32_TOL
    assert set(g_fused) == set(g_plain) == {n for n, _ in base.named_parameters()}
    for n in g_plain:
        _close(g_fused[n], g_plain[n], tol)
    if not amp:
        for (n, a), (_, b) in zip(m_fused.named_parameters(), m_plain.named_parameters()):
            _close(a, b, tol)


def test_fsam_and_sam_pass2_differ_through_head():
    """The head's Functional-SAM product is not the SAM gradient (so the
    comparison above can tell them apart)."""
    torch.manual_seed(12)
    base = TinyLM(tied=True)
    batches = _batches(1)
    g_f, _ = _run(copy.deepcopy(base), FunctionalSAM, False, "fused", batches, False, steps=1)
    g_s, _ = _run(copy.deepcopy(base), SAM, False, "fused", batches, False, steps=1)
    assert max(float((g_f[n] - g_s[n]).abs().max()) for n in g_f) > 1e-4


def test_grad_scaler_fsam_equals_plain():
    """fp16 GradScaler through step(closure): the head's c0 carries the scale
    exactly as the plain path's recorded cotangent does."""
    torch.manual_seed(13)
    base = TinyLM(tied=True)
    (x, y), = _batches(1)
    results = []
    for head in ("fused", "plain"):
        m = copy.deepcopy(base)
        opt = FunctionalSAM(m.parameters(), lr=1e-2, rho=0.2, backend="reference")
        spy = GradSpy()
        opt._backends[torch.device("cpu")] = spy
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)

        def closure():
            if head == "fused":
                out = m.head(m.hidden(x), y)
                return out, out.loss
            z = m(x)
            return z, F.cross_entropy(z.flatten(0, 1), y.flatten())
        opt.step(closure, grad_scaler=scaler)
        scaler.update()
        results.append({id(p): spy.seen[p] for p in m.parameters()})
        results.append(list(m.parameters()))
    for pa, pb in zip(results[1], results[3]):
        # grads are still scaled when the spy sees them (the kernels unscale)
        _close(results[0][id(pa)], results[2][id(pb)], F32_TOL)
        _close(pa, pb, F32_TOL)


# -------------------------------------------------- independent torch.func
@pytest.mark.parametrize("tied", [True, False])
def test_head_vjp_equals_torch_func(tied):
    """J(θ+e)ᵀ c0 through the fused head equals torch.func's vjp of the full
    logits at θ+e with c0 = ∂ℓ/∂z(θ) (float64, independent of the optimizer)."""
    torch.manual_seed(14)
    model = TinyLM(tied=tied, dtype=torch.float64)
    (x, y), = _batches(1)
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = FunctionalSAM(model.parameters(), lr=1e-2, rho=0.3, backend="reference")
    rec = HeadRecorder(opt)
    out = rec.capture(model.head(model.hidden(x), y))
    (0.5 * out.loss).backward()
    opt.first_step()
    theta_e = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    rec.replay(model.hidden(x))
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.restore()

    def logits(params):
        return functional_call(model, params, (x,))
    z0 = logits({n: t.clone().requires_grad_() for n, t in theta.items()})
    c0 = torch.autograd.grad(0.5 * F.cross_entropy(z0.flatten(0, 1), y.flatten()), z0)[0]
    _, pullback = vjp(logits, theta_e)
    want = pullback(c0)[0]
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)
    # and it is not the plain gradient at θ+e (the test can fail)
    g_sam = grad(lambda p: 0.5 * F.cross_entropy(logits(p).flatten(0, 1), y.flatten()))(theta_e)
    assert max(float((g_sam[n] - want[n]).abs().max()) for n in names) > 1e-6


# --------------------------------------------------------- protocol errors
def test_recorder_errors():
    torch.manual_seed(15)
    model = TinyLM()
    (x, y), = _batches(1)
    opt = FunctionalSAM(model.parameters(), lr=1e-2, rho=0.1, backend="reference")
    with pytest.raises(TypeError, match="optimizer"):
        HeadRecorder(object())
    rec = HeadRecorder(opt)
    with pytest.raises(RuntimeError, match="no record left"):
        rec.replay(model.hidden(x))
    with pytest.raises(TypeError, match="out: expected the HeadOutput"):
        rec.capture(model(x))
    # a head weight that is not among the optimizer's parameters
    other = FunctionalSAM([model.fc.weight], lr=1e-2, rho=0.1, backend="reference")
    with pytest.raises(ValueError, match="weight: the head weight"):
        HeadRecorder(other).capture(model.head(model.hidden(x), y))
    # captured, but pass-1 backward not run: refused, and the record kept
    rec.capture(model.head(model.hidden(x), y))
    with pytest.raises(RuntimeError, match="received no gradient"):
        rec.replay(model.hidden(x))
    assert len(rec) == 1
    rec.clear()
    # replay with no first_step pending
    out = rec.capture(model.head(model.hidden(x), y))
    out.loss.backward()
    with pytest.raises(RuntimeError, match="no first_step"):
        rec.replay(model.hidden(x))
    assert len(rec) == 1
    opt.first_step()
    # a wrong pass-2 shape is refused before the record is removed: a retry works
    with pytest.raises(ValueError, match="hidden: pass-2 hidden states have shape"):
        rec.replay(model.hidden(x[:1]))
    assert len(rec) == 1
    with pytest.raises(TypeError, match="hidden: pass-2 dtype"):
        rec.replay(model.hidden(x).double())
    assert len(rec) == 1
    rec.replay(model.hidden(x))
    assert len(rec) == 0
    with pytest.raises(RuntimeError, match="no record left"):
        rec.replay(model.hidden(x))
    # capture in pass 2 (a first_step pending) is refused
    with pytest.raises(RuntimeError, match=r"first_step\(\) is pending"):
        rec.capture(model.head(model.hidden(x), y))
    opt.restore()


def test_narrow_integer_labels_equal_int64():
    """uint8 / int16 / int32 / uint16 labels (values that fit the type, V larger than its
    range) give the int64 result; out-of-range values are still named."""
    torch.manual_seed(3)
    for dtype, v, vals in ((torch.uint8, 300, [1, 2, 255]), (torch.int16, 40000, [1, 32767, 7]),
                           (torch.int8, 200, [1, 127, 0]), (torch.int32, 50, [0, 49, 3]),
                           (torch.uint16, 70000, [1, 65535, 9])):
        h = torch.randn(3, 4, dtype=torch.float64)
        w = torch.randn(v, 4, dtype=torch.float64)
        y = torch.tensor(vals, dtype=dtype)
        ref = F.cross_entropy(h @ w.T, y.long())
        got = fused_linear_cross_entropy(h, w, y, chunk_size=64)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0, msg=str(dtype))
    with pytest.raises(ValueError, match=r"labels: value 255 is outside \[0, 200\)"):
        fused_linear_cross_entropy(torch.randn(2, 4), torch.randn(200, 4),
                                   torch.tensor([1, 255], dtype=torch.uint8))


def test_replay_order_checked_with_labels():
    """Micro-batches replayed in another order than pass 1's (equal shapes) raise when
    replay() gets the labels, before the record is removed; in order they pass."""
    torch.manual_seed(16)
    model = TinyLM()
    batches = _batches(2)
    assert not torch.equal(batches[0][1], batches[1][1])
    opt = FunctionalSAM(model.parameters(), lr=1e-2, rho=0.1, backend="reference")
    rec = HeadRecorder(opt)
    assert rec and CotangentRecorder()      # truthy even when empty (`if rec:` is safe)
    for x, y in batches:
        (rec.capture(model.head(model.hidden(x), y)).loss / 2).backward()
    opt.first_step()
    opt.zero_grad()
    (x1, y1) = batches[1]
    with pytest.raises(ValueError, match="labels: the pass-2 labels differ"):
        rec.replay(model.hidden(x1), y1)
    assert len(rec) == 2
    for x, y in batches:
        rec.replay(model.hidden(x), y)
    assert len(rec) == 0
    opt.second_step()


def test_computed_head_weight_is_explained():
    """A head weight computed from a parameter (muP-style scale) cannot give
    Functional-SAM its backup: the error says it is a computed tensor."""
    torch.manual_seed(17)
    model = TinyLM()
    (x, y), = _batches(1)
    opt = FunctionalSAM(model.parameters(), lr=1e-2, rho=0.1, backend="reference")
    head = FusedLinearCrossEntropy(lambda: model.lm_head.weight * 0.5)
    with pytest.raises(ValueError, match="weight: .*computed tensor, made by MulBackward0"):
        HeadRecorder(opt).capture(head(model.hidden(x), y))


def test_closure_errors():
    torch.manual_seed(16)
    model = TinyLM()
    (x, y), = _batches(1)
    opt = FunctionalSAM(model.parameters(), lr=1e-2, rho=0.1, backend="reference")
    theta = [p.detach().clone() for p in model.parameters()]

    def no_dep():
        out = model.head(model.hidden(x), y)
        return out, model.fc.weight.square().sum()
    with pytest.raises(ValueError, match="does not depend on the head's output"):
        opt.step(no_dep)
    calls = [0]

    def other_pass2():
        calls[0] += 1
        if calls[0] == 2:
            z = model(x)
            return z, F.cross_entropy(z.flatten(0, 1), y.flatten())
        out = model.head(model.hidden(x), y)
        return out, out.loss
    with pytest.raises(ValueError, match="must call the same"):
        opt.step(other_pass2)
    for p, t in zip(model.parameters(), theta):
        assert torch.equal(p.detach(), t)          # restored
    # the head's stand-in is consumed: the next step works normally
    opt.step(lambda: (lambda o: (o, o.loss))(model.head(model.hidden(x), y)))


# ------------------------------------------------------------- Triton
def _triton_ok():
    from fsam_kernels.heads.linear_ce import _triton_usable
    return _triton_usable(torch.device("cpu")) is None


@pytest.mark.skipif(not _triton_ok(), reason="Triton interpreter not available")
@pytest.mark.parametrize("dtype,n,d,v", [(torch.float32, 19, 24, 45),
                                         (torch.bfloat16, 19, 24, 45),
                                         (torch.float32, 70, 40, 130)],
                         ids=["fp32-one-tile", "bf16-one-tile", "fp32-several-tiles"])
def test_triton_equals_torch(dtype, n, d, v):
    """The Triton kernels (under TRITON_INTERPRET=1 on CPU) against the
    PyTorch implementation: forward, backward and the Functional-SAM vjp;
    one tile per dimension, and several (partial) tiles in every dimension."""
    from fsam_kernels.heads import _torch as tt, _triton as tr

    torch.manual_seed(17)
    h = torch.randn(n, d).to(dtype)
    w = torch.randn(v, d).to(dtype)
    h1 = (h.float() + 0.1 * torch.randn(n, d)).to(dtype)
    w1 = (w.float() + 0.1 * torch.randn(v, d)).to(dtype)
    y = torch.randint(0, v, (n,))
    y[3] = -100
    # float32 operands in both; bf16 operands are cast to float32 by the kernels
    cd = torch.float32
    lse_t, zy_t = tt.forward(h.float(), w.float(), y, -100, cd, 7)[:2]
    lse_k, zy_k = tr.forward(h, w, y, -100, cd, 7)[:2]
    _close(lse_k, lse_t, F32_TOL)
    _close(zy_k, zy_t, F32_TOL)
    coef = torch.tensor(0.37)
    gh_t, gw_t = tt.vjp(h.float(), w.float(), lse_t, y, -100, coef, h1.float(), w1.float(), cd, 7)
    gh_k, gw_k = tr.vjp(h, w, lse_k, y, -100, coef, h1, w1, cd, 7)
    _close(gh_k, gh_t, F32_TOL)
    _close(gw_k, gw_t, F32_TOL)
    # through the public function with impl="triton"
    hh = h.float().requires_grad_()
    ww = w.float().requires_grad_()
    loss = fused_linear_cross_entropy(hh, ww, y, impl="triton")
    ref = F.cross_entropy(hh @ ww.T, y)
    _close(loss, ref, F32_TOL)
    for a, b in zip(torch.autograd.grad(loss, (hh, ww)), torch.autograd.grad(ref, (hh, ww))):
        _close(a, b, F32_TOL)


@pytest.mark.skipif(not _triton_ok(), reason="Triton interpreter not available")
def test_triton_head_in_functional_sam_step():
    """FunctionalSAM.step(closure) through the Triton head equals the plain path."""
    torch.manual_seed(18)
    base = TinyLM(tied=True)
    batches = _batches(1)
    g_plain, _ = _run(copy.deepcopy(base), FunctionalSAM, False, "plain", batches, False, 1)
    tri = copy.deepcopy(base)
    tri.head.impl = "triton"
    g_tri, _ = _run(tri, FunctionalSAM, False, "fused", batches, False, 1)
    for n in g_plain:
        _close(g_tri[n], g_plain[n], F32_TOL)


# ------------------------------------------- review: all-ignored, pass counts
@pytest.mark.parametrize("impl", ["torch", "triton", "torch-fp16"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_micro_batch_matches_torch(reduction, impl):
    """Every label ignored: torch's cross-entropy gives a nan mean (0/0) or a
    0 sum, and gradients exactly 0; the fused head gives the same (the
    PyTorch path forming grads in the forward, the Triton path, and the
    float16 path that recomputes in the backward)."""
    if impl == "triton" and not _triton_ok():
        pytest.skip("Triton interpreter not available")
    torch.manual_seed(19)
    emb = nn.Embedding(11, 4)
    h = torch.randn(2, 3, 4, requires_grad=True)
    y = torch.full((2, 3), -100)
    head = FusedLinearCrossEntropy(emb, reduction=reduction,
                                   impl="torch" if impl == "torch-fp16" else impl)
    ctx = (torch.autocast("cpu", dtype=torch.float16) if impl == "torch-fp16"
           else torch.enable_grad())
    with ctx:
        loss = head(h, y).loss
        ref = F.cross_entropy(F.linear(h, emb.weight).flatten(0, 1).float(), y.flatten(),
                              reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    g = torch.autograd.grad(loss, (h, emb.weight))
    gr = torch.autograd.grad(ref, (h, emb.weight))
    for a, b in zip(g, gr):
        assert torch.equal(b, torch.zeros_like(b))     # torch's own answer
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_all_ignored_micro_batch_in_functional_sam(impl):
    """Functional-SAM with accumulation where one micro-batch has every label
    ignored: it adds nothing to either pass (not nan, which would skip the
    step); the pass-2 grads equal the plain full-logits path's."""
    if impl == "triton" and not _triton_ok():
        pytest.skip("Triton interpreter not available")
    torch.manual_seed(20)
    base = TinyLM(tied=True, impl=impl)
    batches = _batches(2)
    batches[1] = (batches[1][0], torch.full_like(batches[1][1], -100))
    g_fused, m_fused = _run(copy.deepcopy(base), FunctionalSAM, False, "fused", batches,
                            False, steps=1)
    g_plain, m_plain = _run(copy.deepcopy(base), FunctionalSAM, False, "plain", batches,
                            False, steps=1)
    assert set(g_fused) == set(g_plain) == {n for n, _ in base.named_parameters()}
    for n in g_plain:
        assert torch.isfinite(g_plain[n]).all()
        _close(g_fused[n], g_plain[n], F32_TOL)
    for (n, a), (_, b) in zip(m_fused.named_parameters(), m_plain.named_parameters()):
        assert not torch.equal(a, base.get_parameter(n)), n      # the step was taken
        _close(a, b, F32_TOL)


def _head_pass1(model, rec, batches):
    k = len(batches)
    for x, y in batches:
        (rec.capture(model.head(model.hidden(x), y)).loss / k).backward()


def test_recorder_pass_counts_must_match():
    """Capture 3, replay 2: second_step() raises before changing anything, a
    later replay completes the step with the right values; a new pass 1 or a
    later step never takes the stale record."""
    torch.manual_seed(21)
    base = TinyLM(tied=True)
    batches = _batches(3)
    # the reference: the same step with all three replays
    _, m_ref = _run(copy.deepcopy(base), FunctionalSAM, False, "fused", batches, False, 1)

    model = copy.deepcopy(base)
    opt = FunctionalSAM(model.parameters(), lr=1e-2, rho=0.2, backend="reference")
    rec = HeadRecorder(opt)
    opt.zero_grad()
    _head_pass1(model, rec, batches)
    opt.first_step()
    opt.zero_grad()
    for x, _ in batches[:2]:
        rec.replay(model.hidden(x))
    at = {n: p.detach().clone() for n, p in model.named_parameters()}
    st = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(RuntimeError, match=r"1 record\(s\) captured in pass 1 were not replayed"):
        opt.second_step()
    for n, p in model.named_parameters():              # nothing changed: still at θ + e
        assert torch.equal(p, at[n]), n
    assert opt._perturbed is not None and len(rec) == 1
    assert str(opt.state_dict()["state"]) == str(st)
    rec.replay(model.hidden(batches[2][0]))            # the missing replay ...
    opt.second_step()                                  # ... and the step is right
    for (n, a), (_, b) in zip(model.named_parameters(), m_ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # abandoned step (restore) with a record left: the next pass 1 is refused
    opt.zero_grad()
    _head_pass1(model, rec, batches)
    opt.first_step()
    for x, _ in batches[:2]:
        rec.replay(model.hidden(x))
    opt.restore()
    with pytest.raises(RuntimeError, match=r"HeadRecorder.capture: 1 record\(s\) of an earlier"):
        rec.capture(model.head(model.hidden(batches[0][0]), batches[0][1]))
    # ... and a later step's replay never takes it
    opt.zero_grad()
    model.head(model.hidden(batches[0][0]), batches[0][1]).loss.backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="made in the pass 1 of an earlier step"):
        rec.replay(model.hidden(batches[2][0]))
    assert len(rec) == 1
    opt.restore()
    rec.clear()
    assert len(rec) == 0


def test_closure_with_two_head_outputs_is_explained():
    torch.manual_seed(22)
    model = TinyLM()
    (x1, y1), (x2, y2) = _batches(2)
    opt = FunctionalSAM(model.parameters(), lr=1e-2, rho=0.1, backend="reference")
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        a = model.head(model.hidden(x1), y1)
        b = model.head(model.hidden(x2), y2)
        return (a, b), a.loss + b.loss
    with pytest.raises(ValueError, match=r"closure output\[0\] is the output of a "
                                         r"FusedLinearCrossEntropy head.*torch\.cat"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # the supported form: one head call on the concatenated micro-batches
    def one_call():
        out = model.head(torch.cat([model.hidden(x1), model.hidden(x2)]), torch.cat([y1, y2]))
        return out, out.loss
    opt.step(one_call)
    with pytest.raises(ValueError, match="FusedLinearCrossEntropy head"):
        CotangentRecorder().capture(model.head(model.hidden(x1), y1))


@pytest.mark.parametrize("extra, needle", [
    (["--rho", "inf"], "--rho: inf is out of range: expected a finite float >= 0"),
    (["--betas", "1.2,0.9"], "--betas: b1 = 1.2 is outside [0, 1)"),
    (["--betas", "0.9,1.0"], "--betas: b2 = 1.0 is outside [0, 1)"),
    (["--betas", "0.9"], "--betas: expected two floats"),
    (["--eps", "-1"], "--eps: -1 is out of range"),
    (["--weight-decay", "-1"], "--weight-decay: -1 is out of range"),
    (["--lr", "nan"], "--lr: nan is out of range"),
    (["--prho", "-0.1"], "--prho: -0.1 is out of range"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio: 1.5 is out of range: expected a finite float in [0, 1]"),
    (["--warmup", "-1"], "--warmup: -1 is out of range"),
    (["--steps", "0"], "--steps: 0 is out of range: expected an integer >= 1"),
    (["--seeds", "x"], "--seeds: expected an integer >= 1, got 'x'"),
    (["--batch-size", "0"], "--batch-size: 0 is out of range"),
    (["--seq-len", "0"], "--seq-len: 0 is out of range"),
    (["--eval-every", "0"], "--eval-every: 0 is out of range"),
    (["--diagnose-every", "-1"], "--diagnose-every: -1 is out of range"),
    (["--eval-batches", "0"], "--eval-batches: 0 is out of range"),
    (["--stop-after", "-2"], "--stop-after: -2 is out of range"),
    (["--max-chars", "-1"], "--max-chars: expected an integer >= 1"),
    (["--vocab-size", "-3"], "--vocab-size: expected an integer >= 256"),
])
def test_fsam_train_numeric_options_are_parse_errors(capsys, tmp_path, extra, needle):
    from fsam_kernels.lm import train as lmtrain

    with pytest.raises(SystemExit) as e:
        lmtrain.main(["--out", str(tmp_path / "o"), *extra])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fsam_train_resume_needs_existing_out(capsys, tmp_path):
    from fsam_kernels.lm import train as lmtrain

    missing = tmp_path / "no-such-run"
    with pytest.raises(SystemExit) as e:
        lmtrain.main(["--out", str(missing), "--resume"])
    assert e.value.code == 2
    assert f"--resume: --out '{missing}' does not exist" in capsys.readouterr().err
    assert not missing.exists()


# ------------------------------------------------------- fsam-train pieces
@pytest.mark.parametrize("name", ["adamw", "sam", "fsam"])
def test_train_step_fused_equals_plain_with_accumulation(name):
    """fsam-train's step (``--grad-accum 2``) with ``--head fused`` equals
    ``--head plain`` on the GPT, tied head, 2 steps."""
    from types import SimpleNamespace

    from fsam_kernels.lm.model import GPT, GPTConfig
    from fsam_kernels.lm.train import make_optimizer, train_step

    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16)
    args = SimpleNamespace(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, rho=0.1,
                           prho=0.2, backend="reference")
    g = torch.Generator().manual_seed(5)
    micro = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
             for _ in range(2)]
    finals = {}
    for head in ("fused", "plain"):
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = make_optimizer(name, model, args)
        losses = [float(train_step(model, opt, micro, head=head)) for _ in range(2)]
        finals[head] = (losses, [p.detach().clone() for p in model.parameters()])
    assert finals["fused"][0] == pytest.approx(finals["plain"][0], rel=F32_TOL)
    for a, b in zip(finals["fused"][1], finals["plain"][1]):
        _close(a, b, F32_TOL)


def test_fsam_train_head_and_grad_accum_arguments(capsys):
    from fsam_kernels.lm import train as lmtrain

    with pytest.raises(SystemExit):
        lmtrain.main(["--grad-accum", "0"])
    err = capsys.readouterr().err
    assert "--grad-accum: 0 is out of range: expected an integer >= 1" in err
    with pytest.raises(SystemExit):
        lmtrain.main(["--head", "none"])
    assert "--head" in capsys.readouterr().err


def test_example_fused_head_lm_tiny():
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "python" / "fused_head_lm.py"
    r = subprocess.run([sys.executable, str(path), "--tiny"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "closure step   2" in r.stdout and "accumulation step   2" in r.stdout


def test_step_closure_refuses_leftover_records_before_perturbing():
    """A HeadRecorder record left by an abandoned hand-written pass 1, then
    step(closure): refused before θ changes (no step pending); after clear() it steps."""
    torch.manual_seed(18)
    model = TinyLM()
    (x, y), = _batches(1)
    opt = FunctionalSAM(model.parameters(), lr=1e-2, rho=0.1, backend="reference")
    rec = HeadRecorder(opt)
    rec.capture(model.head(model.hidden(x), y)).loss.backward()
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        out = model.head(model.hidden(x), y)
        return out, out.loss
    with pytest.raises(RuntimeError, match=r"1 record\(s\) .* left over .* clear\(\)"):
        opt.step(closure)
    assert opt._perturbed is None
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    rec.clear()
    opt.step(closure)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
