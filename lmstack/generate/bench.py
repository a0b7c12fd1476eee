"""Generation speed: prefill tok/s, decode tok/s, time-to-first-token and peak RSS of one engine configuration.

Used by `lmstack bench-generate` and benchmarks/generate_speed.py. Greedy decoding, EOS ignored, so every run
generates exactly `new_tokens` tokens."""
from __future__ import annotations

import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..models.kernels import cpuinfo
from .batching import generate_batch
from .engine import stream_steps
from .sampling import SamplingParams

DEFAULT_PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
                  "combined movable metal type, oil-based ink and a wooden press adapted from winemaking. Within "
                  "a few decades printing shops had spread across Europe, and books became cheaper")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for benchmark reports: timings differ across machines."""
    if cpuinfo("model name"):
        return cpuinfo("model name")
    return platform.processor() or platform.machine() or "unknown CPU"


@dataclass
class GenBench:
    prompt_tokens: int
    new_tokens: int
    batch: int
    prefill_tok_s: float
    decode_tok_s: float        # per sequence at batch 1; aggregate (batch * steps / time) for batch > 1
    ttft_s: float
    peak_rss_mb: float
    tokens: list[int]          # the first row's generated ids (greedy), to compare engines

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"prefill: {self.prefill_tok_s:,.1f} tok/s ({self.prompt_tokens} prompt tokens)\n"
                f"decode: {self.decode_tok_s:,.1f} tok/s ({self.new_tokens} new tokens, batch {self.batch})\n"
                f"time to first token: {self.ttft_s * 1000:,.1f} ms\n"
                f"peak RSS: {self.peak_rss_mb:,.1f} MiB")


def bench_generate(model, prompt_ids: list[int], new_tokens: int = 128, batch: int = 1, warmup: int = 1) -> GenBench:
    """Time greedy generation of `new_tokens` tokens after `prompt_ids` (batch > 1: that many copies of the prompt,
    one batched forward pass per step). `warmup` untimed short runs first (kernel build, compile, allocator)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    for _ in range(warmup):
        list(stream_steps(model, prompt_ids, SamplingParams(max_new_tokens=4, temperature=0.0, stop_at_eos=False)))
    if batch == 1:
        t0 = time.perf_counter()
        t_first = None
        toks = []
        for step in stream_steps(model, prompt_ids, params):
            if t_first is None:
                t_first = time.perf_counter()
            toks.append(step.token)
        t_end = time.perf_counter()
        ttft = t_first - t0
        decode = (len(toks) - 1) / (t_end - t_first) if len(toks) > 1 else float("nan")
        prefill = len(prompt_ids) / ttft
    else:
        # prefill alone (one batched forward), then the whole batched generation
        from ..models.kv_cache import make_cache
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids] * batch, device=next(model.parameters()).device)
            cache = make_cache(model, batch, len(prompt_ids) + 1)
            t0 = time.perf_counter()
            model(ids, cache=cache, pos=0)
            ttft = time.perf_counter() - t0
        prefill = batch * len(prompt_ids) / ttft
        t0 = time.perf_counter()
        rows = generate_batch(model, [list(prompt_ids)] * batch, params)
        total = time.perf_counter() - t0
        toks = [s.token for s in rows[0]]
        decode = batch * (len(toks) - 1) / max(total - ttft, 1e-9)
    return GenBench(len(prompt_ids), len(toks), batch, prefill, decode, ttft, peak_rss_mb(), toks)
