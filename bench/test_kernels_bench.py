"""pytest-benchmark driver of the kernel benchmark (not a test of correctness).

Run through ``python bench/kernels.py``, which writes the plan (the cases to
time) and passes it in ``FSAM_BENCH_PLAN``, then turns pytest-benchmark's JSON
into bench/results/kernels-<device>*.json / .md. Without a plan every case is
skipped, so a bare ``pytest`` from the repository root never runs it by
accident. To run it directly: ``FSAM_BENCH=quick pytest bench/test_kernels_bench.py``
(``FSAM_BENCH=smoke|quick|full``, ``FSAM_BENCH_DEVICE=cpu|cuda``).
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(HERE), HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _load_plan():
    path = os.environ.get("FSAM_BENCH_PLAN")
    if path:
        with open(path) as f:
            return json.load(f)
    mode = os.environ.get("FSAM_BENCH")
    if mode in ("smoke", "quick", "full"):
        import kernels

        dev = os.environ.get("FSAM_BENCH_DEVICE", "cpu")
        return kernels.make_plan(mode, dev, kernels.backend_report(dev))
    return None


if os.environ.get("FSAM_BENCH_THREADS"):
    import torch

    torch.set_num_threads(int(os.environ["FSAM_BENCH_THREADS"]))

_PLAN = _load_plan()
_CASES = _PLAN["cases"] if _PLAN else []
if _PLAN:
    import torch  # noqa: F401  (imported before freezing)

    import kernels  # noqa: F401

    # keep the import-time objects out of the collections between cases (a full
    # gc.collect() over torch's objects takes ~0.4 s here)
    gc.collect()
    gc.freeze()


@pytest.mark.parametrize("case", _CASES or [None], ids=[c["id"] for c in _CASES] or ["no-plan"])
def test_step(benchmark, case):
    if case is None:
        pytest.skip("no benchmark plan: run `python bench/kernels.py` (or set FSAM_BENCH)")
    import torch

    import kernels

    device = _PLAN["device"]
    budget = _PLAN["budget"]
    gc.collect()
    if case["method"] == "copy":
        kernels.drop_template()  # the copy runs first; no template to keep around
    c = kernels.build_case(case, device)
    try:
        if device == "cuda":
            step = c.fn

            def fn():
                step()
                torch.cuda.synchronize()
        else:
            fn = c.fn
        fn()  # first call: lazy state (torch AdamW), kernel compilation/loading
        # second call, untimed by pytest-benchmark: memory of one step, and a rough time
        # (under the CPU memory profiler: a little slow) to choose the number of rounds
        t0 = time.perf_counter()
        memory = kernels.measure_memory(fn, device) if case["method"] != "copy" else None
        if memory is None:
            fn()
        t_one = time.perf_counter() - t0
        rounds = kernels.rounds_for(t_one, budget)
        benchmark.group = case.get("group") or "bandwidth"
        benchmark.extra_info.update(case_id=case["id"], method=case["method"], impl=case["impl"],
                                    n_params=case["n_params"], n_tensors=case["n_tensors"],
                                    bytes_per_param=case["bytes_per_param"], device=device,
                                    torch_threads=torch.get_num_threads())
        warm = 0 if t_one > kernels.SLOW_STEP_S else int(budget["warmup_rounds"])
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warm)
        if case["method"] != "copy":
            benchmark.extra_info["memory"] = memory
            benchmark.extra_info["launches"] = kernels.count_launches(c.fn, device)
        benchmark.extra_info["held_bytes"] = kernels._storage_bytes(c.held())
        benchmark.extra_info["note"] = c.note
    finally:
        c.close()
        del c
        gc.collect()
