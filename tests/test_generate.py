"""Sampling and generation: parameter validation, the logits pipeline against hand computations, seeds, context
window handling, EOS, and UTF-8-safe streaming."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import llama_cfg_dict, tiny_cfg_dict
from lmstack import LM
from lmstack.config import ModelConfig
from lmstack.errors import ContextLengthError, LMStackError
from lmstack.generate import SamplingParams, generate, generate_text, process_logits, sample_next, stream_tokens
from lmstack.models import Transformer
from lmstack.tokenizer import train_bpe, train_char


def model(family="gpt2", seed=0, **over):
    torch.manual_seed(seed)
    d = (tiny_cfg_dict if family == "gpt2" else llama_cfg_dict)(**over)
    return Transformer(ModelConfig(**d)).eval()


# ---- SamplingParams ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [(dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
                                       (dict(top_p=1.5), "top_p"), (dict(top_p=-1), "top_p"),
                                       (dict(top_k=-1), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens")])
def test_sampling_params_validation(bad, match):
    with pytest.raises(LMStackError, match=match):
        SamplingParams(**bad)


def test_sampling_params_edges_are_valid():
    assert SamplingParams(temperature=0, top_p=1.0, top_k=0, max_new_tokens=0).greedy
    assert not SamplingParams(temperature=1e-3, top_p=1e-6).greedy


# ---- process_logits ------------------------------------------------------------------------------------------
def rand_logits(seed, B=4, V=50, scale=3.0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("k", [1, 2, 7, 49])
def test_top_k_keeps_exactly_k(k):
    logits = rand_logits(k)
    out = process_logits(logits, SamplingParams(top_k=k))
    finite = torch.isfinite(out)
    assert (finite.sum(-1) == k).all()
    for row in range(len(logits)):
        assert set(finite[row].nonzero().flatten().tolist()) == set(logits[row].topk(k).indices.tolist())
    torch.testing.assert_close(out[finite], logits[finite])  # kept logits unchanged
    assert torch.equal(process_logits(logits, SamplingParams(top_k=50)), logits)  # k >= V: off
    assert torch.equal(process_logits(logits, SamplingParams(top_k=0)), logits)


def manual_top_p(probs: list[float], p: float) -> set[int]:
    """Smallest set of most likely tokens whose probability mass is >= p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


def _near_boundary(probs, p, eps=1e-4):
    acc = 0.0
    for q in sorted(probs, reverse=True):
        acc += q
        if abs(acc - p) < eps:
            return True
    return False


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_p_keeps_smallest_set_reaching_mass(p, temperature):
    checked = 0
    for seed in range(20):
        logits = rand_logits(100 + seed, B=1, V=30, scale=2.0)[0]
        probs = (logits / temperature).softmax(-1).tolist()
        if _near_boundary(probs, p):
            continue
        out = process_logits(logits[None], SamplingParams(top_p=p, temperature=temperature))[0]
        kept = set(torch.isfinite(out).nonzero().flatten().tolist())
        want = manual_top_p(probs, p)
        assert kept == want, (seed, p)
        assert sum(probs[i] for i in kept) >= p
        checked += 1
    assert checked >= 15


def test_top_k_then_top_p_renormalises_after_top_k():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # top-k 2 leaves {0.4, 0.3} -> renormalised {0.571, 0.429}; top-p 0.5 then keeps only the first
    out = process_logits(logits, SamplingParams(top_k=2, top_p=0.5))
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]
    out = process_logits(logits, SamplingParams(top_k=3, top_p=0.5))  # {.444, .333, .222}: needs two
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]


def test_temperature_scales_and_zero_is_argmax():
    logits = rand_logits(3)
    torch.testing.assert_close(process_logits(logits, SamplingParams(temperature=2.0)), logits / 2)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0)), logits.argmax(-1))
    # very low temperature sampling concentrates on the argmax too
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=1e-4), g), logits.argmax(-1))


