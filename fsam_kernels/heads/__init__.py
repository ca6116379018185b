"""Fused language-model heads: linear cross-entropy without the (N, V) logits,
and Functional-SAM's pass-2 product J(θ+e)ᵀ c0 through it (linear_ce.py)."""
from .linear_ce import (FusedLinearCrossEntropy, HeadOutput, HeadRecorder,
                        fused_linear_cross_entropy, is_head_output)

__all__ = ["FusedLinearCrossEntropy", "HeadOutput", "HeadRecorder",
           "fused_linear_cross_entropy", "is_head_output"]
