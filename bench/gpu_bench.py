#!/usr/bin/env python
"""GPU benchmark of fsam_kernels for the one short GPU check (bench/gpu_check.sh).

    python bench/gpu_bench.py [--device auto|cpu|cuda] [--tiny] [--budget-s 150] [--out DIR]

Sections, in this order (each one writes the results JSON again when it ends,
so a run stopped by a time cap keeps what it measured):

1. ``copy``     copy bandwidth: ``dst.copy_(src)`` on one large float32 tensor,
                bytes read + written per second, measured in this run.
2. ``steps``    the SAM, preconditioned SAM and AdamW steps of the ``cuda`` and
                ``triton`` backends (on a CPU-only machine: the CPU's fused
                backends, to practise the code) on a GPT-like shape with 100M+
                float32 parameters (GPT-2 124M); torch's ``AdamW(fused=True)``
                and ``AdamW(foreach=True)`` on the same tensors. Achieved GB/s
                by SPEC §6's byte model (48 / 56 / 28 B per parameter) and the
                fraction of the copy bandwidth of section 1.
3. ``launches`` GPU work items (kernels + memcpy + memset, from the torch
                profiler's CUPTI activity) of one step at 27 tensors (a 4-layer
                GPT-like shape) and at 10,000 tensors (many small ones).
4. ``e2e``      an end-to-end GPT training step (``fsam_kernels.lm`` preset
                ``medium``, random tokens; fsam-train's default hyperparameters
                and optimizers): AdamW (as fsam-train builds it, and fused), SAM,
                FunctionalSAM, backend ``auto``.
5. ``head``     peak memory of the fused language-model head
                (``fsam_kernels.heads``) against ``F.cross_entropy(h @ W.T)``,
                forward + backward; skipped with a message if the module is absent.
6. ``graph``    the SAM / preconditioned SAM / AdamW step captured in a CUDA graph
                and replayed; every tensor the step touches must be bitwise equal
                to the same number of eager steps from the same start. Also the
                graph's node count (cuda-bindings' ``cudaGraphGetNodes``) as a
                second launch count, and replay vs eager time. Last, so that a
                failed capture cannot disturb the other sections.

The issue's targets are reported as PASS / MISS / N/A with the numbers, never
asserted: each step >= 85% of the copy bandwidth at 100M+ params, triton
within 10% of cuda, launches per step the same at 27 and 10,000 tensors, the
CUDA-graph replay bitwise equal to eager, the end-to-end SAM step <= 2.05x the
AdamW step.

Without a GPU every section that needs one says why it was skipped, and the
rest runs at tiny sizes (``--tiny`` is implied), so the script is practised on
a CPU machine before the first GPU run (tests/test_bench_smoke.py runs it).

Outputs: ``<out>/gpu_bench.json`` (schema ``SCHEMA``) and ``<out>/gpu_bench.md``;
the compact table is printed last. ``<out>`` defaults to ``$OUT`` when set, else
bench/results.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import importlib
import importlib.util
import json
import math
import os
import shlex
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import kernels  # noqa: E402  (shapes, byte model, case builder, launch counter)

SCHEMA = "fsam_kernels/gpu-bench/1"
#: run in this order; graph capture last, so that a failed capture cannot disturb the others
SECTIONS = ("copy", "steps", "launches", "e2e", "head", "graph")
METHODS = ("sam", "psam", "adamw")

#: targets (issue 14), reported not asserted
TARGET_FRAC_COPY = 0.85
TARGET_TRITON_VS_CUDA = 1.10
TARGET_E2E_SAM_VS_ADAMW = 2.05

#: sizes per scale. "full" is the GPU plan; "tiny" practises every code path in seconds
SIZES: Dict[str, Dict[str, Any]] = {
    "full": dict(
        copy_numel=512 << 20,                                        # 2 GiB per tensor
        steps_shape=("gpt", dict(d=768, layers=12, vocab=50304)),    # 124M params, 75 tensors
        few_shape=("gpt", dict(d=256, layers=4, vocab=8192)),        # 27 tensors, 5.4M
        many_shape=("many-small", dict(n=10000, total=16 << 20)),    # 10,000 tensors, 16.8M
        step_time_s=0.4, step_max_reps=200,
        graph_steps=(3, 5),                                          # (warm-up, compared) steps
        e2e=dict(preset="medium", vocab=4096, batch=16, seq=1024, warmup=3, steps=10),
        head=dict(tokens=16384, d=1024, vocab=65536, chunk=None),
    ),
    "tiny": dict(
        copy_numel=1 << 18,
        steps_shape=("gpt", dict(d=32, layers=2, vocab=64, ctx=16)),
        few_shape=("gpt", dict(d=8, layers=4, vocab=16, ctx=8)),     # 27 tensors
        many_shape=("many-small", dict(n=10000, total=20000)),       # 10,000 tensors
        step_time_s=0.02, step_max_reps=3,
        graph_steps=(1, 2),
        e2e=dict(preset="tiny", vocab=64, batch=2, seq=16, warmup=1, steps=2),
        head=dict(tokens=64, d=16, vocab=128, chunk=None),
    ),
}
#: what tests/test_bench_smoke.py runs: "tiny" with 300 instead of 10,000 small tensors
SIZES["smoke"] = dict(SIZES["tiny"], many_shape=("many-small", dict(n=300, total=3000)),
                      e2e=dict(SIZES["tiny"]["e2e"], steps=1))


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, *, target_s: float, max_reps: int,
            min_reps: int = 3, warmup: int = 2) -> Dict[str, Any]:
    """Median and min wall time of ``fn()`` (one call per rep). On CUDA each rep
    is timed with CUDA events around the call (device time of the work it
    queues, host gaps included); on CPU with ``time.perf_counter``. ``warmup``
    untimed calls first; the number of reps fills ``target_s``, within
    [min_reps, max_reps]."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-9)
    reps = int(min(max(min_reps, math.ceil(target_s / one)), max(min_reps, max_reps)))
    times: List[float] = []
    if device == "cuda":
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(reps)]
        for a, b in evs:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) / 1e3 for a, b in evs]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return dict(median_s=times[len(times) // 2], min_s=times[0], reps=reps,
                timer="cuda events" if device == "cuda" else "time.perf_counter")


def _free(device: str, template: bool = False) -> None:
    """Collect garbage and return cached CUDA memory; ``template=True`` also drops
    bench/kernels.py's cached random tensors (kept between cases of one shape)."""
    if template:
        kernels.drop_template()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _case(family: str, kw: Dict[str, Any], method: str, impl: str) -> Dict[str, Any]:
    """A case dict as bench/kernels.py's plan has it (build_case reads it)."""
    shapes = kernels.build_shapes(family, kw)
    n = sum(kernels.numel(s) for s in shapes)
    group = f"{family}-{kernels.size_label(n)}-{len(shapes)}t"
    return dict(id=f"{group}:{method}:{impl}", family=family, label=kernels.size_label(n),
                group=group, shape_kw=kw, n_params=n, n_tensors=len(shapes), method=method,
                impl=impl, bytes_per_param=kernels.BYTES_PER_PARAM[method])


def _err(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}"[:600] + where


class Budget:
    """Wall-clock budget of the benchmark sections."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def spent(self) -> float:
        return time.perf_counter() - self.t0


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------


def section_copy(ctx) -> Dict[str, Any]:
    dev, n = ctx["device"], ctx["sizes"]["copy_numel"]
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), dev, target_s=ctx["sizes"]["step_time_s"],
                max_reps=ctx["sizes"]["step_max_reps"] * 2, warmup=3)
    del src, dst
    _free(dev)
    b = 8 * n
    return dict(numel=n, bytes=b, median_s=t["median_s"], min_s=t["min_s"], reps=t["reps"],
                bytes_per_s=b / t["median_s"], bytes_per_s_best=b / t["min_s"], timer=t["timer"],
                method="dst.copy_(src), float32, bytes read + written / median time")


def _step_row(ctx, case: Dict[str, Any], count: bool) -> Dict[str, Any]:
    dev = ctx["device"]
    c = kernels.build_case(case, dev)
    try:
        t = time_fn(c.fn, dev, target_s=ctx["sizes"]["step_time_s"],
                    max_reps=ctx["sizes"]["step_max_reps"])
        row = {k: case[k] for k in ("id", "method", "impl", "n_params", "n_tensors",
                                    "bytes_per_param")}
        b = case["bytes_per_param"] * case["n_params"]
        row.update(ms_median=t["median_s"] * 1e3, ms_min=t["min_s"] * 1e3, reps=t["reps"],
                   model_bytes=b, bytes_per_s=b / t["median_s"], note=c.note)
        cb = ctx["results"].get("copy_bandwidth") or {}
        row["frac_copy_bw"] = row["bytes_per_s"] / cb["bytes_per_s"] if cb.get("bytes_per_s") \
            else None
        row["launches"] = kernels.count_launches(c.fn, dev) if count else None
        if dev == "cuda":
            row["memory"] = kernels.measure_memory(c.fn, dev)
        return row
    finally:
        c.close()
        del c
        _free(dev)


def step_backends(ctx) -> List[str]:
    """cuda and triton on a GPU; on CPU the fused backends that run at speed
    (cpu, foreach: triton through its interpreter and an emulated cuda backend
    are correctness paths and are left out, see ``gpu_skip_reasons``)."""
    avail = [n for n, r in ctx["backends"].items() if r["available"]]
    if ctx["device"] == "cuda":
        return [b for b in ("cuda", "triton") if b in avail]
    return [b for b in avail if b not in ("reference", "triton", "cuda")]


def gpu_skip_reasons(ctx) -> List[Dict[str, str]]:
    """Why the cuda / triton backends are not measured in this run (none on a GPU
    where both are available)."""
    out = []
    for b in ("cuda", "triton"):
        r = ctx["backends"].get(b, {"available": False, "reason": "not registered"})
        if not r["available"]:
            out.append(dict(id=f"steps:{b}", reason=r["reason"]))
        elif ctx["device"] != "cuda":
            out.append(dict(id=f"steps:{b}", reason=(
                f"{b} on CPU tensors is a correctness path (Triton interpreter / CUDA "
                "emulation), not timed: the measurements need a CUDA device")))
    return out


def section_steps(ctx) -> Dict[str, Any]:
    dev = ctx["device"]
    fam, kw = ctx["sizes"]["steps_shape"]
    rows, failed = [], []
    skipped = gpu_skip_reasons(ctx)
    impls = [(m, b) for b in step_backends(ctx) for m in METHODS]
    from baseline import adamw_fused_supported

    fused_ok, fused_why = adamw_fused_supported(dev)
    impls.append(("adamw", "torch-foreach"))
    if fused_ok:
        impls.append(("adamw", "torch-fused"))
    else:
        skipped.append(dict(id="steps:torch-fused", reason=fused_why))
    for method, impl in impls:
        case = _case(fam, kw, method, impl)
        if ctx["budget"].left() < ctx["reserve_s"]:
            skipped.append(dict(id=case["id"], reason="benchmark time budget spent"))
            continue
        try:
            rows.append(_step_row(ctx, case, count=True))
        except Exception as exc:
            failed.append(dict(id=case["id"], error=_err(exc)))
            _free(dev)
        ctx["partial"]({"steps": dict(rows=rows, failed=failed, skipped=skipped)})
    _free(dev, template=True)
    shapes = kernels.build_shapes(fam, kw)
    return dict(shape=dict(family=fam, kw=kw, n_params=sum(kernels.numel(s) for s in shapes),
                           n_tensors=len(shapes)),
                rows=rows, failed=failed, skipped=skipped)


def section_launches(ctx) -> Dict[str, Any]:
    dev = ctx["device"]
    out: Dict[str, Any] = dict(rows=[], failed=[], skipped=[])
    if dev != "cuda":
        out["skipped"].append(dict(id="launches", reason=(
            "needs CUDA: launches are counted from the torch profiler's CUDA (CUPTI) activity; "
            "on this machine the cases were built and run once each, without a count")))
    impls = [(m, b) for b in step_backends(ctx) for m in METHODS]
    if dev == "cuda":
        impls.append(("adamw", "torch-fused"))
    for key in ("few_shape", "many_shape"):
        fam, kw = ctx["sizes"][key]
        for method, impl in impls:
            case = _case(fam, kw, method, impl)
            if ctx["budget"].left() < ctx["reserve_s"]:
                out["skipped"].append(dict(id=case["id"], reason="benchmark time budget spent"))
                continue
            try:
                c = kernels.build_case(case, dev)
                try:
                    c.fn()  # first call: lazy state, library loading, kernel compilation
                    _sync(dev)
                    t0 = time.perf_counter()
                    la = kernels.count_launches(c.fn, dev)
                    if la is None:
                        c.fn()
                    _sync(dev)
                    out["rows"].append(dict(id=case["id"], method=method, impl=impl,
                                            n_tensors=case["n_tensors"],
                                            n_params=case["n_params"], launches=la,
                                            step_s=time.perf_counter() - t0))
                finally:
                    c.close()
                    _free(dev)
            except Exception as exc:
                out["failed"].append(dict(id=case["id"], error=_err(exc)))
                _free(dev)
            ctx["partial"]({"launches": out})
        _free(dev, template=True)
    return out


def graph_node_counts(g) -> Dict[str, Any]:
    """Node counts by type of a captured ``torch.cuda.CUDAGraph(keep_graph=True)``,
    through cuda-bindings (``cuda.bindings.runtime``); {"error": ...} if unavailable."""
    try:
        from cuda.bindings import runtime as cudart
    except Exception as exc:
        return dict(error=f"cuda-bindings not importable: {exc}")
    try:
        raw = g.raw_cuda_graph()
        err, nodes, n = cudart.cudaGraphGetNodes(raw)
        if int(err) != 0:
            return dict(error=f"cudaGraphGetNodes (count) returned {err}")
        err, nodes, n = cudart.cudaGraphGetNodes(raw, n)
        if int(err) != 0:
            return dict(error=f"cudaGraphGetNodes returned {err}")
        by: Dict[str, int] = {}
        for node in nodes[:n]:
            e2, ty = cudart.cudaGraphNodeGetType(node)
            name = getattr(ty, "name", str(ty)).replace("cudaGraphNodeType", "").lower()
            by[name] = by.get(name, 0) + 1
        return dict(total=int(n), by_type=by)
    except Exception as exc:
        return dict(error=_err(exc))


def section_graph(ctx) -> Dict[str, Any]:
    dev = ctx["device"]
    warm, n = ctx["sizes"]["graph_steps"]
    out: Dict[str, Any] = dict(rows=[], failed=[], skipped=[], warmup_steps=warm, steps=n)
    if dev != "cuda":
        out["skipped"].append(dict(id="graph", reason=(
            "needs CUDA (torch.cuda.CUDAGraph); on this machine only the eager side of the "
            "comparison ran (two eager runs from the same start, compared bitwise)")))
    for key in ("few_shape", "many_shape"):
        fam, kw = ctx["sizes"][key]
        for b in step_backends(ctx):
            for method in METHODS:
                case = _case(fam, kw, method, b)
                if ctx["budget"].left() < ctx["reserve_s"]:
                    out["skipped"].append(dict(id=case["id"], reason="benchmark time budget spent"))
                    continue
                try:
                    out["rows"].append(_graph_row(ctx, case, warm, n))
                except Exception as exc:
                    out["failed"].append(dict(id=case["id"], error=_err(exc)))
                finally:
                    _free(dev)
                ctx["partial"]({"graph": out})
        _free(dev, template=True)
    return out


def _graph_row(ctx, case, warm: int, n: int) -> Dict[str, Any]:
    dev = ctx["device"]
    eager = kernels.build_case(case, dev)
    other = kernels.build_case(case, dev)   # the same start (both clone the cached template)
    row = dict(id=case["id"], method=case["method"], impl=case["impl"],
               n_tensors=case["n_tensors"], n_params=case["n_params"])
    try:
        row["same_start"] = all(torch.equal(a, b) for a, b in zip(eager.held(), other.held()))
        for _ in range(warm + n):
            eager.fn()
        _sync(dev)
        if dev == "cuda":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(warm):
                    other.fn()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            try:
                g = torch.cuda.CUDAGraph(keep_graph=True)
                row["graph_nodes_api"] = "keep_graph=True"
            except TypeError:  # older torch: no keep_graph
                g = torch.cuda.CUDAGraph()
                row["graph_nodes_api"] = None
            with torch.cuda.graph(g):
                other.fn()
            row["graph_nodes"] = graph_node_counts(g) if row["graph_nodes_api"] else dict(
                error="torch.cuda.CUDAGraph has no keep_graph (torch too old)")
            if row["graph_nodes_api"] and hasattr(g, "instantiate"):
                g.instantiate()
            for _ in range(n):
                g.replay()
            torch.cuda.synchronize()
            row["replayed"] = n
        else:
            for _ in range(warm + n):
                other.fn()
            row["replayed"] = 0
        a, b = eager.held(), other.held()
        diffs = [i for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y)]
        row.update(tensors_compared=len(a), tensors_differing=len(diffs),
                   bitwise_equal=len(diffs) == 0 and len(a) == len(b))
        if diffs:
            i = diffs[0]
            row["first_difference"] = dict(index=i, max_abs=float(
                (a[i].double() - b[i].double()).abs().max()))
        if dev == "cuda":
            te = time_fn(eager.fn, dev, target_s=ctx["sizes"]["step_time_s"] / 2,
                         max_reps=ctx["sizes"]["step_max_reps"], warmup=1)
            tg = time_fn(g.replay, dev, target_s=ctx["sizes"]["step_time_s"] / 2,
                         max_reps=ctx["sizes"]["step_max_reps"], warmup=1)
            row.update(eager_ms=te["median_s"] * 1e3, replay_ms=tg["median_s"] * 1e3)
            del g
        return row
    finally:
        eager.close()
        other.close()


def _e2e_args():
    from fsam_kernels.lm.train import build_parser

    args = build_parser().parse_args([])
    args.betas = tuple(float(b) for b in args.betas.split(","))
    return args


def section_e2e(ctx) -> Dict[str, Any]:
    import torch.nn.functional as F

    from fsam_kernels.lm.model import GPT, config_for
    from fsam_kernels.lm.train import make_optimizer

    dev = ctx["device"]
    p = ctx["sizes"]["e2e"]
    cfg = config_for(p["preset"], p["vocab"])
    args = _e2e_args()
    if dev == "cuda":
        torch.set_float32_matmul_precision("high")  # as fsam-train does on a GPU
    torch.manual_seed(0)
    base = GPT(cfg).to(dev)
    n_params = sum(q.numel() for q in base.parameters())
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), generator=g).to(dev)
    y = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), generator=g).to(dev)
    out: Dict[str, Any] = dict(preset=p["preset"], config=cfg.to_dict(), n_params=n_params,
                               batch=p["batch"], seq_len=p["seq"], tokens=p["batch"] * p["seq"],
                               precision="float32 (TF32 matmuls on a GPU, as fsam-train)",
                               lr=args.lr, rho=args.rho, backend=args.backend, rows=[], failed=[],
                               skipped=[])
    for name in ("adamw", "adamw-fused", "sam", "fsam"):
        if ctx["budget"].left() < ctx["reserve_s"]:
            out["skipped"].append(dict(id=f"e2e:{name}", reason="benchmark time budget spent"))
            continue
        try:
            model = copy.deepcopy(base)
            if name == "adamw-fused":
                from baseline import adamw_fused_supported

                ok, why = adamw_fused_supported(dev)
                if not ok:
                    out["skipped"].append(dict(id="e2e:adamw-fused", reason=why))
                    continue
                from fsam_kernels.lm.train import param_groups

                opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                        betas=args.betas, eps=args.eps, fused=True)
            else:
                opt = make_optimizer(name, model, args)

            def closure():
                logits = model(x)
                return logits, F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

            def step():
                if isinstance(opt, torch.optim.AdamW):
                    opt.zero_grad(set_to_none=True)
                    _, loss = closure()
                    loss.backward()
                    opt.step()
                else:
                    opt.step(closure)

            for _ in range(p["warmup"]):
                step()
            _sync(dev)
            times = []
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(p["steps"]):
                t0 = time.perf_counter()
                step()
                _sync(dev)
                times.append(time.perf_counter() - t0)
            times.sort()
            row = dict(optimizer=name, ms_median=times[len(times) // 2] * 1e3,
                       ms_min=times[0] * 1e3, steps=len(times),
                       optimizer_class=type(opt).__name__,
                       backends=sorted(set(getattr(opt, "backends", {}).values())) or None)
            if dev == "cuda":
                row["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            out["rows"].append(row)
            del opt, model
        except Exception as exc:
            out["failed"].append(dict(id=f"e2e:{name}", error=_err(exc)))
        finally:
            _free(dev)
        ctx["partial"]({"e2e": out})
    ad = next((r for r in out["rows"] if r["optimizer"] == "adamw"), None)
    for r in out["rows"]:
        r["vs_adamw"] = r["ms_median"] / ad["ms_median"] if ad else None
    return out


#: entry points looked for in fsam_kernels.heads, in order (the module is being built
#: in parallel; the first that exists is measured)
HEAD_ENTRY_POINTS = ("fused_linear_cross_entropy", "linear_cross_entropy",
                     "FusedLinearCrossEntropy", "LinearCrossEntropy")


def section_head(ctx) -> Dict[str, Any]:
    import torch.nn.functional as F

    dev = ctx["device"]
    if importlib.util.find_spec("fsam_kernels.heads") is None:
        return dict(skipped=[dict(id="head", reason=(
            "fsam_kernels.heads does not exist in this checkout (the fused head of issue 11 "
            "has not landed): peak memory not measured"))], rows=[], failed=[])
    mod = importlib.import_module("fsam_kernels.heads")
    entry = next((n for n in HEAD_ENTRY_POINTS if hasattr(mod, n)), None)
    if entry is None:
        return dict(skipped=[dict(id="head", reason=(
            f"fsam_kernels.heads has none of {HEAD_ENTRY_POINTS}: peak memory not measured "
            f"(module attributes: {sorted(a for a in dir(mod) if not a.startswith('_'))[:20]})"))],
            rows=[], failed=[])
    obj = getattr(mod, entry)
    fn = obj() if isinstance(obj, type) else obj
    p = ctx["sizes"]["head"]
    out: Dict[str, Any] = dict(entry_point=f"fsam_kernels.heads.{entry}", tokens=p["tokens"],
                               d=p["d"], vocab=p["vocab"], dtype="float32", rows=[], failed=[],
                               skipped=[], logits_bytes=4 * p["tokens"] * p["vocab"])
    g = torch.Generator(device="cpu").manual_seed(0)
    h0 = (torch.randn(p["tokens"], p["d"], generator=g) * 0.5).to(dev)
    w0 = (torch.randn(p["vocab"], p["d"], generator=g) * 0.02).to(dev)
    y = torch.randint(0, p["vocab"], (p["tokens"],), generator=g).to(dev)
    losses = {}
    impls = ["plain", "fused"]
    try:
        import inspect

        if dev == "cuda" and "impl" in inspect.signature(fn).parameters:
            impls.append("fused:torch")   # "fused" is impl="auto": Triton on CUDA
    except (TypeError, ValueError):
        pass
    for impl in impls:
        try:
            h = h0.clone().requires_grad_()
            w = w0.clone().requires_grad_()

            def run():
                if impl == "plain":
                    loss = F.cross_entropy(h @ w.T, y)
                elif impl == "fused:torch":
                    loss = fn(h, w, y, impl="torch")
                else:
                    loss = fn(h, w, y)
                loss.backward()
                return loss

            run()  # warm-up (compilation)
            h.grad = w.grad = None
            mem = kernels.measure_memory(lambda: losses.__setitem__(impl, run()), dev)
            row = dict(impl=impl, loss=float(losses[impl]),
                       step_peak_extra_bytes=mem["step_peak_extra_bytes"], method=mem["method"])
            t = time_fn(run, dev, target_s=ctx["sizes"]["step_time_s"], max_reps=20, warmup=0)
            row["ms_median"] = t["median_s"] * 1e3
            out["rows"].append(row)
            del h, w
        except Exception as exc:
            out["failed"].append(dict(id=f"head:{impl}", error=_err(exc)))
        finally:
            _free(dev)
    for k in losses:
        if k != "plain" and "plain" in losses:
            out.setdefault("loss_abs_diff", {})[k] = abs(float(losses["plain"]) - float(losses[k]))
    return out


# ---------------------------------------------------------------------------
# targets, tables
# ---------------------------------------------------------------------------


def _row(rows, method, impl):
    return next((r for r in rows if r["method"] == method and r["impl"] == impl), None)


def evaluate_targets(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []

    def add(target, status, detail, **kw):
        out.append(dict(target=target, status=status, detail=detail, **kw))

    dev = res["device"]
    na_dev = "needs a CUDA device (this run: CPU)" if dev != "cuda" else None
    steps = (res.get("sections") or {}).get("steps") or {}
    rows = steps.get("rows", [])
    n_big = (steps.get("shape") or {}).get("n_params", 0)
    for b in ("cuda", "triton"):
        for m in METHODS:
            name = f"{b} {m} step >= {TARGET_FRAC_COPY:.0%} of copy bandwidth at 100M+ params"
            r = _row(rows, m, b)
            if r is None or dev != "cuda":
                add(name, "N/A", na_dev or f"{b} {m} not measured (see skipped/failed)")
            elif n_big < 100e6:
                add(name, "N/A", f"shape has {n_big:,} params (< 100M)")
            elif r.get("frac_copy_bw") is None:
                add(name, "N/A", "no copy bandwidth measured")
            else:
                f = r["frac_copy_bw"]
                add(name, "PASS" if f >= TARGET_FRAC_COPY else "MISS",
                    f"{f:.1%} ({r['bytes_per_s'] / 1e9:.0f} GB/s, {r['ms_median']:.3f} ms)",
                    value=f, threshold=TARGET_FRAC_COPY)
        if b == "triton":
            for m in METHODS:
                name = f"triton {m} step within {TARGET_TRITON_VS_CUDA - 1:.0%} of cuda"
                rt, rc = _row(rows, m, "triton"), _row(rows, m, "cuda")
                if rt is None or rc is None or dev != "cuda":
                    add(name, "N/A", na_dev or "triton or cuda not measured")
                else:
                    q = rt["ms_median"] / rc["ms_median"]
                    add(name, "PASS" if q <= TARGET_TRITON_VS_CUDA else "MISS",
                        f"triton/cuda time = {q:.3f} ({rt['ms_median']:.3f} vs "
                        f"{rc['ms_median']:.3f} ms)", value=q, threshold=TARGET_TRITON_VS_CUDA)
    la = (res.get("sections") or {}).get("launches") or {}
    for b in ("cuda", "triton"):
        for m in METHODS:
            name = f"{b} {m} launches per step the same at 27 and 10,000 tensors"
            counts = {r["n_tensors"]: (r.get("launches") or {}).get("total")
                      for r in la.get("rows", []) if r["impl"] == b and r["method"] == m}
            counts = {k: v for k, v in counts.items() if v is not None}
            if dev != "cuda" or len(counts) < 2:
                add(name, "N/A", na_dev or f"counts for {b} {m}: {counts or 'none'}")
            else:
                add(name, "PASS" if len(set(counts.values())) == 1 else "MISS",
                    ", ".join(f"{k} tensors: {v}" for k, v in sorted(counts.items())),
                    value=counts)
    gr = (res.get("sections") or {}).get("graph") or {}
    grows = [r for r in gr.get("rows", []) if r.get("replayed")]
    if dev != "cuda":
        add("CUDA-graph replay bitwise equal to eager", "N/A", na_dev)
    elif not grows and not gr.get("failed"):
        add("CUDA-graph replay bitwise equal to eager", "N/A", "no graph case ran")
    else:
        bad = [r["id"] for r in grows if not r.get("bitwise_equal")] + \
              [f["id"] + " (failed)" for f in gr.get("failed", [])]
        add("CUDA-graph replay bitwise equal to eager", "MISS" if bad else "PASS",
            f"{len(grows) - len([r for r in grows if not r.get('bitwise_equal')])}/"
            f"{len(grows) + len(gr.get('failed', []))} cases equal"
            + (f"; not: {', '.join(bad)}" if bad else ""))
    e2e = (res.get("sections") or {}).get("e2e") or {}
    for opt in ("sam", "fsam"):
        name = (f"end-to-end {'SAM' if opt == 'sam' else 'FunctionalSAM'} step <= "
                f"{TARGET_E2E_SAM_VS_ADAMW}x AdamW ({e2e.get('preset', 'medium')})")
        r = next((r for r in e2e.get("rows", []) if r["optimizer"] == opt), None)
        if r is None or r.get("vs_adamw") is None:
            add(name, "N/A", f"{opt} or adamw not measured")
        elif dev != "cuda":
            add(name, "N/A", f"{na_dev}; CPU ratio {r['vs_adamw']:.2f}x at preset "
                f"{e2e.get('preset')}")
        else:
            q = r["vs_adamw"]
            add(name, "PASS" if q <= TARGET_E2E_SAM_VS_ADAMW else "MISS",
                f"{q:.2f}x ({r['ms_median']:.1f} vs "
                f"{next(x for x in e2e['rows'] if x['optimizer'] == 'adamw')['ms_median']:.1f} ms)",
                value=q, threshold=TARGET_E2E_SAM_VS_ADAMW)
    return out


def table_lines(res: Dict[str, Any]) -> List[str]:
    """The compact table (markdown) printed last."""
    S = res.get("sections") or {}
    L: List[str] = []
    m = res["machine"]
    L.append(f"## gpu_bench: {res['device']} ({res['scale']}), {m.get('gpu_name') or m['cpu_model']}, "
             f"torch {m['torch']}, {res.get('wall_s', 0):.0f} s")
    if res.get("note"):
        L.append("")
        L.append(f"note: {res['note']}")
    cb = S.get("copy")
    L.append("")
    L.append(f"copy bandwidth: " + (f"{cb['bytes_per_s'] / 1e9:.1f} GB/s "
                                    f"({kernels._fmt_bytes(cb['bytes'] / 2)} x 2)" if cb else "n/a"))
    st = S.get("steps") or {}
    if st.get("rows"):
        sh = st.get("shape", {})
        L.append("")
        L.append(f"steps at {sh.get('n_params', 0):,} params / {sh.get('n_tensors')} tensors:")
        L.append("")
        L.append("| method | impl | ms | GB/s | % copy | launches | B/param |")
        L.append("|---|---|---|---|---|---|---|")
        for r in st["rows"]:
            la = (r.get("launches") or {}).get("total")
            f = r.get("frac_copy_bw")
            L.append(f"| {r['method']} | {r['impl']} | {r['ms_median']:.3f} | "
                     f"{r['bytes_per_s'] / 1e9:.1f} | {'n/a' if f is None else f'{f:.1%}'} | "
                     f"{'n/a' if la is None else la} | {r['bytes_per_param']} |")
    la = S.get("launches") or {}
    if la.get("rows"):
        L.append("")
        L.append("| launches/step | impl | " + " | ".join(
            f"{n} tensors" for n in sorted({r["n_tensors"] for r in la["rows"]})) + " |")
        ns = sorted({r["n_tensors"] for r in la["rows"]})
        L.append("|---|---|" + "---|" * len(ns))
        for (mm, ii) in sorted({(r["method"], r["impl"]) for r in la["rows"]}):
            cells = []
            for n in ns:
                r = next((r for r in la["rows"] if r["method"] == mm and r["impl"] == ii
                          and r["n_tensors"] == n), None)
                v = None if r is None else (r.get("launches") or {}).get("total")
                cells.append("n/a" if v is None else str(v))
            L.append(f"| {mm} | {ii} | " + " | ".join(cells) + " |")
    gr = S.get("graph") or {}
    if gr.get("rows"):
        L.append("")
        L.append("| graph | impl | tensors | bitwise | nodes | eager ms | replay ms |")
        L.append("|---|---|---|---|---|---|---|")
        for r in gr["rows"]:
            nodes = (r.get("graph_nodes") or {}).get("total", "n/a")
            L.append(f"| {r['method']} | {r['impl']} | {r['n_tensors']} | "
                     f"{'yes' if r.get('bitwise_equal') else 'NO'}"
                     f"{'' if r.get('replayed') else ' (eager vs eager)'} | {nodes} | "
                     f"{r.get('eager_ms', float('nan')):.3f} | {r.get('replay_ms', float('nan')):.3f} |")
    e2 = S.get("e2e") or {}
    if e2.get("rows"):
        L.append("")
        L.append(f"end-to-end step, preset {e2['preset']} ({e2['n_params'] / 1e6:.1f}M params, "
                 f"{e2['tokens']} tokens):")
        L.append("")
        L.append("| optimizer | ms/step | x adamw | peak mem |")
        L.append("|---|---|---|---|")
        for r in e2["rows"]:
            q = r.get("vs_adamw")
            L.append(f"| {r['optimizer']} | {r['ms_median']:.2f} | "
                     f"{'n/a' if q is None else f'{q:.2f}'} | "
                     f"{kernels._fmt_bytes(r.get('peak_allocated_bytes'))} |")
    hd = S.get("head") or {}
    if hd.get("rows"):
        L.append("")
        L.append("| head | step peak extra mem | ms |")
        L.append("|---|---|---|")
        for r in hd["rows"]:
            L.append(f"| {r['impl']} | {kernels._fmt_bytes(r['step_peak_extra_bytes'])} | "
                     f"{r['ms_median']:.2f} |")
    L.append("")
    L.append("| target | result | numbers |")
    L.append("|---|---|---|")
    for t in res.get("targets", []):
        L.append(f"| {t['target']} | {t['status']} | {t['detail']} |")
    sk = [s for sec in S.values() if isinstance(sec, dict) for s in sec.get("skipped", [])]
    sk += res.get("skipped_sections", [])
    fl = [f for sec in S.values() if isinstance(sec, dict) for f in sec.get("failed", [])]
    fl += res.get("failed_sections", [])
    if sk or fl:
        L.append("")
        for s in sk:
            L.append(f"- skipped {s['id']}: {s['reason']}")
        for f in fl:
            L.append(f"- FAILED {f['id']}: {f['error']}")
    return L


def write_results(res: Dict[str, Any], out_dir: str) -> None:
    res["targets"] = evaluate_targets(res)
    js = os.path.join(out_dir, "gpu_bench.json")
    tmp = js + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(tmp, js)
    with open(os.path.join(out_dir, "gpu_bench.md"), "w") as f:
        f.write("\n".join(table_lines(res)) + "\n")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="auto: cuda if torch.cuda.is_available(), else cpu")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny sizes (implied on CPU): practises every code path, 27 and 10,000 "
                         "tensors included")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes with 300 instead of 10,000 small tensors (the smoke test)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_BENCH_BUDGET_S", 150)),
                    help="wall-clock budget of the sections; a case that would start after it "
                         "is skipped and says so (default 150, or $GPU_BENCH_BUDGET_S)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"),
                    help="output directory (default $OUT when set, else bench/results)")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    want = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in want if s not in SECTIONS]
    if bad:
        print(f"gpu_bench.py: --sections {args.sections!r}: unknown {bad}; expected a subset of "
              f"{','.join(SECTIONS)}", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench.py: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    scale = "smoke" if args.smoke else ("tiny" if (args.tiny or device != "cuda") else "full")
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    res: Dict[str, Any] = dict(
        schema=SCHEMA, command="python bench/gpu_bench.py" + (
            " " + shlex.join(argv_list) if argv_list else ""),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=device, scale=scale, budget_s=args.budget_s, sizes=SIZES[scale],
        machine=kernels.machine_info(device), backends=kernels.backend_report(device),
        byte_model=kernels.BYTES_PER_PARAM, hyperparameters=kernels.HP,
        targets_thresholds=dict(frac_copy_bw=TARGET_FRAC_COPY,
                                triton_vs_cuda_time=TARGET_TRITON_VS_CUDA,
                                e2e_sam_vs_adamw=TARGET_E2E_SAM_VS_ADAMW),
        sections={}, skipped_sections=[], failed_sections=[], section_seconds={})
    if device != "cuda":
        res["note"] = ("no CUDA device: tiny sizes; the GPU-only measurements are skipped "
                       "and say so; timings here only practise the code")
    budget = Budget(args.budget_s)
    ctx: Dict[str, Any] = dict(device=device, sizes=SIZES[scale], backends=res["backends"],
                               results=res, budget=budget, reserve_s=min(5.0, args.budget_s / 20))

    def partial(upd: Dict[str, Any]) -> None:
        res["sections"].update(upd)
        res["wall_s"] = time.perf_counter() - t_start
        write_results(res, out_dir)

    ctx["partial"] = partial
    funcs = dict(copy=section_copy, steps=section_steps, launches=section_launches,
                 graph=section_graph, e2e=section_e2e, head=section_head)
    print(f"gpu_bench.py: device {device}, scale {scale}, budget {args.budget_s:.0f} s, "
          f"sections {','.join(want)}; writing {out_dir}/gpu_bench.json", flush=True)
    for name in SECTIONS:
        if name not in want:
            continue
        if budget.left() < ctx["reserve_s"]:
            res["skipped_sections"].append(dict(id=name, reason=(
                f"benchmark time budget ({args.budget_s:.0f} s) spent before it started")))
            continue
        t0 = time.perf_counter()
        print(f"gpu_bench.py: [{budget.spent():6.1f} s] {name} ...", flush=True)
        try:
            sec = funcs[name](ctx)
            res["sections"][name] = sec
            if name == "copy":
                res["copy_bandwidth"] = sec
        except Exception as exc:
            res["failed_sections"].append(dict(id=name, error=_err(exc)))
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            _free(device, template=True)
        res["section_seconds"][name] = time.perf_counter() - t0
        partial({})
    try:
        res["machine"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    res["wall_s"] = time.perf_counter() - t_start
    write_results(res, out_dir)
    print()
    print("\n".join(table_lines(res)))
    print(f"\ngpu_bench.py: wrote {out_dir}/gpu_bench.json and gpu_bench.md "
          f"in {res['wall_s']:.1f} s", flush=True)
    return 1 if res["failed_sections"] else 0


if __name__ == "__main__":
    sys.exit(main())
