"""Training-memory and KV-cache estimates (lmstack.scaling.memory) against what real tiny models allocate: weights,
gradients and optimizer state to the byte, KV cache to the byte, activations against the storages autograd saves."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from lmstack.cli import main
from lmstack.config import ModelConfig, describe, preset
from lmstack.errors import ConfigError
from lmstack.models.kv_cache import KVCache
from lmstack.models.transformer import Transformer
from lmstack.scaling import activation_bytes, memory_report, param_counts, state_bytes, training_memory
from lmstack.train.config import TrainConfig
from lmstack.train.trainer import build_optimizer

B, T = 2, 64
#: activation estimates must land within this fraction of the measured saved-tensor bytes (exact at torch 2.13 CPU;
#: the slack covers kernels that save a little more or less in other torch versions, e.g. a fused RMSNorm)
TOL = 0.10
_BASE = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)
_LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
CONFIGS = {
    "gpt2-tied": ModelConfig(**_BASE, activation="gelu_tanh"),
    "llama-gqa-untied": ModelConfig(**_BASE, **_LLAMA, n_kv_head=2, tie_embeddings=False),
    "llama-mha": ModelConfig(**_BASE, **_LLAMA),
    "mqa-qkvbias-relu": ModelConfig(**_BASE, n_kv_head=1, qkv_bias=True, activation="relu"),
    "bert": ModelConfig(**_BASE, causal=False, norm_position="post", embedding_norm=True, type_vocab_size=2),
}


def _model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg).train()


def _batch(cfg: ModelConfig, batch: int = B, seq: int = T):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, cfg.vocab_size, (batch, seq), generator=g),
            torch.randint(0, cfg.vocab_size, (batch, seq), generator=g))


def _loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))  # as masked_lm_loss does


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class SavedBytes:
    """Saved-tensor hook: unique storage bytes autograd saves while active, parameters and buffers excluded (their
    storage is the model's, not an activation). Holds a reference to every storage so addresses are never reused."""

    def __init__(self, model):
        self.skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.seen: dict[int, torch.UntypedStorage] = {}
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip:
            self.seen.setdefault(s.data_ptr(), s)
        return t

    @property
    def total(self) -> int:
        return sum(s.nbytes() for s in self.seen.values())

    def __enter__(self):
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


# ---- (1) weights, gradients, optimizer state: exact ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_counts_match_the_model(name):
    cfg = CONFIGS[name]
    m = _model(cfg)
    params = list(m.parameters())  # tied weights once
    pc = param_counts(cfg)
    assert pc.total == sum(p.numel() for p in params) == cfg.num_params()
    assert pc.tensors == len(params)
    assert pc.block == sum(p.numel() for p in m.blocks[0].parameters())
    assert pc.block_tensors == len(list(m.blocks[0].parameters()))
    block_ids = {id(p) for p in m.blocks.parameters()}
    assert pc.root == sum(p.numel() for p in params if id(p) not in block_ids)
    assert pc.block_matrices * cfg.n_layer == sum(p.numel() for p in params if getattr(p, "muon_ok", False))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "rmsprop", "muon"])
@pytest.mark.parametrize("name", ["gpt2-tied", "llama-gqa-untied"])
def test_state_bytes_equal_weights_grads_and_optimizer_state(name, optimizer):
    """The repo's own optimizers (Trainer.build_optimizer), one backward and one step. Scalar `step` tensors are
    counted (4 B each: AdamW, RMSprop, Muon's AdamW part); SGD has none."""
    cfg = CONFIGS[name]
    m = _model(cfg)
    est = state_bytes(cfg, optimizer=optimizer)
    assert est["weights"] == _nbytes(m.parameters())
    x, y = _batch(cfg)
    _loss(m, x, y).backward()
    assert est["gradients"] == _nbytes(p.grad for p in m.parameters())
    opt = build_optimizer([p for p in m.parameters()], TrainConfig(optimizer=optimizer))
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert len(opt.state) == len(list(m.parameters()))
    assert est["optimizer_moments"] == _nbytes(t for t in state if t.dim() > 0)
    assert est["optimizer_steps"] == _nbytes(t for t in state if t.dim() == 0)
    assert est["master_weights"] == 0


