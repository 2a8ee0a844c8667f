"""Decode on other nodes (``loader.decode: remote``): the rank's epoch plan played by Ray actors.

Why: one GPU node's own cores cannot feed its GPUs at the rates the model reaches (~136 ViT-B clips/s per
core for one H200 at 40 % MFU against ~74 a core decodes at R=4), so decoding must be able to move to
CPU-only nodes. The loader already has the exact plan (:mod:`pipeline.loader.plan`): which clips make batch
``i`` of rank ``r``, split into ``K = loader.num_workers`` planned workers whose batches interleave
round-robin. Here each planned worker is a Ray actor instead of a local process; it runs the same
:class:`pipeline.loader.stream.ClipStream` on the same :class:`pipeline.loader.plan.WorkerTask`, so the batches,
clips and masks are the ones the local loader makes for the same seed, and exactly-once, exact and elastic
resume (all decided by the plan and the cursor in :class:`pipeline.loader.loader.ClipLoader`) carry over.

Why actors over the plan and not Ray Data: a Ray Data pipeline (``map_batches`` over the plan's batches)
orders its output only with ``preserve_order``, cannot resume an iterator mid-epoch (ray-project/ray
#37633, #48224), and re-executes lost work through lineage it owns rather than the plan this loader owns.
An actor per planned worker needs neither: the rank consumes actor ``w``'s generator exactly where the
round-robin says, and a lost actor is replaced by a new one that plays the same task from the first batch
the rank has not received. ``benchmarks/remote_decode.py`` measures what this costs against the local loader.

Mechanics:

- Placement: each actor takes one unit of the custom resource ``loader.remote.resource`` (``decode``) and
  ``loader.remote.cpus`` CPUs, spread over the nodes that offer it (``SPREAD``); ``infra/`` gives the CPU-only
  decode groups that resource. Actors belong to the rank that made them: they die with it.
- Backpressure: an actor's batches come back through a Ray streaming generator that pauses after
  ``loader.remote.in_flight`` batches the rank has not taken (Ray's generator backpressure), so at most
  ``K x in_flight`` batches per rank wait in the decode nodes' object stores, and one at a time in the rank.
- Transfer: arrays travel as numpy (Ray's zero-copy path into the object store); the rank copies each
  into a torch tensor once (into pinned memory with ``pin_memory``), so nothing keeps an object-store
  buffer alive after the batch is handed over (:func:`to_torch` says what that costs).
- Node loss: a worker whose actor died or whose batch was lost with its node (``RayActorError``,
  ``ObjectLostError``) is replaced (at most ``loader.remote.max_replacements`` times per rank); the new actor
  plays the planned worker from its first batch not yet received (the batches are a pure function of
  ``(seed, epoch, key)``, so the replacement's are the lost ones). A decode error (``RayTaskError``: e.g. a
  bug) is not a node loss and stops the run with the worker's message, as locally.
- A pass abandoned half way (``break`` out of an epoch) leaves actors with paused generators: the next pass
  replaces them (their decoded caches are lost, the batches are not).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from pipeline import storage
from pipeline.loader import loader as local
from pipeline.loader.config import LoaderConfig
from pipeline.loader.masking import ClipSpec
from pipeline.loader.plan import WorkerTask
from pipeline.loader.stream import ClipStream

log = logging.getLogger(__name__)
LOST = (RayActorError, ObjectLostError)  # the worker's process or node is gone; anything else is the data's


class DecodeActor:
    """One planned worker of one rank, on a decode node: plays :class:`WorkerTask` passes of its stream."""

    def __init__(self, stream: ClipStream, credentials: dict[str, str], threads: int) -> None:
        storage.install_credentials(credentials)
        torch.set_num_threads(max(1, threads))
        self.stream = stream

    def ready(self) -> str:
        """The node this actor runs on (the rank waits for this before its first pass)."""
        return ray.get_runtime_context().get_node_id()

    def play(self, task: WorkerTask, wid: int) -> Iterator[dict[str, Any]]:
        for batch in self.stream.batches(task, wid):
            yield {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def to_torch(batch: dict[str, Any], *, pin: bool) -> tuple[dict[str, Any], int]:
    """A received batch with its arrays copied once into torch tensors (pinned with ``pin``, what the trainer's
    non-blocking host-to-device copy needs), and its array bytes. The copy is deliberate: Ray's arrays are
    read-only views of this node's object store that must not outlive the Ray connection (a batch held past
    ``ray.shutdown`` would point into unmapped memory); a zero-copy variant measured 0.9 instead of 3.2 ms of
    rank CPU per ViT-B clip on the 2-core dev box (``benchmarks/remote_decode.py``), and on a GPU node the
    copy into pinned memory is needed anyway, as a local loader's pin thread makes it."""
    out, nbytes = {}, 0
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            t = torch.empty(v.shape, dtype=torch.from_numpy(np.empty(0, v.dtype)).dtype, pin_memory=pin)
            t.numpy()[...] = v
            out[k], nbytes = t, nbytes + v.nbytes
        else:
            out[k] = v
    return out, nbytes


