"""One record per image format: what lmf reads and writes of it, and how; every format table is made here.

An `ImageFormat` says which extensions name the format (the first is the one written), Pillow's names
for it, the bit depths read and written, how much alpha it holds, whether its extra frames are an
animation or pages, the metadata carried through it, the package that provides it (and how to tell
that this install has it), how `compression` tells a compressed file of it from a clean one, and how
lmf writes it. The tables the rest of lmf uses (`FORMATS`, `OUTPUT_FORMATS`, `WRITABLE`,
`IMAGE_SUFFIXES`, ... re-exported by `images`; `codecs.SUFFIX_FORMATS` and `codecs.NAMES`), the
`--format` help and the README's format table are all made from `IMAGE_FORMATS`; a format is added
or changed here, and the code that encodes it (`images`, `codecs`) is the only other place to touch.

Nothing heavy is imported here: a provider's package is imported only when asked whether it is there.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from types import ModuleType


class Alpha(Enum):
    """How much transparency a format holds."""

    FULL = "yes"
    BINARY = "1-bit"  # GIF: a pixel is transparent or not
    NONE = "no"


class Frames(Enum):
    """What the further images of one file are to lmf."""

    NONE = "-"  # one image: a file's extra images (an MPO's previews, an animated AVIF's frames) are left out
    ANIMATION = "animation"  # frames with durations and disposal, and a loop count
    PAGES = "pages"  # pages, each at its own size and bit depth


class Compression(Enum):
    """How `compression.input_quality` tells a compressed file of the format from a clean one."""

    NEVER = "a lossless format: clean"
    JPEG_TABLES = "the quality its luminance quantisation table was scaled for"
    WEBP_CHUNK = "its VP8L (lossless) or VP8 (lossy) chunk"
    ALWAYS = "lossy in practice, as phones and browsers write it: compressed"
    UNTOLD = "often lossless, with no reliable tell: taken as clean"


class Coding(Enum):
    """How lmf writes the format; quality is --jpeg-quality."""

    LOSSLESS = "lossless"
    PALETTE = "255 colours a frame"
    LOSSY = "lossy"
    LOSSLESS_AT_100 = "lossy; lossless at quality 100"
    NEAR_LOSSLESS_AT_100 = "lossy; 4:4:4 at quality 100, within one step of lossless"


@dataclass(frozen=True)
class Provider:
    """The package a format needs, and how to tell that this install has it."""

    package: str  # what pip installs
    module: str  # what is imported
    feature: str | None = None  # a Pillow feature the build must have (PIL.features.check), e.g. "avif"

    def load(self) -> ModuleType | None:
        """The provider's module, or None where it is missing (or its build lacks `feature`)."""
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return None
        if self.feature is not None:
            from PIL import features

            if not features.check(self.feature):
                return None
        return module

    def available(self) -> bool:
        return self.load() is not None

    def missing(self, doing: str, name: str) -> str:
        """The one line saying what to install, e.g. "reading HEIC needs the pillow-heif package (...)"."""
        if self.feature is not None:
            return f"{doing} {name} needs a Pillow with {self.feature.upper()} (pip install -U {self.package})"
        return f"{doing} {name} needs the {self.package} package (pip install {self.package})"


@functools.cache
def opencv_avif() -> bool:
    """Whether this OpenCV reads and writes 10/12-bit AVIF with metadata (libavif and the 4.12+ metadata API)."""
    import cv2

    return (hasattr(cv2, "imencodeWithMetadata") and hasattr(cv2, "IMWRITE_AVIF_DEPTH")
            and bool(cv2.haveImageWriter("x.avif")))


PILLOW = Provider("pillow", "PIL")  # with OpenCV, a dependency of lmf: always there
ICC_EXIF = ("ICC", "EXIF")


