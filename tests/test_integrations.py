"""Loops people use (issue 10): the step protocol of torch.optim wrappers
(step() completing a pending first_step, back-propagating closures,
mark_output), the Hugging Face Trainer (SAMTrainer) and Lightning.

Every comparison is against a hand-written two-pass loop with the same
optimizer class, backend and data, written from the SAM protocol (SPEC §1-§3)
with torch's own ops (autograd, clip_grad_norm_, cross_entropy), not with the
integration's code. Same backend, same inputs, same order of operations:
equal bitwise (SPEC §5, determinism); where the framework computes the loss
by another route than the hand loop, float32 rtol 1e-5 (SPEC §5, float32
after up to 10 steps).
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from torch import nn

from fsam_kernels import SAM, FunctionalSAM

try:
    import transformers  # noqa: F401
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    HAS_HF, HF_WHY = True, ""
except Exception as exc:  # pragma: no cover - make test installs it
    HAS_HF, HF_WHY = False, f"transformers is not importable ({exc}); `make test` installs it"
try:
    import lightning.pytorch as pl
    HAS_PL, PL_WHY = True, ""
except Exception as exc:  # pragma: no cover - make test installs it
    HAS_PL, PL_WHY = False, f"lightning is not importable ({exc}); `make test` installs it"

needs_hf = pytest.mark.skipif(not HAS_HF, reason=HF_WHY)
needs_pl = pytest.mark.skipif(not HAS_PL, reason=PL_WHY)
CLASSES = [SAM, FunctionalSAM]
BACKEND = "foreach"


def test_integration_dependencies_present_in_ci():
    """`make test` installs transformers and lightning; in CI (CI=true) their
    tests must run, not skip."""
    if os.environ.get("CI") != "true":
        pytest.skip("only checked in CI (CI=true)")
    assert HAS_HF, HF_WHY
    assert HAS_PL, PL_WHY


# ----------------------------------------------------------- the step protocol
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _xy(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _hand_step(opt, model, batches, functional, clip=None):
    """SPEC §1-§3 by hand: pass 1 over the micro-batches, first_step, pass 2 over
    the same micro-batches (FSAM: backward of z with c0 = dℓ/dz from pass 1),
    optional clip of the pass-2 gradient, second_step."""
    loss_fn = nn.functional.cross_entropy
    opt.zero_grad(set_to_none=True)
    cots, total = [], 0.0
    for x, y in batches:
        z = model(x)
        loss = loss_fn(z, y) / len(batches)
        if functional:
            cots.append(torch.autograd.grad(loss, z, retain_graph=True)[0])
        loss.backward()
        total += loss.item()
    opt.first_step()
    opt.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(batches):
        z = model(x)
        if functional:
            z.backward(cots[i])
        else:
            (loss_fn(z, y) / len(batches)).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.second_step()
    return total


@pytest.mark.parametrize("cls", CLASSES)
def test_back_propagating_closure_equals_hand_loop(cls):
    """torch.optim's closure convention (zero_grad + backward inside, returns the
    loss), with mark_output for Functional-SAM: bitwise the hand-written loop."""
    x, y = _xy()
    m1, m2 = _mlp(), _mlp()
    o1 = cls(m1.parameters(), backend=BACKEND, lr=1e-2, weight_decay=0.1)
    o2 = cls(m2.parameters(), backend=BACKEND, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        ref = _hand_step(o1, m1, [(x, y)], cls is FunctionalSAM)

        def closure():
            o2.zero_grad()
            z = o2.mark_output(m2(x))
            loss = nn.functional.cross_entropy(z, y)
            loss.backward()
            return loss
        got = o2.step(closure)
        assert got.item() == ref
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", CLASSES)
def test_step_completes_a_pending_first_step(cls):
    """first_step(), the user's pass 2, then opt.step() (what accelerate,
    Lightning's manual optimization and Trainer call) = second_step(); it is
    counted by an lr scheduler (no 'step() before optimizer.step()' warning)."""
    x, y = _xy()
    m1, m2 = _mlp(), _mlp()
    o1 = cls(m1.parameters(), backend=BACKEND, lr=1e-2)
    o2 = cls(m2.parameters(), backend=BACKEND, lr=1e-2)
    s1 = torch.optim.lr_scheduler.StepLR(o1, 1, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, 1, gamma=0.5)
    functional = cls is FunctionalSAM
    for _ in range(2):
        _hand_step(o1, m1, [(x, y)], functional)
        s1.step()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        for _ in range(2):
            o2.zero_grad()
            z = o2.mark_output(m2(x))
            nn.functional.cross_entropy(z, y).backward()
            o2.first_step()
            o2.zero_grad()
            z = o2.mark_output(m2(x))
            nn.functional.cross_entropy(z, y).backward()
            assert o2.step() is None and o2._perturbed is None
            s2.step()
    assert o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"] == 1e-2 * 0.25
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="needs a closure"):
        o2.step()                                 # nothing pending, no closure


def test_closure_errors_name_the_fix():
    x, y = _xy()
    m = _mlp()
    theta = [p.detach().clone() for p in m.parameters()]
    o = SAM(m.parameters(), backend=BACKEND)

    def pair_after_backward():                    # (output, loss) but backward already run
        z = m(x)
        loss = nn.functional.cross_entropy(z, y)
        loss.backward()
        return z, loss
    with pytest.raises(RuntimeError, match="forward only.*back-propagating form"):
        o.step(pair_after_backward)

    def loss_only():                              # a single tensor, no backward
        return nn.functional.cross_entropy(m(x), y)
    with pytest.raises(TypeError, match="ran no backward"):
        o.step(loss_only)
    # gradients accumulated outside the closure (Lightning accumulate_grad_batches > 1)
    nn.functional.cross_entropy(m(x), y).backward()

    def no_zero_grad():
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match="accumulated into gradients"):
        o.step(no_zero_grad)
    assert all(torch.equal(p, t) for p, t in zip(m.parameters(), theta))
    o.zero_grad()
    assert o.step(lambda: None) is None           # Lightning's skipped batch: nothing done
    assert all(torch.equal(p, t) for p, t in zip(m.parameters(), theta))
    f = FunctionalSAM(m.parameters(), backend=BACKEND)

    def unmarked():
        f.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss
    with pytest.raises(ValueError, match="mark_output"):
        f.step(unmarked)
    assert f._perturbed is None
    assert all(torch.equal(p, t) for p, t in zip(m.parameters(), theta))
    # pending first_step with a closure that back-propagates: refused, still pending
    nn.functional.cross_entropy(m(x), y).backward()
    o.first_step()
    with pytest.raises(RuntimeError, match="pending"):
        o.step(no_zero_grad)
    o.restore()
    assert all(torch.equal(p, t) for p, t in zip(m.parameters(), theta))


# ----------------------------------------------------------- Hugging Face Trainer
VOCAB, SEQ = 32, 8


def _gpt2(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     use_cache=False)
    return GPT2LMHeadModel(cfg)


class _Tokens(torch.utils.data.Dataset):
    """Tokenizer-free integer sequences; the last position of odd rows is
    ignored (-100) so micro-batches have different token counts. Position 0 is
    never a target (-100), so the count of predicted tokens is the same whether
    it is taken over labels or labels[..., 1:] (Trainer versions differ)."""

    def __init__(self, n=12, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[0] = -100
        if i % 2:
            labels[-1] = -100
        return {"input_ids": self.ids[i], "labels": labels}


if HAS_HF:
    from fsam_kernels.integrations.hf import SAMTrainer

    class _SequentialSAMTrainer(SAMTrainer):
        """Data in dataset order, so the hand loop sees the same micro-batches."""

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2,
                gradient_accumulation_steps=1, max_steps=2, learning_rate=1e-2,
                weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=0,
                max_grad_norm=0.05, logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def _groups(model):
    decay = set(Trainer.get_decay_parameter_names(None, model))
    return [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.1},
            {"params": [p for n, p in model.named_parameters() if n not in decay],
             "weight_decay": 0.0}]


def _hf_hand_loop(cls, steps, accum, clip, data, rho=0.05, bf16=False):
    """The SAM protocol by hand on the GPT-2 LM loss, as Trainer defines it:
    per optimizer step, loss of micro-batch k = Σ CE(shifted tokens) / N with N
    the window's count of predicted tokens (labels[..., 1:] != -100); linear lr
    decay to 0 over `steps`; clipping of the pass-2 gradient; with bf16 every
    forward in its own autocast region (as accelerate wraps the model)."""
    model = _gpt2()
    model.train()
    opt = cls(_groups(model), backend=BACKEND, lr=1e-2, rho=rho)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, (steps - t) / steps))
    functional = cls is FunctionalSAM
    losses = []
    for s in range(steps):
        window = [data[2 * (s * accum + k): 2 * (s * accum + k) + 2] for k in range(accum)]
        n_items = sum(int((lab[:, 1:] != -100).sum()) for _, lab in window)

        def lm_loss(ids, lab):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids).logits
            shift = nn.functional.pad(lab, (0, 1), value=-100)[:, 1:]
            return logits, nn.functional.cross_entropy(
                logits.float().reshape(-1, VOCAB), shift.reshape(-1), ignore_index=-100,
                reduction="sum") / n_items
        opt.zero_grad(set_to_none=True)
        cots, total = [], 0.0
        for ids, lab in window:
            z, loss = lm_loss(ids, lab)
            if functional:
                cots.append(torch.autograd.grad(loss, z, retain_graph=True)[0])
            loss.backward()
            total += loss.item()
        opt.first_step()
        opt.zero_grad(set_to_none=True)
        for k, (ids, lab) in enumerate(window):
            z, loss = lm_loss(ids, lab)
            z.backward(cots[k]) if functional else loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step()
        sched.step()
        losses.append(total)
    return model, opt, losses


def _window_data(ds):
    ids = torch.stack([ds[i]["input_ids"] for i in range(len(ds))])
    lab = torch.stack([ds[i]["labels"] for i in range(len(ds))])

    class _Rows:
        def __getitem__(self, sl):
            return ids[sl], lab[sl]
    return _Rows()


@needs_hf
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("accum,bf16", [(1, False), (2, False), (2, True)])
def test_sam_trainer_equals_hand_loop(cls, accum, bf16, tmp_path):
    """SAMTrainer, 2 optimizer steps with gradient accumulation 1 and 2, Trainer's
    clipping on (max_grad_norm=0.05 is active) and its linear scheduler, fp32 and
    bf16 autocast (accelerate's, which hands back float32 copies of the logits:
    Functional-SAM must still take c0 where the loss is computed): the
    parameters, the Adam state and the logged (pass-1) losses equal the hand loop."""
    ds = _Tokens()
    model = _gpt2()
    opt = cls(_groups(model), backend=BACKEND, lr=1e-2, rho=0.05)
    tr = _SequentialSAMTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=accum,
                                                       bf16=bf16),
                               train_dataset=ds, optimizers=(opt, None))
    tr.train()
    ref_model, ref_opt, ref_losses = _hf_hand_loop(cls, 2, accum, 0.05, _window_data(ds),
                                                   bf16=bf16)
    assert tr.state.global_step == 2
    named = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, named[n], rtol=1e-5, atol=1e-7, msg=n)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][k], ref_opt.state[q][k], rtol=1e-5, atol=1e-9)
        assert float(opt.state[p]["step"]) == 2.0
    logged = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert logged == pytest.approx(ref_losses, rel=1e-5)
    # the clip was active: the pass-2 gradient norm exceeded max_grad_norm
    norms = [h["grad_norm"] for h in tr.state.log_history if "grad_norm" in h]
    assert len(norms) == 2 and all(n > 0.05 for n in norms)


@needs_hf
def test_sam_trainer_rho0_with_dropout_equals_adamw_trainer(tmp_path):
    """rho=0 makes SAM AdamW: with dropout on, SAMTrainer (two forwards per
    micro-batch, RNG restored for pass 2) must train as Trainer with torch's
    AdamW does, and leave the RNG where one forward would: a different dropout
    mask in pass 2 or a shifted RNG stream would break the equality."""
    ds = _Tokens()
    m1, m2 = _gpt2(dropout=0.2), _gpt2(dropout=0.2)
    t1 = _SequentialSAMTrainer(model=m1, args=_args(tmp_path / "a", gradient_accumulation_steps=2,
                                                     max_steps=3, optim="adamw_torch"),
                               train_dataset=ds, sam_kwargs={"rho": 0.0, "backend": BACKEND})
    t1.train()
    assert isinstance(t1.optimizer.optimizer, SAM)

    class _Seq(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)
    t2 = _Seq(model=m2, args=_args(tmp_path / "b", gradient_accumulation_steps=2, max_steps=3,
                                   optim="adamw_torch"), train_dataset=ds)
    t2.train()
    assert isinstance(t2.optimizer.optimizer, torch.optim.AdamW)
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    l1 = [h["loss"] for h in t1.state.log_history if "loss" in h]
    l2 = [h["loss"] for h in t2.state.log_history if "loss" in h]
    assert l1 == pytest.approx(l2, rel=1e-5)


@needs_hf
@pytest.mark.parametrize("cls", CLASSES)
def test_sam_trainer_resume_equals_continuing(cls, tmp_path):
    """Checkpoint at step 2 (optimizer state_dict, scheduler, RNG) and resume to
    step 4 = 4 steps without stopping, bitwise."""
    ds = _Tokens(n=16)
    sam_kwargs = {"rho": 0.05, "backend": BACKEND}
    m1 = _gpt2()
    t1 = _SequentialSAMTrainer(model=m1, args=_args(tmp_path / "a", gradient_accumulation_steps=2,
                                                     max_steps=4, save_strategy="steps",
                                                     save_steps=2),
                               train_dataset=ds, sam_class=cls, sam_kwargs=sam_kwargs)
    t1.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").exists()
    m2 = _gpt2(seed=5)                               # other initial weights: the checkpoint's win
    t2 = _SequentialSAMTrainer(model=m2, args=_args(tmp_path / "b", gradient_accumulation_steps=2,
                                                     max_steps=4),
                               train_dataset=ds, sam_class=cls, sam_kwargs=sam_kwargs)
    t2.train(resume_from_checkpoint=str(ckpt))
    assert t2.state.global_step == 4
    assert isinstance(t2.optimizer.optimizer, cls)
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n


@needs_hf
def test_trainer_errors_and_cache_hint(tmp_path):
    """SAMTrainer refuses a non-SAM optimizer and sam_kwargs' model; a plain
    Trainer with SAM names SAMTrainer; an output holding a DynamicCache in a
    forward-only closure gets the use_cache hint."""
    ds = _Tokens()
    model = _gpt2()
    tr = _SequentialSAMTrainer(model=model, args=_args(tmp_path), train_dataset=ds,
                               optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(TypeError, match="SAM or FunctionalSAM"):
        tr.train()
    plain = Trainer(model=model, args=_args(tmp_path), train_dataset=ds,
                    optimizers=(SAM(model.parameters(), backend=BACKEND), None))
    with pytest.raises(TypeError, match="integrations.hf.SAMTrainer"):
        plain.train()                  # Trainer calls step() without a closure
    with pytest.raises(ValueError, match="leave out 'model'"):
        SAMTrainer(model=model, args=_args(tmp_path), train_dataset=ds,
                   sam_kwargs={"model": model})
    cfg_model = _gpt2()
    cfg_model.config.use_cache = True
    ids = ds.ids[:2]
    o = SAM(cfg_model.parameters(), backend=BACKEND)
    with pytest.raises(TypeError, match="use_cache=False"):       # (logits, DynamicCache)
        o.step(lambda: (lambda out: (out, out[0].float().square().mean()))(
            cfg_model(input_ids=ids, use_cache=True, return_dict=False)))


# ----------------------------------------------------------- Lightning
def _loader(n=12, batch=4):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False), x, y


def _pl_trainer(**kw):
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, max_epochs=5)
    base.update(kw)
    return pl.Trainer(**base)


if HAS_PL:
    class _Lit(pl.LightningModule):
        def __init__(self, cls, manual=False, mark=True):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
            self.cls, self.mark = cls, mark
            self.automatic_optimization = not manual
            self.calls = 0

        def configure_optimizers(self):
            return self.cls(self.parameters(), backend=BACKEND, lr=1e-2, rho=0.05, model=self)

        def _loss(self, batch):
            x, y = batch
            z = self.net(x)
            if self.mark:
                z = self.optimizers().mark_output(z)
            return nn.functional.cross_entropy(z, y)

        def training_step(self, batch, batch_idx):
            self.calls += 1
            if self.automatic_optimization:
                return self._loss(batch)
            from fsam_kernels.integrations.lightning import manual_step
            return manual_step(self, lambda: self._loss(batch))


def _pl_hand_loop(cls, x, y, steps, batch=4, clip=None, bf16=False):
    """The hand loop of Lightning's automatic optimization: each closure call
    clips its own gradient (Lightning clips after every backward); bf16: each
    forward and loss in its own autocast region (Lightning's "bf16-mixed")."""
    def ac():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = cls(net.parameters(), backend=BACKEND, lr=1e-2, rho=0.05)
    functional = cls is FunctionalSAM
    for s in range(steps):
        i = (s * batch) % len(x)
        xb, yb = x[i:i + batch], y[i:i + batch]
        opt.zero_grad(set_to_none=True)
        with ac():
            z = net(xb)
            loss = nn.functional.cross_entropy(z, yb)
        c0 = torch.autograd.grad(loss, z, retain_graph=True)[0] if functional else None
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.first_step()
        opt.zero_grad(set_to_none=True)
        with ac():
            z = net(xb)
            loss2 = None if functional else nn.functional.cross_entropy(z, yb)
        z.backward(c0) if functional else loss2.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.second_step()
    return net


@needs_pl
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_automatic_optimization_equals_hand_loop(cls, precision):
    """Lightning's closure (training_step + zero_grad + backward, returning the
    loss) drives both passes; FunctionalSAM through mark_output; clipping on;
    fp32 and bf16 autocast. 5 steps over 3 batches: parameters bitwise the hand
    loop, global_step 5. (Lightning's mixed-precision plugin refuses
    gradient_clip_val for optimizers that unscale internally, as SAM declares:
    no clipping under bf16; the optimizer's max_grad_norm clips instead.)"""
    loader, x, y = _loader()
    lit = _Lit(cls)
    bf16 = precision == "bf16-mixed"
    clip = None if bf16 else 0.05
    tr = _pl_trainer(max_steps=5, gradient_clip_val=clip, gradient_clip_algorithm="norm",
                     precision=precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(lit, loader)
    assert tr.global_step == 5 and lit.calls == 10          # two closure calls per step
    ref = _pl_hand_loop(cls, x, y, 5, clip=clip, bf16=bf16)
    for a, b in zip(lit.net.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@needs_pl
def test_lightning_functional_without_mark_names_the_fix():
    loader, _, _ = _loader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="mark_output"):
            _pl_trainer(max_steps=1).fit(_Lit(FunctionalSAM, mark=False), loader)
        with pytest.raises(RuntimeError, match="accumulate_grad_batches"):
            _pl_trainer(max_steps=2, accumulate_grad_batches=2).fit(_Lit(SAM), loader)


@needs_pl
@pytest.mark.parametrize("cls", CLASSES)
def test_lightning_manual_optimization_counts_steps(cls):
    """Manual optimization with first_step(), pass 2 and opt.step()
    (manual_step): global_step counts, max_steps=3 stops after 3 steps, and the
    parameters equal the hand loop bitwise."""
    loader, x, y = _loader()
    lit = _Lit(cls, manual=True)
    tr = _pl_trainer(max_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(lit, loader)
    assert tr.global_step == 3 and lit.calls == 3
    ref = _pl_hand_loop(cls, x, y, 3)
    for a, b in zip(lit.net.parameters(), ref.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------- the examples
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script,args", [
    pytest.param("hf_trainer.py", ["--fsam", "--model", "llama", "--precondition"], marks=needs_hf),
    pytest.param("lightning_sam.py", ["--fsam"], marks=needs_pl),
])
def test_integration_examples_run(script, args, monkeypatch, capsys):
    """Smoke run with --tiny, in this process (transformers / lightning are
    imported already); the example asserts its own step count and finite
    losses."""
    import runpy
    import sys

    path = os.path.join(ROOT, "python", script)
    monkeypatch.setattr(sys, "argv", [path, "--tiny", *args])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert "steps" in out or "global_step" in out


@needs_hf
def test_sam_trainer_sam_kwargs_base_optimizer_and_overrides(tmp_path):
    """sam_kwargs with a base_optimizer (SGD) gets only lr from TrainingArguments (no
    AdamW betas/eps), and sam_kwargs' own betas win over TrainingArguments'."""
    ds = _Tokens()
    t = _SequentialSAMTrainer(model=_gpt2(), args=_args(tmp_path / "a", max_steps=1,
                                                        learning_rate=0.05),
                              train_dataset=ds,
                              sam_kwargs={"rho": 0.05, "backend": BACKEND,
                                          "base_optimizer": torch.optim.SGD, "momentum": 0.9})
    t.train()
    opt = t.optimizer.optimizer
    assert isinstance(opt, SAM)
    g = opt.param_groups[0]
    assert g["momentum"] == 0.9 and "betas" not in g and "eps" not in g
    assert g["initial_lr"] == 0.05                     # TrainingArguments' learning_rate
    t2 = _SequentialSAMTrainer(model=_gpt2(), args=_args(tmp_path / "b", max_steps=1),
                               train_dataset=ds,
                               sam_kwargs={"rho": 0.05, "backend": BACKEND, "betas": (0.8, 0.9)})
    t2.train()
    assert t2.optimizer.optimizer.param_groups[0]["betas"] == (0.8, 0.9)
