"""Training data loader: a shard set (optionally a subset of it) -> batches of augmented clips and masks.

:class:`ClipLoader` is one rank's stateful view of the run: the epoch and cursor (:meth:`ClipLoader.state_dict`
for exact and elastic resume), the plan of the current epoch (:mod:`pipeline.loader.plan`: who reads which
sample when) and the decode workers that follow it (:mod:`pipeline.loader.stream`, started once and kept for
the run). Settings are :class:`pipeline.loader.config.LoaderConfig`. No ray import here: rank and world size
are passed in (``jobs/`` wires Ray Train).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from pipeline.loader.config import LoaderConfig, resolve_num_workers, resolve_pin_memory
from pipeline.loader.decode import resolve_backend
from pipeline.loader.masking import ClipSpec
from pipeline.loader.plan import (
    Layout,
    ShardKeys,
    WorkerPlan,
    buffer_shuffle,
    consumed_keys,
    epoch_sequence,
    load_shards,
    plan_epoch,
    worker_tasks,
)
from pipeline.loader.stream import ClipStream, DecodedCache, DecodeWorkers

# the plan's names stay importable from here (callers and tests written before the split)
__all__ = [
    "ClipLoader",
    "Layout",
    "LoaderConfig",
    "ShardKeys",
    "buffer_shuffle",
    "consumed_keys",
    "epoch_sequence",
    "load_shards",
    "make_loader",
    "plan_epoch",
]
log = logging.getLogger(__name__)
STATE_VERSION = 1


class Workers(Protocol):
    """What runs a pass of the plan: :class:`pipeline.loader.stream.DecodeWorkers` (local processes) or the
    Ray actors of ``jobs.train.remote_decode`` (``loader.decode: remote``)."""

    def run(self, tasks: list[Any]) -> Iterator[dict[str, Any]]:
        """Batches of one pass in rank-batch order; ``tasks[w]`` is what worker ``w`` plays."""

    def close(self) -> None:
        """Stop the workers; the next pass starts new ones."""


# (the rank's ClipStream, the resolved config) -> the workers that execute its passes
WorkersFactory = Callable[[ClipStream, LoaderConfig], Workers]


class ClipLoader:
    """Iterable over one rank's batches of the current epoch (dicts, ``B = batch_size`` clips):

    ``video`` uint8 [B, 3, T, S, S] (pixels; ``pipeline.loader.transforms.normalize`` on the training device makes the
    model's float input), ``mask`` bool [B, L] (True = masked), ``label`` int64 [B] (-1: none),
    ``valid`` bool [B] (False: a copy of a good clip, with its label, standing in for a skipped sample), ``key`` list[str] of length B.

    Iterating yields the rest of the epoch from the cursor; finishing it moves to the next epoch (cursor 0).
    The decode workers start on the first batch and serve every later epoch and resumed cursor; :meth:`close`
    (or garbage collection, or the training process's exit) stops them. ``stats`` counts this rank's batches,
    videos, clips and skipped samples (aggregated from the workers; part of the resume state); ``reads`` counts
    samples streamed from shards and taken from the workers' decoded caches, ``worker_pids`` the processes that
    decoded (diagnostics, not resume state).
    """

    def __init__(
        self,
        cfg: LoaderConfig,
        spec: ClipSpec,
        *,
        rank: int,
        world_size: int,
        shards: list[ShardKeys] | None = None,
        workers: WorkersFactory | None = None,
    ):
        if not isinstance(spec, ClipSpec):
            raise ValueError(f"spec must be a ClipSpec (model.config.VideoMAEConfig.clip_spec), got {spec!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if cfg.cache and spec.mask_type == "motion":
            raise ValueError(
                "loader.cache keeps decoded frames, but mask_type motion reads each video's motion vectors "
                "from its bytes: set loader.cache=false"
            )
        if cfg.decode == "remote" and workers is None:
            raise ValueError(
                "loader.decode=remote: the decode workers are Ray actors that jobs/ start "
                "(jobs.train.remote_decode.make_loader, which vmae pretrain/finetune use); none were given"
            )
        if workers is not None and not isinstance(cfg.num_workers, int):
            raise ValueError(f"loader.num_workers={cfg.num_workers!r}: resolve it before handing in workers")
        # resolved once here: an unusable backend fails now, and every worker decodes with the same one; the
        # worker count and pinning are the machine's (pipeline.loader.config)
        cfg = dataclasses.replace(
            cfg,
            decode_backend=resolve_backend(cfg.decode_backend),
            num_workers=resolve_num_workers(cfg.num_workers),
            pin_memory=resolve_pin_memory(cfg.pin_memory),
        )
        self.cfg, self.spec, self.rank, self.world_size = cfg, spec, rank, world_size
        self.shards = load_shards(cfg) if shards is None else shards
        self.num_samples = sum(len(s.keys) for s in self.shards)
        self.epoch, self.cursor = 0, 0
        # the training process's decoded cache (num_workers=0); each worker process keeps its own copy
        cache = DecodedCache(cfg.cache_max_mb * 2**20) if cfg.cache else None
        self.cache = None if cfg.num_workers else cache
        expect = None if cfg.verify == "none" else [
            (s.size, s.sha256 if cfg.verify == "sha256" else "") for s in self.shards]  # fmt: skip
        stream = ClipStream(urls=[s.url for s in self.shards], expect=expect, cfg=cfg, spec=spec, cache=cache)
        if workers is None:
            self.workers: Workers = DecodeWorkers(
                stream, cfg, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory
            )
        else:
            self.workers = workers(stream, cfg)
        self.reads: Counter[str] = (
            Counter()
        )  # samples "streamed" from shards / "cache_hits"; not resume state
        self.worker_pids: set[int] = set()  # processes that made this loader's batches
        self._history: list[tuple[Layout, int]] = []
        self._cache: tuple[Any, tuple[int, list[list[WorkerPlan]]]] | None = None
        self.stats: dict[str, Any] = {
            "batches": 0,
            "videos": 0,
            "clips": 0,
            "skipped": 0,
            "skipped_by_reason": {},
        }
        if self.batches_per_epoch() == 0:
            raise ValueError(
                f"{self.num_samples} sample(s) give no full batch: batch_size={cfg.batch_size} clips "
                f"(/ num_sample={cfg.num_sample}) x world_size={world_size}; lower batch_size or use remainder=pad"
            )

    @property
    def layout(self) -> Layout:
        cfg = self.cfg
        return Layout(
            world_size=self.world_size,
            num_workers=max(1, cfg.num_workers),
            videos_per_batch=cfg.videos_per_batch,
            shuffle_buffer=cfg.shuffle_buffer,
            remainder=cfg.remainder,
        )

    def batches_per_epoch(self) -> int:
        """Batches every rank yields in a full epoch with the current layout."""
        per_step = self.world_size * self.cfg.videos_per_batch
        n = self.num_samples
        return n // per_step if self.cfg.remainder == "drop" else -(-n // per_step)

    def _plan(self) -> tuple[int, list[list[WorkerPlan]]]:
        ident = (self.epoch, tuple(self._history), self.layout)
        if self._cache is None or self._cache[0] != ident:
            self._cache = (ident, plan_epoch(
                self.shards, seed=self.cfg.seed, epoch=self.epoch, history=self._history, layout=self.layout
            ))  # fmt: skip
        return self._cache[1]

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return max(0, self._plan()[0] - self.cursor)

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (cursor 0); a no-op if already there, so a resumed cursor survives."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch, self.cursor, self._history = epoch, 0, []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        nb, plans = self._plan()
        if self.cursor < nb:
            for batch in self.workers.run(
                worker_tasks(plans[self.rank], epoch=self.epoch, cursor=self.cursor)
            ):
                index = batch.pop("index")
                if index != self.cursor:  # an invariant of the plan; a violation would corrupt resume
                    raise RuntimeError(f"loader: batch {index} arrived where batch {self.cursor} was planned")
                self.reads.update(streamed=batch.pop("streamed"), cache_hits=batch.pop("cache_hits"))
                self.worker_pids.add(batch.pop("pid"))
                self._account(batch.pop("skipped"), batch)
                self.cursor += 1
                yield batch
        self.epoch, self.cursor, self._history = self.epoch + 1, 0, []

    def close(self) -> None:
        """Stop the decode worker processes now (they also stop when the loader is garbage collected, and
        exit with the training process); iterating again starts new ones."""
        self.workers.close()

    def _account(self, skipped: list[tuple[str, str]], batch: dict[str, Any]) -> None:
        st = self.stats
        st["batches"] += 1
        st["clips"] += int(batch["valid"].sum())
        st["videos"] += self.cfg.videos_per_batch - len(skipped)
        for key, reason in skipped:
            st["skipped"] += 1
            kind = reason.split(":")[0].split(" (")[0]
            st["skipped_by_reason"][kind] = st["skipped_by_reason"].get(kind, 0) + 1
            log.warning(
                "rank %d skipped sample %r: %s (%d skipped so far)", self.rank, key, reason, st["skipped"]
            )

    def _fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for s in self.shards:
            h.update("\x1e".join(s.keys).encode() + b"\x1d")
        return h.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """Versioned, JSON/torch-safe resume state. The cursor part is the same on every rank."""
        return {
            "version": STATE_VERSION,
            "seed": self.cfg.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "layout": dataclasses.asdict(self.layout),
            "history": [[dataclasses.asdict(lay), n] for lay, n in self._history],
            "fingerprint": self._fingerprint(),
            "stats": {**self.stats, "skipped_by_reason": dict(self.stats["skipped_by_reason"])},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off (exactly, or elastically if the layout changed)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        if state["seed"] != self.cfg.seed:
            raise ValueError(f"loader state has seed {state['seed']}, config has seed {self.cfg.seed}")
        if state["fingerprint"] != self._fingerprint():
            raise ValueError("loader state was made for different samples (shard set or subset changed)")
        history = [(Layout(**lay), int(n)) for lay, n in state["history"]]
        saved = Layout(**state["layout"])
        cursor = int(state["cursor"])
        if saved != self.layout and cursor > 0:
            history, cursor = [*history, (saved, cursor)], 0
        self.epoch, self.cursor, self._history = int(state["epoch"]), cursor, history
        self.stats = {**state["stats"], "skipped_by_reason": dict(state["stats"]["skipped_by_reason"])}


def make_loader(
    cfg: LoaderConfig,
    spec: ClipSpec,
    *,
    rank: int = 0,
    world_size: int = 1,
    workers: WorkersFactory | None = None,
) -> ClipLoader:
    """The loader of ``spec`` clips for one rank of ``world_size`` (Ray Train passes its own rank and world
    size; jobs take ``spec`` from the model config, ``VideoMAEConfig.clip_spec``). ``workers``: who decodes
    (default: local worker processes; ``loader.decode: remote`` needs the Ray actors of ``jobs/``)."""
    return ClipLoader(cfg, spec, rank=rank, world_size=world_size, workers=workers)
