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
from dataclasses import dataclass
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
    counted: bool  # `total` is the header's own frame count (MP4, MOV), not an estimate from the duration
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


def _plan_streams(src: Path, inp: av.container.InputContainer, dummy: av.container.OutputContainer,
                  video_index: int, notes: list[str]) -> tuple[StreamPlan, ...]:
    """Copy what the output container can hold as it is; re-encode audio and text subtitles it
    cannot; drop the rest, with a note for each. Every choice is tried on a container in memory
    first (`_try_output`), so that the mux does not fail at the end of the job."""
    muxer = dummy.format.name
    kept = [s for s in inp.streams if s.index != video_index and s.discard != Discard.all  # e.g. MP4's chapters
            and (s.type in ("video", "audio", "subtitle") or (s.type == "attachment" and muxer == "matroska"))]
    samples = _sample_packets(src, {s.index for s in kept if s.type != "attachment"})
    kept_indices = {s.index for s in kept}
    plans = []
    for stream in inp.streams:
        if stream.index == video_index or stream.discard == Discard.all:
            continue
        name = stream.codec_context.name if stream.codec_context is not None else stream.type
        if stream.index not in kept_indices:
            notes.append(f"{stream.type} stream #{stream.index} ({name}) is not copied")
            plans.append(StreamPlan(stream.index, stream.type, "drop", name))
            continue
        sample = samples.get(stream.index)
        copy = StreamPlan(stream.index, stream.type, "copy", name)
        why = _try_output(muxer, stream, copy, sample)
        if why is None:
            plans.append(copy)
            if stream.type == "video" and not stream.disposition & Disposition.attached_pic:
                notes.append(f"video stream #{stream.index} is copied as it is: only the first one is upscaled")
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
        counted = bool(start is None and end is None and stream.frames)
        if counted:
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
        end=end, first_pts=first.pts, total=total, counted=counted, segment_frames=segment_frames, notes=tuple(notes))
    given = {"crf": crf, "preset": preset, "pix_fmt": pix_fmt}
    _check_encoder(plan, [f"{option_name(field)} {value}" for field, value in given.items() if value is not None])
    return plan
