"""The kernel cases of docs/CASES.md section A, each written once, on every backend.

Every test takes the ``target`` fixture (tests/conformance.py): each row of
``conformance.BACKENDS`` on each device the registry reports it available on
(foreach, cpu in every instruction set this CPU has, cuda on a GPU or as the
emulated build in a FSAM_CUDA_EMULATE=1 process, triton on a GPU or through
the interpreter), against the reference backend or against exact values,
with SPEC §5's tolerances from the row. Case ids (D-A1 ...) are those of
../shared/cases/CASES.md; what is specific to one backend (instruction-set
selection, library loading, the ctypes ABI, ``cache=``, launch counts, Triton
AOT compilation) stays in tests/test_native.py and tests/test_triton.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from conformance import (BF16, BETA1, BETA2, EPS, F16, F32, NORM_EPS, REF, assert_bitwise,
                         assert_spec_close, assert_states_bitwise, assert_states_close,
                         clone_state, compare_ops, make_state, run_parity, sam_step, state_for,
                         target, targets)  # noqa: F401 (target: the fixture)
from helpers import F32_ATOL, NORM_RTOL

PRECOND = pytest.mark.parametrize("precondition", [False, True], ids=["plain", "precond"])


# ----------------------------------------------------------------------------
# A. Empty tensors and empty groups
# ----------------------------------------------------------------------------
@targets()
@pytest.mark.parametrize("precondition,fresh", [(False, False), (True, False), (False, True)],
                         ids=["plain", "precond", "fresh"])
def test_DA1_thousand_empty_tensors_then_one(target, precondition, fresh):
    """D-A1: 1,000 empty tensors and one 8-element one: the 8-element param
    updates as the reference, N² is its grad's alone, every step is counted."""
    info, be, device = target
    shapes = [(0,)] * 1000 + [(8,)]
    st = make_state(shapes, F32, F32, device, seed=7, steps=[0 if fresh else 2] * 1001,
                    zero_state=fresh)
    a, b = clone_state(st), clone_state(st)
    na, pa, ba, _ = sam_step(be, a, precondition=precondition)
    nb, pb, _, _ = sam_step(REF, b, precondition=precondition)
    alone = torch.zeros((), dtype=torch.float64, device=device)
    REF.sq_norm(st["grads1"][-1:], st["exp_avg_sqs"][-1:], st["steps"][-1:], beta2=BETA2,
                eps=EPS, precondition=precondition, grad_scale=None, out=alone)
    torch.testing.assert_close(na.double().cpu(), alone.cpu(), rtol=NORM_RTOL, atol=0)
    assert_bitwise(ba[-1], st["params"][-1], "backup of the 8-element param")
    assert_spec_close(pa[-1], pb[-1], "perturbed 8-element param", info.f32_rtol, info.f32_atol)
    assert_states_close(a, b, "D-A1", info.f32_rtol, info.f32_atol, info)
    assert all(float(s) == (1.0 if fresh else 3.0) for s in a["steps"])


@targets()
@pytest.mark.parametrize("empty_first", [False, True])
@pytest.mark.parametrize("wd,expected", [(0.0, 0.9990000001), (0.01, 0.99899)])
def test_DA2_exact_values(target, empty_first, wd, expected):
    """D-A2: [16 fp32 ones, empty] (and empty first), grads ones, lr 1e-3:
    p = 0.9990000001 (wd 0) and 0.99899 (wd 0.01), within F32_ATOL, both
    variants, and bitwise the reference's."""
    info, be, device = target
    shapes = [(0,), (16,)] if empty_first else [(16,), (0,)]
    for precondition in (False, True):
        st = make_state(shapes, F32, None, device, steps=[0, 0], p_fill=1.0, g_fill=1.0,
                        zero_state=True)
        ref = clone_state(st)
        sam_step(be, st, precondition=precondition, lr=1e-3, wd=wd)
        sam_step(REF, ref, precondition=precondition, lr=1e-3, wd=wd)
        i = 1 if empty_first else 0
        p = st["params"][i].cpu()
        torch.testing.assert_close(p, torch.full((16,), expected, dtype=F32), rtol=0,
                                   atol=F32_ATOL)
        assert_bitwise(p, ref["params"][i], "D-A2 vs reference")


@targets()
def test_empty_tensor_at_every_position(target):
    """D-A1/D-A2's kind: an empty tensor first, inside and last, beside tensors
    that span several chunks (the threaded / multi-program path): every op as
    the reference."""
    info, be, device = target
    n = info.size(device)
    base = [(5,), (2 * n + 3,), (64, 3), (1,)]
    for pos in range(len(base) + 1):
        shapes = base[:pos] + [(0,)] + base[pos:]
        st = make_state(shapes, F32, F32, device, seed=pos)
        compare_ops(be, device, st, precondition=pos % 2 == 1, info=info)


