"""Lightning 2.x with SAM or Functional-SAM (fsam_kernels.integrations.lightning).

Automatic optimization (default): Lightning's closure runs training_step and
backward; SAM.step calls it at θ and at θ + e. Functional-SAM gets its model
output through ``optimizer.mark_output``. ``--manual`` shows manual
optimization with ``manual_step`` (counted in ``trainer.global_step``, so
``max_steps`` stops the run).

    python python/lightning_sam.py [--fsam] [--manual] [--steps 200] [--tiny]
"""
import argparse
import math

import lightning.pytorch as pl
import torch
from torch import nn

from fsam_kernels import SAM, FunctionalSAM
from fsam_kernels.integrations.lightning import is_second_pass, manual_step


class Classifier(pl.LightningModule):
    def __init__(self, functional: bool, manual: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(32, 2))
        self.functional = functional
        self.automatic_optimization = not manual
        self.losses = []

    def configure_optimizers(self):
        cls = FunctionalSAM if self.functional else SAM
        opt = cls(self.parameters(), lr=3e-3, rho=0.05, weight_decay=1e-2, model=self)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def loss(self, batch):
        x, y = batch
        z = self.optimizers().mark_output(self.net(x))   # Functional-SAM's output z
        return nn.functional.cross_entropy(z, y)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            loss = self.loss(batch)
            if not is_second_pass(self.optimizers()):     # log the pass-1 loss only
                self.losses.append(loss.item())
            return loss
        loss = manual_step(self, lambda: self.loss(batch))
        self.lr_schedulers().step()
        self.losses.append(loss.item())
        return loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fsam", action="store_true", help="Functional-SAM instead of SAM")
    ap.add_argument("--manual", action="store_true", help="manual optimization")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tiny", action="store_true", help="smoke run (a few steps)")
    args = ap.parse_args()
    steps = 5 if args.tiny else args.steps
    torch.manual_seed(0)
    x = torch.randn(512, 10)
    y = (x[:, :3].sum(1) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64,
                                         shuffle=True)
    module = Classifier(args.fsam, args.manual)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=None if args.manual else 1.0)
    trainer.fit(module, loader)
    print(f"{'manual' if args.manual else 'automatic'} "
          f"{'FunctionalSAM' if args.fsam else 'SAM'}: global_step {trainer.global_step}, "
          f"pass-1 loss {module.losses[0]:.4f} -> {module.losses[-1]:.4f}")
    assert trainer.global_step == steps and all(math.isfinite(v) for v in module.losses)


if __name__ == "__main__":
    main()
