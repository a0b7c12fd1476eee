"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022) through the one Trainer core.

The policy is a Transformer plus a value head on its final hidden states (one forward gives logits and values).
Each rollout: sample completions for a batch of prompts with the engine's batched sampling, score them with the
reward (a reward-model directory, or a `python:module:function` / `python:file.py:function` callable taking
(prompts, completions) -> list[float]), and compute per token

    r_t = -kl_coef * (log pi_old(a_t) - log ref(a_t))   (+ the score on the last completion token)

against a frozen copy of the starting policy, then GAE advantages and returns. kl_coef follows the adaptive KL
controller of Ziegler et al.: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon.

How it plugs into the Trainer: one Trainer step is one optimizer step on one minibatch. `get_batch(step)` makes a
new rollout every ppo_epochs * minibatches steps and hands out its minibatches (reshuffled every epoch);
`loss_fn` is the clipped PPO objective: clipped policy loss + vf_coef * clipped value loss - ent_coef * entropy.
The Trainer's evaluate hook, called once per rollout, logs the rollout's mean reward, KL, kl_coef, entropy, clip
fraction, policy/value losses and approx KL to metrics.jsonl.

Checkpoints: the Trainer's layout for the policy (full: a standard checkpoint; lora=: adapter tensors + adapter
files naming the base model; either way `lmstack.load` / generate / serve open it as the trained policy) plus
value_head.safetensors; the KL coefficient is part of train_state.pt. Both resume exactly at a rollout boundary.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ..data.prefs import collate, end_token, load_prompts
from ..errors import LMStackError
from ..generate import SamplingParams, generate_batch
from ..models.lora import LoRAConfig, apply_lora, lora_disabled, trainable_summary
from ..models.utils import eval_mode
from .config import TrainConfig
from .reward import HeadModel, HeadTrainer, is_reward_model, load_for_training, load_reward_model
from .trainer import base_model_path


@dataclass
class PPOConfig:
    rollout_batch: int = 16           # prompts per rollout
    max_new_tokens: int = 24
    temperature: float = 1.0          # sampling temperature (log-probabilities use the same scaled logits)
    top_k: int = 0
    ppo_epochs: int = 4               # passes over each rollout
    minibatches: int = 1              # minibatches per pass (one optimizer step each)
    init_kl_coef: float = 0.1
    target_kl: float | None = 6.0     # None: fixed kl_coef; else adaptive towards this KL (nats per sequence)
    horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    whiten_advantages: bool = True
    lora: str | None = None           # LoRA spec: train policy adapters (+ the value head); the reference is the
                                      # policy with its adapters disabled (no copy of the model)


# ---- the pieces, each testable on its own --------------------------------------------------------------------
class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): proportional control of the KL coefficient towards a target KL."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current: float, n_steps: int) -> None:
        err = float(np.clip(current / self.target - 1, -0.2, 0.2))
        self.value *= 1 + err * n_steps / self.horizon


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over action slots (B, T); mask marks real actions (a contiguous run per
    row). The value after a row's last action is 0 (episode end). Returns (advantages, returns = adv + values)."""
    B, T = rewards.shape
    m = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        nxt_m = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        nxt_v = values[:, t + 1] * nxt_m if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt_v - values[:, t]
        last = delta + gamma * lam * last * nxt_m
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + values) * m