@targets()
def test_all_empty_and_no_tensors(target):
    """No tensors, or only empty ones: N² = 0, every op runs, steps counted;
    a non-finite N² with no tensors at all still marks the step skipped."""
    info, be, device = target
    for shapes in ([], [(0,)], [(0,), (0, 3)]):
        st = make_state(shapes, F32, F32, device)
        out = torch.zeros((), dtype=be.norm_dtype, device=device)
        be.sq_norm(st["grads1"], st["exp_avg_sqs"], st["steps"], beta2=BETA2, eps=EPS,
                   precondition=True, grad_scale=None, out=out)
        assert float(out) == 0.0
        fi = torch.zeros((), device=device)
        be.perturb(st["params"], st["grads1"], [torch.empty_like(p) for p in st["params"]],
                   None, None, rho=0.05, norm_sq=out, norm_eps=NORM_EPS, beta2=BETA2, eps=EPS,
                   precondition=False, grad_scale=None, found_inf=fi)
        be.restore_adamw(st["params"], st["grads2"], None, st["exp_avgs"], st["exp_avg_sqs"],
                         st["steps"], lr=1e-3, beta1=BETA1, beta2=BETA2, eps=EPS,
                         weight_decay=0.0, maximize=False, grad_scale=None, found_inf=fi)
        be.restore(st["params"], [p.clone() for p in st["params"]])
        assert float(fi) == 0.0
        assert all(float(s) == (i % 4) + 1 for i, s in enumerate(st["steps"]))
    fi = torch.zeros((), device=device)
    be.perturb([], [], [], None, None, rho=0.05,
               norm_sq=torch.tensor(float("inf"), dtype=torch.float64, device=device),
               norm_eps=NORM_EPS, beta2=BETA2, eps=EPS, precondition=False, grad_scale=None,
               found_inf=fi)
    assert float(fi) == 1.0


# ----------------------------------------------------------------------------
# C. Non-finite values, loss scaling, skipped steps
# ----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf/nan
@targets()
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@PRECOND
@pytest.mark.parametrize("preset", [True, False], ids=["found_inf=1", "found_by_norm"])
def test_DC1_skip_leaves_everything_bitwise(target, bad, precondition, preset):
    """D-C1: a non-finite grad element in either pass (found_inf preset or
    found by perturb from N²): params, exp_avg, exp_avg_sq and steps bitwise
    unchanged, nothing perturbed, the backups still written, found_inf = 1."""
    info, be, device = target
    if not info.found_inf:
        pytest.skip(f"{info.name} does not honour found_inf")
    st = make_state([(50,), (0,), (info.size(device) + 1,), (7, 3)], [F32, F32, BF16, BF16],
                    [None, None, None, F32], device, seed=13, steps=[3, 0, 5, 2])
    st["grads1"][2][7] = bad
    st["grads2"][0][3] = bad
    before = clone_state(st)
    fi = torch.ones((), device=device) if preset else torch.zeros((), device=device)
    n, pert, backups, fi = sam_step(be, st, precondition=precondition, found_inf=fi)
    assert float(fi) == 1.0
    assert not math.isfinite(float(n))
    for i in range(4):
        assert_bitwise(pert[i], before["params"][i], f"perturb skipped params[{i}]")
        assert_bitwise(backups[i], before["params"][i], f"backups[{i}] still written")
    assert_states_bitwise(st, before, "skipped")


@targets()
def test_DC1_skip_without_backups(target):
    """D-C1: restore_adamw with found_inf = 1 and no backups changes nothing."""
    info, be, device = target
    st = make_state([(50,), (7,)], F32, None, device, seed=14)
    before = clone_state(st)
    be.restore_adamw(st["params"], st["grads2"], None, st["exp_avgs"], st["exp_avg_sqs"],
                     st["steps"], lr=1e-3, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=0.1,
                     maximize=False, grad_scale=None, found_inf=torch.ones((), device=device))
    assert_states_bitwise(st, before)


@targets()
@PRECOND
@pytest.mark.parametrize("gdtype", [F32, BF16, F16, "mixed"],
                         ids=["float32", "bfloat16", "float16", "mixed"])
