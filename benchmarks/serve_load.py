"""Load test of `lmstack serve`: concurrent streaming /v1/completions clients against a real server subprocess.

Starts `lmstack serve --model MODEL --port <free port> [SERVE_ARGS]`, waits for GET /health, then for each
concurrency level N (default 1, 4, 8, 16) runs N asyncio + httpx clients at once, each doing ROUNDS streamed
requests (POST /v1/completions, stream=true, a fixed short prompt, max_tokens 32, temperature 0). Per level it
reports aggregate generated tokens/s (all tokens / wall time of the level), p50/p99 time to first token (first SSE
chunk with text), p50/p99 total request latency and the error count. Tokens per request are the `usage`
completion_tokens of the final chunk (stream_options.include_usage), or the number of SSE chunks with text when
no usage chunk came.

With `--engines lmstack,llama.cpp` the same load also runs against llama-cpp-python's own server
(`python -m llama_cpp.server`, from benchmarks/.venv-llama, built by benchmarks/generate_speed.py) on the same file
and thread count, one server at a time, and the table gets a per-level ratio. Per-request stream decode speed
((tokens - 1) / (latency - TTFT), p50) is reported too: compare the 1-client row with the in-process decode speed
of benchmarks/generate_speed.py, or use `--vs-inprocess R`: one lmstack server stays up while R pairs alternate
one streamed request through it with the same generation in a fresh in-process subprocess (`LM.stream_steps`, same
model, threads, prompt and max_tokens; the server is idle meanwhile), both timed from the first token to the last,
and the median ratio server / in-process is printed; `--lean-client` reads that stream with http.client instead of
httpx (httpx took ~0.5-0.6 ms of CPU per token here, on the same cores as the server).

    .venv/bin/python benchmarks/serve_load.py [--model GGUF] [--serve-args "--quantize int8"]
        [--engines lmstack,llama.cpp] [--threads 2] [--concurrency 1,4,8,16] [--rounds 1] [--max-tokens 32]
        [--vs-inprocess R [--lean-client]] [--append-results]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The three most important things to know about the ocean are"
MACHINE = "2-core x86_64 VM, shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmstack_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "lmstack"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lmstack.cli"]


def wait_health(base: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before /health answered")
        try:
            if httpx.get(base + "/v1/models", timeout=2.0).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"/health did not answer within {timeout:.0f} s")


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


async def one_request(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    t0 = time.perf_counter()
    ttft, text_chunks, usage_tokens, err = None, 0, None, None
    try:
        async with client.stream("POST", url, json=payload) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                d = json.loads(data)
                if "error" in d:
                    err = f"stream error: {d['error'].get('message')}"
                    break
                if any(c.get("text") for c in d.get("choices") or []):
                    text_chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                if d.get("usage"):
                    usage_tokens = d["usage"].get("completion_tokens")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if err:
        return {"error": err}
    n = usage_tokens if usage_tokens is not None else text_chunks
    lat = time.perf_counter() - t0
    dec = (n - 1) / (lat - ttft) if ttft is not None and n > 1 and lat > ttft else None
    return {"ttft": ttft, "latency": lat, "tokens": n, "decode": dec}


async def run_level(base: str, model_name: str, n: int, rounds: int, max_tokens: int) -> dict:
    payload = {"model": model_name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker():
            return [await one_request(client, base + "/v1/completions", payload) for _ in range(rounds)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(n))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    lats = [r["latency"] for r in ok]
    return {"clients": n, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
            "lat_p50": pct(lats, 50), "lat_p99": pct(lats, 99),
            "decode_p50": pct([r["decode"] for r in ok if r["decode"]], 50),
            "errors": len(errors), "error_samples": errors[:3]}


def table(rows: list[dict]) -> str:
    out = ["| server | clients | requests | tokens | wall s | aggregate tok/s | vs llama.cpp | stream decode tok/s p50 "
           "| TTFT p50 ms | TTFT p99 ms | latency p50 s | latency p99 s | errors |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    peer = {r["clients"]: r["tok_s"] for r in rows if r["engine"] == "llama.cpp"}
    for r in rows:
        ratio = f"{r['tok_s'] / peer[r['clients']]:.2f}x" if peer.get(r["clients"]) else "—"
        out.append(f"| {r['engine']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.2f} "
                   f"| {r['tok_s']:.1f} | {ratio} | {r['decode_p50']:.1f} | {r['ttft_p50'] * 1000:.0f} "
                   f"| {r['ttft_p99'] * 1000:.0f} | {r['lat_p50']:.2f} | {r['lat_p99']:.2f} | {r['errors']} |")
    return "\n".join(out)


def server_cmd(engine: str, a, port: int, serve_args: list[str]) -> tuple[list[str], str]:
    """(command, model name to request) for one server."""
    if engine == "llama.cpp":
        sys.path.insert(0, str(REPO / "benchmarks"))
        from generate_speed import llama_python
        return ([str(llama_python()), "-m", "llama_cpp.server", "--model", a.model, "--port", str(port),
                 "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads), "--n_ctx", "2048",
                 "--model_alias", "gguf", "--interrupt_requests", "False"], "gguf")  # queue, not cut, concurrent requests
    if "--model-name" not in serve_args:
        serve_args = serve_args + ["--model-name", "gguf"]
    cmd = lmstack_cmd() + ["serve", "--model", a.model, "--port", str(port), "--threads", str(a.threads)] + serve_args
    return cmd, serve_args[serve_args.index("--model-name") + 1]


def run_server(engine: str, a, levels: list[int], serve_args: list[str]) -> list[dict]:
    port = free_port()
    cmd, model_name = server_cmd(engine, a, port, serve_args)
    base = f"http://127.0.0.1:{port}"
    print("server:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    log = None if a.server_log else open(os.devnull, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT if log else None)
    rows = []
    try:
        up = wait_health(base, proc, a.startup_timeout)
        print(f"{engine}: up after {up:.1f} s", flush=True)
        # one untimed warm-up request (first-call allocations, kernel load)
        warm = asyncio.run(run_level(base, model_name, 1, 1, a.max_tokens))
        if warm["errors"]:
            print("warm-up error:", warm["error_samples"], flush=True)
        for n in levels:
            r = dict(asyncio.run(run_level(base, model_name, n, a.rounds, a.max_tokens)), engine=engine)
            rows.append(r)
            print(f"{engine} clients={n}: {r['tok_s']:.1f} tok/s, stream decode p50 {r['decode_p50']:.1f}, TTFT "
                  f"p50 {r['ttft_p50'] * 1000:.0f} ms, errors {r['errors']}"
                  + (f" {r['error_samples']}" if r["errors"] else ""), flush=True)
    finally:
        stop_server(proc, log)
    return rows


# One generation in process, timed like a stream client times the server: first token to last.
INPROCESS = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import lmstack
lm = lmstack.load(sys.argv[1])
def once():
    t = []
    for _ in lm.stream_steps(sys.argv[3], max_new_tokens=int(sys.argv[4]), temperature=0):
        t.append(time.perf_counter())
    return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else 0.0
once()  # untimed warm-up, as the server gets
print(json.dumps({"decode": once()}))
"""


