"""Who reads which sample when: the epoch plan of the training loader, and its cursor for resume.

Why "plan from metadata, then stream": the order of an epoch is computed from the manifest's keys alone, so
it is cheap, deterministic and resumable without decoding anything; the decode workers
(:mod:`pipeline.loader.stream`) then stream their shards once, in order, and emit samples in the planned
order holding at most ~``shuffle_buffer`` undecoded samples. No ray import here: rank and world size are
passed in (``jobs/`` wires Ray Train).

Epoch plan (all from ``(seed, epoch)`` and the key lists):

1. Shards (those with selected keys) in a seed-permuted order; their selected keys in tar order form the
   global sequence of the epoch.
2. Equalised split by global position: with ``V = batch_size // num_sample`` videos per batch and ``W`` ranks,
   every rank gets ``nb = N // (W*V)`` batches (``remainder="drop"``: the last ``N mod W*V`` samples of the
   sequence, which change every epoch because the shard order does, are not seen that epoch) or
   ``ceil(N / (W*V))`` (``"pad"``: the sequence is wrapped around, so a few samples are seen twice). Rank ``r``
   takes the contiguous block ``[r*nb*V, (r+1)*nb*V)``: ranks read disjoint shards except at block edges.
   Every rank yields exactly ``nb`` batches, so DDP never waits on a starving rank.
3. Within a rank, rank-batch ``j`` belongs to planned worker ``j % K`` (the order PyTorch's round-robin
   returns them); each worker owns a contiguous block of the rank's samples, shuffled by a deterministic
   buffer of ``shuffle_buffer`` samples, and cut into batches of ``V`` videos.
4. Every clip's randomness (start frame, crop, flip, mask) comes from ``(seed, epoch, key, repeat)``
   (:mod:`pipeline.loader.clips`), never from the worker.

Resume: the loader's state holds the epoch and the cursor (batches this rank has yielded this epoch; equal on
all ranks). With the same world size, workers, batch size and buffer, :func:`worker_tasks` hands worker
process ``w`` the planned worker ``(cursor + w) % K`` from its batch ``(cursor + w) // K`` on, so the
round-robin continues with exactly the batches, clips and masks an uninterrupted run would have produced;
consumed samples are filtered out before the tar reader keeps them (never decoded). Elastic resume: if any of
those change, the finished part becomes a closed *segment*; the samples of the epoch not consumed by any rank
in earlier segments are re-planned (steps 2-3, same global order) for the new layout. Guarantee per epoch
across segments: no sample is yielded twice (``"drop"``), every rank yields the same number of batches within
a segment, and at most ``W*V - 1`` samples are left out, by the last segment's remainder; each sample keeps
the augmentation and mask it would have had.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from pipeline import storage
from pipeline.ingest import manifest as mf
from pipeline.loader.config import LoaderConfig


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


@dataclasses.dataclass(frozen=True)
class WorkerTask:
    """What one worker process does in one pass: play planned worker ``plays`` of ``workers`` in ``epoch``,
    from its batch ``skip`` on (rank-batch ``plays + b * workers`` for ``b >= skip``)."""

    epoch: int
    plays: int
    skip: int
    workers: int
    plan: WorkerPlan


def worker_tasks(plans: list[WorkerPlan], *, epoch: int, cursor: int) -> list[WorkerTask]:
    """One rank's tasks, one per worker process, to resume at rank-batch ``cursor``: PyTorch's round-robin
    always starts at process 0, so process ``w`` plays planned worker ``(cursor + w) % K`` and the batches
    come back as ``cursor, cursor + 1, ...``."""
    k = len(plans)
    return [
        WorkerTask(epoch, (cursor + w) % k, (cursor + w) // k, k, plans[(cursor + w) % k]) for w in range(k)
    ]
