"""The generated tour data: answers are right, votes export to the preference the simulated annotator has, and
the CLI writes the files the README's tour reads."""
from __future__ import annotations

import json
import re

from lmstack.data.synthetic import cat_reward, instructions, preference_pairs, simulated_votes, write_tour_data


def test_instructions_have_checkable_answers():
    for rec in instructions(200, seed=3):
        m = re.fullmatch(r"Add (\d+) and (\d+)\.", rec["instruction"])
        if m:
            assert rec["output"] == f"{m[1]} + {m[2]} = {int(m[1]) + int(m[2])}."
        elif rec["instruction"].startswith("Write this in capital"):
            assert rec["output"] == rec["input"].upper()
        elif rec["instruction"].startswith("How many words"):
            assert rec["output"] == f"There are {len(rec['input'].split())} words."
    assert instructions(5, seed=1) == instructions(5, seed=1) != instructions(5, seed=2)


def test_pairs_and_reward_agree():
    pairs = preference_pairs(50, seed=0)
    assert all(c > 0 for c in cat_reward([p["prompt"] for p in pairs], [p["chosen"] for p in pairs]))
    assert cat_reward(["x"] * 3, [" the cat", " a concatenation", " cat cat Cat. cat, cat"]) == [1.0, 0.0, 4.0]


def test_votes_export_to_the_simulated_preference(tmp_path):
    from lmstack.serve.feedback import export_preferences
    votes = simulated_votes(40, seed=0)
    assert {v["choice"] for v in votes} == {"a", "b"}  # both positions win sometimes
    f = tmp_path / "votes.jsonl"
    f.write_text("".join(json.dumps(v) + "\n" for v in votes))
    counts = export_preferences(f, tmp_path / "prefs.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert counts["written"] == len(rows) == 40
    assert all("cat" in r["chosen"] and "cat" not in r["rejected"].split() for r in rows)


def test_cli_writes_the_tour_files(tmp_path):
    from conftest import run_cli
    r = run_cli("demo-data", "--out", str(tmp_path / "tour"), "--sft", "10", "--prompts", "4", "--votes", "6")
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "tour" / "sft.jsonl").read_text().splitlines()) == 10
    assert len((tmp_path / "tour" / "prompts.txt").read_text().splitlines()) == 4
    assert write_tour_data(tmp_path / "t2", 10, 4, 6) == {k: str(tmp_path / "t2" / n) for k, n in
                                                         (("sft", "sft.jsonl"), ("prompts", "prompts.txt"),
                                                          ("votes", "votes.jsonl"))}
