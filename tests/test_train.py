"""fsam_kernels.lm.train.Trainer: one fsam-train run as an object (evaluate,
save, resume, run), and train_one delegating to it."""
import contextlib
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

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
                       "signature"}
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
