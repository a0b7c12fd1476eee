"""Per-token decode overhead, side by side: this checkout against another one (e.g. a `git worktree` of an older
commit), same machine, same run, alternating A/B/A/B so drift hits both.

    git worktree add /tmp/lmstack-before <commit>
    python benchmarks/decode_overhead.py --before /tmp/lmstack-before [--model GGUF] [--rounds 3]

Each measurement runs in a fresh subprocess with PYTHONPATH pointing at one checkout: greedy decode tok/s at
batch 1 (stream_steps) and batch 8 (continuous batcher), float32 / bfloat16 / int8 weights (`--sampled`: sampled
at T=0.8, top_p=0.95 instead; `same tokens` is then only expected where the sampler's draw did not change). Prints a markdown table
with the after/before ratio."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[4]))
import lmstack
from lmstack.generate.bench import DEFAULT_PROMPT, bench_generate
w = sys.argv[2]
lm = lmstack.load(sys.argv[1], dtype=getattr(torch, w) if w in ("bfloat16", "float16") else None,
                  quantize="int8" if w == "int8" else None)
ids = lm.tokenizer.encode(DEFAULT_PROMPT)
r = bench_generate(lm.model, ids, new_tokens=int(sys.argv[5]), batch=int(sys.argv[3]), warmup=1)
print(json.dumps({"decode_tok_s": r.decode_tok_s, "tokens": r.tokens[:16], "lmstack": lmstack.__file__}))
"""


SAMPLED_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
import lmstack
from lmstack.generate import SamplingParams, generate_batch, stream_steps
from lmstack.generate.bench import DEFAULT_PROMPT
w, batch, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
lm = lmstack.load(sys.argv[1], dtype=getattr(torch, w) if w in ("bfloat16", "float16") else None,
                  quantize="int8" if w == "int8" else None)
ids = lm.tokenizer.encode(DEFAULT_PROMPT)
p = SamplingParams(max_new_tokens=n, temperature=0.8, top_p=0.95, seed=0, stop_at_eos=False)
list(stream_steps(lm.model, ids, SamplingParams(max_new_tokens=4, temperature=0.8, top_p=0.95, stop_at_eos=False)))
t0 = time.perf_counter()
if batch == 1:
    toks = [s.token for s in stream_steps(lm.model, ids, p)]
else:
    toks = [s.token for s in generate_batch(lm.model, [list(ids)] * batch, p)[0]]
dt = time.perf_counter() - t0
print(json.dumps({"decode_tok_s": batch * len(toks) / dt, "tokens": toks[:16], "lmstack": lmstack.__file__}))
"""


def measure(checkout: Path, model: str, dtype: str, batch: int, threads: int, new_tokens: int,
            sampled: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    # cwd = the checkout: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH, so run from
    # this repository the "before" child would import this checkout's lmstack
    out = subprocess.run([sys.executable, "-c", SAMPLED_CHILD if sampled else CHILD, str(Path(model).resolve()),
                          dtype, str(batch), str(threads), str(new_tokens)], env=env, capture_output=True, text=True,
                         check=True, cwd=str(checkout))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the other checkout (repository root)")
    ap.add_argument("--model", default=os.environ.get("LMSTACK_GGUF",
                                                      str(ROOT.parent / "shared/models/SmolLM2-135M-Instruct.Q4_1.gguf")))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--weights", default="float32,bfloat16,int8", help="comma-separated: float32, bfloat16, int8")
    ap.add_argument("--sampled", action="store_true",
                    help="sample at temperature 0.8, top_p 0.95 (seed 0) instead of greedy decoding; tok/s over the "
                         "whole generation, prefill included")
    a = ap.parse_args()
    rows = []
    for dtype in a.weights.split(","):
        for batch in (1, 8):
            res: dict[str, list[float]] = {"before": [], "after": []}
            toks = {}
            for _ in range(a.rounds):
                for name, ck in (("before", Path(a.before)), ("after", ROOT)):
                    r = measure(ck, a.model, dtype, batch, a.threads, a.new_tokens, a.sampled)
                    if not Path(r["lmstack"]).resolve().is_relative_to(ck.resolve()):
                        raise SystemExit(f"the {name} child imported {r['lmstack']}, not {ck}'s lmstack")
                    res[name].append(r["decode_tok_s"])
                    toks[name] = r["tokens"]
            b, f = statistics.median(res["before"]), statistics.median(res["after"])
            rows.append((dtype, batch, b, f, f / b, toks["before"] == toks["after"]))
    print("| weights | batch | before tok/s | after tok/s | after/before | same tokens |")
    print("|---|---|---|---|---|---|")
    for dtype, batch, b, f, ratio, same in rows:
        print(f"| {dtype} | {batch} | {b:,.1f} | {f:,.1f} | {ratio:.2f}x | {same} |")


if __name__ == "__main__":
    main()
