"""The writer behind summaries and answers: one small interface over a local LM or an OpenAI-compatible
/v1/chat/completions endpoint, so every prompt can be measured against the context window before it is sent.

    w = as_writer(lmstack.load(path))             # or ChatClient("http://localhost:8000/v1", "my-model")
    prompt = w.render("Summarise: ...")           # the model's chat template (local), or the message itself
    assert w.count(prompt) + 128 <= w.context_window
    text = "".join(w.stream(prompt, max_new_tokens=128))

`count_text` measures plain text (for packing); `count` measures a rendered prompt exactly as generation sees it.
A remote endpoint's tokenizer is unknown here: text is counted as ceil(chars / 3) tokens (English BPE averages
about 4 characters per token, so this over-counts and prompts stay inside the window)."""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from typing import Iterator

from ..errors import LMStackError


def json_request(url: str, body: dict, api_key: str | None = None) -> urllib.request.Request:
    """A POST of `body` as JSON to an OpenAI-compatible endpoint, with the bearer key when there is one."""
    return urllib.request.Request(url, data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json",
                                           **({"Authorization": f"Bearer {api_key}"} if api_key else {})})

CHARS_PER_TOKEN = 3  # the remote estimate: deliberately below the ~4 characters of an average English BPE token


class LocalChat:
    """A writer over an lmstack LM: its chat template when it has one (else the bare message + "\\nAnswer:"), exact
    token counts, greedy decoding unless sampling parameters say otherwise, stopping at the end of the turn."""

    def __init__(self, lm, suffix: str = "\nAnswer:"):
        self.lm, self.suffix = lm, suffix
        self.name = str(getattr(lm, "path", None) or "local-lm")

    @property
    def context_window(self) -> int:
        return int(self.lm.config.block_size)

    def render(self, message: str) -> str:
        tok = self.lm.tokenizer
        if tok.chat_template:
            return self.lm.chat_prompt([{"role": "user", "content": message}])
        return message + self.suffix

    def count(self, prompt: str) -> int:
        return len(self.lm.prompt_ids(prompt))

    def count_text(self, text: str) -> int:
        return len(self.lm.tokenizer.encode(text))

    def stream(self, prompt: str, max_new_tokens: int = 256, **sampling) -> Iterator[str]:
        tok = self.lm.tokenizer
        stop_ids = tok.end_of_turn_ids if tok.chat_template else None
        yield from self.lm.stream(prompt, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                                  **{"temperature": 0.0, **sampling})


class ChatClient:
    """A writer over an OpenAI-compatible `POST {base_url}/chat/completions` (streamed, server-sent events).
    context_window: the served model's window in tokens (the endpoint does not say; 4096 unless told)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, context_window: int = 4096,
                 timeout: float = 300):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.context_window, self.timeout = model, api_key, int(context_window), timeout
        self.name = model

    def render(self, message: str) -> str:
        return message

    def count(self, prompt: str) -> int:
        return self.count_text(prompt) + 8  # role markers and the assistant header of the server's template

    def count_text(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def stream(self, prompt: str, max_new_tokens: int = 256, **sampling) -> Iterator[str]:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                "max_tokens": max_new_tokens, "temperature": sampling.pop("temperature", 0.0)}
        body.update({k: v for k, v in sampling.items() if k in ("top_p", "stop", "seed") and v is not None})
        req = json_request(self.url, body, self.api_key)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                for raw in r:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    choices = json.loads(data).get("choices") or [{}]
                    piece = (choices[0].get("delta") or {}).get("content")
                    if piece:
                        yield piece
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise LMStackError(f"chat request to {self.url} failed: {e}; check --base-url and --model") from None


def as_writer(lm):
    """`lm` as a writer: a ChatClient (or anything with context_window / render / count / stream) stays as it is; an
    lmstack LM is wrapped in LocalChat."""
    if all(hasattr(lm, a) for a in ("context_window", "render", "count", "count_text", "stream")):
        return lm
    if not hasattr(lm, "tokenizer") or not hasattr(lm, "config"):
        raise LMStackError(f"expected an lmstack LM (lmstack.load) or a ChatClient, got {type(lm).__name__}")
    return LocalChat(lm)
