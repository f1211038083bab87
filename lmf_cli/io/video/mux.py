"""Muxing: the finished segments and the input's audio, subtitle and data streams, with
chapters and tags, into one temp file that is renamed onto the output.
"""

from __future__ import annotations

import base64
import heapq
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from lmf_cli.io.video.plan import StreamPlan, VideoPlan, clean_tags, configure_encoder
from lmf_cli.io.video.segments import Manifest, read_segment


def mux(plan: VideoPlan, manifest: Manifest, tmp: Path) -> None:
    """Segments + the input's other streams, cut to the range, into `tmp`."""
    with av.open(str(plan.source)) as inp, av.open(str(tmp), "w", format=plan.muxer) as out:
        out.metadata.update(clean_tags(inp.metadata))
        video_in = inp.streams[plan.video_index]
        video = out.add_stream(plan.codec, rate=plan.rate)
        configure_encoder(video.codec_context, plan)
        video.time_base = plan.time_base
        video.metadata.update(clean_tags(video_in.metadata))
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


def _video_packets(plan: VideoPlan, manifest: Manifest, stream: av.video.stream.VideoStream) -> Iterator[av.Packet]:
    for segment in manifest.segments:
        for packet in read_segment(manifest.path.parent / segment["file"], plan.time_base):
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
        self.stream.metadata.update(clean_tags(stream.metadata))
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
