"""`lmstack compare`: the same data and budget for several architectures (lmstack/scaling/compare.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmstack.config import ModelConfig
from lmstack.errors import ConfigError, LMStackError
from lmstack.scaling.compare import ARCHS, compare, compare_table, matched_model, parse_archs

from conftest import read_jsonl, run_cli

MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "pos_emb": "rope", "norm": "rmsnorm",
         "mlp": "swiglu", "bias": False, "dropout": 0.0}


def recipe(tmp_path: Path, corpus: Path, **over) -> Path:
    d = dict(corpus=str(corpus), tokenizer="char", model=dict(MODEL), batch_size=4, lr=3e-3, min_lr=3e-4,
             warmup_steps=100, eval_iters=2, final_eval_windows=8, log_interval=1, threads=1, sample_tokens=0)
    d.update(over)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("width,layers", [(32, 2), (128, 4), (384, 6)])
def test_matched_sizes_within_ten_percent(width, layers):
    base = ModelConfig(vocab_size=96, block_size=64, n_layer=layers, n_head=4, n_embd=width, mlp="swiglu", bias=False)
    target = base.num_params(include_embeddings=False)
    for arch in ("lstm", "gru", "gcnn"):
        m = matched_model(base, arch)
        assert m.arch == arch and m.vocab_size == base.vocab_size and m.block_size == base.block_size
        assert abs(m.num_params(include_embeddings=False) / target - 1) < 0.10, arch
        assert m.num_params(include_embeddings=False) == _built_non_embedding(m)  # the accounting is the model's
    assert matched_model(base, "transformer") == base


def _built_non_embedding(cfg: ModelConfig) -> int:
    from lmstack.models.utils import make_model
    model = make_model(cfg)
    return sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.n_embd


def test_parse_archs_errors():
    assert parse_archs("lstm, gcnn") == ["lstm", "gcnn"]
    with pytest.raises(ConfigError, match="lstm"):
        parse_archs("transformer,rnn")
    with pytest.raises(ConfigError, match="twice"):
        parse_archs("gru,gru")


def test_flops_budget_spends_the_budget_for_every_arch(tmp_path, corpus_file, capsys):
    out = tmp_path / "cmp"
    budget = 1.2e9
    res = compare(recipe(tmp_path, corpus_file), list(ARCHS), budget_flops=budget, out=out, progress=False,
                  log=lambda *a: None)
    runs = {r["arch"]: r for r in res["runs"]}
    assert list(runs) == list(ARCHS)
    tps = res["settings"]["tokens_per_step"]
    assert tps == 4 * 32
    for arch, r in runs.items():
        step_flops = tps * r["flops_per_token"]
        assert budget - step_flops < r["flops"] <= budget, arch  # as many whole steps as the budget buys
        m = read_jsonl(Path(r["run_dir"]) / "metrics.jsonl")
        assert max(x["step"] for x in m) == r["steps"]
        cfg = json.loads((Path(r["run_dir"]) / "last" / "config.json").read_text())
        assert cfg["arch"] == arch
        c = r["curve"]
        assert len(c) >= 10 and c[-1]["step"] == r["steps"]
        assert all(a["train_s"] < b["train_s"] and a["flops"] < b["flops"] for a, b in zip(c, c[1:]))
        assert c[-1]["val_loss"] < c[0]["val_loss"]  # every architecture learns the corpus
        assert r["final_val_bpb"] > 0 and r["tokens_per_sec"] == pytest.approx(r["tokens"] / r["train_s"])
    # the Transformer's FLOPs per token include the attention scores, so it buys fewer steps than an equal-size RNN
    assert runs["transformer"]["flops_per_token"] > 6 * runs["transformer"]["non_embedding_params"]
    assert Path(res["plot"]).stat().st_size > 10_000
    assert "| gcnn |" in compare_table(res)
    saved = json.loads((out / "compare.json").read_text())
    assert [r["arch"] for r in saved["runs"]] == list(ARCHS)
    # lmstack info on an LSTM checkpoint: its parameters and state, no Transformer memory tables
    from lmstack.cli import main
    assert main(["info", "--model", str(Path(runs["lstm"]["run_dir"]) / "last"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "lstm" and info["params"] == runs["lstm"]["params"]
    assert info["float32_bytes"]["adamw_moments"] == 8 * runs["lstm"]["params"]
    # the same settings again: finished runs are reused, nothing retrains
    stamp = {a: (Path(r["run_dir"]) / "metrics.jsonl").stat().st_mtime_ns for a, r in runs.items()}
    logs: list[str] = []
    again = compare(recipe(tmp_path, corpus_file), ["gru", "lstm"], budget_flops=budget, out=out, progress=False,
                    log=logs.append)
    assert [r["arch"] for r in again["runs"]] == ["gru", "lstm"]
    assert [ln for ln in logs if "done before" in ln] == [f"gru: done before ({out / 'runs' / 'gru'})",
                                                          f"lstm: done before ({out / 'runs' / 'lstm'})"]
    assert {a: (Path(r["run_dir"]) / "metrics.jsonl").stat().st_mtime_ns for a, r in runs.items()} == stamp


def test_seconds_budget_uses_the_timing_probe(tmp_path, corpus_file):
    res = compare(recipe(tmp_path, corpus_file), ["gru"], budget_seconds=2.0, out=tmp_path / "cmp",
                  progress=False, log=lambda *a: None)
    r = res["runs"][0]
    assert r["probe_s_per_step"] > 0
    assert r["steps"] == int(2.0 / r["probe_s_per_step"])
    assert (tmp_path / "cmp" / "probe" / "gru" / "metrics.jsonl").exists()


def test_bad_budgets_and_recipes(tmp_path, corpus_file):
    rec = recipe(tmp_path, corpus_file)
    with pytest.raises(ConfigError, match="one budget"):
        compare(rec, ["lstm"], out=tmp_path / "a", log=lambda *a: None)
    with pytest.raises(ConfigError, match="one budget"):
        compare(rec, ["lstm"], budget_seconds=1, budget_flops=1e9, out=tmp_path / "a", log=lambda *a: None)
    with pytest.raises(LMStackError, match="no optimizer step"):
        compare(rec, ["lstm"], budget_flops=10.0, out=tmp_path / "b", progress=False, log=lambda *a: None)
    s2s = tmp_path / "s2s.yaml"
    s2s.write_text(yaml.safe_dump({"objective": "seq2seq", "src_path": "x", "tgt_path": "y"}))
    with pytest.raises(ConfigError, match="objective: clm"):
        compare(s2s, ["lstm"], budget_flops=1e9, out=tmp_path / "c", log=lambda *a: None)


def test_cli_compare(tmp_path, corpus_file):
    rec = recipe(tmp_path, corpus_file)
    p = run_cli("compare", str(rec), "--archs", "transformer,gcnn", "--budget-flops", "4e8", "--out",
                str(tmp_path / "cli"), "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "| transformer |" in p.stdout and "| gcnn |" in p.stdout and "compare.png" in p.stdout
    p = run_cli("compare", str(rec), "--archs", "mamba", "--budget-flops", "4e8")
    assert p.returncode == 2 and "--archs" in p.stderr
    p = run_cli("compare", str(rec), "--archs", "lstm")
    assert p.returncode == 2 and "budget" in p.stderr
