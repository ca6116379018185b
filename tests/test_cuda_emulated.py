"""The CUDA kernels of csrc/cuda executed on CPU, through their emulated host build.

``libfsam_cuda_emu.so`` is csrc/cuda/fsam_cuda.cu compiled by the host C++
compiler with csrc/include/fsam/cuda_emu.h (setup.py): each block's threads
run as fibers, ``__syncthreads`` and ``__shfl_down_sync`` are real barriers,
the fibers run in a shuffled order after each barrier and ``__shared__``
memory is poisoned (NaN) before each block. So the indexing, the tile/chunk
tables, the tails, the dtype dispatch, the two-stage norm and the found_inf
handling of the real kernel source run, and are checked against the
reference backend with SPEC §5's tolerances. The emulated build uses
128-thread blocks, 2048-element tiles and a 4-block grid, so small tensors
span several tiles and the grid-stride loops wrap.

``backend="cuda"`` on CPU tensors exists only in a process started with
``FSAM_CUDA_EMULATE=1`` (read when fsam_kernels is imported), so
:func:`test_emulated_cuda_suite` starts one pytest process with it, which runs

- tests/test_conformance.py on ``cuda-cpu``: the kernel cases of docs/CASES.md
  A written once for every backend (every dtype pair, sizes around tiles and
  chunks, empty tensors anywhere, D-A1/D-A2, skips D-C1, grad_scale D-C2,
  zero grads and low-precision norms D-D1..D-D3, views and layouts D-E1/D-E2,
  maximize D-F5, several steps, determinism D-J1);
- tests/test_native.py on the ``cuda_emu`` target: what is specific to the
  native kernels (> 1000 tensors, the float64 accumulator, argument errors,
  16-bit rounding, the call-site cache, torch.compile);
- tests/test_backends.py on ``cuda-cpu``: the optimizer-level cases;
- the tests below: SAM / FunctionalSAM (plain and preconditioned) optimizer
  steps against ``backend="reference"``, and the emulated build's set-up.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from fsam_kernels import SAM, FunctionalSAM, get_backend
from fsam_kernels.backends import native
from helpers import F32_ATOL, F32_RTOL_1, F32_RTOL_10, within_ulps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATED = native.CUDA_EMULATED
in_emulated_process = pytest.mark.skipif(
    not EMULATED, reason="runs inside test_emulated_cuda_suite's FSAM_CUDA_EMULATE=1 process")

#: what the emulated process runs (module docstring)
SUITE = ["tests/test_native.py", "tests/test_conformance.py", "tests/test_backends.py", "tests/test_plan_cache.py",
         "tests/test_cuda_emulated.py"]
#: the tests of this file that only the parent (non-emulating) process runs
PARENT_ONLY = ("test_emulated_cuda_suite", "test_cuda_backend_refuses_cpu_tensors_unless_emulated")
SELECT = "(cuda_emu or cuda-cpu or test_cuda_emulated)" + "".join(f" and not {t}" for t in PARENT_ONLY)


@pytest.mark.skipif(EMULATED, reason="this process is the emulated run itself")
def test_emulated_cuda_suite():
    """Every selected case passes on the emulated CUDA kernels, and none is
    skipped (a missing emulated library or a dropped target fails here)."""
    if os.environ.get("FSAM_NO_NATIVE") == "1":
        pytest.skip("native libraries disabled (FSAM_NO_NATIVE=1)")
    env = dict(os.environ, FSAM_CUDA_EMULATE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
           "-W", "ignore::DeprecationWarning", *SUITE, "-k", SELECT]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (res.stdout[-8000:] + "\n" + res.stderr[-3000:]).strip()
    assert res.returncode == 0, f"the emulated CUDA suite failed ({' '.join(cmd)}):\n{tail}"
    summary = res.stdout.strip().splitlines()[-1]
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
    assert "skipped" not in summary, f"emulated CUDA cases were skipped:\n{tail}"
    # test_native ~10, test_conformance ~89, test_backends ~29 and this file's
    # cases (~16): far fewer means the selection lost its targets
    assert passed >= 130, f"only {passed} emulated CUDA cases ran:\n{tail}"


@pytest.mark.skipif(EMULATED, reason="this process emulates CUDA")
def test_cuda_backend_refuses_cpu_tensors_unless_emulated():
    """Without FSAM_CUDA_EMULATE=1 at import, "cuda" is unavailable on CPU
    tensors (the reason names the variable) and refuses them if called."""
    from fsam_kernels.backends import backend_availability

    ok, why = backend_availability("cuda", "cpu")
    assert not ok and "FSAM_CUDA_EMULATE=1" in why
    out = torch.zeros((), dtype=torch.float64)
    with pytest.raises(ValueError, match="cuda backend: out is on cpu.*FSAM_CUDA_EMULATE=1"):
        native.CUDABackend().sq_norm([torch.ones(3)], None, None, beta2=0.9, eps=0.0,
                                     precondition=False, grad_scale=None, out=out)


# ---------------------------------------------------------------------------
# The emulation itself (csrc/cuda_emu/emu_selftest.cu through ctypes: any process)
# ---------------------------------------------------------------------------
def _selftest(which, threads, n_out):
    import ctypes

    path = os.path.join(native.library_dir(), "libfsam_cuda_emu.so")
    if os.environ.get("FSAM_NO_NATIVE") == "1":
        pytest.skip("native libraries disabled (FSAM_NO_NATIVE=1)")
    assert os.path.exists(path), f"{path} missing: setup.py's emulated CUDA build failed"
    lib = ctypes.CDLL(path)
    fn = lib.fsam_cuda_emu_selftest
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    out = torch.full((n_out,), -7.0, dtype=torch.float64)
    msg = ctypes.create_string_buffer(512)
    rc = fn(which, threads, out.data_ptr(), msg, 512)
    return rc, out, msg.value.decode()


@pytest.mark.parametrize("threads", [64, 128, 96])
def test_emulated_syncthreads_is_a_barrier(threads):
    """With __syncthreads every thread reads its neighbour's write; without it
    some thread reads the neighbour's slot before it is written and gets the
    poison (NaN): the emulation's barrier is real."""
    rc, out, msg = _selftest(0, threads, threads)
    assert rc == 0, msg
    want = (torch.arange(threads, dtype=torch.float64) + 1) % threads
    assert torch.equal(out, want)
    rc, out, msg = _selftest(1, threads, threads)
    assert rc == 0, msg
    assert bool(out.isnan().any()), "a missing __syncthreads went unnoticed"
    ok = ~out.isnan()
    assert torch.equal(out[ok], want[ok])   # what was written is read right


