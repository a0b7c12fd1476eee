"""Scaling-law maths: compute-optimal plans from published laws (laws.py) and fits to your own runs (fit.py)."""
from __future__ import annotations

from .fit import approach2, approach3, fit_runs, fit_table, load_runs, normalize, plot_fit
from .laws import EPOCH, GPU_PEAK_FLOPS, HOFFMANN, LAWS, Law, Parametric, kaplan_loss, plan, plan_all, plan_table
from .memory import (ParamCounts, activation_bytes, format_report, kv_cache_table, memory_report, param_counts,
                     state_bytes, training_memory)

__all__ = ["EPOCH", "GPU_PEAK_FLOPS", "HOFFMANN", "LAWS", "Law", "Parametric", "approach2", "approach3", "fit_runs",
           "fit_table", "kaplan_loss", "load_runs", "normalize", "plan", "plan_all", "plan_table", "plot_fit",
           "ParamCounts", "activation_bytes", "format_report", "kv_cache_table", "memory_report", "param_counts",
           "state_bytes", "training_memory"]
from .prediction import check, check_table
from .report import sweep_table
from .sweep import flops_per_token, model_for_params, run_sweep, shape_for_width, size_grid

__all__ += ["check", "check_table", "flops_per_token", "model_for_params", "shape_for_width", "size_grid", "run_sweep",
            "sweep_table"]
