"""Smoke test of the kernel benchmark machinery (bench/kernels.py).

Runs the ``--smoke`` plan (tiny shapes, two rounds per case) on one shape and
checks the JSON and markdown it writes: structure, machine description, and
that every number is positive and finite. No timing is asserted.
"""
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


@pytest.fixture(scope="module")
def kernels_mod():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import kernels

    return kernels


def _pos(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_shapes(kernels_mod):
    k = kernels_mod
    rs = k.resnet_shapes(1.0)
    assert len(rs) == 161
    assert sum(len(s) == 4 for s in rs) == 53
    assert 25.4e6 < sum(k.numel(s) for s in rs) < 25.7e6  # ResNet-50
    assert len(k.gpt_shapes(64, 2, 100)) == 2 + 6 * 2 + 1
    ms = k.many_small_shapes(1000, 1 << 20)
    assert len(ms) == 1000 and 0.8 < sum(k.numel(s) for s in ms) / (1 << 20) < 1.2
    for mode, dev in (("quick", "cpu"), ("full", "cpu")):
        sizes = [sum(k.numel(s) for s in k.build_shapes(f, kw)) for f, kw in k.SIZES[(mode, dev)]]
        assert max(sizes) >= 16e6  # the CPU targets need a 16M+ case
    for mode in ("quick", "full"):
        sizes = [sum(k.numel(s) for s in k.build_shapes(f, kw)) for f, kw in k.SIZES[(mode, "cuda")]]
        assert max(sizes) >= 100e6


def test_baseline_matches_reference_sam_step():
    """The common wrapper does one SAM step: same result as the reference backend."""
    import torch

    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    from baseline import CommonSAM

    from fsam_kernels.backends import get_backend

    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 3, 2, 2)]
    p0 = [torch.randn(s) for s in shapes]
    g1 = [torch.randn(s) for s in shapes]
    g2 = [torch.randn(s) for s in shapes]
    ps = [p.clone() for p in p0]
    opt = CommonSAM(ps, rho=0.05, lr=1e-2, weight_decay=0.1)
    for p, g in zip(ps, g1):
        p.grad = g
    opt.first_step()
    n = torch.sqrt(sum((g.double() ** 2).sum() for g in g1))
    for p, q, g in zip(ps, p0, g1):
        torch.testing.assert_close(p, q + 0.05 / (n.float() + 1e-12) * g)
    for p, g in zip(ps, g2):
        p.grad = g
    opt.second_step()

    be = get_backend("reference")
    rp = [p.clone() for p in p0]
    bs = [torch.empty_like(p) for p in p0]
    ms = [torch.zeros_like(p) for p in p0]
    vs = [torch.zeros_like(p) for p in p0]
    st = [torch.zeros(()) for _ in p0]
    fi = torch.zeros(())
    be.restore_adamw(rp, g2, None, ms, vs, st, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.1, maximize=False, grad_scale=None, found_inf=fi)
    for a, b in zip(ps, rp):
        torch.testing.assert_close(a, b)


def test_smoke_run_writes_sane_json(kernels_mod, tmp_path):
    import importlib.util

    # a test dependency (requirements.txt); a machine whose offline set-up could not fetch
    # it fails here with its name instead of the bench's pytest usage error
    assert importlib.util.find_spec("pytest_benchmark") is not None, \
        "pytest-benchmark (requirements.txt) is not installed: bench/kernels.py needs it"
    k = kernels_mod
    from fsam_kernels.backends import available_backends

    # triton on CPU is the (slow) interpreter: not needed to check the machinery
    backends = [b for b in available_backends("cpu") if b != "triton"]
    rc = k.main(["--smoke", "--device", "cpu", "--shapes", "many-small", "--threads", "1",
                 "--backends", ",".join(backends), "--out", str(tmp_path)])
    assert rc == 0
    js = tmp_path / "kernels-cpu-smoke.json"
    md = tmp_path / "kernels-cpu-smoke.md"
    raw = tmp_path / "kernels-cpu-smoke.pytest-benchmark.json"
    assert js.exists() and md.exists() and raw.exists()
    res = json.loads(js.read_text())
    assert res["schema"] == k.SCHEMA
    assert res["device"] == "cpu" and res["mode"] == "smoke"
    assert "bench/kernels.py" in res["command"] and "--smoke" in res["command"]
    m = res["machine"]
    assert m["cpu_model"] and m["cpu_count"] >= 1 and m["torch"]
    cb = res["copy_bandwidth"]
    assert _pos(cb["bytes_per_s"]) and _pos(cb["median_s"]) and cb["bytes"] == 8 * cb["numel"]
    assert res["byte_model"] == {"sam": 48, "psam": 56, "adamw": 28, "copy": 8}

    cases = res["cases"]
    impls = {(c["method"], c["impl"]) for c in cases}
    # always-present implementations (this repo's pure-PyTorch backends, torch, the baseline)
    for need in (("sam", "reference"), ("psam", "reference"), ("sam", "foreach"),
                 ("psam", "foreach"), ("adamw", "torch-foreach"), ("sam", "baseline"),
                 ("sam", "optim:auto")):
        assert need in impls, need
    for b in backends:
        assert ("sam", b) in impls or any(b in f["id"] for f in res["failed"]), b
    for c in cases:
        assert c["family"] == "many-small" and c["n_tensors"] == 40
        assert c["bytes_per_param"] == {"sam": 48, "psam": 56, "adamw": 28}[c["method"]]
        assert c["model_bytes"] == c["bytes_per_param"] * c["n_params"]
        for key in ("ms_median", "ms_min", "ms_mean", "bytes_per_s", "frac_copy_bw",
                    "held_bytes"):
            assert _pos(c[key]), (c["id"], key, c[key])
        assert c["ms_min"] <= c["ms_median"] and c["rounds"] >= 1
        assert c["launches"] is None  # n/a on CPU
        mem = c["memory"]
        assert mem["step_peak_extra_bytes"] >= 0 and mem["method"]
    for t in res["targets"]:
        assert t["status"] in ("PASS", "MISS", "N/A") and t["detail"]
    for s in res["skipped"]:
        assert s["id"] and s["reason"]
    text = md.read_text()
    assert m["cpu_model"] in text and "copy bandwidth" in text and "| sam | baseline |" in text
    rawj = json.loads(raw.read_text())
    assert len(rawj["benchmarks"]) == len(cases) + 1  # + the copy-bandwidth case


