"""Verb: fill-mask (the top-k fillers of each [MASK] of a text, from a masked-LM model)."""
from __future__ import annotations

import json

from .common import dtype


def cmd_fill_mask(a) -> None:
    import lmstack
    from ..generate.fill_mask import fill_mask
    lm = lmstack.load(a.model, dtype=dtype(a.dtype))
    results = fill_mask(lm.model, lm.tokenizer, a.text, top_k=a.top_k)
    if a.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    for i, row in enumerate(results):
        if len(results) > 1:
            print(f"mask {i + 1}:")
        w = max(len(repr(r["token_str"])) for r in row)
        for r in row:
            seq = r["sequence"].replace("\n", "\\n")  # one line per candidate
            print(f"  {r['score']:.4f}  {r['token_str']!r:<{w}}  {seq}")


def register(sub) -> None:
    t = sub.add_parser("fill-mask", help="the most likely tokens for each [MASK] of a text (BERT / objective: mlm)")
    t.add_argument("text", help='text with one or more [MASK] tokens, e.g. "The capital of France is [MASK]."')
    t.add_argument("--model", required=True, help="a masked-LM model: lmstack checkpoint or Hugging Face directory")
    t.add_argument("--top-k", type=int, default=5)
    t.add_argument("--json", action="store_true", help="print the results as JSON (one list per mask)")
    t.add_argument("--dtype", choices=["float32", "bfloat16"])
    t.set_defaults(fn=cmd_fill_mask)