@dataclass(frozen=True)
class ImageFormat:
    """One image format as lmf knows it.

    Depths are bits per sample: 8 reads and writes as uint8; deeper as uint16 over the full
    0..65535 range, the file's own depth kept in `ImageFile.bits` where it is not 16.
    """

    name: str  # as users know it: messages, help, the README
    extensions: tuple[str, ...]  # lower case with the dot, as written and read; the first is the one written
    pillow: tuple[str, ...]  # Pillow's Image.format names; the first is what its frames are saved as
    read_depths: tuple[int, ...]
    write_depths: tuple[int, ...] = ()  # (): read only
    alpha: Alpha = Alpha.FULL
    frames: Frames = Frames.NONE
    metadata: tuple[str, ...] = ICC_EXIF  # read from its files and written into them; "ICC", "EXIF"
    orientation: str = "EXIF tag"  # where reading finds which way up the image is
    provider: Provider = PILLOW  # what reading and writing it need
    library: str = "Pillow, OpenCV"  # who does the work, for the README
    compression: Compression = Compression.NEVER
    coding: Coding | None = Coding.LOSSLESS  # None for a format lmf does not write
    read_extensions: tuple[str, ...] = ()  # further extensions read, never written (.apng: APNG is written as .png)
    alike: bool = True  # the extensions name one format (--format jpeg writes .jpg); False: each its own (.heif)
    animation_name: str | None = None  # what its animations are called where not `name` (PNG: APNG)
    magic: tuple[bytes, ...] = ()  # the first bytes `codecs.sniff` knows the format by ...
    brands: frozenset[bytes] = frozenset()  # ... or its ISOBMFF ftyp brands
    deep: Callable[[], bool] | None = None  # whether this install reads and writes its depths above 8, if not always
    note: str = ""  # one line for the README

    @property
    def suffix(self) -> str:
        """The extension written."""
        return self.extensions[0]

    @property
    def writable(self) -> bool:
        return bool(self.write_depths)

    @property
    def all_extensions(self) -> tuple[str, ...]:
        return self.extensions + self.read_extensions

    @property
    def codec(self) -> bool:
        """Read and written by `codecs`: told by its own signature before Pillow, decoded at full depth."""
        return bool(self.magic or self.brands)

    def deep_available(self) -> bool:
        return self.provider.available() and (self.deep is None or self.deep())


PNG = ImageFormat(
    "PNG", (".png",), ("PNG",), (8, 16), (8, 16), frames=Frames.ANIMATION, animation_name="APNG",
    read_extensions=(".apng",), orientation="EXIF tag (an eXIf before the pixels)",
    library="OpenCV (iCCP, eXIf and gray + alpha by lmf); APNG: Pillow",
    note="APNG is read from .png and .apng and written as .png; animations are 8-bit")
JPEG = ImageFormat(
    "JPEG", (".jpg", ".jpeg"), ("JPEG", "MPO"), (8,), (8,), Alpha.NONE, compression=Compression.JPEG_TABLES,
    coding=Coding.LOSSY, library="Pillow (libjpeg); OpenCV reads",
    note="alpha is dropped, with a warning; an MPO's extra pictures (a camera's previews) are left out")
WEBP = ImageFormat(
    "WebP", (".webp",), ("WEBP",), (8,), (8,), frames=Frames.ANIMATION, provider=Provider("pillow", "PIL", "webp"),
    library="Pillow (libwebp)", compression=Compression.WEBP_CHUNK, coding=Coding.LOSSY,
    note="written lossy at every quality")
GIF = ImageFormat(
    "GIF", (".gif",), ("GIF",), (8,), (8,), Alpha.BINARY, Frames.ANIMATION, metadata=(), orientation="-",
    library="Pillow (frames written by lmf)", coding=Coding.PALETTE,
    note="each frame gets its own 255 colours (median cut, no dithering) and alpha under 50% becomes "
         "transparent; a still GIF is written as PNG unless GIF is asked for")
TIFF = ImageFormat(
    "TIFF", (".tiff", ".tif"), ("TIFF",), (8, 16), (8, 16), frames=Frames.PAGES, orientation="tag 274",
    library="Pillow; OpenCV for 16-bit colour (ICC, EXIF added by lmf)",
    note="16-bit colour keeps its ICC profile and EXIF too; 16-bit gray + alpha is written as RGBA")
AVIF = ImageFormat(
    "AVIF", (".avif",), ("AVIF",), (8, 10, 12), (8, 10, 12), orientation="irot/imir",
    provider=Provider("pillow", "PIL", "avif"), deep=opencv_avif,
    library="Pillow 11.3+ (libavif); 10, 12-bit: OpenCV with libavif", compression=Compression.ALWAYS,
    coding=Coding.LOSSLESS_AT_100, brands=frozenset({b"avif", b"avis"}),
    note="an OpenCV without AVIF leaves 8 bits (warned); an animated AVIF gives its first frame")
HEIC = ImageFormat(
    "HEIC", (".heic", ".heif"), ("HEIF",), (8, 10, 12), (8, 10, 12), orientation="irot/imir, by libheif",
    provider=Provider("pillow-heif", "pillow_heif"), library="pillow-heif (libheif, x265)",
    compression=Compression.ALWAYS, coding=Coding.NEAR_LOSSLESS_AT_100, alike=False,
    brands=frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}),
    note="the primary image only: depth maps, auxiliary images (HDR gain map) and further images are left out, "
         "warned")
