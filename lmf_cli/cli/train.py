"""`lmf train`, `lmf pack-data` and `lmf calibrate`: options to a TrainConfig, a pack of training
images or a calibration, progress and logs."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lmf_cli.cli.common import checked, console, data_sets, fail, open_upscaler, stdout, write_file
from lmf_cli.errors import LmfError
from lmf_cli.options import EngineOptions

if TYPE_CHECKING:
    from lmf_cli.models.base import ImplicitSR


def _duration(text: str | None) -> float | None:
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        fail(f"--time-budget {text!r} must look like 90s, 30m or 2h")
    return None


def train(
    out_dir: Path = typer.Argument(..., help="Run folder: state, log and exported weights."),
    arch: str = typer.Option("lmliif", "--arch", help="lmliif, lmlte, liif, lte or diif."),
    encoder: str = typer.Option("edsr-baseline", "--encoder", help="edsr-baseline, rdn, or edsr-RxF (blocks x feats)."),
    data: list[Path] = typer.Option(None, "--data", help="HR image folders or packs (.npz from `lmf pack-data`); "
                                    "default: T91, BSD200, BSDS500test."),
    steps: int = typer.Option(20000, "--steps", help="Total steps of the run (the schedule spans these)."),
    batch: int = typer.Option(16, "--batch"),
    patch: int = typer.Option(48, "--patch", help="LR patch side."),
    queries: int = typer.Option(2304, "--queries", help="HR pixels sampled per patch."),
    lr: float = typer.Option(1e-4, "--lr"),
    warmup: int = typer.Option(0, "--warmup", help="Linear warm-up steps."),
    schedule: str = typer.Option("step", "--schedule", help="step (official halvings) or cosine."),
    restarts: int = typer.Option(0, "--restarts", help="With --schedule cosine: restart it from the peak this "
                                 "many times (equal cycles)."),
    loss: str = typer.Option("l1", "--loss", help="l1 (official), or l1+fft: L1 plus the L1 of the spectra of "
                             "square query windows (sharper detail)."),
    scale_min: float = typer.Option(1.0, "--scale-min", help="Smallest training scale (scales are drawn "
                                    "uniformly up to 4)."),
    accumulate: int = typer.Option(1, "--accumulate", help="Sum the gradients of this many batches per step "
                                   "(a larger batch in the same memory)."),
    skip: bool = typer.Option(False, "--skip/--no-skip", help="LM-LIIF, DIIF: add a bilinear upsample of the input."),
    latent_hidden: int = typer.Option(208, "--latent-hidden", help="LM-LIIF: width of the latent MLP's hidden layer."),
    render_depth: int = typer.Option(6, "--render-depth", help="LM-LIIF: modulated hidden layers of the render MLP."),
    bf16: bool | None = typer.Option(None, "--bf16/--fp32", help="Encoder and latent MLP in bfloat16 autocast "
                                     "(default: bf16 where the CPU has AMX or AVX-512 BF16, else fp32)."),
    degrade: str = typer.Option("none", "--degrade", help="LR degradations: none (clean bicubic), light "
                                "(web/phone JPEGs), real (JPEG q30+, noise, blur, H.264/H.265), real-video (real, "
                                "video frames as often as JPEGs), real-jpeg (real, nearly twice the JPEG-only patches) "
                                "or clean-video (clean, one patch in ten "
                                "an H.264/H.265 frame)."),
    val_every: int = typer.Option(500, "--val-every", help="Validate on Set5 x2/x3/x4 every N steps (0: never)."),
    val_data: Path | None = typer.Option(None, "--val-data", help="Validation HR folder (default Set5)."),
    time_budget: str | None = typer.Option(None, "--time-budget", help="Stop when the run has trained this long, "
                                           "e.g. 2h (over every sitting: a resumed run keeps its schedule)."),
    fit_schedule: bool = typer.Option(False, "--fit-schedule", help="With --time-budget: set --steps so the "
                                      "schedule ends with the budget (from the measured s/step)."),
    save_every: float = typer.Option(5.0, "--save-every", help="Save the resumable state every this many minutes."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA where available, else the CPU), cpu, cuda, "
                               "cuda:N or mps."),
    loader_threads: int = typer.Option(0, "--loader-threads", help="0: batches from one stream on one thread "
                                       "(as always); N: one seed per sample, made on N threads (feeds a GPU)."),
    ema: float = typer.Option(0.0, "--ema", help="Validate and ship an exponential moving average of the weights "
                              "with this decay, e.g. 0.999 (0: off); the live weights go to model-live.safetensors."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many more steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in OUT_DIR."),
    seed: int = typer.Option(0, "--seed"),
    export: Path | None = typer.Option(None, "--export", help="Also copy the final weights here."),
    init_encoder: str | None = typer.Option(None, "--init-encoder", help="Start the encoder from these weights' "
                                            "encoder (same encoder architecture), e.g. DIIF on lmf-edsr's."),
    init: str | None = typer.Option(None, "--init", help="Start from these weights (a model name or file); "
                                    "the architecture is theirs and --arch/--encoder/... are ignored."),
) -> None:
    """Train a model with the official recipe (resumable; Ctrl-C saves and stops)."""
    from lmf_cli import models as registry
    from lmf_cli.evaluation.protocol import evaluate, model_method
    from lmf_cli.imaging.degradations import PRESETS
    from lmf_cli.io.images import list_images
    from lmf_cli.training.config import LOSSES, SCHEDULES, TrainConfig
    from lmf_cli.training.data import DEFAULT_TRAIN_SETS
    from lmf_cli.training.loop import resolve_device
    from lmf_cli.training.loop import train as run_training

    if arch not in registry.ARCHITECTURES:
        fail(f"--arch {arch!r}: choose one of {', '.join(registry.ARCHITECTURES)}")
    if degrade not in PRESETS:
        fail(f"--degrade {degrade!r}: choose one of {', '.join(PRESETS)}")
    enc = _encoder_spec(encoder)
    if save_every <= 0:
        fail("--save-every must be a positive number of minutes")
    if loader_threads < 0:
        fail("--loader-threads must be 0 or more")
    if not 0 <= ema < 1:
        fail("--ema must be 0 (off) or a decay in (0, 1), e.g. 0.999")
    if loss not in LOSSES:
        fail(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")
    if schedule not in SCHEDULES:
        fail(f"--schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if val_data is not None and not val_data.is_dir():
        fail(f"--val-data {val_data}: no such folder")
    if restarts < 0 or (restarts and schedule != "cosine"):
        fail("--restarts must be 0 or more, and needs --schedule cosine")
    if accumulate < 1:
        fail("--accumulate must be 1 or more")
    if not 1.0 <= scale_min < 4.0:
        fail("--scale-min must be in [1, 4)")
    if fit_schedule and time_budget is None:
        fail("--fit-schedule needs --time-budget")
    try:
        torch_device = resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        fail(f"--device {device!r}: {exc}")
    if bf16 is None:
        from lmf_cli.hardware import fast_bf16

        bf16 = fast_bf16(torch_device)
    init_path = None
    if init:
        from lmf_cli.models.checkpoints import load_weights
        from lmf_cli.models.zoo import resolve

        try:
            init_path = str(resolve(init))
            spec = load_weights(init_path).spec
        except LmfError as exc:
            fail(str(exc))
    elif arch == "lmliif":
        spec = registry.lmliif_spec(enc, skip, latent_hidden, render_depth)
    elif arch == "diif":
        spec = registry.diif_spec(enc, bilinear_skip=skip)
    else:
        spec = registry.ARCHITECTURES[arch](enc)
    folders = [str(p) for p in data] if data else [str(p) for p in data_sets(*DEFAULT_TRAIN_SETS, option="--data")]
    val_folder = val_data or (data_sets("Set5", option="--val-data")[0] if val_every else None)
    cfg = TrainConfig(spec=spec, data=folders, out_dir=str(out_dir), steps=steps, batch=batch, patch=patch,
                      queries=queries, lr=lr, warmup=warmup, schedule=schedule, seed=seed, bf16=bf16,
                      val_every=val_every, val_data=str(val_folder) if val_folder else None, init=init_path,
                      degrade=degrade,
                      init_encoder=str(_resolved(init_encoder)) if init_encoder else None,
                      save_minutes=save_every, device=str(torch_device), loader_threads=loader_threads,
                      ema=ema, restarts=restarts, loss=loss, scale_min=scale_min, accumulate=accumulate)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = (out_dir / "train.log").open("a")

    def log(message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log_file.write(f"{stamp} {message}\n")
        log_file.flush()
        console.print(message, highlight=False)

    val_images = list_images(val_folder) if val_every else []  # the folder was checked above

    def validate(model: ImplicitSR) -> dict[str, float]:
        results = evaluate({"m": model_method(model, str(torch_device))}, val_images, [2, 3, 4], with_ssim=False)
        return {f"{Path(val_folder).parent.name}_x{r.scale:g}": r.psnr for r in results}

    progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]:.2f} s/step"),
                        TimeRemainingColumn(), console=console,
                        disable=not sys.stderr.isatty())
    with progress:
        task = progress.add_task("train", total=steps, loss=0.0, speed=0.0)
        recent: list[float] = []

        def on_step(step: int, loss: float, dt: float) -> None:
            recent.append(dt)
            del recent[:-20]
            progress.update(task, completed=step, total=cfg.steps, loss=loss, speed=sum(recent) / len(recent))
            if step % 50 == 0:
                log_file.write(f"{time.strftime('%H:%M:%S')} step {step} loss {loss:.4f} "
                               f"{sum(recent) / len(recent):.3f} s/step\n")
                log_file.flush()

        try:
            weights = run_training(cfg, resume=resume, max_steps=max_steps, time_budget=_duration(time_budget),
                                   log=log, on_step=on_step, validate=validate if val_images else None,
                                   fit_schedule=fit_schedule)
        except (ValueError, LmfError) as exc:
            fail(str(exc))
    if export is not None:
        import shutil

        write_file(export, lambda tmp: shutil.copyfile(weights, tmp))
        log(f"exported {export}")
    log(f"weights: {weights}")


def pack_data(
    out: Path = typer.Argument(..., help="The pack to write, a .npz file (e.g. .gpu/train.npz)."),
    data: list[Path] = typer.Option(None, "--data", help="HR image folders (default: T91 and BSD200)."),
    codec: str = typer.Option("webp", "--codec", help="webp (lossless WebP bytes) or raw (uint8 arrays, zipped)."),
    min_side: int = typer.Option(0, "--min-side", help="Leave out images whose short side is under this "
                                 "(training skips those under patch x 4: 192 px for --patch 48)."),
    max_mib: float = typer.Option(60.0, "--max-mib", help="Refuse to leave a pack larger than this (MiB)."),
) -> None:
    """Pack training images into one lossless .npz, to carry to a GPU machine (`lmf train --data PACK`)."""
    from lmf_cli.training.data import DEFAULT_PACK_SETS, write_pack

    folders = [str(p) for p in data] if data else [str(p) for p in data_sets(*DEFAULT_PACK_SETS, option="--data")]
    try:
        manifest = write_pack(out, folders, codec=codec, min_side=min_side,
                              log=lambda m: console.print(m, highlight=False))
    except (ValueError, OSError, LmfError) as exc:
        fail(str(exc))
    size = manifest["bytes"] / 2 ** 20
    if size > max_mib:
        out.unlink()
        fail(f"{out}: {size:.1f} MiB is over --max-mib {max_mib:g}; pack fewer folders (it was removed)")
    stdout.print(f"{out}: {len(manifest['images'])} images, {size:.1f} MiB")


def _resolved(name_or_path: str) -> Path:
    from lmf_cli.models.zoo import resolve

    try:
        return resolve(name_or_path)
    except LmfError as exc:
        fail(str(exc))


def _encoder_spec(text: str) -> dict:
    from lmf_cli import models as registry

    if text == "edsr-baseline":
        return registry.edsr_spec()
    if text == "rdn":
        return registry.rdn_spec()
    if text.startswith("edsr-") and "x" in text[5:]:
        blocks, feats = text[5:].split("x")
        return registry.edsr_spec(int(blocks), int(feats))
    fail(f"--encoder {text!r}: use edsr-baseline, rdn, or edsr-BLOCKSxFEATS (e.g. edsr-8x40)")
    return {}


def calibrate(
    weights: str = typer.Argument(..., help="Model name or weights file to calibrate."),
    output: Path | None = typer.Option(None, "--output", "-o",
                                          help="Write here (default: update the .safetensors in place)."),
    threshold: float = typer.Option(2e-5, "--threshold", help="MSE (normalised space) a coarse level may add."),
    data: list[Path] = typer.Option(None, "--data", help="HR folders (default: T91 and BSD200)."),
    images: int = typer.Option(24, "--images", min=1, help="Images used per target scale."),
    targets: str = typer.Option("6,8,12,16,24,32", "--targets", help="Target scales to tabulate."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Build CMSR Scale2Mod tables for a model and store them in its weights file."""
    from lmf_cli.io.images import list_images, load_rgb
    from lmf_cli.models.checkpoints import save_weights
    from lmf_cli.training.calibrate import calibrate as run_calibration

    try:
        up = open_upscaler(weights, checked(EngineOptions, device))
        scales = tuple(float(t) for t in targets.split(","))
    except ValueError:
        fail(f"--targets {targets!r} must be numbers separated by commas")
    except LmfError as exc:
        fail(str(exc))
    target = output or Path(up.loaded.source)
    if target.suffix != ".safetensors":
        fail(f"{target}: tables are stored in .safetensors weights; pass --output NAME.safetensors")
    folders = data or data_sets("T91", "BSD200", option="--data")
    paths = [p for folder in folders for p in list_images(folder)]
    if not paths:
        fail("no calibration images found")
    step = max(1, len(paths) // images)
    try:
        chosen = [load_rgb(p) for p in paths[::step][:images]]
    except LmfError as exc:
        fail(str(exc))
    progress = Progress(TextColumn("calibrate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, disable=not sys.stderr.isatty())
    try:
        with progress:
            task = progress.add_task("calibrate", total=len(chosen) * len(scales))
            tables = run_calibration(up.model, chosen, threshold, scales, up.device,
                                     progress=lambda: progress.advance(task))
    except LmfError as exc:
        fail(str(exc))
    merged = dict(up.loaded.cmsr_tables or {})
    merged[f"{threshold:g}"] = tables
    save_weights(target, up.model.cpu(), up.loaded.spec, up.loaded.info, merged, up.loaded.storage)
    table = Table("target", *[f"{d:g}" for d in (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24)],
                  title=f"CMSR thresholds (MSE {threshold:g}) -> {target}")
    for scale_key, row in tables.items():
        table.add_row(f"x{scale_key}", *[f"{row[k]:.2f}" if k in row else "" for k in
                                         ("1", "1.5", "2", "3", "4", "6", "8", "12", "16", "24")])
    stdout.print(table)
