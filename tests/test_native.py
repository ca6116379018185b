"""The native backends ("cpu": C++; "cuda": CUDA C++): what is specific to them.

The CASES.md section A cases every backend shares (dtype pairs, empty
tensors, D-A1/D-A2, D-C1/D-C2, D-D1..D-D3, layouts D-E1/D-E2, D-F5, D-J1,
several steps) are in tests/test_conformance.py, which runs them on the cpu
backend in every instruction set and on cuda / the emulated cuda build; this
file keeps instruction-set selection and bitwise agreement across sets and
streaming stores, thread counts and fork, library loading, the ctypes ABI
(casts, CUDA tile tables), argument errors, the call-site ``cache=``,
torch.compile, CUDA graphs and the GPU-large cases.

Tolerances are SPEC §5: float32 rtol 1e-6 / atol 1e-7 after one step (1e-5
after ten), bfloat16/float16 within one ulp of the parameter dtype, restores
and skipped steps bitwise, two runs bitwise identical. Case names (D-A1 ...)
are those of docs/CASES.md section A.

Every kernel test takes the ``device`` fixture, which runs it on each target:
- ``cpu-baseline``, ``cpu-avx2``, ``cpu-avx512``: the CPU kernels with that
  instruction set forced (``native.using_cpu_isa``), each one the CPU has
  (the others are skipped, saying which sets the CPU has), so the suite
  checks every path whichever CPU runs it;
- ``cuda``: the CUDA kernels on CUDA tensors, where a GPU is present;
- ``cuda_emu``: the same CUDA kernel source built for the host with
  csrc/include/fsam/cuda_emu.h, on CPU tensors, only in a process started
  with FSAM_CUDA_EMULATE=1 (tests/test_cuda_emulated.py runs this file so).
The GPU-large cases are marked ``gpu_large`` and skipped without a GPU of
>= 50 GiB.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os

import pytest
import torch

from fsam_kernels.backends import native
from fsam_kernels.backends.native import CPUBackend, CUDABackend
from fsam_kernels.backends.reference import ReferenceBackend

HAS_CUDA = torch.cuda.is_available()
CUDA_EMULATED = bool(getattr(native, "CUDA_EMULATED", False))
_CPU_ISAS = native.supported_cpu_isas() if native.cpu_library() is not None else ()


def _cpu_target(isa):
    marks = [] if isa in _CPU_ISAS else [pytest.mark.skip(
        reason=f"this CPU lacks {isa} (it supports {', '.join(_CPU_ISAS) or 'none: no library'})")]
    return pytest.param(f"cpu-{isa}", id=f"cpu-{isa}", marks=marks)


_CUDA_TARGET = pytest.param("cuda", id="cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")])
_EMU_TARGETS = [pytest.param("cuda_emu", id="cuda_emu")] if CUDA_EMULATED else []
#: every target (use with indirect=True: the ``device`` fixture below)
DEVICES = [_cpu_target(i) for i in native.CPU_ISAS] + [_CUDA_TARGET] + _EMU_TARGETS
#: the CPU kernels on the default instruction set only (for slow tests that
#: exercise no ISA-specific code, e.g. torch.compile tracing)
DEVICES_ONE_ISA = ["cpu"] + [_CUDA_TARGET] + _EMU_TARGETS
REF = ReferenceBackend()
BETA1, BETA2, EPS, NORM_EPS = 0.9, 0.999, 1e-8, 1e-12
CHUNK = 65536  # the CPU chunk; CUDA tiles are a divisor or multiple of it

_target_backend = None  # the backend of the current ``device`` fixture's target


@pytest.fixture
def device(request):
    """The tensors' device of the target ``request.param`` (see the module
    docstring); ``native_backend(device)`` then returns the target's backend."""
    global _target_backend
    target = request.param
    if target.startswith("cpu-"):
        be, dev, isa = CPUBackend, "cpu", target[4:]
    elif target == "cuda_emu":
        be, dev, isa = CUDABackend, "cpu", None
    else:
        be, dev, isa = (CPUBackend if target == "cpu" else CUDABackend), target, None
    ok, why = be.availability(torch.device(dev))
    # A present device with an unbuilt library is a failure, not a skip.
    assert ok, f"{be.name} backend for {target} unavailable: {why}"
    _target_backend = be()
    try:
        if isa is None:
            yield dev
        else:
            with native.using_cpu_isa(isa):
                assert native.cpu_isa() == isa
                yield dev
    finally:
        _target_backend = None


