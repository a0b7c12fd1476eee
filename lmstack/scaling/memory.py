"""Training memory per device and KV-cache size, from a ModelConfig alone (`lmstack info`).

Everything is counted from the structure of `lmstack.models.transformer.Transformer`, tensor by tensor, so the
parameter, gradient, optimizer and KV-cache numbers are exact for this repo's model and optimizers (the tests hold
them to the bytes a real model allocates), and the activation numbers follow what autograd saves for backward.

Precision conventions (`dtype`):
  float32            fp32 weights, fp32 grads, fp32 optimizer state, fp32 activations.
  bfloat16           what the Trainer does (`TrainConfig.dtype="bfloat16"`): bf16 *autocast* over fp32 parameters.
                     The fp32 parameters are the master weights, so there is no separate master copy: fp32 weights
                     (4 B/param) + fp32 grads (4) + fp32 moments (4 per slot). Linear layers compute in bf16: autocast
                     keeps a bf16 copy of every matrix it multiplies by (2 B per linear-weight element, saved for
                     backward), and linear / attention outputs are bf16. The residual stream stays fp32 (fp32
                     embeddings + bf16 branch outputs promote to fp32), so block inputs and norm tensors are fp32.
  bfloat16 + master_weights=True
                     bf16 parameters and grads (2 + 2 B/param) with a separate fp32 master copy (4) that the
                     optimizer updates, fp32 moments (Megatron / DeepSpeed style); activations all bf16.
  Adam-style moments are always fp32 here (torch keeps state in the dtype of the tensor it updates).

Optimizer state (`optimizer`), as torch / lmstack allocate it:
  adamw    exp_avg + exp_avg_sq (2 slots) + one float32 scalar `step` tensor per parameter tensor (4 B each; counted).
  sgd      momentum_buffer (1 slot; the Trainer's default momentum 0.9; no step tensor).
  rmsprop  square_avg (1 slot) + a float32 `step` scalar per tensor (the Trainer uses momentum 0, not centered).
  muon     momentum_buffer (1 slot) for the hidden matrices of the blocks; AdamW (2 slots + step) for the rest.

Strategies (`strategy`, per device, `world_size` K devices, the micro-batch is per device):
  none   one device holds everything.
  ddp    everything replicated, plus DDP's gradient buckets: the Reducer allocates flat bucket buffers covering all
         gradients at construction (default gradient_as_bucket_view=False), i.e. one more gradient-sized buffer.
  fsdp   full shard (FSDP2 `fully_shard` per block + the root): params, grads and optimizer moments divided by K
         (FSDP2 pads each tensor's dim 0 to a multiple of K; ignored, < K rows per tensor; the scalar `step` tensors
         are per parameter and not sharded). Plus the unsharded units alive during backward: the root (embeddings,
         final norm, untied head; FSDP2 does not reshard the root after forward) and one block, params + grads
         (prefetching the next block can make that two). With bfloat16 it assumes MixedPrecisionPolicy(param_dtype=
         bf16, reduce_dtype=fp32): unsharded units in bf16, no autocast weight copies. Activations are not sharded.

Activations (`activation_bytes`): the unique storages autograd saves for backward during one forward of a
micro-batch (B sequences x T tokens) plus the loss, per block in the order of `Block.forward`:
  norm (x2)   layernorm: input (d) + mean, rstd (fp32 scalars per token);
              rmsnorm:   input (d) + rstd + x*rstd (d) (nn.RMSNorm's composite kernel; a fused kernel saves only
                         input + rstd)
  attention   qkv input (d); q, k, v as SDPA receives them (GQA/MQA k, v keep n_kv_head heads: SDPA's enable_gqa,
              torch >= 2.5; older torch repeat_interleaves them to n_head); with RoPE q and k are new tensors; any of q, k, v that is still a view of the fused qkv
              output keeps that whole (d + 2*kv*hd) buffer alive); SDPA output (d; also the proj input) and its
              logsumexp (n_head fp32 per token). `attention="sdpa"` assumes a flash / memory-efficient kernel: no
              T x T scores are stored. `attention="eager"` (math kernel, e.g. dropout or an explicit mask on CPU)
              adds the softmax probabilities, n_head * T per token (fp32 under autocast + the bf16 copy @v saves).
              device="cpu": models/attention.attend runs short sequences (<= 128 queries, 256 under bf16 autocast)
              as bmm + softmax + bmm, saving the probabilities too and contiguous copies of q, k, v (views when B
              or n_head is 1); so do all lengths with dropout > 0 (+ dropout's mask and output per score); longer
              ones without dropout use the flash kernel, in fp32 under autocast (fp32 q, k, v and output).
  MLP         fc input (d); swiglu: fused [gate; up] output (2f) + silu(gate) (f) + product (f, proj input);
              gelu / silu: fc output (f) + activation output (f); relu: f (relu saves its output = proj input).
  dropout>0   one mask per nn.Dropout (2 per block + embeddings): bool on CUDA (the fused kernel); on the CPU dropout
              is input * noise, so the noise in the input's dtype.
Outside the blocks: token ids (int64), learned-position ids, embedding norm, final norm + head input (d), the
log-softmax of the logits in fp32 (V per token; cross-entropy runs on logits.float()) and the int64 targets. The
logits term is often the biggest one for small models. `loss_transient` is not saved but is alive at the start of
backward: the fp32 gradients of the log-probabilities and of the logits (2 x 4 B x B*T*V).
Activation checkpointing (torch.utils.checkpoint around each block) keeps only each block's input (d per token,
residual dtype) plus, during backward, one block's recomputed activations.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig, describe
from ..errors import ConfigError
from ..models.attention import SDPA_GQA, short_enough

DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "sgd", "rmsprop", "muon")
STRATEGIES = ("none", "ddp", "fsdp")
ATTENTION = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")
#: optimizer -> (fp32 slots for the non-Muon parameters, slots for Muon's hidden matrices, step scalar per tensor)
_SLOTS = {"adamw": (2, 2, True), "sgd": (1, 1, False), "rmsprop": (1, 1, True), "muon": (2, 1, True)}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter elements and tensors of the Transformer built from a config (tied weights counted once)."""
    total: int
    tensors: int
    block: int            # one block
    block_tensors: int
    block_matrices: int   # one block's linear weights (the ones Muon orthogonalises)
    root: int             # everything outside the blocks: embeddings, embedding / final norm, untied head
    root_tensors: int
    head_matrix: int      # elements of the output head's weight (shared with the embedding when tied)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, f, kv = cfg.n_embd, cfg.ffn_size, cfg.kv_heads * cfg.head_dim
    norm_p = d * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    norm_t = 2 if cfg.norm == "layernorm" and cfg.bias else 1
    qkv_out, fc_out = d + 2 * kv, (2 * f if cfg.mlp == "swiglu" else f)
    mats = d * qkv_out + d * d + d * fc_out + f * d
    biases = (qkv_out if cfg.use_qkv_bias else 0) + ((d + fc_out + d) if cfg.bias else 0)
    bias_t = int(cfg.use_qkv_bias) + (3 if cfg.bias else 0)
    block, block_t = mats + biases + 2 * norm_p, 4 + bias_t + 2 * norm_t
    V = cfg.vocab_size
    root = V * d + (0 if cfg.tie_embeddings else V * d)
    root_t = 1 + (0 if cfg.tie_embeddings else 1)
    if cfg.pos_emb == "learned":
        root, root_t = root + cfg.block_size * d, root_t + 1
    if cfg.type_vocab_size:
        root, root_t = root + cfg.type_vocab_size * d, root_t + 1
    root += norm_p * (int(cfg.embedding_norm) + int(cfg.norm_position == "pre"))
    root_t += norm_t * (int(cfg.embedding_norm) + int(cfg.norm_position == "pre"))
    L = cfg.n_layer
    return ParamCounts(total=L * block + root, tensors=L * block_t + root_t, block=block, block_tensors=block_t,
                       block_matrices=mats, root=root, root_tensors=root_t, head_matrix=V * d)


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}")


