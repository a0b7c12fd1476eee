"""Packed GGUF block formats: packing against the gguf package, every kernel path (forced) against the float
reference, the run-time path choice and its fallbacks, packed GGUF loading, quantized checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lmstack
from lmstack.checkpoint import save_checkpoint
from lmstack.config import ModelConfig
from lmstack.errors import LMStackError
from lmstack.models import kernels
from lmstack.models import qformats as qf
from lmstack.models.qlinear import QuantEmbedding, QuantLinear
from lmstack.models.quant import QUANT_MODES, quant_layout, quantize_model
from lmstack.models.transformer import Transformer

gguf = pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parents[1]
NATIVE = [p for p in ("amx", "avx512", "avx2") if p in kernels.supported_paths()]


@pytest.fixture
def path_restore():
    yield
    kernels.set_kernel_path(None)


# ---- formats ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", qf.FORMATS)
def test_pack_equals_gguf_quantize_and_unpack_equals_dequantize(fmt):
    w = torch.randn(12, 128) * 3
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    ours = qf.pack(w, fmt).numpy()
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[fmt.upper()])
    np.testing.assert_array_equal(ours, ref.view(np.uint8).reshape(ours.shape))
    np.testing.assert_array_equal(qf.unpack(torch.from_numpy(ours), fmt).numpy(),
                                  gguf.quants.dequantize(ref, gguf.GGMLQuantizationType[fmt.upper()]))


def test_pack_rejects_rows_not_a_multiple_of_32():
    with pytest.raises(LMStackError, match="divisible by 32"):
        qf.pack(torch.randn(4, 40), "q8_0")
    with pytest.raises(LMStackError, match="supported: q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k"):
        qf.check_format("q3_k")


# ---- kernel paths -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", NATIVE + ["torch"])
@pytest.mark.parametrize("fmt", qf.FORMATS)
@pytest.mark.parametrize("K", [96, 128])  # an odd and an even number of blocks per row
@pytest.mark.parametrize("layout", ["gguf", "r16"])  # r16: interleaved by a native path, then run on `path`
def test_each_path_matches_reference(path, fmt, K, layout, path_restore):
    torch.manual_seed(1)
    lin = torch.nn.Linear(K, 70, bias=True)  # 4 groups of 16 rows + 6 rows left in GGUF's layout
    q = QuantLinear.from_linear(lin, fmt)
    if layout == "r16":
        if not NATIVE:
            pytest.skip("no native kernels on this CPU")
        kernels.set_kernel_path(NATIVE[-1])
        assert q.to_native_layout() == (fmt in qf.R16_FORMATS)
    assert kernels.set_kernel_path(path) == path
    w = q.dequantize()
    for M in (1, 2, 5, 31, 40, q.gemm_min_rows() + 3):  # matvec, register tiles, remainders, the prefill GEMM
        x = torch.randn(M, K)
        y = q(x)
        flt = x @ w.T + lin.bias
        if path == "torch":
            torch.testing.assert_close(y, flt, rtol=1e-5, atol=1e-5)
        elif M >= q.gemm_min_rows():  # unpacked weight, float32 (bf16 CPUs: bfloat16) GEMM
            tol = 3e-2 if kernels.prefill_dtype(path) == torch.bfloat16 else 1e-4
            torch.testing.assert_close(y, flt, rtol=tol, atol=tol * flt.abs().max().item())
        else:  # integer kernels: exactly the int8-activation reference, up to float rounding
            ref = qf.reference_matmul(x, q.gguf_qweight(), fmt) + lin.bias
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
            assert ((y - flt).norm() / flt.norm()).item() < 2e-2  # and close to float math
    x3 = torch.randn(2, 3, K)  # leading dims
    torch.testing.assert_close(q(x3), q(x3.reshape(6, K)).view(2, 3, 70))


def test_native_paths_agree_with_each_other(path_restore):
    if len([p for p in NATIVE if p != "amx"]) < 2:
        pytest.skip("this CPU runs only one native path")
    q = QuantLinear.from_linear(torch.nn.Linear(256, 48), "q4_1")
    x = torch.randn(3, 256)
    outs = [q(x) for p in ("avx512", "avx2") if kernels.set_kernel_path(p)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_path_choice_and_fallbacks(monkeypatch, capsys, path_restore):
    with pytest.raises(LMStackError, match="amx, avx512, avx2, torch"):
        kernels.set_kernel_path("sse9")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c"})  # an AVX2-only CPU
    assert kernels.supported_paths({"avx2", "fma", "f16c"}) == ["avx2", "torch"]
    assert kernels.supported_paths(set()) == ["torch"]
    got = kernels.set_kernel_path("avx512")
    err = capsys.readouterr().err
    assert "LMSTACK_KERNEL=avx512 cannot run here" in err and "avx512f" in err
    assert got in ("avx2", "torch")
    monkeypatch.setenv("LMSTACK_NO_EXT", "1")
    assert kernels.set_kernel_path(None) == "torch"


@pytest.mark.parametrize("flags,path,want", [
    ({"avx512f", "avx512_bf16"}, "avx512", torch.bfloat16),  # AMD Zen 4 / Cooper Lake: native bf16 dot products
    ({"avx512f", "amx_bf16", "avx512_bf16"}, "amx", torch.bfloat16),
    ({"avx512f", "avx512_vnni"}, "avx512", torch.float32),  # Ice Lake / Zen 3-class AVX-512: bf16 would be emulated
    ({"avx512f", "avx512_bf16"}, "avx2", torch.float32),  # the avx2 path stands for an AVX2-only CPU
    ({"avx512f", "avx512_bf16"}, "torch", torch.float32)])
def test_prefill_gemm_dtype_follows_the_cpu(monkeypatch, flags, path, want):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    monkeypatch.delenv("LMSTACK_PREFILL_DTYPE", raising=False)
    assert kernels.prefill_dtype(path) == want
    monkeypatch.setenv("LMSTACK_PREFILL_DTYPE", "float32")
    assert kernels.prefill_dtype(path) == torch.float32


@pytest.mark.parametrize("vendor,want", [("AuthenticAMD", ["-DPF_TILES=2", "-DPF_HINT=_MM_HINT_T1"]),
                                         ("GenuineIntel", []), ("", [])])
def test_prefetch_tuning_follows_the_vendor(monkeypatch, vendor, want):
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: vendor)
    assert kernels._prefetch_flags() == want


def test_prefill_in_bf16_stays_close_to_float32(monkeypatch, path_restore):
    if not [p for p in NATIVE if kernels.prefill_dtype(p) == torch.bfloat16]:
        pytest.skip("this CPU has no native bf16 matmul")
    path = next(p for p in NATIVE if kernels.prefill_dtype(p) == torch.bfloat16)
    kernels.set_kernel_path(path)
    q = QuantLinear.from_linear(torch.nn.Linear(256, 96), "q4_0")
    x = torch.randn(kernels.GEMM_MIN_ROWS + 8, 256)
    ref = x @ q.dequantize().T + q.bias
    low = q(x)
    monkeypatch.setenv("LMSTACK_PREFILL_DTYPE", "float32")
    exact = q(x)
    torch.testing.assert_close(exact, ref, rtol=1e-4, atol=1e-4)
    assert 0 < (low - ref).norm() / ref.norm() < 1e-2  # bf16 rounding: visible, but small

def test_missing_compiler_falls_back_with_a_message(monkeypatch, capsys, path_restore):
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_errors", {"avx512": "RuntimeError: no compiler", "avx2": "RuntimeError: no cc"})
    assert kernels.set_kernel_path(None) == "torch"
    assert "did not build (RuntimeError: no compiler)" in capsys.readouterr().err
    q = QuantLinear.from_linear(torch.nn.Linear(64, 8), "q8_0")
    x = torch.randn(1, 64)
    torch.testing.assert_close(q(x), x @ q.dequantize().T + q.bias)


def test_fused_rmsnorm_matches_torch(path_restore):
    if not NATIVE:
        pytest.skip("no native kernels on this CPU")
    kernels.set_kernel_path(NATIVE[-1])
    from lmstack.models.transformer import RMSNorm
    n = RMSNorm(100, eps=1e-5)
    n.weight.data = torch.randn(100)
    x = torch.randn(3, 7, 100)
    with torch.no_grad():
        fused = n(x)
    want = torch.nn.RMSNorm.forward(n, x)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)


# ---- packed GGUF loading ------------------------------------------------------------------------------------------
def test_tiny_gguf_packed_layers_and_exact_torch_path(tmp_path, path_restore):
    from test_gguf import write_tiny_gguf

    from lmstack.convert.gguf import load_gguf
    for tied in (False, True):
        p = tmp_path / f"tiny{tied}.gguf"
        write_tiny_gguf(p, tied=tied)
        flt, _ = load_gguf(p)
        packed, _ = load_gguf(p, packed=True)
        assert isinstance(packed.tok_emb, QuantEmbedding) and packed.tok_emb.fmt == "q8_0"
        qkv = packed.blocks[0].attn.qkv  # q Q8_0, k F32, v F16: a mixed group re-packed as Q8_0
        assert isinstance(qkv, QuantLinear) and qkv.fmt == "q8_0"
        assert isinstance(packed.blocks[0].attn.proj, torch.nn.Linear)  # an F32 tensor stays float
        if tied:
            assert packed.lm_head.qweight is packed.tok_emb.qweight
        else:
            assert isinstance(packed.lm_head, torch.nn.Linear)  # output.weight is F16
        ids = torch.tensor([[5, 9, 200, 17, 3, 256, 40]])
        kernels.set_kernel_path("torch")
        with torch.no_grad():
            # the Q8_0 tensors read as stored: equal to the float load (the mixed group is re-quantized: close)
            torch.testing.assert_close(packed.tok_emb(ids), flt.tok_emb(ids), rtol=0, atol=0)
            torch.testing.assert_close(packed(ids), flt(ids), rtol=2e-2, atol=2e-2)
            mlp = packed.blocks[1].mlp.proj  # ffn_down: Q8_0, read byte for byte
            torch.testing.assert_close(mlp.dequantize(), flt.blocks[1].mlp.proj.weight, rtol=0, atol=0)


def shared_gguf() -> Path:
    p = Path(os.environ.get("LMSTACK_GGUF", REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not p.is_file():
        pytest.skip(f"no GGUF model at {p}")
    return p


def test_smollm2_packed_by_default_and_close_to_float(path_restore):
    p = shared_gguf()
    lm = lmstack.load(p)
    m = lm.model
    assert m.quantization == "gguf:q4_1,q8_0"
    assert isinstance(m.blocks[0].mlp.fc, QuantLinear) and m.blocks[0].mlp.fc.fmt == "q4_1"
    assert m.lm_head.qweight is m.tok_emb.qweight  # the tied Q8_0 head: one copy
    packed_bytes = sum(b.numel() for b in m.buffers() if b.dtype == torch.uint8)
    assert packed_bytes < 1.05 * p.stat().st_size
    flt = lmstack.load(p, dtype="float32").model
    assert isinstance(flt.blocks[0].mlp.fc, torch.nn.Linear)
    ids = torch.tensor([lm.tokenizer.encode("The capital of France is Paris. The capital of Italy is Rome.")])
    with torch.no_grad():
        a, b = m(ids), flt(ids)
        kernels.set_kernel_path("torch")
        c = m(ids)
    torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-3)  # the torch path: the file's float dequantization
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.85, agree


# ---- quantized checkpoints ----------------------------------------------------------------------------------------
def tiny_model(tied: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=64, pos_emb="rope", norm="rmsnorm",
                      mlp="swiglu", intermediate_size=96, tie_embeddings=tied, bias=False)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("mode", QUANT_MODES)
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_checkpoint_roundtrip(tmp_path, mode, tied):
    from lmstack.checkpoint import load_model
    model = quantize_model(tiny_model(tied), mode)
    layout = quant_layout(model)
    assert layout["blocks.0.mlp.proj"] == mode and "blocks.1.attn.qkv" in layout
    save_checkpoint(tmp_path / "q", model)
    back, _ = load_model(tmp_path / "q")
    assert quant_layout(back) == layout
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
    if tied and mode != "int8":
        assert back.lm_head.qweight is back.tok_emb.qweight
    from lmstack.convert.load import load_any
    flt, _ = load_any(tmp_path / "q")  # training loaders get float weights
    assert quant_layout(flt) == {} and isinstance(flt.blocks[0].mlp.proj, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(flt(ids), model(ids), rtol=3e-2, atol=3e-2)


def test_cli_convert_quantize_and_export(tmp_path):
    from test_gguf import write_tiny_gguf
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, tied=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "lmstack", "convert", str(src), "--out", str(tmp_path / "q"),
                        "--quantize", "q4_0"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "quantized q4_0" in r.stdout
    lm = lmstack.load(tmp_path / "q")
    assert {v for v in quant_layout(lm.model).values()} == {"q4_0"}
    r = subprocess.run([sys.executable, "-m", "lmstack", "export", str(tmp_path / "q"), "--format", "gguf",
                        "--out", str(tmp_path / "back.gguf")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    back = lmstack.load(tmp_path / "back.gguf", dtype="float32").model
    ids = torch.tensor([[5, 9, 200, 17]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), lmstack.load(tmp_path / "q", packed=False).model(ids),
                                   rtol=1e-4, atol=1e-4)
    r = subprocess.run([sys.executable, "-m", "lmstack", "convert", str(src), "--out", str(tmp_path / "x"),
                        "--quantize", "q5_k"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "invalid choice" in r.stderr


def test_cli_quant_modes_match_library():
    from lmstack.cli.common import QUANT_MODES as CLI
    assert CLI == QUANT_MODES


def test_lean_reader_matches_gguf_reader(tmp_path):
    from test_gguf import write_tiny_gguf

    from lmstack.convert.gguf_reader import LeanReader
    tiny = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny)
    paths = [tiny] + [p for p in [REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"]
                      if p.is_file()]
    for p in paths:
        ref, ours = gguf.GGUFReader(str(p)), LeanReader(p)
        assert set(ours.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
        for k in ours.fields:
            assert ours.fields[k].contents() == ref.fields[k].contents(), k
        assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
        for a, b in zip(ours.tensors, ref.tensors):
            assert (a.tensor_type, list(a.shape), a.data_offset, a.n_bytes) == \
                   (b.tensor_type, [int(x) for x in b.shape], b.data_offset, b.n_bytes), a.name
            if a.n_bytes < 2_000_000:
                np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    with pytest.raises(LMStackError, match="past the end of the file|cut short"):
        LeanReader(cut)
    with pytest.raises(LMStackError, match="past the end of the file|cut short"):
        lmstack.load(cut)


def count_fused_calls(monkeypatch) -> list:
    """Route kernels.loaded() through a proxy that records one entry per layer each decode_layers call runs (and
    forwards everything)."""
    ext, calls = kernels.loaded(), []

    class Counting:
        def __getattr__(self, name):
            if name == "decode_layers":
                def run(x, layers, *rest):
                    calls.extend([1] * len(layers))
                    return ext.decode_layers(x, layers, *rest)
                return run
            return getattr(ext, name)
    monkeypatch.setattr(kernels, "loaded", lambda: Counting())
    return calls


FUSED_CFG = ModelConfig(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos_emb="rope",
                        norm="rmsnorm", mlp="swiglu", intermediate_size=96, bias=False)  # a packed Llama, tiny


def test_fused_decode_layer_equals_the_module_path(monkeypatch, path_restore):
    if not [p for p in NATIVE if p != "amx"]:
        pytest.skip("no native kernels on this CPU")
    from lmstack.models.kv_cache import make_cache
    kernels.set_kernel_path(NATIVE[-1])
    torch.manual_seed(0)
    cfg = FUSED_CFG
    model = quantize_model(Transformer(cfg).eval(), "q4_1")
    calls = count_fused_calls(monkeypatch)
    ids = torch.randint(0, 96, (1, 40))

    def run():
        cache, out = make_cache(model, 1, 64), []
        with torch.inference_mode():
            out.append(model(ids[:, :5], cache=cache, pos=0))  # a short prompt: the causal seq mode
            out.append(model(ids[:, 5:12], cache=cache, pos=5))  # a chunk after cached tokens (a verify step)
            for i in range(12, 30):
                out.append(model(ids[:, i:i + 1], cache=cache, pos=i))
        return torch.cat(out, 1)
    fused = run()
    assert len(calls) == (2 + 18) * cfg.n_layer
    monkeypatch.setenv("LMSTACK_FUSED_DECODE", "0")
    calls.clear()
    plain = run()
    assert calls == []
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("LMSTACK_FUSED_DECODE")
    with torch.inference_mode():  # from gemm_min_rows tokens on, prefill takes the unpacked-GEMM path instead
        n = model.blocks[0].mlp.fc.gemm_min_rows()
        model(torch.randint(0, 96, (1, n)), cache=make_cache(model, 1, n), pos=0)
    assert calls == []


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("fmt", qf.FORMATS)
@pytest.mark.parametrize("layout", ["gguf", "r16"])
def test_native_embedding_lookup_equals_the_torch_unpack(path, fmt, layout, path_restore):
    """QuantEmbedding's one-call native lookup (kernels embed_rows) = gather + unpack in torch, both layouts, rows
    past the last whole group of 16 included; an id out of range is an error, not a read past the weight."""
    if path == "amx":
        pytest.skip("amx runs the avx512 build for lookups")
    torch.manual_seed(2)
    kernels.set_kernel_path(path)
    emb = QuantEmbedding.from_embedding(torch.nn.Embedding(37, 64), fmt)  # 2 groups of 16 + 5 rows
    if layout == "r16":
        assert emb.to_native_layout() == (fmt in qf.R16_FORMATS)
    idx = torch.tensor([[0, 15, 16, 31, 32, 36], [36, 5, 5, 20, 1, 0]])
    ref = qf.unpack(emb.gguf_qweight(), fmt)[idx]
    torch.testing.assert_close(emb(idx), ref, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="outside"):
        emb(torch.tensor([37]))


def test_fused_decode_model_copies_and_pickles(path_restore):
    """The fused step's per-model cache of native layer objects does not travel with deepcopy / pickle (a reference
    policy copied for RLHF, torch.save of a module): the copy builds its own and decodes the same."""
    import copy
    import pickle
    if not [p for p in NATIVE if p != "amx"]:
        pytest.skip("no native kernels on this CPU")
    from lmstack.models.kv_cache import make_cache
    kernels.set_kernel_path(NATIVE[-1])
    torch.manual_seed(0)
    model = quantize_model(Transformer(FUSED_CFG).eval(), "q4_1")
    ids = torch.randint(0, 96, (1, 8))

    def run(m):
        cache = make_cache(m, 1, 16)
        with torch.inference_mode():
            return torch.cat([m(ids[:, i:i + 1], cache=cache, pos=i) for i in range(8)], 1)
    out = run(model)
    assert model.__dict__.get("_fused_decode_layers") is not None
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.__dict__.get("_fused_decode_layers") is None
        torch.testing.assert_close(run(twin), out, rtol=0, atol=0)
        assert twin.__dict__["_fused_decode_layers"].layers is not model.__dict__["_fused_decode_layers"].layers


def test_fused_decode_in_the_continuous_batcher(monkeypatch, path_restore):
    """Rows of different lengths (left padding, per-row positions) through the fused layer = the module path."""
    if not [p for p in NATIVE if p != "amx"]:
        pytest.skip("no native kernels on this CPU")
    from lmstack.generate import SamplingParams
    from lmstack.generate.batching import generate_batch
    kernels.set_kernel_path(NATIVE[-1])
    torch.manual_seed(0)
    cfg = FUSED_CFG
    model = quantize_model(Transformer(cfg).eval(), "q8_0")
    prompts = [[3, 5, 7], [9, 11, 13, 15, 17, 19, 21], [2, 4, 6, 8, 10]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    calls = count_fused_calls(monkeypatch)
    fused = generate_batch(model, prompts, params)
    assert calls  # the batcher's decode steps went through the fused layer
    monkeypatch.setenv("LMSTACK_FUSED_DECODE", "0")
    plain = generate_batch(model, prompts, params)
    for a, b in zip(fused, plain):
        assert [s.token for s in a] == [s.token for s in b]
        np.testing.assert_allclose([s.logprob for s in a], [s.logprob for s in b], rtol=1e-4, atol=1e-4)


def test_first_forward_of_a_process_equals_the_next(tmp_path):
    """A fresh process: the kernel path (and with it the fused RMSNorm) is settled when packed layers are built,
    not at the first matmul. It once was at the first matmul, so a first forward ran its leading norms before the
    extension loaded and rounded differently from every later one: on SmolLM2 a 320-token prompt's greedy tokens
    differed between a process's first call and its second."""
    if not [p for p in NATIVE if p != "amx"]:
        pytest.skip("no native kernels on this CPU")
    from lmstack.convert.gguf_export import export_gguf
    from lmstack.tokenizer import train_bpe
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128, pos_emb="rope",
                      norm="rmsnorm", mlp="swiglu", intermediate_size=256, bias=False)
    export_gguf(Transformer(cfg).eval(), train_bpe(["abc def ghi " * 50], 300), tmp_path / "q.gguf", quant="q8_0")
    smol = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    code = f"""
import torch, lmstack
from lmstack.models import kernels
from lmstack.models.kv_cache import KVCache
lm = lmstack.load({str(tmp_path / "q.gguf")!r})
print("LOADED" if kernels.loaded() is not None else "NOT LOADED")
if {smol.is_file()!r}:
    lm = lmstack.load({str(smol)!r})
    ids = torch.tensor([lm.prompt_ids("The lighthouse at Harrow Point was built in 1871 by Margaret Ellison. " * 20)])
    with torch.inference_mode():
        ks = []
        for _ in range(2):
            cache = KVCache.for_model(lm.model, 1, ids.shape[1])
            lm.model(ids, cache=cache, pos=0)
            ks.append(cache.k[0])
    print("SAME" if torch.equal(*ks) else "DIFF")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "LOADED"
    assert lines[1:] in ([], ["SAME"]), r.stdout
