"""Verb: translate (sequence-to-sequence generation with an encoder-decoder: beam search, batched)."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import dtype


def resolve_model_dir(path: str) -> str:
    """A run directory (with best/ or last/) -> its best checkpoint, else last; anything else as given."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists():
        for name in ("best", "last"):
            if (p / name / "config.json").exists():
                return str(p / name)
    return path


def cmd_translate(a) -> None:
    import lmstack
    path = resolve_model_dir(a.model)
    lm = lmstack.load(path, dtype=dtype(a.dtype))
    if a.input == "-":
        lines = [line.rstrip("\n") for line in sys.stdin]
    else:
        from ..data.parallel import read_lines
        lines = read_lines(a.input)
    outs = lm.translate(lines, num_beams=a.num_beams, length_penalty=a.length_penalty,
                        max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, truncate=a.truncate)
    text = "".join(o + "\n" for o in outs)
    if a.output:
        from ..atomic import write_text
        write_text(a.output, text)
    else:
        sys.stdout.write(text)
    if a.reference:
        from ..data.parallel import read_lines
        from ..errors import LMStackError
        try:
            import sacrebleu
        except ImportError:
            raise LMStackError("--reference scores with sacreBLEU: pip install 'lmstack[seq2seq]'") from None
        refs = read_lines(a.reference)
        if len(refs) != len(outs):
            raise LMStackError(f"{a.reference} has {len(refs)} lines for {len(outs)} translations")
        bleu = sacrebleu.BLEU()  # 13a tokenisation
        cased = bleu.corpus_score(outs, [refs])
        lc = sacrebleu.BLEU(lowercase=True).corpus_score(outs, [refs])
        print(f"sacreBLEU cased {cased.score:.2f}  lowercased {lc.score:.2f}  ({cased}; {bleu.get_signature()})",
              file=sys.stderr)


def register(sub) -> None:
    t = sub.add_parser("translate", help="translate a file line by line with an encoder-decoder (objective: seq2seq)")
    t.add_argument("--model", required=True, help="an encoder-decoder checkpoint (or a run directory: its best/)")
    t.add_argument("--input", required=True, help="source sentences, one per line (.gz ok; - for stdin)")
    t.add_argument("--output", help="write the translations here (default stdout)")
    t.add_argument("--num-beams", type=int, default=5, help="beam size (1 = greedy)")
    t.add_argument("--length-penalty", type=float, default=1.0,
                   help="hypothesis score = sum logprob / length ** length_penalty (as transformers)")
    t.add_argument("--max-new-tokens", type=int, help="default: 2 * source length + 10")
    t.add_argument("--batch-size", type=int, default=32, help="sources decoded together")
    t.add_argument("--reference", help="reference translations: print sacreBLEU (cased and -lc) to stderr")
    t.add_argument("--truncate", action="store_true", help="cut sources longer than the encoder's context (default: "
                   "an error naming them)")
    t.add_argument("--dtype", choices=["float32", "bfloat16"])
    t.set_defaults(fn=cmd_translate)
