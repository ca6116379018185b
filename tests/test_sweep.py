"""fsam-sweep: statistics, the three-way split, resume and bad input.

Everything runs on a synthetic corpus written here (numbered lines, byte
tokenizer, preset tiny, a few steps), so a token's position in the corpus can
be read back from its text.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import help_entries
from fsam_kernels._cli import atomic_write_json
from fsam_kernels.lm import data as lmdata
from fsam_kernels.lm import sweep as S
from fsam_kernels.lm import train as lmtrain

N_LINES = 600


def corpus(test_words="omega"):
    """Numbered lines of equal length; ``test_words`` changes only the words
    of lines inside the last 10% (the test tail of ``--test-fraction 0.1``)."""
    lines = []
    for i in range(N_LINES):
        w = "alpha beta" if i < int(N_LINES * 0.9) + 5 else f"{test_words:<5.5} gamm"
        lines.append(f"L{i:04d} {w} {i % 7}")
    return "\n".join(lines) + "\n"


def line_numbers(text):
    return {int(m) for m in re.findall(r"L(\d{4})", text)}


# --------------------------------------------------------------------------- statistics
T_TABLE = {  # two-sided 95% (p = 0.975), from the closed forms / standard tables
    1: 12.706204736174704, 2: 4.302652729749464, 3: 3.182446305284263,
    4: 2.7764451051977987, 9: 2.2621571628540993, 29: 2.045229642132703}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_numeric_matches_table(df):
    # the scipy-free path, checked against closed forms (df 1, 2) and tables
    assert S._t_quantile_numeric(0.975, df) == pytest.approx(T_TABLE[df], rel=1e-7)
    assert S._t_quantile_numeric(0.025, df) == pytest.approx(-T_TABLE[df], rel=1e-7)
    p = 0.9
    if df == 1:
        assert S._t_quantile_numeric(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-7)
    if df == 2:
        assert S._t_quantile_numeric(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-7)


def test_t_quantile_against_scipy():
    st = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 10, 40):
        for p in (0.6, 0.95, 0.975, 0.995, 0.01):
            assert S.t_quantile(p, df) == pytest.approx(st.t.ppf(p, df), rel=1e-9)
            assert S._t_quantile_numeric(p, df) == pytest.approx(st.t.ppf(p, df), rel=1e-7)


def test_t_quantile_bad_input():
    with pytest.raises(ValueError, match="p must be in"):
        S.t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be an integer >= 1"):
        S.t_quantile(0.9, 0)


def test_mean_ci_by_hand():
    v = [1.0, 2.0, 3.0, 4.0]
    iv = S.mean_ci(v)
    s = math.sqrt(sum((x - 2.5) ** 2 for x in v) / 3)  # 1.2909944
    assert iv.mean == pytest.approx(2.5) and iv.std == pytest.approx(s) and iv.n == 4
    assert iv.half == pytest.approx(T_TABLE[3] * s / 2.0, rel=1e-9)
    d = iv.to_dict()
    assert d["ci"] == pytest.approx([2.5 - iv.half, 2.5 + iv.half])
    st = pytest.importorskip("scipy.stats")
    lo, hi = st.t.interval(0.95, 3, loc=2.5, scale=s / 2.0)
    assert d["ci"] == pytest.approx([lo, hi], rel=1e-9)


def test_mean_ci_edge_cases():
    assert S.mean_ci([]).mean is None
    one = S.mean_ci([3.0])
    assert one.mean == 3.0 and one.half is None and one.fmt() == "3.0000 (n=1)"
    bad = S.mean_ci([1.0, float("nan"), 2.0])
    assert bad.mean is None and bad.nonfinite == 1 and "diverged" in bad.fmt()


def test_paired_diff_uses_common_seeds_only():
    a = {0: 1.0, 1: 2.0, 2: 4.0}
    b = {0: 0.5, 1: 1.0, 2: 3.0, 3: 9.0}  # seed 3 has no partner
    iv = S.paired_diff(a, b)
    d = np.array([0.5, 1.0, 1.0])
    assert iv.n == 3 and iv.mean == pytest.approx(d.mean())
    assert iv.half == pytest.approx(T_TABLE[2] * d.std(ddof=1) / math.sqrt(3), rel=1e-9)
    # pairing removes the shared per-seed offset: same differences, any offset
    shift = {0: 10.0, 1: -3.0, 2: 7.0}
    iv2 = S.paired_diff({s: a[s] + shift[s] for s in a}, {s: b[s] + shift[s] for s in a})
    assert iv2.mean == pytest.approx(iv.mean) and iv2.half == pytest.approx(iv.half)


# --------------------------------------------------------------------------- split
def test_split_three_covers_in_order():
    text = corpus()
    tr, va, te = lmdata.split_three(text, 0.1, 0.1)
    assert tr + va + te == text
    assert abs(len(te) - 0.1 * len(text)) < 30 and abs(len(va) - 0.1 * len(text)) < 30
    assert te.startswith("L") and va.startswith("L")  # cut at line starts
    assert lmdata.split_three(text, 0.1, 0.0) == (*lmdata.split_tail(text, 0.1), "")


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_prepare_three_way_split_is_disjoint(tmp_path, tokenizer):
    (tmp_path / "c.txt").write_text(corpus())
    d = lmdata.prepare(data=[str(tmp_path / "c.txt")], tokenizer=tokenizer, vocab_size=300,
                       val_fraction=0.1, test_fraction=0.1, cache_dir=str(tmp_path / "cache"), verbose=False)
    tr, va, te = (line_numbers(d.tokenizer.decode(a.tolist())) for a in (d.train, d.val, d.test))
    assert tr and va and te
    assert max(tr) < min(va) and max(va) < min(te) and max(te) == N_LINES - 1  # index ranges
    assert d.meta["test_tokens"] == len(d.test) and d.meta["test_fraction"] == 0.1
    # content hashes: no test line (text) occurs in the training or validation split
    lines = corpus().splitlines()
    test_lines = {lines[i] for i in te}
    for arr in (d.train, d.val):
        txt = d.tokenizer.decode(arr.tolist())
        assert not any(line in txt for line in test_lines)
    # the cache of the two-way split is a different one (old keys unchanged)
    d2 = lmdata.prepare(data=[str(tmp_path / "c.txt")], tokenizer=tokenizer, vocab_size=300,
                        val_fraction=0.1, cache_dir=str(tmp_path / "cache"), verbose=False)
    assert d2.test is None and d2.meta["cache"] != d.meta["cache"]


def test_prepare_rejects_bad_test_fraction(tmp_path):
    (tmp_path / "c.txt").write_text(corpus())
    with pytest.raises(lmdata.DataError, match="--test-fraction"):
        lmdata.prepare(data=[str(tmp_path / "c.txt")], tokenizer="bytes", val_fraction=0.5,
                       test_fraction=0.5, cache_dir=str(tmp_path / "cache"), verbose=False)


# --------------------------------------------------------------------------- sweeps
def sweep_argv(tmp_path, out, text_file, *extra):
    return ["--out", str(out), "--data", str(text_file), "--tokenizer", "bytes", "--cache-dir",
            str(tmp_path / "cache"), "--val-fraction", "0.1", "--test-fraction", "0.1",
            "--preset", "tiny", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "2",
            "--test-batches", "4", "--steps", "6", "--evals", "2", "--optimizers", "adamw,sam",
            "--rho", "0.05,0.5", "--seeds", "0,1", "--no-progress", "--no-plots", "--threads", "1",
            *extra]


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in S.TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def results(out):
    return {k: strip_timing(v) for k, v in S.collect_results(str(out)).items()}


@pytest.fixture()
def texts(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b" / "a.txt"
    b.parent.mkdir()
    a.write_text(corpus())
    b.write_text(corpus("zeta"))  # differs from a only inside the test tail
    assert len(a.read_text()) == len(b.read_text())
    return a, b


def test_sweep_resume_and_no_test_leak(tmp_path, texts, monkeypatch, capsys):
    a, b = texts
    seen_train, seen_val = [], []
    real_train_one = lmtrain.train_one

    def spy_train_one(name, seed, args, data, val, *rest, **kw):
        assert set(vars(data)) == {"train", "vocab_size"}  # training gets no val/test array
        tok = lmdata.ByteTokenizer()
        seen_train.append(line_numbers(tok.decode(np.asarray(data.train).tolist())))
        seen_val.append(set().union(*(line_numbers(tok.decode(x.flatten().tolist())) for x, _ in val)))
        return real_train_one(name, seed, args, data, val, *rest, **kw)

    monkeypatch.setattr(lmtrain, "train_one", spy_train_one)
    # 1. uninterrupted, with the diagnostics
    assert S.main(sweep_argv(tmp_path, tmp_path / "full", a)) == 0
    full = results(tmp_path / "full")
    # phase 1: adamw x 2 seeds, sam x 2 rho on seed 0, adamw2x x 2 seeds; phase 2: sam seed 1
    assert len(full) == 7 and {r["name"] for r in full.values()} == {"adamw", "sam", "adamw2x"}
    assert all("diag_lambda_max" in r["diagnostics"] for r in full.values())
    rep = json.load(open(tmp_path / "full" / "report.json"))
    assert rep["missing"] == [] and rep["runs_done"] == 7
    test_start = min(line_numbers(lmdata.split_three(corpus(), 0.1, 0.1)[2]))
    assert int(N_LINES * 0.9) - 2 <= test_start <= int(N_LINES * 0.9) + 2
    assert all(max(s) < test_start for s in seen_train + seen_val)
    n_calls = len(seen_train)

    # 2. the same sweep killed twice: after 2 runs (--max-runs), then by an error mid-run
    real_batch = lmtrain.train_batch
    state = {"raised": False}

    def failing_batch(tokens, bs, sl, seed, step, device="cpu"):
        if seed == 1 and step == 4 and not state["raised"]:
            state["raised"] = True
            raise RuntimeError("simulated crash")
        return real_batch(tokens, bs, sl, seed, step, device)

    part = tmp_path / "part"
    assert S.main(sweep_argv(tmp_path, part, a, "--max-runs", "2")) == 0
    assert len(S.collect_results(str(part))) == 2
    rep = json.load(open(part / "report.json"))
    assert len(rep["missing"]) == 5  # the report marks what is not done
    monkeypatch.setattr(lmtrain, "train_batch", failing_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        S.main(sweep_argv(tmp_path, part, a))
    crashed = [r for r in os.listdir(part / "runs") if not (part / "runs" / r / "result.json").exists()]
    assert len(crashed) == 1 and "seed1" in crashed[0]  # checkpointed at step 3, no result
    before = len(seen_train)
    done_before = set(S.collect_results(str(part)))
    assert S.main(sweep_argv(tmp_path, part, a)) == 0
    rerun = {r for r in os.listdir(part / "runs")}
    assert len(seen_train) - before == 7 - len(done_before)  # finished runs were skipped
    assert results(part) == full  # identical to the uninterrupted sweep
    assert rerun == set(full)

    # 2b. Ctrl-C (a real SIGINT) inside a step of seed 1: 130, the report of the finished runs,
    # no --resume advice (fsam-sweep has none); the rerun gives the uninterrupted results
    state["raised"] = False

    def sigint_batch(tokens, bs, sl, seed, step, device="cpu"):
        if seed == 1 and step == 4 and not state["raised"]:
            state["raised"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(tokens, bs, sl, seed, step, device)

    monkeypatch.setattr(lmtrain, "train_batch", sigint_batch)
    ctrlc = tmp_path / "ctrlc"
    handler = signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    assert S.main(sweep_argv(tmp_path, ctrlc, a)) == 130
    err = capsys.readouterr().err
    assert state["raised"] and signal.getsignal(signal.SIGINT) is handler  # handler restored
    assert "stopped by SIGINT: rerun the same command" in err and "--resume" not in err
    rep = json.load(open(ctrlc / "report.json"))
    assert 1 <= rep["runs_done"] < 7 and rep["runs_done"] + len(rep["missing"]) == rep["runs_planned"]
    assert S.main(sweep_argv(tmp_path, ctrlc, a)) == 0
    assert results(ctrlc) == full

    # 3. another test tail: training, validation and the choice of rho unchanged, test loss not
    other = tmp_path / "other"
    monkeypatch.setattr(lmtrain, "train_batch", real_batch)
    assert S.main(sweep_argv(tmp_path, other, b, "--no-diagnose")) == 0
    res_b = results(other)
    assert set(res_b) == set(full)
    for k, r in full.items():
        assert res_b[k]["curve"] == r["curve"] and res_b[k]["val_loss_full"] == r["val_loss_full"]
        assert res_b[k]["test_loss"] != r["test_loss"]
    rep_b = json.load(open(other / "report.json"))
    assert rep_b["chosen_rho"] == json.load(open(tmp_path / "full" / "report.json"))["chosen_rho"]
    assert n_calls == 7


def test_choose_rho_reads_validation_only():
    res = {}
    for rho, val, test in ((0.1, 3.0, 9.0), (0.3, 2.5, 1.0), (1.0, 2.7, 0.5)):
        sp = S.RunSpec("psam", rho, 0, 10, "select")
        res[sp.run_id] = {"val_loss_full": val, "test_loss": test}
    c = S.choose_rho(res, "psam", [0.1, 0.3, 1.0], [0], 10)
    assert c["rho"] == 0.3 and c["complete"]
    for r in res.values():
        r["test_loss"] = -r["test_loss"]  # any test numbers: same choice
    assert S.choose_rho(res, "psam", [0.1, 0.3, 1.0], [0], 10)["rho"] == 0.3
    del res[S.RunSpec("psam", 0.3, 0, 10, "").run_id]
    c = S.choose_rho(res, "psam", [0.1, 0.3, 1.0], [0], 10)
    assert c["rho"] == 1.0 and not c["complete"] and c["val"][0.3] is None


@pytest.mark.parametrize("extra, message", [
    (["--optimizers", "adamw,lion"], "unknown optimizer 'lion'"),
    (["--optimizers", ""], "--optimizers is empty"),
    (["--rho", ""], "--rho is empty"),
    (["--prho", "0.1,-0.2"], "--prho: -0.2 must be >= 0"),
    (["--rho=-1"], "--rho: -1 must be >= 0"),
    (["--seeds", "0,1,0"], "--seeds lists 0 more than once"),
    (["--seeds", ""], "--seeds is empty"),
    (["--select-seeds", "5"], r"--select-seeds \[5\] are not in --seeds"),
    (["--steps", "0"], "--steps 0 is out of range"),
    # a sweep needs a test split (0 once crashed with a TypeError after preparing the data)
    (["--test-fraction", "0"],
     r"argument --test-fraction: 0 is out of range: expected a finite float in \(0, 1\)"),
    (["--test-fraction=-0.1"], "argument --test-fraction: -0.1 is out of range"),
    (["--test-fraction", "1"], "argument --test-fraction: 1 is out of range"),
    (["--seed-offset", "3"], "--seed-offset is set by fsam-sweep"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input(tmp_path, capsys, extra, message):
    argv = sweep_argv(tmp_path, tmp_path / "bad", tmp_path / "none.txt")
    with pytest.raises(SystemExit) as e:
        S.main(argv + extra)
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_other_settings_in_same_out_are_refused(tmp_path, texts, capsys):
    a, _ = texts
    out = tmp_path / "o"
    assert S.main(sweep_argv(tmp_path, out, a, "--max-runs", "1", "--no-diagnose")) == 0
    with pytest.raises(SystemExit):
        S.main(sweep_argv(tmp_path, out, a, "--max-runs", "0", "--lr", "0.01"))
    assert "--lr was 0.003, now 0.01" in capsys.readouterr().err
    # --report-only reads the saved settings, needs no data (and a finished run)
    assert S.main(["--out", str(out), "--report-only", "--no-plots"]) == 0
    assert json.load(open(out / "report.json"))["runs_done"] == 1


def test_unigram_loss_by_hand():
    train = np.array([0, 0, 1, 2])  # counts + 1 over 4 ids: 3, 2, 2, 1 (of 8)
    got = S.unigram_loss(train, np.array([0, 3]), 4)
    assert got == pytest.approx(-(math.log(3 / 8) + math.log(1 / 8)) / 2)


def test_new_fsam_train_option_at_its_default_still_matches(tmp_path):
    cfg = {k: None for k in S._MATCH}
    cfg["train_args"] = {"lr": 0.003}
    atomic_write_json(str(tmp_path / "sweep.json"), {"config": cfg})
    S.check_config(str(tmp_path), {**cfg, "train_args": {"lr": 0.003, "eval_batches": 8}})  # default
    with pytest.raises(ValueError, match="--eval-batches was None, now 9"):
        S.check_config(str(tmp_path), {**cfg, "train_args": {"lr": 0.003, "eval_batches": 9}})


def test_build_report_on_synthetic_results():
    cfg = {"optimizers": ["adamw", "sam"], "seeds": [0, 1, 2], "select_seeds": [0], "steps": 10,
           "rho": [0.1, 0.2], "prho": [], "compute_matched": True}
    res = {}

    def add(name, rho, seed, steps, val, test):
        sp = S.RunSpec(name, rho, seed, steps, "")
        res[sp.run_id] = {"val_loss_full": val, "test_loss": test, "wall_s": 1.0, "curve": [],
                          "passes_per_step": sp.passes_per_step}

    adamw = {0: 3.0, 1: 3.2, 2: 2.9}
    for s, v in adamw.items():
        add("adamw", 0.0, s, 10, v, v)
        add("adamw2x", 0.0, s, 20, v - 0.1, v - 0.1 + 0.01 * s)
    add("sam", 0.1, 0, 10, 3.5, 3.5)   # worse on validation ...
    add("sam", 0.2, 0, 10, 3.4, 9.9)   # ... than 0.2, whatever the test loss says
    add("sam", 0.2, 1, 10, 0.0, 3.3)
    rep = S.build_report(cfg, res)
    assert rep["chosen_rho"] == {"sam": 0.2}
    assert rep["missing"] == [S.RunSpec("sam", 0.2, 2, 10, "").run_id]
    rows = {r["name"]: r for r in rep["table"]}
    assert rows["adamw"]["test"]["mean"] == pytest.approx(np.mean(list(adamw.values())))
    sam = rows["sam"]
    assert sam["seeds_done"] == [0, 1] and sam["test"]["mean"] == pytest.approx((9.9 + 3.3) / 2)
    d = np.array([9.9 - 3.0, 3.3 - 3.2])
    assert sam["diff_vs_adamw"]["mean"] == pytest.approx(d.mean())
    assert sam["diff_vs_adamw"]["ci_half"] == pytest.approx(T_TABLE[1] * d.std(ddof=1) / math.sqrt(2))
    assert sam["diff_vs_adamw_unselected"]["n"] == 1
    assert sam["diff_vs_adamw_unselected"]["mean"] == pytest.approx(0.1)
    m = rows["adamw2x"]["diff_vs_adamw"]
    assert m["mean"] == pytest.approx(-0.09) and m["n"] == 3 and m["ci_half"] == pytest.approx(
        T_TABLE[2] * np.std([-0.1, -0.09, -0.08], ddof=1) / math.sqrt(3))
    md = S.format_report({**rep, "config": {**cfg, "corpus_name": "x", "num_params": 1,
                                            "train_args": {"preset": "tiny"}}})
    assert "| sam | 0.2 | 10 | 20 | 2/3 |" in md and "Missing runs (1)" in md
    assert rep["runs_done"] == 9 and rep["runs_planned"] == 10 and rep["runs_outside_plan"] == []
    assert "Runs finished: 9 of 10 planned. " in md
    # the same results without the compute-matched baseline: its runs are finished, not planned
    rep = S.build_report({**cfg, "compute_matched": False}, res)
    assert rep["runs_done"] == 6 and rep["runs_planned"] == 7 and len(rep["missing"]) == 1
    assert rep["runs_outside_plan"] == sorted(S.RunSpec("adamw2x", 0.0, s, 20, "").run_id for s in adamw)
    md = S.format_report({**rep, "config": {**cfg, "corpus_name": "x", "num_params": 1,
                                            "train_args": {"preset": "tiny"}}})
    assert "Runs finished: 6 of 7 planned (and 3 finished runs outside the plan, listed at the end). " in md
    tail = md.split("\n## Finished runs outside the plan (3)\n\n")[1].splitlines()  # the last section
    assert tail[1:] == ["", "- adamw2x-rho0-seed0-steps20", "- adamw2x-rho0-seed1-steps20",
                        "- adamw2x-rho0-seed2-steps20"]
    assert "| adamw2x |" not in md and "Missing runs (1)" in md


def test_committed_sweep_results_are_not_git_ignored():
    """The per-run result.json files a study exports under bench/results/<study>/runs/
    must be committable (an ignore pattern matching ``runs/`` at any depth once kept
    them out of the repository while the README said they were there)."""
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git") is None or not os.path.isdir(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    paths = ["bench/results/sweep-shakespeare-cpu/runs/adamw-rho0-seed0-steps3000/result.json",
             "bench/results/any-study/runs/x/result.json", "bench/results/x.json"]
    r = subprocess.run(["git", "check-ignore", "--no-index", "-v", *paths], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == "", f"ignored by git: {r.stdout}"
    # the sweep's own scratch directory at the top level stays ignored
    r = subprocess.run(["git", "check-ignore", "--no-index", "-q", "runs/sweep/runs/x/result.json"],
                       cwd=root)
    assert r.returncode == 0


# --------------------------------------------------------------------------- reviewer findings
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = [os.path.join(REPO, "bench", "results", d)
           for d in ("sweep-shakespeare-cpu", "sweep-shakespeare-cpu-6000", "sweep-shakespeare-cpu-datalimited")]
#: the committed studies whose per-run results are committed (report.md can be rebuilt)
STUDIES_WITH_RUNS = [os.path.join(REPO, "bench", "results", d) for d in (
    "sweep-shakespeare-cpu-6000", "sweep-shakespeare-cpu-datalimited",
    "sweep-shakespeare-cpu-datalimited/adamw-scaling/steps1500",
    "sweep-shakespeare-cpu-datalimited/adamw-scaling/steps12000")]


@pytest.mark.parametrize("study", STUDIES_WITH_RUNS, ids=lambda d: d.split("results" + os.sep)[-1])
def test_committed_report_is_rebuilt_from_the_committed_results(tmp_path, study):
    """Every number in a committed study's report.md follows from its committed
    runs/<run id>/result.json files and sweep.json: --report-only on a copy
    rewrites report.md byte for byte (the README tables quote these files)."""
    assert os.path.exists(os.path.join(study, "sweep.json")), f"the committed study {study} is missing"
    copy = tmp_path / "study"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("*.png", "report.*"))
    assert S.main(["--out", str(copy), "--report-only", "--no-plots"]) == 0
    with open(os.path.join(study, "report.md"), "rb") as f, open(copy / "report.md", "rb") as g:
        assert f.read() == g.read()


@pytest.mark.parametrize("study", STUDIES, ids=os.path.basename)
def test_committed_study_settings_still_match_with_grad_accum_and_head(tmp_path, study):
    """The committed sweep.json files predate --grad-accum and --head in the
    compared settings: their own command still matches them (the fsam-train
    defaults), another --grad-accum or --head does not."""
    assert os.path.exists(os.path.join(study, "sweep.json")), f"the committed study {study} is missing"
    saved = json.load(open(os.path.join(study, "sweep.json")))
    assert not {"grad_accum", "head"} & set(saved["config"]["train_args"])
    shutil.copy(os.path.join(study, "sweep.json"), tmp_path / "sweep.json")
    argv = saved["command"].split()[1:]
    argv[argv.index("--out") + 1] = str(tmp_path)

    def cfg(*extra):
        args, targs = S.parse_args(argv + list(extra))
        return S._config(args, targs, saved["config"]["data"], saved["config"]["num_params"])

    assert {"grad_accum": 1, "head": "fused"}.items() <= cfg()["train_args"].items()
    S.check_config(str(tmp_path), cfg())
    S.check_config(str(tmp_path), cfg("--grad-accum", "1", "--head", "fused"))
    with pytest.raises(ValueError, match="--grad-accum was None, now 2"):
        S.check_config(str(tmp_path), cfg("--grad-accum", "2"))
    with pytest.raises(ValueError, match="--head was None, now 'plain'"):
        S.check_config(str(tmp_path), cfg("--head", "plain"))


def test_other_grad_accum_or_head_on_an_interrupted_sweep_is_a_parser_error(tmp_path, texts, monkeypatch,
                                                                           capsys):
    a, _ = texts
    out = tmp_path / "o"
    argv = sweep_argv(tmp_path, out, a, "--optimizers", "adamw", "--seeds", "0", "--no-compute-matched",
                      "--no-diagnose")
    real_batch = lmtrain.train_batch

    def crash(tokens, bs, sl, seed, step, device="cpu"):
        if step == 4:
            raise RuntimeError("simulated crash")
        return real_batch(tokens, bs, sl, seed, step, device)

    monkeypatch.setattr(lmtrain, "train_batch", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        S.main(argv)
    monkeypatch.setattr(lmtrain, "train_batch", real_batch)
    ckpt = out / "runs" / "adamw-rho0-seed0-steps6" / "ckpt" / "adamw-seed0.pt"
    assert ckpt.exists() and not (ckpt.parent.parent / "result.json").exists()
    capsys.readouterr()
    for extra, message in ((["--grad-accum", "2"], "--grad-accum was 1, now 2"),
                           (["--head", "plain"], "--head was 'fused', now 'plain'")):
        with pytest.raises(SystemExit) as e:
            S.main(argv + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--out {out} holds a sweep with other settings ({message})" in err
    # without sweep.json (lost), the run's checkpoint is still checked: a parser error naming it
    os.remove(out / "sweep.json")
    with pytest.raises(SystemExit) as e:
        S.main(argv + ["--grad-accum", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {out}: run adamw-rho0-seed0-steps6: checkpoint" in err and "--grad-accum was 1, now 2" in err
    assert "Traceback" not in err
    os.remove(out / "sweep.json")  # written by the refused start
    assert S.main(argv) == 0 and len(S.collect_results(str(out))) == 1


def test_rho_tag_keeps_the_g_form_and_separates_close_radii():
    for r in (0.0, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.3, 1.0, 2.5e-7, 1e-12, 3.0):
        assert S.rho_tag(r) == f"{r:g}"  # every committed run directory keeps its name
    assert S.RunSpec("sam", 0.001, 0, 6000, "").run_id == "sam-rho0.001-seed0-steps6000"
    assert S.RunSpec("adamw", 0.0, 2, 6000, "").run_id == "adamw-rho0-seed2-steps6000"
    rng = np.random.default_rng(0)
    for r in [0.100000001, 0.1 + 1e-17, 1 / 3, 0.1234567, *rng.uniform(0, 1, 50)]:
        assert float(S.rho_tag(r)) == r  # the tag reads back as the same float
    assert S.rho_tag(0.100000001) == "0.100000001" != S.rho_tag(0.1)
    assert S.RunSpec("sam", 0.1, 0, 6, "").run_id != S.RunSpec("sam", 0.100000001, 0, 6, "").run_id


def test_close_radii_get_their_own_runs(tmp_path, texts):
    a, _ = texts
    out = tmp_path / "close"
    assert S.main(sweep_argv(tmp_path, out, a, "--optimizers", "sam", "--rho", "0.1,0.100000001",
                             "--seeds", "0", "--no-compute-matched", "--no-diagnose")) == 0
    assert sorted(os.listdir(out / "runs")) == ["sam-rho0.1-seed0-steps6", "sam-rho0.100000001-seed0-steps6"]
    rep = json.load(open(out / "report.json"))
    assert rep["runs_done"] == rep["runs_planned"] == 2 and rep["missing"] == []
    assert set(rep["selection"]["sam"]["val"]) == {"0.1", "0.100000001"}
    assert all(v is not None for v in rep["selection"]["sam"]["val"].values())
    md = (out / "report.md").read_text()
    assert "Runs finished: 2 of 2 planned." in md
    assert re.search(r"\| sam \| 0\.1(\*\*chosen\*\*| \*\*chosen\*\*)? \| \d", md)
    assert re.search(r"\| sam \| 0\.100000001( \*\*chosen\*\*)? \| \d", md)


def test_report_only_without_finished_runs_writes_nothing(tmp_path, capsys):
    """A study directory whose per-run results are gone (the committed 3000-step
    study lost them): --report-only refuses instead of overwriting its report."""
    study = STUDIES[0]
    names = ["sweep.json", "report.md", "report.json", "rho.png", "curves.png", "passes.png"]
    missing = [n for n in names if not os.path.exists(os.path.join(study, n))]
    assert not missing, f"the committed study {study} lacks {missing}"
    out = tmp_path / "copy"
    out.mkdir()
    for n in names:
        shutil.copy(os.path.join(study, n), out / n)
    (out / "runs" / "adamw-rho0-seed0-steps3000").mkdir(parents=True)  # unfinished: no result.json
    before = {n: (out / n).read_bytes() for n in names}
    for extra in ([], ["--no-plots"]):
        with pytest.raises(SystemExit) as e:
            S.main(["--out", str(out), "--report-only", *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--report-only: no finished runs (runs/<run id>/result.json) under {out / 'runs'}" in err
        assert "nothing was written" in err
        assert {n: (out / n).read_bytes() for n in names} == before
        assert sorted(os.listdir(out)) == sorted(names + ["runs"])


def test_help_states_each_default_once():
    help_text, entries = help_entries(S.build_parser())
    assert "(default: True)" not in help_text and "(default: False)" not in help_text
    for flag in ("--no-compute-matched", "--no-diagnose", "--no-plots", "--no-progress", "--report-only"):
        assert "(default" not in entries[flag], entries[flag]
    assert entries["--no-plots"] == "--no-plots no PNG plots"
    for flag, default in (("--select-seeds", "the first of --seeds"), ("--max-runs", "no limit"),
                          ("--threads", "$OMP_NUM_THREADS or the CPUs this process may use"),
                          ("--steps", "3000"), ("--test-fraction", "0.05"), ("--out", "runs/sweep")):
        assert entries[flag].count("(default:") == 1 and entries[flag].endswith(f"(default: {default})"), \
            entries[flag]


def test_keyboard_interrupt_advice_of_sweep_and_train(tmp_path, texts, monkeypatch, capsys):
    """A KeyboardInterrupt inside a step: the Trainer checkpoints and says how to
    continue, in fsam-sweep's words for the sweep and fsam-train's for fsam-train."""
    a, _ = texts
    real_batch = lmtrain.train_batch

    def interrupt(tokens, bs, sl, seed, step, device="cpu"):
        if step == 4:
            raise KeyboardInterrupt
        return real_batch(tokens, bs, sl, seed, step, device)

    monkeypatch.setattr(lmtrain, "train_batch", interrupt)
    out = tmp_path / "ki"
    argv = sweep_argv(tmp_path, out, a, "--optimizers", "adamw", "--seeds", "0", "--no-compute-matched",
                      "--no-diagnose")
    assert S.main(argv) == 130
    err = capsys.readouterr().err
    assert ("interrupted: adamw-seed0 checkpointed at step 4; rerun the same fsam-sweep command to "
            "continue it") in err
    assert "--resume" not in err and (out / "report.md").exists()
    monkeypatch.setattr(lmtrain, "train_batch", real_batch)
    assert S.main(argv) == 0 and len(S.collect_results(str(out))) == 1

    monkeypatch.setattr(lmtrain, "train_batch", interrupt)
    targv = ["--data", str(a), "--tokenizer", "bytes", "--cache-dir", str(tmp_path / "cache"), "--preset", "tiny",
             "--seq-len", "16", "--batch-size", "4", "--eval-batches", "2", "--steps", "6", "--eval-every", "3",
             "--optimizers", "adamw", "--no-progress", "--threads", "1", "--out", str(tmp_path / "train")]
    assert lmtrain.main(targv) == 130
    err = capsys.readouterr().err
    assert "interrupted: adamw-seed0 checkpointed at step 4; rerun with --resume to continue" in err


def test_sigterm_stops_cleanly_and_the_rerun_finishes_identically(tmp_path, texts):
    """SIGTERM to a running fsam-sweep (a subprocess): exit status 143 after the
    report of the finished runs; the same command then finishes with the
    results of an uninterrupted sweep."""
    a, _ = texts
    extra = ("--steps", "30", "--evals", "3", "--optimizers", "adamw,sam", "--rho", "0.05",
             "--no-compute-matched", "--no-diagnose")
    out = tmp_path / "term"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.Popen([sys.executable, "-m", "fsam_kernels.lm.sweep", *sweep_argv(tmp_path, out, a, *extra)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the second run (adamw seed 1) has started: its step-0 checkpoint exists
    started = out / "runs" / "adamw-rho0-seed1-steps30" / "ckpt" / "adamw-seed1.pt"
    deadline = time.monotonic() + 300
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM: rerun the same command to continue" in stderr and "Traceback" not in stderr
    rep = json.load(open(out / "report.json"))
    assert 1 <= rep["runs_done"] < 4 == rep["runs_planned"] and len(rep["missing"]) == 4 - rep["runs_done"]
    assert f"Runs finished: {rep['runs_done']} of 4 planned" in (out / "report.md").read_text()
    assert "Missing runs" in stdout
    assert S.main(sweep_argv(tmp_path, out, a, *extra)) == 0
    assert S.main(sweep_argv(tmp_path, tmp_path / "ref", a, *extra)) == 0
    assert len(results(out)) == 4 and results(out) == results(tmp_path / "ref")
