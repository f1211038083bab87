"""DIIF: Dynamic Implicit Image Function (He et al., arXiv 2306.12321), on LIIF-style features.

Output pixels are grouped by the LR pixel (cell) their centre lies in, and each cell's
pixels are cut into coordinate slices: one per output row of the cell (`single_slice=False`)
or one for the whole cell. A Coarse-to-Fine MLP decodes them:

- coarse head, once per slice and corner: for each of the cell's 4 corners (vy, vx) in
  {-1, 1}^2, the 2x2 block of features around that corner (taken from the 3x3 unfolded
  feature, zero padded, channel-major), the cell (2h/H, 2w/W, times max(s/4, 1) above x4),
  and the slice's start and end coordinates (its first and last pixel, relative to the
  latent centre in LR units) taken relative to the corner: [block, cell, start - v, end - v]
  -> Linear/ReLU layers -> a hidden vector per corner;
- fine tail, once per output pixel: the 4 hidden vectors mixed with bilinear (area) weights
  |y + vy| |x + vx| / 4 (+1e-9 each, normalised; (y, x) the pixel's coordinate relative to
  the latent centre), then [mix, y, x] -> Linear/ReLU layers -> RGB.

The head's first layer is affine, so its feature part is computed once per corner *point*
of the LR grid, (h+1) x (w+1) of them, as a 2x2 convolution at encode time (a corner's 2x2
block is shared by the 4 cells around it); the cell and border parts are a few
multiply-adds per slice. Everything a pixel's value depends on is global (its cell, its
slot in the cell, the cell's first and last pixel), so tiles and blocks never change it.
See docs/diif.md for the formulation, the fixes to the authors' code and the cost model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmf_cli.models.base import (
    DECODER_MARGIN,
    Capabilities,
    ImplicitSR,
    Latents,
    RenderWindow,
    channels_last_table,
    encoder_margin,
    rows_linear,
)
from lmf_cli.models.geometry import (
    AREA_EPS,
    AxisCells,
    AxisSlots,
    axis_bilinear,
    axis_cell_count,
    axis_cells,
    bilinear_grid,
    bilinear_window_last,
    gather_latents,
)
from lmf_cli.sizes import TRAINED_MAX_SCALE

CORNERS = ((-1, -1), (-1, 1), (1, -1), (1, 1))  # (vy, vx), the order of the hidden vectors


class C2FMLP(nn.Module):
    """The Coarse-to-Fine MLP, with the authors' key layout: `layers` (the head, Linear/ReLU
    pairs ending in a ReLU) and `tail` (Linear/ReLU pairs, then the output Linear)."""

    def __init__(self, in_dim: int, out_dim: int, coord_dim: int, head_hidden_list: list[int],
                 tail_hidden_list: list[int]) -> None:
        super().__init__()
        if not head_hidden_list:
            raise ValueError("the C2F-MLP head needs at least one layer")
        head: list[nn.Module] = []
        last = in_dim
        for width in head_hidden_list:
            head += [nn.Linear(last, width), nn.ReLU()]
            last = width
        self.layers = nn.Sequential(*head)
        self.hidden_dim = last
        tail: list[nn.Module] = []
        last += coord_dim
        for width in tail_hidden_list:
            tail += [nn.Linear(last, width), nn.ReLU()]
            last = width
        tail.append(nn.Linear(last, out_dim))
        self.tail = nn.Sequential(*tail)

    @property
    def head_linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    @property
    def tail_linears(self) -> list[nn.Linear]:
        return [m for m in self.tail if isinstance(m, nn.Linear)]

    @property
    def linears(self) -> list[nn.Linear]:
        return self.head_linears + self.tail_linears


@dataclass(frozen=True)
class CellBatch:
    """Every output pixel of sampled LR cells (see `DIIF.decode_cells`).

    pred (B, N, Kr, Kc, 3), normalised; rows (B, N, Kr) and cols (B, N, Kc): output row and
    column of each slot; valid (B, N, Kr, Kc): the slot is a pixel of the cell (cells hold
    floor or ceil of the scale pixels per axis; K is the most any cell holds).
    """

    pred: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    valid: torch.Tensor

    def targets(self, hr: torch.Tensor) -> torch.Tensor:
        """The (B, 3, H, W) image's values at every slot, (B, N, Kr, Kc, 3)."""
        return gather_pixels(hr, self.rows, self.cols)

    def l1(self, hr: torch.Tensor) -> torch.Tensor:
        """Mean absolute error against the HR image (same units as pred) over real pixels."""
        return (self.pred - self.targets(hr)).abs()[self.valid].mean()


