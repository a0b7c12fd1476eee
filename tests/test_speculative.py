"""Speculative decoding, with a draft model and with prompt lookup (n-gram drafts): greedy output identical to the
target's greedy output, sampled output distributed as the target's (chi-square against the target's exact
distribution of the first two tokens), acceptance 1 when the draft is the target; streaming; the CLI flags."""
from __future__ import annotations

import re

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.errors import LMStackError
from lmstack.generate import (NgramDrafter, SamplingParams, SpeculativeResult, generate, process_logits,
                              speculative_generate, stream_speculative)
from lmstack.lm import LM
from lmstack.models.transformer import Transformer
from lmstack.tokenizer import train_char

from conftest import llama_cfg_dict, make_chat_checkpoint, run_cli, tiny_cfg_dict
from test_cli import assert_user_error

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


def _sample_pairs(target, draft, prompt, sp, n: int = 2000) -> tuple[torch.Tensor, int, int]:
    """(V, V) counts of the first two tokens of n speculative generations, drafts proposed, drafts accepted."""
    counts = torch.zeros(V, V)
    gen = torch.Generator().manual_seed(1234)
    drafted = accepted = 0
    for _ in range(n):
        res = speculative_generate(target, draft, prompt, sp, num_draft_tokens=4, generator=gen)
        counts[res.tokens[0], res.tokens[1]] += 1
        drafted, accepted = drafted + res.drafted, accepted + res.accepted
    return counts, drafted, accepted


@pytest.mark.parametrize("max_new,params", [(2, dict(temperature=1.0)),  # k=1: rejection + bonus paths
                                            (3, dict(temperature=0.8, top_k=10, repetition_penalty=1.2))])  # k=2
def test_sampled_distribution_matches_target(models, max_new, params):
    target, draft = models
    sp = SamplingParams(max_new_tokens=max_new, stop_at_eos=False, **params)
    exact = _exact_first_two(target, PROMPT, sp)
    draft_exact = _exact_first_two(draft, PROMPT, sp)
    counts, drafted, accepted = _sample_pairs(target, draft, PROMPT, sp)
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


# ---- prompt lookup (n-gram) drafting ------------------------------------------------------------------------------

def test_ngram_lookup_proposals():
    d = NgramDrafter(ngram_max=3, ngram_min=1)
    assert d.lookup([1, 2, 3, 4, 9, 1, 2, 3], 3) == [4, 9, 1]  # the trigram (1, 2, 3) was followed by 4, 9, 1
    assert d.lookup([1, 2, 3, 4, 9, 1, 2, 3], 8) == [4, 9, 1, 2, 3, 4, 9, 1]  # runs into the end: period 5
    assert d.lookup([5, 6, 5, 6], 4) == [5, 6, 5, 6]  # (5, 6) matched 2 back: period 2
    # the longest match wins over a more recent shorter one: (7, 8) -> 1, although 8 was last followed by 2
    assert d.lookup([7, 8, 1, 0, 8, 2, 7, 8], 1) == [1]
    assert d.lookup([0, 8, 2, 0, 8, 3, 0, 8], 1) == [3]  # most recent of two equal-length matches
    assert d.lookup([1, 2, 3], 4) == []  # the last token never appeared before: nothing to propose
    assert NgramDrafter().lookup([4, 1, 5, 1], 2) == []  # by default a one-token match is too short
    assert NgramDrafter(ngram_min=1).lookup([4, 1, 5, 1], 2) == [5, 1]
    # incremental index over a growing history = a fresh lookup; an unrelated history starts over
    hist = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3]
    inc = NgramDrafter(ngram_min=1)
    for n in range(1, len(hist) + 1):
        assert inc.lookup(hist[:n], 3) == NgramDrafter(ngram_min=1).lookup(hist[:n], 3)
    assert inc.lookup([5, 6, 5, 6], 2) == [5, 6]
    with pytest.raises(LMStackError, match="ngram_min <= ngram_max"):
        NgramDrafter(ngram_max=0)


