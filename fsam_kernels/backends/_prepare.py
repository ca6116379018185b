"""The preparation and cache layer of the fused backends (native cpu/cuda, triton).

Every fused backend runs a call of one of the four operations of SPEC §6 the
same way:

1. :func:`bind`: the Backend method's arguments by schema name (sequences
   kept as they are for the cache, lists gated off by their flag emptied,
   floats and bools converted);
2. :func:`check_call`: the list lengths, the one-element tensors (device and
   dtype from the schema: float64 for N², float32 otherwise) and the device
   of the call;
3. :func:`prepare`: the call's :class:`Prepared` entry, the validated record
   table (``fsam_tensor_t`` of csrc/include/fsam/capi.h: one row of pointers,
   numel and dtype codes per tensor), built by :func:`build_norm` (sq_norm) or
   :func:`build_update` (perturb / restore_adamw / restore) and cached on the
   call site's ``cache=`` dict (the only cache of the fused backends);
4. :func:`device_tables`: what the backend derives from the records for its
   launches (the CUDA kernels' records + chunk table, the Triton kernels'
   pointer and tile tables), hung on the same entry (keyed by the grads'
   pointers, the one role that may change between hits), or found by the
   records' content for calls without a cache.

:data:`OPS` is the one table of op schemas: the native backend generates its
custom ops, ctypes declarations and methods from it, and both backends bind
and check their arguments with it.
"""
from __future__ import annotations

import inspect
import operator
import re
import threading
from collections import OrderedDict
from typing import Callable, List, Optional

import numpy as np
import torch
from torch import Tensor

from . import layout as L
from ._native_lib import _DTYPE_CODE, _F64, _STATE_CODE
from .base import Backend

__all__ = ["OPS", "ROLES", "CODE_DTYPE", "Records", "Prepared", "bind", "check_call",
           "build_norm", "build_update", "prepare", "device_tables", "backend_method", "upload"]

