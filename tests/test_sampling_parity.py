"""The sampling pipeline against transformers' logits processors (processed distributions equal to 1e-6 on random
logits and histories, alone and combined), sampled frequencies against the processed distribution (chi-square),
OpenAI frequency/presence penalties against a hand computation, logit_bias, min_new_tokens, seeds, stop strings
across token boundaries, and validation errors."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as LP  # noqa: E402

from conftest import llama_cfg_dict  # noqa: E402
from lmstack import LM  # noqa: E402
from lmstack.config import ModelConfig  # noqa: E402
from lmstack.errors import LMStackError  # noqa: E402
from lmstack.generate import SamplingParams, apply_stop_strings, generate, process_logits, sample_next  # noqa: E402
from lmstack.models import Transformer  # noqa: E402
from lmstack.tokenizer import train_bpe, train_char  # noqa: E402

B, V, L, PROMPT_LEN = 6, 50, 12, 7


def rand_case(seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * scale
    ids = torch.randint(0, V, (B, L), generator=g)
    return logits, ids


def hf_chain(p: SamplingParams, eos=None) -> LP.LogitsProcessorList:
    """The processors transformers' generate() builds for these settings, in its order."""
    procs = LP.LogitsProcessorList()
    if p.logit_bias:
        procs.append(LP.SequenceBiasLogitsProcessor({(k,): v for k, v in p.logit_bias.items()}))
    if p.repetition_penalty != 1.0:
        procs.append(LP.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.min_new_tokens:
        procs.append(LP.MinNewTokensLengthLogitsProcessor(PROMPT_LEN, p.min_new_tokens, eos))
    if p.temperature != 1.0:
        procs.append(LP.TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        procs.append(LP.TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(LP.TopPLogitsWarper(p.top_p))
    if p.min_p:
        procs.append(LP.MinPLogitsWarper(p.min_p))
    return procs


COMBOS = [
    dict(temperature=0.7), dict(temperature=1.6), dict(top_k=5), dict(top_k=1), dict(top_p=0.9), dict(top_p=0.3),
    dict(min_p=0.05), dict(min_p=0.3), dict(repetition_penalty=1.3), dict(repetition_penalty=0.8),
    dict(logit_bias={3: 5.0, 7: -100.0, 11: 0.5}),
    dict(temperature=0.8, top_k=20, top_p=0.9),
    dict(temperature=1.3, top_p=0.8, min_p=0.1),
    dict(repetition_penalty=1.2, temperature=0.6, top_k=10, top_p=0.95, min_p=0.02),
    dict(logit_bias={1: 2.0, 2: -3.0}, repetition_penalty=1.5, temperature=0.9, top_p=0.7),
    dict(repetition_penalty=2.0, top_k=8, min_p=0.2),
]


@pytest.mark.parametrize("kw", COMBOS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("seed", range(3))
def test_processed_distribution_matches_transformers(kw, seed):
    logits, ids = rand_case(seed)
    p = SamplingParams(**kw)
    ours = process_logits(logits, p, ids=ids, prompt_len=PROMPT_LEN).softmax(-1)
    ref = hf_chain(p)(ids, logits.clone()).softmax(-1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert torch.equal(ours > 0, ref > 0)  # the same tokens are filtered out


def test_history_as_lists_matches_tensor():
    logits, ids = rand_case(5)
    p = SamplingParams(repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.3, top_k=9)
    a = process_logits(logits, p, ids=ids, prompt_len=PROMPT_LEN)
    b = process_logits(logits, p, ids=[r.tolist() for r in ids], prompt_len=[PROMPT_LEN] * B)
    assert torch.equal(a, b)


@pytest.mark.parametrize("generated", [0, 2, 4, 5, 8])
def test_min_new_tokens_matches_transformers(generated):
    g = torch.Generator().manual_seed(generated)
    logits = torch.randn(B, V, generator=g)
    ids = torch.randint(0, V, (B, PROMPT_LEN + generated), generator=g)
    p = SamplingParams(min_new_tokens=5)
    ours = process_logits(logits, p, ids=ids, prompt_len=PROMPT_LEN, eos_ids={4, 9})
    ref = hf_chain(p, eos=[4, 9])(ids, logits.clone())
    assert torch.equal(ours, ref)
    assert torch.isinf(ours[:, [4, 9]]).all() == (generated < 5)


def test_frequency_presence_penalty_formula():
    logits, ids = rand_case(7)
    f, pres = 0.7, -0.4
    out = process_logits(logits, SamplingParams(frequency_penalty=f, presence_penalty=pres), ids=ids,
                         prompt_len=PROMPT_LEN)
    want = logits.clone()
    for b in range(B):
        counts = {}
        for t in ids[b, PROMPT_LEN:].tolist():  # generated tokens only: the prompt is not counted
            counts[t] = counts.get(t, 0) + 1
        for t, c in counts.items():
            want[b, t] -= f * c + pres * (1 if c > 0 else 0)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    prompt_only = set(ids[0, :PROMPT_LEN].tolist()) - set(ids[0, PROMPT_LEN:].tolist())
    assert all(out[0, t] == logits[0, t] for t in prompt_only)


def test_penalties_apply_to_greedy():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    hist = [[0, 0, 2]]
    assert sample_next(logits, SamplingParams(temperature=0), ids=hist).item() == 0
    assert sample_next(logits, SamplingParams(temperature=0, repetition_penalty=1.1), ids=hist).item() == 1
    assert sample_next(logits, SamplingParams(temperature=0, frequency_penalty=1.0), ids=hist,
                       prompt_len=1).item() == 1
    assert sample_next(logits, SamplingParams(temperature=0, logit_bias={3: 10}), ids=hist).item() == 3
    # repetition penalty (HF): positive logits divided, negative multiplied
    out = process_logits(torch.tensor([[2.0, -2.0, 1.0]]), SamplingParams(repetition_penalty=2.0), ids=[[0, 1]])
    assert out.tolist() == [[1.0, -4.0, 1.0]]


# ---- sampling follows the processed distribution -----------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=6), dict(top_p=0.8, repetition_penalty=1.3),
                                dict(min_p=0.1, temperature=1.5, presence_penalty=0.5)])
def test_sampled_frequencies_chi_square(kw):
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=g) * 1.5
    hist = [[1, 2, 2, 5, 7]]
    p = SamplingParams(**kw)
    probs = process_logits(logits, p, ids=hist, prompt_len=2).softmax(-1)[0].double()
    n = 20000
    draws = sample_next(logits.repeat(n, 1), p, torch.Generator().manual_seed(1), ids=hist * n, prompt_len=2)
    counts = torch.bincount(draws, minlength=12).double()
    assert counts[probs == 0].sum() == 0  # never a filtered token
    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * n
    _, pval = stats.chisquare(counts[keep].numpy(), expected.numpy())
    assert pval > 1e-3, (kw, counts.tolist(), (probs * n).tolist())


@pytest.mark.parametrize("scale,top_p", [(0.3, 0.9), (0.3, 0.999), (4.0, 0.95), (8.0, 0.5), (1.0, 1e-4)])
def test_nucleus_of_a_large_vocabulary_equals_the_exact_full_sort(scale, top_p):
    """The nucleus found from the top 64, 512, ... tokens equals the rule applied after a full sort with exact
    (float64) running sums, for flat distributions (a nucleus of thousands of tokens) and peaked ones."""
    from lmstack.generate.sampling import nucleus_removed
    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(3, 20000, generator=g) * scale
    logits[1, :100] = float("-inf")                              # tokens an earlier step removed
    probs = logits.double().softmax(-1)
    vals, order = probs.sort(-1, descending=True)
    keep = (vals.cumsum(-1) - vals) < top_p
    keep[:, 0] = True
    want = torch.ones_like(keep).scatter_(-1, order, ~keep)
    got = nucleus_removed(logits, top_p)
    assert torch.equal(got, want), (got != want).sum()
    assert not got[1, :100].logical_not().any()


def test_draw_never_picks_a_zero_probability_token_at_the_cdf_edges(monkeypatch):
    """The inverse-CDF draw at u = 0 and at u rounding up to the total: a flat CDF step (probability 0) at the
    start, in the middle or at the end is never chosen."""
    from lmstack.generate import sampling
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    for u, want in ((0.0, [1, 2]), (1.0, [3, 2]), (1 - 2 ** -24, [3, 2])):
        monkeypatch.setattr(sampling.torch, "rand", lambda *shape, u=u, **kw: torch.full(shape, u))
        assert sampling.draw(probs).tolist() == want


# ---- seeds, min_new_tokens, logit_bias in generation --------------------------------------------------------------
def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**llama_cfg_dict())).eval()


