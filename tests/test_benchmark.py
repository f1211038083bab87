"""`lmf benchmark`: MACs from the architecture against the paper's table, and a quick run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmf_cli import models as registry
from lmf_cli.cli import app
from lmf_cli.evaluation.benchmark import liif_twin, model_macs
from lmf_cli.models.checkpoints import load_weights, save_weights

# DESIGN.md §1: decoder GMACs for a 320x180 input
PAPER = {1: (79.7, 9.8), 4: (1275, 15.5), 8: (5100, 33.7), 30: (71717, 351)}


@pytest.mark.parametrize("scale", list(PAPER))
def test_decoder_macs_match_the_paper(scale):
    lmf = registry.make(registry.lmliif_spec())
    out_hw = (180 * scale, 320 * scale)
    ours = model_macs(lmf, (180, 320), out_hw)
    liif = model_macs(liif_twin(lmf), (180, 320), out_hw)
    paper_liif, paper_lmf = PAPER[scale]
    assert (ours["latent"] + ours["render"]) / 1e9 == pytest.approx(paper_lmf, rel=0.01)
    assert liif["render"] / 1e9 == pytest.approx(paper_liif, rel=0.01)
    assert ours["encoder"] / (180 * 320) == pytest.approx(1.22e6, rel=0.01)


def test_quick_benchmark_writes_json_and_plot(official_files, tmp_path):
    loaded = load_weights(official_files["lmliif"])
    weights = tmp_path / "tiny.safetensors"
    save_weights(weights, loaded.model, loaded.spec, {}, {"2e-05": {"8": {"1": 0.0, "2": 0.05, "4": 0.1}}})
    result = CliRunner().invoke(app, ["benchmark", "--quick", "--model", str(weights), "--device", "cpu",
                                      "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"),
                                      "--psnr"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b.json").read_text())
    methods = {(r["method"].split(" (")[0], r["scale"]) for r in data["rows"]}
    assert {("LMF", 8.0), ("LMF + CMSR", 8.0), ("LIIF", 8.0), ("bicubic", 2.0)} <= methods
    assert data["machine"]["threads"] >= 1 and data["machine"]["torch"]
    lmf8 = next(r for r in data["rows"] if r["method"].startswith("LMF (") and r["scale"] == 8.0)
    liif8 = next(r for r in data["rows"] if r["method"].startswith("LIIF") and r["scale"] == 8.0)
    assert liif8["macs"]["render"] > 20 * lmf8["macs"]["render"]
    assert lmf8["total"]["median_s"] > 0 and lmf8["megapixels_per_s"] > 0
    assert any(p["method"] == "bicubic" for p in data["psnr"])
    assert (tmp_path / "b.png").stat().st_size > 10_000


def test_stages_add_up_and_inputs_are_named(official_files, tmp_path, butterfly):
    """Each stage and the total come from the same runs (one repeat: they add up exactly);
    the table says what was timed; a DIIF model gets its own rows with its own MAC count."""
    from PIL import Image

    loaded = load_weights(official_files["lmliif"])
    weights = tmp_path / "tiny.safetensors"
    save_weights(weights, loaded.model, loaded.spec, {})
    diif_spec = registry.diif_spec(registry.edsr_spec(2, 16), head_hidden=[16, 16], tail_hidden=[16, 16])
    diif = tmp_path / "diif.safetensors"
    save_weights(diif, registry.make(diif_spec), diif_spec, {})
    photo = tmp_path / "my photo.png"
    Image.fromarray(butterfly).save(photo)
    result = CliRunner().invoke(app, ["benchmark", "--quick", "--model", str(weights), "--device", "cpu", "--no-liif",
                                      "--image", str(photo), "--diif", str(diif), "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["input"] == "1 photo (my photo)"
    for row in data["rows"]:
        if row["encoder"] is not None:
            parts = row["encoder"]["median_s"] + row["latent"]["median_s"] + row["render"]["median_s"]
            assert parts == pytest.approx(row["total"]["median_s"], rel=1e-6), row["method"]
    diif8 = next(r for r in data["rows"] if r["method"].startswith("DIIF") and r["scale"] == 8.0)
    model = registry.make(diif_spec)
    assert diif8["macs"]["render"] == model.decoder_macs((64, 96), (512, 768))


def test_plot_without_matplotlib_fails_before_the_work(official_files, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(app, ["benchmark", "--quick", "--model", str(official_files["lmliif"]),
                                      "--plot", "x.png"])
    assert result.exit_code == 1 and "--plot needs matplotlib" in result.output
    assert "x2 done" not in result.output
