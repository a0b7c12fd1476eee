"""TextStream, the one token-ids -> text path: stop token, incremental UTF-8, stop strings, pieces that always join
to the whole text, the steps behind each piece, finish reasons, and closing the token source at the end."""
from __future__ import annotations

import itertools
import random

import pytest

from lmstack.generate import TextStream, TokenStep, apply_stop_strings, decode_text

EOS = 0


class ByteTok:
    """Token i > 0 is the single byte i - 1 (so any byte string is a token sequence); token 0 is EOS (no bytes)."""

    def token_bytes(self, t: int) -> bytes:
        return b"" if t == EOS else bytes([t - 1])


def ids(b: bytes) -> list[int]:
    return [x + 1 for x in b]


TOK = ByteTok()


def test_multibyte_characters_are_never_split():
    text = "héllo wörld — ✓ 🙂"
    pieces = [p.text for p in TextStream(TOK).pieces(ids(text.encode()))]
    assert "".join(pieces) == text
    for p in pieces:
        p.encode("utf-8")  # every piece is whole characters (no lone surrogates / partial bytes)
    assert len(pieces) == len(text)  # one piece per character: a 4-byte emoji is released once complete


def test_invalid_bytes_become_replacement_characters():
    assert decode_text(TOK, ids(b"ok\xff\xfeend")) == "ok\ufffd\ufffdend"
    assert decode_text(TOK, ids("ab🙂".encode()[:-1])) == "ab\ufffd"  # a truncated last character


def test_stop_token_ends_the_text_unless_stop_at_eos_is_false():
    toks = ids(b"abc") + [EOS] + ids(b"def")
    ts = TextStream(TOK, {EOS})
    assert ts.decode(toks) == "abc" and ts.hit_end and ts.tokens == 4  # the EOS counts as a generated token
    assert ts.finish_reason(max_new_tokens=4) == "stop"
    assert decode_text(TOK, toks, {EOS}, stop_at_eos=False) == "abcdef"


@pytest.mark.parametrize("seed", range(20))
def test_stop_strings_any_split_streamed_equals_whole(seed):
    r = random.Random(seed)
    text = "".join(r.choice("ab\n.é") for _ in range(40))
    stops = [r.choice(["a.", "\n\n", "bb", "é.", "ab\n", "zz"]) for _ in range(2)]
    cut = min([i for i in (text.find(s) for s in stops) if i >= 0], default=len(text))
    ts = TextStream(TOK, {EOS}, stops)
    pieces = [p.text for p in ts.pieces(ids(text.encode()))]
    assert "".join(pieces) == ts.text == text[:cut]
    assert ts.hit_stop == (cut < len(text))
    # the same rule as apply_stop_strings over text pieces (the remote-server path)
    assert "".join(apply_stop_strings(iter(list(text)), stops)) == text[:cut]


def test_pieces_carry_their_steps_and_held_text_waits():
    steps = [TokenStep(t, -0.5 * i) for i, t in enumerate(ids("xy END".encode()))]
    ts = TextStream(TOK, {EOS}, ["ENDS", "EN"])
    out = list(ts.pieces(steps))
    assert [p.text for p in out] == ["x", "y", " "]  # "E" is held (could start a stop), then "EN" stops
    assert [[s.token for s in p.steps] for p in out] == [[s.token] for s in steps[:3]]
    assert ts.hit_stop and ts.finish_reason(10) == "stop" and ts.tokens == 5


def test_finish_reason_length_and_source_closed_at_stop():
    ts = TextStream(TOK, {EOS})
    assert ts.decode(ids(b"abcd")) == "abcd" and ts.finish_reason(4) == "length" and ts.finish_reason(5) == "stop"
    consumed = []

    def source():
        for t in itertools.cycle(ids(b"ab.")):
            consumed.append(t)
            yield t
    gen = source()
    assert TextStream(TOK, {EOS}, ["."]).decode(gen) == "ab"
    assert len(consumed) == 3  # generation stopped at the stop string, and the generator was closed
    with pytest.raises(StopIteration):
        next(gen)


def test_feed_and_finish_for_step_driven_generation():
    ts = TextStream(TOK, {EOS}, ["!"])
    got = [ts.feed(t) for t in ids("é".encode())]
    assert got[0] is None and got[1].text == "é"  # the first byte is held until the character is complete
    assert ts.feed(ids(b"!")[0]) is None and ts.done and ts.feed(ids(b"z")[0]) is None
    assert ts.finish() is None and ts.text == "é"
