"""LoRA: config parsing, injection (identity at init, only adapters trainable), merge parity, adapter files."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import llama_cfg_dict, tiny_cfg_dict
from lmstack.config import ModelConfig, preset
from lmstack.errors import ConfigError, LMStackError
from lmstack.models.lora import (LoRAConfig, LoRALinear, apply_lora, load_adapter, lora_disabled, lora_parameters,
                                 lora_state_dict, merge_lora, save_adapter, trainable_summary)
from lmstack.models.transformer import Transformer

CFGS = {"llama": llama_cfg_dict(), "gpt2": tiny_cfg_dict()}


def _model(kind: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**CFGS[kind])).eval()


def _train_a_bit(model, x, steps: int = 3):
    opt = torch.optim.AdamW(lora_parameters(model), lr=3e-2)
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_parse_and_validate():
    c = LoRAConfig.parse("r=8,alpha=16,dropout=0.1,targets=q,k,v,o")
    assert (c.r, c.alpha, c.dropout, c.targets) == (8, 16.0, 0.1, ("q", "k", "v", "o"))
    assert c.scaling == 2.0
    assert LoRAConfig.parse("") == LoRAConfig()
    assert LoRAConfig.parse("targets=q_proj,v_proj,mlp").targets == ("q", "v", "gate", "up", "down")
    assert LoRAConfig(targets="all").targets == ("q", "k", "v", "o", "gate", "up", "down")
    with pytest.raises(ConfigError, match="unknown LoRA target"):
        LoRAConfig.parse("targets=q,zz")
    with pytest.raises(ConfigError, match="bad --lora item"):
        LoRAConfig.parse("rr=3")
    with pytest.raises(ConfigError, match="not a number"):
        LoRAConfig.parse("r=x")
    with pytest.raises(ConfigError, match="positive"):
        LoRAConfig(r=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_apply_is_identity_and_freezes_base(kind):
    m = _model(kind)
    x = torch.randint(0, 64, (2, 12))
    ref = m(x)
    targets = "all" if kind == "llama" else "q,k,v,o,up,down"
    apply_lora(m, LoRAConfig.parse(f"r=4,alpha=8,dropout=0,targets={targets}"))
    assert torch.equal(m(x), ref)  # B = 0 at init
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in lora_parameters(m)) == trainable_summary(m)["trainable"]
    assert isinstance(m.blocks[0].attn.qkv, LoRALinear)
    # base weights keep their state-dict names (checkpoints and resume see the same keys)
    assert "blocks.0.attn.qkv.weight" in m.state_dict()
    with pytest.raises(LMStackError, match="already has LoRA"):
        apply_lora(m, LoRAConfig())


def test_gelu_model_has_no_gate():
    with pytest.raises(ConfigError, match="do not exist"):
        apply_lora(_model("gpt2"), LoRAConfig(targets=("gate",)))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("targets", ["q,k,v,o", "q,v", "all"])
def test_merge_gives_identical_logits(kind, targets):
    if kind == "gpt2" and targets == "all":
        targets = "q,k,v,o,up,down"
    m = _model(kind)
    x = torch.randint(0, 64, (3, 16))
    apply_lora(m, LoRAConfig.parse(f"r=4,alpha=8,dropout=0.0,targets={targets}"))
    m.train()
    _train_a_bit(m, x)
    m.eval()
    assert any(p.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)  # adapters really changed
    with torch.no_grad():
        lora_logits = m(x)
        with lora_disabled(m):
            base_logits = m(x)
    assert (lora_logits - base_logits).abs().max() > 1e-3
    merge_lora(m)
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    assert all(type(mod.qkv) is torch.nn.Linear for mod in (b.attn for b in m.blocks))
    with torch.no_grad():
        merged = m(x)
    torch.testing.assert_close(merged, lora_logits, atol=1e-5, rtol=0)
    # the merged model's state dict is a plain checkpoint's
    assert set(m.state_dict()) == set(_model(kind).state_dict())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adapter_save_load_roundtrip(kind, tmp_path):
    m = _model(kind)
    x = torch.randint(0, 64, (2, 10))
    cfg = LoRAConfig.parse("r=4,alpha=8,dropout=0.0,targets=q,k,v,o")
    apply_lora(m, cfg)
    m.train()
    _train_a_bit(m, x)
    m.eval()
    with torch.no_grad():
        want = m(x)
    save_adapter(m, tmp_path / "ad", cfg, base_model="tiny")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 8
    assert sorted(meta["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    assert keys == set(lora_state_dict(m))
    if kind == "llama":  # PEFT names, shapes as separate q/k/v projections would have (GQA: k, v narrower)
        kb = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))[
            "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
        c = m.config
        assert kb.shape == (c.kv_heads * c.head_dim, 4)
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    fresh = _model(kind)  # same seed: same base weights
    load_adapter(fresh, tmp_path / "ad")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    # loading into a model that already has adapters overwrites them
    again = _model(kind)
    apply_lora(again, cfg)
    load_adapter(again, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), want, atol=0, rtol=0)


def test_adapter_mismatch_errors(tmp_path):
    m = _model("llama")
    apply_lora(m, LoRAConfig(r=4, targets=("q",)))
    save_adapter(m, tmp_path / "ad")
    deeper = Transformer(ModelConfig(**llama_cfg_dict(n_layer=1)))
    with pytest.raises(LMStackError, match="another model|other targets|deeper"):
        load_adapter(deeper, tmp_path / "ad")
    with pytest.raises(LMStackError, match="no LoRA adapter"):
        load_adapter(_model("llama"), tmp_path / "nothing")


def test_dropout_only_in_train_mode():
    m = _model("llama")
    apply_lora(m, LoRAConfig(r=4, dropout=0.5))
    assert not m.blocks[0].attn.qkv.training  # wrapping an eval-mode model keeps it in eval mode
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        for lin in (b.attn.qkv for b in m.blocks):
            for p in lin.lora_B.values():
                p.fill_(0.1)
        a, b = m.eval()(x), m(x)
    torch.testing.assert_close(a, b)


def test_smollm2_135m_r16_trains_well_under_2_percent():
    torch.manual_seed(0)
    m = Transformer(preset("smollm2-135m", block_size=64))
    apply_lora(m, LoRAConfig.parse("r=16,alpha=32,dropout=0.05,targets=q,k,v,o"))
    s = trainable_summary(m)
    # 30 layers x r=16 x (q: 576+576, k and v: 576+192 each, o: 576+576) = 1,843,200 of ~134.5M (1.35%)
    assert s["trainable"] == 30 * 16 * (576 + 576 + 2 * (576 + 192) + 576 + 576)
    assert s["percent"] < 2.0


def test_adapter_loads_in_peft(tmp_path):
    """A Llama adapter saved here loads with PEFT onto the Hugging Face export of the same base model and gives
    the same logits (skipped where peft is not installed; checked 2026-11-26 with peft 0.21 / transformers 5.17:
    max |diff| 1.7e-6)."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel
    from lmstack.convert.hf import export_hf
    m = Transformer(ModelConfig(**llama_cfg_dict(vocab_size=128, n_embd=64, intermediate_size=96)))
    export_hf(m, None, tmp_path / "hf")
    cfg = LoRAConfig.parse("r=4,alpha=8,dropout=0.0,targets=all")
    apply_lora(m, cfg)
    x = torch.randint(0, 128, (2, 16))
    m.train()
    _train_a_bit(m, x)
    save_adapter(m, tmp_path / "ad", cfg)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, m.eval()(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("targets", ["q,v", "q,k,v,o,gate,up,down", "k"])
def test_factors_exact_cached_without_grad_and_invalidated_by_updates(targets, monkeypatch):
    """LoRALinear builds its stacked A / block-diagonal B in one op (B @ A == delta_weight / scaling exactly),
    caches them while no gradient is needed, and an optimizer step (or a load) invalidates the cache."""
    from lmstack.models import kernels
    # the no-grad vs grad comparison below is about the LoRA factors: keep the native fused RMSNorm (used without
    # grad once an earlier test loaded the quantized-matmul extension; ~1e-7 apart from torch's) out of it
    monkeypatch.setattr(kernels, "loaded", lambda: None)
    m = _model("llama")
    apply_lora(m, LoRAConfig.parse(f"r=4,alpha=8,dropout=0,targets={targets}"))
    for p in lora_parameters(m):
        torch.nn.init.normal_(p, std=0.1)
    layers = [l for _, l in m.named_modules() if isinstance(l, LoRALinear)]

    def check_exact():
        for l in layers:
            A, B = l._factors()
            torch.testing.assert_close(B @ A * l.scaling, l.delta_weight(), atol=1e-6, rtol=0)
    check_exact()
    multi = [l for l in layers if not l._single]
    assert multi
    with torch.no_grad():
        first = [l._factors() for l in multi]
        again = [l._factors() for l in multi]
    assert all(a[1] is b[1] for a, b in zip(first, again))             # cached: no rebuild
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = m(x)
    m(x).float().sum().backward()                                      # gradients flow through the built B
    assert all(p.grad is not None for p in lora_parameters(m))
    assert all(float(l.lora_B[n].grad.abs().sum()) > 0 for l in multi for n in l.segments)
    _train_a_bit(m, x, steps=2)
    with torch.no_grad():
        after = m(x)
        assert not torch.equal(before, after)
        assert all(l._factors()[1] is not f[1] for l, f in zip(multi, first))  # the update invalidated the cache
    check_exact()
    # the cached no-grad forward equals the training-mode (grad) forward exactly
    with torch.no_grad():
        cached = m(x)
    torch.testing.assert_close(m(x).detach(), cached, atol=0, rtol=0)
