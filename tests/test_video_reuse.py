"""Video: what did not change is not computed again, and the frames are the bytes of computing everything.

Every family (LM-LIIF, LM-LTE, LIIF, LTE, DIIF), with CMSR, small tiles, batches and a non-integer
scale; the boxes cover every pixel within the margin of a change; a still clip is reused after each
segment's first frame, a pan not at all, and the share reported is the share copied; `lmf video`
with and without --no-reuse, and a resumed run, give the same file."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lmf_cli import EngineOptions, Upscaler
from lmf_cli.cli import app
from lmf_cli.engine.reuse import Previous, boxes_to_render, changed_pixels, output_boxes
from lmf_cli.errors import InputError
from lmf_cli.jobs.video import upscale_video
from lmf_cli.models.checkpoints import load_weights, save_weights
from tests.conftest import SMALL_EDSR, official_checkpoint

H, W = 40, 48


def clip(photo: np.ndarray) -> np.ndarray:
    """Every case in six frames: a small change, a repeat, a change far off, a pan, a corner pixel."""
    base = photo[:H, :W]
    moved = base.copy()
    moved[5:8, 6:10] = 255 - moved[5:8, 6:10]
    far = base.copy()
    far[30:34, 38:44] = 0
    pan = photo[1:H + 1, 1:W + 1] if photo.shape[0] > H else np.roll(base, 1, axis=(0, 1))
    corner = pan.copy()
    corner[0, 0] = 255 - corner[0, 0]
    return np.stack([base, moved, moved, far, pan, corner])


@pytest.fixture(scope="module")
def families(official_files, weights, tmp_path_factory) -> dict[str, Path]:
    """One small checkpoint per family; the LM ones with a CMSR table that sends every latent to x2 at x8."""
    folder = tmp_path_factory.mktemp("families")
    paths = {"liif": official_files["liif"], "lte": official_files["lte"]}
    for family, source in (("lmliif", weights), ("lmlte", official_files["lmlte"])):
        loaded = load_weights(source)
        paths[family] = folder / f"{family}.safetensors"
        save_weights(paths[family], loaded.model, loaded.spec, {"steps": 0}, cmsr_tables={"2e-05": {"8": {"2": 1e9}}})
    paths["diif"] = folder / "diif.pth"
    torch.save(official_checkpoint("diif", SMALL_EDSR), paths["diif"])
    return paths


@pytest.mark.parametrize(("family", "scale", "options"), [
    *[pytest.param(family, 2.5, EngineOptions("cpu", "fp32", tile=16), id=f"{family} x2.5 tiles of 16")
      for family in ("lmliif", "lmlte", "liif", "lte", "diif")],
    *[pytest.param(family, 8, EngineOptions("cpu", "fp32", cmsr="balanced"), id=f"{family} x8 cmsr")
      for family in ("lmliif", "lmlte")]])
def test_reused_frames_are_the_bytes_of_computing_everything(families, butterfly, family, scale, options):
    """Frames one at a time, then three at once, then two (a batch renders its changed frames together)."""
    up = Upscaler.load(families[family], options)
    frames = clip(butterfly)
    previous, copied = None, 0
    for start, stop in ((0, 1), (1, 4), (4, 6)):
        chunk = frames[start:stop]
        outputs, count = up.upscale_sequence(chunk, scale, previous=previous)
        assert np.array_equal(outputs, up.upscale_batch(chunk, scale)), f"frames {start} to {stop - 1}"
        previous, copied = Previous(chunk[-1], outputs[-1]), copied + count
    assert copied > 0


def test_the_boxes_hold_every_pixel_within_the_margin_of_a_change():
    rng = np.random.default_rng(0)
    for margin in (0, 3, 9, 21):
        for density in (1e-4, 1e-3, 1e-2):
            changed = rng.random((90, 160)) < density
            covered = np.zeros_like(changed)
            for r0, r1, c0, c1 in boxes_to_render(changed, margin):
                assert 0 <= r0 < r1 <= 90 and 0 <= c0 < c1 <= 160
                covered[r0:r1, c0:c1] = True
            near = cv2.dilate(changed.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)) > 0
            assert not (near & ~covered).any()
    assert boxes_to_render(np.zeros((90, 160), bool), 9) == []


def test_one_changed_pixel_recomputes_its_margin_only(tiny, butterfly):
    """The share reported is what was copied: one pixel changed renders the output of the box of the
    margin around it, no more (exact at x2: two output pixels per input pixel)."""
    margin = tiny.capabilities.tile_margin
    first = butterfly[:H, :W].copy()
    second = first.copy()
    second[20, 30] = 255 - second[20, 30]
    assert boxes_to_render(changed_pixels(first, second), margin) == [(20 - margin, 21 + margin, 30 - margin,
                                                                        min(W, 31 + margin))]
    out, copied = tiny.upscale_sequence(np.stack([first, second]), 2)
    computed = (2 * (2 * margin + 1)) * (2 * (min(W, 31 + margin) - 30 + margin))
    assert copied == 2 * H * 2 * W - computed  # the first frame is computed whole: nothing before it
    assert output_boxes([(0, 3, 0, 5)], (H, W), (2 * H, 2 * W)) == [(0, 6, 0, 10)]
    assert np.array_equal(out, tiny.upscale_batch(np.stack([first, second]), 2))
    _, still = tiny.upscale_sequence(second[None], 2, previous=Previous(second, out[1]))
    assert still == 2 * H * 2 * W


def test_frames_that_do_not_fit_the_previous_are_refused(tiny, butterfly):
    frame = butterfly[:H, :W]
    with pytest.raises(InputError, match="N x H x W x 3"):
        tiny.upscale_sequence(frame[None, ..., 0], 2)
    out = tiny.upscale_batch(frame[None], 2)[0]
    with pytest.raises(InputError, match="do not match"):
        tiny.upscale_sequence(frame[None, :20], 2, previous=Previous(frame, out))


def write_clip(path: Path, frames: list[np.ndarray]) -> Path:
    """Lossless FFV1 frames at 24 fps (identical frames decode identical, as skip blocks do)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=24)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv444p"
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24").reformat(format="yuv444p")
            frame.pts, frame.time_base = i, Fraction(1, 24)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


