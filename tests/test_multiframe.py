"""Animated GIF, APNG and WebP, and multi-page TIFF: every frame upscaled, timing and disposal kept.

Each source is built from the real butterfly crop; what a viewer would show (Pillow's composited
frames) is upscaled by the model on its own and compared with what `lmf upscale` wrote.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms
from typer.testing import CliRunner

from lmf_cli.api import Upscaler
from lmf_cli.errors import InputError
from lmf_cli.io.images import inspect_image, read_frames, read_image, write_frames

runner = CliRunner()
OUT_HW = (80, 96)  # the butterfly crop (48 x 40) at x2


def moving(butterfly: np.ndarray, n: int = 3) -> list[np.ndarray]:
    """n different frames of the photo (it slides sideways)."""
    return [np.roll(butterfly, 9 * i, axis=1) for i in range(n)]


def shown(path: Path) -> list[np.ndarray]:
    """Every frame as a viewer shows it (composited, RGBA), by Pillow alone."""
    with Image.open(path) as img:
        frames = []
        for index in range(getattr(img, "n_frames", 1)):
            img.seek(index)
            frames.append(np.asarray(img.convert("RGBA")))
        return frames


def frame_info(path: Path, *keys: str) -> list[tuple]:
    with Image.open(path) as img:
        out = []
        for index in range(img.n_frames):
            img.seek(index)
            img.load()
            out.append(tuple(getattr(img, "disposal_method", None) if k == "gif_disposal" else img.info.get(k)
                             for k in keys))
        return out


def expected(tiny: Upscaler, rgba: np.ndarray, out_hw=OUT_HW) -> np.ndarray:
    """The model on one shown frame (alpha only where the frame has any), as RGBA."""
    opaque = bool((rgba[..., 3] == 255).all())
    big = tiny.upscale(rgba[..., :3] if opaque else rgba, size=out_hw)
    return np.dstack([big, np.full(out_hw, 255, np.uint8)]) if opaque else big


def test_animated_gif_keeps_every_frame_timing_loop_and_disposal(lmf, tiny, butterfly, tmp_path):
    frames = []
    for index, rgb in enumerate(moving(butterfly)):
        pal = Image.fromarray(rgb).quantize(255)
        if index == 0:  # a transparent corner in frame 1
            idx = np.asarray(pal).copy()
            idx[:12, :16] = 255
            pal = Image.fromarray(idx, "P")
            pal.putpalette(Image.fromarray(rgb).quantize(255).getpalette()[:765] + [0, 0, 0])
            pal.info["transparency"] = 255
        frames.append(pal)
    src = tmp_path / "anim.gif"
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=[80, 120, 200], loop=0, disposal=[2, 1, 1])
    before = src.read_bytes()
    result = lmf(src, "--scale", "2")
    assert result.exit_code == 0, result.output
    assert "48 x 40 -> 96 x 80, 3 frames" in result.output
    out = tmp_path / "anim_x2.gif"  # GIF stays GIF (it was anim_x2.png holding frame 1 only)
    with Image.open(out) as img:
        assert img.format == "GIF" and img.n_frames == 3 and img.size == (96, 80) and img.info["loop"] == 0
    assert frame_info(out, "duration", "gif_disposal") == frame_info(src, "duration", "gif_disposal") == [
        (80, 2), (120, 1), (200, 1)]
    for index, (got, source) in enumerate(zip(shown(out), shown(src), strict=True)):
        want = expected(tiny, source)
        np.testing.assert_array_equal(got[..., 3] == 0, want[..., 3] < 128)  # 1-bit transparency, cut at 50%
        opaque = got[..., 3] > 0
        error = np.abs(got[..., :3].astype(int) - want[..., :3])[opaque]
        assert error.mean() < 4, f"frame {index + 1}: {error.mean()}"  # a 255-colour palette per frame
    assert not np.array_equal(shown(out)[1], shown(out)[2])
    assert src.read_bytes() == before


def test_apng_frames_are_exact_with_timing_loop_disposal_and_blend(lmf, tiny, butterfly, tmp_path):
    alpha = np.tile(np.linspace(40, 255, 48).astype(np.uint8), (40, 1))
    rgba = [np.dstack([f, alpha if i != 1 else np.full_like(alpha, 255)]) for i, f in enumerate(moving(butterfly))]
    src = tmp_path / "anim.png"
    images = [Image.fromarray(f) for f in rgba]
    images[0].save(src, save_all=True, append_images=images[1:], duration=[50, 100, 150], loop=3,
                   disposal=[0, 1, 2], blend=[0, 1, 0])
    result = lmf(src, "--scale", "2")
    assert result.exit_code == 0, result.output
    out = tmp_path / "anim_x2.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.n_frames == 3 and img.info["loop"] == 3
    keys = ("duration", "disposal", "blend")
    assert frame_info(out, *keys) == frame_info(src, *keys) == [(50.0, 0, 0), (100.0, 1, 1), (150.0, 2, 0)]
    for got, source in zip(shown(out), shown(src), strict=True):
        np.testing.assert_array_equal(got, expected(tiny, source))  # APNG is lossless: exactly the model's frames


def test_animated_webp_keeps_frames_and_timing(lmf, tiny, butterfly, tmp_path):
    src = tmp_path / "anim.webp"
    images = [Image.fromarray(f) for f in moving(butterfly)]
    images[0].save(src, save_all=True, append_images=images[1:], duration=[70, 140, 210], loop=2, lossless=True)
    result = lmf(src, "--scale", "2")
    assert result.exit_code == 0, result.output
    out = tmp_path / "anim_x2.webp"
    with Image.open(out) as img:
        assert img.n_frames == 3 and img.info["loop"] == 2
    assert frame_info(out, "duration") == [(70,), (140,), (210,)]
    for got, source in zip(shown(out), shown(src), strict=True):
        assert np.abs(got.astype(int) - expected(tiny, source)).mean() < 3  # lossy WebP at --jpeg-quality 95


def test_multi_page_tiff_keeps_every_page_its_mode_and_size(lmf, tiny, butterfly, tmp_path):
    gray = np.asarray(Image.fromarray(butterfly[::-1]).convert("L"))
    thumb = butterfly[::2, ::2].copy()  # a page of another size (24 x 20)
    src = tmp_path / "scan.tiff"
    Image.fromarray(butterfly).save(src, save_all=True, append_images=[Image.fromarray(gray), Image.fromarray(thumb)])
    result = lmf(src, "--scale", "2")
    assert result.exit_code == 0, result.output
    assert "3 pages" in result.output
    with Image.open(tmp_path / "scan_x2.tiff") as img:
        pages = []
        for index in range(img.n_frames):
            img.seek(index)
            pages.append((img.mode, np.asarray(img)))
    assert [(mode, p.shape) for mode, p in pages] == [("RGB", (80, 96, 3)), ("L", (80, 96)), ("RGB", (40, 48, 3))]
    np.testing.assert_array_equal(pages[0][1], tiny.upscale(butterfly, size=OUT_HW))
    np.testing.assert_array_equal(pages[1][1], tiny.upscale(gray, size=OUT_HW))
    np.testing.assert_array_equal(pages[2][1], tiny.upscale(thumb, size=(40, 48)))


def test_sixteen_bit_tiff_pages_stay_sixteen_bit(lmf, tiny, butterfly, tmp_path):
    pages = [f.astype(np.uint16) * 257 + np.arange(48, dtype=np.uint16)[:, None] for f in moving(butterfly, 2)]
    ok, buf = cv2.imencodemulti(".tiff", [p[..., ::-1] for p in pages])  # OpenCV takes BGR
    assert ok
    (tmp_path / "deep.tiff").write_bytes(buf.tobytes())
    result = lmf(tmp_path / "deep.tiff", "--scale", "2")
    assert result.exit_code == 0, result.output
    ok, back = cv2.imdecodemulti(np.fromfile(tmp_path / "deep_x2.tiff", np.uint8), cv2.IMREAD_UNCHANGED)
    assert ok and len(back) == 2
    for got, page in zip(back, pages, strict=True):
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got[..., ::-1], tiny.upscale(page, size=OUT_HW))


def test_tiff_pages_are_turned_upright(tiny, butterfly, tmp_path):
    stored = moving(butterfly, 2)
    src = tmp_path / "turned.tiff"
    images = [Image.fromarray(f) for f in stored]
    images[0].save(src, save_all=True, append_images=images[1:], tiffinfo={274: 6})
    assert inspect_image(src).size_wh == (40, 48)
    anim, frames = read_frames(src)
    for frame, page in zip(frames, stored, strict=True):
        np.testing.assert_array_equal(frame.pixels, np.rot90(page, k=-1))  # orientation 6: 90 degrees clockwise
    assert anim.frames == 2


def test_frames_are_read_one_at_a_time(butterfly, tmp_path):
    images = [Image.fromarray(f) for f in moving(butterfly)]
    images[0].save(tmp_path / "a.png", save_all=True, append_images=images[1:], duration=40)
    anim, frames = read_frames(tmp_path / "a.png")
    assert anim.frames == 3 and not isinstance(frames, list)
    first = next(frames)
    np.testing.assert_array_equal(first.pixels, butterfly)
    assert first.duration == 40
    np.testing.assert_array_equal(read_image(tmp_path / "a.png").pixels, butterfly)  # still the first frame alone


def test_one_image_formats_are_refused_and_the_batch_goes_on(lmf, butterfly, tmp_path):
    images = [Image.fromarray(f) for f in moving(butterfly)]
    images[0].save(tmp_path / "anim.gif", save_all=True, append_images=images[1:])
    Image.fromarray(butterfly).save(tmp_path / "still.png")
    images[0].save(tmp_path / "pages.tiff", save_all=True, append_images=images[1:])
    result = lmf(tmp_path / "anim.gif", tmp_path / "still.png", "--scale", "2", "--format", "jpg")
    assert result.exit_code == 1
    line = next(x for x in result.output.splitlines() if x.startswith("failed:"))
    assert line == (f"failed: {tmp_path / 'anim.gif'}: it has 3 frames and JPEG holds one image; "
                    "write gif, png (APNG), webp or tiff (--format) to keep them all")
    assert "done 1, skipped 0, failed 1" in result.output
    assert (tmp_path / "still_x2.jpg").exists() and not (tmp_path / "anim_x2.jpg").exists()
    result = lmf(tmp_path / "pages.tiff", "--scale", "2", "--format", "png")
    assert result.exit_code == 1 and "only TIFF keeps as pages" in result.output
    result = lmf(tmp_path / "anim.gif", "--scale", "2", "-o", tmp_path / "one.jpg", "--dry-run")
    assert result.exit_code == 1 and "JPEG holds one image" in result.output
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "one.jpg").exists()


def test_gif_to_other_animated_formats_and_still_gif(lmf, butterfly, tmp_path):
    images = [Image.fromarray(f) for f in moving(butterfly)]
    images[0].save(tmp_path / "anim.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    for fmt, name, kind in (("png", "anim_x2.png", "PNG"), ("webp", "anim_x2.webp", "WEBP"),
                            ("tiff", "anim_x2.tiff", "TIFF")):
        result = lmf(tmp_path / "anim.gif", "--scale", "2", "--format", fmt)
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / name) as img:
            assert img.format == kind and img.n_frames == 3
    assert "TIFF pages have no durations" in result.output  # said, not silently dropped
    images[0].save(tmp_path / "still.gif")  # a single-frame GIF is upscaled to PNG, as before
    assert lmf(tmp_path / "still.gif", "--scale", "2").exit_code == 0
    assert Image.open(tmp_path / "still_x2.png").format == "PNG"
    result = lmf(tmp_path / "still_x2.png", "--scale", "1.5", "--format", "gif")  # and GIF can be asked for
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "still_x2_x1.5.gif").size == (144, 120)


def apng_claiming(frames: int, path: Path) -> Path:
    """A 2-frame 4 x 4 APNG whose acTL chunk claims `frames` frames."""
    images = [Image.new("RGB", (4, 4), (i * 90, 20, 40)) for i in range(2)]
    buf = io.BytesIO()
    images[0].save(buf, format="PNG", save_all=True, append_images=images[1:])
    data = bytearray(buf.getvalue())
    at = data.find(b"acTL")
    body = struct.pack(">II", frames, 0)
    data[at + 4:at + 16] = body + struct.pack(">I", zlib.crc32(b"acTL" + body))
    path.write_bytes(bytes(data))
    return path


def test_frames_times_pixels_is_the_bomb_check(lmf, butterfly, tmp_path):
    images = [Image.fromarray(f) for f in moving(butterfly)]
    images[0].save(tmp_path / "anim.png", save_all=True, append_images=images[1:])
    result = lmf(tmp_path / "anim.png", "--scale", "2", "--max-pixels", "5000")  # each frame is 1,920 pixels
    assert result.exit_code == 1
    assert "3 frames of 48 x 40 are 5,760 pixels in all, over the limit of 5,000 (--max-pixels)" in result.output
    result = lmf(tmp_path / "anim.png", "--scale", "2", "--max-pixels", "20000")  # outputs: 3 x 7,680
    assert result.exit_code == 1
    assert "the output 96 x 80 x 3 frames is 23,040 pixels, over the limit of 20,000" in result.output
    bomb = apng_claiming(0x7FFFFFFF, tmp_path / "bomb.png")  # 197 bytes claiming 2^31 - 1 frames
    with pytest.raises(InputError, match="2,147,483,647 frames of 4 x 4 are 34,359,738,352 pixels"):
        inspect_image(bomb)
    liar = apng_claiming(5, tmp_path / "liar.png")
    result = lmf(liar, "--scale", "2")
    assert result.exit_code == 1 and f"failed: {liar}: frame 3 of 5: truncated or damaged image" in result.output
    assert not (tmp_path / "liar_x2.png").exists() and not list(tmp_path.glob(".*.part"))


def test_damaged_frame_fails_the_file_without_a_partial_output(lmf, butterfly, tmp_path):
    images = [Image.fromarray(f).quantize(200) for f in moving(butterfly, 4)]
    images[0].save(tmp_path / "anim.gif", save_all=True, append_images=images[1:], duration=100)
    data = (tmp_path / "anim.gif").read_bytes()
    last = data.rfind(b"!\xf9")  # the last frame's graphic control extension
    (tmp_path / "cut.gif").write_bytes(data[: (last + len(data)) // 2])  # cut inside the last frame
    result = lmf(tmp_path / "cut.gif", "--scale", "2")
    assert result.exit_code == 1
    line = next(x for x in result.output.splitlines() if x.startswith("failed:"))
    assert line.startswith(f"failed: {tmp_path / 'cut.gif'}: frame 4 of 4: truncated or damaged image")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anim.gif", "cut.gif"]
    (tmp_path / "cut.gif").write_bytes(data[:last])  # cut between frames: Pillow sees 3 frames and no error
    result = lmf(tmp_path / "cut.gif", "--scale", "2")
    assert result.exit_code == 0, result.output
    assert (f"warning: {tmp_path / 'cut.gif'}: the GIF ends without its trailer; it may have been cut short "
            "after frame 3") in result.output
    assert Image.open(tmp_path / "cut_x2.gif").n_frames == 3


def test_write_frames_refuses_jpeg_and_keeps_gif_loop_once(butterfly, tmp_path):
    images = [Image.fromarray(f) for f in moving(butterfly)]
    images[0].save(tmp_path / "once.gif", save_all=True, append_images=images[1:], duration=60)  # no loop count
    anim, frames = read_frames(tmp_path / "once.gif")
    assert anim.loop is None
    with pytest.raises(InputError, match="JPEG holds one image"):
        write_frames(tmp_path / "x.jpg", frames, anim)
    anim, frames = read_frames(tmp_path / "once.gif")
    write_frames(tmp_path / "again.gif", frames, anim)
    with Image.open(tmp_path / "again.gif") as img:
        assert "loop" not in img.info and img.n_frames == 3  # still played once
    anim, frames = read_frames(tmp_path / "once.gif")
    write_frames(tmp_path / "once.png", frames, anim)
    with Image.open(tmp_path / "once.png") as img:
        assert img.info["loop"] == 1  # APNG: one play


def test_apng_still_image_icc_and_what_gif_cannot_keep(lmf, butterfly, tmp_path):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    images = [Image.fromarray(f) for f in moving(butterfly)]
    src = tmp_path / "anim.png"  # frame 1 is the still image of viewers without APNG, not part of the animation
    images[0].save(src, save_all=True, append_images=images[1:], default_image=True, duration=[70, 80],
                   icc_profile=icc)
    result = lmf(src, "--scale", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["frames"] == 3
    out = tmp_path / "anim_x2.png"
    with Image.open(out) as img:
        assert img.n_frames == 3 and img.info["default_image"] and img.info["icc_profile"] == icc
    assert frame_info(out, "duration") == frame_info(src, "duration") == [(None,), (70.0,), (80.0,)]
    result = lmf(src, "--scale", "2", "--format", "gif")
    assert result.exit_code == 0, result.output
    assert f"warning: {src}: GIF cannot carry the ICC profile; dropped (use PNG to keep them)" in result.output
    assert frame_info(tmp_path / "anim_x2.gif", "duration") == [(70,), (80,)]
