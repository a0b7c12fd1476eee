"""Fetching models from the Hugging Face Hub (online users); everything else in lmstack takes a local path."""
from __future__ import annotations

from ..errors import LMStackError


def download(repo_id: str, revision: str | None = None, out: str | None = None,
             include: list[str] | None = None) -> str:
    """Download a model repository (or the files matching `include` globs) and return its local directory.
    Offline, a one-line error says to copy the files here and pass their path instead."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LMStackError("downloading needs huggingface_hub: pip install huggingface_hub") from None
    try:
        return snapshot_download(repo_id, revision=revision, local_dir=out, allow_patterns=include or None)
    except Exception as e:  # network errors come in many types (requests, httpx, OSError)
        name = type(e).__name__
        if any(k in name for k in ("Connect", "Timeout", "Offline", "Network")) or "resolve" in str(e).lower() \
                or isinstance(e, OSError):
            raise LMStackError(f"cannot download {repo_id}: the Hugging Face Hub is unreachable (offline?); "
                               "copy the model directory or GGUF file here and pass its path instead") from None
        raise LMStackError(f"cannot download {repo_id}: {name}: {e}") from None
