"""The Python API: `Upscaler.load(name, EngineOptions(...))` then `up.upscale(image, scale=... | size=...)`.

Arrays in, arrays out, same dtype: uint8 and uint16 are scaled to [0, 1] and rounded back;
float32 stays float32, clamped to [0, 1]. Grayscale (H x W or H x W x 1) comes back
grayscale; a 4th (alpha) channel is upscaled by the model too, or bicubic on request.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lmf_cli.engine.budget import frames_fitting, frames_per_call
from lmf_cli.engine.cmsr import Schedule, reach, resolve_threshold, schedule_for
from lmf_cli.engine.render import SAMPLE_PEAKS
from lmf_cli.engine.reuse import Previous, frames_to_render, output_boxes
from lmf_cli.engine.tiling import upscale_tensor
from lmf_cli.errors import InputError, OptionError, option_name
from lmf_cli.hardware import fast_bf16
from lmf_cli.imaging.resample import bicubic_resize_float
from lmf_cli.models.base import Capabilities
from lmf_cli.models.checkpoints import LoadedModel, load_weights
from lmf_cli.models.zoo import DEFAULT_MODEL, resolve
from lmf_cli.options import EngineOptions
from lmf_cli.sizes import Plan, Scale, plan_size


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' prefers CUDA, then Apple MPS, then the CPU; a device this machine lacks is an OptionError."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)  # absent from some builds of torch
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    chosen = torch.device(device)
    try:
        torch.empty(0, device=chosen)
    except (RuntimeError, AssertionError) as exc:  # torch: a device this build or machine lacks
        raise OptionError("device", str(device), str(exc).splitlines()[0] if str(exc) else type(exc).__name__) \
            from exc
    return chosen


def encoder_dtype(precision: str, device: torch.device, capabilities: Capabilities | None = None) -> torch.dtype | None:
    """The encoder's compute dtype (None = float32); with bf16 the latent MLP, which reads the
    encoder's features, runs in it too. The render MLP always runs in float32: its inputs are
    sub-pixel coordinates, which half precision would round away.
    auto: fp16 on CUDA; bf16 on CPUs with native bf16 (AMX, AVX-512 BF16), where the encoder and
    the latent MLP together cost the shipped models at most 0.005 dB on Set5 and B100 (x2..x4);
    float32 elsewhere (emulated bf16 is several times slower). A precision the model does not
    declare falls back to fp32 on auto."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "bf16" if fast_bf16(device) else "fp32"
        if capabilities is not None and precision not in capabilities.precisions:
            precision = "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise OptionError("precision", "fp16", "fp16 is for GPUs; on a CPU use bf16 (fast where the CPU has "
                                               "AMX/AVX-512 BF16) or fp32")
    if capabilities is not None and precision not in capabilities.precisions:
        raise OptionError("precision", precision, f"this model runs in {', '.join(capabilities.precisions)}")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Upscaler:
    """A loaded model on a device with its EngineOptions, ready to upscale numpy images.

    Device and precision are fixed when the model is loaded; the other options (tile, memory
    budget, CMSR level, alpha, pixel limit) may be given again per call.
    """

    def __init__(self, loaded: LoadedModel, options: EngineOptions | None = None) -> None:
        self.loaded = loaded
        self.options = options or EngineOptions()
        self.capabilities = loaded.capabilities
        self.device = pick_device(self.options.device)
        self.model = loaded.model.to(self.device).eval()
        self.model.encoder_dtype = encoder_dtype(self.options.precision, self.device, self.capabilities)
        self.model.use_channels_last()
        self._schedule_key(self.options)  # a CMSR level the model cannot do is refused now, not per image
        self.last_stats: dict[str, int] = {}

    @classmethod
    def load(cls, name_or_path: str | Path = DEFAULT_MODEL, options: EngineOptions | None = None) -> Upscaler:
        """A shipped model name (`lmf-edsr`, `lmf-lite`), our `.safetensors`, or an official `.pth`."""
        return cls(load_weights(resolve(name_or_path)), options)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.model.encoder_dtype]

    @property
    def name(self) -> str:
        return Path(self.loaded.source).stem

    def frames_per_call(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
        """Same-size images (video frames, still files) to give `upscale_batch` at once: 1 on a CPU,
        where the cores are busy with one image, else as many as half the free device memory holds."""
        return frames_per_call(self.capabilities, self.device, in_hw, out_hw, self.options.max_memory)

    def frames_fitting(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
        """The most same-size images one `upscale_batch` call may take within the memory budget."""
        return frames_fitting(self.capabilities, self.device, in_hw, out_hw, self.options.max_memory)

    def upscale(self, image: np.ndarray, scale: Scale | None = None, size: tuple[int, int] | None = None,
                *, options: EngineOptions | None = None,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Upscale an H x W (x C) array to `size` (height, width) or by `scale`.

        options: this call's EngineOptions (default: the Upscaler's), same device and precision.
        progress(done, total) is called after each tile. `last_stats` then holds how many pixels
        the render MLP drew (fewer than the output's with CMSR).
        """
        image = np.asarray(image)
        return self.upscale_batch(image[None], scale, size, options=options, progress=progress)[0]

    def upscale_batch(self, images: np.ndarray | Sequence[np.ndarray], scale: Scale | None = None,
                      size: tuple[int, int] | None = None, *, options: EngineOptions | None = None,
                      progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Upscale same-size images (an N x H x W (x C) array or a list) as one batch.

        One encoder call per tile covers the whole batch (what a GPU wants); each output equals
        `upscale` of that image alone, to float rounding. Returns N x H' x W' (x C), the dtype
        of the input. Options as `upscale`.
        """
        options = self._call_options(options)
        batch = [np.asarray(image) for image in images]
        if not batch:
            raise InputError("no images to upscale")
        first = batch[0]
        for image in batch:
            _check_image(image)
            if image.shape != first.shape or image.dtype != first.dtype:
                raise InputError(f"a batch needs images of one shape and dtype: {first.shape} {first.dtype} "
                                 f"and {image.shape} {image.dtype}")
        plan = self._plan(first.shape[:2], scale, size, options)
        h, w = plan.out_hw
        stack = np.stack(batch)
        dtype = stack.dtype
        data, peak = _unit_range(stack)
        gray = data.ndim == 3 or data.shape[3] == 1
        if gray:
            data = data.reshape(*data.shape[:3], 1)
        colour, extra = (data[..., :3], data[..., 3:]) if data.shape[3] == 4 else (data, None)
        schedule = self._schedule(options, plan)
        self.last_stats: dict[str, int] = {}

        # 8- and 16-bit colour comes back as the canvas's own samples (rounded as they are rendered);
        # grey and alpha are averaged over channels first, so they are rounded after
        samples = SAMPLE_DTYPES.get(dtype) if not gray else None

        def run(rgb: np.ndarray, canvas: torch.dtype) -> np.ndarray:
            """N x H x W x 3 in [0, 1] -> N x H' x W' x 3, as [0, 1] floats or `canvas` samples."""
            inp = torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))).to(self.device)
            out = upscale_tensor(self.model, inp.mul(2).sub(1), plan.out_hw, options, schedule, progress,
                                 self.last_stats, dtype=canvas)
            return (out if canvas != torch.float32 else out.clamp(0, 1)).permute(0, 2, 3, 1).numpy()

        try:
            out = run(np.repeat(colour, 3, axis=3) if gray else colour, samples or torch.float32)
            if gray:
                out = out.mean(axis=3, keepdims=True)
            if extra is not None:
                if options.alpha == "bicubic":
                    a = np.stack([bicubic_resize_float(e, plan.out_hw) for e in extra])
                else:
                    a = run(np.repeat(extra, 3, axis=3), torch.float32).mean(axis=3, keepdims=True)
                out = np.concatenate([_rounded(out, peak, dtype), _rounded(a, peak, dtype)], axis=3)
        except RuntimeError as exc:  # the CPU allocator's "can't allocate memory" (CUDA's goes to the caller)
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "allocate" not in str(exc):
                raise
            sample_bytes = 3 * (np.dtype(dtype).itemsize if samples else 4)
            raise InputError(f"out of memory for a {w} x {h} output "
                             f"({len(batch) * h * w * sample_bytes / 2**30:.3g} GiB); ask for a smaller size") from exc
        if first.ndim == 2:
            out = out[..., 0]
        return _rounded(out, peak, dtype)

    def upscale_sequence(self, frames: np.ndarray | Sequence[np.ndarray], scale: Scale | None = None,
                         size: tuple[int, int] | None = None, *, previous: Previous | None = None,
                         options: EngineOptions | None = None,
                         progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, int]:
        """Upscale consecutive frames of one video (N x H x W x 3) without computing again what
        cannot have changed: a frame equal to the one before reuses its output whole; elsewhere an
        output region whose input pixels, the model's tile margin included, are those of the frame
        before is copied from its output. `previous`: the frame before the first and its output
        (None at the start of a video or segment). Returns the outputs, the bytes `upscale_batch`
        gives, and how many output pixels were copied.

        The frames that changed are rendered in one call, only inside the boxes where any of them
        changed (a GPU keeps its batch); the copies run frame by frame after it. Without `previous`,
        the first frame is rendered whole on its own first.
        """
        options = self._call_options(options)
        stack = np.stack([np.asarray(frame) for frame in frames]) if len(frames) else np.empty(0)
        if stack.ndim != 4 or stack.shape[3] != 3 or not len(stack):
            raise InputError(f"consecutive frames must be N x H x W x 3, got shape {stack.shape}")
        for frame in stack:
            _check_image(frame)
        plan = self._plan(stack.shape[1:3], scale, size, options)
        h, w = plan.out_hw
        if previous is not None and (previous.frame.shape != stack.shape[1:] or previous.output.shape != (h, w, 3)
                                     or not previous.frame.dtype == previous.output.dtype == stack.dtype):
            raise InputError(f"the previous frame {previous.frame.shape} {previous.frame.dtype} and output "
                             f"{previous.output.shape} {previous.output.dtype} do not match frames "
                             f"{stack.shape[1:]} {stack.dtype} upscaled to {(h, w, 3)}")
        if previous is None and len(stack) > 1:  # the first frame whole, then the others may copy from it
            head, _ = self.upscale_sequence(stack[:1], scale, size, options=options, progress=progress)
            tail, copied = self.upscale_sequence(stack[1:], scale, size, previous=Previous(stack[0], head[0]),
                                                 options=options, progress=progress)
            return np.concatenate([head, tail]), copied
        schedule = self._schedule(options, plan)
        fresh, boxes = frames_to_render(stack, previous.frame if previous is not None else None,
                                        reach(self.capabilities, schedule, stack.shape[1:3]))
        spans = output_boxes(boxes, stack.shape[1:3], plan.out_hw)
        peak = PEAKS.get(stack.dtype, 1.0)
        samples = SAMPLE_DTYPES.get(stack.dtype, torch.float32)
        self.last_stats = {}
        canvas = None
        if fresh:  # as upscale_batch: the same conversions, so the same bytes
            data, _ = _unit_range(stack[fresh])
            inp = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2))).to(self.device)
            canvas = upscale_tensor(self.model, inp.mul(2).sub(1), plan.out_hw, options, schedule, progress,
                                    self.last_stats, boxes, samples)
        last = previous.output if previous is not None else None
        computed = np.zeros((h, w), dtype=bool)
        for i0, i1, j0, j1 in spans:
            computed[i0:i1, j0:j1] = True
        slot, whole = {k: n for n, k in enumerate(fresh)}, bool(computed.all())
        if whole and len(fresh) == len(stack) and samples != torch.float32:  # the canvas is the frames
            return canvas.permute(0, 2, 3, 1).numpy(), 0
        out = np.empty((len(stack), h, w, 3), dtype=stack.dtype)
        for k in range(len(stack)):
            if k not in slot:
                out[k] = last
            else:
                if not whole:
                    out[k] = last
                for i0, i1, j0, j1 in spans:
                    region = canvas[slot[k], :, i0:i1, j0:j1]
                    region = region if samples != torch.float32 else region.clamp(0, 1)
                    out[k, i0:i1, j0:j1] = _rounded(region.permute(1, 2, 0).numpy(), peak, stack.dtype)
            last = out[k]
        copied = len(stack) * h * w - len(fresh) * int(computed.sum())
        return out, copied

    def _plan(self, in_hw: tuple[int, int], scale: Scale | None, size: tuple[int, int] | None,
              options: EngineOptions) -> Plan:
        """The output size, refused over the pixel limit before any work."""
        plan = plan_size(in_hw, *_plain_sizes(scale, size))
        h, w = plan.out_hw
        if h * w > options.max_pixels:
            raise InputError(f"the output {w} x {h} is {h * w:,} pixels, over the limit of {options.max_pixels:,} "
                             f"({option_name('max_pixels')})")
        return plan

    def _schedule(self, options: EngineOptions, plan: Plan) -> Schedule | None:
        """The CMSR schedule for this output scale (None: exact)."""
        key = self._schedule_key(options)
        return schedule_for(self.loaded.cmsr_tables, key, max(plan.scale)) if key else None

    def _call_options(self, options: EngineOptions | None) -> EngineOptions:
        """This call's options: the Upscaler's, or `options` where its device and precision match the
        loaded ones. 'auto' means the loaded ones here, so EngineOptions(tile=256) works with any
        Upscaler, also one loaded on the CPU of a machine that has a GPU."""
        if options is None:
            return self.options
        if not isinstance(options, EngineOptions):
            raise InputError(f"options must be an EngineOptions, not {type(options).__name__}")
        if options.device == "auto":
            options = replace(options, device=self.options.device)
        if options.precision == "auto":
            options = replace(options, precision=self.options.precision)
        if options.device != self.options.device and pick_device(options.device) != self.device:
            raise OptionError("device", options.device, f"the model is loaded on {self.device}; load it again "
                                                        "for another device")
        if options.precision != self.options.precision and \
                encoder_dtype(options.precision, self.device, self.capabilities) != self.model.encoder_dtype:
            raise OptionError("precision", options.precision, f"the model is loaded in {self.precision}; load it "
                                                              "again for another precision")
        return options

    def _schedule_key(self, options: EngineOptions) -> str | None:
        """The CMSR table for options.cmsr (None: exact), or an OptionError saying why there is none."""
        if not options.uses_cmsr:
            return None
        if not self.capabilities.cmsr:
            raise OptionError("cmsr", options.cmsr, f"{self.name} has no CMSR levels (they need a modulated render "
                                                    "MLP: LM-LIIF, LM-LTE or LM-CiaoSR)")
        try:
            return resolve_threshold(self.loaded.cmsr_tables, options.cmsr)
        except InputError as exc:
            raise OptionError("cmsr", options.cmsr, str(exc)) from exc


