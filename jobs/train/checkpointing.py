"""Train state: everything an exact resume needs, written into one Ray Train checkpoint directory, and the one
reader every job uses to get a model out of any checkpoint (:func:`load_any_checkpoint`).

The trainer keeps its state-holding parts in one dict (``jobs.train.trainer.Trainer.state``): ``model``,
``optimizer``, ``schedule``, ``scaler``, ``progress`` (one copy for the run, written by rank 0) and ``loader``,
``rng`` (one per rank). :func:`save_train_state` and :func:`load_train_state` are the one path in and out.

Layout of a checkpoint directory (one per reported step, ``step_{step:08d}``; Ray Train merges what every
rank reports into it)::

    model.safetensors + vmae.json   rank 0 (DDP): the unwrapped model as an exported model
                                    (``model.save_checkpoint``), so any step loads like a finished run
    optim.pt        rank 0 (DDP): the optimizer ``state_dict``
    sharded/        FSDP2: model + optimizer as a torch.distributed.checkpoint (DCP) set, one file per rank
    trainer.pt      rank 0: format version, progress, schedule + grad-scaler state, whether sharded
    rank_{r}.pt     every rank: its loader state and its torch / numpy / python RNG states

A finished run also exports its model to ``<run dir>/final`` (``jobs.train.trainer``). Every ``.pt`` file is written
with ``torch.save`` from tensors and plain Python containers only, so all of them load with
``weights_only=True`` (numpy / python RNG states are converted to tensors for that reason).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from model import load_checkpoint
from model.checkpoint import VMAE_META, WEIGHTS, save_checkpoint
from pipeline import storage

TRAINER_FILE = "trainer.pt"
OPTIM_FILE = "optim.pt"
SHARDED_DIR = "sharded"
FORMAT_VERSION = 2  # 2: the model is an exported model (safetensors + vmae.json), not model.pt
FINAL_DIR = "final"
RUN_PARTS = ("progress", "schedule", "scaler")  # one copy per run (rank 0)
RANK_PARTS = ("loader", "rng")  # one copy per rank


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
    upload: str = "sync"  # "async": rank 0 goes on training while Ray Train uploads (ViT-B: ~1 GB to S3)

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.upload not in ("sync", "async"):
            raise ValueError(f"checkpoint.upload must be sync or async, got {self.upload!r}")
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.world_size = int(state["world_size"])

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainProgress:
        progress = cls()
        progress.load_state_dict(state)
        return progress


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
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = (
            torch.cuda.get_rng_state()
        )  # this rank's device only: visible-GPU counts differ by node
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
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list | tuple):  # older checkpoints held every visible device's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


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


class RNGState:
    """This process's RNG streams as a stateful part (``state_dict`` / ``load_state_dict``), so they are saved and
    restored like every other part of the train state."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


def save_train_state(
    directory: str, state: dict[str, Any], *, rank: int, sharded: bool = False, lineage: dict | None = None
) -> None:
    """Write this rank's part of the train state ``state`` (the trainer's parts: ``model``, ``optimizer``,
    :data:`RUN_PARTS`, :data:`RANK_PARTS`) into local ``directory`` (then reported to Ray Train); the exported
    model carries ``lineage`` (``jobs.train.lineage``).

    ``sharded=True`` (FSDP2) is collective: every rank must call it; it writes a DCP set under ``sharded/``."""
    os.makedirs(directory, exist_ok=True)
    model, optimizer = state["model"], state["optimizer"]
    if sharded:
        # local import: torch.distributed.checkpoint takes ~0.5 s to import; only sharded (FSDP) runs need it
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, SHARDED_DIR))
    if rank == 0:
        if not sharded:
            save_checkpoint(unwrap(model), directory, lineage=lineage)
            torch.save(optimizer.state_dict(), os.path.join(directory, OPTIM_FILE))
        run = {name: state[name].state_dict() for name in RUN_PARTS}
        torch.save(
            {"version": FORMAT_VERSION, "sharded": sharded, **run}, os.path.join(directory, TRAINER_FILE)
        )
    per_rank = {name: state[name].state_dict() for name in RANK_PARTS}
    torch.save(per_rank, os.path.join(directory, rank_file(rank)))


