"""Training across processes and machines on torch.distributed, launched by torchrun (no home-made launcher):

    torchrun --nproc_per_node=2 -m lmstack train recipes/X.yaml                      # one machine, 2 processes
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \\
             --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m lmstack train X.yaml  # two machines (docs/distributed.md)

The recipe's `distributed:` picks the strategy: `ddp` (DistributedDataParallel: weights replicated, gradients
all-reduced) or `fsdp` (FSDP2 `fully_shard` on every Transformer block and the root: parameters, gradients and
optimizer state sharded across ranks; bf16 parameters with fp32 gradient reduction when `dtype: bfloat16` on GPU).
`auto` (the default) is ddp under torchrun and nothing in a plain process. gloo on CPU, NCCL on GPU.

Batches. `batch_size` is the micro-batch of one rank; a step's global batch holds batch_size * grad_accum * world
rows, a pure function of (seed, step), and micro-step m of rank r takes rows [(m * world + r) * batch_size, ...).
So 1 process with batch_size 8, 2 processes with batch_size 4, and 2 processes with batch_size 2 and grad_accum 2
train on the same rows (tests/test_distributed.py checks the losses agree to 1e-5). Gradients are synchronised on the
last micro-step only (DDP `no_sync`, FSDP `set_requires_gradient_sync(False)` before).
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"       # none | ddp | fsdp (resolved)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO = DistInfo()


def launched_world() -> int:
    """WORLD_SIZE as set by torchrun (1 in a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(strategy: str = "auto", device: str = "auto") -> DistInfo:
    """Join the process group torchrun prepared (idempotent) and return this process's place in it."""
    global _INFO
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed={strategy!r} is not supported; choose one of {', '.join(STRATEGIES)}")
    world = launched_world()
    if world <= 1:
        _INFO = DistInfo()
        return _INFO
    if strategy == "none":
        raise ConfigError(f"launched by torchrun with WORLD_SIZE={world} but the recipe says distributed: none; "
                          "set distributed: ddp or fsdp (or launch one process)")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    _INFO = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, "ddp" if strategy == "auto" else strategy)
    return _INFO


def info() -> DistInfo:
    return _INFO


def device_for(name: str) -> torch.device:
    """The run's device: `auto` is cuda (this rank's GPU under torchrun) when there is one, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _INFO.local_rank) if _INFO.enabled else torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def global_rows(batch_size: int, micro: int, grad_accum: int) -> tuple[int, int, int]:
    """(start, stop, global_size): the rows of a step's global batch that micro-step `micro` of this rank owns."""
    start = (micro * _INFO.world + _INFO.rank) * batch_size
    return start, start + batch_size, batch_size * grad_accum * _INFO.world


def stream_index(step: int, micro: int, grad_accum: int) -> int:
    """For epoch samplers drawing `batch_size` rows per index: the index of this rank's micro-batch, so the stream of
    rows is the same as one process with a global batch (data.sampler.epoch_batch)."""
    return (step * grad_accum + micro) * _INFO.world + _INFO.rank


def barrier() -> None:
    if _INFO.enabled:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not _INFO.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    if not _INFO.enabled:
        return [obj]
    out = [None] * _INFO.world
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (the global training loss from each rank's micro-batch losses)."""
    if not _INFO.enabled:
        return value
    v = value.detach().clone().float()
    dist.all_reduce(v)
    return v / _INFO.world


def wrap(model: torch.nn.Module, device: torch.device, bf16: bool = False) -> torch.nn.Module:
    """The module the training loop calls: DDP around `model`, or `model` itself sharded in place by FSDP2."""
    if not _INFO.enabled:
        return model
    if _INFO.strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return _ddp_class()(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 and device.type == "cuda" else MixedPrecisionPolicy()
    backbone = getattr(model, "backbone", model)  # a head model (reward/value) shards its Transformer's blocks
    for block in getattr(backbone, "blocks", []):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    class DDP(DistributedDataParallel):
        """DDP that lets a loss function read the wrapped model's attributes (`model.config`); calls still go
        through forward, so gradients stay synchronised."""

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)
    return DDP


def grad_sync(wrapped: torch.nn.Module, sync: bool):
    """Context for one micro-step's backward: gradient all-reduce / reduce-scatter only when `sync`."""
    if not _INFO.enabled:
        return nullcontext()
    if _INFO.strategy == "ddp":
        return nullcontext() if sync else wrapped.no_sync()
    return _fsdp_sync(wrapped, sync)


@contextmanager
def _fsdp_sync(wrapped, sync: bool):
    wrapped.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def as_float(x) -> float:
    """A (possibly DTensor) scalar as a Python float."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


def shutdown() -> None:
    """End this process's part in the run, on the success path of every rank.

    The barrier makes it collective: no peer is still inside a collective (or its single-process tail, as rank 0 is
    after `pretrain`) when the groups go. `gc.collect()` then frees what still holds a process group (FSDP meshes,
    DTensor state) while the interpreter is fully alive: a gloo group left for interpreter teardown can abort the
    process ("terminate called without an active exception", seen once in CI). Idempotent."""
    global _INFO
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()
    _INFO = DistInfo()


# ---- checkpoints ---------------------------------------------------------------------------------------------
# A distributed run's checkpoint is the single-process one (config.json, model.safetensors gathered on rank 0,
# tokenizer, train_state.pt) plus dcp/: model and optimizer state written by every rank through
# torch.distributed.checkpoint (sharded; FQN-keyed, so it reloads at any world size, and in a plain process).
# The shards are written into a temporary directory that rank 0 moves into the checkpoint's atomic swap.

def _state_dict_api():
    from torch.distributed.checkpoint import state_dict as sd
    return sd


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as a full CPU tensor on rank 0 ({} elsewhere); all ranks must call it."""
    sd = _state_dict_api()
    return sd.get_model_state_dict(model, options=sd.StateDictOptions(full_state_dict=True, cpu_offload=True))


def _trainable_filter(model: torch.nn.Module, state: dict, trainable_only: bool) -> dict:
    if not trainable_only:
        return state
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in keep}


def save_sharded(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool) -> None:
    """Write model + optimizer state into directory `path`, each rank its own shards (collective)."""
    import torch.distributed.checkpoint as dcp
    sd = _state_dict_api()
    state = {"model": _trainable_filter(model, sd.get_model_state_dict(model), trainable_only),
             "optim": sd.get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool) -> None:
    """Restore what `save_sharded` wrote, resharded to this run's world size (a plain process works too)."""
    import torch.distributed.checkpoint as dcp
    sd = _state_dict_api()
    state = {"model": _trainable_filter(model, sd.get_model_state_dict(model), trainable_only),
             "optim": sd.get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    sd.set_model_state_dict(model, state["model"], options=sd.StateDictOptions(strict=not trainable_only))
    sd.set_optimizer_state_dict(model, optimizer, state["optim"])
