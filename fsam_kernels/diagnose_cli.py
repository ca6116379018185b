"""``fsam-diagnose``: measure the logit path, the functional path and the
sharpness over training, for AdamW, SAM and Functional-SAM.

Subcommands::

    fsam-diagnose text   [options]   # fsam_kernels.lm GPT on the default corpus
    fsam-diagnose vision [options]   # MLP (or small CNN) on scikit-learn's digits
    fsam-diagnose checkpoint CKPT... # fsam-train checkpoints (ckpt/<opt>-seed<k>.pt)
    fsam-diagnose plot JSON... --out PNG   # results JSON, or fsam-train metrics.jsonl

``text`` and ``vision`` train every optimizer of ``--optimizers`` (names and
hyperparameters as ``fsam-train``: adamw, sam, fsam, psam, pfsam; same
initialisation and batches for all) for ``--steps`` steps and, every
``--every`` steps (and at the last step), measure on one fixed held-out
batch (``--eval-batch-size`` examples):

* the decomposition of :func:`fsam_kernels.diagnostics.decompose` with the
  plain direction ``e = rho·g/‖g‖`` at ``--measure-rho`` (default ``--rho``),
  and with the Adam-preconditioned direction at ``--prho`` (keys ``p_*``),
  using each optimizer's own ``exp_avg_sq`` (the preconditioned measurement
  starts at the first step > 0);
* ``lambda_max`` (Lanczos, ``--lanczos-iters``) and ``trace`` (Hutchinson,
  ``--trace-samples``), plus the Gauss-Newton part with ``--gauss-newton``.

The measurement uses the model in eval mode (no dropout in these models
anyway) and does not change the parameters, the optimizer state or the
training RNG, so a run's training trajectory is the same with or without it.
Output: ``--out-json`` (``{"task", "args", "records", "final"}``; one record per
optimizer and measured step; default ``runs/diagnostics/diagnostics-<task>.json``)
and ``--plot`` (a PNG, one panel per quantity, one line per optimizer; default
next to ``--out-json``).

``checkpoint`` loads ``fsam-train`` checkpoints (model + optimizer state),
rebuilds the model and the validation data from the arguments stored in the
checkpoint, and measures on the first validation batch (one record each).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import diagnostics as D
from ._cli import (NONNEG_FLOAT, NONNEG_INT, POSITIVE_FLOAT, POSITIVE_INT, atomic_write_json,
                   check_ranges, device_and_backend)

#: (key, panel title, log scale) of the plot
PANELS = [
    ("delta_logit_norm", "‖δ_logit‖ (plain e)", True),
    ("delta_func_norm", "‖δ_func‖ (plain e)", True),
    ("ratio", "‖δ_logit‖ / ‖δ_func‖ (plain e)", True),
    ("p_ratio", "‖δ_logit‖ / ‖δ_func‖ (preconditioned e)", True),
    ("cross_rel", "‖cross‖ / ‖g_SAM − g‖", True),
    ("lambda_max", "λ_max (Hessian, Lanczos)", True),
    ("trace", "tr H (Hutchinson)", False),
    ("loss", "held-out loss", False),
]

#: where text/vision/checkpoint write their results unless --out-json is given
DEFAULT_OUT_DIR = os.path.join("runs", "diagnostics")

TABLE_KEYS = ("loss", "delta_logit_norm", "delta_func_norm", "ratio", "cross_norm", "cross_rel",
              "cos_logit", "cos_func", "p_ratio", "lambda_max", "trace")


# --------------------------------------------------------------------------- arguments
def _common(p: argparse.ArgumentParser, steps: int, every: int, lr: float, batch: int,
            eval_batch: int) -> None:
    p.add_argument("--optimizers", default="adamw,sam,fsam",
                   help="comma-separated fsam-train optimizer names (default adamw,sam,fsam)")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps (default {steps})")
    p.add_argument("--every", type=int, default=every, help=f"measure every K steps (default {every})")
    p.add_argument("--batch-size", type=int, default=batch, help=f"training batch (default {batch})")
    p.add_argument("--eval-batch-size", type=int, default=eval_batch,
                   help=f"examples in the fixed measurement batch (default {eval_batch})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", default="0.9,0.95")
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--rho", type=float, default=0.05, help="training radius of sam/fsam (default 0.05)")
    p.add_argument("--prho", type=float, default=0.2,
                   help="radius of psam/pfsam and of the preconditioned measurement (default 0.2)")
    p.add_argument("--measure-rho", type=float, default=None,
                   help="radius of the plain-direction measurement (default --rho)")
    p.add_argument("--lanczos-iters", type=int, default=15)
    p.add_argument("--trace-samples", type=int, default=8)
    p.add_argument("--gauss-newton", action="store_true", help="also the Gauss-Newton part")
    p.add_argument("--no-sharpness", action="store_true", help="decomposition only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-json", default=None,
                   help=f"results JSON (default {DEFAULT_OUT_DIR}/diagnostics-<task>.json)")
    p.add_argument("--plot", default=None, help="plot PNG (default: next to --out-json)")


def build_parser() -> argparse.ArgumentParser:
    from .lm.data import add_data_args

    p = argparse.ArgumentParser(prog="fsam-diagnose", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("text", help="GPT (fsam_kernels.lm) on the default corpus")
    _common(t, steps=200, every=50, lr=3e-3, batch=16, eval_batch=16)
    t.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    t.add_argument("--seq-len", type=int, default=64)
    add_data_args(t)
    v = sub.add_parser("vision", help="MLP or CNN on scikit-learn's 8x8 digits")
    _common(v, steps=200, every=50, lr=3e-3, batch=64, eval_batch=256)
    v.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    v.add_argument("--width", type=int, default=128, help="MLP hidden width / CNN channels")
    c = sub.add_parser("checkpoint", help="fsam-train checkpoints")
    c.add_argument("ckpts", nargs="+", metavar="CKPT")
    c.add_argument("--measure-rho", type=float, default=None,
                   help="plain-direction radius (default: the checkpoint's --rho)")
    c.add_argument("--lanczos-iters", type=int, default=15)
    c.add_argument("--trace-samples", type=int, default=8)
    c.add_argument("--gauss-newton", action="store_true")
    c.add_argument("--no-sharpness", action="store_true")
    c.add_argument("--eval-batch-size", type=int, default=None,
                   help="sequences in the measurement batch (default the run's --batch-size)")
    c.add_argument("--cache-dir", default=None, help="token cache directory (as fsam-train)")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--out-json", default=os.path.join(DEFAULT_OUT_DIR, "diagnostics-checkpoints.json"),
                   help="results JSON (default %(default)s)")
    pl = sub.add_parser("plot", help="plot one or more results JSON files")
    pl.add_argument("jsons", nargs="+", metavar="JSON")
    pl.add_argument("--out", required=True, help="PNG path")
    return p


# --------------------------------------------------------------------------- tasks
class DigitsMLP(nn.Module):
    def __init__(self, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, 10))

    def forward(self, x):
        return self.net(x)


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * 16, 10))

    def forward(self, x):
        return self.net(x.view(-1, 1, 8, 8))


def load_digits_split(seed: int = 0, n_eval: int = 297):
    """scikit-learn's digits (1797 8x8 images, 10 classes), pixels / 16,
    a fixed random split: ``(x_train, y_train, x_eval, y_eval)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("fsam-diagnose vision needs scikit-learn (pip install scikit-learn)") from exc
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    ev, tr = perm[:n_eval], perm[n_eval:]
    return x[tr], y[tr], x[ev], y[ev]


