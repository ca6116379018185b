"""Pieces shared by the command-line tools (``fsam-train``, ``fsam-sweep``,
``fsam-diagnose``): numeric range checks, ``--device`` / ``--backend`` /
``--threads`` resolution, atomic file writes, the help formatter and the
clean stop on SIGINT / SIGTERM.

Range checks. A :class:`Range` says which numbers an option takes; the same
object serves as an argparse ``type=`` (:meth:`Range.argtype`: the error is
argparse's ``argument --rho: -1 is out of range: expected a finite float >= 0``)
and for checks after parsing (:func:`check_ranges`: ``--steps 0 is out of
range: expected an integer >= 1``). Both exit with status 2 through
``parser.error`` and name the flag, the value and what was expected.

Devices. :func:`resolve_device` and :func:`check_backend` raise ValueError
naming ``--device`` / ``--backend``; :func:`device_and_backend` turns that
into a parse error.

Atomic writes. :func:`atomic_write` writes a file under a temporary name in
the same directory (unique to the process) and renames it over the target
with ``os.replace``: a reader sees the old file or the whole new one, never a
part, and a write that fails (also by KeyboardInterrupt) leaves the old file
and no temporary behind. :func:`atomic_write_text`, :func:`atomic_write_json`,
:func:`atomic_write_jsonl` and :func:`atomic_torch_save` build on it.

Help. :class:`HelpFormatter` appends ``(default: ...)`` to an option's help
like ``argparse.ArgumentDefaultsHelpFormatter``, but not to a flag that takes
no value nor where the help states the default itself.

Signals. :func:`stop_on_signals` is a context manager under which SIGINT and
SIGTERM only set a flag (:class:`StopRequest`); the training loop checks it
at a step boundary, checkpoints a consistent state there and raises
:class:`Stopped` (exit status ``128 + signum``: 130 / 143). A second signal
raises :class:`Stopped` at once.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import threading
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

import torch

__all__ = ["Range", "POSITIVE_INT", "NONNEG_INT", "NONNEG_FLOAT", "POSITIVE_FLOAT", "FRACTION",
           "check_ranges", "resolve_device", "check_backend", "device_and_backend",
           "amp_autocast", "default_threads", "set_threads", "atomic_write", "atomic_write_text",
           "atomic_write_json", "atomic_write_jsonl", "atomic_torch_save", "HelpFormatter",
           "Stopped", "StopRequest", "stop_on_signals", "STOP_SIGNALS"]


# --------------------------------------------------------------------------- ranges
@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers an option accepts: ``kind`` (int or float; floats must be
    finite), a lower bound ``low`` and an optional upper bound ``high``, each
    inclusive unless ``low_open`` / ``high_open``; ``optional=True`` also
    accepts None (an option left at a None default).

    ``Range(int, 1)``: an integer >= 1; ``Range(float, 0, 1)``: a finite float
    in [0, 1]; ``Range(float, 0, low_open=True)``: a finite float > 0.
    """

    kind: type
    low: float
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def __post_init__(self):
        if self.kind not in (int, float):
            raise TypeError(f"Range: kind must be int or float, got {self.kind!r}")
        if self.high is not None and self.high < self.low:
            raise ValueError(f"Range: high {self.high} < low {self.low}")

    def bounds(self) -> str:
        """``">= 1"``, ``"> 0"``, ``"in [0, 1]"``, ``"in (0, 1)"``."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")

    def describe(self) -> str:
        """What is expected, e.g. ``"an integer >= 1"``, ``"a finite float in [0, 1]"``."""
        what = "an integer" if self.kind is int else "a finite float"
        return f"{what} {self.bounds()}" + (" (or unset)" if self.optional else "")

    def contains(self, value: Any) -> bool:
        """True when ``value`` is in the range (None only when ``optional``;
        bool is not a number here)."""
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and int(value) != value:
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def or_unset(self) -> "Range":
        """The same range, also accepting None (an option left unset)."""
        return dataclasses.replace(self, optional=True)

    def argtype(self) -> Callable[[str], Any]:
        """An argparse ``type=`` parsing ``kind`` and checking the range: a bad
        value is a parse error naming the option, the value and the range."""
        kind = self.kind

        def parse(text: str):
            try:
                v = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected {'an integer' if kind is int else 'a float'} {self.bounds()}, "
                    f"got {text!r}") from None
            if not self.contains(v):
                raise argparse.ArgumentTypeError(
                    f"{text} is out of range: expected {self.describe()}")
            return v

        parse.__name__ = kind.__name__        # argparse's "invalid <name> value" wording
        return parse


#: the common ranges
POSITIVE_INT = Range(int, 1)
NONNEG_INT = Range(int, 0)
NONNEG_FLOAT = Range(float, 0)
POSITIVE_FLOAT = Range(float, 0, low_open=True)
FRACTION = Range(float, 0, 1)


def check_ranges(parser: argparse.ArgumentParser,
                 checks: Iterable[Tuple[str, Any, Range]]) -> None:
    """``checks``: ``(flag, value, range)`` triples. ``parser.error`` (exit
    status 2) for the first value outside its range, e.g. ``--steps 0 is out
    of range: expected an integer >= 1``."""
    for flag, value, rng in checks:
        if not rng.contains(value):
            parser.error(f"{flag} {value} is out of range: expected {rng.describe()}")


# --------------------------------------------------------------------------- devices
def resolve_device(spec: str) -> torch.device:
    """``--device`` -> a ``torch.device`` that exists on this machine.

    ``auto`` is cuda when available, else cpu. Raises ValueError naming
    ``--device`` for an unparseable string, CUDA without a CUDA build or
    device, an index beyond the device count, or another unavailable type."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"--device {spec!r} is not a device name ({exc}); "
                         "expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec!r}: CUDA is not available here (torch {torch.__version__}"
                             f"{', built without CUDA' if torch.version.cuda is None else ''}); "
                             "use --device cpu or auto")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {spec!r}: this machine has {n} CUDA device(s) "
                             f"(cuda:0 .. cuda:{n - 1})")
        return dev
    mod = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    is_available = getattr(mod, "is_available", None)
    if callable(is_available) and is_available():
        return dev
    raise ValueError(f"--device {spec!r}: device type {dev.type!r} is not available here; "
                     "use auto, cpu or cuda")


