"""The main job: a small decoder-only language model trained on real text
with AdamW, SAM, Functional-SAM and their preconditioned variants.

* :mod:`.model`: the NanoDO-style transformer (:class:`GPT`, :class:`GPTConfig`,
  :data:`PRESETS`).
* :mod:`.data`: offline corpora, train/validation split, token cache
  (:func:`prepare`), batches; ``python -m fsam_kernels.lm.data --prepare``.
* :mod:`.tokenizer`: byte-level BPE (``tokenizers``) or raw bytes.
* :mod:`.train`: the ``fsam-train`` command.

Names are imported lazily so that ``python -m fsam_kernels.lm.data`` runs
without importing its own module twice.
"""
import importlib

_EXPORTS = {"GPT": "model", "GPTConfig": "model", "PRESETS": "model", "config_for": "model",
            "prepare": "data", "TokenData": "data", "DataError": "data"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