def test_DC2_grad_scale_equals_unscaled(target, precondition, gdtype):
    """D-C2: grads pre-multiplied by 1024 with grad_scale = 1024 give bitwise
    the unscaled run of the same backend (division by a power of two is
    exact), and the reference within SPEC §5 (N², perturbed params, state)."""
    info, be, device = target
    if not info.grad_scale:
        pytest.skip(f"{info.name} takes no grad_scale")
    gd = [F32, BF16, F32] if gdtype == "mixed" else gdtype
    st = make_state([(300,), (0,), (info.size(device) + 9,)], F32, gd, device, seed=15)
    if gdtype == F16:  # keep grad * 1024 finite in fp16
        for k in ("grads1", "grads2"):
            st[k] = [(g.float() / 64).to(gdtype) for g in st[k]]
    scaled, plain, ref = clone_state(st), clone_state(st), clone_state(st)
    for k in ("grads1", "grads2"):
        scaled[k] = [g * 1024 for g in scaled[k]]
    gs = torch.tensor(1024.0, device=device)
    ns, ps, _, _ = sam_step(be, scaled, precondition=precondition, grad_scale=gs)
    nu, pu, _, _ = sam_step(be, plain, precondition=precondition)
    nr, pr, _, _ = sam_step(REF, ref, precondition=precondition)
    assert_bitwise(ns, nu, "N² scaled vs unscaled")
    for i in range(3):
        assert_bitwise(ps[i], pu[i], f"perturbed[{i}]")
        assert_spec_close(ps[i], pr[i], f"perturbed[{i}] vs reference", info.f32_rtol,
                          info.f32_atol)
    assert_states_bitwise(scaled, plain, "scaled vs unscaled")
    torch.testing.assert_close(ns.double().cpu(), nr.cpu(), rtol=NORM_RTOL, atol=0)
    assert_states_close(scaled, ref, "scaled vs reference", info.f32_rtol, info.f32_atol, info)


# ----------------------------------------------------------------------------
# D. Zero grads, fp16 accumulation, low-precision norms
# ----------------------------------------------------------------------------
@targets()
@PRECOND
def test_DD1_zero_grads(target, precondition):
    """D-D1: every grad 0, p = 1, rho 0.05, wd 0.01, lr 1e-3: N² = 0, no NaN,
    perturbation exactly 0, p = 0.99999 (within F32_ATOL; bitwise the float32
    0.99999 and the reference's)."""
    info, be, device = target
    st = make_state([(100,), (0,), (33,), (3, 4)], F32, None, device, p_fill=1.0, g_fill=0.0,
                    steps=[0, 0, 0, 0], zero_state=True)
    ref = clone_state(st)
    n, pert, _, fi = sam_step(be, st, precondition=precondition, rho=0.05, lr=1e-3, wd=0.01)
    sam_step(REF, ref, precondition=precondition, rho=0.05, lr=1e-3, wd=0.01)
    assert float(n) == 0.0 and float(fi) == 0.0
    for i, p in enumerate(pert):
        assert_bitwise(p, torch.ones_like(p), f"zero perturbation [{i}]")
    for i, (p, q) in enumerate(zip(st["params"], ref["params"])):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.cpu(), torch.full(p.shape, 0.99999), rtol=0, atol=F32_ATOL)
        assert_bitwise(p, torch.full_like(p, 0.99999), f"params[{i}] = fl32(0.99999)")
        assert_bitwise(p, q, f"params[{i}] vs reference")


@targets()
def test_DD1_zero_grad_beside_normal_grad(target):
    """D-D1: one all-zero grad beside a normal one: N² is the normal one's
    alone, no NaN, and the step (plain and preconditioned) is the reference's."""
    info, be, device = target
    for precondition in (False, True):
        st = make_state([(100,), (40,)], F32, None, device, seed=16)
        st["grads1"][0].zero_()
        st["grads2"][0].zero_()
        ref, p0 = clone_state(st), st["params"][0].clone()
        n, pert, _, _ = sam_step(be, st, precondition=precondition)
        sam_step(REF, ref, precondition=precondition)
        if not precondition:
            torch.testing.assert_close(float(n), float((st["grads1"][1].double() ** 2).sum()),
                                       rtol=NORM_RTOL, atol=0)
        assert_bitwise(pert[0], p0, "no perturbation where the grad is zero")
        assert torch.isfinite(torch.cat([p.flatten() for p in st["params"]])).all()
        assert_states_close(st, ref, "zero beside normal", info.f32_rtol, info.f32_atol, info)


@targets()
@pytest.mark.parametrize("pdtype", [F32, F16])
def test_DD2_fp16_norm_accumulation(target, pdtype):
    """D-D2: 1,000 fp16 grads of 10.0: N² = 1e5 finite (sqrt 316.22777), each
    perturbation element 0.05 * 10 / 316.22777 = 0.00158114."""
    info, be, device = target
    st = make_state([(1000,)], pdtype, F16, device, p_fill=0.0, g_fill=10.0, steps=[0])
    n, pert, _, fi = sam_step(be, st, precondition=False, rho=0.05)
    assert float(fi) == 0.0 and math.isfinite(float(n))
    assert float(n) == pytest.approx(1000 * 10.0 ** 2, rel=NORM_RTOL)
    assert math.isclose(math.sqrt(float(n)), 316.22777, rel_tol=1e-7)
    expected = torch.full((1000,), 0.05 * 10.0 / (math.sqrt(1000 * 100.0) + NORM_EPS),
                          dtype=torch.float64)
    if pdtype == F32:
        torch.testing.assert_close(pert[0].double().cpu(), expected, rtol=info.f32_rtol, atol=0)
        assert math.isclose(float(pert[0][0]), 0.00158114, rel_tol=1e-5)
    else:
        assert_spec_close(pert[0].cpu(), expected.to(pdtype), "fp16 perturbation", ulps=info.ulps)


