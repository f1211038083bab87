"""Controllable Multi-Scale Rendering (CMSR): render calm regions at a coarser scale.

Each LR pixel's modulation intensity (mean |shift| over the render layers) says how much
detail it carries. A Scale2Mod table per target scale maps decode scales to intensity
thresholds: an LR pixel is rendered at the smallest decode scale whose threshold covers its
intensity, and its output pixels are bilinearly upsampled from that coarser rendering.
Tables are calibrated on training images (`lmf_cli.training.calibrate`) against an MSE
threshold, the quality/speed knob; they live in the model's weights file, keyed by it.

Two deliberate differences from the official code: coarse levels are upsampled straight to
the target grid (not chained level to level), for accuracy at equal cost; and only the output
pixels of the full level and the coarse pixels the other levels sample are drawn, on the
global grid, so CMSR keeps exact tiling: by the compiled kernel pixel by pixel, or by
PyTorch latent by latent (the latents owning those pixels decode their slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmf_cli.engine import native
from lmf_cli.engine.render import Geometry, coarse_taps, owners, render_region, span
from lmf_cli.errors import InputError
from lmf_cli.models.base import ImplicitSR
from lmf_cli.models.geometry import bilinear_grid

DECODE_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
TARGET_SCALES = (6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
DEFAULT_THRESHOLD = 2e-5
QUALITY_LEVELS = {"fast": 1e-4, "balanced": 2e-5, "fine": 5e-6}
MIN_SCALE = 4.0  # as the official code: CMSR only above the training range

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
    pairs = sorted((float(d), float(v)) for d, v in by_target[chosen].items() if float(d) < scale)
    return Schedule(tuple(d for d, _ in pairs), tuple(v for _, v in pairs))


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
                   into: torch.Tensor | None = None) -> torch.Tensor:
    """One output block under CMSR: each level present is drawn where the pixels' LR owners
    chose it, by the compiled kernel, which draws exactly those pixels (and the coarse
    pixels they sample) in place. Levels and boxes are found on the LR grid, so the
    bookkeeping costs a few passes over the block whatever the number of levels. Every output
    pixel belongs to exactly one level, so the levels fill `into` (a view of the canvas) whole."""
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
        r0, r1 = span(own_r, int(lr_rows[0]), int(lr_rows[-1]))
        c0, c1 = span(own_c, int(lr_cols[0]), int(lr_cols[-1]))
        if r0 >= r1 or c0 >= c1:  # LR pixels no output pixel centre falls in (an axis shrinks)
            continue
        grid = g.out_hw if level == full_level else level_grid(g.out_hw, scale, schedule.decode_scales[level])
        plans.append((chosen, (r0, r1), (c0, c1), grid))
    out = g.piece.new_zeros(1, 3, b - a, cb - ca) if into is None else into
    for chosen, (r0, r1), (c0, c1), grid in plans:
        # columns on the few LR rows first, then whole output rows copied: cheap at any scale
        mask = chosen.index_select(1, own_c[c0:c1]).index_select(0, own_r[r0:r1])
        box = (a + r0, a + r1), (ca + c0, ca + c1)
        draw = _draw_fused if g.fused else _draw_torch
        draw(model, g, grid, box, mask, out[:, :, r0:r1, c0:c1])
    return out


def _draw_fused(model: ImplicitSR, g: Geometry, grid: tuple[int, int], box: tuple[tuple[int, int], ...],
                mask: torch.Tensor, region: torch.Tensor) -> None:
    """Draw the masked pixels of an output box into `region` in place, from a grid_hw
    rendering (the output itself, or a coarse level sampled bilinearly)."""
    if grid == g.out_hw:
        render_region(model, g, grid, *box, mask=mask, into=region)
        return
    coarse_rows, coarse_cols, taps_r, taps_c = coarse_taps(g, grid, *box)
    hidden = model.capabilities.kernel_width
    needed = native.mark_taps(hidden, mask, taps_r, taps_c,
                              (coarse_rows[1] - coarse_rows[0], coarse_cols[1] - coarse_cols[0]))
    coarse = render_region(model, g, grid, coarse_rows, coarse_cols, mask=needed)
    native.blend(hidden, region, mask, coarse, taps_r, taps_c)


def _draw_torch(model: ImplicitSR, g: Geometry, grid: tuple[int, int], box: tuple[tuple[int, int], ...],
                mask: torch.Tensor, region: torch.Tensor) -> None:
    """`_draw_fused` through PyTorch: the full level decodes only the latents that own masked
    pixels; a coarse level decodes the coarse pixels the masked ones sample, then blends."""
    if grid == g.out_hw:
        render_region(model, g, grid, *box, mask=mask, into=region)
        return
    coarse_rows, coarse_cols, taps_r, taps_c = coarse_taps(g, grid, *box)
    needed = torch.zeros(coarse_rows[1] - coarse_rows[0], coarse_cols[1] - coarse_cols[0], dtype=torch.bool,
                         device=mask.device)
    ii, jj = torch.nonzero(mask, as_tuple=True)
    for tap_r in (taps_r.lo, taps_r.hi):
        for tap_c in (taps_c.lo, taps_c.hi):
            needed[tap_r[ii], tap_c[jj]] = True
    coarse = render_region(model, g, grid, coarse_rows, coarse_cols, mask=needed)
    region.copy_(torch.where(mask, bilinear_grid(coarse, taps_r, taps_c), region))
