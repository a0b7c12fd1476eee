"""models/attention.attend: the matmul path for short CPU sequences against scaled_dot_product_attention."""
import pytest
import torch
import torch.nn.functional as F

from lmstack.models import attention
from lmstack.models.attention import attend


def _qkv(b, h, t, d, s=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g)
    k, v = (torch.randn(b, h, s or t, d, generator=g) for _ in range(2))
    return [x.requires_grad_() for x in (q, k, v)]


@pytest.mark.parametrize("kw", [{"is_causal": True}, {"is_causal": False}, {"is_causal": True, "scale": 0.3}, {}])
@pytest.mark.parametrize("shape", [(3, 4, 17, 8), (1, 2, 1, 8), (2, 3, 64, 32)])
def test_matmul_path_matches_sdpa_values_and_gradients(shape, kw):
    q, k, v = _qkv(*shape)
    assert attention._matmul_path(q, k, v, dict(kw))
    y = attend(q, k, v, **kw)
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q2, k2, v2, **kw)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_matmul_path_with_more_keys_than_queries_unmasked():
    q, k, v = _qkv(2, 2, 5, 8, s=11)
    torch.testing.assert_close(attend(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_bf16_inputs_take_a_float32_softmax():
    q, k, v = (x.detach().bfloat16() for x in _qkv(2, 2, 40, 16))
    y = attend(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


def test_which_calls_keep_the_sdpa_kernel(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = _qkv(1, 2, 16, 8)
    attend(q, k, v, is_causal=True)
    assert calls == []  # short and causal: two matmuls and a softmax
    long_q, long_k, long_v = _qkv(1, 2, 200, 8)
    attend(long_q, long_k, long_v, is_causal=True, dropout_p=0.1)
    assert calls == []  # dropout at any length: no fused CPU kernel takes it
    with torch.no_grad():
        attend(long_q, long_k, long_v, is_causal=True)  # inference past 128 queries: the flash kernel
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    attend(q, k, v, attn_mask=mask)  # an explicit mask
    kv = _qkv(1, 1, 16, 8)[1:]
    attend(q, *kv, enable_gqa=True)  # grouped-query broadcasting
    short_q = _qkv(1, 2, 4, 8)[0]
    attend(short_q, k, v, is_causal=True)  # causal with more keys than queries (SDPA aligns it top-left)
    assert len(calls) == 4


def test_dropout_on_the_matmul_path_drops_attention_weights():
    q, k, v = _qkv(2, 2, 16, 8)
    torch.manual_seed(0)
    a = attend(q, k, v, is_causal=True, dropout_p=0.5)
    torch.manual_seed(1)
    b = attend(q, k, v, is_causal=True, dropout_p=0.5)
    plain = attend(q, k, v, is_causal=True)
    assert not torch.allclose(a, b) and not torch.allclose(a, plain)
    many = torch.stack([attend(q, k, v, is_causal=True, dropout_p=0.5) for _ in range(400)]).mean(0)
    torch.testing.assert_close(many, plain, atol=0.25, rtol=0)  # inverted dropout keeps the expectation
