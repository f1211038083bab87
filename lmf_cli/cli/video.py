"""`lmf video`: the options, the plan, the video runner with a bar (or plain lines), and the report."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmf_cli.cli.arguments import parse_sizing
from lmf_cli.cli.common import (
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
    open_upscaler,
    report,
    start_pool,
)
from lmf_cli.errors import LmfError
from lmf_cli.jobs.images import fmt_size
from lmf_cli.jobs.signals import exit_code, stop_on_signals
from lmf_cli.options import EngineOptions
from lmf_cli.sizes import TRAINED_MAX_SCALE

if TYPE_CHECKING:
    from lmf_cli.api import Upscaler
    from lmf_cli.jobs.video import VideoProgress


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def video_model(model: str | None, device: str) -> tuple[str, str]:
    """The model for video on the machine this runs on (a Ray worker's too), and why: by default the
    robust model that fits the device (video is always compressed): lmf-real-lite on a CPU, lmf-real
    on a GPU."""
    from lmf_cli.api import pick_device
    from lmf_cli.models.zoo import choose_model

    if model is not None:
        return model, "--model"
    on_cpu = pick_device(device).type == "cpu"  # a device this machine lacks: an OptionError naming --device
    choice = choose_model("compressed", light=on_cpu)
    return choice.name, f"video is compressed; {choice.reason}"


def video_upscaler(model: str | None, options: EngineOptions) -> Upscaler:
    return open_upscaler(video_model(model, options.device)[0], options)


def video(
    source: Path = typer.Argument(..., help="Input video file."),
    output: str | None = typer.Option(None, "--output", "-o",
                                      help="Output file or folder (default: <stem>_<size> beside the input, same "
                                           "container if it is .mkv/.mp4/.mov/.m4v/.webm, else .mkv)."),
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
                                     help="Shipped model name or weights file (default: the robust model for "
                                          "the device, lmf-real-lite on a CPU, lmf-real on a GPU; see lmf models)."),
    device: Device = "auto",
    precision: Precision = "auto",
    tile: Tile = None,
    max_memory: MaxMemory = None,
    quality: Quality = "exact",
    max_pixels: MaxPixels = "400M",
    batch: int | None = typer.Option(None, "--batch", min=1, help="Frames per model call (default: 1 on a CPU, "
                                     "from free memory on a GPU)."),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="Copy what did not change since the frame before "
                               "(its input pixels, the model's margin included, are identical) instead of computing "
                               "it again: the same bytes, faster on still regions. --no-reuse computes everything, "
                               "to measure it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    json_line: bool = typer.Option(False, "--json", help="One JSON line on stdout at the end, for scripts."),
    ignore_errors: bool = typer.Option(False, "--ignore-errors", help="Exit 0 even when packets of the input "
                                       "could not be decoded (they are reported either way; every frame that "
                                       "decodes is kept)."),
    ray: RayAddress = None,
    workers: Workers = None,
) -> None:
    """Upscale every frame of a video; audio, subtitles, timestamps, rotation and colour tags are kept.

    The output is written to a temp file and renamed when complete; Ctrl-C (or SIGTERM) keeps the
    finished segments so that --resume continues the job. --ray encodes the segments on a Ray cluster
    (the same frames); --resume continues a local or a cluster run either way. Packets of the input
    that do not decode are reported with their times and make the exit code 1 (--ignore-errors: 0);
    frames whose size changes midway are fitted inside the first size with black bars, and said so.
    """
    from lmf_cli.io.video import default_suffix, parse_time, plan_video, work_dir
    from lmf_cli.jobs.video import finished_segments, run_video

    sizing = checked(parse_sizing, scale, scale_x, scale_y, width, height, size, fit)
    engine = engine_options(device, precision, tile, max_memory, quality, max_pixels)
    if workers is not None and ray is None:
        fail("--workers sizes the Ray pool: give --ray too")
    folder = output is not None and (Path(output).is_dir() or output.endswith(("/", os.sep)))
    given = Path(output) if output is not None and not folder else None
    target_suffix = given.suffix if given is not None else default_suffix(source)
    try:
        start_s = parse_time(start) if start is not None else None
        end_s = parse_time(end) if end is not None else None
        plan = plan_video(source, sizing.out_hw, suffix=target_suffix,
                          codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt, start=start_s, end=end_s,
                          segment_frames=segment_frames)
    except LmfError as exc:
        fail(str(exc))
    name = f"{source.stem}_{sizing.label(plan.display_out)}{default_suffix(source)}"
    target = given or (Path(output) / name if folder else source.with_name(name))
    out_pixels = plan.out_hw[0] * plan.out_hw[1]
    if out_pixels > engine.max_pixels:
        fail(f"{source}: a {fmt_size(plan.out_hw)} frame is {out_pixels:,} pixels, over the limit of "
             f"{engine.max_pixels:,} (--max-pixels)")
    load = functools.partial(video_upscaler, model, engine)
    pool = up = None
    if ray is not None:
        pool = start_pool(ray, workers, load, device)
        running = pool.describe()
    else:
        try:
            up = load()
            why = video_model(model, device)[1]
        except LmfError as exc:
            fail(str(exc))
        running = f"model {up.name} on {up.device} ({up.precision}; {why})"

    def say(message: str) -> None:
        if not quiet:
            console.print(escape(message), highlight=False)

    frames = f", ~{plan.total} frames" if plan.total else ""
    say(f"{source} -> {target}: {fmt_size(plan.display_in)} -> {fmt_size(plan.display_out)}, {plan.codec} "
        f"{plan.pix_fmt}{frames}; {running}")
    factor = max(o / i for o, i in zip(plan.out_hw, plan.in_hw, strict=True))
    if factor > TRAINED_MAX_SCALE + 1e-9:
        report("warning", f"{source}: x{factor:.3g} is beyond the trained range (up to x{TRAINED_MAX_SCALE:g}); "
                          "quality may drop")
    for note in plan.notes:
        if not quiet:
            report("note", note)
    if up is not None and batch is not None and batch > up.frames_fitting(plan.in_hw, plan.out_hw):
        report("warning", f"--batch {batch}: {up.frames_fitting(plan.in_hw, plan.out_hw)} frames fit the memory "
                          "budget (--max-memory); using that many")
    work = work_dir(target)
    bars = Progress(TextColumn("video"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[fps]:.2f} fps"),
                    TextColumn("{task.fields[size]}"), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    disable=quiet or not console.is_terminal)
    plain = PlainProgress(say) if not console.is_terminal else None
    try:
        with bars, stop_on_signals():
            task = bars.add_task("video", total=plan.total, fps=0.0, size=_megabytes(0))

            def shown(p: VideoProgress) -> None:
                bars.update(task, completed=p.done, total=p.total, fps=p.fps, size=_megabytes(p.out_bytes))
                if plain is not None:
                    plain(p)

            if pool is not None:
                from lmf_cli.cluster import run_video_on

                result = run_video_on(pool, plan, target, overwrite=overwrite, resume=resume, batch=batch,
                                      reuse=reuse, progress=shown)
            else:
                result = run_video(plan, target, up, overwrite=overwrite, resume=resume, batch=batch, reuse=reuse,
                                   progress=shown)
    except LmfError as exc:
        fail(str(exc))
    except KeyboardInterrupt as interrupt:
        kept = finished_segments(work)
        if kept:
            report("interrupted", f"no output written; {kept} finished segment{'s are' if kept != 1 else ' is'} kept "
                                  f"in {work}; run the same command with --resume to continue")
        else:
            report("interrupted", "no output written; no segment was finished, so there is nothing to resume")
        raise typer.Exit(exit_code(interrupt)) from None
    finally:
        if pool is not None:
            pool.close()
    resumed = f" ({result.resumed_frames} resumed)" if result.resumed_frames else ""
    reused = f"; {result.reused:.1%} of the frame area reused (unchanged since the frame before)" if reuse else ""
    say(f"wrote {target}: {result.frames} frames{resumed} in {result.seconds:.1f} s ({result.fps:.2f} fps), "
        f"{_megabytes(result.out_bytes)}{reused}")
    for when, (h, w) in result.decoding.resized:
        report("warning", f"{source}: from {when:.2f} s the frames are {w} x {h}, not {fmt_size(plan.in_hw)}: "
                          "fitted inside with their aspect kept (black bars)")
    lost = result.decoding.summary()
    if json_line:
        print(json.dumps({"input": str(source), "output": str(target), "input_size": list(plan.display_in[::-1]),
                          "output_size": list(plan.display_out[::-1]), "frames": result.frames,
                          "resumed_frames": result.resumed_frames, "seconds": round(result.seconds, 3),
                          "fps": round(result.fps, 3), "bytes": result.out_bytes, "reused": round(result.reused, 4),
                          "lost": lost,
                          "resized": [{"from_s": t, "size": [w, h]} for t, (h, w) in result.decoding.resized]}),
              flush=True)
    for line in lost:
        report("warning", f"{source}: {line}")
    if lost:
        report("warning" if ignore_errors else "failed", f"{target} lacks the frames above; every frame that decoded "
                                                         "is in it" + ("" if ignore_errors else " (--ignore-errors "
                                                                                               "accepts that)"))
        if not ignore_errors:
            raise typer.Exit(1)


class PlainProgress:
    """Progress where no bar can be drawn (a log file, nohup): a plain line every few seconds."""

    EVERY_S = 5.0

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say, self.last = say, time.monotonic()

    def __call__(self, p: VideoProgress) -> None:
        now = time.monotonic()
        if now - self.last < self.EVERY_S:
            return
        self.last = now
        left = (p.total - p.done) / p.fps if p.fps > 0 and p.total > p.done else 0
        eta = f", about {left / 60:.1f} min left" if left else ""
        self.say(f"video: {p.done} of ~{p.total} frames, {p.fps:.2f} fps, {_megabytes(p.out_bytes)}{eta}")
