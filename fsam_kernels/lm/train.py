"""``fsam-train``: compare AdamW, SAM, Functional-SAM and the preconditioned
variants on a small language model trained on real text.

Example (the ``make train`` run)::

    fsam-train --preset small --optimizers adamw,sam,fsam,psam,pfsam --steps 150 --rho 0.01 --prho 0.003

Optimizer names (``--optimizers``, comma-separated):

======  =====================================================  ==========
name    optimizer                                              rho used
======  =====================================================  ==========
adamw   ``torch.optim.AdamW`` (one forward/backward per step)   --
sam     ``fsam_kernels.SAM(precondition=False)``               ``--rho``
fsam    ``fsam_kernels.FunctionalSAM(precondition=False)``     ``--rho``
psam    ``fsam_kernels.SAM(precondition=True)``                ``--prho``
pfsam   ``fsam_kernels.FunctionalSAM(precondition=True)``      ``--prho``
======  =====================================================  ==========

Defaults ``--rho 0.05`` and ``--prho 0.2`` (*choice*): the perturbation has
Euclidean radius rho in both cases, but the preconditioned direction
``g / (sqrt(v_hat) + eps)`` spreads over all coordinates (each about +-1, like
an Adam update), so its component along the gradient, and hence the loss
change it probes, is smaller at the same radius; preconditioned variants
therefore take a larger rho (the paper, arXiv 2502.02407, tunes rho per
variant). ``make train`` passes ``--rho 0.01 --prho 0.003`` instead: the
radii chosen on the validation split by the ``fsam-sweep`` study
(``bench/results/sweep-shakespeare-cpu/``, preset tiny, 3000 steps, grids
0.003-0.3 and 0.003-0.1: sam and fsam chose 0.01, psam and pfsam 0.003; the
loss of every SAM-family optimizer rose with rho above those values, and
none beat AdamW there). They were chosen for that setting, not re-tuned for
the 150-step small-preset run, which is compute-limited like it (all of the
corpus, far from convergence). The data-limited study, where AdamW has
flattened (``bench/results/sweep-shakespeare-cpu-datalimited/``, preset mini
on 127k tokens for 24 epochs), chose larger radii (sam, fsam, psam 0.1, pfsam
0.03); they fit that regime, not this run.

Measured with ``make train`` (150 steps of 16 x 128 tokens, preset small,
1.34M parameters, one seed, idle 2-core CPU: 268 s in all, data preparation
included), validation loss from 8.321 at step 0 to: adamw 5.766, sam 6.084,
fsam 5.772, psam 5.777, pfsam 5.950 nats/token. Such a short run shows every
optimizer learning, not which is best. (These numbers were measured with the
former ``make train`` radii, the defaults 0.05 / 0.2; for a measured
comparison with seeds and confidence intervals see ``fsam-sweep``,
:mod:`fsam_kernels.lm.sweep`.)

Every (optimizer, seed) run starts from the same initialisation
(``torch.manual_seed(seed)`` before building the model) and sees the same
batches (batch ``k`` is a function of ``(seed, k)`` only, see
:func:`fsam_kernels.lm.data.train_batch`). All runs share one fixed
validation set. Every SAM-family step costs two forward/backward passes;
runs are compared at an equal number of steps (as in the paper).
Each run is a :class:`Trainer` (``evaluate``, ``save``, ``resume``,
``train_step``, ``run``); :func:`train_one` builds, resumes and runs one.

Output directory (``--out``, default ``runs/lm``):

* ``metrics.jsonl``: one JSON object per evaluation: optimizer, seed, step,
  tokens (training tokens seen), train_loss (mean pass-1 loss since the last
  evaluation, nats/token), val_loss (nats/token), lr, elapsed_s (training wall
  seconds, evaluation excluded), tokens_per_s.
* ``summary.json``: the arguments, per-run final results and the table.
* ``loss_curves.png``: validation (solid) and training (dashed) loss per optimizer.
* ``ckpt/<optimizer>-seed<k>.pt``: model + optimizer state_dict + step + RNG
  state + the run's metrics, written at every evaluation and when the run is
  stopped; ``--resume`` continues from them (the data position is the step).

Ctrl-C (SIGINT) or SIGTERM stops fsam-train after the optimizer step in
progress: that step boundary is checkpointed (never a half-updated state)
and the exit status is 130 / 143; ``--resume`` then gives the numbers of an
uninterrupted run (timings aside). A second signal stops at once and keeps
the last checkpoint.

The output layer and its loss (``--head``): ``fused`` (default) computes the
cross-entropy through :class:`fsam_kernels.heads.FusedLinearCrossEntropy`,
which never materialises the (tokens x vocabulary) logits, and Functional-SAM
records only (hidden states, logsumexp, labels) per micro-batch between its
passes; ``plain`` computes the full logits and ``F.cross_entropy`` (and
Functional-SAM keeps the logits-sized cotangent). ``--grad-accum K`` runs K
micro-batches of ``--batch-size`` sequences per optimizer step (pass 1 over
all of them, the ascent, pass 2 over the same ones: :func:`train_step`).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

# resolve_device, check_backend and default_threads live in fsam_kernels._cli (shared by the
# CLIs); imported here also so that fsam_kernels.lm.train.resolve_device etc. keep working
from .._cli import (FRACTION, NONNEG_FLOAT, NONNEG_INT, POSITIVE_INT,  # noqa: F401
                    HelpFormatter, Stopped, amp_autocast, atomic_torch_save, atomic_write_json,
                    atomic_write_jsonl, check_backend, default_threads, device_and_backend,
                    resolve_device, set_threads, stop_on_signals)
from .data import DataError, add_data_args, prepare_from_args, train_batch, val_batches
from .model import GPT, PRESETS, config_for

#: name -> (class name in fsam_kernels or None for AdamW, precondition)
OPTIMIZERS = {
    "adamw": (None, False),
    "sam": ("SAM", False),
    "fsam": ("FunctionalSAM", False),
    "psam": ("SAM", True),
    "pfsam": ("FunctionalSAM", True),
}
DEFAULT_OPTIMIZERS = "adamw,sam,fsam,psam,pfsam"

#: --head choices (fsam_kernels.heads.FusedLinearCrossEntropy, or full logits)
HEADS = ("fused", "plain")

#: what an interrupted run tells the user of fsam-train (Trainer's ``resume_hint``)
RESUME_HINT = "rerun with --resume to continue"

#: arguments that must match for --resume to continue a checkpoint
_RESUME_KEYS = ("preset", "steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup",
                "weight_decay", "betas", "eps", "rho", "prho", "corpus", "data", "tokenizer",
                "vocab_size", "val_fraction", "max_chars", "eval_batches", "amp")


def _betas(text: str) -> str:
    """``--betas``: two floats 'b1,b2', each in [0, 1) (AdamW's range); kept
    as the string (main() and the sweep split it)."""
    parts = text.split(",")
    try:
        vals = [float(b) for b in parts]
    except ValueError:
        vals = []
    if len(vals) != 2:
        raise argparse.ArgumentTypeError(f"expected two floats 'b1,b2', got {text!r}")
    for i, v in enumerate(vals):
        if not (math.isfinite(v) and 0.0 <= v < 1.0):
            raise argparse.ArgumentTypeError(
                f"b{i + 1} = {parts[i].strip()} is outside [0, 1) in {text!r}")
    return text


_POS_INT = POSITIVE_INT.argtype()
_NONNEG_INT = NONNEG_INT.argtype()
_NONNEG = NONNEG_FLOAT.argtype()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fsam-train",
        description="Train a small decoder-only LM with AdamW, SAM, Functional-SAM and the "
                    "preconditioned variants on the same data and initialisation; "
                    "write metrics, a summary, a loss-curve plot and checkpoints.",
        formatter_class=HelpFormatter)
    p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS,
                   help=f"comma-separated subset of {','.join(OPTIMIZERS)}")
    p.add_argument("--steps", type=_POS_INT, default=150, help="optimizer steps per run")
    p.add_argument("--seeds", type=_POS_INT, default=1, help="number of seeds (0 .. S-1) per optimizer")
    p.add_argument("--seed-offset", type=_NONNEG_INT, default=0, help="first seed")
    p.add_argument("--preset", default="small", help=f"model size: {', '.join(PRESETS)}")
    p.add_argument("--batch-size", type=_POS_INT, default=16,
                   help="sequences per micro-batch (per step with --grad-accum 1)")
    p.add_argument("--grad-accum", type=_POS_INT, default=1, metavar="K",
                   help="micro-batches of --batch-size sequences per optimizer step")
    p.add_argument("--head", default="fused", choices=HEADS,
                   help="fused: linear cross-entropy without the logits (fsam_kernels.heads); "
                        "plain: full logits and F.cross_entropy")
    p.add_argument("--seq-len", type=_POS_INT, default=128, help="tokens per sequence (<= the preset's context)")
    p.add_argument("--lr", type=_NONNEG, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=FRACTION.argtype(), default=0.1,
                   help="final lr of the cosine schedule as a fraction of --lr")
    p.add_argument("--warmup", type=_NONNEG_INT, default=None,
                   help="linear warm-up steps (default: 10%% of --steps, at most 200)")
    p.add_argument("--weight-decay", type=_NONNEG, default=0.1,
                   help="decoupled weight decay of matrices and embeddings (LayerNorm weights: 0)")
    p.add_argument("--betas", type=_betas, default="0.9,0.95", help="AdamW betas, 'b1,b2'")
    p.add_argument("--eps", type=_NONNEG, default=1e-8, help="AdamW eps")
    p.add_argument("--rho", type=_NONNEG, default=0.05, help="SAM / Functional-SAM radius")
    p.add_argument("--prho", type=_NONNEG, default=0.2,
                   help="radius of the preconditioned variants (psam, pfsam)")
    p.add_argument("--backend", default="auto", help="fsam_kernels backend of the SAM-family optimizers")
    p.add_argument("--eval-every", type=_POS_INT, default=25, help="evaluate (and checkpoint) every K steps")
    p.add_argument("--diagnose-every", type=_NONNEG_INT, default=0, metavar="K",
                   help="every K steps (a multiple of --eval-every) add the logit/functional path "
                        "decomposition and sharpness of fsam_kernels.diagnostics.diagnose_lm "
                        "(diag_* keys) to metrics.jsonl, on the first validation batch; 0 = off")
    p.add_argument("--eval-batches", type=_POS_INT, default=8, help="validation batches (of --batch-size)")
    p.add_argument("--out", default="runs/lm", help="output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in --out (finished runs are not rerun; "
                        "--out must exist)")
    p.add_argument("--stop-after", type=_NONNEG_INT, default=None, metavar="STEP",
                   help="stop every run at this step (checkpointed, resumable with --resume; "
                        "default: run to --steps)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--threads", type=_POS_INT, default=None,
                   help="CPU threads for torch (default: $OMP_NUM_THREADS or the CPUs this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_args(p)
    return p


# --------------------------------------------------------------------------- helpers
def parse_optimizers(spec: str) -> list[str]:
    """``"adamw,sam"`` -> ``["adamw", "sam"]``. Raises ValueError naming
    ``--optimizers`` for an empty list, an unknown name or a duplicate."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--optimizers is empty; expected a comma-separated subset of "
                         f"{','.join(OPTIMIZERS)}")
    for n in names:
        if n not in OPTIMIZERS:
            raise ValueError(f"--optimizers: unknown optimizer {n!r}; expected a comma-separated "
                             f"subset of {','.join(OPTIMIZERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--optimizers lists a name twice: {spec!r}")
    return names


