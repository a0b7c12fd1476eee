"""Muon: momentum + Newton–Schulz orthogonalisation for the hidden weight matrices, AdamW for the rest.

One optimizer object with two kinds of parameter groups (`muon: True` / `muon: False`) so checkpoints and the
LR schedule treat it like any other torch optimizer. Each group may carry `lr_scale`: the schedule sets
lr = schedule(step) * lr_scale, which lets Muon's larger learning rate share one schedule with AdamW's.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately replace G = U S V^T by U V^T with a quintic Newton–Schulz iteration (coefficients chosen to
    push all singular values into roughly [0.7, 1.2] quickly; exact orthogonality is not needed, so the iteration
    may run in bfloat16, as Muon does on GPUs: the Trainer asks for that when it trains in bfloat16)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype = torch.float32):
        self.ns_dtype = ns_dtype  # not a group hyperparameter: a checkpoint resumed elsewhere uses that run's choice
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=weight_decay, muon=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            if group["muon"]:
                self._muon_group(group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if wd:
                    p.mul_(1 - lr * wd)
                b1, b2 = group["betas"]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(p.grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))
        return loss

    def _muon_group(self, group: dict) -> None:
        """Momentum, then one batched Newton–Schulz call per weight shape (all layers at once)."""
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[tuple, list] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(p)
            buf.mul_(mom).add_(p.grad)
            g = p.grad.add(buf, alpha=mom) if group["nesterov"] else buf
            by_shape.setdefault(tuple(p.shape), []).append((p, g))
        for shape, items in by_shape.items():
            upd = orthogonalize(torch.stack([g for _, g in items]), group["ns_steps"], dtype=self.ns_dtype)
            scale = -lr * max(1.0, shape[0] / shape[1]) ** 0.5
            for (p, _), u in zip(items, upd):
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(u, alpha=scale)