def load_train_state(
    directory: str, state: dict[str, Any], *, rank: int, world_size: int, reseed: Any, sharded: bool = False
) -> None:
    """Restore every part of ``state`` from ``directory`` (inverse of :func:`save_train_state`); ``model`` may
    already be wrapped (DDP, compile) or sharded (FSDP2, collective). The progress is moved to the current
    ``world_size``. After a resize, ranks that did not exist before take rank 0's loader state (the loader
    re-splits by its global cursor) and ``reseed(step)`` instead of a saved RNG state."""
    trainer = read_trainer_state(directory)
    if bool(trainer["sharded"]) != sharded:
        raise ValueError(f"checkpoint {directory!r} and run disagree on parallel.strategy (fsdp vs ddp)")
    if sharded:
        load_sharded(state["model"], state["optimizer"], directory)
    else:
        load_model_weights(state["model"], directory)
        load_optimizer(state["optimizer"], directory)
    for name in RUN_PARTS:
        state[name].load_state_dict(trainer[name])
    progress = state["progress"]
    per_rank = read_rank_state(directory, rank, progress.world_size)
    state["loader"].load_state_dict(per_rank["loader"])
    if per_rank["rng"] is not None:
        state["rng"].load_state_dict(per_rank["rng"])
    else:
        reseed(progress.step)
    progress.world_size = world_size


def read_trainer_state(directory: str) -> dict[str, Any]:
    """``trainer.pt`` of a checkpoint: format version, whether sharded, and the run-wide parts' states."""
    path = os.path.join(directory, TRAINER_FILE)
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {directory!r} has no {TRAINER_FILE}; not a vmae training checkpoint")
    state = torch.load(path, weights_only=True)
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {directory!r} has format version {state.get('version')}, want {FORMAT_VERSION}"
        )
    return state


def load_model_weights(model: torch.nn.Module, directory: str) -> None:
    """Load the exported model of a (DDP) checkpoint into ``model`` (unwrapped through DDP/compile)."""
    unwrap(model).load_state_dict(load_file(os.path.join(directory, WEIGHTS), device="cpu"))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: str) -> None:
    optimizer.load_state_dict(
        torch.load(os.path.join(directory, OPTIM_FILE), weights_only=True, map_location="cpu")
    )


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Collective DCP load of model + optimizer into an already sharded (FSDP2) model; resharding-safe."""
    # local import: torch.distributed.checkpoint takes ~0.5 s to import; only sharded (FSDP) runs need it
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


def checkpoint_dirs(run_url: str) -> list[str]:
    """URLs of the ``step_*`` folders under a run directory that hold ``trainer.pt``, newest first."""
    fs, path = storage.get_fs(run_url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = sorted((e.rstrip("/").rsplit("/", 1)[-1] for e in entries), reverse=True)
    urls = [storage.join(run_url, n) for n in names if n.startswith("step_")]
    return [u for u in urls if storage.exists(storage.join(u, TRAINER_FILE))]


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local directory holding checkpoint ``url``: the folder itself when local, else a temporary download."""
    if storage.protocol(url) == "file":
        yield storage.get_fs(url)[1]
        return
    with tempfile.TemporaryDirectory() as tmp:
        fs, path = storage.get_fs(url)
        fs.get(path + "/", tmp + "/", recursive=True)
        yield tmp


def latest_checkpoint_dir(run_url: str) -> str | None:
    """URL of the highest ``step_*`` checkpoint folder under a run directory that holds ``trainer.pt``."""
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


def model_url(url: str) -> str:
    """The exported model a checkpoint URL stands for: a model directory or file itself; a training
    checkpoint (``<run>/step_*``); a run directory's ``final`` export, else its latest checkpoint."""
    fs, path = storage.get_fs(url)
    if not fs.exists(path):
        raise ValueError(f"checkpoint {url!r} does not exist")
    if not fs.isdir(path) or not storage.exists(storage.join(url, TRAINER_FILE)):
        final = storage.join(url, FINAL_DIR)
        if storage.exists(storage.join(final, VMAE_META)):
            return final
        step = latest_checkpoint_dir(url)
        if step is None:
            return url  # a model directory or file: model.load_checkpoint says what it is
        url = step
    if not storage.exists(storage.join(url, VMAE_META)):
        raise ValueError(
            f"checkpoint {url!r} holds no exported model (an FSDP-sharded step); use the run's "
            f"{FINAL_DIR}/ export"
        )
    return url


def load_any_checkpoint(url: str, cfg: Any = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ``VideoMAE`` or ``VideoMAEClassifier`` from any checkpoint this project meets (:func:`model_url`):
    ``vmae``/``hf`` directories and official ``.pth`` files (``model.load_checkpoint``), a training run's
    checkpoint or the run directory itself. ``cfg`` (a ``VideoMAEConfig``) is the architecture of an official
    ``.pth``, which carries none (inferred for the paper's widths when omitted); a directory knows its own.
    Returns ``(model, meta)``; the model is on CPU in eval mode and ``meta["url"]`` is what was read."""
    target = model_url(url)
    fs, path = storage.get_fs(target)
    model, meta = load_checkpoint(target, cfg=cfg if not fs.isdir(path) else None)
    return model.eval(), meta
