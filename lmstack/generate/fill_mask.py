"""Fill-mask: the most likely tokens at each mask position of a text, from a masked-LM model (BERT with its MLM head,
or an lmstack `objective: mlm` run). The same results as transformers' `pipeline("fill-mask")`: the text is encoded
with the tokenizer's special tokens ([CLS] ... [SEP]), one bidirectional forward pass, a softmax over the
vocabulary at each mask position, the top k."""
from __future__ import annotations

import torch

from ..errors import LMStackError
from ..models.utils import eval_mode
from ..tokenizer import MASK, Tokenizer


@torch.no_grad()
def fill_mask(model, tokenizer: Tokenizer, text: str, top_k: int = 5) -> list[list[dict]]:
    """One list per mask token in `text` (in order) of `top_k` dicts, most likely first:
    {"score": probability, "token": id, "token_str": the token decoded, "sequence": the text with it filled in}
    (transformers' fill-mask pipeline fields; `sequence` skips special tokens when there is one mask, and keeps the
    other masks when there are several).

    The mask token is the tokenizer's ([MASK] or <mask>); a literal "[MASK]" in `text` also works with a
    tokenizer whose mask token is <mask>. Probabilities are over the tokenizer's vocabulary (a model's padded
    vocabulary rows are left out)."""
    mask = tokenizer.mask_token
    if mask is None:
        raise LMStackError("this tokenizer has no mask token ([MASK] or <mask>), so the model cannot fill masks; "
                           "use a masked-LM model (BERT, or an lmstack run with objective: mlm)")
    if model.config.causal:
        raise LMStackError("fill-mask needs a bidirectional masked-LM model (BERT, or objective: mlm); this model "
                           "is a causal decoder")
    if top_k < 1:
        raise LMStackError(f"top_k must be at least 1, got {top_k}")
    if mask != MASK:
        text = text.replace(MASK, mask)
    ids = tokenizer.encode(text, add_special_tokens=True)
    mask_id = tokenizer.mask_id
    where = [i for i, t in enumerate(ids) if t == mask_id]
    if not where:
        raise LMStackError(f"the text has no {mask} token; put {mask} where the word to predict goes, e.g. "
                           f"\"The capital of France is {mask}.\"")
    if len(ids) > model.config.block_size:
        raise LMStackError(f"the text is {len(ids)} tokens long, more than the model's context window "
                           f"({model.config.block_size}); shorten it")
    device = next(model.parameters()).device
    with eval_mode(model):
        logits = model(torch.tensor([ids], device=device))[0, where].float()
    probs = logits[:, :min(tokenizer.vocab_size, logits.shape[-1])].softmax(dim=-1)
    values, preds = probs.topk(min(top_k, probs.shape[-1]))
    single, pad = len(where) == 1, tokenizer.pad_id
    out = []
    for pos, vs, ps in zip(where, values.tolist(), preds.tolist()):
        row = []
        for v, p in zip(vs, ps):
            filled = list(ids)
            filled[pos] = p
            filled = [t for t in filled if t != pad]
            row.append({"score": v, "token": p, "token_str": tokenizer.decode([p]),
                        "sequence": tokenizer.decode(filled, skip_special_tokens=single)})
        out.append(row)
    return out
