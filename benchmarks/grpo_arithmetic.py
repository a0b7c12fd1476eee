"""GRPO on arithmetic: SmolLM2-135M-Instruct's held-out exact match before and after GRPO (LoRA) on a CPU.

Data: generated multi-digit additions and subtractions (lmstack.data.arithmetic), a train split and a disjoint
held-out split, rendered with the model's chat template and an instruction to end with "#### <number>". The reward
is `exact-match` (lmstack.train.rewards: the `####` answer, else the last number in the completion). Before and after
are measured the same way: greedy decoding of the held-out prompts with the same sampling weights (the LoRA merged
into a bf16 copy), reporting both accuracies: `accuracy` (the `####` answer or else the last number) and
`strict_accuracy` (a `####` answer only).

    .venv/bin/python benchmarks/grpo_arithmetic.py                     # 30 minutes of training (the result)
    .venv/bin/python benchmarks/grpo_arithmetic.py --train-minutes 2 --n-test 32   # a quick look

Writes benchmarks/results/grpo_arithmetic.json and .png (held-out accuracy curve + the run's reward), and the run
directory (metrics.jsonl, grpo.png, last/) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_MODEL = os.environ.get("LMSTACK_SMOLLM2", str(REPO.parent / "shared" / "models" /
                                                       "SmolLM2-135M-Instruct.Q4_1.gguf"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class AdaptiveThreads:
    """exact-match, plus: before scoring each rollout, 1 torch thread while the load average shows other work on this
    small CPU (oversubscribed OpenMP threads make every op several times slower), all cores when it is free. The
    reward itself is lmstack.train.rewards.exact_match."""

    def __init__(self, threads: int, format_bonus: float = 0.0):
        self.fixed, self.cores, self.now, self.bonus = threads, os.cpu_count() or 1, None, format_bonus
        self.__name__ = "exact-match" + (f"+{format_bonus:g}*format" if format_bonus else "")

    def __call__(self, prompt: str, completion: str, record: dict) -> float:
        import torch
        from lmstack.train.rewards import exact_match
        want = self.fixed or (1 if os.getloadavg()[0] > self.cores + 0.5 else self.cores)
        if want != self.now:
            torch.set_num_threads(want)
            self.now = want
        fmt = self.bonus * bool(re.search(r"####\s*-?[0-9]", completion)) if self.bonus else 0.0
        return exact_match(prompt, completion, record) + fmt


def held_out(model_path: str, records: list[dict], max_new_tokens: int) -> dict:
    """Greedy held-out accuracy of a model (GGUF, checkpoint or LoRA run), sampled from bf16 weights as in training."""
    import torch
    from lmstack.convert.load import load_any
    from lmstack.train.grpo import answer_accuracy, rollout_copy
    model, tok = load_any(model_path)
    t = time.perf_counter()
    res = answer_accuracy(rollout_copy(model.float(), torch.bfloat16), tok, records, max_new_tokens)
    res["seconds"] = time.perf_counter() - t
    return res


def plot(path: Path, rows: list[dict], before: dict, after: dict, start: dict) -> None:
    """start: the model's accuracy before training on the split evaluated during training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    x = [r["rollout"] for r in rows]
    ax.plot(x, [r["reward"] for r in rows], c="C0", lw=0.8, alpha=0.6, label="train reward (sampled, T>0)")
    ev = [(0, start["accuracy"])] + [(r["rollout"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    ax.plot(*zip(*ev), "o-", c="C3", lw=1.8, ms=4, label="validation exact match (greedy)")
    evs = [(0, start["strict_accuracy"])] + [(r["rollout"], r["eval_strict_accuracy"]) for r in rows
                                              if "eval_strict_accuracy" in r]
    ax.plot(*zip(*evs), "s--", c="C2", lw=1, ms=3, label="validation, strict '####' format")
    ax.axhline(after["accuracy"], c="k", ls=":", lw=1, label=f"held-out after ({after['accuracy']:.1%})")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("accuracy / reward")
    ax.set_title(f"GRPO on arithmetic, SmolLM2-135M: {before['accuracy']:.1%} -> {after['accuracy']:.1%} held-out")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=str(REPO / "runs" / "grpo_arithmetic"))
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--train-minutes", type=float, default=30.0, help="training budget (stops at a step boundary)")
    ap.add_argument("--max-steps", type=int, default=10000)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=100,
                    help="validation problems carved from the train split: evaluated during training, and <run>/best "
                         "(the most accurate step on them) is the 'after' model; 0: evaluate the held-out split "
                         "during training and report the last step")
    ap.add_argument("--digits", default="2,2", help="min,max digits per operand")
    ap.add_argument("--negative", action="store_true", help="allow negative subtraction results")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.3,
                    help="sampling temperature of the rollouts (at 0.7 this model's samples are right ~5%% of the "
                         "time, at 0.3 ~18%%: more groups with a signal)")
    ap.add_argument("--instruction", default=None, help="the instruction after each question (default: "
                    "lmstack.data.arithmetic.ONE_SHOT, one worked example and the '#### <number>' format)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                    help="cosine: from --lr down to lr/10 at --max-steps")
    ap.add_argument("--format-bonus", type=float, default=0.0,
                    help="reward += this when the completion has a '#### <number>' line (a format reward, as in "
                         "DeepSeek-R1); the accuracy measured is exact-match either way")
    ap.add_argument("--kl-coef", type=float, default=0.0)
    ap.add_argument("--filter-groups", action="store_true", help="update only on groups with a reward spread")
    ap.add_argument("--oversample", type=int, default=1, help="sample N x --prompts-per-step groups per step")
    ap.add_argument("--lora", default="r=16,alpha=32,dropout=0,targets=all")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: adaptive, see AdaptiveThreads)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from lmstack.data.arithmetic import ONE_SHOT
    a.instruction = ONE_SHOT if a.instruction is None else a.instruction

    from lmstack.convert.load import load_any
    from lmstack.data import arithmetic
    from lmstack.train.grpo import GRPOConfig, train_grpo
    from lmstack.train.plot import plot_grpo
    from lmstack.train.reward import finetune_config
    import torch
    torch.set_num_threads(a.threads or (1 if os.getloadavg()[0] > (os.cpu_count() or 1) + 0.5 else os.cpu_count()))
    _, tok = load_any(a.model)
    digits = tuple(int(x) for x in a.digits.split(","))
    train, test = arithmetic.split(a.n_train, a.n_test, seed=a.seed + 1, digits=digits, negative=a.negative)
    out = Path(a.out)
    val, train = train[:a.n_val], train[a.n_val:]
    train_f = arithmetic.write_prompts(out / "train.jsonl", arithmetic.as_prompts(train, tok, a.instruction))
    test_recs = arithmetic.as_prompts(test, tok, a.instruction)
    test_f = arithmetic.write_prompts(out / "test.jsonl", test_recs)
    val_recs = arithmetic.as_prompts(val, tok, a.instruction) if val else test_recs
    val_f = arithmetic.write_prompts(out / "val.jsonl", val_recs) if val else test_f
    print(f"{len(train)} train / {len(val)} validation / {len(test)} held-out problems, digits {digits}; "
          f"CPU: {cpu_name()}", flush=True)

    before = held_out(a.model, test_recs, a.max_new_tokens)
    before_val = held_out(a.model, val_recs, a.max_new_tokens) if val else before
    print(f"before: held-out accuracy {before['accuracy']:.3f} (strict '####' {before['strict_accuracy']:.3f}), "
          f"{before['seconds']:.0f}s; e.g. {before['completions'][:3]}", flush=True)

    cfg = finetune_config(str(out / "run"), {"lr": a.lr, "lr_schedule": a.lr_schedule, "min_lr": a.lr / 10,
                                             "warmup_steps": 0,
                                             "progress": False, "dtype": "auto", "grad_clip": 1.0, "seed": a.seed,
                                             "ckpt_interval": 10,
                                             "keep_best": bool(val)})
    g = GRPOConfig(group_size=a.group_size, prompts_per_step=a.prompts_per_step, max_new_tokens=a.max_new_tokens,
                   temperature=a.temperature, kl_coef=a.kl_coef, lora=a.lora, eval_every=a.eval_every,
                   filter_groups=a.filter_groups, oversample=a.oversample)
    t = time.perf_counter()
    s = train_grpo(a.model, AdaptiveThreads(a.threads, a.format_bonus), str(train_f), cfg, g, steps=a.max_steps,
                   eval_prompts=str(val_f),
                   time_budget_s=a.train_minutes * 60, log=lambda m: print(m, flush=True))
    wall = time.perf_counter() - t
    last = held_out(str(out / "run" / "last"), test_recs, a.max_new_tokens)
    print(f"last step: held-out accuracy {last['accuracy']:.3f} (strict '####' {last['strict_accuracy']:.3f}); "
          f"e.g. {last['completions'][:3]}", flush=True)
    after = last
    if val and s.get("best_model"):
        after = held_out(s["best_model"], test_recs, a.max_new_tokens)
        print(f"best validation step ({s['best_step']}, validation {s['best_eval_accuracy']:.3f}): held-out "
              f"accuracy {after['accuracy']:.3f} (strict '####' {after['strict_accuracy']:.3f})", flush=True)

    rows = [json.loads(ln) for ln in (out / "run" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "rollout" in r]
    res_dir = Path(a.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    plot(res_dir / "grpo_arithmetic.png", rows, before, after, before_val)
    plot_grpo(out / "run")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "cores": os.cpu_count(),
        "model": Path(a.model).name, "settings": vars(a),
        "reward": "exact-match" + (f" + {a.format_bonus:g} * has '####'" if a.format_bonus else ""),
        "before": {k: v for k, v in before.items() if k != "completions"},
        "before_validation": {k: v for k, v in before_val.items() if k != "completions"},
        "after": {k: v for k, v in after.items() if k != "completions"},
        "after_is": f"best validation step {s.get('best_step')}" if after is not last else "last step",
        "last": {k: v for k, v in last.items() if k != "completions"},
        "gain_points": 100 * (after["accuracy"] - before["accuracy"]),
        "gain_points_strict": 100 * (after["strict_accuracy"] - before["strict_accuracy"]),
        "steps": s["rollouts"], "train_s": s["train_s"], "wall_s": wall,
        "samples_before": before["completions"][:8], "samples_after": after["completions"][:8],
        "curve": [{k: r[k] for k in ("rollout", "reward", "accuracy", "kl", "entropy", "completion_len",
                                     "clipfrac", "eval_accuracy", "eval_strict_accuracy", "train_s") if k in r}
                  for r in rows]}
    (res_dir / "grpo_arithmetic.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("before", "after", "gain_points", "gain_points_strict", "steps",
                                             "train_s")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
