"""Planning a video job: probe the input, choose codec, pixel format, sizes and what happens
to every other stream, before any frame is decoded.
"""

from __future__ import annotations

import io
import os
import re
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np
from av.codec.context import Flags
from av.error import FFmpegError
from av.sidedata.sidedata import Type as SideDataType
from av.stream import Discard, Disposition

from lmf_cli.errors import InputError, OptionError, option_name
from lmf_cli.sizes import plan_size

CODECS = ("libx264", "libx265", "libsvtav1", "ffv1")
DEFAULT_CRF = {"libx264": 18, "libx265": 20, "libsvtav1": 30}  # near-transparent: upscales are for keeping
CRF_RANGE = {"libx264": (0, 51), "libx265": (0, 51), "libsvtav1": (0, 63)}
MAX_SIDES = {"libx264": (16384, 16384), "libsvtav1": (16384, 8704)}  # (width, height) of a frame
MAX_PIXELS = {"libx265": (142_606_336, "16384 x 8704, HEVC level 7.2")}  # luma samples of a frame
X26X_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")
CONTAINERS = (".mkv", ".mp4", ".mov", ".m4v", ".webm")
SEGMENT_FRAMES = 240
AUDIO_CODECS = ("aac", "libopus", "flac")  # for audio a container cannot hold as it is
TEXT_SUBTITLE_CODECS = ("mov_text", "webvtt", "ass", "subrip")
STALE_TAGS = ("duration", "encoder", "bps", "number_of_frames", "number_of_bytes", "_statistics")
SWS_COLORSPACE = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}
_COLOUR = ("color_primaries", "color_trc", "colorspace", "color_range")
Size = float | tuple[int, int] | Callable[[tuple[int, int]], tuple[int, int]]


class FrameUpscaler(Protocol):
    """What video needs of an upscaler (`lmf_cli.Upscaler` is one): frames in and out, and
    the facts a resumed job must match. Kept as a protocol so files never import the API."""

    loaded: Any  # .source: the weights file
    precision: str
    model: Any
    device: Any

    def upscale_batch(self, images: np.ndarray, scale: Any = None, size: tuple[int, int] | None = None, *,
                      tile: int | None = None) -> np.ndarray: ...


COVER_FILES = {"mjpeg": ("cover.jpg", "image/jpeg"), "png": ("cover.png", "image/png")}  # Matroska's names


