"""Rendering a whole output image from one encoding: the core the Upscaler and eval call.

The encoder and latent MLP run once; the render MLP covers the output in row chunks
sized from a memory budget. Chunks only split the work: every output pixel gets the same
neighbours, the same ops and the same summation order whatever the chunk size.
"""

from __future__ import annotations

import math

import torch

from lmf_cli.models.base import ImplicitSR, RenderWindow
from lmf_cli.models.geometry import axis_bilinear, axis_slots

TRAINED_MAX_SCALE = 4.0


def rel_cell_for(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[float, float]:
    """Cell in LR-pixel units, (2h/H, 2w/W), times max(s/4, 1) per axis above the training range."""
    cells = []
    for n_in, n_out in zip(in_hw, out_hw, strict=True):
        scale = n_out / n_in
        cells.append(2 * n_in / n_out * max(scale / TRAINED_MAX_SCALE, 1.0))
    return cells[0], cells[1]


def slot_bytes_per_pixel(model: ImplicitSR) -> int:
    """Rough bytes of live activations per output pixel while rendering (for chunk sizing)."""
    width = max(layer.out_features for layer in model.imnet.linears)
    return 4 * 4 * width * 4 + 64


def scaled_size(in_hw: tuple[int, int], scale: float | tuple[float, float]) -> tuple[int, int]:
    """round(input x scale) per axis, at least 1."""
    sy, sx = (scale, scale) if isinstance(scale, (int, float)) else scale
    return max(1, math.floor(in_hw[0] * sy + 0.5)), max(1, math.floor(in_hw[1] * sx + 0.5))


def _first_output(a: int, n_in: int, n_out: int) -> int:
    """First output index whose centre lies at or after input position a (exact integers)."""
    return max(0, -((n_in - 2 * a * n_out) // (2 * n_in)))


def tile_margin(model: ImplicitSR) -> int:
    """Input pixels a tile must add on each side so its core sees what the whole image sees:
    the encoder's receptive field, the 3x3 latent conv/unfold, the ensemble neighbour and
    the bilinear skip's second tap."""
    return int(getattr(model.encoder, "receptive_radius", 64)) + 3


def default_tile(model: ImplicitSR, max_memory: int | None, device: torch.device) -> int:
    """Largest tile side whose encoder and latent activations fit the memory budget."""
    if max_memory is None:
        max_memory = _free_memory(device) // 4
    width = getattr(model.encoder, "out_dim", 64)
    bytes_per_pixel = 4 * (4 * width + 2 * 300)
    side = int(math.sqrt(max(max_memory, 1 << 26) / bytes_per_pixel))
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


@torch.inference_mode()
def upscale_tensor(model: ImplicitSR, inp: torch.Tensor, out_hw: tuple[int, int], tile: int | None = None,
                   cmsr: bool | str = False, max_memory: int | None = None,
                   progress=None) -> torch.Tensor:
    """Upscale a (1, 3, h, w) tensor in [-1, 1] to a (1, 3, H, W) CPU tensor in [0, 1] units.

    The input is cut into tiles of `tile` x `tile` input pixels (None: from the memory
    budget); each tile is encoded with a margin and renders exactly the output pixels whose
    centres fall in its core, on the global grid, so tiling never changes the result
    beyond float rounding.
    """
    h, w = inp.shape[-2:]
    big_h, big_w = out_hw
    if tile is None:
        tile = default_tile(model, max_memory, inp.device)
    tile = max(1, int(tile))
    margin = tile_margin(model)
    rel_cell = inp.new_tensor([rel_cell_for((h, w), out_hw)])
    canvas = torch.empty(1, 3, big_h, big_w, dtype=torch.float32)
    row_cores = [(a, min(h, a + tile)) for a in range(0, h, tile)]
    col_cores = [(a, min(w, a + tile)) for a in range(0, w, tile)]
    chunk = max(big_w, (max_memory or (1 << 30)) // 8 // slot_bytes_per_pixel(model))
    total, done = len(row_cores) * len(col_cores), 0
    for r0, r1 in row_cores:
        i0, i1 = _first_output(r0, h, big_h), _first_output(r1, h, big_h) if r1 < h else big_h
        lr0, lr1 = max(0, r0 - margin), min(h, r1 + margin)
        for c0, c1 in col_cores:
            j0, j1 = _first_output(c0, w, big_w), _first_output(c1, w, big_w) if c1 < w else big_w
            done += 1
            if i1 <= i0 or j1 <= j0:
                continue
            lc0, lc1 = max(0, c0 - margin), min(w, c1 + margin)
            piece = inp[:, :, lr0:lr1, lc0:lc1]
            latents = model.encode(piece, rel_cell)
            cols = axis_slots(big_w, w, j0, j1, lc0, device=inp.device)
            bil_cols = axis_bilinear(big_w, w, j0, j1, lc0, device=inp.device) if model.bilinear_skip else None
            rows_per_chunk = max(1, chunk // (j1 - j0))
            for a in range(i0, i1, rows_per_chunk):
                b = min(i1, a + rows_per_chunk)
                rows = axis_slots(big_h, h, a, b, lr0, device=inp.device)
                bil_rows = axis_bilinear(big_h, h, a, b, lr0, device=inp.device) if model.bilinear_skip else None
                window = RenderWindow(rows, cols, bil_rows, bil_cols, rel_cell)
                out = model.render(piece, latents, window)
                canvas[:, :, a:b, j0:j1] = out.add_(1).mul_(0.5).float().cpu()
            if progress:
                progress(done, total)
    return canvas
