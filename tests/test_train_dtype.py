"""`dtype: auto`: bf16 autocast where the CPU (or GPU) multiplies bf16 natively, float32 elsewhere; the pieces it
changes (attention kept in float32 under CPU autocast, Muon's Newton–Schulz in bf16) against float references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import read_jsonl, tiny_run_config
from lmstack.errors import ConfigError
from lmstack.models import kernels
from lmstack.models.transformer import attend
from lmstack.train import TrainConfig, pretrain
from lmstack.train.optim import orthogonalize
from lmstack.train.trainer import resolve_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags,want", [({"avx2", "amx_bf16", "avx512_bf16"}, "bfloat16"),
                                        ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
                                        ({"avx2", "fma"}, "float32"), (set(), "float32")])
def test_auto_follows_the_cpu_flags(monkeypatch, flags, want):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    got, why = resolve_dtype("auto", CPU)
    assert got == want
    if want == "bfloat16":
        assert all(f in why for f in flags & {"amx_bf16", "avx512_bf16"}), why
    else:
        assert "no native bf16" in why, why


def test_explicit_dtype_is_kept(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: set())
    assert resolve_dtype("bfloat16", CPU)[0] == "bfloat16"
    assert resolve_dtype("float32", CPU)[0] == "float32"


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ConfigError, match="auto"):
        TrainConfig(dtype="half")


def test_long_attention_under_cpu_autocast_runs_in_float32():
    g = torch.Generator().manual_seed(0)
    t = 300  # past the matmul path's length limit: the flash kernel, in float32 (its bf16 backward is slow)
    q, k, v = (torch.randn(1, 2, t, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attend(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q.detach().float(), k.detach().float(), v.detach().float(), is_causal=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()  # gradients reach the bf16 inputs in their own dtype
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
    mask = torch.zeros(t, t, dtype=torch.bfloat16).masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ym = attend(q, k, v, attn_mask=mask)  # a float mask in the autocast dtype is cast with q, k, v
    torch.testing.assert_close(ym, ref, atol=1e-5, rtol=1e-5)


def test_short_attention_under_cpu_autocast_is_bf16_matmuls_close_to_float32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16, generator=g).requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attend(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    assert y.dtype == torch.bfloat16  # the two matmuls ran in bf16, the softmax in float32
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)
    y.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0


def test_bf16_newton_schulz_stays_close_to_float32():
    g = torch.randn(3, 48, 96, generator=torch.Generator().manual_seed(1))
    ref = orthogonalize(g)
    low = orthogonalize(g, dtype=torch.bfloat16)
    assert low.dtype == g.dtype
    assert (low - ref).norm() / ref.norm() < 0.05
    s = torch.linalg.svdvals(low)
    assert s.min() > 0.5 and s.max() < 1.4  # still (roughly) orthogonal: singular values near 1


def _run(tmp_path, corpus_file, name, dtype, **over):
    cfg = tiny_run_config(tmp_path / name, corpus_file, optimizer="muon", lr=3e-3, max_steps=12, eval_interval=12,
                          final_eval_windows=0, dtype=dtype, **over)
    summary = pretrain(cfg, log=lambda *a: None)
    return summary, [r["train_loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train_loss" in r]


def test_auto_on_a_cpu_without_bf16_is_exactly_float32(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma"})
    s_auto, auto = _run(tmp_path, corpus_file, "auto", "auto")
    _, f32 = _run(tmp_path, corpus_file, "f32", "float32", data_dir=str(tmp_path / "auto" / "data"))
    assert s_auto["dtype"] == "float32"
    assert auto == f32  # the same floats, step for step


def test_auto_on_a_bf16_cpu_trains_in_bf16(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16", "avx512_bf16"})
    s_auto, auto = _run(tmp_path, corpus_file, "auto", "auto")
    _, f32 = _run(tmp_path, corpus_file, "f32", "float32", data_dir=str(tmp_path / "auto" / "data"))
    assert s_auto["dtype"] == "bfloat16"
    assert auto != f32  # bf16 matmuls: not the float32 run's floats ...
    assert auto[-1] < auto[0] - 0.3  # ... but it learns,
    assert abs(auto[-1] - f32[-1]) < 0.05 * f32[-1]  # and lands where float32 does
