"""LM-CiaoSR and CiaoSR against the official code's outputs, their declared reach, CMSR and cost."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lmf_cli import EngineOptions, UnsupportedModelError, Upscaler
from lmf_cli import models as registry
from lmf_cli.engine import upscale_tensor
from lmf_cli.engine.budget import WHOLE_IMAGE, default_tile, plan_tile
from lmf_cli.engine.cmsr import Schedule
from lmf_cli.models.geometry import official_centres
from tests.official.weights import save_cases

CASES = ["lmciaosr-edsr", "ciaosr-edsr"]
SCALES = ["2", "3", "3.5", "8"]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """name -> (path of the official checkpoint, arrays of official inputs and outputs)."""
    return save_cases(tmp_path_factory.mktemp("official"), CASES)


def _load(path) -> Upscaler:
    return Upscaler.load(path, EngineOptions("cpu", precision="fp32"))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("scale", SCALES)
def test_matches_official_code(official, name, scale, render_path):
    path, arrays = official[name]
    ref = arrays[f"out_{scale}"]
    ours = _load(path).upscale(arrays["input"].astype(np.float32) / 255, size=ref.shape[:2])
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("name", CASES)
def test_large_maps_use_the_official_blocks(official, name):
    """Above 48 x 48 features the official attention runs in 48-pixel blocks: a 100 x 60 input has
    two block rows, and the stripe stored spans their seam (LR row 48, output rows 96)."""
    path, arrays = official[name]
    inp = arrays["crops_input"].astype(np.float32) / 255
    r0, r1 = arrays["crops_rows"]
    scale = float(arrays["crops_scale"])
    out = _load(path).upscale(inp, size=(round(inp.shape[0] * scale), round(inp.shape[1] * scale)))
    assert np.abs(out[r0:r1] - arrays["crops_out"]).max() < 1e-4


@pytest.mark.parametrize("name", CASES)
def test_engine_equals_the_pointwise_formula(official, name):
    """The window renderer (and LM-LIIF's shared one) against `model(inp, coord, cell)` at x3.5, at
    the official float32 pixel centres (on which CiaoSR's nearest lookups break their ties)."""
    path, arrays = official[name]
    up = _load(path)
    inp = torch.from_numpy(arrays["input"]).permute(2, 0, 1)[None].float() / 127.5 - 1
    out_hw = (28, 42)
    ys, xs = (official_centres(n).float() for n in out_hw)
    coord = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).view(1, -1, 2)
    cell = torch.ones_like(coord) * torch.tensor([2 / out_hw[0], 2 / out_hw[1]])
    with torch.inference_mode():
        points = up.model(inp, coord, cell).view(1, *out_hw, 3).permute(0, 3, 1, 2)
        window = upscale_tensor(up.model, inp, out_hw, EngineOptions("cpu"))
    assert (window - (points + 1) / 2).abs().max() < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_reach_is_global_and_never_tiled_silently(official, name):
    path, _ = official[name]
    caps = _load(path).capabilities
    assert caps.tile_grid is None
    cpu = torch.device("cpu")
    assert default_tile(caps, None, cpu) == WHOLE_IMAGE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_tile(caps, (180, 320), None, None, cpu) == WHOLE_IMAGE
    with pytest.warns(UserWarning, match="whole image"):
        assert plan_tile(caps, (180, 320), 64, None, cpu) == 64
    with pytest.warns(UserWarning, match="memory budget"):
        assert plan_tile(caps, (4000, 6000), None, 1 << 24, cpu) < 6000


def test_tiles_differ_where_the_reach_is_global(official):
    """Why the engine renders these models whole: cut into tiles, the attention sees less."""
    path, arrays = official["lmciaosr-edsr"]
    up = _load(path)
    inp = torch.from_numpy(arrays["crops_input"]).permute(2, 0, 1)[None].float() / 127.5 - 1
    whole = upscale_tensor(up.model, inp, (200, 120), EngineOptions("cpu"))
    with pytest.warns(UserWarning, match=r"attends over the whole image, so 48-pixel tiles will differ from a "
                                         r"whole-image run \(measured with random weights: up to 1.5 8-bit levels\)"):
        tiled = upscale_tensor(up.model, inp, (200, 120), EngineOptions("cpu", tile=48))
    assert (whole - tiled).abs().max() > 1e-3


def test_cmsr_renders_coarse_levels(official, render_path):
    """LM-CiaoSR's render MLP is LM-LIIF's: its shift modulations drive CMSR. A schedule whose
    thresholds no latent reaches renders exactly; one every latent passes draws fewer pixels."""
    path, arrays = official["lmciaosr-edsr"]
    up = _load(path)
    assert up.capabilities.cmsr
    inp = torch.from_numpy(arrays["input"]).permute(2, 0, 1)[None].float() / 127.5 - 1
    exact = upscale_tensor(up.model, inp, (64, 96), EngineOptions("cpu"))
    none_coarse, all_coarse = {}, {}
    same = upscale_tensor(up.model, inp, (64, 96), EngineOptions("cpu"), Schedule((2.0,), (0.0,)),
                          stats=none_coarse)
    coarse = upscale_tensor(up.model, inp, (64, 96), EngineOptions("cpu"), Schedule((2.0,), (1e9,)),
                            stats=all_coarse)
    assert (same - exact).abs().max() < 1e-5
    assert all_coarse["rendered"] < 0.25 * all_coarse["total"]
    assert (coarse - exact).abs().mean() < 0.05


def test_decoder_macs_and_the_papers_claim():
    """Official configurations on EDSR-baseline, 320 x 180: LM-CiaoSR's decoder does over 99.5%
    fewer MACs than CiaoSR's at x30 (the paper: up to 99.9%), and its render stage ~10 KMACs a pixel."""
    lm = registry.make(registry.lmciaosr_spec())
    ciao = registry.make(registry.ciaosr_spec())
    in_hw, out_hw = (180, 320), (5400, 9600)
    lm_macs, ciao_macs = lm.stage_macs(in_hw, out_hw), ciao.stage_macs(in_hw, out_hw)
    assert lm_macs["render"] / (out_hw[0] * out_hw[1]) == 4 * (34 * 16 + 7 * 16 * 16 + 16 * 3)
    assert ciao_macs["render"] / (out_hw[0] * out_hw[1]) == (640 * 256 + 3 * 256 ** 2 + 256 * 3) + 4 * (
        580 * 256 + 3 * 256 ** 2 + 256 * 576 + 644 * 256 + 3 * 256 ** 2 + 256 * 640)
    saved = 1 - sum(lm_macs.values()) / sum(ciao_macs.values())
    assert 0.995 < saved < 1


@pytest.mark.parametrize("change", [{"feat_unfold": False}, {"local_size": 3}, {"multi_scale": [5]}])
def test_unsupported_arguments_are_refused(change):
    spec = registry.lmciaosr_spec()
    spec["args"].update(change)
    with pytest.raises(UnsupportedModelError):
        registry.make(spec)


def test_cmsr_tables_calibrate(official):
    """`lmf`'s Scale2Mod calibration runs on LM-CiaoSR as on LM-LIIF (tables monotone in decode scale)."""
    from lmf_cli.training.calibrate import calibrate

    path, arrays = official["lmciaosr-edsr"]
    hr = np.kron(arrays["crops_input"][:64, :48], np.ones((2, 2, 1), dtype=np.uint8))
    tables = calibrate(_load(path).model, [hr], targets=(8.0,))
    levels = [v for _, v in sorted((float(d), v) for d, v in tables["8"].items())]
    assert levels and levels == sorted(levels)


def test_lmf_models_lists_what_the_new_families_do():
    from lmf_cli.models.zoo import family_facts

    facts = {f.name: f for f in family_facts()}
    assert "whole image" in facts["LM-CiaoSR"].tiling and facts["LM-CiaoSR"].cmsr.startswith("yes")
    assert "whole image" in facts["CiaoSR"].tiling and facts["CiaoSR"].cmsr == "no"
    assert facts["LM-LIIF"].tiling.startswith("exact")
