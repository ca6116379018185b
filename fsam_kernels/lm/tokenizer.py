"""Tokenizers for the language-model job: a byte-level BPE trained offline
with the `tokenizers` library, or raw UTF-8 bytes.

Both map ``str -> list[int]`` and back without unknown tokens: the BPE is
byte-level (GPT-2 style pre-tokenisation and decoder), so any text encodes.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator

#: Accepted values of ``--tokenizer``.
TOKENIZER_KINDS = ("bpe", "bytes")


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``vocab_size == 256``, ids in ``[0, 256)``."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, path: str) -> None:  # nothing to store
        pass


class BPETokenizer:
    """A byte-level BPE (``tokenizers.Tokenizer``) with ``vocab_size`` ids.

    Build one with :meth:`train` (on the training split only) or :meth:`load`.
    """

    kind = "bpe"

    def __init__(self, tok):
        self._tok = tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> "BPETokenizer":
        """Train on ``texts`` (an iterable of strings). ``vocab_size`` counts
        the 256 byte tokens; a small corpus may give fewer merges.
        Raises ValueError if ``vocab_size < 256``."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 256:
            raise ValueError(f"--vocab-size must be >= 256 for a byte-level BPE, got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        tok.train_from_iterator(_chunks(texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(path))

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        self._tok.save(tmp)
        os.replace(tmp, path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """Split long strings at newlines into pieces of about ``size`` chars."""
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start + size)
            end = len(text) if end < 0 else end + 1
            yield text[start:end]
            start = end
