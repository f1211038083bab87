"""Reading and writing image files faithfully: bit depth, grayscale, alpha, orientation, metadata.

Pillow reads the header (size, EXIF orientation, ICC profile, EXIF) and decodes the whole
stream once to catch truncated or damaged files; OpenCV decodes the pixels, because it
keeps the 16-bit samples that Pillow reduces to 8 bits. Writes are atomic: the encoded file
goes to a temp file in the target folder, renamed over the final name only once complete,
so an interrupted run never leaves a partial output.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from lmf_cli.errors import InputError
from lmf_cli.files import atomic_write

Image.MAX_IMAGE_PIXELS = None  # our own pixel limit applies (see probe_image)
DEFAULT_MAX_PIXELS = 400_000_000
FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "tiff": ".tiff", "tif": ".tiff"}
WRITABLE = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"})
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
ORIENTATION, EXIF_IFD, PIXEL_X, PIXEL_Y = 0x0112, 0x8769, 0xA002, 0xA003
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# How a TIFF stores its pixels (sizes, strips, tiles, samples, resolution, ICC): not facts to carry.
TIFF_LAYOUT_TAGS = frozenset({254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 282, 283,
                              284, 290, 291, 296, 317, 320, 322, 323, 324, 325, 338, 339, 340, 341, 530, 531, 532,
                              34675})
# What Pillow raises on damaged files (its TIFF reader also raises TypeError, KeyError, IndexError).
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, TypeError, KeyError,
                  IndexError)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under a folder (recursively, sorted), or the file itself."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load_rgb(path: str | Path) -> np.ndarray:
    """An 8-bit RGB array; grayscale and palette images are converted (e.g. Set14's bridge)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@dataclass
class ImageFile:
    """Upright pixels plus what must survive into the output.

    pixels: uint8 or uint16, H x W (gray), H x W x 2 (gray + alpha), x 3 (RGB) or x 4 (RGBA).
    exif: EXIF bytes describing the upright pixels (orientation 1).
    """

    pixels: np.ndarray
    icc_profile: bytes | None = None
    exif: bytes | None = None

    @property
    def size_wh(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]


def probe_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of the upright image from its header alone.

    A batch is planned (names, sizes, --dry-run) and decompression bombs are refused before
    any pixel is decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            return _check_header(img, max_pixels)[0]
    except InputError:
        raise
    except _PILLOW_ERRORS as exc:
        raise InputError(_unreadable(exc, _head(path))) from exc


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFile:
    """Decode an image upright (EXIF orientation applied), or raise InputError with the reason."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror or exc})") from exc
    try:
        with Image.open(io.BytesIO(data)) as img:
            _, orientation = _check_header(img, max_pixels)
            icc = img.info.get("icc_profile") if img.mode != "CMYK" else None  # a CMYK profile would lie
            gray_alpha = img.mode in ("LA", "La") or _png_colour_type(data) == 4
            img.load()  # a truncated or damaged stream fails here (OpenCV would fill it with grey)
            exif = img.getexif()
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # PNG chunk CRCs
    except InputError:
        raise
    except _PILLOW_ERRORS as exc:
        raise InputError(_unreadable(exc, data[:32])) from exc
    if orientation != 1 and data[:2] in (b"II", b"MM"):
        data = _stored_tiff(data)
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        pixels = None
    if pixels is None:
        pixels = _pillow_pixels(data)
    elif pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    if gray_alpha and pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = pixels[..., [0, 3]]  # OpenCV expands gray + alpha to RGBA
    if pixels.dtype not in (np.uint8, np.uint16):
        pixels = _to_supported(pixels)
    if ORIENTATION in exif:
        exif[ORIENTATION] = 1
    if data[:2] in (b"II", b"MM"):  # a TIFF's "EXIF" is its whole first IFD: keep the descriptive tags only
        for tag in TIFF_LAYOUT_TAGS & set(exif):
            del exif[tag]
    return ImageFile(_orient(pixels, orientation), icc, exif.tobytes() if exif else None)


def _check_header(img: Image.Image, max_pixels: int) -> tuple[tuple[int, int], int]:
    """((width, height) upright, EXIF orientation); refuses empty images and bombs."""
    width, height = img.size
    if img.format == "TIFF":  # Pillow 11+ reports a TIFF's size already turned; the tags say what is stored
        width, height = img.tag_v2.get(256, width), img.tag_v2.get(257, height)
    if width * height == 0:
        raise InputError(f"the image has no pixels ({width} x {height})")
    if width * height > max_pixels:
        raise InputError(f"{width} x {height} is {width * height:,} pixels, over the limit of "
                         f"{max_pixels:,} (--max-pixels)")
    # A PNG's eXIf after the pixels would need a full decode to see; only an early one counts.
    early = img.format != "PNG" or "exif" in img.info
    orientation = int(img.getexif().get(ORIENTATION, 1)) if early else 1
    return ((height, width) if orientation in (5, 6, 7, 8) else (width, height)), orientation


def _stored_tiff(data: bytes) -> bytes:
    """A copy of a TIFF with orientation 1, so that every decoder hands over the stored pixels.

    OpenCV 5 and Pillow 11+ turn TIFFs by their orientation tag themselves (OpenCV even with
    IMREAD_IGNORE_ORIENTATION), older versions do not; _orient then turns them exactly once.
    """
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8 or struct.unpack(order + "H", data[2:4])[0] != 42:
        return data
    offset = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[offset:offset + 2])[0] if offset + 2 <= len(data) else 0
    for pos in range(offset + 2, min(offset + 2 + 12 * count, len(data) - 11), 12):
        if struct.unpack(order + "HH", data[pos:pos + 4]) == (ORIENTATION, 3):  # SHORT, value inline
            return data[:pos + 8] + struct.pack(order + "H", 1) + data[pos + 10:]
    return data


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(32)
    except OSError:
        return b""


def _unreadable(exc: BaseException, head: bytes) -> str:
    if isinstance(exc, UnidentifiedImageError):
        if head.startswith(PNG_SIGNATURE) and len(head) >= 24 and 0 in struct.unpack(">II", head[16:24]):
            width, height = struct.unpack(">II", head[16:24])
            return f"the image has no pixels ({width} x {height})"
        return "not an image, or a format lmf cannot read"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    return f"truncated or damaged image ({' '.join(str(exc).split())})"


def _png_colour_type(data: bytes) -> int | None:
    return data[25] if data.startswith(PNG_SIGNATURE) and len(data) > 25 else None


def _pillow_pixels(data: bytes) -> np.ndarray:
    """Formats OpenCV cannot decode: 8-bit L, LA, RGB or RGBA through Pillow."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in ("L", "LA", "RGB", "RGBA", "I;16"):
                img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
            return np.asarray(img)
    except _PILLOW_ERRORS as exc:
        raise InputError(_unreadable(exc, data[:32])) from exc


def _to_supported(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.float32:
        return np.round(np.clip(data, 0, 1) * 65535).astype(np.uint16)
    raise InputError(f"unsupported sample type {data.dtype}")


def _orient(data: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) so the pixels are upright."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: a.swapaxes(0, 1)[:, ::-1],
           7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: a.swapaxes(0, 1)[::-1]}
    if orientation in ops:
        data = ops[orientation](data)
    return np.ascontiguousarray(data)


def write_image(path: str | Path, image: ImageFile, quality: int = 95, keep_metadata: bool = True) -> list[str]:
    """Write atomically in the format of the file name; returns what that format could not keep.

    PNG and TIFF keep 8/16-bit samples, grayscale and alpha; JPEG and WebP are 8-bit
    (`quality` 1..100) and JPEG has no alpha. ICC profile and EXIF (orientation 1, pixel
    dimensions updated) go into every format except 16-bit colour TIFF, which is written by
    OpenCV and cannot carry them.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITABLE:
        raise InputError(f"cannot write {suffix or 'a file without an extension'}; use .png, .jpg, .webp or .tiff")
    pixels, notes = image.pixels, []
    icc = image.icc_profile if keep_metadata else None
    exif = _exif_for(image.exif, image.size_wh) if keep_metadata and image.exif else None
    if suffix == ".png":
        data = _encode_png(pixels, icc, exif)
    elif suffix in (".tif", ".tiff") and (pixels.dtype == np.uint8 or pixels.ndim == 2):
        data = _encode_pillow(pixels, "TIFF", icc, exif)
    elif suffix in (".tif", ".tiff"):
        if pixels.shape[2] == 2:
            pixels = pixels[..., [0, 0, 0, 1]]
            notes.append("16-bit gray + alpha TIFF is written as RGBA")
        if icc or exif:
            notes.append("16-bit colour TIFF cannot carry the ICC profile and EXIF here; they were dropped "
                         "(use PNG to keep them)")
        data = _encode_cv2(pixels, ".tiff")
    else:
        if pixels.dtype == np.uint16:
            pixels = ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
            notes.append(f"{suffix[1:].upper()} is 8-bit: 16-bit samples were reduced")
        if suffix != ".webp" and pixels.ndim == 3 and pixels.shape[2] in (2, 4):
            pixels = pixels[..., 0] if pixels.shape[2] == 2 else pixels[..., :3]
            notes.append("JPEG has no alpha channel: alpha was dropped (use PNG, WebP or TIFF to keep it)")
        data = _encode_pillow(pixels, "WEBP" if suffix == ".webp" else "JPEG", icc, exif, quality=quality)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return notes


def _exif_for(exif_bytes: bytes, size_wh: tuple[int, int]) -> bytes:
    """The source EXIF for the output: orientation 1 and the new pixel dimensions."""
    exif = Image.Exif()
    exif.load(exif_bytes)
    if ORIENTATION in exif:
        exif[ORIENTATION] = 1
    sub = exif.get_ifd(EXIF_IFD)
    for tag, value in ((PIXEL_X, size_wh[0]), (PIXEL_Y, size_wh[1])):
        if tag in sub:
            sub[tag] = value
    return exif.tobytes()


def _encode_pillow(pixels: np.ndarray, fmt: str, icc: bytes | None, exif: bytes | None, **options) -> bytes:
    kwargs = dict(options)
    if icc:
        kwargs["icc_profile"] = icc
    if exif:
        kwargs["exif"] = exif
    buf = io.BytesIO()
    try:
        Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"could not encode {fmt} ({' '.join(str(exc).split())})") from exc
    return buf.getvalue()


def _encode_cv2(pixels: np.ndarray, suffix: str, params: list[int] | None = None) -> bytes:
    data = pixels
    if data.ndim == 3:
        data = cv2.cvtColor(data, cv2.COLOR_RGBA2BGRA if data.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    try:
        ok, buf = cv2.imencode(suffix, data, params or [])
    except cv2.error as exc:
        raise InputError(f"could not encode {suffix} ({' '.join(str(exc).split())})") from exc
    if not ok:
        raise InputError(f"could not encode {suffix}")
    return buf.tobytes()


def _encode_png(pixels: np.ndarray, icc: bytes | None, exif: bytes | None) -> bytes:
    """OpenCV's PNG (any depth) with the iCCP and eXIf chunks it cannot write added by hand."""
    if pixels.ndim == 3 and pixels.shape[2] == 2:
        data = _png_gray_alpha(pixels)
    else:
        data = _encode_cv2(pixels, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 6])
    chunks = []
    if icc:
        chunks.append((b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc)))
    if exif:
        chunks.append((b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    return _png_insert(data, chunks)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_insert(png: bytes, chunks: list[tuple[bytes, bytes]]) -> bytes:
    """Insert chunks right after IHDR: before PLTE and the first IDAT, where iCCP must be."""
    if png[12:16] != b"IHDR":
        raise InputError("the PNG encoder produced no IHDR chunk")
    end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4
    return png[:end] + b"".join(_png_chunk(k, b) for k, b in chunks) + png[end:]


def _png_gray_alpha(pixels: np.ndarray) -> bytes:
    """A gray + alpha PNG (colour type 4), which OpenCV cannot encode, at 8 or 16 bits."""
    height, width = pixels.shape[:2]
    depth = 8 * pixels.dtype.itemsize
    rows = np.ascontiguousarray(pixels.astype(">u2" if depth == 16 else np.uint8)).view(np.uint8).reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter type 0 on each row
    header = struct.pack(">IIBBBBB", width, height, depth, 4, 0, 0, 0)
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + _png_chunk(b"IEND", b""))
