"""Native backends: the C++ (``"cpu"``) and CUDA C++ (``"cuda"``) kernels.

The kernels live in two shared libraries built by setup.py from csrc/ without
torch (``fsam_kernels/_lib/libfsam_cpu.so``, ``libfsam_cuda.so``), behind the
plain C API of ``csrc/include/fsam/capi.h``. They are loaded here with ctypes
(as bitsandbytes loads its library), so one build serves any torch version,
and wrapped as ``torch.library`` custom ops (``torch.ops.fsam_kernels.sq_norm``,
``perturb``, ``restore_adamw``, ``restore``; schemas with ``(a!)`` mutation
annotations and fake kernels) that mutate their arguments in place, so
``torch.compile`` treats each as one opaque call.

CUDA launches: the per-tensor records and the chunk table live in device
memory, cached by content (the pointers), so a steady-state step copies
nothing to the device and never synchronises. Warm up one step before
capturing a CUDA graph (the first call of a new set of tensors builds and
uploads its table).

Tensor handling (for every operation):

- Parameters must be dense and non-overlapping (contiguous, channels_last,
  transposed, any permutation of a contiguous layout, at any storage offset);
  backups, exp_avg and exp_avg_sq must share the parameter's strides (they
  are ``zeros_like(p)`` / ``empty_like(p)``). The kernels then run over memory
  order. Anything else (an overlapping or strided view such as ``w[:, ::2]``)
  raises ``ValueError`` naming the parameter index.
- A grad whose strides differ from its parameter's (or that is not dense) is
  first copied into the parameter's layout, so it is read by logical index.
  A float64 grad of a 16/32-bit parameter is read as float32 and a 16/32-bit
  grad of a float64 parameter as float64 (as the reference's perturb and
  AdamW read them).
- ``grad_scale``, ``found_inf`` and ``steps`` must be float32 tensors of one
  element on the parameters' device, ``norm_sq``/``out`` (N² of SPEC §1) a
  float64 one (``norm_dtype``: partial sums and totals are float64 across
  chunks, tiles, calls and groups; perturb rounds N² once to float32 and
  forms the scale from it). They are read and written by the kernels (no
  ``.item()``, no host synchronisation).
- Empty tensors may appear anywhere in the lists.

Environment: ``FSAM_LIB_DIR`` overrides the directory the libraries are
loaded from; ``FSAM_NUM_THREADS`` sets the CPU thread count (default:
``torch.get_num_threads()``), see also :func:`set_num_threads`;
``FSAM_CPU_ISA`` (baseline|avx2|avx512) caps the CPU kernels' instruction set
(read on first use; :func:`set_cpu_isa` / :func:`using_cpu_isa` force one of
:func:`supported_cpu_isas` explicitly, as the tests do for each);
``FSAM_NT_MIN_BYTES`` the call size from which they use streaming stores
(:func:`set_streaming_min_bytes`). Neither changes results.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import operator
import os
import threading
import warnings
from collections import OrderedDict
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import CUDA_EMULATE
from .base import Backend
from .layout import is_dense, same_layout

__all__ = ["CPUBackend", "CUDABackend", "set_num_threads", "get_num_threads", "CPU_ISAS",
           "cpu_isa", "supported_cpu_isas", "set_cpu_isa", "using_cpu_isa", "set_streaming_min_bytes", "get_streaming_min_bytes",
           "cpu_library", "cuda_library", "cuda_emu_library", "CUDA_EMULATED", "library_dir"]

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
    lib.fsam_cpu_sq_norm.argtypes = [_P, _I64, _INT, _D, _D, _P, _P]
    lib.fsam_cpu_perturb.argtypes = [_P, _I64, _INT, _D, _P, _D, _D, _D, _P, _P]
    lib.fsam_cpu_restore_adamw.argtypes = [_P, _I64, _INT, _D, _D, _D, _D, _D, _INT, _P, _P]
    lib.fsam_cpu_restore.argtypes = [_P, _I64]
    lib.fsam_cpu_cast.argtypes = [_P, ctypes.c_int32, _P, ctypes.c_int32, _I64]
    for f in ("sq_norm", "perturb", "restore_adamw", "restore", "cast"):
        getattr(lib, "fsam_cpu_" + f).restype = _INT


def _declare_cuda(lib):
    lib.fsam_cuda_api_version.restype = _INT
    lib.fsam_cuda_last_error.restype = ctypes.c_char_p
    lib.fsam_cuda_tile_size.restype = _I64
    lib.fsam_cuda_device_count.restype = _INT
    lib.fsam_cuda_sq_norm.argtypes = [_P, _P, _I64, _I64, _P, _INT, _D, _D, _P, _P, _INT, _P]
    lib.fsam_cuda_perturb.argtypes = [_P, _P, _I64, _I64, _INT, _D, _P, _D, _D, _D, _P, _P, _INT,
                                      _P]
    lib.fsam_cuda_restore_adamw.argtypes = [_P, _P, _I64, _I64, _INT, _D, _D, _D, _D, _D, _INT,
                                            _P, _P, _INT, _P]
    lib.fsam_cuda_restore.argtypes = [_P, _P, _I64, _I64, _INT, _P]
    for f in ("sq_norm", "perturb", "restore_adamw", "restore"):
        getattr(lib, "fsam_cuda_" + f).restype = _INT


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
            state.error = f"could not load {path}: {exc}"
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


# ----------------------------------------------------------------------------
# Argument preparation: layouts, dtypes, the record table
# ----------------------------------------------------------------------------
def _code(t: Tensor, what: str, i: int) -> int:
    c = _DTYPE_CODE.get(t.dtype)
    if c is None:
        raise TypeError(f"fsam_kernels native: {what}[{i}] has dtype {t.dtype}; expected "
                        f"float32, float16, bfloat16 or float64")
    return c


def _check_param(p: Tensor, i: int, op: str, device: torch.device) -> int:
    if p.device != device:
        raise ValueError(f"{op}: params[{i}] is on {p.device}, expected {device} "
                         f"(one call covers one device)")
    c = _code(p, "params", i)
    if p.is_sparse or p.layout != torch.strided:
        raise ValueError(f"{op}: params[{i}] has layout {p.layout}; expected torch.strided")
    if p.numel() and not is_dense(p):
        raise ValueError(
            f"{op}: params[{i}] (shape {tuple(p.shape)}, strides {tuple(p.stride())}) is an "
            f"overlapping or non-dense view; the native kernels need a dense, non-overlapping "
            f"parameter (contiguous, channels_last or any permutation of those)")
    return c


def _check_like(t: Tensor, p: Tensor, what: str, i: int, op: str, dtype=None):
    if t.device != p.device:
        raise ValueError(f"{op}: {what}[{i}] is on {t.device}, expected {p.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {what}[{i}] has dtype {t.dtype}, expected {dtype}")
    if t.shape != p.shape:
        raise ValueError(f"{op}: {what}[{i}] has shape {tuple(t.shape)}, expected "
                         f"{tuple(p.shape)} (the parameter's)")
    if p.numel() and not same_layout(t, p):
        raise ValueError(f"{op}: {what}[{i}] has strides {tuple(t.stride())} but params[{i}] has "
                         f"{tuple(p.stride())}; state and backups must share the parameter's "
                         f"layout (create them with zeros_like/empty_like)")


def _state_dtype(pcode: int):
    return torch.float64 if pcode == _F64 else torch.float32


def _prep_grad(g: Tensor, like: Tensor, want64: bool, i: int, op: str) -> Tensor:
    """The grad in ``like``'s layout, float64 iff ``want64`` (else a 16/32-bit type)."""
    if g is None:
        raise ValueError(f"{op}: grads[{i}] is None")
    if g.device != like.device:
        raise ValueError(f"{op}: grads[{i}] is on {g.device}, expected {like.device}")
    if g.layout != torch.strided:
        raise ValueError(f"{op}: grads[{i}] has layout {g.layout}; sparse grads are not supported")
    if g.shape != like.shape:
        raise ValueError(f"{op}: grads[{i}] has shape {tuple(g.shape)}, expected {tuple(like.shape)}")
    _code(g, "grads", i)
    if want64 and g.dtype != torch.float64:
        g = g.to(torch.float64)
    elif not want64 and g.dtype == torch.float64:
        g = g.to(torch.float32)
    if g.numel() and not (is_dense(g) and same_layout(g, like)):
        g2 = torch.empty_like(like, dtype=g.dtype)  # preserve_format: like's strides
        g2.copy_(g)
        g = g2
    return g


