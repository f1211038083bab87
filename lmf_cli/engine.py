"""Rendering a whole output image from one encoding: the core the Upscaler and eval call.

The encoder and latent MLP run once; the render MLP covers the output in row chunks
sized from a memory budget. Chunks only split the work: every output pixel gets the same
neighbours, the same ops and the same summation order whatever the chunk size.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmf_cli import native
from lmf_cli.cmsr import Schedule, intensity, level_grid
from lmf_cli.models.base import ImplicitSR, Latents, RenderWindow
from lmf_cli.models.geometry import (
    AxisBilinear,
    AxisSlots,
    AxisTaps,
    axis_bilinear,
    axis_slots,
    axis_taps,
    bilinear_grid,
)
from lmf_cli.models.mlp import FusedMLP

TRAINED_MAX_SCALE = 4.0


def rel_cell_for(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[float, float]:
    """Cell in LR-pixel units, (2h/H, 2w/W), times max(s/4, 1) per axis above the training range."""
    cells = []
    for n_in, n_out in zip(in_hw, out_hw, strict=True):
        scale = n_out / n_in
        cells.append(2 * n_in / n_out * max(scale / TRAINED_MAX_SCALE, 1.0))
    return cells[0], cells[1]


def render_block(model: ImplicitSR, max_memory: int | None, fused: bool = False) -> tuple[int, int]:
    """Output block (rows, cols) rendered at once. With PyTorch, small enough that the
    render MLP's activations (4 neighbours x width floats per pixel) stay in cache: the
    hidden layers are memory-bound elementwise work there. The compiled kernel keeps its
    activations in registers, so its blocks are large (a few RGB buffers of this size)."""
    if fused:
        bytes_per_pixel, pixels = 4 * 3 * 3, 1 << 20
    else:
        width = max(layer.out_features for layer in model.imnet.linears)
        bytes_per_pixel = 4 * 4 * width
        pixels = (4 << 20) // bytes_per_pixel
    if max_memory is not None:
        pixels = max(256, min(pixels, max_memory // 8 // bytes_per_pixel))
    side = max(16, int(math.sqrt(pixels)))
    return side, side


def _first_output(a: int, n_in: int, n_out: int) -> int:
    """First output index whose centre lies at or after input position a (exact integers)."""
    return max(0, -((n_in - 2 * a * n_out) // (2 * n_in)))


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


@torch.inference_mode()
def upscale_tensor(model: ImplicitSR, inp: torch.Tensor, out_hw: tuple[int, int], tile: int | None = None,
                   schedule: Schedule | None = None, max_memory: int | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   stats: dict[str, int] | None = None) -> torch.Tensor:
    """Upscale a (1, 3, h, w) tensor in [-1, 1] to a (1, 3, H, W) CPU tensor in [0, 1] units.

    The input is cut into tiles of `tile` x `tile` input pixels (None: from the memory
    budget); each tile is encoded with a margin and renders exactly the output pixels whose
    centres fall in its core, on the global grid, so tiling never changes the result
    beyond float rounding. With a CMSR `schedule`, each output block renders only the
    levels its LR pixels need. `stats` receives the count of pixels the render MLP drew.
    A tile that runs out of GPU memory is split in four and retried; finished tiles stay.
    """
    h, w = inp.shape[-2:]
    if tile is None:
        tile = default_tile(model, max_memory, inp.device)
    tile = max(1, int(tile))
    run = _TiledRun(model, inp, out_hw, schedule, max_memory, stats)
    cores = [(r, min(h, r + tile), c, min(w, c + tile)) for r in range(0, h, tile) for c in range(0, w, tile)]
    for done, core in enumerate(cores, 1):
        run.tile(*core)
        if progress:
            progress(done, len(cores))
    return run.canvas


class _TiledRun:
    """State of one upscale: the host canvas and what every tile shares."""

    def __init__(self, model: ImplicitSR, inp: torch.Tensor, out_hw: tuple[int, int], schedule: Schedule | None,
                 max_memory: int | None, stats: dict[str, int] | None) -> None:
        self.model, self.inp, self.out_hw, self.schedule = model, inp, out_hw, schedule
        self.in_hw = tuple(inp.shape[-2:])
        self.margin = tile_margin(model)
        self.rel_cell = inp.new_tensor([rel_cell_for(self.in_hw, out_hw)])
        self.canvas = torch.empty(1, 3, *out_hw, dtype=torch.float32)
        self.fused = _renders_fused(model, inp)
        self.block = render_block(model, max_memory, self.fused)
        if schedule is not None and not self.fused:
            where = native.status() if inp.device.type == "cpu" else f"on {inp.device.type}"
            warnings.warn(f"CMSR draws single pixels, which needs the compiled CPU kernel ({where}); "
                          "rendering every pixel in full", stacklevel=3)
            self.schedule = None
        self.counts = stats if stats is not None else {}
        self.counts.update(rendered=0, total=out_hw[0] * out_hw[1])

    def tile(self, r0: int, r1: int, c0: int, c1: int) -> None:
        try:
            self._render_tile(r0, r1, c0, c1)
        except torch.OutOfMemoryError:
            if max(r1 - r0, c1 - c0) <= 16:
                raise
            warnings.warn(f"out of memory on a {c1 - c0}x{r1 - r0} tile; retrying it as four smaller tiles",
                          stacklevel=2)
            if self.inp.device.type == "cuda":
                torch.cuda.empty_cache()
            rm, cm = (r0 + r1) // 2, (c0 + c1) // 2
            for sub in ((r0, rm, c0, cm), (r0, rm, cm, c1), (rm, r1, c0, cm), (rm, r1, cm, c1)):
                if sub[1] > sub[0] and sub[3] > sub[2]:
                    self.tile(*sub)

    def _render_tile(self, r0: int, r1: int, c0: int, c1: int) -> None:
        (h, w), (big_h, big_w), model = self.in_hw, self.out_hw, self.model
        i0, i1 = _first_output(r0, h, big_h), _first_output(r1, h, big_h) if r1 < h else big_h
        j0, j1 = _first_output(c0, w, big_w), _first_output(c1, w, big_w) if c1 < w else big_w
        if i1 <= i0 or j1 <= j0:
            return
        lr0, lc0 = max(0, r0 - self.margin), max(0, c0 - self.margin)
        piece = self.inp[:, :, lr0:min(h, r1 + self.margin), lc0:min(w, c1 + self.margin)]
        latents = _encode_finite(model, piece, self.rel_cell)
        levels = self.schedule.levels(intensity(model, latents)[0]) if self.schedule else None
        geometry = _Geometry(self.in_hw, self.out_hw, lr0, lc0, piece, latents, self.counts, self.fused)
        block_h, block_w = self.block
        for a in range(i0, i1, block_h):
            for ca in range(j0, j1, block_w):
                rows, cols = (a, min(i1, a + block_h)), (ca, min(j1, ca + block_w))
                region = self.canvas[:, :, rows[0]:rows[1], cols[0]:cols[1]]
                if levels is None and self.fused:  # the kernel writes straight into the canvas
                    render_region(model, geometry, self.out_hw, rows, cols, into=region).add_(1).mul_(0.5)
                    continue
                if levels is None:
                    out = render_region(model, geometry, self.out_hw, rows, cols)
                else:
                    out = _render_levels(model, geometry, self.schedule, levels, rows, cols)
                region.copy_(out.add_(1).mul_(0.5))


def _renders_fused(model: ImplicitSR, inp: torch.Tensor) -> bool:
    """Whether this image renders through the compiled kernel (which takes one image at a time)."""
    return inp.shape[0] == 1 and native.usable(model, inp.device)


def _encode_finite(model: ImplicitSR, piece: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
    """Encode, falling back to float32 when a reduced-precision encoder overflowed."""
    latents = model.encode(piece, rel_cell)
    if model.encoder_dtype is None or all(bool(torch.isfinite(t).all()) for t in latents.values()):
        return latents
    warnings.warn("reduced-precision encoder produced NaN/inf on a tile; recomputing it in float32", stacklevel=3)
    saved, model.encoder_dtype = model.encoder_dtype, None
    try:
        return model.encode(piece, rel_cell)
    finally:
        model.encoder_dtype = saved


@dataclass(frozen=True)
class _Geometry:
    """One encoded tile: `piece` (its input pixels, the first at (lr0, lc0)) and latents."""

    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    lr0: int
    lc0: int
    piece: torch.Tensor
    latents: Latents
    counts: dict[str, int]
    fused: bool = False  # render through the compiled kernel
    packed: dict[tuple[int, int], FusedMLP | None] = field(default_factory=dict, compare=False, repr=False)

    def fused_mlp(self, model: ImplicitSR, grid_hw: tuple[int, int]) -> FusedMLP | None:
        """The kernel's per-latent tables for a grid: built once per tile and grid."""
        if grid_hw not in self.packed:
            rel_cell = self.piece.new_tensor([rel_cell_for(self.in_hw, grid_hw)])
            self.packed[grid_hw] = model.fused_mlp(self.latents, rel_cell)
        return self.packed[grid_hw]


