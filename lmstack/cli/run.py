"""Verbs that run a model: generate, chat, embed, bench-generate."""
from __future__ import annotations

import json
import sys

from .common import DTYPES, QUANT_MODES, add_sampling_flags, dtype, sampling


def add_speculative_flags(t) -> None:
    t.add_argument("--draft-model", metavar="M",
                   help="speculative decoding: a smaller draft model with the same tokenizer (checkpoint dir, Hugging "
                        "Face dir or GGUF, loaded with the target's --dtype/--quantize), or 'ngram' / '[ngram]' for "
                        "prompt lookup (drafts copied from earlier text, no draft model); same output distribution")
    t.add_argument("--num-speculative", type=int, default=4, metavar="K", help="draft tokens per round (default 4)")
    t.add_argument("--ngram-max", type=int, default=3, metavar="N",
                   help="prompt lookup: match the last N tokens, then fewer down to --ngram-min (default 3)")
    t.add_argument("--ngram-min", type=int, default=2, metavar="N",
                   help="prompt lookup: the shortest match that proposes drafts (default 2)")


def speculative_drafter(a, lm):
    """The --draft-model drafter for `lm` (None without the flag): prompt lookup for 'ngram' / '[ngram]', else the
    draft model, whose tokenizer must be the target's."""
    if a.draft_model is None:
        return None
    import lmstack
    from ..errors import LMStackError
    from ..generate import NgramDrafter, is_ngram_spec
    if a.num_speculative < 1:
        raise LMStackError(f"--num-speculative must be >= 1 (draft tokens per round), got {a.num_speculative}")
    if is_ngram_spec(a.draft_model):
        return NgramDrafter(ngram_max=a.ngram_max, ngram_min=a.ngram_min)
    return lm.speculative_drafter(lmstack.load(a.draft_model, dtype=dtype(a.dtype), quantize=a.quantize))


def print_speculative_stats(stats) -> None:
    print(f"speculative: {stats.summary()}", file=sys.stderr)


def cmd_generate(a) -> None:
    import lmstack
    from ..errors import LMStackError
    if a.draft_model is not None and (a.num_beams > 1 or a.no_cache):
        flag = f"--num-beams {a.num_beams}" if a.num_beams > 1 else "--no-cache"
        raise LMStackError(f"--draft-model does not combine with {flag} (speculative decoding verifies one "
                           f"KV-cached sequence); drop one of the two flags")
    lm = lmstack.load(a.model, dtype=dtype(a.dtype), quantize=a.quantize)
    drafter = speculative_drafter(a, lm)
    params = sampling(a)
    if a.num_beams > 1:
        early = {"true": True, "false": False, "never": "never"}[a.early_stopping]
        for text, score in lm.beam_search(a.prompt, num_beams=a.num_beams, length_penalty=a.length_penalty,
                                          early_stopping=early, num_return_sequences=a.num_return_sequences,
                                          truncate=a.truncate, **params):
            print(f"[score {score:.4f}] {a.prompt}{text}")
        return
    sys.stdout.write(a.prompt)
    if drafter is not None:
        from ..generate import SpeculativeResult
        stats = SpeculativeResult()
        pieces = lm.speculative_stream(a.prompt, drafter, a.num_speculative, truncate=a.truncate, stats=stats,
                                       **params)
    else:
        pieces = lm.stream(a.prompt, truncate=a.truncate, use_cache=not a.no_cache, **params)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if drafter is not None:
        print_speculative_stats(stats)


def cmd_chat(a) -> None:
    import lmstack
    from ..generate import SpeculativeResult
    lm = lmstack.load(a.model, dtype=dtype(a.dtype), quantize=a.quantize)
    drafter = speculative_drafter(a, lm)
    stats = SpeculativeResult()  # over the whole session
    params = sampling(a)
    system = [{"role": "system", "content": a.system}] if a.system else []
    history: list[dict] = []

    def answer(question: str) -> None:
        history.append({"role": "user", "content": question})
        parts = []
        messages = system + history
        pieces = (lm.chat_stream(messages, **params) if drafter is None else
                  lm.speculative_chat_stream(messages, drafter, a.num_speculative, stats=stats, **params))
        for piece in pieces:
            parts.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(parts).strip()})

    chat_loop(a, answer, history)
    if drafter is not None:
        print_speculative_stats(stats)


