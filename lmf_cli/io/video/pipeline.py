"""Video upscaling: every frame through the model, everything else in the file kept.

Decoding (a thread), the model (the caller's thread) and encoding (a thread) are overlapped
through small bounded queues; frames never touch the disk. Planning is in `plan`, the
resumable segments in `segments`, the final mux in `mux`. The video is encoded into
numbered segment files in a hidden work folder beside the output, each by a fresh encoder
(so each starts on a keyframe) and recorded in a JSON manifest once it is closed: an
interrupted job resumes from its last finished segment and gives the same file as an
uninterrupted one. At the end the segments and the input's audio, subtitle and other streams
are muxed into a temp file that is renamed onto the output, so the output path only ever
holds a complete file.

Segments hold packets in a framing of our own (pts, dts, duration, flags, size, bytes):
containers would round (Matroska: 1 ms) or shift (NUT, MP4) the timestamps that a variable
frame rate needs kept exactly.
"""

from __future__ import annotations

import io
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.error import FFmpegError
from av.video.reformatter import VideoReformatter

from lmf_cli.engine.budget import video_batch
from lmf_cli.errors import InputError
from lmf_cli.files import atomic_write
from lmf_cli.io.video.mux import mux
from lmf_cli.io.video.plan import SEGMENT_FRAMES, FrameUpscaler, Size, VideoPlan, plan_video, short_error, work_dir
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

Source = bytes | bytearray | memoryview | io.IOBase | None  # the input where it is not at plan.source

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
    output: Path
    frames: int
    resumed_frames: int
    seconds: float
    out_bytes: int

    @property
    def fps(self) -> float:
        return (self.frames - self.resumed_frames) / self.seconds if self.seconds > 0 else 0.0


class _Stopped(Exception):
    """A worker thread was told to stop (interrupt or error elsewhere)."""


class _Pipeline:
    """decode thread -> queue -> model (this thread) -> queue -> encode thread."""

    def __init__(self, plan: VideoPlan, upscaler: FrameUpscaler, manifest: Manifest, tile: int | None,
                 progress: Callable[[VideoProgress], None] | None, batch: int = 1) -> None:
        self.plan, self.up, self.manifest, self.tile, self.progress = plan, upscaler, manifest, tile, progress
        self.batch = max(1, batch)
        self.ended = False
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
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
                bigs = self.up.upscale_batch(np.stack([pixels for _, _, pixels in items]), size=self.plan.out_hw,
                                             tile=self.tile)
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
        those already decoded (never waiting for more: the encoder must not starve). [] at the end."""
        if self.ended:
            return []
        items = []
        while len(items) < self.batch:
            try:
                item = self._get(q) if not items else q.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                self.ended = True
                break
            items.append(item)
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
            self.stop.set()

    def _check(self) -> None:
        if self.errors:
            exc = self.errors[0]
            if isinstance(exc, FFmpegError | OSError):
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
        for item in frames_after(self.plan, segments[-1]["last_pts"] if segments else None):
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


def frames_after(plan: VideoPlan, after: int | None, source: Source = None,
                 pixels: bool = True) -> Iterator[tuple[int, int, np.ndarray | None]]:
    """(pts, duration, pixels) of the range's frames after the frame at `after` (None: from the range's
    start), in presentation order: what a resumed job and a segment decoded on its own both start from.
    `source`: the input's bytes where it is not at plan.source; pixels=False only lists the frames."""
    start = plan.shift if plan.start else None
    end = round(plan.end / plan.time_base) if plan.end is not None else None
    target = after if after is not None else start
    seek = target is not None and plan.first_pts is not None and target > plan.first_pts
    reformatter = VideoReformatter()
    for attempt in ((True, False) if seek else (False,)):
        overshot = False
        for i, (pts, duration, frame) in enumerate(_decoded(plan, target if attempt else None, source)):
            if i == 0 and attempt and pts > target:  # no index: the seek landed past the target
                overshot = True
                break
            if (start is not None and pts < start) or (after is not None and pts <= after):
                continue
            if end is not None and pts >= end:
                break
            yield pts, duration, reformatter.reformat(frame, format=plan.rgb_format).to_ndarray() if pixels else None
        if not overshot:
            break


