"""fsam_kernels._cli: the range checks, device resolution, atomic writes, the
help formatter and the clean stop on SIGINT / SIGTERM shared by fsam-train,
fsam-sweep and fsam-diagnose."""
import argparse
import contextlib
import json
import math
import os
import signal
import threading
import warnings

import pytest
import torch

from fsam_kernels import _cli as C


def _parser():
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--n", type=C.POSITIVE_INT.argtype(), default=1)
    p.add_argument("--frac", type=C.FRACTION.argtype(), default=0.5)
    p.add_argument("--rho", type=C.POSITIVE_FLOAT.argtype(), default=0.1)
    return p


def _error(capsys, fn):
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("rng, inside, outside, text", [
    (C.POSITIVE_INT, [1, 2, 10 ** 9], [0, -1, 1.5, None, True, "3"], "an integer >= 1"),
    (C.NONNEG_INT, [0, 7], [-1, None], "an integer >= 0"),
    (C.NONNEG_FLOAT, [0.0, 0, 3.5], [-1e-12, math.inf, math.nan, None], "a finite float >= 0"),
    (C.POSITIVE_FLOAT, [1e-300, 2.0], [0.0, -0.0, math.inf], "a finite float > 0"),
    (C.FRACTION, [0.0, 1.0, 0.25], [-0.01, 1.01, math.nan], "a finite float in [0, 1]"),
    (C.Range(float, 0, 1, low_open=True, high_open=True), [0.5], [0.0, 1.0], "a finite float in (0, 1)"),
    (C.POSITIVE_INT.or_unset(), [None, 1], [0], "an integer >= 1 (or unset)"),
])
def test_range_contains_and_describe(rng, inside, outside, text):
    assert rng.describe() == text
    for v in inside:
        assert rng.contains(v), v
    for v in outside:
        assert not rng.contains(v), v


def test_range_rejects_bad_definitions():
    with pytest.raises(TypeError, match="kind must be int or float"):
        C.Range(str, 0)
    with pytest.raises(ValueError, match="high 0 < low 1"):
        C.Range(int, 1, 0)
    assert not C.POSITIVE_INT.optional and C.POSITIVE_INT.or_unset().optional  # a copy


def test_argtype_error_names_the_flag_value_and_range(capsys):
    p = _parser()
    assert p.parse_args(["--n", "3", "--frac", "1", "--rho", "2e-3"]) == argparse.Namespace(
        n=3, frac=1.0, rho=2e-3)
    err = _error(capsys, lambda: p.parse_args(["--n", "0"]))
    assert "argument --n: 0 is out of range: expected an integer >= 1" in err
    err = _error(capsys, lambda: p.parse_args(["--frac", "1.5"]))
    assert "argument --frac: 1.5 is out of range: expected a finite float in [0, 1]" in err
    err = _error(capsys, lambda: p.parse_args(["--rho", "inf"]))
    assert "argument --rho: inf is out of range: expected a finite float > 0" in err
    err = _error(capsys, lambda: p.parse_args(["--n", "two"]))
    assert "argument --n: expected an integer >= 1, got 'two'" in err


def test_check_ranges_reports_the_first_bad_flag(capsys):
    p = argparse.ArgumentParser(prog="tool")
    C.check_ranges(p, (("--steps", 3, C.POSITIVE_INT), ("--max-runs", None, C.NONNEG_INT.or_unset())))
    err = _error(capsys, lambda: C.check_ranges(p, (
        ("--steps", 3, C.POSITIVE_INT), ("--lr", -0.5, C.NONNEG_FLOAT), ("--evals", 0, C.POSITIVE_INT))))
    assert "tool: error: --lr -0.5 is out of range: expected a finite float >= 0" in err
    assert "--evals" not in err


# --------------------------------------------------------------------------- devices
def test_resolve_device(monkeypatch):
    assert C.resolve_device("cpu") == torch.device("cpu")
    assert C.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"--device 'nonsense' is not a device name"):
        C.resolve_device("nonsense")
    with pytest.raises(ValueError, match=r"--device 'meta': device type 'meta' is not available"):
        C.resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert C.resolve_device("cuda:1") == torch.device("cuda:1")
    assert C.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"--device 'cuda:2': this machine has 2 CUDA device\(s\) "
                                         r"\(cuda:0 \.\. cuda:1\)"):
        C.resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device 'cuda': CUDA is not available here"):
        C.resolve_device("cuda")


def test_device_and_backend_errors_name_the_flag(capsys):
    p = argparse.ArgumentParser(prog="tool")
    assert C.device_and_backend(p, "cpu", "reference") == torch.device("cpu")
    assert C.device_and_backend(p, "cpu", "auto") == torch.device("cpu")
    err = _error(capsys, lambda: C.device_and_backend(p, "cpu", "gpu"))
    assert "tool: error: --backend 'gpu' is not one of" in err and "reference" in err
    err = _error(capsys, lambda: C.device_and_backend(p, "cpu", "cuda"))
    assert "--backend cuda is not available on cpu" in err
    err = _error(capsys, lambda: C.device_and_backend(p, "foo", "auto"))
    assert "--device 'foo'" in err


