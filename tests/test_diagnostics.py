"""fsam_kernels.diagnostics: the logit/functional decomposition of SAM's
correction and the sharpness estimators, checked against dense autograd
references (float64, tiny models)."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from fsam_kernels import SAM, FunctionalSAM
from fsam_kernels import diagnostics as D

DT = torch.float64


def mlp(seed=0, d_in=4, h=5, d_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Linear(h, d_out)).to(DT)


def batch(seed=1, n=8, d_in=4, k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=DT), torch.randint(0, k, (n,), generator=g)


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def dense(model, x, y, loss_fn=F.cross_entropy):
    """Flat θ, dense Hessian H, Jacobian J (outputs flattened) and output-space
    loss Hessian Hz, all at the model's current parameters."""
    names = [n for n, _ in model.named_parameters()]
    ps = [p for _, p in model.named_parameters()]
    theta = flat([p.detach() for p in ps])

    def unflat(v):
        out, o = {}, 0
        for n, p in zip(names, ps):
            out[n] = v[o:o + p.numel()].view_as(p)
            o += p.numel()
        return out

    def out(v):
        return functional_call(model, unflat(v), (x,))

    H = hessian(lambda v: loss_fn(out(v), y), theta)
    z = out(theta).detach()
    J = jacobian(lambda v: out(v).reshape(-1), theta)
    Hz = hessian(lambda zz: loss_fn(zz.view_as(z), y), z.reshape(-1))
    return theta, H, J, Hz, out


# --------------------------------------------------------------------------- decomposition
def test_linear_model_has_no_functional_path():
    torch.manual_seed(0)
    model = nn.Linear(6, 4).to(DT)  # z = W x + b: J does not depend on θ
    x, y = batch(n=10, d_in=6, k=4)
    r = D.decompose(model, F.cross_entropy, x, y, rho=0.3, return_vectors=True)
    for a, b in zip(r.vectors["g_fsam"], r.vectors["g"]):
        assert torch.equal(a, b) or (a - b).abs().max() < 1e-15
    assert r.delta_func_norm < 1e-15
    assert r.cross_norm < 1e-15
    # the whole SAM correction is the logit path (CE is not quadratic in z)
    assert r.delta_logit_norm > 1e-3
    assert r.delta_logit_norm == pytest.approx(r.sam_correction_norm, rel=1e-12)
    assert r.cos_logit == pytest.approx(1.0, abs=1e-12)
    assert r.ratio == math.inf and r.to_dict()["ratio"] is None


