"""The SwinIR encoder: official LM-LIIF, LM-LTE and LM-CiaoSR checkpoints on it against the official
code's outputs, its declared reach, and exact tiling on its window grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmf_cli import EngineOptions, Upscaler
from lmf_cli import models as registry
from lmf_cli.engine import upscale_tensor
from lmf_cli.models.swinir import SwinIR
from tests.official.weights import save_cases

CASES = ["lmliif-swinir", "lmlte-swinir", "lmciaosr-swinir"]
SCALES = ["2", "3", "3.5", "8"]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return save_cases(tmp_path_factory.mktemp("official-swinir"), CASES)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("scale", SCALES)
def test_matches_official_code(official, name, scale, render_path):
    """8 x 12 inputs are whole windows (4), where the official forward and ours see the same pixels."""
    path, arrays = official[name]
    ref = arrays[f"out_{scale}"]
    up = Upscaler.load(path, EngineOptions("cpu", precision="fp32"))
    ours = up.upscale(arrays["input"].astype(np.float32) / 255, size=ref.shape[:2])
    assert np.abs(ours - ref).max() < 1e-4


def _tiny_swinir() -> SwinIR:
    torch.manual_seed(0)
    enc = registry.make_encoder({"name": "swinir", "args": {"img_size": 8, "embed_dim": 12, "depths": [2, 2],
                                                            "num_heads": [2, 2], "window_size": 4}})
    for p in enc.parameters():
        p.data.normal_(0, 0.3)
    return enc.eval()


def test_reach_is_what_the_encoder_declares():
    """A pixel just beyond the receptive radius changes nothing at the origin; one within it does."""
    enc = _tiny_swinir()
    radius = enc.receptive_radius
    assert radius >= 2 * 2 * 3 + 2 + 3  # 4 blocks of window 4, 2 RSTB convs, 3 more convs
    assert (radius + 3) % enc.window_size == 0  # a decoder's margin is whole windows
    x = torch.rand(1, 3, 48, 48)
    far, near = x.clone(), x.clone()
    far[..., radius + 1, 0] += 1
    near[..., 4, 4] += 1
    with torch.inference_mode():
        base = enc(x)[..., 0, 0]
        assert torch.equal(enc(far)[..., 0, 0], base)
        assert not torch.allclose(enc(near)[..., 0, 0], base)


def test_features_align_with_pixels_on_any_size():
    """Inputs that are not whole windows are padded and the features cut back to the input."""
    enc = _tiny_swinir()
    with torch.inference_mode():
        assert enc(torch.rand(1, 3, 13, 7)).shape == (1, 64, 13, 7)
        assert enc(torch.rand(1, 3, 2, 3)).shape == (1, 64, 2, 3)


@pytest.mark.parametrize("name", ["lmliif-swinir", "lmlte-swinir"])
def test_tiles_on_the_window_grid_equal_the_whole_image(official, name):
    path, _ = official[name]
    up = Upscaler.load(path, EngineOptions("cpu", precision="fp32"))
    assert up.capabilities.tile_margin % 4 == 0
    inp = torch.rand(1, 3, 45, 38, generator=torch.Generator().manual_seed(3)) * 2 - 1
    out_hw = (101, 87)
    whole = upscale_tensor(up.model, inp, out_hw, EngineOptions("cpu"))
    for tile in (16, 24):  # whole windows of 4
        tiled = upscale_tensor(up.model, inp, out_hw, EngineOptions("cpu", tile=tile))
        assert (tiled - whole).abs().max() < 1e-4


def test_paper_configuration_builds():
    """The official factory's defaults: 180 channels, 6 RSTBs of 6 blocks, window 8, 64 features."""
    enc = registry.make_encoder(registry.swinir_spec())
    assert enc.out_dim == 64 and enc.window_size == 8 and len(enc.layers) == 6
    assert 11.5e6 < sum(p.numel() for p in enc.parameters()) < 12.0e6


def test_tiles_are_planned_on_the_window_grid():
    """Asked sides round up to the grid; default sides are whole multiples of 16 and at least the
    margin (SwinIR's ~260 pixels would otherwise leave 16-pixel cores); a fitting image is one tile."""
    from lmf_cli.engine.budget import WHOLE_IMAGE, default_tile, plan_tile
    from lmf_cli.models.base import Capabilities

    cpu = torch.device("cpu")
    caps = Capabilities("lmliif", 264, 64, 272, 16, tile_grid=8)
    assert plan_tile(caps, (5000, 5000), 50, None, cpu) == 56
    side = default_tile(caps, 1 << 28, cpu)
    assert side % 16 == 0 and side >= 264
    assert plan_tile(caps, (180, 320), None, 1 << 28, cpu) == WHOLE_IMAGE
    assert plan_tile(caps, (5000, 5000), None, 1 << 28, cpu) == side
