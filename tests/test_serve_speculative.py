"""Speculative decoding in the continuous batcher and `lmstack serve --draft-model`: greedy tokens (and logprobs)
equal to plain decoding whatever joins or leaves the batch, with a prefix cache too; sampled tokens distributed as
the target's (chi-square over tokens 2-3, the ones a round verifies); structured-output rows decode plainly; the
acceptance counters in /metrics; bad flags are one clear error."""
from __future__ import annotations

import pytest
import torch

from conftest import lively_model, start_server
from lmstack.checkpoint import save_checkpoint
from lmstack.cli import main as cli_main
from lmstack.errors import LMStackError
from lmstack.generate import (ContinuousBatcher, ModelDrafter, NgramDrafter, PrefixCache, SamplingParams,
                              process_logits, stream_steps)
from lmstack.generate.batching import Request
from lmstack.lm import LM
from lmstack.tokenizer import train_char
from test_speculative import _chi2_pvalue

REPEATS = [3, 1, 4, 1, 5, 9, 2, 6] * 3
PROMPTS = [REPEATS, [5, 9, 2], list(range(10, 26)), [7, 7, 8, 40, 41, 2, 9] * 2, [33]]


def _run(batcher: ContinuousBatcher, prompts, sps, top: int = 0, matcher=None, stop_ids=()) -> list[list]:
    outs = [[] for _ in prompts]
    for p, sp, out in zip(prompts, sps, outs):
        batcher.add(Request(p, sp, set(stop_ids), top_logprobs=top, on_step=out.append, matcher=matcher))
    while batcher.has_work():
        batcher.step()
    return outs


def _drafter(kind: str, family: str, target):
    if kind == "ngram":
        return NgramDrafter(ngram_min=1)
    # the target as its own draft (accepted), or an unrelated random model (mostly rejected)
    return ModelDrafter(target if kind == "self" else lively_model(family, seed=5, n_layer=1, block_size=128))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["ngram", "self", "other"])
@pytest.mark.parametrize("max_batch", [1, 3])
def test_batcher_greedy_equals_plain_decoding(family, kind, max_batch):
    """Rows decode batched while several are active and speculate once one is left: the same tokens, logprobs and
    top alternatives as each prompt decoded alone (penalties included)."""
    m = lively_model(family, block_size=128)
    sps = [SamplingParams(max_new_tokens=30 + 7 * i, temperature=0, stop_at_eos=False,
                          repetition_penalty=1.2 if i == 2 else 1.0) for i in range(len(PROMPTS))]
    b = ContinuousBatcher(m, max_batch=max_batch, draft=_drafter(kind, family, m), num_speculative=3)
    outs = _run(b, PROMPTS, sps, top=2)
    for i, (p, sp) in enumerate(zip(PROMPTS, sps)):
        ref = list(stream_steps(m, p, sp, top_logprobs=2))
        assert [s.token for s in outs[i]] == [s.token for s in ref], i
        assert [s.logprob for s in outs[i]] == pytest.approx([s.logprob for s in ref], abs=1e-4)
        assert [[t for t, _ in s.top] for s in outs[i]] == [[t for t, _ in s.top] for s in ref]
    st = b.speculative_stats()
    assert st["rounds"] > 0 and st["proposed"] > 0 and 0 <= st["accepted"] <= st["proposed"]
    assert st["acceptance_rate"] == st["accepted"] / st["proposed"]
    assert st["tokens"] == st["accepted"] + st["rounds"]  # every round emits its accepted drafts + one token
    if kind != "other":
        assert st["accepted"] > 0 and b.steps_run < sum(len(o) for o in outs)  # fewer passes than tokens