@dataclass(frozen=True)
class StreamPlan:
    """What becomes of one non-upscaled stream: copy, encode (to `codec`), attach (cover art, as a
    Matroska attachment) or drop."""

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
    counted: bool  # `total` is the header's own frame count (MP4, MOV), not an estimate from the duration
    segment_frames: int
    notes: tuple[str, ...]
    origin: Fraction = Fraction(0)  # seconds: the input's first timestamp (a .ts may start hours in), the output's 0
    jumps: tuple[Fraction, ...] = ()  # seconds added to the video's timestamps after each discontinuity (`Mender`)
    timecode: str | None = None  # the output video's timecode tag: the input's, moved on to --start

    @property
    def display_in(self) -> tuple[int, int]:
        return self.in_hw[::-1] if self.rotated else self.in_hw

    @property
    def display_out(self) -> tuple[int, int]:
        return self.out_hw[::-1] if self.rotated else self.out_hw

    def ticks(self, seconds: float | None, time_base: Fraction) -> int | None:
        """A time given as seconds into the input (--start, --end) as timestamps of a stream: counted
        from the input's first timestamp, as players show it, not from 0 (a .ts starts anywhere)."""
        return None if seconds is None else round((self.origin + Fraction(seconds)) / time_base)

    @property
    def shift(self) -> int:
        """Ticks taken off every video timestamp: the output starts at 0, at --start or the input's start."""
        return self.ticks(self.start or 0, self.time_base)

    def seconds(self, pts: int, time_base: Fraction | None = None) -> float:
        """A timestamp as seconds into the input, for messages."""
        return float(pts * (time_base or self.time_base) - self.origin)

    def key(self, upscaler: FrameUpscaler, tile: int | None, batch: int = 1) -> dict[str, Any]:
        """What a resumed job must share with the interrupted one to give the same file."""
        st = self.source.stat()
        weights = Path(upscaler.loaded.source)
        return {"source": str(self.source.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                "out": list(self.out_hw), "codec": self.codec, "pix_fmt": self.pix_fmt, "options": self.options,
                "global_header": self.global_header, "start": self.start, "end": self.end,
                "segment": self.segment_frames,
                "model": str(weights.resolve()), "model_mtime": weights.stat().st_mtime_ns if weights.exists() else 0,
                "precision": upscaler.precision, "tile": tile, "batch": batch}


JUMP_BACK, JUMP_AHEAD = Fraction(1, 10), 10  # seconds: a stream stepping back or ahead this far has a discontinuity


class Mender:
    """One stream's timestamps, made continuous across the discontinuities of a .ts (files joined with
    `cat`, a broadcast's splice, a counter reset) in the order the packets come: left alone, the
    video's would go back or leap hours, which the mux refuses or plays as a frozen gap. At its
    k-th jump a stream takes the offset the video took at its k-th (so streams stay in step); a
    stream without a match, or one that would still step back, goes on from where it ended.

    `jumps` None: learn them (the planning scan of the video stream); () does nothing."""

    def __init__(self, jumps: tuple[Fraction, ...] | None, time_base: Fraction, step: int = 1) -> None:
        self.learning = jumps is None
        self.offsets = [] if jumps is None else [round(j / time_base) for j in jumps]
        self.active = self.learning or bool(self.offsets)
        self.back, self.ahead = JUMP_BACK / time_base, JUMP_AHEAD / time_base
        self.time_base, self.step = time_base, step
        self.jumps: list[Fraction] = []  # learnt: the offsets, in seconds
        self.at: list[int] = []  # learnt: where each jump is (mended ticks)
        self.k = self.offset = 0
        self.last: int | None = None  # the previous packet's timestamp as read
        self.prev = self.end = None  # ... and mended, and where it ended

    def __call__(self, packet: av.Packet) -> None:
        if not self.active:
            return
        ts = packet.dts if packet.dts is not None else packet.pts
        if ts is not None:
            if self.last is not None and not -self.back <= ts - self.last <= self.ahead and self.end is not None:
                if not self.learning and self.k < len(self.offsets):
                    self.offset = max(self.offsets[self.k], self.end - ts)  # never over the stream's own end
                else:
                    self.offset = self.end - ts
                if self.learning:
                    self.jumps.append(self.offset * self.time_base)
                    self.at.append((packet.pts if packet.pts is not None else ts) + self.offset)
                self.k += 1
            elif packet.dts is not None and self.prev is not None and ts + self.offset < self.prev:  # within a part
                self.offset = self.end - ts
            self.last = ts
            self.prev = ts + self.offset
            self.end = self.prev + (packet.duration or self.step)
        if self.offset:
            packet.pts = None if packet.pts is None else packet.pts + self.offset
            packet.dts = None if packet.dts is None else packet.dts + self.offset


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


_ERRNO = re.compile(r"\[Errno -?\d+\]\s*")
_RETURNED = re.compile(r"\s*returned -?\d+\b")
_CODE = re.compile(r"\b(error)(?: code)?[ :]+(-?\d{2,})\b", re.IGNORECASE)
_LOG_PREFIX = re.compile(r"^(?:\[[^\]]* @ 0x[0-9a-fA-F]+\]\s*)+|^(?:x26[45]|svt)\s*\[\w+\]:\s*", re.IGNORECASE)
_LOG_CHATTER = ("[info]", "[warning]", "[warn]", "[debug]", "using cpu capabilities", "profile ")
_LOG_GENERIC = ("cannot open", "error while opening", "error setting option", "error initializing")
_capture = threading.Lock()


def _ffmpeg_words(code: int) -> str:
    """FFmpeg's words for one of its error numbers (of either sign)."""
    try:
        av.error.err_check(-abs(code))
    except FFmpegError as exc:
        if exc.strerror and not re.search(r"\d{3,}", exc.strerror):
            return exc.strerror
    return "unknown error"


def _readable(text: str) -> str:
    """One line without FFmpeg's error numbers, cut to 160 characters."""
    text = _RETURNED.sub("", _ERRNO.sub("", text))
    text = _CODE.sub(lambda m: f"{m[1]} ({_lower_first(_ffmpeg_words(int(m[2])))})", text)
    text = _lower_first(" ".join(text.split()).rstrip("."))
    return text if len(text) <= 160 else text[:157] + "..."


def _lower_first(text: str) -> str:
    """'Invalid argument' -> 'invalid argument' (it follows a colon or a parenthesis); 'AAC' stays."""
    return text[0].lower() + text[1:] if len(text) > 1 and text[0].isupper() and text[1].islower() else text


def _log_reason(lines: list[str]) -> str | None:
    """The line of a library's output that says why it failed: its own error line, else the first
    that is not chatter or a generic "cannot open"."""
    lines = [line for line in lines if line.strip()]
    errors = [line for line in lines if "[error]" in line.lower()]
    said = [line for line in lines if not any(c in line.lower() for c in _LOG_CHATTER)]
    specific = [line for line in said if not any(g in line.lower() for g in _LOG_GENERIC)]
    for line in errors + specific + said:
        text = _LOG_PREFIX.sub("", line.strip()).strip()
        if text:
            return _readable(text)
    return None


def short_error(exc: BaseException, log: list[str] | None = None) -> str:
    """A readable one-line reason for a failure: what the library printed about it where that was
    caught (`log`, from `library_log`), else FFmpeg's words for the error; never its error numbers
    or the internal call that failed."""
    reason = _log_reason(log) if log else None
    if reason:
        return reason
    if isinstance(exc, FFmpegError):
        logged = getattr(exc, "log", None)
        if isinstance(logged, tuple) and len(logged) == 3 and isinstance(logged[2], str) and logged[2].strip():
            return _readable(logged[2])
        return _readable(exc.strerror or _ffmpeg_words(exc.errno or 0))
    return _readable(str(exc) or type(exc).__name__)


@contextmanager
def library_log() -> Iterator[list[str]]:
    """Keep what FFmpeg and the encoder libraries print while the block runs from the terminal and
    hand it over (in the yielded list, once the block ends): x264, x265 and SVT-AV1 print their
    reasons to the process's stderr and PyAV silences FFmpeg's own log, so a failed open says no
    more than "invalid argument" without this. One capture at a time (it redirects file 2)."""
    lines: list[str] = []
    with _capture:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no stderr to take over
            saved = None
        if saved is None:
            yield lines
            return
        level = av.logging.get_level()
        try:
            with tempfile.TemporaryFile() as tmp:
                os.dup2(tmp.fileno(), 2)
                av.logging.restore_default_callback()  # FFmpeg's log to file 2, without Python in the way
                try:
                    yield lines
                finally:
                    av.logging.set_level(level)
                    os.dup2(saved, 2)
                    tmp.seek(0)
                    lines.extend(tmp.read().decode(errors="replace").splitlines())
        finally:
            os.close(saved)


def clean_tags(metadata: dict[str, str]) -> dict[str, str]:
    """Stream/container tags minus those describing the old encode (durations, statistics)."""
    return {k: v for k, v in metadata.items() if not k.lower().startswith(STALE_TAGS)}


def _open_input(src: Path) -> av.container.InputContainer:
    if not src.is_file():
        raise InputError(f"{src}: no such file")
    try:
        return av.open(str(src))
    except (FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{src}: not a readable video ({short_error(exc)})") from exc


def _first_frame(inp: av.container.InputContainer, stream: av.video.stream.VideoStream, src: Path) -> av.VideoFrame:
    try:
        for packet in inp.demux(stream):
            for frame in packet.decode():
                return frame
    except FFmpegError as exc:
        raise InputError(f"{src}: the video cannot be decoded ({short_error(exc)})") from exc
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


def configure_encoder(ctx: av.video.codeccontext.VideoCodecContext, plan: VideoPlan) -> None:
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


def open_encoder(plan: VideoPlan) -> av.video.codeccontext.VideoCodecContext:
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration at info level
    ctx = av.CodecContext.create(plan.codec, "w")
    configure_encoder(ctx, plan)
    ctx.open()
    return ctx


def default_layout(layout: av.AudioLayout) -> av.AudioLayout:
    """`layout`, or where it only counts channels (PCM from Matroska, NUT or AVI), the usual layout
    for that many: encoders refuse a bare count ("Encoder requires channel layout to be set")."""
    if layout.nb_channels and all(channel.name == "NONE" for channel in layout.channels):
        try:
            return av.AudioLayout(f"{layout.nb_channels}c")
        except ValueError:
            pass
    return layout


class StreamConverter:
    """One stream that is not upscaled, into an output container as its StreamPlan says: copied as
    it is, or decoded and re-encoded (audio; text subtitles). The mux uses it, and planning tries
    it out on a container in memory first."""

    def __init__(self, out: av.container.OutputContainer, stream: av.stream.Stream, sp: StreamPlan) -> None:
        self.source, self.kind, self.index = stream, sp.kind, sp.index
        self.encode = sp.action == "encode"
        if not self.encode:
            self.stream = out.add_stream_from_template(stream)
        elif sp.kind == "audio":
            self.stream = out.add_stream(sp.codec)
            src, ctx = stream.codec_context, self.stream.codec_context
            rates, rate = ctx.codec.audio_rates, src.sample_rate
            ctx.sample_rate = rate if not rates or rate in rates else 48000 if 48000 in rates else max(rates)
            ctx.layout = default_layout(src.layout)
            formats = [f.name for f in ctx.codec.audio_formats or []]
            have = src.format.name if src.format is not None else None
            ctx.format = have if have in formats else next((f for f in formats if f.startswith("flt")), formats[0])
            ctx.time_base = Fraction(1, ctx.sample_rate)
        else:
            if not stream.codec_context.is_open:
                stream.codec_context.open()
            self.stream = out.add_stream(sp.codec)
            self.stream.codec_context.subtitle_header = stream.codec_context.subtitle_header
            self.stream.time_base = stream.time_base or Fraction(1, 1000)
        self.stream.metadata.update(clean_tags(stream.metadata))
        self.stream.disposition = stream.disposition

    def convert(self, packet: av.Packet) -> list[av.Packet]:
        """The output packets for one input packet (timestamps as they are)."""
        if not self.encode:
            packet.stream = self.stream
            return [packet]
        if self.kind == "audio":
            return [p for frame in self.source.codec_context.decode(packet) for p in self.audio(frame)]
        subtitle = self.source.codec_context.decode2(packet)
        if subtitle is None:
            return []
        out = self.stream.codec_context.encode_subtitle(subtitle)
        out.pts, out.dts, out.duration, out.time_base = packet.pts, packet.pts, packet.duration, packet.time_base
        out.stream = self.stream
        return [out]

    def audio(self, frame: av.AudioFrame | None) -> list[av.Packet]:
        """Encode one decoded frame (None: flush the encoder)."""
        packets = self.stream.encode(frame)
        for p in packets:
            p.stream = self.stream
        return packets

    def flush(self) -> list[av.Packet]:
        return self.audio(None) if self.encode and self.kind == "audio" else []


def _fresh(packet: av.Packet) -> av.Packet:
    """A copy of a packet for one trial write (muxing changes a packet's stream and timestamps)."""
    copy = av.Packet(bytes(packet))
    copy.pts, copy.dts, copy.time_base = packet.pts, packet.dts, packet.time_base
    copy.duration, copy.is_keyframe = packet.duration or 0, packet.is_keyframe
    return copy


def _sample_packets(src: Path, indices: set[int], limit: int = 1000) -> dict[int, av.Packet]:
    """The first packet of each of these streams found in the first `limit` packets of the file."""
    found: dict[int, av.Packet] = {}
    if not indices:
        return found
    try:
        with av.open(str(src)) as inp:
            for n, packet in enumerate(inp.demux()):
                if n >= limit or len(found) == len(indices):
                    break
                i = packet.stream_index
                if i in indices and i not in found and packet.size and (packet.pts, packet.dts) != (None, None):
                    found[i] = packet
    except FFmpegError:  # a damaged file: what was found before the damage
        pass
    return found


def _try_output(muxer: str, stream: av.stream.Stream, sp: StreamPlan, sample: av.Packet | None) -> str | None:
    """Write a container in memory holding this stream as `sp` says (header with the encoder opened,
    its first packet, trailer): None if that works, else why not, so that what the mux would refuse
    at the end of a job is known before the job starts."""
    error = None
    with library_log() as log:
        out = av.open(io.BytesIO(), "w", format=muxer)
        try:
            converter = StreamConverter(out, stream, sp)
            out.start_encoding()
            for packet in [*(converter.convert(_fresh(sample)) if sample is not None else []), *converter.flush()]:
                out.mux(packet)
            out.close()
        except Exception as exc:  # a trial: whatever goes wrong rules this choice out, with its reason
            error = exc
        finally:
            try:
                out.close()
            except Exception:  # the trailer that just failed, again
                pass
    return None if error is None else short_error(error, log)


def _check_encoder(plan: VideoPlan, given: list[str]) -> None:
    """Open the video encoder with the plan's settings (and drop it), so that what it refuses is
    refused now, with its reason, and not after every frame is upscaled."""
    codec, (h, w) = plan.codec, plan.out_hw
    shown = f"{w} x {h}" + (" (as stored: the picture is turned 90 degrees)" if plan.rotated else "")
    sides = MAX_SIDES.get(codec)
    if sides and (w > sides[0] or h > sides[1]):
        limit = f"{sides[0]} pixels a side" if sides[0] == sides[1] else f"{sides[0]} x {sides[1]} (width x height)"
        raise InputError(f"{shown} is too large for {codec}: it encodes at most {limit}; ask for a smaller size")
    pixels = MAX_PIXELS.get(codec)
    if pixels and w * h > pixels[0]:
        raise InputError(f"{shown} is too large for {codec}: it encodes at most {pixels[0]:,} pixels a frame "
                         f"({pixels[1]}); ask for a smaller size")
    error = None
    with library_log() as log:
        try:
            open_encoder(plan)
        except (FFmpegError, ValueError) as exc:
            error = exc
    if error is not None:
        hint = f"; check {', '.join(given)}" if given else ""
        raise InputError(f"{codec} cannot encode {shown} {plan.pix_fmt} video: {short_error(error, log)}{hint}") \
            from error


@dataclass(frozen=True)
class Hdr:
    """HDR10's static metadata of the input's first frame: the mastering display (xy of red, green,
    blue and white; luminance max and min, cd/m2) and the light levels (MaxCLL, MaxFALL); `dynamic`
    names per-frame metadata (HDR10+, Dolby Vision) that the new frames cannot keep."""

    primaries: tuple[Fraction, ...] | None = None  # rx, ry, gx, gy, bx, by, wx, wy
    luminance: tuple[Fraction, Fraction] | None = None  # max, min
    light: tuple[int, int] | None = None
    dynamic: tuple[str, ...] = ()

    @classmethod
    def of(cls, frame: av.VideoFrame) -> Hdr:
        mdcv = frame.side_data.get(SideDataType.MASTERING_DISPLAY_METADATA)
        cll = frame.side_data.get(SideDataType.CONTENT_LIGHT_LEVEL)
        primaries = luminance = light = None
        if mdcv is not None and len(bytes(mdcv)) >= 88:  # AVMasteringDisplayMetadata: 10 rationals, 2 flags
            v = struct.unpack("<22i", bytes(mdcv)[:88])
            q = [Fraction(v[i], v[i + 1]) if v[i + 1] else Fraction(0) for i in range(0, 20, 2)]
            primaries = tuple(q[:8]) if v[20] else None
            luminance = (q[9], q[8]) if v[21] else None
        if cll is not None and len(bytes(cll)) >= 8:
            light = struct.unpack("<2I", bytes(cll)[:8])
        dynamic = tuple(name for kind, name in _DYNAMIC_HDR if frame.side_data.get(kind) is not None)
        return cls(primaries, luminance, light, dynamic)

    def params(self, codec: str) -> str | None:
        """The encoder's own parameters for the static metadata (x264, x265 and SVT-AV1 write it in
        the stream), or None where it has none or the codec cannot take it."""
        if self.primaries is None and self.luminance is None and self.light is None:
            return None
        r, g, b, w = (self.primaries[i:i + 2] for i in range(0, 8, 2)) if self.primaries else (None,) * 4
        if codec in ("libx264", "libx265"):  # units of 1/50000 and of 1/10000 cd/m2
            out = []
            if self.primaries and self.luminance:
                xy = "".join(f"{k}({round(x * 50000)},{round(y * 50000)})" for k, (x, y) in
                             (("G", g), ("B", b), ("R", r), ("WP", w)))
                key = "master-display" if codec == "libx265" else "mastering-display"
                out.append(f"{key}={xy}L({round(self.luminance[0] * 10000)},{round(self.luminance[1] * 10000)})")
            if self.light:
                out.append(f"{'max-cll' if codec == 'libx265' else 'cll'}={self.light[0]},{self.light[1]}")
            return ":".join(out) or None
        if codec == "libsvtav1":
            out = []
            if self.primaries and self.luminance:
                xy = "".join(f"{k}({float(x):.5f},{float(y):.5f})" for k, (x, y) in
                             (("G", g), ("B", b), ("R", r), ("WP", w)))
                out.append(f"mastering-display={xy}L({float(self.luminance[0]):.4f},{float(self.luminance[1]):.4f})")
            if self.light:
                out.append(f"content-light={self.light[0]},{self.light[1]}")
            return ":".join(out) or None
        return None


_DYNAMIC_HDR = tuple((getattr(SideDataType, kind), name) for kind, name in
                     (("DYNAMIC_HDR_PLUS", "HDR10+"), ("DOVI_METADATA", "Dolby Vision"),
                      ("DOVI_RPU_BUFFER", "Dolby Vision"), ("DYNAMIC_HDR_VIVID", "HDR Vivid"))
                     if hasattr(SideDataType, kind))
_PARAMS = {"libx264": "x264-params", "libx265": "x265-params", "libsvtav1": "svtav1-params"}


def _hdr_options(codec: str, hdr: Hdr, options: dict[str, str], notes: list[str]) -> dict[str, str]:
    """The options with the input's HDR10 metadata added where the encoder writes it; a note where not."""
    params = hdr.params(codec)
    if params is not None:
        key = _PARAMS[codec]
        options = {**options, key: f"{options[key]}:{params}" if options.get(key) else params}
    elif hdr.primaries or hdr.luminance or hdr.light:
        notes.append(f"the HDR10 mastering display and light levels are not kept: {codec} has no place for them "
                     "(libx265, libsvtav1 and libx264 write them)")
    for name in dict.fromkeys(hdr.dynamic):
        notes.append(f"the {name} metadata is not kept: it describes each original frame, not the upscaled ones "
                     "(the colour tags and HDR10's static metadata are kept)")
    return options


def _encoder_options(codec: str, crf: int | None, preset: str | None, notes: list[str]) -> dict[str, str]:
    if codec == "ffv1":
        if crf is not None or preset is not None:
            notes.append(f"ffv1 is lossless: {option_name('crf')} and {option_name('preset')} do not apply")
        return {"level": "3"}
    low, high = CRF_RANGE[codec]
    if crf is not None and not low <= crf <= high:
        raise OptionError("crf", crf, f"{codec} takes {low} to {high} (lower is better)")
    if preset is not None and codec in ("libx264", "libx265") and preset not in X26X_PRESETS:
        raise OptionError("preset", preset, f"{codec} takes {', '.join(X26X_PRESETS)}")
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
            raise OptionError("pix_fmt", requested, f"{codec} takes {', '.join(supported)}")
        return requested
    if in_fmt in supported:
        return in_fmt
    deep = _bits(in_fmt) > 8
    choice = "yuv420p10le" if deep and "yuv420p10le" in supported else "yuv420p"
    if deep and choice == "yuv420p":
        notes.append(f"{codec} has no 10-bit mode here: the output is 8-bit")
    return choice


def _stream_name(stream: av.stream.Stream) -> str:
    """The codec of a stream as notes name it: data streams have no codec context, only a name (klv)."""
    if stream.codec_context is not None:
        return stream.codec_context.name
    return getattr(stream, "name", None) or stream.type


def _tag(metadata: dict[str, str], key: str) -> str | None:
    """A tag whatever its case (Matroska's are upper case, MP4's lower)."""
    return next((v for k, v in metadata.items() if k.lower() == key), None)


def _plan_streams(src: Path, inp: av.container.InputContainer, dummy: av.container.OutputContainer,
                  video_index: int, notes: list[str]) -> tuple[StreamPlan, ...]:
    """Copy what the output container can hold as it is; re-encode audio and text subtitles it
    cannot; drop the rest, with a note for each. Every choice is tried on a container in memory
    first (`_try_output`), so that the mux does not fail at the end of the job. A timecode track
    (MOV, MP4) is not copied: its timecode goes on the video (`VideoPlan.timecode`), from which
    MOV and MP4 write a new track."""
    muxer = dummy.format.name
    kept = [s for s in inp.streams if s.index != video_index and s.discard != Discard.all  # e.g. MP4's chapters
            and (s.type in ("video", "audio", "subtitle") or (s.type == "attachment" and muxer == "matroska")
                 or (s.type == "data" and _tag(s.metadata, "timecode") is None))]
    samples = _sample_packets(src, {s.index for s in kept if s.type != "attachment"})
    kept_indices = {s.index for s in kept}
    plans = []
    for stream in inp.streams:
        if stream.index == video_index or stream.discard == Discard.all:
            continue
        name = _stream_name(stream)
        if stream.index not in kept_indices:
            timecode = _tag(stream.metadata, "timecode") if stream.type == "data" else None
            if timecode is not None:
                notes.append(f"data stream #{stream.index} (timecode track, {timecode}) " + (
                    "is written anew from the video's timecode" if muxer in ("mov", "mp4") else
                    f"is kept as the video's timecode tag: {muxer} files have no timecode tracks"))
            elif stream.type == "attachment":
                notes.append(f"attachment #{stream.index} ({getattr(stream, 'name', None) or 'unnamed'}) dropped: "
                             f"{muxer} files cannot hold attachments (.mkv files can)")
            else:
                notes.append(f"{stream.type} stream #{stream.index} ({name}) is not copied")
            plans.append(StreamPlan(stream.index, stream.type, "drop", name))
            continue
        if (muxer == "matroska" and stream.type == "video" and stream.disposition & Disposition.attached_pic
                and name in COVER_FILES):  # Matroska keeps cover art as an attachment, not as a stream
            notes.append(f"video stream #{stream.index} ({name}, cover art) is kept as the attachment "
                         f"{COVER_FILES[name][0]}")
            plans.append(StreamPlan(stream.index, stream.type, "attach", name))
            continue
        sample = samples.get(stream.index)
        copy = StreamPlan(stream.index, stream.type, "copy", name)
        why = _try_output(muxer, stream, copy, sample)
        if why is None:
            plans.append(copy)
            if stream.type == "video" and not stream.disposition & Disposition.attached_pic:
                ctx = stream.codec_context
                notes.append(f"video stream #{stream.index} ({name}, {ctx.width} x {ctx.height}) is copied as it "
                             f"is: only stream #{video_index} is upscaled")
            continue
        cannot = f"{muxer} files cannot hold {name}" + (f" ({why})" if name in dummy.supported_codecs else "")
        choices = ()
        if stream.type == "audio":
            choices = AUDIO_CODECS
        elif stream.type == "subtitle" and av.Codec(name, "r").text_sub:
            choices = TEXT_SUBTITLE_CODECS
        failures = []
        for target in (c for c in choices if c in av.codecs_available and c in dummy.supported_codecs):
            encode = StreamPlan(stream.index, stream.type, "encode", target)
            failed = _try_output(muxer, stream, encode, sample)
            if failed is None:
                notes.append(f"{stream.type} stream #{stream.index} ({name}) re-encoded to {target}: {cannot}")
                plans.append(encode)
                break
            failures.append(f"{target}: {failed}")
        else:
            if failures:
                other = "" if muxer == "matroska" else "; .mkv files hold it as it is"
                raise InputError(f"{stream.type} stream #{stream.index} ({name}) cannot be written: {cannot}, and "
                                 f"re-encoding it failed ({'; '.join(failures)}){other}")
            notes.append(f"{stream.type} stream #{stream.index} ({name}) dropped: {muxer} files cannot hold it")
            plans.append(StreamPlan(stream.index, stream.type, "drop", name))
    return tuple(plans)


def packets_from(src: Path, streams: list[int], at: Fraction | None, jumps: tuple[Fraction, ...] = ()
                 ) -> Iterator[av.Packet]:
    """The packets of these streams (indices) of `src`, timestamps mended (`Mender`), from a keyframe
    at or before `at` (seconds on the input's clock; None: from the start). A seek that lands past
    `at` (a .ts has no index: FFmpeg guesses a byte offset) is undone by reading from the start, and
    a timeline with jumps is always read from the start: its timestamps do not say where a time is."""
    seek = at is not None and not jumps
    while True:
        with av.open(str(src)) as inp:
            chosen = [inp.streams[i] for i in streams]
            menders = {s.index: Mender(jumps, s.time_base) for s in chosen}
            if seek:  # a second early: the keyframe before may come after the other streams' packets at `at`
                first = Fraction(inp.start_time or 0, 1_000_000)
                try:
                    inp.seek(int(max(first, at - 1) * 1_000_000), backward=True)
                except FFmpegError:
                    seek = False
            checking, late = seek, False
            for packet in inp.demux(*chosen):
                if packet.stream_index not in menders:  # PyAV's flush packets at the end, for every stream
                    continue
                ts = packet.dts if packet.dts is not None else packet.pts
                if checking and ts is not None and not packet.stream.disposition & Disposition.attached_pic:
                    late, checking = ts * packet.time_base > at, False
                    if late:
                        break
                menders[packet.stream_index](packet)
                yield packet
        if not late:
            return
        seek = False


LONGER = Fraction(1, 2)  # seconds a stream may outlast the video before a note says so


def _note_longer(inp: av.container.InputContainer, streams: tuple[StreamPlan, ...], origin: Fraction,
                 video_end: Fraction | None, end: float | None, notes: list[str]) -> None:
    """Say which kept streams go on past the video's end. They are kept whole, as ffmpeg keeps them:
    speech or music is not cut where the pictures stop, players hold the last frame, and --end cuts
    them with the video for whoever wants that."""
    if video_end is None:
        return
    stop = Fraction(end) if end is not None else None
    said = False
    for sp in streams:
        if sp.action == "drop" or sp.kind not in ("audio", "subtitle", "video"):
            continue
        stream = inp.streams[sp.index]
        if sp.kind == "video" and stream.disposition & Disposition.attached_pic:
            continue
        length, _ = _stream_length(inp, stream) if sp.kind != "video" else (
            stream.duration * stream.time_base if stream.duration else None, None)
        if length is None:
            continue
        begin = stream.start_time * stream.time_base - origin if stream.start_time is not None else Fraction(0)
        last = min(begin + length, stop) if stop is not None else begin + length
        if last > video_end + LONGER:
            said = True
            notes.append(f"{sp.kind} stream #{sp.index} lasts to {float(last):.2f} s, the video to "
                         f"{float(video_end):.2f} s: kept whole, players show the last frame meanwhile "
                         f"({option_name('end')} {float(video_end):.2f} ends it with the video)")
    if not said and inp.duration and any(sp.action != "drop" for sp in streams):
        last = Fraction(inp.duration, 1_000_000)
        last = min(last, stop) if stop is not None else last
        if last > video_end + LONGER:
            notes.append(f"the input's other streams last to {float(last):.2f} s, the video to "
                         f"{float(video_end):.2f} s: kept whole, players show the last frame meanwhile "
                         f"({option_name('end')} {float(video_end):.2f} ends them with the video)")


def _copied_video_from(src: Path, streams: tuple[StreamPlan, ...], start: float, end: float | None,
                       origin: Fraction, jumps: tuple[Fraction, ...], notes: list[str]) -> tuple[StreamPlan, ...]:
    """A video stream copied as it is cannot begin between keyframes (its first frames would need ones
    before --start): the mux begins it at its first keyframe from the start. Say how much later that
    is; drop a stream with no keyframe in the range (none of its frames there would decode)."""
    copied = [sp for sp in streams if sp.kind == "video" and sp.action == "copy"]
    out = list(streams)
    with av.open(str(src)) as inp:
        copied = [sp for sp in copied if not inp.streams[sp.index].disposition & Disposition.attached_pic]
    for sp in copied:
        lo, key = origin + Fraction(start), None
        try:
            for packet in packets_from(src, [sp.index], lo, jumps):
                if packet.pts is None:
                    continue
                at = packet.pts * packet.time_base
                if end is not None and at >= origin + Fraction(end):
                    break
                if at >= lo and packet.is_keyframe:
                    key = at
                    break
        except FFmpegError:
            pass
        if key is None:
            notes.append(f"video stream #{sp.index} ({sp.codec}) dropped: it has no keyframe in the range, so "
                         "none of its frames there could be decoded")
            out[out.index(sp)] = StreamPlan(sp.index, sp.kind, "drop", sp.codec)
        elif key - lo > 0:
            notes.append(f"video stream #{sp.index} ({sp.codec}) begins {float(key - lo):.2f} s after the start, at "
                         "its first keyframe: its frames before that need frames from before the start")
    return tuple(out)


_CLOCK = re.compile(r"^(\d+):(\d\d):(\d\d)(?:[.,](\d+))?$")


def _tag_seconds(text: str | None) -> Fraction | None:
    """Matroska's DURATION tag ('00:01:02.500000000') as seconds."""
    m = _CLOCK.match(text.strip()) if text else None
    if m is None:
        return None
    return (int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])) + (Fraction(int(m[4]), 10 ** len(m[4])) if m[4] else 0)