# ----------------------------------------------------------------------------
# The op schemas
# ----------------------------------------------------------------------------
# Each entry: the torch.library schema of the op's arguments ((a!) marks what
# it writes: torch.compile functionalises those, eager calls bump their version
# counters), the argument its device is taken from, the C kernel's arguments
# after (records, n) in order (bools passed as int, tensors as data pointers),
# the lists that exist only when a flag is set, the one-element tensors that
# are float64 (N²), and whether the CUDA kernel takes a partials buffer.
OPS = {
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
#: the tensor roles, in the order of the record columns 0-5
ROLES = ("params", "grads", "backups", "exp_avgs", "exp_avg_sqs", "steps")
#: record dtype code -> torch dtype (parameters, grads and state)
CODE_DTYPE = {c: d for d, c in _DTYPE_CODE.items()}


def _parse_schemas():
    """Fill in each op's argument list from its schema: ``args`` (name, type)
    in order, ``names``, ``types``, ``lists``, ``written``, ``scalars`` (the
    one-element tensors), ``plain`` (the float/bool arguments), ``positional``
    (base.py's positional parameters) and ``eager_on``."""
    for name, op in OPS.items():
        op["name"] = name
        op["args"] = [tuple(a.strip().rsplit(" ", 1)[::-1]) for a in op["schema"].split(",")]
        op["names"] = [k for k, _ in op["args"]]
        op["types"] = {k: t for k, t in op["args"]}
        op["lists"] = [n for n, t in op["args"] if t.endswith("[]")]
        op["written"] = [n for n, t in op["args"] if "!" in t]
        op["scalars"] = [n for n, t in op["args"]
                         if t.startswith("Tensor") and not t.endswith("[]")]
        op["plain"] = [(k, t) for k, t in op["args"] if t in ("float", "bool")]
        op["kind"] = "norm" if name == "sq_norm" else "update"
        op.setdefault("gated", {})
        op.setdefault("f64", ())
        op.setdefault("partials", False)
        base = [p for p in inspect.signature(getattr(Backend, name)).parameters.values()
                if p.name != "self"]
        op["positional"] = [p.name for p in base if p.kind == p.POSITIONAL_OR_KEYWORD]
        op["eager_on"] = [k for k in ("params", "grads") if k in op["lists"]]
        op["c_types"] = [re.sub(r"\(.*?\)", "", op["types"][k]).rstrip("?")
                         for k in op["c_args"]]


_parse_schemas()


def _seq(x):
    """A list or tuple as it is (the ``cache`` checks compare sequence objects)."""
    if x is None:
        return ()
    return x if isinstance(x, (list, tuple)) else list(x)


def bind(op: dict, args: tuple, kw: dict) -> dict:
    """The arguments of a Backend method call of ``op`` by schema name
    (base.py's signature), normalised: floats and bools converted, every list
    a list or tuple (None: empty), a list gated off by its flag empty,
    ``has_backups`` from ``backups``. TypeError for a wrong argument count."""
    name = op["name"]
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
    return a


def check_call(op: dict, a: dict, prefix: str) -> Optional[torch.device]:
    """The call-level checks of ``op`` (``a``: the arguments by schema name;
    ``prefix``: the message prefix, e.g. "perturb" or "triton perturb"): every
    list not gated off has as many entries as the first (ValueError), the
    one-element tensors (:func:`layout.check_scalar`: float64 for N², float32
    otherwise, on the call's device). Returns the call's device (the schema's
    ``device`` argument's, or ``params[0]``'s), None for a restore of no
    tensors (nothing to do)."""
    lists = op["lists"]
    n = len(a[lists[0]])
    L.check_lengths(prefix, n, **{k: a[k] for k in lists[1:]
                                  if a.get(op["gated"].get(k), True)})
    where = op["device"]
    if where == "params":
        if n == 0:
            return None
        device = a["params"][0].device
    else:
        device = a[where].device
        first = a[lists[0]]
        if first and first[0].device != device:
            raise ValueError(f"{prefix}: {where} is on {device} but {lists[0]}[0] is on "
                             f"{first[0].device}")
    for k in op["scalars"]:
        L.check_scalar(a[k], k, device, prefix, optional=op["types"][k] == "Tensor?",
                       dtype=torch.float64 if k in op["f64"] else torch.float32)
    return device


# ----------------------------------------------------------------------------
# Records: the fsam_tensor_t table of capi.h, one builder per kind of op
# ----------------------------------------------------------------------------
def _ptrs(ts) -> List[int]:
    return list(map(Tensor.data_ptr, ts))


class Records:
    """The fsam_tensor_t table (capi.h) as an int64 array ``a`` of shape (n, 8):
    columns 0-5 the data pointers of :data:`ROLES` (0: absent), 6 the numel,
    7 the dtype codes (parameter or state code | grad code << 32)."""

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
# returns None and the full validation of layout.py runs (with its copies and
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
        r = Records(n)
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
        r = Records(n)
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


def build_norm(op: str, grads, exp_avg_sqs, steps, precondition, convert: bool) -> Records:
    """sq_norm's records (``op``: the message prefix): the vectorised check of
    the usual case (every tensor contiguous, expected dtypes), else the
    per-tensor checks of layout.py, grads converted (``convert``: float64
    exactly where the state is, as the native kernels read them) or copied
    where needed, kept alive in ``keep``."""
    r = _fast_sq_norm(grads, exp_avg_sqs, steps, precondition)
    if r is not None:
        return r
    r = Records(len(grads))
    if not grads:
        return r
    r.keep = gs = L.check_norm_args(op, grads, exp_avg_sqs, steps, precondition,
                                    grads[0].device, convert)
    r.set(1, _ptrs(gs))
    if precondition:
        r.set(4, _ptrs(exp_avg_sqs))
        r.set(5, _ptrs(steps))
    r.set(6, [g.numel() for g in gs])
    gcodes = [_DTYPE_CODE[g.dtype] for g in gs]
    if precondition:
        wcodes = [_STATE_CODE[v.dtype] for v in exp_avg_sqs]
    else:
        wcodes = [_F64 if c == _F64 else 0 for c in gcodes]
    r.dtypes(wcodes, gcodes)
    return r


def build_update(op: str, params, grads, backups, exp_avgs, exp_avg_sqs, steps,
                 convert: bool) -> Records:
    """Records of perturb / restore_adamw / restore (a role the op lacks: None),
    as :func:`build_norm` (``convert``: grads read as float64 exactly for
    float64 parameters)."""
    r = _fast_update(params, grads, backups, exp_avgs, exp_avg_sqs, steps, steps is not None)
    if r is not None:
        return r
    r = Records(len(params))
    if not params:
        return r
    r.keep = gs = L.check_update_args(op, params, grads, backups, exp_avgs, exp_avg_sqs, steps,
                                      params[0].device, convert)
    for col, lst in ((0, params), (1, gs if grads is not None else None), (2, backups),
                     (3, exp_avgs), (4, exp_avg_sqs), (5, steps)):
        if lst is not None:
            r.set(col, _ptrs(lst))
    r.set(6, [p.numel() for p in params])
    pcodes = [_DTYPE_CODE[p.dtype] for p in params]
    r.dtypes(pcodes, [_DTYPE_CODE[g.dtype] for g in gs] if grads is not None else pcodes)
    return r


# ----------------------------------------------------------------------------
# The cache (one mechanism: the call site's ``cache``)
# ----------------------------------------------------------------------------
class Prepared:
    """One call's validated records and the device tables derived from them.

    Stored in the caller's ``cache`` dict (one slot per op) when the call is
    cacheable; then ``tables`` maps (backend tag, the grads' pointers: the one
    role that may change between cache hits) to the backend's device tables
    (:func:`device_tables`), so a steady-state step neither rebuilds nor
    hashes the records nor uploads anything."""

    __slots__ = ("pinned", "rec", "dev", "numel", "pdtypes", "gdtypes", "pptrs", "storages",
                 "gkey", "tables")

    def __init__(self, rec: Records, cached: bool = True):
        self.rec = rec
        self.gkey = None      # None for an uncached call: its tables are found by content
        self.tables: "OrderedDict[tuple, object]" = OrderedDict() if cached else _BY_CONTENT


_is = operator.is_
_storage_of = Tensor.untyped_storage
_TABLES_PER_ENTRY = 4   # grad storages alternating between steps (set_to_none + allocator)
#: device tables of calls without a usable ``cache`` (lists, cache=None), keyed by
#: the backend's tag and the record table's bytes (the pointers): so that such
#: calls, too, upload nothing in steady state and can be captured in a CUDA
#: graph after a warm-up. Cached calls never hash: their tables hang on their entry.
_BY_CONTENT: "OrderedDict[tuple, object]" = OrderedDict()
_BY_CONTENT_CAP = 64
_content_lock = threading.Lock()


def _pinned_ptrs(pinned) -> tuple:
    """Every data pointer of the pinned sequences: a tensor re-pointed with
    ``.data =`` (params by ``module.to()``, state by "move the optimizer"
    snippets) must never leave a stale pointer in a cached table."""
    return tuple(None if seq is None else tuple(map(_data_ptr, seq)) for seq in pinned)


def prepare(op: dict, cache: Optional[dict], a: dict, prefix: Optional[str] = None,
            convert: bool = True) -> Prepared:
    """The records of one call of ``op`` (arguments ``a`` by schema name, as
    :func:`bind` leaves them; ``prefix``: the error message prefix, default
    the op's name; ``convert``: see :func:`build_update`).

    Caching (the Backend interface's ``cache=``): a call is cacheable when
    ``cache`` is a dict and every pinned sequence (all but the grads) is a
    tuple. Its entry in ``cache[slot]`` is reused when every pinned sequence
    is the same object as at the last call of this slot with every tensor's
    data pointer unchanged, the params still contiguous with the same sizes
    and dtypes, and the grads (checked in full: contiguity, sizes, device,
    dtypes) fit it; their pointers are then written into the table. The
    entry holds the storages of the pinned tensors other than the params, so
    none of their addresses can be reused by another allocation while the
    table names it (an unchanged pointer then means the same storage); the
    params are checked in full instead (holding theirs would keep a model's
    old weights alive after ``model.half()``). Only tables built by the
    vectorised check (no temporaries) are stored. Calls without a usable
    cache build their records afresh each time; their device tables are
    looked up by content (:data:`_BY_CONTENT`)."""
    name = op["name"]
    prefix = prefix or name
    if op["kind"] == "norm":
        pre = a["precondition"]
        pinned = (a["exp_avg_sqs"], a["steps"]) if pre else ()
        params, grads, slot = None, a["grads"], "sq_norm" if pre else "sq_norm0"

        def build():
            return build_norm(prefix, grads, a["exp_avg_sqs"], a["steps"], pre, convert)
    else:
        r = {k: (a[k] if k in op["lists"] and a.get(op["gated"].get(k), True) else None)
             for k in ROLES}
        params, grads, slot = r["params"], r["grads"], name
        pinned = (params, r["backups"], r["exp_avgs"], r["exp_avg_sqs"], r["steps"])

        def build():
            return build_update(prefix, *(r[k] for k in ROLES), convert)
    if cache is None or not all(s is None or type(s) is tuple for s in pinned):
        return Prepared(build(), cached=False)   # lists could change in place: never pinned
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
    ent = Prepared(build())
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


def device_tables(prep: Prepared, tag: tuple, device: torch.device,
                  build: Callable[[Records], object]):
    """The backend's device tables of ``prep`` (``build(prep.rec)``: a function
    of the records only, which is what makes reuse safe): on a cached entry
    keyed by (``tag``, the grads' pointers), else by (``tag``, ``device``, the
    records' bytes); built on the first call with these tensors, then reused.
    ``tag`` names the backend and whatever else the tables depend on (the op,
    a chunk size). RuntimeError when they would be built during CUDA graph
    capture (an upload cannot be captured)."""
    tables = prep.tables
    by_content = tables is _BY_CONTENT
    key = (tag, device.type, device.index, prep.rec.a.tobytes()) if by_content else \
        (tag, prep.gkey)
    with _content_lock:
        hit = tables.get(key)
        if hit is not None:
            tables.move_to_end(key)
            return hit
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"fsam_kernels {tag[0]}: a new set of tensors reached the kernels during CUDA "
            f"graph capture; run one eager step with the same tensors (and the same cache=, "
            f"if any) before capturing (the launch tables are built and uploaded on first use)")
    entry = build(prep.rec)
    with _content_lock:
        tables[key] = entry
        while len(tables) > (_BY_CONTENT_CAP if by_content else _TABLES_PER_ENTRY):
            tables.popitem(last=False)
    return entry


def backend_method(name: str, run: Callable):
    """The Backend method ``name`` (base.py's signature and docstring) of a
    fused backend: ``run(self, op, a, cache)`` with ``a`` from :func:`bind`."""
    op = OPS[name]

    def method(self, *args, cache=None, **kw):
        return run(self, op, bind(op, args, kw), cache)

    base = getattr(Backend, name)
    method.__name__, method.__qualname__, method.__doc__ = name, name, base.__doc__
    method.__signature__ = inspect.signature(base)
    return method


def upload(host: np.ndarray, device: torch.device) -> Tensor:
    """An int64 host array as a tensor on ``device`` (pinned, asynchronous copy
    for CUDA; the array's own memory on the CPU)."""
    t = torch.from_numpy(host)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
