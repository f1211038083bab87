"""Streamed tiles: the encoder runs once down the image in row chunks, so tiles recompute no margin,
and the result is the whole-image result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmf_cli import EngineOptions, Upscaler
from lmf_cli.engine import upscale_tensor
from lmf_cli.engine.budget import stream_plan
from lmf_cli.models.base import FeatureRows
from lmf_cli.models.encoders import EDSR, RDN
from lmf_cli.models.rows import RowConv
from tests.conftest import official_checkpoint

DEEP_EDSR = {"name": "edsr-baseline", "args": {"n_resblocks": 16, "n_feats": 8, "no_upsampling": True}}


def _encoders() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [EDSR(4, 16, res_scale=0.5).eval(), RDN(G0=16, D=3, C=2, G=8).eval()]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 57])
def test_streamed_features_equal_the_whole_image_forward(chunk, channels_last):
    x = torch.randn(2, 3, 57, 41)
    for encoder in _encoders():
        layout = torch.channels_last if channels_last else torch.contiguous_format
        encoder.to(memory_format=layout)
        rows = x.contiguous(memory_format=layout)
        with torch.inference_mode():
            whole = encoder(rows)
            stream = encoder.rows(57)
            parts = [stream.push(rows[:, :, i:i + chunk]) for i in range(0, 57, chunk)]
        streamed = torch.cat(parts, 2)
        assert streamed.shape == whole.shape
        torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)


def test_every_layer_computes_every_row_once(monkeypatch):
    """The point of streaming: each convolution sees each input row once and makes each output row once
    (a tile with a margin computes the margin's rows again in every tile)."""
    made: dict[int, int] = {}
    push = RowConv.push

    def counted(self: RowConv, rows: torch.Tensor) -> torch.Tensor:
        out = push(self, rows)
        made[id(self)] = made.get(id(self), 0) + out.shape[2]
        return out

    monkeypatch.setattr(RowConv, "push", counted)
    for encoder in _encoders():
        made.clear()
        with torch.inference_mode():
            stream = encoder.rows(40)
            for i in range(0, 40, 6):
                stream.push(torch.randn(1, 3, 6, 30)[:, :, :min(6, 40 - i)])
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in encoder.modules()) - 2  # EDSR's unused mean shifts
        assert len(made) == (convs if isinstance(encoder, EDSR) else convs + 2)
        assert set(made.values()) == {40}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deep")
    torch.save(official_checkpoint("lmliif", DEEP_EDSR, seed=3), folder / "lmliif.pth")
    return Upscaler.load(folder / "lmliif.pth", EngineOptions("cpu", "fp32"))


def _as_input(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float().div(127.5).sub(1)


@pytest.mark.parametrize("tile", [8, 16, 23])
def test_streamed_tiles_equal_margin_tiles_and_the_whole_image(deep, butterfly, tile):
    model, inp = deep.model, _as_input(butterfly)
    out_hw = (97, 113)
    whole = upscale_tensor(model, inp, out_hw, EngineOptions(tile=10_000))
    streamed = upscale_tensor(model, inp, out_hw, EngineOptions(tile=tile))
    margins = upscale_tensor(model, inp, out_hw, EngineOptions(tile=tile), cores=[(0, 40, 0, 48)])
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(margins, whole, rtol=0, atol=1e-5)


def test_streaming_pushes_the_input_once(deep, butterfly, monkeypatch):
    pushed = []
    push = FeatureRows.push

    def seen(self: FeatureRows, rows: torch.Tensor) -> torch.Tensor:
        pushed.append(rows.shape[2])
        return push(self, rows)

    monkeypatch.setattr(FeatureRows, "push", seen)
    deep.upscale(butterfly, scale=2, options=EngineOptions(tile=16))
    assert sum(pushed) == butterfly.shape[0]


def test_out_of_memory_while_streaming_falls_back_to_margin_tiles(deep, butterfly, monkeypatch):
    expected = deep.upscale(butterfly, scale=2, options=EngineOptions(tile=10_000))

    def no_room(self: FeatureRows, rows: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(FeatureRows, "push", no_room)
    with pytest.warns(UserWarning, match="out of memory while streaming"):
        out = deep.upscale(butterfly, scale=2, options=EngineOptions(tile=16))
    assert np.array_equal(out, expected)


def test_reduced_precision_overflow_in_a_stream_is_recomputed_in_float32(deep, butterfly, monkeypatch):
    expected = deep.upscale(butterfly, scale=2, options=EngineOptions(tile=10_000))
    push, forward = FeatureRows.push, deep.model.encoder.forward

    def overflowing(self: FeatureRows, rows: torch.Tensor) -> torch.Tensor:  # fp16 overflows, here everywhere
        return push(self, rows) * float("nan")

    def overflowing_forward(x: torch.Tensor) -> torch.Tensor:  # and in the tile that retries it, until float32
        return forward(x) * float("nan") if torch.is_autocast_enabled("cpu") else forward(x)

    monkeypatch.setattr(FeatureRows, "push", overflowing)
    monkeypatch.setattr(deep.model.encoder, "forward", overflowing_forward)
    monkeypatch.setattr(deep.model, "encoder_dtype", torch.float16)
    with pytest.warns(UserWarning, match="float32"):
        out = deep.upscale(butterfly, scale=2, options=EngineOptions(precision="fp32", tile=16))
    assert np.array_equal(out, expected)


def test_stream_plan_fits_the_budget_and_grows_with_it(deep):
    capabilities = deep.capabilities
    cpu = torch.device("cpu")
    small_chunk, small_rows, small_columns = stream_plan(capabilities, 64 << 20, cpu, 4000)
    big_chunk, big_rows, big_columns = stream_plan(capabilities, 1 << 30, cpu, 4000)
    assert 8 <= small_chunk <= big_chunk <= 64 and 16 <= small_rows <= big_rows and small_columns < big_columns
    feature_row = 4 * capabilities.feature_channels * 4000
    per_pixel = 4 * (3 * capabilities.latent_channels + capabilities.feature_channels)
    margin = 2 * capabilities.decoder_margin
    assert (big_rows + margin) * (big_columns + margin) * per_pixel <= (1 << 30) / 4
    assert (big_rows + margin + big_chunk) * feature_row <= (1 << 30) / 8
    wide = stream_plan(capabilities, 1 << 30, cpu, 200_000)  # very wide images: shorter, wider tiles
    assert wide[1] < big_rows and wide[2] > big_columns


def test_benchmark_large_compares_the_ways_per_output_pixel(weights, tmp_path):
    """`lmf benchmark --large`: a photo bigger than the budget's tile, in streamed tiles and in tiles with
    margins, against an untiled crop; each way's own peak memory; streaming makes the same picture size."""
    import json

    from typer.testing import CliRunner

    from lmf_cli.cli import app

    result = CliRunner().invoke(app, ["benchmark", "--model", str(weights), "--device", "cpu", "--large", "160x120",
                                      "--size", "48x40", "--scales", "2", "--repeats", "1", "--max-memory", "16M",
                                      "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "t.json").read_text())["tiling"]
    assert [row["way"] for row in rows] == ["untiled crop", "streamed tiles", "tiles with margins"]
    crop, streamed, margins = rows
    assert crop["tiles"] == 1 and streamed["tiles"] > 1 and margins["tiles"] > 1
    assert streamed["out_hw"] == margins["out_hw"] == [240, 320] and crop["in_hw"] == [40, 48]
    assert all(row["peak_mb"] > 50 and row["us_per_pixel"] > 0 for row in rows)
    assert "vs untiled" in result.output
