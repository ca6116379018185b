"""fsam_kernels.lm.train.Trainer: one fsam-train run as an object (evaluate,
save, resume, run), and train_one delegating to it."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import help_entries
from fsam_kernels._cli import Stopped
from fsam_kernels.lm import train as T
from fsam_kernels.lm.data import val_batches

VOCAB = 48


def _args(out, *extra):
    args = T.build_parser().parse_args(
        ["--preset", "tiny", "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--eval-every", "3",
         "--eval-batches", "1", "--lr", "1e-2", "--warmup", "2", "--no-progress", "--out", str(out),
         "--backend", "reference", *extra])
    args.betas = tuple(float(b) for b in args.betas.split(","))
    return args


@pytest.fixture()
def data():
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=4000).astype(np.int64)
    return SimpleNamespace(train=tokens[:3000], vocab_size=VOCAB), val_batches(tokens[3000:], 2, 16, 1)


def _state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("name", ["adamw", "fsam"])
def test_stop_and_resume_is_bitwise_the_uninterrupted_run(tmp_path, data, name):
    train, val = data
    full = T.Trainer(name, 1, _args(tmp_path / "full"), train, val, "cpu")
    seen = []
    full.on_eval = seen.append
    summary = full.run()
    assert [r["step"] for r in full.records] == [0, 3, 6] and seen == full.records
    assert summary["finished"] and summary["steps"] == 6 and summary["tokens"] == 6 * 2 * 16
    assert summary["final_val_loss"] == full.records[-1]["val_loss"]
    assert summary["initial_val_loss"] == full.records[0]["val_loss"]
    assert full.records[0]["train_loss"] is None and full.records[1]["train_loss"] > 0

    part_args = _args(tmp_path / "part", "--stop-after", "4")
    first = T.Trainer(name, 1, part_args, train, val, "cpu")
    assert not first.resume()  # no checkpoint yet: a fresh start
    s1 = first.run()
    assert not s1["finished"] and s1["steps"] == 4 and [r["step"] for r in first.records] == [0, 3, 4]
    ck = torch.load(first.ckpt_path, weights_only=True)
    assert set(ck) == {"model", "optimizer", "step", "elapsed", "records", "rng", "model_config",
                       "signature", "loss_sum", "loss_n"}
    assert ck["loss_n"] == 0 and ck["loss_sum"] == 0.0  # written at an evaluation
    assert ck["step"] == 4 and ck["records"] == first.records
    assert first.ckpt_path == os.path.join(str(tmp_path / "part"), "ckpt", f"{name}-seed1.pt")

    part_args.stop_after = None
    second = T.Trainer(name, 1, part_args, train, val, "cpu")
    assert second.resume() and second.step == 4 and second.records == first.records
    s2 = second.run()
    assert s2["finished"] and s2["steps"] == 6
    got, want = _state(second), _state(full)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert second.records[-1]["val_loss"] == full.records[-1]["val_loss"]
    assert second.records[-1]["train_loss"] != full.records[-1]["train_loss"]  # mean over 2 vs 3 steps


def test_resume_refuses_other_arguments_and_a_started_trainer(tmp_path, data):
    train, val = data
    t = T.Trainer("adamw", 0, _args(tmp_path, "--stop-after", "3"), train, val, "cpu")
    t.run()
    with pytest.raises(RuntimeError, match="Trainer.resume: adamw-seed0 is at step 3"):
        t.resume()
    other = T.Trainer("adamw", 0, _args(tmp_path, "--lr", "2e-2"), train, val, "cpu")
    with pytest.raises(ValueError, match=r"--resume: checkpoint .*adamw-seed0\.pt.*--lr was 0\.01, now 0\.02"):
        other.resume()
    with pytest.raises(ValueError, match="Trainer: unknown optimizer 'lion'"):
        T.Trainer("lion", 0, _args(tmp_path), train, val, "cpu")


def test_train_one_delegates_to_the_trainer(tmp_path, data):
    train, val = data
    records, calls = [], []
    args = _args(tmp_path, "--stop-after", "3")
    args.resume = True  # on a fresh --out: starts from scratch
    s = T.train_one("sam", 2, args, train, val, torch.device("cpu"), contextlib.nullcontext,
                    records, lambda: calls.append(len(records)))
    assert [r["step"] for r in records] == [0, 3] and calls == [1, 2]
    assert s["steps"] == 3 and s["passes_per_step"] == 2 and not s["finished"]
    args.stop_after = None
    again = []
    s = T.train_one("sam", 2, args, train, val, torch.device("cpu"), contextlib.nullcontext,
                    again, lambda: None)
    assert [r["step"] for r in again] == [0, 3, 6] and again[:2] == records  # checkpoint's first
    assert s["finished"]
    # the same run without the interruption: the same final loss, bitwise
    fresh = _args(tmp_path / "fresh")
    t = T.Trainer("sam", 2, fresh, train, val, "cpu")
    assert t.run()["final_val_loss"] == s["final_val_loss"]


# --------------------------------------------------------------------------- interrupts
TIMING = ("elapsed_s", "tokens_per_s", "wall_s", "total_wall_s")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _same(a, b):
    """Bitwise equality of (nested) state dicts."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _no_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _reference_checkpoint(tmp_path, data, name, step):
    """The checkpoint of the uninterrupted run stopped (by --stop-after) at ``step``."""
    train, val = data
    ref = T.Trainer(name, 1, _args(tmp_path / f"ref{step}", "--stop-after", str(step)), train, val, "cpu")
    ref.run()
    return torch.load(ref.ckpt_path, weights_only=True)


