"""Sliding-window attention (Mistral `sliding_window`, Qwen2 `use_sliding_window` + `max_window_layers`, per-layer
`layer_types`): full forward, cached decoding and training past the window, against transformers' own models."""
from __future__ import annotations

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.convert.hf import hf_config_to_model_config, load_hf
from lmstack.errors import ConfigError, LMStackError
from lmstack.generate import SamplingParams, beam_search, generate, speculative_generate
from lmstack.models.kv_cache import KVCache, RollingKVCache, make_cache
from lmstack.models.transformer import Transformer

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=0, rope_theta=10000.0)


def _mistral(window: int):
    return transformers.MistralForCausalLM(transformers.MistralConfig(**BASE, num_hidden_layers=2,
                                                                      sliding_window=window))


def _qwen2_max_window_layers(window: int):  # layers >= max_window_layers slide
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**BASE, num_hidden_layers=3, use_sliding_window=True,
                                                                  sliding_window=window, max_window_layers=1))


def _qwen2_alternating(window: int):  # Gemma-2/3 style alternation through layer_types
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**BASE, num_hidden_layers=4, use_sliding_window=True,
                                                                  sliding_window=window, layer_types=types))


MODELS = {"mistral-w4": (_mistral, 4), "mistral-w16": (_mistral, 16), "qwen2-max-window-w6": (_qwen2_max_window_layers, 6),
          "qwen2-layer-types-w8": (_qwen2_alternating, 8)}


def _pair(name, tmp_path):
    make, window = MODELS[name]
    torch.manual_seed(0)
    hf = make(window).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so attention is far from uniform
        for p in hf.parameters():
            p.mul_(3.0) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    return hf, model, window


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_greedy_tokens_match_transformers_past_the_window(name, tmp_path):
    hf, model, window = _pair(name, tmp_path)
    assert model.config.sliding_window == window and model.config.block_size == 256  # not capped at the window
    prompt = torch.randint(2, 128, (1, 44), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = hf(prompt).logits, model(prompt)
        assert (want - got).abs().max().item() <= 1e-4
        # the window matters: plain causal attention gives other logits
        plain = Transformer(ModelConfig(**{**model.config.to_dict(), "sliding_window": None, "layer_types": None}))
        plain.load_state_dict(model.state_dict())
        assert (plain.eval()(prompt) - want).abs().max().item() > 1e-2
        ref = hf.generate(prompt, max_new_tokens=40, do_sample=False, min_new_tokens=40, pad_token_id=0)[0, 44:]
    ours = generate(model, prompt[0].tolist(), SamplingParams(temperature=0, max_new_tokens=40, min_new_tokens=40),
                    eos_id=None)
    assert ours == ref.tolist()  # cached decoding past the window, token for token


def test_cached_chunks_equal_the_full_forward(tmp_path):
    _, model, window = _pair("qwen2-layer-types-w8", tmp_path)
    x = torch.randint(2, 128, (2, 37), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(x)
        cache = make_cache(model, 2, 64)
        parts = [model(x[:, :11], cache=cache, pos=0), model(x[:, 11:30], cache=cache, pos=11)]
        parts += [model(x[:, t:t + 1], cache=cache, pos=t) for t in range(30, 37)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_training_past_the_window_matches_transformers_gradients(tmp_path):
    hf, model, _ = _pair("mistral-w4", tmp_path)
    x = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(7))
    hf.train()
    model.train()
    loss_hf = hf(x, labels=x).loss
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1))
    assert abs(loss.item() - loss_hf.item()) < 1e-5
    loss.backward()
    loss_hf.backward()
    g_hf = hf.model.layers[0].mlp.down_proj.weight.grad
    g = model.blocks[0].mlp.proj.weight.grad
    assert torch.allclose(g, g_hf, atol=1e-6)


