"""Generation speed, side by side, in one run on one machine: transformers generate() (float32) vs lmstack
float32 / bfloat16 / int8 (weight-only) [/ int8 + torch.compile].

Each engine runs in its own subprocess (clean peak RSS, no shared caches). Batch 1 greedy, N new tokens (EOS ignored):
prefill tok/s, decode tok/s, time to first token, peak RSS; lmstack engines also batch-8 aggregate decode tok/s and
perplexity on a fixed text (the first ~2k tokens of Tiny Shakespeare) next to float32's.

    .venv/bin/python benchmarks/generate_speed.py [--model GGUF] [--threads 2] [--new-tokens 128] [--compile]
        [--append-results]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_MODEL = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
ENGINES = {  # name -> (quantize, dtype, compile)
    "lmstack-f32": (None, None, False),
    "lmstack-bf16": (None, "bfloat16", False),
    "lmstack-int8": ("int8", None, False),
    "lmstack-int8-compile": ("int8", None, True),
}


def perplexity(model, ids: list[int], chunk: int = 512) -> float:
    """Exp of the mean next-token NLL over `ids`, fed in chunks through the KV cache (exact, bounded memory)."""
    import torch

    from lmstack.models.kv_cache import KVCache
    model.eval()
    nll, n = 0.0, 0
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, len(ids))
        for start in range(0, len(ids) - 1, chunk):
            x = torch.tensor([ids[start:start + chunk]])
            logits = model(x, cache=cache, pos=start).float()
            tgt = torch.tensor([ids[start + 1:start + 1 + chunk]])
            logits = logits[:, :tgt.shape[1]]
            nll += torch.nn.functional.cross_entropy(logits[0], tgt[0], reduction="sum").item()
            n += tgt.shape[1]
    return math.exp(nll / n)


def run_engine(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import lmstack
    from lmstack.generate.bench import DEFAULT_PROMPT, bench_generate, peak_rss_mb
    t0 = time.perf_counter()
    if a.engine == "transformers-f32":
        return run_transformers(a)
    quantize, dtype, comp = ENGINES[a.engine]
    lm = lmstack.load(a.model, quantize=quantize, dtype=dtype, compile=comp)
    load_s = time.perf_counter() - t0
    ids = lm.tokenizer.encode(DEFAULT_PROMPT)
    r1 = bench_generate(lm.model, ids, a.new_tokens, batch=1, warmup=1)
    res = dict(engine=a.engine, load_s=load_s, prompt_tokens=r1.prompt_tokens, prefill_tok_s=r1.prefill_tok_s,
               decode_tok_s=r1.decode_tok_s, ttft_ms=r1.ttft_s * 1000, peak_rss_mb=peak_rss_mb(), tokens=r1.tokens)
    if a.batch > 1 and not comp:
        rb = bench_generate(lm.model, ids, a.new_tokens, batch=a.batch, warmup=0)
        res["batch_decode_tok_s"] = rb.decode_tok_s
    text = Path(a.text).read_text(encoding="utf-8")[:20000]
    pids = lm.tokenizer.encode(text)[:a.ppl_tokens]
    res["ppl"] = perplexity(lm.model, pids)
    res["ppl_tokens"] = len(pids)
    return res


def run_transformers(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import lmstack
    from lmstack.generate.bench import DEFAULT_PROMPT, peak_rss_mb
    tok = lmstack.load(a.model).tokenizer  # same token ids as the lmstack engines
    ids = tok.encode(DEFAULT_PROMPT)
    del tok
    import gc
    gc.collect()
    t0 = time.perf_counter()
    p = Path(a.model)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, torch_dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(x, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **kw)
        total = time.perf_counter() - t
    new = out.shape[1] - x.shape[1]
    return dict(engine=a.engine, load_s=load_s, prompt_tokens=len(ids), prefill_tok_s=len(ids) / ttft,
                decode_tok_s=(new - 1) / (total - ttft), ttft_ms=ttft * 1000, peak_rss_mb=peak_rss_mb(),
                tokens=out[0, x.shape[1]:].tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--compile", action="store_true", help="also measure int8 + torch.compile")
    ap.add_argument("--engines", help="comma-separated subset")
    ap.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine, print JSON
    a = ap.parse_args()
    if a.engine:
        print("RESULT " + json.dumps(run_engine(a)))
        return
    names = ["transformers-f32", "lmstack-f32", "lmstack-bf16", "lmstack-int8"] + (
        ["lmstack-int8-compile"] if a.compile else [])
    if a.engines:
        names = a.engines.split(",")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    rows = {}
    for name in names:
        cmd = [sys.executable, __file__, "--engine", name, "--model", a.model, "--text", a.text,
               "--threads", str(a.threads), "--new-tokens", str(a.new_tokens), "--batch", str(a.batch),
               "--ppl-tokens", str(a.ppl_tokens)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{name}: FAILED\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[name] = json.loads(line[-1][7:])
        print(f"{name}: {json.dumps({k: v for k, v in rows[name].items() if k != 'tokens'})}", flush=True)
    table = format_table(rows, a)
    print(table)
    if a.append_results:
        with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")


def format_table(rows: dict, a) -> str:
    base = rows.get("transformers-f32", {}).get("decode_tok_s")
    ref_ppl = rows.get("lmstack-f32", {}).get("ppl")
    ref_toks = rows.get("lmstack-f32", {}).get("tokens")
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    import torch
    lines = ["## Generation speed — 2026-11-26", "",
             f"Command: `.venv/bin/python benchmarks/generate_speed.py --threads {a.threads} --new-tokens "
             f"{a.new_tokens}{' --compile' if a.compile else ''}`  ",
             f"Machine: {cpu}, {os.cpu_count()} CPUs, {a.threads} threads, torch {torch.__version__}; "
             f"model {Path(a.model).name} (dequantized to float at load), batch 1 greedy, {a.new_tokens} new tokens "
             f"(EOS ignored), each engine in its own process. Perplexity: first {a.ppl_tokens} tokens of "
             f"{Path(a.text).name}. `same greedy` = leading generated tokens equal to lmstack-f32's.", "",
             "| engine | decode tok/s | vs transformers | prefill tok/s | TTFT ms | batch-8 aggregate tok/s | "
             "peak RSS MiB | perplexity (Δ vs f32) | same greedy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio = f"{r['decode_tok_s'] / base:.2f}×" if base else "—"
        ppl = "—"
        if "ppl" in r:
            ppl = f"{r['ppl']:.3f}" + (f" ({(r['ppl'] / ref_ppl - 1) * 100:+.2f}%)" if ref_ppl else "")
        same = "—"
        if ref_toks:
            k = next((i for i, (x, y) in enumerate(zip(r["tokens"], ref_toks)) if x != y), len(ref_toks))
            same = f"{k}/{len(ref_toks)}"
        bat = f"{r['batch_decode_tok_s']:.1f}" if "batch_decode_tok_s" in r else "—"
        lines.append(f"| {name} | {r['decode_tok_s']:.1f} | {ratio} | {r['prefill_tok_s']:.0f} | {r['ttft_ms']:.0f} "
                     f"| {bat} | {r['peak_rss_mb']:.0f} | {ppl} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
