"""Speculative decoding: greedy output identical to the target's greedy output, sampled output distributed as the
target's (chi-square against the target's exact distribution of the first two tokens), acceptance 1 when the draft
is the target."""
from __future__ import annotations

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.errors import LMStackError
from lmstack.generate import SamplingParams, generate, process_logits, speculative_generate
from lmstack.lm import LM
from lmstack.models.transformer import Transformer
from lmstack.tokenizer import train_char

from conftest import llama_cfg_dict, tiny_cfg_dict

V = 16


def _model(cfg: dict, seed: int, scale: float) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # large random weights: peaked, clearly different next-token distributions
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


@pytest.fixture(scope="module")
def models():
    target = _model(llama_cfg_dict(vocab_size=V, n_layer=2, n_embd=32, block_size=64), seed=0, scale=0.3)
    draft = _model(tiny_cfg_dict(vocab_size=V, n_layer=1, n_embd=16, n_head=2, block_size=64), seed=1, scale=0.3)
    return target, draft


PROMPT = [3, 1, 4, 1, 5]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.3, "min_new_tokens": 4}])
def test_greedy_equals_target_greedy(models, k, extra):
    target, draft = models
    sp = SamplingParams(max_new_tokens=24, temperature=0, **extra)
    for prompt in (PROMPT, [7]):
        ref = generate(target, prompt, sp, eos_id=2)
        res = speculative_generate(target, draft, prompt, sp, num_draft_tokens=k, eos_id=2)
        assert res.tokens == ref
        assert res.drafted > 0 and 0 <= res.accepted <= res.drafted


def test_draft_equal_to_target_accepts_everything(models):
    target, _ = models
    for sp in (SamplingParams(max_new_tokens=20, temperature=0),
               SamplingParams(max_new_tokens=20, temperature=1.0, seed=3, stop_at_eos=False)):
        res = speculative_generate(target, target, PROMPT, sp, num_draft_tokens=4)
        assert res.acceptance_rate == 1.0 and len(res.tokens) == 20
        assert res.target_passes == 1 + 4  # prefill + 4 rounds of (4 drafts + 1 bonus)


def _exact_first_two(model, prompt, sp) -> torch.Tensor:
    """(V, V) exact joint distribution of the first two sampled tokens under `sp`."""
    with torch.no_grad():
        p1 = process_logits(model(torch.tensor([prompt]))[:, -1], sp, ids=[prompt], prompt_len=len(prompt)).softmax(-1)[0]
        rows = torch.tensor([prompt + [t] for t in range(V)])
        logits = model(rows)[:, -1]
        p2 = process_logits(logits, sp, ids=rows.tolist(), prompt_len=len(prompt)).softmax(-1)
    return p1[:, None] * p2


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare
    n = counts.sum().item()
    counts, expected = counts.flatten().double(), probs.flatten().double() * n
    if counts[expected == 0].sum() > 0:  # observed something impossible under `probs`
        return 0.0
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.mark.parametrize("max_new,params", [(2, dict(temperature=1.0)),  # k=1: rejection + bonus paths
                                            (3, dict(temperature=0.8, top_k=10, repetition_penalty=1.2))])  # k=2
def test_sampled_distribution_matches_target(models, max_new, params):
    target, draft = models
    sp = SamplingParams(max_new_tokens=max_new, stop_at_eos=False, **params)
    exact = _exact_first_two(target, PROMPT, sp)
    draft_exact = _exact_first_two(draft, PROMPT, sp)
    counts = torch.zeros(V, V)
    gen = torch.Generator().manual_seed(1234)
    drafted = accepted = 0
    N = 2000
    for _ in range(N):
        res = speculative_generate(target, draft, PROMPT, sp, num_draft_tokens=4, generator=gen)
        counts[res.tokens[0], res.tokens[1]] += 1
        drafted, accepted = drafted + res.drafted, accepted + res.accepted
    assert 0.05 < accepted / drafted < 0.95  # the draft really differs: both accept and reject paths ran
    assert counts[exact == 0].sum() == 0, "sampled a pair the target can never produce"
    pvalue = _chi2_pvalue(counts, exact)
    print(f"chi-square p={pvalue:.3f} acceptance={accepted / drafted:.2f}")
    assert pvalue > 1e-3
    # and the test has power: the same counts are far from the draft's own distribution
    assert (exact - draft_exact).abs().sum() > 0.3
    assert _chi2_pvalue(counts, draft_exact) < 1e-6


def test_lm_speculative_generate_and_errors():
    tok = train_char(["abcdefghijklm"])
    target = _model(llama_cfg_dict(vocab_size=tok.vocab_size, n_layer=1, n_embd=16, n_head=2), seed=3, scale=0.3)
    draft = _model(tiny_cfg_dict(vocab_size=tok.vocab_size, n_layer=1, n_embd=16, n_head=2), seed=4, scale=0.3)
    lm, dlm = LM(target, tok), LM(draft, tok)
    text, res = lm.speculative_generate("abc", dlm, max_new_tokens=10, temperature=0, return_stats=True)
    assert text == lm.generate("abc", max_new_tokens=10, temperature=0)
    assert 0.0 <= res.acceptance_rate <= 1.0
    assert res.drafted > 0 and res.acceptance_rate == res.accepted / res.drafted and res.accepted <= res.drafted
    # a draft that is the target itself: greedy drafts are always accepted, so each pass yields k + 1 tokens
    text2, same = lm.speculative_generate("abc", lm, num_draft_tokens=4, max_new_tokens=10, temperature=0,
                                          return_stats=True)
    assert text2 == text and same.acceptance_rate == 1.0 and same.target_passes <= 1 + 10 // 5  # prefill + 2 rounds
    other = _model(tiny_cfg_dict(vocab_size=V, n_layer=1, n_embd=16, n_head=2), seed=2, scale=0.0)
    with pytest.raises(LMStackError, match="vocabulary"):
        speculative_generate(target, other, PROMPT, SamplingParams(max_new_tokens=2))
