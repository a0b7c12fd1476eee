"""Generation speed, side by side, in one run on one machine: llama.cpp (llama-cpp-python) vs lmstack on the same
GGUF file — packed GGUF weights (the default), float32, int8 [, int8 + torch.compile] [, transformers float32].

Each engine runs in its own subprocess (clean peak RSS, no shared caches), engines alternating A B A B for --rounds
rounds (median reported). Same token ids for every engine (lmstack's tokenizer), batch 1 greedy, N new tokens (EOS
ignored): prefill tok/s of the benchmark prompt and of a --long-prompt-token prompt, decode tok/s, time to first
token, peak RSS, perplexity on the first --ppl-tokens tokens of Tiny Shakespeare (llama.cpp: the same tokens in one
logits_all pass); lmstack engines also batch-8 aggregate decode tok/s. Plus the ceiling: weight bytes read per token
over the measured memory read bandwidth.

llama.cpp runs in its own venv (benchmarks/.venv-llama, made on first use: pip builds llama-cpp-python from source,
several minutes on 2 cores) with GGML_NATIVE=OFF and the instruction sets this CPU reports set explicitly (a native
build has been seen to crash on VMs that report AMX).

    .venv/bin/python benchmarks/generate_speed.py [--model GGUF] [--threads 2] [--new-tokens 128] [--rounds 2]
        [--engines llama.cpp,lmstack-gguf,...] [--compile] [--append-results]
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
LLAMA_VENV = REPO / "benchmarks" / ".venv-llama"
ENGINES = {  # name -> (quantize, dtype, compile); lmstack-gguf keeps the file's blocks packed (lmstack.load's default)
    "lmstack-gguf": (None, None, False),
    "lmstack-gguf-compile": (None, None, True),
    "lmstack-f32": (None, "float32", False),
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
    from lmstack.generate.bench import bench_generate, peak_rss_mb
    from lmstack.models.kernels import kernel_path
    t0 = time.perf_counter()
    if a.engine == "transformers-f32":
        return run_transformers(a)
    quantize, dtype, comp = ENGINES[a.engine]
    lm = lmstack.load(a.model, quantize=quantize, dtype=dtype, compile=comp)
    load_s = time.perf_counter() - t0
    ids, long_ids, pids = (json.loads(Path(a.ids).read_text())[k] for k in ("prompt", "long", "ppl"))
    r1 = bench_generate(lm.model, ids, a.new_tokens, batch=1, warmup=1)
    res = dict(engine=a.engine, load_s=load_s, prompt_tokens=r1.prompt_tokens, prefill_tok_s=r1.prefill_tok_s,
               decode_tok_s=r1.decode_tok_s, ttft_ms=r1.ttft_s * 1000, tokens=r1.tokens,
               kernel=kernel_path() if getattr(lm.model, "quantization", None) not in (None, "int8") else None)
    rl = bench_generate(lm.model, long_ids, 2, batch=1, warmup=0)
    res["long_prefill_tok_s"] = rl.prefill_tok_s
    if a.batch > 1 and not comp:
        rb = bench_generate(lm.model, ids, a.new_tokens, batch=a.batch, warmup=0)
        res["batch_decode_tok_s"] = rb.decode_tok_s
    res["peak_rss_mb"] = peak_rss_mb()  # before the perplexity pass, as for llama.cpp
    res["ppl"] = perplexity(lm.model, pids)
    res["ppl_tokens"] = len(pids)
    return res


def run_llama_cpp(a) -> dict:
    """llama.cpp through llama-cpp-python (runs under benchmarks/.venv-llama's python: no torch, no lmstack)."""
    import resource

    import numpy as np
    from llama_cpp import Llama
    ids, long_ids, pids = (json.loads(Path(a.ids).read_text())[k] for k in ("prompt", "long", "ppl"))
    t0 = time.perf_counter()
    llm = Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=4096, n_batch=512,
                verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

    def greedy(prompt, n):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        out = [int(np.argmax(last_logits()))]
        t_first = time.perf_counter()
        while len(out) < n:
            llm.eval([out[-1]])
            out.append(int(np.argmax(last_logits())))
        return out, t_first - t, time.perf_counter() - t_first
    greedy(ids, 4)  # warm-up
    toks, ttft, dec = greedy(ids, a.new_tokens)
    _, long_ttft, _ = greedy(long_ids, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the logits_all context below
    ppl_llm = Llama(model_path=a.model, n_threads=a.threads, n_ctx=max(512, len(pids)), n_batch=512,
                    logits_all=True, verbose=False)
    ppl_llm.eval(pids)
    logits = np.asarray(ppl_llm.scores[:len(pids) - 1], dtype=np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(pids) - 1), pids[1:]].mean()
    return dict(engine="llama.cpp", load_s=load_s, prompt_tokens=len(ids), prefill_tok_s=len(ids) / ttft,
                decode_tok_s=(len(toks) - 1) / dec, ttft_ms=ttft * 1000, tokens=toks,
                long_prefill_tok_s=len(long_ids) / long_ttft, ppl=math.exp(nll), ppl_tokens=len(pids),
                peak_rss_mb=rss)


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
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (A B A B ...); the median is reported")
    ap.add_argument("--long-prompt-tokens", type=int, default=512)
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine, print JSON
    ap.add_argument("--ids", help=argparse.SUPPRESS)  # internal: the token ids file
    a = ap.parse_args()
    if a.engine:
        print("RESULT " + json.dumps(run_llama_cpp(a) if a.engine == "llama.cpp" else run_engine(a)))
        return
    names = ["llama.cpp", "lmstack-gguf", "lmstack-f32", "lmstack-int8"] + (
        ["lmstack-gguf-compile"] if a.compile else [])
    if a.engines:
        names = a.engines.split(",")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    ids_file = write_ids(a)
    samples: dict[str, list[dict]] = {}
    for rnd in range(a.rounds):
        for name in names:
            py = str(llama_python()) if name == "llama.cpp" else sys.executable
            cmd = [py, __file__, "--engine", name, "--model", a.model, "--ids", str(ids_file),
                   "--threads", str(a.threads), "--new-tokens", str(a.new_tokens), "--batch", str(a.batch)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{name}: FAILED\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            samples.setdefault(name, []).append(json.loads(line[-1][7:]))
            r = samples[name][-1]
            print(f"round {rnd + 1} {name}: decode {r['decode_tok_s']:.1f} tok/s, prefill {r['prefill_tok_s']:.0f}, "
                  f"long prefill {r['long_prefill_tok_s']:.0f}, ppl {r['ppl']:.3f}", flush=True)
    rows = {n: median_row(v) for n, v in samples.items()}
    table = format_table(rows, a)
    print(table)
    if a.append_results:
        with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")


def write_ids(a) -> Path:
    """Token ids every engine uses (lmstack's tokenizer of the GGUF): the prompt, a long prompt, perplexity text."""
    sys.path.insert(0, str(REPO))
    import lmstack
    from lmstack.generate.bench import DEFAULT_PROMPT
    tok = lmstack.load(a.model).tokenizer
    text = Path(a.text).read_text(encoding="utf-8")[:40000]
    all_ids = tok.encode(text)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "lmstack_generate_speed_ids.json"
    out.write_text(json.dumps({"prompt": tok.encode(DEFAULT_PROMPT), "long": all_ids[:a.long_prompt_tokens],
                               "ppl": all_ids[:a.ppl_tokens]}))
    return out


def llama_python() -> Path:
    """benchmarks/.venv-llama's python with llama-cpp-python built for this CPU (built on first use)."""
    py = LLAMA_VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return py
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    want = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX512",
            "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16", "avx_vnni": "AVX_VNNI"}
    cmake = " ".join(["-DGGML_NATIVE=OFF"] + [f"-DGGML_{v}={'ON' if k in flags else 'OFF'}" for k, v in want.items()])
    print(f"building llama-cpp-python into {LLAMA_VENV} (CMAKE_ARGS={cmake}); this takes minutes", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LLAMA_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "llama-cpp-python[server]"], check=True,
                   env=dict(os.environ, CMAKE_ARGS=cmake, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2)))
    return py