def test_decomposition_matches_independent_computation():
    """g, g_SAM, g_FSAM, g_LOGIT from dense Jacobians and the analytic
    cross-entropy cotangent (softmax(z) − onehot)/n at θ and at θ + e."""
    model = mlp()
    x, y = batch()
    rho = 0.2
    r = D.decompose(model, F.cross_entropy, x, y, rho, return_vectors=True)
    theta, H, J, Hz, out = dense(model, x, y)
    n, k = len(y), 3

    def cot(v):
        z = out(v).detach()
        return ((torch.softmax(z, -1) - F.one_hot(y, k).to(DT)) / n).reshape(-1)

    c0 = cot(theta)
    g = J.T @ c0
    e = rho * g / (g.norm() + 1e-12)  # SPEC §1: norm_eps 1e-12
    theta1 = theta + e
    c1 = cot(theta1)
    J1 = jacobian(lambda v: out(v).reshape(-1), theta1)
    torch.testing.assert_close(flat(r.vectors["e"]), e, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(flat(r.vectors["g"]), g, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(flat(r.vectors["g_logit"]), J.T @ c1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(flat(r.vectors["g_fsam"]), J1.T @ c0, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(flat(r.vectors["g_sam"]), J1.T @ c1, rtol=1e-12, atol=1e-15)
    # g_SAM is the ordinary gradient at θ + e
    v1 = theta1.clone().requires_grad_(True)
    gs, = torch.autograd.grad(F.cross_entropy(out(v1), y), v1)
    torch.testing.assert_close(flat(r.vectors["g_sam"]), gs, rtol=1e-12, atol=1e-15)
    assert r.e_norm == pytest.approx(rho, rel=1e-10)
    assert r.loss == pytest.approx(float(F.cross_entropy(out(theta), y)), rel=1e-14)


def test_first_order_terms_are_gauss_newton_and_the_rest():
    """Finite differences: δ_logit/ρ → G ê (Gauss-Newton, G = Jᵀ H_z J) and
    δ_func/ρ → (H − G) ê as ρ → 0, so δ_logit + δ_func ≈ ρ H ê."""
    model = mlp(seed=3)
    x, y = batch(seed=4)
    theta, H, J, Hz, _ = dense(model, x, y)
    G = J.T @ Hz @ J
    rho = 1e-5
    r = D.decompose(model, F.cross_entropy, x, y, rho, return_vectors=True)
    eh = flat(r.vectors["e"]) / rho
    dl = (flat(r.vectors["g_logit"]) - flat(r.vectors["g"])) / rho
    df = (flat(r.vectors["g_fsam"]) - flat(r.vectors["g"])) / rho
    torch.testing.assert_close(dl, G @ eh, rtol=0, atol=1e-5 * float((G @ eh).norm()))
    torch.testing.assert_close(df, (H - G) @ eh, rtol=0, atol=1e-5 * float(((H - G) @ eh).norm()))


def test_cross_term_is_second_order():
    model = mlp(seed=5, h=8)
    x, y = batch(seed=6, n=16)
    rs = [D.decompose(model, F.cross_entropy, x, y, rho) for rho in (0.04, 0.02, 0.01)]
    for big, small in zip(rs, rs[1:]):
        assert big.cross_norm / small.cross_norm == pytest.approx(4.0, rel=0.05)
        assert big.delta_logit_norm / small.delta_logit_norm == pytest.approx(2.0, rel=0.05)
        assert big.delta_func_norm / small.delta_func_norm == pytest.approx(2.0, rel=0.05)
    assert rs[-1].cross_rel < 0.05


def test_parameters_grads_and_rng_untouched_and_paths_agree():
    model = mlp(seed=7)
    x, y = batch(seed=8)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    a = D.decompose(model, F.cross_entropy, x, y, 0.1)                     # nn.Module: 2 forwards
    b = D.decompose(lambda inp: model(inp), F.cross_entropy, x, y, 0.1,
                    params=list(model.parameters()))                      # callable: in place, 3 forwards
    s = D.sharpness(model, F.cross_entropy, x, y, lanczos_iters=5, trace_samples=3, gauss_newton=True)
    assert (a.forwards, b.forwards) == (2, 3)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    assert torch.equal(torch.get_rng_state(), rng)
    da, db = a.to_dict(), b.to_dict()
    da.pop("forwards"), db.pop("forwards")
    for k in da:
        assert da[k] == pytest.approx(db[k], rel=1e-12, abs=1e-15), k
    assert s["lambda_max"] > 0
    json.dumps(da)


def test_dropout_sees_same_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT).train()
    x, y = batch(seed=9)
    # with identical masks in both forwards, a tiny rho gives a tiny correction
    r = D.decompose(model, F.cross_entropy, x, y, 1e-7)
    assert r.sam_correction_norm < 1e-5 * r.grad_norm


def test_tied_weights_transformer_two_forward_path():
    """GPT with a tied embedding/output matrix: the functional_call path
    (2 forwards) equals the in-place path (3 forwards)."""
    from fsam_kernels.lm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=31, block_size=8, n_layer=1, n_head=2, d_model=8)).to(DT).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 31, (3, 8), generator=g)
    y = torch.randint(0, 31, (3, 8), generator=g)
    a = D.decompose(model, D.lm_loss, x, y, 0.5, return_vectors=True)
    b = D.decompose(lambda i: model(i), D.lm_loss, x, y, 0.5, params=list(model.parameters()),
                    return_vectors=True)
    for k in ("g", "g_sam", "g_fsam", "g_logit"):
        for u, v in zip(a.vectors[k], b.vectors[k]):
            torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-12)  # lm_loss runs in float32
    assert a.delta_func_norm > 0 and a.delta_logit_norm > 0


