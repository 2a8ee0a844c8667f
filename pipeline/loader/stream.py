"""The decode side of the training loader: worker processes that turn planned samples into batches, kept for
the whole run.

What a worker does in one pass (:class:`ClipStream`): stream its task's shards once, in the planned order
(:func:`pipeline.loader.decode.stream_in_order`), cut clips and masks (:func:`pipeline.loader.clips.collate_clips`)
and yield batches tagged with their rank-batch index. Which worker reads what is decided in
:mod:`pipeline.loader.plan` and arrives as a :class:`pipeline.loader.plan.WorkerTask`.

Why workers live for the run, and how (:class:`DecodeWorkers`): a fresh set of processes per epoch pays the
start-up (imports, decoder set-up) every epoch and throws away anything a worker kept — above all the decoded
video cache (``loader.cache``), which only pays off if it outlives the epoch. We keep one
``torch.utils.data.DataLoader`` with ``persistent_workers=True`` for the loader's life rather than a pool of
our own: PyTorch's already gives daemon processes that exit with their parent (watchdog), ordered round-robin
results, prefetch, a pinning thread, and worker exceptions re-raised in the training process; a hand-made pool
would re-implement each. Its one catch: a persistent worker keeps the dataset copy made when it started, and
every pass just calls ``iter()`` on that copy again. So the per-pass work does not travel with the dataset: the
training process bumps a shared *generation* counter and puts ``(generation, task)`` into each worker's own
queue before starting the pass; a worker starting a pass takes the newest task of at least the current
generation (older ones belong to passes abandoned before the worker started them, e.g. a ``break`` mid-epoch)
and keeps it, so a late stale pass and the current one read the same task. With ``num_workers=0`` the same
stream runs in the training process.

Each process keeps its own :class:`DecodedCache` across passes: a worker plays a different block of samples
each epoch, so over a run every worker may decode (and keep) any sample once, and memory can reach
``num_workers x cache_max_mb`` per rank.
"""

from __future__ import annotations

import logging
import multiprocessing.context
import os
import queue
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.loader.clips import Decoded, collate_clips, decode_sample
from pipeline.loader.config import LoaderConfig
from pipeline.loader.decode import stream_in_order
from pipeline.loader.masking import ClipSpec
from pipeline.loader.plan import WorkerTask

log = logging.getLogger(__name__)
TASK_TIMEOUT_S = (
    300.0  # a worker waiting this long for its task means the training process stopped feeding it
)


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


def worker_init(_: int) -> None:
    """A worker starts with the training process's environment as it was when the workers started (what a
    fork gives; a fork-server or spawned worker would have the server's), e.g. the storage credentials a Ray
    Train worker installed (``pipeline.storage.install_credentials``). It travels over the pipe that starts the
    worker, never to disk."""
    environ = getattr(get_worker_info().dataset, "environ", None)
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
    torch.set_num_threads(1)  # workers parallelise across samples; intra-op threads would oversubscribe


