"""Flags and small conversions several verb groups share."""
from __future__ import annotations

import argparse

DTYPES = ["float32", "bfloat16", "float16"]


QUANT_MODES = ("int8", "q8_0", "q4_0", "q4_1")  # = lmstack.models.quant.QUANT_MODES (tests check), no torch import

def dtype(name: str | None):
    """A --dtype value -> torch dtype (None stays None)."""
    import torch
    return {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]




def add_sampling_flags(t: argparse.ArgumentParser, max_new: int, temperature: float) -> None:
    t.add_argument("--max-new-tokens", type=int, default=max_new)
    t.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    t.add_argument("--top-k", type=int, default=0)
    t.add_argument("--top-p", type=float, default=1.0)
    t.add_argument("--min-p", type=float, default=0.0)
    t.add_argument("--repetition-penalty", type=float, default=1.0, help="Hugging Face semantics; 1 = off")
    t.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI semantics")
    t.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI semantics")
    t.add_argument("--logit-bias", action="append", metavar="ID=BIAS", help="add BIAS to token ID's logit (repeatable)")
    t.add_argument("--min-new-tokens", type=int, default=0)
    t.add_argument("--stop", action="append", metavar="STR", help="stop before this string (repeatable)")
    t.add_argument("--seed", type=int)
    t.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights dtype (bfloat16: half the bytes)")
    t.add_argument("--quantize", choices=list(QUANT_MODES),
                   help="weight-only quantized linears: int8 per channel, or GGUF blocks q8_0|q4_0|q4_1")
    g = t.add_argument_group("structured output (one at a time)")
    g.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    g.add_argument("--json-schema", metavar="FILE", help="the output is JSON that fits this JSON Schema file")
    g.add_argument("--regex", help="the output matches this regular expression")
    g.add_argument("--choices", metavar="A,B,C", help="the output is one of these comma-separated strings")
    g.add_argument("--grammar", metavar="FILE", help="the output follows this Lark (or GBNF) grammar file")


def sampling(a) -> dict:
    """SamplingParams fields from the shared decoding flags (checked here, so a bad flag fails before any output)."""
    from ..generate import SamplingParams, parse_logit_bias
    params = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  min_p=a.min_p, repetition_penalty=a.repetition_penalty, frequency_penalty=a.frequency_penalty,
                  presence_penalty=a.presence_penalty, logit_bias=parse_logit_bias(a.logit_bias),
                  min_new_tokens=a.min_new_tokens, stop=a.stop or None, seed=a.seed, **constraint_flags(a))
    SamplingParams(**params)
    return params


def constraint_flags(a) -> dict:
    """SamplingParams structured-output fields from --json-object / --json-schema / --regex / --choices /
    --grammar (files read here; a missing one is an error naming it)."""
    from pathlib import Path

    from ..errors import LMStackError

    def read(path: str, what: str) -> str:
        try:
            return Path(path).read_text()
        except OSError as e:
            raise LMStackError(f"cannot read the {what} file {path!r}: {e.strerror}") from None
    out: dict = {}
    if getattr(a, "json_object", False):
        out["json_object"] = True
    if getattr(a, "json_schema", None):
        out["json_schema"] = read(a.json_schema, "--json-schema")
    if getattr(a, "regex", None):
        out["regex"] = a.regex
    if getattr(a, "choices", None):
        out["choices"] = [c for c in a.choices.split(",") if c]
    if getattr(a, "grammar", None):
        out["grammar"] = read(a.grammar, "--grammar")
    return out


def add_run_flags(t: argparse.ArgumentParser, lr_help: str, out: str) -> None:
    """Flags of the fine-tuning objectives' runs (reward, DPO, PPO)."""
    t.add_argument("--out", default=out, help=f"output run directory (checkpoints last/, metrics.jsonl; "
                                              f"default {out})")
    t.add_argument("--lr", type=float, help=lr_help)
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="auto | cpu | cuda")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any TrainConfig key (repeatable)")
    t.add_argument("--no-progress", action="store_true")
