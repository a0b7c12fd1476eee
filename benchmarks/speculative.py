"""Prompt-lookup speculative decoding against plain decoding, same model, same run, alternating A/B/A/B.

    python benchmarks/speculative.py [--model GGUF] [--new-tokens 128] [--rounds 3] [-k 4] [--ngram-max 3]
    python benchmarks/speculative.py --serve [--clients 8] [--threads 2] ...

--serve measures `lmstack serve --draft-model ngram` against plain `lmstack serve`: both servers run at once (one
idle while the other is measured), and each round sends, to one then the other, one streamed chat request with this
prompt (tok/s = completion tokens / request wall time, acceptance from the ngram server's /metrics), then --clients
concurrent ones (aggregate tok/s: with more than one row decoding the batcher does not speculate, so the two should
match).

The prompt is a chat turn that hands the model a paragraph (a few hundred tokens) and asks for a summary that quotes
it: output that copies its input is where prompt lookup (lmstack.generate.NgramDrafter) helps. Greedy, so both
paths must produce the same tokens (checked). tok/s = new tokens / wall time of the whole generation (prefill
included); the median over rounds is reported with the speed-up and the acceptance rate."""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lmstack  # noqa: E402
from lmstack.generate import NgramDrafter, SamplingParams, generate, speculative_generate  # noqa: E402

MODEL = "/work/shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PARAGRAPH = (
    "The lighthouse at Harrow Point was built in 1871 by the engineer Margaret Ellison, who insisted that the tower "
    "be made of local granite rather than imported brick. Her design used a spiral staircase of one hundred and "
    "twelve steps, a lantern room with a rotating Fresnel lens, and a keeper's cottage joined to the base of the "
    "tower by a covered passage, so that the keeper never had to cross the open rock during a storm. For almost a "
    "century the light was tended by three families in turn: the Ellisons, the Pryces and the Tanners. In 1958 the "
    "lens was converted to electric power, and in 1986 the station was fully automated, which ended the era of "
    "resident keepers. Today the cottage is a small museum that displays the original logbooks, a brass telescope "
    "and the keepers' weather records, which show that the worst storm on record struck on the night of 14 "
    "January 1899, when waves broke over the lantern room itself. The tower still guides ships past the reef, and "
    "its light can be seen for twenty-two nautical miles on a clear night. Visitors can climb the staircase on "
    "summer weekends, and the museum is open every day except Monday from April to October.")
REQUEST = ("Summarise the text above in a few sentences. Quote its key sentences word for word, including the names, "
           "the dates and the numbers.")


def run_once(lm, ids: list[int], sp: SamplingParams, stops: set[int], spec: bool, k: int, ngram_max: int,
             ngram_min: int):
    """(tokens, seconds, SpeculativeResult or None) of one greedy generation."""
    t0 = time.perf_counter()
    if spec:
        res = speculative_generate(lm.model, NgramDrafter(ngram_max, ngram_min), ids, sp, k, eos_id=stops)
        return res.tokens, time.perf_counter() - t0, res
    toks = generate(lm.model, ids, sp, eos_id=stops)
    return toks, time.perf_counter() - t0, None


async def chat_stream(client, url: str, payload: dict) -> tuple[str, int, float]:
    """(text, completion tokens, seconds) of one streamed /v1/chat/completions request."""
    import json
    t0, text, n = time.perf_counter(), [], 0
    async with client.stream("POST", url, json=payload) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            text += [c["delta"].get("content") or "" for c in d.get("choices") or []]
            n = (d.get("usage") or {}).get("completion_tokens", n)
    return "".join(text), n, time.perf_counter() - t0


async def serve_level(base: str, clients: int, new_tokens: int) -> tuple[list[str], int, float]:
    """(texts, tokens, wall seconds) of `clients` concurrent streamed requests."""
    import httpx
    payload = {"model": "gguf", "messages": [{"role": "user", "content": f"{PARAGRAPH}\n\n{REQUEST}"}],
               "max_tokens": new_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(chat_stream(client, base + "/v1/chat/completions", payload)
                                     for _ in range(clients)))
        wall = time.perf_counter() - t0
    return [r[0] for r in res], sum(r[1] for r in res), wall