def _scalar_ptr(t: Optional[Tensor], name: str, device: torch.device, op: str,
                optional: bool = False, dtype: torch.dtype = torch.float32) -> int:
    if t is None:
        if optional:
            return 0
        raise ValueError(f"{op}: {name} is required")
    if t.dtype != dtype or t.numel() != 1:
        what = " (N², the backend's norm_dtype)" if dtype == torch.float64 else ""
        raise TypeError(f"{op}: {name} must be a one-element {str(dtype).replace('torch.', '')} "
                        f"tensor{what}, got dtype {t.dtype} with {t.numel()} elements")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (the tensors' device)")
    return t.data_ptr()


def _ptrs(ts) -> List[int]:
    return list(map(Tensor.data_ptr, ts))


class _Records:
    """The fsam_tensor_t table (capi.h) as an int64 array of shape (n, 8)."""

    def __init__(self, n: int):
        self.a = np.zeros((n, 8), dtype=np.int64)
        self.keep: list = []  # temporaries (converted grads) kept alive for the call

    def set(self, col: int, values):
        if len(values):
            self.a[:, col] = values

    def dtypes(self, pcodes, gcodes):
        if len(pcodes):
            self.a[:, 7] = np.asarray(pcodes, dtype=np.int64) | (np.asarray(gcodes, dtype=np.int64) << 32)

    @property
    def n(self):
        return self.a.shape[0]

    def ptr(self):
        return self.a.ctypes.data


def _device_of(*cands) -> torch.device:
    for c in cands:
        if isinstance(c, Tensor):
            return c.device
        if c:
            return c[0].device
    return torch.device("cpu")


# Fast path: every tensor contiguous, on the op's device, with the expected
# dtypes and matching sizes (the usual case). A handful of cheap attribute
# reads per tensor, no per-tensor Python function calls; anything unusual
# returns None and the full validation below runs (with its copies and
# errors). Contiguous tensors of equal numel are read in memory order, which
# is their logical (row-major) order.
_is_contig = Tensor.is_contiguous
_get_device = Tensor.get_device
_numel = Tensor.numel
_data_ptr = Tensor.data_ptr
_dtype_of = operator.attrgetter("dtype")


def _fast_ok(ts, dev: int, numel) -> bool:
    return (all(map(_is_contig, ts)) and list(map(_numel, ts)) == numel
            and list(map(_get_device, ts)).count(dev) == len(ts))


def _fast_steps_ok(steps, dev: int) -> bool:
    n = len(steps)
    return (list(map(_dtype_of, steps)).count(torch.float32) == n
            and list(map(_numel, steps)).count(1) == n
            and list(map(_get_device, steps)).count(dev) == n)


def _f64_mismatch(codes_a, codes_b) -> bool:
    if _F64 not in codes_a and _F64 not in codes_b:
        return False
    return [c == _F64 for c in codes_a] != [c == _F64 for c in codes_b]


def _fast_sq_norm(grads, exp_avg_sqs, steps, precondition):
    try:
        n = len(grads)
        if n == 0:
            return _Records(0)
        dev = grads[0].get_device()
        numel = list(map(_numel, grads))
        if not _fast_ok(grads, dev, numel):
            return None
        gcodes = list(map(_DTYPE_CODE.get, map(_dtype_of, grads)))
        if None in gcodes:
            return None
        r = _Records(n)
        if precondition:
            if len(exp_avg_sqs) != n or len(steps) != n or not _fast_ok(exp_avg_sqs, dev, numel) \
                    or not _fast_steps_ok(steps, dev):
                return None
            wcodes = list(map(_STATE_CODE.get, map(_dtype_of, exp_avg_sqs)))
            if None in wcodes or _f64_mismatch(wcodes, gcodes):
                return None
            r.set(4, _ptrs(exp_avg_sqs))
            r.set(5, _ptrs(steps))
        else:
            wcodes = [_F64 if gc == _F64 else 0 for gc in gcodes] if _F64 in gcodes else [0] * n
        r.set(1, _ptrs(grads))
        r.set(6, numel)
        r.dtypes(wcodes, gcodes)
        return r
    except Exception:  # sparse or otherwise unusual tensors: the full path explains
        return None


def _fast_update(params, grads, backups, exp_avgs, exp_avg_sqs, steps, need_steps):
    try:
        n = len(params)
        if n == 0:
            return _Records(0)
        dev = params[0].get_device()
        numel = list(map(_numel, params))
        pdt = list(map(_dtype_of, params))
        pcodes = list(map(_DTYPE_CODE.get, pdt))
        if None in pcodes or not _fast_ok(params, dev, numel):
            return None
        r = _Records(n)
        r.set(0, _ptrs(params))
        if backups is not None:
            if not _fast_ok(backups, dev, numel) or list(map(_dtype_of, backups)) != pdt:
                return None
            r.set(2, _ptrs(backups))
        if exp_avgs is not None or exp_avg_sqs is not None:
            sdt = [torch.float64 if c == _F64 else torch.float32 for c in pcodes]
            for col, lst in ((3, exp_avgs), (4, exp_avg_sqs)):
                if lst is None:
                    continue
                if not _fast_ok(lst, dev, numel) or list(map(_dtype_of, lst)) != sdt:
                    return None
                r.set(col, _ptrs(lst))
        if grads is not None:
            if not _fast_ok(grads, dev, numel):
                return None
            gcodes = list(map(_DTYPE_CODE.get, map(_dtype_of, grads)))
            if None in gcodes or _f64_mismatch(gcodes, pcodes):
                return None
            r.set(1, _ptrs(grads))
        else:
            gcodes = pcodes
        if need_steps:
            if steps is None or len(steps) != n or not _fast_steps_ok(steps, dev):
                return None
            r.set(5, _ptrs(steps))
        r.set(6, numel)
        r.dtypes(pcodes, gcodes)
        return r
    except Exception:
        return None


# Record tables of the fast path, cached by what they depend on: every
# tensor's data pointer and contiguity, the numels of the first list (the
# others must match it), the dtypes of the first list and of `typed` (the
# remaining lists' dtypes follow from those on the fast path). A steady-state
# step with the same tensors then costs two attribute reads per tensor instead
# of the fast path's five, with the same table (no host synchronisation).
# Only fast-path tables are cached (no temporaries).
_REC_CACHE: "OrderedDict[tuple, _Records]" = OrderedDict()
_REC_CACHE_CAP = 64
_rec_lock = threading.Lock()


def _rec_key(kind, first, typed, lists):
    try:
        n = len(first)
        key = [kind, first[0].get_device() if n else None, tuple(map(_numel, first)),
               tuple(map(_dtype_of, first)), None if typed is None else tuple(map(_dtype_of, typed))]
        for lst in lists:
            if lst is None:
                key.append(None)
            elif len(lst) != n or not all(map(_is_contig, lst)):
                return None  # not the fast path's
            else:
                key.append(tuple(map(_data_ptr, lst)))
        return tuple(key)
    except Exception:  # tensors without storage etc.: no caching
        return None


def _rec_cache_put(key, rec):
    with _rec_lock:
        _REC_CACHE[key] = rec
        while len(_REC_CACHE) > _REC_CACHE_CAP:
            _REC_CACHE.popitem(last=False)


def _records_sq_norm(grads, exp_avg_sqs, steps, precondition, op="sq_norm"):
    key = _rec_key(("sq_norm", bool(precondition)), grads, exp_avg_sqs if precondition else None,
                   (grads, exp_avg_sqs, steps) if precondition else (grads,))
    if key is not None:
        hit = _REC_CACHE.get(key)
        if hit is not None:
            return hit
    fast = _fast_sq_norm(grads, exp_avg_sqs, steps, precondition)
    if fast is not None:
        if key is not None:
            _rec_cache_put(key, fast)
        return fast
    n = len(grads)
    r = _Records(n)
    if n == 0:
        return r
    device = grads[0].device
    gs_, wcodes = [], []
    for i, g in enumerate(grads):
        if precondition:
            v = exp_avg_sqs[i]
            if v.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"{op}: exp_avg_sqs[{i}] has dtype {v.dtype}; expected float32 "
                                f"(float64 for float64 parameters)")
            if v.device != device:
                raise ValueError(f"{op}: exp_avg_sqs[{i}] is on {v.device}, expected {device}")
            if v.numel() and not is_dense(v):
                raise ValueError(f"{op}: exp_avg_sqs[{i}] is not dense")
            w64 = v.dtype == torch.float64
            g = _prep_grad(g, v, w64, i, op)
        else:
            if g.device != device:
                raise ValueError(f"{op}: grads[{i}] is on {g.device}, expected {device}")
            _code(g, "grads", i)
            if g.layout != torch.strided:
                raise ValueError(f"{op}: grads[{i}] has layout {g.layout}; sparse grads are not "
                                 f"supported")
            w64 = g.dtype == torch.float64
            if g.numel() and not is_dense(g):  # the sum of squares needs no particular order
                g = g.contiguous()
        gs_.append(g)
        wcodes.append(_F64 if w64 else 0)
    r.keep = gs_
    r.set(1, _ptrs(gs_))
    if precondition:
        r.set(4, _ptrs(exp_avg_sqs))
        for i, s in enumerate(steps):
            _scalar_ptr(s, f"steps[{i}]", device, op)
        r.set(5, _ptrs(steps))
    r.set(6, [g.numel() for g in gs_])
    r.dtypes(wcodes, [_DTYPE_CODE[g.dtype] for g in gs_])
    return r


