"""Controllable Multi-Scale Rendering (CMSR): render calm regions at a coarser scale.

Each LR pixel's modulation intensity (mean |shift| over the render layers) says how much
detail it carries. A Scale2Mod table per target scale maps decode scales to intensity
thresholds: an LR pixel is rendered at the smallest decode scale whose threshold covers its
intensity, and its output pixels are bilinearly upsampled from that coarser rendering.
Tables are calibrated on training images (`calibrate`) against an MSE threshold, the
quality/speed knob; they live in the model's weights file, keyed by that threshold.

Two deliberate differences from the official code: coarse levels are upsampled straight to
the target grid (not chained level to level), for accuracy at equal cost; and the compiled
render kernel draws exactly the output pixels of the full level and the coarse pixels the
other levels sample, on the global grid, so CMSR keeps exact tiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmf_cli.errors import InputError
from lmf_cli.models.base import ImplicitSR, Latents

DECODE_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
TARGET_SCALES = (6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
DEFAULT_THRESHOLD = 2e-5
QUALITY_LEVELS = {"fast": 1e-4, "balanced": 2e-5, "fine": 5e-6}
BIN_STEP, BIN_HALF_WIDTH = 0.01, 0.001
MIN_SCALE = 4.0  # as the official code: CMSR only above the training range

Tables = dict[str, dict[str, dict[str, float]]]  # threshold -> target scale -> decode scale -> intensity


def supports_cmsr(model: ImplicitSR) -> bool:
    return hasattr(model, "imnet") and hasattr(model.imnet, "mod_dim")


def intensity(model: ImplicitSR, latents: Latents) -> torch.Tensor:
    """Mean |shift modulation| of every latent, (B, h, w)."""
    n, d = model.imnet.hidden_depth, model.imnet.hidden_dim
    return latents["mod"][..., n * d:2 * n * d].abs().mean(-1)


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


def resolve_threshold(tables: Tables | None, cmsr: bool | str | float) -> str | None:
    """Map the user's cmsr= to a table key; False -> None. Raises if the model has no table."""
    if cmsr is False or cmsr is None:
        return None
    if not tables:
        raise InputError("this model has no CMSR tables; run `lmf calibrate` on it first")
    if cmsr is True:
        wanted = DEFAULT_THRESHOLD
    elif isinstance(cmsr, str) and cmsr in QUALITY_LEVELS:
        wanted = QUALITY_LEVELS[cmsr]
    elif isinstance(cmsr, str) and cmsr == "exact":
        return None
    else:
        try:
            wanted = float(cmsr)
        except (TypeError, ValueError):
            raise InputError(f"cmsr={cmsr!r}: use True, False, a level ({', '.join(QUALITY_LEVELS)}, exact) "
                             "or an MSE threshold") from None
    key = min(tables, key=lambda k: abs(np.log(float(k)) - np.log(wanted)))
    if not np.isclose(float(key), wanted, rtol=0.01):
        raise InputError(f"no CMSR table for MSE threshold {wanted:g} (calibrated: {', '.join(sorted(tables))})")
    return key


def level_grid(out_hw: tuple[int, int], scale: float, decode_scale: float) -> tuple[int, int]:
    """Size of the coarse grid rendered at decode_scale for a target at `scale`."""
    return tuple(max(1, round(n * decode_scale / scale)) for n in out_hw)


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
              progress=None) -> dict[str, dict[str, float]]:
    """Scale2Mod tables (target -> decode scale -> intensity) from HR training images.

    For each target scale, every image is downscaled (bicubic) by it, encoded once, rendered
    in full at the target and at each smaller decode scale, and swept bin by bin.
    """
    from lmf_cli.engine import encode_image, owners, render_coarse, render_region
    from lmf_cli.evaluation import make_pair

    if not supports_cmsr(model):
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
                strength = intensity(model, g.latents)[0][own_r][:, own_c]
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
