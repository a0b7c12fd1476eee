"""Evaluation against a remote OpenAI-compatible endpoint (`lmstack serve`, vLLM, llama.cpp server, ...).

Log-likelihoods come from the legacy completions API with `echo=true, max_tokens=0, logprobs=1`: the server returns
the log-prob of every prompt token, and the continuation's tokens are summed.
- With a local tokenizer (`tokenizer=` a model path or tokenizer.json, the same one the server uses) the prompt is
  sent as token ids split exactly as the local backend splits them (lm-eval's rules), so the numbers equal local
  evaluation.
- Without one, the prompt is sent as text and the continuation is the tokens whose `text_offset` is at or past the
  end of the context (exact whenever the tokenizer does not merge across the boundary, which lm-eval's moving of
  the context's trailing space into the continuation makes the usual case).
`is_greedy` compares each token with the top-1 entry of `top_logprobs`. Generation is greedy (`temperature=0`) with
the task's stop strings (at most 4 are sent, the OpenAI limit; the rest are applied here).
"""
from __future__ import annotations

from ..errors import LMStackError


class RemoteBackend:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, tokenizer: str | None = None,
                 add_special_tokens: bool = True, max_length: int | None = None, timeout: float = 600.0,
                 client=None):
        import httpx
        self.base = base_url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.model, self.name = model, f"{model} @ {base_url}"
        self.add_special_tokens = add_special_tokens
        self.max_length = max_length
        self.prompts_per_request = 8
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout, headers=headers)
        self.tok = None
        if tokenizer:
            self.tok = _load_tokenizer(tokenizer)

    # ---- HTTP ------------------------------------------------------------------------------------------------------
    def _post(self, body: dict) -> dict:
        import httpx
        try:
            r = self.client.post(f"{self.base}/completions", json={"model": self.model, **body})
        except httpx.HTTPError as e:
            raise LMStackError(f"could not reach {self.base}/completions ({e}); is the server running?") from None
        if r.status_code != 200:
            try:
                msg = r.json().get("error", {}).get("message", r.text)
            except ValueError:
                msg = r.text
            raise LMStackError(f"{self.base}/completions answered {r.status_code}: {msg}")
        return r.json()

    # ---- tokenization (only with a local tokenizer) ------------------------------------------------------------
    def _local(self):
        from .backend import LocalBackend
        lb = LocalBackend.__new__(LocalBackend)  # only its tokenization rules: no model needed
        lb.tok, lb.add_special_tokens = self.tok, self.add_special_tokens
        return lb

    # ---- requests --------------------------------------------------------------------------------------------------
    def loglikelihood_choices(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        if self.tok is not None:
            lb = self._local()
            pairs = [lb.encode_pair(context, c) for c in continuations]
            prompts = [ctx + cont for ctx, cont in pairs]
            starts = [len(ctx) for ctx, _ in pairs]
        else:
            n = len(context) - len(context.rstrip())
            ctx = context[:-n] if n else context
            prompts = [context + c for c in continuations]
            starts = [len(ctx)] * len(continuations)
        choices = []
        for s in range(0, len(prompts), self.prompts_per_request):  # servers cap prompts per request
            part = prompts[s:s + self.prompts_per_request]
            data = self._post({"prompt": part, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0})
            got = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
            if len(got) != len(part):
                raise LMStackError(f"the endpoint returned {len(got)} choices for {len(part)} prompts")
            choices += got
        out = []
        for ch, start in zip(choices, starts):
            lp = ch.get("logprobs") or {}
            toks, lps, tops = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")
            if not toks or lps is None:
                raise LMStackError("the endpoint returned no echoed prompt logprobs; it must support "
                                   "echo=true with logprobs on /v1/completions")
            if self.tok is not None:
                idx = range(start, len(toks))
            else:
                offs = lp.get("text_offset")
                idx = [i for i, o in enumerate(offs) if o >= start]
            total, greedy = 0.0, True
            for i in idx:
                if lps[i] is None:
                    raise LMStackError("the endpoint gave no logprob for a continuation token (empty context?)")
                total += lps[i]
                if tops and tops[i]:
                    best = max(tops[i].items(), key=lambda kv: kv[1])[0]
                    greedy = greedy and best == toks[i]
            out.append((total, greedy))
        return out

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return [self.loglikelihood_choices(c, [x])[0] for c, x in requests]

    def token_logprobs_rolling(self, text: str, stride: int | None = None, max_length: int | None = None):
        """Per-token log-probs of `text` in one echo request (with a local tokenizer: the BOS/EOS prefix token is
        sent too, so every token is scored; without one the first token has no log-prob and is skipped). No sliding
        window: the text must fit the server's context."""
        import torch
        if self.tok is not None:
            lb = self._local()
            prompt = [lb.prefix_id] + lb.encode(text, add_special_tokens=False)
        else:
            prompt = text
        data = self._post({"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0})
        lps = data["choices"][0]["logprobs"]["token_logprobs"]
        return torch.tensor([x for x in lps if x is not None], dtype=torch.float64)

    def generate(self, prompts: list[str], until: list[str], max_new_tokens: int, batch_size: int = 1) -> list[str]:
        from ..generate.stops import apply_stop_strings
        outs = []
        for p in prompts:
            body = {"prompt": p, "max_tokens": max_new_tokens, "temperature": 0}
            if until:
                body["stop"] = until[:4]
            text = self._post(body)["choices"][0]["text"]
            outs.append("".join(apply_stop_strings(iter([text]), until or None)))
        return outs


def _load_tokenizer(path: str):
    from pathlib import Path

    from ..tokenizer import Tokenizer
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return Tokenizer.load(p)
    from ..lm import resolve_source
    kind = resolve_source(p)
    if kind == "gguf":
        import lmstack
        return lmstack.load(p).tokenizer
    if kind == "hf":
        from ..convert.hf import load_hf_tokenizer
        return load_hf_tokenizer(p)
    if (p / "tokenizer.json").exists():
        return Tokenizer.load(p)
    raise LMStackError(f"no tokenizer at {path}; pass a tokenizer.json, a model directory or a GGUF file")
