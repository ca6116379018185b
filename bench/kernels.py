#!/usr/bin/env python
"""Kernel benchmark of fsam_kernels: one optimizer-side SAM step per backend.

    python bench/kernels.py [--quick] [--device cpu|cuda] [--out bench/results]

For several model shapes (GPT-like: few large tensors; ResNet-like: the 161
tensors of a ResNet-50, 4-D conv weights and BN vectors, width-scaled;
many small tensors) it times, with fixed fake gradients and no model
forward/backward:

- ``sam``   one plain SAM step, sq_norm + perturb + restore_adamw
            (SPEC §6), for every backend ``available_backends(device)`` reports;
- ``psam``  the same, preconditioned (SPEC §1, every parameter at t >= 1);
- ``adamw`` a plain AdamW step: each backend's restore_adamw without backup,
            and torch.optim.AdamW with foreach=True and fused=True;
- ``sam`` / baseline: the per-tensor SAM wrapper users run today
            (bench/baseline.py) around torch.optim.AdamW(fused=True);
- ``sam`` / optim:auto: the library's own ``fsam_kernels.SAM(backend="auto")``
            first_step + second_step (the kernels plus the optimizer's Python);
- ``copy``  the machine's copy bandwidth, ``dst.copy_(src)`` on a large tensor,
            bytes read + written per second, measured in the same run.

Timing is done by pytest-benchmark (the project's benchmarking dependency):
this script writes a plan, runs ``pytest bench/test_kernels_bench.py`` in a
subprocess with ``--benchmark-json``, then turns the raw JSON into
``<out>/kernels-<device>[-quick].json`` and ``.md`` (ms/step, bytes/s by the
SPEC §6 byte model, fraction of copy bandwidth, launches per step on GPU,
memory) and reports the issue's targets as PASS/MISS (never asserted).
See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEST_FILE = os.path.join(HERE, "test_kernels_bench.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

SCHEMA = "fsam_kernels/bench-kernels/1"

#: SPEC §6 byte model, bytes moved per float32 parameter by an ideal fused step
BYTES_PER_PARAM = {"sam": 48, "psam": 56, "adamw": 28, "copy": 8}

#: hyperparameters of every timed step (AdamW defaults, weight decay on)
HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, rho=0.05)
NORM_EPS = 1e-12

# ---------------------------------------------------------------------------
# model shapes
# ---------------------------------------------------------------------------


def gpt_shapes(d: int, layers: int, vocab: int, ctx: int = 1024) -> List[Tuple[int, ...]]:
    """GPT-like: token and position embeddings, per layer qkv / proj / fc / fc-proj
    matrices and two LayerNorm weights, a final LayerNorm (few large tensors)."""
    shapes: List[Tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (3 * d, d), (d, d), (d,), (4 * d, d), (d, 4 * d)]
    shapes.append((d,))
    return shapes


def resnet_shapes(width: float = 1.0, classes: int = 1000) -> List[Tuple[int, ...]]:
    """ResNet-50-like (161 tensors): 53 4-D conv weights, 53 BN weight/bias
    pairs, the fc layer; channel counts scaled by ``width``."""
    def c(n):
        return max(1, int(round(n * width)))

    shapes: List[Tuple[int, ...]] = []

    def conv_bn(cout, cin, k):
        shapes.append((cout, cin, k, k))
        shapes.extend([(cout,), (cout,)])

    conv_bn(c(64), 3, 7)
    inplanes = c(64)
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        p = c(planes)
        for b in range(blocks):
            conv_bn(p, inplanes, 1)
            conv_bn(p, p, 3)
            conv_bn(4 * p, p, 1)
            if b == 0:
                conv_bn(4 * p, inplanes, 1)  # downsample
            inplanes = 4 * p
    shapes += [(classes, inplanes), (classes,)]
    return shapes


def many_small_shapes(n: int, total: int) -> List[Tuple[int, ...]]:
    """``n`` small tensors (1-D and 2-D, sizes between 0.25x and 1.75x the mean,
    deterministic) holding about ``total`` elements."""
    mean = max(1, total // n)
    shapes: List[Tuple[int, ...]] = []
    x = 12345
    for i in range(n):
        x = (1103515245 * x + 12345) % (2 ** 31)
        k = max(1, int(mean * (0.25 + 1.5 * (x / 2 ** 31))))
        if i % 3 == 2 and k >= 16:
            shapes.append((16, k // 16))
        else:
            shapes.append((k,))
    return shapes


def numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def size_label(n: int) -> str:
    if n >= 10 ** 9:
        return f"{n / 1e9:.1f}B"
    if n >= 10 ** 6:
        return f"{n / 1e6:.0f}M" if n >= 10 ** 7 else f"{n / 1e6:.1f}M"
    if n >= 10 ** 3:
        return f"{n / 1e3:.0f}k"
    return str(n)


#: (shape family, builder kwargs) per mode and device
SIZES: Dict[Tuple[str, str], List[Tuple[str, Dict[str, Any]]]] = {
    ("smoke", "cpu"): [("gpt", dict(d=32, layers=1, vocab=64, ctx=16)),
                       ("resnet", dict(width=1 / 16, classes=10)),
                       ("many-small", dict(n=40, total=4000))],
    ("quick", "cpu"): [("gpt", dict(d=512, layers=4, vocab=8192)),          # 17M
                       ("resnet", dict(width=0.25)),                         # 1.9M, 161 tensors
                       ("many-small", dict(n=2000, total=1 << 20))],        # 1M, 2000 tensors
    ("full", "cpu"): [("gpt", dict(d=512, layers=4, vocab=8192)),           # 17M
                      ("gpt", dict(d=1024, layers=4, vocab=16384)),          # 68M
                      ("resnet", dict(width=0.25)),                          # 1.9M
                      ("resnet", dict(width=1.0)),                           # 25.6M (ResNet-50)
                      ("many-small", dict(n=2000, total=1 << 20)),
                      ("many-small", dict(n=10000, total=16 << 20))],        # 17M, 10k tensors
    ("quick", "cuda"): [("gpt", dict(d=768, layers=12, vocab=50304)),       # 124M (GPT-2)
                        ("resnet", dict(width=1.0)),                          # 25.6M
                        ("many-small", dict(n=10000, total=16 << 20))],
    ("full", "cuda"): [("gpt", dict(d=768, layers=12, vocab=50304)),        # 124M
                       ("gpt", dict(d=1024, layers=24, vocab=50304)),         # 355M
                       ("resnet", dict(width=1.0)),                           # 25.6M
                       ("resnet", dict(width=2.0)),                           # ~100M
                       ("many-small", dict(n=10000, total=16 << 20)),
                       ("many-small", dict(n=20000, total=100 << 20))],       # 105M, 20k tensors
}
SIZES[("smoke", "cuda")] = SIZES[("smoke", "cpu")]

#: per mode: copy-bandwidth tensor elements (float32) per device type
COPY_NUMEL = {("smoke", "cpu"): 1 << 20, ("quick", "cpu"): 32 << 20, ("full", "cpu"): 64 << 20,
              ("smoke", "cuda"): 1 << 20, ("quick", "cuda"): 512 << 20,
              ("full", "cuda"): 512 << 20}
COPY_NUMEL[("smoke", "cuda")] = 1 << 20

#: timing budget per case: (seconds of timed rounds, min rounds, max rounds, warmup rounds)
#: (warm-up rounds are dropped for steps slower than SLOW_STEP_S)
BUDGET = {"smoke": (0.0, 2, 2, 0), "quick": (0.25, 3, 50, 0), "full": (2.0, 3, 500, 2)}
SLOW_STEP_S = 1.0

#: the reference backend reads device values per tensor (.item(): a sync each); on CUDA
#: it is run only up to this many tensors, to keep a GPU run short
CUDA_REFERENCE_MAX_TENSORS = 2000

BUILDERS = {"gpt": gpt_shapes, "resnet": resnet_shapes, "many-small": many_small_shapes}


def build_shapes(family: str, kw: Dict[str, Any]) -> List[Tuple[int, ...]]:
    return BUILDERS[family](**kw)


# ---------------------------------------------------------------------------
# machine description
# ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mem_available(device: str) -> Optional[int]:
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(device: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        "mem_total_bytes": _mem_total(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=torch.cuda.get_device_name(0), gpu_mem_bytes=int(props.total_memory),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count())
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            timeout=10).stdout.strip() or None
    except Exception:
        info["git_commit"] = None
    return info


# ---------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------


def backend_report(device: str) -> Dict[str, Dict[str, Any]]:
    from fsam_kernels.backends import _REGISTRY, backend_availability

    out = {}
    for name in _REGISTRY:
        try:
            ok, why = backend_availability(name, device)
        except Exception as exc:  # a backend module that raises while probing
            ok, why = False, f"availability check raised {type(exc).__name__}: {exc}"
        out[name] = {"available": bool(ok), "reason": why}
    return out


def auto_backend(device: str) -> Optional[str]:
    try:
        from fsam_kernels.backends import get_backend
        return get_backend("auto", device).name
    except Exception:
        return None


def _interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


#: the triton interpreter on CPU tensors is only run on shapes this small
INTERPRETER_MAX_PARAMS = 1 << 16
INTERPRETER_MAX_TENSORS = 200


#: backends timed only for plain SAM in --quick (the slow pure-PyTorch paths; --quick
#: keeps the cases the targets need and the fused backends' psam / adamw rows)
QUICK_SAM_ONLY = ("reference", "foreach")


def make_plan(mode: str, device: str, backends: Dict[str, Dict[str, Any]],
              only_backends: Optional[List[str]] = None,
              only_shapes: Optional[List[str]] = None) -> Dict[str, Any]:
    from baseline import adamw_fused_supported

    avail = [n for n, r in backends.items() if r["available"]]
    if only_backends:
        avail = [n for n in avail if n in only_backends]
    fused_ok, fused_why = adamw_fused_supported(device)
    cases: List[Dict[str, Any]] = []
    skipped: List[Dict[str, str]] = []
    budget = BUDGET[mode]
    copy_n = COPY_NUMEL[(mode, device)]
    cases.append(dict(id="copy", family="copy", label=size_label(copy_n), method="copy",
                      impl="torch copy_", n_params=copy_n, n_tensors=1,
                      bytes_per_param=BYTES_PER_PARAM["copy"]))
    auto = auto_backend(device)
    mem_free = mem_available(device)
    for family, kw in SIZES[(mode, device)]:
        if only_shapes and family not in only_shapes:
            continue
        shapes = build_shapes(family, kw)
        n = sum(numel(s) for s in shapes)
        label = size_label(n)
        # template (p, g1, g2, m, v) + one case (p, g1, g2, b, m, v) + temporaries of the
        # per-tensor paths (a few copies of the largest tensor), float32
        need = 4 * (5 * n + 6 * n + 6 * max(numel(s) for s in shapes))
        group = f"{family}-{label}"
        common = dict(family=family, label=label, group=group, shape_kw=kw,
                      n_params=n, n_tensors=len(shapes))
        if mem_free is not None and need > 0.85 * mem_free:
            skipped.append(dict(id=group, reason=f"needs ~{need / 2**30:.1f} GiB, "
                                f"{mem_free / 2**30:.1f} GiB available on {device}"))
            continue
        impls: List[Tuple[str, str]] = []
        for b in avail:
            if b == "reference" and device == "cuda" and len(shapes) > CUDA_REFERENCE_MAX_TENSORS:
                skipped.append(dict(id=f"{group}:*:{b}", reason=(
                    "the reference backend syncs per tensor on CUDA (.item()); run only up to "
                    f"{CUDA_REFERENCE_MAX_TENSORS} tensors to keep the GPU run short")))
                continue
            if _interpreted(b, device) and (n > INTERPRETER_MAX_PARAMS
                                            or len(shapes) > INTERPRETER_MAX_TENSORS):
                skipped.append(dict(id=f"{group}:*:{b}", reason=(
                    "triton on CPU tensors runs through the Triton interpreter (a "
                    "correctness path, not a performance one); run only on shapes "
                    f"<= {INTERPRETER_MAX_PARAMS} params and <= {INTERPRETER_MAX_TENSORS} tensors")))
                continue
            if mode == "quick" and b in QUICK_SAM_ONLY:
                impls.append(("sam", b))
            else:
                impls += [("sam", b), ("psam", b), ("adamw", b)]
        impls.append(("adamw", "torch-foreach"))
        if fused_ok:
            impls.append(("adamw", "torch-fused"))
        impls.append(("sam", "baseline"))
        if auto is not None and (only_backends is None or auto in only_backends):
            impls.append(("sam", "optim:auto"))
        for method, impl in impls:
            cases.append(dict(common, id=f"{group}:{method}:{impl}", method=method, impl=impl,
                              bytes_per_param=BYTES_PER_PARAM[method],
                              auto_backend=auto if impl == "optim:auto" else None))
    if not fused_ok:
        skipped.append(dict(id="*:adamw:torch-fused", reason=fused_why))
    for name, r in backends.items():
        if not r["available"]:
            skipped.append(dict(id=f"*:*:{name}", reason=r["reason"]))
        elif only_backends and name not in only_backends:
            skipped.append(dict(id=f"*:*:{name}", reason="not selected with --backends"))
    return dict(mode=mode, device=device, budget=dict(zip(
        ("seconds", "min_rounds", "max_rounds", "warmup_rounds"), budget)),
        baseline_fused=fused_ok, baseline_note="" if fused_ok else fused_why + "; the baseline "
        "uses torch.optim.AdamW(foreach=True)", auto_backend=auto,
        cases=cases, skipped=skipped)


# ---------------------------------------------------------------------------
# building and running one case (used inside the pytest process)
# ---------------------------------------------------------------------------

_TEMPLATE: Dict[str, Any] = {}


def _template(case: Dict[str, Any], device: str) -> Dict[str, List[torch.Tensor]]:
    """Random p, g1, g2, m, v for the case's shapes, cached for the group."""
    key = (case["group"], device)
    if _TEMPLATE.get("key") != key:
        _TEMPLATE.clear()
        shapes = build_shapes(case["family"], case["shape_kw"])
        gen = torch.Generator(device=device).manual_seed(0)

        def rnd(shape, scale):
            return torch.randn(shape, generator=gen, device=device).mul_(scale)

        ps = [rnd(s, 0.02) for s in shapes]
        g1 = [rnd(s, 1e-3) for s in shapes]
        g2 = [rnd(s, 1e-3) for s in shapes]
        ms = [g * 0.1 for g in g1]
        vs = [g * g * 1e-2 + 1e-12 for g in g2]
        _TEMPLATE.update(key=key, data=dict(p=ps, g1=g1, g2=g2, m=ms, v=vs))
    return _TEMPLATE["data"]


