"""GRPO (Shao et al. 2024, DeepSeekMath) with verifiable rewards, through the one Trainer core.

No value head and no reward model: each step samples `group_size` completions for each of `prompts_per_step`
prompts with the engine's continuous batcher (temperature > 0), scores them with a verifiable reward
(lmstack.train.rewards: exact match, numeric tolerance, regex, Python unit tests, or a python: function), and gives
every token of completion i of a group the same advantage

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)        (scale_rewards=False: r_i - mean, as Dr. GRPO)

so a group whose completions all score the same contributes nothing. The loss is PPO's clipped surrogate per
token, averaged over all completion tokens of the minibatch ("token" aggregation; "sequence": each completion's
mean, then the mean over completions, as the original GRPO), plus an optional KL penalty to the reference policy
with the k3 estimator (Schulman 2020), per token, with d = log ref - log pi:

    loss_t = max(-A ratio_t, -A clip(ratio_t, 1 - eps, 1 + eps_high)) + kl_coef * (exp(d) - d - 1)

The old log-probabilities are those of the policy that sampled the rollout. With ppo_epochs = minibatches = 1
(the default: one update per rollout) the ratio is exactly 1 and they are not recomputed (logp.detach()).

How it plugs in (as lmstack.train.ppo does): `GRPOObjective` hands the Trainer bound methods; one Trainer step is
one optimizer step on one minibatch; `get_batch` makes a new rollout every ppo_epochs * minibatches steps;
`evaluate` runs once per rollout and logs reward mean/std, accuracy, KL, entropy, completion length and clip fraction
to metrics.jsonl (and, every `eval_every` rollouts, greedy accuracy on held-out prompts). Checkpoints are the
Trainer's (full, or LoRA adapters whose reference is the base model via `lora_disabled`) and resume exactly at a
rollout boundary or, from the rollout a checkpoint inside one saved (rollout.safetensors), between its
minibatch updates. `time_budget_s` stops a run cleanly at the first rollout boundary after that much training time.
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ..data.jsonl import read_jsonl
from ..data.prefs import collate, end_token, load_prompts
from ..errors import LMStackError
from ..generate import SamplingParams, generate_batch
from ..models.lora import LoRAConfig, apply_lora, lora_disabled, merge_lora, trainable_summary
from ..models.utils import eval_mode
from .config import TrainConfig
from .distributed import launched_world
from .ppo import RolloutCheckpoint, masked_mean, ppo_schedule
from .reward import load_for_training
from .rewards import answers_match, extract_answer, load_rewards
from .trainer import Trainer, base_model_path


ROLLOUT_KEYS = ("ids", "mask", "adv", "old_logp", "ref_logp")  # GRPOObjective.data, in a mid-rollout checkpoint


@dataclass
class GRPOConfig:
    group_size: int = 8               # completions per prompt
    prompts_per_step: int = 4         # prompts per rollout (a rollout = prompts_per_step * group_size samples)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    ppo_epochs: int = 1               # passes over each rollout
    minibatches: int = 1              # minibatches per pass (one optimizer step each)
    cliprange: float = 0.2            # eps (low side)
    cliprange_high: float | None = None  # eps on the high side (DAPO's clip-higher); None = cliprange
    kl_coef: float = 0.0              # beta of the k3 KL penalty to the reference (0: no reference forward in loss)
    scale_rewards: bool = True        # divide by the group's std (False: Dr. GRPO)
    loss_agg: str = "token"           # "token" | "sequence"
    eps: float = 1e-4
    eval_every: int = 0               # greedy held-out accuracy every N rollouts (0: never; needs eval records)
    rollout_dtype: str = "auto"       # weights of the sampling copy: auto (bfloat16 when the run trains under bf16
                                      # autocast, else the policy itself samples) | bfloat16 | float32 (a copy)
    lora: str | None = None
    filter_groups: bool = False       # update only on groups whose rewards differ (DAPO's dynamic sampling): a group
                                      # of equal rewards has zero advantage, so its rows only dilute the update
    oversample: int = 1               # sample prompts_per_step * oversample groups, keep up to prompts_per_step of
                                      # them, those with a reward spread first


# ---- the pieces, each testable on its own --------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Per-completion advantages from rewards laid out group by group ((P * G,) -> (P * G,)): reward minus its
    group's mean, divided by the group's (unbiased) std + eps when `scale`. A group of equal rewards gets 0."""
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale and group_size > 1:
        std = r.std(1, keepdim=True)
        adv = torch.where(std > 0, adv / (std + eps), torch.zeros_like(adv))
    return adv.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1 with d = ref - pi (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              cliprange: float = 0.2, cliprange_high: float | None = None, ref_logp: torch.Tensor | None = None,
              kl_coef: float = 0.0, agg: str = "token") -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss over masked completion tokens (B, T) with per-sequence advantages adv (B,); stats: clip
    fraction, k3 KL (when ref_logp is given), policy loss."""
    ratio = torch.exp(logp - old_logp)
    a = adv.to(logp.dtype)[:, None]
    hi = cliprange if cliprange_high is None else cliprange_high
    pg1, pg2 = -a * ratio, -a * ratio.clamp(1 - cliprange, 1 + hi)
    per_tok = torch.maximum(pg1, pg2)
    stats: dict[str, float] = {}
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        stats["kl"] = float(masked_mean(kl.detach(), mask))
        if kl_coef:
            per_tok = per_tok + kl_coef * kl
    agg_fn = (lambda x: masked_mean(x, mask)) if agg == "token" else (lambda x: masked_mean(x, mask, dim=1).mean())
    loss = agg_fn(per_tok)
    with torch.no_grad():
        stats["clipfrac"] = float(masked_mean((pg2 > pg1).float(), mask))
        stats["pg_loss"] = float(agg_fn(torch.maximum(pg1, pg2)))
    return loss, stats


def completion_logprobs(backbone: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next token, entropy of its distribution), both (B, T-1) and 0 off `mask` (B, T-1): the LM head
    and softmax run on the completion positions only (a prompt is usually most of a row)."""
    h = backbone(ids, return_hidden=True)[:, :-1]
    sel = mask.nonzero(as_tuple=True)
    lp = torch.log_softmax(backbone.lm_head(h[sel]).float() / temperature, dim=-1)
    chosen = lp.gather(-1, ids[:, 1:][sel].unsqueeze(-1)).squeeze(-1)
    ent = -(lp.exp() * lp).sum(-1)
    out_lp = torch.zeros(mask.shape, dtype=chosen.dtype, device=ids.device)
    out_ent = torch.zeros(mask.shape, dtype=ent.dtype, device=ids.device)
    return out_lp.index_put(sel, chosen), out_ent.index_put(sel, ent.detach())


