"""CMSR calibration: Scale2Mod tables (target scale -> decode scale -> intensity threshold).

It renders training images at every decode scale and keeps, bin by bin, the intensities
whose coarse rendering stays within the MSE threshold of the full one. An output pixel's
intensity is its LR owner's block intensity, as the engine chooses levels (`cmsr.BLOCK`). It trains tables,
so it lives with training; inference reads them in `lmf_cli.engine.cmsr`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lmf_cli.engine.cmsr import DECODE_SCALES, DEFAULT_THRESHOLD, TARGET_SCALES, block_strength, level_grid
from lmf_cli.engine.render import Geometry, encode_image, owners, render_coarse, render_region
from lmf_cli.errors import InputError
from lmf_cli.imaging.resample import make_pair
from lmf_cli.models.base import ImplicitSR

BIN_STEP = 0.01


def calibrate_image(render_full: Callable[[], torch.Tensor], render_grid: Callable[[float], torch.Tensor],
                    strength_of_output: torch.Tensor,
                    scale: float, decode_scales: tuple[float, ...], threshold: float) -> dict[float, float]:
    """Thresholds from one image, after the official sweep: pixels binned by intensity (steps
    of 0.01), bins accepted at a decode scale in increasing order while their MSE against the
    full rendering stays <= threshold, starting where the previous decode scale stopped; the
    threshold is the lower edge of the first bin that fails.

    Two departures, because block intensities (the largest of 64 LR pixels) take a few dozen
    values per image: bins are whole steps (the official +-0.001 around each step leaves most
    blocks out), and intensities an image has no block at do not limit its threshold (an image
    that fails nowhere gives 1), so that, merged by the minimum, the images with evidence decide.
    """
    reference = render_full()
    index = torch.round(strength_of_output.flatten() / BIN_STEP).long().clamp_(min=0)
    count = torch.bincount(index).double()
    present = torch.nonzero(count).flatten()
    found: dict[float, float] = {}
    accepted = 0  # bins of `present` accepted so far, at this decode scale or a smaller one
    for d in decode_scales:
        if d >= scale:
            break
        err = (render_grid(d) - reference).pow(2).mean(1).flatten().double()
        mse = (torch.bincount(index, err, minlength=count.numel()) / count.clamp(min=1))[present]
        while accepted < present.numel() and float(mse[accepted]) <= threshold:
            accepted += 1
        found[d] = 1.0 if accepted == present.numel() else round((float(present[accepted]) - 0.5) * BIN_STEP, 4)
    return found


def merge_tables(per_image: list[dict[float, float]]) -> dict[str, float]:
    """Most cautious threshold over images, made non-decreasing in decode scale."""
    scales = sorted({d for table in per_image for d in table})
    merged = {d: min(t[d] for t in per_image if d in t) for d in scales}
    for i in range(len(scales) - 2, -1, -1):
        merged[scales[i]] = min(merged[scales[i]], merged[scales[i + 1]])
    return {f"{d:g}": round(v, 4) for d, v in merged.items()}


def calibrate(model: ImplicitSR, images: list[np.ndarray], threshold: float = DEFAULT_THRESHOLD,
              targets: tuple[float, ...] = TARGET_SCALES, device: str | torch.device = "cpu",
              progress: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    """Scale2Mod tables (target -> decode scale -> intensity) from HR training images.

    For each target scale, every image is downscaled (bicubic) by it, encoded once, rendered
    in full at the target and at each smaller decode scale, and swept bin by bin.
    """
    if not model.capabilities.cmsr:
        raise InputError("CMSR needs an LMF model (LM-LIIF or LM-LTE)")
    tables: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for scale in targets:
            per_image = []
            for hr in images:
                hr_crop, lr = make_pair(hr, scale)
                if min(lr.shape[:2]) < 4:
                    continue
                inp = torch.from_numpy(np.array(lr)).to(device).permute(2, 0, 1)[None].float() / 127.5 - 1
                out_hw = hr_crop.shape[:2]
                g = encode_image(model, inp, out_hw)
                own_r = owners(0, out_hw[0], out_hw[0], lr.shape[0], 0, inp.device)
                own_c = owners(0, out_hw[1], out_hw[1], lr.shape[1], 0, inp.device)
                strength = block_strength(model.modulation_intensity(g.latents)[0])[own_r][:, own_c]
                whole = (0, out_hw[0]), (0, out_hw[1])

                def full(g: Geometry = g, out_hw: tuple[int, int] = out_hw,
                         whole: tuple[tuple[int, int], tuple[int, int]] = whole) -> torch.Tensor:
                    return render_region(model, g, out_hw, *whole)

                def coarse(d: float, g: Geometry = g, out_hw: tuple[int, int] = out_hw,
                           whole: tuple[tuple[int, int], tuple[int, int]] = whole,
                           scale: float = scale) -> torch.Tensor:
                    return render_coarse(model, g, level_grid(out_hw, scale, d), *whole)

                per_image.append(calibrate_image(full, coarse, strength, scale, DECODE_SCALES, threshold))
                if progress:
                    progress()
            if per_image:
                tables[f"{scale:g}"] = merge_tables(per_image)
    return tables
