"""lmstack.load dispatch, the LM object (generate/stream/chat), and the chat CLI on a tiny local model."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import lmstack
from conftest import REPO, make_chat_checkpoint
from lmstack.errors import LMStackError
from lmstack.lm import resolve_source


def test_resolve_source_kinds(tmp_path, tiny_run):
    out, _ = tiny_run
    assert resolve_source(out / "last") == "lmstack"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    assert resolve_source(hf) == "hf"
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 16)
    assert resolve_source(g) == "gguf"
    bad = tmp_path / "m.bin"
    bad.write_bytes(b"\x00\x01")
    with pytest.raises(LMStackError, match="not GGUF"):
        resolve_source(bad)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(LMStackError, match="not valid JSON"):
        resolve_source(tmp_path / "broken")
    with pytest.raises(LMStackError, match="no model at"):
        resolve_source(tmp_path / "nothing")


def test_stop_ids_end_generation(tiny_run):
    out, _ = tiny_run
    lm = lmstack.load(out / "last")
    free = lm.generate("the", max_new_tokens=20, temperature=0)
    # stopping on the first character the model would produce cuts the output to nothing
    first = lm.tokenizer.encode(free[0])[0]
    assert "".join(lm.stream("the", max_new_tokens=20, temperature=0, stop_ids={first})) == ""
    assert len(free) > 1


@pytest.fixture
def chat_model(tmp_path, tiny_run):
    out, _ = tiny_run
    return make_chat_checkpoint(out, tmp_path / "chat")


def test_chat_template_and_end_of_turn(chat_model):
    lm = lmstack.load(chat_model)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert lm.chat_prompt(msgs) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                    "<|im_start|>assistant\n")
    assert lm.tokenizer.token_id("<|im_end|>") in lm.tokenizer.end_of_turn_ids
    reply = lm.chat(msgs, max_new_tokens=10, temperature=0)
    same = "".join(lm.stream(lm.chat_prompt(msgs), truncate="left", stop_ids=lm.tokenizer.end_of_turn_ids,
                             max_new_tokens=10, temperature=0))
    assert reply == same and "<|im_end|>" not in reply


def test_chat_cli_repl_history_reset_exit(chat_model):
    stdin = "hello\nhow are you\n/reset\nagain\n/exit\n"
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "chat", "--model", str(chat_model),
                        "--max-new-tokens", "5", "--system", "sys"], input=stdin, capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(">>> ") == 5  # four inputs answered or handled, then /exit
    assert "(history cleared)" in r.stdout
    one = subprocess.run([sys.executable, "-m", "lmstack.cli", "chat", "--model", str(chat_model), "-p", "hello",
                          "--max-new-tokens", "5"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert one.returncode == 0 and ">>>" not in one.stdout
    lm = lmstack.load(chat_model)
    expected = lm.chat([{"role": "user", "content": "hello"}], max_new_tokens=5, temperature=0)
    assert one.stdout == expected + "\n"


def test_download_offline_is_one_line(tmp_path):
    if shutil.which("true") is None:
        pytest.skip()
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "download", "nobody/nothing", "--out", str(tmp_path / "d")],
                       capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmstack: error: cannot download nobody/nothing"), r.stderr


def test_chat_cli_answers_with_the_real_gguf():
    import os
    from pathlib import Path
    gguf = Path(os.environ.get("LMSTACK_GGUF", REPO.parent / "shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not gguf.is_file():
        pytest.skip(f"{gguf} not found (set LMSTACK_GGUF)")
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "chat", "--model", str(gguf), "-p",
                        "What is the capital of France?", "--max-new-tokens", "30"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout


def test_generate_cli_speed_options(tiny_run):
    out, _ = tiny_run
    for extra in (["--quantize", "int8"], ["--dtype", "bfloat16"]):
        r = subprocess.run([sys.executable, "-m", "lmstack.cli", "generate", "--model", str(out / "last"), "--prompt",
                            "the", "--max-new-tokens", "8", "--temperature", "0", *extra],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.startswith("the")
    bad = subprocess.run([sys.executable, "-m", "lmstack.cli", "generate", "--model", str(out / "last"),
                          "--quantize", "int4"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
