"""Verbs: reward train / reward score, dpo, ppo (alignment objectives on the one Trainer)."""
from __future__ import annotations

from .common import add_run_flags


def cmd_reward_train(a) -> None:
    from ..train.reward import cmd_reward_train as run
    run(a)


def cmd_reward_score(a) -> None:
    from ..train.reward import cmd_reward_score as run
    run(a)


def cmd_dpo(a) -> None:
    from ..train.dpo import cmd_dpo as run
    run(a)


def cmd_ppo(a) -> None:
    from ..train.ppo import cmd_ppo as run
    run(a)


def register(sub) -> None:
    rw = sub.add_parser("reward", help="reward models: train on preference pairs, score texts")
    rws = rw.add_subparsers(dest="rverb", required=True)
    t = rws.add_parser("train", help="scalar-head reward model, Bradley-Terry loss on prompt/chosen/rejected JSONL")
    t.add_argument("--model", required=True, help="base checkpoint (the backbone)")
    t.add_argument("--data", required=True, help="preference JSONL: prompt, chosen, rejected")
    t.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    t.add_argument("--batch-size", type=int, help="pairs per step (default 8)")
    t.add_argument("--eval-interval", type=int)
    t.add_argument("--val-fraction", type=float, default=0.1, help="held-out pairs for pairwise accuracy")
    t.add_argument("--max-length", type=int, help="tokens per sequence (default: the context window)")
    add_run_flags(t, "learning rate (default 1e-4)", "runs/reward")
    t.set_defaults(fn=cmd_reward_train)
    t = rws.add_parser("score", help="score texts with a reward model (one JSON line per text)")
    t.add_argument("--model", required=True, help="reward model directory (from `lmstack reward train`)")
    t.add_argument("--prompt", help="prompt the texts answer (default none)")
    t.add_argument("texts", nargs="*", help="texts (default: one per line on stdin)")
    t.set_defaults(fn=cmd_reward_score)

    t = sub.add_parser("dpo", help="Direct Preference Optimization against a frozen reference")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True, help="preference JSONL: prompt, chosen, rejected")
    t.add_argument("--beta", type=float, default=0.1)
    t.add_argument("--loss", choices=["sigmoid", "ipo"], default="sigmoid")
    t.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO (sigmoid loss only)")
    t.add_argument("--lora", help="train LoRA adapters, e.g. r=16,alpha=32,targets=q,k,v,o (the reference is the "
                   "base model)")
    t.add_argument("--ref", choices=["precompute", "live"], default="precompute",
                   help="precompute the reference log-probs once (default) or recompute them every step")
    t.add_argument("--ref-model", help="another checkpoint as the reference (default: the starting model)")
    t.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    t.add_argument("--batch-size", type=int, help="pairs per step (default 8)")
    t.add_argument("--eval-interval", type=int)
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--max-length", type=int)
    add_run_flags(t, "learning rate (default 5e-5)", "runs/dpo")
    t.set_defaults(fn=cmd_dpo)

    t = sub.add_parser("ppo", help="RLHF with PPO: value head, frozen reference, adaptive KL penalty, GAE")
    t.add_argument("--model", required=True, help="the starting policy")
    t.add_argument("--reward", required=True, help="reward model dir, or python:module:function / "
                   "python:file.py:function taking (prompts, completions) -> list[float]")
    t.add_argument("--prompts", required=True, help="prompts: .jsonl with 'prompt' fields or a text file, one per line")
    t.add_argument("--rollouts", type=int, default=50)
    t.add_argument("--batch-size", type=int, default=16, help="prompts per rollout")
    t.add_argument("--max-new-tokens", type=int, default=24)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--top-k", type=int, default=0)
    t.add_argument("--ppo-epochs", type=int, default=4)
    t.add_argument("--minibatches", type=int, default=1)
    t.add_argument("--init-kl-coef", type=float, default=0.1)
    t.add_argument("--target-kl", type=float, default=6.0, help="adaptive KL target (0 = fixed kl coefficient)")
    t.add_argument("--horizon", type=int, default=10000)
    t.add_argument("--gamma", type=float, default=1.0)
    t.add_argument("--lam", type=float, default=0.95)
    t.add_argument("--cliprange", type=float, default=0.2)
    t.add_argument("--cliprange-value", type=float, default=0.2)
    t.add_argument("--vf-coef", type=float, default=0.1)
    t.add_argument("--ent-coef", type=float, default=0.0)
    add_run_flags(t, "learning rate (default 1e-5)", "runs/ppo")
    t.set_defaults(fn=cmd_ppo)
