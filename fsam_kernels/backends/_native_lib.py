"""ctypes loading of the native libraries and their process-wide settings.

Split out of :mod:`fsam_kernels.backends.native` (which re-exports every public
name here): the C API of ``csrc/include/fsam/capi.h`` declared for ctypes, the
lazy, thread-safe loading of ``libfsam_cpu.so`` / ``libfsam_cuda.so`` /
``libfsam_cuda_emu.so`` from :func:`library_dir`, the CPU thread count, the
CPU instruction-set choice and the streaming-store threshold. See native.py's
module docstring for the environment variables.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import warnings
from typing import Optional

import torch

from . import CUDA_EMULATE

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_F64 = 3
_STATE_CODE = {torch.float32: 0, torch.float64: 3}
_API_VERSION = 3


def library_dir() -> str:
    """Directory the native libraries are loaded from."""
    env = os.environ.get("FSAM_LIB_DIR")
    if env:
        return env
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_lib")


# ----------------------------------------------------------------------------
# Library loading (ctypes)
# ----------------------------------------------------------------------------
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_D = ctypes.c_double
_INT = ctypes.c_int


def _declare_cpu(lib):
    lib.fsam_cpu_api_version.restype = _INT
    lib.fsam_cpu_last_error.restype = ctypes.c_char_p
    lib.fsam_cpu_chunk_size.restype = _I64
    lib.fsam_cpu_chunk_starts.argtypes = [_P, _I64, _I64, _P]
    lib.fsam_cpu_chunk_starts.restype = _I64
    lib.fsam_cpu_set_num_threads.argtypes = [_INT]
    lib.fsam_cpu_set_num_threads.restype = None
    lib.fsam_cpu_get_num_threads.restype = _INT
    lib.fsam_cpu_best_isa.restype = _INT
    lib.fsam_cpu_get_isa.restype = _INT
    lib.fsam_cpu_set_isa.argtypes = [_INT]
    lib.fsam_cpu_set_isa.restype = _INT
    lib.fsam_cpu_get_nt_min_bytes.restype = _I64
    lib.fsam_cpu_set_nt_min_bytes.argtypes = [_I64]
    lib.fsam_cpu_set_nt_min_bytes.restype = None
    lib.fsam_cpu_cast.argtypes = [_P, ctypes.c_int32, _P, ctypes.c_int32, _I64]
    lib.fsam_cpu_cast.restype = _INT
    _declare_ops(lib, "cpu")


def _declare_cuda(lib):
    lib.fsam_cuda_api_version.restype = _INT
    lib.fsam_cuda_last_error.restype = ctypes.c_char_p
    lib.fsam_cuda_tile_size.restype = _I64
    lib.fsam_cuda_chunk_starts.argtypes = [_P, _I64, _I64, _P]
    lib.fsam_cuda_chunk_starts.restype = _I64
    lib.fsam_cuda_device_count.restype = _INT
    _declare_ops(lib, "cuda")


#: the multi-tensor ops' C argument types, filled by native.py from its op
#: schema table (``_OPS``) when it is imported, before any library is loaded:
#: op name -> {"cpu": [...], "cuda": [...]}
OP_ARGTYPES: dict = {}


def _declare_ops(lib, prefix: str):
    if not OP_ARGTYPES:
        raise RuntimeError("fsam_kernels: the native libraries are loaded through "
                           "fsam_kernels.backends.native (its op table declares the kernels)")
    for name, types in OP_ARGTYPES.items():
        fn = getattr(lib, f"fsam_{prefix}_{name}")
        fn.argtypes = types[prefix]
        fn.restype = _INT


class _Loaded:
    def __init__(self):
        self.lib = None
        self.error = "not loaded yet"
        self.tried = False


_cpu = _Loaded()
_cuda = _Loaded()
_cuda_emu = _Loaded()

#: True when FSAM_CUDA_EMULATE=1 was set before fsam_kernels was imported: the
#: "cuda" backend then also runs on CPU tensors, with the CUDA kernels' host
#: build (libfsam_cuda_emu.so, csrc/include/fsam/cuda_emu.h). For tests.
CUDA_EMULATED = CUDA_EMULATE
_load_lock = threading.Lock()


def _load(state: _Loaded, fname: str, declare, prefix: str):
    with _load_lock:
        if state.tried:
            return state.lib
        state.tried = True
        path = os.path.join(library_dir(), fname)
        if not os.path.exists(path):
            state.error = (f"{path} not found: build it with `pip install -e .` or "
                           f"`python setup.py build_native`")
            return None
        try:
            lib = ctypes.CDLL(path)
            declare(lib)
            version = getattr(lib, f"fsam_{prefix}_api_version")()
        except (OSError, AttributeError) as exc:
            state.error = (f"could not load {path}: {exc} (a library built from older "
                           f"sources? rebuild it: python setup.py build_native --force)")
            return None
        if version != _API_VERSION:
            state.error = (f"{path} has C API version {version}, expected {_API_VERSION}: "
                           f"rebuild it (python setup.py build_native --force)")
            return None
        state.lib, state.error = lib, ""
        return lib


def cpu_library():
    """The loaded CPU library (ctypes.CDLL) or None (see ``CPUBackend.availability``)."""
    if not _cpu.tried:
        lib = _load(_cpu, "libfsam_cpu.so", _declare_cpu, "cpu")
        if lib is not None:
            env = os.environ.get("FSAM_NUM_THREADS")
            lib.fsam_cpu_set_num_threads(int(env) if env else torch.get_num_threads())
            isa = os.environ.get("FSAM_CPU_ISA", "")
            if isa and isa.lower() not in CPU_ISAS + ("0", "1", "2"):
                warnings.warn(f"FSAM_CPU_ISA={isa!r} is not one of {CPU_ISAS} (or 0, 1, 2): "
                              f"ignored, the CPU kernels use the best set the CPU supports",
                              RuntimeWarning, stacklevel=2)
    return _cpu.lib


def cuda_library():
    """The loaded CUDA library or None. Loaded only when torch sees a CUDA device."""
    if not _cuda.tried:
        if not torch.cuda.is_available():
            _cuda.error = "torch.cuda.is_available() is False"
            return None
        _load(_cuda, "libfsam_cuda.so", _declare_cuda, "cuda")
    return _cuda.lib


def cuda_emu_library():
    """The emulated CUDA library (the csrc/cuda kernels built for the host, same
    C API, host pointers) or None; loaded only when :data:`CUDA_EMULATED`."""
    if not _cuda_emu.tried:
        if not CUDA_EMULATED:
            _cuda_emu.error = ("FSAM_CUDA_EMULATE=1 was not set before fsam_kernels was "
                               "imported")
            return None
        _load(_cuda_emu, "libfsam_cuda_emu.so", _declare_cuda, "cuda")
    return _cuda_emu.lib


def set_num_threads(n: int) -> None:
    """Threads of the CPU kernels (``n <= 0``: the machine's CPU count)."""
    lib = cpu_library()
    if lib is None:
        raise RuntimeError(f"fsam_kernels cpu library unavailable: {_cpu.error}")
    lib.fsam_cpu_set_num_threads(int(n))


def get_num_threads() -> int:
    lib = cpu_library()
    if lib is None:
        raise RuntimeError(f"fsam_kernels cpu library unavailable: {_cpu.error}")
    return int(lib.fsam_cpu_get_num_threads())


#: instruction sets of the CPU kernels, lowest first: "baseline" (x86-64-v2:
#: SSE4.2, the build's flags), "avx2" (AVX2 + F16C + BMI2), "avx512" (AVX-512
#: F/VL/BW/DQ). The same C++ is compiled once per set (csrc/cpu); results are
#: bitwise the same on every one (SPEC §5).
CPU_ISAS = ("baseline", "avx2", "avx512")
_ISA_NAMES = CPU_ISAS
_isa_forced: Optional[str] = None   # what set_cpu_isa last forced (None: the default)


def supported_cpu_isas() -> tuple:
    """The instruction sets of :data:`CPU_ISAS` this CPU (and OS) supports,
    lowest first (``("baseline",)`` on non-x86 machines)."""
    lib = _cpu_lib_or_raise()
    return CPU_ISAS[:int(lib.fsam_cpu_best_isa()) + 1]


def cpu_isa() -> str:
    """Instruction set the CPU kernels run with now: "baseline", "avx2" or "avx512"
    (the one forced by :func:`set_cpu_isa`, else the best the CPU supports,
    capped by ``$FSAM_CPU_ISA``)."""
    lib = _cpu_lib_or_raise()
    return CPU_ISAS[int(lib.fsam_cpu_get_isa())]


def set_cpu_isa(isa: Optional[str]) -> str:
    """Force the CPU kernels' instruction set for every later call in this
    process (all threads): one of :data:`CPU_ISAS`, or None for the default
    (the best the CPU supports, capped by ``$FSAM_CPU_ISA``). Results are
    bitwise the same on every set; this exists to test each path and to
    measure them. Returns the set now in effect.

    Raises ValueError for a name not in :data:`CPU_ISAS` and for a set this
    CPU lacks (see :func:`supported_cpu_isas`); nothing changes then."""
    global _isa_forced
    lib = _cpu_lib_or_raise()
    if isa is not None and isa not in CPU_ISAS:
        raise ValueError(f"set_cpu_isa: isa={isa!r}; expected one of {CPU_ISAS} or None")
    level = -1 if isa is None else CPU_ISAS.index(isa)
    got = int(lib.fsam_cpu_set_isa(level))
    if got < 0:
        msg = lib.fsam_cpu_last_error().decode(errors="replace")
        raise ValueError(f"set_cpu_isa: isa={isa!r} is not available: {msg} (this CPU "
                         f"supports {supported_cpu_isas()})")
    _isa_forced = isa
    return CPU_ISAS[got]


@contextlib.contextmanager
def using_cpu_isa(isa: Optional[str]):
    """``with using_cpu_isa("avx2"): ...`` runs the block's CPU kernel calls on
    that instruction set (None: the default) and restores the previous choice
    on exit, even on an error. Process-wide like :func:`set_cpu_isa`: do not
    use it from several threads at once. Raises ValueError as set_cpu_isa."""
    previous = _isa_forced
    set_cpu_isa(isa)
    try:
        yield cpu_isa()
    finally:
        set_cpu_isa(previous)


def get_streaming_min_bytes() -> int:
    """Calls moving at least this many bytes write their write-only outputs (the
    backup in perturb, the parameter in restore_adamw) with streaming stores;
    -1: never."""
    return int(_cpu_lib_or_raise().fsam_cpu_get_nt_min_bytes())


def set_streaming_min_bytes(n: Optional[int]) -> None:
    """See :func:`get_streaming_min_bytes` (None: the default, 32 MiB or
    ``$FSAM_NT_MIN_BYTES``). Results do not depend on it."""
    _cpu_lib_or_raise().fsam_cpu_set_nt_min_bytes(-2 if n is None else max(-1, int(n)))


def _check_rc(rc: int, lib, prefix: str):
    if rc != 0:
        msg = getattr(lib, f"fsam_{prefix}_last_error")()
        raise RuntimeError(f"fsam_kernels native {prefix} kernel failed: "
                           f"{msg.decode(errors='replace') if msg else rc}")


def _cpu_lib_or_raise():
    lib = cpu_library()
    if lib is None:
        raise RuntimeError(f"fsam_kernels cpu library unavailable: {_cpu.error}")
    return lib


__all__ = ["set_num_threads", "get_num_threads", "CPU_ISAS", "cpu_isa", "supported_cpu_isas",
           "set_cpu_isa", "using_cpu_isa", "set_streaming_min_bytes", "get_streaming_min_bytes",
           "cpu_library", "cuda_library", "cuda_emu_library", "CUDA_EMULATED", "library_dir"]
