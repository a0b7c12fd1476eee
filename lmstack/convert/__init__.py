"""Models made elsewhere in and out: Hugging Face directories (hf.py) and GGUF files (gguf.py)."""
