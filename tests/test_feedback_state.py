"""The feedback page's state object and request checks, without a model or a server."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from conftest import read_jsonl  # noqa: E402


def test_feedback_state_and_checks_without_a_model(tmp_path):
    """The pieces under the routes, over a stub LM: parse_vote / check_edit give a Vote or FeedbackError(status,
    message); FeedbackState resamples an identical pair with the next seeds, caches a shown pair, answers 404 / 409
    for unknown / unshown prompts, and saves a vote (on disk when save_vote returns) once."""
    from lmstack.serve.feedback_routes import check_edit, parse_vote
    from lmstack.serve.feedback_state import FeedbackError, FeedbackState, Vote, pair_seeds
    assert parse_vote({"id": "p1", "choice": "b", "edited_text": "ed", "annotator": " bob "}, None) == \
        Vote("p1", "b", "ed", "bob")
    for body, default, status, fn in [({"id": "p", "choice": "a", "x": 1}, "a", 422, parse_vote),
                                      ({"id": "p", "choice": "a", "annotator": " "}, None, 422, parse_vote),
                                      (Vote("p", "tie", "ed", "a"), None, 422, lambda v, d: check_edit(v))]:
        with pytest.raises(FeedbackError) as e:
            fn(body, default)
        assert e.value.status == status and e.value.message

    class StubLM:
        tokenizer, path, calls = type("Tok", (), {"chat_template": None})(), None, []

        def stream(self, text, truncate, stop_ids, seed, **sampling):
            self.calls.append(seed)
            yield "same" if len(self.calls) <= 2 else f"{text}{seed}"

    st = FeedbackState(StubLM(), [{"id": "p1", "prompt": "one "}, {"id": "p2", "prompt": "two "}],
                       tmp_path / "votes.jsonl", sampling={"max_new_tokens": 4})
    for pid, status in (("p1", 409), ("nope", 404)):
        with pytest.raises(FeedbackError) as e:
            st.shown_pair(pid)
        assert e.value.status == status
    pair = st.sample_pair("p1")
    sa, sb = pair_seeds("p1", 0, 1)  # the first pair came out identical: resampled with the next two seeds
    assert (pair["seed_a"], pair["seed_b"], pair["completion_a"]) == (sa, sb, f"one {sa}")
    assert st.sample_pair("p1") is pair and len(st.lm.calls) == 4  # cached: no new generation
    rec = st.vote_record(st.shown_pair("p1"), Vote("p1", "b", "ed", "ann"))
    assert (rec["chosen"], rec["rejected"], rec["original_chosen"]) == ("ed", f"one {sa}", f"one {sb}")
    assert st.save_vote(rec) is True and st.save_vote(rec) is False and read_jsonl(tmp_path / "votes.jsonl") == [rec]
    st.skip("p2")
    assert st.next_id() is None and (st.progress()["skipped"], st.progress()["session_votes"]) == (1, 1)
    st.close()


def test_featurize_runs_under_the_model_lock_in_chunks(tmp_path):
    """The learner's featurizer shares the LM with sampling: FeedbackState.locked runs it with the model lock held,
    a few texts at a time (so a refit featurizing many votes lets the page sample in between)."""
    import torch
    from lmstack.serve.feedback_state import FeedbackState

    class StubLM:
        tokenizer, path = type("Tok", (), {"chat_template": None})(), None

    st = FeedbackState(StubLM(), [{"id": "p1", "prompt": "one "}], tmp_path / "votes.jsonl")
    calls = []

    def featurize(prompts, completions):
        calls.append((len(prompts), st.model_lock.locked()))
        return torch.tensor([[float(len(c))] for c in completions]).reshape(-1, 1)

    f = st.locked(featurize, chunk=3)
    out = f(["p"] * 7, [str(10 ** i) for i in range(7)])
    assert out.flatten().tolist() == [1, 2, 3, 4, 5, 6, 7] and calls == [(3, True), (3, True), (1, True)]
    assert not st.model_lock.locked()
