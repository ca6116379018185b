"""fsam_kernels: SAM, Functional-SAM and their preconditioned variants.

Public API: :class:`SAM`, :class:`FunctionalSAM`, :class:`CotangentRecorder`,
and the backend registry (:func:`get_backend`, :func:`available_backends`).
Paper: Singh, Mobahi, Agarwala, Dauphin, "Avoiding spurious sharpness
minimization broadens applicability of SAM", ICML 2025 (arXiv 2502.02407).
"""
from .backends import available_backends, get_backend
from .optim import SAM, FunctionalSAM, bn_stats_frozen
from .cotangent import CotangentRecorder

__all__ = ["SAM", "FunctionalSAM", "CotangentRecorder", "bn_stats_frozen", "get_backend",
           "available_backends"]
__version__ = "0.1.0"
