"""Sliding-window attention (Mistral `sliding_window`, Qwen2 `use_sliding_window` + `max_window_layers`, per-layer
`layer_types`): full forward, cached decoding and training past the window, against transformers' own models."""
from __future__ import annotations

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.convert.hf import hf_config_to_model_config, load_hf
from lmstack.errors import ConfigError, LMStackError
from lmstack.generate import SamplingParams, generate
from lmstack.models.kv_cache import make_cache
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