def check_backend(name: str, device) -> None:
    """Raise ValueError naming ``--backend`` if ``name`` is not a backend of
    :data:`fsam_kernels.backends.BACKEND_NAMES` or cannot run on ``device``."""
    from .backends import BACKEND_NAMES, backend_availability

    if name not in BACKEND_NAMES:
        raise ValueError(f"--backend {name!r} is not one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        return
    ok, why = backend_availability(name, device)
    if not ok:
        raise ValueError(f"--backend {name} is not available on {torch.device(device)}: {why}")


def device_and_backend(parser: argparse.ArgumentParser, device: str, backend: str) -> torch.device:
    """:func:`resolve_device` of ``device`` and :func:`check_backend` of
    ``backend`` on it; either error becomes ``parser.error`` (exit status 2).
    Returns the device."""
    try:
        dev = resolve_device(device)
        check_backend(backend, dev)
    except ValueError as e:
        parser.error(str(e))
    return dev


def amp_autocast(parser: argparse.ArgumentParser, amp: bool, device) -> Callable[[], Any]:
    """The ``autocast`` factory of ``--amp``: bfloat16 ``torch.autocast`` on
    CUDA, else ``contextlib.nullcontext``. ``--amp`` on a non-CUDA device is
    ``parser.error``."""
    if not amp:
        return contextlib.nullcontext
    if torch.device(device).type != "cuda":
        parser.error("--amp needs a CUDA --device")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    return autocast


def default_threads() -> int:
    """``$OMP_NUM_THREADS`` when it is a positive integer, else the CPUs this
    process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def set_threads(requested: Optional[int]) -> int:
    """``torch.set_num_threads(requested or default_threads())``; returns the
    number set."""
    threads = requested or default_threads()
    torch.set_num_threads(threads)
    return threads


# --------------------------------------------------------------------------- atomic writes
_TMP_COUNTER = itertools.count()


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the whole file to ``tmp`` (a path in the
    directory of ``path``, named ``<path>.<pid>-<n>.tmp``); it then replaces
    ``path`` by ``os.replace``. Creates the parent directory when missing. On
    any exception (KeyboardInterrupt included) the temporary file is removed,
    ``path`` is left as it was, and the exception propagates."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{next(_TMP_COUNTER)}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str, obj: Any, *, allow_nan: bool = True) -> None:
    """``json.dump(obj, indent=1, default=str)`` to ``path`` atomically.
    ``allow_nan=False``: ValueError for a NaN or infinity (strict JSON),
    raised before anything is written."""
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=allow_nan, default=str))


def atomic_write_jsonl(path: str, records: Sequence[dict]) -> None:
    """One ``json.dumps(record)`` line per record, to ``path`` atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# --------------------------------------------------------------------------- help
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` without the ``(default: ...)`` of a
    flag that takes no value (``--no-plots`` would read ``(default: True)``,
    the value of its ``dest``, as if the flag were on; ``--amp`` would read
    ``(default: False)``) and of an option whose help already says its
    default (``--warmup``'s ``(default: 10% of --steps ...)`` would be
    followed by ``(default: None)``), nor ``(default: None)`` of an option
    left unset by default (``--data``, ``--stop-after``: None says nothing).
    The formatter of fsam-train and fsam-sweep."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0 or action.default is None or "(default" in text:
            return text
        return super()._get_help_string(action)


# --------------------------------------------------------------------------- signals
#: the signals that stop a command-line run cleanly
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """A run stopped by signal ``signum`` (SIGINT or SIGTERM, see
    :func:`stop_on_signals`); :attr:`status` is the exit status of a process
    killed by it, ``128 + signum`` (130 for SIGINT, 143 for SIGTERM). A
    BaseException, not a KeyboardInterrupt: code that checkpoints on
    KeyboardInterrupt does not treat it as one."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        """``"SIGINT"``, ``"SIGTERM"``, ..."""
        return signal.Signals(self.signum).name

    @property
    def status(self) -> int:
        """``128 + signum``."""
        return 128 + self.signum


class StopRequest:
    """What :func:`stop_on_signals` yields: :attr:`signum` is None until one
    of its signals arrives, then that signal's number."""

    def __init__(self):
        self.signum: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise :class:`Stopped` if a signal arrived."""
        if self.signum is not None:
            raise Stopped(self.signum)


_ACTIVE: list = []  # the StopRequest of the outermost stop_on_signals, while it runs


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS):
    """Within the block, each of ``signals`` (default SIGINT and SIGTERM)
    only sets :attr:`StopRequest.signum` of the yielded request; the code
    in the block checks it where its state is consistent (a training loop:
    after each complete step) and stops there (:meth:`StopRequest.check`
    raises :class:`Stopped`). A second signal while one is pending raises
    :class:`Stopped` at once, wherever it lands.

    Handlers are installed only in the main thread (the only one Python
    delivers signals to; elsewhere the request is never set) and not for a
    signal that is ignored (``SIG_IGN``, e.g. SIGINT of a background job,
    stays ignored); the previous handlers are restored on exit (``SIG_DFL``
    for one not installed from Python). Nested use (fsam-sweep around the
    Trainer of each run) yields the outer request and changes nothing."""
    if _ACTIVE:
        yield _ACTIVE[-1]
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signum is not None:
            raise Stopped(signum)
        request.signum = signum

    old = {}
    try:
        for sig in signals:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                old[sig] = signal.signal(sig, handler)
        _ACTIVE.append(request)
        yield request
    finally:
        if request in _ACTIVE:
            _ACTIVE.remove(request)
        for sig, prev in old.items():
            signal.signal(sig, signal.SIG_DFL if prev is None else prev)