def ppo_losses(logp: torch.Tensor, old_logp: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
               adv: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange: float = 0.2,
               cliprange_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(clipped policy loss, clipped value loss, stats) over masked action slots."""
    ratio = torch.exp(logp - old_logp)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(torch.maximum(pg1, pg2), mask)
    v_clip = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clip - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"clipfrac": float(masked_mean((pg2 > pg1).float(), mask)),
                 "approx_kl": float(masked_mean(0.5 * (logp - old_logp) ** 2, mask)),
                 "vf_clipfrac": float(masked_mean(((values - returns) ** 2 < (v_clip - returns) ** 2).float(), mask))}
    return pg_loss, vf_loss, stats


class PolicyValue(HeadModel):
    """Policy Transformer + value head: forward(ids, attn) -> (logits (B, T, V), values (B, T))."""

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone, 1, "value_head")
        nn.init.zeros_(self.head.weight)

    def forward(self, ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(ids, attn)
        return self.backbone.lm_head(h), self.head(h).squeeze(-1).float()


def policy_logprobs(logits: torch.Tensor, ids: torch.Tensor,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling policy at `temperature`: (log p of each next token (B, T-1), entropy of each next-token
    distribution (B, T-1)), both from logits / temperature."""
    lp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    chosen = lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    ent = -(lp.exp() * lp).sum(-1)
    return chosen, ent


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


# ---- training ------------------------------------------------------------------------------------------------
def train_ppo(model_path: str, reward: str | Callable, prompts: str | list[str], cfg: TrainConfig,
              ppo: PPOConfig | None = None, rollouts: int = 50, log=print) -> dict[str, Any]:
    """PPO on `model_path` for `rollouts` rollouts; returns a summary (reward and KL at start and end)."""
    ppo = ppo or PPOConfig()
    backbone, tok, device = load_for_training(model_path, cfg)
    prompt_texts = load_prompts(prompts, tok) if isinstance(prompts, (str, Path)) else list(prompts)
    reward_fn = load_reward_fn(reward, device)
    if ppo.max_new_tokens >= backbone.config.block_size:
        raise LMStackError(f"max_new_tokens={ppo.max_new_tokens} must be smaller than the context window "
                           f"({backbone.config.block_size})")
    if not ppo.temperature > 0:
        raise LMStackError(f"PPO samples its rollouts: temperature must be > 0, got {ppo.temperature}")
    if ppo.rollout_batch % ppo.minibatches:
        raise LMStackError(f"rollout_batch={ppo.rollout_batch} must be divisible by minibatches={ppo.minibatches}")
    torch.manual_seed(cfg.seed)
    lora_cfg = LoRAConfig.parse(ppo.lora) if isinstance(ppo.lora, str) else ppo.lora
    if lora_cfg is not None:
        apply_lora(backbone, lora_cfg)  # the reference: the same backbone with its adapters disabled
        ref = None
        st = trainable_summary(backbone)
        log(f"LoRA: {st['trainable']:,} trainable of {st['total']:,} policy parameters ({st['percent']:.2f}%)")
    else:
        ref = copy.deepcopy(backbone).eval().requires_grad_(False)
    policy = PolicyValue(backbone).to(device)

    def ref_logits(ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        pm = None if backbone.config.causal else attn
        if ref is not None:
            return ref(ids, padding_mask=pm)
        with lora_disabled(backbone):
            return backbone(ids, padding_mask=pm)
    kl_ctl = (AdaptiveKLController(ppo.init_kl_coef, ppo.target_kl, ppo.horizon) if ppo.target_kl
              else FixedKLController(ppo.init_kl_coef))
    U = ppo.ppo_epochs * ppo.minibatches               # optimizer steps per rollout
    mb = ppo.rollout_batch // ppo.minibatches
    max_steps = rollouts * U
    stop_ids = {i for i in (tok.eos_id, end_token(tok, True)) if i is not None}
    room = backbone.config.block_size - ppo.max_new_tokens
    enc = [tok.encode_prompt(p)[-room:] for p in prompt_texts]
    state: dict[str, Any] = {"r": -1, "data": None, "stats": {}, "window": {}}
    history_rollouts: list[dict] = []
    t0 = time.perf_counter()

    @torch.no_grad()
    def make_rollout(r: int) -> None:
        rng = np.random.default_rng([cfg.seed, r])
        idx = rng.choice(len(enc), ppo.rollout_batch, replace=len(enc) < ppo.rollout_batch)
        p_ids = [enc[i] for i in idx]
        sp = SamplingParams(max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature, top_k=ppo.top_k,
                            seed=int(rng.integers(2**31)))
        with eval_mode(policy):  # no dropout while sampling or scoring the rollout
            steps = generate_batch(policy.backbone, p_ids, sp, eos_id=stop_ids)
        comps = [[s.token for s in row] for row in steps]
        texts = [tok.decode([t for t in c if t not in stop_ids], skip_special_tokens=True) for c in comps]
        scores = torch.tensor([float(x) for x in reward_fn([prompt_texts[i] for i in idx], texts)],
                              dtype=torch.float32, device=device)
        if scores.shape[0] != len(texts):
            raise LMStackError(f"the reward returned {scores.shape[0]} scores for {len(texts)} completions")
        ids, attn, comp = collate([(p + c, len(p)) for p, c in zip(p_ids, comps)], device=device)
        with eval_mode(policy):
            logits, values = policy(ids, attn)
            ref_logp, _ = policy_logprobs(ref_logits(ids, attn), ids, ppo.temperature)
        logp, ent = policy_logprobs(logits, ids, ppo.temperature)
        mask = comp[:, 1:]
        values = values[:, :-1] * mask
        kl = (logp - ref_logp) * mask
        rewards = -kl_ctl.value * kl
        last = attn.long().sum(1) - 2                       # action slot of each row's last token
        rewards[torch.arange(len(texts), device=device), last] += scores
        adv, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            adv = whiten(adv, mask) * mask
        seq_kl = kl.sum(1)
        state["data"] = (ids, attn, mask, logp, values, adv, returns)
        state["r"] = r
        state["stats"] = {"rollout": r + 1, "reward": float(scores.mean()),
                          "reward_std": float(scores.std()) if len(texts) > 1 else 0.0,
                          "kl": float(seq_kl.mean()), "kl_coef": kl_ctl.value,
                          "entropy": float(masked_mean(ent, mask)),
                          "completion_len": float(mask.sum(1).float().mean()),
                          "non_score_reward": float(-kl_ctl.value * seq_kl.mean()),
                          "sample": texts[0]}
        if ppo.target_kl:
            state["stats"]["kl_target"] = ppo.target_kl
        kl_ctl.update(float(seq_kl.mean()), ppo.rollout_batch)

    def get_batch(step: int, micro: int):
        r, within = divmod(step, U)
        if r != state["r"]:
            make_rollout(r)
        epoch, k = divmod(within, ppo.minibatches)
        perm = torch.from_numpy(np.random.default_rng([cfg.seed, r, epoch]).permutation(ppo.rollout_batch))
        sel = perm[k * mb:(k + 1) * mb].to(device)
        return tuple(t[sel] for t in state["data"])

    def loss_fn(model, batch):
        ids, attn, mask, old_logp, old_values, adv, returns = batch
        logits, values = model(ids, attn)
        logp, ent = policy_logprobs(logits, ids, ppo.temperature)
        pg, vf, st = ppo_losses(logp, old_logp, values[:, :-1], old_values, adv, returns, mask,
                                ppo.cliprange, ppo.cliprange_value)
        entropy = masked_mean(ent, mask)
        w = state["window"]
        for k, v in (("pg_loss", pg.item()), ("vf_loss", vf.item()), ("policy_entropy", entropy.item()), *st.items()):
            w.setdefault(k, []).append(v)
        return pg + ppo.vf_coef * vf - ppo.ent_coef * entropy

    def evaluate(model) -> dict[str, Any]:
        out = {k: v for k, v in state["stats"].items() if k != "sample"}
        out.update({k: sum(v) / len(v) for k, v in state["window"].items() if v})
        state["window"].clear()
        history_rollouts.append(out)
        r = out.get("rollout", 0)
        if r == 1 or r % max(1, rollouts // 10) == 0 or r == rollouts:
            log(f"rollout {r}/{rollouts}: reward {out['reward']:.3f}  kl {out['kl']:.3f}  "
                f"kl_coef {out['kl_coef']:.4f}  entropy {out['entropy']:.3f}  clipfrac {out.get('clipfrac', 0):.3f}"
                f"  [{time.perf_counter() - t0:.0f}s]  e.g. {state['stats']['sample']!r}")
        return out

    cfg.eval_interval = U
    cfg.grad_accum = 1
    cfg.batch_size = mb
    if cfg.ckpt_interval is None or cfg.ckpt_interval % U:
        cfg.ckpt_interval = U * max(1, (cfg.ckpt_interval or 10 * U) // U)
    log(f"PPO on {model_path}: {rollouts} rollouts of {ppo.rollout_batch} prompts x {ppo.max_new_tokens} tokens, "
        f"{U} updates each; reward {reward if isinstance(reward, str) else getattr(reward, '__name__', reward)}")
    trainer = HeadTrainer(policy, cfg, loss_fn, get_batch, max_steps, evaluate=evaluate, tokenizer=tok,
                          lora=lora_cfg, base_model=base_model_path(model_path))
    trainer.extra_state = lambda: {"kl_coef": kl_ctl.value, "ppo": asdict(ppo)}
    trainer.load_extra = lambda d: setattr(kl_ctl, "value", float(d["kl_coef"]))
    trainer.fit()
    k = max(1, min(5, len(history_rollouts) // 4))
    first, lastk = history_rollouts[:k], history_rollouts[-k:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    summary = {"out_dir": cfg.out_dir, "model": str(Path(cfg.out_dir) / "last"), "rollouts": len(history_rollouts),
               "steps": trainer.step, "start_reward": mean(first, "reward"), "end_reward": mean(lastk, "reward"),
               "start_kl": mean(first, "kl"), "end_kl": mean(lastk, "kl"),
               "max_kl": max(r["kl"] for r in history_rollouts), "final_kl_coef": kl_ctl.value,
               "elapsed_s": time.perf_counter() - t0, "averaged_over_rollouts": k}
    return summary


def plot_ppo(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """PNG of mean reward and KL per rollout from a PPO run's metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .plot import read_metrics
    rows = [r for r in read_metrics(run_dir) if "reward" in r]
    if not rows:
        raise LMStackError(f"{run_dir}/metrics.jsonl has no PPO rollout records")
    x = [r["rollout"] for r in rows]
    fig, (ax, ax3) = plt.subplots(2, 1, figsize=(7, 5.6), dpi=110, sharex=True, height_ratios=[3, 1])
    ax.plot(x, [r["reward"] for r in rows], label="mean reward", c="C0")
    ax.set_ylabel("mean reward", color="C0")
    ax2 = ax.twinx()
    ax2.plot(x, [r["kl"] for r in rows], label="KL(policy || ref) per sequence", c="C3")
    if rows[-1].get("kl_target"):
        ax2.axhline(rows[-1]["kl_target"], ls="--", c="C3", lw=1, alpha=0.6, label="KL target")
    ax2.set_ylabel("KL (nats / sequence)", color="C3")
    ax.set_title(f"PPO: {Path(run_dir).resolve().name}")
    ax.grid(alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax3.plot(x, [r["kl_coef"] for r in rows], c="C2")
    ax3.set_ylabel("kl_coef")
    ax3.set_xlabel("rollout")
    ax3.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "ppo.png"
    fig.savefig(out)
    plt.close(fig)
    return out
