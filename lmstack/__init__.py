"""lmstack: a hackable language-model stack — tokenize, pretrain, generate (and more to come)."""
__version__ = "0.1.0"

from .config import ModelConfig, preset
from .errors import ConfigError, ContextLengthError, LMStackError
from .lm import LM, load

__all__ = ["LM", "load", "ModelConfig", "preset", "LMStackError", "ConfigError", "ContextLengthError", "__version__"]
