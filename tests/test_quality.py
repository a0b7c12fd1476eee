"""Quality runs (slow, `pytest -m slow`): the Shakespeare recipes reach val loss <= 1.88 on the whole validation
split (the `final_val_loss` record of metrics.jsonl)."""
from __future__ import annotations

import pytest

from conftest import REPO, read_jsonl, run_cli

TARGET = 1.88


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("recipe", ["shakespeare-char.yaml", "shakespeare-char-fast.yaml"])
def test_shakespeare_recipe_reaches_target(recipe, shakespeare_path, tmp_path):
    path = REPO / "recipes" / recipe
    if not path.exists():
        pytest.skip(f"{path} does not exist")
    out = tmp_path / "run"
    r = run_cli("train", str(path), "--out-dir", str(out), "--no-progress", "--set", f"data_path={shakespeare_path}",
                "--set", "sample_tokens=0", timeout=1800, env={"OMP_NUM_THREADS": None})
    assert r.returncode == 0, r.stderr[-3000:]
    final = [x for x in read_jsonl(out / "metrics.jsonl") if "final_val_loss" in x]
    assert len(final) == 1
    text = shakespeare_path.read_text(encoding="utf-8")
    assert final[0]["final_val_tokens"] >= (len(text) - int(len(text) * 0.9)) * 0.98  # the whole val split
    assert final[0]["final_val_loss"] <= TARGET, final[0]