def load_records(path: str | Path | list, tokenizer=None) -> list[dict]:
    """Prompt records: each {"prompt": the rendered prompt text, ...the line's other fields ("answer", "tests",
    ...)}. A .jsonl prompts file (rendered by data.prefs.load_prompts: chat prompts through the chat template),
    a text file of prompts (no answers), or a list of dicts / strings."""
    if isinstance(path, (list, tuple)):
        rows = [r if isinstance(r, dict) else {"prompt": r} for r in path]
        if not rows or any(not isinstance(r.get("prompt"), str) for r in rows):
            raise LMStackError("prompt records need a 'prompt' string each")
        return rows
    prompts = load_prompts(path, tokenizer)
    if Path(path).suffix != ".jsonl":
        return [{"prompt": p} for p in prompts]
    rows = [row for _, row in read_jsonl(path)]
    return [{**row, "prompt": p} for row, p in zip(rows, prompts)]


def check_grpo_config(g: GRPOConfig, block_size: int) -> None:
    if g.group_size < 2:
        raise LMStackError(f"--group-size must be >= 2 (advantages compare completions within a group), "
                           f"got {g.group_size}")
    if g.prompts_per_step < 1:
        raise LMStackError(f"--prompts-per-step must be >= 1, got {g.prompts_per_step}")
    if not 0 < g.max_new_tokens < block_size:
        raise LMStackError(f"max_new_tokens={g.max_new_tokens} must be in 1..{block_size - 1} (the context window)")
    if not g.temperature > 0:
        raise LMStackError(f"GRPO samples its groups: temperature must be > 0, got {g.temperature}")
    if (g.prompts_per_step * g.group_size) % g.minibatches:
        raise LMStackError(f"prompts_per_step * group_size = {g.prompts_per_step * g.group_size} must be divisible "
                           f"by minibatches={g.minibatches}")
    if g.oversample < 1:
        raise LMStackError(f"--oversample must be >= 1 (groups sampled per kept group), got {g.oversample}")
    if g.filter_groups and g.group_size % g.minibatches:
        raise LMStackError(f"--filter-groups keeps whole groups: group_size={g.group_size} must be divisible by "
                           f"minibatches={g.minibatches}")
    if g.loss_agg not in ("token", "sequence"):
        raise LMStackError(f"loss_agg must be 'token' or 'sequence', got {g.loss_agg!r}")


