"""Telling a compressed image file from a clean one, so `--input-quality auto` can pick a model.

A model trained on clean bicubic inputs sharpens JPEG blocking; one trained on degraded inputs
removes it but gives up detail on clean inputs. The file itself says which it is closely enough:
a JPEG's quantisation tables give its quality, a WebP says whether it is lossless (VP8L), and
formats that are only ever lossy in practice (HEIC, AVIF from phones) are compressed. Which tell
a format has is its record's `compression` (see `formats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lmf_cli.io.codecs import sniff
from lmf_cli.io.formats import BY_PILLOW, Compression

# The IJG (libjpeg) luminance table at quality 50, in natural (row-major) order: every common
# encoder scales it by quality, so the stored table gives the quality back.
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)
# At quality 90 and above a JPEG's artefacts sit below what the models resolve: treat it as clean.
CLEAN_JPEG_QUALITY = 90


@dataclass(frozen=True)
class InputQuality:
    kind: str  # "clean" or "compressed"
    reason: str  # e.g. "JPEG quality ~75"


def ijg_table(quality: int) -> np.ndarray:
    """The luminance table libjpeg writes at `quality` (1..100)."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((_IJG_LUMA * scale + 50) / 100), 1, 255)


def jpeg_quality(luma_table: list[int] | np.ndarray) -> int:
    """The IJG quality whose luminance table is closest to `luma_table` (64 values)."""
    table = np.asarray(luma_table, dtype=np.float64)
    errors = [np.abs(np.log(ijg_table(q)) - np.log(np.maximum(table, 1))).sum() for q in range(1, 101)]
    return int(np.argmin(errors)) + 1


def input_quality(path: str | Path) -> InputQuality:
    """Whether the image at `path` is compressed, from its own headers (no pixels decoded)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        codec = sniff(head)  # HEIF/AVIF/JPEG XL: told by their kind, without loading their codec packages
        if codec is not None:
            return _told(codec, None, head)
        with Image.open(path) as img:
            return _told(img.format or "?", img, head)
    except (OSError, ValueError, SyntaxError):
        return InputQuality("clean", "unrecognised file")


def _told(fmt: str, img: Image.Image | None, head: bytes) -> InputQuality:
    """What the format's tell (its record's `compression`; none known: clean) says of this file."""
    record = BY_PILLOW.get(fmt)
    tell = record.compression if record is not None else Compression.NEVER
    if tell is Compression.ALWAYS:
        return InputQuality("compressed", fmt)
    if tell is Compression.UNTOLD:  # often lossless (a JPEG XL of a recompressed JPEG, or an export)
        return InputQuality("clean", record.name)
    if tell is Compression.JPEG_TABLES:
        tables = getattr(img, "quantization", None) or {}
        if 0 not in tables:
            return InputQuality("compressed", "JPEG")
        quality = jpeg_quality(list(tables[0])[:64])  # natural order (Pillow >= 8.3)
        kind = "clean" if quality >= CLEAN_JPEG_QUALITY else "compressed"
        return InputQuality(kind, f"JPEG quality ~{quality}")
    if tell is Compression.WEBP_CHUNK:
        lossless = b"VP8L" in head
        return InputQuality("clean" if lossless else "compressed", "lossless WebP" if lossless else "lossy WebP")
    return InputQuality("clean", fmt)
