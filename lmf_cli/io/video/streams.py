"""The input's streams other than the upscaled video: what becomes of each is settled, and tried out
on a container in memory, while planning, so that the mux does not fail on one after every frame is
upscaled; the mux then reads and converts them with the same code.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from av.error import FFmpegError
from av.stream import Discard, Disposition

from lmf_cli.errors import InputError, option_name
from lmf_cli.io.video.errors import library_log, short_error
from lmf_cli.io.video.timeline import Mender

COVER_FILES = {"mjpeg": ("cover.jpg", "image/jpeg"), "png": ("cover.png", "image/png")}  # Matroska's names
AUDIO_CODECS = ("aac", "libopus", "flac")  # for audio a container cannot hold as it is
TEXT_SUBTITLE_CODECS = ("mov_text", "webvtt", "ass", "subrip")
STALE_TAGS = ("duration", "encoder", "bps", "number_of_frames", "number_of_bytes", "_statistics")


@dataclass(frozen=True)
class StreamPlan:
    """What becomes of one non-upscaled stream: copy, encode (to `codec`), attach (cover art, as a
    Matroska attachment) or drop."""

    index: int
    kind: str
    action: str
    codec: str


def clean_tags(metadata: dict[str, str]) -> dict[str, str]:
    """Stream/container tags minus those describing the old encode (durations, statistics)."""
    return {k: v for k, v in metadata.items() if not k.lower().startswith(STALE_TAGS)}


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


def _stream_name(stream: av.stream.Stream) -> str:
    """The codec of a stream as notes name it: data streams have no codec context, only a name (klv)."""
    if stream.codec_context is not None:
        return stream.codec_context.name
    return getattr(stream, "name", None) or stream.type


def tag(metadata: dict[str, str], key: str) -> str | None:
    """A tag whatever its case (Matroska's are upper case, MP4's lower)."""
    return next((v for k, v in metadata.items() if k.lower() == key), None)


def plan_streams(src: Path, inp: av.container.InputContainer, dummy: av.container.OutputContainer,
                  video_index: int, notes: list[str]) -> tuple[StreamPlan, ...]:
    """Copy what the output container can hold as it is; re-encode audio and text subtitles it
    cannot; drop the rest, with a note for each. Every choice is tried on a container in memory
    first (`_try_output`), so that the mux does not fail at the end of the job. A timecode track
    (MOV, MP4) is not copied: its timecode goes on the video (`VideoPlan.timecode`), from which
    MOV and MP4 write a new track."""
    muxer = dummy.format.name
    kept = [s for s in inp.streams if s.index != video_index and s.discard != Discard.all  # e.g. MP4's chapters
            and (s.type in ("video", "audio", "subtitle") or (s.type == "attachment" and muxer == "matroska")
                 or (s.type == "data" and tag(s.metadata, "timecode") is None))]
    samples = _sample_packets(src, {s.index for s in kept if s.type != "attachment"})
    kept_indices = {s.index for s in kept}
    plans = []
    for stream in inp.streams:
        if stream.index == video_index or stream.discard == Discard.all:
            continue
        name = _stream_name(stream)
        if stream.index not in kept_indices:
            timecode = tag(stream.metadata, "timecode") if stream.type == "data" else None
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


def note_longer(inp: av.container.InputContainer, streams: tuple[StreamPlan, ...], origin: Fraction,
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
        length, _ = stream_length(inp, stream) if sp.kind != "video" else (
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


def copied_video_from(src: Path, streams: tuple[StreamPlan, ...], start: float, end: float | None,
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


def stream_length(inp: av.container.InputContainer, stream: av.stream.Stream) -> tuple[Fraction | None, int | None]:
    """(seconds, frames) the stream lasts, by its own account, not the container's (whose duration is
    its longest stream's: a 5-frame video with 1 s of audio is no 25-frame video): the header's
    duration, Matroska's statistics tags (ffmpeg and mkvmerge write them), else for the video the
    end of its last packets, found by a seek near the end of the file."""
    if stream.duration and stream.time_base:
        return stream.duration * stream.time_base, None
    frames = tag(stream.metadata, "number_of_frames")
    seconds = _tag_seconds(tag(stream.metadata, "duration"))
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
