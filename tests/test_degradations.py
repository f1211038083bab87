"""Degradations: each operation does what its name says, measured on real pixels, and seeds reproduce."""

from __future__ import annotations

import numpy as np
import pytest

from lmf_cli.imaging import degradations as dg


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0 ** 2 / np.mean((a.astype(float) - b.astype(float)) ** 2))


@pytest.fixture(scope="module")
def lr(butterfly) -> np.ndarray:
    return butterfly[:, :46]  # 40 x 46: even height, even width, real texture


def test_gaussian_noise_has_the_asked_sigma():
    flat = np.full((200, 200, 3), 128, np.uint8)
    rng = np.random.default_rng(1)
    colour = dg.gaussian_noise(flat, 5.0, gray=False, rng=rng).astype(float) - 128
    gray = dg.gaussian_noise(flat, 5.0, gray=True, rng=rng).astype(float) - 128
    assert abs(colour.std() - 5) < 0.2 and abs(gray.std() - 5) < 0.2
    assert np.array_equal(gray[..., 0], gray[..., 2]) and not np.array_equal(colour[..., 0], colour[..., 2])


def test_poisson_noise_grows_with_brightness():
    rng = np.random.default_rng(2)
    dark, bright = np.full((200, 200, 3), 30, np.uint8), np.full((200, 200, 3), 220, np.uint8)
    s_dark = (dg.poisson_noise(dark, 1.0, False, rng).astype(float) - 30).std()
    s_bright = (dg.poisson_noise(bright, 1.0, False, rng).astype(float) - 220).std()
    # variance ~ value: std ratio ~ sqrt(220 / 30) = 2.7
    assert 2.2 < s_bright / s_dark < 3.2


def test_jpeg_quality_orders_the_damage(lr):
    q95, q75, q40 = (_psnr(dg.jpeg(lr, q), lr) for q in (95, 75, 40))
    assert q95 > q75 > q40 > 20


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_video_round_trip_keeps_size_and_crf_orders_the_damage(lr, codec):
    odd = lr[:19, :45]  # odd, and under x265's 32-pixel minimum
    fine, coarse = dg.video(odd, codec, 10), dg.video(odd, codec, 40)
    assert fine.shape == coarse.shape == odd.shape and fine.dtype == np.uint8
    assert _psnr(fine, odd) > _psnr(coarse, odd) + 3


def test_blur_kernels():
    g = dg.gaussian_kernel(1.0, 3.0, 0.0, 19)
    assert abs(g.sum() - 1) < 1e-9 and g[9].sum() > g[:, 9].sum()  # wider along x than along y
    rotated = dg.gaussian_kernel(1.0, 3.0, np.pi / 2, 19)
    assert np.allclose(rotated, g.T, atol=1e-9)
    sinc = dg.sinc_kernel(np.pi / 2, 21)
    assert abs(sinc.sum() - 1) < 1e-9 and sinc.min() < 0  # ringing lobes
    # a circular low-pass: the response at the cut-off frequency's double is small
    spectrum = np.abs(np.fft.fft2(sinc, (64, 64)))
    assert spectrum[0, 0] > 0.99 and spectrum[0, 24] < 0.15


def test_training_without_a_preset_is_the_clean_protocol(butterfly):
    hr = butterfly[:, :40]
    out = dg.degrade_for_training(hr, (10, 10), None, np.random.default_rng(0))
    assert np.array_equal(out, dg.resize(hr, (10, 10), "bicubic"))


