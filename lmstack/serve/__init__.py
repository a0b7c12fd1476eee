"""OpenAI-compatible HTTP server (`lmstack serve`)."""
from .app import create_app, serve

__all__ = ["create_app", "serve"]