def native_backend(device):
    if _target_backend is not None:
        return _target_backend
    cls = CPUBackend if torch.device(device).type == "cpu" else CUDABackend
    ok, why = cls.availability(torch.device(device))
    # A present device with an unbuilt library is a failure, not a skip.
    assert ok, f"native backend for {device} unavailable: {why}"
    return cls()


# The one harness (tests/conformance.py): state builder, step, SPEC §5
# comparisons; float64 with the native rows' figures (conformance.BACKENDS).
import conformance as _conf  # noqa: E402
from conformance import (assert_bitwise, clone_state, make_state,  # noqa: E402,F401
                         sam_step, state_dtype)

_INFO = _conf.INFO["cpu"]   # the cuda row has the same tolerances


def assert_spec_close(actual, expected, what="", rtol=1e-6, atol=1e-7):
    _conf.assert_spec_close(actual, expected, what, rtol, atol, info=_INFO)


def assert_states_close(a, b, what="", rtol=1e-6, atol=1e-7):
    _conf.assert_states_close(a, b, what, rtol, atol, info=_INFO)


def compare_ops(device, st, precondition, *, grad_scale=None, maximize=False, wd=0.01):
    """conformance.compare_ops on the current target's native backend."""
    return _conf.compare_ops(native_backend(device), device, st, precondition,
                             grad_scale=grad_scale, maximize=maximize, wd=wd, info=_INFO)


# sizes around the chunk: not multiples of it, empties at the ends and inside
SHAPES = [(0,), (8,), (33, 17), (CHUNK - 1,), (0, 4), (CHUNK + 1,), (2 * CHUNK + 3,), (3,), (0,)]


# ----------------------------------------------------------------------------
# Every op against the reference
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_norm_sq_is_float64_across_calls_and_groups(device):
    """SPEC §1: N² is added to a float64 accumulator (partials and totals float64):
    on top of 1e8 it keeps float64 precision (float32 would round by up to 4),
    and the same grads in one call or spread over three calls (three groups)
    give the same N² up to float64 rounding, within SPEC's rtol of the
    float64 reference."""
    be = native_backend(device)
    gen = torch.Generator().manual_seed(40)
    grads = [torch.randn(s, generator=gen).to(device) for s in ((CHUNK + 7,), (300,), (0,),
                                                               (5000,), (3, 11))]
    exact = sum(float((g.double() ** 2).sum()) for g in grads)
    kw = dict(beta2=BETA2, eps=EPS, precondition=False, grad_scale=None)
    one = torch.zeros((), dtype=be.norm_dtype, device=device)
    be.sq_norm(grads, None, None, out=one, **kw)
    three = torch.zeros((), dtype=be.norm_dtype, device=device)
    for part in (grads[:2], grads[2:4], grads[4:]):
        be.sq_norm(part, None, None, out=three, **kw)
    big = torch.full((), 1e8, dtype=be.norm_dtype, device=device)
    be.sq_norm(grads, None, None, out=big, **kw)
    assert be.norm_dtype == torch.float64
    assert math.isclose(float(one), exact, rel_tol=1e-6)
    assert math.isclose(float(three), float(one), rel_tol=8 * 2.0 ** -52)
    assert abs((float(big) - 1e8) - float(one)) <= 1e8 * 2.0 ** -52
    with pytest.raises(TypeError, match="float64"):   # a float32 accumulator is refused
        be.sq_norm(grads, None, None, out=torch.zeros((), device=device), **kw)


# ----------------------------------------------------------------------------
# A. Empty tensors and many tensors
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("precondition", [False, True], ids=["plain", "precond"])
def test_more_than_thousand_tensors(device, precondition):
    gen = torch.Generator().manual_seed(8)
    shapes = [(int(s),) for s in torch.randint(0, 300, (1200,), generator=gen)]
    shapes[100] = (CHUNK + 11,)
    dts = [torch.float32, torch.bfloat16, torch.float16]
    st = make_state(shapes, [dts[i % 3] for i in range(1200)], None, device, seed=9)
    compare_ops(device, st, precondition)


