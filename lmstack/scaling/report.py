"""Reporting of a sweep (lmstack/scaling/sweep.py): its table, its fit (fit.fit_runs) and its plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import LMStackError
from .fit import budget_key, fit_runs, normalize
from .laws import human


# ---- -----------------------------------------------------------------------------------
def sweep_table(records: list[dict]) -> str:
    rows = ["| run | budget | params | non-emb | L x d | steps | tokens | tokens/param | FLOPs | final loss | bpb | "
            "wall | tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["budget"], r["params"])):
        rows.append(f"| {r['name']} | {r['budget']:.3g} | {human(r['params'])} | {human(r['non_embedding_params'])} | "
                    f"{r['n_layer']} x {r['n_embd']} | {r['steps']:,} | {human(r['tokens'])} | "
                    f"{r['tokens'] / r['params']:.1f} | {r['flops']:.3g} | {r['final_loss']:.4f} | "
                    f"{(r.get('final_bpb') or float('nan')):.4f} | {r['wall_s']:.0f} s | {r['tokens_per_sec']:,.0f} |")
    return "\n".join(rows)


def fit_sweep(records: list[dict]) -> dict | None:
    """fit.fit_runs over a sweep's records, or None while they do not fit (too few budgets/sizes, no dip)."""
    try:
        return fit_runs(normalize([r for r in records if r.get("kind", "sweep") == "sweep"], "runs.jsonl"))
    except (LMStackError, ValueError, FloatingPointError, np.linalg.LinAlgError):
        return None


def plot_sweep(records: list[dict], path: str | Path, fit: bool | dict | None = True) -> Path:
    """PNG of loss vs N per budget: fit.plot_fit (with the fitted parabolas and frontier) when `fit` (True: fit
    here; a dict: fit_sweep's result) and the runs fit, else the raw points."""
    sweep_recs = [r for r in records if r.get("kind", "sweep") == "sweep"]
    result = fit_sweep(records) if fit is True else (fit or None)
    if result is not None:
        from .fit import plot_fit
        return plot_fit(normalize(sweep_recs, "runs.jsonl"), result, path)
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    by: dict[float, list[dict]] = {}
    for r in sweep_recs:
        by.setdefault(budget_key(r["budget"]), []).append(r)
    for c, g in sorted(by.items()):
        g = sorted(g, key=lambda r: r["params"])
        ax.plot([r["params"] for r in g], [r["final_loss"] for r in g], "o-", ms=4, label=f"{c:.2g} FLOPs")
    ax.set(xscale="log", xlabel="parameters N", ylabel="final val loss", title="IsoFLOP profiles")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png", dpi=110)
    return out