def _stream_length(inp: av.container.InputContainer, stream: av.stream.Stream) -> tuple[Fraction | None, int | None]:
    """(seconds, frames) the stream lasts, by its own account, not the container's (whose duration is
    its longest stream's: a 5-frame video with 1 s of audio is no 25-frame video): the header's
    duration, Matroska's statistics tags (ffmpeg and mkvmerge write them), else for the video the
    end of its last packets, found by a seek near the end of the file."""
    if stream.duration and stream.time_base:
        return stream.duration * stream.time_base, None
    frames = _tag(stream.metadata, "number_of_frames")
    seconds = _tag_seconds(_tag(stream.metadata, "duration"))
    if seconds is not None or frames is not None or stream.type != "video" or not inp.duration:
        return seconds, int(frames) if frames and frames.isdigit() else None
    tb, first = stream.time_base, stream.start_time or 0
    last = first + int(Fraction(inp.duration, 1_000_000) / tb)
    for back in (0, 10, 120, None):  # seconds before the end; without an index a seek may land past it
        try:
            inp.seek(max(first, last - int(back / tb)) if back is not None else first, stream=stream, backward=True)
            ends = [p.pts + (p.duration or 0) for p in inp.demux(stream) if p.pts is not None]
        except FFmpegError:
            continue
        if ends:
            return (max(ends) - first) * tb, None
    return None, None