def test_config_mapping_and_errors():
    m = hf_config_to_model_config({**BASE, "model_type": "qwen2", "num_hidden_layers": 3, "use_sliding_window": True,
                                   "sliding_window": 6, "max_window_layers": 2})
    assert m.layer_types == ["full", "full", "sliding"] and [m.layer_window(i) for i in range(3)] == [None, None, 6]
    off = hf_config_to_model_config({**BASE, "model_type": "qwen2", "num_hidden_layers": 3,
                                     "use_sliding_window": False, "sliding_window": 6})
    assert off.sliding_window is None
    with pytest.raises(LMStackError, match="chunked_attention"):
        hf_config_to_model_config({**BASE, "model_type": "qwen2", "num_hidden_layers": 2, "sliding_window": 4,
                                   "layer_types": ["chunked_attention", "full_attention"]})
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig(n_layer=2, sliding_window=4, layer_types=["sliding"])
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelConfig(n_layer=2, layer_types=["sliding", "full"])
    with pytest.raises(ConfigError, match="causal"):
        ModelConfig(n_layer=2, sliding_window=4, causal=False)


def test_export_round_trip_keeps_the_window(tmp_path):
    from lmstack.convert.hf import export_hf
    hf, model, _ = _pair("mistral-w4", tmp_path / "src")
    export_hf(model, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.model_type == "mistral" and back.config.sliding_window == 4
    x = torch.randint(2, 128, (1, 30), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max().item() <= 1e-4


# --- the rolling KV cache (kv_cache.RollingKVCache): sliding layers keep only their window ---------------------------

def _greedy(model, prompt: torch.Tensor, cache, n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by hand on `cache`: the n tokens and the (n, V) logits each was chosen from."""
    logits, toks, rows = model(prompt, cache=cache, pos=0)[0, -1], [], []
    for i in range(n):
        rows.append(logits)
        toks.append(int(logits.argmax()))
        logits = model(torch.tensor([[toks[-1]]]), cache=cache, pos=prompt.shape[1] + i)[0, -1]
    return toks, torch.stack(rows)


@pytest.mark.parametrize("name", ["mistral-w4", "qwen2-max-window-w6", "qwen2-layer-types-w8"])
def test_rolling_cache_decodes_like_the_full_cache_and_transformers(name, tmp_path):
    hf, model, window = _pair(name, tmp_path)
    prompt = torch.randint(2, 128, (1, 40), generator=torch.Generator().manual_seed(11))
    rolling, full = make_cache(model, 1, 80), make_cache(model, 1, 80, rolling=False)
    assert isinstance(rolling, RollingKVCache) and type(full) is KVCache
    with torch.no_grad():
        toks, logits = _greedy(model, prompt, rolling, 40)
        toks_full, logits_full = _greedy(model, prompt, full, 40)
        want = hf(torch.cat([prompt, torch.tensor([toks])], dim=1)).logits[0, 39:79]
    assert toks == toks_full and (logits - logits_full).abs().max().item() <= 1e-5
    assert (logits - want).abs().max().item() <= 1e-4 and want.argmax(-1).tolist() == toks  # transformers' greedy
    sliding = [i for i in range(model.config.n_layer) if model.config.layer_window(i) is not None]
    assert sliding and all(rolling.k[i].shape[2] == window for i in sliding)  # the ring really was this small
    sp = SamplingParams(temperature=0, max_new_tokens=40, min_new_tokens=40)
    assert generate(model, prompt[0].tolist(), sp, eos_id=None) == toks  # the engine's default cache rolls


def test_rolling_cache_memory_is_bounded_by_the_window_for_sliding_layers_only(tmp_path):
    _, model, window = _pair("qwen2-layer-types-w8", tmp_path)  # layers: sliding, full, sliding, full
    cache, lengths = make_cache(model, 1, 70), {i: [] for i in range(4)}
    update = cache.update

    def spy(layer, k, v, pos):
        out = update(layer, k, v, pos)
        lengths[layer].append((pos, k.shape[2], out[0].shape[2]))
        return out
    cache.update = spy
    x = torch.randint(2, 128, (1, 70), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        for a, b in [(0, 5), (5, 25), (25, 26)] + [(t, t + 1) for t in range(26, 70)]:
            model(x[:, a:b], cache=cache, pos=a)
    for layer in (0, 2):  # sliding: the past part never exceeds window - 1, the storage is the window
        assert all(n == min(pos, window - 1) + T for pos, T, n in lengths[layer])
        assert max(n for _, T, n in lengths[layer] if T == 1) == window and cache.k[layer].shape[2] == window
    for layer in (1, 3):  # full attention: every position, growing to the whole sequence
        assert [n for _, _, n in lengths[layer]] == [5, 25] + list(range(26, 71))
        assert cache.k[layer].shape[2] == 70
    full = make_cache(model, 1, 70, rolling=False).nbytes()
    assert cache.nbytes() == full // 2 + full // 2 * window // 70  # half the layers hold 8 of 70 positions


@pytest.mark.parametrize("chunk", [3, 8, 13, 37])  # smaller than, equal to, larger than the window (8), all at once
def test_rolling_cache_chunked_prefill_is_exact(chunk, tmp_path):
    _, model, window = _pair("qwen2-layer-types-w8", tmp_path)
    x = torch.randint(2, 128, (2, 45), generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        want = model(x)
        outs = []
        for cache in (make_cache(model, 2, 45), make_cache(model, 2, 45, rolling=False)):
            parts = [model(x[:, a:min(a + chunk, 37)], cache=cache, pos=a) for a in range(0, 37, chunk)]
            parts += [model(x[:, t:t + 1], cache=cache, pos=t) for t in range(37, 45)]  # then decode past it
            outs.append(torch.cat(parts, dim=1))
    assert (outs[0] - want).abs().max().item() <= 1e-5 and (outs[0] - outs[1]).abs().max().item() <= 1e-5


def test_rolling_cache_rewinds_within_its_margin_and_refuses_beyond(tmp_path):
    _, model, window = _pair("mistral-w4", tmp_path)
    x = torch.randint(2, 128, (1, 40), generator=torch.Generator().manual_seed(19))
    cache = KVCache.for_model(model, 1, 40, rolling=True, rewind=3)
    assert isinstance(cache, RollingKVCache) and cache.k[0].shape[2] == window + 3
    with torch.no_grad():
        want = model(x)
        model(x[:, :30], cache=cache, pos=0)
        back = model(x[:, 26:34], cache=cache, pos=26)  # 4 positions back: the ring still holds 23..29
        assert (back - want[:, 26:34]).abs().max().item() <= 1e-5
        with pytest.raises(LMStackError, match="rewind"):
            model(x[:, 20:21], cache=cache, pos=20)
        with pytest.raises(LMStackError, match="skipping"):
            model(x[:, 36:37], cache=cache, pos=36)


def test_speculative_and_beam_search_with_rolling_caches(tmp_path, monkeypatch):
    _, target, _ = _pair("qwen2-layer-types-w8", tmp_path / "t")
    _, draft, _ = _pair("mistral-w4", tmp_path / "d")  # a different model: many rejected drafts, many rewinds
    prompt = torch.randint(2, 128, (30,), generator=torch.Generator().manual_seed(23)).tolist()
    sp = SamplingParams(temperature=0, max_new_tokens=30, min_new_tokens=30)
    ref = generate(target, prompt, sp, eos_id=None)
    for k in (1, 4):
        res = speculative_generate(target, draft, prompt, sp, num_draft_tokens=k, eos_id=None)
        assert res.tokens == ref and res.accepted < res.drafted
    rolled = beam_search(target, prompt, num_beams=3, max_new_tokens=20, num_return_sequences=3)
    import lmstack.generate.beam as beam
    monkeypatch.setattr(beam, "make_cache", lambda m, b, n: make_cache(m, b, n, rolling=False))
    full = beam_search(target, prompt, num_beams=3, max_new_tokens=20, num_return_sequences=3)
    assert [h.tokens for h in rolled] == [h.tokens for h in full]
    assert all(abs(a.score - b.score) <= 1e-5 for a, b in zip(rolled, full))