def _check_precision(dtype: str, master_weights: bool) -> None:
    _check("dtype", dtype, DTYPES)
    if master_weights and dtype != "bfloat16":
        raise ConfigError("master weights (a separate fp32 copy) go with bf16 params: use dtype='bfloat16' "
                          "(--dtype bfloat16 --master-weights)")


def state_bytes(cfg: ModelConfig, dtype: str = "float32", optimizer: str = "adamw",
                master_weights: bool = False) -> dict[str, int]:
    """Unsharded bytes of weights, gradients, optimizer state (moments + step scalars) and master weights."""
    _check_precision(dtype, master_weights)
    _check("optimizer", optimizer, OPTIMIZERS)
    pc = param_counts(cfg)
    pure_bf16 = dtype == "bfloat16" and master_weights
    p_bytes = 2 if pure_bf16 else 4
    rest_slots, muon_slots, has_step = _SLOTS[optimizer]
    muon_n = pc.block_matrices * cfg.n_layer if optimizer == "muon" else 0
    moments = 4 * (rest_slots * (pc.total - muon_n) + muon_slots * muon_n)
    step_tensors = pc.tensors - (4 * cfg.n_layer if optimizer == "muon" else 0) if has_step else 0
    return {"weights": p_bytes * pc.total, "gradients": p_bytes * pc.total, "optimizer_moments": moments,
            "optimizer_steps": 4 * step_tensors, "master_weights": 4 * pc.total if pure_bf16 else 0}


