"""Memory budgets: how big a tile and a render block may be on this device."""

from __future__ import annotations

import math

import torch

from lmf_cli.models.base import ImplicitSR


def render_block(model: ImplicitSR, max_memory: int | None, fused: bool = False,
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
        width = max(layer.out_features for layer in model.imnet.linears)
        bytes_per_pixel = 4 * 4 * width
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


def tile_margin(model: ImplicitSR) -> int:
    """Input pixels a tile must add on each side so its core sees what the whole image sees:
    the encoder's receptive field, the 3x3 latent conv/unfold, the ensemble neighbour and
    the bilinear skip's second tap."""
    return int(getattr(model.encoder, "receptive_radius", 64)) + 3


CPU_DEFAULT_BUDGET = 1 << 30


def default_budget(device: torch.device) -> int:
    """Working memory for one tile: half the free VRAM on a GPU; on a CPU a quarter of the
    free RAM, at most 1 GiB, which keeps a 2000x1500 x2 upscale well under 2 GB resident."""
    if device.type == "cuda":
        return _free_memory(device) // 2
    return min(_free_memory(device) // 4, CPU_DEFAULT_BUDGET)


def default_tile(model: ImplicitSR, max_memory: int | None, device: torch.device) -> int:
    """Largest tile side (input pixels, margin included) whose activations fit the budget:
    a few encoder feature maps plus the latent tables, per LR pixel."""
    budget = default_budget(device) if max_memory is None else max_memory
    width = getattr(model.encoder, "out_dim", 64)
    latent = model.hypernet.linears[-1].out_features if hasattr(model, "hypernet") else 9 * width
    bytes_per_pixel = 4 * (4 * width + 3 * latent)
    side = int(math.sqrt(max(budget, 1 << 24) / bytes_per_pixel)) - 2 * tile_margin(model)
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


MAX_VIDEO_BATCH = 16


def video_batch(model: ImplicitSR, device: torch.device, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Frames per model call for video: 1 on a CPU (the cores are busy with one frame; a batch
    only adds latency), else as many as fit half the free device memory (a frame's encoder
    activations and its output), up to 16."""
    if torch.device(device).type == "cpu":
        return 1
    width = getattr(model.encoder, "out_dim", 64)
    per_frame = 4 * (in_hw[0] * in_hw[1] * 6 * width + out_hw[0] * out_hw[1] * 3 * 4)
    return max(1, min(MAX_VIDEO_BATCH, default_budget(torch.device(device)) // max(per_frame, 1)))
