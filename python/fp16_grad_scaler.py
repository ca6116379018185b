"""fp16 training with a GradScaler: pass the scaler to step(), then update it.

Both losses are scaled, each pass is unscaled once inside the kernels, and a
step with inf/NaN in either pass is skipped atomically (opt.last_step_skipped)
and reported to the scaler, whose update() then halves the scale.
Runs on CUDA with autocast when available, else on CPU with fp16 parameters.

    python python/fp16_grad_scaler.py [--steps 100] [--tiny]
"""
import argparse

import torch
from torch import nn

from fsam_kernels import SAM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    steps = 4 if args.tiny else args.steps
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(64, 16, device=dev)
    y = torch.randint(0, 4, (64,), device=dev)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).to(dev)
    if dev == "cpu":
        model = model.half()                        # fp16 parameters on CPU
        x = x.half()
    opt = SAM(model.parameters(), lr=1e-3, rho=0.05)
    scaler = torch.amp.GradScaler(dev, init_scale=2.0 ** 12)

    def closure():
        with torch.autocast(dev, dtype=torch.float16, enabled=dev == "cuda"):
            out = model(x)
        return out, nn.functional.cross_entropy(out.float(), y)

    for step in range(steps):
        loss = opt.step(closure, grad_scaler=scaler)
        scaler.update()
        print(f"step {step:3d}  loss {loss.item():.4f}  scale {scaler.get_scale():g}  "
              f"skipped {bool(opt.last_step_skipped)}")


if __name__ == "__main__":
    main()
