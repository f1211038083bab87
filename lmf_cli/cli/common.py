"""What every command shares: consoles, one-line errors, amounts, the size options, loading a model.

Errors that users can act on (LmfError) print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from lmf_cli.errors import OPTION_NAMES, InputError, LmfError
from lmf_cli.files import atomic_write
from lmf_cli.options import ALPHA_MODES, CMSR_LEVELS, PRECISIONS, EngineOptions

if TYPE_CHECKING:
    from lmf_cli.api import Upscaler
    from lmf_cli.cluster import WorkerPool

console = Console(stderr=True, soft_wrap=True)
stdout = Console(width=None if sys.stdout.isatty() else 160)  # tables stay readable in logs and pipes
# The flag of each option the layers below name in their messages (lmf_cli.errors.option_name): in any
# process that runs the command line (a Ray worker built from it too), errors name what the user typed.
FLAGS = {"device": "--device", "precision": "--precision", "tile": "--tile", "max_memory": "--max-memory",
         "cmsr": "--quality", "alpha": "--alpha", "max_pixels": "--max-pixels", "jpeg_quality": "--jpeg-quality",
         "overwrite": "--overwrite", "recursive": "--recursive", "format": "--format", "output": "-o",
         "resume": "--resume", "ray": "--ray", "codec": "--codec", "crf": "--crf", "preset": "--preset",
         "pix_fmt": "--pix-fmt", "start": "--start", "end": "--end", "record": "--record", "degrade": "--degrade",
         "ema": "--ema", "fit_schedule": "--fit-schedule", "input_quality": "--input-quality",
         "scale": "--scale", "width": "--width", "height": "--height",
         "size": "--size", "fit": "--fit", "batch": "--batch"}
OPTION_NAMES.update(FLAGS)


# The size options `upscale` and `video` share (one rule: round(input x scale) per axis).
Scale = Annotated[float | None, typer.Option("--scale", "-s", help="Factor for both axes, e.g. 3.7.")]
ScaleX = Annotated[float | None, typer.Option("--scale-x", help="Horizontal factor (default: --scale or 1).")]
ScaleY = Annotated[float | None, typer.Option("--scale-y", help="Vertical factor (default: --scale or 1).")]
Width = Annotated[int | None, typer.Option("--width", help="Output width; the height keeps the aspect.")]
Height = Annotated[int | None, typer.Option("--height", help="Output height; the width keeps the aspect.")]
SizeWxH = Annotated[str | None, typer.Option("--size", help="Exact output size WxH, e.g. 1920x1080.")]
FitWxH = Annotated[str | None, typer.Option("--fit", help="Largest size inside the box WxH, aspect kept.")]
# Running on a Ray cluster (`upscale` and `video`).
RayAddress = Annotated[str | None, typer.Option("--ray", metavar="ADDRESS",
                                                help="Run on Ray: local (this machine, every core and GPU), auto "
                                                     "(the cluster this machine is in), ray://HOST:PORT or the "
                                                     "head's HOST:PORT.")]
Workers = Annotated[int | None, typer.Option("--workers", min=1, help="Model actors on Ray (default: one per GPU, "
                                             "else one per 1-4 cores).")]
# The engine options `upscale` and `video` share: one EngineOptions value made by `engine_options`.
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, mps.")]
Precision = Annotated[str, typer.Option("--precision", help="Encoder precision (bf16 takes the latent MLP too): "
                                        "auto (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), fp32, bf16 "
                                        "or fp16.")]
Tile = Annotated[int | None, typer.Option("--tile", help="Tile side in input pixels (default: from memory); "
                                          "tiling never changes the result.")]
MaxMemory = Annotated[str | None, typer.Option("--max-memory", help="Memory budget for tiles, e.g. 2G or 512M "
                                               "(default: a share of free memory).")]
Quality = Annotated[str, typer.Option("--quality", help="CMSR level: fast, balanced, fine or exact (calm regions "
                                      "rendered coarser above x4). Not the file quality (that is --jpeg-quality).")]
MaxPixels = Annotated[str, typer.Option("--max-pixels", help="Largest input or output, in pixels "
                                        "(400M = 400 megapixels).")]
Alpha = Annotated[str, typer.Option("--alpha", help="Upscale alpha with the model or bicubic.")]


T = TypeVar("T")


def fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def checked(parse: Callable[..., T], *args: object) -> T:
    """Run a parser or a constructor of checked values; its InputError becomes `error: ...`, exit 1."""
    try:
        return parse(*args)
    except InputError as exc:
        fail(str(exc))


def report(kind: str, message: str) -> None:
    """One line `kind: message`; paths are printed literally, never read as Rich markup."""
    style = {"failed": "red", "warning": "yellow", "skipped": "dim"}.get(kind, "bold")
    console.print(f"[{style}]{kind}:[/] {escape(message)}", highlight=False, soft_wrap=True)


def write_file(path: Path, write: Callable[[Path], object]) -> None:
    """A report, plot or weights file a command writes: whole or not at all (temp file + rename), and a
    one-line error where it cannot be written, after a run that may have taken hours."""
    try:
        atomic_write(path, write)
    except OSError as exc:
        fail(f"cannot write {path} ({exc.strerror or exc})")


def write_text(path: Path, text: str) -> None:
    """write_file for text (a JSON report)."""
    write_file(path, lambda tmp: tmp.write_text(text))


def parse_amount(text: str, option: str, base: int) -> int:
    """'2G', '512M', '1.5k' or a plain number -> an integer (k/M/G/T are powers of `base`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b|px?)?\s*", text.lower())
    value = float(match[1]) * base ** " kmgt".index(match[2] or " ") if match else 0
    if value < 1:
        fail(f"{option} {text!r} must be a positive amount such as 512M or 2G")
    return int(value)


