"""The one home of ``ray.init`` and of the bounded task map every Ray job of vmae uses.

Why one place: each job used to start Ray its own way (which address, a dashboard or not, logs to the driver or
not, how many CPUs); here the choices are parameters with one meaning, so ``grep "ray.init("`` finds one line.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import ray
from tqdm import tqdm


@dataclasses.dataclass(frozen=True, kw_only=True)
class RayConfig:
    """How a data job (shard, curate, embed) runs its Ray tasks."""

    num_cpus: int | None = None  # local cluster size (None: all cores); ignored with --address
    max_in_flight: int = 0  # tasks submitted but not finished; 0: 2 x cluster CPUs
    task_cpus: float = 1.0
    task_timeout_s: float = 600.0  # a video's probe + transcode (from submission) past this is a reject
    max_transient_failures: int = 10  # stop early after this many inputs failed to read (store down?)

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"ray.num_cpus must be >= 1 or null, got {self.num_cpus}")
        if self.max_in_flight < 0 or self.task_cpus <= 0:
            raise ValueError(f"ray.max_in_flight must be >= 0 and ray.task_cpus > 0, got {self}")
        if not self.task_timeout_s > 0 or self.max_transient_failures < 1:
            raise ValueError("ray.task_timeout_s must be > 0 and ray.max_transient_failures >= 1")


def init_ray(
    address: str | None = None,
    *,
    new_local: bool = False,
    num_cpus: int | None = None,
    include_dashboard: bool | None = None,
    log_to_driver: bool = True,
) -> bool:
    """Start or join Ray unless this process is connected already; True when this call connected (so the
    caller shuts Ray down when it is done).

    Where: ``address`` when given. Else with ``new_local``: ``$RAY_ADDRESS`` (set for a driver running as a
    Ray job), else a new local cluster of ``num_cpus`` CPUs (``address="local"``: never silently join some
    other cluster on this machine). Else Ray's own default (``$RAY_ADDRESS``, a cluster running on this
    machine, else a new one). ``num_cpus`` sizes a new local cluster only; joining, it is ignored.
    ``include_dashboard`` None is Ray's default. No credentials in a ``runtime_env`` (Ray keeps it in job
    metadata and logs): tasks get them as arguments or Ray objects."""
    if ray.is_initialized():
        return False
    if new_local:
        address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = {"num_cpus": num_cpus} if address == "local" else {}
    ray.init(address=address, include_dashboard=include_dashboard, log_to_driver=log_to_driver, **local)
    return True


def default_in_flight(cfg: RayConfig) -> int:
    """``cfg.max_in_flight``, else 2 tasks per CPU of the cluster (at least 2)."""
    return cfg.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def bounded_map(
    fn: Any,
    args: Iterable[tuple],
    cap: int,
    bar: tqdm,
    on_done: Callable[[tuple, Any], None],
    *,
    timeout_s: float | None = None,
) -> None:
    """Run ``fn.remote(*a)`` (``fn`` a Ray remote function) over ``args`` with at most ``cap`` tasks in
    flight, so memory stays flat however many inputs there are; ``on_done(a, result_or_exc)`` as each ends.
    A task not finished ``timeout_s`` seconds after its submission is cancelled and reported as a
    ``TimeoutError``. ``on_done`` may raise to stop the map: the tasks still in flight are cancelled."""
    pending: dict[Any, tuple[tuple, float]] = {}
    it = iter(args)
    try:
        while True:
            while len(pending) < cap and (a := next(it, None)) is not None:
                pending[fn.remote(*a)] = (a, time.monotonic())
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0 if timeout_s else None)
            for ref in done:
                a, _ = pending.pop(ref)
                try:
                    result: Any = ray.get(ref)
                except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as e:
                    result = e
                on_done(a, result)
                bar.update()
            if timeout_s:
                now = time.monotonic()
                for ref in [r for r, (_, t) in pending.items() if now - t > timeout_s]:
                    a, _ = pending.pop(ref)
                    ray.cancel(ref, force=True)
                    on_done(a, TimeoutError(f"took longer than ray.task_timeout_s={timeout_s:g} s"))
                    bar.update()
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
