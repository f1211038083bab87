"""A video on the pool: the resumable segments are the unit of work. Each worker decodes, upscales
and encodes whole segments; the driver keeps the manifest, writes each segment as it arrives (in
any order) and muxes them with the audio and subtitles, as a local run does."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path

from lmf_cli.cluster.connect import import_ray
from lmf_cli.cluster.pool import WorkerPool
from lmf_cli.errors import InputError, option_name
from lmf_cli.io.video.plan import VideoPlan
from lmf_cli.io.video.segments import Manifest, SegmentMismatch, SegmentWork
from lmf_cli.jobs.video import (
    VideoProgress,
    VideoResult,
    finish_job,
    job_key,
    job_lock,
    open_job,
    segment_plan,
    store_segment,
)

SHIP_LIMIT = 1 << 30  # inputs up to this size travel through the object store; larger ones are read by path


def run_video_on(pool: WorkerPool, plan: VideoPlan, dst: str | Path, *, overwrite: bool = False,
                 resume: bool = False, batch: int | None = None, reuse: bool = True,
                 progress: Callable[[VideoProgress], None] | None = None,
                 ship_limit: int = SHIP_LIMIT) -> VideoResult:
    """`jobs.video.run_video` on the pool (whose workers hold Upscalers with the run's EngineOptions): the
    same segments, manifest and output, so `resume` continues a local or a cluster run either way. The
    input goes to the workers through the object store up to `ship_limit` bytes; above, every node must
    see it at plan.source (a shared file system). A segment that still fails after Ray's retries fails
    the job; the finished ones are kept. `reuse` as `run_video`: each segment on its own."""
    dst = Path(dst)
    if batch is None:
        batch = pool.call_one("frames_per_call", plan)
    key = job_key(plan, pool.facts["weights"], pool.facts["precision"], pool.options, batch)
    with job_lock(dst):
        manifest = open_job(plan, dst, key, overwrite=overwrite, resume=resume)
        return _segments_on(pool, plan, dst, manifest, batch, reuse, progress, ship_limit)


def _segments_on(pool: WorkerPool, plan: VideoPlan, dst: Path, manifest: Manifest, batch: int, reuse: bool,
                 progress: Callable[[VideoProgress], None] | None, ship_limit: int) -> VideoResult:
    ray = import_ray()
    resumed = manifest.frames
    t0 = time.perf_counter()
    data = plan.source.read_bytes() if plan.source.stat().st_size <= ship_limit else None
    source = ray.put(data) if data is not None else None
    job = plan if data is not None else replace(plan, source=plan.source.resolve())  # workers have another cwd
    fresh = copied = 0
    for exact in (False, True):
        work = segment_plan(plan, manifest, exact=exact)
        total = sum(len(w.pts) for w in work)
        mismatch: list[SegmentWork] = []

        def todo(work: list[SegmentWork] = work, mismatch: list[SegmentWork] = mismatch) -> Iterator[SegmentWork]:
            for w in work:
                if mismatch:
                    return
                if w.index not in manifest.done:
                    yield w

        calls = pool.map(todo(), lambda actor, w: actor.segment.remote(job, w, batch, source, reuse))
        with closing(calls):
            for outcome in calls:
                if isinstance(outcome.exception, SegmentMismatch):
                    mismatch.append(outcome.item)
                    continue
                if outcome.error is not None:
                    raise InputError(f"{plan.source}: segment {outcome.item.index + 1} of {len(work)} failed: "
                                     f"{outcome.error}; the finished segments are kept "
                                     f"({option_name('resume')} continues)")
                record, segment, extradata, reused, _ = outcome.result
                store_segment(manifest, plan, record, segment, extradata)
                fresh, copied = fresh + record["frames"], copied + reused
                if progress is not None:
                    progress(VideoProgress(manifest.frames, total, fresh / (time.perf_counter() - t0),
                                           manifest.out_bytes, len(manifest.segments)))
        if not mismatch:
            break
    else:
        raise InputError(f"{plan.source}: its frames cannot be cut into segments by timestamp (frames without "
                         f"timestamps?); run it without {option_name('ray')}")
    manifest.complete = True
    manifest.save()
    return finish_job(plan, dst, manifest, resumed, time.perf_counter() - t0,
                      reused=copied / (fresh * plan.out_hw[0] * plan.out_hw[1]) if fresh else 0.0)
