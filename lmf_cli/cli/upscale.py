"""`lmf upscale`: files, folders and globs through the Upscaler, with bars and a batch report."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from lmf_cli.cli.arguments import output_place, parse_sizing
from lmf_cli.cli.common import (
    Alpha,
    Device,
    FitWxH,
    Height,
    MaxMemory,
    MaxPixels,
    Precision,
    Quality,
    RayAddress,
    Scale,
    ScaleX,
    ScaleY,
    SizeWxH,
    Tile,
    Width,
    Workers,
    checked,
    console,
    engine_options,
    fail,
    load_upscaler,
    open_upscaler,
    report,
    start_pool,
)
from lmf_cli.errors import LmfError
from lmf_cli.io.formats import FORMAT_CHOICES, format_help
from lmf_cli.jobs.images import FileOptions, Job, ModelChoice, expand_inputs, fmt_size, plan_jobs, run_batch
from lmf_cli.jobs.signals import exit_code, stop_on_signals

if TYPE_CHECKING:
    from lmf_cli.api import Upscaler


class BarEvents:
    """The batch runner's events on the terminal: the files bar, the tiles and frames bars of the current
    file, and the per-file lines."""

    def __init__(self, bars: Progress, total: int, say: Callable[[str], None], announce: Callable[[Job], None],
                 finish: Callable[[Job, list[str] | None], None]) -> None:
        self.bars, self.say, self.announce, self.settled = bars, say, announce, finish
        self.files = bars.add_task("files", total=total, rate="")
        self.tiles, self.frames = TileBar(bars), FrameBar(bars)
        self.pixels = 0.0

    def loaded(self, up: Upscaler) -> None:
        self.say(f"model {up.name} on {up.device} ({up.precision})")

    def started(self, job: Job, model: str, why: str) -> None:
        self.announce(job)
        if why:
            self.say(f"  {model}: {why}")

    def ended(self, job: Job, notes: list[str]) -> None:
        self.bars.advance(self.files)
        if job.status == "done":
            self.pixels += job.frames * job.out_hw[0] * job.out_hw[1] / 1e6
            self.say(f"wrote {job.target} in {job.seconds:.2f} s")
        elapsed = self.bars.tasks[self.files].elapsed
        self.bars.update(self.files, rate=f"{self.pixels / elapsed:.2f} MP/s" if elapsed else "")
        self.settled(job, notes)


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


class RateColumn(ProgressColumn):
    """Megapixels written per second, on the files bar (the tiles and frames bars have none)."""

    def render(self, task: Task) -> Text:
        return Text(task.fields.get("rate", ""))


class FrameBar:
    """The frames of an animation (or pages of a TIFF); shown only for files of more than one."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.task = bars.add_task("frames", total=None, visible=False)

    def __call__(self, done: int, total: int) -> None:
        self.bars.update(self.task, total=total, completed=done, visible=total > 1)


