"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022) through the one Trainer core.

The policy is a Transformer plus a value head on its final hidden states (one forward gives logits and values).
Each rollout: sample completions for a batch of prompts with the engine's batched sampling, score them with the
reward (a reward-model directory, or a `python:module:function` / `python:file.py:function` callable taking
(prompts, completions) -> list[float]), and compute per token

    r_t = -kl_coef * (log pi_old(a_t) - log ref(a_t))   (+ the score on the last completion token)

against a frozen copy of the starting policy, then GAE advantages and returns. kl_coef follows the adaptive KL
controller of Ziegler et al.: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon.

How it plugs into the Trainer: `PPOObjective` holds the run's state (policy, reference, KL controller, the current
rollout) and hands the Trainer bound methods. One Trainer step is one optimizer step on one minibatch.
`get_batch(step)` makes a new rollout every ppo_epochs * minibatches steps and hands out its minibatches
(reshuffled every epoch); `loss` is the clipped PPO objective: clipped policy loss + vf_coef * clipped value loss -
ent_coef * entropy. `evaluate`, called once per rollout, logs the rollout's mean reward, KL, kl_coef, entropy, clip
fraction, policy/value losses and approx KL to metrics.jsonl. (The reward/KL plot: lmstack.train.plot.plot_ppo.)

Checkpoints: the Trainer's layout for the policy (full: a standard checkpoint; lora=: adapter tensors + adapter
files naming the base model; either way `lmstack.load` / generate / serve open it as the trained policy) plus
value_head.safetensors; the KL coefficient, the loss statistics since the last rollout and the per-rollout history
are part of train_state.pt. A checkpoint may fall inside a rollout (`ckpt_interval` needs no alignment): the
rollout being trained on (sampled by an earlier policy, so it can't be re-made) is then saved with it as
rollout.safetensors, and a resumed run carries on with that rollout's remaining minibatches: the same floats as a
run that never stopped.
"""
from __future__ import annotations

import copy
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
from .distributed import launched_world
from .plot import plot_ppo  # noqa: F401  (its home is plot.py; importable from here too)
from .reward import HeadModel, HeadTrainer, load_for_training, load_reward_fn
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


ROLLOUT_FILE = "rollout.safetensors"
ROLLOUT_KEYS = ("ids", "attn", "mask", "logp", "values", "advantages", "returns")  # PPOObjective.data, in order


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


# ---- training ------------------------------------------------------------------------------------------------
def kl_controller(ppo: PPOConfig) -> AdaptiveKLController | FixedKLController:
    return (AdaptiveKLController(ppo.init_kl_coef, ppo.target_kl, ppo.horizon) if ppo.target_kl
            else FixedKLController(ppo.init_kl_coef))


def check_ppo_config(ppo: PPOConfig, block_size: int) -> None:
    """A clear error for settings a PPO run cannot use with a `block_size`-token context window."""
    if ppo.max_new_tokens >= block_size:
        raise LMStackError(f"max_new_tokens={ppo.max_new_tokens} must be smaller than the context window "
                           f"({block_size})")
    if not ppo.temperature > 0:
        raise LMStackError(f"PPO samples its rollouts: temperature must be > 0, got {ppo.temperature}")
    if ppo.rollout_batch % ppo.minibatches:
        raise LMStackError(f"rollout_batch={ppo.rollout_batch} must be divisible by minibatches={ppo.minibatches}")


def build_policy(backbone: nn.Module, ppo: PPOConfig, device,
                 log=print) -> tuple[PolicyValue, nn.Module | None, LoRAConfig | None]:
    """(policy + value head on `device`, the frozen reference, the LoRA config). With LoRA the reference is None:
    it is the same backbone with its adapters disabled (no copy of the model). Draws on the torch RNG (adapter and
    value-head init), so call it right after torch.manual_seed."""
    lora_cfg = LoRAConfig.parse(ppo.lora) if isinstance(ppo.lora, str) else ppo.lora
    if lora_cfg is not None:
        apply_lora(backbone, lora_cfg)
        ref = None
        st = trainable_summary(backbone)
        log(f"LoRA: {st['trainable']:,} trainable of {st['total']:,} policy parameters ({st['percent']:.2f}%)")
    else:
        ref = copy.deepcopy(backbone).eval().requires_grad_(False)
    return PolicyValue(backbone).to(device), ref, lora_cfg


def ppo_schedule(cfg: TrainConfig, updates: int, minibatch: int) -> None:
    """Fit the run's TrainConfig to PPO: one evaluate (the rollout's metrics) per rollout of `updates` optimizer
    steps, no accumulation, minibatch-sized batches; a checkpoint every 10 rollouts unless `ckpt_interval` (any
    number of optimizer steps: a checkpoint inside a rollout saves the rollout too) says otherwise."""
    cfg.eval_interval = updates
    cfg.grad_accum = 1
    cfg.batch_size = minibatch
    if cfg.ckpt_interval is None:
        cfg.ckpt_interval = 10 * updates
    elif cfg.ckpt_interval < 1:
        raise LMStackError(f"ckpt_interval={cfg.ckpt_interval}: a PPO checkpoint interval is a number of optimizer "
                           "steps >= 1")


def save_rollout(d: Path, keys: tuple[str, ...], data: tuple | None, r: int) -> None:
    """Write rollout `r`'s tensors (a None entry is left out) into checkpoint temp dir `d` (PPO and GRPO)."""
    from safetensors.torch import save_file
    if data is not None:
        save_file({k: t.detach().contiguous().cpu() for k, t in zip(keys, data) if t is not None},
                  str(Path(d) / ROLLOUT_FILE), metadata={"rollout": str(r)})


