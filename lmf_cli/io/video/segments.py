"""Resumable segments: each is encoded by a fresh encoder into a file of our own packet framing
(pts, dts, duration, flags, size, bytes; containers would round or shift variable-frame-rate
timestamps) and recorded in a JSON manifest once closed.

A segment is also a unit of work on its own (`SegmentWork`): the frames after a given timestamp, so
that workers can encode segments in any order; the job's frame timestamps (`INDEX`) say where each
one starts, and the manifest keeps its segments in order of their number, whatever order they came in.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from lmf_cli.errors import InputError
from lmf_cli.files import atomic_write
from lmf_cli.io.video.encoder import SWS_COLORSPACE, open_encoder
from lmf_cli.io.video.plan import VideoPlan

MANIFEST = "manifest.json"
INDEX = "frames.json"  # the job's frame timestamps, kept where segments were encoded out of order
_RECORD = struct.Struct("<qqqBI")  # pts, dts, duration, keyframe, size
_NO_TS = -(1 << 63)


@dataclass
class Manifest:
    """The finished segments of a job, rewritten atomically after each one closes."""

    path: Path
    job: dict[str, Any]
    segments: list[dict[str, Any]] = field(default_factory=list)
    extradata: str | None = None
    complete: bool = False

    @classmethod
    def load(cls, work: Path, job: dict[str, Any]) -> Manifest | None:
        path = work / MANIFEST
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("job") != job:
            raise InputError(f"{work} holds an interrupted job with other settings (input, size, encoder, range "
                             "or model); remove the folder to start over")
        manifest = cls(path, job, data["segments"], data["extradata"], data["complete"])
        names = {s["file"] for s in manifest.segments} | {MANIFEST, INDEX}
        for leftover in work.iterdir():  # a segment cut short by the interruption
            if leftover.name not in names:
                leftover.unlink()
        return manifest

    @property
    def frames(self) -> int:
        return sum(s["frames"] for s in self.segments)

    @property
    def out_bytes(self) -> int:
        return sum(s["bytes"] for s in self.segments)

    @property
    def done(self) -> set[int]:
        """The numbers of the finished segments (records before numbering was kept are in order)."""
        return {s.get("index", i) for i, s in enumerate(self.segments)}

    @property
    def contiguous(self) -> bool:
        return self.done == set(range(len(self.segments)))

    def add(self, record: dict[str, Any], extradata: str, codec: str) -> None:
        """Record a closed segment, in order of its number; every segment must have the same stream headers."""
        if self.extradata is None:
            self.extradata = extradata
        elif self.extradata != extradata:
            raise RuntimeError(f"{codec} wrote different stream headers for two segments")
        self.segments = sorted([*self.segments, record], key=lambda s: s["index"])

    def drop(self, records: list[dict[str, Any]]) -> None:
        """Forget finished segments (and delete their files): they were cut by a wrong index."""
        for record in records:
            self.segments.remove(record)
            (self.path.parent / record["file"]).unlink(missing_ok=True)
        self.complete = self.complete and not records

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))

    def load_index(self) -> list[int] | None:
        """The frame timestamps a cluster run cut this job by, or None."""
        try:
            return json.loads((self.path.parent / INDEX).read_text())
        except (OSError, ValueError):
            return None

    def save_index(self, stamps: list[int]) -> None:
        atomic_write(self.path.parent / INDEX, lambda tmp: tmp.write_text(json.dumps(stamps)))


def segment_name(index: int) -> str:
    return f"segment-{index:05d}.bin"


@dataclass(frozen=True)
class SegmentWork:
    """One segment as a unit of work: the `pts` of its frames, which follow the frame at `after`
    (None: the first segment, from the range's start)."""

    index: int
    after: int | None
    pts: tuple[int, ...]


class SegmentMismatch(InputError):
    """A segment decoded on its own did not hold the frames the job's index says it holds."""


def cut(stamps: list[int], segment_frames: int) -> list[SegmentWork]:
    """The job's frames (timestamps in presentation order) as segments of `segment_frames` each."""
    return [SegmentWork(k, stamps[start - 1] if start else None, tuple(stamps[start:start + segment_frames]))
            for k, start in enumerate(range(0, len(stamps), segment_frames))]


def disagreeing(manifest: Manifest, work: list[SegmentWork]) -> list[dict[str, Any]]:
    """The finished segments that do not hold the frames `work` gives their numbers."""
    wrong = []
    for i, record in enumerate(manifest.segments):
        index = record.get("index", i)
        if index >= len(work) or (record["frames"], record["last_pts"]) != (len(work[index].pts), work[index].pts[-1]):
            wrong.append(record)
    return wrong


class SegmentWriter:
    """One segment: a fresh encoder (so it opens on a keyframe) and its packets, framed."""

    def __init__(self, path: Path, plan: VideoPlan) -> None:
        self.path, self.plan = path, plan
        self.encoder = open_encoder(plan)
        self.file = path.open("wb")
        self.reformatter = VideoReformatter()
        self.frames = self.bytes = 0
        self.last_pts: int | None = None

    def add(self, pts: int, duration: int, pixels: np.ndarray) -> None:
        plan = self.plan
        rgb = av.VideoFrame.from_ndarray(pixels, format=plan.rgb_format)
        frame = self.reformatter.reformat(rgb, format=plan.pix_fmt,
                                          dst_colorspace=SWS_COLORSPACE.get(plan.colour["colorspace"]),
                                          dst_color_range=plan.colour["color_range"])
        for name, value in plan.colour.items():
            setattr(frame, name, value)
        frame.pts, frame.time_base, frame.duration = pts - plan.shift, plan.time_base, duration
        self._write(self.encoder.encode(frame))
        self.frames += 1
        self.last_pts = pts

    def _write(self, packets: list[av.Packet]) -> None:
        for p in packets:
            data = bytes(p)
            self.file.write(_RECORD.pack(_NO_TS if p.pts is None else p.pts, _NO_TS if p.dts is None else p.dts,
                                         p.duration or 0, int(p.is_keyframe), len(data)) + data)
            self.bytes += _RECORD.size + len(data)

    def close(self) -> dict[str, Any]:
        self._write(self.encoder.encode(None))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"file": self.path.name, "frames": self.frames, "last_pts": self.last_pts, "bytes": self.bytes}

    def abort(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def headers(writer: SegmentWriter) -> str:
    """A closed segment's stream headers (extradata), as the manifest keeps them."""
    return base64.b64encode(writer.encoder.extradata or b"").decode()


def read_segment(path: Path, time_base: Fraction) -> Iterator[av.Packet]:
    with path.open("rb") as f:
        while header := f.read(_RECORD.size):
            pts, dts, duration, key, size = _RECORD.unpack(header)
            packet = av.Packet(f.read(size))
            packet.pts = None if pts == _NO_TS else pts
            packet.dts = None if dts == _NO_TS else dts
            packet.duration, packet.is_keyframe, packet.time_base = duration, bool(key), time_base
            yield packet
