from .kv_cache import KVCache
from .transformer import Transformer

__all__ = ["Transformer", "KVCache"]