def _norm_saved(cfg: ModelConfig, r: int) -> int:
    """Bytes per token one norm saves (input d at the residual dtype + its fp32 statistics)."""
    d = cfg.n_embd
    return r * d + 8 if cfg.norm == "layernorm" else 2 * r * d + 4


def _attention_saved(cfg: ModelConfig, B: int, T: int, dtype: str, attention: str, master_weights: bool,
                     device: str) -> int:
    """Bytes per token the attention sub-layer saves (see the module docstring)."""
    d, H, kv = cfg.n_embd, cfg.n_head, cfg.kv_heads * cfg.head_dim
    pure_bf16 = dtype == "bfloat16" and master_weights
    c = 2 if dtype == "bfloat16" else 4
    rope, gqa = cfg.pos_emb == "rope", cfg.kv_heads != cfg.n_head
    repeat = gqa and not SDPA_GQA  # torch < 2.5: k, v repeat_interleave'd to n_head before SDPA
    kv_in = d if repeat else kv    # k, v width as attention receives them
    autocast = device == "cpu" and dtype == "bfloat16" and not pure_bf16
    # q, k, v as attention receives them; any that is a view of the fused qkv output keeps that whole buffer alive
    q_view, k_view, v_view = not rope, not (rope or repeat), not repeat
    given = c * d * (not q_view) + c * kv_in * ((not k_view) + (not v_view))
    given += c * (d + 2 * kv) if (q_view or k_view or v_view) else 0
    matmul = cfg.dropout > 0 or short_enough(B * H, T, T, autocast)
    if device == "cpu" and attention == "sdpa" and not (gqa and SDPA_GQA) and matmul:
        # models/attention.py's matmul path: bmm saves its (B*H, T, hd) operands (views of q, k, v when B or n_head
        # is 1, else contiguous copies) and the float32 softmax probabilities (+ their bf16 copy @ v); with dropout
        # the fp32 softmax output, dropout's noise and its output (compute dtype: CPU dropout is input * noise)
        qkv = given if B == 1 or H == 1 else c * (d + 2 * kv_in)
        probs = 4 + 2 * c if cfg.dropout > 0 else (4 if c == 4 else 4 + c)
        return c * d + qkv + c * d + H * T * probs                    # qkv input, q k v, probs, proj input
    attn = c * d + given + c * d                                      # qkv input, q k v, SDPA output = proj input
    if autocast:                                                      # attention in fp32 under CPU autocast:
        attn = c * d + 4 * (d + 2 * kv_in) + 4 * d + c * d            # qkv input, fp32 q k v, fp32 output
        c_att = 4                                                     # + proj's bf16 copy of it
    else:
        c_att = c
    if attention == "sdpa":
        return attn + 4 * H                                           # logsumexp, fp32
    return attn + H * T * (c_att if c_att == 4 or pure_bf16 else 4 + c)  # softmax probabilities (+ bf16 copy)


