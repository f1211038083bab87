"""CMSR: the coverage rule, its equivalence limits, tiling, and calibration."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lmf_cli import EngineOptions, InputError, Upscaler
from lmf_cli.engine import encode_image, render_region
from lmf_cli.engine.cmsr import (
    BLOCK,
    MAX_COARSE_SHARE,
    TORCH_MIN_SCALE,
    Schedule,
    _runs,
    block_strength,
    coarse_share,
    pays,
    resolve_threshold,
    schedule_for,
)
from lmf_cli.models.checkpoints import LoadedModel, load_weights
from lmf_cli.models.geometry import axis_bilinear, bilinear_grid, bilinear_rows_last
from lmf_cli.training.calibrate import calibrate, merge_tables
from tests.conftest import official_checkpoint

DEEP = {"name": "edsr-baseline", "args": {"n_resblocks": 16, "n_feats": 8, "no_upsampling": True}}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("cmsr") / "lm.pth"
    torch.save(official_checkpoint("lmliif", DEEP, seed=5), path)
    return load_weights(path)


@pytest.fixture
def kernel():
    from lmf_cli.engine import native

    if native._library(16) is None:
        pytest.skip("no C compiler: CMSR needs the render kernel")


def _with_tables(loaded: LoadedModel, tables) -> Upscaler:
    return Upscaler(LoadedModel(loaded.model, loaded.spec, loaded.source, {}, tables), EngineOptions("cpu"))


def _median_intensity(loaded, image, scale):
    """The median block intensity: about half the blocks are calm at this threshold."""
    inp = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    out_hw = (round(image.shape[0] * scale), round(image.shape[1] * scale))
    with torch.inference_mode():
        strength = loaded.model.modulation_intensity(encode_image(loaded.model, inp, out_hw).latents)[0]
    return float(block_strength(strength)[::BLOCK, ::BLOCK].median())


def test_zero_thresholds_render_everything_in_full(lm, butterfly, render_path):
    up = _with_tables(lm, {"2e-05": {"8": {"1": 0.0, "2": 0.0, "4": 0.0}}})
    full = up.upscale(butterfly, scale=8)
    with_cmsr = up.upscale(butterfly, scale=8, options=EngineOptions(cmsr="balanced"))
    assert up.last_stats["rendered"] == up.last_stats["total"]
    assert np.array_equal(full, with_cmsr)


def test_coverage_rule_follows_block_intensity(lm, butterfly, render_path):
    """Blocks of BLOCK x BLOCK LR pixels whose largest intensity is at or below the threshold
    are drawn at decode scale 2, the rest in full: every output pixel of a block alike."""
    image = butterfly.copy()
    image[:, :24] = 128  # a flat half: calm latents, as sky or a wall would be
    inp = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        strength = lm.model.modulation_intensity(encode_image(lm.model, inp, (320, 384)).latents)[0]
    blocks = block_strength(strength)
    threshold = float(blocks[:, 8:16].max()) + 1e-6
    busy_lr = (blocks > threshold).numpy()
    assert 0.2 < busy_lr.mean() < 0.8
    # levels are per block: no block is partly calm, though some of its own pixels are calm
    assert all(len(np.unique(busy_lr[r:r + BLOCK, c:c + BLOCK])) == 1 for r in range(0, 40, BLOCK)
               for c in range(0, 48, BLOCK))
    assert (strength.numpy()[busy_lr] <= threshold).any()
    up = _with_tables(lm, {"2e-05": {"8": {"2": threshold}}})
    out = up.upscale(image, scale=8, options=EngineOptions(cmsr="balanced"))
    stats = up.last_stats
    busy = busy_lr.mean()
    assert busy * stats["total"] <= stats["rendered"] <= (busy + 0.1) * stats["total"]
    full = up.upscale(image, scale=8)
    owner_busy = busy_lr.repeat(8, 0).repeat(8, 1)
    assert np.array_equal(out[owner_busy], full[owner_busy])  # busy pixels are exactly the full render
    assert not np.array_equal(out[~owner_busy], full[~owner_busy])


def test_channels_last_blend_equals_the_planar_one():
    """The PyTorch renderer fills coarse levels channels last, columns first: the same bilinear
    samples as bilinear_grid (rows first, planar) up to float rounding, borders included."""
    coarse = torch.rand(1, 3, 13, 17, dtype=torch.float64)
    rows, cols = axis_bilinear(61, 13, 3, 58), axis_bilinear(80, 17, 0, 80)
    planar = bilinear_grid(coarse, rows, cols)[0].permute(1, 2, 0)
    last = bilinear_rows_last(coarse[0].permute(1, 2, 0), rows, cols)
    assert last.shape == planar.shape == (55, 80, 3)
    assert torch.allclose(last, planar, rtol=0, atol=1e-12)


def test_block_strength_is_the_block_max_on_the_global_grid():
    strength = torch.rand(13, 19)
    blocks = block_strength(strength)
    for r in range(13):
        for c in range(19):
            r0, c0 = r // BLOCK * BLOCK, c // BLOCK * BLOCK
            assert blocks[r, c] == strength[r0:r0 + BLOCK, c0:c0 + BLOCK].max()


@pytest.mark.parametrize("chunk", [1, 700, 1 << 18])
def test_intensity_is_the_mean_absolute_shift_whatever_the_chunk(lm, butterfly, monkeypatch, chunk):
    """Made a few rows at a time (cache-sized temporaries), the same values as in one pass: with one
    row a chunk, a partial last chunk (700 floats: 2 of 13 rows at a time) and the whole table."""
    from lmf_cli.models import lmf as lmf_module

    monkeypatch.setattr(lmf_module, "INTENSITY_CHUNK", chunk)
    imnet = lm.model.imnet
    n, d = imnet.hidden_depth, imnet.hidden_dim
    inp = torch.from_numpy(butterfly[:13, :3]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        latents = encode_image(lm.model, inp, (104, 24)).latents
        assert latents["mod"].shape[1:3] == (13, 3)
        expected = latents["mod"][..., n * d:2 * n * d].abs().mean(-1)
        assert torch.equal(lm.model.modulation_intensity(latents), expected)


@pytest.mark.parametrize("tile", [13, 16])
def test_block_levels_do_not_depend_on_tiles(lm, butterfly, render_path, tile):
    """A tile whose core is not aligned to the block grid (13) reads its blocks' intensities
    beyond its own latents; the levels, and so the pixels, are the untiled ones."""
    median = _median_intensity(lm, butterfly, 8)
    up = _with_tables(lm, {"2e-05": {"8": {"1": median / 2, "2": median}}})
    whole = up.upscale(butterfly.astype(np.float32) / 255, scale=8, options=EngineOptions(cmsr="balanced", tile=1000))
    drawn = up.last_stats["rendered"] / up.last_stats["total"]
    tiled = up.upscale(butterfly.astype(np.float32) / 255, scale=8, options=EngineOptions(cmsr="balanced", tile=tile))
    assert 0.2 < drawn < 0.9
    assert up.last_stats["rendered"] / up.last_stats["total"] >= drawn  # tiles add coarse rings, never fewer pixels
    assert np.abs(whole - tiled).max() < 1e-4


def test_levels_that_cannot_pay_are_not_used():
    """A coarse level whose pixels (and the ring the upsample reads) nearly fill its blocks
    costs more than it saves: the schedule leaves it out, and without any level CMSR is off."""
    tables = {"2e-05": {"6": {"2": 0.1, "4": 0.2}}}
    assert coarse_share(4.0, 5.0) > MAX_COARSE_SHARE >= coarse_share(4.0, 6.0)
    assert schedule_for(tables, "2e-05", 6.0) == Schedule((2.0, 4.0), (0.1, 0.2))
    assert schedule_for(tables, "2e-05", 5.0) == Schedule((2.0,), (0.1,))
    assert schedule_for({"2e-05": {"6": {"4": 0.2}}}, "2e-05", 5.0) is None
    assert schedule_for({"2e-05": {"8": {"2": 0.0, "4": 0.0}}}, "2e-05", 8.0) is None


def test_everything_calm_renders_coarse_only(lm, butterfly, render_path):
    up = _with_tables(lm, {"2e-05": {"8": {"2": 1e9}}})
    out = up.upscale(butterfly, scale=8, options=EngineOptions(cmsr="balanced"))
    assert up.last_stats["rendered"] < 0.1 * up.last_stats["total"]
    # expected: latents for the x8 target, an x2 grid rendered with its own cell, then bilinear
    inp = torch.from_numpy(butterfly).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        g = encode_image(lm.model, inp, (320, 384))
        coarse = render_region(lm.model, g, (80, 96), (0, 80), (0, 96))
        expected = bilinear_grid(coarse, axis_bilinear(320, 80, 0, 320), axis_bilinear(384, 96, 0, 384))
    expected = np.round(((expected[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy() * 255)
    assert np.abs(out.astype(np.float32) - expected).max() <= 1


def test_cmsr_with_tiles_equals_untiled(lm, butterfly, render_path):
    median = _median_intensity(lm, butterfly, 9)
    up = _with_tables(lm, {"2e-05": {"12": {"1": median / 2, "3": median}}})
    whole = up.upscale(butterfly.astype(np.float32) / 255, scale=9, options=EngineOptions(cmsr="balanced", tile=1000))
    assert up.last_stats["rendered"] < 0.8 * up.last_stats["total"]
    tiled = up.upscale(butterfly.astype(np.float32) / 255, scale=9, options=EngineOptions(cmsr="balanced", tile=16))
    assert np.abs(whole - tiled).max() < 1e-4


@pytest.mark.parametrize("region_blocks", [1, 2])
def test_cmsr_regions_change_no_pixel(lm, butterfly, render_path, monkeypatch, region_blocks):
    """Levels, coarse grids and taps are global: how many render blocks one CMSR region spans (its
    bookkeeping, done once per region) changes which calls draw a pixel, not its value."""
    from lmf_cli.engine import tiling

    median = _median_intensity(lm, butterfly, 9)
    up = _with_tables(lm, {"2e-05": {"12": {"1": median / 2, "3": median}}})
    image = butterfly.astype(np.float32) / 255
    options = EngineOptions(cmsr="balanced", tile=1000)
    monkeypatch.setattr(tiling, "render_block", lambda *_args: (40, 56))  # several blocks a side
    reference = up.upscale(image, scale=9, options=options)
    drawn = up.last_stats["rendered"]
    monkeypatch.setattr(tiling, "KERNEL_REGION_BLOCKS", region_blocks)
    monkeypatch.setattr(tiling, "REGION_BLOCKS", region_blocks)
    monkeypatch.setattr(tiling, "REGION_MIN_LR", 0)  # PyTorch's regions by REGION_BLOCKS alone, not by the scale
    out = up.upscale(image, scale=9, options=options)
    assert np.array_equal(out, reference)
    assert up.last_stats["rendered"] < 0.8 * up.last_stats["total"] and drawn < 0.8 * up.last_stats["total"]


def test_pytorch_renders_exactly_where_cmsr_would_not_pay(lm, butterfly, kernel, monkeypatch):
    """Below TORCH_MIN_SCALE the PyTorch renderer's CMSR costs more than it saves on photos: it
    renders exactly there, while the kernel still draws the coarse levels."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert pays(6.0, True, cpu) and not pays(6.0, False, cpu) and pays(TORCH_MIN_SCALE, False, cpu)
    assert not pays(30.0, False, gpu)  # on a GPU the exact render is faster than CMSR's bookkeeping
    up = _with_tables(lm, {"2e-05": {"6": {"2": 1e9}}})
    balanced = EngineOptions(cmsr="balanced")
    up.upscale(butterfly, scale=6, options=balanced)
    assert up.last_stats["rendered"] < 0.5 * up.last_stats["total"]
    monkeypatch.setenv("LMF_NATIVE", "0")
    out = up.upscale(butterfly, scale=6, options=balanced)
    assert up.last_stats["rendered"] == up.last_stats["total"]
    assert np.array_equal(out, up.upscale(butterfly, scale=6))


