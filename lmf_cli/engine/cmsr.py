"""Controllable Multi-Scale Rendering (CMSR): render calm regions at a coarser scale.

Each LR pixel's modulation intensity (mean |shift| over the render layers) says how much
detail it carries. Levels are chosen per block of BLOCK x BLOCK LR pixels on the global grid,
from the block's largest intensity: a Scale2Mod table per target scale maps decode scales to
intensity thresholds, a block is rendered at the smallest decode scale whose threshold covers
it, and its output pixels are bilinearly upsampled from that coarser rendering. Tables are
calibrated the same way, per block (`lmf_cli.training.calibrate`), against an MSE threshold,
the quality/speed knob; they live in the model's weights file, keyed by it.

Why blocks: on photos, calm and busy LR pixels alternate at the scale of one pixel, so per
pixel a coarse level saves little (each calm pixel still needs the coarse pixels around it,
and the PyTorch renderer decodes every latent with a slot on a drawn pixel). A block is calm
or busy as a whole: its latents are decoded once, at its level.

Two deliberate differences from the official code: coarse levels are upsampled straight to
the target grid (not chained level to level), for accuracy at equal cost; and only the output
pixels of the full level and the coarse pixels the other levels sample are drawn, on the
global grid, so CMSR keeps exact tiling: by the compiled kernel pixel by pixel, or by
PyTorch rectangle by rectangle (runs of blocks at one level, each an unmasked window decoded
with batched matmuls). The upsampled levels are written rectangle by rectangle (runs
of blocks at one level), so no step costs a pass over every output pixel per level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmf_cli.engine import native
from lmf_cli.engine.render import Geometry, coarse_taps, encode_finite, owners, render_region, to_samples
from lmf_cli.errors import InputError
from lmf_cli.models.base import Capabilities, ImplicitSR, Latents
from lmf_cli.models.geometry import AxisBilinear, bilinear_rows_last, cell_owner

DECODE_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
TARGET_SCALES = (6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
DEFAULT_THRESHOLD = 2e-5
QUALITY_LEVELS = {"fast": 1e-4, "balanced": 2e-5, "fine": 5e-6}
MIN_SCALE = 4.0  # as the official code: CMSR only above the training range
# LR pixels a side of a CMSR block (64 x 64 output pixels at x8). With 8 the ring of coarse pixels
# a block's upsample reads adds a quarter of its coarse pixels at decode scale 2 and a few percent
# at 8, and on B100 crops (lmf-edsr, recalibrated) `balanced` draws 55% at x8 and 37% at x12 with
# PSNR within 0.01 dB; other sizes were not measured (each needs its own calibration).
BLOCK = 8
# A coarse level is used only where its pixels, with the ring the bilinear upsample reads, are at
# most this share of the block's output pixels: above it the blend and the ring cost what the
# level saves (at x5-x6 with decode scale 4, say), and the block is rendered in full.
MAX_COARSE_SHARE = 0.7
# Render blocks a side of one CMSR region (see tiling._render_image): each level's rectangles, taps
# and coarse pixels are found once per region, so larger regions mean less bookkeeping, and larger
# coarse buffers (at most MAX_COARSE_SHARE of the region's pixels, float32). PyTorch's blocks are
# cache-sized (128 x 128 output pixels at width 16), the kernel's 1024 x 1024; with one kernel block
# a region, the kernel drew 707 coarse windows for 3 B100 crops at x30 and spent 1.3 s outside the
# kernel and the blend, against 0.6 s with 3 x 3 blocks (4 x 4: no better; one AMD EPYC thread).
REGION_BLOCKS = 4
KERNEL_REGION_BLOCKS = 3
# LR pixels a side that a PyTorch region spans at least: its calls' fixed costs are per region and
# level, and at x30 four 128-pixel blocks are 17 LR pixels, two CMSR blocks (an x30 upscale of three
# B100 crops made 2,000 coarse draws). Its decoding goes in batches of PAIR_CHUNK_SLOTS whatever the
# region's size, so only its column sums grow (about 90 MB a 1920 x 1920 region). With 64 (8 CMSR
# blocks) the x30 CMSR render took a quarter less; at x8 and x12 (4-6 blocks) no change.
REGION_MIN_LR = 64
# The PyTorch renderer's CMSR costs about 1.4-1.5x the exact render per drawn pixel (its windows are
# a block's rows tall, where the exact render's are 128 pixels: more latents cut at window edges,
# more calls), so it pays only where `balanced` draws well under 2/3 of the pixels. Measured on B100
# crops (lmf-edsr, one AMD EPYC thread), before rectangles were drawn as windows of their own: x5
# draws 83% and takes 1.10x the exact render, x6 74% and 1.09x, x8 55% and 0.82x, x12 37% and 0.6x.
# Below this scale the PyTorch renderer renders exactly (the compiled kernel pays from x5: 0.92x).
TORCH_MIN_SCALE = 8.0

Tables = dict[str, dict[str, dict[str, float]]]  # threshold -> target scale -> decode scale -> intensity


@dataclass(frozen=True)
class Schedule:
    """Decode scales below the target and their (non-decreasing) intensity thresholds."""

    decode_scales: tuple[float, ...]
    thresholds: tuple[float, ...]

    def levels(self, strength: torch.Tensor) -> torch.Tensor:
        """Level of each latent: index into decode_scales, or len(decode_scales) = full scale."""
        if not self.thresholds:
            return torch.full_like(strength, 0, dtype=torch.long)
        bounds = torch.tensor(self.thresholds, dtype=strength.dtype, device=strength.device)
        return torch.bucketize(strength, bounds, right=False)


def schedule_for(tables: Tables | None, threshold_key: str, scale: float) -> Schedule | None:
    """The schedule of the first tabulated target >= scale (else the largest), or None when
    CMSR does not apply (no table, or scale within the training range)."""
    if not tables or threshold_key not in tables or scale <= MIN_SCALE:
        return None
    by_target = tables[threshold_key]
    targets = sorted(by_target, key=float)
    chosen = next((t for t in targets if float(t) >= scale), targets[-1])
    pairs = sorted((float(d), float(v)) for d, v in by_target[chosen].items()
                   if float(d) < scale and coarse_share(float(d), scale) <= MAX_COARSE_SHARE)
    if not any(v > 0 for _, v in pairs):  # no block can be coarse: exact rendering, with no bookkeeping
        return None
    return Schedule(tuple(d for d, _ in pairs), tuple(v for _, v in pairs))


def pays(scale: float, fused: bool, device: torch.device) -> bool:
    """Whether a CMSR schedule saves time at `scale` on this renderer (the compiled kernel when
    `fused`, else PyTorch on `device`); where it would not, the engine renders exactly. One answer per
    scale and renderer, so every tile of an image decides alike. On a GPU the exact render is so fast
    that CMSR's per-window work outweighs it (an NVIDIA H200, 320 x 180 B100 crops, lmf-edsr: x8 exact
    20 ms against 805 ms at `balanced`, x12 44 against 871, x30 310 against 1072)."""
    if device.type != "cpu":
        return False
    return fused or scale >= TORCH_MIN_SCALE


def reach(capabilities: Capabilities, schedule: Schedule | None, in_hw: tuple[int, int]) -> int:
    """Input pixels around an output pixel's own that it depends on: the whole image for a model
    that attends over all of it (`tile_grid` None), else the tile margin, and under a schedule the
    rest of its block (a pixel that changes may change its block's level, and with it every output
    pixel of the block). Video reuse recomputes what changed within this reach."""
    if capabilities.tile_grid is None:
        return max(in_hw)
    return capabilities.tile_margin + (BLOCK - 1 if schedule is not None else 0)


def coarse_share(decode_scale: float, scale: float) -> float:
    """Pixels a block draws at `decode_scale` (its ring included) per output pixel at `scale`."""
    return ((BLOCK * decode_scale + 2) / (BLOCK * scale)) ** 2


def block_strength(strength: torch.Tensor) -> torch.Tensor:
    """Each LR pixel's block intensity: the largest over its BLOCK x BLOCK block of `strength`
    (h, w), whose first pixel starts a block of the global grid."""
    h, w = strength.shape
    blocks = torch.nn.functional.max_pool2d(strength[None, None], BLOCK, ceil_mode=True)[0, 0]
    return blocks.repeat_interleave(BLOCK, 0)[:h].repeat_interleave(BLOCK, 1)[:, :w]


def tile_levels(model: ImplicitSR, schedule: Schedule, image: torch.Tensor, latents: Latents,
                origin: tuple[int, int], out_hw: tuple[int, int], rows_range: tuple[int, int],
                cols_range: tuple[int, int], rel_cell: torch.Tensor, margin: int) -> torch.Tensor:
    """The level of each LR pixel of a tile (shaped as its latents): its block's, for the blocks
    holding the owners of output rows x cols. `image` (1, 3, H, W) is the whole input and
    `latents` those of the tile's piece, whose first pixel is `origin`. A block that reaches
    beyond the latents the tile's own outputs read (a core not aligned to the block grid) takes
    its intensities from the input encoded again around it, so levels never depend on tiling."""
    strength = model.modulation_intensity(latents)[0]
    (h, w), (ph, pw) = image.shape[-2:], strength.shape
    lr0, lc0 = origin
    first_r, last_r = (int(cell_owner(out_hw[0], h, torch.tensor(i))) for i in (rows_range[0], rows_range[1] - 1))
    first_c, last_c = (int(cell_owner(out_hw[1], w, torch.tensor(j))) for j in (cols_range[0], cols_range[1] - 1))
    r0, r1 = first_r // BLOCK * BLOCK, min(h, (last_r // BLOCK + 1) * BLOCK)
    c0, c1 = first_c // BLOCK * BLOCK, min(w, (last_c // BLOCK + 1) * BLOCK)
    read = (max(0, first_r - 1), min(h, last_r + 2), max(0, first_c - 1), min(w, last_c + 2))
    if read[0] <= r0 and r1 <= read[1] and read[2] <= c0 and c1 <= read[3]:
        source, (sr, sc) = strength, origin
    else:
        box = (max(0, r0 - margin), min(h, r1 + margin), max(0, c0 - margin), min(w, c1 + margin))
        again = encode_finite(model, image[:, :, box[0]:box[1], box[2]:box[3]], rel_cell)
        source, (sr, sc) = model.modulation_intensity(again)[0], (box[0], box[2])
    blocks = block_strength(source[r0 - sr:r1 - sr, c0 - sc:c1 - sc])
    # the part of the blocks inside the piece (the owners are, whatever the margin)
    a, b, c, d = max(r0, lr0), min(r1, lr0 + ph), max(c0, lc0), min(c1, lc0 + pw)
    strength = strength.clone()
    strength[a - lr0:b - lr0, c - lc0:d - lc0] = blocks[a - r0:b - r0, c - c0:d - c0]
    return schedule.levels(strength)


def resolve_threshold(tables: Tables | None, cmsr: str | float) -> str | None:
    """The table key for a CMSR level (EngineOptions.cmsr) or MSE threshold; "exact" -> None.
    Raises InputError where the model has no such table."""
    if cmsr == "exact":
        return None
    if not tables:
        raise InputError("this model has no CMSR tables; run `lmf calibrate` on it first")
    wanted = QUALITY_LEVELS[cmsr] if isinstance(cmsr, str) else float(cmsr)
    key = min(tables, key=lambda k: abs(np.log(float(k)) - np.log(wanted)))
    if not np.isclose(float(key), wanted, rtol=0.01):
        raise InputError(f"no CMSR table for MSE threshold {wanted:g} (calibrated: {', '.join(sorted(tables))})")
    return key


def level_grid(out_hw: tuple[int, int], scale: float, decode_scale: float) -> tuple[int, int]:
    """Size of the coarse grid rendered at decode_scale for a target at `scale`."""
    return tuple(max(1, round(n * decode_scale / scale)) for n in out_hw)


def render_levels(model: ImplicitSR, g: Geometry, schedule: Schedule, levels: torch.Tensor,
                  rows_range: tuple[int, int], cols_range: tuple[int, int],
                  into: torch.Tensor | None = None, block: tuple[int, int] | None = None,
                  unit: bool = False) -> torch.Tensor:
    """One output region under CMSR: each level present is drawn where the pixels' LR owners
    chose it. The region is cut into rectangles of one level (runs of LR pixels, found on the LR
    grid); the full level is drawn pixel by pixel under a mask, each coarse level renders the
    coarse pixels its rectangles sample and writes their bilinear samples. Every output pixel
    belongs to exactly one level, so the levels fill `into` (a view of the canvas) whole.
    `block` (rows, cols): the most output pixels rendered at once (the PyTorch renderer's cache
    budget); None: the whole region. `unit`: written in the canvas's units ([0, 1], or the samples of
    a uint8 or uint16 `into`), as each level writes (no extra pass over the pixels)."""
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
    by_level = _runs(window, own_r, own_c)
    out = g.piece.new_zeros(1, 3, b - a, cb - ca) if into is None else into
    for level, rects in by_level.items():
        if level == full_level and not g.fused:  # rectangle by rectangle, see _render_boxes
            _render_boxes(model, g, g.out_hw, rects, (a, ca), out, block, unit)
        elif level == full_level:
            r0, r1, c0, c1 = _bounds(rects)
            chosen = window == level
            mask = None if len(by_level) == 1 else chosen.index_select(1, own_c[c0:c1]).index_select(0, own_r[r0:r1])
            _render_chunked(model, g, g.out_hw, (a + r0, a + r1), (ca + c0, ca + c1), mask,
                            out[:, :, r0:r1, c0:c1], block, unit)
        else:
            grid = level_grid(g.out_hw, scale, schedule.decode_scales[level])
            _draw_coarse(model, g, grid, rects, (a, ca), out, block, unit)
    return out


def _runs(window: torch.Tensor, own_r: torch.Tensor, own_c: torch.Tensor) -> dict[int, torch.Tensor]:
    """Rectangles of one level, (n, 4) of output rows and columns (y0, y1, x0, x1) local to the
    region, by level: bands of identical LR rows, cut where the level changes along the band
    (with levels per block, a run of blocks), and a rectangle continued by the same columns of the
    next band grows down into it. Empty ones (LR pixels owning no output) are left out."""
    nr, nc = window.shape
    starts = torch.ones(nr, dtype=torch.bool, device=window.device)
    starts[1:] = (window[1:] != window[:-1]).any(1)
    band_starts = torch.nonzero(starts).flatten()
    band_stops = torch.cat([band_starts[1:], band_starts.new_tensor([nr])])
    out_r0 = torch.searchsorted(own_r, band_starts).tolist()
    out_r1 = torch.searchsorted(own_r, band_stops).tolist()
    found: dict[int, list[list[int]]] = {}
    ending: dict[tuple[int, int, int], list[int]] = {}  # (level, x0, x1) -> its rectangle, by bottom row
    for band, (y0, y1) in enumerate(zip(out_r0, out_r1, strict=True)):
        if y1 <= y0:
            continue
        row = window[int(band_starts[band])]
        cuts = torch.nonzero(row[1:] != row[:-1]).flatten() + 1
        col_starts = torch.cat([cuts.new_zeros(1), cuts])
        col_stops = torch.cat([cuts, cuts.new_tensor([nc])])
        x0s = torch.searchsorted(own_c, col_starts).tolist()
        x1s = torch.searchsorted(own_c, col_stops).tolist()
        for level, x0, x1 in zip(row[col_starts].tolist(), x0s, x1s, strict=True):
            if x1 <= x0:
                continue
            above = ending.get((level, x0, x1))
            if above is not None and above[1] == y0:
                above[1] = y1
            else:
                ending[level, x0, x1] = [y0, y1, x0, x1]
                found.setdefault(level, []).append(ending[level, x0, x1])
    return {level: torch.tensor(rects, dtype=torch.int64) for level, rects in found.items()}


def _bounds(rects: torch.Tensor) -> tuple[int, int, int, int]:
    """The bounding box (y0, y1, x0, x1) of rectangles (n, 4)."""
    return int(rects[:, 0].min()), int(rects[:, 1].max()), int(rects[:, 2].min()), int(rects[:, 3].max())


def _render_chunked(model: ImplicitSR, g: Geometry, grid: tuple[int, int], rows: tuple[int, int],
                    cols: tuple[int, int], mask: torch.Tensor | None, into: torch.Tensor,
                    block: tuple[int, int] | None, unit: bool = False) -> None:
    """render_region into `into` in sub-blocks of at most `block` (rows, cols), as exact
    rendering cuts its blocks. On the PyTorch renderer sub-blocks with no masked pixel are skipped,
    and the mask is dropped where a sub-block is all wanted (then it is exact rendering); the
    compiled kernel gets every mask as it is: it skips unwanted pixels eight mask bytes at a time,
    where counting them first took 0.25 ms a 1024 x 1024 block (2% of an x12 CMSR render)."""
    n_rows, n_cols = rows[1] - rows[0], cols[1] - cols[0]
    step_r, step_c = (n_rows, n_cols) if block is None else block
    for r in range(0, n_rows, step_r):
        for c in range(0, n_cols, step_c):
            r1, c1 = min(n_rows, r + step_r), min(n_cols, c + step_c)
            part = None if mask is None else mask[r:r1, c:c1]
            if part is not None and not g.fused:  # one count, not an any() and an all() pass over the mask
                wanted = int(torch.count_nonzero(part))
                if wanted == 0:
                    continue
                if wanted == part.numel():
                    part = None
            render_region(model, g, grid, (rows[0] + r, rows[0] + r1), (cols[0] + c, cols[0] + c1), mask=part,
                          into=into[:, :, r:r1, c:c1], unit=unit)


def _render_boxes(model: ImplicitSR, g: Geometry, grid: tuple[int, int], boxes: torch.Tensor,
                  origin: tuple[int, int], into: torch.Tensor, block: tuple[int, int] | None, unit: bool) -> None:
    """The PyTorch renderer's way to draw rectangles (n, 4) of a grid (local to `origin` on it, as
    `into`). A model that renders pairs draws them as one window over them all, decoding each latent
    with a slot in a rectangle once (a latent two rectangles share too), in cache-sized batches
    whatever the window's size: hundreds of small windows a level cost more in calls than in
    pixels. Other models draw each rectangle as windows of its own, unmasked."""
    if model.capabilities.renders_pairs:
        y0, y1, x0, x1 = _bounds(boxes)
        mask = _box_mask(boxes - boxes.new_tensor([y0, y0, x0, x0]), (y1 - y0, x1 - x0), into.device)
        render_region(model, g, grid, (origin[0] + y0, origin[0] + y1), (origin[1] + x0, origin[1] + x1), mask,
                      into[:, :, y0:y1, x0:x1], unit)
        return
    for y0, y1, x0, x1 in boxes.tolist():
        _render_chunked(model, g, grid, (origin[0] + y0, origin[0] + y1), (origin[1] + x0, origin[1] + x1), None,
                        into[:, :, y0:y1, x0:x1], block, unit)


def _draw_coarse(model: ImplicitSR, g: Geometry, grid: tuple[int, int], rects: torch.Tensor,
                 origin: tuple[int, int], out: torch.Tensor, block: tuple[int, int] | None, unit: bool) -> None:
    """A coarse level: render the coarse pixels that its rectangles (output rows and columns of
    the region at `origin`) sample, then write each rectangle's bilinear samples of them (in the
    canvas's units with `unit`, see render.to_samples; the coarse pixels stay normalised)."""
    r0, r1, c0, c1 = _bounds(rects)
    a, ca = origin
    coarse_rows, coarse_cols, taps_r, taps_c = coarse_taps(g, grid, (a + r0, a + r1), (ca + c0, ca + c1))
    local = rects - rects.new_tensor([r0, r0, c0, c0])
    boxes = _tapped(local, taps_r, taps_c)
    shape, device = (coarse_rows[1] - coarse_rows[0], coarse_cols[1] - coarse_cols[0]), g.piece.device
    if model.capabilities.renders_pairs and not g.fused:
        # one window over the boxes, which span the coarse grid's window: taken as rendered, not copied
        # into a buffer under the mask (the pixels outside the boxes are never read)
        coarse = render_region(model, g, grid, coarse_rows, coarse_cols, _box_mask(boxes, shape, device))
    else:
        coarse = g.piece.new_empty(1, 3, *shape)  # only the pixels drawn are read: no need to clear it
        if g.fused:
            _render_chunked(model, g, grid, coarse_rows, coarse_cols, _box_mask(boxes, shape, device), coarse, block)
        else:
            _render_boxes(model, g, grid, boxes, (coarse_rows[0], coarse_cols[0]), coarse, block, False)
    region = out[:, :, r0:r1, c0:c1]
    if g.fused:
        native.blend_rects(model.capabilities.kernel_width, region, local, coarse, taps_r, taps_c, unit)
        return
    # channels last, as the canvas holds them (on a GPU, a block of its own: any layout)
    coarse_hwc, region_hwc = coarse[0].permute(1, 2, 0).contiguous(), region[0].permute(1, 2, 0)
    firsts, lasts = taps_r.lo[local[:, 0]].tolist(), (taps_r.hi[local[:, 1] - 1] + 1).tolist()
    for (y0, y1, x0, x1), first, last in zip(local.tolist(), firsts, lasts, strict=True):
        sub_r = AxisBilinear(taps_r.lo[y0:y1] - first, taps_r.hi[y0:y1] - first, taps_r.frac[y0:y1])
        sub_c = AxisBilinear(taps_c.lo[x0:x1], taps_c.hi[x0:x1], taps_c.frac[x0:x1])
        sample = bilinear_rows_last(coarse_hwc[first:last], sub_r, sub_c)
        region_hwc[y0:y1, x0:x1] = to_samples(sample, region.dtype, unit)


def _box_mask(boxes: torch.Tensor, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """A (rows, cols) boolean mask, True inside the boxes (n, 4) of (y0, y1, x0, x1)."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    for y0, y1, x0, x1 in boxes.tolist():
        mask[y0:y1, x0:x1] = True
    return mask


def _tapped(rects: torch.Tensor, taps_r: AxisBilinear, taps_c: AxisBilinear) -> torch.Tensor:
    """The coarse pixels that the rectangles (in the taps' rows and columns) sample, (n, 4): a
    rectangle of the coarse grid each, from its first row's and column's low taps to its last
    ones' high taps (taps increase along an axis)."""
    return torch.stack([taps_r.lo[rects[:, 0]], taps_r.hi[rects[:, 1] - 1] + 1,
                        taps_c.lo[rects[:, 2]], taps_c.hi[rects[:, 3] - 1] + 1], 1)
