"""BERT masked-LM: the masking collator (statistics, special tokens, whole words, determinism), `objective: mlm`
pretraining (learns, resumes exactly), BertForMaskedLM load/export parity with transformers, fill-mask parity with
transformers' pipeline, the `fill-mask` CLI verb and its errors."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import make_text, read_jsonl, tiny_run_config
from lmstack.config import ModelConfig
from lmstack.convert.hf import export_hf, load_hf
from lmstack.errors import ConfigError, LMStackError
from lmstack.generate.fill_mask import fill_mask
from lmstack.models import Transformer
from lmstack.tokenizer import EOT, MASK, train_bpe, train_char
from lmstack.train import TrainConfig, pretrain
from lmstack.train.mlm import MLMMasker, make_mlm_evaluator

transformers = pytest.importorskip("transformers")
QUIET = dict(log=lambda *a: None)
TOL = 1e-5


@pytest.fixture(scope="module")
def text() -> str:
    return make_text(400, seed=3)


@pytest.fixture(scope="module")
def char_tok(text):
    return train_char([text], special_tokens=[EOT, MASK])


@pytest.fixture(scope="module")
def bpe_tok(text):
    return train_bpe([text], 300, special_tokens=[EOT, MASK])


def _stream(tok, text: str, rows: int, T: int, seed: int = 0) -> np.ndarray:
    """(rows, T) windows of the tokenized text with EOS (special) sprinkled in."""
    ids = np.array(tok.encode(text), dtype=np.int64)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - T, size=rows)
    out = np.stack([ids[s:s + T] for s in starts])
    out[rng.random(out.shape) < 0.03] = tok.eos_id
    return out


# ---- the masking collator -----------------------------------------------------------------------------------
def test_masking_statistics_and_special_tokens(char_tok, text):
    m = MLMMasker(char_tok, 0.15)
    ids = _stream(char_tok, text, 96, 512)
    x, y = m(ids, [(7, 0, r) for r in range(len(ids))])
    x, y = x.numpy(), y.numpy()
    special = np.isin(ids, sorted(char_tok.special_ids))
    assert special.sum() > 1000
    chosen = y != -100
    assert np.array_equal(y[chosen], ids[chosen])          # labels: the original token where chosen ...
    assert np.all(x[~chosen] == ids[~chosen])              # ... inputs untouched elsewhere
    assert not chosen[special].any()                       # special tokens are never chosen
    assert abs(chosen[~special].mean() - 0.15) < 0.006     # 15% of the ~48k ordinary tokens
    masked = x[chosen] == char_tok.mask_id
    replaced = (x[chosen] != ids[chosen]) & ~masked
    kept = x[chosen] == ids[chosen]
    n = chosen.sum()
    assert abs(masked.mean() - 0.8) < 0.015
    assert abs(replaced.mean() - 0.1) < 0.012
    assert abs(kept.mean() - 0.1) < 0.012
    assert masked.sum() + replaced.sum() + kept.sum() == n
    rand = x[chosen][replaced]
    assert not np.isin(rand, sorted(char_tok.special_ids | {char_tok.mask_id})).any()  # random tokens: not special
    assert len(np.unique(rand)) > 30                       # ... drawn from the whole vocabulary


def test_every_window_predicts_something(char_tok):
    m = MLMMasker(char_tok, 0.01)
    ids = np.full((50, 4), char_tok.encode("a")[0])
    ids[:, 0] = char_tok.eos_id
    _, y = m(ids, [(0, 0, r) for r in range(50)])
    assert ((y != -100).sum(1) >= 1).all()
    assert (y[:, 0] == -100).all()  # the special token still is not


def test_masks_are_a_pure_function_of_seed_step_row(char_tok, text):
    m = MLMMasker(char_tok, 0.15)
    ids = _stream(char_tok, text, 6, 64)
    keys = [(1, 5, r) for r in range(6)]
    a, b = m(ids, keys), m(ids, keys)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    part = m(ids[2:4], keys[2:4])  # a row's mask does not depend on the other rows (any world size, any micro-step)
    assert torch.equal(part[0], a[0][2:4]) and torch.equal(part[1], a[1][2:4])
    other = m(ids, [(1, 6, r) for r in range(6)])  # another step: another mask
    assert not torch.equal(other[1], a[1])


def _words_of(tok, m: MLMMasker, ids: np.ndarray) -> list[str]:
    """The alphabetic words the masker's word ids group the tokens into (punctuation/space-only groups dropped)."""
    w = m.word_ids(ids[None])[0]
    groups: dict[int, list[int]] = {}
    for i, wid in enumerate(w):
        groups.setdefault(int(wid), []).append(int(ids[i]))
    return [s for g in groups.values() if (s := tok.decode(g).strip(" \n.!?,;"))]


