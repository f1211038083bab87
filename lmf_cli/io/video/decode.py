"""Reading a video stream: decoded frames as arrays in presentation order, from the planned range,
resumable after any frame; and the list of the range's timestamps that cuts a job into segments."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from lmf_cli.io.video.plan import VideoPlan
from lmf_cli.io.video.timeline import Mender

Source = bytes | bytearray | memoryview | io.IOBase | None  # the input where it is not at plan.source


@dataclass
class DecodeReport:
    """What decoding met that the user must hear about: `lost` says, one line each, where frames of the
    input are missing or damaged (data FFmpeg reports as damaged, a file unreadable past a point);
    `resized` the times from which frames changed size, with the size. (Gaps in the timestamps are not
    taken for losses: variable frame rates have them by design.)"""

    lost: list[str] = field(default_factory=list)
    resized: list[tuple[float, tuple[int, int]]] = field(default_factory=list)
    undecodable: list[float] = field(default_factory=list)  # times of packets that did not decode

    def mark(self) -> tuple[int, int]:
        return len(self.lost), len(self.undecodable)

    def forget(self, since: tuple[int, int], until: tuple[int, int]) -> None:
        """Drop what was heard between two marks."""
        del self.lost[since[0]:until[0]]
        del self.undecodable[since[1]:until[1]]

    def summary(self) -> list[str]:
        """The losses as lines: undecodable packets gathered in one."""
        lines = list(self.lost)
        if self.undecodable:
            times = ", ".join(f"{t:.2f} s" for t in self.undecodable[:5]) + (", ..." if len(self.undecodable) > 5
                                                                           else "")
            n = len(self.undecodable)
            lines.insert(0, f"{n} packet{'s' if n != 1 else ''} could not be decoded (at {times})")
        return lines


def frames_after(plan: VideoPlan, after: int | None, source: Source = None, pixels: bool = True,
                 report: DecodeReport | None = None) -> Iterator[tuple[int, int, np.ndarray | None]]:
    """(pts, duration, pixels) of the range's frames after the frame at `after` (None: from the range's
    start), in presentation order: what a resumed job and a segment decoded on its own both start from.
    `source`: the input's bytes where it is not at plan.source; pixels=False only lists the frames.
    A frame of another size than the plan's (a stream that changes size midway) is fitted inside the
    plan's size with its aspect kept and black bars; `report` hears of that and of lost packets."""
    start = plan.shift if plan.start else None
    end = plan.ticks(plan.end, plan.time_base)
    target = after if after is not None else start
    seek = target is not None and plan.first_pts is not None and target > plan.first_pts and not plan.jumps
    reformatter = VideoReformatter()
    size = plan.in_hw
    base = report.mark() if report is not None else None
    for attempt in ((True, False) if seek else (False,)):
        overshot = attempt  # until a first frame at or before the target shows that the seek landed well
        before, kept = base, False  # what decoding said before the first frame in the range is not the range's
        for i, (pts, duration, frame) in enumerate(_decoded(plan, target if attempt else None, source, report)):
            if i == 0 and attempt:
                overshot = pts > target  # no index (a .ts): the seek landed past the target, or mid-GOP
                if overshot:
                    break
            if (start is not None and pts < start) or (after is not None and pts <= after):
                before = report.mark() if report is not None else None
                continue
            if not kept and report is not None:
                report.forget(base, before)  # e.g. the missing references of a seek into the middle of a GOP
            kept = True
            if end is not None and pts >= end:
                break
            if (frame.height, frame.width) != size:
                size = (frame.height, frame.width)
                if report is not None:
                    report.resized.append((plan.seconds(pts), size))
            if not pixels:
                yield pts, duration, None
            elif size == plan.in_hw:
                yield pts, duration, reformatter.reformat(frame, format=plan.rgb_format).to_ndarray()
            else:
                yield pts, duration, _fitted(frame, plan, reformatter)
        if not overshot:
            break
        if report is not None:
            report.forget(base, report.mark())


