"""Resumable segments: each is encoded by a fresh encoder into a file of our own packet framing
(pts, dts, duration, flags, size, bytes; containers would round or shift variable-frame-rate
timestamps) and recorded in a JSON manifest once closed.
"""

from __future__ import annotations

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
from lmf_cli.io.video.plan import SWS_COLORSPACE, VideoPlan, open_encoder

MANIFEST = "manifest.json"
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
                             "or model); run without --resume to start over")
        manifest = cls(path, job, data["segments"], data["extradata"], data["complete"])
        names = {s["file"] for s in manifest.segments} | {MANIFEST}
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

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


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


def read_segment(path: Path, time_base: Fraction) -> Iterator[av.Packet]:
    with path.open("rb") as f:
        while header := f.read(_RECORD.size):
            pts, dts, duration, key, size = _RECORD.unpack(header)
            packet = av.Packet(f.read(size))
            packet.pts = None if pts == _NO_TS else pts
            packet.dts = None if dts == _NO_TS else dts
            packet.duration, packet.is_keyframe, packet.time_base = duration, bool(key), time_base
            yield packet
