"""The inference engine: memory budgets, tiling, rendering (PyTorch and the compiled
kernel) and CMSR schedules. Numbers in, numbers out: no files, no command line.

Flow: `tiling.upscale_tensor` cuts the image into tiles -> `render.Geometry` (one encoded
tile) -> `render.render_region` (a window of any grid) or `cmsr.render_levels` (CMSR).
"""

from lmf_cli.engine.render import encode_image, render_region
from lmf_cli.engine.tiling import upscale_tensor

__all__ = ["encode_image", "render_region", "upscale_tensor"]