def _records_update(op, params, grads, backups, exp_avgs, exp_avg_sqs, steps, need_steps):
    """Records for perturb / restore_adamw / restore (grads None for restore)."""
    key = _rec_key(("update", bool(need_steps)), params, grads,
                   (params, grads, backups, exp_avgs, exp_avg_sqs, steps if need_steps else None))
    if key is not None:
        hit = _REC_CACHE.get(key)
        if hit is not None:
            return hit
    fast = _fast_update(params, grads, backups, exp_avgs, exp_avg_sqs, steps, need_steps)
    if fast is not None:
        if key is not None:
            _rec_cache_put(key, fast)
        return fast
    n = len(params)
    r = _Records(n)
    if n == 0:
        return r
    device = params[0].device
    pcodes, gcodes, gs_ = [], [], []
    for i, p in enumerate(params):
        pc = _check_param(p, i, op, device)
        pcodes.append(pc)
        if backups is not None:
            _check_like(backups[i], p, "backups", i, op, p.dtype)
        sd = _state_dtype(pc)
        if exp_avgs is not None:
            _check_like(exp_avgs[i], p, "exp_avgs", i, op, sd)
        if exp_avg_sqs is not None:
            _check_like(exp_avg_sqs[i], p, "exp_avg_sqs", i, op, sd)
        if grads is not None:
            g = _prep_grad(grads[i], p, pc == _F64, i, op)
            gs_.append(g)
            gcodes.append(_DTYPE_CODE[g.dtype])
        else:
            gcodes.append(pc)
    r.keep = gs_
    r.set(0, _ptrs(params))
    if grads is not None:
        r.set(1, _ptrs(gs_))
    if backups is not None:
        r.set(2, _ptrs(backups))
    if exp_avgs is not None:
        r.set(3, _ptrs(exp_avgs))
    if exp_avg_sqs is not None:
        r.set(4, _ptrs(exp_avg_sqs))
    if need_steps:
        if steps is None or len(steps) != n:
            raise ValueError(f"{op}: steps must have one entry per parameter")
        for i, s in enumerate(steps):
            _scalar_ptr(s, f"steps[{i}]", device, op)
        r.set(5, _ptrs(steps))
    r.set(6, [p.numel() for p in params])
    r.dtypes(pcodes, gcodes)
    return r