def drop_template() -> None:
    _TEMPLATE.clear()


def _clone(ts):
    return [t.clone() for t in ts]


def _storage_bytes(tensors) -> int:
    seen = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        try:
            st = t.untyped_storage()
            k = (st.data_ptr(), st.device.type)
            if k in seen:
                continue
            seen.add(k)
            total += st.nbytes()
        except Exception:
            total += t.numel() * t.element_size()
    return total


def _opt_state_tensors(opt) -> List[torch.Tensor]:
    out = []
    for st in opt.state.values():
        out += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return out


class Case:
    """One timed step: ``fn()`` runs it; ``held()`` lists the tensors it keeps."""

    def __init__(self, fn: Callable[[], None], held: Callable[[], List[torch.Tensor]],
                 note: str = "") -> None:
        self.fn, self.held, self.note = fn, held, note

    def close(self) -> None:
        self.fn = self.held = None  # type: ignore[assignment]


def _two_pass_step(opt, ps, g1, g2) -> Callable[[], None]:
    """One optimizer-level SAM step with fixed fake grads: g1 for the ascent, g2
    for the descent (set as ``.grad`` as a backward would)."""

    def step():
        for p, g in zip(ps, g1):
            p.grad = g
        opt.first_step()
        for p, g in zip(ps, g2):
            p.grad = g
        opt.second_step()

    return step


