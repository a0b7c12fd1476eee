from .kv_cache import KVCache
from .transformer import Transformer
from .utils import build_model, eval_mode

__all__ = ["Transformer", "KVCache", "build_model", "eval_mode"]