def _wrap(monkeypatch, opt, method, before=None, after=None, call=4):
    """Wrap ``opt.<method>``: on its ``call``-th call (1-based) run ``before()``
    first and ``after()`` once the real method returned."""
    real, calls = getattr(opt, method), [0]

    def wrapped(*a, **kw):
        calls[0] += 1
        if calls[0] == call and before is not None:
            before()
        out = real(*a, **kw)
        if calls[0] == call and after is not None:
            after()
        return out

    monkeypatch.setattr(opt, method, wrapped)
    return calls


@pytest.mark.parametrize("name, method, signum", [
    ("adamw", "step", signal.SIGINT),            # after AdamW's update, before the step is counted
    ("sam", "first_step", signal.SIGINT),        # between the two passes: θ perturbed
    ("fsam", "first_step", signal.SIGTERM),
    ("sam", "second_step", signal.SIGINT),       # after the descent, inside SAM's step()
])
def test_signal_inside_a_step_is_checkpointed_at_the_next_step_boundary(tmp_path, data, monkeypatch,
                                                                        capsys, name, method, signum):
    """A signal that lands inside optimizer step 4 (of 6; evaluations at 0, 3, 6)
    finishes that step, checkpoints step 4 (the state of the uninterrupted run
    after 4 steps, bitwise) and raises Stopped; resuming there gives the
    uninterrupted run's records and weights. (Before, the KeyboardInterrupt
    was checkpointed where it landed: half-updated state under step 3.)"""
    train, val = data
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    t = T.Trainer(name, 1, _args(tmp_path / "int"), train, val, "cpu")
    calls = _wrap(monkeypatch, t.optimizer, method, after=lambda: os.kill(os.getpid(), signum))
    with pytest.raises(Stopped) as e:
        t.run()
    assert e.value.signum == signum and e.value.status == 128 + signum and calls[0] == 4
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # restored
    err = capsys.readouterr().err
    assert (f"interrupted by {signal.Signals(signum).name}: {name}-seed1 checkpointed at step 4; "
            "rerun with --resume to continue") in err
    ck = torch.load(t.ckpt_path, weights_only=True)
    assert ck["step"] == 4 and t.saved_step == 4 and [r["step"] for r in ck["records"]] == [0, 3]
    ref = _reference_checkpoint(tmp_path, data, name, 4)
    assert _same(ck["model"], ref["model"]) and _same(ck["optimizer"], ref["optimizer"])
    assert _same(ck["rng"], ref["rng"]) and ck["loss_n"] == 1

    full = T.Trainer(name, 1, _args(tmp_path / "full"), train, val, "cpu")
    full.run()
    again = T.Trainer(name, 1, _args(tmp_path / "int"), train, val, "cpu")
    assert again.resume() and again.step == 4
    assert again.run()["finished"]
    assert _no_timing(again.records) == _no_timing(full.records)  # train_loss included
    got, want = _state(again), _state(full)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def _sigint_twice():
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("name, method, where, act, exc, how", [
    # after AdamW's update of step 5 (parameters and moments of step 5, the step counter still 4)
    ("adamw", "step", "after", _raise_keyboard_interrupt, KeyboardInterrupt, ""),
    # two SIGINTs before SAM's ascent: the second stops at once
    ("sam", "first_step", "before", _sigint_twice, Stopped, " at once by a second SIGINT"),
])
def test_an_interrupt_inside_an_update_keeps_the_last_checkpoint(tmp_path, data, monkeypatch, capsys,
                                                                 name, method, where, act, exc, how):
    """A KeyboardInterrupt, or a second signal, inside step 5 is not
    checkpointed: the checkpoint of step 3 (the last evaluation) stays, equal
    to the uninterrupted run's, and save() refuses the half-updated state.
    (Before, the state of step 5 was saved as step 4.)"""
    train, val = data
    t = T.Trainer(name, 1, _args(tmp_path / "ki"), train, val, "cpu")
    _wrap(monkeypatch, t.optimizer, method, call=5, **{where: act})
    with pytest.raises(exc):
        t.run()
    err = capsys.readouterr().err
    assert (f"interrupted{how}: {name}-seed1 not checkpointed inside step 5 (its parameters and optimizer "
            "state may be half updated); its checkpoint of step 3 is kept; rerun with --resume") in err
    ck = torch.load(t.ckpt_path, weights_only=True)
    ref = _reference_checkpoint(tmp_path, data, name, 3)
    assert ck["step"] == 3 and _same(ck["model"], ref["model"]) and _same(ck["optimizer"], ref["optimizer"])
    with pytest.raises(RuntimeError, match=f"Trainer.save: {name}-seed1 is inside step 5"):
        t.save()


