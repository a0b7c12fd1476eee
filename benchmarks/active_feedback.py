"""Label efficiency of active learning for the feedback page (issue 17): reward-model held-out accuracy against the
number of labels, for sequential / random / active-disagreement / active-bt / active-infogain pair selection, same pool, same
budget, mean +- std over seeds.

Pool: prompts "Describe a photo with <topic> in it." (26 topics), each with C real candidate captions that
mention the topic (Multi30k English captions: train split for the labelled pool, val + test splits for the
held-out prompts). Features: the real model featurizer (lmstack.train.active.Featurizer: SmolLM2-135M-Instruct
GGUF, final hidden states mean-pooled over the completion tokens). Labeller: a known scoring function of the TEXT
(`quality` below: colour words, cheerful words, dull verbs, length near 12 words; never the features), with 10%
of its answers flipped (noise drawn once per seed and pair, so every strategy sees the same noisy answer to the
same question). The reward model is lmstack.train.active.RewardEnsemble (5 bootstrap linear heads, L2); its
ensemble mean is scored on all held-out pairs (noiseless labels, ties dropped).

Strategies (each asks `--batch` pairs per refit, up to `--budget` labels):
  sequential:  prompts in file order, each prompt's pair (0,1) first, then (2,3), (4,5) on later passes
  random:      uniformly random unlabelled within-prompt pairs
  active-*:    `--warmup` random labels, then the `--batch` unlabelled pool pairs with the highest
               pair_information ("disagreement": variance of P(a>b) over members; "bt": mean P(a>b) near 0.5;
               "infogain": expected information gain about the head under its Laplace posterior, the batch
               picked greedily with each pick folded in: lmstack.train.active.select_pairs)

    .venv/bin/python benchmarks/active_feedback.py                    # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/active_feedback.py --quick            # small smoke run
Writes benchmarks/results/active_feedback.{json,md,png}.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmstack.train.active import Featurizer, RewardEnsemble, select_pairs  # noqa: E402

SHARED = REPO.parent / "shared"
TOPICS = ("dog", "man", "woman", "girl", "boy", "child", "people", "street", "water", "bike", "ball", "beach",
          "snow", "crowd", "car", "grass", "building", "table", "shirt", "hat", "dress", "horse", "stage", "guitar",
          "camera", "food")
COLOURS = {"red", "blue", "green", "yellow", "white", "black", "orange", "pink", "purple", "brown", "gray", "grey"}
CHEER = {"smiling", "smile", "smiles", "happy", "laughing", "laughs", "enjoying", "enjoy", "fun", "playing",
         "plays", "dancing", "celebrating", "cheering"}
DULL = {"sitting", "sits", "standing", "stands", "waiting", "waits", "looking", "looks"}
STRATEGIES = ("sequential", "random", "active-disagreement", "active-bt", "active-infogain")


def quality(text: str) -> float:
    """The simulated labeller's hidden preference, a function of the text only."""
    words = re.findall(r"[a-z]+", text.lower())
    colours = sum(w in COLOURS for w in words)
    return (1.0 * (colours > 0) + 0.4 * min(colours - 1, 2) * (colours > 1) + 1.5 * any(w in CHEER for w in words)
            - 1.0 * any(w in DULL for w in words) - 0.08 * abs(len(words) - 12))


def read_captions(data_dir: Path, splits: list[str]) -> list[str]:
    out = []
    for s in splits:
        with gzip.open(data_dir / f"{s}.en.gz", "rt", encoding="utf-8") as f:
            out += [ln.strip() for ln in f if ln.strip()]
    return out


