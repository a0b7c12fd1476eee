"""Tool calling on /v1/chat/completions (serve/tools.py): the official SDK round trip on the real SmolLM2 (call ->
tool result -> answer), forced calls whose arguments fit the schema, streamed tool calls, the generic fallback
prompt and native tool templates, reply parsing, and the 400s for bad tools and bad tool messages."""
from __future__ import annotations

import json

import pytest

import lmstack
from conftest import REPO, start_server
from lmstack.serve.protocol import APIError
from lmstack.serve.tools import ToolPlan, held_back, parse_reply, parse_tools, render_messages

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
GGUF = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"type": "string", "enum": ["C", "F"]}},
           "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client():
    if not GGUF.is_file():
        pytest.skip("the shared SmolLM2 GGUF is not here")
    from lmstack.serve import create_app
    srv, th, url = start_server(create_app(lmstack.load(GGUF), "smol", max_batch=4))
    yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60), url
    srv.should_exit = True
    th.join(timeout=10)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_fit_the_schema_and_the_round_trip_answers(client, choice):
    c, _ = client
    r = c.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=60,
                                  temperature=0.7, seed=3)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    call = ch.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    if choice != "required":
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), schema)
    follow = ASK + [ch.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    r2 = c.chat.completions.create(model="smol", messages=follow, tools=TOOLS, max_tokens=30, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length") and r2.choices[0].message.content


def test_streamed_tool_call_equals_the_plain_one(client):
    c, _ = client
    kw = dict(model="smol", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0)
    plain = c.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    got, finish = {}, None
    for chunk in c.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        for tc in d.tool_calls or []:
            got.setdefault(tc.index, {"name": "", "arguments": ""})
            got[tc.index]["name"] += tc.function.name or ""
            got[tc.index]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert got == {0: {"name": plain.function.name, "arguments": plain.function.arguments}}


def test_tool_choice_none_and_auto_reply_with_text(client):
    c, _ = client
    r = c.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=12,
                                  temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


@pytest.mark.parametrize("extra,needle", [
    ({"tools": {"type": "function"}}, "'tools' must be a list"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "with a name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "with a name"),
    ({"tools": TOOLS + [TOOLS[0]]}, "declared twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
                                                                             {"x": {"type": 7}}}}}]},
     "invalid json_schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tool_choice": "required"}, "tool_choice needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "21"}]}, "tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}]}, "each call needs"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{nope"}}]}], "tools": TOOLS},
     "not valid JSON"),
])
def test_bad_tools_and_tool_messages_are_400s(client, extra, needle):
    _, url = client
    body = {"model": "smol", "messages": ASK, "max_tokens": 4, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_fallback_prompt_and_native_templates():
    plan = parse_tools({"tools": TOOLS})
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    msgs, extra = render_messages("{{ messages }}", history, plan)  # a template that knows nothing of tools
    assert extra == {} and msgs[0]["role"] == "system" and json.dumps(TOOLS[1]) in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n3\n</tool_response>"}
    native, extra = render_messages("{% for t in tools %}{{ t }}{% endfor %}", history, plan)
    assert extra == {"tools": TOOLS} and native[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert native[2]["role"] == "tool"


def test_reply_parsing_and_stream_hold_back():
    plan = ToolPlan({"add": {}, "get_weather": {}}, "auto", [])
    text = 'Sure.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' \
           '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>'
    content, calls = parse_reply(text, plan)
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Oslo"}
    assert parse_reply('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', plan)[1] == []  # undeclared
    assert parse_reply("<tool_call>{not json}</tool_call>", plan) == ("<tool_call>{not json}</tool_call>", [])
    assert parse_reply('<tool_call>{"name": "add", "arguments": {"a": 1}}', plan)[1]  # EOS before the close tag
    assert [held_back(t) for t in ("hello", "hello <tool", "x<tool_call>{", "a<")] == [0, 5, 12, 1]
    with pytest.raises(APIError):
        parse_tools({"tools": "x"})
