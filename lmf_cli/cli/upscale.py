"""`lmf upscale`: files, folders and globs through the Upscaler, with bars and a batch report."""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from lmf_cli.batch import (
    OUTPUT_FORMATS,
    FileOptions,
    Job,
    expand_inputs,
    fmt_size,
    output_place,
    parse_sizing,
    plan_jobs,
    same_size_batch,
    upscale_file,
    upscale_same_size,
)
from lmf_cli.cli.common import (
    ALPHA_MODES,
    CMSR_LEVELS,
    FitWxH,
    Height,
    RayAddress,
    Scale,
    ScaleX,
    ScaleY,
    SizeWxH,
    Width,
    Workers,
    checked,
    console,
    fail,
    load_upscaler,
    open_upscaler,
    parse_amount,
    report,
    start_pool,
)
from lmf_cli.errors import LmfError

if TYPE_CHECKING:
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


def same_size_run(jobs: list[Job], start: int, limit: int, models: ModelChoice) -> list[Job]:
    """jobs[start] and the pending still images right after it with its sizes and model, up to `limit`."""
    first = jobs[start]
    group = [first]
    if first.frames > 1:
        return group
    model = models.for_job(first)[0]
    for job in jobs[start + 1:]:
        if len(group) >= limit or job.status != "pending" or job.frames > 1 or job.in_hw != first.in_hw \
                or job.out_hw != first.out_hw or models.for_job(job)[0] != model:
            break
        group.append(job)
    return group


