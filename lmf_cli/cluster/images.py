"""A batch of image files on the pool: the planner's jobs, each input's bytes through Ray's object
store (no shared file system), the worker's encoded bytes back, written by the driver atomically."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing

from lmf_cli.cluster.connect import import_ray
from lmf_cli.cluster.pool import WorkerPool
from lmf_cli.errors import LmfError
from lmf_cli.jobs.images import FileOptions, Job, read_input, write_output


def upscale_files(pool: WorkerPool, jobs: list[Job], options: FileOptions, *,
                  on_start: Callable[[Job], None] | None = None,
                  on_done: Callable[[Job, list[str]], None] | None = None) -> None:
    """Upscale planned jobs (status "pending") on the pool; each ends "done" or "failed" with its reason.

    `on_start(job)` is called as a job is handed to a worker, `on_done(job, notes)` as it ends, with
    what the output format could not keep; jobs end in the order the workers finish them. An input
    is read only when a worker is free for it, so a batch of any size holds one file per worker.
    """
    ray = import_ray()

    def ready() -> Iterator[tuple[Job, object]]:
        for job in jobs:
            if on_start is not None:
                on_start(job)
            try:
                data = read_input(job)
            except LmfError as exc:
                job.drop("failed", str(exc))
                if on_done is not None:
                    on_done(job, [])
                continue
            yield job, ray.put(data)

    calls = pool.map(ready(), lambda actor, item: actor.image.remote(item[0], item[1], options))
    with closing(calls):
        for outcome in calls:
            job, notes = outcome.item[0], []
            if outcome.error is None:
                data, notes, job.seconds = outcome.result
                try:
                    write_output(job, data)
                    job.status = "done"
                except LmfError as exc:
                    job.drop("failed", str(exc))
                    notes = []
            else:
                job.drop("failed", outcome.error)
            if on_done is not None:
                on_done(job, notes)
