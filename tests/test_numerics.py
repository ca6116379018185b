"""Numerics of issue 10 on every backend available here, against SPEC.md.

- Bias corrections 1 - β^t in float64 (SPEC §1, §3): parameters at different
  step counts (up to ~10^4, β2 = 0.9999) give the reference's N² and update
  within SPEC §5, at the backend level and through load_state_dict /
  add_param_group.
- N² accumulated across tensors, calls and groups in float64 and rounded once
  (SPEC §1, §5): splitting the same parameters into 1, 2 or 5 groups with equal
  hyperparameters changes N² by float64 rounding only, and the perturbation
  and the result not at all (see ``assert_same_perturbation``).
- 16-bit parameters rounded to nearest even (SPEC §1 "rounded once to the
  parameter dtype"): sub-ulp updates leave a bf16/fp16 parameter unchanged over
  many steps, ties go to even, overflow and non-finite values as torch rounds
  them (``x_fp32.to(torch.bfloat16)`` is round-to-nearest-even).

Backends: every (backend, device) pair the registry reports available here
(``helpers.backend_device_params``): reference, foreach, cpu when the native
library is built, cuda, and triton (under the interpreter on CPU, which
conftest.py switches on without CUDA).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from fsam_kernels import SAM
from fsam_kernels.backends import get_backend
from helpers import backend_device_params, within_ulps
# ------------------------------------------------------------------ tolerances
# SPEC §5's float32 figures (F32_RTOL_1, F32_ATOL, F32_RTOL_10, NORM_RTOL), one
# definition for every test file, in tests/helpers.py.
# float64 rounding of N² (SPEC §1, §5: "changes nothing beyond float64 rounding
# of N²"): N² is a sum of non-negative float64 partials (at most one per
# element); two summation orders of n such terms differ by at most
# 2 (n - 1) u N², u = U64 = 2^-53.
from helpers import F32_ATOL, F32_RTOL_1, F32_RTOL_10, F64_SCALE_RTOL, NORM_RTOL, U64

CASES = backend_device_params()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, device, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


# ============================================== 1. bias corrections in float64
STEPS = (0.0, 1.0, 37.0, 10_000.0, 12_345.0)      # exact in float32
BETAS = (0.9, 0.9999)
SHAPES = [(40,), (7, 3), (33,), (5, 5), (64,)]
EPS = 1e-8


def _steps_case(device, seed=0):
    """params, g1, g2, m, v, steps: one float32 tensor per step count of STEPS."""
    gen = _gen(seed)
    ps = [_randn(s, gen, device) for s in SHAPES]
    g1 = [_randn(s, gen, device) for s in SHAPES]
    g2 = [_randn(s, gen, device) for s in SHAPES]
    m = [0.1 * _randn(s, gen, device) for s in SHAPES]
    v = [(0.01 * torch.rand(s, generator=gen) ** 2 + 1e-6).to(device) for s in SHAPES]
    steps = [torch.tensor(t, device=device) for t in STEPS]
    return ps, g1, g2, m, v, steps


@pytest.mark.parametrize("backend,device", CASES)
def test_bias_corrections_float64_backend_level(backend, device):
    """N², the perturbation and the AdamW update of parameters whose steps are
    0, 1, 37, 10^4 and 12345 with β2 = 0.9999: within SPEC §5 of the reference
    (float32 bias corrections are off by ~1e-4 relative at t ~ 10^4)."""
    lr, wd = 1e-2, 0.01
    out = {}
    for name in ("reference", backend):
        be = get_backend(name, device)
        ps, g1, g2, m, v, steps = _steps_case(device)
        bs = [torch.empty_like(p) for p in ps]
        fi = torch.zeros((), device=device)
        n2 = torch.zeros((), dtype=be.norm_dtype, device=device)
        be.sq_norm(g1, v, steps, beta2=BETAS[1], eps=EPS, precondition=True,
                   grad_scale=None, out=n2)
        be.perturb(ps, g1, bs, v, steps, rho=0.05, norm_sq=n2, norm_eps=1e-12,
                   beta2=BETAS[1], eps=EPS, precondition=True, grad_scale=None, found_inf=fi)
        pert = [p.clone() for p in ps]
        be.restore_adamw(ps, g2, bs, m, v, steps, lr=lr, beta1=BETAS[0], beta2=BETAS[1],
                         eps=EPS, weight_decay=wd, maximize=False, grad_scale=None,
                         found_inf=fi)
        out[name] = (n2, pert, ps, m, v, steps)
    ref, got = out["reference"], out[backend]
    torch.testing.assert_close(got[0].double(), ref[0].double(), rtol=NORM_RTOL, atol=0)
    for what, k in (("perturbed p", 1), ("p", 2), ("exp_avg", 3), ("exp_avg_sq", 4)):
        for i, (a, b) in enumerate(zip(got[k], ref[k])):
            torch.testing.assert_close(a, b, rtol=F32_RTOL_1, atol=F32_ATOL,
                                       msg=lambda m, i=i, w=what: f"{w}[{i}] (t={STEPS[i]}): {m}")
    for a, b in zip(got[5], ref[5]):
        assert torch.equal(a, b)


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


@pytest.mark.parametrize("backend,device", CASES)
def test_bias_corrections_float64_after_load_state_dict(backend, device):
    """Optimizer level: steps 1, 37, 10^4, 12345 loaded with load_state_dict, then a
    parameter group added later (step 0), β2 = 0.9999; two preconditioned SAM
    steps equal the reference backend's within SPEC §5."""
    gen = _gen(3)
    base = [_randn(s, gen, device) for s in SHAPES]
    grads = [[_randn(s, gen, device) for s in SHAPES] for _ in range(4)]
    hp = dict(lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.01, rho=0.05, precondition=True)
    # a state dict with the step counts of STEPS[1:] for the first four parameters
    seed_params = [p.clone().requires_grad_() for p in base[:4]]
    seed = SAM(seed_params, backend="reference", **hp)
    _set_grads(seed_params, grads[0][:4])
    seed.first_step()
    _set_grads(seed_params, grads[1][:4])
    seed.second_step()
    sd = seed.state_dict()
    for i, t in enumerate(STEPS[1:]):
        sd["state"][i]["step"] = torch.tensor(t)
        sd["state"][i]["exp_avg_sq"] = sd["state"][i]["exp_avg_sq"] + 1e-4
    runs = {}
    for name in ("reference", backend):
        ps = [p.clone().requires_grad_() for p in base]
        opt = SAM(ps[:4], backend=name, **hp)
        opt.load_state_dict(copy.deepcopy(sd))
        opt.add_param_group({"params": [ps[4]]})
        snaps = []
        for k in range(2):
            _set_grads(ps, grads[2 * k])
            opt.first_step()
            pert = [p.detach().clone() for p in ps]
            _set_grads(ps, grads[2 * k + 1])
            opt.second_step()
            snaps.append((pert, [p.detach().clone() for p in ps],
                          [opt.state[p]["exp_avg_sq"].clone() for p in ps],
                          [opt.state[p]["step"].clone() for p in ps]))
        runs[name] = snaps
    for k, (got, ref) in enumerate(zip(runs[backend], runs["reference"])):
        rtol = F32_RTOL_1 if k == 0 else F32_RTOL_10
        for what, j in (("perturbed p", 0), ("p", 1), ("exp_avg_sq", 2)):
            for i, (a, b) in enumerate(zip(got[j], ref[j])):
                torch.testing.assert_close(a, b, rtol=rtol, atol=F32_ATOL,
                                           msg=lambda m, i=i, w=what: f"step {k}: {w}[{i}]: {m}")
        for a, b in zip(got[3], ref[3]):
            assert torch.equal(a.cpu(), b.cpu())


