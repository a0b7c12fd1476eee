"""Structured output: constrained decoding with a per-request token mask from a grammar engine.

A constraint (SamplingParams `json_object`, `json_schema`, `regex`, `choices` or `grammar`) is compiled once to a
grammar; each generation gets its own `Matcher` (the parser state), which gives the set of tokens that keep the
output inside the language before every sampling step and consumes the token that was chosen. The mask is applied
to the raw logits at the head of the one sampling pipeline (`sample_next(allowed=...)`), so temperature, top-k/p,
min-p, penalties and logit bias all act on the allowed tokens only, and greedy is the best allowed token. A
generation ends as soon as the grammar is complete (nothing more can follow), or at EOS where the grammar allows
it; max_new_tokens can still cut it short (finish reason "length", as with OpenAI).

The engine is llguidance (Rust; the one behind llama.cpp's and vLLM's guided decoding). Chosen over xgrammar (its
wheel depends on a full torch and is GPU-first) and outlines-core (regex/JSON-Schema only, no context-free
grammars) because one library covers all five constraint kinds — JSON, JSON Schema, regex, a choice among strings,
and Lark context-free grammars (GBNF converts to Lark) — computes a mask over a 49k vocabulary in tens of
microseconds (benchmarks/structured_output.py), and reads any tokenizer from its tokens' bytes.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LMStackError

KINDS = ("json_object", "json_schema", "regex", "choices", "grammar")
# JSON is written as json.dumps writes it ({"a": 1, "b": [2, 3]}): no free whitespace, which a small model sampled at
# temperature 1 would otherwise fill with runs of newlines until max_new_tokens
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """A compiled constraint: its kind, the spec as given (canonical text) and the llguidance grammar."""
    kind: str
    spec: str
    grammar: str


def make_constraint(json_object: bool = False, json_schema=None, regex: str | None = None,
                    choices=None, grammar: str | None = None) -> Constraint | None:
    """The Constraint of at most one of the five kinds (None when none is given); a bad spec is an LMStackError
    naming the problem. json_schema: a dict or its JSON text; choices: a list of strings; grammar: Lark (or GBNF,
    recognised by lines of `name ::= ...` rules)."""
    given = [k for k, v in (("json_object", json_object), ("json_schema", json_schema), ("regex", regex),
                            ("choices", choices), ("grammar", grammar)) if v not in (None, False)]
    if not given:
        return None
    if len(given) > 1:
        raise LMStackError(f"give one structured-output constraint at a time, got {' and '.join(given)}")
    kind = given[0]
    if kind == "json_object":
        spec = ""
    elif kind == "json_schema":
        spec = _schema_text(json_schema)
    elif kind == "choices":
        if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices or \
                not all(isinstance(c, str) and c for c in choices):
            raise LMStackError(f"choices must be a non-empty list of non-empty strings, got {choices!r}")
        spec = json.dumps(list(choices))
    else:
        spec = regex if kind == "regex" else grammar
        if not isinstance(spec, str) or not spec:
            raise LMStackError(f"{kind} must be a non-empty string, got {spec!r}")
    return Constraint(kind, spec, _compile(kind, spec))


def _schema_text(schema) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise LMStackError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise LMStackError(f"json_schema must be a JSON object (a schema), got {type(schema).__name__}")
    return json.dumps(schema)  # property order kept: the output follows it


@functools.lru_cache(maxsize=512)
def _compile(kind: str, spec: str) -> str:
    import llguidance as llg
    M = llg.LLMatcher
    try:
        if kind == "json_object":  # OpenAI's JSON mode: any JSON object
            g = M.grammar_from_json_schema({"type": "object"}, overrides=JSON_LAYOUT)
        elif kind == "json_schema":
            g = M.grammar_from_json_schema(spec, overrides=JSON_LAYOUT)
        elif kind == "regex":
            g = M.grammar_from_regex(spec)
        elif kind == "choices":
            g = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec)))
        else:
            lark = spec
            if re.search(r"^\s*[A-Za-z][\w-]*\s*::=", spec, re.M):  # GBNF rules (llama.cpp's grammar format)
                from llguidance.gbnf_to_lark import gbnf_to_lark
                lark = gbnf_to_lark(spec)
            g = M.grammar_from_lark(lark)
    except (ValueError, TypeError, RuntimeError) as e:
        raise LMStackError(f"invalid {kind}: {e}") from None
    err = M.validate_grammar(g)
    if err:
        raise LMStackError(f"invalid {kind}: {err.strip()}")
    return g


def guide_tokenizer(tokenizer, vocab_size: int):
    """The llguidance tokenizer of an lmstack Tokenizer over a model vocabulary of `vocab_size` ids (built from each
    token's bytes, once per tokenizer and size: ~0.1-1 s for a 49k vocabulary). Ids past the tokenizer's own
    vocabulary (a model's padding) are never allowed."""
    cache = tokenizer.__dict__.setdefault("_guide_tokenizers", {})
    if vocab_size not in cache:
        import llguidance as llg
        cache[vocab_size] = llg.LLTokenizer(llg.TokenizerWrapper(_Tokens(tokenizer)), n_vocab=vocab_size)
    return cache[vocab_size]


class _Tokens:
    """What llguidance's TokenizerWrapper reads: every token's bytes (special tokens by their name, and marked
    special so the grammar never emits them as text), the EOS id, and an encoder."""

    def __init__(self, tokenizer):
        specials = tokenizer.special_ids
        self.tokens = [(tokenizer.hf.id_to_token(i) or "").encode() if i in specials else tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(specials)
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        self.bos_token_id = tokenizer.bos_id
        self._tok = tokenizer

    def __call__(self, s):
        return self._tok.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s)


class Matcher:
    """One generation's parser state: `allowed()` before each step, `advance(token)` after it; `done` once the
    grammar is complete."""

    def __init__(self, constraint: Constraint, tokenizer, vocab_size: int, stop_ids=()):
        import llguidance as llg
        self.constraint, self.vocab = constraint, vocab_size
        self.m = llg.LLMatcher(guide_tokenizer(tokenizer, vocab_size), constraint.grammar, log_level=0)
        if self.m.is_error():
            raise LMStackError(f"invalid {constraint.kind}: {self.m.get_error()}")
        eos = tokenizer.eos_id
        # the model's other stop tokens (a chat model's end of turn) end the output wherever EOS may
        self.extra_stops = sorted(i for i in stop_ids if i != eos and 0 <= i < vocab_size)
        self.eos = eos

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens that keep the output in the language (EOS / stop tokens where it may end)."""
        bits = np.unpackbits(np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.from_numpy(bits[:self.vocab].astype(bool))
        if self.extra_stops and self.eos is not None and mask[self.eos]:
            mask[self.extra_stops] = True
        return mask

    def advance(self, token: int) -> None:
        if token in self.extra_stops:
            token = self.eos
        if not self.m.consume_token(token):
            raise LMStackError(f"structured output: token {token} does not fit the {self.constraint.kind} "
                               f"({self.m.get_error()})")

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end can follow (the generation stops here)."""
        return self.m.is_stopped()


def new_matcher(params, tokenizer, vocab_size: int, stop_ids=()) -> Matcher | None:
    """A fresh Matcher for one generation with `params` (a SamplingParams), or None without a constraint."""
    c = params.constraint
    return None if c is None else Matcher(c, tokenizer, vocab_size, stop_ids)
