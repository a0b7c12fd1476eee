"""Batched generation of prompts of different lengths (left padding + padding mask + per-row positions) against
generating each prompt alone, per-token logprobs and top-n alternatives, and `score(context, continuation)`."""
from __future__ import annotations

import pytest
import torch

from conftest import lively_model
from lmstack.errors import ContextLengthError, LMStackError
from lmstack.generate import (SamplingParams, generate, generate_batch, generate_text, score, stream_steps,
                              stream_tokens, continuation_logprobs)


def model(family, seed=0):
    return lively_model(family, seed)


PROMPTS = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [33], [7, 7, 8, 40, 41, 2, 9]]
GREEDY = dict(temperature=0, stop_at_eos=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_positions_argument_defaults_to_pos_range(family):
    m = model(family)
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.allclose(m(x, positions=torch.arange(9).expand(2, 9)), m(x), atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batch_equals_each_alone_greedy(family):
    m = model(family)
    sp = SamplingParams(max_new_tokens=12, **GREEDY)
    batch = generate_batch(m, PROMPTS, sp, top_logprobs=3)
    for prompt, steps in zip(PROMPTS, batch):
        alone = list(stream_steps(m, prompt, sp, top_logprobs=3))
        assert [s.token for s in steps] == [s.token for s in alone]
        for a, b in zip(steps, alone):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batch_rows_stop_at_eos_independently(family):
    m = model(family)
    free = [generate(m, p, SamplingParams(max_new_tokens=10, **GREEDY)) for p in PROMPTS]
    eos = free[0][2]
    sp = SamplingParams(max_new_tokens=10, temperature=0)
    batch = generate_batch(m, PROMPTS, sp, eos_id=eos)
    for prompt, steps in zip(PROMPTS, batch):
        assert [s.token for s in steps] == generate(m, prompt, sp, eos_id=eos)
    assert len(batch[0]) == 3 and batch[0][-1].token == eos


def test_batch_with_penalties_and_min_new_tokens_equals_alone():
    m = model("llama")
    sp = SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.5, frequency_penalty=0.4,
                        logit_bias={3: 2.0}, min_new_tokens=3)
    batch = generate_batch(m, PROMPTS, sp, eos_id=[0, 1])
    for prompt, steps in zip(PROMPTS, batch):
        assert [s.token for s in steps] == generate(m, prompt, sp, eos_id=[0, 1])


def test_batch_sampling_is_seeded_and_respects_context():
    m = model("gpt2")
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, seed=3, stop_at_eos=False)
    a = [[s.token for s in r] for r in generate_batch(m, PROMPTS, sp)]
    assert a == [[s.token for s in r] for r in generate_batch(m, PROMPTS, sp)]
    assert all(len(r) == 8 for r in a)
    assert generate_batch(m, [], sp) == []
    with pytest.raises(LMStackError, match="empty"):
        generate_batch(m, [[1], []], sp)
    with pytest.raises(ContextLengthError):
        generate_batch(m, [[1] * 30], sp)
    out = generate_batch(m, [[1] * 30, [2]], SamplingParams(max_new_tokens=4, **GREEDY), truncate="left")
    assert [s.token for s in out[0]] == generate(m, [1] * 28, SamplingParams(max_new_tokens=4, **GREEDY))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_step_logprobs_match_a_full_forward(family):
    m = model(family)
    prompt = [4, 8, 15, 16]
    sp = SamplingParams(max_new_tokens=6, temperature=0.9, seed=1, stop_at_eos=False)
    steps = list(stream_steps(m, prompt, sp, top_logprobs=5))
    toks = [s.token for s in steps]
    assert toks == list(stream_tokens(m, prompt, sp))
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([prompt + toks]))[0].float(), -1)
    for i, s in enumerate(steps):
        row = logp[len(prompt) - 1 + i]
        assert s.logprob == pytest.approx(row[s.token].item(), abs=1e-4)
        vals, idx = row.topk(5)
        assert [t for t, _ in s.top] == idx.tolist()
        assert [v for _, v in s.top] == pytest.approx(vals.tolist(), abs=1e-4)
    assert all(s.top == [] for s in stream_steps(m, prompt, sp))
    with pytest.raises(LMStackError, match="top_logprobs"):
        list(stream_steps(m, prompt, sp, top_logprobs=-1))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_score(family):
    m = model(family)
    ctx = [4, 8, 15, 16]
    sp = SamplingParams(max_new_tokens=7, temperature=0, stop_at_eos=False)
    steps = list(stream_steps(m, ctx, sp))
    cont = [s.token for s in steps]
    total, greedy = score(m, ctx, cont)
    assert greedy and total == pytest.approx(sum(s.logprob for s in steps), abs=1e-4)
    other = cont[:3] + [(cont[3] + 1) % 64] + cont[4:]
    total2, greedy2 = score(m, ctx, other)
    assert not greedy2 and total2 < total
    lp, is_max = continuation_logprobs(m, ctx, other)
    assert lp.shape == (7,) and is_max.tolist() == [True, True, True, False] + is_max.tolist()[4:]
    assert score(m, ctx, []) == (0.0, True)
    with pytest.raises(LMStackError, match="context"):
        score(m, [], [1])
    with pytest.raises(ContextLengthError):
        score(m, [1] * 30, [2] * 5)
    assert score(m, [1] * 30, [2] * 3)[0] < 0  # 30 + 3 - 1 = 32 tokens fed: fits exactly


def test_lm_batch_beam_score_and_steps(tiny_run):
    import lmstack
    lm = lmstack.load(tiny_run[0] / "last")
    prompts = ["The ", "A longer prompt here ", "x"]
    kw = dict(max_new_tokens=8, temperature=0)
    assert lm.generate_batch(prompts, **kw) == [lm.generate(p, **kw) for p in prompts]
    assert lm.generate_batch(prompts, stop=" ", **kw) == [lm.generate(p, stop=" ", **kw) for p in prompts]
    text = lm.generate("The ", **kw)
    assert generate_text(lm.model, lm.tokenizer, "The ", SamplingParams(stop="e", **kw)) == \
        lm.generate("The ", stop="e", **kw) == text.split("e")[0]
    lp, greedy = lm.score("The ", text)
    assert greedy and lp < 0
    steps = list(lm.stream_steps("The ", top_logprobs=2, **kw))
    assert lm.tokenizer.decode([s.token for s in steps]) == text
    beams = lm.beam_search("The ", num_beams=3, num_return_sequences=2, max_new_tokens=6)
    assert len(beams) == 2 and beams[0][1] >= beams[1][1]
    assert lm.generate("The ", num_beams=3, max_new_tokens=6) == beams[0][0]