def test_a_keyboard_interrupt_between_steps_is_checkpointed_there(tmp_path, data, capsys):
    train, val = data
    t = T.Trainer("adamw", 1, _args(tmp_path / "ki"), train, val, "cpu")

    def on_eval(rec):  # after the evaluation (and checkpoint) of step 3
        if rec["step"] == 3:
            raise KeyboardInterrupt

    t.on_eval = on_eval
    with pytest.raises(KeyboardInterrupt):
        t.run()
    assert "interrupted: adamw-seed1 checkpointed at step 3; rerun with --resume" in capsys.readouterr().err
    assert torch.load(t.ckpt_path, weights_only=True)["step"] == 3


def _corpus(path):
    path.write_text("".join(f"line {i:04d}: the quick brown fox {i % 13} jumps\n" for i in range(400)))
    return path


def _train_argv(tmp_path, out, *extra):
    return ["--data", str(_corpus(tmp_path / "c.txt")), "--tokenizer", "bytes", "--cache-dir",
            str(tmp_path / "cache"), "--max-chars", "5000", "--preset", "tiny", "--seq-len", "16",
            "--batch-size", "4", "--eval-batches", "2", "--steps", "40", "--eval-every", "10",
            "--optimizers", "adamw,sam", "--rho", "0.05", "--backend", "reference", "--no-progress",
            "--threads", "1", "--out", str(out), *extra]


def _outputs(out):
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    table = {n: {k: v for k, v in t.items() if k not in TIMING} for n, t in summary["table"].items()}
    return _no_timing(records), _no_timing(summary["runs"]), table


def test_fsam_train_sigint_then_resume_equals_the_uninterrupted_run(tmp_path):
    """fsam-train in a subprocess, SIGINT during the sam run: exit status 130,
    the resume advice; ``--resume`` then writes the metrics, final losses
    and table of the uninterrupted run (timings aside)."""
    out = tmp_path / "int"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.Popen([sys.executable, "-m", "fsam_kernels.lm.train", *_train_argv(tmp_path, out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # sam's step-0 evaluation is written
        if metrics.exists() and '"sam"' in metrics.read_text():
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "interrupted by SIGINT: sam-seed0 checkpointed at step" in stderr and "Traceback" not in stderr
    assert "rerun with --resume to continue" in stderr and not (out / "summary.json").exists()
    step = torch.load(out / "ckpt" / "sam-seed0.pt", weights_only=True)["step"]
    assert 0 <= step < 40
    assert T.main(_train_argv(tmp_path, out, "--resume")) == 0
    assert T.main(_train_argv(tmp_path, tmp_path / "ref")) == 0
    assert _outputs(out) == _outputs(tmp_path / "ref")


def test_fsam_train_main_returns_143_on_sigterm(tmp_path, monkeypatch, capsys):
    """SIGTERM inside step 5 of fsam-train: checkpointed at step 5, exit status
    143 (128 + SIGTERM), the handlers restored; --resume finishes."""
    real_batch, sent = T.train_batch, []

    def sigterm_batch(tokens, bs, sl, seed, step, device="cpu"):
        if step == 4 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(tokens, bs, sl, seed, step, device)

    monkeypatch.setattr(T, "train_batch", sigterm_batch)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "term"
    assert T.main(_train_argv(tmp_path, out, "--optimizers", "adamw")) == 143
    assert signal.getsignal(signal.SIGTERM) is handler
    assert ("interrupted by SIGTERM: adamw-seed0 checkpointed at step 5; rerun with --resume to continue"
            in capsys.readouterr().err)
    assert T.main(_train_argv(tmp_path, out, "--optimizers", "adamw", "--resume")) == 0
    assert T.main(_train_argv(tmp_path, tmp_path / "ref", "--optimizers", "adamw")) == 0
    assert _outputs(out) == _outputs(tmp_path / "ref")


# --------------------------------------------------------------------------- help
def test_help_states_each_default_once():
    """No ``(default: False)`` on flags (--amp, --resume, --no-progress), one
    default on options whose help states it (--warmup, --threads), none for
    options unset by default."""
    help_text, entries = help_entries(T.build_parser())
    assert "(default: False)" not in help_text and "(default: True)" not in help_text
    assert "(default: None)" not in help_text
    for flag in ("--amp", "--resume", "--no-progress"):
        assert "default" not in entries[flag], entries[flag]
    assert entries["--amp"] == "--amp bfloat16 autocast on CUDA"
    for flag, default in (("--warmup", "10% of --steps, at most 200"),
                          ("--threads", "$OMP_NUM_THREADS or the CPUs this process may use"),
                          ("--steps", "150"), ("--out", "runs/lm"), ("--rho", "0.05"),
                          ("--betas", "0.9,0.95")):
        assert entries[flag].count("(default") == 1 and entries[flag].endswith(f"(default: {default})"), \
            entries[flag]
    for flag in ("--corpus", "--vocab-size", "--val-fraction"):  # their help says "(default x)"
        assert entries[flag].count("(default") == 1, entries[flag]
    assert "(default" not in entries["--stop-after"] and "(default" not in entries["--data"]