def test_batcher_eos_max_tokens_and_prefix_cache():
    """A stop token ends a row as it does alone; max_new_tokens is never exceeded; requests reusing a cached
    prompt prefix speculate from it and still decode as alone."""
    m = lively_model("llama", block_size=128)
    prompts = [REPEATS, REPEATS + [3, 1], REPEATS[:12] + [7, 8]]
    plain = SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False)
    first, second = ([s.token for s in stream_steps(m, p, plain)] for p in prompts[:2])
    eos = next(t for t in second[5:] if t not in first)  # the first prompt runs to its budget, the second stops
    pc = PrefixCache(block_tokens=4)
    b = ContinuousBatcher(m, max_batch=2, prefix_cache=pc, draft=NgramDrafter(), num_speculative=4)
    sps = [SamplingParams(max_new_tokens=n, temperature=0) for n in (40, 9, 25)]
    for p, sp in zip(prompts, sps):  # one after another: each alone in the batch, each after a cached prefix
        out = _run(b, [p], [sp], stop_ids={eos})[0]
        ref = list(stream_steps(m, p, sp, eos_id={eos}))
        ours = [s.token for s in out]
        assert ours == [s.token for s in ref] and len(ours) <= sp.max_new_tokens
    assert pc.stats()["hit_tokens"] > 0 and b.speculative_stats()["accepted"] > 0


class AnyToken:
    """A structured-output matcher that allows every token (the batcher must still decode its row plainly)."""
    done = False

    def __init__(self, vocab: int):
        self.mask, self.seen = torch.ones(vocab, dtype=torch.bool), []

    def allowed(self):
        return self.mask

    def advance(self, token: int) -> None:
        self.seen.append(token)


def test_structured_output_rows_decode_plainly():
    m = lively_model("llama", block_size=128)
    sp = SamplingParams(max_new_tokens=20, temperature=0, stop_at_eos=False)
    b = ContinuousBatcher(m, max_batch=1, draft=NgramDrafter())
    matcher = AnyToken(m.config.vocab_size)
    out = _run(b, [REPEATS], [sp], matcher=matcher)[0]
    assert [s.token for s in out] == [s.token for s in stream_steps(m, REPEATS, sp)] == matcher.seen
    assert b.speculative_stats()["rounds"] == 0


