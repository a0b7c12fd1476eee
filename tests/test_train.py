"""Training: LR schedules, gradient accumulation, metrics/checkpoints/plot of a run, exact resume after SIGKILL,
optimizers, epochs."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, read_jsonl, sigkill_when, tiny_cfg_dict, tiny_run_config
from lmstack.checkpoint import load_model, load_train_state
from lmstack.config import ModelConfig
from lmstack.data.shards import TokenDataset
from lmstack.errors import ConfigError, LMStackError
from lmstack.models import Transformer
from lmstack.train import Trainer, TrainConfig, load_recipe, lr_at, pretrain
from lmstack.train.pretrain import lm_loss, make_evaluator

QUIET = dict(log=lambda *a: None)


# ---- learning-rate schedules -----------------------------------------------------------------------
def sched(**kw) -> TrainConfig:
    d = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, progress=False)
    d.update(kw)
    return TrainConfig(**d)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_warmup_is_linear(schedule):
    cfg = sched(lr_schedule=schedule)
    lrs = [lr_at(s, cfg, 110) for s in range(10)]
    assert lrs[0] == pytest.approx(1.0 / 11)
    assert np.allclose(np.diff(lrs), 1.0 / 11)
    assert all(lr < 1.0 for lr in lrs)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)  # warmup done: the peak


def test_cosine_reaches_min_lr_at_decay_steps():
    cfg = sched(decay_steps=60)
    assert lr_at(35, cfg, 110) == pytest.approx(0.55)  # half way from warmup end (10) to 60: mean of lr, min_lr
    assert lr_at(10 + 25 // 2, cfg, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 12 / 50)))
    assert lr_at(59, cfg, 110) > 0.1
    assert lr_at(59, cfg, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 49 / 50)))
    for s in (60, 61, 109, 500):
        assert lr_at(s, cfg, 110) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(10, 61)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    # decay_steps defaults to max_steps
    assert lr_at(109, sched(), 110) > 0.1 and lr_at(110, sched(), 110) == pytest.approx(0.1)


def test_linear_schedule():
    cfg = sched(lr_schedule="linear")
    for s in (10, 35, 60, 85, 109):
        assert lr_at(s, cfg, 110) == pytest.approx(1.0 - 0.9 * (s - 10) / 100)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)


def test_constant_schedule():
    cfg = sched(lr_schedule="constant")
    assert {lr_at(s, cfg, 110) for s in (10, 50, 109, 1000)} == {1.0}


def test_wsd_schedule():
    cfg = sched(lr_schedule="wsd", wsd_decay_fraction=0.2, max_steps=100)
    # stable at the peak until step 80, then linear to min_lr at step 100
    assert all(lr_at(s, cfg, 100) == pytest.approx(1.0) for s in range(10, 81))
    assert lr_at(90, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1) and lr_at(150, cfg, 100) == pytest.approx(0.1)
    assert lr_at(81, cfg, 100) < 1.0


def test_no_warmup():
    cfg = sched(warmup_steps=0)
    assert lr_at(0, cfg, 110) == pytest.approx(1.0)


# ---- gradient accumulation ----------------------------------------------------------------------------
def _one_update(tmp_path, accum, optimizer, batch, steps=1):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**tiny_cfg_dict(dropout=0.0)))
    cfg = TrainConfig(out_dir=str(tmp_path / f"{optimizer}-{accum}"), max_steps=steps, grad_accum=accum,
                      batch_size=len(batch[0]) // accum, optimizer=optimizer, lr=0.05, lr_schedule="constant",
                      warmup_steps=0, weight_decay=0.0, momentum=0.0, grad_clip=1.0, eps=1e-5, progress=False)
    x, y = batch
    b = len(x) // accum

    def get_batch(step, micro):
        return x[micro * b:(micro + 1) * b], y[micro * b:(micro + 1) * b]
    hist = Trainer(model, cfg, lm_loss, get_batch, steps).fit()
    return model, hist


@pytest.mark.parametrize("optimizer,atol", [("sgd", 2e-6), ("adamw", 1e-4)])
def test_grad_accumulation_matches_full_batch(tmp_path, optimizer, atol):
    """2 micro-batches of B/2 == 1 batch of B. (Adam's first steps are ~lr*sign(g), so float noise in gradients
    that are ~0 in exact arithmetic, e.g. the key biases, moves weights by up to lr: eps=1e-5 damps that, and the
    Adam tolerance is 1e-4 = lr/500.)"""
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 64, (8, 17), generator=g)
    batch = (data[:, :-1], data[:, 1:])
    m1, h1 = _one_update(tmp_path, 1, optimizer, batch, steps=2)
    m2, h2 = _one_update(tmp_path, 2, optimizer, batch, steps=2)
    torch.manual_seed(0)
    m0 = Transformer(ModelConfig(**tiny_cfg_dict()))
    moved = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m0.parameters()))
    assert moved > 1e-3  # the update is real
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=n)
    assert [r["train_loss"] for r in h1] == pytest.approx([r["train_loss"] for r in h2], rel=1e-5)


# ---- a full (tiny) run ------------------------------------------------------------------------------------
def test_metrics_jsonl(tiny_run):
    out, summary = tiny_run
    recs = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in recs if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for r in steps:
        assert {"step", "train_loss", "lr", "tokens_per_sec", "elapsed_s"} <= set(r)
        assert r["tokens_per_sec"] > 0 and math.isfinite(r["train_loss"])
    cfg = tiny_run_config(out, "unused")
    assert [r["lr"] for r in steps] == pytest.approx([lr_at(s, cfg, 30) for s in range(30)])
    assert [r["elapsed_s"] for r in steps] == sorted(r["elapsed_s"] for r in steps)
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    for r in evals:
        # ASCII corpus + char tokenizer: one byte per token, so bits/byte = nats/token / ln 2
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-9)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"] - 1.0
    final = [r for r in recs if "final_val_loss" in r]
    assert len(final) == 1 and final[0]["step"] == 30 and final[0]["final_val_tokens"] == 4 * 32
    assert summary["steps"] == 30 and summary["final_val_loss"] == final[0]["final_val_loss"]


def test_best_and_last_checkpoints(tiny_run):
    out, _ = tiny_run
    recs = read_jsonl(out / "metrics.jsonl")
    val = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    ds = TokenDataset(out / "data")
    evaluator = make_evaluator(ds, 32, 8, 1337, ds.tokenizer.byte_lengths())
    for name, want in (("last", val[30]), ("best", min(val.values()))):
        model, tok = load_model(out / name)
        assert tok is not None and tok.vocab_size == ds.tokenizer.vocab_size
        with torch.no_grad():
            got = evaluator(model, iters=2)["val_loss"]
        assert got == pytest.approx(want, rel=1e-5), name
    assert load_train_state(out / "last")["step"] == 30
    assert load_train_state(out / "best")["step"] == min(val, key=val.get)


def test_loss_png(tiny_run):
    out, summary = tiny_run
    png = out / "loss.png"
    assert Path(summary["plot"]) == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def _optimizer_supported(name: str) -> bool:
    try:
        TrainConfig(optimizer=name)
        return True
    except ConfigError:
        return False


@pytest.mark.parametrize("opt,lr", [("sgd", 0.5), ("rmsprop", 2e-3), ("muon", 3e-3)])
def test_optimizers_reduce_loss(tmp_path, tiny_run, opt, lr):
    if not _optimizer_supported(opt):
        pytest.skip(f"optimizer {opt!r} is not available in this version")
    out, _ = tiny_run
    cfg = tiny_run_config(tmp_path / opt, "unused", data_dir=str(out / "data"), optimizer=opt, lr=lr,
                          min_lr=lr / 10, max_steps=60, eval_interval=60, final_eval_windows=0)
    pretrain(cfg, **QUIET)
    steps = [r for r in read_jsonl(tmp_path / opt / "metrics.jsonl") if "train_loss" in r]
    assert len(steps) == 60
    late = np.mean([r["train_loss"] for r in steps[-10:]])
    assert late < steps[0]["train_loss"] - 1.0, (opt, steps[0]["train_loss"], late)


@pytest.mark.parametrize("epochs,accum", [(0.05, 1), (0.1, 2)])
def test_epochs_compute_step_count(tmp_path, tiny_run, epochs, accum):
    out, _ = tiny_run
    cfg = tiny_run_config(tmp_path / "ep", "unused", data_dir=str(out / "data"), max_steps=None, epochs=epochs,
                          grad_accum=accum, eval_interval=1000, final_eval_windows=0)
    summary = pretrain(cfg, **QUIET)
    train_tokens = TokenDataset(out / "data").num_tokens("train")
    want = math.ceil(epochs * train_tokens / (8 * 32 * accum))
    assert want > 1
    assert summary["steps"] == want
    assert read_jsonl(tmp_path / "ep" / "metrics.jsonl")[-1]["step"] == want


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_run):
    out, _ = tiny_run
    cfg = tiny_run_config(tmp_path / "r", "unused", data_dir=str(out / "data"), resume=True)
    with pytest.raises(LMStackError, match="no checkpoint"):
        pretrain(cfg, **QUIET)


def test_train_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        TrainConfig.from_dict({"lrr": 1})
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="max_steps or epochs"):
        TrainConfig(max_steps=None)
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(None, ["lr"])
    r = tmp_path / "r.yaml"
    r.write_text("lr: 0.01\nmodel: {preset: tiny-char, n_layer: 3}\n")
    cfg = load_recipe(r, ["model.n_embd=64", "lr=2e-3", "decay_steps=", "sample_prompt='hello: world'"])
    assert cfg.lr == 2e-3 and cfg.decay_steps is None and cfg.sample_prompt == "hello: world"
    assert cfg.model == {"preset": "tiny-char", "n_layer": 3, "n_embd": 64}
    r.write_text("lr: 3e-4\nweight_decay: 1E-2\nbeta2: .95\n")  # exponent floats without a dot are numbers
    cfg = load_recipe(r, ["min_lr=1e-5", "eps=-1.5e+3", "sample_prompt=3e"])
    assert (cfg.lr, cfg.weight_decay, cfg.beta2, cfg.min_lr, cfg.eps) == (3e-4, 1e-2, 0.95, 1e-5, -1.5e3)
    assert cfg.sample_prompt == "3e"
    r.write_text("lr: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(r)


def test_pretrain_function_not_shadowed_by_submodule():
    """`lmstack.train.pretrain` is a function even after its submodule of the same name was imported."""
    code = ("import lmstack.train.pretrain\n"
            "from lmstack.train import pretrain\n"
            "assert callable(pretrain), pretrain\n"
            "from lmstack.train.pretrain import lm_loss\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ---- exact resume after SIGKILL ------------------------------------------------------------------------------
MAX_STEPS = 400


def _recipe(tmp_path: Path, corpus_file: Path) -> Path:
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump({
        "corpus": str(corpus_file), "tokenizer": "char", "seed": 4321, "threads": 1,
        "model": {"preset": "tiny-char", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
                  "dropout": 0.2},
        "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20, "max_steps": MAX_STEPS,
        "eval_interval": 100, "eval_iters": 2, "ckpt_interval": 20, "log_interval": 1,
        "final_eval_windows": 4, "sample_tokens": 0}))
    return r


def _train_cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmstack.cli", "train", str(recipe), "--out-dir", str(out), "--no-progress", *extra]


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for ln in reversed(lines):
        try:
            return json.loads(ln).get("step", 0)
        except ValueError:
            continue
    return 0


def test_exact_resume_after_sigkill(tmp_path, corpus_file):
    recipe = _recipe(tmp_path, corpus_file)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    # the uninterrupted reference run goes on in parallel
    ref = subprocess.Popen(_train_cmd(recipe, ref_out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_train_cmd(recipe, run_out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    metrics = run_out / "metrics.jsonl"
    try:
        # step 50 logged means the step-40 checkpoint is complete (each step logs before it saves)
        sigkill_when(victim, lambda: _last_step(metrics) >= 50)
        killed_at = _last_step(metrics)
        assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        assert 50 <= killed_at < MAX_STEPS
        assert (run_out / "last").exists() or list(run_out.glob(".last.old-*"))

        resumed = subprocess.run(_train_cmd(recipe, run_out, "--resume"), cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert ref.wait(timeout=300) == 0, ref.stderr.read()[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()

    def losses(out):
        return [(r["step"], r["train_loss"]) for r in read_jsonl(out / "metrics.jsonl") if "train_loss" in r]
    got, want = losses(run_out), losses(ref_out)
    assert [s for s, _ in want] == list(range(1, MAX_STEPS + 1))
    assert got == want  # exact float equality, step by step
    ev = lambda out: [(r["step"], r["val_loss"]) for r in read_jsonl(out / "metrics.jsonl") if "val_loss" in r]
    assert ev(run_out) == ev(ref_out)
    fin = lambda out: [r["final_val_loss"] for r in read_jsonl(out / "metrics.jsonl") if "final_val_loss" in r]
    assert fin(run_out) == fin(ref_out) and len(fin(ref_out)) == 1
