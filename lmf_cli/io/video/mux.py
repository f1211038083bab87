"""Muxing: the finished segments and the input's audio, subtitle and data streams, with
chapters and tags, into one temp file that is renamed onto the output.
"""

from __future__ import annotations

import base64
import heapq
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.error import FFmpegError
from av.stream import Disposition

from lmf_cli.io.video.encoder import configure_encoder
from lmf_cli.io.video.errors import library_log, short_error
from lmf_cli.io.video.plan import VideoPlan
from lmf_cli.io.video.segments import Manifest, read_segment
from lmf_cli.io.video.streams import COVER_FILES, StreamConverter, StreamPlan, clean_tags, packets_from


def mux(plan: VideoPlan, manifest: Manifest, tmp: Path) -> None:
    """Segments + the input's other streams, cut to the range, into `tmp`. A failure is a MuxError
    (an OSError) whose message says which stream or step failed and why, in one line."""
    with av.open(str(plan.source)) as inp:
        out = av.open(str(tmp), "w", format=plan.muxer)
        try:
            _mux(plan, manifest, inp, out)
            _step(f"cannot finish the {plan.muxer} file", out.close)  # the trailer: MP4 writes its index here
        finally:
            try:
                out.close()
            except FFmpegError:  # closing after another failure: that one is reported
                pass


def _mux(plan: VideoPlan, manifest: Manifest, inp: av.container.InputContainer,
         out: av.container.OutputContainer) -> None:
    out.metadata.update(clean_tags(inp.metadata))
    video_in = inp.streams[plan.video_index]
    video = out.add_stream(plan.codec, rate=plan.rate)
    configure_encoder(video.codec_context, plan)
    video.time_base = plan.time_base
    video.metadata.update({k: v for k, v in clean_tags(video_in.metadata).items() if k.lower() != "timecode"})
    if plan.timecode is not None:  # the input's, moved to --start; MOV and MP4 write a timecode track from it
        video.metadata["timecode"] = plan.timecode
    video.disposition = video_in.disposition
    if plan.display_matrix is not None:
        video.set_display_matrix(plan.display_matrix)
    routes = {}
    for sp in plan.streams:
        if sp.action == "attach":
            _attach_cover(out, plan, sp)
        elif sp.action != "drop":
            routes[sp.index] = _Route.open(out, inp.streams[sp.index], sp, plan)
    written = {route.stream.index: route for route in routes.values()}
    out.set_chapters(_chapters(inp, plan))
    _step(f"cannot start the {plan.muxer} file", out.start_encoding)  # the header; opens the encoders
    if base64.b64encode(video.codec_context.extradata or b"").decode() != (manifest.extradata or ""):
        raise RuntimeError(f"{plan.codec} wrote other stream headers for the output than for its segments")
    last_dts = None
    for packet in heapq.merge(_video_packets(plan, manifest, video), _other_packets(inp, plan, routes), key=_when):
        if packet.stream is video and packet.dts is not None:
            if last_dts is not None and packet.dts <= last_dts:  # two encoders' B-frame delays meet
                packet.dts = min(last_dts + 1, packet.pts) if packet.pts is not None else last_dts + 1
            last_dts = packet.dts
        _write(out, packet, written)
    for route in routes.values():
        for packet in route.flush():
            _write(out, packet, written)


class MuxError(OSError):
    """The mux failed: the message names the stream or step and says why, in one line."""


def _step(what: str, call: Callable[[], object]) -> None:
    """A step where FFmpeg and the encoders say why they fail only in their log: caught and told."""
    with library_log() as log:
        try:
            call()
        except FFmpegError as exc:
            error = exc
        else:
            return
    raise MuxError(f"{what}: {short_error(error, log)}") from error


def _write(out: av.container.OutputContainer, packet: av.Packet, routes: dict[int, _Route]) -> None:
    try:
        out.mux(packet)
    except FFmpegError as exc:
        route = routes.get(packet.stream.index)
        if route is None:  # the video
            raise MuxError(f"video: {short_error(exc)}") from exc
        raise route.failed(exc) from exc


def _when(packet: av.Packet) -> float:
    ts = packet.dts if packet.dts is not None else packet.pts
    return float(ts * packet.time_base) if ts is not None else 0.0


def _video_packets(plan: VideoPlan, manifest: Manifest, stream: av.video.stream.VideoStream) -> Iterator[av.Packet]:
    for segment in manifest.segments:
        for packet in read_segment(manifest.path.parent / segment["file"], plan.time_base):
            packet.stream = stream
            yield packet


def _other_packets(inp: av.container.InputContainer, plan: VideoPlan, routes: dict[int, _Route]) -> Iterator[av.Packet]:
    """The other streams' packets, timestamps mended as the video's were, from the range's start."""
    if not routes:
        return
    at = plan.origin + Fraction(plan.start) if plan.start else None
    for packet in packets_from(plan.source, list(routes), at, plan.jumps):
        route = routes[packet.stream_index]
        if packet.pts is None and packet.dts is None and not (route.picture and packet.size):
            continue  # (cover art comes without a time: it was dropped with them)
        yield from route(packet)