def check_preset(parser: argparse.ArgumentParser, preset: str, seq_len: int) -> None:
    """``parser.error`` unless ``--preset`` is one of :data:`PRESETS` and
    ``--seq-len`` fits its context (``block_size``)."""
    if preset not in PRESETS:
        parser.error(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    block = PRESETS[preset].block_size
    if seq_len > block:
        parser.error(f"--seq-len {seq_len} exceeds the context (block_size={block}) "
                     f"of --preset {preset}")


def finish_train_args(parser: argparse.ArgumentParser, args) -> None:
    """The checks of the parsed fsam-train options that their ``type=``
    cannot make (exit status 2 through ``parser.error``, naming the option):
    :func:`check_preset`, ``--max-chars`` and ``--vocab-size`` (declared in
    :func:`fsam_kernels.lm.data.add_data_args`). Normalises in place:
    ``args.betas`` from ``'b1,b2'`` (checked by its ``type=``) to a tuple of
    two floats, ``args.data`` to absolute paths. Used by fsam-train and
    fsam-sweep."""
    args.betas = tuple(float(b) for b in args.betas.split(","))
    check_preset(parser, args.preset, args.seq_len)
    if args.data:
        args.data = [os.path.abspath(p) for p in args.data]
    if args.max_chars is not None and args.max_chars < 1:
        parser.error(f"--max-chars: expected an integer >= 1 (characters kept per source), "
                     f"got {args.max_chars}")
    if args.tokenizer == "bpe" and args.vocab_size < 256:
        parser.error(f"--vocab-size: expected an integer >= 256 for the byte-level BPE "
                     f"(256 byte tokens plus merges), got {args.vocab_size}")


def lr_at(step: int, args) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up to ``--lr``
    over ``warmup`` steps, then cosine decay to ``lr * min_lr_ratio`` at
    ``--steps``."""
    warm = args.warmup
    if step < warm:
        return args.lr * (step + 1) / warm
    frac = (step - warm) / max(1, args.steps - warm)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices/embeddings with ``weight_decay``; 1-D parameters
    (LayerNorm weights) without."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(name: str, model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see the module docstring) over ``model``."""
    cls_name, precondition = OPTIMIZERS[name]
    common = dict(lr=args.lr, betas=args.betas, eps=args.eps, weight_decay=args.weight_decay)
    groups = param_groups(model, args.weight_decay)
    if cls_name is None:
        return torch.optim.AdamW(groups, **common)
    import fsam_kernels

    cls = getattr(fsam_kernels, cls_name)
    rho = args.prho if precondition else args.rho
    return cls(groups, rho=rho, precondition=precondition, backend=args.backend, **common)


@torch.no_grad()
def evaluate(model, batches, autocast, head: str = "plain") -> float:
    """Mean cross-entropy (nats/token) over the fixed validation batches
    (``head="fused"``: through the fused head, without the logits)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=batches[0][0].device)
    count = 0
    for x, y in batches:
        with autocast():
            if head == "fused":
                from ..heads import fused_linear_cross_entropy

                s = fused_linear_cross_entropy(model.hidden(x), model.lm_head.weight, y,
                                               reduction="sum")
            else:
                logits = model(x)
                s = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        total += s.double()
        count += y.numel()
    model.train(was_training)
    return float(total.item() / count)


def _resume_signature(args) -> dict:
    sig = {k: getattr(args, k) for k in _RESUME_KEYS}
    sig["grad_accum"] = getattr(args, "grad_accum", 1)  # checkpoints before --grad-accum: 1
    sig["head"] = getattr(args, "head", "plain")         # recorded, not compared (same math)
    return sig


def _resume_mismatch(saved: dict, now: dict) -> dict:
    """{key: (saved, now)} of the signature entries that differ; the head is
    not compared (fused and plain compute the same loss), and a checkpoint
    written before --grad-accum existed counts as --grad-accum 1."""
    out = {}
    for k, v in now.items():
        if k == "head":
            continue
        old = saved.get(k, 1 if k == "grad_accum" else None)
        if old != v:
            out[k] = (old, v)
    return out


def loss_and_output(model, x, y, autocast=contextlib.nullcontext, head: str = "fused"):
    """``(output, loss)`` of one micro-batch, the closure convention of
    fsam_kernels' optimizers: with the fused head the output is the head's
    :class:`~fsam_kernels.heads.HeadOutput` and the loss its ``.loss``; with
    the plain head the logits ``(B, T, V)`` and ``F.cross_entropy`` of them
    (float32). The forward runs under ``autocast()``."""
    if head not in HEADS:
        raise ValueError(f"--head {head!r} is not one of {', '.join(HEADS)}")
    with autocast():
        if head == "fused":
            out = model.fused_loss(x, y)
            return out, out.loss
        logits = model(x)
    return logits, F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def train_step(model, opt, micro_batches, autocast=contextlib.nullcontext,
               head: str = "fused") -> torch.Tensor:
    """One optimizer step over ``micro_batches`` (a list of ``(x, y)``), the
    loss being the mean over them; returns the mean pass-1 loss (detached).

    AdamW: one backward of ``loss / K`` per micro-batch, then ``step()``.
    SAM / FunctionalSAM with one micro-batch: ``opt.step(closure)``. With K > 1
    the two-phase API: pass 1 over every micro-batch (Functional-SAM records
    each one's cotangent: :class:`~fsam_kernels.heads.HeadRecorder` for the
    fused head, :class:`~fsam_kernels.CotangentRecorder` for the logits),
    ``first_step()``, pass 2 over the same micro-batches in the same order
    (SAM: ``loss / K`` at θ+e; Functional-SAM: the replay of each record),
    ``second_step()``.
    """
    from .. import CotangentRecorder
    from ..heads import HeadRecorder
    from ..optim import _SAMBase

    k = len(micro_batches)
    if k < 1:
        raise ValueError("micro_batches: expected at least one (x, y) pair")
    if not isinstance(opt, _SAMBase):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in micro_batches:
            _, loss = loss_and_output(model, x, y, autocast, head)
            (loss / k).backward()
            total = total + loss.detach()
        opt.step()
        return total / k
    if k == 1:
        (x, y), = micro_batches
        return opt.step(lambda: loss_and_output(model, x, y, autocast, head))
    functional = opt._functional
    rec = (HeadRecorder(opt) if head == "fused" else CotangentRecorder()) if functional else None
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in micro_batches:
        out, loss = loss_and_output(model, x, y, autocast, head)
        if rec is not None:
            rec.capture(out)
        (loss / k).backward()
        total = total + loss.detach()
    opt.first_step()
    opt.zero_grad(set_to_none=True)
    try:
        for x, y in micro_batches:
            if not functional:
                _, loss = loss_and_output(model, x, y, autocast, head)
                (loss / k).backward()
            elif head == "fused":
                with autocast():
                    h1 = model.hidden(x)
                rec.replay(h1)
            else:
                with autocast():
                    z1 = model(x)
                rec.replay(z1)
    except BaseException:
        opt.restore()
        raise
    opt.second_step()
    return total / k


# --------------------------------------------------------------------------- one run
class Trainer:
    """One ``fsam-train`` run: optimizer ``name`` (a key of :data:`OPTIMIZERS`)
    trained from seed ``seed`` with the hyperparameters of ``args`` (the
    fsam-train namespace: ``out``, ``steps``, ``stop_after``, ``eval_every``,
    ``diagnose_every``, the model, data, optimizer and schedule options).

    ``data``: an object with ``train`` (the training token array) and
    ``vocab_size``; ``val``: the fixed validation batches, a list of
    ``(x, y)`` int64 tensors of shape ``(batch_size, seq_len)`` on ``device``;
    ``autocast``: a zero-argument context-manager factory (the forward
    passes run under it); ``on_eval(record)``: called after each evaluation,
    once the checkpoint is written; ``resume_hint``: how to continue, printed
    after ``interrupted: <run> checkpointed at step N;`` when the run is
    stopped (fsam-train's :data:`RESUME_HINT`; fsam-sweep passes its own).

    Construction seeds torch with ``seed`` and builds the model and the
    optimizer (every optimizer of a seed starts from the same weights).
    :meth:`resume` continues from the run's checkpoint, :meth:`run` trains
    to ``args.steps`` (or ``args.stop_after``), evaluating and checkpointing
    every ``args.eval_every`` steps (:meth:`evaluate`, :meth:`save`).

    State: ``model``, ``optimizer``, ``step`` (optimizer steps done),
    ``elapsed`` (training wall seconds, evaluation excluded), ``records``
    (this run's evaluation records, in order), ``ckpt_path``
    (``<out>/ckpt/<name>-seed<seed>.pt``) and ``saved_step`` (the step of
    the checkpoint there, None before the first).

    A checkpoint is only ever written at a step boundary: SIGINT / SIGTERM
    during :meth:`run` stop it after the step in progress (see :meth:`run`);
    a KeyboardInterrupt raised inside an update leaves the last checkpoint
    as it was. After that the in-memory state may be half updated: build a
    new Trainer and :meth:`resume`.
    """

    def __init__(self, name: str, seed: int, args, data, val, device,
                 autocast: Callable[[], Any] = contextlib.nullcontext,
                 on_eval: Optional[Callable[[dict], None]] = None,
                 resume_hint: str = RESUME_HINT):
        if name not in OPTIMIZERS:
            raise ValueError(f"Trainer: unknown optimizer {name!r}; expected one of "
                             f"{', '.join(OPTIMIZERS)}")
        self.name, self.seed, self.args, self.val = name, seed, args, val
        self.train_tokens = data.train
        self.device = torch.device(device)
        self.autocast, self.on_eval, self.resume_hint = autocast, on_eval, resume_hint
        self.run_id = f"{name}-seed{seed}"
        self.ckpt_path = os.path.join(args.out, "ckpt", f"{self.run_id}.pt")
        torch.manual_seed(seed)
        self.model_config = config_for(args.preset, data.vocab_size)
        self.model = GPT(self.model_config).to(self.device)
        self.optimizer = make_optimizer(name, self.model, args)
        self.passes_per_step = 1 if OPTIMIZERS[name][0] is None else 2
        self.grad_accum = getattr(args, "grad_accum", 1)
        self.head = getattr(args, "head", "plain")
        self.tokens_per_step = args.batch_size * args.seq_len * self.grad_accum
        self.step, self.elapsed, self.records = 0, 0.0, []
        # pass-1 loss since the last evaluation (a device tensor: no sync per step)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._loss_n = 0
        self.saved_step: Optional[int] = None
        # False while train_step / evaluate change the state (model, optimizer, step, loss sums,
        # records): a KeyboardInterrupt then must not be checkpointed
        self._consistent = True

    def resume(self) -> bool:
        """Continue from :attr:`ckpt_path` when it exists (model, optimizer,
        step, elapsed, records, RNG state, the training-loss sum since the
        last evaluation); returns whether it did. Raises
        ValueError naming ``--resume`` and the differing arguments when the
        checkpoint was written with other arguments (:data:`_RESUME_KEYS`),
        RuntimeError once this trainer has trained or evaluated."""
        if self.step or self.records:
            raise RuntimeError(f"Trainer.resume: {self.run_id} is at step {self.step} with "
                               f"{len(self.records)} evaluation(s); resume before run()")
        if not os.path.exists(self.ckpt_path):
            return False
        ck = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        diff = _resume_mismatch(ck["signature"], _resume_signature(self.args))
        if diff:
            what = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"--resume: checkpoint {self.ckpt_path} was written with other arguments "
                             f"({what}); use the same arguments or another --out")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.step, self.elapsed, self.records = ck["step"], ck["elapsed"], list(ck["records"])
        # checkpoints written at an evaluation (all of them before interrupts were checkpointed
        # between evaluations) have an empty sum
        self._loss_sum.fill_(float(ck.get("loss_sum", 0.0)))
        self._loss_n = int(ck.get("loss_n", 0))
        self.saved_step = self.step
        torch.set_rng_state(ck["rng"]["torch"])
        if ck["rng"].get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"]["cuda"], self.device)
        return True

    def save(self) -> None:
        """Write the checkpoint atomically: model and optimizer state_dict,
        step, elapsed, records, RNG state (torch; CUDA's on a CUDA device),
        the pass-1 loss sum and count since the last evaluation (``loss_sum``
        float, ``loss_n`` int: the next evaluation's train_loss after a
        resume is the uninterrupted run's), model_config and the resume
        signature. Raises RuntimeError when called inside an update (the
        state is not one of a step boundary)."""
        if not self._consistent:
            raise RuntimeError(f"Trainer.save: {self.run_id} is inside step {self.step + 1}; "
                               "a checkpoint is written only between steps")
        dev = self.device
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
        atomic_torch_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                           "step": self.step, "elapsed": self.elapsed, "records": self.records,
                           "loss_sum": float(self._loss_sum.item()), "loss_n": self._loss_n,
                           "rng": rng, "model_config": asdict(self.model_config),
                           "signature": _resume_signature(self.args)}, self.ckpt_path)
        self.saved_step = self.step

    def evaluate(self) -> dict:
        """Evaluate at the current step: the validation loss (nats/token),
        the mean pass-1 training loss since the last evaluation (None at step
        0), lr, timing and, every ``args.diagnose_every`` steps, the
        ``diag_*`` keys of :func:`fsam_kernels.diagnostics.diagnose_lm`.
        Appends the record to :attr:`records`, checkpoints (:meth:`save`),
        calls ``on_eval(record)`` and returns the record."""
        args, step, tps = self.args, self.step, self.tokens_per_step
        train_loss = float(self._loss_sum.item() / self._loss_n) if self._loss_n else None
        rec = {"optimizer": self.name, "seed": self.seed, "step": step, "tokens": step * tps,
               "train_loss": train_loss,
               "val_loss": evaluate(self.model, self.val, self.autocast, self.head),
               "lr": lr_at(max(step - 1, 0), args), "elapsed_s": round(self.elapsed, 3),
               "tokens_per_s": round(step * tps / self.elapsed, 1) if self.elapsed > 0 else None,
               "passes_per_step": self.passes_per_step}
        if args.diagnose_every and step % args.diagnose_every == 0:
            from ..diagnostics import diagnose_lm

            rec.update(diagnose_lm(self.model, self.optimizer, *self.val[0]))
        self._consistent = False
        self.records.append(rec)
        self._loss_sum.zero_()
        self._loss_n = 0
        self._consistent = True
        self.save()
        if self.on_eval is not None:
            self.on_eval(rec)
        return rec

    def train_step(self) -> torch.Tensor:
        """One optimizer step (:func:`train_step` over the step's
        ``grad_accum`` micro-batches at the scheduled lr); returns the mean
        pass-1 loss (0-dim, detached). Only the step itself is timed."""
        args, step, k = self.args, self.step, self.grad_accum
        # micro-batch j of step s is batch s*K + j (K = 1: batch s)
        micro = [train_batch(self.train_tokens, args.batch_size, args.seq_len, self.seed,
                             step * k + j, self.device) for j in range(k)]
        lr = lr_at(step, args)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        self._consistent = False  # from here to step += 1 the state is half updated
        loss = train_step(self.model, self.optimizer, micro, self.autocast, self.head)
        self._loss_sum += loss.double()
        self._loss_n += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.elapsed += time.perf_counter() - t0
        self.step += 1
        self._consistent = True
        return loss

    def summary(self) -> dict:
        """The run's summary: optimizer, seed, steps, tokens, passes_per_step,
        final and initial validation loss, wall_s, finished."""
        return {"optimizer": self.name, "seed": self.seed, "steps": self.step,
                "tokens": self.step * self.tokens_per_step, "passes_per_step": self.passes_per_step,
                "final_val_loss": self.records[-1]["val_loss"],
                "initial_val_loss": self.records[0]["val_loss"], "wall_s": self.elapsed,
                "finished": self.step >= self.args.steps}

    def run(self) -> dict:
        """Train from the current step to ``args.steps`` (or
        ``args.stop_after``), evaluating at step 0 (a fresh run), every
        ``args.eval_every`` steps, at the last step and where ``stop_after``
        stops between evaluations; returns :meth:`summary`.

        Stopping. The run is under :func:`fsam_kernels._cli.stop_on_signals`
        (fsam-sweep's, when it runs one): SIGINT or SIGTERM finishes the step
        (or evaluation) in progress, checkpoints that step boundary
        (:meth:`save`), prints ``interrupted by SIGINT: <run> checkpointed at
        step N; <resume_hint>`` and raises :class:`~fsam_kernels._cli.Stopped`;
        resuming there gives the numbers of the uninterrupted run. A second
        signal stops at once (``Stopped`` from inside the step): nothing is
        written and the last checkpoint stays. A KeyboardInterrupt (not a
        signal while the handlers are installed; e.g. raised by a callback)
        is checkpointed only when it arrives between steps; inside an
        update the last checkpoint stays. Both are re-raised after the
        message."""
        args = self.args
        end = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=self.step, desc=f"{self.run_id:>12}", unit="step",
                   disable=args.no_progress, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        if self.records:
            bar.set_postfix(val=f"{self.records[-1]['val_loss']:.3f}")
        with stop_on_signals() as stop:
            try:
                if self.step == 0 and not self.records:
                    self.evaluate()
                self.model.train()
                while self.step < end and not stop:
                    self.train_step()
                    step = self.step
                    bar.update(1)
                    if step % 5 == 0 or step == end:
                        bar.set_postfix(loss=f"{self._loss_sum.item() / self._loss_n:.3f}",
                                        tok_s=f"{step * self.tokens_per_step / max(self.elapsed, 1e-9):,.0f}")
                    if step % args.eval_every == 0 or step == args.steps:
                        rec = self.evaluate()
                        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val=f"{rec['val_loss']:.3f}",
                                        tok_s=f"{rec['tokens_per_s'] or 0:,.0f}")
                step = self.step
                if not stop and step % args.eval_every != 0 and step != args.steps and step > 0 and (
                        not self.records or self.records[-1]["step"] != step):
                    self.evaluate()  # stopped early by --stop-after between evaluations
                if stop:
                    if self.saved_step != self.step:
                        self.save()
                    self._interrupted(f" by {signal.Signals(stop.signum).name}", True, bar)
            except Stopped as e:  # a second signal, inside a step, an evaluation or the save
                self._interrupted(f" at once by a second {e.name}", False, bar)
                raise
            except KeyboardInterrupt:
                saved = self._consistent
                if saved:
                    self.save()
                self._interrupted("", saved, bar)
                raise
            stop.check()  # Stopped after the checkpoint of the step boundary
        bar.close()
        return self.summary()

    def _interrupted(self, how: str, saved: bool, bar) -> None:
        """The message of a stopped run on stderr: where it was checkpointed
        (``saved``: at the current step), or which checkpoint stays."""
        bar.close()
        if saved:
            where = f"checkpointed at step {self.step}"
        else:
            kept = ("no checkpoint was written yet" if self.saved_step is None
                    else f"its checkpoint of step {self.saved_step} is kept")
            where = (f"not checkpointed at step {self.step}" if self._consistent else
                     f"not checkpointed inside step {self.step + 1} (its parameters and "
                     f"optimizer state may be half updated)") + f"; {kept}"
        print(f"\ninterrupted{how}: {self.run_id} {where}; {self.resume_hint}", file=sys.stderr)


def train_one(name: str, seed: int, args, data, val, device, autocast, records_out: list,
              on_eval, resume_hint: str = RESUME_HINT) -> dict:
    """Train optimizer ``name`` from seed ``seed`` (a :class:`Trainer` with
    ``resume_hint``, resumed from its checkpoint when ``args.resume``);
    returns the run's summary (:meth:`Trainer.summary`).

    Extends ``records_out`` with the run's evaluation records (those of the
    checkpoint first) and calls ``on_eval()`` after each evaluation (which
    rewrites metrics.jsonl)."""
    def hook(rec: dict) -> None:
        records_out.append(rec)
        on_eval()

    trainer = Trainer(name, seed, args, data, val, device, autocast, on_eval=hook, resume_hint=resume_hint)
    if args.resume:
        trainer.resume()
    records_out.extend(trainer.records)
    return trainer.run()


# --------------------------------------------------------------------------- report
def summarize(names: list[str], runs: list[dict]) -> dict:
    """Per optimizer: final validation loss mean and std over seeds (sample
    std, ddof=1; 0 for one seed), steps, tokens and wall seconds (summed over
    seeds)."""
    table = {}
    for n in names:
        rs = [r for r in runs if r["optimizer"] == n]
        if not rs:
            continue
        v = np.array([r["final_val_loss"] for r in rs], dtype=np.float64)
        table[n] = {"val_loss_mean": float(v.mean()),
                    "val_loss_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "initial_val_loss_mean": float(np.mean([r["initial_val_loss"] for r in rs])),
                    "seeds": len(rs), "steps": int(rs[0]["steps"]), "tokens": int(rs[0]["tokens"]),
                    "passes_per_step": rs[0]["passes_per_step"],
                    "wall_s": float(sum(r["wall_s"] for r in rs))}
    return table


def format_table(table: dict) -> str:
    head = f"{'optimizer':<10}{'final val loss':>22}{'(initial)':>11}{'steps':>8}{'tokens':>12}" \
           f"{'passes':>8}{'wall s':>9}"
    lines = [head, "-" * len(head)]
    for n, t in table.items():
        pm = f"{t['val_loss_mean']:.4f} ± {t['val_loss_std']:.4f}" if t["seeds"] > 1 else f"{t['val_loss_mean']:.4f}"
        lines.append(f"{n:<10}{pm:>22}{t['initial_val_loss_mean']:>11.3f}{t['steps']:>8}{t['tokens']:>12,}"
                     f"{t['passes_per_step']:>8}{t['wall_s']:>9.1f}")
    seeds = {t["seeds"] for t in table.values()}
    lines.append(f"(validation cross-entropy in nats/token; mean ± sample std over {max(seeds)} seeds)"
                 if max(seeds) > 1 else "(validation cross-entropy in nats/token; one seed)")
    return "\n".join(lines)


def plot(records: list[dict], names: list[str], path: str, title: str) -> None:
    """Validation (solid, mean over seeds) and training (dashed) loss vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, n in enumerate(names):
        rs = [r for r in records if r["optimizer"] == n]
        if not rs:
            continue
        color = f"C{i}"
        steps = sorted({r["step"] for r in rs})
        val = [np.mean([r["val_loss"] for r in rs if r["step"] == s]) for s in steps]
        ax.plot(steps, val, "-o", ms=3, color=color, label=f"{n} (val)")
        tr = [(s, np.mean([r["train_loss"] for r in rs if r["step"] == s and r["train_loss"] is not None]))
              for s in steps if any(r["step"] == s and r["train_loss"] is not None for r in rs)]
        if tr:
            ax.plot(*zip(*tr), "--", color=color, alpha=0.5, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title + "  (solid: validation, dashed: training)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    """Entry point of ``fsam-train``; returns 0 (argument errors exit with
    status 2 and a message naming the argument). SIGINT (Ctrl-C) and SIGTERM
    during the training stop it at the next step boundary, checkpointed
    there (:meth:`Trainer.run`): main returns 130 and 143 (``128 + signum``),
    and ``--resume`` continues with the numbers of an uninterrupted run. A
    KeyboardInterrupt otherwise also returns 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        names = parse_optimizers(args.optimizers)
    except ValueError as e:
        parser.error(str(e))
    finish_train_args(parser, args)
    if args.warmup is None:
        args.warmup = min(200, max(1, args.steps // 10))
    args.warmup = max(1, args.warmup)
    if args.resume and not os.path.isdir(args.out):
        # (train_one's resume=True on a fresh directory starts from scratch: the
        # sweep relies on that; only the command line asks for an existing run)
        parser.error(f"--resume: --out {args.out!r} does not exist (nothing to continue; "
                     "drop --resume to start a new run there)")

    # the backend is checked also when only adamw runs: a bad value is an error
    device = device_and_backend(parser, args.device, args.backend)
    threads = set_threads(args.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    autocast = amp_autocast(parser, args.amp, device)

    t_start = time.time()
    try:
        data = prepare_from_args(args)
        val = val_batches(data.val, args.batch_size, args.seq_len, args.eval_batches, device)
        train_batch(data.train, 1, args.seq_len, 0, 0)  # checks the split is long enough
    except DataError as e:
        parser.error(str(e))
    os.makedirs(os.path.join(args.out, "ckpt"), exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if not args.resume:
        old = [f for f in os.listdir(os.path.join(args.out, "ckpt")) if f.endswith(".pt")]
        if old:
            print(f"note: {args.out} holds checkpoints from an earlier run; starting fresh and "
                  "overwriting them (pass --resume to continue them instead)", file=sys.stderr)
            for f in old:
                os.remove(os.path.join(args.out, "ckpt", f))
    cfg = config_for(args.preset, data.vocab_size)
    n_params = GPT(cfg).num_params()
    print(f"fsam-train: {data.meta['corpus']} corpus, {data.meta['train_tokens']:,} train / "
          f"{data.meta['val_tokens']:,} val tokens, tokenizer {data.meta['tokenizer']}; "
          f"preset {args.preset} ({n_params / 1e6:.2f}M parameters), {args.steps} steps x "
          f"{args.batch_size} x {args.seq_len} tokens, lr {args.lr}, rho {args.rho}, prho {args.prho}; "
          f"device {device}, {threads} threads", file=sys.stderr)

    records: list[dict] = []
    runs: list[dict] = []

    def flush():
        atomic_write_jsonl(metrics_path, records)

    try:
        with stop_on_signals() as stop:  # one request for all runs (each Trainer.run nests)
            for seed in range(args.seed_offset, args.seed_offset + args.seeds):
                for n in names:
                    stop.check()
                    runs.append(train_one(n, seed, args, data, val, device, autocast, records, flush))
    except ValueError as e:
        if str(e).startswith("--"):
            parser.error(str(e))
        raise
    except Stopped as e:  # SIGINT / SIGTERM: the run in progress checkpointed between steps
        return e.status
    except KeyboardInterrupt:
        return 130
    flush()
    table = summarize(names, runs)
    total_wall = time.time() - t_start
    summary = {"args": {k: v for k, v in vars(args).items()}, "model_config": asdict(cfg),
               "num_params": n_params, "data": data.meta, "runs": runs, "table": table,
               "device": str(device), "threads": threads, "total_wall_s": total_wall}
    atomic_write_json(os.path.join(args.out, "summary.json"), summary)
    plot(records, names, os.path.join(args.out, "loss_curves.png"),
         f"{data.meta['corpus']}, preset {args.preset}, {args.steps} steps")
    print(format_table(table))
    if any(not r["finished"] for r in runs):
        print(f"(stopped at step {args.stop_after} by --stop-after; --resume continues)")
    print(f"wrote metrics.jsonl, summary.json, loss_curves.png under {args.out} "
          f"(total {total_wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