def gather_pixels(image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) at rows (B, N, Kr) x cols (B, N, Kc) -> (B, N, Kr, Kc, C)."""
    b = torch.arange(image.shape[0], device=image.device).view(-1, 1, 1, 1)
    return image.permute(0, 2, 3, 1)[b, rows[..., :, None], cols[..., None, :]]


def head_cell(step: torch.Tensor, fixed_area: bool = True) -> torch.Tensor:
    """The cell the MLP sees from the output pixel pitch in LR units (2h/H): with
    `fixed_area`, times max(s/4, 1) (DESIGN.md), i.e. never below 2/4."""
    return step.clamp(min=2 / TRAINED_MAX_SCALE) if fixed_area else step


class DIIF(ImplicitSR):
    """DIIF with a C2F-MLP on an encoder's features.

    single_slice: False slices each cell by output rows (the paper's default), True decodes
    a cell as one slice. ensemble: the 4 corner blocks (the authors' `local_ensemble`);
    False feeds the head the 3x3 unfolded feature (or the bare feature without
    `feat_unfold`) with borders relative to the latent centre, one hidden vector per slice.
    coarse_cell_decode / fine_cell_decode: the cell goes into the head / the tail.
    fixed_area: the head's cell is clipped above x4 (always so through the engine's cell);
    False uses the unclipped pitch. bilinear_skip: add a bilinear upsample of the input.
    """

    def __init__(self, encoder: nn.Module, head_hidden: list[int] | None = None,
                 tail_hidden: list[int] | None = None, single_slice: bool = False, ensemble: bool = True,
                 feat_unfold: bool = True, coarse_cell_decode: bool = True, fine_cell_decode: bool = False,
                 fixed_area: bool = True, bilinear_skip: bool = False) -> None:
        super().__init__()
        if ensemble and not feat_unfold:
            raise ValueError("DIIF's corner ensemble reads 2x2 blocks of the unfolded feature: needs feat_unfold")
        self.encoder = encoder
        # The engine groups output pixels by the one latent they read: DIIF's ensemble is
        # inside the decoder (a pixel reads its own cell's 4 corners), not across latents.
        self.local_ensemble = False
        self.ensemble = ensemble
        self.single_slice = single_slice
        self.feat_unfold = feat_unfold
        self.coarse_cell_decode = coarse_cell_decode
        self.fine_cell_decode = fine_cell_decode
        self.fixed_area = fixed_area
        self.bilinear_skip = bilinear_skip
        self.kernel = 2 if ensemble else (3 if feat_unfold else 1)
        self.feat_dim = encoder.out_dim * self.kernel ** 2
        head_in = self.feat_dim + (2 if coarse_cell_decode else 0) + 4
        self.imnet = C2FMLP(head_in, 3, 2 + (2 if fine_cell_decode else 0), list(head_hidden or [256, 256]),
                            list(tail_hidden or [256, 256]))

    # ----- latents: the head's feature term at every corner point ---------------------------

    @property
    def capabilities(self) -> Capabilities:
        """Decodes whole LR cells (slices), so training samples every pixel of a cell; the latent
        table is budgeted as a 3x3-unfolded feature; the C2F-MLP has no modulations (no CMSR)."""
        width = self.encoder.out_dim
        return Capabilities("diif", encoder_margin(self.encoder), width, 9 * width,
                            max(layer.out_features for layer in self.imnet.linears), whole_cells=True,
                            streams_rows=self.encoder.streams_rows, decoder_margin=DECODER_MARGIN,
                            tile_grid=self.encoder.tile_grid)

    def stage_macs(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict[str, float]:
        """All of DIIF's decoder is counted as rendering: per slice (head) and per pixel (tail)."""
        return {"latent": 0.0, "render": float(self.decoder_macs(in_hw, out_hw))}

    def latents(self, feat: torch.Tensor, rel_cell: torch.Tensor) -> Latents:
        """{"corner": (B, h+1, w+1, D)}: first head layer's feature part plus bias at each
        corner point of the LR grid (with the ensemble; (B, h, w, D) at latent centres without).
        The cell enters at decode time, so one encoding serves every output grid."""
        first = self.imnet.head_linears[0]
        c, k = feat.shape[1], self.kernel
        # Linear on the channel-major (c, dy, dx) block == a k x k convolution with the same
        # weights; a 2x2 kernel with padding 1 puts the block of rows (a-1, a) at corner row a.
        weight = first.weight[:, :self.feat_dim].reshape(-1, c, k, k)
        table = F.conv2d(feat, weight, first.bias, padding=1 if k > 1 else 0)
        return {"corner": channels_last_table(table)}

    def _corner_offsets(self) -> tuple[tuple[int, int], ...]:
        return ((0, 0), (0, 1), (1, 0), (1, 1)) if self.ensemble else ((0, 0),)

    def _window_corners(self, table: torch.Tensor, rows: AxisCells, cols: AxisCells) -> torch.Tensor:
        """(B, nr, nc, Q, D): the corner terms of the window's latents."""
        r0, c0, nr, nc = rows.lat0, cols.lat0, rows.n_latents, cols.n_latents
        return torch.stack([table[:, r0 + a:r0 + a + nr, c0 + b:c0 + b + nc] for a, b in self._corner_offsets()], 3)

    def _gather_corners(self, table: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """(B, N, Q, D): the corner terms of latents (i, j), each (B, N)."""
        b, _, tw, d = table.shape
        index = torch.stack([(i + a) * tw + (j + c) for a, c in self._corner_offsets()], -1)
        return gather_latents(table.reshape(b, -1, d), index)

    # ----- the C2F-MLP ---------------------------------------------------------------------

    def _slice_hidden(self, corners: torch.Tensor, row_borders: torch.Tensor, col_borders: torch.Tensor,
                      cell: torch.Tensor) -> torch.Tensor:
        """Coarse head: hidden vectors (..., S, Q, Dh) of S slices per latent.

        corners (..., Q, D) from encode; row_borders (..., S, 2) start/end y of each slice,
        col_borders (..., 1, 2) start/end x; cell (..., 2). Leading dims broadcast.
        """
        weight = self.imnet.head_linears[0].weight
        n = weight.shape[1]
        w_y, w_x = weight[:, [n - 4, n - 2]], weight[:, [n - 3, n - 1]]  # (start, end) columns
        x = corners.unsqueeze(-3) + (_pair_term(row_borders, w_y) + _pair_term(col_borders, w_x)).unsqueeze(-2)
        if self.ensemble:
            # borders are taken relative to each corner: subtract (vy, vx) from start and end
            sy, sx = w_y.sum(1), w_x.sum(1)
            x = x - torch.stack([vy * sy + vx * sx for vy, vx in CORNERS])
        if self.coarse_cell_decode:
            w_cell = weight[:, self.feat_dim:self.feat_dim + 2]
            x = x + _pair_term(cell, w_cell)[..., None, None, :]
        x = x.relu_()
        for layer in self.imnet.head_linears[1:]:
            x = rows_linear(x, layer.weight, layer.bias).relu_()
        return x

    def _premix(self, hidden: torch.Tensor, pixels_per_slice: int) -> tuple[torch.Tensor, bool]:
        """The tail's first layer is linear and the mix weights sum to 1, so where a slice
        holds more pixels than corners that layer runs once per slice and corner, before the
        mix: the same function, fewer operations. Slots are global, so is the choice."""
        if pixels_per_slice <= hidden.shape[-2]:
            return hidden, False
        return rows_linear(hidden, self.imnet.tail_linears[0].weight[:, :hidden.shape[-1]]), True

    def _blend(self, hidden: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """Area-weighted mix (..., D) of the corners' vectors `hidden` (..., Q, D) at pixel
        coordinates ys, xs (broadcasting to the leading dims)."""
        if not self.ensemble:
            return hidden[..., 0, :]
        # corner (vy, vx) takes the area of the rectangle to the opposite corner, |y + vy| |x + vx|
        ay = torch.stack([(ys - 1).abs(), (ys + 1).abs()], -1)
        ax = torch.stack([(xs - 1).abs(), (xs + 1).abs()], -1)
        area = (ay[..., :, None] * ax[..., None, :]).flatten(-2) + AREA_EPS
        weight = (area / area.sum(-1, keepdim=True)).unsqueeze(-1)
        mix = weight[..., 0, :] * hidden[..., 0, :]
        for q in range(1, len(CORNERS)):
            mix = mix + weight[..., q, :] * hidden[..., q, :]
        return mix

    def _mix_slots(self, hidden: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """`_blend` at every slot of whole cells: hidden (..., S, Q, Dh) of S slices per cell,
        ys (..., Kr), xs (..., Kc) -> (..., Kr, Kc, D); a slice holds Kr*Kc/S slots, row-major."""
        kr, kc = ys.shape[-1], xs.shape[-1]
        s = hidden.shape[-3]
        hidden, premixed = self._premix(hidden, kr * kc // s)
        # S is Kr (a slice per row) or 1: (..., S, 1, Q, D) broadcasts against the (Kr, Kc) slots
        mix = self._blend(hidden.unsqueeze(-3), ys[..., :, None], xs[..., None, :])
        return mix.expand(*mix.shape[:-3], kr, kc, mix.shape[-1]), premixed

    def _tail(self, mixed: tuple[torch.Tensor, bool], ys: torch.Tensor, xs: torch.Tensor,
              cell: torch.Tensor) -> torch.Tensor:
        """Fine tail: RGB (..., 3) from the mix (..., D) (premixed or not) and the pixel
        coordinate; ys, xs broadcast to its leading dims, cell (..., 2) too."""
        mix, premixed = mixed
        linears = self.imnet.tail_linears
        first = linears[0]
        dh = self.imnet.hidden_dim
        x = mix + first.bias if premixed else rows_linear(mix, first.weight[:, :dh], first.bias)
        x = x + ys.unsqueeze(-1) * first.weight[:, dh] + xs.unsqueeze(-1) * first.weight[:, dh + 1]
        if self.fine_cell_decode:
            x = x + _pair_term(cell, first.weight[:, dh + 2:dh + 4])
        for layer in linears[1:]:
            x = rows_linear(x.relu_(), layer.weight, layer.bias)
        return x

    def _row_borders(self, rows_rel: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(..., S, 2) slice borders along y: each row its own slice, or the cell's first/last row."""
        if self.single_slice:
            return torch.stack([first, last], -1).unsqueeze(-2)
        return torch.stack([rows_rel, rows_rel], -1)

    def _cell(self, rel_cell: torch.Tensor, rows: AxisCells, cols: AxisCells) -> torch.Tensor:
        """(B, 2) cell for the MLP: the engine's (clipped) one, or the pitch without fixed_area."""
        if self.fixed_area:
            return rel_cell
        return rel_cell.new_tensor([[rows.step, cols.step]]).expand_as(rel_cell)

    # ----- the tiled engine's entry points ---------------------------------------------------

    def _window_slots(self, latents: Latents, rows: AxisCells, cols: AxisCells,
                      cell: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """`_mix_slots` (B, nr, nc, Kr, Kc, D) of every slot of the window's cells."""
        corners = self._window_corners(latents["corner"], rows, cols)
        row_b = self._row_borders(rows.rel, rows.first, rows.last)[None, :, None]
        col_b = torch.stack([cols.first, cols.last], -1)[None, None, :, None]
        hidden = self._slice_hidden(corners, row_b, col_b, cell[:, None, None, :])
        return self._mix_slots(hidden, rows.rel[None, :, None, :], cols.rel[None, None, :, :])

    def decode_slots(self, latents: Latents, window: RenderWindow) -> torch.Tensor:
        """Predictions (B, nr, nc, Kr, Kc, 3) for every slot of the window's cells (see
        `window_cells`), whole cells; padding slots hold values no output pixel uses."""
        rows, cols = window_cells(window.rows), window_cells(window.cols)
        cell = self._cell(window.rel_cell, rows, cols)
        mix = self._window_slots(latents, rows, cols, cell)
        return self._tail(mix, rows.rel[None, :, None, :, None], cols.rel[None, None, :, None, :],
                          cell[:, None, None, None, None, :])

    def render(self, inp: torch.Tensor, latents: Latents, window: RenderWindow) -> torch.Tensor:
        """The output window (B, 3, H', W'). Only the slices holding the window's pixels run
        the head (slicing by rows: one per window row and cell column), and the mix and tail
        run at the window's pixels only, so a block pays for its own pixels whatever the scale."""
        rows, cols = window_cells(window.rows), window_cells(window.cols)
        cell = self._cell(window.rel_cell, rows, cols)
        table = latents["corner"]
        ys = rows.rel[rows.lat_of, rows.k_of]  # (H',) the window's rows
        xs = cols.rel[cols.lat_of, cols.k_of]  # (W',)
        col_b = torch.stack([cols.first, cols.last], -1)[None, None, :, None]
        if self.single_slice:  # one slice per cell of the window
            corners = self._window_corners(table, rows, cols)
            row_b = torch.stack([rows.first, rows.last], -1)[None, :, None, None]
            pixels_per_slice = rows.rel.shape[1] * cols.rel.shape[1]
        else:  # one slice per window row and cell column
            offsets = self._corner_offsets()
            c0, nc, extra = cols.lat0, cols.n_latents, 1 if self.ensemble else 0
            band = table[:, :, c0:c0 + nc + extra]  # the window's corner columns
            picked = {a: band.index_select(1, rows.lat0 + rows.lat_of + a) for a in {a for a, _ in offsets}}
            corners = torch.stack([picked[a][:, :, b:b + nc] for a, b in offsets], 3)
            row_b = torch.stack([ys, ys], -1)[None, :, None, None]
            pixels_per_slice = cols.rel.shape[1]
        hidden = self._slice_hidden(corners, row_b, col_b, cell[:, None, None, :])[:, :, :, 0]
        hidden, premixed = self._premix(hidden, pixels_per_slice)
        if self.single_slice:
            at_pixels = hidden[:, rows.lat_of[:, None], cols.lat_of[None, :]]  # (B, H', W', Q, D)
            mix = self._blend(at_pixels, ys[:, None], xs[None, :])
        else:  # mix at the Kc slots of each window row's cells, then pick the window's columns
            mix = self._blend(hidden.unsqueeze(-3), ys[:, None, None], cols.rel[None])
            mix = mix.expand(*mix.shape[:3], cols.rel.shape[1], mix.shape[-1])[:, :, cols.lat_of, cols.k_of]
        out = self._tail((mix, premixed), ys[:, None], xs[None, :], cell[:, None, None, :])
        if self.bilinear_skip:
            out = out + bilinear_window_last(inp, window.bilinear_rows, window.bilinear_cols)
        return out.permute(0, 3, 1, 2)

    # ----- training: whole slices ------------------------------------------------------------

    def render_grid(self, inp: torch.Tensor, latents: Latents, out_hw: tuple[int, int]) -> torch.Tensor:
        """The whole out_hw grid of `inp` (B, 3, H, W), normalised, with gradients: what the
        authors train on (the whole HR patch). Same values as the tiled engine."""
        (h, w), (big_h, big_w), device = inp.shape[-2:], out_hw, inp.device
        rows = axis_cells(big_h, h, 0, big_h, device=device)
        cols = axis_cells(big_w, w, 0, big_w, device=device)
        bil = (axis_bilinear(big_h, h, 0, big_h, device=device), axis_bilinear(big_w, w, 0, big_w, device=device)) \
            if self.bilinear_skip else (None, None)
        return self.render(inp, latents, RenderWindow(rows, cols, *bil, _grid_cell(inp, rows, cols)))

    def decode_cells(self, inp: torch.Tensor, latents: Latents, out_hw: tuple[int, int],
                     cells: torch.Tensor) -> CellBatch:
        """Every output pixel of the sampled LR cells `cells` (B, N, 2) = (row, col), on the
        out_hw grid of `inp`, with gradients: whole slices, as DIIF decodes, at a fraction of
        a whole patch's cost. Values equal the tiled engine's at those pixels."""
        (h, w), (big_h, big_w), device = inp.shape[-2:], out_hw, inp.device
        rows = axis_cells(big_h, h, 0, big_h, device=device)
        cols = axis_cells(big_w, w, 0, big_w, device=device)
        cell = self._cell(_grid_cell(inp, rows, cols), rows, cols)
        i, j = cells[..., 0], cells[..., 1]
        corners = self._gather_corners(latents["corner"], i, j)
        ys, xs = rows.rel[i], cols.rel[j]
        row_b = self._row_borders(ys, rows.first[i], rows.last[i])
        col_b = torch.stack([cols.first[j], cols.last[j]], -1).unsqueeze(-2)
        hidden = self._slice_hidden(corners, row_b, col_b, cell[:, None, :])
        mix = self._mix_slots(hidden, ys, xs)
        pred = self._tail(mix, ys[..., :, None], xs[..., None, :], cell[:, None, None, None, :])
        out_rows, out_cols = rows.index[i], cols.index[j]
        if self.bilinear_skip:
            up = bilinear_grid(inp, axis_bilinear(big_h, h, 0, big_h, device=device),
                               axis_bilinear(big_w, w, 0, big_w, device=device))
            pred = pred + gather_pixels(up, out_rows, out_cols)
        valid = rows.valid[i][..., :, None] & cols.valid[j][..., None, :]
        return CellBatch(pred, out_rows, out_cols, valid)

    # ----- arbitrary points ------------------------------------------------------------------

    def decode_points(self, latents: Latents, index: torch.Tensor, rel: torch.Tensor, rel_cell: torch.Tensor,
                      borders: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions (B, N, Q, 3) for points with cell latent at flat `index` (B, N, Q)
        (y * w + x on the h x w latent grid), coordinate `rel` (B, N, Q, 2) relative to it,
        the MLP's cell rel_cell (B, Q, 2), and their slices' borders (B, N, Q, 4) as
        (start y, start x, end y, end x); without borders each point is its own slice."""
        b, n, q = index.shape
        table = latents["corner"]
        w = table.shape[2] - (1 if self.ensemble else 0)
        flat = index.reshape(b, n * q)
        rel = rel.reshape(b, n * q, 2)
        borders = torch.cat([rel, rel], -1) if borders is None else borders.reshape(b, n * q, 4)
        cell = rel_cell.unsqueeze(1).expand(b, n, q, 2).reshape(b, n * q, 2)
        corners = self._gather_corners(table, flat // w, flat % w)
        hidden = self._slice_hidden(corners, borders[..., None, 0::2], borders[..., None, 1::2], cell)
        mix = self._blend(hidden[:, :, 0], rel[..., 0], rel[..., 1])
        out = self._tail((mix, False), rel[..., 0], rel[..., 1], cell)
        return out.view(b, n, q, 3)

    def query(self, inp: torch.Tensor, latents: Latents, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """RGB (B, Q, 3) at global coordinates (B, Q, 2) of an output grid with pixel size
        `cell` (B, Q, 2) = (2/H, 2/W), unclipped: it gives the pitch that places each point
        in its cell's slice; the MLP sees it clipped above x4 (with fixed_area)."""
        h, w = inp.shape[-2:]
        wide = torch.float32 if coord.device.type == "mps" else torch.float64  # MPS has no float64
        size = coord.new_tensor([h, w], dtype=wide)
        pos = (coord.to(wide) + 1) * size / 2  # LR pixel units
        owner = torch.minimum((pos + 1e-5).floor().clamp_min(0), size - 1)
        rel = (2 * (pos - owner) - 1).clamp(-1, 1)
        step = cell.to(wide) * size
        first = rel - step * ((rel + 1) / step + 1e-4).floor()
        last = rel + step * (((1 - rel) / step - 1e-4).ceil() - 1)
        if self.single_slice:
            borders = torch.stack([first[..., 0], first[..., 1], last[..., 0], last[..., 1]], -1)
        else:
            borders = torch.stack([rel[..., 0], first[..., 1], rel[..., 0], last[..., 1]], -1)
        index = (owner[..., 0] * w + owner[..., 1]).long()
        mlp_cell = head_cell(step, self.fixed_area).float()
        out = self.decode_points(latents, index[:, None], rel.float()[:, None], mlp_cell,
                                 borders.float()[:, None])[:, 0]
        return self.add_skip_at_points(inp, coord, out)

    def forward(self, inp: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        h, w = inp.shape[-2:]
        latents = self.encode(inp, head_cell(cell[:, 0] * cell.new_tensor([h, w]), self.fixed_area))
        return self.query(inp, latents, coord, cell)

    # ----- cost ------------------------------------------------------------------------------

    def decoder_macs(self, in_hw: tuple[int, int], out_hw: tuple[int, int], as_implemented: bool = False) -> int:
        """Multiply-accumulates of the decoder for an in_hw -> out_hw upscale.

        The paper's formulation (default): per slice and corner, the whole head; per output
        pixel, the corner mix and the whole tail. `as_implemented`, what `render` runs on the
        whole image: the head's feature part once per corner point (encode); per slice its
        border part (the corner shift is a constant) and the other head layers per corner;
        the tail's first layer per slice and corner instead of per pixel where a slice holds
        more pixels than corners; the mix per slot (by rows: the Kc slots of each row's cell,
        K the most pixels a cell holds); the rest of the tail per output pixel. Slices that
        straddle two render blocks run in both (not counted here).
        """
        (h, w), (big_h, big_w) = in_hw, out_hw
        corners = len(self._corner_offsets())
        head, tail = self.imnet.head_linears, self.imnet.tail_linears
        dh, dt = self.imnet.hidden_dim, tail[0].out_features
        head_rest = sum(m.in_features * m.out_features for m in head[1:])
        tail_macs = sum(m.in_features * m.out_features for m in tail)
        mix = corners if self.ensemble else 0
        pixels = big_h * big_w
        if not as_implemented:
            slices = h * w if self.single_slice else big_h * w
            head_macs = head[0].in_features * head[0].out_features + head_rest
            return slices * corners * head_macs + pixels * (tail_macs + mix * dh)
        kr, kc = axis_cell_count(big_h, h), axis_cell_count(big_w, w)
        slices, per_slice, slots = (h * w, kr * kc, pixels) if self.single_slice else (big_h * w, kc, big_h * w * kc)
        points = (h + 1) * (w + 1) if self.ensemble else h * w
        macs = points * self.feat_dim * head[0].out_features + slices * (4 * head[0].out_features + corners * head_rest)
        if per_slice > corners:  # premixed: the tail's first layer on the corners' vectors
            return macs + slices * corners * dh * dt + slots * mix * dt + pixels * (tail_macs - dh * dt)
        return macs + slots * mix * dh + pixels * tail_macs


def _grid_cell(inp: torch.Tensor, rows: AxisCells, cols: AxisCells) -> torch.Tensor:
    """(B, 2) cell of a whole output grid as the engine passes it: the pitch, clipped above x4."""
    step = inp.new_tensor([[rows.step, cols.step]]).expand(inp.shape[0], 2)
    return head_cell(step)


def _pair_term(pairs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """pairs (..., 2) @ weight (D, 2).t() as two elementwise products: a 2-deep matmul runs
    other kernels (other roundings) for other row counts, which would tie values to blocks."""
    return pairs[..., :1] * weight[:, 0] + pairs[..., 1:] * weight[:, 1]


def window_cells(axis: AxisCells | AxisSlots) -> AxisCells:
    """DIIF's cells for one axis of a render window: AxisCells as they are; the engine's
    AxisSlots rebuilt from the global span they record."""
    if isinstance(axis, AxisCells):
        return axis
    if axis.span is None:
        raise ValueError("DIIF renders windows on the global grid: give AxisCells or AxisSlots with their span")
    if torch.is_inference_mode_enabled():  # the engine: blocks along a row share their column axes
        return _cached_cells(*axis.span, axis.out.device)
    return axis_cells(*axis.span, device=axis.out.device)


@functools.lru_cache(maxsize=512)
def _cached_cells(n_out: int, n_in: int, start: int, stop: int, lat_start: int, device: torch.device) -> AxisCells:
    return axis_cells(n_out, n_in, start, stop, lat_start, device=device)


def sample_cells(in_hw: tuple[int, int], count: int, batch: int = 1,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` distinct random LR cells per sample, (batch, count, 2) as (row, col)."""
    h, w = in_hw
    count = min(count, h * w)
    picks = torch.stack([torch.randperm(h * w, generator=generator)[:count] for _ in range(batch)]).to(device)
    return torch.stack([picks // w, picks % w], -1)
