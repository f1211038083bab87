"""Planning a video job: probe the input, choose codec, pixel format, sizes and what happens
to every other stream, before any frame is decoded. The encoder's choices are made in `encoder`,
the other streams' in `streams`; this module reads the input and settles them into one VideoPlan.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
from av.error import FFmpegError
from av.sidedata.sidedata import Type as SideDataType
from av.stream import Disposition

from lmf_cli.errors import InputError, OptionError, option_name
from lmf_cli.io.video.encoder import (
    CODECS,
    Hdr,
    available_codecs,
    bits,
    check_encoder,
    encoder_options,
    hdr_options,
    open_encoder,
    pick_pix_fmt,
)
from lmf_cli.io.video.errors import library_log, short_error
from lmf_cli.io.video.streams import StreamPlan, copied_video_from, note_longer, plan_streams, stream_length, tag
from lmf_cli.io.video.timeline import Mender
from lmf_cli.sizes import plan_size

CONTAINERS = (".mkv", ".mp4", ".mov", ".m4v", ".webm")
SEGMENT_FRAMES = 240
_COLOUR = ("color_primaries", "color_trc", "colorspace", "color_range")
Size = float | tuple[int, int] | Callable[[tuple[int, int]], tuple[int, int]]


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
            length, frames = stream_length(inp, stream)
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
        tagged = [tag(s.metadata, "timecode") for s in (stream, *inp.streams.data)]
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
            streams = plan_streams(src, inp, dummy, video_index, notes)
            muxer = dummy.format.name
            if not jumps:
                note_longer(inp, streams, origin, video_end, end, notes)
            if start:
                streams = copied_video_from(src, streams, start, end, origin, jumps, notes)
            global_header = bool(dummy.format.flags & av.format.Flags.global_header.value)

    out_pix = pick_pix_fmt(codec, in_fmt, pix_fmt, notes)
    deep = max(bits(in_fmt), bits(out_pix)) > 8
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
    options = encoder_options(codec, crf, preset, notes)
    plan = VideoPlan(
        source=src, video_index=video_index, in_hw=in_hw, out_hw=out_hw, rotated=rotated, codec=codec,
        pix_fmt=out_pix, options=options, rgb_format=rgb_format, time_base=time_base, rate=rate, sar=sar,
        colour=colour, display_matrix=display_matrix, global_header=global_header, muxer=muxer, streams=streams,
        start=start, end=end, first_pts=first.pts, total=total, counted=counted, segment_frames=segment_frames,
        notes=(), origin=origin, jumps=jumps, timecode=timecode)
    with_hdr = hdr_options(codec, hdr, options, notes)
    if with_hdr != options:  # an older x264 may not know the parameters: the video matters more than the metadata
        try:
            with library_log():
                open_encoder(replace(plan, options=with_hdr))
            plan = replace(plan, options=with_hdr)
        except (FFmpegError, ValueError):
            notes.append(f"the HDR10 mastering display and light levels are not kept: this {codec} does not take them")
    plan = replace(plan, notes=tuple(notes))
    given = {"crf": crf, "preset": preset, "pix_fmt": pix_fmt}
    check_encoder(plan, [f"{option_name(field)} {value}" for field, value in given.items() if value is not None])
    return plan
