"""The Python API: `Upscaler.load(...)` then `up.upscale(image, scale=... | size=...)`.

Arrays in, arrays out, same dtype: uint8 and uint16 are scaled to [0, 1] and rounded back;
float32 stays float32, clamped to [0, 1]. Grayscale (H x W or H x W x 1) comes back
grayscale; a 4th (alpha) channel is upscaled by the model too, or bicubic on request.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmf_cli.engine.cmsr import resolve_threshold, schedule_for, supports_cmsr
from lmf_cli.engine.sizes import Plan, Scale, plan_size
from lmf_cli.engine.tiling import upscale_tensor
from lmf_cli.errors import InputError
from lmf_cli.hardware import fast_bf16
from lmf_cli.imaging.resample import bicubic_resize_float
from lmf_cli.models.checkpoints import LoadedModel, load_weights
from lmf_cli.models.zoo import DEFAULT_MODEL, resolve


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' prefers CUDA, then Apple MPS, then the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def encoder_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The encoder's compute dtype (None = float32). The MLPs always run in float32: their
    inputs are sub-pixel coordinates, which half precision would round away.
    auto: fp16 on CUDA; bf16 on CPUs with native bf16 (AMX, AVX-512 BF16), where it costs
    lmf-edsr 0.001 dB and lmf-lite 0.003 dB on Set5 x2..x4; float32 elsewhere (emulated bf16
    is several times slower)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "bf16" if fast_bf16(device) else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise InputError("fp16 is for GPUs; on a CPU use bf16 (fast where the CPU has AMX/AVX-512 BF16) or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Upscaler:
    """A loaded model on a device, ready to upscale numpy images."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "auto", precision: str = "auto") -> None:
        self.loaded = loaded
        self.device = pick_device(device)
        self.model = loaded.model.to(self.device).eval()
        self.model.encoder_dtype = encoder_dtype(precision, self.device)
        self.model.use_channels_last()
        self.last_stats: dict[str, int] = {}

    @classmethod
    def load(cls, name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "auto",
             precision: str = "auto") -> Upscaler:
        """A shipped model name (`lmf-edsr`, `lmf-lite`), our `.safetensors`, or an official `.pth`.

        precision: auto (fp16 encoder on CUDA, bf16 on CPUs with native bf16, else fp32), fp32, bf16 or fp16.
        """
        return cls(load_weights(resolve(name_or_path)), device, precision)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.model.encoder_dtype]

    @property
    def name(self) -> str:
        return Path(self.loaded.source).stem

    def upscale(self, image: np.ndarray, scale: Scale | None = None, size: tuple[int, int] | None = None,
                *, tile: int | None = None, cmsr: bool | str | float = False, max_memory: int | None = None,
                alpha: Literal["model", "bicubic"] = "model",
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Upscale an H x W (x C) array to `size` (height, width) or by `scale`.

        tile: tile side in input pixels (None: from `max_memory`, default a share of free
        memory). cmsr: False, True (the default table), a level ("fast", "balanced", "fine",
        "exact") or an MSE threshold the model was calibrated for. `last_stats` then holds how
        many pixels the render MLP drew.
        """
        image = np.asarray(image)
        return self.upscale_batch(image[None], scale, size, tile=tile, cmsr=cmsr, max_memory=max_memory,
                                  alpha=alpha, progress=progress)[0]

    def upscale_batch(self, images: np.ndarray | Sequence[np.ndarray], scale: Scale | None = None,
                      size: tuple[int, int] | None = None, *, tile: int | None = None,
                      cmsr: bool | str | float = False, max_memory: int | None = None,
                      alpha: Literal["model", "bicubic"] = "model",
                      progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Upscale same-size images (an N x H x W (x C) array or a list) as one batch.

        One encoder call per tile covers the whole batch (what a GPU wants); each output equals
        `upscale` of that image alone, to float rounding. Returns N x H' x W' (x C), the dtype
        of the input. Options as `upscale`.
        """
        batch = [np.asarray(image) for image in images]
        if not batch:
            raise InputError("no images to upscale")
        first = batch[0]
        for image in batch:
            _check_image(image)
            if image.shape != first.shape or image.dtype != first.dtype:
                raise InputError(f"a batch needs images of one shape and dtype: {first.shape} {first.dtype} "
                                 f"and {image.shape} {image.dtype}")
        _check_options(tile, max_memory, alpha)
        stack = np.stack(batch)
        dtype = stack.dtype
        plan = plan_size(first.shape[:2], *_plain_sizes(scale, size))
        peak = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(dtype, 1.0)
        data = stack.astype(np.float32) / peak if peak != 1.0 else np.clip(stack, 0, 1)
        gray = data.ndim == 3 or data.shape[3] == 1
        if gray:
            data = data.reshape(*data.shape[:3], 1)
        colour, extra = (data[..., :3], data[..., 3:]) if data.shape[3] == 4 else (data, None)
        schedule = None
        if cmsr is not False and cmsr is not None:
            if not supports_cmsr(self.model):
                raise InputError(f"{self.name}: CMSR needs an LMF model (LM-LIIF or LM-LTE)")
            key = resolve_threshold(self.loaded.cmsr_tables, cmsr)
            schedule = schedule_for(self.loaded.cmsr_tables, key, max(plan.scale)) if key else None
        self.last_stats: dict[str, int] = {}
        run = dict(tile=tile, schedule=schedule, max_memory=max_memory, progress=progress, stats=self.last_stats)
        try:
            out = self._run(np.repeat(colour, 3, axis=3) if gray else colour, plan, **run)
            if gray:
                out = out.mean(axis=3, keepdims=True)
            if extra is not None:
                if alpha == "bicubic":
                    a = np.stack([bicubic_resize_float(e, plan.out_hw) for e in extra])
                else:
                    a = self._run(np.repeat(extra, 3, axis=3), plan, **run).mean(axis=3, keepdims=True)
                out = np.concatenate([out, a], axis=3)
        except RuntimeError as exc:  # the CPU allocator's "can't allocate memory" (CUDA's goes to the caller)
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "allocate" not in str(exc):
                raise
            h, w = plan.out_hw
            raise InputError(f"out of memory for a {w} x {h} output ({len(batch) * h * w * 12 / 2**30:.3g} GiB "
                             "as float32); ask for a smaller size") from exc
        if first.ndim == 2:
            out = out[..., 0]
        if peak == 1.0:
            return np.ascontiguousarray(out, dtype=np.float32)
        return np.round(out * peak).astype(dtype)

    def _run(self, rgb: np.ndarray, plan: Plan, **engine) -> np.ndarray:
        """N x H x W x 3 in [0, 1] -> N x H' x W' x 3."""
        inp = torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))).to(self.device)
        inp = inp.mul(2).sub(1)
        out = upscale_tensor(self.model, inp, plan.out_hw, **engine)
        return out.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _check_image(image: np.ndarray) -> None:
    """Refuse what the model cannot take, with the reason."""
    if image.dtype not in (np.uint8, np.uint16, np.float32):
        raise InputError(f"unsupported dtype {image.dtype}; use uint8, uint16 or float32 in [0, 1]")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise InputError(f"expected an H x W, H x W x 1, x 3 or x 4 array, got shape {image.shape}")
    if min(image.shape[:2]) == 0:
        raise InputError("the image has no pixels")
    if image.dtype == np.float32 and not np.isfinite(image).all():
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        raise InputError(f"{bad} value{'s are' if bad != 1 else ' is'} not finite (NaN or inf); "
                         "every value of a float32 image must lie in [0, 1] (replace them, e.g. with "
                         "np.nan_to_num, before upscaling)")