def lean_stream(port: int, model_name: str, max_tokens: int) -> float:
    """One streamed request read with the standard library's http.client (chunked decoding + one json.loads per
    event, no event loop): stream decode tok/s timed as `one_request` times it. It costs the shared CPUs less than
    httpx, so the ratio shows more of the server's own overhead."""
    import http.client
    body = json.dumps({"model": model_name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
        times = []
        for line in iter(r.readline, b""):
            if not line.startswith(b"data: {"):
                continue
            d = json.loads(line[6:])
            if "error" in d:
                raise RuntimeError(f"stream error: {d['error']}")
            if any(c.get("text") for c in d.get("choices") or []):
                times.append(time.perf_counter())
    finally:
        conn.close()
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def inprocess_decode(a) -> float:
    out = subprocess.run([sys.executable, "-c", INPROCESS, a.model, str(a.threads), PROMPT, str(a.max_tokens)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["decode"]


def vs_inprocess(a, serve_args: list[str]) -> str:
    """Alternate one streamed request through a running lmstack server with one in-process generation."""
    port = free_port()
    cmd, model_name = server_cmd("lmstack", a, port, serve_args)
    base = f"http://127.0.0.1:{port}"
    log = None if a.server_log else open(os.devnull, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT if log else None)
    pairs = []
    try:
        wait_health(base, proc, a.startup_timeout)
        asyncio.run(run_level(base, model_name, 1, 1, a.max_tokens))  # warm-up
        for i in range(a.vs_inprocess):
            if a.lean_client:
                served = lean_stream(port, model_name, a.max_tokens)
            else:
                r = asyncio.run(run_level(base, model_name, 1, 1, a.max_tokens))
                if r["errors"]:
                    raise RuntimeError(f"server request failed: {r['error_samples']}")
                served = r["decode_p50"]
            pairs.append((served, inprocess_decode(a)))
            print(f"pair {i + 1}: server {pairs[-1][0]:.1f} tok/s, in-process {pairs[-1][1]:.1f} tok/s, "
                  f"ratio {pairs[-1][0] / pairs[-1][1]:.3f}", flush=True)
    finally:
        stop_server(proc, log)
    ratios = [s / p for s, p in pairs]
    return (f"one stream through `lmstack serve` ({'http.client' if a.lean_client else 'httpx'} client) / in-process "
            f"decode: median **{statistics.median(ratios):.3f}** over "
            f"{len(pairs)} alternations (server {statistics.median(s for s, _ in pairs):.1f} vs in-process "
            f"{statistics.median(p for _, p in pairs):.1f} tok/s; per pair "
            + " / ".join(f"{x:.2f}" for x in ratios) + ")")


def stop_server(proc: subprocess.Popen, log=None) -> None:
    """End a server subprocess (terminate, then kill after 15 s) and close its log file."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if log:
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--serve-args", default="", help='extra `lmstack serve` flags, e.g. "--quantize int8"')
    ap.add_argument("--engines", default="lmstack", help="servers to load, in turn: lmstack and/or llama.cpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,8,16", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=1, help="requests each client makes, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--server-log", action="store_true", help="show the server's own log (default: discarded)")
    ap.add_argument("--vs-inprocess", type=int, default=0, metavar="R",
                    help="instead of the load levels: R alternations of one server stream vs in-process decode")
    ap.add_argument("--lean-client", action="store_true",
                    help="with --vs-inprocess: read the stream with http.client instead of httpx (less client CPU)")
    ap.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    serve_args = shlex.split(a.serve_args)
    if a.vs_inprocess:
        print(vs_inprocess(a, serve_args))
        return
    rows = [r for engine in a.engines.split(",") for r in run_server(engine.strip(), a, levels, serve_args)]
    tbl = table(rows)
    print()
    print(tbl)
    if a.append_results:
        argv = " ".join(shlex.quote(x) for x in sys.argv[1:])
        cmdline = f".venv/bin/python benchmarks/serve_load.py {argv}".strip()
        try:
            import torch
            tv = f", torch {torch.__version__}"
        except Exception:
            tv = ""
        section = (f"\n## Serve load — {dt.date.today().isoformat()}\n\n"
                   f"Command: `{cmdline}`  \n"
                   f"Machine: {MACHINE} ({platform.machine()}, {os.cpu_count()} CPUs{tv}); model "
                   f"{Path(a.model).name}, {a.threads} threads, lmstack server flags `{' '.join(serve_args) or '(none)'}`; "
                   f"each of N clients makes {a.rounds} streamed /v1/completions request(s) at once "
                   f"(prompt {PROMPT!r}, max_tokens {a.max_tokens}, temperature 0), one untimed warm-up request "
                   f"first. Aggregate tok/s = generated tokens (usage.completion_tokens) / wall time of the level.\n\n"
                   f"{tbl}\n")
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(section)
        print(f"\nappended to {REPO / 'benchmarks' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
