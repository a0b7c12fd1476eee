from .cnn import GatedCNN
from .kv_cache import KVCache, RollingKVCache, StateCache, is_state_cache_model, make_cache
from .rnn import RNNLM
from .transformer import Transformer
from .utils import build_model, eval_mode, make_model

__all__ = ["Transformer", "RNNLM", "GatedCNN", "KVCache", "RollingKVCache", "StateCache", "make_cache",
           "is_state_cache_model", "build_model", "make_model", "eval_mode"]
