"""Each image format record's claims, checked on small files written and read back here; the tables made from them.

A claim is checked in both directions where it can be: a format that keeps alpha gives it back, one
that does not drops it with a note; a depth it writes comes back at that depth, a deeper one comes
back reduced, with a note. Formats whose provider is missing here are skipped, saying what to install.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageCms

from lmf_cli.errors import InputError
from lmf_cli.io import codecs, compression, formats, images
from lmf_cli.io.formats import IMAGE_FORMATS, Alpha, Coding, Compression, Frames, ImageFormat
from lmf_cli.io.images import (
    Animation,
    Frame,
    ImageFile,
    ImageInfo,
    frames_refusal,
    inspect_image,
    read_frames,
    read_image,
    write_frames,
    write_image,
)

H, W = 12, 16  # 192 pixels: at most 192 colours, within a GIF's palette
WRITERS = [f for f in IMAGE_FORMATS if f.writable]
READ_ONLY = [f for f in IMAGE_FORMATS if not f.writable]
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
MAKE = 0x010F
rng = np.random.default_rng(7)


def by_name(fmt: ImageFormat) -> str:
    return fmt.name


def each(records: list[ImageFormat]):
    return pytest.mark.parametrize("fmt", records, ids=by_name)


def needs(fmt: ImageFormat, depth: int = 8) -> None:
    """Skip, naming what to install, where this install cannot handle the format (at `depth`)."""
    if not fmt.provider.available():
        pytest.skip(fmt.provider.missing("handling", fmt.name))
    if depth > 8 and not fmt.deep_available():
        pytest.skip(f"{fmt.name} deeper than 8 bits is not available here ({fmt.library})")


def camera_exif() -> bytes:
    exif = Image.Exif()
    exif[MAKE] = "LMF Camera"
    return exif.tobytes()


def noise(channels: int = 3, dtype=np.uint8, bits: int = 8, size: tuple[int, int] = (H, W)) -> np.ndarray:
    shape = size if channels == 1 else (*size, channels)
    raw = rng.integers(0, 1 << bits, shape).astype(dtype)
    return codecs.widen(raw, bits) if dtype == np.uint16 and bits < 16 else raw


def with_alpha(rgb: np.ndarray) -> np.ndarray:
    """RGB with an alpha ramp from clear to opaque across the width."""
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).round().astype(rgb.dtype), (rgb.shape[0], 1))
    return np.dstack([rgb, alpha])


def write(tmp_path, fmt: ImageFormat, image: ImageFile, quality: int = 95, name: str = "out") -> tuple[ImageFile, list]:
    path = tmp_path / f"{name}{fmt.suffix}"
    notes = write_image(path, image, quality)
    return read_image(path), notes


def errors(fmt: ImageFormat) -> tuple[int, int]:
    """(least, most) sample error, in steps of the depth written, the record's coding says quality 100 gives
    (a palette format: on an image within its colours)."""
    return {Coding.LOSSLESS: (0, 0), Coding.PALETTE: (0, 0), Coding.LOSSLESS_AT_100: (0, 0),
            Coding.NEAR_LOSSLESS_AT_100: (1, 1), Coding.LOSSY: (1, 255)}[fmt.coding]


# Writing and reading back ---------------------------------------------------------------------------------

@each(WRITERS)
def test_eight_bit_rgb_comes_back_as_the_record_says(tmp_path, fmt):
    needs(fmt)
    pixels = noise()
    back, notes = write(tmp_path, fmt, ImageFile(pixels), quality=100)
    assert notes == [] and back.pixels.dtype == np.uint8 and back.pixels.shape == pixels.shape
    error = int(np.abs(back.pixels.astype(int) - pixels).max())
    least, most = errors(fmt)
    assert least <= error <= most, f"{fmt.name} ({fmt.coding}) is {error} off at quality 100"
    assert inspect_image(tmp_path / f"out{fmt.suffix}").format in fmt.pillow
    assert (codecs.sniff((tmp_path / f"out{fmt.suffix}").read_bytes()[:64]) == fmt.pillow[0]) == fmt.codec


@each(WRITERS)
def test_every_extension_is_written_and_read_as_the_format(tmp_path, fmt):
    needs(fmt)
    for ext in fmt.extensions:
        path = tmp_path / f"x{ext.upper()}"  # the extension is matched case-blind
        write_image(path, ImageFile(noise()))
        assert inspect_image(path).format in fmt.pillow


@each(WRITERS)
def test_quality_does_what_the_coding_says(tmp_path, fmt):
    needs(fmt)
    image, files = ImageFile(noise(size=(24, 32))), {}
    for quality in (50, 100):
        write_image(tmp_path / f"q{quality}{fmt.suffix}", image, quality)
        files[quality] = (tmp_path / f"q{quality}{fmt.suffix}").read_bytes()
    if fmt.coding in (Coding.LOSSLESS, Coding.PALETTE):
        assert files[50] == files[100]  # no quality to choose
    else:
        assert len(files[50]) < len(files[100])


def test_a_palette_format_holds_255_colours_a_frame(tmp_path):
    for fmt in (f for f in WRITERS if f.coding is Coding.PALETTE):
        back, _ = write(tmp_path, fmt, ImageFile(noise(size=(24, 32))))  # 768 colours
        assert len(np.unique(back.pixels.reshape(-1, back.pixels.shape[-1]), axis=0)) <= 255


@each(WRITERS)
def test_the_bit_depths_written_come_back(tmp_path, fmt):
    for depth in fmt.write_depths:
        needs(fmt, depth)
        dtype = np.uint8 if depth == 8 else np.uint16
        pixels = noise(3, dtype, depth)
        back, notes = write(tmp_path, fmt, ImageFile(pixels, bits=None if depth in (8, 16) else depth), 100,
                            f"d{depth}")
        assert notes == [], f"{fmt.name} {depth}-bit"
        assert back.pixels.dtype == dtype and depth in fmt.read_depths  # what lmf writes, it reads
        if depth > 8:  # the file's own depth; None: all 16
            assert (back.bits or 16) == depth
            back.pixels, pixels = codecs.narrow(back.pixels, depth), codecs.narrow(pixels, depth)
        error = int(np.abs(back.pixels.astype(int) - pixels).max())
        least, most = errors(fmt)
        assert least <= error <= most, f"{fmt.name} {depth}-bit is {error} steps off at quality 100"


@each([f for f in WRITERS if max(f.write_depths) < 16])
def test_deeper_samples_than_written_are_reduced_with_a_note(tmp_path, fmt):
    needs(fmt, max(fmt.write_depths))
    back, notes = write(tmp_path, fmt, ImageFile(noise(3, np.uint16, 16)))
    assert any("reduced" in note for note in notes)
    if max(fmt.write_depths) == 8:
        assert back.pixels.dtype == np.uint8
    else:
        assert back.pixels.dtype == np.uint16 and back.bits == max(fmt.write_depths)


@each(WRITERS)
def test_alpha_as_the_record_says(tmp_path, fmt):
    needs(fmt)
    rgba = with_alpha(noise())
    back, notes = write(tmp_path, fmt, ImageFile(rgba), quality=100)
    if fmt.alpha is Alpha.NONE:
        assert back.pixels.shape[2] == 3 and any("alpha" in note for note in notes)
        return
    assert back.pixels.shape[2] == 4 and notes == []
    alpha = back.pixels[..., 3]
    if fmt.alpha is Alpha.BINARY:
        assert set(np.unique(alpha)) <= {0, 255}
        np.testing.assert_array_equal(alpha == 255, rgba[..., 3] >= 128)
    else:
        assert int(np.abs(alpha.astype(int) - rgba[..., 3]).max()) <= errors(fmt)[1]


@each(WRITERS)
def test_metadata_as_the_record_says(tmp_path, fmt):
    needs(fmt)
    back, notes = write(tmp_path, fmt, ImageFile(noise(), ICC, camera_exif()))
    assert (back.icc_profile == ICC) == ("ICC" in fmt.metadata)
    if "EXIF" in fmt.metadata:
        exif = Image.Exif()
        exif.load(back.exif)
        assert exif[MAKE] == "LMF Camera"
    else:
        assert back.exif is None
    dropped = {"ICC", "EXIF"} - set(fmt.metadata)
    assert bool(dropped) == any("ICC profile" in note or "EXIF" in note for note in notes)


@each([f for f in WRITERS if "tag" in f.orientation])  # an EXIF or TIFF tag, which Pillow writes
def test_an_exif_orientation_is_applied_on_reading(tmp_path, fmt):
    needs(fmt)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees: upright it is H wide, W high
    Image.fromarray(noise()).save(tmp_path / f"turned{fmt.suffix}", fmt.pillow[0], exif=exif.tobytes())
    assert read_image(tmp_path / f"turned{fmt.suffix}").pixels.shape[:2] == (W, H)


# Several frames ------------------------------------------------------------------------------------------

def three_frames() -> list[Frame]:
    return [Frame(noise(), float(duration)) for duration in (100, 200, 300)]


@each(WRITERS)
def test_frames_as_the_record_says(tmp_path, fmt):
    needs(fmt)
    path = tmp_path / f"frames{fmt.suffix}"
    anim = Animation(ImageInfo("GIF", (W, H), 3), loop=0)
    if fmt.frames is Frames.NONE:
        assert frames_refusal(anim.info, fmt.suffix) is not None
        with pytest.raises(InputError, match="holds one image"):
            write_frames(path, iter(three_frames()), anim)
        write_image(path, ImageFile(noise()))
        read, frames = read_frames(path)
        assert read.frames == 1 and len(list(frames)) == 1
        return
    assert frames_refusal(anim.info, fmt.suffix) is None
    if fmt.frames is Frames.ANIMATION:
        write_frames(path, iter(three_frames()), anim)
        read, frames = read_frames(path)
        assert read.format == fmt.pillow[0] and read.frames == 3 and read.loop == 0
        assert [frame.duration for frame in frames] == [100, 200, 300]
    else:  # pages, each at its own size and depth
        deep = 16 if 16 in fmt.write_depths else 8
        pages = [Frame(noise()), Frame(noise(1, np.uint16 if deep == 16 else np.uint8, deep, (5, 7)))]
        write_frames(path, iter(pages), Animation(ImageInfo(fmt.pillow[0], (W, H), 2, ((W, H), (7, 5)))))
        read, frames = read_frames(path)
        assert read.format == fmt.pillow[0] and read.frames == 2
        for page, back in zip(pages, frames, strict=True):
            np.testing.assert_array_equal(back.pixels, page.pixels)


@each([f for f in IMAGE_FORMATS if f.frames is Frames.NONE])
def test_a_format_of_one_image_says_what_it_leaves_out(tmp_path, fmt):
    """Where Pillow (with the provider's plugin) writes several images into one file, lmf reads the first
    and says how many there were."""
    needs(fmt)
    if fmt.writable:  # a codec format's Pillow plugin is registered on first reading (pillow-heif's saves too)
        write_image(tmp_path / f"one{fmt.suffix}", ImageFile(noise()))
        codecs.prepare((tmp_path / f"one{fmt.suffix}").read_bytes()[:64])
    path = tmp_path / f"several{fmt.suffix}"
    pictures = [Image.fromarray(noise()) for _ in range(3)]
    try:
        pictures[0].save(path, fmt.pillow[0], save_all=True, append_images=pictures[1:])
        with Image.open(path) as img:
            count = getattr(img, "n_frames", 1)
    except (OSError, ValueError, KeyError):
        count = 0
    if count < 2:
        pytest.skip(f"Pillow writes no {fmt.name} file of several images")
    back = read_image(path)
    assert any(str(count) in note for note in back.notes), back.notes
    assert read_frames(path)[0].frames == 1


def test_only_formats_with_frames_are_read_as_several():
    assert images.MULTI_FRAME_FORMATS == {name for f in IMAGE_FORMATS if f.frames is not Frames.NONE
                                          for name in f.pillow}


# Compression ---------------------------------------------------------------------------------------------

@each(WRITERS)
def test_compression_is_told_as_the_record_says(tmp_path, fmt):
    needs(fmt)
    found, pixels = {}, noise()
    for quality in (50, 95, 100):
        write_image(tmp_path / f"c{quality}{fmt.suffix}", ImageFile(pixels), quality)
        found[quality] = compression.input_quality(tmp_path / f"c{quality}{fmt.suffix}").kind
    lossy = {q: not np.array_equal(read_image(tmp_path / f"c{q}{fmt.suffix}").pixels, pixels) for q in (50, 100)}
    if fmt.compression is Compression.NEVER:  # a lossless format: nothing to tell
        assert not lossy[50]
    if fmt.compression is Compression.UNTOLD:  # often lossless: it can be
        assert not lossy[100]
    if fmt.compression in (Compression.JPEG_TABLES, Compression.WEBP_CHUNK):  # the tell reads the file itself
        assert found[50] == ("compressed" if lossy[50] else "clean")
    expected = {Compression.NEVER: ["clean"] * 3, Compression.UNTOLD: ["clean"] * 3,
                Compression.ALWAYS: ["compressed"] * 3, Compression.JPEG_TABLES: ["compressed", "clean", "clean"],
                Compression.WEBP_CHUNK: ["compressed"] * 3}[fmt.compression]  # lmf's WebP is always lossy
    assert [found[q] for q in (50, 95, 100)] == expected
    if fmt.compression is Compression.WEBP_CHUNK:
        Image.fromarray(noise()).save(tmp_path / f"lossless{fmt.suffix}", fmt.pillow[0], lossless=True)
        assert compression.input_quality(tmp_path / f"lossless{fmt.suffix}").kind == "clean"


def test_formats_told_by_their_signature_need_no_pixels_to_tell_compression():
    for fmt in formats.CODEC_FORMATS:  # input_quality tells them without opening them (their codec package)
        assert fmt.compression in (Compression.ALWAYS, Compression.UNTOLD)


# Read-only formats ---------------------------------------------------------------------------------------

@each(READ_ONLY)
def test_a_read_only_format_is_read_and_not_written(tmp_path, fmt):
    needs(fmt)
    for ext in fmt.all_extensions:
        path = tmp_path / f"in{ext}"
        Image.fromarray(with_alpha(noise())).save(path, fmt.pillow[0])
        back = read_image(path)
        assert back.pixels.dtype == np.uint8 and 8 in fmt.read_depths
        assert back.pixels.shape[2] == (3 if fmt.alpha is Alpha.NONE else 4)
        assert compression.input_quality(path).kind == ("clean" if fmt.compression is Compression.NEVER
                                                        else "compressed")
        assert path in images.list_images(tmp_path)
        with pytest.raises(InputError, match="cannot write"):
            write_image(tmp_path / f"out{ext}", ImageFile(noise()))


def test_read_only_extensions_are_read_as_their_format(tmp_path):
    for fmt in (f for f in WRITERS if f.read_extensions):
        for ext in fmt.read_extensions:
            write_frames(tmp_path / f"anim{fmt.suffix}", iter(three_frames()), Animation(ImageInfo("GIF", (W, H), 3)))
            (tmp_path / f"anim{fmt.suffix}").rename(tmp_path / f"anim{ext}")
            assert read_frames(tmp_path / f"anim{ext}")[0].format == fmt.pillow[0]
            assert tmp_path / f"anim{ext}" in images.list_images(tmp_path)
            with pytest.raises(InputError, match="cannot write"):
                write_image(tmp_path / f"out{ext}", ImageFile(noise()))


# The tables made from the records ------------------------------------------------------------------------

def owners(ext: str) -> list[ImageFormat]:
    return [f for f in IMAGE_FORMATS if ext in f.all_extensions]


def test_every_extension_and_pillow_name_belongs_to_one_record():
    assert images.IMAGE_SUFFIXES == {ext for f in IMAGE_FORMATS for ext in f.all_extensions}
    for ext in images.IMAGE_SUFFIXES:
        assert len(owners(ext)) == 1 and ext == ext.lower() and ext.startswith(".")
    names = [name for f in IMAGE_FORMATS for name in f.pillow]
    assert len(names) == len(set(names)) == len(formats.BY_PILLOW)


def test_writable_extensions_are_the_writers():
    assert images.WRITABLE == {ext for f in WRITERS for ext in f.extensions}
    for ext in images.IMAGE_SUFFIXES - images.WRITABLE:
        fmt = owners(ext)[0]
        assert not fmt.writable or ext in fmt.read_extensions
    for fmt in IMAGE_FORMATS:
        assert (fmt.coding is None) == (not fmt.writable) and set(fmt.write_depths) <= {8, 10, 12, 16}


def test_format_names_map_to_their_records_extension():
    assert images.OUTPUT_FORMATS == tuple(f.suffix[1:] for f in WRITERS)  # in record order
    for name, suffix in images.FORMATS.items():
        (fmt,) = owners("." + name)
        assert fmt.writable and suffix in fmt.extensions
        assert suffix == (fmt.suffix if fmt.alike else "." + name)
    assert set(images.FORMATS) == {ext[1:] for ext in images.WRITABLE}
    assert set(images.OUTPUT_FORMATS) <= set(formats.FORMAT_CHOICES) <= set(images.FORMATS)
    for name in formats.FORMAT_CHOICES:
        assert images.FORMATS[name] == owners("." + name)[0].suffix


def test_frame_tables_follow_the_records():
    for ext, pillow in images.ANIMATED_SUFFIXES.items():
        (fmt,) = owners(ext)
        assert fmt.frames is Frames.ANIMATION and pillow == fmt.pillow[0] and ext in fmt.extensions
    assert set(images.ANIMATED_SUFFIXES) == {e for f in WRITERS if f.frames is Frames.ANIMATION for e in f.extensions}
    assert images.PAGED_SUFFIXES == {e for f in WRITERS if f.frames is Frames.PAGES for e in f.extensions}


def test_codec_tables_follow_the_records():
    for ext, pillow in codecs.SUFFIX_FORMATS.items():
        (fmt,) = owners(ext)
        assert fmt.codec and fmt.pillow[0] == pillow and codecs.NAMES[pillow] == fmt.name
    assert set(codecs.SUFFIX_FORMATS) == {e for f in IMAGE_FORMATS if f.codec for e in f.extensions}


def test_the_images_tables_are_the_records_tables():
    for name in ("FORMATS", "OUTPUT_FORMATS", "WRITABLE", "IMAGE_SUFFIXES", "MULTI_FRAME_FORMATS",
                 "ANIMATED_SUFFIXES", "PAGED_SUFFIXES"):
        assert getattr(images, name) is getattr(formats, name)


def test_help_and_readme_table():
    help_text = formats.format_help()
    assert all(name in help_text for name in images.OUTPUT_FORMATS)
    lines = formats.format_table().splitlines()
    assert len(lines) == 2 + len(IMAGE_FORMATS)
    assert len({line.count(" | ") for line in lines}) == 1  # every row has every column
    for line, fmt in zip(lines[2:], IMAGE_FORMATS, strict=True):
        assert line.startswith(f"| {fmt.name} | {fmt.extensions[0]}")


def test_the_readme_table_is_the_records():
    """The README's format table is made from the records (regenerate it with formats.format_table())."""
    from pathlib import Path

    from lmf_cli.io.formats import format_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = "\n".join(line.strip() for line in readme.splitlines() if line.strip().startswith("| "))
    assert format_table() in shown
