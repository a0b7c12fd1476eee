"""Tokenizers: lossless round-trips for any Unicode text, special tokens, persistence, byte accounting."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmstack.errors import LMStackError
from lmstack.tokenizer import EOT, Tokenizer, train_bpe, train_char

TRAIN_TEXTS = ["Hello world! This is a small corpus for tests.\n" * 20,
               "Thou art my good friend, where is the night?\n" * 20,
               "Ünïcödé wörds: naïve café, 東京, ☃ and 😀.\n" * 5]

PROP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TRAIN_TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def char():
    return train_char(["hello world\nthou art"])  # tiny alphabet: most characters are unseen


@pytest.fixture(scope="module", params=["bpe", "char"])
def tok(request, bpe, char):
    return {"bpe": bpe, "char": char}[request.param]


def _text_bytes(t: Tokenizer, ids: list[int]) -> bytes:
    return b"".join(t.token_bytes(i) for i in ids)


@PROP
@given(s=st.text())
def test_bpe_round_trip_any_unicode(bpe, s):
    assert bpe.decode(bpe.encode(s)) == s


@PROP
@given(s=st.text())
def test_char_round_trip_any_unicode(char, s):
    assert char.decode(char.encode(s)) == s


@PROP
@given(s=st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_token_bytes_concatenate_to_utf8(tok, s):
    ids = tok.encode(s)
    text = tok.decode(ids, skip_special_tokens=True)
    assert _text_bytes(tok, ids) == text.encode("utf-8")
    lengths = tok.byte_lengths()
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))


def test_char_unseen_characters_fall_back_to_bytes(char):
    ids = char.encode("h☃")
    assert len(ids) == 1 + 3  # one char token + the three UTF-8 bytes of the snowman
    assert [char.hf.id_to_token(i) for i in ids[1:]] == ["<0xE2>", "<0x98>", "<0x83>"]
    assert [char.token_bytes(i) for i in ids[1:]] == [b"\xe2", b"\x98", b"\x83"]
    # seen characters are one token each
    assert len(char.encode("hello world")) == len("hello world")


def test_char_vocab_is_sorted_seen_chars_then_specials():
    t = train_char(["cab"], byte_fallback=False)
    assert [t.hf.id_to_token(i) for i in range(4)] == ["a", "b", "c", EOT]
    assert t.encode("abc") == [0, 1, 2]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_special_token_is_one_id(kind, bpe, char):
    t = {"bpe": bpe, "char": char}[kind]
    assert t.eos_token == EOT and t.eos_id is not None
    assert t.encode(EOT) == [t.eos_id]
    ids = t.encode(f"hello{EOT}world")
    assert ids.count(t.eos_id) == 1
    assert t.decode(ids) == f"hello{EOT}world"
    assert t.decode(ids, skip_special_tokens=True) == "helloworld"
    assert t.eos_id in t.special_ids
    assert t.token_bytes(t.eos_id) == b"" and t.byte_lengths()[t.eos_id] == 0


def test_custom_special_tokens():
    t = train_bpe(TRAIN_TEXTS, vocab_size=300, special_tokens=["<eos>", "<pad>"])
    assert t.eos_token == "<eos>"
    assert t.encode("<pad>") == [t.token_id("<pad>")]
    assert len({t.token_id("<eos>"), t.token_id("<pad>")}) == 2


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_load_round_trip(kind, bpe, char, tmp_path):
    t = {"bpe": bpe, "char": char}[kind]
    t.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    meta = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert meta["eos_token"] == EOT
    u = Tokenizer.load(tmp_path / "tok")
    v = Tokenizer.load(tmp_path / "tok" / "tokenizer.json")
    sample = "".join(TRAIN_TEXTS) + f"unseen ☃ 😀 ¿qué? {EOT} end"
    assert u.encode(sample) == v.encode(sample) == t.encode(sample)
    assert u.vocab_size == t.vocab_size and u.eos_id == t.eos_id
    assert u.byte_lengths() == t.byte_lengths()


def test_bpe_learns_merges(bpe):
    assert 257 < bpe.vocab_size <= 400
    s = "Hello world! This is a small corpus for tests.\n"
    assert len(bpe.encode(s)) < len(s.encode()) / 2


def test_bpe_vocab_too_small_is_an_error():
    with pytest.raises(LMStackError, match="at least 257"):
        train_bpe(["abc"], vocab_size=100)


def test_load_missing_or_broken_tokenizer(tmp_path):
    with pytest.raises(LMStackError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LMStackError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)


def test_chat_template(tmp_path, bpe):
    msgs = [{"role": "user", "content": "hi"}]
    assert bpe.apply_chat_template(msgs) == "user: hi\nassistant:"
    t = Tokenizer(bpe.hf, chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}"
                                        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert t.apply_chat_template(msgs) == f"<user>hi{EOT}<assistant>"
    t.save(tmp_path)
    assert Tokenizer.load(tmp_path).apply_chat_template(msgs, add_generation_prompt=False) == f"<user>hi{EOT}"