def _scan(src: Path, index: int, rate: Fraction) -> tuple[Mender, list[tuple[int, int]]]:
    """The video's packets read through (a .ts, where timestamps may jump): the mender that learnt its
    discontinuities, and the mended (pts, duration) of every packet."""
    with av.open(str(src)) as inp:
        stream = inp.streams[index]
        tb = stream.time_base
        mender = Mender(None, tb, max(1, round(1 / (rate * tb))))
        stamps = []
        try:
            for packet in inp.demux(stream):
                mender(packet)
                if packet.pts is not None and packet.size:
                    stamps.append((packet.pts, packet.duration or mender.step))
        except FFmpegError:  # damaged past here: decoding will say so
            pass
    return mender, stamps


def _moved_timecode(timecode: str, seconds: float, rate: Fraction) -> str | None:
    """An SMPTE timecode ('01:00:00:00', or with ';' drop-frame) `seconds` later; None if unreadable."""
    m = re.match(r"^(\d\d):(\d\d):(\d\d)([:;.,])(\d\d)$", timecode.strip())
    if m is None or not rate:
        return None
    fps = round(rate)
    drop = fps // 15 if m[4] in ";," and fps in (30, 60) else 0  # 29.97 and 59.94 skip 2 or 4 numbers a minute
    h, mi, s, f = int(m[1]), int(m[2]), int(m[3]), int(m[5])
    minutes = 60 * h + mi
    n = (3600 * h + 60 * mi + s) * fps + f - drop * (minutes - minutes // 10) + round(seconds * rate)
    if drop:
        per_10, per_1 = fps * 600 - 9 * drop, fps * 60 - drop
        tens, rest = divmod(n, per_10)
        n += 9 * drop * tens + (drop * ((rest - drop) // per_1) if rest > drop else 0)
    f, s = n % fps, n // fps
    return f"{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}{m[4]}{f:02d}"


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
        origin = Fraction(inp.start_time, 1_000_000) if inp.start_time is not None else Fraction(0)
        hdr = Hdr.of(first)
        jumps: tuple[Fraction, ...] = ()
        lo = round((origin + Fraction(start or 0)) / time_base)
        hi = round((origin + Fraction(end)) / time_base) if end is not None else None
        counted = bool(start is None and end is None and stream.frames)
        video_end = total = None  # seconds into the input where the video ends; frames in the range
        if inp.format.flags & av.format.Flags.ts_discont.value:  # MPEG-TS and PS: read the timestamps through
            mender, stamps = _scan(src, video_index, rate)
            jumps = tuple(mender.jumps)
            if stamps:
                video_end = max(pts + d for pts, d in stamps) * time_base - origin
                total = sum(1 for pts, _ in stamps if pts >= lo and (hi is None or pts < hi)) or None
            if jumps:
                at = ", ".join(f"{float(t * time_base - origin):.2f} s" for t in mender.at[:3])
                more = ", ..." if len(jumps) > 3 else ""
                notes.append(f"the input's timestamps jump {len(jumps)} time{'s' if len(jumps) != 1 else ''} "
                             f"(at {at}{more}: joined files or a broadcast splice): the output's timeline is joined "
                             f"up there, and {option_name('start')} and {option_name('end')} count along it")
        else:
            length, frames = _stream_length(inp, stream)
            video_start = stream.start_time * time_base - origin if stream.start_time is not None else Fraction(0)
            if length is not None:
                video_end = video_start + length
            if counted:
                total = stream.frames
            elif frames is not None and start is None and end is None:
                total = frames
            elif video_end is not None:
                first_at = max(Fraction(start or 0), video_start)
                total = max(1, round(((min(Fraction(end), video_end) if end is not None else video_end) - first_at)
                                     * rate))
            elif inp.duration:
                total = max(1, round((inp.duration / 1e6 - (start or 0)) * rate))
        duration = video_end if video_end is not None else Fraction(inp.duration, 1_000_000) if inp.duration else None
        if start is not None and duration is not None and start >= duration:
            raise InputError(f"the start {start:g} s is past the end of {src} ({float(duration):.2f} s)")
        tagged = [_tag(s.metadata, "timecode") for s in (stream, *inp.streams.data)]
        timecode = next((t for t in tagged if t), None)
        if timecode is not None and start:
            moved = _moved_timecode(timecode, start, rate)
            if moved is not None and moved != timecode:
                notes.append(f"the timecode {timecode} becomes {moved}: the output begins {start:g} s in")
            timecode = moved or timecode

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
                raise OptionError("codec", codec, f"choose one of {', '.join(CODECS)}")
            elif codec not in av.codecs_available:
                raise InputError(f"encoder {codec} is not in this FFmpeg build (PyAV {av.__version__}); "
                                 f"available: {', '.join(available)}")
            try:
                dummy.add_stream(codec)
            except ValueError as exc:
                raise InputError(f"{dummy.format.name} files cannot hold {codec} video") from exc
            streams = _plan_streams(src, inp, dummy, video_index, notes)
            muxer = dummy.format.name
            if not jumps:
                _note_longer(inp, streams, origin, video_end, end, notes)
            if start:
                streams = _copied_video_from(src, streams, start, end, origin, jumps, notes)
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
    options = _encoder_options(codec, crf, preset, notes)
    plan = VideoPlan(
        source=src, video_index=video_index, in_hw=in_hw, out_hw=out_hw, rotated=rotated, codec=codec,
        pix_fmt=out_pix, options=options, rgb_format=rgb_format, time_base=time_base, rate=rate, sar=sar,
        colour=colour, display_matrix=display_matrix, global_header=global_header, muxer=muxer, streams=streams,
        start=start, end=end, first_pts=first.pts, total=total, counted=counted, segment_frames=segment_frames,
        notes=(), origin=origin, jumps=jumps, timecode=timecode)
    with_hdr = _hdr_options(codec, hdr, options, notes)
    if with_hdr != options:  # an older x264 may not know the parameters: the video matters more than the metadata
        try:
            with library_log():
                open_encoder(replace(plan, options=with_hdr))
            plan = replace(plan, options=with_hdr)
        except (FFmpegError, ValueError):
            notes.append(f"the HDR10 mastering display and light levels are not kept: this {codec} does not take them")
    plan = replace(plan, notes=tuple(notes))
    given = {"crf": crf, "preset": preset, "pix_fmt": pix_fmt}
    _check_encoder(plan, [f"{option_name(field)} {value}" for field, value in given.items() if value is not None])
    return plan
