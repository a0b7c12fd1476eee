"""`lmstack serve`: a real uvicorn server on a loopback port, driven by the official openai SDK and raw httpx."""
import base64
import json
import math
import struct
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import lmstack  # noqa: E402
from lmstack.generate import score  # noqa: E402
from lmstack.serve import create_app  # noqa: E402
from lmstack.serve.app import default_model_name  # noqa: E402
from conftest import make_chat_checkpoint, start_server  # noqa: E402

KEY = "sk-test-key"
NAME = "tiny"


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory, tiny_run):
    out, _ = tiny_run
    return lmstack.load(make_chat_checkpoint(out, tmp_path_factory.mktemp("serve") / "chat"))


@pytest.fixture(scope="module")
def server(chat_lm):
    srv, th, url = start_server(create_app(chat_lm, NAME, api_key=KEY, max_batch=4, max_body_bytes=64 * 1024))
    yield chat_lm, url
    srv.should_exit = True
    th.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    _, url = server
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _h():
    return {"Authorization": f"Bearer {KEY}"}


def test_models_health_metrics(server, client):
    _, url = server
    assert [m.id for m in client.models.list()] == [NAME]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    text = httpx.get(url + "/metrics").text
    assert "lmstack_requests_total" in text and "lmstack_request_duration_seconds_bucket" in text


def _greedy_finish(lm, prompt: str, max_tokens: int, stop_ids=None, truncate=None) -> tuple[int, str]:
    """(tokens generated, OpenAI finish_reason) of a greedy generation, from the token stream itself: 'stop' when
    it ended on a stop token before the budget ran out, else 'length'."""
    stops = set(stop_ids) if stop_ids is not None else {lm.tokenizer.eos_id}
    toks = [s.token for s in lm.stream_steps(prompt, max_new_tokens=max_tokens, temperature=0, stop_ids=stops,
                                                 truncate=truncate)]
    ended = bool(toks) and toks[-1] in stops
    return len(toks), "stop" if ended or len(toks) < max_tokens else "length"


def test_completion_matches_generate(server, client):
    lm, _ = server
    kw = dict(max_new_tokens=8, temperature=0)
    r = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=8, temperature=0)
    assert r.choices[0].text == lm.generate("ROMEO:", **kw)
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode("ROMEO:"))
    assert 0 < r.usage.completion_tokens <= 8
    n_tokens, reason = _greedy_finish(lm, "ROMEO:", 8)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (n_tokens, reason)
    eos = lm.tokenizer.eos_id or 0  # no stop token possible: the budget always runs out
    r = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=5, temperature=0,
                                  logit_bias={str(eos): -100})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=5, temperature=0,
                                  logit_bias={str(eos): 100})  # the first token is the stop token
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == "" and r.usage.completion_tokens == 1
    # list of prompts, n, stop, extensions, seeded sampling is reproducible
    r = client.completions.create(model=NAME, prompt=["a", "b"], max_tokens=4, temperature=0, n=2, stop=["\n"],
                                  extra_body={"top_k": 5, "repetition_penalty": 1.1})
    assert len(r.choices) == 4 and [c.index for c in r.choices] == [0, 1, 2, 3]
    a = client.completions.create(model=NAME, prompt="x", max_tokens=6, temperature=1.0, seed=7).choices[0].text
    b = client.completions.create(model=NAME, prompt="x", max_tokens=6, temperature=1.0, seed=7).choices[0].text
    assert a == b


def test_streaming_equals_non_streamed(server, client):
    lm, url = server
    full = client.completions.create(model=NAME, prompt="KING", max_tokens=10, temperature=0).choices[0].text
    parts, usage = [], None
    for ch in client.completions.create(model=NAME, prompt="KING", max_tokens=10, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.choices:
            parts.append(ch.choices[0].text)
        if ch.usage:
            usage = ch.usage
    assert "".join(parts) == full
    assert usage.prompt_tokens == len(lm.tokenizer.encode("KING")) and usage.completion_tokens > 0
    with httpx.stream("POST", url + "/v1/completions", headers=_h(), timeout=30,
                      json={"model": NAME, "prompt": "KING", "max_tokens": 5, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    msgs = [{"role": "user", "content": "hi"}]
    chat_full = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0)
    deltas = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, stream=True)
              if c.choices]
    assert "".join(deltas) == chat_full.choices[0].message.content


