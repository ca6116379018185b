"""``fsam-sweep``: the paper's comparison measured with a ρ sweep, several
seeds, confidence intervals and a compute-matched AdamW baseline.

Example (the committed study, ``bench/results/sweep-shakespeare-cpu/``)::

    fsam-sweep --out runs/sweep --optimizers adamw,sam,fsam,psam,pfsam \\
        --rho 0.003,0.01,0.03,0.1,0.3 --prho 0.01,0.03,0.1,0.3,1.0 --seeds 0,1,2 \\
        --steps 3000 --evals 20 --preset tiny --vocab-size 1024 --seq-len 64 \\
        --batch-size 16 --eval-batches 16 --test-batches 256 --threads 1

Design (following issue 12 and Singh et al., arXiv 2502.02407, which tune ρ
per variant and compare at an equal number of steps):

* Data: three-way split of every source (:func:`fsam_kernels.lm.data.split_three`):
  train | validation (``--val-fraction``) | test (``--test-fraction``).
  Training sees only the training array (the run gets an object holding
  nothing else), the curves and the choice of ρ only the validation split;
  the test split is evaluated once, on each run's final checkpoint, and only
  the report reads it.
* Grid: phase 1 runs AdamW on every seed and every SAM-family optimizer at every ρ of its grid
  (``--rho`` for sam/fsam, ``--prho`` for psam/pfsam) on the selection seeds
  (``--select-seeds``, default the first seed). ρ is chosen per optimizer as
  the grid value with the lowest mean *validation* loss over those seeds
  (loss over the whole validation split at the final step). Phase 2 runs
  the chosen ρ on the remaining seeds and (unless ``--no-compute-matched``)
  ``adamw2x`` on every seed, seed by seed: AdamW with ``2 * --steps`` steps, the same number of forward/backward passes as a SAM-family run
  (two per step), its own warm-up/cosine schedule over its own length.
* Same seed = same initialisation and batches for every optimizer
  (``torch.manual_seed(seed)`` before building the model; batch ``k`` is a
  function of ``(seed, k)``, :func:`fsam_kernels.lm.data.train_batch`), so
  differences to AdamW are paired by seed.
* Every run is one ``fsam-train`` run (:func:`fsam_kernels.lm.train.train_one`, a
  :class:`~fsam_kernels.lm.train.Trainer`)
  in ``<out>/runs/<run id>/``: checkpointed at every evaluation and resumed
  from there; finished runs (``result.json``, written atomically after the
  final test evaluation) are skipped. A sweep killed at any point continues
  where it stopped when started again with the same arguments; extending
  the grid or the seeds reuses the finished runs. Ctrl-C and SIGTERM stop
  it cleanly (the report of the finished runs is written; exit status 130 /
  143, :func:`main`). A run directory is named by :func:`rho_tag` of its ρ.
* Report (``<out>/report.json``, ``report.md``, ``rho.png``,
  ``curves.png``, ``passes.png``): written from whatever runs are finished
  (``--report-only`` writes it without training), missing runs named.
  Per optimizer at the chosen ρ: test loss mean ± 95% confidence interval
  over seeds (Student t, :func:`mean_ci`), the paired difference to AdamW
  on the seeds both finished (:func:`paired_diff`), validation loss, wall
  seconds of training (evaluation excluded) and forward/backward passes; the
  logit/functional path decomposition and sharpness (λ_max, trace) of
  :func:`fsam_kernels.diagnostics.diagnose_lm` on each run's final
  checkpoint, on the first validation batch.

All losses are next-token cross-entropy in nats/token.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from .._cli import (NONNEG_INT, POSITIVE_INT, HelpFormatter, Range, Stopped, amp_autocast,
                    atomic_write_json, atomic_write_jsonl, atomic_write_text, check_ranges,
                    device_and_backend, set_threads, stop_on_signals)
from . import train as T
from .data import DataError, prepare_from_args, val_batches
from .model import GPT, GPTConfig, config_for

#: the names of the grid (``--optimizers``) plus the compute-matched baseline
SAM_FAMILY = ("sam", "fsam", "psam", "pfsam")
PRECONDITIONED = ("psam", "pfsam")
MATCHED = "adamw2x"
#: what a run interrupted mid-training tells the user (fsam-train's says --resume, which
#: fsam-sweep has not: it continues every unfinished run by itself)
RESUME_HINT = "rerun the same fsam-sweep command to continue it"
#: keys of a run's records that measure time, not the computation
TIMING_KEYS = ("elapsed_s", "tokens_per_s", "wall_s", "diag_wall_s", "eval_wall_s")


# --------------------------------------------------------------------------- statistics
def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` in (0, 1) of Student's t distribution with ``df >= 1``
    degrees of freedom (``scipy.stats.t.ppf`` when scipy is installed, else
    bisection on the CDF computed from the regularised incomplete beta
    function by a 20k-interval Simpson integration of the density, accurate to
    about 1e-9). Raises ValueError for p outside (0, 1) or df < 1."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if int(df) != df or df < 1:
        raise ValueError(f"t_quantile: df must be an integer >= 1, got {df}")
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return _t_quantile_numeric(p, int(df))
    return float(student_t.ppf(p, df))


def _t_cdf_upper(t: float, df: int) -> float:
    """P(T > t) for t >= 0, by Simpson integration of the density on [0, t]."""
    if t == 0:
        return 0.5
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    # substitute x = atan(u) to integrate over a bounded interval for large t
    xs = np.linspace(0.0, math.atan(t), 20001)
    u = np.tan(xs)
    f = np.exp(logc - (df + 1) / 2 * np.log1p(u * u / df)) * (1.0 + u * u)
    h = xs[1] - xs[0]
    integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 - float(integral)


def _t_quantile_numeric(p: float, df: int) -> float:
    upper = 1.0 - p if p >= 0.5 else p
    lo, hi = 0.0, 1.0
    while _t_cdf_upper(hi, df) > upper:
        hi *= 2.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if _t_cdf_upper(mid, df) > upper:
            lo = mid
        else:
            hi = mid
    q = 0.5 * (lo + hi)
    return q if p >= 0.5 else -q


@dataclass
class Interval:
    """``mean ± half`` (a ``conf`` two-sided Student-t interval) over ``n``
    values with sample std ``std`` (ddof=1); ``half`` and ``std`` are None
    for ``n < 2``."""

    mean: float | None
    half: float | None
    std: float | None
    n: int
    conf: float = 0.95
    nonfinite: int = 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci_half": self.half, "std": self.std, "n": self.n,
                "conf": self.conf, "nonfinite": self.nonfinite,
                "ci": None if self.half is None else [self.mean - self.half, self.mean + self.half]}

    def fmt(self, digits: int = 4) -> str:
        if self.nonfinite:
            return f"diverged ({self.nonfinite} of {self.n})"
        if self.mean is None:
            return "--"
        if self.half is None:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"


def mean_ci(values, conf: float = 0.95) -> Interval:
    """Mean and two-sided ``conf`` confidence interval of the mean,
    ``mean ± t_{(1+conf)/2, n-1} * s / sqrt(n)`` with the sample std ``s``
    (ddof=1). ``values``: a sequence of floats; none gives mean None, and
    any non-finite value (a diverged run) gives mean None with ``nonfinite``
    counting them (never silently dropped)."""
    v = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64)
    if v.size == 0:
        return Interval(None, None, None, 0, conf)
    if not np.all(np.isfinite(v)):
        return Interval(None, None, None, int(v.size), conf, int((~np.isfinite(v)).sum()))
    if v.size == 1:
        return Interval(float(v[0]), None, None, 1, conf)
    s = float(v.std(ddof=1))
    half = t_quantile(0.5 + conf / 2, v.size - 1) * s / math.sqrt(v.size)
    return Interval(float(v.mean()), float(half), s, int(v.size), conf)


def paired_diff(a: dict, b: dict, conf: float = 0.95) -> Interval:
    """Interval of the mean of ``a[s] - b[s]`` over the keys (seeds) in both
    dicts (the paired difference; :func:`mean_ci` of the differences)."""
    common = sorted(set(a) & set(b))
    return mean_ci([a[s] - b[s] for s in common], conf)


def unigram_loss(train: np.ndarray, tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``tokens`` under the unigram distribution
    of ``train`` with add-one smoothing over ``vocab_size`` ids: the loss of a
    model that ignores context, the level a language model must get well
    below."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(tokens, dtype=np.int64)].mean())


# --------------------------------------------------------------------------- grid
def rho_tag(rho: float) -> str:
    """The text of a radius in run ids, report keys and tables: ``f"{rho:g}"``
    (``0.001`` -> ``"0.001"``, ``0.0`` -> ``"0"``) when that reads back as the
    same float, else ``repr(rho)`` (``0.100000001`` -> ``"0.100000001"``, which
    ``:g`` would round to ``"0.1"``), so distinct radii never share a run
    directory or a table row."""
    g = f"{rho:g}"
    return g if float(g) == rho else repr(float(rho))


@dataclass(frozen=True)
class RunSpec:
    """One training run: optimizer name (``adamw2x`` = AdamW with ``steps``
    already doubled), radius (0 for AdamW), seed, steps, phase
    (``"select"`` / ``"seeds"`` / ``"baseline"``)."""

    name: str
    rho: float
    seed: int
    steps: int
    phase: str

    @property
    def optimizer(self) -> str:
        return "adamw" if self.name == MATCHED else self.name

    @property
    def run_id(self) -> str:
        return f"{self.name}-rho{rho_tag(self.rho)}-seed{self.seed}-steps{self.steps}"

    @property
    def passes_per_step(self) -> int:
        return 2 if self.optimizer in SAM_FAMILY else 1


def parse_list(flag: str, spec: str, kind=float) -> list:
    """``"0.1,0.2"`` -> ``[0.1, 0.2]``; raises ValueError naming ``flag`` for
    an empty list, an unparseable or negative value, or a duplicate."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise ValueError(f"{flag} is empty; expected a comma-separated list of "
                         f"{'numbers' if kind is float else 'integers'}")
    out = []
    for s in items:
        try:
            v = kind(s)
        except ValueError:
            raise ValueError(f"{flag}: {s!r} is not {'a number' if kind is float else 'an integer'}") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{flag}: {s} must be >= 0 (and finite)")
        out.append(v)
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise ValueError(f"{flag} lists {', '.join(map(str, dup))} more than once: {spec!r}")
    return out


