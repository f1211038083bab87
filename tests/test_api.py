"""The Python API contract (DESIGN.md §5): dtypes, sizes, channels, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmf_cli import EngineOptions, InputError, Upscaler, api, plan_size
from lmf_cli.errors import OptionError


@pytest.fixture(scope="module")
def up(official_files):
    return Upscaler.load(official_files["lmliif"], EngineOptions("cpu"))


def test_auto_options_mean_the_loaded_device_and_precision(official_files, butterfly, monkeypatch):
    """EngineOptions(tile=...) with its device and precision left at 'auto' works with an Upscaler
    loaded on the CPU of a machine whose 'auto' would be a GPU (simulated here)."""
    up = Upscaler.load(official_files["lmliif"], EngineOptions("cpu", "fp32"))
    expected = up.upscale(butterfly, scale=2)
    monkeypatch.setattr(api, "pick_device", lambda device="auto": torch.device("cuda" if device == "auto" else device))
    assert np.array_equal(up.upscale(butterfly, scale=2, options=EngineOptions(tile=16)), expected)
    with pytest.raises(OptionError, match="loaded on cpu"):
        up.upscale(butterfly, scale=2, options=EngineOptions("cuda", "fp32"))


def test_dtypes_round_trip(up, butterfly):
    u8 = up.upscale(butterfly, scale=2)
    u16 = up.upscale(butterfly.astype(np.uint16) * 257, scale=2)
    f32 = up.upscale(butterfly.astype(np.float32) / 255, scale=2)
    assert (u8.dtype, u16.dtype, f32.dtype) == (np.uint8, np.uint16, np.float32)
    assert u8.shape == u16.shape == f32.shape == (80, 96, 3)
    assert 0 <= f32.min() and f32.max() <= 1
    assert np.abs(u8.astype(int) - np.round(f32 * 255)).max() <= 1
    assert np.abs(u16 / 65535 - f32).max() < 1e-4


def test_float_input_is_clamped(up, butterfly):
    img = butterfly.astype(np.float32) / 255
    img[0, 0] = 5.0
    out = up.upscale(img, scale=1.5)
    assert out.max() <= 1


@pytest.mark.parametrize(("scale", "expected"), [(3.7, (148, 178)), (1.33, (53, 64)), ((2.5, 1.25), (100, 60))])
def test_fractional_and_per_axis_sizes(up, butterfly, scale, expected):
    assert up.upscale(butterfly, scale=scale).shape[:2] == expected


def test_exact_size(up, butterfly):
    assert up.upscale(butterfly, size=(123, 77)).shape == (123, 77, 3)


def test_grayscale_and_alpha(up, butterfly):
    gray = butterfly.mean(axis=2).astype(np.uint8)
    assert up.upscale(gray, scale=2).shape == (80, 96)
    assert up.upscale(gray[..., None], scale=2).shape == (80, 96, 1)
    alpha = butterfly[..., 1]
    rgba = np.dstack([butterfly, alpha])
    out = up.upscale(rgba, scale=2)
    assert out.shape == (80, 96, 4)
    assert np.array_equal(out[..., 3], up.upscale(alpha, scale=2))
    assert np.array_equal(out[..., :3], up.upscale(butterfly, scale=2))
    flat = np.dstack([butterfly, np.full(butterfly.shape[:2], 200, np.uint8)])
    assert (up.upscale(flat, scale=2, options=EngineOptions(alpha="bicubic"))[..., 3] == 200).all()


def test_model_beats_nothing_but_runs_on_real_photo(up, butterfly):
    out = up.upscale(butterfly, scale=2)
    assert out.std() > 1  # a random-weight model still renders a non-constant image


@pytest.mark.parametrize("kwargs", [{"scale": 0.5}, {"scale": (2, 0.9)}, {"size": (10, 10)}, {"size": (0, 90)},
                                    {"scale": -1}, {}, {"scale": 2, "size": (90, 90)}])
def test_refusals(up, butterfly, kwargs):
    with pytest.raises(InputError):
        up.upscale(butterfly, **kwargs)


def test_bad_arrays(up):
    with pytest.raises(InputError):
        up.upscale(np.zeros((4, 4, 3), np.float64), scale=2)
    with pytest.raises(InputError):
        up.upscale(np.zeros((4, 4, 2), np.uint8), scale=2)
    with pytest.raises(InputError):
        up.upscale(np.zeros((0, 4, 3), np.uint8), scale=2)


def test_plan_rounding():
    assert plan_size((10, 10), scale=1.25).out_hw == (13, 13)  # round half up: 12.5 -> 13
    assert plan_size((3, 7), scale=(1.5, 2)).out_hw == (5, 14)


def test_model_and_encoder_are_exposed(up):
    import torch

    assert isinstance(up.model, torch.nn.Module) and isinstance(up.model.encoder, torch.nn.Module)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_are_refused_with_a_count(official_files, butterfly, bad):
    up = Upscaler.load(official_files["lmliif"], EngineOptions("cpu"))
    image = butterfly.astype(np.float32) / 255
    image[3, 4, 1] = bad
    image[10, 20, 0] = bad
    with pytest.raises(InputError, match="2 values are not finite"):
        up.upscale(image, scale=2)
    image[10, 20, 0] = 0.5
    with pytest.raises(InputError, match="1 value is not finite"):
        up.upscale(image, scale=2)


@pytest.mark.parametrize("arch", ["lmliif", "lte"])
def test_a_batch_equals_each_image_alone(official_files, butterfly, arch, render_path):
    up = Upscaler.load(official_files[arch], EngineOptions("cpu"))
    frames = np.stack([butterfly, butterfly[::-1], butterfly[:, ::-1]]).astype(np.float32) / 255
    for kwargs in ({"scale": 2.5}, {"size": (97, 61), "options": EngineOptions(tile=16)}):
        together = up.upscale_batch(frames, **kwargs)
        alone = np.stack([up.upscale(f, **kwargs) for f in frames])
        assert together.shape == alone.shape and together.dtype == np.float32
        assert np.abs(together - alone).max() < 1e-5
    rgba = np.concatenate([butterfly, butterfly[..., :1]], axis=2)
    listed = up.upscale_batch([rgba, rgba[::-1]], scale=2)  # a list of uint8 RGBA images
    assert listed.shape == (2, 80, 96, 4) and listed.dtype == np.uint8
    assert np.abs(listed[1].astype(int) - up.upscale(rgba[::-1], scale=2).astype(int)).max() <= 1


def test_a_batch_needs_one_shape(official_files, butterfly):
    up = Upscaler.load(official_files["lmliif"], EngineOptions("cpu"))
    with pytest.raises(InputError, match="one shape and dtype"):
        up.upscale_batch([butterfly, butterfly[:20]], scale=2)
    with pytest.raises(InputError, match="no images"):
        up.upscale_batch([], scale=2)


def test_auto_precision_follows_the_cpu(official_files, butterfly, monkeypatch):
    """auto: a bf16 encoder only where the CPU has native bf16 (forced here both ways), fp16 on CUDA;
    the bf16 result stays close to fp32 (it costs lmf-edsr 0.001 dB on Set5)."""
    import torch

    from lmf_cli.api import encoder_dtype

    monkeypatch.setenv("LMF_CPU_BF16", "1")
    fast = Upscaler.load(official_files["lmliif"], EngineOptions("cpu"))
    assert fast.precision == "bf16" and encoder_dtype("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setenv("LMF_CPU_BF16", "0")
    exact = Upscaler.load(official_files["lmliif"], EngineOptions("cpu"))
    assert exact.precision == "fp32"
    image = butterfly.astype(np.float32) / 255
    assert np.abs(fast.upscale(image, scale=2) - exact.upscale(image, scale=2)).mean() < 0.01


def test_the_readme_python_example_runs_as_written(monkeypatch):
    """The README's Python block, executed from the repository root with the shipped lmf-lite."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    block = re.search(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(root)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the documentation's own example
    image, tiled = scope["image"], scope["tiled"]
    assert tiled.shape == (image.shape[0] * 4, image.shape[1] * 4, 3) and tiled.dtype == np.uint8
    assert scope["exact"].shape[:2] == (270, 480)
