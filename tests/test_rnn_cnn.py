"""The earlier language models (model.arch: lstm | gru | gcnn): their state caches decode exactly as re-running the
whole sequence, the CNN is causal with the documented receptive field, the LSTM/GRU follow the textbook equations,
and each trains with pretrain(), resumes exactly, loads through lmstack.load and generates through the engine
(stream, beam search, continuous batching; speculative decoding is a clear error)."""
from __future__ import annotations

import math

import pytest
import torch

import lmstack
from conftest import read_jsonl, run_cli, tiny_run_config
from lmstack.config import ModelConfig, describe, preset
from lmstack.errors import ConfigError, LMStackError
from lmstack.generate import (BackgroundBatcher, SamplingParams, beam_search, generate, generate_batch,
                              speculative_generate, stream_steps)
from lmstack.models import GatedCNN, RNNLM, StateCache, make_cache, make_model

ARCHS = ["lstm", "gru", "gcnn"]
GREEDY = dict(temperature=0.0, stop_at_eos=False)


def small_cfg(arch: str, **over) -> ModelConfig:
    d = dict(arch=arch, vocab_size=48, block_size=96, n_layer=3, n_embd=32, init_std=0.5)  # varied greedy output
    if arch == "gcnn":
        d.update(conv_kernel=3, conv_dilations=[1, 2, 4])  # receptive field 1 + 2 * 7 = 15
    d.update(over)
    return ModelConfig(**d)


def small_model(arch: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    return make_model(small_cfg(arch, **over)).eval()


VARIANTS = [("lstm", {}), ("lstm", {"rnn_hidden": 40}), ("gru", {}), ("gru", {"rnn_hidden": 24, "n_layer": 2}),
            ("gcnn", {}), ("gcnn", {"norm": "rmsnorm", "bias": False, "conv_kernel": 2}),
            ("lstm", {"tie_embeddings": False})]


# ---- configs -------------------------------------------------------------------------------------------
def test_config_arch_validation_and_accounting():
    with pytest.raises(ConfigError, match="arch"):
        ModelConfig(arch="mamba")
    with pytest.raises(ConfigError, match="conv_dilations"):
        ModelConfig(arch="gcnn", conv_dilations=[0])
    with pytest.raises(ConfigError, match="rnn_hidden"):
        ModelConfig(arch="lstm", rnn_hidden=-1)
    ModelConfig(arch="lstm", n_embd=100, n_head=12)  # attention fields are not checked for the zoo
    cfg = small_cfg("gcnn", n_layer=6, conv_dilations=[1, 2, 4, 8])
    assert cfg.dilations() == [1, 2, 4, 8, 1, 2] and cfg.receptive_field == 1 + 2 * 18
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    for arch, over in VARIANTS:
        cfg = small_cfg(arch, **over)
        assert make_model(cfg).num_params() == cfg.num_params(), (arch, over)
        assert cfg.flops_per_token(10) == cfg.flops_per_token(1000)  # no attention term
        assert dict(describe(cfg))["architecture"].lower().startswith({"gcnn": "gated", "lstm": "lstm",
                                                                      "gru": "gru"}[arch])
    for name in ("lstm-char", "gru-char", "gcnn-char"):
        m = make_model(preset(name))
        assert isinstance(m, GatedCNN if name.startswith("gcnn") else RNNLM)
        assert m.num_params() == preset(name).num_params()


# ---- state caches == full recompute ----------------------------------------------------------------------
@pytest.mark.parametrize("arch,over", VARIANTS)
def test_stateful_decoding_equals_full_sequence(arch, over):
    """Prefill + one token at a time through the state cache gives, at every step, the logits of running the
    whole sequence (the prompt is longer than the CNN's receptive field of 15), and greedy generation with the
    cache equals generation that recomputes everything each step."""
    model = small_model(arch, **over)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 48, (40,), generator=g).tolist()
    for params in (SamplingParams(max_new_tokens=30, **GREEDY),
                   SamplingParams(max_new_tokens=30, temperature=2.0, seed=0, stop_at_eos=False)):
        cached = list(stream_steps(model, prompt, params))
        full = list(stream_steps(model, prompt, params, use_cache=False))
        assert [s.token for s in cached] == [s.token for s in full]
        assert [s.logprob for s in cached] == pytest.approx([s.logprob for s in full], abs=1e-5)
    assert len(set(s.token for s in cached)) > 3  # the sampled continuation varies: a real test of the state

    seq = prompt + [s.token for s in cached]
    with torch.no_grad():
        cache = make_cache(model, 1, len(seq))
        assert isinstance(cache, StateCache)
        step_logits = [model(torch.tensor([prompt]), cache=cache, pos=0)[:, -1]]
        for t in range(len(prompt), len(seq) - 1):
            step_logits.append(model(torch.tensor([[seq[t]]]), cache=cache, pos=t)[:, -1])
        for i, lg in enumerate(step_logits):
            ref = model(torch.tensor([seq[:len(prompt) + i]]))[:, -1]
            torch.testing.assert_close(lg, ref, atol=1e-5, rtol=0)
        # chunked prefill (several tokens at a time after a cached prefix) is the same state
        c2 = make_cache(model, 1, len(seq))
        model(torch.tensor([seq[:7]]), cache=c2, pos=0)
        model(torch.tensor([seq[7:25]]), cache=c2, pos=7)
        torch.testing.assert_close(model(torch.tensor([seq[25:40]]), cache=c2, pos=25)[:, -1], step_logits[0],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_cache_cannot_rewind_and_rejects_kv_cache(arch):
    model = small_model(arch)
    cache = model.new_cache(1, 20)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache, pos=0)
        with pytest.raises(LMStackError, match="cannot rewind"):
            model(torch.tensor([[4]]), cache=cache, pos=1)
        with pytest.raises(LMStackError, match="overflow"):
            model(torch.tensor([[4] * 18]), cache=cache, pos=3)
        cache.reset()
        assert cache.length == 0 and all(float(t.abs().sum()) == 0 for t in cache.tensors)
        from lmstack.models import KVCache
        with pytest.raises(LMStackError, match="own"):
            model(torch.tensor([[1]]), cache=KVCache(1, 1, 1, 4, 4), pos=0)
        with pytest.raises(LMStackError, match="right-padded"):
            model(torch.tensor([[1, 2, 3]]), padding_mask=torch.tensor([[False, True, True]]))
        x = torch.tensor([[1, 2, 3, 0]])  # right padding is fine: a causal row never sees what follows it
        torch.testing.assert_close(model(x, padding_mask=torch.tensor([[True, True, True, False]])), model(x))


