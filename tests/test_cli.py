"""The `lmstack` command line, run as a real subprocess: user errors, info, generate, plot, tokenizer/prepare/train."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import read_jsonl, run_cli
from lmstack.data.shards import TokenDataset
from lmstack.tokenizer import Tokenizer


def assert_user_error(r, *fragments: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("lmstack: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, corpus_file):
    d = tmp_path_factory.mktemp("cli")
    r = d / "tiny.yaml"
    r.write_text(yaml.safe_dump({
        "out_dir": str(d / "run"), "corpus": str(corpus_file), "tokenizer": "char", "threads": 1,
        "model": {"preset": "tiny-char", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
        "batch_size": 4, "max_steps": 5, "warmup_steps": 1, "eval_interval": 5, "eval_iters": 1,
        "final_eval_windows": 2, "sample_tokens": 10}))
    return r


def test_train_missing_recipe(tmp_path):
    r = run_cli("train", str(tmp_path / "nope.yaml"), "--no-progress")
    assert_user_error(r, "nope.yaml", "does not exist")


def test_train_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nmodel: {preset: tiny-char\nbatch_size: [1, 2\n")
    r = run_cli("train", str(bad), "--no-progress")
    assert_user_error(r, "not valid YAML", "line")


def test_train_unknown_key(recipe):
    r = run_cli("train", str(recipe), "--no-progress", "--set", "lrr=1")
    assert_user_error(r, "unknown config key 'lrr'", "did you mean 'lr'")


def test_train_bad_set_syntax(recipe):
    r = run_cli("train", str(recipe), "--no-progress", "--set", "lr")
    assert_user_error(r, "--set expects key=value")


def test_train_heads_do_not_divide_width(recipe, tmp_path):
    r = run_cli("train", str(recipe), "--no-progress", "--out-dir", str(tmp_path / "o"), "--set", "model.n_head=5")
    assert_user_error(r, "n_embd=32 is not divisible by model.n_head=5")


def test_user_errors_of_other_verbs(tmp_path):
    assert_user_error(run_cli("generate", "--model", str(tmp_path / "missing")), "no model at")
    assert_user_error(run_cli("plot", str(tmp_path)), "no metrics.jsonl")


def test_info_gpt2_small():
    r = run_cli("info", "--preset", "gpt2-small")
    assert r.returncode == 0, r.stderr
    assert "124,439,808" in r.stdout
    assert "12 layers, 12 heads (12 kv), 768 wide" in r.stdout


def test_info_checkpoint(tiny_run):
    out, summary = tiny_run
    r = run_cli("info", "--model", str(out / "last"), "--seq-len", "16")
    assert r.returncode == 0, r.stderr
    assert f"{summary['params']:,}" in r.stdout and "T=16" in r.stdout


@pytest.mark.parametrize("extra", [["--temperature", "0"], ["--temperature", "0.9", "--top-k", "20", "--seed", "5"]],
                         ids=["greedy", "seeded"])
def test_generate_cache_and_no_cache_agree(tiny_run, extra):
    out, _ = tiny_run
    args = ["generate", "--model", str(out / "last"), "--prompt", "The ", "--max-new-tokens", "24", *extra]
    a, b = run_cli(*args), run_cli(*args, "--no-cache")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    assert a.stdout == b.stdout
    text = a.stdout.rstrip("\n")
    assert text.startswith("The ") and len(text) == 4 + 24  # char model: one character per new token


def test_generate_context_error_and_truncate(tiny_run):
    out, _ = tiny_run
    base = ["generate", "--model", str(out / "last"), "--prompt", "x" * 40, "--max-new-tokens", "5",
            "--temperature", "0"]
    assert_user_error(run_cli(*base), "context window of 32 tokens")
    r = run_cli(*base, "--truncate", "left")
    assert r.returncode == 0 and len(r.stdout.rstrip("\n")) == 45


def test_plot(tiny_run, tmp_path):
    out, _ = tiny_run
    png = tmp_path / "curve.png"
    r = run_cli("plot", str(out), "--out", str(png))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokenizer_train_prepare_train_end_to_end(tmp_path, corpus_file, corpus_text):
    tok_dir, data_dir, run_dir = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    r = run_cli("tokenizer", "train", "--corpus", str(corpus_file), "--type", "bpe", "--vocab-size", "320",
                "--out", str(tok_dir))
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.load(tok_dir)
    assert 257 < tok.vocab_size <= 320 and tok.decode(tok.encode(corpus_text)) == corpus_text

    r = run_cli("prepare", "--corpus", str(corpus_file), "--tokenizer", str(tok_dir), "--val-fraction", "0.2",
                "--out", str(data_dir))
    assert r.returncode == 0, r.stderr
    assert "uint16" in r.stdout
    ds = TokenDataset(data_dir)
    ids = tok.encode(corpus_text)
    assert ds.read(0, ds.total).tolist() == ids
    assert ds.split == int(len(ids) * 0.8)
    assert json.loads((data_dir / "meta.json").read_text())["vocab_size"] == tok.vocab_size

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "data_dir": str(data_dir), "threads": 1, "model": {"preset": "gpt2-tiny", "n_layer": 1, "n_head": 2,
                                                           "n_embd": 32, "block_size": 32},
        "batch_size": 4, "max_steps": 6, "warmup_steps": 2, "eval_interval": 3, "eval_iters": 1,
        "final_eval_windows": 2, "sample_tokens": 8, "sample_prompt": "The"}))
    r = run_cli("train", str(recipe), "--out-dir", str(run_dir), "--no-progress", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{\n"):r.stdout.index("\n}") + 2])
    assert summary["steps"] == 6 and "final_val_loss" in summary
    assert "---- sample ----" in r.stdout
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert [x["step"] for x in recs if "val_loss" in x] == [3, 6]
    cfg = json.loads((run_dir / "last" / "config.json").read_text())
    assert cfg["vocab_size"] == 64 * -(-tok.vocab_size // 64)  # padded to a multiple of 64
    assert (run_dir / "last" / "tokenizer.json").exists() and (run_dir / "loss.png").exists()
