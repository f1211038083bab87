"""Choosing a model for the user: what the input file says about itself, and which shipped model fits."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from lmf_cli.io.compression import input_quality, jpeg_quality
from lmf_cli.models import zoo


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("quality", [25, 40, 60, 75, 88, 95])
def test_jpeg_quality_is_read_back_from_pillow_and_opencv_files(photo, tmp_path, quality):
    pillow_file, opencv_file = tmp_path / "p.jpg", tmp_path / "o.jpg"
    photo.save(pillow_file, quality=quality)
    cv2.imwrite(str(opencv_file), np.asarray(photo)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    for path in (pillow_file, opencv_file):
        with Image.open(path) as img:
            assert jpeg_quality(img.quantization[0]) == quality


def test_input_quality_by_format(photo, tmp_path):
    cases = {"q75.jpg": ({"quality": 75}, "compressed"), "q95.jpg": ({"quality": 95}, "clean"),
             "a.png": ({}, "clean"), "lossless.webp": ({"lossless": True}, "clean"),
             "lossy.webp": ({"quality": 80}, "compressed"), "a.tif": ({}, "clean")}
    for name, (options, kind) in cases.items():
        photo.save(tmp_path / name, **options)
        found = input_quality(tmp_path / name)
        assert found.kind == kind, (name, found)
    assert input_quality(tmp_path / "q75.jpg").reason == "JPEG quality ~75"
    photo.save(tmp_path / "a.avif", quality=90)
    assert input_quality(tmp_path / "a.avif").kind == "compressed"
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.from_pillow(photo).save(tmp_path / "a.heic", quality=90)
    assert input_quality(tmp_path / "a.heic").reason == "HEIF"
    assert input_quality(tmp_path / "a.heic").kind == "compressed"
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    assert input_quality(tmp_path / "junk.jpg").kind == "clean"


def _present(names: set[str]):
    return lambda name: Path(f"/weights/{name}.safetensors") if name in names else None


@pytest.mark.parametrize(("inputs", "light", "name"), [
    ("clean", False, "lmf-edsr"), ("clean", True, "lmf-lite"),
    ("compressed", False, "lmf-real"), ("compressed", True, "lmf-real-lite")])
def test_choose_model_with_every_model_present(monkeypatch, inputs, light, name):
    monkeypatch.setattr(zoo, "shipped_path", _present(set(zoo.SHIPPED)))
    choice = zoo.choose_model(inputs, light)
    assert choice.name == name
    assert "missing" not in choice.reason


def test_choose_model_falls_back_to_the_same_kind_of_input_first(monkeypatch):
    monkeypatch.setattr(zoo, "shipped_path", _present({"lmf-edsr", "lmf-lite", "lmf-real"}))
    choice = zoo.choose_model("compressed", light=True)
    assert choice.name == "lmf-real" and "missing" in choice.reason
    monkeypatch.setattr(zoo, "shipped_path", _present({"lmf-lite"}))
    assert zoo.choose_model("compressed", light=False).name == "lmf-lite"
    with pytest.raises(ValueError):
        zoo.choose_model("auto", light=False)


def test_every_choice_names_a_shipped_model_of_this_build():
    for inputs in ("clean", "compressed"):
        for light in (False, True):
            assert zoo.shipped_path(zoo.choose_model(inputs, light).name) is not None


def test_lmf_upscale_picks_the_model_per_file_and_says_so(photo, tmp_path):
    from typer.testing import CliRunner

    from lmf_cli.cli import app

    small = photo.resize((28, 20))
    small.save(tmp_path / "web.jpg", quality=60)
    small.save(tmp_path / "scan.png")
    runner = CliRunner()
    result = runner.invoke(app, ["upscale", str(tmp_path / "web.jpg"), str(tmp_path / "scan.png"), "--scale", "2",
                                 "-o", str(tmp_path / "auto")])
    assert result.exit_code == 0, result.output
    assert "lmf-real: JPEG quality ~60: compressed input" in result.output
    assert "lmf-edsr: PNG: clean input" in result.output
    assert (tmp_path / "auto" / "web_x2.jpg").is_file() and (tmp_path / "auto" / "scan_x2.png").is_file()
    result = runner.invoke(app, ["upscale", str(tmp_path / "web.jpg"), "--scale", "2", "--input-quality", "clean",
                                 "-o", str(tmp_path / "clean.jpg")])
    assert result.exit_code == 0 and "lmf-edsr: --input-quality clean" in result.output
    result = runner.invoke(app, ["upscale", str(tmp_path / "web.jpg"), "--scale", "2", "--input-quality", "raw"])
    assert result.exit_code == 1 and "choose one of auto, clean, compressed" in result.output


def test_video_defaults_to_the_robust_model_for_the_device():
    from lmf_cli.cli.video import video_model

    name, why = video_model(None, "cpu")
    assert name == zoo.choose_model("compressed", light=True).name and "video is compressed" in why
    assert zoo.SHIPPED[name].inputs == "compressed"
    assert video_model("lmf-edsr", "cpu") == ("lmf-edsr", "--model")
