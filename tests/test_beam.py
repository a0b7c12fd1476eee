"""Beam search against transformers: the same sequences and sequence scores as
`generate(num_beams=k, do_sample=False, length_penalty=..., early_stopping=..., num_return_sequences=...)` on tiny
random GPT-2 and Llama models loaded into lmstack with `load_hf`."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from lmstack.convert.hf import load_hf  # noqa: E402
from lmstack.errors import LMStackError  # noqa: E402
from lmstack.generate import SamplingParams, beam_search, generate  # noqa: E402
from lmstack.generate.beam import cache_reorder  # noqa: E402
from lmstack.models.kv_cache import KVCache  # noqa: E402

V = 40


def _hf(family: str, eos: int):
    T = transformers
    torch.manual_seed(0)
    if family == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                           bos_token_id=eos, eos_token_id=eos))
    else:
        m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=eos))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger random weights: peaked, varied distributions so beams diverge and EOS happens
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    """(hf_model, lmstack_model, eos): EOS is a token greedy decoding reaches after a few steps, so beams finish
    at different lengths."""
    family = request.param
    probe = _hf(family, eos=0)
    d = tmp_path_factory.mktemp(family)
    probe.save_pretrained(d)
    model, _ = load_hf(d)
    free = generate(model, PROMPT, SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False))
    eos = free[3]
    hf = _hf(family, eos=eos)
    hf.generation_config.pad_token_id = eos
    return hf, model, eos


PROMPT = [3, 17, 5, 9, 22]


def _hf_beams(hf, eos, **kw):
    out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                      do_sample=False, output_scores=True, return_dict_in_generate=True, eos_token_id=eos,
                      pad_token_id=eos, **kw)
    return out.sequences[:, len(PROMPT):].tolist(), out.sequences_scores.tolist()


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,nret,max_new", [
    (3, 1.0, False, 1, 10), (4, 1.0, False, 4, 10), (4, 0.0, True, 2, 9), (3, 2.0, "never", 3, 8),
    (5, -0.5, False, 3, 10), (2, 1.0, True, 2, 12),
])
def test_beam_matches_transformers(pair, num_beams, length_penalty, early_stopping, nret, max_new):
    hf, model, eos = pair
    seqs, scores = _hf_beams(hf, eos, num_beams=num_beams, length_penalty=length_penalty,
                             early_stopping=early_stopping, num_return_sequences=nret, max_new_tokens=max_new)
    hyps = beam_search(model, PROMPT, num_beams=num_beams, max_new_tokens=max_new, length_penalty=length_penalty,
                       early_stopping=early_stopping, num_return_sequences=nret, eos_id=eos)
    assert len(hyps) == nret
    width = len(seqs[0])
    assert [h.tokens + [eos] * (width - len(h.tokens)) for h in hyps] == seqs
    assert [h.score for h in hyps] == pytest.approx(scores, rel=1e-6, abs=1e-5)


def test_beam_finishes_with_eos_somewhere(pair):
    """The fixture really exercises finished hypotheses (EOS before max_new_tokens)."""
    hf, model, eos = pair
    hyps = beam_search(model, PROMPT, num_beams=4, max_new_tokens=10, num_return_sequences=4, eos_id=eos)
    assert any(h.tokens[-1] == eos and len(h.tokens) < 10 for h in hyps)


def test_beam_with_repetition_penalty_matches_transformers(pair):
    hf, model, eos = pair
    seqs, scores = _hf_beams(hf, eos, num_beams=3, repetition_penalty=1.3, num_return_sequences=2, max_new_tokens=8)
    hyps = beam_search(model, PROMPT, num_beams=3, max_new_tokens=8, num_return_sequences=2, eos_id=eos,
                       params=SamplingParams(repetition_penalty=1.3))
    width = len(seqs[0])
    assert [h.tokens + [eos] * (width - len(h.tokens)) for h in hyps] == seqs
    assert [h.score for h in hyps] == pytest.approx(scores, rel=1e-6, abs=1e-5)


def test_one_beam_is_greedy(pair):
    _, model, _ = pair
    hyp = beam_search(model, PROMPT, num_beams=1, max_new_tokens=7)[0]
    assert hyp.tokens == generate(model, PROMPT, SamplingParams(max_new_tokens=7, temperature=0, stop_at_eos=False))


def test_cache_reorder():
    c = KVCache(1, 3, 1, 4, 2)
    for r in range(3):
        c.k[0][r] = r
        c.v[0][r] = 10 + r
    cache_reorder(c, torch.tensor([2, 2, 0]), 3)
    assert c.k[0][:, 0, 0, 0].tolist() == [2, 2, 0] and c.v[0][:, 0, 0, 0].tolist() == [12, 12, 10]


@pytest.mark.parametrize("kw,match", [(dict(num_beams=0), "num_beams"), (dict(num_return_sequences=5), "num_return"),
                                      (dict(early_stopping="sometimes"), "early_stopping"),
                                      (dict(max_new_tokens=0), "max_new_tokens")])
def test_beam_validation(pair, kw, match):
    _, model, _ = pair
    with pytest.raises(LMStackError, match=match):
        beam_search(model, PROMPT, **{"num_beams": 4, "max_new_tokens": 5, **kw})


@pytest.mark.parametrize("kw", [dict(), dict(repetition_penalty=1.4), dict(min_new_tokens=6),
                                dict(repetition_penalty=0.7, min_new_tokens=2)])
def test_greedy_engine_matches_transformers_generate(pair, kw):
    """The whole engine (KV cache + history-dependent processors + EOS) against transformers' greedy generate."""
    hf, model, eos = pair
    out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                      do_sample=False, max_new_tokens=10, eos_token_id=eos, pad_token_id=eos, **kw)
    want = out[0, len(PROMPT):].tolist()
    got = generate(model, PROMPT, SamplingParams(max_new_tokens=10, temperature=0, **kw), eos_id=eos)
    assert got == want[:len(got)] and all(t == eos for t in want[len(got):])


def test_logit_bias_matches_transformers_sequence_bias(pair):
    hf, model, eos = pair
    bias = {7: 3.0, 12: -2.0, 30: 4.5}
    out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                      do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=eos,
                      sequence_bias={(k,): v for k, v in bias.items()})
    want = out[0, len(PROMPT):].tolist()
    got = generate(model, PROMPT, SamplingParams(max_new_tokens=8, temperature=0, logit_bias=bias), eos_id=eos)
    assert got == want[:len(got)] and all(t == eos for t in want[len(got):])


def test_batched_generation_matches_transformers_left_padding(pair):
    """generate_batch (left padding, per-row positions) against transformers' batched greedy generate."""
    from lmstack.generate import generate_batch
    hf, model, eos = pair
    prompts = [PROMPT, [8, 1], [30, 2, 4, 4, 11, 19, 6, 3], [25]]
    L = max(map(len, prompts))
    ids = torch.tensor([[eos] * (L - len(p)) + p for p in prompts])
    att = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=att, do_sample=False, max_new_tokens=8, eos_token_id=eos,
                      pad_token_id=eos)[:, L:].tolist()
    got = generate_batch(model, prompts, SamplingParams(max_new_tokens=8, temperature=0), eos_id=eos)
    for want, steps in zip(out, got):
        toks = [s.token for s in steps]
        assert toks == want[:len(toks)] and all(t == eos for t in want[len(toks):])
