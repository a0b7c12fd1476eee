"""Verbs: eval (benchmarks and perplexity, as lm-evaluation-harness scores them), eval-data (fetch or build the
benchmark files `lmstack eval` reads)."""
from __future__ import annotations

from .common import DTYPES


def cmd_eval(a) -> None:
    from ..eval.run import EvalConfig, run_eval
    cfg = EvalConfig(model=a.model, tasks=a.tasks, data_dir=a.data_dir, shots=a.shots, limit=a.limit,
                     batch_size=a.batch_size, stride=a.stride, max_length=a.max_length,
                     max_new_tokens=a.max_new_tokens, seed=a.seed, base_url=a.base_url, api_key=a.api_key,
                     tokenizer=a.tokenizer, dtype=a.dtype, log_samples=a.log_samples, progress=not a.no_progress,
                     out=a.out)
    res = run_eval(cfg)
    print(f"model: {a.model}  tasks: {a.tasks}  shots: {a.shots}  limit: {a.limit}  ({res['seconds']:.1f}s)")
    print(res["table"])
    if a.out:
        print(f"results -> {a.out}")


def cmd_eval_data(a) -> None:
    from ..eval.download import download
    for p in download(a.names, a.out):
        print(p)


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

    t = sub.add_parser("eval-data", help="download the benchmarks' original files (online) or build offline ones "
                                         "into the layout `lmstack eval --data-dir` reads",
                       description="Fetch each benchmark's original files (online) into the layout `lmstack eval` "
                                   "reads; `arithmetic` (a BIG-bench-format task) and `mmlu_lmeval_dev` (~270 MMLU "
                                   "dev questions bundled with lm-eval) are built offline. Prints each written "
                                   "folder. Every task also takes a local path (--tasks NAME=PATH).")
    t.add_argument("names", nargs="+", metavar="NAME", help="mmlu, truthfulqa, wic, wic_superglue, hellaswag, arc, "
                   "gsm8k, arithmetic, mmlu_lmeval_dev, bigbench:<task>")
    t.add_argument("--out", help="data root (default $LMSTACK_EVAL_DATA or ~/.cache/lmstack/eval)")
    t.set_defaults(fn=cmd_eval_data)
