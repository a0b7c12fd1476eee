from .config import TrainConfig, load_recipe
from .trainer import Trainer, lr_at
# Imported eagerly: a lazy `from .pretrain import ...` inside a wrapper function named `pretrain` let the submodule
# lmstack.train.pretrain replace the function as this package's attribute after the first call.
from .pretrain import pretrain

__all__ = ["TrainConfig", "load_recipe", "Trainer", "lr_at", "pretrain"]
