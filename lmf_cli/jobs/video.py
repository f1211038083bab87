"""The video job: plan checked, then every frame through the model, everything else in the file kept.

Decoding (a thread), the model (the caller's thread) and encoding (a thread) are overlapped
through small bounded queues; frames never touch the disk. The video is encoded into numbered
segment files in a hidden work folder beside the output, each by a fresh encoder (so each
starts on a keyframe) and recorded in a JSON manifest once it is closed: an interrupted job
resumes from its last finished segment and gives the same file as an uninterrupted one. At
the end the segments and the input's audio, subtitle and other streams are muxed into a temp
file that is renamed onto the output, so the output path only ever holds a complete file.

Planning is `io.video.plan`, reading `io.video.decode`, the segments' framing `io.video.segments`
and the final mux `io.video.mux`; this module runs the job. The upscaler carries its
EngineOptions (tile, memory budget, CMSR level, precision), so a cluster's workers, built from
the same options, render the same frames. What did not change since the frame before is copied
from its output instead of computed (`engine.reuse`: the same bytes), within each segment.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from av.error import FFmpegError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from lmf_cli.engine.reuse import Previous
from lmf_cli.errors import InputError, option_name
from lmf_cli.files import atomic_write
from lmf_cli.io.video.decode import DecodeReport, Source, frames_after, segment_frames
from lmf_cli.io.video.errors import short_error
from lmf_cli.io.video.mux import mux
from lmf_cli.io.video.plan import SEGMENT_FRAMES, Size, VideoPlan, plan_video, work_dir
from lmf_cli.io.video.segments import (
    MANIFEST,
    Manifest,
    SegmentMismatch,
    SegmentWork,
    SegmentWriter,
    cut,
    disagreeing,
    headers,
    segment_name,
)
from lmf_cli.options import EngineOptions


class FrameUpscaler(Protocol):
    """What video needs of an upscaler (`lmf_cli.Upscaler` is one): frames in and out, the
    options it renders with, and the facts a resumed job must match. A protocol, so the
    runner never imports the API."""

    loaded: Any  # .source: the weights file
    precision: str
    options: EngineOptions

    def upscale_batch(self, images: np.ndarray, scale: Any = None, size: tuple[int, int] | None = None, *,
                      options: EngineOptions | None = None, progress: Any = None) -> np.ndarray: ...

    def upscale_sequence(self, frames: np.ndarray, scale: Any = None, size: tuple[int, int] | None = None, *,
                         previous: Previous | None = None) -> tuple[np.ndarray, int]: ...

    def frames_per_call(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int: ...

    def frames_fitting(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int: ...


def job_key(plan: VideoPlan, weights: str | Path, precision: str, options: EngineOptions,
            frames_per_call: int) -> dict[str, Any]:
    """What a resumed job must share with the interrupted one to give the same file: the input,
    the plan, the weights, and the engine options that can change a frame's pixels."""
    st = plan.source.stat()
    weights = Path(weights)
    return {"source": str(plan.source.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
            "out": list(plan.out_hw), "codec": plan.codec, "pix_fmt": plan.pix_fmt, "options": plan.options,
            "global_header": plan.global_header, "start": plan.start, "end": plan.end,
            "segment": plan.segment_frames,
            "model": str(weights.resolve()), "model_mtime": weights.stat().st_mtime_ns if weights.exists() else 0,
            "precision": precision, "tile": options.tile, "max_memory": options.max_memory, "cmsr": options.cmsr,
            "batch": frames_per_call}


_END = object()


@dataclass(frozen=True)
class VideoProgress:
    """Reported after every upscaled frame: frames done (resumed ones included) of `total`
    (an estimate until the end), this run's speed and the encoded bytes so far."""

    done: int
    total: int
    fps: float
    out_bytes: int
    segments: int


@dataclass(frozen=True)
class VideoResult:
    """A finished job; `decoding` says which packets of the input were lost and where frames changed size
    (this run's decoding: a resumed run's, or nothing for a cluster's); `reused`, what share of the area
    of the frames this run upscaled was copied from the frame before instead of computed."""

    output: Path
    frames: int
    resumed_frames: int
    seconds: float
    out_bytes: int
    decoding: DecodeReport = field(default_factory=DecodeReport)
    reused: float = 0.0

    @property
    def fps(self) -> float:
        return (self.frames - self.resumed_frames) / self.seconds if self.seconds > 0 else 0.0


class _Stopped(Exception):
    """A worker thread was told to stop (interrupt or error elsewhere)."""


class _Frames:
    """Frames through the upscaler in order. With `reuse`, what cannot have changed since the frame
    before is copied from its output instead of computed (the same bytes); each segment starts with
    nothing to copy, so its frames never depend on how the job was cut (resumed, on a cluster)."""

    def __init__(self, upscaler: FrameUpscaler, out_hw: tuple[int, int], reuse: bool) -> None:
        self.up, self.out_hw, self.reuse = upscaler, out_hw, reuse
        self.previous: Previous | None = None
        self.copied = self.pixels = 0

    def restart(self) -> None:
        """A segment starts: nothing before it to copy from."""
        self.previous = None

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        if not self.reuse:
            self.tally(len(frames), 0)
            return self.up.upscale_batch(frames, size=self.out_hw)
        bigs, copied = self.up.upscale_sequence(frames, size=self.out_hw, previous=self.previous)
        self.previous = Previous(frames[-1], bigs[-1])
        self.tally(len(frames), copied)
        return bigs

    def tally(self, frames: int, copied: int) -> None:
        """Count frames upscaled (here or by `encode_segment`) and the output pixels copied for them."""
        self.pixels += frames * self.out_hw[0] * self.out_hw[1]
        self.copied += copied

    @property
    def reused(self) -> float:
        """The share of the frame area copied instead of computed."""
        return self.copied / self.pixels if self.pixels else 0.0


class _Pipeline:
    """decode thread -> queue -> model (this thread) -> queue -> encode thread."""

    def __init__(self, plan: VideoPlan, frames: _Frames, manifest: Manifest,
                 progress: Callable[[VideoProgress], None] | None, batch: int = 1) -> None:
        self.plan, self.upscale, self.manifest, self.progress = plan, frames, manifest, progress
        self.batch = max(1, batch)
        self.taken = 0  # frames taken this run, which starts on a segment's first
        self.ended = False
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.failed_writing = False
        self.decoding = DecodeReport()
        self.writer: SegmentWriter | None = None
        self.done = manifest.frames
        self.segments = len(manifest.segments)

    def run(self) -> None:
        frames: queue.Queue = queue.Queue(maxsize=max(4, 2 * self.batch))
        upscaled: queue.Queue = queue.Queue(maxsize=max(4, 2 * self.batch))
        workers = [threading.Thread(target=self._guard, args=(self._decode, frames), daemon=True),
                   threading.Thread(target=self._guard, args=(self._encode, upscaled), daemon=True)]
        for worker in workers:
            worker.start()
        t0, fresh = time.perf_counter(), 0
        try:
            while items := self._take(frames):
                if (self.taken - len(items)) % self.plan.segment_frames == 0:
                    self.upscale.restart()
                bigs = self.upscale(np.stack([pixels for _, _, pixels in items]))
                for (pts, duration, _), big in zip(items, bigs, strict=True):
                    self._put(upscaled, (pts, duration, big))
                self.done, fresh = self.done + len(items), fresh + len(items)
                self._report(max(self.done, self.plan.total or 0), fresh / (time.perf_counter() - t0))
            self._put(upscaled, _END)
            workers[1].join()
            self._report(self.done, fresh / (time.perf_counter() - t0))  # the total is known now
        except BaseException:
            self.stop.set()
            raise
        finally:
            for worker in workers:
                worker.join()
        self._check()

    def _take(self, q: queue.Queue) -> list[tuple[int, int, np.ndarray]]:
        """The next frames for one model call: one, waiting for it, then up to `batch` in all of
        those already decoded (never waiting for more: the encoder must not starve), all of one
        segment, as a cluster's worker takes them. [] at the end."""
        if self.ended:
            return []
        items = []
        wanted = min(self.batch, self.plan.segment_frames - self.taken % self.plan.segment_frames)
        while len(items) < wanted:
            try:
                item = self._get(q) if not items else q.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                self.ended = True
                break
            items.append(item)
        self.taken += len(items)
        return items

    def _report(self, total: int, fps: float) -> None:
        if self.progress:
            writer = self.writer
            out_bytes = self.manifest.out_bytes + (writer.bytes if writer else 0)
            self.progress(VideoProgress(self.done, total, fps, out_bytes, self.segments))

    def _guard(self, work: Callable[[queue.Queue], None], q: queue.Queue) -> None:
        try:
            work(q)
        except _Stopped:
            pass
        except BaseException as exc:
            self.errors.append(exc)
            self.failed_writing = work == self._encode
            self.stop.set()

    def _check(self) -> None:
        """A failure of the decoding thread blames the input, one of the encoding thread the work folder."""
        if self.errors:
            exc = self.errors[0]
            if isinstance(exc, FFmpegError | OSError):
                if self.failed_writing:
                    raise InputError(f"cannot write the segments in {self.manifest.path.parent} ({short_error(exc)});"
                                     f" the finished ones are kept ({option_name('resume')} continues)") from exc
                raise InputError(f"{self.plan.source}: {short_error(exc)}") from exc
            raise exc

    def _get(self, q: queue.Queue) -> Any:
        while True:
            self._halt()
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                pass

    def _put(self, q: queue.Queue, item: Any) -> None:
        while True:
            self._halt()
            try:
                return q.put(item, timeout=0.1)
            except queue.Full:
                pass

    def _halt(self) -> None:
        """Leave at once when told to stop: an interrupt must not wait for queued frames."""
        if self.stop.is_set():
            self._check()
            raise _Stopped

    def _decode(self, out: queue.Queue) -> None:
        """Frames in the range not yet in a finished segment, as arrays, in presentation order."""
        segments = self.manifest.segments
        for item in frames_after(self.plan, segments[-1]["last_pts"] if segments else None, report=self.decoding):
            self._put(out, item)
        self._put(out, _END)

    def _encode(self, source: queue.Queue) -> None:
        manifest = self.manifest
        try:
            while (item := self._get(source)) is not _END:
                if self.writer is None:
                    self.writer = SegmentWriter(manifest.path.parent / segment_name(len(manifest.segments)), self.plan)
                self.writer.add(*item)
                if self.writer.frames == self.plan.segment_frames:
                    self._close_segment()
            if self.writer is not None:
                self._close_segment()
        except BaseException:
            if self.writer is not None:
                self.writer.abort()
            raise
        manifest.complete = True
        manifest.save()

    def _close_segment(self) -> None:
        writer, manifest = self.writer, self.manifest
        record = {**writer.close(), "index": len(manifest.segments)}
        manifest.add(record, headers(writer), self.plan.codec)
        manifest.save()
        self.writer = None
        self.segments += 1


def encode_segment(plan: VideoPlan, upscaler: FrameUpscaler, work: SegmentWork, *, batch: int = 1,
                   source: Source = None, reuse: bool = True) -> tuple[dict[str, Any], bytes, str, int]:
    """Decode, upscale and encode one segment on its own, the unit of work of a cluster's workers.

    Returns its manifest record, its bytes (the packet framing of `segments`), its stream headers
    and how many output pixels were copied from the frame before (`reuse`). The frames are those a
    job resumed after `work.after` would encode, so a segment made here is the segment of an
    uninterrupted local run; SegmentMismatch if the frames decoded are not the ones `work` names
    (the index was built from packets that do not all decode).
    """
    upscale = _Frames(upscaler, plan.out_hw, reuse)
    with tempfile.TemporaryDirectory(prefix="lmf-segment-") as folder:
        writer = SegmentWriter(Path(folder) / segment_name(work.index), plan)
        try:
            frames = frames_after(plan, work.after, source)
            seen: list[int] = []
            while len(seen) < len(work.pts):
                items = [item for _, item in zip(range(min(batch, len(work.pts) - len(seen))), frames, strict=False)]
                if not items:
                    break
                bigs = upscale(np.stack([pixels for _, _, pixels in items]))
                for (pts, duration, _), big in zip(items, bigs, strict=True):
                    writer.add(pts, duration, big)
                    seen.append(pts)
            frames.close()
            if tuple(seen) != work.pts:
                raise SegmentMismatch(f"segment {work.index} holds frames {seen[:3]}... where the index says "
                                      f"{list(work.pts[:3])}...")
            record = {**writer.close(), "index": work.index}
        except BaseException:
            writer.abort()
            raise
        return record, writer.path.read_bytes(), headers(writer), upscale.copied


def store_segment(manifest: Manifest, plan: VideoPlan, record: dict[str, Any], data: bytes, extradata: str) -> None:
    """Write a segment made elsewhere into the work folder (atomically) and record it."""
    atomic_write(manifest.path.parent / record["file"], lambda tmp: tmp.write_bytes(data))
    manifest.add(record, extradata, plan.codec)
    manifest.save()


def segment_plan(plan: VideoPlan, manifest: Manifest, exact: bool = False) -> list[SegmentWork]:
    """The job cut into segments: by the index kept in the work folder, else by a new one (saved there)
    from the packets' timestamps, or from decoded frames where those disagree with the finished
    segments or where `exact` asks for it; finished segments the final index disagrees with are dropped."""
    stamps = None if exact else manifest.load_index()
    if stamps is None or disagreeing(manifest, cut(stamps, plan.segment_frames)):
        stamps = None if exact else segment_frames(plan)
        if stamps is None or disagreeing(manifest, cut(stamps, plan.segment_frames)):
            stamps = segment_frames(plan, decode=True)
        manifest.save_index(stamps)
    work = cut(stamps, plan.segment_frames)
    wrong = disagreeing(manifest, work)
    if wrong:
        manifest.drop(wrong)
        manifest.save()
    return work


def finished_segments(work: Path) -> int:
    """How many finished segments an interrupted job left in its work folder (0 if none or unreadable)."""
    try:
        return len(json.loads((work / MANIFEST).read_text()).get("segments", []))
    except (OSError, ValueError, AttributeError):
        return 0


@contextmanager
def job_lock(dst: Path) -> Iterator[None]:
    """One lmf at a time per output: a second command for the same output is refused instead of being
    let loose on the first one's work folder. (Where the OS has no flock, jobs are not locked.)"""
    lock = dst.with_name(f".{dst.name}.lmf-lock")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        raise InputError(f"cannot write {dst} ({exc.strerror or exc})") from exc
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise InputError(f"another lmf is writing {dst}; wait for it to end or stop it first") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def open_job(plan: VideoPlan, dst: Path, job: dict[str, Any], *, overwrite: bool, resume: bool) -> Manifest:
    """Refuse what must not be written over (the output, or an interrupted job's finished segments
    without `resume`); the manifest of the job to resume, or of a new one."""
    if dst.exists():
        if os.path.samefile(dst, plan.source):
            raise InputError(f"refusing to write over the input {dst}")
        if not overwrite:
            raise InputError(f"{dst} exists ({option_name('overwrite')} replaces it)")
    work = work_dir(dst)
    try:
        manifest = Manifest.load(work, job) if resume else None
        if manifest is None:
            kept = 0 if resume else finished_segments(work)
            if kept:
                raise InputError(f"{work} holds {kept} finished segment{'s' if kept != 1 else ''} of an interrupted "
                                 f"run: {option_name('resume')} continues it; remove the folder to start over")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            manifest = Manifest(work / MANIFEST, job)
            manifest.save()
    except OSError as exc:
        raise InputError(f"cannot write {dst} ({exc.strerror or exc})") from exc
    return manifest


def finish_job(plan: VideoPlan, dst: Path, manifest: Manifest, resumed: int, seconds: float,
               decoding: DecodeReport | None = None, reused: float = 0.0) -> VideoResult:
    """Mux the finished segments with the input's other streams into `dst` (atomically); drop the work folder.
    `reused`: the share of this run's frame area copied instead of computed."""
    work = manifest.path.parent
    if not manifest.frames:
        shutil.rmtree(work)
        raise InputError(f"{plan.source}: no video frames in the requested range")
    try:
        atomic_write(dst, lambda tmp: mux(plan, manifest, tmp))
    except (FFmpegError, OSError) as exc:
        raise InputError(f"cannot write {dst} ({short_error(exc)})") from exc
    shutil.rmtree(work)
    return VideoResult(dst, manifest.frames, resumed, seconds, dst.stat().st_size, decoding or DecodeReport(),
                       reused)


def run_video(plan: VideoPlan, dst: str | Path, upscaler: FrameUpscaler, *, overwrite: bool = False,
              resume: bool = False, batch: int | None = None, reuse: bool = True,
              progress: Callable[[VideoProgress], None] | None = None) -> VideoResult:
    """Upscale the planned video into `dst` with the upscaler's EngineOptions. The output appears
    only when complete; an interruption keeps the finished segments for `resume=True`. `batch`:
    frames per model call (None: from the device and its memory; 1 on a CPU, where batching does
    not pay), at most what fits the memory budget. `reuse`: copy what did not change since the
    frame before instead of computing it (the same bytes; off only to measure it). A job a cluster
    left with gaps (segments finished out of order) has them filled first."""
    if batch is None:
        batch = upscaler.frames_per_call(plan.in_hw, plan.out_hw)
    batch = min(batch, upscaler.frames_fitting(plan.in_hw, plan.out_hw))  # the queues hold 2 x batch frames
    dst = Path(dst)
    key = job_key(plan, upscaler.loaded.source, upscaler.precision, upscaler.options, batch)
    with job_lock(dst):
        manifest = open_job(plan, dst, key, overwrite=overwrite, resume=resume)
        resumed = manifest.frames
        t0 = time.perf_counter()
        frames = _Frames(upscaler, plan.out_hw, reuse)
        if not manifest.contiguous:
            for work in segment_plan(plan, manifest):
                if work.index < max(manifest.done) and work.index not in manifest.done:
                    record, data, extradata, copied = encode_segment(plan, upscaler, work, batch=batch, reuse=reuse)
                    store_segment(manifest, plan, record, data, extradata)
                    frames.tally(record["frames"], copied)
        decoding = None
        if not manifest.complete:
            pipeline = _Pipeline(plan, frames, manifest, progress, batch)
            pipeline.run()
            decoding = pipeline.decoding
            if plan.counted and manifest.frames < plan.total:
                decoding.lost.append(f"{manifest.frames} of the {plan.total} frames its header lists could be read "
                                     "(a truncated or damaged file)")
        return finish_job(plan, dst, manifest, resumed, time.perf_counter() - t0, decoding, frames.reused)


def upscale_video(src: str | Path, dst: str | Path, upscaler: FrameUpscaler, size: Size, *, codec: str | None = None,
                  crf: int | None = None, preset: str | None = None, pix_fmt: str | None = None,
                  start: float | None = None, end: float | None = None, overwrite: bool = False,
                  resume: bool = False, segment_frames: int = SEGMENT_FRAMES, batch: int | None = None,
                  reuse: bool = True, progress: Callable[[VideoProgress], None] | None = None) -> VideoResult:
    """plan_video + run_video in one call: the output container follows `dst`'s extension."""
    plan = plan_video(src, size, suffix=Path(dst).suffix, codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt,
                      start=start, end=end, segment_frames=segment_frames)
    return run_video(plan, dst, upscaler, overwrite=overwrite, resume=resume, batch=batch, reuse=reuse,
                     progress=progress)