def test_whole_word_boundaries_byte_level_bpe(bpe_tok, text):
    m = MLMMasker(bpe_tok, 0.15, whole_word=True)
    sample = "The quickbrown fox, jumps!\nOver lazydog and cat."
    ids = np.array(bpe_tok.encode(sample))
    assert len(ids) > len(re.findall(r"[A-Za-z]+", sample))  # some words take several tokens
    assert _words_of(bpe_tok, m, ids) == re.findall(r"[A-Za-z]+", sample)


def test_whole_word_boundaries_wordpiece(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "walk", "dog", "##ing", "##s", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tok")
    from lmstack.tokenizer import Tokenizer
    tok = Tokenizer.load(tmp_path / "tok")
    ids = np.array(tok.encode("the walking dogs.", add_special_tokens=True))
    assert [tok.hf.id_to_token(int(i)) for i in ids] == ["[CLS]", "the", "walk", "##ing", "dog", "##s", ".", "[SEP]"]
    m = MLMMasker(tok, 0.15, whole_word=True)
    assert m.word_ids(ids[None])[0].tolist() == [0, 1, 2, 2, 3, 3, 4, 5]


def test_whole_word_masking_masks_whole_words(bpe_tok, text):
    m = MLMMasker(bpe_tok, 0.15, whole_word=True)
    ids = _stream(bpe_tok, text, 64, 256, seed=1)
    _, y = m(ids, [(3, 0, r) for r in range(len(ids))])
    chosen = (y != -100).numpy()
    words = m.word_ids(ids)
    multi = 0
    for r in range(len(ids)):
        for wid in np.unique(words[r]):
            sel = words[r] == wid
            assert chosen[r, sel].all() or not chosen[r, sel].any()  # all of a word's tokens, or none
            multi += int(chosen[r, sel].all() and sel.sum() > 1)
    assert multi > 100  # and multi-token words do get chosen
    special = np.isin(ids, sorted(bpe_tok.special_ids))
    assert not chosen[special].any()
    assert abs(chosen[~special].mean() - 0.15) < 0.03
    # token-level masking of the same windows splits words
    _, y_tok = MLMMasker(bpe_tok, 0.15)(ids, [(3, 0, r) for r in range(len(ids))])
    ct = (y_tok != -100).numpy()
    assert any(ct[r, words[r] == w].any() and not ct[r, words[r] == w].all()
               for r in range(len(ids)) for w in np.unique(words[r]))


def test_no_mask_token_is_a_clear_error(text):
    tok = train_char([text])
    with pytest.raises(LMStackError, match=r"mask token \(\[MASK\] or <mask>\)"):
        MLMMasker(tok)


# ---- objective: mlm ------------------------------------------------------------------------------------------
MLM_MODEL = {"preset": "tiny-char", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "dropout": 0.0,
             "norm_position": "post", "embedding_norm": True, "type_vocab_size": 2}


def _mlm_cfg(out, corpus, **over) -> TrainConfig:
    d = dict(objective="mlm", batch_size=16, lr=3e-3, max_steps=150, eval_interval=75, eval_iters=4,
             final_eval_windows=8, model=dict(MLM_MODEL))
    d.update(over)
    return tiny_run_config(out, corpus, **d)


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, text):
    d = tmp_path_factory.mktemp("mlm")
    (d / "c.txt").write_text(text)
    cfg = _mlm_cfg(d / "run", d / "c.txt")
    summary = pretrain(cfg, **QUIET)
    return d, cfg, summary


def test_mlm_pretraining_learns(mlm_run):
    from lmstack.checkpoint import load_model
    from lmstack.data.shards import TokenDataset
    from lmstack.models.utils import make_model
    d, cfg, summary = mlm_run
    ds = TokenDataset(d / "run" / "data")
    tok = ds.tokenizer
    assert tok.mask_token == MASK and tok.mask_id in tok.special_ids  # lmstack's tokenizer got a [MASK] token
    model = load_model(d / "run" / "last")[0].eval()
    assert not model.config.causal and model.config.mlm_head
    torch.manual_seed(cfg.seed)
    init = make_model(model.config).eval()  # the same initial weights as the run
    ev = make_mlm_evaluator(ds, 32, 16, cfg.seed, MLMMasker(tok))
    before, after = ev(init, iters=4), ev(model, iters=4)
    assert before["val_tokens"] == after["val_tokens"] > 200  # fixed windows and masks
    assert after["val_loss"] < before["val_loss"] - 1.5
    assert after["val_acc"] > before["val_acc"] + 0.1
    rows = [r for r in read_jsonl(d / "run" / "metrics.jsonl") if "val_acc" in r]
    assert [r["step"] for r in rows] == [75, 150]
    assert summary["final_val_acc"] > 0.1 and "sample" not in summary
    res = fill_mask(model, tok, "the quick brown fox j[MASK]mps", top_k=3)  # an lmstack MLM run fills masks
    assert len(res) == 1 and len(res[0]) == 3 and res[0][0]["score"] >= res[0][1]["score"]


