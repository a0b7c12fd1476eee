"""K-quants (Q4_K, Q5_K, Q6_K) and Q5_0/Q5_1 kept packed: the torch unpack against the gguf package, every kernel
path (forced) against the float reference for matvec and GEMM shapes, native dequantization, and a tiny GGUF of
K-quant tensors that loads packed and gives the logits of its float32 dequantization."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lmstack
from lmstack.models import kernels
from lmstack.models import qformats as qf
from lmstack.models.qlinear import QuantEmbedding, QuantLinear

gguf = pytest.importorskip("gguf")
NATIVE = [p for p in ("amx", "avx512", "avx2") if p in kernels.supported_paths()]
QT = gguf.GGMLQuantizationType


@pytest.fixture
def path_restore():
    yield
    kernels.set_kernel_path(None)


@pytest.mark.parametrize("fmt", qf.ALL_FORMATS)
def test_unpack_equals_gguf_dequantize(fmt):
    g = torch.Generator().manual_seed(3)
    p = qf.random_blocks(7, 768, fmt, g)
    if fmt in qf.K_FORMATS:
        p.view(7, -1, qf.BLOCK_BYTES[fmt])[0, 0] = 0  # an all-zero super-block (d = dmin = 0)
    ref = gguf.quants.dequantize(p.numpy(), QT[fmt.upper()])
    np.testing.assert_array_equal(qf.unpack(p, fmt).numpy(), ref)


def test_k_formats_are_not_packable_and_need_whole_super_blocks():
    with pytest.raises(lmstack.LMStackError, match="packing float weights as q4_k is not supported"):
        qf.pack(torch.randn(4, 256), "q4_k")
    with pytest.raises(lmstack.LMStackError, match="divisible by 256"):
        QuantLinear(96, 8, "q6_k")


@pytest.mark.parametrize("path", NATIVE + ["torch"])
@pytest.mark.parametrize("fmt", qf.K_FORMATS + ("q5_0", "q5_1"))
@pytest.mark.parametrize("K", [256, 768])
def test_each_path_matches_reference(path, fmt, K, path_restore):
    assert kernels.set_kernel_path(path) == path
    g = torch.Generator().manual_seed(K)
    q = QuantLinear(K, 70, fmt, bias=True, qweight=qf.random_blocks(70, K, fmt, g))
    q.bias = torch.randn(70, generator=g)
    w = q.dequantize()
    for M in (1, 2, 5, 31, 40):  # matvec, register tiles and their remainders, the prefill GEMM
        x = torch.randn(M, K, generator=g)
        y = q(x)
        flt = x @ w.T + q.bias
        if path == "torch":
            torch.testing.assert_close(y, flt, rtol=1e-5, atol=1e-5)
        elif M >= kernels.GEMM_MIN_ROWS:  # natively unpacked weight, float32 (bf16 CPUs: bfloat16) GEMM
            tol = 3e-2 if kernels.prefill_dtype(path) == torch.bfloat16 else 1e-4
            torch.testing.assert_close(y, flt, rtol=tol, atol=tol * flt.abs().max().item())
        else:  # integer kernels: exactly the int8-activation reference, up to float rounding
            ref = qf.reference_matmul(x, q.qweight, fmt) + q.bias
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
            assert ((y - flt).norm() / flt.norm()).item() < 2e-2  # and close to float math


def test_native_dequantize_equals_unpack(path_restore):
    if not NATIVE:
        pytest.skip("no native kernels on this CPU")
    path = kernels.set_kernel_path(NATIVE[-1])
    for fmt in qf.ALL_FORMATS:
        p = qf.random_blocks(9, 512, fmt, torch.Generator().manual_seed(1))
        got = kernels.dequantize(p, qf.FORMAT_IDS[fmt], path)
        torch.testing.assert_close(got, qf.unpack(p, fmt), rtol=1e-6, atol=1e-7)
        bf = kernels.dequantize(p, qf.FORMAT_IDS[fmt], path, torch.bfloat16)
        torch.testing.assert_close(bf, qf.unpack(p, fmt, torch.bfloat16), rtol=0, atol=0)


# ---- a tiny GGUF of K-quant tensors -----------------------------------------------------------------------------
def _byte_tokens() -> list[str]:
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


# tensor -> type per layer: layer 0 mixes attn_q/k Q4_K with attn_v Q6_K (as Q4_K_M files do), layer 1 does not
LAYER_TYPES = [{"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K", "ffn_gate": "Q4_K",
                "ffn_up": "Q4_K", "ffn_down": "Q6_K"},
               {"attn_q": "Q5_K", "attn_k": "Q5_K", "attn_v": "Q5_K", "attn_output": "Q4_K", "ffn_gate": "Q6_K",
                "ffn_up": "Q6_K", "ffn_down": "Q5_K"}]


def write_kquant_gguf(path, tied: bool) -> None:
    d, f, H, KV, hd = 256, 512, 4, 2, 64
    tokens = _byte_tokens() + ["<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges([])
    w.add_eos_token_id(len(tokens) - 1)
    w.add_bos_token_id(len(tokens) - 1)
    g = torch.Generator().manual_seed(0)

    def add(name, rows, cols, qtype):
        blocks = qf.random_blocks(rows, cols, qtype.lower(), g, scale=0.3).numpy()
        w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=QT[qtype])
    add("token_embd.weight", len(tokens), d, "Q6_K")
    shapes = {"attn_q": (H * hd, d), "attn_k": (KV * hd, d), "attn_v": (KV * hd, d), "attn_output": (d, H * hd),
              "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    for i, types in enumerate(LAYER_TYPES):
        for t, (rows, cols) in shapes.items():
            add(f"blk.{i}.{t}.weight", rows, cols, types[t])
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    if not tied:
        add("output.weight", len(tokens), d, "Q4_K")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_kquant_gguf_loads_packed_with_the_float_logits(tmp_path, tied, path_restore):
    p = tmp_path / "k.gguf"
    write_kquant_gguf(p, tied)
    packed = lmstack.load(p).model
    flt = lmstack.load(p, dtype="float32").model
    b0, b1 = packed.blocks
    assert isinstance(packed.tok_emb, QuantEmbedding) and packed.tok_emb.fmt == "q6_k"
    assert b0.attn.qkv.fmt == "q4_k:384,q6_k:128"  # Q4_K q/k with a Q6_K v: one mixed layer, bytes as read
    assert (b0.attn.proj.fmt, b0.mlp.fc.fmt, b0.mlp.proj.fmt) == ("q5_k", "q4_k", "q6_k")
    assert (b1.attn.qkv.fmt, b1.attn.proj.fmt, b1.mlp.fc.fmt, b1.mlp.proj.fmt) == ("q5_k", "q4_k", "q6_k", "q5_k")
    assert packed.lm_head.fmt == ("q6_k" if tied else "q4_k")
    assert packed.quantization == "gguf:q4_k,q5_k,q6_k"
    if tied:
        assert packed.lm_head.qweight is packed.tok_emb.qweight
    # the packed bytes are the file's: unpacked, exactly the float32 load (q/k rows un-permuted the same way)
    for name in ("blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.0.mlp.fc", "blocks.0.mlp.proj", "blocks.1.attn.proj", "lm_head"):
        torch.testing.assert_close(packed.get_submodule(name).dequantize(), flt.get_submodule(name).weight,
                                   rtol=0, atol=0)
    ids = torch.tensor([[5, 9, 200, 17, 3, 255, 40, 77]])
    with torch.no_grad():
        want = flt(ids)
        for path in NATIVE + ["torch"]:
            kernels.set_kernel_path(path)
            got = packed(ids)
            err = ((got - want).norm() / want.norm()).item()
            assert err < (1e-5 if path == "torch" else 1e-2), (path, err)


def test_mixed_layer_every_path_and_checkpoint_roundtrip(tmp_path, path_restore):
    from lmstack.checkpoint import load_model, save_checkpoint
    fmt = "q5_0:96,q8_0:40,q4_1:24"  # a SmolLM2 Q4_K_M file's fallback mix (576 columns: no K-quants there)
    g = torch.Generator().manual_seed(5)
    blocks = torch.cat([qf.random_blocks(n, 256, f, g).reshape(-1) for f, n in qf.segments(fmt)])
    q = QuantLinear(256, 160, fmt, bias=True, qweight=blocks)
    q.bias = torch.randn(160, generator=g)
    assert qf.code_rows(q.fmt_id, q.qweight.shape[0]) == 160  # what the compiled op's fake reports
    w = q.dequantize()
    torch.testing.assert_close(w, torch.cat([qf.unpack(p, f) for p, f in qf.split_segments(blocks, 256, fmt)]))
    for path in NATIVE + ["torch"]:
        kernels.set_kernel_path(path)
        for M in (1, 3, 40):
            x = torch.randn(M, 256, generator=g)
            y, flt = q(x), x @ w.T + q.bias
            if path == "torch" or M >= kernels.GEMM_MIN_ROWS:
                tol = 3e-2 if kernels.prefill_dtype(path) == torch.bfloat16 else 1e-4
                torch.testing.assert_close(y, flt, rtol=tol, atol=tol * flt.abs().max().item())
            else:
                ref = qf.reference_matmul(x, blocks, fmt) + q.bias
                torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with pytest.raises(lmstack.LMStackError, match="at most 3 runs"):
        QuantLinear(256, 4, "q8_0:1,q4_0:1,q8_0:1,q4_0:1")
    p = tmp_path / "k.gguf"
    write_kquant_gguf(p, tied=True)
    packed = lmstack.load(p).model
    save_checkpoint(tmp_path / "ck", packed)
    back, _ = load_model(tmp_path / "ck")
    assert back.blocks[0].attn.qkv.fmt == "q4_k:384,q6_k:128"
    assert torch.equal(back.blocks[0].attn.qkv.qweight, packed.blocks[0].attn.qkv.qweight)
    ids = torch.tensor([[1, 2, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), packed(ids), rtol=0, atol=0)
