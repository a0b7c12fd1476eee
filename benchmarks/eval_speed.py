"""Multiple-choice scoring speed: shared-prefix batched scoring (lmstack.eval) vs scoring every choice from scratch.

For each 4-choice question the harness runs the context once into a KV cache and scores all choices as one batch
(also measured with --batch-size questions per pass, contexts left-padded together); the baseline calls
`lmstack.generate.score.score` once per choice (a full forward pass over context + choice).
Both use the same lm-eval tokenization, so the log-likelihoods must agree (max |diff| is printed). The shared-prefix
variants reuse the few-shot prefix through the prefix cache as `lmstack eval` does (--no-prefix-cache: not).

    python benchmarks/eval_speed.py --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --limit 40
    python benchmarks/eval_speed.py --format arc --limit 40      # answers as text continuations (several tokens)

Questions: MMLU-format (5-shot-style prompt over the fixture subjects, choices " A".." D") or ARC-format (answer
texts), built deterministically from the fixture data and repeated/varied up to --limit.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "eval"
DEFAULT_GGUF = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_items(fmt: str, n: int, shots: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """(context, [4 continuations with the ' ' delimiter]) items."""
    from lmstack.eval.tasks import resolve_tasks
    r = random.Random(seed)
    if fmt == "mmlu":
        tasks = resolve_tasks("mmlu", FIX)
        pool = [(t, d) for t in tasks for d in t.docs]
        items = []
        for i in range(n):
            t, d = pool[i % len(pool)]
            ctx = t.context(d, min(shots, len(t.fewshot_docs)))
            if i >= len(pool):  # vary the question so nothing is cached between items
                ctx = ctx.replace("Answer:", f"(variant {i})\nAnswer:", 1) if shots == 0 else \
                    ctx[:-len("Answer:")] + f"(variant {i})\nAnswer:"
            items.append((ctx, [" " + c for c in d.choices]))
        return items
    task = resolve_tasks("arc_easy", FIX)[0]
    words = "planet star energy water plant animal light heat force motion gravity rock cell".split()
    items = []
    for i in range(n):
        d = task.docs[i % len(task.docs)]
        ctx = task.context(d, 0)
        if i >= len(task.docs):
            ctx = ctx.replace("\nAnswer:", f" ({' '.join(r.choice(words) for _ in range(4))})\nAnswer:")
        items.append((ctx, [" " + c for c in d.choices]))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("LMSTACK_GGUF", str(DEFAULT_GGUF)))
    ap.add_argument("--format", choices=["mmlu", "arc"], default="mmlu")
    ap.add_argument("--shots", type=int, default=1, help="mmlu: few-shot examples in each prompt (fixture dev)")
    ap.add_argument("--limit", type=int, default=40, help="questions")
    ap.add_argument("--batch-size", type=int, default=8, help="questions per pass for the batched variant")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="the shared-prefix variants recompute the few-shot prefix for every question")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import lmstack
    from lmstack.eval.backend import LocalBackend
    from lmstack.generate.score import score
    lm = lmstack.load(a.model)
    b = LocalBackend(lm, prefix_cache=not a.no_prefix_cache)
    items = build_items(a.format, a.limit, a.shots)
    b.loglikelihood_choices(*items[0])  # warm up
    score(lm.model, *b.encode_pair(*[items[0][0], items[0][1][0]]))

    t0 = time.perf_counter()
    fast = [[ll for ll, _ in b.loglikelihood_choices(ctx, conts)] for ctx, conts in items]
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = []
    for s in range(0, len(items), a.batch_size):
        batched += [[ll for ll, _ in r] for r in b.loglikelihood_batch(items[s:s + a.batch_size])]
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = [[score(lm.model, *b.encode_pair(ctx, c))[0] for c in conts] for ctx, conts in items]
    t_slow = time.perf_counter() - t0

    diff = max(abs(x - y) for other in (fast, batched) for fr, sr in zip(other, slow) for x, y in zip(fr, sr))
    ctx_tokens = sum(len(b.encode(c)) for c, _ in items) / len(items)
    res = {"model": Path(a.model).name, "format": a.format, "questions": len(items), "choices": 4,
           "mean_context_tokens": round(ctx_tokens, 1), "threads": torch.get_num_threads(),
           "shared_prefix_examples_per_s": round(len(items) / t_fast, 2),
           "shared_prefix_batched_examples_per_s": round(len(items) / t_batch, 2), "batch_size": a.batch_size,
           "prefix_cache": not a.no_prefix_cache,
           "per_choice_from_scratch_examples_per_s": round(len(items) / t_slow, 2),
           "speedup": round(t_slow / t_fast, 2), "speedup_batched": round(t_slow / t_batch, 2),
           "max_abs_loglik_diff": diff}
    print(f"| method | examples/s ({res['format']}, {len(items)} questions x 4 choices, "
          f"~{res['mean_context_tokens']:.0f} context tokens) |")
    print("| --- | --- |")
    print(f"| shared prefix (KV cache + batched choices) | {res['shared_prefix_examples_per_s']} |")
    print(f"| shared prefix, {a.batch_size} questions per pass (left-padded contexts) | "
          f"{res['shared_prefix_batched_examples_per_s']} |")
    print(f"| each choice from scratch (score) | {res['per_choice_from_scratch_examples_per_s']} |")
    print(f"speedup {res['speedup']}x (batched {res['speedup_batched']}x), max |loglik diff| {diff:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
