"""Native backends: the C++ (``"cpu"``) and CUDA C++ (``"cuda"``) kernels.

The kernels live in two shared libraries built by setup.py from csrc/ without
torch (``fsam_kernels/_lib/libfsam_cpu.so``, ``libfsam_cuda.so``), behind the
plain C API of ``csrc/include/fsam/capi.h``. They are loaded here with ctypes
(as bitsandbytes loads its library), so one build serves any torch version,
and wrapped as ``torch.library`` custom ops (``torch.ops.fsam_kernels.sq_norm``,
``perturb``, ``restore_adamw``, ``restore``; schemas with ``(a!)`` mutation
annotations and fake kernels) that mutate their arguments in place, so
``torch.compile`` treats each as one opaque call.

Preparation and caching: the layer shared with the triton backend
(:mod:`fsam_kernels.backends._prepare`). One validated record table
per call site (the Backend interface's ``cache=``), with the CUDA launch table
(records + chunk table, in device memory) hung on the same entry, so a
steady-state step copies nothing to the device and never synchronises (calls
without a cache find their launch table by content). Warm up one step with
the same tensors before capturing a CUDA graph (the first call of a new set
of tensors builds and uploads its table).

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

import ctypes
import functools
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import _prepare as P
from ._native_lib import *  # noqa: F401,F403  (the public loading / settings API)
from ._native_lib import _check_rc, _cpu, _cpu_lib_or_raise, _cuda, _cuda_emu
from ._native_lib import (CUDA_EMULATED, OP_ARGTYPES, cpu_library, cuda_emu_library,
                          cuda_library)
from .base import Backend


__all__ = ["CPUBackend", "CUDABackend", "set_num_threads", "get_num_threads", "CPU_ISAS",
           "cpu_isa", "supported_cpu_isas", "set_cpu_isa", "using_cpu_isa",
           "set_streaming_min_bytes", "get_streaming_min_bytes", "cpu_library", "cuda_library",
           "cuda_emu_library", "CUDA_EMULATED", "library_dir"]


# ----------------------------------------------------------------------------
# The ctypes signatures of the kernels, from the one op schema table
# (_prepare.OPS: fsam_cpu_<op>(records, n, *c_args) and
# fsam_cuda_<op>(records, chunk_start, n, n_tiles, [partials,] *c_args, device, stream)
# of capi.h)
# ----------------------------------------------------------------------------
_OPS = P.OPS
_CTYPE = {"bool": ctypes.c_int, "float": ctypes.c_double, "Tensor": ctypes.c_void_p}
for _name, _op in _OPS.items():
    _c = [_CTYPE[t] for t in _op["c_types"]]
    OP_ARGTYPES[_name] = {
        "cpu": [ctypes.c_void_p, ctypes.c_int64] + _c,
        "cuda": [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
        + ([ctypes.c_void_p] if _op["partials"] else []) + _c + [ctypes.c_int, ctypes.c_void_p]}
_Records = P.Records   # (tests build record tables by hand)


# ----------------------------------------------------------------------------
# CUDA launch plumbing: the records + chunk table in device memory, hung on
# the call's _Prepared entry.
# ----------------------------------------------------------------------------
def cuda_host_table(records: np.ndarray, tile: int, lib=None):
    """The CUDA kernels' tables in one int64 array: the (n, 8) records, then the
    chunk table ``chunk_start`` (n + 1 entries: the first tile of each tensor,
    tiles of ``tile`` elements, ``chunk_start[n]`` = the number of tiles),
    built by the C++ builder the CPU kernels use (``fsam::chunk_starts`` of
    csrc/include/fsam/tables.h) of ``lib`` (a loaded CUDA library; None: the
    CPU library's build). Returns ``(array, n_tiles)``."""
    n = records.shape[0]
    out = np.empty(n * 8 + n + 1, dtype=np.int64)
    out[:n * 8] = records.reshape(-1)
    recs = out[:n * 8]
    starts = out[n * 8:]
    if lib is None:
        fn = _cpu_lib_or_raise().fsam_cpu_chunk_starts
    else:
        fn = lib.fsam_cuda_chunk_starts
    n_tiles = fn(recs.ctypes.data, n, int(tile), starts.ctypes.data)
    return out, int(n_tiles)


def _launch_tables(prep: P.Prepared, device: torch.device, lib):
    """``(table, partials, n_tiles)`` of ``prep`` on ``device``: built and uploaded
    on the first call with these tensors, then reused from the entry
    (:func:`_prepare.device_tables`)."""
    def build(rec):
        host, n_tiles = cuda_host_table(rec.a, int(lib.fsam_cuda_tile_size()), lib)
        table = P.upload(host, device)
        return table, torch.empty(max(n_tiles, 1), dtype=torch.float64, device=device), n_tiles
    return P.device_tables(prep, ("cuda",), device, build)


def _cuda_call(name: str, prep: P.Prepared, device: torch.device, args, partials: bool):
    emulated = device.type == "cpu"   # the emulated library (CUDA_EMULATED): CPU tensors
    lib = cuda_emu_library() if emulated else cuda_library()
    if lib is None:
        state = _cuda_emu if emulated else _cuda
        raise RuntimeError(f"fsam_kernels {'emulated ' if emulated else ''}cuda library "
                           f"unavailable: {state.error}")
    if not emulated and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    table, work, n_tiles = _launch_tables(prep, device, lib)
    tptr = table.data_ptr()
    head = (tptr, tptr + prep.rec.n * 8 * 8, prep.rec.n, n_tiles) + \
        ((work.data_ptr(),) if partials else ())
    fn = getattr(lib, "fsam_cuda_" + name)
    if emulated:
        rc = fn(*head, *args, 0, None)
    else:
        with torch.cuda.device(device):
            rc = fn(*head, *args, device.index, torch.cuda.current_stream(device).cuda_stream)
    _check_rc(rc, lib, "cuda")


# ----------------------------------------------------------------------------
# One implementation for every op, driven by its schema
# ----------------------------------------------------------------------------
_NS = "fsam_kernels"


def _bump(tensors):
    """Version counters of tensors written by a kernel (autograd's in-place checks)."""
    if len(tensors):
        torch.autograd.graph.increment_version(tensors)


def _impl(op: dict, *vals, cache: Optional[dict] = None, engine: Optional[str] = None) -> None:
    """The kernel of op ``op`` (the custom op's CPU/CUDA implementation; eager
    calls come here directly). ``vals``: the schema's arguments in order.
    ``engine="cuda"``: the CUDA kernels (the emulated build on CPU tensors)."""
    name = op["name"]
    a = dict(zip(op["names"], vals))
    device = P.check_call(op, a, name)
    if device is None:
        return
    cargs = []
    for k, t in zip(op["c_args"], op["c_types"]):
        v = a[k]
        cargs.append((0 if v is None else v.data_ptr()) if t == "Tensor"
                     else int(v) if t == "bool" else v)
    prep = P.prepare(op, cache, a)
    if device.type == "cuda" or engine == "cuda":
        _cuda_call(name, prep, device, cargs, op["partials"])
    else:
        lib = _cpu_lib_or_raise()
        rec = prep.rec
        _check_rc(getattr(lib, "fsam_cpu_" + name)(rec.ptr(), rec.n, *cargs), lib, "cpu")
    for k in op["written"]:
        _bump(a[k] if k in op["lists"] else (a[k],))


def _fake(*args, **kwargs):
    return None


def _register_ops():
    """Define torch.ops.fsam_kernels.{sq_norm, perturb, restore_adamw, restore}
    from :data:`_OPS`; with :data:`CUDA_EMULATED` also ``cuda_emu_<op>`` (CPU
    tensors, the emulated CUDA kernels: what the "cuda" backend calls on CPU
    tensors).

    Registered with the low-level ``torch.library.Library`` API (define + impl
    for the CPU and CUDA keys + register_fake) rather than the
    ``torch.library.custom_op`` decorator: the ops are the same kind of opaque,
    mutating custom ops for torch.compile, but the decorator's per-tensor
    Python bookkeeping (a version bump per mutated tensor, alias checks)
    cost ~8 ms per call at 1,000 parameters, several times the kernels'
    own work on small models. Version counters are bumped in :func:`_impl`.
    """
    try:
        lib = torch.library.Library(_NS, "DEF")
    except RuntimeError:  # already defined in this process (module re-imported)
        return None
    for name, op in _OPS.items():
        for qual, keys, engine in ((name, ("CPU", "CUDA", "SparseCPU", "SparseCUDA",
                                           "SparseCsrCPU", "SparseCsrCUDA"), None),
                                   ("cuda_emu_" + name, ("CPU", "SparseCPU", "SparseCsrCPU"),
                                    "cuda")):
            if engine and not CUDA_EMULATED:
                continue
            lib.define(f"{qual}({op['schema']}) -> ()")
            fn = functools.partial(_impl, op, engine=engine)
            # the sparse keys only route sparse arguments to the impl's clear error;
            # restore is callable with empty lists (no tensor to dispatch on)
            for key in keys + (("CompositeExplicitAutograd",) if name == "restore" else ()):
                lib.impl(qual, fn, key)
            torch.library.register_fake(f"{_NS}::{qual}", _fake, lib=lib)
    return lib


# ----------------------------------------------------------------------------
# Backends: the four methods generated from the same table
# ----------------------------------------------------------------------------
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


def _run(self, op: dict, a: dict, cache: Optional[dict]):
    """The body of every generated Backend method (``a``: :func:`_prepare.bind`'s
    arguments): the kernel directly (:func:`_eager`) or the custom op."""
    where = op["device"]
    if where == "params":
        if not a["params"]:
            return None
        engine, prefix = self._route(a["params"][0].device, "params[0]")
    else:
        engine, prefix = self._route(a[where].device, where)
    if _eager(*(a[k] for k in op["eager_on"])):
        return _impl(op, *(a[k] for k in op["names"]), cache=cache, engine=engine)
    getattr(torch.ops.fsam_kernels, op["name"] if not prefix else prefix + op["name"])(
        *(list(a[k]) if k in op["lists"] else a[k] for k in op["names"]))


_LIB = _register_ops()


class _NativeBackend(Backend):
    norm_dtype = torch.float64   # N² (SPEC §1): float64 partials and totals
    fused = True

    def _route(self, device: torch.device, what: str):
        """``(engine, op name prefix)`` for tensors on ``device`` (the device of
        the argument ``what``); ValueError for a device the backend does not run on."""
        raise NotImplementedError


for _name in _OPS:
    setattr(_NativeBackend, _name, P.backend_method(_name, _run))


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
