"""Verb: grpo (GRPO with verifiable rewards on the one Trainer). Thin: parse, build the configs, call
lmstack.train.grpo.train_grpo, plot, print."""
from __future__ import annotations

import json

from .common import add_run_flags


def cmd_grpo(a) -> None:
    from ..train.grpo import GRPOConfig, train_grpo
    from ..train.plot import plot_grpo
    from ..train.reward import finetune_config
    over = {"lr": a.lr, "seed": a.seed, "device": a.device, "progress": False if a.no_progress else None,
            "resume": True if a.resume else None}
    cfg = finetune_config(a.out, {"lr": 1e-4 if a.lora else 1e-5, "warmup_steps": 0, "lr_schedule": "constant",
                                  "grad_clip": 1.0, "keep_best": True}, over, a.set)
    g = GRPOConfig(group_size=a.group_size, prompts_per_step=a.prompts_per_step, max_new_tokens=a.max_new_tokens,
                   temperature=a.temperature, top_k=a.top_k, ppo_epochs=a.ppo_epochs, minibatches=a.minibatches,
                   cliprange=a.cliprange, cliprange_high=a.cliprange_high, kl_coef=a.kl_coef,
                   scale_rewards=not a.no_scale_rewards, loss_agg=a.loss_agg, eval_every=a.eval_every, lora=a.lora,
                   filter_groups=a.filter_groups, oversample=a.oversample)
    s = train_grpo(a.model, a.reward, a.prompts, cfg, g, steps=a.steps, eval_prompts=a.eval_prompts,
                   time_budget_s=a.max_minutes * 60 if a.max_minutes else None)
    try:
        s["plot"] = str(plot_grpo(a.out))
    except Exception as e:  # a plot is a nicety; never fail a finished run over it
        s["plot_error"] = str(e)
    held = f", held-out accuracy {s['eval_accuracy']:.3f}" if s["eval_accuracy"] is not None else ""
    if s.get("best_eval_accuracy") is not None:
        held += f" (best {s['best_eval_accuracy']:.3f} at step {s['best_step']} -> {s['best_model']})"
    print(f"mean reward {s['start_reward']:.3f} -> {s['end_reward']:.3f}, sample accuracy {s['start_accuracy']:.3f} -> "
          f"{s['end_accuracy']:.3f}{held}; policy -> {s['model']}")
    print(json.dumps(s))


def register(sub) -> None:
    t = sub.add_parser("grpo", help="GRPO: groups of samples per prompt, verifiable rewards, no value head",
                       description="P.jsonl: one {\"prompt\": ..., \"answer\": ...} per line (prompt: a string or a "
                                   "chat); `answer` (or `tests`, `regex`) is what the built-in rewards check.")
    t.add_argument("--model", required=True, help="the starting policy: checkpoint dir, HF dir or GGUF file")
    t.add_argument("--prompts", required=True, help="prompt records: .jsonl with 'prompt' and 'answer' fields")
    t.add_argument("--reward", required=True,
                   help="exact-match (#### N, else the last number) | strict-match | numeric[:TOL or TOL%%] | "
                        "regex[:PATTERN] | python-tests[:SECONDS] | python:module:fn / python:file.py:fn taking "
                        "(prompt, completion, answer|record); sums like exact-match+0.1*regex:####")
    t.add_argument("--lora", help="train LoRA adapters, e.g. r=16,alpha=32,targets=q,k,v,o (the reference is the base "
                                  "model)")
    t.add_argument("--steps", "--max-steps", dest="steps", type=int, default=100,
                   help="GRPO steps (rollouts of prompts-per-step x group-size samples)")
    t.add_argument("--max-minutes", type=float, help="stop at the first step boundary after this much training time")
    t.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    t.add_argument("--prompts-per-step", type=int, default=4)
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--top-k", type=int, default=0)
    t.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout (1: on-policy, ratio 1)")
    t.add_argument("--minibatches", type=int, default=1)
    t.add_argument("--cliprange", type=float, default=0.2)
    t.add_argument("--cliprange-high", type=float, help="upper clip (DAPO clip-higher; default = --cliprange)")
    t.add_argument("--kl-coef", type=float, default=0.0, help="beta of the k3 KL penalty to the reference")
    t.add_argument("--no-scale-rewards", action="store_true", help="advantages r - mean, not / std (Dr. GRPO)")
    t.add_argument("--loss-agg", choices=["token", "sequence"], default="token")
    t.add_argument("--filter-groups", action="store_true",
                   help="update only on groups whose rewards differ (DAPO's dynamic sampling)")
    t.add_argument("--oversample", type=int, default=1,
                   help="sample N x --prompts-per-step groups, keep --prompts-per-step, those with a reward spread "
                        "first")
    t.add_argument("--eval-prompts", help="validation prompt records: greedy accuracy every --eval-every steps and "
                                          "at the end; <out>/best keeps the most accurate step")
    t.add_argument("--eval-every", type=int, default=0)
    add_run_flags(t, "learning rate (default 1e-4 with --lora, else 1e-5)", "runs/grpo")
    t.add_argument("--resume", action="store_true", help="continue from <out>/last (same arguments)")
    t.set_defaults(fn=cmd_grpo)
