"""Image files in and out, checked against independent readers (Pillow, OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from lmf_cli.errors import InputError
from lmf_cli.io.images import ImageFile, probe_image, read_image, write_image

ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def camera_exif(orientation: int, size_wh: tuple[int, int]) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "LMF Camera"
    exif[0x0112] = orientation
    exif.get_ifd(0x8769).update({0xA002: size_wh[0], 0xA003: size_wh[1]})
    return exif.tobytes()


@pytest.fixture
def deep_rgb() -> np.ndarray:
    return (np.random.default_rng(1).random((30, 20, 3)) * 65535).astype(np.uint16)


def test_sixteen_bit_png_carries_icc_and_updated_exif(tmp_path, deep_rgb):
    path = tmp_path / "deep.png"
    assert write_image(path, ImageFile(deep_rgb, ICC, camera_exif(6, (30, 20)))) == []
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB),
                                  deep_rgb)
    with Image.open(path) as img:
        img.verify()  # chunk CRCs
    with Image.open(path) as img:
        exif = img.getexif()
        assert img.info["icc_profile"] == ICC and exif[0x010F] == "LMF Camera"
        assert exif[0x0112] == 1
        assert exif.get_ifd(0x8769)[0xA002] == 20 and exif.get_ifd(0x8769)[0xA003] == 30
    again = read_image(path)
    np.testing.assert_array_equal(again.pixels, deep_rgb)
    assert again.icc_profile == ICC


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_gray_alpha_round_trips(tmp_path, dtype):
    peak = np.iinfo(dtype).max
    pixels = (np.random.default_rng(2).random((9, 11, 2)) * peak).astype(dtype)
    write_image(tmp_path / "ga.png", ImageFile(pixels))
    back = read_image(tmp_path / "ga.png").pixels
    assert back.dtype == dtype and back.shape == (9, 11, 2)
    np.testing.assert_array_equal(back, pixels)
    stored = cv2.imread(str(tmp_path / "ga.png"), cv2.IMREAD_UNCHANGED)  # an independent decoder
    np.testing.assert_array_equal(stored[..., 0], pixels[..., 0])
    np.testing.assert_array_equal(stored[..., 3], pixels[..., 1])


@pytest.mark.parametrize("suffix", [".tiff", ".png", ".webp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_made_upright(tmp_path, orientation, suffix):
    stored = (np.random.default_rng(orientation).random((6, 10, 3)) * 255).astype(np.uint8)
    path = tmp_path / f"o{orientation}{suffix}"
    Image.fromarray(stored).save(path, exif=camera_exif(orientation, (10, 6)), lossless=True)
    with Image.open(path) as img:
        expected = np.asarray(ImageOps.exif_transpose(img))
    image = read_image(path)
    np.testing.assert_array_equal(image.pixels, expected)
    assert probe_image(path) == image.size_wh
    exif = Image.Exif()
    exif.load(image.exif)
    assert exif.get(0x0112, 1) == 1 and exif[0x010F] == "LMF Camera"
    assert not {256, 257, 273, 279} & set(exif)  # a TIFF's layout tags are not carried as EXIF


def test_truncated_jpeg_is_refused(tmp_path):
    Image.fromarray((np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    assert cv2.imread(str(tmp_path / "cut.jpg")) is not None  # OpenCV alone would fill the rest with grey
    with pytest.raises(InputError, match="truncated"):
        read_image(tmp_path / "cut.jpg")


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    Image.new("L", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="60,000 pixels, over the limit of 50,000"):
        probe_image(tmp_path / "big.png", max_pixels=50_000)
    with pytest.raises(InputError, match="over the limit"):
        read_image(tmp_path / "big.png", max_pixels=50_000)


def test_cmyk_profile_is_not_carried_to_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "print.jpg", icc_profile=ICC)
    image = read_image(tmp_path / "print.jpg")
    assert image.pixels.shape == (8, 8, 3) and image.icc_profile is None


def test_formats_say_what_they_cannot_keep(tmp_path, deep_rgb):
    rgba = np.dstack([deep_rgb, np.full(deep_rgb.shape[:2], 65535, np.uint16)])
    notes = write_image(tmp_path / "flat.jpg", ImageFile(rgba, ICC, camera_exif(1, (20, 30))))
    assert any("alpha" in n for n in notes) and any("8-bit" in n for n in notes)
    with Image.open(tmp_path / "flat.jpg") as img:
        assert img.mode == "RGB" and img.info["icc_profile"] == ICC
    assert write_image(tmp_path / "deep.tiff", ImageFile(deep_rgb, ICC, camera_exif(1, (20, 30)))) == []
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "deep.tiff"), cv2.IMREAD_UNCHANGED)[..., ::-1], deep_rgb)
    with Image.open(tmp_path / "deep.tiff") as img:  # 16-bit colour TIFF keeps them too (tests/test_formats.py)
        assert img.info["icc_profile"] == ICC and img.getexif()[0x010F] == "LMF Camera"
    flat = ImageFile((deep_rgb >> 8).astype(np.uint8), ICC, camera_exif(1, (20, 30)))
    assert write_image(tmp_path / "flat.tiff", flat) == []
    with Image.open(tmp_path / "flat.tiff") as img:
        assert img.info["icc_profile"] == ICC and img.getexif()[0x010F] == "LMF Camera"


def test_strip_metadata_and_unknown_suffix(tmp_path, deep_rgb):
    write_image(tmp_path / "bare.png", ImageFile(deep_rgb, ICC, camera_exif(1, (20, 30))), keep_metadata=False)
    with Image.open(tmp_path / "bare.png") as img:
        assert "icc_profile" not in img.info and not img.getexif()
    with pytest.raises(InputError, match="cannot write .bmp"):
        write_image(tmp_path / "x.bmp", ImageFile(deep_rgb))
