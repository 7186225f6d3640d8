"""Where a stage's units of work run: in this process (`local`, the default) or on Ray actors (`ray`).

A stage cuts its work into units that are seeded by their own names (generate: one teacher's batch of prompts;
score: one metric's chunk of rows), so where and in which order a unit runs changes no byte of its result. The
stage hands the executor one `Group` at a time (the units of one teacher or one metric, and how to set up a
worker for them); the executor calls `on_result(position, result)` on this process as each unit finishes, and
the stage, the only writer, writes that unit's shard atomically. Resume therefore works as it always has: a unit
is done iff its shard exists, whichever engine ran it.

- `local`: one worker in this process; units in plan order (the loop every stage has always had).
- `ray`: `workers` actors, each setting its worker up once per group (a teacher loaded, a scorer built) and
  keeping it; one unit in flight per actor. A unit whose actor dies (killed, out of memory, its node lost) goes
  to a new actor, `max_retries` times at most, then a one-line error; a unit that raises re-raises here.
  `ray.init(address=...)` joins a running cluster when `address` (or RAY_ADDRESS) is given; otherwise a local
  cluster with `workers` CPUs is started and shut down at the end. A Ray session started by the caller is used
  as it is and left running.

The engine is operational: it never changes what a run produces, so it is left out of the run's fingerprint
(`config.OPERATIONAL_FIELDS`) and a run started on one engine resumes on the other.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from datasteer.config import StrictModel
from datasteer.errors import ConfigError, DatasteerError, optional_import

log = logging.getLogger("datasteer.engines")

ENGINES = ("local", "ray")
RAY_INSTALL = "pip install 'datasteer[ray]'"
# passed to Ray workers when set here, so that workers are as offline as the driver
WORKER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")


class EngineConfig(StrictModel):
    """Where units of work run (operational: left out of a run's fingerprint, so a run may resume on another)."""

    kind: Literal["local", "ray"] = Field("local", description="local: this process; ray: Ray actors (a local "
                                          "cluster, or the cluster at address)")
    workers: int | None = Field(None, ge=1, description="ray: actors per group of units (default: as many as "
                                "the cluster has CPUs, or GPUs for GPU teachers)")
    address: str | None = Field(None, description="ray: the cluster to join (ray://host:10001, auto, host:6379; "
                                "default RAY_ADDRESS, else a local cluster started for the run)")
    max_retries: int = Field(2, ge=0, description="ray: times a unit is retried on a new actor when its actor "
                             "dies")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data  # `engine: ray`

    @model_validator(mode="after")
    def _no_idle_settings(self) -> EngineConfig:
        given = sorted(self.model_fields_set & {"workers", "address", "max_retries"})
        if self.kind == "local" and given:  # an option that would have no effect is refused, not ignored
            raise ValueError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to the ray engine only; "
                             "add --engine ray (engine.kind: ray)")
        return self


class Worker(Protocol):
    """What a group's setup returns, once per worker: runs units and frees what it holds at the end."""

    def run(self, unit: Any) -> Any: ...

    def close(self) -> None: ...


@dataclass
class Group:
    """Units that share a worker (one teacher's batches, one metric's chunks), in plan order.

    `setup()` builds the worker (loads the model); on Ray it is pickled to the actors, so it should pickle small
    (a teacher not yet loaded, a scorer's spec). `names` name the units in messages; `num_gpus` is what each
    actor needs (None: one GPU if the cluster has any, else none)."""

    key: str
    label: str
    setup: Callable[[], Worker]
    units: Sequence[Any]
    names: Sequence[str]
    num_cpus: float = 1
    num_gpus: float | None = 0