def validate_grid(optimizers: list[str], rhos: list[float], prhos: list[float], seeds: list[int],
                  select_seeds: list[int]) -> None:
    """Raise ValueError naming the argument when the grid cannot run: no
    optimizer, a ρ grid empty or negative for an optimizer that needs it,
    no seed, or a selection seed not among ``--seeds``."""
    if not optimizers:
        raise ValueError("--optimizers is empty: the grid has no run")
    if not seeds:
        raise ValueError("--seeds is empty: the grid has no run")
    for flag, grid, used in (("--rho", rhos, any(o in ("sam", "fsam") for o in optimizers)),
                             ("--prho", prhos, any(o in PRECONDITIONED for o in optimizers))):
        if used and not grid:
            raise ValueError(f"{flag} is empty but {flag} optimizers are in --optimizers")
        for r in grid:
            if not (math.isfinite(r) and r >= 0):
                raise ValueError(f"{flag}: rho {r} must be >= 0 (and finite)")
    bad = [s for s in select_seeds if s not in seeds]
    if bad:
        raise ValueError(f"--select-seeds {bad} are not in --seeds {seeds}")
    if not select_seeds:
        raise ValueError("--select-seeds is empty")


def grid_for(name: str, rhos, prhos) -> list[float]:
    if name in PRECONDITIONED:
        return list(prhos)
    if name in SAM_FAMILY:
        return list(rhos)
    return [0.0]


