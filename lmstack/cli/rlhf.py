"""Verbs: reward train / reward score, dpo, ppo (alignment objectives on the one Trainer). Thin: parse, build the
configs, call lmstack.train.{reward,dpo,ppo}, print."""
from __future__ import annotations

import json
import sys

from .common import add_run_flags


def _run_config(a, defaults: dict, **flags):
    """TrainConfig of a reward / DPO / PPO run: the objective's defaults, the flags that were given, --set."""
    from ..train.reward import finetune_config
    over = {"lr": a.lr, "seed": a.seed, "device": a.device, "progress": False if a.no_progress else None,
            "resume": True if a.resume else None, **flags}
    return finetune_config(a.out, defaults, over, a.set)


def cmd_reward_train(a) -> None:
    from ..train.reward import train_reward
    cfg = _run_config(a, {"lr": 1e-4}, max_steps=a.steps, batch_size=a.batch_size, eval_interval=a.eval_interval)
    s = train_reward(a.model, a.data, cfg, val_fraction=a.val_fraction, max_length=a.max_length,
                     objective=a.objective)
    if s.get("val_accuracy") is not None:
        print(f"held-out pairwise accuracy: {s['start_val_accuracy']:.3f} -> {s['val_accuracy']:.3f} "
              f"({s['val_pairs']} pairs)")
    if s.get("val_mse") is not None:
        print(f"held-out rating MSE (target (rating - 4) / 1.5): {s['start_val_mse']:.4f} -> {s['val_mse']:.4f} "
              f"({s['val_ratings']} ratings)")
    print(f"reward model -> {s['model']}")
    print(json.dumps(s))


def cmd_reward_score(a) -> None:
    from ..train.reward import load_reward_model
    rm, tok = load_reward_model(a.model)
    texts = a.texts or [ln.rstrip("\n") for ln in sys.stdin if ln.strip()]
    for t, s in zip(texts, rm.score_pairs(tok, [a.prompt or ""] * len(texts), texts)):
        print(json.dumps({"text": t, "score": round(s, 6)}))


def cmd_dpo(a) -> None:
    from ..train.dpo import DPOConfig, train_dpo
    cfg = _run_config(a, {"lr": 5e-5, "eval_interval": 25}, max_steps=a.steps, batch_size=a.batch_size,
                      eval_interval=a.eval_interval)
    dpo = DPOConfig(beta=a.beta, label_smoothing=a.label_smoothing, loss_type=a.loss, lora=a.lora, ref=a.ref,
                    ref_model=a.ref_model, val_fraction=a.val_fraction, max_length=a.max_length)
    s = train_dpo(a.model, a.data, cfg, dpo)
    if s["val_accuracy"] is not None:
        print(f"held-out preference accuracy (implicit reward chosen > rejected): {s['val_accuracy']:.3f}, "
              f"margin {s['val_margin']:.3f}; log p(chosen) > log p(rejected): "
              f"{s['start_val_logp_accuracy']:.3f} -> {s['val_logp_accuracy']:.3f}")
    print(f"policy -> {s['model']}")
    print(json.dumps(s))


def cmd_ppo(a) -> None:
    from ..train.plot import plot_ppo
    from ..train.ppo import PPOConfig, train_ppo
    cfg = _run_config(a, {"lr": 1e-5, "warmup_steps": 0, "lr_schedule": "constant"})
    ppo = PPOConfig(rollout_batch=a.batch_size, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                    top_k=a.top_k, ppo_epochs=a.ppo_epochs, minibatches=a.minibatches, init_kl_coef=a.init_kl_coef,
                    target_kl=a.target_kl if a.target_kl and a.target_kl > 0 else None, horizon=a.horizon,
                    gamma=a.gamma, lam=a.lam, cliprange=a.cliprange, cliprange_value=a.cliprange_value,
                    vf_coef=a.vf_coef, ent_coef=a.ent_coef, lora=a.lora)
    s = train_ppo(a.model, a.reward, a.prompts, cfg, ppo, rollouts=a.rollouts)
    try:
        s["plot"] = str(plot_ppo(a.out))
    except Exception as e:  # a plot is a nicety; never fail a finished run over it
        s["plot_error"] = str(e)
    print(f"mean reward {s['start_reward']:.3f} -> {s['end_reward']:.3f}, KL {s['start_kl']:.3f} -> {s['end_kl']:.3f} "
          f"(max {s['max_kl']:.3f}); policy -> {s['model']}")
    print(json.dumps(s))