# ----------------------------------------------------------------------------
# E. Layouts: views at odd offsets, strides, channels_last, transposes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_bad_arguments_are_clear_errors(device):
    be = native_backend(device)
    p = torch.randn(10, device=device)
    g = torch.randn(10, device=device)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    s = torch.zeros((), device=device)
    fi = torch.zeros((), device=device)
    kw = dict(lr=1e-3, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=0.0, maximize=False,
              grad_scale=None)
    with pytest.raises(TypeError, match="exp_avgs"):
        be.restore_adamw([p], [g], None, [m.double()], [v], [s], found_inf=fi, **kw)
    with pytest.raises(TypeError, match="params"):
        be.restore_adamw([p.int()], [g], None, [m], [v], [s], found_inf=fi, **kw)
    with pytest.raises(TypeError, match="found_inf"):
        be.restore_adamw([p], [g], None, [m], [v], [s], found_inf=fi.double(), **kw)
    with pytest.raises(ValueError, match="shape"):
        be.restore_adamw([p], [g[:5]], None, [m], [v], [s], found_inf=fi, **kw)
    with pytest.raises(ValueError, match="sparse"):
        be.restore_adamw([p], [g.to_sparse()], None, [m], [v], [s], found_inf=fi, **kw)
    if torch.device(device).type == "cpu" and HAS_CUDA:
        with pytest.raises(ValueError, match="found_inf"):
            be.restore_adamw([p], [g], None, [m], [v], [s], found_inf=fi.cuda(), **kw)


# C (D-C1, D-C2) and D (D-D1..D-D3), D-A1/D-A2, D-F5, D-J1 and the non-dense
# refusal: tests/test_conformance.py, on every backend.


# ----------------------------------------------------------------------------
# F. Dtypes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_roundtrip_and_rounding(device, dtype):
    """rho = 0 perturbs by exactly 0: every finite 16-bit pattern survives the
    float round trip bitwise; restore_adamw's rounding matches the reference."""
    be = native_backend(device)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    p = bits.view(dtype).to(device)
    p = p[torch.isfinite(p)].contiguous()
    before, ref = p.clone(), p.clone()
    g = torch.randn(p.shape, device=device)
    for backend, q in ((be, p), (REF, ref)):
        backend.perturb([q], [g], [torch.empty_like(q)], None, None, rho=0.0,
                        norm_sq=torch.tensor(4.0, dtype=torch.float64, device=device), norm_eps=NORM_EPS, beta2=BETA2,
                        eps=EPS, precondition=False, grad_scale=None,
                        found_inf=torch.zeros((), device=device))
    nz = before != 0  # -0 + (+0) is +0 in IEEE arithmetic: signed zeros follow the reference
    assert_bitwise(p[nz], before[nz], "rho = 0 round trip")
    assert_bitwise(p, ref, "rho = 0 vs reference")
    # rounding of the AdamW result to the 16-bit dtype, from the float32 math
    st = make_state([(50000,)], dtype, None, device, seed=23)
    compare_ops(device, st, precondition=False)


def test_cast_routines_match_torch():
    """The CPU conversion routines (shared with CUDA via math.h) vs torch's."""
    import ctypes
    lib = native.cpu_library()
    assert lib is not None
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
    gen = torch.Generator().manual_seed(19)
    all16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e30, -1e30, float("inf"),
                            float("-inf"), 5.96e-8, 2.98e-8, 2.99e-8, 1e-40, 6.1e-5, 3.39e38,
                            1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])
    wide = torch.cat([special, torch.randn(100000, generator=gen) * 10 ** torch.randint(
        -9, 6, (100000,), generator=gen).float(), all16.view(torch.float16).float(),
        all16.view(torch.bfloat16).float()])
    for dt in (torch.float16, torch.bfloat16):
        # 16-bit -> float32, every pattern
        src = all16.view(dt).contiguous()
        dst = torch.empty(src.shape, dtype=torch.float32)
        assert lib.fsam_cpu_cast(src.data_ptr(), codes[dt], dst.data_ptr(), 0, src.numel()) == 0
        exp = src.float()
        same = (dst.view(torch.int32) == exp.view(torch.int32)) | (dst.isnan() & exp.isnan())
        assert bool(same.all()), f"{dt} -> float32"
        # float32 -> 16-bit, round to nearest even incl. subnormals and overflow
        dst16 = torch.empty(wide.shape, dtype=dt)
        assert lib.fsam_cpu_cast(wide.data_ptr(), 0, dst16.data_ptr(), codes[dt], wide.numel()) == 0
        exp16 = wide.to(dt)
        same = (dst16.view(torch.int16) == exp16.view(torch.int16)) | (dst16.isnan() & exp16.isnan())
        assert bool(same.all()), f"float32 -> {dt}: {wide[~same][:5].tolist()}"
    nan = torch.tensor([float("nan")])
    for dt in (torch.float16, torch.bfloat16):
        d = torch.empty(1, dtype=dt)
        lib.fsam_cpu_cast(nan.data_ptr(), 0, d.data_ptr(), codes[dt], 1)
        assert d.isnan().all()
    del ctypes