REPEATS = [3, 1, 4, 1, 5, 9, 2, 6] * 3


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.3, "min_new_tokens": 4}])
def test_ngram_greedy_equals_target_greedy(models, k, extra):
    target, _ = models
    sp = SamplingParams(max_new_tokens=24, temperature=0, **extra)
    for prompt in (PROMPT, [7], REPEATS):
        ref = generate(target, prompt, sp, eos_id=2)
        res = speculative_generate(target, NgramDrafter(ngram_min=k % 2 + 1), prompt, sp, num_draft_tokens=k,
                                   eos_id=2)
        assert res.tokens == ref
        assert 0 <= res.accepted <= res.drafted
    # a repetitive greedy continuation: drafts are accepted, so fewer target passes than tokens
    res = speculative_generate(target, NgramDrafter(), REPEATS, SamplingParams(max_new_tokens=24, temperature=0),
                               num_draft_tokens=k, eos_id=2)
    assert res.accepted >= 6 and res.target_passes < 1 + len(res.tokens)


def test_ngram_stream_yields_each_round(models):
    target, _ = models
    sp = SamplingParams(max_new_tokens=24, temperature=0)
    stats = SpeculativeResult()
    it = stream_speculative(target, NgramDrafter(), REPEATS, sp, num_draft_tokens=4, stats=stats)
    first = next(it)
    assert stats.target_passes == 2 and stats.tokens[0] == first  # prefill + the first round, nothing more yet
    assert [first, *it] == generate(target, REPEATS, sp) == stats.tokens


NGRAM_PROMPT = [3, 7, 10, 3, 7]  # lookup proposes 10, 3; the target gives 10 a probability near 0.4


@pytest.mark.parametrize("max_new,params", [(2, dict(temperature=1.0)),  # k=1: rejection + bonus paths
                                            (3, dict(temperature=0.8, top_k=10, repetition_penalty=1.2))])  # k=2
def test_ngram_sampled_distribution_matches_target(models, max_new, params):
    target, _ = models
    sp = SamplingParams(max_new_tokens=max_new, stop_at_eos=False, **params)
    exact = _exact_first_two(target, NGRAM_PROMPT, sp)
    counts, drafted, accepted = _sample_pairs(target, NgramDrafter(), NGRAM_PROMPT, sp)
    assert drafted >= 2000 and 0.1 < accepted / drafted < 0.9  # both accept and reject paths ran
    assert counts[exact == 0].sum() == 0, "sampled a pair the target can never produce"
    assert _chi2_pvalue(counts, exact) > 1e-3
    # power: a 20% lean towards the drafted first token (what a wrong acceptance rule gives) is detected
    lean = exact.clone() * 0.8
    lean[10] += 0.2 * exact[10] / exact[10].sum()
    assert _chi2_pvalue(counts, lean) < 1e-6


def _char_lm(text: str, seed: int) -> LM:
    tok = train_char([text])
    return LM(_model(llama_cfg_dict(vocab_size=tok.vocab_size, n_layer=1, n_embd=16, n_head=2), seed=seed,
                     scale=0.3), tok)