def test_emulated_shuffle_down_semantics():
    """__shfl_down_sync(v, d): lane + d's value inside the warp, else its own."""
    threads = 64
    rc, out, msg = _selftest(2, threads, 3 * threads)
    assert rc == 0, msg
    out = out.view(threads, 3)
    tid = torch.arange(threads)
    for k, d in enumerate((1, 5, 16)):
        want = torch.where(tid % 32 + d < 32, tid + d, tid).double()
        assert torch.equal(out[:, k], want), f"delta {d}"


def test_emulated_deadlock_is_a_launch_error():
    """A barrier that can never open is reported (cudaGetLastError), not a hang."""
    rc, _, msg = _selftest(3, 64, 64)
    assert rc == 1 and "deadlock" in msg and "deadlock_kernel" in msg, msg


# ---------------------------------------------------------------------------
# In the emulated process
# ---------------------------------------------------------------------------
@in_emulated_process
def test_emulated_build_is_used_and_never_auto():
    """backend="cuda" on CPU tensors is the emulated library (the CPU kernels'
    chunk is 32x its tile), which "auto" never picks."""
    be = get_backend("cuda", "cpu")
    assert isinstance(be, native.CUDABackend) and be.norm_dtype == torch.float64
    lib = native.cuda_emu_library()
    assert lib is not None and lib.fsam_cuda_device_count() == 1
    tile = int(lib.fsam_cuda_tile_size())
    assert tile == 2048 and native.cpu_library().fsam_cpu_chunk_size() % tile == 0
    assert get_backend("auto", "cpu").name == "cpu"
    with pytest.raises(ValueError, match="cpu backend: out is on meta"):
        get_backend("cpu", "cpu").sq_norm([], None, None, beta2=0.9, eps=0.0, precondition=False,
                                          grad_scale=None,
                                          out=torch.zeros((), dtype=torch.float64, device="meta"))


def _model(dtype=torch.float32):
    """An MLP whose first weight spans two emulated tiles (64 x 40 = 2560)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 5)).to(dtype)


def _groups(model, rho):
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": w, "weight_decay": 0.1, "rho": rho},
            {"params": b, "weight_decay": 0.0, "rho": rho}]


def _train(backend, cls, precondition, steps, dtype=torch.float32):
    model = _model(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 40, generator=gen).to(dtype)
    y = torch.randint(0, 5, (32,), generator=gen)
    opt = cls(_groups(model, 0.05), lr=1e-2, precondition=precondition, backend=backend)

    def closure():
        z = model(x)
        return z, torch.nn.functional.cross_entropy(z.float(), y)

    for _ in range(steps):
        opt.step(closure)
    return model, opt


@in_emulated_process
@pytest.mark.parametrize("cls,precondition", [(SAM, False), (SAM, True),
                                              (FunctionalSAM, False), (FunctionalSAM, True)],
                         ids=["SAM", "SAM-precond", "FSAM", "FSAM-precond"])
@pytest.mark.parametrize("steps", [1, 5])
def test_optimizer_steps_match_reference(cls, precondition, steps):
    """SPEC §5: float32 params and state within rtol 1e-6 / atol 1e-7 after one
    step, rtol 1e-5 after several (atol 1e-6: five updates of ~lr = 1e-2);
    two parameter groups, two passes per step through the closure."""
    rtol, atol = (F32_RTOL_1, F32_ATOL) if steps == 1 else (F32_RTOL_10, 1e-6)
    ma, oa = _train("cuda", cls, precondition, steps)
    mb, ob = _train("reference", cls, precondition, steps)
    for (name, p), q in zip(ma.named_parameters(), mb.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        sa, sb = oa.state[p], ob.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name} {k}: {m}")
    assert float(oa.state[next(ma.parameters())]["step"]) == steps


@in_emulated_process
@pytest.mark.parametrize("cls", [SAM, FunctionalSAM])
def test_bfloat16_optimizer_step_within_one_ulp(cls):
    """SPEC §5: bfloat16 parameters within one ulp of the reference; state as fp32."""
    ma, oa = _train("cuda", cls, True, 1, torch.bfloat16)
    mb, ob = _train("reference", cls, True, 1, torch.bfloat16)
    for (name, p), q in zip(ma.named_parameters(), mb.parameters()):
        assert p.dtype == torch.bfloat16
        assert within_ulps(p.detach(), q.detach(), 1), name
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oa.state[p][k], ob.state[q][k], rtol=F32_RTOL_1,
                                       atol=F32_ATOL)
