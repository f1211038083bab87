"""The `lmf` command: a thin Typer layer over the Python API.

Errors that users can act on (LmfError) print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lmf_cli.errors import LmfError

app = typer.Typer(help="Upscale images to any size with Latent Modulated Functions.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console(stderr=True, soft_wrap=True)
DATA_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def parse_wxh(text: str, option: str) -> tuple[int, int]:
    """'1920x1080' -> (height, width); sizes are written W x H everywhere."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        fail(f"{option} {text!r} must look like WIDTHxHEIGHT, e.g. 1920x1080")
    return h, w


def fmt_size(hw: tuple[int, int]) -> str:
    return f"{hw[1]} x {hw[0]}"


def fmt_scale(value: float) -> str:
    return f"{value:g}"


@app.command()
def upscale(
    inputs: list[Path] = typer.Argument(..., help="Image files or folders."),
    scale: float | None = typer.Option(None, "--scale", "-s", help="Factor for both axes, e.g. 3.7."),
    width: int | None = typer.Option(None, "--width", help="Output width; height keeps the aspect."),
    height: int | None = typer.Option(None, "--height", help="Output height; width keeps the aspect."),
    size: str | None = typer.Option(None, "--size", help="Exact output size WxH."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output file (one input) or folder."),
    model: str = typer.Option("lmf-edsr", "--model", "-m", help="Shipped model name or weights file."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    tile: int | None = typer.Option(None, "--tile", help="Tile side in input pixels (default: from memory)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
) -> None:
    """Upscale images: output size = round(input x scale) per axis."""
    from lmf_cli.api import Upscaler, plan_size
    from lmf_cli.evaluation import list_images
    from lmf_cli.imageio import ImageFile, read_image, write_image

    chosen = [o for o in (scale, width, height, size) if o is not None]
    if len(chosen) != 1:
        fail("give exactly one of --scale, --width, --height, --size")
    files = [p for item in inputs for p in (list_images(item) if item.is_dir() else [item])]
    if not files:
        fail("no input images found")
    if output is not None and len(files) > 1 and output.suffix:
        fail(f"{output}: several inputs need an output folder, not a file")
    try:
        up = Upscaler.load(model, device)
    except LmfError as exc:
        fail(str(exc))
    console.print(f"model {up.name} on {up.device}", highlight=False)
    failures = 0
    for path in files:
        try:
            src = read_image(path)
            in_hw = src.pixels.shape[:2]
            if size is not None:
                plan = plan_size(in_hw, size=parse_wxh(size, "--size"))
            elif width is not None:
                plan = plan_size(in_hw, size=(round(in_hw[0] * width / in_hw[1]), width))
            elif height is not None:
                plan = plan_size(in_hw, size=(height, round(in_hw[1] * height / in_hw[0])))
            else:
                plan = plan_size(in_hw, scale=scale)
            label = fmt_scale(scale) if scale is not None else f"{plan.out_hw[1]}x{plan.out_hw[0]}"
            target = _target(path, output, len(files), label)
            if target.resolve() == path.resolve():
                raise LmfError(f"{path}: refusing to write over the input")
            if target.exists() and not overwrite:
                console.print(f"skip {target} (exists; --overwrite to replace)", highlight=False)
                continue
            console.print(f"{path}: {fmt_size(in_hw)} -> {fmt_size(plan.out_hw)}", highlight=False)
            t0 = time.perf_counter()
            pixels = up.upscale(src.pixels, size=plan.out_hw, tile=tile)
            write_image(target, ImageFile(pixels, src.icc_profile, src.exif))
            console.print(f"wrote {target} in {time.perf_counter() - t0:.2f} s", highlight=False)
        except LmfError as exc:
            failures += 1
            console.print(f"[red]failed:[/] {exc}", highlight=False, soft_wrap=True)
    if failures:
        fail(f"{failures} of {len(files)} file(s) failed")


def _target(path: Path, output: Path | None, count: int, label: str) -> Path:
    name = f"{path.stem}_x{label}{path.suffix}"
    if output is None:
        return path.with_name(name)
    if count == 1 and output.suffix:
        return output
    return output / name


@app.command()
def models() -> None:
    """List the shipped models and what their cards say."""
    from lmf_cli.checkpoints import read_metadata
    from lmf_cli.zoo import SHIPPED, shipped_path

    table = Table("name", "status", "summary", "training")
    for entry in SHIPPED.values():
        path = shipped_path(entry.name)
        if path is None:
            table.add_row(entry.name, "not trained yet", entry.summary, "")
            continue
        info = json.loads(read_metadata(path).get("info", "{}"))
        trained = f"{info.get('steps', '?')} steps, {info.get('train_seconds', 0) / 3600:.1f} h"
        table.add_row(entry.name, "ready", entry.summary, trained)
    Console().print(table)


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
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="Encoder in bfloat16 autocast."),
    val_every: int = typer.Option(500, "--val-every", help="Validate on Set5 x2/x3/x4 every N steps (0: never)."),
    val_data: Path | None = typer.Option(None, "--val-data", help="Validation HR folder (default Set5)."),
    time_budget: str | None = typer.Option(None, "--time-budget", help="Stop after this long, e.g. 2h."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many more steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in OUT_DIR."),
    seed: int = typer.Option(0, "--seed"),
    export: Path | None = typer.Option(None, "--export", help="Also copy the final weights here."),
) -> None:
    """Train a model with the official recipe (resumable; Ctrl-C saves and stops)."""
    from lmf_cli import models as registry
    from lmf_cli.evaluation import evaluate, list_images, model_method
    from lmf_cli.training import DEFAULT_TRAIN_SETS, TrainConfig
    from lmf_cli.training import train as run_training

    if arch not in registry.ARCHITECTURES:
        fail(f"--arch {arch!r}: choose one of {', '.join(registry.ARCHITECTURES)}")
    enc = _encoder_spec(encoder)
    spec = registry.lmliif_spec(enc, bilinear_skip=skip) if arch == "lmliif" else registry.ARCHITECTURES[arch](enc)
    folders = [str(p) for p in data] if data else [str(DATA_ROOT / s / "HR") for s in DEFAULT_TRAIN_SETS]
    val_folder = val_data or DATA_ROOT / "Set5" / "HR"
    cfg = TrainConfig(spec=spec, data=folders, out_dir=str(out_dir), steps=steps, batch=batch, patch=patch,
                      queries=queries, lr=lr, warmup=warmup, schedule=schedule, seed=seed, bf16=bf16,
                      val_every=val_every, val_data=str(val_folder))
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
    Console().print(table)
    if json_out is not None:
        text = json.dumps({"model": up.name, "protocol": protocol, "results": rows}, indent=2)
        if str(json_out) == "-":
            print(text)
        else:
            json_out.write_text(text)


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
    Console().print(table)