def segment_frames(plan: VideoPlan, decode: bool = False) -> list[int]:
    """The timestamps of the range's frames in presentation order, which cut a job into segments of
    plan.segment_frames. From the packets' timestamps (seconds for hours of video), or, with `decode`
    or where a packet has none, from decoded frames exactly as `frames_after` sees them."""
    if not decode:
        start = plan.shift if plan.start else None
        end = plan.ticks(plan.end, plan.time_base)
        with av.open(str(plan.source)) as inp:
            stream = inp.streams[plan.video_index]
            mend = Mender(plan.jumps, stream.time_base, max(1, round(1 / (plan.rate * plan.time_base))))
            stamps = []
            for p in inp.demux(stream):
                mend(p)
                if p.size or p.pts is not None:
                    stamps.append(p.pts)
        if None not in stamps:
            return [pts for pts in sorted(stamps) if (start is None or pts >= start) and (end is None or pts < end)]
    return [pts for pts, _, _ in frames_after(plan, None, pixels=False)]


def _fitted(frame: av.VideoFrame, plan: VideoPlan, reformatter: VideoReformatter) -> np.ndarray:
    """A frame of another size, scaled to fit inside the plan's frame (aspect kept) and centred on black."""
    h, w = plan.in_hw
    fit = min(w / frame.width, h / frame.height)
    inner_w, inner_h = max(1, min(w, round(frame.width * fit))), max(1, min(h, round(frame.height * fit)))
    inner = reformatter.reformat(frame, format=plan.rgb_format, width=inner_w, height=inner_h).to_ndarray()
    out = np.zeros((h, w, inner.shape[2]), inner.dtype)
    top, left = (h - inner_h) // 2, (w - inner_w) // 2
    out[top:top + inner_h, left:left + inner_w] = inner
    return out


def _decoded(plan: VideoPlan, seek_to: int | None, source: Source = None,
             report: DecodeReport | None = None) -> Iterator[tuple[int, int, av.VideoFrame]]:
    """(pts, duration, frame) of the video stream; a packet that does not decode is skipped, as players
    do, and its time told to `report`. Frames without a timestamp continue from the previous one."""
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    with av.open(source if source is not None else str(plan.source)) as inp, _damage_log() as log:
        stream = inp.streams[plan.video_index]
        stream.thread_type = "AUTO"
        if seek_to is not None:
            inp.seek(seek_to, stream=stream, backward=True)
        step = max(1, round(1 / (plan.rate * plan.time_base)))
        mend = Mender(plan.jumps, stream.time_base, step)
        last = None
        packets = inp.demux(stream)
        seen = 0  # log lines already reported

        def when() -> str:
            return f"{plan.seconds(last, stream.time_base):.2f} s" if last is not None else "the start"

        try:
            while True:
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except av.error.FFmpegError as exc:  # the container itself is damaged past this point
                    if report is not None:
                        report.lost.append(f"the file cannot be read past {when()} ({exc.strerror or 'damaged data'})")
                    break
                mend(packet)
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    if report is not None:
                        stamp = packet.pts if packet.pts is not None else last
                        report.undecodable.append(plan.seconds(stamp, stream.time_base) if stamp is not None else 0.0)
                    continue
                finally:
                    if report is not None and len(log) > seen:  # FFmpeg met damaged data without failing a call
                        if len(report.lost) < MAX_DAMAGE_LINES:
                            report.lost.append(f"damaged data near {when()} ({log[seen][2].strip()})")
                        seen = len(log)
                for frame in frames:
                    pts = frame.pts if frame.pts is not None else (last + step if last is not None else 0)
                    last = pts
                    yield pts, frame.duration or step, frame
        finally:
            _settle(stream.codec_context)
        if report is not None and len(log) > seen and len(report.lost) < MAX_DAMAGE_LINES:
            report.lost.append(f"damaged data near {when()} ({log[seen][2].strip()})")


MAX_DAMAGE_LINES = 5


def _settle(ctx: av.video.codeccontext.VideoCodecContext) -> None:
    """Let a decoder's frame threads finish before it is freed. Freeing waits for them holding the GIL,
    and a thread that is logging an error (through PyAV's callback, which `_damage_log` installs)
    waits for the GIL: a deadlock, met when a job stops decoding early (--end, a seek retried).
    Flushing waits for them with the GIL released."""
    try:
        ctx.flush_buffers()
    except av.error.FFmpegError:
        pass


@contextmanager
def _damage_log() -> Iterator[list[tuple[int, str, str]]]:
    """FFmpeg's error messages while the block runs (PyAV keeps FFmpeg's log off), kept from the terminal."""
    level = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture(False) as log:  # the decoder's own threads log too
            yield log
    finally:
        av.logging.set_level(level)
