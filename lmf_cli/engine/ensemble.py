"""Geometric self-ensemble: the image upscaled in its 8 flips and rotations, each turned back and averaged.

A quality knob for those who would rather wait than lose detail (8x the time): the network sees the
same content in every orientation and their errors partly cancel. Each pass is an ordinary upscale
(tiled exactly, CMSR as asked), so the ensemble keeps every guarantee of one pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (transpose, flip rows, flip columns): the 8 symmetries of the square.
TRANSFORMS = tuple((t, r, c) for t in (False, True) for r in (False, True) for c in (False, True))


def _forward(x: torch.Tensor, transform: tuple[bool, bool, bool]) -> torch.Tensor:
    transpose, rows, cols = transform
    if transpose:
        x = x.transpose(-2, -1)
    dims = [d for d, on in ((-2, rows), (-1, cols)) if on]
    return x.flip(dims) if dims else x


def _backward(x: torch.Tensor, transform: tuple[bool, bool, bool]) -> torch.Tensor:
    transpose, rows, cols = transform
    dims = [d for d, on in ((-2, rows), (-1, cols)) if on]
    x = x.flip(dims) if dims else x
    return x.transpose(-2, -1) if transpose else x


def self_ensemble(upscale: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor], inp: torch.Tensor,
                  out_hw: tuple[int, int]) -> torch.Tensor:
    """The mean of `upscale(t(inp), t(out_hw))` turned back, over the 8 symmetries t. `upscale` maps a
    (B, C, h, w) tensor and an output (H, W) to (B, C, H, W); the result is on `upscale`'s device."""
    total = None
    for transform in TRANSFORMS:
        size = (out_hw[1], out_hw[0]) if transform[0] else out_hw
        out = _backward(upscale(_forward(inp, transform), size), transform)
        total = out.clone() if total is None else total.add_(out)
    return total.div_(len(TRANSFORMS))
