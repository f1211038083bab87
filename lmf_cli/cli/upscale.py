"""`lmf upscale`: files, folders and globs through the Upscaler, with bars and a batch report."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmf_cli.batch import OUTPUT_FORMATS, Job, expand_inputs, fmt_size, output_place, parse_sizing, plan_jobs
from lmf_cli.cli.common import (
    ALPHA_MODES,
    CMSR_LEVELS,
    FitWxH,
    Height,
    Scale,
    ScaleX,
    ScaleY,
    SizeWxH,
    Width,
    checked,
    console,
    fail,
    load_upscaler,
    parse_amount,
    report,
)
from lmf_cli.errors import InputError, LmfError

if TYPE_CHECKING:
    import numpy as np

    from lmf_cli.api import Upscaler


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


class FrameBar:
    """The frames of an animation (or pages of a TIFF); shown only for files of more than one."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.task = bars.add_task("frames", total=None, visible=False)

    def __call__(self, done: int, total: int) -> None:
        self.bars.update(self.task, total=total, completed=done, visible=total > 1)


def upscale_pixels(up: Upscaler, pixels: np.ndarray, out_hw: tuple[int, int], **engine) -> np.ndarray:
    """Upscaler.upscale, plus gray + alpha (which the API takes as RGBA)."""
    import numpy as np

    if pixels.ndim == 3 and pixels.shape[2] == 2:  # in float, to round once as the API does for gray
        peak = float(np.iinfo(pixels.dtype).max)
        rgba = up.upscale(pixels[..., [0, 0, 0, 1]].astype(np.float32) / peak, size=out_hw, **engine)
        gray_alpha = np.stack([rgba[..., :3].mean(axis=2), rgba[..., 3]], axis=2)
        return np.round(gray_alpha * peak).astype(pixels.dtype)
    return up.upscale(pixels, size=out_hw, **engine)


def run_job(job: Job, up: Upscaler, engine: dict, tiles: TileBar, max_pixels: int, jpeg_quality: int,
            keep_metadata: bool, frames: FrameBar | None = None) -> list[str]:
    """Read, upscale, write atomically; returns what the output format could not keep.

    A file of several frames (animation, TIFF pages) is read, upscaled and encoded one frame at a time.
    """
    import torch

    from lmf_cli.io.images import ImageFile, read_frames, read_image, write_frames, write_image

    def one(pixels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        alpha_pass = pixels.ndim == 3 and pixels.shape[2] in (2, 4) and engine["alpha"] == "model"
        tiles.start(2 if alpha_pass else 1)
        return upscale_pixels(up, pixels, out_hw, progress=tiles, **engine)

    def write(encode, *args) -> list[str]:
        try:
            return encode(job.target, *args, jpeg_quality, keep_metadata)
        except OSError as exc:  # reading and upscaling report their own errors
            raise InputError(f"cannot write {job.target} ({exc.strerror or exc})") from exc

    try:
        if job.frames > 1:  # read, upscaled and encoded one frame at a time, as write_frames asks for them
            anim, source = read_frames(job.source, max_pixels)

            def upscaled() -> Iterator:
                for index, frame in enumerate(source):
                    frame.pixels = one(frame.pixels, job.frame_out_hw(frame.pixels.shape[:2]))
                    if frames is not None:
                        frames(index + 1, anim.frames)
                    yield frame

            return write(write_frames, upscaled(), anim)
        src = read_image(job.source, max_pixels)
        return write(write_image, ImageFile(one(src.pixels, job.out_hw), src.icc_profile, src.exif))
    except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
        raise InputError("out of memory; try a smaller --tile or --max-memory") from exc


def quiet_decoder_warnings() -> None:
    """OpenCV prints libtiff's warnings on odd files; lmf reports a file's trouble in one line of its own."""
    import cv2

    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging is not None:
        logging.setLogLevel(logging.LOG_LEVEL_ERROR)


@contextlib.contextmanager
def terminated_cleanly() -> Iterator[None]:
    """SIGTERM (kill, a job scheduler) ends the command as Ctrl-C does: temp files removed, exit 143."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    fmt: str | None = typer.Option(None, "--format", "-f",
                                   help="png, jpg, webp, gif or tiff (default: as the input)."),
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
    Animated GIF, PNG and WebP keep every frame, its duration and disposal, and the loop count.
    Every page of a multi-page TIFF is kept. A format that holds one image (JPEG) is refused for them.

    --quality is the CMSR level: fast, balanced or fine render calm regions coarser above x4; exact (default) does not.
    --jpeg-quality is the file quality of JPEG and WebP outputs.
    """
    from lmf_cli.api import PRECISIONS
    from lmf_cli.io.images import FORMATS
    from lmf_cli.models.zoo import resolve

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
        frames = f", {job.frames} {job.kind}" if job.frames > 1 else ""
        say(f"{job.source} -> {job.target}: {fmt_size(job.in_hw)} -> {fmt_size(job.out_hw)}{frames}"
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
        quiet_decoder_warnings()
        up = load_upscaler(model, device, precision, quality) if pending else None
        if up is not None:
            say(f"model {up.name} on {up.device} ({up.precision})")
        engine = dict(tile=tile, max_memory=memory, alpha=alpha, cmsr=False if quality == "exact" else quality)
        bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=console, disable=quiet or not console.is_terminal)
        with bars, terminated_cleanly():
            files = bars.add_task("files", total=len(pending))
            tiles, frames = TileBar(bars), FrameBar(bars)
            for job in jobs:
                notes: list[str] = []
                if job.status == "pending":
                    announce(job)
                    t0 = time.perf_counter()
                    try:
                        notes = run_job(job, up, engine, tiles, max_pixels, jpeg_quality, not strip_metadata,
                                        frames)
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