# ----------------------------------------------------------------------------
# J. Determinism
# ----------------------------------------------------------------------------
def _determinism_run(device, threads=None):
    be = native_backend(device)
    if threads is not None:
        native.set_num_threads(threads)
    gen = torch.Generator().manual_seed(20)
    shapes = []
    for i in range(200):
        nd = int(torch.randint(1, 4, (1,), generator=gen))
        shapes.append(tuple(int(x) for x in torch.randint(0, 40, (nd,), generator=gen)))
    shapes[7] = (3 * CHUNK + 5,)
    shapes[150] = (2 * CHUNK - 1,)
    st = make_state(shapes, torch.float32, None, device, seed=21)
    norms = []
    for step in range(3):
        n, *_ = sam_step(be, st, precondition=step > 0)
        norms.append(n.clone())
    return norms, st


def test_DJ1_determinism_across_thread_counts():
    saved = native.get_num_threads()
    try:
        runs = [_determinism_run("cpu", t) for t in (1, 2, 3)]
    finally:
        native.set_num_threads(saved)
    (n0, s0) = runs[0]
    for n1, s1 in runs[1:]:
        for a, b in zip(n0, n1):
            assert_bitwise(a, b, "norms across thread counts")
        for k in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
            for i, (x, y) in enumerate(zip(s0[k], s1[k])):
                assert_bitwise(x, y, f"{k}[{i}] across thread counts")


@pytest.mark.parametrize("isa", [
    pytest.param(i, marks=[] if i in _CPU_ISAS else [pytest.mark.skip(
        reason=f"this CPU lacks {i} (it supports {', '.join(_CPU_ISAS)})")])
    for i in native.CPU_ISAS])
@pytest.mark.parametrize("streaming", [False, True])
def test_DJ1_bitwise_across_isa_and_streaming_stores(isa, streaming):
    """Every instruction-set instance of the CPU kernels, with and without
    streaming stores, gives bitwise the results of the baseline without them
    (mixed dtypes, odd offsets, sizes around the chunk, skip and grad_scale):
    SPEC §5, the same results whichever CPU or instruction set runs them."""
    saved_isa, saved_nt = native.cpu_isa(), native.get_streaming_min_bytes()

    def run(isa_, nt):
        native.set_cpu_isa(isa_)
        assert native.cpu_isa() == isa_   # forced, not capped
        native.set_streaming_min_bytes(0 if nt else -1)
        out = []
        shapes = [(CHUNK + 3,), (0,), (17,), (2 * CHUNK - 5,), (33, 7)]
        for pd, gd in ((torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                       (torch.float16, torch.float32), (torch.float64, torch.float64)):
            for pre, gs in ((False, None), (True, 4.0)):
                st = make_state(shapes, pd, gd, "cpu", seed=33, steps=[3, 0, 5, 2, 9])
                # views at odd element offsets: the streaming stores' unaligned heads
                for k in ("params", "grads1", "grads2", "exp_avgs", "exp_avg_sqs"):
                    st[k] = [torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view(t.shape)
                             for t in st[k]]
                gst = None if gs is None else torch.tensor(gs)
                res = sam_step(CPUBackend(), st, precondition=pre, grad_scale=gst)
                out += [res[0]] + list(res[1]) + list(res[2])
                out += st["params"] + st["exp_avgs"] + st["exp_avg_sqs"] + st["steps"]
                skip = clone_state(st)
                sam_step(CPUBackend(), skip, precondition=pre,
                         found_inf=torch.ones((), dtype=torch.float32))
                out += skip["params"]
        return out

    try:
        expected = run("baseline", False)
        got = run(isa, streaming)
    finally:
        native.set_cpu_isa(None)
        native.set_streaming_min_bytes(None)
    assert native.cpu_isa() == saved_isa and native.get_streaming_min_bytes() == saved_nt
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_bitwise(a, b, f"output {i} ({isa}, streaming={streaming})")


def test_cpu_isa_selection_api():
    """set_cpu_isa forces a set (no silent capping), refuses unknown names and
    sets the CPU lacks with ValueError naming them, None restores the default,
    and using_cpu_isa restores the previous choice even on an error."""
    default = native.cpu_isa()
    assert native.supported_cpu_isas()[0] == "baseline"
    assert default in native.supported_cpu_isas()
    with pytest.raises(ValueError, match="'sse9'"):
        native.set_cpu_isa("sse9")
    assert native.cpu_isa() == default
    missing = [i for i in native.CPU_ISAS if i not in native.supported_cpu_isas()]
    for isa in missing:
        with pytest.raises(ValueError, match=isa):
            native.set_cpu_isa(isa)
        assert native.cpu_isa() == default
    try:
        for isa in native.supported_cpu_isas():
            assert native.set_cpu_isa(isa) == isa == native.cpu_isa()
            with native.using_cpu_isa("baseline"):
                assert native.cpu_isa() == "baseline"
            assert native.cpu_isa() == isa       # the forced one again
            with pytest.raises(RuntimeError, match="inside"):
                with native.using_cpu_isa("baseline"):
                    raise RuntimeError("inside")
            assert native.cpu_isa() == isa
    finally:
        native.set_cpu_isa(None)
    assert native.cpu_isa() == default


def test_record_cache_sees_new_dtypes_and_layouts():
    """The cached record tables are keyed by pointers, numels, dtypes and
    contiguity: the same tensors' storage seen with another layout or dtype
    (every pointer unchanged) is not served a stale table."""
    be, rb = CPUBackend(), ReferenceBackend()
    gen = torch.Generator().manual_seed(5)
    S, G, M, V = (torch.zeros(64 * 64) for _ in range(4))
    st = torch.zeros(())
    fi = torch.zeros(())
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
              grad_scale=None, found_inf=fi)
    cases = [
        (S.view(64, 64), M.view(64, 64), V.view(64, 64)),
        (S.view(64, 64).t(), M.view(64, 64).t(), V.view(64, 64).t()),
        (S.view(torch.bfloat16)[: 64 * 64].view(64, 64), M.view(64, 64), V.view(64, 64)),
        (S.view(64, 64), M.view(64, 64), V.view(64, 64)),
    ]
    for p, m, v in cases:
        p.copy_(torch.randn(64, 64, generator=gen))
        G.copy_(torch.randn(64 * 64, generator=gen))
        g = G.view(64, 64)
        m.zero_(), v.zero_(), st.zero_()
        ref = [t.clone() for t in (p, m, v, st)]
        be.restore_adamw([p], [g], None, [m], [v], [st], **kw)
        rb.restore_adamw([ref[0]], [g], None, [ref[1]], [ref[2]], [ref[3]], **kw)
        assert_spec_close(p, ref[0], f"param ({p.dtype}, strides {p.stride()})")
        assert_spec_close(v, ref[2], f"exp_avg_sq ({p.dtype}, strides {p.stride()})")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("precondition", [False, True], ids=["plain", "precond"])