@targets()
def test_DD3_low_precision_ones_norms(target):
    """D-D3: 1,000,000 bf16 ones have norm 1000, 65,536 fp16 ones 256 (NORM_RTOL)."""
    info, be, device = target
    for dtype, n, expected in ((BF16, 1_000_000, 1000.0), (F16, 65536, 256.0)):
        out = torch.zeros((), dtype=be.norm_dtype, device=device)
        be.sq_norm([torch.ones(n, dtype=dtype, device=device)], None, None, beta2=BETA2, eps=EPS,
                   precondition=False, grad_scale=None, out=out)
        assert math.isclose(math.sqrt(float(out)), expected, rel_tol=NORM_RTOL)


# ----------------------------------------------------------------------------
# E. Layouts
# ----------------------------------------------------------------------------
@targets()
def test_DE2_non_dense_param_is_a_clear_error(target):
    """D-E2's other side: a strided (every other column) or expanded
    (overlapping) param is refused with ValueError naming it, never updated
    in the wrong place."""
    info, be, device = target
    if be.name == "foreach":
        pytest.skip("foreach: torch's own ops handle any layout by logical index")
    w = torch.randn(16, 32, device=device)
    for bad in (w[:, ::2], torch.randn(1, 5, device=device).expand(3, 5)):
        params = [torch.randn(4, device=device), bad]
        grads = [torch.randn_like(p) for p in params]
        out = torch.zeros((), dtype=be.norm_dtype, device=device)
        with pytest.raises(ValueError, match=r"params\[1\].*not dense"):
            be.perturb(params, grads, [torch.empty_like(p) for p in params], None, None,
                       rho=0.05, norm_sq=out, norm_eps=NORM_EPS, beta2=BETA2, eps=EPS,
                       precondition=False, grad_scale=None,
                       found_inf=torch.zeros((), device=device))
        with pytest.raises(ValueError, match=r"params\[1\]"):
            be.restore(params, [torch.empty_like(p) for p in params])
    overlapping = torch.randn(1, device=device).expand(8)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        be.restore([overlapping], [torch.zeros(8, device=device)])


# ----------------------------------------------------------------------------
# F. Dtypes
# ----------------------------------------------------------------------------
@targets()
@PRECOND
def test_DF5_maximize_equals_negated_grad(target, precondition):
    """D-F5: maximize with grad g is bitwise the run with -g and maximize off."""
    info, be, device = target
    st = make_state([(200,), (0,), (info.size(device) + 3,)], [F32, F32, BF16], None, device,
                    seed=17)
    a, b = clone_state(st), clone_state(st)
    b["grads2"] = [-g for g in b["grads2"]]
    sam_step(be, a, precondition=precondition, maximize=True)
    sam_step(be, b, precondition=precondition, maximize=False)
    assert_states_bitwise(a, b, "maximize vs negated grad")


# ----------------------------------------------------------------------------
# J. Determinism
# ----------------------------------------------------------------------------
def _determinism_run(be, device, big, dim_hi):
    gen = torch.Generator().manual_seed(20)
    shapes = []
    for i in range(200):
        nd = int(torch.randint(1, 4, (1,), generator=gen))
        shapes.append(tuple(int(x) for x in torch.randint(0, dim_hi, (nd,), generator=gen)))
    if big is not None:
        shapes[7] = (3 * big + 5,)
        shapes[150] = (2 * big - 1,)
    st = make_state(shapes, F32, None, device, seed=21)
    norms = []
    for step in range(3):
        n, *_ = sam_step(be, st, precondition=step > 0)
        norms.append(n.clone())
    return norms, st


@targets()
def test_DJ1_determinism(target):
    """D-J1: two runs of 3 steps over 200 params of random shapes (two of them
    several chunks long; dims below 12 and no long ones where interpreted), each with a
    fresh backend object: norms, params and state bitwise identical."""
    info, be, device = target
    small = info.small(device)   # interpreted: small tensors only (a few ms per program)
    dim_hi, big = (12, None) if small else (40, info.size(device))
    n1, s1 = _determinism_run(type(be)(), device, big, dim_hi)
    n2, s2 = _determinism_run(type(be)(), device, big, dim_hi)
    for a, b in zip(n1, n2):
        assert_bitwise(a, b, "norms")
    assert_states_bitwise(s1, s2, "second run")


# ----------------------------------------------------------------------------
# Every op against the reference: dtype pairs, mixed dtypes, several steps
# ----------------------------------------------------------------------------
def _shapes(info, device):
    """Sizes around the row's chunk: not multiples of it, empties at the ends and inside."""
    n = info.size(device)
    return [(0,), (8,), (33, 17), (n - 1,), (0, 4), (n + 1,), (2 * n + 3,), (3,), (0,)]


