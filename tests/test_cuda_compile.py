"""The CUDA library compiles (nvcc, compile only) even where no GPU is present.

setup.py only warns when nvcc fails (so a machine with a broken toolkit still
gets the CPU library); these tests make a CUDA compile error fail CI. They
skip where nvcc is missing.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _cu_sources():
    d = os.path.join(ROOT, "csrc", "cuda")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".cu"))


@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_sources_compile(tmp_path, arch):
    """Compile every .cu for sm_80 (A100: the lowest target, bf16/fp16 device
    code must be valid there) and sm_90 (H100/H200) with the build's flags.
    The sources must not depend on the host emulation (FSAM_CUDA_EMULATE is
    not defined here, so fsam/cuda_emu.h is never included)."""
    sources = _cu_sources()
    assert sources, "csrc/cuda has no .cu files"
    for src in sources:
        obj = tmp_path / (os.path.basename(src) + ".o")
        cmd = [NVCC, "-std=c++17", "-O1", "--fmad=false", "-Xcompiler", "-fPIC",
               "-gencode", f"arch=compute_{arch},code=sm_{arch}",
               "-I", os.path.join(ROOT, "csrc", "include"), "-c", src, "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"nvcc failed on {src}:\n{res.stdout}\n{res.stderr}"
        assert obj.exists()


def test_built_cuda_library_loads_without_gpu():
    """The library built by setup.py exists, exports the C API and loads
    (without a GPU it reports zero devices instead of failing)."""
    lib_dir = os.environ.get("FSAM_LIB_DIR") or os.path.join(ROOT, "fsam_kernels", "_lib")
    path = os.path.join(lib_dir, "libfsam_cuda.so")
    if os.environ.get("FSAM_NO_CUDA") or os.environ.get("FSAM_NO_NATIVE"):
        pytest.skip("CUDA build disabled by the environment")
    assert os.path.exists(path), (
        f"{path} missing although nvcc is present: setup.py's CUDA build failed "
        f"(see the `pip install -e .` log) or was not run")
    lib = ctypes.CDLL(path)
    lib.fsam_cuda_api_version.restype = ctypes.c_int
    lib.fsam_cuda_tile_size.restype = ctypes.c_int64
    lib.fsam_cuda_device_count.restype = ctypes.c_int
    assert lib.fsam_cuda_api_version() == 3
    assert lib.fsam_cuda_tile_size() > 0
    assert lib.fsam_cuda_device_count() >= 0
    for name in ("sq_norm", "perturb", "restore_adamw", "restore"):
        assert hasattr(lib, "fsam_cuda_" + name)
