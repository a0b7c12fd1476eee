"""The Transformer: causality, KV cache, generation with/without cache, learning, parameter accounting, init,
optimizer groups, dropout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import llama_cfg_dict, tiny_cfg_dict
from lmstack.config import ModelConfig, preset
from lmstack.errors import ConfigError
from lmstack.generate import SamplingParams, generate
from lmstack.models import KVCache, Transformer

FAMILIES = {"gpt2": tiny_cfg_dict, "llama": llama_cfg_dict}


def build(family: str, seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**FAMILIES[family](**over))).eval()


def test_llama_fixture_is_really_llama_style():
    m = build("llama")
    assert m.pos_emb is None and hasattr(m, "rope_cos")
    assert isinstance(m.norm_f, torch.nn.RMSNorm)
    assert m.blocks[0].mlp.gated
    assert m.blocks[0].attn.n_kv == 2 and m.blocks[0].attn.n_head == 4
    assert m.lm_head.weight.data_ptr() != m.tok_emb.weight.data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_causality_future_tokens_do_not_change_past_logits(family):
    m = build(family)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, 32), generator=g)
    ref = m(x)
    for t in (0, 5, 17, 31):
        y = x.clone()
        y[:, t:] = torch.randint(0, 64, (2, 32 - t), generator=g)
        y[:, t] = (x[:, t] + 1) % 64  # make sure position t really changes
        out = m(y)
        torch.testing.assert_close(out[:, :t], ref[:, :t], atol=1e-5, rtol=1e-5)
        # and the change is visible from position t on (the test can detect leakage at all)
        assert (out[:, t] - ref[:, t]).abs().max() > 1e-4


@torch.no_grad()
def test_bidirectional_encoder_is_not_causal():
    m = build("gpt2", causal=False)
    x = torch.randint(0, 64, (1, 16))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 64
    assert (m(x)[0, 0] - m(y)[0, 0]).abs().max() > 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_kv_cache_prefill_then_decode_matches_full_forward(family):
    m = build(family)
    x = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(2))
    full = m(x)
    cache = KVCache.for_model(m, batch=2)
    pieces = [m(x[:, :7], cache=cache, pos=0)]
    for t in range(7, 30):
        pieces.append(m(x[:, t:t + 1], cache=cache, pos=t))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_kv_cache_chunked_prefill_matches_full_forward(family):
    """Chunks with pos > 0 and T > 1 need the offset causal mask."""
    m = build(family)
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(3))
    full = m(x)
    cache = KVCache.for_model(m, batch=2)
    bounds = [0, 5, 6, 13, 20, 21, 32]
    pieces = [m(x[:, a:b], cache=cache, pos=a) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_raises():
    m = build("gpt2")
    cache = KVCache.for_model(m, batch=1, max_len=8)
    with pytest.raises(ValueError, match="overflow"):
        m(torch.zeros(1, 9, dtype=torch.long), cache=cache, pos=0)


def test_learned_positions_reject_too_long_input():
    m = build("gpt2")
    with pytest.raises(ValueError, match="block_size=32"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_rope_model_extends_tables_beyond_block_size():
    m = build("llama")
    with torch.no_grad():
        out = m(torch.zeros(1, 40, dtype=torch.long))
        assert out.shape == (1, 40, 64)
        # the first 32 positions are unaffected by the longer table
        torch.testing.assert_close(out[:, :32], m(torch.zeros(1, 32, dtype=torch.long)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0, seed=7),
                                    dict(temperature=0.8, top_k=10, top_p=0.9, seed=123)],
                         ids=["greedy", "sampled", "topk-topp"])
def test_generate_cached_and_uncached_give_identical_tokens(family, params):
    m = build(family)
    sp = SamplingParams(max_new_tokens=20, stop_at_eos=False, **params)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    a = generate(m, prompt, sp, use_cache=True)
    b = generate(m, prompt, sp, use_cache=False)
    assert len(a) == 20
    assert a == b


def test_generate_greedy_is_manual_argmax_loop():
    m = build("llama")
    prompt = [5, 6, 7]
    out = generate(m, prompt, SamplingParams(max_new_tokens=10, temperature=0, stop_at_eos=False))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_overfits_one_batch(family):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**FAMILIES[family]())).train()
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(5))
    inp, tgt = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(300):
        loss = F.cross_entropy(m(inp).reshape(-1, 64), tgt.reshape(-1))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5  # ~ln(64) at init
    assert loss.item() < 0.05


PARAM_CASES = {
    "gpt2-tied": tiny_cfg_dict(),
    "gpt2-untied": tiny_cfg_dict(tie_embeddings=False),
    "gpt2-nobias": tiny_cfg_dict(bias=False),
    "gpt2-relu-ffn": tiny_cfg_dict(activation="relu", intermediate_size=48),
    "llama-untied": llama_cfg_dict(),
    "llama-tied": llama_cfg_dict(tie_embeddings=True),
    "llama-mha": llama_cfg_dict(n_kv_head=None),
    "qwen2-qkv-bias": llama_cfg_dict(qkv_bias=True),
    "llama-bias": llama_cfg_dict(bias=True),
    "nopos-layernorm": tiny_cfg_dict(pos_emb="none"),
}


@pytest.mark.parametrize("name", PARAM_CASES)
def test_num_params_formula_matches_module(name):
    cfg = ModelConfig(**PARAM_CASES[name])
    m = Transformer(cfg)
    # count unique tensors independently of Transformer.num_params()
    unique = {p.data_ptr(): p.numel() for p in m.parameters()}
    assert cfg.num_params() == sum(unique.values()) == m.num_params()
    emb = m.tok_emb.weight.numel() + (m.pos_emb.weight.numel() if m.pos_emb is not None else 0)
    assert cfg.num_params(include_embeddings=False) == sum(unique.values()) - emb


def test_gpt2_small_parameter_count():
    assert preset("gpt2-small").num_params() == 124_439_808


def test_gpt2_init_residual_projection_std():
    L = 4
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**tiny_cfg_dict(n_layer=L, n_embd=128, n_head=4, vocab_size=256)))
    want = 0.02 / math.sqrt(2 * L)
    for b in m.blocks:
        for lin in (b.attn.proj, b.mlp.proj):
            assert lin.weight.std().item() == pytest.approx(want, rel=0.05)
            assert abs(lin.weight.mean().item()) < 3 * want / math.sqrt(lin.weight.numel()) + 1e-4
            assert torch.count_nonzero(lin.bias) == 0
        for lin in (b.attn.qkv, b.mlp.fc):
            assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05)
            assert torch.count_nonzero(lin.bias) == 0
    assert m.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.pos_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_optimizer_groups_no_decay_on_norms_biases_embeddings(family):
    m = build(family, bias=True)
    decay, no_decay = m.configure_optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    dec = {id(p) for p in decay["params"]}
    nodec = {id(p) for p in no_decay["params"]}
    assert not dec & nodec
    names = {}
    for n, p in m.named_parameters():  # named_parameters de-duplicates tied weights
        names[id(p)] = n
    assert dec | nodec == set(names)  # every parameter exactly once
    for pid, n in names.items():
        is_norm = "norm" in n
        is_bias = n.endswith(".bias")
        is_emb = n.startswith("tok_emb") or n.startswith("pos_emb")
        if is_norm or is_bias or is_emb:
            assert pid in nodec, n
        else:
            assert pid in dec, n
    if not m.config.tie_embeddings:
        assert id(m.lm_head.weight) in dec
    # AdamW accepts the groups
    torch.optim.AdamW(m.configure_optimizer_groups(0.1), lr=1e-3)


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**tiny_cfg_dict(dropout=0.5)))
    torch.manual_seed(0)
    ref = Transformer(ModelConfig(**tiny_cfg_dict(dropout=0.0))).eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randint(0, 64, (2, 16))
    m.train()
    a, b = m(x), m(x)
    assert (a - b).abs().max() > 1e-3
    m.eval()
    with torch.no_grad():
        c, d = m(x), m(x)
        torch.testing.assert_close(c, d, atol=0, rtol=0)
        torch.testing.assert_close(c, ref(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(n_kv_head=3), dict(dropout=1.0),
                                 dict(pos_emb="alibi"), dict(n_layer=0), dict(pos_emb="rope", n_embd=30, n_head=10)])
def test_model_config_validation(bad):
    with pytest.raises(ConfigError):
        ModelConfig(**tiny_cfg_dict(**bad))


def test_model_config_json_round_trip(tmp_path):
    cfg = ModelConfig(**llama_cfg_dict(rope_scaling={"type": "linear", "factor": 2.0}))
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layers": 3})
