"""Verbs: finetune (SFT, full or LoRA), merge-lora. Thin: parse, build the config, call lmstack.train.sft, print."""
from __future__ import annotations

import json

from ..errors import LMStackError


def cmd_finetune(a) -> None:
    from ..train.sft import finetune, sft_config
    fields = {k: getattr(a, k) for k in ("epochs", "max_steps", "lr", "batch_size", "grad_accum")
              if getattr(a, k) is not None}
    if a.resume:
        fields["resume"] = True
    if a.no_progress:
        fields["progress"] = False
    cfg = sft_config(a.out, a.lora is not None, a.set, a.recipe, **fields)
    summary = finetune(a.model, a.data, lora=a.lora, cfg=cfg, seq_len=a.seq_len, pack=a.pack,
                       val_data=a.val_data, val_fraction=a.val_fraction, merge=not a.no_merge,
                       max_records=a.max_records)
    print(json.dumps(summary, indent=2))


def cmd_merge_lora(a) -> None:
    from ..train.sft import merge_adapter
    if a.run is None and a.adapter is None:
        raise LMStackError("merge-lora: give a LoRA run directory (`lmstack merge-lora RUN_DIR --out DIR`) or "
                           "--adapter DIR (and optionally --model BASE)")
    if a.run is not None and a.adapter is not None:
        raise LMStackError("merge-lora: give a run directory or --adapter, not both")
    res = merge_adapter(a.model, a.adapter, a.out, check=not a.no_check, run=a.run)
    print(json.dumps(res, indent=2))


def register(sub) -> None:
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
    t.set_defaults(fn=cmd_finetune)
    t = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model: a plain checkpoint",
                       description="lmstack merge-lora RUN_DIR --out DIR (any LoRA run: finetune, dpo, ppo; the "
                                   "base model is the one the run recorded), or --adapter DIR [--model BASE].")
    t.add_argument("run", nargs="?", help="a LoRA run directory (its last/ checkpoint is merged onto the base "
                                          "model it records)")
    t.add_argument("--model", help="the base model the adapter was trained on (default: the one it records)")
    t.add_argument("--adapter", help="adapter dir (<finetune out>/adapter, or a LoRA run's last/)")
    t.add_argument("--out", required=True, help="where to write the merged checkpoint")
    t.add_argument("--no-check", action="store_true", help="skip the logits comparison")
    t.set_defaults(fn=cmd_merge_lora)
