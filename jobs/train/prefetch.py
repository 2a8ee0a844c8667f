"""The trainer's data stream: the loader's batches, endless across epochs, already on the training device when
a step takes them.

Why: a step that copies its clips from pageable host memory with a blocking copy stalls twice — the host waits
for the GPU queue to drain (PyTorch synchronises the stream after a blocking host-to-device copy) and the GPU
then waits for the copy. :class:`Prefetcher` pins each batch on the host (if the loader did not), copies the
``keys`` tensors non-blocking on a side CUDA stream while the previous step computes, and makes the compute
stream wait for that copy only when it hands the batch to a step.

It reads one batch ahead of the steps on every device (on CPU that is all it does: no thread, no copy), so the
loader's own cursor counts one batch more than the steps have trained on. The prefetcher is therefore what the
trainer checkpoints as its ``loader`` part: :meth:`Prefetcher.state_dict` is the loader's state as of the last
batch handed to a step, so a checkpoint saved after step ``k`` resumes at the first batch step ``k`` did not
take — and the CPU fault/resume tests exercise the same read-ahead bookkeeping a GPU run uses.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator
from typing import Any

import torch

# What the trainer moves to the device ahead of the step: the clips (nearly all of a batch's bytes). Masks,
# labels and valid flags stay on the host, pinned, where their readers want them without a device sync: the
# model sorts a host mask into token indices, finetuning checks labels and counts valid clips on the host; the
# tasks copy the few bytes they need on the device themselves, non-blocking.
DEVICE_KEYS = ("video",)


def epochs(loader: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """Endless (epoch, batch) stream. The loader yields the rest of its current epoch from its cursor and
    then moves itself to the next epoch, so a restored cursor is honoured."""
    while True:
        epoch = loader.epoch
        for batch in loader:
            yield epoch, batch


class Prefetcher:
    """Endless ``(epoch, batch)`` stream over ``loader`` (``pipeline.loader.loader.ClipLoader`` or anything with
    its ``epoch``/``cursor``/``stats``/``state_dict``/``load_state_dict``), one batch ahead of the steps.

    On CUDA, :meth:`next` hands over batch ``i`` (the compute stream waits for its copy; ``record_stream`` keeps
    the allocator from reusing its memory while the step still reads it), then reads batch ``i + 1`` from the
    loader (the host waits there for data: the trainer counts it as data wait) and issues its copy on the side
    stream, to overlap the step about to run. A handed-over batch holds device tensors for ``keys`` (default:
    every tensor) and pinned host tensors for the rest.

    Tests: on CPU they check the read-ahead bookkeeping (a step's checkpoint resumes at the next batch exactly,
    across an epoch boundary, and the fault/resume runs reproduce their losses); the copy is checked equal to the
    host batch by a ``gpu`` test. Whether the copy overlaps compute is not something a test here can see."""

    def __init__(self, loader: Any, device: torch.device, *, keys: Collection[str] | None = None) -> None:
        self.loader, self.device, self.keys = loader, torch.device(device), keys
        self.cuda = self.device.type == "cuda"
        self._side = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._stream: Iterator[tuple[int, dict[str, Any]]] | None = None
        self._ahead: tuple[int, dict[str, Any], tuple[int, int, dict[str, Any]]] | None = None
        self._handed: tuple[int, int, dict[str, Any]] | None = None  # loader (epoch, cursor, stats) after it

    # ---- the stream ----------------------------------------------------------------------------------------
    def next(self, *, ahead: bool = True) -> tuple[int, dict[str, Any]]:
        """The next batch for a step, then the read-ahead of the one after it (see :meth:`fill`); ``ahead=False``
        (the run's last batch) reads nothing beyond it."""
        batch = self.take()
        if ahead:
            self.fill()
        return batch

    def take(self) -> tuple[int, dict[str, Any]]:
        """The next batch for a step, without reading ahead: a trainer that queues the step's GPU work first and
        then calls :meth:`fill` overlaps its wait for the loader with that work, where :meth:`next` would wait
        for the loader before the step is queued."""
        if self._ahead is None:
            self._ahead = self._read()
        epoch, batch, mark = self._ahead
        self._ahead = None
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._side)
            for v in batch.values():
                if isinstance(v, torch.Tensor) and v.device.type == "cuda":
                    v.record_stream(current)
        self._handed = mark
        return epoch, batch

    def fill(self) -> None:
        """Read the next batch from the loader and start its copy to the device, unless one is read already."""
        if self._ahead is None:
            self._ahead = self._read()

    def close(self) -> None:
        """Stop reading: drop the read-ahead batch and stop the loader's decode workers (the loader's ``close``,
        where it has one), so a run in a long-lived process (a study's cells) leaves no worker behind."""
        if self._stream is not None:
            self._stream.close()
        self._stream, self._ahead = None, None
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()

    def _read(self) -> tuple[int, dict[str, Any], tuple[int, int, dict[str, Any]]]:
        """The loader's next batch (pinned and its ``keys`` copying to the device on CUDA) and the loader's
        (epoch, cursor, stats) right after it yielded that batch."""
        if self._stream is None:
            self._stream = epochs(self.loader)
        epoch, batch = next(self._stream)
        loader = self.loader
        mark = (loader.epoch, loader.cursor, copy.deepcopy(loader.stats))
        if self.cuda:
            batch = self._to_device(batch)
        return epoch, batch, mark

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        with torch.cuda.stream(self._side):
            for k, v in batch.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if v.device.type == "cpu" and not v.is_pinned():
                    v = v.pin_memory()  # a pageable source would make the copy synchronous
                if self.keys is None or k in self.keys:
                    v = v.to(self.device, non_blocking=True)
                out[k] = v
        return out

    # ---- the checkpointed "loader" part ----------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """The loader's counters over the batches handed to steps."""
        return self._handed[2] if self._handed is not None else self.loader.stats

    def state_dict(self) -> dict[str, Any]:
        """The loader's state as of the last batch handed to a step (the batch read ahead is not in it)."""
        state = self.loader.state_dict()
        if self._handed is None or self._ahead is None:
            return state
        epoch, cursor, stats = self._handed
        if epoch == state["epoch"]:
            state["cursor"] = cursor  # same epoch, same history: only the cursor moved
        else:  # the handed batch ended its epoch and the read-ahead started the next one: resume at its start
            assert (state["epoch"], state["cursor"]) == (epoch + 1, 1), (
                state["epoch"],
                state["cursor"],
                epoch,
            )
            state["cursor"] = 0
        state["stats"] = copy.deepcopy(stats)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loader (before the first :meth:`next`: nothing may have been read yet)."""
        assert self._stream is None, "load_state_dict after the stream started"
        self.loader.load_state_dict(state)
