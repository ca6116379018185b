"""The backend conformance table and the one kernel-level test harness.

In the manner of torch's ``torch.testing._internal.common_optimizers``
(``OptimizerInfo``): one :class:`BackendInfo` row per backend says what the
conformance cases (tests/test_conformance.py) need to know about it: its
name, the devices it may run on, its tolerances (SPEC §5, from the constants
of tests/helpers.py), its capabilities, the variants it is run in (the CPU
library's instruction sets) and the sizes that cross its kernels' chunk or
tile boundaries, smaller where the kernels run through the Triton
interpreter or the emulated CUDA build. Adding a backend is one row of
``BACKENDS``; which rows run on this machine is the registry's answer
(``helpers.backend_device_pairs``, i.e. ``Backend.availability(device)``),
so nothing here is hard-coded per machine.

The harness below is written against the public Backend API only (the four
ops of fsam_kernels/backends/base.py): ``make_state`` builds a parameter
list with its grads and AdamW state, ``sam_step`` runs one optimizer-side
SAM-AdamW step through the four ops, ``assert_spec_close`` /
``assert_states_close`` compare with SPEC §5's tolerances and
``assert_bitwise`` bit patterns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch

from fsam_kernels.backends import get_backend
from fsam_kernels.backends.reference import ReferenceBackend
from helpers import F32_ATOL, F32_RTOL_1, F64_ATOL, F64_RTOL, F64_SCALE_RTOL, backend_device_pairs

REF = ReferenceBackend()
BETA1, BETA2, EPS, NORM_EPS = 0.9, 0.999, 1e-8, 1e-12
#: the CPU library's chunk (csrc/cpu): sizes around it cross the threaded path
CPU_CHUNK = 65536

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
LOW = (BF16, F16)


def _cpu_isas():
    from fsam_kernels.backends import native

    if native.cpu_library() is None:
        return ()
    return tuple(native.supported_cpu_isas())


@contextlib.contextmanager
def _using_isa(isa):
    from fsam_kernels.backends import native

    with native.using_cpu_isa(isa):
        assert native.cpu_isa() == isa
        yield


def _interpreted(device) -> bool:
    """Triton kernels run through the interpreter (CPU tensors)."""
    return torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What the conformance cases know about one backend (one table row).

    name: the registry name (``get_backend(name, device)``).
    devices: device types it may run on; the registry decides which are
        present (the emulated CUDA build reports itself on "cpu" only in a
        process started with FSAM_CUDA_EMULATE=1).
    f32_rtol / f32_atol: SPEC §5's float32 figures after one step.
    f64_rtol / f64_atol: float64 parameters and state (SPEC §5 gives none;
        tests/helpers.py derives F64_RTOL / F64_ATOL; the native rows keep the
        tighter figure their own tests asserted before the move).
    ulps: bfloat16/float16 parameters within this many ulps (SPEC §5: 1).
    dtypes: parameter dtypes the backend takes.
    found_inf / grad_scale: whether the ops honour found_inf (skip) and a
        grad_scale tensor (all backends do: SPEC §6).
    cache: the ops take ``cache=`` (base.py: a caller-owned dict per call
        site) and give bitwise the uncached results (every backend: the
        argument is part of the Backend API; native-specific cache behaviour
        is in tests/test_native.py).
    chunk / chunk_small: a size whose neighbours cross the kernels' chunk or
        tile boundaries; ``chunk_small`` where the kernels are interpreted or
        emulated (a few ms per program), so the cases stay fast.
    variants: (id, context-manager factory) pairs each case is run under, e.g.
        the CPU library's instruction sets; () runs it once as it is.
    """

    name: str
    devices: tuple = ("cpu", "cuda")
    f32_rtol: float = F32_RTOL_1
    f32_atol: float = F32_ATOL
    f64_rtol: float = F64_RTOL
    f64_atol: float = F64_ATOL
    ulps: int = 1
    dtypes: tuple = (F32, BF16, F16, F64)
    found_inf: bool = True
    grad_scale: bool = True
    cache: bool = True
    chunk: int = CPU_CHUNK
    chunk_small: int = CPU_CHUNK
    small_when: object = None          # callable(device) -> True to use chunk_small
    variants: object = None            # callable() -> [(id, ctx factory)]

    def small(self, device) -> bool:
        """The kernels are interpreted or emulated on ``device``: keep cases small."""
        return self.small_when is not None and bool(self.small_when(device))

    def size(self, device) -> int:
        """A size around the kernels' chunk/tile on ``device``."""
        return self.chunk_small if self.small(device) else self.chunk

    def variant_list(self):
        return list(self.variants()) if self.variants is not None else [("", None)]


