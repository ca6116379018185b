"""Peak memory and step time of one training step: AdamW / SAM / FunctionalSAM
x plain / fused head x vocabulary x micro-batches (issue 11).

Every case runs in a fresh process (so one case's allocations never count
towards another's peak): the small GPT preset (d_model 128, 4 layers) with the
case's vocabulary, micro-batches of 8 x 128 random tokens, float32, the
library's default backend; one warm-up step, then timed steps. Peak memory is
``ru_maxrss`` of that process on CPU (resident set, the whole process: Python,
torch, model, optimizer state and the step's peak) and
``torch.cuda.max_memory_allocated`` on a GPU. The step is
``fsam_kernels.lm.train.train_step``, what ``fsam-train`` runs.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/head_memory.py
    python bench/head_memory.py --vocab 4096 --micro 1      # a subset
    python bench/head_memory.py --device cuda

Writes ``<out>/head-memory-<device>.json`` and ``.md`` (default out:
bench/results). The issue's targets are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIMIZERS = ("adamw", "sam", "fsam")
HEADS = ("plain", "fused")
VOCABS = (4096, 32768, 131072)
MICROS = (1, 8)


def run_case(opt_name: str, head: str, vocab: int, micro: int, device: str, steps: int,
             batch: int, seq: int, preset: str, warmup: int = 1) -> dict:
    """One case in this process: returns peak memory and step times."""
    import torch

    from fsam_kernels import SAM, FunctionalSAM
    from fsam_kernels.lm.model import GPT, config_for
    from fsam_kernels.lm.train import train_step

    torch.manual_seed(0)
    dev = torch.device(device)
    model = GPT(config_for(preset, vocab)).to(dev)
    params = list(model.parameters())
    if opt_name == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:
        cls = SAM if opt_name == "sam" else FunctionalSAM
        opt = cls(params, lr=1e-4, rho=0.05)
    g = torch.Generator().manual_seed(1)
    mbs = [(torch.randint(0, vocab, (batch, seq), generator=g).to(dev),
            torch.randint(0, vocab, (batch, seq), generator=g).to(dev)) for _ in range(micro)]
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = train_step(model, opt, mbs, head=head)
        float(loss)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"optimizer": opt_name, "head": head, "vocab": vocab, "micro_batches": micro,
           "tokens_per_micro_batch": batch * seq, "step_s": min(times), "step_s_all": times,
           "warmup_steps": warmup, "loss": float(loss), "rss_before_step_bytes": rss_before,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def _gib(b):
    return b / 2 ** 30


def _peak(r, device):
    return r["peak_cuda_bytes"] if device == "cuda" else r["peak_rss_bytes"]


def targets(results: list, device: str) -> list:
    """The issue's targets as (text, measured, PASS/MISS) rows."""
    by = {(r["optimizer"], r["head"], r["vocab"], r["micro_batches"]): r for r in results}
    rows = []
    for v in VOCABS:
        for m in MICROS:
            f, s = by.get(("fsam", "fused", v, m)), by.get(("sam", "fused", v, m))
            if f and s:
                ratio = _peak(f, device) / _peak(s, device)
                rows.append((f"FunctionalSAM fused peak <= 1.1 x SAM fused peak (V={v}, {m} mb)",
                             f"{ratio:.3f} x", ratio <= 1.1))
    f, a = by.get(("fsam", "fused", 32768, 8)), by.get(("adamw", "plain", 32768, 8))
    if f and a:
        ratio = _peak(f, device) / _peak(a, device)
        rows.append(("FunctionalSAM fused peak < AdamW plain peak (V=32768, 8 mb)",
                     f"{_gib(_peak(f, device)):.2f} vs {_gib(_peak(a, device)):.2f} GiB", ratio < 1.0))
    for o in OPTIMIZERS:
        for m in MICROS:
            fu, pl = by.get((o, "fused", 32768, m)), by.get((o, "plain", 32768, m))
            if fu and pl:
                ratio = fu["step_s"] / pl["step_s"]
                rows.append((f"{o} step time fused <= 1.15 x plain (V=32768, {m} mb)",
                             f"{ratio:.2f} x", ratio <= 1.15))
    return rows


