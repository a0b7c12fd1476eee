"""GGUF export (lmstack/convert/gguf_export.py): round trips through lmstack's reader and transformers' own GGUF
loader (an independent reader of llama.cpp's layout), quantized tensor types, errors, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.convert.gguf import load_gguf
from lmstack.convert.gguf_export import export_gguf
from lmstack.errors import LMStackError
from lmstack.models.transformer import Transformer
from lmstack.tokenizer import train_bpe, train_char

from conftest import make_text, run_cli

gguf = pytest.importorskip("gguf")

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tok():
    t = train_bpe([make_text(400)], 300)
    t.chat_template = TEMPLATE
    return t


def llama(tok, tied: bool, seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96, pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                      tie_embeddings=tied, rope_theta=50000.0, norm_eps=1e-6, eos_token_id=tok.eos_id,
                      bos_token_id=tok.bos_id, **over)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped or missing norm shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def ids_for(tok) -> torch.Tensor:
    return torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog and cat")])


@pytest.mark.parametrize("tied", [True, False])
def test_f32_round_trip_through_lmstack_and_transformers(tmp_path, tok, tied):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")
    model = llama(tok, tied)
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    ids = ids_for(tok)
    with torch.no_grad():
        want = model(ids)
        back, btok = load_gguf(path)
        assert torch.allclose(back(ids), want, atol=1e-6, rtol=0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                               dtype=torch.float32).eval()
        assert (hf(ids).logits - want).abs().max().item() < 1e-4  # llama.cpp's layout, read by someone else
    assert btok.encode("the lazy dog sat") == tok.encode("the lazy dog sat")
    assert btok.chat_template == TEMPLATE and btok.eos_id == tok.eos_id
    assert back.config.tie_embeddings == tied and back.config.kv_heads == 2 and back.config.rope_theta == 50000.0
    htok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert htok("the quick brown fox")["input_ids"][-len(tok.encode("the quick brown fox")):] == \
        tok.encode("the quick brown fox")


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0", "q4_1"])
def test_quantized_tensors_are_the_reference_quantization(tmp_path, tok, quant):
    model = llama(tok, tied=False, seed=1)
    path = export_gguf(model, tok, tmp_path / f"m.{quant}.gguf", quant=quant)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == quant.upper() and types["output.weight"] == quant.upper()
    assert types["blk.1.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    back, _ = load_gguf(path)
    w = model.blocks[1].mlp.proj.weight.detach().numpy()
    qt = gguf.GGMLQuantizationType[quant.upper()]
    ref = w.astype(np.float16).astype(np.float32) if quant == "f16" else \
        gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt)
    assert np.array_equal(back.blocks[1].mlp.proj.weight.detach().numpy(), ref)
    ids = ids_for(tok)
    with torch.no_grad():
        err = (back(ids) - model(ids)).abs().max().item() / model(ids).abs().max().item()
    assert err < {"f16": 1e-3, "q8_0": 2e-2, "q4_0": 0.3, "q4_1": 0.3}[quant]


def test_unexportable_models_and_tokenizers(tmp_path, tok):
    gpt2 = Transformer(ModelConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    with pytest.raises(LMStackError, match="llama-architecture.*pos_emb=learned"):
        export_gguf(gpt2, tok, tmp_path / "g.gguf")
    char = train_char([make_text(50)])
    with pytest.raises(LMStackError, match="byte-level BPE"):
        export_gguf(llama(tok, True), char, tmp_path / "c.gguf")
    with pytest.raises(LMStackError, match="q5_k"):
        export_gguf(llama(tok, True), tok, tmp_path / "q.gguf", quant="q5_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))  # nothing half-written


def test_cli_export_gguf_from_a_checkpoint(tmp_path, tok):
    from lmstack.checkpoint import save_checkpoint
    model = llama(tok, tied=True, seed=2)
    save_checkpoint(tmp_path / "ckpt", model, tok)
    p = run_cli("export", str(tmp_path / "ckpt"), "--format", "gguf", "--quant", "q8_0", "--out",
                str(tmp_path / "out" / "m.gguf"))
    assert p.returncode == 0, p.stderr
    assert "q8_0" in p.stdout
    back, _ = load_gguf(tmp_path / "out" / "m.gguf")
    assert back.config.n_layer == 2 and back.config.tie_embeddings
    # a GGUF input exports too (dequantized, then written again)
    p = run_cli("export", str(tmp_path / "out" / "m.gguf"), "--format", "gguf", "--out", str(tmp_path / "m2.gguf"))
    assert p.returncode == 0, p.stderr
    again, _ = load_gguf(tmp_path / "m2.gguf")
    ids = ids_for(tok)
    with torch.no_grad():
        assert torch.equal(again(ids), back(ids))  # f32 of the dequantized q8_0 weights: the same function
    p = run_cli("export", str(tmp_path / "ckpt"), "--quant", "q8_0", "--out", str(tmp_path / "hf"))
    assert p.returncode == 2 and "--format gguf" in p.stderr


# ---- llama.cpp itself reads the export (slow: needs llama-cpp-python, built by benchmarks/generate_speed.py) ----
_LLAMA_GREEDY = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_threads=2, n_ctx=256, verbose=False)
out = []
llm.eval(ids)
for _ in range(n):
    t = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))
    out.append(t)
    llm.eval([t])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_llama_cpp_decodes_the_same_greedy_tokens(tmp_path):
    import subprocess
    import sys

    import lmstack
    repo = Path(__file__).resolve().parents[1]
    py = repo / "benchmarks" / ".venv-llama" / "bin" / "python"
    if not py.exists():
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (benchmarks/generate_speed.py "
                                                "builds it into benchmarks/.venv-llama)")
        py = Path(sys.executable)
    src = repo.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not src.is_file():
        pytest.skip(f"no GGUF model at {src}")
    lm = lmstack.load(src, dtype="float32")
    out = export_gguf(lm.model, lm.tokenizer, tmp_path / "smollm2.f32.gguf", quant="f32")
    ids = lm.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    back = lmstack.load(out, dtype="float32")
    from lmstack.generate import SamplingParams, generate
    ours = generate(back.model, ids, SamplingParams(max_new_tokens=16, temperature=0.0, stop_at_eos=False))
    r = subprocess.run([str(py), "-c", _LLAMA_GREEDY, str(out), json.dumps(ids), "16"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == list(ours)
