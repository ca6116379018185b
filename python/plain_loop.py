"""Plain training loop with step(closure): SAM or Functional-SAM over AdamW.

    python python/plain_loop.py [--fsam] [--steps 200] [--tiny]
"""
import argparse

import torch
from torch import nn

from fsam_kernels import SAM, FunctionalSAM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fsam", action="store_true", help="Functional-SAM instead of SAM")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tiny", action="store_true", help="smoke run (a few steps)")
    args = ap.parse_args()
    steps = 5 if args.tiny else args.steps
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))
    cls = FunctionalSAM if args.fsam else SAM
    opt = cls(model.parameters(), lr=3e-3, rho=0.05, weight_decay=1e-2)

    def closure():                       # forward only: the optimizer runs backward
        out = model(x)
        return out, nn.functional.cross_entropy(out, y)

    for step in range(steps):
        loss = opt.step(closure)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    assert torch.isfinite(loss)


if __name__ == "__main__":
    main()