# ========================================== 2. N² does not depend on grouping
GROUP_SHAPES = [(50,), (6, 7), (1,), (33,), (4, 4, 2), (90,), (3,), (17,), (8, 8), (5,)]
GROUP_DTYPES = [torch.float32] * 7 + [torch.bfloat16, torch.float64, torch.float32]
# grads of very different sizes: float32 sums lose the small groups' low bits
GROUP_GRAD_SCALES = [1.0, 300.0, 0.01, 1.0, 7.0, 0.1, 30.0, 1.0, 1e-3, 2.0]
SPLITS = {1: [10], 2: [4, 6], 5: [2, 2, 2, 2, 2]}


def _scale32(n2: torch.Tensor, rho: float, norm_eps: float) -> torch.Tensor:
    """The perturbation scale of SPEC §1 from N² (rounded once to float32)."""
    f = torch.float32
    return torch.tensor(rho, dtype=f) / (n2.detach().cpu().to(f).sqrt() + torch.tensor(norm_eps, dtype=f))


def assert_same_perturbation(a_list, b_list, initial, same_scale: bool, what: str):
    """Per SPEC §1/§5, with equal hyperparameters only N² depends on the grouping,
    by float64 rounding. When both N² round to the same float32 scale (always, but
    for N² within float64 rounding of a float32 rounding boundary) the
    perturbations are bitwise equal; otherwise the scales differ by at most
    2^-22 (tests/helpers.py, F64_SCALE_RTOL), which moves θ + e by at most one
    ulp of a 16/32-bit dtype, or by 2^-21 |e| for float64."""
    for i, (a, b, p0) in enumerate(zip(a_list, b_list, initial)):
        if same_scale:
            assert torch.equal(a, b), f"{what}[{i}] differs bitwise with the same scale"
        elif a.dtype == torch.float64:  # pragma: no cover - N² on a float32 boundary
            assert bool(((a - b).abs() <= F64_SCALE_RTOL * (b - p0).abs()).all()), what
        else:  # pragma: no cover
            assert within_ulps(a, b, 1), what