class Executor(Protocol):
    def run(self, group: Group, on_result: Callable[[int, Any], None]) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """One worker in this process, units in plan order."""

    def run(self, group: Group, on_result: Callable[[int, Any], None]) -> None:
        if not group.units:
            return
        worker = group.setup()
        try:
            for position, unit in enumerate(group.units):
                on_result(position, worker.run(unit))
        finally:
            worker.close()  # free one group's memory before the next loads

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class UnitWorker:
    """The Ray actor (`ray::UnitWorker` in process lists): holds one group's worker, set up on its first unit."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._worker: Worker | None = None

    def run(self, key: str, setup: list[Any], unit: Any) -> Any:
        if key != self._key:
            self.close()
            import ray

            self._worker = ray.get(setup[0])()  # a ref in a list: fetched once per group, not once per unit
            self._key = key
        assert self._worker is not None
        return self._worker.run(unit)

    def close(self) -> None:
        if self._worker is not None:
            worker, self._worker, self._key = self._worker, None, None
            worker.close()

    def pid(self) -> int:
        return os.getpid()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)[:300]


class RayExecutor:
    """Units on Ray actors, results back here as they finish (see the module's docstring)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.ray = optional_import("ray", "the ray engine", RAY_INSTALL)
        self._started = False
        self._owned = False  # this executor started the cluster: it shuts it down
        self._actor_class: Any = None
        self._pool: list[Any] = []
        self._pool_shape: tuple[float, float] | None = None
        self.retried = 0  # units retried after their actor died (all groups)

    # -- the cluster
    def _env(self) -> dict[str, str]:
        return {name: os.environ[name] for name in WORKER_ENV if name in os.environ}

    def _start(self) -> None:
        if self._started:
            return
        ray = self.ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats notice (and no report home)
        quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        address = self.config.address or os.environ.get("RAY_ADDRESS") or None
        if ray.is_initialized():
            pass  # the caller's session: used as it is, left running
        elif address:
            try:
                ray.init(address=address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ConfigError(f"cannot join the Ray cluster at {address}: {_first_line(err)}; check that it "
                                  "runs (`ray status`) and --ray-address / RAY_ADDRESS; a cluster with token "
                                  "authentication (Ray's default) also needs RAY_AUTH_MODE=token and its token "
                                  "here (`ray get-auth-token`)") from None
        else:
            try:
                ray.init(num_cpus=self.config.workers or os.cpu_count() or 1, include_dashboard=False, **quiet)
            except (OSError, RuntimeError, ValueError) as err:
                raise ConfigError(f"cannot start a local Ray cluster: {_first_line(err)}") from None
            self._owned = True
        self._started = True
        self._actor_class = ray.remote(UnitWorker)

    def _resources(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.ray.cluster_resources().items()}

    def _shape(self, group: Group) -> tuple[float, float]:
        gpus = group.num_gpus
        if gpus is None:
            gpus = 1.0 if self._resources().get("GPU", 0) >= 1 else 0.0
        have = self._resources()
        if gpus > have.get("GPU", 0):
            raise ConfigError(f"{group.label} needs {gpus:g} GPU(s) per worker and the Ray cluster has "
                              f"{have.get('GPU', 0):g}; lower tensor_parallel_size or add GPUs")
        if group.num_cpus > have.get("CPU", 0):
            raise ConfigError(f"{group.label} needs {group.num_cpus:g} CPU(s) per worker and the Ray cluster has "
                              f"{have.get('CPU', 0):g}")
        return float(group.num_cpus), float(gpus)

    def _size(self, group: Group, shape: tuple[float, float]) -> int:
        if self.config.workers:
            wanted = self.config.workers
        else:
            have = self._resources()
            cpus, gpus = shape
            wanted = int(have.get("GPU", 0) // gpus) if gpus else int(have.get("CPU", 1) // max(cpus, 1e-9))
        return max(1, min(wanted, len(group.units)))

    def _new_actor(self, shape: tuple[float, float]) -> Any:
        cpus, gpus = shape
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": 0, "max_task_retries": 0}
        env = self._env()
        if env:
            options["runtime_env"] = {"env_vars": env}
        return self._actor_class.options(**options).remote()

    def _kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _actors(self, group: Group) -> list[Any]:
        shape = self._shape(group)
        if shape != self._pool_shape:  # another kind of worker (GPUs per actor): a new pool
            for actor in self._pool:
                self._kill(actor)
            self._pool, self._pool_shape = [], shape
        size = self._size(group, shape)
        while len(self._pool) < size:
            self._pool.append(self._new_actor(shape))
        return self._pool[:size]

    # -- the work
    def run(self, group: Group, on_result: Callable[[int, Any], None]) -> None:
        if not group.units:
            return
        self._start()
        ray = self.ray
        idle = list(self._actors(group))
        setup = [ray.put(group.setup)]
        queue = deque(range(len(group.units)))
        deaths: dict[int, int] = {}
        running: dict[Any, tuple[Any, int]] = {}
        while queue or running:
            while queue and idle:
                actor, position = idle.pop(0), queue.popleft()
                running[actor.run.remote(group.key, setup, group.units[position])] = (actor, position)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                actor, position = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # the unit raised: the same error as in one process
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, BaseException):
                        raise cause from None
                    raise DatasteerError(f"unit {group.names[position]} of {group.label} failed on a Ray worker: "
                                         f"{_first_line(err)}") from None
                except ray.exceptions.RayError as err:  # the actor died (killed, out of memory, node lost)
                    deaths[position] = deaths.get(position, 0) + 1
                    if deaths[position] > self.config.max_retries:
                        raise DatasteerError(
                            f"unit {group.names[position]} of {group.label}: its Ray worker died "
                            f"{deaths[position]} times ({_first_line(err)}); finished units are saved, rerun the "
                            "same command to resume (engine.max_retries sets how often a unit is retried)") from None
                    self._replace(actor, idle, group)
                    self.retried += 1
                    log.warning(f"a Ray worker died running unit {group.names[position]} of {group.label} "
                                f"({type(err).__name__}); retrying it on a new worker "
                                f"({deaths[position]}/{self.config.max_retries})")
                    queue.appendleft(position)
                    continue
                idle.append(actor)
                on_result(position, result)

    def _replace(self, dead: Any, idle: list[Any], group: Group) -> None:
        self._kill(dead)
        fresh = self._new_actor(self._pool_shape or self._shape(group))
        self._pool = [fresh if a is dead else a for a in self._pool]
        idle.append(fresh)

    def close(self) -> None:
        if not self._started:
            return
        for actor in self._pool:
            self._kill(actor)
        self._pool = []
        if self._owned:
            self.ray.shutdown()
        self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_executor(config: EngineConfig | None) -> LocalExecutor | RayExecutor:
    """The executor for `config` (a context manager). The ray engine imports ray here, so that a missing extra is
    a one-line error before any model loads; its cluster starts with the first group that has work."""
    if config is None or config.kind == "local":
        return LocalExecutor()
    return RayExecutor(config)
