"""Evaluation: perplexity / bits-per-byte, multiple-choice and generation benchmarks (MMLU, TruthfulQA, WiC,
BIG-bench, HellaSwag, ARC, GSM8K) from their original files, scored the way lm-evaluation-harness scores them."""
from .backend import LocalBackend, score_batch, score_choices
from .formats import Doc
from .metrics import mc2_metric, mc_metrics
from .perplexity import perplexity
from .run import EvalConfig, evaluate, markdown_table, run_eval
from .tasks import Task, load_tasks, resolve_tasks

__all__ = ["LocalBackend", "score_batch", "score_choices", "Doc", "mc_metrics", "mc2_metric", "perplexity", "evaluate",
           "EvalConfig", "run_eval", "markdown_table", "Task", "load_tasks", "resolve_tasks"]