def test_training_chains_reproduce_from_the_seed_and_vary(butterfly):
    hr = butterfly[:, :40]
    preset = dg.training_preset("real")
    first = [dg.degrade_for_training(hr, (20, 20), preset, np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(first[0], first[1])
    rng = np.random.default_rng(3)
    clean = dg.resize(hr, (20, 20), "bicubic")
    outs = [dg.degrade_for_training(hr, (20, 20), preset, rng) for _ in range(120)]
    same = sum(np.array_equal(o, clean) for o in outs)
    assert 25 <= same <= 65  # about a third stays clean (plus chains that change nothing)
    assert len({o.tobytes() for o in outs}) > 55
    with pytest.raises(ValueError, match="choose one of"):
        dg.training_preset("heavy")


def test_clean_video_is_clean_but_for_one_video_frame_in_ten(butterfly, monkeypatch):
    codecs: list[tuple[str, int]] = []
    monkeypatch.setattr(dg, "video", lambda img, codec, crf: codecs.append((codec, crf)) or img[::-1].copy())
    hr = butterfly[:, :40]
    clean = dg.resize(hr, (20, 20), "bicubic")
    rng = np.random.default_rng(11)
    outs = [dg.degrade_for_training(hr, (20, 20), dg.training_preset("clean-video"), rng) for _ in range(400)]
    coded = [o for o in outs if not np.array_equal(o, clean)]
    assert len(coded) == len(codecs) and 20 <= len(codecs) <= 60  # about one in ten, each a video frame
    assert all(np.array_equal(o, clean[::-1]) for o in coded)  # the plain bicubic LR, then the codec only
    assert {c for c, _ in codecs} == {"h264", "h265"} and all(18 <= crf <= 35 for _, crf in codecs)


def test_eval_chains_parse_and_apply_in_order(lr):
    chain = dg.parse_degradation("noise:5+jpeg:75")
    assert chain.name == "noise:5+jpeg:75"
    expected = dg.jpeg(dg.gaussian_noise(lr, 5, False, np.random.default_rng(0)), 75)
    assert np.array_equal(chain(lr, seed=0), expected)
    assert np.array_equal(chain(lr, seed=0), chain(lr, seed=0))


@pytest.mark.parametrize(("text", "message"), [("jpeg:0", "within 1..100"), ("foo:3", "unknown degradation"),
                                               ("jpeg", "give a number"), ("noise:-1", "above 0"),
                                               ("h264:60", "within 0..51")])
def test_eval_chain_errors(text, message):
    with pytest.raises(ValueError, match=message):
        dg.parse_degradation(text)


def test_eval_on_degraded_inputs_records_beside_the_clean_card(official_files, tmp_path, butterfly):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from lmf_cli.cli import app
    from lmf_cli.models.checkpoints import load_weights, save_weights

    loaded = load_weights(official_files["lmliif"])
    weights = tmp_path / "tiny.safetensors"
    save_weights(weights, loaded.model, loaded.spec, {"eval": {"Set5": {"2": 30.0}}})
    folder = tmp_path / "Mini" / "HR"
    folder.mkdir(parents=True)
    Image.fromarray(butterfly).save(folder / "b.png")
    Image.fromarray(butterfly[::-1, ::-1]).save(folder / "c.png")
    runner = CliRunner()
    runs = {}
    for name, extra in (("clean", []), ("jpeg", ["--degrade", "jpeg:40"]), ("again", ["--degrade", "jpeg:40"])):
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["eval", str(folder), "--model", str(weights), "--scales", "2", "--device", "cpu",
                                     "--json", str(out), *extra, *(["--record"] if name == "jpeg" else [])])
        assert result.exit_code == 0, result.output
        runs[name] = {r["method"]: r["psnr"] for r in json.loads(out.read_text())["results"]}
    assert "jpeg:40" in result.output and json.loads(out.read_text())["degradation"] == "jpeg:40"
    assert runs["jpeg"]["bicubic"] < runs["clean"]["bicubic"] - 0.5  # the degradation reached both methods
    assert runs["jpeg"] == runs["again"]  # the same degraded inputs every run
    info = load_weights(weights).info
    assert info["eval"] == {"Set5": {"2": 30.0}}  # the clean card is untouched
    assert info["eval_degraded"]["jpeg:40"]["Mini"]["2"] == runs["jpeg"]["tiny"]
    assert info["eval_bicubic_degraded"]["jpeg:40"]["Mini"]["2"] == runs["jpeg"]["bicubic"]
    bad = runner.invoke(app, ["eval", str(folder), "--model", str(weights), "--degrade", "jpg:40"])
    assert bad.exit_code == 1 and "unknown degradation" in bad.output


def test_half_the_real_jpeg_draws_come_from_the_common_qualities(butterfly, monkeypatch):
    qualities: list[int] = []
    monkeypatch.setattr(dg, "jpeg", lambda img, quality: qualities.append(quality) or img)
    preset = dg.training_preset("real")
    rng = np.random.default_rng(5)
    for _ in range(400):
        dg.degrade_for_training(butterfly[:, :40], (20, 20), preset, rng)
    low, high = preset.jpeg_common_quality
    common = sum(low <= q <= high for q in qualities) / len(qualities)
    uniform_only = (high - low + 1) / (preset.jpeg_quality[1] - preset.jpeg_quality[0] + 1)
    # half from the common range, and the other half lands there at the uniform rate
    assert common == pytest.approx(0.5 + 0.5 * uniform_only, abs=0.08)
    assert min(qualities) < low and max(qualities) > high


def test_real_video_draws_video_frames_as_often_as_jpeg_files(butterfly, monkeypatch):
    drawn: list[str] = []
    monkeypatch.setattr(dg, "video", lambda img, codec, crf: drawn.append("video") or img)
    monkeypatch.setattr(dg, "jpeg", lambda img, quality: drawn.append("jpeg") or img)
    rng = np.random.default_rng(5)
    hr = butterfly[:, :40]
    counts = {}
    for name in ("real", "real-video"):
        drawn.clear()
        for _ in range(600):
            dg.degrade_for_training(hr, (20, 20), dg.training_preset(name), rng)
        counts[name] = (drawn.count("video"), drawn.count("jpeg"))
    (video, jpeg), (video_more, jpeg_fewer) = counts["real"], counts["real-video"]
    # 600 patches, 65% degraded: real draws video in 15% of them, real-video in 40%
    assert 30 <= video <= 90 and 110 <= video_more <= 200 and jpeg_fewer < jpeg


def test_real_jpeg_draws_jpeg_only_patches_twice_as_often(butterfly, monkeypatch):
    """A patch that is a bicubic resize saved as JPEG and nothing else: about 10% of `real`'s, 19% of
    `real-jpeg`'s, with the same clean share."""
    steps: list[str] = []
    monkeypatch.setattr(dg, "jpeg", lambda img, quality: steps.append("jpeg") or img)
    monkeypatch.setattr(dg, "video", lambda img, codec, crf: steps.append("video") or img)
    monkeypatch.setattr(dg, "gaussian_noise", lambda img, *a: steps.append("noise") or img)
    monkeypatch.setattr(dg, "poisson_noise", lambda img, *a: steps.append("noise") or img)
    monkeypatch.setattr(dg, "blur", lambda img, kernel: steps.append("blur") or img)
    real_resize = dg.resize
    monkeypatch.setattr(dg, "resize", lambda img, hw, kernel: steps.append(kernel) or real_resize(img, hw, kernel))
    rng = np.random.default_rng(7)
    hr = butterfly[:, :40]
    shares = {}
    for name in ("real", "real-jpeg"):
        kinds = []
        for _ in range(1500):
            steps.clear()
            dg.degrade_for_training(hr, (20, 20), dg.training_preset(name), rng)
            kinds.append(tuple(steps))
        shares[name] = {kind: kinds.count(kind) / len(kinds) for kind in (("bicubic", "jpeg"), ("bicubic",))}
    assert shares["real"][("bicubic", "jpeg")] == pytest.approx(0.10, abs=0.03)
    assert shares["real-jpeg"][("bicubic", "jpeg")] == pytest.approx(0.19, abs=0.03)
    assert shares["real"][("bicubic",)] == pytest.approx(shares["real-jpeg"][("bicubic",)], abs=0.05)