def test_lm_ngram_stream_and_tokenizer_errors():
    lm = _char_lm("abcdefghijklm", seed=3)
    prompt = "abcabcabcab"
    for params in (dict(max_new_tokens=16, temperature=0), dict(max_new_tokens=16, temperature=0, stop=["ab"])):
        stats = SpeculativeResult()
        pieces = list(lm.speculative_stream(prompt, "[ngram]", 4, stats=stats, **params))
        assert "".join(pieces) == lm.generate(prompt, **params)
        assert stats.drafted > 0 and stats.target_passes >= 2
    text, res = lm.speculative_generate(prompt, NgramDrafter(ngram_max=2), max_new_tokens=16, temperature=0,
                                        return_stats=True)
    assert text == lm.generate(prompt, max_new_tokens=16, temperature=0) and res.summary().startswith(
        f"{res.accepted} of {res.drafted} drafts accepted (")
    with pytest.raises(LMStackError, match="'ngram' for prompt lookup"):
        lm.speculative_generate(prompt, "lookup", max_new_tokens=4)
    same_size = _char_lm("nopqrstuvwxyz", seed=4)  # as many tokens, other characters
    with pytest.raises(LMStackError, match=r"maps id \d+ to 'n', the target's to 'a'.*--draft-model ngram"):
        lm.speculative_generate(prompt, same_size, max_new_tokens=4)
    bigger = _char_lm("abcdefghijklmnop", seed=4)
    n, m = bigger.tokenizer.vocab_size, lm.tokenizer.vocab_size
    assert n == m + 3
    with pytest.raises(LMStackError, match=f"has {n} tokens, the target's has {m}"):
        lm.speculative_generate(prompt, bigger, max_new_tokens=4)


# ---- the CLI ------------------------------------------------------------------------------------------------------

ACCEPT_LINE = re.compile(r"^speculative: (\d+) of (\d+) drafts accepted \(\d+%\), (\d+) target passes for (\d+) "
                         r"tokens$")


def _accept_line(stderr: str) -> tuple[int, int, int, int]:
    lines = stderr.strip().splitlines()
    m = ACCEPT_LINE.match(lines[-1]) if lines else None
    assert m, stderr[-2000:]
    return tuple(int(x) for x in m.groups())


def test_cli_generate_with_ngram_draft(tiny_run):
    out, _ = tiny_run
    base = ["generate", "--model", str(out / "last"), "--prompt", "the king the king ", "--max-new-tokens", "13",
            "--temperature", "0"]  # 18 + 13 characters: the context window is 32
    plain = run_cli(*base)
    spec = run_cli(*base, "--draft-model", "[ngram]", "--num-speculative", "3", "--ngram-max", "4")
    assert plain.returncode == 0 and spec.returncode == 0, (plain.stderr, spec.stderr)
    assert spec.stdout == plain.stdout
    accepted, drafted, passes, tokens = _accept_line(spec.stderr)
    assert tokens == 13 and 0 < accepted <= drafted and passes == 1 + tokens - accepted


def test_cli_chat_with_draft_model(tiny_run, tmp_path):
    chat = make_chat_checkpoint(tiny_run[0], tmp_path / "chat")
    base = ["chat", "--model", str(chat), "-p", "the king", "--max-new-tokens", "12"]
    plain = run_cli(*base)
    lookup = run_cli(*base, "--draft-model", "ngram")
    itself = run_cli(*base, "--draft-model", str(chat), "--num-speculative", "5")  # the target as its own draft
    for r in (plain, lookup, itself):
        assert r.returncode == 0, r.stderr[-2000:]
    assert lookup.stdout == plain.stdout == itself.stdout and len(plain.stdout) > 1  # some text was generated
    _accept_line(lookup.stderr)
    accepted, drafted, _, _ = _accept_line(itself.stderr)
    assert accepted == drafted > 0


def test_cli_speculative_errors(tiny_run, tmp_path):
    last = str(tiny_run[0] / "last")
    base = ["generate", "--model", last, "--max-new-tokens", "4"]
    assert_user_error(run_cli(*base, "--draft-model", "ngram", "--num-beams", "2"), "--num-beams 2",
                      "drop one of the two flags")
    # the chat checkpoint's tokenizer has two more (special) tokens than the plain run's
    chat = make_chat_checkpoint(tiny_run[0], tmp_path / "chat")
    assert_user_error(run_cli(*base, "--draft-model", str(chat)), "tokenizer of the draft model", "tokens, the target's",
                      "--draft-model ngram")
    assert_user_error(run_cli(*base, "--draft-model", "ngram", "--ngram-max", "1"), "ngram_min <= ngram_max")
