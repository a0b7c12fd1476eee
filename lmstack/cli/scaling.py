"""Verbs: scaling plan (compute-optimal N, D, loss and wall time from published laws), scaling fit (fit laws to your
own sweep's runs and predict larger budgets)."""
from __future__ import annotations

import json


def _floats(text: str | None) -> list[float]:
    from ..errors import LMStackError
    if not text:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LMStackError(f"--predict takes comma-separated FLOP budgets like 1e22,1e23, got {text!r}") from None


def cmd_plan(a) -> None:
    from ..scaling import LAWS, plan_all, plan_table
    kw = dict(flops=a.flops, params=a.params, tokens=a.tokens, peak=a.peak_flops, mfu=a.mfu, gpu=a.gpu)
    if a.preset:  # a model shape: N from its config, training FLOPs per token with attention
        from ..config import preset
        from ..errors import LMStackError
        if a.flops or a.params or a.tokens:
            raise LMStackError("--preset sets the model size: give it instead of --flops/--params/--tokens")
        cfg = preset(a.preset)
        kw.update(params=float(cfg.num_params()), flops_per_token=float(cfg.flops_per_token(a.seq_len)))
    rows = plan_all(list(LAWS) if a.method == "all" else [a.method], **kw)
    print(json.dumps(rows, indent=2) if a.json else plan_table(rows))


def cmd_fit(a) -> None:
    from ..scaling import fit_runs, fit_table, load_runs, plot_fit
    runs = load_runs(a.runs)
    res = fit_runs(runs, _floats(a.predict), bootstrap=a.bootstrap, seed=a.seed)
    if a.plot:
        plot_fit(runs, res, a.plot)
    print(json.dumps(res, indent=2) if a.json else fit_table(res) + (f"\nplot -> {a.plot}" if a.plot else ""))


def register(sub) -> None:
    from ..scaling import GPU_PEAK_FLOPS, LAWS
    s = sub.add_parser("scaling", help="compute-optimal model/data sizes from scaling laws; fit laws to your runs")
    ss = s.add_subparsers(dest="sverb", required=True)
    t = ss.add_parser("plan", help="params, tokens, loss and wall time for a FLOP, parameter or token budget")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--flops", type=float, help="training compute C in FLOPs (e.g. 5.76e23)")
    g.add_argument("--params", type=float, help="model size N; D by each law's optimum")
    g.add_argument("--tokens", type=float, help="data size D; N by each law's optimum")
    t.add_argument("--preset", help="a model preset: N from its config, train FLOPs include attention")
    t.add_argument("--seq-len", type=int, help="sequence length for --preset's attention FLOPs (default its context)")
    t.add_argument("--method", choices=[*LAWS, "all"], default="all")
    t.add_argument("--gpu", choices=list(GPU_PEAK_FLOPS), help="peak-FLOPs preset (dense bf16; cpu is a rough 1e12); "
                   "default h100")
    t.add_argument("--peak-flops", type=float, help="peak FLOP/s of your device (overrides --gpu)")
    t.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation, a fraction of peak (default 0.4)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_plan)
    t = ss.add_parser("fit", help="fit IsoFLOP (approach 2) and parametric (approach 3) laws to runs")
    t.add_argument("runs", help="JSONL of runs {params, tokens or flops, final_loss} or a JSON list "
                   "{parameters, compute_budget, final_loss}")
    t.add_argument("--predict", metavar="C1,C2,...", help="budgets (FLOPs) to predict N_opt, D_opt and loss at")
    t.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (0: none)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--plot", metavar="OUT.png", help="write loss-vs-N and N/D-vs-C plots")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_fit)
