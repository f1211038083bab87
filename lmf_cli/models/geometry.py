"""Coordinates, neighbour lookup and ensemble weights shared by every implicit decoder.

Conventions (DESIGN.md §1): pixel centres in [-1, 1], first axis y; a query looks up the
4 latents around it (offsets of half an LR pixel, +1e-6, clamped, nearest lookup) and
weights each prediction by the area of the diagonally opposite rectangle.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

ENSEMBLE_EPS = 1e-6
AREA_EPS = 1e-9


def pixel_centres(n: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centres of n pixels spanning [-1, 1]: -1 + (2i + 1) / n."""
    return (torch.arange(n, device=device, dtype=torch.float64) * 2 + 1).div(n).sub(1).to(dtype)


def make_coord(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(height * width, 2) pixel-centre coordinates in row-major order, (y, x) per row."""
    ys = pixel_centres(height, device)
    xs = pixel_centres(width, device)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


@dataclass(frozen=True)
class Neighbours:
    """The 4 ensemble neighbours of each query, flattened as (vy, vx) in (-1,-1),(-1,1),(1,-1),(1,1).

    index: (B, 4, Q) flat latent index y * w + x; rel: (B, 4, Q, 2); weight: (B, 4, Q).
    """

    index: torch.Tensor
    rel: torch.Tensor
    weight: torch.Tensor


def neighbours(coord: torch.Tensor, h: int, w: int, local_ensemble: bool = True) -> Neighbours:
    """Ensemble neighbours of global query coordinates `coord` (B, Q, 2) on an h x w latent grid."""
    offsets = (-1, 1) if local_ensemble else (0,)
    eps = ENSEMBLE_EPS if local_ensemble else 0.0
    indices, rels, areas = [], [], []
    for vy in offsets:
        for vx in offsets:
            iy, ry = _lookup_eps(coord[..., 0], h, vy, eps)
            ix, rx = _lookup_eps(coord[..., 1], w, vx, eps)
            indices.append(iy * w + ix)
            rels.append(torch.stack([ry, rx], dim=-1))
            areas.append((ry * rx).abs() + AREA_EPS)
    index = torch.stack(indices, 1)
    rel = torch.stack(rels, 1)
    area = torch.stack(areas, 1)
    if local_ensemble:
        area = area.flip(1)  # each prediction takes the area of the diagonally opposite one
    return Neighbours(index, rel, area / area.sum(1, keepdim=True))


def _lookup_eps(coord: torch.Tensor, n: int, offset: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    shifted = (coord + offset / n + eps).clamp(-1 + 1e-6, 1 - 1e-6)
    index = ((shifted + 1) * (n / 2)).floor().long().clamp_(0, n - 1)
    centre = (index.to(coord.dtype) * 2 + 1) / n - 1
    return index, (coord - centre) * n


def gather_latents(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of a per-latent table (B, h*w, C) at flat indices (B, ...) -> (B, ..., C).

    Whole rows by index_select: torch.gather reads an index per value (C of them per row), and
    its backward scatters value by value; here forward and backward move rows (a training batch's
    147k rows of 208: 1.6x and 2-3x faster on a Zen 5 EPYC thread), the same numbers. Indices must
    lie in [0, h*w): the rows of all samples are one table here, so a larger one would read the next
    sample's row instead of failing."""
    b, n, c = table.shape
    rows = index.reshape(b, -1) + torch.arange(b, device=index.device).unsqueeze(1) * n
    return table.reshape(b * n, c).index_select(0, rows.reshape(-1)).view(*index.shape, c)


@dataclass(frozen=True)
class AxisSlots:
    """Output pixels of a window grouped by the latent they read, along one axis.

    Latent `lat0 + r` (index into the latent window) owns slots k = 0..K-1: output index
    `out[r, k]` (local to the output window), relative coordinate `rel[r, k]` and separable
    ensemble weight `weight[r, k]` (0 for padding). Each output pixel sits in the slots of
    the one or two latents around it, and its weights sum to 1.

    LIIF's area weight is not quite separable: each area carries a 1e-9 floor, which decides
    the weights where a relative coordinate is (nearly) 0, e.g. a query on a latent centre,
    where both neighbours are one latent and all four areas are the floor. So each slot also
    keeps `other` (|rel| of the other neighbour, summed over the neighbours merged into the
    slot), `taps` (how many were merged: 1 or 2) and `total` (|rel_a| + |rel_b| of its output
    pixel); `ensemble_weights` combines two axes into LIIF's exact weight
    (other_y * other_x + taps_y * taps_x * 1e-9) / (total_y * total_x + 4e-9).

    `span` records the call that built the slots, (n_out, n_in, out_start, out_stop,
    lat_start): the window on the global grid, for decoders that group output pixels their
    own way (DIIF's cells, `axis_cells`).
    """

    lat0: int
    out: torch.Tensor
    rel: torch.Tensor
    weight: torch.Tensor
    other: torch.Tensor
    taps: torch.Tensor
    total: torch.Tensor
    span: tuple[int, int, int, int, int] | None = None

    @property
    def n_latents(self) -> int:
        return self.out.shape[0]


def axis_slots(n_out: int, n_in: int, out_start: int, out_stop: int, lat_start: int = 0,
               local_ensemble: bool = True, device: torch.device | str = "cpu") -> AxisSlots:
    """Group output pixels [out_start, out_stop) of an n_in -> n_out axis by neighbour latent.

    Coordinates are global, so a tile renders exactly what the whole image would; latent
    indices are returned relative to `lat_start`, the first latent the caller holds. The
    weight of neighbour v is |rel of the other one| / (|rel_a| + |rel_b|): the product of the
    two axes' weights is LIIF's normalised area weight.
    """
    coord = pixel_centres(n_out, device, torch.float64)[out_start:out_stop]
    found = _axis_neighbours(coord, n_in, local_ensemble, official_centres(n_out, device)[out_start:out_stop])
    if local_ensemble:
        (_, r0), (_, r1) = found
        a0, a1 = r0.abs(), r1.abs()
        total = a0 + a1
        # Zero only where both neighbours are the same latent at the query's own centre.
        w0 = torch.where(total > 0, a1 / total.clamp_min(1e-300), 0.5)
        weights = [w0, 1 - w0]
        others = [a1, a0]
    else:
        weights = [torch.ones_like(coord)]
        total = torch.ones_like(coord)
        others = [torch.ones_like(coord)]
    n_win = out_stop - out_start
    lat = torch.cat([f[0] for f in found]) - lat_start
    if int(lat.min()) < 0:
        raise ValueError("latent window starts after the output window needs it")
    rel = torch.cat([f[1] for f in found])
    weight = torch.cat(weights)
    out = torch.arange(n_win, device=device).repeat(len(found))
    # Both neighbours clamped onto one latent (image border): one slot with the summed weight.
    key, inverse = torch.unique(lat * n_win + out, return_inverse=True)
    merged_weight = torch.zeros(key.numel(), dtype=torch.float64, device=device).index_add_(0, inverse, weight)
    merged_rel = torch.zeros(key.numel(), dtype=torch.float64, device=device).index_copy_(0, inverse, rel)
    merged_other = torch.zeros(key.numel(), dtype=torch.float64, device=device).index_add_(0, inverse,
                                                                                           torch.cat(others))
    merged_taps = torch.bincount(inverse, minlength=key.numel()).double()
    out_of = key % n_win
    lat_of = key // n_win
    lat0 = int(lat_of.min())
    lat_of = lat_of - lat0
    counts = torch.bincount(lat_of)
    first = torch.cumsum(counts, 0) - counts
    k = torch.arange(key.numel(), device=device) - first[lat_of]
    # One slot count per axis for the whole image, so every block hands the batched matmuls
    # the same per-latent shapes (and BLAS the same kernels): blocks never change a value.
    shape = (counts.numel(), max(int(counts.max()), axis_slot_count(n_out, n_in, local_ensemble)))
    out_t = torch.zeros(shape, dtype=torch.long, device=device)
    rel_t = torch.zeros(shape, dtype=torch.float64, device=device)
    w_t = torch.zeros(shape, dtype=torch.float64, device=device)
    other_t = torch.zeros(shape, dtype=torch.float64, device=device)
    taps_t = torch.zeros(shape, dtype=torch.float64, device=device)
    total_t = torch.ones(shape, dtype=torch.float64, device=device)
    out_t[lat_of, k] = out_of
    rel_t[lat_of, k] = merged_rel
    w_t[lat_of, k] = merged_weight
    other_t[lat_of, k] = merged_other
    taps_t[lat_of, k] = merged_taps
    total_t[lat_of, k] = total[out_of]
    return AxisSlots(lat0, out_t, rel_t.float(), w_t.float(), other_t, taps_t, total_t,
                     (n_out, n_in, out_start, out_stop, lat_start))


def official_centres(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixel centres as the official code's float32 `make_coord` gives them (-1 + r + 2r*i,
    r = 1/n, in float32), as float64. They differ from the exact centres by float32 rounding."""
    r = 1.0 / n
    return (-1 + r + (2 * r) * torch.arange(n, device=device).float()).double()


def _axis_neighbours(coord: torch.Tensor, n_in: int, local_ensemble: bool,
                     official: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(latent index, relative coordinate) of each ensemble neighbour along one axis.

    A query exactly on a latent centre (x3's last rows, ...) has relative coordinate 0 for
    both neighbours, which collapses LIIF's area weights to their 1e-9 floor; the official
    code decides that with its float32 coordinates (`official`: the queries' official
    centres), where rounding may leave a tiny non-zero offset. We take its value there, so
    official checkpoints give the official pixels on those rows and columns too.
    """
    offsets = (-1, 1) if local_ensemble else (0,)
    eps = ENSEMBLE_EPS if local_ensemble else 0.0
    found = [_lookup_eps(coord, n_in, v, eps) for v in offsets]
    if official is None or not local_ensemble:
        return found
    centres = official_centres(n_in, coord.device)
    return [(index, torch.where(rel == 0, ((official - centres[index]).float() * n_in).double(), rel))
            for index, rel in found]


@functools.lru_cache(maxsize=64)
def axis_slot_count(n_out: int, n_in: int, local_ensemble: bool = True) -> int:
    """Most output pixels any one latent serves along an n_in -> n_out axis."""
    found = _axis_neighbours(pixel_centres(n_out, "cpu", torch.float64), n_in, local_ensemble)
    lat = torch.cat([index for index, _ in found])
    keys = torch.unique(lat * n_out + torch.arange(n_out).repeat(len(found)))
    return max(int(torch.bincount(keys // n_out).max()), 1)


def cell_starts(n_out: int, n_in: int, lat: torch.Tensor) -> torch.Tensor:
    """First output index whose centre lies in LR pixel `lat` (integer tensor), exactly:
    ceil(lat * n_out / n_in - 1/2); `lat = n_in` gives n_out."""
    return -torch.div(n_in - 2 * lat * n_out, 2 * n_in, rounding_mode="floor")


def cell_owner(n_out: int, n_in: int, index: torch.Tensor) -> torch.Tensor:
    """LR pixel holding the centre of output pixel `index`, exactly; a centre on the border
    of two LR pixels belongs to the second one (relative coordinate -1)."""
    return torch.div((2 * index + 1) * n_in, 2 * n_out, rounding_mode="floor")


@functools.lru_cache(maxsize=64)
def axis_cell_count(n_out: int, n_in: int) -> int:
    """Most output pixels whose centres lie in one LR pixel along an n_in -> n_out axis."""
    starts = cell_starts(n_out, n_in, torch.arange(n_in + 1))
    return max(int((starts[1:] - starts[:-1]).max()), 1)


@dataclass(frozen=True)
class AxisCells:
    """Output pixels of a window grouped by the LR pixel (cell) their centre lies in, along
    one axis: the grouping of DIIF's coordinate slices. Every output pixel has one cell.

    Latent `lat0 + r` (index into the latent table) owns slots k = 0..K-1, where slot k is
    the cell's k-th output pixel *in the whole image* and K the most any cell of the axis
    holds, so a slot is the same pixel whatever window, tile or block it is decoded in.
    rel (n, K): coordinate of the slot relative to the latent centre, in LR units (a cell
    spans [-1, 1)); slots past the cell's last pixel continue its pixel pitch.
    valid (n, K): the slot is an output pixel of this window. index (n, K): its global output
    index (clamped for padding). first, last (n,): rel of the cell's first and last output
    pixel in the whole image (DIIF's slice borders). lat_of, k_of (n_window,): the slot of
    each output pixel of the window, in order. step: output pixel pitch in LR units.
    """

    lat0: int
    rel: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor
    lat_of: torch.Tensor
    k_of: torch.Tensor
    step: float

    @property
    def n_latents(self) -> int:
        return self.rel.shape[0]


def axis_cells(n_out: int, n_in: int, out_start: int, out_stop: int, lat_start: int = 0,
               device: torch.device | str = "cpu") -> AxisCells:
    """Cells of output pixels [out_start, out_stop) of an n_in -> n_out axis, in exact
    integer arithmetic, on the global grid. Latent indices are returned relative to
    `lat_start`, the first latent the caller holds. Built on the CPU (float64), then moved."""
    j = torch.arange(out_start, out_stop)
    owner = cell_owner(n_out, n_in, j)
    first_lat = int(owner[0])
    if first_lat < lat_start:
        raise ValueError("latent window starts after the output window needs it")
    lats = torch.arange(first_lat, int(owner[-1]) + 1)
    starts = cell_starts(n_out, n_in, lats)
    stops = cell_starts(n_out, n_in, lats + 1)
    jj = starts[:, None] + torch.arange(axis_cell_count(n_out, n_in))
    valid = (jj < stops[:, None]) & (jj >= out_start) & (jj < out_stop)
    rel = ((2 * jj + 1) * n_in - (2 * lats[:, None] + 1) * n_out).double() / n_out
    last = ((2 * stops - 1) * n_in - (2 * lats + 1) * n_out).double() / n_out
    lat_of = owner - first_lat
    parts = (rel.float(), valid, jj.clamp(max=n_out - 1), rel[:, 0].float(), last.float(), lat_of,
             j - starts[lat_of])
    return AxisCells(first_lat - lat_start, *(t.to(device) for t in parts), 2 * n_in / n_out)


@dataclass(frozen=True)
class AxisTaps:
    """The ensemble neighbours of each output row (or column) of a window, in output order:
    latent index (local to the latent table, int64) and relative coordinate (float64),
    both (n, taps), taps 2 with the local ensemble and 1 without. The per-pixel form of
    `AxisSlots`, for the compiled kernel."""

    lat: torch.Tensor
    rel: torch.Tensor


def axis_taps(n_out: int, n_in: int, out_start: int, out_stop: int, lat_start: int = 0,
              local_ensemble: bool = True, device: torch.device | str = "cpu") -> AxisTaps:
    coord = pixel_centres(n_out, device, torch.float64)[out_start:out_stop]
    found = _axis_neighbours(coord, n_in, local_ensemble, official_centres(n_out, device)[out_start:out_stop])
    lat = torch.stack([index for index, _ in found], 1) - lat_start
    if int(lat.min()) < 0:
        raise ValueError("latent window starts after the output window needs it")
    return AxisTaps(lat.contiguous(), torch.stack([rel for _, rel in found], 1).contiguous())


@dataclass(frozen=True)
class AxisBilinear:
    """Bilinear taps (border padding, align_corners=False) along one axis, local indices."""

    lo: torch.Tensor
    hi: torch.Tensor
    frac: torch.Tensor


def axis_bilinear(n_out: int, n_in: int, out_start: int, out_stop: int, src_start: int = 0,
                  device: torch.device | str = "cpu") -> AxisBilinear:
    coord = pixel_centres(n_out, device, torch.float64)[out_start:out_stop]
    pos = (((coord + 1) * n_in - 1) / 2).clamp(0, n_in - 1)
    lo = pos.floor()
    frac = pos - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=n_in - 1)
    return AxisBilinear(lo - src_start, hi - src_start, frac.float())


def bilinear_grid(image: torch.Tensor, rows: AxisBilinear, cols: AxisBilinear) -> torch.Tensor:
    """Separable bilinear resampling of (B, C, h, w) at the window the axes describe."""
    fy = rows.frac.view(1, 1, -1, 1).to(image.dtype)
    y = image.index_select(2, rows.lo) * (1 - fy) + image.index_select(2, rows.hi) * fy
    fx = cols.frac.view(1, 1, 1, -1).to(image.dtype)
    return y.index_select(3, cols.lo) * (1 - fx) + y.index_select(3, cols.hi) * fx


def bilinear_rows_last(image: torch.Tensor, rows: AxisBilinear, cols: AxisBilinear) -> torch.Tensor:
    """bilinear_grid of one (h, w, C) image, channels last, to (rows, cols, C): columns first, as
    the render kernel blends, so the few coarse rows are resampled before the many output rows,
    and every gather moves whole pixels."""
    fx = cols.frac.view(1, -1, 1).to(image.dtype)
    x = torch.lerp(image.index_select(1, cols.lo), image.index_select(1, cols.hi), fx)
    fy = rows.frac.view(-1, 1, 1).to(image.dtype)
    return torch.lerp(x.index_select(0, rows.lo), x.index_select(0, rows.hi), fy)
