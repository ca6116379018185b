"""Test configuration.

Without a CUDA device, Triton kernels run through the interpreter on CPU
tensors: TRITON_INTERPRET must be set before triton is first imported, so it
is set here, before any test module imports fsam_kernels.
"""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_large: needs a GPU with ~50 GiB free")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "slow: slower end-to-end test")


def pytest_report_header(config):
    """Which (backend, device) pairs the backend-parametrized tests run on, and
    why the others are left out (so a dropped backend shows in every log)."""
    try:
        from helpers import backend_device_pairs, unavailable_backends

        pairs = backend_device_pairs()
        missing = unavailable_backends()
    except Exception as exc:  # pragma: no cover - a broken install shows in the tests
        return [f"fsam_kernels backends: could not be listed ({type(exc).__name__}: {exc})"]
    lines = ["fsam_kernels backends: " + ", ".join(f"{b}@{d}" for b, d in pairs)]
    lines += [f"  not available: {b}@{d}: {why}" for b, d, why in missing]
    return lines