def _attach_cover(out: av.container.OutputContainer, plan: VideoPlan, sp: StreamPlan) -> None:
    """Cover art (a picture stream of MP4) as Matroska keeps it: an attachment named cover.jpg or cover.png."""
    picture = next((bytes(p) for p in packets_from(plan.source, [sp.index], None) if p.size), None)
    if picture is not None:
        out.add_attachment(*COVER_FILES[sp.codec], picture)


def _chapters(inp: av.container.InputContainer, plan: VideoPlan) -> list[dict[str, Any]]:
    kept = []
    for ch in inp.chapters():
        lo = plan.ticks(plan.start or 0, ch["time_base"])
        hi = plan.ticks(plan.end, ch["time_base"])
        start, end = max(ch["start"], lo), min(ch["end"], hi) if hi is not None else ch["end"]
        if end > start:
            kept.append({**ch, "start": start - lo, "end": end - lo})
    return kept


class _Route(StreamConverter):
    """One non-video stream: its packets cut to the range, shifted, then copied or re-encoded."""

    def __init__(self, out: av.container.OutputContainer, stream: av.stream.Stream, sp: StreamPlan,
                 plan: VideoPlan) -> None:
        super().__init__(out, stream, sp)
        self.what = f"{sp.kind} stream #{sp.index} ({stream.codec_context.name if stream.codec_context else sp.kind})"
        tb = stream.time_base or Fraction(1, 1000)
        self.lo = plan.ticks(plan.start, tb) if plan.start else None
        self.hi = plan.ticks(plan.end, tb)
        self.shift = plan.ticks(plan.start or 0, tb)
        self.end = plan.end - (plan.start or 0) if plan.end is not None else None  # seconds, once shifted
        self.picture = bool(stream.disposition & Disposition.attached_pic)  # cover art: one packet, for any range
        self.keyless = sp.kind == "video" and not self.encode and not self.picture  # copied video starts on a key

    @classmethod
    def open(cls, out: av.container.OutputContainer, stream: av.stream.Stream, sp: StreamPlan,
             plan: VideoPlan) -> _Route:
        try:
            return cls(out, stream, sp, plan)
        except (FFmpegError, ValueError) as exc:
            raise MuxError(f"{sp.kind} stream #{sp.index} ({sp.codec}): {short_error(exc)}") from exc

    def failed(self, exc: BaseException) -> MuxError:
        return MuxError(f"{self.what}: {short_error(exc)}")

    def __call__(self, packet: av.Packet) -> list[av.Packet]:
        if self.picture:
            packet.pts = packet.dts = 0
            return self.convert(packet)
        pts = packet.pts if packet.pts is not None else packet.dts
        if self.hi is not None and pts >= self.hi:
            return []
        if self.keyless:
            if not packet.is_keyframe or (self.lo is not None and pts < self.lo):
                return []
            self.keyless = False
        if self.lo is not None and pts < self.lo:
            if self.kind != "subtitle" or pts + (packet.duration or 0) <= self.lo:
                return []
            packet.duration -= self.lo - pts  # a subtitle already on screen at the cut starts with it
            packet.pts = packet.dts = pts = self.lo
        if self.hi is not None and self.kind == "subtitle" and packet.duration and pts + packet.duration > self.hi:
            packet.duration = self.hi - pts  # and one still on screen at the end leaves with the video
        if self.shift:
            packet.pts = None if packet.pts is None else packet.pts - self.shift
            packet.dts = None if packet.dts is None else packet.dts - self.shift
        try:
            return self.convert(packet)
        except FFmpegError as exc:
            raise self.failed(exc) from exc

    def flush(self) -> list[av.Packet]:
        try:
            return super().flush()
        except FFmpegError as exc:
            raise self.failed(exc) from exc

    def audio(self, frame: av.AudioFrame | None) -> list[av.Packet]:
        if frame is not None and self.end is not None:
            frame = _before(frame, self.end)
            if frame is None:
                return []
        return super().audio(frame)


def _before(frame: av.AudioFrame, end: float) -> av.AudioFrame | None:
    """The samples of a decoded frame before `end` (seconds): re-encoded audio ends with the video."""
    if frame.pts is None or frame.time_base is None or not frame.sample_rate:
        return frame
    keep = round((end - frame.pts * frame.time_base) * frame.sample_rate)
    if keep >= frame.samples:
        return frame
    if keep <= 0:
        return None
    data = frame.to_ndarray()
    data = data[:, :keep] if frame.format.is_planar else data[:, :keep * frame.layout.nb_channels]
    cut = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=frame.format.name, layout=frame.layout)
    cut.sample_rate, cut.pts, cut.time_base = frame.sample_rate, frame.pts, frame.time_base
    return cut