def test_mlm_resumes_exactly(mlm_run, tmp_path):
    from safetensors.torch import load_file
    d, _, _ = mlm_run
    common = dict(data_dir=str(d / "run" / "data"), max_steps=12, decay_steps=12, eval_interval=6,
                  final_eval_windows=0, whole_word_masking=True)
    pretrain(_mlm_cfg(tmp_path / "a", "unused", **common), **QUIET)
    pretrain(_mlm_cfg(tmp_path / "b", "unused", **{**common, "max_steps": 6}), **QUIET)
    pretrain(_mlm_cfg(tmp_path / "b", "unused", **{**common, "resume": True}), **QUIET)
    a, b = load_file(str(tmp_path / "a/last/model.safetensors")), load_file(str(tmp_path / "b/last/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [r["train_loss"] for r in read_jsonl(tmp_path / "a/metrics.jsonl") if "train_loss" in r]
    lb = [r["train_loss"] for r in read_jsonl(tmp_path / "b/metrics.jsonl") if "train_loss" in r]
    assert la == lb and len(la) == 12


def test_mlm_tokenizers_get_a_mask_token(tmp_path, text):
    from lmstack.train.pretrain import build_tokenizer
    (tmp_path / "c.txt").write_text(text)
    common = dict(corpus=str(tmp_path / "c.txt"), vocab_size=300)
    tok = build_tokenizer(TrainConfig(objective="mlm", tokenizer="bpe", **common))
    assert tok.mask_token == MASK and tok.mask_id in tok.special_ids and tok.eos_token == EOT
    ids = tok.encode("the quick [MASK] fox")
    k = ids.index(tok.mask_id)
    assert tok.decode(ids[:k]) == "the quick" and tok.decode(ids[k + 1:]) == " fox"  # [MASK] takes the space before
    assert build_tokenizer(TrainConfig(objective="mlm", tokenizer="char", **common)).mask_token == MASK
    assert build_tokenizer(TrainConfig(tokenizer="bpe", **common)).mask_token is None  # clm: unchanged


def test_mlm_config_errors(mlm_run, tmp_path, text):
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(objective="mlmx")
    with pytest.raises(ConfigError, match="mlm_probability"):
        TrainConfig(objective="mlm", mlm_probability=0.0)
    d, _, _ = mlm_run
    with pytest.raises(ConfigError, match="causal: false"):
        pretrain(_mlm_cfg(tmp_path / "c", "unused", data_dir=str(d / "run" / "data"),
                          model={**MLM_MODEL, "causal": True}), **QUIET)
    train_char([text]).save(tmp_path / "nomask")  # an existing tokenizer without a mask token
    (tmp_path / "c.txt").write_text(text)
    with pytest.raises(LMStackError, match="needs a tokenizer with a mask token"):
        pretrain(_mlm_cfg(tmp_path / "e", tmp_path / "c.txt", tokenizer=str(tmp_path / "nomask")), **QUIET)


# ---- Hugging Face BertForMaskedLM ----------------------------------------------------------------------------
def _bert_mlm(vocab_size: int = 300, tie: bool = True, seed: int = 0, noise: float = 0.05):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2,
                                  tie_word_embeddings=tie)
    m = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * noise)
    return m


@pytest.mark.parametrize("tie", [True, False])
def test_bert_mlm_load_and_export_parity(tmp_path, tie):
    hf = _bert_mlm(tie=tie)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_hf(tmp_path / "hf")
    assert model.config.mlm_head and model.config.tie_embeddings == tie
    used = [p for n, p in hf.named_parameters() if tie or n != "cls.predictions.bias"]  # untied: the decoder's bias
    assert model.num_params() == model.config.num_params() == sum(p.numel() for p in used)
    x = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        out = model(x)
    assert (ref - out).abs().max().item() <= TOL
    export_hf(model, None, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForMaskedLM"] and cfg["model_type"] == "bert"
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert names == set(f.keys())  # the same weight names transformers writes
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, ref)