@targets()
@PRECOND
@pytest.mark.parametrize("pdtype,gdtype", [
    (F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (F32, F16), (BF16, F32),
    (torch.float64, torch.float64), (torch.float64, F32), (F32, torch.float64),
], ids=lambda d: str(d).replace("torch.", ""))
def test_ops_match_reference(target, precondition, pdtype, gdtype):
    """SPEC §6: each op (sq_norm, perturb, restore_adamw, restore) as the
    reference from the same inputs, for every parameter/grad dtype pair, over
    sizes around the chunk with empty tensors anywhere (conformance.compare_ops)."""
    info, be, device = target
    if pdtype not in info.dtypes:
        pytest.skip(f"{info.name} takes no {pdtype} params")
    st = make_state(_shapes(info, device), pdtype, gdtype, device, seed=1)
    compare_ops(be, device, st, precondition, info=info)


@targets()
@PRECOND
def test_full_step_matches_reference(target, precondition):
    """A whole step, each backend with its own N² (NORM_RTOL), mixed
    float32/bfloat16/float16 params: perturbed params and state per SPEC §5,
    backups bitwise the parameters."""
    info, be, device = target
    st = make_state(_shapes(info, device), [F32, BF16, F16] * 3, None, device, seed=6)
    a, b = clone_state(st), clone_state(st)
    na, pa, ba, fa = sam_step(be, a, precondition=precondition)
    nb, pb, _, _ = sam_step(REF, b, precondition=precondition)
    assert na.dtype == torch.float64 and float(fa) == 0.0
    torch.testing.assert_close(na.double().cpu(), nb.cpu(), rtol=NORM_RTOL, atol=0)
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert_bitwise(ba[i], st["params"][i], f"backups[{i}]")
        assert_spec_close(x, y, f"perturbed[{i}]", info.f32_rtol, info.f32_atol)
    assert_states_close(a, b, "full step", info.f32_rtol, info.f32_atol, info)


@targets()
@PRECOND
def test_full_step_float64(target, precondition):
    """float64 params (float64 state): a whole step as the reference within
    the row's float64 figures, the perturbation within F64_SCALE_RTOL of the
    float32 rounding of its scale (SPEC §1)."""
    info, be, device = target
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in ((300,), (4, 5))]
    g1 = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device) for p in params]
    g2 = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device) for p in params]
    run_parity(be, state_for(params, g1, g2), precondition, info=info)


@targets()
@PRECOND
def test_mixed_dtypes_in_one_call(target, precondition):
    """fp32/bf16/fp16 params with bf16/fp32/fp16 grads in one call (every
    pairing of D-F2's kind): each op and the whole step as the reference."""
    info, be, device = target
    pd = [F32, BF16, F16, F32, BF16, F32]
    gd = [BF16, F32, F16, F16, BF16, F32]
    shapes = [(100,), (0,), (info.size(device) + 5,), (7, 9), (1000,), (5,)]
    st = make_state(shapes, pd, gd, device, seed=2)
    compare_ops(be, device, st, precondition, info=info)
    a, b = clone_state(st), clone_state(st)
    na, pa, _, _ = sam_step(be, a, precondition=precondition)
    nb, pb, _, _ = sam_step(REF, b, precondition=precondition)
    torch.testing.assert_close(na.double().cpu(), nb.cpu(), rtol=NORM_RTOL, atol=0)
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert_spec_close(x, y, f"perturbed[{i}]", info.f32_rtol, info.f32_atol)
    assert_states_close(a, b, "mixed step", info.f32_rtol, info.f32_atol, info)


@targets()
@PRECOND
def test_grad_scale_and_maximize_match_reference(target, precondition):
    """grad_scale 256 and maximize together, each op as the reference."""
    info, be, device = target
    st = make_state([(300,), (0,), (info.size(device) + 9,)], F32, F32, device, seed=3)
    compare_ops(be, device, st, precondition, grad_scale=256.0, maximize=True, info=info)


@targets()
@pytest.mark.parametrize("precondition,fresh", [(False, False), (True, False), (True, True)],
                         ids=["plain", "precond", "precond-fresh"])
