"""OpenAI tool calling on /v1/chat/completions: `tools` and `tool_choice` in, `tool_calls` out.

Prompt: a chat template that knows tools (its source uses `tools`, as Qwen2.5, Llama 3.1, Hermes and SmolLM3 do)
renders the tool list, the assistant's earlier tool calls and the tool results itself. Any other template gets the
documented generic fallback: the tool list and calling format go into the system message (below), an assistant
turn's calls are written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and a tool result as a user
turn `<tool_response>...</tool_response>` — the Hermes / Qwen convention, which small instruct models follow best.

Reply: every `<tool_call>{json}</tool_call>` block naming a declared function becomes an entry of the message's
`tool_calls` (arguments as a JSON string, an id `call_...`), the rest stays `content`, and finish_reason is
"tool_calls". tool_choice "required" or a named function is enforced with the grammar engine: the reply is exactly
one call whose arguments fit the function's JSON Schema. "none" leaves the tools out of the reply's parsing.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..errors import LMStackError
from ..generate.constrain import make_constraint
from .protocol import APIError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FALLBACK_PROMPT = """# Tools

You may call one or more functions to help with the user's request. The functions are described in JSON Schema \
inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, reply with a JSON object naming it and giving its arguments, inside <tool_call></tool_call> tags:
<tool_call>
{{"name": "<function-name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>"""
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL = re.compile(re.escape(OPEN) + r"\s*(\{.*?\})\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)


@dataclass
class ToolPlan:
    """The tools of one request: the declared functions (name -> parameters schema), the tool_choice ('auto',
    'none', 'required' or a function name) and the OpenAI tool dicts as sent (for the chat template)."""
    functions: dict[str, dict]
    choice: str
    raw: list[dict]

    @property
    def parse_calls(self) -> bool:
        return self.choice != "none"

    def grammar(self) -> str | None:
        """The Lark grammar that forces one call (tool_choice 'required' or a named function), else None."""
        if self.choice in ("auto", "none"):
            return None
        names = list(self.functions) if self.choice == "required" else [self.choice]
        alts = [{"type": "object", "properties": {"name": {"const": n}, "arguments": _closed(self.functions[n])},
                 "required": ["name", "arguments"], "additionalProperties": False} for n in names]
        schema = alts[0] if len(alts) == 1 else {"anyOf": alts}
        return f'start: "{OPEN}\\n" call "\\n{CLOSE}"\ncall: %json {json.dumps(schema)}'


def _closed(schema: dict) -> dict:
    """An object schema without a word on extra keys gets additionalProperties: false (as OpenAI's strict mode):
    a forced call then carries the declared arguments only, which still fits the function's schema."""
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def parse_tools(body: dict) -> ToolPlan | None:
    """`tools` / `tool_choice` of a chat request (None when no tools are given); every mistake is a 400."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list of {'type': 'function', 'function': {...}}", param="tools")
    functions: dict[str, dict] = {}
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        name = f.get("name") if isinstance(f, dict) else None
        if not isinstance(name, str) or not _NAME.match(name):
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                f"'parameters': {{...}}}}}} with a name of letters, digits, _ or - (at most 64)",
                           param="tools")
        if name in functions:
            raise APIError(400, f"tools[{i}]: the function name {name!r} is declared twice", param="tools")
        params = f.get("parameters", {"type": "object", "properties": {}})
        try:
            if not isinstance(params, dict):
                raise LMStackError("parameters must be a JSON Schema object")
            make_constraint(json_schema=params)
        except LMStackError as e:
            raise APIError(400, f"tools[{i}] ({name}): {e}", param="tools") from None
        functions[name] = params
    return ToolPlan(functions, _tool_choice(choice, functions), tools)


def _tool_choice(choice, functions: dict) -> str:
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        choice.get("type") == "function" and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                            "{'name': ...}}", param="tool_choice")
    if name not in functions:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools "
                            f"({', '.join(functions)})", param="tool_choice")
    return name


def check_tool_messages(messages: list[dict]) -> None:
    """Each tool result answers an earlier assistant tool call by its id; calls are well formed (400 if not)."""
    ids: set[str] = set()
    for i, m in enumerate(messages):
        for c in m.get("tool_calls") or []:
            f = c.get("function") if isinstance(c, dict) else None
            if not (isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(f, dict)
                    and isinstance(f.get("name"), str) and isinstance(f.get("arguments", "{}"), str)):
                raise APIError(400, f"messages[{i}].tool_calls: each call needs an 'id' and a 'function' with a "
                                    f"'name' and 'arguments' (a JSON string)", param="messages")
            ids.add(c["id"])
        if m["role"] == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str) or tid not in ids:
                raise APIError(400, f"messages[{i}] (role 'tool') must have the 'tool_call_id' of an earlier "
                                    f"assistant tool call, got {json.dumps(tid)}", param="messages")


def _arguments(call: dict):
    a = call["function"].get("arguments", "{}")
    try:
        return json.loads(a)
    except json.JSONDecodeError:
        raise APIError(400, f"tool call {call['id']}: 'arguments' is not valid JSON", param="messages") from None


def render_messages(template: str | None, messages: list[dict], plan: ToolPlan | None) -> tuple[list[dict], dict]:
    """(messages, extra template variables): native tool support passes `tools` and the calls (arguments as
    objects, as Hugging Face templates expect); otherwise the generic fallback rewrites them as plain turns."""
    if plan is None and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return messages, {}
    if template and "tools" in template:
        out = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _arguments(c)}}
                                    for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
        return out, ({"tools": plan.raw} if plan is not None else {})
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': _arguments(c)})}"
                              f"\n{CLOSE}" for c in m["tool_calls"])
            out.append({"role": m["role"], "content": (m["content"] + "\n" if m["content"] else "") + calls})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if plan is not None:
        prompt = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t) for t in plan.raw))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def parse_reply(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply: the calls to declared functions, and the text around them."""
    calls, kept, last = [], [], 0
    for m in _CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        name, args = (obj.get("name"), obj.get("arguments", {})) if isinstance(obj, dict) else (None, None)
        if name not in plan.functions:
            continue
        kept.append(text[last:m.start()])
        last = m.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}})
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return (content or None) if calls else content, calls


def held_back(text: str) -> int:
    """How many trailing characters of streamed `text` to hold back: from a `<tool_call>` on, or a suffix that may
    be the start of one."""
    i = text.find(OPEN)
    if i >= 0:
        return len(text) - i
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
