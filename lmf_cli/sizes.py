"""Output sizes and the cell: one rounding rule, one clip above the training range."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmf_cli.errors import InputError

TRAINED_MAX_SCALE = 4.0  # training samples scales in U(1, 4); above it the cell is clipped and quality drops


Scale = float | tuple[float, float]


def rel_cell_for(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[float, float]:
    """Cell in LR-pixel units, (2h/H, 2w/W), times max(s/4, 1) per axis above the training range."""
    cells = []
    for n_in, n_out in zip(in_hw, out_hw, strict=True):
        scale = n_out / n_in
        cells.append(2 * n_in / n_out * max(scale / TRAINED_MAX_SCALE, 1.0))
    return cells[0], cells[1]


def round_size(value: float) -> int:
    """The one rounding rule for output sizes: halves round up, at least 1."""
    return max(1, math.floor(value + 0.5))


def scaled_size(in_hw: tuple[int, int], scale: float | tuple[float, float]) -> tuple[int, int]:
    """round(input x scale) per axis."""
    sy, sx = (scale, scale) if isinstance(scale, (int, float)) else scale
    return round_size(in_hw[0] * sy), round_size(in_hw[1] * sx)


@dataclass(frozen=True)
class Plan:
    """What an upscale will do: sizes in (height, width)."""

    in_hw: tuple[int, int]
    out_hw: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        return self.out_hw[0] / self.in_hw[0], self.out_hw[1] / self.in_hw[1]


def plan_size(in_hw: tuple[int, int], scale: Scale | None = None,
              size: tuple[int, int] | None = None) -> Plan:
    """Resolve `scale` (one factor or (y, x)) or `size` (height, width) to an output size.

    Output = round(input x scale) per axis. lmf only enlarges: factors below 1 are refused,
    because the decoder was never trained to shrink (its cell would be > 2 LR pixels) and a
    resampler does that job better.
    """
    if (scale is None) == (size is None):
        raise InputError("give exactly one of scale or size")
    if size is not None:
        out_hw = (int(size[0]), int(size[1]))
        if min(out_hw) <= 0:
            raise InputError(f"output size {out_hw[1]}x{out_hw[0]} must be positive")
    else:
        factors = (scale, scale) if isinstance(scale, (int, float)) else tuple(scale)
        if len(factors) != 2 or not all(np.isfinite(f) and f > 0 for f in factors):
            raise InputError(f"scale {scale!r} must be a positive number or a (y, x) pair")
        out_hw = scaled_size(in_hw, (float(factors[0]), float(factors[1])))
    if out_hw[0] < in_hw[0] or out_hw[1] < in_hw[1]:
        raise InputError(
            f"{in_hw[1]}x{in_hw[0]} -> {out_hw[1]}x{out_hw[0]} would shrink the image; lmf only "
            "enlarges (scale >= 1 on each axis); use a resampler such as Pillow's LANCZOS to shrink")
    return Plan(in_hw, out_hw)