def test_preconditioned_direction_is_the_optimizers():
    """e from precondition=True equals the perturbation SAM.first_step applies."""
    for cls in (SAM, FunctionalSAM):
        model = mlp(seed=10)
        x, y = batch(seed=11)
        opt = cls(model.parameters(), lr=1e-2, rho=0.3, precondition=True, backend="reference")
        for _ in range(3):
            opt.step(lambda: (lambda z: (z, F.cross_entropy(z, y)))(model(x)))
        r = D.decompose(model, F.cross_entropy, x, y, 0.3, optimizer=opt, precondition=True,
                        return_vectors=True)
        plain = D.decompose(model, F.cross_entropy, x, y, 0.3, return_vectors=True)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        e_opt = [p.detach() - b for p, b in zip(model.parameters(), before)]
        opt.restore()
        # the optimizer forms its scale in float32 (SPEC §1): float32-level agreement
        torch.testing.assert_close(flat(r.vectors["e"]), flat(e_opt), rtol=1e-6, atol=1e-9)
        # and it is not the plain direction
        assert (flat(plain.vectors["e"]) - flat(e_opt)).norm() > 1e-3
    with pytest.raises(ValueError, match="optimizer"):
        D.decompose(model, F.cross_entropy, x, y, 0.3, precondition=True)


def test_rejects_bad_rho():
    model = mlp()
    x, y = batch()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rho"):
            D.decompose(model, F.cross_entropy, x, y, bad)


# --------------------------------------------------------------------------- sharpness
def test_hvp_lanczos_trace_match_dense_hessian():
    model = mlp(seed=12)
    x, y = batch(seed=13)
    theta, H, J, Hz, _ = dense(model, x, y)
    n = theta.numel()
    evals = torch.linalg.eigvalsh(H)
    with D.hvp_operator(model, F.cross_entropy, x, y) as op:
        v = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(0))
        hv = flat(op(D._unflat(v, op.params)))
        torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)
        full = D.lanczos(op, iters=n)
        assert full["lambda_max"] == pytest.approx(float(evals[-1]), rel=1e-8)
        assert full["lambda_min"] == pytest.approx(float(evals[0]), rel=1e-8)
        short = D.lanczos(op, iters=20)
        assert short["lambda_max"] == pytest.approx(float(evals[-1]), rel=1e-6)
        # Hutchinson: exactly the mean of vᵀHv over the same Rademacher vectors ...
        est = D.hutchinson_trace(op, samples=6, seed=3)
        gen = torch.Generator().manual_seed(3)
        vs = []
        for _ in range(6):
            vv = [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8).to(DT) * 2 - 1)
                  for p in op.params]
            vs.append(flat(vv))
        assert est["trace"] == pytest.approx(float(torch.stack([u @ H @ u for u in vs]).mean()), rel=1e-10)
        # ... and an unbiased estimate of tr H
        big = D.hutchinson_trace(op, samples=400, seed=0)
    tr = float(H.trace())
    assert abs(big["trace"] - tr) < 4 * big["stderr"]


