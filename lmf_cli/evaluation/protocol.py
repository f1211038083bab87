"""The evaluation protocol of DESIGN.md §2: bicubic LR made in code, Y-PSNR / RGB-PSNR, SSIM.

`benchmark` protocol (Set5, Set14, B100, Urban100): PSNR on Y (BT.601, 16..235), shave =
scale. `div2k` protocol: RGB PSNR, shave = scale + 6. HR is cropped to a whole number of
LR pixels (a multiple of the scale for integer scales).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmf_cli.engine.cmsr import Schedule
from lmf_cli.engine.ensemble import self_ensemble
from lmf_cli.engine.tiling import upscale_tensor
from lmf_cli.errors import InputError, option_name
from lmf_cli.imaging.degradations import EvalDegradation
from lmf_cli.imaging.resample import bicubic_resize_float, make_pair
from lmf_cli.io.images import load_rgb
from lmf_cli.models.base import ImplicitSR
from lmf_cli.models.checkpoints import LoadedModel, save_weights
from lmf_cli.options import EngineOptions

Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0


def _mse(a: np.ndarray, b: np.ndarray, shave: int) -> float:
    if shave > 0:
        a, b = a[shave:-shave, shave:-shave], b[shave:-shave, shave:-shave]
    return float(np.mean((a - b) ** 2))


def to_y(img: np.ndarray) -> np.ndarray:
    """Y channel in 0..255 from RGB in [0, 1]."""
    return 16.0 + img.astype(np.float64) @ (Y_WEIGHTS * 255.0)


def psnr(sr: np.ndarray, hr: np.ndarray, shave: int, y_only: bool) -> float:
    """PSNR in dB of float images in [0, 1] (peak 255 on the Y or RGB scale)."""
    if y_only:
        mse = _mse(to_y(sr), to_y(hr), shave)
    else:
        mse = _mse(sr.astype(np.float64) * 255, hr.astype(np.float64) * 255, shave)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ssim_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """SSIM on Y (Gaussian window 11, sigma 1.5), as in the SR literature."""
    import cv2

    a, b = to_y(sr), to_y(hr)
    if shave > 0:
        a, b = a[shave:-shave, shave:-shave], b[shave:-shave, shave:-shave]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map[5:-5, 5:-5].mean())


UpscaleFn = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


@dataclass
class EvalResult:
    method: str
    scale: float
    psnr: float
    ssim: float
    images: int
    per_image: dict[str, float] = field(default_factory=dict)


def evaluate(methods: dict[str, UpscaleFn], images: list[Path], scales: list[float],
             protocol: str = "benchmark", with_ssim: bool = True,
             progress: Callable[[], None] | None = None,
             degradation: EvalDegradation | None = None) -> list[EvalResult]:
    """Average PSNR/SSIM of each method at each scale. A method maps (LR uint8, (H, W)) to
    a float [0, 1] image of that size.

    With a `degradation` (e.g. JPEG q75), every method gets the same degraded LR (seeded per
    image, so noise is the same for each method and each run) and is scored against the clean HR.
    """
    hrs = {p.stem: load_rgb(p) for p in images}
    results = []
    for scale in scales:
        shave = math.ceil(scale) + (6 if protocol == "div2k" else 0)
        pairs = {name: make_pair(hr, scale) for name, hr in hrs.items()}
        if degradation is not None:
            pairs = {name: (hr, degradation(lr, seed=zlib.crc32(name.encode()))) for name, (hr, lr) in pairs.items()}
        for method, fn in methods.items():
            per_psnr, per_ssim = {}, []
            for name, (hr, lr) in pairs.items():
                hr_f = hr.astype(np.float32) / 255
                sr = fn(lr, hr.shape[:2])
                per_psnr[name] = psnr(sr, hr_f, shave, y_only=protocol != "div2k")
                if with_ssim:
                    per_ssim.append(ssim_y(sr, hr_f, shave))
                if progress:
                    progress()
            results.append(EvalResult(method, scale, float(np.mean(list(per_psnr.values()))),
                                      float(np.mean(per_ssim)) if per_ssim else float("nan"),
                                      len(per_psnr), per_psnr))
    return results


def bicubic_method(lr: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    return bicubic_resize_float(lr.astype(np.float32) / 255, size_hw)


def model_method(model: ImplicitSR, device: str = "cpu", schedule: Schedule | None = None,
                 ensemble: bool = False) -> UpscaleFn:
    """An evaluation method that renders with an implicit model (float output, unquantised),
    optionally with a CMSR schedule, or as the geometric self-ensemble of 8 passes."""

    def run(lr: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
        inp = torch.from_numpy(np.array(lr)).to(device).permute(2, 0, 1)[None].float().div(127.5).sub(1)

        def one(image: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
            return upscale_tensor(model, image, hw, EngineOptions(tile=max(image.shape[-2:])), schedule)

        out = self_ensemble(one, inp, size_hw) if ensemble else one(inp, size_hw)
        return out[0].permute(1, 2, 0).clamp(0, 1).numpy()

    return run


def record_results(loaded: LoadedModel, model: ImplicitSR, method: str, rows: list[dict], protocol: str,
                   degradation: str | None = None) -> Path:
    """Merge PSNRs into the weights' card: {"eval": {set: {scale: psnr}}} and the bicubic row
    beside it; degraded inputs go under {"eval_degraded": {"jpeg:75": {...}}}."""
    source = Path(loaded.source)
    if source.suffix != ".safetensors":
        raise InputError(f"{source}: {option_name('record')} needs .safetensors weights")
    info = dict(loaded.info)
    for key, name in (("eval", method), ("eval_bicubic", "bicubic")):
        measured = [r for r in rows if r["method"] == name]
        if not measured:  # a method not run (--no-bicubic) leaves its table as it was, not empty
            continue
        if degradation is None:
            table = info.setdefault(key, {})
        else:
            table = info.setdefault(f"{key}_degraded", {}).setdefault(degradation, {})
        for r in measured:
            table.setdefault(r["set"], {})[f"{r['scale']:g}"] = r["psnr"]
    info["eval_protocol"] = protocol
    save_weights(source, model.cpu(), loaded.spec, info, loaded.cmsr_tables, loaded.storage)
    return source