def test_call_site_cache_steps_match_uncached(device, precondition):
    """``cache=`` (base.py): three steps with a cache dict per call site and the
    same tuples equal three uncached steps bitwise, the table is built once
    and reused (same record object), new grads each step included; a param
    re-pointed with ``.data =`` (new storage), a grad of another dtype and a
    non-contiguous grad are noticed and computed right, and so is a grad
    re-pointed between sq_norm and perturb. One cache serves the three ops."""
    be = native_backend(device)
    shapes = [(33, 5), (0,), (1000,), (7, 3, 2)]
    a = make_state(shapes, torch.float32, None, device, seed=3, steps=[1, 0, 3, 2])
    b = clone_state(a)
    c = {}
    ca = {"sq": c, "pt": c, "ra": c}
    tup = {k: tuple(v) for k, v in a.items() if k not in ("grads1", "grads2")}
    backups_a = tuple(torch.empty_like(p) for p in a["params"])
    backups_b = [torch.empty_like(p) for p in b["params"]]
    gen = torch.Generator().manual_seed(9)
    recs = []

    def run(st, tp, backups, cache, g1, g2, step):
        dev = st["steps"][0].device
        out = torch.zeros((), dtype=torch.float64, device=dev)
        fi = torch.zeros((), device=dev)
        kw = dict(beta2=BETA2, eps=EPS, precondition=precondition, grad_scale=None)
        be.sq_norm(g1, tp["exp_avg_sqs"], tp["steps"], out=out,
                   **kw, **({"cache": cache["sq"]} if cache else {}))
        if step == 1:   # a grad re-pointed between sq_norm and perturb (same tuple)
            g1[2].data = g1[2].data.clone()
            junk = [torch.full_like(g1[2], 1e6) for _ in range(4)]  # reuses the freed block
        be.perturb(tp["params"], g1, backups, tp["exp_avg_sqs"], tp["steps"], rho=0.05,
                   norm_sq=out, norm_eps=NORM_EPS, found_inf=fi,
                   **kw, **({"cache": cache["pt"]} if cache else {}))
        be.restore_adamw(tp["params"], g2, backups, tp["exp_avgs"], tp["exp_avg_sqs"],
                         tp["steps"], lr=1e-2, beta1=BETA1, beta2=BETA2, eps=EPS,
                         weight_decay=0.01, maximize=False, grad_scale=None, found_inf=fi,
                         **({"cache": cache["ra"]} if cache else {}))
        if step == 1:
            assert all(bool((j == 1e6).all()) for j in junk)
        return out

    for step in range(5):
        g1 = [torch.randn(s, generator=gen).to(device) for s in shapes]
        g2 = [torch.randn(s, generator=gen).to(device) for s in shapes]
        if step == 2:   # a re-pointed parameter (new storage, same values)
            for st in (a, b):
                st["params"][2].data = st["params"][2].data.clone()
        if step == 3:   # a bfloat16 grad and a transposed (non-contiguous) grad
            g2[2] = g2[2].to(torch.bfloat16)
            g1[0] = g1[0].t().contiguous().t()
        ga1 = tuple(g1) if step != 4 else g1   # any sequence type for the grads
        na = run(a, tup, backups_a, ca, ga1, tuple(g2), step)   # the same tuples every step
        nb = run(b, b, backups_b, None, [g.clone() for g in g1], [g.clone() for g in g2], step)
        assert_bitwise(na, nb, f"step {step} N²")
        for k in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
            for i, (x, y) in enumerate(zip(a[k], b[k])):
                assert_bitwise(x, y, f"step {step} {k}[{i}]")
        recs.append(ca["ra"]["restore_adamw"].rec if "restore_adamw" in ca["ra"] else None)
    assert recs[0] is not None and recs[1] is recs[0]          # reused in a steady state
    assert recs[2] is not recs[1]                              # new pointers: rebuilt


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_call_site_cache_with_lists_checks_every_call(device):
    """Lists are mutable: with a cache, an element replaced in the same list
    object (backups, grads) between calls is used, never a stale pointer."""
    be = native_backend(device)
    cache = {}
    params = [torch.zeros(5, device=device), torch.zeros(3, device=device)]
    backups = [torch.full((5,), 1.0, device=device), torch.full((3,), 2.0, device=device)]
    be.restore(params, backups, cache=cache)
    backups[1] = torch.full((3,), 9.0, device=device)        # same list, new element
    be.restore(params, backups, cache=cache)
    assert torch.equal(params[1], torch.full((3,), 9.0, device=device))
    grads = [torch.ones(5, device=device), torch.ones(3, device=device)]
    out = torch.zeros((), dtype=be.norm_dtype, device=device)
    fi = torch.zeros((), device=device)
    kw = dict(beta2=BETA2, eps=EPS, precondition=False, grad_scale=None)
    be.sq_norm(grads, None, None, out=out, cache=cache, **kw)
    grads[0] = torch.zeros(5, device=device)                 # replaced before perturb
    bk = [torch.empty_like(p) for p in params]
    before = [p.clone() for p in params]
    be.perturb(params, grads, bk, None, None, rho=0.1, norm_sq=out, norm_eps=NORM_EPS,
               found_inf=fi, cache=cache, **kw)
    assert torch.equal(params[0], before[0])                 # its grad is now zero
    assert not torch.equal(params[1], before[1])