def _objective_flags(t, lr_help: str, out: str) -> None:
    add_run_flags(t, lr_help, out)
    t.add_argument("--resume", action="store_true", help="continue from <out>/last (same arguments)")


def register(sub) -> None:
    rw = sub.add_parser("reward", help="reward models: train on preference pairs, score texts")
    rws = rw.add_subparsers(dest="rverb", required=True)
    t = rws.add_parser("train", help="scalar-head reward model: Bradley-Terry loss on prompt/chosen/rejected JSONL, "
                       "or regression on 1-7 ratings")
    t.add_argument("--model", required=True, help="base model (the backbone): checkpoint dir, HF dir or GGUF file")
    t.add_argument("--data", required=True, help="bt: preference JSONL (prompt, chosen, rejected); regression: "
                   "ratings JSONL (prompt, completion, rating 1-7; `lmstack feedback --export OUT --format ratings`)")
    t.add_argument("--objective", choices=["bt", "regression"], default="bt",
                   help="bt: Bradley-Terry on pairs (default); regression: mean squared error against "
                   "(rating - 4) / 1.5 (1..7 -> -2..+2)")
    t.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    t.add_argument("--batch-size", type=int, help="pairs per step (default 8)")
    t.add_argument("--eval-interval", type=int)
    t.add_argument("--val-fraction", type=float, default=0.1, help="held-out pairs (ratings) for accuracy (MSE)")
    t.add_argument("--max-length", type=int, help="tokens per sequence (default: the context window)")
    _objective_flags(t, "learning rate (default 1e-4)", "runs/reward")
    t.set_defaults(fn=cmd_reward_train)
    t = rws.add_parser("score", help="score texts with a reward model (one JSON line per text)")
    t.add_argument("--model", required=True, help="reward model directory (from `lmstack reward train`)")
    t.add_argument("--prompt", help="prompt the texts answer (default none)")
    t.add_argument("texts", nargs="*", help="texts (default: one per line on stdin)")
    t.set_defaults(fn=cmd_reward_score)

    t = sub.add_parser("dpo", help="Direct Preference Optimization against a frozen reference")
    t.add_argument("--model", required=True, help="the starting policy: checkpoint dir, HF dir or GGUF file")
    t.add_argument("--data", required=True, help="preference JSONL: prompt, chosen, rejected")
    t.add_argument("--beta", type=float, default=0.1)
    t.add_argument("--loss", choices=["sigmoid", "ipo"], default="sigmoid")
    t.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO (sigmoid loss only)")
    t.add_argument("--lora", help="train LoRA adapters, e.g. r=16,alpha=32,targets=q,k,v,o (the reference is the "
                   "base model)")
    t.add_argument("--ref", choices=["precompute", "live"], default="precompute",
                   help="precompute the reference log-probs once (default) or recompute them every step")
    t.add_argument("--ref-model", help="another model as the reference (default: the starting model)")
    t.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    t.add_argument("--batch-size", type=int, help="pairs per step (default 8)")
    t.add_argument("--eval-interval", type=int)
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--max-length", type=int)
    _objective_flags(t, "learning rate (default 5e-5)", "runs/dpo")
    t.set_defaults(fn=cmd_dpo)

    t = sub.add_parser("ppo", help="RLHF with PPO: value head, frozen reference, adaptive KL penalty, GAE")
    t.add_argument("--model", required=True, help="the starting policy: checkpoint dir, HF dir or GGUF file")
    t.add_argument("--reward", required=True, help="reward model dir, or python:module:function / "
                   "python:file.py:function taking (prompts, completions) -> list[float]")
    t.add_argument("--prompts", required=True, help="prompts: .jsonl with 'prompt' fields or a text file, one per line")
    t.add_argument("--lora", help="train policy LoRA adapters (+ the value head), e.g. r=16,alpha=32,targets=q,k,v,o; "
                   "the reference is the policy with its adapters disabled")
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
    _objective_flags(t, "learning rate (default 1e-5)", "runs/ppo")
    t.set_defaults(fn=cmd_ppo)
