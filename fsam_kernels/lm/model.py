"""A NanoDO-style decoder-only transformer, in one readable file.

Pre-LayerNorm blocks without biases, causal multi-head self-attention, a GELU
MLP, learned absolute position embeddings and an output layer tied to the
input embedding (``logits = h @ embed.weight.T``; ``tie_embeddings=False``
gives a separate head). This is the model family of
the paper's language experiments (Singh et al., ICML 2025, which used NanoDO,
github.com/google-deepmind/nanodo), at sizes that fit a CPU or one GPU.

Shapes: token ids ``idx`` are int64 ``(B, T)`` with ``T <= block_size``;
logits are ``(B, T, vocab_size)`` in the parameters' dtype (float32 unless
the caller casts the model or runs it under autocast). ``hidden(idx)`` gives
the final hidden states ``(B, T, d_model)`` and ``fused_loss(idx, targets)``
the cross-entropy through the fused head (fsam_kernels.heads), which never
materialises the logits.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    """Model sizes.

    vocab_size: number of token ids (set from the tokenizer).
    block_size: the context, the longest sequence the model accepts (tokens).
    n_layer, n_head, d_model: depth, attention heads, residual width;
        ``d_model`` must be divisible by ``n_head``.
    mlp_ratio: hidden width of the MLP as a multiple of ``d_model``.
    init_std: standard deviation of the normal initialisation; residual output
        projections are further scaled by ``1/sqrt(2 * n_layer)`` (GPT-2).
    tie_embeddings: the output layer shares the token embedding's weight.
    """

    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    init_std: float = 0.02
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "mlp_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"GPTConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig.d_model={self.d_model} must be divisible by n_head={self.n_head}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


#: Named sizes. ``tiny`` is for tests (well under a second per step on a CPU),
#: ``mini`` (0.17M parameters at vocab 1024) is the data-limited CPU study's
#: model (bench/results/sweep-shakespeare-cpu-datalimited/), ``small`` is the
#: default CPU comparison run, ``medium`` and ``large`` are for
#: GPUs (about 25M and 200M non-embedding parameters).
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, d_model=32),
    "mini": GPTConfig(block_size=64, n_layer=2, n_head=2, d_model=64),
    "small": GPTConfig(block_size=256, n_layer=4, n_head=4, d_model=128),
    "medium": GPTConfig(block_size=1024, n_layer=8, n_head=8, d_model=512),
    "large": GPTConfig(block_size=1024, n_layer=16, n_head=16, d_model=1024),
}


def config_for(preset: str, vocab_size: int, **overrides) -> GPTConfig:
    """The config of ``preset`` with ``vocab_size`` (and any field overrides).

    Raises ValueError naming ``--preset`` for an unknown preset name.
    """
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], vocab_size=int(vocab_size), **overrides)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, C/H)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN residual block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx)`` returns logits ``(B, T, V)``.

    With ``tie_embeddings`` (default) the output layer shares its weight with
    the token embedding (``self.lm_head.weight is self.embed.weight``), so
    ``parameters()`` yields it once. ``self.head_loss`` is the fused linear
    cross-entropy over ``lm_head`` (no parameters of its own).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # tied
        from ..heads import FusedLinearCrossEntropy

        self.head_loss = FusedLinearCrossEntropy(self.lm_head)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices and embeddings, ones for LayerNorm
        weights; residual output projections scaled by 1/sqrt(2 n_layer)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:  # LayerNorm weights
                nn.init.ones_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of distinct parameters (the tied matrix once); with
        ``non_embedding`` the token and position embeddings are excluded."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel() + self.pos.weight.numel()
        return n

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(B, T, d_model)`` (after the last LayerNorm):
        the input of the output layer. Arguments and errors as ``forward``."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the model's context block_size="
                f"{self.cfg.block_size} (pass a shorter --seq-len or a preset with a longer context)"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.embed(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits for every position.

        idx: int64 ``(B, T)`` token ids in ``[0, vocab_size)``.
        Returns ``(B, T, vocab_size)`` logits; position t depends only on
        ``idx[:, :t+1]`` (causal).
        Raises ValueError if ``idx`` is not 2-D or if ``T > block_size``.
        """
        return self.lm_head(self.hidden(idx))

    def fused_loss(self, idx: torch.Tensor, targets: torch.Tensor):
        """Mean next-token cross-entropy through the fused head, without the
        logits: a :class:`fsam_kernels.heads.HeadOutput` whose ``.loss`` is
        the 0-d loss (float32); return ``(out, out.loss)`` from a SAM /
        FunctionalSAM closure. ``targets``: int64 ``(B, T)``."""
        return self.head_loss(self.hidden(idx), targets)