def test_same_seed_same_output_with_all_controls():
    m = tiny()
    kw = dict(max_new_tokens=20, temperature=0.9, top_k=30, top_p=0.95, min_p=0.01, repetition_penalty=1.2,
              frequency_penalty=0.3, presence_penalty=0.2, logit_bias={5: 1.0}, stop_at_eos=False)
    a = generate(m, [1, 2, 3], SamplingParams(seed=7, **kw))
    assert a == generate(m, [1, 2, 3], SamplingParams(seed=7, **kw))
    assert a != generate(m, [1, 2, 3], SamplingParams(seed=8, **kw))


def test_min_new_tokens_delays_eos_in_generation():
    m = tiny()
    eos = 9
    forced = SamplingParams(max_new_tokens=10, temperature=0, logit_bias={eos: 100.0})
    assert generate(m, [1, 2, 3], forced, eos_id=eos) == [eos]  # logit_bias forces EOS at once
    out = generate(m, [1, 2, 3], SamplingParams(max_new_tokens=10, temperature=0, logit_bias={eos: 100.0},
                                                min_new_tokens=4), eos_id=[eos, 11])
    assert len(out) == 5 and eos not in out[:4] and 11 not in out[:4] and out[4] == eos
    # sampling too
    out = generate(m, [1, 2, 3], SamplingParams(max_new_tokens=10, logit_bias={eos: 100.0}, min_new_tokens=3,
                                                seed=0), eos_id=eos)
    assert len(out) == 4 and out[-1] == eos


