"""The training loader's settings (:class:`LoaderConfig`) and how its machine-dependent values resolve.

Why a module of its own: the clip cutter (:mod:`pipeline.loader.clips`), the planner (:mod:`pipeline.loader.plan`)
and the decode workers (:mod:`pipeline.loader.stream`) all read these settings, and :mod:`pipeline.loader.loader`
wires them together; with the config at the bottom every import goes one way.

Two settings may be ``auto`` because their right value is the machine's, not the recipe's:

- ``num_workers: auto`` -> the CPUs this process may run on (``os.sched_getaffinity``), shared by the training
  processes of this node (``LOCAL_WORLD_SIZE``, which torchrun and Ray Train set; 1 if unset), minus one per
  training process for itself (its step loop, the host-to-device copy). 0 leaves decoding in the training
  process. The worker count is part of the epoch plan, so a resume on a node with another CPU count re-splits
  the rest of the epoch elastically (still each sample once) instead of continuing bit-identically.
- ``pin_memory: auto`` -> pinned batches when this process sees a CUDA device (a pinned host batch is what
  lets the trainer's ``.to(device, non_blocking=True)`` overlap the copy with compute); ``true``/``false`` force it.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from pipeline.checks import positive_int
from pipeline.loader.decode import BACKENDS
from pipeline.loader.transforms import SAMPLING_RATE, VIDEOMAE_SCALES
from pipeline.storage import StorageConfig

REMAINDER = ("drop", "pad")
VERIFY = ("size", "sha256", "none")
MP_CONTEXTS = (None, "fork", "spawn", "forkserver")
DECODE = ("local", "remote")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RemoteDecodeConfig:
    """How decode workers run with ``loader.decode: remote``: as Ray actors (``jobs.train.remote_decode``) on
    the nodes that offer ``resource`` (CPU-only decode nodes, and GPU nodes whose spare cores also decode),
    each playing a worker of the rank's epoch plan exactly as a local worker process would."""

    resource: str = "decode"  # a Ray custom resource; each decode actor takes one unit of it
    cpus: float = 1.0  # CPUs each decode actor reserves (one decoding thread)
    in_flight: int = 2  # batches an actor may have made ahead of the rank (Ray's generator backpressure)
    start_timeout_s: float = 300.0  # an actor not placed and started by then: an error naming the resource
    max_replacements: int = 16  # decode actors lost (node or process died) and replaced per rank in a run

    def __post_init__(self) -> None:
        if not isinstance(self.resource, str) or not self.resource:
            raise ValueError(f"loader.remote.resource must name a Ray resource, got {self.resource!r}")
        if not isinstance(self.cpus, int | float) or self.cpus < 0:
            raise ValueError(f"loader.remote.cpus must be a number >= 0, got {self.cpus!r}")
        positive_int("loader.remote.in_flight", self.in_flight, low=1)
        positive_int("loader.remote.max_replacements", self.max_replacements, low=0)
        if not isinstance(self.start_timeout_s, int | float) or not self.start_timeout_s > 0:
            raise ValueError(f"loader.remote.start_timeout_s must be > 0, got {self.start_timeout_s!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """Data and augmentation settings (what a clip *is* — frames, size, tubelets, mask — is the model's, passed
    to :func:`pipeline.loader.loader.make_loader` as a :class:`pipeline.loader.masking.ClipSpec`). ``batch_size``
    counts clips per rank per step (the model's ``B``); each batch holds ``batch_size // num_sample`` videos.
    ``shuffle_buffer`` counts videos (0 or 1: no shuffling)."""

    manifest: str = ""
    subset: str | None = None
    sampling_rate: int = SAMPLING_RATE  # frame stride: 4 for Kinetics-like data, 2 for SSv2-like
    num_sample: int = 1  # clips cut from one decode (repeated augmentation)
    batch_size: int = 8
    num_workers: int | str = (
        2  # decode processes per rank, kept for the whole run; "auto": from the node's CPUs
    )
    prefetch_factor: int = 2
    pin_memory: bool | str = (
        "auto"  # pinned batches for a fast host-to-device copy; auto: when CUDA is visible
    )
    # How decode workers start: null = the platform's default (fork on Linux: instant, and the workers share
    # the parent's imports); "forkserver"/"spawn" start them from a clean process instead (for a training
    # process whose threads are not fork-safe; each worker then imports the loader once, as workers live for
    # the run). A fresh-clone suite run with "forkserver" as the default ended in a segfault at interpreter exit,
    # so the default stays the one the suite has always run with.
    mp_context: str | None = None  # "fork", "spawn", "forkserver" or null (the platform's default)
    shuffle_buffer: int = 256
    seed: int = 0
    flip: bool = True  # False for direction-sensitive data (SSv2)
    scales: tuple[float, ...] = VIDEOMAE_SCALES
    min_frames: int = 1
    remainder: str = "drop"  # one of REMAINDER
    verify: str = "size"  # check each shard against the manifest before reading: "size", "sha256" or "none"
    cache: bool = False  # keep every decoded video in memory after its first decode (small sets)
    cache_max_mb: int = (
        4096  # per decoding process (each worker keeps its own cache); past it: decoded each epoch
    )
    decode_backend: str = (
        "auto"  # pipeline.loader.decode.BACKENDS; auto: the fastest usable one (pyav on CPU)
    )
    # Where the decode workers run: "local" = processes of the training process's node (num_workers per rank,
    # "auto" from its CPUs); "remote" = Ray actors on nodes with the `remote.resource` (num_workers per rank,
    # "auto" from the cluster's units of that resource). Same plan, same batches either way.
    decode: str = "local"  # one of DECODE
    remote: RemoteDecodeConfig = dataclasses.field(default_factory=RemoteDecodeConfig)
    # RandAugment of the official finetuning loader (its `--aa`, e.g. "rand-m7-n4-mstd0.5-inc1"), timm's
    # implementation: one draw per clip, the same ops on all its frames, before the crop
    # (pipeline.loader.rand_augment); null = none (pretraining, and every clip bit-identical to before)
    rand_augment: str | None = None
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if not self.manifest:
            raise ValueError("manifest must name a shard set's manifest.json (or its folder)")
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
            ("prefetch_factor", 1),
            ("shuffle_buffer", 0),
        ):
            positive_int(f"loader.{name}", getattr(self, name), low=low)
        if self.num_workers != "auto":
            positive_int("loader.num_workers (or auto)", self.num_workers, low=0)
        if self.pin_memory not in (True, False, "auto"):
            raise ValueError(f"loader.pin_memory must be true, false or auto, got {self.pin_memory!r}")
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
        if self.decode not in DECODE:
            raise ValueError(f"loader.decode must be one of {DECODE}, got {self.decode!r}")
        if self.decode == "remote" and self.num_workers == 0:
            raise ValueError("loader.decode=remote needs num_workers >= 1 (decode actors per rank) or auto")
        if self.mp_context not in MP_CONTEXTS:
            raise ValueError(
                f"loader.mp_context must be fork, spawn, forkserver or null, got {self.mp_context!r}"
            )
        if self.rand_augment is not None:
            from pipeline.loader.rand_augment import rand_augment

            rand_augment(self.rand_augment, 224)  # raises ValueError unless timm parses it

    @property
    def videos_per_batch(self) -> int:
        return self.batch_size // self.num_sample


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def resolve_num_workers(value: int | str, *, cpus: int | None = None, local_ranks: int | None = None) -> int:
    """``value`` itself, or for ``"auto"``: ``cpus // local_ranks - 1`` (at least 0), with ``cpus`` from
    :func:`available_cpus` and ``local_ranks`` from ``LOCAL_WORLD_SIZE`` (module docstring)."""
    if value != "auto":
        return int(value)
    cpus = available_cpus() if cpus is None else cpus
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(0, cpus // max(1, local_ranks) - 1)


def resolve_pin_memory(value: bool | str) -> bool:
    """``value`` itself, or for ``"auto"``: whether this process sees a CUDA device."""
    return torch.cuda.is_available() if value == "auto" else bool(value)
