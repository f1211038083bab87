"""The `lmf` command: a thin Typer layer over the Python API.

Errors that users can act on (LmfError) print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lmf_cli.batch import OUTPUT_FORMATS, Job, expand_inputs, fmt_size, output_place, parse_sizing, parse_wxh, plan_jobs
from lmf_cli.errors import CheckpointError, InputError, LmfError

if TYPE_CHECKING:
    import numpy as np

    from lmf_cli.api import Upscaler

app = typer.Typer(help="Upscale images to any size with Latent Modulated Functions.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console(stderr=True, soft_wrap=True)
stdout = Console(width=None if sys.stdout.isatty() else 160)  # tables stay readable in logs and pipes
DATA_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CMSR_LEVELS = ("fast", "balanced", "fine", "exact")
ALPHA_MODES = ("model", "bicubic")


# The size options `upscale` and `video` share (one rule: round(input x scale) per axis).
Scale = Annotated[float | None, typer.Option("--scale", "-s", help="Factor for both axes, e.g. 3.7.")]
ScaleX = Annotated[float | None, typer.Option("--scale-x", help="Horizontal factor (default: --scale or 1).")]
ScaleY = Annotated[float | None, typer.Option("--scale-y", help="Vertical factor (default: --scale or 1).")]
Width = Annotated[int | None, typer.Option("--width", help="Output width; the height keeps the aspect.")]
Height = Annotated[int | None, typer.Option("--height", help="Output height; the width keeps the aspect.")]
SizeWxH = Annotated[str | None, typer.Option("--size", help="Exact output size WxH, e.g. 1920x1080.")]
FitWxH = Annotated[str | None, typer.Option("--fit", help="Largest size inside the box WxH, aspect kept.")]


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def checked(parse, *args):
    """Run an argument parser from lmf_cli.batch; its InputError becomes `error: ...`, exit 1."""
    try:
        return parse(*args)
    except InputError as exc:
        fail(str(exc))


def report(kind: str, message: str) -> None:
    """One line `kind: message`; paths are printed literally, never read as Rich markup."""
    style = {"failed": "red", "warning": "yellow", "skipped": "dim"}.get(kind, "bold")
    console.print(f"[{style}]{kind}:[/] {escape(message)}", highlight=False, soft_wrap=True)


def parse_amount(text: str, option: str, base: int) -> int:
    """'2G', '512M', '1.5k' or a plain number -> an integer (k/M/G/T are powers of `base`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b|px?)?\s*", text.lower())
    value = float(match[1]) * base ** " kmgt".index(match[2] or " ") if match else 0
    if value < 1:
        fail(f"{option} {text!r} must be a positive amount such as 512M or 2G")
    return int(value)