def test_repetition_penalty_discourages_repeats():
    m = tiny()
    sp = dict(max_new_tokens=24, temperature=0, stop_at_eos=False)
    plain = generate(m, [1, 2, 3], SamplingParams(**sp))
    pen = generate(m, [1, 2, 3], SamplingParams(repetition_penalty=3.0, **sp))
    assert len(set(pen)) > len(set(plain))


# ---- stop strings ---------------------------------------------------------------------------------------------------
class ScriptedModel(nn.Module):
    """Emits a fixed token sequence greedily (at absolute position j it predicts seq[j+1]); counts forward calls."""

    def __init__(self, seq: list[int], vocab: int):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab, block_size=256, n_layer=1, n_head=1, n_embd=4)
        self.seq, self.calls = seq, 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, cache=None, pos=0, **kw):
        self.calls += 1
        Bn, T = idx.shape
        out = torch.full((Bn, T, self.config.vocab_size), -20.0)
        for t in range(T):
            j = pos + t + 1
            if j < len(self.seq):
                out[:, t, self.seq[j]] = 20.0
        return out


TEXT = ["the quick brown fox jumps over the lazy dog. END of story; hello world! " * 30]


@pytest.fixture(scope="module", params=["bpe", "char"])
def tok(request):
    return train_bpe(TEXT, 300) if request.param == "bpe" else train_char(TEXT)


def scripted(tok, prompt, cont):
    p, c = tok.encode(prompt), tok.encode(cont)
    return LM(ScriptedModel(p + c, tok.vocab_size), tok), c


@pytest.mark.parametrize("stop,want", [
    ("END", "the lazy dog. "), ("dog. E", "the lazy "), (["x", "lazy d", "azy"], "the l"),
    ("the", ""), ("never there", "the lazy dog. END of story"), ("storyX", "the lazy dog. END of story"),
    (["ry", "story"], "the lazy dog. END of "),
])
def test_stop_strings_across_token_boundaries(tok, stop, want):
    cont = "the lazy dog. END of story"
    lm, ids = scripted(tok, "hello ", cont)
    kw = dict(max_new_tokens=len(ids), temperature=0, stop=stop)
    text = lm.generate("hello ", **kw)
    assert text == want
    pieces = list(lm.stream("hello ", **kw))
    assert "".join(pieces) == text and all(pieces)
    stops = [stop] if isinstance(stop, str) else stop
    for i in range(1, len(pieces) + 1):  # no streamed prefix ever contains (the start of a completed) stop string
        assert not any(s in "".join(pieces[:i]) for s in stops)


def test_stop_string_ends_generation_early(tok):
    cont = "the lazy dog. END of story; hello world! the quick brown fox"
    lm, ids = scripted(tok, "hello ", cont)
    lm.model.calls = 0
    assert lm.generate("hello ", max_new_tokens=len(ids), temperature=0, stop="END") == "the lazy dog. "
    needed = len(tok.encode("the lazy dog. END"))  # about the tokens that spell the text through the stop string
    assert lm.model.calls <= needed + 2 < len(ids)


def test_stop_strings_with_eos_and_special_tokens(tok):
    lm, ids = scripted(tok, "a", f"the fox{tok.eos_token} END")
    assert lm.generate("a", max_new_tokens=len(ids), temperature=0, stop="END") == "the fox"


def test_apply_stop_strings_any_split():
    r = random.Random(0)
    text = "abcabdabcxyzabc--stop--tail"
    for stops in (["stop"], ["abd"], ["zab", "bcx"], ["--s", "p--"], ["nope"], ["ab"], ["tail"]):
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
        for _ in range(30):
            cuts = sorted(r.sample(range(1, len(text)), r.randint(0, 10)))
            pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            assert "".join(apply_stop_strings(iter(pieces), stops)) == text[:cut], (stops, pieces)


# ---- validation -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(frequency_penalty=3), "frequency_penalty"), (dict(presence_penalty=-2.5), "presence_penalty"),
    (dict(min_new_tokens=-1), "min_new_tokens"), (dict(logit_bias={"a": 1}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(stop=[""]), "stop"), (dict(stop=[3]), "stop"),
])
def test_validation_errors(bad, match):
    with pytest.raises(LMStackError, match=match):
        SamplingParams(**bad)


def test_logit_bias_outside_vocabulary():
    with pytest.raises(LMStackError, match="outside the vocabulary"):
        process_logits(torch.zeros(1, 10), SamplingParams(logit_bias={10: 1.0}))


def test_valid_edges():
    p = SamplingParams(min_p=1.0, repetition_penalty=1e-3, frequency_penalty=-2, presence_penalty=2, stop="x",
                       logit_bias={"3": "1.5"})
    assert p.stop == ["x"] and p.logit_bias == {3: 1.5}
