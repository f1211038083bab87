"""Video upscaling: every frame through the model, everything else in the file kept.

Decoding (a thread), the model (the caller's thread) and encoding (a thread) are overlapped
through small bounded queues; frames never touch the disk. The video is encoded into
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

import base64
import heapq
import json
import os
import queue
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from av.codec.context import Flags
from av.error import FFmpegError
from av.sidedata.sidedata import Type as SideDataType
from av.stream import Discard, Disposition
from av.video.reformatter import VideoReformatter

from lmf_cli.api import plan_size
from lmf_cli.checkpoints import atomic_write
from lmf_cli.errors import InputError

if TYPE_CHECKING:
    from lmf_cli.api import Upscaler

CODECS = ("libx264", "libx265", "libsvtav1", "ffv1")
DEFAULT_CRF = {"libx264": 18, "libx265": 20, "libsvtav1": 30}  # near-transparent: upscales are for keeping
CONTAINERS = (".mkv", ".mp4", ".mov", ".m4v", ".webm")
SEGMENT_FRAMES = 240
AUDIO_CODECS = ("aac", "libopus", "flac")  # for audio a container cannot hold as it is
TEXT_SUBTITLE_CODECS = ("mov_text", "webvtt", "ass", "subrip")
MANIFEST = "manifest.json"
_RECORD = struct.Struct("<qqqBI")  # pts, dts, duration, keyframe, size
_NO_TS = -(1 << 63)
_STALE_TAGS = ("duration", "encoder", "bps", "number_of_frames", "number_of_bytes", "_statistics")
_SWS_COLORSPACE = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}
_COLOUR = ("color_primaries", "color_trc", "colorspace", "color_range")
_END = object()

Size = float | tuple[int, int] | Callable[[tuple[int, int]], tuple[int, int]]


@dataclass(frozen=True)
class StreamPlan:
    """What becomes of one non-upscaled stream: copy, encode (to `codec`) or drop."""

    index: int
    kind: str
    action: str
    codec: str


@dataclass(frozen=True)
class VideoPlan:
    """Everything settled before the work starts; sizes are (height, width) of the stored frames."""

    source: Path
    video_index: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    rotated: bool  # the display matrix turns the picture by 90 degrees
    codec: str
    pix_fmt: str
    options: dict[str, str]
    rgb_format: str  # what the model sees: rgb24, rgb48le (16-bit path), rgba or rgba64le
    time_base: Fraction
    rate: Fraction
    sar: Fraction | None
    colour: dict[str, int]
    display_matrix: tuple[int, ...] | None
    global_header: bool  # the container wants stream headers apart (extradata), not in the packets
    muxer: str
    streams: tuple[StreamPlan, ...]
    start: float | None
    end: float | None
    first_pts: int | None
    total: int | None  # frames to upscale, estimated from the header
    segment_frames: int
    notes: tuple[str, ...]

    @property
    def display_in(self) -> tuple[int, int]:
        return self.in_hw[::-1] if self.rotated else self.in_hw

    @property
    def display_out(self) -> tuple[int, int]:
        return self.out_hw[::-1] if self.rotated else self.out_hw

    @property
    def shift(self) -> int:
        """Ticks taken off every video timestamp: --start moves the cut to 0."""
        return round(self.start / self.time_base) if self.start else 0

    def key(self, upscaler: Upscaler, tile: int | None) -> dict[str, Any]:
        """What a resumed job must share with the interrupted one to give the same file."""
        st = self.source.stat()
        weights = Path(upscaler.loaded.source)
        return {"source": str(self.source.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                "out": list(self.out_hw), "codec": self.codec, "pix_fmt": self.pix_fmt, "options": self.options,
                "global_header": self.global_header, "start": self.start, "end": self.end,
                "segment": self.segment_frames,
                "model": str(weights.resolve()), "model_mtime": weights.stat().st_mtime_ns if weights.exists() else 0,
                "precision": upscaler.precision, "tile": tile}


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


def parse_time(text: str) -> float:
    """'90', '1:30' or '00:01:30.5' -> seconds."""
    try:
        parts = [float(p) for p in text.strip().split(":")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 or p != p for p in parts):
        raise InputError(f"time {text!r} must be seconds or [HH:]MM:SS(.ms), e.g. 90 or 1:30.5")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds


def work_dir(dst: str | Path) -> Path:
    """The hidden folder beside the output that holds an unfinished job's segments."""
    dst = Path(dst)
    return dst.with_name(f".{dst.name}.lmf-parts")


