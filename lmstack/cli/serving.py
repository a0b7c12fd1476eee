"""Verbs that serve pages and APIs: serve (OpenAI-compatible HTTP API), feedback (the voting page)."""
from __future__ import annotations

from .common import DTYPES, QUANT_MODES, dtype
from .run import add_speculative_flags


def cmd_serve(a) -> None:
    from ..serve import serve
    serve(a.model, host=a.host, port=a.port, api_key=a.api_key, max_batch=a.max_batch, model_name=a.model_name,
          threads=a.threads, indexes=a.index, prefix_cache_mb=None if a.no_prefix_cache else a.prefix_cache_mb,
          dtype=dtype(a.dtype), quantize=a.quantize, draft_model=a.draft_model, num_speculative=a.num_speculative,
          ngram_max=a.ngram_max, ngram_min=a.ngram_min, engine=a.engine)


def cmd_feedback(a) -> None:
    from ..errors import LMStackError
    from ..serve.feedback import FeedbackConfig, export_votes, feedback_server
    if a.export:
        counts = export_votes(a.out, a.export, format=a.format, include_edited=not a.no_edited)
        if a.format == "pairs":
            print(f"wrote {counts['written']} prompt/chosen/rejected pairs -> {a.export} "
                  f"(from {counts['votes']} votes: skipped {counts['tie']} tie, {counts['both_bad']} both bad, "
                  f"{counts['duplicates']} superseded, {counts['skipped_edited']} edited; {counts['edited']} edited "
                  "kept)")
        elif a.format == "ratings":
            print(f"wrote {counts['written']} prompt/completion/rating rows -> {a.export} (from "
                  f"{counts['rated_votes']} rated of {counts['votes']} votes, {counts['duplicates']} superseded)")
        else:
            print(f"wrote {counts['written']} SFT examples from edited answers -> {a.export} (from {counts['votes']} "
                  f"votes, {counts['duplicates']} superseded)")
        return
    if not a.model or not a.prompts:
        raise LMStackError("lmstack feedback needs --model and --prompts (or --export OUT to export the votes)")
    tags = tuple(t.strip() for t in a.tags.split(",") if t.strip())
    server = feedback_server(FeedbackConfig(
        model=a.model, prompts=a.prompts, out=a.out, host=a.host, port=a.port, annotator=a.annotator,
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed, chat=a.chat,
        open_browser=not a.no_browser, strategy=a.strategy, candidates=a.candidates, refit_every=a.refit_every,
        window=a.window, tags=tags, active_method=a.active_method))
    for line in server.notes():
        print(line)
    server.serve()


def register(sub) -> None:
    t = sub.add_parser("serve", help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...)")
    t.add_argument("--model", required=True, help="checkpoint dir, Hugging Face dir or GGUF file")
    t.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    t.add_argument("--port", type=int, default=8000)
    t.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    t.add_argument("--max-batch", type=int, default=16, help="generations decoding at once in the continuous batch (+64 requests queued, then 429)")
    t.add_argument("--model-name", default=None, help="name clients pass as `model`, shown by /v1/models and the playground "
                   "(default: the --model file or directory name, never its path; a run's last/best checkpoint "
                   "keeps its run's name: runs/sft/last -> sft/last)")
    t.add_argument("--dtype", choices=DTYPES)
    t.add_argument("--quantize", choices=list(QUANT_MODES),
                   help="weight-only quantized linears: int8 per channel, or GGUF blocks q8_0|q4_0|q4_1")
    t.add_argument("--index", action="append", metavar="DIR", help="a RAG index (`lmstack index build`) to serve "
                   "as an OpenAI vector store vs_<dir name> (/v1/vector_stores, /v1/rag/answer, the /rag and "
                   "/embeddings pages); repeat for more")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads for the model (default: PyTorch's); "
                   "on a small CPU box shared with clients, one fewer than the cores lowers single-stream latency")
    t.add_argument("--prefix-cache-mb", type=float, default=256, metavar="N", help="memory (MiB) for the prefix "
                   "cache: keys/values of prompt prefixes (system prompt, few-shot examples) reused by later "
                   "requests, least recently used evicted first (default 256; off for sliding-window models)")
    t.add_argument("--engine", choices=("process", "thread"), default=None, help="where the decode loop runs: a "
                   "process of its own reading the same shared-memory weights, so HTTP work never holds its GIL "
                   "(default on CPU), or a thread of the server process (default on GPU)")
    t.add_argument("--no-prefix-cache", action="store_true", help="recompute every prompt from its first token")
    add_speculative_flags(t)  # used while one generation decodes alone; a busier batch decodes plainly
    t.set_defaults(fn=cmd_serve)


    t = sub.add_parser("feedback", help="web page to vote between two sampled completions (preference data)",
                       description="Serve a local page that shows each prompt with two sampled completions; every "
                                   "vote is appended (fsync) to --out at once. Restarting with the same --out "
                                   "continues where it stopped. --export OUT [--format pairs|ratings|sft] "
                                   "writes preference pairs, ratings or SFT data.")
    t.add_argument("--model", help="checkpoint dir, Hugging Face dir or GGUF file")
    t.add_argument("--prompts", help=".txt (one prompt per line) or .jsonl ({\"prompt\"} or {\"messages\"} per line)")
    t.add_argument("--out", required=True, help="votes JSONL (appended to; already voted prompts are skipped)")
    t.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    t.add_argument("--port", type=int, default=8008)
    t.add_argument("--annotator", help="default annotator name (default: your user name)")
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--top-p", type=float, default=0.95)
    t.add_argument("--seed", type=int, default=0, help="base seed; each prompt's two seeds derive from it")
    t.add_argument("--chat", action="store_true", help="send plain prompts as a user turn (chat template)")
    t.add_argument("--no-browser", action="store_true", help="don't open the page in a web browser")
    t.add_argument("--strategy", choices=["active", "random", "sequential"], default="active",
                   help="which prompt next: active (the most informative pair for a reward-model ensemble; random "
                        "order until it has a first fit), random (seeded shuffle), sequential (file order)")
    t.add_argument("--candidates", type=int, default=4, metavar="K",
                   help="active: completions sampled per prompt; the page shows the most informative pair of them")
    t.add_argument("--refit-every", type=int, default=10, metavar="N",
                   help="active: refit the reward model in the background every N decisive (A/B) votes")
    t.add_argument("--window", type=int, default=8, metavar="W",
                   help="active: how many of the next open prompts are scored to pick the next one")
    t.add_argument("--active-method", choices=["bt", "disagreement", "infogain"], default="bt",
                   help="active: ask about the pair whose Bradley-Terry probability is nearest 0.5 (bt, default: "
                        "measured best in benchmarks/active_feedback.py), the members disagree on most, or with the "
                        "most expected information about the reward head (infogain, Laplace posterior)")
    t.add_argument("--tags", default="unsafe,wrong,off-topic,unhelpful,verbose",
                   help="comma-separated tags the page offers per completion")
    t.add_argument("--export", metavar="OUT", help="write the votes in --out as --format JSONL and exit")
    t.add_argument("--format", choices=["pairs", "ratings", "sft"], default="pairs",
                   help="with --export: pairs (prompt/chosen/rejected), ratings (prompt/completion/rating/tags/"
                        "critique, for `lmstack reward train --objective regression`), sft (edited answers)")
    t.add_argument("--no-edited", action="store_true", help="with --export pairs: drop pairs whose chosen text was "
                   "edited")
    t.set_defaults(fn=cmd_feedback)
