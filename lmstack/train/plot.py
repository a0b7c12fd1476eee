"""Loss-curve PNG from a run's metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LMStackError


def read_metrics(run_dir: str | Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        raise LMStackError(f"no metrics.jsonl in {run_dir}; pass the out_dir of a training run")
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
