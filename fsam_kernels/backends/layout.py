"""Memory-layout checks shared by the fused backends (native, triton).

The fused kernels walk a parameter and its backup/state/grad in memory order,
which is correct by logical index exactly when all of them are dense
(non-overlapping, no gaps) and share strides.
"""
from __future__ import annotations

from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """True when ``t`` is non-overlapping and dense in some dimension order
    (contiguous, channels_last, a transposed matrix...)."""
    if t.numel() <= 1 or t.is_contiguous():
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same strides on every dimension of size > 1."""
    if a.shape != b.shape:
        return False
    if a.is_contiguous() and b.is_contiguous():
        return True
    return all(sa == sb for sa, sb, sz in zip(a.stride(), b.stride(), a.shape) if sz != 1)
