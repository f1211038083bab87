"""Reading and writing image files faithfully: bit depth, grayscale, alpha, orientation, metadata.

Pillow reads the header (size, EXIF orientation, ICC profile, EXIF) and decodes the whole
stream once to catch truncated or damaged files; OpenCV decodes the pixels, because it
keeps the 16-bit samples that Pillow reduces to 8 bits. Writes are atomic: the encoded file
goes to a temp file in the target folder, renamed over the final name only once complete,
so an interrupted run never leaves a partial output.

HEIC/HEIF, AVIF and JPEG XL go through their own codecs (`codecs`: pillow-heif, Pillow and OpenCV's
libavif, pyjpegxl) at 8, 10, 12 or 16 bits; 16-bit colour TIFF, which OpenCV encodes, gets its ICC
profile and EXIF from `tiffmeta`.

Multi-frame files (animated GIF, APNG and WebP; multi-page TIFF) are read one frame at a time
with `read_frames` and written with `write_frames`: every frame keeps its duration and disposal,
the file its loop count; TIFF pages keep their bit depth. `read_image` is the first frame alone.

Which extensions, depths, alpha, frames and metadata each format has is its record in `formats`; the
tables here (`FORMATS`, `WRITABLE`, `IMAGE_SUFFIXES`, ...) are made from those records.
"""

from __future__ import annotations

import io
import stat
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import GifImagePlugin, Image, UnidentifiedImageError

from lmf_cli.errors import InputError, option_name
from lmf_cli.files import atomic_write
from lmf_cli.io import codecs, formats
from lmf_cli.io.formats import Alpha
from lmf_cli.io.tiffmeta import TIFF_LAYOUT_TAGS, add_metadata
from lmf_cli.options import DEFAULT_MAX_PIXELS

Image.MAX_IMAGE_PIXELS = None  # our own pixel limit applies (see probe_image)
# The format tables, made from the records in `formats` (see there for what each holds).
FORMATS, OUTPUT_FORMATS, WRITABLE = formats.FORMATS, formats.OUTPUT_FORMATS, formats.WRITABLE
IMAGE_SUFFIXES, MULTI_FRAME_FORMATS = formats.IMAGE_SUFFIXES, formats.MULTI_FRAME_FORMATS
ANIMATED_SUFFIXES, PAGED_SUFFIXES = formats.ANIMATED_SUFFIXES, formats.PAGED_SUFFIXES  # suffix -> Pillow's name
# Where a format without alpha sends users who want to keep it.
_KEEP_ALPHA = formats.or_list(f.name for f in formats.WRITERS if f.alpha is Alpha.FULL)
GIF_TRANSPARENT = 255  # the palette index of transparent GIF pixels; the other 255 hold the frame's colours
ORIENTATION, EXIF_IFD, PIXEL_X, PIXEL_Y = 0x0112, 0x8769, 0xA002, 0xA003
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEAD = 64  # bytes enough to tell a format: signatures, PNG's IHDR, an ISOBMFF file's brands
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
    """An 8-bit RGB array; grayscale and palette images are converted (e.g. Set14's bridge). A file that
    cannot be read is an InputError naming it (evaluation, calibration and training sets)."""
    try:
        codecs.prepare(_head(Path(path)))
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except _PILLOW_ERRORS as exc:
        raise InputError(f"{path}: {_unreadable(exc, _head(Path(path)))}") from exc