def build_case(case: Dict[str, Any], device: str) -> Case:
    method, impl = case["method"], case["impl"]
    dev = torch.device(device)
    if method == "copy":
        src = torch.rand(case["n_params"], device=dev)
        dst = torch.empty_like(src)
        return Case(lambda: dst.copy_(src), lambda: [src, dst])

    t = _template(case, device)
    ps = _clone(t["p"])
    hp = HP
    if impl in ("torch-foreach", "torch-fused"):
        for p, g in zip(ps, t["g2"]):
            p.grad = g.clone()
        kw = dict(foreach=True) if impl == "torch-foreach" else dict(fused=True)
        opt = torch.optim.AdamW(ps, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                                weight_decay=hp["weight_decay"], **kw)
        return Case(opt.step, lambda: ps + [p.grad for p in ps] + _opt_state_tensors(opt))

    g1, g2 = _clone(t["g1"]), _clone(t["g2"])
    if impl == "baseline":
        from baseline import CommonSAM

        opt = CommonSAM(ps, rho=hp["rho"], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]),
                        eps=hp["eps"], weight_decay=hp["weight_decay"])

        return Case(_two_pass_step(opt, ps, g1, g2),
                    lambda: ps + g1 + g2 + _opt_state_tensors(opt)
                    + _opt_state_tensors(opt.base_optimizer),
                    note=f"AdamW {opt.base_impl}" + (f" ({opt.base_note})" if opt.base_note else ""))

    if impl == "optim:auto":
        import fsam_kernels

        opt = fsam_kernels.SAM(ps, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                               weight_decay=hp["weight_decay"], rho=hp["rho"], backend="auto")

        return Case(_two_pass_step(opt, ps, g1, g2),
                    lambda: ps + g1 + g2 + _opt_state_tensors(opt)
                    + list(opt._backups.values()),
                    note="SAM(backend='auto') -> " + ",".join(opt.backends.values()))

    # a backend's multi-tensor operations, called as fsam_kernels.SAM calls them:
    # the same tuples of params, backups and state every step with one cache
    # dict (backends/base.py), the grads gathered anew each step
    from fsam_kernels.backends import get_backend

    be = get_backend(impl, dev)
    ps = tuple(ps)
    ms, vs = tuple(_clone(t["m"])), tuple(_clone(t["v"]))
    steps = tuple(torch.full((), 10.0, dtype=torch.float32, device=dev) for _ in ps)
    cache: Dict[str, Any] = {}
    norm_sq = torch.zeros((), dtype=be.norm_dtype, device=dev)
    found_inf = torch.zeros((), dtype=torch.float32, device=dev)
    adam = dict(lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"],
                weight_decay=hp["weight_decay"], maximize=False, grad_scale=None)
    if method == "adamw":
        del g1

        def step():
            be.restore_adamw(ps, tuple(g2), None, ms, vs, steps, found_inf=found_inf,
                             cache=cache, **adam)

        return Case(step, lambda: [*ps, *g2, *ms, *vs, *steps])

    bs = tuple(torch.zeros_like(p) for p in ps)  # zeros: two builds start bitwise equal
    pre = method == "psam"
    v_in = vs if pre else None
    s_in = steps if pre else None

    def step():
        norm_sq.zero_()
        found_inf.zero_()
        gs1 = tuple(g1)
        be.sq_norm(gs1, v_in, s_in, beta2=hp["beta2"], eps=hp["eps"], precondition=pre,
                   grad_scale=None, out=norm_sq, cache=cache)
        be.perturb(ps, gs1, bs, v_in, s_in, rho=hp["rho"], norm_sq=norm_sq, norm_eps=NORM_EPS,
                   beta2=hp["beta2"], eps=hp["eps"], precondition=pre, grad_scale=None,
                   found_inf=found_inf, cache=cache)
        be.restore_adamw(ps, tuple(g2), bs, ms, vs, steps, found_inf=found_inf, cache=cache,
                         **adam)

    return Case(step, lambda: [*ps, *g1, *g2, *bs, *ms, *vs, *steps, norm_sq, found_inf])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_memory(fn: Callable[[], None], device: str) -> Dict[str, Any]:
    """Peak extra memory allocated while one step runs (see README)."""
    if device == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated()
        return dict(step_peak_extra_bytes=int(peak - before), peak_allocated_bytes=int(peak),
                    method="torch.cuda.max_memory_allocated() - memory_allocated() before the "
                           "step (whole process, includes the benchmark's cached template)")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    evs = [e for e in prof.profiler.kineto_results.events()
           if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    evs.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in evs:
        cur += e.nbytes()
        peak = max(peak, cur)
    return dict(step_peak_extra_bytes=int(peak), method="torch.profiler(profile_memory=True): "
                "peak of the running sum of torch CPU allocations minus frees during one step "
                "(memory a backend allocates outside torch's allocator is not seen)")


_LAUNCH_API = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
               "cudaLaunchCooperativeKernel", "cudaGraphLaunch")


