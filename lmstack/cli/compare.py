"""Verb: compare (the same data and budget for several architectures: table + loss-vs-time/FLOPs plot)."""
from __future__ import annotations

import json


def cmd_compare(a) -> None:
    from ..scaling.compare import compare, compare_table, parse_archs
    res = compare(a.recipe, parse_archs(a.archs), budget_seconds=a.budget_seconds, budget_flops=a.budget_flops,
                  out=a.out, overrides=a.set, progress=False if a.no_progress else None)
    print(json.dumps(res, indent=2) if a.json else compare_table(res) + f"\nplot -> {res['plot']}")


def register(sub) -> None:
    from ..scaling.compare import ARCHS
    t = sub.add_parser("compare", help="train several architectures on a recipe's data for the same budget; table of "
                       "bits-per-byte, params, tokens/s and a PNG of validation loss vs wall time and FLOPs")
    t.add_argument("recipe", help="a pretraining recipe (its model is the Transformer; the others match its size)")
    t.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, from {', '.join(ARCHS)} (default all)")
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget-seconds", type=float, help="training wall seconds per architecture (measured here)")
    g.add_argument("--budget-flops", type=float, help="training FLOPs per architecture (e.g. 1e13)")
    t.add_argument("--out", help="output directory (default runs/compare-<recipe name>); re-running reuses "
                   "finished runs")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe overrides for every run (repeatable)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_compare)