# ---- causality and the receptive field --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_changing_a_future_token_never_changes_earlier_logits(arch):
    model = small_model(arch)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 48, (1, 60), generator=g)
    t = 30
    y = x.clone()
    y[0, t] = (x[0, t] + 1) % 48
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert (a[0, t] - b[0, t]).abs().max() > 1e-4  # the changed token does count from its own position on
    if arch == "gcnn":  # ... for exactly receptive_field positions, and never after
        rf = model.config.receptive_field
        assert rf == model.receptive_field == 15
        diff = (a - b).abs().amax(-1)[0]
        assert bool((diff[t:t + rf] > 1e-6).all())
        assert float(diff[t + rf:].max()) < 1e-6


# ---- torch reference parity: the textbook LSTM / GRU equations ------------------------------------------------
def _reference_rnn(model: RNNLM, x: torch.Tensor) -> torch.Tensor:
    """The last layer's outputs computed from the weights with the LSTM / GRU equations, one step at a time."""
    cfg, rnn = model.config, model.rnn
    H = cfg.hidden_size
    inp = model.tok_emb(x)[0]
    for layer in range(cfg.n_layer):
        Wi, Wh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
        bi, bh = getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")
        h, c, outs = torch.zeros(H), torch.zeros(H), []
        for xt in inp:
            gi, gh = Wi @ xt + bi, Wh @ h + bh
            if cfg.arch == "lstm":  # gates i, f, g, o
                i, f, gg, o = (gi + gh).split(H)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:  # gates r, z, n
                ir, iz, inn = gi.split(H)
                hr, hz, hn = gh.split(H)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                n = torch.tanh(inn + r * hn)
                h = (1 - z) * n + z * h
            outs.append(h)
        inp = torch.stack(outs)
    return inp


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_rnn_layers_follow_the_reference_equations(arch):
    model = small_model(arch, rnn_hidden=24)
    x = torch.randint(0, 48, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = _reference_rnn(model, x)
        got = model(x, return_hidden=True)[0]
        torch.testing.assert_close(got, model.proj(ref), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x)[0], model.lm_head(model.proj(ref)), atol=1e-5, rtol=1e-5)