def owners(start: int, stop: int, n_out: int, n_in: int, first: int, device: torch.device) -> torch.Tensor:
    """Local index of the LR pixel containing each output pixel centre."""
    i = torch.arange(start, stop, device=device)
    return torch.div((2 * i + 1) * n_in, 2 * n_out, rounding_mode="floor") - first


def _render_levels(model: ImplicitSR, g: _Geometry, schedule: Schedule, levels: torch.Tensor,
                   rows_range: tuple[int, int], cols_range: tuple[int, int]) -> torch.Tensor:
    """One output block under CMSR: each level present is drawn where the pixels' LR owners
    chose it, by the compiled kernel, which draws exactly those pixels (and the coarse
    pixels they sample) in place. Levels and boxes are found on the LR grid, so the
    bookkeeping costs a few passes over the block whatever the number of levels."""
    (h, w), (big_h, big_w) = g.in_hw, g.out_hw
    (a, b), (ca, cb) = rows_range, cols_range
    device = g.piece.device
    own_r = owners(a, b, big_h, h, g.lr0, device)
    own_c = owners(ca, cb, big_w, w, g.lc0, device)
    first_r, first_c = int(own_r[0]), int(own_c[0])
    window = levels[first_r:int(own_r[-1]) + 1, first_c:int(own_c[-1]) + 1]
    own_r, own_c = own_r - first_r, own_c - first_c
    full_level = len(schedule.decode_scales)
    scale = max(big_h / h, big_w / w)
    plans = []
    for level in torch.unique(window).tolist():
        chosen = window == level
        lr_rows = torch.nonzero(chosen.any(1)).flatten()
        lr_cols = torch.nonzero(chosen.any(0)).flatten()
        r0, r1 = _span(own_r, int(lr_rows[0]), int(lr_rows[-1]))
        c0, c1 = _span(own_c, int(lr_cols[0]), int(lr_cols[-1]))
        if r0 >= r1 or c0 >= c1:  # LR pixels no output pixel centre falls in (an axis shrinks)
            continue
        grid = g.out_hw if level == full_level else level_grid(g.out_hw, scale, schedule.decode_scales[level])
        plans.append((chosen, (r0, r1), (c0, c1), grid))
    out = g.piece.new_zeros(1, 3, b - a, cb - ca)
    for chosen, (r0, r1), (c0, c1), grid in plans:
        mask = chosen.index_select(0, own_r[r0:r1]).index_select(1, own_c[c0:c1])
        box = (a + r0, a + r1), (ca + c0, ca + c1)
        _draw_fused(model, g, grid, box, mask, out[:, :, r0:r1, c0:c1])
    return out


