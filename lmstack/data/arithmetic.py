"""Generated arithmetic problems with checkable answers, for GRPO (verifiable rewards) and its benchmark.

    problems(n, seed, digits=(2, 3), ops="+-")   [{"question": "What is 47 + 385?", "answer": "432"}, ...]
    split(n_train, n_test, seed, ...)            disjoint train / held-out lists (no question in both)
    as_prompts(rows, tokenizer, instruction)     GRPO prompt records {"prompt", "answer"}: the question rendered
                                                 with the tokenizer's chat template (when it has one; chat=True:
                                                 a chat message list, rendered at training time), asking for a
                                                 final line "#### <number>" (ONE_SHOT: with a worked example)
    write_prompts(path, rows)                    one {"prompt", "answer"} JSON object per line (P.jsonl)

Operands have a random number of digits in [digits[0], digits[1]] each; a subtraction puts the larger operand
first (a result >= 0) unless negative=True (then the answer may have a leading "-"). Everything is a pure
function of the seed."""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..atomic import write_text

INSTRUCTION = "Compute the answer. End your reply with a final line of the form '#### <number>'."
# the same with one worked example (a small instruct model follows the format far more often with it)
ONE_SHOT = ("Compute the answer. Example: What is 23 + 45? Reply: 23 + 45 = 68\n#### 68\n"
            "End your reply with a final line of the form '#### <number>'.")


def _operand(r: random.Random, digits: tuple[int, int]) -> int:
    d = r.randint(digits[0], digits[1])
    return r.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)


def problem(r: random.Random, digits: tuple[int, int] = (2, 3), ops: str = "+-", negative: bool = False) -> dict:
    a, b, op = _operand(r, digits), _operand(r, digits), r.choice(ops)
    if op == "-" and not negative and b > a:
        a, b = b, a
    return {"question": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b)}


def problems(n: int, seed: int = 0, digits: tuple[int, int] = (2, 3), ops: str = "+-",
             negative: bool = False) -> list[dict]:
    """n problems (duplicates possible; see `split` for disjoint sets)."""
    r = random.Random(seed)
    return [problem(r, digits, ops, negative) for _ in range(n)]


def split(n_train: int, n_test: int, seed: int = 0, digits: tuple[int, int] = (2, 3), ops: str = "+-",
          negative: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, held-out): n_train + n_test distinct questions, the held-out ones never in train."""
    r, seen, rows = random.Random(seed), set(), []
    budget = 50 * (n_train + n_test) + 100
    while len(rows) < n_train + n_test and budget:
        budget -= 1
        p = problem(r, digits, ops, negative)
        if p["question"] not in seen:
            seen.add(p["question"])
            rows.append(p)
    if len(rows) < n_train + n_test:
        raise ValueError(f"only {len(rows)} distinct problems with digits={digits}; ask for fewer")
    return rows[:n_train], rows[n_train:]


def as_prompts(rows: list[dict], tokenizer=None, instruction: str = INSTRUCTION, chat: bool = False) -> list[dict]:
    """GRPO prompt records {"prompt", "answer"}. The prompt is the question + instruction rendered with `tokenizer`'s
    chat template (when it has one); with chat=True (and no tokenizer) a one-message chat [{"role": "user", ...}]
    that the GRPO prompts reader renders with the trained model's template; else plain text."""
    out = []
    for row in rows:
        text = f"{row['question']} {instruction}".strip()
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        elif chat:
            text = [{"role": "user", "content": text}]
        out.append({"prompt": text, "answer": row["answer"]})
    return out


def write_prompts(path: str | Path, rows: list[dict]) -> Path:
    """Atomically write records as JSONL (one object per line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path
