"""Compute-optimal scaling laws: how many parameters N and tokens D a FLOP budget C buys, and the loss to expect.

Every law here has a compute-optimal frontier that is a power law, N_opt = k * C^p, with training compute C = 6 N D
(forward + backward, dense Transformer, attention ignored). So given any one of C, N or D the other two follow:

    N = k C^p            C = (N / k)^(1/p)            C = (6 k D)^(1/(1-p))            D = C / (6 N)

Methods (`LAWS`):
  rule20    D = 20 N (the Chinchilla rule of thumb), so N = sqrt(C / 120). Its loss column uses the `epoch` fit.
  hoffmann  Hoffmann et al. 2022 ("Chinchilla"), approach 3: L(N, D) = E + A/N^a + B/D^b with E=1.69, A=406.4,
            B=410.7, a=0.34, b=0.28. Minimising L along C = 6ND gives N_opt = G (C/6)^(b/(a+b)),
            D_opt = (C/6)^(a/(a+b)) / G, G = (aA / (bB))^(1/(a+b)).
  epoch     Besiroglu et al. 2024 ("Chinchilla scaling: a replication attempt", Epoch AI): the same form refitted to
            the paper's own data, E=1.82, A=482.01, B=2085.43, a=0.3478, b=0.3658. It agrees with the 70B / 1.4T
            Chinchilla the paper trained; the published hoffmann constants do not (they put ~32B at Gopher's budget).
  kaplan    Kaplan et al. 2020, for comparison: N_opt = 1.3e9 (C / 1 PF-day)^0.73 (their Table 6, N non-embedding,
            1 PF-day = 8.64e19 FLOPs), D = C / (6N), and loss by their eq. 1.5,
            L(N, D) = [(N_c/N)^(a_N/a_D) + D_c/D]^a_D with N_c=8.8e13, a_N=0.076, D_c=5.4e13, a_D=0.095,
            which reduces to L(N) = (N_c/N)^a_N and L(D) = (D_c/D)^a_D at the limits. Kaplan's loss is nats/token on
            WebText2 with GPT-2's tokenizer: not comparable with the MassiveText losses of the other rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LMStackError

PF_DAY = 8.64e19  # FLOPs in one petaFLOP/s-day

#: dense bf16 peak FLOP/s of common accelerators (no sparsity); cpu is a rough order of magnitude, not a measurement
GPU_PEAK_FLOPS = {"h100": 989e12, "a100": 312e12, "v100": 125e12, "l4": 121e12, "cpu": 1e12}
DEFAULT_MFU = 0.4


@dataclass(frozen=True)
class Parametric:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    @property
    def a(self) -> float:
        """N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    def n_opt(self, c: float) -> float:
        return self.G * (c / 6) ** self.a

    def d_opt(self, c: float) -> float:
        return (c / 6) ** self.b / self.G


