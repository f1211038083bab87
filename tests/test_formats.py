"""HEIC, AVIF, JPEG XL and 16-bit TIFF: depth, alpha, ICC profile, EXIF and orientation, in and out.

Every file is made here, small, by the codec libraries themselves (pillow-heif, Pillow and OpenCV's
libavif, pyjpegxl), with a Display P3 profile (not sRGB) and EXIF orientation 6 where the format
can hold them, and checked against those libraries' own decoders.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys

import cv2
import numpy as np
import pillow_heif
import pytest
from PIL import Image, ImageCms, ImageOps

from lmf_cli.errors import InputError
from lmf_cli.io import codecs
from lmf_cli.io.images import (
    Animation,
    Frame,
    ImageFile,
    ImageInfo,
    probe_image,
    read_frames,
    read_image,
    write_frames,
    write_image,
)

try:
    import pyjpegxl
except ImportError:  # no wheels before Python 3.11; lmf then asks for it by name (see the missing-package test)
    pyjpegxl = None

H, W = 20, 24  # stored size; orientation 6 shows it as 20 wide, 24 high
MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def display_p3() -> bytes:
    """A Display P3 matrix/TRC ICC profile (D50-adapted primaries, gamma 2.2), built byte by byte."""
    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    text = b"LMF test Display P3\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.5151, 0.2412, -0.0011)),
            (b"gXYZ", xyz(0.2920, 0.6922, 0.0419)), (b"bXYZ", xyz(0.1571, 0.0666, 0.7841)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve), (b"cprt", b"text\0\0\0\0none\0\0\0\0")]
    offset = 128 + 4 + 12 * len(tags)
    table = body = b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + b"APPL" + bytes(24)
              + s15(0.9642) + s15(1.0) + s15(0.8249) + b"lcms" + bytes(44))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


P3 = display_p3()


def test_the_profile_of_these_tests_is_a_real_one_and_not_srgb():
    profile = ImageCms.ImageCmsProfile(io.BytesIO(P3))
    assert ImageCms.getProfileDescription(profile).strip() == "LMF test Display P3"
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    assert profile.profile.red_colorant != srgb.profile.red_colorant


def camera_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "LMF Phone"
    exif[0x0112] = orientation
    exif.get_ifd(0x8769).update({0x9003: "2026:01:02 03:04:05", 0xA002: W, 0xA003: H})
    return exif.tobytes()


def tags(exif: bytes | None) -> Image.Exif:
    out = Image.Exif()
    out.load(exif or b"")
    return out


def scene(channels: int, bits: int, height: int = H, width: int = W) -> np.ndarray:
    """Smooth ramps and a bump over the full range of `bits` (what lossy codecs keep well), raw values."""
    yy, xx = np.mgrid[0:height, 0:width]
    yy, xx = yy / (height - 1), xx / (width - 1)
    planes = [xx, yy, 1 - (xx + yy) / 2, 0.3 + 0.7 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 4)]
    raw = np.round(np.dstack(planes[:channels]) * ((1 << bits) - 1)).astype(np.uint8 if bits == 8 else np.uint16)
    return raw[..., 0] if channels == 1 else raw


def upright(stored: np.ndarray) -> np.ndarray:
    """What EXIF orientation 6 shows: the stored pixels turned 90 degrees clockwise."""
    return np.ascontiguousarray(stored.swapaxes(0, 1)[:, ::-1])


def heic(stored: np.ndarray, bits: int, **options) -> bytes:
    """A HEIC of raw `bits`-bit samples, lossless (4:4:4) unless `quality` is given."""
    mode = MODES[1 if stored.ndim == 2 else stored.shape[2]]
    data = stored
    if bits > 8:
        mode += ";16"
        options["bit_depth"] = bits
        data = (stored << (16 - bits)).astype("<u2")
    options = {"quality": -1, "chroma": 444, **options}
    buf = io.BytesIO()
    pillow_heif.encode(mode, (stored.shape[1], stored.shape[0]), np.ascontiguousarray(data).tobytes(), buf, **options)
    return buf.getvalue()


def deep_avif(stored: np.ndarray, bits: int, icc: bytes | None, exif: bytes | None) -> bytes:
    """A lossless 10/12-bit AVIF by OpenCV's libavif (which writes no irot: its orientation is 1)."""
    mat = stored if stored.ndim == 2 else cv2.cvtColor(stored, cv2.COLOR_RGBA2BGRA if stored.shape[2] == 4
                                                       else cv2.COLOR_RGB2BGR)
    kinds, values = [], []
    for kind, value in ((cv2.IMAGE_METADATA_ICCP, icc), (cv2.IMAGE_METADATA_EXIF, exif and exif[6:])):
        if value:
            kinds.append(kind)
            values.append(np.frombuffer(value, np.uint8))
    ok, buf = cv2.imencodeWithMetadata(".avif", mat, kinds, values,
                                       [cv2.IMWRITE_AVIF_DEPTH, bits, cv2.IMWRITE_AVIF_QUALITY, 100])
    assert ok
    return buf.tobytes()


