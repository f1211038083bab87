"""Shared fixtures: official-layout checkpoints built from shapes, small real images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("LMF_DATA", str(DATA))  # the CLI finds Set5, B100, T91 ... there (subprocesses too)

# Exactness tests compare float32 results; `precision="auto"` would pick a bf16 encoder on CPUs
# with AMX or AVX-512 BF16 (CI gets whatever CPU it gets). Set here, so subprocesses inherit it;
# tests of the automatic choice set it themselves.
os.environ["LMF_CPU_BF16"] = "0"


RESIDUAL_GAIN = 0.1
# Output and modulation layers of a trained decoder make small corrections around the input
# colour; at full gain random ones pin most outputs at 0 or 1, where float32 last-bit
# differences between a tile and the whole image (CPU-kernel dependent) grow past 1e-4.
HEAD_GAIN = 0.5


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return torch.randn(*shape, generator=gen) / (fan_in ** 0.5)


def encoder_state(gen: torch.Generator, spec: dict) -> dict[str, torch.Tensor]:
    """Official key layout of EDSR-baseline / RDN, built from shapes alone."""
    sd: dict[str, torch.Tensor] = {}

    gain = 0.5 if spec["name"] == "rdn" else 1.0  # keeps 20 dense blocks' activations O(1)

    def conv(name: str, out_ch: int, in_ch: int, k: int = 3, branch_gain: float = 1.0) -> None:
        sd[f"encoder.{name}.weight"] = _randn(gen, out_ch, in_ch, k, k) * gain * branch_gain
        sd[f"encoder.{name}.bias"] = _randn(gen, out_ch) * 0.1

    args = spec.get("args", {})
    if spec["name"] == "rdn":
        d, c, g = {"A": (20, 6, 32), "B": (16, 8, 64)}[args.get("RDNconfig", "B")]
        g0 = args.get("G0", 64)
        conv("SFENet1", g0, 3)
        conv("SFENet2", g0, g0)
        for i in range(d):
            for j in range(c):
                conv(f"RDBs.{i}.convs.{j}.conv.0", g, g0 + j * g)
            conv(f"RDBs.{i}.LFF", g0, g0 + c * g, 1)
        conv("GFF.0", g0, d * g0, 1)
        conv("GFF.1", g0, g0)
        return sd
    n, f = args.get("n_resblocks", 16), args.get("n_feats", 64)
    conv("sub_mean", 3, 3, 1)
    conv("add_mean", 3, 3, 1)
    conv("head.0", f, 3)
    for i in range(n):
        conv(f"body.{i}.body.0", f, f)
        # Trained residual branches add small updates (EDSR's res_scale): unscaled random ones
        # compound over 16 blocks into features of std ~7 that saturate every decoder.
        conv(f"body.{i}.body.2", f, f, branch_gain=RESIDUAL_GAIN)
    conv(f"body.{n}", f, f)
    return sd


def linear_stack(gen: torch.Generator, prefix: str, dims: list[int], sd: dict, last_gain: float = 1.0) -> None:
    for j in range(len(dims) - 1):
        gain = last_gain if j == len(dims) - 2 else 1.0
        sd[f"{prefix}.layers.{2 * j}.weight"] = _randn(gen, dims[j + 1], dims[j]) * gain
        sd[f"{prefix}.layers.{2 * j}.bias"] = _randn(gen, dims[j + 1]) * 0.1


def official_checkpoint(name: str, encoder: dict, seed: int = 0) -> dict:
    """A checkpoint dict exactly as the official code saves it (random weights)."""
    gen = torch.Generator().manual_seed(seed)
    sd = encoder_state(gen, encoder)
    feat = encoder.get("args", {}).get("n_feats", 64) if encoder["name"] != "rdn" else encoder["args"].get("G0", 64)
    if name == "liif":
        hidden = [32, 32]
        args = {"encoder_spec": encoder, "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": hidden}},
                "local_ensemble": True, "feat_unfold": True, "cell_decode": True}
        linear_stack(gen, "imnet", [feat * 9 + 4, *hidden, 3], sd, HEAD_GAIN)
    elif name == "lte":
        hidden_dim, hidden = 32, [32, 32]
        args = {"encoder_spec": encoder, "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": hidden}},
                "hidden_dim": hidden_dim}
        for conv in ("coef", "freq"):
            sd[f"{conv}.weight"] = _randn(gen, hidden_dim, feat, 3, 3)
            sd[f"{conv}.bias"] = _randn(gen, hidden_dim) * 0.1
        sd["phase.weight"] = _randn(gen, hidden_dim // 2, 2)
        linear_stack(gen, "imnet", [hidden_dim, *hidden, 3], sd, HEAD_GAIN)
    elif name == "lmliif":
        args = {"encoder_spec": encoder,
                "imnet_spec": {"name": "lmmlp", "args": {"out_dim": 3, "hidden_dim": 16, "hidden_depth": 6,
                                                         "mod_scale": True, "mod_shift": True}},
                "hypernet_spec": {"name": "mlp", "args": {"out_dim": 208, "hidden_list": [208]}},
                "local_ensemble": True, "feat_unfold": True, "cell_decode": True, "mod_input": True,
                "mixed_le": False}
        linear_stack(gen, "hypernet", [feat * 9 + 2, 208, 208], sd, HEAD_GAIN)
        linear_stack(gen, "imnet", [20, *[16] * 6, 3], sd)
    elif name == "diif":
        # the authors' DIIF arguments (C2F-MLP "c2fmlp_liif"); head `imnet.layers`, tail `imnet.tail`
        head, tail = [32, 32], [32, 32]
        args = {"encoder_spec": encoder,
                "imnet_spec": {"name": "c2fmlp_liif", "args": {"out_dim": 3, "head_hidden_list": head,
                                                                "tail_hidden_list": tail}},
                "single_slice": False, "coarse_cell_decode": True, "fine_cell_decode": False,
                "local_ensemble": True, "ensemble_num": 2, "feat_unfold": True, "unfold_num": 3,
                "batch_unit": 384 * 384, "fixed_area": True}
        for part, dims in (("layers", [feat * 4 + 6, *head]), ("tail", [head[-1] + 2, *tail, 3])):
            for j in range(len(dims) - 1):
                gain = HEAD_GAIN if part == "tail" and j == len(dims) - 2 else 1.0
                sd[f"imnet.{part}.{2 * j}.weight"] = _randn(gen, dims[j + 1], dims[j]) * gain
                sd[f"imnet.{part}.{2 * j}.bias"] = _randn(gen, dims[j + 1]) * 0.1
    else:
        args = {"encoder_spec": encoder,
                "imnet_spec": {"name": "lmmlp", "args": {"out_dim": 3, "hidden_dim": 16, "hidden_depth": 8,
                                                         "mod_scale": True, "mod_shift": True}},
                "hypernet_spec": {"name": "mlp", "args": {"out_dim": 288, "hidden_list": [288]}},
                "hidden_dim": 128, "local_ensemble": True, "cell_decode": True, "mod_input": True}
        for conv in ("coef", "freq"):
            sd[f"{conv}.weight"] = _randn(gen, 128, feat, 3, 3)
            sd[f"{conv}.bias"] = _randn(gen, 128) * 0.1
        sd["phase.weight"] = _randn(gen, 64, 2)
        sd["imphase.weight"] = _randn(gen, 8, 2)
        linear_stack(gen, "hypernet", [128, 288, 288], sd, HEAD_GAIN)
        linear_stack(gen, "imnet", [16, *[16] * 8, 3], sd, HEAD_GAIN)
    return {"model": {"name": name, "args": args, "sd": sd}, "optimizer": {"lr": 1e-4}, "epoch": 1000}


SMALL_EDSR = {"name": "edsr-baseline", "args": {"n_resblocks": 2, "n_feats": 16, "no_upsampling": True}}


@pytest.fixture(scope="session")
def official_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("official")
    files = {}
    for name in ("liif", "lte", "lmliif", "lmlte"):
        files[name] = folder / f"{name}.pth"
        torch.save(official_checkpoint(name, SMALL_EDSR), files[name])
    return files


@pytest.fixture(scope="session")
def butterfly() -> np.ndarray:
    """A real 8-bit photo crop (Set5 butterfly), small enough for fast tests."""
    from PIL import Image

    with Image.open(DATA / "Set5" / "HR" / "butterfly.png") as img:
        return np.asarray(img.convert("RGB"))[96:136, 80:128].copy()


@pytest.fixture(params=["kernel", "pytorch"])
def render_path(request, monkeypatch) -> str:
    """Run a test through the compiled render kernel and through the PyTorch renderer."""
    from lmf_cli.engine import native

    if request.param == "pytorch":
        monkeypatch.setenv("LMF_NATIVE", "0")
    elif native._library(16) is None:
        pytest.skip("no C compiler: the render kernel cannot be built here")
    return request.param


@pytest.fixture(scope="module")
def weights(official_files, tmp_path_factory) -> Path:
    """The small official LM-LIIF checkpoint as our own .safetensors."""
    from lmf_cli.models.checkpoints import load_weights, save_weights

    loaded = load_weights(official_files["lmliif"])
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(path, loaded.model, loaded.spec, {"steps": 0})
    return path


@pytest.fixture(scope="module")
def tiny(weights):
    from lmf_cli import EngineOptions, Upscaler

    return Upscaler.load(weights, EngineOptions("cpu", "fp32"))


@pytest.fixture
def lmf(weights):
    """Run `lmf upscale ARGS` with the tiny model on the CPU."""
    from typer.testing import CliRunner

    from lmf_cli.cli import app

    def run(*args: str):
        return CliRunner().invoke(app, ["upscale", *map(str, args), "--model", str(weights), "--device", "cpu"])
    return run