def test_ten_steps_within_tolerance(target, precondition, fresh):
    """Ten steps (three where interpreted) with new grads each step (``fresh``: from t = 0 and zero
    state, so the first preconditioned step is plain): N² within F32_RTOL_10
    every step, params and state within F32_RTOL_10 (atol 1e-6: ten updates
    of lr 1e-3) after ten; within the one-step figures after the first and
    F32_RTOL_10 / F32_ATOL after the second and third; backups bitwise."""
    from helpers import F32_RTOL_10

    info, be, device = target
    st = make_state([(1000,), (0,), (40, 30)], F32, F32, device, seed=4,
                    steps=[0, 0, 0] if fresh else None, zero_state=fresh)
    a, b = clone_state(st), clone_state(st)
    gen = torch.Generator().manual_seed(5)
    n_steps = 3 if info.small(device) else 10   # interpreted: three steps
    for k in range(n_steps):
        for key in ("grads1", "grads2"):
            for ga, gb in zip(a[key], b[key]):
                g = torch.randn(ga.shape, generator=gen).to(device)
                ga.copy_(g)
                gb.copy_(g)
        before = [p.clone() for p in a["params"]]
        na, pa, ba, _ = sam_step(be, a, precondition=precondition)
        nb, pb, _, _ = sam_step(REF, b, precondition=precondition)
        torch.testing.assert_close(na.double().cpu(), nb.cpu(),
                                   rtol=NORM_RTOL if k == 0 else F32_RTOL_10, atol=0)
        for i in range(3):
            assert_bitwise(ba[i], before[i], f"step {k} backups[{i}]")
        if k < 3:   # the first steps: the one-step figures, then F32_RTOL_10
            rtol = info.f32_rtol if k == 0 else F32_RTOL_10
            for i in range(3):
                assert_spec_close(pa[i], pb[i], f"step {k} perturbed[{i}]", rtol, info.f32_atol)
            assert_states_close(a, b, f"after {k + 1} steps", rtol, info.f32_atol, info)
    assert_states_close(a, b, f"after {n_steps} steps", rtol=F32_RTOL_10, atol=1e-6, info=info)
    if fresh:
        assert all(float(s) == n_steps for s in a["steps"])


@targets()
def test_steps_are_per_tensor(target):
    """D-A3 / D-G3: each tensor uses its own t for the bias corrections."""
    info, be, device = target
    st = make_state([(64,), (64,), (64,)], F32, None, device, seed=18, steps=[0, 10, 3])
    compare_ops(be, device, st, precondition=True, info=info)
    a, b = compare_ops(be, device, st, precondition=False, info=info)
    assert [float(s) for s in a["steps"]] == [1.0, 11.0, 4.0]


@targets()
def test_restore_bitwise_and_restore_adamw_without_backups(target):
    """restore copies bitwise (16-bit and empty tensors included); restore_adamw
    with backups None updates the params in place as the reference."""
    info, be, device = target
    gen = torch.Generator().manual_seed(40)
    p = [torch.randn(300, generator=gen).to(device), torch.randn(5, 5, generator=gen).to(device, BF16),
         torch.empty(0, device=device)]
    b = [torch.randn(x.shape, generator=gen).to(device, x.dtype) for x in p]
    be.restore(p, b)
    for i, (x, y) in enumerate(zip(p, b)):
        assert_bitwise(x, y, f"restore[{i}]")
    st = make_state([(300,), (5, 5), (0,)], [F32, BF16, F32], F32, device, seed=41,
                    steps=[5, 5, 5])
    ref = clone_state(st)
    for bk, s in ((be, st), (REF, ref)):
        bk.restore_adamw(s["params"], s["grads2"], None, s["exp_avgs"], s["exp_avg_sqs"],
                         s["steps"], lr=1e-3, beta1=BETA1, beta2=BETA2, eps=EPS,
                         weight_decay=0.01, maximize=False, grad_scale=None,
                         found_inf=torch.zeros((), device=device))
    assert_states_close(st, ref, "no backups", info.f32_rtol, info.f32_atol, info)


# ----------------------------------------------------------------------------
# E. Layouts: views at odd offsets, strides, channels_last, transposes
# ----------------------------------------------------------------------------
def _views_state(device, dtype, seed, n):
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randn(n + 2000, generator=gen).to(dtype).to(device)
    params = [buf[1:101], buf[103:353].view(10, 25), buf[357:357], buf[361:361 + n + 7]]
    st = make_state([tuple(p.shape) for p in params], dtype, None, device, seed=seed)
    return buf, params, st


@targets()
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_views_at_odd_offsets(target, dtype):
    """Params that are views into one buffer at odd element offsets (S9):
    as the reference (plain then preconditioned), and no byte outside the
    views touched; storage offsets kept."""
    info, be, device = target
    n = info.size(device)
    buf_a, pa, st = _views_state(device, dtype, 10, n)
    buf_b, pb, _ = _views_state(device, dtype, 10, n)
    a, b = clone_state(st), clone_state(st)
    a["params"], b["params"] = pa, pb
    for precondition in (False, True):
        sam_step(be, a, precondition=precondition)
        sam_step(REF, b, precondition=precondition)
    assert_states_close(a, b, "odd-offset views", info.f32_rtol, info.f32_atol, info)
    assert a["params"][0].storage_offset() == 1
    gen = torch.Generator().manual_seed(10)
    orig = torch.randn(n + 2000, generator=gen).to(dtype).to(device)
    inside = torch.zeros(buf_a.numel(), dtype=torch.bool, device=device)
    for lo, hi in ((1, 101), (103, 353), (361, 361 + n + 7)):
        inside[lo:hi] = True
    assert_bitwise(buf_a[~inside], orig[~inside], "bytes outside the views")