def test_bf16_with_master_weights():
    """bf16 params and grads (2 B) + fp32 master copy (4 B); autocast over fp32 params has no master copy."""
    cfg = CONFIGS["llama-gqa-untied"]
    m = _model(cfg).to(torch.bfloat16)
    x, y = _batch(cfg)
    _loss(m, x, y).backward()
    est = state_bytes(cfg, "bfloat16", "adamw", master_weights=True)
    assert est["weights"] == _nbytes(m.parameters()) and est["gradients"] == _nbytes(p.grad for p in m.parameters())
    assert est["master_weights"] == _nbytes(p.float() for p in m.parameters())
    assert state_bytes(cfg, "bfloat16")["master_weights"] == 0
    assert state_bytes(cfg, "bfloat16")["weights"] == state_bytes(cfg)["weights"]


# ---- (2) KV cache: the bytes models/kv_cache.py allocates --------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2-tied", "llama-gqa-untied", "mqa-qkvbias-relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_equal_the_allocated_cache(name, dtype):
    cfg = CONFIGS[name]
    m = _model(cfg).to(dtype)
    cache = KVCache.for_model(m, batch=3, max_len=48)
    allocated = sum(t.untyped_storage().nbytes() for t in cache.k + cache.v)
    rep = memory_report(cfg, batch_size=3)
    per_token = rep["kv_cache"]["bytes_per_token"]["float32" if dtype == torch.float32 else "bfloat16"]
    assert allocated == cache.nbytes() == 3 * 48 * per_token
    assert per_token == 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * (4 if dtype == torch.float32 else 2)
    full = KVCache.for_model(m, batch=3)  # default length: the context window, the table's last row
    last = rep["kv_cache"]["rows"][-1]
    assert last["tokens"] == cfg.block_size
    assert last["float32" if dtype == torch.float32 else "bfloat16"] == full.nbytes()


# ---- (3) activations: estimate vs saved tensors ------------------------------------------------------------------
def _measure(cfg, autocast=False, math_attention=False, batch: int = B, seq: int = T):
    m = _model(cfg)
    x, y = _batch(cfg, batch, seq)
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    kern = sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
    with SavedBytes(m) as saved, ac, kern:
        _loss(m, x, y)
    return saved.total