@pytest.fixture(scope="module")
def tiny(official_files) -> Upscaler:
    return Upscaler.load(official_files["lmliif"], EngineOptions("cpu", "fp32"))


@pytest.fixture(scope="module")
def videos(butterfly, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reuse")
    big = cv2.resize(butterfly, (W + 8, H + 8))
    return {"still": write_clip(folder / "still.mkv", [big[:H, :W]] * 7),
            "pan": write_clip(folder / "pan.mkv", [big[k:k + H, k:k + W] for k in range(7)])}


def test_a_still_clip_is_copied_after_each_segments_first_frame_and_a_pan_never(tiny, videos, tmp_path):
    """One segment: all but the first frame copied; segments of 3: frames 0, 3 and 6 are computed (each
    segment starts with nothing to copy)."""
    one = upscale_video(videos["still"], tmp_path / "one.mkv", tiny, 2.0, codec="ffv1")
    assert one.reused == pytest.approx(6 / 7)
    still = upscale_video(videos["still"], tmp_path / "still.mkv", tiny, 2.0, codec="ffv1", segment_frames=3)
    assert still.reused == pytest.approx(4 / 7)
    full = upscale_video(videos["still"], tmp_path / "full.mkv", tiny, 2.0, codec="ffv1", segment_frames=3,
                         reuse=False)
    assert full.reused == 0
    assert all(np.array_equal(a, b) for a, b in zip(decoded(tmp_path / "still.mkv"), decoded(tmp_path / "full.mkv"),
                                                    strict=True))
    pan = upscale_video(videos["pan"], tmp_path / "pan.mkv", tiny, 2.0, codec="ffv1", segment_frames=3)
    assert pan.reused == 0


def test_cli_reports_the_share_and_no_reuse_gives_the_same_file(official_files, videos, tmp_path):
    runner = CliRunner()
    args = ["video", str(videos["still"]), "--scale", "2", "--codec", "ffv1", "--model", str(official_files["lmliif"]),
            "--device", "cpu", "--segment-frames", "4"]
    reused = runner.invoke(app, [*args, "-o", str(tmp_path / "a.mkv"), "--json"])
    assert reused.exit_code == 0, reused.output
    assert "71.4% of the frame area reused" in reused.output  # 5 of 7 frames: segments start at 0 and 4
    assert json.loads(reused.output.strip().splitlines()[-1])["reused"] == pytest.approx(5 / 7, abs=1e-4)
    full = runner.invoke(app, [*args, "-o", str(tmp_path / "b.mkv"), "--no-reuse"])
    assert full.exit_code == 0, full.output
    assert "reused" not in full.output
    assert all(np.array_equal(a, b) for a, b in zip(decoded(tmp_path / "a.mkv"), decoded(tmp_path / "b.mkv"),
                                                    strict=True))


def test_an_interrupted_run_resumes_to_the_file_of_computing_everything(tiny, videos, tmp_path):
    straight = tmp_path / "straight.mkv"
    upscale_video(videos["still"], straight, tiny, 2.0, codec="ffv1", segment_frames=3, reuse=False)
    dst = tmp_path / "resumed.mkv"

    def interrupt(progress):
        if progress.segments >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upscale_video(videos["still"], dst, tiny, 2.0, codec="ffv1", segment_frames=3, progress=interrupt)
    result = upscale_video(videos["still"], dst, tiny, 2.0, codec="ffv1", segment_frames=3, resume=True)
    assert result.resumed_frames >= 3
    assert all(np.array_equal(a, b) for a, b in zip(decoded(dst), decoded(straight), strict=True))


def test_benchmark_video_times_the_clips_with_and_without_reuse(weights, tmp_path):
    result = CliRunner().invoke(app, ["benchmark", "--video", "--quick", "--model", str(weights), "--device", "cpu",
                                      "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    rows = {row["clip"]: row for row in json.loads((tmp_path / "v.json").read_text())["video"]}
    assert list(rows) == ["screen recording", "animation (twos)", "camera pan", "screen recording, H.264 CRF 18"]
    assert all(row["identical"] and row["scale"] == 2 and row["frames"] == 3 for row in rows.values())
    assert rows["screen recording"]["reused"] > 0.3 and rows["camera pan"]["reused"] == 0
    assert rows["animation (twos)"]["reused"] == pytest.approx(2 / 3)  # frames 1 and 3 repeat 0 and 2
    assert "speed-up" in result.output
