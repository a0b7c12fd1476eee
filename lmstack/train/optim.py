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
    for _ in range(steps):  # x <- a x + (b s + c s^2) x with s = x x^T: two fused baddbmm calls (no elementwise passes)
        s = torch.matmul(x, x.mT)
        x = _baddmm(x, _baddmm(s, s, s, beta=b, alpha=c), x, beta=a)
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def _baddmm(inp: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, beta: float, alpha: float = 1.0) -> torch.Tensor:
    """beta * inp + alpha * (m1 @ m2) in one call, for a single matrix or a stack of them."""
    if inp.dim() == 2:
        return torch.addmm(inp, m1, m2, beta=beta, alpha=alpha)
    return torch.baddbmm(inp, m1, m2, beta=beta, alpha=alpha)


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
            (self._muon_group if group["muon"] else self._adamw_group)(group)
        return loss

    def _adamw_group(self, group: dict) -> None:
        """AdamW on the group's parameters with foreach ops (a handful of calls for the whole group, the same
        arithmetic per element as the textbook loop)."""
        lr, wd, (b1, b2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        by_step: dict[float, list] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            by_step.setdefault(float(state["step"]), []).append(p)
        for t, params in by_step.items():  # one entry unless parameters joined the group at different steps
            grads = [p.grad for p in params]
            avgs = [self.state[p]["exp_avg"] for p in params]
            sqs = [self.state[p]["exp_avg_sq"] for p in params]
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(avgs, grads, 1 - b1)
            torch._foreach_mul_(sqs, b2)
            torch._foreach_addcmul_(sqs, grads, grads, value=1 - b2)
            denom = torch._foreach_div(sqs, 1 - b2 ** t)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, avgs, denom, value=-lr / (1 - b1 ** t))

    def _muon_group(self, group: dict) -> None:
        """Momentum, then one batched Newton–Schulz call per weight shape (all layers at once)."""
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        bufs = []
        for p in params:
            state = self.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, grads)
        gs = torch._foreach_add(grads, bufs, alpha=mom) if group["nesterov"] else bufs
        by_shape: dict[tuple, list] = {}
        for p, g in zip(params, gs):
            by_shape.setdefault(tuple(p.shape), []).append((p, g))
        for shape, items in by_shape.items():
            upd = orthogonalize(torch.stack([g for _, g in items]), group["ns_steps"], dtype=self.ns_dtype)
            scale = -lr * max(1.0, shape[0] / shape[1]) ** 0.5
            ps = [p for p, _ in items]
            if wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_add_(ps, list(upd.unbind(0)), alpha=scale)