def avif_raw(path) -> np.ndarray:
    """An AVIF's samples as stored, at its own depth (OpenCV: 0..1023 for 10 bits), RGB order."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    return raw if raw.ndim == 2 else cv2.cvtColor(raw, cv2.COLOR_BGRA2RGBA if raw.shape[2] == 4 else cv2.COLOR_BGR2RGB)


def jxl_exif(box: bytes) -> Image.Exif:
    return tags(box[4 + struct.unpack(">I", box[:4])[0]:])


needs_deep_avif = pytest.mark.skipif(not codecs.opencv_avif(), reason="this OpenCV has no AVIF codec")
needs_jxl = pytest.mark.skipif(pyjpegxl is None, reason="pyjpegxl (JPEG XL) needs Python 3.11+")


# HEIC ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("channels", "bits"), [(3, 10), (4, 12), (1, 10), (2, 12), (3, 8), (4, 8)])
def test_heic_reads_its_depth_alpha_profile_exif_and_orientation(tmp_path, channels, bits):
    stored = scene(channels, bits)
    icc = P3 if channels > 2 else None  # an RGB profile; gray stays gray
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(heic(stored, bits, icc_profile=icc, exif=camera_exif(6)))
    image = read_image(path)
    assert image.bits == bits and image.pixels.dtype == (np.uint8 if bits == 8 else np.uint16)
    assert image.pixels.shape == upright(stored).shape and probe_image(path) == (H, W)  # turned once, by libheif
    reference = np.asarray(pillow_heif.open_heif(path, convert_hdr_to_8bit=False))  # libheif's own samples
    if channels == 2:
        reference = reference[..., [0, 3]]  # libheif hands gray + alpha over as RGBA
    if bits > 8:
        reference = codecs.widen(reference >> (16 - bits), bits)  # 1023 of 10 bits is 65535, not 65472
    np.testing.assert_array_equal(image.pixels, reference)
    step = 65535 / ((1 << bits) - 1) if bits > 8 else 1
    expected = codecs.widen(upright(stored), bits) if bits > 8 else upright(stored)
    assert np.abs(image.pixels.astype(int) - expected).max() <= 2 * step  # 4:4:4, one YCbCr rounding
    assert image.icc_profile == icc
    assert tags(image.exif)[0x0112] == 1 and tags(image.exif)[0x010F] == "LMF Phone"

    assert write_image(tmp_path / "again.heic", image, quality=100) == []  # 100: lossless, 4:4:4
    back = pillow_heif.open_heif(tmp_path / "again.heic", convert_hdr_to_8bit=False)
    assert back.info["bit_depth"] == bits and back.size == (H, W) and back.has_alpha == (channels in (2, 4))
    assert back.info.get("icc_profile") == icc
    written = tags(back.info["exif"])
    assert written[0x0112] == 1 and written[0x010F] == "LMF Phone" and written.get_ifd(0x8769)[0xA002] == H
    assert np.abs(read_image(tmp_path / "again.heic").pixels.astype(int) - image.pixels).max() <= 2 * step
    assert write_image(tmp_path / "lossy.heic", image) == []  # --jpeg-quality 95: 4:2:0, as phones write
    lossy = read_image(tmp_path / "lossy.heic").pixels
    assert np.abs(lossy.astype(float) - image.pixels).mean() < 0.03 * (65535 if bits > 8 else 255)


def test_read_frames_of_a_heic_is_one_frame_at_full_depth(tmp_path):
    path = tmp_path / "deep.heic"
    path.write_bytes(heic(scene(3, 10), 10, icc_profile=P3))
    anim, frames = read_frames(path)
    (frame,) = list(frames)
    assert anim.format == "HEIF" and anim.frames == 1 and anim.icc_profile == P3
    np.testing.assert_array_equal(frame.pixels, read_image(path).pixels)


# AVIF ----------------------------------------------------------------------------------------------------

def test_eight_bit_avif_is_turned_by_its_orientation_and_written_back(tmp_path):
    stored = scene(4, 8)
    path = tmp_path / "phone.avif"
    Image.fromarray(stored).save(path, exif=camera_exif(6), icc_profile=P3, quality=90)  # irot/imir from EXIF
    with Image.open(path) as img:
        shown = np.asarray(ImageOps.exif_transpose(img))  # what a viewer shows
    image = read_image(path)
    np.testing.assert_array_equal(image.pixels, shown)
    assert image.pixels.shape == (W, H, 4) and image.bits == 8 and image.icc_profile == P3
    assert tags(image.exif)[0x0112] == 1 and tags(image.exif)[0x010F] == "LMF Phone"
    assert write_image(tmp_path / "out.avif", image, quality=100) == []
    np.testing.assert_array_equal(avif_raw(tmp_path / "out.avif"), shown)  # quality 100: lossless, upright
    with Image.open(tmp_path / "out.avif") as img:
        assert img.size == (H, W) and img.info["icc_profile"] == P3
        assert img.getexif().get(0x0112, 1) == 1 and img.getexif()[0x010F] == "LMF Phone"


@needs_deep_avif
@pytest.mark.parametrize(("channels", "bits"), [(3, 10), (4, 12), (1, 10)])
def test_deep_avif_keeps_its_depth_through_read_and_write(tmp_path, channels, bits):
    stored = scene(channels, bits)
    icc = P3 if channels > 1 else None
    path = tmp_path / "deep.avif"
    path.write_bytes(deep_avif(stored, bits, icc, camera_exif(1)))
    image = read_image(path)
    assert image.bits == bits and image.pixels.dtype == np.uint16 and image.icc_profile == icc
    np.testing.assert_array_equal(image.pixels, codecs.widen(stored, bits))  # lossless, full range
    assert tags(image.exif)[0x010F] == "LMF Phone"
    assert write_image(tmp_path / "out.avif", image, quality=100) == []
    np.testing.assert_array_equal(avif_raw(tmp_path / "out.avif"), stored)  # the same depth, the same samples
    with Image.open(tmp_path / "out.avif") as img:
        assert img.info.get("icc_profile") == icc and img.getexif()[0x010F] == "LMF Phone"
    lossy = write_image(tmp_path / "lossy.avif", image)
    assert lossy == [] and avif_raw(tmp_path / "lossy.avif").max() <= (1 << bits) - 1


# JPEG XL -------------------------------------------------------------------------------------------------

@needs_jxl
@pytest.mark.parametrize(("channels", "dtype"), [(3, np.uint8), (4, np.uint16), (1, np.uint16), (2, np.uint8)])
def test_jpeg_xl_reads_and_writes_depth_alpha_profile_and_exif(tmp_path, channels, dtype):
    stored = scene(channels, 8 if dtype == np.uint8 else 16)
    icc = P3 if channels > 2 else None
    path = tmp_path / "photo.jxl"
    box = b"\0\0\0\0" + camera_exif(1)[6:]  # a JPEG XL Exif box: offset to the TIFF header, then the EXIF
    path.write_bytes(pyjpegxl.encode_from_numpy(stored, lossless=True, icc=icc, exif=box))
    image = read_image(path)
    np.testing.assert_array_equal(image.pixels, stored)
    assert image.bits == 8 * np.dtype(dtype).itemsize and probe_image(path) == (W, H)
    if icc:
        assert image.icc_profile == icc
    assert tags(image.exif)[0x010F] == "LMF Phone"
    assert write_image(tmp_path / "out.jxl", image, quality=100) == []
    meta, back = pyjpegxl.decode_to_numpy((tmp_path / "out.jxl").read_bytes())
    np.testing.assert_array_equal(back.reshape(stored.shape), stored)  # lossless at quality 100
    assert meta.bits_per_sample == 8 * np.dtype(dtype).itemsize and bool(meta.has_alpha) == (channels in (2, 4))
    if icc:
        assert meta.icc == icc
    assert jxl_exif(meta.exif)[0x010F] == "LMF Phone" and jxl_exif(meta.exif).get(0x0112, 1) == 1
    assert write_image(tmp_path / "lossy.jxl", image) == []
    lossy = read_image(tmp_path / "lossy.jxl").pixels
    assert np.abs(lossy.astype(float) - stored).mean() < 0.01 * np.iinfo(dtype).max


@needs_jxl
def test_jpeg_xl_orientation_is_applied_once(tmp_path):
    stored = scene(3, 8)
    jpeg = io.BytesIO()
    Image.fromarray(stored).save(jpeg, "JPEG", exif=camera_exif(6), icc_profile=P3, quality=95)
    path = tmp_path / "turned.jxl"
    path.write_bytes(pyjpegxl.jpeg_to_jxl(jpeg.getvalue()))  # libjxl moves EXIF orientation 6 into the codestream
    with Image.open(jpeg) as img:
        shown = np.asarray(ImageOps.exif_transpose(img))
    image = read_image(path)
    assert image.pixels.shape == shown.shape == (W, H, 3) and probe_image(path) == (H, W)
    assert np.abs(image.pixels.astype(int) - shown).max() <= 3  # libjxl's and libjpeg-turbo's JPEG decoders
    assert image.icc_profile == P3 and tags(image.exif)[0x0112] == 1


# 16-bit TIFF ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [3, 4])
def test_sixteen_bit_colour_tiff_keeps_profile_exif_and_gps(tmp_path, channels):
    pixels = codecs.widen(scene(channels, 12), 12)
    exif = tags(camera_exif(6))
    exif.get_ifd(0x8825).update({1: "N", 2: (52.0, 30.0, 0.0)})
    assert write_image(tmp_path / "deep.tiff", ImageFile(pixels, P3, exif.tobytes())) == []
    raw = cv2.imread(str(tmp_path / "deep.tiff"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(cv2.cvtColor(raw, cv2.COLOR_BGRA2RGBA if channels == 4 else cv2.COLOR_BGR2RGB),
                                  pixels)
    with Image.open(tmp_path / "deep.tiff") as img:
        written = img.getexif()
        assert img.info["icc_profile"] == P3 and written[0x010F] == "LMF Phone" and written.get(0x0112, 1) == 1
        assert written.get_ifd(0x8769)[0x9003] == "2026:01:02 03:04:05" and written.get_ifd(0x8769)[0xA002] == W
        assert written.get_ifd(0x8825)[1] == "N"
    again = read_image(tmp_path / "deep.tiff")
    np.testing.assert_array_equal(again.pixels, pixels)
    assert again.icc_profile == P3 and tags(again.exif)[0x010F] == "LMF Phone"


def test_sixteen_bit_tiff_pages_keep_profile_and_exif(tmp_path):
    pages = [Frame(codecs.widen(scene(3, 12), 12)), Frame(codecs.widen(scene(4, 12, 10, 12), 12))]
    anim = Animation(ImageInfo("TIFF", (W, H), 2, ((W, H), (12, 10))), icc_profile=P3, exif=camera_exif(1))
    assert write_frames(tmp_path / "pages.tiff", iter(pages), anim) == []
    with Image.open(tmp_path / "pages.tiff") as img:
        assert img.n_frames == 2 and img.info["icc_profile"] == P3 and img.getexif()[0x010F] == "LMF Phone"
    ok, mats = cv2.imdecodemulti(np.fromfile(tmp_path / "pages.tiff", np.uint8), cv2.IMREAD_UNCHANGED)
    assert ok and [m.shape for m in mats] == [(H, W, 3), (10, 12, 4)] and mats[0].dtype == np.uint16


# lmf upscale ---------------------------------------------------------------------------------------------

def test_lmf_upscale_heic_writes_heic_with_its_depth_profile_and_orientation(lmf, tiny, tmp_path):
    src = tmp_path / "IMG_0001.HEIC"
    src.write_bytes(heic(scene(3, 10), 10, quality=95, icc_profile=P3, exif=camera_exif(6)))
    result = lmf(src, "--scale", "2")
    assert result.exit_code == 0, result.output
    assert "20 x 24 -> 40 x 48" in result.output  # upright: the stored 24 x 20 turned by irot
    out = tmp_path / "IMG_0001_x2.HEIC"
    written = pillow_heif.open_heif(out, convert_hdr_to_8bit=False)
    assert written.info["bit_depth"] == 10 and written.size == (40, 48) and written.info["icc_profile"] == P3
    assert tags(written.info["exif"])[0x0112] == 1 and tags(written.info["exif"])[0x010F] == "LMF Phone"
    model = tiny.upscale(read_image(src).pixels, size=(48, 40))  # uint16 in, uint16 out: never 8 bits
    assert model.dtype == np.uint16
    got = read_image(out).pixels
    assert np.abs(got.astype(float) - model).mean() < 0.01 * 65535  # HEIC at --jpeg-quality 95


@pytest.mark.parametrize(("fmt", "bits"), [pytest.param("avif", 10, marks=needs_deep_avif),
                                           pytest.param("jxl", 16, marks=needs_jxl)])
def test_lmf_upscale_heic_to_avif_and_jpeg_xl(lmf, tmp_path, fmt, bits):
    src = tmp_path / "IMG_0002.heic"
    src.write_bytes(heic(scene(4, 10), 10, icc_profile=P3, exif=camera_exif(6)))
    result = lmf(src, "--scale", "2", "--format", fmt)
    assert result.exit_code == 0, result.output
    out = read_image(tmp_path / f"IMG_0002_x2.{fmt}")
    assert out.pixels.shape == (48, 40, 4) and out.bits == bits and out.icc_profile == P3
    assert tags(out.exif)[0x0112] == 1 and tags(out.exif)[0x010F] == "LMF Phone"
    if fmt == "avif":
        assert 1023 >= avif_raw(tmp_path / "IMG_0002_x2.avif").max() > 255  # 10 bits in the file


def phone_avif(path) -> None:
    """An 8-bit AVIF with alpha, Display P3 and orientation 6 (irot/imir), as Pillow writes it."""
    Image.fromarray(scene(4, 8)).save(path, exif=camera_exif(6), icc_profile=P3, quality=95)


def deep_avif_file(path) -> None:
    path.write_bytes(deep_avif(scene(3, 10), 10, P3, camera_exif(1)))


def deep_jxl_file(path) -> None:
    box = b"\0\0\0\0" + camera_exif(1)[6:]
    path.write_bytes(pyjpegxl.encode_from_numpy(scene(4, 16), quality=0.5, icc=P3, exif=box))


@pytest.mark.parametrize(("name", "make", "upright_hw", "bits"), [
    ("phone.avif", phone_avif, (W, H), 8),
    pytest.param("deep.avif", deep_avif_file, (H, W), 10, marks=needs_deep_avif),
    pytest.param("deep.jxl", deep_jxl_file, (H, W), 16, marks=needs_jxl)])
def test_lmf_upscale_keeps_avif_and_jpeg_xl_as_they_are(lmf, tiny, tmp_path, name, make, upright_hw, bits):
    src = tmp_path / name
    make(src)
    result = lmf(src, "--scale", "2")
    assert result.exit_code == 0, result.output
    out = tmp_path / name.replace(".", "_x2.")
    image, written = read_image(src), read_image(out)
    big = (2 * upright_hw[0], 2 * upright_hw[1])
    assert written.pixels.shape[:2] == big and written.bits == bits and written.icc_profile == P3
    assert tags(written.exif).get(0x0112, 1) == 1 and tags(written.exif)[0x010F] == "LMF Phone"
    model = tiny.upscale(image.pixels, size=big)
    peak = np.iinfo(model.dtype).max
    assert model.dtype == image.pixels.dtype and np.abs(written.pixels.astype(float) - model).mean() < 0.02 * peak


# Missing packages, damaged files, what a format cannot keep ---------------------------------------------

def test_a_missing_codec_package_is_one_line_naming_it(lmf, tmp_path, monkeypatch):
    (tmp_path / "IMG_0003.HEIC").write_bytes(heic(scene(3, 8), 8))
    Image.fromarray(scene(3, 8)).save(tmp_path / "plain.png")
    monkeypatch.setattr(codecs, "_registered", set())
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # `import pillow_heif` now fails
    monkeypatch.setitem(sys.modules, "pyjpegxl", None)
    with pytest.raises(InputError, match=r"^reading HEIC needs the pillow-heif package \(pip install pillow-heif\)$"):
        read_image(tmp_path / "IMG_0003.HEIC")
    with pytest.raises(InputError, match=r"pip install pyjpegxl\)$"):
        write_image(tmp_path / "out.jxl", ImageFile(scene(3, 8)))
    result = lmf(tmp_path, "--scale", "2")
    assert result.exit_code == 1
    assert (f"failed: {tmp_path / 'IMG_0003.HEIC'}: reading HEIC needs the pillow-heif package "
            "(pip install pillow-heif)") in result.output
    assert "done 1, skipped 0, failed 1" in result.output and (tmp_path / "plain_x2.png").exists()


@needs_deep_avif
@needs_jxl
def test_damaged_and_misnamed_files_of_the_new_formats(lmf, tmp_path):
    good_heic = heic(scene(3, 8), 8, quality=90)
    deep = deep_avif(scene(3, 10), 10, P3, None)
    flat = io.BytesIO()
    Image.fromarray(scene(3, 8)).save(flat, "AVIF")
    jxl = pyjpegxl.encode_from_numpy(scene(3, 8), quality=1.0)
    files = {"cut.heic": good_heic[:len(good_heic) * 2 // 3], "cut.avif": deep[:len(deep) * 2 // 3],
             "cut8.avif": flat.getvalue()[:len(flat.getvalue()) * 2 // 3], "cut.jxl": jxl[:len(jxl) * 2 // 3],
             "noise.heic": np.random.default_rng(0).bytes(300), "empty.avif": b"",
             "heic.jpg": good_heic, "jxl.png": jxl}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name in ("cut.heic", "cut.avif", "cut8.avif", "cut.jxl"):
        with pytest.raises(InputError, match="^truncated or damaged"):
            read_image(tmp_path / name)
    result = lmf(tmp_path, "--scale", "2")
    assert result.exit_code == 1
    failed = {line[len("failed: "):].split(": ", 1)[0].rsplit("/", 1)[-1]: line.split(": ", 2)[2]
              for line in result.output.splitlines() if line.startswith("failed: ")}
    assert set(failed) == {"cut.heic", "cut.avif", "cut8.avif", "cut.jxl", "noise.heic", "empty.avif"}
    assert all(failed[n].startswith("truncated or damaged") for n in ("cut.heic", "cut.avif", "cut8.avif", "cut.jxl"))
    assert failed["noise.heic"].startswith("not an image") and failed["empty.avif"].startswith("not an image")
    assert read_image(tmp_path / "heic_x2.jpg").pixels.shape == (40, 48, 3)  # read by content, written as named
    assert read_image(tmp_path / "jxl_x2.png").pixels.shape == (40, 48, 3)
    assert not list(tmp_path.glob(".*.part")) and not (tmp_path / "cut_x2.heic").exists()


def test_what_the_new_formats_cannot_keep_is_reported(tmp_path):
    sixteen = ImageFile(codecs.widen(scene(3, 12), 12), P3)  # bits None: a 16-bit PNG's samples
    for suffix, name in ((".heic", "HEIC"), (".avif", "AVIF")):
        notes = write_image(tmp_path / f"deep{suffix}", sixteen)
        assert notes == [f"{name} holds at most 12 bits: 16-bit samples were reduced to 12"]
    assert pillow_heif.open_heif(tmp_path / "deep.heic").info["bit_depth"] == 12
    assert write_image(tmp_path / "ga.avif", ImageFile(scene(2, 8))) == ["gray + alpha AVIF is written as RGBA"]
    ten = ImageFile(codecs.widen(scene(3, 10), 10), P3, bits=10)
    assert write_image(tmp_path / "ten.jpg", ten) == ["JPG is 8-bit: 10-bit samples were reduced"]
    assert write_image(tmp_path / "ten.png", ten) == [] and read_image(tmp_path / "ten.png").pixels.dtype == np.uint16


def test_colours_given_as_cicp_and_animated_avif_frames_are_reported(tmp_path):
    (tmp_path / "p3.heic").write_bytes(heic(scene(3, 8), 8, color_primaries=12, transfer_characteristics=13,
                                            matrix_coefficients=6, full_range_flag=1))
    image = read_image(tmp_path / "p3.heic")
    assert any("CICP values (primaries 12" in n for n in image.notes)
    assert any("CICP" in n for n in write_image(tmp_path / "p3.png", image))
    frames = [Image.fromarray(scene(3, 8)), Image.fromarray(scene(3, 8)[::-1].copy())]
    frames[0].save(tmp_path / "anim.avif", save_all=True, append_images=frames[1:], duration=100)
    assert read_image(tmp_path / "anim.avif").notes == ("an animated AVIF of 2 frames: only its first frame "
                                                        "was upscaled",)


@needs_deep_avif
def test_an_opencv_without_avif_leaves_eight_bits_and_says_so(tmp_path, monkeypatch):
    (tmp_path / "deep.avif").write_bytes(deep_avif(scene(3, 10), 10, P3, camera_exif(1)))
    monkeypatch.setattr(codecs, "opencv_avif", lambda: False)
    image = read_image(tmp_path / "deep.avif")
    assert image.pixels.dtype == np.uint8 and image.bits == 8 and image.icc_profile == P3
    assert image.notes == ("this OpenCV cannot decode AVIF: the 10-bit samples were read at 8 bits "
                           "(pip install -U opencv-python-headless)",)
    notes = write_image(tmp_path / "out.avif", ImageFile(codecs.widen(scene(3, 10), 10), P3, camera_exif(1), 10))
    assert len(notes) == 1 and "Pillow's AVIF is 8-bit" in notes[0]
    with Image.open(tmp_path / "out.avif") as img:
        assert img.mode == "RGB" and img.info["icc_profile"] == P3 and img.getexif()[0x010F] == "LMF Phone"


def test_widen_and_narrow_round_trip_every_sample():
    for bits in (10, 12):
        raw = np.arange(1 << bits, dtype=np.uint16)
        wide = codecs.widen(raw, bits)
        assert wide[0] == 0 and wide[-1] == 65535 and (np.diff(wide.astype(int)) > 0).all()
        np.testing.assert_array_equal(codecs.narrow(wide, bits), raw)


def test_importing_lmf_loads_no_codec_package():
    code = ("import sys, lmf_cli, lmf_cli.io.images, lmf_cli.jobs.images; "
            "print(sorted(m for m in ('pillow_heif', 'pyjpegxl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
