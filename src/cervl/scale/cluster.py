"""Connecting to Ray and sizing the actor pool (see :mod:`cervl.scale`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from cervl.core.errors import InvalidInput, MissingResource

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'cervl[ray]'  (or: pip install 'ray[data]>=2.40')"


def require_ray():
    """Import Ray Data, or fail with the command that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise MissingResource(f"--engine ray needs Ray Data, which is not installed: {INSTALL_HINT}") from e
    return ray


@dataclass
class RayOptions:
    """How the work is spread over a Ray cluster.

    ``address``: an existing cluster (``ray://...`` or ``HOST:PORT``); None uses ``RAY_ADDRESS`` or
    starts a local cluster. ``actors``: a fixed pool size; ``min_actors``/``max_actors``: an
    autoscaling pool instead. ``gpus_per_actor``: 1 on a GPU cluster, 0 on CPU.
    ``cpus_per_actor``/``cpus_per_task``: logical CPUs reserved per scoring actor and per
    decode/align task (None: automatic, see :meth:`resolve`). ``shard_size``: items per shard (the
    unit of retry, resume and output files; rounded up to a multiple of the batch size and 8).
    ``ship_run``: send the run's final weights through the object store instead of having each
    actor read the run folder (for small models when the folder is not on a shared file system).
    """

    address: str | None = None
    actors: int | None = None
    min_actors: int | None = None
    max_actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None
    cpus_per_task: float = 0.5
    shard_size: int = 64
    ship_run: bool = False

    def pool_size(self) -> tuple[int, int]:
        """(min, max) actors: a fixed ``actors``, or the autoscaling bounds (default 1..2)."""
        if self.actors is not None and (self.min_actors is not None or self.max_actors is not None):
            raise InvalidInput("give either --actors N or --min-actors/--max-actors, not both")
        if self.actors is not None:
            lo = hi = self.actors
        else:
            lo, hi = self.min_actors or 1, self.max_actors or max(self.min_actors or 1, 2)
        if lo < 1 or hi < lo:
            raise InvalidInput(f"actor pool must have 1 <= min <= max actors, got {lo}..{hi}")
        return lo, hi

    def resolve(self, total_cpus: float) -> float:
        """CPUs per actor. Checked against the cluster: a pool that takes every CPU would leave none
        for the decode tasks that feed it, and the pipeline would wait forever."""
        lo, hi = self.pool_size()
        if self.cpus_per_task <= 0:
            raise InvalidInput(f"--cpus-per-task must be > 0, got {self.cpus_per_task}")
        cpus = self.cpus_per_actor
        if cpus is None:
            # GPU actors need one core to feed their GPU; CPU actors share what the decode tasks leave
            cpus = 1.0 if self.gpus_per_actor else max(0.25, (total_cpus - self.cpus_per_task) / hi)
            cpus = min(cpus, 1.0) if self.gpus_per_actor else cpus
        if lo * cpus + self.cpus_per_task > total_cpus + 1e-9:
            raise InvalidInput(f"the actor pool ({lo} actors x {cpus:g} CPUs) plus one decode task "
                               f"({self.cpus_per_task:g} CPUs) needs more than the cluster's {total_cpus:g} CPUs: "
                               f"lower --actors or --cpus-per-actor")
        return cpus


def connect(options: RayOptions):
    """Connect to ``options.address`` or ``RAY_ADDRESS``; with neither, start a local cluster.

    In a process where Ray is already initialised (a notebook, the test suite) that cluster is used.
    Returns the ``ray`` module.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
    else:
        log.info("starting a local Ray cluster (set RAY_ADDRESS or --ray-address to use an existing one)")
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray


def actor_threads(cpus: float) -> int:
    """Torch threads for an actor that reserved ``cpus`` logical CPUs (at least one)."""
    return max(1, int(cpus))