def load_rollout(d: Path, keys: tuple[str, ...], device) -> tuple[int, tuple] | None:
    """(rollout index, tensors in `keys` order, None where absent) from a checkpoint dir, or None if it has none."""
    from safetensors import safe_open
    f = Path(d) / ROLLOUT_FILE
    if not f.exists():
        return None
    with safe_open(str(f), "pt", device=str(device)) as sf:
        have = set(sf.keys())
        return int(sf.metadata()["rollout"]), tuple(sf.get_tensor(k) if k in have else None for k in keys)


class RolloutCheckpoint:
    """Mid-rollout checkpoints for an objective with `updates` optimizer steps per rollout, `data` (its tensors in
    `rollout_keys` order), `r` (the rollout index) and `device` (PPO and GRPO)."""
    rollout_keys: tuple[str, ...] = ()

    def write_rollout(self, d: Path, step: int) -> None:
        """Into checkpoint temp dir `d`: the current rollout, when the checkpoint falls inside it."""
        if step % self.updates:
            save_rollout(d, self.rollout_keys, self.data, self.r)

    def read_rollout(self, d: Path) -> None:
        """On resume: the rollout a mid-rollout checkpoint saved (none at a rollout boundary: it is re-made)."""
        got = load_rollout(d, self.rollout_keys, self.device)
        if got is not None:
            self.r, self.data = got