def median_row(runs: list[dict]) -> dict:
    """The per-key median of an engine's rounds (numbers); other fields from the first round."""
    import statistics
    row = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            row[k] = statistics.median(r[k] for r in runs)
    row["rounds"] = len(runs)
    return row


def memory_ceiling(model_path: str, threads: int) -> dict:
    """Bytes of weights read per decoded token (every tensor but the embedding rows, unless the head is tied to
    it) and the memory read bandwidth measured with torch (sum over a 1 GiB tensor), -> the decode ceiling."""
    import gguf
    import torch
    torch.set_num_threads(threads)
    r = gguf.GGUFReader(model_path)
    names = {t.name: int(t.n_bytes) for t in r.tensors}
    per_token = sum(names.values()) - (names["token_embd.weight"] if "output.weight" in names else 0)
    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    bw = 5 * x.numel() * 4 / (time.perf_counter() - t)
    return dict(bytes_per_token=per_token, bandwidth_gb_s=bw / 1e9, ceiling_tok_s=bw / per_token)


def format_table(rows: dict, a) -> str:
    import datetime

    import torch
    from lmstack.generate.bench import cpu_name
    from lmstack.models.kernels import cpu_flags
    base = rows.get("llama.cpp", {})
    ref_ppl = rows.get("lmstack-f32", {}).get("ppl")
    ref_toks = rows.get("llama.cpp", rows.get("lmstack-f32", {})).get("tokens")
    isa = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx2", "avx512", "amx", "avx_vnni"))))
    ceil = memory_ceiling(a.model, a.threads)
    lines = [f"## Generation speed vs llama.cpp — {datetime.date.today()}", "",
             f"Command: `.venv/bin/python benchmarks/generate_speed.py --threads {a.threads} --new-tokens "
             f"{a.new_tokens} --rounds {a.rounds}{' --compile' if a.compile else ''}`  ",
             f"Machine: {cpu_name()}, {os.cpu_count()} CPUs ({isa}), {a.threads} threads, torch {torch.__version__}; "
             f"model {Path(a.model).name}; batch 1 greedy, {a.new_tokens} new tokens (EOS ignored), the same token "
             f"ids for every engine, each engine in its own process, engines alternating for {a.rounds} rounds "
             f"(median). Long prefill: the first {a.long_prompt_tokens} tokens of {Path(a.text).name}. Perplexity: "
             f"its first {a.ppl_tokens} tokens. `same greedy` = leading tokens equal to llama.cpp's.  ",
             f"Ceiling: {ceil['bytes_per_token'] / 1e6:.1f} MB of weights read per token / "
             f"{ceil['bandwidth_gb_s']:.1f} GB/s measured read bandwidth = {ceil['ceiling_tok_s']:.0f} tok/s.", "",
             "| engine | kernel | decode tok/s | vs llama.cpp | % of ceiling | prefill tok/s (prompt) | prefill tok/s "
             f"({a.long_prompt_tokens}) | vs llama.cpp | batch-8 tok/s | load s | peak RSS MiB | perplexity "
             "(Δ vs f32) | same greedy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}×" if base else "—"
        pratio = f"{r['long_prefill_tok_s'] / base['long_prefill_tok_s']:.2f}×" if base else "—"
        ppl = f"{r['ppl']:.3f}" + (f" ({(r['ppl'] / ref_ppl - 1) * 100:+.2f}%)" if ref_ppl else "")
        same = "—"
        if ref_toks:
            k = next((i for i, (x, y) in enumerate(zip(r["tokens"], ref_toks)) if x != y), len(ref_toks))
            same = f"{k}/{len(ref_toks)}"
        bat = f"{r['batch_decode_tok_s']:.1f}" if "batch_decode_tok_s" in r else "—"
        lines.append(f"| {name} | {r.get('kernel') or '—'} | {r['decode_tok_s']:.1f} | {ratio} | "
                     f"{r['decode_tok_s'] / ceil['ceiling_tok_s'] * 100:.0f}% | {r['prefill_tok_s']:.0f} | "
                     f"{r['long_prefill_tok_s']:.0f} | {pratio} | {bat} | {r['load_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{ppl} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
