"""Muon's fused pieces against the textbook formulas: the AdamW half against torch.optim.AdamW, the Newton–Schulz
iteration (two fused baddbmm calls per step) against plain matmuls, the Muon update against a per-matrix loop."""
from __future__ import annotations

import pytest
import torch

from lmstack.train.optim import Muon, orthogonalize


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(7,), (5, 3), (4, 6, 2), (11,)]]


def _grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_adamw_half_matches_torch_adamw():
    ours, ref = _params(0), _params(0)
    hyper = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = Muon([{"params": ours, "muon": False}], **hyper)
    ref_opt = torch.optim.AdamW(ref, **hyper)
    for step in range(6):
        _grads(ours, step)
        _grads(ref, step)
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert all(float(opt.state[p]["step"]) == 6 for p in ours)


def test_adamw_half_handles_parameters_joining_later():
    first, late = _params(1)[:2], _params(2)[2:]
    ref_first, ref_late = _params(1)[:2], _params(2)[2:]
    opt = Muon([{"params": first + late, "muon": False}], lr=1e-2)
    ref_opt = torch.optim.AdamW(ref_first + ref_late, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for step in range(4):
        for group in (first + late, ref_first + ref_late):
            _grads(group, step)
            if step < 2:  # the late ones get no gradient at first: their step counts lag
                for p in group[2:]:
                    p.grad = None
        opt.step()
        ref_opt.step()
    for a, b in zip(first + late, ref_first + ref_late):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert float(opt.state[late[0]]["step"]) == 2 and float(opt.state[first[0]]["step"]) == 4


def _plain_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    if x.shape[-2] > x.shape[-1]:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.mT if g.shape[-2] > g.shape[-1] else x


def test_orthogonalize_matches_the_plain_iteration():
    gen = torch.Generator().manual_seed(3)
    for shape in [(16, 40), (40, 16), (3, 12, 20), (2, 20, 12)]:
        g = torch.randn(*shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(orthogonalize(g, dtype=torch.float64), _plain_newton_schulz(g), atol=1e-10,
                                   rtol=1e-10)


def test_muon_update_matches_a_per_matrix_loop():
    gen = torch.Generator().manual_seed(4)
    mats = [torch.nn.Parameter(torch.randn(8, 12, generator=gen)) for _ in range(3)]
    mats.append(torch.nn.Parameter(torch.randn(12, 8, generator=gen)))
    ref = [torch.nn.Parameter(m.detach().clone()) for m in mats]
    lr, mom, wd = 0.02, 0.9, 0.05
    opt = Muon([{"params": mats, "muon": True}], lr=lr, momentum=mom, weight_decay=wd)
    bufs = [torch.zeros_like(m) for m in ref]
    for step in range(3):
        _grads(mats, step)
        _grads(ref, step)
        opt.step()
        with torch.no_grad():
            for p, buf in zip(ref, bufs):
                buf.mul_(mom).add_(p.grad)
                u = orthogonalize(p.grad + mom * buf)
                p.mul_(1 - lr * wd).add_(u, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)
    for a, b in zip(mats, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_muon_ns_steps_reaches_the_optimizer_and_is_validated():
    from lmstack.errors import ConfigError
    from lmstack.train.config import TrainConfig
    from lmstack.train.trainer import build_optimizer
    gen = torch.Generator().manual_seed(5)
    m = torch.nn.Parameter(torch.randn(8, 12, generator=gen))
    m.muon_ok = True
    opt = build_optimizer([m], TrainConfig(optimizer="muon", muon_ns_steps=3))
    assert [g["ns_steps"] for g in opt.param_groups] == [3]
    m.grad = torch.randn(8, 12, generator=gen)
    before = m.detach().clone()
    opt.step()  # momentum buffer = grad, nesterov: g + 0.95 g
    u = orthogonalize(1.95 * m.grad, steps=3)
    lr = opt.param_groups[0]["lr"]
    torch.testing.assert_close(m.detach(), before - lr * u, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(orthogonalize(m.grad, steps=3), orthogonalize(m.grad, steps=5))
    with pytest.raises(ConfigError, match="muon_ns_steps"):
        TrainConfig(optimizer="muon", muon_ns_steps=0).validate()
