"""Checkpoints: exact round-trip, atomic replacement under crashes, recovery of an interrupted swap."""
from __future__ import annotations

import os

import pytest
import torch

import lmstack
from conftest import llama_cfg_dict, tiny_cfg_dict
from lmstack import checkpoint as ckpt
from lmstack.config import ModelConfig
from lmstack.errors import LMStackError
from lmstack.models import Transformer
from lmstack.tokenizer import train_char

X = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tok():
    return train_char(["abcdefghijklmnopqrstuvwxyz ,.\n"])


def make(cfg_dict, seed):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**cfg_dict)).eval()


@torch.no_grad()
def logits(m):
    return m.eval()(X)


@pytest.mark.parametrize("cfg_dict", [tiny_cfg_dict(), llama_cfg_dict(), llama_cfg_dict(tie_embeddings=True)],
                         ids=["gpt2-tied", "llama-untied", "llama-tied"])
def test_round_trip_identical_logits(tmp_path, tok, cfg_dict):
    m = make(cfg_dict, 1)
    state = {"step": 3, "rng": torch.get_rng_state()}
    ckpt.save_checkpoint(tmp_path / "ck", m, tok, train_state=state)
    assert {p.name for p in (tmp_path / "ck").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                             "tokenizer_config.json", "train_state.pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary or old directories left behind
    m2, tok2 = ckpt.load_model(tmp_path / "ck")
    assert m2.config == m.config
    assert not m2.training
    torch.testing.assert_close(logits(m2), logits(m), atol=0, rtol=0)
    if m.config.tie_embeddings:
        assert m2.lm_head.weight.data_ptr() == m2.tok_emb.weight.data_ptr()
    assert tok2.encode("hello, world.\n") == tok.encode("hello, world.\n")
    st = ckpt.load_train_state(tmp_path / "ck")
    assert st["step"] == 3 and torch.equal(st["rng"], state["rng"])
    lm = lmstack.load(tmp_path / "ck")
    torch.testing.assert_close(logits(lm.model), logits(m), atol=0, rtol=0)


def test_tied_head_stored_once(tmp_path, tok):
    from safetensors.torch import load_file
    ckpt.save_checkpoint(tmp_path / "ck", make(tiny_cfg_dict(), 0), tok)
    keys = load_file(str(tmp_path / "ck" / "model.safetensors")).keys()
    assert "lm_head.weight" not in keys and "tok_emb.weight" in keys
    ckpt.save_checkpoint(tmp_path / "ck2", make(llama_cfg_dict(), 0), tok)
    assert "lm_head.weight" in load_file(str(tmp_path / "ck2" / "model.safetensors")).keys()


def test_load_dtype(tmp_path, tok):
    ckpt.save_checkpoint(tmp_path / "ck", make(tiny_cfg_dict(), 0), tok)
    m, _ = ckpt.load_model(tmp_path / "ck", dtype=torch.bfloat16)
    assert next(m.parameters()).dtype == torch.bfloat16


def _partial_then_raise(obj, path, *a, **kw):
    """Stand-in for safetensors' save_file / torch.save: write half a file, then fail like a full disk."""
    with open(path, "wb") as f:
        f.write(b"\x00garbage, half a file")
    raise OSError(28, "No space left on device (simulated)")


@pytest.mark.parametrize("target", ["save_file", "torch_save"])
def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, tok, monkeypatch, target):
    old, new = make(tiny_cfg_dict(), 1), make(tiny_cfg_dict(), 2)
    path = tmp_path / "last"
    ckpt.save_checkpoint(path, old, tok, train_state={"step": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    if target == "save_file":
        monkeypatch.setattr(ckpt, "save_file", _partial_then_raise)
    else:
        monkeypatch.setattr(ckpt.torch, "save", _partial_then_raise)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(path, new, tok, train_state={"step": 2})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # untouched, byte for byte
    m, _ = ckpt.load_model(path)
    torch.testing.assert_close(logits(m), logits(old), atol=0, rtol=0)
    assert ckpt.load_train_state(path)["step"] == 1
    # the next save succeeds and replaces it
    ckpt.save_checkpoint(path, new, tok, train_state={"step": 2})
    m, _ = ckpt.load_model(path)
    torch.testing.assert_close(logits(m), logits(new), atol=0, rtol=0)
    assert ckpt.load_train_state(path)["step"] == 2


def test_crash_between_renames_is_recovered(tmp_path, tok, monkeypatch):
    """Crash after the old checkpoint was moved aside but before the new one was moved in."""
    old, new = make(tiny_cfg_dict(), 1), make(tiny_cfg_dict(), 2)
    path = tmp_path / "last"
    ckpt.save_checkpoint(path, old, tok)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-swap (simulated)")
        return real_replace(src, dst)
    import lmstack.atomic
    monkeypatch.setattr(lmstack.atomic.os, "replace", replace)  # the one atomic-write helper does the swap
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, new, tok)
    monkeypatch.undo()
    assert not path.exists()
    assert list(tmp_path.glob(".last.old-*"))
    assert ckpt.resolve_checkpoint(path) == path
    assert not list(tmp_path.glob(".last.old-*"))
    m, _ = ckpt.load_model(path)
    torch.testing.assert_close(logits(m), logits(old), atol=0, rtol=0)


def test_interrupted_swap_recovered_by_resolve_and_load(tmp_path, tok):
    old = make(llama_cfg_dict(), 4)
    path = tmp_path / "best"
    ckpt.save_checkpoint(path, old, tok)
    os.replace(path, tmp_path / ".best.old-4242")  # state right after the first rename of a swap
    m, t = ckpt.load_model(path)  # load_model goes through resolve_checkpoint
    assert path.is_dir() and not (tmp_path / ".best.old-4242").exists()
    torch.testing.assert_close(logits(m), logits(old), atol=0, rtol=0)


def test_non_checkpoint_directories(tmp_path):
    with pytest.raises(LMStackError, match="no checkpoint directory"):
        ckpt.load_model(tmp_path / "nothing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(LMStackError, match="not an lmstack checkpoint"):
        ckpt.load_model(tmp_path / "junk")
    with pytest.raises(LMStackError):
        lmstack.load(tmp_path / "junk")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(LMStackError):
        ckpt.resolve_checkpoint(tmp_path / "afile")


def test_mismatched_weights_and_missing_train_state(tmp_path, tok):
    ckpt.save_checkpoint(tmp_path / "ck", make(tiny_cfg_dict(), 0), tok)
    with pytest.raises(LMStackError, match="cannot be resumed"):
        ckpt.load_train_state(tmp_path / "ck")
    ModelConfig(**tiny_cfg_dict(n_layer=3)).save(tmp_path / "ck" / "config.json")
    with pytest.raises(LMStackError, match="do not fit the model config"):
        ckpt.load_model(tmp_path / "ck")


def test_checkpoint_without_tokenizer(tmp_path):
    ckpt.save_checkpoint(tmp_path / "ck", make(tiny_cfg_dict(), 0))
    m, t = ckpt.load_model(tmp_path / "ck")
    assert t is None
    with pytest.raises(LMStackError, match="no tokenizer.json"):
        lmstack.load(tmp_path / "ck")