def test_eager_calls_skip_the_dispatcher_only_outside_modes():
    """Eager calls run the kernels directly; under a dispatch mode (fake tensors,
    functionalisation, make_fx) they go through ``torch.ops.fsam_kernels`` so
    the mode sees one opaque op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    be = CPUBackend()
    p, b = [torch.ones(4)], [torch.zeros(4)]
    assert native._eager(p)
    with Log():
        assert not native._eager(p)
        be.restore(p, b)
    assert torch.equal(p[0], torch.zeros(4))
    assert any("fsam_kernels.restore" in s for s in seen), seen


# ----------------------------------------------------------------------------
# torch.compile, registration, fork safety
# ----------------------------------------------------------------------------
def test_cuda_tile_tables_cover_every_element_once():
    """Host-side check of the CUDA launch tables: emulating the kernels' tile
    lookup (binary search of chunk_start, as in csrc/cuda) over the table
    native.py builds covers every element of every tensor exactly once,
    empty tensors anywhere (runs without a GPU)."""
    import ctypes
    import numpy as np

    class Rec(ctypes.Structure):  # fsam_tensor_t of capi.h
        _fields_ = [(f, ctypes.c_void_p) for f in ("p", "g", "b", "m", "v", "step")] + [
            ("numel", ctypes.c_int64), ("p_dtype", ctypes.c_int32), ("g_dtype", ctypes.c_int32)]

    assert ctypes.sizeof(Rec) == 64
    tile = 1000
    sizes = [0, 5, 0, 0, 2000, 2001, 1, 0, 999, 1000, 0]
    rec = native._Records(len(sizes))
    rec.set(6, sizes)
    rec.dtypes([1] * len(sizes), [2] * len(sizes))
    r0 = Rec.from_buffer_copy(rec.a[4].tobytes())
    assert (r0.numel, r0.p_dtype, r0.g_dtype) == (2000, 1, 2)
    host, n_tiles = native.cuda_host_table(rec.a, tile)
    n = len(sizes)
    cs = host[n * 8:]
    assert len(cs) == n + 1 and n_tiles == sum(-(-s // tile) for s in sizes)
    seen = [np.zeros(s, dtype=np.int64) for s in sizes]
    for t in range(n_tiles):
        lo, hi = 0, n  # find_tensor()
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            if cs[mid] <= t:
                lo = mid
            else:
                hi = mid
        begin = (t - cs[lo]) * tile
        length = min(tile, host[lo * 8 + 6] - begin)
        assert length > 0
        seen[lo][begin:begin + length] += 1
    assert all((s == 1).all() for s in seen)


def test_custom_ops_registered():
    for name in ("sq_norm", "perturb", "restore_adamw", "restore"):
        assert hasattr(torch.ops.fsam_kernels, name)


def _with(targets, name, values, leave_out=()):
    """``targets`` x ``values`` as params of ``("device", name)``, keeping each
    target's marks; ``leave_out``: (target id, value) pairs not to run."""
    out = []
    for t in targets:
        tv, marks, tid = (t.values[0], t.marks, t.id) if hasattr(t, "values") else (t, (), t)
        out += [pytest.param(tv, v, marks=marks, id=f"{v}-{tid}") for v in values
                if (tid, v) not in leave_out]
    return out


