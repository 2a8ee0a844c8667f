"""Training data loader: a shard set (optionally a subset of it) -> batches of augmented clips and masks.

Why it is built as "plan from metadata, then stream": the order of an epoch is computed from the manifest's
keys alone, so it is cheap, deterministic and resumable without decoding anything; the workers then stream
their shards once, in order, and emit samples in the planned order holding at most ~``shuffle_buffer``
undecoded samples. No ray import here: rank and world size are passed in (``jobs/`` wires Ray Train).

Epoch plan (all from ``(seed, epoch)`` and the key lists):

1. Shards (those with selected keys) in a seed-permuted order; their selected keys in tar order form the
   global sequence of the epoch.
2. Equalised split by global position: with ``V = batch_size // num_sample`` videos per batch and ``W`` ranks,
   every rank gets ``nb = N // (W*V)`` batches (``remainder="drop"``: the last ``N mod W*V`` samples of the
   sequence, which change every epoch because the shard order does, are not seen that epoch) or
   ``ceil(N / (W*V))`` (``"pad"``: the sequence is wrapped around, so a few samples are seen twice). Rank ``r``
   takes the contiguous block ``[r*nb*V, (r+1)*nb*V)``: ranks read disjoint shards except at block edges.
   Every rank yields exactly ``nb`` batches, so DDP never waits on a starving rank.
3. Within a rank, rank-batch ``j`` belongs to DataLoader worker ``j % K`` (the order PyTorch's round-robin
   returns them); each worker owns a contiguous block of the rank's samples, shuffled by a deterministic
   buffer of ``shuffle_buffer`` samples, and cut into batches of ``V`` videos.
4. Every clip's randomness (start frame, crop, flip, mask) comes from ``(seed, epoch, key, repeat)``
   (:mod:`pipeline.loader.clips`), never from the worker.

Resume: ``state_dict()`` holds the epoch and the cursor (batches this rank has yielded this epoch; equal on all
ranks). Loading it with the same world size, workers, batch size and buffer continues with exactly the
batches, clips and masks an uninterrupted run would have produced; consumed samples are filtered out before
the tar reader keeps them (never decoded). Elastic resume: if any of those change, the finished part becomes a
closed *segment*; the samples of the epoch not consumed by any rank in earlier segments are re-planned (steps
2-3, same global order) for the new layout. Guarantee per epoch across segments: no sample is yielded twice
(``"drop"``), every rank yields the same number of batches within a segment, and at most ``W*V - 1`` samples
are left out, by the last segment's remainder; each sample keeps the augmentation and mask it would have had.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import storage
from pipeline.ingest import manifest as mf
from pipeline.loader.clips import Decoded, collate_clips, decode_sample
from pipeline.loader.decode import BACKENDS, resolve_backend, stream_in_order
from pipeline.loader.masking import ClipSpec
from pipeline.loader.transforms import VIDEOMAE_SCALES
from pipeline.storage import StorageConfig

log = logging.getLogger(__name__)
STATE_VERSION = 1
REMAINDER = ("drop", "pad")
VERIFY = ("size", "sha256", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """Data and augmentation settings (what a clip *is* — frames, size, tubelets, mask — is the model's, passed
    to :func:`make_loader` as a :class:`pipeline.loader.masking.ClipSpec`). ``batch_size`` counts clips per rank per
    step (the model's ``B``); each batch holds ``batch_size // num_sample`` videos. ``shuffle_buffer`` counts
    videos (0 or 1: no shuffling)."""

    manifest: str = ""
    subset: str | None = None
    sampling_rate: int = 4  # 4 for Kinetics-like data, 2 for SSv2-like
    num_sample: int = 1  # clips cut from one decode (repeated augmentation)
    batch_size: int = 8
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = False
    mp_context: str | None = None  # DataLoader multiprocessing context ("fork", "spawn", "forkserver")
    shuffle_buffer: int = 256
    seed: int = 0
    flip: bool = True  # False for direction-sensitive data (SSv2)
    scales: tuple[float, ...] = VIDEOMAE_SCALES
    min_frames: int = 1
    remainder: str = "drop"  # one of REMAINDER
    verify: str = "size"  # check each shard against the manifest before reading: "size", "sha256" or "none"
    cache: bool = False  # keep every decoded video in memory after its first decode (small sets)
    cache_max_mb: int = 4096  # the cache stops growing here (later samples are decoded each epoch)
    decode_backend: str = (
        "auto"  # pipeline.loader.decode.BACKENDS; auto: the fastest usable one (pyav on CPU)
    )
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if not self.manifest:
            raise ValueError("manifest must name a shard set's manifest.json (or its folder)")
        if self.cache and self.num_workers:
            raise ValueError(
                "loader.cache keeps decoded videos in the training process, so it needs loader.num_workers=0 "
                f"(got {self.num_workers}): DataLoader worker processes are re-created every epoch and "
                "would lose it"
            )
        if self.decode_backend not in BACKENDS:
            raise ValueError(f"loader.decode_backend must be one of {BACKENDS}, got {self.decode_backend!r}")
        if self.verify not in VERIFY:
            raise ValueError(f"loader.verify must be one of {VERIFY}, got {self.verify!r}")
        if self.cache_max_mb < 1:
            raise ValueError(f"loader.cache_max_mb must be >= 1, got {self.cache_max_mb}")
        for name, low in (
            ("sampling_rate", 1),
            ("num_sample", 1),
            ("min_frames", 1),
            ("batch_size", 1),
            ("num_workers", 0),
            ("prefetch_factor", 1),
            ("shuffle_buffer", 0),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"loader.{name} must be an int >= {low}, got {v!r}")
        if not self.scales or any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(
                f"loader.scales must be a non-empty list of values in (0, 1], got {self.scales!r}"
            )
        if self.batch_size % self.num_sample:
            raise ValueError(
                f"loader.batch_size={self.batch_size} must be a multiple of num_sample={self.num_sample}"
            )
        if self.remainder not in REMAINDER:
            raise ValueError(f"loader.remainder must be one of {REMAINDER}, got {self.remainder!r}")
        if self.mp_context not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(
                f"loader.mp_context must be fork, spawn, forkserver or null, got {self.mp_context!r}"
            )

    @property
    def videos_per_batch(self) -> int:
        return self.batch_size // self.num_sample


@dataclasses.dataclass(frozen=True)
class ShardKeys:
    """A shard's URL and its selected keys, in tar order; its size and sha256 from the manifest (-1 / "":
    unknown)."""

    url: str
    keys: tuple[str, ...]
    size: int = -1
    sha256: str = ""


def load_shards(cfg: LoaderConfig) -> list[ShardKeys]:
    """Shards of the manifest that hold selected keys (all keys, or the subset's), in manifest order.

    Keys per shard come from ``ShardInfo.keys``; a manifest without them falls back to ``index.parquet``.
    """
    m = mf.read_manifest(cfg.manifest, cfg.storage)
    if all(s.keys for s in m.shards):
        per_shard = [list(s.keys) for s in m.shards]
    else:
        t = mf.read_table(storage.join(m.root, mf.INDEX_NAME), cfg.storage).to_pydict()
        by_name: dict[str, list[tuple[int, str]]] = {s.name: [] for s in m.shards}
        offsets = t.get("offset") or list(range(len(t["key"])))
        for key, shard, off in zip(t["key"], t["shard"], offsets, strict=True):
            by_name.setdefault(shard, []).append((off, key))
        per_shard = [[k for _, k in sorted(by_name[s.name])] for s in m.shards]
    all_keys = [k for keys in per_shard for k in keys]
    if len(set(all_keys)) != len(all_keys):
        dup = next(k for k, n in Counter(all_keys).items() if n > 1)
        raise ValueError(f"manifest {cfg.manifest!r}: key {dup!r} appears more than once")
    if cfg.subset:
        chosen = set(mf.read_subset(cfg.subset, cfg.storage).keys)
        unknown = chosen - set(all_keys)
        if unknown:
            raise ValueError(
                f"subset {cfg.subset!r}: {len(unknown)} key(s) are not in {cfg.manifest!r}, e.g. {sorted(unknown)[:3]}"
            )
        per_shard = [[k for k in keys if k in chosen] for keys in per_shard]
    return [ShardKeys(m.shard_url(s), tuple(k), s.size, s.sha256)
            for s, k in zip(m.shards, per_shard, strict=True) if k]  # fmt: skip


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def buffer_shuffle(items: list, size: int, rng: np.random.Generator) -> list:
    """Deterministic streaming shuffle: keep ``size`` items, emit a uniformly chosen one per item read.

    At any point at most ``size - 1`` items have been read but not emitted, which bounds what the streaming
    worker holds in memory while following this order.
    """
    if size <= 1:
        return list(items)
    u = rng.random(len(items))
    buf, out = [], []
    for i, x in enumerate(items):
        buf.append(x)
        if len(buf) >= size:
            k = int(u[i] * len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            out.append(buf.pop())
    while buf:
        k = int(rng.integers(len(buf)))
        buf[k], buf[-1] = buf[-1], buf[k]
        out.append(buf.pop())
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """Everything a segment's split depends on besides the global sequence."""

    world_size: int
    num_workers: int  # effective DataLoader workers (>= 1; 0 workers plans as 1)
    videos_per_batch: int
    shuffle_buffer: int
    remainder: str


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """One worker's block: ``inputs`` (shard index, key) in read order; ``order`` the keys in emit order."""

    inputs: list[tuple[int, str]]
    order: list[str]


def epoch_sequence(shards: list[ShardKeys], seed: int, epoch: int) -> list[tuple[int, str]]:
    """The epoch's global sequence: shards in a ``(seed, epoch)`` permutation, keys in tar order."""
    perm = _rng(seed, epoch, 0).permutation(len(shards))
    return [(int(s), k) for s in perm for k in shards[s].keys]


def plan_segment(
    items: list[tuple[int, str]], lay: Layout, *, seed: int, epoch: int, segment: int
) -> tuple[int, list[list[WorkerPlan]]]:
    """Split ``items`` over ranks and workers (module docstring, steps 2-3).

    Returns ``(nb, plans)``: batches per rank and ``plans[rank][worker]``.
    """
    per_step = lay.world_size * lay.videos_per_batch
    nb = len(items) // per_step if lay.remainder == "drop" else -(-len(items) // per_step)
    if lay.remainder == "pad" and items:
        need = nb * per_step
        items = (items * (need // len(items) + 1))[:need]
    k, vpb = lay.num_workers, lay.videos_per_batch
    plans = []
    for r in range(lay.world_size):
        block = items[r * nb * vpb : (r + 1) * nb * vpb]
        start, workers = 0, []
        for w in range(k):
            n = max(0, -(-(nb - w) // k)) * vpb  # worker w owns rank-batches j = w, w+k, ...
            inputs = block[start : start + n]
            start += n
            rng = _rng(seed, epoch, 1, segment, r, w)
            workers.append(
                WorkerPlan(inputs, buffer_shuffle([key for _, key in inputs], lay.shuffle_buffer, rng))
            )
        plans.append(workers)
    return nb, plans


def consumed_keys(plans: list[list[WorkerPlan]], batches: int, videos_per_batch: int) -> set[str]:
    """Keys in the first ``batches`` rank-batches of every rank of a segment."""
    out: set[str] = set()
    for workers in plans:
        k = len(workers)
        for w, plan in enumerate(workers):
            done = max(0, -(-(batches - w) // k))
            out.update(plan.order[: done * videos_per_batch])
    return out


def plan_epoch(
    shards: list[ShardKeys], *, seed: int, epoch: int, history: list[tuple[Layout, int]], layout: Layout
) -> tuple[int, list[list[WorkerPlan]]]:
    """The current segment's plan after the closed segments ``history`` = [(layout, batches consumed)]."""
    items = epoch_sequence(shards, seed, epoch)
    for s, (lay, batches) in enumerate(history):
        _, plans = plan_segment(items, lay, seed=seed, epoch=epoch, segment=s)
        done = consumed_keys(plans, batches, lay.videos_per_batch)
        items = [it for it in items if it[1] not in done]
    return plan_segment(items, layout, seed=seed, epoch=epoch, segment=len(history))


class _ClipStream(IterableDataset):
    """One rank's remaining batches of one segment; each DataLoader worker streams its own block."""

    def __init__(
        self,
        *,
        urls: list[str],
        plans: list[WorkerPlan],
        cursor: int,
        cfg: LoaderConfig,
        spec: ClipSpec,
        epoch: int,
        cache: DecodedCache | None = None,
        expect: list[tuple[int, str]] | None = None,
    ):
        self.urls, self.plans, self.cursor, self.cfg = urls, plans, cursor, cfg
        self.expect = expect
        self.spec, self.epoch, self.cache = spec, epoch, cache

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        k = len(self.plans)
        # Resuming at rank-batch c: worker wid plays planned worker (c+wid) % k, so PyTorch's round-robin
        # (which always starts at worker 0) returns rank-batches c, c+1, ... in order.
        own, skip = (self.cursor + wid) % k, (self.cursor + wid) // k
        yield from self._batches(self.plans[own], own, skip, k)

    def _batches(self, plan: WorkerPlan, own: int, skip: int, k: int):
        cfg, spec = self.cfg, self.spec
        order = plan.order[skip * cfg.videos_per_batch :]
        group, batch_no = [], skip
        for item in self._samples(plan.inputs, order):
            group.append(item)
            if len(group) == cfg.videos_per_batch:
                index = own + batch_no * k
                batch = collate_clips(group, spec, cfg, seed=cfg.seed, epoch=self.epoch, pad_id=str(index))
                yield {**batch, "index": index}
                group, batch_no = [], batch_no + 1
        assert not group, "worker blocks hold whole batches"

    def _samples(self, inputs: list[tuple[int, str]], order: list[str]):
        """``(key, sample)`` in ``order``: from the decoded cache when there, else streamed from the shards
        (and, with the cache on, decoded whole and kept for the next epochs)."""
        cfg, cache = self.cfg, self.cache
        if cache is None:
            yield from stream_in_order(self.urls, inputs, order, cfg=cfg.storage, expect=self.expect)
            return
        have = {k for k in order if k in cache}  # fixed now: a key repeated later still streams in order
        stream = stream_in_order(self.urls, [i for i in inputs if i[1] not in have],
                                 [k for k in order if k not in have], cfg=cfg.storage, expect=self.expect)  # fmt: skip
        for key in order:
            if key in have:
                yield key, cache[key]
                continue
            got, sample = next(stream)
            if got != key:  # invariant of stream_in_order
                raise RuntimeError(f"loader cache: expected sample {key!r}, the shards gave {got!r}")
            if not isinstance(sample, Exception):  # a sample its shard did not deliver is not a verdict
                sample = decode_sample(key, sample, backend=cfg.decode_backend)
                cache.add(key, sample)
            yield key, sample


class DecodedCache(dict):
    """key -> :class:`pipeline.loader.clips.Decoded`, bounded by ``max_bytes`` of frames: past it, new samples are
    not kept (they are decoded again each epoch) and one warning says so."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes, self.nbytes, self.full = max_bytes, 0, False

    def add(self, key: str, value: Decoded) -> None:
        if self.nbytes + value.nbytes > self.max_bytes:
            if not self.full:
                log.warning("loader cache holds %.0f MB (cache_max_mb): later samples are decoded each epoch",
                            self.nbytes / 2**20)  # fmt: skip
            self.full = True
            return
        self[key] = value
        self.nbytes += value.nbytes


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers parallelise across samples; intra-op threads would oversubscribe


class ClipLoader:
    """Iterable over one rank's batches of the current epoch (dicts, ``B = batch_size`` clips):

    ``video`` uint8 [B, 3, T, S, S] (pixels; ``pipeline.loader.transforms.normalize`` on the training device makes the
    model's float input), ``mask`` bool [B, L] (True = masked), ``label`` int64 [B] (-1: none),
    ``valid`` bool [B] (False: a copy of a good clip, with its label, standing in for a skipped sample), ``key`` list[str] of length B.

    Iterating yields the rest of the epoch from the cursor; finishing it moves to the next epoch (cursor 0).
    ``stats`` counts this rank's batches, videos, clips and skipped samples (aggregated from the workers).
    """

    def __init__(
        self,
        cfg: LoaderConfig,
        spec: ClipSpec,
        *,
        rank: int,
        world_size: int,
        shards: list[ShardKeys] | None = None,
    ):
        if not isinstance(spec, ClipSpec):
            raise ValueError(f"spec must be a ClipSpec (model.config.VideoMAEConfig.clip_spec), got {spec!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        # resolved once here: an unusable backend fails now, and every worker decodes with the same one
        cfg = dataclasses.replace(cfg, decode_backend=resolve_backend(cfg.decode_backend))
        self.cfg, self.spec, self.rank, self.world_size = cfg, spec, rank, world_size
        self.shards = load_shards(cfg) if shards is None else shards
        self.num_samples = sum(len(s.keys) for s in self.shards)
        self.epoch, self.cursor = 0, 0
        self.cache = DecodedCache(cfg.cache_max_mb * 2**20) if cfg.cache else None
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

    def __iter__(self):
        nb, plans = self._plan()
        if self.cursor < nb:
            cfg = self.cfg
            ds = _ClipStream(
                urls=[s.url for s in self.shards],
                plans=plans[self.rank],
                cursor=self.cursor,
                cfg=cfg,
                spec=self.spec,
                epoch=self.epoch,
                cache=self.cache,
                expect=None if cfg.verify == "none" else
                [(s.size, s.sha256 if cfg.verify == "sha256" else "") for s in self.shards],
            )  # fmt: skip
            extra = (
                {"prefetch_factor": cfg.prefetch_factor, "multiprocessing_context": cfg.mp_context}
                if cfg.num_workers
                else {}
            )
            dl = DataLoader(
                ds, batch_size=None, num_workers=cfg.num_workers, worker_init_fn=_worker_init,
                pin_memory=cfg.pin_memory, **extra,
            )  # fmt: skip
            for batch in dl:
                index = batch.pop("index")
                if index != self.cursor:  # an invariant of the plan; a violation would corrupt resume
                    raise RuntimeError(f"loader: batch {index} arrived where batch {self.cursor} was planned")
                self._account(batch.pop("skipped"), batch)
                self.cursor += 1
                yield batch
        self.epoch, self.cursor, self._history = self.epoch + 1, 0, []

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


def make_loader(cfg: LoaderConfig, spec: ClipSpec, *, rank: int = 0, world_size: int = 1) -> ClipLoader:
    """The loader of ``spec`` clips for one rank of ``world_size`` (Ray Train passes its own rank and world
    size; jobs take ``spec`` from the model config, ``VideoMAEConfig.clip_spec``)."""
    return ClipLoader(cfg, spec, rank=rank, world_size=world_size)
