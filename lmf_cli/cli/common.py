"""What every command shares: consoles, one-line errors, amounts, the size options, loading a model.

Errors that users can act on (LmfError) print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from lmf_cli.errors import InputError, LmfError

if TYPE_CHECKING:
    from lmf_cli.api import Upscaler
    from lmf_cli.cluster import WorkerPool

console = Console(stderr=True, soft_wrap=True)
stdout = Console(width=None if sys.stdout.isatty() else 160)  # tables stay readable in logs and pipes
DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"
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
# Running on a Ray cluster (`upscale` and `video`).
RayAddress = Annotated[str | None, typer.Option("--ray", metavar="ADDRESS",
                                                help="Run on Ray: local (this machine, every core and GPU), auto "
                                                     "(the cluster this machine is in), ray://HOST:PORT or the "
                                                     "head's HOST:PORT.")]
Workers = Annotated[int | None, typer.Option("--workers", min=1, help="Model actors on Ray (default: one per GPU, "
                                             "else one per 1-4 cores).")]


def fail(message: str) -> NoReturn:
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


def open_upscaler(model: str, device: str, precision: str, quality: str) -> Upscaler:
    """The Upscaler, with --device and --quality checked once instead of failing on every file.

    Raises LmfError with the line to print: a Ray worker runs this too (see `start_pool`), and its
    error reaches the driver as it is.
    """
    from lmf_cli.api import Upscaler
    from lmf_cli.engine.cmsr import resolve_threshold, supports_cmsr

    try:
        up = Upscaler.load(model, device, precision)
    except (RuntimeError, AssertionError) as exc:  # torch: unknown device, or one this build lacks
        raise InputError(f"--device {device}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from exc
    if quality != "exact":
        if not supports_cmsr(up.model):
            raise InputError(f"--quality {quality}: {up.name} is not an LMF model; CMSR levels need LM-LIIF or LM-LTE")
        try:
            resolve_threshold(up.loaded.cmsr_tables, quality)
        except InputError as exc:
            raise InputError(f"--quality {quality}: {exc}") from exc
    return up


def load_upscaler(model: str, device: str, precision: str, quality: str) -> Upscaler:
    """`open_upscaler`, its error printed as one line (exit 1)."""
    try:
        return open_upscaler(model, device, precision, quality)
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


def require_matplotlib(option: str) -> None:
    """Optional dependencies are checked before the work starts, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail(f"{option} needs matplotlib: pip install 'lmf-cli[plot]'")
