"""GGUF import: dequantizers, layout (Q/K un-permutation, fused qkv / gate-up), metadata, errors, and parity with
transformers' own GGUF loader on the real SmolLM2-135M-Instruct Q4_1 file ($LMSTACK_GGUF)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from lmstack.config import ModelConfig
from lmstack.convert.gguf import _np_dequantize, dequantize, is_gguf, load_gguf
from lmstack.errors import LMStackError
from lmstack.generate import SamplingParams, generate
from lmstack.models.transformer import Transformer

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def gguf_path() -> Path:
    p = Path(os.environ.get("LMSTACK_GGUF", REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return p if p.is_absolute() else (REPO / p).resolve()


# ---- dequantizers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype,tol", [("Q8_0", 1 / 127), ("Q4_0", 1 / 7), ("Q4_1", 1 / 15), ("F16", 1e-3),
                                       ("BF16", 1e-2)])
def test_dequantize_matches_reference(qtype, tol):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 256)).astype(np.float32) * 3
    if not hasattr(gguf.quants, "quantize"):
        pytest.skip("this gguf package has no quantize()")
    q = gguf.quants.quantize(x, QT[qtype])
    ours = _np_dequantize(q.view(np.uint8), qtype)  # raw bytes, as the GGUF reader gives quantized tensors
    ref = gguf.quants.dequantize(q, QT[qtype])
    assert ours.shape == x.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)  # independent numpy block decoding == the package's reference
    np.testing.assert_array_equal(dequantize(q, QT[qtype]), ref)
    # and it is a faithful reconstruction: error within the format's step (relative to each block's range)
    blocks = np.abs(x).reshape(8, -1, 32).max(-1, keepdims=True)
    err = np.abs(ours - x).reshape(8, -1, 32)
    assert (err <= tol * 2 * blocks + 1e-6).all()


def test_q4_1_block_layout_by_hand():
    """One Q4_1 block written byte by byte: d=0.5, m=-1, nibbles 0..15 low, 15..0 high."""
    d, m = np.float16(0.5).tobytes(), np.float16(-1.0).tobytes()
    qs = bytes((i & 0x0F) | ((15 - i) << 4) for i in range(16))
    block = np.frombuffer(d + m + qs, dtype=np.uint8).reshape(1, 20)
    want = np.array([0.5 * i - 1 for i in range(16)] + [0.5 * (15 - i) - 1 for i in range(16)], dtype=np.float32)
    np.testing.assert_array_equal(_np_dequantize(block, "Q4_1")[0], want)
    np.testing.assert_array_equal(dequantize(block, QT.Q4_1)[0], want)


def test_unsupported_tensor_type_names_supported():
    with pytest.raises(LMStackError, match="supported: .*Q4_1"):
        dequantize(np.zeros((1, 66), dtype=np.uint8), QT.IQ2_XXS)


# ---- a tiny synthetic llama GGUF (written here with gguf.GGUFWriter, as llama.cpp's converter would) ---------------
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K permutation (rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_tokens() -> list[str]:
    from lmstack.convert.gguf import bytes_to_unicode
    table = bytes_to_unicode()
    assert sorted(table.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    return [table[b] for b in range(256)]


def write_tiny_gguf(path: Path, arch: str = "llama", tied: bool = False, seed: int = 0):
    """A 2-layer GQA llama with random weights in F32/F16/Q8_0; returns the lmstack model holding exactly the
    (dequantized) weights written."""
    tokens = _byte_tokens() + ["he", "<|endoftext|>"]
    cfg = ModelConfig(vocab_size=len(tokens), block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96, pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                      tie_embeddings=tied, rope_theta=5000.0, norm_eps=1e-6)
    torch.manual_seed(seed)
    ref = Transformer(cfg).eval()
    H, KV, hd, f = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.ffn_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(f)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["h e"])
    w.add_eos_token_id(len(tokens) - 1)
    w.add_bos_token_id(len(tokens) - 1)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}

    def add(name, arr, qtype="F32"):  # returns what a reader will dequantize it to
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype == "F32":
            w.add_tensor(name, arr)
            return arr
        if qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
            return arr.astype(np.float16).astype(np.float32)
        q = gguf.quants.quantize(arr, QT[qtype])
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=QT[qtype])
        return gguf.quants.dequantize(q, QT[qtype])

    new = {"tok_emb.weight": torch.from_numpy(add("token_embd.weight", sd["tok_emb.weight"], "Q8_0"))}
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        qkv = sd[b + "attn.qkv.weight"]
        q, k, v = np.split(qkv, [H * hd, (H + KV) * hd])
        q = add(g + "attn_q.weight", _permute(q, H), "Q8_0")
        k = add(g + "attn_k.weight", _permute(k, KV))
        v = add(g + "attn_v.weight", v, "F16")
        # the reference holds the same (de)quantized values, un-permuted back
        new[b + "attn.qkv.weight"] = torch.from_numpy(np.concatenate([_permute_back(q, H), _permute_back(k, KV), v]))
        new[b + "attn.proj.weight"] = torch.from_numpy(add(g + "attn_output.weight", sd[b + "attn.proj.weight"]))
        gate, up = np.split(sd[b + "mlp.fc.weight"], 2)
        gate, up = add(g + "ffn_gate.weight", gate, "F16"), add(g + "ffn_up.weight", up, "Q8_0")
        new[b + "mlp.fc.weight"] = torch.from_numpy(np.concatenate([gate, up]))
        new[b + "mlp.proj.weight"] = torch.from_numpy(add(g + "ffn_down.weight", sd[b + "mlp.proj.weight"], "Q8_0"))
        norm1 = 1 + 0.1 * np.random.default_rng(i).standard_normal(cfg.n_embd)
        norm2 = 1 + 0.1 * np.random.default_rng(i + 10).standard_normal(cfg.n_embd)
        new[b + "norm1.weight"] = torch.from_numpy(add(g + "attn_norm.weight", norm1))
        new[b + "norm2.weight"] = torch.from_numpy(add(g + "ffn_norm.weight", norm2))
    new["norm_f.weight"] = torch.from_numpy(add("output_norm.weight", np.full(cfg.n_embd, 0.9)))
    if not tied:
        new["lm_head.weight"] = torch.from_numpy(add("output.weight", sd["lm_head.weight"], "F16"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref.load_state_dict(new, strict=False)
    return ref


def _permute_back(w: np.ndarray, n_head: int) -> np.ndarray:
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def test_permute_roundtrip():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    np.testing.assert_array_equal(_permute_back(_permute(w, 2), 2), w)
    assert not np.array_equal(_permute(w, 2), w)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_gguf_roundtrip(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_gguf(path, tied=tied)
    assert is_gguf(path)
    model, tok = load_gguf(path)
    assert model.config.tie_embeddings is tied
    assert (model.config.n_head, model.config.kv_heads, model.config.ffn_size) == (4, 2, 96)
    assert model.config.rope_theta == 5000.0 and abs(model.config.norm_eps - 1e-6) < 1e-12
    got, want = model.state_dict(), ref.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    ids = torch.tensor([[5, 9, 200, 17, 3, 256, 40]])
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)
    # tokenizer: byte-level BPE with the one merge, the control token whole and special
    assert tok.encode("hehe<|endoftext|>") == [256, 256, 257]
    assert tok.eos_id == 257 and tok.decode(tok.encode("héllo\n")) == "héllo\n"
    m16, _ = load_gguf(path, dtype=torch.bfloat16)
    assert m16.tok_emb.weight.dtype == torch.bfloat16


def test_loading_a_gguf_skips_torch_compile_machinery(tmp_path):
    """Built on the meta device and given storage without torch._refs: loading imports neither torch._dynamo nor
    sympy (together ~1.5-2 s of a CLI command's start)."""
    import subprocess
    import sys
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    code = ("import sys; from lmstack.convert.gguf import load_gguf; m, _ = load_gguf(sys.argv[1]); "
            "print(sorted(k for k in ('torch._dynamo', 'sympy') if k in sys.modules), m.rope_cos.abs().sum() > 0)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "tensor(True)"], out.stdout + out.stderr


def test_non_gguf_and_unsupported_arch(tmp_path):
    txt = tmp_path / "model.bin"
    txt.write_bytes(b"PK\x03\x04 not a gguf file")
    assert not is_gguf(txt) and not is_gguf(tmp_path / "missing.gguf") and not is_gguf(tmp_path)
    with pytest.raises(LMStackError, match="not a GGUF file"):
        load_gguf(txt)
    with pytest.raises(LMStackError, match="not a GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(bad), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert is_gguf(bad)
    with pytest.raises(LMStackError, match="architecture 'gpt2' is not supported; supported: llama"):
        load_gguf(bad)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(LMStackError):
        load_gguf(trunc)


# ---- the real file vs transformers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_path() -> Path:
    p = gguf_path()
    if not p.is_file():
        pytest.skip(f"GGUF model not found at {p} (set LMSTACK_GGUF)")
    return p


@pytest.fixture(scope="module")
def ours(real_path):
    return load_gguf(real_path)


@pytest.fixture(scope="module")
def hf_tok(real_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(real_path.parent), gguf_file=real_path.name)


@pytest.fixture(scope="module")
def hf_model(real_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")
    m = transformers.AutoModelForCausalLM.from_pretrained(str(real_path.parent), gguf_file=real_path.name,
                                                          dtype=torch.float32)
    return m.eval()


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return",
           "<|im_start|>user\nTell me a joke about cats.<|im_end|>\n<|im_start|>assistant\n"]


def test_real_config(ours):
    cfg = ours[0].config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.ffn_size, cfg.vocab_size) == \
        (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.block_size == 8192
    assert ours[0].lm_head.weight is ours[0].tok_emb.weight


def test_logits_parity_with_transformers(ours, hf_model):
    model, tok = ours
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            got, want = model(ids), hf_model(ids).logits
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel <= 1e-3, (prompt, rel)
        assert torch.equal(got[0, -1].argmax(), want[0, -1].argmax())


def test_greedy_decoding_parity_with_transformers(ours, hf_model):
    model, tok = ours
    ids = tok.encode(PROMPTS[0])
    got = generate(model, ids, SamplingParams(temperature=0, max_new_tokens=32), eos_id=None)
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=tok.pad_id)
    assert got == out[0, len(ids):].tolist()


TEXTS = ["Hello, world!", "  leading spaces and trailing  ", "naïve café — déjà vu", "日本語のテキスト、中文字符",
         "emoji 🙂🚀 and ZWJ 👩‍💻", "tabs\tand\nnewlines\r\n", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
         "x<|im_end|>y <repo_name>z", "Ελληνικά και русский текст", "numbers 1234567 3.14159 1e-9", "",
         "¿Qué? ¡Sí! 'quotes' \"double\" don't we'll", "\u00a0nbsp\u200bzero-width", "a" * 50]


def test_tokenizer_parity_with_transformers(ours, hf_tok):
    _, tok = ours
    for t in TEXTS:
        assert tok.encode(t) == hf_tok.encode(t, add_special_tokens=False), t
        assert tok.decode(tok.encode(t)) == t
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token)
    assert tok.vocab_size == len(hf_tok)
    assert tok.special_ids >= {0, 1, 2} and tok.decode([1, 2], skip_special_tokens=True) == ""


def test_chat_template_parity_with_transformers(ours, hf_tok):
    _, tok = ours
    for messages in ([{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Ça va ?"}]):
        want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages, add_generation_prompt=True) == want


def test_chat_answer_capital_of_france(ours):
    model, tok = ours
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(model, tok.encode(prompt), SamplingParams(temperature=0, max_new_tokens=40), eos_id=tok.eos_id)
    assert "Paris" in tok.decode(out, skip_special_tokens=True)