def count_launches(fn: Callable[[], None], device: str) -> Optional[Dict[str, int]]:
    """GPU work items of one step, from the torch profiler (CUPTI): kernels, memcpy, memset."""
    if device != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    kernels = memcpy = memset = api = 0
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if e.device_type() == DeviceType.CUDA and name != "[memory]":
            low = name.lower()
            if low.startswith("memcpy"):
                memcpy += 1
            elif low.startswith("memset"):
                memset += 1
            else:
                kernels += 1
        elif name in _LAUNCH_API:
            api += 1
    return dict(kernels=kernels, memcpy=memcpy, memset=memset, launch_api_calls=api,
                total=kernels + memcpy + memset)


def rounds_for(t_one: float, budget: Dict[str, Any]) -> int:
    if budget["seconds"] <= 0 or t_one <= 0:
        return int(budget["min_rounds"])
    r = int(math.ceil(budget["seconds"] / t_one))
    return int(min(max(r, budget["min_rounds"]), budget["max_rounds"]))


# ---------------------------------------------------------------------------
# results: from pytest-benchmark's JSON to ours
# ---------------------------------------------------------------------------


def _junit_outcomes(path: str) -> Dict[str, Tuple[str, str]]:
    """test id -> (outcome, message) for failed / skipped / errored tests."""
    out: Dict[str, Tuple[str, str]] = {}
    if not os.path.exists(path):
        return out
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return out
    for tc in root.iter("testcase"):
        name = tc.get("name", "")
        cid = name[name.find("[") + 1:-1] if "[" in name else name
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                out[cid] = (tag, msg[0][:300] if msg else "")
    return out


