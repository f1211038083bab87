"""Tiled upscaling equals untiled upscaling for every architecture, tile size and aspect."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from lmf_cli import EngineOptions, Upscaler
from lmf_cli.engine import upscale_tensor
from lmf_cli.models.checkpoints import load_weights
from tests.conftest import official_checkpoint

# Full-depth EDSR-baseline (16 blocks: receptive radius 34) with few channels, so the tile
# margin is tested at its real size while the test stays fast.
DEEP_EDSR = {"name": "edsr-baseline", "args": {"n_resblocks": 16, "n_feats": 8, "no_upsampling": True}}


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deep")
    out = {}
    for arch in ("liif", "lte", "lmliif", "lmlte"):
        torch.save(official_checkpoint(arch, DEEP_EDSR, seed=3), folder / f"{arch}.pth")
        out[arch] = Upscaler(load_weights(folder / f"{arch}.pth"), EngineOptions("cpu"))
    return out


@pytest.mark.parametrize("arch", ["liif", "lte", "lmliif", "lmlte"])
@pytest.mark.parametrize(("scale", "tile"), [(2, 16), (3.7, 16), ((1.6, 2.9), 23), (5, 40), (9.5, 16)])
def test_tiled_equals_untiled(deep_models, butterfly, arch, scale, tile, render_path):
    up = deep_models[arch]
    image = butterfly.astype(np.float32) / 255  # 48 x 40: tiles of 16 make a 3 x 3 grid
    whole = up.upscale(image, scale=scale, options=EngineOptions(tile=10_000))
    tiled = up.upscale(image, scale=scale, options=EngineOptions(tile=tile))
    assert whole.shape == tiled.shape
    assert np.abs(whole - tiled).max() < 1e-4


def test_tiles_report_progress(deep_models, butterfly):
    seen = []
    deep_models["lmliif"].upscale(butterfly, scale=2, options=EngineOptions(tile=16),
                                  progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (9, 9)


def test_rdn_tiles(tmp_path, butterfly):
    rdn = {"name": "rdn", "args": {"G0": 8, "RDNkSize": 3, "RDNconfig": "A", "no_upsampling": True}}
    torch.save(official_checkpoint("lmliif", rdn), tmp_path / "rdn.pth")
    up = Upscaler.load(tmp_path / "rdn.pth", EngineOptions("cpu"))
    image = butterfly[:30, :30].astype(np.float32) / 255
    whole = up.upscale(image, scale=2.5, options=EngineOptions(tile=10_000))
    tiled = up.upscale(image, scale=2.5, options=EngineOptions(tile=16))
    # Equal to float rounding (a tile's convolutions may take other oneDNN kernels than the
    # whole image's): uint8 outputs could differ by one level where a value sits on a half.
    assert np.abs(whole - tiled).max() < 1e-5


def test_out_of_memory_tile_is_split_and_retried(deep_models, butterfly, monkeypatch):
    up = deep_models["lmliif"]
    expected = up.upscale(butterfly, scale=2, options=EngineOptions(tile=10_000))
    real_encode = up.model.encode
    calls, failed_attempt, held_at_retry = [], [], []

    def encode(piece, rel_cell):
        calls.append(piece.shape)
        if len(calls) == 1:  # the first, whole-image tile "does not fit", holding what it had made
            workspace = torch.empty(1 << 20)
            failed_attempt.append(weakref.ref(workspace))
            raise torch.OutOfMemoryError("simulated")
        held_at_retry.append(failed_attempt[0]() is not None)
        return real_encode(piece, rel_cell)

    monkeypatch.setattr(up.model, "encode", encode)
    with pytest.warns(UserWarning, match="out of memory"):
        out = up.upscale(butterfly, scale=2, options=EngineOptions(tile=10_000))
    assert len(calls) == 5  # one failure, then four quarter tiles
    assert not any(held_at_retry)  # retried after the failed attempt's memory was let go (on a GPU it must be)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_reduced_precision_nan_falls_back_to_float32(deep_models, butterfly, monkeypatch):
    up = deep_models["lmlte"]
    expected = up.upscale(butterfly, scale=2)
    real_forward = up.model.encoder.forward

    def forward(x):
        out = real_forward(x)
        return out * float("nan") if torch.is_autocast_enabled("cpu") else out

    monkeypatch.setattr(up.model.encoder, "forward", forward)
    monkeypatch.setattr(up.model, "encoder_dtype", torch.float16)
    with pytest.warns(UserWarning, match="float32"):
        out = up.upscale(butterfly, scale=2)
    assert np.array_equal(out, expected)


def test_bf16_encoder_and_latent_mlp_are_close_to_fp32(official_files, butterfly):
    fp32 = Upscaler.load(official_files["lmliif"], EngineOptions("cpu", "fp32")).upscale(butterfly, scale=2)
    bf16 = Upscaler.load(official_files["lmliif"], EngineOptions("cpu", "bf16"))
    assert bf16.precision == "bf16" and bf16.model.latent_dtype == torch.bfloat16
    model = bf16.model
    feat, rel_cell = torch.randn(1, model.encoder.out_dim, 12, 10), torch.tensor([[0.5, 0.5]])
    rounded = model.latent_tables(feat, rel_cell)["mod"]
    model.encoder_dtype = None  # the latent MLP follows the encoder's precision
    exact = model.latent_tables(feat, rel_cell)["mod"]
    model.encoder_dtype = torch.bfloat16
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, exact)  # computed in bf16, handed on in fp32
    assert (rounded - exact).norm() < 0.02 * exact.norm()
    diff = np.abs(bf16.upscale(butterfly, scale=2).astype(int) - fp32.astype(int))
    assert diff.mean() < 2 and diff.max() < 40


@pytest.mark.skipif(os.environ.get("LMF_ISA_CHILD") == "1", reason="already running under a forced instruction set")
@pytest.mark.parametrize("isa", [("avx2", "AVX2"), ("default", "SSE41")])
def test_tiling_is_exact_on_other_cpu_kernels(isa):
    """Tiles and the whole image meet the 1e-4 bar whichever convolution kernels the CPU picks.

    CI runs on whatever CPU it gets; forcing PyTorch's and oneDNN's instruction sets here checks
    the AVX2-only (and baseline) code paths from an AVX-512 machine too.
    """
    aten, onednn = isa
    env = {**os.environ, "ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn, "LMF_ISA_CHILD": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                             "-k", "test_tiled_equals_untiled"], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-3000:]


def test_gpu_blocks_are_sized_from_the_memory_budget(deep_models):
    """On a GPU a block is as large as the budget allows (a whole 4K frame with room to spare),
    on a CPU it stays cache-sized; a small budget shrinks both."""
    from lmf_cli.engine.budget import MAX_GPU_BLOCK, render_block

    model = deep_models["lmliif"].model
    cuda = torch.device("cuda")
    cpu_side = render_block(model.capabilities, None, fused=False, device=torch.device("cpu"))[0]
    big = render_block(model.capabilities, 64 << 30, fused=False, device=cuda)[0]
    small = render_block(model.capabilities, 64 << 20, fused=False, device=cuda)[0]
    assert cpu_side < 200 and big ** 2 <= MAX_GPU_BLOCK and big >= 3840
    assert cpu_side < small < big



def test_self_ensemble_averages_the_eight_symmetries(deep_models, butterfly):
    """The ensemble of an equivariant map is the map itself; of the model, it is equivariant itself:
    ensembling a turned image gives the turned ensemble (what makes it an ensemble over symmetries)."""
    import torch.nn.functional as F

    from lmf_cli.engine.ensemble import TRANSFORMS, _backward, _forward, self_ensemble

    x = torch.rand(1, 3, 7, 11)
    for t in TRANSFORMS:
        assert torch.equal(_backward(_forward(x, t), t), x)
    bilinear = lambda inp, hw: F.interpolate(inp, size=hw, mode="bilinear", align_corners=False)  # noqa: E731
    assert torch.allclose(self_ensemble(bilinear, x, (17, 29)), bilinear(x, (17, 29)), atol=1e-6)

    model = deep_models["lmliif"].model
    inp = torch.from_numpy(butterfly[:20, :24].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    one = lambda image, hw: upscale_tensor(model, image, hw)  # noqa: E731
    ensembled = self_ensemble(one, inp, (50, 60))
    assert (ensembled - one(inp, (50, 60))).abs().max() > 1e-3  # the model is not equivariant
    turned = (True, True, False)
    assert torch.allclose(self_ensemble(one, _forward(inp, turned), (60, 50)), _forward(ensembled, turned), atol=1e-5)


def test_eval_scores_the_self_ensemble(weights, tmp_path, butterfly):
    from PIL import Image
    from typer.testing import CliRunner

    from lmf_cli.cli import app

    Image.fromarray(butterfly).save(tmp_path / "b.png")
    args = ["eval", str(tmp_path / "b.png"), "--model", str(weights), "--device", "cpu", "--scales", "2",
            "--no-bicubic", "--json", "-"]
    one = CliRunner().invoke(app, args)
    both = CliRunner().invoke(app, [*args, "--self-ensemble"])
    assert one.exit_code == both.exit_code == 0, both.output
    assert "(self-ensemble)" in both.output and "(self-ensemble)" not in one.output
    refused = CliRunner().invoke(app, [*args, "--self-ensemble", "--record"])
    assert refused.exit_code == 1 and "leave out --self-ensemble" in refused.output


def test_eval_scores_in_float32_where_upscale_would_use_bf16(weights, tmp_path, butterfly, monkeypatch):
    """The card's figures must not depend on the CPU that measured them: eval is fp32 by default even
    where `auto` picks bf16, scores bf16 when asked, and records only fp32."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from lmf_cli.cli import app

    monkeypatch.setenv("LMF_CPU_BF16", "1")
    Image.fromarray(butterfly).save(tmp_path / "b.png")
    args = ["eval", str(tmp_path / "b.png"), "--model", str(weights), "--device", "cpu", "--scales", "2",
            "--no-bicubic", "--json", "-"]
    runs = {name: CliRunner().invoke(app, [*args, *extra]) for name, extra in
            (("default", []), ("fp32", ["--precision", "fp32"]), ("auto", ["--precision", "auto"]))}
    psnr = {}
    for name, run in runs.items():
        assert run.exit_code == 0, run.output
        report = json.loads(run.output[run.output.index("{\n"):])
        assert report["precision"] == ("bf16" if name == "auto" else "fp32")
        psnr[name] = report["results"][0]["psnr"]
    assert psnr["default"] == psnr["fp32"] != psnr["auto"]
    assert abs(psnr["auto"] - psnr["fp32"]) < 0.05
    refused = CliRunner().invoke(app, [*args, "--precision", "bf16", "--record"])
    assert refused.exit_code == 1 and "leave out --precision" in refused.output
