"""FSDP2 (fully_shard) training with SAM / Functional-SAM.

Parameters, gradients and Adam state are DTensors sharded over the ranks;
the optimizer's kernels run on each rank's local shards and the ascent norm
is all-reduced over the shard group (one all_reduce per step), so the
perturbation and the update equal an unsharded run's on the whole batch.

    torchrun --nproc_per_node 2 python/fsdp2.py [--functional] [--precondition] [--steps 50]
    python python/fsdp2.py --tiny    # 2 gloo processes on CPU (torch.multiprocessing),
                                     # 3 steps, checked against an unsharded run
"""
import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from fsam_kernels import SAM, FunctionalSAM


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 3))


def batch(step, n=64):
    g = torch.Generator().manual_seed(1000 + step)   # the global batch of this step
    return torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)


def make_opt(args, params):
    cls = FunctionalSAM if args.functional else SAM
    return cls(params, lr=1e-3, rho=0.05, precondition=args.precondition)


def train(args, rank, world, steps, dev):
    mesh = init_device_mesh(dev.type, (world,))
    model = build_model().to(dev)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)            # each Linear: one all-gather unit
    fully_shard(model, mesh=mesh)
    opt = make_opt(args, model.parameters())
    for step in range(steps):
        x, y = batch(step)
        n = x.shape[0] // world                      # this rank's slice of the batch
        x, y = x[rank * n:(rank + 1) * n].to(dev), y[rank * n:(rank + 1) * n].to(dev)

        def closure():
            out = model(x)
            return out, nn.functional.cross_entropy(out, y)

        loss = opt.step(closure)
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f} (rank 0's half)", flush=True)
    return [p.full_tensor().cpu() for p in model.parameters()]   # collective


def unsharded(args, steps):
    model = build_model()
    opt = make_opt(args, model.parameters())
    for step in range(steps):
        x, y = batch(step)

        def closure():
            out = model(x)
            return out, nn.functional.cross_entropy(out, y)

        opt.step(closure)
    return [p.detach() for p in model.parameters()]


def _tiny_worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = train(args, rank, world, 3, torch.device("cpu"))
        if rank == 0:
            ref = unsharded(args, 3)
            for p, r in zip(full, ref):
                torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
            print("parameters after 3 steps: equal to unsharded run", flush=True)
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--functional", action="store_true")
    ap.add_argument("--precondition", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_tiny_worker, args=(2, port, args), nprocs=2, join=True)
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    try:
        train(args, rank, world, args.steps, dev)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