def _fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "n/a"
    for unit, k in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(b) >= k:
            return f"{b / k:.1f} {unit}"
    return f"{int(b)} B"


def _finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def summarize(plan: Dict[str, Any], raw: Dict[str, Any], junit: Dict[str, Tuple[str, str]]
              ) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, Any]], List[Dict[str, str]]]:
    by_id = {}
    for b in raw.get("benchmarks", []):
        ei = b.get("extra_info", {})
        cid = ei.get("case_id") or b.get("param")
        by_id[cid] = b
    rows: List[Dict[str, Any]] = []
    copy_row = None
    failed: List[Dict[str, str]] = []
    for case in plan["cases"]:
        b = by_id.get(case["id"])
        if b is None:
            outcome, msg = junit.get(case["id"], ("missing", "no result (see pytest output)"))
            failed.append(dict(id=case["id"], outcome=outcome, message=msg))
            continue
        st, ei = b["stats"], b.get("extra_info", {})
        row = {k: case.get(k) for k in ("id", "family", "label", "group", "method", "impl",
                                        "n_params", "n_tensors", "bytes_per_param")}
        model_bytes = case["bytes_per_param"] * case["n_params"]
        row.update(
            dtype="float32", model_bytes=model_bytes,
            ms_median=st["median"] * 1e3, ms_min=st["min"] * 1e3, ms_mean=st["mean"] * 1e3,
            ms_stddev=st["stddev"] * 1e3, ms_iqr=st.get("iqr", 0.0) * 1e3, rounds=st["rounds"],
            bytes_per_s=model_bytes / st["median"] if st["median"] > 0 else None,
            bytes_per_s_best=model_bytes / st["min"] if st["min"] > 0 else None,
            launches=ei.get("launches"), memory=ei.get("memory"), held_bytes=ei.get("held_bytes"),
            note=ei.get("note", ""))
        if case["method"] == "copy":
            copy_row = row
        rows.append(row)
    bw = copy_row["bytes_per_s"] if copy_row else None
    bw_best = copy_row["bytes_per_s_best"] if copy_row else None
    for r in rows:
        r["frac_copy_bw"] = (r["bytes_per_s"] / bw) if (bw and r["bytes_per_s"]) else None
        r["frac_copy_bw_best"] = (r["bytes_per_s_best"] / bw_best) if (
            bw_best and r["bytes_per_s_best"]) else None
    return rows, copy_row, failed


