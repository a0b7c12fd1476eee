"""The decode loop in a process of its own (generate/engine_process.py): the same tokens as decoding alone, cancel,
structured output built in the child, the child's death ending every stream with an error, and `lmstack serve`'s
routes on it (the default engine for CPU models)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from conftest import lively_model, make_chat_checkpoint, start_server
from lmstack.errors import LMStackError
from lmstack.generate import SamplingParams, stream_steps
from lmstack.generate.engine_process import ProcessBatcher

PROMPTS = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [33], [7, 7, 8, 40, 41, 2, 9], [3] * 20, [4, 5]]


def _until(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture(scope="module")
def engine():
    m = lively_model("llama")
    eng = ProcessBatcher(m, max_batch=3, threads=1)
    yield m, eng
    eng.close()


def test_concurrent_streams_match_decoding_alone(engine):
    m, eng = engine
    sp = SamplingParams(max_new_tokens=10, temperature=0, stop_at_eos=False)
    want = {i: [(s.token, s.logprob, s.top) for s in stream_steps(m, p, sp, top_logprobs=2)]
            for i, p in enumerate(PROMPTS)}
    got = {}

    def client(i):
        got[i] = [(s.token, s.logprob, s.top) for s in eng.submit(PROMPTS[i], sp, top_logprobs=2)]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in want:
        assert [t for t, _, _ in got[i]] == [t for t, _, _ in want[i]], i
        for (_, lp, top), (_, wlp, wtop) in zip(got[i], want[i]):
            assert lp == pytest.approx(wlp, abs=1e-4)
            assert [t for t, _ in top] == [t for t, _ in wtop]
    assert _until(lambda: eng.active == 0 and eng.queued == 0)


def test_cancel_ends_the_stream_and_frees_the_row(engine):
    m, eng = engine
    sp = SamplingParams(max_new_tokens=25, temperature=0, stop_at_eos=False)
    stream = eng.submit([1, 2, 3], sp)
    first = [next(stream), next(stream)]
    stream.cancel()
    assert list(stream) == [] and len(first) == 2
    assert _until(lambda: eng.active == 0)
    again = [s.token for s in eng.submit([1, 2, 3], sp)]  # the engine goes on serving
    assert again == [s.token for s in stream_steps(m, [1, 2, 3], sp)]


def test_bad_requests_raise_at_submit(engine):
    _, eng = engine
    with pytest.raises(LMStackError, match="prompt is empty"):
        eng.submit([], SamplingParams(max_new_tokens=2))
    with pytest.raises(LMStackError, match="top_logprobs"):
        eng.submit([1], SamplingParams(max_new_tokens=2), top_logprobs=-1)


def test_run_executes_in_this_process_on_the_shared_weights(engine):
    import torch
    m, eng = engine
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        want = m(ids)[0]
        got = eng.run(lambda: m(ids)[0]).result(timeout=60)
    assert torch.equal(got, want)
    assert eng.pid != os.getpid()


def test_the_child_dying_ends_every_stream_with_an_error():
    eng = ProcessBatcher(lively_model("gpt2"), max_batch=2, threads=1)
    try:
        sp = SamplingParams(max_new_tokens=25, temperature=0, stop_at_eos=False)
        stream = eng.submit([1, 2, 3], sp)
        next(stream)
        os.kill(eng.pid, signal.SIGKILL)
        with pytest.raises(LMStackError, match="engine process exited"):
            list(stream)
        with pytest.raises(LMStackError, match="engine process exited"):
            eng.submit([4, 5], sp)
    finally:
        eng.close()


def test_a_non_cpu_model_is_refused_with_the_fix():
    with pytest.raises(LMStackError, match="--engine thread"):
        ProcessBatcher(lively_model("gpt2").to("meta"))


# ------------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory, tiny_run):
    import lmstack
    out, _ = tiny_run
    return lmstack.load(make_chat_checkpoint(out, tmp_path_factory.mktemp("proc") / "chat"))


@pytest.fixture(scope="module")
def proc_server(chat_lm):
    pytest.importorskip("uvicorn")
    from lmstack.serve import create_app
    srv, th, url = start_server(create_app(chat_lm, "tiny", max_batch=4, engine="process"))
    yield chat_lm, url
    srv.should_exit = True
    th.join(timeout=30)


def test_server_routes_on_the_process_engine(proc_server):
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    lm, url = proc_server
    metrics = httpx.get(url + "/metrics").text  # before any request: the child's counters came with "ready"
    assert "lmstack_prefix_cache_enabled 1" in metrics and "lmstack_prefix_cache_hit_tokens_total 0" in metrics
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0)
    assert r.choices[0].text == lm.generate("ROMEO:", max_new_tokens=8, temperature=0)
    msgs = [{"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    chunks = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    emb = client.embeddings.create(model="tiny", input=["to be", "or not"])  # run(): this process
    assert len(emb.data) == 2 and emb.data[0].embedding != emb.data[1].embedding
    r = client.completions.create(model="tiny", prompt="Pick: ", max_tokens=6, temperature=0,
                                  extra_body={"guided_choice": ["yes", "no"]})  # the matcher is built in the child
    assert r.choices[0].text in ("yes", "no")
    hits = "lmstack_prefix_cache_hit_tokens_total 0" not in httpx.get(url + "/metrics").text
    assert hits  # the repeated chat prompt reused its prefix in the child


def test_json_object_output_on_the_process_engine(proc_server):
    httpx = pytest.importorskip("httpx")
    _, url = proc_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "JSON"}], "max_tokens": 24, "temperature": 0,
            "response_format": {"type": "json_object"}}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    text = r["choices"][0]["message"]["content"]
    if r["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: a prefix of an object
        assert text.lstrip().startswith("{")


def test_unknown_engine_is_a_clear_error(chat_lm):
    from lmstack.serve.state import ServerState
    with pytest.raises(LMStackError, match="unknown engine 'fork'; choose one of thread, process"):
        ServerState(chat_lm, "tiny", engine="fork")
