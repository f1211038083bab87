"""A pool of model actors on Ray, and the one loop that hands them work.

Each actor loads its Upscaler once (one actor per GPU, or one per few CPU cores) and takes one call
at a time, as ray.util.ActorPool does: an actor that dies then takes only its own call with it.
Ray restarts a dead actor (up to MAX_RESTARTS times) and retries the call it was running (up to
MAX_TASK_RETRIES times); a call that still fails comes back as a failure of its item, and an actor
past its restarts leaves the pool. Errors a user can act on (LmfError) come back as they are, so
a file is reported exactly as a local run reports it. Every actor must render alike (model, precision,
options, device type): one that would not stops the run, so a video never mixes two renderings.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lmf_cli.cluster.connect import ClusterError, Connection, connect, import_ray
from lmf_cli.errors import LmfError, option_name

MAX_RESTARTS = 8  # per actor: a file that kills its worker costs MAX_TASK_RETRIES + 1 of them
MAX_TASK_RETRIES = 2  # per call: an item is tried at most three times
CPU_THREADS = 4  # threads of a CPU actor on a big node; small nodes get one actor per core
T = TypeVar("T")


@dataclass(frozen=True)
class PoolShape:
    """How many actors, and what each reserves from Ray (CPUs, GPUs) and how many threads it runs."""

    workers: int
    num_cpus: float
    num_gpus: float
    threads: int


def plan_shape(nodes: list[dict[str, Any]], workers: int | None = None, gpus: bool = True) -> PoolShape:
    """The pool for the cluster's alive nodes (ray.nodes()): one actor per GPU where there are GPUs
    (and `gpus`), else actors of CPU_THREADS cores on big nodes and of one core on nodes of up to 7;
    `workers` overrides the count, sharing the same resources out."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive", True)]
    cpus = [int(r.get("CPU", 0)) for r in alive]
    gpu_nodes = [(c, int(r.get("GPU", 0))) for c, r in zip(cpus, alive, strict=True) if int(r.get("GPU", 0))]
    if gpus and gpu_nodes:
        total = sum(g for _, g in gpu_nodes)
        each = min(c // g for c, g in gpu_nodes)  # cores beside each GPU, for decoding and encoding
        count = workers or total
        if count > total:  # more actors than GPUs: they share them
            return PoolShape(count, 0.0, total / count, max(1, each))
        return PoolShape(count, float(each), 1.0, max(1, each))
    total = sum(cpus)
    if total < 1:
        raise ClusterError("the Ray cluster has no CPUs to run workers on")
    if workers is None:
        threads = CPU_THREADS if max(cpus) >= 2 * CPU_THREADS else 1
        return PoolShape(max(1, sum(c // threads for c in cpus)), float(threads), 0.0, threads)
    if workers > total:  # more actors than cores: each reserves a share of one
        return PoolShape(workers, 1 / -(-workers // total), 0.0, 1)
    threads = max(1, total // workers)
    while threads > 1 and sum(c // threads for c in cpus) < workers:
        threads -= 1
    return PoolShape(workers, float(threads), 0.0, threads)


class Worker:
    """The actor: an Upscaler built once by `load` (again after a restart), and the calls of the jobs."""

    def __init__(self, load: Callable[[], Any], threads: int) -> None:
        from lmf_cli.process import prepare_process

        prepare_process()  # a long-lived process of many upscales, as the `lmf` command (before PyTorch loads)
        import torch

        torch.set_num_threads(threads)
        self.load, self.threads, self.up = load, threads, None

    def upscaler(self) -> Any:
        if self.up is None:
            self.up = self.load()
        return self.up

    def describe(self) -> dict[str, Any]:
        """What the driver prints and what a video job's resume key needs; loads the model."""
        up = self.upscaler()
        return {"name": up.name, "device": str(up.device), "precision": up.precision, "options": up.options,
                "weights": str(up.loaded.source), "threads": self.threads, "host": socket.gethostname(),
                "pid": os.getpid(), "node": import_ray().get_runtime_context().get_node_id()}

    def image(self, job: Any, data: bytes, options: Any) -> tuple[bytes, list[str], float]:
        from lmf_cli.jobs.images import upscale_bytes

        t0 = time.perf_counter()
        out, notes = upscale_bytes(job, data, self.upscaler(), options)
        return out, notes, time.perf_counter() - t0

    def frames_per_call(self, plan: Any) -> int:
        return self.upscaler().frames_per_call(plan.in_hw, plan.out_hw)

    def segment(self, plan: Any, work: Any, batch: int, source: bytes | None, reuse: bool = True) -> tuple:
        from lmf_cli.errors import InputError
        from lmf_cli.jobs.video import encode_segment

        if source is None and not plan.source.is_file():
            raise InputError(f"the Ray workers cannot read {plan.source}: over the object store limit, so the "
                             f"video must be at this path on every node (a shared file system)")
        t0 = time.perf_counter()
        up = self.upscaler()
        batch = min(batch, up.frames_fitting(plan.in_hw, plan.out_hw))
        return (*encode_segment(plan, up, work, batch=batch, source=source, reuse=reuse),
                time.perf_counter() - t0)


@dataclass
class Outcome(Generic[T]):
    """One finished call: its item, and its result or the one-line reason it failed."""

    item: T
    result: Any = None
    error: str | None = None
    exception: BaseException | None = None  # the LmfError behind `error`, or the Ray error of a dead worker


_PROBE = object()  # a call that asks an actor whether it is alive (describe)
_STALE = object()  # a call of an abandoned map: the actor is idle again when it ends, whatever its result


class WorkerPool:
    """Model actors on a Ray cluster, made by `start`; `map` hands them items, `close` ends them."""

    def __init__(self, connection: Connection, shape: PoolShape, actors: list[Any]) -> None:
        self.connection, self.shape = connection, shape
        self.actors = actors
        self.busy: dict[Any, tuple[Any, Any]] = {}
        self.idle: list[Any] = []
        self.facts: dict[str, Any] = {}
        self.trouble = "no worker started"  # the last reason an actor left the pool

    @classmethod
    def start(cls, address: str, load: Callable[[], Any], *, workers: int | None = None,
              gpus: bool = True) -> WorkerPool:
        """Connect, start the actors and wait for the first to load its model (a model that cannot be
        loaded fails here, with the loader's own message). `load` builds the Upscaler on a worker, e.g.
        functools.partial(Upscaler.load, "lmf-edsr"); it is pickled, so it must be importable there."""
        connection = connect(address)
        ray = import_ray()
        try:
            shape = plan_shape(ray.nodes(), workers, gpus)
            remote = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)(Worker)
            actors = [remote.options(num_cpus=shape.num_cpus, num_gpus=shape.num_gpus).remote(load, shape.threads)
                      for _ in range(shape.workers)]
            pool = cls(connection, shape, actors)
            pool.busy = {actor.describe.remote(): (actor, _PROBE) for actor in actors}
            while not pool.idle:
                if not pool.busy:
                    raise ClusterError(f"no Ray worker could start lmf ({pool.trouble}); every node needs lmf-cli "
                                       "and its dependencies (see the README)")
                ref, actor, _ = pool._next()
                pool._settle(actor, pool._result(ref))
        except BaseException:
            connection.close()
            raise
        return pool

    def _next(self) -> tuple[Any, Any, Any]:
        """The next finished call: (its ref, its actor, its item)."""
        (ref,), _ = import_ray().wait(list(self.busy), num_returns=1)
        return (ref, *self.busy.pop(ref))

    def _result(self, ref: Any) -> Any:
        try:
            return import_ray().get(ref)
        except Exception as exc:  # noqa: BLE001 - a probe that fails means the actor is gone
            return exc

    def _settle(self, actor: Any, result: Any, stale: bool = False) -> None:
        """A probe (describe) came back: the actor is idle again, or gone. A model that cannot be
        loaded is the user's error: raised before any work, with the loader's message."""
        if stale and not isinstance(result, import_ray().exceptions.RayActorError):
            self.idle.append(actor)
            return
        if isinstance(result, BaseException):
            self.actors.remove(actor)
            cause = getattr(result, "cause", None)
            if isinstance(cause, LmfError) and not self.facts:
                raise cause from None
            self.trouble = _short(result)
            return
        if self.facts and (clash := _clash(self.facts, result)):
            raise ClusterError(f"the Ray workers would not render alike: {clash}; choose one with "
                               f"{option_name('device')} and {option_name('precision')}, so that every segment and "
                               "image is rendered the same way")
        self.facts = self.facts or result
        self.idle.append(actor)

    def map(self, items: Iterable[T], call: Callable[[Any, T], Any]) -> Iterator[Outcome[T]]:
        """Hand each item to an idle actor (`call(actor, item)` returns the call's ObjectRef) and yield
        the outcomes as they finish, in any order. Items left when every actor is gone fail."""
        pending = iter(items)
        try:
            yield from self._map(pending, call)
        finally:  # abandoned (an error, Ctrl-C): calls still running are waited for, not taken for new ones
            self.busy = {ref: (actor, item if item is _PROBE else _STALE) for ref, (actor, item) in self.busy.items()}

    def _map(self, pending: Iterator[T], call: Callable[[Any, T], Any]) -> Iterator[Outcome[T]]:
        ray = import_ray()
        more = True
        while True:
            while more and self.idle:
                item = next(pending, _PROBE)
                if item is _PROBE:
                    more = False
                    break
                actor = self.idle.pop()
                self.busy[call(actor, item)] = (actor, item)
            if not self.busy:
                break
            ref, actor, item = self._next()
            if item is _PROBE or item is _STALE:
                self._settle(actor, self._result(ref), stale=item is _STALE)
                continue
            try:
                outcome = Outcome(item, ray.get(ref))
                self.idle.append(actor)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                if not isinstance(cause, LmfError):
                    raise cause from None
                self.idle.append(actor)
                outcome = Outcome(item, error=str(cause), exception=cause)
            except ray.exceptions.RayError as exc:  # the actor died on it, past its retries
                self.busy[actor.describe.remote()] = (actor, _PROBE)
                outcome = Outcome(item, error=f"a Ray worker died {MAX_TASK_RETRIES + 1} times on it "
                                              f"({_short(exc)})", exception=exc)
            yield outcome
        if more:
            for item in pending:
                yield Outcome(item, error=f"no Ray worker is left ({self.trouble})")

    def call_one(self, method: str, *args: Any) -> Any:
        """One call on an idle actor (a question about the model, such as the video batch size)."""
        ray = import_ray()
        actor = self.idle[0]
        try:
            return ray.get(getattr(actor, method).remote(*args))
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause if isinstance(exc.cause, LmfError) else exc from None

    @property
    def options(self) -> Any:
        """The EngineOptions the workers' Upscalers hold, as a worker reported them."""
        return self.facts["options"]

    def describe(self) -> str:
        facts, shape = self.facts, self.shape
        where = f"{shape.workers} Ray worker{'s' if shape.workers != 1 else ''}"
        return f"model {facts['name']} on {where} ({facts['device']}, {facts['precision']}, {shape.threads} " \
               f"thread{'s' if shape.threads != 1 else ''} each)"

    def close(self) -> None:
        """End the actors (and their calls in flight), and Ray itself if this pool started it."""
        ray = import_ray()
        for ref in self.busy:  # cancelled first: a call killed with its actor would be reported as retried
            ray.cancel(ref)
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001,S110 - already gone
                pass
        self.actors, self.busy, self.idle = [], {}, []
        self.connection.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RENDERING = ("name", "precision", "options")  # what must agree between workers for their outputs to agree


def _clash(pool: dict[str, Any], worker: dict[str, Any]) -> str | None:
    """How a worker's facts differ from the pool's where outputs depend on them (with `--precision auto`
    a node with bf16 matrix units picks bf16, one without fp32), or None. The device type counts, its
    number does not."""
    for key in RENDERING:
        if pool[key] != worker[key]:
            return f"{key} {worker[key]} on {worker['host']} against {pool[key]} on {pool['host']}"
    kinds = [facts["device"].split(":")[0] for facts in (pool, worker)]
    if kinds[0] != kinds[1]:
        return f"device {kinds[1]} on {worker['host']} against {kinds[0]} on {pool['host']}"
    return None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 120 else text[:117] + "..."
