"""Reward model: a Transformer backbone plus a scalar head on the last real token, trained through the one Trainer
core with the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)) on preference pairs (objective "bt"), or
with the squared error (r(x) - (rating - 4) / 1.5)^2 on 1-7 ratings (objective "regression").

On disk a reward model is a standard checkpoint directory (the backbone: config.json, model.safetensors,
tokenizer.json, so `lmstack.load` still opens it as an LM) plus `reward_head.safetensors` and a marker file
`reward_config.json` ({"kind": "reward_model", ...}).

Also here: the pieces the other preference objectives (DPO, PPO) share — a backbone+head module and a Trainer
subclass that saves it in that layout, the TrainConfig defaults for fine-tuning, and `load_reward_fn` (PPO's
reward: a reward-model directory or a python:module:function callable).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_model, resolve_checkpoint, save_checkpoint
from ..convert.load import load_any
from ..data.prefs import collate, encode_pair, load_prefs, load_ratings, rating_target, split_prefs
from ..data.sampler import epoch_batch
from ..errors import LMStackError
from ..models.utils import eval_mode
from .config import TrainConfig, merge_dicts, parse_set
from . import distributed
from .trainer import Trainer, setup_device

REWARD_MARKER = "reward_config.json"


# ---- shared pieces -------------------------------------------------------------------------------------------
class HeadModel(nn.Module):
    """A Transformer backbone plus a linear head on its final hidden states (reward head, value head).
    Saved as the backbone's standard checkpoint + `<head_name>.safetensors`."""

    def __init__(self, backbone: nn.Module, out_features: int = 1, head_name: str = "reward_head"):
        super().__init__()
        self.backbone = backbone
        self.head_name = head_name
        d = backbone.config.n_embd
        self.head = nn.Linear(d, out_features)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(d + 1))
        nn.init.zeros_(self.head.bias)
        self.head.to(next(backbone.parameters()).device)

    @property
    def config(self):
        return self.backbone.config

    def hidden(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, n_embd) of a right-padded batch. A causal backbone needs no padding mask (pads
        come after every real token, so no real token attends to one): SDPA keeps its fast causal path."""
        pm = None if getattr(self.backbone.config, "causal", True) else attn
        return self.backbone(ids, padding_mask=pm, return_hidden=True)


def write_head(model: HeadModel, d: Path, marker: dict | None = None, full: dict | None = None) -> None:
    """Write `<head_name>.safetensors` (and the marker file) into directory `d`. full: the whole model's gathered
    weights (a distributed run's rank 0), used instead of the module's own (possibly sharded) tensors."""
    from safetensors.torch import save_file
    head = ({k[len("head."):]: v for k, v in full.items() if k.startswith("head.")} if full is not None
            else model.head.state_dict())
    head = {k: v.detach().contiguous().cpu() for k, v in head.items()}
    save_file(head, str(d / f"{model.head_name}.safetensors"), metadata={"format": "pt"})
    if marker is not None:
        (d / REWARD_MARKER).write_text(json.dumps(marker, indent=2))


def save_head_model(path: str | Path, model: HeadModel, tokenizer=None, train_state: dict | None = None,
                    marker: dict | None = None) -> Path:
    """Standard checkpoint of the backbone with the head (and the marker) in the same atomic write."""
    return save_checkpoint(path, model.backbone, tokenizer, train_state,
                           extra=lambda d: write_head(model, d, marker))


def load_head(model: HeadModel, path: str | Path) -> None:
    from safetensors.torch import load_file
    f = Path(path) / f"{model.head_name}.safetensors"
    if not f.exists():
        raise LMStackError(f"{path} has no {f.name}")
    model.head.load_state_dict(load_file(str(f)))


class HeadTrainer(Trainer):
    """The Trainer core for a HeadModel: the checkpoint is the backbone's (full or LoRA, Trainer.save) plus the head
    file and the marker in the same atomic write; resume restores both (Trainer.load_state + `read_extra`)."""

    marker: dict | None = None

    @property
    def net(self) -> nn.Module:
        return self.model.backbone

    def write_extra(self, d: Path) -> None:
        write_head(self.model, d, self.marker, self._gathered)

    def read_extra(self, d: Path) -> None:
        load_head(self.model, d)


def load_for_training(model_path: str, cfg: TrainConfig):
    """(model, tokenizer, device) for a reward / DPO / PPO run from any source lmstack reads (checkpoint, LoRA
    checkpoint, Hugging Face dir, GGUF: convert.load.load_any): threads set, model on the run's device, float32
    weights when the run trains in float32 (GGUF / bf16 weights are upcast, as SFT does)."""
    device = setup_device(cfg)
    model, tok = load_any(model_path, device=device)
    if tok is None:
        raise LMStackError(f"{model_path} has no tokenizer (tokenizer.json); training needs one")
    if cfg.dtype != "bfloat16" and next(model.parameters()).dtype != torch.float32:
        model = model.float()
    return model, tok, device


def finetune_config(out_dir: str, defaults: dict | None = None, overrides: dict | None = None,
                    set_items: list[str] | None = None) -> TrainConfig:
    """TrainConfig for a fine-tuning objective: small constant-ish LR, no weight decay, short warmup; then the
    objective's `defaults`, explicit `overrides` (CLI flags that were given) and `--set key=value` items."""
    d: dict[str, Any] = dict(out_dir=str(out_dir), lr=1e-4, min_lr=1e-5, warmup_steps=10, weight_decay=0.0,
                             batch_size=8, max_steps=200, eval_interval=50, log_interval=1, final_eval_windows=0,
                             sample_tokens=0, keep_best=False)
    d.update(defaults or {})
    d.update({k: v for k, v in (overrides or {}).items() if v is not None})
    merge_dicts(d, parse_set(set_items or []))
    if "min_lr" not in (overrides or {}) and d["min_lr"] > d["lr"]:
        d["min_lr"] = d["lr"] * 0.1
    return TrainConfig.from_dict(d)


# ---- the reward model ----------------------------------------------------------------------------------------
class RewardModel(HeadModel):
    """Transformer backbone + scalar head read at the last non-pad token of each sequence."""

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone, 1, "reward_head")

    def forward(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = self.hidden(ids, attn)
        last = attn.long().sum(1).clamp(min=1) - 1
        return self.head(h[torch.arange(ids.shape[0], device=ids.device), last]).squeeze(-1).float()

    @torch.no_grad()
    def score_pairs(self, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 16,
                    chat: bool = False) -> list[float]:
        """Reward of each (prompt, completion), encoded exactly as in training (prompt + completion + end)."""
        device = next(self.parameters()).device
        seqs = [encode_pair(tokenizer, p, c, self.config.block_size, chat) for p, c in zip(prompts, completions)]
        out: list[float] = []
        with eval_mode(self):
            for i in range(0, len(seqs), batch_size):
                ids, attn, _ = collate(seqs[i:i + batch_size], device=device)
                out.extend(self(ids, attn).tolist())
        return out

    def score(self, tokenizer, texts: list[str], batch_size: int = 16) -> list[float]:
        """Reward of whole texts (no prompt)."""
        return self.score_pairs(tokenizer, [""] * len(texts), texts, batch_size)


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: mean of -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def save_reward_model(path: str | Path, rm: RewardModel, tokenizer=None, train_state: dict | None = None) -> Path:
    return save_head_model(path, rm, tokenizer, train_state, {"kind": "reward_model", "head": "reward_head.safetensors",
                                                              "pooling": "last_token"})


def is_reward_model(path: str | Path) -> bool:
    return (Path(path) / REWARD_MARKER).exists()


def load_reward_model(path: str | Path, device: str | torch.device = "cpu"):
    """(RewardModel, tokenizer) from a directory written by `lmstack reward train`."""
    path = resolve_checkpoint(path)
    if not is_reward_model(path):
        raise LMStackError(f"{path} is not a reward model (no {REWARD_MARKER}); train one with `lmstack reward train`")
    backbone, tok = load_model(path, device=device)
    rm = RewardModel(backbone)
    load_head(rm, path)
    rm.to(device).eval()
    return rm, tok


def load_reward_fn(spec: str | Callable,
                   device: str | torch.device = "cpu") -> Callable[[list[str], list[str]], list[float]]:
    """A reward function (prompts, completions) -> list[float] from a reward-model directory or
    'python:module:function' / 'python:path/to/file.py:function'."""
    if callable(spec):
        return spec
    if spec.startswith("python:"):
        target = spec[len("python:"):]
        mod_name, _, fn_name = target.rpartition(":")
        if not mod_name or not fn_name:
            raise LMStackError(f"--reward {spec!r}: expected python:module:function or python:file.py:function")
        try:
            if mod_name.endswith(".py"):
                if not Path(mod_name).exists():
                    raise LMStackError(f"--reward {spec!r}: no file {mod_name}")
                s = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
                mod = importlib.util.module_from_spec(s)
                s.loader.exec_module(mod)
            else:
                mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise LMStackError(f"--reward {spec!r}: cannot import {mod_name} ({e})") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise LMStackError(f"--reward {spec!r}: {mod_name} has no function {fn_name}")
        return fn
    if not is_reward_model(spec):
        raise LMStackError(f"--reward {spec!r} is neither a reward-model directory (from `lmstack reward train`) "
                           "nor python:module:function")
    rm, rtok = load_reward_model(spec, device=device)
    return lambda prompts, completions: rm.score_pairs(rtok, prompts, completions)


def pair_batch(tokenizer, examples, max_length: int, device) -> tuple[torch.Tensor, ...]:
    """Chosen rows then rejected rows in one right-padded batch: (ids, attn, completion_mask), 2B rows."""
    seqs = [encode_pair(tokenizer, e.prompt, e.chosen, max_length, e.chat) for e in examples]
    seqs += [encode_pair(tokenizer, e.prompt, e.rejected, max_length, e.chat) for e in examples]
    return collate(seqs, device=device)


def rating_batch(tokenizer, examples, max_length: int, device) -> tuple[torch.Tensor, ...]:
    """(ids, attn, targets) of rated completions: the reward model's encoding and rating_target(rating)."""
    ids, attn, _ = collate([encode_pair(tokenizer, e.prompt, e.completion, max_length, e.chat) for e in examples],
                           device=device)
    return ids, attn, torch.tensor([rating_target(e.rating) for e in examples], dtype=torch.float32, device=device)


def _bt_objective(model, batch) -> torch.Tensor:
    ids, attn, _ = batch
    r = model(ids, attn)
    n = r.shape[0] // 2
    return bt_loss(r[:n], r[n:])


def _regression_objective(model, batch) -> torch.Tensor:
    ids, attn, y = batch
    return F.mse_loss(model(ids, attn), y)


def _bt_eval(model, batches) -> dict[str, Any]:
    rc, rr = [], []
    for ids, attn, _ in batches:
        r = model(ids, attn)
        n = r.shape[0] // 2
        rc.append(r[:n])
        rr.append(r[n:])
    rc, rr = torch.cat(rc), torch.cat(rr)
    return {"val_loss": float(bt_loss(rc, rr)), "val_accuracy": float((rc > rr).float().mean()),
            "val_margin": float((rc - rr).mean())}


def _regression_eval(model, batches) -> dict[str, Any]:
    pred, y = [], []
    for ids, attn, t in batches:
        pred.append(model(ids, attn))
        y.append(t)
    pred, y = torch.cat(pred), torch.cat(y)
    mse = float(F.mse_loss(pred, y))
    return {"val_loss": mse, "val_mse": mse, "val_mae": float((pred - y).abs().mean())}


OBJECTIVES = ("bt", "regression")


def train_reward(model_path: str, data: str, cfg: TrainConfig, val_fraction: float = 0.1,
                 max_length: int | None = None, log=print, objective: str = "bt") -> dict[str, Any]:
    """Train a reward model through the one Trainer. objective "bt": Bradley-Terry on preference pairs (`data`:
    prompt/chosen/rejected JSONL; summary: held-out pairwise accuracy); "regression": mean squared error of the
    scalar reward against rating_target(rating) = (rating - 4) / 1.5 on 1-7 ratings (`data`: prompt/completion/
    rating JSONL, data.prefs.load_ratings; summary: held-out MSE)."""
    if objective not in OBJECTIVES:
        raise LMStackError(f"unknown reward objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    backbone, tok, device = load_for_training(model_path, cfg)
    bt = objective == "bt"
    examples = load_prefs(data, tok) if bt else load_ratings(data, tok)
    train, val = split_prefs(examples, val_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    rm = RewardModel(backbone).to(device)
    L = max_length or backbone.config.block_size
    what = "pairs" if bt else "ratings"
    log(f"reward model ({objective}) on {model_path}: {len(train)} train / {len(val)} held-out {what}, "
        f"{cfg.max_steps} steps")
    bs = cfg.batch_size
    make_batch = pair_batch if bt else rating_batch

    def get_batch(step: int, micro: int):
        idx = epoch_batch(len(train), bs, cfg.seed, distributed.stream_index(step, micro, cfg.grad_accum))
        return make_batch(tok, [train[i] for i in idx], L, device)

    def evaluate(model) -> dict[str, Any]:
        if not val:
            return {}
        batches = (make_batch(tok, val[i:i + bs], L, device) for i in range(0, len(val), bs))
        return (_bt_eval if bt else _regression_eval)(model, batches)

    trainer = HeadTrainer(rm, cfg, _bt_objective if bt else _regression_objective, get_batch, int(cfg.max_steps),
                          evaluate=evaluate, tokenizer=tok)
    trainer.marker = {"kind": "reward_model", "head": "reward_head.safetensors", "pooling": "last_token",
                      "base_model": str(model_path), "objective": objective}
    if not bt:
        trainer.marker["rating_scale"] = "(rating - 4) / 1.5"
    start = trainer.run_eval() if val else {}
    history = trainer.fit()
    final = trainer.run_eval() if val else {}
    summary = {"out_dir": cfg.out_dir, "model": str(Path(cfg.out_dir) / "last"), "steps": trainer.step,
               "objective": objective, f"train_{what}": len(train), f"val_{what}": len(val),
               "val_loss": final.get("val_loss")}
    if bt:
        summary.update(start_val_accuracy=start.get("val_accuracy"), val_accuracy=final.get("val_accuracy"))
    else:
        summary.update(start_val_mse=start.get("val_mse"), val_mse=final.get("val_mse"),
                       val_mae=final.get("val_mae"))
    if history:
        summary["train_loss"] = history[-1]["train_loss"]
    return summary
