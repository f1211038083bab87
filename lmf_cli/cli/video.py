"""`lmf video`: plan, run the pipeline with a bar, and say how to resume after Ctrl-C."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmf_cli.batch import fmt_size, parse_sizing
from lmf_cli.cli.common import (
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
    open_upscaler,
    report,
    start_pool,
)
from lmf_cli.errors import InputError, LmfError

if TYPE_CHECKING:
    from lmf_cli.api import Upscaler
    from lmf_cli.io.video import VideoProgress


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
    try:
        on_cpu = pick_device(device).type == "cpu"
    except RuntimeError as exc:
        raise InputError(f"--device {device}: {str(exc).splitlines()[0]}") from exc
    choice = choose_model("compressed", light=on_cpu)
    return choice.name, f"video is compressed; {choice.reason}"


def video_upscaler(model: str | None, device: str, precision: str) -> Upscaler:
    return open_upscaler(video_model(model, device)[0], device, precision, "exact")


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
                                     help="Shipped model name or weights file (default: the robust model for "
                                          "the device, lmf-real-lite on a CPU, lmf-real on a GPU; see lmf models)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    precision: str = typer.Option("auto", "--precision", help="Encoder precision: auto (fp16 on CUDA, bf16 on "
                                  "CPUs with native bf16, else fp32), fp32, bf16 or fp16."),
    tile: int | None = typer.Option(None, "--tile", help="Tile side in input pixels (default: from memory)."),
    batch: int | None = typer.Option(None, "--batch", min=1, help="Frames per model call (default: 1 on a CPU, "
                                     "from free memory on a GPU)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    ray: RayAddress = None,
    workers: Workers = None,
) -> None:
    """Upscale every frame of a video; audio, subtitles, timestamps, rotation and colour tags are kept.

    The output is written to a temp file and renamed when complete; Ctrl-C keeps the finished
    segments so that --resume continues the job. --ray encodes the segments on a Ray cluster
    (the same frames); --resume continues a local or a cluster run either way.
    """
    from lmf_cli.io.video import default_suffix, parse_time, plan_video, run_video, work_dir

    sizing = checked(parse_sizing, scale, scale_x, scale_y, width, height, size, fit)
    if workers is not None and ray is None:
        fail("--workers sizes the Ray pool: give --ray too")
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
    load = functools.partial(video_upscaler, model, device, precision)
    pool = up = None
    if ray is not None:
        pool = start_pool(ray, workers, load, device)
        engine = pool.describe()
    else:
        try:
            up = load()
            why = video_model(model, device)[1]
        except LmfError as exc:
            fail(str(exc))
        engine = f"model {up.name} on {up.device} ({up.precision}; {why})"

    def say(message: str) -> None:
        if not quiet:
            console.print(escape(message), highlight=False)

    frames = f", ~{plan.total} frames" if plan.total else ""
    say(f"{source} -> {target}: {fmt_size(plan.display_in)} -> {fmt_size(plan.display_out)}, {plan.codec} "
        f"{plan.pix_fmt}{frames}; {engine}")
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

            def shown(p: VideoProgress) -> None:
                bars.update(task, completed=p.done, total=p.total, fps=p.fps, size=_megabytes(p.out_bytes))

            if pool is not None:
                from lmf_cli.cluster import upscale_video

                result = upscale_video(pool, plan, target, overwrite=overwrite, resume=resume, tile=tile, batch=batch,
                                       progress=shown)
            else:
                result = run_video(plan, target, up, overwrite=overwrite, resume=resume, tile=tile, batch=batch,
                                   progress=shown)
    except LmfError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        report("interrupted", f"no output written; finished segments are kept in {work}; run the same command "
                              "with --resume to continue")
        raise typer.Exit(130) from None
    finally:
        if pool is not None:
            pool.close()
    resumed = f" ({result.resumed_frames} resumed)" if result.resumed_frames else ""
    say(f"wrote {target}: {result.frames} frames{resumed} in {result.seconds:.1f} s ({result.fps:.2f} fps), "
        f"{_megabytes(result.out_bytes)}")