# ---- the engine: beam search, continuous batching, speculative ---------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_scores_match_a_full_recompute(arch):
    """Beam search reorders the state rows every step; each returned hypothesis' score must be its summed
    log-probability under a from-scratch forward pass (a wrong reorder gives other scores)."""
    model = small_model(arch)
    prompt = torch.randint(0, 48, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    hyps = beam_search(model, prompt, num_beams=4, max_new_tokens=8, num_return_sequences=4, length_penalty=1.0)
    assert len({tuple(h.tokens) for h in hyps}) == 4
    with torch.no_grad():
        for h in hyps:
            logp = torch.log_softmax(model(torch.tensor([prompt + h.tokens]))[0].float(), -1)
            lp = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(h.tokens))
            assert h.score == pytest.approx(lp / len(h.tokens), abs=1e-4)
    one = beam_search(model, prompt, num_beams=1, max_new_tokens=8)[0].tokens
    assert one == generate(model, prompt, SamplingParams(max_new_tokens=8, **GREEDY))


@pytest.mark.parametrize("arch", ARCHS)
def test_continuous_batching_equals_each_prompt_alone(arch):
    """Prompts of different lengths, more than max_batch rows (joins and swap-removes happen), different
    max_new_tokens: every row gives the tokens and logprobs it gives alone."""
    model = small_model(arch)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 48, (n,), generator=g).tolist() for n in (5, 23, 1, 40, 12)]
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    out = generate_batch(model, prompts, params, max_batch=2)
    for p, steps in zip(prompts, out):
        alone = list(stream_steps(model, p, params))
        assert [s.token for s in steps] == [s.token for s in alone]
        assert [s.logprob for s in steps] == pytest.approx([s.logprob for s in alone], abs=1e-5)
    # sampled rows with eos stops and the server's background thread
    sp = SamplingParams(max_new_tokens=10, temperature=0.8, seed=3)
    bg = BackgroundBatcher(model, max_batch=3)
    try:
        streams = [bg.submit(p, sp, eos_id=7) for p in prompts]
        got = [[s.token for s in st] for st in streams]
    finally:
        bg.close()
    for p, toks in zip(prompts, got):
        ref = generate(model, p, SamplingParams(max_new_tokens=10, temperature=0.8, seed=3), eos_id=7)
        assert toks == ref


def test_speculative_decoding_is_a_clear_error():
    rnn, tf = small_model("lstm"), make_model(ModelConfig(vocab_size=48, block_size=96, n_layer=1, n_head=2,
                                                          n_embd=16)).eval()
    for target, draft in ((rnn, tf), (tf, rnn)):
        with pytest.raises(LMStackError, match="rewind"):
            speculative_generate(target, draft, [1, 2, 3], SamplingParams(max_new_tokens=4))


# ---- training: pretrain(), exact resume, lmstack.load ---------------------------------------------------------
def _run(out, corpus, arch, **over):
    model = {"arch": arch, "n_layer": 2, "n_embd": 32, "block_size": 32, "dropout": 0.1}
    if arch == "gcnn":
        model.update(n_layer=3, conv_dilations=[1, 2, 4])
    d = dict(model=model, max_steps=24, eval_interval=8, lr=1e-2, min_lr=1e-3, warmup_steps=2)
    d.update(over)
    return tiny_run_config(out, corpus, **d)