class TileBar:
    """The current image's tiles, fed by Upscaler.upscale's per-tile callback (an alpha channel is a
    second pass over the same tiles); shown only when an image has more than one tile."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.task = bars.add_task("tiles", total=None, visible=False)
        self.passes = 1
        self.offset = self.last = 0

    def start(self, passes: int) -> None:
        self.passes, self.offset, self.last = passes, 0, 0
        self.bars.reset(self.task, total=None, visible=False)

    def __call__(self, done: int, total: int) -> None:
        if done < self.last:
            self.offset += total
        self.last = done
        self.bars.update(self.task, total=total * self.passes, visible=total > 1,
                         completed=min(self.offset + done, total * self.passes))


def upscale_pixels(up: Upscaler, pixels: np.ndarray, out_hw: tuple[int, int], **engine) -> np.ndarray:
    """Upscaler.upscale, plus gray + alpha (which the API takes as RGBA)."""
    import numpy as np

    if pixels.ndim == 3 and pixels.shape[2] == 2:  # in float, to round once as the API does for gray
        peak = float(np.iinfo(pixels.dtype).max)
        rgba = up.upscale(pixels[..., [0, 0, 0, 1]].astype(np.float32) / peak, size=out_hw, **engine)
        gray_alpha = np.stack([rgba[..., :3].mean(axis=2), rgba[..., 3]], axis=2)
        return np.round(gray_alpha * peak).astype(pixels.dtype)
    return up.upscale(pixels, size=out_hw, **engine)


def load_upscaler(model: str, device: str, precision: str, quality: str) -> Upscaler:
    """The Upscaler, with --device and --quality checked once instead of failing on every file."""
    from lmf_cli.api import Upscaler
    from lmf_cli.cmsr import resolve_threshold, supports_cmsr

    try:
        up = Upscaler.load(model, device, precision)
    except LmfError as exc:
        fail(str(exc))
    except (RuntimeError, AssertionError) as exc:  # torch: unknown device, or one this build lacks
        fail(f"--device {device}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if quality != "exact":
        if not supports_cmsr(up.model):
            fail(f"--quality {quality}: {up.name} is not an LMF model; CMSR levels need LM-LIIF or LM-LTE")
        try:
            resolve_threshold(up.loaded.cmsr_tables, quality)
        except InputError as exc:
            fail(f"--quality {quality}: {exc}")
    return up


def run_job(job: Job, up: Upscaler, engine: dict, tiles: TileBar, max_pixels: int, jpeg_quality: int,
            keep_metadata: bool) -> list[str]:
    """Read, upscale, write atomically; returns what the output format could not keep."""
    import torch

    from lmf_cli.imageio import ImageFile, read_image, write_image

    try:
        src = read_image(job.source, max_pixels)
        alpha_pass = src.pixels.ndim == 3 and src.pixels.shape[2] in (2, 4) and engine["alpha"] == "model"
        tiles.start(2 if alpha_pass else 1)
        pixels = upscale_pixels(up, src.pixels, job.out_hw, progress=tiles, **engine)
        try:
            return write_image(job.target, ImageFile(pixels, src.icc_profile, src.exif), jpeg_quality, keep_metadata)
        except OSError as exc:
            raise InputError(f"cannot write {job.target} ({exc.strerror or exc})") from exc
    except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
        raise InputError("out of memory; try a smaller --tile or --max-memory") from exc


@app.command()
def upscale(
    inputs: list[str] = typer.Argument(..., help="Image files, folders and glob patterns ('shots/*.jpg')."),
    scale: Scale = None,
    scale_x: ScaleX = None,
    scale_y: ScaleY = None,
    width: Width = None,
    height: Height = None,
    size: SizeWxH = None,
    fit: FitWxH = None,
    output: str | None = typer.Option(None, "--output", "-o",
                                      help="Output file (one input) or folder (created if missing)."),
    recursive: bool = typer.Option(False, "--recursive", "-r",
                                   help="Include subfolders and mirror the tree under the output folder."),
    fmt: str | None = typer.Option(None, "--format", "-f", help="png, jpg, webp or tiff (default: as the input)."),
    jpeg_quality: int = typer.Option(95, "--jpeg-quality", help="JPEG/WebP file quality, 1..100."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs (never an input)."),
    strip_metadata: bool = typer.Option(False, "--strip-metadata", help="Drop the ICC profile and EXIF."),
    alpha: str = typer.Option("model", "--alpha", help="Upscale alpha with the model or bicubic."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="List what would be written, and the sizes."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    json_lines: bool = typer.Option(False, "--json", help="One JSON line per file on stdout, for scripts."),
    max_pixels_text: str = typer.Option("400M", "--max-pixels",
                                        help="Largest input or output, in pixels (400M = 400 megapixels)."),
    model: str = typer.Option("lmf-edsr", "--model", "-m", help="Shipped model name or weights file."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    tile: int | None = typer.Option(None, "--tile", help="Tile side in input pixels (default: from memory)."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Memory budget for tiles, e.g. 2G or 512M."),
    quality: str = typer.Option("exact", "--quality",
                                help="CMSR level: fast, balanced, fine or exact. Not the file quality "
                                     "(that is --jpeg-quality)."),
    precision: str = typer.Option("fp32", "--precision", help="Encoder precision: fp32, bf16, fp16 or auto."),
) -> None:
    """Upscale images to any size with the model.

    Output size per axis = round(input x scale), halves rounded up; sizes are written W x H.
    Outputs are named <stem>_x<scale>.<ext> (--scale) or <stem>_<W>x<H>.<ext> (other sizes), beside the input.
    Existing outputs are skipped (--overwrite), inputs are never written over, and every write is atomic.
    Bit depth (8/16), grayscale, alpha, ICC profile and EXIF are kept; EXIF orientation is applied.

    --quality is the CMSR level: fast, balanced or fine render calm regions coarser above x4; exact (default) does not.
    --jpeg-quality is the file quality of JPEG and WebP outputs.
    """
    from lmf_cli.api import PRECISIONS
    from lmf_cli.imageio import FORMATS
    from lmf_cli.zoo import resolve

    start = time.perf_counter()
    sizing = checked(parse_sizing, scale, scale_x, scale_y, width, height, size, fit)
    for option, value, choices in (("--format", fmt, (*OUTPUT_FORMATS, "jpeg", "tif")),
                                   ("--quality", quality, CMSR_LEVELS), ("--alpha", alpha, ALPHA_MODES),
                                   ("--precision", precision, PRECISIONS)):
        if value is not None and value not in choices:
            fail(f"{option} {value}: choose one of {', '.join(choices)}")
    if tile is not None and tile < 1:
        fail(f"--tile {tile} must be at least 1 input pixel")
    if not 1 <= jpeg_quality <= 100:
        fail(f"--jpeg-quality {jpeg_quality} must be between 1 and 100")
    fmt = FORMATS[fmt][1:] if fmt else None
    max_pixels = parse_amount(max_pixels_text, "--max-pixels", 1000)
    memory = parse_amount(max_memory, "--max-memory", 1024) if max_memory else None
    out_file, out_dir = checked(output_place, output, inputs, fmt)
    jobs = expand_inputs(inputs, recursive, out_dir.resolve() if out_dir else None)
    plan_jobs(jobs, sizing, max_pixels, fmt, out_file, out_dir, recursive, overwrite)
    pending = [j for j in jobs if j.status == "pending"]

    def say(message: str) -> None:
        if not quiet:
            console.print(escape(message), highlight=False)

    def finish(job: Job, notes: list[str] | None = None) -> None:
        for message in notes or []:
            report("warning", f"{job.source}: {message}")
        if job.status in ("failed", "skipped") and (job.status == "failed" or not quiet):
            report(job.status, f"{job.source}: {job.reason}")
        if json_lines:
            print(job.record(), flush=True)

    def announce(job: Job) -> None:
        say(f"{job.source} -> {job.target}: {fmt_size(job.in_hw)} -> {fmt_size(job.out_hw)}"
            + (" (dry run)" if dry_run else ""))
        for message in job.warnings:
            report("warning", f"{job.source}: {message}")

    if dry_run:
        try:
            resolve(model)
        except LmfError as exc:
            fail(str(exc))
        for job in jobs:
            if job.status == "pending":
                job.status = "dry-run"
                announce(job)
            finish(job)
    else:
        up = load_upscaler(model, device, precision, quality) if pending else None
        if up is not None:
            say(f"model {up.name} on {up.device} ({up.precision})")
        engine = dict(tile=tile, max_memory=memory, alpha=alpha, cmsr=False if quality == "exact" else quality)
        bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=console, disable=quiet or not console.is_terminal)
        with bars:
            files = bars.add_task("files", total=len(pending))
            tiles = TileBar(bars)
            for job in jobs:
                notes: list[str] = []
                if job.status == "pending":
                    announce(job)
                    t0 = time.perf_counter()
                    try:
                        notes = run_job(job, up, engine, tiles, max_pixels, jpeg_quality, not strip_metadata)
                        job.status = "done"
                    except LmfError as exc:
                        job.drop("failed", str(exc))
                    job.seconds = time.perf_counter() - t0
                    bars.advance(files)
                    if job.status == "done":
                        say(f"wrote {job.target} in {job.seconds:.2f} s")
                finish(job, notes)
    counts = {s: sum(j.status == s for j in jobs) for s in ("done", "dry-run", "skipped", "failed")}
    first = f"would write {counts['dry-run']}" if dry_run else f"done {counts['done']}"
    say(f"{first}, skipped {counts['skipped']}, failed {counts['failed']} in {time.perf_counter() - start:.1f} s")
    if counts["failed"]:
        raise typer.Exit(1)


def _card(path: Path) -> tuple[str, str, str, str]:
    """Encoder, parameters, training and Set5 PSNR from the weights' header, without building the model."""
    from safetensors import safe_open

    from lmf_cli.checkpoints import read_metadata

    meta = read_metadata(path)
    try:
        spec, info = json.loads(meta.get("spec", "{}")), json.loads(meta.get("info", "{}"))
        with safe_open(str(path), framework="pt") as f:
            parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (json.JSONDecodeError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged ({exc})") from exc
    enc = spec.get("args", {}).get("encoder_spec", {}) if isinstance(spec, dict) else {}
    enc_args = enc.get("args", {})
    encoder = f"{spec.get('name', '?')} / {enc.get('name', '?')}"
    if "n_resblocks" in enc_args:
        encoder += f" {enc_args['n_resblocks']}x{enc_args.get('n_feats', '?')}"
    info = info if isinstance(info, dict) else {}
    training = f"{info['steps']:,} steps" if isinstance(info.get("steps"), int) else "?"
    if isinstance(info.get("train_seconds"), (int, float)):
        training += f", {info['train_seconds'] / 3600:.1f} h"
    evals = info.get("eval")
    set5 = evals.get("Set5") if isinstance(evals, dict) else None
    psnr = "not evaluated"
    if isinstance(set5, dict):
        by_scale = {f"{float(k):g}": v for k, v in set5.items() if re.fullmatch(r"\d+(\.\d+)?", str(k))}
        psnr = " / ".join(f"{by_scale[s]:.2f}" if isinstance(by_scale.get(s), (int, float)) else "-"
                          for s in ("2", "3", "4"))
    return encoder, f"{parameters / 1e6:.2f} M", training, psnr


@app.command()
def models() -> None:
    """List the shipped models and the key facts of their cards."""
    from lmf_cli.zoo import SHIPPED, shipped_path

    table = Table("name", "status", "model / encoder", "parameters", "training", "Set5 PSNR x2 / x3 / x4", "summary")
    for entry in SHIPPED.values():
        path = shipped_path(entry.name)
        if path is None:
            table.add_row(entry.name, "not trained yet", "", "", "", "", entry.summary)
            continue
        try:
            table.add_row(entry.name, "ready", *_card(path), entry.summary)
        except LmfError as exc:
            table.add_row(entry.name, f"unreadable: {exc}", "", "", "", "", entry.summary)
    stdout.print(table)


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


@app.command()
def train(
    out_dir: Path = typer.Argument(..., help="Run folder: state, log and exported weights."),
    arch: str = typer.Option("lmliif", "--arch", help="lmliif, lmlte, liif or lte."),
    encoder: str = typer.Option("edsr-baseline", "--encoder", help="edsr-baseline, rdn, or edsr-RxF (blocks x feats)."),
    data: list[Path] = typer.Option(None, "--data", help="HR image folders (default: T91, BSD200, BSDS500test)."),
    steps: int = typer.Option(20000, "--steps", help="Total steps of the run (the schedule spans these)."),
    batch: int = typer.Option(16, "--batch"),
    patch: int = typer.Option(48, "--patch", help="LR patch side."),
    queries: int = typer.Option(2304, "--queries", help="HR pixels sampled per patch."),
    lr: float = typer.Option(1e-4, "--lr"),
    warmup: int = typer.Option(0, "--warmup", help="Linear warm-up steps."),
    schedule: str = typer.Option("step", "--schedule", help="step (official halvings) or cosine."),
    skip: bool = typer.Option(False, "--skip/--no-skip", help="LM-LIIF: add a bilinear upsample of the input."),
    latent_hidden: int = typer.Option(208, "--latent-hidden", help="LM-LIIF: width of the latent MLP's hidden layer."),
    render_depth: int = typer.Option(6, "--render-depth", help="LM-LIIF: modulated hidden layers of the render MLP."),
    bf16: bool | None = typer.Option(None, "--bf16/--fp32", help="Encoder in bfloat16 autocast (default: bf16 "
                                     "where the CPU has AMX or AVX-512 BF16, else fp32)."),
    degrade: str = typer.Option("none", "--degrade", help="LR degradations: none (clean bicubic), light "
                                "(web/phone JPEGs) or real (JPEG q30+, noise, blur, H.264/H.265)."),
    val_every: int = typer.Option(500, "--val-every", help="Validate on Set5 x2/x3/x4 every N steps (0: never)."),
    val_data: Path | None = typer.Option(None, "--val-data", help="Validation HR folder (default Set5)."),
    time_budget: str | None = typer.Option(None, "--time-budget", help="Stop after this long, e.g. 2h."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many more steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in OUT_DIR."),
    seed: int = typer.Option(0, "--seed"),
    export: Path | None = typer.Option(None, "--export", help="Also copy the final weights here."),
    init: str | None = typer.Option(None, "--init", help="Start from these weights (a model name or file); "
                                    "the architecture is theirs and --arch/--encoder/... are ignored."),
) -> None:
    """Train a model with the official recipe (resumable; Ctrl-C saves and stops)."""
    from lmf_cli import models as registry
    from lmf_cli.degradations import PRESETS
    from lmf_cli.evaluation import evaluate, list_images, model_method
    from lmf_cli.training import DEFAULT_TRAIN_SETS, TrainConfig
    from lmf_cli.training import train as run_training

    if arch not in registry.ARCHITECTURES:
        fail(f"--arch {arch!r}: choose one of {', '.join(registry.ARCHITECTURES)}")
    if degrade not in PRESETS:
        fail(f"--degrade {degrade!r}: choose one of {', '.join(PRESETS)}")
    enc = _encoder_spec(encoder)
    if bf16 is None:
        from lmf_cli.hardware import fast_bf16

        bf16 = fast_bf16("cpu")
    init_path = None
    if init:
        from lmf_cli.checkpoints import load_weights
        from lmf_cli.zoo import resolve

        try:
            init_path = str(resolve(init))
            spec = load_weights(init_path).spec
        except LmfError as exc:
            fail(str(exc))
    elif arch == "lmliif":
        spec = registry.lmliif_spec(enc, skip, latent_hidden, render_depth)
    else:
        spec = registry.ARCHITECTURES[arch](enc)
    folders = [str(p) for p in data] if data else [str(DATA_ROOT / s / "HR") for s in DEFAULT_TRAIN_SETS]
    val_folder = val_data or DATA_ROOT / "Set5" / "HR"
    cfg = TrainConfig(spec=spec, data=folders, out_dir=str(out_dir), steps=steps, batch=batch, patch=patch,
                      queries=queries, lr=lr, warmup=warmup, schedule=schedule, seed=seed, bf16=bf16,
                      val_every=val_every, val_data=str(val_folder), init=init_path, degrade=degrade)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = (out_dir / "train.log").open("a")

    def log(message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log_file.write(f"{stamp} {message}\n")
        log_file.flush()
        console.print(message, highlight=False)

    val_images = list_images(val_folder) if val_every and val_folder.exists() else []

    def validate(model) -> dict[str, float]:
        results = evaluate({"m": model_method(model)}, val_images, [2, 3, 4], with_ssim=False)
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
            progress.update(task, completed=step, loss=loss, speed=sum(recent) / len(recent))
            if step % 50 == 0:
                log_file.write(f"{time.strftime('%H:%M:%S')} step {step} loss {loss:.4f} "
                               f"{sum(recent) / len(recent):.3f} s/step\n")
                log_file.flush()

        try:
            weights = run_training(cfg, resume=resume, max_steps=max_steps, time_budget=_duration(time_budget),
                                   log=log, on_step=on_step, validate=validate if val_images else None)
        except (ValueError, LmfError) as exc:
            fail(str(exc))
    if export is not None:
        import shutil

        export.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, export)
        log(f"exported {export}")
    log(f"weights: {weights}")


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


@app.command("eval")
def evaluate_cmd(
    folders: list[Path] = typer.Argument(..., help="HR image folders or files (e.g. ../shared/data/Set5/HR)."),
    model: str = typer.Option("lmf-edsr", "--model", "-m"),
    scales: str = typer.Option("2,3,4", "--scales", help="Comma-separated, e.g. 2,3,4,6,8,12."),
    protocol: str = typer.Option("benchmark", "--protocol", help="benchmark (Y, shave=s) or div2k (RGB, s+6)."),
    device: str = typer.Option("auto", "--device"),
    no_bicubic: bool = typer.Option(False, "--no-bicubic", help="Skip the bicubic row."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results as JSON here (- for stdout)."),
    record: bool = typer.Option(False, "--record", help="Store the PSNRs in the model's .safetensors card."),
) -> None:
    """PSNR / SSIM of a model (and bicubic) with the standard SR protocol."""
    from lmf_cli.api import Upscaler
    from lmf_cli.evaluation import bicubic_method, evaluate, list_images, model_method

    if protocol not in ("benchmark", "div2k"):
        fail("--protocol must be benchmark or div2k")
    try:
        scale_list = [float(s) for s in scales.split(",")]
        up = Upscaler.load(model, device)
    except ValueError:
        fail(f"--scales {scales!r} must be numbers separated by commas")
    except LmfError as exc:
        fail(str(exc))
    rows = []
    for folder in folders:
        images = list_images(folder)
        if not images:
            fail(f"{folder}: no images found")
        methods = {up.name: model_method(up.model, str(up.device))}
        if not no_bicubic:
            methods["bicubic"] = bicubic_method
        set_name = folder.parent.name if folder.name == "HR" else folder.name
        for r in evaluate(methods, images, scale_list, protocol):
            rows.append({"set": set_name, "method": r.method, "scale": r.scale, "psnr": round(r.psnr, 3),
                         "ssim": round(r.ssim, 4), "images": r.images})
    table = Table("set", "method", *[f"x{s:g}" for s in scale_list], title=f"PSNR (dB) / SSIM, {protocol} protocol")
    for set_name in dict.fromkeys(r["set"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = [f"{r['psnr']:.2f} / {r['ssim']:.4f}" for r in rows
                     if r["set"] == set_name and r["method"] == method]
            table.add_row(set_name, method, *cells)
    stdout.print(table)
    if record:
        _record_eval(up, rows, protocol)
    if json_out is not None:
        text = json.dumps({"model": up.name, "protocol": protocol, "results": rows}, indent=2)
        if str(json_out) == "-":
            print(text)
        else:
            json_out.write_text(text)


def _record_eval(up, rows: list[dict], protocol: str) -> None:
    """Merge PSNRs into the weights' info metadata: {"eval": {set: {scale: psnr}}}."""
    from lmf_cli.checkpoints import save_weights

    source = Path(up.loaded.source)
    if source.suffix != ".safetensors":
        fail(f"{source}: --record needs .safetensors weights")
    info = dict(up.loaded.info)
    for key, method in (("eval", up.name), ("eval_bicubic", "bicubic")):
        table = info.setdefault(key, {})
        for r in rows:
            if r["method"] == method:
                table.setdefault(r["set"], {})[f"{r['scale']:g}"] = r["psnr"]
    info["eval_protocol"] = protocol
    save_weights(source, up.model.cpu(), up.loaded.spec, info, up.loaded.cmsr_tables)
    console.print(f"recorded in {source}", highlight=False)


@app.command()
def calibrate(
    weights: str = typer.Argument(..., help="Model name or weights file to calibrate."),
    output: Path | None = typer.Option(None, "--output", "-o",
                                          help="Write here (default: update the .safetensors in place)."),
    threshold: float = typer.Option(2e-5, "--threshold", help="MSE (normalised space) a coarse level may add."),
    data: list[Path] = typer.Option(None, "--data", help="HR folders (default: T91 and BSD200)."),
    images: int = typer.Option(24, "--images", help="Images used per target scale."),
    targets: str = typer.Option("6,8,12,16,24,32", "--targets", help="Target scales to tabulate."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Build CMSR Scale2Mod tables for a model and store them in its weights file."""
    from lmf_cli.api import Upscaler
    from lmf_cli.checkpoints import save_weights
    from lmf_cli.cmsr import calibrate as run_calibration
    from lmf_cli.evaluation import list_images, load_rgb

    try:
        up = Upscaler.load(weights, device)
        scales = tuple(float(t) for t in targets.split(","))
    except ValueError:
        fail(f"--targets {targets!r} must be numbers separated by commas")
    except LmfError as exc:
        fail(str(exc))
    target = output or Path(up.loaded.source)
    if target.suffix != ".safetensors":
        fail(f"{target}: tables are stored in .safetensors weights; pass --output NAME.safetensors")
    folders = data or [DATA_ROOT / "T91" / "HR", DATA_ROOT / "BSD200" / "HR"]
    paths = [p for folder in folders for p in list_images(folder)]
    if not paths:
        fail("no calibration images found")
    step = max(1, len(paths) // images)
    chosen = [load_rgb(p) for p in paths[::step][:images]]
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
    save_weights(target, up.model.cpu(), up.loaded.spec, up.loaded.info, merged)
    table = Table("target", *[f"{d:g}" for d in (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24)],
                  title=f"CMSR thresholds (MSE {threshold:g}) -> {target}")
    for scale_key, row in tables.items():
        table.add_row(f"x{scale_key}", *[f"{row[k]:.2f}" if k in row else "" for k in
                                         ("1", "1.5", "2", "3", "4", "6", "8", "12", "16", "24")])
    stdout.print(table)


@app.command()
def benchmark(
    size: str = typer.Option("320x180", "--size", help="Input size WxH."),
    scales: str = typer.Option("2,3,4,8,12,30", "--scales", help="Comma-separated factors."),
    model: str = typer.Option("lmf-edsr", "--model", "-m"),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("fp32", "--precision", help="Encoder precision: fp32, bf16, fp16, auto."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per measurement (median and spread)."),
    warmup: int = typer.Option(1, "--warmup"),
    liif: bool = typer.Option(True, "--liif/--no-liif", help="Time LIIF on the same encoder."),
    psnr: bool = typer.Option(False, "--psnr", help="Add Set5 PSNR (standard protocol) beside the time."),
    quick: bool = typer.Option(False, "--quick", help="96x64 input, x2/x4/x8, one repeat: under a minute."),
    json_out: Path | None = typer.Option(None, "--json", help="Write every figure and the machine here."),
    plot: Path | None = typer.Option(None, "--plot", help="PNG of time and PSNR against scale."),
) -> None:
    """Time the encoder, latent MLP and rendering of LMF (with and without CMSR) beside LIIF
    and bicubic, with MACs from the architecture."""
    import torch

    from lmf_cli import benchmark as bench
    from lmf_cli.api import Upscaler
    from lmf_cli.cmsr import DEFAULT_THRESHOLD, schedule_for

    if quick:
        size, scales, repeats, warmup = "96x64", "2,4,8", 1, 1
    in_h, in_w = checked(parse_wxh, size, "--size")
    try:
        scale_list = [float(s) for s in scales.split(",")]
        up = Upscaler.load(model, device, precision)
    except ValueError:
        fail(f"--scales {scales!r} must be numbers separated by commas")
    except LmfError as exc:
        fail(str(exc))
    image = bench.test_image(in_h, in_w)
    inp = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(up.device)
    info = bench.machine_info(up.device)
    console.print(f"{up.name} on {info['device']} ({info.get('gpu', info['cpu'])}, {info['threads']} threads), "
                  f"input {in_w} x {in_h}", highlight=False)
    tables = up.loaded.cmsr_tables or {}
    key = f"{DEFAULT_THRESHOLD:g}"
    rows = []
    for scale in scale_list:
        rows.append(bench.benchmark_model(f"LMF ({up.name})", up.model, inp, scale, repeats, warmup))
        schedule = schedule_for(tables, key, scale)
        if schedule is not None:
            rows.append(bench.benchmark_model(f"LMF + CMSR ({up.name})", up.model, inp, scale, repeats, warmup,
                                              schedule))
        if liif:
            rows.append(bench.liif_extrapolated(up.model, inp, scale, repeats, warmup,
                                                window=96 if quick else 192))
        rows.append(bench.benchmark_bicubic(image, scale, repeats, warmup))
        console.print(f"x{scale:g} done", highlight=False)
    scores = _benchmark_psnr(up, scale_list, tables, key) if psnr else {}
    table = Table("method", "scale", "encoder", "latent", "render", "total", "GMACs enc/lat/rend", "MP/s",
                  "peak MB", "drawn", "PSNR", title=f"lmf benchmark, {in_w} x {in_h} input, median of {repeats}")
    for row in rows:
        stages = [f"{t.median_s * 1e3:.0f} ms" if t else "" for t in (row.encoder, row.latent, row.render)]
        macs = "/".join(f"{row.macs.get(k, 0) / 1e9:.1f}" for k in ("encoder", "latent", "render"))
        score = scores.get((row.method.split(" (")[0], row.scale))
        table.add_row(row.method, f"x{row.scale:g}", *stages,
                      f"{row.total.median_s * 1e3:.0f} ± {row.total.spread_s * 1e3:.0f} ms", macs,
                      f"{row.megapixels_per_s:.1f}", f"{row.peak_memory_mb:.0f}", f"{row.rendered_fraction:.0%}",
                      f"{score:.2f}" if score else "")
    stdout.print(table)
    for row in rows:
        if row.note:
            console.print(f"{row.method} x{row.scale:g}: {row.note}", highlight=False)
    for scale in scale_list:
        lmf_row = next(r for r in rows if r.scale == scale and r.method.startswith("LMF ("))
        liif_row = next((r for r in rows if r.scale == scale and r.method.startswith("LIIF")), None)
        if liif_row:
            lmf_dec = lmf_row.macs["latent"] + lmf_row.macs["render"]
            lmf_time = lmf_row.latent.median_s + lmf_row.render.median_s
            stdout.print(f"x{scale:g}: decoder {lmf_dec / 1e9:.1f} vs LIIF {liif_row.macs['render'] / 1e9:.0f} "
                            f"GMACs ({liif_row.macs['render'] / lmf_dec:.0f}x fewer); decoder time "
                            f"{lmf_time:.2f} vs {liif_row.render.median_s:.2f} s "
                            f"({liif_row.render.median_s / max(lmf_time, 1e-9):.0f}x faster); whole upscale "
                            f"{liif_row.total.median_s / lmf_row.total.median_s:.1f}x faster", highlight=False)
    if json_out is not None:
        payload = {"machine": info, "input_wh": [in_w, in_h], "model": up.name, "repeats": repeats,
                   "rows": [r.as_dict() for r in rows],
                   "psnr": [{"method": m, "scale": s, "psnr": v} for (m, s), v in scores.items()]}
        json_out.write_text(json.dumps(payload, indent=2))
    if plot is not None:
        _benchmark_plot(plot, rows, scores, f"{up.name}, {in_w} x {in_h}, {info.get('gpu', info['cpu'])}")


def _benchmark_psnr(up, scales: list[float], tables: dict, key: str) -> dict[tuple[str, float], float]:
    from lmf_cli.cmsr import schedule_for
    from lmf_cli.evaluation import bicubic_method, evaluate, list_images, model_method

    images = list_images(DATA_ROOT / "Set5" / "HR")
    if not images:
        console.print("no Set5 images found; skipping PSNR", highlight=False)
        return {}
    scores: dict[tuple[str, float], float] = {}
    for scale in [s for s in scales if s <= 12]:
        methods = {"LMF": model_method(up.model, str(up.device)), "bicubic": bicubic_method}
        schedule = schedule_for(tables, key, scale)
        if schedule is not None:
            methods["LMF + CMSR"] = model_method(up.model, str(up.device), schedule)
        for result in evaluate(methods, images, [scale], with_ssim=False):
            name = "bicubic (OpenCV)" if result.method == "bicubic" else result.method
            scores[(name.split(" (")[0], scale)] = result.psnr
    return scores


def _benchmark_plot(path: Path, rows: list, scores: dict, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        fail("--plot needs matplotlib: pip install 'lmf-cli[plot]'")
    fig, (ax_time, ax_psnr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r.method for r in rows):
        points = [(r.scale, r.total.median_s) for r in rows if r.method == method]
        ax_time.plot(*zip(*points, strict=True), marker="o", label=method)
    ax_time.set(xscale="log", yscale="log", xlabel="scale", ylabel="seconds (whole upscale)", title="time")
    for method in dict.fromkeys(m for m, _ in scores):
        points = sorted((s, v) for (m, s), v in scores.items() if m == method)
        ax_psnr.plot(*zip(*points, strict=True), marker="o", label=method)
    ax_psnr.set(xscale="log", xlabel="scale", ylabel="Set5 PSNR (dB, Y)", title="quality")
    for ax in (ax_time, ax_psnr):
        ax.set_xticks(sorted({r.scale for r in rows}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("x%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@app.command()
def video(
    source: Path = typer.Argument(..., help="Input video file."),
    output: Path | None = typer.Option(None, "--output", "-o",
                                       help="Output file (default: <stem>_<size> beside the input, same container "
                                            "if it is .mkv/.mp4/.mov/.m4v/.webm, else .mkv)."),
    scale: Scale = None,
    scale_x: ScaleX = None,
    scale_y: ScaleY = None,
    width: Width = None,
    height: Height = None,
    size: SizeWxH = None,
    fit: FitWxH = None,
    codec: str | None = typer.Option(None, "--codec", help="libx264, libx265, libsvtav1 or ffv1 (default: the "
                                                           "first of these the build and container have)."),
    crf: int | None = typer.Option(None, "--crf", help="Quality, lower is better (default 18 x264, 20 x265, "
                                                      "30 SVT-AV1; ffv1 is lossless)."),
    preset: str | None = typer.Option(None, "--preset", help="Encoder speed preset, e.g. slow (x264/x265) or 6 "
                                                             "(SVT-AV1)."),
    pix_fmt: str | None = typer.Option(None, "--pix-fmt", help="Output pixel format (default: the input's, "
                                                               "10-bit kept 10-bit)."),
    start: str | None = typer.Option(None, "--start", help="Process from this time (seconds or [HH:]MM:SS)."),
    end: str | None = typer.Option(None, "--end", help="Process up to this time."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (never the input)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted job from its last finished segment."),
    segment_frames: int = typer.Option(240, "--segment-frames", help="Frames per resumable segment."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="Shipped model name or weights file (default: lmf-lite on CPU, "
                                          "lmf-edsr on a GPU)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    precision: str = typer.Option("fp32", "--precision", help="Encoder precision: fp32, bf16, fp16 or auto."),
    tile: int | None = typer.Option(None, "--tile", help="Tile side in input pixels (default: from memory)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    """Upscale every frame of a video; audio, subtitles, timestamps, rotation and colour tags are kept.

    The output is written to a temp file and renamed when complete; Ctrl-C keeps the finished
    segments so that --resume continues the job.
    """
    from lmf_cli.api import pick_device
    from lmf_cli.video import default_suffix, parse_time, plan_video, run_video, work_dir

    sizing = checked(parse_sizing, scale, scale_x, scale_y, width, height, size, fit)
    try:
        start_s = parse_time(start) if start is not None else None
        end_s = parse_time(end) if end is not None else None
        plan = plan_video(source, sizing.out_hw, suffix=output.suffix if output else default_suffix(source),
                          codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt, start=start_s, end=end_s,
                          segment_frames=segment_frames)
    except LmfError as exc:
        fail(str(exc))
    target = output or source.with_name(f"{source.stem}_{sizing.label(plan.display_out)}"
                                        f"{default_suffix(source)}")
    if model is None:
        try:
            model = "lmf-lite" if pick_device(device).type == "cpu" else "lmf-edsr"
        except RuntimeError as exc:
            fail(f"--device {device}: {str(exc).splitlines()[0]}")
    up = load_upscaler(model, device, precision, "exact")

    def say(message: str) -> None:
        if not quiet:
            console.print(escape(message), highlight=False)

    frames = f", ~{plan.total} frames" if plan.total else ""
    say(f"{source} -> {target}: {fmt_size(plan.display_in)} -> {fmt_size(plan.display_out)}, {plan.codec} "
        f"{plan.pix_fmt}{frames}; model {up.name} on {up.device} ({up.precision})")
    for note in plan.notes:
        report("note", note)
    work = work_dir(target)
    if work.exists() and not resume:
        report("note", f"starting over: {work} holds an earlier interrupted run (--resume continues it)")
    bars = Progress(TextColumn("video"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[fps]:.2f} fps"),
                    TextColumn("{task.fields[size]}"), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    disable=quiet or not console.is_terminal)
    try:
        with bars:
            task = bars.add_task("video", total=plan.total, fps=0.0, size=_megabytes(0))
            result = run_video(plan, target, up, overwrite=overwrite, resume=resume, tile=tile,
                               progress=lambda p: bars.update(task, completed=p.done, total=p.total, fps=p.fps,
                                                              size=_megabytes(p.out_bytes)))
    except LmfError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        report("interrupted", f"no output written; finished segments are kept in {work}; run the same command "
                              "with --resume to continue")
        raise typer.Exit(130) from None
    resumed = f" ({result.resumed_frames} resumed)" if result.resumed_frames else ""
    say(f"wrote {target}: {result.frames} frames{resumed} in {result.seconds:.1f} s ({result.fps:.2f} fps), "
        f"{_megabytes(result.out_bytes)}")
