"""Rendering output windows from one encoded tile, through the compiled kernel or PyTorch.

`Geometry` is an encoded tile (its input pixels and latents, where it sits in the image);
`render_region` draws any window of any grid of the image from it on the global grid, so
the pixels do not depend on how the image was cut into tiles and blocks."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field, replace

import torch

from lmf_cli.engine import native
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
from lmf_cli.sizes import rel_cell_for


@dataclass(frozen=True)
class Geometry:
    """One encoded tile: `piece` (its input pixels, the first at (lr0, lc0)) and latents."""

    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    lr0: int
    lc0: int
    piece: torch.Tensor
    latents: Latents
    counts: dict[str, int]
    fused: bool = False  # render through the compiled kernel
    tile_mlp: FusedMLP | None = None  # with `fused`, the render MLP packed for these latents (model.fused_mlp)
    packed: dict[tuple[int, int], FusedMLP | None] = field(default_factory=dict, compare=False, repr=False)

    def fused_mlp(self, model: ImplicitSR, grid_hw: tuple[int, int]) -> FusedMLP | None:
        """The kernel's render MLP for a grid: the tile's packing with the grid's vector (its cell),
        made once per grid (CMSR renders several grids from one tile)."""
        if grid_hw not in self.packed:
            if self.tile_mlp is None:
                self.packed[grid_hw] = None
            else:
                rel_cell = self.piece.new_tensor([rel_cell_for(self.in_hw, grid_hw)])
                self.packed[grid_hw] = replace(self.tile_mlp, extra=model.fused_extra(rel_cell))
        return self.packed[grid_hw]

    @functools.cached_property
    def kernel_pixels(self) -> torch.Tensor:
        """The piece as the kernel reads its skip, (3, h, w) contiguous float32: a tile's piece is a
        view into the input with its row stride, and copying it per rendered block or rectangle
        cost more than some of the blocks; copied once per tile."""
        return self.piece[0].float().contiguous()


SAMPLE_PEAKS = {torch.uint8: 255.0, torch.uint16: 65535.0}


def to_samples(values: torch.Tensor, dtype: torch.dtype, unit: bool) -> torch.Tensor:
    """Normalised `values` (overwritten) as a canvas of `dtype` holds them: float32 as they are, or
    in [0, 1] with `unit`; uint8 / uint16 as an image's samples, the [0, 1] value clamped, times the
    peak and rounded half to even, in float32 (numpy's and the kernel's operations: the same bytes)."""
    if dtype == torch.float32:
        return values.add_(1).mul_(0.5) if unit else values
    if not unit:
        raise ValueError("image samples are written from [0, 1] units")
    # v + 1 halved is exact, so v + 1 clamped to [0, 2] times half the peak rounds as the [0, 1] value
    # clamped times the peak does: the same samples, one pass fewer
    return values.add_(1).clamp_(0, 2).mul_(SAMPLE_PEAKS[dtype] / 2).round_().to(dtype)


def renders_fused(model: ImplicitSR, inp: torch.Tensor) -> bool:
    """Whether these images render through the compiled kernel (one image at a time)."""
    return native.usable(model, inp.device)


def encode_finite(model: ImplicitSR, piece: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
    """Encode, falling back to float32 when an fp16 encoder overflowed."""
    latents = model.encode(piece, rel_cell)
    if not model.may_overflow or all(bool(torch.isfinite(t).all()) for t in latents.values()):
        return latents
    warnings.warn("reduced-precision encoder produced NaN/inf on a tile; recomputing it in float32", stacklevel=3)
    saved, model.encoder_dtype = model.encoder_dtype, None
    try:
        return model.encode(piece, rel_cell)
    finally:
        model.encoder_dtype = saved


def owners(start: int, stop: int, n_out: int, n_in: int, first: int, device: torch.device) -> torch.Tensor:
    """Local index of the LR pixel containing each output pixel centre."""
    i = torch.arange(start, stop, device=device)
    return torch.div((2 * i + 1) * n_in, 2 * n_out, rounding_mode="floor") - first


def coarse_taps(g: Geometry, grid_hw: tuple[int, int], rows_range: tuple[int, int],
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


def render_coarse(model: ImplicitSR, g: Geometry, grid_hw: tuple[int, int], rows_range: tuple[int, int],
                  cols_range: tuple[int, int]) -> torch.Tensor:
    """Render a coarse grid around an output block, then bilinearly sample it at the whole
    block (CMSR's calibration; at inference the kernel samples only the pixels it needs)."""
    coarse_rows, coarse_cols, taps_r, taps_c = coarse_taps(g, grid_hw, rows_range, cols_range)
    return bilinear_grid(render_region(model, g, grid_hw, coarse_rows, coarse_cols), taps_r, taps_c)


def render_region(model: ImplicitSR, g: Geometry, grid_hw: tuple[int, int], rows_range: tuple[int, int],
                  cols_range: tuple[int, int], mask: torch.Tensor | None = None,
                  into: torch.Tensor | None = None, unit: bool = False) -> torch.Tensor:
    """Pixels [rows) x [cols) of a grid_hw rendering of the image, (1, 3, rows, cols), normalised
    (with `unit`, in the canvas's units: [0, 1], or an image's samples where `into` is uint8 or
    uint16, see to_samples).

    The latents (from `g.piece`, whose first LR pixel is (lr0, lc0)) must have been
    encoded for this image; the cell is the grid's own. A boolean `mask` (rows, cols) says
    which pixels are wanted: the compiled kernel draws only those; PyTorch decodes only the
    latents with a slot on them (models whose capabilities say `renders_pairs`), else everything. With
    `into` (a (1, 3, rows, cols) view), the wanted pixels are written there and it is returned.
    """
    (h, w), device, bil = g.in_hw, g.piece.device, model.bilinear_skip
    mlp = g.fused_mlp(model, grid_hw) if g.fused else None
    if mlp is not None:
        rows, bil_rows = _window_axis(grid_hw[0], h, *rows_range, g.lr0, model.local_ensemble, bil, device, True)
        cols, bil_cols = _window_axis(grid_hw[1], w, *cols_range, g.lc0, model.local_ensemble, bil, device, True)
        out, drawn = native.render(mlp, rows, cols, mask, (g.kernel_pixels, bil_rows, bil_cols) if bil else None,
                                   into, unit)
    else:
        rows, bil_rows = _window_axis(grid_hw[0], h, *rows_range, g.lr0, model.local_ensemble, bil, device)
        cols, bil_cols = _window_axis(grid_hw[1], w, *cols_range, g.lc0, model.local_ensemble, bil, device)
        rel_cell = g.piece.new_tensor([rel_cell_for(g.in_hw, grid_hw)])
        pairs = wanted_pairs(rows, cols, mask) if mask is not None and model.capabilities.renders_pairs else None
        out = model.render(g.piece, g.latents, RenderWindow(rows, cols, bil_rows, bil_cols, rel_cell, pairs))
        drawn = out.shape[-2] * out.shape[-1] if pairs is None else int(torch.count_nonzero(mask))
        out = to_samples(out, torch.float32 if into is None else into.dtype, unit)
        if into is not None:
            out = into.copy_(out if mask is None else torch.where(mask, out, into))
    g.counts["rendered"] = g.counts.get("rendered", 0) + drawn
    return out


def wanted_pairs(rows: AxisSlots, cols: AxisSlots, mask: torch.Tensor) -> torch.Tensor:
    """Flat indices r * nc + c of the latents that have a slot on a wanted pixel of `mask`
    (rows, cols): the PyTorch renderer then decodes only those latents' slots. A row's slots are
    a run of pixels, so a pair is wanted where the mask's sum over its rectangle is not 0 (read
    from the mask's summed-area table: four lookups a pair, not one per slot)."""
    table = torch.nn.functional.pad(mask.int().cumsum(0).cumsum(1), (1, 0, 1, 0))
    (r0, r1), (c0, c1) = rows.spans, cols.spans
    inside = table[r1][:, c1] - table[r0][:, c1] - table[r1][:, c0] + table[r0][:, c0]
    return torch.nonzero(inside.flatten()).flatten()


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


def encode_image(model: ImplicitSR, inp: torch.Tensor, out_hw: tuple[int, int]) -> Geometry:
    """Encode a whole (untiled) image for rendering grids of it (calibration, benchmarks)."""
    rel_cell = inp.new_tensor([rel_cell_for(tuple(inp.shape[-2:]), out_hw)])
    latents, fused = model.encode(inp, rel_cell), renders_fused(model, inp)
    return Geometry(tuple(inp.shape[-2:]), out_hw, 0, 0, inp, latents, {}, fused,
                    model.fused_mlp(latents) if fused else None)
