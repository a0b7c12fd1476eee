"""LoRA (low-rank adapters): inject into the Transformer's linear layers, train, merge, save/load adapters.

    W x  ->  W x + (alpha / r) * B A dropout(x)          A: (r, in), B: (out, r), B starts at zero

The Transformer fuses q/k/v into one `attn.qkv` linear (and SwiGLU's gate/up into `mlp.fc`), so an adapter
targets a *row slice* of a fused layer: target "q" adds B_q A_q to the q rows of attn.qkv only. Each target keeps
its own A and B, exactly the matrices a separate q_proj would have, so adapters save under PEFT's names
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) for Llama-family models and load in PEFT too.

Targets: q k v o (attention: o = attn.proj), gate up down (MLP; for a non-gated GELU MLP "up" is the whole
mlp.fc), HF aliases q_proj ... down_proj, "attn" = q,k,v,o, "mlp" = gate,up,down, "all" = both.

    cfg = LoRAConfig.parse("r=16,alpha=32,dropout=0.05,targets=q,k,v,o")
    apply_lora(model, cfg)            # in place: freezes everything, wraps target layers
    ... train lora_parameters(model) ...
    save_adapter(model, "adapter/", cfg); load_adapter(other_model, "adapter/")
    merge_lora(model)                 # folds B A into the weights, restores plain nn.Linear layers
"""
from __future__ import annotations

import dataclasses
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import write_bytes, write_text
from ..errors import ConfigError, LMStackError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
           "down_proj": "down", "fc": "up", "c_fc": "up", "c_proj": "down"}
GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"), "all": ("q", "k", "v", "o", "gate", "up", "down")}
KNOWN = ("q", "k", "v", "o", "gate", "up", "down")
PEFT_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t for t in self.targets.replace("+", ",").split(",") if t)
        out: list[str] = []
        for t in self.targets:
            t = t.strip()
            for name in GROUPS.get(t, (ALIASES.get(t, t),)):
                if name not in KNOWN:
                    raise ConfigError(f"unknown LoRA target {t!r}; choose from {', '.join(KNOWN)} (or q_proj..., "
                                      "attn, mlp, all)")
                if name not in out:
                    out.append(name)
        if not out:
            raise ConfigError("LoRA needs at least one target, e.g. targets=q,k,v,o")
        self.targets = tuple(out)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def parse(cls, spec: str | None) -> "LoRAConfig":
        """'r=16,alpha=32,dropout=0.05,targets=q,k,v,o' (targets last: the rest of the string is its list);
        an empty spec gives the defaults."""
        kw: dict = {}
        spec = (spec or "").strip()
        if "targets=" in spec:
            spec, targets = spec.split("targets=", 1)
            kw["targets"] = tuple(t.strip() for t in targets.split(",") if t.strip())
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            key, sep, val = item.partition("=")
            key = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout"}.get(key.strip(), key.strip())
            if not sep or key not in ("r", "alpha", "dropout"):
                raise ConfigError(f"bad --lora item {item!r}; expected r=16,alpha=32,dropout=0.05,targets=q,k,v,o")
            try:
                kw[key] = int(val) if key == "r" else float(val)
            except ValueError:
                raise ConfigError(f"bad --lora value {item!r}: {val!r} is not a number") from None
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d


class LoRALinear(nn.Module):
    """A linear layer (the original weight and bias, frozen) plus low-rank adapters on row slices of its output.

    segments: {target name: (start row, end row)} of the adapted slices; the state dict keeps the base tensors
    under their original names (`weight`, `bias`) and adds `lora_A.<name>` / `lora_B.<name>`."""

    def __init__(self, base: nn.Linear, segments: dict[str, tuple[int, int]], r: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.segments = dict(sorted(segments.items(), key=lambda kv: kv[1][0]))
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (s, e) in self.segments.items():
            a = torch.empty(r, self.in_features, **kw)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's init: A random, B zero -> starts as the base model
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(e - s, r, **kw))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self._names = list(self.segments)
        only = next(iter(self.segments.values())) if len(self.segments) == 1 else None
        self._single = only == (0, self.out_features)  # one adapter over all rows: A and B are the parameters
        self._cache: tuple | None = None  # (versions of the adapter tensors, A, B) of the last no-grad forward
        for attr in ("residual_scale",):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A laid out like `weight` (zero rows where no adapter)."""
        d = torch.zeros_like(self.weight)
        for name, (s, e) in self.segments.items():
            d[s:e] = (self.lora_B[name] @ self.lora_A[name]) * self.scaling
        return d

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the whole layer: A stacks the adapters' A (k*r, in); B is block-diagonal (out, k*r), with the
        zero rows of unadapted slices, so B @ A == delta_weight / scaling and one pair of matmuls covers q, k, v.

        Built in one op (torch.block_diag) and, when no gradient is needed (generation, eval, a frozen adapter),
        cached until an adapter tensor changes (an optimizer step or a load bumps its version counter)."""
        if self._single:
            name = self._names[0]
            return self.lora_A[name], self.lora_B[name]
        params = [self.lora_A[n] for n in self._names] + [self.lora_B[n] for n in self._names]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if not grad:
            key = tuple((p.data_ptr(), p._version) for p in params)
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1], self._cache[2]
        A = torch.cat([self.lora_A[n] for n in self._names]) if len(self._names) > 1 else self.lora_A[self._names[0]]
        blocks, row = [], 0
        for n, (s, e) in self.segments.items():
            if s > row:  # rows no adapter touches: a zero-width block keeps them zero
                blocks.append(A.new_zeros(s - row, 0))
            blocks.append(self.lora_B[n])
            row = e
        if row < self.out_features:
            blocks.append(A.new_zeros(self.out_features - row, 0))
        B = torch.block_diag(*blocks)
        if grad:
            self._cache = None
        else:
            self._cache = (key, A, B)
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return y
        A, B = self._factors()
        return y + F.linear(F.linear(self.dropout(x), A), B) * self.scaling

    def merged_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        if hasattr(self, "residual_scale"):
            lin.residual_scale = self.residual_scale
        lin.weight.muon_ok = True
        lin.requires_grad_(self.weight.requires_grad)  # frozen like the rest of the model apply_lora froze
        return lin

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"adapters={list(self.segments)}")


