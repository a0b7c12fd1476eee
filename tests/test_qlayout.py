"""The kernels' 16-row interleaved layout (r16): a byte permutation of GGUF's blocks that every reader undoes —
round trips, embedding lookups through a tied head's interleaved bytes, state_dict / checkpoints in GGUF's bytes,
and the loaders putting packed layers into it."""
from __future__ import annotations

import pytest
import torch

from lmstack.checkpoint import load_model, save_checkpoint
from lmstack.config import ModelConfig
from lmstack.models import kernels
from lmstack.models import qformats as qf
from lmstack.models.qlinear import QuantEmbedding, QuantLinear, native_layout
from lmstack.models.quant import quantize_model
from lmstack.models.transformer import Transformer

NATIVE = [p for p in ("avx512", "avx2") if p in kernels.supported_paths() and kernels.extension(p) is not None]
needs_native = pytest.mark.skipif(not NATIVE, reason="no native kernels on this CPU")


@pytest.fixture
def native_path():
    kernels.set_kernel_path(NATIVE[-1] if NATIVE else None)
    yield
    kernels.set_kernel_path(None)


@pytest.mark.parametrize("fmt", qf.R16_FORMATS)
@pytest.mark.parametrize("rows", [16, 37, 5])
def test_repack_is_a_permutation_undone_by_unrepack(fmt, rows):
    w = qf.pack(torch.randn(rows, 96), fmt)
    r = w.clone()
    assert qf.repack_r16_(r, 96, fmt) == (rows >= 16)
    assert torch.equal(torch.sort(r.view(-1)).values, torch.sort(w.view(-1)).values)  # same bytes, moved
    assert torch.equal(r[rows // 16 * 16:], w[rows // 16 * 16:])  # rows past the last group: GGUF's layout
    assert torch.equal(qf.unrepack_r16(r, 96, fmt), w)
    idx = torch.tensor([0, rows - 1, rows // 2, 0])
    assert torch.equal(qf.rows_r16(r, idx, 96, fmt), w[idx])
    for isa in NATIVE:  # the kernels' in-place repack (one group at a time) = this reference
        n = w.clone()
        qf.repack_r16_(n, 96, fmt, native=kernels.extension(isa))
        assert torch.equal(n, r)


def test_interleaved_bytes_by_hand():
    """Block 0 of a group: d of rows 0..15, then chunk c = quant bytes 4c..4c+3 of each row (Q8_0)."""
    w = qf.pack(torch.randn(16, 64), "q8_0")  # 2 blocks of 34 bytes per row
    r = w.clone()
    qf.repack_r16_(r, 64, "q8_0")
    flat = r.view(-1)
    assert torch.equal(flat[2 * 5:2 * 5 + 2], w[5, 0:2])  # row 5's d of block 0
    assert torch.equal(flat[32 + 64 * 3 + 4 * 7:32 + 64 * 3 + 4 * 7 + 4], w[7, 2 + 12:2 + 16])  # row 7, chunk 3
    assert torch.equal(flat[16 * 34:16 * 34 + 2], w[0, 34:36])  # block 1 starts with row 0's d of block 1


def test_mixed_layer_interleaves_only_its_32_value_runs():
    fmt = "q4_1:32,q5_0:16,q8_0:20"
    parts = [qf.pack(torch.randn(n, 64), f) for f, n in qf.segments(fmt)]
    w = torch.cat([p.view(-1) for p in parts])
    r = w.clone()
    assert qf.repack_r16_(r, 64, fmt)
    (a, _), (b, _), (c, _) = qf.split_segments(r, 64, fmt)
    assert not torch.equal(a, parts[0]) and torch.equal(b, parts[1])  # q5_0 keeps GGUF's layout
    assert torch.equal(c[16:], parts[2][16:])
    assert torch.equal(qf.unrepack_r16(r, 64, fmt), w)


@needs_native
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0:32,q4_0:48"])
def test_interleaved_layer_computes_the_same_and_saves_gguf_bytes(fmt, native_path):
    torch.manual_seed(0)
    parts = qf.segments(fmt) or [(fmt, 48)]
    n = sum(k for _, k in parts)
    packed = torch.cat([qf.pack(torch.randn(k, 128), f).view(-1) for f, k in parts])
    q = QuantLinear(128, n, fmt, bias=True, qweight=packed.view(qf.packed_shape(n, 128, fmt)).clone())
    q.bias.normal_()
    x = {M: torch.randn(M, 128) for M in (1, 4, 9, 40, 300)}  # matvec, tiles, remainders, the prefill GEMM
    before = {M: q(v) for M, v in x.items()}
    sd_before = {k: v.clone() for k, v in q.state_dict().items()}
    assert q.to_native_layout() and q.layout == "r16" and q.fmt_id & qf.R16
    assert not torch.equal(q.qweight.view(-1), packed)
    for M, v in x.items():
        # from GEMM_MIN_ROWS rows the GGUF-layout layer ran the float GEMM and the interleaved one may still run the
        # integer kernel (gemm_min_rows): int8-activation vs float math, ~1e-2 apart
        tol = 3e-2 * before[M].abs().max().item() if M >= kernels.GEMM_MIN_ROWS else 1e-5
        torch.testing.assert_close(q(v), before[M], rtol=tol, atol=tol)
    sd = q.state_dict()
    assert torch.equal(sd["qweight"], sd_before["qweight"])  # checkpoints hold GGUF's bytes
    torch.testing.assert_close(q.dequantize(), QuantLinear(128, n, fmt, qweight=sd["qweight"]).dequantize())
    fresh = QuantLinear(128, n, fmt, bias=True)
    fresh.to_native_layout()  # an interleaved module filled from GGUF's bytes re-interleaves them
    fresh.load_state_dict(sd)
    assert fresh.layout == "r16"
    torch.testing.assert_close(fresh(x[1]), before[1], rtol=1e-5, atol=1e-5)
    kernels.set_kernel_path("torch")  # the float reference path reads the interleaved bytes too
    torch.testing.assert_close(q(x[1]), x[1] @ q.dequantize().T + q.bias, rtol=1e-5, atol=1e-5)


CFG = ModelConfig(vocab_size=100, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos_emb="rope",
                  norm="rmsnorm", mlp="swiglu", intermediate_size=96, bias=False, tie_embeddings=True)


@needs_native
def test_tied_head_interleaved_with_its_embedding_and_checkpoint_roundtrip(tmp_path, native_path):
    torch.manual_seed(0)
    float_model = Transformer(CFG).eval()
    kernels.set_kernel_path("torch")  # quantized without the native layout: the reference
    ref = quantize_model(Transformer(CFG).eval(), "q8_0")
    ref.load_state_dict(quantize_model(float_model, "q8_0").state_dict())
    kernels.set_kernel_path(NATIVE[-1])
    model = quantize_model(Transformer(CFG).eval(), "q8_0")
    model.load_state_dict(ref.state_dict())
    assert native_layout(model) == 0  # loaded into interleaved modules: already interleaved again
    assert model.lm_head.layout == "r16" and model.tok_emb.layout == "r16"
    assert model.lm_head.qweight.data_ptr() == model.tok_emb.qweight.data_ptr()
    assert isinstance(model.tok_emb, QuantEmbedding)
    ids = torch.tensor([[0, 99, 17, 64, 80, 3]])  # rows in whole groups and past them (96..99)
    torch.testing.assert_close(model.tok_emb(ids), ref.tok_emb(ids), rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-3, atol=1e-3)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    save_checkpoint(tmp_path / "ck", model, None)
    loaded = load_model(tmp_path / "ck")[0]
    assert {m.layout for m in loaded.modules() if isinstance(m, QuantLinear)} == {"r16"}
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-5)