def default_suffix(src: str | Path) -> str:
    suffix = Path(src).suffix.lower()
    return suffix if suffix in CONTAINERS else ".mkv"


def available_codecs() -> list[str]:
    return [c for c in CODECS if c in av.codecs_available]


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _tags(metadata: dict[str, str]) -> dict[str, str]:
    """Stream/container tags minus those describing the old encode (durations, statistics)."""
    return {k: v for k, v in metadata.items() if not k.lower().startswith(_STALE_TAGS)}


def _open_input(src: Path) -> av.container.InputContainer:
    if not src.is_file():
        raise InputError(f"{src}: no such file")
    try:
        return av.open(str(src))
    except (FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{src}: not a readable video ({_short(exc)})") from exc


def _first_frame(inp: av.container.InputContainer, stream: av.video.stream.VideoStream, src: Path) -> av.VideoFrame:
    try:
        for packet in inp.demux(stream):
            for frame in packet.decode():
                return frame
    except FFmpegError as exc:
        raise InputError(f"{src}: the video cannot be decoded ({_short(exc)})") from exc
    raise InputError(f"{src}: the video stream has no frames")


def _bits(pix_fmt: str) -> int:
    return max((c.bits for c in av.VideoFormat(pix_fmt).components), default=8)


def _has_alpha(pix_fmt: str) -> bool:
    return any(c.is_alpha for c in av.VideoFormat(pix_fmt).components)


def _chroma_step(pix_fmt: str) -> tuple[int, int]:
    """(rows, cols) the frame size must be a multiple of: 2 for each subsampled chroma axis."""
    fmt = av.VideoFormat(pix_fmt)
    ch, cw = fmt.chroma_height(1024), fmt.chroma_width(1024)
    return (1024 // ch if ch else 1), (1024 // cw if cw else 1)


def _resolve_size(size: Size, display_hw: tuple[int, int]) -> tuple[int, int]:
    if callable(size):
        out = size(display_hw)
    elif isinstance(size, tuple):
        out = size
    else:
        out = plan_size(display_hw, scale=size).out_hw
    return plan_size(display_hw, size=out).out_hw


def _configure(ctx: av.video.codeccontext.VideoCodecContext, plan: VideoPlan) -> None:
    """One configuration for every segment's encoder and the output stream, so their
    headers (extradata) are the same bytes."""
    ctx.width, ctx.height = plan.out_hw[1], plan.out_hw[0]
    ctx.pix_fmt = plan.pix_fmt
    ctx.time_base = plan.time_base
    ctx.framerate = plan.rate
    ctx.bit_rate, ctx.bit_rate_tolerance = 0, 128000
    if plan.sar:
        ctx.sample_aspect_ratio = plan.sar
    for name, value in plan.colour.items():
        setattr(ctx, name, value)
    if plan.global_header:
        ctx.flags |= Flags.global_header
    ctx.options = dict(plan.options)


def _open_encoder(plan: VideoPlan) -> av.video.codeccontext.VideoCodecContext:
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration at info level
    ctx = av.CodecContext.create(plan.codec, "w")
    _configure(ctx, plan)
    ctx.open()
    return ctx


def _encoder_options(codec: str, crf: int | None, preset: str | None, notes: list[str]) -> dict[str, str]:
    if codec == "ffv1":
        if crf is not None or preset is not None:
            notes.append("ffv1 is lossless: --crf and --preset do not apply")
        return {"level": "3"}
    options = {"crf": str(DEFAULT_CRF[codec] if crf is None else crf)}
    if preset is not None:
        options["preset"] = preset
    if codec == "libx265":
        options["x265-params"] = "log-level=error"
    return options


def _pick_pix_fmt(codec: str, in_fmt: str, requested: str | None, notes: list[str]) -> str:
    supported = [f.name for f in av.Codec(codec, "w").video_formats or []]
    if requested is not None:
        if requested not in supported:
            raise InputError(f"--pix-fmt {requested}: {codec} takes {', '.join(supported)}")
        return requested
    if in_fmt in supported:
        return in_fmt
    deep = _bits(in_fmt) > 8
    choice = "yuv420p10le" if deep and "yuv420p10le" in supported else "yuv420p"
    if deep and choice == "yuv420p":
        notes.append(f"{codec} has no 10-bit mode here: the output is 8-bit")
    return choice


def _plan_streams(inp: av.container.InputContainer, dummy: av.container.OutputContainer, video_index: int,
                  notes: list[str]) -> tuple[StreamPlan, ...]:
    """Copy what the output container can hold as it is; re-encode audio and text subtitles it
    cannot; drop the rest, with a note for each."""
    plans = []
    for stream in inp.streams:
        if stream.index == video_index or stream.discard == Discard.all:  # e.g. MP4's chapter track
            continue
        name = stream.codec_context.name if stream.codec_context is not None else stream.type
        if stream.type not in ("video", "audio", "subtitle") and not (
                stream.type == "attachment" and dummy.format.name == "matroska"):
            notes.append(f"{stream.type} stream #{stream.index} ({name}) is not copied")
            plans.append(StreamPlan(stream.index, stream.type, "drop", name))
            continue
        try:
            dummy.add_stream_from_template(stream)
            plans.append(StreamPlan(stream.index, stream.type, "copy", name))
            if stream.type == "video" and not stream.disposition & Disposition.attached_pic:
                notes.append(f"video stream #{stream.index} is copied as it is: only the first one is upscaled")
            continue
        except (ValueError, FFmpegError):
            pass
        choices = ()
        if stream.type == "audio":
            choices = AUDIO_CODECS
        elif stream.type == "subtitle" and av.Codec(name, "r").text_sub:
            choices = TEXT_SUBTITLE_CODECS
        target = next((c for c in choices if c in av.codecs_available and c in dummy.supported_codecs), None)
        if target is None:
            notes.append(f"{stream.type} stream #{stream.index} ({name}) dropped: {dummy.format.name} files "
                         "cannot hold it")
            plans.append(StreamPlan(stream.index, stream.type, "drop", name))
        else:
            notes.append(f"{stream.type} stream #{stream.index} ({name}) re-encoded to {target}: "
                         f"{dummy.format.name} files cannot hold {name}")
            plans.append(StreamPlan(stream.index, stream.type, "encode", target))
    return tuple(plans)


def plan_video(src: str | Path, size: Size, *, suffix: str = ".mkv", codec: str | None = None,
               crf: int | None = None, preset: str | None = None, pix_fmt: str | None = None,
               start: float | None = None, end: float | None = None,
               segment_frames: int = SEGMENT_FRAMES) -> VideoPlan:
    """Read the input's headers and first frame and settle sizes, encoder, streams and range,
    so that every error a user can fix is raised before any work starts.

    `size`: a factor, an exact (height, width), or a function of the displayed (height, width)
    (rotation applied) returning one. `suffix` names the output container (.mkv, .mp4, ...).
    """
    src = Path(src)
    notes: list[str] = []
    if segment_frames < 1:
        raise InputError(f"segment length {segment_frames} must be at least 1 frame")
    if start is not None and end is not None and end <= start:
        raise InputError(f"the end ({end:g} s) must come after the start ({start:g} s)")
    with _open_input(src) as inp:
        stream = next((s for s in inp.streams.video if not s.disposition & Disposition.attached_pic), None)
        if stream is None:
            raise InputError(f"{src}: no video stream")
        first = _first_frame(inp, stream, src)
        in_fmt = first.format.name
        in_hw = (first.height, first.width)
        matrix = first.side_data.get(SideDataType.DISPLAYMATRIX)
        display_matrix = struct.unpack("<9i", bytes(matrix)) if matrix is not None else None
        rotated = abs(round(first.rotation)) % 180 == 90
        ctx = stream.codec_context
        video_index, sar = stream.index, stream.sample_aspect_ratio  # read now: closing frees the stream
        colour = {name: int(getattr(first, name) or getattr(ctx, name) or 0) for name in _COLOUR}
        time_base = stream.time_base or Fraction(1, 90000)
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        duration = (float(stream.duration * time_base) if stream.duration
                    else inp.duration / 1e6 if inp.duration else None)
        if start is not None and duration is not None and start >= duration:
            raise InputError(f"the start {start:g} s is past the end of {src} ({duration:.2f} s)")
        if start is None and end is None and stream.frames:
            total = stream.frames
        elif duration is not None:
            total = max(1, round(((min(end, duration) if end else duration) - (start or 0)) * rate))
        else:
            total = None

        try:
            dummy = av.open(f"lmf-probe{suffix}", "w")
        except (FFmpegError, ValueError) as exc:
            raise InputError(f"cannot tell the container from {suffix!r}; use one of {', '.join(CONTAINERS)}") from exc
        with dummy:
            available = available_codecs()
            if codec is None:
                codec = next((c for c in available if c in dummy.supported_codecs), None)
                if codec is None:
                    raise InputError(f"{dummy.format.name} files hold none of the encoders in this build "
                                     f"({', '.join(available)}); use one of {', '.join(CONTAINERS)}")
            elif codec not in CODECS:
                raise InputError(f"--codec {codec}: choose one of {', '.join(CODECS)}")
            elif codec not in av.codecs_available:
                raise InputError(f"encoder {codec} is not in this FFmpeg build (PyAV {av.__version__}); "
                                 f"available: {', '.join(available)}")
            try:
                dummy.add_stream(codec)
            except ValueError as exc:
                raise InputError(f"{dummy.format.name} files cannot hold {codec} video") from exc
            streams = _plan_streams(inp, dummy, video_index, notes)
            muxer = dummy.format.name
            global_header = bool(dummy.format.flags & av.format.Flags.global_header.value)

    out_pix = _pick_pix_fmt(codec, in_fmt, pix_fmt, notes)
    deep = max(_bits(in_fmt), _bits(out_pix)) > 8
    alpha = _has_alpha(in_fmt) and _has_alpha(out_pix)
    if _has_alpha(in_fmt) and not alpha:
        notes.append(f"the alpha channel is dropped: {codec} {out_pix} has none")
    rgb_format = ("rgba64le" if alpha else "rgb48le") if deep else ("rgba" if alpha else "rgb24")

    display_in = in_hw[::-1] if rotated else in_hw
    want = _resolve_size(size, display_in)
    wanted = want[::-1] if rotated else want
    step = _chroma_step(out_pix)
    out_hw = (-(-wanted[0] // step[0]) * step[0], -(-wanted[1] // step[1]) * step[1])
    if out_hw != wanted:
        shown = out_hw[::-1] if rotated else out_hw
        notes.append(f"{out_pix} needs even sizes: {want[1]} x {want[0]} rounded up to {shown[1]} x {shown[0]}")
    plan = VideoPlan(
        source=src, video_index=video_index, in_hw=in_hw, out_hw=out_hw, rotated=rotated, codec=codec,
        pix_fmt=out_pix, options=_encoder_options(codec, crf, preset, notes), rgb_format=rgb_format,
        time_base=time_base, rate=rate, sar=sar, colour=colour,
        display_matrix=display_matrix, global_header=global_header, muxer=muxer, streams=streams, start=start,
        end=end, first_pts=first.pts, total=total, segment_frames=segment_frames, notes=tuple(notes))
    try:
        _open_encoder(plan)  # opened and dropped: the encoder checks the settings now, not after hours
    except (FFmpegError, ValueError) as exc:
        raise InputError(f"{codec} refused these settings ({_short(exc)}); check --crf, --preset and "
                         "--pix-fmt") from exc
    return plan


@dataclass
class _Manifest:
    """The finished segments of a job, rewritten atomically after each one closes."""

    path: Path
    job: dict[str, Any]
    segments: list[dict[str, Any]] = field(default_factory=list)
    extradata: str | None = None
    complete: bool = False

    @classmethod
    def load(cls, work: Path, job: dict[str, Any]) -> _Manifest | None:
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


class _SegmentWriter:
    """One segment: a fresh encoder (so it opens on a keyframe) and its packets, framed."""

    def __init__(self, path: Path, plan: VideoPlan) -> None:
        self.path, self.plan = path, plan
        self.encoder = _open_encoder(plan)
        self.file = path.open("wb")
        self.reformatter = VideoReformatter()
        self.frames = self.bytes = 0
        self.last_pts: int | None = None

    def add(self, pts: int, duration: int, pixels: np.ndarray) -> None:
        plan = self.plan
        rgb = av.VideoFrame.from_ndarray(pixels, format=plan.rgb_format)
        frame = self.reformatter.reformat(rgb, format=plan.pix_fmt,
                                          dst_colorspace=_SWS_COLORSPACE.get(plan.colour["colorspace"]),
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


def _read_segment(path: Path, time_base: Fraction) -> Iterator[av.Packet]:
    with path.open("rb") as f:
        while header := f.read(_RECORD.size):
            pts, dts, duration, key, size = _RECORD.unpack(header)
            packet = av.Packet(f.read(size))
            packet.pts = None if pts == _NO_TS else pts
            packet.dts = None if dts == _NO_TS else dts
            packet.duration, packet.is_keyframe, packet.time_base = duration, bool(key), time_base
            yield packet


class _Stopped(Exception):
    """A worker thread was told to stop (interrupt or error elsewhere)."""


class _Pipeline:
    """decode thread -> queue -> model (this thread) -> queue -> encode thread."""

    def __init__(self, plan: VideoPlan, upscaler: Upscaler, manifest: _Manifest, tile: int | None,
                 progress: Callable[[VideoProgress], None] | None) -> None:
        self.plan, self.up, self.manifest, self.tile, self.progress = plan, upscaler, manifest, tile, progress
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.writer: _SegmentWriter | None = None
        self.done = manifest.frames
        self.segments = len(manifest.segments)

    def run(self) -> None:
        frames: queue.Queue = queue.Queue(maxsize=4)
        upscaled: queue.Queue = queue.Queue(maxsize=4)
        workers = [threading.Thread(target=self._guard, args=(self._decode, frames), daemon=True),
                   threading.Thread(target=self._guard, args=(self._encode, upscaled), daemon=True)]
        for worker in workers:
            worker.start()
        t0, fresh = time.perf_counter(), 0
        try:
            while (item := self._get(frames)) is not _END:
                pts, duration, pixels = item
                big = self.up.upscale(pixels, size=self.plan.out_hw, tile=self.tile)
                self._put(upscaled, (pts, duration, big))
                self.done, fresh = self.done + 1, fresh + 1
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
                raise InputError(f"{self.plan.source}: {_short(exc)}") from exc
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
        plan = self.plan
        segments = self.manifest.segments
        after = segments[-1]["last_pts"] if segments else None
        start = plan.shift if plan.start else None
        end = round(plan.end / plan.time_base) if plan.end is not None else None
        target = after if after is not None else start
        seek = target is not None and plan.first_pts is not None and target > plan.first_pts
        reformatter = VideoReformatter()
        for attempt in ((True, False) if seek else (False,)):
            overshot = False
            for i, (pts, duration, frame) in enumerate(_decoded(plan, target if attempt else None)):
                if i == 0 and attempt and pts > target:  # no index: the seek landed past the target
                    overshot = True
                    break
                if (start is not None and pts < start) or (after is not None and pts <= after):
                    continue
                if end is not None and pts >= end:
                    break
                pixels = reformatter.reformat(frame, format=plan.rgb_format).to_ndarray()
                self._put(out, (pts, duration, pixels))
            if not overshot:
                break
        self._put(out, _END)

    def _encode(self, source: queue.Queue) -> None:
        manifest = self.manifest
        try:
            while (item := self._get(source)) is not _END:
                if self.writer is None:
                    path = manifest.path.parent / f"segment-{len(manifest.segments):05d}.bin"
                    self.writer = _SegmentWriter(path, self.plan)
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
        record = writer.close()
        extradata = base64.b64encode(writer.encoder.extradata or b"").decode()
        if manifest.extradata is None:
            manifest.extradata = extradata
        elif manifest.extradata != extradata:
            raise RuntimeError(f"{self.plan.codec} wrote different stream headers for two segments")
        manifest.segments.append(record)
        manifest.save()
        self.writer = None
        self.segments += 1


def _decoded(plan: VideoPlan, seek_to: int | None) -> Iterator[tuple[int, int, av.VideoFrame]]:
    """(pts, duration, frame) of the video stream; a packet that does not decode is skipped,
    as players do. Frames without a timestamp continue from the previous one."""
    with av.open(str(plan.source)) as inp:
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


def _mux(plan: VideoPlan, manifest: _Manifest, tmp: Path) -> None:
    """Segments + the input's other streams, cut to the range, into `tmp`."""
    with av.open(str(plan.source)) as inp, av.open(str(tmp), "w", format=plan.muxer) as out:
        out.metadata.update(_tags(inp.metadata))
        video_in = inp.streams[plan.video_index]
        video = out.add_stream(plan.codec, rate=plan.rate)
        _configure(video.codec_context, plan)
        video.time_base = plan.time_base
        video.metadata.update(_tags(video_in.metadata))
        video.disposition = video_in.disposition
        if plan.display_matrix is not None:
            video.set_display_matrix(plan.display_matrix)
        routes = {}
        for sp in plan.streams:
            if sp.action != "drop":
                routes[sp.index] = _Route(out, inp.streams[sp.index], sp, plan)
        out.set_chapters(_chapters(inp, plan))
        out.start_encoding()
        if base64.b64encode(video.codec_context.extradata or b"").decode() != (manifest.extradata or ""):
            raise RuntimeError(f"{plan.codec} wrote other stream headers for the output than for its segments")
        last_dts = None
        for packet in heapq.merge(_video_packets(plan, manifest, video), _other_packets(inp, plan, routes),
                                  key=_when):
            if packet.stream is video and packet.dts is not None:
                if last_dts is not None and packet.dts <= last_dts:  # two encoders' B-frame delays meet
                    packet.dts = min(last_dts + 1, packet.pts) if packet.pts is not None else last_dts + 1
                last_dts = packet.dts
            out.mux(packet)
        for route in routes.values():
            out.mux(route.flush())


def _when(packet: av.Packet) -> float:
    ts = packet.dts if packet.dts is not None else packet.pts
    return float(ts * packet.time_base) if ts is not None else 0.0


def _video_packets(plan: VideoPlan, manifest: _Manifest, stream: av.video.stream.VideoStream) -> Iterator[av.Packet]:
    for segment in manifest.segments:
        for packet in _read_segment(manifest.path.parent / segment["file"], plan.time_base):
            packet.stream = stream
            yield packet


def _other_packets(inp: av.container.InputContainer, plan: VideoPlan, routes: dict[int, _Route]) -> Iterator[av.Packet]:
    if not routes:
        return
    if plan.start:
        inp.seek(int(plan.start * 1_000_000), backward=True)
    for packet in inp.demux(*(inp.streams[i] for i in routes)):
        if packet.pts is None and packet.dts is None:
            continue
        yield from routes[packet.stream_index](packet)


def _chapters(inp: av.container.InputContainer, plan: VideoPlan) -> list[dict[str, Any]]:
    kept = []
    for ch in inp.chapters():
        lo = round((plan.start or 0) / ch["time_base"])
        hi = round(plan.end / ch["time_base"]) if plan.end is not None else None
        start, end = max(ch["start"], lo), min(ch["end"], hi) if hi is not None else ch["end"]
        if end > start:
            kept.append({**ch, "start": start - lo, "end": end - lo})
    return kept


class _Route:
    """One non-video stream: its packets cut to the range, shifted, then copied or re-encoded."""

    def __init__(self, out: av.container.OutputContainer, stream: av.stream.Stream, sp: StreamPlan,
                 plan: VideoPlan) -> None:
        self.source, self.kind = stream, sp.kind
        tb = stream.time_base or Fraction(1, 1000)
        self.lo = round(plan.start / tb) if plan.start else None
        self.hi = round(plan.end / tb) if plan.end is not None else None
        self.shift = self.lo or 0
        self.encode = sp.action == "encode"
        if not self.encode:
            self.stream = out.add_stream_from_template(stream)
        elif sp.kind == "audio":
            self.stream = out.add_stream(sp.codec)
            codec, ctx = self.stream.codec_context.codec, self.stream.codec_context
            rates = codec.audio_rates
            rate = stream.codec_context.sample_rate
            ctx.sample_rate = rate if not rates or rate in rates else 48000 if 48000 in rates else max(rates)
            ctx.layout = stream.codec_context.layout
            formats = [f.name for f in codec.audio_formats or []]
            ctx.format = (stream.codec_context.format.name if stream.codec_context.format.name in formats
                          else next((f for f in formats if f.startswith("flt")), formats[0]))
            ctx.time_base = Fraction(1, ctx.sample_rate)
        else:
            stream.codec_context.open()
            self.stream = out.add_stream(sp.codec)
            self.stream.codec_context.subtitle_header = stream.codec_context.subtitle_header
            self.stream.time_base = tb
        self.stream.metadata.update(_tags(stream.metadata))
        self.stream.disposition = stream.disposition

    def __call__(self, packet: av.Packet) -> list[av.Packet]:
        pts = packet.pts if packet.pts is not None else packet.dts
        if self.hi is not None and pts >= self.hi:
            return []
        if self.lo is not None and pts < self.lo:
            if self.kind != "subtitle" or pts + (packet.duration or 0) <= self.lo:
                return []
            packet.duration -= self.lo - pts  # a subtitle already on screen at the cut starts with it
            packet.pts = packet.dts = pts = self.lo
        if self.shift:
            packet.pts = None if packet.pts is None else packet.pts - self.shift
            packet.dts = None if packet.dts is None else packet.dts - self.shift
        if not self.encode:
            packet.stream = self.stream
            return [packet]
        if self.kind == "audio":
            frames = self.source.codec_context.decode(packet)
            return [p for f in frames for p in self._audio(f)]
        subtitle = self.source.codec_context.decode2(packet)
        if subtitle is None:
            return []
        out = self.stream.codec_context.encode_subtitle(subtitle)
        out.pts, out.dts, out.duration, out.time_base = packet.pts, packet.pts, packet.duration, packet.time_base
        out.stream = self.stream
        return [out]

    def _audio(self, frame: av.AudioFrame | None) -> list[av.Packet]:
        packets = self.stream.encode(frame)
        for p in packets:
            p.stream = self.stream
        return packets

    def flush(self) -> list[av.Packet]:
        return self._audio(None) if self.encode and self.kind == "audio" else []


def run_video(plan: VideoPlan, dst: str | Path, upscaler: Upscaler, *, overwrite: bool = False,
              resume: bool = False, tile: int | None = None,
              progress: Callable[[VideoProgress], None] | None = None) -> VideoResult:
    """Upscale the planned video into `dst`. The output appears only when complete; an
    interruption keeps the finished segments for `resume=True`."""
    dst = Path(dst)
    if dst.exists():
        if os.path.samefile(dst, plan.source):
            raise InputError(f"refusing to write over the input {dst}")
        if not overwrite:
            raise InputError(f"{dst} exists (--overwrite replaces it)")
    work = work_dir(dst)
    job = plan.key(upscaler, tile)
    manifest = _Manifest.load(work, job) if resume else None
    if manifest is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        manifest = _Manifest(work / MANIFEST, job)
        manifest.save()
    resumed = manifest.frames
    t0 = time.perf_counter()
    if not manifest.complete:
        _Pipeline(plan, upscaler, manifest, tile, progress).run()
    seconds = time.perf_counter() - t0
    if not manifest.frames:
        shutil.rmtree(work)
        raise InputError(f"{plan.source}: no video frames in the requested range")
    try:
        atomic_write(dst, lambda tmp: _mux(plan, manifest, tmp))
    except (FFmpegError, OSError) as exc:
        raise InputError(f"cannot write {dst} ({_short(exc)})") from exc
    shutil.rmtree(work)
    return VideoResult(dst, manifest.frames, resumed, seconds, dst.stat().st_size)


def upscale_video(src: str | Path, dst: str | Path, upscaler: Upscaler, size: Size, *, codec: str | None = None,
                  crf: int | None = None, preset: str | None = None, pix_fmt: str | None = None,
                  start: float | None = None, end: float | None = None, overwrite: bool = False,
                  resume: bool = False, tile: int | None = None, segment_frames: int = SEGMENT_FRAMES,
                  progress: Callable[[VideoProgress], None] | None = None) -> VideoResult:
    """plan_video + run_video in one call: the output container follows `dst`'s extension."""
    plan = plan_video(src, size, suffix=Path(dst).suffix, codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt,
                      start=start, end=end, segment_frames=segment_frames)
    return run_video(plan, dst, upscaler, overwrite=overwrite, resume=resume, tile=tile, progress=progress)