def test_gpu_bench_cpu_path_smoke(tmp_path):
    """bench/gpu_bench.py's CPU path at its smoke size: every section runs or says
    why not, the JSON has the expected keys, and without a GPU the GPU-only
    targets are N/A with a reason (no timing asserted)."""
    import torch

    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import gpu_bench

    rc = gpu_bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--budget-s", "120"])
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    md = (tmp_path / "gpu_bench.md").read_text()
    assert res["schema"] == gpu_bench.SCHEMA and res["device"] == "cpu" and res["scale"] == "smoke"
    assert res["failed_sections"] == [] and rc == 0, res["failed_sections"]
    S = res["sections"]
    assert set(S) == set(gpu_bench.SECTIONS) and set(res["section_seconds"]) == set(S)
    for sec in S.values():
        assert sec.get("failed", []) == [], sec["failed"]

    cb = res["copy_bandwidth"]
    assert _pos(cb["bytes_per_s"]) and cb["bytes"] == 8 * cb["numel"]
    fused = [b for b in ("cpu", "foreach") if res["backends"][b]["available"]]
    impls = {(r["method"], r["impl"]) for r in S["steps"]["rows"]}
    for b in fused:
        assert {("sam", b), ("psam", b), ("adamw", b)} <= impls
    assert ("adamw", "torch-foreach") in impls
    for r in S["steps"]["rows"]:
        assert r["bytes_per_param"] == gpu_bench.kernels.BYTES_PER_PARAM[r["method"]]
        assert r["model_bytes"] == r["bytes_per_param"] * r["n_params"]
        assert _pos(r["ms_median"]) and _pos(r["bytes_per_s"]) and _pos(r["frac_copy_bw"])
        assert r["launches"] is None  # counted on CUDA only

    # 27 tensors and the many-small shape, every fused backend and method
    la = S["launches"]["rows"]
    assert {r["n_tensors"] for r in la} == {27, 300}
    assert len(la) == 2 * 3 * len(fused) and all(r["launches"] is None for r in la)
    gr = S["graph"]["rows"]
    assert len(gr) == 2 * 3 * len(fused)
    for r in gr:  # without CUDA: two eager runs from one start, compared bitwise
        assert r["same_start"] and r["replayed"] == 0 and r["bitwise_equal"], r
    e2e = {r["optimizer"]: r for r in S["e2e"]["rows"]}
    assert S["e2e"]["preset"] == "tiny" and {"adamw", "sam", "fsam"} <= set(e2e)
    assert e2e["adamw"]["vs_adamw"] == 1.0 and _pos(e2e["sam"]["vs_adamw"])

    # skip reasons: what needs a GPU says so
    reasons = {s["id"]: s["reason"] for sec in S.values() for s in sec.get("skipped", [])}
    if not torch.cuda.is_available():
        assert "needs CUDA" in reasons["launches"] and "needs CUDA" in reasons["graph"]
        assert "cuda" in reasons["steps:cuda"]
        assert "steps:triton" in reasons
        targets = {t["target"]: t for t in res["targets"]}
        for name, t in targets.items():
            assert t["status"] == "N/A" and t["detail"], name
        assert any("launches per step" in n for n in targets)
        assert any("CUDA-graph" in n for n in targets)
        assert any("end-to-end SAM" in n for n in targets)
        assert sum("of copy bandwidth at 100M+" in n for n in targets) == 6
    if not S["head"]["rows"]:
        assert "head" in reasons
    assert "| target | result | numbers |" in md and "copy bandwidth" in md


def test_missing_pytest_benchmark_is_named(kernels_mod, tmp_path, monkeypatch, capsys):
    """Without pytest-benchmark, bench/kernels.py exits 2 naming it and writes nothing."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytest_benchmark" else real(name, *a))
    out = tmp_path / "out"
    assert kernels_mod.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 2
    assert "pytest-benchmark is not installed" in capsys.readouterr().err
    assert not out.exists()
