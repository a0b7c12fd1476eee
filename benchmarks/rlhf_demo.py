"""RLHF demonstrations with a synthetic, checkable preference: completions that contain the target word ("cat")
are preferred. Runs in minutes on a CPU.

  1. base:  a small char-level GPT pretrained on pseudo-English made of a fixed 40-word list (lmstack.train.pretrain)
  2. DPO:   pairs (prompt, chosen, rejected) where chosen's continuation contains "cat" and rejected is the same
            continuation with that word swapped for another one; held-out preference accuracy (implicit reward of
            chosen > rejected, on pairs never trained on) must reach >= 0.9
  3. RM:    a reward model on the same pairs (held-out pairwise accuracy)
  4. PPO:   reward = occurrences of the word "cat" in the sampled completion (a python: reward function);
            the mean reward must rise clearly while the KL to the reference stays bounded (adaptive KL control)

    .venv/bin/python benchmarks/rlhf_demo.py                 # full demo, writes runs/rlhf_demo/ and a summary
    .venv/bin/python benchmarks/rlhf_demo.py --quick         # the short version the slow tests run
    lmstack ppo ... --reward python:benchmarks/rlhf_demo.py:cat_reward   # the same reward from the CLI
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the quick brown fox jumps over lazy dog and cat sat on mat while bird sang in tree "
         "king queen lord lady speak thou art my good friend where is night day sun moon star").split()
TARGET = "cat"
OTHERS = [w for w in WORDS if w != TARGET]


def make_text(n_lines: int, seed: int) -> str:
    r = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = " ".join(r.choice(WORDS) for _ in range(r.randint(3, 9)))
        lines.append(words.capitalize() + r.choice(".!?,;"))
    return "\n".join(lines) + "\n"


def cat_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Reward: how many times the word 'cat' appears in the completion (capped at 4)."""
    return [float(min(4, len(re.findall(rf"\b{TARGET}\b", c.lower())))) for c in completions]


