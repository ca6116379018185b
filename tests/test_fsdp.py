"""FSDP2 (fully_shard, DTensor parameters) with 2 gloo processes on CPU
(CASES S7, D-K3).

Each rank holds half of every parameter (the last layer has one output row,
so rank 1's shards of its weight and bias are empty: D-K3). The kernels run
on the local shards and the ascent norm N² is all-reduced over the shard
group, so 3 steps of every variant equal an unsharded single-process run on
the concatenated batch (each rank gets half of it; FSDP2 averages the
gradients over ranks, which gives the full-batch mean-loss gradient). Also:
one all_reduce per step (N²), DTensor state sized per local shard, and a
state_dict round trip continuing exactly as never stopping.
"""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fsam_kernels import SAM, FunctionalSAM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 3

# (class, precondition, backend, extra kwargs)
CONFIGS = [
    (SAM, False, "reference", {}),
    (SAM, True, "reference", {}),
    (FunctionalSAM, False, "reference", {}),
    (FunctionalSAM, True, "reference", {}),
    (SAM, False, "foreach", {}),
    (SAM, True, "foreach", {}),
    (FunctionalSAM, False, "foreach", {}),
    (FunctionalSAM, True, "foreach", {}),
    (SAM, False, "foreach", {"max_grad_norm": 0.05}),          # clip norm over shards too
    (SAM, False, "reference", {"base_optimizer": torch.optim.SGD, "lr": 0.1, "momentum": 0.9}),
]


def _model():
    torch.manual_seed(0)
    # Linear(8, 1): weight (1, 8) and bias (1,) have empty shards on rank 1
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)


def _loss(out, y):
    return ((out - y) ** 2).mean()


def _opt(cls, params, pre, backend, extra):
    kw = dict(rho=0.1, precondition=pre, backend=backend)
    kw.update(extra)
    if "base_optimizer" not in kw:
        kw.setdefault("lr", 1e-2)
    return cls(params, **kw)


def _train(model, opt, rank, world, steps):
    for step in steps:
        x, y = _data(step)
        if world > 1:                            # this rank's half of the batch
            n = x.shape[0] // world
            x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]

        def closure():
            out = model(x)
            return out, _loss(out, y)

        opt.step(closure)


def _worker(rank, world, port, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh("cpu", (world,))
        calls = [0]
        real_all_reduce = torch.distributed.all_reduce

        def counting_all_reduce(*a, **k):
            calls[0] += 1
            return real_all_reduce(*a, **k)

        torch.distributed.all_reduce = counting_all_reduce
        for cls, pre, backend, extra in CONFIGS:
            name = f"{cls.__name__} precondition={pre} {backend} {sorted(extra)}"
            model = _model()
            ref_model = _model()
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            params = list(model.parameters())
            assert all(isinstance(p, DTensor) for p in params)
            if rank == 1:                        # D-K3: empty local shards
                assert params[-1].to_local().numel() == 0 and params[-2].to_local().numel() == 0
            opt = _opt(cls, params, pre, backend, extra)
            calls[0] = 0
            _train(model, opt, rank, world, range(2))
            if "base_optimizer" not in extra and "max_grad_norm" not in extra:
                # N² of the ascent: exactly one all_reduce per step, nothing else
                assert calls[0] == 2, (name, calls[0])
            # state_dict round trip (same world size) into a fresh optimizer, then step 3
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            opt2 = _opt(cls, params, pre, backend, extra)
            opt2.load_state_dict(torch.load(buf, weights_only=False))
            if "base_optimizer" not in extra:
                for p in params:
                    st = opt2.state[p]
                    assert isinstance(st["exp_avg"], DTensor), name
                    assert st["exp_avg"].to_local().shape == p.to_local().shape, name
                    assert st["exp_avg_sq"].placements == p.placements, name
            _train(model, opt2, rank, world, range(2, STEPS))
            # unsharded single-process run on the whole batch
            ropt = _opt(cls, list(ref_model.parameters()), pre, backend, extra)
            _train(ref_model, ropt, 0, 1, range(STEPS))
            for i, (p, r) in enumerate(zip(params, ref_model.parameters())):
                full = p.full_tensor()
                try:
                    torch.testing.assert_close(full, r.detach(), rtol=1e-5, atol=1e-6)
                except AssertionError as exc:
                    raise AssertionError(f"{name}: param {i}: {exc}") from None
            if "base_optimizer" not in extra:
                for p, r in zip(params, ref_model.parameters()):
                    for key in ("exp_avg", "exp_avg_sq"):
                        torch.testing.assert_close(opt2.state[p][key].full_tensor(),
                                                   ropt.state[r][key], rtol=1e-5, atol=1e-7)
                    assert float(opt2.state[p]["step"]) == STEPS
        _extra_checks(rank, mesh, fully_shard, DTensor)
    except BaseException as exc:  # report through the queue, keep the other rank going
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    finally:
        dist.destroy_process_group()


def _extra_checks(rank, mesh, fully_shard, DTensor):
    """Full (unsharded) state tensors load as shards; a non-finite pass-2 grad on
    one rank's shard (with a grad_scale) skips the step on every rank."""
    model = _model()
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    opt = SAM(params, lr=1e-2, rho=0.1, backend="foreach")
    _train(model, opt, rank, 2, range(1))
    sd = opt.state_dict()
    full = {"param_groups": sd["param_groups"],
            "state": {k: {n: (v.full_tensor() if isinstance(v, DTensor) else v)
                          for n, v in st.items()} for k, st in sd["state"].items()}}
    opt3 = SAM(params, lr=1e-2, rho=0.1, backend="foreach")
    opt3.load_state_dict(full)
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opt3.state[p][key], opt.state[p][key]
            assert isinstance(a, DTensor) and torch.equal(a.to_local(), b.to_local())
    before = [p.detach().to_local().clone() for p in params]
    scale = torch.tensor(4.0)
    for p in params:
        p.grad = torch.zeros_like(p) + 1.0
    opt.first_step(grad_scale=scale)
    for p in params:
        p.grad = torch.zeros_like(p) + 1.0
    if rank == 0:
        params[0].grad.to_local()[0, 0] = float("inf")
    opt.second_step(grad_scale=scale)
    assert bool(opt.last_step_skipped), rank
    for p, b in zip(params, before):
        assert torch.equal(p.detach().to_local(), b)
    assert float(opt.state[params[0]]["step"]) == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_available():
    if not dist.is_available() or not dist.is_gloo_available():
        return False
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor  # noqa: F401
    except Exception:
        return False
    return True


needs_fsdp2 = pytest.mark.skipif(not _fsdp2_available(),
                                 reason="torch.distributed FSDP2 with gloo is not available")


@needs_fsdp2
def test_fsdp2_equals_unsharded_two_ranks():
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.spawn(_worker, args=(2, _free_port(), errors), nprocs=2, join=True)
    except Exception:
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        raise AssertionError("\n".join(msgs) or "worker failed") from None


@needs_fsdp2
def test_fsdp2_example_tiny():
    path = os.path.join(ROOT, "python", "fsdp2.py")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, path, "--tiny"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "step" in r.stdout and "equal to unsharded" in r.stdout


def test_local_and_shard_key_on_plain_tensors():
    from fsam_kernels.distributed import is_dtensor, local, shard_key

    t = torch.ones(3)
    assert not is_dtensor(t) and local(t) is t and shard_key(t) is None and local(None) is None
