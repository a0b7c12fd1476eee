"""Verbs that run a model: generate, chat, embed, bench-generate."""
from __future__ import annotations

import json
import sys

from .common import DTYPES, QUANT_MODES, add_sampling_flags, dtype, sampling


def cmd_generate(a) -> None:
    import lmstack
    lm = lmstack.load(a.model, dtype=dtype(a.dtype), quantize=a.quantize)
    params = sampling(a)
    if a.num_beams > 1:
        early = {"true": True, "false": False, "never": "never"}[a.early_stopping]
        for text, score in lm.beam_search(a.prompt, num_beams=a.num_beams, length_penalty=a.length_penalty,
                                          early_stopping=early, num_return_sequences=a.num_return_sequences,
                                          truncate=a.truncate, **params):
            print(f"[score {score:.4f}] {a.prompt}{text}")
        return
    sys.stdout.write(a.prompt)
    for piece in lm.stream(a.prompt, truncate=a.truncate, use_cache=not a.no_cache, **params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(a) -> None:
    import lmstack
    lm = lmstack.load(a.model, dtype=dtype(a.dtype), quantize=a.quantize)
    params = sampling(a)
    system = [{"role": "system", "content": a.system}] if a.system else []
    history: list[dict] = []

    def answer(question: str) -> None:
        history.append({"role": "user", "content": question})
        parts = []
        for piece in lm.chat_stream(system + history, **params):
            parts.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(parts).strip()})

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
    t.set_defaults(fn=cmd_generate)

    t = sub.add_parser("chat", help="chat with a model using its own chat template")
    t.add_argument("--model", required=True, help="checkpoint dir, Hugging Face dir or GGUF file")
    t.add_argument("--system", help="system message")
    t.add_argument("-p", "--prompt", help="answer this one question and exit")
    add_sampling_flags(t, max_new=256, temperature=0.0)
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