def test_lmstack_mlm_model_exports_as_bert(tmp_path):
    """An lmstack encoder (here without token-type embeddings) exports as a BertForMaskedLM computing the same."""
    cfg = ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32, causal=False,
                      norm_position="post", embedding_norm=True, mlm_head=True, norm_eps=1e-12)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf(model, None, tmp_path)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - model(x)).abs().max().item() <= TOL
    plain = Transformer(ModelConfig(**{**cfg.to_dict(), "mlm_head": False})).eval()  # no MLM head: a BertModel
    export_hf(plain, None, tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["architectures"] == ["BertModel"]
    enc = transformers.AutoModel.from_pretrained(tmp_path / "enc").eval()
    with torch.no_grad():
        assert (enc(input_ids=x).last_hidden_state - plain(x, return_hidden=True)).abs().max().item() <= TOL
    with pytest.raises(LMStackError, match="no Hugging Face equivalent"):  # a pre-norm encoder has none
        export_hf(Transformer(ModelConfig(**{**cfg.to_dict(), "norm_position": "pre"})), None, tmp_path / "x")


# ---- fill-mask -----------------------------------------------------------------------------------------------
WORDS = ("the capital of france is paris rome london a an city country big small river old new and , . ! ? "
         "##s ##ing ##ed").split()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bertmlm")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab=str(d / "vocab.txt"))
    hf = _bert_mlm(vocab_size=len(vocab), seed=4, noise=0.5)  # distinct probabilities: a stable top-5
    hf.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _pipeline_results(path, text, top_k=5):
    pipe = transformers.pipeline("fill-mask", model=str(path), tokenizer=str(path), device="cpu")
    return pipe(text, top_k=top_k)


def _assert_same(ours: list[dict], ref: list[dict]) -> None:
    assert [r["token"] for r in ours] == [r["token"] for r in ref]
    assert [r["token_str"] for r in ours] == [r["token_str"] for r in ref]
    assert [r["sequence"] for r in ours] == [r["sequence"] for r in ref]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(ours, ref)) <= TOL


@pytest.mark.parametrize("text", ["The capital of France is [MASK].", "[MASK] city, a big river!"])
def test_fill_mask_matches_transformers_pipeline(bert_dir, tmp_path, text):
    import lmstack
    ref = _pipeline_results(bert_dir, text)
    lm = lmstack.load(bert_dir)
    ours = fill_mask(lm.model, lm.tokenizer, text, top_k=5)
    assert len(ours) == 1 and len(ours[0]) == 5
    _assert_same(ours[0], ref)
    export_hf(lm.model, lm.tokenizer, tmp_path / "exp")  # and the exported directory runs in the pipeline
    _assert_same(ours[0], _pipeline_results(tmp_path / "exp", text))


def test_fill_mask_several_masks_and_errors(bert_dir, text):
    import lmstack
    lm = lmstack.load(bert_dir)
    two = fill_mask(lm.model, lm.tokenizer, "the [MASK] of france is [MASK].", top_k=2)
    assert len(two) == 2 and all(len(r) == 2 for r in two)
    assert "[MASK]" in two[0][0]["sequence"]  # the other mask stays in the sequence (as the pipeline does)
    with pytest.raises(LMStackError, match=r"has no \[MASK\] token"):
        fill_mask(lm.model, lm.tokenizer, "the capital of france is paris.")
    with pytest.raises(LMStackError, match="no mask token"):
        fill_mask(lm.model, train_char([text]), "a [MASK] b")
    decoder = Transformer(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(LMStackError, match="causal decoder"):
        fill_mask(decoder, lm.tokenizer, "the [MASK].")


def test_fill_mask_cli(bert_dir, capsys):
    import lmstack
    from lmstack.cli import main
    assert main(["fill-mask", "--model", str(bert_dir), "The capital of France is [MASK].", "--top-k", "3",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    lm = lmstack.load(bert_dir)
    assert got == fill_mask(lm.model, lm.tokenizer, "The capital of France is [MASK].", top_k=3)
    assert main(["fill-mask", "--model", str(bert_dir), "The capital of France is [MASK]."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    for line, r in zip(lines, fill_mask(lm.model, lm.tokenizer, "The capital of France is [MASK].", top_k=5)[0]):
        assert line.split()[0] == f"{r['score']:.4f}" and repr(r["token_str"]) in line and r["sequence"] in line
    assert main(["fill-mask", "--model", str(bert_dir), "no mask here"]) == 2
    assert "has no [MASK] token" in capsys.readouterr().err