def test_chat_matches_lm_chat(server, client):
    lm, _ = server
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=2)
    assert r.choices[0].message.content == lm.chat(msgs, max_new_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode(lm.chat_prompt(msgs)))
    content = r.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    n_tokens, reason = _greedy_finish(lm, lm.chat_prompt(msgs), 8, lm.tokenizer.end_of_turn_ids, "left")
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (n_tokens, reason)


def test_embeddings(server, client):
    r = client.embeddings.create(model=NAME, input=["one", "two words"])
    assert len(r.data) == 2
    for d in r.data:
        assert len(d.embedding) == server[0].config.n_embd
        assert math.isclose(math.sqrt(sum(x * x for x in d.embedding)), 1.0, rel_tol=1e-4)
    r = client.embeddings.create(model=NAME, input="one", encoding_format="float")
    assert len(r.data[0].embedding) == server[0].config.n_embd
    full = r.data[0].embedding
    # dimensions: the full vector's prefix, renormalised to unit length
    for dims in (1, 5, server[0].config.n_embd // 2):
        cut = client.embeddings.create(model=NAME, input="one", encoding_format="float", dimensions=dims)
        v = cut.data[0].embedding
        norm = math.sqrt(sum(x * x for x in full[:dims]))
        assert len(v) == dims and math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-6)
        assert all(math.isclose(a, b / norm, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(v, full[:dims]))
    # base64: little-endian float32 bytes of the same numbers
    for dims in (None, 5):
        kw = {} if dims is None else {"dimensions": dims}
        want = client.embeddings.create(model=NAME, input=["one", "two words"], encoding_format="float", **kw)
        got = client.embeddings.create(model=NAME, input=["one", "two words"], encoding_format="base64", **kw)
        for w, g in zip(want.data, got.data):
            assert isinstance(g.embedding, str)
            raw = base64.b64decode(g.embedding)
            vals = struct.unpack(f"<{len(raw) // 4}f", raw)
            assert len(vals) == len(w.embedding) == (dims or server[0].config.n_embd)
            assert all(abs(a - b) <= 1e-6 for a, b in zip(vals, w.embedding))


def test_echo_logprobs_scoring(server, client):
    lm, _ = server
    ctx, cont = "ROMEO: ", "good night"
    ids = lm.tokenizer.encode(ctx + cont)
    r = client.completions.create(model=NAME, prompt=ctx + cont, max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == ctx + cont
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    n_ctx = len(lm.tokenizer.encode(ctx))
    want, _ = score(lm.model, ids[:n_ctx], ids[n_ctx:])
    assert math.isclose(sum(lp.token_logprobs[n_ctx:]), want, rel_tol=1e-5, abs_tol=1e-5)
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    assert r.choices[0].finish_reason == "length"  # max_tokens=0: the budget (none) ran out
    # token-id prompts (lm-evaluation-harness's tokenized requests), with one generated token after the echo
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp2 = r.choices[0].logprobs
    assert len(lp2.token_logprobs) == len(ids) + 1
    assert math.isclose(sum(lp2.token_logprobs[n_ctx:-1]), want, rel_tol=1e-5, abs_tol=1e-5)
    # n > 1 with echo: each choice has the prompt's logprobs followed by its own tokens' only
    eos = lm.tokenizer.eos_id or 0
    r = client.completions.create(model=NAME, prompt=ctx + cont, max_tokens=3, echo=True, logprobs=1, n=2,
                                  temperature=1.0, seed=3, logit_bias={str(eos): -100})
    for c in r.choices:
        assert len(c.logprobs.token_logprobs) == len(ids) + 3 and c.finish_reason == "length"
        assert c.logprobs.token_logprobs[:len(ids)] == lp.token_logprobs
        assert c.text.startswith(ctx + cont)


def test_auth(server):
    _, url = server
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=NAME, prompt="x", max_tokens=1)
    assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # not a /v1 route


def _err(r, status):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


def test_error_cases_and_server_survives(server, client):
    lm, url = server
    post = lambda path, **kw: httpx.post(url + path, headers={**_h(), "Content-Type": "application/json"},
                                         timeout=30, **kw)
    _err(post("/v1/completions", content=b"{not json"), 400)
    _err(post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}'), 400)
    _err(post("/v1/completions", content=b"[1, 2]"), 400)
    _err(post("/v1/completions", json={"prompt": 5}), 400)
    _err(post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}), 400)
    _err(post("/v1/completions", json={"prompt": "x", "n": 0}), 400)
    _err(post("/v1/chat/completions", json={"messages": "hi"}), 400)
    _err(post("/v1/embeddings", json={"input": 3}), 400)
    _err(post("/v1/completions", content=b'{"prompt": "' + b"x" * 70000 + b'"}'), 413)
    _err(httpx.get(url + "/v1/nothing", headers=_h()), 404)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x" * 30, max_tokens=10)  # block_size is 32
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", max_tokens=100)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    r = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=4, temperature=0)
    assert r.choices[0].text == lm.generate("ROMEO:", max_new_tokens=4, temperature=0)


