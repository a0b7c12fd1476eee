"""The per-token host work of one decode step, old vs new, in one process (issue 11 item 8): what happens to the
(rows x vocab) logits after the forward pass. Old: every step copied them to the host as float32
(`logits.float().cpu()`), the sampling pipeline cloned them even for plain greedy, and each row's logprob was read
with Python indexing. New (lmstack.generate): the logits stay where the model left them, plain greedy takes an
argmax in place, and only the chosen ids / logprobs (and any top-n) reach the host.

    python benchmarks/sample_step.py [--vocab 49152] [--rows 1,8] [--reps 300]

On a CPU the "copy to host" is free for float32 logits, so the difference there is the avoided clone and Python
work; on a GPU each avoided copy is a device->host transfer and a sync (not measured here: no GPU in this VM)."""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
import time

import torch

from lmstack.generate import SamplingParams, make_generator
from lmstack.generate.engine import _steps as new_steps  # noqa: F401  (this module's own private: benchmark only)
from lmstack.generate.sampling import process_logits, sample_next
from lmstack.generate.bench import cpu_name


def old_engine_step(logits, p, gen, hist):
    """engine.stream_steps before: host copy, full sampling pipeline (a clone), log_softmax on the host."""
    raw = logits.float().cpu()
    processed = process_logits(raw, p, [hist], 0, None)
    nxt = processed.argmax(-1) if p.greedy else torch.multinomial(processed.softmax(-1), 1, generator=gen).squeeze(-1)
    logp = torch.log_softmax(raw, dim=-1)
    return [(int(t), c) for t, c in zip(nxt.tolist(), logp.gather(-1, nxt.view(-1, 1)).squeeze(-1).tolist())]


def new_engine_step(logits, p, gen, hist):
    logits = logits.float()
    nxt = sample_next(logits, p, gen, ids=[hist], prompt_len=0, eos_ids=None)
    return [(s.token, s.logprob) for s in new_steps(logits, nxt, 0)]


def old_batch_sample(logits):
    """ContinuousBatcher._sample before (all rows greedy): host copy, log_softmax, argmax of the rows, per-row
    Python indexing for each chosen logprob."""
    raw = logits.float().cpu()
    logp = torch.log_softmax(raw, dim=-1)
    easy = list(range(raw.shape[0]))
    am = raw[easy].argmax(-1).tolist()
    return [(t, float(logp[i][t])) for i, t in enumerate(am)]


def new_batch_sample(logits):
    """ContinuousBatcher._sample now (all rows greedy)."""
    logits = logits.float()
    toks = logits.argmax(-1)
    logp = torch.log_softmax(logits, dim=-1)
    return list(zip(toks.tolist(), logp.gather(-1, toks.view(-1, 1)).squeeze(-1).tolist()))



def old_sampled(logits, p, gens, hist):
    """sample_next at T > 0 before: top-p by a full sort of the vocabulary, then torch.multinomial (one exponential
    per vocabulary entry), per row as the batcher calls it."""
    out = []
    for i, g in enumerate(gens):
        x = logits[i:i + 1].float() / p.temperature
        sorted_logits, order = torch.sort(x, descending=False, dim=-1)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - p.top_p)
        remove[..., -1:] = False
        x = x.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
        out.append(int(torch.multinomial(x.softmax(-1), 1, generator=g)))
    return out


def lm_logits(path: str, rows: int) -> torch.Tensor | None:
    """Next-token logits of a real model (the shared SmolLM2 GGUF) after `rows` prompts; None without the file."""
    if not Path(path).exists():
        return None
    import lmstack
    lm = lmstack.load(path)
    prompts = ["The history of the Roman empire", "Once upon a time, a", "def fibonacci(n):", "The capital of",
               "My favourite food is", "In 1969, the first", "Water boils at", "She opened the door and"]
    with torch.no_grad():
        return torch.cat([lm.model(torch.tensor([lm.tokenizer.encode(prompts[i % 8])]))[:, -1].float()
                          for i in range(rows)])


def draw_sample(logits, p, gens, hist):
    """sample_next now: the inverse-CDF draw (lmstack.generate.sampling.draw), per row as the batcher calls it."""
    return [int(sample_next(logits[i:i + 1].float(), p, g, ids=[hist])) for i, g in enumerate(gens)]


def timeit(fn, reps: int) -> float:
    for _ in range(10):
        fn()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        ts.append((time.perf_counter() - t0) / reps)
    return statistics.median(ts) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared" / "models" /
                                           "SmolLM2-135M-Instruct.Q4_1.gguf"), help="real logits for the sampled rows")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {a.threads} threads; "
          f"vocab {a.vocab}; microseconds per decode step (median)")
    print("| step | logits | old µs | new µs | old/new |\n|---|---|---|---|---|")
    gen = make_generator(0)
    greedy = SamplingParams(temperature=0, stop_at_eos=False)
    for dtype in (torch.float32, torch.bfloat16):
        x1 = torch.randn(1, a.vocab).to(dtype)
        assert old_engine_step(x1, greedy, gen, [1, 2]) == new_engine_step(x1, greedy, gen, [1, 2])
        o = timeit(lambda: old_engine_step(x1, greedy, gen, [1, 2]), a.reps)
        n = timeit(lambda: new_engine_step(x1, greedy, gen, [1, 2]), a.reps)
        print(f"| batch 1 (engine), greedy | {str(dtype)[6:]} | {o:.0f} | {n:.0f} | {o / n:.2f}x |")
        x8 = torch.randn(8, a.vocab).to(dtype)
        assert old_batch_sample(x8) == new_batch_sample(x8)
        o = timeit(lambda: old_batch_sample(x8), a.reps)
        n = timeit(lambda: new_batch_sample(x8), a.reps)
        print(f"| batch 8 (batcher), greedy | {str(dtype)[6:]} | {o:.0f} | {n:.0f} | {o / n:.2f}x |")
    sampled = SamplingParams(temperature=0.8, top_p=0.95, stop_at_eos=False)
    for rows in (1, 8):
        x = torch.randn(rows, a.vocab) * 3
        gens = [make_generator(i) for i in range(rows)]
        real = lm_logits(a.model, rows)
        for name, x in (("random", x), ("SmolLM2", real)):
            if x is None:
                continue
            o = timeit(lambda: old_sampled(x, sampled, gens, [1, 2]), max(10, a.reps // 10))
            n = timeit(lambda: draw_sample(x, sampled, gens, [1, 2]), max(10, a.reps // 10))
            print(f"| batch {rows}, T=0.8 top_p=0.95 (sort + multinomial -> top-k nucleus + inverse-CDF draw) | "
                  f"{name} logits | {o:.0f} | {n:.0f} | {o / n:.2f}x |")


if __name__ == "__main__":
    main()