class _Bound:
    """A call site's validated table (``cache=`` of the Backend interface)."""

    __slots__ = ("pinned", "rec", "dev", "numel", "pdtypes", "gdtypes", "pptrs", "storages")


_is = operator.is_
_storage_of = Tensor.untyped_storage


def _pinned_ptrs(pinned) -> tuple:
    """Every data pointer of the pinned sequences: a tensor re-pointed with
    ``.data =`` (params by ``module.to()``, state by "move the optimizer"
    snippets) must never leave a stale pointer in a cached table."""
    return tuple(None if seq is None else tuple(map(_data_ptr, seq)) for seq in pinned)


def _cached_records(cache: dict, slot: str, pinned: tuple, params, grads, build):
    """The record table of a call with ``cache``: reused when every ``pinned``
    sequence is the same object as at the last call of this slot with every
    tensor's data pointer unchanged, the params still contiguous with the same
    sizes and dtypes, and the grads (checked in full: contiguity, sizes,
    device, dtypes) fit it; their pointers are then written into the table.
    The entry holds the storages of the pinned tensors other than the params,
    so none of their addresses can be reused by another allocation while the
    table names it (an unchanged pointer then means the same storage). The
    params are checked in full instead (holding theirs would keep a model's
    old weights alive after ``model.half()``). Otherwise ``build()`` (the
    fast path; None when the tensors need the full path, which is not
    cached)."""
    ent = cache.get(slot)
    if ent is not None:
        try:
            if (all(map(_is, pinned, ent.pinned)) and _pinned_ptrs(pinned) == ent.pptrs
                    and (params is None or (all(map(_is_contig, params))
                                            and list(map(_numel, params)) == ent.numel
                                            and list(map(_dtype_of, params)) == ent.pdtypes))):
                if grads is None:
                    return ent.rec
                if (_fast_ok(grads, ent.dev, ent.numel)
                        and list(map(_dtype_of, grads)) == ent.gdtypes):
                    ent.rec.set(1, _ptrs(grads))
                    return ent.rec
        except Exception:  # tensors without storage etc.: rebuild (and explain) below
            pass
    cache.pop(slot, None)
    rec = build()
    if rec is None or rec.n == 0:
        return rec
    try:
        ent = _Bound()
        ent.pinned = pinned
        ent.rec = rec
        first = params if params is not None else grads
        ent.dev = first[0].get_device()
        ent.numel = list(map(_numel, first))
        ent.pdtypes = None if params is None else list(map(_dtype_of, params))
        ent.gdtypes = None if grads is None else list(map(_dtype_of, grads))
        ent.pptrs = _pinned_ptrs(pinned)
        held = pinned[1:] if params is not None else pinned     # all but the params
        ent.storages = [list(map(_storage_of, seq)) for seq in held if seq is not None]
        cache[slot] = ent
    except Exception:
        cache.pop(slot, None)
    return rec