def write_markdown(path: str, doc: dict) -> None:
    device = doc["device"]
    runs = doc.get("runs") or [{"command": doc["command"], "machine": doc["machine"]}]
    m = runs[0]["machine"]
    res = doc["results"]
    unit = "peak CUDA memory (GiB)" if device == "cuda" else "peak RSS (GiB)"
    L = ["# Fused linear cross-entropy head: memory and step time", "",
         f"- command: `{runs[0]['command']}`",
         f"- machine: {m.get('gpu_name', m['cpu_model'])}, torch {m['torch']}, "
         f"{res[0]['threads'] if res else '?'} torch thread(s), commit {m.get('git_commit')}",
         f"- load average at start {m.get('loadavg_start')}, end {m.get('loadavg_end')} "
         "(other processes shared the cores: step times are noisy)",
         f"- small preset (d_model 128, 4 layers), micro-batches of "
         f"{doc['batch']} x {doc['seq']} tokens, float32; one warm-up step (column warm-up), "
         f"step time = the fastest of the timed steps ({doc['steps']}; {doc['steps_large']} at "
         f"vocabulary 131072); {unit} of a fresh process per case",
         "", f"| optimizer | head | vocab | micro-batches | {unit} | step s | warm-up |",
         "|---|---|---|---|---|---|---|"]
    for r in sorted(res, key=lambda r: (r["vocab"], r["micro_batches"], OPTIMIZERS.index(r["optimizer"]),
                                        HEADS.index(r["head"]))):
        L.append(f"| {r['optimizer']} | {r['head']} | {r['vocab']} | {r['micro_batches']} | "
                 f"{_gib(_peak(r, device)):.2f} | {r['step_s']:.2f} | {r.get('warmup_steps', 1)} |")
    if doc.get("skipped"):
        L += ["", "Not measured: " + "; ".join(doc["skipped"])]
    for run in runs[1:]:
        L.append(f"- added by `{run['command']}` (load average {run['machine'].get('loadavg_start')}"
                 f" to {run['machine'].get('loadavg_end')}, commit {run['machine'].get('git_commit')})")
    L += ["", "## The issue's targets", "", "| target | measured | |", "|---|---|---|"]
    for text, val, ok in targets(res, device):
        L.append(f"| {text} | {val} | {'PASS' if ok else 'MISS'} |")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--vocab", default=",".join(map(str, VOCABS)))
    p.add_argument("--micro", default=",".join(map(str, MICROS)))
    p.add_argument("--steps", type=int, default=2, help="timed steps per case")
    p.add_argument("--warmup-large", type=int, default=1, choices=(0, 1),
                   help="warm-up steps of the vocabulary >= 131072 cases")
    p.add_argument("--steps-large", type=int, default=1,
                   help="timed steps of the vocabulary >= 131072 cases (each step is long)")
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--preset", default="small")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--rewrite-md", action="store_true",
                   help="only rewrite <out>/head-memory-<device>.md from its .json")
    p.add_argument("--append", action="store_true",
                   help="keep the cases of an existing results file that this run does not "
                        "measure again (e.g. to add the largest cases in a second run)")
    p.add_argument("--case", help=argparse.SUPPRESS)   # internal: run one case, print JSON
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)  # internal
    a = p.parse_args(argv)
    if a.case:
        o, h, v, m = a.case.split(":")
        print("RESULT " + json.dumps(run_case(o, h, int(v), int(m), a.device, a.steps, a.batch,
                                              a.seq, a.preset, a.warmup)))
        return 0
    if a.rewrite_md:
        base = os.path.join(a.out, f"head-memory-{a.device}")
        with open(base + ".json") as f:
            write_markdown(base + ".md", json.load(f))
        return 0
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from kernels import machine_info

    import torch  # noqa: F401  (machine_info reads torch's settings)

    machine = machine_info(a.device)
    results, skipped = [], []
    cases = [(o, h, int(v), int(m)) for v in a.vocab.split(",") for m in a.micro.split(",")
             for o in a.optimizers.split(",") for h in a.heads.split(",")]
    for o, h, v, m in cases:
        steps = a.steps if v < 131072 else a.steps_large
        warm = 1 if v < 131072 else a.warmup_large
        cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{o}:{h}:{v}:{m}",
               "--device", a.device, "--steps", str(steps), "--warmup", str(warm),
               "--batch", str(a.batch),
               "--seq", str(a.seq), "--preset", a.preset]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            skipped.append(f"{o}/{h}/V={v}/{m} mb: failed ({proc.stderr.strip().splitlines()[-1:]})")
            print(f"{o:6s} {h:6s} V={v:<7d} mb={m}: FAILED {proc.stderr[-400:]}", flush=True)
            continue
        r = json.loads(line[0][7:])
        results.append(r)
        print(f"{o:6s} {h:6s} V={v:<7d} mb={m}: peak {_gib(_peak(r, a.device)):.2f} GiB, "
              f"step {r['step_s']:.2f} s ({time.time() - t0:.0f} s)", flush=True)
    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    doc = {"schema": "fsam_kernels/bench-head-memory/1",
           "command": "nice -n 10 env OMP_NUM_THREADS=1 python bench/head_memory.py"
                      + "".join(" " + x for x in (sys.argv[1:] if argv is None else argv)),
           "device": a.device, "machine": machine, "batch": a.batch, "seq": a.seq,
           "steps": a.steps, "steps_large": a.steps_large, "preset": a.preset, "results": results, "skipped": skipped,
           "targets": [{"target": t, "measured": v, "pass": ok}
                       for t, v, ok in targets(results, a.device)]}
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"head-memory-{a.device}")
    if a.append and os.path.exists(base + ".json"):
        with open(base + ".json") as f:
            old = json.load(f)
        key = lambda r: (r["optimizer"], r["head"], r["vocab"], r["micro_batches"])  # noqa: E731
        new = {key(r) for r in results}
        kept = [r for r in old["results"] if key(r) not in new]
        doc["results"] = kept + results
        doc["runs"] = old.get("runs", [{"command": old["command"], "machine": old["machine"]}])
        doc["runs"].append({"command": doc["command"], "machine": machine})
        doc["skipped"] = [s for s in old.get("skipped", []) + skipped]
        doc["targets"] = [{"target": t, "measured": v, "pass": ok}
                          for t, v, ok in targets(doc["results"], a.device)]
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    write_markdown(base + ".md", doc)
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
