"""`lmstack <verb>`: thin argument parsing over the library. User errors print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or prefix == "T":
            return f"{n:,.1f} {prefix}{unit}" if prefix else f"{n:,.0f} {unit}"
        n /= 1024
    return str(n)


def cmd_tokenizer_train(a) -> None:
    from .data.corpora import iter_texts
    from .tokenizer import train_bpe, train_char
    texts = iter_texts(a.corpus, a.data_path)
    specials = [t for t in (a.special_tokens or "").split(",") if t] or None
    kw = dict(special_tokens=specials, bos_token=a.bos_token, pad_token=a.pad_token)
    tok = train_char(texts, **kw) if a.type == "char" else train_bpe(texts, a.vocab_size, **kw)
    tok.save(a.out)
    print(f"trained {a.type} tokenizer with {tok.vocab_size} tokens -> {a.out}/tokenizer.json")


def cmd_prepare(a) -> None:
    from .data.shards import TokenDataset, prepare_dataset
    from .tokenizer import Tokenizer
    tok = Tokenizer.load(a.tokenizer)
    prepare_dataset(a.corpus, tok, a.out, a.val_fraction, a.data_path)
    ds = TokenDataset(a.out)
    print(f"{ds.num_tokens('train'):,} train + {ds.num_tokens('val'):,} val tokens ({ds.meta['dtype']}) -> {a.out}")


def cmd_train(a) -> None:
    from .train import load_recipe, pretrain
    overrides = list(a.set or [])
    if a.out_dir:
        overrides.append(f"out_dir={a.out_dir}")
    if a.resume:
        overrides.append("resume=true")
    if a.no_progress:
        overrides.append("progress=false")
    cfg = load_recipe(a.recipe, overrides)
    summary = pretrain(cfg)
    sample = summary.pop("sample", None)
    print(json.dumps(summary, indent=2))
    if sample is not None:
        print("---- sample ----")
        print(sample)


def _sampling(a) -> dict:
    """SamplingParams fields from the shared decoding flags."""
    from .errors import LMStackError
    bias = {}
    for item in a.logit_bias or []:
        try:
            k, v = item.split("=", 1)
            bias[int(k)] = float(v)
        except ValueError:
            raise LMStackError(f"--logit-bias expects TOKEN_ID=BIAS (e.g. 50256=-100), got {item!r}") from None
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repetition_penalty=a.repetition_penalty, frequency_penalty=a.frequency_penalty,
                presence_penalty=a.presence_penalty, logit_bias=bias or None, min_new_tokens=a.min_new_tokens,
                stop=a.stop or None, seed=a.seed)


def cmd_generate(a) -> None:
    import lmstack
    lm = lmstack.load(a.model, dtype=_dtype(a.dtype), quantize=a.quantize)
    params = _sampling(a)
    if a.num_beams > 1:
        early = {"true": True, "false": False, "never": "never"}[a.early_stopping]
        for text, score in lm.beam_search(a.prompt, num_beams=a.num_beams, length_penalty=a.length_penalty,
                                          early_stopping=early, num_return_sequences=a.num_return_sequences,
                                          truncate=a.truncate, **params):
            print(f"[score {score:.4f}] {a.prompt}{text}")
        return
    if a.no_cache:
        from .generate import SamplingParams, generate
        from .generate.stops import apply_stop_strings
        from .lm import decode_stream
        sp = SamplingParams(**params)
        out = generate(lm.model, lm._prompt_ids(a.prompt), sp, lm.tokenizer.eos_id, use_cache=False,
                       truncate=a.truncate)
        out = [t for t in out if t != lm.tokenizer.eos_id]
        print(a.prompt + "".join(apply_stop_strings(decode_stream(lm.tokenizer, out), sp.stop)))
        return
    sys.stdout.write(a.prompt)
    for piece in lm.stream(a.prompt, truncate=a.truncate, **params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _dtype(name: str | None):
    import torch
    return {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cmd_bench_generate(a) -> None:
    from .generate.bench import DEFAULT_PROMPT, bench_generate, load_for_bench
    from .models.quant import kernel_status
    lm = load_for_bench(a.model, quantize=a.quantize, dtype=a.dtype, compile=a.compile, threads=a.threads)
    ids = lm._prompt_ids(a.prompt or DEFAULT_PROMPT)
    r = bench_generate(lm.model, ids, new_tokens=a.new_tokens, batch=a.batch, warmup=a.warmup)
    if a.json:
        print(json.dumps({k: v for k, v in r.as_dict().items() if k != "tokens"}))
        return
    extra = f", int8 kernel: {kernel_status()}" if a.quantize else ""
    print(f"model: {a.model} (dtype {a.dtype or 'float32'}, quantize {a.quantize or 'none'}{extra})")
    print(r.summary())


def cmd_convert(a) -> None:
    import lmstack

    from .checkpoint import save_checkpoint
    lm = lmstack.load(a.src, dtype=_dtype(a.dtype))
    save_checkpoint(a.out, lm.model, lm.tokenizer)
    print(f"converted {a.src} ({lm.model.num_params():,} parameters) -> {a.out}")


def cmd_export(a) -> None:
    import lmstack

    from .convert.hf import export_hf
    lm = lmstack.load(a.model)
    export_hf(lm.model, lm.tokenizer, a.out)
    print(f"exported {a.model} as a Hugging Face model directory -> {a.out}")


def cmd_download(a) -> None:
    from .errors import LMStackError
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LMStackError("downloading needs huggingface_hub: pip install huggingface_hub") from None
    try:
        path = snapshot_download(a.repo_id, revision=a.revision, local_dir=a.out,
                                 allow_patterns=a.include or None)
    except Exception as e:  # network errors come in many types (requests, httpx, OSError)
        name = type(e).__name__
        if any(k in name for k in ("Connect", "Timeout", "Offline", "Network")) or "resolve" in str(e).lower() \
                or isinstance(e, OSError):
            raise LMStackError(f"cannot download {a.repo_id}: the Hugging Face Hub is unreachable (offline?); "
                               "copy the model directory or GGUF file here and pass its path instead") from None
        raise LMStackError(f"cannot download {a.repo_id}: {name}: {e}") from None
    print(path)


def cmd_serve(a) -> None:
    from .serve import serve
    serve(a.model, host=a.host, port=a.port, api_key=a.api_key, max_batch=a.max_batch, model_name=a.model_name,
          threads=a.threads, dtype=_dtype(a.dtype), quantize=a.quantize)


def cmd_chat(a) -> None:
    import lmstack
    lm = lmstack.load(a.model, dtype=_dtype(a.dtype), quantize=a.quantize)
    params = _sampling(a)
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


def cmd_info(a) -> None:
    from .config import ModelConfig, preset
    if a.preset:
        cfg = preset(a.preset)
    else:
        from .lm import resolve_source
        if resolve_source(a.model) == "lmstack":
            from .checkpoint import resolve_checkpoint
            cfg = ModelConfig.load(resolve_checkpoint(a.model) / "config.json")
        else:
            import lmstack
            cfg = lmstack.load(a.model).config
    T = a.seq_len or cfg.block_size
    n = cfg.num_params()
    rows = [
        ("architecture", f"{cfg.n_layer} layers, {cfg.n_head} heads ({cfg.kv_heads} kv), {cfg.n_embd} wide, "
                         f"ffn {cfg.ffn_size}, {cfg.pos_emb}/{cfg.norm}/{cfg.mlp}"),
        ("vocab / context", f"{cfg.vocab_size:,} / {cfg.block_size:,}"),
        ("parameters", f"{n:,} ({cfg.num_params(include_embeddings=False):,} non-embedding)"),
        ("training FLOPs/token", f"{cfg.flops_per_token(T):,} (~6N + 6·L·T·d at T={T})"),
        ("inference FLOPs/token", f"{cfg.flops_per_token(T) // 3:,}"),
        ("weights fp32 / bf16", f"{_human(4 * n)} / {_human(2 * n)}"),
        (f"KV cache @ {T} tokens", f"{_human(cfg.kv_cache_bytes(T))} fp32, {_human(cfg.kv_cache_bytes(T, bytes_per_elem=2))} bf16"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def cmd_plot(a) -> None:
    from .train.plot import plot_run
    print(plot_run(a.run_dir, a.out))


def _add_sampling_flags(t: argparse.ArgumentParser, max_new: int, temperature: float) -> None:
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
    t.add_argument("--quantize", choices=["int8"], help="int8 weight-only linears (fast CPU decoding)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmstack", description="A hackable language-model stack.")
    sub = p.add_subparsers(dest="verb", required=True)

    tk = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tverb", required=True)
    t = tk.add_parser("train", help="train a byte-level BPE or char-level tokenizer")
    t.add_argument("--corpus", default="pydocs", help="pydocs | shakespeare | file/dir/glob")
    t.add_argument("--data-path", help="local file for a named corpus")
    t.add_argument("--type", choices=["bpe", "char"], default="bpe")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--special-tokens", default="<|endoftext|>",
                   help="comma-separated special tokens; the first is EOS (default <|endoftext|>)")
    t.add_argument("--bos-token", help="BOS token (added to the specials if missing)")
    t.add_argument("--pad-token", help="padding token (added to the specials if missing)")
    t.add_argument("--out", required=True, help="output directory (tokenizer.json)")
    t.set_defaults(fn=cmd_tokenizer_train)

    t = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped shards with a train/val split")
    t.add_argument("--corpus", default="pydocs")
    t.add_argument("--data-path")
    t.add_argument("--tokenizer", required=True, help="tokenizer.json or a directory holding it")
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--out", required=True)
    t.set_defaults(fn=cmd_prepare)

    t = sub.add_parser("train", help="pretrain from a YAML recipe")
    t.add_argument("recipe", help="recipes/*.yaml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable; "
                   "model.n_layer=6 for nested keys)")
    t.add_argument("--out-dir")
    t.add_argument("--resume", action="store_true", help="continue from <out_dir>/last")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    t = sub.add_parser("generate", help="generate text from a checkpoint")
    t.add_argument("--model", required=True)
    t.add_argument("--prompt", default="\n")
    _add_sampling_flags(t, max_new=200, temperature=0.8)
    t.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    t.add_argument("--length-penalty", type=float, default=1.0)
    t.add_argument("--early-stopping", choices=["true", "false", "never"], default="false")
    t.add_argument("--num-return-sequences", type=int, default=1)
    t.add_argument("--truncate", choices=["left"], help="cut an over-long prompt from the left instead of failing")
    t.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (for checking)")
    t.set_defaults(fn=cmd_generate)

    t = sub.add_parser("bench-generate", help="measure prefill/decode tok/s, time to first token and peak RSS")
    t.add_argument("--model", required=True, help="checkpoint dir, Hugging Face dir or GGUF file")
    t.add_argument("--quantize", choices=["int8"], help="weight-only int8 linears (fast CPU decoding)")
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (slower than eager for int8 on CPU, see RESULTS.md)")
    t.add_argument("--new-tokens", type=int, default=128)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--prompt", help="prompt text (default: a fixed ~50-token paragraph)")
    t.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    t.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(fn=cmd_bench_generate)

    t = sub.add_parser("convert", help="write an lmstack checkpoint from a Hugging Face directory or GGUF file")
    t.add_argument("src")
    t.add_argument("--out", required=True)
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    t.set_defaults(fn=cmd_convert)

    t = sub.add_parser("export", help="write a model as a Hugging Face directory (transformers can load it)")
    t.add_argument("model")
    t.add_argument("--format", choices=["hf"], default="hf")
    t.add_argument("--out", required=True)
    t.set_defaults(fn=cmd_export)

    t = sub.add_parser("download", help="download a model from the Hugging Face Hub (needs network)")
    t.add_argument("repo_id")
    t.add_argument("--revision")
    t.add_argument("--out", help="target directory (default: the Hugging Face cache)")
    t.add_argument("--include", action="append", help="only files matching this glob (repeatable)")
    t.set_defaults(fn=cmd_download)

    t = sub.add_parser("chat", help="chat with a model using its own chat template")
    t.add_argument("--model", required=True, help="checkpoint dir, Hugging Face dir or GGUF file")
    t.add_argument("--system", help="system message")
    t.add_argument("-p", "--prompt", help="answer this one question and exit")
    _add_sampling_flags(t, max_new=256, temperature=0.0)
    t.set_defaults(fn=cmd_chat)

    t = sub.add_parser("serve", help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...)")
    t.add_argument("--model", required=True, help="checkpoint dir, Hugging Face dir or GGUF file")
    t.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    t.add_argument("--port", type=int, default=8000)
    t.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    t.add_argument("--max-batch", type=int, default=16, help="generations decoding at once in the continuous batch (+64 requests queued, then 429)")
    t.add_argument("--model-name", default=None, help="name clients pass as `model` (default: the --model value)")
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--quantize", choices=["int8"], help="int8 weight-only linears (fast CPU decoding)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads for the model (default: PyTorch's); "
                   "on a small CPU box shared with clients, one fewer than the cores lowers single-stream latency")
    t.set_defaults(fn=cmd_serve)

    t = sub.add_parser("embed", help="mean-pooled, normalised sentence embeddings (one JSON line per text)")
    t.add_argument("--model", required=True)
    t.add_argument("texts", nargs="*", help="texts (default: one per line on stdin)")
    t.add_argument("--no-normalize", action="store_true")
    t.set_defaults(fn=cmd_embed)

    t = sub.add_parser("info", help="parameters, FLOPs per token, weight and KV-cache memory")
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--model")
    g.add_argument("--preset")
    t.add_argument("--seq-len", type=int)
    t.set_defaults(fn=cmd_info)

    t = sub.add_parser("plot", help="write the loss-curve PNG of a run")
    t.add_argument("run_dir")
    t.add_argument("--out")
    t.set_defaults(fn=cmd_plot)

    # --- eval verbs (issue 6) ---
    def _cmd_eval(a):  # the library does the work: lmstack.eval.run.cli_main
        from .eval.run import cli_main
        cli_main(a)

    t = sub.add_parser("eval", help="benchmarks (MMLU, TruthfulQA, WiC, BIG-bench, HellaSwag, ARC, GSM8K) and "
                                    "perplexity / bits-per-byte, scored as lm-evaluation-harness scores them")
    t.add_argument("--model", required=True, help="checkpoint dir, HF dir, GGUF file, or the model name at --base-url")
    t.add_argument("--tasks", required=True, help="comma-separated NAME or NAME=PATH (mmlu, mmlu_<subject>, "
                   "truthfulqa_mc1, truthfulqa_mc2, wic, hellaswag, arc_easy, arc_challenge, gsm8k, "
                   "bigbench_<name>, perplexity=FILE)")
    t.add_argument("--data-dir", help="benchmark data root (default $LMSTACK_EVAL_DATA or ~/.cache/lmstack/eval)")
    t.add_argument("--shots", type=int, default=0, help="few-shot examples from the train/dev split (first n)")
    t.add_argument("--limit", type=int, help="evaluate only the first N examples (documents for perplexity)")
    t.add_argument("--batch-size", type=int, default=8,
                   help="questions (multiple choice) or prompts (generation) per forward pass")
    t.add_argument("--stride", type=int, help="perplexity: sliding-window stride in tokens (default: the window)")
    t.add_argument("--max-length", type=int, help="window / context length (default: the model's)")
    t.add_argument("--max-new-tokens", type=int, help="generation tasks: override the task's limit")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--base-url", help="evaluate a remote OpenAI-compatible endpoint (e.g. http://host:8000/v1)")
    t.add_argument("--api-key", default=None)
    t.add_argument("--tokenizer", help="remote: the server's tokenizer (path), for exact token-level splitting")
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--log-samples", action="store_true", help="keep per-example inputs/outputs in the JSON")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--out", help="write results JSON here")
    t.set_defaults(fn=_cmd_eval)
    # --- end eval verbs ---

    # --- finetune / lora verbs (issue 7: SFT) ---
    def _sft(name: str):  # thin: lmstack.train.sft.<name>(args), imported only when the verb runs
        def run(a):
            from .train import sft
            return getattr(sft, name)(a)
        return run

    t = sub.add_parser("finetune", help="supervised fine-tuning (full or --lora) on instruction/chat data")
    t.add_argument("--model", required=True, help="checkpoint dir, Hugging Face dir or GGUF file")
    t.add_argument("--data", required=True, help="Alpaca .json/.jsonl, chat .jsonl ({messages}) or plain text")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--lora", nargs="?", const="", default=None, metavar="SPEC",
                   help="LoRA instead of full fine-tuning: r=16,alpha=32,dropout=0.05,targets=q,k,v,o "
                        "(targets: q k v o gate up down, attn, mlp, all); --lora alone = these defaults")
    t.add_argument("--recipe", help="YAML of TrainConfig keys (lr, batch_size, epochs, ...)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a TrainConfig key (repeatable)")
    t.add_argument("--seq-len", type=int, help="max tokens per example (default min(512, context window))")
    t.add_argument("--pack", action="store_true", help="pack several examples per row")
    t.add_argument("--val-data", help="validation file (default: hold out --val-fraction of --data)")
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--epochs", type=float)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--max-records", type=int, help="use only the first N records")
    t.add_argument("--no-merge", action="store_true", help="LoRA: skip writing <out>/merged")
    t.add_argument("--resume", action="store_true", help="continue from <out>/last")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=_sft("cli_finetune"))
    t = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model: a plain checkpoint")
    t.add_argument("--model", required=True, help="the base model the adapter was trained on")
    t.add_argument("--adapter", required=True, help="adapter dir (<finetune out>/adapter, or a LoRA run's last/)")
    t.add_argument("--out", required=True, help="where to write the merged checkpoint")
    t.add_argument("--no-check", action="store_true", help="skip the logits comparison")
    t.set_defaults(fn=_sft("cli_merge_lora"))
    # --- end finetune verbs ---

    # --- reward / dpo / ppo verbs (issue 7: RLHF) ---
    def _rlhf(mod: str, name: str):  # thin: the verb's function lives in lmstack.train.<mod>, imported when run
        def run(a):
            import importlib
            return getattr(importlib.import_module(f"lmstack.train.{mod}"), name)(a)
        return run

    def _ft_flags(t: argparse.ArgumentParser, lr_help: str, out: str) -> None:
        t.add_argument("--out", default=out, help=f"output run directory (checkpoints last/, metrics.jsonl; "
                                                  f"default {out})")
        t.add_argument("--lr", type=float, help=lr_help)
        t.add_argument("--seed", type=int)
        t.add_argument("--device", help="auto | cpu | cuda")
        t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any TrainConfig key (repeatable)")
        t.add_argument("--no-progress", action="store_true")

    rw = sub.add_parser("reward", help="reward models: train on preference pairs, score texts")
    rws = rw.add_subparsers(dest="rverb", required=True)
    t = rws.add_parser("train", help="scalar-head reward model, Bradley-Terry loss on prompt/chosen/rejected JSONL")
    t.add_argument("--model", required=True, help="base checkpoint (the backbone)")
    t.add_argument("--data", required=True, help="preference JSONL: prompt, chosen, rejected")
    t.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    t.add_argument("--batch-size", type=int, help="pairs per step (default 8)")
    t.add_argument("--eval-interval", type=int)
    t.add_argument("--val-fraction", type=float, default=0.1, help="held-out pairs for pairwise accuracy")
    t.add_argument("--max-length", type=int, help="tokens per sequence (default: the context window)")
    _ft_flags(t, "learning rate (default 1e-4)", "runs/reward")
    t.set_defaults(fn=_rlhf("reward", "cmd_reward_train"))
    t = rws.add_parser("score", help="score texts with a reward model (one JSON line per text)")
    t.add_argument("--model", required=True, help="reward model directory (from `lmstack reward train`)")
    t.add_argument("--prompt", help="prompt the texts answer (default none)")
    t.add_argument("texts", nargs="*", help="texts (default: one per line on stdin)")
    t.set_defaults(fn=_rlhf("reward", "cmd_reward_score"))

    t = sub.add_parser("dpo", help="Direct Preference Optimization against a frozen reference")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True, help="preference JSONL: prompt, chosen, rejected")
    t.add_argument("--beta", type=float, default=0.1)
    t.add_argument("--loss", choices=["sigmoid", "ipo"], default="sigmoid")
    t.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO (sigmoid loss only)")
    t.add_argument("--lora", help="train LoRA adapters, e.g. r=16,alpha=32,targets=q,k,v,o (the reference is the "
                   "base model)")
    t.add_argument("--ref", choices=["precompute", "live"], default="precompute",
                   help="precompute the reference log-probs once (default) or recompute them every step")
    t.add_argument("--ref-model", help="another checkpoint as the reference (default: the starting model)")
    t.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    t.add_argument("--batch-size", type=int, help="pairs per step (default 8)")
    t.add_argument("--eval-interval", type=int)
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--max-length", type=int)
    _ft_flags(t, "learning rate (default 5e-5)", "runs/dpo")
    t.set_defaults(fn=_rlhf("dpo", "cmd_dpo"))

    t = sub.add_parser("ppo", help="RLHF with PPO: value head, frozen reference, adaptive KL penalty, GAE")
    t.add_argument("--model", required=True, help="the starting policy")
    t.add_argument("--reward", required=True, help="reward model dir, or python:module:function / "
                   "python:file.py:function taking (prompts, completions) -> list[float]")
    t.add_argument("--prompts", required=True, help="prompts: .jsonl with 'prompt' fields or a text file, one per line")
    t.add_argument("--rollouts", type=int, default=50)
    t.add_argument("--batch-size", type=int, default=16, help="prompts per rollout")
    t.add_argument("--max-new-tokens", type=int, default=24)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--top-k", type=int, default=0)
    t.add_argument("--ppo-epochs", type=int, default=4)
    t.add_argument("--minibatches", type=int, default=1)
    t.add_argument("--init-kl-coef", type=float, default=0.1)
    t.add_argument("--target-kl", type=float, default=6.0, help="adaptive KL target (0 = fixed kl coefficient)")
    t.add_argument("--horizon", type=int, default=10000)
    t.add_argument("--gamma", type=float, default=1.0)
    t.add_argument("--lam", type=float, default=0.95)
    t.add_argument("--cliprange", type=float, default=0.2)
    t.add_argument("--cliprange-value", type=float, default=0.2)
    t.add_argument("--vf-coef", type=float, default=0.1)
    t.add_argument("--ent-coef", type=float, default=0.0)
    _ft_flags(t, "learning rate (default 1e-5)", "runs/ppo")
    t.set_defaults(fn=_rlhf("ppo", "cmd_ppo"))
    # --- end rlhf verbs ---

    # --- feedback verb (issue 7: human feedback page) ---
    def cmd_feedback(a):
        from .serve.feedback import cmd_feedback as run
        run(a)

    t = sub.add_parser("feedback", help="web page to vote between two sampled completions (preference data)",
                       description="Serve a local page that shows each prompt with two sampled completions; every "
                                   "vote is appended (fsync) to --out at once. Restarting with the same --out "
                                   "continues where it stopped. --export OUT writes prompt/chosen/rejected JSONL.")
    t.add_argument("--model", help="checkpoint dir, Hugging Face dir or GGUF file")
    t.add_argument("--prompts", help=".txt (one prompt per line) or .jsonl ({\"prompt\"} or {\"messages\"} per line)")
    t.add_argument("--out", required=True, help="votes JSONL (appended to; already voted prompts are skipped)")
    t.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    t.add_argument("--port", type=int, default=8008)
    t.add_argument("--annotator", help="default annotator name (default: your user name)")
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--top-p", type=float, default=0.95)
    t.add_argument("--seed", type=int, default=0, help="base seed; each prompt's two seeds derive from it")
    t.add_argument("--chat", action="store_true", help="send plain prompts as a user turn (chat template)")
    t.add_argument("--no-browser", action="store_true", help="don't open the page in a web browser")
    t.add_argument("--export", metavar="OUT", help="write the votes in --out as prompt/chosen/rejected JSONL and exit")
    t.add_argument("--no-edited", action="store_true", help="with --export: drop pairs whose chosen text was edited")
    t.set_defaults(fn=cmd_feedback)
    # --- end feedback verb ---
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import LMStackError
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except LMStackError as e:
        print(f"lmstack: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"lmstack: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmstack: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