def _cacheable(cache, pinned) -> bool:
    """Only immutable sequences are pinned: a list could have an element
    replaced between calls while staying the same object."""
    return cache is not None and all(seq is None or type(seq) is tuple for seq in pinned)


def _records_sq_norm_cached(cache, grads, exp_avg_sqs, steps, precondition):
    pinned = (exp_avg_sqs, steps) if precondition else ()
    if not _cacheable(cache, pinned):
        return _records_sq_norm(grads, exp_avg_sqs, steps, precondition)
    rec = _cached_records(cache, "sq_norm" if precondition else "sq_norm0", pinned, None, grads,
                          lambda: _fast_sq_norm(grads, exp_avg_sqs, steps, precondition))
    return rec if rec is not None else _records_sq_norm(grads, exp_avg_sqs, steps, precondition)


def _records_update_cached(cache, op, params, grads, backups, exp_avgs, exp_avg_sqs, steps,
                           need_steps):
    pinned = (params, backups, exp_avgs, exp_avg_sqs, steps if need_steps else None)
    if not _cacheable(cache, pinned):
        return _records_update(op, params, grads, backups, exp_avgs, exp_avg_sqs, steps,
                               need_steps)
    rec = _cached_records(cache, op, pinned, params, grads,
                          lambda: _fast_update(params, grads, backups, exp_avgs, exp_avg_sqs,
                                               steps, need_steps))
    if rec is None:
        rec = _records_update(op, params, grads, backups, exp_avgs, exp_avg_sqs, steps,
                              need_steps)
    return rec


def _check_lengths(op, n, **lists):
    for name, lst in lists.items():
        if lst is not None and len(lst) != n:
            raise ValueError(f"{op}: {name} has {len(lst)} entries, expected {n} (one per parameter)")


# ----------------------------------------------------------------------------
# CUDA launch plumbing: record + chunk tables kept on the device, cached by
# content (the pointers), so a steady-state step copies nothing to the device.
# ----------------------------------------------------------------------------
def cuda_host_table(records: np.ndarray, tile: int):
    """The CUDA kernels' tables in one int64 array: the (n, 8) records, then the
    chunk table ``chunk_start`` (n + 1 entries: the first tile of each tensor,
    tiles of ``tile`` elements, ``chunk_start[n]`` = the number of tiles).
    Returns ``(array, n_tiles)``."""
    n = records.shape[0]
    numel = records[:, 6] if n else np.zeros(0, dtype=np.int64)
    tiles = (numel + tile - 1) // tile
    chunk_start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(tiles, out=chunk_start[1:])
    return np.concatenate([records.reshape(-1), chunk_start]), int(chunk_start[-1])


class _CudaTables:
    def __init__(self, capacity: int = 64):
        self.cache: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.capacity = capacity
        self.lock = threading.Lock()

    def get(self, rec: _Records, device: torch.device, tile: int):
        host, n_tiles = cuda_host_table(rec.a, tile)
        key = (device.type, device.index, host.tobytes())
        with self.lock:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                return hit
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "fsam_kernels cuda: a new set of tensors reached the kernels during CUDA graph "
                "capture; run one eager step with the same tensors before capturing (the "
                "launch tables are built and uploaded on first use)")
        if device.type == "cuda":
            table = torch.from_numpy(host).pin_memory().to(device, non_blocking=True)
        else:  # the emulated CUDA library: host memory
            table = torch.from_numpy(host)
        partials = torch.empty(max(n_tiles, 1), dtype=torch.float64, device=device)
        entry = (table, partials, n_tiles)
        with self.lock:
            self.cache[key] = entry
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        return entry


_tables = _CudaTables()


