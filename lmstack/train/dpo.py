"""Direct Preference Optimization (Rafailov et al. 2023) through the one Trainer core.

    h = (log pi(y_c|x) - log pi(y_r|x)) - (log ref(y_c|x) - log ref(y_r|x))
    sigmoid (DPO):   loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing, cDPO)
    ipo:             loss = (h - 1 / (2 beta))^2
    implicit rewards: r_c = beta (log pi(y_c|x) - log ref(y_c|x)), r_r likewise; accuracy = mean(r_c > r_r)

log pi(y|x) is the sum of the completion tokens' log-probabilities (prompt tokens are context only).

The reference: by default its log-probabilities are computed once for every pair before training (ref="precompute":
no second model in memory, no extra forward per step; exact, since the reference never changes). ref="live"
recomputes them every step with a frozen copy of the starting model, or, with LoRA, with the adapters disabled (the
base weights are the reference, so no copy at all). `ref_model=` takes another checkpoint as the reference.

How it plugs into the Trainer: `DPOObjective` holds the pairs, the reference (and its precomputed log-probabilities)
and the metrics window, and hands the Trainer bound methods (get_batch, loss, evaluate).

Metrics (metrics.jsonl via the Trainer, at every eval): held-out val_loss, val_accuracy, val_margin,
val_rewards_chosen / val_rewards_rejected, and the training window's rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracy averaged since the previous eval.

Checkpoints: the Trainer's (full: plain checkpoints; LoRA: adapter tensors + adapter files naming the base model, the
layout SFT and PPO use), resumable in both cases; `lmstack.load(<out>/last)` gives the trained (merged) policy.
"""
from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..convert.load import load_any
from ..data.jsonl import JsonlLog
from ..data.prefs import load_prefs, split_prefs
from ..data.sampler import epoch_batch
from ..errors import ConfigError, LMStackError
from ..models.lora import LoRAConfig, apply_lora, lora_disabled, trainable_summary
from ..models.utils import eval_mode
from . import distributed
from .config import TrainConfig
from .losses import IGNORE_INDEX
from .losses import sequence_logprobs as labelled_sequence_logprobs
from .reward import load_for_training, pair_batch
from .trainer import Trainer, base_model_path


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards, rejected rewards) from sequence log-probabilities, each (B,)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2 * beta)) ** 2
    else:
        raise LMStackError(f"DPO loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    return (losses.mean(), beta * (policy_chosen - ref_chosen).detach(),
            beta * (policy_rejected - ref_rejected).detach())


