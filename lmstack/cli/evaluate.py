"""Verb: eval (benchmarks and perplexity, as lm-evaluation-harness scores them)."""
from __future__ import annotations

from .common import DTYPES


def cmd_eval(a) -> None:
    from ..eval.run import cli_main
    cli_main(a)


def register(sub) -> None:
    t = sub.add_parser("eval", help="benchmarks (MMLU, TruthfulQA, WiC, BIG-bench, HellaSwag, ARC, GSM8K) and "
                                    "perplexity / bits-per-byte, scored as lm-evaluation-harness scores them")
    t.add_argument("--model", required=True, help="checkpoint dir, HF dir, GGUF file, or the model name at --base-url")
    t.add_argument("--tasks", required=True, help="comma-separated NAME or NAME=PATH (mmlu, mmlu_<subject>, "
                   "truthfulqa_mc1, truthfulqa_mc2, wic, hellaswag, arc_easy, arc_challenge, gsm8k, "
                   "bigbench_<name>, perplexity=FILE)")
    t.add_argument("--data-dir", help="benchmark data root (default $LMSTACK_EVAL_DATA or ~/.cache/lmstack/eval)")
    t.add_argument("--shots", type=int, default=0, help="few-shot examples from the train/dev split (first n)")
    t.add_argument("--limit", type=int, help="evaluate only the first N examples (documents for perplexity)")
    t.add_argument("--batch-size", type=int, default=8,
                   help="questions (multiple choice) or prompts (generation) per forward pass")
    t.add_argument("--stride", type=int, help="perplexity: sliding-window stride in tokens (default: the window)")
    t.add_argument("--max-length", type=int, help="window / context length (default: the model's)")
    t.add_argument("--max-new-tokens", type=int, help="generation tasks: override the task's limit")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--base-url", help="evaluate a remote OpenAI-compatible endpoint (e.g. http://host:8000/v1)")
    t.add_argument("--api-key", default=None)
    t.add_argument("--tokenizer", help="remote: the server's tokenizer (path), for exact token-level splitting")
    t.add_argument("--dtype", choices=DTYPES)
    t.add_argument("--log-samples", action="store_true", help="keep per-example inputs/outputs in the JSON")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--out", help="write results JSON here")
    t.set_defaults(fn=cmd_eval)