HOFFMANN = Parametric(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
EPOCH = Parametric(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def kaplan_loss(n: float, d: float, n_c: float = 8.8e13, d_c: float = 5.4e13, a_n: float = 0.076,
                a_d: float = 0.095) -> float:
    """Kaplan et al. 2020 eq. 1.5 (nats/token on WebText2; not comparable with the Chinchilla losses)."""
    return ((n_c / n) ** (a_n / a_d) + d_c / d) ** a_d


@dataclass(frozen=True)
class Law:
    """A compute-optimal frontier N_opt = k C^p and a loss function L(N, D)."""
    name: str
    k: float
    p: float
    loss_fn: object  # (n, d) -> loss
    note: str

    def n_from_flops(self, c: float) -> float:
        return self.k * c ** self.p

    def flops_from_params(self, n: float) -> float:
        return (n / self.k) ** (1 / self.p)

    def flops_from_tokens(self, d: float) -> float:
        return (6 * self.k * d) ** (1 / (1 - self.p))


def _from_parametric(name: str, f: Parametric, note: str) -> Law:
    return Law(name, f.G * 6 ** -f.a, f.a, f.loss, note)


LAWS: dict[str, Law] = {
    "rule20": Law("rule20", 120 ** -0.5, 0.5, EPOCH.loss, "D = 20 N; loss from the epoch fit"),
    "hoffmann": _from_parametric("hoffmann", HOFFMANN, "Hoffmann et al. 2022 approach-3 constants"),
    "epoch": _from_parametric("epoch", EPOCH, "Besiroglu et al. 2024 refit of Chinchilla's data"),
    "kaplan": Law("kaplan", 1.3e9 * PF_DAY ** -0.73, 0.73, kaplan_loss,
                  "Kaplan et al. 2020; loss in nats on WebText2 (other tokenizer): not comparable"),
}


def peak_flops(gpu: str | None = None, peak: float | None = None) -> float:
    if peak is not None:
        if not peak > 0:
            raise LMStackError(f"--peak-flops must be a positive FLOP/s figure, got {peak}")
        return peak
    gpu = (gpu or "h100").lower()
    if gpu not in GPU_PEAK_FLOPS:
        raise LMStackError(f"unknown --gpu {gpu!r}; choose one of {', '.join(GPU_PEAK_FLOPS)} or give --peak-flops")
    return GPU_PEAK_FLOPS[gpu]


def _positive(name: str, v: float | None) -> None:
    if v is not None and not (math.isfinite(v) and v > 0):
        raise LMStackError(f"{name} must be a positive finite number, got {v}")


def plan(method: str, flops: float | None = None, params: float | None = None, tokens: float | None = None,
         peak: float | None = None, mfu: float = DEFAULT_MFU, gpu: str | None = None,
         flops_per_token: float | None = None) -> dict:
    """The compute-optimal point of one law for exactly one of flops / params / tokens.

    Returns {method, params, tokens, flops, train_flops, loss, seconds, ...}. `flops` is 6ND; `train_flops` adds
    attention when `flops_per_token` (a model shape's, from ModelConfig.flops_per_token) is given, else equals it.
    `seconds` is train_flops / (peak * mfu)."""
    if method not in LAWS:
        raise LMStackError(f"unknown scaling method {method!r}; choose one of {', '.join(LAWS)} or all")
    given = [(k, v) for k, v in (("--flops", flops), ("--params", params), ("--tokens", tokens)) if v is not None]
    if len(given) != 1:
        raise LMStackError("give exactly one budget: --flops C, --params N or --tokens D"
                           + (f" (got {', '.join(k for k, _ in given)})" if given else ""))
    _positive(*given[0])
    if not (0 < mfu <= 1):
        raise LMStackError(f"--mfu is a fraction of peak in (0, 1], got {mfu}")
    law = LAWS[method]
    if flops is not None:
        c = flops
        n = law.n_from_flops(c)
    elif params is not None:
        n = params
        c = law.flops_from_params(n)
    else:
        c = law.flops_from_tokens(tokens)
        n = law.n_from_flops(c)
    d = c / (6 * n)
    train = flops_per_token * d if flops_per_token else c
    pk = peak_flops(gpu, peak)
    return {"method": method, "given": given[0][0].lstrip("-"), "params": n, "tokens": d, "flops": c,
            "train_flops": train, "tokens_per_param": d / n, "loss": float(law.loss_fn(n, d)),
            "peak_flops": pk, "mfu": mfu, "seconds": train / (pk * mfu), "note": law.note}


def plan_all(methods: list[str] | None = None, **kw) -> list[dict]:
    return [plan(m, **kw) for m in (methods or list(LAWS))]


NOTES = (
    "Training FLOPs are 6ND (dense forward + backward); give a model shape (--preset) to add attention "
    "(6·L·T·d per token).",
    "At Gopher's budget (5.76e23 FLOPs) rule20 gives ~69B params / 1.4T tokens and epoch ~72B / 1.3T, close to the "
    "70B / 1.4T Chinchilla that Hoffmann et al. trained; their published approach-3 constants (hoffmann) give "
    "~32B / 3.0T instead: the discrepancy Besiroglu et al. 2024 found, fixed by their refit (epoch).",
    "kaplan's loss is nats/token on WebText2 with another tokenizer: compare its N and D, not its loss.",
)


def human(x: float, unit: str = "") -> str:
    """1.23e10 -> '12.3B'."""
    for div, s in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{s}{unit}"
    return f"{x:.3g}{unit}"


def human_seconds(s: float) -> str:
    for div, u in ((86400 * 365, "years"), (86400, "days"), (3600, "hours"), (60, "min")):
        if s >= div:
            return f"{s / div:.3g} {u}"
    return f"{s:.3g} s"


def plan_table(rows: list[dict]) -> str:
    """A markdown table of plan() rows plus the notes."""
    out = ["| method | params | tokens | tokens/param | FLOPs (6ND) | train FLOPs | loss | wall time |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {human(r['params'])} | {human(r['tokens'])} | {r['tokens_per_param']:.1f} | "
                   f"{r['flops']:.3g} | {r['train_flops']:.3g} | {r['loss']:.3f} | {human_seconds(r['seconds'])} |")
    r = rows[0]
    out.append(f"\nwall time at {r['peak_flops']:.3g} FLOP/s peak x {r['mfu']:g} MFU, one device"
               + (" (cpu peak is a rough 1e12)" if r["peak_flops"] == GPU_PEAK_FLOPS["cpu"] else ""))
    out += [f"- {n}" for n in NOTES]
    return "\n".join(out)