def generate_completions(model: nn.Module, tok, prompts: list[str], params: SamplingParams,
                         max_batch: int | None = None) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """(prompt ids, completion ids with their stop token, completion texts) through the continuous batcher."""
    stop_ids = {i for i in (tok.eos_id, end_token(tok, True)) if i is not None}
    room = model.config.block_size - params.max_new_tokens
    p_ids = [tok.encode_prompt(p)[-room:] for p in prompts]
    with eval_mode(model):
        steps = generate_batch(model, p_ids, params, eos_id=stop_ids, max_batch=max_batch)
    comps = [[s.token for s in row] for row in steps]
    texts = [tok.decode([t for t in c if t not in stop_ids], skip_special_tokens=True) for c in comps]
    return p_ids, comps, texts


@torch.no_grad()
def answer_accuracy(model: nn.Module, tok, records: list[dict], max_new_tokens: int = 64, batch: int = 64,
                    autocast=None) -> dict[str, Any]:
    """Greedy exact match on records with an "answer": `accuracy` (the final answer, `####` or else the last
    number: rewards.extract_answer) and `strict_accuracy` (a `####` answer only), plus the completions."""
    texts: list[str] = []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    with autocast or nullcontext():
        for i in range(0, len(records), batch):
            texts += generate_completions(model, tok, [r["prompt"] for r in records[i:i + batch]], params)[2]
    ok = [answers_match(extract_answer(t), r.get("answer")) for t, r in zip(texts, records)]
    strict = [answers_match(extract_answer(t, strict=True), r.get("answer")) for t, r in zip(texts, records)]
    n = max(1, len(records))
    return {"accuracy": sum(ok) / n, "strict_accuracy": sum(strict) / n, "n": len(records), "completions": texts}


# ---- training ------------------------------------------------------------------------------------------------
def build_grpo_policy(backbone: nn.Module, lora: str | LoRAConfig | None,
                      log=print) -> tuple[nn.Module | None, LoRAConfig | None]:
    """(frozen reference or None, LoRA config). With LoRA the reference is the backbone with its adapters disabled
    (no copy); otherwise a frozen copy. Draws on the torch RNG (adapter init): call it right after manual_seed."""
    cfg = LoRAConfig.parse(lora) if isinstance(lora, str) else lora
    if cfg is None:
        return copy.deepcopy(backbone).eval().requires_grad_(False), None
    apply_lora(backbone, cfg)
    st = trainable_summary(backbone)
    log(f"LoRA: {st['trainable']:,} trainable of {st['total']:,} parameters ({st['percent']:.2f}%)")
    return None, cfg