@targets()
@PRECOND
def test_views_of_mixed_dtypes_at_odd_offsets(target, precondition):
    """Param and grad views at different odd offsets of their buffers, a
    bfloat16 param view with a float32 grad and a bfloat16 second-pass grad:
    the full step as the reference."""
    info, be, device = target
    gen = torch.Generator().manual_seed(3)

    def rn(shape, dtype=F32):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    pbuf, gbuf1, gbuf2, hbuf = rn((3000,)), rn((3000,)), rn((3000,)), rn((2000,), BF16)
    params = [pbuf[1:1002], pbuf[1003:1003 + 35].view(5, 7), pbuf[2001:2998], hbuf[3:400]]
    g1 = [gbuf1[7:1008], gbuf1[1101:1136].view(5, 7), gbuf1[5:1002], rn((397,))]
    g2 = [gbuf2[3:1004], gbuf2[11:46].view(5, 7), gbuf2[1:998], rn((397,), BF16)]
    run_parity(be, state_for(params, g1, g2), precondition, info=info)


def _run_with_layout(be, device, p_maker, g_maker, precondition, seed=11):
    """A SAM step on params/grads made by the given layout functions (same values)."""
    st = make_state([(64, 3, 3, 3), (2, 1, 100)], F32, None, device, seed=seed)
    st = clone_state(st)
    st["params"] = [p_maker(p) for p in st["params"]]
    for k in ("exp_avgs", "exp_avg_sqs"):
        st[k] = [p_maker(v) for v in st[k]]
    for k in ("grads1", "grads2"):
        st[k] = [g_maker(g) for g in st[k]]
    n2 = torch.tensor(500.0, dtype=torch.float64, device=device)  # fixed N²: compared bitwise
    sam_step(be, st, precondition=precondition, norm_sq=n2)
    return st


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.clone()


def _odd_strides(t):
    """(2,1,100) with strides (100,1,1): the size-1 dim's stride differs from contiguous."""
    if t.shape == (2, 1, 100):
        out = torch.empty_strided((2, 1, 100), (100, 1, 1), dtype=t.dtype, device=t.device)
        return out.copy_(t)
    return t.clone()