def _draw_fused(model: ImplicitSR, g: _Geometry, grid: tuple[int, int], box: tuple[tuple[int, int], ...],
                mask: torch.Tensor, region: torch.Tensor) -> None:
    """Draw the masked pixels of an output box into `region` in place, from a grid_hw
    rendering (the output itself, or a coarse level sampled bilinearly)."""
    if grid == g.out_hw:
        render_region(model, g, grid, *box, mask=mask, into=region)
        return
    coarse_rows, coarse_cols, taps_r, taps_c = _coarse_taps(g, grid, *box)
    hidden = model.imnet.hidden_dim
    needed = native.mark_taps(hidden, mask, taps_r, taps_c,
                              (coarse_rows[1] - coarse_rows[0], coarse_cols[1] - coarse_cols[0]))
    coarse = render_region(model, g, grid, coarse_rows, coarse_cols, mask=needed)
    native.blend(hidden, region, mask, coarse, taps_r, taps_c)


def _span(owner: torch.Tensor, first: int, last: int) -> tuple[int, int]:
    """Output indices [start, stop) whose (sorted) owners lie in [first, last]."""
    start = int(torch.searchsorted(owner, first))
    return start, int(torch.searchsorted(owner, last, right=True))


def _coarse_taps(g: _Geometry, grid_hw: tuple[int, int], rows_range: tuple[int, int],
                 cols_range: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], AxisBilinear, AxisBilinear]:
    """The window of a coarse grid that an output block samples, and the block's bilinear
    taps into that window."""
    big_h, big_w = g.out_hw
    device = g.piece.device
    taps_r = axis_bilinear(big_h, grid_hw[0], *rows_range, device=device)
    taps_c = axis_bilinear(big_w, grid_hw[1], *cols_range, device=device)
    r0, r1 = int(taps_r.lo.min()), int(taps_r.hi.max()) + 1
    c0, c1 = int(taps_c.lo.min()), int(taps_c.hi.max()) + 1
    return ((r0, r1), (c0, c1), AxisBilinear(taps_r.lo - r0, taps_r.hi - r0, taps_r.frac),
            AxisBilinear(taps_c.lo - c0, taps_c.hi - c0, taps_c.frac))


