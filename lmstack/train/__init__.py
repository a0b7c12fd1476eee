from .config import TrainConfig, load_recipe
from .trainer import Trainer, lr_at

__all__ = ["TrainConfig", "load_recipe", "Trainer", "lr_at", "pretrain"]


def pretrain(cfg, log=print):
    from .pretrain import pretrain as _pretrain
    return _pretrain(cfg, log)
