"""DDP ascent_sync with 2 gloo processes on CPU (CASES S6, D-H3).

"local": pass 1 under no_sync, each rank perturbs with its own gradient (the
m-sharpness of the original SAM); "global": the averaged gradient. Pass 2 is
all-reduced in both; no other all-reduce is issued (counted with a comm hook).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from fsam_kernels import SAM, FunctionalSAM

RHO = 0.1


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def _data(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)


def _loss(out, y):
    return ((out - y) ** 2).mean()


def _grads(model, x, y, at=None, cot=None):
    """Plain (non-DDP) grads of rank data at params ``at`` (SAM) or J^T cot (FSAM)."""
    m = _model()
    with torch.no_grad():
        for p, q in zip(m.parameters(), at if at is not None else model.parameters()):
            p.copy_(q)
    out = m(x)
    if cot is not None:
        out.backward(cot)
    else:
        _loss(out, y).backward()
    return [p.grad.clone() for p in m.parameters()], out


def _worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for cls in (SAM, FunctionalSAM):
            counts = {}
            for sync in ("local", "global"):
                model = _model()
                theta = [p.detach().clone() for p in model.parameters()]
                ddp = nn.parallel.DistributedDataParallel(model)
                calls = [0]

                def hook(state, bucket):
                    calls[0] += 1
                    return allreduce_hook(None, bucket)

                ddp.register_comm_hook(None, hook)
                opt = cls(ddp.parameters(), lr=1e-2, rho=RHO, backend="reference",
                          model=ddp, ascent_sync=sync)
                x, y = _data(rank)
                seen = {}

                def closure():
                    n = len(seen)
                    seen[n] = [p.detach().clone() for p in model.parameters()]
                    out = ddp(x)
                    return out, _loss(out, y)

                opt.step(closure)
                # hand-computed ascent gradient: own rank's, or the mean over ranks
                per_rank = [_grads(model, *_data(r), at=theta)[0] for r in range(world)]
                g1 = per_rank[rank] if sync == "local" else [
                    sum(gs) / world for gs in zip(*per_rank)]
                n = torch.sqrt(sum(g.double().square().sum() for g in g1))
                for p_pert, th, g in zip(seen[1], theta, g1):
                    torch.testing.assert_close(p_pert.double() - th.double(), RHO * g.double() / n,
                                               rtol=1e-5, atol=1e-7)
                # update gradient: mean over ranks of each rank's pass-2 gradient at its
                # own perturbed point (SAM) / with its own cotangent (FSAM)
                g2s = []
                for r in range(world):
                    xr, yr = _data(r)
                    gr = per_rank[r] if sync == "local" else g1
                    nr = torch.sqrt(sum(g.double().square().sum() for g in gr))
                    pert = [th + (RHO * g.double() / nr).float() for th, g in zip(theta, gr)]
                    if cls is FunctionalSAM:
                        out0 = _grads(model, xr, yr, at=theta)[1]
                        out0 = out0.detach().requires_grad_()
                        _loss(out0, yr).backward()
                        g2s.append(_grads(model, xr, yr, at=pert, cot=out0.grad)[0])
                    else:
                        g2s.append(_grads(model, xr, yr, at=pert)[0])
                g2 = [sum(gs) / world for gs in zip(*g2s)]
                ref = [th.clone() for th in theta]
                ropt = SAM(ref, lr=1e-2, rho=RHO, backend="reference")
                for p, g in zip(ref, g1):
                    p.grad = g.clone()
                ropt.first_step()
                for p, g in zip(ref, g2):
                    p.grad = g.clone()
                ropt.second_step()
                for p, r in zip(model.parameters(), ref):
                    torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
                counts[sync] = calls[0]
            # never an extra all-reduce: local = pass 2 only, global = both passes
            assert counts["local"] >= 1 and counts["global"] == 2 * counts["local"], counts
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_ascent_sync_two_ranks():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_ascent_sync_local_needs_ddp_model():
    p = [nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="no_sync"):
        SAM(p, ascent_sync="local")
    with pytest.raises(ValueError, match="ascent_sync"):
        SAM(p, ascent_sync="sometimes")
