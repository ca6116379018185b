"""A user's own small language model with the fused linear cross-entropy head.

The model returns hidden states; ``FusedLinearCrossEntropy`` turns them into
the next-token loss without ever building the (tokens x vocabulary) logits.
Functional-SAM through it keeps only (hidden states, logsumexp, labels) per
micro-batch between its two passes instead of a logits-sized cotangent.

Two loops are shown: ``opt.step(closure)`` with one micro-batch per step
(the closure returns ``(out, out.loss)``), and the two-phase API with
gradient accumulation (``HeadRecorder``).

    python python/fused_head_lm.py [--steps 200] [--micro 4] [--vocab 8192] [--tiny]
"""
import argparse

import torch
from torch import nn

from fsam_kernels import FunctionalSAM
from fsam_kernels.heads import FusedLinearCrossEntropy, HeadRecorder


class TinyLM(nn.Module):
    """A GRU language model with an output layer tied to its embedding."""

    def __init__(self, vocab: int, d: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.norm = nn.LayerNorm(d)
        # the head reads the embedding's weight at every call (tied); pass an
        # nn.Linear(d, vocab, bias=False) instead for an untied head
        self.head = FusedLinearCrossEntropy(self.embed)

    def hidden(self, x):                      # (B, T) -> (B, T, d)
        return self.norm(self.rnn(self.embed(x))[0])

    def forward(self, x, y):                  # -> HeadOutput; .loss is the mean loss
        return self.head(self.hidden(x), y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per step (phase 2)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tiny", action="store_true", help="3 steps of each loop at a small size")
    args = ap.parse_args()
    steps = 3 if args.tiny else args.steps
    vocab = 256 if args.tiny else args.vocab
    torch.manual_seed(0)
    # a synthetic corpus: token t+1 = (3 * token t + 1) mod vocab, so the loss can fall
    start = torch.randint(0, vocab, (64, 1))
    seq = [start]
    for _ in range(32):
        seq.append((3 * seq[-1] + 1) % vocab)
    data = torch.cat(seq, 1)
    x, y = data[:, :-1], data[:, 1:]

    model = TinyLM(vocab)
    opt = FunctionalSAM(model.parameters(), lr=3e-3, rho=0.05, precondition=True)

    # 1) one micro-batch per step: the closure returns (head output, loss)
    for step in range(steps):
        def closure():
            out = model(x, y)
            return out, out.loss
        loss = opt.step(closure)
        if step % 50 == 0 or step == steps - 1:
            print(f"closure step {step:3d}  loss {loss.item():.4f}")

    # 2) gradient accumulation with the two-phase API
    batches = list(zip(x.chunk(args.micro), y.chunk(args.micro)))
    rec = HeadRecorder(opt)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for xb, yb in batches:                           # pass 1 at θ
            out = rec.capture(model(xb, yb))              # before its backward
            (out.loss / len(batches)).backward()
            total += out.loss.item() / len(batches)
        opt.first_step()                                  # θ -> θ + e
        opt.zero_grad(set_to_none=True)
        for xb, yb in batches:                           # pass 2, same order
            rec.replay(model.hidden(xb), yb)              # J(θ+e)ᵀ c0, no logits; labels checked
        opt.second_step()                                 # restore θ, AdamW
        if step % 50 == 0 or step == steps - 1:
            print(f"accumulation step {step:3d}  loss {total:.4f}")


if __name__ == "__main__":
    main()