@dataclass
class ImageFile:
    """Upright pixels plus what must survive into the output.

    pixels: uint8 or uint16, H x W (gray), H x W x 2 (gray + alpha), x 3 (RGB) or x 4 (RGBA);
    uint16 spans 0..65535 whatever the file held.
    exif: EXIF bytes describing the upright pixels (orientation 1).
    bits: the source file's bits per sample (e.g. 10 for a 10-bit HEIC), so that a format of 10 or
    12 bits is written back at that depth; None: all the bits of the dtype.
    notes: what reading could not carry (a HEIC's depth map, say), reported with the write's own.
    """

    pixels: np.ndarray
    icc_profile: bytes | None = None
    exif: bytes | None = None
    bits: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def size_wh(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says: its format, and the upright (width, height) of its frames or pages.

    Every frame of an animation has the canvas size `size_wh`; a TIFF's pages may differ
    (`page_sizes`, given when there are several). A header's frame count is not trusted to
    be small: nothing here is sized by it.
    """

    format: str  # Pillow's name: PNG, JPEG, GIF, WEBP, TIFF, HEIF, AVIF, JXL, ...
    size_wh: tuple[int, int]  # of the first frame
    frames: int = 1
    page_sizes: tuple[tuple[int, int], ...] = ()

    @property
    def pixels(self) -> int:
        """All frames together."""
        if self.page_sizes:
            return sum(w * h for w, h in self.page_sizes)
        return self.frames * self.size_wh[0] * self.size_wh[1]

    @property
    def same_size(self) -> bool:
        return len(set(self.page_sizes)) <= 1

    def frame_size(self, index: int) -> tuple[int, int]:
        return self.page_sizes[index] if self.page_sizes else self.size_wh


@dataclass
class Frame:
    """One frame of an animation, or one page of a TIFF, upright and whole (not a patch of the canvas).

    pixels: as `ImageFile.pixels`. duration in milliseconds (None for TIFF pages); disposal
    (and blend, APNG only) in the numbering of the file's own format (GIF 0-3, APNG 0-2).
    """

    pixels: np.ndarray
    duration: float | None = None
    disposal: int | None = None
    blend: int | None = None


@dataclass
class Animation:
    """What a multi-frame file keeps besides its frames."""

    info: ImageInfo  # format (GIF, PNG = APNG, WEBP, or TIFF = pages), frame count and sizes
    loop: int | None = None  # 0: forever; None: played once (a GIF without a loop count)
    default_image: bool = False  # APNG: frame 1 is the still image of viewers without animation only
    icc_profile: bytes | None = None
    exif: bytes | None = None
    notes: tuple[str, ...] = ()  # doubts about the file that did not stop it being read

    @property
    def format(self) -> str:
        return self.info.format

    @property
    def frames(self) -> int:
        return self.info.frames


def inspect_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Format and upright frame sizes from the headers alone; refuses empty images and bombs.

    A bomb is more than `max_pixels` in one frame or in all frames together (frames x pixels).
    """
    path = Path(path)
    _check_regular(path)
    codecs.prepare(_head(path))
    try:
        with Image.open(path) as img:
            return _frames_info(img, _check_header(img, max_pixels)[0], max_pixels)
    except InputError:
        raise
    except _PILLOW_ERRORS as exc:
        raise InputError(_unreadable(exc, _head(path))) from exc


def probe_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of the upright image (its first frame) from its header alone.

    A batch is planned (names, sizes, --dry-run) and decompression bombs are refused before
    any pixel is decoded.
    """
    return inspect_image(path, max_pixels).size_wh


def _check_regular(path: Path) -> None:
    """Refuse what would hang or mislead a decoder: FIFOs, devices, sockets, folders."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # reported by the reader, with its reason
    if stat.S_ISDIR(mode):
        raise InputError("is a folder, not an image file")
    if not stat.S_ISREG(mode):
        raise InputError("not a regular file (a pipe, device or socket)")


def _read_bytes(path: Path) -> bytes:
    _check_regular(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror or exc})") from exc


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFile:
    """Decode an image upright (EXIF orientation applied), or raise InputError with the reason.

    Of a multi-frame file this is the first frame; `read_frames` reads them all.
    """
    data = _read_bytes(Path(path))
    return _decode_image(data, codecs.prepare(data[:HEAD]), max_pixels)


