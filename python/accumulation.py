"""Hand-written two-pass loop with gradient accumulation (Functional-SAM).

Pass 1 records each micro-batch's output cotangent with CotangentRecorder,
pass 2 replays them in the same order (SPEC §2). SAM would simply call
loss.backward() in pass 2 instead of rec.replay().

    python python/accumulation.py [--micro 4] [--steps 100] [--tiny]
"""
import argparse

import torch
from torch import nn

from fsam_kernels import CotangentRecorder, FunctionalSAM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    steps = 3 if args.tiny else args.steps
    torch.manual_seed(0)
    x, y = torch.randn(128, 8), torch.randn(128, 1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = FunctionalSAM(model.parameters(), lr=1e-2, rho=0.05)
    rec = CotangentRecorder()
    batches = list(zip(x.chunk(args.micro), y.chunk(args.micro)))
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for xb, yb in batches:                        # pass 1 at θ
            z = rec.capture(model(xb))
            loss = nn.functional.mse_loss(z, yb) / len(batches)
            loss.backward()
            total += loss.item()
        opt.first_step()                              # θ -> θ + e
        opt.zero_grad(set_to_none=True)
        for xb, _ in batches:                         # pass 2 at θ + e, same order
            rec.replay(model(xb))
        opt.second_step()                             # restore θ, AdamW
        print(f"step {step:3d}  loss {total:.4f}")


if __name__ == "__main__":
    main()
