"""The video encoder: its codec, quality, pixel format and HDR metadata, and opening it. One place,
because every segment's encoder and the output stream must be configured alike (their headers must be
the same bytes), and because what an encoder refuses must be found while planning, not after the upscale.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import av
from av.codec.context import Flags
from av.error import FFmpegError
from av.sidedata.sidedata import Type as SideDataType

from lmf_cli.errors import InputError, OptionError, option_name
from lmf_cli.io.video.errors import library_log, short_error

CODECS = ("libx264", "libx265", "libsvtav1", "ffv1")
DEFAULT_CRF = {"libx264": 18, "libx265": 20, "libsvtav1": 30}  # near-transparent: upscales are for keeping
CRF_RANGE = {"libx264": (0, 51), "libx265": (0, 51), "libsvtav1": (0, 63)}
MAX_SIDES = {"libx264": (16384, 16384), "libsvtav1": (16384, 8704)}  # (width, height) of a frame
MAX_PIXELS = {"libx265": (142_606_336, "16384 x 8704, HEVC level 7.2")}  # luma samples of a frame
X26X_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")
SWS_COLORSPACE = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}


class EncoderSettings(Protocol):
    """What an encoder is opened with, as planning settled it (a `VideoPlan` is one). A protocol, so that
    planning uses this module and not the other way round."""

    @property
    def codec(self) -> str: ...
    @property
    def out_hw(self) -> tuple[int, int]: ...
    @property
    def rotated(self) -> bool: ...
    @property
    def pix_fmt(self) -> str: ...
    @property
    def options(self) -> dict[str, str]: ...
    @property
    def time_base(self) -> Fraction: ...
    @property
    def rate(self) -> Fraction: ...
    @property
    def sar(self) -> Fraction | None: ...
    @property
    def colour(self) -> dict[str, int]: ...
    @property
    def global_header(self) -> bool: ...


def available_codecs() -> list[str]:
    return [c for c in CODECS if c in av.codecs_available]


def bits(pix_fmt: str) -> int:
    return max((c.bits for c in av.VideoFormat(pix_fmt).components), default=8)


def configure_encoder(ctx: av.video.codeccontext.VideoCodecContext, plan: EncoderSettings) -> None:
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


def open_encoder(plan: EncoderSettings) -> av.video.codeccontext.VideoCodecContext:
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration at info level
    ctx = av.CodecContext.create(plan.codec, "w")
    configure_encoder(ctx, plan)
    ctx.open()
    return ctx


def check_encoder(plan: EncoderSettings, given: list[str]) -> None:
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


def hdr_options(codec: str, hdr: Hdr, options: dict[str, str], notes: list[str]) -> dict[str, str]:
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


def encoder_options(codec: str, crf: int | None, preset: str | None, notes: list[str]) -> dict[str, str]:
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


def pick_pix_fmt(codec: str, in_fmt: str, requested: str | None, notes: list[str]) -> str:
    supported = [f.name for f in av.Codec(codec, "w").video_formats or []]
    if requested is not None:
        if requested not in supported:
            raise OptionError("pix_fmt", requested, f"{codec} takes {', '.join(supported)}")
        return requested
    if in_fmt in supported:
        return in_fmt
    deep = bits(in_fmt) > 8
    choice = "yuv420p10le" if deep and "yuv420p10le" in supported else "yuv420p"
    if deep and choice == "yuv420p":
        notes.append(f"{codec} has no 10-bit mode here: the output is 8-bit")
    return choice