def activation_bytes(cfg: ModelConfig, batch_size: int = 1, seq_len: int | None = None, dtype: str = "float32",
                     attention: str = "sdpa", master_weights: bool = False, device: str = "cuda") -> dict[str, int]:
    """Bytes autograd saves for backward in one forward + loss of a (batch_size, seq_len) micro-batch (see the module
    docstring for the tensor-by-tensor accounting). device="cpu" with bf16 autocast: attention runs in float32 there
    (models/attention.attend), so SDPA saves float32 copies of q, k, v and a float32 output; device="cpu" also takes
    attend's matmul path for short sequences (T x T probabilities saved). Keys: per_layer, blocks, logits
    (log-softmax + targets), other (embeddings, final norm, head input), total; checkpointed_inputs, checkpointed (block inputs + one block's
    recompute + logits + other); loss_transient (not saved; the peak at the start of backward)."""
    _check_precision(dtype, master_weights)
    _check("attention", attention, ATTENTION)
    _check("device", device, DEVICES)
    B, T = batch_size, seq_len or cfg.block_size
    BT = B * T
    d, f, L, V = cfg.n_embd, cfg.ffn_size, cfg.n_layer, cfg.vocab_size
    pure_bf16 = dtype == "bfloat16" and master_weights
    c = 2 if dtype == "bfloat16" else 4          # compute dtype: linear / attention tensors
    r = 2 if pure_bf16 else 4                    # residual stream and norms
    attn = _attention_saved(cfg, B, T, dtype, attention, master_weights, device)
    mlp = c * d                                                       # fc input
    if cfg.mlp == "swiglu":
        mlp += c * 4 * f
    else:
        mlp += c * (f if cfg.activation == "relu" else 2 * f)
    mask = 1 if device == "cuda" else c  # dropout masks: bool on CUDA (fused kernel), input * noise on CPU
    drop = 2 * mask * d if cfg.dropout > 0 else 0                     # attention and MLP output dropout
    per_layer = BT * (2 * _norm_saved(cfg, r) + attn + mlp + drop)
    other = BT * 8 + (T * 8 if cfg.pos_emb == "learned" else 0)       # token ids (+ position ids)
    other += BT * (_norm_saved(cfg, r) if cfg.embedding_norm else 0)
    other += BT * d * (1 if device == "cuda" else r) * (cfg.dropout > 0)  # embedding dropout's mask / noise
    other += BT * ((_norm_saved(cfg, r) if cfg.norm_position == "pre" else 0) + c * d)   # final norm, head input
    logits = BT * (4 * V + 8) + 4                                     # fp32 log-probs, int64 targets, total_weight
    inputs = L * BT * r * d
    return {"per_layer": per_layer, "blocks": L * per_layer, "logits": logits, "other": other,
            "total": L * per_layer + logits + other, "checkpointed_inputs": inputs,
            "checkpointed": inputs + per_layer + logits + other, "loss_transient": 8 * BT * V}


