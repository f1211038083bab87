"""lmf: upscale images and videos to any size with Latent Modulated Functions.

`Upscaler` and `plan_size` are imported on first use, so `import lmf_cli` (and `lmf --help`)
does not load PyTorch.
"""

from lmf_cli.errors import CheckpointError, InputError, LmfError, UnsupportedModelError
from lmf_cli.options import EngineOptions
from lmf_cli.process import keep_freed_memory, short_thread_spin

__version__ = "0.1.0"
__all__ = ["Upscaler", "EngineOptions", "plan_size", "LmfError", "CheckpointError", "InputError",
           "UnsupportedModelError", "keep_freed_memory", "short_thread_spin",
           "__version__"]


def __getattr__(name: str) -> object:
    if name in ("Upscaler", "plan_size"):
        from lmf_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmf_cli' has no attribute {name!r}")
