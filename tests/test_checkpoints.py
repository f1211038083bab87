"""Weights files: our safetensors round trip, and one-line errors for everything else."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

from lmf_cli import CheckpointError, EngineOptions, UnsupportedModelError, Upscaler
from lmf_cli import models as registry
from lmf_cli.evaluation.protocol import record_results
from lmf_cli.models.checkpoints import load_weights, save_weights
from lmf_cli.models.zoo import resolve
from tests.conftest import SMALL_EDSR, official_checkpoint


def _single_line(exc: Exception) -> str:
    text = str(exc)
    assert "\n" not in text and len(text) < 300
    return text


def test_safetensors_round_trip_keeps_outputs_and_metadata(tmp_path, official_files, butterfly):
    official = load_weights(official_files["lmliif"])
    path = tmp_path / "ours.safetensors"
    save_weights(path, official.model, official.spec, {"steps": 12}, {"8": {"1": 0.1}})
    ours = load_weights(path)
    assert ours.info == {"steps": 12} and ours.cmsr_tables == {"8": {"1": 0.1}}
    a = Upscaler(official, EngineOptions("cpu")).upscale(butterfly, scale=3)
    b = Upscaler(ours, EngineOptions("cpu")).upscale(butterfly, scale=3)
    assert np.array_equal(a, b)


def test_half_precision_weights_are_half_the_file_and_stay_half_when_written_again(tmp_path, official_files,
                                                                                   butterfly):
    official = load_weights(official_files["lmliif"])
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_weights(full, official.model, official.spec, {"steps": 12}, {"8": {"1": 0.1}})
    save_weights(half, official.model, official.spec, {"steps": 12}, {"8": {"1": 0.1}}, torch.float16)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    loaded = load_weights(half)
    assert loaded.storage == torch.float16 and load_weights(full).storage == torch.float32
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())  # built in float32 all the same
    assert loaded.info == {"steps": 12} and loaded.cmsr_tables == {"8": {"1": 0.1}}
    a = Upscaler(official, EngineOptions("cpu")).upscale(butterfly, scale=3).astype(np.int16)
    b = Upscaler(loaded, EngineOptions("cpu")).upscale(butterfly, scale=3).astype(np.int16)
    assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.05
    # recording PSNRs writes the file again: in half precision still, the same numbers
    record_results(loaded, loaded.model, "ours", [{"set": "Set5", "method": "ours", "scale": 2.0, "psnr": 30.0}],
                   "benchmark")
    again = load_weights(half)
    assert again.storage == torch.float16 and again.info["eval"] == {"Set5": {"2": 30.0}}
    assert "eval_bicubic" not in again.info  # no bicubic row was run: no empty table recorded
    record_results(again, again.model, "ours", [{"set": "B100", "method": "ours", "scale": 2.0, "psnr": 28.0},
                                                {"set": "B100", "method": "bicubic", "scale": 2.0, "psnr": 27.0}],
                   "benchmark", "jpeg:40")
    record_results(load_weights(half), again.model, "ours",
                   [{"set": "Set14", "method": "ours", "scale": 2.0, "psnr": 29.0}], "benchmark", "jpeg:40")
    degraded = load_weights(half).info
    assert degraded["eval_degraded"] == {"jpeg:40": {"B100": {"2": 28.0}, "Set14": {"2": 29.0}}}
    assert degraded["eval_bicubic_degraded"] == {"jpeg:40": {"B100": {"2": 27.0}}}
    assert all(torch.equal(x, y) for x, y in zip(loaded.model.state_dict().values(),
                                                 again.model.state_dict().values(), strict=True))


def test_weights_beyond_half_precision_range_are_refused_not_clipped(tmp_path, official_files):
    official = load_weights(official_files["lmliif"])
    with torch.no_grad():
        next(official.model.parameters()).view(-1)[0] = 1e6
    with pytest.raises(CheckpointError, match="beyond float16's range"):
        save_weights(tmp_path / "half.safetensors", official.model, official.spec, storage=torch.float16)
    assert not (tmp_path / "half.safetensors").exists()


def test_unknown_extra_arguments_are_ignored(tmp_path):
    ckpt = official_checkpoint("lmliif", SMALL_EDSR)
    ckpt["model"]["args"]["some_future_flag"] = 3
    torch.save(ckpt, tmp_path / "extra.pth")
    assert load_weights(tmp_path / "extra.pth").architecture == "lmliif"


@pytest.mark.parametrize("arch", ["swinir-lmliif", "ciaosr", "metasr"])
def test_unsupported_architecture(tmp_path, arch):
    ckpt = official_checkpoint("lmliif", SMALL_EDSR)
    ckpt["model"]["name"] = arch
    torch.save(ckpt, tmp_path / "x.pth")
    with pytest.raises(UnsupportedModelError) as err:
        load_weights(tmp_path / "x.pth")
    assert arch in _single_line(err.value) and "x.pth" in str(err.value)


def test_unsupported_encoder(tmp_path):
    ckpt = official_checkpoint("lmliif", SMALL_EDSR)
    ckpt["model"]["args"]["encoder_spec"] = {"name": "rcan", "args": {}}
    torch.save(ckpt, tmp_path / "rcan.pth")
    with pytest.raises(UnsupportedModelError) as err:
        load_weights(tmp_path / "rcan.pth")
    assert "rcan" in _single_line(err.value)


def test_truncated_official_checkpoint(tmp_path, official_files):
    data = official_files["lmlte"].read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_weights(tmp_path / "cut.pth")
    assert "cut.pth" in _single_line(err.value)


def test_garbage_and_empty_files(tmp_path):
    (tmp_path / "noise.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("noise.pth", "empty.safetensors"):
        with pytest.raises(CheckpointError) as err:
            load_weights(tmp_path / name)
        assert name in _single_line(err.value)


def test_pickled_objects_are_refused(tmp_path):
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": print}, protocol=2))  # a global weights_only refuses
    (tmp_path / "evil4.pth").write_bytes(pickle.dumps({"model": print}))  # protocol 4: refused earlier, unnamed
    messages = []
    for name in ("evil.pth", "evil4.pth"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no stray warning line before the error
            with pytest.raises(CheckpointError) as err:
                load_weights(tmp_path / name)
        messages.append(str(err.value))
        assert "\n" not in messages[-1] and len(messages[-1]) < 300, messages[-1]
        assert f"{name}: holds Python objects other than tensors" in messages[-1]
        assert "weights_only" not in messages[-1]
    assert "(it references print)" in messages[0]


def test_wrong_shapes_and_missing_keys(tmp_path):
    ckpt = official_checkpoint("lmliif", SMALL_EDSR)
    del ckpt["model"]["sd"]["imnet.layers.4.bias"]
    torch.save(ckpt, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError) as err:
        load_weights(tmp_path / "missing.pth")
    assert "missing.pth" in _single_line(err.value)


def test_not_a_model_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as err:
        load_weights(tmp_path / "other.pth")
    assert "official" in _single_line(err.value)


def test_truncated_safetensors(tmp_path):
    model = registry.make(registry.lmliif_spec(registry.edsr_spec(1, 8)))
    path = tmp_path / "m.safetensors"
    save_weights(path, model, registry.lmliif_spec(registry.edsr_spec(1, 8)))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError) as err:
        load_weights(tmp_path / "cut.safetensors")
    assert "cut.safetensors" in _single_line(err.value)


def test_safetensors_without_lmf_config(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_weights(tmp_path / "plain.safetensors")
    assert "lmf model config" in _single_line(err.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(CheckpointError):
        resolve(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError) as err:
        resolve("lmf-huge")
    assert "lmf-edsr" in _single_line(err.value)


def test_shipped_name_without_weights_says_so(monkeypatch, tmp_path):
    from lmf_cli.models import zoo

    monkeypatch.setattr(zoo, "weights_dirs", lambda: [tmp_path])
    with pytest.raises(CheckpointError) as err:
        Upscaler.load("lmf-edsr")
    assert "no trained weights" in _single_line(err.value)