def _layer_targets(model: nn.Module) -> Iterator[tuple[int, nn.Module, str, dict[str, tuple[int, int]]]]:
    """(layer index, parent module, attribute, {target: (start, end)} of every adaptable slice) per block."""
    cfg = model.config
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    f = cfg.ffn_size
    for i, block in enumerate(model.blocks):
        yield i, block.attn, "qkv", {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        yield i, block.attn, "proj", {"o": (0, cfg.n_embd)}
        if block.mlp.gated:
            yield i, block.mlp, "fc", {"gate": (0, f), "up": (f, 2 * f)}
        else:
            yield i, block.mlp, "fc", {"up": (0, f)}
        yield i, block.mlp, "proj", {"down": (0, cfg.n_embd)}


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """In place: freeze every parameter of `model`, then wrap the target linear layers with trainable adapters.
    Returns the model; `lora_parameters(model)` lists the trainable tensors, `trainable_summary` counts them."""
    if any(True for _ in lora_layers(model)):
        raise LMStackError("the model already has LoRA adapters; merge_lora(model) first or load a fresh model")
    for p in model.parameters():
        p.requires_grad_(False)
    found = set()
    for _, parent, attr, slices in _layer_targets(model):
        lin = getattr(parent, attr)
        wanted = {t: se for t, se in slices.items() if t in cfg.targets}
        if not wanted:
            continue
        if type(lin) is not nn.Linear:
            raise LMStackError(f"LoRA needs plain nn.Linear layers, found {type(lin).__name__} (load the model "
                               "without quantize= to fine-tune it)")
        found.update(wanted)
        wrapped = LoRALinear(lin, wanted, cfg.r, cfg.alpha, cfg.dropout)
        wrapped.train(lin.training)  # an eval-mode model stays in eval mode (no adapter dropout)
        setattr(parent, attr, wrapped)
    missing = [t for t in cfg.targets if t not in found]
    if missing == ["gate"] and "up" in cfg.targets and "down" in cfg.targets:
        missing = []  # "mlp"/"all" on a non-gated (GELU) MLP: there is no gate to adapt
    if missing:
        raise ConfigError(f"LoRA targets {missing} do not exist in this model (a GELU MLP has no 'gate'); "
                          f"drop them from targets")
    model.lora_config = cfg
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter tensors (A and B of every adapted layer), the only ones apply_lora leaves trainable."""
    return [p for _, m in lora_layers(model) for d in (m.lora_A, m.lora_B) for p in d.values()]


def trainable_summary(model: nn.Module) -> dict:
    """{'trainable': n, 'total': N, 'percent': 100 n / N}; parameters shared (tied head) are counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def merge_lora(model: nn.Module) -> nn.Module:
    """In place: fold every adapter into its layer's weight and put back a plain nn.Linear. Returns the model, whose
    state dict is a plain checkpoint's again; parameters stay frozen (model.requires_grad_(True) to train all)."""
    for name, m in list(lora_layers(model)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, m.merged_linear())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model (adapters bypassed) inside the block, e.g. as DPO's frozen reference policy."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.disabled = b


# ---- adapter files ---------------------------------------------------------------------------------------------
def _uses_peft_names(model: nn.Module) -> bool:
    """Llama-family layouts map one-to-one onto HF module names (q_proj ... down_proj)."""
    c = model.config
    return c.mlp == "swiglu" and c.norm_position == "pre" and c.causal


def _adapter_key(model: nn.Module, layer: int, target: str, which: str, peft: bool) -> str:
    if peft:
        return f"base_model.model.model.layers.{layer}.{PEFT_NAMES[target]}.lora_{which}.weight"
    attr = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "o": "attn.proj", "gate": "mlp.fc", "up": "mlp.fc",
            "down": "mlp.proj"}[target]
    return f"blocks.{layer}.{attr}.lora_{which}.{target}"


