"""Parsing what `upscale` and `video` share on the command line: the size options and -o."""

from __future__ import annotations

import math
import os
from pathlib import Path

from lmf_cli.errors import InputError
from lmf_cli.io.images import FORMATS, OUTPUT_FORMATS, WRITABLE
from lmf_cli.jobs.images import Sizing, exists

SIZE_OPTIONS = "--scale (or --scale-x/--scale-y), --width/--height, --size or --fit"


def parse_wxh(text: str, option: str) -> tuple[int, int]:
    """'1920x1080' -> (height, width); sizes are written W x H everywhere."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"{option} {text!r} must look like WIDTHxHEIGHT, e.g. 1920x1080") from None
    if w <= 0 or h <= 0:
        raise InputError(f"{option} {text}: width and height must be positive")
    return h, w


def parse_scales(text: str, option: str) -> list[float]:
    """'2,3,4' -> [2.0, 3.0, 4.0]: the factors evaluations and benchmarks run at, each finite and >= 1."""
    try:
        scales = [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{option} {text!r} must be numbers separated by commas, e.g. 2,3,4") from None
    bad = [v for v in scales if not math.isfinite(v) or v < 1]
    if bad:
        raise InputError(f"{option} {text}: every factor must be a finite number of at least 1 (got {bad[0]:g})")
    return scales


def parse_sizing(scale: float | None, scale_x: float | None, scale_y: float | None, width: int | None,
                 height: int | None, size: str | None, fit: str | None) -> Sizing:
    """Check the size options once, before any file is touched."""
    groups = [scale is not None or scale_x is not None or scale_y is not None,
              width is not None or height is not None, size is not None, fit is not None]
    if sum(groups) != 1:
        raise InputError(f"give one of {SIZE_OPTIONS}")
    for option, value in (("--scale", scale), ("--scale-x", scale_x), ("--scale-y", scale_y)):
        if value is None:
            continue
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"{option} {value:g} must be a positive number")
        if value < 1:
            raise InputError(f"{option} {value:g}: lmf only enlarges (scale >= 1 on each axis); use a resampler "
                             "such as Pillow's LANCZOS to shrink")
    if groups[0]:
        base = scale if scale is not None else 1.0
        factors = (scale_y if scale_y is not None else base, scale_x if scale_x is not None else base)
        return Sizing(scale=factors, uniform=scale_x is None and scale_y is None)
    for option, value in (("--width", width), ("--height", height)):
        if value is not None and value <= 0:
            raise InputError(f"{option} {value} must be a positive number of pixels")
    if size is not None:
        h, w = parse_wxh(size, "--size")
        return Sizing(width=w, height=h)
    if fit is not None:
        return Sizing(box=parse_wxh(fit, "--fit"))
    return Sizing(width=width, height=height)


def output_place(output: str | None, inputs: list[str], fmt: str | None) -> tuple[Path | None, Path | None]:
    """(output file, output folder) from -o: a file only for a single input file."""

    if output is None:
        return None, None
    path = Path(output)
    folder = path.is_dir() or output.endswith(("/", os.sep)) or not path.suffix
    for parent in ([path] if folder else []) + list(path.parents):
        if exists(parent) and not parent.is_dir():
            raise InputError(f"-o {output}: {parent} is a file, not a folder")
    if folder:
        return None, path
    if len(inputs) == 1 and Path(inputs[0]).is_file():
        if path.suffix.lower() not in WRITABLE:
            raise InputError(f"-o {output}: lmf writes {', '.join(OUTPUT_FORMATS)} files")
        if fmt is not None and FORMATS[fmt] != FORMATS[path.suffix.lower()[1:]]:
            raise InputError(f"-o {output} does not match --format {fmt}")
        return path, None
    if path.suffix.lower() in WRITABLE:
        raise InputError(f"-o {output}: several inputs need an output folder, not a file")
    return None, path
