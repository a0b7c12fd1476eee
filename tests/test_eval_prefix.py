"""Prefix reuse in evaluation: few-shot questions share their description + solved examples, whose keys/values are
computed once (generate/prefix_cache.py's PrefixCache) and copied into every later question's rows. With and without
the cache the log-likelihoods agree to 1e-5 (float32) and the accuracies are equal, at batch size 1 and above; the
token counters show the shared prefix was not recomputed; `lmstack eval --no-prefix-cache` turns it off."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

import lmstack
from lmstack.checkpoint import save_checkpoint
from lmstack.cli import main as cli_main
from lmstack.config import ModelConfig
from lmstack.eval import LocalBackend, evaluate, resolve_tasks
from lmstack.eval.backend import common_prefix_len
from lmstack.models.transformer import Transformer
from lmstack.tokenizer import train_bpe

from conftest import llama_cfg_dict, make_text

WORDS = ("planet star orbit comet energy water river mountain city capital ocean desert forest moon sun light heat "
         "gravity motion force rock cell plant animal").split()
SUBJECTS = ("astronomy", "geography", "physics")


def _question(r: random.Random) -> list[str]:
    q = " ".join(r.choice(WORDS) for _ in range(r.randint(4, 14))).capitalize() + "?"
    return [q] + [" ".join(r.choice(WORDS) for _ in range(r.randint(1, 3))) for _ in range(4)] + [r.choice("ABCD")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """MMLU CSVs: 3 subjects, 4 dev questions (the shots) and 7 test questions each, of varied lengths."""
    root = tmp_path_factory.mktemp("mmlu")
    r = random.Random(0)
    for split, n in (("dev", 4), ("test", 7)):
        (root / "mmlu" / split).mkdir(parents=True)
        for s in SUBJECTS:
            with (root / "mmlu" / split / f"{s}_{split}.csv").open("w", newline="") as f:
                csv.writer(f).writerows(_question(r) for _ in range(n))
    return root


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A random float32 Llama-style model over a small BPE tokenizer (many tokens per prompt)."""
    tok = train_bpe([make_text(200), " ".join(WORDS) * 5], vocab_size=300, special_tokens=["<|endoftext|>"])
    cfg = ModelConfig(**llama_cfg_dict(vocab_size=tok.vocab_size, block_size=1024, n_embd=48, n_head=4,
                                       n_kv_head=2))
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # spread the logits so choices differ clearly
        model.lm_head.weight.mul_(5)
    d = tmp_path_factory.mktemp("prefixmodel") / "ckpt"
    save_checkpoint(d, model, tok)
    return lmstack.load(d, dtype=torch.float32)


def _lls(res: dict) -> list[float]:
    return [ll for name in sorted(res["samples"]) for s in res["samples"][name] for ll in s["loglikelihoods"]]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cache_on_off_equal_and_prefix_reused(lm, data_dir, batch_size):
    spec, shots = f"mmlu={data_dir / 'mmlu'}", 3
    on = evaluate(lm, spec, shots=shots, batch_size=batch_size, log_samples=True)
    off = evaluate(lm, spec, shots=shots, batch_size=batch_size, log_samples=True, prefix_cache=False)
    assert _lls(on) == pytest.approx(_lls(off), abs=1e-5)
    for name, r in off["results"].items():
        assert on["results"][name]["metrics"] == r["metrics"], name
    assert on["groups"]["mmlu"]["acc"]["value"] == off["groups"]["mmlu"]["acc"]["value"]
    s_on, s_off = on["scoring"], off["scoring"]
    assert s_on["context_tokens"] == s_off["context_tokens"] == s_off["computed_tokens"]
    assert s_on["computed_tokens"] + s_on["reused_tokens"] == s_on["context_tokens"]
    # each subject's shared prefix (description + 3 shots, whole 16-token blocks) runs at most twice: for the
    # first question (batch 1: before any other question is seen) and once on its own; every later question
    # copies it
    b = LocalBackend(lm, prefix_cache=False)
    saved = 0
    for task in resolve_tasks(spec):
        ctxs = [b.encode(task.context(d, shots)) for d in task.docs]
        P = common_prefix_len(ctxs) // 16 * 16
        assert P >= 32  # the shots are long enough for the test to mean something
        saved += (len(ctxs) - 2) * P
    assert s_on["computed_tokens"] <= s_on["context_tokens"] - saved
    assert s_on["prefix_cache"]["hit_tokens"] > 0 and s_off["prefix_cache"] == {"off": "turned off"}


def test_multi_token_choices_with_shared_prefix_match_direct_forward(lm):
    """Continuations of several tokens (the choice pass over the expanded cache), contexts of different lengths
    after a shared prefix (pads between the prefix and each row's tokens): equal to one plain forward pass."""
    r = random.Random(1)
    prefix = "Solved examples: " + " ".join(r.choice(WORDS) for _ in range(60)) + "\n\n"
    reqs = [(prefix + " ".join(r.choice(WORDS) for _ in range(r.randint(2, 12))) + "\nAnswer:",
             [" " + " ".join(r.choice(WORDS) for _ in range(r.randint(1, 4))) for _ in range(3)]) for _ in range(5)]
    on, off = LocalBackend(lm), LocalBackend(lm, prefix_cache=False)
    got_batched = on.loglikelihood_batch(reqs[:3]) + on.loglikelihood_batch(reqs[3:])
    got_single = [LocalBackend(lm).loglikelihood_choices(c, x) for c, x in reqs]
    want = off.loglikelihood_batch(reqs)
    model = lm.model
    for (ctx, conts), a, b, w in zip(reqs, got_batched, got_single, want):
        for cont, x, y, z in zip(conts, a, b, w):
            c_ids, k_ids = on.encode_pair(ctx, cont)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([c_ids + k_ids[:-1]]))[0, len(c_ids) - 1:], -1)
            direct = float(logp.gather(-1, torch.tensor(k_ids)[:, None]).double().sum())
            # sums of up to ~15 token log-probs near -100: float32 rounding is ~1e-7 relative
            assert x[0] == pytest.approx(direct, rel=1e-6, abs=1e-5)
            assert y[0] == pytest.approx(direct, rel=1e-6, abs=1e-5)
            assert x[0] == pytest.approx(z[0], rel=1e-6, abs=1e-5) and x[1] == z[1]
    st = on.prefix_stats()
    assert st["reused_tokens"] > 0 and st["computed_tokens"] < st["context_tokens"]


def test_no_prefix_cache_flag(lm, data_dir, tmp_path, capsys):
    ckpt = str(lm.path)
    outs = {}
    for flag in ([], ["--no-prefix-cache"]):
        out = tmp_path / f"res{len(flag)}.json"
        rc = cli_main(["eval", "--model", ckpt, "--tasks", f"mmlu_physics={data_dir / 'mmlu'}", "--shots", "2",
                       "--batch-size", "2", "--no-progress", "--log-samples", "--out", str(out), *flag])
        assert rc in (0, None)
        outs[bool(flag)] = json.loads(out.read_text())
    on, off = outs[False], outs[True]
    assert on["config"]["prefix_cache"] is True and off["config"]["prefix_cache"] is False
    assert off["scoring"]["computed_tokens"] == off["scoring"]["context_tokens"]
    assert on["scoring"]["computed_tokens"] < on["scoring"]["context_tokens"]
    assert _lls(on) == pytest.approx(_lls(off), abs=1e-5)
    assert "mmlu_physics" in capsys.readouterr().out
