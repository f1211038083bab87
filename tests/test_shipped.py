"""The weights we ship: found by name from anywhere, and better than bicubic on a real photo."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from lmf_cli import EngineOptions, Upscaler
from lmf_cli.cli import app
from lmf_cli.evaluation.protocol import bicubic_method, psnr
from lmf_cli.imaging.resample import make_pair
from lmf_cli.io.images import load_rgb
from tests.conftest import DATA

# Set5 "bird" at x2 / x4: bicubic 36.84 / 30.19 dB; at release lmf-edsr 41.61 / 33.05, lmf-lite 40.77 / 32.65;
# diif-edsr 41.38 / 32.96 (at 210 of its 276 steps); lmf-real 38.53 / 32.07 (it trades clean detail for robustness)
MIN_GAIN = {"lmf-edsr": (4.0, 2.4), "lmf-lite": (3.5, 2.0), "diif-edsr": (4.0, 2.4), "lmf-real": (1.2, 1.4)}


@pytest.mark.parametrize("name", list(MIN_GAIN))
def test_shipped_model_beats_bicubic(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # loading by name does not depend on the working directory
    up = Upscaler.load(name, EngineOptions("cpu"))
    hr = load_rgb(DATA / "Set5" / "HR" / "bird.png")
    for scale, gain in zip((2, 4), MIN_GAIN[name], strict=True):
        hr_crop, lr = make_pair(hr, scale)
        truth = hr_crop.astype(np.float32) / 255
        ours = psnr(up.upscale(lr.astype(np.float32) / 255, size=hr_crop.shape[:2]), truth, scale, True)
        base = psnr(bicubic_method(lr, hr_crop.shape[:2]), truth, scale, True)
        assert ours - base >= gain, (name, scale, ours, base)


def test_lmf_real_undoes_jpeg_where_lmf_edsr_sharpens_it():
    """Bird at JPEG quality 40 after the bicubic LR: lmf-real +0.57 / +0.36 dB over bicubic at x2 / x4
    when shipped, lmf-edsr -0.58 / -0.35 (it sharpens the blocks)."""
    from lmf_cli.imaging.degradations import parse_degradation

    hr = load_rgb(DATA / "Set5" / "HR" / "bird.png")
    real, clean = Upscaler.load("lmf-real", EngineOptions("cpu")), Upscaler.load("lmf-edsr", EngineOptions("cpu"))
    for scale, gain in ((2, 0.3), (4, 0.2)):
        hr_crop, lr = make_pair(hr, scale)
        lr = parse_degradation("jpeg:40")(lr, seed=1)
        truth = hr_crop.astype(np.float32) / 255
        ours = psnr(real.upscale(lr.astype(np.float32) / 255, size=hr_crop.shape[:2]), truth, scale, True)
        sharp = psnr(clean.upscale(lr.astype(np.float32) / 255, size=hr_crop.shape[:2]), truth, scale, True)
        base = psnr(bicubic_method(lr, hr_crop.shape[:2]), truth, scale, True)
        assert ours - base >= gain and ours - sharp >= 2 * gain, (scale, ours, sharp, base)


def test_models_command_lists_both_as_ready(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    ready = [line for line in result.output.splitlines() if "ready" in line]
    assert any("lmf-edsr" in line for line in ready) and any("lmf-lite" in line for line in ready)
