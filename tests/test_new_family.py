"""docs/adding-a-model.md, followed from inside a test: a toy decoder family is registered and runs
through `lmf upscale`, exact tiling, the CMSR refusal and the benchmark, with no change outside it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from lmf_cli import EngineOptions, Upscaler
from lmf_cli import models as registry
from lmf_cli.cli import app
from lmf_cli.engine import upscale_tensor
from lmf_cli.evaluation import benchmark as bench
from lmf_cli.models.base import (
    Capabilities,
    ImplicitSR,
    Latents,
    RenderWindow,
    channels_last_table,
    encoder_margin,
    gather,
    slot_rel,
    slot_window,
)
from lmf_cli.models.checkpoints import save_weights
from tests.conftest import SMALL_EDSR


class NearestLinear(ImplicitSR):
    """Step 1, the family: each output pixel is a linear map of the nearest latent's feature and its
    offset from it (LIIF without the MLP and the ensemble)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.local_ensemble = False
        self.head = nn.Linear(encoder.out_dim + 2, 3)

    @property
    def capabilities(self) -> Capabilities:
        width = self.encoder.out_dim
        return Capabilities("nearest", encoder_margin(self.encoder), width, width, 3)

    def stage_macs(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict[str, float]:
        return {"latent": 0.0, "render": float(self.head.in_features * 3 * out_hw[0] * out_hw[1])}

    def latents(self, feat: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
        return {"feat": channels_last_table(feat)}

    def decode_points(self, latents: Latents, index: torch.Tensor, rel: torch.Tensor,
                      rel_cell: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([gather(latents["feat"], index), rel], -1))

    def decode_slots(self, latents: Latents, window: RenderWindow) -> torch.Tensor:
        feat = slot_window(latents["feat"], window)  # (B, nr, nc, 1, 1, C)
        ry, rx = slot_rel(window, feat.dtype)  # (nr, 1, Kr, 1, 1), (1, nc, 1, Kc, 1)
        c = feat.shape[-1]
        w = self.head.weight
        per_latent = feat @ w[:, :c].t() + self.head.bias
        return per_latent + ry * w[:, c] + rx * w[:, c + 1]


def _nearest(encoder_spec: dict[str, Any], **_: Any) -> NearestLinear:
    """Step 2, the registry entry: the spec's args -> the module (unknown extra args ignored)."""
    return NearestLinear(registry.make_encoder(encoder_spec))


@pytest.fixture
def toy_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.MODELS, "nearest", _nearest)
    spec = {"name": "nearest", "args": {"encoder_spec": SMALL_EDSR}}
    torch.manual_seed(0)
    model = registry.make(spec)
    path = tmp_path / "nearest.safetensors"
    save_weights(path, model, spec, {"steps": 0})
    return path


def test_a_registered_family_runs_everywhere(toy_weights, butterfly, tmp_path):
    up = Upscaler.load(toy_weights, EngineOptions("cpu"))
    assert up.capabilities.family == "nearest" and not up.capabilities.cmsr
    image = butterfly.astype(np.float32) / 255
    for scale in (2, 3.7):  # tiles never change the result
        whole = up.upscale(image, scale=scale, options=EngineOptions(tile=10_000))
        tiled = up.upscale(image, scale=scale, options=EngineOptions(tile=7))
        assert np.abs(whole - tiled).max() < 1e-5

    # the renderer of windows agrees with the pointwise formula (query) it was derived from
    inp = torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1
    out_hw = (97, 131)
    grid = upscale_tensor(up.model, inp, out_hw) * 2 - 1
    ys = (torch.arange(out_hw[0]) + 0.5) / out_hw[0] * 2 - 1
    xs = (torch.arange(out_hw[1]) + 0.5) / out_hw[1] * 2 - 1
    coord = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).view(1, -1, 2)
    cell = torch.tensor([[2 / out_hw[0], 2 / out_hw[1]]]).expand(1, coord.shape[1], 2)
    with torch.no_grad():
        points = up.model(inp, coord, cell).view(1, *out_hw, 3).permute(0, 3, 1, 2)
    assert torch.abs(grid - points).max() < 1e-4

    source = tmp_path / "in.png"
    Image.fromarray(butterfly).save(source)
    runner = CliRunner()
    done = runner.invoke(app, ["upscale", str(source), "--scale", "2.5", "--model", str(toy_weights),
                               "--device", "cpu", "--tile", "9"])
    assert done.exit_code == 0, done.output
    assert Image.open(tmp_path / "in_x2.5.png").size == (120, 100)
    refused = runner.invoke(app, ["upscale", str(source), "--scale", "8", "--model", str(toy_weights),
                                  "--device", "cpu", "--quality", "balanced", "-o", str(tmp_path / "cmsr.png")])
    assert refused.exit_code == 1 and "--quality balanced" in refused.output
    assert "nearest has no CMSR levels" in refused.output
    assert not (tmp_path / "cmsr.png").exists()

    row = bench.benchmark_model("toy", up.model, [inp], 4.0, repeats=1, warmup=0)
    assert row.macs["render"] == (16 + 2) * 3 * 160 * 192 and row.macs["encoder"] > 0
    assert row.total.median_s > 0
