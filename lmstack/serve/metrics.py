"""Prometheus metrics of the server (GET /metrics, text format 0.0.4) and the ASGI middleware that feeds them."""
from __future__ import annotations

import threading
import time


class Metrics:
    """Request counts by route and status, token counts, a latency histogram; thread-safe."""
    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.hist = [0] * (len(self.BUCKETS) + 1)
        self.lat_sum = 0.0
        self.lat_count = 0
        self.speculative = lambda: None  # the engine's speculative_stats (ServerState sets it; None: no drafter)

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            i = next((i for i, b in enumerate(self.BUCKETS) if seconds <= b), len(self.BUCKETS))
            self.hist[i] += 1
            self.lat_sum += seconds
            self.lat_count += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def render(self, active: int, queued: int = 0, batch: int = 0, prefix: dict | None = None) -> str:
        """The Prometheus text. prefix: PrefixCache.stats() of the engine (None: no prefix cache, reported as
        lmstack_prefix_cache_enabled 0)."""
        with self.lock:
            out = ["# HELP lmstack_requests_total HTTP requests by route and status.",
                   "# TYPE lmstack_requests_total counter"]
            for (route, status), n in sorted(self.requests.items()):
                out.append(f'lmstack_requests_total{{route="{route}",status="{status}"}} {n}')
            out += ["# HELP lmstack_prompt_tokens_total Prompt tokens processed.",
                    "# TYPE lmstack_prompt_tokens_total counter", f"lmstack_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP lmstack_completion_tokens_total Tokens generated.",
                    "# TYPE lmstack_completion_tokens_total counter",
                    f"lmstack_completion_tokens_total {self.completion_tokens}",
                    "# HELP lmstack_requests_active Requests admitted and not finished.",
                    "# TYPE lmstack_requests_active gauge", f"lmstack_requests_active {active}",
                    "# HELP lmstack_queue_depth Generations waiting for a free row in the decode batch.",
                    "# TYPE lmstack_queue_depth gauge", f"lmstack_queue_depth {queued}",
                    "# HELP lmstack_batch_rows Generations decoding in the running batch.",
                    "# TYPE lmstack_batch_rows gauge", f"lmstack_batch_rows {batch}",
                    "# HELP lmstack_request_duration_seconds Request latency (to the last byte for streams).",
                    "# TYPE lmstack_request_duration_seconds histogram"]
            cum = 0
            for b, n in zip(self.BUCKETS, self.hist):
                cum += n
                out.append(f'lmstack_request_duration_seconds_bucket{{le="{b}"}} {cum}')
            out.append(f'lmstack_request_duration_seconds_bucket{{le="+Inf"}} {cum + self.hist[-1]}')
            out.append(f"lmstack_request_duration_seconds_sum {self.lat_sum}")
            out.append(f"lmstack_request_duration_seconds_count {self.lat_count}")
        out += _prefix_lines(prefix)
        out += _speculative_lines(self.speculative())
        return "\n".join(out) + "\n"


_PREFIX_METRICS = (  # (name, stats key, type, help)
    ("lookup_tokens_total", "lookup_tokens", "counter", "Prompt tokens looked up in the prefix cache."),
    ("hit_tokens_total", "hit_tokens", "counter", "Prompt tokens served from the prefix cache (not recomputed)."),
    ("hit_rate", "hit_rate", "gauge", "Prefix-cache hit tokens / looked-up prompt tokens since start."),
    ("bytes", "bytes", "gauge", "Bytes of keys/values held by the prefix cache."),
    ("budget_bytes", "budget_bytes", "gauge", "The prefix cache's byte budget."),
    ("blocks", "blocks", "gauge", "Token blocks held by the prefix cache."),
    ("evictions_total", "evictions", "counter", "Prefix-cache blocks evicted (least recently used) for the budget."),
)


def _group_lines(group: str, enabled_help: str, table: tuple, stats: dict | None) -> list[str]:
    """Prometheus lines of one stats group: `lmstack_<group>_enabled`, then one metric per `table` row when on."""
    out = [f"# HELP lmstack_{group}_enabled {enabled_help}", f"# TYPE lmstack_{group}_enabled gauge",
           f"lmstack_{group}_enabled {int(stats is not None)}"]
    for name, key, kind, text in table if stats is not None else ():
        out += [f"# HELP lmstack_{group}_{name} {text}", f"# TYPE lmstack_{group}_{name} {kind}",
                f"lmstack_{group}_{name} {stats[key]}"]
    return out


def _prefix_lines(stats: dict | None) -> list[str]:
    """Prometheus lines of the prefix cache's stats (only `enabled 0` without one)."""
    return _group_lines("prefix_cache", "Whether the engine reuses prompt-prefix keys/values.", _PREFIX_METRICS, stats)


_SPEC_METRICS = (  # (name, stats key, type, help)
    ("proposed_tokens_total", "proposed", "counter", "Draft tokens proposed for verification."),
    ("accepted_tokens_total", "accepted", "counter", "Draft tokens the model accepted."),
    ("acceptance_rate", "acceptance_rate", "gauge", "Accepted / proposed draft tokens since start."),
    ("rounds_total", "rounds", "counter", "Speculative verify passes (one forward pass each)."),
    ("emitted_tokens_total", "tokens", "counter", "Tokens emitted by speculative rounds (accepted + one each)."),
)


def _speculative_lines(stats: dict | None) -> list[str]:
    """Prometheus lines of the engine's speculative decoding (only `enabled 0` without a --draft-model)."""
    return _group_lines("speculative", "Whether the engine drafts tokens (--draft-model).", _SPEC_METRICS, stats)


class Observe:
    """Pure ASGI middleware (keeps streaming and disconnect detection intact): per-request status and latency, to
    the last body byte, into `metrics`. /metrics itself is not counted. `app.add_middleware(Observe, metrics=m)`."""

    def __init__(self, inner, metrics: Metrics):
        self.inner = inner
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await self.inner(scope, receive, send)
        t0, status, done = time.perf_counter(), [500], [False]

        async def send_wrap(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            elif msg["type"] == "http.response.body" and not msg.get("more_body") and not done[0]:
                done[0] = True
                self.metrics.observe(scope["path"], status[0], time.perf_counter() - t0)
            await send(msg)
        try:
            await self.inner(scope, receive, send_wrap)
        finally:
            if not done[0]:
                self.metrics.observe(scope["path"], status[0], time.perf_counter() - t0)