def quiet_decoder_warnings() -> None:
    """OpenCV prints libtiff's warnings on odd files; lmf reports a file's trouble in one line of its own."""
    import cv2

    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging is not None:
        logging.setLogLevel(logging.LOG_LEVEL_ERROR)


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
    fmt: str | None = typer.Option(None, "--format", "-f", help=format_help()),
    jpeg_quality: int = typer.Option(95, "--jpeg-quality",
                                     help="JPEG, WebP, AVIF, HEIC and JPEG XL file quality, 1..100 "
                                          "(100: lossless AVIF and JXL, 4:4:4 HEIC)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs (never an input)."),
    strip_metadata: bool = typer.Option(False, "--strip-metadata", help="Drop the ICC profile and EXIF."),
    alpha: Alpha = "model",
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="List what would be written, and the sizes."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    json_lines: bool = typer.Option(False, "--json", help="One JSON line per file on stdout, for scripts."),
    max_pixels: MaxPixels = "400M",
    model: str | None = typer.Option(None, "--model", "-m", help="Shipped model name or weights file (default: "
                                     "chosen per file by --input-quality; see lmf models)."),
    input_quality: str = typer.Option("auto", "--input-quality",
                                      help="Without --model: auto (per file: JPEG under quality 90, lossy WebP, "
                                           "HEIC and AVIF are compressed), clean (lmf-edsr) or compressed "
                                           "(lmf-real, trained on JPEG, noise and video artefacts)."),
    device: Device = "auto",
    tile: Tile = None,
    max_memory: MaxMemory = None,
    quality: Quality = "exact",
    precision: Precision = "auto",
    ray: RayAddress = None,
    workers: Workers = None,
) -> None:
    """Upscale images to any size with the model.

    Output size per axis = round(input x scale), halves rounded up; sizes are written W x H.
    Outputs are named <stem>_x<scale>.<ext> (--scale) or <stem>_<W>x<H>.<ext> (other sizes), beside the input.
    Existing outputs are skipped (--overwrite), inputs are never written over, and every write is atomic.
    Bit depth (8/10/12/16), grayscale, alpha, ICC profile and EXIF are kept; EXIF orientation is applied.
    Animated GIF, PNG and WebP keep every frame, its duration and disposal, and the loop count.
    Every page of a multi-page TIFF is kept. A format that holds one image (JPEG) is refused for them.

    Without --model, each file gets the model for what it is: compressed files (JPEG under quality 90, lossy WebP,
    HEIC, AVIF) the robust lmf-real, clean ones lmf-edsr (--input-quality clean|compressed decides for all).
    --quality is the CMSR level: fast, balanced or fine render calm regions coarser above x4; exact (default) does not.
    --jpeg-quality is the file quality of JPEG, WebP, AVIF, HEIC and JPEG XL outputs.
    --ray runs the batch on a Ray cluster (the same files, byte for byte); see the README.
    """
    from lmf_cli.io.images import FORMATS
    from lmf_cli.models.zoo import DEFAULT_MODEL, INPUT_QUALITIES, resolve

    start = time.perf_counter()
    sizing = checked(parse_sizing, scale, scale_x, scale_y, width, height, size, fit)
    for option, value, choices in (("--format", fmt, FORMAT_CHOICES),
                                   ("--input-quality", input_quality, INPUT_QUALITIES)):
        if value is not None and value not in choices:
            fail(f"{option} {value}: choose one of {', '.join(choices)}")
    engine = engine_options(device, precision, tile, max_memory, quality, max_pixels, alpha)
    options = checked(FileOptions, engine, jpeg_quality, not strip_metadata)
    if workers is not None and ray is None:
        fail("--workers sizes the Ray pool: give --ray too")
    fmt = FORMATS[fmt][1:] if fmt else None
    out_file, out_dir = checked(output_place, output, inputs, fmt)
    jobs = expand_inputs(inputs, recursive, out_dir.resolve() if out_dir else None)
    plan_jobs(jobs, sizing, engine.max_pixels, fmt, out_file, out_dir, recursive, overwrite)
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

    models = ModelChoice(model, input_quality)
    if dry_run:
        try:
            resolve(model or DEFAULT_MODEL)
        except LmfError as exc:
            fail(str(exc))
        for job in jobs:
            if job.status == "pending":
                job.status = "dry-run"
                announce(job)
                chosen, why = models.for_job(job)
                if why:
                    say(f"  {chosen}: {why}")
            finish(job)
    else:
        quiet_decoder_warnings()
        bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        RateColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                        disable=quiet or not console.is_terminal)
        try:
            with bars, stop_on_signals():
                events = BarEvents(bars, len(pending), say, announce, finish)
                if ray is None:
                    run_batch(jobs, options, models, functools.partial(load_upscaler, options=engine), events)
                else:  # the planner's refusals first, then each file as a worker finishes it
                    chosen, why = models.for_batch(pending)
                    if why:
                        say(f"model {chosen}: {why}")
                    pool = start_pool(ray, workers, functools.partial(open_upscaler, chosen, engine), device) \
                        if pending else None
                    for job in jobs:
                        if job.status != "pending":
                            finish(job)
                    if pool is not None:
                        from lmf_cli.cluster import upscale_files

                        say(pool.describe())
                        try:
                            upscale_files(pool, pending, options, on_start=announce, on_done=events.ended)
                        finally:
                            pool.close()
        except KeyboardInterrupt as interrupt:
            report("interrupted", "finished files are written; no partial file is left")
            raise typer.Exit(exit_code(interrupt)) from None
    counts = {s: sum(j.status == s for j in jobs) for s in ("done", "dry-run", "skipped", "failed")}
    first = f"would write {counts['dry-run']}" if dry_run else f"done {counts['done']}"
    say(f"{first}, skipped {counts['skipped']}, failed {counts['failed']} in {time.perf_counter() - start:.1f} s")
    if counts["failed"]:
        raise typer.Exit(1)
