"""Shared fixtures: tiny model configs, a small synthetic text corpus, Tiny Shakespeare (optional), a tiny run."""
from __future__ import annotations

import json
import contextlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tiny models gain nothing from intra-op threads, and with two cores shared with other work, oversubscribed OpenMP
# threads slow small ops down by orders of magnitude. One thread keeps the suite fast and bit-reproducible.
torch.set_num_threads(1)

WORDS = ("the quick brown fox jumps over lazy dog and cat sat on mat while bird sang in tree "
         "king queen lord lady speak thou art my good friend where is night day sun moon star").split()


def make_text(n_lines: int = 600, seed: int = 0) -> str:
    """Deterministic pseudo-English: learnable (fixed word list) and small (~18k chars for 600 lines)."""
    r = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = " ".join(r.choice(WORDS) for _ in range(r.randint(3, 9)))
        lines.append(words.capitalize() + r.choice(".!?,;"))
    return "\n".join(lines) + "\n"


def tiny_cfg_dict(**over) -> dict:
    """GPT-2 style tiny model."""
    d = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, pos_emb="learned", norm="layernorm",
             mlp="gelu", activation="gelu_tanh", bias=True, tie_embeddings=True)
    d.update(over)
    return d


def llama_cfg_dict(**over) -> dict:
    """Llama style tiny model: rope, rmsnorm, swiglu, grouped-query attention, untied head."""
    d = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos_emb="rope",
             norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    d.update(over)
    return d


def lively_model(family: str = "llama", seed: int = 0, **over):
    """A tiny random Transformer (tiny_cfg_dict for 'gpt2', else llama_cfg_dict, `over` on top) in eval mode with
    livelier random weights: varied, peaked next-token distributions, so greedy and sampled tests mean something."""
    from lmstack.config import ModelConfig
    from lmstack.models import Transformer
    torch.manual_seed(seed)
    d = (tiny_cfg_dict if family == "gpt2" else llama_cfg_dict)(**over)
    m = Transformer(ModelConfig(**d)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """`python -m lmstack.cli ARGS` in a subprocess; returns CompletedProcess (text mode)."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    for k, v in (env or {}).items():  # None removes a variable
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return subprocess.run([sys.executable, "-m", "lmstack.cli", *args], cwd=cwd or REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


@pytest.fixture
def tiny_cfg():
    from lmstack.config import ModelConfig
    return ModelConfig(**tiny_cfg_dict())


@pytest.fixture
def llama_cfg():
    from lmstack.config import ModelConfig
    return ModelConfig(**llama_cfg_dict())


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return make_text()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_text) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(corpus_text, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """Tiny Shakespeare: $LMSTACK_SHAKESPEARE, default ../shared/data/tinyshakespeare.txt next to the repo root."""
    p = Path(os.environ.get("LMSTACK_SHAKESPEARE", REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    if not p.is_absolute():
        p = (REPO / p).resolve()
    if not p.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {p} (set LMSTACK_SHAKESPEARE)")
    return p


def tiny_run_config(out_dir: Path, corpus: Path, **over):
    """TrainConfig of a tiny char-level run on the local corpus (a couple of seconds on a CPU)."""
    from lmstack.train.config import TrainConfig
    d = dict(out_dir=str(out_dir), corpus=str(corpus), tokenizer="char", progress=False,
             model={"preset": "tiny-char", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
                    "dropout": 0.0},
             batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5, max_steps=30, eval_interval=10, eval_iters=2,
             log_interval=1, final_eval_windows=4, sample_tokens=0)
    d.update(over)
    return TrainConfig.from_dict(d)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_file):
    """A finished tiny training run (in-process): (out_dir, summary)."""
    from lmstack.train import pretrain
    out = tmp_path_factory.mktemp("tinyrun") / "run"
    torch_threads = torch.get_num_threads()
    summary = pretrain(tiny_run_config(out, corpus_file), log=lambda *a: None)
    torch.set_num_threads(torch_threads)
    return out, summary


def pytest_collection_modifyitems(config, items):
    """A hang (e.g. a read loop that never ends) fails the test instead of stalling the suite."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(300))


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_chat_checkpoint(run_dir: Path, dst: Path) -> Path:
    """The tiny run's checkpoint with a ChatML template and <|im_start|>/<|im_end|> special tokens."""
    from lmstack.checkpoint import load_model, save_checkpoint
    model, tok = load_model(Path(run_dir) / "last")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    assert tok.vocab_size <= model.config.vocab_size  # the padded vocabulary has room for the new ids
    save_checkpoint(dst, model, tok)
    return dst


def start_server(app):
    """Run a FastAPI app under uvicorn on a free loopback port in a daemon thread: (server, thread, base_url).
    Returns once the server is accepting connections (an event set by uvicorn's startup, no polling)."""
    import socket
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        ready = threading.Event()

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            self.ready.set()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    server.ready = threading.Event()
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    assert server.ready.wait(timeout=30) and server.started, "the test server did not start"
    return server, th, f"http://127.0.0.1:{port}"


ARTIFACTS = Path(__file__).parent / "artifacts"   # screenshots of the browser tests
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def chromium_page(chromium_path: str, app, viewport: tuple[int, int] = (1100, 800)):
    """Serve `app` on loopback and open one headless Chromium page (playwright): yields (page, base_url, errors),
    `errors` collecting the page's uncaught JavaScript errors. Browser and server stop on exit."""
    sync_api = pytest.importorskip("playwright.sync_api")
    srv, th, url = start_server(app)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                yield page, url, errors
            finally:
                browser.close()
    finally:
        srv.should_exit = True
        th.join(timeout=10)


@pytest.fixture(scope="session")
def chromium():
    """Path of Debian's Chromium, installed with apt-get when missing (root only); skips when that can't be done."""
    path = shutil.which("chromium")
    if path is None:
        if os.name != "posix" or os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("chromium is not installed and can't be apt-get installed here (needs root + apt-get)")
        try:
            r = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True,
                               timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        except subprocess.TimeoutExpired:
            pytest.skip("apt-get install chromium timed out")
        path = shutil.which("chromium")
        if r.returncode != 0 or path is None:
            pytest.skip(f"apt-get install chromium failed: {(r.stderr or r.stdout)[-300:]}")
    return path


def sigkill_when(proc, ready, timeout: float = 240) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled with a deadline: the condition is a file another process
    writes), then reap it. The caller checks `proc.returncode == -SIGKILL` (the run did not finish first)."""
    import signal
    import time
    deadline = time.monotonic() + timeout
    try:
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
