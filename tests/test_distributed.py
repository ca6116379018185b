"""DDP ascent_sync with 2 gloo processes on CPU (CASES S6, D-H3).

"local": pass 1 under no_sync, each rank perturbs with its own gradient (the
m-sharpness of the original SAM); "global": the averaged gradient. Pass 2 is
all-reduced in both; no other all-reduce is issued (counted with a comm hook).
"""
from __future__ import annotations

import gc
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from fsam_kernels import SAM, FunctionalSAM

RHO = 0.1
_TIMEOUT_S = 60


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


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a collective that one rank never reaches raises after this, instead of hanging the suite
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=_TIMEOUT_S))


def _finish():
    # free the DDP reducers and optimizers (reference cycles) while the process group
    # still exists: a reducer collected after destroy_process_group can hang its process
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _spawn(fn, world):
    """mp.spawn ``fn(rank, world, port)`` on ``world`` processes; fail (and kill them)
    if they have not all finished within 3 x _TIMEOUT_S seconds."""
    ctx = mp.start_processes(fn, args=(world, _free_port()), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 3 * _TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__}: the {world} ranks did not finish within {3 * _TIMEOUT_S} s")


def _worker(rank, world, port):
    _init(rank, world, port)
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
        _finish()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_ascent_sync_two_ranks():
    _spawn(_worker, 2)


def test_ascent_sync_local_needs_ddp_model():
    p = [nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="no_sync"):
        SAM(p, ascent_sync="local")
    with pytest.raises(ValueError, match="ascent_sync"):
        SAM(p, ascent_sync="sometimes")


# ------------------------------------------- the fused LM head under DDP (gloo, CPU)
class _HeadLM(nn.Module):
    """Embedding -> Linear -> tied FusedLinearCrossEntropy (returns a HeadOutput)."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        from fsam_kernels.heads import FusedLinearCrossEntropy
        self.embed = nn.Embedding(vocab, d)
        self.body = nn.Linear(d, d)
        self.head = FusedLinearCrossEntropy(self.embed, chunk_size=5)   # several chunks

    def forward(self, x, y):
        return self.head(torch.tanh(self.body(self.embed(x))), y)


def _head_lm():
    torch.manual_seed(1)
    return _HeadLM()


def _head_data(rank, step):
    # equal token counts per rank (no ignored labels), so the mean loss of the
    # concatenated batch is the average of the ranks' mean losses, as DDP averages
    g = torch.Generator().manual_seed(100 + 10 * step + rank)
    return torch.randint(0, 11, (3, 4), generator=g), torch.randint(0, 11, (3, 4), generator=g)


def _head_run(cls, net, batches, **kw):
    """Two ``step(closure)`` steps with the closure returning ``(out, out.loss)``."""
    opt = cls(net.parameters(), lr=1e-2, rho=RHO, backend="reference", **kw)
    for x, y in batches:
        def closure():
            out = net(x, y)
            return out, out.loss
        opt.step(closure)


def _head_checks(rank, world):
    from helpers import F32_ATOL, F32_RTOL_10   # tests/helpers.py (SPEC §5)
    for cls in (SAM, FunctionalSAM):
        # single process on the concatenated batch of all ranks
        ref = _head_lm()
        _head_run(cls, ref, [tuple(torch.cat(t) for t in zip(*[_head_data(r, s)
                                                              for r in range(world)]))
                             for s in range(2)])
        model = _head_lm()
        ddp = nn.parallel.DistributedDataParallel(model)
        _head_run(cls, ddp, [_head_data(rank, s) for s in range(2)], model=ddp)
        moved = False
        for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(),
                                    _head_lm().parameters()):
            gathered = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(gathered, p.detach().contiguous())   # every rank, before any assert
            assert all(torch.equal(gathered[0], t) for t in gathered), \
                f"{cls.__name__} {name}: ranks differ"
            torch.testing.assert_close(p, q, rtol=F32_RTOL_10, atol=F32_ATOL,
                                       msg=lambda m, n=name: f"{cls.__name__} {n}: {m}")
            moved = moved or not torch.equal(p, p0)
        assert moved, f"{cls.__name__}: the parameters did not move"


def _head_worker(rank, world, port):
    _init(rank, world, port)
    try:
        _head_checks(rank, world)
    finally:
        _finish()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_fused_head_matches_concatenated_batch():
    """FusedLinearCrossEntropy (tied) under 2-rank DDP with SAM and FunctionalSAM,
    step(closure) returning (out, out.loss), 2 steps: every rank equals a single
    process on the concatenated batch (SPEC §5 float32) and the ranks are bitwise equal."""
    _spawn(_head_worker, 2)
