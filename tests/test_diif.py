"""DIIF: against an independent float64 computation of its formulas, tiling, the training path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmf_cli import EngineOptions, Upscaler, models
from lmf_cli.engine import upscale_tensor
from lmf_cli.models.diif import DIIF, sample_cells
from lmf_cli.models.geometry import axis_cells, make_coord
from tests.conftest import DATA, SMALL_EDSR, official_checkpoint
from tests.reference import diif_predict

# x3 and x3.5 put output centres exactly on LR pixel borders; x2.5/x1.5 has per-axis cells of 2-3 / 1-2 pixels
SIZES = {"x2": (2, 2), "x3": (3, 3), "x3.5": (3.5, 3.5), "x8": (8, 8), "x2.5/x1.5": (2.5, 1.5)}


def _checkpoint(tmp_path, **args) -> tuple[object, dict]:
    ckpt = official_checkpoint("diif", SMALL_EDSR)
    ckpt["model"]["args"].update(args)
    sd, feat = ckpt["model"]["sd"], SMALL_EDSR["args"]["n_feats"]
    gen = torch.Generator().manual_seed(1)
    if not args.get("local_ensemble", True):  # the head reads the 3x3 unfolded feature
        sd["imnet.layers.0.weight"] = torch.randn(32, feat * 9 + 6, generator=gen) / (feat * 9 + 6) ** 0.5
    if args.get("fine_cell_decode"):  # the tail reads the cell too
        sd["imnet.tail.0.weight"] = torch.randn(32, 36, generator=gen) / 6
    path = tmp_path / "diif.pth"
    torch.save(ckpt, path)
    return path, ckpt["model"]


def _lr_tensor(lr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(lr).permute(2, 0, 1)[None].double() / 255


@pytest.mark.parametrize("scale", list(SIZES))
def test_matches_formulas(tmp_path, butterfly, scale):
    path, block = _checkpoint(tmp_path)
    up = Upscaler.load(path, EngineOptions("cpu"))
    lr = butterfly[:12, :14]
    sy, sx = SIZES[scale]
    out_hw = (round(12 * sy), round(14 * sx))
    ours = up.upscale(lr.astype(np.float32) / 255, size=out_hw)
    ref = diif_predict(block["sd"], block["args"], _lr_tensor(lr), out_hw).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("variant", [
    {"single_slice": True},
    {"local_ensemble": False, "fine_cell_decode": True, "bilinear_skip": True},
    {"local_ensemble": False, "single_slice": True, "fixed_area": False},
])
@pytest.mark.parametrize("scale", ["x3.5", "x2.5/x1.5"])
def test_variants_match_formulas(tmp_path, butterfly, variant, scale):
    path, block = _checkpoint(tmp_path, **variant)
    up = Upscaler.load(path, EngineOptions("cpu"))
    lr = butterfly[:12, :14]
    sy, sx = SIZES[scale]
    out_hw = (round(12 * sy), round(14 * sx))
    ours = up.upscale(lr.astype(np.float32) / 255, size=out_hw)
    ref = diif_predict(block["sd"], block["args"], _lr_tensor(lr), out_hw).numpy()
    assert np.abs(ours - ref).max() < 1e-4


def test_above_x4_the_cell_is_clipped(tmp_path, butterfly):
    """x12 (the cell is 2/4, not 2/12) and a per-axis x5 / x1.2."""
    path, block = _checkpoint(tmp_path)
    up = Upscaler.load(path, EngineOptions("cpu"))
    lr = butterfly[:6, :10]
    for out_hw in ((72, 120), (30, 12)):
        ours = up.upscale(lr.astype(np.float32) / 255, size=out_hw)
        ref = diif_predict(block["sd"], block["args"], _lr_tensor(lr), out_hw).numpy()
        assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("single_slice", [False, True])
def test_window_rendering_equals_point_queries(tmp_path, single_slice):
    """The engine's sliced renderer, whole-grid training render, sampled cells and the
    per-point path agree."""
    path, _ = _checkpoint(tmp_path, single_slice=single_slice)
    model = Upscaler.load(path, EngineOptions("cpu")).model
    torch.manual_seed(0)
    inp = torch.rand(1, 3, 9, 11) * 2 - 1
    for big_h, big_w in ((25, 20), (27, 33), (40, 17)):
        grid = upscale_tensor(model, inp, (big_h, big_w)) * 2 - 1
        coord = make_coord(big_h, big_w)[None]
        cell = torch.tensor([2 / big_h, 2 / big_w]).expand(1, big_h * big_w, 2)
        with torch.no_grad():
            points = model(inp, coord, cell).view(1, big_h, big_w, 3).permute(0, 3, 1, 2)
            latents = model.encode(inp, None)
            whole = model.render_grid(inp, latents, (big_h, big_w))
            cells = model.decode_cells(inp, latents, (big_h, big_w), sample_cells((9, 11), 30))
        assert torch.allclose(grid, points, atol=2e-5)
        assert torch.allclose(grid, whole, atol=2e-6)
        assert bool(cells.valid.any())
        assert torch.allclose(cells.pred[cells.valid], cells.targets(grid)[cells.valid], atol=2e-6)


def test_decode_slots_holds_every_pixel(tmp_path):
    """decode_slots (every slot of a window's cells) and render (the window's pixels) agree."""
    from lmf_cli.engine import encode_image
    from lmf_cli.models.base import RenderWindow
    from lmf_cli.sizes import rel_cell_for

    path, _ = _checkpoint(tmp_path)
    model = Upscaler.load(path, EngineOptions("cpu")).model
    inp = torch.rand(1, 3, 7, 8) * 2 - 1
    out_hw = (19, 23)
    g = encode_image(model, inp, out_hw)
    rows, cols = axis_cells(19, 7, 3, 17), axis_cells(23, 8, 5, 20)
    window = RenderWindow(rows, cols, None, None, inp.new_tensor([rel_cell_for((7, 8), out_hw)]))
    with torch.no_grad():
        slots = model.decode_slots(g.latents, window)
        image = model.render(inp, g.latents, window)
    picked = slots[0, rows.lat_of[:, None], cols.lat_of[None, :], rows.k_of[:, None], cols.k_of[None, :]]
    assert torch.allclose(picked.permute(2, 0, 1), image[0], atol=1e-6)


@pytest.mark.parametrize("image_slice,scale,single_slice", [
    ((slice(None), slice(None)), 3.7, False),
    ((slice(None), slice(None)), (2.5, 1.5), False),
    ((slice(0, 20), slice(0, 24)), 6.0, False),
    ((slice(0, 20), slice(0, 24)), (4.5, 2.3), True),
])
def test_tiled_equals_untiled(tmp_path, butterfly, image_slice, scale, single_slice):
    path, _ = _checkpoint(tmp_path, single_slice=single_slice)
    up = Upscaler.load(path, EngineOptions("cpu"))
    lr = butterfly[image_slice].astype(np.float32) / 255
    tiled = up.upscale(lr, scale=scale, options=EngineOptions(tile=16))
    whole = up.upscale(lr, scale=scale, options=EngineOptions(tile=10_000))
    assert tiled.shape == whole.shape
    assert np.abs(tiled - whole).max() < 1e-4


def test_chunk_size_changes_nothing(tmp_path, butterfly):
    path, _ = _checkpoint(tmp_path, single_slice=False)
    model = Upscaler.load(path, EngineOptions("cpu")).model
    inp = torch.from_numpy(butterfly[:24, :30]).permute(2, 0, 1)[None].float() / 127.5 - 1
    outs = [upscale_tensor(model, inp, (61, 83), EngineOptions(max_memory=m)) for m in (1 << 30, 1 << 21, 1 << 19)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_cells_partition_every_axis():
    """Each output pixel is in exactly one cell, the one holding its centre; borders are global."""
    for n_out, n_in in ((30, 12), (21, 14), (42, 12), (96, 12), (13, 13), (100, 7)):
        whole = axis_cells(n_out, n_in, 0, n_out)
        assert torch.equal(whole.index[whole.valid], torch.arange(n_out))
        centre = (2 * torch.arange(n_out) + 1) / (2 * n_out) * n_in  # LR units, exact in float64 here
        assert torch.equal(whole.lat_of, centre.floor().long().clamp(max=n_in - 1))
        assert bool((whole.rel[whole.valid] >= -1).all() and (whole.rel[whole.valid] < 1).all())
        part = axis_cells(n_out, n_in, n_out // 3, n_out - 2, lat_start=1)
        lats = torch.arange(part.n_latents) + part.lat0 + 1
        assert torch.equal(part.first, whole.first[lats]) and torch.equal(part.last, whole.last[lats])
        assert torch.equal(part.rel, whole.rel[lats])


def test_cost_model_matches_the_expected_costs():
    """Head and tail of 256 (the authors' widths): ~0.40 / 0.27 / 0.20 MMAC per output pixel
    at x2 / x4 / x8 slicing by rows; LIIF's decoder is 1.38."""
    rows = models.make(models.diif_spec())
    cells = models.make(models.diif_spec(single_slice=True))
    per_pixel = {s: rows.decoder_macs((60, 60), (60 * s, 60 * s)) / (60 * s) ** 2 / 1e6 for s in (2, 4, 8)}
    assert [round(per_pixel[s], 2) for s in (2, 4, 8)] == [0.40, 0.27, 0.20]
    single = {s: cells.decoder_macs((60, 60), (60 * s, 60 * s)) / (60 * s) ** 2 / 1e6 for s in (2, 4, 8)}
    assert [round(single[s], 3) for s in (2, 4, 8)] == [0.266, 0.167, 0.142]
    assert rows.decoder_macs((60, 60), (240, 240), as_implemented=True) < rows.decoder_macs((60, 60), (240, 240))


def test_spec_builds_and_round_trips(tmp_path):
    from lmf_cli.models.checkpoints import load_weights, save_weights

    spec = models.diif_spec(models.edsr_spec(2, 16), head_hidden=[32, 32], tail_hidden=[16])
    model = models.make(spec)
    assert isinstance(model, DIIF) and not model.single_slice
    save_weights(tmp_path / "d.safetensors", model, spec)
    loaded = load_weights(tmp_path / "d.safetensors")
    assert loaded.architecture == "diif"
    inp = torch.rand(1, 3, 8, 9) * 2 - 1
    a = upscale_tensor(model.eval(), inp, (20, 31))
    b = upscale_tensor(loaded.model, inp, (20, 31))
    assert torch.equal(a, b)
    official = official_checkpoint("diif", models.edsr_spec(16, 64))
    built = models.make({"name": "diif", "args": official["model"]["args"]})
    assert set(built.state_dict()) == set(official["model"]["sd"])
    assert set(models.make(models.diif_spec()).state_dict()) == set(official["model"]["sd"])


def test_tiny_training_run_loss_falls():
    """A few dozen Adam steps on sampled whole cells of a real photo crop."""
    from PIL import Image

    torch.manual_seed(0)
    with Image.open(DATA / "Set5" / "HR" / "butterfly.png") as img:
        hr_img = img.convert("RGB").crop((72, 72, 120, 120))  # 48 x 48
        lr_img = hr_img.resize((16, 16), Image.BICUBIC)
    hr = torch.from_numpy(np.array(hr_img)).permute(2, 0, 1)[None].float().contiguous() / 127.5 - 1
    lr = torch.from_numpy(np.array(lr_img)).permute(2, 0, 1)[None].float().contiguous() / 127.5 - 1
    model = models.make(models.diif_spec(models.edsr_spec(2, 16), head_hidden=[64, 64], tail_hidden=[64, 64]))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add synchronisation (badly so on a busy CPU)
    try:
        for _ in range(40):
            latents = model.encode(lr, None)
            batch = model.decode_cells(lr, latents, (48, 48), sample_cells((16, 16), 32, generator=gen))
            loss = batch.l1(hr)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    with torch.no_grad():  # the whole-patch path (the authors' training) trains the same function
        whole = model.render_grid(lr, model.encode(lr, None), (48, 48))
    assert (whole - hr).abs().mean().item() < 0.6 * np.mean(losses[:5])
