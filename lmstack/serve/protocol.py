"""The request side of the OpenAI protocol: APIError (an OpenAI-style error JSON with a 4xx status), the JSON body,
bearer auth, and the typed readers of request fields (sampling, stop, prompts, chat messages, embedding inputs).
Everything here is pure parsing: no model work, no I/O."""
from __future__ import annotations

import hmac
import json
import math
from typing import Any

from fastapi.responses import JSONResponse

from ..errors import LMStackError
from ..generate import parse_logit_bias

MISSING = object()  # a field absent from the body (JSON null counts as absent too)


class APIError(Exception):
    """A bad request: becomes {"error": {message, type, param, code}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type, param, code).body(), status_code=status)


def check_bearer(authorization: str, api_key: str | None) -> None:
    """401 unless `authorization` (the header's value) is 'Bearer <api_key>'; no check when api_key is None."""
    if api_key is None:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                       "authentication_error", code="invalid_api_key")


def parse_body(raw: bytes, model_name: str) -> dict:
    """The request body as a JSON object (NaN/Infinity refused); a `model` other than `model_name` is a 404."""
    def no_constants(c):
        raise ValueError(f"{c} is not valid JSON")
    try:
        body = json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"model {json.dumps(model)[:100]} does not exist; this server serves "
                            f"'{model_name}'", param="model", code="model_not_found")
    return body


# ----------------------------------------------------------------------------------------------- request fields
def _check_kind(v: Any, kind: str) -> Any:
    """`v` as `kind` ('int', 'float', 'bool', 'str', 'dict'), or MISSING when it is not one."""
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            return MISSING
        return int(v)
    if kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return MISSING
        return float(v)
    ok = {"bool": bool, "str": str, "dict": dict}.get(kind)
    return v if ok is None or isinstance(v, ok) else MISSING


_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "a boolean", "str": "a string", "dict": "an object"}


def read_field(body: dict, name: str, kind: str, default: Any = None, lo: float | None = None,
               hi: float | None = None, alias: str | None = None) -> Any:
    """Read and type-check one request field ('int', 'float', 'bool', 'str' or 'dict', within [lo, hi]); absent or
    JSON null means `default` (then `alias`, an older name of the field, is tried first)."""
    v = body.get(name, MISSING)
    if (v is MISSING or v is None) and alias is not None:
        v = body.get(alias, MISSING)
    if v is MISSING or v is None:
        return default

    def bad(what):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(v)[:100]}", param=name)

    out = _check_kind(v, kind)
    if out is MISSING:
        bad(_KIND_NAMES[kind])
    if lo is not None and out < lo:
        bad(f">= {lo}")
    if hi is not None and out > hi:
        bad(f"<= {hi}")
    return out


def stop_field(body: dict) -> list[str] | None:
    """`stop`: a string or up to 16 strings (empty ones dropped); None when there are none."""
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise APIError(400, "'stop' must be a string or a list of at most 16 strings", param="stop")
    return [s for s in stop if s] or None


def sampling_fields(body: dict, max_tokens: int, vocab_size: int) -> dict:
    """SamplingParams keyword arguments from the OpenAI fields (+ the top_k / min_p / repetition_penalty
    extensions); SamplingParams itself validates the ranges."""
    try:
        bias = parse_logit_bias(read_field(body, "logit_bias", "dict"), vocab_size, clamp=100.0)
    except LMStackError as e:
        raise APIError(400, str(e), param="logit_bias") from None
    seed = read_field(body, "seed", "int")
    return dict(max_new_tokens=max_tokens, temperature=read_field(body, "temperature", "float", 1.0),
                top_p=read_field(body, "top_p", "float", 1.0), top_k=read_field(body, "top_k", "int", 0),
                min_p=read_field(body, "min_p", "float", 0.0),
                repetition_penalty=read_field(body, "repetition_penalty", "float", 1.0),
                presence_penalty=read_field(body, "presence_penalty", "float", 0.0),
                frequency_penalty=read_field(body, "frequency_penalty", "float", 0.0),
                logit_bias=bias or None, stop=stop_field(body),
                seed=None if seed is None else seed % (2 ** 63), **constraint_fields(body))


