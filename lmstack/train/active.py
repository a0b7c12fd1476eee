"""Active learning for human feedback: which pair of candidate completions should the labeller judge next?

* `Featurizer`: a frozen LM turns each (prompt, completion) into one fixed float32 vector (the final hidden states
  mean-pooled over the completion's tokens, encoded exactly as the reward model encodes it: data.prefs.encode_pair).
* `RewardEnsemble`: K linear heads over those features (standardised), each fit on a bootstrap resample of the
  votes with the L2-regularised Bradley-Terry loss (and, when ratings are given, a squared-error term on the ratings
  mapped to `rating_target`). Full-batch L-BFGS on all members at once: well under a second for hundreds of votes.
* `pair_information`: how much a vote on a pair is expected to teach the ensemble — "disagreement" (variance over
  members of P(a > b)) or "bt" (closeness of the ensemble-mean P(a > b) to 0.5).
* `ActiveLearner`: what the feedback page holds — votes and ratings come in, `fit()` refits (from a background
  thread), `rank()` picks the most informative pair among a prompt's candidates. Thread-safe.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.prefs import check_rating, collate, encode_pair, rating_target
from ..errors import LMStackError
from ..models.utils import eval_mode

METHODS = ("disagreement", "bt", "infogain")


# ---- features --------------------------------------------------------------------------------------------------
class Featurizer:
    """Frozen LM -> one float32 vector per (prompt, completion): the final hidden states mean-pooled over the
    completion's tokens (prompt + completion + end token, as the reward model sees it; over-long inputs lose prompt
    tokens first). `lm`: an `lmstack.load` LM (anything with .model and .tokenizer)."""

    def __init__(self, lm, max_tokens: int = 256, batch_size: int = 8):
        self.model, self.tokenizer = lm.model, lm.tokenizer
        self.max_tokens = min(int(max_tokens), self.model.config.block_size)
        self.batch_size = max(1, int(batch_size))
        self.dim = self.model.config.n_embd

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise LMStackError(f"{len(prompts)} prompts but {len(completions)} completions")
        seqs = [encode_pair(self.tokenizer, p, c, self.max_tokens) for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        causal = getattr(self.model.config, "causal", True)
        out = []
        with eval_mode(self.model):
            for i in range(0, len(seqs), self.batch_size):
                ids, attn, comp = collate(seqs[i:i + self.batch_size], device=device)
                h = self.model(ids, return_hidden=True, padding_mask=None if causal else attn).float()
                m = comp.unsqueeze(-1).float()
                out.append(((h * m).sum(1) / m.sum(1).clamp(min=1.0)).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


# ---- the ensemble ----------------------------------------------------------------------------------------------
class RewardEnsemble:
    """K linear reward heads r_k(x) = w_k . (x - mu) / sigma + b_k over fixed features. `fit` draws each member's
    bootstrap resample of the pairs (and of the ratings) from a generator seeded with `seed`: deterministic."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                 cov: torch.Tensor | Callable[[], torch.Tensor] | None = None):
        self.weight, self.bias, self.mu, self.sigma = weight, bias, mu, sigma   # [K, d], [K], [d], [d]
        self._cov = cov  # [d, d] Laplace posterior covariance, or a function computing it on first use (a d^3 solve)

    @property
    def cov(self) -> torch.Tensor:
        """[d, d] Laplace posterior covariance of the mean head over standardised features (laplace_cov)."""
        if callable(self._cov):
            self._cov = self._cov()
        if self._cov is None:
            raise LMStackError("this ensemble has no posterior covariance; fit it with RewardEnsemble.fit")
        return self._cov

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def fit(cls, chosen: torch.Tensor, rejected: torch.Tensor, members: int = 5, seed: int = 0,
            ratings: tuple[torch.Tensor, torch.Tensor] | None = None, l2: float = 1.0,
            rating_weight: float = 1.0, max_iter: int = 200) -> "RewardEnsemble":
        """chosen/rejected: [n, d] features of each pair's preferred and other completion; ratings: (features [m, d],
        1-7 ratings [m]). Loss per member: mean BT loss on its resample + rating_weight * mean squared error of
        r(x) against rating_target(rating) + l2 * |w|^2."""
        chosen, rejected = chosen.float(), rejected.float()
        if chosen.shape != rejected.shape or chosen.dim() != 2:
            raise LMStackError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must both be [n, d]")
        rf, rv = ((ratings[0].float(), ratings[1].float()) if ratings is not None and len(ratings[1])
                  else (chosen.new_zeros(0, chosen.shape[1]), chosen.new_zeros(0)))
        n, m, d = chosen.shape[0], rf.shape[0], chosen.shape[1]
        if n + m == 0:
            raise LMStackError("no votes or ratings to fit a reward model on")
        if members < 1:
            raise LMStackError(f"members must be >= 1, got {members}")
        allx = torch.cat([chosen, rejected, rf])
        mu, sigma = allx.mean(0), allx.std(0, unbiased=False).clamp(min=1e-6)
        g = torch.Generator().manual_seed(int(seed))
        diff = (chosen - rejected) / sigma
        D = diff[torch.randint(n, (members, n), generator=g)] if n else diff.new_zeros(members, 0, d)
        if m:
            ri = torch.randint(m, (members, m), generator=g)
            R, y = ((rf - mu) / sigma)[ri], rating_target(rv)[ri]
        W = torch.zeros(members, d, requires_grad=True)
        b = torch.zeros(members, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure():
            opt.zero_grad()
            loss = l2 * (W * W).sum()
            if n:
                loss = loss + F.softplus(-torch.einsum("knd,kd->kn", D, W)).mean(1).sum()
            if m:
                pred = torch.einsum("kmd,kd->km", R, W) + b[:, None]
                loss = loss + rating_weight * ((pred - y) ** 2).mean(1).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        W = W.detach()
        rz = (rf - mu) / sigma
        return cls(W, b.detach(), mu, sigma, lambda: laplace_cov(W.mean(0), diff, rz, l2, rating_weight))

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """[members, n] reward of each feature row under each member."""
        return (((feats.float() - self.mu) / self.sigma) @ self.weight.T).T + self.bias[:, None]

    def mean(self, feats: torch.Tensor) -> torch.Tensor:
        """[n] ensemble-mean reward."""
        return self.scores(feats).mean(0)


def laplace_cov(w: torch.Tensor, diff: torch.Tensor, rated: torch.Tensor, l2: float,
                rating_weight: float) -> torch.Tensor:
    """Posterior covariance of the head w under the Laplace approximation, in units of one vote: the inverse of
    sum_i p_i (1 - p_i) d_i d_i^T (the Bradley-Terry Fisher information of the n votes, p_i = sigmoid(d_i . w)) plus
    n times the Hessian of the rest of the loss (2 l2 I, and the ratings' 2 rating_weight / m R^T R). One more vote
    on a pair d then adds p (1 - p) d d^T, exactly as the data term does."""
    n, d = diff.shape
    p = torch.sigmoid(diff @ w)
    scale = max(n, 1)
    prec = (diff * (p * (1 - p))[:, None]).T @ diff + scale * 2.0 * l2 * torch.eye(d)
    if rated.shape[0]:
        prec = prec + scale * 2.0 * rating_weight / rated.shape[0] * rated.T @ rated
    return torch.linalg.inv(prec.double()).float()


def pair_information(ens: RewardEnsemble, fa: torch.Tensor, fb: torch.Tensor,
                     method: str = "bt") -> torch.Tensor:
    """[n] expected information of asking about pair (a_i, b_i). "disagreement": the variance over members of
    P_k(a > b) = sigmoid(r_k(a) - r_k(b)) (0..0.25); "bt": p (1 - p) * 4 with p the members' mean P(a > b), 1 when
    the ensemble thinks the pair is a coin flip, 0 when it is sure (0..1); "infogain": the expected information
    gain about the head, 0.5 log(1 + p (1 - p) d^T C d) with d the pair's standardised feature difference and C the
    Laplace posterior covariance (a coin flip between two near-identical completions teaches little)."""
    if method not in METHODS:
        raise LMStackError(f"unknown information method {method!r}; use one of {', '.join(METHODS)}")
    p = torch.sigmoid(ens.scores(fa) - ens.scores(fb))           # [K, n]
    if method == "disagreement":
        return p.var(0, unbiased=False)
    pm = p.mean(0)
    if method == "bt":
        return 4.0 * pm * (1.0 - pm)
    d = (fa.float() - fb.float()) / ens.sigma
    return 0.5 * torch.log1p(pm * (1 - pm) * ((d @ ens.cov) * d).sum(-1))


def select_pairs(ens: RewardEnsemble, fa: torch.Tensor, fb: torch.Tensor, k: int, method: str = "bt",
                 exclude: torch.Tensor | None = None) -> list[int]:
    """The k pairs to ask about before the next refit. bt / disagreement: the k most informative. infogain: greedy,
    each pick's expected vote folded into the covariance (Sherman-Morrison) before the next, so one batch does not
    ask k times about the same direction. exclude: [n] bool, pairs already asked."""
    info = pair_information(ens, fa, fb, method)
    if exclude is not None:
        info = info.masked_fill(exclude, float("-inf"))
    k = min(int(k), int(torch.isfinite(info).sum()))
    if method != "infogain":
        return torch.topk(info, k).indices.tolist() if k > 0 else []
    pm = torch.sigmoid(ens.scores(fa) - ens.scores(fb)).mean(0)
    w = pm * (1 - pm)
    d = (fa.float() - fb.float()) / ens.sigma
    cd = d @ ens.cov                                             # [n, d]: C d_i (C symmetric)
    quad = (cd * d).sum(-1)
    picked: list[int] = []
    for _ in range(k):
        score = torch.log1p(w * quad)
        if exclude is not None:
            score = score.masked_fill(exclude, float("-inf"))
        if picked:
            score[picked] = float("-inf")
        j = int(torch.argmax(score))
        picked.append(j)
        u = cd[j]                                                # C d_j; C' = C - w_j u u^T / (1 + w_j d_j.u)
        proj = d @ u
        denom = 1 + w[j] * quad[j]
        quad = quad - w[j] * proj * proj / denom
        cd = cd - (w[j] / denom) * proj[:, None] * u[None, :]
    return picked


# ---- what the feedback page holds ------------------------------------------------------------------------------
class ActiveLearner:
    """Votes and ratings in, an ensemble out, the most informative pair of candidates on request.

    Every `heldout_every`-th decisive vote (the 5th, 10th, ... in arrival order; 0 = none) is held out: the ensemble
    is fit on the others, and `agreement` is the fraction of held-out votes whose chosen completion gets the higher
    ensemble-mean reward. `fit()` needs >= `min_votes` votes (else it only reports). Features are computed once per
    (prompt, completion) and cached. Thread-safe: one lock guards the votes, the cache and the fitted ensemble (held
    only briefly); a second lock serialises calls into `featurize` (the LM), so `fit()` in a background thread and
    `rank()` / `add_vote()` from request threads can overlap."""

    def __init__(self, featurize: Callable[[list[str], list[str]], torch.Tensor], members: int = 5,
                 method: str = "bt", min_votes: int = 8, heldout_every: int = 5, seed: int = 0,
                 l2: float = 1.0):
        if method not in METHODS:
            raise LMStackError(f"unknown active-learning method {method!r}; use one of {', '.join(METHODS)}")
        self.featurize, self.members, self.method = featurize, int(members), method
        self.min_votes, self.heldout_every, self.seed, self.l2 = int(min_votes), int(heldout_every), seed, l2
        self._lock = threading.Lock()
        self._feat_lock = threading.Lock()
        self._votes: list[tuple[str, str, str]] = []
        self._ratings: list[tuple[str, str, float]] = []
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._ens: RewardEnsemble | None = None
        self._fit_info: dict = {"votes": 0, "fitted_on": 0, "heldout": 0, "agreement": None, "members": self.members}
        self._fit_seq = 0     # the vote count of the installed fit (a slower, older fit never replaces a newer one)

    # -- input
    def add_vote(self, prompt: str, chosen: str, rejected: str) -> None:
        """A decisive a/b vote (ties and skips are not votes)."""
        with self._lock:
            self._votes.append((prompt, chosen, rejected))

    def add_rating(self, prompt: str, completion: str, rating: float) -> None:
        """A 1-7 rating of one completion (a regression term in the next fit)."""
        r = check_rating(rating)
        with self._lock:
            self._ratings.append((prompt, completion, r))

    # -- features
    def _features(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        keys = list(zip(prompts, completions))
        with self._lock:
            missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if missing:
            with self._feat_lock:
                f = self.featurize([k[0] for k in missing], [k[1] for k in missing])
            if f.shape[0] != len(missing):
                raise LMStackError(f"featurize returned {f.shape[0]} rows for {len(missing)} texts")
            with self._lock:
                self._cache.update(zip(missing, f.detach().float().cpu()))
        with self._lock:
            return torch.stack([self._cache[k] for k in keys])

    def _split(self, votes: list) -> tuple[list, list]:
        k = self.heldout_every
        if k <= 0:
            return votes, []
        return ([v for i, v in enumerate(votes) if (i + 1) % k], [v for i, v in enumerate(votes) if (i + 1) % k == 0])

    # -- fitting
    def fit(self) -> dict:
        """Refit on all votes except the held-out ones (plus all ratings); the result dict has "votes" (votes at this
        fit), "fitted_on", "heldout", "agreement" (None without held-out votes) and "members". With fewer than
        `min_votes` votes nothing is fitted and the current status is returned."""
        with self._lock:
            votes, ratings = list(self._votes), list(self._ratings)
        if len(votes) < self.min_votes:
            return self.status()
        train, held = self._split(votes)
        ch = self._features([v[0] for v in train], [v[1] for v in train])
        rj = self._features([v[0] for v in train], [v[2] for v in train])
        rt = None
        if ratings:
            rt = (self._features([r[0] for r in ratings], [r[1] for r in ratings]),
                  torch.tensor([r[2] for r in ratings]))
        ens = RewardEnsemble.fit(ch, rj, members=self.members, seed=self.seed, ratings=rt, l2=self.l2)
        agreement = None
        if held:
            hc = ens.mean(self._features([v[0] for v in held], [v[1] for v in held]))
            hr = ens.mean(self._features([v[0] for v in held], [v[2] for v in held]))
            agreement = float((hc > hr).float().mean())
        info = {"votes": len(votes), "fitted_on": len(train), "heldout": len(held), "agreement": agreement,
                "members": self.members, "ratings": len(ratings)}
        with self._lock:
            if len(votes) + len(ratings) >= self._fit_seq:
                self._ens, self._fit_info, self._fit_seq = ens, info, len(votes) + len(ratings)
            return dict(self._fit_info)

    @property
    def ready(self) -> bool:
        """A fitted ensemble exists (>= min_votes votes were there at the last fit)."""
        with self._lock:
            return self._ens is not None

    def status(self) -> dict:
        """The last fit's result ("votes" is the number of votes now; the rest describes the current ensemble),
        plus "ready"."""
        with self._lock:
            return {**self._fit_info, "votes": len(self._votes), "ratings": len(self._ratings),
                    "ready": self._ens is not None}

    def rank(self, prompt: str, candidates: list[str]) -> tuple[float, int, int]:
        """(information, i, j), i < j: the most informative pair among `candidates` (first on ties); before the
        ensemble is ready, or with fewer than two candidates: (0.0, 0, 1)."""
        with self._lock:
            ens = self._ens
        if ens is None or len(candidates) < 2:
            return 0.0, 0, 1
        f = self._features([prompt] * len(candidates), list(candidates))
        ii, jj = torch.triu_indices(len(candidates), len(candidates), offset=1)
        info = pair_information(ens, f[ii], f[jj], self.method)
        best = int(torch.argmax(info))
        return float(info[best]), int(ii[best]), int(jj[best])