def chat_loop(a, answer, history: list[dict]) -> None:
    """Answer --prompt, or read questions from stdin until /exit or end of input."""
    if a.prompt is not None:
        answer(a.prompt)
        return
    print("chat with", a.model, "— /reset clears the history, /exit quits")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        answer(line)


def cmd_embed(a) -> None:
    import lmstack
    lm = lmstack.load(a.model)
    texts = a.texts or [ln.rstrip("\n") for ln in sys.stdin if ln.strip()]
    vectors = lm.embed(texts, normalize=not a.no_normalize)
    for t, v in zip(texts, vectors.tolist()):
        print(json.dumps({"text": t, "embedding": [round(x, 7) for x in v]}))


def cmd_bench_generate(a) -> None:
    import torch

    import lmstack
    from ..generate.bench import DEFAULT_PROMPT, bench_generate
    from ..models.kernels import kernel_path
    from ..models.quant import kernel_status
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = lmstack.load(a.model, dtype=a.dtype, quantize=a.quantize, compile=a.compile)
    r = bench_generate(lm.model, lm.prompt_ids(a.prompt or DEFAULT_PROMPT), new_tokens=a.new_tokens, batch=a.batch,
                       warmup=a.warmup)
    if a.json:
        print(json.dumps({k: v for k, v in r.as_dict().items() if k != "tokens"}))
        return
    quant = getattr(lm.model, "quantization", None)
    kernel = kernel_status() if quant == "int8" else kernel_path() if quant else None
    extra = f", kernel: {kernel}" if kernel else ""
    print(f"model: {a.model} (dtype {a.dtype or 'float32'}, quantization {quant or 'none'}{extra})")
    print(r.summary())


def register(sub) -> None:
    t = sub.add_parser("generate", help="generate text from a checkpoint")
    t.add_argument("--model", required=True)
    t.add_argument("--prompt", default="\n")
    add_sampling_flags(t, max_new=200, temperature=0.8)
    t.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    t.add_argument("--length-penalty", type=float, default=1.0)
    t.add_argument("--early-stopping", choices=["true", "false", "never"], default="false")
    t.add_argument("--num-return-sequences", type=int, default=1)
    t.add_argument("--truncate", choices=["left"], help="cut an over-long prompt from the left instead of failing")
    t.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (for checking)")
    add_speculative_flags(t)
    t.set_defaults(fn=cmd_generate)

    t = sub.add_parser("chat", help="chat with a model using its own chat template")
    t.add_argument("--model", required=True, help="checkpoint dir, Hugging Face dir or GGUF file")
    t.add_argument("--system", help="system message")
    t.add_argument("-p", "--prompt", help="answer this one question and exit")
    add_sampling_flags(t, max_new=256, temperature=0.0)
    add_speculative_flags(t)
    t.set_defaults(fn=cmd_chat)

    t = sub.add_parser("embed", help="mean-pooled, normalised sentence embeddings (one JSON line per text)")
    t.add_argument("--model", required=True)
    t.add_argument("texts", nargs="*", help="texts (default: one per line on stdin)")
    t.add_argument("--no-normalize", action="store_true")
    t.set_defaults(fn=cmd_embed)

    t = sub.add_parser("bench-generate", help="measure prefill/decode tok/s, time to first token and peak RSS")
    t.add_argument("--model", required=True, help="checkpoint dir, Hugging Face dir or GGUF file")
    t.add_argument("--quantize", choices=list(QUANT_MODES),
                   help="weight-only quantized linears: int8 per channel, or GGUF blocks q8_0|q4_0|q4_1")
    t.add_argument("--dtype", choices=DTYPES)
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (slower than eager for int8 on CPU, see RESULTS.md)")
    t.add_argument("--new-tokens", type=int, default=128)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--prompt", help="prompt text (default: a fixed ~50-token paragraph)")
    t.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    t.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(fn=cmd_bench_generate)
