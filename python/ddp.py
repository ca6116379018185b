"""DDP training with SAM: ascent_sync="local" (per-rank ascent gradients, pass
1 under no_sync: the m-sharpness of the original SAM) or "global" (averaged).

    torchrun --nproc_per_node 2 python/ddp.py [--ascent-sync local] [--steps 50]
    python python/ddp.py --tiny      # single process, gloo, world size 1

For FSDP2 (fully_shard) see python/fsdp2.py and docs/loops.md.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from fsam_kernels import SAM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ascent-sync", default="local", choices=["local", "global"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    steps = 3 if args.tiny else args.steps
    if "RANK" not in os.environ:                     # not under torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                       if backend == "nccl" else "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3)).to(dev)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = SAM(ddp.parameters(), lr=1e-3, rho=0.05, model=ddp, ascent_sync=args.ascent_sync)
    g = torch.Generator().manual_seed(100 + rank)   # each rank its own shard of data
    x = torch.randn(64, 12, generator=g).to(dev)
    y = torch.randint(0, 3, (64,), generator=g).to(dev)

    def closure():
        out = ddp(x)
        return out, nn.functional.cross_entropy(out, y)

    for step in range(steps):
        loss = opt.step(closure)
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
