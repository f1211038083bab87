"""lmf: upscale images and videos to any size with Latent Modulated Functions."""

from lmf_cli.api import Upscaler, plan_size
from lmf_cli.errors import CheckpointError, InputError, LmfError, UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["Upscaler", "plan_size", "LmfError", "CheckpointError", "InputError", "UnsupportedModelError",
           "__version__"]