def build_prompts(captions: list[str], per_topic: int, cands: int, seed: int) -> list[tuple[str, list[str]]]:
    """per_topic prompts per topic, each with `cands` distinct captions that mention the topic word."""
    r = random.Random(seed)
    out = []
    for t in TOPICS:
        pool = sorted({c for c in captions if re.search(rf"\b{t}\b", c.lower())})
        r.shuffle(pool)
        for k in range(min(per_topic, len(pool) // cands)):
            out.append((f"Describe a photo with a {t} in it.", pool[k * cands:(k + 1) * cands]))
    r.shuffle(out)
    return out


def pairs_of(prompts: list[tuple[str, list[str]]]) -> list[tuple[int, int]]:
    """(global index a, global index b) of every within-prompt candidate pair, candidates numbered in order."""
    out, base = [], 0
    for _, cs in prompts:
        out += [(base + i, base + j) for i in range(len(cs)) for j in range(i + 1, len(cs))]
        base += len(cs)
    return out


def sequential_order(prompts) -> list[int]:
    """Indices into pairs_of(prompts): pass p asks each prompt's pair (2p, 2p+1), prompts in file order; then the
    remaining pairs in file order."""
    idx, base, first = {}, 0, []
    for _, cs in prompts:
        for i in range(len(cs)):
            for j in range(i + 1, len(cs)):
                idx[(base + i, base + j)] = len(idx)
        base += len(cs)
    bases = [0]
    for _, cs in prompts[:-1]:
        bases.append(bases[-1] + len(cs))
    for p in range(max(len(cs) for _, cs in prompts) // 2):
        first += [idx[(b + 2 * p, b + 2 * p + 1)] for b, (_, cs) in zip(bases, prompts) if 2 * p + 1 < len(cs)]
    return first + [i for i in range(len(idx)) if i not in set(first)]


def run_strategy(strategy: str, feats, pairs, q, heldout, args, seed: int) -> list[float]:
    """Held-out accuracy after each batch of labels (at args.batch, 2 * args.batch, ... args.budget labels)."""
    g = torch.Generator().manual_seed(1000 + seed)
    noise = torch.rand(len(pairs), generator=g) < args.noise          # the same noisy answer for every strategy
    a_idx = torch.tensor([p[0] for p in pairs])
    b_idx = torch.tensor([p[1] for p in pairs])
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(2000 + seed)).tolist()
    seq = sequential_order(args.prompts) if strategy == "sequential" else None
    asked: list[int] = []
    unasked = torch.ones(len(pairs), dtype=torch.bool)
    ha, hb, hy = heldout
    accs = []
    ens = None
    while len(asked) < args.budget:
        k = min(args.batch, args.budget - len(asked))
        if seq is not None:
            new = seq[len(asked):len(asked) + k]
        elif strategy == "random" or ens is None or len(asked) < args.warmup:
            new = [i for i in order if unasked[i]][:k]
        else:
            method = strategy.split("-", 1)[1]
            new = select_pairs(ens, feats[a_idx], feats[b_idx], k, method, exclude=~unasked)
        asked += new
        unasked[new] = False
        idx = torch.tensor(asked)
        a_better = (q[a_idx[idx]] > q[b_idx[idx]]) ^ noise[idx]         # ties: b wins, then maybe flipped
        ch = torch.where(a_better[:, None], feats[a_idx[idx]], feats[b_idx[idx]])
        rj = torch.where(a_better[:, None], feats[b_idx[idx]], feats[a_idx[idx]])
        ens = RewardEnsemble.fit(ch, rj, members=args.members, seed=seed, l2=args.l2)
        accs.append(float(((ens.mean(ha) > ens.mean(hb)) == hy).float().mean()))
    return accs


def featurize_all(args, prompts_sets):
    import lmstack
    lm = lmstack.load(args.model)
    fz = Featurizer(lm, max_tokens=64, batch_size=16)
    out = []
    for prompts in prompts_sets:
        ps = [p for p, cs in prompts for _ in cs]
        cs = [c for _, cs_ in prompts for c in cs_]
        out.append(fz(ps, cs))
    return out


def labels_to_reach(curve: list[float], target: float, batch: int) -> int | None:
    for i, a in enumerate(curve):
        if a >= target - 1e-9:
            return (i + 1) * batch
    return None


def plot(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=110)
    x = res["labels"]
    for s in STRATEGIES:
        m, sd = torch.tensor(res["mean"][s]), torch.tensor(res["std"][s])
        ax.plot(x, m, label=s)
        ax.fill_between(x, m - sd, m + sd, alpha=0.15)
    ax.axhline(res["mean"]["random"][-1], ls="--", c="gray", lw=1, label="random, final")
    ax.set_xlabel("labels (pairwise votes)")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title(f"Active feedback: {res['config']['seeds']} seeds, {int(res['config']['noise'] * 100)}% label noise")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def table(res: dict, every: int) -> str:
    x = res["labels"]
    cols = [i for i in range(len(x)) if (i + 1) % every == 0 or i == len(x) - 1]
    lines = ["| strategy | " + " | ".join(str(x[i]) for i in cols) + " | labels to reach random's final |",
             "|---|" + "---|" * (len(cols) + 1)]
    for s in STRATEGIES:
        cells = [f"{res['mean'][s][i]:.3f} ± {res['std'][s][i]:.3f}" for i in cols]
        n = res["labels_to_random_final"][s]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {n if n is not None else '—'}"
                     + (f" ({n / x[-1]:.0%})" if n else "") + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--data", default=str(SHARED / "data" / "multi30k"), help="dir with {train,val,...}.en.gz")
    ap.add_argument("--per-topic", type=int, default=6, help="pool prompts per topic")
    ap.add_argument("--cands", type=int, default=6, help="candidate completions per prompt")
    ap.add_argument("--heldout-per-topic", type=int, default=3)
    ap.add_argument("--budget", type=int, default=300)
    ap.add_argument("--batch", type=int, default=10, help="pairs asked per refit")
    ap.add_argument("--warmup", type=int, default=20, help="random labels before active selection starts")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--l2", type=float, default=1.0, help="L2 on the heads (1.0: best for random labels at 300)")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--cache", help="a .pt file to keep the features in between runs (re-made when the pool changes)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small pool, 2 seeds")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "active_feedback"))
    args = ap.parse_args(argv)
    if args.quick:
        args.per_topic, args.heldout_per_topic, args.budget, args.seeds = 2, 1, 60, 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    pool = build_prompts(read_captions(Path(args.data), ["train"]), args.per_topic, args.cands, seed=0)
    held = build_prompts(read_captions(Path(args.data), ["val", "test_2016_flickr"]), args.heldout_per_topic,
                         args.cands, seed=1)
    args.prompts = pool
    key = {"model": args.model, "pool": pool, "held": held}
    cache = Path(args.cache) if args.cache else None
    cached = bool(cache and cache.exists() and torch.load(cache)["key"] == key)
    if cached:
        feats, hfeats = torch.load(cache)["feats"]
    else:
        feats, hfeats = featurize_all(args, [pool, held])
        if cache:
            torch.save({"key": key, "feats": (feats, hfeats)}, cache)
    t_feat = time.time() - t0
    q = torch.tensor([quality(c) for _, cs in pool for c in cs])
    hq = torch.tensor([quality(c) for _, cs in held for c in cs])
    hp = [(a, b) for a, b in pairs_of(held) if abs(float(hq[a] - hq[b])) > 1e-6]
    ha, hb = hfeats[[a for a, _ in hp]], hfeats[[b for _, b in hp]]
    hy = torch.tensor([bool(hq[a] > hq[b]) for a, b in hp])
    pairs = pairs_of(pool)
    curves = {s: [run_strategy(s, feats, pairs, q, (ha, hb, hy), args, seed) for seed in range(args.seeds)]
              for s in STRATEGIES}
    labels = [min((i + 1) * args.batch, args.budget) for i in range(len(curves["random"][0]))]
    res = {"labels": labels,
           "mean": {s: torch.tensor(c).mean(0).tolist() for s, c in curves.items()},
           "std": {s: torch.tensor(c).std(0, unbiased=False).tolist() for s, c in curves.items()},
           "curves": curves}
    target = res["mean"]["random"][-1]
    res["labels_to_random_final"] = {s: labels_to_reach(res["mean"][s], target, args.batch) for s in STRATEGIES}
    res["config"] = {k: v for k, v in vars(args).items() if k != "prompts"}
    res["config"].update(pool_prompts=len(pool), pool_texts=len(q), pool_pairs=len(pairs), heldout_prompts=len(held),
                         heldout_pairs=len(hp), feature_dim=int(feats.shape[1]), featurize_s=None if cached else round(t_feat, 1),
                         total_s=round(time.time() - t0, 1), cpu_threads=torch.get_num_threads())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = table(res, every=max(1, len(labels) // 6))
    out.with_suffix(".md").write_text(f"Held-out pairwise accuracy (mean ± std over {args.seeds} seeds) against labels; "
                                      f"target line: random's final {target:.3f}\n\n{md}\n")
    plot(res, out.with_suffix(".png"))
    print(md)
    print(json.dumps({"labels_to_random_final": res["labels_to_random_final"], "random_final": target,
                      **{k: res["config"][k] for k in ("pool_pairs", "heldout_pairs", "featurize_s", "total_s")}}))
    return res


if __name__ == "__main__":
    main()