class ModelChoice:
    """--model, or the shipped model for what each file is (--input-quality), with the reason to print."""

    def __init__(self, model: str | None, input_quality: str) -> None:
        self.model, self.input_quality = model, input_quality
        self.decided: dict[Path, tuple[str, str]] = {}  # grouping asks again: each file's headers are read once

    def for_job(self, job: Job) -> tuple[str, str]:
        """(model, why); why is empty when --model decided."""
        from lmf_cli.io.compression import input_quality
        from lmf_cli.models.zoo import choose_model

        if self.model is not None:
            return self.model, ""
        if self.input_quality != "auto":
            choice = choose_model(self.input_quality, light=False)
            return choice.name, f"--input-quality {self.input_quality}"
        if job.source not in self.decided:
            found = input_quality(job.source)
            self.decided[job.source] = (choose_model(found.kind, light=False).name,
                                        f"{found.reason}: {found.kind} input")
        return self.decided[job.source]

    def for_batch(self, jobs: list[Job]) -> tuple[str, str]:
        """One model for a whole Ray batch (each actor holds one): what most of the files need."""
        from lmf_cli.models.zoo import DEFAULT_MODEL

        if self.model is not None or not jobs:
            return self.model or DEFAULT_MODEL, ""
        picks = [self.for_job(job)[0] for job in jobs]
        chosen = max(set(picks), key=picks.count)
        return chosen, f"chosen for {picks.count(chosen)} of {len(picks)} files by --input-quality {self.input_quality}"


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
                                   help="png, jpg, webp, gif, tiff, avif, heic or jxl (default: as the input)."),
    jpeg_quality: int = typer.Option(95, "--jpeg-quality",
                                     help="JPEG, WebP, AVIF, HEIC and JPEG XL file quality, 1..100 "
                                          "(100: lossless AVIF and JXL, 4:4:4 HEIC)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs (never an input)."),
    strip_metadata: bool = typer.Option(False, "--strip-metadata", help="Drop the ICC profile and EXIF."),
    alpha: str = typer.Option("model", "--alpha", help="Upscale alpha with the model or bicubic."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="List what would be written, and the sizes."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    json_lines: bool = typer.Option(False, "--json", help="One JSON line per file on stdout, for scripts."),
    max_pixels_text: str = typer.Option("400M", "--max-pixels",
                                        help="Largest input or output, in pixels (400M = 400 megapixels)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Shipped model name or weights file (default: "
                                     "chosen per file by --input-quality; see lmf models)."),
    input_quality: str = typer.Option("auto", "--input-quality",
                                      help="Without --model: auto (per file: JPEG under quality 90, lossy WebP, "
                                           "HEIC and AVIF are compressed), clean (lmf-edsr) or compressed "
                                           "(lmf-real, trained on JPEG, noise and video artefacts)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    tile: int | None = typer.Option(None, "--tile", help="Tile side in input pixels (default: from memory)."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Memory budget for tiles, e.g. 2G or 512M."),
    quality: str = typer.Option("exact", "--quality",
                                help="CMSR level: fast, balanced, fine or exact. Not the file quality "
                                     "(that is --jpeg-quality)."),
    precision: str = typer.Option("auto", "--precision", help="Encoder precision: auto (fp16 on CUDA, bf16 on "
                                  "CPUs with native bf16, else fp32), fp32, bf16 or fp16."),
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
    from lmf_cli.api import PRECISIONS
    from lmf_cli.io.images import FORMATS
    from lmf_cli.models.zoo import DEFAULT_MODEL, INPUT_QUALITIES, resolve

    start = time.perf_counter()
    sizing = checked(parse_sizing, scale, scale_x, scale_y, width, height, size, fit)
    for option, value, choices in (("--format", fmt, (*OUTPUT_FORMATS, "jpeg", "tif")),
                                   ("--quality", quality, CMSR_LEVELS), ("--alpha", alpha, ALPHA_MODES),
                                   ("--precision", precision, PRECISIONS),
                                   ("--input-quality", input_quality, INPUT_QUALITIES)):
        if value is not None and value not in choices:
            fail(f"{option} {value}: choose one of {', '.join(choices)}")
    if tile is not None and tile < 1:
        fail(f"--tile {tile} must be at least 1 input pixel")
    if not 1 <= jpeg_quality <= 100:
        fail(f"--jpeg-quality {jpeg_quality} must be between 1 and 100")
    if workers is not None and ray is None:
        fail("--workers sizes the Ray pool: give --ray too")
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
        options = FileOptions(max_pixels, jpeg_quality, not strip_metadata, tile, memory, alpha,
                              False if quality == "exact" else quality)
        bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        RateColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                        disable=quiet or not console.is_terminal)
        with bars, terminated_cleanly():
            files = bars.add_task("files", total=len(pending), rate="")
            pixels = 0.0

            def ended(job: Job, notes: list[str]) -> None:
                nonlocal pixels
                bars.advance(files)
                if job.status == "done":
                    pixels += job.frames * job.out_hw[0] * job.out_hw[1] / 1e6
                    say(f"wrote {job.target} in {job.seconds:.2f} s")
                elapsed = bars.tasks[files].elapsed
                bars.update(files, rate=f"{pixels / elapsed:.2f} MP/s" if elapsed else "")
                finish(job, notes)

            if ray is not None:  # the planner's refusals first, then each file as a worker finishes it
                chosen, why = models.for_batch(pending)
                load = functools.partial(open_upscaler, chosen, device, precision, quality)
                if why:
                    say(f"model {chosen}: {why}")
                pool = start_pool(ray, workers, load, device) if pending else None
                if pool is not None:
                    say(pool.describe())
                for job in jobs:
                    if job.status != "pending":
                        finish(job)
                if pool is not None:
                    from lmf_cli.cluster import upscale_files

                    try:
                        upscale_files(pool, pending, options, on_start=announce, on_done=ended)
                    finally:
                        pool.close()
            else:
                loaded: dict[str, Upscaler] = {}
                tiles, frames = TileBar(bars), FrameBar(bars)
                index = 0
                while index < len(jobs):
                    job = jobs[index]
                    if job.status != "pending":
                        finish(job)
                        index += 1
                        continue
                    chosen, why = models.for_job(job)
                    if chosen not in loaded:
                        up = loaded[chosen] = load_upscaler(chosen, device, precision, quality)
                        say(f"model {up.name} on {up.device} ({up.precision})")
                    up = loaded[chosen]
                    group = same_size_run(jobs, index, same_size_batch(up, job.in_hw, job.out_hw), models)
                    index += len(group)
                    for member in group:
                        announce(member)
                        if why:
                            say(f"  {up.name}: {models.for_job(member)[1]}")
                    t0 = time.perf_counter()
                    if len(group) == 1:
                        try:
                            outcomes: list[list[str] | LmfError] = [upscale_file(job, up, options, tiles=tiles,
                                                                                 frames=frames)]
                        except LmfError as exc:
                            outcomes = [exc]
                    else:  # same-size files on a GPU: one model call for the group
                        outcomes = upscale_same_size(group, up, options)
                    for member, outcome in zip(group, outcomes, strict=True):
                        if isinstance(outcome, LmfError):
                            member.drop("failed", str(outcome))
                        else:
                            member.status = "done"
                        member.seconds = (time.perf_counter() - t0) / len(group)
                        ended(member, [] if isinstance(outcome, LmfError) else outcome)
    counts = {s: sum(j.status == s for j in jobs) for s in ("done", "dry-run", "skipped", "failed")}
    first = f"would write {counts['dry-run']}" if dry_run else f"done {counts['done']}"
    say(f"{first}, skipped {counts['skipped']}, failed {counts['failed']} in {time.perf_counter() - start:.1f} s")
    if counts["failed"]:
        raise typer.Exit(1)