def make_pairs(n: int, seed: int, kind: str = "independent") -> list[dict]:
    """Preference pairs over a two-word prompt. kind='independent': chosen and rejected are two unrelated random
    continuations (2-6 words), chosen with the target word at a random slot, rejected without it, so the only
    systematic difference is the target word. kind='minimal': rejected is chosen with the target word swapped
    for another word (an easier, counterfactual pair)."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(r.choice(OTHERS) for _ in range(2)).capitalize()
        chosen = [r.choice(OTHERS) for _ in range(r.randint(2, 6))]
        rejected = chosen.copy() if kind == "minimal" else [r.choice(OTHERS) for _ in range(r.randint(2, 6))]
        j = r.randrange(len(chosen))
        chosen[j] = TARGET
        if kind == "minimal":
            rejected[j] = r.choice([w for w in OTHERS if w != rejected[j]]) if r.random() < 0.5 else rejected[j]
        rows.append({"prompt": prompt, "chosen": " " + " ".join(chosen) + ".",
                     "rejected": " " + " ".join(rejected) + "."})
    return rows


def make_prompts(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(OTHERS) for _ in range(r.randint(1, 2))).capitalize() for _ in range(n)]


def pretrain_base(work: Path, steps: int, log=print) -> Path:
    from lmstack.train import pretrain
    from lmstack.train.config import TrainConfig
    out = work / "base"
    if (out / "last" / "model.safetensors").exists() and (out / "spec.json").exists() and \
            json.loads((out / "spec.json").read_text()) == {"steps": steps}:
        log(f"base model: reusing {out / 'last'}")
        return out / "last"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text(make_text(3000, 0))
    cfg = TrainConfig.from_dict(dict(
        out_dir=str(out), corpus=str(corpus), tokenizer="char", progress=False,
        model={"preset": "tiny-char", "n_layer": 3, "n_head": 4, "n_embd": 96, "block_size": 64, "dropout": 0.0},
        batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20, max_steps=steps, eval_interval=max(steps // 2, 1),
        eval_iters=4, log_interval=10, final_eval_windows=8, sample_tokens=0))
    t = time.perf_counter()
    s = pretrain(cfg, log=lambda *a: None)
    (out / "spec.json").write_text(json.dumps({"steps": steps}))
    log(f"base model: {s['params']:,} params, {steps} steps, val_loss {s.get('final_val_loss', s.get('val_loss')):.3f} "
        f"in {time.perf_counter() - t:.0f}s")
    return out / "last"


def run_dpo(base: Path, work: Path, steps: int, n_pairs: int, log=print, kind: str = "independent",
            lr: float = 3e-4, beta: float = 0.1) -> dict:
    from lmstack.train.dpo import train_dpo
    from lmstack.train.reward import finetune_config
    data = work / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(n_pairs, 1, kind)))
    cfg = finetune_config(work / "dpo", {"lr": lr, "min_lr": lr / 10, "max_steps": steps, "batch_size": 16,
                                         "eval_interval": max(steps // 5, 1), "warmup_steps": 5, "progress": False})
    t = time.perf_counter()
    s = train_dpo(str(base), str(data), cfg, beta=beta, val_fraction=0.2, log=log)
    s["seconds"] = time.perf_counter() - t
    log(f"DPO: held-out preference accuracy {s['val_accuracy']:.3f} (margin {s['val_margin']:.3f}); "
        f"log p(chosen) > log p(rejected): {s['start_val_logp_accuracy']:.3f} -> {s['val_logp_accuracy']:.3f}; "
        f"{s['seconds']:.0f}s")
    return s


def run_reward(base: Path, work: Path, steps: int, log=print) -> dict:
    from lmstack.train.reward import finetune_config, train_reward
    cfg = finetune_config(work / "rm", {"lr": 3e-4, "min_lr": 3e-5, "max_steps": steps, "batch_size": 16,
                                        "eval_interval": max(steps // 4, 1), "warmup_steps": 5, "progress": False})
    t = time.perf_counter()
    s = train_reward(str(base), str(work / "prefs.jsonl"), cfg, val_fraction=0.2, log=log)
    s["seconds"] = time.perf_counter() - t
    log(f"reward model: held-out pairwise accuracy {s['start_val_accuracy']:.3f} -> {s['val_accuracy']:.3f}; "
        f"{s['seconds']:.0f}s")
    return s


def run_ppo(base: Path, work: Path, rollouts: int, batch: int, log=print, lr: float = 5e-5, init_kl_coef: float = 0.1,
            target_kl: float = 6.0, horizon: int = 64) -> dict:
    from lmstack.train.ppo import PPOConfig, plot_ppo, train_ppo
    from lmstack.train.reward import finetune_config
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(make_prompts(200, 2)) + "\n")
    cfg = finetune_config(work / "ppo", {"lr": lr, "min_lr": lr, "lr_schedule": "constant", "warmup_steps": 0,
                                         "progress": False})
    ppo = PPOConfig(rollout_batch=batch, max_new_tokens=24, ppo_epochs=4, minibatches=2, init_kl_coef=init_kl_coef,
                    target_kl=target_kl, horizon=horizon, vf_coef=0.1)
    t = time.perf_counter()
    s = train_ppo(str(base), cat_reward, str(prompts), cfg, ppo, rollouts=rollouts, log=log)
    s["seconds"] = time.perf_counter() - t
    try:
        s["plot"] = str(plot_ppo(work / "ppo"))
    except Exception as e:  # matplotlib missing or headless problems: the numbers are what matter
        s["plot_error"] = str(e)
    log(f"PPO: mean reward {s['start_reward']:.3f} -> {s['end_reward']:.3f}; KL {s['start_kl']:.3f} -> "
        f"{s['end_kl']:.3f} (max {s['max_kl']:.3f}, final kl_coef {s['final_kl_coef']:.4f}); {s['seconds']:.0f}s")
    return s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "runs" / "rlhf_demo"))
    ap.add_argument("--quick", action="store_true", help="the short version (slow tests)")
    ap.add_argument("--only", choices=["dpo", "rm", "ppo"], action="append")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    q = a.quick
    base = pretrain_base(work, 300 if q else 600)
    out: dict = {"quick": q}
    only = set(a.only or ["dpo", "rm", "ppo"])
    if "dpo" in only or "rm" in only:
        out["dpo"] = run_dpo(base, work, 60 if q else 150, 300 if q else 500)
    if "rm" in only:
        out["reward_model"] = run_reward(base, work, 60 if q else 150)
    if "ppo" in only:
        out["ppo"] = run_ppo(base, work, 30 if q else 80, 16 if q else 32)
    (work / "summary.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
