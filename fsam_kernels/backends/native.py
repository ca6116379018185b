"""Native backends: the C++ (``"cpu"``) and CUDA C++ (``"cuda"``) kernels.

The kernels live in two shared libraries built by setup.py from csrc/ without
torch (``fsam_kernels/_lib/libfsam_cpu.so``, ``libfsam_cuda.so``), behind the
plain C API of ``csrc/include/fsam/capi.h``. They are loaded here with ctypes
(as bitsandbytes loads its library), so one build serves any torch version,
and wrapped as ``torch.library`` custom ops (``torch.ops.fsam_kernels.sq_norm``,
``perturb``, ``restore_adamw``, ``restore``; schemas with ``(a!)`` mutation
annotations and fake kernels) that mutate their arguments in place, so
``torch.compile`` treats each as one opaque call.

Preparation and caching: see :func:`_prepare`. One validated record table
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
import inspect
import operator
import re
import threading
from collections import OrderedDict
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from . import layout as L
from ._native_lib import *  # noqa: F401,F403  (the public loading / settings API)
from ._native_lib import (_DTYPE_CODE, _F64, _STATE_CODE, _check_rc, _cpu, _cpu_lib_or_raise,
                          _cuda, _cuda_emu)
from ._native_lib import (CUDA_EMULATED, OP_ARGTYPES, cpu_library, cuda_emu_library,
                          cuda_library)
from .base import Backend


__all__ = ["CPUBackend", "CUDABackend", "set_num_threads", "get_num_threads", "CPU_ISAS",
           "cpu_isa", "supported_cpu_isas", "set_cpu_isa", "using_cpu_isa",
           "set_streaming_min_bytes", "get_streaming_min_bytes", "cpu_library", "cuda_library",
           "cuda_emu_library", "CUDA_EMULATED", "library_dir"]


# ----------------------------------------------------------------------------
# The op schemas: the one table the custom ops, their implementations and the
# Backend methods are generated from.
# ----------------------------------------------------------------------------
# Each entry: the torch.library schema of the op's arguments ((a!) marks what
# it writes: torch.compile functionalises those, eager calls bump their version
# counters), the argument its device is taken from, the C kernel's arguments
# after (records, n) in order (bools passed as int, tensors as data pointers),
# the lists that exist only when a flag is set, the one-element tensors that
# are float64 (N²), and whether the CUDA kernel takes a partials buffer.
_OPS = {
    "sq_norm": dict(
        schema="Tensor[] grads, Tensor[] exp_avg_sqs, Tensor[] steps, float beta2, float eps, "
               "bool precondition, Tensor? grad_scale, Tensor(a!) out",
        device="out", c_args=("precondition", "beta2", "eps", "grad_scale", "out"),
        gated={"exp_avg_sqs": "precondition", "steps": "precondition"}, f64=("out",),
        partials=True),
    "perturb": dict(
        schema="Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor[] exp_avg_sqs, "
               "Tensor[] steps, float rho, Tensor norm_sq, float norm_eps, float beta2, "
               "float eps, bool precondition, Tensor? grad_scale, Tensor(c!) found_inf",
        device="found_inf", c_args=("precondition", "rho", "norm_sq", "norm_eps", "beta2", "eps",
                                    "grad_scale", "found_inf"),
        gated={"exp_avg_sqs": "precondition", "steps": "precondition"}, f64=("norm_sq",)),
    "restore_adamw": dict(
        schema="Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, bool has_backups, "
               "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, float lr, "
               "float beta1, float beta2, float eps, float weight_decay, bool maximize, "
               "Tensor? grad_scale, Tensor found_inf",
        device="found_inf", c_args=("has_backups", "lr", "beta1", "beta2", "eps", "weight_decay",
                                    "maximize", "grad_scale", "found_inf"),
        gated={"backups": "has_backups"}),
    "restore": dict(schema="Tensor(a!)[] params, Tensor[] backups", device="params",
                    c_args=()),
}
_ROLES = ("params", "grads", "backups", "exp_avgs", "exp_avg_sqs", "steps")


def _parse_schemas():
    """Fill in each op's argument list from its schema: ``args`` (name, type)
    in order, ``lists``, ``written`` (names), the float/bool arguments."""
    for name, op in _OPS.items():
        op["name"] = name
        op["args"] = [tuple(a.strip().rsplit(" ", 1)[::-1]) for a in op["schema"].split(",")]
        op["lists"] = [n for n, t in op["args"] if t.endswith("[]")]
        op["written"] = [n for n, t in op["args"] if "!" in t]
        op["kind"] = "norm" if name == "sq_norm" else "update"
        op.setdefault("gated", {})
        op.setdefault("f64", ())
        op.setdefault("partials", False)
        # the C signatures (capi.h): fsam_cpu_<op>(records, n, *c_args) and
        # fsam_cuda_<op>(records, chunk_start, n, n_tiles, [partials,] *c_args, device, stream)
        types = dict(op["args"])
        c = [_CTYPE[re.sub(r"\(.*?\)", "", types[k]).rstrip("?")] for k in op["c_args"]]
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        OP_ARGTYPES[name] = {
            "cpu": [P, I64] + c,
            "cuda": [P, P, I64, I64] + ([P] if op["partials"] else []) + c + [ctypes.c_int, P]}


_CTYPE = {"bool": ctypes.c_int, "float": ctypes.c_double, "Tensor": ctypes.c_void_p}
_parse_schemas()


# ----------------------------------------------------------------------------
# Records: the fsam_tensor_t table of capi.h, one builder per kind of op
# ----------------------------------------------------------------------------
def _ptrs(ts) -> List[int]:
    return list(map(Tensor.data_ptr, ts))


class _Records:
    """The fsam_tensor_t table (capi.h) as an int64 array of shape (n, 8)."""

    def __init__(self, n: int):
        self.a = np.zeros((n, 8), dtype=np.int64)
        self.keep: list = []  # temporaries (converted grads) kept alive for the call
        self.fast = False     # built by the vectorised check (cacheable)

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
            return None
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
        r.fast = True
        return r
    except Exception:  # sparse or otherwise unusual tensors: the full path explains
        return None


def _fast_update(params, grads, backups, exp_avgs, exp_avg_sqs, steps, need_steps):
    try:
        n = len(params)
        if n == 0:
            return None
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
        r.fast = True
        return r
    except Exception:
        return None





def _build_norm(op, grads, exp_avg_sqs, steps, precondition) -> _Records:
    """sq_norm's records: the vectorised check of the usual case (every tensor
    contiguous, expected dtypes), else the per-tensor checks shared with the
    triton backend (layout.py), grads converted or copied where needed (kept
    alive in ``keep``)."""
    r = _fast_sq_norm(grads, exp_avg_sqs, steps, precondition)
    if r is not None:
        return r
    r = _Records(len(grads))
    if not grads:
        return r
    r.keep = gs = L.check_norm_args(op, grads, exp_avg_sqs, steps, precondition,
                                    grads[0].device, True)
    r.set(1, _ptrs(gs))
    if precondition:
        r.set(4, _ptrs(exp_avg_sqs))
        r.set(5, _ptrs(steps))
    r.set(6, [g.numel() for g in gs])
    gcodes = [_DTYPE_CODE[g.dtype] for g in gs]
    r.dtypes([_F64 if c == _F64 else 0 for c in gcodes], gcodes)
    return r


def _build_update(op, params, grads, backups, exp_avgs, exp_avg_sqs, steps) -> _Records:
    """Records of perturb / restore_adamw / restore (a role the op lacks: None),
    as :func:`_build_norm`."""
    r = _fast_update(params, grads, backups, exp_avgs, exp_avg_sqs, steps, steps is not None)
    if r is not None:
        return r
    r = _Records(len(params))
    if not params:
        return r
    r.keep = gs = L.check_update_args(op, params, grads, backups, exp_avgs, exp_avg_sqs, steps,
                                      params[0].device, True)
    for col, lst in ((0, params), (1, gs if grads is not None else None), (2, backups),
                     (3, exp_avgs), (4, exp_avg_sqs), (5, steps)):
        if lst is not None:
            r.set(col, _ptrs(lst))
    r.set(6, [p.numel() for p in params])
    pcodes = [_DTYPE_CODE[p.dtype] for p in params]
    r.dtypes(pcodes, [_DTYPE_CODE[g.dtype] for g in gs] if grads is not None else pcodes)
    return r


# ----------------------------------------------------------------------------
# The preparation and cache layer (one mechanism: the call site's ``cache``)
# ----------------------------------------------------------------------------
class _Prepared:
    """One call's validated table and, for the CUDA kernels, its launch tables.

    Stored in the caller's ``cache`` dict (one slot per op) when the call is
    cacheable; then ``tables`` maps the grads' pointers (the one role that
    may change between cache hits) to the uploaded launch table, so a
    steady-state CUDA step neither rebuilds nor hashes nor uploads anything."""

    __slots__ = ("pinned", "rec", "dev", "numel", "pdtypes", "gdtypes", "pptrs", "storages",
                 "gkey", "tables")

    def __init__(self, rec: _Records, cached: bool = True):
        self.rec = rec
        self.gkey = None      # None for an uncached call: its table is found by content
        self.tables: "OrderedDict[tuple, tuple]" = OrderedDict() if cached else _BY_CONTENT


_is = operator.is_
_storage_of = Tensor.untyped_storage
_TABLES_PER_ENTRY = 4   # grad storages alternating between steps (set_to_none + allocator)
#: launch tables of calls without a usable ``cache`` (lists, cache=None), keyed by
#: the record table's bytes (the pointers): so that such calls, too, upload
#: nothing in steady state and can be captured in a CUDA graph after a warm-up.
#: Cached calls never hash: their tables hang on their entry.
_BY_CONTENT: "OrderedDict[tuple, tuple]" = OrderedDict()
_BY_CONTENT_CAP = 64
_content_lock = threading.Lock()


def _pinned_ptrs(pinned) -> tuple:
    """Every data pointer of the pinned sequences: a tensor re-pointed with
    ``.data =`` (params by ``module.to()``, state by "move the optimizer"
    snippets) must never leave a stale pointer in a cached table."""
    return tuple(None if seq is None else tuple(map(_data_ptr, seq)) for seq in pinned)


def _prepare(op: dict, cache: Optional[dict], a: dict) -> _Prepared:
    """The records of one call of ``op`` (arguments ``a`` by schema name).

    Caching (the Backend interface's ``cache=``, the only cache of this
    module): a call is cacheable when ``cache`` is a dict and every pinned
    sequence (all but the grads) is a tuple. Its entry in ``cache[slot]`` is
    reused when every pinned sequence is the same object as at the last call
    of this slot with every tensor's data pointer unchanged, the params still
    contiguous with the same sizes and dtypes, and the grads (checked in full:
    contiguity, sizes, device, dtypes) fit it; their pointers are then
    written into the table. The entry holds the storages of the pinned
    tensors other than the params, so none of their addresses can be reused
    by another allocation while the table names it (an unchanged pointer then
    means the same storage); the params are checked in full instead (holding
    theirs would keep a model's old weights alive after ``model.half()``).
    Only tables built by the vectorised check (no temporaries) are stored.
    Calls without a usable cache build their records afresh each time; their
    CUDA launch tables are looked up by content (:data:`_BY_CONTENT`)."""
    name = op["name"]
    if op["kind"] == "norm":
        pre = a["precondition"]
        pinned = (a["exp_avg_sqs"], a["steps"]) if pre else ()
        params, grads, slot = None, a["grads"], "sq_norm" if pre else "sq_norm0"

        def build():
            return _build_norm(name, grads, a["exp_avg_sqs"], a["steps"], pre)
    else:
        r = {k: (a[k] if k in op["lists"] and a.get(op["gated"].get(k), True) else None)
             for k in _ROLES}
        params, grads, slot = r["params"], r["grads"], name
        pinned = (params, r["backups"], r["exp_avgs"], r["exp_avg_sqs"], r["steps"])

        def build():
            return _build_update(name, *(r[k] for k in _ROLES))
    if cache is None or not all(s is None or type(s) is tuple for s in pinned):
        return _Prepared(build(), cached=False)   # lists could change in place: never pinned
    ent = cache.get(slot)
    if ent is not None:
        try:
            if (all(map(_is, pinned, ent.pinned)) and _pinned_ptrs(pinned) == ent.pptrs
                    and (params is None or (all(map(_is_contig, params))
                                            and list(map(_numel, params)) == ent.numel
                                            and list(map(_dtype_of, params)) == ent.pdtypes))):
                if grads is None:
                    return ent
                if _fast_ok(grads, ent.dev, ent.numel) and list(map(_dtype_of, grads)) == ent.gdtypes:
                    gp = _ptrs(grads)
                    ent.rec.set(1, gp)
                    ent.gkey = tuple(gp)
                    return ent
        except Exception:  # tensors without storage etc.: rebuild (and explain) below
            pass
    cache.pop(slot, None)
    ent = _Prepared(build())
    rec = ent.rec
    if not rec.fast or rec.n == 0:
        return ent
    try:
        ent.pinned = pinned
        first = params if params is not None else grads
        ent.dev = first[0].get_device()
        ent.numel = list(map(_numel, first))
        ent.pdtypes = None if params is None else list(map(_dtype_of, params))
        ent.gdtypes = None if grads is None else list(map(_dtype_of, grads))
        ent.gkey = None if grads is None else tuple(map(_data_ptr, grads))
        ent.pptrs = _pinned_ptrs(pinned)
        held = pinned[1:] if params is not None else pinned     # all but the params
        ent.storages = [list(map(_storage_of, seq)) for seq in held if seq is not None]
        cache[slot] = ent
    except Exception:
        cache.pop(slot, None)
    return ent


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


def _launch_tables(prep: _Prepared, device: torch.device, lib):
    """``(table, partials, n_tiles)`` of ``prep`` on ``device`` (built and uploaded
    on the first call with these grads, then reused from the entry)."""
    tables = prep.tables
    key = prep.gkey if tables is not _BY_CONTENT else (device.index, prep.rec.a.tobytes())
    with _content_lock:
        hit = tables.get(key)
        if hit is not None:
            tables.move_to_end(key)
            return hit
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fsam_kernels cuda: a new set of tensors reached the kernels during CUDA graph "
            "capture; run one eager step with the same tensors (and the same cache=, if any) "
            "before capturing (the launch tables are built and uploaded on first use)")
    host, n_tiles = cuda_host_table(prep.rec.a, int(lib.fsam_cuda_tile_size()), lib)
    if device.type == "cuda":
        table = torch.from_numpy(host).pin_memory().to(device, non_blocking=True)
    else:  # the emulated CUDA library: host memory
        table = torch.from_numpy(host)
    entry = (table, torch.empty(max(n_tiles, 1), dtype=torch.float64, device=device), n_tiles)
    with _content_lock:
        tables[key] = entry
        while len(tables) > (_BY_CONTENT_CAP if tables is _BY_CONTENT else _TABLES_PER_ENTRY):
            tables.popitem(last=False)
    return entry


def _cuda_call(name: str, prep: _Prepared, device: torch.device, args, partials: bool):
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
    lists = op["lists"]
    n = len(a[lists[0]])
    L.check_lengths(name, n, **{k: a[k] for k in lists[1:]
                                if a.get(op["gated"].get(k), True)})
    where = op["device"]
    if where == "params":
        if n == 0:
            return
        device = a["params"][0].device
    else:
        device = a[where].device
        first = a[lists[0]]
        if first and first[0].device != device:
            raise ValueError(f"{name}: {where} is on {device} but {lists[0]}[0] is on "
                             f"{first[0].device}")
    cargs = []
    for k in op["c_args"]:
        v, t = a[k], op["types"][k]
        if t.startswith("Tensor"):
            L.check_scalar(v, k, device, name, optional=t == "Tensor?",
                           dtype=torch.float64 if k in op["f64"] else torch.float32)
            cargs.append(0 if v is None else v.data_ptr())
        else:
            cargs.append(int(v) if t == "bool" else v)
    prep = _prepare(op, cache, a)
    if device.type == "cuda" or engine == "cuda":
        _cuda_call(name, prep, device, cargs, op["partials"])
    else:
        lib = _cpu_lib_or_raise()
        rec = prep.rec
        _check_rc(getattr(lib, "fsam_cpu_" + name)(rec.ptr(), rec.n, *cargs), lib, "cpu")
    for k in op["written"]:
        _bump(a[k] if k in lists else (a[k],))


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


def _seq(x):
    """A list or tuple as it is (the ``cache`` checks compare sequence objects)."""
    if x is None:
        return ()
    return x if isinstance(x, (list, tuple)) else list(x)


def _finish_schemas():
    for name, op in _OPS.items():
        op["names"] = [k for k, _ in op["args"]]
        op["types"] = {k: t for k, t in op["args"]}
        base = [p for p in inspect.signature(getattr(Backend, name)).parameters.values()
                if p.name != "self"]
        op["positional"] = [p.name for p in base if p.kind == p.POSITIONAL_OR_KEYWORD]
        op["eager_on"] = [k for k in ("params", "grads") if k in op["lists"]]
        op["plain"] = [(k, re.sub(r"\(.*?\)", "", t)) for k, t in op["args"]
                       if t in ("float", "bool")]


_finish_schemas()


def _backend_method(name: str):
    """The Backend method ``name`` (base.py's signature and docstring): the
    arguments normalised as the schema says (sequences kept as they are for
    the cache, gated lists emptied, floats and bools converted), then either
    the kernel directly (:func:`_eager`) or the custom op."""
    op = _OPS[name]

    def method(self, *args, cache=None, **kw):
        if len(args) > len(op["positional"]):
            raise TypeError(f"{name}() takes {len(op['positional'])} positional arguments "
                            f"after self, got {len(args)}")
        a = dict(zip(op["positional"], args))
        a.update(kw)
        missing = [k for k in op["names"] if k not in a and k != "has_backups"]
        if missing:
            raise TypeError(f"{name}() missing arguments: {missing}")
        if "has_backups" in op["types"]:
            a["has_backups"] = a["backups"] is not None
        for k, t in op["plain"]:
            a[k] = float(a[k]) if t == "float" else bool(a[k])
        for k in op["lists"]:
            a[k] = _seq(a[k]) if a.get(op["gated"].get(k), True) else ()
        where = op["device"]
        if where == "params":
            if not a["params"]:
                return None
            engine, prefix = self._route(a["params"][0].device, "params[0]")
        else:
            engine, prefix = self._route(a[where].device, where)
        if _eager(*(a[k] for k in op["eager_on"])):
            return _impl(op, *(a[k] for k in op["names"]), cache=cache, engine=engine)
        getattr(torch.ops.fsam_kernels, prefix + name)(
            *(list(a[k]) if k in op["lists"] else a[k] for k in op["names"]))

    base = getattr(Backend, name)
    method.__name__, method.__qualname__, method.__doc__ = name, name, base.__doc__
    method.__signature__ = inspect.signature(base)
    return method


_LIB = _register_ops()


class _NativeBackend(Backend):
    norm_dtype = torch.float64   # N² (SPEC §1): float64 partials and totals
    fused = True

    def _route(self, device: torch.device, what: str):
        """``(engine, op name prefix)`` for tensors on ``device`` (the device of
        the argument ``what``); ValueError for a device the backend does not run on."""
        raise NotImplementedError


for _name in _OPS:
    setattr(_NativeBackend, _name, _backend_method(_name))

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
