"""Verbs: scaling plan (compute-optimal N, D, loss and wall time from published laws), scaling fit (fit laws to your
own sweep's runs and predict larger budgets), scaling sweep (train an IsoFLOP grid), scaling check (predict a larger
budget from a sweep, train it, compare)."""
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


def cmd_sweep(a) -> None:
    from pathlib import Path
    from ..scaling import fit_table
    from ..scaling.report import fit_sweep, plot_sweep, sweep_table
    from ..scaling.sweep import SweepSettings, parse_budgets, read_records, run_sweep
    settings = SweepSettings(a.aspect, a.head_dim, a.warmup_fraction)
    recs = run_sweep(a.out, parse_budgets(a.budgets), a.sizes, corpus=a.corpus, recipe=a.recipe, overrides=a.set,
                     tokens_per_param=a.tokens_per_param, factor=a.factor, settings=settings,
                     progress=False if a.no_progress else None, plot=None)
    print(sweep_table(recs))
    fit = fit_sweep(read_records(a.out))
    plot_sweep(read_records(a.out), Path(a.out) / "sweep.png", fit=fit or False)
    print(fit_table(fit) if fit else "(the runs do not fit yet: approach 2 needs >= 2 budgets of >= 3 sizes whose "
          "loss dips, approach 3 >= 5 runs)")
    print(f"runs -> {a.out}/runs.jsonl, plot -> {a.out}/sweep.png; next: lmstack scaling check {a.out}")


def cmd_check(a) -> None:
    from ..scaling.prediction import check, check_table
    res = check(a.dir, a.budget_multiple, bootstrap=a.bootstrap, progress=False if a.no_progress else None)
    print(json.dumps(res, indent=2) if a.json else check_table(res) + f"\n-> {a.dir}/check.json")


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
    from ..scaling import sweep as sw
    t = ss.add_parser("sweep", help="train an IsoFLOP grid: --sizes models per compute budget, each for exactly its "
                      "budget; writes runs.jsonl for `scaling fit` / `scaling check`")
    t.add_argument("--budgets", required=True, metavar="C1,C2,...", help="compute budgets in FLOPs, e.g. 1e12,3e12,1e13")
    t.add_argument("--sizes", type=int, default=5, help="model sizes per budget (>= 3; default 5)")
    t.add_argument("--corpus", help="corpus (default the recipe's: stdlib)")
    t.add_argument("--out", default="runs/scaling-sweep", help="sweep directory (default runs/scaling-sweep); "
                   "re-running resumes it")
    t.add_argument("--recipe", help="base recipe YAML (default: recipes/scaling-sweep.yaml's settings, built in)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any TrainConfig key (repeatable)")
    t.add_argument("--tokens-per-param", type=float, default=sw.TOKENS_PER_PARAM,
                   help=f"grid centre N_c = sqrt(C / (6 r)) (default r={sw.TOKENS_PER_PARAM:g})")
    t.add_argument("--factor", type=float, default=sw.FACTOR, help=f"size ratio between neighbouring models "
                   f"(default {sw.FACTOR:g})")
    t.add_argument("--aspect", type=int, default=sw.ASPECT, help=f"shape rule: n_layer = round(n_embd / aspect) "
                   f"(default {sw.ASPECT})")
    t.add_argument("--head-dim", type=int, default=sw.HEAD_DIM, help=f"shape rule: n_embd is a multiple of it, "
                   f"n_head = n_embd / head_dim (default {sw.HEAD_DIM})")
    t.add_argument("--warmup-fraction", type=float, default=sw.WARMUP_FRACTION,
                   help=f"LR warmup as a fraction of each run (default {sw.WARMUP_FRACTION:g})")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_sweep)
    t = ss.add_parser("check", help="fit a sweep, predict the loss at a larger budget, train that model, compare")
    t.add_argument("dir", help="a sweep directory (scaling sweep --out)")
    t.add_argument("--budget-multiple", type=float, default=4.0, help="predict at this multiple of the largest "
                   "budget (default 4)")
    t.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for the fit's intervals")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_check)