def _cuda_call(name: str, rec: _Records, device: torch.device, *args, partials=False):
    if device.type == "cpu":   # the emulated library (CUDA_EMULATED): CPU tensors
        lib = cuda_emu_library()
        if lib is None:
            raise RuntimeError(f"fsam_kernels emulated cuda library unavailable: "
                               f"{_cuda_emu.error}")
        table, work, n_tiles = _tables.get(rec, device, int(lib.fsam_cuda_tile_size()))
        tptr = table.data_ptr()
        cptr = tptr + rec.n * 8 * 8
        fn = getattr(lib, "fsam_cuda_" + name)
        if partials:
            rc = fn(tptr, cptr, rec.n, n_tiles, work.data_ptr(), *args, 0, None)
        else:
            rc = fn(tptr, cptr, rec.n, n_tiles, *args, 0, None)
        _check_rc(rc, lib, "cuda")
        return
    lib = cuda_library()
    if lib is None:
        raise RuntimeError(f"fsam_kernels cuda library unavailable: {_cuda.error}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    table, work, n_tiles = _tables.get(rec, device, int(lib.fsam_cuda_tile_size()))
    tptr = table.data_ptr()
    cptr = tptr + rec.n * 8 * 8
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        fn = getattr(lib, "fsam_cuda_" + name)
        if partials:
            rc = fn(tptr, cptr, rec.n, n_tiles, work.data_ptr(), *args, device.index, stream)
        else:
            rc = fn(tptr, cptr, rec.n, n_tiles, *args, device.index, stream)
    _check_rc(rc, lib, "cuda")


def _use_cuda(device: torch.device, engine: Optional[str]) -> bool:
    """Whether a call runs the CUDA kernels (real, or emulated on CPU tensors:
    ``engine="cuda"``) or the CPU kernels. ``engine`` None: by the device."""
    return device.type == "cuda" or engine == "cuda"


def _cpu_lib_or_raise():
    lib = cpu_library()
    if lib is None:
        raise RuntimeError(f"fsam_kernels cpu library unavailable: {_cpu.error}")
    return lib


# ----------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, mutate in place)
# ----------------------------------------------------------------------------
_NS = "fsam_kernels"


def _bump(tensors):
    """Version counters of tensors written by a kernel (autograd's in-place checks)."""
    if len(tensors):
        torch.autograd.graph.increment_version(tensors)


def _sq_norm_impl(grads: List[Tensor], exp_avg_sqs: List[Tensor], steps: List[Tensor],
                beta2: float, eps: float, precondition: bool, grad_scale: Optional[Tensor],
                out: Tensor, cache: Optional[dict] = None, engine: Optional[str] = None) -> None:
    op = "sq_norm"
    device = out.device
    if precondition:
        _check_lengths(op, len(grads), exp_avg_sqs=exp_avg_sqs, steps=steps)
    if grads and grads[0].device != device:
        raise ValueError(f"{op}: out is on {device} but grads[0] is on {grads[0].device}")
    out_ptr = _scalar_ptr(out, "out", device, op, dtype=torch.float64)
    gs_ptr = _scalar_ptr(grad_scale, "grad_scale", device, op, optional=True)
    rec = _records_sq_norm_cached(cache, grads, exp_avg_sqs, steps, precondition)
    if _use_cuda(device, engine):
        _cuda_call(op, rec, device, int(precondition), beta2, eps, gs_ptr, out_ptr, partials=True)
    else:
        lib = _cpu_lib_or_raise()
        _check_rc(lib.fsam_cpu_sq_norm(rec.ptr(), rec.n, int(precondition), beta2, eps, gs_ptr,
                                       out_ptr), lib, "cpu")
    _bump((out,))


def _perturb_impl(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                exp_avg_sqs: List[Tensor], steps: List[Tensor], rho: float, norm_sq: Tensor,
                norm_eps: float, beta2: float, eps: float, precondition: bool,
                grad_scale: Optional[Tensor], found_inf: Tensor,
                cache: Optional[dict] = None, engine: Optional[str] = None) -> None:
    op = "perturb"
    n = len(params)
    _check_lengths(op, n, grads=grads, backups=backups)
    if precondition:
        _check_lengths(op, n, exp_avg_sqs=exp_avg_sqs, steps=steps)
    device = found_inf.device
    if params and params[0].device != device:
        raise ValueError(f"{op}: found_inf is on {device} but params[0] is on {params[0].device}")
    ns_ptr = _scalar_ptr(norm_sq, "norm_sq", device, op, dtype=torch.float64)
    fi_ptr = _scalar_ptr(found_inf, "found_inf", device, op)
    gs_ptr = _scalar_ptr(grad_scale, "grad_scale", device, op, optional=True)
    rec = _records_update_cached(cache, op, params, grads, backups, None,
                                 exp_avg_sqs if precondition else None,
                                 steps if precondition else None, precondition)
    args = (int(precondition), rho, ns_ptr, norm_eps, beta2, eps, gs_ptr, fi_ptr)
    if _use_cuda(device, engine):
        _cuda_call(op, rec, device, *args)
    else:
        lib = _cpu_lib_or_raise()
        _check_rc(lib.fsam_cpu_perturb(rec.ptr(), rec.n, *args), lib, "cpu")
    _bump(params)
    _bump(backups)
    _bump((found_inf,))


def _restore_adamw_impl(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                      has_backups: bool, exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                      steps: List[Tensor], lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, maximize: bool, grad_scale: Optional[Tensor],
                      found_inf: Tensor, cache: Optional[dict] = None,
                      engine: Optional[str] = None) -> None:
    op = "restore_adamw"
    n = len(params)
    _check_lengths(op, n, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    if has_backups:
        _check_lengths(op, n, backups=backups)
    device = found_inf.device
    if params and params[0].device != device:
        raise ValueError(f"{op}: found_inf is on {device} but params[0] is on {params[0].device}")
    fi_ptr = _scalar_ptr(found_inf, "found_inf", device, op)
    gs_ptr = _scalar_ptr(grad_scale, "grad_scale", device, op, optional=True)
    rec = _records_update_cached(cache, op, params, grads, backups if has_backups else None,
                                 exp_avgs, exp_avg_sqs, steps, True)
    args = (int(has_backups), lr, beta1, beta2, eps, weight_decay, int(maximize), gs_ptr, fi_ptr)
    if _use_cuda(device, engine):
        _cuda_call(op, rec, device, *args)
    else:
        lib = _cpu_lib_or_raise()
        _check_rc(lib.fsam_cpu_restore_adamw(rec.ptr(), rec.n, *args), lib, "cpu")
    _bump(params)
    _bump(exp_avgs)
    _bump(exp_avg_sqs)
    _bump(steps)


def _restore_impl(params: List[Tensor], backups: List[Tensor],
                  cache: Optional[dict] = None, engine: Optional[str] = None) -> None:
    op = "restore"
    n = len(params)
    _check_lengths(op, n, backups=backups)
    if n == 0:
        return
    device = params[0].device
    rec = _records_update_cached(cache, op, params, None, backups, None, None, None, False)
    if _use_cuda(device, engine):
        _cuda_call(op, rec, device)
    else:
        lib = _cpu_lib_or_raise()
        _check_rc(lib.fsam_cpu_restore(rec.ptr(), rec.n), lib, "cpu")
    _bump(params)


def _fake(*args, **kwargs):
    return None


# Schemas: (a!) marks the tensors each op writes (torch.compile functionalises
# them; eager calls bump their version counters in bulk, below).
_SCHEMAS = {
    "sq_norm": "sq_norm(Tensor[] grads, Tensor[] exp_avg_sqs, Tensor[] steps, float beta2, "
               "float eps, bool precondition, Tensor? grad_scale, Tensor(a!) out) -> ()",
    "perturb": "perturb(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, "
               "Tensor[] exp_avg_sqs, Tensor[] steps, float rho, Tensor norm_sq, float norm_eps, "
               "float beta2, float eps, bool precondition, Tensor? grad_scale, "
               "Tensor(c!) found_inf) -> ()",
    "restore_adamw": "restore_adamw(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, "
                     "bool has_backups, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
                     "Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, "
                     "float weight_decay, bool maximize, Tensor? grad_scale, "
                     "Tensor found_inf) -> ()",
    "restore": "restore(Tensor(a!)[] params, Tensor[] backups) -> ()",
}
_IMPLS = {"sq_norm": _sq_norm_impl, "perturb": _perturb_impl,
          "restore_adamw": _restore_adamw_impl, "restore": _restore_impl}


def _register_ops():
    """Define torch.ops.fsam_kernels.{sq_norm, perturb, restore_adamw, restore};
    with :data:`CUDA_EMULATED` also ``cuda_emu_<op>`` (CPU tensors, the
    emulated CUDA kernels: what the "cuda" backend calls on CPU tensors).

    Registered with the low-level ``torch.library.Library`` API (define + impl
    for the CPU and CUDA keys + register_fake) rather than the
    ``torch.library.custom_op`` decorator: the ops are the same kind of opaque,
    mutating custom ops for torch.compile, but the decorator's per-tensor
    Python bookkeeping (a version bump per mutated tensor, alias checks)
    cost ~8 ms per call at 1,000 parameters, several times the kernels'
    own work on small models. Version counters are bumped here in one call.
    """
    global _LIB
    try:
        lib = torch.library.Library(_NS, "DEF")
    except RuntimeError:  # already defined in this process (module re-imported)
        return None
    for name, schema in _SCHEMAS.items():
        lib.define(schema)
        # the sparse keys only route sparse arguments to the impl's clear error
        for key in ("CPU", "CUDA", "SparseCPU", "SparseCUDA", "SparseCsrCPU", "SparseCsrCUDA"):
            lib.impl(name, _IMPLS[name], key)
        if name == "restore":  # callable with empty lists (no tensor to dispatch on)
            lib.impl(name, _IMPLS[name], "CompositeExplicitAutograd")
        torch.library.register_fake(f"{_NS}::{name}", _fake, lib=lib)
        if CUDA_EMULATED:
            emu = "cuda_emu_" + name
            lib.define(emu + schema[len(name):])
            for key in ("CPU", "SparseCPU", "SparseCsrCPU", "CompositeExplicitAutograd"):
                if key != "CompositeExplicitAutograd" or name == "restore":
                    lib.impl(emu, functools.partial(_IMPLS[name], engine="cuda"), key)
            torch.library.register_fake(f"{_NS}::{emu}", _fake, lib=lib)
    _LIB = lib
    return lib


_LIB = None
_register_ops()


# ----------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------
def _lst(x) -> List[Tensor]:
    return [] if x is None else list(x)


def _seq(x):
    """A list or tuple as it is (the ``cache`` checks compare sequence objects)."""
    if x is None:
        return ()
    return x if isinstance(x, (list, tuple)) else list(x)


_PLAIN = (Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)


def _eager(*seqs) -> bool:
    """True when a call may skip the dispatcher and run the op's kernel directly:
    not traced by torch.compile, no dispatch mode active (fake tensors,
    functionalisation, make_fx), and plain tensors. The custom op's CPU/CUDA
    kernel is what the dispatcher would run in that case; skipping it saves
    the conversion of every tensor list (~1-2 us per tensor per call)."""
    if _is_compiling() or _dispatch_depth():
        return False
    for s in seqs:
        if s and type(s[0]) not in _PLAIN:
            return False
    return True


class _NativeBackend(Backend):
    norm_dtype = torch.float64   # N² (SPEC §1): float64 partials and totals
    fused = True

    def _route(self, device: torch.device, what: str):
        """``(engine, op name prefix)`` for tensors on ``device`` (the device of
        the argument ``what``); ValueError for a device the backend does not run on."""
        raise NotImplementedError

    def sq_norm(self, grads, exp_avg_sqs, steps, *, beta2, eps, precondition, grad_scale, out,
                cache=None):
        grads = _seq(grads)
        engine, prefix = self._route(out.device, "out")
        if _eager(grads):
            return _sq_norm_impl(grads, _seq(exp_avg_sqs) if precondition else (),
                                 _seq(steps) if precondition else (), float(beta2), float(eps),
                                 bool(precondition), grad_scale, out, cache, engine)
        getattr(torch.ops.fsam_kernels, prefix + "sq_norm")(
            list(grads), _lst(exp_avg_sqs) if precondition else [],
            _lst(steps) if precondition else [], float(beta2), float(eps), bool(precondition),
            grad_scale, out)

    def perturb(self, params, grads, backups, exp_avg_sqs, steps, *, rho, norm_sq, norm_eps,
                beta2, eps, precondition, grad_scale, found_inf, cache=None):
        params, grads = _seq(params), _seq(grads)
        engine, prefix = self._route(found_inf.device, "found_inf")
        if _eager(params, grads):
            return _perturb_impl(params, grads, _seq(backups),
                                 _seq(exp_avg_sqs) if precondition else (),
                                 _seq(steps) if precondition else (), float(rho), norm_sq,
                                 float(norm_eps), float(beta2), float(eps), bool(precondition),
                                 grad_scale, found_inf, cache, engine)
        getattr(torch.ops.fsam_kernels, prefix + "perturb")(
            list(params), list(grads), list(backups),
            _lst(exp_avg_sqs) if precondition else [], _lst(steps) if precondition else [],
            float(rho), norm_sq, float(norm_eps), float(beta2), float(eps), bool(precondition),
            grad_scale, found_inf)

    def restore_adamw(self, params, grads, backups, exp_avgs, exp_avg_sqs, steps, *, lr, beta1,
                      beta2, eps, weight_decay, maximize, grad_scale, found_inf, cache=None):
        params, grads = _seq(params), _seq(grads)
        engine, prefix = self._route(found_inf.device, "found_inf")
        if _eager(params, grads):
            return _restore_adamw_impl(
                params, grads, _seq(backups), backups is not None, _seq(exp_avgs),
                _seq(exp_avg_sqs), _seq(steps), float(lr), float(beta1), float(beta2),
                float(eps), float(weight_decay), bool(maximize), grad_scale, found_inf, cache,
                engine)
        getattr(torch.ops.fsam_kernels, prefix + "restore_adamw")(
            list(params), list(grads), _lst(backups), backups is not None, list(exp_avgs),
            list(exp_avg_sqs), list(steps), float(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay), bool(maximize), grad_scale, found_inf)

    def restore(self, params, backups, *, cache=None):
        params = _seq(params)
        if not params:
            return
        engine, prefix = self._route(params[0].device, "params[0]")
        if _eager(params):
            return _restore_impl(params, _seq(backups), cache, engine)
        getattr(torch.ops.fsam_kernels, prefix + "restore")(list(params), list(backups))


class CPUBackend(_NativeBackend):
    """C++ multi-tensor kernels (threads + SIMD) for tensors in CPU memory."""

    name = "cpu"

    def _route(self, device, what):
        if device.type != "cpu":
            raise ValueError(f"cpu backend: {what} is on {device}; it runs on CPU tensors "
                             f"(backend='cuda' or 'auto' for CUDA tensors)")
        return None, ""

    @classmethod
    def availability(cls, device):
        device = torch.device(device)
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, not {device}"
        if cpu_library() is None:
            return False, _cpu.error
        return True, ""


class CUDABackend(_NativeBackend):
    """CUDA C++ multi-tensor kernels (one launch per operation for any number of tensors).

    With ``FSAM_CUDA_EMULATE=1`` set before fsam_kernels is imported it also
    runs on CPU tensors: the same kernel source built for the host
    (libfsam_cuda_emu.so; csrc/include/fsam/cuda_emu.h runs each block's
    threads as fibers with real barriers and warp shuffles), slowly, for
    tests. "auto" never picks it for CPU tensors."""

    name = "cuda"

    def _route(self, device, what):
        if device.type == "cuda":
            return None, ""
        if device.type == "cpu" and CUDA_EMULATED:
            return "cuda", "cuda_emu_"
        raise ValueError(f"cuda backend: {what} is on {device}; it runs on CUDA tensors "
                         f"(and on CPU tensors through its emulated host build only when "
                         f"FSAM_CUDA_EMULATE=1 is set before fsam_kernels is imported)")

    @classmethod
    def availability(cls, device):
        device = torch.device(device)
        if device.type == "cpu" and CUDA_EMULATED:
            if cuda_emu_library() is None:
                return False, _cuda_emu.error
            return True, ""
        if device.type != "cuda":
            hint = ("" if device.type != "cpu" else " (FSAM_CUDA_EMULATE=1, set before "
                    "importing fsam_kernels, runs its kernels' emulated host build on CPU "
                    "tensors, for tests)")
            return False, f"the cuda backend runs on CUDA tensors, not {device}{hint}"
        if not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False"
        lib = cuda_library()
        if lib is None:
            return False, _cuda.error
        if lib.fsam_cuda_device_count() <= 0:
            return False, ("the CUDA library sees no device (driver too old for the CUDA "
                           "runtime it was built with?)")
        return True, ""
