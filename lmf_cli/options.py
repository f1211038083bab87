"""EngineOptions: how an upscale runs, as one validated value.

Made once (by the command line from its flags, or by a Python user), checked once here, and
carried whole from there to where each option acts: the Upscaler (device, precision, CMSR level,
alpha), the tiled engine (tile, memory budget), the readers and planners (pixel limit), the video
runner and, pickled, a Ray cluster's workers. Nothing here imports PyTorch, so building and
checking options costs nothing before work starts.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

from lmf_cli.errors import OptionError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CMSR_LEVELS = ("fast", "balanced", "fine", "exact")  # fast..fine: CMSR tables; exact: every pixel by the model
ALPHA_MODES = ("model", "bicubic")
DEFAULT_MAX_PIXELS = 400_000_000  # larger inputs or outputs are refused (decompression bombs, typos)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class EngineOptions:
    """How to upscale. Every field is checked when the value is made (OptionError, one line).

    device: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, cuda:N or mps.
    precision: the encoder's: auto (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32),
      fp32, bf16 or fp16. In bf16 the latent MLP runs in it too; the render MLP always runs in float32.
    tile: tile side in input pixels (None: from `max_memory`). Tiling never changes the result.
    max_memory: working memory for a tile, in bytes (None: a share of what is free).
    cmsr: Controllable Multi-Scale Rendering level: exact (every pixel by the model), fine,
      balanced or fast, or an MSE threshold the model was calibrated for (e.g. 2e-5).
    alpha: an alpha channel upscaled by the model or by bicubic.
    max_pixels: the largest input or output accepted, in pixels.
    """

    device: str = "auto"
    precision: str = "auto"
    tile: int | None = None
    max_memory: int | None = None
    cmsr: str | float = "exact"
    alpha: str = "model"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise OptionError("device", self.device, "use auto, cpu, cuda, cuda:N or mps")
        if self.precision not in PRECISIONS:
            raise OptionError("precision", self.precision, f"choose one of {', '.join(PRECISIONS)}")
        if self.tile is not None and (isinstance(self.tile, bool) or not isinstance(self.tile, numbers.Integral)
                                      or self.tile < 1):
            raise OptionError("tile", self.tile, "must be a whole number of input pixels, at least 1 "
                                                 "(None: from memory)")
        if self.max_memory is not None and (isinstance(self.max_memory, bool)
                                            or not isinstance(self.max_memory, numbers.Real)
                                            or not self.max_memory >= 1):
            raise OptionError("max_memory", self.max_memory, "must be a positive number of bytes")
        if isinstance(self.cmsr, str):
            if self.cmsr not in CMSR_LEVELS:
                raise OptionError("cmsr", self.cmsr, f"choose one of {', '.join(CMSR_LEVELS)} or an MSE threshold")
        elif isinstance(self.cmsr, bool) or not isinstance(self.cmsr, numbers.Real) \
                or not (math.isfinite(self.cmsr) and self.cmsr > 0):
            raise OptionError("cmsr", self.cmsr, f"choose one of {', '.join(CMSR_LEVELS)} or an MSE threshold")
        if self.alpha not in ALPHA_MODES:
            raise OptionError("alpha", self.alpha, "use 'model' or 'bicubic'")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, numbers.Integral) \
                or self.max_pixels < 1:
            raise OptionError("max_pixels", self.max_pixels, "must be a positive whole number of pixels")

    @property
    def uses_cmsr(self) -> bool:
        return self.cmsr != "exact"