# the emulated kernels: the op path once (inductor would add compile time only)
@pytest.mark.parametrize("device,compile_backend",
                         _with(DEVICES_ONE_ISA, "compile_backend", ("aot_eager", "inductor"),
                               leave_out={("cuda_emu", "inductor")}), indirect=["device"])
def test_torch_compile_treats_ops_as_opaque(device, compile_backend):
    be = native_backend(device)
    st = make_state([(100,), (0,), (20, 5)], [torch.bfloat16, torch.float32, torch.float32],
                    None, device, seed=22)
    a, b = clone_state(st), clone_state(st)

    def step(s):
        sam_step(be, s, precondition=True)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=compile_backend, fullgraph=True)
    for _ in range(2):
        compiled(a)
        step(b)
        for k in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
            for i in range(3):
                assert_bitwise(a[k][i], b[k][i], f"compiled {k}[{i}]")


def _child_step(q, g):
    # Only our kernel runs in the child: torch's own OpenMP pool is not
    # fork-safe (a large torch op in a forked child can hang by itself).
    try:
        out = torch.zeros((), dtype=torch.float64)
        CPUBackend().sq_norm([g], None, None, beta2=BETA2, eps=EPS, precondition=False,
                             grad_scale=None, out=out)
        q.put(float(out))
    except Exception as exc:  # pragma: no cover - reported to the parent
        q.put(repr(exc))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_thread_pool_survives_fork():
    be = native_backend("cpu")
    out = torch.zeros((), dtype=torch.float64)
    g = torch.ones(4 * CHUNK)
    be.sq_norm([g], None, None, beta2=BETA2, eps=EPS, precondition=False, grad_scale=None,
               out=out)  # the worker threads exist in the parent now
    assert native.get_num_threads() >= 1
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child_step, args=(q, g))
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the forked child hung in the CPU kernels")
    assert q.get(timeout=5) == float(4 * CHUNK)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("precondition", [False, True], ids=["plain", "precond"])
