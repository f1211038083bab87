"""Reading and writing image files faithfully: bit depth, grayscale, alpha, orientation.

Pixels come through OpenCV (16-bit PNG/TIFF, alpha, grayscale as stored); Pillow reads
the EXIF orientation and ICC profile. Writes are atomic: a temp file in the target
folder, renamed over the final name only once complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lmf_cli.checkpoints import atomic_write
from lmf_cli.errors import InputError

Image.MAX_IMAGE_PIXELS = None  # our own pixel limit applies (see read_image)
DEFAULT_MAX_PIXELS = 400_000_000
FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "tiff": ".tiff", "tif": ".tiff"}


@dataclass
class ImageFile:
    """Pixels as H x W (x C) in RGB(A) order, plus what must survive into the output."""

    pixels: np.ndarray
    icc_profile: bytes | None = None
    exif: bytes | None = None

    @property
    def size_wh(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFile:
    """Decode an image, upright (EXIF orientation applied), or raise InputError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height == 0:
                raise InputError(f"{path}: image has no pixels")
            if width * height > max_pixels:
                raise InputError(f"{path}: {width}x{height} exceeds the pixel limit of {max_pixels:,}")
            icc = img.info.get("icc_profile")
            exif = img.getexif()
            orientation = int(exif.get(0x0112, 1)) if exif else 1
            if exif and 0x0112 in exif:
                exif[0x0112] = 1
            exif_bytes = exif.tobytes() if exif else None
        with Image.open(path) as img:
            img.verify()  # PNG chunk CRCs and truncation
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: not a readable image ({' '.join(str(exc).split())})") from exc
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if data is None:
        data = _pillow_pixels(path)
    elif data.ndim == 3:
        data = cv2.cvtColor(data, cv2.COLOR_BGRA2RGBA if data.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    if data.dtype not in (np.uint8, np.uint16):
        data = _to_supported(data, path)
    return ImageFile(_orient(data, orientation), icc, exif_bytes)


def _pillow_pixels(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "RGB", "RGBA", "I;16"):
                img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
            return np.asarray(img)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: truncated or damaged image ({' '.join(str(exc).split())})") from exc


def _to_supported(data: np.ndarray, path: Path) -> np.ndarray:
    if data.dtype == np.float32:
        return np.round(np.clip(data, 0, 1) * 65535).astype(np.uint16)
    raise InputError(f"{path}: unsupported sample type {data.dtype}")


def _orient(data: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) so the pixels are upright."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: a.swapaxes(0, 1)[:, ::-1],
           7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: a.swapaxes(0, 1)[::-1]}
    if orientation in ops:
        data = ops[orientation](data)
    return np.ascontiguousarray(data)


def write_image(path: str | Path, image: ImageFile, quality: int = 95, keep_metadata: bool = True) -> None:
    """Write atomically, in the format of the file name, keeping bit depth where it can."""
    path = Path(path)
    suffix = path.suffix.lower()
    pixels = image.pixels
    if suffix in (".jpg", ".jpeg", ".webp") and pixels.dtype == np.uint16:
        pixels = (pixels.astype(np.uint32) * 255 + 32767) // 65535
        pixels = pixels.astype(np.uint8)

    def write(tmp: Path) -> None:
        if pixels.dtype == np.uint16 or suffix in (".tif", ".tiff"):
            _write_cv2(tmp, pixels, suffix, quality)
        else:
            _write_pillow(tmp, pixels, suffix, quality, image if keep_metadata else None)

    atomic_write(path, write)


def _write_cv2(tmp: Path, pixels: np.ndarray, suffix: str, quality: int) -> None:
    data = pixels
    if data.ndim == 3:
        data = cv2.cvtColor(data, cv2.COLOR_RGBA2BGRA if data.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(suffix, data, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise InputError(f"{tmp}: could not encode {suffix}")
    tmp.write_bytes(buf.tobytes())


def _write_pillow(tmp: Path, pixels: np.ndarray, suffix: str, quality: int, meta: ImageFile | None) -> None:
    img = Image.fromarray(pixels)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[suffix]
    if fmt == "JPEG" and img.mode == "RGBA":
        img = img.convert("RGB")
    kwargs: dict = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    if meta is not None:
        if meta.icc_profile:
            kwargs["icc_profile"] = meta.icc_profile
        if meta.exif:
            kwargs["exif"] = meta.exif
    img.save(tmp, format=fmt, **kwargs)


def exif_orientation(path: str | Path) -> int:
    with Image.open(path) as img:
        return int(img.getexif().get(0x0112, 1))

