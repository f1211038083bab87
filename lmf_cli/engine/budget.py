"""Memory budgets: how big a tile and a render block may be on this device."""

from __future__ import annotations

import math
import warnings

import torch

from lmf_cli.errors import option_name
from lmf_cli.models.base import Capabilities


def render_block(capabilities: Capabilities, max_memory: int | None, fused: bool = False,
                 device: torch.device | None = None) -> tuple[int, int]:
    """Output block (rows, cols) rendered at once. With PyTorch on a CPU, small enough that
    the render MLP's activations (4 neighbours x width floats per pixel) stay in cache: the
    hidden layers are memory-bound elementwise work there. The compiled kernel keeps its
    activations in registers, so its blocks are large (a few RGB buffers of this size). On a
    GPU, as large as the memory budget allows (a whole tile's output where it fits): each
    block is a few kernel launches, so fewer, larger blocks keep the device busy."""
    if fused:
        bytes_per_pixel, pixels = 4 * 3 * 3, 1 << 20
    else:
        bytes_per_pixel = 4 * 4 * capabilities.render_width
        pixels = (4 << 20) // bytes_per_pixel
    if device is not None and device.type == "cuda":
        budget = default_budget(device) if max_memory is None else max_memory
        pixels = min(MAX_GPU_BLOCK, budget // GPU_LIVE_COPIES // bytes_per_pixel)
    elif max_memory is not None:
        pixels = max(256, min(pixels, max_memory // 8 // bytes_per_pixel))
    side = max(16, int(math.sqrt(pixels)))
    return side, side


# A GPU block: at most a 4K frame (3840x2160 output) at once; the render MLP keeps about this many
# activation tensors of the block alive at a time (inputs, two hidden layers, the ensemble sum).
MAX_GPU_BLOCK = 4096 * 4096
GPU_LIVE_COPIES = 6


CPU_DEFAULT_BUDGET = 1 << 30


def default_budget(device: torch.device) -> int:
    """Working memory for one tile: half the free VRAM on a GPU; on a CPU a quarter of the
    free RAM, at most 1 GiB, which keeps a 2000x1500 x2 upscale well under 2 GB resident."""
    if device.type == "cuda":
        return _free_memory(device) // 2
    return min(_free_memory(device) // 4, CPU_DEFAULT_BUDGET)


def default_tile(capabilities: Capabilities, max_memory: int | None, device: torch.device) -> int:
    """Largest tile side (input pixels, margin included) whose activations fit the budget:
    a few encoder feature maps plus the latent tables, per LR pixel."""
    if capabilities.tile_grid is None:  # global reach: never cut silently (plan_tile weighs the image)
        return WHOLE_IMAGE
    side = int(math.sqrt(_tile_budget(max_memory, device) / _tile_bytes_per_pixel(capabilities)))
    side -= 2 * capabilities.tile_margin
    # A core at least as wide as the margin: encoders that see far (SwinIR's ~260 pixels) would otherwise
    # get 16-pixel cores, each encoding a piece ~35 times its area (the whole of a small image).
    return _on_grid(side, max(16, capabilities.tile_margin), capabilities)


# A tile side no image reaches: the whole image is one tile.
WHOLE_IMAGE = 1 << 30
# Default tiles are whole multiples of this (and of the model's tile_grid): encoders with attention
# windows (SwinIR's 8) keep tiles on their window grid even where their family does not declare it.
TILE_STEP = 16


def _tile_budget(max_memory: int | None, device: torch.device) -> int:
    """The budget a tile is sized from: max_memory or the device default, never under 16 MiB."""
    return max(default_budget(device) if max_memory is None else max_memory, 1 << 24)


def _tile_bytes_per_pixel(capabilities: Capabilities) -> int:
    """A tile's memory per LR pixel: a few encoder feature maps plus the latent tables."""
    return 4 * (4 * capabilities.feature_channels + 3 * capabilities.latent_channels)


def _on_grid(side: int, at_least: int, capabilities: Capabilities) -> int:
    """`side` rounded down to the tile step, but not below `at_least` rounded up to it."""
    step = math.lcm(TILE_STEP, capabilities.tile_grid or 1)
    return max(-(-at_least // step) * step, side // step * step)


def _measured(capabilities: Capabilities) -> str:
    found = capabilities.tile_difference
    return "" if found is None else f" (measured with random weights: up to {found:g} 8-bit levels)"


def plan_tile(capabilities: Capabilities, in_hw: tuple[int, int], tile: int | None, max_memory: int | None,
              device: torch.device) -> int:
    """The tile side of an upscale (what `options.tile or default_tile(...)` decides, knowing the image).

    The whole image when it fits the memory budget and no side was asked for. Otherwise, finite reach:
    the asked or default side, on the model's tile grid (rounded up for an asked one), so tiles stay
    exact. Global reach (`tile_grid` None): the whole image while it fits the memory
    budget; otherwise, and when a tile was asked for, tiles that differ from a whole-image run, said
    before any work starts (a warning with the measured size of the difference), never silently."""
    h, w = in_hw
    budget, bytes_per_pixel = _tile_budget(max_memory, device), _tile_bytes_per_pixel(capabilities)
    if tile is None and h * w * bytes_per_pixel <= budget:
        return WHOLE_IMAGE  # one piece: no margin recomputed, whatever the reach
    if capabilities.tile_grid is not None:
        if tile is None:
            return default_tile(capabilities, max_memory, device)
        grid = capabilities.tile_grid
        return -(-tile // grid) * grid
    why = "a tile size was asked for" if tile is not None else "the image does not fit the memory budget"
    if tile is None:
        tile = max(16, int(math.sqrt(budget / bytes_per_pixel)))
    if tile >= max(h, w):
        return WHOLE_IMAGE
    warnings.warn(f"{capabilities.family} attends over the whole image, so {tile}-pixel tiles will differ from "
                  f"a whole-image run{_measured(capabilities)}; "
                  f"{why}; give more memory ({option_name('max_memory')}) or no tile size for an exact result",
                  stacklevel=2)
    return tile


def stream_plan(capabilities: Capabilities, max_memory: int | None, device: torch.device,
                width: int) -> tuple[int, int, int]:
    """(input rows pushed through the streamed encoder at once, rows of a band of tiles, columns
    of a tile) for an image `width` pixels wide. A sixteenth of the budget holds the encoder's live
    maps for a chunk of rows, an eighth the band of feature rows the tiles of a band read (as wide
    as the image), a quarter one tile's latent tables: wide images get shorter, wider tiles. The
    rest is headroom for the allocator, which cannot reuse every freed block of varying sizes."""
    budget = _tile_budget(max_memory, device)
    feature_row = 4 * capabilities.feature_channels * width
    chunk = int(min(MAX_STREAM_CHUNK, max(MIN_STREAM_CHUNK, budget // 16 // (ENCODER_LIVE_MAPS * feature_row))))
    per_pixel = 4 * (3 * capabilities.latent_channels + capabilities.feature_channels)
    margin = 2 * capabilities.decoder_margin
    rows = int(min(math.sqrt(budget / 4 / per_pixel), budget / 8 / feature_row - chunk))
    columns = int(budget / 4 / per_pixel / max(rows, 16))
    return chunk, max(16, rows - margin), max(16, columns - margin)


ENCODER_LIVE_MAPS = 4
MIN_STREAM_CHUNK, MAX_STREAM_CHUNK = 8, 64


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", 4 << 30)


MAX_FRAMES_PER_CALL = 16


def frames_fitting(capabilities: Capabilities, device: torch.device, in_hw: tuple[int, int],
                   out_hw: tuple[int, int], max_memory: int | None = None) -> int:
    """Same-size images whose encoder activations and float outputs fit the memory budget at once (at
    least 1): the bound on frames per model call, and so on the frames queued around it."""
    budget = default_budget(torch.device(device)) if max_memory is None else max_memory
    per_frame = 4 * (in_hw[0] * in_hw[1] * 6 * capabilities.feature_channels + out_hw[0] * out_hw[1] * 3 * 4)
    return max(1, int(budget // max(per_frame, 1)))


def frames_per_call(capabilities: Capabilities, device: torch.device, in_hw: tuple[int, int],
                    out_hw: tuple[int, int], max_memory: int | None = None) -> int:
    """Same-size images per model call (video frames, still files): 1 on a CPU (the cores are busy
    with one image; measured, a batch only adds latency), else as many as fit half the free device
    memory, up to 16."""
    if torch.device(device).type == "cpu":
        return 1
    return min(MAX_FRAMES_PER_CALL, frames_fitting(capabilities, device, in_hw, out_hw, max_memory))