def engine_options(device: str, precision: str, tile: int | None, max_memory: str | None, quality: str,
                   max_pixels: str, alpha: str = "model") -> EngineOptions:
    """The one EngineOptions value of a command, from its flags; a refusal is `error: --flag ...`, exit 1."""
    for option, value, choices in (("--quality", quality, CMSR_LEVELS), ("--alpha", alpha, ALPHA_MODES),
                                   ("--precision", precision, PRECISIONS)):
        if value not in choices:
            fail(f"{option} {value}: choose one of {', '.join(choices)}")
    try:
        return EngineOptions(device=device, precision=precision, tile=tile,
                             max_memory=parse_amount(max_memory, "--max-memory", 1024) if max_memory else None,
                             cmsr=quality, alpha=alpha, max_pixels=parse_amount(max_pixels, "--max-pixels", 1000))
    except InputError as exc:
        fail(str(exc))


def open_upscaler(model: str, options: EngineOptions) -> Upscaler:
    """The Upscaler, with the device and the CMSR level checked once instead of failing on every file.

    Raises LmfError with the line to print: a Ray worker runs this too (see `start_pool`), and its
    error reaches the driver as it is.
    """
    from lmf_cli.api import Upscaler

    return Upscaler.load(model, options)


def load_upscaler(model: str, options: EngineOptions) -> Upscaler:
    """`open_upscaler`, its error printed as one line (exit 1)."""
    try:
        return open_upscaler(model, options)
    except LmfError as exc:
        fail(str(exc))


def start_pool(address: str, workers: int | None, load: Callable[[], Upscaler], device: str) -> WorkerPool:
    """Model actors on Ray for --ray, each building its model with `load` (a module-level function or a
    partial of one: it is pickled to the workers); one-line errors. GPUs are used where the cluster has
    them unless --device names the CPU (or MPS)."""
    from lmf_cli.cluster import WorkerPool

    try:
        return WorkerPool.start(address, load, workers=workers, gpus=device.split(":")[0] not in ("cpu", "mps"))
    except LmfError as exc:
        fail(str(exc))


def data_sets(*names: str, option: str) -> list[Path]:
    """The HR folders of standard image sets (`Set5`, `T91`, ...) under $LMF_DATA, for commands run
    without `option`; a one-line error when LMF_DATA is unset or lacks one of them."""
    root = os.environ.get("LMF_DATA")
    if not root:
        fail(f"give {option}, or set LMF_DATA to the folder that holds {', '.join(f'{n}/HR' for n in names)}")
    folders = [Path(root) / name / "HR" for name in names]
    for folder in folders:
        if not folder.is_dir():
            fail(f"LMF_DATA={root} has no {folder.relative_to(root)}; give {option} or fix LMF_DATA")
    return folders


def require_matplotlib(option: str) -> None:
    """Optional dependencies are checked before the work starts, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail(f"{option} needs matplotlib: pip install 'lmf-cli[plot]'")