@pytest.mark.parametrize("name", list(CONFIGS))
def test_activations_fp32_match_saved_tensors(name):
    cfg = CONFIGS[name]
    est = activation_bytes(cfg, B, T, device="cpu")["total"]  # T=64 on the CPU: attend's matmul path
    ratio = est / _measure(cfg)
    assert abs(ratio - 1) <= TOL, ratio


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-gqa-untied"])
def test_activations_bf16_autocast_match_saved_tensors(name):
    """Under autocast the saved storages also hold the bf16 copies of the weight matrices (a training_memory row)."""
    cfg = CONFIGS[name]
    copies = training_memory(cfg, B, T, "bfloat16")["none"]["autocast_copies"]
    est = activation_bytes(cfg, B, T, "bfloat16", device="cpu")["total"] + copies
    ratio = est / _measure(cfg, autocast=True)
    assert abs(ratio - 1) <= TOL, ratio
    assert activation_bytes(cfg, B, T, "bfloat16")["total"] < activation_bytes(cfg, B, T)["total"]


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-mha", "bert"])
@pytest.mark.parametrize("batch,seq,autocast", [(1, 64, False), (2, 160, False), (2, 160, True), (3, 32, True)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cpu_attention_paths_match_saved_tensors(name, batch, seq, autocast, dropout):
    """Both CPU attention paths: matmul + softmax for short sequences (B=1: q, k, v stay views; else bmm saves
    copies, plus the T x T probabilities) and the flash kernel beyond 128 queries (256 under bf16 autocast);
    with dropout always the matmul path, and every dropout keeps its noise tensor (CPU dropout is input * noise)."""
    cfg = dataclasses.replace(CONFIGS[name], block_size=256, dropout=dropout)
    dtype = "bfloat16" if autocast else "float32"
    copies = training_memory(cfg, batch, seq, dtype)["none"]["autocast_copies"] if autocast else 0
    est = activation_bytes(cfg, batch, seq, dtype, device="cpu")
    assert abs((est["total"] + copies) / _measure(cfg, autocast=autocast, batch=batch, seq=seq) - 1) <= TOL
    flash = activation_bytes(cfg, batch, seq, dtype)  # a GPU's flash kernel: no T x T scores
    matmul_path = dropout > 0 or seq <= (256 if autocast else 128)
    assert (est["per_layer"] - flash["per_layer"] >= batch * seq * cfg.n_head * (seq - 1) * 4) == matmul_path


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-gqa-untied"])
def test_eager_attention_keeps_the_t_by_t_scores(name):
    cfg = CONFIGS[name]
    eager = activation_bytes(cfg, B, T, attention="eager")["total"]
    ratio = eager / _measure(cfg, math_attention=True)
    assert abs(ratio - 1) <= TOL, ratio
    sdpa = activation_bytes(cfg, B, T)["total"]
    assert eager - sdpa == cfg.n_layer * B * T * cfg.n_head * (T - 1) * 4  # T x T probs instead of the logsumexp


class _Checkpointed(torch.nn.Module):
    """Reentrant checkpoint around one block: its recompute in backward runs under the caller's saved-tensor hooks
    (the model's own non-reentrant switch hides the recompute's saves from them)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=True)


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-gqa-untied"])
def test_checkpointed_activations(name):
    """Forward with Transformer.activation_checkpointing: only the block inputs + the outside-the-blocks tensors stay
    saved. Backward (blocks wrapped by hand): each block's recompute saves one block's activations."""
    cfg = CONFIGS[name]
    est = activation_bytes(cfg, B, T, device="cpu")
    stored = est["checkpointed"] - est["per_layer"]  # block inputs + embeddings / final norm / head / loss
    assert stored == est["checkpointed_inputs"] + est["other"] + est["logits"]
    x, y = _batch(cfg)
    m = _model(cfg)
    assert hasattr(m, "activation_checkpointing"), "Transformer lost its activation_checkpointing switch"
    m.activation_checkpointing = True
    with SavedBytes(m) as fwd:
        _loss(m, x, y)
    assert abs(stored / fwd.total - 1) <= TOL, stored / fwd.total
    m = _model(cfg)
    m.blocks = torch.nn.ModuleList(_Checkpointed(b) for b in m.blocks)
    with SavedBytes(m) as fwd:
        loss = _loss(m, x, y)
    assert abs(stored / fwd.total - 1) <= TOL, stored / fwd.total
    with SavedBytes(m) as bwd:  # what the recomputes save in backward, one block at a time
        loss.backward()
    per_layer = bwd.total / cfg.n_layer
    assert abs(est["per_layer"] / per_layer - 1) <= TOL, est["per_layer"] / per_layer
    assert est["checkpointed"] < est["total"]


# ---- (4) strategies ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp_shards_state_and_ddp_replicates_it(dtype):
    cfg = CONFIGS["llama-gqa-untied"]
    K = 4
    tm = training_memory(cfg, B, T, dtype, "adamw", world_size=K)
    none, ddp, fsdp = tm["none"], tm["ddp"], tm["fsdp"]
    st = state_bytes(cfg, dtype, "adamw")
    for key in ("weights", "gradients"):
        assert fsdp[key] == math.ceil(none[key] / K)
    assert fsdp["optimizer"] == math.ceil(st["optimizer_moments"] / K) + st["optimizer_steps"]
    assert none["optimizer"] == st["optimizer_moments"] + st["optimizer_steps"]
    pc = param_counts(cfg)
    assert fsdp["fsdp_unsharded"] == (pc.root + pc.block) * 2 * (2 if dtype == "bfloat16" else 4)
    assert ddp["ddp_buckets"] == none["gradients"] and none["ddp_buckets"] == fsdp["ddp_buckets"] == 0
    for key in ("weights", "gradients", "optimizer", "activations", "activations_checkpointed"):
        assert ddp[key] == none[key]
    for s in (none, ddp, fsdp):  # activations are per device and not sharded
        assert s["activations"] == none["activations"]
        fixed = sum(v for k, v in s.items() if not k.startswith(("activations", "total")))
        assert s["total"] == fixed + s["activations"]
        assert s["total_checkpointed"] == fixed + s["activations_checkpointed"]
    assert fsdp["total"] < none["total"] < ddp["total"]
    assert training_memory(cfg, B, T, dtype, world_size=8)["fsdp"]["weights"] < fsdp["weights"]


# ---- (5) CLI -------------------------------------------------------------------------------------------------------
def test_cli_info_json_equals_the_library(capsys):
    main(["info", "--preset", "llama-tiny", "--world-size", "4", "--batch-size", "2", "--json"])
    got = json.loads(capsys.readouterr().out)
    cfg = preset("llama-tiny")
    want = json.loads(json.dumps(memory_report(cfg, batch_size=2, world_size=4)))
    assert got == want
    assert got["training"]["fsdp"]["weights"] == math.ceil(4 * cfg.num_params() / 4)
    assert got["describe"]["parameters"].startswith(f"{cfg.num_params():,}")
    assert got["activations"]["total"] == activation_bytes(cfg, 2, cfg.block_size)["total"]


def test_cli_info_device_cpu_counts_the_short_sequence_scores(capsys):
    main(["info", "--preset", "gpt2-small", "--seq-len", "64", "--batch-size", "2", "--device", "cpu", "--json"])
    got = json.loads(capsys.readouterr().out)
    cfg = preset("gpt2-small")
    assert got["settings"]["device"] == "cpu"
    assert got == json.loads(json.dumps(memory_report(cfg, batch_size=2, seq_len=64, world_size=8, device="cpu")))
    gpu = activation_bytes(cfg, 2, 64)["per_layer"]
    assert got["activations"]["per_layer"] - gpu == 2 * 64 * cfg.n_head * (64 - 1) * 4  # probabilities, no logsumexp
    main(["info", "--preset", "gpt2-small", "--seq-len", "64", "--device", "cpu"])
    assert "sdpa attention on cpu" in capsys.readouterr().out


def test_cli_info_table_keeps_describe_rows_first(capsys):
    main(["info", "--preset", "gpt2-small", "--world-size", "2", "--dtype", "bfloat16", "--seq-len", "128"])
    out = capsys.readouterr().out.splitlines()
    rows = describe(preset("gpt2-small"), 128)
    w = max(len(k) for k, _ in rows)
    assert out[:len(rows)] == [f"{k:<{w}}  {v}" for k, v in rows]
    text = "\n".join(out[len(rows):])
    assert "ddp x2" in text and "fsdp x2" in text and "autocast bf16 weight copies" in text and "KV cache" in text


def test_bad_settings_are_user_errors():
    cfg = CONFIGS["gpt2-tied"]
    for kw in (dict(world_size=0), dict(batch_size=0), dict(optimizer="lion"), dict(dtype="float16"),
               dict(strategies=("zero3",)), dict(attention="ring"), dict(master_weights=True), dict(device="tpu")):
        with pytest.raises(ConfigError):
            training_memory(cfg, **kw)
