"""PNGs from a run's metrics.jsonl: the loss curve (any run), reward / KL per rollout (PPO), reward / accuracy per
step (GRPO)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LMStackError


def read_metrics(run_dir: str | Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        raise LMStackError(f"no metrics.jsonl in {run_dir}; pass the out_dir of a training run")
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, run_dir: str | Path, out: str | Path | None, default: str) -> Path:
    out = Path(out) if out else Path(run_dir) / default
    fig.tight_layout()
    fig.savefig(out)
    _pyplot().close(fig)
    return out


def _legend(ax, twin, **kw) -> None:
    """One legend for an axis and its twinx."""
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left", **kw)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    plt = _pyplot()

    rows = read_metrics(run_dir)
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        raise LMStackError(f"{run_dir}/metrics.jsonl has no train_loss records to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.6, ms=4, label="val loss")
    final = [r for r in rows if "final_val_loss" in r]
    if final:
        ax.axhline(final[-1]["final_val_loss"], ls="--", c="gray", lw=1,
                   label=f"final val {final[-1]['final_val_loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, run_dir, out, "loss.png")


def plot_ppo(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """PNG of mean reward and KL per rollout from a PPO run's metrics.jsonl."""
    plt = _pyplot()
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
    _legend(ax, ax2)
    ax3.plot(x, [r["kl_coef"] for r in rows], c="C2")
    ax3.set_ylabel("kl_coef")
    ax3.set_xlabel("rollout")
    ax3.grid(alpha=0.3)
    return _save(fig, run_dir, out, "ppo.png")


def plot_grpo(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """PNG of a GRPO run's metrics.jsonl: reward (mean +- std) and accuracy per step, held-out accuracy where it was
    measured, and below it KL, entropy and completion length."""
    plt = _pyplot()
    rows = [r for r in read_metrics(run_dir) if "reward" in r and "rollout" in r]
    if not rows:
        raise LMStackError(f"{run_dir}/metrics.jsonl has no GRPO step records")
    x = [r["rollout"] for r in rows]
    fig, (ax, ax3) = plt.subplots(2, 1, figsize=(7, 6), dpi=110, sharex=True, height_ratios=[3, 2])
    mean = [r["reward"] for r in rows]
    std = [r.get("reward_std", 0.0) for r in rows]
    ax.plot(x, mean, c="C0", lw=1, label="reward (mean over samples)")
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color="C0", alpha=0.15)
    if any("accuracy" in r for r in rows):
        ax.plot(x, [r.get("accuracy", float("nan")) for r in rows], c="C1", lw=1, alpha=0.8,
                label="sample accuracy")
    ev = [(r["rollout"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", c="C3", lw=1.8, ms=4, label="held-out accuracy (greedy)")
    ax.set_ylabel("reward / accuracy")
    ax.set_title(f"GRPO: {Path(run_dir).resolve().name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax3.plot(x, [r.get("kl", float("nan")) for r in rows], c="C2", label="KL to reference (k3, per token)")
    ax3.plot(x, [r.get("entropy", float("nan")) for r in rows], c="C4", label="entropy (nats / token)")
    ax4 = ax3.twinx()
    ax4.plot(x, [r.get("completion_len", float("nan")) for r in rows], c="C7", ls="--", label="completion length")
    ax4.set_ylabel("tokens")
    _legend(ax3, ax4)
    ax3.set_xlabel("step (rollout)")
    ax3.grid(alpha=0.3)
    return _save(fig, run_dir, out, "grpo.png")
