"""Hugging Face Trainer with SAM or Functional-SAM (fsam_kernels.integrations.hf).

A tiny random-init GPT-2 or Llama (built from a config: nothing is
downloaded) learns a tokenizer-free integer task: each sequence counts up
from a random start, modulo the vocabulary, so the next token is predictable
and the loss falls well below log(vocab).

    python python/hf_trainer.py [--fsam] [--precondition] [--model gpt2|llama]
                                [--steps 60] [--accum 2] [--tiny]
"""
import argparse
import math
import tempfile

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          TrainingArguments)

from fsam_kernels import SAM, FunctionalSAM
from fsam_kernels.integrations.hf import SAMTrainer

VOCAB, SEQ = 64, 16


class CountingData(torch.utils.data.Dataset):
    """input_ids = (start + arange(SEQ)) % VOCAB; labels = input_ids (the model
    shifts them); position 0 is not a target."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.start = torch.randint(0, VOCAB, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.start)

    def __getitem__(self, i):
        ids = (self.start[i] + torch.arange(SEQ)) % VOCAB
        labels = ids.clone()
        labels[0] = -100
        return {"input_ids": ids, "labels": labels}


def build(kind: str):
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                         resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0, use_cache=False)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=SEQ, use_cache=False)
    return LlamaForCausalLM(cfg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fsam", action="store_true", help="Functional-SAM instead of SAM")
    ap.add_argument("--precondition", action="store_true", help="preconditioned ascent")
    ap.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    ap.add_argument("--tiny", action="store_true", help="smoke run (a few steps)")
    args = ap.parse_args()
    steps = 4 if args.tiny else args.steps
    torch.manual_seed(0)
    model = build(args.model)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=8,
            gradient_accumulation_steps=args.accum, learning_rate=3e-3, weight_decay=0.01,
            lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), max_grad_norm=1.0,
            logging_steps=max(1, steps // 6), save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), seed=0, disable_tqdm=True)
        trainer = SAMTrainer(
            model=model, args=targs, train_dataset=CountingData(512),
            sam_class=FunctionalSAM if args.fsam else SAM,
            sam_kwargs={"rho": 0.05, "precondition": args.precondition})
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{type(trainer.optimizer.optimizer).__name__}: {trainer.state.global_step} steps, "
          f"pass-1 loss {losses[0]:.3f} -> {losses[-1]:.3f} (log(vocab) = {math.log(VOCAB):.3f})")
    assert trainer.state.global_step == steps and all(math.isfinite(v) for v in losses)


if __name__ == "__main__":
    main()
