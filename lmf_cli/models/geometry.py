"""Coordinates, neighbour lookup and ensemble weights shared by every implicit decoder.

Conventions (DESIGN.md §1): pixel centres in [-1, 1], first axis y; a query looks up the
4 latents around it (offsets of half an LR pixel, +1e-6, clamped, nearest lookup) and
weights each prediction by the area of the diagonally opposite rectangle.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch

ENSEMBLE_EPS = 1e-6
# From this scale on, an axis's slots are grouped in a row per latent and neighbour role, below
# it in a row per latent (see AxisSlots). Role rows hold ~scale slots, so a row pair is
# scale^2 slots: from 64 on the batched matmuls stay efficient and the saved slots pay. PyTorch
# renderer, lmf-edsr, 3 B100 crops, one Zen 5 EPYC thread, exact render: x12 -14%, x8 -6%,
# x6 +24%, CMSR at x8 and x12 -2..-3%.
ROLE_ROWS_MIN_SCALE = 8.0
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
    """Output pixels of a window grouped by the latent they read and the neighbour it is to them
    (lower or upper), along one axis.

    Row r reads latent `lat0 + lat[r]` (index into the latent window) and owns slots k = 0..K-1:
    output index `out[r, k]` (local to the output window), relative coordinate `rel[r, k]` and
    separable ensemble weight `weight[r, k]` (0 for padding). Each output pixel sits in the slots
    of two rows (one without the local ensemble), and its weights sum to 1.

    From ROLE_ROWS_MIN_SCALE on, a row per latent and neighbour role, below it a row per latent.
    A latent is the lower neighbour of the ~s output pixels past its centre and the upper one of
    the ~s before it (s the scale), and a window cuts the latents at its edges: rows of 2s slots
    waste about 4s slots per axis there, rows of s slots about 2s. At x12, 128-pixel windows
    decode 1.09 x 1.09 the slots they need instead of 1.18 x 1.18 (the render MLP's work is per
    slot); at small scales rows of s slots are too short for the batched matmuls to pay.

    LIIF's area weight is not quite separable: each area carries a 1e-9 floor, which decides
    the weights where a relative coordinate is (nearly) 0, e.g. a query on a latent centre,
    where both neighbours are one latent and all four areas are the floor. So each slot also
    keeps `other` (|rel| of the other neighbour), `taps` (1, 0 for padding) and `total`
    (|rel_a| + |rel_b| of its output pixel); `ensemble_weights` combines two axes into LIIF's
    exact weight (other_y * other_x + taps_y * taps_x * 1e-9) / (total_y * total_x + 4e-9).

    `span` records the call that built the slots, (n_out, n_in, out_start, out_stop,
    lat_start): the window on the global grid, for decoders that group output pixels their
    own way (DIIF's cells, `axis_cells`).
    """

    lat0: int
    lat: torch.Tensor
    out: torch.Tensor
    rel: torch.Tensor
    weight: torch.Tensor
    other: torch.Tensor
    taps: torch.Tensor
    total: torch.Tensor
    span: tuple[int, int, int, int, int] | None = None

    @property
    def n_rows(self) -> int:
        return self.out.shape[0]

    @functools.cached_property
    def n_latents(self) -> int:
        """Latents the rows read, lat0 onwards."""
        return int(self.lat[-1]) + 1

    @functools.cached_property
    def spans(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's first output pixel and the one past its last (a row's slots are a run of
        pixels); (0, 0) for a row of padding alone."""
        valid = self.taps > 0
        first = self.out.masked_fill(~valid, torch.iinfo(self.out.dtype).max).amin(1)
        stop = self.out.masked_fill(~valid, -1).amax(1) + 1
        empty = stop == 0
        return first.masked_fill(empty, 0), stop


def axis_slots(n_out: int, n_in: int, out_start: int, out_stop: int, lat_start: int = 0,
               local_ensemble: bool = True, device: torch.device | str = "cpu") -> AxisSlots:
    """Group output pixels [out_start, out_stop) of an n_in -> n_out axis by neighbour latent.

    Coordinates are global, so a tile renders exactly what the whole image would; latent
    indices are returned relative to `lat_start`, the first latent the caller holds. The
    weight of neighbour v is |rel of the other one| / (|rel_a| + |rel_b|): the product of the
    two axes' weights is LIIF's normalised area weight.

    A window is a slice of the whole axis, grouped once per axis (`_whole_axis_slots`): CMSR
    renders hundreds of small windows per image, and grouping each anew took more time than
    decoding it. A slot keeps its place in its row of the whole axis (slots outside the window
    are padding), and every window has the whole axis's slot count, so every block hands the
    batched matmuls the same per-row shapes (and BLAS the same kernels).
    """
    by_role = local_ensemble and n_out >= ROLE_ROWS_MIN_SCALE * n_in
    whole = _whole_axis_slots(n_out, n_in, local_ensemble, by_role, torch.device(device))
    first_row, last_row = whole.rows_from(out_start, out_stop)
    rows = slice(first_row, last_row)
    first = whole.first_lat[first_row]
    if first < lat_start:
        raise ValueError("latent window starts after the output window needs it")
    out = whole.slots.out[rows]
    outside = (out < out_start) | (out >= out_stop) | (whole.slots.taps[rows] == 0)

    def kept(t: torch.Tensor) -> torch.Tensor:
        return t[rows].masked_fill(outside, 0)

    # Slots outside the window become padding through their weights (and output index) alone: their
    # relative coordinates and totals are decoded and weighted by 0 like any padding.
    return AxisSlots(first - lat_start, whole.slots.lat[rows] - (first - whole.slots.lat0),
                     (out - out_start).masked_fill_(outside, 0), whole.slots.rel[rows], kept(whole.slots.weight),
                     kept(whole.slots.other), kept(whole.slots.taps), whole.slots.total[rows],
                     (n_out, n_in, out_start, out_stop, lat_start))


@dataclass(frozen=True)
class _WholeAxis:
    """Every output pixel of an axis in its rows (`slots`, global output indices), and as lists each
    row's first pixel, the pixel past its last, and its latent: rows are ordered so that both their
    first and last pixels never decrease, so a window's rows are one run of them."""

    slots: AxisSlots
    starts: list[int]
    stops: list[int]
    first_lat: list[int]

    def rows_from(self, out_start: int, out_stop: int) -> tuple[int, int]:
        """The run of rows with a pixel in [out_start, out_stop)."""
        return bisect.bisect_right(self.stops, out_start), bisect.bisect_left(self.starts, out_stop)


@functools.lru_cache(maxsize=64)
def _whole_axis_slots(n_out: int, n_in: int, local_ensemble: bool, by_role: bool, device: torch.device) -> _WholeAxis:
    by_pixel, rel_by_pixel = _whole_axis_taps(n_out, n_in, local_ensemble, device)  # the same neighbours
    found = list(zip(by_pixel.unbind(1), rel_by_pixel.unbind(1), strict=True))
    if local_ensemble:
        (_, r0), (_, r1) = found
        a0, a1 = r0.abs(), r1.abs()
        total = a0 + a1
        # Zero only where both neighbours are the same latent at the query's own centre.
        w0 = torch.where(total > 0, a1 / total.clamp_min(1e-300), 0.5)
        weights, others = [w0, 1 - w0], [a1, a0]
    else:
        total = torch.ones(n_out, dtype=torch.float64, device=device)
        weights, others = [total], [total]
    n_roles = len(found)
    lat = torch.cat([index for index, _ in found])
    pixel = torch.arange(n_out, device=device).repeat(n_roles)
    if by_role:
        # A row holds the pixels of one pair of neighbours (one LR pixel's span, or the half span
        # between an image border and the first centre, where both neighbours are one latent) in
        # one role; rows in the order of their pairs, pixels in order within a row.
        pair = sum(index for index, _ in found).repeat(n_roles)
        row_key = pair * n_roles + torch.arange(n_roles, device=device).repeat_interleave(n_out)
    else:
        row_key = lat
    # A pixel whose two neighbours are one latent (image borders) is one slot of a latent's row,
    # with the summed weight.
    slot_key, inverse = torch.unique(row_key * n_out + pixel, return_inverse=True)

    def merged(values: torch.Tensor, add: bool = True) -> torch.Tensor:
        into = torch.zeros(slot_key.numel(), dtype=values.dtype, device=device)
        return into.index_add_(0, inverse, values) if add else into.index_copy_(0, inverse, values)

    _, row_of, counts = torch.unique_consecutive(slot_key // n_out, return_inverse=True, return_counts=True)
    stops = torch.cumsum(counts, 0)
    k = torch.arange(slot_key.numel(), device=device) - (stops - counts)[row_of]
    shape = (counts.numel(), int(counts.max()))

    def table(values: torch.Tensor, pad: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        t = torch.full(shape, pad, dtype=dtype, device=device)
        t[row_of, k] = values.to(dtype)
        return t

    out = slot_key % n_out
    row_lat = merged(lat, add=False)[stops - counts]
    lat0 = int(row_lat[0])  # a window's first row is a lower neighbour's: its latent is the window's first
    slots = AxisSlots(lat0, row_lat - lat0, table(out, 0, torch.long),
                      table(merged(torch.cat([rel for _, rel in found]), add=False), 0.0, torch.float32),
                      table(merged(torch.cat(weights)), 0.0, torch.float32), table(merged(torch.cat(others)), 0.0),
                      table(merged(torch.ones(n_roles * n_out, dtype=torch.float64, device=device)), 0.0),
                      table(total[out], 1.0))
    return _WholeAxis(slots, out[stops - counts].tolist(), (out[stops - 1] + 1).tolist(), row_lat.tolist())


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
    lat, rel = _whole_axis_taps(n_out, n_in, local_ensemble, torch.device(device))
    window = lat[out_start:out_stop] - lat_start
    if int(window[0].min()) < 0:  # neighbours never decrease along an axis
        raise ValueError("latent window starts after the output window needs it")
    return AxisTaps(window, rel[out_start:out_stop])


@functools.lru_cache(maxsize=64)
def _whole_axis_taps(n_out: int, n_in: int, local_ensemble: bool,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """axis_taps of a whole axis, sliced per window (see axis_slots for why)."""
    found = _axis_neighbours(pixel_centres(n_out, device, torch.float64), n_in, local_ensemble,
                             official_centres(n_out, device))
    return (torch.stack([index for index, _ in found], 1).contiguous(),
            torch.stack([rel for _, rel in found], 1).contiguous())


@dataclass(frozen=True)
class AxisBilinear:
    """Bilinear taps (border padding, align_corners=False) along one axis, local indices."""

    lo: torch.Tensor
    hi: torch.Tensor
    frac: torch.Tensor


def axis_bilinear(n_out: int, n_in: int, out_start: int, out_stop: int, src_start: int = 0,
                  device: torch.device | str = "cpu") -> AxisBilinear:
    whole = _whole_axis_bilinear(n_out, n_in, torch.device(device))
    return AxisBilinear(whole.lo[out_start:out_stop] - src_start, whole.hi[out_start:out_stop] - src_start,
                        whole.frac[out_start:out_stop])


@functools.lru_cache(maxsize=64)
def _whole_axis_bilinear(n_out: int, n_in: int, device: torch.device) -> AxisBilinear:
    """axis_bilinear of a whole axis, sliced per window (see axis_slots for why)."""
    coord = pixel_centres(n_out, device, torch.float64)
    pos = (((coord + 1) * n_in - 1) / 2).clamp(0, n_in - 1)
    lo = pos.floor()
    frac = pos - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=n_in - 1)
    return AxisBilinear(lo, hi, frac.float())


def bilinear_grid(image: torch.Tensor, rows: AxisBilinear, cols: AxisBilinear) -> torch.Tensor:
    """Separable bilinear resampling of (B, C, h, w) at the window the axes describe."""
    fy = rows.frac.view(1, 1, -1, 1).to(image.dtype)
    y = image.index_select(2, rows.lo) * (1 - fy) + image.index_select(2, rows.hi) * fy
    fx = cols.frac.view(1, 1, 1, -1).to(image.dtype)
    return y.index_select(3, cols.lo) * (1 - fx) + y.index_select(3, cols.hi) * fx


def bilinear_rows_last(image: torch.Tensor, rows: AxisBilinear, cols: AxisBilinear) -> torch.Tensor:
    """bilinear_grid of channels-last (..., h, w, C) images to (..., rows, cols, C): columns first, as
    the render kernel blends, so the few coarse rows are resampled before the many output rows,
    and every gather moves whole pixels."""
    fx = cols.frac.view(-1, 1).to(image.dtype)
    x = torch.lerp(image.index_select(-2, cols.lo), image.index_select(-2, cols.hi), fx)
    fy = rows.frac.view(-1, 1, 1).to(image.dtype)
    return torch.lerp(x.index_select(-3, rows.lo), x.index_select(-3, rows.hi), fy)


def bilinear_window_last(image: torch.Tensor, rows: AxisBilinear, cols: AxisBilinear) -> torch.Tensor:
    """bilinear_grid of (B, C, h, w) at a window, as (B, rows, cols, C), channels last: the input pixels
    the window reads (taps never decrease along an axis) are copied channels last once, and every
    gather then moves whole pixels. On channels-first input the gather along the last axis reads a
    value at a time: 6 ms for a 512 x 512 window where this takes 1 (one Zen 5 EPYC thread)."""
    r0, r1 = int(rows.lo[0]), int(rows.hi[-1]) + 1
    c0, c1 = int(cols.lo[0]), int(cols.hi[-1]) + 1
    part = image[:, :, r0:r1, c0:c1].permute(0, 2, 3, 1).contiguous()
    return bilinear_rows_last(part, AxisBilinear(rows.lo - r0, rows.hi - r0, rows.frac),
                              AxisBilinear(cols.lo - c0, cols.hi - c0, cols.frac))
