"""Former name of :mod:`fsam_kernels.cotangent` (the capture and replay of
Functional-SAM's output cotangent), kept so that existing imports work.

``import fsam_kernels.functional`` and ``from fsam_kernels.functional import
CotangentRecorder`` (or any other name of :mod:`fsam_kernels.cotangent`,
the module-private helpers included) give the very objects of
:mod:`fsam_kernels.cotangent`: the public names are re-exported here, every
other attribute is looked up there on access (PEP 562). New code imports
:mod:`fsam_kernels.cotangent`. Rebinding an attribute of this module does
not change :mod:`fsam_kernels.cotangent` (patch that module instead).
"""
from . import cotangent as _cotangent
from .cotangent import *  # noqa: F401,F403  (the public names, as before)
from .cotangent import __all__  # noqa: F401


def __getattr__(name: str):
    try:
        return getattr(_cotangent, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} (now fsam_kernels.cotangent) has no "
                             f"attribute {name!r}") from None


def __dir__() -> list:
    return sorted(set(globals()) | set(dir(_cotangent)))
