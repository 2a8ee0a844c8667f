"""Everything an exact resume needs, written into one Ray Train checkpoint directory.

Layout of a checkpoint directory (one per reported step, ``step_{step:08d}``; Ray Train merges what every
rank reports into it)::

    trainer.pt      rank 0: step, samples seen, world size, scheduler + grad-scaler state
    model.pt        rank 0 (DDP): the plain, unwrapped model ``state_dict`` (what finetuning loads)
    optim.pt        rank 0 (DDP): the optimizer ``state_dict``
    sharded/        FSDP2: model + optimizer as a torch.distributed.checkpoint (DCP) set, one file per rank
    rank_{r}.pt     every rank: its loader state and its torch / numpy / python RNG states

Every file is written with ``torch.save`` from tensors and plain Python containers only, so all of them load
with ``weights_only=True`` (numpy / python RNG states are converted to tensors for that reason).
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import numpy as np
import torch

TRAINER_FILE = "trainer.pt"
MODEL_FILE = "model.pt"
OPTIM_FILE = "optim.pt"
SHARDED_DIR = "sharded"
FORMAT_VERSION = 1


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def checkpoint_dir_name(step: int) -> str:
    """Name of the checkpoint of ``step``; zero-padded so names sort by step."""
    return f"step_{step:08d}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When to checkpoint and how many to keep (Ray Train deletes older ones)."""

    every_steps: int = 1000
    num_to_keep: int | None = 3
    at_end: bool = True

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.num_to_keep is not None and self.num_to_keep < 1:
            raise ValueError(f"checkpoint.num_to_keep must be >= 1 or null, got {self.num_to_keep}")


@dataclasses.dataclass(kw_only=True)
class TrainProgress:
    """Counters of a run. ``samples_seen`` counts clips over all workers (the schedule's clock)."""

    step: int = 0
    samples_seen: int = 0
    world_size: int = 1

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainProgress:
        return cls(
            step=int(state["step"]),
            samples_seen=int(state["samples_seen"]),
            world_size=int(state["world_size"]),
        )


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU + CUDA), numpy and python RNG states, as tensors/ints only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    assert kind == "MT19937"
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached),
        "python_version": int(py_version),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            int(state["numpy_pos"]),
            int(state["numpy_has_gauss"]),
            float(state["numpy_cached_gaussian"]),
        )
    )
    internal = tuple(int(x) for x in state["python_internal"].tolist())
    random.setstate((int(state["python_version"]), internal, state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python RNGs of this process (``seed`` should already include the rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    directory: str,
    *,
    rank: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: TrainProgress,
    scheduler_state: dict[str, Any],
    scaler_state: dict[str, Any],
    loader_state: dict[str, Any],
    sharded: bool = False,
) -> None:
    """Write this rank's part of a checkpoint into local ``directory`` (then reported to Ray Train).

    ``sharded=True`` (FSDP2) is collective: every rank must call it; it writes a DCP set under ``sharded/``.
    """
    os.makedirs(directory, exist_ok=True)
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, SHARDED_DIR))
    if rank == 0:
        if not sharded:
            torch.save(unwrap(model).state_dict(), os.path.join(directory, MODEL_FILE))
            torch.save(optimizer.state_dict(), os.path.join(directory, OPTIM_FILE))
        trainer = {
            "version": FORMAT_VERSION,
            "progress": progress.state_dict(),
            "scheduler": scheduler_state,
            "scaler": scaler_state,
            "sharded": sharded,
        }
        torch.save(trainer, os.path.join(directory, TRAINER_FILE))
    torch.save({"loader": loader_state, "rng": rng_state()}, os.path.join(directory, rank_file(rank)))


def read_trainer_state(directory: str) -> dict[str, Any]:
    """``trainer.pt`` of a checkpoint: progress, scheduler, scaler, whether the weights are sharded."""
    path = os.path.join(directory, TRAINER_FILE)
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {directory!r} has no {TRAINER_FILE}; not a vmae pretrain checkpoint")
    state = torch.load(path, weights_only=True)
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {directory!r} has format version {state.get('version')}, want {FORMAT_VERSION}"
        )
    return state


def load_model_weights(model: torch.nn.Module, directory: str) -> None:
    """Load ``model.pt`` into the (unwrapped, unsharded) ``model`` before it is wrapped for DDP."""
    state = torch.load(os.path.join(directory, MODEL_FILE), weights_only=True, map_location="cpu")
    unwrap(model).load_state_dict(state)


def load_optimizer(optimizer: torch.optim.Optimizer, directory: str) -> None:
    optimizer.load_state_dict(
        torch.load(os.path.join(directory, OPTIM_FILE), weights_only=True, map_location="cpu")
    )


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Collective DCP load of model + optimizer into an already sharded (FSDP2) model; resharding-safe."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(directory, SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def read_rank_state(directory: str, rank: int, old_world_size: int) -> dict[str, Any]:
    """Loader + RNG state for ``rank``. After a resize, ranks that did not exist before get no RNG state
    (the caller reseeds them) and the loader state of rank 0 (the loader re-splits by its global cursor)."""
    own = rank < old_world_size
    state = torch.load(os.path.join(directory, rank_file(rank if own else 0)), weights_only=True)
    if not own:
        state = {"loader": state["loader"], "rng": None}
    return state


def latest_checkpoint_dir(run_url: str) -> str | None:
    """URL of the highest ``step_*`` checkpoint folder under a run directory that holds ``trainer.pt``."""
    from pipeline import storage

    fs, path = storage.get_fs(run_url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return None
    steps = sorted(
        e.rstrip("/").rsplit("/", 1)[-1]
        for e in entries
        if e.rstrip("/").rsplit("/", 1)[-1].startswith("step_")
    )
    for name in reversed(steps):
        url = storage.join(run_url, name)
        if storage.exists(storage.join(url, TRAINER_FILE)):
            return url
    return None
