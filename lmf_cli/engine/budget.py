"""Memory budgets: how big a tile and a render block may be on this device."""

from __future__ import annotations

import math

import torch

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
    budget = default_budget(device) if max_memory is None else max_memory
    bytes_per_pixel = 4 * (4 * capabilities.feature_channels + 3 * capabilities.latent_channels)
    side = int(math.sqrt(max(budget, 1 << 24) / bytes_per_pixel)) - 2 * capabilities.tile_margin
    return max(16, side)


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