def test_DI2_cuda_graph_capture_replays_like_eager(precondition):
    """One optimizer-side SAM step captured in a CUDA graph (after one eager
    warm-up step with the same tensors), replayed 5 times, equals 5 eager steps."""
    be = native_backend("cuda")
    st = make_state([(1000,), (0,), (CHUNK + 5,), (3, 7)], torch.float32, None, "cuda", seed=30)
    ref = clone_state(st)

    def make_bufs(s):
        return ([torch.empty_like(p) for p in s["params"]], torch.zeros((), dtype=torch.float64, device="cuda"),
                torch.zeros((), device="cuda"))

    def step(s, bufs):
        backups, out, fi = bufs
        out.zero_()
        fi.zero_()
        be.sq_norm(s["grads1"], s["exp_avg_sqs"], s["steps"], beta2=BETA2, eps=EPS,
                   precondition=precondition, grad_scale=None, out=out)
        be.perturb(s["params"], s["grads1"], backups, s["exp_avg_sqs"], s["steps"], rho=0.05,
                   norm_sq=out, norm_eps=NORM_EPS, beta2=BETA2, eps=EPS,
                   precondition=precondition, grad_scale=None, found_inf=fi)
        be.restore_adamw(s["params"], s["grads2"], backups, s["exp_avgs"], s["exp_avg_sqs"],
                         s["steps"], lr=1e-3, beta1=BETA1, beta2=BETA2, eps=EPS,
                         weight_decay=0.01, maximize=False, grad_scale=None, found_inf=fi)

    bufs, ref_bufs = make_bufs(st), make_bufs(ref)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(st, bufs)  # warm-up: builds and uploads the launch tables
    torch.cuda.current_stream().wait_stream(side)
    step(ref, ref_bufs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(st, bufs)
    for _ in range(5):
        graph.replay()
        step(ref, ref_bufs)
    torch.cuda.synchronize()
    for k in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for i in range(4):
            assert_bitwise(st[k][i], ref[k][i], f"graph vs eager {k}[{i}]")
    assert float(st["steps"][0]) == 6.0  # t started at 0: warm-up + 5 replays


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_step_never_synchronises():
    """SPEC §4: no device-to-host read in the step path (first call included)."""
    be = native_backend("cuda")
    st = make_state([(1000,), (0,), (CHUNK + 5,)], [torch.float32, torch.bfloat16, torch.float16],
                    None, "cuda", seed=31)
    gs = torch.tensor(2.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            sam_step(be, st, precondition=True, grad_scale=gs)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------
# B. GPU-large (2^31 + 1 elements): int64 indexing
# ----------------------------------------------------------------------------
def _big_gpu():
    if not HAS_CUDA:
        return False
    return torch.cuda.get_device_properties(0).total_memory >= 50 * 2 ** 30


@pytest.mark.gpu_large
@pytest.mark.cuda
@pytest.mark.skipif(not _big_gpu(), reason="needs a CUDA GPU with >= 50 GiB")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_DB1_two_to_the_31_plus_one_elements(dtype):
    be = native_backend("cuda")
    n = 2 ** 31 + 1
    dev = "cuda"
    p = torch.ones(n, dtype=dtype, device=dev)
    g = torch.ones(n, dtype=dtype, device=dev)
    m = torch.zeros(n, device=dev)
    v = torch.zeros(n, device=dev)
    b = torch.empty_like(p)
    step = torch.zeros((), device=dev)
    out = torch.zeros((), dtype=torch.float64, device=dev)
    fi = torch.zeros((), device=dev)
    be.sq_norm([g], None, None, beta2=BETA2, eps=EPS, precondition=False, grad_scale=None, out=out)
    assert math.isclose(math.sqrt(float(out)), 46340.950, rel_tol=1e-6)
    be.perturb([p], [g], [b], None, None, rho=0.05, norm_sq=out, norm_eps=NORM_EPS, beta2=BETA2,
               eps=EPS, precondition=False, grad_scale=None, found_inf=fi)
    idx = torch.tensor([0, 2 ** 31 - 1, 2 ** 31, n - 1], device=dev)
    idx = torch.cat([idx, torch.randint(0, n, (1000,), device=dev)])
    e = 0.05 / 46340.950
    torch.testing.assert_close(p[idx].double(), torch.full((idx.numel(),), 1 + e, device=dev,
                               dtype=torch.float64).to(dtype).double(), rtol=0, atol=1e-6)
    assert bool((b[idx] == 1).all())
    del g
    g2 = torch.ones(n, dtype=dtype, device=dev)
    be.restore_adamw([p], [g2], [b], [m], [v], [step], lr=1e-3, beta1=BETA1, beta2=BETA2, eps=EPS,
                     weight_decay=0.0, maximize=False, grad_scale=None, found_inf=fi)
    expected = torch.tensor(1.0 - 1e-3 * (1 - 1e-8), dtype=torch.float64).to(dtype).double()
    got = p[idx].double()
    torch.testing.assert_close(got, expected.expand_as(got).to(dev), rtol=0, atol=1e-7)
    assert float(step) == 1.0
    assert float(m[2 ** 31]) == pytest.approx(0.1)
