"""Continuous batching (generate/batching.py): rows that join a running batch later, leave it early, get shifted or
compacted in the shared KV cache must still decode exactly what each prompt decodes alone."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import lively_model
from lmstack.errors import ContextLengthError
from lmstack.generate import (BackgroundBatcher, ContinuousBatcher, SamplingParams, generate_batch, stream_steps)
from lmstack.generate.batching import Request


def model(family, seed=0, **over):
    return lively_model(family, seed, **over)


def alone(m, prompt, sp, eos=None, top=0):
    return list(stream_steps(m, prompt, sp, eos_id=eos, top_logprobs=top))


PROMPTS = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [33], [7, 7, 8, 40, 41, 2, 9], [3] * 20, [4, 5],
           list(range(10, 26)), [60, 61, 62]]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("max_batch", [1, 2, 3, 8])
@pytest.mark.parametrize("prefill_tokens", [0, 40, 4096])
def test_rows_joining_and_leaving_decode_as_alone(family, max_batch, prefill_tokens):
    """More prompts than rows: later prompts join as rows free up (different lengths -> shifts, swap-removes);
    joiners prefilled one by one, a few at a time, or all together (left-padded)."""
    m = model(family)
    out = {}
    b = ContinuousBatcher(m, max_batch=max_batch, prefill_tokens=prefill_tokens)
    sps = [SamplingParams(max_new_tokens=3 + (5 * i) % 11, temperature=0, stop_at_eos=False)
           for i in range(len(PROMPTS))]
    for i, (p, sp) in enumerate(zip(PROMPTS, sps)):
        out[i] = []
        b.add(Request(p, sp, top_logprobs=2, on_step=out[i].append))
    while b.has_work():
        assert b.active <= max_batch
        b.step()
    for i, (p, sp) in enumerate(zip(PROMPTS, sps)):
        ref = alone(m, p, sp, top=2)
        assert [s.token for s in out[i]] == [s.token for s in ref], i
        assert [s.logprob for s in out[i]] == pytest.approx([s.logprob for s in ref], abs=1e-4)
        assert [t for t, _ in out[i][-1].top] == [t for t, _ in ref[-1].top]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_requests_added_while_the_batch_runs(family):
    """A request added mid-run joins at the current slot: a longer prompt than the slot shifts the batch right."""
    m = model(family)
    sp = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
    b = ContinuousBatcher(m, max_batch=4)
    outs = [[] for _ in PROMPTS[:5]]
    b.add(Request(PROMPTS[2], sp, on_step=outs[0].append))  # 1-token prompt starts alone
    b.step(), b.step()
    b.add(Request(PROMPTS[4], sp, on_step=outs[1].append))  # 20 tokens > pos: shift right
    b.step()
    b.add(Request(PROMPTS[0], sp, on_step=outs[2].append))
    for _ in range(9):
        b.step()
    b.add(Request(PROMPTS[1], sp, on_step=outs[3].append))
    b.add(Request(PROMPTS[5], sp, on_step=outs[4].append))
    while b.has_work():
        b.step()
    for o, p in zip(outs, [PROMPTS[i] for i in (2, 4, 0, 1, 5)]):
        assert [s.token for s in o] == [s.token for s in alone(m, p, sp)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_long_runs_compact_and_grow_up_to_the_window(family):
    """Rows that fill the whole context window: the cache grows to block_size and is compacted in place."""
    m = model(family, block_size=40)
    b = ContinuousBatcher(m, max_batch=2)
    cases = [([1, 2, 3], 37), ([9] * 30, 9), ([4, 4], 30), ([8, 9, 10, 11, 12], 35), ([2], 39)]
    outs = []
    for p, n in cases:
        outs.append([])
        b.add(Request(p, SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False), on_step=outs[-1].append))
    while b.has_work():
        b.step()
        assert b.pos <= 40 and b.cap <= 40
    for (p, n), o in zip(cases, outs):
        assert [s.token for s in o] == [s.token for s in alone(m, p, SamplingParams(max_new_tokens=n, temperature=0,
                                                                                    stop_at_eos=False))]


def test_rows_stop_at_their_own_eos_and_mixed_params():
    m = model("llama")
    free = [s.token for s in alone(m, PROMPTS[0], SamplingParams(max_new_tokens=10, temperature=0,
                                                                 stop_at_eos=False))]
    eos = free[3]
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    pen = SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.3, logit_bias={eos: -5.0})
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=10, seed=5, stop_at_eos=False)
    cases = [(PROMPTS[0], greedy), (PROMPTS[1], pen), (PROMPTS[3], sampled), (PROMPTS[0], pen)]
    b = ContinuousBatcher(m, max_batch=4)
    outs = []
    for p, sp in cases:
        outs.append([])
        b.add(Request(p, sp, stop_ids={eos}, on_step=outs[-1].append))
    while b.has_work():
        b.step()
    assert [s.token for s in outs[0]] == free[:4]  # ends with its EOS step
    for (p, sp), o in zip(cases, outs):
        assert [s.token for s in o] == [s.token for s in alone(m, p, sp, eos=eos)]


def test_generate_batch_seeds_each_row():
    m = model("gpt2")
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11, stop_at_eos=False)
    rows = generate_batch(m, PROMPTS[:3], sp, max_batch=2)
    for i, (p, r) in enumerate(zip(PROMPTS[:3], rows)):
        ref = alone(m, p, SamplingParams(**{**sp.to_dict(), "seed": 11 + i}))
        assert [s.token for s in r] == [s.token for s in ref]


def test_background_batcher_threads_cancel_and_run():
    m = model("llama")
    eng = BackgroundBatcher(m, max_batch=3)
    try:
        sp = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
        results = {}

        def client(i):
            results[i] = [s.token for s in eng.submit(PROMPTS[i], sp)]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for i in range(6):
            assert results[i] == [s.token for s in alone(m, PROMPTS[i], sp)]
        # a cancelled stream frees its row at once and ends its iteration. Event-driven: the model's forward pauses
        # on `gate` at the first decode step that has the row in the batch, the test cancels while it is paused
        long = SamplingParams(max_new_tokens=28, temperature=0, stop_at_eos=False)
        in_batch, gate = threading.Event(), threading.Event()

        def pause(*_):
            if eng.active == 1 and not in_batch.is_set():
                in_batch.set()
                assert gate.wait(timeout=30)
        hook = m.register_forward_pre_hook(pause)
        s = eng.submit(PROMPTS[0], long)
        next(s)
        assert in_batch.wait(timeout=30)  # the row joined and a decode step with it is under way
        assert eng.active == 1
        s.cancel()
        gate.set()
        assert len(list(s)) < 5
        hook.remove()
        # engine calls run between decode steps: the step that was under way has dropped the cancelled row
        assert eng.run(lambda: eng.active).result(timeout=30) == 0
        # other model work runs on the engine thread; its errors reach the caller
        assert eng.run(lambda: 41 + 1).result(timeout=10) == 42
        with pytest.raises(ZeroDivisionError):
            eng.run(lambda: 1 / 0).result(timeout=10)
        with pytest.raises(ContextLengthError):
            eng.submit([1] * 60, SamplingParams(max_new_tokens=10))
        assert [x.token for x in eng.submit(PROMPTS[1], sp)] == [x.token for x in alone(m, PROMPTS[1], sp)]
    finally:
        eng.close()


def test_background_batcher_left_open_exits_cleanly():
    """A script that leaves its BackgroundBatcher running exits with status 0: the batcher is stopped at exit, before
    the interpreter's teardown (a daemon thread that had run parallel kernels aborted the process about half the
    time: 'terminate called without an active exception', status 134)."""
    import subprocess
    import sys
    from pathlib import Path
    gguf = Path(__file__).resolve().parents[2] / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        pytest.skip(f"needs {gguf}")
    script = (
        "import lmstack\n"
        "from lmstack.generate import SamplingParams\n"
        "from lmstack.generate.background import BackgroundBatcher\n"
        f"lm = lmstack.load({str(gguf)!r})\n"
        "bb = BackgroundBatcher(lm.model, 4)\n"
        "steps = list(bb.submit(lm.prompt_ids('Hello'), SamplingParams(max_new_tokens=8, temperature=0)))\n"
        "print(len(steps))\n")
    for _ in range(4):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert (out.returncode, out.stdout.split()[-1:]) == (0, ["8"]), out.stderr[-500:]
