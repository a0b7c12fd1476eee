"""Verbs that move models around or describe them: convert, export, download, info."""
from __future__ import annotations

from .common import DTYPES, QUANT_MODES, dtype


def cmd_convert(a) -> None:
    import lmstack
    from ..checkpoint import save_checkpoint
    lm = lmstack.load(a.src, dtype=dtype(a.dtype), quantize=a.quantize, packed=False)
    save_checkpoint(a.out, lm.model, lm.tokenizer)
    quant = f", quantized {a.quantize}" if a.quantize else ""
    print(f"converted {a.src} ({lm.model.num_params():,} parameters{quant}) -> {a.out}")


def cmd_export(a) -> None:
    import lmstack
    from ..errors import LMStackError
    if a.format == "hf" and a.quant:
        raise LMStackError("--quant is for --format gguf; a Hugging Face export keeps the model's dtype")
    lm = lmstack.load(a.model, packed=False)
    if a.format == "gguf":
        from ..convert.gguf_export import export_gguf
        path = export_gguf(lm.model, lm.tokenizer, a.out, quant=a.quant or "f32")
        print(f"exported {a.model} as GGUF ({a.quant or 'f32'}, {path.stat().st_size:,} bytes) -> {a.out}")
        return
    from ..convert.hf import export_hf
    export_hf(lm.model, lm.tokenizer, a.out)
    print(f"exported {a.model} as a Hugging Face model directory -> {a.out}")


def cmd_download(a) -> None:
    from ..convert.hub import download
    print(download(a.repo_id, revision=a.revision, out=a.out, include=a.include))


def cmd_info(a) -> None:
    from ..config import ModelConfig, preset
    if a.preset:
        cfg = preset(a.preset)
    else:
        from ..convert.load import resolve_source
        if resolve_source(a.model) == "lmstack":  # the config alone: no weights loaded
            from ..checkpoint import resolve_checkpoint
            cfg = ModelConfig.load(resolve_checkpoint(a.model) / "config.json")
        else:
            import lmstack
            cfg = lmstack.load(a.model).config
    from ..scaling.memory import STRATEGIES, format_other_arch, format_report, memory_report, other_arch_report
    if cfg.arch != "transformer":  # lstm / gru / gcnn / encoder-decoder: parameters and decoding state only
        rep = other_arch_report(cfg, a.batch_size)
        _print_info(cfg, a, rep, format_other_arch(rep))
        return
    strategies = tuple(s for s in STRATEGIES if s in (a.strategy or STRATEGIES))
    rep = memory_report(cfg, batch_size=a.batch_size, seq_len=a.seq_len, dtype=a.dtype, optimizer=a.optimizer,
                        world_size=a.world_size, strategies=strategies, attention=a.attention,
                        master_weights=a.master_weights, device=a.device)
    _print_info(cfg, a, rep, format_report(rep))


def _print_info(cfg, a, rep: dict, tables: str) -> None:
    from ..config import describe
    if a.json:
        import json
        print(json.dumps(rep, indent=2))
        return
    rows = describe(cfg, a.seq_len)
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print()
    print(tables)


def register(sub) -> None:
    t = sub.add_parser("convert", help="write an lmstack checkpoint from a Hugging Face directory or GGUF file")
    t.add_argument("src")
    t.add_argument("--out", required=True)
    t.add_argument("--dtype", choices=DTYPES)
    t.add_argument("--quantize", choices=list(QUANT_MODES),
                   help="write a quantized checkpoint: int8 per channel, or GGUF blocks q8_0|q4_0|q4_1 (loads packed)")
    t.set_defaults(fn=cmd_convert)

    t = sub.add_parser("export", help="write a model as a Hugging Face directory (transformers can load it) or a "
                       "GGUF file (llama.cpp can load it)")
    t.add_argument("model", help="an lmstack checkpoint, a Hugging Face directory or a GGUF file")
    t.add_argument("--format", choices=["hf", "gguf"], default="hf")
    t.add_argument("--quant", choices=["f32", "f16", "q8_0", "q4_0", "q4_1"],
                   help="GGUF tensor type of the weight matrices (default f32; norms stay f32)")
    t.add_argument("--out", required=True, help="a directory (hf) or a .gguf file (gguf)")
    t.set_defaults(fn=cmd_export)

    t = sub.add_parser("download", help="download a model from the Hugging Face Hub (needs network)")
    t.add_argument("repo_id")
    t.add_argument("--revision")
    t.add_argument("--out", help="target directory (default: the Hugging Face cache)")
    t.add_argument("--include", action="append", help="only files matching this glob (repeatable)")
    t.set_defaults(fn=cmd_download)

    t = sub.add_parser("info", help="parameters, FLOPs per token, training memory per device, KV-cache memory")
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--model")
    g.add_argument("--preset")
    t.add_argument("--seq-len", type=int, help="tokens per sequence (default: the context window)")
    t.add_argument("--batch-size", type=int, default=1, help="micro-batch per device for the activation estimate")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="training precision (bfloat16: autocast over fp32 params, as the Trainer does)")
    t.add_argument("--master-weights", action="store_true",
                   help="with --dtype bfloat16: bf16 params and grads plus a separate fp32 master copy")
    t.add_argument("--optimizer", choices=["adamw", "sgd", "rmsprop", "muon"], default="adamw")
    t.add_argument("--world-size", type=int, default=8, help="devices for the ddp/fsdp columns (default 8)")
    t.add_argument("--strategy", action="append", choices=["none", "ddp", "fsdp"],
                   help="columns to show (repeatable; default all three)")
    t.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                   help="sdpa: flash/memory-efficient kernel, no T x T scores kept; eager: keeps the T x T softmax")
    t.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where it trains: cpu runs attention in fp32 under autocast and short sequences (<= 128 "
                        "queries, 256 under bf16 autocast) as matmul + softmax, keeping the T x T probabilities")
    t.add_argument("--json", action="store_true", help="print everything (describe rows included) as JSON")
    t.set_defaults(fn=cmd_info)
