"""Backend registry.

``get_backend(name, device)`` returns a backend instance. Names:
"reference", "foreach", "cpu", "cuda", "triton", and "auto", which picks the
fastest available backend for the device (in the order of ``AUTO_ORDER``) and
logs which one it chose. An explicitly requested backend that cannot run on
the device raises ``RuntimeError`` naming the reason; an unknown name raises
``ValueError``.

``FSAM_CUDA_EMULATE=1`` in the environment when this package is imported
(:data:`CUDA_EMULATE`) makes "cuda" available on CPU tensors too: the CUDA
kernel source built for the host with an emulation of threads, barriers and
warp shuffles (see ``fsam_kernels.backends.native``), as ``TRITON_INTERPRET=1``
does for "triton". It is for tests: "auto" never chooses it.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Dict, Tuple

import torch

from .base import Backend

logger = logging.getLogger("fsam_kernels")

#: FSAM_CUDA_EMULATE read once, at import: "1" (or true/yes/on) enables the
#: emulated CUDA backend on CPU tensors
CUDA_EMULATE = os.environ.get("FSAM_CUDA_EMULATE", "").strip().lower() in ("1", "true", "yes", "on")

#: name -> (module, class name); modules are imported lazily
_REGISTRY: Dict[str, Tuple[str, str]] = {
    "reference": ("fsam_kernels.backends.reference", "ReferenceBackend"),
    "foreach": ("fsam_kernels.backends.foreach", "ForeachBackend"),
    "cpu": ("fsam_kernels.backends.native", "CPUBackend"),
    "cuda": ("fsam_kernels.backends.native", "CUDABackend"),
    "triton": ("fsam_kernels.backends.triton", "TritonBackend"),
}

#: preference order of "auto", fastest first, per device type
AUTO_ORDER = {
    "cpu": ("cpu", "foreach", "reference"),
    "cuda": ("cuda", "triton", "foreach", "reference"),
}

BACKEND_NAMES = tuple(_REGISTRY) + ("auto",)

_instances: Dict[str, Backend] = {}


def _load(name: str):
    mod_name, cls_name = _REGISTRY[name]
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:  # missing optional dependency, unbuilt library
        return None, f"backend {name!r} could not be imported: {exc}"
    cls = getattr(mod, cls_name, None)
    if cls is None:
        return None, f"backend {name!r} is not implemented in {mod_name}"
    return cls, ""


def backend_availability(name: str, device) -> Tuple[bool, str]:
    """``(available, reason)`` of backend ``name`` for tensors on ``device``."""
    if name not in _REGISTRY:
        raise ValueError(
            f"backend: unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    cls, why = _load(name)
    if cls is None:
        return False, why
    return cls.availability(torch.device(device))


def available_backends(device="cpu") -> list:
    """Names of the backends that can run on ``device``."""
    return [n for n in _REGISTRY if backend_availability(n, device)[0]]


def get_backend(name: str, device="cpu") -> Backend:
    """Return the backend ``name`` for ``device`` (see module docstring)."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a string, got {type(name).__name__}")
    device = torch.device(device)
    if name == "auto":
        order = AUTO_ORDER.get(device.type, ("foreach", "reference"))
        for cand in order:
            ok, _ = backend_availability(cand, device)
            if ok:
                logger.info("fsam_kernels: backend='auto' chose %r for %s", cand, device)
                return get_backend(cand, device)
        raise RuntimeError(f"backend='auto': no backend available for {device}")
    ok, why = backend_availability(name, device)
    if not ok:
        raise RuntimeError(f"backend={name!r} is not available on {device}: {why}")
    if name not in _instances:
        cls, _ = _load(name)
        _instances[name] = cls()
    return _instances[name]


__all__ = ["Backend", "get_backend", "available_backends", "backend_availability",
           "BACKEND_NAMES", "AUTO_ORDER", "CUDA_EMULATE"]