def serve_main(a) -> None:
    """Plain and --draft-model ngram servers side by side, alternating 1-client and N-client rounds."""
    import httpx
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_load import free_port, lmstack_cmd, stop_server, wait_health
    flags = {"plain": [], "ngram": ["--draft-model", "ngram", "--num-speculative", str(a.num_speculative),
                                    "--ngram-max", str(a.ngram_max), "--ngram-min", str(a.ngram_min)]}
    procs, bases = {}, {}
    try:
        for name, extra in flags.items():
            port = free_port()
            cmd = lmstack_cmd() + ["serve", "--model", a.model, "--port", str(port), "--model-name", "gguf",
                                   "--threads", str(a.threads or 2)] + extra
            print("server:", " ".join(cmd), flush=True)
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            bases[name] = f"http://127.0.0.1:{port}"
            wait_health(bases[name], procs[name], 300)
        speeds = {(n, c): [] for n in flags for c in (1, a.clients)}
        texts: dict[str, list[str]] = {}
        for r in range(a.rounds + 1):  # round 0 warms up
            for clients in (1, a.clients):
                for name in flags:
                    out, toks, wall = asyncio.run(serve_level(bases[name], clients, a.new_tokens))
                    if r:
                        speeds[name, clients].append(toks / wall)
                        texts.setdefault(name, out[:1])
                        print(f"  round {r} {name:5s} clients={clients}: {toks} tokens in {wall:.2f} s = "
                              f"{toks / wall:.1f} tok/s", flush=True)
        metrics = httpx.get(bases["ngram"] + "/metrics").text
    finally:
        for p in procs.values():
            stop_server(p)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    for c in (1, a.clients):  # the ratio of each round's adjacent pair, then their median (drift cancels)
        pairs = [y / x for x, y in zip(speeds["plain", c], speeds["ngram", c])]
        print(f"{c} client(s): plain {med['plain', c]:.1f} tok/s, ngram {med['ngram', c]:.1f} tok/s (medians); "
              f"ngram/plain per round {' '.join(f'{r:.2f}' for r in pairs)}, median {statistics.median(pairs):.2f}x")
    print("ngram server /metrics:", *(ln for ln in metrics.splitlines() if ln.startswith("lmstack_speculative")),
          sep="\n  ")
    print(f"1-client texts identical: {texts['plain'] == texts['ngram']}")


def main() -> None:
    """Note: with a packed GGUF model the first (warm-up) generation of a process can differ from later ones after a
    few dozen tokens (a near-tie in the logits decided differently once the kernels are warm), so the equality check
    compares the timed rounds only."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="timed A/B pairs (after one untimed warm-up pair)")
    ap.add_argument("-k", "--num-speculative", type=int, default=4)
    ap.add_argument("--ngram-max", type=int, default=3)
    ap.add_argument("--ngram-min", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice; --serve: 2)")
    ap.add_argument("--serve", action="store_true", help="measure `lmstack serve` with/without --draft-model ngram")
    ap.add_argument("--clients", type=int, default=8, help="--serve: concurrent clients of the loaded rounds")
    a = ap.parse_args()
    if a.serve:
        return serve_main(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = lmstack.load(a.model)
    stops = lm.tokenizer.end_of_turn_ids
    ids = lm.prompt_ids(lm.chat_prompt([{"role": "user", "content": f"{PARAGRAPH}\n\n{REQUEST}"}]))
    sp = SamplingParams(max_new_tokens=a.new_tokens, temperature=0)
    print(f"model: {a.model}\nprompt: {len(ids)} tokens, greedy, up to {a.new_tokens} new tokens, "
          f"k={a.num_speculative}, ngram {a.ngram_max}..{a.ngram_min}, threads={torch.get_num_threads()}")
    speeds: dict[str, list[float]] = {"plain": [], "ngram": []}
    outputs: dict[str, list[int]] = {}
    stats = None
    for r in range(a.rounds + 1):  # round 0 warms up
        for name in ("plain", "ngram"):
            toks, secs, res = run_once(lm, ids, sp, stops, name == "ngram", a.num_speculative, a.ngram_max,
                                       a.ngram_min)
            stats = res or stats
            if r:  # the warm-up round may differ (see the note in main's docstring)
                if outputs.setdefault(name, toks) != toks:
                    raise SystemExit(f"{name}: greedy output changed between timed rounds")
                speeds[name].append(len(toks) / secs)
                print(f"  round {r} {name:5s}: {len(toks)} tokens in {secs:.2f} s = {len(toks) / secs:.1f} tok/s")
    same = outputs["plain"] == outputs["ngram"]
    plain, spec = (statistics.median(speeds[n]) for n in ("plain", "ngram"))
    print(f"plain decode:          {plain:.1f} tok/s (median of {a.rounds})")
    print(f"prompt-lookup decode:  {spec:.1f} tok/s (median of {a.rounds})")
    print(f"speed-up:              {spec / plain:.2f}x")
    print(f"speculative:           {stats.summary()}")
    print(f"greedy outputs identical: {same} ({len(outputs['plain'])} tokens)")
    print("output:", repr(lm.tokenizer.decode(outputs["ngram"], skip_special_tokens=True)[:300]))
    if not same:
        first = next((i for i, (x, y) in enumerate(zip(outputs["plain"], outputs["ngram"])) if x != y),
                     min(len(outputs["plain"]), len(outputs["ngram"])))
        raise SystemExit(f"prompt lookup changed the greedy output (first difference at token {first})")


if __name__ == "__main__":
    main()
