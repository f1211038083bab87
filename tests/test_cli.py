"""The `lmf` command on real small files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lmf_cli.checkpoints import load_weights, save_weights
from lmf_cli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def weights(official_files, tmp_path_factory):
    loaded = load_weights(official_files["lmliif"])
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(path, loaded.model, loaded.spec, {"steps": 0})
    return path


@pytest.fixture
def photo(tmp_path, butterfly):
    path = tmp_path / "my photo é.png"
    Image.fromarray(butterfly).save(path)
    return path


def test_upscale_scale_writes_beside_input(weights, photo):
    result = runner.invoke(app, ["upscale", str(photo), "--scale", "3.7", "--model", str(weights), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = photo.with_name("my photo é_x3.7.png")
    assert Image.open(out).size == (178, 148)
    assert "48 x 40 -> 178 x 148" in result.output


@pytest.mark.parametrize(("args", "size"), [(["--width", "100"], (100, 83)), (["--height", "60"], (72, 60)),
                                            (["--size", "101x77"], (101, 77))])
def test_upscale_sizes(weights, photo, tmp_path, args, size):
    out = tmp_path / "out.png"
    result = runner.invoke(app, ["upscale", str(photo), *args, "-o", str(out), "--model", str(weights)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == size


def test_never_overwrites_input_and_skips_existing(weights, photo):
    before = photo.read_bytes()
    result = runner.invoke(app, ["upscale", str(photo), "--scale", "2", "-o", str(photo), "--model", str(weights)])
    assert result.exit_code == 1 and photo.read_bytes() == before
    assert "refusing" in result.output


def test_bad_file_in_batch_is_reported(weights, tmp_path, butterfly):
    Image.fromarray(butterfly).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    result = runner.invoke(app, ["upscale", str(tmp_path), "--scale", "2", "--model", str(weights)])
    assert result.exit_code == 1
    assert (tmp_path / "good_x2.png").exists()
    assert "bad.png" in result.output and not (tmp_path / "bad_x2.png").exists()


def test_shrinking_is_a_clear_error(weights, photo):
    result = runner.invoke(app, ["upscale", str(photo), "--scale", "0.5", "--model", str(weights)])
    assert result.exit_code == 1 and "only enlarges" in result.output


def test_missing_weights_is_one_line(photo, tmp_path):
    result = runner.invoke(app, ["upscale", str(photo), "--scale", "2", "--model", str(tmp_path / "no.safetensors")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no.safetensors" in result.output


def test_models_lists_shipped_names():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "lmf-edsr" in result.output and "lmf-lite" in result.output


def test_sixteen_bit_png_stays_sixteen_bit(weights, tmp_path):
    import cv2

    img = (np.random.default_rng(0).random((20, 24, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), img)
    result = runner.invoke(app, ["upscale", str(tmp_path / "deep.png"), "--scale", "2", "--model", str(weights)])
    assert result.exit_code == 0, result.output
    out = cv2.imread(str(tmp_path / "deep_x2.png"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == (40, 48, 3)
