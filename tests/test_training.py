"""`lmf train` and `lmf eval` end to end on tiny data: steps, resume, export, evaluation."""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from lmf_cli import models as registry
from lmf_cli.cli import app
from lmf_cli.models.checkpoints import load_weights, read_metadata
from lmf_cli.training.config import TrainConfig, learning_rate
from lmf_cli.training.loop import train
from tests.conftest import DATA


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hr")
    for name in ("t1", "t2"):
        img = Image.open(DATA / "T91" / "HR" / f"{name}.png").convert("RGB")
        img.save(folder / f"{name}.png")
    return folder


def _config(tiny_data, out, steps=4, degrade="none"):
    spec = registry.lmliif_spec(registry.edsr_spec(1, 8), bilinear_skip=True)
    return TrainConfig(spec=spec, data=[str(tiny_data)], out_dir=str(out), steps=steps, batch=2, patch=16,
                       queries=64, lr=1e-3, warmup=2, schedule="cosine", val_every=0, bf16=True, degrade=degrade)


@pytest.mark.parametrize("degrade", ["none", "real"])
def test_resume_continues_bit_for_bit(tiny_data, tmp_path, degrade):
    straight = train(_config(tiny_data, tmp_path / "a", degrade=degrade), log=lambda _: None)
    train(_config(tiny_data, tmp_path / "b", degrade=degrade), max_steps=2, log=lambda _: None)
    resumed = train(_config(tiny_data, tmp_path / "b", degrade=degrade), resume=True, log=lambda _: None)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_the_time_budget_is_the_runs_not_the_sittings(tiny_data, tmp_path):
    """A run resumed with the budget it has already spent takes no step: the budget counts every
    sitting's training time, so an interrupted run keeps its schedule instead of starting a new one."""
    train(_config(tiny_data, tmp_path / "t"), max_steps=2, log=lambda _: None)
    spent = float(read_metadata(tmp_path / "t" / "state.safetensors")["elapsed"])
    steps = []
    train(_config(tiny_data, tmp_path / "t"), resume=True, time_budget=spent, log=lambda _: None,
          on_step=lambda step, loss, dt: steps.append(step))
    assert steps == []
    train(_config(tiny_data, tmp_path / "t"), resume=True, time_budget=spent + 3600, max_steps=1,
          log=lambda _: None, on_step=lambda step, loss, dt: steps.append(step))
    assert steps == [3]


def test_a_stopped_process_does_not_spend_the_time_budget(tiny_data, tmp_path, monkeypatch):
    """A step that stalls (step 9 sleeps 25 times the pace of the steps before it, as a process stopped by
    SIGSTOP) counts at most STALL_FACTOR times the recent median step towards the budget; the others in full."""
    from lmf_cli.training import loop

    real_loss, stamps, stall = loop.batch_loss, [], []

    def stalling_loss(*args, **kwargs):
        stamps.append(time.monotonic())
        if len(stamps) == 9:
            stall.append(25 * (stamps[7] - stamps[3]) / 4)
            time.sleep(stall[0])
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_loss", stalling_loss)
    dts = []
    train(_config(tiny_data, tmp_path / "s", steps=12), log=lambda _: None,
          on_step=lambda step, loss, dt: dts.append(dt))
    spent = float(read_metadata(tmp_path / "s" / "state.safetensors")["elapsed"])
    assert len(dts) == 12 and spent == pytest.approx(sum(dts))  # what on_step sees is what the budget counts
    assert dts[8] <= loop.STALL_FACTOR * statistics.median(dts[:8]) + 1e-9
    assert dts[8] < stall[0] / 2


