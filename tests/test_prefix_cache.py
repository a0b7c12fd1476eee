"""Prefix caching (generate/prefix_cache.py, ContinuousBatcher(prefix_cache=...), the server's /metrics): prompts that
reuse cached prefix keys/values must decode exactly what they decode without the cache, and really skip the work."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import lively_model, llama_cfg_dict, start_server
from lmstack.config import ModelConfig
from lmstack.errors import LMStackError
from lmstack.generate import BackgroundBatcher, ContinuousBatcher, PrefixCache, SamplingParams
from lmstack.generate.batching import Request
from lmstack.models import Transformer

BT = 8  # block tokens in these tests


def model(family="llama", seed=0, **over):
    return lively_model(family, seed, block_size=128, n_layer=3, **over)


def block_bytes(m) -> int:
    c = m.config
    return 2 * c.n_layer * c.kv_heads * BT * c.head_dim * 4  # K and V, float32


def run(m, prompts, max_batch, cache=None, max_new=6):
    """Every prompt through one batcher (all queued at once, so rows decode together): per prompt its TokenSteps."""
    b = ContinuousBatcher(m, max_batch=max_batch, prefix_cache=cache)
    out = [[] for _ in prompts]
    sp = SamplingParams(max_new_tokens=max_new, temperature=0, stop_at_eos=False)
    for i, p in enumerate(prompts):
        b.add(Request(list(p), sp, top_logprobs=2, on_step=out[i].append))
    while b.has_work():
        b.step()
        if cache is not None:
            assert cache.bytes_used <= cache.budget_bytes
    return out


def assert_same(got, ref):
    for i, (g, r) in enumerate(zip(got, ref)):
        assert [s.token for s in g] == [s.token for s in r], i
        assert [s.logprob for s in g] == pytest.approx([s.logprob for s in r], abs=1e-5), i
        assert [t for t, _ in g[-1].top] == [t for t, _ in r[-1].top], i


BASE = [int(x) for x in torch.randint(1, 64, (40,), generator=torch.Generator().manual_seed(7))]
TAIL = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]
# (prompt, tokens served from the cache when the prompts run in this order, BT = 8)
CASES = [
    (BASE, 0),                        # cold
    (BASE, 32),                       # exactly a cached prompt: 4 of its 5 blocks (the last token is recomputed)
    (BASE[:32], 24),                  # a block-boundary length: 3 blocks, one token left to compute
    (BASE[:33], 32),                  # one past the boundary: 4 blocks
    (BASE[:5] + TAIL, 0),             # shares 5 tokens with BASE: less than a block, nothing to reuse
    (BASE[:5] + TAIL + [11, 12], 16),  # extends the previous prompt's 2 full blocks
    (BASE + [7, 8], 40),              # all 5 blocks of BASE
    ([60, 61, 62], 0),                # shorter than a block
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("max_batch", [1, 4])
def test_outputs_identical_with_and_without_prefix_cache(family, max_batch):
    m = model(family)
    prompts = [p for p, _ in CASES]
    ref = run(m, prompts, max_batch)
    cache = PrefixCache(block_tokens=BT)
    got = run(m, prompts, max_batch, cache)
    assert_same(got, ref)
    st = cache.stats()
    assert st["hit_tokens"] == sum(h for _, h in CASES)
    assert st["lookup_tokens"] == sum(len(p) for p in prompts)
    assert st["hit_rate"] == pytest.approx(st["hit_tokens"] / st["lookup_tokens"])
    assert st["evictions"] == 0 and st["bytes"] == st["blocks"] * block_bytes(m)


def test_second_request_prefills_only_the_uncached_rest():
    m = model()
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    cache = PrefixCache(block_tokens=BT)
    a, b = BASE[:37], BASE[:35] + [9, 9, 9]
    ref = run(m, [a, b], 1, max_new=1)
    seen.clear()
    got = run(m, [a, b], 1, cache, max_new=1)
    assert_same(got, ref)
    assert seen == [37, 38 - 32]  # the second prompt ran only past its 4 cached blocks
    assert cache.stats()["hit_tokens"] == 32 and len(cache) == 4  # b's 4 full blocks are a's: nothing new


def test_lookup_leaves_the_last_token_and_returns_the_blocks():
    cache = PrefixCache(block_tokens=4, budget_bytes=1 << 20)
    k = [torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3) + 1000 * layer for layer in range(2)]
    v = [-t for t in k]
    assert cache.insert(list(range(8)), k, v) == 2
    assert cache.insert(list(range(8)), k, v) == 0  # already cached: only touched
    n, ks, vs = cache.lookup(list(range(8)))
    assert n == 4 and torch.equal(ks[1], k[1][:, :4]) and torch.equal(vs[0], v[0][:, :4])
    n, ks, vs = cache.lookup(list(range(9)))
    assert n == 8 and torch.equal(ks[0], k[0]) and torch.equal(vs[1], v[1])
    assert cache.lookup([0, 1, 2, 9, 4])[0] == 0
    assert cache.lookup([1, 2, 3, 4, 5])[0] == 0  # the same block content at another position is another prefix


def test_lru_evicts_the_oldest_deepest_block_first():
    bt, H, D, L = 4, 2, 3, 2
    one = 2 * L * H * bt * D * 4
    cache = PrefixCache(block_tokens=bt, budget_bytes=3 * one)

    def kv(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(H, 9, D, generator=g) for _ in range(L)], [torch.randn(H, 9, D, generator=g)
                                                                        for _ in range(L)]
    p1, p2 = list(range(9)), list(range(20, 29))
    cache.insert(p1, *kv(1))
    cache.insert(p2, *kv(2))  # 4 blocks > budget: p1's second block (least recent, a leaf) goes
    st = cache.stats()
    assert (st["blocks"], st["bytes"], st["evictions"]) == (3, 3 * one, 1)
    assert cache.lookup(p1)[0] == 4 and cache.lookup(p2)[0] == 8
    cache.insert(list(range(40, 49)), *kv(3))  # p2 was used last: p1's root goes, then p2's deepest block
    assert (cache.lookup(p1)[0], cache.lookup(p2)[0]) == (0, 4)
    assert cache.stats()["bytes"] == 3 * one


def test_tiny_budget_evicts_and_outputs_stay_identical():
    m = model()
    prompts = [p for p, _ in CASES] * 2
    ref = run(m, prompts, 3)
    cache = PrefixCache(block_tokens=BT, budget_bytes=3 * block_bytes(m) + 100)
    got = run(m, prompts, 3, cache)  # `run` checks bytes <= budget after every step
    assert_same(got, ref)
    st = cache.stats()
    assert st["evictions"] > 0 and st["blocks"] == 3 and st["bytes"] == 3 * block_bytes(m)
    assert 0 < st["hit_tokens"] < sum(h for _, h in CASES) * 2
    # every block left is reachable: its parent is the root or still cached
    keys = set(cache._blocks)
    assert all(b.parent == 0 or b.parent in keys for b in cache._blocks.values())


def test_budget_smaller_than_a_block_stores_nothing():
    m = model()
    cache = PrefixCache(block_tokens=BT, budget_bytes=block_bytes(m) - 1)
    assert_same(run(m, [BASE, BASE], 2, cache), run(m, [BASE, BASE], 2))
    assert (cache.stats()["blocks"], cache.stats()["hit_tokens"], cache.stats()["bytes"]) == (0, 0, 0)


def test_sliding_window_model_is_refused_with_a_clear_error():
    m = model(sliding_window=8)
    with pytest.raises(LMStackError, match="sliding-window.*--no-prefix-cache"):
        ContinuousBatcher(m, prefix_cache=PrefixCache())
    from lmstack.serve.state import make_prefix_cache
    assert make_prefix_cache(m, 256) is None  # the server turns it off for such models instead
    assert isinstance(make_prefix_cache(model(), 1), PrefixCache) and make_prefix_cache(model(), None) is None


def test_background_batcher_passes_the_cache_through():
    m = model()
    cache = PrefixCache(block_tokens=BT)
    bg = BackgroundBatcher(m, max_batch=2, prefix_cache=cache)
    try:
        sp = SamplingParams(max_new_tokens=3, temperature=0, stop_at_eos=False)
        for p in (BASE, BASE + [1]):
            list(bg.submit(p, sp))
    finally:
        bg.close()
    assert bg.core.prefix_cache is cache and cache.stats()["hit_tokens"] == 40


# ---- the server ----------------------------------------------------------------------------------------------
TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs,\n"


@pytest.fixture(scope="module")
def char_lm():
    import lmstack
    from lmstack.tokenizer import train_char
    tok = train_char([TEXT], special_tokens=["<eos>"], byte_fallback=False)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**llama_cfg_dict(vocab_size=64, block_size=256))).eval()
    assert tok.vocab_size <= 64
    return lmstack.LM(m, tok)


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def test_server_metrics_report_prefix_cache_hits(char_lm):
    httpx = pytest.importorskip("httpx")
    from lmstack.serve import create_app
    system = (TEXT * 3)[:200]
    prompts = [system + "which fox?", system + "what dog? "]
    srv, th, url = start_server(create_app(char_lm, "tiny", max_batch=2))
    try:
        texts = []
        for p in prompts:
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 4,
                                                          "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
        text = httpx.get(url + "/metrics").text
    finally:
        srv.should_exit = True
        th.join(timeout=10)
    assert texts == [char_lm.generate(p, max_new_tokens=4, temperature=0) for p in prompts]
    ids = [char_lm.prompt_ids(p) for p in prompts]
    common = next(i for i, (x, y) in enumerate(zip(*ids)) if x != y)
    bt = PrefixCache().block_tokens
    hits = (min(common, len(ids[1]) - 1) // bt) * bt  # the second prompt's shared whole blocks
    assert hits == 192  # 202 shared characters: 12 blocks of 16
    assert metric(text, "lmstack_prefix_cache_enabled") == 1
    assert metric(text, "lmstack_prefix_cache_lookup_tokens_total") == len(ids[0]) + len(ids[1])
    assert metric(text, "lmstack_prefix_cache_hit_tokens_total") == hits
    assert metric(text, "lmstack_prefix_cache_hit_rate") == pytest.approx(hits / (len(ids[0]) + len(ids[1])))
    assert metric(text, "lmstack_prefix_cache_bytes") == metric(text, "lmstack_prefix_cache_blocks") * \
        2 * 2 * 2 * bt * 8 * 4  # blocks x (K, V) x layers x kv heads x block tokens x head dim x float32
    assert metric(text, "lmstack_prefix_cache_evictions_total") == 0


def test_server_without_prefix_cache_says_so(char_lm):
    from lmstack.serve import create_app
    app = create_app(char_lm, "tiny", max_batch=1, prefix_cache_mb=None)
    try:
        assert app.state.server.engine.core.prefix_cache is None
        text = app.state.metrics.render(0, prefix=None)
        assert metric(text, "lmstack_prefix_cache_enabled") == 0 and "prefix_cache_hit" not in text
    finally:
        app.state.server.close()


def test_insert_from_an_offset_layout_equals_the_plain_one():
    """`insert(start=, offset=)` (the eval's rows: cached prefix blocks, pads, then the row's own tokens) stores the
    same blocks as a slot = position insert, and `match_len` predicts what `lookup` serves without counting it."""
    torch.manual_seed(0)
    ids = list(range(100, 170))                                  # 70 tokens: 4 whole 16-token blocks
    k = [torch.randn(2, 70, 4) for _ in range(3)]
    v = [torch.randn(2, 70, 4) for _ in range(3)]
    plain, shifted = PrefixCache(), PrefixCache()
    plain.insert(ids, k, v)
    shifted.insert(ids[:40], k, v)                               # the first 2 blocks, as lookup would serve them
    assert shifted.match_len(ids) == 32 and shifted.stats()["lookups"] == 0
    pad = 9                                                      # row layout: [32 cached | 9 pads | own 38 tokens]
    ks = [torch.cat([t[:, :32], torch.zeros(2, pad, 4), t[:, 32:]], dim=1) for t in k]
    vs = [torch.cat([t[:, :32], torch.zeros(2, pad, 4), t[:, 32:]], dim=1) for t in v]
    assert shifted.insert(ids, ks, vs, start=32, offset=32 + pad) == 2
    a, b = plain.lookup(ids + [1]), shifted.lookup(ids + [1])
    assert a[0] == b[0] == 64
    assert all(torch.equal(x, y) for x, y in zip(a[1] + a[2], b[1] + b[2]))
    with pytest.raises(LMStackError, match="whole number"):
        shifted.insert(ids, ks, vs, start=5)