def phase1(optimizers, rhos, prhos, seeds, select_seeds, steps) -> list[RunSpec]:
    """Runs needed before ρ can be chosen, in run order: AdamW on every seed,
    then the ρ grid of each SAM-family optimizer on the selection seeds."""
    out = []
    if "adamw" in optimizers:
        out += [RunSpec("adamw", 0.0, s, steps, "baseline") for s in seeds]
    for n in optimizers:
        if n in SAM_FAMILY:
            out += [RunSpec(n, r, s, steps, "select") for s in select_seeds for r in grid_for(n, rhos, prhos)]
    return out


def phase2(chosen: dict, seeds, select_seeds, steps, matched: bool) -> list[RunSpec]:
    """Seed by seed (so that a sweep stopped early has whole seeds): the
    chosen ρ of each optimizer on the seeds not used for selection, then
    (with ``matched``) the compute-matched AdamW (``2 * steps``) on every seed."""
    out = []
    for s in seeds:
        if s not in select_seeds:
            out += [RunSpec(n, rho, s, steps, "seeds") for n, rho in chosen.items()]
        if matched:
            out.append(RunSpec(MATCHED, 0.0, s, 2 * steps, "baseline"))
    return out


def choose_rho(results: dict, name: str, grid, select_seeds, steps) -> dict:
    """The ρ of ``grid`` with the lowest mean final *validation* loss
    (``val_loss_full``) over ``select_seeds``, among finished grid points.
    Returns ``{"rho", "complete", "val": {rho: mean or None}}``; ``rho`` is
    None when no grid point finished. Reads no test loss."""
    val = {}
    for r in grid:
        vs = [results[k]["val_loss_full"] for s in select_seeds
              if (k := RunSpec(name, r, s, steps, "select").run_id) in results]
        val[r] = float(np.mean(vs)) if len(vs) == len(select_seeds) else None
    done = {r: v for r, v in val.items() if v is not None and math.isfinite(v)}
    rho = min(done, key=lambda r: (done[r], r)) if done else None
    return {"rho": rho, "complete": len(done) == len(grid), "val": val}


