"""The `lmf` command end to end on real small files, with a tiny random-weight LM-LIIF."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms
from typer.testing import CliRunner

from lmf_cli.api import Upscaler
from lmf_cli.cli import app
from lmf_cli.imaging.resample import bicubic_resize_float
from lmf_cli.models import zoo
from lmf_cli.models.checkpoints import load_weights, save_weights

runner = CliRunner()
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.fixture
def photo(tmp_path, butterfly):
    path = tmp_path / "my photo é.png"
    Image.fromarray(butterfly).save(path)
    return path


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))


def exif_bytes(orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "LMF Camera"
    if orientation is not None:
        exif[0x0112] = orientation
    return exif.tobytes()


def no_partial_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".part")]


# 1. Inputs -----------------------------------------------------------------------------------------------

def test_folder_tree_recursive_mirrors_with_unicode_and_spaces(lmf, tmp_path, butterfly):
    tree = tmp_path / "mes photos"
    (tree / "été 2024" / "jour 1").mkdir(parents=True)
    Image.fromarray(butterfly).save(tree / "a.png")
    Image.fromarray(butterfly).save(tree / "été 2024" / "b b.jpg", quality=95)
    Image.fromarray(butterfly).save(tree / "été 2024" / "jour 1" / "c.png")
    (tree / "notes.txt").write_text("not an image, and not picked up")
    out = tmp_path / "sortie"
    result = lmf(tree, "--recursive", "--scale", "2", "-o", out)
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a_x2.png", "été 2024/b b_x2.jpg", "été 2024/jour 1/c_x2.png"]
    assert "done 3, skipped 0, failed 0" in result.output


def test_folder_without_recursive_takes_top_level_only(lmf, tmp_path, butterfly):
    (tmp_path / "sub").mkdir()
    Image.fromarray(butterfly).save(tmp_path / "top.png")
    Image.fromarray(butterfly).save(tmp_path / "sub" / "deep.png")
    result = lmf(tmp_path, "--scale", "2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "top_x2.png").exists() and not (tmp_path / "sub" / "deep_x2.png").exists()


def test_glob_pattern_and_missing_input(lmf, tmp_path, butterfly):
    for name in ("one.png", "two.png", "three.jpg"):
        Image.fromarray(butterfly).save(tmp_path / name)
    missing = tmp_path / "nowhere.png"
    result = lmf(str(tmp_path / "*.png"), missing, "--scale", "2")
    assert result.exit_code == 1
    assert (tmp_path / "one_x2.png").exists() and (tmp_path / "two_x2.png").exists()
    assert not (tmp_path / "three_x2.jpg").exists()
    assert f"failed: {missing}: no such file or folder" in result.output
    assert "done 2, skipped 0, failed 1" in result.output


# 2. Sizes ------------------------------------------------------------------------------------------------

def test_scale_writes_beside_input_and_prints_w_x_h(lmf, photo):
    result = lmf(photo, "--scale", "3.7")
    assert result.exit_code == 0, result.output
    out = photo.with_name("my photo é_x3.7.png")
    assert Image.open(out).size == (178, 148)  # round(48 * 3.7) x round(40 * 3.7)
    assert "48 x 40 -> 178 x 148" in result.output


@pytest.mark.parametrize(("args", "size"), [
    (["--width", "100"], (100, 83)), (["--height", "60"], (72, 60)), (["--size", "101x77"], (101, 77)),
    (["--width", "100", "--height", "50"], (100, 50)),
    (["--fit", "100x100"], (100, 83)), (["--fit", "200x60"], (72, 60)), (["--fit", "96x80"], (96, 80)),
])
def test_size_options_and_names(lmf, photo, args, size):
    result = lmf(photo, *args)
    assert result.exit_code == 0, result.output
    out = photo.with_name(f"my photo é_{size[0]}x{size[1]}.png")
    assert Image.open(out).size == size
    assert f"48 x 40 -> {size[0]} x {size[1]}" in result.output


def test_separate_scales_are_rendered_by_the_model(lmf, photo, tiny, butterfly):
    result = lmf(photo, "--scale-x", "2", "--scale-y", "3")
    assert result.exit_code == 0, result.output
    out = np.asarray(Image.open(photo.with_name("my photo é_96x120.png")))
    assert out.shape == (120, 96, 3)
    np.testing.assert_array_equal(out, tiny.upscale(butterfly, size=(120, 96)))


def test_beyond_trained_range_warns(lmf, photo):
    result = lmf(photo, "--scale", "5")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "beyond the trained range" in result.output
    assert Image.open(photo.with_name("my photo é_x5.png")).size == (240, 200)


@pytest.mark.parametrize(("args", "message"), [
    (["--scale", "0"], "positive"), (["--scale", "-2"], "positive"), (["--scale", "0.5"], "only enlarges"),
    (["--size", "0x10"], "positive"), (["--width", "-5"], "positive"), (["--fit", "big"], "WIDTHxHEIGHT"),
    ([], "give one of"), (["--scale", "2", "--width", "100"], "give one of"),
    (["--width", "20"], "would shrink"), (["--scale", "2", "--max-pixels", "5000"], "over the limit of 5,000"),
])
def test_impossible_sizes_are_clear_errors(lmf, photo, args, message):
    result = lmf(photo, *args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in photo.parent.iterdir()) == [photo.name]


# 3. Outputs ----------------------------------------------------------------------------------------------

def test_output_file_and_output_folder(lmf, photo, tmp_path, butterfly):
    result = lmf(photo, "--scale", "2", "-o", tmp_path / "exact name.png")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "exact name.png").size == (96, 80)
    other = tmp_path / "other.png"
    Image.fromarray(butterfly).save(other)
    result = lmf(photo, other, "--scale", "2", "-o", tmp_path / "many")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["my photo é_x2.png", "other_x2.png"]
    result = lmf(photo, other, "--scale", "2", "-o", tmp_path / "one.png")
    assert result.exit_code == 1 and "output folder" in result.output


@pytest.mark.parametrize(("fmt", "pillow_name", "suffix"), [("jpg", "JPEG", ".jpg"), ("webp", "WEBP", ".webp"),
                                                             ("tiff", "TIFF", ".tiff"), ("png", "PNG", ".png")])
def test_format_option(lmf, photo, fmt, pillow_name, suffix):
    result = lmf(photo, "--scale", "2", "--format", fmt)
    assert result.exit_code == 0, result.output
    with Image.open(photo.with_name(f"my photo é_x2{suffix}")) as img:
        assert img.format == pillow_name and img.size == (96, 80)


def test_jpeg_quality_is_the_file_quality(lmf, photo, tmp_path):
    assert lmf(photo, "--scale", "2", "-o", tmp_path / "low.jpg", "--jpeg-quality", "10").exit_code == 0
    assert lmf(photo, "--scale", "2", "-o", tmp_path / "high.jpg", "--jpeg-quality", "95").exit_code == 0
    assert (tmp_path / "low.jpg").stat().st_size < (tmp_path / "high.jpg").stat().st_size / 2
    result = lmf(photo, "--scale", "2", "--jpeg-quality", "0")
    assert result.exit_code == 1 and "between 1 and 100" in result.output


def test_never_writes_over_an_input(lmf, photo, tmp_path, butterfly):
    before = photo.read_bytes()
    result = lmf(photo, "--scale", "2", "-o", photo)
    assert result.exit_code == 1 and photo.read_bytes() == before
    assert "refusing to write over the input" in result.output
    other = tmp_path / "other.png"  # a second input whose name is the first one's output
    Image.fromarray(butterfly[::-1]).save(other)
    named = photo.with_name("my photo é_x2.png")
    other.rename(named)
    before = named.read_bytes()
    result = lmf(photo, named, "--scale", "2", "--overwrite")
    assert result.exit_code == 1 and named.read_bytes() == before
    assert "refusing to write over the input" in result.output


def test_existing_outputs_are_skipped_unless_overwrite(lmf, photo):
    out = photo.with_name("my photo é_x2.png")
    out.write_bytes(b"placeholder")
    result = lmf(photo.parent, "--scale", "2")
    assert result.exit_code == 0 and out.read_bytes() == b"placeholder"
    assert "skipped:" in result.output and "--overwrite" in result.output
    result = lmf(photo.parent, "--scale", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (96, 80)
    result = lmf(photo.parent, "--scale", "2", "--overwrite")  # a rerun: the last outputs are not inputs
    assert result.exit_code == 0 and not photo.with_name("my photo é_x2_x2.png").exists()
    assert "it is the output of" in result.output


def test_interrupted_write_leaves_no_partial_file(lmf, photo, monkeypatch):
    renames = []

    def interrupted(src, dst):
        renames.append((Path(src), Path(dst)))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    result = lmf(photo, "--scale", "2")
    monkeypatch.undo()
    assert result.exit_code != 0
    (tmp, final), = renames
    assert tmp.parent == final.parent == photo.parent and final.name == "my photo é_x2.png"
    assert sorted(p.name for p in photo.parent.iterdir()) == [photo.name]


# 4. Faithful pixels and metadata -------------------------------------------------------------------------

def test_sixteen_bit_png_stays_sixteen_bit_with_icc_and_exif(lmf, tmp_path):
    img = (np.random.default_rng(0).random((20, 24, 3)) * 65535).astype(np.uint16)
    ok, buf = cv2.imencode(".png", img)
    data = buf.tobytes()
    extra = chunk(b"iCCP", b"sRGB\x00\x00" + zlib.compress(ICC)) + chunk(b"eXIf", exif_bytes()[6:])
    (tmp_path / "deep.png").write_bytes(data[:33] + extra + data[33:])
    result = lmf(tmp_path / "deep.png", "--scale", "2")
    assert result.exit_code == 0, result.output
    out = cv2.imread(str(tmp_path / "deep_x2.png"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == (40, 48, 3)
    assert np.any(out % 257 != 0)  # real 16-bit samples, not 8-bit ones widened
    with Image.open(tmp_path / "deep_x2.png") as written:
        written.verify()
    with Image.open(tmp_path / "deep_x2.png") as written:
        assert written.info["icc_profile"] == ICC
        assert written.getexif()[0x010F] == "LMF Camera"
    assert lmf(tmp_path / "deep.png", "--scale", "2", "--format", "tiff").exit_code == 0
    tiff = cv2.imread(str(tmp_path / "deep_x2.tiff"), cv2.IMREAD_UNCHANGED)
    assert tiff.dtype == np.uint16 and tiff.shape == (40, 48, 3)


def test_rgba_alpha_is_upscaled_and_kept(lmf, tmp_path, butterfly):
    alpha = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (40, 1))
    Image.fromarray(np.dstack([butterfly, alpha]), "RGBA").save(tmp_path / "cut.png")
    assert lmf(tmp_path / "cut.png", "--scale", "2", "-o", tmp_path / "model.png").exit_code == 0
    result = lmf(tmp_path / "cut.png", "--scale", "2", "-o", tmp_path / "bicubic.png", "--alpha", "bicubic")
    assert result.exit_code == 0, result.output
    by_model, by_bicubic = (np.asarray(Image.open(tmp_path / n)) for n in ("model.png", "bicubic.png"))
    assert by_model.shape == by_bicubic.shape == (80, 96, 4)
    expected = np.round(bicubic_resize_float(alpha[..., None] / 255.0, (80, 96))[..., 0] * 255)
    np.testing.assert_array_equal(by_bicubic[..., 3], expected.astype(np.uint8))
    assert not np.array_equal(by_model[..., 3], by_bicubic[..., 3])
    np.testing.assert_array_equal(by_model[..., :3], by_bicubic[..., :3])


@pytest.mark.parametrize(("mode", "dtype"), [("L", np.uint8), ("I;16", np.uint16), ("LA", np.uint8)])
def test_grayscale_stays_grayscale(lmf, tmp_path, butterfly, mode, dtype):
    gray = np.asarray(Image.fromarray(butterfly).convert("L"))
    if mode == "I;16":
        cv2.imwrite(str(tmp_path / "g.png"), gray.astype(np.uint16) * 257 + 100)
    elif mode == "LA":
        Image.fromarray(np.dstack([gray, 255 - gray]), "LA").save(tmp_path / "g.png")
    else:
        Image.fromarray(gray).save(tmp_path / "g.png")
    result = lmf(tmp_path / "g.png", "--scale", "2")
    assert result.exit_code == 0, result.output
    out = cv2.imread(str(tmp_path / "g_x2.png"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == dtype
    with Image.open(tmp_path / "g_x2.png") as img:
        assert img.mode in (mode, "I") and img.size == (96, 80)  # Pillow may open 16-bit gray as "I"


def test_jpeg_orientation_applied_and_metadata_kept(lmf, tmp_path, butterfly):
    stored = butterfly.copy()
    stored[:8, :8] = 255  # a white mark in the stored top-left corner
    Image.fromarray(stored).save(tmp_path / "cam.jpg", quality=95, exif=exif_bytes(6), icc_profile=ICC)
    with Image.open(tmp_path / "cam.jpg") as img:
        upright = np.rot90(np.asarray(img), k=-1)  # orientation 6: rotate 90 degrees clockwise to view
    Image.fromarray(upright).save(tmp_path / "upright.png")
    result = lmf(tmp_path / "cam.jpg", "--scale", "2")
    assert result.exit_code == 0, result.output
    assert "40 x 48 -> 80 x 96" in result.output  # upright size: W x H
    with Image.open(tmp_path / "cam_x2.jpg") as out:
        assert out.size == (80, 96)
        assert out.getexif().get(0x0112, 1) == 1 and out.getexif()[0x010F] == "LMF Camera"
        assert out.info["icc_profile"] == ICC
    assert lmf(tmp_path / "cam.jpg", "--scale", "2", "--format", "png").exit_code == 0
    assert lmf(tmp_path / "upright.png", "--scale", "2").exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cam_x2.png")),
                                  np.asarray(Image.open(tmp_path / "upright_x2.png")))
    result = lmf(tmp_path / "cam.jpg", "--scale", "2", "--strip-metadata", "-o", tmp_path / "bare.jpg")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "bare.jpg") as out:
        assert "icc_profile" not in out.info and not out.getexif()


# 5. Batch behaviour --------------------------------------------------------------------------------------

@pytest.fixture
def messy_tree(tmp_path, butterfly):
    """Good images beside a non-image, a truncated PNG, a zero-pixel PNG and a decompression bomb."""
    root = tmp_path / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(butterfly).save(root / "good.png")
    Image.fromarray(butterfly).save(root / "sub" / "good.jpg", quality=90)
    Image.fromarray(butterfly).convert("L").save(root / "sub" / "deeper" / "gray.png")
    (root / "sub" / "not image.png").write_bytes(b"just some text, not a PNG")
    full = (root / "good.png").read_bytes()
    (root / "sub" / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "zero.png").write_bytes(png_header(0, 5) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    width, height = 25_000, 20_000  # 500 megapixels of 1-bit gray in a few tens of kB
    pack, row = zlib.compressobj(9), b"\x00" * (1 + width // 8 + 1)
    idat = b"".join(pack.compress(row * 1000) for _ in range(height // 1000)) + pack.flush()
    (root / "deeper bomb.png").write_bytes(png_header(width, height, 1) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return root


def test_bad_files_are_reported_and_the_batch_goes_on(lmf, messy_tree, tmp_path):
    out = tmp_path / "out"
    result = lmf(messy_tree, "-r", "--scale", "2", "-o", out)
    assert result.exit_code == 1
    assert Image.open(out / "good_x2.png").size == (96, 80)
    assert Image.open(out / "sub" / "good_x2.jpg").size == (96, 80)
    assert Image.open(out / "sub" / "deeper" / "gray_x2.png").mode == "L"
    for name, reason in [("sub/not image.png", "not an image"), ("sub/truncated.png", "truncated"),
                         ("zero.png", "no pixels"), ("deeper bomb.png", "over the limit of 400,000,000")]:
        line = next(x for x in result.output.splitlines() if x.startswith(f"failed: {messy_tree / name}:"))
        assert reason in line
    assert "done 3, skipped 0, failed 4 in" in result.output
    assert len([p for p in out.rglob("*") if p.is_file()]) == 3 and no_partial_files(out)


def test_json_lines_for_scripts(lmf, messy_tree):
    result = lmf(messy_tree, "-r", "--scale", "2", "--json", "--quiet")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 7
    by_name = {Path(r["input"]).name: r for r in records}
    good = by_name["good.png"]
    assert good["status"] == "done" and good["input_size"] == [48, 40] and good["output_size"] == [96, 80]
    assert good["output"] == str(messy_tree / "good_x2.png") and good["seconds"] > 0
    bomb = by_name["deeper bomb.png"]
    assert bomb["status"] == "failed" and "pixels" in bomb["reason"] and bomb["output"] is None
    assert {r["status"] for r in records} == {"done", "failed"}


def test_dry_run_lists_and_writes_nothing(lmf, messy_tree):
    before = sorted(messy_tree.rglob("*"))
    result = lmf(messy_tree, "-r", "--width", "120", "--dry-run")
    assert result.exit_code == 1  # the bad files are reported
    assert sorted(messy_tree.rglob("*")) == before
    assert f"{messy_tree / 'good.png'} -> {messy_tree / 'good_120x100.png'}: 48 x 40 -> 120 x 100" in result.output
    assert "would write 4, skipped 0, failed 3" in result.output  # headers only: the truncated PNG passes


def test_quiet_prints_nothing_on_success(lmf, photo):
    result = lmf(photo, "--scale", "2", "--quiet")
    assert result.exit_code == 0 and result.output == ""
    assert photo.with_name("my photo é_x2.png").exists()


# 6. Progress and engine options --------------------------------------------------------------------------

def test_real_command_shows_file_and_tile_bars(weights, photo):
    lmf_exe = shutil.which("lmf", path=str(Path(sys.executable).parent))
    command = [lmf_exe] if lmf_exe else [sys.executable, "-c", "from lmf_cli.cli import app; app()"]
    env = {**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0", "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, "upscale", str(photo), "--scale", "2", "--tile", "8", "--model", str(weights),
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "ETA" in line]
    assert any(line.startswith("files") and "1/1" in line for line in lines), done.stderr
    assert any(line.startswith("tiles") and "30/30" in line for line in lines), done.stderr  # 6 x 5 tiles of 8


def test_engine_options(lmf, photo, tmp_path):
    assert lmf(photo, "--scale", "3", "-o", tmp_path / "whole.png").exit_code == 0
    result = lmf(photo, "--scale", "3", "-o", tmp_path / "tiled.png", "--tile", "16", "--max-memory", "64M",
                 "--precision", "fp32", "--quality", "exact")
    assert result.exit_code == 0, result.output
    whole, tiled = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("whole.png", "tiled.png"))
    assert np.abs(whole - tiled).max() <= 1  # tiling changes nothing beyond float rounding


def test_quality_is_the_cmsr_level(weights, photo, tmp_path):
    loaded = load_weights(weights)
    coarse = tmp_path / "coarse.safetensors"  # a table that renders every region at the coarsest level
    save_weights(coarse, loaded.model, loaded.spec, {}, {"2e-05": {"6": {"1": 1e9, "2": 1e9, "4": 1e9}}})
    outputs = {}
    for level in ("exact", "balanced"):
        outputs[level] = tmp_path / f"{level}.png"
        result = runner.invoke(app, ["upscale", str(photo), "--scale", "6", "--quality", level, "--model", str(coarse),
                                     "-o", str(outputs[level])])
        assert result.exit_code == 0, result.output
    exact, balanced = (np.asarray(Image.open(outputs[k])).astype(int) for k in ("exact", "balanced"))
    assert exact.shape == balanced.shape == (240, 288, 3) and np.abs(exact - balanced).mean() > 1


def test_reduced_precision(lmf, photo, tmp_path):
    result = lmf(photo, "--scale", "2", "--precision", "bf16", "-o", tmp_path / "bf16.png")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "bf16.png").size == (96, 80) and "(bf16)" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--quality", "fast"], "no CMSR tables"), (["--precision", "fp16"], "fp16"),
    (["--quality", "best"], "choose one of"),
    (["--precision", "fp8"], "choose one of"), (["--max-memory", "lots"], "512M or 2G"),
    (["--tile", "0"], "at least 1"), (["--format", "bmp"], "choose one of"), (["--alpha", "drop"], "choose one of"),
])
def test_engine_option_errors(lmf, photo, args, message):
    result = lmf(photo, "--scale", "2", *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_bad_device_and_missing_weights_are_one_line(photo, tmp_path, weights):
    result = runner.invoke(app, ["upscale", str(photo), "--scale", "2", "--model", str(weights), "--device", "nope"])
    assert result.exit_code == 1 and "--device nope" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["upscale", str(photo), "--scale", "2", "--model", str(tmp_path / "no.safetensors")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no.safetensors" in result.output


# 7. lmf models -------------------------------------------------------------------------------------------

def test_models_lists_cards(weights, tmp_path, monkeypatch):
    shutil.copyfile(weights, tmp_path / "lmf-edsr.safetensors")
    loaded = load_weights(weights)
    info = {"steps": 20000, "train_seconds": 7200, "eval": {"Set5": {"2": 37.91, "3": 34.17, "4.0": 32.03}}}
    save_weights(tmp_path / "lmf-edsr.safetensors", loaded.model, loaded.spec, info)
    monkeypatch.setattr(zoo, "weights_dirs", lambda: [tmp_path])
    result = runner.invoke(app, ["models"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    edsr = next(line for line in result.output.splitlines() if "lmf-edsr" in line)
    assert "ready" in edsr and "lmliif / edsr-baseline 2x16" in edsr
    assert f"{loaded.parameters / 1e6:.2f} M" in edsr and "20,000 steps, 2.0 h" in edsr
    assert "37.91 / 34.17 / 32.03" in edsr
    lite = next(line for line in result.output.splitlines() if "lmf-lite" in line)
    assert "not trained yet" in lite
    shutil.copyfile(weights, tmp_path / "lmf-lite.safetensors")  # a card without evaluation results
    result = runner.invoke(app, ["models"], env={"COLUMNS": "250"})
    lite = next(line for line in result.output.splitlines() if "lmf-lite" in line)
    assert "ready" in lite and "0 steps" in lite and "not evaluated" in lite


def test_same_size_files_batched_as_on_a_gpu_equal_one_at_a_time(weights, butterfly, tmp_path, monkeypatch):
    """On a GPU lmf upscale sends same-size files through one model call; forced here on the CPU, the
    outputs equal a one-by-one run, other layouts and sizes go on their own, a bad file fails alone."""
    folder = tmp_path / "in"
    folder.mkdir()
    crop = butterfly[:24, :32]
    for k in range(3):
        Image.fromarray(np.roll(crop, 5 * k, axis=1)).save(folder / f"rgb{k}.png")
    Image.fromarray(np.dstack([crop, crop[..., :1]])).save(folder / "rgba.png")
    Image.fromarray(butterfly[:20, :30]).save(folder / "other.png")
    good = (folder / "rgb0.png").read_bytes()
    (folder / "rgb1b.png").write_bytes(good[: len(good) // 2])  # truncated, in the middle of the group
    args = ["upscale", str(folder), "--scale", "2", "--model", str(weights), "--device", "cpu"]
    alone = runner.invoke(app, [*args, "-o", str(tmp_path / "alone")])
    calls = []
    monkeypatch.setattr(Upscaler, "frames_per_call", lambda up, in_hw, out_hw: calls.append(in_hw) or 8)
    batched = runner.invoke(app, [*args, "-o", str(tmp_path / "batched")])
    assert alone.exit_code == batched.exit_code == 1
    assert "failed: " in batched.output and "rgb1b.png" in batched.output and "done 5" in batched.output
    failures = [[line for line in run.output.splitlines() if "failed:" in line] for run in (alone, batched)]
    assert failures[0] == failures[1] and len(failures[0]) == 1
    for name in ("rgb0", "rgb1", "rgb2", "rgba", "other"):
        a = np.asarray(Image.open(tmp_path / "alone" / f"{name}_x2.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "batched" / f"{name}_x2.png")).astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, name
    assert len(calls) == 2  # one group of the 20x30 file, one of the five 24x32 files (in name order)


def test_an_exact_size_that_stretches_the_picture_says_so(lmf, photo):
    """--size 288x80 on a 48 x 40 photo (was stretched 3x wider in silence); rounding alone stays quiet."""
    stretched = lmf(photo, "--size", "288x80", "-o", photo.parent / "wide.png")
    assert stretched.exit_code == 0 and "stretches the picture wider by 200%" in stretched.output
    assert "--fit keeps the aspect" in stretched.output
    kept = lmf(photo, "--size", "97x81", "-o", photo.parent / "kept.png")
    assert kept.exit_code == 0 and "stretches" not in kept.output