JXL = ImageFormat(
    "JPEG XL", (".jxl",), ("JXL",), (8, 16), (8, 16), orientation="codestream, by libjxl",
    provider=Provider("pyjpegxl", "pyjpegxl"), library="pyjpegxl (libjxl), Python 3.11+",
    compression=Compression.UNTOLD, coding=Coding.LOSSLESS_AT_100,
    magic=(b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n"),  # a bare codestream, the container
    note="other depths and float samples are read as 16-bit; 10, 12-bit inputs are written as 16-bit")
BMP = ImageFormat(
    "BMP", (".bmp",), ("BMP",), (8,), alpha=Alpha.NONE, metadata=(), orientation="-", coding=None,
    note="read only: an upscaled BMP is written as PNG")

# In this order: --format lists them so, and codecs.sniff tries brands so (an AVIF carries HEIF's mif1 too).
IMAGE_FORMATS: tuple[ImageFormat, ...] = (PNG, JPEG, WEBP, GIF, TIFF, AVIF, HEIC, JXL, BMP)
WRITERS = tuple(f for f in IMAGE_FORMATS if f.writable)
BY_SUFFIX = {ext: f for f in IMAGE_FORMATS for ext in f.all_extensions}
BY_PILLOW = {name: f for f in IMAGE_FORMATS for name in f.pillow}

# The tables the rest of lmf reads, all made from the records.
FORMATS = {ext[1:]: f.suffix if f.alike else ext for f in WRITERS for ext in f.extensions}  # --format -> extension
OUTPUT_FORMATS = tuple(f.suffix[1:] for f in WRITERS)  # --format's names; FORMATS has aliases
FORMAT_CHOICES = (*OUTPUT_FORMATS, *(ext[1:] for f in WRITERS if f.alike for ext in f.extensions[1:]))
WRITABLE = frozenset(ext for f in WRITERS for ext in f.extensions)
IMAGE_SUFFIXES = set(BY_SUFFIX)  # what a folder is searched for
# Formats whose extra frames are part of the picture (other kinds, e.g. a camera's MPO preview, keep frame 1).
MULTI_FRAME_FORMATS = frozenset(name for f in IMAGE_FORMATS if f.frames is not Frames.NONE for name in f.pillow)
ANIMATED_SUFFIXES = {ext: f.pillow[0] for f in WRITERS if f.frames is Frames.ANIMATION for ext in f.extensions}
PAGED_SUFFIXES = frozenset(ext for f in WRITERS if f.frames is Frames.PAGES for ext in f.extensions)
CODEC_FORMATS = tuple(f for f in IMAGE_FORMATS if f.codec)
CODEC_SUFFIXES = {ext: f.pillow[0] for f in CODEC_FORMATS for ext in f.extensions}  # codecs.SUFFIX_FORMATS
CODEC_NAMES = {f.pillow[0]: f.name for f in CODEC_FORMATS}  # codecs.NAMES


def or_list(items: Iterable[str]) -> str:
    """"a, b or c"."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def format_help() -> str:
    """The help of --format: the names it writes."""
    return f"{or_list(OUTPUT_FORMATS)} (default: as the input)."


def _depths(depths: tuple[int, ...]) -> str:
    return f"{', '.join(map(str, depths))}-bit" if depths else "-"


def _row(f: ImageFormat) -> list[str]:
    extensions = ", ".join(f.extensions) + (f" (reads {', '.join(f.read_extensions)})" if f.read_extensions else "")
    alpha = "no (dropped, warned)" if f.alpha is Alpha.NONE and f.writable else f.alpha.value
    frames = {Frames.NONE: "-", Frames.PAGES: "pages", Frames.ANIMATION: f"{f.animation_name or f.name} animation"}
    metadata = " + ".join(f.metadata) if f.metadata else "no (warned)" if f.writable else "-"
    return [f.name, extensions, _depths(f.read_depths), _depths(f.write_depths), f.coding.value if f.coding else "-",
            alpha, frames[f.frames], metadata, f.orientation, f.library, f.note]


def format_table() -> str:
    """The README's table of formats, one row per record."""
    head = ["format", "extensions", "reads", "writes", "writing", "alpha", "animation / pages", "metadata kept",
            "orientation on read", "provided by", "notes"]
    rows = [head, ["---"] * len(head), *(_row(f) for f in IMAGE_FORMATS)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