def test_amp_autocast(capsys):
    p = argparse.ArgumentParser(prog="tool")
    assert C.amp_autocast(p, False, torch.device("cpu")) is contextlib.nullcontext
    err = _error(capsys, lambda: C.amp_autocast(p, True, "cpu"))
    assert "--amp needs a CUDA --device" in err
    ac = C.amp_autocast(p, True, "cuda")
    with warnings.catch_warnings():  # "CUDA is not available ... Disabling autocast" on a CPU machine
        warnings.simplefilter("ignore")
        cm = ac()
    assert isinstance(cm, torch.autocast) and cm.fast_dtype == torch.bfloat16 and cm.device == "cuda"


def test_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert C.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    assert C.default_threads() == len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        assert C.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "r.json"   # the parent is created
    C.atomic_write_json(str(path), {"a": 1, "b": (1.5, None), "p": tmp_path})
    assert json.loads(path.read_text()) == {"a": 1, "b": [1.5, None], "p": str(tmp_path)}
    assert path.read_text() == json.dumps({"a": 1, "b": [1.5, None], "p": str(tmp_path)}, indent=1)
    C.atomic_write_json(str(path), [2])
    assert json.loads(path.read_text()) == [2]
    C.atomic_write_text(str(path), "ρ ± λ\n")
    assert path.read_text(encoding="utf-8") == "ρ ± λ\n"
    C.atomic_write_jsonl(str(tmp_path / "m.jsonl"), [{"s": 0}, {"s": 1, "v": 2.5}])
    assert (tmp_path / "m.jsonl").read_text() == '{"s": 0}\n{"s": 1, "v": 2.5}\n'
    C.atomic_torch_save({"w": torch.arange(3)}, str(tmp_path / "c.pt"))
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "m.jsonl", "sub"]
    assert os.listdir(tmp_path / "sub") == ["r.json"]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path, exc):
    path = tmp_path / "r.txt"
    path.write_text("old")
    seen = []

    def write(tmp):
        seen.append(tmp)
        with open(tmp, "w") as f:
            f.write("half")
        raise exc

    with pytest.raises(type(exc)):
        C.atomic_write(str(path), write)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.txt"]
    assert os.path.dirname(seen[0]) == str(tmp_path) and seen[0].endswith(".tmp")


def test_strict_json_refuses_nan_before_writing(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(ValueError, match="not JSON compliant"):
        C.atomic_write_json(str(path), {"x": math.nan}, allow_nan=False)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
    C.atomic_write_json(str(path), {"x": math.nan})  # the default, as json.dump
    assert path.read_text() == '{\n "x": NaN\n}'


def test_temp_names_differ_per_write(tmp_path):
    names = []
    for _ in range(2):
        C.atomic_write(str(tmp_path / "f"), lambda tmp: (names.append(tmp), open(tmp, "w").close()))
    assert names[0] != names[1] and str(os.getpid()) in names[0]


# --------------------------------------------------------------------------- help
def test_help_formatter_states_each_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    p = argparse.ArgumentParser(prog="tool", formatter_class=C.HelpFormatter)
    p.add_argument("--n", type=int, default=3, help="count")
    p.add_argument("--on", action="store_true", help="switch on")
    p.add_argument("--no-off", dest="off", action="store_false", help="switch off")
    p.add_argument("--warmup", type=int, default=None, help="warm-up (default: 10%% of --n)")
    p.add_argument("--cap", type=int, default=None, help="a cap")
    text = " ".join(p.format_help().split())
    assert "--n N count (default: 3)" in text
    assert "--on switch on --no-off switch off" in text  # no (default: False) / (default: True)
    assert "--warmup WARMUP warm-up (default: 10% of --n) --cap CAP a cap" in text
    assert text.count("(default") == 2


# --------------------------------------------------------------------------- signals
def test_stop_on_signals_sets_a_flag_and_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in C.STOP_SIGNALS}
    with C.stop_on_signals() as stop:
        assert not stop and stop.signum is None
        stop.check()  # nothing pending: no-op
        os.kill(os.getpid(), signal.SIGTERM)  # the process lives on
        assert stop and stop.signum == signal.SIGTERM
        with C.stop_on_signals() as inner:  # nested: the same request, the same handlers
            assert inner is stop and signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
        with pytest.raises(C.Stopped) as e:
            stop.check()
        assert e.value.signum == signal.SIGTERM and e.value.status == 143 and e.value.name == "SIGTERM"
        assert not isinstance(e.value, KeyboardInterrupt)
        with pytest.raises(C.Stopped) as e:  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        assert e.value.status == 130 and stop.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in C.STOP_SIGNALS} == before
    with C.stop_on_signals() as again:  # a fresh request
        assert not again


def test_stop_on_signals_leaves_an_ignored_signal_ignored_and_other_threads_alone():
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with C.stop_on_signals() as stop:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            assert not stop
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)
    seen = {}

    def worker():
        with C.stop_on_signals() as stop:
            seen["stop"], seen["handler"] = stop, signal.getsignal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not seen["stop"] and seen["handler"] is before and signal.getsignal(signal.SIGINT) is before