def _task_text(args):
    from .lm.data import prepare_from_args, train_batch, val_batches
    from .lm.model import GPT, config_for

    data = prepare_from_args(args, verbose=False)
    (xe, ye), = val_batches(data.val, args.eval_batch_size, args.seq_len, 1)
    train_batch(data.train, 1, args.seq_len, 0, 0)  # DataError now if the split is too short
    cfg = config_for(args.preset, data.vocab_size)

    def make_model():
        return GPT(cfg)

    def batch(step):
        return train_batch(data.train, args.batch_size, args.seq_len, args.seed, step)

    info = {"corpus": data.meta.get("corpus"), "tokenizer": data.meta.get("tokenizer"),
            "vocab_size": data.vocab_size, "model": f"GPT preset {args.preset}", "config": cfg.to_dict()}
    return make_model, D.lm_loss, batch, (xe, ye), info


def _task_vision(args):
    xt, yt, xe, ye = load_digits_split()
    n_eval = min(args.eval_batch_size, len(ye))
    xe, ye = xe[:n_eval], ye[:n_eval]

    def make_model():
        return DigitsMLP(args.width) if args.model == "mlp" else DigitsCNN(args.width)

    def batch(step):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, len(yt), (args.batch_size,), generator=g)
        return xt[idx], yt[idx]

    info = {"dataset": "sklearn digits (8x8)", "n_train": len(yt), "n_eval": n_eval,
            "model": f"{args.model} width {args.width}"}
    return make_model, F.cross_entropy, batch, (xe, ye), info