BACKENDS = [
    # torch._foreach_* ops: no chunks, every size is one call
    BackendInfo("foreach", chunk=4097, chunk_small=4097),
    # csrc/cpu through ctypes; every instruction set this CPU has
    BackendInfo("cpu", devices=("cpu",), f64_rtol=1e-12, f64_atol=1e-14,
                variants=lambda: [(isa, lambda isa=isa: _using_isa(isa)) for isa in _cpu_isas()]),
    # csrc/cuda on a GPU, or its emulated host build on CPU tensors
    BackendInfo("cuda", f64_rtol=1e-12, f64_atol=1e-14),
    # Triton kernels (block 1024, chunk 8192); interpreted on CPU tensors
    BackendInfo("triton", chunk=CPU_CHUNK, chunk_small=4096, small_when=_interpreted),
]
INFO = {b.name: b for b in BACKENDS}


def conformance_params():
    """``pytest.param(info, device, variant_ctx, id=...)`` for every row of
    ``BACKENDS`` on every device the registry reports it available on, times
    its variants. Ids: ``backend-device`` (``cpu.avx2-cpu`` for a variant),
    so ``-k cuda-cpu`` selects the emulated CUDA build."""
    out = []
    for name, dev in backend_device_pairs(reference=False):
        info = INFO.get(name)
        if info is None or torch.device(dev).type not in info.devices:
            continue
        for vid, ctx in info.variant_list():
            tag = f"{name}.{vid}" if vid else name
            out.append(pytest.param((info, dev, ctx), id=f"{tag}-{dev}"))
    return out


@pytest.fixture
def target(request):
    """(info, backend, device) of one conformance target, inside its variant's context."""
    info, dev, ctx = request.param
    be = get_backend(info.name, dev)
    with (ctx() if ctx is not None else contextlib.nullcontext()):
        yield info, be, dev


def targets():
    """Parametrize the ``target`` fixture over ``conformance_params()``."""
    return pytest.mark.parametrize("target", conformance_params(), indirect=True)


# ----------------------------------------------------------------------------
# State construction and one step
# ----------------------------------------------------------------------------
def state_dtype(dt):
    """AdamW state dtype for a parameter dtype (SPEC: float64 for float64, else float32)."""
    return torch.float64 if dt == torch.float64 else torch.float32