def test_sampling_respects_filters_and_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    s = sample_next(logits, SamplingParams(top_k=2), g)
    assert set(s.tolist()) == {0, 1}
    assert (s == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    s = sample_next(logits, SamplingParams(), g)
    freq = torch.bincount(s, minlength=4).float() / len(s)
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


# ---- generate -------------------------------------------------------------------------------------------------
def test_same_seed_same_output_different_seed_differs():
    m = model("llama")
    sp = lambda seed: SamplingParams(max_new_tokens=25, temperature=1.0, seed=seed, stop_at_eos=False)
    a, b, c = generate(m, [1, 2, 3], sp(11)), generate(m, [1, 2, 3], sp(11)), generate(m, [1, 2, 3], sp(12))
    assert a == b and len(a) == 25
    assert a != c


def test_generation_does_not_change_training_mode():
    m = model("gpt2", dropout=0.1).train()
    out = generate(m, [1, 2], SamplingParams(max_new_tokens=5, temperature=0, stop_at_eos=False))
    assert len(out) == 5 and m.training
    m.eval()
    assert generate(m, [1, 2], SamplingParams(max_new_tokens=5, temperature=0, stop_at_eos=False)) == out


def test_prompt_longer_than_context_raises():
    m = model()  # block_size 32
    with pytest.raises(ContextLengthError, match="context window of 32 tokens") as e:
        generate(m, list(range(40)), SamplingParams(max_new_tokens=5))
    assert "40 tokens" in str(e.value) and "truncate" in str(e.value)
    with pytest.raises(ContextLengthError, match="context window of 32"):
        generate(m, list(range(28)), SamplingParams(max_new_tokens=5))  # 28 + 5 > 32
    with pytest.raises(ContextLengthError, match=r"\(32 tokens\)"):
        generate(m, [1], SamplingParams(max_new_tokens=32), truncate="left")
    with pytest.raises(LMStackError, match="truncate"):
        generate(m, list(range(40)), SamplingParams(max_new_tokens=5), truncate="right")
    with pytest.raises(LMStackError, match="empty"):
        generate(m, [], SamplingParams(max_new_tokens=5))
    assert len(generate(m, list(range(27)), SamplingParams(max_new_tokens=5, temperature=0, stop_at_eos=False))) == 5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_truncate_left_keeps_the_newest_tokens(family, use_cache):
    m = model(family)
    prompt = [i % 64 for i in range(7, 57)]  # 50 tokens > 32
    sp = SamplingParams(max_new_tokens=6, temperature=0, stop_at_eos=False)
    out = generate(m, prompt, sp, use_cache=use_cache, truncate="left")
    assert out == generate(m, prompt[-26:], sp)  # 26 + 6 = 32: exactly fills the window


def test_stop_at_eos():
    m = model("llama")
    sp = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
    free = generate(m, [4, 5, 6], sp)
    eos = free[2]
    stop = free.index(eos) + 1
    out = generate(m, [4, 5, 6], SamplingParams(max_new_tokens=12, temperature=0), eos_id=eos)
    assert out == free[:stop] and out[-1] == eos  # EOS is yielded, then generation stops
    assert generate(m, [4, 5, 6], sp, eos_id=eos) == free  # stop_at_eos=False: keep going


# ---- text: LM.generate / LM.stream ------------------------------------------------------------------------------
class ScriptedModel(nn.Module):
    """Emits a fixed token sequence greedily: at absolute position j it predicts seq[j+1]. Honours pos like the
    Transformer, so cached (pos > 0) and uncached decoding both follow the script."""

    def __init__(self, seq: list[int], vocab: int):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab, block_size=256, n_layer=1, n_head=1, n_embd=4)
        self.seq = seq
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, cache=None, pos=0, **kw):
        B, T = idx.shape
        out = torch.full((B, T, self.config.vocab_size), -20.0)
        for t in range(T):
            j = pos + t + 1
            if j < len(self.seq):
                out[:, t, self.seq[j]] = 20.0
        return out


ASCII = ["plain ascii words only, hello world. " * 40]
MULTI = "héllo ☃ wörld 😀 日本語 ok"


