"""CMSR calibration: Scale2Mod tables (target scale -> decode scale -> intensity threshold).

It renders training images at every decode scale and keeps, bin by bin, the intensities
whose coarse rendering stays within the MSE threshold of the full one. It trains tables,
so it lives with training; inference reads them in `lmf_cli.engine.cmsr`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lmf_cli.engine.cmsr import DECODE_SCALES, DEFAULT_THRESHOLD, TARGET_SCALES, level_grid
from lmf_cli.engine.render import encode_image, owners, render_coarse, render_region
from lmf_cli.errors import InputError
from lmf_cli.imaging.resample import make_pair
from lmf_cli.models.base import ImplicitSR

BIN_STEP, BIN_HALF_WIDTH = 0.01, 0.001


def calibrate_image(render_full, render_grid, strength_of_output: torch.Tensor,
                    scale: float, decode_scales: tuple[float, ...], threshold: float) -> dict[float, float]:
    """Thresholds from one image, following the official sweep: bins of intensity 0..1 (step
    0.01, pixels within +-0.001), accepted at a decode scale while their MSE against the
    full rendering stays <= threshold, starting where the previous decode scale stopped."""
    reference = render_full()
    bins = list(np.round(np.arange(0, 1 + BIN_STEP / 2, BIN_STEP), 4))
    found: dict[float, float] = {}
    last = 0.0
    for d in decode_scales:
        if d >= scale:
            break
        err = (render_grid(d) - reference).pow(2).mean(1).flatten()
        for mid in list(bins):
            mask = (strength_of_output - mid).abs().flatten() <= BIN_HALF_WIDTH
            if not bool(mask.any()):
                continue
            if float(err[mask].mean()) <= threshold:
                bins.remove(mid)
                last = max(last, float(mid))
            else:
                break
        found[d] = last
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
                strength = model.modulation_intensity(g.latents)[0][own_r][:, own_c]
                whole = (0, out_hw[0]), (0, out_hw[1])

                def full(g=g, out_hw=out_hw, whole=whole):
                    return render_region(model, g, out_hw, *whole)

                def coarse(d, g=g, out_hw=out_hw, whole=whole, scale=scale):
                    return render_coarse(model, g, level_grid(out_hw, scale, d), *whole)

                per_image.append(calibrate_image(full, coarse, strength, scale, DECODE_SCALES, threshold))
                if progress:
                    progress()
            if per_image:
                tables[f"{scale:g}"] = merge_tables(per_image)
    return tables
