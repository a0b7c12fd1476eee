"""Per-token cost of structured output: constrained vs unconstrained decoding of the same model, side by side.

    .venv/bin/python benchmarks/structured_output.py [--model GGUF] [--rounds 4] [--new-tokens 128]

Batch 1, greedy, the shared SmolLM2 GGUF by default. For each constraint (a JSON Schema with a free-text field, any
JSON object, a regex) and for no constraint, alternating A B A B in one process: decode ms per token (prefill
excluded) and the ratio to unconstrained; plus the grammar engine's own cost per token (mask + advance) measured
alone on the same token sequence.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import lmstack
from lmstack.generate import SamplingParams

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"},
                                           "summary": {"type": "string"}}, "required": ["title", "year", "summary"]}
KINDS = {"none": {}, "json_schema": {"json_schema": SCHEMA}, "json_object": {"json_object": True},
         "regex": {"regex": r"([A-Z][a-z]+ ){2,200}"}}


def decode_ms(lm, prompt: list[int], kw: dict, n: int) -> tuple[float, list[int]]:
    """ms per generated token after the first (the first includes the prefill), and the tokens."""
    p = SamplingParams(temperature=0.0, max_new_tokens=n, stop_at_eos=False, **kw)
    stops = {lm.tokenizer.eos_id}
    from lmstack.generate import stream_steps
    times, toks = [], []
    for s in stream_steps(lm.model, prompt, p, eos_id=stops, matcher=lm.matcher(p, stops)):
        times.append(time.perf_counter())
        toks.append(s.token)
    return (1000 * (times[-1] - times[0]) / max(1, len(times) - 1)), toks


def engine_us(lm, kw: dict, toks: list[int]) -> float:
    """The grammar engine alone: µs per token for allowed() + advance() along `toks`."""
    p = SamplingParams(temperature=0.0, **kw)
    m = lm.matcher(p, {lm.tokenizer.eos_id})
    t0 = time.perf_counter()
    n = 0
    for t in toks:
        if m.done:
            break
        m.allowed()
        m.advance(t)
        n += 1
    return 1e6 * (time.perf_counter() - t0) / max(1, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = lmstack.load(a.model)
    prompt = lm.prompt_ids(lm.chat_prompt([{"role": "user", "content": "Describe a famous film as JSON with its "
                                                                      "title, year and a long summary."}]))
    lm.matcher(SamplingParams(json_object=True), None)  # build the grammar tokenizer once, untimed
    ms: dict[str, list[float]] = {k: [] for k in KINDS}
    toks: dict[str, list[int]] = {}
    for r in range(a.rounds):
        for k in (KINDS if r % 2 == 0 else list(KINDS)[::-1]):
            t, toks[k] = decode_ms(lm, prompt, KINDS[k], a.new_tokens)
            ms[k].append(t)
    base = statistics.median(ms["none"])
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"model {Path(a.model).name}, {a.threads} threads, {cpu}, {a.rounds} rounds alternating, greedy, batch 1")
    print("| constraint | tokens | decode ms/token (median) | vs none | grammar engine µs/token |")
    print("|---|---|---|---|---|")
    for k in KINDS:
        med = statistics.median(ms[k])
        eng = "—" if k == "none" else f"{engine_us(lm, KINDS[k], toks[k]):.0f}"
        print(f"| {k} | {len(toks[k])} | {med:.2f} | {med / base:.3f}x | {eng} |")


if __name__ == "__main__":
    main()