def measure(model, opt, loss_fn, xe, ye, args, step: int) -> dict:
    """One measurement (see the module docstring) as a flat dict."""
    was = model.training
    model.eval()
    try:
        rho = args.measure_rho if args.measure_rho is not None else args.rho
        rec = D.decompose(model, loss_fn, xe, ye, rho).to_dict()
        if step > 0:
            pre = D.decompose(model, loss_fn, xe, ye, args.prho, optimizer=opt, precondition=True)
            rec.update({f"p_{k}": v for k, v in pre.to_dict().items()})
        if not args.no_sharpness:
            rec.update(D.sharpness(model, loss_fn, xe, ye, lanczos_iters=args.lanczos_iters,
                                   trace_samples=args.trace_samples, seed=args.seed,
                                   gauss_newton=args.gauss_newton))
    finally:
        model.train(was)
    return rec


def run_training(args, task: str) -> dict:
    """Train each optimizer and measure every ``--every`` steps; returns the
    results dict (also written to ``--out-json``)."""
    from .lm.train import OPTIMIZERS, lr_at, make_optimizer, parse_optimizers

    names = parse_optimizers(args.optimizers)
    make_model, loss_fn, batch, (xe, ye), info = (_task_text if task == "text" else _task_vision)(args)
    hp = SimpleNamespace(lr=args.lr, betas=tuple(float(b) for b in args.betas.split(",")), eps=args.eps,
                         weight_decay=args.weight_decay, rho=args.rho, prho=args.prho,
                         backend=args.backend, steps=args.steps,
                         warmup=max(1, min(200, args.steps // 10)), min_lr_ratio=0.1)
    records = []
    t_all = time.time()
    for name in names:
        torch.manual_seed(args.seed)
        model = make_model()
        opt = make_optimizer(name, model, hp)
        passes = 1 if OPTIMIZERS[name][0] is None else 2
        t_train = t_meas = 0.0
        loss_acc, n_acc = 0.0, 0
        for step in range(args.steps + 1):
            if step % args.every == 0 or step == args.steps:
                t0 = time.time()
                rec = {"optimizer": name, "step": step,
                       "train_loss": loss_acc / n_acc if n_acc else None}
                rec.update(measure(model, opt, loss_fn, xe, ye, args, step))
                records.append(rec)
                t_meas += time.time() - t0
                loss_acc, n_acc = 0.0, 0
                print(f"[{task}] {name:>6} step {step:4d}  loss {rec['loss']:.4f}  "
                      f"|d_logit| {rec['delta_logit_norm']:.3e}  |d_func| {rec['delta_func_norm']:.3e}  "
                      f"ratio {_fmt(rec['ratio'])}  cross_rel {_fmt(rec['cross_rel'])}"
                      + (f"  lmax {rec['lambda_max']:.3g}  tr {rec['trace']:.3g}" if 'lambda_max' in rec else ""),
                      file=sys.stderr, flush=True)
            if step == args.steps:
                break
            t0 = time.time()
            x, y = batch(step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, hp)

            def closure():
                z = model(x)
                return z, loss_fn(z, y)

            if passes == 1:
                opt.zero_grad(set_to_none=True)
                _, loss = closure()
                loss.backward()
                opt.step()
            else:
                loss = opt.step(closure)
            loss_acc += float(loss.detach())
            n_acc += 1
            t_train += time.time() - t0
        print(f"[{task}] {name}: train {t_train:.1f}s, measurements {t_meas:.1f}s",
              file=sys.stderr, flush=True)
    final = {}
    for name in names:
        last = [r for r in records if r["optimizer"] == name][-1]
        final[name] = {k: last.get(k) for k in ("step",) + TABLE_KEYS}
    a = {k: v for k, v in vars(args).items() if k not in ("func",)}
    return {"task": task, "info": info, "args": a, "wall_s": round(time.time() - t_all, 1),
            "records": records, "final": final}


#: keys of an fsam-train checkpoint that ``checkpoint`` needs
_CKPT_KEYS = ("model", "optimizer", "step", "signature", "model_config")
_SIG_KEYS = ("lr", "betas", "eps", "weight_decay", "rho", "prho", "corpus", "data", "tokenizer",
             "vocab_size", "val_fraction", "max_chars", "batch_size")


def load_checkpoint(path: str) -> dict:
    """Load an ``fsam-train`` checkpoint on the CPU. Raises ValueError naming
    the path for a missing, unreadable or foreign file."""
    from .lm.train import OPTIMIZERS

    if not os.path.exists(path):
        raise ValueError(f"CKPT {path!r}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"CKPT {path!r} is not a file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # EOFError, UnpicklingError, RuntimeError (zip), ...
        raise ValueError(f"CKPT {path!r} is not a readable fsam-train checkpoint "
                         f"({type(exc).__name__}: {exc})") from None
    missing = [k for k in _CKPT_KEYS if not isinstance(ck, dict) or k not in ck]
    if not missing:
        missing = [f"signature.{k}" for k in _SIG_KEYS if k not in ck["signature"]]
    if missing:
        raise ValueError(f"CKPT {path!r} is not an fsam-train checkpoint (missing {', '.join(missing)})")
    name = os.path.basename(path).split("-seed")[0]
    if name not in OPTIMIZERS:
        raise ValueError(f"CKPT {path!r}: the file name must start with an optimizer name "
                         f"({', '.join(OPTIMIZERS)}) followed by -seed<k>, as fsam-train writes it")
    return ck


def run_checkpoints(args, loaded: dict | None = None) -> dict:
    """Measure each checkpoint of ``args.ckpts`` (``loaded``: path ->
    checkpoint already loaded by :func:`load_checkpoint`)."""
    from .lm.data import prepare, val_batches
    from .lm.model import GPT, GPTConfig
    from .lm.train import make_optimizer

    records = []
    for path in args.ckpts:
        ck = (loaded or {}).get(path) or load_checkpoint(path)
        sig = ck["signature"]
        cfg = GPTConfig(**ck["model_config"])
        model = GPT(cfg)
        model.load_state_dict(ck["model"])
        name = os.path.basename(path).split("-seed")[0]
        hp = SimpleNamespace(lr=sig["lr"], betas=tuple(sig["betas"]), eps=sig["eps"],
                             weight_decay=sig["weight_decay"], rho=sig["rho"], prho=sig["prho"],
                             backend="auto")
        opt = make_optimizer(name, model, hp)
        opt.load_state_dict(ck["optimizer"])
        data = prepare(corpus=sig["corpus"], data=sig["data"], tokenizer=sig["tokenizer"],
                       vocab_size=sig["vocab_size"], val_fraction=sig["val_fraction"],
                       cache_dir=args.cache_dir, max_chars=sig["max_chars"], verbose=False)
        bs = args.eval_batch_size or sig["batch_size"]
        seq = ck.get("seq_len") or sig.get("seq_len") or cfg.block_size
        (xe, ye), = val_batches(data.val, bs, seq, 1)
        ns = SimpleNamespace(measure_rho=args.measure_rho, rho=sig["rho"], prho=sig["prho"],
                             no_sharpness=args.no_sharpness, lanczos_iters=args.lanczos_iters,
                             trace_samples=args.trace_samples, seed=0, gauss_newton=args.gauss_newton)
        rec = {"checkpoint": path, "optimizer": name, "step": ck["step"]}
        rec.update(measure(model, opt, D.lm_loss, xe, ye, ns, ck["step"]))
        records.append(rec)
        print(json.dumps({k: rec.get(k) for k in ("optimizer", "step") + TABLE_KEYS}), flush=True)
    return {"task": "checkpoint", "records": records}


# --------------------------------------------------------------------------- report
def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def format_table(results: dict) -> str:
    """Markdown table of the last measurement of each optimizer."""
    last = {}
    for r in results["records"]:
        last[r["optimizer"]] = r
    gn = any("gn_lambda_max" in r for r in last.values())
    head = ["optimizer", "step", "loss", "‖δ_logit‖", "‖δ_func‖", "ratio", "‖cross‖", "cross/‖Δ‖",
            "cos(δ_logit,Δ)", "cos(δ_func,Δ)", "ratio (precond.)", "λ_max", "trace ± s.e."]
    if gn:
        head += ["GN λ_max", "GN trace"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in last.items():
        cells = [name] + [_fmt(r.get(k)) for k in ("step",) + TABLE_KEYS[:-1]]
        cells.append(f"{_fmt(r.get('trace'))} ± {_fmt(r.get('trace_stderr'), 2)}"
                     if r.get("trace") is not None else "—")
        if gn:
            cells += [_fmt(r.get("gn_lambda_max")), _fmt(r.get("gn_trace"))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results_list, path: str) -> None:
    """One panel per quantity of :data:`PANELS`, one line per (task,
    optimizer); text solid, vision MLP dashed, vision CNN dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    colors = {"adamw": "tab:blue", "sam": "tab:orange", "fsam": "tab:green", "psam": "tab:red",
              "pfsam": "tab:purple"}
    styles = {"text": "-", "vision": "--", "vision-cnn": ":"}
    for ax, (key, title, log) in zip(axes.flat, PANELS):
        for res in results_list:
            task = res.get("task", "?")
            model = (res.get("args") or {}).get("model")
            if task == "vision" and model and model != "mlp":
                task = f"vision-{model}"
            for name in dict.fromkeys(r["optimizer"] for r in res["records"]):
                pts = [(r["step"], r.get(key)) for r in res["records"] if r["optimizer"] == name]
                pts = [(s, v) for s, v in pts if v is not None and math.isfinite(v) and (not log or v > 0)]
                if pts:
                    ax.plot(*zip(*pts), styles.get(task, "-."), marker="o", ms=3,
                            color=colors.get(name), label=f"{task} {name}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_results(path: str) -> dict:
    """A results JSON of ``fsam-diagnose``, or an ``fsam-train`` metrics.jsonl
    written with ``--diagnose-every`` (its ``diag_*`` keys, prefix removed).
    Raises ValueError naming the file for anything else; OSError (missing,
    unreadable) propagates."""
    if path.endswith(".jsonl"):
        recs = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"JSON {path!r} line {i} is not JSON ({exc})") from None
                if isinstance(r, dict) and "diag_delta_logit_norm" in r:
                    d = {k[5:]: v for k, v in r.items() if k.startswith("diag_")}
                    d.update(optimizer=r["optimizer"] + (f"-seed{r['seed']}" if r.get("seed") else ""),
                             step=r["step"])
                    recs.append(d)
        if not recs:
            raise ValueError(f"JSON {path!r} has no diag_* records "
                             "(run fsam-train with --diagnose-every K)")
        return {"task": "text", "records": recs}
    with open(path) as f:
        try:
            res = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"JSON {path!r} is not a JSON file ({exc})") from None
    if not isinstance(res, dict) or not isinstance(res.get("records"), list) or not all(
            isinstance(r, dict) and "optimizer" in r and "step" in r for r in res["records"]):
        raise ValueError(f"JSON {path!r} is not an fsam-diagnose results file "
                         "(expected an object with a 'records' list)")
    return res


def main(argv=None) -> int:
    """Entry point of ``fsam-diagnose``; returns 0 (argument errors exit with
    status 2 and a message naming the argument and the value)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = getattr(args, "threads", None)
    check_ranges(parser, (("--threads", threads, POSITIVE_INT.or_unset()),))
    if threads:
        torch.set_num_threads(threads)
    if args.cmd == "plot":
        res = []
        for p in args.jsons:
            try:
                res.append(load_results(p))
            except FileNotFoundError:
                parser.error(f"JSON {p!r}: no such file")
            except (OSError, UnicodeDecodeError, ValueError) as e:
                parser.error(str(e) if str(e).startswith("JSON ") else f"JSON {p!r} cannot be read ({e})")
        plot(res, args.out)
        for p, r in zip(args.jsons, res):
            print(f"\n{p}:\n{format_table(r)}")
        print(f"wrote {args.out}")
        return 0
    if args.cmd == "checkpoint":
        check_ranges(parser, (
            ("--measure-rho", args.measure_rho, POSITIVE_FLOAT.or_unset()),
            ("--lanczos-iters", args.lanczos_iters, POSITIVE_INT),
            ("--trace-samples", args.trace_samples, POSITIVE_INT),
            ("--eval-batch-size", args.eval_batch_size, POSITIVE_INT.or_unset())))
        from .lm.data import DataError

        try:
            loaded = {p: load_checkpoint(p) for p in args.ckpts}
            res = run_checkpoints(args, loaded)
        except DataError as e:
            parser.error(f"the data of the checkpoint's run: {e}")
        except ValueError as e:
            if not str(e).startswith("CKPT "):
                raise
            parser.error(str(e))
        atomic_write_json(args.out_json, _clean(res), allow_nan=False)
        print(f"wrote {args.out_json}")
        return 0
    check_ranges(parser, (
        ("--steps", args.steps, POSITIVE_INT), ("--every", args.every, POSITIVE_INT),
        ("--batch-size", args.batch_size, POSITIVE_INT),
        ("--eval-batch-size", args.eval_batch_size, POSITIVE_INT),
        ("--lr", args.lr, NONNEG_FLOAT), ("--weight-decay", args.weight_decay, NONNEG_FLOAT),
        ("--eps", args.eps, NONNEG_FLOAT), ("--rho", args.rho, POSITIVE_FLOAT),
        ("--prho", args.prho, POSITIVE_FLOAT),
        ("--measure-rho", args.measure_rho, POSITIVE_FLOAT.or_unset()),
        ("--lanczos-iters", args.lanczos_iters, POSITIVE_INT),
        ("--trace-samples", args.trace_samples, POSITIVE_INT), ("--seed", args.seed, NONNEG_INT)))
    if args.cmd == "vision":
        check_ranges(parser, (("--width", args.width, POSITIVE_INT),))
    try:
        betas = tuple(float(b) for b in args.betas.split(","))
    except ValueError:
        betas = ()
    if len(betas) != 2:
        parser.error(f"--betas must be 'b1,b2', got {args.betas!r}")
    from .lm.train import parse_optimizers

    try:
        parse_optimizers(args.optimizers)
    except ValueError as e:
        parser.error(str(e))
    device_and_backend(parser, "cpu", args.backend)  # the models are trained on the CPU
    if args.cmd == "text":
        from .lm.train import check_preset

        check_ranges(parser, (("--seq-len", args.seq_len, POSITIVE_INT),))
        check_preset(parser, args.preset, args.seq_len)
    out_json = args.out_json or os.path.join(DEFAULT_OUT_DIR, f"diagnostics-{args.cmd}.json")
    out_png = args.plot or os.path.splitext(out_json)[0] + ".png"
    from .lm.data import DataError

    try:
        res = run_training(args, args.cmd)
    except DataError as e:  # raised while preparing the data, before any training
        parser.error(str(e))
    atomic_write_json(out_json, _clean(res), allow_nan=False)
    plot([res], out_png)
    print(format_table(res))
    print(f"wrote {out_json} and {out_png} ({res['wall_s']}s)")
    return 0


def _clean(obj):
    """Non-finite floats -> None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