def _slow_lm(path, calls):
    """A fresh copy of the model whose every forward pass sleeps a little and is counted."""
    lm = lmstack.load(path)
    lm.model.register_forward_pre_hook(lambda m, a: calls.append(time.sleep(0.03)))
    return lm


def test_queue_limit_429_and_disconnect_stops_generation(chat_lm):
    calls = []
    app = create_app(_slow_lm(chat_lm.path, calls), NAME, max_batch=1, max_queue=0)
    srv, th, url = start_server(app)
    try:
        body = {"prompt": "a", "max_tokens": 25, "stream": True, "temperature": 1.0, "seed": 1,
                "logit_bias": {str(chat_lm.tokenizer.eos_id or 0): -100}}
        with httpx.stream("POST", url + "/v1/completions", timeout=30, json=body) as first:
            lines = first.iter_lines()  # keep a reference: a dropped iterator closes the connection
            next(lines)  # the first stream is admitted and in flight
            r = httpx.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 1}, timeout=30)
            _err(r, 429)
        # the client went away: its generation stops well before 25 tokens and its slot frees up
        for _ in range(100):
            r = httpx.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 1}, timeout=30)
            if r.status_code != 429:
                break
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        # nothing is left decoding or queued (engine calls run between decode steps), so no forward pass follows
        eng = app.state.server.engine
        assert eng.run(lambda: (eng.active, eng.queued)).result(timeout=30) == (0, 0)
        assert len(calls) < 20
        text = httpx.get(url + "/metrics").text
        assert 'status="429"' in text and "lmstack_completion_tokens_total" in text
    finally:
        srv.should_exit = True
        th.join(timeout=10)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_any = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(-3, 3, allow_nan=False),
                 st.text(max_size=5), st.lists(st.integers(-2, 70), max_size=4), st.dictionaries(
                     st.text(max_size=3), st.integers(-3, 3), max_size=2))
_fields = {"prompt": st.one_of(_any, st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3)),
           "max_tokens": st.one_of(_any, st.integers(0, 4)), "temperature": _any, "top_p": _any, "n": _any,
           "stop": _any, "seed": _any, "stream": _any, "logprobs": _any, "echo": _any, "presence_penalty": _any,
           "frequency_penalty": _any, "logit_bias": _any, "top_k": _any, "min_p": _any,
           "repetition_penalty": _any, "model": st.one_of(st.just(NAME), _any)}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.fixed_dictionaries({}, optional=_fields))