def test_pytorch_cmsr_equals_the_kernel_and_draws_only_its_share(lm, butterfly, kernel, monkeypatch):
    """Without the compiled kernel (GPUs, no compiler), CMSR decodes only the latents that own
    drawn pixels: the same pixels as the kernel's CMSR, and no warning any more."""
    image = butterfly.copy()
    image[:, :24] = 128
    median = _median_intensity(lm, image, 8)
    up = _with_tables(lm, {"2e-05": {"8": {"1": median / 3, "2": median}}})
    fast = up.upscale(image.astype(np.float32) / 255, scale=8, options=EngineOptions(cmsr="balanced", tile=16))
    kernel_drawn = up.last_stats["rendered"] / up.last_stats["total"]
    monkeypatch.setenv("LMF_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slow = up.upscale(image.astype(np.float32) / 255, scale=8, options=EngineOptions(cmsr="balanced", tile=16))
    torch_drawn = up.last_stats["rendered"] / up.last_stats["total"]
    assert np.abs(fast - slow).max() < 1e-5
    assert torch_drawn < 0.8 and abs(torch_drawn - kernel_drawn) < 0.05


def test_not_applied_within_training_range(lm, butterfly):
    up = _with_tables(lm, {"2e-05": {"8": {"2": 1e9}}})
    balanced = up.upscale(butterfly, scale=3, options=EngineOptions(cmsr="balanced"))
    assert np.array_equal(balanced, up.upscale(butterfly, scale=3))


def test_table_choice_and_levels():
    tables = {"2e-05": {"6": {"1": 0.1, "2": 0.2}, "12": {"1": 0.1, "4": 0.3, "8": 0.5}}}
    assert schedule_for(tables, "2e-05", 5.0) == Schedule((1.0, 2.0), (0.1, 0.2))
    assert schedule_for(tables, "2e-05", 8.0) == Schedule((1.0, 4.0), (0.1, 0.3))
    assert schedule_for(tables, "2e-05", 30.0).decode_scales == (1.0, 4.0, 8.0)
    assert schedule_for(tables, "2e-05", 4.0) is None
    levels = Schedule((1.0, 4.0), (0.1, 0.3)).levels(torch.tensor([0.05, 0.1, 0.2, 0.31]))
    assert levels.tolist() == [0, 0, 1, 2]


def test_threshold_resolution():
    tables = {"2e-05": {}, "0.0001": {}}
    assert resolve_threshold(tables, "balanced") == "2e-05"
    assert resolve_threshold(tables, "fast") == "0.0001"
    assert resolve_threshold(tables, "exact") is None
    assert resolve_threshold(tables, 2e-5) == "2e-05"
    with pytest.raises(InputError):
        resolve_threshold(tables, "fine")
    with pytest.raises(InputError):
        resolve_threshold(None, "balanced")


def test_merge_is_cautious_and_monotone():
    merged = merge_tables([{1.0: 0.3, 2.0: 0.2, 4.0: 0.5}, {1.0: 0.1, 2.0: 0.4, 4.0: 0.6}])
    assert merged == {"1": 0.1, "2": 0.2, "4": 0.5}


def test_calibration_builds_monotone_tables(lm, butterfly):
    tables = calibrate(lm.model, [butterfly], threshold=1e-3, targets=(6.0, 8.0))
    assert set(tables) == {"6", "8"}
    for table in tables.values():
        values = [table[k] for k in sorted(table, key=float)]
        assert values == sorted(values) and all(0 <= v <= 1 for v in values)
    assert set(tables["8"]) == {"1", "1.5", "2", "3", "4", "6"}


def test_calibrate_command_stores_tables(lm, tmp_path, butterfly):
    from PIL import Image
    from typer.testing import CliRunner

    from lmf_cli.cli import app
    from lmf_cli.models.checkpoints import save_weights

    weights = tmp_path / "m.safetensors"
    save_weights(weights, lm.model, lm.spec, {"steps": 1})
    folder = tmp_path / "hr"
    folder.mkdir()
    Image.fromarray(np.kron(butterfly, np.ones((2, 2, 1), np.uint8))).save(folder / "a.png")
    result = CliRunner().invoke(app, ["calibrate", str(weights), "--data", str(folder), "--images", "1",
                                      "--targets", "6,8", "--threshold", "0.001", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    tables = load_weights(weights).cmsr_tables
    assert set(tables) == {"0.001"} and set(tables["0.001"]) == {"6", "8"}
    up = Upscaler.load(weights, EngineOptions("cpu"))
    out = up.upscale(butterfly, scale=8, options=EngineOptions(cmsr=1e-3))
    assert out.shape == (320, 384, 3)


def test_benchmark_says_where_cmsr_renders_exactly(lm, butterfly):
    from lmf_cli.evaluation.benchmark import benchmark_scale

    inp = torch.from_numpy(butterfly).permute(2, 0, 1)[None].float() / 127.5 - 1
    tables = {"2e-05": {"6": {"4": 1e9}}}
    exact, paying = benchmark_scale(("exact", "cmsr"), lm.model, [inp], 6.0, 1, 0, tables, "2e-05")
    assert exact.rendered_fraction == 1.0 and paying.rendered_fraction < 0.6
    assert "rendered exactly" not in paying.note
    assert f"for {paying.rendered_fraction:.0%} drawn" in paying.note and "per pixel drawn" in paying.note
    _, exact = benchmark_scale(("exact", "cmsr"), lm.model, [inp], 5.0, 1, 0, tables, "2e-05")
    assert exact.rendered_fraction == 1.0 and "no coarse level pays" in exact.note
    assert "per pixel drawn" not in exact.note
    for scale, given in ((3.0, tables), (6.0, None)):  # x4 and below; a model without tables
        assert [r.method for r in benchmark_scale(("exact", "cmsr"), lm.model, [inp], scale, 1, 0, given,
                                                  "2e-05")] == ["exact"]


def test_benchmark_times_exact_and_cmsr_in_turns(lm, butterfly, monkeypatch):
    """Each input's exact run, then its CMSR run, then the next input: a slow spell of the machine
    falls on both rows, not on one row's runs."""
    from lmf_cli.evaluation import benchmark

    inputs = [torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
              for img in (butterfly, butterfly[::-1].copy())]
    order = []
    real = benchmark.upscale_tensor

    def logged(model, inp, out_hw, options, schedule, **kwargs):
        order.append((0 if inp is inputs[0] else 1, schedule is not None))
        return real(model, inp, out_hw, options, schedule, **kwargs)

    monkeypatch.setattr(benchmark, "upscale_tensor", logged)
    exact, cmsr = benchmark.benchmark_scale(("exact", "cmsr"), lm.model, inputs, 6.0, 3, 1,
                                            {"2e-05": {"6": {"4": 1e9}}}, "2e-05")
    timed = order[4:]  # after one warm-up round: both inputs under both
    assert order[:4] == [(0, False), (0, True), (1, False), (1, True)]
    assert timed == [(0, False), (0, True), (1, False), (1, True), (0, False), (0, True)]
    assert len(exact.render_runs) == len(cmsr.render_runs) == 3 and exact.drawn_runs == [1.0] * 3
    assert all(share < 0.6 for share in cmsr.drawn_runs)  # its own runs' shares, not the exact ones'


def _timed_row(render: list[float], drawn: list[float], inputs: int):
    """A benchmark row with these timed renders and drawn shares, its runs cycling over `inputs` inputs."""
    from lmf_cli.evaluation.benchmark import Row, Timing

    timing = Timing.of(render)
    return Row("r", 8.0, timing, timing, timing, timing, {}, 1.0, 0.0, render_runs=render, drawn_runs=drawn,
               inputs=inputs)


def test_cmsr_against_exact_pairs_runs_by_input():
    """Two inputs drawing 20% and 60%, the busier one timed three times: CMSR that costs exactly what
    it draws reads 1.00 per pixel drawn. The medians would not say so: the median CMSR run is the
    busier input's, and over the mean share times the median exact run it reads 1.20."""
    from lmf_cli.evaluation.benchmark import _against_exact

    exact = _timed_row([0.100, 0.100, 0.100, 0.100], [1.0] * 4, 4)
    cmsr = _timed_row([0.020, 0.060, 0.060, 0.060], [0.2, 0.6, 0.6, 0.6], 4)
    assert _against_exact(cmsr, exact) == "render 0.50x exact's for 50% drawn: 1.00x per pixel drawn"
    assert round(cmsr.render.median_s / (0.5 * exact.render.median_s), 2) == 1.2  # the biased reading


def test_cmsr_against_exact_takes_each_inputs_median_run():
    """Two inputs timed three times each, in turns; one CMSR run caught a slow spell of the machine
    (0.5 s where the input's other runs took 0.02): each input's median run leaves it out. Summed over
    all runs it would have read 3.0x per pixel drawn."""
    from lmf_cli.evaluation.benchmark import _against_exact

    exact = _timed_row([0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [1.0] * 6, 2)
    cmsr = _timed_row([0.02, 0.06, 0.5, 0.06, 0.02, 0.06], [0.2, 0.6] * 3, 2)
    assert _against_exact(cmsr, exact) == "render 0.40x exact's for 40% drawn: 1.00x per pixel drawn"
    assert round(sum(cmsr.render_runs) / (0.4 * sum(exact.render_runs)), 1) == 3.0
    lone = _timed_row([0.02, 0.06], [0.2, 0.6], 2)  # fewer runs than inputs: each run its input's only one
    assert _against_exact(lone, _timed_row([0.1, 0.1], [1.0, 1.0], 2)) == _against_exact(cmsr, exact)


def test_benchmark_says_where_the_pytorch_renderer_renders_exactly(lm, butterfly, monkeypatch):
    from lmf_cli.evaluation.benchmark import benchmark_scale

    monkeypatch.setenv("LMF_NATIVE", "0")
    inp = torch.from_numpy(butterfly).permute(2, 0, 1)[None].float() / 127.5 - 1
    tables = {"2e-05": {"6": {"4": 1e9}, "8": {"4": 1e9}}}
    _, exact = benchmark_scale(("exact", "cmsr"), lm.model, [inp], 6.0, 1, 0, tables, "2e-05")
    assert exact.rendered_fraction == 1.0 and "PyTorch renderer below x8" in exact.note
    _, cmsr = benchmark_scale(("exact", "cmsr"), lm.model, [inp], 8.0, 1, 0, tables, "2e-05")
    assert cmsr.rendered_fraction < 0.6


def test_rectangles_of_one_level_grow_down_through_bands():
    # LR levels: the left column stays at level 0 through three bands, the right changes
    window = torch.tensor([[0, 1], [0, 2], [0, 1]])
    own = torch.arange(2).repeat_interleave(4)  # 4 output pixels per LR pixel
    own_r = torch.arange(3).repeat_interleave(4)
    rects = _runs(window, own_r, own)
    assert rects[0].tolist() == [[0, 12, 0, 4]]
    assert rects[1].tolist() == [[0, 4, 4, 8], [8, 12, 4, 8]]
    assert rects[2].tolist() == [[4, 8, 4, 8]]