def _transposed_copy(t):
    """The same logical values held in a transposed (last two dims swapped) layout."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


_LAYOUTS = {"contiguous": lambda t: t.clone(), "channels_last": _channels_last,
            "odd_strides": _odd_strides, "transposed": _transposed_copy}


@targets()
@PRECOND
@pytest.mark.parametrize("p_layout,g_layout", [
    ("contiguous", "channels_last"), ("channels_last", "contiguous"),
    ("channels_last", "channels_last"), ("contiguous", "odd_strides"),
    ("odd_strides", "contiguous"), ("transposed", "contiguous"), ("contiguous", "transposed"),
])
def test_DE1_layouts_by_logical_index(target, precondition, p_layout, g_layout):
    """D-E1: params/state and grads in other layouts (channels_last, a size-1
    dim's odd stride, transposed) give bitwise, by logical index, the
    contiguous run of the same backend; the param's layout is kept."""
    info, be, device = target
    ref = _run_with_layout(be, device, _LAYOUTS["contiguous"], _LAYOUTS["contiguous"], precondition)
    got = _run_with_layout(be, device, _LAYOUTS[p_layout], _LAYOUTS[g_layout], precondition)
    for k in ("params", "exp_avgs", "exp_avg_sqs"):
        for i, (x, y) in enumerate(zip(got[k], ref[k])):
            assert x.stride() == _LAYOUTS[p_layout](y).stride()  # layout kept
            assert_bitwise(x.contiguous(), y, f"{p_layout}/{g_layout} {k}[{i}]")


@targets()
@PRECOND
def test_DE1_strided_layouts_match_reference(target, precondition):
    """D-E1, D-E2 against the reference: a size-1 dim's odd grad stride,
    channels_last param with contiguous grad and the reverse, a transposed
    (128, 64).t() param, a bf16 transposed param with a transposed grad."""
    info, be, device = target
    gen = torch.Generator().manual_seed(5)

    def rn(shape, dtype=F32):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    cl = torch.channels_last
    p0 = rn((2, 1, 100))
    g0 = torch.empty_strided((2, 1, 100), (100, 1, 1), device=device).copy_(rn((2, 1, 100)))
    p1, g1 = rn((64, 3, 3, 3)).contiguous(memory_format=cl), rn((64, 3, 3, 3))
    p2, g2 = rn((64, 3, 3, 3)), rn((64, 3, 3, 3)).contiguous(memory_format=cl)
    p3, g3 = rn((128, 64)).t(), rn((64, 128))
    p4, g4 = rn((40, 30), BF16).t(), rn((30, 40), BF16).t().contiguous().t()
    h = [rn(p.shape) for p in (p0, p1, p2, p3, p4)]
    h[1] = h[1].contiguous(memory_format=cl)
    a, _ = run_parity(be, state_for([p0, p1, p2, p3, p4], [g0, g1, g2, g3, g4], h),
                      precondition, info=info)
    assert a["params"][1].is_contiguous(memory_format=cl)
    assert not a["params"][3].is_contiguous()


@targets()
def test_DE2_transposed_view_param(target):
    """D-E2: a .t() view of a (128, 64) weight: correct by logical index, the
    underlying weight as the reference's."""
    info, be, device = target
    gen = torch.Generator().manual_seed(12)
    w_a = torch.randn(128, 64, generator=gen).to(device)
    w_b = w_a.clone()
    st = make_state([(64, 128)], F32, None, device, seed=12)
    a, b = clone_state(st), clone_state(st)
    a["params"] = [w_a.t()]
    b["params"] = [w_b.t()]
    for s in (a, b):  # state in the param's layout, as zeros_like(p) would make it
        for k in ("exp_avgs", "exp_avg_sqs"):
            s[k] = [torch.empty_like(s["params"][0]).copy_(v) for v in s[k]]
    for precondition in (False, True):
        sam_step(be, a, precondition=precondition)
        sam_step(REF, b, precondition=precondition)
    assert_states_close(a, b, "transposed view", info.f32_rtol, info.f32_atol, info)
    assert_spec_close(w_a, w_b, "underlying weight", info.f32_rtol, info.f32_atol)


@targets()
def test_strided_equals_contiguous_copies(target):
    """By logical index, a channels_last / transposed run equals the contiguous run."""
    info, be, device = target
    res = []
    for strided in (False, True):
        gen = torch.Generator().manual_seed(9)
        p = [torch.randn(16, 3, 3, 3, generator=gen).to(device),
             torch.randn(48, 20, generator=gen).to(device)]
        g1 = [torch.randn(x.shape, generator=gen).to(device) for x in p]
        g2 = [torch.randn(x.shape, generator=gen).to(device) for x in p]
        if strided:
            p = [p[0].contiguous(memory_format=torch.channels_last), p[1].t().contiguous().t()]
        st = state_for(p, g1, g2, random_state=False, t0=0.0)
        sam_step(be, st, precondition=False)
        res.append(st["params"])
    for a, b in zip(*res):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------
# The call-site cache (base.py ``cache=``)
# ----------------------------------------------------------------------------
@targets()
@PRECOND
def test_cached_steps_equal_uncached(target, precondition):
    """Three steps with one ``cache`` dict per call site and the same tuples
    equal three uncached steps bitwise (N², params, state), new grads every
    step, a param re-pointed with ``.data =`` (new storage) in the second."""
    info, be, device = target
    if not info.cache:
        pytest.skip(f"{info.name} takes no cache=")
    shapes = [(33, 5), (0,), (1000,), (7, 3, 2)]
    a = make_state(shapes, F32, None, device, seed=3, steps=[1, 0, 3, 2])
    b = clone_state(a)
    caches = {"sq": {}, "pt": {}, "ra": {}}
    tup = {k: tuple(v) for k, v in a.items() if k not in ("grads1", "grads2")}
    backups_a = tuple(torch.empty_like(p) for p in a["params"])
    gen = torch.Generator().manual_seed(9)
    kw = dict(beta2=BETA2, eps=EPS, precondition=precondition, grad_scale=None)
    for step in range(3):
        g1 = tuple(torch.randn(s, generator=gen).to(device) for s in shapes)
        g2 = tuple(torch.randn(s, generator=gen).to(device) for s in shapes)
        if step == 1:
            a["params"][2].data = a["params"][2].data.clone()
            b["params"][2].data = b["params"][2].data.clone()
        out = torch.zeros((), dtype=be.norm_dtype, device=device)
        fi = torch.zeros((), device=device)
        be.sq_norm(g1, tup["exp_avg_sqs"], tup["steps"], out=out, cache=caches["sq"], **kw)
        be.perturb(tup["params"], g1, backups_a, tup["exp_avg_sqs"], tup["steps"], rho=0.05,
                   norm_sq=out, norm_eps=NORM_EPS, found_inf=fi, cache=caches["pt"], **kw)
        be.restore_adamw(tup["params"], g2, backups_a, tup["exp_avgs"], tup["exp_avg_sqs"],
                         tup["steps"], lr=1e-2, beta1=BETA1, beta2=BETA2, eps=EPS,
                         weight_decay=0.01, maximize=False, grad_scale=None, found_inf=fi,
                         cache=caches["ra"])
        b["grads1"], b["grads2"] = [g.clone() for g in g1], [g.clone() for g in g2]
        nb, *_ = sam_step(be, b, precondition=precondition, lr=1e-2, wd=0.01)
        assert_bitwise(out, nb, f"step {step} N²")
        assert_states_bitwise(a, b, f"step {step} cached vs uncached")
