"""A small CNN with BatchNorm on scikit-learn's digits (8x8 images, 10
classes), SAM with an SGD-momentum base optimizer, a cosine lr schedule and
BatchNorm statistics from the clean pass only (model=).

Needs scikit-learn (load_digits ships with it; nothing is downloaded).

    python python/vision_sgd.py [--epochs 10] [--fsam] [--tiny]
"""
import argparse

import torch
from torch import nn

from fsam_kernels import SAM, FunctionalSAM


def load(tiny):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n = 256 if tiny else len(y)
    split = int(0.8 * n)
    return (x[:split], y[:split]), (x[split:n], y[split:n])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fsam", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    epochs = 1 if args.tiny else args.epochs
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = load(args.tiny)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    cls = FunctionalSAM if args.fsam else SAM
    opt = cls(model.parameters(), base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9,
              weight_decay=5e-4, rho=0.05, model=model, max_grad_norm=5.0)
    steps = epochs * ((len(ytr) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), args.batch):
            idx = perm[i:i + args.batch]
            xb, yb = xtr[idx], ytr[idx]

            def closure():
                out = model(xb)
                return out, nn.functional.cross_entropy(out, yb)

            loss = opt.step(closure)
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        print(f"epoch {epoch}  loss {loss.item():.4f}  test acc {acc:.3f}  "
              f"lr {opt.param_groups[0]['lr']:.4f}")


if __name__ == "__main__":
    main()
