"""HEIC/HEIF, AVIF and JPEG XL: the files of phones and new cameras, at 8, 10, 12 (and JPEG XL 16) bits.

Which library does what, and why:

- HEIC/HEIF: pillow-heif (libheif, x265) reads and writes 8, 10 and 12 bits with alpha, ICC and EXIF.
  libheif turns the pixels upright by the file's irot/imir boxes, so the EXIF orientation is only a
  note about the camera and is reset to 1.
- AVIF: Pillow reads the header (size, ICC, EXIF, irot/imir as an EXIF orientation) and 8-bit pixels;
  OpenCV's libavif decodes 10- and 12-bit pixels and encodes every depth with the ICC profile and EXIF
  (`imencodeWithMetadata`). An OpenCV without AVIF leaves Pillow's 8 bits, and says so.
- JPEG XL: pyjpegxl (libjxl) reads and writes 8 and 16 bits with alpha, ICC and EXIF; libjxl applies
  the codestream's orientation itself. A small Pillow plugin here gives Image.open the header alone.

Each package is imported on first use, so `import lmf_cli` stays fast; a missing one is one line that
says what to install. Deep samples are uint16 over the full 0..65535 range whatever the file's depth
(a 10-bit 1023 is 65535), so the model sees them on the scale of 16-bit PNG; `bits` says how many
the file held, so that a 10-bit HEIC is written back as 10 bits.

What each format is (extensions, signatures, depths, the package it needs) is its record in `formats`;
this module holds how each is decoded and encoded.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageFile

from lmf_cli.errors import InputError
from lmf_cli.io.formats import BY_PILLOW, CODEC_FORMATS, CODEC_NAMES, CODEC_SUFFIXES, JXL, opencv_avif

SUFFIX_FORMATS = CODEC_SUFFIXES  # .heic -> HEIF, ...: the extensions of the formats read and written here
NAMES = CODEC_NAMES  # HEIF -> HEIC, ...: their names in messages
# CICP values a viewer shows like sRGB: primaries BT.709 (or unspecified), SDR gamma-like transfers.
_SRGB_LIKE = ({1, 2}, {1, 2, 6, 13, 14, 15})
# What decoders raise on damaged data (pillow-heif: ValueError, EOFError, SyntaxError; pyjpegxl: RuntimeError).
_DECODER_ERRORS = (RuntimeError, ValueError, EOFError, SyntaxError, OSError)
_registered: set[str] = set()


@dataclass
class Decoded:
    """Pixels as the file stores them after its decoder's own turns, at `bits` bits per sample."""

    pixels: np.ndarray
    bits: int
    notes: tuple[str, ...] = ()


def sniff(head: bytes) -> str | None:
    """HEIF, AVIF or JXL from a file's first bytes (its records' signatures or ISOBMFF brands), else None."""
    for fmt in CODEC_FORMATS:
        if fmt.magic and head.startswith(fmt.magic):
            return fmt.pillow[0]
    if head[4:8] != b"ftyp":
        return None
    end = min(len(head), struct.unpack(">I", head[:4])[0])
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, end - 3, 4)}
    # In record order: an AVIF carries HEIF's mif1 brand too, so AVIF is asked first.
    return next((fmt.pillow[0] for fmt in CODEC_FORMATS if brands & fmt.brands), None)


def prepare(head: bytes) -> str | None:
    """The codec format of a file's first bytes, with its Pillow opener registered (once), or None.

    Raises InputError naming the package to install when that format's package is missing.
    """
    fmt = sniff(head)
    if fmt is None or fmt in _registered:
        return fmt
    module = _require(fmt, "reading")  # AVIF: Pillow's own plugin, when its build has libavif
    if fmt == "HEIF":
        module.register_heif_opener()
    elif fmt == "JXL":
        Image.register_open(_JxlImageFile.format, _JxlImageFile, _jxl_accept)
    _registered.add(fmt)
    return fmt


def _require(fmt: str, doing: str) -> ModuleType:
    """The module that provides `fmt` (its record's provider), or InputError saying what to install."""
    record = BY_PILLOW[fmt]
    module = record.provider.load()
    if module is None:
        raise InputError(record.provider.missing(doing, record.name))
    return module