class PPOObjective(RolloutCheckpoint):
    """One PPO run's state, plugged into the Trainer as bound methods: `get_batch` (a new rollout every
    ppo_epochs * minibatches steps, then its reshuffled minibatches), `loss` (the clipped PPO objective),
    `evaluate` (the rollout's metrics, once per rollout) and `extra_state` / `load_extra` (the KL coefficient)."""
    rollout_keys = ROLLOUT_KEYS

    def __init__(self, policy: PolicyValue, ref: nn.Module | None, tok, prompts: list[str],
                 reward_fn: Callable[[list[str], list[str]], list[float]], ppo: PPOConfig, seed: int,
                 rollouts: int, device, log=print):
        self.policy, self.ref, self.tok, self.prompts, self.reward_fn = policy, ref, tok, prompts, reward_fn
        self.ppo, self.seed, self.rollouts, self.device, self.log = ppo, seed, rollouts, device, log
        self.kl_ctl = kl_controller(ppo)
        self.updates = ppo.ppo_epochs * ppo.minibatches       # optimizer steps per rollout
        self.minibatch = ppo.rollout_batch // ppo.minibatches
        self.stop_ids = {i for i in (tok.eos_id, end_token(tok, True)) if i is not None}
        room = policy.config.block_size - ppo.max_new_tokens
        self.enc = [tok.encode_prompt(p)[-room:] for p in prompts]
        self.r, self.data, self.stats = -1, None, {}
        self.window: dict[str, list[float]] = {}               # loss stats since the last evaluate
        self.history: list[dict] = []                          # one record per rollout
        self.t0 = time.perf_counter()

    # ---- rollouts --------------------------------------------------------------------------------------------
    def ref_logits(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        backbone = self.policy.backbone
        pm = None if backbone.config.causal else attn
        if self.ref is not None:
            return self.ref(ids, padding_mask=pm)
        with lora_disabled(backbone):
            return backbone(ids, padding_mask=pm)

    def sample(self, r: int) -> tuple[Any, list[list[int]], list[list[int]], list[str]]:
        """Rollout r's prompts and completions: (prompt indices, prompt ids, completion ids, completion texts)."""
        ppo = self.ppo
        rng = np.random.default_rng([self.seed, r])
        idx = rng.choice(len(self.enc), ppo.rollout_batch, replace=len(self.enc) < ppo.rollout_batch)
        p_ids = [self.enc[i] for i in idx]
        sp = SamplingParams(max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature, top_k=ppo.top_k,
                            seed=int(rng.integers(2**31)))
        with eval_mode(self.policy):  # no dropout while sampling
            steps = generate_batch(self.policy.backbone, p_ids, sp, eos_id=self.stop_ids)
        comps = [[s.token for s in row] for row in steps]
        texts = [self.tok.decode([t for t in c if t not in self.stop_ids], skip_special_tokens=True) for c in comps]
        return idx, p_ids, comps, texts

    def score(self, idx, texts: list[str]) -> torch.Tensor:
        scores = torch.tensor([float(x) for x in self.reward_fn([self.prompts[i] for i in idx], texts)],
                              dtype=torch.float32, device=self.device)
        if scores.shape[0] != len(texts):
            raise LMStackError(f"the reward returned {scores.shape[0]} scores for {len(texts)} completions")
        return scores

    @torch.no_grad()
    def make_rollout(self, r: int) -> None:
        """Sample and score rollout r; per-token rewards (KL penalty + score), GAE advantages and returns."""
        ppo = self.ppo
        idx, p_ids, comps, texts = self.sample(r)
        scores = self.score(idx, texts)
        ids, attn, comp = collate([(p + c, len(p)) for p, c in zip(p_ids, comps)], device=self.device)
        with eval_mode(self.policy):  # no dropout while scoring the rollout
            logits, values = self.policy(ids, attn)
            ref_logp, _ = policy_logprobs(self.ref_logits(ids, attn), ids, ppo.temperature)
        logp, ent = policy_logprobs(logits, ids, ppo.temperature)
        mask = comp[:, 1:]
        values = values[:, :-1] * mask
        kl = (logp - ref_logp) * mask
        rewards = -self.kl_ctl.value * kl
        last = attn.long().sum(1) - 2                       # action slot of each row's last token
        rewards[torch.arange(len(texts), device=self.device), last] += scores
        adv, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            adv = whiten(adv, mask) * mask
        seq_kl = kl.sum(1)
        self.data = (ids, attn, mask, logp, values, adv, returns)
        self.r = r
        self.stats = self.rollout_stats(r, scores, seq_kl, ent, mask, texts[0])
        self.kl_ctl.update(float(seq_kl.mean()), ppo.rollout_batch)

    def rollout_stats(self, r: int, scores: torch.Tensor, seq_kl: torch.Tensor, ent: torch.Tensor,
                      mask: torch.Tensor, sample: str) -> dict[str, Any]:
        kl_coef = self.kl_ctl.value
        stats = {"rollout": r + 1, "reward": float(scores.mean()),
                 "reward_std": float(scores.std()) if scores.shape[0] > 1 else 0.0,
                 "kl": float(seq_kl.mean()), "kl_coef": kl_coef, "entropy": float(masked_mean(ent, mask)),
                 "completion_len": float(mask.sum(1).float().mean()),
                 "non_score_reward": float(-kl_coef * seq_kl.mean()), "sample": sample}
        if self.ppo.target_kl:
            stats["kl_target"] = self.ppo.target_kl
        return stats

    # ---- the Trainer's hooks ---------------------------------------------------------------------------------
    def get_batch(self, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        r, within = divmod(step, self.updates)
        if r != self.r:
            self.make_rollout(r)
        epoch, k = divmod(within, self.ppo.minibatches)
        perm = torch.from_numpy(np.random.default_rng([self.seed, r, epoch]).permutation(self.ppo.rollout_batch))
        sel = perm[k * self.minibatch:(k + 1) * self.minibatch].to(self.device)
        return tuple(t[sel] for t in self.data)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        ppo = self.ppo
        ids, attn, mask, old_logp, old_values, adv, returns = batch
        logits, values = model(ids, attn)
        logp, ent = policy_logprobs(logits, ids, ppo.temperature)
        pg, vf, st = ppo_losses(logp, old_logp, values[:, :-1], old_values, adv, returns, mask,
                                ppo.cliprange, ppo.cliprange_value)
        entropy = masked_mean(ent, mask)
        for k, v in (("pg_loss", pg.item()), ("vf_loss", vf.item()), ("policy_entropy", entropy.item()), *st.items()):
            self.window.setdefault(k, []).append(v)
        return pg + ppo.vf_coef * vf - ppo.ent_coef * entropy

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        out = {k: v for k, v in self.stats.items() if k != "sample"}
        out.update({k: sum(v) / len(v) for k, v in self.window.items() if v})
        self.window.clear()
        self.history.append(out)
        r, n = out.get("rollout", 0), self.rollouts
        if r == 1 or r % max(1, n // 10) == 0 or r == n:
            self.log(f"rollout {r}/{n}: reward {out['reward']:.3f}  kl {out['kl']:.3f}  "
                     f"kl_coef {out['kl_coef']:.4f}  entropy {out['entropy']:.3f}  "
                     f"clipfrac {out.get('clipfrac', 0):.3f}  [{time.perf_counter() - self.t0:.0f}s]  "
                     f"e.g. {self.stats['sample']!r}")
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_ctl.value, "ppo": asdict(self.ppo), "stats": self.stats, "window": self.window,
                "history": self.history}

    def load_extra(self, d: dict[str, Any]) -> None:
        self.kl_ctl.value = float(d["kl_coef"])
        self.stats, self.window = d.get("stats", {}), d.get("window", {})
        self.history = d.get("history", [])

    def summary(self, cfg: TrainConfig, steps: int) -> dict[str, Any]:
        """Reward and KL averaged over the first and the last few rollouts, and where the run's files are."""
        h = self.history
        k = max(1, min(5, len(h) // 4))
        first, lastk = h[:k], h[-k:]
        mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        return {"out_dir": cfg.out_dir, "model": str(Path(cfg.out_dir) / "last"), "rollouts": len(h),
                "steps": steps, "start_reward": mean(first, "reward"), "end_reward": mean(lastk, "reward"),
                "start_kl": mean(first, "kl"), "end_kl": mean(lastk, "kl"),
                "max_kl": max(r["kl"] for r in h), "final_kl_coef": self.kl_ctl.value,
                "elapsed_s": time.perf_counter() - self.t0, "averaged_over_rollouts": k}


def train_ppo(model_path: str, reward: str | Callable, prompts: str | list[str], cfg: TrainConfig,
              ppo: PPOConfig | None = None, rollouts: int = 50, log=print) -> dict[str, Any]:
    """PPO on `model_path` for `rollouts` rollouts; returns a summary (reward and KL at start and end)."""
    ppo = ppo or PPOConfig()
    if launched_world() > 1:
        raise LMStackError("ppo runs in one process for now (each rank would repeat the same rollouts); launch it "
                           "without torchrun")
    backbone, tok, device = load_for_training(model_path, cfg)
    prompt_texts = load_prompts(prompts, tok) if isinstance(prompts, (str, Path)) else list(prompts)
    reward_fn = load_reward_fn(reward, device)
    check_ppo_config(ppo, backbone.config.block_size)
    torch.manual_seed(cfg.seed)
    policy, ref, lora_cfg = build_policy(backbone, ppo, device, log)
    obj = PPOObjective(policy, ref, tok, prompt_texts, reward_fn, ppo, cfg.seed, rollouts, device, log)
    ppo_schedule(cfg, obj.updates, obj.minibatch)
    log(f"PPO on {model_path}: {rollouts} rollouts of {ppo.rollout_batch} prompts x {ppo.max_new_tokens} tokens, "
        f"{obj.updates} updates each; reward "
        f"{reward if isinstance(reward, str) else getattr(reward, '__name__', reward)}")
    trainer = HeadTrainer(policy, cfg, obj.loss, obj.get_batch, rollouts * obj.updates, evaluate=obj.evaluate,
                          tokenizer=tok, lora=lora_cfg, base_model=base_model_path(model_path))
    trainer.extra_state, trainer.load_extra = obj.extra_state, obj.load_extra
    write_head, read_head = trainer.write_extra, trainer.read_extra
    trainer.write_extra = lambda d: (write_head(d), obj.write_rollout(d, trainer.step))
    trainer.read_extra = lambda d: (read_head(d), obj.read_rollout(d))
    trainer.fit()
    return obj.summary(cfg, trainer.step)
