"""What tiling costs: a large photo upscaled at the memory budget against an untiled crop of it.

Each way runs in a process of its own, so that its peak memory is its own: streamed tiles (the
default), tiles that encode a margin each (what every tile paid before streaming, and what
encoders that cannot stream still pay), and a crop small enough to run whole. Time is compared
per output pixel, which is what a user waits for.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from lmf_cli.engine.tiling import upscale_tensor
from lmf_cli.models.base import ImplicitSR
from lmf_cli.options import EngineOptions

# The three ways a large photo is upscaled, as the rows name them.
UNTILED, STREAMED, MARGINS = "untiled crop", "streamed tiles", "tiles with margins"


@dataclass(frozen=True)
class TilingRow:
    way: str
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    tiles: int
    seconds: list[float]
    peak_mb: float

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def us_per_pixel(self) -> float:
        return self.median_s / (self.out_hw[0] * self.out_hw[1]) * 1e6


def large_picture(photo: np.ndarray, height: int, width: int) -> np.ndarray:
    """The photo resized to width x height (bicubic): a large input with a real photo's content."""
    import cv2

    return np.ascontiguousarray(cv2.resize(photo, (width, height), interpolation=cv2.INTER_CUBIC))


def _measure(model: ImplicitSR, options: EngineOptions, threads: int, way: str, picture: np.ndarray,
             out_hw: tuple[int, int], repeats: int) -> TilingRow:
    """One way, in a fresh process (see benchmark_tiling)."""
    torch.set_num_threads(threads)
    device = next(model.parameters()).device
    inp = torch.from_numpy(picture).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
    h, w = picture.shape[:2]
    cores = [(0, h, 0, w)] if way == MARGINS else None
    call = options if way != UNTILED else EngineOptions(options.device, options.precision, tile=max(h, w))
    tiles = [0]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        upscale_tensor(model, inp, out_hw, call, progress=lambda done, total: tiles.__setitem__(0, total),
                       cores=cores, dtype=torch.uint8)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return TilingRow(way, (h, w), out_hw, tiles[0], seconds, peak)


def benchmark_tiling(model: ImplicitSR, options: EngineOptions, picture: np.ndarray, crop_hw: tuple[int, int],
                     scale: float, repeats: int) -> list[TilingRow]:
    """The three ways on `picture` (the crop from its centre), each in a spawned process that gets a
    copy of `model`: peak memory is a process's high-water mark (GPU: the allocator's), which one
    process cannot reset."""
    h, w = picture.shape[:2]
    ch, cw = min(crop_hw[0], h), min(crop_hw[1], w)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = np.ascontiguousarray(picture[top:top + ch, left:left + cw])
    jobs = [(UNTILED, crop), (STREAMED, picture), (MARGINS, picture)]
    context = multiprocessing.get_context("spawn")
    rows = []
    with context.Pool(1, maxtasksperchild=1) as pool:
        for way, image in jobs:
            out_hw = (round(image.shape[0] * scale), round(image.shape[1] * scale))
            rows.append(pool.apply(_measure, (model, options, torch.get_num_threads(), way, image, out_hw, repeats)))
    return rows