def training_memory(cfg: ModelConfig, batch_size: int = 1, seq_len: int | None = None, dtype: str = "float32",
                    optimizer: str = "adamw", world_size: int = 1, strategies: tuple[str, ...] = STRATEGIES,
                    attention: str = "sdpa", master_weights: bool = False,
                    device: str = "cuda") -> dict[str, dict[str, int]]:
    """{strategy: {component: bytes per device}} for `world_size` devices; components: weights, gradients,
    optimizer (moments + step scalars), master_weights, autocast_copies, ddp_buckets, fsdp_unsharded, activations,
    activations_checkpointed, loss_transient, total, total_checkpointed (totals add everything: an upper bound, since
    activations are freed during backward as gradients appear)."""
    for key, v in (("world_size", world_size), ("batch_size", batch_size), ("seq_len", seq_len or 1)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    for s in strategies:
        _check("strategy", s, STRATEGIES)
    st = state_bytes(cfg, dtype, optimizer, master_weights)
    act = activation_bytes(cfg, batch_size, seq_len, dtype, attention, master_weights, device)
    pc = param_counts(cfg)
    autocast = dtype == "bfloat16" and not master_weights
    c = 2 if dtype == "bfloat16" else 4
    copies = 2 * (cfg.n_layer * pc.block_matrices + pc.head_matrix) if autocast else 0
    out = {}
    for s in strategies:
        K = world_size if s == "fsdp" else 1
        row = {"weights": -(-st["weights"] // K), "gradients": -(-st["gradients"] // K),
               "optimizer": -(-st["optimizer_moments"] // K) + st["optimizer_steps"],
               "master_weights": -(-st["master_weights"] // K),
               "autocast_copies": 0 if s == "fsdp" else copies,
               "ddp_buckets": st["gradients"] if s == "ddp" else 0,
               "fsdp_unsharded": (pc.root + pc.block) * 2 * c if s == "fsdp" else 0,
               "activations": act["total"], "activations_checkpointed": act["checkpointed"],
               "loss_transient": act["loss_transient"]}
        fixed = sum(v for k, v in row.items() if not k.startswith("activations"))
        row["total"] = fixed + act["total"]
        row["total_checkpointed"] = fixed + act["checkpointed"]
        out[s] = row
    return out


def kv_cache_table(cfg: ModelConfig, batch_size: int = 1, lengths: list[int] | None = None,
                   seq_len: int | None = None) -> list[dict[str, int]]:
    """KV-cache bytes at a few context lengths (default 512, 2k, 8k below block_size, block_size, and seq_len), as
    the repo's KVCache allocates them: 2 (k, v) x n_layer x batch x n_kv_head x length x head_dim x dtype bytes
    (GQA/MQA: n_kv_head heads; the full KVCache allocates the full length, sliding-window layers included - the
    RollingKVCache that make_cache gives sliding-window models holds only the window for those layers)."""
    if lengths is None:
        lengths = {n for n in (512, 2048, 8192) if n < cfg.block_size} | {cfg.block_size, seq_len or cfg.block_size}
    lengths = sorted(lengths)
    return [{"tokens": n, "batch": batch_size, "float32": cfg.kv_cache_bytes(n, batch_size, 4),
             "bfloat16": cfg.kv_cache_bytes(n, batch_size, 2)} for n in lengths]


def memory_report(cfg: ModelConfig, batch_size: int = 1, seq_len: int | None = None, dtype: str = "float32",
                  optimizer: str = "adamw", world_size: int = 1, strategies: tuple[str, ...] = STRATEGIES,
                  attention: str = "sdpa", master_weights: bool = False, device: str = "cuda") -> dict:
    """Everything `lmstack info` prints, as JSON-ready data (describe()'s rows included)."""
    T = seq_len or cfg.block_size
    kw = dict(dtype=dtype, attention=attention, master_weights=master_weights, device=device)
    return {
        "describe": dict(describe(cfg, seq_len)),
        "params": asdict(param_counts(cfg)),
        "settings": {"batch_size": batch_size, "seq_len": T, "optimizer": optimizer, "world_size": world_size,
                     "strategies": list(strategies), **kw},
        "training": training_memory(cfg, batch_size, T, optimizer=optimizer, world_size=world_size,
                                    strategies=strategies, **kw),
        "activations": activation_bytes(cfg, batch_size, T, **kw),
        "kv_cache": {"bytes_per_token": {"float32": cfg.kv_cache_bytes(1, 1, 4),
                                         "bfloat16": cfg.kv_cache_bytes(1, 1, 2)},
                     "rows": kv_cache_table(cfg, batch_size, seq_len=T)},
    }


def other_arch_report(cfg: ModelConfig, batch_size: int = 1) -> dict:
    """`lmstack info` for the architectures the tables above do not model (lstm, gru, gcnn, encoder-decoder): the
    parameter-proportional state (exact: N from the config) and the decoding state; activations are not modelled."""
    n = cfg.num_params()
    return {"describe": dict(describe(cfg)), "arch": cfg.arch, "params": n,
            "float32_bytes": {"weights": 4 * n, "gradients": 4 * n, "adamw_moments": 8 * n},
            "decoding_state_bytes_float32": cfg.kv_cache_bytes(cfg.block_size, batch_size, 4),
            "note": f"the per-device training-memory tables model the Transformer; for arch {cfg.arch} only the "
                    "parameter-proportional state is shown (activations are not modelled)"}


def format_other_arch(rep: dict) -> str:
    b = rep["float32_bytes"]
    return (f"training state (float32): weights {human(b['weights'])}, gradients {human(b['gradients'])}, AdamW "
            f"moments {human(b['adamw_moments'])}\ndecoding state per batch at the full context: "
            f"{human(rep['decoding_state_bytes_float32'])} (float32)\n({rep['note']})")


def human(n: float) -> str:
    """Bytes in binary units: 0 -> '0', 1536 -> '1.5 KiB', 3 * 2**30 -> '3.00 GiB'."""
    if n == 0:
        return "0"
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}" if unit in ("GiB", "TiB") else f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


_ROWS = [("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer state"),
         ("master_weights", "fp32 master weights"), ("autocast_copies", "autocast bf16 weight copies"),
         ("ddp_buckets", "DDP gradient buckets"), ("fsdp_unsharded", "FSDP unsharded root + 1 block"),
         ("activations", "activations"), ("loss_transient", "logits/loss backward transient"),
         ("total", "total"), ("activations_checkpointed", "activations, checkpointed"),
         ("total_checkpointed", "total, checkpointed")]


def format_report(rep: dict) -> str:
    """The two tables `lmstack info` prints below describe()'s rows."""
    s, tr, act = rep["settings"], rep["training"], rep["activations"]
    K = s["world_size"]
    cols = [("none" if k == "none" else f"{k} x{K}", k) for k in s["strategies"]]
    prec = s["dtype"] + (" (bf16 params + fp32 master)" if s["master_weights"] else
                         " (autocast over fp32 params)" if s["dtype"] == "bfloat16" else "")
    lines = [f"training memory per device: micro-batch {s['batch_size']} x {s['seq_len']:,} tokens, {prec}, "
             f"{s['optimizer']}, {s['attention']} attention on {s['device']}"]
    labels = dict(_ROWS)
    labels["optimizer"] = f"optimizer state ({s['optimizer']})"
    w = max(len(v) for v in labels.values())
    lines.append(f"  {'':<{w}}" + "".join(f"{h:>14}" for h, _ in cols))
    for key, _ in _ROWS:
        if all(tr[k][key] == 0 for _, k in cols):
            continue
        lines.append(f"  {labels[key]:<{w}}" + "".join(f"{human(tr[k][key]) if tr[k][key] else '-':>14}"
                                                      for _, k in cols))
    lines.append(f"  activations = blocks {human(act['blocks'])} ({human(act['per_layer'])}/layer) "
                 f"+ logits & cross-entropy {human(act['logits'])} + embeddings/norm/head {human(act['other'])}")
    lines.append(f"  checkpointed = block inputs {human(act['checkpointed_inputs'])} + one block's recompute + the "
                 f"rest; totals add every row (an upper bound)")
    kv = rep["kv_cache"]
    bpt = kv["bytes_per_token"]
    lines.append(f"KV cache: {bpt['float32']:,} B/token fp32, {bpt['bfloat16']:,} B/token bf16 "
                 f"(2 x layers x kv heads x head dim x dtype bytes)")
    lines.append(f"  {'tokens':>10}{'batch':>7}{'float32':>14}{'bfloat16':>14}")
    for row in kv["rows"]:
        lines.append(f"  {row['tokens']:>10,}{row['batch']:>7}{human(row['float32']):>14}{human(row['bfloat16']):>14}")
    return "\n".join(lines)
