"""The encoder-decoder Transformer (models/seq2seq.py): causality, the decoder cache (self-attention KV + cached
cross-attention K/V), padding, checkpoints through lmstack.load, objective: seq2seq on the one Trainer (exact resume),
parallel data, batched beam search (parity with transformers' BART), `lmstack translate`."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

from conftest import read_jsonl
from lmstack.config import ModelConfig
from lmstack.errors import LMStackError
from lmstack.generate.seq2seq import seq2seq_beam_search, seq2seq_greedy, translate
from lmstack.models.seq2seq import Seq2SeqTransformer
from lmstack.models.utils import make_model

QUIET = dict(log=lambda *a: None)
VARIANTS = {
    "pre-sinusoidal-shared": dict(pos_emb="sinusoidal", scale_embedding=True),
    "post-learned-separate": dict(pos_emb="learned", norm_position="post", embedding_norm=True, src_vocab_size=37),
    "pre-rope-untied": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
}


def tiny(**kw) -> Seq2SeqTransformer:
    base = dict(arch="encoder-decoder", vocab_size=53, n_layer=2, n_encoder_layer=3, n_head=4, n_embd=32,
                block_size=40, eos_token_id=1, bos_token_id=2, pad_token_id=0, init_std=0.1)
    torch.manual_seed(0)
    return make_model(ModelConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoder_is_causal(variant):
    m = tiny(**VARIANTS[variant])
    src = torch.randint(3, 37, (2, 7))
    tgt = torch.randint(3, 53, (2, 10))
    with torch.no_grad():
        a = m(src, tgt)
        for j in (9, 5, 1):
            t2 = tgt.clone()
            t2[:, j:] = torch.randint(3, 53, t2[:, j:].shape)
            b = m(src, t2)
            assert torch.equal(a[:, :j], b[:, :j])  # positions before j never see the changed tokens
            assert not torch.allclose(a[:, j:], b[:, j:])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_equals_full_forward(variant):
    m = tiny(**VARIANTS[variant])
    src = torch.randint(3, 37, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 3:] = False
    tgt = torch.randint(3, 53, (3, 12))
    with torch.no_grad():
        full = m(src, tgt, mask)
        memory = m.encode(src, mask)
        cache = m.new_decoder_cache(3, 16, mask)
        steps = [m.decode(tgt[:, :4], memory, mask, cache=cache, pos=0)]
        assert all(k is not None for k in cache.cross_k)  # cross K/V computed on the first call ...
        kept = [k.clone() for k in cache.cross_k]
        for t in range(4, 12):  # ... and read from the cache after it (no memory passed)
            steps.append(m.decode(tgt[:, t:t + 1], None, cache=cache, pos=t))
        assert all(torch.equal(a, b) for a, b in zip(kept, cache.cross_k))
    assert (full - torch.cat(steps, 1)).abs().max() <= 1e-5
    sources = [src[i, :int(mask[i].sum())].tolist() for i in range(3)]
    assert seq2seq_greedy(m, sources, 12) == seq2seq_greedy(m, sources, 12, use_cache=False)


def test_source_padding_does_not_change_results():
    m = tiny()
    a = torch.randint(3, 53, (1, 9))
    b = torch.randint(3, 53, (1, 4))
    src = torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.long)], 1)])
    mask = src != 0
    tgt = torch.randint(3, 53, (2, 6))
    with torch.no_grad():
        batched = m(src, tgt, mask)
        alone = m(b, tgt[1:])
    assert (batched[1] - alone[0]).abs().max() <= 1e-5
    # batched beam search: a padded source gets the hypotheses it gets alone
    together = seq2seq_beam_search(m, [a[0].tolist(), b[0].tolist()], num_beams=3, max_new_tokens=8)
    single = seq2seq_beam_search(m, [b[0].tolist()], num_beams=3, max_new_tokens=8)
    assert together[1][0].tokens == single[0][0].tokens
    assert abs(together[1][0].score - single[0][0].score) <= 1e-5


def test_shared_embeddings_are_one_tensor_and_checkpoint_round_trips(tmp_path):
    import lmstack
    from lmstack.checkpoint import save_checkpoint
    from lmstack.tokenizer import train_char
    m = tiny()
    assert m.encoder.tok_emb.weight is m.decoder.tok_emb.weight is m.decoder.lm_head.weight
    assert m.num_params() == m.config.num_params()
    sep = tiny(**VARIANTS["post-learned-separate"])
    assert sep.encoder.tok_emb.weight.shape[0] == 37 and sep.num_params() == sep.config.num_params()
    tok = train_char(["abc def"], bos_token="<s>", pad_token="<pad>")
    for name, model in (("shared", m), ("separate", sep)):
        save_checkpoint(tmp_path / name, model, tok)
        lm = lmstack.load(tmp_path / name)
        assert isinstance(lm.model, Seq2SeqTransformer)
        src, tgt = torch.randint(3, 37, (2, 5)), torch.randint(3, 53, (2, 4))
        with torch.no_grad():
            assert torch.equal(model(src, tgt), lm.model(src, tgt))
    loaded = lmstack.load(tmp_path / "shared").model  # the ties survive loading (one tensor, stored once)
    assert loaded.encoder.tok_emb.weight is loaded.decoder.tok_emb.weight is loaded.decoder.lm_head.weight


# ---- parallel data --------------------------------------------------------------------------------------------
def test_parallel_files_gz_and_jsonl(tmp_path):
    from lmstack.data.parallel import load_pairs, token_batches
    import numpy as np
    with gzip.open(tmp_path / "a.de.gz", "wt") as f:
        f.write("eins\nzwei\n")
    (tmp_path / "a.en").write_text("one\ntwo\n")
    assert load_pairs(tmp_path / "a.de.gz", tmp_path / "a.en") == [("eins", "one"), ("zwei", "two")]
    (tmp_path / "p.jsonl").write_text(json.dumps({"src": "drei", "tgt": "three"}) + "\n")
    assert load_pairs(tmp_path / "p.jsonl") == [("drei", "three")]
    (tmp_path / "b.en").write_text("one\n")
    with pytest.raises(LMStackError, match="line-aligned"):
        load_pairs(tmp_path / "a.de.gz", tmp_path / "b.en")
    lengths = np.random.default_rng(0).integers(2, 30, size=500)
    batches = token_batches(lengths, 200, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(500))  # every pair once per epoch
    assert all(len(b) * max(lengths[i] for i in b) <= 200 for b in batches)
    assert batches == token_batches(lengths, 200, seed=3, epoch=0) != token_batches(lengths, 200, seed=3, epoch=1)


# ---- objective: seq2seq on the Trainer -------------------------------------------------------------------------
WORDS = "red blue green cat dog bird big small one two three four".split()
GERMAN = dict(zip(WORDS, "rot blau gruen katze hund vogel gross klein eins zwei drei vier".split()))


@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
    import random
    d = tmp_path_factory.mktemp("par")
    rng = random.Random(0)
    en = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(400)]
    de = [" ".join(GERMAN[w] for w in s.split()) for s in en]
    with gzip.open(d / "train.de.gz", "wt") as f:
        f.write("\n".join(de[:360]) + "\n")
    with gzip.open(d / "train.en.gz", "wt") as f:
        f.write("\n".join(en[:360]) + "\n")
    (d / "val.jsonl").write_text("".join(json.dumps({"src": a, "tgt": b}) + "\n" for a, b in zip(de[360:], en[360:])))
    return d


def s2s_cfg(d, out, **kw):
    from lmstack.train.config import TrainConfig
    base = dict(objective="seq2seq", out_dir=str(out), src_path=str(d / "train.de.gz"), tgt_path=str(d / "train.en.gz"),
                val_src_path=str(d / "val.jsonl"), tokenizer="bpe", vocab_size=300, label_smoothing=0.1,
                model=dict(n_layer=2, n_encoder_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1),
                batch_size=16, max_steps=8, warmup_steps=2, lr=3e-3, eval_interval=4, log_interval=1,
                progress=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_seq2seq_trains_saves_and_resumes_exactly(parallel, tmp_path):
    from safetensors.torch import load_file
    from lmstack.train.seq2seq import train_seq2seq
    import lmstack
    s = train_seq2seq(s2s_cfg(parallel, tmp_path / "a", max_tokens=120), **QUIET)
    train_seq2seq(s2s_cfg(parallel, tmp_path / "b", max_tokens=120, max_steps=4, decay_steps=8), **QUIET)
    train_seq2seq(s2s_cfg(parallel, tmp_path / "b", max_tokens=120, resume=True), **QUIET)
    la = [r["train_loss"] for r in read_jsonl(tmp_path / "a/metrics.jsonl") if "train_loss" in r]
    lb = [r["train_loss"] for r in read_jsonl(tmp_path / "b/metrics.jsonl") if "train_loss" in r]
    assert len(la) == 8 and la == lb
    a, b = load_file(str(tmp_path / "a/last/model.safetensors")), load_file(str(tmp_path / "b/last/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "val_loss" in s and la[-1] < la[0]
    lm = lmstack.load(tmp_path / "a" / "last")
    assert isinstance(lm.model, Seq2SeqTransformer) and lm.model.decoder_start_id == lm.tokenizer.bos_id
    out = translate(lm.model, lm.tokenizer, ["rot katze", "zwei hund"], num_beams=2, max_new_tokens=6)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_seq2seq_learns_the_toy_language_and_translate_cli(parallel, tmp_path, capsys):
    from lmstack.cli import main
    from lmstack.train.seq2seq import train_seq2seq
    cfg = s2s_cfg(parallel, tmp_path / "run", max_steps=400, eval_interval=200, lr=2e-3, warmup_steps=10,
                  label_smoothing=0.0, model=dict(n_layer=2, n_encoder_layer=2, n_head=2, n_embd=64, block_size=32,
                                                  dropout=0.0))
    train_seq2seq(cfg, **QUIET)
    src = tmp_path / "src.txt"
    src.write_text("rot katze\nzwei gross hund\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("red cat\ntwo big dog\n")
    assert main(["translate", "--model", str(tmp_path / "run"), "--input", str(src), "--num-beams", "3",
                 "--output", str(tmp_path / "out.txt"), "--reference", str(ref)]) == 0
    assert (tmp_path / "out.txt").read_text().splitlines() == ["red cat", "two big dog"]
    err = capsys.readouterr().err  # exact matches (no 4-grams in such short lines, so BLEU itself is 0)
    assert "sacreBLEU cased" in err and "100.0/100.0/100.0" in err


def test_separate_vocabularies(parallel, tmp_path):
    import lmstack
    from lmstack.tokenizer import Tokenizer
    from lmstack.train.seq2seq import train_seq2seq
    train_seq2seq(s2s_cfg(parallel, tmp_path / "sep", shared_vocab=False, max_steps=2), **QUIET)
    lm = lmstack.load(tmp_path / "sep" / "last")
    src_tok = Tokenizer.load(tmp_path / "sep" / "last" / "source")
    assert lm.model.config.src_vocab_size >= src_tok.vocab_size  # its own (padded) source vocabulary
    assert lm.model.encoder.tok_emb.weight is not lm.model.decoder.tok_emb.weight
    ref = translate(lm.model, lm.tokenizer, ["rot", "zwei hund"], num_beams=2, max_new_tokens=3, src_tokenizer=src_tok)
    assert lm.source_tokenizer is not None and lm.source_tokenizer.vocab_size == src_tok.vocab_size
    assert lm.translate(["rot", "zwei hund"], num_beams=2, max_new_tokens=3) == ref  # LM.translate reads source/
    assert lm.translate("rot", num_beams=2, max_new_tokens=3) == ref[0]
    with pytest.raises(LMStackError, match="longer than the encoder's context"):
        lm.translate(["rot " * 200], num_beams=1, max_new_tokens=3)
    assert isinstance(lm.translate(["rot " * 200], num_beams=1, max_new_tokens=3, truncate=True), list)


def test_translate_needs_an_encoder_decoder(tiny_run):
    import lmstack
    with pytest.raises(LMStackError, match="encoder-decoder"):
        lmstack.load(tiny_run[0] / "last").translate("hallo")


def test_label_smoothing_loss():
    from lmstack.train.seq2seq import seq2seq_loss_fn
    m = tiny()
    src, tgt = torch.randint(3, 53, (2, 5)), torch.randint(3, 53, (2, 6))
    labels = tgt.clone()
    labels[1, 4:] = -100
    logits = m(src, tgt).float().detach()
    logp = logits.log_softmax(-1)
    keep = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep]
    smooth = -logp.mean(-1)[keep]
    want = (0.9 * nll + 0.1 * smooth).mean()
    got = seq2seq_loss_fn(0.1)(m, (src, torch.ones_like(src, dtype=torch.bool), tgt, labels)).detach()
    assert abs(float(got) - float(want)) < 1e-5


# ---- beam search -----------------------------------------------------------------------------------------------
def test_beam_of_one_is_greedy_and_wide_beam_finds_the_exhaustive_best():
    """Beam 1 == greedy; with a beam as wide as the whole search space (all V^n sequences of length <= n), beam search
    returns the exhaustive-search best under its length-normalised score."""
    import itertools
    m = tiny(vocab_size=4, eos_token_id=1, bos_token_id=2, init_std=0.5)
    src = [[3, 2, 3, 0]]
    assert seq2seq_beam_search(m, src, num_beams=1, max_new_tokens=6)[0][0].tokens == seq2seq_greedy(m, src, 6)[0]
    n, V = 3, 4
    best, best_seq = -1e9, None
    with torch.no_grad():
        memory = m.encode(torch.tensor(src))
        for L in range(1, n + 1):
            for seq in itertools.product(range(V), repeat=L):
                if 1 in seq[:-1] or (L < n and seq[-1] != 1):
                    continue  # EOS only last; shorter than n only if ended by EOS
                ids = torch.tensor([[m.decoder_start_id, *seq]])
                logp = m.decode(ids[:, :-1], memory).log_softmax(-1)[0]
                s = float(logp.gather(-1, ids[0, 1:, None]).sum()) / L
                if s > best:
                    best, best_seq = s, list(seq)
    hyp = seq2seq_beam_search(m, src, num_beams=V ** n, max_new_tokens=n, early_stopping="never")[0][0]
    assert hyp.tokens == best_seq and abs(hyp.score - best) < 1e-5


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BartConfig(vocab_size=24, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, decoder_start_token_id=0, forced_bos_token_id=None,
                                  forced_eos_token_id=None, init_std=0.2, dropout=0.0, attention_dropout=0.0,
                                  activation_dropout=0.0, no_repeat_ngram_size=0)
    torch.manual_seed(0)
    hf = transformers.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a louder EOS, so that hypotheses also end on it (not only at max_new_tokens)
        hf.model.shared.weight[2] *= 1.5
    d = tmp_path_factory.mktemp("bart")
    hf.save_pretrained(d)
    return hf, d


def test_bart_conversion_matches_transformers_logits(tiny_bart):
    from lmstack.convert.hf import load_hf
    hf, d = tiny_bart
    ours, _ = load_hf(d)
    src = torch.tensor([[0, 5, 9, 23, 2], [0, 7, 2, 1, 1]])
    mask = src != 1
    tgt = torch.tensor([[0, 11, 12, 13, 14, 2], [0, 20, 21, 22, 3, 5]])
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        got = ours(src, tgt, mask)
    assert (want - got).abs().max() <= 1e-4


def test_beam_search_matches_transformers_bart(tiny_bart):
    from lmstack.convert.hf import load_hf
    hf, d = tiny_bart
    ours, _ = load_hf(d)
    g = torch.Generator().manual_seed(1)
    sources = [[0, *torch.randint(3, 24, (n,), generator=g).tolist(), 2] for n in (3, 7, 5, 9, 4, 6)]
    S = max(len(s) for s in sources)
    src = torch.tensor([s + [1] * (S - len(s)) for s in sources])
    ended_early = 0
    for lp, es in ((1.0, True), (1.0, False), (2.0, True), (0.5, False)):
        out = hf.generate(input_ids=src, attention_mask=src != 1, num_beams=4, length_penalty=lp, early_stopping=es,
                          no_repeat_ngram_size=0, max_new_tokens=12, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
        mine = seq2seq_beam_search(ours, sources, num_beams=4, max_new_tokens=12, length_penalty=lp,
                                   early_stopping=es, pad_id=1)
        for b in range(len(sources)):
            seq = out.sequences[b, 1:].tolist()  # drop the decoder start token
            if 2 in seq:
                seq = seq[: seq.index(2) + 1]
                ended_early += len(seq) < 12
            assert mine[b][0].tokens == seq, (lp, es, b)
            assert abs(mine[b][0].score - float(out.sequences_scores[b])) <= 1e-4
    assert ended_early > 0  # the test exercises EOS, not only max-length hypotheses


def test_clear_errors():
    from lmstack.train.config import TrainConfig
    from lmstack.train.pretrain import model_config_for
    from lmstack.train.seq2seq import train_seq2seq
    from lmstack.tokenizer import train_char
    m = tiny()
    with pytest.raises(LMStackError, match="encoder-decoder"):
        m(torch.tensor([[3, 4]]), cache=None, pos=0)  # called like a decoder-only LM
    with pytest.raises(LMStackError, match="not an encoder-decoder"):
        seq2seq_greedy(make_model(ModelConfig(vocab_size=20, n_layer=1, n_head=1, n_embd=8, block_size=8)), [[1]])
    tok = train_char(["abc"])
    with pytest.raises(LMStackError, match="objective: seq2seq"):
        model_config_for(TrainConfig(model={"arch": "encoder-decoder", "n_layer": 1, "n_head": 1, "n_embd": 8}), tok)
    with pytest.raises(LMStackError, match="src_path"):
        train_seq2seq(TrainConfig(objective="seq2seq", out_dir="/tmp/unused-s2s", progress=False), **QUIET)
    with pytest.raises(LMStackError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.5)


def test_beam_search_projects_the_encoder_output_once(monkeypatch):
    """Cross-attention keys/values are computed once per layer per generation (on the start token), then read from
    the cache at every later step and beam reorder."""
    from lmstack.models.transformer import CrossAttention
    m = tiny()
    calls = []
    orig = CrossAttention.memory_kv
    monkeypatch.setattr(CrossAttention, "memory_kv", lambda self, mem: calls.append(mem.shape) or orig(self, mem))
    hyps = seq2seq_beam_search(m, [[5, 6, 7], [8, 9]], num_beams=3, max_new_tokens=10)
    assert len(calls) == m.config.n_layer and all(s[0] == 2 * 3 for s in calls)
    assert max(len(h[0].tokens) for h in hyps) > 1  # several decoding steps ran