def completion_labels(ids: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """Shifted labels (lmstack.train.losses convention): labels[:, t] = ids[:, t + 1] where that token is a
    completion token, else -100."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:].masked_fill(~comp[:, 1:], IGNORE_INDEX)
    return labels


def sequence_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """Sum over completion tokens of log p(token | previous tokens): (B,). ids/attn/comp (B, T), right-padded;
    comp marks the completion tokens. Through lmstack.train.losses.sequence_logprobs (the output head runs on the
    completion positions only). Right padding cannot reach real tokens through causal attention, so decoders run
    without a padding mask (SDPA's fast causal path)."""
    pm = None if getattr(model.config, "causal", True) else attn
    return labelled_sequence_logprobs(model, ids, completion_labels(ids, comp), padding_mask=pm)


def _pair_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    ids, attn, comp = batch[:3]
    lp = sequence_logprobs(model, ids, attn, comp)
    n = lp.shape[0] // 2
    return lp[:n], lp[n:]


@dataclass
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0      # conservative DPO (sigmoid loss only)
    loss_type: str = "sigmoid"        # sigmoid | ipo
    lora: str | None = None           # LoRA spec ('r=16,alpha=32,targets=q,k,v,o'); None = full fine-tuning
    ref: str = "precompute"           # precompute | live
    ref_model: str | None = None      # another model as the reference (default: the starting model)
    val_fraction: float = 0.1         # held-out pairs for the accuracy metrics
    max_length: int | None = None     # tokens per sequence (default: the context window)

    def __post_init__(self) -> None:
        if self.ref not in ("precompute", "live"):
            raise LMStackError(f"ref must be 'precompute' or 'live', got {self.ref!r}")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise LMStackError(f"DPO loss_type must be 'sigmoid' or 'ipo', got {self.loss_type!r}")


def dpo_settings(dpo: DPOConfig | None = None, **fields) -> DPOConfig:
    """`dpo` (default DPOConfig()) with DPOConfig fields given as keywords replaced; unknown names are an error."""
    if fields:
        known = {f.name for f in dataclasses.fields(DPOConfig)}
        bad = sorted(set(fields) - known)
        if bad:
            raise ConfigError(f"train_dpo: unknown DPO setting(s) {bad}; see DPOConfig")
        dpo = dataclasses.replace(dpo or DPOConfig(), **fields)
    return dpo or DPOConfig()


def load_reference(dpo: DPOConfig, lora: LoRAConfig | None, model: nn.Module, device) -> nn.Module | None:
    """The frozen reference model, or None when the policy itself gives the reference log-probabilities (precompute:
    before training; LoRA: with its adapters disabled). Call before LoRA is applied to `model`."""
    ref_net = None
    if dpo.ref_model is not None:
        ref_net = load_any(dpo.ref_model, device=device)[0].float()
    elif dpo.ref == "live" and lora is None:
        ref_net = copy.deepcopy(model)
    if ref_net is not None:
        ref_net.eval().requires_grad_(False)
    return ref_net


class DPOObjective:
    """One DPO run's pairs, reference and metrics window, plugged into the Trainer as bound methods: `get_batch`,
    `loss` and `evaluate`. With ref="precompute" the reference log-probabilities of every pair are computed on
    construction (call it after LoRA is applied, before training)."""

    def __init__(self, model: nn.Module, ref_net: nn.Module | None, tok, train: list, val: list, dpo: DPOConfig,
                 lora: LoRAConfig | None, cfg: TrainConfig, device):
        self.model, self.ref_net, self.tok, self.train, self.val = model, ref_net, tok, train, val
        self.dpo, self.lora, self.cfg, self.device = dpo, lora, cfg, device
        self.max_length = dpo.max_length or model.config.block_size
        self.bs = cfg.batch_size
        self.window: dict[str, list[torch.Tensor]] = {}  # detached per-micro-step tensors, read once per eval
        self.cache: dict[tuple[str, int], torch.Tensor] = {}
        if dpo.ref == "precompute":
            self.precompute()

    # ---- the reference ---------------------------------------------------------------------------------------
    def ref_context(self):
        if self.ref_net is None and self.lora is not None:
            return lora_disabled(self.model)  # the base weights are the reference
        return nullcontext()

    @torch.no_grad()
    def ref_logps(self, batch) -> torch.Tensor:
        net = self.ref_net if self.ref_net is not None else self.model
        with eval_mode(net), self.ref_context():
            return torch.cat(_pair_logps(net, batch))

    def precompute(self) -> None:
        """One pass of the (unchanged) reference over every pair."""
        for split, exs in (("train", self.train), ("val", self.val)):
            for i in range(0, len(exs), self.bs):
                chunk = exs[i:i + self.bs]
                lp = self.ref_logps(pair_batch(self.tok, chunk, self.max_length, self.device))
                n = len(chunk)
                for j in range(n):
                    self.cache[(split, i + j)] = torch.stack([lp[j], lp[n + j]])

    def batch_for(self, split: str, exs, idx) -> tuple:
        """(ids, attn, comp, reference log-probs): chosen rows then rejected rows of the pairs exs[idx]."""
        b = pair_batch(self.tok, [exs[i] for i in idx], self.max_length, self.device)
        if self.dpo.ref == "precompute":
            r = torch.stack([self.cache[(split, int(i))] for i in idx])  # (B, 2)
            rl = torch.cat([r[:, 0], r[:, 1]])
        else:
            rl = self.ref_logps(b)
        return (*b, rl)

    # ---- the Trainer's hooks ---------------------------------------------------------------------------------
    def get_batch(self, step: int, micro: int) -> tuple:
        idx = epoch_batch(len(self.train), self.bs, self.cfg.seed,
                          distributed.stream_index(step, micro, self.cfg.grad_accum))
        return self.batch_for("train", self.train, idx)

    def loss(self, net: nn.Module, batch) -> torch.Tensor:
        d = self.dpo
        pc, pr = _pair_logps(net, batch)
        rl = batch[3]
        n = pc.shape[0]
        loss, rc, rr = dpo_loss(pc, pr, rl[:n], rl[n:], d.beta, d.label_smoothing, d.loss_type)
        for k, v in (("rewards/chosen", rc.mean()), ("rewards/rejected", rr.mean()),
                     ("rewards/margins", (rc - rr).mean()), ("rewards/accuracy", (rc > rr).float().mean())):
            self.window.setdefault(k, []).append(v.detach())
        return loss

    def evaluate(self, net: nn.Module) -> dict[str, Any]:
        """The training window's reward means since the last eval, then the held-out metrics."""
        out: dict[str, Any] = {}
        for k, v in self.window.items():
            if v:
                vals = torch.stack(v).tolist()
                out[k] = sum(vals) / len(vals)
        self.window.clear()
        if self.val:
            out.update(self.val_metrics(net))
        return out

    def val_metrics(self, net: nn.Module) -> dict[str, float]:
        d, val = self.dpo, self.val
        pcs, prs, rls = [], [], []
        for i in range(0, len(val), self.bs):
            b = self.batch_for("val", val, list(range(i, min(i + self.bs, len(val)))))
            pc, pr = _pair_logps(net, b)
            pcs.append(pc)
            prs.append(pr)
            n = pc.shape[0]
            rls.append(b[3].view(2, n).T)
        pc, pr, rl = torch.cat(pcs), torch.cat(prs), torch.cat(rls)
        loss, rc, rr = dpo_loss(pc, pr, rl[:, 0], rl[:, 1], d.beta, d.label_smoothing, d.loss_type)
        return {"val_loss": float(loss), "val_accuracy": float((rc > rr).float().mean()),
                "val_margin": float((rc - rr).mean()), "val_rewards_chosen": float(rc.mean()),
                "val_rewards_rejected": float(rr.mean()), "val_logp_accuracy": float((pc > pr).float().mean())}

    def summary(self, steps: int, start: dict, final: dict, history: list[dict]) -> dict[str, Any]:
        cfg = self.cfg
        summary = {"out_dir": cfg.out_dir, "model": str(Path(cfg.out_dir) / "last"), "steps": steps,
                   "train_pairs": len(self.train), "val_pairs": len(self.val), "beta": self.dpo.beta,
                   "start_val_logp_accuracy": start.get("val_logp_accuracy"),
                   "val_accuracy": final.get("val_accuracy"), "val_margin": final.get("val_margin"),
                   "val_logp_accuracy": final.get("val_logp_accuracy"), "val_loss": final.get("val_loss")}
        if self.lora is not None:
            summary["lora"] = self.lora.to_dict()
        if history:
            summary["train_loss"] = history[-1]["train_loss"]
        return summary


def train_dpo(model_path: str, data: str, cfg: TrainConfig, dpo: DPOConfig | None = None, log=print,
              **fields) -> dict[str, Any]:
    """DPO fine-tuning of `model_path` (any source: checkpoint, HF dir, GGUF) on prompt/chosen/rejected pairs;
    `dpo` holds the objective's settings (or pass DPOConfig fields as keywords). Returns a summary with held-out
    accuracy."""
    dpo = dpo_settings(dpo, **fields)
    lora_cfg = LoRAConfig.parse(dpo.lora) if isinstance(dpo.lora, str) else dpo.lora
    model, tok, device = load_for_training(model_path, cfg)
    train, val = split_prefs(load_prefs(data, tok), dpo.val_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    ref_net = load_reference(dpo, lora_cfg, model, device)
    if lora_cfg is not None:
        apply_lora(model, lora_cfg)
        s = trainable_summary(model)
        log(f"LoRA: {s['trainable']:,} trainable of {s['total']:,} parameters ({s['percent']:.2f}%)")
    obj = DPOObjective(model, ref_net, tok, train, val, dpo, lora_cfg, cfg, device)
    ref = "lora-disabled" if lora_cfg and ref_net is None and dpo.ref == "live" else dpo.ref
    log(f"DPO on {model_path}: {len(train)} train / {len(val)} held-out pairs, beta={dpo.beta}, "
        f"loss={dpo.loss_type}, ref={ref}, {cfg.max_steps} steps")
    groups = None if lora_cfg is not None else model.configure_optimizer_groups(cfg.weight_decay)
    trainer = Trainer(model, cfg, obj.loss, obj.get_batch, int(cfg.max_steps), evaluate=obj.evaluate, tokenizer=tok,
                      param_groups=groups, lora=lora_cfg, base_model=base_model_path(model_path))
    start = trainer.run_eval() if val else {}
    obj.window.clear()
    history = trainer.fit()
    final = trainer.run_eval() if val else {}
    if distributed.info().is_main:
        with JsonlLog(Path(cfg.out_dir) / "metrics.jsonl") as f:
            f.append({"step": trainer.step, **{"final_" + k: v for k, v in final.items()}})
    return obj.summary(trainer.step, start, final, history)