def _find(rows, group, method, impl):
    for r in rows:
        if r.get("group") == group and r["method"] == method and r["impl"] == impl:
            return r
    return None


def evaluate_targets(rows: List[Dict[str, Any]], device: str,
                     backends: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets, PASS / MISS / N/A with the numbers (never asserted)."""
    out: List[Dict[str, Any]] = []

    def add(name, status, detail, **kw):
        out.append(dict(target=name, status=status, detail=detail, **kw))

    def na_backend(b):
        r = backends.get(b, {})
        return f"backend {b!r} not measured: " + (r.get("reason") or "not available/selected")

    if device == "cpu":
        b = "cpu"
        big = [r for r in rows if r["method"] == "sam" and r["impl"] == b and r["n_params"] >= 16e6]
        if not big:
            why = na_backend(b) if not any(r["impl"] == b for r in rows) else \
                "no case with >= 16M parameters in this run"
            for name in ("cpu SAM step >= 70% of copy bandwidth (fp32, 16M+ params)",
                         "cpu SAM step >= 5x faster than reference",
                         "cpu SAM step >= 2x faster than the common wrapper baseline"):
                add(name, "N/A", why)
        for r in big:
            g = r["group"]
            f = r["frac_copy_bw"]
            add(f"cpu SAM step >= 70% of copy bandwidth [{g}]",
                "PASS" if f is not None and f >= 0.70 else "MISS",
                f"{f * 100:.1f}% of copy bandwidth ({r['bytes_per_s'] / 1e9:.2f} GB/s by the 48 B/param "
                f"model, {r['ms_median']:.2f} ms/step)" if f is not None else "no copy bandwidth",
                group=g, value=f, threshold=0.70)
            for other, k, label in (("reference", 5.0, "reference"), ("baseline", 2.0,
                                                                       "the common wrapper baseline")):
                o = _find(rows, g, "sam", other)
                if o is None:
                    add(f"cpu SAM step >= {k:g}x faster than {label} [{g}]", "N/A",
                        f"{other} not measured for {g}", group=g)
                    continue
                sp = o["ms_median"] / r["ms_median"]
                add(f"cpu SAM step >= {k:g}x faster than {label} [{g}]",
                    "PASS" if sp >= k else "MISS",
                    f"{sp:.2f}x ({o['ms_median']:.2f} ms vs {r['ms_median']:.2f} ms)",
                    group=g, value=sp, threshold=k)
    else:
        for b in ("cuda", "triton"):
            main = " (the issue's H200 target)" if b == "cuda" else " (informational)"
            sams = [r for r in rows if r["method"] == "sam" and r["impl"] == b]
            big = [r for r in sams if r["n_params"] >= 100e6]
            if not sams:
                add(f"{b} SAM step >= 80% of copy bandwidth at 100M+ params{main}", "N/A",
                    na_backend(b))
                add(f"{b} launches per step constant in tensor count{main}", "N/A", na_backend(b))
                continue
            if not big:
                add(f"{b} SAM step >= 80% of copy bandwidth at 100M+ params{main}", "N/A",
                    "no case with >= 100M parameters in this run")
            for r in big:
                f = r["frac_copy_bw"]
                add(f"{b} SAM step >= 80% of copy bandwidth [{r['group']}]{main}",
                    "PASS" if f is not None and f >= 0.80 else "MISS",
                    f"{f * 100:.1f}% ({r['bytes_per_s'] / 1e9:.0f} GB/s, {r['ms_median']:.3f} ms/step)"
                    if f is not None else "no copy bandwidth", group=r["group"], value=f,
                    threshold=0.80)
            counts = [(r["n_tensors"], (r.get("launches") or {}).get("total")) for r in sams]
            counts = [(n, c) for n, c in counts if c is not None]
            if len(counts) < 2:
                add(f"{b} launches per step constant in tensor count{main}", "N/A",
                    "fewer than two cases with launch counts")
            else:
                vals = {c for _, c in counts}
                add(f"{b} launches per step constant in tensor count{main}",
                    "PASS" if len(vals) == 1 else "MISS",
                    ", ".join(f"{n} tensors: {c}" for n, c in sorted(counts)),
                    value=sorted(vals))
    return out


def _md_table(rows: List[Dict[str, Any]], device: str) -> List[str]:
    head = ("| case | impl | params | tensors | ms/step (median) | min | B/param | GB/s (model) "
            "| % copy bw | launches/step | step peak extra mem | held mem |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        la = r.get("launches")
        la_s = "n/a" if la is None else str(la.get("total"))
        mem = r.get("memory") or {}
        lines.append(
            f"| {r['method']} | {r['impl']} | {size_label(r['n_params'])} | {r['n_tensors']} "
            f"| {r['ms_median']:.3f} | {r['ms_min']:.3f} | {r['bytes_per_param']} "
            f"| {r['bytes_per_s'] / 1e9:.2f} | "
            + (f"{r['frac_copy_bw'] * 100:.1f}%" if r.get("frac_copy_bw") is not None else "n/a")
            + f" | {la_s} | {_fmt_bytes(mem.get('step_peak_extra_bytes'))} "
            f"| {_fmt_bytes(r.get('held_bytes'))} |")
    return lines


def write_markdown(path: str, res: Dict[str, Any]) -> str:
    m = res["machine"]
    dev = res["device"]
    L = [f"# fsam_kernels kernel benchmark: {dev} ({res['mode']})", ""]
    L.append(f"- command: `{res['command']}`")
    L.append(f"- date: {res['date']}; wall time {res['wall_s']:.1f} s")
    L.append(f"- machine: {m['cpu_model']}, {m['cpu_count']} logical CPUs "
             f"({m.get('cpu_affinity')} usable, torch threads {m['torch_threads']}, "
             f"{m.get('cpu_capability')}), {_fmt_bytes(m.get('mem_total_bytes'))} RAM"
             + (f"; GPU {m['gpu_name']} ({_fmt_bytes(m['gpu_mem_bytes'])}, sm {m['gpu_capability']}, "
                f"CUDA {m['cuda']})" if dev == "cuda" else ""))
    L.append(f"- torch {m['torch']}, python {m['python']}, git {m.get('git_commit')}; "
             f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}")
    cores = m.get("cpu_affinity") or m.get("cpu_count") or 1
    loads = [x[0] for x in (m.get("loadavg_start"), m.get("loadavg_end")) if x]
    if loads and max(loads) > 0.75 * cores:
        L.append(f"- **warning: the machine was busy** (1-minute load average up to "
                 f"{max(loads):.1f} on {cores} usable cores): these timings are not "
                 "representative; rerun on a quiet machine")
    cb = res.get("copy_bandwidth")
    if cb:
        L.append(f"- copy bandwidth (dst.copy_(src), {_fmt_bytes(cb['bytes'] / 2)} float32 each, read + "
                 f"write): **{cb['bytes_per_s'] / 1e9:.2f} GB/s** median "
                 f"({cb['bytes_per_s_best'] / 1e9:.2f} GB/s best round)")
    L.append(f"- backends measured: {', '.join(res['backends_measured']) or 'none'}; "
             f"auto -> {res.get('auto_backend')}")
    L.append("- float32 parameters; fixed fake gradients (g for the ascent, ĝ for the descent), no "
             "forward/backward; timing by pytest-benchmark (median of rounds, one step per round"
             + ("; each round ends with torch.cuda.synchronize()" if dev == "cuda" else "") + ").")
    L.append("- GB/s (model) = SPEC §6 bytes per parameter (sam 48, psam 56, adamw 28, copy 8) x "
             "parameters / median time: the traffic an ideal fused step needs, whatever the "
             "implementation really moves. % copy bw = that / the copy bandwidth above.")
    L.append("")
    L.append("## Targets (reported, not asserted)")
    L.append("")
    if res["targets"]:
        L.append("| target | result | numbers |")
        L.append("|---|---|---|")
        for t in res["targets"]:
            L.append(f"| {t['target']} | **{t['status']}** | {t['detail']} |")
    else:
        L.append("none for this device")
    L.append("")
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in res["cases"]:
        groups.setdefault(r.get("group") or "bandwidth", []).append(r)
    for g, rows in groups.items():
        if g == "bandwidth":
            continue
        r0 = rows[0]
        L.append(f"## {g}: {r0['family']}, {r0['n_params']:,} params in {r0['n_tensors']} tensors")
        L.append("")
        L += _md_table(rows, dev)
        notes = sorted({f"{r['impl']}: {r['note']}" for r in rows if r.get("note")})
        if notes:
            L.append("")
            L += [f"- {n}" for n in notes]
        L.append("")
    if res["skipped"] or res["failed"]:
        L.append("## Not measured")
        L.append("")
        for s in res["skipped"]:
            L.append(f"- skipped `{s['id']}`: {s['reason']}")
        for f in res["failed"]:
            L.append(f"- {f['outcome']} `{f['id']}`: {f['message']}")
        L.append("")
    L.append("## Memory columns")
    L.append("")
    L.append(f"- step peak extra mem: {res['memory_method']}")
    L.append("- held mem: bytes of the tensors the case keeps between steps (parameters, both fake "
             "gradients, backups, optimizer state), counted by storage.")
    L.append("")
    text = "\n".join(L)
    with open(path, "w") as f:
        f.write(text)
    return text


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small plan (one 16M+ GPT-like size, small ResNet-like and many-small "
                         "shapes), few rounds; under two minutes on a 2-core machine")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, two rounds: checks the machinery (tests use it)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"),
                    help="directory for kernels-<device>[-<mode>].json/.md (default bench/results "
                         "of this repository)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated subset of the available backends (default: all)")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated subset of gpt,resnet,many-small (default: all)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and the native cpu backend (default: torch's "
                         "default, i.e. all usable cores)")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="only rewrite the markdown next to an existing results JSON")
    ap.add_argument("--pytest-args", default="",
                    help="extra arguments for the pytest run, e.g. '-x'")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            res = json.load(f)
        md = os.path.splitext(args.render)[0] + ".md"
        write_markdown(md, res)
        print(f"kernels.py: wrote {md}")
        return 0
    argv_list = sys.argv[1:] if argv is None else list(argv)
    command = "python bench/kernels.py" + ("" if not argv_list else " " + shlex.join(argv_list))
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("kernels.py: --device cuda requested but torch.cuda.is_available() is False",
              file=sys.stderr)
        return 2
    if importlib.util.find_spec("pytest_benchmark") is None:
        # without it the pytest run below only prints a usage error about --benchmark-json
        print("kernels.py: pytest-benchmark is not installed (it times every case; requirements.txt "
              "lists it; `make setup` installs it, or: pip install 'pytest-benchmark>=4')",
              file=sys.stderr)
        return 2
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    stem = f"kernels-{device}" + ("" if mode == "full" else f"-{mode}")
    machine = machine_info(device)
    backends = backend_report(device)
    only_b = [s.strip() for s in args.backends.split(",")] if args.backends else None
    only_s = [s.strip() for s in args.shapes.split(",")] if args.shapes else None
    plan = make_plan(mode, device, backends, only_b, only_s)
    plan_path = os.path.join(out_dir, f".{stem}.plan.json")
    raw_path = os.path.join(out_dir, f"{stem}.pytest-benchmark.json")
    junit_path = os.path.join(out_dir, f".{stem}.junit.xml")
    with open(plan_path, "w") as f:
        json.dump(plan, f, indent=1)
    for p in (raw_path, junit_path):
        if os.path.exists(p):
            os.remove(p)
    n_cases = len(plan["cases"])
    print(f"kernels.py: {mode} plan on {device}: {n_cases} cases; backends "
          f"{[n for n, r in backends.items() if r['available']]}", flush=True)
    env = dict(os.environ)
    env["FSAM_BENCH_PLAN"] = plan_path
    if args.threads:
        for k in ("FSAM_BENCH_THREADS", "FSAM_NUM_THREADS", "OMP_NUM_THREADS"):
            env[k] = str(args.threads)
        machine["torch_threads"] = args.threads
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "pytest", TEST_FILE, "-q", "-p", "no:cacheprovider",
           "--rootdir", HERE, "--benchmark-json", raw_path, "--benchmark-disable-gc",
           "--benchmark-sort=name", "--benchmark-columns=min,median,rounds",
           "--junitxml", junit_path, "-o", "junit_family=xunit2"] + shlex.split(args.pytest_args)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if not os.path.exists(raw_path):
        print(f"kernels.py: pytest (exit {proc.returncode}) wrote no benchmark JSON", file=sys.stderr)
        return 3
    with open(raw_path) as f:
        raw = json.load(f)
    junit = _junit_outcomes(junit_path)
    rows, copy_row, failed = summarize(plan, raw, junit)
    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    measured = sorted({r["impl"] for r in rows if r["method"] in ("sam", "psam")
                       and r["impl"] not in ("baseline", "optim:auto")})
    mem_method = next((r["memory"]["method"] for r in rows if r.get("memory")), "n/a")
    res = dict(
        schema=SCHEMA, command=command, mode=mode, device=device,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        machine=machine, backends=backends, backends_measured=measured,
        auto_backend=plan["auto_backend"], baseline_note=plan["baseline_note"],
        byte_model=BYTES_PER_PARAM, hyperparameters=HP, budget=plan["budget"],
        copy_bandwidth=None if copy_row is None else dict(
            bytes=copy_row["model_bytes"], numel=copy_row["n_params"],
            median_s=copy_row["ms_median"] / 1e3, bytes_per_s=copy_row["bytes_per_s"],
            bytes_per_s_best=copy_row["bytes_per_s_best"]),
        memory_method=mem_method,
        cases=[r for r in rows if r["method"] != "copy"],
        skipped=plan["skipped"], failed=failed,
        pytest_returncode=proc.returncode,
        pytest_benchmark_json=os.path.relpath(raw_path, ROOT),
        pytest_benchmark_version=raw.get("version"),
    )
    res["targets"] = evaluate_targets(res["cases"], device, backends)
    res["wall_s"] = time.perf_counter() - t_start
    json_path = os.path.join(out_dir, f"{stem}.json")
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    text = write_markdown(md_path, res)
    for p in (plan_path, junit_path):
        try:
            os.remove(p)
        except OSError:
            pass
    print()
    print(text)
    print("targets: " + "; ".join(f"{t['status']} {t['target']}" for t in res["targets"]))
    print(f"kernels.py: wrote {os.path.relpath(json_path)}, {os.path.relpath(md_path)}, "
          f"{os.path.relpath(raw_path)} in {res['wall_s']:.1f} s"
          + (f"; {len(failed)} case(s) without result" if failed else ""))
    if copy_row is None or not res["cases"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
