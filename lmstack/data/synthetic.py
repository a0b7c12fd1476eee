"""Small generated data sets whose answers a program can check, so every step of the fine-tune → feedback →
reward → DPO → PPO loop can be tried (and verified) offline in minutes:

    instructions(n)      Alpaca records: additions, upper-casing, first letters, word counts
    prompts(n)           short text prompts for sampling (feedback page, PPO)
    preference_pairs(n)  prompt/chosen/rejected where chosen mentions the word "cat" and rejected does not
    simulated_votes(n)   the same preference as vote records of the feedback page (`lmstack feedback` format;
                         each completion also rated 1 + 2 * its "cat" count (max 7) and the loser tagged off-topic),
                         from a simulated annotator who prefers the completion that mentions "cat"
    cat_reward           the matching programmatic reward for PPO (python:lmstack.data.synthetic:cat_reward)

`write_tour_data(out)` writes them as files (`lmstack demo-data --out DIR`)."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..atomic import write_text
from . import arithmetic

WORDS = ("apple river stone cloud green music paper light window garden silver candle forest orange tiger "
         "bread planet yellow castle ocean").split()
STORY = ("the quick brown fox jumps over lazy dog and sat on mat while bird sang in tree king queen lord lady "
         "speak thou art my good friend where is night day sun moon star").split()
TARGET = "cat"


def instruction(r: random.Random) -> dict:
    """One Alpaca record with a checkable answer."""
    kind = r.randrange(4)
    if kind == 0:
        a, b = r.randint(10, 99), r.randint(10, 99)
        return {"instruction": f"Add {a} and {b}.", "output": f"{a} + {b} = {a + b}."}
    words = [r.choice(WORDS) for _ in range(r.randint(2, 5))]
    if kind == 1:
        return {"instruction": "Write this in capital letters.", "input": " ".join(words),
                "output": " ".join(words).upper()}
    if kind == 2:
        return {"instruction": f"What is the first letter of the word '{words[0]}'?",
                "output": f"The first letter is '{words[0][0]}'."}
    return {"instruction": "How many words are in this text?", "input": " ".join(words),
            "output": f"There are {len(words)} words."}


def instructions(n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    return [instruction(r) for _ in range(n)]


def prompts(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(STORY) for _ in range(r.randint(1, 2))).capitalize() for _ in range(n)]


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """prompt/chosen/rejected: two unrelated continuations, the chosen one with "cat" at a random slot."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(r.choice(STORY) for _ in range(2)).capitalize()
        chosen = [r.choice(STORY) for _ in range(r.randint(2, 6))]
        rejected = [r.choice(STORY) for _ in range(r.randint(2, 6))]
        chosen[r.randrange(len(chosen))] = TARGET
        rows.append({"prompt": prompt, "chosen": " " + " ".join(chosen) + ".", "rejected": " " + " ".join(rejected) + "."})
    return rows


def simulated_votes(n: int, seed: int = 0) -> list[dict]:
    """Vote records as the feedback page writes them, cast by a simulated annotator (the pair order is shuffled,
    so the preferred completion is sometimes a, sometimes b)."""
    r = random.Random(seed + 1)
    out = []
    for i, p in enumerate(preference_pairs(n, seed)):
        a_wins = r.random() < 0.5
        a, b = (p["chosen"], p["rejected"]) if a_wins else (p["rejected"], p["chosen"])
        rating = {side: 1 + 2 * min(3, int(n)) for side, n in zip("ab", cat_reward(["", ""], [a, b]))}
        out.append({"id": i, "prompt": p["prompt"], "chat": False, "completion_a": a, "completion_b": b,
                    "choice": "a" if a_wins else "b", "chosen": p["chosen"], "rejected": p["rejected"],
                    "edited": False, "annotator": "simulated:prefers-cat", "ratings": rating,
                    "tags": {"a": [] if a_wins else ["off-topic"], "b": ["off-topic"] if a_wins else []}})
    return out


def cat_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """How many times the word "cat" appears in each completion (capped at 4): a reward PPO can maximise."""
    return [float(min(4, len(re.findall(rf"\b{TARGET}\b", c.lower())))) for c in completions]


def write_tour_data(out: str | Path, n_sft: int = 200, n_prompts: int = 32, n_votes: int = 64,
                    seed: int = 0, n_arith: int = 0) -> dict[str, str]:
    """Write sft.jsonl, prompts.txt and votes.jsonl under `out` (atomically each), and with n_arith GRPO prompt
    files of 2-digit arithmetic (arith-train.jsonl: n_arith, arith-test.jsonl: n_arith / 4, disjoint); returns
    their paths."""
    out = Path(out)
    files = {
        "sft": write_text(out / "sft.jsonl", "".join(json.dumps(x) + "\n" for x in instructions(n_sft, seed))),
        "prompts": write_text(out / "prompts.txt", "".join(p + "\n" for p in prompts(n_prompts, seed))),
        "votes": write_text(out / "votes.jsonl", "".join(json.dumps(v) + "\n" for v in simulated_votes(n_votes, seed))),
    }
    if n_arith:  # GRPO prompts with checkable answers: a train split and a disjoint held-out split
        train, test = arithmetic.split(n_arith, max(1, n_arith // 4), seed=seed, digits=(2, 2))
        for name, rows in (("arith_train", train), ("arith_test", test)):
            recs = arithmetic.as_prompts(rows, instruction=arithmetic.ONE_SHOT, chat=True)
            files[name] = write_text(out / f"{name.replace('_', '-')}.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    return {k: str(v) for k, v in files.items()}
