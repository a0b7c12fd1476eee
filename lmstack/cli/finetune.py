"""Verbs: finetune (SFT, full or LoRA), merge-lora."""
from __future__ import annotations


def cmd_finetune(a) -> None:
    from ..train.sft import cli_finetune
    cli_finetune(a)


def cmd_merge_lora(a) -> None:
    from ..train.sft import cli_merge_lora
    cli_merge_lora(a)


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
    t = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model: a plain checkpoint")
    t.add_argument("--model", required=True, help="the base model the adapter was trained on")
    t.add_argument("--adapter", required=True, help="adapter dir (<finetune out>/adapter, or a LoRA run's last/)")
    t.add_argument("--out", required=True, help="where to write the merged checkpoint")
    t.add_argument("--no-check", action="store_true", help="skip the logits comparison")
    t.set_defaults(fn=cmd_merge_lora)
