"""How independent training runs of one step are executed: one after another in this process (``serial``), or
as parallel tasks on a Ray cluster (``ray``: the pre-deployment grid's candidates of a round, one task each).

A task gets its inputs through Ray's object store (numpy arrays and state dicts: no shared path needed) and
returns its result the same way. Numerics: each run sets torch's intra-op threads to ``threads`` (default: a
Ray task's CPUs; serial: torch's own default), and the same seeds; a serial run with the same ``--threads``
computes the same numbers, so both pick the same candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from edge_agent.options import flag, nonnegative_float, positive, positive_float

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where the independent runs of a step go (``predeploy``'s candidates of a round)."""

    executor: str = flag(
        "serial", "serial: one candidate after another here; ray: parallel Ray tasks", choices=("serial", "ray")
    )
    ray_address: str = flag(
        "local",
        "--executor ray: the cluster (local: start one in this process; auto: 'ray start' one; ray://HOST:PORT)",
    )
    task_cpus: float = flag(1.0, "--executor ray: CPUs per task", type=positive_float)
    task_gpus: float = flag(0.0, "--executor ray: GPUs per task", type=nonnegative_float)
    threads: int | None = flag(
        None, "torch threads per run (default: serial torch's own, ray the task's CPUs)", type=positive
    )


def _with_threads(threads: int | None, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return fn(*args)


class Executor:
    """``map(fn, [args, ...])`` -> results in the same order."""

    def __init__(self, cfg: ExecutorConfig) -> None:
        self.cfg = cfg
        self._ray: Any = None
        self._remote: Any = None
        self._owned = False
        if cfg.executor == "ray":
            try:
                import ray
            except ImportError:
                raise ValueError("--executor ray needs Ray: pip install 'nnoculation-edge[ray]'") from None
            if not ray.is_initialized():
                try:
                    if cfg.ray_address == "local":
                        ray.init(include_dashboard=False, log_to_driver=False)
                        self._owned = True
                    else:
                        ray.init(address=cfg.ray_address, log_to_driver=False)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise ValueError(f"cannot reach the Ray cluster at {cfg.ray_address!r}: {e}") from None
            self._ray = ray
            self._remote = ray.remote(_with_threads)
            log.info("runs go to Ray as tasks of %g CPUs / %g GPUs: %s", cfg.task_cpus, cfg.task_gpus,
                     ray.cluster_resources())  # fmt: skip

    def map(self, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]]) -> list[T]:
        """``fn(*args)`` for each ``args``; parallel on Ray, in order here."""
        if self._ray is None:
            return [_with_threads(self.cfg.threads, fn, args) for args in calls]
        threads = self.cfg.threads or max(1, int(self.cfg.task_cpus))
        options = {"num_cpus": self.cfg.task_cpus, "num_gpus": self.cfg.task_gpus, "max_retries": 0}
        refs = [self._remote.options(**options).remote(threads, fn, args) for args in calls]
        return list(self._ray.get(refs))

    def close(self) -> None:
        """Stop the Ray cluster this executor started."""
        if self._owned and self._ray is not None:
            self._ray.shutdown()