def make_state(shapes, pdtypes, gdtypes, device, seed=0, steps=None, p_fill=None,
               g_fill=None, zero_state=False):
    """Params, two grads, exp_avg, exp_avg_sq and step tensors for ``shapes``
    (all on ``device``), as a dict of lists: ``params``, ``grads1``, ``grads2``,
    ``exp_avgs``, ``exp_avg_sqs``, ``steps``. ``gdtypes`` None (or an element
    None): the parameter's dtype; ``steps`` None: t = i % 4 (some t = 0)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(shapes)
    pdtypes = pdtypes if isinstance(pdtypes, (list, tuple)) else [pdtypes] * n
    gdtypes = gdtypes if isinstance(gdtypes, (list, tuple)) else [gdtypes] * n
    st = {k: [] for k in ("params", "grads1", "grads2", "exp_avgs", "exp_avg_sqs", "steps")}
    for i, s in enumerate(shapes):
        pd, gd, sd = pdtypes[i], gdtypes[i] or pdtypes[i], state_dtype(pdtypes[i])
        p = torch.randn(s, generator=gen, dtype=torch.float64) if p_fill is None else \
            torch.full(s, p_fill, dtype=torch.float64)
        st["params"].append(p.to(pd).to(device))
        for k in ("grads1", "grads2"):
            g = torch.randn(s, generator=gen, dtype=torch.float64) if g_fill is None else \
                torch.full(s, g_fill, dtype=torch.float64)
            st[k].append(g.to(gd).to(device))
        m = (0.1 * torch.randn(s, generator=gen, dtype=torch.float64)).to(sd).to(device)
        v = (0.01 * torch.rand(s, generator=gen, dtype=torch.float64)).to(sd).to(device)
        if zero_state:
            m.zero_(), v.zero_()
        st["exp_avgs"].append(m)
        st["exp_avg_sqs"].append(v)
        t = float(steps[i]) if steps is not None else float(i % 4)
        st["steps"].append(torch.tensor(t, dtype=torch.float32, device=device))
    return st


def clone_state(st):
    return {k: [t.clone() for t in v] for k, v in st.items()}


def sam_step(be, st, *, precondition, rho=0.05, lr=1e-3, wd=0.01, maximize=False,
             grad_scale=None, found_inf=None, norm_sq=None, backups=None):
    """One optimizer-side SAM-AdamW step through the four ops (SPEC §6):
    sq_norm(grads1) -> perturb -> restore_adamw(grads2). ``norm_sq`` given:
    perturb reads it instead of the computed N²; ``backups`` given: perturb
    writes them (else new ones each call). Returns (N², perturbed params,
    backups, found_inf)."""
    device = st["steps"][0].device if st["steps"] else torch.device("cpu")
    out = torch.zeros((), dtype=be.norm_dtype, device=device)
    be.sq_norm(st["grads1"], st["exp_avg_sqs"], st["steps"], beta2=BETA2, eps=EPS,
               precondition=precondition, grad_scale=grad_scale, out=out)
    n2 = out if norm_sq is None else norm_sq
    fi = torch.zeros((), device=device) if found_inf is None else found_inf
    if backups is None:
        backups = [torch.empty_like(p) for p in st["params"]]
    be.perturb(st["params"], st["grads1"], backups, st["exp_avg_sqs"], st["steps"], rho=rho,
               norm_sq=n2, norm_eps=NORM_EPS, beta2=BETA2, eps=EPS, precondition=precondition,
               grad_scale=grad_scale, found_inf=fi)
    perturbed = [p.clone() for p in st["params"]]
    be.restore_adamw(st["params"], st["grads2"], backups, st["exp_avgs"], st["exp_avg_sqs"],
                     st["steps"], lr=lr, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=wd,
                     maximize=maximize, grad_scale=grad_scale, found_inf=fi)
    return out, perturbed, backups, fi


# ----------------------------------------------------------------------------
# Comparisons (SPEC §5)
# ----------------------------------------------------------------------------
def _ordered_bits(t):
    """16-bit floats as integers ordered like the values (adjacent floats differ by 1)."""
    x = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(x < 0, -(x & 0x7FFF), x)


def assert_spec_close(actual, expected, what="", rtol=F32_RTOL_1, atol=F32_ATOL, *, info=None,
                      initial=None, ulps=1):
    """``actual`` against ``expected`` (same dtype and shape) per SPEC §5:
    bfloat16/float16 within ``ulps`` ulps (adjacent bit patterns), float32
    within ``rtol`` / ``atol``, float64 within the row's (``info``) or
    helpers' F64 figures, plus F64_SCALE_RTOL of the perturbation
    |expected - initial| when ``initial`` (the parameter before perturb) is
    given (a float64 parameter's perturbation carries the float32 rounding of
    its scale, SPEC §1). Raises AssertionError naming ``what``."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    if actual.numel() == 0:
        return
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.dtype in LOW:
        diff = (_ordered_bits(a) - _ordered_bits(e)).abs()
        bad = diff > ulps
        assert not bool(bad.any()), (
            f"{what}: {int(bad.sum())} elements differ by more than {ulps} ulp "
            f"(max {int(diff.max())}), e.g. {a[bad][:4].tolist()} vs {e[bad][:4].tolist()}")
    elif a.dtype == torch.float64:
        r64 = info.f64_rtol if info is not None else F64_RTOL
        a64 = info.f64_atol if info is not None else F64_ATOL
        tol = a64 + r64 * e.abs()
        if initial is not None:
            tol = tol + F64_SCALE_RTOL * (e - initial.detach().cpu()).abs()
        diff = (a - e).abs()
        bad = ~(diff <= tol)
        assert not bool(bad.any()), (f"{what}: {int(bad.sum())} float64 elements beyond the "
                                     f"tolerance, max diff {diff.max().item()}")
    else:
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_bitwise(actual, expected, what=""):
    """Same dtype, shape and bit pattern (NaNs with the same payload)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.numel() == 0:
        return
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a.contiguous().view(bits), e.contiguous().view(bits)), \
        f"{what}: not bitwise equal"


def assert_states_close(a, b, what="", rtol=F32_RTOL_1, atol=F32_ATOL, info=None):
    """params / exp_avgs / exp_avg_sqs within SPEC §5; steps bitwise."""
    for k in ("params", "exp_avgs", "exp_avg_sqs"):
        for i, (x, y) in enumerate(zip(a[k], b[k])):
            assert_spec_close(x, y, f"{what} {k}[{i}]", rtol=rtol, atol=atol, info=info)
    for i, (x, y) in enumerate(zip(a["steps"], b["steps"])):
        assert_bitwise(x, y, f"{what} steps[{i}]")


def assert_states_bitwise(a, b, what="", keys=("params", "exp_avgs", "exp_avg_sqs", "steps")):
    for k in keys:
        for i, (x, y) in enumerate(zip(a[k], b[k])):
            assert_bitwise(x, y, f"{what} {k}[{i}]")


def compare_ops(be, device, st, precondition, *, grad_scale=None, maximize=False, wd=0.01,
                info=None):
    """Each op of SPEC §6 on ``be`` against the reference, from the same inputs
    each time: sq_norm (NORM_RTOL), perturb from the same float64 N² (backups
    bitwise, perturbed params per SPEC §5), restore_adamw from the reference's
    perturbed params (SPEC §5, steps bitwise), restore bitwise. Returns the two
    states (``be``'s, the reference's)."""
    from helpers import NORM_RTOL

    a, b = clone_state(st), clone_state(st)
    gs_a = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    gs_b = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    out_a = torch.zeros((), dtype=be.norm_dtype, device=device)
    out_b = torch.zeros((), dtype=torch.float64, device=device)
    be.sq_norm(a["grads1"], a["exp_avg_sqs"], a["steps"], beta2=BETA2, eps=EPS,
               precondition=precondition, grad_scale=gs_a, out=out_a)
    REF.sq_norm(b["grads1"], b["exp_avg_sqs"], b["steps"], beta2=BETA2, eps=EPS,
                precondition=precondition, grad_scale=gs_b, out=out_b)
    torch.testing.assert_close(out_a.double().cpu(), out_b.cpu(), rtol=NORM_RTOL, atol=0)
    n2 = out_b
    ba = [torch.empty_like(p) for p in a["params"]]
    bb = [torch.empty_like(p) for p in b["params"]]
    fa, fb = torch.zeros((), device=device), torch.zeros((), device=device)
    be.perturb(a["params"], a["grads1"], ba, a["exp_avg_sqs"], a["steps"], rho=0.05,
               norm_sq=n2.clone(), norm_eps=NORM_EPS, beta2=BETA2, eps=EPS,
               precondition=precondition, grad_scale=gs_a, found_inf=fa)
    REF.perturb(b["params"], b["grads1"], bb, b["exp_avg_sqs"], b["steps"], rho=0.05,
                norm_sq=n2.clone(), norm_eps=NORM_EPS, beta2=BETA2, eps=EPS,
                precondition=precondition, grad_scale=gs_b, found_inf=fb)
    for i in range(len(ba)):
        assert_bitwise(ba[i], st["params"][i], f"backups[{i}]")
        assert_spec_close(a["params"][i], b["params"][i], f"perturbed params[{i}]", info=info)
    assert float(fa) == 0.0
    for i in range(len(ba)):
        a["params"][i].copy_(b["params"][i])
    be.restore_adamw(a["params"], a["grads2"], ba, a["exp_avgs"], a["exp_avg_sqs"], a["steps"],
                     lr=1e-3, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=wd,
                     maximize=maximize, grad_scale=gs_a, found_inf=fa)
    REF.restore_adamw(b["params"], b["grads2"], bb, b["exp_avgs"], b["exp_avg_sqs"], b["steps"],
                      lr=1e-3, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=wd,
                      maximize=maximize, grad_scale=gs_b, found_inf=fb)
    assert_states_close(a, b, "restore_adamw", info=info)
    saved = [p.clone() for p in a["params"]]
    for p in a["params"]:
        p.add_(1)
    be.restore(a["params"], saved)
    for i, (p, s) in enumerate(zip(a["params"], saved)):
        assert_bitwise(p, s, f"restore params[{i}]")
    return a, b


def state_for(params, g1, g2, seed=0, t0=3.0, random_state=True):
    """A ``make_state``-style dict around given params and grads (any layout):
    exp_avg / exp_avg_sq like the param (``zeros_like``: its layout kept), random
    (exp_avg 0.1 N(0,1), exp_avg_sq 0.01 U(0,1)^2) unless ``random_state`` is
    False, and t = ``t0`` for every tensor."""
    gen = torch.Generator().manual_seed(seed + 1)
    st = {"params": list(params), "grads1": list(g1), "grads2": list(g2), "exp_avgs": [],
          "exp_avg_sqs": [], "steps": []}
    for p in params:
        m = torch.zeros_like(p, dtype=state_dtype(p.dtype))
        v = torch.zeros_like(p, dtype=state_dtype(p.dtype))
        if random_state:
            m.copy_(0.1 * torch.randn(p.shape, generator=gen))
            v.copy_(0.01 * torch.rand(p.shape, generator=gen) ** 2)
        st["exp_avgs"].append(m)
        st["exp_avg_sqs"].append(v)
        st["steps"].append(torch.tensor(float(t0), device=p.device))
    return st


def clone_like(st):
    """``clone_state`` keeping each tensor's strides (channels_last, transposed)."""
    return {k: [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                if t.numel() else t.clone() for t in v] for k, v in st.items()}