def constraint_fields(body: dict) -> dict:
    """Structured output as SamplingParams keywords: OpenAI's `response_format` ({"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}) and vLLM's `guided_json`,
    `guided_regex`, `guided_choice`, `guided_grammar`. The spec itself is checked when SamplingParams compiles it
    (a bad one is a 400 naming the problem)."""
    out: dict = {}
    rf = body.get("response_format")
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            out["json_object"] = True
        elif kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}",
                               param="response_format")
            out["json_schema"] = schema
        elif kind != "text":
            raise APIError(400, "response_format 'type' must be 'text', 'json_object' or 'json_schema', got "
                                f"{json.dumps(kind)[:60]}", param="response_format")
    for name, key, ok in (("guided_json", "json_schema", lambda v: isinstance(v, (dict, str))),
                          ("guided_regex", "regex", lambda v: isinstance(v, str)),
                          ("guided_choice", "choices", lambda v: isinstance(v, list)),
                          ("guided_grammar", "grammar", lambda v: isinstance(v, str))):
        v = body.get(name)
        if v is None:
            continue
        if not ok(v):
            raise APIError(400, f"'{name}' has the wrong type: {json.dumps(v)[:80]}", param=name)
        if out:
            raise APIError(400, f"give one structured-output constraint at a time ('{name}' and "
                                f"{'response_format' if rf is not None else 'another guided_* field'})", param=name)
        out[key] = v
    return out


def include_usage(body: dict) -> bool:
    """stream_options.include_usage: send a last chunk with the usage."""
    so = body.get("stream_options")
    return isinstance(so, dict) and bool(so.get("include_usage"))


def _token_ids(x: Any, vocab_size: int) -> bool:
    return (isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool)
                                                    and 0 <= t < vocab_size for t in x))


def prompt_list(body: dict, lm) -> list[tuple[list[int], str]]:
    """The `prompt` field as [(token ids, text)]: a string, a list of strings, token ids, or lists of ids."""
    p = body.get("prompt", MISSING)
    if p is MISSING or p is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    vocab = lm.config.vocab_size
    if isinstance(p, str) or _token_ids(p, vocab):
        items = [p]
    elif isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(_token_ids(x, vocab) for x in p)):
        items = p
    else:
        raise APIError(400, f"'prompt' must be a string, a non-empty list of strings, or token ids in "
                            f"[0, {vocab})", param="prompt")
    out = []
    for x in items:
        if isinstance(x, str):
            try:
                out.append((lm.prompt_ids(x), x))
            except LMStackError as e:
                raise APIError(400, str(e), param="prompt") from None
        else:
            out.append((list(x), lm.tokenizer.decode(x)))
    return out


def chat_messages(body: dict) -> list[dict]:
    """`messages` as [{role, content}] with string content (text content parts joined, null as "")."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, "each message must be an object with a string 'role'", param="messages")
        c = m.get("content")
        if isinstance(c, list):  # content parts: keep the text ones
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
        if c is None:
            c = ""
        if not isinstance(c, str):
            raise APIError(400, "message 'content' must be a string or a list of text parts", param="messages")
        extra = {k: m[k] for k in ("tool_calls", "tool_call_id", "name") if m.get(k) is not None}
        if "tool_calls" in extra and not isinstance(extra["tool_calls"], list):
            raise APIError(400, "message 'tool_calls' must be a list", param="messages")
        clean.append({"role": m["role"], "content": c, **extra})
    return clean


def chat_prompt_ids(lm, messages: list[dict], template_vars: dict | None = None) -> list[int]:
    """The prompt token ids of `messages` through the model's chat template (template_vars: e.g. `tools`)."""
    try:
        prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **(template_vars or {}))
    except LMStackError as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # jinja template errors on odd input
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
    try:
        return lm.prompt_ids(prompt)
    except LMStackError as e:
        raise APIError(400, str(e), param="messages") from None


def embedding_inputs(body: dict, tokenizer, vocab_size: int) -> list[str]:
    """`input` of /v1/embeddings as texts: a string, strings, token ids, or lists of token ids (at most 2048)."""
    x = body.get("input")
    if isinstance(x, str):
        texts = [x]
    elif isinstance(x, list) and x and all(isinstance(s, str) for s in x):
        texts = x
    elif _token_ids(x, vocab_size):
        texts = [tokenizer.decode(x)]
    elif isinstance(x, list) and x and all(_token_ids(r, vocab_size) for r in x):
        texts = [tokenizer.decode(r) for r in x]
    else:
        raise APIError(400, "'input' must be a string, a non-empty list of strings, or token ids", param="input")
    if len(texts) > 2048:
        raise APIError(400, "at most 2048 inputs per request", param="input")
    return texts