class RemoteDecodeWorkers:
    """Runs one rank's passes on ``cfg.num_workers`` decode actors (module docstring); the actors start on the
    first pass and serve the run. ``received`` counts batches, clips and array bytes taken from them,
    ``replaced`` the actors replaced after a loss; ``nodes`` is the node of each actor."""

    def __init__(self, stream: ClipStream, cfg: LoaderConfig, *, rank: int = 0) -> None:
        self.stream, self.cfg, self.rank = stream, cfg, rank
        self.actors: list[Any] = []
        self.nodes: list[str] = []
        self.received: Counter[str] = Counter()
        self.replaced = 0
        self._credentials: Any = None
        self._unfinished = False  # a pass was abandoned: its actors' generators are paused mid-task

    def _actor(self) -> Any:
        rc = self.cfg.remote
        cls = ray.remote(DecodeActor).options(
            num_cpus=rc.cpus, resources={rc.resource: 1}, scheduling_strategy="SPREAD", max_restarts=0
        )
        return cls.remote(self.stream, self._credentials, int(rc.cpus))

    def _wait(self, actors: list[Any], which: list[int]) -> list[str]:
        rc = self.cfg.remote
        try:
            return ray.get([a.ready.remote() for a in actors], timeout=rc.start_timeout_s)
        except GetTimeoutError:
            have = ray.cluster_resources().get(rc.resource, 0)
            raise RuntimeError(
                f"loader.decode=remote: rank {self.rank}'s decode worker(s) {which} did not start within "
                f"{rc.start_timeout_s:.0f} s: no node had a free unit of the Ray resource {rc.resource!r} "
                f"(the cluster has {have:g}) with {rc.cpus:g} CPU; add decode nodes or lower loader.num_workers"
            ) from None

    def _start(self) -> None:
        if not ray.is_initialized():
            raise RuntimeError(
                "loader.decode=remote needs Ray: run through vmae pretrain or finetune (Ray Train), "
                "or connect to a cluster first"
            )
        if self._credentials is None:  # a Ray object: never in an actor's arguments as text or in a log
            self._credentials = ray.put(storage.credentials_from_env())
        self.actors = [self._actor() for _ in range(self.cfg.num_workers)]
        self.nodes = self._wait(self.actors, list(range(len(self.actors))))

    def _play(self, w: int, task: WorkerTask) -> Any:
        method = self.actors[w].play.options(
            num_returns="streaming", _generator_backpressure_num_objects=self.cfg.remote.in_flight
        )
        return method.remote(task, w)

    def _replace(self, w: int, task: WorkerTask, got: int, error: Exception) -> Any:
        self.replaced += 1
        rc = self.cfg.remote
        if self.replaced > rc.max_replacements:
            raise RuntimeError(
                f"loader.decode=remote: rank {self.rank} lost {self.replaced} decode workers "
                f"(loader.remote.max_replacements={rc.max_replacements}); the last: {error}"
            ) from error
        log.warning("rank %d: decode worker %d on node %s lost at its batch %d (%s); replacing it",
                    self.rank, w, self.nodes[w][:12], task.skip + got, type(error).__name__)  # fmt: skip
        try:
            ray.kill(self.actors[w], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
        self.actors[w] = self._actor()
        self.nodes[w] = self._wait([self.actors[w]], [w])[0]
        return self._play(w, dataclasses.replace(task, skip=task.skip + got))

    def run(self, tasks: list[WorkerTask]) -> Iterator[dict[str, Any]]:
        """Batches of one pass in rank-batch order: actor ``w`` plays ``tasks[w]``; batch ``i`` of the pass
        comes from actor ``i % K`` (the order the tasks were cut for, as with local worker processes)."""
        assert len(tasks) == self.cfg.num_workers, "one task per decode actor"
        if self._unfinished:
            self.close()
        if not self.actors:
            self._start()
        vpb = self.cfg.videos_per_batch
        total = sum(len(t.plan.order) // vpb - t.skip for t in tasks)
        gens = [self._play(w, t) for w, t in enumerate(tasks)]
        got = [0] * len(tasks)
        self._unfinished = True
        try:
            for i in range(total):
                w = i % len(tasks)
                while True:
                    try:
                        batch = ray.get(next(gens[w]))
                        break
                    except StopIteration:
                        raise RuntimeError(f"decode worker {w} ended after {got[w]} of its batches") from None
                    except LOST as e:
                        gens[w] = None  # its outputs' refs go before its actor is killed
                        gens[w] = self._replace(w, tasks[w], got[w], e)
                got[w] += 1
                batch, nbytes = to_torch(batch, pin=bool(self.cfg.pin_memory))
                self.received.update(batches=1, clips=len(batch["key"]), bytes=nbytes)
                yield batch
        finally:
            # A pass that ends early (an error, a break) drops its generators now, before close() or the next
            # pass kills their actors, not whenever a traceback holding them is freed: killing an actor whose
            # generator outputs are still referenced makes Ray try to recover them, and in one test run that
            # crashed the raylet (Ray 2.60: SIGABRT in HandleIsLocalWorkerDead).
            gens.clear()
        self._unfinished = False

    def close(self) -> None:
        """Stop the actors (a later pass starts new ones)."""
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors, self.nodes, self._unfinished = [], [], False


def resolve_remote_workers(value: int | str, *, world_size: int, resource: str) -> int:
    """Decode actors per rank: ``value``, or for ``"auto"`` the cluster's units of ``resource`` shared by the
    ``world_size`` ranks (read when the run starts or resumes; an autoscaler adds nodes only for actors
    asked for, so give a number where the decode nodes start at zero)."""
    if value != "auto":
        return int(value)
    units = int(ray.cluster_resources().get(resource, 0))
    if units < world_size:
        raise ValueError(
            f"loader.num_workers=auto with loader.decode=remote: the cluster has {units} unit(s) of the Ray "
            f"resource {resource!r} for {world_size} rank(s); set loader.num_workers to the actors per rank"
        )
    return units // world_size


def make_loader(cfg: LoaderConfig, spec: ClipSpec, *, rank: int = 0, world_size: int = 1) -> local.ClipLoader:
    """The rank's loader: :func:`pipeline.loader.loader.make_loader` with local decode processes, or with
    ``loader.decode: remote`` the same loader whose plan these Ray actors play."""
    if cfg.decode != "remote":
        return local.make_loader(cfg, spec, rank=rank, world_size=world_size)
    n = resolve_remote_workers(cfg.num_workers, world_size=world_size, resource=cfg.remote.resource)

    def workers(stream: ClipStream, resolved: LoaderConfig) -> RemoteDecodeWorkers:
        return RemoteDecodeWorkers(stream, resolved, rank=rank)

    return local.make_loader(
        dataclasses.replace(cfg, num_workers=n), spec, rank=rank, world_size=world_size, workers=workers
    )