@pytest.mark.parametrize("arch", ARCHS)
def test_pretrain_resume_load_and_generate(arch, tmp_path, corpus_file):
    from safetensors.torch import load_file
    from lmstack.data.shards import TokenDataset
    from lmstack.train import pretrain
    from lmstack.train.pretrain import make_evaluator
    quiet = dict(log=lambda *a: None)
    straight = tmp_path / "straight"
    summary = pretrain(_run(straight, corpus_file, arch, sample_tokens=8), **quiet)
    rows = [r for r in read_jsonl(straight / "metrics.jsonl") if "train_loss" in r]
    assert rows[-1]["step"] == 24
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5, rows  # it learns
    assert summary["final_val_loss"] < math.log(64)
    assert isinstance(summary["sample"], str) and len(summary["sample"]) > 0
    cfg_json = (straight / "last" / "config.json").read_text()
    assert f'"arch": "{arch}"' in cfg_json

    # half the steps (same schedule), then --resume to the end: the same losses and the same weights
    half = tmp_path / "half"
    data = dict(data_dir=str(straight / "data"))
    pretrain(_run(half, corpus_file, arch, max_steps=12, decay_steps=24, **data), **quiet)
    pretrain(_run(half, corpus_file, arch, decay_steps=24, resume=True, **data), **quiet)
    resumed = [r for r in read_jsonl(half / "metrics.jsonl") if "train_loss" in r]
    by_step = {r["step"]: r["train_loss"] for r in resumed}
    assert [by_step[r["step"]] for r in rows] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)
    a, b = load_file(str(straight / "last" / "model.safetensors")), load_file(str(half / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and "lm_head.weight" not in a  # tied head stored once
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)

    # lmstack.load: the trained weights (the in-run final eval is reproduced exactly) and the engine's API
    lm = lmstack.load(str(straight / "last"))
    assert lm.model.config.arch == arch
    ds = TokenDataset(straight / "data")
    with torch.no_grad():
        ev = make_evaluator(ds, 32, 8, 0, ds.tokenizer.byte_lengths())(lm.model, windows=4)
    assert ev["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    text = lm.generate("The ", max_new_tokens=20, temperature=0)
    assert text == "".join(lm.stream("The ", max_new_tokens=20, temperature=0, use_cache=False))
    assert len(text) > 0
    batch = lm.generate_batch(["The ", "A king"], max_new_tokens=20, temperature=0)
    assert batch == [text, lm.generate("A king", max_new_tokens=20, temperature=0)]
    assert len(lm.beam_search("The ", num_beams=3, max_new_tokens=6)) >= 1
    from lmstack.eval.perplexity import perplexity
    ppl = perplexity(lm, "The king sat on the mat.\n")
    assert 1.0 < ppl["token_perplexity"] < 64


def test_generate_cli_with_a_gcnn_checkpoint(tmp_path, corpus_file):
    from lmstack.train import pretrain
    out = tmp_path / "run"
    pretrain(_run(out, corpus_file, "gcnn", max_steps=6, final_eval_windows=0), log=lambda *a: None)
    r = run_cli("generate", "--model", str(out / "last"), "--prompt", "The ", "--max-new-tokens", "12",
                "--temperature", "0")
    assert r.returncode == 0, r.stderr
    lm = lmstack.load(str(out / "last"))
    assert r.stdout.rstrip("\n") == "The " + lm.generate("The ", max_new_tokens=12, temperature=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_choice_scoring_matches_generate_score(arch):
    """The evaluation backend's multiple-choice scoring (no KV cache to share the context through: each row is
    scored by a full forward pass) agrees with the engine's `score`."""
    from lmstack.eval.backend import score_batch
    from lmstack.generate import score
    model = small_model(arch)
    items = [([1, 2, 3, 4], [[5, 6], [7], [8, 9, 10]]), ([11] * 20, [[12, 13, 14]])]
    got = score_batch(model, items)
    for (ctx, conts), res in zip(items, got):
        for c, (lp, greedy) in zip(conts, res):
            ref_lp, ref_greedy = score(model, ctx, c)
            assert lp == pytest.approx(ref_lp, abs=1e-5) and greedy == ref_greedy