def widen(raw: np.ndarray, bits: int) -> np.ndarray:
    """Samples of `bits` bits onto the full uint16 range (10-bit 1023 -> 65535), rounded."""
    top = (1 << bits) - 1
    return ((raw.astype(np.uint32) * 65535 + top // 2) // top).astype(np.uint16)


def narrow(pixels: np.ndarray, bits: int) -> np.ndarray:
    """Full-range uint16 samples down to `bits` bits, rounded: `narrow(widen(x, b), b) == x`."""
    top = (1 << bits) - 1
    return ((pixels.astype(np.uint32) * top + 32767) // 65535).astype(np.uint16)


def _damaged(exc: BaseException) -> InputError:
    return InputError(f"truncated or damaged image ({' '.join(str(exc).split()) or type(exc).__name__})")


# Reading --------------------------------------------------------------------------------------------------

def decode(data: bytes, fmt: str) -> Decoded:
    """Decode the primary image of a HEIF, AVIF or JPEG XL file at its full depth; InputError if damaged."""
    try:
        return {"HEIF": _decode_heif, "AVIF": _decode_avif, "JXL": _decode_jxl}[fmt](data)
    except InputError:
        raise
    except _DECODER_ERRORS as exc:
        raise _damaged(exc) from exc


def _decode_heif(data: bytes) -> Decoded:
    heif = _require("HEIF", "reading").open_heif(io.BytesIO(data), convert_hdr_to_8bit=False)
    image = heif[heif.primary_index]
    bits = int(image.info.get("bit_depth", 8))
    pixels = np.asarray(image)
    if pixels.dtype == np.uint16:  # pillow-heif puts the file's bits at the top of 16
        pixels = widen(pixels >> (16 - bits), bits)
    monochrome = "chroma" not in image.info  # libheif hands gray + alpha over as RGBA
    if monochrome and pixels.ndim == 3 and pixels.shape[2] == 4 and np.array_equal(pixels[..., 0], pixels[..., 2]):
        pixels = pixels[..., [0, 3]]
    notes = []
    if len(heif) > 1:
        notes.append(f"the file holds {len(heif)} images; only its primary image was upscaled")
    kept_out = [f"{len(image.info['depth_images'])} depth map(s)"] if image.info.get("depth_images") else []
    kept_out += [f"auxiliary image {kind}" for kind in image.info.get("aux") or {}]
    if kept_out:
        notes.append(f"not carried: {', '.join(kept_out)} (lmf upscales the main image)")
    nclx = image.info.get("nclx_profile")
    if nclx and not image.info.get("icc_profile"):
        notes += _cicp_notes(nclx.get("color_primaries"), nclx.get("transfer_characteristics"))
    return Decoded(np.ascontiguousarray(pixels), bits, tuple(notes))


def _decode_avif(data: bytes) -> Decoded:
    props = _avif_properties(data)
    bits = _av1_depth(props.get(b"av1C", [b""])[0])
    colours = {body[:4]: body[4:] for body in props.get(b"colr", [])}
    notes = []
    if b"nclx" in colours and not {b"prof", b"rICC"} & set(colours) and len(colours[b"nclx"]) >= 4:
        notes += _cicp_notes(*struct.unpack(">HH", colours[b"nclx"][:4]))
    with Image.open(io.BytesIO(data)) as img:  # Pillow's libavif: 8 bits, stored orientation
        if getattr(img, "n_frames", 1) > 1:
            notes.append(f"an animated AVIF of {img.n_frames} frames: only its first frame was upscaled")
        if bits > 8 and opencv_avif():
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
            if pixels is None:
                raise InputError("truncated or damaged image (the AVIF decoder gave no pixels)")
            if pixels.ndim == 3:
                pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB)
            return Decoded(widen(pixels, bits) if pixels.dtype == np.uint16 else pixels, bits, tuple(notes))
        img.load()
        if img.mode not in ("L", "LA", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        pixels = np.asarray(img)
    if bits > 8:
        notes.append(f"this OpenCV cannot decode AVIF: the {bits}-bit samples were read at 8 bits "
                     "(pip install -U opencv-python-headless)")
    return Decoded(np.ascontiguousarray(pixels), 8, tuple(notes))


def _decode_jxl(data: bytes) -> Decoded:
    meta, pixels = _require("JXL", "reading").decode_to_numpy(data)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    return Decoded(np.ascontiguousarray(pixels), int(meta.bits_per_sample))


def _cicp_notes(primaries: int | None, transfer: int | None) -> list[str]:
    if primaries in _SRGB_LIKE[0] and transfer in _SRGB_LIKE[1]:
        return []
    return [f"its colours are given as CICP values (primaries {primaries}, transfer {transfer}), not as an ICC "
            "profile; lmf does not carry them, so viewers will show the output as sRGB"]


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, body start, end) of the ISOBMFF boxes in data[start:end]; stops at a box that overruns."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        head = 8
        if size == 1 and pos + 16 <= end:
            size, head = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            return
        yield kind, pos + head, pos + size
        pos += size


def _avif_properties(data: bytes) -> dict[bytes, list[bytes]]:
    """The item properties of an AVIF (meta > iprp > ipco: av1C, colr, pixi, ...), bodies by type, in order."""
    span: tuple[int, int] | None = (0, len(data))
    for kind, skip in ((b"meta", 4), (b"iprp", 0), (b"ipco", 0)):  # meta is a full box: version and flags first
        span = next(((s + skip, e) for k, s, e in _boxes(data, *span) if k == kind), None)
        if span is None:
            return {}
    props: dict[bytes, list[bytes]] = {}
    for kind, s, e in _boxes(data, *span):
        props.setdefault(kind, []).append(data[s:e])
    return props


def _av1_depth(av1c: bytes) -> int:
    """Bits per sample from an AV1 codec configuration (high_bitdepth, twelve_bit); 8 if absent."""
    if len(av1c) < 3:
        return 8
    high, twelve = av1c[2] >> 6 & 1, av1c[2] >> 5 & 1
    return 12 if high and twelve else 10 if high else 8


def _jxl_accept(prefix: bytes) -> bool:
    return prefix.startswith(JXL.magic)


def _jxl_exif(box: bytes | None) -> bytes | None:
    """TIFF-style EXIF from a JPEG XL Exif box (a 4-byte offset to the TIFF header, then the EXIF)."""
    if not box or len(box) < 8:
        return None
    start = 4 + struct.unpack(">I", box[:4])[0]
    return box[start:] if box[start:start + 2] in (b"II", b"MM") else None


class _JxlImageFile(ImageFile.ImageFile):
    """JPEG XL for Pillow: the header (size, mode, ICC, EXIF) from libjxl's probe, 8-bit pixels on load.

    lmf decodes JPEG XL pixels at full depth through `decode`; this lets Image.open size and check a
    .jxl (before any pixel is decoded) and convert it for training like any other image. libjxl turns
    the pixels upright itself, so the EXIF orientation is reset to 1.
    """

    format = "JXL"
    format_description = "JPEG XL"

    def _open(self) -> None:
        pyjpegxl = _require("JXL", "reading")
        self._jxl = self.fp.read()
        try:
            meta = pyjpegxl.probe(self._jxl)
        except RuntimeError as exc:
            raise OSError(" ".join(str(exc).split())) from exc
        channels = int(meta.num_color_channels) + int(bool(meta.has_alpha))
        if channels not in (1, 2, 3, 4):
            raise OSError(f"JPEG XL with {channels} channels")
        self._mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
        self._size = (int(meta.width), int(meta.height))
        if meta.icc:
            self.info["icc_profile"] = bytes(meta.icc)
        exif = _jxl_exif(meta.exif)
        if exif:
            tags = Image.Exif()
            tags.load(exif)
            tags[0x0112] = 1
            self.info["exif"] = tags.tobytes()
        self.tile = []

    def load(self) -> Image.core.PixelAccess | None:
        if self.tile or self._im is not None:
            return super().load()
        try:
            pixels = _decode_jxl(self._jxl).pixels
        except RuntimeError as exc:
            raise OSError(" ".join(str(exc).split())) from exc
        if pixels.dtype != np.uint8:
            pixels = ((pixels.astype(np.float64) * 255 / (65535 if pixels.dtype == np.uint16 else 1)).round()
                      .clip(0, 255).astype(np.uint8))
        self.fp = io.BytesIO(np.ascontiguousarray(pixels).tobytes())
        self.tile = [ImageFile._Tile("raw", (0, 0, *self.size), 0, self.mode)]
        return super().load()


# Writing --------------------------------------------------------------------------------------------------

def encode(pixels: np.ndarray, suffix: str, bits: int | None, icc: bytes | None, exif: bytes | None,
           quality: int) -> tuple[bytes, list[str]]:
    """Encode as HEIC, AVIF or JPEG XL; returns the file and what the format could not keep.

    uint16 pixels are written at the file's own depth `bits` where the format holds it (HEIC and AVIF:
    10 or 12 bits; JPEG XL: 16). `quality` 1..100 as for JPEG; 100 is lossless (HEIC: 4:4:4, within
    one step of the YCbCr rounding).
    """
    encoder: Callable = {"HEIF": _encode_heif, "AVIF": _encode_avif, "JXL": _encode_jxl}[SUFFIX_FORMATS[suffix]]
    return encoder(np.ascontiguousarray(pixels), bits, icc, exif, quality)


def _deep_depth(bits: int | None, name: str) -> tuple[int, list[str]]:
    """10 or 12 bits for uint16 samples that came from a file of `bits` (None: 16)."""
    source = bits or 16
    if source <= 10:
        return 10, []
    if source <= 12:
        return 12, []
    return 12, [f"{name} holds at most 12 bits: {source}-bit samples were reduced to 12"]


def _tiff_exif(exif: bytes | None) -> bytes | None:
    return exif[6:] if exif and exif.startswith(b"Exif\x00\x00") else exif


def _encode_heif(pixels: np.ndarray, bits: int | None, icc: bytes | None, exif: bytes | None,
                 quality: int) -> tuple[bytes, list[str]]:
    pillow_heif = _require("HEIF", "writing")
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    options: dict = {"quality": -1, "chroma": 444} if quality >= 100 else {"quality": quality}
    notes: list[str] = []
    if pixels.dtype == np.uint16:
        depth, notes = _deep_depth(bits, "HEIC")
        mode += ";16"
        options["bit_depth"] = depth
        pixels = (narrow(pixels, depth) << (16 - depth)).astype("<u2")  # pillow-heif takes the top bits
    buf = io.BytesIO()
    try:
        pillow_heif.encode(mode, (pixels.shape[1], pixels.shape[0]), pixels.tobytes(), buf, icc_profile=icc,
                           exif=exif, **options)
    except (RuntimeError, ValueError, OSError, TypeError) as exc:
        raise InputError(f"could not encode HEIC ({' '.join(str(exc).split())})") from exc
    return buf.getvalue(), notes


def _encode_avif(pixels: np.ndarray, bits: int | None, icc: bytes | None, exif: bytes | None,
                 quality: int) -> tuple[bytes, list[str]]:
    notes: list[str] = []
    if pixels.ndim == 3 and pixels.shape[2] == 2:
        pixels = pixels[..., [0, 0, 0, 1]]
        notes.append("gray + alpha AVIF is written as RGBA")
    if not opencv_avif():
        return _encode_avif_pillow(pixels, bits, icc, exif, quality, notes)
    depth = 8
    if pixels.dtype == np.uint16:
        depth, reduced = _deep_depth(bits, "AVIF")
        notes += reduced
        pixels = narrow(pixels, depth)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA if pixels.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    kinds, values = [], []
    for kind, value in ((cv2.IMAGE_METADATA_EXIF, _tiff_exif(exif)), (cv2.IMAGE_METADATA_ICCP, icc)):
        if value:
            kinds.append(kind)
            values.append(np.frombuffer(value, np.uint8))
    params = [cv2.IMWRITE_AVIF_DEPTH, depth, cv2.IMWRITE_AVIF_QUALITY, quality]
    try:
        ok, buf = cv2.imencodeWithMetadata(".avif", pixels, kinds, values, params)
    except cv2.error as exc:
        raise InputError(f"could not encode AVIF ({' '.join(str(exc).split())})") from exc
    if not ok:
        raise InputError("could not encode AVIF")
    return buf.tobytes(), notes


def _encode_avif_pillow(pixels: np.ndarray, bits: int | None, icc: bytes | None, exif: bytes | None, quality: int,
                        notes: list[str]) -> tuple[bytes, list[str]]:
    """8-bit AVIF through Pillow, for an OpenCV without AVIF."""
    if pixels.dtype == np.uint16:
        pixels = ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        notes.append(f"this OpenCV cannot encode AVIF, and Pillow's AVIF is 8-bit: {bits or 16}-bit samples were "
                     "reduced (pip install -U opencv-python-headless)")
    return encode_pillow(pixels, "AVIF", icc, exif, quality=quality), notes


def encode_pillow(pixels: np.ndarray, fmt: str, icc: bytes | None, exif: bytes | None,
                  quality: int | None = None) -> bytes:
    """`pixels` encoded by Pillow as `fmt`, with the ICC profile, EXIF and quality where given; a one-line
    error."""
    options: dict[str, Any] = {}
    if icc:
        options["icc_profile"] = icc
    if exif:
        options["exif"] = exif
    if quality is not None:
        options["quality"] = quality
    buf = io.BytesIO()
    try:
        Image.fromarray(pixels).save(buf, format=fmt, **options)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise InputError(f"could not encode {fmt} ({' '.join(str(exc).split())})") from exc
    return buf.getvalue()


def jxl_distance(quality: int) -> float:
    """libjxl's distance for a JPEG-like quality (its JxlEncoderDistanceFromQuality); 0 is lossless."""
    if quality >= 100:
        return 0.0
    if quality >= 30:
        return 0.1 + (100 - quality) * 0.09
    return 53 / 3000 * quality * quality - 23 / 20 * quality + 25


def _encode_jxl(pixels: np.ndarray, bits: int | None, icc: bytes | None, exif: bytes | None,
                quality: int) -> tuple[bytes, list[str]]:
    pyjpegxl = _require("JXL", "writing")
    tiff = _tiff_exif(exif)
    options: dict = {"lossless": True} if quality >= 100 else {"quality": jxl_distance(quality)}
    try:
        data = pyjpegxl.encode_from_numpy(pixels, icc=icc, exif=b"\x00\x00\x00\x00" + tiff if tiff else None,
                                          **options)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise InputError(f"could not encode JPEG XL ({' '.join(str(exc).split())})") from exc
    return bytes(data), []
