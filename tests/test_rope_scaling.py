"""RoPE scaling (linear / dynamic NTK / YaRN / Llama 3) against transformers, on sequences longer than the length
the model was trained at; export keeps the scaling."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from lmstack.config import ModelConfig  # noqa: E402
from lmstack.convert.hf import export_hf, hf_config_to_model_config, load_hf  # noqa: E402
from lmstack.errors import LMStackError  # noqa: E402
from lmstack.models.kv_cache import KVCache  # noqa: E402
from lmstack.models.transformer import Transformer  # noqa: E402

ORIG = 32  # the "pretrained" context length; every comparison runs on T = 48 > ORIG
T = 48
# head_dim 16 (theta 1e4): wavelengths 6.3, 19.9, 62.8, ... cover llama3's high / medium / low bands for ORIG=32
BASE = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=0)
CASES = {
    "linear": (ORIG * 2, {"rope_type": "linear", "factor": 2.0}),
    "dynamic": (ORIG, {"rope_type": "dynamic", "factor": 2.0}),
    "yarn": (ORIG * 4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG}),
    "yarn_params": (ORIG * 4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG,
                               "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5}),
    "yarn_attention_factor": (ORIG * 4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG,
                                         "attention_factor": 1.3}),
    "llama3": (ORIG * 4, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": ORIG}),
}


def _hf_llama(case: str):
    max_pos, rope = CASES[case]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**BASE, max_position_embeddings=max_pos,
                                   rope_parameters={**rope, "rope_theta": 10000.0})
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _ids(length: int = T, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_rope_scaling_matches_transformers_past_trained_length(case, tmp_path):
    hf_model = _hf_llama(case)
    hf_model.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    kind = CASES[case][1]["rope_type"]
    assert model.config.rope_scaling["type"] == kind
    x = _ids()
    with torch.no_grad():
        ref = hf_model(input_ids=x).logits
        out = model(x)
    assert (ref - out).abs().max().item() <= 1e-4
    # incremental decoding with the KV cache past the trained length: same logits as transformers' own cache
    # (for dynamic NTK both recompute the base from the length reached so far, step by step)
    with torch.no_grad():
        cache = KVCache.for_model(model, 1, T + 4)
        hf_out = hf_model(input_ids=x[:, :ORIG - 2], use_cache=True)
        model(x[:, :ORIG - 2], cache=cache, pos=0)
        past = hf_out.past_key_values
        for p in range(ORIG - 2, T):
            step = hf_model(input_ids=x[:, p:p + 1], cache=past, use_cache=True)
            past = step.past_key_values
            mine = model(x[:, p:p + 1], cache=cache, pos=p)
            assert (step.logits - mine).abs().max().item() <= 1e-4, p


@pytest.mark.parametrize("case", list(CASES))
def test_rope_scaling_export_roundtrip(case, tmp_path):
    hf_model = _hf_llama(case)
    hf_model.save_pretrained(tmp_path / "in")
    model, _ = load_hf(tmp_path / "in")
    export_hf(model, None, tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    want = CASES[case][1]
    assert exported["rope_parameters"]["rope_type"] == want["rope_type"]
    for k, v in want.items():
        if k != "rope_type":
            assert exported["rope_parameters"][k] == v, k
    assert exported["max_position_embeddings"] == CASES[case][0]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = _ids(seed=5)
    with torch.no_grad():
        assert (back(input_ids=x).logits - model(x)).abs().max().item() <= 1e-4
    again, _ = load_hf(tmp_path / "out")
    assert again.config.rope_scaling == model.config.rope_scaling
    assert again.config.block_size == model.config.block_size


def test_dynamic_extends_block_size_and_keeps_short_sequences_unscaled():
    hf = {**BASE, "model_type": "llama", "max_position_embeddings": ORIG,
          "rope_scaling": {"type": "dynamic", "factor": 4.0}, "rope_theta": 10000.0}
    cfg = hf_config_to_model_config(hf)
    assert cfg.block_size == 4 * ORIG
    assert cfg.rope_scaling == {"type": "dynamic", "factor": 4.0, "original_max_position_embeddings": ORIG}
    torch.manual_seed(0)
    scaled = Transformer(cfg).eval()
    plain = Transformer(ModelConfig(**{**cfg.to_dict(), "rope_scaling": None})).eval()
    plain.load_state_dict(scaled.state_dict())
    x = _ids(ORIG)
    with torch.no_grad():  # within the trained length dynamic NTK is plain RoPE
        assert torch.equal(scaled(x), plain(x))


def test_rope_scaling_bad_configs_raise():
    hf = {**BASE, "model_type": "llama", "max_position_embeddings": 64, "rope_theta": 10000.0}
    with pytest.raises(LMStackError, match="longrope"):
        hf_config_to_model_config({**hf, "rope_parameters": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(LMStackError, match="low_freq_factor"):
        hf_config_to_model_config({**hf, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