def rollout_copy(policy: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A plain inference copy of the policy for sampling: LoRA adapters merged into the weights, cast to `dtype`
    (bf16 weights decode several times faster on a CPU than float32 weights under autocast)."""
    m = copy.deepcopy(policy)
    return merge_lora(m).to(dtype).eval().requires_grad_(False)


class GRPOObjective(RolloutCheckpoint):
    """One GRPO run's state, plugged into the Trainer as bound methods: `get_batch` (a new rollout of groups every
    ppo_epochs * minibatches steps, then its reshuffled minibatches), `loss` (clipped surrogate + k3 KL),
    `evaluate` (the rollout's metrics, once per rollout)."""
    rollout_keys = ROLLOUT_KEYS

    def __init__(self, policy: nn.Module, ref: nn.Module | None, tok, records: list[dict], reward_fn: Callable,
                 g: GRPOConfig, seed: int, steps: int, device, eval_records: list[dict] | None = None, log=print,
                 time_budget_s: float | None = None):
        self.policy, self.ref, self.tok, self.records, self.reward_fn = policy, ref, tok, records, reward_fn
        self.g, self.seed, self.steps, self.device, self.log = g, seed, steps, device, log
        self.eval_records, self.time_budget_s = eval_records or [], time_budget_s
        self.updates = g.ppo_epochs * g.minibatches
        self.n = g.prompts_per_step * g.group_size
        self.minibatch = self.n // g.minibatches
        self.r, self.data, self.stats, self.window = -1, None, {}, {}
        self.history: list[dict] = []
        self.autocast = nullcontext()     # set to the Trainer's (bf16 autocast) once it exists
        self.rollout_dtype: torch.dtype | None = None  # attach()
        self.trainer: Trainer | None = None
        self.t0 = time.perf_counter()

    def ref_logprobs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.ref is not None:
            return completion_logprobs(self.ref, ids, mask, self.g.temperature)[0]
        with lora_disabled(self.policy):
            return completion_logprobs(self.policy, ids, mask, self.g.temperature)[0]

    @torch.no_grad()
    def make_rollout(self, r: int) -> None:
        g, t0 = self.g, time.perf_counter()
        rng = np.random.default_rng([self.seed, r])
        n_groups = g.prompts_per_step * g.oversample
        idx = rng.choice(len(self.records), n_groups, replace=len(self.records) < n_groups)
        recs = [self.records[i] for i in idx for _ in range(g.group_size)]
        sp = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                            seed=int(rng.integers(2**31)))
        sampler = self.policy if self.rollout_dtype is None else rollout_copy(self.policy, self.rollout_dtype)
        with self.autocast:
            p_ids, comps, texts = generate_completions(sampler, self.tok, [x["prompt"] for x in recs], sp)
        del sampler
        t_gen = time.perf_counter() - t0
        scores = torch.tensor(self.reward_fn([x["prompt"] for x in recs], texts, recs), dtype=torch.float32)
        if scores.shape != (len(recs),):
            raise LMStackError(f"the reward returned {scores.numel()} scores for {len(recs)} completions")
        grouped = scores.view(-1, g.group_size)
        spread = grouped.std(1) > 0
        keep = self.kept_groups(spread)
        rows = (keep[:, None] * g.group_size + torch.arange(g.group_size)).flatten()
        adv = group_advantages(scores, g.group_size, g.scale_rewards, g.eps)[rows].to(self.device)
        acc = [answers_match(extract_answer(t), x.get("answer")) for t, x in zip(texts, recs)]
        fmt = [extract_answer(t, strict=True) is not None for t in texts]
        self.stats = {"rollout": r + 1, "reward": float(scores.mean()), "reward_std": float(scores.std()),
                      "accuracy": sum(acc) / len(acc), "format_rate": sum(fmt) / len(fmt),
                      "zero_std_groups": float((~spread).float().mean()), "kept_groups": len(keep),
                      "completion_len": float(np.mean([len(c) for c in comps])),
                      "truncated": float(np.mean([len(c) >= g.max_new_tokens for c in comps])),
                      "sample_s": t_gen, "sample": texts[0]}
        p_ids, comps = [p_ids[i] for i in rows.tolist()], [comps[i] for i in rows.tolist()]
        ids, attn, comp = collate([(p + c, len(p)) for p, c in zip(p_ids, comps)], device=self.device)
        mask = comp[:, 1:]
        with eval_mode(self.policy), self.autocast:
            old = completion_logprobs(self.policy, ids, mask, g.temperature)[0] if self.updates > 1 else None
            ref = self.ref_logprobs(ids, mask)
        self.data = (ids, mask, adv, old, ref)
        self.r = r
        self.stats["rollout_s"] = time.perf_counter() - t0

    def kept_groups(self, spread: torch.Tensor) -> torch.Tensor:
        """Indices of the groups the update uses: all of them (plain GRPO); with oversampling, prompts_per_step
        of them, those with a reward spread first; with filter_groups, only those with a spread (one group if none
        has: an update of zero advantage, which keeps the step count and the KL term)."""
        g = self.g
        order = torch.cat([torch.nonzero(spread).flatten(), torch.nonzero(~spread).flatten()])
        if g.filter_groups:
            return order[:max(1, min(int(spread.sum()), g.prompts_per_step))]
        return order[:g.prompts_per_step] if g.oversample > 1 else torch.arange(len(spread))

    def attach(self, trainer: Trainer) -> None:
        """Take the Trainer's autocast (rollouts and evals run under it too) and pick the sampling weights."""
        self.trainer, self.autocast = trainer, trainer.autocast
        name = self.g.rollout_dtype
        if name == "auto":
            name = "bfloat16" if trainer.dtype == "bfloat16" and trainer.device.type == "cpu" else None
        if name not in (None, "bfloat16", "float32"):
            raise LMStackError(f"rollout_dtype must be auto, bfloat16 or float32, got {name!r}")
        self.rollout_dtype = getattr(torch, name) if name else None

    # ---- the Trainer's hooks ---------------------------------------------------------------------------------
    def get_batch(self, step: int, micro: int) -> tuple:
        r, within = divmod(step, self.updates)
        if r != self.r:
            self.make_rollout(r)
        epoch, k = divmod(within, self.g.minibatches)
        n = self.data[0].shape[0]  # filter_groups: fewer rows than prompts_per_step * group_size
        mb = -(-n // self.g.minibatches)
        perm = torch.from_numpy(np.random.default_rng([self.seed, r, epoch]).permutation(n))
        sel = perm[k * mb:(k + 1) * mb].to(self.device)
        return tuple(None if t is None else t[sel] for t in self.data)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        g = self.g
        ids, mask, adv, old, ref = batch
        logp, ent = completion_logprobs(model, ids, mask, g.temperature)
        loss, st = grpo_loss(logp, logp.detach() if old is None else old, adv, mask, g.cliprange, g.cliprange_high,
                             ref, g.kl_coef, g.loss_agg)
        st["entropy"] = float(masked_mean(ent, mask))
        for k, v in st.items():
            self.window.setdefault(k, []).append(v)
        return loss

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        out = {k: v for k, v in self.stats.items() if k != "sample"}
        out.update({k: sum(v) / len(v) for k, v in self.window.items() if v})
        self.window.clear()
        r, n = out["rollout"], self.steps
        over = (self.time_budget_s is not None and self.trainer is not None
                and self.trainer.train_s >= self.time_budget_s)
        if self.eval_records and (over or r == n or (self.g.eval_every and r % self.g.eval_every == 0)):
            sampler = model if self.rollout_dtype is None else rollout_copy(self.policy, self.rollout_dtype)
            ev = answer_accuracy(sampler, self.tok, self.eval_records, self.g.max_new_tokens, autocast=self.autocast)
            out.update(eval_accuracy=ev["accuracy"], eval_strict_accuracy=ev["strict_accuracy"])
        self.history.append(out)
        if r == 1 or r % max(1, n // 20) == 0 or r == n or over or "eval_accuracy" in out:
            held = f"  held-out acc {out['eval_accuracy']:.3f}" if "eval_accuracy" in out else ""
            self.log(f"step {r}/{n}: reward {out['reward']:.3f} +- {out['reward_std']:.3f}  acc {out['accuracy']:.3f}"
                     f"  kl {out.get('kl', 0):.4f}  entropy {out.get('entropy', 0):.3f}"
                     f"  len {out['completion_len']:.1f}"
                     f"  clipfrac {out.get('clipfrac', 0):.3f}{held}  [{time.perf_counter() - self.t0:.0f}s]  "
                     f"e.g. {self.stats['sample'][:80]!r}")
        if over and self.trainer.step < self.trainer.max_steps:
            self.log(f"time budget of {self.time_budget_s:.0f}s of training reached: stopping after step {r}")
            self.trainer.max_steps = self.trainer.step  # the loop ends after this step (checkpointed by train_grpo)
        return out

    @staticmethod
    def best_summary(cfg: TrainConfig, evals: list[dict]) -> dict[str, Any]:
        """The most accurate evaluated rollout (the Trainer saved it as <out>/best when keep_best)."""
        if not evals:
            return {}
        best = max(evals, key=lambda x: x["eval_accuracy"])  # first of equals: the Trainer keeps strict gains
        have = cfg.keep_best and (Path(cfg.out_dir) / "best").exists()
        return {"best_eval_accuracy": best["eval_accuracy"], "best_step": best["rollout"],
                "best_model": str(Path(cfg.out_dir) / "best") if have else None}

    def extra_state(self) -> dict[str, Any]:
        return {"grpo": asdict(self.g), "stats": self.stats, "window": self.window, "history": self.history}

    def load_extra(self, d: dict[str, Any]) -> None:
        self.stats, self.window, self.history = d.get("stats", {}), d.get("window", {}), d.get("history", [])

    def summary(self, cfg: TrainConfig, steps: int) -> dict[str, Any]:
        h = self.history
        k = max(1, min(5, len(h) // 4))
        mean = lambda rows, key: sum(x.get(key, 0.0) for x in rows) / len(rows)  # noqa: E731
        evals = [x for x in h if "eval_accuracy" in x]
        return {"out_dir": cfg.out_dir, "model": str(Path(cfg.out_dir) / "last"), "rollouts": len(h),
                "steps": steps, "start_reward": mean(h[:k], "reward"), "end_reward": mean(h[-k:], "reward"),
                "start_accuracy": mean(h[:k], "accuracy"), "end_accuracy": mean(h[-k:], "accuracy"),
                "end_kl": mean(h[-k:], "kl"), "eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
                **self.best_summary(cfg, evals),
                "train_s": self.trainer.train_s if self.trainer else None,
                "elapsed_s": time.perf_counter() - self.t0, "averaged_over_rollouts": k}


def train_grpo(model_path: str, reward: str | Callable | list, prompts: str | list, cfg: TrainConfig,
               grpo: GRPOConfig | None = None, steps: int = 100, eval_prompts: str | list | None = None,
               time_budget_s: float | None = None, log=print) -> dict[str, Any]:
    """GRPO on `model_path` for `steps` rollouts (or until `time_budget_s` seconds of training); returns a summary."""
    g = grpo or GRPOConfig()
    if launched_world() > 1:
        raise LMStackError("grpo runs in one process for now; launch it without torchrun")
    backbone, tok, device = load_for_training(model_path, cfg)
    records = load_records(prompts, tok)
    eval_records = load_records(eval_prompts, tok) if eval_prompts is not None else None
    reward_fn = load_rewards(reward)
    check_grpo_config(g, backbone.config.block_size)
    torch.manual_seed(cfg.seed)
    ref, lora_cfg = build_grpo_policy(backbone, g.lora, log)
    obj = GRPOObjective(backbone, ref, tok, records, reward_fn, g, cfg.seed, steps, device, eval_records, log,
                        time_budget_s)
    ppo_schedule(cfg, obj.updates, obj.minibatch)
    log(f"GRPO on {model_path}: {steps} steps of {g.prompts_per_step} prompts x {g.group_size} completions x "
        f"<= {g.max_new_tokens} tokens, {obj.updates} update(s) each; {len(records)} prompts")
    trainer = Trainer(backbone, cfg, obj.loss, obj.get_batch, steps * obj.updates, evaluate=obj.evaluate,
                      tokenizer=tok, lora=lora_cfg, base_model=base_model_path(model_path))
    trainer.extra_state, trainer.load_extra = obj.extra_state, obj.load_extra
    trainer.write_extra = lambda d: obj.write_rollout(d, trainer.step)
    trainer.read_extra = obj.read_rollout
    trainer.best_metric = ("eval_accuracy", -1)  # <out>/best: the highest greedy accuracy on eval_prompts
    obj.attach(trainer)
    log(f"training dtype: {trainer.dtype} ({trainer.dtype_reason})")
    trainer.fit()
    if trainer.step % (cfg.ckpt_interval or cfg.eval_interval) and trainer.step < steps * obj.updates:
        trainer.save("last")  # stopped early by the time budget: keep the last step's weights
    return obj.summary(cfg, trainer.step)
