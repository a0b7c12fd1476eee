"""Structured output (generate/constrain.py): every constraint kind holds on sampled generations of the real
SmolLM2, constrained and unconstrained rows share a continuous batch and each equals its solo run, the server's
response_format / guided_* fields (official SDK `parse` with a Pydantic model, streaming), and the 400s."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import lmstack
from conftest import REPO, run_cli, start_server
from lmstack.errors import LMStackError
from lmstack.generate import SamplingParams, stream_steps
from lmstack.generate.batching import PREFILL_BATCH_TOKENS, ContinuousBatcher, Request
from lmstack.generate.constrain import make_constraint, new_matcher

jsonschema = pytest.importorskip("jsonschema")
GGUF = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_gguf = pytest.mark.skipif(not GGUF.is_file(), reason="the shared SmolLM2 GGUF is not here")

SCHEMA = {"type": "object", "properties": {
    "colour": {"type": "string", "enum": ["red", "green", "blue"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"}}, "required": ["colour", "count", "ok"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]{2,5}-[0-9]{2}"
CHOICES = ["alpha", "beta", "gamma delta"]
GRAMMAR = 'start: "Answer: " NUM (" + " NUM)? "."\nNUM: /[1-9][0-9]{0,2}/'


@pytest.fixture(scope="module")
def smol():
    if not GGUF.is_file():
        pytest.skip("the shared SmolLM2 GGUF is not here")
    return lmstack.load(GGUF)


def _holds(kind: str, text: str) -> bool:
    if kind == "json_object":
        return isinstance(json.loads(text), dict)
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "choices":
        return text in CHOICES
    return re.fullmatch(r"Answer: [1-9][0-9]{0,2}( \+ [1-9][0-9]{0,2})?\.", text) is not None


KINDS = [("json_schema", SCHEMA, 40, 0.95), ("json_object", True, 64, 0.75),  # any object: some run long at T=1
         ("regex", REGEX, 16, 1.0), ("choices", CHOICES, 8, 1.0), ("grammar", GRAMMAR, 16, 0.95)]


@needs_gguf
@pytest.mark.parametrize("n", [48, pytest.param(200, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind,spec,max_new,min_ended", KINDS)
def test_every_kind_holds_on_many_samples_at_temperature_1(smol, kind, spec, max_new, min_ended, n):
    """n generations (48 in the fast suite, 200 under -m slow) sampled at temperature 1.0 in one continuous batch:
    every one that ended (the grammar complete, or EOS where it may end) is valid; one cut by max_new_tokens is a
    finish_reason "length" (as with OpenAI), and there must be few of those."""
    prompt = smol.prompt_ids(smol.chat_prompt([{"role": "user", "content": "Give a short answer as asked."}]))
    eos = set(smol.tokenizer.end_of_turn_ids) | {smol.tokenizer.eos_id}
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new, **{kind: spec})
    batcher, reqs = ContinuousBatcher(smol.model, min(n, 50), prefill_tokens=PREFILL_BATCH_TOKENS), []
    for i in range(n):
        reqs.append(Request(prompt, params, eos, matcher=smol.matcher(params, eos),
                            generator=torch.Generator().manual_seed(i)))
        reqs[-1].on_step = lambda s, r=reqs[-1]: setattr(r, "last", s.token)
        batcher.add(reqs[-1])
    while batcher.has_work():
        batcher.step()
    ended = [r for r in reqs if r.matcher.done or r.last in eos]
    texts = [smol.tokenizer.decode([t for t in r.history[len(prompt):] if t not in eos]) for r in ended]
    bad = [t for t in texts if not _holds(kind, t)]
    assert not bad, (len(bad), bad[:3])
    assert len(ended) >= int(min_ended * n), f"{n - len(ended)} of {n} generations ran into max_new_tokens={max_new}"
    assert len(set(texts)) > (1 if kind == "choices" else 5)  # really sampled, not one forced string


def test_bad_specs_are_errors_naming_the_problem():
    with pytest.raises(LMStackError, match="one structured-output constraint at a time"):
        SamplingParams(regex="a+", choices=["a"])
    with pytest.raises(LMStackError, match="invalid regex"):
        SamplingParams(regex="(unclosed")
    with pytest.raises(LMStackError, match="json_schema is not valid JSON"):
        SamplingParams(json_schema="{nope")
    with pytest.raises(LMStackError, match="invalid json_schema"):
        SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "nonsense"}}})
    with pytest.raises(LMStackError, match="choices must be a non-empty list"):
        SamplingParams(choices="abc")
    with pytest.raises(LMStackError, match="invalid grammar"):
        SamplingParams(grammar="start: undefined_rule")
    with pytest.raises(LMStackError, match="min_new_tokens cannot be combined"):
        SamplingParams(regex="a+", min_new_tokens=3)
    assert make_constraint() is None
    gbnf = make_constraint(grammar='root ::= "yes" | "no"')  # GBNF (llama.cpp's format) is converted
    assert gbnf.kind == "grammar"


@needs_gguf
def test_the_engine_needs_a_matcher_for_a_constraint(smol):
    with pytest.raises(LMStackError, match="needs the tokenizer"):
        next(stream_steps(smol.model, [1, 2, 3], SamplingParams(regex="[0-9]+")))
    with pytest.raises(LMStackError, match="beam search does not take structured output"):
        smol.beam_search("x", num_beams=2, regex="[0-9]+", max_new_tokens=4)


def test_constrained_and_plain_rows_in_one_batch_equal_their_solo_runs(tiny_run):
    """A tiny char model in float32: a schema row, an unconstrained row and a sampled regex row decode together."""
    out, _ = tiny_run
    lm = lmstack.load(out / "last")
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"], "additionalProperties": False}
    specs = [(lm.prompt_ids("the cat "), SamplingParams(max_new_tokens=24, temperature=0.0, json_schema=schema)),
             (lm.prompt_ids("a dog and "), SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False)),
             (lm.prompt_ids("x"), SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, regex="[a-z]{3,6}"))]
    eos = {lm.tokenizer.eos_id}
    solo = [[s.token for s in stream_steps(lm.model, ids, p, eos_id=eos, matcher=lm.matcher(p, eos))]
            for ids, p in specs]
    got: list[list[int]] = [[] for _ in specs]
    batcher = ContinuousBatcher(lm.model, 3)
    for i, (ids, p) in enumerate(specs):
        req = Request(ids, p, eos, matcher=lm.matcher(p, eos))
        req.generator = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        req.on_step = lambda s, i=i: got[i].append(s.token)
        batcher.add(req)
    while batcher.has_work():
        batcher.step()
    assert got == solo
    assert json.loads(lm.tokenizer.decode([t for t in got[0] if t not in eos]))["a"] in range(10)
    assert re.fullmatch("[a-z]{3,6}", lm.tokenizer.decode([t for t in got[2] if t not in eos]))


@needs_gguf
def test_cli_structured_flags(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    r = run_cli("generate", "--model", str(GGUF), "--prompt", "JSON: ", "--json-schema", str(schema),
                "--temperature", "0", "--max-new-tokens", "40")
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout[len("JSON: "):]), SCHEMA)
    r = run_cli("chat", "--model", str(GGUF), "-p", "Pick one.", "--choices", ",".join(CHOICES))
    assert r.stdout.strip() in CHOICES
    r = run_cli("generate", "--model", str(GGUF), "--prompt", "x", "--json-schema", str(tmp_path / "missing.json"))
    assert r.returncode != 0 and "cannot read the --json-schema file" in r.stderr and r.stdout == ""


# ------------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def smol_server(smol):
    from lmstack.serve import create_app
    srv, th, url = start_server(create_app(smol, "smol", max_batch=4))
    yield url
    srv.should_exit = True
    th.join(timeout=10)


@needs_gguf
def test_sdk_parse_with_a_pydantic_model_and_streaming(smol_server):
    openai = pytest.importorskip("openai")
    from pydantic import BaseModel, Field

    class Item(BaseModel):
        colour: str = Field(pattern="^(red|green|blue)$")
        count: int = Field(ge=0, le=99)

    client = openai.OpenAI(base_url=smol_server + "/v1", api_key="x", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Describe one item as JSON."}]
    r = client.chat.completions.parse(model="smol", messages=msgs, response_format=Item, max_tokens=40, seed=1,
                                      temperature=0.8)
    item = r.choices[0].message.parsed
    assert isinstance(item, Item) and item.colour in ("red", "green", "blue") and 0 <= item.count <= 99
    # streamed under a closed schema (no extra keys, bounded values), so the object must close within the budget: a
    # json_object run may go on past any budget (greedy text that loops, kernel-dependent)
    schema = {**Item.model_json_schema(), "additionalProperties": False}
    chunks = client.chat.completions.create(model="smol", messages=msgs, stream=True, max_tokens=60, temperature=0,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "Item", "schema": schema}})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert Item.model_validate_json(text).colour in ("red", "green", "blue")
    r = client.completions.create(model="smol", prompt="Pick: ", max_tokens=8, extra_body={"guided_choice": CHOICES})
    assert r.choices[0].text in CHOICES
    r = client.chat.completions.create(model="smol", messages=msgs, max_tokens=16,
                                       extra_body={"guided_regex": REGEX, "frequency_penalty": 0.5, "stop": ["-"]})
    assert re.fullmatch(r"[A-Z][a-z]{2,5}", r.choices[0].message.content)  # the stop string cut it at "-"


@needs_gguf
@pytest.mark.parametrize("extra,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs 'json_schema'"),
    ({"response_format": {"type": "xml"}}, "must be 'text', 'json_object' or 'json_schema'"),
    ({"guided_regex": "(unclosed"}, "invalid regex"),
    ({"guided_choice": "abc"}, "wrong type"),
    ({"guided_grammar": "start: nope"}, "invalid grammar"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": 3}}}}, "invalid json_schema"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "one structured-output constraint"),
])
def test_bad_constraints_are_400s(smol_server, extra, needle):
    httpx = pytest.importorskip("httpx")
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = httpx.post(smol_server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    ok = httpx.post(smol_server + "/v1/chat/completions", json={**body, **{k: None for k in extra}}, timeout=60)
    assert ok.status_code == 200  # the server is fine afterwards


def test_matcher_is_none_without_a_constraint(tiny_run):
    lm = lmstack.load(Path(tiny_run[0]) / "last")
    assert new_matcher(SamplingParams(), lm.tokenizer, lm.config.vocab_size) is None
    m = new_matcher(SamplingParams(choices=["ab", "b"]), lm.tokenizer, lm.config.vocab_size)
    allowed = m.allowed()
    assert allowed.shape == (lm.config.vocab_size,)
    a, b, c = (lm.tokenizer.encode(ch)[0] for ch in "abc")
    assert allowed[a] and allowed[b] and not allowed[c]
    # only tokens that start a choice (a char vocabulary also has byte-fallback tokens for "a" and "b")
    assert {lm.tokenizer.token_bytes(int(i)) for i in allowed.nonzero()} == {b"a", b"b"}