def _exact_tokens_2_3(m, draft, prompt, sp, V) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, V) exact distribution of generated tokens 2 and 3 (token 1 summed out), and that distribution if every
    draft of token 2 were accepted (token 2 from the draft model): a wrong acceptance rule leans towards it."""
    with torch.no_grad():
        def probs(model, rows):
            return process_logits(model(torch.tensor(rows))[:, -1], sp, ids=rows, prompt_len=len(prompt)).softmax(-1)
        p1 = probs(m, [prompt])[0]
        p2, q2 = (probs(x, [prompt + [a] for a in range(V)]) for x in (m, draft))  # (V, V): t1 -> t2
        p3 = probs(m, [prompt + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    exact = (p1[:, None, None] * p2[:, :, None] * p3).sum(0)
    always = (p1[:, None, None] * q2[:, :, None] * p3).sum(0)
    return exact, always


class Pairs:
    """Counts of (token 2, token 3) over the generations it receives TokenSteps of."""

    def __init__(self, V: int):
        self.counts = torch.zeros(V, V)

    def request(self, prompt, sp, gen) -> Request:
        toks: list[int] = []

        def on_step(s):
            toks.append(s.token)
            if len(toks) == 3:
                self.counts[toks[1], toks[2]] += 1
        return Request(prompt, sp, generator=gen, on_step=on_step)


def test_batcher_sampled_distribution_matches_target():
    """Token 1 comes from the prefill; one round drafts token 2 (k=1): its rejection path resamples token 2, its
    acceptance path adds token 3 as the bonus."""
    from test_speculative import PROMPT, V, _model
    from conftest import llama_cfg_dict, tiny_cfg_dict
    m = _model(llama_cfg_dict(vocab_size=V, n_layer=2, n_embd=32, block_size=64), seed=0, scale=0.3)
    draft = _model(tiny_cfg_dict(vocab_size=V, n_layer=1, n_embd=16, n_head=2, block_size=64), seed=1, scale=0.3)
    sp = SamplingParams(max_new_tokens=3, temperature=1.0, stop_at_eos=False)
    exact, always = _exact_tokens_2_3(m, draft, PROMPT, sp, V)
    b = ContinuousBatcher(m, max_batch=1, draft=ModelDrafter(draft), num_speculative=4)
    gen, pairs, n = torch.Generator().manual_seed(7), Pairs(V), 500
    for _ in range(n):
        b.add(pairs.request(PROMPT, sp, gen))
    while b.has_work():
        b.step()
    st, counts = b.speculative_stats(), pairs.counts
    assert counts.sum() == n and st["rounds"] == n and 0.1 < st["acceptance_rate"] < 0.9  # both paths ran
    assert counts[exact == 0].sum() == 0
    assert _chi2_pvalue(counts, exact) > 1e-3
    assert _chi2_pvalue(counts, 0.5 * exact + 0.5 * always) < 1e-6  # power: half the drafts wrongly kept


def test_batcher_speculation_errors():
    m = lively_model("llama", block_size=128)
    with pytest.raises(LMStackError, match="num_speculative"):
        ContinuousBatcher(m, draft=NgramDrafter(), num_speculative=0)
    with pytest.raises(LMStackError, match="vocabulary"):
        ContinuousBatcher(m, draft=lively_model("gpt2", vocab_size=32))
    from lmstack.config import ModelConfig
    from lmstack.models import make_model
    rnn = make_model(ModelConfig(arch="lstm", vocab_size=64, block_size=32, n_layer=1, n_embd=16))
    with pytest.raises(LMStackError, match="carries its state forward"):
        ContinuousBatcher(rnn, draft=NgramDrafter())


# ---- the server ---------------------------------------------------------------------------------------------------

TEXT = "abcdefghij the cat sat on the mat. "


def _char_lm() -> LM:
    tok = train_char([TEXT])
    return LM(lively_model("llama", vocab_size=tok.vocab_size, block_size=256), tok)


def _metric(text: str, name: str) -> float:
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(name + " ")))


def test_server_stream_equals_plain_server_and_metrics():
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    from lmstack.serve import create_app
    lm = _char_lm()
    servers = [start_server(create_app(lm, "tiny", max_batch=4, draft=d, num_speculative=3))
               for d in (None, NgramDrafter())]
    try:
        prompt = "the cat sat on the mat. the cat sat on the mat. the cat"
        texts, metrics = [], []
        for _, _, url in servers:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
            chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stream=True)
            text = "".join(c.choices[0].text for c in chunks)
            lp = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
            sampled = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0.9,
                                                seed=3, stop=["."])
            texts.append((text, lp.choices[0].logprobs.tokens, lp.choices[0].text))
            assert "." not in sampled.choices[0].text and sampled.usage.completion_tokens <= 16
            metrics.append(httpx.get(url + "/metrics").text)
        assert texts[0] == texts[1] and len(texts[0][0]) > 0
        assert texts[0][0] == lm.generate(prompt, max_new_tokens=40, temperature=0)
        assert _metric(metrics[0], "lmstack_speculative_enabled") == 0
        assert "lmstack_speculative_proposed_tokens_total" not in metrics[0]
        on = metrics[1]
        proposed, accepted = (_metric(on, f"lmstack_speculative_{k}_tokens_total") for k in ("proposed", "accepted"))
        assert _metric(on, "lmstack_speculative_enabled") == 1 and proposed > 0 and 0 <= accepted <= proposed
        assert _metric(on, "lmstack_speculative_acceptance_rate") == pytest.approx(accepted / proposed)
    finally:
        for srv, th, _ in servers:
            srv.should_exit = True
            th.join(timeout=10)


def test_serve_cli_speculative_errors(tmp_path, capsys):
    tok = train_char([TEXT])
    save_checkpoint(tmp_path / "m", lively_model("llama", vocab_size=tok.vocab_size, block_size=64), tok)
    other = train_char(["zyxwvutsrqponmlkjihgfedcba .,"])
    save_checkpoint(tmp_path / "d", lively_model("llama", vocab_size=other.vocab_size, block_size=64), other)
    base = ["serve", "--model", str(tmp_path / "m")]
    for extra, fragment in ((["--draft-model", "ngram", "--ngram-max", "1"], "ngram_min <= ngram_max"),
                            (["--draft-model", "[ngram]", "--num-speculative", "0"], "--num-speculative"),
                            (["--draft-model", str(tmp_path / "d")], "tokenizer of the draft model"),
                            (["--draft-model", str(tmp_path / "missing")], "missing")):
        assert cli_main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmstack: error: ") and fragment in err[0], err
