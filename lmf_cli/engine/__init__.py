"""The inference engine: sizes, memory budgets, tiling, rendering (PyTorch and the compiled
kernel) and CMSR schedules. Numbers in, numbers out: no files, no command line.

Flow: `tiling.upscale_tensor` cuts the image into tiles -> `render.Geometry` (one encoded
tile) -> `render.render_region` (a window of any grid) or `cmsr.render_levels` (CMSR).
"""

from lmf_cli.engine.render import encode_image, render_region
from lmf_cli.engine.sizes import TRAINED_MAX_SCALE, Plan, plan_size, rel_cell_for, round_size, scaled_size
from lmf_cli.engine.tiling import upscale_tensor

__all__ = ["TRAINED_MAX_SCALE", "Plan", "encode_image", "plan_size", "rel_cell_for", "render_region", "round_size",
           "scaled_size", "upscale_tensor"]