def test_ema_ships_the_average_of_the_steps_and_resumes_exactly(tiny_data, tmp_path):
    """The exported weights are the average recomputed by hand from each step's live weights;
    the live ones are exported beside them; a resumed run ends with the same average."""
    import lmf_cli.training.loop as loop

    decay, live_per_step, model_ref = 0.5, [], {}

    def record(step, loss, dt):
        live_per_step.append({k: v.detach().clone() for k, v in model_ref["model"].state_dict().items()})

    real_average = loop.WeightAverage

    def spying_average(model, *args):
        model_ref["model"] = model
        return real_average(model, *args)

    loop.WeightAverage = spying_average
    try:
        cfg = _config(tiny_data, tmp_path / "e", steps=4)
        cfg.ema = decay
        torch.manual_seed(cfg.seed)  # as train() does before making the model: the same initial weights
        start = {k: v.clone() for k, v in registry.make(cfg.spec).state_dict().items()}
        shipped = load_file(str(train(cfg, log=lambda _: None, on_step=record)))
    finally:
        loop.WeightAverage = real_average
    expected = {k: v.float() for k, v in start.items()}
    for n, live in enumerate(live_per_step, start=1):
        weight = min(decay, (1 + n) / (10 + n))
        expected = {k: weight * expected[k] + (1 - weight) * live[k].float() for k in expected}
    live_file = load_file(str(tmp_path / "e" / "model-live.safetensors"))
    assert any(not torch.equal(shipped[k], live_file[k]) for k in shipped)
    assert all(torch.allclose(shipped[k], expected[k], atol=1e-6) for k in shipped)

    halves = _config(tiny_data, tmp_path / "h", steps=4)
    halves.ema = decay
    train(halves, max_steps=2, log=lambda _: None)
    resumed = load_file(str(train(halves, resume=True, log=lambda _: None)))
    assert all(torch.equal(shipped[k], resumed[k]) for k in shipped)


def test_resume_refuses_another_degradation(tiny_data, tmp_path):
    train(_config(tiny_data, tmp_path / "r", steps=2), log=lambda _: None)
    with pytest.raises(ValueError, match="--degrade none"):
        train(_config(tiny_data, tmp_path / "r", steps=3, degrade="real"), resume=True, log=lambda _: None)


def test_training_reduces_loss(tiny_data, tmp_path):
    losses = []
    cfg = _config(tiny_data, tmp_path / "c", steps=40)
    train(cfg, log=lambda _: None, on_step=lambda step, loss, dt: losses.append(loss))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_schedules():
    cfg = TrainConfig(spec={}, data=[], out_dir="", steps=600, lr=1e-3)
    assert learning_rate(cfg, 0) == 1e-3 and learning_rate(cfg, 599) == 1e-3 / 32
    cfg = TrainConfig(spec={}, data=[], out_dir="", steps=100, lr=1e-3, warmup=10, schedule="cosine")
    assert learning_rate(cfg, 0) == pytest.approx(1e-4) and learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 99) < 1e-4


def test_evaluation_sets_are_refused(tmp_path):
    cfg = TrainConfig(spec=registry.lmliif_spec(registry.edsr_spec(1, 8)), data=[str(DATA / "Set5" / "HR")],
                      out_dir=str(tmp_path), steps=1)
    with pytest.raises(ValueError, match="evaluation sets"):
        train(cfg, log=lambda _: None)


def test_cli_train_then_eval(tiny_data, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(run), "--encoder", "edsr-1x8", "--data", str(tiny_data),
                                 "--steps", "3", "--batch", "2", "--patch", "16", "--queries", "32",
                                 "--val-every", "0", "--skip"])
    assert result.exit_code == 0, result.output
    assert (run / "model.safetensors").exists() and (run / "train.log").exists()
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    for name in ("baby", "bird"):
        Image.open(DATA / "Set5" / "HR" / f"{name}.png").crop((0, 0, 96, 72)).save(eval_dir / f"{name}.png")
    out_json = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(eval_dir), "--model", str(run / "model.safetensors"),
                                 "--scales", "2,3", "--json", str(out_json), "--device", "cpu", "--record"])
    assert result.exit_code == 0, result.output
    rows = json.loads(out_json.read_text())["results"]
    bicubic = {r["scale"]: r["psnr"] for r in rows if r["method"] == "bicubic"}
    assert set(bicubic) == {2.0, 3.0} and bicubic[2.0] > bicubic[3.0] > 20
    assert all(r["images"] == 2 for r in rows)
    for r in rows:  # each image's PSNR, whose mean is the row's
        assert set(r["per_image"]) == {"baby", "bird"}
        assert sum(r["per_image"].values()) / 2 == pytest.approx(r["psnr"], abs=1e-3)
    card = load_weights(run / "model.safetensors").info
    assert card["eval"]["eval"] == {"2": rows[0]["psnr"], "3": rows[2]["psnr"]}
    assert card["eval_bicubic"]["eval"]["2"] == bicubic[2.0] and card["steps"] == 3