def _check_options(tile: int | None, max_memory: int | None, alpha: str) -> None:
    if tile is not None and (not isinstance(tile, numbers.Integral) or tile < 1):
        raise InputError(f"tile {tile!r} must be a whole number of input pixels, at least 1 (None: from memory)")
    if max_memory is not None and (not isinstance(max_memory, numbers.Real) or not max_memory >= 1):
        raise InputError(f"max_memory {max_memory!r} must be a positive number of bytes")
    if alpha not in ("model", "bicubic"):
        raise InputError(f"alpha {alpha!r}: use 'model' or 'bicubic'")


def _plain_sizes(scale: Scale | None, size: tuple[int, int] | None) -> tuple[Scale | None, tuple[int, int] | None]:
    """numpy scalars and arrays as plain numbers; what is not a number is refused, as is a fractional size."""
    def numbers_of(value, message: str) -> list:
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, numbers.Real):
            return [value]
        if not isinstance(value, (tuple, list, np.ndarray)) or not all(isinstance(v, numbers.Real) for v in value):
            raise InputError(message)
        return list(value)

    if scale is not None:
        factors = numbers_of(scale, f"scale {scale!r} must be a positive number or a (y, x) pair")
        scale = float(factors[0]) if np.ndim(scale) == 0 else tuple(float(f) for f in factors)
    if size is not None:
        message = f"size {size!r} must be (height, width) in whole pixels"
        values = numbers_of(size, message)
        if isinstance(size, numbers.Real) or len(values) != 2 or not all(
                math.isfinite(v) and float(v) == int(v) for v in values):
            raise InputError(message)
        size = (int(values[0]), int(values[1]))
    return scale, size