# --------------------------------------------------------------------------- one run
def run_one(spec: RunSpec, base_args, data, val, val_full, test, device, autocast,
            diagnose: bool = True) -> dict:
    """Train (or resume) ``spec`` with :func:`fsam_kernels.lm.train.train_one`
    in ``<out>/runs/<run id>/``, then evaluate its final checkpoint on the
    whole validation split (``val_full``) and the test split (``test``), add
    the diagnostics, and write ``result.json`` atomically. ``data`` must hold
    only the training tokens (``train``) and ``vocab_size``. Returns the
    result dict. Raises ValueError starting with ``--out`` when the run's
    checkpoint was written with other settings."""
    rdir = os.path.join(base_args.sweep_out, "runs", spec.run_id)
    os.makedirs(os.path.join(rdir, "ckpt"), exist_ok=True)
    args = argparse.Namespace(**vars(base_args))
    args.out, args.steps, args.resume, args.stop_after = rdir, spec.steps, True, None
    args.rho = args.prho = float(spec.rho)
    args.warmup = min(200, max(1, spec.steps // 10)) if base_args.warmup_arg is None else base_args.warmup_arg
    args.eval_every = max(1, spec.steps // base_args.evals)
    records: list[dict] = []
    mpath = os.path.join(rdir, "metrics.jsonl")
    try:
        summary = T.train_one(spec.optimizer, spec.seed, args, data, val, device, autocast, records,
                              lambda: atomic_write_jsonl(mpath, records), resume_hint=RESUME_HINT)
    except ValueError as e:
        # a checkpoint of other settings (sweep.json, which main() checks first, was lost or edited)
        if str(e).startswith("--resume: "):
            raise ValueError(f"--out {base_args.sweep_out}: run {spec.run_id}: "
                             f"{str(e)[len('--resume: '):]}") from None
        raise
    if not summary["finished"]:
        raise RuntimeError(f"run {spec.run_id} stopped at step {summary['steps']} of {spec.steps}")
    ck = torch.load(os.path.join(rdir, "ckpt", f"{spec.optimizer}-seed{spec.seed}.pt"),
                    map_location=device, weights_only=True)
    if ck["step"] != spec.steps:
        raise RuntimeError(f"run {spec.run_id}: final checkpoint is at step {ck['step']}, not {spec.steps}")
    model = GPT(GPTConfig(**ck["model_config"])).to(device)
    model.load_state_dict(ck["model"])
    t0 = time.perf_counter()
    val_full_loss = T.evaluate(model, val_full, autocast)
    test_loss = T.evaluate(model, test, autocast)  # the only use of the test split
    eval_wall = time.perf_counter() - t0
    result = {"run_id": spec.run_id, "name": spec.name, "optimizer": spec.optimizer, "rho": spec.rho,
              "seed": spec.seed, "steps": spec.steps, "phase": spec.phase,
              # fsam-train's loss head and micro-batches (recorded; older results lack them)
              "head": getattr(args, "head", "plain"), "grad_accum": getattr(args, "grad_accum", 1),
              "passes_per_step": spec.passes_per_step, "passes": spec.steps * spec.passes_per_step,
              "tokens": summary["tokens"], "wall_s": summary["wall_s"],
              "initial_val_loss": summary["initial_val_loss"], "final_val_loss": summary["final_val_loss"],
              "val_loss_full": val_full_loss, "test_loss": test_loss, "eval_wall_s": eval_wall,
              "curve": [{k: r[k] for k in ("step", "train_loss", "val_loss", "lr", "elapsed_s")}
                        for r in records]}
    if diagnose:
        from ..diagnostics import diagnose_lm

        opt = T.make_optimizer(spec.optimizer, model, args)
        opt.load_state_dict(ck["optimizer"])
        t0 = time.perf_counter()
        torch.manual_seed(0)
        result["diagnostics"] = diagnose_lm(model, opt, *val[0], rho=DIAG_RHO, seed=0)
        result["diag_wall_s"] = time.perf_counter() - t0
    atomic_write_json(os.path.join(rdir, "result.json"), result)
    return result


# --------------------------------------------------------------------------- report
def machine() -> dict:
    """CPU model name (lscpu), logical CPUs, torch version, python."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


#: plain radius of the final-checkpoint decomposition, the same for every run
#: (the preconditioned one is the run's own rho, or 0.2 for plain optimizers)
DIAG_RHO = 0.05
DIAG_KEYS = (("diag_lambda_max", "λ_max"), ("diag_trace", "trace"),
             ("diag_delta_logit_norm", "‖δ_logit‖"), ("diag_delta_func_norm", "‖δ_func‖"),
             ("diag_ratio", "logit/func"), ("diag_cos_logit", "cos(δ_logit, SAM)"),
             ("diag_cos_func", "cos(δ_func, SAM)"), ("diag_p_ratio", "logit/func (precond.)"))


def build_report(cfg: dict, results: dict) -> dict:
    """The report dict from the sweep configuration ``cfg`` (as saved in
    ``sweep.json``) and ``results`` (run id -> result of finished runs)."""
    optimizers, seeds, select = cfg["optimizers"], cfg["seeds"], cfg["select_seeds"]
    steps, rhos, prhos, matched = cfg["steps"], cfg["rho"], cfg["prho"], cfg["compute_matched"]
    selection = {n: choose_rho(results, n, grid_for(n, rhos, prhos), select, steps)
                 for n in optimizers if n in SAM_FAMILY}
    chosen = {n: s["rho"] for n, s in selection.items() if s["rho"] is not None}
    planned = phase1(optimizers, rhos, prhos, seeds, select, steps)
    planned += phase2({n: chosen.get(n) for n in selection}, seeds, select, steps, matched)
    missing, done = [], set()
    for sp in planned:
        if sp.rho is None:
            missing.append(f"{sp.name} (ρ not chosen yet) seed {sp.seed}")
        elif sp.run_id in results:
            done.add(sp.run_id)
        else:
            missing.append(sp.run_id)

    def rows_for(name, rho, n_steps):
        return {s: results[k] for s in seeds
                if (k := RunSpec(name, rho, s, n_steps, "").run_id) in results}

    adamw = rows_for("adamw", 0.0, steps) if "adamw" in optimizers else {}
    adamw_test = {s: r["test_loss"] for s, r in adamw.items()}
    table = []
    names = [n for n in optimizers] + ([MATCHED] if matched else [])
    for n in names:
        rho = chosen.get(n) if n in SAM_FAMILY else 0.0
        n_steps = 2 * steps if n == MATCHED else steps
        rs = rows_for(n, rho, n_steps) if rho is not None else {}
        test = {s: r["test_loss"] for s, r in rs.items()}
        row = {"name": n, "rho": rho if n in SAM_FAMILY else None, "steps": n_steps,
               "passes": n_steps * (2 if n in SAM_FAMILY else 1), "seeds_done": sorted(rs),
               "seeds_planned": seeds,
               "rho_complete": selection[n]["complete"] if n in selection else None,
               "test": mean_ci(test.values()).to_dict(),
               "val": mean_ci([r["val_loss_full"] for r in rs.values()]).to_dict(),
               "diff_vs_adamw": (paired_diff(test, adamw_test).to_dict() if n != "adamw" and adamw_test
                                 else None),
               # the same on the seeds that did not choose rho (free of selection bias)
               "diff_vs_adamw_unselected": (
                   paired_diff({s: v for s, v in test.items() if s not in select}, adamw_test).to_dict()
                   if n in SAM_FAMILY and adamw_test else None),
               "wall_s": mean_ci([r["wall_s"] for r in rs.values()]).to_dict(),
               "test_by_seed": {str(s): v for s, v in test.items()},
               "diagnostics": {k: mean_ci([r["diagnostics"][k] for r in rs.values()
                                           if r.get("diagnostics", {}).get(k) is not None]).to_dict()
                               for k, _ in DIAG_KEYS}}
        table.append(row)
    grid = {n: [{"rho": r, **{f"{k}": mean_ci(
        [res[k] for s in seeds if (rid := RunSpec(n, r, s, steps, "").run_id) in results
         for res in (results[rid],)]).to_dict() for k in ("val_loss_full", "test_loss")}}
        for r in grid_for(n, rhos, prhos)] for n in selection}
    cpu_s = sum(r["wall_s"] + r.get("eval_wall_s", 0.0) + r.get("diag_wall_s", 0.0) for r in results.values())
    return {"config": cfg, "selection": {n: {**s, "val": {rho_tag(r): v for r, v in s["val"].items()}}
                                         for n, s in selection.items()},
            "chosen_rho": chosen, "table": table, "grid": grid, "missing": missing,
            # finished runs of the plan (runs_done + len(missing) == runs_planned), and the
            # finished runs under runs/ the plan has not (e.g. adamw2x after --no-compute-matched)
            "runs_done": len(done), "runs_planned": len(planned),
            "runs_outside_plan": sorted(set(results) - done),
            "train_wall_s_total": sum(r["wall_s"] for r in results.values()),
            "run_wall_s_total": cpu_s, "results": results}


def _iv(d: dict) -> Interval:
    return Interval(d["mean"], d["ci_half"], d["std"], d["n"], d["conf"], d.get("nonfinite", 0))


def format_report(rep: dict) -> str:
    """Markdown of the report: the table, the ρ selection, the diagnostics,
    the missing runs."""
    cfg = rep["config"]
    L = [f"# fsam-sweep report ({cfg['corpus_name']}, preset {cfg['train_args']['preset']}, "
         f"{cfg['num_params'] / 1e6:.3f}M parameters)", "",
         f"Runs finished: {rep['runs_done']} of {rep['runs_planned']} planned"
         + (f" (and {len(extra)} finished run{'s' * (len(extra) != 1)} outside the plan, listed at the end)"
            if (extra := rep.get("runs_outside_plan")) else "") + ". "
         f"Training wall time of the finished runs: {rep['train_wall_s_total'] / 3600:.2f} h "
         f"({rep['run_wall_s_total'] / 3600:.2f} h with the final evaluations and diagnostics).", "",
         *([f"Unigram baseline (training-split token frequencies): {cfg['unigram_val_loss']:.4f} validation, "
            f"{cfg['unigram_test_loss']:.4f} test nats/token.", ""] if cfg.get("unigram_test_loss") else []),
         "Test loss (nats/token, held-out test split, final checkpoint): mean ± 95% CI over seeds "
         "(Student t). Δ vs AdamW: paired by seed (same initialisation and batches), mean ± 95% CI; "
         "negative = better than AdamW; the next column leaves out the seeds that chose ρ (their "
         "validation loss picked it, so they favour the chosen ρ). Wall: training seconds per run "
         "(evaluation excluded), "
         "mean over seeds.", "",
         "| optimizer | ρ | steps | passes | seeds | test loss | Δ vs AdamW | Δ, seeds not choosing ρ "
         "| val loss | wall s |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["table"]:
        from_ci = _iv(r["test"])
        d = r["diff_vs_adamw"]
        dfmt = "--" if not d else _iv(d).fmt(4)
        du = r.get("diff_vs_adamw_unselected")
        dufmt = "--" if not du else _iv(du).fmt(4)
        v = r["val"]
        w = r["wall_s"]["mean"]
        rho = "--" if r["rho"] is None else (
            rho_tag(r["rho"]) + ("" if r["rho_complete"] else " (grid incomplete)"))
        L.append(f"| {r['name']} | {rho} | {r['steps']} | {r['passes']} | "
                 f"{len(r['seeds_done'])}/{len(r['seeds_planned'])} | {from_ci.fmt(4)} | {dfmt} | {dufmt} | "
                 f"{_iv(v).fmt(4)} | "
                 f"{'--' if w is None else f'{w:.0f}'} |")
    L += ["", "## ρ selection (validation loss, selection seeds "
          f"{cfg['select_seeds']}; the test column is shown, never used)", "",
          "| optimizer | ρ | val loss | test loss |", "|---|---|---|---|"]
    for n, pts in rep["grid"].items():
        for p in pts:
            mark = " **chosen**" if rep["chosen_rho"].get(n) == p["rho"] else ""
            sel = rep["selection"][n]["val"].get(rho_tag(p["rho"]))
            L.append(f"| {n} | {rho_tag(p['rho'])}{mark} | {'--' if sel is None else f'{sel:.4f}'} | "
                     f"{_iv(p['test_loss']).fmt(4)} |")
    L += ["", "## End-of-training diagnostics (fsam_kernels.diagnostics.diagnose_lm on the first "
          "validation batch, final checkpoint; mean over seeds)", "",
          "| optimizer | " + " | ".join(lbl for _, lbl in DIAG_KEYS) + " |",
          "|---|" + "---|" * len(DIAG_KEYS)]
    for r in rep["table"]:
        vals = [r["diagnostics"][k]["mean"] for k, _ in DIAG_KEYS]
        L.append(f"| {r['name']} | " + " | ".join("--" if v is None else f"{v:.4g}" for v in vals) + " |")
    L += ["", f"λ_max: largest Hessian eigenvalue (Lanczos, 10 iterations); trace: Hutchinson "
          "estimate (5 samples); ‖δ_logit‖, ‖δ_func‖: the logit- and functional-path parts of "
          f"the SAM correction g_SAM − g at the plain ρ = {DIAG_RHO:g} for every run, "
          "'precond.' with the preconditioned direction at the run's own ρ (0.2 for AdamW and "
          "plain SAM/FSAM); see fsam_kernels.diagnostics.decompose."]
    if rep["missing"]:
        L += ["", f"## Missing runs ({len(rep['missing'])})", ""] + [f"- {m}" for m in rep["missing"]]
    if extra:
        L += ["", f"## Finished runs outside the plan ({len(extra)})", "",
              "Under runs/ but not planned by these settings (another grid, seeds or "
              "--no-compute-matched); not in the optimizer table above (the ρ-selection table's "
              "test column counts them at their ρ).", ""] + [f"- {m}" for m in extra]
    return "\n".join(L) + "\n"


def plot_report(rep: dict, out: str) -> list[str]:
    """``rho.png`` (validation and test loss vs ρ per method, error bars =
    95% CI where two or more seeds finished, AdamW as a band), ``curves.png``
    (validation loss vs step at the chosen ρ, mean over seeds) and
    ``passes.png`` (the same vs forward/backward passes). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, results, paths = rep["config"], rep["results"], []
    colors = {n: f"C{i}" for i, n in enumerate(["adamw", "sam", "fsam", "psam", "pfsam", MATCHED])}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, key, title in ((axes[0], "val_loss_full", "validation (chooses ρ)"),
                           (axes[1], "test_loss", "test (reported)")):
        for row in rep["table"]:
            if row["name"] in ("adamw", MATCHED) and row["test"]["n"]:
                st = row["val"] if key == "val_loss_full" else row["test"]
                m, h = st["mean"], st["ci_half"] or 0.0
                ax.axhline(m, color=colors[row["name"]], lw=1, ls="--", label=f"{row['name']} (n={st['n']})")
                if h:
                    ax.axhspan(m - h, m + h, color=colors[row["name"]], alpha=0.12)
        for n, pts in rep["grid"].items():
            xs = [p["rho"] for p in pts if p[key]["n"]]
            ys = [p[key]["mean"] for p in pts if p[key]["n"]]
            es = [p[key]["ci_half"] or 0.0 for p in pts if p[key]["n"]]
            if xs:
                ax.errorbar(xs, ys, yerr=es, fmt="-o", ms=4, capsize=3, color=colors[n], label=n)
        ax.set_xscale("log")
        ax.set_xlabel("ρ")
        ax.set_ylabel(f"final {key.split('_')[0]} loss (nats/token)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("loss vs ρ (error bars: 95% CI over seeds where n ≥ 2)", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out, "rho.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    for fname, xkey, xlabel in (("curves.png", "step", "step"), ("passes.png", "passes", "forward/backward passes")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
        zoom_lo, zoom_ys = None, []
        for row in rep["table"]:
            rs = [results[k] for s in row["seeds_done"]
                  if (k := RunSpec(row["name"], row["rho"] or 0.0, s, row["steps"], "").run_id) in results]
            if not rs:
                continue
            steps = sorted(set.intersection(*[{c["step"] for c in r["curve"]} for r in rs]))
            mult = rs[0]["passes_per_step"] if xkey == "passes" else 1
            xs = [st * mult for st in steps]
            ys = [np.mean([c["val_loss"] for r in rs for c in r["curve"] if c["step"] == st]) for st in steps]
            lbl = (row["name"] + ("" if row["rho"] is None else f" ρ={rho_tag(row['rho'])}")
                   + f" (n={len(rs)})")
            for ax in axes:
                ax.plot(xs, ys, "-", color=colors[row["name"]], label=lbl)
            zoom_lo = xs[-1] / 2 if zoom_lo is None else min(zoom_lo, xs[-1] / 2)
            zoom_ys += [y for x, y in zip(xs, ys) if x >= xs[-1] / 2]
        unigram = cfg.get("unigram_val_loss")
        for ax in axes:
            if unigram:
                ax.axhline(unigram, color="gray", lw=1, ls=":", label=f"unigram ({unigram:.3f})")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss (nats/token)")
            ax.grid(alpha=0.3)
        if zoom_ys:
            axes[0].set_ylim(min(zoom_ys) - 0.05, max(max(zoom_ys) + 0.2, (unigram or 0) + 0.2))
            pad = 0.1 * (max(zoom_ys) - min(zoom_ys)) + 1e-3
            axes[1].set_xlim(left=zoom_lo)
            axes[1].set_ylim(min(zoom_ys) - pad, max(zoom_ys) + pad)
        axes[0].set_title("validation loss at the chosen ρ, mean over seeds", fontsize=9)
        axes[1].set_title("zoom: second half of the shortest run", fontsize=9)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out, fname))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(out: str, cfg: dict, results: dict, plots: bool = True) -> dict:
    rep = build_report(cfg, results)
    # the per-run results (curves, diagnostics) stay in runs/<run id>/result.json
    atomic_write_json(os.path.join(out, "report.json"),
                      {**{k: v for k, v in rep.items() if k != "results"},
                       "results": {rid: f"runs/{rid}/result.json" for rid in sorted(results)}})
    atomic_write_text(os.path.join(out, "report.md"), format_report(rep))
    if plots:
        plot_report(rep, out)
    return rep


def collect_results(out: str) -> dict:
    """Every finished run's result under ``<out>/runs`` (run id -> dict)."""
    res = {}
    rdir = os.path.join(out, "runs")
    if os.path.isdir(rdir):
        for rid in sorted(os.listdir(rdir)):
            p = os.path.join(rdir, rid, "result.json")
            if os.path.exists(p):
                with open(p) as f:
                    res[rid] = json.load(f)
    return res


# --------------------------------------------------------------------------- CLI
#: a sweep needs a test split: --test-fraction in (0, 1)
TEST_FRACTION = Range(float, 0, 1, low_open=True, high_open=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fsam-sweep",
        description="Grid of optimizer x rho x seed: choose rho per optimizer on a validation split, "
                    "report test loss with 95% confidence intervals, the paired difference to AdamW, "
                    "a compute-matched AdamW, wall time, diagnostics and plots. Every fsam-train "
                    "training and data option (--preset, --batch-size, --seq-len, --lr, --warmup, "
                    "--weight-decay, --betas, --eps, --backend, --eval-batches, --device, --corpus, "
                    "--data, --tokenizer, --vocab-size, --val-fraction, --cache-dir, --max-chars, ...) "
                    "is accepted and passed on to every run; the sweep's defaults differ from "
                    "fsam-train's for --preset tiny --vocab-size 1024 --seq-len 64 --batch-size 16 "
                    "--eval-batches 16 (the committed CPU study).",
        formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/sweep", help="sweep directory (runs/, report.*, plots)")
    p.add_argument("--optimizers", default=T.DEFAULT_OPTIMIZERS,
                   help=f"comma-separated subset of {','.join(T.OPTIMIZERS)}")
    p.add_argument("--rho", default="0.003,0.01,0.03,0.1,0.3", help="rho grid of sam and fsam")
    p.add_argument("--prho", default="0.01,0.03,0.1,0.3,1.0", help="rho grid of psam and pfsam")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--select-seeds", default=None,
                   help="seeds on which the rho grid runs and rho is chosen (default: the first of --seeds)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps per run (adamw2x: twice)")
    p.add_argument("--evals", type=int, default=20, help="evaluations (and checkpoints) per run")
    p.add_argument("--no-compute-matched", dest="compute_matched", action="store_false",
                   help="leave out adamw2x (AdamW with 2x the steps)")
    p.add_argument("--test-fraction", type=TEST_FRACTION.argtype(), default=0.05,
                   help="held-out test tail of each source (after the --val-fraction tail), in (0, 1)")
    p.add_argument("--test-batches", type=int, default=256,
                   help="batches (of --batch-size) of the final validation and test evaluations "
                        "(windows at stride seq_len/2, capped by the split's length)")
    p.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                   help="skip the final-checkpoint path decomposition and sharpness")
    p.add_argument("--max-runs", type=int, default=None,
                   help="train at most N runs in this invocation, then write the report "
                        "(default: no limit)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the finished runs under --out and the settings in its "
                        "sweep.json (no data preparation, no training; options other than --no-plots "
                        "are ignored)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: $OMP_NUM_THREADS or the CPUs this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="no PNG plots")
    return p


#: fsam-train options whose sweep default differs (those of the committed study)
TRAIN_DEFAULTS = {"preset": "tiny", "vocab_size": 1024, "seq_len": 64, "batch_size": 16, "eval_batches": 16}

#: fsam-train options the sweep sets itself (a user value is an error)
_OWN = ("--optimizers", "--rho", "--prho", "--seeds", "--seed-offset", "--steps", "--out", "--resume",
        "--stop-after", "--eval-every", "--diagnose-every", "--threads", "--no-progress")


def parse_args(argv=None):
    """(sweep args, fsam-train args namespace). Exits with status 2 and a
    message naming the argument for bad input."""
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    tp = T.build_parser()
    tp.prog = "fsam-sweep"
    tp.set_defaults(**TRAIN_DEFAULTS)
    try:
        names = T.parse_optimizers(args.optimizers)
        rhos = parse_list("--rho", args.rho)
        prhos = parse_list("--prho", args.prho)
        seeds = parse_list("--seeds", args.seeds, int)
        select = parse_list("--select-seeds", args.select_seeds, int) if args.select_seeds else seeds[:1]
        validate_grid(names, rhos, prhos, seeds, select)
    except ValueError as e:
        p.error(str(e))
    check_ranges(p, (("--steps", args.steps, POSITIVE_INT), ("--evals", args.evals, POSITIVE_INT),
                     ("--test-batches", args.test_batches, POSITIVE_INT),
                     ("--max-runs", args.max_runs, NONNEG_INT.or_unset()),
                     ("--threads", args.threads, POSITIVE_INT.or_unset())))
    own = [a for a in rest if a.split("=")[0] in _OWN]
    if own:
        p.error(f"{own[0].split('=')[0]} is set by fsam-sweep per run; use the sweep's own options")
    targs = tp.parse_args(rest)
    # the ranges of fsam-train's options (--batch-size, --lr, ...) were checked by its parser;
    # --betas to a tuple, --preset, --seq-len, --data absolute, --max-chars, --vocab-size
    T.finish_train_args(p, targs)
    targs.warmup_arg = None if targs.warmup is None else max(1, targs.warmup)
    targs.test_fraction = args.test_fraction
    targs.no_progress = args.no_progress
    targs.diagnose_every = 0
    targs.sweep_out = args.out
    targs.evals = args.evals
    args.names, args.rho_grid, args.prho_grid, args.seed_list, args.select_list = names, rhos, prhos, seeds, select
    return args, targs


def _config(args, targs, data_meta, n_params) -> dict:
    # fsam-train's settings of every run; grad_accum and head were added later: a sweep.json
    # without them matches their fsam-train defaults (check_config)
    keep = sorted(set(T._RESUME_KEYS) - {"steps", "rho", "prho"}) + ["backend", "weight_decay", "warmup_arg",
                                                                      "grad_accum", "head"]
    return {"optimizers": args.names, "rho": args.rho_grid, "prho": args.prho_grid, "seeds": args.seed_list,
            "select_seeds": args.select_list, "steps": args.steps, "evals": args.evals,
            "compute_matched": args.compute_matched, "test_fraction": args.test_fraction,
            "test_batches": args.test_batches,
            "train_args": {k: getattr(targs, k) for k in keep if hasattr(targs, k)},
            "corpus_name": data_meta["corpus"], "data": data_meta, "num_params": n_params}


#: config keys that must match for a sweep directory to be continued
_MATCH = ("steps", "evals", "test_fraction", "test_batches", "train_args", "select_seeds")


def check_config(out: str, cfg: dict) -> None:
    """Raise ValueError when ``<out>/sweep.json`` was written with other
    training settings (the grid and the seeds may grow)."""
    path = os.path.join(out, "sweep.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)["config"]
    old_ta, new_ta = old.get("train_args", {}), json.loads(json.dumps(cfg["train_args"]))
    diff = [f"{k} was {old.get(k)!r}, now {cfg[k]!r}" for k in _MATCH if k != "train_args"
            and json.loads(json.dumps(old.get(k))) != json.loads(json.dumps(cfg[k]))]
    # an option fsam-train gained after the sweep started matches when it has its default value
    defaults = json.loads(json.dumps(vars(T.build_parser().parse_args([])), default=str))
    diff += [f"--{k.replace('_', '-')} was {old_ta.get(k)!r}, now {new_ta.get(k)!r}"
             for k in sorted(set(old_ta) | set(new_ta)) if old_ta.get(k) != new_ta.get(k)
             and not (k not in old_ta and k in defaults and new_ta.get(k) == defaults[k])]
    if diff:
        raise ValueError(f"--out {out} holds a sweep with other settings ({'; '.join(diff)}); "
                         "use the same settings or another --out")


def main(argv=None) -> int:
    """Entry point of ``fsam-sweep``. Returns 0 when done (or stopped by
    ``--max-runs``); bad arguments, a ``--out`` holding a sweep of other
    settings and ``--report-only`` without a finished run exit with status 2
    and a message naming the argument.

    Ctrl-C (SIGINT) and SIGTERM stop the sweep cleanly: the report of the
    finished runs is written and main returns 130 (SIGINT) or 143 (SIGTERM),
    128 + the signal number, the status of a process killed by it. The run in
    progress stops at the next step boundary, checkpointed there (the
    Trainer's :meth:`~fsam_kernels.lm.train.Trainer.run`; a signal between
    runs stops before the next one), and continues from there when the same
    command is run again (with the same result as an uninterrupted run).
    The handlers (:func:`fsam_kernels._cli.stop_on_signals`) are installed
    for the training only (in the main thread, and not for a signal that is
    ignored, e.g. SIGINT of a background job) and the previous ones restored
    before the final report is written. A KeyboardInterrupt raised otherwise
    also ends in the report and 130 (the Trainer checkpoints it only between
    steps)."""
    args, targs = parse_args(argv)
    parser = build_parser()
    if args.report_only:
        path = os.path.join(args.out, "sweep.json")
        if not os.path.exists(path):
            parser.error(f"--report-only: {path} does not exist (no sweep was started in --out {args.out})")
        with open(path) as f:
            saved = json.load(f)
        cfg = {**saved["config"], "machine": saved.get("machine"), "command": saved.get("command"),
               "threads": saved.get("threads")}
        found = collect_results(args.out)
        if not found:
            # an empty report would silently replace a good one (per-run results lost or elsewhere)
            parser.error(f"--report-only: no finished runs (runs/<run id>/result.json) under "
                         f"{os.path.join(args.out, 'runs')}; nothing was written")
        rep = write_report(args.out, cfg, found, plots=args.plots)
        print(format_report(rep))
        return 0
    device = device_and_backend(parser, targs.device, targs.backend)
    threads = set_threads(args.threads)
    autocast = amp_autocast(parser, targs.amp, device)
    try:
        data = prepare_from_args(targs)
        val = val_batches(data.val, targs.batch_size, targs.seq_len, targs.eval_batches, device)
        val_full = val_batches(data.val, targs.batch_size, targs.seq_len, args.test_batches, device)
        if len(data.test) < targs.seq_len + 1:
            raise DataError(f"test split has {len(data.test)} tokens, fewer than --seq-len+1 = "
                            f"{targs.seq_len + 1}; use more data or a larger --test-fraction")
        test = val_batches(data.test, targs.batch_size, targs.seq_len, args.test_batches, device)
    except DataError as e:
        parser.error(str(e))
    n_params = GPT(config_for(targs.preset, data.vocab_size)).num_params()
    cfg = _config(args, targs, data.meta, n_params)
    cfg["unigram_val_loss"] = unigram_loss(data.train, data.val, data.vocab_size)
    cfg["unigram_test_loss"] = unigram_loss(data.train, data.test, data.vocab_size)
    os.makedirs(args.out, exist_ok=True)
    try:
        check_config(args.out, cfg)
    except ValueError as e:
        parser.error(str(e))
    cmd = "fsam-sweep " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_json(os.path.join(args.out, "sweep.json"),
                      {"config": cfg, "command": cmd, "machine": machine(), "threads": threads,
                       "device": str(device)})
    cfg["machine"], cfg["command"], cfg["threads"] = machine(), cmd, threads
    train_view = SimpleNamespace(train=data.train, vocab_size=data.vocab_size)  # no val/test here
    print(f"fsam-sweep: {data.meta['corpus']} corpus, {len(data.train):,} train / {len(data.val):,} val / "
          f"{len(data.test):,} test tokens; preset {targs.preset} ({n_params / 1e6:.3f}M parameters); "
          f"{args.steps} steps x {targs.batch_size} x {targs.seq_len}; device {device}, {threads} threads",
          file=sys.stderr)

    results = collect_results(args.out)
    budget = [args.max_runs]

    def run_list(specs, bar, stop):
        for sp in specs:
            if sp.run_id in results:
                continue
            stop.check()  # a signal after the previous run (its final evaluation, the report)
            if budget[0] is not None:
                if budget[0] <= 0:
                    return False
                budget[0] -= 1
            bar.set_description(f"sweep {sp.run_id}")
            results[sp.run_id] = run_one(sp, targs, train_view, val, val_full, test, device, autocast,
                                         diagnose=args.diagnose)
            bar.update(1)
            write_report(args.out, cfg, results, plots=False)
        return True

    status = 0
    from tqdm.auto import tqdm

    p1 = phase1(args.names, args.rho_grid, args.prho_grid, args.seed_list, args.select_list, args.steps)
    n_p2 = sum(1 for n in args.names if n in SAM_FAMILY) * len(
        [s for s in args.seed_list if s not in args.select_list])
    n_p2 += len(args.seed_list) if args.compute_matched else 0
    bar = tqdm(total=len(p1) + n_p2, desc="sweep", unit="run", disable=args.no_progress,
               dynamic_ncols=True, file=sys.stderr, position=0)
    bar.update(sum(1 for sp in p1 if sp.run_id in results))
    try:
        with stop_on_signals() as stop:  # restores the previous handlers before the report
            if run_list(p1, bar, stop):
                chosen = {}
                for n in args.names:
                    if n in SAM_FAMILY:
                        c = choose_rho(results, n, grid_for(n, args.rho_grid, args.prho_grid),
                                       args.select_list, args.steps)
                        if c["rho"] is not None:
                            chosen[n] = c["rho"]
                p2 = phase2(chosen, args.seed_list, args.select_list, args.steps, args.compute_matched)
                bar.update(sum(1 for sp in p2 if sp.run_id in results))
                run_list(p2, bar, stop)
    except Stopped as e:
        print(f"\nstopped by {e.name}: rerun the same command to continue (finished runs are kept; "
              "the run in progress continues from the step where it was checkpointed)", file=sys.stderr)
        status = e.status
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue (finished runs are kept)", file=sys.stderr)
        status = 130
    except ValueError as e:
        if not str(e).startswith("--out "):
            raise
        parser.error(str(e))
    finally:
        bar.close()
    rep = write_report(args.out, cfg, results, plots=args.plots)
    print(format_report(rep))
    print(f"wrote report.json, report.md{', rho.png, curves.png, passes.png' if args.plots else ''} "
          f"under {args.out}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