@pytest.mark.parametrize("args, message", [
    (["eval", "{set}", "--scales", "0"], "--scales 0: every factor must be a finite number of at least 1"),
    (["eval", "{set}", "--scales", "2,nan"], "--scales 2,nan: every factor must be a finite number of at least 1"),
    (["eval", "{set}", "--scales", "2,x"], "--scales '2,x' must be numbers separated by commas"),
    (["eval", "{damaged}"], "bad.png: not an image, or a format lmf cannot read"),
    (["benchmark", "--scales", "0.5"], "--scales 0.5: every factor must be a finite number of at least 1"),
    (["benchmark", "--plot", "{out}.txt"], "run.txt: name a .png, .svg or .pdf file"),
    (["train", "{out}", "--data", "{set}", "--schedule", "cosin"], "--schedule 'cosin': choose one of step, cosine"),
    (["train", "{out}", "--data", "{set}", "--val-data", "{out}/none"], "/none: no such folder"),
    (["calibrate", "--images", "0", "--data", "{set}"], "Invalid value for '--images'"),
])
def test_cli_refusals_are_one_line(tiny_data, tmp_path, args, message):
    """Bad values and unreadable images stop a command with one line and exit code 1 (2: typer's own)."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all")
    filled = [a.format(set=tiny_data, damaged=damaged, out=tmp_path / "run") for a in args]
    result = CliRunner().invoke(app, filled)
    assert result.exit_code in (1, 2) and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "train.log").exists()


def test_reports_are_written_whole_or_not_at_all(tiny_data, tmp_path):
    """--json into a place that cannot hold it is one line after the work, and leaves nothing partial."""
    blocked = tmp_path / "taken"
    blocked.mkdir()
    (blocked / "report.json").mkdir()  # a folder where the report would go
    result = CliRunner().invoke(app, ["eval", str(tiny_data), "--model", "lmf-lite", "--scales", "2",
                                      "--no-bicubic", "--json", str(blocked / "report.json")])
    assert result.exit_code == 1 and f"cannot write {blocked / 'report.json'}" in " ".join(result.output.split())
    assert sorted(p.name for p in blocked.iterdir()) == ["report.json"]


def test_init_starts_from_given_weights(tiny_data, tmp_path):
    """Fine-tuning: a run started from trained weights begins where they are, not at random."""
    trained = train(_config(tiny_data, tmp_path / "a", steps=20), log=lambda _: None)
    first_losses = {}
    for name, init in (("random", None), ("init", str(trained))):
        cfg = _config(tiny_data, tmp_path / name)
        cfg.init = init
        losses = []
        train(cfg, max_steps=1, log=lambda _: None, on_step=lambda step, loss, dt, out=losses: out.append(loss))
        first_losses[name] = losses[0]
    assert first_losses["init"] < 0.7 * first_losses["random"]


def test_diif_trains_on_whole_cells_and_resumes(tiny_data, tmp_path):
    """DIIF learns from every pixel of sampled LR cells; its loss falls and resume is exact."""
    spec = registry.diif_spec(registry.edsr_spec(1, 8), head_hidden=[16, 16], tail_hidden=[16, 16], bilinear_skip=True)

    def config(out, steps):
        return TrainConfig(spec=spec, data=[str(tiny_data)], out_dir=str(out), steps=steps, batch=2, patch=16,
                           queries=256, lr=2e-3, warmup=2, schedule="cosine", val_every=0, bf16=False)

    losses = []
    train(config(tmp_path / "d", 30), log=lambda _: None, on_step=lambda step, loss, dt: losses.append(loss))
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    straight = train(config(tmp_path / "a", 4), log=lambda _: None)
    train(config(tmp_path / "b", 4), max_steps=2, log=lambda _: None)
    resumed = train(config(tmp_path / "b", 4), resume=True, log=lambda _: None)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_init_encoder_copies_only_the_encoder(tiny_data, tmp_path):
    donor = train(_config(tiny_data, tmp_path / "donor", steps=2), log=lambda _: None)
    spec = registry.diif_spec(registry.edsr_spec(1, 8), head_hidden=[16, 16], tail_hidden=[16, 16])
    cfg = TrainConfig(spec=spec, data=[str(tiny_data)], out_dir=str(tmp_path / "e"), steps=1, batch=2, patch=16,
                      queries=64, lr=0.0, val_every=0, bf16=False, init_encoder=str(donor))
    out = load_file(str(train(cfg, log=lambda _: None)))
    src = load_file(str(donor))
    encoder_keys = [k for k in out if k.startswith("encoder.")]
    assert encoder_keys and all(torch.equal(out[k], src[k]) for k in encoder_keys)


# --------------------------------------------------------------------------- GPU runs, packs, devices


def test_pack_round_trip(tiny_data, tmp_path):
    """A pack holds the training images losslessly (WebP or raw) with their source folder."""
    from lmf_cli.io.images import list_images, load_rgb
    from lmf_cli.training.data import pack_manifest, read_pack, write_pack

    originals = [load_rgb(p) for p in list_images(tiny_data)]
    for codec in ("webp", "raw"):
        pack = tmp_path / f"{codec}.npz"
        manifest = write_pack(pack, [tiny_data], codec=codec, log=lambda _: None, threads=2)
        assert manifest["bytes"] == pack.stat().st_size
        entries = read_pack(pack)
        assert len(entries) == len(originals)
        assert all(np.array_equal(img, orig) for (img, _), orig in zip(entries, originals, strict=True))
        assert {source for _, source in entries} == {"/".join(tiny_data.resolve().parts[-3:])}
        assert [e["name"] for e in pack_manifest(pack)["images"]] == ["t1.png", "t2.png"]
    smallest = min(min(im.shape[:2]) for im in originals)
    kept = write_pack(tmp_path / "big.npz", [tiny_data], min_side=smallest + 1, log=lambda _: None)
    assert len(kept["images"]) == len(originals) - 1


def test_packs_refuse_evaluation_sets(tiny_data, tmp_path):
    """Evaluation sets stay out of packs, and a pack that names one is refused by the trainer."""
    from lmf_cli.training.data import write_pack

    with pytest.raises(ValueError, match="evaluation sets"):
        write_pack(tmp_path / "set5.npz", [DATA / "Set5" / "HR"], log=lambda _: None)
    result = CliRunner().invoke(app, ["pack-data", str(tmp_path / "set14.npz"), "--data", str(DATA / "Set14" / "HR")])
    assert result.exit_code != 0 and "evaluation sets" in result.output
    pack = tmp_path / "pack.npz"
    write_pack(pack, [tiny_data], log=lambda _: None)
    with np.load(pack) as npz:
        arrays = dict(npz)
    manifest = json.loads(arrays["manifest"].tobytes())
    manifest["images"][1]["source"] = "data/Set5/HR"
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    forged = tmp_path / "forged.npz"
    np.savez(forged, **arrays)
    cfg = _config(tiny_data, tmp_path / "f")
    cfg.data = [str(forged)]
    with pytest.raises(ValueError, match="evaluation sets"):
        train(cfg, log=lambda _: None)


def test_loader_threads_give_the_same_batches_and_resume_exactly(tiny_data, tmp_path):
    """With --loader-threads N every sample has its own seed: any N gives the same batches,
    so a run may resume with another N, bit for bit."""
    from lmf_cli.training.data import PatchSampler

    cfg = _config(tiny_data, tmp_path)
    images = [np.asarray(Image.open(tiny_data / f"{n}.png").convert("RGB")) for n in ("t1", "t2")]
    one, three = PatchSampler(images, cfg, 0, threads=1), PatchSampler(images, cfg, 0, threads=3)
    for _ in range(2):
        a, b = one.batch(), three.batch()
        assert all(torch.equal(a[k], b[k]) for k in a)
    one.close()
    three.close()

    def config(out, threads):
        c = _config(tiny_data, out)
        c.loader_threads = threads
        return c

    straight = train(config(tmp_path / "a", 2), log=lambda _: None)
    train(config(tmp_path / "b", 3), max_steps=2, log=lambda _: None)
    resumed = train(config(tmp_path / "b", 1), resume=True, log=lambda _: None)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gpu_run_path_on_the_cpu(tiny_data, tmp_path, monkeypatch):
    """What scripts/train-gpu runs, on the CPU with a tiny model: a pack as --data, a time
    budget with the schedule fitted to it, checkpoints every few seconds, loader threads;
    then a resume from the saved state."""
    from lmf_cli.training import loop

    monkeypatch.setattr(loop, "FIT_FROM", 1)  # fit after 3 steps, not 30: a loaded CPU may do few in 5 s
    monkeypatch.setattr(loop, "FIT_AT", 3)
    runner = CliRunner()
    pack = tmp_path / "train.npz"
    result = runner.invoke(app, ["pack-data", str(pack), "--data", str(tiny_data)])
    assert result.exit_code == 0, result.output
    assert "2 images" in result.output and pack.stat().st_size < 2 ** 20
    run = tmp_path / "run"
    common = ["--encoder", "edsr-1x8", "--skip", "--data", str(pack), "--device", "cpu", "--batch", "2",
              "--patch", "16", "--queries", "32", "--lr", "1e-3", "--warmup", "5", "--schedule", "cosine",
              "--val-every", "0", "--loader-threads", "2"]
    # a checkpoint every 0.3 s: fitted from three slow first steps on a loaded CPU, the schedule has
    # ended after about 1 s (a 1.2 s interval then saved only the final state)
    result = runner.invoke(app, ["train", str(run), *common, "--steps", "100000", "--time-budget", "5s",
                                 "--fit-schedule", "--save-every", "0.005"])
    assert result.exit_code == 0, result.output
    log = (run / "train.log").read_text()
    assert "loaded 2 images from the pack" in log and "checkpoint: step" in log
    from lmf_cli.models.checkpoints import read_metadata

    steps = int(read_metadata(run / "state.safetensors")["step"])
    assert "schedule fitted to the time budget" in log
    card = load_weights(run / "model.safetensors").info
    assert card["steps"] == steps and 3 < card["recipe"]["steps"] < 100000 and steps <= card["recipe"]["steps"]
    assert card["recipe"]["device"] == "cpu" and card["recipe"]["save_minutes"] == 0.005
    assert card["data"] == [f"train.npz ({'/'.join(tiny_data.resolve().parts[-3:])})"]
    result = runner.invoke(app, ["train", str(run), *common, "--steps", str(steps + 2), "--resume"])
    assert result.exit_code == 0, result.output
    assert load_weights(run / "model.safetensors").info["steps"] == steps + 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_is_refused_without_a_gpu(tiny_data, tmp_path):
    result = CliRunner().invoke(app, ["train", str(tmp_path / "r"), "--data", str(tiny_data), "--device", "cuda",
                                      "--steps", "1"])
    assert result.exit_code != 0 and "no CUDA GPU" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_state_moves_between_cuda_and_cpu(tiny_data, tmp_path):
    """A run saved on the GPU resumes on the CPU and back (the state holds CPU tensors)."""
    cfg = _config(tiny_data, tmp_path / "g", steps=6)
    cfg.device = "cuda"
    train(cfg, max_steps=2, log=lambda _: None)
    cpu = _config(tiny_data, tmp_path / "g", steps=6)
    train(cpu, resume=True, max_steps=2, log=lambda _: None)
    back = _config(tiny_data, tmp_path / "g", steps=6)
    back.device = "cuda"
    weights = train(back, resume=True, log=lambda _: None)
    assert load_weights(weights).info["steps"] == 6
    assert all(t.device.type == "cpu" for t in load_file(str(tmp_path / "g" / "state.safetensors")).values())


def test_the_best_validated_weights_are_kept_beside_the_run(tiny_data, tmp_path):
    """best.safetensors holds the weights of the validation that beat every earlier one on every score."""
    cfg = _config(tiny_data, tmp_path / "v", steps=6)
    cfg.val_every = 2
    scripted = iter([{"x2": 30.0, "x4": 25.0}, {"x2": 31.0, "x4": 24.0}, {"x2": 30.5, "x4": 26.0}])
    saved = []

    def validate(model):
        scores = next(scripted)
        saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return scores

    train(cfg, log=lambda _: None, validate=validate)
    best = load_file(str(tmp_path / "v" / "best.safetensors"))
    first = saved[0]  # step 4 was better at x2 but worse at x4, step 6 worse at x2: the first stays the best
    assert all(torch.allclose(best[k], first[k].float()) for k in best)


def test_cosine_restarts_return_to_the_peak_at_each_cycle():
    cfg = TrainConfig(spec={}, data=[], out_dir="", steps=110, lr=1e-3, warmup=10, schedule="cosine", restarts=1)
    assert learning_rate(cfg, 10) == pytest.approx(1e-3) and learning_rate(cfg, 60) == pytest.approx(1e-3)
    assert learning_rate(cfg, 59) < 1e-4 and learning_rate(cfg, 109) < 1e-4
    assert learning_rate(cfg, 35) == pytest.approx(learning_rate(cfg, 85))
    assert learning_rate(cfg, 200) == pytest.approx(2e-5)  # past the run: the floor, not a new cycle


def test_accumulated_batches_make_the_step_of_one_larger_batch(tiny_data, tmp_path):
    """Two batches of 2 summed into one step = one batch of the same 4 samples (the stream draws
    them in the same order)."""
    def one_step(out, batch, accumulate):
        cfg = _config(tiny_data, tmp_path / out, steps=1)
        cfg.batch, cfg.accumulate, cfg.warmup, cfg.bf16 = batch, accumulate, 0, False
        return load_file(str(train(cfg, log=lambda _: None)))

    big, summed, small = one_step("big", 4, 1), one_step("summed", 2, 2), one_step("small", 2, 1)
    assert all(torch.allclose(big[k], summed[k], atol=1e-6) for k in big)
    assert not all(torch.allclose(big[k], small[k], atol=1e-6) for k in big)


def test_fft_loss_is_l1_plus_the_spectrum_distance_of_square_windows(tiny_data):
    """The sampler's window is a contiguous square of the HR crop in row order; the loss adds
    FFT_WEIGHT x the mean modulus of the orthonormal spectra's difference (numpy's FFT)."""
    from lmf_cli.training.config import FFT_WEIGHT
    from lmf_cli.training.data import PatchSampler, load_training_images
    from lmf_cli.training.loop import batch_loss

    cfg = _config(tiny_data, "", steps=1)
    cfg.loss, cfg.queries = "l1+fft", 100
    sampler = PatchSampler(load_training_images(cfg.data, lambda _: None), cfg, seed=3)
    batch = sampler.batch()
    coord = batch["coord"][0].view(10, 10, 2)
    assert torch.allclose(coord[1:, :, 0] - coord[:-1, :, 0], coord[1, 0, 0] - coord[0, 0, 0])
    assert torch.allclose(coord[:, 1:, 1] - coord[:, :-1, 1], coord[0, 1, 1] - coord[0, 0, 1])
    model = registry.make(cfg.spec).eval()
    with torch.no_grad():
        pred = model(batch["inp"], batch["coord"], batch["cell"])
        got = batch_loss(model, batch, "l1+fft").item()
    p, g = (t.double().numpy().reshape(2, 10, 10, 3) for t in (pred, batch["gt"]))
    spectrum = np.abs(np.fft.rfft2(p, axes=(1, 2), norm="ortho") - np.fft.rfft2(g, axes=(1, 2), norm="ortho"))
    assert got == pytest.approx(np.abs(p - g).mean() + FFT_WEIGHT * spectrum.mean(), rel=1e-5)
    cfg.queries = 99
    with pytest.raises(ValueError, match="square"):
        PatchSampler(sampler.images, cfg, seed=3)


@pytest.mark.parametrize("args, message", [
    (["--loss", "l2"], "--loss 'l2'"),
    (["--restarts", "1"], "--restarts"),
    (["--accumulate", "0"], "--accumulate"),
    (["--scale-min", "4"], "--scale-min"),
])
def test_cli_refuses_bad_levers_in_one_line(tiny_data, tmp_path, args, message):
    result = CliRunner().invoke(app, ["train", str(tmp_path / "run"), "--data", str(tiny_data), "--steps", "1",
                                      "--val-every", "0", *args])
    assert result.exit_code != 0
    assert message in result.output and not (tmp_path / "run" / "state.safetensors").exists()


@pytest.mark.parametrize("bf16", [True, False])
def test_bf16_training_runs_the_latent_mlp_in_bf16_and_exports_float32(tiny_data, tmp_path, monkeypatch, bf16):
    """With bf16 the latent MLP trains under autocast beside the encoder (a sixth off a step on CPUs with
    AVX-512 BF16); the exported weights are float32 either way."""
    from dataclasses import replace

    from lmf_cli.models.lmf import LMLIIF

    seen, latents = [], LMLIIF.latents

    def recording(self, feat, rel_cell):
        seen.append(torch.is_autocast_enabled("cpu"))
        return latents(self, feat, rel_cell)

    monkeypatch.setattr(LMLIIF, "latents", recording)
    weights = train(replace(_config(tiny_data, tmp_path / "r", steps=2), bf16=bf16), log=lambda _: None)
    assert seen and set(seen) == {bf16}
    assert all(t.dtype == torch.float32 for t in load_file(str(weights)).values() if t.is_floating_point())


def test_average_weights_mixes_two_points_of_one_training_line(weights, tmp_path):
    """scripts/average-weights: share x NEW + (1 - share) x OLD for every float tensor, NEW's spec and
    CMSR tables kept; two architectures are refused in one line."""
    import subprocess
    import sys
    from pathlib import Path

    from lmf_cli.models.checkpoints import save_weights

    script = Path(__file__).parents[1] / "scripts" / "average-weights"
    old = load_weights(weights)
    new = load_weights(weights)
    with torch.no_grad():
        for p in new.model.parameters():
            p.add_(torch.randn_like(p))
    save_weights(tmp_path / "new.safetensors", new.model, new.spec, {"steps": 5}, {"2e-05": {"8.0": {"2.0": 0.1}}})
    out = tmp_path / "avg.safetensors"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "new.safetensors"), str(weights),
                           "--new-share", "0.75", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mixed = load_weights(out)
    a, b, m = old.model.state_dict(), new.model.state_dict(), mixed.model.state_dict()
    assert all(torch.allclose(m[k], 0.75 * b[k] + 0.25 * a[k], atol=1e-6) for k in a if a[k].is_floating_point())
    assert mixed.spec == new.spec and mixed.cmsr_tables == {"2e-05": {"8.0": {"2.0": 0.1}}}
    assert mixed.info["averaged"] == {"new_share": 0.75, "old": str(weights)} and mixed.info["steps"] == 5
    other = subprocess.run([sys.executable, str(script), str(out), "weights/lmf-lite.safetensors", "-o",
                            str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).parents[1])
    assert other.returncode == 1 and "are different architectures" in other.stderr
    assert not (tmp_path / "x.safetensors").exists()