def test_gauss_newton_matches_dense():
    model = mlp(seed=14)
    x, y = batch(seed=15)
    theta, H, J, Hz, _ = dense(model, x, y)
    G = J.T @ Hz @ J
    n = theta.numel()
    with D.gnvp_operator(model, F.cross_entropy, x, y) as op:
        v = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(flat(op(D._unflat(v, op.params))), G @ v, rtol=1e-10, atol=1e-12)
        assert D.lanczos(op, iters=n)["lambda_max"] == pytest.approx(
            float(torch.linalg.eigvalsh(G)[-1]), rel=1e-8)
    s = D.sharpness(model, F.cross_entropy, x, y, lanczos_iters=n, trace_samples=400,
                    gauss_newton=True)
    assert s["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
    assert abs(s["gn_trace"] - float(G.trace())) < 4 * s["gn_trace_stderr"] + 1e-12
    assert s["gn_lambda_max"] >= 0


def test_sharpness_through_attention():
    """Double backward through scaled_dot_product_attention (math kernel):
    the Hessian w.r.t. the attention's qkv matrix matches a dense one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fsam_kernels.lm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=17, block_size=6, n_layer=1, n_head=2, d_model=4)).to(DT).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (2, 6), generator=g)
    y = torch.randint(0, 17, (2, 6), generator=g)
    w = model.blocks[0].attn.qkv.weight
    name = "blocks.0.attn.qkv.weight"
    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no double backward
        H = hessian(lambda v: D.lm_loss(functional_call(model, {name: v.view_as(w)}, (x,)), y),
                    w.detach().reshape(-1))
    s = D.sharpness(model, D.lm_loss, x, y, params=[w], lanczos_iters=w.numel(), trace_samples=1)
    assert s["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-5)
    assert s["lambda_min"] == pytest.approx(float(torch.linalg.eigvalsh(H)[0]), rel=1e-5)


# --------------------------------------------------------------------------- hook and CLI
def test_diagnose_lm_hook(tmp_path):
    from fsam_kernels.lm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=23, block_size=8, n_layer=1, n_head=2, d_model=8)).train()
    opt = FunctionalSAM(model.parameters(), lr=1e-3, rho=0.05, backend="reference")
    x = torch.randint(0, 23, (2, 8))
    opt.step(lambda: (lambda z: (z, D.lm_loss(z, x)))(model(x)))
    out = D.diagnose_lm(model, opt, x, x, lanczos_iters=3, trace_samples=2)
    assert model.training
    assert out["diag_rho"] == 0.05 and out["diag_p_rho"] == 0.2 and out["diag_p_precondition"]
    for k in ("diag_delta_logit_norm", "diag_delta_func_norm", "diag_lambda_max", "diag_trace"):
        assert math.isfinite(out[k])
    # fsam-train's metrics.jsonl with these keys can be plotted by fsam-diagnose
    from fsam_kernels.diagnose_cli import load_results, main

    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"optimizer": "fsam", "seed": 0, "step": s, "val_loss": 1.0,
                                           **{k: v for k, v in out.items()}}) for s in (0, 5)) + "\n")
    res = load_results(str(path))
    assert [r["step"] for r in res["records"]] == [0, 5]
    assert res["records"][0]["delta_logit_norm"] == out["diag_delta_logit_norm"]
    assert main(["plot", str(path), "--out", str(tmp_path / "p.png")]) == 0


def test_cli_vision_smoke(tmp_path):
    pytest.importorskip("sklearn")
    from fsam_kernels.diagnose_cli import main

    js = tmp_path / "d.json"
    assert main(["vision", "--steps", "2", "--every", "1", "--lanczos-iters", "2", "--trace-samples", "1",
                 "--eval-batch-size", "32", "--width", "8", "--backend", "reference",
                 "--out-json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert [(r["optimizer"], r["step"]) for r in res["records"]] == [
        (n, s) for n in ("adamw", "sam", "fsam") for s in (0, 1, 2)]
    assert (tmp_path / "d.png").stat().st_size > 0
    assert set(res["final"]) == {"adamw", "sam", "fsam"}


def test_cli_default_output_dir(tmp_path, monkeypatch):
    """Without --out-json/--plot, text/vision write under runs/diagnostics/."""
    pytest.importorskip("sklearn")
    from fsam_kernels.diagnose_cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["vision", "--steps", "1", "--every", "1", "--optimizers", "adamw", "--no-sharpness",
                 "--width", "4", "--eval-batch-size", "16"]) == 0
    out = tmp_path / "runs" / "diagnostics"
    assert (out / "diagnostics-vision.json").stat().st_size > 0
    assert (out / "diagnostics-vision.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def _cli_error(argv, capsys):
    from fsam_kernels.diagnose_cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, needles", [
    (["vision", "--steps", "0", "--every", "1"], ["--steps 0 is out of range"]),
    (["vision", "--every", "0"], ["--every 0 is out of range"]),
    (["vision", "--rho", "-1"], ["--rho -1.0 is out of range"]),
    (["vision", "--measure-rho", "0"], ["--measure-rho 0.0 is out of range"]),
    (["vision", "--width", "0"], ["--width 0 is out of range"]),
    (["vision", "--threads", "0"], ["--threads 0 is out of range"]),
    (["vision", "--betas", "0.9"], ["--betas", "'0.9'"]),
    (["vision", "--optimizers", "adamw,lion"], ["--optimizers", "'lion'"]),
    (["vision", "--optimizers", "adamw", "--backend", "gpu"], ["--backend 'gpu'", "reference"]),
    (["vision", "--backend", "cuda"], ["--backend cuda is not available on cpu"]),
    (["text", "--seq-len", "100"], ["--seq-len 100 exceeds", "--preset tiny"]),
    (["text", "--seq-len", "100000"], ["--seq-len 100000"]),
    (["text", "--seq-len", "0"], ["--seq-len 0 is out of range"]),
    (["text", "--preset", "huge"], ["--preset 'huge'"]),
    (["checkpoint", "/nonexistent/x.pt"], ["CKPT '/nonexistent/x.pt'", "no such file"]),
    (["checkpoint", "/nonexistent/x.pt", "--lanczos-iters", "0"], ["--lanczos-iters 0"]),
    (["plot", "/nonexistent/x.json", "--out", "p.png"], ["JSON '/nonexistent/x.json'", "no such file"]),
])
def test_cli_bad_arguments(argv, needles, capsys):
    err = _cli_error(argv, capsys)
    for n in needles:
        assert n in err


def test_cli_bad_files(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    foreign = tmp_path / "adamw-seed0.pt"
    torch.save({"a": 1}, foreign)
    badname = tmp_path / "model.pt"
    torch.save({"a": 1}, badname)
    png = str(tmp_path / "p.png")
    err = _cli_error(["checkpoint", str(empty)], capsys)
    assert f"CKPT '{empty}' is not a readable fsam-train checkpoint" in err
    err = _cli_error(["checkpoint", str(foreign)], capsys)
    assert f"CKPT '{foreign}' is not an fsam-train checkpoint" in err
    err = _cli_error(["checkpoint", str(badname)], capsys)
    assert f"CKPT '{badname}'" in err
    err = _cli_error(["plot", str(empty), "--out", png], capsys)
    assert f"JSON '{empty}' is not a JSON file" in err
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    err = _cli_error(["plot", str(other), "--out", png], capsys)
    assert f"JSON '{other}' is not an fsam-diagnose results file" in err
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text(json.dumps({"optimizer": "adamw", "seed": 0, "step": 0, "val_loss": 1.0}) + "\n")
    err = _cli_error(["plot", str(jsonl), "--out", png], capsys)
    assert f"JSON '{jsonl}' has no diag_* records" in err
    assert not (tmp_path / "p.png").exists()


def test_cli_text_data_too_short(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("hello world\n" * 300)
    err = _cli_error(["text", "--data", str(data), "--tokenizer", "bytes", "--val-fraction", "0.01",
                      "--seq-len", "64", "--cache-dir", str(tmp_path / "cache"),
                      "--out-json", str(tmp_path / "d.json")], capsys)
    assert "--seq-len" in err
    assert not (tmp_path / "d.json").exists()