def segment_frames(plan: VideoPlan, decode: bool = False, source: Source = None) -> list[int]:
    """The timestamps of the range's frames in presentation order, which cut a job into segments of
    plan.segment_frames. From the packets' timestamps (seconds for hours of video), or, with `decode`
    or where a packet has none, from decoded frames exactly as `frames_after` sees them."""
    if not decode:
        start = plan.shift if plan.start else None
        end = round(plan.end / plan.time_base) if plan.end is not None else None
        if isinstance(source, bytes | bytearray | memoryview):
            source = io.BytesIO(source)
        with av.open(source if source is not None else str(plan.source)) as inp:
            stream = inp.streams[plan.video_index]
            stamps = [p.pts for p in inp.demux(stream) if p.size or p.pts is not None]
        if None not in stamps:
            return [pts for pts in sorted(stamps) if (start is None or pts >= start) and (end is None or pts < end)]
    return [pts for pts, _, _ in frames_after(plan, None, source, pixels=False)]


def _decoded(plan: VideoPlan, seek_to: int | None, source: Source = None) -> Iterator[tuple[int, int, av.VideoFrame]]:
    """(pts, duration, frame) of the video stream; a packet that does not decode is skipped,
    as players do. Frames without a timestamp continue from the previous one."""
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    with av.open(source if source is not None else str(plan.source)) as inp:
        stream = inp.streams[plan.video_index]
        stream.thread_type = "AUTO"
        if seek_to is not None:
            inp.seek(seek_to, stream=stream, backward=True)
        step = max(1, round(1 / (plan.rate * plan.time_base)))
        last = None
        for packet in inp.demux(stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                continue
            for frame in frames:
                pts = frame.pts if frame.pts is not None else (last + step if last is not None else 0)
                last = pts
                yield pts, frame.duration or step, frame


def encode_segment(plan: VideoPlan, upscaler: FrameUpscaler, work: SegmentWork, *, tile: int | None = None,
                   batch: int = 1, source: Source = None) -> tuple[dict[str, Any], bytes, str]:
    """Decode, upscale and encode one segment on its own, the unit of work of a cluster's workers.

    Returns its manifest record, its bytes (the packet framing of `segments`) and its stream
    headers. The frames are those a job resumed after `work.after` would encode, so a segment
    made here is the segment of an uninterrupted local run; SegmentMismatch if the frames decoded
    are not the ones `work` names (the index was built from packets that do not all decode).
    """
    with tempfile.TemporaryDirectory(prefix="lmf-segment-") as folder:
        writer = SegmentWriter(Path(folder) / segment_name(work.index), plan)
        try:
            frames = frames_after(plan, work.after, source)
            seen: list[int] = []
            while len(seen) < len(work.pts):
                items = [item for _, item in zip(range(min(batch, len(work.pts) - len(seen))), frames, strict=False)]
                if not items:
                    break
                bigs = upscaler.upscale_batch(np.stack([pixels for _, _, pixels in items]), size=plan.out_hw,
                                              tile=tile)
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
        return record, writer.path.read_bytes(), headers(writer)


def store_segment(manifest: Manifest, plan: VideoPlan, record: dict[str, Any], data: bytes, extradata: str) -> None:
    """Write a segment made elsewhere into the work folder (atomically) and record it."""
    atomic_write(manifest.path.parent / record["file"], lambda tmp: tmp.write_bytes(data))
    manifest.add(record, extradata, plan.codec)
    manifest.save()


def segment_plan(plan: VideoPlan, manifest: Manifest, source: Source = None, exact: bool = False) -> list[SegmentWork]:
    """The job cut into segments: by the index kept in the work folder, else by a new one (saved there)
    from the packets' timestamps, or from decoded frames where those disagree with the finished
    segments or where `exact` asks for it; finished segments the final index disagrees with are dropped."""
    stamps = None if exact else manifest.load_index()
    if stamps is None or disagreeing(manifest, cut(stamps, plan.segment_frames)):
        stamps = None if exact else segment_frames(plan, source=source)
        if stamps is None or disagreeing(manifest, cut(stamps, plan.segment_frames)):
            stamps = segment_frames(plan, decode=True, source=source)
        manifest.save_index(stamps)
    work = cut(stamps, plan.segment_frames)
    wrong = disagreeing(manifest, work)
    if wrong:
        manifest.drop(wrong)
        manifest.save()
    return work


def open_job(plan: VideoPlan, dst: Path, job: dict[str, Any], *, overwrite: bool, resume: bool) -> Manifest:
    """Refuse what must not be written over; the manifest of the job to resume, or of a new one."""
    if dst.exists():
        if os.path.samefile(dst, plan.source):
            raise InputError(f"refusing to write over the input {dst}")
        if not overwrite:
            raise InputError(f"{dst} exists (--overwrite replaces it)")
    work = work_dir(dst)
    manifest = Manifest.load(work, job) if resume else None
    if manifest is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        manifest = Manifest(work / MANIFEST, job)
        manifest.save()
    return manifest


def finish_job(plan: VideoPlan, dst: Path, manifest: Manifest, resumed: int, seconds: float) -> VideoResult:
    """Mux the finished segments with the input's other streams into `dst` (atomically); drop the work folder."""
    work = manifest.path.parent
    if not manifest.frames:
        shutil.rmtree(work)
        raise InputError(f"{plan.source}: no video frames in the requested range")
    try:
        atomic_write(dst, lambda tmp: mux(plan, manifest, tmp))
    except (FFmpegError, OSError) as exc:
        raise InputError(f"cannot write {dst} ({short_error(exc)})") from exc
    shutil.rmtree(work)
    return VideoResult(dst, manifest.frames, resumed, seconds, dst.stat().st_size)


def run_video(plan: VideoPlan, dst: str | Path, upscaler: FrameUpscaler, *, overwrite: bool = False,
              resume: bool = False, tile: int | None = None, batch: int | None = None,
              progress: Callable[[VideoProgress], None] | None = None) -> VideoResult:
    """Upscale the planned video into `dst`. The output appears only when complete; an
    interruption keeps the finished segments for `resume=True`. `batch`: frames per model
    call (None: from the device and its memory; 1 on a CPU, where batching does not pay).
    A job a cluster left with gaps (segments finished out of order) has them filled first."""
    if batch is None:
        batch = video_batch(upscaler.model, upscaler.device, plan.in_hw, plan.out_hw)
    dst = Path(dst)
    manifest = open_job(plan, dst, plan.key(upscaler, tile, batch), overwrite=overwrite, resume=resume)
    resumed = manifest.frames
    t0 = time.perf_counter()
    if not manifest.contiguous:
        for work in segment_plan(plan, manifest):
            if work.index < max(manifest.done) and work.index not in manifest.done:
                store_segment(manifest, plan, *encode_segment(plan, upscaler, work, tile=tile, batch=batch))
    if not manifest.complete:
        _Pipeline(plan, upscaler, manifest, tile, progress, batch).run()
    return finish_job(plan, dst, manifest, resumed, time.perf_counter() - t0)


def upscale_video(src: str | Path, dst: str | Path, upscaler: FrameUpscaler, size: Size, *, codec: str | None = None,
                  crf: int | None = None, preset: str | None = None, pix_fmt: str | None = None,
                  start: float | None = None, end: float | None = None, overwrite: bool = False,
                  resume: bool = False, tile: int | None = None, segment_frames: int = SEGMENT_FRAMES,
                  batch: int | None = None, progress: Callable[[VideoProgress], None] | None = None) -> VideoResult:
    """plan_video + run_video in one call: the output container follows `dst`'s extension."""
    plan = plan_video(src, size, suffix=Path(dst).suffix, codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt,
                      start=start, end=end, segment_frames=segment_frames)
    return run_video(plan, dst, upscaler, overwrite=overwrite, resume=resume, tile=tile, batch=batch,
                     progress=progress)