def assert_bitwise(a_list, b_list, what: str):
    """θ after restore_adamw, and the state: restored bitwise from the backups,
    then an update that does not read N², so the grouping changes no bit."""
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        assert torch.equal(a, b), f"{what}[{i}] differs bitwise"


def _group_case(device, seed):
    gen = _gen(seed)
    ps = [_randn(s, gen, device, dt) for s, dt in zip(GROUP_SHAPES, GROUP_DTYPES)]
    g1, g2 = ([(c * _randn(s, gen, device)).to(dt)
               for s, dt, c in zip(GROUP_SHAPES, GROUP_DTYPES, GROUP_GRAD_SCALES)]
              for _ in range(2))
    sdt = [torch.float64 if dt == torch.float64 else torch.float32 for dt in GROUP_DTYPES]
    m = [0.1 * _randn(s, gen, device, d) for s, d in zip(GROUP_SHAPES, sdt)]
    v = [(0.01 * torch.rand(s, generator=gen) ** 2 + 1e-6).to(device, d)
         for s, d in zip(GROUP_SHAPES, sdt)]
    steps = [torch.tensor(3.0, device=device) for _ in GROUP_SHAPES]
    return ps, g1, g2, m, v, steps


def _chunks(xs, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(xs[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("backend,device", CASES)
def test_grouping_changes_nothing_backend_level(backend, device):
    """The optimizer's calls (one sq_norm per group into one N², then one
    perturb and one restore_adamw per group) with the same tensors split into
    1, 2 and 5 groups: N² within float64 rounding, perturbation and result
    bitwise (when the scales agree, see above)."""
    be = get_backend(backend, device)
    rho, norm_eps, hp = 0.05, 1e-12, dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=EPS,
                                          weight_decay=0.01)
    results = {}
    for k, sizes in SPLITS.items():
        ps, g1, g2, m, v, steps = _group_case(device, seed=11)
        bs = [torch.empty_like(p) for p in ps]
        fi = torch.zeros((), device=device)
        n2 = torch.zeros((), dtype=be.norm_dtype, device=device)
        groups = list(zip(*(_chunks(x, sizes) for x in (ps, g1, g2, m, v, steps, bs))))
        for _, gg1, _, _, vv, tt, _ in groups:
            be.sq_norm(gg1, vv, tt, beta2=hp["beta2"], eps=EPS, precondition=True,
                       grad_scale=None, out=n2)
        for pp, gg1, _, _, vv, tt, bb in groups:
            be.perturb(pp, gg1, bb, vv, tt, rho=rho, norm_sq=n2, norm_eps=norm_eps,
                       beta2=hp["beta2"], eps=EPS, precondition=True, grad_scale=None,
                       found_inf=fi)
        pert = [p.clone() for p in ps]
        theta = [b.clone() for b in bs]
        for pp, _, gg2, mm, vv, tt, bb in groups:
            be.restore_adamw(pp, gg2, bb, mm, vv, tt, maximize=False, grad_scale=None,
                             found_inf=fi, **hp)
        results[k] = (n2, pert, ps, m, v, theta)
    n_terms = sum(math.prod(s) for s in GROUP_SHAPES)
    n2_1 = results[1][0].double()
    for k in (2, 5):
        n2_k = results[k][0].double()
        assert (n2_k - n2_1).abs() <= 2 * (n_terms - 1) * U64 * n2_1, (k, n2_1, n2_k)
        same = bool(_scale32(n2_k, rho, norm_eps) == _scale32(n2_1, rho, norm_eps))
        assert_same_perturbation(results[k][1], results[1][1], results[1][5], same,
                                 f"{k} groups: θ + e")
        for what, j in (("p", 2), ("exp_avg", 3), ("exp_avg_sq", 4)):
            assert_bitwise(results[k][j], results[1][j], f"{k} groups: {what}")
    assert results[1][0].dtype == torch.float64, "N² must be accumulated in float64"


@pytest.mark.parametrize("backend,device", CASES)
def test_grouping_changes_nothing_optimizer(backend, device):
    """SAM over the same parameters in 1, 2 and 5 groups with equal
    hyperparameters (preconditioned, two steps): the optimizer's N² is float64
    and within float64 rounding, the perturbations and results bitwise equal."""
    rho = 0.05
    runs = {}
    for k, sizes in SPLITS.items():
        ps0, g1, g2, _, _, _ = _group_case(device, seed=5)
        ps = [p.clone().requires_grad_() for p in ps0]
        opt = SAM([{"params": c} for c in _chunks(ps, sizes)], lr=1e-2, rho=rho,
                  precondition=True, backend=backend)
        snaps = []
        for step in range(2):
            _set_grads(ps, g1 if step == 0 else g2)
            theta = [p.detach().clone() for p in ps]
            opt.first_step()
            n2 = list(opt._last_norm_sq.values())
            pert = [p.detach().clone() for p in ps]
            _set_grads(ps, g2 if step == 0 else g1)
            opt.second_step()
            snaps.append((n2, pert, [p.detach().clone() for p in ps], theta))
        runs[k] = snaps
    n_terms = sum(math.prod(s) for s in GROUP_SHAPES)
    for step in range(2):
        (n2_1,), pert_1, res_1, theta = runs[1][step]
        for k in (2, 5):
            (n2_k,), pert_k, res_k, _ = runs[k][step]
            assert (n2_k.double() - n2_1.double()).abs() <= 2 * (n_terms - 1) * U64 * n2_1.double()
            same = bool(_scale32(n2_k, rho, 1e-12) == _scale32(n2_1, rho, 1e-12))
            assert_same_perturbation(pert_k, pert_1, theta, same, f"step {step}, {k} groups, θ+e")
            assert_bitwise(res_k, res_1, f"step {step}, {k} groups, θ")
        assert n2_1.dtype == torch.float64, "the optimizer's N² must be float64"


# ================================ 3. 16-bit parameters: round to nearest even
LOW = [torch.bfloat16, torch.float16]


def _spacing_up(x: torch.Tensor) -> torch.Tensor:
    """Distance (float32) from each 16-bit value to the next one away from zero."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)).float() - a.float())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter's numpy
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend,device", CASES)
def test_perturb_rounds_to_nearest_even(backend, device, dtype):
    """p <- p + e with e a given fraction of the parameter's ulp (scale exactly 1:
    rho = 1, N² = 1, norm_eps = 0): below half an ulp p is unchanged, exactly half
    an ulp rounds to the even neighbour (ties), beyond half rounds away; every
    result equals torch's own rounding of the float32 sum (SPEC §1: formed in
    float32, rounded once); inf stays inf, NaN stays NaN, a tie above the
    largest finite value overflows to inf."""
    be = get_backend(backend, device)
    # 1.5 has an even last bit, its upper neighbour an odd one (both dtypes)
    base = torch.tensor([1.5, 1.5, -1.5, 3.0, 1.5], dtype=dtype)
    odd = torch.nextafter(base, torch.full_like(base, math.inf) * base.sign())
    fracs = torch.tensor([0.25, 0.49, 0.5, 0.51, 0.75, 1.5, -0.25, -0.49, -0.5])
    rows_p, rows_e = [], []
    for p0 in torch.cat([base, odd]):
        ulp = _spacing_up(p0.reshape(1))[0]
        for f in fracs:
            rows_p.append(p0)
            rows_e.append(float(f) * float(ulp) * float(torch.sign(p0.float())))
    big = torch.finfo(dtype).max
    top_ulp = float(_spacing_up(torch.tensor([big], dtype=dtype).nextafter(
        torch.tensor([0.0], dtype=dtype)))[0])          # spacing just below max
    specials_p = [big, -big, math.inf, -math.inf, 1.0]
    specials_e = [top_ulp / 2, -top_ulp / 2, 1.0, -1.0, 0.0]
    p = torch.stack(rows_p + [torch.tensor(x, dtype=dtype) for x in specials_p]).to(device)
    e = torch.tensor(rows_e + specials_e, dtype=torch.float32).to(device)
    want = (p.float() + e).to(dtype)                    # torch: round to nearest even
    p_before = p.clone()
    b = torch.empty_like(p)
    fi = torch.zeros((), device=device)
    be.perturb([p], [e], [b], None, None, rho=1.0,
               norm_sq=torch.ones((), dtype=be.norm_dtype, device=device), norm_eps=0.0,
               beta2=0.999, eps=EPS, precondition=False, grad_scale=None, found_inf=fi)
    assert fi.item() == 0
    assert torch.equal(b, p_before)
    assert torch.equal(p.view(torch.int16), want.view(torch.int16)), (
        f"{backend}/{dtype}: {int((p != want).sum())} of {p.numel()} elements not rounded to "
        f"nearest even, e.g. {p[p != want][:4].tolist()} vs {want[p != want][:4].tolist()}")
    # the same facts without torch's rounding: below half an ulp, and even ties, stay
    n = len(fracs)
    for j, p0 in enumerate(torch.cat([base, odd])):
        row = p[j * n:(j + 1) * n].cpu()
        even = j < len(base)
        assert row[0] == p0 and row[1] == p0, "an update below half an ulp moved p"
        assert (row[2] == p0) == even, "a tie did not round to even"
    assert torch.isinf(p[-5]) and p[-5] > 0 and torch.isinf(p[-4]) and p[-4] < 0
    nan_p = torch.tensor([math.nan, 1.0], dtype=dtype, device=device)
    nan_e = torch.tensor([0.0, math.nan], device=device)
    be.perturb([nan_p], [nan_e], [torch.empty_like(nan_p)], None, None, rho=1.0,
               norm_sq=torch.ones((), dtype=be.norm_dtype, device=device), norm_eps=0.0,
               beta2=0.999, eps=EPS, precondition=False, grad_scale=None, found_inf=fi)
    assert torch.isnan(nan_p).all()


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend,device", CASES)
def test_sub_ulp_adamw_updates_leave_16bit_params_unchanged(backend, device, dtype):
    """AdamW updates of about 0.3 ulp (lr = 0.3 ulp; |m̂/sqrt(v̂)| = 1 for a
    constant grad) towards and away from zero, 20 steps through restore_adamw:
    round to nearest even keeps every parameter bitwise where it was (a
    truncating store moved those stepped towards zero by one ulp per step),
    while exp_avg / exp_avg_sq / step advance as the reference's."""
    be = get_backend(backend, device)
    ref = get_backend("reference", device)
    p0 = torch.tensor([1.5, -1.5, 1.5, -1.5, 1.75, -1.25], dtype=dtype)
    # 1.5, 1.75, 1.25 all lie in [1, 2): one ulp there, for both sides
    ulp = float(_spacing_up(torch.tensor([1.5], dtype=dtype))[0])
    g = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0])   # towards 0 for the first two
    hp = dict(lr=0.3 * ulp, beta1=0.9, beta2=0.999, eps=EPS, weight_decay=0.0,
              maximize=False, grad_scale=None)
    runs = []
    for b_ in (be, ref):
        p = p0.clone().to(device)
        m = torch.zeros(p.shape, device=device)
        v = torch.zeros(p.shape, device=device)
        t = [torch.zeros((), device=device)]
        fi = torch.zeros((), device=device)
        for _ in range(20):
            b_.restore_adamw([p], [g.to(device)], None, [m], [v], t, found_inf=fi, **hp)
        runs.append((p, m, v, t[0]))
    (p, m, v, t), (_, m_r, v_r, t_r) = runs
    assert torch.equal(p.cpu(), p0), f"{backend}/{dtype}: {p.tolist()} drifted from {p0.tolist()}"
    torch.testing.assert_close(m, m_r, rtol=F32_RTOL_10, atol=F32_ATOL)
    torch.testing.assert_close(v, v_r, rtol=F32_RTOL_10, atol=F32_ATOL)
    assert t.item() == t_r.item() == 20
