"""Models made elsewhere in and out: Hugging Face directories (hf.py), GGUF files (gguf.py), and the one loader of
every source (load.py)."""
from .load import load_any, resolve_source

__all__ = ["load_any", "resolve_source"]