def _decode_image(data: bytes, codec: str | None, max_pixels: int) -> ImageFile:
    """`read_image` of a file's bytes; `codec` is its HEIF, AVIF or JXL format (see `codecs.prepare`), or None."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            _, orientation = _check_header(img, max_pixels)
            icc = img.info.get("icc_profile") if img.mode != "CMYK" else None  # a CMYK profile would lie
            gray_alpha = img.mode in ("LA", "La") or _png_colour_type(data) == 4
            if codec is None:
                img.load()  # a truncated or damaged stream fails here (OpenCV would fill it with grey)
            exif = img.getexif()
        if codec is None:
            with Image.open(io.BytesIO(data)) as img:
                img.verify()  # PNG chunk CRCs
    except InputError:
        raise
    except _PILLOW_ERRORS as exc:
        raise InputError(_unreadable(exc, data[:HEAD])) from exc
    if codec is not None:  # decoded once, at full depth; damage is found here
        decoded = codecs.decode(data, codec)
        pixels, bits = decoded.pixels, decoded.bits
        if pixels.dtype not in (np.uint8, np.uint16):  # a float JPEG XL
            pixels, bits = _to_supported(pixels), None
        return ImageFile(_orient(pixels, orientation), icc, _carried_exif(exif, data), bits, decoded.notes)
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
    return ImageFile(_orient(pixels, orientation), icc, _carried_exif(exif, data))


def _carried_exif(exif: Image.Exif, data: bytes) -> bytes | None:
    """The EXIF to carry: orientation reset to 1; of a TIFF only the descriptive tags."""
    if ORIENTATION in exif:
        exif[ORIENTATION] = 1
    if data[:2] in (b"II", b"MM"):  # a TIFF's "EXIF" is its whole first IFD: keep the descriptive tags only
        for tag in TIFF_LAYOUT_TAGS & set(exif):
            del exif[tag]
    return exif.tobytes() if exif else None


def _check_header(img: Image.Image, max_pixels: int) -> tuple[tuple[int, int], int]:
    """((width, height) upright, EXIF orientation); refuses empty images and bombs."""
    width, height = img.size
    if img.format == "TIFF":  # Pillow 11+ reports a TIFF's size already turned; the tags say what is stored
        width, height = img.tag_v2.get(256, width), img.tag_v2.get(257, height)
    if width * height == 0:
        raise InputError(f"the image has no pixels ({width} x {height})")
    if width * height > max_pixels:
        raise InputError(f"{width} x {height} is {width * height:,} pixels, over the limit of "
                         f"{max_pixels:,} ({option_name('max_pixels')})")
    # A PNG's eXIf after the pixels would need a full decode to see; only an early one counts.
    early = img.format != "PNG" or "exif" in img.info
    orientation = int(img.getexif().get(ORIENTATION, 1)) if early else 1
    return ((height, width) if orientation in (5, 6, 7, 8) else (width, height)), orientation


def _frames_info(img: Image.Image, size_wh: tuple[int, int], max_pixels: int) -> ImageInfo:
    """Frame count and sizes (a TIFF's pages from their tags), and the bomb check over all frames."""
    frames = int(getattr(img, "n_frames", 1)) if img.format in MULTI_FRAME_FORMATS else 1
    info = ImageInfo(img.format or "", size_wh, max(frames, 1))
    if frames > 1 and img.format == "TIFF":  # pages exist in the file (Pillow walks them), so the list is bounded
        sizes = []
        for index in range(frames):
            img.seek(index)
            width, height = img.tag_v2.get(256, img.size[0]), img.tag_v2.get(257, img.size[1])
            sizes.append((height, width) if img.tag_v2.get(ORIENTATION, 1) in (5, 6, 7, 8) else (width, height))
        img.seek(0)
        if min(w * h for w, h in sizes) == 0:
            raise InputError(f"page {[w * h for w, h in sizes].index(0) + 1} has no pixels")
        info = ImageInfo(info.format, size_wh, frames, tuple(sizes))
    if info.pixels > max_pixels:
        kind = "pages" if info.page_sizes else f"frames of {size_wh[0]} x {size_wh[1]}"
        raise InputError(f"{frames:,} {kind} are {info.pixels:,} pixels in all, over the limit of {max_pixels:,} "
                         f"({option_name('max_pixels')})")
    return info


def read_frames(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Animation, Iterator[Frame]]:
    """A multi-frame file: its header facts, and its frames decoded one at a time (iterate once).

    Animations (GIF, APNG, WebP) come as whole composited frames, 8-bit (L, LA, RGB or RGBA;
    a frame whose alpha is all opaque comes without it); TIFF pages as `read_image` reads a
    still TIFF (8/16-bit, gray, alpha). A damaged frame raises InputError when it is reached.
    """
    path = Path(path)
    data = _read_bytes(path)
    codec = codecs.prepare(data[:HEAD])
    if codec is not None:  # one still image (HEIF, AVIF, JPEG XL), at the full depth read_image reads
        image = _decode_image(data, codec, max_pixels)
        anim = Animation(ImageInfo(codec, image.size_wh), None, False, image.icc_profile, image.exif, image.notes)
        return anim, iter([Frame(image.pixels)])
    try:
        img = Image.open(io.BytesIO(data))
        size_wh, orientation = _check_header(img, max_pixels)
        info = _frames_info(img, size_wh, max_pixels)
        loop = img.info.get("loop")
        notes = ()
        if info.format == "GIF" and not data.rstrip(b"\0").endswith(b";"):  # Pillow stops quietly at a cut frame
            notes = (f"the GIF ends without its trailer; it may have been cut short after frame {info.frames}",)
        anim = Animation(info, None if loop is None else int(loop), bool(img.info.get("default_image")),
                         img.info.get("icc_profile") if img.mode != "CMYK" else None,
                         _carried_exif(img.getexif(), data), notes)
    except InputError:
        raise
    except _PILLOW_ERRORS as exc:
        raise InputError(_unreadable(exc, data[:HEAD])) from exc
    return anim, _frames(img, data, anim, orientation)


def _frames(img: Image.Image, data: bytes, anim: Animation, orientation: int) -> Iterator[Frame]:
    pages = anim.format == "TIFF"
    if pages:
        data, orientations = _unturned_tiff(data, anim.frames)
        img.close()
        img = Image.open(io.BytesIO(data))  # Pillow 11+ would turn the pages by their tags itself
    with img:
        for index in range(anim.frames):
            try:
                img.seek(index)
                img.load()
                if pages:
                    frame = Frame(_orient(_tiff_page(img, data, index), orientations[index]))
                else:
                    duration = img.info.get("duration")
                    disposal = getattr(img, "disposal_method", img.info.get("disposal"))
                    blend = img.info.get("blend") if anim.format == "PNG" else None
                    frame = Frame(_orient(_animation_pixels(img), orientation),
                                  None if duration is None else float(duration),
                                  None if disposal is None else int(disposal), None if blend is None else int(blend))
            except InputError as exc:
                raise InputError(f"frame {index + 1} of {anim.frames}: {exc}") from exc
            except _PILLOW_ERRORS as exc:
                raise InputError(f"frame {index + 1} of {anim.frames}: {_unreadable(exc, data[:HEAD])}") from exc
            expected = anim.info.frame_size(index)
            if frame.pixels.shape[1::-1] != expected:
                raise InputError(f"frame {index + 1} of {anim.frames} is {frame.pixels.shape[1]} x "
                                 f"{frame.pixels.shape[0]}, not the {expected[0]} x {expected[1]} of its header")
            yield frame


def _animation_pixels(img: Image.Image) -> np.ndarray:
    """One composited frame as 8-bit L, LA, RGB or RGBA (16-bit gray stays 16-bit); opaque alpha is dropped."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):
        return np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        alpha = "A" in img.getbands() or "transparency" in img.info
        img = img.convert("RGBA" if alpha else "L" if img.mode == "1" else "RGB")
    pixels = np.asarray(img)
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4) and bool((pixels[..., -1] == 255).all()):
        pixels = pixels[..., 0] if pixels.shape[2] == 2 else pixels[..., :3]
    return np.ascontiguousarray(pixels)


def _tiff_page(img: Image.Image, data: bytes, index: int) -> np.ndarray:
    """One stored page as read_image decodes a still TIFF: OpenCV for 16-bit samples, Pillow otherwise."""
    pixels = None
    buf = np.frombuffer(data, np.uint8)
    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    for pages in ({"range": (index, index + 1)}, {}):  # OpenCV before 4.9 has no range: every page at once
        try:
            ok, mats = cv2.imdecodemulti(buf, flags, **pages)
        except (TypeError, cv2.error):
            continue
        mats = list(mats) if pages else list(mats)[index:index + 1]
        if ok and len(mats) == 1 and mats[0] is not None and mats[0].size:
            pixels = mats[0]
        break
    if pixels is None:
        if img.mode not in ("L", "LA", "RGB", "RGBA", "I;16"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        pixels = np.asarray(img)
    elif pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    if img.mode in ("LA", "La") and pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = pixels[..., [0, 3]]  # OpenCV expands gray + alpha to RGBA
    if pixels.dtype not in (np.uint8, np.uint16):
        pixels = _to_supported(pixels)
    return pixels


def _stored_tiff(data: bytes) -> bytes:
    """A copy of a TIFF with orientation 1, so that every decoder hands over the stored pixels.

    OpenCV 5 and Pillow 11+ turn TIFFs by their orientation tag themselves (OpenCV even with
    IMREAD_IGNORE_ORIENTATION), older versions do not; _orient then turns them exactly once.
    """
    return _unturned_tiff(data, pages=1)[0]


def _unturned_tiff(data: bytes, pages: int) -> tuple[bytes, list[int]]:
    """`_stored_tiff` over the first `pages` pages: (the copy, each page's orientation)."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8 or struct.unpack(order + "H", data[2:4])[0] != 42:
        return data, [1] * pages
    out, orientations, seen = bytearray(data), [], set()
    offset = struct.unpack(order + "I", data[4:8])[0]
    while len(orientations) < pages and 0 < offset and offset + 2 <= len(data) and offset not in seen:
        seen.add(offset)
        count = struct.unpack(order + "H", data[offset:offset + 2])[0]
        orientation = 1
        for pos in range(offset + 2, min(offset + 2 + 12 * count, len(data) - 11), 12):
            if struct.unpack(order + "HH", data[pos:pos + 4]) == (ORIENTATION, 3):  # SHORT, value inline
                orientation = struct.unpack(order + "H", data[pos + 8:pos + 10])[0]
                out[pos + 8:pos + 10] = struct.pack(order + "H", 1)
        orientations.append(orientation)
        end = offset + 2 + 12 * count
        offset = struct.unpack(order + "I", data[end:end + 4])[0] if end + 4 <= len(data) else 0
    return bytes(out), orientations + [1] * (pages - len(orientations))


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(HEAD)
    except OSError:
        return b""


def _unreadable(exc: BaseException, head: bytes) -> str:
    if isinstance(exc, UnidentifiedImageError):
        if head.startswith(PNG_SIGNATURE) and len(head) >= 24 and 0 in struct.unpack(">II", head[16:24]):
            width, height = struct.unpack(">II", head[16:24])
            return f"the image has no pixels ({width} x {height})"
        codec = codecs.sniff(head)
        if codec:  # a HEIF, AVIF or JPEG XL signature whose boxes or header do not parse
            return f"truncated or damaged {codecs.NAMES[codec]} image (its header cannot be read)"
        return "not an image, or a format lmf cannot read"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, OSError) and exc.errno is not None:  # the file system's reason, not the decoder's
        return f"cannot read the file ({exc.strerror or exc})"
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
        raise InputError(_unreadable(exc, data[:HEAD])) from exc


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
    (`quality` 1..100) and JPEG has no alpha. HEIC and AVIF keep 8, 10 and 12 bits (the
    source's own depth, `image.bits`) and JPEG XL 8 and 16, with alpha; for them `quality`
    100 is lossless (see `codecs.encode`). ICC profile and EXIF (orientation 1, pixel
    dimensions updated) go into every format except GIF, which holds a palette of 255
    colours and 1-bit transparency (see `_gif_frame`). What reading could not carry
    (`image.notes`) comes first.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITABLE:
        raise InputError(f"cannot write {suffix or 'a file without an extension'}; use "
                         f"{', '.join('.' + f for f in OUTPUT_FORMATS)}")
    pixels, notes = image.pixels, []
    icc = image.icc_profile if keep_metadata else None
    exif = _exif_for(image.exif, image.size_wh) if keep_metadata and image.exif else None
    fmt = formats.BY_SUFFIX[suffix]
    if fmt.codec:
        data, notes = codecs.encode(pixels, suffix, image.bits, icc, exif, quality)
    elif fmt is formats.PNG:
        data = _encode_png(pixels, icc, exif)
    elif fmt is formats.GIF:
        frame, notes = _eight_bit(pixels, "GIF", image.bits)
        data = _encode_gif([_gif_frame(frame)], [None], [None], None)
        notes += _dropped_by_gif(icc, exif)
    elif fmt is formats.TIFF and (pixels.dtype == np.uint8 or pixels.ndim == 2):
        data = codecs.encode_pillow(pixels, fmt.pillow[0], icc, exif)
    elif fmt is formats.TIFF:
        if pixels.shape[2] == 2:
            pixels = pixels[..., [0, 0, 0, 1]]
            notes.append("16-bit gray + alpha TIFF is written as RGBA")
        data, notes = _tiff_metadata(_encode_cv2(pixels, ".tiff"), icc, exif, notes)
    else:  # 8 bits through Pillow: JPEG, WebP
        pixels, notes = _eight_bit(pixels, suffix[1:].upper(), image.bits)
        if fmt.alpha is Alpha.NONE and pixels.ndim == 3 and pixels.shape[2] in (2, 4):
            pixels = pixels[..., 0] if pixels.shape[2] == 2 else pixels[..., :3]
            notes.append(f"{fmt.name} has no alpha channel: alpha was dropped (use {_KEEP_ALPHA} to keep it)")
        data = codecs.encode_pillow(pixels, fmt.pillow[0], icc, exif, quality=quality)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return [*image.notes, *notes]


def _tiff_metadata(tiff: bytes, icc: bytes | None, exif: bytes | None, notes: list[str]) -> tuple[bytes, list[str]]:
    """OpenCV's 16-bit TIFF with the ICC profile and EXIF added (see `tiffmeta`); a BigTIFF keeps neither."""
    try:
        return add_metadata(tiff, icc, exif), notes
    except ValueError as exc:
        return tiff, [*notes, f"the ICC profile and EXIF could not be added to this TIFF ({exc}); use PNG to keep them"]


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


# Multi-frame files ---------------------------------------------------------------------------------------

def frames_refusal(info: ImageInfo, suffix: str) -> str | None:
    """Why a file of several frames cannot be written as `suffix` (a reason for the user), or None."""
    suffix, frames = suffix.lower(), info.frames
    if frames <= 1:
        return None
    kind = "pages" if info.format == "TIFF" else "frames"
    if suffix not in ANIMATED_SUFFIXES and suffix not in PAGED_SUFFIXES:
        name = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(suffix, suffix[1:].upper() or "a file without an extension")
        keep = "tiff" if kind == "pages" else "gif, png (APNG), webp or tiff"
        return (f"it has {frames} {kind} and {name} holds one image; write {keep} ({option_name('format')}) "
                "to keep them all")
    if kind == "pages" and suffix not in PAGED_SUFFIXES:
        return (f"it has {frames} pages, which only TIFF keeps as pages (not as frames of an animation); "
                "write tiff or split the pages first")
    if suffix not in PAGED_SUFFIXES and not info.same_size:
        return f"its {frames} {kind} differ in size, which only TIFF can hold"
    return None


def write_frames(path: str | Path, frames: Iterable[Frame], anim: Animation, quality: int = 95,
                 keep_metadata: bool = True) -> list[str]:
    """Write every frame, atomically, as an animation (.gif, .png = APNG, .webp) or pages (.tif/.tiff).

    Frames are consumed one at a time and kept only in the output's compact form. Durations,
    loop count and disposal are kept (disposal renumbered between GIF and APNG; WebP's encoder
    decides its own); the frames are whole canvases, so the animation looks as the source did.
    GIF frames are quantised back to a palette each (see `_gif_frame`). Returns what the format
    could not keep, as `write_image` does.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    reason = frames_refusal(anim.info, suffix)
    if reason is not None:
        raise InputError(reason)
    icc = anim.icc_profile if keep_metadata else None
    exif = anim.exif if keep_metadata else None
    if suffix in PAGED_SUFFIXES:
        data, notes = _encode_pages(frames, icc, exif)
        if anim.format != "TIFF":
            notes.append("TIFF pages have no durations or loop count; the frames were written as pages")
    else:
        data, notes = _encode_animation(frames, anim, ANIMATED_SUFFIXES[suffix], icc, exif, quality)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return [*anim.notes, *notes]


def _eight_bit(pixels: np.ndarray, name: str, bits: int | None = None) -> tuple[np.ndarray, list[str]]:
    """uint16 samples rounded to 8 bits, and the note saying so (`bits`: the source's depth, None: 16)."""
    if pixels.dtype == np.uint16:
        return (((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8),
                [f"{name} is 8-bit: {bits or 16}-bit samples were reduced"])
    return pixels, []


def _rgb_or_rgba(pixels: np.ndarray) -> np.ndarray:
    """Gray -> RGB, gray + alpha -> RGBA (animated outputs hold one colour mode for every frame)."""
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    if pixels.shape[2] == 2:
        return pixels[..., [0, 0, 0, 1]]
    return pixels


def _gif_frame(pixels: np.ndarray) -> Image.Image:
    """An 8-bit frame as a GIF palette image.

    The model works in RGBA; GIF holds 256 colours and 1-bit transparency per frame. Each frame
    gets its own adaptive palette (median cut over its opaque colours, no dithering, so that
    still regions do not shimmer from frame to frame); alpha below 50% becomes the transparent
    index 255, the same in every frame.
    """
    pixels = _rgb_or_rgba(pixels)
    clear = pixels[..., 3] < 128 if pixels.shape[2] == 4 else None
    quantised = Image.fromarray(np.ascontiguousarray(pixels[..., :3])).quantize(
        GIF_TRANSPARENT, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette = (quantised.getpalette() or [])[:3 * GIF_TRANSPARENT]
    palette += [0] * (3 * 256 - len(palette))
    if clear is None or not clear.any():
        quantised.putpalette(palette)
        return quantised
    index = np.asarray(quantised).copy()
    index[clear] = GIF_TRANSPARENT
    frame = Image.fromarray(index, "P")
    frame.putpalette(palette)
    frame.info["transparency"] = GIF_TRANSPARENT
    return frame


def _encode_gif(frames: list[Image.Image], durations: list[float | None], disposals: list[int | None],
                loop: int | None) -> bytes:
    """A GIF of whole palette frames, each with its own colour table.

    Written frame by frame (Pillow's `getdata`) rather than by Pillow's animated GIF writer,
    which crops and merges frames by colour comparisons that lose pixels equal to its
    background colour after a "restore to background" frame.
    """
    width, height = frames[0].size
    out = [b"GIF89a", struct.pack("<HHBBB", width, height, 0, 0, 0)]  # no global colour table
    if loop is not None:
        out.append(b"!\xff\x0bNETSCAPE2.0\x03\x01" + struct.pack("<H", min(max(int(loop), 0), 65535)) + b"\x00")
    for frame, duration, disposal in zip(frames, durations, disposals, strict=True):
        params = {"include_color_table": True, "disposal": disposal or 0,
                  "duration": min(max(round(duration or 0), 0), 655350)}
        if "transparency" in frame.info:
            params["transparency"] = frame.info["transparency"]
        out += GifImagePlugin.getdata(frame, (0, 0), **params)
    out.append(b";")
    return b"".join(out)


def _dropped_by_gif(icc: bytes | None, exif: bytes | None) -> list[str]:
    dropped = [name for name, value in (("ICC profile", icc), ("EXIF", exif)) if value]
    return [f"GIF cannot carry the {' and '.join(dropped)}; dropped (use PNG to keep them)"] if dropped else []


# Disposal numbers: GIF 0 unspecified, 1 keep, 2 restore background, 3 restore previous;
# APNG 0 none (keep), 1 background, 2 previous. Unknown (WebP, whose decoder composites) -> background,
# which is exact for whole frames.
_GIF_FROM_APNG = {0: 1, 1: 2, 2: 3}
_APNG_FROM_GIF = {0: 0, 1: 0, 2: 1, 3: 2}


def _disposal(value: int | None, source: str, target: str) -> int:
    """The source frame's disposal in the target's numbering."""
    if target == "GIF":
        if source == "GIF" and value in (0, 1, 2, 3):
            return value
        return _GIF_FROM_APNG.get(value, 2) if source == "PNG" else 2
    if source == "PNG" and value in (0, 1, 2):
        return value
    return _APNG_FROM_GIF.get(value, 1) if source == "GIF" else 1


def _encode_animation(frames: Iterable[Frame], anim: Animation, target: str, icc: bytes | None,
                      exif: bytes | None, quality: int) -> tuple[bytes, list[str]]:
    images: list[Image.Image] = []
    durations: list[float | None] = []
    disposals: list[int] = []
    blends: list[int] = []
    notes: list[str] = []
    record = formats.BY_PILLOW[target]
    for index, frame in enumerate(frames):
        if index == 0 and anim.default_image and target != "PNG":
            continue  # the APNG's still image for viewers without animation is not a frame of it
        pixels, reduced = _eight_bit(frame.pixels, record.animation_name or record.name)
        if reduced and not notes:
            notes += reduced
        durations.append(frame.duration)
        disposals.append(_disposal(frame.disposal, anim.format, target))
        same = anim.format == "PNG" and frame.blend in (0, 1)
        blends.append(frame.blend if same else 0)  # whole frames: "source" replaces the canvas exactly
        images.append(_gif_frame(pixels) if target == "GIF" else Image.fromarray(_rgb_or_rgba(pixels)))
    if not images:
        raise InputError("no frames to write")
    loop = anim.loop
    if target == "GIF":  # a GIF without a loop count plays once
        notes += _dropped_by_gif(icc, exif)
        return _encode_gif(images, durations, disposals, None if loop == 1 else loop), notes
    if any(im.mode == "RGBA" for im in images):
        images = [im if im.mode == "RGBA" else im.convert("RGBA") for im in images]
    options: dict = {"save_all": True, "append_images": images[1:], "loop": 1 if loop is None else loop}
    first = 1 if anim.default_image and target == "PNG" else 0  # Pillow times the animation's frames only
    if all(d is not None for d in durations[first:]):
        options["duration"] = [float(d) if target == "PNG" else round(d) for d in durations[first:]]
    if target == "PNG":
        options.update(disposal=disposals[first:], blend=blends[first:], default_image=anim.default_image)
    else:
        options.update(quality=quality)
    return _save_all(images, target, options, icc, exif, f"the {target} animation"), notes


def _save_all(images: list[Image.Image], target: str, options: dict, icc: bytes | None, exif: bytes | None,
              what: str) -> bytes:
    """Encode several frames or pages with Pillow, with the ICC profile and EXIF, into bytes."""
    if icc:
        options["icc_profile"] = icc
    if exif:
        options["exif"] = _exif_for(exif, images[0].size)
    buf = io.BytesIO()
    try:
        images[0].save(buf, format=target, **options)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"could not encode {what} ({' '.join(str(exc).split())})") from exc
    return buf.getvalue()


def _encode_pages(frames: Iterable[Frame], icc: bytes | None, exif: bytes | None) -> tuple[bytes, list[str]]:
    """A multi-page TIFF: Pillow writes 8-bit pages and 16-bit gray; 16-bit colour goes through OpenCV and
    `tiffmeta` (ICC profile and EXIF on the first page)."""
    pages = [frame.pixels for frame in frames]
    if not pages:
        raise InputError("no pages to write")
    notes: list[str] = []
    if all(p.dtype == np.uint8 or p.ndim == 2 for p in pages):
        images = [Image.fromarray(p) for p in pages]
        options: dict = {"save_all": True, "append_images": images[1:]}
        return _save_all(images, "TIFF", options, icc, exif, "the TIFF pages"), notes
    if any(p.ndim == 3 and p.shape[2] == 2 for p in pages):
        notes.append("16-bit gray + alpha TIFF is written as RGBA")
    mats = []
    for p in pages:
        if p.dtype == np.uint8:
            p = p.astype(np.uint16) * 257  # OpenCV writes one depth per file
        if p.ndim == 3 and p.shape[2] == 2:
            p = p[..., [0, 0, 0, 1]]
        mats.append(cv2.cvtColor(p, cv2.COLOR_RGBA2BGRA if p.shape[2] == 4 else cv2.COLOR_RGB2BGR) if p.ndim == 3
                    else p)
    try:
        ok, buf = cv2.imencodemulti(".tiff", mats)
    except cv2.error as exc:
        raise InputError(f"could not encode the TIFF pages ({' '.join(str(exc).split())})") from exc
    if not ok:
        raise InputError("could not encode the TIFF pages")
    return _tiff_metadata(buf.tobytes(), icc, _exif_for(exif, pages[0].shape[1::-1]) if exif else None, notes)