def render_coarse(model: ImplicitSR, g: _Geometry, grid_hw: tuple[int, int], rows_range: tuple[int, int],
                  cols_range: tuple[int, int]) -> torch.Tensor:
    """Render a coarse grid around an output block, then bilinearly sample it at the whole
    block (CMSR's calibration; at inference the kernel samples only the pixels it needs)."""
    coarse_rows, coarse_cols, taps_r, taps_c = _coarse_taps(g, grid_hw, rows_range, cols_range)
    return bilinear_grid(render_region(model, g, grid_hw, coarse_rows, coarse_cols), taps_r, taps_c)


def render_region(model: ImplicitSR, g: _Geometry, grid_hw: tuple[int, int], rows_range: tuple[int, int],
                  cols_range: tuple[int, int], mask: torch.Tensor | None = None,
                  into: torch.Tensor | None = None) -> torch.Tensor:
    """Pixels [rows) x [cols) of a grid_hw rendering of the image, (1, 3, rows, cols), normalised.

    The latents (from `g.piece`, whose first LR pixel is (lr0, lc0)) must have been
    encoded for this image; the cell is the grid's own. A boolean `mask` (rows, cols) says
    which pixels are wanted: the compiled kernel draws only those, PyTorch draws all. With
    `into` (a (1, 3, rows, cols) view), the wanted pixels are written there and it is returned.
    """
    (h, w), device, bil = g.in_hw, g.piece.device, model.bilinear_skip
    mlp = g.fused_mlp(model, grid_hw) if g.fused else None
    if mlp is not None:
        rows, bil_rows = _window_axis(grid_hw[0], h, *rows_range, g.lr0, model.local_ensemble, bil, device, True)
        cols, bil_cols = _window_axis(grid_hw[1], w, *cols_range, g.lc0, model.local_ensemble, bil, device, True)
        out = native.render(mlp, rows, cols, mask, (g.piece, bil_rows, bil_cols) if bil else None, into)
        drawn = out.shape[-2] * out.shape[-1] if mask is None else int(mask.sum())
    else:
        rows, bil_rows = _window_axis(grid_hw[0], h, *rows_range, g.lr0, model.local_ensemble, bil, device)
        cols, bil_cols = _window_axis(grid_hw[1], w, *cols_range, g.lc0, model.local_ensemble, bil, device)
        window = RenderWindow(rows, cols, bil_rows, bil_cols, g.piece.new_tensor([rel_cell_for(g.in_hw, grid_hw)]))
        out = model.render(g.piece, g.latents, window)
        drawn = out.shape[-2] * out.shape[-1]
        if into is not None:
            out = into.copy_(out if mask is None else torch.where(mask, out, into))
    g.counts["rendered"] = g.counts.get("rendered", 0) + drawn
    return out


@functools.lru_cache(maxsize=512)
def _window_axis(n_grid: int, n_in: int, start: int, stop: int, origin: int, local_ensemble: bool,
                 bilinear: bool, device: torch.device,
                 per_pixel: bool = False) -> tuple[AxisSlots | AxisTaps, AxisBilinear | None]:
    """One axis of a render window: its slots grouped by latent (PyTorch renderer) or its
    per-pixel taps (`per_pixel`, the kernel), and the bilinear skip's taps. Cached: a tile's
    blocks share their column axes along a row of blocks and their row axes down a column."""
    build = axis_taps if per_pixel else axis_slots
    axis = build(n_grid, n_in, start, stop, origin, local_ensemble, device=device)
    return axis, axis_bilinear(n_grid, n_in, start, stop, origin, device=device) if bilinear else None


def encode_image(model: ImplicitSR, inp: torch.Tensor, out_hw: tuple[int, int]) -> _Geometry:
    """Encode a whole (untiled) image for rendering grids of it (calibration, benchmarks)."""
    rel_cell = inp.new_tensor([rel_cell_for(tuple(inp.shape[-2:]), out_hw)])
    return _Geometry(tuple(inp.shape[-2:]), out_hw, 0, 0, inp, model.encode(inp, rel_cell), {},
                     _renders_fused(model, inp))


def round_size(value: float) -> int:
    """The one rounding rule for output sizes: halves round up, at least 1."""
    return max(1, math.floor(value + 0.5))


def scaled_size(in_hw: tuple[int, int], scale: float | tuple[float, float]) -> tuple[int, int]:
    """round(input x scale) per axis."""
    sy, sx = (scale, scale) if isinstance(scale, (int, float)) else scale
    return round_size(in_hw[0] * sy), round_size(in_hw[1] * sx)