def _adapter_slots(model: nn.Module) -> Iterator[tuple[int, str, LoRALinear]]:
    for i, parent, attr, slices in _layer_targets(model):
        m = getattr(parent, attr)
        if isinstance(m, LoRALinear):
            for t in m.segments:
                yield i, t, m


def lora_state_dict(model: nn.Module, peft_names: bool | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors only, named the PEFT way for Llama-family models (else `blocks.N.attn.qkv.lora_A.q`)."""
    peft = _uses_peft_names(model) if peft_names is None else peft_names
    out = {}
    for i, t, m in _adapter_slots(model):
        out[_adapter_key(model, i, t, "A", peft)] = m.lora_A[t].detach().contiguous()
        out[_adapter_key(model, i, t, "B", peft)] = m.lora_B[t].detach().contiguous()
    if not out:
        raise LMStackError("the model has no LoRA adapters (apply_lora first)")
    return out


def save_adapter(model: nn.Module, directory: str | Path, cfg: LoRAConfig | None = None,
                 base_model: str | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (PEFT's file names and config fields), each atomically
    (lmstack.atomic). base_model: recorded as base_model_name_or_path (lmstack.load and `merge-lora RUN` read it)."""
    from safetensors.torch import save
    cfg = cfg or getattr(model, "lora_config", None)
    if cfg is None:
        raise LMStackError("save_adapter needs the LoRAConfig the adapters were made with")
    d = Path(directory)
    peft = _uses_peft_names(model)
    sd = {k: v.cpu() for k, v in lora_state_dict(model, peft).items()}
    write_bytes(d / ADAPTER_WEIGHTS, save(sd, metadata={"format": "pt"}))
    meta = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "target_modules": sorted({PEFT_NAMES[t].split(".")[-1] for t in cfg.targets}),
            "base_model_name_or_path": base_model}
    if not peft:  # lmstack tensor names (non-Llama layouts): PEFT cannot read these anyway
        meta["lmstack"] = {"targets": list(cfg.targets), "naming": "lmstack"}
    write_text(d / ADAPTER_CONFIG, json.dumps(meta, indent=2))
    return d


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    f = Path(directory) / ADAPTER_CONFIG
    if not f.exists():
        raise LMStackError(f"no LoRA adapter at {directory} (missing {ADAPTER_CONFIG}); pass the directory "
                           "written by `lmstack finetune --lora` (its adapter/ folder)")
    meta = json.loads(f.read_text())
    targets = (meta.get("lmstack") or {}).get("targets") or meta.get("target_modules") or []
    return LoRAConfig(r=int(meta["r"]), alpha=float(meta.get("lora_alpha", meta["r"])),
                      dropout=float(meta.get("lora_dropout", 0.0)), targets=tuple(targets))


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the adapter saved in `directory` to `model` (a plain base model; adapters are added) or load its
    tensors into a model that already has matching adapters. Also reads PEFT-written adapters of Llama models."""
    from safetensors.torch import load_file
    d = Path(directory)
    cfg = read_adapter_config(d)
    wf = d / ADAPTER_WEIGHTS
    if not wf.exists():
        raise LMStackError(f"{d} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    sd = load_file(str(wf))
    if not any(True for _ in lora_layers(model)):
        apply_lora(model, cfg)
    peft = any(k.startswith("base_model.") for k in sd)
    if peft and not _uses_peft_names(model):
        raise LMStackError(f"{wf} uses PEFT (Llama) names but the model is not Llama-family")
    used = set()
    with torch.no_grad():
        for i, t, m in _adapter_slots(model):
            for which, store in (("A", m.lora_A), ("B", m.lora_B)):
                key = _adapter_key(model, i, t, which, peft)
                if key not in sd:
                    raise LMStackError(f"{wf} has no tensor {key}: the adapter was made for another model or "
                                       "other targets")
                if sd[key].shape != store[t].shape:
                    raise LMStackError(f"{wf}: {key} has shape {tuple(sd[key].shape)}, the model expects "
                                       f"{tuple(store[t].shape)} (another base model or rank?)")
                store[t].copy_(sd[key])
                used.add(key)
    extra = sorted(set(sd) - used)
    if extra:
        raise LMStackError(f"{wf} has tensors this model has no adapter for (e.g. {extra[0]}); "
                           "was it made for a deeper model or other targets?")
    return model