@pytest.fixture(scope="module", params=["bpe", "char"])
def ascii_tok(request):
    return train_bpe(ASCII, 300) if request.param == "bpe" else train_char(ASCII)


def scripted_lm(tok, prompt: str, continuation: str) -> tuple[LM, list[int]]:
    p, c = tok.encode(prompt), tok.encode(continuation)
    return LM(ScriptedModel(p + c, tok.vocab_size), tok), c


def test_stream_never_splits_utf8_and_matches_generate(ascii_tok):
    lm, cont = scripted_lm(ascii_tok, "hello ", MULTI)
    # multi-byte characters really are spread over several tokens here
    assert any(not _valid_utf8(ascii_tok.token_bytes(t)) for t in cont)
    kw = dict(max_new_tokens=len(cont), temperature=0)
    pieces = list(lm.stream("hello ", **kw))
    assert "".join(pieces) == lm.generate("hello ", **kw) == MULTI
    assert all(p and "\ufffd" not in p for p in pieces)
    assert len(pieces) < len(cont)  # split characters were held back and joined
    # each piece ends on a character boundary of the full text
    ends, acc = set(), 0
    for p in pieces:
        acc += len(p)
        ends.add(acc)
    assert ends <= set(range(len(MULTI) + 1))


def test_stream_stops_at_eos(ascii_tok):
    eot = ascii_tok.eos_token
    lm, cont = scripted_lm(ascii_tok, "hello", f" wörld{eot} never shown")
    kw = dict(max_new_tokens=len(cont), temperature=0)
    assert "".join(lm.stream("hello", **kw)) == lm.generate("hello", **kw) == " wörld"
    assert lm.generate("hello", stop_at_eos=False, **kw) == " wörld never shown"  # special token skipped


def test_stream_flushes_an_incomplete_tail(ascii_tok):
    lm, cont = scripted_lm(ascii_tok, "a", "ok ☃")
    pieces = list(lm.stream("a", max_new_tokens=len(cont) - 1, temperature=0))  # last byte of ☃ never comes
    assert "".join(pieces) == "ok \ufffd"


def test_stream_equals_generate_on_invalid_utf8_bytes():
    tok = train_char(ASCII)
    ids = [tok.hf.token_to_id("<0xE2>"), tok.hf.token_to_id("<0x3B>")] + tok.encode(" ok")
    lm = LM(ScriptedModel(tok.encode("a") + ids, tok.vocab_size), tok)
    kw = dict(max_new_tokens=len(ids), temperature=0)
    assert "".join(lm.stream("a", **kw)) == lm.generate("a", **kw)


def test_lm_with_trained_model_stream_equals_generate(tiny_run):
    import lmstack
    out, _ = tiny_run
    lm = lmstack.load(out / "last")
    for kw in (dict(temperature=0), dict(temperature=0.8, top_k=10, seed=3)):
        text = lm.generate("The ", max_new_tokens=25, **kw)
        assert "".join(lm.stream("The ", max_new_tokens=25, **kw)) == text
        assert len(text) == 25  # char model: one character per token
    assert lm.generate("", max_new_tokens=5, temperature=0)  # empty prompt starts from EOS
    with pytest.raises(ContextLengthError):
        lm.generate("x" * 40, max_new_tokens=5)
    assert len(lm.generate("x" * 40, max_new_tokens=5, truncate="left", temperature=0)) == 5


def test_generate_text_helper(tiny_run):
    import lmstack
    lm = lmstack.load(tiny_run[0] / "last")
    sp = SamplingParams(max_new_tokens=10, temperature=0)
    assert generate_text(lm.model, lm.tokenizer, "The ", sp) == lm.generate("The ", max_new_tokens=10, temperature=0)
    ids = list(stream_tokens(lm.model, lm.tokenizer.encode("The "), sp))
    assert lm.tokenizer.decode(ids) == lm.generate("The ", max_new_tokens=10, temperature=0)


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
