"""Scaling-law maths: compute-optimal plans from published laws (laws.py) and fits to your own runs (fit.py)."""
from __future__ import annotations

from .fit import approach2, approach3, fit_runs, fit_table, load_runs, normalize, plot_fit
from .laws import EPOCH, GPU_PEAK_FLOPS, HOFFMANN, LAWS, Law, Parametric, kaplan_loss, plan, plan_all, plan_table

__all__ = ["EPOCH", "GPU_PEAK_FLOPS", "HOFFMANN", "LAWS", "Law", "Parametric", "approach2", "approach3", "fit_runs",
           "fit_table", "kaplan_loss", "load_runs", "normalize", "plan", "plan_all", "plan_table", "plot_fit"]
