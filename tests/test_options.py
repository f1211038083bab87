"""Every engine option, followed from the command line to where it acts: one EngineOptions value made
from the flags reaches the tiled engine whole, for `lmf upscale`, for `lmf video` and on a Ray worker."""

from __future__ import annotations

import functools
import math
import pickle
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lmf_cli import EngineOptions, Upscaler
from lmf_cli import api as api_module
from lmf_cli.cli import app
from lmf_cli.engine import tiling
from lmf_cli.models.checkpoints import load_weights, save_weights

runner = CliRunner()
FLAGS = ["--device", "cpu", "--precision", "fp32", "--tile", "9", "--max-memory", "300M", "--quality", "balanced",
         "--max-pixels", "5M"]
EXPECTED = EngineOptions(device="cpu", precision="fp32", tile=9, max_memory=300 << 20, cmsr="balanced",
                         max_pixels=5_000_000)


@pytest.fixture(scope="module")
def calibrated(weights, tmp_path_factory):
    """The tiny LM-LIIF with a CMSR table that sends every latent to x2 at x8 (so `balanced` visibly acts)."""
    loaded = load_weights(weights)
    path = tmp_path_factory.mktemp("opts") / "calibrated.safetensors"
    save_weights(path, loaded.model, loaded.spec, {"steps": 0}, cmsr_tables={"2e-05": {"8": {"2": 1e9}}})
    return path


@pytest.fixture
def engine_calls(monkeypatch):
    """What reaches the tiled engine: the options, whether a CMSR schedule came with them, the encoder
    dtype and device, and how many tiles were run."""
    calls = []
    real_engine = api_module.upscale_tensor
    real_tile, real_piece = tiling._TiledRun.tile, tiling._TiledRun._decode_piece

    def engine(model, inp, out_hw, options=None, schedule=None, progress=None, stats=None, cores=None,
               dtype=torch.float32):
        calls.append({"options": options, "schedule": schedule is not None, "dtype": model.encoder_dtype,
                      "device": inp.device.type, "in_hw": tuple(inp.shape[-2:]), "tiles": 0})
        return real_engine(model, inp, out_hw, options, schedule, progress, stats, cores, dtype)

    def tile(self, *core):
        calls[-1]["tiles"] += 1
        return real_tile(self, *core)

    def piece(self, *args):  # a streamed tile
        calls[-1]["tiles"] += 1
        return real_piece(self, *args)

    monkeypatch.setattr(api_module, "upscale_tensor", engine)
    monkeypatch.setattr(tiling._TiledRun, "tile", tile)
    monkeypatch.setattr(tiling._TiledRun, "_decode_piece", piece)
    return calls


def _tiles(in_hw: tuple[int, int], side: int) -> int:
    return math.ceil(in_hw[0] / side) * math.ceil(in_hw[1] / side)


def test_upscale_carries_every_engine_option_to_the_engine(calibrated, butterfly, engine_calls, tmp_path):
    rgba = np.dstack([butterfly[:20, :24], np.full((20, 24), 200, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    done = runner.invoke(app, ["upscale", str(tmp_path / "a.png"), "--scale", "8", "--model", str(calibrated),
                               *FLAGS, "--alpha", "bicubic"])
    assert done.exit_code == 0, done.output
    (call,) = engine_calls  # --alpha bicubic: the alpha channel never reached the model
    assert call["options"] == EngineOptions(**{**EXPECTED.__dict__, "alpha": "bicubic"})
    assert call["schedule"] and call["dtype"] is None and call["device"] == "cpu"
    assert call["tiles"] == _tiles((20, 24), 8)  # --tile 9, cut on CMSR's 8-pixel blocks
    engine_calls.clear()
    again = runner.invoke(app, ["upscale", str(tmp_path / "a.png"), "--size", "30x25", "--model", str(calibrated),
                                "--device", "cpu", "--overwrite"])
    assert again.exit_code == 0 and len(engine_calls) == 2  # --alpha model: a second pass for alpha
    assert engine_calls[0]["options"] == EngineOptions(device="cpu") and not engine_calls[0]["schedule"]
    refused = runner.invoke(app, ["upscale", str(tmp_path / "a.png"), "--scale", "8", "--model", str(calibrated),
                                  "--max-pixels", "1k", "--overwrite"])
    assert refused.exit_code == 1 and "over the limit of 1,000 (--max-pixels)" in refused.output


def _clip(path, frames: int = 3, size: tuple[int, int] = (24, 16)):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.time_base = Fraction(1, 10)
        rng = np.random.default_rng(0)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def test_video_takes_the_same_engine_options(calibrated, engine_calls, tmp_path):
    src = _clip(tmp_path / "c.mkv")
    done = runner.invoke(app, ["video", str(src), "--scale", "8", "--model", str(calibrated), "--codec", "ffv1",
                               "-o", str(tmp_path / "c8.mkv"), *FLAGS])
    assert done.exit_code == 0, done.output
    assert len(engine_calls) == 3 and all(c["options"] == EXPECTED for c in engine_calls)
    assert all(c["schedule"] and c["tiles"] == _tiles((16, 24), 8) for c in engine_calls)
    refused = runner.invoke(app, ["video", str(src), "--scale", "8", "--model", str(calibrated), "-o",
                                  str(tmp_path / "big.mkv"), "--device", "cpu", "--max-pixels", "20k"])
    assert refused.exit_code == 1 and "over the limit of 20,000 (--max-pixels)" in refused.output
    assert not (tmp_path / "big.mkv").exists()
    for flag, value, reason in (("--tile", "0", "at least 1"), ("--quality", "fastest", "choose one of"),
                                ("--max-memory", "lots", "positive amount")):
        bad = runner.invoke(app, ["video", str(src), "--scale", "2", "--model", str(calibrated), "-o",
                                  str(tmp_path / "bad.mkv"), flag, value])
        assert bad.exit_code == 1 and flag in bad.output and value in bad.output and reason in bad.output, bad.output
        assert not (tmp_path / "bad.mkv").exists() and not list(tmp_path.glob(".bad.mkv*"))


def test_options_cross_to_a_ray_worker_whole(calibrated, butterfly, tmp_path):
    """The value pickles as it is; a worker's Upscaler is built with it and renders what a local one renders."""
    assert pickle.loads(pickle.dumps(EXPECTED)) == EXPECTED
    ray = pytest.importorskip("ray")
    from lmf_cli.cli.common import open_upscaler
    from lmf_cli.cluster import WorkerPool, upscale_files
    from lmf_cli.jobs.images import FileOptions, Sizing, expand_inputs, plan_jobs, upscale_file

    Image.fromarray(butterfly[:20, :24]).save(tmp_path / "a.png")
    options = FileOptions(EXPECTED, jpeg_quality=90)
    jobs = expand_inputs([str(tmp_path / "a.png")], False, None)
    plan_jobs(jobs, Sizing(scale=(8.0, 8.0), uniform=True), EXPECTED.max_pixels, None, None, tmp_path / "ray",
              False, False)
    with WorkerPool.start("local", functools.partial(open_upscaler, str(calibrated), EXPECTED), workers=1) as pool:
        assert pool.options == EXPECTED  # built on the worker from the pickled value, reported back
        worker_options = ray.get(pool.actors[0].describe.remote())["options"]
        upscale_files(pool, jobs, options)
    assert worker_options == EXPECTED and jobs[0].status == "done", jobs[0].reason
    local = jobs[0].target.with_name("local.png")
    upscale_file(jobs[0], Upscaler.load(calibrated, EXPECTED), options, target=local)
    assert local.read_bytes() == jobs[0].target.read_bytes()
