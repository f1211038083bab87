"""The four decoders against an independent float64 computation of the official formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmf_cli import EngineOptions, Upscaler
from lmf_cli.engine import upscale_tensor
from lmf_cli.models.geometry import make_coord
from tests.conftest import official_checkpoint
from tests.reference import predict

ARCHS = ["liif", "lte", "lmliif", "lmlte"]
# x3 puts queries exactly on latent centres, including the collapsed last row/column
SIZES = {"x2": (2, 2), "x3": (3, 3), "x3.5": (3.5, 3.5), "x8": (8, 8), "x12": (12, 12), "x2.5/x1.5": (2.5, 1.5)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scale", list(SIZES))
def test_official_checkpoint_matches_formulas(official_files, butterfly, arch, scale, render_path):
    up = Upscaler.load(official_files[arch], EngineOptions("cpu"))
    lr = butterfly[:12, :14]
    sy, sx = SIZES[scale]
    out_hw = (round(12 * sy), round(14 * sx))
    ours = up.upscale(lr.astype(np.float32) / 255, size=out_hw)
    block = torch.load(official_files[arch], weights_only=True)["model"]
    inp = torch.from_numpy(lr).permute(2, 0, 1)[None].double() / 255
    ref = predict(block["name"], block["sd"], block["args"], inp, out_hw).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-4


def test_lmliif_with_bilinear_skip_matches_formulas(tmp_path, butterfly, render_path):
    """Our shipped variant: official LM-LIIF plus a bilinear upsample of the input."""
    ckpt = official_checkpoint("lmliif", {"name": "edsr-baseline", "args": {"n_resblocks": 2, "n_feats": 16}})
    ckpt["model"]["args"]["bilinear_skip"] = True
    torch.save(ckpt, tmp_path / "skip.pth")
    up = Upscaler.load(tmp_path / "skip.pth", EngineOptions("cpu"))
    lr = butterfly[:12, :14]
    ours = up.upscale(lr.astype(np.float32) / 255, size=(41, 30))
    ref = predict("lmliif", ckpt["model"]["sd"], ckpt["model"]["args"],
                  torch.from_numpy(lr).permute(2, 0, 1)[None].double() / 255, (41, 30)).numpy()
    assert np.abs(ours - ref).max() < 1e-4


def test_rdn_encoder_matches_formulas(tmp_path, butterfly):
    rdn = {"name": "rdn", "args": {"G0": 16, "RDNkSize": 3, "RDNconfig": "A", "no_upsampling": True}}
    path = tmp_path / "rdn-lmliif.pth"
    torch.save(official_checkpoint("lmliif", rdn), path)
    up = Upscaler.load(path, EngineOptions("cpu"))
    lr = butterfly[:10, :9]
    ours = up.upscale(lr.astype(np.float32) / 255, size=(23, 31))
    block = torch.load(path, weights_only=True)["model"]
    ref = predict("lmliif", block["sd"], block["args"], torch.from_numpy(lr).permute(2, 0, 1)[None] / 255,
                  (23, 31)).numpy()
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_grid_rendering_equals_point_queries(official_files, arch, render_path):
    """The fast grouped renderer and the per-point path (used in training) agree."""
    model = Upscaler.load(official_files[arch], EngineOptions("cpu")).model
    torch.manual_seed(0)
    inp = torch.rand(1, 3, 9, 11) * 2 - 1
    big_h, big_w = 25, 20
    grid = upscale_tensor(model, inp, (big_h, big_w)) * 2 - 1
    coord = make_coord(big_h, big_w)[None]
    cell = torch.tensor([2 / big_h, 2 / big_w]).expand(1, big_h * big_w, 2)
    with torch.no_grad():
        points = model(inp, coord, cell).view(1, big_h, big_w, 3).permute(0, 3, 1, 2)
    assert torch.allclose(grid, points, atol=2e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("out_hw", [(97, 131), (390, 460)])  # rows per latent; per latent and role (x9.75, x9.6)
def test_chunk_size_changes_nothing(official_files, arch, butterfly, out_hw, render_path):
    model = Upscaler.load(official_files[arch], EngineOptions("cpu")).model
    inp = torch.from_numpy(butterfly).permute(2, 0, 1)[None].float() / 127.5 - 1
    outs = [upscale_tensor(model, inp, out_hw, EngineOptions(max_memory=m)) for m in (1 << 30, 1 << 21, 1 << 19)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_deterministic(official_files, butterfly):
    up = Upscaler.load(official_files["lmliif"], EngineOptions("cpu"))
    assert np.array_equal(up.upscale(butterfly, scale=2.7), up.upscale(butterfly, scale=2.7))


def test_training_forward_has_gradients():
    from lmf_cli import models

    model = models.make(models.lmliif_spec(models.edsr_spec(1, 8), bilinear_skip=True))
    inp = torch.rand(2, 3, 12, 12) * 2 - 1
    coord = torch.rand(2, 50, 2) * 2 - 1
    cell = torch.full((2, 50, 2), 2 / 30)
    model(inp, coord, cell).abs().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_official_state_dict_keys_are_ours():
    from lmf_cli import models

    for arch in ARCHS:
        ckpt = official_checkpoint(arch, models.edsr_spec(16, 64))
        model = models.make({"name": arch, "args": ckpt["model"]["args"]})
        assert set(model.state_dict()) == set(ckpt["model"]["sd"])


@pytest.mark.parametrize("arch", ["liif", "lmliif", "lmlte"])
@pytest.mark.parametrize(("hw", "scale"), [((40, 52), 3), ((33, 47), 3), ((21, 38), 5)])
def test_odd_scales_follow_the_official_float32_coordinates(official_files, arch, hw, scale, render_path):
    """Queries on a latent centre: whether the ensemble collapses is decided, as in the official
    code, by its float32 coordinates (at 40x52 x3 it does not on row 118, where exact arithmetic
    would; these sizes round both ways)."""
    from PIL import Image

    from tests.conftest import DATA

    with Image.open(DATA / "Set5" / "HR" / "baby.png") as img:
        lr = np.asarray(img.convert("RGB"))[:hw[0], :hw[1]].copy()
    out_hw = (hw[0] * scale, hw[1] * scale)
    ours = Upscaler.load(official_files[arch], EngineOptions("cpu")).upscale(lr.astype(np.float32) / 255, size=out_hw)
    block = torch.load(official_files[arch], weights_only=True)["model"]
    ref = predict(block["name"], block["sd"], block["args"], torch.from_numpy(lr).permute(2, 0, 1)[None] / 255,
                  out_hw).numpy()
    assert np.abs(ours - ref).max() < 1e-4


def test_table_linear_is_the_linear_row_by_row_whatever_the_table():
    """The latent MLP's second layer runs as a 1x1 convolution on the CPU: the same numbers as the
    linear layer to float rounding, each row's bits independent of the table it sits in (tiles and
    row bands must match a whole-image run), and gradients for training."""
    from lmf_cli.models.mlp import table_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(208, 208)
    table = torch.randn(1, 37, 53, 208)
    out = table_linear(table, layer)
    assert out.shape == (1, 37, 53, 208) and out.is_contiguous()
    assert torch.allclose(out, layer(table), atol=1e-5)
    for rows, cols in [(slice(0, 1), slice(0, 1)), (slice(5, 20), slice(3, 50)), (slice(36, 37), slice(0, 53))]:
        assert torch.equal(table_linear(table[:, rows, cols].contiguous(), layer), out[:, rows, cols])
    leaf = table[:, :4, :4].clone().requires_grad_()
    table_linear(leaf, layer).sum().backward()
    assert torch.allclose(leaf.grad, layer.weight.sum(0).expand_as(leaf), atol=1e-4)


@pytest.mark.parametrize("arch", ["lmliif", "lmlte"])
@pytest.mark.parametrize("scale", [4.0, 12.0])
def test_masked_pytorch_render_is_the_whole_one_where_wanted(official_files, butterfly, arch, scale, monkeypatch):
    """Under a mask (CMSR's levels) the PyTorch renderer decodes only the pairs of latents with a slot on
    a wanted pixel, in batches of pairs: the wanted pixels are the whole window's, bit for bit, whatever
    the batch size (rows per latent at x4, per latent and role at x12)."""
    from lmf_cli.engine.render import encode_image, render_region
    from lmf_cli.models import base

    monkeypatch.setenv("LMF_NATIVE", "0")
    model = Upscaler.load(official_files[arch], EngineOptions("cpu")).model
    inp = torch.from_numpy(butterfly).permute(2, 0, 1)[None].float() / 127.5 - 1
    out_hw = (round(inp.shape[2] * scale), round(inp.shape[3] * scale))
    rows, cols = (5, out_hw[0] - 3), (2, out_hw[1] - 7)
    with torch.inference_mode():
        g = encode_image(model, inp, out_hw)
        whole = render_region(model, g, out_hw, rows, cols)
        blocks = torch.rand(80, 80, generator=torch.Generator().manual_seed(1)) < 0.3
        mask = blocks.repeat_interleave(7, 0).repeat_interleave(9, 1)[:rows[1] - rows[0], :cols[1] - cols[0]]
        for chunk in (base.PAIR_CHUNK_SLOTS, 300):
            monkeypatch.setattr(base, "PAIR_CHUNK_SLOTS", chunk)
            part = render_region(model, g, out_hw, rows, cols, mask=mask)
            assert torch.equal(part[0][:, mask], whole[0][:, mask])
