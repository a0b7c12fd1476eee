"""The prediction check of a sweep: fit the smaller budgets, predict the loss at a larger budget, train that run with
the sweep's settings and compare (`lmstack scaling check DIR`; layout in lmstack/scaling/sweep.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from ..atomic import write_text
from ..errors import LMStackError
from .fit import fit_runs, normalize
from .laws import Parametric, human
from .sweep import base_model, load_sweep, model_for_params, plan_run, quiet_log, read_records, run_one, sweep_data


def check(out: str | Path, budget_multiple: float = 4.0, bootstrap: int = 0, log: Callable = print,
          progress: bool | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """Fit the sweep in `out`, predict N_opt, D_opt and loss at budget_multiple x its largest budget, train the
    shape-rule model nearest approach 2's N_opt there with the sweep's settings, and compare. Writes check.json;
    a finished check is returned as it is."""
    out = Path(out)
    if not (math.isfinite(budget_multiple) and budget_multiple > 1):
        raise LMStackError(f"--budget-multiple must be > 1 (a budget beyond the sweep's), got {budget_multiple}")
    f = out / "check.json"
    if f.exists():
        res = json.loads(f.read_text())
        if res.get("budget_multiple") == budget_multiple and "measured_loss" in res:
            log(f"check already done: {f}")
            return res
    cfg, settings = load_sweep(out)
    if progress is not None:
        cfg.progress = progress
    records = [r for r in read_records(out) if r.get("kind", "sweep") == "sweep"]
    if not records:
        raise LMStackError(f"{out}/runs.jsonl holds no finished runs; run the sweep first")
    runs = normalize(records, str(out / "runs.jsonl"))
    c_max = max(r["budget"] for r in records)
    target = budget_multiple * c_max
    fit = fit_runs(runs, [target], bootstrap=bootstrap)
    pred = fit["predictions"][0]
    p2, p3 = pred["approach2"], pred["approach3"]
    law = Parametric(*(fit["approach3"][k] for k in ("E", "A", "B", "alpha", "beta")))
    ds = sweep_data(out, cfg, log)
    base = base_model(cfg, ds.tokenizer)
    model = model_for_params(p2["params"], base, settings.aspect, settings.head_dim)
    tps = cfg.batch_size * base.block_size * cfg.grad_accum
    plan = plan_run(target, model, tps, kind="check")
    pred_trained = law.loss(model.num_params(), plan.tokens)
    res = {"budget_multiple": budget_multiple, "sweep_max_budget": c_max, "budget": target,
           "fit": {"approach2": {k: fit["approach2"][k] for k in ("a", "b", "log_kn", "log_kd", "budgets", "n_opt",
                                                                 "loss_min")},
                   "approach3": {k: v for k, v in fit["approach3"].items()}},
           "predicted": {"approach2": p2, "approach3": p3,
                         "at_trained_model": {"params": model.num_params(), "tokens": plan.tokens,
                                              "loss": pred_trained}},
           "predicted_loss": pred_trained, "run": plan.describe()}
    write_text(f, json.dumps(res, indent=2) + "\n")
    log(f"fit of {len(runs)} runs: predict at {target:.3g} FLOPs: N_opt {human(p2['params'])} (approach 2) / "
        f"{human(p3['params'])} (approach 3), loss {p2['loss']:.4f} / {p3['loss']:.4f}")
    log(f"training {plan.name}: {human(model.num_params())} params, {plan.steps:,} steps, {human(plan.tokens)} tokens; "
        f"approach-3 loss there {pred_trained:.4f}")
    rec = run_one(plan, cfg, settings, out, log=quiet_log(log, cfg.progress), max_steps=max_steps)
    if rec is None:
        log(f"check run stopped at max_steps={max_steps}; run again to resume")
        return res
    measured = rec["final_loss"]
    res.update({"measured": rec, "measured_loss": measured,
                "rel_error": {"at_trained_model": (pred_trained - measured) / measured,
                              "approach2": (p2["loss"] - measured) / measured,
                              "approach3": (p3["loss"] - measured) / measured}})
    write_text(f, json.dumps(res, indent=2) + "\n")
    return res


def check_table(res: dict) -> str:
    p = res["predicted"]
    lines = [f"prediction at {res['budget']:.3g} FLOPs ({res['budget_multiple']:g} x the sweep's largest budget "
             f"{res['sweep_max_budget']:.3g})",
             "| | N | D | loss | rel. error |", "|---|---|---|---|---|"]
    err = res.get("rel_error", {})

    def e(k: str) -> str:
        return f"{100 * err[k]:+.2f}%" if k in err else "-"
    lines.append(f"| approach 2 N_opt, approach 3 L(N, D) | {human(p['approach2']['params'])} | "
                 f"{human(p['approach2']['tokens'])} | {p['approach2']['loss']:.4f} | {e('approach2')} |")
    lines.append(f"| approach 3 optimum | {human(p['approach3']['params'])} | {human(p['approach3']['tokens'])} | "
                 f"{p['approach3']['loss']:.4f} | {e('approach3')} |")
    lines.append(f"| approach 3 L at the trained model | {human(p['at_trained_model']['params'])} | "
                 f"{human(p['at_trained_model']['tokens'])} | {p['at_trained_model']['loss']:.4f} | "
                 f"{e('at_trained_model')} |")
    if "measured_loss" in res:
        m = res["measured"]
        lines.append(f"| measured ({m['name']}) | {human(m['params'])} | {human(m['tokens'])} | "
                     f"{res['measured_loss']:.4f} | |")
    return "\n".join(lines)