SAMPLE_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16}
PEAKS = {kind: SAMPLE_PEAKS[samples] for kind, samples in SAMPLE_DTYPES.items()}  # float32 images have none: 1.0


def _rounded(out: np.ndarray, peak: float, dtype: np.dtype) -> np.ndarray:
    """[0, 1] floats as samples of `dtype` (rounded half to even, in float32: render.to_samples's
    operations); samples already of `dtype` and float images pass as they are."""
    if out.dtype == dtype or peak == 1.0:
        return np.ascontiguousarray(out, dtype=dtype)
    return np.round(out * peak).astype(dtype)


def _unit_range(stack: np.ndarray) -> tuple[np.ndarray, float]:
    """Samples as float32 in [0, 1], and the peak they were divided by (1.0: a float image, clamped)."""
    peak = PEAKS.get(stack.dtype, 1.0)
    return (stack.astype(np.float32) / peak if peak != 1.0 else np.clip(stack, 0, 1)), peak


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


def _plain_sizes(scale: Scale | None, size: tuple[int, int] | None) -> tuple[Scale | None, tuple[int, int] | None]:
    """numpy scalars and arrays as plain numbers; what is not a number is refused, as is a fractional size."""
    def numbers_of(value: object, message: str) -> list[numbers.Real]:
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