class ClipStream(IterableDataset):
    """One rank's batches of one pass: in a worker process, those of the task its queue holds for the current
    generation; in the training process (``num_workers=0``), those of ``local``.

    Batches are :func:`pipeline.loader.clips.collate_clips` dicts plus ``index`` (rank-batch number),
    ``streamed`` / ``cache_hits`` (samples of the batch read from the shards / taken from the cache) and
    ``pid`` (the process that made it).
    """

    def __init__(
        self,
        *,
        urls: list[str],
        expect: list[tuple[int, str]] | None,
        cfg: LoaderConfig,
        spec: ClipSpec,
        cache: DecodedCache | None,
    ) -> None:
        self.urls, self.expect, self.cfg, self.spec, self.cache = urls, expect, cfg, spec, cache
        self.local: WorkerTask | None = None
        self.generation: Any = None  # shared int (ctx.RawValue), set by DecodeWorkers before workers start
        self.inboxes: list[Any] = []  # one ctx.Queue of (generation, WorkerTask) per worker process
        self._task: tuple[int, WorkerTask] | None = None  # a worker's latest task (persists across passes)
        self.environ: dict[str, str] | None = None  # os.environ when the workers started (worker_init)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        task = self.local if info is None else self._receive(info.id)
        assert task is not None, "DecodeWorkers.run sets the task before iterating"
        wid = 0 if info is None else info.id
        yield from self.batches(task, wid)

    def _receive(self, wid: int) -> WorkerTask:
        want = self.generation.value
        while self._task is None or self._task[0] < want:
            try:
                self._task = self.inboxes[wid].get(timeout=TASK_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(
                    f"loader worker {wid}: no task for pass {want} after {TASK_TIMEOUT_S:.0f} s"
                ) from None
        return self._task[1]

    def batches(self, task: WorkerTask, wid: int = 0) -> Iterator[dict[str, Any]]:
        """The task's batches in order; an unexpected error names the worker, batch, samples and shards."""
        cfg, vpb = self.cfg, self.cfg.videos_per_batch
        order = task.plan.order[task.skip * vpb :]
        group, batch_no, counts = [], task.skip, {"streamed": 0, "cache_hits": 0}
        try:
            for key, sample, hit in self._samples(task.plan.inputs, order):
                group.append((key, sample))
                counts["cache_hits" if hit else "streamed"] += 1
                if len(group) == vpb:
                    index = task.plays + batch_no * task.workers
                    batch = collate_clips(group, self.spec, cfg, seed=cfg.seed, epoch=task.epoch,
                                          pad_id=str(index))  # fmt: skip
                    yield {**batch, "index": index, **counts, "pid": os.getpid()}
                    group, batch_no, counts = [], batch_no + 1, {"streamed": 0, "cache_hits": 0}
        except Exception as e:
            keys = order[(batch_no - task.skip) * vpb : (batch_no - task.skip + 1) * vpb]
            shard_of = dict((k, s) for s, k in task.plan.inputs)
            shards = sorted({self.urls[shard_of[k]] for k in keys if k in shard_of})
            raise RuntimeError(
                f"loader worker {wid} (epoch {task.epoch}, batch {task.plays + batch_no * task.workers}; "
                f"samples {keys} from {shards}): {type(e).__name__}: {e}"
            ) from e
        assert not group, "worker blocks hold whole batches"

    def _samples(self, inputs: list[tuple[int, str]], order: list[str]) -> Iterator[tuple[str, Any, bool]]:
        """``(key, sample, from_cache)`` in ``order``: from the decoded cache when there, else streamed from the
        shards (and, with the cache on, decoded whole and kept for the next epochs)."""
        cfg, cache = self.cfg, self.cache
        if cache is None:
            for key, sample in stream_in_order(self.urls, inputs, order, cfg=cfg.storage, expect=self.expect):
                yield key, sample, False
            return
        have = {k for k in order if k in cache}  # fixed now: a key repeated later still streams in order
        stream = stream_in_order(self.urls, [i for i in inputs if i[1] not in have],
                                 [k for k in order if k not in have], cfg=cfg.storage, expect=self.expect)  # fmt: skip
        for key in order:
            if key in have:
                yield key, cache[key], True
                continue
            got, sample = next(stream)
            if got != key:  # invariant of stream_in_order
                raise RuntimeError(f"loader cache: expected sample {key!r}, the shards gave {got!r}")
            if not isinstance(sample, Exception):  # a sample its shard did not deliver is not a verdict
                sample = decode_sample(key, sample, backend=cfg.decode_backend)
                cache.add(key, sample)
            yield key, sample, False


class DecodeWorkers:
    """Runs passes of a :class:`ClipStream`: in ``num_workers`` processes started on the first pass and kept
    until :meth:`close` (or garbage collection), or in this process when ``num_workers == 0``."""

    def __init__(self, stream: ClipStream, cfg: LoaderConfig, *, num_workers: int, pin_memory: bool) -> None:
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.prefetch_factor, self.mp_context = cfg.prefetch_factor, cfg.mp_context
        self.loader: DataLoader | None = None

    def _start(self) -> DataLoader:
        ctx: multiprocessing.context.BaseContext = torch.multiprocessing.get_context(self.mp_context)
        if self.mp_context == "forkserver":  # workers fork from a server that imported this module once
            ctx.set_forkserver_preload([__name__])
        self.stream.generation = ctx.RawValue("q", 0)
        self.stream.inboxes = [ctx.Queue() for _ in range(self.num_workers)]
        self.stream.environ = dict(os.environ)
        return DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, worker_init_fn=worker_init,
            pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor, persistent_workers=True,
            multiprocessing_context=ctx,
        )  # fmt: skip

    def run(self, tasks: list[WorkerTask]) -> Iterator[dict[str, Any]]:
        """Batches of one pass, in rank-batch order (``tasks[w]`` goes to worker process ``w``)."""
        if not self.num_workers:
            self.stream.local = tasks[0]
            yield from DataLoader(self.stream, batch_size=None, num_workers=0, pin_memory=self.pin_memory)
            return
        assert len(tasks) == self.num_workers, "one task per worker process"
        if self.loader is None:
            self.loader = self._start()
        # the generation first (workers read it when a pass starts), then start/resume the workers, then their
        # tasks: no queue feeder thread runs yet in this process when the first pass forks its workers
        self.stream.generation.value += 1
        batches = iter(self.loader)
        for inbox, task in zip(self.stream.inboxes, tasks, strict=True):
            inbox.put((self.stream.generation.value, task))
        yield from batches

    def close(self) -> None:
        """Stop the worker processes (joined) and their queues; the next pass would start new ones."""
        loader, self.loader = self.loader, None
        if loader is not None and loader._iterator is not None:
            loader._iterator._shutdown_workers()  # what its __del__ does, now rather than at collection
            loader._iterator = None
        for inbox in self.stream.inboxes:
            inbox.cancel_join_thread()
            inbox.close()
        self.stream.inboxes, self.stream.generation = [], None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the queues may already be gone
            pass
