"""Verbs: tokenizer train, prepare, train (pretraining from a recipe), demo-data, plot."""
from __future__ import annotations

import json

CORPUS_HELP = ("pydocs | stdlib | shakespeare | file/dir/glob (.txt .md .jsonl .parquet .arrow .feather .csv) | "
               "hf:NAME[:CONFIG][:SPLIT]; options after '#', e.g. 'data/*.parquet#text_column=content'")


def cmd_tokenizer_train(a) -> None:
    from ..data.corpora import iter_texts
    from ..tokenizer import train_bpe, train_char
    texts = iter_texts(a.corpus, a.data_path, a.text_column)
    specials = [t for t in (a.special_tokens or "").split(",") if t] or None
    kw = dict(special_tokens=specials, bos_token=a.bos_token, pad_token=a.pad_token)
    tok = train_char(texts, **kw) if a.type == "char" else train_bpe(texts, a.vocab_size, **kw)
    tok.save(a.out)
    print(f"trained {a.type} tokenizer with {tok.vocab_size} tokens -> {a.out}/tokenizer.json")


def cmd_prepare(a) -> None:
    from ..data.shards import TokenDataset, prepare_dataset
    from ..tokenizer import Tokenizer
    tok = Tokenizer.load(a.tokenizer)
    prepare_dataset(a.corpus, tok, a.out, a.val_fraction, a.data_path, workers=a.workers,
                    text_column=a.text_column)
    ds = TokenDataset(a.out)
    print(f"{ds.num_tokens('train'):,} train + {ds.num_tokens('val'):,} val tokens ({ds.meta['dtype']}) -> {a.out}")


def cmd_train(a) -> None:
    from ..train import load_recipe, pretrain
    overrides = list(a.set or [])
    if a.out_dir:
        overrides.append(f"out_dir={a.out_dir}")
    if a.resume:
        overrides.append("resume=true")
    if a.no_progress:
        overrides.append("progress=false")
    cfg = load_recipe(a.recipe, overrides)
    if cfg.objective == "seq2seq":  # encoder-decoder on parallel text (train/seq2seq.py)
        from ..train.seq2seq import train_seq2seq
        summary = train_seq2seq(cfg)
    else:
        summary = pretrain(cfg)
    sample = summary.pop("sample", None)
    print(json.dumps(summary, indent=2) if a.json else summary_table(summary))
    if sample is not None:
        print("---- sample ----")
        print(sample)


def summary_table(summary: dict) -> str:
    """The end-of-run summary as aligned `key  value` lines (the final whole-split eval where it ran)."""
    def num(key: str, fmt: str = "{:.4f}") -> str | None:
        v = summary.get(key)
        return None if v is None else fmt.format(v)

    def first(*keys: str) -> str | None:
        return next((v for v in map(num, keys) if v is not None), None)

    elapsed = summary.get("elapsed_s")
    rows = [("steps", num("steps", "{:,}")), ("params", num("params", "{:,}")),
            ("train loss", num("train_loss")),
            ("val loss", first("final_val_loss", "val_loss")), ("val bpb", first("final_val_bpb", "val_bpb")),
            ("val acc", first("final_val_acc", "val_acc")),  # objective: mlm (masked-token accuracy)
            ("val tokens", num("final_val_tokens", "{:,}")),
            ("elapsed", None if elapsed is None else f"{elapsed // 60:.0f} min {elapsed % 60:.0f} s"),
            ("out dir", summary.get("out_dir")), ("plot", summary.get("plot"))]
    rows = [(k, str(v)) for k, v in rows if v is not None]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_demo_data(a) -> None:
    from ..data.synthetic import write_tour_data
    files = write_tour_data(a.out, n_sft=a.sft, n_prompts=a.prompts, n_votes=a.votes, seed=a.seed, n_arith=a.arith)
    for kind, path in files.items():
        print(f"{kind}: {path}")


def cmd_plot(a) -> None:
    from ..train.plot import plot_run
    print(plot_run(a.run_dir, a.out))


def register(sub) -> None:
    tk = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tverb", required=True)
    t = tk.add_parser("train", help="train a byte-level BPE or char-level tokenizer")
    t.add_argument("--corpus", default="pydocs", help=CORPUS_HELP)
    t.add_argument("--data-path", help="local file for a named corpus")
    t.add_argument("--text-column", help="text column of table / hf: / .jsonl corpora (default text)")
    t.add_argument("--type", choices=["bpe", "char"], default="bpe")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--special-tokens", default="<|endoftext|>",
                   help="comma-separated special tokens; the first is EOS (default <|endoftext|>)")
    t.add_argument("--bos-token", help="BOS token (added to the specials if missing)")
    t.add_argument("--pad-token", help="padding token (added to the specials if missing)")
    t.add_argument("--out", required=True, help="output directory (tokenizer.json)")
    t.set_defaults(fn=cmd_tokenizer_train)

    t = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped shards with a train/val split")
    t.add_argument("--corpus", default="pydocs", help=CORPUS_HELP)
    t.add_argument("--data-path")
    t.add_argument("--tokenizer", required=True, help="tokenizer.json or a directory holding it")
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--text-column", help="text column of table / hf: / .jsonl corpora (default text)")
    t.add_argument("--workers", type=int, help="tokenizer processes (default min(4, CPUs))")
    t.add_argument("--out", required=True)
    t.set_defaults(fn=cmd_prepare)

    t = sub.add_parser("train", help="pretrain from a YAML recipe")
    t.add_argument("recipe", help="recipes/*.yaml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable; "
                   "model.n_layer=6 for nested keys)")
    t.add_argument("--out-dir")
    t.add_argument("--resume", action="store_true", help="continue from <out_dir>/last")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true", help="print the end-of-run summary as JSON instead of a table")
    t.set_defaults(fn=cmd_train)

    t = sub.add_parser("demo-data", help="small generated data sets with checkable answers for the fine-tune -> "
                                         "feedback -> reward -> DPO -> PPO -> GRPO tour (sft.jsonl, prompts.txt, votes.jsonl, "
                                         "arith-{train,test}.jsonl)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--sft", type=int, default=200, help="instruction records in sft.jsonl")
    t.add_argument("--prompts", type=int, default=32, help="prompts in prompts.txt")
    t.add_argument("--votes", type=int, default=64, help="simulated votes in votes.jsonl (prefer 'cat')")
    t.add_argument("--arith", type=int, default=200, help="GRPO prompts of 2-digit arithmetic in arith-train.jsonl "
                   "(+ a quarter as many in arith-test.jsonl, disjoint); 0: none")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_demo_data)

    t = sub.add_parser("plot", help="write the loss-curve PNG of a run")
    t.add_argument("run_dir")
    t.add_argument("--out")
    t.set_defaults(fn=cmd_plot)
