"""fsam_kernels: SAM and Functional-SAM optimizers on fused multi-tensor kernels.

Building needs no torch: the native libraries (csrc/) are plain C++ / CUDA C++
behind a C API (csrc/include/fsam/capi.h), loaded with ctypes at run time.

* ``fsam_kernels/_lib/libfsam_cpu.so``: always, with the system C++ compiler
  (``$CXX``, else ``c++``/``g++``), C++17, -O3 -march=x86-64-v2 (runs on any
  x86-64 machine of the last decade; no -march=native).
* ``fsam_kernels/_lib/libfsam_cuda.so``: when ``nvcc`` is found (``$CUDA_HOME``
  /bin, else PATH), for sm_80 and sm_90 plus PTX (``$FSAM_CUDA_ARCHS`` overrides,
  e.g. "80;90"). A failing nvcc only warns: the CPU library is still built.
* ``fsam_kernels/_lib/libfsam_cuda_emu.so``: always (no nvcc needed), the same
  csrc/cuda sources compiled for the host by the C++ compiler as C++ with
  ``-DFSAM_CUDA_EMULATE -include fsam/cuda_emu.h`` (threads as fibers, real
  ``__syncthreads`` and warp shuffles, launches as host loops). The "cuda"
  backend runs it on CPU tensors when ``FSAM_CUDA_EMULATE=1`` is set before
  fsam_kernels is imported (tests/test_cuda_emulated.py); csrc/cuda_emu holds
  the emulation's self-test kernels, built into this library only. A failing
  build only warns (the emulated-CUDA tests then fail, saying so).

The libraries are built by ``build_ext`` (so ``pip install -e .`` and
``pip install .`` both build them) and by ``python setup.py build_native``.
Set ``FSAM_NO_CUDA=1`` to skip the CUDA library, ``FSAM_NO_NATIVE=1`` to skip
both (the native backends then report themselves unavailable).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings

from setuptools import Command, Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
INCLUDE = os.path.join(CSRC, "include")
LIB_DIR_REL = os.path.join("fsam_kernels", "_lib")

CXX_FLAGS = [
    "-std=c++17", "-O3", "-march=x86-64-v2", "-mtune=generic", "-fPIC", "-shared",
    "-pthread", "-fvisibility=hidden", "-fopenmp-simd",
    # IEEE semantics (SPEC tolerances; CPU and CUDA agree bitwise):
    "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
]
# The emulated CUDA build: the .cu files as host C++ (fsam/cuda_emu.h forced).
EMU_FLAGS = ["-x", "c++", "-DFSAM_CUDA_EMULATE", "-include", "fsam/cuda_emu.h"]
NVCC_FLAGS = [
    "-std=c++17", "-O3", "--shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
    "--fmad=false", "-lineinfo",
]


def _sources(sub, ext):
    d = os.path.join(CSRC, sub)
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(ext))


def _headers():
    out = []
    for dp, _, fs in os.walk(INCLUDE):
        out += [os.path.join(dp, f) for f in fs if f.endswith(".h")]
    return out


def _stale(target, deps):
    if not os.path.exists(target):
        return True
    t = os.path.getmtime(target)
    return any(os.path.getmtime(d) > t for d in deps)


def _run(cmd):
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def find_cxx():
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand.split()[0]):
            return cand.split()
    return None


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def cuda_arch_flags():
    archs = os.environ.get("FSAM_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    archs = [a.strip().replace(".", "") for a in archs if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX
    return flags


def build_native_libs(lib_dir, force=False):
    """Build the native libraries into ``lib_dir``; returns the paths built."""
    if os.environ.get("FSAM_NO_NATIVE"):
        print("FSAM_NO_NATIVE set: not building the native libraries")
        return []
    os.makedirs(lib_dir, exist_ok=True)
    built = []
    headers = _headers()

    cpu_src = _sources("cpu", ".cpp")
    cpu_lib = os.path.join(lib_dir, "libfsam_cpu.so")
    cxx = find_cxx()
    if not cpu_src:
        warnings.warn("csrc/cpu has no sources: the cpu backend will be unavailable")
    elif cxx is None:
        warnings.warn("no C++ compiler found ($CXX, c++, g++): the cpu backend will be unavailable")
    elif force or _stale(cpu_lib, cpu_src + headers + [__file__]):
        tmp = cpu_lib + ".tmp"
        _run(cxx + CXX_FLAGS + ["-I", INCLUDE] + cpu_src + ["-o", tmp])
        os.replace(tmp, cpu_lib)
        built.append(cpu_lib)

    cuda_src = _sources("cuda", ".cu")
    emu_lib = os.path.join(lib_dir, "libfsam_cuda_emu.so")
    emu_src = cuda_src + _sources("cuda_emu", ".cu")   # + the emulation's self-tests
    if cuda_src and cxx is not None and (force or _stale(emu_lib, emu_src + headers + [__file__])):
        tmp = emu_lib + ".tmp"
        try:
            _run(cxx + CXX_FLAGS + ["-I", INCLUDE] + EMU_FLAGS + emu_src + ["-o", tmp])
            os.replace(tmp, emu_lib)
            built.append(emu_lib)
        except (subprocess.CalledProcessError, OSError) as exc:
            warnings.warn(f"building the emulated CUDA library failed ({exc}); continuing "
                          f"without it")
            print(f"WARNING: building the emulated CUDA library failed ({exc})", file=sys.stderr)

    cuda_lib = os.path.join(lib_dir, "libfsam_cuda.so")
    nvcc = find_nvcc()
    if os.environ.get("FSAM_NO_CUDA"):
        print("FSAM_NO_CUDA set: not building the CUDA library")
    elif not cuda_src:
        pass
    elif nvcc is None:
        print("nvcc not found: not building the CUDA library (the cuda backend will be unavailable)")
    elif force or _stale(cuda_lib, cuda_src + headers + [__file__]):
        tmp = cuda_lib + ".tmp"
        cmd = [nvcc] + NVCC_FLAGS + cuda_arch_flags() + ["-I", INCLUDE] + cuda_src + ["-o", tmp]
        try:
            _run(cmd)
            os.replace(tmp, cuda_lib)
            built.append(cuda_lib)
        except (subprocess.CalledProcessError, OSError) as exc:
            warnings.warn(f"building the CUDA library failed ({exc}); continuing without it")
            print(f"WARNING: building the CUDA library failed ({exc}); continuing without it",
                  file=sys.stderr)
    return built


class BuildNative(Command):
    """``python setup.py build_native [--force]``: build the libraries in place."""

    description = "build the native C++/CUDA libraries into fsam_kernels/_lib"
    user_options = [("force", "f", "rebuild even when up to date")]
    boolean_options = ["force"]

    def initialize_options(self):
        self.force = 0

    def finalize_options(self):
        pass

    def run(self):
        build_native_libs(os.path.join(ROOT, LIB_DIR_REL), force=bool(self.force))


class BuildExt(build_ext):
    """build_ext that builds the ctypes libraries (no Python extension, no torch).

    The in-tree copy (fsam_kernels/_lib) is always refreshed, which is what an
    editable install loads; for a regular install the libraries are copied
    into the build directory as package data.
    """

    def run(self):
        in_tree = os.path.join(ROOT, LIB_DIR_REL)
        built = build_native_libs(in_tree, force=bool(self.force))
        del built
        if not self.inplace and not getattr(self, "editable_mode", False):
            dest = os.path.join(self.build_lib, LIB_DIR_REL)
            os.makedirs(dest, exist_ok=True)
            for f in os.listdir(in_tree) if os.path.isdir(in_tree) else []:
                if f.endswith(".so"):
                    shutil.copy2(os.path.join(in_tree, f), os.path.join(dest, f))

    def get_outputs(self):
        return []

    def get_output_mapping(self):
        return {}


setup(
    name="fsam_kernels",
    version="0.1.0",
    description="SAM, Functional-SAM and preconditioned variants on fused multi-tensor kernels",
    packages=find_packages(include=["fsam_kernels", "fsam_kernels.*"]),
    package_data={"fsam_kernels": ["_lib/*.so"]},
    python_requires=">=3.9",
    install_requires=["numpy", "tqdm", "tokenizers", "matplotlib"],
    # A placeholder extension makes setuptools run build_ext (and mark the
    # wheel platform-specific); BuildExt builds the ctypes libraries instead.
    ext_modules=[Extension("fsam_kernels._lib._native_placeholder", sources=[])],
    cmdclass={"build_ext": BuildExt, "build_native": BuildNative},
    entry_points={
        "console_scripts": [
            "fsam-train=fsam_kernels.lm.train:main",
            "fsam-diagnose=fsam_kernels.diagnose_cli:main",
            "fsam-sweep=fsam_kernels.lm.sweep:main",
        ]
    },
    zip_safe=False,
)