def run_parity(be, st, precondition, *, info=None, steps=1, grad_scale=None):
    """``steps`` full SAM steps of ``be`` and the reference from copies of
    ``st`` (strides kept): N² within NORM_RTOL (float64 accumulator), found_inf
    0, backups bitwise the parameters, perturbed params (float64: plus the
    float32 scale rounding) and state per SPEC §5, F32_RTOL_10 after the first
    step. Returns (``be``'s state, the reference's)."""
    from helpers import F32_RTOL_10, NORM_RTOL

    a, b = clone_like(st), clone_like(st)
    r1 = info.f32_rtol if info is not None else F32_RTOL_1
    atol = info.f32_atol if info is not None else F32_ATOL
    for k in range(steps):
        rtol = r1 if k == 0 else F32_RTOL_10
        initial = [p.clone() for p in a["params"]]
        na, pa, ba, fa = sam_step(be, a, precondition=precondition, grad_scale=grad_scale)
        nb, pb, _, fb = sam_step(REF, b, precondition=precondition, grad_scale=grad_scale)
        assert na.dtype == torch.float64
        torch.testing.assert_close(na.double().cpu(), nb.cpu(), rtol=NORM_RTOL, atol=1e-30)
        assert float(fa) == float(fb) == 0.0
        for i, (x, y, p0) in enumerate(zip(pa, pb, initial)):
            assert_bitwise(ba[i], p0, f"backup[{i}] is not bitwise the parameter")
            assert_spec_close(x, y, f"perturbed p[{i}]", rtol, atol, info=info, initial=p0)
        assert_states_close(a, b, f"step {k + 1}", rtol, atol, info)
    return a, b