def test_fuzz_completions_never_5xx(server, body):
    _, url = server
    if isinstance(body.get("max_tokens"), int) and not isinstance(body.get("max_tokens"), bool):
        body["max_tokens"] = min(body["max_tokens"], 4)
    body.setdefault("max_tokens", 2)
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], 3)
    r = httpx.post(url + "/v1/completions", headers=_h(), content=json.dumps(body), timeout=30)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_concurrent_requests_share_one_decode_batch(chat_lm):
    """Continuous batching: 4 concurrent streams decode in one batch (far fewer forward passes than tokens), and
    each gets exactly the text it gets alone."""
    import threading
    calls = []
    lm = _slow_lm(chat_lm.path, calls)
    srv, th, url = start_server(create_app(lm, NAME, max_batch=4))
    prompts = ["ROMEO:", "JULIET: O", "First Citizen:\nWe", "KING"]
    try:
        texts = {}

        def one(i):
            body = {"prompt": prompts[i], "max_tokens": 12, "temperature": 0, "stream": True,
                    "logit_bias": {str(chat_lm.tokenizer.eos_id or 0): -100}}
            out = ""
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        out += json.loads(line[6:])["choices"][0]["text"]
            texts[i] = out
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        eos = chat_lm.tokenizer.eos_id or 0
        for i, p in enumerate(prompts):
            assert texts[i] == chat_lm.generate(p, max_new_tokens=12, temperature=0, logit_bias={eos: -100})
        # 4 prefills + 4 x 11 decode steps if run one by one (48 forward passes); batched: far fewer
        assert len(calls) <= 4 + 11 + 12, len(calls)
    finally:
        srv.should_exit = True
        th.join(timeout=10)


def test_client_gone_before_stream_starts_frees_its_slot(chat_lm):
    import socket
    from urllib.parse import urlparse
    srv, th, url = start_server(create_app(chat_lm, NAME, max_batch=1, max_queue=0))
    try:
        u = urlparse(url)
        body = json.dumps({"prompt": "a", "max_tokens": 20, "stream": True}).encode()
        for _ in range(3):  # connect, send a streaming request, hang up at once
            s = socket.create_connection((u.hostname, u.port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            s.close()
        for _ in range(200):
            r = httpx.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 1}, timeout=30)
            if r.status_code == 200:
                break
            time.sleep(0.05)
        assert r.status_code == 200, r.text
    finally:
        srv.should_exit = True
        th.join(timeout=10)


def test_num_beams_extension(server):
    lm, url = server
    r = httpx.post(url + "/v1/completions", headers=_h(), timeout=30,
                   json={"prompt": "ROMEO:", "max_tokens": 6, "num_beams": 3, "n": 2})
    assert r.status_code == 200, r.text
    want = lm.beam_search("ROMEO:", num_beams=3, max_new_tokens=6, num_return_sequences=2)
    assert [c["text"] for c in r.json()["choices"]] == [t for t, _ in want]
    r = httpx.post(url + "/v1/completions", headers=_h(), timeout=30,
                   json={"prompt": "ROMEO:", "max_tokens": 6, "num_beams": 2, "stream": True})
    _err(r, 400)


def test_default_model_name_is_a_name_not_a_path(tmp_path):
    assert default_model_name(tmp_path / "models" / "smollm2-135m") == "smollm2-135m"
    assert default_model_name(str(tmp_path / "qwen.Q8_0.gguf")) == "qwen.Q8_0.gguf"
    assert default_model_name(str(tmp_path / "runs" / "sft" / "last") + "/") == "sft/last"
    assert default_model_name(tmp_path / "runs" / "dpo" / "best") == "dpo/best"
    assert default_model_name("chat") == "chat"  # relative paths too
    assert str(tmp_path) not in default_model_name(tmp_path / "x")


def test_serve_default_name_hides_the_path(chat_lm, monkeypatch):
    """`serve(model)` without model_name: /v1/models and the playground header show the directory's name."""
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    from lmstack.serve import serve
    serve(chat_lm.path, port=0)
    (app,) = apps
    srv, th, url = start_server(app)
    try:
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["chat"]
        cfg = httpx.get(url + "/playground/config").json()
        assert cfg["model"] == "chat" and str(chat_lm.path) not in json.dumps(cfg)
        r = httpx.post(url + "/v1/completions", json={"model": "chat", "prompt": "a", "max_tokens": 1}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "chat"
    finally:
        srv.should_exit = True
        th.join(timeout=10)
